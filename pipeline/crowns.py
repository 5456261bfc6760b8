"""Per-tile crown extraction: class probabilities -> individual crown polygons (working CRS), seam rule.

Classes (crown model ``class_names``): background, crown (interior), boundary (crown edge / the ring that
separates touching crowns). A pixel is crown-covered where p(crown) + p(boundary) >= ``fg_threshold``.
Seeds: local maxima of the distance transform of the crown interior (p(crown) >= ``interior_threshold``),
at least ``seed_min_distance_m`` apart, one per interior blob at least; or, when a CHM is given, local CHM
maxima above ``chm_min_height_m``. A marker-controlled watershed (skimage) floods the crown-covered pixels
from the seeds, so the boundary class and the distance transform split touching crowns. Fragments under
``min_area_m2`` are dropped. Polygons come from ``rasterio.features.shapes`` in map coordinates.

Thresholds are keyword parameters with defaults; a crown model may ship calibrated overrides in its ONNX
metadata key ``postprocess`` (JSON object with any of the keyword names below, plus ``min_crown_area_m2``
as an alias of ``min_area_m2``); :func:`postprocess_kwargs` turns that into keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from scipy import ndimage as ndi
from shapely.geometry import Polygon, shape
from skimage.feature import peak_local_max
from skimage.morphology import remove_small_holes
from skimage.segmentation import watershed

from pipeline.errors import InputError
from pipeline.tiling import Tile

DEFAULTS: dict[str, float] = {
    "min_area_m2": 1.0,
    "fg_threshold": 0.5,
    "interior_threshold": 0.5,
    "seed_min_distance_m": 1.0,
    "min_score": 0.0,
    "chm_min_height_m": 2.0,
    "chm_smooth_m": 0.3,
}
SIMPLIFY_PX = 1.5  # outline tolerance in pixels: drops the pixel staircase (~89 -> ~22 vertices a crown)
_ALIASES = {"min_crown_area_m2": "min_area_m2", "crown_threshold": "fg_threshold",
            "seed_threshold": "interior_threshold"}


@dataclass
class CrownCandidate:
    """One crown from one tile. ``polygon`` and ``centroid_xy`` in the working CRS (map units, m);
    ``score`` = mean p(crown)+p(boundary) over the crown's pixels; ``area_px`` in working-grid pixels."""

    polygon: Polygon
    score: float
    area_px: int
    centroid_xy: tuple[float, float]


def postprocess_kwargs(postprocess: dict[str, Any] | None) -> dict[str, float]:
    """Keyword overrides for :func:`extract_crowns` from a model's ``postprocess`` metadata (unknown keys
    raise InputError so a typo does not silently fall back to defaults)."""
    out: dict[str, float] = {}
    for key, value in (postprocess or {}).items():
        name = _ALIASES.get(key, key)
        if name not in DEFAULTS:
            raise InputError(f"crown model metadata 'postprocess' has unknown key {key!r}; "
                             f"allowed: {', '.join(sorted(set(DEFAULTS) | set(_ALIASES)))}")
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise InputError(f"crown model metadata 'postprocess' key {key!r} must be a number") from None
    return out


def _pixel_size_m(transform: Affine) -> float:
    return float(np.sqrt(abs(transform.a * transform.e - transform.b * transform.d)))


def _markers_from_interior(interior: np.ndarray, distance: np.ndarray, min_distance_px: int) -> np.ndarray:
    """Seeds at distance-transform maxima at least ``min_distance_px`` apart, and at least one per blob."""
    blobs, n_blobs = ndi.label(interior)
    markers = np.zeros(interior.shape, dtype=np.int32)
    if n_blobs == 0:
        return markers
    peaks = peak_local_max(distance, min_distance=max(1, min_distance_px), threshold_abs=0.5,
                           exclude_border=False)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # every interior blob gets a seed, even a flat or tiny one that has no strict maximum
    seeded = np.zeros(n_blobs + 1, dtype=bool)
    seeded[blobs[tuple(peaks.T)]] = True
    unseeded = np.flatnonzero(~seeded[1:]) + 1
    if unseeded.size:
        rows, cols = np.divmod(label_argmax(distance, blobs, unseeded), interior.shape[1])
        markers[rows, cols] = np.arange(len(peaks) + 1, len(peaks) + 1 + unseeded.size, dtype=np.int32)
    return markers


