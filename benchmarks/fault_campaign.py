"""Fault campaign: bad input of many kinds, and training runs killed at random points and resumed.

    python benchmarks/fault_campaign.py --inputs            # bad images, expressions, annotation files, model folders
    python benchmarks/fault_campaign.py --kills 24          # kill training/train.py at random points, resume each
    python benchmarks/fault_campaign.py --inputs --kills 24 # both; results in benchmarks/results/fault_campaign.*

Bad input: every case calls the public entry point a user calls (the processor, the pipeline, the REFER / COCO
loaders, `from_pretrained`) and records what it gets: a result, a clear error (a ValueError / OSError family
exception whose message is one line), or a raw error (any other exception type: what a user sees as a traceback).

Kills: a reference run of the tiny recipe (4 optimizer steps, a checkpoint after each, validation every 2 steps, the
test splits scored and the model folder written) runs once. Each trial starts the same run, kills it with SIGKILL
during a step, during a checkpoint write or during the final export (chosen in turn, the moment within it at random),
checks what the kill left (every `step_N` folder complete: its progress.json says step N and its weights load; the
half-written `.step_N.partial` folders are never picked up by `--resume_from_checkpoint latest`), resumes, and
compares the finished run with the reference bit for bit: every checkpoint's weights written after the resume, the
final weights, the validation history and the test scores.
"""

import argparse
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np


REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
TINY_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"
CLEAR_ERRORS = (ValueError, OSError, EOFError, ImportError)  # FileNotFoundError, JSONDecodeError... are subclasses
OUR_CODE = (
    str(REPO_ROOT / "modeling_sera"),
    str(REPO_ROOT / "sera_training"),
    str(REPO_ROOT / "training"),
    "transformers_modules",
)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------------- bad input


def outcome(call) -> dict:
    """Run `call()`; classify what a user would get."""
    try:
        value = call()
    except CLEAR_ERRORS as error:
        message = str(error)
        one_line = bool(message.strip()) and "\n" not in message.strip()
        kind = "clear error" if one_line else "multi-line error"
        return {"outcome": kind, "type": type(error).__name__, "message": message.strip()[:300]}
    except Exception as error:  # the point of the campaign: anything else is a raw traceback for the user
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        # Raised on purpose by this project's code (a TypeError naming what it wants) with a one-line message.
        ours = bool(frames) and any(part in frames[-1].filename for part in OUR_CODE)
        message = str(error).strip()
        kind = "clear error" if ours and message and "\n" not in message else "raw error"
        return {"outcome": kind, "type": type(error).__name__, "message": message[:300], "where": where}
    return {"outcome": "result", "detail": value}


def image_cases() -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    cases = {}
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"):
        try:
            image = Image.new(mode, (37, 23))
        except ValueError:
            continue
        cases[f"mode {mode}"] = image
    for size in ((1, 1), (1, 300), (300, 1), (2, 2), (4000, 3)):
        cases[f"size {size[0]}x{size[1]}"] = Image.fromarray(
            rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        )
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    cases["truncated JPEG (half)"] = data[: len(data) // 2]
    cases["truncated JPEG (header only)"] = data[:20]
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 200] = bytes(200)
    cases["corrupt JPEG (zeroed block)"] = bytes(corrupt)
    cases["not an image (text)"] = b"hello, this is not an image"
    cases["empty file"] = b""
    cases["numpy float array"] = rng.random((20, 30, 3)).astype(np.float32)
    cases["numpy 2-D uint8"] = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    cases["numpy 4 channels"] = rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)
    cases["numpy 5 channels"] = rng.integers(0, 255, (20, 30, 5), dtype=np.uint8)
    cases["numpy with NaN"] = np.full((20, 30, 3), np.nan, dtype=np.float32)
    cases["None"] = None
    return cases


def expression_cases() -> dict:
    return {
        "empty": "",
        "whitespace": "   \t\n",
        "one letter": "a",
        "huge (10k words)": "the red circle " * 3400,
        "non-ASCII (accents)": "la voiture à gauche, café",
        "non-ASCII (CJK)": "左边的红色圆圈",
        "emoji": "the 🐶 next to the 🚗",
        "only emoji": "🔴🔵",
        "control characters": "the\x00red\x07circle",
        "right-to-left": "الدائرة الحمراء",
        "not a string (int)": 42,
        "None": None,
        "list of strings for one image": ["the red circle", "the blue square"],
    }


