"""Instance masks -> the 3-class training target (background / crown interior / boundary ring)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def instances_to_classes(
    instance_ids: list[np.ndarray], height: int, width: int, interior_ratio: float = 0.7
) -> np.ndarray:
    """Build the target from per-crown boolean masks (each [h, w] or a (rows, cols, mask) crop tuple).

    ``interior_ratio`` is the fraction of each crown's radius (distance to its edge, normalised by the
    crown's maximum) kept as interior: pixels with normalised edge distance >= 1 - interior_ratio are
    crown interior (1), the rest of the crown is boundary ring (2). Pixels covered by the interior of two
    or more crowns, or by one crown's interior and another's ring, become boundary so that touching crowns
    keep separate interior seeds.
    """
    full_count = np.zeros((height, width), np.uint16)
    core_count = np.zeros((height, width), np.uint16)
    for item in instance_ids:
        r0, c0, m = item
        if m.size == 0 or not m.any():
            continue
        dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        core = dist >= (1.0 - interior_ratio) * dist.max()
        sl = (slice(r0, r0 + m.shape[0]), slice(c0, c0 + m.shape[1]))
        full_count[sl] += m
        core_count[sl] += core & m
    target = np.zeros((height, width), np.uint8)
    target[full_count >= 1] = 2
    target[(core_count == 1) & (full_count == 1)] = 1
    return target
