"""The inventory engine's public stages; the CLI and the Prefect flows both call these (one implementation).

``validate`` -> ``infer_group`` (per tile group, persisted to out/.work/groups/, so a killed run resumes)
-> ``collect_crowns`` -> ``add_attributes`` (species, height) -> ``add_carbon`` -> ``write_outputs``;
``run_inventory`` chains them. Geometry stays in the working CRS (metric, see pipeline.raster) until export.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

import pipeline
from pipeline import aggregate
from pipeline.aggregate import group_table, raster_grid, read_plots, with_group_totals
from pipeline.atomic import atomic_path
from pipeline.crown_store import StoredCrowns, crown_source
from pipeline.crowns import (
    DEFAULTS,
    extract_crowns,
    keep_in_core,
    no_canopy,
    postprocess_kwargs,
    resolve_seam_overlaps,
)
from pipeline.errors import InputError
from pipeline.memory import compact_labels, release_free_heap
from pipeline.onnx_model import CROWN_TASK, SPECIES_TASK, ModelMeta, OnnxModel
from pipeline.raster import Ortho, Stretch, open_ortho
from pipeline.summary import build_summary
from pipeline.tiling import Tile, group_tiles, plan_tiles

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total); stage "tiles" advances per tile

QUICKLOOK_MAX_PX = 2048  # quicklook.png: the input's resolution, its longest edge capped at this
REPORT_MAP_PX = 960  # the crown map inside report.html, longest edge in px
OUTPUT_NAMES = ("crowns.geojson", "inventory.gpkg", "crowns.csv", "crown_mask.tif", "quicklook.png",
                "quicklook.wld", "quicklook.png.aux.xml", "summary.json", "report.html")


def default_model_path(name: str) -> Path:
    """``models/zoo/<name>`` located without importing torch (models/__init__ is torch-free)."""
    try:
        return Path(str(importlib.resources.files("models") / "zoo" / name))
    except ModuleNotFoundError:  # pragma: no cover - models/ not installed
        return Path(__file__).resolve().parents[1] / "models" / "zoo" / name


@dataclass
class InventoryConfig:
    """Every parameter of one inventory run (paths, bands 1-based, CRS as "EPSG:XXXX").

    The fields are the run options of ``pipeline.options`` (CLI flags, the TOML config file, batch, serve,
    the flows and ``forest_inventory.api``): a field added here is an option everywhere. ``postprocess``
    holds the crown thresholds, ``carbon`` the ``CarbonConfig`` options; both are checked on construction."""

    ortho: Path
    out_dir: Path
    chm: Path | None = None
    dtm: Path | None = None
    dsm: Path | None = None
    crown_model: Path | None = None  # None: models/zoo/crowns.onnx
    species_model: Path | None = None  # None: models/zoo/species.onnx when present, else species "unknown"
    use_species_model: bool = True
    bands: tuple[int, int, int] | None = None  # None: the red/green/blue-tagged bands, or 1,2,3 (raster)
    crs: str | None = None
    threads: int | None = None  # ONNX intra-op threads; None = all cores
    seed: int = 0
    plots: Path | None = None
    batch_size: int = 1  # tiles per ONNX call: more costs memory (~120 MB per 512 px tile), no speed
    tiles_per_group: int = 32
    cell_m: float = 100.0
    postprocess: dict[str, float] = field(default_factory=dict)  # overrides the model's own thresholds
    tta: bool = False  # crown model averaged over 4 flipped/rotated views of each tile (4x segmentation time)
    carbon: dict[str, Any] = field(default_factory=dict)  # extra CarbonConfig fields
    overwrite: bool = False  # replace an --out that holds the inventory of another orthomosaic

    def __post_init__(self) -> None:
        for name in ("ortho", "out_dir", "chm", "dtm", "dsm", "crown_model", "species_model", "plots"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        if self.bands is not None:
            self.bands = tuple(int(b) for b in self.bands)  # type: ignore[assignment]
        from pipeline.options import check_config

        check_config(self)  # unknown keys and bad values fail here, before any work (pipeline.options)


@dataclass
class RunPlan:
    """What ``validate`` found and planned; picklable (open handles live in a per-thread cache)."""

    config: InventoryConfig
    work_dir: Path
    crown_model_path: Path
    species_model_path: Path | None
    models: dict[str, str]  # model name -> sha256
    crown_meta: ModelMeta
    species_meta: ModelMeta | None
    postprocess: dict[str, float]
    width: int
    height: int
    transform: tuple[float, ...]
    crs: str  # working CRS, WKT
    crs_name: str
    gsd_m: float
    warped: bool
    tiles: list[Tile]
    groups: list[list[int]]
    fingerprint: str
    stretch: Stretch | None = None  # the one stretch of the orthomosaic (computed once, in validate)
    started: float = field(default_factory=time.time)
    input_gsd_m: float | None = None  # the input's own GSD (m, measured in the working CRS)
    output_grid_note: str = "input"  # the grid of crown_mask.tif and quicklook.png (see input_ortho)
    warnings: list[str] = field(default_factory=list)  # input warnings for the summary (e.g. plots outside)
    _local: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None
        return state

    def _cache(self) -> dict:
        if self._local is None:
            self._local = threading.local()
        if not hasattr(self._local, "items"):
            self._local.items = {}
        return self._local.items

    def ortho(self) -> Ortho:
        """The orthomosaic opened on the working grid (one handle per thread)."""
        cache = self._cache()
        if "ortho" not in cache:
            cfg = self.config
            cache["ortho"] = open_ortho(cfg.ortho, bands=cfg.bands, crs=cfg.crs,
                                        target_gsd_m=self.crown_meta.gsd_m, stretch=self.stretch)
        return cache["ortho"]

    def input_ortho(self) -> Ortho:
        """The orthomosaic at its own GSD (not the model's), in the working CRS: the grid of crown_mask.tif
        and quicklook.png. For an input in a metric projected CRS, north-up, this is the input's own grid;
        a geographic, Web-Mercator or rotated input is reprojected onto the local UTM zone at its GSD. The
        working grid itself when the input was not resampled. One handle per thread."""
        if not self.warped:
            return self.ortho()
        cache = self._cache()
        if "input_ortho" not in cache:
            cfg = self.config
            cache["input_ortho"] = open_ortho(cfg.ortho, bands=cfg.bands, crs=cfg.crs, target_gsd_m=None,
                                              stretch=self.stretch)
        return cache["input_ortho"]

    def crown_model(self) -> OnnxModel:
        return _shared_model(self.crown_model_path, self.config.threads, CROWN_TASK)

    def crown_sessions(self) -> list[OnnxModel]:
        """The crown model as ``pipeline.segment.session_plan`` picks it: one session with every core, or
        one single-thread session per core for a small model (tiles spread over them)."""
        from pipeline.segment import session_plan

        n, threads = session_plan(self.crown_model_path.stat().st_size, self.config.threads)
        if n == 1:  # session_plan gave the run's own thread count
            return [self.crown_model()]
        return [_shared_model(self.crown_model_path, threads, CROWN_TASK, copy=k) for k in range(n)]

    def species_model(self) -> OnnxModel | None:
        if self.species_model_path is None:
            return None
        return _shared_model(self.species_model_path, self.config.threads, SPECIES_TASK)

    @property
    def groups_dir(self) -> Path:
        return self.work_dir / "groups"

    def group_path(self, group_index: int) -> Path:
        return self.groups_dir / f"group_{group_index:05d}.gpkg"

    def close(self) -> None:
        """Close this thread's open orthomosaic handle."""
        cache = self._cache()
        for key in ("ortho", "input_ortho"):
            ortho = cache.pop(key, None)
            if ortho is not None:
                ortho.close()


_MODELS: dict[tuple[str, int | None, int], OnnxModel] = {}
_MODELS_LOCK = threading.Lock()


def _shared_model(path: Path, threads: int | None, task: str, copy: int = 0) -> OnnxModel:
    """One session per (model, threads, copy) per process; ``OnnxModel.run`` is thread-safe. ``copy`` k > 0
    is a further session of the same model (parallel sessions on different tiles)."""
    key = (str(Path(path).resolve()), threads, copy)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = OnnxModel(path, threads=threads, expected_task=task)
        return _MODELS[key]


def drop_crown_sessions(plan: RunPlan) -> None:
    """Forget the crown model's cached sessions once every group is segmented: each holds its memory arena
    (~120 MB for a 512 px tile of crowns-r6), which would otherwise sit under the later stages' peak. A later
    ``infer_group`` (resume) opens them again; sessions still in use elsewhere stay alive with their users."""
    path = str(Path(plan.crown_model_path).resolve())
    with _MODELS_LOCK:
        for key in [k for k in _MODELS if k[0] == path and _MODELS[k].meta.task == CROWN_TASK]:
            del _MODELS[key]


_SOURCE_MEMO: dict[tuple, str] = {}


def source_sha256(roots: tuple[Path, ...] | None = None) -> str:
    """sha256 of the code and data the results depend on: every ``*.py`` and ``carbon/data`` file of the
    ``pipeline`` package (or of ``roots``), by relative path and content; memoised by (path, size, mtime).

    Part of the resume fingerprint and of the flow's cache key, so a code change recomputes (issue 17)."""
    roots = roots or (Path(pipeline.__file__).resolve().parent,)
    files = []
    for root in roots:
        files += [(root, p) for p in sorted(root.rglob("*"))
                  if p.is_file() and "__pycache__" not in p.parts
                  and (p.suffix == ".py" or "data" in p.relative_to(root).parts)]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for _, p in files)
    if stamp in _SOURCE_MEMO:
        return _SOURCE_MEMO[stamp]
    digest = hashlib.sha256()
    for root, path in files:
        digest.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    _SOURCE_MEMO[stamp] = digest.hexdigest()
    return _SOURCE_MEMO[stamp]


