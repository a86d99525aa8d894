import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_sera.image_processing_sera import SeraImageProcessor, letterbox_geometry


REPO_ROOT = Path(__file__).resolve().parents[1]


SIDE = 128  # the tiny model's letterbox
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def processor():
    return SeraImageProcessor(size={"height": SIDE, "width": SIDE})


@pytest.fixture(scope="module")
def rgb_array():
    return np.random.default_rng(0).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)


def pixels(processor, image, **kwargs):
    return processor(image, return_tensors="pt", **kwargs)["pixel_values"]


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (37, 91, (52, 128, 38, 0)),  # 37 * 128 / 91 = 52.04
        (300, 20, (128, 9, 0, 59)),  # 20 * 128 / 300 = 8.53
        (64, 64, (128, 128, 0, 0)),
        (448, 448, (128, 128, 0, 0)),
        (3, 2, (128, 85, 0, 21)),  # 85.33; 43 free columns: 21 left, 22 right
        (1000, 2, (128, 1, 0, 63)),  # never narrower than one pixel
    ],
)
def test_letterbox_geometry(height, width, expected):
    assert letterbox_geometry(height, width, SIDE) == expected


def test_letterbox_geometry_rounds_half_up():
    # 3 * 10 / 4 = 7.5 -> 8
    assert letterbox_geometry(3, 4, 10) == (8, 10, 1, 0)


def test_output_keys_shapes_and_dtypes(processor, rgb_array):
    images = [PIL.Image.fromarray(rgb_array), PIL.Image.new("RGB", (91, 37))]
    outputs = processor(images, return_tensors="pt")
    assert set(outputs) == {"pixel_values", "original_sizes", "letterbox_sizes", "letterbox_offsets"}
    assert outputs["pixel_values"].shape == (2, 3, SIDE, SIDE)
    assert outputs["pixel_values"].dtype == torch.float32
    assert outputs["original_sizes"].tolist() == [[6, 10], [37, 91]]
    assert outputs["letterbox_sizes"].tolist() == [[77, 128], [52, 128]]
    assert outputs["letterbox_offsets"].tolist() == [[25, 0], [38, 0]]
    for key in ("original_sizes", "letterbox_sizes", "letterbox_offsets"):
        assert outputs[key].dtype == torch.int64


def test_letterbox_content_and_padding_values(processor):
    # a uniform image: content is its normalized colour, padding is exactly 0 (the mean colour)
    colour = np.array([200, 30, 90], dtype=np.uint8)
    image = np.broadcast_to(colour, (300, 20, 3)).copy()
    values = pixels(processor, image)[0].numpy()
    new_height, new_width, top, left = letterbox_geometry(300, 20, SIDE)
    content = values[:, top : top + new_height, left : left + new_width]
    expected = (colour / 255.0 - MEAN) / STD
    np.testing.assert_allclose(content, np.broadcast_to(expected[:, None, None], content.shape), atol=1e-5)
    padding = values.copy()
    padding[:, top : top + new_height, left : left + new_width] = 0
    assert np.all(padding == 0)
    assert np.all(values[:, :, left - 1] == 0) and np.all(values[:, :, left + new_width] == 0)


