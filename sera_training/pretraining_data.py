"""Data for task-agnostic encoder pretraining: synthetic scenes, whole-scene captions and per-patch attribute targets.

A pool of scenes from ``synthetic_data.generate_pretraining_examples`` is prepared once and cached on disk as numpy
arrays, so that every later epoch only reads them:

- ``pixel_values``: the images letterboxed and normalized by the SERA image processor (float16);
- ``patch_targets``: for every patch of the vision tower's grid, the colour, shape, size and texture of the object
  covering most of it (the index into ``ATTRIBUTE_VALUES`` plus one; 0 for background and for letterbox padding);
- ``caption_ids`` / ``caption_mask``: several tokenized captions of the whole scene (``CAPTION_VARIANTS``).

Nothing here pairs a referring expression with a mask: the captions describe the whole image, the patch targets
say what is where without naming any one object.
"""

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sera_training.synthetic_data import GENERATOR_VERSION, generate_pretraining_examples
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES


__all__ = [
    "CAPTION_VARIANTS",
    "PATCH_ATTRIBUTES",
    "TRAINING_CAPTION_VARIANTS",
    "PretrainingPool",
    "build_pretraining_pool",
    "caption_variants",
    "load_or_build_pretraining_pool",
    "patch_targets",
]

DEFAULT_CACHE_DIR = Path("~/.cache/sera/pretraining").expanduser()
# Bump whenever a change here changes the cached arrays, so that old cache entries are not reused.
POOL_VERSION = 1

PATCH_ATTRIBUTES = tuple(ATTRIBUTE_VALUES)  # size, texture, colour, shape: the order of the patch_targets rows
# "objects": the generator's own caption; "positions": 1-4 objects with where they are; "order": every object,
# listed from left to right or from top to bottom; "positions_mirrored": "positions" with every place mirrored
# through the image centre, never trained on, only used to check that the towers read the position words.
CAPTION_VARIANTS = ("objects", "positions", "order", "positions_mirrored")
TRAINING_CAPTION_VARIANTS = ("objects", "positions", "order")
MAX_OBJECTS_WITH_POSITION = 4  # keeps a "positions" caption (about 10 tokens an object) inside 48 tokens

# Coarse place of an object's visible centre in a 3x3 grid of the image: (row, column) -> words.
_PLACES = {
    ("top", "left"): "at the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "at the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the middle",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}
_MIRRORED = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}  # "middle", "center" stay


@dataclass
class SceneObjectSummary:
    """What a caption needs of one object: its attribute values and the centre of its visible part in [0, 1]."""

    attributes: dict[str, str]
    center_x: float
    center_y: float

    def noun_phrase(self) -> str:
        # Same wording as synthetic_expressions.describe_scene: adjectives in ATTRIBUTE_VALUES order, "solid" unsaid.
        words = [self.attributes[name] for name in PATCH_ATTRIBUTES if self.attributes[name] != "solid"]
        return "a " + " ".join(words)

    def place(self, mirrored: bool = False) -> str:
        row = ("top", "middle", "bottom")[min(int(self.center_y * 3), 2)]
        column = ("left", "center", "right")[min(int(self.center_x * 3), 2)]
        if mirrored:
            row, column = _MIRRORED.get(row, row), _MIRRORED.get(column, column)
        return _PLACES[(row, column)]


def _joint_codes(attribute_maps: dict[str, np.ndarray]) -> np.ndarray:
    """One integer per pixel for the combination of all attributes (0 for background)."""
    maps = [attribute_maps[name].astype(np.int64) for name in PATCH_ATTRIBUTES]
    return np.ravel_multi_index(maps, [len(ATTRIBUTE_VALUES[name]) + 1 for name in PATCH_ATTRIBUTES])


def _split_codes(codes: np.ndarray) -> np.ndarray:
    """Inverse of ``_joint_codes``: (..., ) codes -> (num_attributes, ...) attribute indices."""
    return np.stack(np.unravel_index(codes, [len(ATTRIBUTE_VALUES[name]) + 1 for name in PATCH_ATTRIBUTES]))


