"""Crown bounding boxes (DeepForest CSV, Pascal VOC XML) -> crown polygons and 3-class masks.

Boxes are in pixel coordinates of their image (origin top-left, x right, y down). Each box becomes the
ellipse inscribed in it (a crown is round-ish; a box's corners are not crown), so the training target is an
ellipse mask split into an interior core and a boundary ring (see :mod:`models.datasets.masks`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.datasets.masks import instances_to_classes
from pipeline.annotations import (  # noqa: F401 - the readers, re-exported for training code
    BOX_COLUMNS,
    BoxSet,
    box_ellipse,
    boxes_to_polygons,
    read_boxes,
    read_deepforest_csv,
    read_voc_xml,
)


def ellipse_masks(boxes: pd.DataFrame, height: int, width: int) -> list[tuple[int, int, np.ndarray]]:
    """Per-box inscribed-ellipse masks as (row0, col0, bool crop) tuples, clipped to the image."""
    out = []
    for x0, y0, x1, y1 in boxes[BOX_COLUMNS].to_numpy(float):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
        if c1 <= c0 or r1 <= r0:
            continue
        cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
        yy, xx = np.mgrid[r0:r1, c0:c1]
        m = ((xx + 0.5 - cx) / a) ** 2 + ((yy + 0.5 - cy) / b) ** 2 <= 1.0
        out.append((r0, c0, m))
    return out


def boxes_to_crown_mask(
    boxes: pd.DataFrame, height: int, width: int, interior_ratio: float = 0.7
) -> np.ndarray:
    """uint8 [height, width] target: 0 background, 1 crown interior, 2 boundary ring (inscribed ellipses)."""
    return instances_to_classes(ellipse_masks(boxes, height, width), height, width, interior_ratio)
