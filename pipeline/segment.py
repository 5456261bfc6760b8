"""Batched crown-model inference over tiles; fully masked tiles never reach the model.

Tile reads run one step ahead of inference in a background thread (I/O and decoding overlap ONNX compute);
each tile is read by the one reader thread only, so no GDAL handle is shared across threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.onnx_model import OnnxModel
from pipeline.raster import Ortho
from pipeline.tiling import Tile

Batch = list[tuple[Tile, np.ndarray, np.ndarray]]


def _read_batches(ortho: Ortho, tiles: list[Tile], batch_size: int,
                  on_skip: Callable[[Tile], None] | None) -> Iterator[Batch]:
    batch: Batch = []
    for tile in tiles:
        rgb, valid = ortho.read(tile.window)
        if not valid.any():
            if on_skip is not None:
                on_skip(tile)
            continue
        batch.append((tile, rgb, valid))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_tiles(model: OnnxModel, ortho: Ortho, tiles: Iterable[Tile], batch_size: int = 4,
                  on_skip: Callable[[Tile], None] | None = None
                  ) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
    """Yield ``(tile, probs [C, T, T] float32, valid [T, T] bool)`` per tile with any valid pixel.

    ``on_skip(tile)`` is called for every fully masked tile (they are not yielded and never run)."""
    tiles = list(tiles)
    size = model.meta.tile_size
    if tiles and (int(tiles[0].window.width) != size or int(tiles[0].window.height) != size):
        raise ValueError(f"tiles are {tiles[0].window.width} px but the model takes {size} px")
    reader = _read_batches(ortho, tiles, max(1, int(batch_size)), on_skip)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as pool:
        pending = pool.submit(next, reader, None)
        while True:
            batch = pending.result()
            if batch is None:
                break
            pending = pool.submit(next, reader, None)
            probs = model.run(np.stack([rgb for _, rgb, _ in batch]))
            for (tile, _, valid), p in zip(batch, probs, strict=True):
                yield tile, p, valid
