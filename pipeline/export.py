"""Atomic writers for the inventory's deliverables (each goes through ``pipeline.atomic.atomic_path``).

- crowns.geojson: RFC 7946 (WGS84 lon/lat, no ``crs`` member), one Feature per tree.
- inventory.gpkg: layers ``crowns`` (working projected CRS), ``grid``, ``species``, ``plots`` (with --plots),
  ``summary`` (one row of typed columns, ``pipeline.summary.SUMMARY_COLUMNS``) and a QGIS ``layer_styles``
  table whose default style colours the crowns by species.
- crowns.csv: one row per tree (attributes, centroid x/y in the working CRS and lon/lat).
- crown_mask.tif: Cloud-Optimized GeoTIFF of uint32 ``tree_id`` labels, nodata 0, rasterised block-wise on
  the grid the caller gives (the engine gives the input's own grid, ``RunPlan.input_ortho``).
- quicklook.png (+ .wld and .png.aux.xml with the CRS): the ortho at its resolution (longest edge capped),
  crowns outlined by species, a species legend and a scale bar; ``crown_map_image`` draws the same picture
  smaller, as JPEG bytes, for the report.
- summary.json.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.features
import rasterio.shutil
import shapely
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import box

from pipeline.atomic import atomic_path
from pipeline.crown_store import crown_source
from pipeline.summary import SUMMARY_COLUMNS, summary_row

# Per-crown properties in crowns.geojson: the engine's contract (issue 2) and the carbon contract (issue 5).
CROWN_MASK_CACHE_MB = 16  # GDAL block cache while writing crown_mask.tif (the run's default is 64 MB)
CROWN_PROPERTIES = ["tree_id", "species", "species_prob", "score", "crown_area_m2", "crown_diameter_m",
                    "height_m", "height_source", "dbh_cm", "agb_kg", "agb_kg_sd", "carbon_kg", "co2e_kg"]
CARBON_PROPERTIES = ["wood_density", "wood_density_level", "dbh_model", "agb_model", "bgb_kg", "agb_kg_p5",
                     "agb_kg_p95", "height_confidence"]


def species_colours(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A stable, distinct RGB colour per species name ("unknown" is grey)."""
    out = {}
    ordered = sorted(n for n in set(names) if n != "unknown")
    for i, name in enumerate(ordered):
        hue = (i * 0.618034) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
        out[name] = (int(r * 255), int(g * 255), int(b * 255))
    out["unknown"] = (200, 200, 200)
    return out


def _storable_columns(df: pd.DataFrame) -> list[str]:
    """Columns GDAL can store: all but array/object columns that are not strings."""
    keep = []
    for col in df.columns:
        series = df[col]
        if series.dtype == object and len(series) and \
                not all(isinstance(v, str | type(None)) for v in series):
            continue
        keep.append(col)
    return keep


