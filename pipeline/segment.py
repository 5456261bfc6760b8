"""Batched crown-model inference over tiles; fully masked tiles never reach the model.

What the model sees: the tile's pixels, with the part beyond the image edge mirrored from the inside and
masked pixels (nodata, alpha 0) given the nearest valid colour, so no artificial black borders create edge
crowns; those pixels stay invalid for crown extraction.

Tile reads run one batch ahead of inference in a background thread, and inference ahead of the caller's
post-processing (I/O, ONNX compute and crown extraction overlap); every tile is read by the one reader
thread only, so no GDAL handle is used by two threads at once. A small model runs as one single-thread ONNX
session per core, tiles spread over them (:func:`session_plan`).
"""

from __future__ import annotations

import os
import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from pipeline.onnx_model import OnnxModel
from pipeline.raster import Ortho
from pipeline.tiling import Tile
from pipeline.tta import predict_with_tta

Batch = list[tuple[Tile, np.ndarray, np.ndarray, Any]]  # (tile, model input, valid, aux)
MAX_SESSIONS = 2  # parallel crown-model sessions at most (each holds one tile's activations)
PARALLEL_SESSION_MAX_BYTES = 64 << 20  # models up to this file size run as one 1-thread session per core


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


Prepare = Callable[[Tile, np.ndarray], tuple[bool, Any]]


def _read_batches(ortho: Ortho, tiles: list[Tile], batch_size: int,
                  on_skip: Callable[[Tile, np.ndarray], None] | None,
                  prepare: Prepare | None) -> Iterator[Batch]:
    batch: Batch = []
    for tile in tiles:
        rgb, valid = ortho.read(tile.window)
        skip, aux = (not valid.any(), None)
        if not skip and prepare is not None:
            skip, aux = prepare(tile, valid)
        if skip:
            if on_skip is not None:
                on_skip(tile, valid)
            continue
        batch.append((tile, fill_masked(mirror_outside(rgb, tile, ortho.width, ortho.height), valid, tile,
                                        ortho.width, ortho.height), valid, aux))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def session_plan(model_bytes: int, threads: int | None, cores: int | None = None) -> tuple[int, int]:
    """(ONNX sessions, intra-op threads each) for the crown model.

    ``threads`` given: one session with that many threads (the user's choice). Otherwise a model of at most
    ``PARALLEL_SESSION_MAX_BYTES`` runs as one single-thread session per core (at most ``MAX_SESSIONS``),
    tiles spread over them: a small network gains little from a second intra-op thread (SbF-85 of r4: +10 %,
    crowns-r6: 133 -> 82 ms a tile) while two sessions on two tiles use both cores fully. A larger model runs
    as one session with every core (its activations are large: ~120 MB a 512 px tile, RSS budget)."""
    cores = max(1, int(cores or os.cpu_count() or 1))
    if threads:
        return 1, int(threads)
    if model_bytes <= PARALLEL_SESSION_MAX_BYTES and cores > 1:
        return min(cores, MAX_SESSIONS), 1
    return 1, cores


def predict_tiles(model: OnnxModel | Sequence[OnnxModel], ortho: Ortho, tiles: Iterable[Tile],
                  batch_size: int = 4, on_skip: Callable[[Tile, np.ndarray], None] | None = None,
                  tta: bool = False, prepare: Prepare | None = None
                  ) -> Iterator[tuple[Tile, np.ndarray, np.ndarray, Any]]:
    """Yield ``(tile, probs [C, T, T] float32, valid [T, T] bool, aux)`` per tile that reaches the model, in
    tile order.

    ``model``: one session, or several sessions of the same model (tiles spread over them, one batch per
    session at a time, see :func:`session_plan`). ``prepare(tile, valid) -> (skip, aux)`` runs in the reader
    thread before the model: ``skip`` True leaves the tile out (an early exit, e.g. no canopy), ``aux`` is
    passed through (e.g. the tile's CHM). ``on_skip(tile, valid)`` is called for every tile left out (fully
    masked, or skipped by ``prepare``); they are not yielded and never run.
    ``tta`` averages the model over four flipped/rotated views of each tile (:mod:`pipeline.tta`)."""
    tiles = list(tiles)
    models = list(model) if isinstance(model, Sequence) else [model]
    size = models[0].meta.tile_size
    if tiles and (int(tiles[0].window.width) != size or int(tiles[0].window.height) != size):
        raise ValueError(f"tiles are {tiles[0].window.width} px but the model takes {size} px")
    reader = _read_batches(ortho, tiles, max(1, int(batch_size)), on_skip, prepare)
    free: queue.SimpleQueue[OnnxModel] = queue.SimpleQueue()
    for m in models:
        free.put(m)

    def infer(batch: np.ndarray) -> np.ndarray:
        session = free.get()
        try:
            return predict_with_tta(session.run, batch) if tta else session.run(batch)
        finally:
            free.put(session)

    # the reader thread reads batch k+1, ONNX Runtime (which releases the GIL) runs up to one batch per
    # session in the model threads, and the caller post-processes the oldest finished batch meanwhile
    in_flight = len(models) + 1
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as reads, \
            ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="tile-model") as runs:
        next_batch = reads.submit(next, reader, None)
        pending: deque[tuple[Batch, Future]] = deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) < in_flight:
                batch = next_batch.result()
                if batch is None:
                    exhausted = True
                    break
                next_batch = reads.submit(next, reader, None)
                pending.append((batch, runs.submit(infer, np.stack([rgb for _, rgb, _, _ in batch]))))
            if not pending:
                break
            done, future = pending.popleft()
            probs = future.result()
            for (tile, _, valid, aux), p in zip(done, probs, strict=True):
                yield tile, p, valid, aux
