"""Species per crown from the species model on crown chips (inference side; no torch).

A chip is centred on the crown centroid, covers ``tile_size * gsd_m`` metres (the species model's chip
size and GSD, from its metadata), is resampled to ``tile_size`` px, and pixels outside the crown polygon
are zeroed (the inside masks of a block's crowns come from a few rasterizations, :func:`chip_masks`).
Crowns whose best softmax probability is below the model's ``unknown_threshold`` are "unknown".
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import geopandas as gpd
import numpy as np
import rasterio.features
import shapely
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from pipeline.memory import release_free_heap
from pipeline.onnx_model import OnnxModel
from pipeline.raster import Ortho

UNKNOWN = "unknown"


def _resize(rgb: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    if rgb.shape[-1] == size and rgb.shape[-2] == size:
        return rgb
    if rgb.ndim == 2:
        return np.asarray(Image.fromarray(rgb).resize((size, size), resample))
    img = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
    return np.asarray(img.resize((size, size), resample)).transpose(2, 0, 1)


Block = tuple[np.ndarray, np.ndarray, Window]  # (rgb uint8 [3,h,w], valid [h,w], window) read from an Ortho


def chip_window(ortho: Ortho, centroid_xy: tuple[float, float], chip_px: int, chip_gsd_m: float) -> Window:
    """Working-grid window (ortho pixels) that a crown chip covers."""
    span_px = max(1, int(round(chip_px * chip_gsd_m / ortho.gsd_m)))
    col, row = (~ortho.transform) @ centroid_xy
    return Window(int(round(col - span_px / 2)), int(round(row - span_px / 2)), span_px, span_px)


def _chip_transform(ortho: Ortho, window: Window, chip_px: int) -> Affine:
    return ortho.window_transform(window) @ Affine.scale(int(window.width) / chip_px)


def _crown_mask(ortho: Ortho, polygon, window: Window, chip_px: int) -> np.ndarray:
    """Inside-crown mask bool [chip_px, chip_px] of one crown, rasterized on its own chip grid."""
    return rasterio.features.rasterize([(polygon, 1)], out_shape=(chip_px, chip_px),
                                       transform=_chip_transform(ortho, window, chip_px), fill=0,
                                       dtype="uint8") > 0


def chip_masks(ortho: Ortho, polygons: list, windows: list[Window], chip_px: int) -> list[np.ndarray]:
    """Inside-crown masks bool [chip_px, chip_px] of many crowns, each on its own chip grid (``windows`` from
    :func:`chip_window`), from a few rasterizations instead of one per crown.

    When a chip pixel spans a whole number k of ortho pixels, chips whose window offsets agree modulo k share
    one grid; crowns on it are split into layers of pairwise non-intersecting polygons (greedy colouring), and
    each layer is burnt once. Every chip pixel is sampled at the same centre as by a rasterization on the
    chip's own grid, and no two crowns of a layer cover the same centre, so each mask equals the crown's own
    rasterization. Otherwise (k not whole) each crown is rasterized on its own chip grid."""
    n = len(polygons)
    out: list[np.ndarray | None] = [None] * n
    span = int(windows[0].width) if n else 0
    k = span / chip_px
    if n == 0:
        return []
    if abs(k - round(k)) > 1e-9 or any(int(w.width) != span for w in windows):
        return [_crown_mask(ortho, g, w, chip_px) for g, w in zip(polygons, windows, strict=True)]
    k = int(round(k))
    rows = np.array([int(w.row_off) for w in windows])
    cols = np.array([int(w.col_off) for w in windows])
    phase = (rows % k) * k + (cols % k)
    geoms = np.array(polygons, dtype=object)
    for ph in np.unique(phase):
        members = np.flatnonzero(phase == ph)
        r0, c0 = int(rows[members].min()), int(cols[members].min())
        h = (int(rows[members].max()) - r0) // k + chip_px
        w = (int(cols[members].max()) - c0) // k + chip_px
        grid = ortho.window_transform(Window(c0, r0, w * k, h * k)) @ Affine.scale(k)
        layer_of = _layers(geoms[members])
        for layer in range(int(layer_of.max()) + 1):
            chosen = members[layer_of == layer]
            burnt = rasterio.features.rasterize(
                [(geoms[i], j + 1) for j, i in enumerate(chosen)], out_shape=(h, w), transform=grid, fill=0,
                dtype="int32")
            for j, i in enumerate(chosen):
                rr, cc = (int(rows[i]) - r0) // k, (int(cols[i]) - c0) // k
                out[i] = burnt[rr:rr + chip_px, cc:cc + chip_px] == j + 1
    return out  # type: ignore[return-value]


def _layers(geoms: np.ndarray) -> np.ndarray:
    """Greedy colouring: a layer index per polygon such that polygons of one layer do not intersect."""
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = a != b
    neighbours: list[list[int]] = [[] for _ in range(len(geoms))]
    for i, j in zip(a[keep].tolist(), b[keep].tolist(), strict=True):
        neighbours[i].append(j)
    layer = np.full(len(geoms), -1, dtype=np.int64)
    for i in range(len(geoms)):
        used = {int(layer[j]) for j in neighbours[i] if layer[j] >= 0}
        layer[i] = next(c for c in range(len(used) + 1) if c not in used)
    return layer


def crown_chip(ortho: Ortho, polygon, centroid_xy: tuple[float, float], chip_px: int,
               chip_gsd_m: float, block: Block | None = None, inside: np.ndarray | None = None) -> np.ndarray:
    """uint8 [3, chip_px, chip_px] chip around ``centroid_xy`` (working CRS) with outside-crown pixels 0.

    ``block``: an already read region (``Ortho.read``) that contains the chip window; the chip is cut from
    it instead of being read again (same pixels). ``inside``: the crown's mask on the chip grid when already
    known (:func:`chip_masks`); rasterized here otherwise."""
    window = chip_window(ortho, centroid_xy, chip_px, chip_gsd_m)
    span_px = int(window.width)
    if block is not None:
        b_rgb, b_valid, b_win = block
        r0, c0 = int(window.row_off - b_win.row_off), int(window.col_off - b_win.col_off)
        inside_block = (r0 >= 0 and c0 >= 0 and r0 + span_px <= b_rgb.shape[1]
                        and c0 + span_px <= b_rgb.shape[2])
    if block is not None and inside_block:
        rgb = b_rgb[:, r0:r0 + span_px, c0:c0 + span_px]
        valid = b_valid[r0:r0 + span_px, c0:c0 + span_px]
    else:
        rgb, valid = ortho.read(window)
    chip = _resize(rgb, chip_px, Image.Resampling.BILINEAR)
    ok = _resize(valid.astype(np.uint8), chip_px, Image.Resampling.NEAREST) > 0
    if inside is None:
        inside = _crown_mask(ortho, polygon, window, chip_px)
    return np.where(inside & ok, chip, 0).astype(np.uint8)


def classify_crowns(model: OnnxModel | None, ortho: Ortho, crowns_gdf: gpd.GeoDataFrame, batch_size: int = 64,
                    block_px: int = 1024) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(species per crown, probability of the best class [n], class probabilities [n, K]).

    ``crowns_gdf`` is in the ortho's working CRS. Without a model: all "unknown", NaN, shape [n, 0]."""
    n = len(crowns_gdf)
    if model is None:
        return [UNKNOWN] * n, np.full(n, np.nan), np.zeros((n, 0), dtype=np.float32)
    names = model.meta.class_names
    chip_px, chip_gsd = model.meta.tile_size, model.meta.gsd_m
    probs = np.zeros((n, len(names)), dtype=np.float32)
    geoms = crowns_gdf.geometry.to_numpy()
    if "centroid_x" in crowns_gdf and "centroid_y" in crowns_gdf:
        cxy = np.column_stack([crowns_gdf["centroid_x"].to_numpy(), crowns_gdf["centroid_y"].to_numpy()])
    else:
        cents = crowns_gdf.geometry.centroid
        cxy = np.column_stack([cents.x.to_numpy(), cents.y.to_numpy()])
    # crowns are processed block by block (by centroid): one read per block, chips cut from memory
    inv = ~ortho.transform
    cols, rows = inv @ (cxy[:, 0], cxy[:, 1]) if n else (np.zeros(0), np.zeros(0))
    block_id = (np.floor(np.asarray(rows) / block_px).astype(np.int64) * (ortho.width // block_px + 1)
                + np.floor(np.asarray(cols) / block_px).astype(np.int64))
    order = np.argsort(block_id, kind="stable")
    span_px = max(1, int(round(chip_px * chip_gsd / ortho.gsd_m)))
    pending: list[tuple[int, np.ndarray]] = []
    running: list[tuple[list[int], Future]] = []

    def flush(runs: ThreadPoolExecutor) -> None:  # ONNX Runtime (GIL released) runs while chips are cut
        if pending:
            batch = np.stack([c for _, c in pending])
            running.append(([i for i, _ in pending], runs.submit(model.run, batch)))
            pending.clear()
        while len(running) > 1 or (running and running[-1][1].done()):
            idx, fut = running.pop(0)
            probs[idx] = fut.result()

    sorted_ids = block_id[order]
    blocks = np.split(order, np.flatnonzero(np.diff(sorted_ids)) + 1) if n else []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="species-model") as runs:
        for members in blocks:
            wins = [chip_window(ortho, (float(cxy[i, 0]), float(cxy[i, 1])), chip_px, chip_gsd)
                    for i in members]
            c0 = min(int(w.col_off) for w in wins)
            r0 = min(int(w.row_off) for w in wins)
            c1 = max(int(w.col_off) for w in wins) + span_px
            r1 = max(int(w.row_off) for w in wins) + span_px
            b_win = Window(c0, r0, c1 - c0, r1 - r0)
            b_rgb, b_valid = ortho.read(b_win)
            # pixel-interleaved in memory (still indexed [band, row, col]): a chip crop is then a copy of
            # whole rows for PIL, not a gather of every byte (same pixels, ~1/8 of the species stage's CPU)
            b_rgb = np.ascontiguousarray(b_rgb.transpose(1, 2, 0)).transpose(2, 0, 1)
            masks = chip_masks(ortho, [geoms[i] for i in members], wins, chip_px)
            for i, inside in zip(members, masks, strict=True):
                chip = crown_chip(ortho, geoms[i], (float(cxy[i, 0]), float(cxy[i, 1])), chip_px, chip_gsd,
                                  block=(b_rgb, b_valid, b_win), inside=inside)
                pending.append((int(i), chip))
                if len(pending) == batch_size:
                    flush(runs)
            release_free_heap()  # per block: chip temporaries would otherwise pile up as fragmented heap
        flush(runs)
        for idx, fut in running:
            probs[idx] = fut.result()
    best = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
    best_prob = probs[np.arange(n), best] if n else np.zeros(0)
    threshold = model.meta.unknown_threshold
    species = [names[b] if p >= threshold else UNKNOWN for b, p in zip(best, best_prob, strict=True)]
    return species, best_prob.astype(np.float64), probs