def _clean_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with only the columns GDAL can store."""
    return df[_storable_columns(df)]


def write_geojson(path: str | os.PathLike, crowns: Any, chunk: int = 1000) -> Path:
    """RFC 7946 GeoJSON: WGS84 lon/lat rounded to 7 decimals (~1 cm), no ``crs`` member, exterior rings
    counter-clockwise, NaN written as null; one Feature per tree (vectorised: GEOS writes the geometries).
    ``crowns``: a GeoDataFrame or ``StoredCrowns``."""
    src = crown_source(crowns)
    cols = [c for c in CROWN_PROPERTIES + CARBON_PROPERTIES if c in src.columns] + \
        [c for c in ("lon", "lat", "cell_id", "plot_id") if c in src.columns]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        for start, part in zip(range(0, len(src), chunk), src.chunks(chunk), strict=True):  # bounded memory
            lonlat = shapely.orient_polygons(part.geometry.to_crs(4326).to_numpy())
            lonlat = shapely.transform(lonlat, lambda xy: np.round(xy, 7))
            props = pd.DataFrame(part[cols]).to_json(orient="records", lines=True, double_precision=10)
            features = zip(props.splitlines(), shapely.to_geojson(lonlat), strict=True)
            for i, (p, g) in enumerate(features):
                sep = "," if start + i else ""
                fh.write(f'{sep}\n{{"type":"Feature","properties":{p},"geometry":{g}}}')
        fh.write("\n]}\n")
    return Path(path)


def write_csv(path: str | os.PathLike, crowns: Any, chunk: int = 2000) -> Path:
    """One row per tree, no geometry; centroid as x/y (working CRS) and lon/lat (WGS84). Written ``chunk``
    rows at a time, so the text copy of the table never exists whole in memory."""
    table = crown_source(crowns).table
    cols = _storable_columns(table)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        for start in range(0, max(len(table), 1), chunk):
            df = pd.DataFrame(table.iloc[start:start + chunk][cols])
            digits = {c: 8 if c in ("lon", "lat") else 3 if c in ("x", "y") else 6
                      for c in df.columns if pd.api.types.is_float_dtype(df[c])}
            df.round(digits).to_csv(fh, index=False, header=start == 0)
    return Path(path)


def crowns_qml(species: Sequence[str], field: str = "species") -> str:
    """QGIS style (QML) for the crowns layer: categorized by species, translucent fill, coloured outline."""
    colours = species_colours(species)
    cats, symbols = [], []
    for i, (name, (r, g, b)) in enumerate(sorted(colours.items())):
        cats.append(f'<category render="true" symbol="{i}" value="{escape(name)}" label="{escape(name)}"/>')
        symbols.append(
            f'<symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">'
            f'<layer class="SimpleFill" enabled="1" locked="0" pass="0"><Option type="Map">'
            f'<Option type="QString" name="color" value="{r},{g},{b},60"/>'
            f'<Option type="QString" name="outline_color" value="{r},{g},{b},255"/>'
            f'<Option type="QString" name="outline_width" value="0.5"/>'
            f'<Option type="QString" name="outline_width_unit" value="MM"/>'
            f'<Option type="QString" name="style" value="solid"/>'
            f'<Option type="QString" name="outline_style" value="solid"/>'
            f'</Option></layer></symbol>')
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            '<qgis version="3.34.0" styleCategories="Symbology|Labeling">'
            f'<renderer-v2 type="categorizedSymbol" attr="{field}" enableorderby="0" forceraster="0" '
            f'symbollevels="0"><categories>{"".join(cats)}</categories><symbols>{"".join(symbols)}</symbols>'
            '</renderer-v2>'
            '<labeling type="simple"><settings calloutType="simple"><text-style fieldName="tree_id" '
            'fontSize="7" textColor="255,255,255,255"/></settings></labeling>'
            '</qgis>\n')


def write_gpkg(path: str | os.PathLike, crowns: Any, grid: gpd.GeoDataFrame | None,
               species: pd.DataFrame | None, summary: dict, plots: gpd.GeoDataFrame | None = None,
               chunk: int = 5000) -> Path:
    """inventory.gpkg: ``crowns`` (projected CRS; a GeoDataFrame or ``StoredCrowns``, appended ``chunk``
    at a time), ``grid``, ``species``, ``plots``, ``summary`` (``summary_table``: one row, typed columns),
    ``layer_styles``."""
    src = crown_source(crowns)
    cols = _storable_columns(src.table)  # one schema for every chunk
    with atomic_path(path) as tmp:
        for i, part in enumerate(src.chunks(chunk) if len(src) else [src.to_geodataframe()]):
            pyogrio.write_dataframe(part[[*cols, part.geometry.name]], tmp, layer="crowns", driver="GPKG",
                                    promote_to_multi=False, append=i > 0)
        if grid is not None:
            pyogrio.write_dataframe(_clean_frame(grid), tmp, layer="grid", driver="GPKG")
        if plots is not None:
            pyogrio.write_dataframe(_clean_frame(plots), tmp, layer="plots", driver="GPKG",
                                    promote_to_multi=True)
        if species is not None:
            pyogrio.write_dataframe(pd.DataFrame(species).reset_index(drop=True), tmp, layer="species",
                                    driver="GPKG")
        pyogrio.write_dataframe(summary_table(summary), tmp, layer="summary", driver="GPKG")
        style = pd.DataFrame([{
            "f_table_catalog": "", "f_table_schema": "", "f_table_name": "crowns",
            "f_geometry_column": "geom", "styleName": "crowns by species",
            "styleQML": crowns_qml(list(src.table["species"].unique()) if "species" in src.columns else []),
            "styleSLD": "", "useAsDefault": True, "description": "forest-inventory default style",
            "owner": "", "ui": "", "update_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        }])
        pyogrio.write_dataframe(style, tmp, layer="layer_styles", driver="GPKG")
    return Path(path)


_GPKG_DTYPES = {str: "string", int: "Int64", float: "float64", bool: "boolean"}


def summary_table(summary: dict) -> pd.DataFrame:
    """The GeoPackage ``summary`` layer: one row, one typed column per ``SUMMARY_COLUMNS`` entry (TEXT,
    INTEGER, REAL, BOOLEAN; NULL where unknown), readable in a GIS attribute table."""
    row = summary_row(summary)
    return pd.DataFrame({name: pd.Series([row[name]], dtype=_GPKG_DTYPES[kind])
                         for name, kind, _ in SUMMARY_COLUMNS})


def write_crown_mask(path: str | os.PathLike, crowns: Any, width: int, height: int,
                     transform: Affine, crs: CRS | str, block_px: int = 1024) -> Path:
    """COG of uint32 ``tree_id`` labels (nodata 0) on the grid ``width`` x ``height`` at ``transform``
    (north-up, in ``crs``, the crowns' CRS), rasterised one block at a time.

    Memory: one ``block_px`` block, a spatial index of the crowns' boxes, and GDAL's overview strips; GDAL's
    block cache is held to ``CROWN_MASK_CACHE_MB`` while the COG is copied from the stage file."""
    path = Path(path)
    crs = CRS.from_user_input(crs)
    src = crown_source(crowns)
    ids = src.table["tree_id"].to_numpy().astype(np.uint32)
    sindex = _bounds_index(src)
    stage = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.stage.tif")
    try:
        profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint32",
                   "crs": crs, "transform": transform, "nodata": 0, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        with rasterio.open(stage, "w", **profile) as dst:  # (GDAL's rasterize sizes its chunks by the cache)
            for r0 in range(0, height, block_px):
                for c0 in range(0, width, block_px):
                    win = Window(c0, r0, min(block_px, width - c0), min(block_px, height - r0))
                    wt = transform @ Affine.translation(c0, r0)
                    block = np.zeros((int(win.height), int(win.width)), dtype=np.uint32)
                    if sindex is not None:
                        hits = _crowns_in(sindex, wt, block.shape)
                        if hits.size:
                            block = rasterio.features.rasterize(
                                zip(src.geometries(hits), ids[hits], strict=True), out_shape=block.shape,
                                transform=wt, fill=0, dtype="uint32")
                    dst.write(block, 1, window=win)
        del sindex, ids  # the COG copy below is the writer's peak: nothing else held
        with rasterio.Env(GDAL_CACHEMAX=CROWN_MASK_CACHE_MB), atomic_path(path) as tmp:
            rasterio.shutil.copy(stage, tmp, driver="COG", compress="DEFLATE", predictor="2", blocksize=512,
                                 overview_resampling="nearest", num_threads=1, BIGTIFF="IF_SAFER")
    finally:
        stage.unlink(missing_ok=True)
    return path


def _bounds_index(src: Any) -> shapely.STRtree | None:
    """STRtree of the crowns' bounding boxes (the polygons stay where they are)."""
    return shapely.STRtree(shapely.box(*src.bounds.T)) if len(src) else None


def _crowns_in(tree: shapely.STRtree, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Indices, ascending, of the crowns whose boxes touch the ``shape`` (rows, cols) window at ``transform``
    (ascending: rasterised in that order, later crowns cover earlier ones as in one whole-image pass)."""
    (x0, y0), (x1, y1) = transform @ (0, 0), transform @ (shape[1], shape[0])
    window = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    return np.sort(tree.query(window, predicate="intersects"))


def _draw_outlines(img: np.ndarray, src: Any, colour_of: np.ndarray, transform: Affine,
                   strip_px: int, width_px: int = 1) -> None:
    """Colour, in ``img`` [h, w, 3], every crown pixel within ``width_px`` pixels (along a row or column) of
    a pixel of another label (all-touched rasterisation; crown i is label i + 1 and later crowns cover
    earlier ones); ``colour_of`` [n + 1, 3]. Outlines lie inside the crowns."""
    h, w = img.shape[:2]
    tree = _bounds_index(src)
    for r0 in range(0, h, strip_px):
        r1 = min(h, r0 + strip_px)
        # a halo of width_px rows: outlines on strip edges as in one piece
        a0, a1 = max(0, r0 - width_px), min(h, r1 + width_px)
        st = transform @ Affine.translation(0, a0)
        hits = _crowns_in(tree, st, (a1 - a0, w))
        if not hits.size:
            continue
        labels = np.zeros((a1 - a0, w), dtype=np.int32)
        for start in range(0, hits.size, 2000):  # GDAL's input is built as Python objects: in chunks
            part = hits[start:start + 2000]
            rasterio.features.rasterize(zip(src.geometries(part), part + 1, strict=True), out=labels,
                                        transform=st, all_touched=True)
        edge = np.zeros(labels.shape, dtype=bool)
        for d in range(1, width_px + 1):
            edge[d:] |= labels[d:] != labels[:-d]
            edge[:-d] |= labels[:-d] != labels[d:]
            edge[:, d:] |= labels[:, d:] != labels[:, :-d]
            edge[:, :-d] |= labels[:, :-d] != labels[:, d:]
        edge &= labels > 0
        rows = slice(r0 - a0, r1 - a0)
        inner = edge[rows]
        img[r0:r1][inner] = colour_of[labels[rows][inner]]


def _font(size_px: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size_px`` (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size_px)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _resample(rgb: np.ndarray, valid: np.ndarray, transform: Affine, min_px: int, max_px: int | None
              ) -> tuple[np.ndarray, np.ndarray, Affine]:
    """[h, w, 3] picture (white where invalid) of ``rgb`` [3, h, w] and its transform. Without ``max_px``
    (the georeferenced quicklook): enlarged by a whole factor to at least ``min_px`` on its longest edge
    (smooth bicubic, so a small input does not turn into blocks; crown outlines drawn afterwards stay one or
    two pixels wide, not k). With ``max_px`` (the report's picture): fitted to ``max_px`` on its longest
    edge (Lanczos when shrinking; bicubic, at most 4x, when enlarging)."""
    h, w = valid.shape
    img = np.where(valid[..., None], rgb.transpose(1, 2, 0), np.uint8(255)).astype(np.uint8, copy=False)
    k = max(1, min_px // max(h, w, 1))
    if max_px is not None and max(h, w) != max_px:
        f = max(h, w) / max_px
        f = max(f, 0.25)
        size = (max(1, round(w / f)), max(1, round(h / f)))
        method = Image.Resampling.LANCZOS if f > 1 else Image.Resampling.BICUBIC
    elif max_px is None and k > 1:
        size, method = (w * k, h * k), Image.Resampling.BICUBIC
    else:
        return img, valid, transform
    img = np.asarray(Image.fromarray(img).resize(size, method))
    valid = np.asarray(Image.fromarray(valid).resize(size, Image.Resampling.NEAREST))
    img = np.where(valid[..., None], img, np.uint8(255)).astype(np.uint8)
    return img, valid, transform @ Affine.scale(w / size[0], h / size[1])


def _nice_length(max_m: float) -> float:
    """The largest 1, 2 or 5 x 10^k metres not above ``max_m``."""
    mag = 10 ** math.floor(math.log10(max(max_m, 1e-9)))
    return max(m * mag for m in (1, 2, 5) if m * mag <= max_m + 1e-12)


def _decorate(img: np.ndarray, pixel_m: float, legend: list[tuple[str, tuple[int, int, int], int]]) -> None:
    """Draw, in place on ``img`` [h, w, 3], a scale bar (bottom left, ``pixel_m`` metres a pixel), a north
    arrow (bottom right) and the species legend (top right: outline colour, name, number of crowns)."""
    h, w = img.shape[:2]
    size = int(np.clip(min(h, w) / 45, 11, 22))
    font, pad = _font(size), max(3, size // 3)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas, "RGBA")
    # scale bar: about a fifth of the width, two halves black and white
    bar_m = _nice_length(0.22 * w * pixel_m)
    bar_px = max(2, round(bar_m / pixel_m))
    x0, y1 = 2 * pad, h - 2 * pad
    label = f"{bar_m:g} m"
    tw = draw.textlength(label, font=font)
    draw.rectangle([x0 - pad, y1 - size - 2 * pad - 8, x0 + max(bar_px, tw) + pad, y1 + pad],
                   fill=(255, 255, 255, 200))
    half = bar_px // 2
    draw.rectangle([x0, y1 - 6, x0 + half, y1], fill=(0, 0, 0, 255))
    draw.rectangle([x0 + half, y1 - 6, x0 + bar_px, y1], fill=(255, 255, 255, 255), outline=(0, 0, 0, 255))
    draw.text((x0, y1 - 8 - pad), label, fill=(0, 0, 0, 255), font=font, anchor="ld")
    # north arrow
    ax, ay = w - 2 * pad - size // 2, h - 2 * pad
    draw.rectangle([ax - size // 2 - pad, ay - 2 * size - 2 * pad, ax + size // 2 + pad, ay + pad],
                   fill=(255, 255, 255, 200))
    draw.polygon([(ax, ay - 2 * size), (ax - size // 2, ay - size), (ax + size // 2, ay - size)],
                 fill=(0, 0, 0, 255))
    draw.text((ax, ay), "N", fill=(0, 0, 0, 255), font=font, anchor="md")
    if not legend:
        img[...] = np.asarray(canvas)
        return
    shown = legend[:12]
    lines = [(f"{name} ({n:,})", colour) for name, colour, n in shown]
    if len(legend) > len(shown):
        lines.append((f"+ {len(legend) - len(shown)} more species", (255, 255, 255)))
    title = "crown outlines by species"
    width = max(draw.textlength(t, font=font) for t in [title] + [t for t, _ in lines]) + size + 3 * pad
    row = size + pad
    height = row * (len(lines) + 1) + 2 * pad
    lx = max(0, w - width - 2 * pad)
    draw.rectangle([lx, 2 * pad, lx + width, 2 * pad + height], fill=(255, 255, 255, 215))
    draw.text((lx + pad, 3 * pad), title, fill=(0, 0, 0, 255), font=font, anchor="lt")
    for i, (text, colour) in enumerate(lines, start=1):
        y = 3 * pad + i * row
        draw.rectangle([lx + pad, y + 1, lx + pad + size - 2, y + size - 2], outline=(*colour, 255),
                       width=max(2, size // 6), fill=(*colour, 60))
        draw.text((lx + 2 * pad + size, y), text, fill=(0, 0, 0, 255), font=font, anchor="lt")
    img[...] = np.asarray(canvas)


def _crown_picture(rgb: np.ndarray, valid: np.ndarray, transform: Affine, crowns: Any, min_px: int,
                   max_px: int | None, strip_px: int) -> tuple[np.ndarray, Affine]:
    """The quicklook picture: ortho (``_resample``), crown outlines by species, legend and scale bar."""
    img, valid, transform = _resample(rgb, valid, transform, min_px, max_px)
    enlarged = max(valid.shape) >= 1.9 * max(rgb.shape[1:])  # outlines 2 px wide on an enlarged picture
    del rgb, valid
    src = crown_source(crowns)
    legend: list[tuple[str, tuple[int, int, int], int]] = []
    if len(src):
        species = list(src.table["species"]) if "species" in src.columns else ["unknown"] * len(src)
        colours = species_colours(species)
        names = sorted(colours)
        code = {n: i + 1 for i, n in enumerate(names)}
        palette = np.array([(0, 0, 0)] + [colours[n] for n in names], dtype=np.uint8)
        colour_of = palette[np.array([0] + [code[s] for s in species], dtype=np.int64)]  # by label
        _draw_outlines(img, src, colour_of, transform, strip_px, width_px=2 if enlarged else 1)
        counts = pd.Series(species).value_counts()
        legend = [(str(name), colours[name], int(n)) for name, n in counts.items()]
    _decorate(img, math.sqrt(abs(transform.determinant)), legend)
    return img, transform


def write_quicklook(path: str | os.PathLike, rgb: np.ndarray, valid: np.ndarray, transform: Affine,
                    crs: CRS | str, crowns: Any, min_px: int = 1024, strip_px: int = 256) -> Path:
    """PNG of the ortho (``rgb`` [3, h, w] uint8 on ``transform``, the input's resolution or coarser) with
    crown outlines coloured by species, a legend of the species (top right), a scale bar and a north arrow
    (bottom), plus a world file (.wld) and a .png.aux.xml carrying the CRS so GIS places it. A picture
    smaller than ``min_px`` is enlarged by a whole factor (bicubic) so outlines stay thin.

    Outlines are drawn in strips of ``strip_px`` rows (one-row halo), so the label raster behind them is a
    strip, not the whole picture."""
    path = Path(path)
    img, transform = _crown_picture(rgb, valid, transform, crowns, min_px, None, strip_px)
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    wld = "\n".join(f"{v:.10f}" for v in (a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2)) + "\n"
    aux = f"<PAMDataset>\n  <SRS>{escape(CRS.from_user_input(crs).to_wkt())}</SRS>\n</PAMDataset>\n"
    aux_path = path.with_name(path.name + ".aux.xml")
    with atomic_path(path.with_suffix(".wld")) as tmp_wld, atomic_path(aux_path) as tmp_aux, \
            atomic_path(path) as tmp_png:
        Image.fromarray(img).save(tmp_png, format="PNG", compress_level=1)
        tmp_wld.write_text(wld)
        tmp_aux.write_text(aux)
    return path


def crown_map_image(rgb: np.ndarray, valid: np.ndarray, transform: Affine, crowns: Any, max_px: int = 960,
                    strip_px: int = 256) -> dict[str, Any]:
    """The quicklook's picture (same ortho, outlines, legend, scale bar) fitted to ``max_px`` on its longest
    edge (at most 4x enlarged), as JPEG for the report:
    ``{"data": bytes, "mime": "image/jpeg", "width", "height", "pixel_m"}``."""
    img, transform = _crown_picture(rgb, valid, transform, crowns, max_px, max_px, strip_px)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=88, subsampling=0, optimize=True)
    return {"data": buf.getvalue(), "mime": "image/jpeg", "width": int(img.shape[1]),
            "height": int(img.shape[0]), "pixel_m": float(math.sqrt(abs(transform.determinant)))}


def write_summary_json(path: str | os.PathLike, summary: dict) -> Path:
    """summary.json (indented, UTF-8; NaN written as null)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean(summary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)