def _file_fingerprint(path: Path | None) -> list:
    if path is None:
        return []
    st = path.stat()
    return [str(path.resolve()), st.st_size, int(st.st_mtime)]


def _check_exists(path: Path | None, flag: str) -> None:
    if path is not None and not path.exists():
        raise InputError(f"{path}: file given to {flag} not found; pass an existing file")


def _check_outputs_spare_inputs(cfg: InventoryConfig) -> None:
    """Refuse an --out that is an input file, or that holds an input under one of the output names."""
    out = cfg.out_dir.resolve()
    for path, flag in ((cfg.ortho, "ORTHO"), (cfg.chm, "--chm"), (cfg.dsm, "--dsm"), (cfg.dtm, "--dtm"),
                       (cfg.plots, "--plots"), (cfg.crown_model, "--crown-model"),
                       (cfg.species_model, "--species-model")):
        if path is None:
            continue
        resolved = path.resolve()
        if resolved == out:
            raise InputError(f"{cfg.out_dir}: --out is the {flag} input file; pass a folder for the outputs, "
                             f"e.g. --out out/{path.stem}")
        if (resolved.parent == out and resolved.name in OUTPUT_NAMES) or out / ".work" in resolved.parents:
            raise InputError(f"{path}: the run would overwrite this {flag} input with an output of the same "
                             "name; move the file or pass another --out")


