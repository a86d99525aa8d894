"""Every setting of a training run, as dataclasses read by ``transformers.HfArgumentParser``.

Precedence, lowest first: the field defaults below (the paper's recipe where the paper says something), the recipe
JSON (``<config_name>/training_recipe.json`` or ``--recipe``), the command line. ``RunArguments`` say how to run
(folders, resuming...) and are never part of a recipe; ``RecipeArguments`` are the recipe, written back next to the
model. Flags are the field names (``--learning_rate``); HfArgumentParser also takes them with dashes
(``--learning-rate``). ``none`` clears an optional field on the command line (``--eval_steps none``).
"""

import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args, get_type_hints

from transformers import HfArgumentParser


PACKAGE_DIR = Path(__file__).resolve().parent
# hub_configs/ is package data of an installed wheel (sera_training/hub_configs) and a folder of the checkout.
HUB_CONFIG_ROOTS = (PACKAGE_DIR / "hub_configs", PACKAGE_DIR.parent / "hub_configs")
DEFAULT_CONFIG_NAME = "hub_configs/sera-synthref-tiny"
RECIPE_FILE = "training_recipe.json"
PROG = "sera-train"


class TrainingError(Exception):
    """A problem with the inputs of a run (data, config, recipe): reported as one clear line, exit code 2."""


def _meta(help_text: str | None = None, **kwargs) -> dict:
    return {"help": help_text, **kwargs} if help_text else kwargs


@dataclass
class RunArguments:
    """How to run: not part of the recipe."""

    config_name: str = field(default=DEFAULT_CONFIG_NAME, metadata=_meta("folder with config.json and the processor"))
    recipe: str | None = field(
        default=None, metadata=_meta(f"training recipe JSON (default: <config_name>/{RECIPE_FILE})")
    )
    config_overrides: str | None = field(
        default=None,
        metadata=_meta(
            "SeraConfig fields to change, e.g. 'use_sera_adapter=false,use_sera_fusion=false' (the paper's "
            "baseline) or 'fusion_top_k=2'"
        ),
    )
    output_dir: str | None = field(
        default=None, metadata=_meta("model folder to write (default: outputs/<config folder name>)")
    )
    cpu_threads: int | None = field(
        default=None,
        metadata=_meta(
            "torch threads per process when training on CPU (default: the cores this process may use, shared among "
            "the processes on this machine; `accelerate launch` alone would leave one thread)"
        ),
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_meta(
            "a checkpoint folder, or 'latest' (the newest in <output_dir>/checkpoints; a fresh start if none)"
        ),
    )
    stop_after_steps: int | None = field(
        default=None, metadata=_meta("save a checkpoint and exit after this many optimizer steps")
    )
    no_progress_bar: bool = field(default=False, metadata=_meta("hide the tqdm bars"))


@dataclass
class RecipeArguments:
    """The training recipe: every field can come from the recipe JSON and be overridden on the command line."""

    # data
    dataset: str = field(
        default="synthref",
        metadata=_meta("synthref, refer:ROOT:DATASET:SPLIT_BY, a Hub id, or a folder written by save_to_disk"),
    )
    train_split: str = "train"
    validation_split: str | None = field(default="validation", metadata=_meta("'none' to skip validation"))
    test_splits: list[str] = field(
        default_factory=lambda: ["test", "test_unseen"], metadata=_meta("splits scored at the end ('' for none)")
    )
    synthetic_num_images: str | None = field(
        default=None,
        metadata=_meta("images per synthref split, e.g. train=8,validation=4 (default: synthetic_data's)"),
    )
    synthetic_seed: int = 0
    synthetic_cache_dir: str | None = field(default=None, metadata=_meta("default: ~/.cache/sera/synthref"))
    coco_image_dir: str | None = field(
        default=None, metadata=_meta("COCO train2014 images (REFER files, Hub mirrors)")
    )
    max_train_samples: int | None = None
    max_validation_samples: int | None = field(default=256, metadata=_meta("the capped validation subset"))
    max_eval_samples: int | None = field(
        default=None, metadata=_meta("cap on every split scored (validation and test)")
    )
    # The processor's settings (their one home); the recipe may set them for the run.
    image_size: int | None = field(
        default=None, metadata=_meta("letterbox side (default: the processor's; the paper: 448)")
    )
    max_text_length: int | None = field(
        default=None, metadata=_meta("tokens per expression (default: the processor's; the paper: 17, RefCOCOg 22)")
    )
    horizontal_flip_probability: float = field(
        default=0.0, metadata=_meta("flips that also swap left/right words; 0 = none (the paper)")
    )
    # model
    encoder_weights: str | None = field(
        default=None,
        metadata=_meta("a safetensors file or a folder with vision_encoder/ and text_encoder/ (see find_encoders)"),
    )
    vision_model_name_or_path: str | None = None
    text_model_name_or_path: str | None = None
    # How SERA's modules come in; the trainable set is the same either way (modeling_sera.trained_key_prefixes).
    # "peft": injected by the PEFT tuner into a plain base model, merged at export; "freeze": built in, with
    # freeze_encoders(). "auto" is the old spelling of "peft".
    tuning: Literal["peft", "freeze", "auto"] = "peft"
    # optimisation
    optimizer: Literal["adam", "adamw"] = "adam"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_milestones: list[int] = field(
        default_factory=lambda: [35, 55], metadata=_meta("epochs (of num_train_epochs) where lr *= lr_gamma")
    )
    lr_gamma: float = 0.1
    # [ours] "multistep" is the paper's step decay (lr_milestones, lr_gamma); "linear" and "cosine" are transformers'
    # schedules from the peak to zero, which a run cut to a few hundred steps can afford where step decay cannot.
    lr_scheduler_type: Literal["multistep", "linear", "cosine"] = field(
        default="multistep", metadata=_meta("'multistep' (the paper's), or 'linear' / 'cosine' decay to zero")
    )
    warmup_ratio: float = field(default=0.0, metadata=_meta("share of the optimizer steps spent warming up"))
    num_train_epochs: int = field(
        default=65, metadata=_meta("on the command line, also clears the recipe's max_train_steps")
    )
    max_train_steps: int | None = field(
        default=None, metadata=_meta("total optimizer steps; overrides num_train_epochs")
    )
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    seed: int = 42
    # bookkeeping
    eval_steps: int | None = field(default=None, metadata=_meta("validate every N steps ('none': after every epoch)"))
    checkpointing_steps: str | None = field(default=None, metadata=_meta("N, 'epoch' or 'none'"))
    checkpoints_total_limit: int | None = field(default=2, metadata=_meta("step_N checkpoints kept (best is apart)"))
    final_weights: Literal["best", "last"] = field(default="best", metadata=_meta("by validation mIoU, or the last"))
    logging_steps: int = 10
    report_to: str = field(
        default="tensorboard", metadata=_meta("tracker(s) for accelerate: tensorboard, wandb, all or none")
    )
    dataloader_num_workers: int = 0


@dataclass
class SeraTrainingArguments(RunArguments, RecipeArguments):
    """Both groups in one object, plus what they resolve to (``config_dir``, ``recipe_path``, ``output_dir``)."""

    def __post_init__(self):
        self.config_dir = resolve_config_dir(self.config_name)
        recipe_path = Path(self.recipe) if self.recipe else self.config_dir / RECIPE_FILE
        self.recipe_path = str(recipe_path) if recipe_path.is_file() else None
        self.output_dir = Path(self.output_dir or Path("outputs") / self.config_dir.resolve().name)
        self.test_splits = [split for item in self.test_splits or [] for split in re.split(r"[,\s]+", item) if split]
        self.lr_milestones = [int(m) for item in self.lr_milestones for m in re.split(r"[,\s]+", str(item)) if m]
        if isinstance(self.synthetic_num_images, str):
            self.synthetic_num_images = _split_counts(self.synthetic_num_images)
        self.checkpointing_steps = _checkpointing_steps(self.checkpointing_steps)
        check_settings(self)


RECIPE_FIELDS = tuple(item.name for item in fields(RecipeArguments))
RUN_FIELDS = tuple(item.name for item in fields(RunArguments))
# Command-line values that clear an optional field, and the flags whose single value may list several ("35,55").
NONE_WORDS = ("none", "null", "")


def recipe_of(args: SeraTrainingArguments) -> dict:
    """The resolved recipe, as written next to the model."""
    return {key: getattr(args, key) for key in RECIPE_FIELDS}


def _split_counts(text: str) -> dict:
    counts = {}
    for item in text.split(","):
        split, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise TrainingError(f"synthetic_num_images: expected SPLIT=N[,SPLIT=N...], got {text!r}")
        counts[split.strip()] = int(count)
    return counts


