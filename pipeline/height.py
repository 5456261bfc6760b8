"""Crown heights from a canopy height model (or DSM minus DTM, or a DSM alone) in any CRS and resolution.

The height raster is warped lazily (``WarpedVRT``, bilinear) onto a grid in the crowns' CRS covering the
crowns, and read one chunk (``chunk_m`` square) at a time; crowns are rasterised onto each chunk and the
95th percentile of the heights inside each crown is computed in one vectorised pass (sort by label).

A DSM without a DTM: the ground comes from the DSM itself (``ground_from_dsm``: the DSM's minima on a 1 m
grid, a morphological opening wider than the largest crown, the cells that the opening leaves in place taken
as ground (the gaps between crowns), linear interpolation between them), the usual photogrammetry step.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import ExitStack
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from pipeline.errors import InputError
from pipeline.memory import release_free_heap

log = logging.getLogger(__name__)

PERCENTILE = 95.0
GROUND_CELL_M = 1.0  # grid of the DSM-derived ground (DSM minima per cell)
GROUND_WINDOW_M = 25.0  # opening window: wider than the largest crown
GROUND_TOL_M = 0.5  # a cell within this of the opening is ground (a gap between crowns)


def open_height_raster(path: str | os.PathLike, what: str = "CHM") -> rasterio.DatasetReader:
    """Open a height raster; InputError when missing, unreadable or without a CRS."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found; pass an existing GeoTIFF")
    with warnings.catch_warnings():  # the one-line error below, not rasterio's two-line warning
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except RasterioIOError:
            raise InputError(f"{path}: {what} is not a readable raster; pass a GeoTIFF") from None
    if src.transform.is_identity and not src.gcps[0]:
        src.close()
        raise InputError(f"{path}: {what} has no georeferencing (no geotransform or world file); pass a "
                         "georeferenced GeoTIFF (e.g. gdal_translate -a_srs EPSG:XXXX -a_ullr ULX ULY LRX "
                         "LRY)")
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


def ground_from_dsm(dsm_m: np.ndarray, cell_m: float = GROUND_CELL_M, window_m: float = GROUND_WINDOW_M,
                    tol_m: float = GROUND_TOL_M, max_rounds: int = 4) -> np.ndarray:
    """Ground elevation (m) on the grid of ``dsm_m`` (a DSM of cell minima, NaN = no data; cell ``cell_m``).

    The morphological opening (minimum then maximum filter, ``window_m`` square) removes everything narrower
    than the window (crowns) and keeps planar slopes; cells whose DSM lies within ``tol_m`` of it are ground
    (gaps), and the ground between them is interpolated (``fill_from_cells``), never above the DSM; cells
    within ``tol_m`` of that ground join it (up to ``max_rounds`` rounds: crests that the
    opening cut). Under a closed canopy wider than the window the ground comes from the nearest gaps.
    """
    from scipy import ndimage

    dsm = np.asarray(dsm_m, dtype=np.float64)
    valid = np.isfinite(dsm)
    if not valid.any():
        return np.full(dsm.shape, np.nan)
    filled = np.where(valid, dsm, np.nanmax(dsm))  # no-data cells never become minima
    k = max(3, int(round(window_m / cell_m)) | 1)
    opened = ndimage.grey_opening(filled, size=(k, k))
    ground_cells = valid & (dsm - opened <= tol_m)
    if ground_cells.sum() < 3:
        return np.minimum(opened, filled)
    def interpolate(cells: np.ndarray) -> np.ndarray:
        return np.minimum(fill_from_cells(dsm, cells), filled)

    ground = interpolate(ground_cells)
    # densify: the opening cuts convex relief (crests); cells within tol_m of the interpolated ground are
    # ground too (crowns stand metres above it), a few rounds of progressive densification
    for _ in range(max_rounds):
        more = valid & ~ground_cells & (dsm - ground <= tol_m)
        if not more.any():
            break
        ground_cells |= more
        ground = interpolate(ground_cells)
    return ground


