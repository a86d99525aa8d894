"""Tests for the evaluation loop, the report formatting and the command line (sera_training/evaluation.py).

A stand-in model and processor implement SERA's interface with a rule that is trivial to predict: the model's mask
logits are the red channel, so the predicted mask of every image is exactly where the image is red. The expected
scores are then computed directly from the rectangles drawn in the images and masks.
"""

import json
import subprocess
import sys

import datasets
import evaluate
import numpy as np
import pytest
import torch

from sera_training import evaluation
from tests.helpers import REPO_ROOT
from tests.helpers.stand_ins import EXAMPLES, PaddingProcessor, RedChannelModel, build_dataset, rectangle_mask


def expected_iou_scores(examples):
    """oIoU, mIoU and Prec@X straight from the boxes (in %)."""
    intersections, unions = [], []
    for height, width, red_box, reference_box, _ in examples:
        prediction = rectangle_mask(height, width, red_box)
        reference = rectangle_mask(height, width, reference_box)
        intersections.append((prediction & reference).sum())
        unions.append((prediction | reference).sum())
    ious = [i / u if u else 1.0 for i, u in zip(intersections, unions)]
    scores = {"oIoU": 100 * sum(intersections) / sum(unions), "mIoU": 100 * np.mean(ious)}
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.9):
        scores[f"Prec@{threshold}"] = 100 * np.mean([iou >= threshold for iou in ious])
    scores["num_samples"] = len(examples)
    return scores


def expected_boundary_f(examples):
    metric = evaluate.load(str(evaluation.METRIC_PATH), keep_in_memory=True)
    predictions = [rectangle_mask(h, w, red) for h, w, red, _, _ in examples]
    references = [rectangle_mask(h, w, ref) for h, w, _, ref, _ in examples]
    return metric.compute(predictions=predictions, references=references)["boundary_F"]


def assert_scores(actual, examples):
    for key, value in expected_iou_scores(examples).items():
        assert actual[key] == pytest.approx(value), key
    assert actual["boundary_F"] == pytest.approx(expected_boundary_f(examples))


# ---- the loop ----


def test_scores_every_expression_at_original_resolution():
    model = RedChannelModel()
    results = evaluation.evaluate_referring_segmentation(
        model, PaddingProcessor(), build_dataset(), batch_size=3, device="cpu", show_progress=False
    )
    assert model.seen_batch_sizes == [3, 3, 1]
    assert not model.training
    assert_scores(results, EXAMPLES)
    # Hand-checked: the perfect example (IoU 1) and the 0.75 one make Prec@0.7 = 4 of 7 (with 196/225 and 290/380).
    assert results["Prec@0.7"] == pytest.approx(100 * 4 / 7)


def test_per_category_results():
    results = evaluation.evaluate_referring_segmentation(
        RedChannelModel(), PaddingProcessor(), build_dataset(), batch_size=4, show_progress=False
    )
    assert sorted(results["per_category"]) == ["attribute", "location", "relation"]
    for category in ("attribute", "location", "relation"):
        members = [example for example in EXAMPLES if example[4] == category]
        assert results["per_category"][category]["num_samples"] == len(members)
        assert_scores(results["per_category"][category], members)


def test_no_per_category_results_without_categories():
    results = evaluation.evaluate_referring_segmentation(
        RedChannelModel(), PaddingProcessor(), build_dataset(with_categories=False), batch_size=8, show_progress=False
    )
    assert "per_category" not in results
    assert_scores(results, EXAMPLES)


def test_batch_size_does_not_change_the_scores():
    one = evaluation.evaluate_referring_segmentation(
        RedChannelModel(), PaddingProcessor(), build_dataset(), batch_size=1, show_progress=False
    )
    all_at_once = evaluation.evaluate_referring_segmentation(
        RedChannelModel(), PaddingProcessor(), build_dataset(), batch_size=len(EXAMPLES), show_progress=False
    )
    assert one == all_at_once


def test_resolve_device():
    model = RedChannelModel()
    assert evaluation.resolve_device(None, model) == torch.device("cpu")
    assert evaluation.resolve_device("cpu", model) == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert evaluation.resolve_device("auto", model).type == expected_auto


