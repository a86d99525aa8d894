"""Pictures of what the model does: the contact sheets of training/gallery.py (evaluate.py --gallery N, and train.py
at the end of a run) and the validation plot train.py writes next to its TensorBoard logs."""

import json

import numpy as np
import pytest
from PIL import Image

from sera_training import evaluation, gallery
from tests.helpers.stand_ins import EXAMPLES, PaddingProcessor, RedChannelModel, build_dataset


def records_of(ious_by_category):
    records = []
    for category, ious in ious_by_category.items():
        for iou in ious:
            records.append({"index": len(records), "iou": iou, "category": category})
    return records


def test_the_best_the_worst_and_a_seeded_random_sample_per_category():
    ious = {"attribute": [0.1 * i for i in range(10)], "location": [0.5, 0.2], "": [0.3, 0.9, 0.6, 0.7]}
    records = records_of(ious)
    chosen = gallery.choose_examples(records, per_category=6, seed=0)
    assert list(chosen) == [gallery.NO_CATEGORY, "attribute", "location"]

    attribute = chosen["attribute"]
    labels = [label for _, label in attribute]
    assert labels.count("best") == 2 and labels.count("worst") == 2 and labels.count("random") == 2
    values = [record["iou"] for record, _ in attribute]
    assert values == sorted(values, reverse=True)  # a row reads from the best to the worst
    assert [record["iou"] for record, label in attribute if label == "best"] == pytest.approx([0.9, 0.8])
    assert [record["iou"] for record, label in attribute if label == "worst"] == pytest.approx([0.1, 0.0])
    randoms = {record["index"] for record, label in attribute if label == "random"}
    assert all(0.2 - 1e-9 <= records[index]["iou"] <= 0.7 + 1e-9 for index in randoms)

    # Fewer examples than asked for: all of them, each once.
    assert sorted(record["index"] for record, _ in chosen["location"]) == [10, 11]
    assert len({record["index"] for record, _ in chosen[gallery.NO_CATEGORY]}) == 4

    # Reproducible: the same seed gives the same choice, whatever the other categories hold.
    assert gallery.choose_examples(records, 6, seed=0) == chosen
    alone = gallery.choose_examples(records_of({"attribute": ious["attribute"]}), 6, seed=0)
    assert [record["iou"] for record, _ in alone["attribute"]] == values
    other_seeds = {
        frozenset(
            record["index"]
            for record, label in gallery.choose_examples(records, 6, seed)["attribute"]
            if label == "random"
        )
        for seed in range(1, 8)
    }
    assert len(other_seeds | {frozenset(randoms)}) > 1  # the seed does change the random sample

    assert gallery.split_counts(1) == (1, 0, 0) and gallery.split_counts(4) == (2, 1, 1)
    with pytest.raises(ValueError, match="at least 1"):
        gallery.choose_examples(records, 0)


def test_write_gallery_draws_outlines_iou_and_expressions(tmp_path):
    dataset = build_dataset()
    model, processor = RedChannelModel(), PaddingProcessor()
    _, records = evaluation.evaluate_referring_segmentation(
        model, processor, dataset, batch_size=3, show_progress=False, record_samples=True
    )
    # The records hold each example's IoU, as the boxes give it.
    assert [record["iou"] for record in records][:3] == pytest.approx([1.0, 25 / 175, 48 / 64])
    path = tmp_path / "sheets" / gallery.gallery_file_name("test A/B")
    assert path.name == "gallery_test_A_B.png"
    drawn = gallery.write_gallery(model, processor, dataset, records, path, per_category=2, seed=0, title="toy test")
    assert list(drawn) == [gallery.NO_CATEGORY, "attribute", "location", "relation"]
    assert [entry["label"] for entry in drawn["attribute"]] == ["best", "worst"]
    # Predicted again for the picture: the same IoU as during scoring.
    for entries in drawn.values():
        for entry in entries:
            assert entry["iou"] == pytest.approx(records[entry["index"]]["iou"])
            assert entry["expression"] == dataset[entry["index"]]["expression"]

    sheet = np.asarray(Image.open(path).convert("RGB"))
    tile = gallery.draw_tile(Image.new("RGB", (10, 10)), "x", np.zeros((10, 10)), np.zeros((10, 10)), 1.0, "best")
    rows, columns = 4, 2
    assert sheet.shape[0] > rows * tile.height and sheet.shape[1] > gallery.ROW_HEADER_WIDTH + columns * tile.width
    colors = {tuple(pixel) for pixel in sheet.reshape(-1, 3)}
    assert gallery.GROUND_TRUTH_COLOR in colors and gallery.PREDICTION_COLOR in colors


def test_a_tile_outlines_the_ground_truth_and_the_prediction():
    reference = np.zeros((100, 100), dtype=bool)
    reference[20:60, 20:60] = True
    prediction = np.zeros_like(reference)
    prediction[50:90, 50:90] = True
    tile = np.asarray(
        gallery.draw_tile(Image.new("RGB", (100, 100), (90, 90, 90)), "the box", reference, prediction, 0.1, "worst")
    )
    # The image is enlarged 2x into the tile; outlines sit on the boundaries, the insides are untouched.
    assert tuple(tile[80, 80]) == tuple(tile[150, 150]) == tuple(tile[20, 160]) == (90, 90, 90)
    assert tuple(tile[80, 40]) == gallery.GROUND_TRUTH_COLOR  # left edge of the reference (x = 20 -> 40)
    assert tuple(tile[140, 179]) == gallery.PREDICTION_COLOR  # right edge of the prediction (x = 89 -> 179)
    # A prediction that fills the image is still outlined, at the image's edge.
    full = np.asarray(
        gallery.draw_tile(Image.new("RGB", (50, 50)), "all", reference[:50, :50], np.ones((50, 50)), 0.5, "random")
    )
    assert tuple(full[0, 100]) == gallery.PREDICTION_COLOR