def _checkpointing_steps(value):
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in NONE_WORDS + ("no",):
        return None
    if text == "epoch":
        return "epoch"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise TrainingError(f"checkpointing_steps: expected a positive number of steps, 'epoch' or 'none', got {text!r}")


def _clearable(item_type):
    def parse(text: str):
        return None if text.lower() in NONE_WORDS else item_type(text)

    parse.__name__ = getattr(item_type, "__name__", "value")
    return parse


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (RunArguments, RecipeArguments),
        prog=PROG,
        description="Train SERA with accelerate. Every recipe field below overrides the field of the same name in "
        "the training recipe (<config_name>/training_recipe.json or --recipe).",
    )
    hints = {**get_type_hints(RunArguments), **get_type_hints(RecipeArguments)}
    optional = {name for name, hint in hints.items() if type(None) in get_args(hint)}
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _clearable(action.type)
        if action.dest == "resume_from_checkpoint":
            action.nargs, action.const = "?", "latest"
        if action.dest == "test_splits":
            action.nargs = "*"
        if action.dest == "lr_milestones":
            action.type, action.nargs = str, "*"  # "35 55" or "35,55": SeraTrainingArguments splits and converts
    return parser


def resolve_config_dir(config_name: str | Path) -> Path:
    """A config folder given relative to the working directory, the checkout or the installed package."""
    name = Path(config_name)
    candidates = [name] + [
        root / name.relative_to("hub_configs") for root in HUB_CONFIG_ROOTS if name.parts[:1] == ("hub_configs",)
    ]
    candidates += [root.parent / name for root in HUB_CONFIG_ROOTS[1:]]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise TrainingError(
        f"--config_name {config_name}: no config.json there. Pass a folder such as hub_configs/sera-synthref-tiny."
    )


def read_recipe(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise TrainingError(f"--recipe {path}: file not found.")
        return {}
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TrainingError(f"The recipe {path} is not valid JSON: {error}") from error
    recipe = {key: value for key, value in recipe.items() if not key.startswith("_")}
    unknown = sorted(key for key in recipe if key not in RECIPE_FIELDS)
    if unknown:
        raise TrainingError(f"Unknown fields in the recipe {path}: {unknown}. Known: {sorted(RECIPE_FIELDS)}.")
    return recipe


def parse_args(argv=None) -> SeraTrainingArguments:
    """Field defaults < recipe file < command line. Raises TrainingError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    run, _ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)[:2]
    recipe_path = Path(run.recipe) if run.recipe else resolve_config_dir(run.config_name) / RECIPE_FILE
    recipe = read_recipe(recipe_path, required=run.recipe is not None)
    given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    if "num_train_epochs" in given and "max_train_steps" not in given:
        recipe["max_train_steps"] = None  # epochs asked for on the command line mean epochs, whatever the recipe caps
    parser.set_defaults(**recipe)
    run, recipe_args = parser.parse_args_into_dataclasses(argv)
    return SeraTrainingArguments(**vars(run), **vars(recipe_args))


def check_settings(args: SeraTrainingArguments) -> None:
    positive = (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "logging_steps",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainingError(f"{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "eval_steps", "max_train_samples", "max_validation_samples", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1 (or none), got {value}.")
    if not args.learning_rate > 0:
        raise TrainingError(f"learning_rate must be positive, got {args.learning_rate}.")
    if args.lr_scheduler_type not in ("multistep", "linear", "cosine"):
        raise TrainingError(f"lr_scheduler_type must be multistep, linear or cosine, got {args.lr_scheduler_type!r}.")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise TrainingError(f"warmup_ratio must be in [0, 1), got {args.warmup_ratio}.")
    if args.warmup_ratio and args.lr_scheduler_type == "multistep":
        raise TrainingError("warmup_ratio needs lr_scheduler_type linear or cosine; the paper's step decay has none.")
    if sorted(args.lr_milestones) != list(args.lr_milestones):
        raise TrainingError(f"lr_milestones must be increasing, got {args.lr_milestones}.")
    if args.final_weights not in ("best", "last"):
        raise TrainingError(f"final_weights must be 'best' or 'last', got {args.final_weights!r}.")
    if args.tuning not in ("auto", "peft", "freeze"):
        raise TrainingError(f"tuning must be peft or freeze, got {args.tuning!r}.")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise TrainingError("--stop_after_steps must be at least 1.")
