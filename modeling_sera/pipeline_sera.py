"""The "referring-image-segmentation" pipeline: (image, expression) pairs in, one mask per pair out.

`modeling_sera/__init__.py` registers it with transformers' `PIPELINE_REGISTRY`. `pipe.save_pretrained(folder)` (and
`training/push.py`) also writes this file next to the checkpoint and names it under `custom_pipelines` in config.json,
so that `pipeline("referring-image-segmentation", model=folder_or_repo_id, trust_remote_code=True)` works where this
package is not installed. That makes this file remote code: besides numpy, PIL, torch and transformers it imports only
SERA's own remote-code files (the model's, which `custom_object_save` copies along and a checkpoint holds anyway).
"""

import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import Pipeline
from transformers.dynamic_module_utils import custom_object_save
from transformers.image_utils import load_image as load_image_from_url

from .modeling_sera import MODEL_INPUT_NAMES
from .sera_adapter import ADAPTER_EXPERT_NAMES
from .sera_fusion import FUSION_EXPERT_NAMES


TASK = "referring-image-segmentation"
# What a single image may be; a list or tuple in `image` holds several.
SINGLE_IMAGE_TYPES = (str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor)
IMAGE_TYPE_ERROR = "An image must be a file path, an http(s) URL, a PIL image or a numpy array, got {}."


def load_image(image):
    """The image as the processor takes it: paths and http(s) URLs are opened (EXIF orientation applied, so masks match
    the picture as viewers show it); PIL images, numpy arrays and torch tensors pass through."""
    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(IMAGE_TYPE_ERROR.format(type(image).__name__))
    if str(image).startswith(("http://", "https://")):
        return load_image_from_url(str(image))
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}. Check the path, or pass a PIL image or a numpy array.")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()  # decode now, so that a corrupt file fails here and not deep inside the processor
            return PIL.ImageOps.exif_transpose(opened)
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"Cannot read {path} as an image ({error}). Pass a PNG, JPEG or another file PIL can open."
        ) from error


def _check_image_path(image, index: int) -> None:
    """Fail before any work when a path in a long list of pairs does not exist."""
    is_local_path = isinstance(image, (str, os.PathLike)) and not str(image).startswith(("http://", "https://"))
    if is_local_path and not Path(image).is_file():
        raise FileNotFoundError(
            f"Image file not found: {image} (pair {index}). Check the path, or pass a PIL image or a numpy array."
        )


def _pairs(image, text):
    """Normalize the call forms to one {"image", "text"} dict or a list of them (see the pipeline's docstring)."""
    if text is None:
        if isinstance(image, dict):
            pairs, single = [image], True
        elif isinstance(image, (list, tuple)) and all(isinstance(item, dict) for item in image):
            pairs, single = list(image), False
        else:
            raise ValueError(
                'Give each image its referring expression: pipe(image, "the red circle"), or '
                'pipe([{"image": ..., "text": ...}, ...]).'
            )
    else:
        images_single, texts_single = isinstance(image, SINGLE_IMAGE_TYPES), isinstance(text, str)
        if not (images_single or isinstance(image, (list, tuple))):
            raise TypeError(IMAGE_TYPE_ERROR.format(type(image).__name__))
        if not (texts_single or isinstance(text, (list, tuple))):
            raise TypeError(f"The expressions must be a string or a list of strings, got {type(text).__name__}.")
        images = [image] if images_single else list(image)
        texts = [text] if texts_single else list(text)
        # One image or one expression pairs with every item on the other side.
        if len(images) == 1 and len(texts) > 1:
            images = images * len(texts)
        elif len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(images) != len(texts):
            raise ValueError(
                f"Got {len(images)} images and {len(texts)} expressions; pass one expression per image, or one image "
                "(or one expression) for all."
            )
        pairs = [{"image": item, "text": expression} for item, expression in zip(images, texts)]
        single = images_single and texts_single

    for index, pair in enumerate(pairs):
        if set(pair) != {"image", "text"}:
            raise ValueError(f"Pair {index} must have exactly the keys 'image' and 'text', got {sorted(pair)}.")
        if not isinstance(pair["text"], str) or not pair["text"].strip():
            raise ValueError(f"Pair {index} needs a non-empty referring expression (a string), got {pair['text']!r}.")
        if not isinstance(pair["image"], SINGLE_IMAGE_TYPES):
            raise TypeError(f"Pair {index}: " + IMAGE_TYPE_ERROR.format(type(pair["image"]).__name__))
        _check_image_path(pair["image"], index)
    return pairs[0] if single else pairs


