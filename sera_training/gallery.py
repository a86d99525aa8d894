"""Pictures of what a referring segmentation model does: contact sheets of predictions, and the validation curve.

- :func:`write_gallery` (``sera-evaluate --gallery N``, and ``train.py`` at the end of a run): for one split,
  N predictions per category, the best, the worst and a seeded random sample of the rest, each shown as the image
  with the ground truth (green) and the prediction (magenta) outlined, its expression and its IoU. The choice
  depends only on the per-example IoUs, the seed and the category, so the same model, data and seed always give the
  same sheet.
- :func:`draw_validation_plot` (``train.py`` after each validation): validation mIoU per category, and overall,
  against optimizer steps; written next to the TensorBoard logs.

Drawn with PIL only, so neither needs matplotlib.
"""

import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from modeling_sera.cli import load_font, wrap_text
from sera_training.evaluation import predict_masks as predict_batch


GROUND_TRUTH_COLOR = (0, 190, 0)
PREDICTION_COLOR = (230, 0, 200)
LABEL_COLORS = {"best": (0, 130, 60), "worst": (200, 40, 40), "random": (60, 90, 200)}
TILE_SIDE = 200  # the image area of one tile
CAPTION_LINES = 3
LINE_HEIGHT = 16
MARGIN = 10
ROW_HEADER_WIDTH = 120
BACKGROUND = (255, 255, 255)
IMAGE_BACKGROUND = (235, 235, 235)
NO_CATEGORY = "(no category)"
GALLERY_PER_CATEGORY = 6  # what train.py draws per category of each test split
# The processor returns more than the model's forward accepts.


def gallery_file_name(split: str) -> str:
    """``gallery_<split>.png``, with anything but letters, digits, ``-``, ``_`` and ``.`` in the split replaced."""
    safe = "".join(character if character.isalnum() or character in "-_." else "_" for character in split)
    return f"gallery_{safe}.png"


# ----------------------------------------------------------------------------------------------------------------------
# Which examples


def split_counts(per_category: int) -> tuple[int, int, int]:
    """How many of ``per_category`` are the best, the worst and random: as even as can be, best first."""
    best = math.ceil(per_category / 3)
    worst = (per_category - best + 1) // 2
    return best, worst, per_category - best - worst


def choose_examples(records: Sequence[Mapping], per_category: int, seed: int = 0) -> dict[str, list[tuple[dict, str]]]:
    """Per category (sorted by name; ``""`` is shown as "(no category)"), up to ``per_category`` records with their
    label ("best", "worst" or "random"), ordered from the highest IoU to the lowest.

    ``records`` are ``evaluate_referring_segmentation(..., record_samples=True)``'s: ``{"index", "iou",
    "category"}``. Ties in IoU go to the lower index. The random sample is drawn from what the best and the worst
    left, with a generator seeded by ``seed`` and the category's name, so it does not depend on the other categories.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, got {per_category}.")
    by_category: dict[str, list[dict]] = {}
    for record in records:
        by_category.setdefault(record.get("category") or "", []).append(dict(record))
    chosen = {}
    num_best, num_worst, num_random = split_counts(per_category)
    for category in sorted(by_category):
        members = sorted(by_category[category], key=lambda record: (-record["iou"], record["index"]))
        best = members[:num_best]
        rest = members[num_best:]
        worst = rest[::-1][:num_worst]
        rest = rest[: len(rest) - len(worst)]
        generator = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
        picked = sorted(generator.choice(len(rest), size=min(num_random, len(rest)), replace=False).tolist())
        labelled = [(record, "best") for record in best] + [(rest[i], "random") for i in picked]
        labelled += [(record, "worst") for record in worst]
        labelled.sort(key=lambda item: (-item[0]["iou"], item[0]["index"]))
        chosen[category or NO_CATEGORY] = labelled
    return chosen


def predict_masks(model, processor, images, expressions, batch_size: int = 8) -> list[np.ndarray]:
    """Boolean masks at the images' original sizes, computed as ``evaluation.evaluate_referring_segmentation`` does."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    masks = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            masks += [
                mask.astype(bool)
                for mask in predict_batch(model, processor, images[start:end], expressions[start:end], device)
            ]
    return masks


# ----------------------------------------------------------------------------------------------------------------------
# Drawing


def _outline(mask: Image.Image) -> Image.Image:
    """The boundary band (about 2 pixels) of a mode "L" mask, as a mode "L" mask; the image's edge counts as outside,
    so a mask that touches it (or fills the whole image) is closed there too."""
    padded = ImageOps.expand(mask, border=1, fill=0)
    band = ImageChops.difference(padded.filter(ImageFilter.MaxFilter(3)), padded.filter(ImageFilter.MinFilter(3)))
    return band.crop((1, 1, mask.width + 1, mask.height + 1))