def _check_height_overlap(path: Path, what: str, ortho: Ortho) -> None:
    """A CHM/DSM/DTM must overlap the orthomosaic (any CRS: bounds compared in the working CRS)."""
    from rasterio.warp import transform_bounds

    from pipeline.height import open_height_raster

    with open_height_raster(path, what) as src:
        try:
            left, bottom, right, top = transform_bounds(src.crs, ortho.crs, *src.bounds, densify_pts=21)
        except Exception:  # noqa: BLE001 - PROJ errors come in several types
            raise InputError(f"{path}: {what} bounds cannot be transformed to {ortho.crs.to_string()}; "
                             f"check the {what}'s CRS") from None
    o_left, o_bottom, o_right, o_top = ortho.bounds
    if right <= o_left or left >= o_right or top <= o_bottom or bottom >= o_top:
        raise InputError(f"{path}: {what} does not overlap the orthomosaic {ortho.path.name}; pass the "
                         f"{what} of the same site (check its CRS)")


def _check_plots_overlap(path: Path, plots: gpd.GeoDataFrame, ortho: Ortho) -> str | None:
    """Plots (``read_plots`` of ``path``) must overlap the orthomosaic: none inside is an InputError; some
    outside gives a warning (returned) naming them."""
    from shapely.geometry import box

    plots = plots.to_crs(ortho.crs)
    inside = plots.geometry.intersects(box(*ortho.bounds)).to_numpy()
    if not inside.any():
        raise InputError(f"{path}: none of its {len(plots)} plot(s) overlap the orthomosaic "
                         f"{ortho.path.name}; pass the plots of this site (check the plots file's CRS)")
    if not inside.all():
        names = ", ".join(plots["plot_id"].astype(str)[~inside].head(5))
        more = " ..." if (~inside).sum() > 5 else ""
        return (f"{(~inside).sum()} of {len(plots)} plot(s) in {path.name} lie outside the orthomosaic "
                f"({names}{more}): they have no trees and no totals")
    return None


