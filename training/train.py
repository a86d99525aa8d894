"""Train SERA for referring image segmentation with accelerate, evaluate it and write a standalone model folder.

    accelerate launch training/train.py                      # the tiny default: synthref data, ~15 min on 2 CPU cores
    accelerate launch training/train.py --config_name hub_configs/sera-refcoco --dataset refer:/data/refer:refcoco:unc

What a run does:

1. Reads the model config and processor from ``--config_name`` (a folder such as ``hub_configs/sera-synthref-tiny``)
   and the training recipe from ``<config_name>/training_recipe.json`` (or ``--recipe``); every recipe field can be
   overridden on the command line (``--learning_rate 3e-4``...). The paper's recipe: Adam, lr 1e-4, x0.1 at epochs 35
   and 55 of 65, batch 16, 448 input, no flips.
2. Builds or reuses the data (``--dataset``, default the built-in synthetic ``synthref``) and fails at once with a
   clear message when it is missing or unreadable.
3. Builds SERA in the paper's regime: SERA-Adapters, SERA-Fusion and the head trained, both encoders frozen except
   their LayerNorm and bias terms. The encoders start from ``<config_name>/encoders.safetensors`` (or
   ``--encoder_weights``) when there is one, from random weights otherwise.
4. Trains with accelerate (any number of processes, gradient accumulation, seedable sampler), with a tqdm bar, tracker
   logging (tensorboard), validation mIoU/oIoU each epoch (or every ``--eval_steps``) on a capped validation subset,
   the best checkpoint by validation mIoU kept in ``<output_dir>/checkpoints/best``, regular checkpoints in
   ``<output_dir>/checkpoints/step_N`` and ``--resume_from_checkpoint latest`` continuing bit for bit.
   A NaN or infinite loss stops the run (exit code 3) and names the step and the loss component.
5. Scores the test splits (per category too), prints the table and writes ``<output_dir>``: the merged model and its
   processor with their remote code (``AutoModel.from_pretrained(dir, trust_remote_code=True)`` loads it), a
   model-card draft ``README.md`` with the results, ``eval_results.json`` and the resolved ``training_recipe.json``.
   ``checkpoints/`` and ``runs/`` (tensorboard) sit in the same folder; leave them out when pushing to the Hub.

Learning-rate schedule: ``lr_milestones`` are epochs of ``num_train_epochs``. The learning rate is multiplied by
``lr_gamma`` once ``milestone / num_train_epochs`` of the optimizer steps are done, so a run cut short with
``--max_train_steps`` keeps the paper's proportions (35/65 and 55/65 of the run).
"""

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from collate import COLLATOR_COLUMNS, ReferringSegmentationCollator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import modeling_sera
from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from modeling_sera.configuration_sera import FUSION_NUM_EXPERTS

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_NAME = "hub_configs/sera-synthref-tiny"
RECIPE_FILE = "training_recipe.json"
ENCODER_WEIGHT_FILES = ("encoders.safetensors", "encoders/model.safetensors")
REQUIRED_COLUMNS = ("image", "mask", "expression")
LOSS_COMPONENTS = ("loss", "mask_loss", "router_z_loss", "router_balance_loss", "router_entropy_loss")
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3

# Every recipe field with its built-in default: the paper's recipe where the paper says something.
RECIPE_DEFAULTS = {
    # data
    "dataset": "synthref",
    "train_split": "train",
    "validation_split": "validation",
    "test_splits": ["test", "test_unseen"],
    "synthetic_num_images": None,  # {"train": 2000, ...}; None = synthetic_data.DEFAULT_NUM_IMAGES
    "synthetic_seed": 0,
    "synthetic_cache_dir": None,  # None = ~/.cache/sera/synthref
    "coco_image_dir": None,
    "max_train_samples": None,
    "max_validation_samples": 256,  # the capped validation subset scored during training
    "max_eval_samples": None,  # caps every split scored (validation and test), for quick runs
    "image_size": None,  # None = the processor's (the paper: 448)
    "horizontal_flip_probability": 0.0,  # the paper: no flips ("left"/"right" would break)
    # model
    "encoder_weights": None,  # None = <config_name>/encoders.safetensors when present, else random encoders
    "vision_model_name_or_path": None,  # pretrained encoders, used when the config folder holds no processor
    "text_model_name_or_path": None,
    "tuning": "auto",  # "peft" (SeraTunerConfig), "freeze" (freeze_encoders) or "auto" (peft when available)
    # optimisation
    "optimizer": "adam",
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "lr_milestones": [35, 55],
    "lr_gamma": 0.1,
    "num_train_epochs": 65,
    "max_train_steps": None,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": None,
    "seed": 42,
    # bookkeeping
    "eval_steps": None,  # None = validate after every epoch (and always after the last step)
    "checkpointing_steps": None,  # an int, "epoch" or None
    "checkpoints_total_limit": 2,  # step_N checkpoints kept (best is kept apart)
    "final_weights": "best",  # "best" (by validation mIoU) or "last"
    "logging_steps": 10,
    "report_to": "tensorboard",  # or "none", "all", "wandb"...
    "dataloader_num_workers": 0,
}


class TrainingError(Exception):
    """A problem with the inputs of a run (data, config, recipe): reported as one clear line, exit code 2."""


class NonFiniteLossError(Exception):
    """The loss became NaN or infinite; the message says where."""


