"""The word-swap check of #12: the twin of an expression names the opposite place, and the IoU is computed."""

import torch

from sera_training.word_swap import swapped_expression, word_swap_iou


def test_spatial_words_are_swapped_for_their_opposites_and_others_are_kept():
    assert swapped_expression("the circle on the left") == "the circle on the right"
    assert swapped_expression("the red square in the top left corner") == "the red square in the bottom right corner"
    assert swapped_expression("the star above the green circle") == "the star below the green circle"
    assert swapped_expression("the biggest blue shape") == "the smallest blue shape"
    assert swapped_expression("the lowest hexagon") == "the topmost hexagon"
    assert swapped_expression("the striped star next to the circle") is None
    assert swapped_expression("the bright triangle") is None  # "right" only as a whole word


class _MaskFromText(torch.nn.Module):
    """Predicts the left half for expressions with "left", the right half otherwise: it reads the words."""

    def __init__(self, reads_words: bool):
        super().__init__()
        self.reads_words = reads_words
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, input_ids, attention_mask):
        logits = torch.full((len(input_ids), 1, 4, 4), -10.0)
        for row, ids in enumerate(input_ids):
            side = slice(0, 2) if (ids[0] == 1 or not self.reads_words) else slice(2, 4)
            logits[row, 0, :, side] = 10.0
        return type("Out", (), {"logits": logits})()


class _Processor:
    def __call__(self, images, text, return_tensors):
        ids = torch.tensor([[1 if " left" in t else 2] for t in text])
        return {
            "pixel_values": torch.zeros(len(text), 3, 4, 4),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "original_sizes": [(4, 4)] * len(text),
        }

    def post_process_referring_segmentation(self, outputs, target_sizes):
        return [{"mask": logits[0] > 0} for logits in outputs.logits]


def test_a_model_that_reads_the_word_moves_its_mask_and_one_that_does_not_keeps_it():
    from PIL import Image

    dataset = {
        "category": ["location", "location", "attribute"],
        "expression": ["the circle on the left", "the square on the left", "the red circle"],
    }
    rows = [{"image": Image.new("RGB", (4, 4))} for _ in range(3)]
    table = type("Rows", (), {"__getitem__": lambda self, key: dataset[key] if isinstance(key, str) else rows[key]})()
    reading = word_swap_iou(_MaskFromText(True), _Processor(), table)
    ignoring = word_swap_iou(_MaskFromText(False), _Processor(), table)
    assert reading["location"] == {"num_samples": 2, "swap_IoU": 0.0}
    assert ignoring["location"] == {"num_samples": 2, "swap_IoU": 1.0}
    assert reading["relation"] == {"num_samples": 0, "swap_IoU": None}
