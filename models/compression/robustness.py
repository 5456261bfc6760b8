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


def shifted_truth_csv(truth_csv: str | os.PathLike, src: str | os.PathLike, shifted: str | os.PathLike,
                      dst: str | os.PathLike) -> Path:
    """The reference boxes (DeepForest CSV, pixels) in the pixel grid of the shifted image (GSD shifts
    scale them)."""
    import pandas as pd
    import rasterio

    from pipeline.atomic import atomic_path

    with rasterio.open(src) as a, rasterio.open(shifted) as b:
        sx, sy = b.width / a.width, b.height / a.height
    df = pd.read_csv(truth_csv)
    df["image_path"] = Path(shifted).name
    for col, f in (("xmin", sx), ("xmax", sx), ("ymin", sy), ("ymax", sy)):
        df[col] = (df[col] * f).round(2)
    with atomic_path(dst) as tmp:
        df.to_csv(tmp, index=False)
    return Path(dst)


def shifted_copies(image: str | os.PathLike, truth_csv: str | os.PathLike, shifts: list[str],
                   out_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Per shift: (shifted GeoTIFF, its reference CSV) in ``out_dir``, each written once."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in shifts:
        p = d / f"{Path(image).stem}_{s}.tif"
        if not p.exists():
            write_shifted(image, s, p)
        csv = p.with_suffix(".csv")
        if not csv.exists():
            shifted_truth_csv(truth_csv, image, p, csv)
        out[s] = (str(p), str(csv))
    return out


def evaluate_f1(onnx_path: str | os.PathLike, image: str | os.PathLike, truth_csv: str | os.PathLike,
                threads: int = 2, compare_to: str | os.PathLike | None = None) -> dict:
    """F1/precision/recall at IoU 0.4 exactly as ``forest-inventory evaluate`` computes them (the engine's
    stages, predicted crown envelopes vs reference boxes, Hungarian matching); with ``compare_to`` also
    ``paired``, the difference to that baseline model (``evaluate --compare-to``)."""
    import tempfile

    from pipeline.evaluation.run import evaluate_crowns_on_image

    with tempfile.TemporaryDirectory() as tmp:
        r = evaluate_crowns_on_image(image, truth_csv, tmp, crown_model=onnx_path, threads=threads,
                                     compare_to=compare_to)
    m = r["scores"][r["headline"]]
    t = m["thresholds"]["0.4"]
    out = {"f1": t["f1"], "precision": t["precision"], "recall": t["recall"], "n_pred": m["n_pred"]}
    if compare_to is not None:
        out["paired"] = r["paired"]
    return out


EVALUATOR = "pipeline.evaluation.run.evaluate_crowns_on_image (forest-inventory evaluate, box)"


def evaluate_under_shifts(onnx_path: str | os.PathLike, image: str | os.PathLike,
                          truth_csv: str | os.PathLike, shifted: Mapping[str, tuple[str, str]],
                          threads: int = 2, compare_to: str | os.PathLike | None = None) -> dict:
    """Nominal F1 (with precision, recall, n_pred, and ``paired`` against ``compare_to`` when given) and
    ``f1_shift`` per shifted copy."""
    nominal = evaluate_f1(onnx_path, image, truth_csv, threads, compare_to)
    f1_shift = {s: evaluate_f1(onnx_path, img, csv, threads)["f1"] for s, (img, csv) in shifted.items()}
    return {**nominal, "f1_shift": f1_shift, "evaluator": EVALUATOR}


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
