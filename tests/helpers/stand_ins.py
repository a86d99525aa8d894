"""A stand-in model and processor with SERA's interface and a rule that is trivial to predict: the model's mask logits
are the red channel, so the predicted mask of every image is exactly where the image is red; and a dataset of
rectangles whose expected scores follow from the boxes (used by the evaluation and gallery tests)."""

import datasets
import numpy as np
import torch
from PIL import Image

from sera_training.data_schema import EXAMPLE_FEATURES


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
