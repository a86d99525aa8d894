"""Load RefCOCO, RefCOCO+, RefCOCOg (and RefCLEF, or any folder in the same layout) from the original REFER files
into the SERA example schema.

The REFER layout (https://github.com/lichengunc/refer) is::

    {refer_root}/
        images/mscoco/images/train2014/COCO_train2014_000000000009.jpg ...
        refcoco/instances.json   refs(unc).p   refs(google).p
        refcoco+/instances.json  refs(unc).p
        refcocog/instances.json  refs(umd).p   refs(google).p
        refclef/instances.json   refs(unc).p   refs(berkeley).p   (images in images/saiapr_tc-12/)

Any other folder holding ``instances.json`` and ``refs(*).p`` loads too (its images default to COCO train2014's).
``refs(*.p)`` is a Python 2 pickle of a list of refs ``{ref_id, ann_id, image_id, category_id, split, sentences:
[{sent, raw, tokens, sent_id}], sent_ids, file_name}``; ``instances.json`` holds the COCO images and annotations the
refs point at. Every RefCOCO image is a COCO train2014 image. We yield one example per sentence.

The row building (:class:`RefRowBuilder`) is shared with ``hub_data.py``, whose Hub mirrors carry the same refs.
"""

import io
import json
import logging
import os
import pickle
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from sera_training.coco_masks import DegeneratePolygonError, MaskDecodeError, decode_segmentation, mask_to_image
from sera_training.data_schema import EXAMPLE_FEATURES, SkippedRecords
from sera_training.safe_pickle import load_pickle_safely


logger = logging.getLogger(__name__)

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")  # the ones REFER ships; other folders load too
REFER_IMAGE_SUBDIR = Path("images", "mscoco", "images", "train2014")
# Where refer.py looks for the images of a dataset that does not use COCO's.
REFER_IMAGE_SUBDIRS = {"refclef": Path("images", "saiapr_tc-12")}
REFER_LAYOUT = """\
  {refer_root}/
    images/mscoco/images/train2014/COCO_train2014_*.jpg   (or pass image_dir=)
    refcoco/instances.json, refs(unc).p, refs(google).p
    refcoco+/instances.json, refs(unc).p
    refcocog/instances.json, refs(umd).p, refs(google).p
    refclef/instances.json, refs(unc).p, refs(berkeley).p   (images: images/saiapr_tc-12/)"""

# Reasons a record is skipped; each is a key of the SkippedRecords report.
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_SIZE_MISMATCH = "image size differs from its annotation"
IMAGE_NOT_IN_INSTANCES = "image missing from the annotations"
MISSING_ANNOTATION = "ref points at a missing annotation"
DEGENERATE_POLYGON = "polygon with fewer than 3 points"
INVALID_SEGMENTATION = "invalid segmentation"
EMPTY_MASK = "empty mask"
EMPTY_SENTENCE = "empty sentence"
MALFORMED_REF = "malformed ref"

# The EXIF orientations `datasets.Image` undoes when it decodes an image (as PIL.ImageOps.exif_transpose does).
# COCO annotations are in stored-pixel coordinates, so the mask must get the same transpose to stay aligned.
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadRecord(Exception):
    """A record that cannot become an example; ``reason`` is what it is counted under in the skip report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CheckedImage:
    """An image that opened and decoded, with what masks need to know about it."""

    value: dict  # what goes in the "image" column: {"path": ..., "bytes": ...}
    width: int  # stored pixel size, the frame COCO annotations are drawn in
    height: int
    orientation: Image.Transpose | None  # EXIF transpose `datasets` applies on decode, or None
    name: str  # for messages


class RefRowBuilder:
    """Turns REFER refs into rows of ``EXAMPLE_FEATURES`` and counts, by reason, every sentence it has to drop.

    Counts are in expressions (the rows a bad ref would have produced), so the report says how much data was lost.
    """

    def __init__(self, source: str):
        self.source = source
        self.skipped = SkippedRecords(source)
        self._checked_files: dict[str, CheckedImage | BadRecord] = {}

    def open_image_file(self, path: str | os.PathLike) -> CheckedImage:
        """Check an image file once (many refs share an image), raising :class:`BadRecord` if it is unusable."""
        path = str(path)
        if path not in self._checked_files:
            try:
                if not os.path.isfile(path):
                    raise BadRecord(MISSING_IMAGE, path)
                self._checked_files[path] = _check_image(path, {"path": path, "bytes": None}, name=path)
            except BadRecord as bad:
                self._checked_files[path] = bad
        checked = self._checked_files[path]
        if isinstance(checked, BadRecord):
            raise checked
        return checked

    def open_image_bytes(self, data: bytes | None, name: str, path: str | None = None) -> CheckedImage:
        """Check an image embedded in a dataset row, raising :class:`BadRecord` if it is unusable."""
        if not data:
            raise BadRecord(MISSING_IMAGE, f"{name} has no image bytes")
        return _check_image(io.BytesIO(data), {"path": path, "bytes": data}, name=name)

    def rows(
        self,
        ref: dict,
        segmentation: Any,
        image: CheckedImage,
        annotated_size: tuple[int, int] | None = None,
    ) -> list[dict]:
        """One row per usable sentence of ``ref``, whose object is ``segmentation`` drawn on ``image``.

        ``annotated_size`` is the (height, width) the annotation was drawn for; it must match the image file.
        Raises :class:`BadRecord` when the whole ref is unusable; empty sentences are counted and left out.
        """
        sentences = _ref_field(ref, "sentences")
        if not isinstance(sentences, list) or not sentences:
            raise BadRecord(MALFORMED_REF, f"ref {ref.get('ref_id')} has no sentences")
        ids = {key: _ref_id_field(ref, key) for key in ("image_id", "ann_id", "ref_id")}
        mask_png = self._mask_png(segmentation, image, annotated_size)
        rows = []
        for sentence in sentences:
            if not isinstance(sentence, dict) or "sent_id" not in sentence:
                self.skipped.skip(MALFORMED_REF, f"ref {ids['ref_id']} has a sentence without sent_id")
                continue
            # "sent" is REFER's cleaned-up text; "raw" is what the annotator typed.
            expression = repair_python2_text(str(sentence.get("sent") or sentence.get("raw") or "")).strip()
            if not expression:
                self.skipped.skip(EMPTY_SENTENCE, f"ref {ids['ref_id']}, sentence {sentence['sent_id']}")
                continue
            rows.append(
                {
                    "image": image.value,
                    "mask": {"bytes": mask_png, "path": None},
                    "expression": expression,
                    "category": "",
                    "image_id": ids["image_id"],
                    "object_id": ids["ann_id"],
                    "ref_id": ids["ref_id"],
                    "sentence_id": int(sentence["sent_id"]),
                    "source": self.source,
                }
            )
        return rows

    def skip_ref(self, ref: Any, bad: BadRecord) -> None:
        """Count every sentence of a ref that cannot be used (at least one, so sentence-less refs show too)."""
        sentences = ref.get("sentences") if isinstance(ref, dict) else None
        ref_id = ref.get("ref_id") if isinstance(ref, dict) else None
        for _ in range(max(1, len(sentences) if isinstance(sentences, list) else 1)):
            self.skipped.skip(bad.reason, f"ref {ref_id}: {bad.detail}")

    def _mask_png(self, segmentation: Any, image: CheckedImage, annotated_size: tuple[int, int] | None) -> bytes:
        height, width = annotated_size if annotated_size is not None else (image.height, image.width)
        if (image.height, image.width) != (height, width):
            raise BadRecord(
                IMAGE_SIZE_MISMATCH,
                f"{image.name} is {image.width}x{image.height} but the annotation is for {width}x{height}",
            )
        try:
            mask = decode_segmentation(segmentation, height, width)
        except DegeneratePolygonError as error:
            raise BadRecord(DEGENERATE_POLYGON, str(error)) from error
        except MaskDecodeError as error:
            raise BadRecord(INVALID_SEGMENTATION, str(error)) from error
        if not mask.any():
            raise BadRecord(EMPTY_MASK, f"the object covers no pixel of {image.name}")
        mask_image = mask_to_image(mask)
        if image.orientation is not None:
            mask_image = mask_image.transpose(image.orientation)
        buffer = io.BytesIO()
        mask_image.save(buffer, format="PNG")
        return buffer.getvalue()


def repair_python2_text(text: str) -> str:
    """Undo the mojibake of non-ASCII text in REFER's Python 2 pickles: they store UTF-8 byte strings, which loading
    with ``encoding="latin1"`` turns into one character per byte ("cafÃ© car"). Re-encoding to latin-1 gives the bytes
    back; when they are valid UTF-8 the text was such a byte string and is repaired ("café car"). ASCII text, text
    with characters beyond latin-1 (a Python 2 ``unicode``, already right) and genuine latin-1 text stay as they are.
    """
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def examples_to_dataset(
    generate_rows: Callable[[], Iterator[dict]],
    skipped: SkippedRecords,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Write the rows to an Arrow dataset on disk, log the skip report, and fail if no row survived."""
    produced = 0

    def counted_rows() -> Iterator[dict]:
        nonlocal produced
        for row in generate_rows():
            produced += 1
            yield row

    try:
        # A fresh fingerprint makes the generator run every time: a cache hit would return rows without counting skips.
        dataset = datasets.Dataset.from_generator(
            counted_rows, features=EXAMPLE_FEATURES, cache_dir=cache_dir, fingerprint=uuid.uuid4().hex
        )
    except ValueError:
        # `datasets` refuses to build an empty split; say why it is empty instead.
        if produced:
            raise
        logger.warning(skipped.summary())
        skipped.raise_if_nothing_left(produced)
        raise
    if skipped.total:
        logger.warning(skipped.summary())
    else:
        logger.info(skipped.summary())
    return dataset


