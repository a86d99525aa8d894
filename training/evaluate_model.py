"""Score a saved SERA model on one or more splits:
``python training/evaluate_model.py --model DIR --dataset SOURCE --split SPLIT``.

A thin entry point: the code is ``sera_training.evaluation`` (installed with this package).
"""

import sys

from sera_training.evaluation import main


if __name__ == "__main__":
    sys.exit(main())
