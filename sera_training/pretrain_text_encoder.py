"""Teach the tiny text tower every word of the synthref language: what an expression means, from its words alone.

The scene-caption pretraining of ``pretrain_encoders.py`` leaves a text tower that encodes colour and little else:
captions that differ mostly in colour never need the other words, so "the circle on the left" and "on the right"
end at sentence cosine 1.000 (``benchmarks/encoder_probes.py``). A frozen tower cannot give the head what it threw
away. This one-time job continues training the committed text tower, text only (no image, no mask, no scene), on
expressions drawn from the generator's own language with three objectives:

- **meaning**: linear heads on the projected sentence feature (what SERA's neck and projector read) classify every
  field of the structured meaning: category, predicate, and each attribute the target and the anchor name (or
  "not named"), so the sentence feature must hold every content word;
- **hard negatives**: each expression is paired with a twin that differs in one field (left -> right, circle ->
  square, biggest -> smallest, ...); a hinge pushes their sentence cosine below ``negative_margin``;
- **words**: a linear head on every word feature (what the adapters and the decoder cross-attend to) names its own
  token, so the word features do not collapse to one point either.

Expressions naming a held-out colour + shape pair (``HELD_OUT_COMBINATIONS``, the test_unseen split's) are never
drawn. Outputs in ``--output``: ``text_encoder/`` (``CLIPTextModelWithProjection.save_pretrained`` plus the
tokenizer) and ``text_pretraining_report.json`` (command, steps, losses, held-out accuracy per field, the cosine of
the hardest pairs before and after).

Usage (the command of the committed weights, also recorded in the report):

    python training/pretrain_text_encoder.py --max_steps 1500 --num_threads 1
"""

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from sera_training.synthetic_expressions import (
    ATTRIBUTES,
    CATEGORIES,
    TEMPLATES,
    Description,
    StructuredExpression,
    verbalize,
)
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES, HELD_OUT_COMBINATIONS


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"
REPORT_FILE = "text_pretraining_report.json"

PREDICATES = tuple(sorted({predicate for _, predicate in TEMPLATES if predicate is not None}))
_PREDICATES_OF = {
    category: tuple(predicate for cat, predicate in TEMPLATES if cat == category) for category in CATEGORIES
}
# Every field of a structured meaning and its classes; index 0 is "not named" (or "no predicate" / "no anchor").
MEANING_FIELDS = {
    "category": CATEGORIES,
    "predicate": (None,) + PREDICATES,
    **{f"target_{name}": (None,) + ATTRIBUTE_VALUES[name] for name in ATTRIBUTES},
    **{f"anchor_{name}": (None,) + ATTRIBUTE_VALUES[name] for name in ATTRIBUTES},
}


def _random_description(rng: np.random.Generator, min_named: int, max_named: int) -> Description:
    while True:
        count = int(rng.integers(min_named, max_named + 1))
        names = rng.choice(len(ATTRIBUTES), size=count, replace=False)
        values = {ATTRIBUTES[i]: str(rng.choice(ATTRIBUTE_VALUES[ATTRIBUTES[i]])) for i in names}
        if (values.get("color"), values.get("shape")) not in HELD_OUT_COMBINATIONS:
            return Description(**values)


def random_expression(rng: np.random.Generator) -> StructuredExpression:
    """A meaning the generator can word: any category, predicate and description (held-out pairs excluded)."""
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category == "attribute":
        return StructuredExpression(category, _random_description(rng, 1, 4))
    predicates = _PREDICATES_OF[category]
    predicate = predicates[int(rng.integers(len(predicates)))]
    target = _random_description(rng, 0, 2)
    if category == "comparison" and predicate in ("biggest", "smallest") and target.size is not None:
        target = replace(target, size=None)  # "the biggest small circle" is never said
    anchor = _random_description(rng, 1, 2) if category == "relation" else None
    return StructuredExpression(category, target, predicate, anchor)


