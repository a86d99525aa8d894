"""Turning rows of the shared example schema into SERA training batches.

One place does the letterbox and the tokenisation for training: :class:`ReferringSegmentationCollator` hands a list
of rows (``data_schema.EXAMPLE_FEATURES``) to ``SeraProcessor`` and returns the model's inputs plus ``labels`` (the
letterboxed masks) and ``sample_ids`` (the rows' ``sentence_id``, which the training loop takes out before the
forward pass).

Horizontal flips are off by default, as in the paper: flipping an image turns "the dog on the left" into a wrong
expression. With ``horizontal_flip_probability > 0`` the collator flips image and mask together and swaps the
left/right words of the expression (:func:`swap_left_right`), so the pair stays correct. Whether a row is flipped
depends only on ``(seed, epoch, sentence_id)``, never on a global random state, so flips neither change nor depend on
the random numbers the model draws, and a resumed run flips exactly as an uninterrupted one.
"""

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


# The columns the collator reads; the training script keeps only these.
COLLATOR_COLUMNS = ("image", "mask", "expression", "sentence_id")
MODEL_INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "labels")

_LEFT_RIGHT = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_LEFT_RIGHT_PATTERN = re.compile(r"\b(" + "|".join(sorted(_LEFT_RIGHT, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def swap_left_right(expression: str) -> str:
    """The expression for the mirrored image: "left" <-> "right", "leftmost" <-> "rightmost" (case kept)."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        swapped = _LEFT_RIGHT[word.lower()]
        if word.isupper():
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped

    return _LEFT_RIGHT_PATTERN.sub(swap, expression)


def flip_decision(seed: int, epoch: int, sample_id: int, probability: float) -> bool:
    """Whether sample ``sample_id`` is flipped in ``epoch``: a pure function of its arguments."""
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < probability


class ReferringSegmentationCollator:
    """Collate rows of the example schema into ``pixel_values``, ``input_ids``, ``attention_mask``, ``labels`` and
    ``sample_ids`` (all torch tensors).

    Args:
        processor: a ``SeraProcessor`` (letterbox, normalisation and fixed-length tokenisation).
        horizontal_flip_probability: chance that a row is mirrored (image, mask and left/right words); 0 = never.
        seed: seed of the flip decisions.
    """

    def __init__(self, processor, horizontal_flip_probability: float = 0.0, seed: int = 0):
        if not 0.0 <= horizontal_flip_probability <= 1.0:
            raise ValueError(f"horizontal_flip_probability must be in [0, 1], got {horizontal_flip_probability}.")
        self.processor = processor
        self.horizontal_flip_probability = horizontal_flip_probability
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Flip decisions change from epoch to epoch; the training loop calls this before each epoch."""
        self.epoch = epoch

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        images, masks, expressions, sample_ids = [], [], [], []
        for row in rows:
            image = row["image"].convert("RGB")  # some COCO images are greyscale
            mask = row["mask"]
            expression = row["expression"]
            sample_id = int(row["sentence_id"])
            if flip_decision(self.seed, self.epoch, sample_id, self.horizontal_flip_probability):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                expression = swap_left_right(expression)
            images.append(image)
            masks.append(np.asarray(mask) > 0)
            expressions.append(expression)
            sample_ids.append(sample_id)
        inputs = self.processor(images=images, text=expressions, masks=masks, return_tensors="pt")
        batch = {name: inputs[name] for name in MODEL_INPUT_NAMES}
        batch["sample_ids"] = torch.tensor(sample_ids, dtype=torch.long)
        return batch


__all__ = [
    "COLLATOR_COLUMNS",
    "MODEL_INPUT_NAMES",
    "ReferringSegmentationCollator",
    "flip_decision",
    "swap_left_right",
]
