"""Test pictures drawn on the spot."""

import numpy as np
from PIL import Image, ImageDraw


def scene(width: int = 90, height: int = 60, seed: int = 0, lowest: int = 150) -> Image.Image:
    """A noisy background (values ``lowest`` to 229), a red disc on the left and a blue square on the right."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(lowest, 230, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.3, width * 0.4, height * 0.8), fill=(220, 30, 30))
    draw.rectangle((width * 0.6, height * 0.2, width * 0.9, height * 0.7), fill=(30, 60, 220))
    return image