@dataclass
class TrainingProgress:
    """The counters a resumed run needs, saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    completed_steps: int = 0  # optimizer steps
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` consumed by this process when the checkpoint was taken
    samples_seen: int = 0  # over all processes
    best_metric: float = -1.0  # validation mIoU of the best checkpoint
    best_step: int = -1
    history: list = field(default_factory=list)  # validation results: {"step", "mIoU", "oIoU"}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ----------------------------------------------------------------------------------------------------------------------
# Command line and recipe


def _list_of(item_type):
    def parse(text: str):
        return [item_type(item) for item in re.split(r"[,\s]+", text.strip()) if item]

    return parse


def _optional(item_type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else item_type(text)

    return parse


def _split_counts(text: str) -> dict:
    counts = {}
    for item in text.split(","):
        split, sep, count = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected SPLIT=N[,SPLIT=N...], got {text!r}")
        counts[split.strip()] = int(count)
    return counts


def _checkpointing_steps(text: str):
    if text.lower() in ("none", "null", "no", ""):
        return None
    if text == "epoch":
        return "epoch"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive number of steps, 'epoch' or 'none', got {text!r}")


def _flatten(values):
    """``nargs="*"`` with a list type gives a list of lists: accept both "35 55" and "35,55"."""
    if values is None:
        return None
    return [item for value in values for item in (value if isinstance(value, list) else [value])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training/train.py",
        description="Train SERA with accelerate. Every option below that defaults to 'recipe' overrides the field of "
        "the same name in the training recipe (<config_name>/training_recipe.json or --recipe).",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--config_name", default=DEFAULT_CONFIG_NAME, help="folder with config.json and the processor")
    run.add_argument("--recipe", help=f"training recipe JSON (default: <config_name>/{RECIPE_FILE})")
    run.add_argument(
        "--config_overrides",
        help="SeraConfig fields to change, e.g. 'use_sera_adapter=false,use_sera_fusion=false' (the paper's baseline) "
        "or 'fusion_top_k=2'",
    )
    run.add_argument("--output_dir", help="model folder to write (default: outputs/<config folder name>)")
    run.add_argument(
        "--cpu_threads",
        type=int,
        help="torch threads per process when training on CPU (default: the cores this process may use, shared among "
        "the processes on this machine; `accelerate launch` alone would leave one thread)",
    )
    run.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const="latest",
        help="a checkpoint folder, or 'latest' (the newest in <output_dir>/checkpoints; a fresh start if none)",
    )
    run.add_argument("--stop_after_steps", type=int, help="save a checkpoint and exit after this many optimizer steps")
    run.add_argument(
        "--debug_log_dir",
        help="each process writes the sample ids it trained on and a checksum of its "
        "trainable weights here (to check sharding and synchronisation)",
    )
    run.add_argument("--no_progress_bar", action="store_true", help="hide the tqdm bars")

    recipe = parser.add_argument_group("recipe overrides (default: the recipe's value)")

    def add(*names, **kwargs):  # absent from the parsed namespace unless given, so that "none" can clear a field
        recipe.add_argument(*names, default=argparse.SUPPRESS, **kwargs)

    add("--dataset", help="synthref, refer:ROOT:DATASET:SPLIT_BY, a Hub id, or a folder written by save_to_disk")
    add("--train_split")
    add("--validation_split", type=_optional(str), help="'none' to skip validation")
    add("--test_splits", type=_list_of(str), nargs="*", help="splits scored at the end ('' for none)")
    add("--synthetic_num_images", type=_split_counts, help="images per synthref split, e.g. train=8,validation=4")
    add("--synthetic_seed", type=int)
    add("--synthetic_cache_dir")
    add("--coco_image_dir")
    add("--max_train_samples", type=_optional(int))
    add("--max_validation_samples", type=_optional(int))
    add("--max_eval_samples", type=_optional(int), help="cap on every split scored (validation and test)")
    add("--image_size", type=_optional(int), help="letterbox side (the paper: 448)")
    add("--horizontal_flip_probability", type=float, help="flips that also swap left/right words; 0 = none")
    add("--encoder_weights", type=_optional(str))
    add("--vision_model_name_or_path", type=_optional(str))
    add("--text_model_name_or_path", type=_optional(str))
    add("--tuning", choices=("auto", "peft", "freeze"))
    add("--optimizer", choices=("adam", "adamw"))
    add("--learning_rate", type=float)
    add("--weight_decay", type=float)
    add("--adam_beta1", type=float)
    add("--adam_beta2", type=float)
    add("--adam_epsilon", type=float)
    add("--lr_milestones", type=_list_of(int), nargs="*", help="epochs (of num_train_epochs) where lr *= lr_gamma")
    add("--lr_gamma", type=float)
    add("--num_train_epochs", type=int, help="on the command line, also clears the recipe's max_train_steps")
    add("--max_train_steps", type=_optional(int), help="total optimizer steps; overrides num_train_epochs")
    add("--per_device_train_batch_size", type=int)
    add("--per_device_eval_batch_size", type=int)
    add("--gradient_accumulation_steps", type=int)
    add("--max_grad_norm", type=_optional(float))
    add("--seed", type=int)
    add("--eval_steps", type=_optional(int), help="validate every N steps ('none': after every epoch)")
    add("--checkpointing_steps", type=_checkpointing_steps, help="N, 'epoch' or 'none'")
    add("--checkpoints_total_limit", type=_optional(int))
    add("--final_weights", choices=("best", "last"))
    add("--logging_steps", type=int)
    add("--report_to", help="tracker(s) for accelerate: tensorboard, wandb, all or none")
    add("--dataloader_num_workers", type=int)
    return parser


def resolve_config_dir(config_name: str) -> Path:
    """A config folder given relative to the working directory or to the repository."""
    for candidate in (Path(config_name), REPO_ROOT / config_name):
        if (candidate / "config.json").is_file():
            return candidate
    raise TrainingError(
        f"--config_name {config_name}: no config.json there (nor under {REPO_ROOT}). "
        "Pass a folder such as hub_configs/sera-synthref-tiny."
    )


def parse_args(argv=None) -> argparse.Namespace:
    """Command line + recipe: built-in defaults < recipe file < command line. Raises TrainingError on bad input."""
    parser = build_parser()
    cli = parser.parse_args(argv)
    config_dir = resolve_config_dir(cli.config_name)
    recipe_path = Path(cli.recipe) if cli.recipe else config_dir / RECIPE_FILE
    recipe = {}
    if recipe_path.is_file():
        try:
            recipe = json.loads(recipe_path.read_text())
        except json.JSONDecodeError as error:
            raise TrainingError(f"The recipe {recipe_path} is not valid JSON: {error}") from error
    elif cli.recipe:
        raise TrainingError(f"--recipe {cli.recipe}: file not found.")
    unknown = sorted(key for key in recipe if key not in RECIPE_DEFAULTS and not key.startswith("_"))
    if unknown:
        raise TrainingError(
            f"Unknown fields in the recipe {recipe_path}: {unknown}. Known: {sorted(RECIPE_DEFAULTS)}."
        )

    overrides = {key: getattr(cli, key) for key in RECIPE_DEFAULTS if hasattr(cli, key)}
    for key in ("test_splits", "lr_milestones"):
        if key in overrides:
            overrides[key] = _flatten(overrides[key])
    # Asking for epochs on the command line means epochs, even when the recipe caps the steps.
    if "num_train_epochs" in overrides and "max_train_steps" not in overrides:
        overrides["max_train_steps"] = None
    settings = {**RECIPE_DEFAULTS, **{k: v for k, v in recipe.items() if not k.startswith("_")}, **overrides}

    args = argparse.Namespace(**{**vars(cli), **{key: settings[key] for key in RECIPE_DEFAULTS}})
    args.config_dir = config_dir
    args.recipe_path = str(recipe_path) if recipe_path.is_file() else None
    args.output_dir = Path(cli.output_dir or Path("outputs") / config_dir.resolve().name)
    check_settings(args)
    return args


def check_settings(args) -> None:
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
    if sorted(args.lr_milestones) != list(args.lr_milestones):
        raise TrainingError(f"lr_milestones must be increasing, got {args.lr_milestones}.")
    if args.final_weights not in ("best", "last"):
        raise TrainingError(f"final_weights must be 'best' or 'last', got {args.final_weights!r}.")
    if args.tuning not in ("auto", "peft", "freeze"):
        raise TrainingError(f"tuning must be auto, peft or freeze, got {args.tuning!r}.")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise TrainingError("--stop_after_steps must be at least 1.")


def recipe_of(args) -> dict:
    """The resolved recipe, as written next to the model."""
    return {key: getattr(args, key) for key in RECIPE_DEFAULTS}


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_splits(args, accelerator) -> dict[str, datasets.Dataset]:
    """Every split the run needs, checked: present, non-empty, with the schema's columns, first row readable."""
    wanted = [args.train_split]
    if args.validation_split:
        wanted.append(args.validation_split)
    wanted += [split for split in args.test_splits if split not in wanted]
    source = args.dataset
    with accelerator.main_process_first():  # the main process builds the synthetic data once, the others reuse it
        try:
            if source == "synthref":
                import synthetic_data

                everything = synthetic_data.build_synthetic_dataset(
                    cache_dir=args.synthetic_cache_dir,
                    seed=args.synthetic_seed,
                    num_images=args.synthetic_num_images,
                )
                splits = {split: everything[split] for split in wanted if split in everything}
            elif Path(source).is_dir() and (Path(source) / "dataset_dict.json").is_file():
                everything = datasets.load_from_disk(source)
                splits = {split: everything[split] for split in wanted if split in everything}
            else:
                from data_sources import load_examples

                splits = {split: load_examples(source, split, coco_image_dir=args.coco_image_dir) for split in wanted}
        except Exception as error:  # every loader failure becomes one clear message
            raise TrainingError(
                f"Could not load the dataset {source!r} ({type(error).__name__}: {error}). Check --dataset "
                "(synthref, refer:ROOT:DATASET:SPLIT_BY, a Hub id, or a folder written by save_to_disk)."
            ) from error

    missing = [split for split in wanted if split not in splits]
    if missing:
        raise TrainingError(f"The dataset {source!r} has no split(s) {missing}; it has {sorted(splits)}.")
    for split, dataset in splits.items():
        absent = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
        if absent:
            raise TrainingError(f"Split {split!r} of {source!r} lacks the column(s) {absent} (see data_schema.py).")
        if len(dataset) == 0:
            raise TrainingError(f"Split {split!r} of {source!r} is empty.")
        try:
            row = dataset[0]
            row["image"].convert("RGB").load()
            row["mask"].load()
        except Exception as error:
            raise TrainingError(
                f"The first example of split {split!r} of {source!r} cannot be read ({type(error).__name__}: "
                f"{error}). The dataset files are damaged or incomplete: rebuild or re-download them."
            ) from error
    return splits


