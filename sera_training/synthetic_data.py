"""The built-in synthetic referring dataset ("synthref"): the project's default data, generated, never downloaded.

Each image holds 3-6 coloured, textured shapes on a cluttered background (see ``synthetic_scenes``); a few of them
are referred to by 2-3 expressions each, in four categories that need different reasoning (see
``synthetic_expressions``). Every expression is checked to pick out exactly one object. Splits:

- "train", "validation", "test": scenes without any of the ``HELD_OUT_COMBINATIONS`` (colour + shape pairs);
- "test_unseen": every referred object has a held-out pair and its expressions name its colour or its shape, to
  measure generalization to combinations never seen in training.

Everything follows from a seed: the same settings give byte-identical rows. The built dataset is cached on disk
under a hash of its settings and reused.

Usage:
    python training/synthetic_data.py --output DIR [--seed 0] [--num_images train=2000] [--preview preview.png]
"""

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sera_training.data_schema import EXAMPLE_FEATURES
from sera_training.synthetic_expressions import (
    VOCABULARY,
    StructuredExpression,
    describe_scene,
    sample_expressions,
)
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES, HELD_OUT_COMBINATIONS, Scene, generate_scene


__all__ = [
    "DEFAULT_NUM_IMAGES",
    "HELD_OUT_COMBINATIONS",
    "SPLITS",
    "VOCABULARY",
    "SynthRefConfig",
    "build_synthetic_dataset",
    "expression_corpus",
    "generate_pretraining_examples",
    "generate_referring_scene",
    "save_preview",
    "write_dataset",
]

SOURCE = "synthref"
SPLITS = ("train", "validation", "test", "test_unseen")
# Sized so that a tiny model trains on it in about ten minutes on two CPU cores.
DEFAULT_NUM_IMAGES = {"train": 2000, "validation": 200, "test": 300, "test_unseen": 300}
DEFAULT_CACHE_DIR = Path("~/.cache/sera/synthref").expanduser()
# Bump whenever a change to the generator changes its output, so that old cache entries are not reused.
GENERATOR_VERSION = 1

# Every split (and the other users of scenes) draws from its own random stream, so they can never share a scene.
_STREAMS = {"train": 1, "validation": 2, "test": 3, "test_unseen": 4, "pretraining": 5, "corpus": 6}
# image_id = stream * IMAGE_ID_STRIDE + index: ids are unique across splits and tell where a scene came from.
IMAGE_ID_STRIDE = 1_000_000
JPEG_QUALITY = 90  # images are stored once per expression; JPEG keeps the default build near 150 MB, not 500 MB


@dataclass(frozen=True)
class SynthRefConfig:
    """Everything the generated rows depend on; its fingerprint names the cache entry."""

    seed: int = 0
    num_images: tuple[tuple[str, int], ...] = tuple(DEFAULT_NUM_IMAGES.items())
    refs_per_image: int = 3
    expressions_per_ref: int = 3  # each ref gets 2 or 3 (fewer only when fewer unambiguous ones exist)
    image_size_range: tuple[int, int] = (96, 160)
    num_objects_range: tuple[int, int] = (3, 6)

    def fingerprint(self) -> str:
        settings = dataclasses.asdict(self) | {"generator_version": GENERATOR_VERSION}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def scene_settings(self) -> dict:
        return {
            "refs_per_image": self.refs_per_image,
            "expressions_per_ref": self.expressions_per_ref,
            "image_size_range": self.image_size_range,
            "num_objects_range": self.num_objects_range,
        }