def _check_out_is_ours(cfg: InventoryConfig) -> None:
    """Refuse an --out that holds the inventory of another orthomosaic (unless ``cfg.overwrite``): the
    same orthomosaic again resumes or overwrites, as before. The previous input is read from
    ``.work/plan.json`` (or summary.json); same file = same resolved path, or same name and size."""
    if cfg.overwrite:
        return
    previous = None
    plan_file, summary_file = cfg.out_dir / ".work" / "plan.json", cfg.out_dir / "summary.json"
    with contextlib.suppress(OSError, ValueError, TypeError, IndexError, AttributeError):
        previous = json.loads(plan_file.read_text())["ortho"][:2]
    if previous is None:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
            old = Path(json.loads(summary_file.read_text())["input"])
            previous = [str(old.resolve()), old.stat().st_size] if old.exists() else [str(old), None]
    if not previous or not previous[0]:
        return
    old_path, old_size = Path(str(previous[0])), previous[1]
    new = cfg.ortho.resolve()
    same = str(old_path) == str(new) or (old_path.name == new.name
                                         and old_size in (None, new.stat().st_size))
    if not same:
        raise InputError(f"{cfg.out_dir}: holds the inventory of another orthomosaic ({old_path.name}); pass "
                         f"another --out (e.g. --out out/{cfg.ortho.stem}) or --overwrite to replace it")


def validate(config: InventoryConfig) -> RunPlan:
    """Open and check every input and model, plan tiles and tile groups, prepare ``out/.work``.

    Raises InputError (one line naming the file and the fix) for any bad input."""
    from pipeline.height import open_height_raster

    cfg = config
    _check_exists(cfg.ortho, "ORTHO")
    _check_outputs_spare_inputs(cfg)
    crown_path = cfg.crown_model or default_model_path("crowns.onnx")
    if not crown_path.is_file():
        raise InputError(f"{crown_path}: crown model not found; pass --crown-model PATH (an ONNX crown "
                         "model)")
    crown = _shared_model(crown_path, cfg.threads, CROWN_TASK)
    species_path = None
    if cfg.use_species_model:
        species_path = cfg.species_model or default_model_path("species.onnx")
        if cfg.species_model is not None:
            _check_exists(species_path, "--species-model")
        if not species_path.is_file():
            species_path = None
    species = _shared_model(species_path, cfg.threads, SPECIES_TASK) if species_path else None
    for path, flag in ((cfg.chm, "--chm"), (cfg.dsm, "--dsm"), (cfg.dtm, "--dtm"), (cfg.plots, "--plots")):
        _check_exists(path, flag)
    if cfg.dtm is not None and cfg.dsm is None and cfg.chm is None:
        raise InputError("a DTM alone gives no heights: pass --dsm with it (or --chm)")
    for path, what in ((cfg.chm, "CHM"), (cfg.dsm, "DSM"), (cfg.dtm, "DTM")):
        if path is not None:
            open_height_raster(path, what).close()
    plots = None if cfg.plots is None else read_plots(cfg.plots)
    _check_out_is_ours(cfg)
    warnings: list[str] = []
    _detection_calibration(crown_path, crown.meta)  # a malformed calibration fails here, not after inference
    # with test-time augmentation the probabilities are averages: the model's TTA thresholds when it has them
    pp = dict(postprocess_kwargs(crown.meta.postprocess_tta if cfg.tta and crown.meta.postprocess_tta
                                 else crown.meta.postprocess))
    pp.update(postprocess_kwargs(cfg.postprocess))
    with open_ortho(cfg.ortho, bands=cfg.bands, crs=cfg.crs, target_gsd_m=crown.meta.gsd_m) as ortho:
        cfg = replace(cfg, bands=ortho.bands)  # the bands actually read (fingerprint, summary)
        for path, what in ((cfg.chm, "CHM"), (cfg.dsm, "DSM"), (cfg.dtm, "DTM")):
            if path is not None:
                _check_height_overlap(path, what, ortho)
        if plots is not None:
            warnings += [w for w in [_check_plots_overlap(cfg.plots, plots, ortho)] if w]
        input_gsd_m = ortho.native_gsd_m
        grid_note = "input"  # crown_mask.tif and quicklook.png: see RunPlan.input_ortho
        if ortho.warped:
            with open_ortho(cfg.ortho, bands=cfg.bands, crs=cfg.crs, stretch=ortho.stretch) as native:
                if native.warped:
                    grid_note = f"{native.crs.to_string()} at the input GSD ({native.gsd_m:.3f} m)"
        tiles = plan_tiles(ortho.width, ortho.height, crown.meta.tile_size, crown.meta.overlap_px)
        grid = dict(width=ortho.width, height=ortho.height, transform=tuple(ortho.transform)[:6],
                    crs=ortho.crs.to_wkt(), crs_name=ortho.crs.to_string(), gsd_m=ortho.gsd_m,
                    warped=ortho.warped, stretch=ortho.stretch)
    groups = group_tiles(tiles, cfg.tiles_per_group)
    models = {crown_path.stem: crown.sha256}
    if species is not None:
        models[species_path.stem] = species.sha256
    fp_doc = {"ortho": _file_fingerprint(cfg.ortho), "crown": crown.sha256, "bands": list(cfg.bands),
              "crs": cfg.crs, "chm": _file_fingerprint(cfg.chm), "dsm": _file_fingerprint(cfg.dsm),
              "dtm": _file_fingerprint(cfg.dtm), "postprocess": pp, "tiles_per_group": cfg.tiles_per_group,
              "version": pipeline.__version__, "code": source_sha256(), **({"tta": True} if cfg.tta else {})}
    fingerprint = hashlib.sha256(json.dumps(fp_doc, sort_keys=True).encode()).hexdigest()[:16]
    try:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{cfg.out_dir}: cannot create the output folder ({exc.strerror}); pass a writable "
                         "--out") from None
    if not os.access(cfg.out_dir, os.W_OK | os.X_OK):
        raise InputError(f"{cfg.out_dir}: the output folder is not writable; pass a writable --out")
    work = cfg.out_dir / ".work"
    plan_file = work / "plan.json"
    if plan_file.exists():
        try:
            old = json.loads(plan_file.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            old = None
        if old != fingerprint:
            shutil.rmtree(work / "groups", ignore_errors=True)
    (work / "groups").mkdir(parents=True, exist_ok=True)
    with atomic_path(plan_file) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, **fp_doc}, indent=1))
    log.info("%s: %d x %d px at %.3f m (%s), %d tiles in %d groups, crown model %s", cfg.ortho.name,
             grid["width"], grid["height"], grid["gsd_m"], grid["crs_name"], len(tiles), len(groups),
             crown_path.name)
    return RunPlan(config=cfg, work_dir=work, crown_model_path=crown_path, species_model_path=species_path,
                   models=models, crown_meta=crown.meta, species_meta=species.meta if species else None,
                   postprocess=pp, tiles=tiles, groups=groups, fingerprint=fingerprint,
                   input_gsd_m=input_gsd_m, output_grid_note=grid_note, warnings=warnings, **grid)


def _detection_calibration(path: Path, meta: ModelMeta) -> dict[str, Any] | None:
    """The crown model's ``detection_calibration`` metadata (JSON, ARCHITECTURE.md), checked; None without."""
    from pipeline.carbon.detection import validate_detection_calibration

    text = (meta.raw or {}).get("detection_calibration")
    if not text:
        return None
    try:
        return {**validate_detection_calibration(text), "source": f"crown model {path.name}"}
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _heights_for_tile(plan: RunPlan, ortho: Ortho, tile: Tile, handles: dict) -> np.ndarray | None:
    """CHM (or DSM - DTM) warped onto the tile's grid, for CHM-maxima seeds; None without one (a DSM alone
    gives heights per crown, from its derived ground, but no seeds)."""
    from pipeline.height import open_height_raster, read_on_grid

    cfg = plan.config
    if cfg.chm is None and (cfg.dsm is None or cfg.dtm is None):
        return None
    if not handles:
        for key, path in (("chm", cfg.chm), ("dsm", cfg.dsm), ("dtm", cfg.dtm)):
            if path is not None:
                handles[key] = open_height_raster(path, key.upper())
    shape = (int(tile.window.height), int(tile.window.width))
    wt = ortho.window_transform(tile.window)
    if "chm" in handles:
        return read_on_grid(handles["chm"], ortho.crs, wt, shape)
    return np.maximum(read_on_grid(handles["dsm"], ortho.crs, wt, shape)
                      - read_on_grid(handles["dtm"], ortho.crs, wt, shape), 0.0)