# ---- reports ----

RESULTS = {
    "val": {"oIoU": 74.744, "mIoU": 76.5, "Prec@0.5": 88.0, "Prec@0.6": 85.125, "Prec@0.7": 80.0,
            "Prec@0.8": 70.0, "Prec@0.9": 30.0, "boundary_F": 60.0, "num_samples": 10834},
    "testA": {"oIoU": 77.0, "mIoU": 78.2, "Prec@0.5": 90.0, "Prec@0.6": 88.0, "Prec@0.7": 84.0,
              "Prec@0.8": 72.0, "Prec@0.9": 31.0, "boundary_F": 61.0, "num_samples": 5657},
}  # fmt: skip


def test_results_table_has_one_row_per_split_in_percent():
    assert evaluation.format_results_table(RESULTS) == (
        "| split | oIoU | mIoU | Prec@0.5 | Prec@0.6 | Prec@0.7 | Prec@0.8 | Prec@0.9 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| val | 74.74 | 76.50 | 88.00 | 85.12 | 80.00 | 70.00 | 30.00 |\n"
        "| testA | 77.00 | 78.20 | 90.00 | 88.00 | 84.00 | 72.00 | 31.00 |"
    )
    assert evaluation.format_category_table(RESULTS) == ""


def test_category_table():
    with_categories = {"val": dict(RESULTS["val"], per_category={"relation": dict(RESULTS["testA"], num_samples=12)})}
    table = evaluation.format_category_table(with_categories).splitlines()
    assert (
        table[0]
        == "| split | category | samples | oIoU | mIoU | Prec@0.5 | Prec@0.6 | Prec@0.7 | Prec@0.8 | Prec@0.9 |"
    )
    assert table[2] == "| val | relation | 12 | 77.00 | 78.20 | 90.00 | 88.00 | 84.00 | 72.00 | 31.00 |"


