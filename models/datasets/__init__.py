"""Training-data adapters: crown boxes and polygons over imagery -> 3-class crown masks, chips, splits.

Mask classes (same order as the crown model's ``class_names``): 0 background, 1 crown interior,
2 crown boundary ring; 255 = ignore (nodata, or pixels held out for validation).
"""

from models.datasets.boxes import (
    BoxSet,
    boxes_to_crown_mask,
    boxes_to_polygons,
    read_boxes,
    read_deepforest_csv,
    read_voc_xml,
)
from models.datasets.polygons import PolygonSet, polygons_to_crown_mask, read_polygons
from models.datasets.splits import BlockSplit, block_split

IGNORE_INDEX = 255
BACKGROUND, CROWN, BOUNDARY = 0, 1, 2

__all__ = [
    "BACKGROUND",
    "BOUNDARY",
    "CROWN",
    "IGNORE_INDEX",
    "BlockSplit",
    "BoxSet",
    "PolygonSet",
    "block_split",
    "boxes_to_crown_mask",
    "boxes_to_polygons",
    "polygons_to_crown_mask",
    "read_boxes",
    "read_deepforest_csv",
    "read_polygons",
    "read_voc_xml",
]
