"""Image processor for SERA: letterbox to a square, normalize, and the exact inverse for the predicted masks.

The letterbox keeps the aspect ratio: the longer side is scaled to the square's side `S`, the shorter side by the
same factor, and the image is centered on a canvas of zeros. Because the zeros are written after normalization,
the padding is the normalization mean, i.e. "no signal" for the backbone. `letterbox_geometry` is the only place
the geometry is computed, so preprocessing and post-processing can never disagree about it.
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack


MIN_IMAGE_SIDE = 2
ACCEPTED_IMAGE_TYPES = (
    "a PIL.Image.Image, a numpy.ndarray (HxW, HxWx1, HxWx3 or HxWx4) or a torch.Tensor (CxHxW or HxWxC), "
    "or a non-empty list of them (file paths and URLs are not accepted: open the image first)"
)
# PIL modes whose pixels are 16-bit unsigned integers.
PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """
    Where an image of `height` x `width` lands inside the `size` x `size` letterbox square.

    The longer side becomes `size`, the shorter side `round(side * size / longer)` (rounded half up, computed in
    integers so that the longer side is exactly `size`), at least 1 pixel. The content is centered; when the free
    space is odd, the extra pixel of padding goes to the bottom / right.

    Args:
        height (`int`): Height of the original image.
        width (`int`): Width of the original image.
        size (`int`): Side of the letterbox square.

    Returns:
        `tuple[int, int, int, int]`: `(new_height, new_width, top, left)`: the size of the resized content and the
        offset of its top-left corner in the square.
    """
    height, width, size = int(height), int(width), int(size)
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"letterbox_geometry needs positive sizes, got height={height}, width={width}, size={size}.")
    longer = max(height, width)
    # round(side * size / longer) half up, exactly, without floating point
    new_height = max(1, (2 * height * size + longer) // (2 * longer))
    new_width = max(1, (2 * width * size + longer) // (2 * longer))
    top = (size - new_height) // 2
    left = (size - new_width) // 2
    return new_height, new_width, top, left


def _integer_range_for(array: np.ndarray, from_pil_mode: str | None) -> float:
    """The value that means "full white" for an integer image, so that it maps to 255."""
    if array.dtype == np.uint8:
        return 255.0
    if array.dtype == np.uint16 or from_pil_mode in PIL_16BIT_MODES:
        return 65535.0
    minimum, maximum = int(array.min()), int(array.max())
    if minimum < 0:
        raise ValueError(f"Integer images must not hold negative values, got a minimum of {minimum}.")
    if from_pil_mode == "I":
        # PIL opens 16-bit PNGs as mode "I" (32-bit container): read it as 16-bit unless values exceed that range.
        return 65535.0 if maximum <= 65535 else float(2**32 - 1)
    if maximum > 255:
        raise ValueError(
            f"Integer images of dtype {array.dtype} are read as 8-bit values (0..255), but the maximum is {maximum}. "
            "Pass uint16 for 16-bit data, or floats in [0, 1]."
        )
    return 255.0


def _to_unit_range(array: np.ndarray, from_pil_mode: str | None = None) -> np.ndarray:
    """Convert integer, boolean or float pixels to float32 in [0, 255]."""
    if array.dtype == np.bool_:
        return array.astype(np.float32) * 255.0
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64) * (255.0 / _integer_range_for(array, from_pil_mode))
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("Float images must not contain NaN or infinite values.")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(
                f"Float images must lie in [0, 1], got values in [{array.min():.4g}, {array.max():.4g}]. "
                "Divide by 255 (or pass uint8) for 8-bit data."
            )
        return array * 255.0
    raise TypeError(f"Unsupported pixel dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1].")


def _pil_to_channels_last(image: PIL.Image.Image) -> tuple[np.ndarray, str | None]:
    """PIL image -> (H, W) or (H, W, C) array, keeping the full bit depth of 16/32-bit grayscale."""
    mode = image.mode
    if mode in PIL_16BIT_MODES or mode in ("I", "F"):
        # PIL's own convert("RGB") clips these to 0..255; keep the raw values and scale them ourselves.
        return np.asarray(image), mode
    if mode == "1":
        return np.asarray(image.convert("L")), None
    if mode in ("L", "RGB"):
        return np.asarray(image), None
    if mode == "P" and "transparency" in image.info:
        # go through RGBA so that PIL does not warn; the alpha band is dropped below like any other
        return np.asarray(image.convert("RGBA"))[..., :3], None
    # LA, RGBA, RGBa, RGBX, P, CMYK, YCbCr, ...: PIL knows the colour conversion; alpha is dropped, not composited
    return np.asarray(image.convert("RGB")), None


class SeraImageProcessorKwargs(ImagesKwargs, total=False):
    """
    mask_threshold (`float`, *optional*, defaults to 0.35):
        Probability above which a pixel belongs to the predicted mask in `post_process_referring_segmentation`.
    sigmoid_before_resize (`bool`, *optional*, defaults to `True`):
        Whether `post_process_referring_segmentation` turns logits into probabilities before resizing them.
    """

    mask_threshold: float | None
    sigmoid_before_resize: bool | None


class SeraImageProcessor(PilBackend):
    r"""
    Prepares images (and, for training, ground-truth masks) for SERA and turns the predicted mask logits back into
    masks at the original image size.

    Every image is letterboxed into a `size` square: resized without distortion so that its longer side fills the
    square, centered, and padded with zeros after normalization (the mean colour). Nothing is cropped.

    Accepted images: PIL images of any mode (alpha is dropped, not composited; 16-bit and 32-bit grayscale are
    scaled to 0..255, not clipped), numpy arrays (HxW, HxWx1, HxWx3, HxWx4 of uint8, uint16, bool or float in
    [0, 1]), torch tensors (CxHxW or HxWxC, same dtypes). File paths and URLs are not accepted.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 448, "width": 448}`):
            The letterbox square; height and width must be equal.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Filter used to resize images (masks are always resized bilinearly).
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to scale pixel values by `rescale_factor` (1/255: 8-bit range to [0, 1]).
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalize with `image_mean` and `image_std` (ImageNet's, as DINOv2 was trained with).
        mask_threshold (`float`, *optional*, defaults to 0.35):
            Default probability threshold of `post_process_referring_segmentation`.
        sigmoid_before_resize (`bool`, *optional*, defaults to `True`):
            Whether the sigmoid comes before the resizing of `post_process_referring_segmentation` (DETRIS: the
            probabilities are upsampled, so the result stays inside [0, 1] and a sharp logit edge cannot overshoot),
            or after it (`False`: resized logits, this package's behaviour up to 0.1.0).
    """

    valid_kwargs = SeraImageProcessorKwargs
    model_input_names = ["pixel_values"]

    size = {"height": 448, "width": 448}
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    mask_threshold = 0.35
    sigmoid_before_resize = True

    def __init__(self, **kwargs: Unpack[SeraImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._check_letterbox_settings(
            size=self.size,
            do_resize=self.do_resize,
            do_center_crop=self.do_center_crop,
            do_pad=self.do_pad,
        )
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold={self.mask_threshold} must lie strictly between 0 and 1.")

    @staticmethod
    def _check_letterbox_settings(size=None, do_resize=None, do_center_crop=None, do_pad=None, **kwargs):
        if size is None or size.height is None or size.height != size.width:
            raise ValueError(f"SeraImageProcessor letterboxes into a square: size needs height == width, got {size}.")
        # The letterbox always resizes and pads and never crops; accepting these flags would silently do nothing.
        for name, value in (("do_resize", do_resize), ("do_pad", do_pad)):
            if value is False:
                raise ValueError(f"SeraImageProcessor always letterboxes; {name}=False is not supported.")
        if do_center_crop:
            raise ValueError("SeraImageProcessor never crops; do_center_crop=True is not supported.")

    def _validate_preprocess_kwargs(self, **kwargs):
        self._check_letterbox_settings(**kwargs)
        super()._validate_preprocess_kwargs(**kwargs)

    def preprocess(self, images, masks=None, **kwargs: Unpack[SeraImageProcessorKwargs]) -> BatchFeature:
        r"""
        Letterbox and normalize one image or a list of images.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images. See the class docstring for the accepted kinds.
            masks (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                One ground-truth mask per image, at the image's size; values `> 0` are foreground. Returned as
                `labels`, letterboxed exactly like the images.

        Returns:
            [`BatchFeature`] with
            - **pixel_values** (`(batch, 3, S, S)` float32): the normalized letterboxed images.
            - **original_sizes** (`(batch, 2)` int64): `[height, width]` of each input image.
            - **letterbox_sizes** (`(batch, 2)` int64): `[height, width]` of the resized content in the square.
            - **letterbox_offsets** (`(batch, 2)` int64): `[top, left]` of the content in the square.
            - **labels** (`(batch, S, S)` float32, only with `masks`): soft masks in [0, 1], padding 0.
        """
        return super().preprocess(images, masks, **kwargs)

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        # Unlike the base class, never fetch strings as paths or URLs: a string here is a user error.
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("Got an empty list of images; pass at least one image.")
            return list(images)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)  # a stacked batch
        return [images]

    def process_image(self, image, input_data_format: str | ChannelDimension | None = None, **kwargs) -> np.ndarray:
        """
        Convert one raw image into a channels-first `(3, H, W)` float32 array with values in [0, 255].

        Raises `TypeError` for objects that are not images and `ValueError` for images with an unusable layout or
        smaller than 2 pixels on a side.
        """
        pil_mode = None
        if isinstance(image, PIL.Image.Image):
            array, pil_mode = _pil_to_channels_last(image)
            channel_dim = ChannelDimension.LAST
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            is_tensor = isinstance(image, torch.Tensor)
            if is_tensor:
                # numpy has no bfloat16; half precision gains nothing here either
                image = image.detach().cpu()
                array = (image.float() if image.is_floating_point() else image).numpy()
            else:
                array = image
            channel_dim = self._infer_channel_dim(array, input_data_format, prefer_first=is_tensor)
        else:
            raise TypeError(
                f"Expected an image, got an object of type {type(image).__name__}. Accepted: {ACCEPTED_IMAGE_TYPES}."
            )

        if array.ndim == 3:
            array = np.moveaxis(array, 0, -1) if channel_dim == ChannelDimension.FIRST else array
        else:
            array = array[..., None]
        height, width, channels = array.shape
        if min(height, width) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"Image of size {height}x{width} (HxW) is too small: each side needs at least {MIN_IMAGE_SIDE} pixels."
            )
        array = _to_unit_range(array, pil_mode)
        if channels == 1:
            array = np.repeat(array, 3, axis=-1)
        # a 4th channel is alpha: dropped, like PIL's convert("RGB") does
        return np.ascontiguousarray(np.moveaxis(array[..., :3], -1, 0), dtype=np.float32)

    @staticmethod
    def _infer_channel_dim(array: np.ndarray, input_data_format, prefer_first: bool) -> ChannelDimension | None:
        """Which axis holds the channels of a 2-D or 3-D array (None for a 2-D grayscale array)."""
        if array.ndim == 2:
            return None
        if array.ndim != 3:
            raise ValueError(f"Expected a 2-D or 3-D image array, got shape {tuple(array.shape)}.")
        if input_data_format is not None:
            channel_dim = ChannelDimension(input_data_format)
        else:
            first_ok, last_ok = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
            if first_ok and (prefer_first or not last_ok):
                channel_dim = ChannelDimension.FIRST
            elif last_ok:
                channel_dim = ChannelDimension.LAST
            else:
                channel_dim = None
        num_channels = array.shape[0 if channel_dim == ChannelDimension.FIRST else -1]
        if channel_dim is None or num_channels not in (1, 3, 4):
            raise ValueError(
                f"Cannot read an image of shape {tuple(array.shape)}: expected 1, 3 or 4 channels "
                "(HxWxC for numpy arrays, CxHxW or HxWxC for torch tensors)."
            )
        return channel_dim

    @staticmethod
    def _prepare_mask(mask) -> np.ndarray:
        """Convert one ground-truth mask into a `(H, W)` float32 array of 0 and 1 (`> 0` is foreground)."""
        if isinstance(mask, PIL.Image.Image):
            array = np.asarray(mask)
        elif isinstance(mask, torch.Tensor):
            array = mask.detach().cpu().numpy()
        elif isinstance(mask, np.ndarray):
            array = mask
        else:
            raise TypeError(
                f"Expected a mask (PIL image of mode L or 1, numpy array or torch tensor), got {type(mask).__name__}."
            )
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        if array.ndim != 2:
            raise ValueError(f"A mask must have a single channel, got shape {tuple(array.shape)}.")
        return (array > 0).astype(np.float32)

    def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
        """
        Resize a channels-first float array to `size` (`(height, width)`) with PIL, channel by channel.

        Working in PIL's 32-bit float mode keeps the full precision of the input (no rounding to 8 bits) and uses
        PIL's antialiased filters when shrinking.
        """
        height, width = size
        resample = PILImageResampling.BILINEAR if resample is None else resample
        channels = [
            np.asarray(PIL.Image.fromarray(channel.astype(np.float32)).resize((width, height), resample=resample))
            for channel in image
        ]
        return np.stack(channels).astype(np.float32)

    def _preprocess_image_like_inputs(self, images, masks=None, **kwargs) -> BatchFeature:
        images = self._prepare_image_like_inputs(images, **kwargs)
        if masks is not None:
            masks = list(masks) if isinstance(masks, (list, tuple)) else self._prepare_images_structure(masks)
            if len(masks) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(masks)} masks; pass one mask per image.")
            masks = [self._prepare_mask(mask) for mask in masks]
            for index, (image, mask) in enumerate(zip(images, masks)):
                if mask.shape != image.shape[1:]:
                    raise ValueError(
                        f"Mask {index} has size {mask.shape[0]}x{mask.shape[1]} (HxW) but its image has size "
                        f"{image.shape[1]}x{image.shape[2]}; masks must be at the image's original size."
                    )
        return self._preprocess(images, masks=masks, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        masks: list[np.ndarray] | None = None,
        size=None,
        resample=None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=None,
        image_std=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        side = size.height
        pixel_values, labels, original_sizes, letterbox_sizes, letterbox_offsets = [], [], [], [], []
        for index, image in enumerate(images):
            height, width = image.shape[1:]
            new_height, new_width, top, left = letterbox_geometry(height, width, side)
            content = self.resize(image, (new_height, new_width), resample=resample)
            if do_rescale:
                content = self.rescale(content, rescale_factor)
            if do_normalize:
                content = self.normalize(content, image_mean, image_std)
            # zeros after normalization: the padding is the mean colour
            canvas = np.zeros((3, side, side), dtype=np.float32)
            canvas[:, top : top + new_height, left : left + new_width] = content
            pixel_values.append(canvas)

            if masks is not None:
                soft_mask = self.resize(masks[index][None], (new_height, new_width), PILImageResampling.BILINEAR)[0]
                label = np.zeros((side, side), dtype=np.float32)
                label[top : top + new_height, left : left + new_width] = np.clip(soft_mask, 0.0, 1.0)
                labels.append(label)

            original_sizes.append((height, width))
            letterbox_sizes.append((new_height, new_width))
            letterbox_offsets.append((top, left))

        data = {
            "pixel_values": np.stack(pixel_values).astype(np.float32),
            "original_sizes": np.array(original_sizes, dtype=np.int64),
            "letterbox_sizes": np.array(letterbox_sizes, dtype=np.int64),
            "letterbox_offsets": np.array(letterbox_offsets, dtype=np.int64),
        }
        if masks is not None:
            data["labels"] = np.stack(labels).astype(np.float32)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_referring_segmentation(self, outputs, target_sizes, threshold: float | None = None) -> list[dict]:
        """
        Turn SERA's low-resolution mask logits into one binary mask per sample at its original image size.

        For each sample the logits, which cover the whole letterbox square, are upsampled bilinearly to the square's
        side, the letterbox content is cut out (so the padding can never leak into the mask), resized bilinearly to
        the original size and thresholded. The sigmoid comes first (DETRIS), or after the resizing with
        `sigmoid_before_resize=False`.

        Args:
            outputs (model output, `dict` or `torch.Tensor`):
                Anything with `logits` of shape `(batch, 1, h, w)` (or `(batch, h, w)`), or those logits directly.
            target_sizes (`torch.Tensor` of shape `(batch, 2)` or a list of `(height, width)`):
                The original size of each image, e.g. the processor's `original_sizes`.
            threshold (`float`, *optional*):
                Probability above which a pixel is foreground; defaults to `self.mask_threshold`.

        Returns:
            `list[dict]`, one per sample, with
            - **mask** (`torch.BoolTensor` of shape `(height, width)`): the predicted mask.
            - **score** (`torch.Tensor`, scalar): mean probability inside the mask, 0 when the mask is empty.
            - **probabilities** (`torch.Tensor` of shape `(height, width)`): the foreground probability.
        """
        threshold = self.mask_threshold if threshold is None else threshold
        logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
        if logits is None:
            logits = outputs["logits"]
        if logits.ndim == 3:
            logits = logits[:, None]
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"Expected mask logits of shape (batch, 1, h, w), got {tuple(logits.shape)}.")
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if len(target_sizes) != len(logits):
            raise ValueError(
                f"Got {len(logits)} predicted masks but {len(target_sizes)} target sizes; pass one size per sample."
            )

        side = self.size.height
        results = []
        for sample_logits, (height, width) in zip(logits, target_sizes):
            sample_logits = sample_logits[None].detach().float()  # results are data, not part of a graph
            if self.sigmoid_before_resize:
                sample_logits = sample_logits.sigmoid()  # from here on these are probabilities
            if sample_logits.shape[-2:] != (side, side):
                sample_logits = F.interpolate(sample_logits, size=(side, side), mode="bilinear", align_corners=False)
            new_height, new_width, top, left = letterbox_geometry(height, width, side)
            content = sample_logits[..., top : top + new_height, left : left + new_width]
            content = F.interpolate(
                content, size=(int(height), int(width)), mode="bilinear", align_corners=False, antialias=True
            )
            probabilities = content[0, 0] if self.sigmoid_before_resize else content[0, 0].sigmoid()
            mask = probabilities > threshold
            score = probabilities[mask].mean() if mask.any() else probabilities.new_zeros(())
            results.append({"mask": mask, "score": score, "probabilities": probabilities})
        return results


__all__ = ["SeraImageProcessor", "letterbox_geometry"]
