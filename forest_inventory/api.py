"""The notebook API: an inventory in one call, its crowns as a GeoDataFrame, a picture in another.

    import forest_inventory as fi
    inv = fi.inventory("ortho.tif", out="out/site1", n_draws=10000)
    inv.crowns.head(); inv.summary["co2e_t"]; fi.plot_crowns(inv, by="species")

``inventory`` runs the same engine as ``forest-inventory run`` (``pipeline.inventory.run_inventory``) with the
same options (``pipeline.options``: keyword arguments, or a TOML file with ``config=``), so the files in
``out`` are those of the CLI. ``plot_crowns`` draws with Pillow (a core dependency; no matplotlib needed) and
returns a ``PIL.Image`` that a notebook shows inline.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

#: colours of the numeric scale, low to high (a dark-blue to yellow ramp)
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


@dataclass
class Inventory:
    """One inventory: ``crowns`` (GeoDataFrame, one row per tree, working CRS of the image: species,
    height_m, dbh_cm, agb_kg, co2e_kg and the rest of crowns.csv), ``summary`` (summary.json as a dict),
    ``out_dir`` (where the files are) and the options of the run."""

    crowns: Any
    summary: dict[str, Any]
    out_dir: Path
    options: dict[str, Any] = field(default_factory=dict)

    def plot(self, by: str = "species", **kwargs: Any):
        """``plot_crowns(self, by=by, ...)``."""
        return plot_crowns(self, by=by, **kwargs)

    def _repr_html_(self) -> str:  # pragma: no cover - notebook display
        s = self.summary
        ci = s.get("co2e_t_ci90") or [float("nan")] * 2
        return (f"<b>Inventory of {Path(str(s.get('input', ''))).name}</b>: {s.get('n_trees', 0):,} trees, "
                f"{s.get('co2e_t', float('nan')):.2f} t CO2e (90% CI {ci[0]:.2f} to {ci[1]:.2f}) in "
                f"{self.out_dir}")


def inventory(ortho: str | os.PathLike, out: str | os.PathLike | None = None, *,
              config: str | os.PathLike | None = None, progress: Any = None, **options: Any) -> Inventory:
    """Inventory one orthomosaic and load the result: crowns as a GeoDataFrame and the summary.

    ``out``: output folder (default ``out/<image stem>``). ``config``: a TOML options file (as ``run
    --config``); ``options``: run options by key (``n_draws=10000``, ``ecozone="boreal"``, ``chm=...``,
    ``threads=2``; see ``forest-inventory config --print-defaults``), overriding the file. Unknown keys and
    bad values raise ``InputError`` before any work."""
    from pipeline.inventory import run_inventory
    from pipeline.options import check_options, load_config_file, make_config

    values = load_config_file(config) if config is not None else {}
    values.update(check_options(options, "inventory() arguments"))
    values["ortho"] = Path(ortho)
    if out is not None or "out_dir" not in values:
        values["out_dir"] = Path(out) if out is not None else Path("out") / Path(ortho).stem
    cfg = make_config(values)
    run_inventory(cfg, progress=progress)
    result = load_inventory(cfg.out_dir)
    result.options = values
    return result


def load_inventory(out_dir: str | os.PathLike) -> Inventory:
    """An earlier run's outputs as an ``Inventory`` (inventory.gpkg layer ``crowns``, summary.json)."""
    import pyogrio

    out = Path(out_dir)
    gpkg, summary = out / "inventory.gpkg", out / "summary.json"
    if not gpkg.is_file() or not summary.is_file():
        raise InputError(f"{out}: no inventory here (inventory.gpkg and summary.json missing); run "
                         "forest_inventory.inventory(ortho, out=...) first")
    crowns = pyogrio.read_dataframe(gpkg, layer="crowns")
    return Inventory(crowns=crowns, summary=json.loads(summary.read_text()), out_dir=out)


def _ramp(t: float) -> tuple[int, int, int]:
    """Colour of ``t`` in [0, 1] on the numeric ramp (linear between the anchors)."""
    t = min(max(t, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1], strict=True))


