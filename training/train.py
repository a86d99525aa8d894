"""Train SERA with accelerate: ``accelerate launch training/train.py [--flag value ...]``; see ``--help``.

A thin entry point: the code is ``sera_training.train`` (installed with this package).
"""

import sys

from sera_training.train import main


if __name__ == "__main__":
    sys.exit(main())
