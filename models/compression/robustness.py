"""Beyond nominal accuracy: drone-imagery shifts and the prune potential per shift (Lost in Pruning).

Each shift maps a uint8 RGB image [3, H, W] to a shifted uint8 image; GSD shifts also return the new
pixel size, so the shifted orthomosaic is written with a correct geotransform and the engine resamples
it back to the model GSD as it would for a real flight at another altitude (detail lost stays lost).

Prune potential of a method on a shift: the largest prune ratio whose F1 on that shift stays within
``tolerance_points`` (0.5 F1 points = 0.005) of the dense model's F1 on the same shift.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

Shift = Callable[[np.ndarray], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(rgb: np.ndarray, sigma_dn: float = 10.0, seed: int = 0) -> np.ndarray:
    """Additive sensor noise, sigma in digital numbers."""
    rng = np.random.default_rng(seed)
    return _clip(rgb.astype(np.float32) + rng.normal(0.0, sigma_dn, rgb.shape))


def motion_blur(rgb: np.ndarray, length_px: int = 7, angle_deg: float = 30.0) -> np.ndarray:
    """Linear motion blur along ``angle_deg`` (forward motion during exposure)."""
    k = np.zeros((length_px, length_px), np.float32)
    c = (length_px - 1) / 2
    t = np.deg2rad(angle_deg)
    for s in np.linspace(-c, c, 4 * length_px):
        k[int(round(c + s * np.sin(t))), int(round(c + s * np.cos(t)))] = 1.0
    k /= k.sum()
    return _clip(np.stack([ndimage.convolve(b.astype(np.float32), k, mode="reflect") for b in rgb]))


def defocus_blur(rgb: np.ndarray, radius_px: float = 2.5) -> np.ndarray:
    """Disc (pill-box) blur of ``radius_px``."""
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    k = (xx**2 + yy**2 <= radius_px**2).astype(np.float32)
    k /= k.sum()
    return _clip(np.stack([ndimage.convolve(b.astype(np.float32), k, mode="reflect") for b in rgb]))


def brightness(rgb: np.ndarray, factor: float = 1.35) -> np.ndarray:
    return _clip(rgb.astype(np.float32) * factor)


def contrast(rgb: np.ndarray, factor: float = 0.6) -> np.ndarray:
    x = rgb.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _clip(mean + (x - mean) * factor)


def white_balance(rgb: np.ndarray, gains: tuple[float, float, float] = (1.15, 1.0, 0.8)) -> np.ndarray:
    """Per-band gains (a warm cast from a wrong white balance)."""
    return _clip(rgb.astype(np.float32) * np.asarray(gains, np.float32)[:, None, None])


def jpeg(rgb: np.ndarray, quality: int = 25) -> np.ndarray:
    """JPEG round trip at ``quality`` (ortho mosaics are often delivered as JPEG-compressed GeoTIFFs)."""
    buf = io.BytesIO()
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(buf, format="JPEG", quality=quality)
    return np.moveaxis(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), -1, 0).copy()


def haze(rgb: np.ndarray, amount: float = 0.35, airlight: float = 220.0) -> np.ndarray:
    """Atmospheric haze: blend towards a bright airlight, I = (1 - t) I + t A."""
    return _clip(rgb.astype(np.float32) * (1 - amount) + airlight * amount)


def rescale(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Resample to ``1/scale`` of the size (scale 1.25 = 25 % coarser GSD), area-averaged when shrinking."""
    h, w = rgb.shape[1:]
    size = (max(1, int(round(w / scale))), max(1, int(round(h / scale))))
    method = Image.Resampling.BOX if scale > 1 else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(band).resize(size, method)) for band in rgb])


SHIFTS: dict[str, tuple[Shift, float]] = {
    # name: (function, GSD scale of the output relative to the input)
    "gaussian_noise": (gaussian_noise, 1.0),
    "motion_blur": (motion_blur, 1.0),
    "defocus_blur": (defocus_blur, 1.0),
    "brightness": (brightness, 1.0),
    "contrast": (contrast, 1.0),
    "white_balance": (white_balance, 1.0),
    "jpeg": (jpeg, 1.0),
    "haze": (haze, 1.0),
    "gsd_plus25": (lambda rgb: rescale(rgb, 1.25), 1.25),
    "gsd_minus25": (lambda rgb: rescale(rgb, 0.75), 0.75),
}


def write_shifted(src: str | os.PathLike, shift: str, dst: str | os.PathLike) -> Path:
    """Write ``src`` (GeoTIFF, RGB in bands 1-3) with ``shift`` applied; nodata pixels stay nodata."""
    import rasterio
    from affine import Affine

    from pipeline.atomic import atomic_path

    fn, scale = SHIFTS[shift]
    with rasterio.open(src) as ds:
        rgb = ds.read([1, 2, 3])
        profile = ds.profile.copy()
        nodata = ds.nodata
        transform = ds.transform
    invalid = (rgb == nodata).any(0) if nodata is not None else np.zeros(rgb.shape[1:], bool)
    out = fn(rgb)
    if nodata is not None:
        out = np.where(out == nodata, np.uint8(nodata - 1 if nodata > 0 else 1), out)
        inv = invalid if scale == 1.0 else rescale(invalid.astype(np.uint8)[None] * 255, scale)[0] > 127
        out[:, inv] = nodata
    profile.update(
        width=out.shape[2],
        height=out.shape[1],
        count=3,
        dtype="uint8",
        tiled=False,
        transform=transform @ Affine.scale(rgb.shape[2] / out.shape[2], rgb.shape[1] / out.shape[1]),
    )
    profile.pop("blockxsize", None)
    profile.pop("blockysize", None)
    dst = Path(dst)
    with atomic_path(dst) as tmp, rasterio.open(tmp, "w", **profile) as out_ds:
        out_ds.write(out)
    return dst


def truth_polygons(truth_csv: str | os.PathLike, image_path: str | os.PathLike) -> list:
    """Reference crown boxes of a DeepForest CSV (pixel coordinates) as polygons in the image CRS."""
    import pandas as pd
    import rasterio
    from shapely.geometry import box

    df = pd.read_csv(truth_csv)
    with rasterio.open(image_path) as ds:
        t = ds.transform
    polys = []
    for r in df.itertuples():
        x0, y0 = t * (r.xmin, r.ymin)
        x1, y1 = t * (r.xmax, r.ymax)
        polys.append(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return polys


def engine_crowns(
    onnx_path: str | os.PathLike, image_path: str | os.PathLike, threads: int = 2, batch_size: int = 1
) -> list:
    """Crown polygons of the engine's segmentation stages: open_ortho (resampled to the model GSD when
    off by > 10 %) -> plan_tiles -> predict_tiles -> extract_crowns (model postprocess) -> seam rule."""
    from pipeline.crowns import extract_crowns, keep_in_core, postprocess_kwargs
    from pipeline.onnx_model import OnnxModel
    from pipeline.raster import open_ortho
    from pipeline.segment import predict_tiles
    from pipeline.tiling import plan_tiles

    model = OnnxModel(onnx_path, threads=threads)
    meta = model.meta
    params = postprocess_kwargs(meta.postprocess)
    min_area = params.pop("min_area_m2", 1.0)
    polys = []
    with open_ortho(image_path, target_gsd_m=meta.gsd_m) as ortho:
        tiles = plan_tiles(ortho.width, ortho.height, meta.tile_size, meta.overlap_px)
        for tile, probs, valid in predict_tiles(model, ortho, tiles, batch_size):
            tr = ortho.window_transform(tile.window)
            cands = extract_crowns(probs, valid, tr, min_area, **params)
            polys += [c.polygon for c in keep_in_core(cands, tile, ortho.transform)]
    return polys


def engine_f1(
    onnx_path: str | os.PathLike, image_path: str | os.PathLike, truth: list, threads: int = 2
) -> dict:
    """F1/precision/recall at IoU 0.4 of the engine's crowns on ``image_path`` against ``truth``."""
    from pipeline.evaluation.crowns import crown_metrics

    pred = engine_crowns(onnx_path, image_path, threads)
    m = crown_metrics(pred, truth, (0.4,))["thresholds"]["0.4"]
    return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"], "n_pred": len(pred)}


def prune_potential(
    f1_by_ratio: Mapping[float, Mapping[str, float]],
    dense_f1: Mapping[str, float],
    tolerance_points: float = 0.5,
) -> dict[str, float]:
    """Per shift: the largest ratio with F1 >= dense F1 - tolerance (F1 in [0, 1], points = 1/100).

    0.0 where no compressed ratio stays within the tolerance.
    """
    tol = tolerance_points / 100.0
    out: dict[str, float] = {}
    for shift, dense in dense_f1.items():
        ok = [r for r, f1s in f1_by_ratio.items() if shift in f1s and f1s[shift] >= dense - tol]
        out[shift] = float(max(ok)) if ok else 0.0
    return out
