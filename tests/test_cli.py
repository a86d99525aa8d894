"""sera-predict: the mask and overlay it writes, and a one-line error for each kind of bad input."""

import json
import os
import re
import shutil
import tomllib

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image, ImageDraw

from modeling_sera import ReferringImageSegmentationPipeline, SeraConfig, SeraForReferringSegmentation, SeraProcessor
from modeling_sera.cli import OUTLINE, PANEL_WIDTH, draw_overlay, main


TINY_HUB_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = SeraForReferringSegmentation(SeraConfig.from_pretrained(TINY_HUB_CONFIG)).eval()
    processor = SeraProcessor.from_pretrained(TINY_HUB_CONFIG)
    folder = tmp_path_factory.mktemp("cli") / "sera-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def image_path(tmp_path):
    image = Image.new("RGB", (96, 64), (230, 230, 220))
    ImageDraw.Draw(image).ellipse((10, 20, 40, 50), fill=(220, 30, 30))
    path = tmp_path / "scene.jpg"
    image.save(path)
    return path


def test_writes_the_mask_and_the_overlay_and_says_where(model_folder, image_path, tmp_path, capsys):
    out = tmp_path / "out" / "mask.png"
    out.parent.mkdir()
    assert (
        main(
            [
                str(image_path),
                "the red circle",
                "--model",
                str(model_folder),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--threshold",
                "0.52",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    overlay = out.with_name("mask.overlay.png")
    assert str(out) in printed and str(overlay) in printed and "score" in printed

    mask = Image.open(out)
    assert mask.mode == "L" and mask.size == (96, 64)
    pipe = ReferringImageSegmentationPipeline(
        model=SeraForReferringSegmentation.from_pretrained(model_folder),
        processor=SeraProcessor.from_pretrained(model_folder),
        device="cpu",
    )
    expected = pipe(Image.open(image_path), "the red circle", threshold=0.52)["mask"]
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(expected))
    picture = Image.open(overlay)
    assert picture.mode == "RGB" and picture.width > PANEL_WIDTH


def test_default_names_go_to_the_current_folder(model_folder, image_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(image_path), "the red circle", "--model", str(model_folder), "--device", "cpu"]) == 0
    assert (tmp_path / "scene.mask.png").is_file() and (tmp_path / "scene.overlay.png").is_file()


def test_works_from_a_folder_without_remote_code(model_folder, image_path, tmp_path):
    # The command uses this package's code, so the .py files next to the weights are not needed.
    bare = tmp_path / "bare"
    shutil.copytree(model_folder, bare, ignore=shutil.ignore_patterns("*.py"))
    assert main([str(image_path), "x", "--model", str(bare), "--out", str(tmp_path / "m.png"), "--device", "cpu"]) == 0


def test_overlay_tints_the_mask_outlines_it_and_charts_the_routing():
    image = Image.new("RGB", (400, 300), (200, 200, 200))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((100, 100, 199, 199), fill=255)
    weights = {
        "fusion": {"spatial": 1.0, "context": 0.0, "boundary": 0.0, "shape": 0.0},
        "adapter": {"spatial": 0.5, "boundary": 0.5},
    }
    canvas = draw_overlay(image, mask, "the grey square", 0.8, weights)
    assert canvas.size == (400 + PANEL_WIDTH, 300)
    assert canvas.getpixel((150, 150)) != (200, 200, 200)  # tinted inside
    assert canvas.getpixel((20, 20)) == (200, 200, 200)  # untouched outside
    assert canvas.getpixel((100, 150)) == OUTLINE
    # A weight-1 bar is filled to its end, a weight-0 bar is not filled at all.
    panel = np.asarray(canvas)[:, 400:]
    filled_rows = [row for row in range(300) if (panel[row] != 255).sum(axis=-1).astype(bool).sum() > 150]
    assert filled_rows, "the full-weight bar is missing"


def test_small_and_16_bit_images_are_drawn_legibly():
    image = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    canvas = draw_overlay(image, Image.new("L", (40, 30), 255), "x", 0.5, {})
    assert canvas.width - PANEL_WIDTH == 384  # enlarged to the minimum display side
    # 16-bit values are stretched to 8 bits, so the gradient survives instead of clipping to white.
    assert len(np.unique(np.asarray(canvas)[:288, :384, 0])) > 50


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "model folder not found"),
        ("no_config", "has no config.json"),
        ("not_sera", "holds a 'bert' model, not SERA"),
        ("no_processor", "has no processor_config.json"),
        ("missing_image", "image not found: .*missing.jpg. Check the path"),
        ("unreadable_image", "Cannot read .* as an image"),
        ("bad_threshold", "--threshold is a probability"),
        ("bad_out", "must end in .png"),
        ("empty_expression", "the expression is empty"),
    ],
)
def test_bad_input_is_one_line_that_says_what_to_do(case, message, model_folder, image_path, tmp_path):
    model, image, extra, expression = str(model_folder), str(image_path), [], "the red circle"
    if case == "missing_model":
        model = str(tmp_path / "nowhere")
    elif case in ("no_config", "not_sera", "no_processor"):
        model = str(tmp_path / "model")
        shutil.copytree(model_folder, model)
        if case == "no_config":
            os.remove(os.path.join(model, "config.json"))
        elif case == "not_sera":
            with open(os.path.join(model, "config.json"), "w") as file:
                json.dump({"model_type": "bert"}, file)
        else:
            os.remove(os.path.join(model, "processor_config.json"))
    elif case == "missing_image":
        image = str(tmp_path / "missing.jpg")
    elif case == "unreadable_image":
        image = str(tmp_path / "broken.jpg")
        with open(image, "w") as file:
            file.write("not a picture")
    elif case == "bad_threshold":
        extra = ["--threshold", "3"]
    elif case == "bad_out":
        extra = ["--out", str(tmp_path / "mask.jpg")]
    else:
        expression = " "
    with pytest.raises(SystemExit) as raised:
        main([image, expression, "--model", model, "--device", "cpu", *extra])
    error = raised.value.code
    assert isinstance(error, str)  # Python prints it to stderr and exits with status 1
    assert error.startswith("sera-predict: error: ") and "\n" not in error
    assert re.search(message, error), error


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sera-predict"] == "modeling_sera.cli:main"