def capped(dataset: datasets.Dataset, limit, seed: int) -> datasets.Dataset:
    """A fixed random subset of at most `limit` rows (the whole split when `limit` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


# ----------------------------------------------------------------------------------------------------------------------
# Model


def load_model_config(args) -> SeraConfig:
    """The config folder's SeraConfig with --config_overrides applied and checked again."""
    config = SeraConfig.from_pretrained(args.config_dir)
    if getattr(args, "config_overrides", None):
        try:
            config.update_from_string(args.config_overrides)
            config.check_settings()
        except ValueError as error:
            raise TrainingError(f"--config_overrides {args.config_overrides!r}: {error}") from error
    return config


def load_config_and_processor(args) -> tuple[SeraConfig, SeraProcessor]:
    config = load_model_config(args)
    encoders = find_encoders(args)
    try:
        if (args.config_dir / "processor_config.json").is_file():
            processor = SeraProcessor.from_pretrained(args.config_dir)
        elif encoders is not None and encoders.file is None:
            processor = SeraProcessor.from_encoders(
                encoders.vision,
                encoders.text,
                image_size=config.image_size,
                max_text_length=config.max_text_length,
                mask_threshold=config.mask_threshold,
            )
        else:
            raise TrainingError(
                f"{args.config_dir} holds no processor (processor_config.json and tokenizer files). Save one there, "
                "or name the pretrained encoders (vision_model_name_or_path and text_model_name_or_path in the "
                "recipe, or --encoder_weights with vision_encoder/ and text_encoder/), whose processor files are "
                "then used."
            )
    except (OSError, ValueError) as error:
        raise TrainingError(f"Could not load the processor for {args.config_dir}: {error}") from error
    if args.image_size is not None and args.image_size != config.image_size:
        patch = config.vision_patch_size
        if args.image_size % patch:
            raise TrainingError(f"image_size {args.image_size} must be a multiple of the patch size {patch}.")
        config.image_size = args.image_size
        processor.image_processor.size = {"height": args.image_size, "width": args.image_size}
    side = processor.image_processor.size
    side = side["height"] if isinstance(side, dict) else side.height
    if side != config.image_size:
        raise TrainingError(f"The processor letterboxes to {side} but the config says image_size={config.image_size}.")
    return config, processor