def draw_tile(image: Image.Image, expression: str, reference, prediction, iou: float, label: str) -> Image.Image:
    """One example: the image fitted into a TILE_SIDE square with the ground truth (green) and the prediction
    (magenta) outlined, then the label and IoU, then the expression."""
    image = image.convert("RGB")
    scale = TILE_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = image.resize(size, Image.Resampling.BILINEAR)
    for mask, color in ((reference, GROUND_TRUTH_COLOR), (prediction, PREDICTION_COLOR)):
        mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        shown.paste(color, mask=_outline(mask))

    font, bold = load_font(12), load_font(13)
    tile = Image.new("RGB", (TILE_SIDE, TILE_SIDE + LINE_HEIGHT * (CAPTION_LINES + 1) + 4), BACKGROUND)
    tile.paste(IMAGE_BACKGROUND, (0, 0, TILE_SIDE, TILE_SIDE))
    tile.paste(shown, ((TILE_SIDE - size[0]) // 2, (TILE_SIDE - size[1]) // 2))
    draw = ImageDraw.Draw(tile)
    y = TILE_SIDE + 2
    draw.text((0, y), label, fill=LABEL_COLORS.get(label, (0, 0, 0)), font=bold)
    draw.text((60, y), f"IoU {iou:.2f}", fill=(0, 0, 0), font=bold)
    for line in wrap_text(f'"{expression}"', font, TILE_SIDE, draw, CAPTION_LINES):
        y += LINE_HEIGHT
        draw.text((0, y), line, fill=(60, 60, 60), font=font)
    return tile


def draw_contact_sheet(rows: Mapping[str, Sequence[Image.Image]], title: str) -> Image.Image:
    """Tiles in rows, one row per category with its name on the left, under a title and a colour legend."""
    if not rows:
        raise ValueError("A contact sheet needs at least one row of tiles.")
    tiles = [tile for row in rows.values() for tile in row]
    tile_width, tile_height = max(tile.width for tile in tiles), max(tile.height for tile in tiles)
    columns = max(len(row) for row in rows.values())
    header = MARGIN + 2 * 22
    width = ROW_HEADER_WIDTH + columns * (tile_width + MARGIN) + MARGIN
    height = header + len(rows) * (tile_height + MARGIN) + MARGIN
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font, legend_font, row_font = load_font(18), load_font(13), load_font(14)
    draw.text((MARGIN, MARGIN), title, fill=(0, 0, 0), font=title_font)
    x = MARGIN
    for name, color in (("ground truth", GROUND_TRUTH_COLOR), ("prediction", PREDICTION_COLOR)):
        y = MARGIN + 26
        draw.rectangle((x, y + 3, x + 22, y + 9), fill=color)
        draw.text((x + 28, y), name, fill=(0, 0, 0), font=legend_font)
        x += 40 + round(draw.textlength(name, font=legend_font))
    y = header
    for category, row in rows.items():
        for line_index, line in enumerate(wrap_text(category, row_font, ROW_HEADER_WIDTH - 2 * MARGIN, draw, 3)):
            draw.text((MARGIN, y + TILE_SIDE // 2 - 10 + 18 * line_index), line, fill=(0, 0, 0), font=row_font)
        for column, tile in enumerate(row):
            sheet.paste(tile, (ROW_HEADER_WIDTH + column * (tile_width + MARGIN), y))
        y += tile_height + MARGIN
    return sheet


def write_gallery(
    model,
    processor,
    dataset,
    records: Sequence[Mapping],
    path,
    per_category: int = 6,
    seed: int = 0,
    title: str = "",
    batch_size: int = 8,
) -> dict[str, list[dict]]:
    """Choose (:func:`choose_examples`), predict again and draw ``per_category`` examples per category of one split
    of ``dataset`` (the rows ``records`` describe, in order) and save the sheet as a PNG at ``path``.

    Returns what it drew: per row name, ``[{"index", "label", "iou", "expression"}]``, the IoU recomputed from the
    new prediction (the model in eval mode predicts as it did when ``records`` were made).
    """
    if len(records) != len(dataset):
        raise ValueError(f"{len(records)} records for {len(dataset)} examples: pass the records of this dataset.")
    chosen = choose_examples(records, per_category, seed)
    flat = [(category, record, label) for category, items in chosen.items() for record, label in items]
    rows = dataset.select([record["index"] for _, record, _ in flat])
    images, expressions, references = list(rows["image"]), list(rows["expression"]), list(rows["mask"])
    predictions = predict_masks(model, processor, images, expressions, batch_size=batch_size)

    tiles: dict[str, list[Image.Image]] = {category: [] for category in chosen}
    drawn: dict[str, list[dict]] = {category: [] for category in chosen}
    for (category, record, label), image, expression, reference, prediction in zip(
        flat, images, expressions, references, predictions
    ):
        reference = np.asarray(reference) > 0
        union = np.logical_or(reference, prediction).sum()
        iou = float(np.logical_and(reference, prediction).sum() / union) if union else 1.0
        tiles[category].append(draw_tile(image, expression, reference, prediction, iou, label))
        drawn[category].append({"index": record["index"], "label": label, "iou": iou, "expression": expression})
    best, worst, random = split_counts(per_category)
    heading = f"{title}: " if title else ""
    heading += f"{per_category} per category ({best} best, {worst} worst, {random} random with seed {seed})"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_contact_sheet(tiles, heading).save(path)
    return drawn


# ----------------------------------------------------------------------------------------------------------------------
# The validation curve

PLOT_SIZE = (760, 420)
PLOT_MARGINS = (60, 46, 190, 50)  # left, top, right, bottom
SERIES_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
OVERALL = "all"


def _nice_step(span: float, target_ticks: int = 6) -> float:
    raw = max(span, 1e-9) / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(factor * magnitude for factor in (1, 2, 5, 10) if factor * magnitude >= raw)


def validation_series(history: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """``{"all": [(step, mIoU)...], category: [...]}`` from train.py's validation history (entries ``{"step",
    "mIoU", "per_category_mIoU": {category: mIoU}}``; older entries without categories give only "all")."""
    series: dict[str, list[tuple[int, float]]] = {OVERALL: []}
    for entry in history:
        series[OVERALL].append((int(entry["step"]), float(entry["mIoU"])))
        for category, value in sorted((entry.get("per_category_mIoU") or {}).items()):
            series.setdefault(category, []).append((int(entry["step"]), float(value)))
    return series


def draw_validation_plot(history: Sequence[Mapping], title: str = "Validation mIoU") -> Image.Image:
    """A line chart of validation mIoU (in %) against optimizer steps: overall (black, thick) and per category."""
    series = validation_series(history)
    if not series[OVERALL]:
        raise ValueError("The validation history is empty: nothing to plot.")
    width, height = PLOT_SIZE
    left, top, right, bottom = PLOT_MARGINS
    plot_box = (left, top, width - right, height - bottom)
    steps = [step for points in series.values() for step, _ in points]
    values = [value for points in series.values() for _, value in points]
    low_step, high_step = min(0, min(steps)), max(max(steps), 1)  # the x axis starts at step 0
    y_step = _nice_step(max(values) - 0)
    y_high = max(y_step, math.ceil(max(values) / y_step) * y_step)
    y_high = min(y_high, 100.0) if max(values) <= 100 else y_high

    def to_pixel(step: float, value: float) -> tuple[float, float]:
        x = plot_box[0] + (step - low_step) / (high_step - low_step) * (plot_box[2] - plot_box[0])
        y = plot_box[3] - value / y_high * (plot_box[3] - plot_box[1])
        return x, y

    image = Image.new("RGB", PLOT_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, title_font = load_font(12), load_font(15)
    draw.text((left + 20, 8), title, fill=(0, 0, 0), font=title_font)
    tick = 0.0
    while tick <= y_high + 1e-9:
        _, y = to_pixel(low_step, tick)
        draw.line((plot_box[0], y, plot_box[2], y), fill=(225, 225, 225))
        label = f"{tick:g}"
        draw.text((plot_box[0] - 8 - draw.textlength(label, font=font), y - 7), label, fill=(60, 60, 60), font=font)
        tick += y_step
    x_step = max(1, int(_nice_step(high_step - low_step)))
    tick_step = math.ceil(low_step / x_step) * x_step
    while tick_step <= high_step:
        x, _ = to_pixel(tick_step, 0)
        draw.line((x, plot_box[3], x, plot_box[3] + 4), fill=(60, 60, 60))
        label = str(tick_step)
        draw.text((x - draw.textlength(label, font=font) / 2, plot_box[3] + 6), label, fill=(60, 60, 60), font=font)
        tick_step += x_step
    draw.rectangle(plot_box, outline=(90, 90, 90))
    draw.text(((plot_box[0] + plot_box[2]) / 2 - 30, height - 22), "optimizer step", fill=(0, 0, 0), font=font)
    draw.text((8, top - 16), "mIoU (%)", fill=(0, 0, 0), font=font)

    legend_y = top
    for index, (name, points) in enumerate(series.items()):
        color = (0, 0, 0) if name == OVERALL else SERIES_COLORS[(index - 1) % len(SERIES_COLORS)]
        line_width = 3 if name == OVERALL else 2
        pixels = [to_pixel(step, value) for step, value in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=line_width, joint="curve")
        for x, y in pixels:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        x = plot_box[2] + 14
        draw.line((x, legend_y + 7, x + 22, legend_y + 7), fill=color, width=line_width)
        draw.text((x + 28, legend_y), f"{name} ({points[-1][1]:.1f})", fill=(0, 0, 0), font=font)
        legend_y += 18
    return image


def write_validation_plot(history: Sequence[Mapping], path, title: str = "Validation mIoU") -> Path | None:
    """Save :func:`draw_validation_plot` as a PNG at ``path``; None (and nothing written) for an empty history."""
    if not history:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_validation_plot(history, title).save(path)
    return path


__all__ = [
    "choose_examples",
    "draw_contact_sheet",
    "draw_tile",
    "draw_validation_plot",
    "gallery_file_name",
    "predict_masks",
    "split_counts",
    "validation_series",
    "write_gallery",
    "write_validation_plot",
]
