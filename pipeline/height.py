"""Crown heights from a canopy height model (or DSM minus DTM) in any CRS and resolution.

The height raster is warped lazily (``WarpedVRT``, bilinear) onto a grid in the crowns' CRS covering the
crowns, and read one chunk (``chunk_m`` square) at a time; crowns are rasterised onto each chunk and the
95th percentile of the heights inside each crown is computed in one vectorised pass (sort by label).
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from pipeline.errors import InputError
from pipeline.memory import release_free_heap

PERCENTILE = 95.0


def open_height_raster(path: str | os.PathLike, what: str = "CHM") -> rasterio.DatasetReader:
    """Open a height raster; InputError when missing, unreadable or without a CRS."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found; pass an existing GeoTIFF")
    try:
        src = rasterio.open(path)
    except RasterioIOError:
        raise InputError(f"{path}: {what} is not a readable raster; pass a GeoTIFF") from None
    if src.crs is None:
        src.close()
        raise InputError(f"{path}: {what} has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:XXXX)")
    return src


def _warp(src: rasterio.DatasetReader, crs: CRS, transform: Affine, width: int, height: int) -> WarpedVRT:
    """Lazy float32 view of ``src`` on the given grid; NaN off the raster and where the source is nodata."""
    return WarpedVRT(src, crs=crs, transform=transform, width=width, height=height, dtype="float32",
                     nodata=np.nan, resampling=Resampling.bilinear)


def _read_valid(vrt: WarpedVRT, window: Window | None) -> np.ndarray:
    """Band 1 as float32 with NaN wherever the source has no data."""
    return vrt.read(1, window=window).astype(np.float32, copy=False)


def native_resolution_m(src: rasterio.DatasetReader, crs: CRS) -> float:
    """Pixel size of ``src`` once expressed in ``crs`` (m)."""
    if src.crs == crs and abs(src.transform.b) < 1e-12 and abs(src.transform.d) < 1e-12:
        return math.sqrt(abs(src.transform.determinant))
    with WarpedVRT(src, crs=crs) as probe:
        return math.sqrt(abs(probe.transform.determinant))


def read_on_grid(src: rasterio.DatasetReader, crs: CRS, transform: Affine,
                 shape: tuple[int, int]) -> np.ndarray:
    """``src`` band 1 warped onto the grid (``crs``, ``transform``, ``shape``) as float32, NaN where none."""
    with _warp(src, crs, transform, shape[1], shape[0]) as vrt:
        return _read_valid(vrt, None)


def labelled_percentile(labels: np.ndarray, values: np.ndarray, n_labels: int,
                        q: float = PERCENTILE) -> np.ndarray:
    """q-th percentile (linear interpolation, like numpy) of ``values`` per label 1..n; NaN values ignored;
    NaN for labels without values. Returns [n_labels]."""
    sel = (labels > 0) & np.isfinite(values)
    lab, val = labels[sel].astype(np.int64), values[sel].astype(np.float64)
    out = np.full(n_labels, np.nan)
    if lab.size == 0:
        return out
    order = np.lexsort((val, lab))
    lab, val = lab[order], val[order]
    counts = np.bincount(lab, minlength=n_labels + 1)[1:]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    has = counts > 0
    pos = (counts[has] - 1) * (q / 100.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts[has] - 1)
    frac = pos - lo
    base = starts[has]
    out[has] = val[base + lo] * (1 - frac) + val[base + hi] * frac
    return out


def crown_heights(crowns_gdf: gpd.GeoDataFrame, chm: str | os.PathLike | None = None,
                  dsm: str | os.PathLike | None = None, dtm: str | os.PathLike | None = None,
                  chunk_m: float = 100.0) -> tuple[np.ndarray, str]:
    """95th-percentile height (m) inside each crown, and the source (``chm``, ``dsm-dtm`` or ``none``).

    ``crowns_gdf`` must be in a metric projected CRS (the engine's working CRS). Crowns too small to cover a
    height pixel centre take the value under their centroid; crowns off the raster get NaN."""
    n = len(crowns_gdf)
    if chm is None and (dsm is None or dtm is None):
        if (dsm is None) != (dtm is None):
            raise InputError("heights from a DSM need a DTM as well: pass both --dsm and --dtm (or --chm)")
        return np.full(n, np.nan), "none"
    source = "chm" if chm is not None else "dsm-dtm"
    heights = np.full(n, np.nan)
    if n == 0:
        return heights, source
    crs = CRS.from_user_input(crowns_gdf.crs)
    with ExitStack() as stack:
        if chm is not None:
            rasters = [stack.enter_context(open_height_raster(chm, "CHM"))]
        else:
            rasters = [stack.enter_context(open_height_raster(dsm, "DSM")),
                       stack.enter_context(open_height_raster(dtm, "DTM"))]
        res = min(native_resolution_m(r, crs) for r in rasters)
        res = min(max(res, 0.2), 0.5)  # 0.2-0.5 m: small crowns hold several samples, big scenes stay fast
        left, bottom, right, top = crowns_gdf.total_bounds
        left, top = math.floor(left / res) * res - res, math.ceil(top / res) * res + res
        width = max(1, math.ceil((right - left) / res) + 1)
        height = max(1, math.ceil((top - bottom) / res) + 1)
        grid = Affine(res, 0.0, left, 0.0, -res, top)
        vrts = [stack.enter_context(_warp(r, crs, grid, width, height)) for r in rasters]
        cents = crowns_gdf.geometry.centroid
        cx = ((cents.x.to_numpy() - left) // chunk_m).astype(np.int64)
        cy = ((top - cents.y.to_numpy()) // chunk_m).astype(np.int64)
        chunk_id = cy * (int(width * res // chunk_m) + 2) + cx
        geoms = crowns_gdf.geometry.to_numpy()
        bounds = crowns_gdf.geometry.bounds.to_numpy()
        for cid in np.unique(chunk_id):
            idx = np.flatnonzero(chunk_id == cid)
            b = bounds[idx]
            c0 = max(0, int(math.floor((b[:, 0].min() - left) / res)) - 1)
            c1 = min(width, int(math.ceil((b[:, 2].max() - left) / res)) + 1)
            r0 = max(0, int(math.floor((top - b[:, 3].max()) / res)) - 1)
            r1 = min(height, int(math.ceil((top - b[:, 1].min()) / res)) + 1)
            win = Window(c0, r0, c1 - c0, r1 - r0)
            layers = [_read_valid(v, win) for v in vrts]
            values = layers[0] if len(layers) == 1 else np.maximum(layers[0] - layers[1], 0.0)
            wt = grid @ Affine.translation(c0, r0)
            labels = rasterio.features.rasterize(
                ((geoms[i], k + 1) for k, i in enumerate(idx)), out_shape=values.shape, transform=wt,
                fill=0, dtype="int32")
            h = labelled_percentile(labels, values, len(idx))
            empty = np.flatnonzero(np.isnan(h))
            if empty.size:
                inv = ~wt
                for k in empty:
                    col, row = inv @ (cents.iloc[idx[k]].x, cents.iloc[idx[k]].y)
                    r, c = int(row), int(col)
                    if 0 <= r < values.shape[0] and 0 <= c < values.shape[1]:
                        h[k] = values[r, c]
            heights[idx] = h
            release_free_heap()  # this thread's arena fragments beside the species thread's otherwise
    return heights, source