@dataclass(frozen=True)
class EncoderSource:
    """Where the pretrained encoders come from: two model folders / Hub ids, or one safetensors file."""

    vision: str | None = None
    text: str | None = None
    file: Path | None = None

    def describe(self) -> str:
        return f"`{self.file}`" if self.file else f"`{self.vision}` (vision) and `{self.text}` (text)"


def find_encoders(args) -> EncoderSource | None:
    """The pretrained encoders, first found of: ``encoder_weights`` (a safetensors file, or a folder holding
    ``vision_encoder/`` and ``text_encoder/``); ``vision_model_name_or_path`` + ``text_model_name_or_path``;
    ``<config_name>/vision_encoder`` + ``text_encoder`` (what pretrain_encoders.py writes); ``<config_name>/``
    ``encoders.safetensors``. None: the encoders start from random weights."""
    if args.encoder_weights:
        path = Path(args.encoder_weights)
        if path.is_file():
            return EncoderSource(file=path)
        if (path / "vision_encoder").is_dir() and (path / "text_encoder").is_dir():
            return EncoderSource(vision=str(path / "vision_encoder"), text=str(path / "text_encoder"))
        raise TrainingError(
            f"encoder_weights {path}: neither a safetensors file nor a folder with vision_encoder/ and text_encoder/."
        )
    if args.vision_model_name_or_path and args.text_model_name_or_path:
        return EncoderSource(vision=args.vision_model_name_or_path, text=args.text_model_name_or_path)
    vision, text = args.config_dir / "vision_encoder", args.config_dir / "text_encoder"
    if (vision / "config.json").is_file() and (text / "config.json").is_file():
        return EncoderSource(vision=str(vision), text=str(text))
    for name in ENCODER_WEIGHT_FILES:
        if (args.config_dir / name).is_file():
            return EncoderSource(file=args.config_dir / name)
    return None


def load_encoders(model: SeraForReferringSegmentation, source: EncoderSource) -> None:
    """Copy pretrained encoder weights into SERA's encoders, whatever SERA modules sit inside them already; fails
    when a pretrained tensor finds no home or an encoder tensor stays unset."""
    if source.file is None:
        from transformers import AutoConfig, AutoModel, CLIPTextModelWithProjection, CLIPVisionModel

        from modeling_sera.modeling_sera import load_encoder_weights

        try:
            is_clip = AutoConfig.from_pretrained(source.vision).model_type in ("clip", "clip_vision_model")
            vision = (CLIPVisionModel if is_clip else AutoModel).from_pretrained(source.vision)
            text = CLIPTextModelWithProjection.from_pretrained(source.text)
            load_encoder_weights(model.model.vision_model, vision)
            load_encoder_weights(model.model.text_model, text)
        except (OSError, ValueError) as error:
            raise TrainingError(f"Could not load the encoders {source.describe()}: {error}") from error
        return

    from safetensors.torch import load_file

    state = {key.removeprefix("model."): value for key, value in load_file(str(source.file)).items()}
    targets = [
        key
        for key in model.model.state_dict()
        if key.startswith(("vision_model.", "text_model.")) and "sera_adapter" not in key
    ]
    plain_to_target = {key.replace(".base_layer.", "."): key for key in targets}
    unexpected = sorted(key for key in state if key not in plain_to_target)
    missing = sorted(key for key in plain_to_target if key not in state)
    if unexpected or missing:
        raise TrainingError(
            f"The encoder weights {source.file} do not fit the config: unexpected {unexpected[:5]}, "
            f"missing {missing[:5]} (keys must be vision_model.* and text_model.*)."
        )
    model.model.load_state_dict({plain_to_target[key]: value for key, value in state.items()}, strict=False)


def sera_tuner_available() -> bool:
    return hasattr(modeling_sera, "SeraTunerConfig")


def build_trainable_model(config: SeraConfig, args) -> tuple[torch.nn.Module, str]:
    """SERA in the paper's regime: SERA modules and head trainable; encoders frozen except LayerNorm and bias terms.

    With the PEFT tuner (``modeling_sera.SeraTunerConfig``) the base model is built without SERA modules and
    ``peft.get_peft_model`` injects them; otherwise SERA is built with them and ``freeze_encoders()`` sets the
    trainable set. Returns the model and the way it was made ("peft" or "freeze"); :func:`plain_model` turns either
    into a plain ``SeraForReferringSegmentation``.
    """
    tuning = args.tuning
    if tuning == "auto":
        tuning = "peft" if sera_tuner_available() else "freeze"
    if tuning == "peft" and not sera_tuner_available():
        raise TrainingError("tuning='peft' needs modeling_sera.SeraTunerConfig, which this install does not have.")

    base_config = copy.deepcopy(config)
    if tuning == "peft":
        base_config.use_sera_adapter = False
        base_config.use_sera_fusion = False
    model = SeraForReferringSegmentation(base_config)
    encoders = find_encoders(args)
    if encoders is not None:
        load_encoders(model, encoders)
        logger.info(f"Encoders loaded from {encoders.describe()}")
    else:
        logger.warning(
            f"No pretrained encoders (vision_encoder/ + text_encoder/ or {ENCODER_WEIGHT_FILES[0]} in "
            f"{args.config_dir}, or --encoder_weights): the encoders start from random weights and stay frozen "
            "except their norms and biases, so expect modest scores."
        )

    if tuning == "peft":
        import peft

        tuner_config = modeling_sera.SeraTunerConfig.from_sera_config(config)
        model = peft.get_peft_model(model, tuner_config)
    else:
        model.freeze_encoders()
    return model, tuning


def plain_model(model: torch.nn.Module, tuning: str) -> SeraForReferringSegmentation:
    """A plain SeraForReferringSegmentation with the trained weights (PEFT modules merged in)."""
    return model.merge_and_unload() if tuning == "peft" else model


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(trainable_named_parameters(model)):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    parameters = [parameter for _, parameter in trainable_named_parameters(model)]
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    return torch.optim.Adam(parameters, **kwargs)


def milestone_steps(args, total_steps: int) -> list[int]:
    """The optimizer steps where the learning rate decays: the recipe's epoch milestones, as shares of the run."""
    return [max(1, round(milestone * total_steps / args.num_train_epochs)) for milestone in args.lr_milestones]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(args) -> Path:
    return args.output_dir / "checkpoints"


