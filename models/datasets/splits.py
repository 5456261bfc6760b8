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


def plot_split(
    plots_by_site: dict[str, list[str]],
    val_fraction: float = 0.2,
    seed: int = 0,
    exclude: tuple[str, ...] = ("OSBS_029",),
) -> dict:
    """Split whole plots into train / validation, stratified by site (no image of a plot on both sides).

    Each site holds out ``round(val_fraction * n_plots)`` of its plots (at least one when it has two or
    more; a site with a single plot stays in training). Plots named in ``exclude`` (the project's visible
    evaluation image, OSBS_029) are on neither side. Deterministic in ``seed`` and independent of dict order.
    Returns ``{"validation": [...], "train": [...], "excluded": [...], "val_fraction", "seed"}``."""
    import zlib

    val, train, excluded = [], [], set()
    for site in sorted(plots_by_site):
        plots = sorted(set(plots_by_site[site]))
        excluded |= {p for p in plots if p in exclude}
        plots = [p for p in plots if p not in exclude]
        n_val = int(round(val_fraction * len(plots)))
        if len(plots) >= 2:
            n_val = min(max(n_val, 1), len(plots) - 1)
        else:
            n_val = 0
        rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
        chosen = set(rng.choice(len(plots), size=n_val, replace=False).tolist()) if n_val else set()
        val += [p for i, p in enumerate(plots) if i in chosen]
        train += [p for i, p in enumerate(plots) if i not in chosen]
    return {"validation": sorted(val), "train": sorted(train), "excluded": sorted(excluded),
            "val_fraction": val_fraction, "seed": seed}


def plots_by_site(csv_paths: list[str]) -> dict[str, list[str]]:
    """``{site: [plot, ...]}`` from DeepForest CSVs with ``site`` and ``plot`` columns."""
    import pandas as pd

    out: dict[str, set[str]] = {}
    for path in csv_paths:
        df = pd.read_csv(path, usecols=["site", "plot"])
        for site, plot in df.drop_duplicates().itertuples(index=False):
            out.setdefault(str(site), set()).add(str(plot))
    return {k: sorted(v) for k, v in out.items()}


def write_plot_split(csv_paths: list[str], out_path: str, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Make the stratified plot split of ``csv_paths`` (:func:`plot_split`) and write it as JSON."""
    import json
    from pathlib import Path

    doc = plot_split(plots_by_site(csv_paths), val_fraction, seed)
    doc["sources"] = [Path(p).name for p in csv_paths]
    Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc
