"""Open and normalise an orthomosaic: band choice, masks, one global stretch, a metric working grid.

The working grid is the native grid when the input is in a metric projected CRS, north-up and within 10% of
the model GSD; otherwise a lazy ``WarpedVRT`` onto the local UTM zone (geographic, Web-Mercator, rotated or
sheared inputs) and/or at the model GSD. Reads are windowed and boundless; the mosaic is never held whole.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.errors import InputError

# GDAL's block cache defaults to 5% of RAM and is sized once, at the first read: cap it so that peak memory
# does not grow with the orthomosaic (override by setting GDAL_CACHEMAX in the environment).
os.environ.setdefault("GDAL_CACHEMAX", "64")

GSD_TOLERANCE = 0.10  # resample when |input GSD - model GSD| > 10 % of the model GSD
_SAMPLE_PX = 1024  # longest edge of the decimated read used for the stretch
MAX_COMPRESSION_RATIO = 20_000  # declared pixel bytes / file bytes above this: a corrupt GeoTIFF header
READ_ATTEMPTS = 3  # a failed read (network drive hiccup) is retried before the file is called corrupt
READ_BACKOFF_S = 0.2  # wait before retry k: READ_BACKOFF_S * 2**k


@dataclass(frozen=True)
class Stretch:
    """Per-band linear stretch to uint8, computed once for the whole image: ``(v - lo) / (hi - lo) * 255``."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    identity: bool = False

    def apply(self, data: np.ndarray) -> np.ndarray:
        """[3, h, w] any dtype -> uint8."""
        if self.identity:
            return np.clip(np.nan_to_num(data, nan=0.0), 0, 255).astype(np.uint8) if data.dtype != np.uint8 \
                else data
        lo = np.asarray(self.lo, dtype=np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.hi, dtype=np.float32)[:, None, None] - lo, 1e-12)
        out = (data.astype(np.float32) - lo) * (255.0 / span)
        return np.clip(np.nan_to_num(out, nan=0.0), 0, 255).astype(np.uint8)


def compute_stretch(sample: np.ndarray, valid: np.ndarray, dtype: str) -> Stretch:
    """One stretch from a decimated sample [3, h, w] and its validity mask: uint8 and 8-bit-range integer
    data pass through; float data in [0, 1] scale by 255; anything else gets per-band p2/p98."""
    if np.dtype(dtype) == np.uint8:
        return Stretch((0.0,) * 3, (255.0,) * 3, identity=True)
    values = sample[:, valid].astype(np.float64)
    if values.size == 0:
        return Stretch((0.0,) * 3, (255.0,) * 3, identity=True)
    vmin, vmax = float(values.min()), float(values.max())
    if np.issubdtype(np.dtype(dtype), np.integer) and vmin >= 0 and vmax <= 255:
        return Stretch((0.0,) * 3, (255.0,) * 3, identity=True)
    if np.issubdtype(np.dtype(dtype), np.floating) and vmin >= 0 and vmax <= 1.0:
        return Stretch((0.0,) * 3, (1.0,) * 3)
    lo = np.percentile(values, 2, axis=1)
    hi = np.percentile(values, 98, axis=1)
    hi = np.where(hi > lo, hi, lo + 1)
    return Stretch(tuple(float(v) for v in lo), tuple(float(v) for v in hi))


def _is_metric_projected(crs: CRS) -> bool:
    pcrs = ProjCRS.from_user_input(crs.to_wkt())
    if not pcrs.is_projected:
        return False
    unit = pcrs.axis_info[0].unit_name.lower() if pcrs.axis_info else ""
    if unit not in ("metre", "meter", "m"):
        return False
    method = (pcrs.coordinate_operation.method_name if pcrs.coordinate_operation else "").lower()
    return not ("mercator" in method and "transverse" not in method)  # Web/World Mercator areas are wrong


def local_utm_crs(crs: CRS, bounds: tuple[float, float, float, float]) -> CRS:
    """The UTM zone (WGS84) containing the centre of ``bounds`` (given in ``crs``)."""
    w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    lon, lat = (w + e) / 2, (s + n) / 2
    infos = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    if not infos:
        raise InputError(f"no UTM zone covers lon {lon:.4f}, lat {lat:.4f}; reproject the orthomosaic to a "
                         "metric CRS first")
    return CRS.from_epsg(int(infos[0].code))


