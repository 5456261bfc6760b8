"""Batched crown-model inference over tiles; fully masked tiles never reach the model.

What the model sees: the tile's pixels, with the part beyond the image edge mirrored from the inside and
masked pixels (nodata, alpha 0) given the nearest valid colour, so no artificial black borders create edge
crowns; those pixels stay invalid for crown extraction.

Tile reads run one batch ahead of inference in a background thread, and inference one batch ahead of the
caller's post-processing (I/O, ONNX compute and crown extraction overlap); every tile is read by the one
reader thread only, so no GDAL handle is used by two threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
from scipy import ndimage as ndi

from pipeline.onnx_model import OnnxModel
from pipeline.raster import Ortho
from pipeline.tiling import Tile
from pipeline.tta import predict_with_tta

Batch = list[tuple[Tile, np.ndarray, np.ndarray]]


def mirror_outside(rgb: np.ndarray, tile: Tile, width: int, height: int) -> np.ndarray:
    """Fill the part of a tile that lies beyond the image edge with a mirror image of the inside, so the
    model sees no artificial black border (crowns there are invalid anyway: ``valid`` stays False)."""
    size_r, size_c = rgb.shape[1:]
    r0, c0 = max(0, -int(tile.window.row_off)), max(0, -int(tile.window.col_off))
    r1 = min(size_r, height - int(tile.window.row_off))
    c1 = min(size_c, width - int(tile.window.col_off))
    if (r0, c0, r1, c1) == (0, 0, size_r, size_c) or r1 <= r0 or c1 <= c0:
        return rgb
    inside = rgb[:, r0:r1, c0:c1]
    return np.pad(inside, ((0, 0), (r0, size_r - r1), (c0, size_c - c1)), mode="symmetric")


def fill_masked(rgb: np.ndarray, valid: np.ndarray, tile: Tile, width: int, height: int) -> np.ndarray:
    """Masked pixels inside the image (nodata, alpha 0) take the colour of the nearest valid pixel, so the
    model sees no black holes or ragged black borders; they stay invalid for crown extraction."""
    inside = np.zeros(valid.shape, dtype=bool)
    inside[: max(0, height - int(tile.window.row_off)), : max(0, width - int(tile.window.col_off))] = True
    holes = inside & ~valid
    if not holes.any() or not valid.any():
        return rgb
    _, (rows, cols) = ndi.distance_transform_edt(~valid, return_indices=True)
    out = rgb.copy()
    out[:, holes] = rgb[:, rows[holes], cols[holes]]
    return out


def _read_batches(ortho: Ortho, tiles: list[Tile], batch_size: int,
                  on_skip: Callable[[Tile], None] | None) -> Iterator[Batch]:
    batch: Batch = []
    for tile in tiles:
        rgb, valid = ortho.read(tile.window)
        if not valid.any():
            if on_skip is not None:
                on_skip(tile)
            continue
        batch.append((tile, fill_masked(mirror_outside(rgb, tile, ortho.width, ortho.height), valid, tile,
                                        ortho.width, ortho.height), valid))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_tiles(model: OnnxModel, ortho: Ortho, tiles: Iterable[Tile], batch_size: int = 4,
                  on_skip: Callable[[Tile], None] | None = None, tta: bool = False
                  ) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
    """Yield ``(tile, probs [C, T, T] float32, valid [T, T] bool)`` per tile with any valid pixel.

    ``on_skip(tile)`` is called for every fully masked tile (they are not yielded and never run).
    ``tta`` averages the model over four flipped/rotated views of each tile (:mod:`pipeline.tta`)."""
    tiles = list(tiles)
    size = model.meta.tile_size
    if tiles and (int(tiles[0].window.width) != size or int(tiles[0].window.height) != size):
        raise ValueError(f"tiles are {tiles[0].window.width} px but the model takes {size} px")
    reader = _read_batches(ortho, tiles, max(1, int(batch_size)), on_skip)
    infer = partial(predict_with_tta, model.run) if tta else model.run
    # three stages overlap: the reader thread reads batch k+1, ONNX Runtime (which releases the GIL) runs
    # batch k in the model thread, and the caller post-processes batch k-1
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as reads, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-model") as runs:
        next_batch = reads.submit(next, reader, None)
        previous: tuple[Batch, Future] | None = None
        while True:
            batch = next_batch.result()
            current = None
            if batch is not None:
                next_batch = reads.submit(next, reader, None)
                current = (batch, runs.submit(infer, np.stack([rgb for _, rgb, _ in batch])))
            if previous is not None:
                done, probs = previous[0], previous[1].result()
                for (tile, _, valid), p in zip(done, probs, strict=True):
                    yield tile, p, valid
            if current is None:
                break
            previous = current
