"""Publish a trained SERA folder on the Hugging Face Hub: ``python training/push.py MODEL_DIR --repo_id org/name``.

A thin entry point: the code is ``sera_training.push`` (installed with this package).
"""

import sys

from sera_training.push import main


if __name__ == "__main__":
    sys.exit(main())