def test_evaluate_py_gallery_writes_one_sheet_per_split(tmp_path, monkeypatch, capsys):
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(
        evaluation, "load_model_and_processor", lambda *a, **k: (RedChannelModel(), PaddingProcessor())
    )
    monkeypatch.setattr(evaluation, "load_examples", lambda source, split, coco_image_dir=None: build_dataset())
    output = tmp_path / "out" / "results.json"
    output.parent.mkdir()
    argv = ["--model", str(tmp_path / "model"), "--data", "synthref", "--split", "val", "--split", "test"]
    assert evaluation.main(argv + ["--output", str(output), "--gallery", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for split in ("val", "test"):
        sheet = output.parent / f"gallery_{split}.png"
        assert sheet.is_file() and f"Gallery written to {sheet}" in printed
    assert "gallery" not in json.loads(output.read_text())  # the JSON report is unchanged
    with pytest.raises(SystemExit):
        evaluation.parse_args(argv + ["--gallery", "-1"])
    assert "--gallery N takes the number of examples per category" in capsys.readouterr().err


def test_validation_plot_has_one_line_per_category_and_one_overall(tmp_path):
    history = [
        {"step": 100, "mIoU": 20.0, "oIoU": 21.0, "per_category_mIoU": {"attribute": 30.0, "location": 10.0}},
        {"step": 200, "mIoU": 25.0, "oIoU": 26.0, "per_category_mIoU": {"attribute": 35.0, "location": 15.0}},
        {"step": 300, "mIoU": 28.0, "oIoU": 29.0, "per_category_mIoU": {"attribute": 40.0, "location": 12.0}},
    ]
    series = gallery.validation_series(history)
    assert series == {
        "all": [(100, 20.0), (200, 25.0), (300, 28.0)],
        "attribute": [(100, 30.0), (200, 35.0), (300, 40.0)],
        "location": [(100, 10.0), (200, 15.0), (300, 12.0)],
    }
    path = gallery.write_validation_plot(history, tmp_path / "runs" / "validation_mIoU.png")
    plot = np.asarray(Image.open(path).convert("RGB"))
    assert plot.shape[:2] == (gallery.PLOT_SIZE[1], gallery.PLOT_SIZE[0])
    colors = {tuple(pixel) for pixel in plot.reshape(-1, 3)}
    assert gallery.SERIES_COLORS[0] in colors and gallery.SERIES_COLORS[1] in colors  # attribute, location

    # The attribute line is above the location line at every step: higher mIoU is drawn higher.
    def topmost_row(color, column):
        rows = np.where((plot[:, column] == color).all(axis=-1))[0]
        return rows.min() if len(rows) else None

    left, _, right, _ = gallery.PLOT_MARGINS
    width = gallery.PLOT_SIZE[0] - right - left  # the x axis runs from step 0 to the last step, 300
    for column in (round(left + width * 150 / 300), round(left + width * 250 / 300)):
        attribute, location = (
            topmost_row(gallery.SERIES_COLORS[0], column),
            topmost_row(gallery.SERIES_COLORS[1], column),
        )
        assert attribute is not None and location is not None and attribute < location

    # An old history without categories still plots its overall line; an empty one writes nothing.
    assert gallery.write_validation_plot([{"step": 5, "mIoU": 3.0, "oIoU": 3.0}], tmp_path / "old.png").is_file()
    assert gallery.write_validation_plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_train_py_writes_a_gallery_per_test_split_and_the_validation_plot(tmp_path):
    from tests.helpers.training_runs import check_ok, launch

    output_dir = tmp_path / "run"
    options = (
        "--max_train_samples 4 --per_device_train_batch_size 2 --max_train_steps 2 --eval_steps 1 "
        "--max_eval_samples 6 --per_device_eval_batch_size 6 --checkpointing_steps none"
    )
    check_ok(launch(options, output_dir, tmp_path / "cache"))
    for split in ("test", "test_unseen"):
        sheet = Image.open(output_dir / f"gallery_{split}.png")
        assert sheet.width > gallery.ROW_HEADER_WIDTH + gallery.TILE_SIDE
    report = json.loads((output_dir / "eval_results.json").read_text())
    history = report["validation"]["history"]
    assert [entry["step"] for entry in history] == [1, 2]
    assert all(entry["per_category_mIoU"] for entry in history)
    plot = output_dir / "runs" / "validation_mIoU.png"
    assert Image.open(plot).size == gallery.PLOT_SIZE
    assert list((output_dir / "runs").rglob("events.out.tfevents.*"))  # next to the TensorBoard logs


def test_evaluation_examples_have_the_categories_the_sheet_shows():
    assert {example[4] for example in EXAMPLES} == {"", "attribute", "location", "relation"}
