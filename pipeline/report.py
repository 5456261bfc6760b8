"""Self-contained HTML report (``report.html``): summary, standards, equations and inline SVG charts.

No scripts, fonts, images or style sheets are loaded from anywhere: the file works offline and can be
archived with the inventory (the one picture, the crown map, is inline as a ``data:`` URI). Sections: headline
cards; models and their accuracy (names, versions, compression, the validation scores from the model
metadata, and a caveat when the crown model's pooled validation F1@0.4 is under
``pipeline.summary.CROWN_F1_CAVEAT``); the crown map (crowns over the orthomosaic, legend, scale bar); what
the interval includes; the standards; charts (species composition, height and diameter distributions, AGB
per hectare map of the grid cells, CO2e intervals); totals by plot (named by ``plot_id``), species and cell;
allometric sensitivity; equations and sources.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path
from pipeline.summary import CROWN_F1_CAVEAT, gsd_note

PALETTE = ["#2a6f4e", "#d08c2e", "#4f7cac", "#a44a3f", "#7d5ba6", "#5c9e9a", "#c2b04b", "#8a8a8a",
           "#b5651d", "#3b5b7a"]
# 9-step sequential ramp (light yellow to dark green) for the AGB map
RAMP = ["#ffffe5", "#f7fcb9", "#d9f0a3", "#addd8e", "#78c679", "#41ab5d", "#238443", "#006837", "#004529"]

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2a24;
background:#f6f7f4}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:2px solid #2a6f4e;
padding-bottom:4px}
.meta{color:#5a6760;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #dde3dc;border-radius:8px;padding:12px 16px;min-width:150px}
.card b{display:block;font-size:1.35em}.card span{color:#5a6760;font-size:.85em}
table{border-collapse:collapse;background:#fff;font-size:.88em;margin:8px 0;width:100%}
th,td{border:1px solid #dde3dc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2ec}td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:16px}
figure{background:#fff;border:1px solid #dde3dc;border-radius:8px;margin:0;padding:8px}
figcaption{font-size:.85em;color:#5a6760;margin-top:4px;max-width:480px}
.note{background:#fff8e6;border-left:4px solid #d08c2e;padding:8px 12px;font-size:.9em}
.warn{background:#fde8e6;border-left:4px solid #b3261e;padding:8px 12px;font-weight:600}
.map img{display:block;max-width:min(100%,760px);height:auto}
code{font-size:.9em;word-break:break-all}
svg text{font-family:inherit}
"""


# --------------------------------------------------------------------------------------------- helpers
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 1) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if not math.isfinite(v):
        return "–"
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}" class="chart">'
            f"<title>{_e(label)}</title>{body}</svg>")


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


# ---------------------------------------------------------------------------------------------- charts
def species_chart(names: Sequence[str], n_trees: Sequence[float], agb_t: Sequence[float]) -> str:
    """Horizontal bars: share of trees and of AGB per species."""
    names = list(names)[:12]
    n_trees = np.asarray(n_trees, dtype=float)[: len(names)]
    agb_t = np.asarray(agb_t, dtype=float)[: len(names)]
    tn, ta = max(n_trees.sum(), 1e-12), max(agb_t.sum(), 1e-12)
    w, left, bar_w = 480, 170, 260
    row = 26
    h = 40 + row * max(len(names), 1)
    parts = [f'<text x="{left}" y="16" font-size="11" fill="#1d2a24">share of trees '
             f'<tspan fill="{PALETTE[0]}">■</tspan> and of AGB <tspan fill="{PALETTE[1]}">■</tspan></text>']
    for i, name in enumerate(names):
        y = 28 + i * row
        pt, pa = n_trees[i] / tn, agb_t[i] / ta
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end" '
                     f'font-style="italic">{_e(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{bar_w * pt:.1f}" height="9" fill="{PALETTE[0]}"/>')
        parts.append(f'<rect x="{left}" y="{y + 10}" width="{bar_w * pa:.1f}" height="9" '
                     f'fill="{PALETTE[1]}"/>')
        parts.append(f'<text x="{left + bar_w * max(pt, pa) + 4:.1f}" y="{y + 14}" font-size="10">'
                     f"{pt * 100:.0f}% / {pa * 100:.0f}%</text>")
    if not names:
        parts.append(f'<text x="{left}" y="40" font-size="12">no trees</text>')
    return _svg(w, h, "".join(parts), "Species composition: share of trees and of AGB")