def fill_from_cells(values: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``values`` where ``cells`` is True, interpolated elsewhere: a least-squares plane through the cells
    plus their residuals spread by normalised Gaussian convolution at growing scales (1, 2, 4, ... cells;
    what is left, the nearest cell's residual). Linear cost in the grid size; exact on a plane."""
    from scipy import ndimage

    rows, cols = np.nonzero(cells)
    v = values[cells]
    design = np.column_stack([np.ones(v.size), rows, cols])
    coef = np.linalg.lstsq(design, v, rcond=None)[0]
    gr, gc = np.mgrid[: values.shape[0], : values.shape[1]]
    plane = coef[0] + coef[1] * gr + coef[2] * gc
    resid = np.where(cells, values - plane, 0.0)
    out = np.where(cells, resid, np.nan)
    done = cells.copy()
    weight = cells.astype(np.float64)
    sigma = 1.0
    while not done.all() and sigma <= max(values.shape):
        num = ndimage.gaussian_filter(resid, sigma, mode="nearest")
        den = ndimage.gaussian_filter(weight, sigma, mode="nearest")
        ok = ~done & (den > 1e-3)
        out[ok] = num[ok] / den[ok]
        done |= ok
        sigma *= 2.0
    if not done.all():
        idx = ndimage.distance_transform_edt(~cells, return_distances=False, return_indices=True)
        out[~done] = resid[idx[0][~done], idx[1][~done]]
    return plane + out


def _dsm_ground_grid(dsm_src: rasterio.DatasetReader, crs: CRS, bounds: tuple[float, float, float, float],
                     cell_m: float = GROUND_CELL_M, margin_m: float = GROUND_WINDOW_M
                     ) -> tuple[np.ndarray, Affine]:
    """The DSM-derived ground (m) on a ``cell_m`` grid in ``crs`` covering ``bounds`` plus a margin."""
    left, bottom, right, top = bounds
    # at most about a million cells: 1 m up to 1 km², coarser above (Delaunay interpolation cost)
    cell_m = max(cell_m, math.sqrt((right - left + 2 * margin_m) * (top - bottom + 2 * margin_m) / 1e6))
    left = math.floor((left - margin_m) / cell_m) * cell_m
    top = math.ceil((top + margin_m) / cell_m) * cell_m
    width = max(1, math.ceil((right + margin_m - left) / cell_m))
    height = max(1, math.ceil((top - bottom + margin_m) / cell_m))
    grid = Affine(cell_m, 0.0, left, 0.0, -cell_m, top)
    with WarpedVRT(dsm_src, crs=crs, transform=grid, width=width, height=height, dtype="float32",
                   nodata=np.nan, resampling=Resampling.min) as vrt:
        minima = vrt.read(1).astype(np.float64)
    return ground_from_dsm(minima, cell_m), grid


def _sample_grid(values: np.ndarray, grid: Affine, target: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear sample of ``values`` (on ``grid``) at the pixel centres of ``target`` / ``shape``."""
    from scipy import ndimage

    rows, cols = np.mgrid[: shape[0], : shape[1]]
    xs = target.c + (cols + 0.5) * target.a
    ys = target.f + (rows + 0.5) * target.e
    fc = (xs - grid.c) / grid.a - 0.5
    fr = (ys - grid.f) / grid.e - 0.5
    return ndimage.map_coordinates(values, [fr, fc], order=1, mode="nearest").astype(np.float32)


def crown_heights(crowns_gdf: gpd.GeoDataFrame, chm: str | os.PathLike | None = None,
                  dsm: str | os.PathLike | None = None, dtm: str | os.PathLike | None = None,
                  chunk_m: float = 100.0) -> tuple[np.ndarray, str]:
    """95th-percentile height (m) inside each crown, and the source (``chm``, ``dsm-dtm``, ``dsm-ground``
    (a DSM alone: ground derived from it, see ``ground_from_dsm``) or ``none``).

    ``crowns_gdf`` must be in a metric projected CRS (the engine's working CRS). Crowns too small to cover a
    height pixel centre take the value under their centroid; crowns off the raster get NaN."""
    n = len(crowns_gdf)
    if chm is None and dsm is None:
        if dtm is not None:
            raise InputError("a DTM alone gives no heights: pass --dsm with it (or --chm)")
        return np.full(n, np.nan), "none"
    source = "chm" if chm is not None else "dsm-dtm" if dtm is not None else "dsm-ground"
    log.info("heights of %d crowns: %s", n, source)
    heights = np.full(n, np.nan)
    if n == 0:
        return heights, source
    crs = CRS.from_user_input(crowns_gdf.crs)
    with ExitStack() as stack:
        ground = None
        if chm is not None:
            rasters = [stack.enter_context(open_height_raster(chm, "CHM"))]
        elif dtm is not None:
            rasters = [stack.enter_context(open_height_raster(dsm, "DSM")),
                       stack.enter_context(open_height_raster(dtm, "DTM"))]
        else:
            rasters = [stack.enter_context(open_height_raster(dsm, "DSM"))]
            ground = _dsm_ground_grid(rasters[0], crs, tuple(crowns_gdf.total_bounds))
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
            wt = grid @ Affine.translation(c0, r0)
            if ground is not None:
                layers.append(_sample_grid(ground[0], ground[1], wt, layers[0].shape))
            values = layers[0] if len(layers) == 1 else np.maximum(layers[0] - layers[1], 0.0)
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