def _empty_crowns(crs: str) -> gpd.GeoDataFrame:
    columns = {"score": "float64", "area_px": "int64", "centroid_x": "float64", "centroid_y": "float64",
               "tile_index": "int64"}
    return gpd.GeoDataFrame({k: pd.Series(dtype=v) for k, v in columns.items()},
                            geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def infer_group(plan: RunPlan, group_index: int, progress: Progress | None = None) -> Path:
    """Segment the tiles of one group, extract crowns, apply the seam rule, persist them.

    Writes ``out/.work/groups/group_XXXXX.gpkg`` (crowns, working CRS) and a ``.json`` with tile counts
    and the valid (unmasked) core area; an existing group file is reused (resume)."""
    from pipeline.segment import predict_tiles

    path = plan.group_path(group_index)
    stats_path = path.with_suffix(".json")
    tiles = [plan.tiles[i] for i in plan.groups[group_index]]
    total = len(plan.tiles)
    if path.exists() and stats_path.exists():
        if progress:
            progress("tiles", len(tiles), total)
        return path
    ortho, sessions = plan.ortho(), plan.crown_sessions()
    rows: list[dict] = []
    stats = {"n_tiles": len(tiles), "n_skipped": 0, "n_no_canopy": 0, "valid_px": 0}
    handles: dict = {}  # height rasters, used by the reader thread only
    min_height_m = plan.postprocess.get("chm_min_height_m", DEFAULTS["chm_min_height_m"])

    def core_valid_px(tile: Tile, valid: np.ndarray) -> int:
        r0, r1, c0, c1 = tile.core_in_tile()
        return int(valid[r0:r1, c0:c1].sum())

    skipped_px = [0]  # the reader thread's own counters (stats["valid_px"] is the caller's): no lost update

    def skipped(tile: Tile, valid: np.ndarray) -> None:
        stats["n_skipped"] += 1
        skipped_px[0] += core_valid_px(tile, valid)
        if progress:
            progress("tiles", 1, total)

    def prepare(tile: Tile, valid: np.ndarray) -> tuple[bool, np.ndarray | None]:
        """Reader thread: the tile's heights, and the early exit when they show no canopy."""
        chm = _heights_for_tile(plan, ortho, tile, handles)
        bare = chm is not None and no_canopy(chm, valid, min_height_m)
        stats["n_no_canopy"] += int(bare)
        return bare, chm

    try:
        for tile, probs, valid, chm in predict_tiles(sessions, ortho, tiles, plan.config.batch_size,
                                                     on_skip=skipped, tta=plan.config.tta, prepare=prepare):
            r0, r1, c0, c1 = tile.core_in_tile()
            stats["valid_px"] += core_valid_px(tile, valid)
            cands = extract_crowns(probs, valid, ortho.window_transform(tile.window), chm=chm,
                                   core=(r0, r1, c0, c1), **plan.postprocess)
            for cand in keep_in_core(cands, tile, ortho.transform):
                rows.append({"geometry": cand.polygon, "score": cand.score, "area_px": cand.area_px,
                             "centroid_x": cand.centroid_xy[0], "centroid_y": cand.centroid_xy[1],
                             "tile_index": tile.index})
            if progress:
                progress("tiles", 1, total)
    finally:
        for h in handles.values():
            h.close()
    stats["valid_px"] += skipped_px[0]
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=plan.crs) if rows else _empty_crowns(plan.crs)
    stats["valid_area_m2"] = stats["valid_px"] * plan.gsd_m ** 2
    with atomic_path(stats_path) as tmp:
        tmp.write_text(json.dumps(stats))
    with atomic_path(path) as tmp:
        pyogrio.write_dataframe(gdf, tmp, layer="crowns", driver="GPKG", geometry_type="Polygon")
    del rows, gdf
    release_free_heap()
    return path


def group_stats(plan: RunPlan) -> dict[str, float]:
    """Totals over the persisted groups: tiles, skipped tiles, valid (unmasked) area in m²."""
    out = {"n_tiles": 0, "n_skipped": 0, "n_no_canopy": 0, "valid_area_m2": 0.0}
    for gi in range(len(plan.groups)):
        p = plan.group_path(gi).with_suffix(".json")
        if p.exists():
            s = json.loads(p.read_text())
            for k in out:
                out[k] += s.get(k, 0)
    return out


def collect_crowns(plan: RunPlan, group_paths: list[Path]) -> gpd.GeoDataFrame:
    """All groups' crowns in one frame with ``tree_id`` (1..n, row-major by tile), ``crown_area_m2``,
    ``crown_diameter_m`` (2·sqrt(A/π)), centroid ``x``/``y`` (working CRS) and ``lon``/``lat`` (WGS84)."""
    drop_crown_sessions(plan)  # every group is done: the crown model's arenas go before the next peaks
    frames = [pyogrio.read_dataframe(p, layer="crowns") for p in group_paths]
    frames = [f for f in frames if len(f)]
    crowns = pd.concat(frames, ignore_index=True) if frames else _empty_crowns(plan.crs)
    crowns = gpd.GeoDataFrame(crowns, geometry="geometry", crs=plan.crs)
    if len(crowns):
        crowns = crowns[resolve_seam_overlaps(crowns.geometry.to_numpy(), crowns["tile_index"].to_numpy())]
    crowns = crowns.sort_values(["tile_index", "centroid_y", "centroid_x"], ascending=[True, False, True],
                                kind="stable").reset_index(drop=True)
    crowns.insert(0, "tree_id", np.arange(1, len(crowns) + 1, dtype=np.int64))
    area = crowns.geometry.area.to_numpy()
    crowns["crown_area_m2"] = area
    crowns["crown_diameter_m"] = 2.0 * np.sqrt(area / math.pi)
    crowns["x"] = crowns["centroid_x"]
    crowns["y"] = crowns["centroid_y"]
    lonlat = gpd.GeoSeries(gpd.points_from_xy(crowns["x"], crowns["y"]), crs=plan.crs).to_crs(4326)
    crowns["lon"] = lonlat.x.to_numpy() if len(crowns) else np.zeros(0)
    crowns["lat"] = lonlat.y.to_numpy() if len(crowns) else np.zeros(0)
    crowns = crowns.drop(columns=["centroid_x", "centroid_y", "area_px"])
    release_free_heap()
    return crowns