def summarize_objects(attribute_maps: dict[str, np.ndarray]) -> list[SceneObjectSummary]:
    """The objects of a scene as read back from its attribute maps; two identical objects read as one."""
    codes = _joint_codes(attribute_maps)
    height, width = codes.shape
    objects = []
    for code in np.unique(codes):
        if code == 0:
            continue
        ys, xs = np.nonzero(codes == code)
        indices = _split_codes(np.array(code))
        attributes = {name: ATTRIBUTE_VALUES[name][int(indices[i]) - 1] for i, name in enumerate(PATCH_ATTRIBUTES)}
        objects.append(SceneObjectSummary(attributes, (xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height))
    return objects


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_variants(caption: str, attribute_maps: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, str]:
    """The captions of one scene, one per name of ``CAPTION_VARIANTS``.

    ``caption`` is the generator's caption (every object with all its attributes). The other variants add where the
    objects are. A scene with two identical objects cannot tell them apart from its attribute maps; it keeps
    ``caption`` for every variant (and its mirrored caption equals the plain one, so the mirror probe skips it).
    """
    objects = summarize_objects(attribute_maps)
    num_phrases = caption.count(", ") + caption.count(" and ") + 1
    if len(objects) != num_phrases:
        return dict.fromkeys(CAPTION_VARIANTS, caption)

    order = rng.permutation(len(objects))
    named = [objects[i] for i in order[: int(rng.integers(1, min(MAX_OBJECTS_WITH_POSITION, len(objects)) + 1))]]
    positions = _join([f"{obj.noun_phrase()} {obj.place()}" for obj in named])
    mirrored = _join([f"{obj.noun_phrase()} {obj.place(mirrored=True)}" for obj in named])

    if rng.random() < 0.5:
        ordered, prefix = sorted(objects, key=lambda obj: obj.center_x), "from left to right: "
    else:
        ordered, prefix = sorted(objects, key=lambda obj: obj.center_y), "from top to bottom: "
    listed = prefix + _join([obj.noun_phrase() for obj in ordered])
    return {"objects": caption, "positions": positions, "order": listed, "positions_mirrored": mirrored}


def patch_targets(
    attribute_maps: dict[str, np.ndarray], letterbox: tuple[int, int, int, int], image_size: int, patch_size: int
) -> np.ndarray:
    """Per-patch attribute targets on the letterboxed image: (num_attributes, grid, grid) uint8.

    The maps are letterboxed like the image (nearest neighbour, so no invented values; the padding is background),
    then every patch takes the object that covers most of its pixels. Voting on whole objects, not attribute by
    attribute, keeps the four targets of a patch those of one real object.

    Args:
        attribute_maps: {attribute: (H, W) uint8} at the original image size, 0 for background.
        letterbox: ``(new_height, new_width, top, left)`` as given by ``letterbox_geometry``.
        image_size: side of the letterbox square.
        patch_size: side of a vision patch; must divide ``image_size``.
    """
    new_height, new_width, top, left = letterbox
    codes = _joint_codes(attribute_maps)
    values = np.union1d([0], codes)  # sorted, so background is 0 -> index 0
    indices = np.searchsorted(values, codes).astype(np.uint8)  # at most 7 objects: fits a uint8 image
    resized = np.asarray(Image.fromarray(indices).resize((new_width, new_height), Image.NEAREST))
    canvas = np.zeros((image_size, image_size), dtype=np.int64)
    canvas[top : top + new_height, left : left + new_width] = resized

    grid = image_size // patch_size
    patches = canvas.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    votes = (patches[..., None] == np.arange(len(values))).sum(axis=2)
    winners = values[votes.argmax(axis=-1)]
    return _split_codes(winners).astype(np.uint8)


@dataclass
class PretrainingPool:
    """Prepared pretraining scenes. Arrays are indexed by scene; ``pixel_values`` is usually memory-mapped."""

    pixel_values: np.ndarray  # (N, 3, S, S) float16, normalized
    patch_targets: np.ndarray  # (N, num_attributes, grid, grid) uint8
    caption_ids: np.ndarray  # (N, num_variants, L) int32
    caption_mask: np.ndarray  # (N, num_variants, L) uint8
    has_mirror: np.ndarray  # (N,) bool: the mirrored caption differs from the "positions" one

    def __len__(self) -> int:
        return len(self.pixel_values)

    def batch(self, indices, variants=None) -> dict[str, torch.Tensor]:
        """Tensors for the scenes ``indices``; ``variants`` picks a caption variant per scene (default "objects")."""
        indices = np.asarray(indices)
        order = np.argsort(indices)  # a memory map reads fastest in increasing order
        pixel_values = np.empty((len(indices),) + self.pixel_values.shape[1:], dtype=np.float32)
        pixel_values[order] = self.pixel_values[indices[order]]
        if variants is None:
            variants = np.zeros(len(indices), dtype=np.int64)
        elif isinstance(variants, str):
            variants = np.full(len(indices), CAPTION_VARIANTS.index(variants))
        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "input_ids": torch.from_numpy(self.caption_ids[indices, variants].astype(np.int64)),
            "attention_mask": torch.from_numpy(self.caption_mask[indices, variants].astype(np.int64)),
            "patch_targets": torch.from_numpy(self.patch_targets[indices].astype(np.int64)),
        }

    def mirrored_captions(self, indices, variants) -> dict[str, torch.Tensor]:
        """Hard negatives for a batch: the mirrored "positions" caption of every scene whose caption in the batch is
        its "positions" one (and differs from its mirror image). Only the place words tell the two apart."""
        indices, variants = np.asarray(indices), np.asarray(variants)
        chosen = indices[(variants == CAPTION_VARIANTS.index("positions")) & self.has_mirror[indices]]
        mirrored = CAPTION_VARIANTS.index("positions_mirrored")
        return {
            "negative_input_ids": torch.from_numpy(self.caption_ids[chosen, mirrored].astype(np.int64)),
            "negative_attention_mask": torch.from_numpy(self.caption_mask[chosen, mirrored].astype(np.int64)),
        }


