"""Test-time augmentation for the crown model: the mean class probabilities over four views of each tile.

The views are the tile itself, its left-right mirror, its 90° rotation and its mirror turned by 270°
(four of the eight symmetries of a square, the same four as the training code's validation,
``models.train_crowns.predict_image``; the crown model was trained with flips and 90° rotations, so each
view is an image it knows). Every view's output is mapped back to the tile's own pixel grid before
averaging. Four model runs per tile: about 4x the segmentation time. Tiles must be square.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

# (mirror left-right first, then quarter turns counter-clockwise)
VIEWS: tuple[tuple[bool, int], ...] = ((False, 0), (True, 0), (False, 1), (True, 3))


def _view(x: np.ndarray, mirror: bool, k: int) -> np.ndarray:
    x = x[..., ::-1] if mirror else x
    return np.rot90(x, k, axes=(-2, -1))


def _unview(y: np.ndarray, mirror: bool, k: int) -> np.ndarray:
    y = np.rot90(y, -k, axes=(-2, -1))
    return y[..., ::-1] if mirror else y


def tta_views(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> Iterator[np.ndarray]:
    """``run`` on each of :data:`VIEWS` of ``batch`` (uint8 [N, 3, T, T]), each output mapped back to the
    tile grid ([N, C, T, T])."""
    if batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"test-time augmentation needs square tiles, got {batch.shape[-2:]}")
    for mirror, k in VIEWS:
        yield _unview(run(np.ascontiguousarray(_view(batch, mirror, k))), mirror, k)


def predict_with_tta(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """Mean of ``run`` over :data:`VIEWS` of ``batch`` (uint8 [N, 3, T, T]) -> float32 [N, C, T, T]."""
    acc = None
    for out in tta_views(run, batch):
        acc = out.astype(np.float32) if acc is None else acc + out
    return np.ascontiguousarray(acc / len(VIEWS), dtype=np.float32)
