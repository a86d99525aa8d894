"""`sera-predict`: segment what an expression refers to in one image, and draw the result.

    sera-predict IMAGE "the dog on the left" --model MODEL_DIR_OR_REPO_ID [--revision REV] [--out mask.png]
        [--device auto|cpu|cuda|cuda:N] [--threshold 0.35]

Writes the mask (a PNG at the image's size: 255 on the object, 0 elsewhere) and an overlay picture (the mask tinted
over the image with its outline, next to the expression, the score and the experts' routing weights as bar charts),
then prints where it wrote them. Bad input ends with a one-line error that says what to do.

`--model` is a folder written by `save_pretrained` or a Hub repo id (`--revision`: a branch, tag or commit of it).
:func:`load_segmenter` loads it through `transformers.pipeline(...)` with this package's classes, so a folder works
with or without the remote-code files next to its weights and no code from a Hub repo is run. `training/evaluate.py`
and `demo/app.py` load their models with the same function.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from .configuration_sera import SeraConfig
from .image_processing_sera import MIN_IMAGE_SIDE
from .pipeline_sera import TASK, ReferringImageSegmentationPipeline, load_image


PROG = "sera-predict"
TINT = (0, 150, 255)
OUTLINE = (255, 215, 0)
TINT_OPACITY = 0.45
# The overlay's longer image side: small images are enlarged to stay legible, large ones shrunk to stay light.
MIN_DISPLAY_SIDE, MAX_DISPLAY_SIDE = 384, 1024
PANEL_WIDTH, MARGIN, LINE_HEIGHT, BAR_HEIGHT = 320, 14, 20, 14


def fail(message: str):
    raise SystemExit(f"{PROG}: error: {message}")


class ModelSourceError(ValueError):
    """A model folder or Hub repo id that cannot be loaded; the message is one line that says what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment the object a referring expression describes, with a saved SERA model.",
    )
    parser.add_argument("image", help="the image file (any format PIL reads)")
    parser.add_argument("expression", help='what to segment, e.g. "the dog on the left"')
    parser.add_argument(
        "--model",
        required=True,
        help="a folder written by save_pretrained (model and processor) or a Hub repo id such as org/sera-refcoco",
    )
    parser.add_argument("--revision", help="with a Hub repo id: the branch, tag or commit to load (default: main)")
    parser.add_argument(
        "--out",
        help="where to write the mask PNG (default: IMAGE_NAME.mask.png in the current folder); the overlay "
        "goes next to it as NAME.overlay.png",
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threshold", type=float, help="foreground probability (default: the processor's, 0.35)")
    return parser.parse_args(argv)


def check_model_folder(folder: Path) -> None:
    """Fail early, in one line (ModelSourceError), on what from_pretrained would report in a long traceback."""
    if not folder.is_dir():
        raise ModelSourceError(f"model folder not found: {folder}. Pass a folder written by save_pretrained.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(
            f"{folder} has no config.json, so it is not a saved model. Pass a folder written by save_pretrained."
        )
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != SeraConfig.model_type:
        raise ModelSourceError(
            f"{folder} holds a {model_type!r} model, not SERA. Pass a folder written by SERA's save_pretrained."
        )
    if not (folder / "processor_config.json").is_file():
        raise ModelSourceError(
            f"{folder} has no processor_config.json: save the processor next to the model with "
            f"processor.save_pretrained('{folder}')."
        )


def check_model_source(model: str, revision: str | None = None, inspect_folder: bool = True) -> None:
    """The checks that cost nothing: an existing folder must hold a saved SERA and its processor (unless not
    ``inspect_folder``); anything else must be a valid Hub repo id (``org/name``). Raises ModelSourceError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(model).is_dir():
        if revision is not None:
            raise ModelSourceError(f"--revision {revision} is for a Hub repo id, but {model} is a local folder.")
        if inspect_folder:
            check_model_folder(Path(model))
        return
    try:
        validate_repo_id(str(model))
    except HFValidationError:
        raise ModelSourceError(
            f"model folder not found: {model}. Pass a folder written by save_pretrained or a Hub repo id (org/name)."
        ) from None


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_segmenter(model, revision: str | None = None, device=None) -> ReferringImageSegmentationPipeline:
    """The "referring-image-segmentation" pipeline for a saved SERA folder or a Hub repo id, built by
    `transformers.pipeline(...)` with this package's classes (no remote code is run). `pipe.model` and
    `pipe.processor` are the loaded model and processor. Raises ModelSourceError, whose message is one line."""
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoConfig, pipeline

    model = str(model)
    check_model_source(model, revision)
    where = model if revision is None else f"{model} at revision {revision}"
    is_local = Path(model).is_dir()
    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError, HfHubHTTPError) as error:
        if is_local:
            raise ModelSourceError(f"cannot read the config of {where}: {_one_line(error)}") from error
        raise ModelSourceError(
            f"cannot load {where}: it is not a local folder, and the Hub gave no SERA model for it "
            f"({_one_line(error)}). Check the repo id and --revision, log in with `hf auth login` for a private "
            "repo, or pass a folder written by save_pretrained."
        ) from error
    if config.model_type != SeraConfig.model_type:
        raise ModelSourceError(f"{where} holds a {config.model_type!r} model, not SERA.")
    try:
        return pipeline(
            TASK,
            model=model,
            config=config,
            revision=revision,
            device=device,
            pipeline_class=ReferringImageSegmentationPipeline,
            trust_remote_code=False,  # this package's classes are registered: nothing from the repo is executed
        )
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise ModelSourceError(f"cannot load {where}: {_one_line(error)}") from error


def resolve_device(device: str | torch.device | None, model: torch.nn.Module | None = None) -> torch.device:
    """`None`: where `model` already is (the CPU without one); `"auto"`: a GPU when torch sees one; anything else as
    torch reads it. Raises `ValueError` for a device torch does not know, or a GPU it does not see."""
    if device is None:
        parameter = next(model.parameters(), None) if model is not None else None
        return parameter.device if parameter is not None else torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asks for a GPU, but torch sees none: use cpu.")
    return resolved


def output_paths(image_path: Path, out: str | None) -> tuple[Path, Path]:
    mask_path = Path(out) if out else Path(f"{image_path.stem}.mask.png")
    if mask_path.suffix.lower() != ".png":
        fail(f"--out {out} must end in .png: the mask is written losslessly.")
    stem = mask_path.name[: -len(".mask.png")] if mask_path.name.endswith(".mask.png") else mask_path.stem
    return mask_path, mask_path.with_name(f"{stem}.overlay.png")


def displayable(image: Image.Image) -> Image.Image:
    """An RGB copy for drawing; 16-bit and float images are stretched to 8 bits rather than clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        values = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(values.astype(np.uint8))
    return image.convert("RGB")


def load_font(size: int):
    """Pillow's default font at ``size`` points (the fixed bitmap font where Pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # a Pillow without FreeType has only the fixed bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, font, width: int, draw: ImageDraw.ImageDraw, max_lines: int | None = None) -> list[str]:
    """Word-wrapped lines of at most ``width`` pixels; with ``max_lines``, the last kept line ends in "..." when the
    text does not fit."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines += [line] if line else []
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def draw_overlay(image: Image.Image, mask: Image.Image, expression: str, score: float, router_weights: dict):
    """The image with the mask tinted over it and outlined, and a side panel with the expression, the score and the
    experts' routing weights (SERA-Fusion averaged over levels, SERA-Adapter over blocks) as bar charts."""
    image = displayable(image)
    long_side = max(image.size)
    scale = min(max(long_side, MIN_DISPLAY_SIDE), MAX_DISPLAY_SIDE) / long_side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    mask = mask.resize(size, Image.Resampling.NEAREST)

    tinted = Image.blend(image, Image.new("RGB", size, TINT), TINT_OPACITY)
    picture = Image.composite(tinted, image, mask)
    outline = ImageChops.difference(mask.filter(ImageFilter.MaxFilter(3)), mask.filter(ImageFilter.MinFilter(3)))
    picture.paste(OUTLINE, mask=outline)

    font, small = load_font(15), load_font(13)
    measure = ImageDraw.Draw(picture)
    text_width = PANEL_WIDTH - 2 * MARGIN
    expression_lines = wrap_text(f'"{expression}"', font, text_width, measure)
    area = np.asarray(mask).astype(bool).mean() * 100
    sections = [
        (title, weights)
        for title, weights in (
            ("SERA-Fusion experts (mean over levels)", router_weights.get("fusion", {})),
            ("SERA-Adapter experts (mean over blocks)", router_weights.get("adapter", {})),
        )
        if weights
    ]
    panel_height = MARGIN * 2 + LINE_HEIGHT * (len(expression_lines) + 2)
    panel_height += sum(LINE_HEIGHT * (len(weights) + 2) for _, weights in sections)

    canvas = Image.new("RGB", (picture.width + PANEL_WIDTH, max(picture.height, panel_height)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.line((picture.width, 0, picture.width, canvas.height), fill=(200, 200, 200))
    x, y = picture.width + MARGIN, MARGIN
    for line in expression_lines:
        draw.text((x, y), line, fill="black", font=font)
        y += LINE_HEIGHT
    draw.text((x, y), f"score {score:.3f}   mask {area:.1f}% of the image", fill=(70, 70, 70), font=small)
    y += LINE_HEIGHT * 2
    label_width = 70
    bar_left, bar_right = x + label_width, picture.width + PANEL_WIDTH - MARGIN - 44
    for title, weights in sections:
        draw.text((x, y), title, fill="black", font=small)
        y += LINE_HEIGHT
        for name, weight in weights.items():
            draw.text((x, y), name, fill=(70, 70, 70), font=small)
            bar_top = y + (LINE_HEIGHT - BAR_HEIGHT) // 2
            draw.rectangle((bar_left, bar_top, bar_right, bar_top + BAR_HEIGHT), outline=(200, 200, 200))
            filled = bar_left + round((bar_right - bar_left) * min(max(weight, 0.0), 1.0))
            if filled > bar_left:
                draw.rectangle((bar_left, bar_top, filled, bar_top + BAR_HEIGHT), fill=TINT)
            draw.text((bar_right + 6, y), f"{weight:.2f}", fill="black", font=small)
            y += LINE_HEIGHT
        y += LINE_HEIGHT
    return canvas


def main(argv=None) -> int:
    args = parse_args(argv)
    image_path = Path(args.image)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        fail(f"--threshold is a probability between 0 and 1, got {args.threshold}.")
    if not args.expression.strip():
        fail('the expression is empty: say what to segment, e.g. "the dog on the left".')
    mask_path, overlay_path = output_paths(image_path, args.out)
    if not mask_path.parent.is_dir():
        fail(f"output folder not found: {mask_path.parent}. Create it or pass another --out.")
    try:
        check_model_source(args.model, args.revision)
    except ModelSourceError as error:
        fail(str(error))
    if not image_path.is_file():
        fail(f"image not found: {image_path}. Check the path.")
    try:
        image = load_image(image_path)
    except ValueError as error:
        fail(str(error))
    if min(image.size) < MIN_IMAGE_SIDE:
        fail(
            f"{image_path} is {image.width}x{image.height} pixels: SERA needs at least {MIN_IMAGE_SIDE} pixels on "
            "each side. Pass a larger image."
        )
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        fail(f"--device: {error}")

    try:
        pipe = load_segmenter(args.model, revision=args.revision, device=device)
    except ModelSourceError as error:
        fail(str(error))
    result = pipe(image, args.expression, threshold=args.threshold, return_router_weights=True)

    result["mask"].save(mask_path)
    draw_overlay(image, result["mask"], args.expression, result["score"], result["router_weights"]).save(overlay_path)
    print(f"mask:    {mask_path}  (score {result['score']:.3f})")
    print(f"overlay: {overlay_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