def histogram_chart(values: np.ndarray, label: str, unit: str, split: np.ndarray | None = None,
                    split_names: tuple[str, str] = ("", ""), bins: int = 20) -> str:
    """Histogram; ``split`` (bool per value) stacks two series (e.g. CHM vs allometric heights)."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    w, h, ml, mb, mt, mr = 480, 270, 48, 40, 34, 12
    pw, ph = w - ml - mr, h - mt - mb
    parts = []
    if not ok.any():
        parts.append(f'<text x="{ml}" y="{mt + 20}" font-size="12">no values</text>')
        return _svg(w, h, "".join(parts), f"{label} distribution")
    lo, hi = float(v[ok].min()), float(v[ok].max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    s = np.zeros(v.shape, dtype=bool) if split is None else np.asarray(split, dtype=bool)
    c1, _ = np.histogram(v[ok & ~s], edges)
    c2, _ = np.histogram(v[ok & s], edges)
    top = max(int((c1 + c2).max()), 1)
    bw = pw / bins
    for i in range(bins):
        x = ml + i * bw
        h1, h2 = ph * c1[i] / top, ph * c2[i] / top
        parts.append(f'<rect x="{x + 0.5:.1f}" y="{mt + ph - h1:.1f}" width="{bw - 1:.1f}" height="{h1:.1f}" '
                     f'fill="{PALETTE[2]}"/>')
        if h2 > 0:
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{mt + ph - h1 - h2:.1f}" width="{bw - 1:.1f}" '
                         f'height="{h2:.1f}" fill="{PALETTE[1]}"/>')
    parts.append(_axes(ml, mt, pw, ph, lo, hi, 0, top, f"{label} ({unit})", "trees"))
    if split is not None and s.any():
        parts.append(f'<text x="{ml + 8}" y="{mt - 14}" font-size="10"><tspan fill="{PALETTE[2]}">■</tspan> '
                     f'{_e(split_names[0])} <tspan fill="{PALETTE[1]}">■</tspan> {_e(split_names[1])}</text>')
    return _svg(w, h, "".join(parts), f"{label} distribution")


def _axes(ml: float, mt: float, pw: float, ph: float, x0: float, x1: float, y0: float, y1: float,
          xlabel: str, ylabel: str) -> str:
    parts = [f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#444"/>',
             f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#444"/>']
    for t in _nice_ticks(x0, x1):
        x = ml + (t - x0) / (x1 - x0) * pw
        parts.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#444"/>'
                     f'<text x="{x:.1f}" y="{mt + ph + 16}" font-size="10" text-anchor="middle">'
                     f"{t:g}</text>")
    for t in _nice_ticks(y0, y1, 4):
        y = mt + ph - (t - y0) / (y1 - y0) * ph
        parts.append(f'<text x="{ml - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{mt + ph + 32}" font-size="11" text-anchor="middle">'
                 f"{_e(xlabel)}</text>")
    parts.append(f'<text x="12" y="{mt + ph / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {mt + ph / 2})">{_e(ylabel)}</text>')
    return "".join(parts)


def agb_map_chart(cells: pd.DataFrame) -> str:
    """Map of AGB density (t/ha) per grid cell; ``cells`` has minx, miny, maxx, maxy, agb_t_per_ha."""
    w = 480
    parts = []
    if cells is None or not len(cells):
        parts.append('<text x="20" y="40" font-size="12">no grid cells</text>')
        return _svg(w, 80, "".join(parts), "AGB per hectare map")
    minx, miny = float(cells["minx"].min()), float(cells["miny"].min())
    maxx, maxy = float(cells["maxx"].max()), float(cells["maxy"].max())
    span = max(maxx - minx, maxy - miny, 1e-9)
    size = 340
    scale = min(size / max(maxx - minx, 1e-9), size / max(maxy - miny, 1e-9))
    ox, oy = 20, 20
    map_h = (maxy - miny) * scale
    h = int(oy + max(map_h, len(RAMP) * 22 + 24) + 44)
    vals = cells["agb_t_per_ha"].to_numpy(dtype=float)
    vmax = float(np.nanmax(vals)) if np.isfinite(vals).any() and np.nanmax(vals) > 0 else 1.0
    for _, c in cells.iterrows():
        x = ox + (c["minx"] - minx) * scale
        y = oy + (maxy - c["maxy"]) * scale
        cw, ch = (c["maxx"] - c["minx"]) * scale, (c["maxy"] - c["miny"]) * scale
        v = c["agb_t_per_ha"]
        k = 0 if not np.isfinite(v) else min(int(v / vmax * (len(RAMP) - 1) + 0.5), len(RAMP) - 1)
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw:.1f}" height="{ch:.1f}" fill="{RAMP[k]}" '
                     f'stroke="#ffffff" stroke-width="0.5"><title>cell {_e(c.get("cell_id", ""))}: '
                     f"{_fmt(v)} t/ha</title></rect>")
    # legend
    lx = ox + size + 30
    for i, col in enumerate(reversed(RAMP)):
        parts.append(f'<rect x="{lx}" y="{oy + i * 22}" width="18" height="22" fill="{col}"/>')
    parts.append(f'<text x="{lx + 24}" y="{oy + 10}" font-size="10">{_fmt(vmax)}</text>')
    parts.append(f'<text x="{lx + 24}" y="{oy + len(RAMP) * 22}" font-size="10">0</text>')
    parts.append(f'<text x="{lx}" y="{oy + len(RAMP) * 22 + 20}" font-size="10">t AGB/ha</text>')
    # scale bar
    target = span / 3
    mag = 10 ** math.floor(math.log10(target))
    bar_m = max(m * mag for m in (1, 2, 5) if m * mag <= target)
    yb = oy + map_h + 20
    parts.append(f'<line x1="{ox}" y1="{yb:.1f}" x2="{ox + bar_m * scale:.1f}" y2="{yb:.1f}" '
                 f'stroke="#1d2a24" stroke-width="3"/><text x="{ox}" y="{yb + 16:.1f}" font-size="10">'
                 f"{bar_m:g} m</text>")
    parts.append(f'<text x="{ox + (maxx - minx) * scale:.1f}" y="{yb + 16:.1f}" font-size="11" '
                 f'text-anchor="end">N ↑</text>')
    return _svg(w, h, "".join(parts), "AGB per hectare map")


def interval_chart(labels: Sequence[str], mean: Sequence[float], lo90: Sequence[float], hi90: Sequence[float],
                   lo95: Sequence[float], hi95: Sequence[float], unit: str = "t CO2e") -> str:
    """Dot-and-whisker plot: mean with 90% (thick) and 95% (thin) intervals per row."""
    labels = list(labels)
    arr = [np.asarray(a, dtype=float) for a in (mean, lo90, hi90, lo95, hi95)]
    n = len(labels)
    w, ml, mr, mt, row = 480, 170, 20, 20, 24
    h = mt + row * max(n, 1) + 44
    pw = w - ml - mr
    parts = []
    if n == 0:
        return _svg(w, h, '<text x="20" y="40" font-size="12">no estimates</text>', "Interval plot")
    hi = float(np.nanmax(arr[4])) if np.isfinite(arr[4]).any() else 1.0
    hi = hi if hi > 0 else 1.0
    sx = pw / hi
    for t in _nice_ticks(0, hi):
        x = ml + t * sx
        parts.append(f'<line x1="{x:.1f}" y1="{mt - 4}" x2="{x:.1f}" y2="{mt + row * n}" stroke="#e3e7e1"/>'
                     f'<text x="{x:.1f}" y="{mt + row * n + 14}" font-size="10" '
                     f'text-anchor="middle">{t:g}</text>')
    for i, lab in enumerate(labels):
        y = mt + i * row + row / 2
        m, a, b, c, d = (x[i] for x in arr)
        parts.append(f'<text x="{ml - 6}" y="{y + 4}" font-size="11" text-anchor="end">{_e(lab)}</text>')
        if np.isfinite(c) and np.isfinite(d):
            parts.append(f'<line x1="{ml + c * sx:.1f}" y1="{y}" x2="{ml + d * sx:.1f}" y2="{y}" '
                         f'stroke="{PALETTE[2]}" stroke-width="1.5"/>')
        if np.isfinite(a) and np.isfinite(b):
            parts.append(f'<line x1="{ml + a * sx:.1f}" y1="{y}" x2="{ml + b * sx:.1f}" y2="{y}" '
                         f'stroke="{PALETTE[0]}" stroke-width="5"/>')
        if np.isfinite(m):
            parts.append(f'<circle cx="{ml + m * sx:.1f}" cy="{y}" r="4" fill="#fff" stroke="#1d2a24"/>')
    parts.append(f'<text x="{ml + pw / 2}" y="{mt + row * n + 32}" font-size="11" text-anchor="middle">'
                 f"{_e(unit)}: mean ○, 90% interval (thick), 95% interval (thin)</text>")
    return _svg(w, h, "".join(parts), "Interval plot of the CO2e estimates")


# ------------------------------------------------------------------------------------------ the report
def _is_count(column: str) -> bool:
    """Columns that hold counts (printed without decimals even when stored as floats)."""
    return column == "n_trees" or column.startswith("n_") or column in ("cell", "cell_id", "plot_index")


def _table(frame: pd.DataFrame, columns: Sequence[tuple[str, str]], max_rows: int = 50) -> str:
    cols = [(c, t) for c, t in columns if c in frame.columns]
    head = "".join(f"<th>{_e(t)}</th>" for _, t in cols)
    rows = []
    for _, r in frame.head(max_rows).iterrows():
        cells = []
        for c, _ in cols:
            v = r[c]
            num = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
            digits = 0 if isinstance(v, int | np.integer) or _is_count(c) else 1
            cells.append(f'<td class="n">{_fmt(v, digits)}</td>' if num
                         else f"<td>{_e(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (f'<p class="meta">{len(frame) - max_rows} more rows in inventory.gpkg.</p>'
            if len(frame) > max_rows else "")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


GROUP_COLUMNS = [("n_trees", "trees"), ("agb_t", "AGB t"), ("agb_t_sd", "AGB SD t"), ("co2e_t", "CO2e t"),
                 ("co2e_t_ci90_low", "90% low"), ("co2e_t_ci90_high", "90% high"),
                 ("co2e_t_ci95_low", "95% low"), ("co2e_t_ci95_high", "95% high"),
                 ("co2e_halfwidth90_pct", "HW90 %")]


def _cells_frame(groups: dict, grid, trees: pd.DataFrame, cell_m: float) -> pd.DataFrame | None:
    """Cell rectangles with AGB t/ha from the grid (preferred) or from binned tree positions."""
    table = groups.get("cell") if groups else None
    if grid is not None and len(grid):
        b = grid.geometry.bounds
        cells = pd.DataFrame({"cell_id": grid["cell_id"].to_numpy() if "cell_id" in grid.columns
                              else np.arange(len(grid)), "minx": b["minx"].to_numpy(),
                              "miny": b["miny"].to_numpy(), "maxx": b["maxx"].to_numpy(),
                              "maxy": b["maxy"].to_numpy()})
        area = (grid["area_ha"].to_numpy() if "area_ha" in grid.columns
                else grid.geometry.area.to_numpy() / 1e4)
        agb = np.zeros(len(cells))
        if table is not None and len(table):
            agb = pd.Series(table["agb_t"]).reindex(cells["cell_id"]).fillna(0).to_numpy()
        elif "agb_t" in grid.columns:
            agb = grid["agb_t"].fillna(0).to_numpy()
        cells["agb_t_per_ha"] = np.where(area > 0, agb / np.maximum(area, 1e-12), np.nan)
        return cells
    xy = _tree_xy(trees)
    if xy is None or not len(trees) or "agb_kg" not in trees.columns:
        return None
    x, y = xy
    x0, y0 = math.floor(np.nanmin(x) / cell_m) * cell_m, math.floor(np.nanmin(y) / cell_m) * cell_m
    ci = np.floor((x - x0) / cell_m).astype(int)
    ri = np.floor((y - y0) / cell_m).astype(int)
    frame = pd.DataFrame({"c": ci, "r": ri, "agb": trees["agb_kg"].to_numpy() / 1000.0})
    agg = frame.groupby(["c", "r"])["agb"].sum().reset_index()
    return pd.DataFrame({"cell_id": np.arange(len(agg)), "minx": x0 + agg["c"] * cell_m,
                         "maxx": x0 + (agg["c"] + 1) * cell_m, "miny": y0 + agg["r"] * cell_m,
                         "maxy": y0 + (agg["r"] + 1) * cell_m,
                         "agb_t_per_ha": agg["agb"] / (cell_m * cell_m / 1e4)})


def _tree_xy(trees: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    if {"x", "y"} <= set(trees.columns):
        return trees["x"].to_numpy(dtype=float), trees["y"].to_numpy(dtype=float)
    geom = getattr(trees, "geometry", None)
    if geom is not None and len(trees):
        c = geom.centroid
        return c.x.to_numpy(), c.y.to_numpy()
    return None


def _factors_section(trees: pd.DataFrame, carbon: Any) -> str:
    from pipeline.carbon.allometry import EQUATIONS
    from pipeline.carbon.wood_density import SOURCES

    factors = getattr(carbon, "factors", None) or {}
    rows = [(name, f, s) for name, (f, s) in EQUATIONS.items()]
    eq = "".join(f"<tr><td>{_e(n)}</td><td>{_e(f)}</td><td>{_e(s)}</td></tr>" for n, f, s in rows)
    parts = [f"<table><tr><th>step</th><th>equation</th><th>source</th></tr>{eq}</table>"]
    used = []
    if "agb_model" in trees.columns and len(trees):
        used.append(("AGB model", ", ".join(sorted(map(str, trees["agb_model"].unique())))))
    if "dbh_model" in trees.columns and len(trees):
        used.append(("DBH model (coefficient set)", ", ".join(sorted(map(str, trees["dbh_model"].unique())))))
    for col, label in (("root_shoot_ratio", "root-to-shoot ratio R"),
                       ("carbon_fraction", "carbon fraction CF")):
        if col in trees.columns and len(trees):
            used.append((label, ", ".join(f"{v:g}" for v in sorted(trees[col].unique()))))
    for key, label in (("root_shoot_class", "R class"), ("root_shoot_source", "R source"),
                       ("root_shoot_rel_sd", "R relative SD (Monte Carlo)"),
                       ("carbon_fraction_source", "CF source"), ("carbon_fraction_sd", "CF SD (Monte Carlo)"),
                       ("height_diameter_model", "height-diameter model (trees without CHM)"),
                       ("jucker_biome", "Jucker biome"), ("wood_density_table", "wood density table"),
                       ("parameter_error_note", "allometric parameter error")):
        if key in factors:
            used.append((label, factors[key]))
    if "wood_density_level" in trees.columns and len(trees):
        counts = trees["wood_density_level"].value_counts()
        used.append(("wood density level (trees)", ", ".join(f"{k}: {v}" for k, v in counts.items())))
    if "height_source" in trees.columns and len(trees):
        counts = trees["height_source"].value_counts()
        used.append(("height source (trees)", ", ".join(f"{k}: {v}" for k, v in counts.items())))
    used.append(("CO2e per C", "44/12"))
    parts.append("<table><tr><th>factor</th><th>value used</th></tr>"
                 + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in used) + "</table>")
    src = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in SOURCES.items())
    parts.append(f"<table><tr><th>wood density source key</th><th>reference</th></tr>{src}</table>")
    return "".join(parts)


def _interval_section(summary: dict, carbon: Any) -> str:
    """'What this interval includes and what it does not', and the models used (names, versions, sha256)."""
    unc = dict(getattr(carbon, "uncertainty", None) or (summary.get("carbon") or {}).get("uncertainty") or {})
    inc = unc.get("includes") or []
    exc = unc.get("excludes") or []
    det = unc.get("detection") or summary.get("detection_error") or {}
    parts = ["<p>Included in the Monte Carlo interval:</p><ul>"
             + "".join(f"<li>{_e(x)}</li>" for x in inc) + "</ul>" if inc else "",
             "<p>Not included:</p><ul>" + "".join(f"<li>{_e(x)}</li>" for x in exc) + "</ul>" if exc else ""]
    adj = unc.get("total_with_detection") or summary.get("total_with_detection")
    if det.get("included") and adj:
        parts.append(f"<p><b>Detection error:</b> {_e(det.get('note'))}. With it, CO2e "
                     f"{_fmt(adj.get('co2e_t'))} t (90% interval {_fmt(adj.get('co2e_t_ci90_low'))} – "
                     f"{_fmt(adj.get('co2e_t_ci90_high'))} t); the standards' deductions above use this "
                     "interval.</p>")
    else:
        parts.append("<p class='warn'><b>Detection error is not in the interval</b>: missed, false and "
                     "merged crowns are usually the largest error of a drone inventory. The crown model "
                     "carries no detection calibration; assess it with "
                     "<code>forest-inventory evaluate</code> on reference plots before using these "
                     "numbers.</p>")
    return "".join(parts) or "<p>Not computed.</p>"


def _metric_rows(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Flattened (name, value) pairs of a ``validation_metrics`` document (numbers to 3 decimals)."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _metric_rows(value, f"{name}.")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            rows.append((name, str(value)))
        else:
            rows.append((name, f"{value:g}" if float(value).is_integer() else f"{value:.3f}"))
    return rows


def _models_section(summary: dict) -> str:
    """Models and their accuracy: file, version, GSD, compression record and sha256 of each model; the
    crown model's validation scores (pooled and per site) and the species model's; caveats."""
    shas = dict(summary.get("models") or {})
    head = ("<table><tr><th>model</th><th>file</th><th>version</th><th>GSD (m)</th><th>compression</th>"
            "<th>sha256</th></tr>")
    rows, details = [], []
    for key, role in (("crown_model", "crown segmentation"), ("species_model", "species")):
        m = summary.get(key)
        if not isinstance(m, dict):
            if key == "species_model":
                rows.append(f"<tr><td>{role}</td><td colspan='5'>none: every tree's species is "
                            "'unknown' (generic wood density)</td></tr>")
            continue
        name = m.get("name") or Path(str(m.get("path", "?"))).stem
        sha = m.get("sha256") or shas.get(name, "")
        rows.append(f"<tr><td>{role}</td><td><code>{_e(m.get('path', name))}</code></td>"
                    f"<td>{_e(m.get('version'))}</td><td class='n'>{_fmt(m.get('gsd_m'), 3)}</td>"
                    f"<td>{_e(m.get('compression_text', 'not recorded'))}</td>"
                    f"<td><code>{_e(sha)}</code></td></tr>")
        block = [f"<h3>{_e(role)} model <code>{_e(name)}</code>: validation scores from its metadata</h3>"]
        acc = m.get("accuracy")
        metrics = m.get("validation_metrics") or {}
        if acc and acc.get("f1_iou0.4") is not None:
            block.append(
                f"<p>Pooled over its validation plots ({_fmt(acc.get('n_truth'), 0)} reference crowns): "
                f"<b>F1 {_fmt(acc['f1_iou0.4'], 3)}</b> at IoU 0.4 (precision "
                f"{_fmt(acc.get('precision_iou0.4'), 3)}, recall {_fmt(acc.get('recall_iou0.4'), 3)}); "
                f"the caveat threshold is F1 {CROWN_F1_CAVEAT:g}.</p>")
            sites = acc.get("sites") or {}
            if sites:
                block.append("<table><tr><th>validation site</th><th>F1@0.4</th>"
                             "<th>reference crowns</th></tr>"
                             + "".join(f"<tr><td>{_e(k)}</td><td class='n'>{_fmt(v.get('f1_iou0.4'), 3)}</td>"
                                       f"<td class='n'>{_fmt(v.get('n_truth'), 0)}</td></tr>"
                                       for k, v in sites.items()) + "</table>")
        elif metrics:
            block.append("<table><tr><th>metric</th><th>value</th></tr>" + "".join(
                f"<tr><td>{_e(k)}</td><td class='n'>{_e(v)}</td></tr>" for k, v in _metric_rows(metrics)[:16])
                + "</table>")
        else:
            block.append("<p>The model carries no validation scores.</p>")
        if m.get("training_data"):
            text = str(m["training_data"])
            more = "…" if len(text) > 400 else ""
            block.append(f"<p class='meta'>Training data: {_e(text[:400])}{more}</p>")
        if m.get("caveat"):
            block.append(f"<p class='warn'>{_e(m['caveat'])}</p>")
        if m.get("card"):
            block.append(f"<p class='meta'>Model card: <code>{_e(m['card'])}</code></p>")
        details.append("".join(block))
    if not rows:  # an old summary: names and sha256 only
        rows = [f"<tr><td>{_e(k)}</td><td colspan='4'></td><td><code>{_e(v)}</code></td></tr>"
                for k, v in shas.items()]
    return head + "".join(rows) + "</table>" + "".join(details)


def _crown_map_section(crown_map: dict | None, summary: dict) -> str:
    """The crown map (the quicklook's picture: crowns outlined by species over the orthomosaic, legend,
    scale bar), inline as a data: URI."""
    if not crown_map or not crown_map.get("data"):
        return "<p>No crown map (see quicklook.png).</p>"
    uri = f"data:{crown_map.get('mime', 'image/jpeg')};base64,{base64.b64encode(crown_map['data']).decode()}"
    n = summary.get("n_trees")
    caption = (f"{_fmt(n, 0)} crowns outlined by species over the orthomosaic "
               f"({_fmt(crown_map.get('pixel_m'), 2)} m a pixel here; quicklook.png and crown_mask.tif hold "
               "the full resolution).")
    return (f"<figure class='map'><img src=\"{uri}\" width=\"{int(crown_map['width'])}\" "
            f"height=\"{int(crown_map['height'])}\" alt=\"Crown map: crowns outlined by species over the "
            f"orthomosaic\"><figcaption>{_e(caption)}</figcaption></figure>")


def render_report(summary: dict, trees: pd.DataFrame, groups: dict | None = None, grid=None,
                  carbon: Any = None, title: str = "Forest carbon inventory", cell_m: float = 100.0,
                  crown_map: dict | None = None) -> str:
    """The report as one HTML string (see ``write_report``)."""
    groups = {k: pd.DataFrame(v) for k, v in (groups or {}).items() if v is not None}
    trees = trees if trees is not None else pd.DataFrame()
    total = dict(getattr(carbon, "total", None) or {})
    s = {**total, **{k: v for k, v in summary.items() if not isinstance(v, dict | list)}}
    ci90 = summary.get("co2e_t_ci90") or [s.get("co2e_t_ci90_low"), s.get("co2e_t_ci90_high")]
    ci95 = summary.get("co2e_t_ci95") or [s.get("co2e_t_ci95_low"), s.get("co2e_t_ci95_high")]
    area = s.get("area_ha")
    per_ha = (float(s.get("co2e_t", np.nan)) / float(area)) if area else float("nan")
    cards = [("trees", _fmt(s.get("n_trees", len(trees)), 0)), ("area (ha)", _fmt(area, 2)),
             ("AGB (t)", f"{_fmt(s.get('agb_t'))} ± {_fmt(s.get('agb_t_sd'))}"),
             ("CO2e (t)", _fmt(s.get("co2e_t"))),
             ("CO2e 90% interval (t)", f"{_fmt(ci90[0])} – {_fmt(ci90[1])}"),
             ("CO2e 95% interval (t)", f"{_fmt(ci95[0])} – {_fmt(ci95[1])}"),
             ("90% half-width", f"{_fmt(s.get('co2e_halfwidth90_pct'))} %"),
             ("CO2e per ha (t)", _fmt(per_ha))]
    card_html = "".join(f"<div class='card'><b>{v}</b><span>{_e(k)}</span></div>" for k, v in cards)
    meta = [("input", summary.get("input")), ("CRS", summary.get("crs")),
            ("GSD", gsd_note(summary) if summary.get("gsd_m") is not None else None),
            ("version", summary.get("version")), ("seed", summary.get("seed")),
            ("Monte Carlo draws", getattr(getattr(carbon, "config", None), "n_draws", None)),
            ("generated", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))]
    meta_html = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in meta if v is not None)

    # standards
    rules = summary.get("standards") or getattr(carbon, "standards", None) or []
    if isinstance(rules, pd.DataFrame):
        rules = rules.to_dict("records")
    std_rows = "".join(
        f"<tr><td>{_e(r.get('rule'))}</td><td>{_e(r.get('formula'))}</td>"
        f"<td class='n'>{_fmt(r.get('deduction_pct'), 2)}</td>"
        f"<td class='n'>{_fmt(r.get('conservative_co2e_t'))}</td>"
        f"<td>{_e(r.get('source'))}</td></tr>" for r in rules)
    std_html = ("<table><tr><th>rule</th><th>formula</th><th>deduction %</th><th>conservative CO2e (t)</th>"
                f"<th>source</th></tr>{std_rows}</table>" if rules else "<p>No standards computed.</p>")
    std_html += ("<p class='note'>These are simplified readings of the standards. The user must check the "
                 "methodology version in force (and its exact formula) before reporting credits. The "
                 "permanence buffer and leakage are separate deductions not computed here.</p>")

    # charts
    charts = []
    sp = groups.get("species")
    if sp is not None and len(sp):
        names = sp["species"] if "species" in sp.columns else [str(i) for i in sp.index]
        order = np.argsort(-sp["agb_t"].to_numpy())
        charts.append(_figure(species_chart(np.asarray(names)[order], sp["n_trees"].to_numpy()[order],
                                            sp["agb_t"].to_numpy()[order]),
                              "Species composition: share of the trees and of the aboveground biomass."))
    elif "species" in trees.columns and len(trees):
        agg = trees.groupby("species").agg(n=("species", "size"), agb=("agb_kg", "sum")).sort_values("agb")
        charts.append(_figure(species_chart(agg.index[::-1], agg["n"].to_numpy()[::-1],
                                            agg["agb"].to_numpy()[::-1] / 1000),
                              "Species composition: share of the trees and of the aboveground biomass."))
    if "height_m" in trees.columns:
        allo = (trees["height_source"].astype(str) == "allometry").to_numpy() \
            if "height_source" in trees.columns else None
        charts.append(_figure(histogram_chart(trees["height_m"].to_numpy(dtype=float), "height", "m", allo,
                                              ("measured (CHM)", "allometric (low confidence)")),
                              "Tree heights; allometric heights come from the height-diameter model."))
    if "dbh_cm" in trees.columns:
        charts.append(_figure(histogram_chart(trees["dbh_cm"].to_numpy(dtype=float), "stem diameter (DBH)",
                                              "cm"), "Stem diameters estimated from height and crown "
                                                     "diameter (Jucker et al. 2017)."))
    cells = _cells_frame(groups, grid, trees, cell_m)
    one_cell = cells is not None and len(cells) == 1
    charts.append(_figure(agb_map_chart(cells), f"Aboveground biomass density per {cell_m:g} m grid cell "
                          "(t/ha)." + (" The whole image lies in one cell: see the crown map for where the "
                                        "trees are." if one_cell else "")))
    rows = []
    for name in ("plot", "species"):
        g = groups.get(name)
        if g is None or not len(g):
            continue
        for gid, r in g.sort_values("co2e_t", ascending=False).head(12).iterrows():
            if name == "species" and "species" in g.columns:
                label = r["species"]
            elif name == "plot" and "plot_id" in g.columns:
                label = f"plot {r['plot_id']}"
            else:
                label = f"{name} {gid}"
            rows.append((str(label), r))
    if s.get("co2e_t") is not None:
        rows.append(("TOTAL", pd.Series({"co2e_t": s.get("co2e_t"), "co2e_t_ci90_low": ci90[0],
                                         "co2e_t_ci90_high": ci90[1], "co2e_t_ci95_low": ci95[0],
                                         "co2e_t_ci95_high": ci95[1]})))
    if rows:
        def col(c):
            return [float(r.get(c, np.nan)) if r.get(c) is not None else np.nan for _, r in rows]
        charts.append(_figure(interval_chart([lab for lab, _ in rows], col("co2e_t"), col("co2e_t_ci90_low"),
                                             col("co2e_t_ci90_high"), col("co2e_t_ci95_low"),
                                             col("co2e_t_ci95_high")),
                              "CO2e per plot / species and in total with Monte Carlo 90% and 95% intervals."))

    # tables
    tables = []
    for name in ("plot", "species", "cell"):
        g = groups.get(name)
        if g is None or not len(g):
            continue
        g = g.copy()
        cols = list(GROUP_COLUMNS)
        if name == "species" and "species" in g.columns:
            cols = [("species", "species")] + cols
        elif name == "plot" and "plot_id" in g.columns:
            cols = [("plot_id", "plot")] + cols
        else:
            g.insert(0, name, g.index)
            cols = [(name, name)] + cols
        tables.append(f"<h3>per {_e(name)}</h3>" + _table(g, cols, 30 if name == "cell" else 50))

    interval_html = _interval_section(summary, carbon)
    warnings = list(summary.get("warnings") or getattr(carbon, "warnings", None) or [])
    warn_html = "".join(f"<p class='warn'>{_e(w)}</p>" for w in warnings)

    sens = getattr(carbon, "sensitivity", None) or {}
    sens_html = ""
    if sens:
        sens_html = (f"<p>Main model <b>{_e(sens.get('agb_model'))}</b>: {_fmt(sens.get('agb_t'))} t AGB. "
                     f"Alternative <b>{_e(sens.get('alternative_model'))}</b> (point estimate): "
                     f"{_fmt(sens.get('alternative_agb_t'))} t "
                     f"({_fmt(sens.get('alternative_minus_main_pct'))} %).</p>")

    body = f"""