def step_checkpoints(directory: Path) -> list[Path]:
    """Finished step_N checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.glob("step_*") if re.fullmatch(r"step_\d+", path.name) and path.is_dir()]
    return sorted(found, key=lambda path: int(path.name.split("_")[1]))


def restore_checkpoint(path: Path) -> None:
    """Puts back a checkpoint that save_checkpoint had moved aside when a kill stopped it from renaming the new one
    into place."""
    previous = path.with_name(f".{path.name}.old")
    if not path.exists() and previous.is_dir():
        previous.rename(path)


def save_checkpoint(accelerator, args, progress: TrainingProgress, name: str) -> Path:
    """accelerator.save_state into <checkpoints>/<name>, written aside and renamed, so a checkpoint that exists is
    complete; then the oldest step_N checkpoints beyond checkpoints_total_limit are removed."""
    final = checkpoint_dir(args) / name
    partial = checkpoint_dir(args) / f".{name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "progress.json").write_text(json.dumps(progress.state_dict(), indent=2) + "\n")
        # Replacing `best`: the old one is moved aside, not deleted, until the new one is in place, so a kill at any
        # moment leaves a complete `best` or a `.best.old` that restore_checkpoint puts back.
        previous = final.with_name(f".{name}.old")
        if previous.exists():
            shutil.rmtree(previous)
        if final.exists():
            final.rename(previous)
        partial.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
        if name.startswith("step_") and args.checkpoints_total_limit:
            for old in step_checkpoints(checkpoint_dir(args))[: -args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"Checkpoint saved: {final}")
    return final


def resolve_resume_path(args) -> Path | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = step_checkpoints(checkpoint_dir(args))
        if not found:
            logger.warning(
                f"--resume_from_checkpoint latest: no checkpoint in {checkpoint_dir(args)}; starting fresh."
            )
            return None
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / "progress.json").is_file():
        raise TrainingError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no progress.json).")
    return path


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Only the model weights of an accelerate checkpoint (the optimizer and counters stay as they are)."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and the model folder


def evaluate_split(model, processor, dataset, args, **kwargs):
    from evaluation import evaluate_referring_segmentation

    was_training = model.training
    results = evaluate_referring_segmentation(
        model, processor, dataset, batch_size=args.per_device_eval_batch_size, show_progress=False, **kwargs
    )
    model.train(was_training)
    return results


def write_model_card(path: Path, model, args, report: dict) -> None:
    """The draft card of the trained folder, rendered like a published one (``model_card.build_model_card``)."""
    from model_card import build_model_card

    reports = [report] if report["splits"] else []
    card = build_model_card(
        model, repo_id=args.output_dir.name, recipe=recipe_of(args), reports=reports, training_summary=report["train"]
    )
    card.save(path)


# ----------------------------------------------------------------------------------------------------------------------
# Training


def cpu_threads_per_process(accelerator: Accelerator) -> int:
    """The cores this process may use, shared among the processes on this machine.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which would leave a single-process CPU run on
    one core of several.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    # sched_getaffinity honours CPU pinning (containers, taskset); it is Linux-only, cpu_count is the fallback.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except TrainingError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    # With fewer than all fusion experts per sample, an expert can go unused in a step: DDP must then be told.
    try:
        config = load_model_config(args)
    except TrainingError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sparse_routing = config.use_sera_fusion and config.fusion_top_k < FUSION_NUM_EXPERTS
    accelerator = Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if sparse_routing else None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "runs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads or cpu_threads_per_process(accelerator))
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown ours
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    try:
        return train(args, accelerator)
    except TrainingError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    finally:
        accelerator.end_training()


