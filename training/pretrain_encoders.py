"""Pretrain the tiny encoders on synthetic scenes (CLIP-style contrastive loss and attribute targets).

A thin entry point: the code is ``sera_training.pretrain_encoders`` (installed with this package).
"""

import sys

from sera_training.pretrain_encoders import main


if __name__ == "__main__":
    sys.exit(main())
