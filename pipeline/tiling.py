"""Tile plan over the working grid: fixed-size read windows with overlap, and cores that partition the image.

Seam rule: a crown is kept only by the tile whose core contains its centroid (pixel coordinates of the
working grid, pixel (r, c) spanning [c, c+1) x [r, r+1)). Interior cores have a margin of at least
overlap_px // 2 px on every side of their window, so with overlap_px >= the largest crown diameter a crown
whose centroid lies in a core lies wholly inside that tile's window, and every crown comes out exactly once.
Neighbouring tiles can still segment a crown near their shared core edge differently (e.g. whole in one
tile, a fragment in the other, centroids in different cores): ``pipeline.crowns.resolve_seam_overlaps``
then keeps the larger of two crowns from different tiles that overlap by more than half the smaller one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rasterio.windows import Window


@dataclass(frozen=True)
class Tile:
    """``window``: the read window (tile_size x tile_size px, may extend past the image: boundless read).
    ``core``: the part of the image this tile owns (image pixel coordinates); cores partition the image."""

    index: int
    window: Window
    core: Window

    def core_in_tile(self) -> tuple[int, int, int, int]:
        """Core as (row0, row1, col0, col1) in this tile's pixel coordinates."""
        r0 = int(self.core.row_off - self.window.row_off)
        c0 = int(self.core.col_off - self.window.col_off)
        return r0, r0 + int(self.core.height), c0, c0 + int(self.core.width)


def _axis_plan(length: int, tile_size: int, overlap_px: int) -> list[tuple[int, int, int]]:
    """(window_offset, core_start, core_stop) along one axis."""
    stride = tile_size - overlap_px
    if stride <= 0:
        raise ValueError(f"overlap_px ({overlap_px}) must be smaller than tile_size ({tile_size})")
    margin = overlap_px // 2
    n = 1 if length <= tile_size else math.ceil((length - tile_size) / stride) + 1
    plan = []
    for k in range(n):
        start = k * stride
        core0 = 0 if k == 0 else start + margin
        core1 = length if k == n - 1 else (k + 1) * stride + margin
        plan.append((start, core0, min(core1, length)))
    return plan


def plan_tiles(width: int, height: int, tile_size: int, overlap_px: int) -> list[Tile]:
    """Row-major tiles covering a ``width`` x ``height`` px grid; every pixel is in exactly one core."""
    if width <= 0 or height <= 0:
        raise ValueError("the image has no pixels")
    rows = _axis_plan(height, tile_size, overlap_px)
    cols = _axis_plan(width, tile_size, overlap_px)
    tiles = []
    for r_off, r0, r1 in rows:
        for c_off, c0, c1 in cols:
            tiles.append(Tile(index=len(tiles), window=Window(c_off, r_off, tile_size, tile_size),
                              core=Window(c0, r0, c1 - c0, r1 - r0)))
    return tiles


def group_tiles(tiles: list[Tile], tiles_per_group: int) -> list[list[int]]:
    """Consecutive tile indexes in groups of ``tiles_per_group`` (the unit of resumable work)."""
    size = max(1, int(tiles_per_group))
    return [[t.index for t in tiles[i:i + size]] for i in range(0, len(tiles), size)]