def add_attributes(plan: RunPlan, crowns: gpd.GeoDataFrame) -> StoredCrowns:
    """Species (``species``, ``species_prob``; class probabilities in ``attrs``) and height (``height_m``,
    ``height_source``) per crown. The later stages need the polygons only to write them, so they leave
    memory here: the trees come back as a table plus a polygon file in the run's work folder."""
    from pipeline.height import crown_heights
    from pipeline.species import classify_crowns

    trees = crowns.copy(deep=False)  # new columns only: the crowns' own data is shared, not duplicated
    cfg = plan.config
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="heights") as pool:
        # heights (own raster handles, GDAL warps) run alongside the species chips and model
        heights = pool.submit(crown_heights, crowns, chm=cfg.chm, dsm=cfg.dsm, dtm=cfg.dtm)
        species, species_prob, probs = classify_crowns(plan.species_model(), plan.ortho(), trees)
        height_m, source = heights.result()
    trees["species"] = species
    trees["species_prob"] = species_prob
    trees["height_m"] = height_m
    trees["height_source"] = np.where(np.isfinite(height_m), source, "none") if source != "none" else "none"
    trees.attrs["species_probs"] = probs
    trees.attrs["species_classes"] = list(plan.species_meta.class_names) if plan.species_meta else []
    compact_labels(trees)
    del crowns
    stored = StoredCrowns.spill(trees, plan.groups_dir)
    del trees
    release_free_heap()
    return stored


