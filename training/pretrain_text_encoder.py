"""Teach the tiny text tower the words of the synthref language (text only).

A thin entry point: the code is ``sera_training.pretrain_text_encoder`` (installed with this package).
"""

import sys

from sera_training.pretrain_text_encoder import main


if __name__ == "__main__":
    sys.exit(main())