class Ortho:
    """An orthomosaic opened for tiled reading on a metric working grid (see module docstring).

    Attributes: ``width``, ``height``, ``transform``, ``crs`` (working grid), ``gsd_m``, ``stretch``,
    ``warped`` (True when reads go through a WarpedVRT), ``native_gsd_m``, ``src_crs``.
    """

    def __init__(self, path: str | os.PathLike, bands: tuple[int, ...] | None = None, crs: str | None = None,
                 target_gsd_m: float | None = None, stretch: Stretch | None = None):
        self.path = Path(path)
        if not self.path.exists() and not str(path).startswith("/vsi"):
            raise InputError(f"{self.path}: orthomosaic not found; pass an existing GeoTIFF/COG/VRT")
        # an image without georeferencing makes rasterio warn (two lines on the console) before the one-line
        # error below says what is missing and how to fix it: the warning is not shown
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            try:
                self._src = rasterio.open(self.path)
            except RasterioIOError as exc:
                raise InputError(f"{self.path}: not a readable raster ({str(exc).splitlines()[0][:120]}); "
                                 "pass a GeoTIFF, COG or VRT") from None
            try:
                self._setup(bands, crs, target_gsd_m, stretch)
            except BaseException:
                self._src.close()
                raise

    def _setup(self, bands: tuple[int, ...] | None, crs: str | None, target_gsd_m: float | None,
               stretch: Stretch | None = None) -> None:
        src = self._src
        self._check_declared_size()
        if bands is None:
            bands = default_bands(src.colorinterp, self.path)
        if len(bands) != 3:
            raise InputError(f"{self.path}: --bands must name 3 bands (red,green,blue), got {bands}")
        if max(bands) > src.count:
            hint = "" if src.count >= 3 else " (the model needs 3 colour bands)"
            raise InputError(f"{self.path}: has {src.count} band(s), cannot use --bands "
                             f"{','.join(map(str, bands))}{hint}")
        if any(src.colorinterp[b - 1] == ColorInterp.alpha for b in bands):
            raise InputError(f"{self.path}: --bands {','.join(map(str, bands))} includes the alpha band; "
                             "choose the colour bands, e.g. --bands 1,2,3")
        self.bands = tuple(int(b) for b in bands)
        self.dtype = src.dtypes[bands[0] - 1]
        if src.transform.is_identity and not src.gcps[0]:
            raise InputError(georeference_hint(self.path))
        if crs and str(crs).strip().isdigit():
            crs = f"EPSG:{str(crs).strip()}"  # --crs 32617 means EPSG:32617
        if crs:
            try:
                self.src_crs = CRS.from_user_input(crs)
            except Exception:  # noqa: BLE001 - rasterio raises CRSError with long messages
                raise InputError(f"--crs {crs!r} is not a known CRS; use e.g. --crs EPSG:32617") from None
        elif src.crs:
            self.src_crs = src.crs
        else:
            raise InputError(f"{self.path}: has a geotransform but no CRS; pass --crs EPSG:XXXX with the CRS "
                             "it was produced in")
        rotated = abs(src.transform.b) > 1e-12 or abs(src.transform.d) > 1e-12
        metric = _is_metric_projected(self.src_crs)
        assigned = crs is not None and (src.crs is None or CRS.from_user_input(crs) != src.crs)
        corners = [src.transform @ (c, r) for c in (0, src.width) for r in (0, src.height)]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        self.src_bounds = (min(xs), min(ys), max(xs), max(ys))
        work_crs = self.src_crs if metric else local_utm_crs(self.src_crs, self.src_bounds)
        if metric and not rotated:
            self.native_gsd_m = math.sqrt(abs(src.transform.determinant))
            base_transform, base_w, base_h = src.transform, src.width, src.height
        else:
            with WarpedVRT(src, src_crs=self.src_crs, crs=work_crs) as probe:
                self.native_gsd_m = math.sqrt(abs(probe.transform.determinant))
                base_transform, base_w, base_h = probe.transform, probe.width, probe.height
        resample = target_gsd_m is not None and \
            abs(self.native_gsd_m - target_gsd_m) > GSD_TOLERANCE * target_gsd_m
        self.warped = not metric or rotated or assigned or resample
        self.crs = work_crs
        if not self.warped:
            self._ds = src
            self.transform, self.width, self.height = src.transform, src.width, src.height
        else:
            gsd = float(target_gsd_m) if resample else self.native_gsd_m
            left, top = base_transform.c, base_transform.f
            right = left + base_transform.a * base_w
            bottom = top + base_transform.e * base_h
            self.width = max(1, math.ceil((right - left) / gsd))
            self.height = max(1, math.ceil((top - bottom) / gsd))
            self.transform = Affine(gsd, 0.0, left, 0.0, -gsd, top)
            resampling = Resampling.average if gsd > 1.5 * self.native_gsd_m else Resampling.bilinear
            self._ds = WarpedVRT(src, src_crs=self.src_crs, crs=work_crs, transform=self.transform,
                                 width=self.width, height=self.height, resampling=resampling,
                                 add_alpha=ColorInterp.alpha not in src.colorinterp)
        self.gsd_m = math.sqrt(abs(self.transform.determinant))
        if stretch is not None:  # computed before (RunPlan): skip the decimated read of the whole image
            self.stretch = stretch
            return
        if np.dtype(self.dtype) == np.uint8:
            # 8-bit data pass through unchanged: only the validity check is needed, and the source's mask
            # decimated is far cheaper (time and memory) than decoding every pixel through the warp
            sample, valid = None, self._source_valid_sample(_SAMPLE_PX)
        else:
            sample, valid, _ = self.read_decimated(_SAMPLE_PX, stretch=False)
        if not valid.any():
            raise InputError(f"{self.path}: every pixel is nodata or masked (nodata value, alpha or NaN); "
                             "check the nodata setting or --bands, or pass an orthomosaic with image data")
        self.stretch = compute_stretch(sample, valid, self.dtype) if sample is not None else \
            Stretch((0.0,) * 3, (255.0,) * 3, identity=True)

    def _source_valid_sample(self, max_px: int) -> np.ndarray:
        """Validity (mask, alpha or nodata) of the source image decimated to at most ``max_px`` per edge."""
        src = self._src
        factor = max(1.0, max(src.width, src.height) / max_px)
        shape = (max(1, round(src.height / factor)), max(1, round(src.width / factor)))
        return self._retried(lambda: src.dataset_mask(out_shape=shape, resampling=Resampling.nearest),
                             "the mask") > 0

    def _retried(self, read, what: str):
        """``read()``, retried READ_ATTEMPTS times with backoff on I/O errors (a network drive hiccup); then
        one InputError naming the file."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return read()
            except RasterioIOError as exc:
                if attempt + 1 == READ_ATTEMPTS:
                    cause = str(exc.__cause__ or exc).strip().splitlines()
                    detail = (cause[0] if cause else type(exc).__name__)[:100]
                    raise InputError(f"{self.path}: reading {what} failed {READ_ATTEMPTS} times ({detail}): "
                                     "the file is truncated or corrupt; copy or export it again") from None
                time.sleep(READ_BACKOFF_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def _check_declared_size(self) -> None:
        """A GeoTIFF whose header declares far more pixels than its bytes could hold (a corrupt header, or
        tiles missing) is refused before anything is planned over its bogus extent."""
        src = self._src
        if src.driver != "GTiff" or not self.path.is_file():
            return
        declared = src.width * src.height * sum(np.dtype(d).itemsize for d in src.dtypes)
        size = self.path.stat().st_size
        if declared > MAX_COMPRESSION_RATIO * max(size, 1):
            raise InputError(f"{self.path}: header declares {src.width} x {src.height} px "
                             f"({declared / 1e9:.1f} GB) but the file holds {size / 1e6:.2f} MB: the header "
                             "is corrupt or the file truncated; copy or export it again")

    # -- reading -------------------------------------------------------------------------------------------
    def _read_raw(self, window: Window, out_shape: tuple[int, int] | None = None, ds=None
                  ) -> tuple[np.ndarray, np.ndarray]:
        ds = self._ds if ds is None else ds
        def read():
            data = ds.read(self.bands, window=window, resampling=Resampling.nearest,
                           out_shape=None if out_shape is None else (3, *out_shape))
            return data, ds.dataset_mask(window=window, out_shape=out_shape, resampling=Resampling.nearest)

        data, mask = self._retried(read, "pixels")
        valid = mask > 0
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Boundless read of ``window`` (working-grid pixels): (rgb uint8 [3, h, w], valid bool [h, w]);
        pixels outside the image or masked are 0 and invalid."""
        h, w = int(window.height), int(window.width)
        rgb = np.zeros((3, h, w), dtype=np.uint8)
        valid = np.zeros((h, w), dtype=bool)
        c0, r0 = int(window.col_off), int(window.row_off)
        ic0, ir0 = max(c0, 0), max(r0, 0)
        ic1, ir1 = min(c0 + w, self.width), min(r0 + h, self.height)
        if ic1 <= ic0 or ir1 <= ir0:
            return rgb, valid
        data, ok = self._read_raw(Window(ic0, ir0, ic1 - ic0, ir1 - ir0))
        part = self.stretch.apply(data)
        part[:, ~ok] = 0
        rgb[:, ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = part
        valid[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = ok
        return rgb, valid

    def read_decimated(self, max_px: int, stretch: bool = True) -> tuple[np.ndarray, np.ndarray, Affine]:
        """The whole image with its longest edge at most ``max_px`` (uses overviews where present):
        (bands [3, h, w] (uint8 when ``stretch``), valid [h, w], transform of the decimated grid)."""
        factor = max(1.0, max(self.width, self.height) / max_px)
        out_h, out_w = max(1, round(self.height / factor)), max(1, round(self.width / factor))
        transform = self.transform @ Affine.scale(self.width / out_w, self.height / out_h)
        if self.warped:  # warp straight onto the coarse grid (decimating the full-resolution warp would
            # cost a whole-image warp, ~10x the time of the decimated read, per call)
            with WarpedVRT(self._src, src_crs=self.src_crs, crs=self.crs, transform=transform, width=out_w,
                           height=out_h, resampling=Resampling.nearest,
                           add_alpha=ColorInterp.alpha not in self._src.colorinterp) as coarse:
                data, valid = self._read_raw(Window(0, 0, out_w, out_h), ds=coarse)
        else:
            data, valid = self._read_raw(Window(0, 0, self.width, self.height), out_shape=(out_h, out_w))
        if stretch:
            data = self.stretch.apply(data)
            data[:, ~valid] = 0
        return data, valid, transform

    def window_transform(self, window: Window) -> Affine:
        """Affine of ``window`` in the working CRS (works for windows past the image edge)."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of the working grid, working CRS (m)."""
        left, top = self.transform.c, self.transform.f
        return (left, top + self.transform.e * self.height, left + self.transform.a * self.width, top)

    def valid_area_m2(self, max_px: int = 4096) -> float:
        """Unmasked area in m² (working grid), from a mask read decimated to at most ``max_px`` per edge."""
        factor = max(1.0, max(self.width, self.height) / max_px)
        out_h, out_w = max(1, round(self.height / factor)), max(1, round(self.width / factor))
        rows = max(1, (16 << 20) // max(out_w, 1))
        total = 0
        for r in range(0, out_h, rows):
            rr = min(rows, out_h - r)
            win = Window(0, r * self.height / out_h, self.width, rr * self.height / out_h)
            mask = self._ds.dataset_mask(window=win, out_shape=(rr, out_w), resampling=Resampling.nearest)
            total += int((mask > 0).sum())
        return total * (self.width * self.height / (out_h * out_w)) * self.gsd_m ** 2

    def close(self) -> None:
        if self._ds is not self._src:
            self._ds.close()
        self._src.close()

    def __enter__(self) -> Ortho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def georeference_hint(path: Path) -> str:
    """The one message for an image without georeferencing (no geotransform, no GCPs, no world file): what
    is missing and the two fixes (a georeferenced copy with gdal_translate, or a world file plus --crs)."""
    return (f"{path}: has no georeferencing (no geotransform or world file), so its position and pixel size "
            f"are unknown; georeference it, e.g. gdal_translate -a_srs EPSG:32617 -a_ullr ULX ULY LRX LRY "
            f"{path.name} {path.stem}_geo.tif (corner coordinates in that CRS), or put a world file "
            f"({path.stem}.wld) beside it and pass --crs EPSG:XXXX")


def default_bands(colorinterp: tuple[ColorInterp, ...], path: str | os.PathLike) -> tuple[int, int, int]:
    """The red, green, blue bands (1-based) when ``--bands`` is not given.

    Bands tagged red/green/blue are used wherever they are; an untagged 3-band image, or 3 bands plus an
    alpha band, is read as 1,2,3. Anything else (e.g. 5-band multispectral) is ambiguous: InputError.
    """
    tagged = {ci: i + 1 for i, ci in reversed(list(enumerate(colorinterp)))}
    rgb = [tagged.get(c) for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)]
    if all(rgb):
        return tuple(rgb)  # type: ignore[return-value]
    colour = [ci for ci in colorinterp if ci != ColorInterp.alpha]
    if len(colour) < 3:
        raise InputError(f"{path}: has {len(colour)} colour band(s) but the model needs 3 colour bands "
                         "(red, green, blue); pass an RGB orthomosaic")
    if len(colour) == 3 and all(ci != ColorInterp.alpha for ci in colorinterp[:3]):
        return (1, 2, 3)
    raise InputError(f"{path}: has {len(colorinterp)} bands without red/green/blue colour tags; pass "
                     "--bands R,G,B with the 1-based red, green and blue bands (e.g. --bands 3,2,1)")


def open_ortho(path: str | os.PathLike, bands: tuple[int, ...] | None = None, crs: str | None = None,
               target_gsd_m: float | None = None, stretch: Stretch | None = None) -> Ortho:
    """Open ``path`` for tiled reading (use as a context manager). ``crs`` assigns a CRS (e.g. "EPSG:32617")
    to an input that lacks one; ``target_gsd_m`` is the model GSD to resample to when off by > 10%;
    ``stretch`` reuses a stretch computed earlier for the same file and bands (it is computed otherwise)."""
    return Ortho(path, bands=bands, crs=crs, target_gsd_m=target_gsd_m, stretch=stretch)
