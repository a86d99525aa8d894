"""One entry point from a data-source string to examples in the shared schema (see ``data_schema.py``).

Scripts take ``--dataset SOURCE`` and call :func:`load_examples`; the loaders themselves live in ``synthetic_data.py``,
``refer_data.py`` and ``hub_data.py`` and are imported only when their source is used, so evaluating on synthetic data
needs neither pycocotools nor COCO images.

Accepted sources:

- ``synthref``: the synthetic referring dataset (``synthetic_data.build_synthetic_dataset()``);
- ``refer:ROOT:DATASET:SPLIT_BY``: REFER files, e.g. ``refer:/data/refer:refcoco:unc`` or
  ``refer:/data/refer:refcocog:umd``;
- a folder written by ``DatasetDict.save_to_disk`` in the shared schema (e.g. by
  ``python training/synthetic_data.py --output DIR``);
- a Hub id such as ``jxu124/refcoco`` or ``jxu124/refcoco-benchmark``, or a local folder of such a repo's parquet
  files.
  Splits named like ``refcoco_unc_val`` (see ``hub_data.BENCHMARK_SPLITS``) or a source named ``*refcoco-benchmark``
  are read with the benchmark layout (images embedded); anything else with the per-ref mirror layout, which needs the
  COCO train2014 images (``coco_image_dir``).
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets


SYNTHETIC_SOURCE = "synthref"
REFER_PREFIX = "refer:"
SOURCE_FORMS = (
    f"'{SYNTHETIC_SOURCE}', '{REFER_PREFIX}ROOT:DATASET:SPLIT_BY' (e.g. refer:/data/refer:refcoco:unc), "
    "a folder written by DatasetDict.save_to_disk, a Hub dataset id (e.g. jxu124/refcoco) or a local folder of its parquet files"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class DataSource:
    """A parsed ``--data`` value: ``kind`` is "synthetic", "refer", "saved" or "hub"."""

    kind: str
    location: str = ""  # REFER root, Hub id or local folder
    dataset: str = ""  # REFER dataset name
    split_by: str = ""  # REFER refs file

    @property
    def name(self) -> str:
        """A short name for reports, without local paths: "synthref", "refcoco(unc)", "jxu124/refcoco"."""
        if self.kind == "synthetic":
            return SYNTHETIC_SOURCE
        if self.kind == "refer":
            return f"{self.dataset}({self.split_by})"
        return self.location if _HUB_ID.fullmatch(self.location) else Path(self.location).resolve().name


def _synthetic_splits():
    from sera_training import synthetic_data

    return synthetic_data.build_synthetic_dataset()


def parse_source(source: str | os.PathLike) -> DataSource:
    """Check a data-source string without loading anything; raise ``ValueError`` with the accepted forms if unknown."""
    source = str(source)
    if source == SYNTHETIC_SOURCE:
        return DataSource(kind="synthetic")
    if source.startswith(REFER_PREFIX):
        # Split from the right, so that a root containing ":" still works.
        parts = source[len(REFER_PREFIX) :].rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"Malformed REFER source {source!r}: expected {REFER_PREFIX}ROOT:DATASET:SPLIT_BY, "
                "e.g. refer:/data/refer:refcoco:unc."
            )
        root, dataset, split_by = parts
        return DataSource(kind="refer", location=root, dataset=dataset, split_by=split_by)
    if (Path(source) / "dataset_dict.json").is_file():
        return DataSource(kind="saved", location=source)
    if Path(source).is_dir() or _HUB_ID.fullmatch(source):
        return DataSource(kind="hub", location=source)
    raise ValueError(f"Unknown data source {source!r}. Expected {SOURCE_FORMS}.")


def load_source_splits(
    source: str | os.PathLike,
    splits: list[str],
    coco_image_dir: str | os.PathLike | None = None,
    **synthetic_options,
) -> dict[str, datasets.Dataset]:
    """``{split: examples}`` for each of ``splits`` that the source has (a REFER or Hub source raises for a split it
    lacks). ``synthetic_options`` go to ``synthetic_data.build_synthetic_dataset`` (cache_dir, seed, num_images)."""
    parsed = parse_source(source)
    if parsed.kind == "synthetic":
        from sera_training import synthetic_data

        everything = synthetic_data.build_synthetic_dataset(**synthetic_options)
    elif parsed.kind == "saved":
        everything = datasets.load_from_disk(parsed.location)
    else:
        return {split: load_examples(source, split, coco_image_dir=coco_image_dir) for split in splits}
    return {split: everything[split] for split in splits if split in everything}


def load_examples(
    source: str | os.PathLike, split: str, coco_image_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Load one split of a data source as a ``datasets.Dataset`` with the schema of ``data_schema.EXAMPLE_FEATURES``.

    Args:
        source: see the module docstring.
        split: the split name as the source spells it (``"val"``, ``"testA"``, ``"refcoco_unc_val"``...).
        coco_image_dir: the COCO train2014 images, for REFER (overrides its default image folder) and for the Hub
            mirrors without embedded images.
    """
    parsed = parse_source(source)
    if parsed.kind in ("synthetic", "saved"):
        found = load_source_splits(source, [split])
        if split not in found:
            everything = datasets.load_from_disk(parsed.location) if parsed.kind == "saved" else _synthetic_splits()
            where = parsed.location if parsed.kind == "saved" else "The synthetic dataset"
            raise ValueError(f"{where} has no split {split!r}; its splits are: {', '.join(everything)}.")
        return found[split]

    if parsed.kind == "refer":
        from sera_training import refer_data

        return refer_data.load_refer_dataset(
            parsed.location, dataset=parsed.dataset, split_by=parsed.split_by, split=split, image_dir=coco_image_dir
        )

    from sera_training import hub_data

    if split in hub_data.BENCHMARK_SPLITS or parsed.location.rstrip("/").endswith("refcoco-benchmark"):
        return hub_data.load_hub_refcoco_benchmark(parsed.location, split)
    if coco_image_dir is None:
        raise ValueError(
            f"{parsed.location} (split {split!r}) is read as a RefCOCO mirror without images, so it needs the COCO "
            "train2014 image folder: pass coco_image_dir (--coco_image_dir). For the benchmark layout with embedded "
            f"images, use one of its splits: {', '.join(hub_data.BENCHMARK_SPLITS)}."
        )
    return hub_data.load_hub_refcoco(parsed.location, split, coco_image_dir)
