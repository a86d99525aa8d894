"""The held-out checks of the encoder pretraining (``pretrain_encoders.py``): image-caption retrieval, a mirrored
position probe and per-patch attribute accuracy, and their one-line summary."""

import numpy as np
import torch
import torch.nn.functional as F

from sera_training.pretraining_data import PATCH_ATTRIBUTES, PretrainingPool
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES


def _retrieval_accuracy(image_embeds: torch.Tensor, text_embeds: torch.Tensor, candidates: int) -> dict[str, float]:
    """Top-1 retrieval among groups of ``candidates`` scenes (the rest, fewer than a group, is left out)."""
    image_hits, text_hits, total = 0, 0, 0
    for start in range(0, len(image_embeds) - candidates + 1, candidates):
        similarity = image_embeds[start : start + candidates] @ text_embeds[start : start + candidates].T
        truth = torch.arange(candidates)
        image_hits += (similarity.argmax(dim=1) == truth).sum().item()
        text_hits += (similarity.argmax(dim=0) == truth).sum().item()
        total += candidates
    return {"image_to_caption_top1": image_hits / total, "caption_to_image_top1": text_hits / total}


@torch.no_grad()
def evaluate(model, pool: PretrainingPool, indices, candidates: int = 100, batch_size: int = 100) -> dict:
    """Held-out checks that the towers learned something: retrieval, a left/right-top/bottom probe, patch accuracy.

    - retrieval: among ``candidates`` scenes, is the scene's own caption the most similar one (and the other way
      round)? Chance is 1 / candidates. Measured on the "objects" captions and on the "positions" captions.
    - mirror probe: does the image prefer its "positions" caption over the same caption with every place mirrored?
      Chance is 0.5; only the attribute words agree, so this needs the towers to read the position words.
    - per-patch attribute accuracy on patches covered by an object (chance about 1 / number of values) and on all
      patches; "foreground" is whether object vs background is right (from the colour head).
    """
    was_training = model.training
    model.eval()
    indices = np.asarray(indices)
    candidates = min(candidates, len(indices))
    collected = {name: [] for name in ("image", "objects", "positions", "positions_mirrored")}
    correct = {name: [0, 0] for name in PATCH_ATTRIBUTES}  # object patches right, all patches right
    foreground_correct, object_patches, all_patches = 0, 0, 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = pool.batch(chunk)
        outputs = model(batch["pixel_values"])
        collected["image"].append(outputs["image_embeds"])
        for variant in ("objects", "positions", "positions_mirrored"):
            text_batch = pool.batch(chunk, variants=variant) if variant != "objects" else batch
            text_embeds = model.text_model(
                input_ids=text_batch["input_ids"], attention_mask=text_batch["attention_mask"]
            ).text_embeds
            collected[variant].append(F.normalize(text_embeds, dim=-1))
        targets = batch["patch_targets"].flatten(2)
        is_object = targets[:, 0] > 0
        object_patches += is_object.sum().item()
        all_patches += is_object.numel()
        for i, name in enumerate(PATCH_ATTRIBUTES):
            predictions = outputs["attribute_logits"][name].argmax(dim=1)
            right = predictions == targets[:, i]
            correct[name][0] += (right & is_object).sum().item()
            correct[name][1] += right.sum().item()
            if name == "color":
                foreground_correct += ((predictions > 0) == is_object).sum().item()
    model.train(was_training)

    embeds = {name: torch.cat(values) for name, values in collected.items()}
    mirrored = torch.from_numpy(pool.has_mirror[indices])
    true_similarity = (embeds["image"] * embeds["positions"]).sum(-1)
    prefers_true = true_similarity > (embeds["image"] * embeds["positions_mirrored"]).sum(-1)
    return {
        "num_scenes": len(indices),
        "retrieval_candidates": candidates,
        "retrieval_chance": 1 / candidates,
        "objects_captions": _retrieval_accuracy(embeds["image"], embeds["objects"], candidates),
        "positions_captions": _retrieval_accuracy(embeds["image"], embeds["positions"], candidates),
        "mirror_probe": {
            "accuracy": prefers_true[mirrored].float().mean().item() if mirrored.any() else float("nan"),
            "chance": 0.5,
            "num_scenes": int(mirrored.sum()),
        },
        "patch_attribute_accuracy": {
            name: {
                "object_patches": correct[name][0] / max(object_patches, 1),
                "all_patches": correct[name][1] / max(all_patches, 1),
                "object_patches_chance": 1 / len(ATTRIBUTE_VALUES[name]),
            }
            for name in PATCH_ATTRIBUTES
        },
        "foreground_accuracy": foreground_correct / max(all_patches, 1),
        "object_patch_share": object_patches / max(all_patches, 1),
    }


def _summary(evaluation: dict) -> str:
    objects, positions = evaluation["objects_captions"], evaluation["positions_captions"]
    patch = evaluation["patch_attribute_accuracy"]
    return (
        f"retrieval among {evaluation['retrieval_candidates']} (chance {evaluation['retrieval_chance']:.3f}): "
        f"objects i2t {objects['image_to_caption_top1']:.3f} t2i {objects['caption_to_image_top1']:.3f}, "
        f"positions i2t {positions['image_to_caption_top1']:.3f} t2i {positions['caption_to_image_top1']:.3f}; "
        f"mirror probe {evaluation['mirror_probe']['accuracy']:.3f}; object-patch accuracy "
        + " ".join(f"{name} {values['object_patches']:.3f}" for name, values in patch.items())
        + f"; foreground {evaluation['foreground_accuracy']:.3f}"
    )
