"""The model card of a published SERA checkpoint, rendered from the template ``MODEL_CARD.md`` next to this file.

The card is built with huggingface_hub's ``ModelCard``, ``ModelCardData`` and ``EvalResult``: its YAML metadata holds
the scores as a model-index (which the Hub shows on the model page), its text says what SERA is, how to use the
checkpoint, how it was trained and what each score means. ``training/push.py`` writes it as the repo's README.md.

Scores come from the JSON reports of ``sera-evaluate --output`` or ``train.py``'s ``eval_results.json``:
``{"data": "refcoco(unc)", "units": "percent", "splits": {"val": {"oIoU": ..., "mIoU": ..., ...}, ...}}``.
"""

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sera_training.evaluation import TABLE_COLUMNS, results_section


TEMPLATE_PATH = Path(__file__).resolve().parent / "MODEL_CARD.md"
# The Hub has no referring-segmentation task; image-segmentation is the closest one it lists.
HUB_TASK = "image-segmentation"
TASK_NAME = "Referring Image Segmentation"
METRIC_NAMES = {
    "oIoU": "oIoU (cIoU, overall IoU)",
    "mIoU": "mIoU (gIoU, mean IoU)",
    **{f"Prec@{x}": f"Prec@{x}" for x in ("0.5", "0.6", "0.7", "0.8", "0.9")},
}
# REFER dataset names (as in "refcoco(unc)") and how papers write them.
REFER_NAMES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}
SYNTHETIC_NAME = "synthref"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# The recipe fields the card's table shows; the whole recipe is uploaded as training_recipe.json.
RECIPE_TABLE_FIELDS = (
    "dataset",
    "train_split",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "lr_milestones",
    "lr_gamma",
    "num_train_epochs",
    "max_train_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "horizontal_flip_probability",
    "seed",
)


def load_results(path: str | os.PathLike) -> dict:
    """Read one results report, checking the fields the card needs."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Results file not found: {path}. Write one with sera-evaluate --output.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); pass a file written by sera-evaluate --output."
        ) from None
    splits = report.get("splits") if isinstance(report, dict) else None
    if not isinstance(splits, dict) or not isinstance(report.get("data"), str):
        raise ValueError(f"{path} has no 'data' name and 'splits' scores; pass a file written by sera-evaluate.")
    for split, scores in splits.items():
        missing = [column for column in TABLE_COLUMNS if column not in scores]
        if missing:
            raise ValueError(f"{path}: split {split!r} lacks {', '.join(missing)}.")
    if report.get("units", "percent") != "percent":
        raise ValueError(f"{path} gives scores in {report['units']!r}; the card expects percentages.")
    return report


def public_recipe(recipe: dict) -> dict:
    """The recipe without local paths: a REFER root becomes REFER_ROOT, other absolute paths keep their last part."""
    public = {}
    for key, value in recipe.items():
        if key == "dataset" and isinstance(value, str) and value.startswith("refer:"):
            value = "refer:REFER_ROOT:" + ":".join(value.rsplit(":", 2)[1:])
        elif isinstance(value, str) and os.path.isabs(value):
            value = Path(value).name
        public[key] = value
    return public


def dataset_identity(data_name: str) -> tuple[str, str, str | None]:
    """(dataset_type, dataset_name, dataset_config) of EvalResult for a report's data name."""
    refer = re.fullmatch(r"(.+)\((.+)\)", data_name)
    if refer:
        name, split_by = refer.groups()
        return name, f"{REFER_NAMES.get(name, name)} ({split_by})", split_by
    if data_name == SYNTHETIC_NAME:
        return SYNTHETIC_NAME, "SynthRef (synthetic shapes, built by training/synthetic_data.py)", None
    return data_name, data_name, None


def eval_results(reports: Sequence[dict]) -> list[EvalResult]:
    results = []
    for report in reports:
        dataset_type, dataset_name, dataset_config = dataset_identity(report["data"])
        for split, scores in report["splits"].items():
            for metric in TABLE_COLUMNS:
                results.append(
                    EvalResult(
                        task_type=HUB_TASK,
                        task_name=TASK_NAME,
                        dataset_type=dataset_type,
                        dataset_name=dataset_name,
                        dataset_config=dataset_config,
                        dataset_split=split,
                        metric_type=metric,
                        metric_name=METRIC_NAMES[metric],
                        metric_value=round(float(scores[metric]), 2),
                    )
                )
    return results


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, those the paper's regime trains): SERA's modules plus the encoders' LayerNorm and biases."""
    saved = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.freeze_encoders()
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(saved[name])
    return sum(parameter.numel() for parameter in model.parameters()), trained


def architecture_table(model, processor) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    total, trained = parameter_counts(model)
    adapter = (
        f"in vision blocks {', '.join(map(str, config.adapter_layers))} (0-based), width {config.adapter_dim}"
        if config.use_sera_adapter
        else "off"
    )
    fusion = (
        f"on levels {', '.join(map(str, config.fusion_levels))}, top-{config.fusion_top_k} of 4 experts"
        if config.use_sera_fusion
        else "off"
    )
    rows = [
        (
            "vision encoder",
            f"{vision.model_type}, {vision.num_hidden_layers} blocks, width {vision.hidden_size}, "
            f"patch {vision.patch_size}",
        ),
        ("text encoder", f"{text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}"),
        (
            "input",
            f"{processor.image_size} x {processor.image_size} letterbox; expressions of up to "
            f"{processor.max_text_length} tokens",
        ),
        ("SERA-Adapter", adapter),
        ("SERA-Fusion", fusion),
        ("vision levels", f"after blocks {', '.join(map(str, config.vision_feature_layers))}"),
        (
            "parameters",
            f"{total / 1e6:.1f}M, of which {trained / 1e6:.1f}M trained (SERA's modules and the "
            "encoders' LayerNorm and bias terms)",
        ),
        ("mask threshold", f"{processor.mask_threshold}"),
    ]
    return "\n".join(["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


def training_section(recipe: dict | None, summary: dict | None) -> str:
    if not recipe:
        return "The training recipe was not recorded with this checkpoint."
    lines = []
    if recipe.get("_comment"):
        lines += [recipe["_comment"], ""]
    lines += ["| recipe field | value |", "|---|---|"]
    lines += [f"| `{key}` | `{json.dumps(recipe[key])}` |" for key in RECIPE_TABLE_FIELDS if key in recipe]
    lines += [
        "",
        "The learning rate is multiplied by `lr_gamma` at the `lr_milestones` epochs (of `num_train_epochs`; "
        "at the same fractions of the run when `max_train_steps` cuts it short). The whole recipe, which "
        "`training/train.py --recipe` takes back, is in `training_recipe.json`.",
    ]
    if summary:
        lines += [
            "",
            f"This checkpoint: {summary.get('completed_steps')} optimizer steps "
            f"({summary.get('epochs', 0):.2f} epochs) on {summary.get('num_processes')} process(es); the "
            f"weights are from {summary.get('weights_from', 'the last step')}. Encoders: "
            f"{summary.get('encoders', 'see the recipe')}.",
        ]
    return "\n".join(lines)


def training_data(recipe: dict | None) -> str:
    if not recipe or not recipe.get("dataset"):
        return "not recorded"
    dataset = recipe["dataset"]
    refer = re.fullmatch(r"refer:.*:(.+):(.+)", dataset)
    if refer:
        name, split_by = refer.groups()
        return f"{REFER_NAMES.get(name, name)} ({split_by} splits), split `{recipe.get('train_split', 'train')}`"
    if dataset == SYNTHETIC_NAME:
        return "SynthRef, the built-in synthetic referring dataset (coloured shapes and templated expressions)"
    return f"`{dataset}`, split `{recipe.get('train_split', 'train')}`"


def build_model_card(
    model,
    processor,
    repo_id: str,
    recipe: dict | None = None,
    reports: Sequence[dict] = (),
    training_summary: dict | None = None,
    template_path: str | os.PathLike = TEMPLATE_PATH,
) -> ModelCard:
    """The card of `model` (with its `processor`, which holds the input sizes) published as `repo_id`, trained with
    `recipe`, scored in `reports` (see `load_results`)."""
    model_name = repo_id.split("/")[-1]
    recipe = public_recipe(recipe) if recipe else None
    base_models = [
        recipe[key]
        for key in ("vision_model_name_or_path", "text_model_name_or_path")
        if recipe and isinstance(recipe.get(key), str) and HUB_ID.fullmatch(recipe[key])
    ]
    hub_datasets = [report["data"] for report in reports if HUB_ID.fullmatch(report["data"])]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=HUB_TASK,
        license="apache-2.0",
        tags=["referring-image-segmentation", "sera", "mixture-of-experts", "vision-language", "custom_code"],
        base_model=base_models or None,
        datasets=sorted(set(hub_datasets)) or None,
        eval_results=eval_results(reports) or None,
    )
    results = "\n".join(results_section(report["splits"], report["data"]) for report in reports)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_title=model_name,
        training_data=training_data(recipe),
        architecture_table=architecture_table(model, processor),
        training_section=training_section(recipe, training_summary),
        results_sections=results.strip(),
        image_size=processor.image_size,
        max_text_length=processor.max_text_length,
        synthetic_only=bool(recipe) and recipe.get("dataset") == SYNTHETIC_NAME,
    )