def _with_changed_value(description: Description, rng: np.random.Generator) -> Description | None:
    named = description.named
    if not named:
        return None
    name = named[int(rng.integers(len(named)))]
    others = [value for value in ATTRIBUTE_VALUES[name] if value != getattr(description, name)]
    changed = replace(description, **{name: str(rng.choice(others))})
    if (changed.color, changed.shape) in HELD_OUT_COMBINATIONS:
        return None
    return changed


def hard_negative(expression: StructuredExpression, rng: np.random.Generator) -> StructuredExpression:
    """A twin of ``expression`` that differs in one field: its predicate, or one named value of target or anchor."""
    while True:
        choice = int(rng.integers(3))
        if choice == 0 and expression.predicate is not None:
            others = [p for p in _PREDICATES_OF[expression.category] if p != expression.predicate]
            predicate = str(rng.choice(others))
            if not (predicate in ("biggest", "smallest") and expression.target.size is not None):
                return StructuredExpression(expression.category, expression.target, predicate, expression.anchor)
        elif choice == 1:
            target = _with_changed_value(expression.target, rng)
            if target is not None:
                return StructuredExpression(expression.category, target, expression.predicate, expression.anchor)
        elif choice == 2 and expression.anchor is not None:
            anchor = _with_changed_value(expression.anchor, rng)
            if anchor is not None:
                return StructuredExpression(expression.category, expression.target, expression.predicate, anchor)


def meaning_labels(expression: StructuredExpression) -> list[int]:
    """The class of every field of ``MEANING_FIELDS`` for ``expression``."""
    anchor = expression.anchor or Description()
    values = {
        "category": expression.category,
        "predicate": expression.predicate,
        **{f"target_{name}": getattr(expression.target, name) for name in ATTRIBUTES},
        **{f"anchor_{name}": getattr(anchor, name) for name in ATTRIBUTES},
    }
    return [classes.index(values[field]) for field, classes in MEANING_FIELDS.items()]


class TextPretrainingModel(nn.Module):
    """The text tower plus what only this pretraining needs: meaning heads and a word-identity head."""

    def __init__(self, text_model: CLIPTextModelWithProjection):
        super().__init__()
        self.text_model = text_model
        config = text_model.config
        self.meaning_heads = nn.ModuleDict(
            {field: nn.Linear(config.projection_dim, len(classes)) for field, classes in MEANING_FIELDS.items()}
        )
        self.word_head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, attention_mask):
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return outputs.text_embeds, outputs.last_hidden_state


def _tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def sample_batch(rng: np.random.Generator, batch_size: int, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    expressions = [random_expression(rng) for _ in range(batch_size)]
    negatives = [hard_negative(expression, rng) for expression in expressions]
    texts = [verbalize(expression, rng) for expression in expressions + negatives]
    tokens = _tokenize(tokenizer, texts, max_length)
    labels = torch.tensor([meaning_labels(expression) for expression in expressions + negatives])
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "labels": labels}


def losses(model: TextPretrainingModel, batch: dict, negative_margin: float) -> dict[str, torch.Tensor]:
    sentence, words = model(batch["input_ids"], batch["attention_mask"])
    meaning = sum(
        F.cross_entropy(head(sentence), batch["labels"][:, index])
        for index, head in enumerate(model.meaning_heads.values())
    ) / len(model.meaning_heads)
    half = len(sentence) // 2
    cosine = F.cosine_similarity(sentence[:half], sentence[half:], dim=-1)
    negatives = F.relu(cosine - negative_margin).mean()
    mask = batch["attention_mask"].bool()
    word = F.cross_entropy(model.word_head(words[mask]), batch["input_ids"][mask])
    return {"loss": meaning + negatives + 0.1 * word, "meaning": meaning, "negatives": negatives, "words": word}


@torch.no_grad()
def evaluate(model: TextPretrainingModel, tokenizer, max_length: int, num_pairs: int = 2000, seed: int = 1) -> dict:
    """Held-out meanings: accuracy of every meaning head, and the sentence cosine of one-field twins."""
    model.eval()
    batch = sample_batch(np.random.default_rng([seed, 99]), num_pairs, tokenizer, max_length)
    sentence, _ = model(batch["input_ids"], batch["attention_mask"])
    accuracy = {
        field: float((head(sentence).argmax(-1) == batch["labels"][:, index]).float().mean())
        for index, (field, head) in enumerate(model.meaning_heads.items())
    }
    cosine = F.cosine_similarity(sentence[:num_pairs], sentence[num_pairs:], dim=-1)
    model.train()
    return {
        "field_accuracy": accuracy,
        "twin_cosine_mean": float(cosine.mean()),
        "twin_cosine_max": float(cosine.max()),
        "twins_over_0.9": float((cosine > 0.9).float().mean()),
    }


def pretrain_text_encoder(
    output: str | Path = DEFAULT_CONFIG,
    config_path: str | Path = DEFAULT_CONFIG,
    max_steps: int = 1500,
    batch_size: int = 128,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    negative_margin: float = 0.5,
    seed: int = 0,
    command: str | None = None,
    log=print,
) -> dict:
    """Continues training the text tower in ``config_path/text_encoder`` and writes it into ``output``."""
    start = time.monotonic()
    torch.manual_seed(seed)
    config_path, output = Path(config_path), Path(output)
    source = config_path / "text_encoder"
    text_model = CLIPTextModelWithProjection.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # The processor is where the expression length lives.
    max_length = json.loads((config_path / "processor_config.json").read_text()).get("max_text_length", 16)
    model = TextPretrainingModel(text_model).train()
    before = evaluate(model, tokenizer, max_length)
    log(f"before: {before['twin_cosine_mean']:.3f} mean twin cosine, {before['twins_over_0.9']:.3f} over 0.9")

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + np.cos(np.pi * min(step / max_steps, 1.0))),
    )
    rng = np.random.default_rng([seed, 0])
    history = []
    for step in range(1, max_steps + 1):
        values = losses(model, sample_batch(rng, batch_size, tokenizer, max_length), negative_margin)
        optimizer.zero_grad(set_to_none=True)
        values["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({name: value.item() for name, value in values.items()})
        if step % 100 == 0 or step == max_steps:
            recent = {name: np.mean([h[name] for h in history[-50:]]) for name in history[-1]}
            log(f"step {step}: " + ", ".join(f"{name} {value:.4f}" for name, value in recent.items()))

    after = evaluate(model, tokenizer, max_length)
    log(f"after: {after['twin_cosine_mean']:.3f} mean twin cosine, {after['twins_over_0.9']:.3f} over 0.9")
    (output / "text_encoder").mkdir(parents=True, exist_ok=True)
    model.text_model.save_pretrained(output / "text_encoder")
    tokenizer.save_pretrained(output / "text_encoder")
    report = {
        "command": command,
        "settings": {
            "config": str(
                config_path.relative_to(REPO_ROOT) if config_path.is_relative_to(REPO_ROOT) else config_path
            ),
            "max_steps": max_steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "negative_margin": negative_margin,
            "seed": seed,
            "num_threads": torch.get_num_threads(),
        },
        "wall_time_minutes": (time.monotonic() - start) / 60,
        "final_losses_mean_of_last_50_steps": {
            name: float(np.mean([h[name] for h in history[-50:]])) for name in history[-1]
        },
        "held_out_evaluation_at_start": before,
        "held_out_evaluation": after,
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_CONFIG), help="folder for text_encoder/ and the report")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="folder holding the text_encoder/ to continue")
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=128, help="expressions per step (each with its twin)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--negative_margin", type=float, default=0.5, help="twins' sentence cosine is pushed below")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    argv = sys.argv[1:] if argv is None else argv
    pretrain_text_encoder(
        output=args.output,
        config_path=args.config,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        negative_margin=args.negative_margin,
        seed=args.seed,
        command=shlex.join(["python", "training/pretrain_text_encoder.py"] + argv),
        log=lambda message: print(message, flush=True),
    )


if __name__ == "__main__":
    main()