<main>
<h1>{_e(title)}</h1>
<p class="meta">{meta_html}</p>
{warn_html}
<div class="cards">{card_html}</div>
<h2>Models and their accuracy</h2>
{_models_section(summary)}
<h2>Crown map</h2>
{_crown_map_section(crown_map, summary)}
<h2>What this interval includes and what it does not</h2>
{interval_html}
<h2>Conservative CO2e under the standards</h2>
{std_html}
<h2>Charts</h2>
<div class="charts">{''.join(charts)}</div>
<h2>Totals by group</h2>
{''.join(tables) or '<p>No groups.</p>'}
<h2>Allometric sensitivity</h2>
{sens_html or '<p>Not computed.</p>'}
<h2>Method: equations, factors and sources</h2>
<p>Per tree: crown diameter from the crown polygon; height from the canopy height model (or, without one,
from a height-diameter model iterated with the crown allometry, flagged low confidence); stem diameter from
height and crown diameter; aboveground biomass (AGB); belowground biomass from the root-to-shoot ratio;
carbon and CO2e. Totals and tables are sums of the per-tree point estimates (they add up with the tree
files); the Monte Carlo gives the SDs and intervals: crown-diameter and height errors per tree and a
systematic height and crown-diameter bias of the run, the allometric residuals (log scale; the bias
correction inside the published intercepts is not applied twice), allometric parameter error, the wood
density of each species (shared by its trees) and of each tree, species drawn from the classifier
probabilities when available (wood density and carbon fraction follow the drawn species), the carbon
fraction and root-to-shoot ratio, and, when the crown model carries a calibration, the detection error.
Shared errors are drawn once per iteration, so they do not average out.</p>
{_factors_section(trees, carbon)}
<p class="meta">Self-contained report: no scripts, fonts or images are loaded from elsewhere (the crown map
is embedded).</p>
</main>"""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def write_report(path: str | os.PathLike, summary: dict, trees: pd.DataFrame, groups: dict | None = None,
                 grid=None, carbon: Any = None, title: str = "Forest carbon inventory",
                 cell_m: float = 100.0, crown_map: dict | None = None) -> None:
    """Write the self-contained ``report.html`` atomically.

    ``summary``: the run summary (summary.json content); ``trees``: per-tree table (GeoDataFrame or with x/y);
    ``groups``: CarbonResult.groups; ``grid``: grid cells GeoDataFrame (cell_id, area_ha) for the AGB map;
    ``carbon``: the CarbonResult (factors, sensitivity, Monte Carlo settings), optional; ``crown_map``:
    ``pipeline.export.crown_map_image``'s dict (JPEG bytes, width, height, pixel_m), optional.
    """
    text = render_report(summary, trees, groups, grid=grid, carbon=carbon, title=title, cell_m=cell_m,
                         crown_map=crown_map)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
