"""Score whether a model reads spatial words: IoU between the masks for an expression and its word-swapped twin.

A thin entry point: the code is ``sera_training.word_swap`` (installed with this package).
"""

import sys

from sera_training.word_swap import main


if __name__ == "__main__":
    sys.exit(main())
