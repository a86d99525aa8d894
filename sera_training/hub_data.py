"""Load the Hugging Face Hub mirrors of RefCOCO / RefCOCO+ / RefCOCOg into the SERA example schema.

Two layouts exist (column names from the dataset cards of the repos):

- ``jxu124/refcoco``, ``jxu124/refcocoplus`` (unc splits) and ``jxu124/refcocog`` (umd splits): one row per ref with
  the REFER fields (``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences``...), the COCO annotation as a JSON
  string in ``raw_anns`` and the COCO image record as a JSON string in ``raw_image_info``. No image bytes: images are
  read from a local COCO train2014 folder. The Hub split names are ``train``, ``validation``, ``test`` (and
  ``testB``); in the RefCOCO and RefCOCO+ mirrors ``test`` holds testA. REFER names are accepted too:
  ``val`` -> ``validation``, ``testA`` -> ``test`` (refused for RefCOCOg, which has no testA).
- ``jxu124/refcoco-benchmark``: one row per image, the image embedded in ``image``, the image record in
  ``image_info`` and the refs in ``ref_list`` (``[{ref_info, ann_info}]``), over the 11 evaluation splits in
  :data:`BENCHMARK_SPLITS`. Each ref is exploded into one example per sentence.

``name_or_path`` is a Hub id, or a local folder holding the repo's parquet files
(``data/{split}-00000-of-00001-*.parquet`` as on the Hub, or ``{split}/*.parquet``).
"""

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from sera_training.data_schema import SkippedRecords
from sera_training.refer_data import (
    MALFORMED_REF,
    MISSING_ANNOTATION,
    BadRecord,
    RefRowBuilder,
    annotated_size,
    coco_train2014_file_name,
    examples_to_dataset,
)


logger = logging.getLogger(__name__)

HUB_BENCHMARK = "jxu124/refcoco-benchmark"
BENCHMARK_SPLITS = (
    "refcoco_unc_val",
    "refcoco_unc_testA",
    "refcoco_unc_testB",
    "refcoco_google_val",
    "refcoco_google_test",
    "refcocog_umd_val",
    "refcocog_umd_test",
    "refcocog_google_val",
    "refcoco_plus_unc_val",
    "refcoco_plus_unc_testA",
    "refcoco_plus_unc_testB",
)
# REFER split name -> the mirrors' split name.
HUB_SPLIT_NAMES = {"val": "validation", "testA": "test"}
MIRROR_COLUMNS = ("ref_id", "ann_id", "image_id", "sentences", "raw_anns", "raw_image_info")
BENCHMARK_COLUMNS = ("ref_list", "image_info", "image")
INVALID_ROW_JSON = "unreadable JSON in the row"


def load_hub_refcoco(
    name_or_path: str | os.PathLike,
    split: str,
    coco_image_dir: str | os.PathLike,
    *,
    cache_dir: str | None = None,
    return_skipped: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, SkippedRecords]:
    """Load a split of ``jxu124/refcoco``, ``jxu124/refcocoplus`` or ``jxu124/refcocog``, one example per sentence.

    Args:
        name_or_path: a Hub id or a local folder of the mirror's parquet files.
        split: a Hub split (``train``, ``validation``, ``test``, ``testB``) or its REFER name (``val``, ``testA``).
        coco_image_dir: the COCO train2014 images the rows refer to.
        cache_dir: where `datasets` writes the Arrow files (its default cache when None).
        return_skipped: also return the :class:`SkippedRecords` report.
    """
    coco_image_dir = Path(coco_image_dir)
    if not coco_image_dir.is_dir():
        raise FileNotFoundError(
            f"COCO train2014 image folder not found: {coco_image_dir}. The Hub mirrors hold no images; point "
            "coco_image_dir at the folder of COCO_train2014_*.jpg files."
        )
    hub_split = HUB_SPLIT_NAMES.get(split, split)
    rows, name = _load_parquet_split(name_or_path, hub_split, cache_dir)
    _require_columns(rows, MIRROR_COLUMNS, name)
    _check_refer_split(rows, split, hub_split, name)
    rows = rows.select_columns(list(MIRROR_COLUMNS))
    builder = RefRowBuilder(source=name)

    def generate_rows() -> Iterator[dict]:
        for row in rows:
            ref = {key: row[key] for key in ("ref_id", "ann_id", "image_id", "sentences")}
            try:
                annotation = _mirror_annotation(row)
                image_info = _parse_json(row["raw_image_info"], "raw_image_info")
                if not isinstance(image_info, dict):
                    raise BadRecord(INVALID_ROW_JSON, f"raw_image_info of ref {row['ref_id']} is not an object")
                file_name = image_info.get("file_name") or coco_train2014_file_name(row["image_id"])
                image = builder.open_image_file(coco_image_dir / file_name)
                rows_of_ref = builder.rows(ref, annotation.get("segmentation"), image, annotated_size(image_info))
            except BadRecord as bad:
                builder.skip_ref(ref, bad)
                continue
            yield from rows_of_ref

    examples = examples_to_dataset(generate_rows, builder.skipped, cache_dir=cache_dir)
    return (examples, builder.skipped) if return_skipped else examples


