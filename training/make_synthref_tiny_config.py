"""Write the tiny default config folder (hub_configs/sera-synthref-tiny).

A thin entry point: the code is ``sera_training.make_synthref_tiny_config`` (installed with this package).
"""

import sys

from sera_training.make_synthref_tiny_config import main


if __name__ == "__main__":
    sys.exit(main())
