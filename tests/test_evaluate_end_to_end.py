"""training/evaluate_model.py end to end: a real (tiny, untrained) SERA folder, real synthetic data saved to disk, the CLI
in a subprocess, and the numbers checked against a direct computation with the model and processor."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from sera_training.evaluation import evaluate_referring_segmentation
from sera_training.synthetic_data import SynthRefConfig, write_dataset
from tests.helpers import REPO_ROOT, TINY_HUB_CONFIG


@pytest.fixture(scope="module")
def model_dir_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = SeraForReferringSegmentation(SeraConfig.from_pretrained(TINY_HUB_CONFIG)).eval()
    processor = SeraProcessor.from_pretrained(TINY_HUB_CONFIG)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    sizes = (("train", 1), ("validation", 1), ("test", 2), ("test_unseen", 2))
    write_dataset(SynthRefConfig(seed=3, num_images=sizes), root / "data")
    return root, model, processor


def test_cli_scores_every_expression_and_matches_a_direct_computation(model_dir_and_data):
    root, model, processor = model_dir_and_data
    output = root / "results.json"
    card = root / "README.md"
    card.write_text("# tiny SERA\n")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "training" / "evaluate_model.py"),
            "--model",
            str(root / "model"),
            "--data",
            str(root / "data"),
            "--split",
            "test",
            "--split",
            "test_unseen",
            "--output",
            str(output),
            "--model-card",
            str(card),
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mIoU" in result.stdout and "oIoU" in result.stdout and "test_unseen" in result.stdout
    results = json.loads(output.read_text())
    assert set(results["splits"]) == {"test", "test_unseen"}
    import datasets

    test_split = datasets.load_from_disk(str(root / "data"))["test"]
    assert results["splits"]["test"]["num_samples"] == len(test_split)

    # Recompute mIoU/oIoU directly from the model's masks at original resolution.
    intersections, unions = [], []
    for row in test_split:
        inputs = processor(images=[row["image"]], text=[row["expression"]], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        predicted = processor.post_process_referring_segmentation(logits, inputs["original_sizes"])[0]["mask"].numpy()
        target = np.array(row["mask"]) > 0
        intersections.append((predicted & target).sum())
        unions.append((predicted | target).sum())
    ious = [i / u if u else 1.0 for i, u in zip(intersections, unions)]
    scores = results["splits"]["test"]
    assert scores["mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-6)
    assert scores["oIoU"] == pytest.approx(100 * sum(intersections) / sum(unions), abs=1e-6)
    assert set(scores["per_category"]) <= {"attribute", "location", "relation", "comparison"}
    assert "mIoU" in card.read_text()


def test_in_process_loop_agrees_with_the_cli_batching(model_dir_and_data):
    root, model, processor = model_dir_and_data
    import datasets

    split = datasets.load_from_disk(str(root / "data"))["test_unseen"]
    one = evaluate_referring_segmentation(model, processor, split, batch_size=1, show_progress=False)
    many = evaluate_referring_segmentation(model, processor, split, batch_size=4, show_progress=False)
    for key in ("mIoU", "oIoU", "Prec@0.5", "boundary_F", "num_samples"):
        assert one[key] == pytest.approx(many[key], abs=1e-4), key