class ReferringImageSegmentationPipeline(Pipeline):
    """
    Segment the object a free-form expression refers to, with SERA or any model whose processor has
    `post_process_referring_segmentation`.

    Call forms (an image is a file path, an http(s) URL, a PIL image, or a numpy array / torch tensor the processor
    takes; any size and mode):

    - `pipe(image, "the red circle")` returns one result;
    - `pipe([{"image": image, "text": "the red circle"}, ...])` returns a list, in order;
    - `pipe([image_1, image_2], ["the dog", "the cat"])`, `pipe(image, ["the dog", "the cat"])` (one image, several
      expressions) and `pipe([image_1, image_2], "the dog")` return lists too.

    Each result is a dict with
    - **mask** (`PIL.Image.Image`, mode "L", the image's original size): 255 on the referred object, 0 elsewhere, as
      in transformers' image-segmentation pipeline; `np.array(result["mask"]) > 0` gives a boolean array;
    - **score** (`float`): the mean foreground probability inside the mask (0 for an empty mask);
    - **router_weights** (only with `return_router_weights=True`): `{"fusion": {expert: weight}, "adapter": {expert:
      weight}}`, SERA-Fusion's routing weights averaged over the fused levels (zero outside the top-K) and
      SERA-Adapter's averaged over the adapted blocks; empty dicts for a stage the model does not use.

    Call parameters: `threshold` (foreground probability, defaults to the processor's `mask_threshold`),
    `return_router_weights`, and the usual `batch_size`. Build it with
    `pipeline("referring-image-segmentation", model=folder_or_repo_id, trust_remote_code=True, device=...)`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None or not hasattr(self.processor, "post_process_referring_segmentation"):
            raise ValueError(
                f"The {TASK} pipeline needs the model's processor (SeraProcessor): save it next to the model with "
                "processor.save_pretrained(model_folder), or pass processor=... ."
            )

    def __call__(self, image, text=None, **kwargs):
        return super().__call__(_pairs(image, text), **kwargs)

    def _sanitize_parameters(self, threshold=None, return_router_weights=None, **kwargs):
        postprocess_params = {}
        if threshold is not None:
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold is a probability between 0 and 1, got {threshold}.")
            postprocess_params["threshold"] = threshold
        if return_router_weights is not None:
            postprocess_params["return_router_weights"] = return_router_weights
        return {}, {}, postprocess_params

    def preprocess(self, pair):
        return self.processor(images=[load_image(pair["image"])], text=[pair["text"]], return_tensors="pt")

    def _forward(self, model_inputs):
        outputs = self.model(**{name: model_inputs[name] for name in MODEL_INPUT_NAMES})
        # Per-level tuples become one (batch, levels, experts) tensor: the pipeline splits batches along dim 0 only.
        return {
            "logits": outputs.logits,
            "original_sizes": model_inputs["original_sizes"],
            "fusion_router_weights": _stack_levels(getattr(outputs, "fusion_router_weights", None)),
            "adapter_router_weights": _stack_levels(getattr(outputs, "adapter_router_weights", None)),
        }

    def postprocess(self, model_outputs, threshold=None, return_router_weights=False):
        prediction = self.processor.post_process_referring_segmentation(
            model_outputs["logits"], target_sizes=model_outputs["original_sizes"], threshold=threshold
        )[0]
        mask = prediction["mask"].cpu().numpy().astype(np.uint8) * 255
        result = {"mask": PIL.Image.fromarray(mask), "score": float(prediction["score"])}
        if return_router_weights:
            result["router_weights"] = {
                "fusion": _mean_weights(model_outputs["fusion_router_weights"], FUSION_EXPERT_NAMES),
                "adapter": _mean_weights(model_outputs["adapter_router_weights"], ADAPTER_EXPERT_NAMES),
            }
        return result

    def save_pretrained(self, save_directory, **kwargs):
        """Save the model, the processor and this pipeline's code, with the pipeline named in config.json, so that
        `pipeline("referring-image-segmentation", model=save_directory, trust_remote_code=True)` rebuilds it without
        this package. `kwargs` go to the model's `save_pretrained`."""
        os.makedirs(save_directory, exist_ok=True)
        self.model.config.custom_pipelines = {
            TASK: {"impl": f"{Path(__file__).stem}.{type(self).__name__}", "pt": ["AutoModel"], "type": "multimodal"}
        }
        custom_object_save(self, save_directory)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


def _stack_levels(weights):
    return torch.stack(weights, dim=1) if weights else None


def _mean_weights(weights, names) -> dict[str, float]:
    if weights is None:
        return {}
    return dict(zip(names, weights[0].float().mean(dim=0).tolist()))


__all__ = ["TASK", "ReferringImageSegmentationPipeline"]