def input_campaign(workdir: Path) -> list[dict]:
    from transformers import pipeline

    from sera_training.export import save_untrained_model

    folder = workdir / "model"
    save_untrained_model(folder, TINY_CONFIG)
    segmenter = pipeline("referring-image-segmentation", model=str(folder), trust_remote_code=True, device="cpu")
    records = []

    def predict(image, text):
        from PIL import Image

        if isinstance(image, bytes):
            path = workdir / "input.bin"
            path.write_bytes(image)
            image = str(path)
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8:
            image = Image.fromarray(image)
        result = segmenter(image, text)
        return f"mask {result['mask'].size}, score {result['score']:.3f}"

    for name, image in image_cases().items():
        records.append(
            {"group": "image", "case": name, **outcome(lambda image=image: predict(image, "the red circle"))}
        )
    good = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    for name, text in expression_cases().items():
        records.append({"group": "expression", "case": name, **outcome(lambda text=text: predict(good, text))})

    records += annotation_campaign(workdir)
    records += model_folder_campaign(folder, workdir)
    return records


def annotation_campaign(workdir: Path) -> list[dict]:
    import pickle

    from PIL import Image

    from sera_training.coco_masks import decode_segmentation
    from sera_training.refer_data import load_refer_dataset

    records = []
    segmentations = {
        "polygon, 2 points only": [[1, 1, 5, 5]],
        "polygon, one degenerate part next to a valid one": [[1, 1, 5, 5], [0, 0, 8, 0, 8, 8, 0, 8]],
        "polygon, odd coordinate count": [[0, 0, 8, 0, 8, 8, 0]],
        "polygon, strings": [["a", "b", "c", "d", "e", "f"]],
        "polygon, NaN": [[0, 0, 8, float("nan"), 8, 8]],
        "polygon, flat list": [0, 0, 8, 0, 8, 8],
        "polygon, far outside the image": [[1000, 1000, 2000, 1000, 2000, 2000]],
        "RLE, wrong size": {"size": [5, 5], "counts": [25]},
        "RLE, runs do not add up": {"size": [10, 12], "counts": [3, 4]},
        "RLE, negative run": {"size": [10, 12], "counts": [130, -10]},
        "RLE, compressed counts not ASCII": {"size": [10, 12], "counts": "é"},
        "RLE, compressed counts garbage": {"size": [10, 12], "counts": "~~~~"},
        "RLE list (refclef form)": [{"size": [10, 12], "counts": [120]}],
        "segmentation is a number": 7,
        "segmentation is None": None,
        "segmentation is a string": "polygon",
        "segmentation is an empty list": [],
    }
    for name, segmentation in segmentations.items():
        records.append(
            {
                "group": "segmentation",
                "case": name,
                **outcome(lambda s=segmentation: f"{int(decode_segmentation(s, 10, 12).sum())} pixels"),
            }
        )

    # Whole REFER folders: a good one, then one broken thing at a time.
    def refer_root(name, refs=None, instances=None, refs_bytes=None, instances_text=None):
        root = workdir / "refer" / name
        images = root / "images" / "mscoco" / "images" / "train2014"
        images.mkdir(parents=True)
        Image.new("RGB", (40, 30), (90, 90, 90)).save(images / "COCO_train2014_000000000001.jpg")
        (root / "refcoco").mkdir()
        good_instances = {
            "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40}],
            "annotations": [
                {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}
            ],
        }
        good_refs = [
            {
                "ref_id": 1,
                "ann_id": 7,
                "image_id": 1,
                "split": "val",
                "sentences": [{"sent": "the box", "raw": "the box", "tokens": ["the", "box"], "sent_id": 1}],
            }
        ]
        refs = good_refs if refs is None else refs
        instances = good_instances if instances is None else instances
        (root / "refcoco" / "refs(unc).p").write_bytes(refs_bytes if refs_bytes is not None else pickle.dumps(refs, 2))
        text = instances_text if instances_text is not None else json.dumps(instances)
        (root / "refcoco" / "instances.json").write_text(text)
        return root

    good_pickle = pickle.dumps([{"ref_id": 1, "ann_id": 7, "image_id": 1, "split": "val", "sentences": []}], 2)
    ref_ok = {"ref_id": 1, "ann_id": 7, "image_id": 1, "split": "val", "sentences": [{"sent": "x", "sent_id": 1}]}
    folders = {
        "good folder": {},
        "refs pickle truncated": {"refs_bytes": good_pickle[: len(good_pickle) // 2]},
        "refs pickle empty file": {"refs_bytes": b""},
        "refs pickle is JSON": {"refs_bytes": b"[1, 2, 3]"},
        "refs is a dict, not a list": {"refs": {"refs": []}},
        "refs hold strings": {"refs": ["a", "b"]},
        "ref_id is a string": {"refs": [{**ref_ok, "ref_id": "one"}]},
        "duplicate ref ids": {"refs": [ref_ok, ref_ok]},
        "duplicate sentence ids": {
            "refs": [{**ref_ok, "sentences": [{"sent": "x", "sent_id": 1}, {"sent": "y", "sent_id": 1}]}]
        },
        "sentences is a string": {"refs": [{**ref_ok, "sentences": "the box"}]},
        "instances.json truncated": {"instances_text": '{"images": [{"id": 1, "file_na'},
        "instances.json empty": {"instances_text": ""},
        "instances.json is a list": {"instances": []},
        "annotations is a dict": {"instances": {"images": [], "annotations": {"id": 7}}},
        "annotation without id": {"instances": {"images": [], "annotations": [{"image_id": 1}]}},
        "duplicate annotation ids": {
            "instances": {
                "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40}],
                "annotations": [
                    {"id": 7, "image_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]},
                    {"id": 7, "image_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
                ],
            }
        },
        "image size in instances differs from the file": {
            "instances": {
                "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 300, "width": 400}],
                "annotations": [{"id": 7, "image_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}],
            }
        },
        "image height is a string": {
            "instances": {
                "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": "30", "width": 40}],
                "annotations": [{"id": 7, "image_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}],
            }
        },
    }
    for name, broken in folders.items():
        root = refer_root(re.sub(r"\W+", "_", name), **broken)

        def load(root=root):
            dataset = load_refer_dataset(root, "refcoco", "unc", "val", cache_dir=str(workdir / "cache"))
            return f"{len(dataset)} examples"

        records.append({"group": "REFER folder", "case": name, **outcome(load)})
    return records


def model_folder_campaign(folder: Path, workdir: Path) -> list[dict]:
    from transformers import AutoModel, AutoProcessor

    records = []
    for missing in sorted(path.name for path in folder.iterdir() if path.is_file()):
        broken = workdir / f"missing-{missing}"
        shutil.copytree(folder, broken)
        (broken / missing).unlink()

        def load(broken=broken):
            AutoModel.from_pretrained(broken, trust_remote_code=True)
            AutoProcessor.from_pretrained(broken, trust_remote_code=True)
            return "loaded"

        records.append({"group": "model folder", "case": f"without {missing}", **outcome(load)})
    truncated = workdir / "truncated-weights"
    shutil.copytree(folder, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    records.append(
        {
            "group": "model folder",
            "case": "model.safetensors truncated",
            **outcome(lambda: AutoModel.from_pretrained(truncated, trust_remote_code=True) and "loaded"),
        }
    )
    bad_config = workdir / "bad-config"
    shutil.copytree(folder, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "sera", "adapter_layers": "all"')
    records.append(
        {
            "group": "model folder",
            "case": "config.json truncated",
            **outcome(lambda: AutoModel.from_pretrained(bad_config, trust_remote_code=True) and "loaded"),
        }
    )
    return records


# ---------------------------------------------------------------------------------------------------- kills

TRAIN_ARGS = [
    "--config_name", str(TINY_CONFIG), "--no_progress_bar", "--cpu_threads", "1",
    "--synthetic_num_images", "train=3,validation=2,test=2,test_unseen=2",
    "--max_train_samples", "6", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
    "--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "10",
    "--max_eval_samples", "6", "--per_device_eval_batch_size", "6",
]  # fmt: skip
PHASES = ("step", "checkpoint write", "final export")


SNAPSHOT: Path | None = None  # a copy of the code the kill campaign runs (see snapshot_code)


def snapshot_code(workdir: Path) -> Path:
    """Copy the packages, the training scripts and the tiny config, so that every run of the campaign runs the same
    code even while the working tree changes under it."""
    root = workdir / "code"
    for name in ("modeling_sera", "sera_training", "training", "hub_configs/sera-synthref-tiny"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def train_command(output_dir: Path, cache_dir: Path, resume: bool) -> list[str]:
    code = SNAPSHOT or REPO_ROOT
    args = [str(code / TINY_CONFIG.relative_to(REPO_ROOT)) if arg == str(TINY_CONFIG) else arg for arg in TRAIN_ARGS]
    command = [sys.executable, str(code / "training" / "train.py"), *args]
    command += ["--output_dir", str(output_dir), "--synthetic_cache_dir", str(cache_dir)]
    return command + (["--resume_from_checkpoint", "latest"] if resume else [])


def train_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="true")
    if SNAPSHOT is not None:  # the snapshot's modeling_sera, ahead of the editable install of the working tree
        env["PYTHONPATH"] = os.pathsep.join([str(SNAPSHOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def reached(output_dir: Path, phase: str, target: int) -> bool:
    """Whether the run has reached the moment to kill: step `target` done (step), checkpoint `target` being written
    (checkpoint write), or the last step done, so that it scores the test splits and writes the folder (final export)."""
    checkpoints = output_dir / "checkpoints"
    if phase == "checkpoint write":
        return (checkpoints / f".step_{target}.partial").is_dir()
    if phase == "step":
        return (checkpoints / f"step_{target}").is_dir()
    return (checkpoints / "step_4").is_dir()


def run_and_kill(output_dir: Path, cache_dir: Path, phase: str, rng: random.Random) -> dict:
    """Start the run, wait for a random moment of `phase`, kill it (SIGKILL); return where it was."""
    target = {"step": rng.randint(1, 3), "checkpoint write": rng.randint(1, 4)}.get(phase, 4)
    delay = {"step": rng.uniform(0.0, 1.5), "checkpoint write": rng.uniform(0.0, 0.05)}.get(phase, rng.uniform(0, 4))
    process = subprocess.Popen(
        train_command(output_dir, cache_dir, resume=False),
        env=train_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if reached(output_dir, phase, target):
            time.sleep(delay)
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    killed = process.returncode == -signal.SIGKILL
    partial = sorted(path.name for path in (output_dir / "checkpoints").glob(".*.partial"))
    where = phase if killed else "finished first"
    return {"asked": phase, "target": target, "delay_s": round(delay, 3), "killed_in": where, "partial_left": partial}


def inspect_checkpoints(output_dir: Path) -> dict:
    """Every folder `--resume_from_checkpoint latest` may pick must be complete."""
    from safetensors.torch import load_file

    checkpoints = output_dir / "checkpoints"
    complete, incomplete, partial = [], [], []
    if checkpoints.is_dir():
        for path in sorted(checkpoints.iterdir()):
            if path.name.endswith(".partial"):
                partial.append(path.name)
                continue
            try:
                progress = json.loads((path / "progress.json").read_text())
                load_file(str(path / "model.safetensors"))
                ok = (path / "optimizer.bin").is_file() and (
                    not path.name.startswith("step_") or progress["completed_steps"] == int(path.name.split("_")[1])
                )
            except (OSError, ValueError, KeyError, RuntimeError):
                ok = False
            (complete if ok else incomplete).append(path.name)
    steps = [int(name.split("_")[1]) for name in complete if re.fullmatch(r"step_\d+", name)]
    return {
        "complete": complete,
        "incomplete": incomplete,
        "partial": partial,
        "latest_step": max(steps) if steps else 0,
        "model_folder_has_config": (output_dir / "config.json").is_file(),
        "model_folder_has_results": (output_dir / "eval_results.json").is_file(),
    }


def compare_runs(reference: Path, resumed: Path, from_step: int) -> list[str]:
    from safetensors.torch import load_file

    differences = []

    def weights(path):
        return load_file(str(path))

    for step in range(from_step + 1, 5):
        expected = weights(reference / "checkpoints" / f"step_{step}" / "model.safetensors")
        actual = weights(resumed / "checkpoints" / f"step_{step}" / "model.safetensors")
        if expected.keys() != actual.keys() or any(not (expected[k] == actual[k]).all() for k in expected):
            differences.append(f"step_{step} weights")
    expected, actual = weights(reference / "model.safetensors"), weights(resumed / "model.safetensors")
    if expected.keys() != actual.keys() or any(not (expected[k] == actual[k]).all() for k in expected):
        differences.append("final weights")
    reports = [json.loads((path / "eval_results.json").read_text()) for path in (reference, resumed)]
    if reports[0]["validation"]["history"] != reports[1]["validation"]["history"]:
        differences.append("validation history")
    if reports[0]["splits"] != reports[1]["splits"]:
        differences.append("test scores")
    return differences


def kill_campaign(workdir: Path, trials: int, seed: int, save=None) -> dict:
    global SNAPSHOT
    SNAPSHOT = snapshot_code(workdir)
    rng = random.Random(seed)
    cache_dir = workdir / "synthetic-cache"
    reference = workdir / "reference"
    started = time.perf_counter()
    result = subprocess.run(
        train_command(reference, cache_dir, resume=False), env=train_env(), cwd=REPO_ROOT, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    if result.returncode:
        raise SystemExit(f"the reference run failed:\n{result.stderr[-3000:]}")
    reference_seconds = time.perf_counter() - started
    records = []
    for trial in range(trials):
        phase = PHASES[trial % len(PHASES)]
        output_dir = workdir / f"trial_{trial:02d}"
        killed = run_and_kill(output_dir, cache_dir, phase, rng)
        left = inspect_checkpoints(output_dir)
        resumed = subprocess.run(
            train_command(output_dir, cache_dir, resume=True), env=train_env(), cwd=REPO_ROOT, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        log = resumed.stdout + resumed.stderr
        match = re.search(r"Resumed from \S*step_(\d+)", log)
        resumed_from = int(match.group(1)) if match else 0
        record = {"trial": trial, **killed, "after_kill": left, "resumed_from_step": resumed_from}
        if resumed.returncode:
            record["resume_error"] = log[-1500:]
        else:
            record["differences"] = compare_runs(reference, output_dir, resumed_from)
        record["resumed_from_last_complete"] = resumed_from == left["latest_step"]
        record["ok"] = (
            not resumed.returncode
            and not record.get("differences")
            and record["resumed_from_last_complete"]
            and not left["incomplete"]
        )
        records.append(record)
        print(json.dumps({key: record[key] for key in ("trial", "asked", "killed_in", "resumed_from_step", "ok")}))
        shutil.rmtree(output_dir, ignore_errors=True)
        if save is not None:  # after every trial, so that a campaign cut short keeps what it measured
            save({"reference_run_s": round(reference_seconds, 1), "trials": records})
    return {"reference_run_s": round(reference_seconds, 1), "trials": records}


# ---------------------------------------------------------------------------------------------------- report


def summarize(report: dict) -> str:
    lines = [f"# Fault campaign ({report['cpu']}, {report['date']})", ""]
    if "inputs" in report:
        records = report["inputs"]
        lines += [
            "## Bad input",
            "",
            "| group | cases | result | clear error | multi-line error | raw error |",
            "|---|---|---|---|---|---|",
        ]
        for group in dict.fromkeys(record["group"] for record in records):
            mine = [record for record in records if record["group"] == group]
            counts = [
                sum(record["outcome"] == kind for record in mine)
                for kind in ("result", "clear error", "multi-line error", "raw error")
            ]
            lines.append(f"| {group} | {len(mine)} | " + " | ".join(map(str, counts)) + " |")
        lines += ["", "| group | case | outcome | what the user gets |", "|---|---|---|---|"]
        for record in records:
            detail = record.get("message") or record.get("detail") or ""
            detail = f"{record.get('type', '')}: {detail}" if record.get("type") else str(detail)
            detail = detail.replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {record['group']} | {record['case']} | {record['outcome']} | {detail} |")
        lines.append("")
    if "kills" in report:
        trials = report["kills"]["trials"]
        lines += ["## Killed training runs", "", f"Reference run: {report['kills']['reference_run_s']} s.", ""]
        lines += [
            "| killed in | trials | resumed from the last complete checkpoint | bit-identical | incomplete folders taken |",
            "|---|---|---|---|---|",
        ]
        for phase in dict.fromkeys(trial["killed_in"] for trial in trials):
            mine = [trial for trial in trials if trial["killed_in"] == phase]
            identical = sum(not trial.get("resume_error") and not trial.get("differences") for trial in mine)
            from_last = sum(trial["resumed_from_last_complete"] for trial in mine)
            incomplete = sum(bool(trial["after_kill"]["incomplete"]) for trial in mine)
            lines.append(f"| {phase} | {len(mine)} | {from_last} | {identical} | {incomplete} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", action="store_true", help="run the bad-input cases")
    parser.add_argument("--kills", type=int, default=0, help="number of killed-and-resumed training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "fault_campaign")
    args = parser.parse_args(argv)
    if not args.inputs and not args.kills:
        parser.error("nothing to do: pass --inputs and/or --kills N")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save(kills=None):
        if kills is not None:
            report["kills"] = kills
        args.output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        args.output.with_suffix(".md").write_text(summarize(report))

    with tempfile.TemporaryDirectory(prefix="sera-faults-") as scratch:
        workdir = Path(scratch)
        if args.inputs:
            report["inputs"] = input_campaign(workdir)
            save()
        if args.kills:
            save(kill_campaign(workdir, args.kills, args.seed, save))
    print(summarize(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
