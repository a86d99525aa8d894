"""Score a referring segmentation model on one or more splits, the way the papers do, and report the numbers.

Every expression of every object is scored at its image's original resolution with the metric in
``metrics/referring_segmentation`` (oIoU, mIoU, Prec@0.5-0.9, boundary F; percentages), and every split is scored on
its own: splits are never pooled.

The command line is ``sera-evaluate`` or ``python training/evaluate_model.py`` (see :func:`main`). Flags are spelled
with underscores, as ``sera-train``'s (``--coco_image_dir``); the dashed spellings (``--coco-image-dir``) also work.
"""

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_sera.modeling_sera import MODEL_INPUT_NAMES  # what the forward takes of the processor's output
from sera_training.data_sources import SOURCE_FORMS, load_examples, parse_source
from sera_training.metrics.referring_segmentation.referring_segmentation import (
    _check_categories,
    mask_pair_counts,
    scores_from_counts,
)


logger = logging.getLogger(__name__)

# The metric as an `evaluate` module: evaluate.load(str(METRIC_PATH)). Scoring here calls its functions directly.
METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "referring_segmentation"
TABLE_COLUMNS = ("oIoU", "mIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9")
RESULTS_START = "<!-- results start: {name} -->"
RESULTS_END = "<!-- results end: {name} -->"
PROG = "sera-evaluate"


def resolve_device(device: str | torch.device | None, model: torch.nn.Module) -> torch.device:
    """``None``: where the model already is; ``"auto"``: a GPU when there is one; anything else as torch reads it."""
    if device is None:
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_referring_segmentation(
    model,
    processor,
    dataset,
    batch_size: int = 8,
    device=None,
    show_progress: bool = True,
    record_samples: bool = False,
):
    """Score ``model`` on every example of ``dataset`` (one split) and return the metric's results.

    Args:
        model: returns ``.logits`` of shape ``(batch, 1, h, w)`` from ``pixel_values``, ``input_ids`` and
            ``attention_mask``.
        processor: ``processor(images=..., text=..., return_tensors="pt")`` gives those inputs and
            ``original_sizes``; ``processor.post_process_referring_segmentation(outputs, target_sizes=...)`` gives
            ``[{"mask": (H, W) bool tensor, ...}]`` at the original sizes.
        dataset: a ``datasets.Dataset`` (or ``IterableDataset``) with the columns of ``data_schema.EXAMPLE_FEATURES``.
        batch_size: expressions per forward pass.
        device: ``None`` (keep the model where it is), ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        show_progress: show a tqdm progress bar.
        record_samples: also return one record per example, in dataset order: ``{"index", "iou", "category"}``
            (IoU as a fraction; 1 when prediction and reference are both empty, as the metric counts it), which
            ``gallery.py`` picks its examples from.

    Returns:
        The metric's dict (see ``metrics/referring_segmentation/README.md``): ``oIoU``, ``mIoU``, ``Prec@0.5`` ...
        ``Prec@0.9``, ``boundary_F`` (percentages), ``num_samples`` and, when some example has a non-empty
        ``category``, ``per_category``. With ``record_samples``, the pair ``(results, records)``.
    """
    device = resolve_device(device, model)
    model.to(device)
    model.eval()
    total = math.ceil(len(dataset) / batch_size) if hasattr(dataset, "__len__") else None
    batches = tqdm(
        dataset.iter(batch_size=batch_size), total=total, disable=not show_progress, desc="Evaluating", unit="batch"
    )
    counts, categories = [], []
    with torch.inference_mode():
        for rows in batches:
            counts += batch_counts(model, processor, rows, device)
            categories += rows.get("category") or [""] * len(rows["expression"])
    return scores_and_records(counts, categories, record_samples)


def predict_masks(model, processor, images, expressions, device) -> list[np.ndarray]:
    """The model's masks for (image, expression) pairs, each at its image's original size (numpy bool arrays)."""
    images = [image.convert("RGB") for image in images]  # some COCO images are greyscale; the processor wants RGB
    inputs = processor(images=images, text=list(expressions), return_tensors="pt")
    model_inputs = {name: inputs[name].to(device) for name in MODEL_INPUT_NAMES if name in inputs}
    model_dtype = getattr(model, "dtype", None)
    if model_dtype is not None and model_inputs["pixel_values"].is_floating_point():
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(model_dtype)
    outputs = model(**model_inputs)
    predictions = processor.post_process_referring_segmentation(outputs, target_sizes=inputs["original_sizes"])
    return [_to_numpy(prediction["mask"]) for prediction in predictions]


def batch_counts(model, processor, rows, device) -> list[tuple[dict, dict]]:
    """Predict a batch of rows (``image``, ``expression``, ``mask`` columns) and reduce every (prediction, reference)
    pair to the metric's per-sample counts (``mask_pair_counts``): a few integers, never masks."""
    predicted = predict_masks(model, processor, rows["image"], rows["expression"], device)
    references = [np.asarray(mask) for mask in rows["mask"]]
    return [mask_pair_counts(p, r, index) for index, (p, r) in enumerate(zip(predicted, references))]


