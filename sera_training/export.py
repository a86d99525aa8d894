"""The end of a run: the test splits scored, and the model folder written (merged weights, processor, remote code,
``eval_results.json``, the resolved ``training_recipe.json``, a model-card draft and a gallery per test split).

The folder is written aside (``<output_dir>/.export.partial``) and its files moved in with ``config.json`` last: a
folder that ``from_pretrained`` can load is always a complete export, whenever the run is killed.
"""

import json
import os
import shutil
from pathlib import Path

from accelerate.logging import get_logger

from sera_training.arguments import (
    DEFAULT_CONFIG_NAME,
    RECIPE_FILE,
    SeraTrainingArguments,
    recipe_of,
    resolve_config_dir,
)
from sera_training.validation import score_split


logger = get_logger(__name__)


def score_test_splits(accelerator, model, processor, test_data: dict, args: SeraTrainingArguments, data_name: str):
    """{split: results} on every process; the main process also draws each split's gallery."""
    from sera_training.gallery import GALLERY_PER_CATEGORY, gallery_file_name, write_gallery

    results_by_split = {}
    for split, dataset in test_data.items():
        logger.info(f"Scoring {split} ({len(dataset)} expressions)")
        results, records = score_split(
            accelerator, model, processor, dataset, args.per_device_eval_batch_size, record_samples=True
        )
        results_by_split[split] = results
        if accelerator.is_main_process:  # a contact sheet per split
            sheet = args.output_dir / gallery_file_name(split)
            title = f"{data_name} {split}"
            write_gallery(model, processor, dataset, records, sheet, GALLERY_PER_CATEGORY, args.seed, title)
    return results_by_split


def write_model_card(path: Path, model, processor, args: SeraTrainingArguments, report: dict) -> None:
    """The draft card of the trained folder, rendered like a published one (``model_card.build_model_card``)."""
    from sera_training.model_card import build_model_card

    reports = [report] if report["splits"] else []
    card = build_model_card(
        model,
        processor,
        repo_id=args.output_dir.name,
        recipe=recipe_of(args),
        reports=reports,
        training_summary=report["train"],
    )
    card.save(path)


def write_model_folder(model, processor, args: SeraTrainingArguments, report: dict) -> None:
    """Everything a user loads, written aside and moved in with config.json last."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    export = args.output_dir / ".export.partial"
    if export.exists():
        shutil.rmtree(export)
    model.save_pretrained(export)
    processor.save_pretrained(export)
    (export / RECIPE_FILE).write_text(json.dumps(recipe_of(args), indent=2) + "\n")
    (export / "eval_results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_model_card(export / "README.md", model, processor, args, report)
    for path in sorted(export.iterdir(), key=lambda path: path.name == "config.json"):
        os.replace(path, args.output_dir / path.name)
    export.rmdir()


def build_report(
    args: SeraTrainingArguments, data_name: str, results_by_split: dict, progress, training_summary: dict
):
    """``eval_results.json``: ``data`` is the parsed dataset name (``refcoco(unc)``, a Hub id, a folder's name),
    never a local path, since ``push.py`` and the model card read it as the dataset's name."""
    return {
        "data": data_name,
        "units": "percent",
        "splits": results_by_split,
        "validation": {
            "best_mIoU": progress.best_metric if progress.best_step > 0 else None,
            "best_step": progress.best_step if progress.best_step > 0 else None,
            "history": progress.history,
        },
        "train": training_summary,
        "recipe": recipe_of(args),
    }


def print_results(data_name: str, results_by_split: dict, weights_from: str) -> None:
    from sera_training.evaluation import format_category_table, format_results_table

    if not results_by_split:
        return
    print(f"\n{data_name}, scores in % (oIoU = cIoU, mIoU = gIoU), weights from {weights_from}\n")
    print(format_results_table(results_by_split))
    category_table = format_category_table(results_by_split)
    if category_table:
        print("\n" + category_table)


def save_untrained_model(folder: Path, config_name: str | Path = DEFAULT_CONFIG_NAME, seed: int = 0):
    """An untrained SERA of a config folder (random weights drawn after ``torch.manual_seed(seed)``) saved with its
    processor as a model folder that ``pipeline(...)``, ``sera-predict`` and ``sera-evaluate`` load: for smoke tests,
    fault campaigns and demos. Returns ``(model, processor)``."""
    import torch

    from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor

    config_dir = resolve_config_dir(config_name)
    torch.manual_seed(seed)
    model = SeraForReferringSegmentation(SeraConfig.from_pretrained(config_dir)).eval()
    processor = SeraProcessor.from_pretrained(config_dir)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor
