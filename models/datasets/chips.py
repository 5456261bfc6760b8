"""Training scenes and chip sampling.

A :class:`Scene` is an image (read with rasterio; PNG and GeoTIFF alike) with its 3-class target. Chips for
training are random crops with scale jitter; :func:`read_chip` reads one window of a large raster
(boundless, nodata -> invalid) without loading the whole file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.datasets.boxes import BoxSet, boxes_to_crown_mask, ellipse_masks
from models.datasets.polygons import PolygonSet, polygon_masks, polygons_to_crown_mask
from models.datasets.splits import BlockSplit
from pipeline.errors import InputError

IGNORE = 255
IGNORE_LABEL = "ignore"  # box label whose ellipse is left out of the loss (unsure pseudo-labels)


@dataclass
class Scene:
    """One training image: rgb uint8 [3, h, w], valid bool [h, w], target uint8 [h, w] (255 = ignore)."""

    name: str
    rgb: np.ndarray
    valid: np.ndarray
    target: np.ndarray
    instances: list = field(default_factory=list)  # (row0, col0, bool mask) per crown, image pixels
    boxes: pd.DataFrame | None = None  # pixel boxes (for evaluation), when the source was boxes
    split: BlockSplit | None = None
    weight: float = 1.0
    site: str = ""  # NEON site (plot datasets), for per-site validation scores
    plot: str = ""

    @property
    def height(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[2])


def _valid_from(ds, data: np.ndarray) -> np.ndarray:
    masks = ds.read_masks()
    valid = np.all(masks > 0, axis=0)
    if ds.nodata is not None:
        valid &= ~np.all(data == ds.nodata, axis=0)
    return valid


def read_image(path: str | os.PathLike, bands: tuple[int, int, int] = (1, 2, 3)):
    """Read a whole RGB image -> (rgb uint8 [3,h,w], valid bool [h,w], transform, crs)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.count < max(bands):
                    raise InputError(f"{path}: has {ds.count} band(s), need bands {bands}")
                data = ds.read(list(bands))
                valid = _valid_from(ds, data)
                transform, crs = ds.transform, ds.crs
    except RasterioIOError as exc:
        raise InputError(f"{path}: cannot open image ({exc})") from None
    if data.dtype != np.uint8:
        data = _to_uint8(data, valid)
    return data, valid, transform, crs


def _to_uint8(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(data.shape, np.uint8)
    for b in range(data.shape[0]):
        v = data[b][valid] if valid.any() else data[b].ravel()
        lo, hi = np.percentile(v, [0.5, 99.5]) if v.size else (0, 1)
        out[b] = np.clip((data[b] - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return out


def read_chip(path: str | os.PathLike, window, bands: tuple[int, int, int] = (1, 2, 3)):
    """Read one rasterio ``Window`` (boundless, zero-padded) -> (rgb [3,h,w], valid bool [h,w])."""
    import rasterio

    with rasterio.open(path) as ds:
        data = ds.read(list(bands), window=window, boundless=True, fill_value=0)
        masks = ds.read_masks(list(bands), window=window, boundless=True)
        valid = np.all(masks > 0, axis=0)
        if ds.nodata is not None:
            valid &= ~np.all(data == ds.nodata, axis=0)
    return data, valid


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """Image shape after resampling by ``scale`` (source GSD / target GSD)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resample_image(rgb: np.ndarray, valid: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample rgb (antialiased bilinear) and valid (nearest) by ``scale``; identity when scale == 1."""
    if abs(scale - 1.0) < 1e-6:
        return rgb, valid
    from PIL import Image

    h, w = scaled_shape(rgb.shape[1], rgb.shape[2], scale)
    img = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).resize((w, h), Image.BILINEAR)
    v = Image.fromarray(valid.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    return np.asarray(img).transpose(2, 0, 1).copy(), np.asarray(v) > 0


def load_box_scene(
    boxset: BoxSet,
    split: BlockSplit | None = None,
    interior_ratio: float = 0.7,
    weight: float = 1.0,
    scale: float = 1.0,
) -> Scene:
    """Scene from a :class:`BoxSet` (ellipses inscribed in the boxes); held-out blocks become ignore.

    ``scale`` = image GSD / model GSD resamples the image and boxes to the model GSD first (``split``
    must then be made for the resampled shape, see :func:`scaled_shape`)."""
    rgb, valid, _, _ = read_image(boxset.image_path)
    rgb, valid = resample_image(rgb, valid, scale)
    boxes = boxset.boxes.copy()
    boxes[["xmin", "ymin", "xmax", "ymax"]] *= scale
    h, w = rgb.shape[1:]
    unsure = boxes["label"].astype(str).str.lower().eq(IGNORE_LABEL) if "label" in boxes else None
    if unsure is not None and unsure.any():  # pseudo-labels the model was unsure of: out of the loss
        ignore_boxes, boxes = boxes[unsure].reset_index(drop=True), boxes[~unsure].reset_index(drop=True)
    else:
        ignore_boxes = boxes.iloc[:0]
    target = boxes_to_crown_mask(boxes, h, w, interior_ratio)
    for r0, c0, m in ellipse_masks(ignore_boxes, h, w):
        t = target[r0 : r0 + m.shape[0], c0 : c0 + m.shape[1]]
        t[m & (t == 0)] = IGNORE
    return _finish(
        Path(boxset.image_path).stem, rgb, valid, target, ellipse_masks(boxes, h, w), boxes, split, weight
    )


def load_polygon_scene(
    polyset: PolygonSet,
    split: BlockSplit | None = None,
    interior_ratio: float = 0.7,
    weight: float = 1.0,
    scale: float = 1.0,
) -> Scene:
    """Scene from crown polygons over a georeferenced image (``scale`` as in :func:`load_box_scene`)."""
    rgb, valid, transform, _ = read_image(polyset.image_path)
    rgb, valid = resample_image(rgb, valid, scale)
    transform = transform @ transform.scale(1.0 / scale)
    h, w = rgb.shape[1:]
    geoms = list(polyset.gdf.geometry)
    target = polygons_to_crown_mask(geoms, transform, h, w, interior_ratio)
    return _finish(
        Path(polyset.image_path).stem,
        rgb,
        valid,
        target,
        polygon_masks(geoms, transform, h, w),
        None,
        split,
        weight,
    )


def _finish(name, rgb, valid, target, instances, boxes, split, weight) -> Scene:
    target = target.copy()
    target[~valid] = IGNORE
    if split is not None:
        target[split.val_mask()] = IGNORE
    return Scene(name, rgb, valid, target, instances, boxes, split, weight)


def sample_chip(
    scene: Scene,
    rng: np.random.Generator,
    size: int,
    scale: float = 1.0,
    max_ignore: float = 0.5,
    tries: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of ``round(size / scale)`` source pixels resized to ``size`` (scale > 1 = zoom in).

    Returns rgb uint8 [3, size, size] and target uint8 [size, size]; crops mostly in ignore are retried.
    """
    src = int(round(size / scale))
    h, w = scene.height, scene.width
    best = None
    for _ in range(tries):
        r = int(rng.integers(0, max(h - src, 0) + 1))
        c = int(rng.integers(0, max(w - src, 0) + 1))
        t = scene.target[r : r + src, c : c + src]
        frac = float(np.mean(t == IGNORE)) if t.size else 1.0
        if best is None or frac < best[0]:
            best = (frac, r, c)
        if frac <= max_ignore:
            break
    _, r, c = best
    rgb = _pad(scene.rgb[:, r : r + src, c : c + src], src, 0)
    tgt = _pad(scene.target[None, r : r + src, c : c + src], src, IGNORE)[0]
    if src != size:
        rgb, tgt = resize_pair(rgb, tgt, size)
    return rgb, tgt


def _pad(a: np.ndarray, size: int, fill: int) -> np.ndarray:
    if a.shape[1] == size and a.shape[2] == size:
        return a
    out = np.full((a.shape[0], size, size), fill, a.dtype)
    out[:, : a.shape[1], : a.shape[2]] = a
    return out


def resize_pair(rgb: np.ndarray, target: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize rgb (bilinear) and target (nearest) to ``size`` x ``size``."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).resize((size, size), Image.BILINEAR)
    tgt = Image.fromarray(target).resize((size, size), Image.NEAREST)
    return np.asarray(img).transpose(2, 0, 1).copy(), np.asarray(tgt).copy()
