"""Procedural scenes for the synthetic referring dataset ("synthref").

A scene is a handful of coloured, textured shapes of three sizes drawn on a cluttered background. Objects may overlap;
the one drawn later hides the one below it, and the ground truth of every object is the part of it that stays
visible. Everything is drawn from a numpy ``Generator`` so that a seed fixes the scene down to the last byte.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# Saturated reference colours; each object jitters its own RGB around them so that colour is a range, not a value.
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 190),
    "orange": (245, 135, 25),
}
# Half-extent of the shape as a fraction of the image's shorter side. Classes are ~1.5x apart so the word is clear.
SIZES = {"small": 0.08, "medium": 0.12, "big": 0.18}
TEXTURES = ("solid", "striped", "dotted")

# The attributes of an object, in the order adjectives are written ("the big striped red circle").
ATTRIBUTE_VALUES = {
    "size": tuple(SIZES),
    "texture": TEXTURES,
    "color": tuple(COLORS),
    "shape": SHAPES,
}

# Colour + shape pairs that never appear in the train / validation / test splits (nor in encoder pretraining) and
# that every referred object of the "test_unseen" split has. Each colour and each shape is held out exactly once, so
# every single word is still seen in training: only the combination is new.
HELD_OUT_COMBINATIONS = frozenset(
    {
        ("red", "star"),
        ("green", "hexagon"),
        ("blue", "triangle"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("orange", "diamond"),
    }
)

# An object must keep at least this share of its own area visible, otherwise nobody could tell what it is.
MIN_VISIBLE_FRACTION = 0.5
COLOR_JITTER = 20
SIZE_JITTER = 0.08
# Chance that a new object copies the colour (or shape) of one already placed, so that scenes often hold two red
# shapes or two circles and location, relation and comparison words become necessary.
REUSE_PROBABILITY = 0.4
PLACEMENT_TRIES = 25


@dataclass
class SceneObject:
    """One shape of a scene. Geometry is in pixels; ``visible_mask`` is filled in once the whole scene is placed."""

    shape: str
    color: str
    size: str
    texture: str
    rgb: tuple[int, int, int]
    center_x: float
    center_y: float
    radius: float  # half-extent of the shape's bounding box
    rotation: float  # degrees; only triangles, stars and hexagons are turned (a turned square would be a diamond)
    full_area: int = 0
    visible_mask: np.ndarray | None = None

    @cached_property
    def visible_area(self) -> int:
        return int(self.visible_mask.sum())

    @cached_property
    def centroid(self) -> tuple[float, float]:
        """Centre of the visible part: where a viewer sees the object, which matters once it is partly hidden."""
        ys, xs = np.nonzero(self.visible_mask)
        return float(xs.mean()), float(ys.mean())

    @property
    def is_held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT_COMBINATIONS


@dataclass
class Scene:
    """A rendered scene: the RGB image, its objects in drawing order, and ``labels`` (0 background, i + 1 object i)."""

    image: Image.Image
    labels: np.ndarray
    objects: list[SceneObject]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def attribute_map(self, attribute: str) -> np.ndarray:
        """Per-pixel index of ``attribute`` (see ``ATTRIBUTE_VALUES``) plus one, 0 for the background."""
        values = ATTRIBUTE_VALUES[attribute]
        lookup = np.zeros(len(self.objects) + 1, dtype=np.uint8)
        for index, obj in enumerate(self.objects):
            lookup[index + 1] = values.index(getattr(obj, attribute)) + 1
        return lookup[self.labels]


def generate_scene(
    rng: np.random.Generator,
    held_out: str = "exclude",
    image_size_range: tuple[int, int] = (96, 160),
    num_objects_range: tuple[int, int] = (3, 6),
) -> Scene:
    """Draws one scene.

    Args:
        rng: the only source of randomness.
        held_out: "exclude" to never draw a pair of ``HELD_OUT_COMBINATIONS``, "require" to draw at least one such
            object (other objects may then have any combination).
        image_size_range: inclusive range of each image side; width and height always differ.
        num_objects_range: inclusive range of the number of objects asked for. An object that finds no place
            where it hides no other too much is left out, but a scene never has fewer than the minimum.
    """
    if held_out not in ("exclude", "require"):
        raise ValueError(f"held_out must be 'exclude' or 'require', got {held_out!r}")
    while True:
        width, height = (int(side) for side in rng.integers(image_size_range[0], image_size_range[1] + 1, size=2))
        if width == height:
            continue
        num_objects = int(rng.integers(num_objects_range[0], num_objects_range[1] + 1))
        specs = _sample_attributes(rng, num_objects, held_out)
        objects, full_masks = _place_objects(rng, specs, width, height)
        if len(objects) < num_objects_range[0]:
            continue
        if held_out == "require" and not any(obj.is_held_out for obj in objects):
            continue
        break

    labels = np.zeros((height, width), dtype=np.uint8)
    pixels = _background(rng, width, height)
    for index, (obj, full_mask) in enumerate(zip(objects, full_masks)):
        labels[full_mask] = index + 1
        _paint_object(rng, pixels, obj, full_mask)
    for index, obj in enumerate(objects):
        obj.visible_mask = labels == index + 1
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    return Scene(image=image, labels=labels, objects=objects)


def _sample_attributes(rng: np.random.Generator, num_objects: int, held_out: str) -> list[dict]:
    specs = []
    for _ in range(num_objects):
        shape = str(rng.choice(SHAPES))
        color = str(rng.choice(list(COLORS)))
        if specs and rng.random() < REUSE_PROBABILITY:
            shape = specs[int(rng.integers(len(specs)))]["shape"]
        if specs and rng.random() < REUSE_PROBABILITY:
            color = specs[int(rng.integers(len(specs)))]["color"]
        if held_out == "exclude":
            allowed = [name for name in COLORS if (name, shape) not in HELD_OUT_COMBINATIONS]
            if color not in allowed:
                color = str(rng.choice(allowed))
        specs.append(
            {
                "shape": shape,
                "color": color,
                "size": str(rng.choice(list(SIZES))),
                "texture": str(rng.choice(TEXTURES)),
            }
        )
    if held_out == "require":
        # One (sometimes two) objects of an unseen pair, anywhere in the drawing order.
        pairs = sorted(HELD_OUT_COMBINATIONS)
        for index in rng.choice(num_objects, size=1 + int(rng.random() < 0.3), replace=False):
            specs[index]["color"], specs[index]["shape"] = pairs[int(rng.integers(len(pairs)))]
    return specs


def _place_objects(rng, specs, width, height):
    """Places objects one by one on top of each other, retrying positions that would hide an earlier one too much."""
    short_side = min(width, height)
    objects, full_masks, visible = [], [], []
    for spec in specs:
        radius = SIZES[spec["size"]] * short_side * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        rotation = float(rng.uniform(-12, 12)) if spec["shape"] in ("triangle", "star", "hexagon") else 0.0
        rgb = tuple(
            int(c)
            for c in np.clip(
                np.array(COLORS[spec["color"]]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255
            )
        )
        for _ in range(PLACEMENT_TRIES):
            center_x = float(rng.uniform(radius + 1, width - radius - 1))
            center_y = float(rng.uniform(radius + 1, height - radius - 1))
            # Touching objects of the same colour would melt into one blob with no visible border between them.
            if any(
                other.color == spec["color"]
                and math.hypot(other.center_x - center_x, other.center_y - center_y) < other.radius + radius + 2
                for other in objects
            ):
                continue
            full_mask = _shape_mask(spec["shape"], center_x, center_y, radius, rotation, width, height)
            still_visible = [mask & ~full_mask for mask in visible]
            if all(mask.sum() >= MIN_VISIBLE_FRACTION * obj.full_area for mask, obj in zip(still_visible, objects)):
                break
        else:
            continue
        obj = SceneObject(
            rgb=rgb,
            center_x=center_x,
            center_y=center_y,
            radius=radius,
            rotation=rotation,
            full_area=int(full_mask.sum()),
            **spec,
        )
        objects.append(obj)
        full_masks.append(full_mask)
        visible = still_visible + [full_mask]
    return objects, full_masks


def _shape_mask(shape, center_x, center_y, radius, rotation, width, height) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([center_x - radius, center_y - radius, center_x + radius, center_y + radius], fill=1)
    else:
        draw.polygon(_polygon(shape, center_x, center_y, radius, rotation), fill=1)
    return np.asarray(canvas, dtype=bool)


def _polygon(shape, center_x, center_y, radius, rotation) -> list[tuple[float, float]]:
    if shape == "square":
        half = 0.85 * radius  # a square as wide as a circle looks bigger than it; this evens them out
        return [(center_x - half, center_y - half), (center_x + half, center_y - half),
                (center_x + half, center_y + half), (center_x - half, center_y + half)]  # fmt: skip
    if shape == "diamond":
        angles, radii = [-90, 0, 90, 180], [radius] * 4
    elif shape == "triangle":
        center_y += 0.25 * radius  # centre the triangle's bounding box, not its circumcircle, on the position
        angles, radii = [-90, 30, 150], [radius] * 3
    elif shape == "hexagon":
        angles, radii = [0, 60, 120, 180, 240, 300], [radius] * 6
    elif shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [radius if k % 2 == 0 else 0.45 * radius for k in range(10)]
    else:
        raise ValueError(f"Unknown shape {shape!r}")
    return [
        (center_x + r * math.cos(math.radians(a + rotation)), center_y + r * math.sin(math.radians(a + rotation)))
        for a, r in zip(angles, radii)
    ]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted gradient + low-frequency noise + faint lines and blobs: clutter that is never an object."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    start, end = (rng.uniform(70, 190) + rng.uniform(-25, 25, 3) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    pixels = start + (end - start) * ramp[..., None]

    # Blotchy noise drawn on a coarse grid and smoothly upsampled: looks like texture, stays cheap to compress.
    coarse = rng.normal(0, 12, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    pixels += _upsample(coarse, width, height)
    pixels += rng.normal(0, 3, size=pixels.shape)

    clutter = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(2, 7))):
        points = [tuple(rng.uniform(0, [width, height])) for _ in range(2)]
        draw.line(points, fill=_faint_color(rng, 50, 90), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.uniform(0, [width, height])
        rx, ry = rng.uniform(4, 0.2 * min(width, height), size=2)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_faint_color(rng, 25, 55))
    layer = np.asarray(clutter, dtype=np.float32)
    alpha = layer[..., 3:] / 255.0
    return pixels * (1 - alpha) + layer[..., :3] * alpha


def _faint_color(rng, min_alpha, max_alpha):
    grey = rng.uniform(40, 220)
    return tuple(int(c) for c in np.clip(grey + rng.uniform(-40, 40, 3), 0, 255)) + (
        int(rng.integers(min_alpha, max_alpha)),
    )


def _upsample(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of a (h, w, 3) float array to (height, width, 3)."""
    rows = np.linspace(0, array.shape[0] - 1, height)
    cols = np.linspace(0, array.shape[1] - 1, width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, array.shape[0] - 1), np.minimum(c0 + 1, array.shape[1] - 1)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = array[r0][:, c0] * (1 - fc) + array[r0][:, c1] * fc
    bottom = array[r1][:, c0] * (1 - fc) + array[r1][:, c1] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)


def _paint_object(rng: np.random.Generator, pixels: np.ndarray, obj: SceneObject, full_mask: np.ndarray) -> None:
    """Paints ``obj`` over ``pixels`` inside ``full_mask``; stripes and dots use a darker shade of the same colour."""
    height, width = full_mask.shape
    ys, xs = np.mgrid[0:height, 0:width]
    if obj.texture == "striped":
        angle = math.radians(float(rng.choice([0, 45, 90, 135])))
        along = xs * math.cos(angle) + ys * math.sin(angle) + rng.uniform(0, 6)
        pattern = np.floor(along / 3) % 2 == 1
    elif obj.texture == "dotted":
        offset_x, offset_y = rng.uniform(0, 6, size=2)
        pattern = ((xs + offset_x) % 6 - 3) ** 2 + ((ys + offset_y) % 6 - 3) ** 2 <= 2.5
    else:
        pattern = np.zeros_like(full_mask)
    base = np.array(obj.rgb, dtype=np.float32)
    shaded = np.where(pattern[..., None], 0.5 * base, base)
    pixels[full_mask] = shaded[full_mask]
