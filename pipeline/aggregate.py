"""Spatial aggregation units: a regular grid of cells (1 ha by default) and user plot polygons.

All areas are computed in a metric CRS: the grid must be built in a projected CRS with metre units (the
working grid is UTM), and plot areas are computed in the plots' CRS when it is metric, else in their local
UTM zone.
"""

from __future__ import annotations

import math
import os

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS

from pipeline.errors import InputError


def _metric_crs(crs, what: str) -> CRS:
    if crs is None:
        raise InputError(f"{what} has no CRS; give it a projected CRS in metres (e.g. UTM)")
    c = CRS.from_user_input(crs)
    unit = c.axis_info[0].unit_name if c.axis_info else ""
    if not c.is_projected or unit not in ("metre", "meter"):
        raise InputError(f"{what} CRS {c.to_string()} is not projected in metres; reproject it to UTM first")
    return c


def grid_cells(bounds: tuple[float, float, float, float], crs, cell_m: float = 100.0) -> gpd.GeoDataFrame:
    """Square cells of ``cell_m`` metres covering ``bounds`` (minx, miny, maxx, maxy) in a metric ``crs``.

    Cells are aligned to multiples of ``cell_m`` in the CRS (so adjacent scenes share cell edges) and
    clipped to the bounds; ``area_ha`` is the clipped area. Columns: cell_id, row, col, area_ha, geometry.
    Rows count from the north.
    """
    c = _metric_crs(crs, "the grid")
    if not (cell_m > 0 and math.isfinite(cell_m)):
        raise InputError(f"cell size {cell_m} m must be a positive number of metres (--cell-m)")
    minx, miny, maxx, maxy = map(float, bounds)
    if not (maxx > minx and maxy > miny):
        raise InputError(f"grid bounds {bounds} are empty; pass (minx, miny, maxx, maxy) with max > min")
    x0 = math.floor(minx / cell_m) * cell_m
    y1 = math.ceil(maxy / cell_m) * cell_m
    ncols = max(1, math.ceil((maxx - x0) / cell_m - 1e-9))
    nrows = max(1, math.ceil((y1 - miny) / cell_m - 1e-9))
    col, row = np.meshgrid(np.arange(ncols), np.arange(nrows))
    col, row = col.ravel(), row.ravel()
    xmin = np.maximum(x0 + col * cell_m, minx)
    xmax = np.minimum(x0 + (col + 1) * cell_m, maxx)
    ymax = np.minimum(y1 - row * cell_m, maxy)
    ymin = np.maximum(y1 - (row + 1) * cell_m, miny)
    geom = shapely.box(xmin, ymin, xmax, ymax)
    grid = gpd.GeoDataFrame({"cell_id": np.arange(col.size), "row": row, "col": col,
                             "area_ha": (xmax - xmin) * (ymax - ymin) / 1e4}, geometry=geom, crs=c)
    grid.attrs.update({"x0": x0, "y1": y1, "cell_m": float(cell_m), "ncols": ncols, "nrows": nrows})
    return grid


