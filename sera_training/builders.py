"""What a run is built from: the model config and processor, the pretrained encoders, the trainable model, the
optimizer, the learning-rate schedule, the data splits and the training DataLoader.

Which parameters train is decided in ``modeling_sera`` (the PEFT tuner ``SeraTunerConfig`` / ``freeze_encoders``);
:func:`build_trainable_model` only calls it. The learning rate decays in :func:`build_lr_scheduler`, and only there.
"""

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from transformers import get_scheduler

import modeling_sera
from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from sera_training.arguments import SeraTrainingArguments, TrainingError
from sera_training.collate import COLLATOR_COLUMNS, ReferringSegmentationCollator


logger = get_logger(__name__)

REQUIRED_COLUMNS = ("image", "mask", "expression")


# ---------------------------------------------------------------------------------------------------------------------
# Config, processor and encoders


def load_model_config(args: SeraTrainingArguments) -> SeraConfig:
    """The config folder's SeraConfig with --config_overrides applied and checked again."""
    config = SeraConfig.from_pretrained(args.config_dir)
    if args.config_overrides:
        try:
            config.update_from_string(args.config_overrides)
            config.check_settings()
        except ValueError as error:
            raise TrainingError(f"--config_overrides {args.config_overrides!r}: {error}") from error
    return config


@dataclass(frozen=True)
class EncoderSource:
    """Where the pretrained encoders come from: two model folders / Hub ids, or one safetensors file."""

    vision: str | None = None
    text: str | None = None
    file: Path | None = None

    def describe(self) -> str:
        return f"`{self.file}`" if self.file else f"`{self.vision}` (vision) and `{self.text}` (text)"


def find_encoders(args: SeraTrainingArguments) -> EncoderSource | None:
    """The pretrained encoders, first found of: ``encoder_weights`` (a safetensors file of ``vision_model.*`` and
    ``text_model.*`` tensors, or a folder holding ``vision_encoder/`` and ``text_encoder/``);
    ``vision_model_name_or_path`` + ``text_model_name_or_path``; ``<config_name>/vision_encoder`` + ``text_encoder``
    (what pretrain_encoders.py writes). None: the encoders start from random weights."""
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
    return None


def describe_encoders(encoders: EncoderSource | None) -> str:
    if encoders is None:
        return "random (no pretrained encoder weights were available)"
    return f"pretrained, from {encoders.describe()}"


def load_processor(args: SeraTrainingArguments, config: SeraConfig, encoders: EncoderSource | None) -> SeraProcessor:
    """The config folder's processor (or one built from the encoders), at the recipe's ``image_size`` and
    ``max_text_length`` when it gives them. The processor is the sizes' one home; it is checked against the config
    here, where the two meet."""
    try:
        if (args.config_dir / "processor_config.json").is_file():
            processor = SeraProcessor.from_pretrained(args.config_dir)
        elif encoders is not None and encoders.file is None:
            # The real-size folders ship no processor: the encoders give the tokenizer and normalisation, the
            # recipe the sizes (the processor's defaults, 448 and 17, when it does not).
            sizes = {"image_size": args.image_size, "max_text_length": args.max_text_length}
            processor = SeraProcessor.from_encoders(
                encoders.vision, encoders.text, **{key: value for key, value in sizes.items() if value is not None}
            )
        else:
            raise TrainingError(
                f"{args.config_dir} holds no processor (processor_config.json and tokenizer files). Save one there, "
                "or name the pretrained encoders (vision_model_name_or_path and text_model_name_or_path in the "
                "recipe, or --encoder_weights with vision_encoder/ and text_encoder/), whose processor files are "
                "then used."
            )
        if args.image_size is not None:
            processor.image_processor.size = {"height": args.image_size, "width": args.image_size}
        if args.max_text_length is not None:
            processor.max_text_length = args.max_text_length
        processor.check_fits(config)
    except (OSError, ValueError) as error:
        raise TrainingError(f"Could not load the processor for {args.config_dir}: {error}") from error
    return processor


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


# ---------------------------------------------------------------------------------------------------------------------
# The trainable model, optimizer and schedule


def build_trainable_model(
    config: SeraConfig, args: SeraTrainingArguments, encoders: EncoderSource | None
) -> tuple[torch.nn.Module, str]:
    """SERA in the paper's regime, its encoders loaded from ``encoders`` (random when None).

    With ``tuning="peft"`` the base model is built without SERA modules and ``peft.get_peft_model`` injects them
    (``modeling_sera.SeraTunerConfig``); with ``"freeze"`` SERA is built with them and ``freeze_encoders()`` sets
    the trainable set. What trains is modeling_sera's decision either way. Returns the model and the way it was made
    ("peft" or "freeze"); :func:`plain_model` turns either into a plain ``SeraForReferringSegmentation``.
    """
    tuning = "peft" if args.tuning == "auto" else args.tuning

    base_config = copy.deepcopy(config)
    if tuning == "peft":
        base_config.use_sera_adapter = False
        base_config.use_sera_fusion = False
    model = SeraForReferringSegmentation(base_config)
    if encoders is not None:
        load_encoders(model, encoders)
        logger.info(f"Encoders loaded from {encoders.describe()}")
    else:
        logger.warning(
            f"No pretrained encoders (vision_encoder/ + text_encoder/ in {args.config_dir}, --encoder_weights, or "
            "vision_model_name_or_path + text_model_name_or_path): the encoders start from random weights and stay "
            "frozen except their norms and biases, so expect modest scores."
        )

    if tuning == "peft":
        import peft

        model = peft.get_peft_model(model, modeling_sera.SeraTunerConfig.from_sera_config(config))
    else:
        model.freeze_encoders()
    return model, tuning


def plain_model(model: torch.nn.Module, tuning: str) -> SeraForReferringSegmentation:
    """A plain SeraForReferringSegmentation with the trained weights (PEFT modules merged in)."""
    return model.merge_and_unload() if tuning == "peft" else model


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 of the trainable tensors, by name: equal on every process of a run that stays in sync."""
    digest = hashlib.sha256()
    for name, parameter in sorted(trainable_named_parameters(model)):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_optimizer(model: torch.nn.Module, args: SeraTrainingArguments) -> torch.optim.Optimizer:
    parameters = [parameter for _, parameter in trainable_named_parameters(model)]
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }
    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(parameters, **kwargs)


def milestone_steps(args: SeraTrainingArguments, total_steps: int) -> list[int]:
    """The optimizer steps where the learning rate decays: the recipe's epoch milestones, as shares of the run."""
    return [max(1, round(milestone * total_steps / args.num_train_epochs)) for milestone in args.lr_milestones]


def warmup_steps(args: SeraTrainingArguments, total_steps: int) -> int:
    """The optimizer steps of the linear warm-up (``linear`` and ``cosine`` schedules only)."""
    return round(args.warmup_ratio * total_steps)


def describe_lr_schedule(args: SeraTrainingArguments, total_steps: int) -> str:
    """The schedule in a few words, for the run's log."""
    if args.lr_scheduler_type == "multistep":
        return f"x{args.lr_gamma} at steps {milestone_steps(args, total_steps)}"
    return f"{args.lr_scheduler_type} to 0 after {warmup_steps(args, total_steps)} warm-up steps"


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: SeraTrainingArguments, total_steps: int):
    """The learning-rate schedule. ``multistep`` (the paper's): ``lr *= lr_gamma`` once ``milestone /
    num_train_epochs`` of the optimizer steps are done, so a run cut short with ``max_train_steps`` keeps the paper's
    proportions (35/65 and 55/65 of the run). ``linear`` / ``cosine``: transformers' schedules, a linear warm-up over
    ``warmup_ratio`` of the steps and then a decay to zero at the last step.

    Stepped by the loop once per optimizer step, never prepared by accelerate, so its count does not depend on the
    number of processes. ``optimizer`` may be accelerate's wrapper; the schedule drives the torch optimizer inside.
    """
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    if args.lr_scheduler_type != "multistep":
        return get_scheduler(
            args.lr_scheduler_type,
            torch_optimizer,
            num_warmup_steps=warmup_steps(args, total_steps),
            num_training_steps=total_steps,
        )
    return torch.optim.lr_scheduler.MultiStepLR(
        torch_optimizer, milestones=milestone_steps(args, total_steps), gamma=args.lr_gamma
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_splits(args: SeraTrainingArguments, accelerator) -> dict[str, datasets.Dataset]:
    """Every split the run needs, checked: present, non-empty, with the schema's columns, first row readable."""
    from sera_training.data_sources import load_source_splits

    wanted = [args.train_split]
    if args.validation_split:
        wanted.append(args.validation_split)
    wanted += [split for split in args.test_splits if split not in wanted]
    source = args.dataset
    with accelerator.main_process_first():  # the main process builds the synthetic data once, the others reuse it
        try:
            splits = load_source_splits(
                source,
                wanted,
                coco_image_dir=args.coco_image_dir,
                cache_dir=args.synthetic_cache_dir,
                seed=args.synthetic_seed,
                num_images=args.synthetic_num_images,
            )
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


def select_splits(args: SeraTrainingArguments, splits: dict) -> tuple:
    """(train, validation or None, {test split: data}), each capped as the recipe says."""
    train = capped(splits[args.train_split], args.max_train_samples, args.seed).select_columns(list(COLLATOR_COLUMNS))
    validation = None
    if args.validation_split:
        limit = min(x for x in (args.max_validation_samples, args.max_eval_samples, math.inf) if x is not None)
        validation = capped(splits[args.validation_split], None if limit == math.inf else limit, args.seed)
    tests = {split: capped(splits[split], args.max_eval_samples, args.seed) for split in args.test_splits}
    return train, validation, tests


def build_train_dataloader(train_data, processor, args: SeraTrainingArguments):
    """(DataLoader, collator). The loader has a generator of its own: the shuffling (reseeded with seed + epoch by
    accelerate's seedable sampler) and the worker seeds never draw from the global RNG, so a resumed run draws the
    same dropout and router noise."""
    collator = ReferringSegmentationCollator(processor, args.horizontal_flip_probability, seed=args.seed)
    loader = DataLoader(
        train_data,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, collator
