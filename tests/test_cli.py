"""sera-predict: the mask and overlay it writes, from a folder or a Hub repo id (at a revision), and a one-line error
for each kind of bad input."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image, ImageDraw

from modeling_sera import ReferringImageSegmentationPipeline, SeraConfig, SeraForReferringSegmentation, SeraProcessor
from modeling_sera.cli import OUTLINE, PANEL_WIDTH, draw_overlay, main
from sera_training.export import save_untrained_model
from tests.helpers import REPO_ROOT, TINY_HUB_CONFIG


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "sera-tiny"
    save_untrained_model(folder, TINY_HUB_CONFIG)
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
    assert scripts["sera-train"] == "sera_training.train:main"
    assert scripts["sera-evaluate"] == "sera_training.evaluation:main"


def test_an_image_smaller_than_2x2_is_one_line_at_its_cause(model_folder, tmp_path):
    # The image processor needs 2 pixels a side; the command says so before loading anything.
    for size in ((1, 1), (1, 40)):
        path = tmp_path / f"tiny_{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 0, 0)).save(path)
        with pytest.raises(SystemExit) as raised:
            main([str(path), "the red dot", "--model", str(model_folder), "--device", "cpu"])
        error = raised.value.code
        assert error == (
            f"sera-predict: error: {path} is {size[0]}x{size[1]} pixels: SERA needs at least 2 pixels on each side. "
            "Pass a larger image."
        )
    # 2x2 is enough: a mask of that size comes back.
    path = tmp_path / "two.png"
    Image.new("RGB", (2, 2), (200, 0, 0)).save(path)
    assert (
        main([str(path), "the red dot", "--model", str(model_folder), "--out", str(tmp_path / "two.png.mask.png")])
        == 0
    )
    assert Image.open(tmp_path / "two.png.mask.png").size == (2, 2)


# ---- Hub repo ids, through a local stand-in for the Hub (tests/hub_server.py) ----

REPO_ID = "sera-test/sera-cli"
URL_TEMPLATE_PATH = "/{repo_id}/resolve/{revision}/{filename}"


@contextlib.contextmanager
def hub_client(hub, cache_dir):
    """Point this process's huggingface_hub (and so transformers) at the test Hub, with an empty cache."""
    with pytest.MonkeyPatch.context() as patch:
        # huggingface_hub read these at import; the download URL template is built from the endpoint then too.
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + URL_TEMPLATE_PATH)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
        patch.setenv("HF_TOKEN", hub.token)
        yield


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """A repo with two commits of different random weights: (hub, [first commit id, second commit id], cache)."""
    from tests.helpers.hub_server import HubServer

    root = tmp_path_factory.mktemp("cli_hub")
    with HubServer(token="hf_test_token") as hub:
        commits = []
        with hub_client(hub, root / "hf_cache"):
            api = HfApi(endpoint=hub.url, token=hub.token)
            api.create_repo(REPO_ID)
            for seed in (0, 1):
                torch.manual_seed(seed)
                folder = root / f"seed{seed}"
                model = SeraForReferringSegmentation(SeraConfig.from_pretrained(TINY_HUB_CONFIG)).eval()
                model.save_pretrained(folder)
                SeraProcessor.from_pretrained(TINY_HUB_CONFIG).save_pretrained(folder)
                commits.append(api.upload_folder(repo_id=REPO_ID, folder_path=folder).oid)
        yield hub, commits, root / "hf_cache"


def test_a_hub_repo_id_and_revision_load_like_pipeline(hub_repo, image_path, tmp_path, capsys):
    from transformers import pipeline

    hub, commits, cache = hub_repo
    masks = {}
    with hub_client(hub, cache):
        for revision in (commits[0], None):
            out = tmp_path / f"{revision or 'main'}.png"
            argv = [str(image_path), "the red circle", "--model", REPO_ID, "--out", str(out), "--device", "cpu"]
            assert main(argv + (["--revision", revision] if revision else [])) == 0
            printed = capsys.readouterr().out
            expected = pipeline(
                "referring-image-segmentation", model=REPO_ID, revision=revision, trust_remote_code=True, device="cpu"
            )(Image.open(image_path), "the red circle")
            np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected["mask"]))
            assert f"(score {expected['score']:.3f})" in printed
            masks[revision] = expected
    # The revision matters: the two commits hold different weights.
    assert masks[commits[0]]["score"] != masks[None]["score"]
    assert any(path.startswith(f"/{REPO_ID}/resolve/{commits[0]}/") for _, path in hub.requests)
    assert not hub.unserved, hub.unserved


@pytest.mark.parametrize(
    "model, revision, message",
    [
        ("sera-test/no-such-model", None, "cannot load sera-test/no-such-model: it is not a local folder"),
        (REPO_ID, "0" * 40, f"cannot load {REPO_ID} at revision {'0' * 40}: it is not a local folder"),
        ("no/such/folder", None, "model folder not found: no/such/folder. Pass a folder"),
    ],
)
def test_a_wrong_repo_id_or_revision_is_one_line(hub_repo, image_path, model, revision, message):
    hub, _, cache = hub_repo
    argv = [str(image_path), "x", "--model", model, "--device", "cpu"] + (["--revision", revision] if revision else [])
    with hub_client(hub, cache), pytest.raises(SystemExit) as raised:
        main(argv)
    error = raised.value.code
    assert error.startswith(f"sera-predict: error: {message}") and "\n" not in error, error


def test_revision_with_a_local_folder_is_refused(model_folder, image_path):
    with pytest.raises(SystemExit, match="--revision v1 is for a Hub repo id, but .* is a local folder"):
        main([str(image_path), "x", "--model", str(model_folder), "--revision", "v1"])


def test_evaluate_py_takes_a_hub_repo_id_and_revision(hub_repo, tmp_path):
    # training/evaluate.py loads through the same function: the scores of the first commit are those of its weights.
    import datasets

    from sera_training.evaluation import evaluate_referring_segmentation
    from sera_training.evaluation import main as evaluate_main
    from sera_training.synthetic_data import SynthRefConfig, write_dataset

    hub, commits, cache = hub_repo
    write_dataset(SynthRefConfig(seed=5, num_images=(("train", 1), ("test", 1))), tmp_path / "data")
    torch.manual_seed(0)  # the weights of the first commit
    model = SeraForReferringSegmentation(SeraConfig.from_pretrained(TINY_HUB_CONFIG)).eval()
    expected = evaluate_referring_segmentation(
        model,
        SeraProcessor.from_pretrained(TINY_HUB_CONFIG),
        datasets.load_from_disk(str(tmp_path / "data"))["test"],
        show_progress=False,
    )
    output = tmp_path / "results.json"
    argv = ["--model", REPO_ID, "--revision", commits[0], "--data", str(tmp_path / "data"), "--split", "test"]
    with hub_client(hub, cache):
        assert evaluate_main(argv + ["--output", str(output), "--device", "cpu", "--no-progress"]) == 0
    report = json.loads(output.read_text())
    assert report["model"] == REPO_ID and report["revision"] == commits[0]
    assert report["splits"]["test"]["mIoU"] == pytest.approx(expected["mIoU"])


def test_the_package_never_imports_gradio():
    code = "import sys, modeling_sera, modeling_sera.cli; assert 'gradio' not in sys.modules, 'gradio imported'"
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
