"""Ground truth for COCO-format fixtures, computed without pycocotools so the loaders' decoding can be checked."""

import numpy as np


def rectangle_polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rectangle_mask(height, width, *rectangles):
    """Pixels covered by rectangle polygons with corners (x0, y0)-(x1, y1): columns x0..x1-1, rows y0..y1-1."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in rectangles:
        mask[y0:y1, x0:x1] = True
    return mask


def column_major_runs(mask):
    """Uncompressed COCO RLE counts: runs of 0s and 1s, column by column, starting with a run of 0s."""
    runs, current, length = [], False, 0
    for value in np.asarray(mask, dtype=bool).flatten(order="F"):
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    runs.append(length)
    return runs