def scores_and_records(counts: list[tuple[dict, dict]], categories: list[str], record_samples: bool = False):
    """The metric's results from per-sample counts (in dataset order); with ``record_samples`` also the records
    ``{"index", "iou", "category"}`` (IoU as a fraction; 1 when both masks are empty, as the metric counts it)."""
    categories = _check_categories(categories, len(counts))
    results = scores_from_counts([c[0] for c in counts], [c[1] for c in counts], categories)
    if not record_samples:
        return results
    records = []
    for index, ((prediction, reference), category) in enumerate(zip(counts, categories)):
        intersection = prediction["area_matched"]
        union = prediction["area"] + reference["area"] - intersection
        records.append({"index": index, "iou": intersection / union if union else 1.0, "category": category})
    return results, records


def mask_iou(prediction, reference) -> float:
    """Intersection over union of two masks (nonzero = foreground); 1.0 when both are empty, as the metric counts."""
    prediction, reference = np.asarray(prediction) > 0, np.asarray(reference) > 0
    union = np.logical_or(prediction, reference).sum()
    return float(np.logical_and(prediction, reference).sum() / union) if union else 1.0


def _to_numpy(mask) -> np.ndarray:
    return mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_results_table(results_by_split: dict) -> str:
    """The papers' table as markdown: one row per split with oIoU, mIoU and Prec@0.5 ... Prec@0.9 (in %)."""
    rows = [
        [split] + [f"{results[column]:.2f}" for column in TABLE_COLUMNS] for split, results in results_by_split.items()
    ]
    return _markdown_table(("split",) + TABLE_COLUMNS, rows)


def format_category_table(results_by_split: dict) -> str:
    """One row per (split, category) with the sample count and the table's scores; "" when there are no categories."""
    rows = []
    for split, results in results_by_split.items():
        for category, scores in results.get("per_category", {}).items():
            rows.append(
                [split, category, str(scores["num_samples"])] + [f"{scores[column]:.2f}" for column in TABLE_COLUMNS]
            )
    return _markdown_table(("split", "category", "samples") + TABLE_COLUMNS, rows) if rows else ""


def results_section(results_by_split: dict, data_name: str) -> str:
    """The markdown a model card shows for one data source, markers included."""
    counts = ", ".join(f"{split}: {results['num_samples']}" for split, results in results_by_split.items())
    parts = [
        RESULTS_START.format(name=data_name),
        f"## Evaluation results: {data_name}",
        "",
        "Scores in %, every referring expression scored at its image's original resolution, each split on its own "
        "(expressions: " + counts + "). oIoU (also called cIoU) = sum of intersections / sum of unions; mIoU (also "
        "called gIoU) = mean per-expression IoU; Prec@X = share of expressions with IoU >= X. Computed with "
        "`sera-evaluate` (`training/evaluate_model.py`).",
        "",
        format_results_table(results_by_split),
    ]
    category_table = format_category_table(results_by_split)
    if category_table:
        parts += ["", "Per category:", "", category_table]
    parts.append(RESULTS_END.format(name=data_name))
    return "\n".join(parts) + "\n"


def update_model_card(card_path: str | Path, results_by_split: dict, data_name: str) -> None:
    """Write the results section for ``data_name`` into a markdown model card.

    The section sits between ``<!-- results start: NAME -->`` and ``<!-- results end: NAME -->``; an existing section
    for the same data is replaced, one for other data is left alone (so several datasets can be reported), and a card
    without one gets it appended. A missing card file is created.
    """
    card_path = Path(card_path)
    start, end = RESULTS_START.format(name=data_name), RESULTS_END.format(name=data_name)
    card = card_path.read_text(encoding="utf-8") if card_path.exists() else ""
    section = results_section(results_by_split, data_name)
    start_index, end_index = card.find(start), card.find(end)
    if start_index == -1 and end_index == -1:
        card = (card.rstrip("\n") + "\n\n" if card.strip() else "") + section
    elif start_index == -1 or end_index < start_index:
        raise ValueError(
            f"{card_path} has a broken results section for {data_name!r}: expected {start!r} followed by {end!r}. "
            "Fix or remove the markers and run again."
        )
    else:
        after = card[end_index + len(end) :]
        card = card[:start_index] + section.rstrip("\n") + after
    card_path.write_text(card, encoding="utf-8")