def build_pretraining_pool(
    image_processor, tokenizer, patch_size: int, num_images: int, seed: int, caption_length: int, destination: Path
) -> None:
    """Generates ``num_images`` pretraining scenes and writes their arrays into ``destination`` (a new folder)."""
    image_size = image_processor.size["height"]
    grid = image_size // patch_size
    destination.mkdir(parents=True)
    pixel_values = np.lib.format.open_memmap(
        destination / "pixel_values.npy", mode="w+", dtype=np.float16, shape=(num_images, 3, image_size, image_size)
    )
    targets = np.zeros((num_images, len(PATCH_ATTRIBUTES), grid, grid), dtype=np.uint8)
    caption_ids = np.zeros((num_images, len(CAPTION_VARIANTS), caption_length), dtype=np.int32)
    caption_mask = np.zeros((num_images, len(CAPTION_VARIANTS), caption_length), dtype=np.uint8)
    has_mirror = np.zeros(num_images, dtype=bool)

    chunk_size = 256
    examples = generate_pretraining_examples(num_images, seed=seed)
    for start in range(0, num_images, chunk_size):
        chunk = [next(examples) for _ in range(min(chunk_size, num_images - start))]
        processed = image_processor([example["image"] for example in chunk], return_tensors="np")
        pixel_values[start : start + len(chunk)] = processed["pixel_values"].astype(np.float16)
        captions = []
        for offset, example in enumerate(chunk):
            index = start + offset
            height, width = processed["letterbox_sizes"][offset]
            top, left = processed["letterbox_offsets"][offset]
            targets[index] = patch_targets(
                example["attribute_maps"], (height, width, top, left), image_size, patch_size
            )
            # The wording choices of scene `index` depend on nothing else, so a bigger pool keeps its captions.
            variants = caption_variants(
                example["caption"], example["attribute_maps"], np.random.default_rng([seed, index])
            )
            has_mirror[index] = variants["positions_mirrored"] != variants["positions"]
            captions.extend(variants[name] for name in CAPTION_VARIANTS)
        tokens = tokenizer(captions, padding="max_length", max_length=caption_length, truncation=True)
        shape = (len(chunk), len(CAPTION_VARIANTS), caption_length)
        caption_ids[start : start + len(chunk)] = np.asarray(tokens["input_ids"]).reshape(shape)
        caption_mask[start : start + len(chunk)] = np.asarray(tokens["attention_mask"]).reshape(shape)
    pixel_values.flush()
    del pixel_values
    np.save(destination / "patch_targets.npy", targets)
    np.save(destination / "caption_ids.npy", caption_ids)
    np.save(destination / "caption_mask.npy", caption_mask)
    np.save(destination / "has_mirror.npy", has_mirror)


def _fingerprint(image_processor, tokenizer, patch_size: int, num_images: int, seed: int, caption_length: int) -> str:
    settings = {
        "num_images": num_images,
        "seed": seed,
        "caption_length": caption_length,
        "patch_size": patch_size,
        "image_processor": image_processor.to_dict(),
        "vocabulary": sorted(tokenizer.get_vocab().items()),
        "generator_version": GENERATOR_VERSION,
        "pool_version": POOL_VERSION,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_build_pretraining_pool(
    image_processor,
    tokenizer,
    patch_size: int,
    num_images: int,
    seed: int = 0,
    caption_length: int = 48,
    cache_dir=None,
) -> PretrainingPool:
    """The pool of the first ``num_images`` pretraining scenes of ``seed``, built once and then read from the cache.

    Args:
        image_processor: the ``SeraImageProcessor`` that letterboxes and normalizes the images.
        tokenizer: the CLIP tokenizer of the text tower.
        patch_size: the vision tower's patch size (the grid of the per-patch targets).
        num_images: scenes in the pool.
        seed: seed of ``generate_pretraining_examples``.
        caption_length: tokens per caption, padding included.
        cache_dir: folder of cached pools; default ``~/.cache/sera/pretraining``.

    The entry is written in a temporary folder and renamed into place, so an interrupted build leaves nothing behind.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    entry = cache_dir / _fingerprint(image_processor, tokenizer, patch_size, num_images, seed, caption_length)
    if not (entry / "has_mirror.npy").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=cache_dir))
        try:
            build_pretraining_pool(
                image_processor, tokenizer, patch_size, num_images, seed, caption_length, work / "pool"
            )
            try:
                (work / "pool").rename(entry)
            except OSError:
                if not (entry / "has_mirror.npy").exists():  # otherwise another process built the same entry
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return PretrainingPool(
        pixel_values=np.load(entry / "pixel_values.npy", mmap_mode="r"),
        patch_targets=np.load(entry / "patch_targets.npy"),
        caption_ids=np.load(entry / "caption_ids.npy"),
        caption_mask=np.load(entry / "caption_mask.npy"),
        has_mirror=np.load(entry / "has_mirror.npy"),
    )