def test_resize_does_not_distort(processor):
    # a vertical split (left half black, right half white) stays split in the middle of the content
    image = np.zeros((40, 80), dtype=np.uint8)
    image[:, 40:] = 255
    values = pixels(processor, image, do_normalize=False)[0, 0].numpy()
    new_height, new_width, top, left = letterbox_geometry(40, 80, SIDE)
    row = values[top + new_height // 2, left : left + new_width]
    assert np.all(row[:62] < 0.05) and np.all(row[66:] > 0.95)
    assert np.all(values[:top] == 0) and np.all(values[top + new_height :] == 0)


def test_custom_mean_and_std():
    processor = SeraImageProcessor(size=SIDE, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    values = pixels(processor, np.full((8, 8, 3), 255, dtype=np.uint8))
    assert torch.allclose(values, torch.ones_like(values))


# ---------------------------------------------------------------- input kinds


def test_pil_modes_match_rgb_equivalent(processor, rgb_array):
    rng = np.random.default_rng(1)
    rgb = PIL.Image.fromarray(rgb_array)
    gray_array = rgb_array[..., 0]
    gray = PIL.Image.fromarray(gray_array)
    gray_as_rgb = pixels(processor, np.repeat(gray_array[..., None], 3, axis=-1))
    rgb_values = pixels(processor, rgb)

    alpha = PIL.Image.fromarray(rng.integers(0, 256, size=gray_array.shape, dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    gray_alpha = PIL.Image.merge("LA", (gray, alpha))
    # alpha is dropped, not composited
    torch.testing.assert_close(pixels(processor, rgba), rgb_values)
    torch.testing.assert_close(pixels(processor, gray_alpha), gray_as_rgb)
    torch.testing.assert_close(pixels(processor, gray), gray_as_rgb)

    palette = rgb.quantize(colors=16)
    torch.testing.assert_close(pixels(processor, palette), pixels(processor, palette.convert("RGB")))
    palette.info["transparency"] = 0
    torch.testing.assert_close(pixels(processor, palette), pixels(processor, palette.convert("RGBA").convert("RGB")))

    cmyk = rgb.convert("CMYK")
    torch.testing.assert_close(pixels(processor, cmyk), pixels(processor, cmyk.convert("RGB")))

    binary = gray_array > 127
    binary_as_gray = pixels(processor, np.where(binary, 255, 0).astype(np.uint8))
    torch.testing.assert_close(pixels(processor, PIL.Image.fromarray(binary)), binary_as_gray)


def test_16_and_32_bit_grayscale_are_scaled_not_clipped(processor, rgb_array):
    gray_array = rgb_array[..., 0]
    expected = pixels(processor, gray_array)
    as_16_bit = gray_array.astype(np.uint16) * 257  # 255 -> 65535
    image_16 = PIL.Image.fromarray(as_16_bit)
    assert image_16.mode == "I;16"
    image_32 = PIL.Image.fromarray(as_16_bit.astype(np.int32))
    assert image_32.mode == "I"
    for image in (image_16, image_32, as_16_bit):
        torch.testing.assert_close(pixels(processor, image), expected, atol=1e-5, rtol=0)
    # other integer arrays are read as 8-bit: larger values are refused rather than clipped
    with pytest.raises(ValueError, match="uint16"):
        pixels(processor, torch.from_numpy(as_16_bit.astype(np.int32))[None])

    # a mid-range 16-bit value maps to the matching fraction, not to white
    mid = PIL.Image.fromarray(np.full((4, 4), 20000, dtype=np.uint16))
    values = pixels(processor, mid, do_normalize=False)
    assert torch.allclose(values, torch.full_like(values, 20000 / 65535), atol=1e-6)

    # 32-bit data beyond the 16-bit range is scaled by the 32-bit range
    wide = PIL.Image.fromarray(np.full((4, 4), 2**31 - 1, dtype=np.int32))
    values = pixels(processor, wide, do_normalize=False)
    assert torch.allclose(values, torch.full_like(values, (2**31 - 1) / (2**32 - 1)), atol=1e-6)


def test_numpy_layouts_and_dtypes_match_rgb(processor, rgb_array):
    expected = pixels(processor, PIL.Image.fromarray(rgb_array))
    gray_array = rgb_array[..., 0]
    gray_expected = pixels(processor, PIL.Image.fromarray(gray_array))
    alpha = np.full(gray_array.shape + (1,), 7, dtype=np.uint8)

    torch.testing.assert_close(pixels(processor, rgb_array), expected)
    torch.testing.assert_close(pixels(processor, np.concatenate([rgb_array, alpha], axis=-1)), expected)
    torch.testing.assert_close(pixels(processor, rgb_array.astype(np.float32) / 255), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels(processor, rgb_array.astype(np.float64) / 255), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels(processor, rgb_array.astype(np.uint16) * 257), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels(processor, rgb_array.astype(np.int64)), expected)
    torch.testing.assert_close(pixels(processor, gray_array), gray_expected)
    torch.testing.assert_close(pixels(processor, gray_array[..., None]), gray_expected)


def test_torch_layouts_match_rgb(processor, rgb_array):
    expected = pixels(processor, rgb_array)
    channels_last = torch.from_numpy(rgb_array)
    channels_first = channels_last.permute(2, 0, 1)
    torch.testing.assert_close(pixels(processor, channels_first), expected)
    torch.testing.assert_close(pixels(processor, channels_last), expected)
    torch.testing.assert_close(pixels(processor, channels_first.float() / 255), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels(processor, channels_first[:1]), pixels(processor, rgb_array[..., 0]))
    # a stacked batch is a list of images
    torch.testing.assert_close(pixels(processor, channels_first[None].repeat(2, 1, 1, 1)), expected.repeat(2, 1, 1, 1))


@pytest.mark.parametrize("not_an_image", [{"pixels": 1}, "photo.jpg", None, 3.5])
def test_non_images_raise_type_error(processor, not_an_image):
    with pytest.raises(TypeError, match=type(not_an_image).__name__) as error:
        processor(not_an_image)
    assert "PIL.Image.Image" in str(error.value)
    assert "paths" in str(error.value)


def test_invalid_images_raise_value_error(processor):
    with pytest.raises(ValueError, match=r"1x1.*at least 2"):
        processor(PIL.Image.new("RGB", (1, 1)))
    with pytest.raises(ValueError, match=r"1x50.*at least 2"):
        processor(np.zeros((1, 50, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match="channels"):
        processor(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(np.full((8, 8, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="square"):
        SeraImageProcessor(size={"height": 128, "width": 96})


# ---------------------------------------------------------------- masks


def test_masks_become_letterboxed_labels(processor):
    height, width = 37, 91
    image = np.zeros((height, width, 3), dtype=np.uint8)
    new_height, new_width, top, left = letterbox_geometry(height, width, SIDE)

    full = processor(image, masks=np.ones((height, width), dtype=bool), return_tensors="pt")["labels"]
    assert full.shape == (1, SIDE, SIDE) and full.dtype == torch.float32
    expected = torch.zeros(SIDE, SIDE)
    expected[top : top + new_height, left : left + new_width] = 1
    torch.testing.assert_close(full[0], expected)

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[10:20, 30:60] = 255
    labels = processor(image, masks=PIL.Image.fromarray(mask), return_tensors="pt")["labels"][0]
    assert labels.min() >= 0 and labels.max() <= 1
    assert 0 < ((labels > 0) & (labels < 1)).sum()  # soft edges are kept
    rows = torch.nonzero((labels > 0.5).any(dim=1)).flatten()
    cols = torch.nonzero((labels > 0.5).any(dim=0)).flatten()
    scale = SIDE / width
    assert abs(rows[0].item() - (top + 10 * scale)) <= 1 and abs(rows[-1].item() + 1 - (top + 20 * scale)) <= 1
    assert abs(cols[0].item() - 30 * scale) <= 1 and abs(cols[-1].item() + 1 - 60 * scale) <= 1
    # the same mask as bool, as a mode "1" image or a tensor gives the same labels
    for same_mask in (mask > 0, PIL.Image.fromarray(mask > 0), torch.from_numpy(mask)[None]):
        torch.testing.assert_close(processor(image, masks=same_mask, return_tensors="pt")["labels"][0], labels)


def test_mask_errors(processor):
    image = np.zeros((37, 91, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"36x91.*37x91"):
        processor(image, masks=np.ones((36, 91), dtype=bool))
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        processor([image, image], masks=[np.ones((37, 91), dtype=bool)])
    with pytest.raises(ValueError, match="single channel"):
        processor(image, masks=np.ones((37, 91, 3), dtype=np.uint8))


# ---------------------------------------------------------------- post-processing


def rectangle_in_letterbox(height, width):
    """A rectangle inside the letterbox content, with corners on multiples of 4 so it is exact at SIDE / 4."""
    new_height, new_width, top, left = letterbox_geometry(height, width, SIDE)

    def span(offset, length, start, stop):
        first = -(-(offset + int(start * length)) // 4) * 4
        last = max(first + 4, ((offset + int(stop * length)) // 4) * 4)
        return first, last

    return span(top, new_height, 0.25, 0.75), span(left, new_width, 0.2, 0.7)


@pytest.mark.parametrize("height, width", [(37, 91), (300, 20), (64, 64)])
@pytest.mark.parametrize("downsample", [1, 4])
def test_post_processing_puts_rectangle_back_in_place(processor, height, width, downsample):
    new_height, new_width, top, left = letterbox_geometry(height, width, SIDE)
    (row_start, row_stop), (col_start, col_stop) = rectangle_in_letterbox(height, width)
    assert top <= row_start < row_stop <= top + new_height and left <= col_start < col_stop <= left + new_width

    low = SIDE // downsample
    logits = torch.full((1, 1, low, low), -10.0)
    drawn_rows = slice(row_start // downsample, row_stop // downsample)
    drawn_cols = slice(col_start // downsample, col_stop // downsample)
    logits[..., drawn_rows, drawn_cols] = 10
    # At 0.5 the edge sits where it was drawn whether the sigmoid comes before or after the resizing (between
    # -10 and +10 both cross it half way); at 0.35 resized probabilities cross it earlier, by up to 0.15 of a cell.
    (result,) = processor.post_process_referring_segmentation({"logits": logits}, [(height, width)], threshold=0.5)

    mask = result["mask"]
    assert mask.shape == (height, width) and mask.dtype == torch.bool
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    # measured edges, mapped back to letterbox pixels, are within 1 pixel of the drawn ones
    to_row, to_col = new_height / height, new_width / width
    assert abs(top + rows[0].item() * to_row - row_start) <= 1
    assert abs(top + (rows[-1].item() + 1) * to_row - row_stop) <= 1
    assert abs(left + cols[0].item() * to_col - col_start) <= 1
    assert abs(left + (cols[-1].item() + 1) * to_col - col_stop) <= 1
    # it is a filled rectangle: bilinear resizing may only round off its corners, by up to one letterbox pixel
    row_margin, col_margin = math.ceil(height / new_height), math.ceil(width / new_width)
    interior = mask[rows[0] + row_margin : rows[-1] + 1 - row_margin, cols[0] + col_margin : cols[-1] + 1 - col_margin]
    assert interior.all()


@pytest.mark.parametrize("height, width", [(37, 91), (300, 20)])
@pytest.mark.parametrize("downsample", [1, 4])
def test_post_processing_never_leaks_padding(processor, height, width, downsample):
    new_height, new_width, top, left = letterbox_geometry(height, width, SIDE)
    low = SIDE // downsample
    # positive on every low-resolution cell that lies entirely in the padding, negative elsewhere
    cell = torch.arange(low)
    rows_in_content = ((cell + 1) * downsample > top) & (cell * downsample < top + new_height)
    cols_in_content = ((cell + 1) * downsample > left) & (cell * downsample < left + new_width)
    logits = torch.where(rows_in_content[:, None] & cols_in_content[None, :], -10.0, 10.0)[None, None]
    assert (logits > 0).any()

    (result,) = processor.post_process_referring_segmentation(
        {"logits": logits}, torch.tensor([[height, width]]), threshold=0.5
    )  # 0.5: see test_post_processing_puts_rectangle_back_in_place
    assert not result["mask"].any()
    if downsample == 1:
        # at input resolution the crop is exact; at 1/4 only the bilinear blur of the border cells reaches in
        assert result["probabilities"].max() < 0.01
    assert result["score"].item() == 0.0


def test_post_processing_scores_threshold_and_batch(processor):
    logits = torch.zeros(2, 1, 32, 32)
    logits[0] = 1.0  # sigmoid 0.731
    logits[1, :, :, :16] = 3.0
    logits[1, :, :, 16:] = -0.5  # sigmoid 0.378: foreground at 0.35, background at 0.5

    class Output:
        pass

    outputs = Output()
    outputs.logits = logits
    results = processor.post_process_referring_segmentation(outputs, torch.tensor([[20, 20], [10, 40]]))
    assert [tuple(r["mask"].shape) for r in results] == [(20, 20), (10, 40)]
    assert results[0]["mask"].all()
    torch.testing.assert_close(results[0]["score"], torch.sigmoid(torch.tensor(1.0)))
    torch.testing.assert_close(results[0]["probabilities"], torch.full((20, 20), torch.sigmoid(torch.tensor(1.0))))
    assert results[1]["mask"].all()  # default threshold 0.35
    assert results[1]["score"].item() == pytest.approx(results[1]["probabilities"].mean().item())

    strict = processor.post_process_referring_segmentation(outputs, [(20, 20), (10, 40)], threshold=0.5)
    assert strict[0]["mask"].all()
    assert strict[1]["mask"][:, :18].all() and not strict[1]["mask"][:, 22:].any()
    inside = strict[1]["probabilities"][strict[1]["mask"]]
    torch.testing.assert_close(strict[1]["score"], inside.mean())

    with pytest.raises(ValueError, match="2 predicted masks but 1 target sizes"):
        processor.post_process_referring_segmentation(outputs, [(20, 20)])


# ---------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path, rgb_array):
    processor = SeraImageProcessor(size={"height": 96, "width": 96}, image_mean=[0.5, 0.4, 0.3], mask_threshold=0.6)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = SeraImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert reloaded.mask_threshold == 0.6 and reloaded.size.height == 96
    torch.testing.assert_close(pixels(reloaded, rgb_array), pixels(processor, rgb_array))
