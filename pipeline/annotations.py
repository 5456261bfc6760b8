"""Crown annotations as drawn by people: bounding boxes (DeepForest CSV, Pascal VOC XML) and the crown
polygons they stand for.

Boxes are in pixel coordinates of their image (origin top-left, x right, y down). A box's crown is the
ellipse inscribed in it (a crown is round-ish; a box's corners are not crown). Both the evaluation
(``pipeline.evaluation``) and training (``models.datasets``) read annotations through this module.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from shapely.affinity import affine_transform, scale
from shapely.geometry import Point, Polygon

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
