"""Processor for SERA: one call prepares images (letterbox) and referring expressions (fixed-length tokens)."""

import numpy as np
from transformers import AutoTokenizer
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_processing_sera import SeraImageProcessor


logger = logging.get_logger(__name__)


def check_processor_fits(config, image_size: int, max_text_length: int) -> None:
    """Raise a one-line `ValueError` when a processor of these sizes makes inputs the model of `config` cannot take:
    the letterbox side must be a multiple of the vision patch size, the expression no longer than the text tower's
    position table. The sizes live in the processor and the architecture in the config; this is where they meet."""
    patch = config.vision_patch_size
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the vision patch size {patch}.")
    positions = config.text_config.max_position_embeddings
    if max_text_length > positions:
        raise ValueError(
            f"max_text_length={max_text_length} exceeds the text tower's max_position_embeddings={positions}."
        )


class SeraProcessor(ProcessorMixin):
    r"""
    Wraps a [`SeraImageProcessor`] and a CLIP tokenizer into a single processor.

    Expressions are always tokenized to exactly `max_text_length` tokens (padded with the tokenizer's pad token,
    `<|endoftext|>` for CLIP; truncated with a warning), as the text tower and the word masks of SERA expect.

    Args:
        image_processor ([`SeraImageProcessor`]):
            Letterboxes and normalizes the images.
        tokenizer ([`CLIPTokenizer`]):
            Tokenizes the referring expressions.
        max_text_length (`int`, *optional*, defaults to 17):
            Number of tokens per expression, `<|startoftext|>` and `<|endoftext|>` included (17 for RefCOCO and
            RefCOCO+, 22 for RefCOCOg in the paper).
        mask_threshold (`float`, *optional*):
            Probability threshold used by [`~SeraProcessor.post_process_referring_segmentation`]. It has one home, the
            image processor's `mask_threshold` (which `processor.mask_threshold` reads and writes); given here it
            replaces the image processor's, as a processor_config.json written before 0.2 (which held both) needs.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_text_length: int = 17,
        mask_threshold: float | None = None,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, **kwargs)
        if max_text_length < 3:
            raise ValueError(f"max_text_length={max_text_length} leaves no room for words between the special tokens.")
        self.max_text_length = max_text_length
        if mask_threshold is not None:
            self.mask_threshold = mask_threshold

    @property
    def mask_threshold(self) -> float:
        """The image processor's `mask_threshold`: the one place the post-processing threshold lives."""
        return self.image_processor.mask_threshold

    @mask_threshold.setter
    def mask_threshold(self, value: float) -> None:
        self.image_processor.mask_threshold = value

    @property
    def image_size(self) -> int:
        """Side of the square letterbox: a view on the image processor's `size`, where it lives."""
        size = self.image_processor.size
        return size["height"] if isinstance(size, dict) else size.height

    def check_fits(self, config) -> None:
        """Raise a one-line `ValueError` when this processor's inputs do not fit the model of `config` (a
        [`SeraConfig`]); see `check_processor_fits`."""
        check_processor_fits(config, self.image_size, self.max_text_length)

    @classmethod
    def from_encoders(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        image_size: int = 448,
        max_text_length: int = 17,
        mask_threshold: float = 0.35,
    ) -> "SeraProcessor":
        """The processor matching a pair of pretrained encoders: the vision model's normalisation (from its
        preprocessor config, ImageNet statistics if it has none) and the text model's tokenizer."""
        from transformers.image_processing_base import ImageProcessingMixin

        normalisation = {}
        try:
            image_processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(vision_model_name_or_path)
            normalisation = {
                key: image_processor_dict[key] for key in ("image_mean", "image_std") if key in image_processor_dict
            }
        except OSError:
            logger.warning(
                f"{vision_model_name_or_path} has no preprocessor config; using ImageNet normalisation as DINOv2 does."
            )
        image_processor = SeraImageProcessor(
            size={"height": image_size, "width": image_size}, mask_threshold=mask_threshold, **normalisation
        )
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
        return cls(image_processor, tokenizer, max_text_length=max_text_length)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor class is known, so load it directly rather than through AutoImageProcessor, which
        # only finds a custom class once it is registered or trusted as remote code.
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        processor_dict = processor_dict or {}
        if isinstance(processor_dict.get("image_processor"), dict):
            image_processor = SeraImageProcessor.from_dict(processor_dict["image_processor"])
        else:
            image_processor = SeraImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        # A checkpoint folder also holds SERA's config.json (with an auto_map); passing the caller's trust setting on
        # keeps AutoTokenizer from asking about remote code it does not need.
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs
        )
        return [image_processor, tokenizer]

    def __call__(self, images=None, text=None, masks=None, return_tensors="pt", **kwargs) -> BatchFeature:
        r"""
        Prepare images, referring expressions and (for training) ground-truth masks.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                The images, one per expression. See [`SeraImageProcessor`] for the accepted kinds.
            text (`str` or `list[str]`, *optional*):
                The referring expressions, one per image.
            masks (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Ground-truth masks at the images' original sizes (`> 0` is foreground); returned as `labels`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors, `"np"` for numpy arrays.
            kwargs:
                Overrides for the image processor's settings (e.g. `size`).

        Returns:
            [`BatchFeature`] with `pixel_values`, `original_sizes`, `letterbox_sizes`, `letterbox_offsets` (when
            `images` is given), `input_ids`, `attention_mask` (when `text` is given) and `labels` (when `masks` is
            given); every entry has the same batch size.
        """
        if images is None and text is None:
            raise ValueError("SeraProcessor needs `images`, `text` or both.")
        if masks is not None and images is None:
            raise ValueError("`masks` were given without `images`; masks are letterboxed with their images.")

        data = {}
        if text is not None:
            expressions = self._check_expressions(text)
            data.update(self._tokenize(expressions))
        if images is not None:
            data.update(self.image_processor(images, masks=masks, **kwargs))
            num_images = len(data["pixel_values"])
            if text is not None and num_images != len(expressions):
                raise ValueError(
                    f"Got {num_images} images but {len(expressions)} expressions; pass one expression per image."
                )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _check_expressions(text) -> list[str]:
        if isinstance(text, str):
            text = [text]
        elif not isinstance(text, (list, tuple)):
            raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        if len(text) == 0:
            raise ValueError("Got an empty list of expressions; pass at least one.")
        for index, expression in enumerate(text):
            if not isinstance(expression, str):
                raise TypeError(f"Expression {index} must be a string, got {type(expression).__name__}.")
            if not expression.strip():
                raise ValueError(f"Expression {index} is empty; every image needs a referring expression.")
        return list(text)

    def _tokenize(self, expressions: list[str]) -> dict[str, np.ndarray]:
        full_lengths = [len(ids) for ids in self.tokenizer(expressions)["input_ids"]]
        for index, (expression, length) in enumerate(zip(expressions, full_lengths)):
            if length > self.max_text_length:
                logger.warning(
                    f"Expression {index} ({expression!r}) has {length} tokens (special tokens included), more than "
                    f"max_text_length={self.max_text_length}; the tokens past the limit are dropped."
                )
        encoding = self.tokenizer(
            expressions,
            padding="max_length",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="np",
        )
        return {"input_ids": encoding["input_ids"].astype(np.int64), "attention_mask": encoding["attention_mask"]}

    def post_process_referring_segmentation(self, outputs, target_sizes, threshold: float | None = None) -> list[dict]:
        """
        Masks at the original image sizes from SERA's mask logits; see
        [`SeraImageProcessor.post_process_referring_segmentation`]. `threshold` defaults to `self.mask_threshold`.
        """
        return self.image_processor.post_process_referring_segmentation(outputs, target_sizes, threshold=threshold)


__all__ = ["SeraProcessor", "check_processor_fits"]