def load_model_and_processor(model_path: str | Path, revision: str | None = None):
    """Load a saved SERA folder or Hub repo id (at ``revision``) and its processor, the way ``sera-predict`` and
    ``pipeline(...)`` do (``modeling_sera.cli.load_segmenter``). Raises ``ModelSourceError`` (a ``ValueError``) with
    a one-line message for a wrong path, id or revision."""
    from modeling_sera.cli import load_segmenter

    segmenter = load_segmenter(str(model_path), revision=revision)
    return segmenter.model, segmenter.processor


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score a saved referring segmentation model (oIoU, mIoU, Prec@X, boundary F; in %) on each split.",
    )
    parser.add_argument("--model", required=True, help="folder written by save_pretrained, or a Hub repo id")
    parser.add_argument("--revision", help="with a Hub repo id: the branch, tag or commit to load (default: main)")
    parser.add_argument("--dataset", "--data", required=True, dest="data", help=f"data source: {SOURCE_FORMS}")
    parser.add_argument(
        "--split", required=True, action="append", dest="splits", help="a split to score; repeat for more"
    )
    parser.add_argument(
        "--coco_image_dir", "--coco-image-dir", help="COCO train2014 images (REFER files, Hub mirrors without images)"
    )
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    parser.add_argument(
        "--model_card", "--model-card", help="markdown model card whose results section to fill or replace"
    )
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--gallery",
        type=int,
        default=0,
        metavar="N",
        help="also write a contact sheet (PNG) per split of N predictions per category: the best, the worst and a "
        "seeded random sample, with ground truth and prediction outlines and IoU",
    )
    parser.add_argument(
        "--gallery_dir",
        "--gallery-dir",
        help="where the contact sheets go (default: the --output file's folder, else the current one)",
    )
    parser.add_argument(
        "--gallery_seed", "--gallery-seed", type=int, default=0, help="seed of the gallery's random sample (default 0)"
    )
    parser.add_argument(
        "--word_swap",
        "--word-swap",
        action="store_true",
        help="also score whether the model reads spatial words: per category, the IoU between the masks for each "
        "location, relation and comparison expression and for its twin with the word swapped (left <-> right, ...)",
    )
    args = parser.parse_args(argv)
    # Check what can be checked before spending minutes on loading.
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.gallery < 0:
        parser.error("--gallery N takes the number of examples per category, 0 or more")
    try:
        args.source = parse_source(args.data)
    except ValueError as error:
        parser.error(str(error))
    from modeling_sera.cli import ModelSourceError, check_model_source

    try:
        check_model_source(args.model, args.revision, inspect_folder=False)  # the rest when loading
    except ModelSourceError as error:
        parser.error(str(error))
    gallery_dir = args.gallery_dir or (Path(args.output).parent if args.output else Path.cwd())
    args.gallery_dir = Path(gallery_dir)
    if args.gallery and not args.gallery_dir.is_dir():
        parser.error(f"--gallery_dir {args.gallery_dir}: no such folder")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The splits first: a wrong split name fails in seconds, before the model is loaded.
    datasets_by_split = {}
    for split in dict.fromkeys(args.splits):  # keeps the order, drops repeats
        try:
            datasets_by_split[split] = load_examples(args.data, split, coco_image_dir=args.coco_image_dir)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"{PROG}: error: --split {split}: {_one_line(error)}") from None
    try:
        model, processor = load_model_and_processor(args.model, revision=args.revision)
    except ValueError as error:
        raise SystemExit(f"{PROG}: error: {error}") from None

    results_by_split, gallery_paths = {}, []
    for split, dataset in datasets_by_split.items():
        logger.info(f"{args.source.name} {split}: {len(dataset)} expressions")
        results_by_split[split], records = evaluate_referring_segmentation(
            model,
            processor,
            dataset,
            batch_size=args.batch_size,
            device=args.device,
            show_progress=not args.no_progress,
            record_samples=True,
        )
        if args.word_swap:
            from sera_training.word_swap import word_swap_iou

            results_by_split[split]["word_swap"] = word_swap_iou(model, processor, dataset, batch_size=args.batch_size)
        if args.gallery:
            from sera_training.gallery import gallery_file_name, write_gallery

            path = args.gallery_dir / gallery_file_name(split)
            write_gallery(
                model,
                processor,
                dataset,
                records,
                path,
                per_category=args.gallery,
                seed=args.gallery_seed,
                title=f"{args.source.name} {split}",
                batch_size=args.batch_size,
            )
            gallery_paths.append(path)

    print(f"\n{args.source.name}, scores in % (oIoU = cIoU, mIoU = gIoU)\n")
    print(format_results_table(results_by_split))
    category_table = format_category_table(results_by_split)
    if category_table:
        print("\n" + category_table)
    swap_rows = [
        [
            split,
            category,
            str(entry["num_samples"]),
            f"{entry['swap_IoU']:.3f}" if entry["swap_IoU"] is not None else "-",
        ]
        for split, results in results_by_split.items()
        for category, entry in results.get("word_swap", {}).items()
    ]
    if swap_rows:
        print("\nIoU between the masks for an expression and its word-swapped twin (lower: the words are read)\n")
        print(_markdown_table(("split", "category", "expressions", "swap IoU"), swap_rows))

    if args.output:
        report = {
            "model": str(args.model),
            "revision": args.revision,
            "data": args.source.name,
            "data_source": args.data,
            "units": "percent",
            "splits": results_by_split,
        }
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nResults written to {args.output}")
    if args.model_card:
        update_model_card(args.model_card, results_by_split, args.source.name)
        print(f"Results section of {args.model_card} updated")
    for path in gallery_paths:
        print(f"Gallery written to {path}")
    return 0


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