@dataclass
class Ref:
    """One referred object of a scene and its expressions (structured meaning and wording)."""

    object_index: int
    expressions: list[tuple[StructuredExpression, str]]


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The random generator of scene ``index`` of ``stream``: independent of every other scene."""
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], index]))


def generate_referring_scene(
    split: str,
    index: int,
    seed: int = 0,
    refs_per_image: int = 3,
    expressions_per_ref: int = 3,
    image_size_range: tuple[int, int] = (96, 160),
    num_objects_range: tuple[int, int] = (3, 6),
) -> tuple[Scene, list[Ref]]:
    """Scene ``index`` of ``split`` and its refs, exactly as the dataset holds them ("corpus" is also accepted)."""
    rng = scene_rng(seed, split, index)
    unseen = split == "test_unseen"
    while True:
        scene = generate_scene(
            rng,
            held_out="require" if unseen else "exclude",
            image_size_range=image_size_range,
            num_objects_range=num_objects_range,
        )
        refs = []
        for object_index in rng.permutation(len(scene.objects)):
            if len(refs) == refs_per_image:
                break
            if unseen and not scene.objects[object_index].is_held_out:
                continue
            count = int(rng.integers(min(2, expressions_per_ref), expressions_per_ref + 1))
            must_name = ("color", "shape") if unseen else ()
            expressions = sample_expressions(scene, int(object_index), rng, count, must_name)
            if expressions:
                refs.append(Ref(int(object_index), expressions))
        if refs:
            return scene, refs


def _encode(image: Image.Image, image_format: str) -> dict:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps thin stripes sharp
    else:
        image.save(buffer, format=image_format)
    return {"bytes": buffer.getvalue(), "path": None}


def _example_rows(split: str, num_images: int, seed: int, scene_settings: dict) -> Iterator[dict]:
    """The rows of one split, in EXAMPLE_FEATURES form: one per expression."""
    for index in range(num_images):
        scene, refs = generate_referring_scene(split, index, seed, **scene_settings)
        image = _encode(scene.image, "JPEG")
        image_id = _STREAMS[split] * IMAGE_ID_STRIDE + index
        for ref_number, ref in enumerate(refs):
            visible = scene.objects[ref.object_index].visible_mask
            mask = _encode(Image.fromarray(visible.astype(np.uint8) * 255, mode="L"), "PNG")
            ref_id = image_id * 10 + ref_number
            for sentence_number, (expression, text) in enumerate(ref.expressions):
                yield {
                    "image": image,
                    "mask": mask,
                    "expression": text,
                    "category": expression.category,
                    "image_id": image_id,
                    "object_id": image_id * 10 + ref.object_index,
                    "ref_id": ref_id,
                    "sentence_id": ref_id * 10 + sentence_number,
                    "source": SOURCE,
                }


def write_dataset(config: SynthRefConfig, destination: str | os.PathLike, overwrite: bool = False) -> None:
    """Generates the dataset of ``config`` and saves it at ``destination`` (``datasets.load_from_disk`` reads it).

    Everything is written to a temporary folder beside ``destination`` and renamed into place at the end, so an
    interrupted build never leaves a half-written dataset where a finished one is expected.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; pass overwrite=True to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        splits = {}
        for split, num_images in config.num_images:
            if num_images == 0:
                continue
            splits[split] = datasets.Dataset.from_generator(
                _example_rows,
                features=EXAMPLE_FEATURES,
                gen_kwargs={
                    "split": split,
                    "num_images": num_images,
                    "seed": config.seed,
                    "scene_settings": config.scene_settings(),
                },
                cache_dir=str(work / "generator"),
                fingerprint=f"{config.fingerprint()}-{split}",
                split=datasets.NamedSplit(split),
            )
        datasets.DatasetDict(splits).save_to_disk(str(work / "dataset"))
        del splits  # release the memory-mapped generator files before they are deleted
        settings = dataclasses.asdict(config) | {"generator_version": GENERATOR_VERSION}
        (work / "dataset" / "synthref_config.json").write_text(json.dumps(settings, indent=2))
        if destination.exists():  # only reached with overwrite=True
            destination.rename(work / "replaced")
        try:
            (work / "dataset").rename(destination)
        except OSError:
            # Another process finished the same build first; its copy is identical, keep it.
            if not (destination / "dataset_dict.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _num_images_per_split(num_images: int | dict | None) -> tuple[tuple[str, int], ...]:
    if num_images is None:
        num_images = {}
    elif isinstance(num_images, int):
        num_images = {split: num_images for split in SPLITS}
    unknown = set(num_images) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown synthref splits {sorted(unknown)}; the splits are {SPLITS}")
    merged = DEFAULT_NUM_IMAGES | dict(num_images)
    return tuple((split, int(merged[split])) for split in SPLITS)


def build_synthetic_dataset(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_images: int | dict[str, int] | None = None,
    refs_per_image: int = 3,
    expressions_per_ref: int = 3,
    image_size_range: tuple[int, int] = (96, 160),
    num_objects_range: tuple[int, int] = (3, 6),
) -> datasets.DatasetDict:
    """The synthref dataset (rows follow ``data_schema.EXAMPLE_FEATURES``), built once and then read from the cache.

    Args:
        cache_dir: folder that holds one built dataset per setting; default ``~/.cache/sera/synthref``.
        seed: same seed and settings, byte-identical rows.
        num_images: images per split: a dict (missing splits keep ``DEFAULT_NUM_IMAGES``; 0 leaves a split out)
            or one number for every split.
        refs_per_image: referred objects per image, at most.
        expressions_per_ref: expressions per referred object, at most (2 or 3 with the default).
        image_size_range: inclusive range of each image side; width and height always differ.
        num_objects_range: inclusive range of the number of objects per image.
    """
    config = SynthRefConfig(
        seed=seed,
        num_images=_num_images_per_split(num_images),
        refs_per_image=refs_per_image,
        expressions_per_ref=expressions_per_ref,
        image_size_range=tuple(image_size_range),
        num_objects_range=tuple(num_objects_range),
    )
    entry = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    entry = entry / config.fingerprint()
    if not (entry / "dataset_dict.json").exists():
        write_dataset(config, entry)
    return datasets.load_from_disk(str(entry))


def expression_corpus(seed: int = 0, num_scenes: int = 1000) -> list[str]:
    """Expressions generated the way the dataset does, from scenes of their own, e.g. to fit a tokenizer."""
    corpus = []
    for index in range(num_scenes):
        _, refs = generate_referring_scene("corpus", index, seed)
        corpus.extend(text for ref in refs for _, text in ref.expressions)
    return corpus


def generate_pretraining_examples(
    num_images: int,
    seed: int = 0,
    image_size_range: tuple[int, int] = (96, 160),
    num_objects_range: tuple[int, int] = (3, 6),
) -> Iterator[dict]:
    """Scenes for task-agnostic encoder pretraining: no referring expressions, no masks of a referred object.

    Yields dicts with "image" (PIL RGB), "caption" (names every object: "a big striped red circle, a small blue
    square and a green star") and "attribute_maps": {attribute: (H, W) uint8 array} for "color", "shape", "size"
    and "texture", holding the index into ``ATTRIBUTE_VALUES[attribute]`` plus one, 0 for background. Scenes come
    from a random stream of their own (never a referring split's) and contain no held-out combination.
    """
    for index in range(num_images):
        rng = scene_rng(seed, "pretraining", index)
        scene = generate_scene(
            rng, held_out="exclude", image_size_range=image_size_range, num_objects_range=num_objects_range
        )
        yield {
            "image": scene.image,
            "caption": describe_scene(scene, rng),
            "attribute_maps": {attribute: scene.attribute_map(attribute) for attribute in ATTRIBUTE_VALUES},
        }


def save_preview(dataset: datasets.Dataset, path: str | os.PathLike, num_examples: int = 16, columns: int = 4) -> None:
    """A grid of examples: the image darkened outside the mask, the mask outlined, the expression written under it."""
    zoom, text_height = 2, 34
    font = ImageFont.load_default(size=13)
    # One row per image, taking each time the category shown least so far, so that the grid covers all of them.
    rows_by_image = {}
    for row_index, image_id in enumerate(dataset["image_id"]):
        rows_by_image.setdefault(image_id, []).append(row_index)
    categories = dataset["category"]
    shown_per_category = Counter()
    picks = []
    for row_indices in list(rows_by_image.values())[:num_examples]:
        pick = min(row_indices, key=lambda row_index: shown_per_category[categories[row_index]])
        shown_per_category[categories[pick]] += 1
        picks.append(pick)

    rows = [dataset[index] for index in picks]
    cell_width = zoom * max(row["image"].width for row in rows) + 8
    cell_height = zoom * max(row["image"].height for row in rows) + text_height
    grid = Image.new("RGB", (columns * cell_width, -(-len(rows) // columns) * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for position, row in enumerate(rows):
        image = row["image"].convert("RGB")
        mask = np.asarray(row["mask"]) > 0
        pixels = np.asarray(image, dtype=np.float32).copy()
        pixels[~mask] *= 0.4
        padded = np.pad(mask, 1)
        interior = padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2]
        pixels[mask & ~interior] = (0, 255, 255)
        shown = Image.fromarray(pixels.astype(np.uint8)).resize(
            (image.width * zoom, image.height * zoom), Image.NEAREST
        )
        x, y = (position % columns) * cell_width, (position // columns) * cell_height
        grid.paste(shown, (x, y))
        caption = "\n".join(textwrap.wrap(f"[{row['category']}] {row['expression']}", 2 * cell_width // 13))
        draw.multiline_text((x + 2, y + shown.height + 2), caption, fill="black", font=font)
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to save the dataset to (datasets.load_from_disk)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_images",
        "--num-images",
        action="append",
        default=[],
        metavar="SPLIT=N",
        help=f"images in a split, repeatable (defaults: {DEFAULT_NUM_IMAGES})",
    )
    parser.add_argument("--preview", help="also write a PNG grid of validation examples here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)

    num_images = {}
    for item in args.num_images:
        split, _, count = item.partition("=")
        num_images[split] = int(count)
    config = SynthRefConfig(seed=args.seed, num_images=_num_images_per_split(num_images))
    write_dataset(config, args.output, overwrite=args.overwrite)
    dataset = datasets.load_from_disk(args.output)
    for split, rows in dataset.items():
        print(f"{split}: {rows.num_rows} expressions, {len(set(rows['image_id']))} images")
    if args.preview:
        preview_split = "validation" if "validation" in dataset else next(iter(dataset))
        save_preview(dataset[preview_split], args.preview)
        print(f"preview of {preview_split} written to {args.preview}")


if __name__ == "__main__":
    main()