def label_argmax(values: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Flat (raster-order) position of the maximum of ``values`` within each label of ``index`` (the first
    such pixel in raster order on ties; every label in ``index`` must occur in ``labels``).

    Same maxima as ``scipy.ndimage.maximum_position`` without its sort of the whole image: only the
    pixels of the requested labels are visited, with unbuffered ``np.maximum.at``/``np.minimum.at``."""
    flat_labels = labels.ravel()
    wanted = np.zeros(int(flat_labels.max()) + 1, dtype=bool)
    wanted[index] = True
    pos = np.flatnonzero(wanted[flat_labels])
    lab, val = flat_labels[pos], values.ravel()[pos]
    best = np.full(wanted.size, -np.inf)
    np.maximum.at(best, lab, val)
    hit = val == best[lab]
    first = np.full(wanted.size, values.size, dtype=np.int64)
    np.minimum.at(first, lab[hit], pos[hit])
    return first[index]


def _markers_from_chm(chm: np.ndarray, fg: np.ndarray, min_distance_px: int, min_height_m: float,
                      smooth_px: float) -> np.ndarray:
    heights = np.where(np.isfinite(chm), chm, 0.0).astype(np.float32)
    if smooth_px > 0:
        heights = ndi.gaussian_filter(heights, smooth_px)
    peaks = peak_local_max(heights, min_distance=max(1, min_distance_px), threshold_abs=min_height_m,
                           labels=fg.astype(np.int32), exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return markers


def no_canopy(chm: np.ndarray, valid: np.ndarray, min_height_m: float) -> bool:
    """True when a tile's heights prove it holds no crown, so the crown model need not run on it.

    ``chm`` [h, w] heights in m on the tile grid (NaN = none), ``valid`` bool [h, w]. Exact for
    :func:`label_crowns`: with heights on every valid pixel it seeds from CHM maxima above ``min_height_m``
    (``chm_min_height_m``), and the smoothed CHM never exceeds the tile's highest height (a Gaussian is a
    weighted mean), so a tile whose every height is below the threshold gets no seed and no crown."""
    if not valid.any() or not np.isfinite(chm[valid]).all():
        return False
    return float(chm[np.isfinite(chm)].max()) < min_height_m  # some height is finite: valid ones are


def label_crowns(probs: np.ndarray, valid: np.ndarray, transform: Affine, min_area_m2: float = 1.0,
                 chm: np.ndarray | None = None, *, fg_threshold: float = 0.5, interior_threshold: float = 0.5,
                 seed_min_distance_m: float = 1.0, min_score: float = 0.0, chm_min_height_m: float = 2.0,
                 chm_smooth_m: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Crown label image (int32, 0 = none, 1..n) and per-label score (index 0 unused) for one tile.

    ``probs`` [3, h, w] float (background, crown, boundary); ``valid`` bool [h, w]; ``transform`` the tile's
    affine in the working CRS (metres); ``chm`` optional [h, w] heights in m on the same grid (NaN = none).
    """
    if probs.ndim != 3 or probs.shape[0] < 3:
        raise ValueError(f"probs must be [3, h, w] (background, crown, boundary), got {probs.shape}")
    p_crown = probs[1].astype(np.float32, copy=False)
    p_fg = p_crown + probs[2].astype(np.float32, copy=False)
    px_m = _pixel_size_m(transform)
    # holes smaller than a crown (masked highlights, low-probability specks) belong to the crown around them
    hole_px = max(1, int(min_area_m2 / (px_m * px_m)))
    fg = remove_small_holes((p_fg >= fg_threshold) & valid, max_size=hole_px)
    min_dist_px = int(round(seed_min_distance_m / px_m))
    if chm is not None and fg.any() and np.isfinite(chm[fg]).mean() < 0.5:
        chm = None  # the CHM does not cover this tile's crowns: seed from the crown probabilities instead
    if chm is not None:
        markers = _markers_from_chm(chm, fg, min_dist_px, chm_min_height_m, chm_smooth_m / px_m)
        elevation = -np.where(np.isfinite(chm), chm, 0.0)
    else:
        interior = remove_small_holes((p_crown >= interior_threshold) & fg, max_size=hole_px)
        distance = ndi.distance_transform_edt(interior).astype(np.float32)
        markers = _markers_from_interior(interior, distance, min_dist_px)
        elevation = -(distance + p_crown)
    if not markers.any():
        return np.zeros(fg.shape, dtype=np.int32), np.zeros(1)
    labels = watershed(elevation, markers, mask=fg)
    n = int(labels.max())
    area_px = np.bincount(labels.ravel(), minlength=n + 1)
    score_sum = np.bincount(labels.ravel(), weights=p_fg.ravel(), minlength=n + 1)
    score = np.divide(score_sum, area_px, out=np.zeros(n + 1), where=area_px > 0)
    min_area_px = min_area_m2 / (px_m * px_m)
    keep = (area_px >= max(1.0, min_area_px)) & (score >= min_score)
    keep[0] = False
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return remap[labels], np.concatenate([[0.0], score[keep]])


def simplify_keeping_area(polygons: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker ``polygons`` at ``tolerance`` (CRS units), then scale each about its centroid back to
    its own area: the outline moves by at most about the tolerance and the crown area (m²) is unchanged."""
    simple = np.array(shapely.simplify(polygons, tolerance, preserve_topology=True), dtype=object)
    if not len(simple):
        return simple
    before, after = shapely.area(polygons), shapely.area(simple)
    factor = np.sqrt(np.divide(before, after, out=np.ones_like(before), where=after > 0))
    centre = shapely.get_coordinates(shapely.centroid(simple))
    xy, index = shapely.get_coordinates(simple, return_index=True)
    xy = centre[index] + (xy - centre[index]) * factor[index, None]
    return shapely.set_coordinates(simple, xy)


def extract_crowns(probs: np.ndarray, valid: np.ndarray, transform: Affine, min_area_m2: float = 1.0,
                   chm: np.ndarray | None = None, *, core: tuple[int, int, int, int] | None = None,
                   **params: float) -> list[CrownCandidate]:
    """Crowns of one tile as polygons in the working CRS (see module docstring for the algorithm).

    ``core`` (row0, row1, col0, col1 in tile pixels) applies the seam rule before polygonising, so only the
    crowns this tile keeps are vectorised; ``params`` are the threshold keywords of :func:`label_crowns`.
    """
    labels, score = label_crowns(probs, valid, transform, min_area_m2, chm, **params)
    n = int(labels.max())
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    flat = labels.ravel()
    area_px = np.bincount(flat, minlength=n + 1)[1:]
    rows, cols = np.divmod(np.flatnonzero(flat), labels.shape[1])
    lab = flat[flat > 0]
    centres = np.column_stack([np.bincount(lab, weights=rows, minlength=n + 1)[1:],
                               np.bincount(lab, weights=cols, minlength=n + 1)[1:]])
    centres = centres / np.maximum(area_px, 1)[:, None] + 0.5  # pixel-centre coords: pixel c spans [c, c+1)
    keep = np.ones(n, dtype=bool)
    if core is not None:
        r0, r1, c0, c1 = core
        keep = (centres[:, 0] >= r0) & (centres[:, 0] < r1) & (centres[:, 1] >= c0) & (centres[:, 1] < c1)
        if not keep.any():
            return []
        kept_ids = np.zeros(n + 1, dtype=np.int32)
        kept_ids[1:][keep] = idx[keep]
        labels = kept_ids[labels]
    polys: dict[int, Polygon] = {}
    for geom, value in rasterio.features.shapes(labels, mask=labels > 0, connectivity=4, transform=transform):
        poly = shape(geom)
        tid = int(value)
        if tid not in polys or poly.area > polys[tid].area:  # a label is one connected region; keep largest
            polys[tid] = poly
    ids = [int(i) + 1 for i in np.flatnonzero(keep) if int(i) + 1 in polys]
    # drop the pixel staircase (smaller objects in memory, smaller files) without changing crown areas
    tolerance = SIMPLIFY_PX * _pixel_size_m(transform)
    # a crown has no holes: masked pixels (e.g. saturated highlights equal to the nodata value) or a
    # low-probability speck inside it are part of the crown
    outlines = shapely.polygons(shapely.get_exterior_ring(np.array([polys[t] for t in ids], dtype=object)))
    simple = simplify_keeping_area(outlines, tolerance)
    out = []
    for tid, poly in zip(ids, simple, strict=True):
        x, y = transform @ (centres[tid - 1, 1], centres[tid - 1, 0])
        out.append(CrownCandidate(polygon=poly, score=float(score[tid]), area_px=int(area_px[tid - 1]),
                                  centroid_xy=(float(x), float(y))))
    return out


def keep_in_core(candidates: list[CrownCandidate], tile: Tile, transform: Affine) -> list[CrownCandidate]:
    """Seam rule: keep the candidates whose centroid (working CRS) falls in ``tile.core``.

    ``transform`` is the working grid's affine (whole image, not the tile window)."""
    inv = ~transform
    c0, r0 = tile.core.col_off, tile.core.row_off
    c1, r1 = c0 + tile.core.width, r0 + tile.core.height
    kept = []
    for cand in candidates:
        col, row = inv @ tuple(cand.centroid_xy)
        if c0 <= col < c1 and r0 <= row < r1:
            kept.append(cand)
    return kept


def resolve_seam_overlaps(polygons: np.ndarray, tile_index: np.ndarray, areas: np.ndarray | None = None,
                          min_overlap: float = 0.5) -> np.ndarray:
    """Second half of the seam rule: neighbouring tiles see a crown near their shared core edge with
    different context, so they may segment it differently (a crown whole in one tile, a fragment of it in
    the next, each with its centroid in its own core). When two crowns from different tiles overlap by more
    than ``min_overlap`` of the smaller one, the larger is kept. Returns the keep mask."""
    n = len(polygons)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    areas = shapely.area(polygons) if areas is None else np.asarray(areas, dtype=float)
    a, b = shapely.STRtree(polygons).query(polygons, predicate="intersects")
    pair = (a < b) & (tile_index[a] != tile_index[b])
    a, b = a[pair], b[pair]
    if a.size == 0:
        return keep
    share = shapely.area(shapely.intersection(polygons[a], polygons[b])) / np.minimum(areas[a], areas[b])
    for k in np.argsort(-share, kind="stable"):
        if share[k] <= min_overlap:
            break
        i, j = int(a[k]), int(b[k])
        if keep[i] and keep[j]:
            keep[j if areas[j] < areas[i] else i] = False
    return keep