def test_model_card_section_is_appended_then_replaced(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n\n# SERA\n\nIntro.\n", encoding="utf-8")

    evaluation.update_model_card(card, RESULTS, "refcoco(unc)")
    first = card.read_text(encoding="utf-8")
    assert first.startswith(
        "---\nlicense: apache-2.0\n---\n\n# SERA\n\nIntro.\n\n<!-- results start: refcoco(unc) -->"
    )
    assert "| val | 74.74 | 76.50 |" in first and first.endswith("<!-- results end: refcoco(unc) -->\n")

    card.write_text(first + "\n## Citation\n\nText after the section.\n", encoding="utf-8")
    updated = {"val": dict(RESULTS["val"], mIoU=12.345)}
    evaluation.update_model_card(card, updated, "refcoco(unc)")
    second = card.read_text(encoding="utf-8")
    assert second.count("<!-- results start: refcoco(unc) -->") == 1
    assert "| val | 74.74 | 12.35 |" in second and "testA" not in second
    assert second.startswith("---\nlicense: apache-2.0\n---\n\n# SERA\n\nIntro.\n\n")
    assert second.endswith("<!-- results end: refcoco(unc) -->\n\n## Citation\n\nText after the section.\n")

    # Another dataset gets its own section; the first one stays.
    evaluation.update_model_card(card, RESULTS, "refcoco+(unc)")
    third = card.read_text(encoding="utf-8")
    assert "| val | 74.74 | 12.35 |" in third and "<!-- results start: refcoco+(unc) -->" in third


def test_model_card_is_created_and_broken_markers_are_refused(tmp_path):
    card = tmp_path / "new" / "README.md"
    card.parent.mkdir()
    evaluation.update_model_card(card, RESULTS, "synthref")
    assert card.read_text(encoding="utf-8").startswith(
        "<!-- results start: synthref -->\n## Evaluation results: synthref"
    )

    broken = tmp_path / "broken.md"
    broken.write_text("# Card\n<!-- results start: synthref -->\nno end marker\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken results section"):
        evaluation.update_model_card(broken, RESULTS, "synthref")


# ---- command line ----


def test_main_prints_table_writes_json_and_fills_card(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    requested = []

    def fake_load_examples(source, split, coco_image_dir=None):
        requested.append((source, split))
        return build_dataset()

    monkeypatch.setattr(
        evaluation, "load_model_and_processor", lambda path, revision=None: (RedChannelModel(), PaddingProcessor())
    )
    monkeypatch.setattr(evaluation, "load_examples", fake_load_examples)
    output, card = tmp_path / "results.json", tmp_path / "README.md"
    argv = ["--model", str(model_dir), "--data", "synthref", "--split", "val", "--split", "test", "--split", "val"]
    argv += ["--output", str(output), "--model-card", str(card), "--batch-size", "2", "--device", "cpu"]
    argv += ["--no-progress"]
    assert evaluation.main(argv) == 0

    assert requested == [("synthref", "val"), ("synthref", "test")]  # each split once, never pooled
    report = json.loads(output.read_text())
    assert report["data"] == "synthref" and report["units"] == "percent"
    assert list(report["splits"]) == ["val", "test"]
    assert_scores(report["splits"]["val"], EXAMPLES)
    printed = capsys.readouterr().out
    assert evaluation.format_results_table(report["splits"]) in printed
    assert "| val | attribute | 3 |" in printed
    assert evaluation.format_results_table(report["splits"]) in card.read_text()


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.parse_args(["--model", str(tmp_path / "missing"), "--data", "synthref", "--split", "val"])
    assert exit_info.value.code == 2
    assert "model folder not found" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        evaluation.parse_args(["--model", str(tmp_path), "--data", "not-a-source", "--split", "val"])
    assert "Unknown data source 'not-a-source'" in capsys.readouterr().err

    with pytest.raises(ValueError, match="no config.json"):
        evaluation.load_model_and_processor(tmp_path)


def test_the_evaluation_entry_point_runs_and_no_script_shadows_a_library(tmp_path):
    # training/evaluate.py once shadowed the `evaluate` library whenever training/ was on sys.path (it is first when
    # a script there runs) and swapped itself out of sys.modules. The entry point is training/evaluate_model.py now,
    # and no script in training/ has the name of a module that the interpreter could import otherwise.
    assert not (REPO_ROOT / "training" / "evaluate.py").exists()
    names = sorted(path.stem for path in (REPO_ROOT / "training").glob("*.py"))
    code = f"import importlib.util, sys; print([n for n in {names!r} if importlib.util.find_spec(n) is not None])"
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == "[]", completed.stdout + completed.stderr
    completed = subprocess.run(
        [sys.executable, "training/evaluate_model.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 0 and "usage: sera-evaluate" in completed.stdout, completed.stderr
    assert "--dataset" in completed.stdout and "--coco_image_dir" in completed.stdout


def test_an_unknown_split_is_one_line_that_lists_the_splits(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    datasets.DatasetDict({"val": build_dataset(), "testA": build_dataset()}).save_to_disk(str(tmp_path / "data"))
    loaded = []
    monkeypatch.setattr(evaluation, "load_model_and_processor", lambda *args, **kwargs: loaded.append(args))
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "data"), "--split", "val", "--split", "tesA"]
    with pytest.raises(SystemExit) as raised:
        evaluation.main(argv)
    error = raised.value.code
    assert error == (
        f"sera-evaluate: error: --split tesA: {tmp_path / 'data'} has no split 'tesA'; its splits are: val, testA."
    )
    assert not loaded  # the splits are checked before the model is loaded


def test_evaluate_py_reports_a_bad_model_in_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    datasets.DatasetDict({"val": build_dataset()}).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(SystemExit) as raised:
        evaluation.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--split", "val"])
    assert raised.value.code.startswith("sera-evaluate: error: ") and "has no config.json" in raised.value.code
    with pytest.raises(SystemExit):
        evaluation.parse_args(
            ["--model", str(tmp_path / "model"), "--revision", "v1", "--data", "synthref", "--split", "x"]
        )
    assert "--revision v1 is for a Hub repo id" in capsys.readouterr().err