def tree_groups(plan: RunPlan, trees: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``pipeline.aggregate.tree_groups`` over this run's grid and its --plots (read in the working CRS)."""
    grid = raster_grid(plan.transform, plan.width, plan.height, plan.crs, cell_m=plan.config.cell_m)
    plots = None if plan.config.plots is None else read_plots(plan.config.plots, target_crs=plan.crs)
    return aggregate.tree_groups(trees, grid, plots)


def add_carbon(plan: RunPlan, trees: StoredCrowns | gpd.GeoDataFrame):
    """Biomass, carbon and CO2e per tree and per group through ``pipeline.carbon.estimate_carbon``.

    Returns the ``CarbonResult`` with ``trees`` as ``StoredCrowns`` (a GeoDataFrame is spilled first): the
    same polygon file with the new table."""
    from pipeline.carbon import CarbonConfig, estimate_carbon

    stored = trees if isinstance(trees, StoredCrowns) else StoredCrowns.spill(trees, plan.groups_dir)
    trees = stored.table
    groups, _ = tree_groups(plan, trees)
    extra = dict(plan.config.carbon)
    fields = getattr(CarbonConfig, "__dataclass_fields__", {})
    defaults = {"seed": plan.config.seed, "threads": plan.config.threads,
                "area_ha": group_stats(plan)["valid_area_m2"] / 10_000.0 or None,
                "detection_calibration": _detection_calibration(plan.crown_model_path, plan.crown_meta)}
    if trees.attrs.get("species_classes"):
        defaults["species_probs"] = trees.attrs.get("species_probs")
        defaults["species_classes"] = trees.attrs.get("species_classes")
    for key, value in defaults.items():
        if key in fields:
            extra.setdefault(key, value)
    table = pd.DataFrame(trees, copy=False)  # a view without the attrs (the species probabilities)
    table.attrs = {}
    log.info("carbon: %d trees, %d Monte Carlo draws", len(table), extra.get("n_draws", CarbonConfig.n_draws))
    result = estimate_carbon(table, CarbonConfig(**extra), groups)
    out = result.trees
    if len(out) != len(trees) or not np.array_equal(out["tree_id"].to_numpy(), trees["tree_id"].to_numpy()):
        out = out.set_index("tree_id").loc[trees["tree_id"].to_numpy()].reset_index()
    out = pd.DataFrame(out)
    out.attrs = {}
    result.trees = StoredCrowns(compact_labels(out), stored.store, stored.crs)
    del table
    release_free_heap()
    return result


def write_outputs(plan: RunPlan, result: Any, progress: Progress | None = None) -> dict[str, Any]:
    """Write every deliverable into ``out/``; all are staged in out/.work/stage and moved in only when all
    succeeded, so a failing run leaves no partial outputs. Returns the summary."""
    from pipeline import export

    trees = result.trees
    if not isinstance(trees, gpd.GeoDataFrame | StoredCrowns):
        trees = gpd.GeoDataFrame(trees, geometry="geometry", crs=plan.crs)
    trees = crown_source(trees)
    table = trees.table  # the attributes, in memory
    _, info = tree_groups(plan, table)
    carbon_groups = getattr(result, "groups", None)
    grid = with_group_totals(info["grid"], group_table(carbon_groups, "cell"))
    species_table = group_table(carbon_groups, "species")
    if species_table is not None and "species" not in species_table.columns:
        species_table = species_table.copy()
        names = info["species"]
        species_table.insert(0, "species", [names[int(i)] if 0 <= int(i) < len(names) else "none"
                                            for i in species_table.index])
    plots = None
    report_groups = dict(carbon_groups or {})
    if "plots" in info:
        plot_table = group_table(carbon_groups, "plot")
        plots = with_group_totals(info["plots"].assign(plot_index=np.arange(len(info["plots"]))),
                                  plot_table)
        if plot_table is not None:  # the report names plots by their plot_id, not their row number
            names = info["plots"]["plot_id"].astype(str).to_numpy()
            plot_table.insert(0, "plot_id", [names[int(i)] if 0 <= int(i) < len(names) else str(i)
                                             for i in plot_table.index])
            report_groups["plot"] = plot_table
    summary = build_summary(plan, group_stats(plan), result, len(trees))
    stage = plan.work_dir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    out = plan.config.out_dir
    try:
        steps = 7
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            release_free_heap()  # each writer's temporaries go back before the next one's peak
            if progress:
                progress("outputs", done, steps)

        ortho = plan.input_ortho()  # crown mask and quicklook on the input's grid (see RunPlan.input_ortho)
        # one writer at a time: the peak is the largest writer's working set, not the sum of two (the COG
        # in a thread beside the vector layers saved 3 % of the wall time and cost 110 MB more at 4 km²)
        export.write_geojson(stage / "crowns.geojson", trees)
        step()
        export.write_csv(stage / "crowns.csv", trees)
        step()
        rgb, valid, qt = ortho.read_decimated(QUICKLOOK_MAX_PX)
        export.write_quicklook(stage / "quicklook.png", rgb, valid, qt, ortho.crs, trees)
        crown_map = export.crown_map_image(rgb, valid, qt, trees, max_px=REPORT_MAP_PX)
        del rgb, valid
        step()
        summary["elapsed_s"] = time.time() - plan.started
        summary["outputs"] = [n for n in OUTPUT_NAMES if n != "report.html"]
        export.write_gpkg(stage / "inventory.gpkg", trees, grid, species_table, summary, plots=plots)
        step()
        try:
            from pipeline.report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            write_report(stage / "report.html", summary, table, report_groups, grid=info["grid"],
                         carbon=result, cell_m=plan.config.cell_m, crown_map=crown_map)
            summary["outputs"].append("report.html")
        step()
        export.write_crown_mask(stage / "crown_mask.tif", trees, ortho.width, ortho.height, ortho.transform,
                                ortho.crs)
        step()
        summary["elapsed_s"] = time.time() - plan.started
        export.write_summary_json(stage / "summary.json", summary)
        step()
        for name in OUTPUT_NAMES:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        if isinstance(trees, StoredCrowns):
            trees.store.remove()  # the polygons are in the outputs now
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def run_inventory(config: InventoryConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Validate, segment every tile group (resuming finished ones), attribute, add carbon, write outputs."""
    plan = validate(config)
    try:
        paths = [infer_group(plan, gi, progress) for gi in range(len(plan.groups))]
        crowns = collect_crowns(plan, paths)
        log.info("segmentation: %d crowns in %.1f s", len(crowns), time.time() - plan.started)
        if progress:
            progress("attributes", 0, 1)
        trees = add_attributes(plan, crowns)
        del crowns  # each stage's frame is dropped once the next one exists: one copy of the trees at a time
        if progress:
            progress("attributes", 1, 1)
            progress("carbon", 0, 1)
        result = add_carbon(plan, trees)
        del trees
        if progress:
            progress("carbon", 1, 1)
        summary = write_outputs(plan, result, progress)
    finally:
        plan.close()
    with contextlib.suppress(OSError):
        shutil.rmtree(plan.groups_dir)
    log.info("%s: %d trees, %.2f t CO2e, outputs in %s (%.1f s)", config.ortho.name, summary["n_trees"],
             summary["co2e_t"], config.out_dir, time.time() - plan.started)
    return summary