def assign_cells(x: np.ndarray, y: np.ndarray, grid: gpd.GeoDataFrame) -> np.ndarray:
    """Cell id (int) of each point (x, y in the grid's CRS); -1 outside the grid.

    Uses the grid's regular layout when known (``grid.attrs``), else a spatial index.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    a = grid.attrs
    if {"x0", "y1", "cell_m", "ncols", "nrows"} <= set(a) and len(grid) == a["ncols"] * a["nrows"]:
        col = np.floor((x - a["x0"]) / a["cell_m"]).astype(np.int64)
        row = np.floor((a["y1"] - y) / a["cell_m"]).astype(np.int64)
        minx, miny, maxx, maxy = grid.total_bounds
        inside = (x >= minx) & (x <= maxx) & (y >= miny) & (y <= maxy) & np.isfinite(x) & np.isfinite(y)
        col = np.clip(col, 0, a["ncols"] - 1)
        row = np.clip(row, 0, a["nrows"] - 1)
        lookup = np.full(a["ncols"] * a["nrows"], -1, dtype=np.int64)
        lookup[grid["row"].to_numpy() * a["ncols"] + grid["col"].to_numpy()] = grid["cell_id"].to_numpy()
        return np.where(inside, lookup[row * a["ncols"] + col], -1)
    return _points_in_polygons(x, y, grid.geometry.values, grid["cell_id"].to_numpy())


def _points_in_polygons(x: np.ndarray, y: np.ndarray, polygons, ids: np.ndarray) -> np.ndarray:
    """First polygon id containing each point (boundary included); -1 when none."""
    out = np.full(x.shape[0], -1, dtype=np.int64)
    if x.size == 0 or len(polygons) == 0:
        return out
    points = shapely.points(x, y)
    tree = shapely.STRtree(polygons)
    pi, gi = tree.query(points, predicate="intersects")
    if pi.size:
        order = np.lexsort((gi, pi))  # lowest polygon index first for each point
        pi, gi = pi[order], gi[order]
        first = np.r_[True, pi[1:] != pi[:-1]]
        out[pi[first]] = ids[gi[first]]
    return out


def assign_plots(x: np.ndarray, y: np.ndarray, plots_gdf: gpd.GeoDataFrame) -> np.ndarray:
    """Row position (0..n-1) of the plot containing each point (x, y in the plots' CRS); -1 outside all.

    Overlapping plots: a point goes to the first plot in table order.
    """
    return _points_in_polygons(np.asarray(x, dtype=float), np.asarray(y, dtype=float),
                               plots_gdf.geometry.values, np.arange(len(plots_gdf)))


def plot_areas_ha(plots_gdf: gpd.GeoDataFrame) -> np.ndarray:
    """Plot areas (ha), computed in the plots' CRS if metric, else in their local UTM zone."""
    if plots_gdf.crs is None:
        raise InputError("plot polygons have no CRS; save the plots file with its CRS")
    gdf = plots_gdf
    crs = CRS.from_user_input(gdf.crs)
    if not crs.is_projected or (crs.axis_info and crs.axis_info[0].unit_name not in ("metre", "meter")):
        gdf = gdf.to_crs(gdf.estimate_utm_crs())
    return gdf.geometry.area.to_numpy() / 1e4


def read_plots(path: str | os.PathLike, target_crs=None) -> gpd.GeoDataFrame:
    """Plot polygons from a vector file (GeoPackage, GeoJSON, shapefile), optionally reprojected.

    Adds ``plot_id`` (a ``plot_id``/``plot``/``name`` column if present, else the row number) and ``area_ha``.
    """
    try:
        plots = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise InputError(f"cannot read plots file {path}: {exc}; pass a GeoPackage/GeoJSON of polygons"
                         ) from exc
    if plots.empty or not plots.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).all():
        raise InputError(f"plots file {path} must contain polygons only (found "
                         f"{sorted(set(plots.geometry.geom_type)) or 'nothing'})")
    if plots.crs is None:
        raise InputError(f"plots file {path} has no CRS; save it with its CRS")
    plots["area_ha"] = plot_areas_ha(plots)
    if target_crs is not None:
        plots = plots.to_crs(target_crs)
    name_col = next((c for c in ("plot_id", "plot", "name") if c in plots.columns), None)
    plots["plot_id"] = plots[name_col].astype(str) if name_col else pd.RangeIndex(len(plots)).astype(str)
    return plots.reset_index(drop=True)


def raster_grid(transform: tuple[float, ...], width: int, height: int, crs, cell_m: float = 100.0
                ) -> gpd.GeoDataFrame:
    """``grid_cells`` over a raster's footprint (``transform``: GDAL-order affine tuple; ``crs`` metric)."""
    left, top = transform[2], transform[5]
    right, bottom = left + transform[0] * width, top + transform[4] * height
    return grid_cells((left, bottom, right, top), crs, cell_m=cell_m)


def species_ids(species: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer id per tree (index into the sorted species names) and the names."""
    names = sorted(set(species))
    code = {n: i for i, n in enumerate(names)}
    return np.array([code[s] for s in species], dtype=np.int64), names


def tree_groups(trees: pd.DataFrame, grid: gpd.GeoDataFrame, plots: gpd.GeoDataFrame | None = None
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Grouping ids per tree: ``cell`` (grid row), ``species`` and ``plot`` (when plots are given; -1
    outside), and what each id means (``grid``, ``species`` names, ``plots``).

    ``trees`` holds crown centres ``x``, ``y`` in the CRS of ``grid`` and ``plots``."""
    x, y = trees["x"].to_numpy(), trees["y"].to_numpy()
    groups = {"cell": np.asarray(assign_cells(x, y, grid), dtype=np.int64)}
    groups["species"], names = species_ids(trees["species"])
    info: dict = {"grid": grid, "species": names}
    if plots is not None:
        groups["plot"] = np.asarray(assign_plots(x, y, plots), dtype=np.int64)
        info["plots"] = plots
    return groups, info


def group_table(groups: dict | None, name: str) -> pd.DataFrame | None:
    """One grouping's carbon table from a ``CarbonResult.groups`` mapping (None when absent)."""
    table = (groups or {}).get(name)
    return None if table is None else pd.DataFrame(table)


def with_group_totals(polygons: gpd.GeoDataFrame, table: pd.DataFrame | None) -> gpd.GeoDataFrame:
    """Grid cells (by ``cell_id``) or plots (by row) joined with their carbon totals; polygons without
    trees get ``n_trees`` 0 and zero masses."""
    polygons = polygons.reset_index(drop=True)
    if table is None or not len(table):
        return polygons
    ids = polygons["cell_id"].to_numpy() if "cell_id" in polygons.columns else np.arange(len(polygons))
    joined = table.reindex(ids)
    joined.index = polygons.index
    mass_cols = [c for c in joined.columns if c == "n_trees" or c.endswith("_t") or c.endswith("_t_sd")]
    joined[mass_cols] = joined[mass_cols].fillna(0)
    joined = joined.drop(columns=[c for c in joined.columns if c in polygons.columns])
    return gpd.GeoDataFrame(pd.concat([polygons, joined], axis=1), geometry=polygons.geometry.name,
                            crs=polygons.crs)