def load_hub_refcoco_benchmark(
    name_or_path: str | os.PathLike,
    split: str,
    *,
    cache_dir: str | None = None,
    return_skipped: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, SkippedRecords]:
    """Load one evaluation split of ``jxu124/refcoco-benchmark`` (see :data:`BENCHMARK_SPLITS`), one example per
    sentence, with the embedded images.

    The source of each example is ``"{name}:{split}"``, because one benchmark repo holds several datasets.
    """
    if _is_hub_id(name_or_path) and split not in BENCHMARK_SPLITS:
        raise ValueError(f"Unknown benchmark split {split!r}; the splits are: {', '.join(BENCHMARK_SPLITS)}.")
    rows, name = _load_parquet_split(name_or_path, split, cache_dir)
    _require_columns(rows, BENCHMARK_COLUMNS, name)
    rows = rows.select_columns(list(BENCHMARK_COLUMNS))
    if isinstance(rows.features["image"], datasets.Image):
        # Keep the encoded bytes: the examples store them as they are, and we decode once to check them.
        rows = rows.cast_column("image", datasets.Image(decode=False))
    builder = RefRowBuilder(source=f"{name}:{split}")

    def generate_rows() -> Iterator[dict]:
        for row_index, row in enumerate(rows):
            entries = row["ref_list"] or []
            image_info = row["image_info"] or {}
            embedded = row["image"] or {}
            try:
                image = builder.open_image_bytes(
                    embedded.get("bytes"),
                    name=f"row {row_index} ({image_info.get('file_name')})",
                    path=embedded.get("path"),
                )
            except BadRecord as bad:
                for entry in entries:
                    builder.skip_ref(entry.get("ref_info"), bad)
                continue
            for entry in entries:
                ref = entry.get("ref_info")
                try:
                    if not isinstance(ref, dict):
                        raise BadRecord(MALFORMED_REF, f"row {row_index} has a ref_list entry without ref_info")
                    annotation = entry.get("ann_info")
                    if annotation is None:
                        raise BadRecord(MISSING_ANNOTATION, f"ref {ref.get('ref_id')} has no ann_info")
                    rows_of_ref = builder.rows(ref, annotation.get("segmentation"), image, annotated_size(image_info))
                except BadRecord as bad:
                    builder.skip_ref(ref, bad)
                    continue
                yield from rows_of_ref

    examples = examples_to_dataset(generate_rows, builder.skipped, cache_dir=cache_dir)
    return (examples, builder.skipped) if return_skipped else examples


def _load_parquet_split(
    name_or_path: str | os.PathLike, split: str, cache_dir: str | None
) -> tuple[datasets.Dataset, str]:
    """The split as a Dataset, read from the Hub or from a local folder of parquet files, and a name for it."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        files_by_split = parquet_files_by_split(folder)
        if not files_by_split:
            raise FileNotFoundError(f"No parquet files under {folder}.")
        if split not in files_by_split:
            raise ValueError(
                f"Split {split!r} not found in {folder}; the splits present are: {', '.join(sorted(files_by_split))}."
            )
        data_files = {split: [str(path) for path in files_by_split[split]]}
        rows = datasets.load_dataset("parquet", data_files=data_files, split=split, cache_dir=cache_dir)
        return rows, folder.resolve().name
    if not _is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is neither a folder nor a Hub dataset id like {HUB_BENCHMARK!r}.")
    return datasets.load_dataset(str(name_or_path), split=split, cache_dir=cache_dir), str(name_or_path)


def parquet_files_by_split(folder: Path) -> dict[str, list[Path]]:
    """Group a folder's parquet files by split, reading the split from the Hub's file naming.

    ``data/{split}-00000-of-00001-{hash}.parquet`` (pushed with `datasets`), ``{split}/0000.parquet`` (the Hub's
    parquet conversion) and ``{split}.parquet`` are understood.
    """
    files_by_split: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        shard = re.match(r"^(?P<split>.+?)-\d{5}-of-\d{5}", path.name)
        if shard:
            split = shard.group("split")
        elif re.fullmatch(r"\d+\.parquet", path.name):
            split = path.parent.name
        else:
            split = path.stem
        files_by_split.setdefault(split, []).append(path)
    return files_by_split


def _is_hub_id(name_or_path: str | os.PathLike) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path))) and not Path(name_or_path).exists()


def _require_columns(rows: datasets.Dataset, columns: tuple[str, ...], name: str) -> None:
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise ValueError(
            f"{name} does not have the expected columns {', '.join(missing)}; it has: {', '.join(rows.column_names)}."
        )


def _check_refer_split(rows: datasets.Dataset, split: str, hub_split: str, name: str) -> None:
    """Make sure a REFER split name picked the right Hub split, using the REFER split each row records."""
    if "split" not in rows.column_names:
        return
    refer_splits = set(rows.unique("split"))
    if split != hub_split and split not in refer_splits:
        raise ValueError(
            f"{name}: {split!r} was read from the Hub split {hub_split!r}, whose rows are REFER split(s) "
            f"{', '.join(sorted(refer_splits))}, not {split!r}. RefCOCOg (umd) has no testA/testB."
        )
    if hub_split == "test" and refer_splits == {"testA"}:
        logger.info(f"{name}: the Hub split 'test' of the RefCOCO and RefCOCO+ mirrors is testA.")


def _mirror_annotation(row: dict) -> dict:
    annotation = _parse_json(row["raw_anns"], "raw_anns")
    # The mirrors store the one annotation of the ref; accept a list too and pick the ref's annotation from it.
    if isinstance(annotation, list):
        matching = [ann for ann in annotation if isinstance(ann, dict) and ann.get("id") == row["ann_id"]]
        annotation = matching[0] if matching else None
    if not isinstance(annotation, dict) or not annotation:
        raise BadRecord(MISSING_ANNOTATION, f"raw_anns of ref {row['ref_id']} holds no annotation {row['ann_id']}")
    return annotation


def _parse_json(text: str | None, column: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise BadRecord(INVALID_ROW_JSON, f"{column}: {error}") from error
