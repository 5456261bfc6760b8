"""``forest-inventory suggest``: rank a flight's tiles by how much labelling them should teach the model.

The flight is cut into non-overlapping tiles of the crown model's size (51.2 m at 0.10 m for the shipped
model). Every tile runs through the model in the four TTA views (:data:`pipeline.tta.VIEWS`) and, when
given, a second (e.g. compressed) model; the experts of :mod:`pipeline.active_learning` score it, and the
tiles are ranked by sleeping experts (prior weights, or the weights left by earlier rounds in
``weights``), by one expert (``greedy``) or at random (``uniform``). Neighbouring tiles (sharing an edge or
a corner) are not suggested together while others are left, to spread the labels over the flight.

Outputs (all in ``out_dir``, written atomically): ``suggested_tiles.gpkg`` (layer ``tiles``: tile polygons
in the working CRS with ``rank``, ``tile_id``, ``score`` and every expert's raw score, empty where it
slept), ``chips/tile_<id>.png`` (the tile as the model sees it, plus a ``.wld`` world file so QGIS places
it), ``annotations.gpkg`` (layer ``annotations``: empty polygons with a ``species`` field, in the same CRS,
to draw crowns in QGIS) and ``suggest.json`` (method, weights, model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.active_learning import (
    EXPERTS,
    MIN_VALID_FRACTION,
    expert_scores,
    novelty,
    select_tiles,
    tile_features,
)
from pipeline.atomic import atomic_path
from pipeline.crowns import extract_crowns, postprocess_kwargs
from pipeline.errors import InputError
from pipeline.onnx_model import OnnxModel
from pipeline.raster import Ortho, open_ortho
from pipeline.tiling import Tile, plan_tiles
from pipeline.tta import tta_views

METHODS = ("sleeping", "greedy", "uniform")


def reference_features(model_path: str | os.PathLike) -> np.ndarray | None:
    """Appearance features of the model's training tiles (``<model stem>.features.json`` beside the ONNX,
    key ``features``: [n, 15]), or None (the novelty expert then sleeps)."""
    path = Path(model_path).with_suffix(".features.json")
    if not path.is_file():
        return None
    try:
        feats = np.asarray(json.loads(path.read_text())["features"], float)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a features JSON with a 'features' list ({exc}); delete it or "
                         "regenerate it") from None
    return feats if feats.ndim == 2 and len(feats) else None


def _views(model: OnnxModel, rgb: np.ndarray) -> list[np.ndarray]:
    """Softmax [C, T, T] of each TTA view of one tile, mapped back to the tile grid."""
    return [np.ascontiguousarray(view[0], dtype=np.float32) for view in tta_views(model.run, rgb[None])]


def score_tiles(
    model: OnnxModel,
    ortho: Ortho,
    tiles: list[Tile],
    second: OnnxModel | None = None,
    reference: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Tile], np.ndarray, np.ndarray]:
    """(tiles with enough valid area, raw expert scores [n, len(EXPERTS)] (NaN = asleep), features
    [n, 15])."""
    pp = postprocess_kwargs(model.meta.postprocess)
    kept, rows, feats = [], [], []
    for i, tile in enumerate(tiles):
        rgb, valid = ortho.read(tile.window)
        if progress is not None:
            progress(i + 1, len(tiles))
        if valid.mean() < MIN_VALID_FRACTION:  # mostly outside the flight: not worth a label
            continue
        views = _views(model, rgb)
        tr = ortho.window_transform(tile.window)
        counts = [len(extract_crowns(v, valid, tr, **pp)) for v in views]
        p2 = second.run(rgb[None])[0] if second is not None else None
        sc = expert_scores(views, valid, counts, p2)
        kept.append(tile)
        feats.append(tile_features(rgb, valid))
        rows.append([sc.get(e, np.nan) for e in EXPERTS])
    raw = np.array(rows, float).reshape(len(rows), len(EXPERTS))
    feats_a = np.array(feats, float).reshape(len(feats), 15)
    if len(kept):
        raw[:, EXPERTS.index("novelty")] = novelty(feats_a, reference)
    return kept, raw, feats_a


def _adjacent(tiles: list[Tile]) -> Callable[[int, int], bool]:
    def near(a: int, b: int) -> bool:
        wa, wb = tiles[a].window, tiles[b].window
        return abs(wa.col_off - wb.col_off) <= wa.width and abs(wa.row_off - wb.row_off) <= wa.height

    return near


def _write_png(path: Path, rgb: np.ndarray, transform) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).save(tmp, format="PNG")
    wld = path.with_suffix(".wld")
    with atomic_path(wld) as tmp:  # ESRI world file: pixel size, rotation, upper-left pixel centre
        tmp.write_text("\n".join(f"{v:.6f}" for v in (transform.a, transform.d, transform.b, transform.e,
                                                      transform.c + transform.a / 2,
                                                      transform.f + transform.e / 2)) + "\n")


def write_empty_annotations(path: Path, crs) -> Path:
    """An empty polygon layer ``annotations`` (fields ``species``, ``note``) in ``crs`` for QGIS editing."""
    import geopandas as gpd
    import pandas as pd

    gdf = gpd.GeoDataFrame({"species": pd.Series([], dtype=str), "note": pd.Series([], dtype=str)},
                           geometry=gpd.GeoSeries([], crs=crs))
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, layer="annotations", driver="GPKG", engine="pyogrio", geometry_type="Polygon")
    return path


def suggest_tiles(
    ortho_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    crown_model: str | os.PathLike,
    n: int = 8,
    method: str = "sleeping",
    expert: str = "entropy",
    second_model: str | os.PathLike | None = None,
    weights: list[float] | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Rank the tiles of ``ortho_path`` and write the files listed in the module docstring; returns the
    ``suggest.json`` record."""
    import geopandas as gpd
    from shapely.geometry import box

    if method not in METHODS:
        raise InputError(f"--method {method!r} is unknown: use one of {', '.join(METHODS)}")
    if expert not in EXPERTS:
        raise InputError(f"--expert {expert!r} is unknown: use one of {', '.join(EXPERTS)}")
    if n < 1:
        raise InputError(f"--n {n} must be at least 1 (e.g. 8)")
    if weights is not None and (len(weights) != len(EXPERTS) or min(weights) < 0 or sum(weights) <= 0):
        raise InputError(f"expert weights must be {len(EXPERTS)} non-negative numbers ({', '.join(EXPERTS)})")
    model = OnnxModel(crown_model, threads=threads, expected_task="crown_segmentation")
    second = (OnnxModel(second_model, threads=threads, expected_task="crown_segmentation")
              if second_model else None)
    if second is not None and second.meta.tile_size != model.meta.tile_size:
        raise InputError(f"{second_model}: tile size {second.meta.tile_size} differs from the crown model's "
                         f"{model.meta.tile_size}; pass a compressed copy of the same model")
    out = Path(out_dir)
    size = model.meta.tile_size
    with open_ortho(ortho_path, target_gsd_m=model.meta.gsd_m) as ortho:
        (out / "chips").mkdir(parents=True, exist_ok=True)
        tiles = plan_tiles(ortho.width, ortho.height, size, 0)
        kept, raw, _ = score_tiles(model, ortho, tiles, second, reference_features(crown_model), progress)
        if not kept:
            raise InputError(f"{ortho_path}: no tile with at least {MIN_VALID_FRACTION:.0%} valid pixels; "
                             "check the image's mask")
        sel = select_tiles(raw, n, method, prior=np.asarray(weights, float) if weights else None,
                           expert=EXPERTS.index(expert), seed=seed, exclude=_adjacent(kept))
        rows = []
        for rank, (i, comb) in enumerate(zip(sel.order, sel.combined, strict=True), start=1):
            tile = kept[i]
            tr = ortho.window_transform(tile.window)
            rgb, _ = ortho.read(tile.window)
            chip = out / "chips" / f"tile_{tile.index:05d}.png"
            _write_png(chip, rgb, tr)
            x0, y1 = tr * (0, 0)
            x1, y0 = tr * (size, size)
            rec = {"rank": rank, "tile_id": int(tile.index), "score": comb, "chip": f"chips/{chip.name}",
                   "col_off": int(tile.window.col_off), "row_off": int(tile.window.row_off),
                   "geometry": box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))}
            for j, e in enumerate(EXPERTS):
                rec[e] = float(raw[i, j]) if np.isfinite(raw[i, j]) else None
            rows.append(rec)
        crs = ortho.crs
        gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)
        with atomic_path(out / "suggested_tiles.gpkg") as tmp:
            gdf.to_file(tmp, layer="tiles", driver="GPKG", engine="pyogrio")
        ann = out / "annotations.gpkg"
        if not ann.exists():  # never overwrite crowns the user has drawn
            write_empty_annotations(ann, crs)
    awake = np.isfinite(raw).sum(0)
    record = {"ortho": str(ortho_path), "crown_model": str(crown_model),
              "second_model": str(second_model) if second_model else None, "method": method,
              "expert": expert if method == "greedy" else None, "n_tiles_scored": len(kept),
              "tile_size_px": size, "gsd_m": model.meta.gsd_m, "experts": list(EXPERTS),
              "weights": sel.weights[-1], "awake_tiles_per_expert": awake.astype(int).tolist(),
              "suggested": [r["tile_id"] for r in rows]}
    with atomic_path(out / "suggest.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record
