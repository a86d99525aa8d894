"""What the tests share: paths, tiny models (`tiny_models`), COCO fixtures, cross-process comparisons, a local
stand-in for the Hub (`hub_server`), the train.py launcher (`training_runs`)."""

import importlib.util
import sys
from pathlib import Path

from tests.helpers.tiny_models import TINY_IMAGE_SIZE, TINY_TEXT_LENGTH, TINY_TEXT_VOCAB, tiny_batch, tiny_sera_config


REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_HUB_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"


def load_script(relative_path: str):
    """A script of the repository that is not part of a package (``benchmarks/parameter_table.py``), imported from
    its file, once, under its file name."""
    path = REPO_ROOT / relative_path
    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


__all__ = [
    "REPO_ROOT",
    "TINY_HUB_CONFIG",
    "TINY_IMAGE_SIZE",
    "TINY_TEXT_LENGTH",
    "TINY_TEXT_VOCAB",
    "load_script",
    "tiny_batch",
    "tiny_sera_config",
]
