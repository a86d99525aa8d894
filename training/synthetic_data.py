"""Build the built-in synthetic referring dataset (synthref) and save it to a folder.

A thin entry point: the code is ``sera_training.synthetic_data`` (installed with this package).
"""

import sys

from sera_training.synthetic_data import main


if __name__ == "__main__":
    sys.exit(main())
