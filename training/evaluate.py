"""Score a saved referring segmentation model on one or more splits; prints the papers' table.

    python training/evaluate.py --model DIR --data SOURCE --split SPLIT [--split SPLIT2 ...] [--output results.json]
        [--batch-size N] [--device cpu|cuda|auto] [--model-card PATH] [--coco-image-dir DIR]

The code lives in ``evaluation.py``; see ``python training/evaluate.py --help``.

This file shares its name with the `evaluate` library. Whenever ``training/`` is on ``sys.path`` (it is first when a
script here runs, and the tests add it), ``import evaluate`` finds this file before the library. So, imported under
the name ``evaluate``, it puts the library in its own place, and every ``import evaluate`` gets the library.
"""

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _load_evaluate_library():
    """Import the `evaluate` library from ``sys.path`` without this file's folder."""
    here = Path(__file__).resolve().parent
    search_path = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != here]
    spec = importlib.machinery.PathFinder.find_spec("evaluate", search_path)
    if spec is None:
        raise ImportError("The `evaluate` library is not installed: pip install evaluate")
    library = importlib.util.module_from_spec(spec)
    sys.modules["evaluate"] = library
    try:
        spec.loader.exec_module(library)
    except BaseException:
        del sys.modules["evaluate"]
        raise
    return library


if __name__ == "evaluate":
    # The import system hands the importer whatever sys.modules holds once this file has run.
    _load_evaluate_library()
elif __name__ == "__main__":
    from evaluation import main

    sys.exit(main())
