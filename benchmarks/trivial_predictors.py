"""Scores of mask predictors that ignore the expression, on the built-in synthetic data: the floor a trained model
must clear to show it reads the expression at all.

    python benchmarks/trivial_predictors.py [--splits test test_unseen]

- "whole image": every pixel is the object;
- "centre box": the central box covering a quarter of the image;
- "any referred object": the union of the ground-truth masks of every object referred to in that image. It finds
  the objects perfectly but cannot tell which one the expression means: an upper bound for expression-blind
  foreground segmentation, not a fair baseline (it peeks at the ground truth).
"""

import argparse
from collections import defaultdict
from pathlib import Path

import evaluate
import numpy as np

from sera_training.synthetic_data import build_synthetic_dataset


REPO_ROOT = Path(__file__).resolve().parents[1]


def centre_box(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return mask


def score_split(split) -> dict[str, dict]:
    rows = split.select_columns(["image_id", "mask"])
    objects_by_image = defaultdict(lambda: None)
    masks = []
    for row in rows:
        mask = np.array(row["mask"]) > 0
        masks.append((row["image_id"], mask))
        union = objects_by_image[row["image_id"]]
        objects_by_image[row["image_id"]] = mask if union is None else union | mask
    predictors = {
        "whole image": lambda image_id, mask: np.ones_like(mask),
        "centre box": lambda image_id, mask: centre_box(*mask.shape),
        "any referred object (oracle union)": lambda image_id, mask: objects_by_image[image_id],
    }
    results = {}
    for name, predict in predictors.items():
        metric = evaluate.load(str(REPO_ROOT / "training" / "metrics" / "referring_segmentation"))
        for image_id, mask in masks:
            metric.add(prediction=predict(image_id, mask), reference=mask)
        results[name] = metric.compute()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=["test", "test_unseen"])
    args = parser.parse_args()
    dataset = build_synthetic_dataset()
    print("| split | predictor | mIoU | oIoU | Prec@0.5 |\n|---|---|---:|---:|---:|")
    for split in args.splits:
        for name, scores in score_split(dataset[split]).items():
            print(f"| {split} | {name} | {scores['mIoU']:.2f} | {scores['oIoU']:.2f} | {scores['Prec@0.5']:.2f} |")


if __name__ == "__main__":
    main()
