"""Pretrain the tiny encoders of ``hub_configs/sera-synthref-tiny`` on synthetic scenes, with task-agnostic objectives.

SERA keeps its encoders frozen, so the tiny configuration only means something with encoders that already see and
read. This one-time job builds the two towers of the tiny config (a DINOv2-with-registers vision tower and a CLIP
text tower) and trains them from scratch on the built-in pretraining scenes with two objectives:

- a symmetric CLIP contrastive loss between the image (the vision CLS token through a small projection) and the
  text tower's ``text_embeds``, on whole-scene captions (``pretraining_data.CAPTION_VARIANTS``: the objects, the
  objects with where they are, the objects listed from left to right or from top to bottom);
- dense per-patch classification of colour, shape, size and texture (plus background) from the vision patch tokens
  through linear heads, so that every patch token carries what is at its place.

Referring expressions and masks of referred objects are never used. The projection and the heads exist only for
pretraining; they are saved apart (``pretraining_heads.safetensors``) so that the retrieval accuracy can be checked
again later. Outputs, in ``--output``:

- ``vision_encoder/``: ``Dinov2WithRegistersModel.save_pretrained`` (plus the image processor's config);
- ``text_encoder/``: ``CLIPTextModelWithProjection.save_pretrained`` (plus the tokenizer);
- ``pretraining_heads.safetensors`` and ``pretraining_report.json`` (command, steps, time, losses, held-out
  image-caption retrieval and per-patch attribute accuracy).

Usage (the command of the committed weights, also recorded in their ``pretraining_report.json``):

    python training/pretrain_encoders.py --num_images 20000 --time_budget_minutes 55 --num_threads 1

A time budget makes the number of steps depend on how fast the machine is (the committed run made 1427 steps of 64
scenes on one shared CPU thread); ``--max_steps N`` instead fixes the number of updates and the schedule.

Then ``SeraForReferringSegmentation.from_encoders(f"{output}/vision_encoder", f"{output}/text_encoder", ...)``.
"""

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModelWithProjection, Dinov2WithRegistersModel

from modeling_sera import SeraConfig, SeraProcessor
from sera_training.pretraining_data import (
    CAPTION_VARIANTS,
    PATCH_ATTRIBUTES,
    TRAINING_CAPTION_VARIANTS,
    load_or_build_pretraining_pool,
)
from sera_training.pretraining_evaluation import _summary, evaluate
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"
HEADS_FILE = "pretraining_heads.safetensors"
REPORT_FILE = "pretraining_report.json"


class EncoderPretrainingModel(nn.Module):
    """The two towers plus what only pretraining needs: an image projection, a temperature and per-patch heads."""

    def __init__(self, config: SeraConfig):
        super().__init__()
        self.vision_model = Dinov2WithRegistersModel(config.vision_config)
        self.text_model = CLIPTextModelWithProjection(config.text_config)
        vision_width = config.vision_config.hidden_size
        self.image_projection = nn.Linear(vision_width, config.text_config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.attribute_heads = nn.ModuleDict(
            {name: nn.Linear(vision_width, len(ATTRIBUTE_VALUES[name]) + 1) for name in PATCH_ATTRIBUTES}
        )
        self.num_special_tokens = 1 + config.vision_config.num_register_tokens

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the pretraining-only parts (everything but the two towers)."""
        return {
            key: value.detach().contiguous()
            for key, value in self.state_dict().items()
            if not key.startswith(("vision_model.", "text_model."))
        }

    def forward(self, pixel_values, input_ids=None, attention_mask=None) -> dict[str, torch.Tensor]:
        vision_outputs = self.vision_model(pixel_values=pixel_values)
        image_embeds = self.image_projection(vision_outputs.pooler_output)
        patches = vision_outputs.last_hidden_state[:, self.num_special_tokens :]
        outputs = {
            "image_embeds": F.normalize(image_embeds, dim=-1),
            # (batch, classes, patches) per attribute, the layout cross_entropy expects
            "attribute_logits": {name: head(patches).transpose(1, 2) for name, head in self.attribute_heads.items()},
        }
        if input_ids is not None:
            text_embeds = self.text_model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
            outputs["text_embeds"] = F.normalize(text_embeds, dim=-1)
        return outputs


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_text_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: every image against every caption of the batch, and the other way round.

    ``negative_text_embeds`` are extra captions that match no image; they only join the image-to-caption side.
    """
    # Clamped as in CLIP: a temperature below 1/100 makes training unstable.
    scale = logit_scale.clamp(max=math.log(100)).exp()
    captions = text_embeds if negative_text_embeds is None else torch.cat([text_embeds, negative_text_embeds])
    labels = torch.arange(len(image_embeds), device=image_embeds.device)
    image_to_text = F.cross_entropy(scale * image_embeds @ captions.T, labels)
    text_to_image = F.cross_entropy(scale * text_embeds @ image_embeds.T, labels)
    return (image_to_text + text_to_image) / 2


def attribute_loss(attribute_logits: dict[str, torch.Tensor], patch_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the attributes of the per-patch cross-entropy; ``patch_targets`` is (batch, attributes, h, w).

    Object patches and background patches weigh half each: objects cover only about a fifth of the grid, and
    without this the easy background would dominate the loss while shape and size, the attributes that need a
    patch to look at its neighbours, learn slowly.
    """
    targets = patch_targets.flatten(2)
    is_object = (targets[:, 0] > 0).float()
    weights = is_object / is_object.sum().clamp(min=1) + (1 - is_object) / (1 - is_object).sum().clamp(min=1)
    weights = weights / weights.sum()
    losses = [
        (F.cross_entropy(attribute_logits[name], targets[:, i], reduction="none") * weights).sum()
        for i, name in enumerate(PATCH_ATTRIBUTES)
    ]
    return torch.stack(losses).mean()


def pretraining_losses(model: EncoderPretrainingModel, batch: dict, attribute_loss_weight: float = 1.0) -> dict:
    """The two losses of one batch and their weighted sum ("loss"). With "negative_input_ids" in ``batch`` (see
    ``PretrainingPool.mirrored_captions``) those captions are extra negatives of the contrastive loss."""
    outputs = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    negatives = None
    if len(batch.get("negative_input_ids", ())):
        negatives = model.text_model(
            input_ids=batch["negative_input_ids"], attention_mask=batch["negative_attention_mask"]
        ).text_embeds
        negatives = F.normalize(negatives, dim=-1)
    contrastive = contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], model.logit_scale, negatives)
    attributes = attribute_loss(outputs["attribute_logits"], batch["patch_targets"])
    loss = contrastive + attribute_loss_weight * attributes
    return {"loss": loss, "contrastive": contrastive, "attributes": attributes}


def _learning_rate_factor(progress: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` share of training, then cosine decay to zero."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # No decay on biases, norms, embeddings' tokens and the temperature: only on weight matrices.
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in name)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def save_encoders(model: EncoderPretrainingModel, processor: SeraProcessor, output: Path) -> None:
    """Standard transformers folders for the towers (with their pre-processing), and the pretraining heads apart."""
    output.mkdir(parents=True, exist_ok=True)
    model.vision_model.save_pretrained(output / "vision_encoder")
    model.text_model.save_pretrained(output / "text_encoder")
    # So that SeraProcessor.from_encoders finds the normalisation and the tokenizer next to the weights. Without
    # the auto_map: the folder stays a plain Dinov2WithRegistersModel checkpoint that ships no remote code.
    image_processor = processor.image_processor.to_dict()
    image_processor.pop("auto_map", None)
    (output / "vision_encoder" / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    processor.tokenizer.save_pretrained(output / "text_encoder")
    save_file(model.heads_state_dict(), output / HEADS_FILE)


def load_pretrained_encoders(output, config: SeraConfig | None = None) -> EncoderPretrainingModel:
    """An ``EncoderPretrainingModel`` holding saved towers and heads (e.g. to evaluate them again)."""
    output = Path(output)
    config = config if config is not None else SeraConfig.from_pretrained(DEFAULT_CONFIG)
    model = EncoderPretrainingModel(config)
    model.vision_model = Dinov2WithRegistersModel.from_pretrained(output / "vision_encoder")
    model.text_model = CLIPTextModelWithProjection.from_pretrained(output / "text_encoder")
    model.load_state_dict(load_file(output / HEADS_FILE), strict=False)
    return model.eval()


def pretrain_encoders(
    output: str | Path = DEFAULT_CONFIG,
    config_path: str | Path = DEFAULT_CONFIG,
    num_images: int = 20000,
    num_eval_images: int = 1000,
    epochs: float | None = None,
    max_steps: int | None = None,
    time_budget_minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    attribute_loss_weight: float = 1.0,
    hard_negatives: bool = False,
    retrieval_candidates: int = 100,
    eval_every: int = 300,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    train_text: bool = True,
    train_vision: bool = True,
    command: str | None = None,
    log=print,
) -> dict:
    """Pretrains the towers of the SERA config at ``config_path`` and writes them (and a report) into ``output``.

    Training runs for ``max_steps``, or ``epochs`` over the ``num_images`` training scenes, and stops early, cleanly,
    once ``time_budget_minutes`` have passed. The learning rate follows a cosine over whichever of steps and time is
    further along, so that a run cut by the budget still ends annealed. The ``num_eval_images`` scenes that follow
    the training scenes in the same stream are held out for the report. With ``hard_negatives`` the mirrored twin
    of every "positions" caption joins the contrastive loss as a negative. ``init_from``: a folder written by an
    earlier run (towers and heads) to continue from instead of random weights; ``train_text=False`` keeps the text
    tower as it is (e.g. one taught by ``pretrain_text_encoder.py``); ``train_vision=False`` the vision tower. With
    both off only the heads train, e.g. to realign the image projection to a text tower trained since. Returns the
    report.
    """
    if max_steps is None and epochs is None and time_budget_minutes is None:
        raise ValueError("Give max_steps, epochs or time_budget_minutes: pretraining needs a place to stop.")
    start_time = time.monotonic()
    torch.manual_seed(seed)
    output, config_path = Path(output), Path(config_path)
    config = SeraConfig.from_pretrained(config_path)
    processor = SeraProcessor.from_pretrained(config_path)
    caption_length = config.text_config.max_position_embeddings

    log(f"preparing {num_images} + {num_eval_images} pretraining scenes (cached after the first time)")
    pool = load_or_build_pretraining_pool(
        processor.image_processor,
        processor.tokenizer,
        config.vision_config.patch_size,
        num_images + num_eval_images,
        seed=seed,
        caption_length=caption_length,
        cache_dir=cache_dir,
    )
    train_indices = np.arange(num_images)
    eval_indices = np.arange(num_images, num_images + num_eval_images)
    data_minutes = (time.monotonic() - start_time) / 60
    log(f"scenes ready in {data_minutes:.1f} min")

    steps_per_epoch = math.ceil(num_images / batch_size)
    max_steps = max_steps if max_steps is not None else math.inf
    if epochs is not None:
        max_steps = min(max_steps, math.ceil(epochs * steps_per_epoch))
    budget_seconds = time_budget_minutes * 60 if time_budget_minutes is not None else math.inf

    model = load_pretrained_encoders(init_from, config) if init_from is not None else EncoderPretrainingModel(config)
    model.train()
    model.text_model.requires_grad_(train_text)
    model.vision_model.requires_grad_(train_vision)
    optimizer = _optimizer(model, lr, weight_decay)
    generator = np.random.default_rng(seed)
    training_variants = np.array([CAPTION_VARIANTS.index(name) for name in TRAINING_CAPTION_VARIANTS])

    evaluation_start = time.monotonic()
    initial = evaluate(model, pool, eval_indices, retrieval_candidates)
    log(f"step 0: {_summary(initial)}")
    train_start = time.monotonic()
    # The budget covers the whole job: what data and the first evaluation took is gone, and the final evaluation
    # and saving (about as long as the first evaluation) must still fit.
    train_seconds = budget_seconds - (train_start - start_time) - 2 * (train_start - evaluation_start) - 10
    step, recent, order, stopped_by = 0, [], np.empty(0, dtype=np.int64), "max_steps"
    while True:
        elapsed = time.monotonic() - train_start
        if step >= max_steps:
            break
        if elapsed >= train_seconds:
            stopped_by = "time_budget"
            break
        progress = max(step / max_steps, elapsed / train_seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr * _learning_rate_factor(progress, warmup)

        if len(order) < batch_size:  # a new epoch: reshuffle, and keep the leftover scenes first
            order = np.concatenate([order, generator.permutation(train_indices)])
        indices, order = order[:batch_size], order[batch_size:]
        variants = training_variants[generator.integers(len(training_variants), size=batch_size)]
        batch = pool.batch(indices, variants)
        if hard_negatives:
            batch.update(pool.mirrored_captions(indices, variants))
        losses = pretraining_losses(model, batch, attribute_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        recent = (recent + [{name: value.item() for name, value in losses.items()}])[-50:]

        if step % 25 == 0 or step == 1:
            means = {name: np.mean([entry[name] for entry in recent]) for name in recent[0]}
            log(
                f"step {step}: loss {means['loss']:.3f} (contrastive {means['contrastive']:.3f}, attributes "
                f"{means['attributes']:.3f}), lr {optimizer.param_groups[0]['lr']:.2e}, "
                f"{(time.monotonic() - train_start) / step:.2f} s/step, {(time.monotonic() - start_time) / 60:.1f} min"
            )
        if eval_every and step % eval_every == 0:
            quick = evaluate(model, pool, eval_indices[: 5 * retrieval_candidates], retrieval_candidates)
            log(f"step {step}: {_summary(quick)}")

    train_minutes = (time.monotonic() - train_start) / 60
    final = evaluate(model, pool, eval_indices, retrieval_candidates)
    log(f"step {step} (final): {_summary(final)}")
    save_encoders(model, processor, output)

    final_losses = {name: float(np.mean([entry[name] for entry in recent])) for name in recent[0]} if recent else {}
    report = {
        "command": command,
        "settings": {
            "config": _shown_path(config_path),
            "num_images": num_images,
            "num_eval_images": num_eval_images,
            "epochs": epochs,
            "max_steps": None if max_steps == math.inf else max_steps,
            "time_budget_minutes": time_budget_minutes,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "attribute_loss_weight": attribute_loss_weight,
            "hard_negatives": hard_negatives,
            "seed": seed,
            "init_from": _shown_path(init_from) if init_from is not None else None,
            "train_text": train_text,
            "train_vision": train_vision,
            "num_threads": torch.get_num_threads(),
            "caption_variants": list(TRAINING_CAPTION_VARIANTS),
        },
        "steps": step,
        "epochs_seen": step * batch_size / num_images,
        "stopped_by": stopped_by,
        "data_minutes": data_minutes,
        "train_minutes": train_minutes,
        "wall_time_minutes": (time.monotonic() - start_time) / 60,
        "final_losses_mean_of_last_50_steps": final_losses,
        "logit_scale": model.logit_scale.exp().item(),
        "held_out_evaluation_at_init": initial,
        "held_out_evaluation": final,
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report, indent=2))
    return report


def _shown_path(path: str | Path) -> str:
    """``path`` relative to the repository root when it is inside it, so that reports name no one's home folder."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def _command_line(argv: list[str]) -> str:
    """The command as one would type it from the repository root."""
    return shlex.join(["python", _shown_path(__file__)] + argv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_CONFIG), help="folder for the encoders and the report")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="SERA config + processor folder")
    parser.add_argument("--num_images", type=int, default=20000, help="training scenes")
    parser.add_argument("--num_eval_images", type=int, default=1000, help="held-out scenes for the report")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--time_budget_minutes", type=float, help="stop cleanly after this long (data included)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--attribute_loss_weight", type=float, default=1.0)
    parser.add_argument(
        "--hard_negatives",
        action="store_true",
        help="add each 'positions' caption's mirrored twin as a contrastive negative, to force reading place words",
    )
    parser.add_argument("--retrieval_candidates", type=int, default=100)
    parser.add_argument("--eval_every", type=int, default=300, help="steps between quick held-out checks (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", help="folder of prepared scene pools (default ~/.cache/sera/pretraining)")
    parser.add_argument("--init_from", help="continue from the towers and heads in this folder (an earlier --output)")
    parser.add_argument(
        "--freeze_text", action="store_true", help="keep the text tower as it is; train the vision side"
    )
    parser.add_argument("--freeze_vision", action="store_true", help="keep the vision tower as it is")
    parser.add_argument("--num_threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    pretrain_encoders(
        output=args.output,
        config_path=args.config,
        num_images=args.num_images,
        num_eval_images=args.num_eval_images,
        epochs=args.epochs,
        max_steps=args.max_steps,
        time_budget_minutes=args.time_budget_minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        attribute_loss_weight=args.attribute_loss_weight,
        hard_negatives=args.hard_negatives,
        retrieval_candidates=args.retrieval_candidates,
        eval_every=args.eval_every,
        seed=args.seed,
        cache_dir=args.cache_dir,
        init_from=args.init_from,
        train_text=not args.freeze_text,
        train_vision=not args.freeze_vision,
        command=_command_line(sys.argv[1:] if argv is None else argv),
        log=lambda message: print(message, flush=True),
    )


if __name__ == "__main__":
    main()
