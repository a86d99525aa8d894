"""The wheel: built from this checkout, installed into a fresh virtual environment outside the repository, where it
builds data, trains a few steps, evaluates and predicts with nothing of the checkout importable.

The environment reuses this interpreter's installed dependencies (its site-packages, listed in a ``.pth`` file, which
adds the folder but not the ``.pth`` files in it: the editable install of the checkout stays out), so the test needs
no network and takes about a minute.
"""

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO_ROOT


SOURCES = ("pyproject.toml", "README.md", "modeling_sera", "sera_training", "hub_configs")


def run(command, cwd, env, timeout=600):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (a build in the checkout could pack stale files of build/)."""
    root = tmp_path_factory.mktemp("wheel-build")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root), "."]
    if importlib.util.find_spec("setuptools") is not None:  # build with what is installed, offline
        command.insert(-1, "--no-build-isolation")
    run(command, cwd=source, env=dict(os.environ))
    (built,) = root.glob("*.whl")
    return built


def test_the_wheel_holds_the_training_package_the_metric_the_data_generator_and_the_tiny_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "modeling_sera/modeling_sera.py",
        "sera_training/train.py",
        "sera_training/loop.py",
        "sera_training/synthetic_data.py",
        "sera_training/MODEL_CARD.md",
        "sera_training/metrics/referring_segmentation/referring_segmentation.py",
        "sera_training/hub_configs/sera-synthref-tiny/config.json",
        "sera_training/hub_configs/sera-synthref-tiny/training_recipe.json",
        "sera_training/hub_configs/sera-synthref-tiny/vision_encoder/model.safetensors",
        "sera_training/hub_configs/sera-synthref-tiny/text_encoder/model.safetensors",
        "sera_training/hub_configs/sera-refcoco/training_recipe.json",
    ):
        assert name in names, name
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("sera-train = sera_training.train:main", "sera-evaluate = sera_training.evaluation:main"):
        assert script in text
    assert "sera-predict = modeling_sera.cli:main" in text


def test_installed_wheel_trains_evaluates_and_predicts_outside_the_checkout(wheel, tmp_path):
    base_python = getattr(sys, "_base_executable", sys.executable)
    venv = tmp_path / "venv"
    run([base_python, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=dict(os.environ))
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, None)
    (Path(purelib.stdout.strip()) / "outer_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.update(HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    work = tmp_path / "work"
    work.mkdir()

    # Nothing of the checkout is importable before the install, and the install is the one that is used after it.
    code = "import importlib.util as u; print(u.find_spec('sera_training'), u.find_spec('modeling_sera'))"
    assert run([str(python), "-c", code], work, env).stdout.strip() == "None None"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], work, env)
    code = "import sera_training, modeling_sera; print(sera_training.__file__); print(modeling_sera.__file__)"
    for line in run([str(python), "-c", code], work, env).stdout.split():
        assert Path(line).is_relative_to(venv) and not Path(line).is_relative_to(REPO_ROOT), line

    sizes = ["--num_images", "train=2", "--num_images", "validation=1", "--num_images", "test=1"]
    run([str(python), "-m", "sera_training.synthetic_data", "--output", "data", *sizes], work, env)
    train = [
        "sera-train", "--dataset", "data", "--test_splits", "test", "--output_dir", "model", "--max_train_steps", "2",
        "--per_device_train_batch_size", "2", "--max_train_samples", "4",
        "--eval_steps", "2", "--checkpointing_steps", "none", "--report_to", "none", "--no_progress_bar",
    ]  # fmt: skip
    trained = run(train, work, env)
    assert "| test |" in trained.stdout
    report = json.loads((work / "model" / "eval_results.json").read_text())
    assert report["data"] == "data" and report["train"]["completed_steps"] == 2
    assert report["train"]["encoders"].startswith("pretrained")  # the tiny default's encoders, from the wheel
    assert (work / "model" / "README.md").is_file() and (work / "model" / "config.json").is_file()

    evaluate = ["sera-evaluate", "--model", "model", "--dataset", "data", "--split", "test", "--output", "scores.json"]
    run([*evaluate, "--device", "cpu", "--no_progress", "--batch_size", "32"], work, env)  # one batch, as sera-train
    scores = json.loads((work / "scores.json").read_text())["splits"]["test"]
    assert scores["num_samples"] == report["splits"]["test"]["num_samples"] > 0  # the whole split, both times
    assert scores["mIoU"] == report["splits"]["test"]["mIoU"]  # the same weights, scored the same way

    Image.new("RGB", (48, 40), (200, 30, 30)).save(work / "scene.png")
    predict = ["sera-predict", "scene.png", "the red square", "--model", "model", "--out", "mask.png"]
    run([*predict, "--device", "cpu"], work, env)
    assert Image.open(work / "mask.png").size == (48, 40)
