"""Crown bounding boxes (DeepForest CSV, Pascal VOC XML) -> crown polygons and 3-class masks.

Boxes are in pixel coordinates of their image (origin top-left, x right, y down). Each box becomes the
ellipse inscribed in it (a crown is round-ish; a box's corners are not crown), so the training target is an
ellipse mask split into an interior core and a boundary ring (see :mod:`models.datasets.masks`).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from shapely.affinity import affine_transform, scale
from shapely.geometry import Point, Polygon

from models.datasets.masks import instances_to_classes
from pipeline.errors import InputError

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]


@dataclass
class BoxSet:
    """Boxes of one image: ``boxes`` has xmin, ymin, xmax, ymax (pixels, origin top-left) and label."""

    image_path: Path
    boxes: pd.DataFrame
    site: str = ""  # the CSV's ``site`` column, when it has one
    plot: str = ""  # the CSV's ``plot`` column (one plot may have several images, e.g. two flights)


def read_deepforest_csv(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[BoxSet]:
    """Read a DeepForest CSV (image_path,xmin,ymin,xmax,ymax,label); image paths are relative to the CSV
    folder (or ``image_root``). One :class:`BoxSet` per image, with its ``site`` and ``plot`` when the CSV
    has those columns (the NEON plot annotations do)."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path}: cannot read boxes CSV ({exc}); expected columns image_path,xmin,ymin,xmax,ymax,label"
        ) from None
    missing = [c for c in ["image_path", *BOX_COLUMNS] if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; expected image_path,xmin,ymin,xmax,ymax,label"
        )
    if "label" not in df.columns:
        df["label"] = "Tree"
    df = df.dropna(subset=BOX_COLUMNS)
    root = Path(image_root) if image_root else path.parent
    out = []
    for name, group in df.groupby("image_path", sort=False):
        boxes = group[BOX_COLUMNS + ["label"]].astype({c: float for c in BOX_COLUMNS}).reset_index(drop=True)
        site = str(group["site"].iloc[0]) if "site" in group.columns else ""
        plot = str(group["plot"].iloc[0]) if "plot" in group.columns else ""
        out.append(BoxSet(root / str(name), _clean(boxes, path), site, plot))
    return out


def read_voc_xml(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> BoxSet:
    """Read one Pascal VOC annotation file (``<filename>`` + ``<object><bndbox>``)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise InputError(f"{path}: not a readable Pascal VOC XML file ({exc})") from None
    filename = (root.findtext("filename") or "").strip()
    image = (
        (Path(image_root) if image_root else path.parent) / filename if filename else path.with_suffix(".png")
    )
    if not filename:
        for ext in (".png", ".tif", ".tiff", ".jpg"):
            if path.with_suffix(ext).exists():
                image = path.with_suffix(ext)
                break
    rows = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            vals = [float(bb.findtext(k)) for k in BOX_COLUMNS]
        except (TypeError, ValueError):
            raise InputError(
                f"{path}: an <object> has a malformed <bndbox>; need numeric xmin,ymin,xmax,ymax"
            ) from None
        rows.append([*vals, (obj.findtext("name") or "Tree").strip()])
    boxes = pd.DataFrame(rows, columns=BOX_COLUMNS + ["label"])
    return BoxSet(image, _clean(boxes, path))


def read_boxes(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[BoxSet]:
    """Read boxes from a DeepForest ``.csv`` or a Pascal VOC ``.xml`` (by suffix)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: annotation file not found; pass a DeepForest .csv or Pascal VOC .xml")
    if path.suffix.lower() == ".csv":
        return read_deepforest_csv(path, image_root)
    if path.suffix.lower() == ".xml":
        return [read_voc_xml(path, image_root)]
    raise InputError(f"{path}: unknown box format; use a DeepForest .csv or a Pascal VOC .xml")


def _clean(boxes: pd.DataFrame, source: Path) -> pd.DataFrame:
    bad = (boxes["xmax"] <= boxes["xmin"]) | (boxes["ymax"] <= boxes["ymin"])
    if bad.all() and len(boxes):
        raise InputError(f"{source}: every box has xmax<=xmin or ymax<=ymin; check the column order")
    return boxes[~bad].reset_index(drop=True)


def box_ellipse(xmin: float, ymin: float, xmax: float, ymax: float, resolution: int = 16) -> Polygon:
    """The ellipse inscribed in a box, as a polygon in the box's (pixel) coordinates."""
    cx, cy = (xmin + xmax) / 2.0, (ymin + ymax) / 2.0
    circle = Point(cx, cy).buffer(1.0, quad_segs=resolution)
    return scale(circle, xfact=(xmax - xmin) / 2.0, yfact=(ymax - ymin) / 2.0, origin=(cx, cy))


def boxes_to_polygons(boxes: pd.DataFrame, transform=None, shape: str = "ellipse") -> list[Polygon]:
    """Crown polygons from boxes: inscribed ellipses (``shape="ellipse"``) or the boxes themselves.

    Coordinates are pixels (origin top-left) unless an affine ``transform`` (rasterio) maps them to the
    image's CRS.
    """
    polys = []
    for x0, y0, x1, y1 in boxes[BOX_COLUMNS].to_numpy(float):
        if shape == "ellipse":
            p = box_ellipse(x0, y0, x1, y1)
        else:
            p = Polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        if transform is not None:
            t = transform
            p = affine_transform(p, [t.a, t.b, t.d, t.e, t.c, t.f])
        polys.append(p)
    return polys


def ellipse_masks(boxes: pd.DataFrame, height: int, width: int) -> list[tuple[int, int, np.ndarray]]:
    """Per-box inscribed-ellipse masks as (row0, col0, bool crop) tuples, clipped to the image."""
    out = []
    for x0, y0, x1, y1 in boxes[BOX_COLUMNS].to_numpy(float):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
        if c1 <= c0 or r1 <= r0:
            continue
        cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
        yy, xx = np.mgrid[r0:r1, c0:c1]
        m = ((xx + 0.5 - cx) / a) ** 2 + ((yy + 0.5 - cy) / b) ** 2 <= 1.0
        out.append((r0, c0, m))
    return out


def boxes_to_crown_mask(
    boxes: pd.DataFrame, height: int, width: int, interior_ratio: float = 0.7
) -> np.ndarray:
    """uint8 [height, width] target: 0 background, 1 crown interior, 2 boundary ring (inscribed ellipses)."""
    return instances_to_classes(ellipse_masks(boxes, height, width), height, width, interior_ratio)
