"""What the frozen tiny vision tower knows: linear probes of its level grids, per patch and per object.

    python benchmarks/vision_probe.py --output benchmarks/results/vision_probe.json

Scenes come from the built-in generator (validation scenes to fit the probes, test scenes to score them), letterboxed
by SERA's image processor and run through the committed vision tower (`hub_configs/sera-synthref-tiny/vision_encoder`)
without gradients. Every patch takes the object that covers most of its pixels. For each level SERA reads
(`vision_feature_layers`) and for the raw patch embeddings (block 0: what the tower adds is measured against it):

- per-patch attribute probes: a ridge least-squares classifier (one-hot targets, closed form) of the size, texture,
  colour and shape of the object on the patch, fitted and scored on object patches;
- per-object position: the object's patch features averaged, ridge regression to its visible centre (x, y in the
  letterbox frame, 0-1): R^2, and for every pair of objects of one scene whether the probe orders them as they are
  from left to right and from top to bottom (what "the leftmost", "above" need; chance 0.5).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from benchmark_utils import machine_info, markdown_table, write_json
from PIL import Image
from transformers import AutoModel

from modeling_sera import SeraConfig, SeraProcessor
from modeling_sera.image_processing_sera import letterbox_geometry
from sera_training.synthetic_data import SynthRefConfig, generate_referring_scene
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES


TINY_CONFIG = Path(__file__).resolve().parents[1] / "hub_configs" / "sera-synthref-tiny"
ATTRIBUTES = ("size", "texture", "color", "shape")


def patch_objects(scene, image_size: int, patch_size: int) -> np.ndarray:
    """(grid, grid) index of the object covering most of each letterboxed patch, -1 for background and padding."""
    new_height, new_width, top, left = letterbox_geometry(scene.height, scene.width, image_size)
    labels = np.asarray(Image.fromarray(scene.labels.astype(np.uint8)).resize((new_width, new_height), Image.NEAREST))
    canvas = np.zeros((image_size, image_size), dtype=np.int64)
    canvas[top : top + new_height, left : left + new_width] = labels
    grid = image_size // patch_size
    patches = canvas.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    votes = (patches[..., None] == np.arange(len(scene.objects) + 1)).sum(axis=2)
    return votes.argmax(axis=-1) - 1


def object_centres(scene, image_size: int) -> np.ndarray:
    """(num_objects, 2) visible centres (x, y) in the letterbox frame, in [0, 1]."""
    new_height, new_width, top, left = letterbox_geometry(scene.height, scene.width, image_size)
    centres = []
    for obj in scene.objects:
        x, y = obj.centroid
        centres.append(
            ((left + x * new_width / scene.width) / image_size, (top + y * new_height / scene.height) / image_size)
        )
    return np.asarray(centres)


def collect(split: str, num_scenes: int, vision, processor, config) -> dict:
    """Level features per patch and per object, with their targets, for `num_scenes` scenes of `split`."""
    settings = SynthRefConfig().scene_settings()
    patch_size, image_size = config.vision_patch_size, processor.image_size
    levels = [0, *config.vision_feature_layers]
    patch_features = {level: [] for level in levels}
    object_features = {level: [] for level in levels}
    patch_attributes, centres, scene_of_object = [], [], []
    for index in range(num_scenes):
        scene, _ = generate_referring_scene(split, index, **settings)
        pixel_values = processor.image_processor(images=[scene.image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            outputs = vision(pixel_values=pixel_values, output_hidden_states=True)
        owners = patch_objects(scene, image_size, patch_size).reshape(-1)
        on_object = owners >= 0
        for level in levels:
            tokens = outputs.last_hidden_state if level == config.num_vision_layers else outputs.hidden_states[level]
            grid = tokens[0, config.num_special_vision_tokens :].numpy()
            patch_features[level].append(grid[on_object])
            object_features[level].append(
                np.stack([grid[owners == i].mean(0) for i in range(len(scene.objects)) if (owners == i).any()])
            )
        present = [i for i in range(len(scene.objects)) if (owners == i).any()]
        patch_attributes.append(
            np.stack(
                [
                    [ATTRIBUTE_VALUES[name].index(getattr(scene.objects[i], name)) for name in ATTRIBUTES]
                    for i in owners[on_object]
                ]
            )
        )
        centres.append(object_centres(scene, image_size)[present])
        scene_of_object += [index] * len(present)
    return {
        "patch_features": {level: np.concatenate(v) for level, v in patch_features.items()},
        "object_features": {level: np.concatenate(v) for level, v in object_features.items()},
        "patch_attributes": np.concatenate(patch_attributes),
        "centres": np.concatenate(centres),
        "scene_of_object": np.asarray(scene_of_object),
    }


def ridge_fit(features: np.ndarray, targets: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, scale = features.mean(0), features.std(0) + 1e-6
    x = np.concatenate([(features - mean) / scale, np.ones((len(features), 1))], axis=1)
    weights = np.linalg.solve(x.T @ x + strength * np.eye(x.shape[1]), x.T @ targets)
    return weights, mean, scale


def ridge_predict(model, features: np.ndarray) -> np.ndarray:
    weights, mean, scale = model
    return np.concatenate([(features - mean) / scale, np.ones((len(features), 1))], axis=1) @ weights


def pair_order_accuracy(predicted: np.ndarray, truth: np.ndarray, scenes: np.ndarray, axis: int) -> float:
    correct = total = 0
    for scene in np.unique(scenes):
        rows = np.nonzero(scenes == scene)[0]
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                i, j = rows[a], rows[b]
                if abs(truth[i, axis] - truth[j, axis]) < 1 / 16:  # closer than a patch: no clear order
                    continue
                total += 1
                correct += (predicted[i, axis] < predicted[j, axis]) == (truth[i, axis] < truth[j, axis])
    return correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision_encoder", default=str(TINY_CONFIG / "vision_encoder"))
    parser.add_argument("--fit_scenes", type=int, default=600)
    parser.add_argument("--test_scenes", type=int, default=300)
    parser.add_argument("--ridge", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = SeraConfig.from_pretrained(TINY_CONFIG)
    processor = SeraProcessor.from_pretrained(TINY_CONFIG)
    vision = AutoModel.from_pretrained(args.vision_encoder).eval()
    fit = collect("validation", args.fit_scenes, vision, processor, config)
    test = collect("test", args.test_scenes, vision, processor, config)

    results, rows = {}, []
    for level in fit["patch_features"]:
        scores = {}
        for column, name in enumerate(ATTRIBUTES):
            classes = len(ATTRIBUTE_VALUES[name])
            model = ridge_fit(
                fit["patch_features"][level], np.eye(classes)[fit["patch_attributes"][:, column]], args.ridge
            )
            predicted = ridge_predict(model, test["patch_features"][level]).argmax(1)
            scores[name] = float((predicted == test["patch_attributes"][:, column]).mean())
            scores[f"{name}_majority"] = float(np.bincount(test["patch_attributes"][:, column]).max() / len(predicted))
        model = ridge_fit(fit["object_features"][level], fit["centres"], args.ridge)
        predicted = ridge_predict(model, test["object_features"][level])
        residual = ((predicted - test["centres"]) ** 2).sum(0)
        spread = ((test["centres"] - test["centres"].mean(0)) ** 2).sum(0)
        scores["position_r2_x"], scores["position_r2_y"] = (1 - residual / spread).tolist()
        scores["left_right_order"] = pair_order_accuracy(predicted, test["centres"], test["scene_of_object"], 0)
        scores["top_bottom_order"] = pair_order_accuracy(predicted, test["centres"], test["scene_of_object"], 1)
        results[str(level)] = scores
        rows.append(
            [
                "patch embeddings" if level == 0 else f"after block {level}",
                *(f"{scores[name]:.3f}" for name in ATTRIBUTES),
                f"{scores['position_r2_x']:.2f} / {scores['position_r2_y']:.2f}",
                f"{scores['left_right_order']:.3f} / {scores['top_bottom_order']:.3f}",
            ]
        )
    majority = [f"{results['0'][f'{name}_majority']:.3f}" for name in ATTRIBUTES]
    rows.append(["majority class", *majority, "0 / 0", "0.5 / 0.5"])
    header = ["features", *ATTRIBUTES, "position R^2 x / y", "pair order left-right / top-bottom"]
    table = markdown_table(header, rows)
    print(table)
    write_json(
        args.output, {"machine": machine_info("cpu"), "settings": vars(args), "results": results, "table": table}
    )


if __name__ == "__main__":
    main()
