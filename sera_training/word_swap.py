"""Does a model read the spatial words? Swap them and see whether the mask moves.

For location, relation and comparison expressions, the word that picks one object among several of the same kind
is swapped for its opposite ("left" <-> "right", "top" <-> "bottom", "above" <-> "below", "biggest" <-> "smallest",
...). A model that reads the word moves its mask to another object, so the IoU between the mask predicted for the
expression and the one predicted for its swapped twin is low; a model that finds "the circles" and ignores which
one keeps its mask, and that IoU stays near 1. Expressions without a swappable word (e.g. "next to") are skipped.

    python training/word_swap.py --model outputs/sera-synthref-tiny --split test
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from sera_training.evaluation import mask_iou, predict_masks


CATEGORIES = ("location", "relation", "comparison")
# Each pair swaps both ways; longer phrases first so that "top left" is not read as "top" then "left".
_OPPOSITES = (
    ("top left", "bottom right"),
    ("top right", "bottom left"),
    ("leftmost", "rightmost"),
    ("topmost", "lowest"),
    ("left", "right"),
    ("top", "bottom"),
    ("above", "below"),
    ("over", "under"),
    ("biggest", "smallest"),
    ("largest", "tiniest"),
)
_SWAP = {a: b for a, b in _OPPOSITES} | {b: a for a, b in _OPPOSITES}
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(word) for word in sorted(_SWAP, key=len, reverse=True)) + r")\b")


def swapped_expression(text: str) -> str | None:
    """``text`` with every spatial word replaced by its opposite, or None when it holds none."""
    swapped, count = _PATTERN.subn(lambda match: _SWAP[match.group(1)], text)
    return swapped if count else None


@torch.no_grad()
def word_swap_iou(model, processor, dataset, batch_size: int = 32, max_per_category: int | None = None) -> dict:
    """Per category: how many expressions had a swappable word, and the mean IoU between the mask for each and the
    mask for its swapped twin (lower: the model reads the words)."""
    device = next(model.parameters()).device
    model.eval()
    chosen = {category: [] for category in CATEGORIES}
    for index, (category, text) in enumerate(zip(dataset["category"], dataset["expression"])):
        twin = swapped_expression(text) if category in chosen else None
        if twin is not None and (max_per_category is None or len(chosen[category]) < max_per_category):
            chosen[category].append((index, text, twin))
    results = {}
    for category, rows in chosen.items():
        ious = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = [dataset[index]["image"].convert("RGB") for index, _, _ in chunk]
            masks = predict_masks(
                model, processor, images + images, [t for _, t, _ in chunk] + [w for *_, w in chunk], device
            )
            ious += [mask_iou(masks[i], masks[i + len(chunk)]) for i in range(len(chunk))]
        results[category] = {"num_samples": len(ious), "swap_IoU": float(np.mean(ious)) if ious else None}
    return results


def main(argv=None) -> None:
    from modeling_sera import SeraForReferringSegmentation, SeraProcessor
    from sera_training.data_sources import load_examples

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved SERA model folder")
    parser.add_argument("--dataset", default="synthref")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_per_category", type=int)
    parser.add_argument("--output", help="write the results here as JSON")
    args = parser.parse_args(argv)
    model = SeraForReferringSegmentation.from_pretrained(args.model).eval()
    processor = SeraProcessor.from_pretrained(args.model)
    dataset = load_examples(args.dataset, args.split)
    results = word_swap_iou(model, processor, dataset, max_per_category=args.max_per_category)
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
