import io
import sys
from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import column_major_runs, rectangle_polygon
from coco_fixtures import rectangle_mask as rectangles_mask
from PIL import Image
from pycocotools import mask as mask_utils


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from coco_masks import (  # noqa: E402
    DegeneratePolygonError,
    MaskDecodeError,
    _compressed_runs,
    decode_segmentation,
    mask_to_image,
)


HEIGHT, WIDTH = 12, 16


def rectangle_mask(x0, y0, x1, y1, height=HEIGHT, width=WIDTH):
    """The pixels one rectangle polygon with these corners covers."""
    return rectangles_mask(height, width, (x0, y0, x1, y1))


def test_rectangle_polygon_covers_exactly_the_pixels_inside_its_corners():
    # pycocotools' convention, verified rather than assumed: corners are pixel edges, so (2, 3)-(7, 9) covers
    # columns 2..6 and rows 3..8, 5 x 6 = 30 pixels.
    mask = decode_segmentation([rectangle_polygon(2, 3, 7, 9)], HEIGHT, WIDTH)
    assert mask.dtype == bool and mask.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(mask, rectangle_mask(2, 3, 7, 9))
    assert mask.sum() == 30


def test_multi_part_polygons_are_merged():
    parts = [rectangle_polygon(0, 0, 3, 2), rectangle_polygon(10, 5, 16, 12)]
    expected = rectangle_mask(0, 0, 3, 2) | rectangle_mask(10, 5, 16, 12)
    np.testing.assert_array_equal(decode_segmentation(parts, HEIGHT, WIDTH), expected)


def test_overlapping_parts_are_a_union_not_an_exclusive_or():
    parts = [rectangle_polygon(1, 1, 8, 8), rectangle_polygon(4, 4, 12, 10)]
    expected = rectangle_mask(1, 1, 8, 8) | rectangle_mask(4, 4, 12, 10)
    np.testing.assert_array_equal(decode_segmentation(parts, HEIGHT, WIDTH), expected)


def test_polygons_from_numpy_and_tuples_are_accepted():
    parts = (np.array(rectangle_polygon(2, 3, 7, 9), dtype=np.float64),)
    np.testing.assert_array_equal(decode_segmentation(parts, HEIGHT, WIDTH), rectangle_mask(2, 3, 7, 9))


def test_uncompressed_rle_of_a_crowd_region():
    expected = rectangle_mask(0, 0, 5, 12) | rectangle_mask(9, 2, 16, 4)
    rle = {"size": [HEIGHT, WIDTH], "counts": column_major_runs(expected)}
    np.testing.assert_array_equal(decode_segmentation(rle, HEIGHT, WIDTH), expected)


@pytest.mark.parametrize("as_text", [False, True])
def test_compressed_rle_as_bytes_or_text(as_text):
    expected = rectangle_mask(3, 1, 11, 10) & ~rectangle_mask(5, 4, 8, 6)
    counts = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))["counts"]
    rle = {"size": [HEIGHT, WIDTH], "counts": counts.decode("ascii") if as_text else counts}
    np.testing.assert_array_equal(decode_segmentation(rle, HEIGHT, WIDTH), expected)


def test_compressed_run_reader_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = (int(value) for value in rng.integers(1, 60, size=2))
        mask = rng.random((height, width)) < rng.random()
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        assert _compressed_runs(counts) == column_major_runs(mask)


@pytest.mark.parametrize(
    "polygons",
    [
        [[1, 1, 5, 5]],  # two points: pycocotools would read these four numbers as a bounding box
        [[3, 3]],
        [rectangle_polygon(0, 0, 4, 4), [6, 6, 9, 9]],  # one good part does not excuse a broken one
    ],
)
def test_polygon_with_fewer_than_three_points_raises_its_own_error(polygons):
    with pytest.raises(DegeneratePolygonError, match="at least 3 points"):
        decode_segmentation(polygons, HEIGHT, WIDTH)
    assert issubclass(DegeneratePolygonError, MaskDecodeError)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([], "no polygon"),
        ([1, 2, 3, 4, 5, 6], "flat list"),
        ([[1, 2, 3, 4, 5, 6, 7]], "odd number"),
        ([[1, 2, 3, float("nan"), 5, 6]], "non-finite"),
        ([["a", "b", "c", "d", "e", "f"]], "not numbers"),
        ({"size": [HEIGHT, WIDTH + 1], "counts": [HEIGHT * (WIDTH + 1)]}, "image is"),
        ({"size": [HEIGHT, WIDTH], "counts": [5, 3]}, "cover 8 pixels"),
        ({"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH + 4, -4]}, "negative"),
        ({"size": [HEIGHT, WIDTH], "counts": "3"}, "cover 3 pixels"),
        ({"size": [HEIGHT, WIDTH], "counts": "\u00e9"}, "ASCII"),
        ({"size": [HEIGHT, WIDTH], "counts": "~"}, "alphabet"),
        ({"counts": [HEIGHT * WIDTH]}, "'size' and 'counts'"),
        ("polygon", "unsupported segmentation"),
        (None, "unsupported segmentation"),
    ],
)
def test_malformed_segmentations_raise_mask_decode_error(segmentation, message):
    with pytest.raises(MaskDecodeError, match=message) as error:
        decode_segmentation(segmentation, HEIGHT, WIDTH)
    assert not isinstance(error.value, DegeneratePolygonError)


def test_mask_to_image_is_mode_l_with_0_and_255_at_mask_size():
    mask = rectangle_mask(2, 3, 7, 9)
    image = mask_to_image(mask)
    assert image.mode == "L" and image.size == (WIDTH, HEIGHT)
    pixels = np.asarray(image)
    assert set(np.unique(pixels)) == {0, 255}
    np.testing.assert_array_equal(pixels == 255, mask)

    # And it survives a PNG round trip unchanged, as the datasets store it.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(buffer)), pixels)