def annotated_size(image_info: dict) -> tuple[int, int] | None:
    """The (height, width) a COCO image record declares, or None when it does not say."""
    if image_info.get("height") is None or image_info.get("width") is None:
        return None
    return int(image_info["height"]), int(image_info["width"])


def coco_train2014_file_name(image_id: int) -> str:
    """COCO's own file name for a train2014 image, e.g. ``COCO_train2014_000000000009.jpg``."""
    return f"COCO_train2014_{int(image_id):012d}.jpg"


def load_refer_dataset(
    refer_root: str | os.PathLike,
    dataset: str = "refcoco",
    split_by: str = "unc",
    split: str = "val",
    image_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | None = None,
    return_skipped: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, SkippedRecords]:
    """Load one split of RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF from REFER files, one example per sentence.

    Args:
        refer_root: the REFER ``data`` folder (see the module docstring for its layout).
        dataset: the folder under ``refer_root``: ``"refcoco"``, ``"refcoco+"``, ``"refcocog"``, ``"refclef"``, or any
            other folder in the same layout.
        split_by: which refs file, e.g. ``"unc"`` (RefCOCO, RefCOCO+), ``"umd"`` or ``"google"`` (RefCOCOg).
        split: a split stored in that file, e.g. ``"val"``, ``"testA"`` (unc); ``"test"`` (umd).
        image_dir: the images; defaults to ``{refer_root}/images/saiapr_tc-12`` for refclef (as refer.py) and to
            ``{refer_root}/images/mscoco/images/train2014`` otherwise.
        cache_dir: where `datasets` writes the Arrow files (its default cache when None).
        return_skipped: also return the :class:`SkippedRecords` report.

    Images are stored by path (not copied), masks as PNG. Records that cannot be used are skipped, counted by reason
    and logged; a split where nothing is usable raises ``ValueError``.
    """
    refer_root = Path(refer_root)
    data_dir = refer_root / dataset
    if not dataset or Path(dataset).name != dataset or not data_dir.is_dir():
        present = sorted(path.parent.name for path in refer_root.glob("*/refs(*).p")) if refer_root.is_dir() else []
        found = f"; the folders with refs files there are: {', '.join(sorted(set(present)))}" if present else ""
        raise FileNotFoundError(
            f"REFER dataset folder not found: {data_dir} (dataset={dataset!r} names a folder under {refer_root}"
            f"{found}). The REFER layout is expected:\n{REFER_LAYOUT.format(refer_root=refer_root)}"
        )
    refs_file = data_dir / f"refs({split_by}).p"
    instances_file = data_dir / "instances.json"
    default_images = REFER_IMAGE_SUBDIRS.get(dataset, REFER_IMAGE_SUBDIR)
    image_dir = Path(image_dir) if image_dir is not None else refer_root / default_images
    _check_refer_layout(refer_root, refs_file, instances_file, image_dir)

    try:
        refs = load_pickle_safely(refs_file)
    except pickle.UnpicklingError as error:
        if str(error).startswith("Refusing to unpickle"):
            raise
        raise ValueError(f"{refs_file} is not a readable REFER refs pickle ({error}); download it again.") from error
    except (EOFError, ValueError, TypeError, IndexError, MemoryError) as error:
        raise ValueError(f"{refs_file} is not a readable REFER refs pickle ({error!r}); download it again.") from error
    if not isinstance(refs, list):
        raise ValueError(f"{refs_file} should hold a list of refs, found a {type(refs).__name__}.")
    try:
        with open(instances_file, encoding="utf-8") as handle:
            instances = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{instances_file} is not valid JSON ({error}); it may be truncated: download it again."
        ) from error
    annotations = _records_by_id(instances, "annotations", instances_file)
    images = _records_by_id(instances, "images", instances_file)

    splits_present = sorted({str(ref["split"]) for ref in refs if isinstance(ref, dict) and "split" in ref})
    if split not in splits_present:
        raise ValueError(
            f"Split {split!r} is not in {refs_file}; the splits present are: {', '.join(splits_present) or 'none'}."
        )

    builder = RefRowBuilder(source=f"{dataset}({split_by})")
    # A ref without a split cannot be placed in any split: report it whichever split is loaded.
    for ref in refs:
        if not isinstance(ref, dict) or "split" not in ref:
            builder.skip_ref(ref, BadRecord(MALFORMED_REF, f"not a ref with a split: {str(ref)[:80]}"))
    selected = [ref for ref in refs if isinstance(ref, dict) and ref.get("split") == split]

    def generate_rows() -> Iterator[dict]:
        for ref in selected:
            try:
                annotation = annotations.get(ref.get("ann_id"))
                if annotation is None:
                    raise BadRecord(MISSING_ANNOTATION, f"no annotation {ref.get('ann_id')} in {instances_file}")
                image_info = images.get(ref.get("image_id"))
                if image_info is None:
                    raise BadRecord(IMAGE_NOT_IN_INSTANCES, f"no image {ref.get('image_id')} in {instances_file}")
                file_name = image_info.get("file_name") or coco_train2014_file_name(ref["image_id"])
                image = builder.open_image_file(image_dir / file_name)
                rows = builder.rows(ref, annotation.get("segmentation"), image, annotated_size(image_info))
            except BadRecord as bad:
                builder.skip_ref(ref, bad)
                continue
            yield from rows

    examples = examples_to_dataset(generate_rows, builder.skipped, cache_dir=cache_dir)
    return (examples, builder.skipped) if return_skipped else examples


def _check_refer_layout(refer_root: Path, refs_file: Path, instances_file: Path, image_dir: Path) -> None:
    layout = REFER_LAYOUT.format(refer_root=refer_root)
    if not refs_file.is_file():
        present = sorted(path.name for path in refs_file.parent.glob("refs(*).p")) if refs_file.parent.is_dir() else []
        found = f" Refs files in {refs_file.parent}: {', '.join(present)}." if present else ""
        raise FileNotFoundError(
            f"REFER refs file not found: {refs_file}.{found} The REFER layout is expected:\n{layout}"
        )
    if not instances_file.is_file():
        raise FileNotFoundError(
            f"REFER instances.json not found: {instances_file}. It must sit next to {refs_file.name}:\n{layout}"
        )
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"REFER image folder not found: {image_dir}. Put the images there (REFER layout below: COCO train2014 "
            f"for RefCOCO/+/g, saiapr_tc-12 for RefCLEF) or pass image_dir=.\n{layout}"
        )


def _records_by_id(instances: Any, key: str, instances_file: Path) -> dict:
    """COCO's `images` or `annotations` list, by id; a file that is not COCO's layout is refused with what it holds."""
    if not isinstance(instances, dict):
        raise ValueError(
            f'{instances_file} should hold a COCO object {{"images": [...], "annotations": [...]}}, found a '
            f"{type(instances).__name__}."
        )
    records = instances.get(key, [])
    if not isinstance(records, list) or not all(isinstance(record, dict) and "id" in record for record in records):
        found = (
            type(records).__name__
            if not isinstance(records, list)
            else "a list with entries that are not objects with an id"
        )
        raise ValueError(f"{instances_file}: {key!r} should be a list of objects with an 'id', found {found}.")
    by_id = {}
    duplicates = []
    for record in records:
        if record["id"] in by_id:
            duplicates.append(record["id"])
        by_id[record["id"]] = record
    if duplicates:
        raise ValueError(
            f"{instances_file}: {key!r} has duplicate ids {sorted(set(map(str, duplicates)))[:5]}, so a ref cannot "
            "tell which one it means; the file is damaged or merged from several: download it again."
        )
    return by_id


def _ref_field(ref: dict, key: str) -> Any:
    if key not in ref:
        raise BadRecord(MALFORMED_REF, f"ref {ref.get('ref_id')} has no {key!r}")
    return ref[key]


def _ref_id_field(ref: dict, key: str) -> int:
    try:
        return int(_ref_field(ref, key))
    except (TypeError, ValueError) as error:
        raise BadRecord(MALFORMED_REF, f"ref {ref.get('ref_id')} has a non-integer {key!r}") from error


def _check_image(source: Any, value: dict, name: str) -> CheckedImage:
    try:
        with Image.open(source) as image:
            image.load()  # decode fully: a truncated file only fails here
            width, height = image.size
            orientation = EXIF_ORIENTATION_TRANSPOSE.get(image.getexif().get(EXIF_ORIENTATION_TAG))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecord(UNREADABLE_IMAGE, f"{name}: {error}") from error
    return CheckedImage(value=value, width=width, height=height, orientation=orientation, name=name)