def _category_colours(names: list[str]) -> dict[str, tuple[int, int, int]]:
    """Distinct colours per category (golden-ratio hues); "unknown" is grey."""
    colours = {}
    for i, name in enumerate(sorted(set(names))):
        if name in ("unknown", "", "none"):
            colours[name] = (160, 160, 160)
            continue
        r, g, b = colorsys.hsv_to_rgb((0.11 + i * 0.618034) % 1.0, 0.75, 1.0)
        colours[name] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def plot_crowns(result: Inventory | str | os.PathLike, by: str = "species", *,
                ortho: str | os.PathLike | None = None, max_px: int = 1024, width_px: int = 2,
                path: str | os.PathLike | None = None):
    """Crown outlines over the image, coloured by ``by``: a text column (``species``: one colour each) or a
    numeric one (``co2e_kg``, ``height_m``...: a ramp from its 2nd to 98th percentile), with a legend.

    ``result``: an ``Inventory`` or its output folder. ``ortho``: the image (default: the run's input).
    Returns a ``PIL.Image.Image`` (longest edge ``max_px``); saved to ``path`` when given."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pipeline.raster import open_ortho

    inv = result if isinstance(result, Inventory) else load_inventory(result)
    crowns = inv.crowns
    if by not in crowns.columns:
        raise InputError(f"plot_crowns: no column {by!r} in the crowns; use one of "
                         f"{', '.join(c for c in crowns.columns if c != 'geometry')}")
    image_path = Path(ortho) if ortho is not None else Path(str(inv.summary.get("input", "")))
    if not image_path.is_file():
        raise InputError(f"{image_path}: image not found; pass plot_crowns(..., ortho=PATH)")
    bands = inv.summary.get("bands")
    crs = inv.options.get("crs")
    with open_ortho(image_path, bands=tuple(bands) if bands else None, crs=crs) as img:
        rgb, valid, transform = img.read_decimated(max_px)
        image_crs = img.crs
    canvas = Image.fromarray(np.moveaxis(np.where(valid, rgb, 255).astype(np.uint8), 0, -1), "RGB")
    if crowns.crs is not None and len(crowns):
        crowns = crowns.to_crs(image_crs)
    inverse = ~transform
    values = crowns[by]
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric:
        finite = values.to_numpy(dtype=float)
        finite = finite[np.isfinite(finite)]
        lo, hi = (np.percentile(finite, [2, 98]) if len(finite) else (0.0, 1.0))
        span = (hi - lo) or 1.0
        colour_of = {i: _ramp((float(v) - lo) / span) if np.isfinite(v) else (160, 160, 160)
                     for i, v in zip(crowns.index, values.to_numpy(dtype=float), strict=True)}
    else:
        palette = _category_colours([str(v) for v in values])
        colour_of = {i: palette[str(v)] for i, v in zip(crowns.index, values, strict=True)}
    draw = ImageDraw.Draw(canvas)
    for i, geom in zip(crowns.index, crowns.geometry, strict=True):
        if geom is None or geom.is_empty:
            continue
        for poly in getattr(geom, "geoms", [geom]):
            coords = np.asarray(poly.exterior.coords)[:, :2]
            cols = inverse.a * coords[:, 0] + inverse.b * coords[:, 1] + inverse.c
            rows = inverse.d * coords[:, 0] + inverse.e * coords[:, 1] + inverse.f
            xy = list(zip(cols.tolist(), rows.tolist(), strict=True))
            draw.line(xy + xy[:1], fill=colour_of[i], width=width_px)
    legend = ([(f"{by} {lo:.3g}", _ramp(0.0)), (f"{by} {hi:.3g}", _ramp(1.0))] if numeric
              else sorted(palette.items()))
    y = 4
    for label, colour in legend[:12]:
        draw.rectangle((4, y, 14, y + 10), fill=colour, outline=(0, 0, 0))
        draw.text((18, y - 1), str(label), fill=(0, 0, 0), stroke_width=2, stroke_fill=(255, 255, 255))
        y += 14
    if path is not None:
        canvas.save(path)
    return canvas
