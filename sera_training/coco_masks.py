"""Turn a COCO ``segmentation`` into a binary mask, with pycocotools doing the rasterization.

COCO stores an object's shape in one of three ways:

- polygons: ``[[x1, y1, x2, y2, ...], ...]``, one list per visible part of the object; the parts are merged;
- uncompressed RLE: ``{"size": [height, width], "counts": [run, run, ...]}``, used for crowd regions (``iscrowd=1``);
- compressed RLE: the same with ``counts`` as COCO's compact string (``str`` or ``bytes``);
- a list of RLE dicts, one per part (the form REFER's ``refclef`` annotations use, which ``refer.py`` decodes and
  merges); the parts are merged.

A polygon part with fewer than 3 points encloses no area: it is dropped, and the object keeps its other parts (COCO
has such annotations; dropping the whole object would drop every expression that refers to it). Only an object
whose every part is degenerate raises :class:`DegeneratePolygonError`.

Runs are column-major and start with background, as pycocotools expects. Polygon vertices are in pixel-edge
coordinates: the square with corners ``(x0, y0)`` and ``(x1, y1)`` covers columns ``x0 .. x1 - 1`` and rows
``y0 .. y1 - 1`` (checked in ``tests/test_coco_masks.py``).

Everything is validated before it reaches pycocotools, because bad input there is not caught: a polygon of two points
is silently read as a bounding box, and RLE runs that do not add up to ``height * width`` decode to uninitialized
memory.
"""

from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


class MaskDecodeError(ValueError):
    """The segmentation cannot be turned into a mask; loaders skip the record and count it."""


class DegeneratePolygonError(MaskDecodeError):
    """Every polygon of the object has fewer than 3 points, so it encloses no area (real RefCOCO data has a few)."""


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list or RLE into a boolean ``(height, width)`` mask.

    Raises:
        DegeneratePolygonError: every polygon has fewer than 3 points (degenerate parts next to valid ones are
            dropped).
        MaskDecodeError: any other malformed segmentation (wrong type, odd coordinate count, RLE of another size...);
            the message says what the segmentation holds.
    """
    if isinstance(segmentation, dict):
        return _decode_rle(segmentation, height, width)
    if isinstance(segmentation, (list, tuple)) and segmentation and all(isinstance(p, dict) for p in segmentation):
        return np.logical_or.reduce([_decode_rle(part, height, width) for part in segmentation])
    if isinstance(segmentation, (list, tuple, np.ndarray)):
        return _decode_polygons(segmentation, height, width)
    raise MaskDecodeError(
        f"unsupported segmentation of type {type(segmentation).__name__}: expected polygons "
        "[[x1, y1, x2, y2, ...], ...], an RLE dict {'size', 'counts'} or a list of RLE dicts"
    )


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """The schema's mask image: mode "L", 255 on the object and 0 elsewhere."""
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8))


def _decode_polygons(polygons, height: int, width: int) -> np.ndarray:
    if len(polygons) == 0:
        raise MaskDecodeError("the segmentation has no polygon")
    if not all(isinstance(polygon, (list, tuple, np.ndarray)) for polygon in polygons):
        raise MaskDecodeError(
            "expected a list of polygons [[x1, y1, x2, y2, ...], ...] or of RLE dicts, got " + _describe(polygons)
        )
    parts, degenerate = [], []
    for polygon in polygons:
        try:
            coordinates = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise MaskDecodeError(f"polygon coordinates are not numbers: {error}") from error
        if coordinates.ndim != 1:
            raise MaskDecodeError("a polygon must be a flat list [x1, y1, x2, y2, ...]")
        if coordinates.size < 6:
            degenerate.append(coordinates.size)  # encloses nothing: dropped, the other parts stay
            continue
        if coordinates.size % 2:
            raise MaskDecodeError(f"a polygon has an odd number of coordinates ({coordinates.size})")
        if not np.isfinite(coordinates).all():
            raise MaskDecodeError("a polygon has a non-finite coordinate")
        parts.append(coordinates.tolist())
    if not parts:
        sizes = ", ".join(f"{size} coordinates" for size in degenerate)
        raise DegeneratePolygonError(
            f"every polygon of the object has fewer than 3 points ({sizes}); at least 3 points are needed"
        )
    rles = mask_utils.frPyObjects(parts, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _describe(items) -> str:
    """What a segmentation list holds, in words, for error messages."""
    kinds = sorted({type(item).__name__ for item in items})
    if all(isinstance(item, (int, float, np.number)) and not isinstance(item, bool) for item in items):
        return f"a flat list of {len(items)} numbers (one polygon needs its own brackets: [[x1, y1, ...]])"
    if "dict" in kinds:
        return f"a list mixing RLE dicts with {', '.join(kind for kind in kinds if kind != 'dict')}"
    return f"a list holding {', '.join(kinds)}"


def _decode_rle(rle: dict, height: int, width: int) -> np.ndarray:
    size, counts = rle.get("size"), rle.get("counts")
    if size is None or counts is None:
        raise MaskDecodeError("an RLE segmentation needs both 'size' and 'counts'")
    if [int(value) for value in size] != [height, width]:
        raise MaskDecodeError(f"the RLE is {list(size)} (height, width) but the image is [{height}, {width}]")
    if isinstance(counts, (list, tuple, np.ndarray)):
        runs = [int(run) for run in counts]
        _check_runs(runs, height, width)
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    elif isinstance(counts, (str, bytes)):
        try:
            encoded = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        except UnicodeEncodeError as error:
            raise MaskDecodeError("compressed RLE counts must be ASCII") from error
        _check_runs(_compressed_runs(encoded), height, width)
        compressed = {"size": [height, width], "counts": encoded}
    else:
        raise MaskDecodeError(f"unsupported RLE counts of type {type(counts).__name__}")
    return mask_utils.decode(compressed).astype(bool)


def _check_runs(runs: list[int], height: int, width: int) -> None:
    if any(run < 0 for run in runs):
        raise MaskDecodeError("RLE counts contain a negative run")
    if sum(runs) != height * width:
        raise MaskDecodeError(f"RLE runs cover {sum(runs)} pixels but the image has {height * width}")


def _compressed_runs(encoded: bytes) -> list[int]:
    """Read the run lengths out of COCO's compressed counts, only to validate them before pycocotools decodes.

    Each run is written as 5-bit groups, least significant first, in characters offset by 48; bit 0x20 of a character
    says another group follows and bit 0x10 of the last group is the sign. From the third run on, a run is stored as
    the difference to the run two places before it.
    """
    runs: list[int] = []
    position = 0
    while position < len(encoded):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(encoded):
                raise MaskDecodeError("compressed RLE counts end in the middle of a run")
            group = encoded[position] - 48
            if not 0 <= group < 64:
                raise MaskDecodeError("compressed RLE counts contain a character outside COCO's alphabet")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs
