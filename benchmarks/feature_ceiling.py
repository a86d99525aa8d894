"""Are the frozen tiny encoders or the head the bottleneck? The head trained on perfect per-patch features.

    python benchmarks/feature_ceiling.py --output benchmarks/results/feature_ceiling.json

Two arms, trained and scored identically in one process (same head, data order, recipe and budget):

- ``frozen tower``: the default run's regime without SERA's modules (the paper's baseline head: neck, decoder,
  projector) on the committed tiny vision tower, frozen;
- ``fine-tuned tower``: the same head on the same tower with every encoder parameter trainable (full fine-tuning, an
  upper bound of what the encoders could learn in the budget; not the paper's regime);
- ``perfect features``: the same head, with every vision level replaced by what the generator knows about each patch:
  one-hot maps of the size, texture, colour and shape of the object covering most of the patch (background: all
  "none"), zero-padded to the tower's width. The words still come from the committed text tower.

If the perfect arm scores far above the frozen one at the same budget, the vision features limit learning; if both
stall at the same level, the head, the text features or the budget do. Scored on the letterboxed test masks (the
model's own input frame, 128 px for the tiny config) per category, with the config's mask threshold; the absolute
figures are therefore close to, not equal to, ``training/evaluate_model.py``'s, and only the two arms' difference is
the result.
"""

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from benchmark_utils import log, machine_info, markdown_table, write_json
from torch.nn import functional as F
from transformers import AutoModel, CLIPTextModelWithProjection

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from modeling_sera.image_processing_sera import letterbox_geometry
from modeling_sera.modeling_sera import load_encoder_weights
from sera_training.pretraining_data import PATCH_ATTRIBUTES, patch_targets
from sera_training.synthetic_data import (
    _STREAMS,
    IMAGE_ID_STRIDE,
    SynthRefConfig,
    build_synthetic_dataset,
    generate_referring_scene,
)
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES


TINY_CONFIG = Path(__file__).resolve().parents[1] / "hub_configs" / "sera-synthref-tiny"
SPLIT_OF_STREAM = {stream: split for split, stream in _STREAMS.items()}
CATEGORIES = ("attribute", "location", "relation", "comparison")


class PerfectPatchFeatures:
    """One-hot attribute maps of the letterboxed scene behind a dataset row, (C, grid, grid), cached by image."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.settings = SynthRefConfig().scene_settings()
        self.sizes = [len(ATTRIBUTE_VALUES[name]) + 1 for name in PATCH_ATTRIBUTES]
        if sum(self.sizes) > width:
            raise ValueError(f"{sum(self.sizes)} one-hot channels do not fit the tower's width {width}.")
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, image_id: int) -> torch.Tensor:
        if image_id not in self.cache:
            split = SPLIT_OF_STREAM[image_id // IMAGE_ID_STRIDE]
            scene, _ = generate_referring_scene(split, image_id % IMAGE_ID_STRIDE, **self.settings)
            maps = {name: scene.attribute_map(name) for name in PATCH_ATTRIBUTES}
            geometry = letterbox_geometry(scene.height, scene.width, self.image_size)
            targets = torch.from_numpy(
                patch_targets(maps, geometry, self.image_size, self.patch_size).astype(np.int64)
            )
            one_hot = [F.one_hot(target, size) for target, size in zip(targets, self.sizes)]
            features = torch.cat(one_hot, dim=-1).permute(2, 0, 1).float()
            self.cache[image_id] = F.pad(features, (0, 0, 0, 0, 0, self.width - features.shape[0]))
        return self.cache[image_id]


def build_head_model(
    perfect: PerfectPatchFeatures | None, overrides: str, freeze: bool = True
) -> SeraForReferringSegmentation:
    config = SeraConfig.from_pretrained(TINY_CONFIG, use_sera_adapter=False, use_sera_fusion=False)
    if overrides:  # parsed as train.py's --config_overrides are (sera_training.builders.load_model_config)
        config.update_from_string(overrides)
        config.check_settings()
    model = SeraForReferringSegmentation(config)
    load_encoder_weights(model.model.vision_model, AutoModel.from_pretrained(TINY_CONFIG / "vision_encoder"))
    load_encoder_weights(
        model.model.text_model, CLIPTextModelWithProjection.from_pretrained(TINY_CONFIG / "text_encoder")
    )
    if freeze:
        model.freeze_encoders()
    if perfect is not None:
        levels_fn = model.model._vision_levels
        model.model._vision_levels = lambda outputs, height, width: [  # same shape and layout as the real levels
            model.perfect_levels.to(level.dtype).contiguous(memory_format=torch.channels_last)
            for level in levels_fn(outputs, height, width)
        ]
    return model


def batches(dataset, processor, perfect, batch_size: int, indices):
    for start in range(0, len(indices), batch_size):
        rows = [dataset[int(i)] for i in indices[start : start + batch_size]]
        inputs = processor(
            images=[row["image"].convert("RGB") for row in rows],
            text=[row["expression"] for row in rows],
            masks=[np.asarray(row["mask"]) > 0 for row in rows],
            return_tensors="pt",
        )
        levels = torch.stack([perfect(int(row["image_id"])) for row in rows]) if perfect else None
        yield inputs, levels, [row["category"] for row in rows]


def train_and_score(arm: str, splits, processor, args) -> dict:
    torch.manual_seed(args.seed)
    config = SeraConfig.from_pretrained(TINY_CONFIG)
    perfect = None
    if arm == "perfect features":
        perfect = PerfectPatchFeatures(
            processor.image_size, config.vision_patch_size, config.vision_config.hidden_size
        )
    model = build_head_model(perfect, args.config_overrides, freeze=arm != "fine-tuned tower")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    decay_step = round(args.steps * 60 / 65)  # the default recipe's one x0.1 decay
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[decay_step], gamma=0.1)
    order = np.random.default_rng(args.seed).permutation(len(splits["train"]))[: args.steps * args.batch_size]
    model.train()
    started = time.perf_counter()
    for step, (inputs, levels, _) in enumerate(batches(splits["train"], processor, perfect, args.batch_size, order)):
        model.perfect_levels = levels
        loss = model(**{k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % 50 == 0:
            log(f"{arm}: step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")

    model.eval()
    ious = defaultdict(list)
    test = splits["test"]
    with torch.no_grad():
        for inputs, levels, categories in batches(test, processor, perfect, 32, np.arange(len(test))):
            model.perfect_levels = levels
            logits = model(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
            ).logits
            size = inputs["labels"].shape[-2:]
            probabilities = F.interpolate(logits.float().sigmoid(), size=size, mode="bilinear", align_corners=False)
            predicted = probabilities[:, 0] > processor.mask_threshold
            truth = inputs["labels"] > 0.5
            intersection = (predicted & truth).flatten(1).sum(-1).float()
            union = (predicted | truth).flatten(1).sum(-1).clamp(min=1).float()
            for category, iou in zip(categories, (intersection / union).tolist()):
                ious[category].append(iou)
                ious["all"].append(iou)
    return {
        name: {"mIoU": 100 * float(np.mean(v)), "prec@0.5": 100 * float(np.mean(np.asarray(v) >= 0.5)), "n": len(v)}
        for name, v in ious.items()
    } | {"train_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="the default run's budget")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--config_overrides", default="", help="SeraConfig fields, e.g. decoder_num_layers=1")
    parser.add_argument("--max_test_samples", type=int, default=800)
    parser.add_argument("--arms", nargs="+", default=["frozen tower", "fine-tuned tower", "perfect features"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    everything = build_synthetic_dataset()
    test = everything["test"].shuffle(seed=0).select(range(min(args.max_test_samples, len(everything["test"]))))
    splits = {"train": everything["train"], "test": test}
    processor = SeraProcessor.from_pretrained(TINY_CONFIG)
    results = {arm: train_and_score(arm, splits, processor, args) for arm in args.arms}

    rows = [
        [arm, *(f"{scores[name]['mIoU']:.1f}" for name in ("all", *CATEGORIES)), f"{scores['all']['prec@0.5']:.1f}"]
        for arm, scores in results.items()
    ]
    table = markdown_table(["level grids", "test mIoU", *CATEGORIES, "Prec@0.5"], rows)
    print(table)
    write_json(
        args.output, {"machine": machine_info("cpu"), "settings": vars(args), "results": results, "table": table}
    )


if __name__ == "__main__":
    main()
