import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sera_training.coco_masks import (
    DegeneratePolygonError,
    MaskDecodeError,
    _compressed_runs,
    decode_segmentation,
    mask_to_image,
)
from tests.helpers.coco_fixtures import column_major_runs, rectangle_polygon
from tests.helpers.coco_fixtures import rectangle_mask as rectangles_mask


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
        [[3, 3], [1, 1, 5, 5]],  # every part degenerate
    ],
)
def test_an_object_whose_every_polygon_has_fewer_than_three_points_raises_its_own_error(polygons):
    with pytest.raises(DegeneratePolygonError, match="at least 3 points"):
        decode_segmentation(polygons, HEIGHT, WIDTH)
    assert issubclass(DegeneratePolygonError, MaskDecodeError)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([], "no polygon"),
        ([1, 2, 3, 4, 5, 6], "got a flat list of 6 numbers"),
        ([{"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH]}, [1, 2, 3, 4, 5, 6]], "mixing RLE dicts with list"),
        (["abc", "def"], "got a list holding str"),
        ([{"size": [HEIGHT, WIDTH], "counts": [5, 3]}], "cover 8 pixels"),  # a list of RLEs: each is checked
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


@pytest.mark.parametrize("degenerate", [[6, 6, 9, 9], [3, 3], []])
def test_a_degenerate_part_next_to_valid_parts_is_dropped_and_the_object_kept(degenerate):
    polygons = [rectangle_polygon(0, 0, 4, 4), degenerate, rectangle_polygon(10, 5, 14, 9)]
    mask = decode_segmentation(polygons, HEIGHT, WIDTH)
    np.testing.assert_array_equal(mask, rectangles_mask(HEIGHT, WIDTH, (0, 0, 4, 4), (10, 5, 14, 9)))


def test_a_list_of_compressed_rles_is_decoded_and_merged_like_refer_py_does():
    """refclef's form: a list holding RLE dicts whose counts are COCO's compressed strings."""
    first, second = rectangle_mask(1, 2, 6, 8), rectangle_mask(9, 0, 12, 3)
    encoded = [mask_utils.encode(np.asfortranarray(part.astype(np.uint8))) for part in (first, second)]
    for counts_type in (str, bytes):
        segmentation = [
            {"size": rle["size"], "counts": rle["counts"].decode() if counts_type is str else rle["counts"]}
            for rle in encoded
        ]
        np.testing.assert_array_equal(decode_segmentation(segmentation, HEIGHT, WIDTH), first | second)
        np.testing.assert_array_equal(decode_segmentation(segmentation[:1], HEIGHT, WIDTH), first)


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
