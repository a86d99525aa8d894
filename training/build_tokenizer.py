"""Build a small CLIP-style BPE tokenizer from a text corpus.

A thin entry point: the code is ``sera_training.build_tokenizer`` (installed with this package).
"""

import sys

from sera_training.build_tokenizer import main


if __name__ == "__main__":
    sys.exit(main())
