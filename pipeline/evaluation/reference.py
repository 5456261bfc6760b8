"""Reference crowns for evaluation: boxes (DeepForest CSV, Pascal VOC; pixel coordinates of the image)
or crown polygons (any vector format geopandas reads), returned as shapely geometries in a target CRS.

Box readers live in ``pipeline.annotations``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from shapely.geometry.base import BaseGeometry

from pipeline.errors import InputError

BOX_SUFFIXES = {".csv", ".xml"}


def _image_boxes(truth: Path, image: Path):
    from pipeline.annotations import read_boxes

    sets = read_boxes(truth)
    if len(sets) == 1:
        return sets[0].boxes
    named = [s for s in sets if Path(s.image_path).name == image.name]
    if not named:
        raise InputError(
            f"{truth}: no boxes for image {image.name} (image_path values: "
            f"{sorted({Path(s.image_path).name for s in sets})[:5]})"
        )
    return named[0].boxes


def read_reference(
    truth: str | os.PathLike, image: str | os.PathLike, target_crs: str, shape: str = "box"
) -> tuple[list[BaseGeometry], str]:
    """Reference crowns in ``target_crs`` and their kind (``box``, ``ellipse`` or ``polygon``).

    Boxes are pixel coordinates of ``image`` (origin top-left), mapped with the image's geotransform;
    ``shape`` picks the box itself (the NeonTreeEvaluation convention) or its inscribed ellipse.
    """
    import geopandas as gpd
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    truth, image = Path(truth), Path(image)
    if not truth.exists():
        raise InputError(f"{truth}: reference annotations not found; pass --truth boxes.csv|.xml|crowns.gpkg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(image) as ds:
            transform, crs = ds.transform, ds.crs
    if truth.suffix.lower() in BOX_SUFFIXES:
        from pipeline.annotations import boxes_to_polygons

        if crs is None:
            raise InputError(f"{image}: not georeferenced; evaluation needs a georeferenced image")
        boxes = _image_boxes(truth, image)
        geoms = boxes_to_polygons(
            boxes, transform=transform, shape="ellipse" if shape == "ellipse" else "box"
        )
        kind = "ellipse" if shape == "ellipse" else "box"
        gdf = gpd.GeoDataFrame(geometry=geoms, crs=crs)
    else:
        try:
            gdf = gpd.read_file(truth)
        except Exception as exc:  # noqa: BLE001 - pyogrio raises several types
            raise InputError(f"{truth}: cannot read reference crowns ({exc})") from None
        if gdf.crs is None:
            raise InputError(f"{truth}: reference crowns have no CRS; set one (e.g. ogr2ogr -a_srs)")
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
        kind = "polygon"
    gdf = gdf.to_crs(target_crs)
    return list(gdf.geometry), kind
