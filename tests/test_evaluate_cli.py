"""Tests for the evaluation loop, the report formatting and the command line (training/evaluation.py, evaluate.py).

A stand-in model and processor implement SERA's interface with a rule that is trivial to predict: the model's mask
logits are the red channel, so the predicted mask of every image is exactly where the image is red. The expected
scores are then computed directly from the rectangles drawn in the images and masks.
"""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

import evaluation
from data_schema import EXAMPLE_FEATURES


REPO_ROOT = Path(__file__).resolve().parents[1]


class RedChannelModel(torch.nn.Module):
    """Mask logits = red channel (in [0, 1]) mapped to [-1, 1]: a pixel is foreground exactly when it is red."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen_batch_sizes = []

    def forward(self, pixel_values, input_ids, attention_mask):  # only the keys SERA's forward accepts
        assert input_ids.shape == attention_mask.shape and len(input_ids) == len(pixel_values)
        self.seen_batch_sizes.append(len(pixel_values))
        return type("Output", (), {"logits": self.scale * (2 * pixel_values[:, :1] - 1)})()


class PaddingProcessor:
    """SERA's processor interface: pads a batch to its largest image, crops back in post-processing."""

    def __call__(self, images, text, return_tensors="pt"):
        assert return_tensors == "pt" and len(images) == len(text)
        height = max(image.height for image in images)
        width = max(image.width for image in images)
        pixel_values = torch.zeros(len(images), 3, height, width)
        for index, image in enumerate(images):
            assert image.mode == "RGB"
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
            pixel_values[index, :, : image.height, : image.width] = array
        lengths = [len(expression.split()) for expression in text]
        attention_mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
        return {
            "pixel_values": pixel_values,
            "input_ids": attention_mask * 7,
            "attention_mask": attention_mask,
            "original_sizes": torch.tensor([[image.height, image.width] for image in images]),
            "letterbox_offsets": torch.zeros(len(images), 2),  # extra key the model must not receive
        }

    def post_process_referring_segmentation(self, outputs, target_sizes):
        return [
            {"mask": logits[0, :height, :width] > 0, "score": 1.0}
            for logits, (height, width) in zip(outputs.logits, target_sizes.tolist())
        ]


def rectangle_mask(height, width, box):
    top, left, bottom, right = box
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


# (height, width, red box in the image = the prediction, reference box, category); boxes are (top, left, bottom, right)
EXAMPLES = [
    (20, 30, (2, 3, 12, 13), (2, 3, 12, 13), "attribute"),  # perfect
    (24, 18, (0, 0, 10, 10), (5, 5, 15, 15), "relation"),  # IoU 25 / 175
    (16, 16, (4, 4, 12, 12), (4, 4, 12, 10), "attribute"),  # IoU 48 / 64 = 0.75
    (30, 25, (0, 0, 0, 0), (3, 3, 9, 9), "location"),  # empty prediction
    (12, 40, (1, 1, 11, 39), (1, 1, 11, 30), "relation"),  # IoU 290 / 380
    (18, 22, (3, 3, 9, 9), (0, 0, 0, 0), ""),  # empty reference, no category
    (25, 25, (5, 5, 20, 20), (6, 6, 20, 20), "attribute"),  # IoU 196 / 225
]


def build_dataset(with_categories=True):
    rows = {name: [] for name in EXAMPLE_FEATURES}
    for index, (height, width, red_box, reference_box, category) in enumerate(EXAMPLES):
        image = np.full((height, width, 3), 40, dtype=np.uint8)
        image[..., 0][rectangle_mask(height, width, red_box)] = 230
        rows["image"].append(Image.fromarray(image))
        rows["mask"].append(Image.fromarray(rectangle_mask(height, width, reference_box).astype(np.uint8) * 255))
        rows["expression"].append("the red box " * (index % 3 + 1))
        rows["category"].append(category if with_categories else "")
        rows["image_id"].append(index)
        rows["object_id"].append(index)
        rows["ref_id"].append(index)
        rows["sentence_id"].append(index)
        rows["source"].append("test")
    return datasets.Dataset.from_dict(rows, features=EXAMPLE_FEATURES)


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


def test_import_evaluate_gets_the_library_even_with_training_on_sys_path():
    # Scripts in training/ run with that folder first on sys.path, where training/evaluate.py shadows the library.
    code = (
        "import sys; sys.path.insert(0, 'training'); import evaluate; "
        "assert hasattr(evaluate, 'Metric') and hasattr(evaluate, 'load'), evaluate.__file__"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


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
        f"training/evaluate.py: error: --split tesA: {tmp_path / 'data'} has no split 'tesA'; "
        "its splits are: val, testA."
    )
    assert not loaded  # the splits are checked before the model is loaded


def test_evaluate_py_reports_a_bad_model_in_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    datasets.DatasetDict({"val": build_dataset()}).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(SystemExit) as raised:
        evaluation.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--split", "val"])
    assert raised.value.code.startswith("training/evaluate.py: error: ") and "has no config.json" in raised.value.code
    with pytest.raises(SystemExit):
        evaluation.parse_args(
            ["--model", str(tmp_path / "model"), "--revision", "v1", "--data", "synthref", "--split", "x"]
        )
    assert "--revision v1 is for a Hub repo id" in capsys.readouterr().err
