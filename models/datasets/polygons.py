"""Crown polygons (GeoJSON, GeoPackage, shapefile; optional species column) over a GeoTIFF -> masks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio import features

from models.datasets.masks import instances_to_classes
from pipeline.errors import InputError


@dataclass
class PolygonSet:
    """Crown polygons in the CRS of ``image_path``; ``species`` is None without a species column."""

    image_path: Path
    gdf: object  # geopandas.GeoDataFrame
    species_column: str | None = None

    @property
    def species(self) -> list[str] | None:
        if self.species_column is None:
            return None
        return [str(s) for s in self.gdf[self.species_column]]


def read_polygons(
    vector_path: str | os.PathLike,
    image_path: str | os.PathLike,
    species_column: str | None = None,
    layer: str | None = None,
) -> PolygonSet:
    """Read crown polygons and reproject them to the image's CRS (the image must be georeferenced)."""
    import geopandas as gpd
    import rasterio

    vector_path, image_path = Path(vector_path), Path(image_path)
    try:
        gdf = gpd.read_file(vector_path, layer=layer) if layer else gpd.read_file(vector_path)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types
        raise InputError(
            f"{vector_path}: cannot read crown polygons ({exc}); use GeoJSON, GeoPackage or shapefile"
        ) from None
    if species_column and species_column not in gdf.columns:
        raise InputError(f"{vector_path}: no column {species_column!r}; columns are {list(gdf.columns)}")
    with rasterio.open(image_path) as ds:
        crs = ds.crs
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])].reset_index(drop=True)
    if crs is not None and gdf.crs is not None:
        gdf = gdf.to_crs(crs)
    elif crs is None or gdf.crs is None:
        raise InputError(f"{vector_path} / {image_path}: both the polygons and the image need a CRS")
    return PolygonSet(image_path, gdf, species_column)


def polygon_masks(geoms, transform, height: int, width: int) -> list[tuple[int, int, np.ndarray]]:
    """Rasterise each polygon in its own bounding window (pixel-centre rule) -> (row0, col0, mask)."""
    out = []
    inv = ~transform
    for g in geoms:
        x0, y0, x1, y1 = g.bounds
        cols, rows = zip(*[inv @ (x, y) for x, y in ((x0, y0), (x0, y1), (x1, y0), (x1, y1))], strict=True)
        c0, c1 = max(int(np.floor(min(cols))), 0), min(int(np.ceil(max(cols))), width)
        r0, r1 = max(int(np.floor(min(rows))), 0), min(int(np.ceil(max(rows))), height)
        if c1 <= c0 or r1 <= r0:
            continue
        t = transform @ Affine.translation(c0, r0)
        m = features.rasterize(
            [(g, 1)], out_shape=(r1 - r0, c1 - c0), transform=t, fill=0, dtype="uint8"
        ).astype(bool)
        out.append((r0, c0, m))
    return out


def polygons_to_crown_mask(
    geoms, transform, height: int, width: int, interior_ratio: float = 0.7
) -> np.ndarray:
    """uint8 [height, width] target (0 background, 1 interior, 2 boundary) from polygons in the image CRS."""
    return instances_to_classes(polygon_masks(geoms, transform, height, width), height, width, interior_ratio)