def train(args, accelerator: Accelerator) -> int:
    start_time = time.perf_counter()
    set_seed(args.seed)
    config, processor = load_config_and_processor(args)
    splits = load_splits(args, accelerator)
    train_data = capped(splits[args.train_split], args.max_train_samples, args.seed).select_columns(
        list(COLLATOR_COLUMNS)
    )
    validation_data = None
    if args.validation_split:
        limit = min(x for x in (args.max_validation_samples, args.max_eval_samples, math.inf) if x is not None)
        validation_data = capped(splits[args.validation_split], None if limit == math.inf else limit, args.seed)
    test_data = {split: capped(splits[split], args.max_eval_samples, args.seed) for split in args.test_splits}

    model, tuning = build_trainable_model(config, args)
    num_trainable = sum(parameter.numel() for _, parameter in trainable_named_parameters(model))
    num_total = sum(parameter.numel() for parameter in model.parameters())
    encoders = find_encoders(args)
    encoders_text = (
        f"pretrained, from {encoders.describe()}"
        if encoders is not None
        else "random (no pretrained encoder weights were available)"
    )
    optimizer = build_optimizer(model, args)
    collator = ReferringSegmentationCollator(processor, args.horizontal_flip_probability, seed=args.seed)
    # A generator of its own: the shuffling (reseeded with seed + epoch by accelerate's seedable sampler) and the
    # loader's worker seeds never draw from the global RNG, so a resumed run draws the same dropout and router noise.
    train_dataloader = DataLoader(
        train_data,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Stepped by hand once per optimizer step (never prepared), so its count does not depend on the process count.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer.optimizer, milestones=milestone_steps(args, total_steps), gamma=args.lr_gamma
    )
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)

    if args.report_to not in (None, "none"):
        hyperparameters = {
            key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for key, value in recipe_of(args).items()
        }
        accelerator.init_trackers("sera", config=hyperparameters)

    resume_from = resolve_resume_path(args)
    if resume_from is None and step_checkpoints(checkpoint_dir(args)):
        logger.warning(
            f"{checkpoint_dir(args)} holds checkpoints of an earlier run; this run starts afresh and replaces them as "
            "it goes. Pass --resume_from_checkpoint latest to continue that run instead."
        )
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        logger.info(f"Resumed from {resume_from}: step {progress.completed_steps}, epoch {progress.epoch}")

    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_data)} training expressions, {accelerator.num_processes} process(es), global batch "
        f"{global_batch}, {steps_per_epoch} steps per epoch, {total_steps} steps ({num_epochs} epochs), lr "
        f"{args.learning_rate} x{args.lr_gamma} at steps {milestone_steps(args, total_steps)}; tuning: {tuning}; "
        f"trainable {num_trainable:,} of {num_total:,} parameters"
    )

    debug_dir = Path(args.debug_log_dir) if args.debug_log_dir else None
    if debug_dir is not None:
        debug_dir.mkdir(parents=True, exist_ok=True)
        sample_log = open(debug_dir / f"samples_rank{accelerator.process_index}.jsonl", "a")  # noqa: SIM115

    def validate() -> dict | None:
        results = None
        if validation_data is not None and accelerator.is_main_process:
            results = evaluate_split(accelerator.unwrap_model(model), processor, validation_data, args)
        results = broadcast_object_list([results])[0]
        model.train()
        return results

    best_dir = checkpoint_dir(args) / "best"
    if accelerator.is_main_process:
        restore_checkpoint(best_dir)
    accelerator.wait_for_everyone()

    def after_step_validation() -> None:
        results = validate()
        if results is None:
            return
        step = progress.completed_steps
        per_category = {category: scores["mIoU"] for category, scores in results.get("per_category", {}).items()}
        progress.history.append(
            {"step": step, "mIoU": results["mIoU"], "oIoU": results["oIoU"], "per_category_mIoU": per_category}
        )
        if accelerator.is_main_process:  # validation mIoU per category against steps, next to the TensorBoard logs
            from gallery import write_validation_plot

            write_validation_plot(progress.history, args.output_dir / "runs" / "validation_mIoU.png")
        accelerator.log({"validation/mIoU": results["mIoU"], "validation/oIoU": results["oIoU"]}, step=step)
        logger.info(f"step {step}: validation mIoU {results['mIoU']:.2f}, oIoU {results['oIoU']:.2f}")
        if results["mIoU"] > progress.best_metric:
            progress.best_metric = results["mIoU"]
            progress.best_step = step
            save_checkpoint(accelerator, args, progress, "best")

    progress_bar = tqdm(
        total=total_steps,
        initial=progress.completed_steps,
        desc="Training",
        unit="step",
        disable=args.no_progress_bar or not accelerator.is_local_main_process,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    model.train()
    trained_samples_here = 0  # since this (re)start, over all processes, for the throughput
    train_start = time.perf_counter()
    interval = {name: 0.0 for name in LOSS_COMPONENTS}
    interval_batches = 0
    last_checkpoint = resume_from
    stopped_early = False
    done = progress.completed_steps >= total_steps

    # The forward pass updates BatchNorm statistics before its loss can be checked: keep those of the last good step,
    # so that a non-finite loss leaves the model exactly as that step left it.
    good_buffers = snapshot_buffers(accelerator.unwrap_model(model))

    while not done and progress.epoch < num_epochs:
        epoch = progress.epoch
        collator.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        skip = progress.batches_in_epoch
        if skip >= len(train_dataloader):  # the checkpoint was taken at the very end of the epoch
            progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            continue
        active_dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        batches_at_last_step = skip
        for batch in active_dataloader:
            sample_ids = batch.pop("sample_ids")
            with accelerator.accumulate(model):
                outputs = model(**batch)
                components = torch.stack([getattr(outputs, name).detach().float() for name in LOSS_COMPONENTS])
                per_process = accelerator.gather(components[None])  # (num_processes, components)
                if not torch.isfinite(per_process).all():
                    progress.batches_in_epoch = batches_at_last_step  # the state after the last good step
                    restore_buffers(accelerator.unwrap_model(model), good_buffers)
                    raise_non_finite(accelerator, args, progress, per_process, last_checkpoint)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()

            progress.batches_in_epoch += 1
            batch_samples = len(sample_ids) * accelerator.num_processes
            trained_samples_here += batch_samples
            progress.samples_seen += batch_samples
            mean_components = per_process.mean(dim=0)
            for index, name in enumerate(LOSS_COMPONENTS):
                interval[name] += mean_components[index].item()
            interval_batches += 1
            if debug_dir is not None:
                record = {"step": progress.completed_steps, "epoch": epoch, "sample_ids": sample_ids.tolist()}
                sample_log.write(json.dumps(record) + "\n")
            if not accelerator.sync_gradients:
                continue

            # One optimizer step is complete.
            scheduler.step()
            progress.completed_steps += 1
            batches_at_last_step = progress.batches_in_epoch
            good_buffers = snapshot_buffers(accelerator.unwrap_model(model))
            step = progress.completed_steps
            throughput = trained_samples_here / max(time.perf_counter() - train_start, 1e-9)
            progress_bar.update(1)
            progress_bar.set_postfix(
                loss=f"{mean_components[0].item():.4f}",
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
                samples_per_s=f"{throughput:.1f}",
                refresh=False,
            )
            if step % args.logging_steps == 0 or step == total_steps:
                logs = {f"train/{name}": value / interval_batches for name, value in interval.items()}
                logs.update(
                    {
                        "train/learning_rate": scheduler.get_last_lr()[0],
                        "train/samples_per_second": throughput,
                        "train/epoch": epoch + progress.batches_in_epoch / len(train_dataloader),
                    }
                )
                accelerator.log(logs, step=step)
                interval = {name: 0.0 for name in LOSS_COMPONENTS}
                interval_batches = 0

            end_of_epoch = progress.batches_in_epoch >= len(train_dataloader)
            last = step >= total_steps
            if (args.eval_steps and step % args.eval_steps == 0) or last or (not args.eval_steps and end_of_epoch):
                after_step_validation()
            if (isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0) or (
                args.checkpointing_steps == "epoch" and end_of_epoch
            ):
                last_checkpoint = save_checkpoint(accelerator, args, progress, f"step_{step}")
            if args.stop_after_steps is not None and step >= args.stop_after_steps and not last:
                if last_checkpoint is None or last_checkpoint.name != f"step_{step}":
                    last_checkpoint = save_checkpoint(accelerator, args, progress, f"step_{step}")
                stopped_early = True
            if last or stopped_early:
                done = True
                break
        else:
            progress.epoch, progress.batches_in_epoch = epoch + 1, 0
    progress_bar.close()
    train_runtime = time.perf_counter() - train_start
    accelerator.wait_for_everyone()

    if debug_dir is not None:
        sample_log.close()
        checksum = {
            "rank": accelerator.process_index,
            "completed_steps": progress.completed_steps,
            "sha256": weights_checksum(accelerator.unwrap_model(model)),
        }
        (debug_dir / f"weights_rank{accelerator.process_index}.json").write_text(json.dumps(checksum) + "\n")
    if stopped_early:
        logger.info(f"Stopped after {progress.completed_steps} steps as asked; resume with --resume_from_checkpoint")
        return 0

    # The final model: the best validation checkpoint, or the last weights.
    unwrapped = accelerator.unwrap_model(model)
    weights_from = f"the last step ({progress.completed_steps})"
    if args.final_weights == "best" and progress.best_step > 0 and (best_dir / "model.safetensors").is_file():
        if progress.best_step != progress.completed_steps:
            load_model_weights(unwrapped, best_dir)
        weights_from = f"step {progress.best_step}, the best validation mIoU ({progress.best_metric:.2f})"
    if not accelerator.is_main_process:
        return 0

    final_model = plain_model(unwrapped, tuning)
    final_model.eval()
    from data_sources import parse_source

    data_name = parse_source(args.dataset).name  # "refcoco(unc)", a Hub id or a folder's name: never a local path
    results_by_split = {}
    for split, dataset in test_data.items():
        logger.info(f"Scoring {split} ({len(dataset)} expressions)")
        results_by_split[split], records = evaluate_split(final_model, processor, dataset, args, record_samples=True)
        from gallery import GALLERY_PER_CATEGORY, gallery_file_name, write_gallery  # a contact sheet per split

        sheet = args.output_dir / gallery_file_name(split)
        title = f"{data_name} {split}"
        write_gallery(final_model, processor, dataset, records, sheet, GALLERY_PER_CATEGORY, args.seed, title)

    # The model folder is written aside and its files moved in with config.json last: a folder that from_pretrained
    # can load is always a complete export, whenever the run is killed.
    args.output_dir.mkdir(parents=True, exist_ok=True)
    export = args.output_dir / ".export.partial"
    if export.exists():
        shutil.rmtree(export)
    final_model.save_pretrained(export)
    processor.save_pretrained(export)
    (export / RECIPE_FILE).write_text(json.dumps(recipe_of(args), indent=2) + "\n")
    training_summary = {
        "completed_steps": progress.completed_steps,
        "epochs": progress.samples_seen / len(train_data),
        "samples_seen": progress.samples_seen,
        "num_processes": accelerator.num_processes,
        "train_runtime_s": train_runtime,
        "train_samples_per_second": trained_samples_here / max(train_runtime, 1e-9),
        "total_runtime_s": time.perf_counter() - start_time,
        "tuning": tuning,
        "encoders": encoders_text,
        "trainable_parameters": num_trainable,
        "total_parameters": num_total,
        "weights_from": weights_from,
    }
    report = {
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
    (export / "eval_results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_model_card(export / "README.md", final_model, args, report)
    for path in sorted(export.iterdir(), key=lambda path: path.name == "config.json"):
        os.replace(path, args.output_dir / path.name)
    export.rmdir()

    if results_by_split:
        from evaluation import format_category_table, format_results_table

        print(f"\n{data_name}, scores in % (oIoU = cIoU, mIoU = gIoU), weights from {weights_from}\n")
        print(format_results_table(results_by_split))
        category_table = format_category_table(results_by_split)
        if category_table:
            print("\n" + category_table)
    print(f"\nModel written to {args.output_dir} ({time.perf_counter() - start_time:.0f} s in all)")
    return 0


def snapshot_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def restore_buffers(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(snapshot[name])


def raise_non_finite(accelerator, args, progress: TrainingProgress, per_process: torch.Tensor, last_checkpoint):
    """Keep the last good weights as a checkpoint, then stop with a message naming the step and the component."""
    bad = []
    for rank, values in enumerate(per_process.tolist()):
        names = [f"{name}={value}" for name, value in zip(LOSS_COMPONENTS, values) if not math.isfinite(value)]
        if names:
            bad.append(f"rank {rank}: " + ", ".join(names))
    components = {
        name for name, value in zip(LOSS_COMPONENTS, per_process.T.tolist()) if not all(map(math.isfinite, value))
    }
    culprit = [name for name in LOSS_COMPONENTS[1:] if name in components] or [
        "loss (the sum of finite parts overflowed)"
    ]
    step = progress.completed_steps + 1
    # The weights are still those after the last good step: keep them, unless that checkpoint exists already.
    if progress.completed_steps > 0 and not (checkpoint_dir(args) / f"step_{progress.completed_steps}").exists():
        last_checkpoint = save_checkpoint(accelerator, args, progress, f"step_{progress.completed_steps}")
    elif progress.completed_steps > 0:
        last_checkpoint = checkpoint_dir(args) / f"step_{progress.completed_steps}"
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    raise NonFiniteLossError(
        f"error: non-finite loss at optimizer step {step} (epoch {progress.epoch}, batch "
        f"{progress.batches_in_epoch + 1}): {'; '.join(bad)}. Non-finite component(s): {', '.join(culprit)}. "
        f"Training stopped; {kept}. Lower --learning_rate or set --max_grad_norm, then resume with "
        "--resume_from_checkpoint."
    )


if __name__ == "__main__":
    sys.exit(main())
