"""Crown chips with species labels, from an orthomosaic + crown polygons that carry a species column.

Works on the synthetic truth (``pipeline.synthetic``, column ``species``) and on users' labelled crowns
(GeoPackage, GeoJSON or shapefile in any CRS; reprojected to the orthomosaic's working CRS). Chips are cut
by :func:`pipeline.species.crown_chip`, the same function the engine uses at inference, so training and
inference see identical chips: centred on the crown centroid, ``chip_px * chip_gsd_m`` metres wide,
resampled to ``chip_px`` px, pixels outside the crown polygon zeroed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np

from pipeline.errors import InputError
from pipeline.raster import open_ortho
from pipeline.species import crown_chip


@dataclass
class SpeciesChips:
    """uint8 chips [n, 3, C, C], label index per chip (into ``class_names``), crown centroids (m, ortho CRS)
    and the scene each chip came from."""

    chips: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    x: np.ndarray
    y: np.ndarray
    scene: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> SpeciesChips:
        return SpeciesChips(
            self.chips[idx], self.labels[idx], self.class_names, self.x[idx], self.y[idx], self.scene[idx]
        )


def read_labelled_crowns(path: str | os.PathLike, species_column: str = "species") -> gpd.GeoDataFrame:
    """Crown polygons with a species column; InputError when the file, CRS or column is missing."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: labelled crowns not found; pass a GeoPackage/GeoJSON/shapefile of crowns")
    try:
        gdf = gpd.read_file(p)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types
        raise InputError(f"{p}: not a readable vector file ({str(exc).splitlines()[0][:100]})") from None
    if species_column not in gdf.columns:
        cols = ", ".join(map(str, gdf.columns))
        raise InputError(f"{p}: no column {species_column!r} (columns: {cols}); pass --species-column NAME")
    if gdf.crs is None:
        raise InputError(f"{p}: has no CRS; save the crowns with their CRS (e.g. as a GeoPackage)")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty & gdf[species_column].notna()]
    return gdf.reset_index(drop=True)


def cut_species_chips(
    ortho_path: str | os.PathLike,
    crowns: gpd.GeoDataFrame,
    species_column: str = "species",
    chip_px: int = 64,
    chip_gsd_m: float = 0.2,
    class_names: Sequence[str] | None = None,
    scene_name: str | None = None,
) -> SpeciesChips:
    """Chips of every crown whose species is in ``class_names`` (default: all species present, sorted)."""
    present = sorted(map(str, crowns[species_column].unique()))
    names = list(class_names) if class_names is not None else present
    index = {n: i for i, n in enumerate(names)}
    with open_ortho(ortho_path) as ortho:
        gdf = crowns.to_crs(ortho.crs)
        keep = gdf[species_column].astype(str).isin(index).to_numpy()
        gdf = gdf[keep]
        cents = gdf.geometry.centroid
        cx, cy = cents.x.to_numpy(), cents.y.to_numpy()
        chips = np.zeros((len(gdf), 3, chip_px, chip_px), dtype=np.uint8)
        for i, geom in enumerate(gdf.geometry.to_numpy()):
            chips[i] = crown_chip(ortho, geom, (float(cx[i]), float(cy[i])), chip_px, chip_gsd_m)
    labels = np.array([index[s] for s in gdf[species_column].astype(str)], dtype=np.int64)
    scene = np.full(len(labels), scene_name or Path(ortho_path).stem, dtype=object)
    return SpeciesChips(chips, labels, names, cx, cy, scene)


def concat_chips(parts: Sequence[SpeciesChips]) -> SpeciesChips:
    names = parts[0].class_names
    if any(p.class_names != names for p in parts):
        raise ValueError("chip sets with different class names cannot be joined")
    return SpeciesChips(
        np.concatenate([p.chips for p in parts]),
        np.concatenate([p.labels for p in parts]),
        names,
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.scene for p in parts]),
    )


def synthetic_scene(work_dir: str | os.PathLike, seed: int, size_m: float, gsd_m: float = 0.1) -> Path:
    """Folder of the synthetic scene ``seed`` (generated once; reused when its scene.json matches)."""
    from pipeline.synthetic import generate_scene

    folder = Path(work_dir) / f"scene_seed{seed}_{size_m:g}m_{gsd_m:g}"
    meta = folder / "scene.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("seed") == seed and m.get("size_m") == size_m and m.get("gsd_m") == gsd_m:
            return folder
    generate_scene(folder, size_m=size_m, gsd_m=gsd_m, seed=seed)
    return folder


def synthetic_species_chips(
    work_dir: str | os.PathLike,
    seeds: Sequence[int],
    size_m: float = 250.0,
    scene_gsd_m: float = 0.1,
    chip_px: int = 64,
    chip_gsd_m: float = 0.2,
) -> SpeciesChips:
    """Chips from the truth crowns of synthetic scenes generated with ``seeds`` (cached as .npz)."""
    from pipeline.synthetic import SPECIES_NAMES

    parts = []
    for seed in seeds:
        folder = synthetic_scene(work_dir, seed, size_m, scene_gsd_m)
        cache = folder / f"chips_{chip_px}px_{chip_gsd_m:g}m.npz"
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            parts.append(
                SpeciesChips(
                    z["chips"],
                    z["labels"],
                    list(SPECIES_NAMES),
                    z["x"],
                    z["y"],
                    np.full(len(z["labels"]), f"seed{seed}", dtype=object),
                )
            )
            continue
        truth = read_labelled_crowns(folder / "truth.gpkg")
        part = cut_species_chips(
            folder / "ortho.tif",
            truth,
            "species",
            chip_px,
            chip_gsd_m,
            class_names=SPECIES_NAMES,
            scene_name=f"seed{seed}",
        )
        np.savez(cache, chips=part.chips, labels=part.labels, x=part.x, y=part.y)
        parts.append(part)
    return concat_chips(parts)


def spatial_split(
    chips: SpeciesChips, block_m: float = 50.0, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices by whole spatial blocks of ``block_m`` metres (per scene), not by chip."""
    bx = np.floor(chips.x / block_m).astype(np.int64)
    by = np.floor(chips.y / block_m).astype(np.int64)
    keys = np.array([f"{s}:{a}:{b}" for s, a, b in zip(chips.scene, bx, by, strict=True)])
    uniq = np.unique(keys)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * len(uniq)))) if len(uniq) > 1 else 0
    val_blocks = set(rng.permutation(uniq)[:n_val].tolist())
    is_val = np.array([k in val_blocks for k in keys], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
