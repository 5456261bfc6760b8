"""Spatial-block train/validation splits (whole blocks are held out, never random pixels)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockSplit:
    """A grid of ``block_px`` blocks over a ``height`` x ``width`` image; ``val_blocks`` are (row, col)."""

    height: int
    width: int
    block_px: int
    val_blocks: frozenset[tuple[int, int]]

    def val_mask(self) -> np.ndarray:
        """bool [height, width]: True in held-out blocks."""
        m = np.zeros((self.height, self.width), bool)
        for r, c in self.val_blocks:
            m[r * self.block_px : (r + 1) * self.block_px, c * self.block_px : (c + 1) * self.block_px] = True
        return m

    def is_val(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True for pixel coordinates (x right, y down) that fall in a held-out block."""
        r = np.clip((np.asarray(y) // self.block_px).astype(int), 0, None)
        c = np.clip((np.asarray(x) // self.block_px).astype(int), 0, None)
        return np.array(
            [(int(a), int(b)) in self.val_blocks for a, b in zip(r.ravel(), c.ravel(), strict=True)], bool
        ).reshape(np.shape(x))


def block_split(
    height: int, width: int, block_px: int = 256, val_fraction: float = 0.2, seed: int = 0
) -> BlockSplit:
    """Hold out ``round(val_fraction * n_blocks)`` (at least 1 when val_fraction > 0) whole blocks, seeded."""
    rows, cols = -(-height // block_px), -(-width // block_px)
    blocks = [(r, c) for r in range(rows) for c in range(cols)]
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * len(blocks))))
    if n_val >= len(blocks):
        raise ValueError(f"val_fraction {val_fraction} leaves no training block ({len(blocks)} blocks)")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(blocks), size=n_val, replace=False) if n_val else []
    return BlockSplit(height, width, block_px, frozenset(blocks[i] for i in chosen))
