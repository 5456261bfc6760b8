"""Synthetic forest scenes with known truth: an RGB orthomosaic, a canopy height model and truth crowns.

A scene is a square of ``size_m`` metres at ``gsd_m`` metres per pixel in a projected CRS (default
EPSG:32617, UTM 17N, northern Florida sandhill). Everything is a pure function of ``seed``:

* Trees are placed per *placement block* (``block_m`` metres) with a random generator seeded by
  ``(seed, block row, block column)``, so a tree does not depend on the order blocks are visited in.
  Spacing uses a Matérn type-II hard core: a candidate is dropped when a candidate with a higher priority
  lies closer than ``overlap * (r1 + r2)``; this needs only the 3x3 neighbouring blocks, so it is local and
  order-independent. Crowns therefore touch and overlap by up to ``1 - overlap`` of their radius sum.
* Pixels are rendered by raster windows (``window_px``). Background noise is hash-based on global pixel
  coordinates and each crown's texture is generated on its own global-pixel patch from a per-tree seed, so
  a crown that spans window borders is drawn identically whatever the window size (tested).
* Truth AGB uses the project's carbon allometry: DBH from Jucker et al. 2017 (height, crown diameter,
  plant group) and AGB from Chave et al. 2014 eq. 4 with the wood density of the species.

Peak memory is bounded by the window size plus the tree table (about 100 bytes per tree), so a 4 km² scene
at 10 cm (20,000 x 20,000 px) is generated with the same raster buffers as a 1 ha one.
numpy + rasterio (+ shapely/geopandas for the truth file) only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

# --------------------------------------------------------------------------------------------- species looks


@dataclass(frozen=True)
class SpeciesLook:
    """How one species looks from above and how big it grows (metres; colours are linear RGB 0..1)."""

    name: str
    weight: float  # relative frequency
    height_m: tuple[float, float]  # mean, sd
    crown_diameter_m: tuple[float, float]  # mean, sd
    cd_range_m: tuple[float, float]
    depth_frac: float  # crown depth seen by the CHM, fraction of height
    profile: str  # "cone" (needle clusters) or "dome"
    colour: tuple[float, float, float]
    texture_cell_m: float  # size of foliage clumps
    texture_amp: float  # contrast of foliage clumps
    tufted: bool  # clumps separated by dark gaps (open pine crowns)
    lobe_amp: float  # irregularity of the outline (sum of harmonic amplitudes)


SPECIES: tuple[SpeciesLook, ...] = (
    SpeciesLook("Pinus palustris", 1.2, (24.0, 3.0), (6.5, 1.2), (3.5, 10.0), 0.30, "cone",
                (0.25, 0.33, 0.27), 0.55, 0.55, True, 0.22),
    SpeciesLook("Quercus laevis", 1.0, (10.0, 2.0), (6.0, 1.3), (3.0, 10.0), 0.45, "dome",
                (0.44, 0.46, 0.24), 0.70, 0.30, False, 0.20),
    SpeciesLook("Quercus virginiana", 0.8, (15.0, 2.5), (13.0, 2.5), (8.0, 18.0), 0.40, "dome",
                (0.17, 0.28, 0.16), 0.35, 0.16, False, 0.10),
    SpeciesLook("Acer rubrum", 0.9, (17.0, 2.5), (8.0, 1.5), (4.5, 12.0), 0.50, "dome",
                (0.52, 0.32, 0.24), 0.50, 0.22, False, 0.08),
    SpeciesLook("Liquidambar styraciflua", 0.8, (20.0, 3.0), (7.0, 1.4), (4.0, 11.0), 0.50, "dome",
                (0.34, 0.52, 0.25), 0.30, 0.28, False, 0.14),
)
SPECIES_NAMES: tuple[str, ...] = tuple(s.name for s in SPECIES)

# ground covers: linear RGB and the bias of their weight in the blend
_GROUND = (
    ("grass", (0.36, 0.42, 0.20), 0.3),
    ("dry grass", (0.58, 0.54, 0.34), 0.1),
    ("soil", (0.42, 0.33, 0.24), 0.0),
    ("sand", (0.80, 0.76, 0.64), -0.1),
    ("litter", (0.46, 0.34, 0.22), 0.0),
)
_LOG_COLOUR = (0.64, 0.61, 0.56)
CROWN_STYLES = ("smooth", "clumped")
_N_HARMONICS = 4
_N_VERTICES = 48


@dataclass(frozen=True)
class SceneFiles:
    """Paths of a generated scene (all in ``crs``; ortho, CHM and DSM share one grid)."""

    ortho: Path
    chm: Path
    truth: Path
    meta: Path
    n_trees: int
    crs: str
    gsd_m: float
    size_m: float
    dsm: Path | None = None  # ground with relief (``ground_elevation_m``) plus the canopy, m


def ground_elevation_m(x_m: np.ndarray, y_m: np.ndarray, seed: int,
                       origin: tuple[float, float]) -> np.ndarray:
    """Terrain of a generated scene (m): 30 m plus a tilt of up to 4 % and two waves of 1-2 m (slopes up
    to about 10 %), a pure function of the seed and map coordinates."""
    rng = np.random.default_rng([seed, 23])
    gx, gy = rng.uniform(-0.04, 0.04, 2)
    a1, a2 = rng.uniform(1.0, 2.0, 2)
    l1, l2 = rng.uniform(90.0, 160.0, 2)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    dx, dy = np.asarray(x_m, dtype=float) - origin[0], origin[1] - np.asarray(y_m, dtype=float)
    return (30.0 + gx * dx + gy * dy + a1 * np.sin(2 * np.pi * dx / l1 + p1)
            + a2 * np.sin(2 * np.pi * dy / l2 + p2))


# --------------------------------------------------------------------------------------------- hashing noise

_K = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
               0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53], dtype=np.uint64)


def _hash_uniform(seed: int, key: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 from integer coordinates (broadcast), a pure function of (seed, key, i, j)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(seed, dtype=np.uint64) * _K[0]) ^ (np.asarray(key, dtype=np.uint64) * _K[1])
        h = h ^ (np.asarray(i).astype(np.int64).astype(np.uint64) * _K[2])
        h = h ^ (np.asarray(j).astype(np.int64).astype(np.uint64) * _K[3])
        h ^= h >> np.uint64(33)
        h *= _K[4]
        h ^= h >> np.uint64(33)
        h *= _K[5]
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _axis_weights(coords: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    f = coords / cell
    i = np.floor(f).astype(np.int64)
    return i, _smooth((f - i).astype(np.float32))


def _value_noise_grid(seed: int, key: int, rows: np.ndarray, cols: np.ndarray, cell: float) -> np.ndarray:
    """Value noise in [0, 1) on the grid ``rows x cols`` (global pixel coordinates), lattice ``cell`` px."""
    ir, tr = _axis_weights(rows, cell)
    ic, tc = _axis_weights(cols, cell)
    i0, j0 = ir.min(), ic.min()
    lat = _hash_uniform(seed, key, np.arange(i0, ir.max() + 2)[:, None], np.arange(j0, ic.max() + 2)[None, :])
    a = lat[ir - i0] * (1 - tr)[:, None] + lat[ir - i0 + 1] * tr[:, None]
    jc = ic - j0
    return a[:, jc] * (1 - tc)[None, :] + a[:, jc + 1] * tc[None, :]


def _value_noise_points(seed: int, key: int, r: np.ndarray, c: np.ndarray, cell: float) -> np.ndarray:
    """Value noise at scattered points (same field as :func:`_value_noise_grid`)."""
    ir, tr = _axis_weights(np.asarray(r, dtype=np.float64), cell)
    ic, tc = _axis_weights(np.asarray(c, dtype=np.float64), cell)
    v00 = _hash_uniform(seed, key, ir, ic)
    v01 = _hash_uniform(seed, key, ir, ic + 1)
    v10 = _hash_uniform(seed, key, ir + 1, ic)
    v11 = _hash_uniform(seed, key, ir + 1, ic + 1)
    return (v00 * (1 - tc) + v01 * tc) * (1 - tr) + (v10 * (1 - tc) + v11 * tc) * tr


def _upsample_nodes(nodes: np.ndarray, n0r: int, n0c: int, step: int, r0: int, c0: int, h: int, w: int
                    ) -> np.ndarray:
    """Linear interpolation of values on global nodes (multiples of ``step`` px) to pixels [..., h, w]."""
    rows = np.arange(r0, r0 + h)
    cols = np.arange(c0, c0 + w)
    ir = rows // step - n0r
    tr = ((rows % step) / step).astype(np.float32)
    ic = cols // step - n0c
    tc = ((cols % step) / step).astype(np.float32)
    a = nodes[..., ir, :] * (1 - tr)[:, None] + nodes[..., ir + 1, :] * tr[:, None]
    return a[..., ic] * (1 - tc) + a[..., ic + 1] * tc


# --------------------------------------------------------------------------------------------- trees


@dataclass
class _Trees:
    """Tree table: one row per tree, map coordinates in metres (scene CRS)."""

    x: np.ndarray
    y: np.ndarray
    species: np.ndarray  # index into SPECIES
    height_m: np.ndarray
    radius_m: np.ndarray  # base radius before lobes
    harm_amp: np.ndarray  # [n, K]
    harm_phase: np.ndarray  # [n, K]
    colour: np.ndarray  # [n, 3] per-tree colour multipliers
    uid: np.ndarray  # [n, 3] (block row, block col, index in block) -> texture seed

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray) -> _Trees:
        return _Trees(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def _max_radius_m() -> float:
    return max(s.cd_range_m[1] / 2 * (1 + s.lobe_amp) for s in SPECIES)


def _block_candidates(seed: int, bi: int, bj: int, block_m: float, origin: tuple[float, float],
                      cand_per_ha: float, gsd_m: float) -> tuple[_Trees, np.ndarray, np.ndarray]:
    """Candidate trees of one placement block (a pure function of seed and block index).

    Returns the candidates, their Matérn priorities and whether they survive the stand-density thinning.
    """
    rng = np.random.default_rng([seed, 11, bi, bj])
    n = int(rng.poisson(cand_per_ha * block_m * block_m / 1e4))
    x0, y_top = origin
    x = x0 + (bj + rng.random(n)) * block_m
    y = y_top - (bi + rng.random(n)) * block_m
    priority = rng.random(n)
    u_density = rng.random(n)
    u_species = rng.random(n)
    z_h = rng.standard_normal(n)
    z_cd = rng.standard_normal(n)
    harm_amp = rng.random((n, _N_HARMONICS))
    harm_phase = rng.random((n, _N_HARMONICS)) * 2 * np.pi
    colour = np.exp(0.06 * rng.standard_normal((n, 3)) + 0.10 * rng.standard_normal((n, 1)))

    # stand density and species patches are smooth fields of position (global, seeded), in metres
    pr = (y_top - y)
    pc = (x - x0)
    density = np.clip(1.8 * _value_noise_points(seed, 101, pr, pc, 70.0) - 0.15, 0.04, 1.0)
    keep_density = u_density < density
    logits = np.stack([np.log(s.weight) + 2.5 * _value_noise_points(seed, 200 + k, pr, pc, 60.0)
                       for k, s in enumerate(SPECIES)], axis=1) if n else np.zeros((0, len(SPECIES)))
    p = np.exp(logits - logits.max(axis=1, keepdims=True)) if n else logits
    p = p / p.sum(axis=1, keepdims=True) if n else p
    species = (u_species[:, None] > np.cumsum(p, axis=1)).sum(axis=1).clip(0, len(SPECIES) - 1)

    height = np.empty(n)
    radius = np.empty(n)
    for k, s in enumerate(SPECIES):
        m = species == k
        height[m] = np.clip(s.height_m[0] + s.height_m[1] * z_h[m], 4.0, 38.0)
        # crowns are larger on taller trees of a species (correlation 0.5)
        zc = 0.5 * z_h[m] + math.sqrt(0.75) * z_cd[m]
        radius[m] = np.clip(s.crown_diameter_m[0] + s.crown_diameter_m[1] * zc, *s.cd_range_m) / 2
    lobe = np.array([s.lobe_amp for s in SPECIES])[species]
    harm_amp = harm_amp / np.maximum(harm_amp.sum(axis=1, keepdims=True), 1e-9) * lobe[:, None] \
        * rng.uniform(0.5, 1.0, (n, 1))
    uid = np.stack([np.full(n, bi), np.full(n, bj), np.arange(n)], axis=1).astype(np.int64)
    trees = _Trees(x, y, species, height, radius, harm_amp, harm_phase, colour, uid)
    return trees, priority, keep_density


def _concat(parts: list[_Trees]) -> _Trees:
    fields = _Trees.__dataclass_fields__
    return _Trees(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def place_trees(seed: int, size_m: float, origin: tuple[float, float], block_m: float = 50.0,
                cand_per_ha: float = 900.0, overlap: float = 0.65, gsd_m: float = 0.1) -> _Trees:
    """All trees of the scene (centres inside it), placed block by block; see the module docstring."""
    nb = int(math.ceil(size_m / block_m))
    if 2 * overlap * _max_radius_m() > block_m:
        raise InputError(f"block_m={block_m} is smaller than the largest crown spacing: use block_m >= 50")
    cache: dict[tuple[int, int], tuple[_Trees, np.ndarray]] = {}

    def cand(bi: int, bj: int) -> tuple[_Trees, np.ndarray]:
        key = (bi, bj)
        if key not in cache:
            t, prio, keep = _block_candidates(seed, bi, bj, block_m, origin, cand_per_ha, gsd_m)
            idx = np.flatnonzero(keep)
            cache[key] = (t.take(idx), prio[idx])
        return cache[key]

    kept: list[_Trees] = []
    for bi in range(nb):
        for bj in range(nb):
            own, own_p = cand(bi, bj)
            if len(own) == 0:
                continue
            neigh = [cand(bi + di, bj + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)
                     if 0 <= bi + di < nb and 0 <= bj + dj < nb]
            nx = np.concatenate([t.x for t, _ in neigh])
            ny = np.concatenate([t.y for t, _ in neigh])
            nr = np.concatenate([t.radius_m for t, _ in neigh])
            npr = np.concatenate([p for _, p in neigh])
            d = np.hypot(own.x[:, None] - nx[None, :], own.y[:, None] - ny[None, :])
            conflict = (d < overlap * (own.radius_m[:, None] + nr[None, :])) & (npr[None, :] > own_p[:, None])
            survive = ~conflict.any(axis=1)
            inside = (own.x >= origin[0]) & (own.x < origin[0] + size_m) & \
                     (own.y <= origin[1]) & (own.y > origin[1] - size_m)
            kept.append(own.take(np.flatnonzero(survive & inside)))
        # drop cached rows that no later block needs
        for key in [k for k in cache if k[0] < bi - 1]:
            del cache[key]
    if not kept:
        return _block_candidates(seed, 0, 0, block_m, origin, 0.0, gsd_m)[0]
    return _concat(kept)


def _crown_radius(trees: _Trees, theta: np.ndarray) -> np.ndarray:
    """Lobed crown radius r(theta) in metres: R (1 + sum_k a_k cos(k theta + phi_k)); theta [n, m]."""
    k = np.arange(1, _N_HARMONICS + 1)
    harm = (trees.harm_amp[:, None, :] * np.cos(k[None, None, :] * theta[..., None]
                                                + trees.harm_phase[:, None, :])).sum(axis=-1)
    return trees.radius_m[:, None] * (1.0 + harm)


def crown_polygons(trees: _Trees) -> np.ndarray:
    """Crown outlines (shapely Polygons, scene CRS) with ``_N_VERTICES`` vertices each."""
    import shapely

    theta = np.linspace(0, 2 * np.pi, _N_VERTICES, endpoint=False)[None, :].repeat(len(trees), 0)
    r = _crown_radius(trees, theta)
    xs = trees.x[:, None] + r * np.cos(theta)
    ys = trees.y[:, None] + r * np.sin(theta)
    ring = np.stack([xs, ys], axis=-1)
    ring = np.concatenate([ring, ring[:, :1]], axis=1)
    return shapely.polygons(ring)


# --------------------------------------------------------------------------------------------- dead wood


def _place_logs(seed: int, size_m: float, origin: tuple[float, float], block_m: float, logs_per_ha: float
                ) -> np.ndarray:
    """Fallen logs as segments [n, 5]: x1, y1, x2, y2, half-width (m); placed per block."""
    nb = int(math.ceil(size_m / block_m))
    out = []
    for bi in range(nb):
        for bj in range(nb):
            rng = np.random.default_rng([seed, 23, bi, bj])
            n = int(rng.poisson(logs_per_ha * block_m * block_m / 1e4))
            cx = origin[0] + (bj + rng.random(n)) * block_m
            cy = origin[1] - (bi + rng.random(n)) * block_m
            length = rng.uniform(2.0, 11.0, n)
            ang = rng.random(n) * np.pi
            hw = rng.uniform(0.12, 0.3, n)
            dx, dy = np.cos(ang) * length / 2, np.sin(ang) * length / 2
            out.append(np.stack([cx - dx, cy - dy, cx + dx, cy + dy, hw], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 5))


# --------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Light:
    sun_azimuth_deg: float = 135.0  # from north, clockwise: sun in the south-east, shadows to the north-west
    sun_elevation_deg: float = 60.0
    shadow_factor: float = 0.48
    exposure: float = 1.0


def _render_background(seed: int, r0: int, c0: int, h: int, w: int, gsd_m: float, exposure: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Ground colour [3, h, w] (linear 0..1) and ground height [h, w] (m) at global pixel offset (r0, c0)."""
    step = max(1, int(round(0.8 / gsd_m)))  # ground cover fields are smooth: evaluate on 0.8 m nodes
    n0r, n0c = r0 // step, c0 // step
    n1r, n1c = (r0 + h - 1) // step + 1, (c0 + w - 1) // step + 1
    nr = np.arange(n0r, n1r + 1) * step
    nc = np.arange(n0c, n1c + 1) * step
    logits = []
    for k, (_, _, bias) in enumerate(_GROUND):
        f = 0.65 * _value_noise_grid(seed, 300 + k, nr, nc, 25.0 / gsd_m) \
            + 0.35 * _value_noise_grid(seed, 310 + k, nr, nc, 6.0 / gsd_m)
        logits.append(9.0 * (f + bias))
    lg = np.stack(logits)
    wts = np.exp(lg - lg.max(axis=0, keepdims=True))
    wts /= wts.sum(axis=0, keepdims=True)
    cols = np.array([c for _, c, _ in _GROUND], dtype=np.float32)
    base = np.einsum("kc,khw->chw", cols, wts)
    grassy = wts[0] + wts[1]
    nodes = np.concatenate([base, grassy[None]], axis=0).astype(np.float32)
    up = _upsample_nodes(nodes, n0r, n0c, step, r0, c0, h, w)
    rows = np.arange(r0, r0 + h, dtype=np.float64)
    cols_px = np.arange(c0, c0 + w, dtype=np.float64)
    mid = _value_noise_grid(seed, 320, rows, cols_px, 1.2 / gsd_m)
    fine = _value_noise_grid(seed, 321, rows, cols_px, max(0.25 / gsd_m, 1.5))
    grain = _hash_uniform(seed, 322, np.arange(r0, r0 + h)[:, None], np.arange(c0, c0 + w)[None, :])
    lum = 0.80 + 0.30 * mid + (0.22 * fine + 0.10 * grain) * (0.5 + up[3])
    rgb = up[:3] * (lum * exposure)[None]
    ground_h = (np.round(3.5 * up[3] * mid) / 10.0).astype(np.float32)  # grass height, 0.1 m steps
    return rgb.astype(np.float32), ground_h


def _draw_logs(logs: np.ndarray, seed: int, rgb: np.ndarray, surf: np.ndarray, r0: int, c0: int,
               origin: tuple[float, float], gsd_m: float) -> None:
    h, w = surf.shape
    x_left, y_top = origin
    for k, (x1, y1, x2, y2, hw) in enumerate(logs):
        cmin = int(math.floor((min(x1, x2) - hw - x_left) / gsd_m)) - c0
        cmax = int(math.ceil((max(x1, x2) + hw - x_left) / gsd_m)) - c0
        rmin = int(math.floor((y_top - max(y1, y2) - hw) / gsd_m)) - r0
        rmax = int(math.ceil((y_top - min(y1, y2) + hw) / gsd_m)) - r0
        a0, a1, b0, b1 = max(rmin, 0), min(rmax, h), max(cmin, 0), min(cmax, w)
        if a0 >= a1 or b0 >= b1:
            continue
        px = x_left + (np.arange(b0, b1) + c0 + 0.5) * gsd_m
        py = y_top - (np.arange(a0, a1) + r0 + 0.5) * gsd_m
        vx, vy = x2 - x1, y2 - y1
        t = ((px[None, :] - x1) * vx + (py[:, None] - y1) * vy) / (vx * vx + vy * vy)
        t = np.clip(t, 0, 1)
        d = np.hypot(px[None, :] - (x1 + t * vx), py[:, None] - (y1 + t * vy))
        m = d < hw
        if not m.any():
            continue
        shade = 0.75 + 0.35 * np.sqrt(np.clip(1 - (d / hw) ** 2, 0, 1))
        tone = 0.85 + 0.3 * _hash_uniform(seed, 400, k, 0)
        sub = rgb[:, a0:a1, b0:b1]
        for ch in range(3):
            sub[ch][m] = (_LOG_COLOUR[ch] * tone * shade)[m]
        surf[a0:a1, b0:b1][m] = np.maximum(surf[a0:a1, b0:b1][m], 0.3)


def _crown_patch(trees: _Trees, i: int, seed: int, origin: tuple[float, float], gsd_m: float,
                 crown_style: str = "smooth"):
    """Full raster patch of tree ``i`` on the global pixel grid: (row0, col0, inside, z, rgb).

    ``crown_style`` ``smooth`` shades the crown profile with a value-noise texture; ``clumped`` builds the
    surface from branch clumps (:func:`_clump_surface`)."""
    s = SPECIES[int(trees.species[i])]
    x_left, y_top = origin
    rmax = float(trees.radius_m[i] * (1 + trees.harm_amp[i].sum()))
    c_lo = int(math.floor((trees.x[i] - rmax - x_left) / gsd_m))
    c_hi = int(math.ceil((trees.x[i] + rmax - x_left) / gsd_m))
    r_lo = int(math.floor((y_top - trees.y[i] - rmax) / gsd_m))
    r_hi = int(math.ceil((y_top - trees.y[i] + rmax) / gsd_m))
    dx = (x_left + (np.arange(c_lo, c_hi) + 0.5) * gsd_m - trees.x[i])[None, :]
    dy = (y_top - (np.arange(r_lo, r_hi) + 0.5) * gsd_m - trees.y[i])[:, None]
    dist = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    k = np.arange(1, _N_HARMONICS + 1)
    harm = (trees.harm_amp[i] * np.cos(k * theta[..., None] + trees.harm_phase[i])).sum(axis=-1)
    rho = dist / (trees.radius_m[i] * (1 + harm))
    inside = rho <= 1.0
    H = trees.height_m[i]
    depth = s.depth_frac * H
    rr = np.clip(rho, 0, 1)
    if s.profile == "cone":
        z = H - depth * rr ** 1.5
    else:
        z = H - depth * (1 - np.sqrt(1 - rr * rr))
    if crown_style == "clumped":
        z, inside, gap = _clump_surface(trees, i, s, seed, z, inside, dx, dy, gsd_m)
    # lighting: Lambert on the crown surface
    gy, gx = np.gradient(z, gsd_m)
    az = math.radians(_Light.sun_azimuth_deg)
    el = math.radians(_Light.sun_elevation_deg)
    sun = np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])
    # map y grows to the north but rows grow to the south: d z / d y_map = -gy
    nx, ny, nz = -gx, gy, np.ones_like(z)
    lam = (nx * sun[0] + ny * sun[1] + nz * sun[2]) / np.sqrt(nx * nx + ny * ny + 1.0)
    # foliage texture from the tree's own seed on its own patch (independent of the window); both grids are
    # drawn for either look so that the random stream is the same
    rng = np.random.default_rng([seed, 31, *trees.uid[i].tolist()])
    hh, ww = z.shape
    cell = max(s.texture_cell_m / gsd_m, 1.0)
    g1 = rng.random((int(hh / cell) + 3, int(ww / cell) + 3)).astype(np.float32)
    fine_cell = max(cell / 3.0, 1.0)
    g2 = rng.random((int(hh / fine_cell) + 3, int(ww / fine_cell) + 3)).astype(np.float32)
    tex2 = _upsample_grid(g2, fine_cell, hh, ww)
    col = np.array(s.colour, dtype=np.float32) * trees.colour[i].astype(np.float32)
    if crown_style == "clumped":
        rgb = _clumped_colour(trees, i, s, seed, col, lam, gap, tex2)
        return r_lo, c_lo, inside, z.astype(np.float32), rgb
    shade = 0.45 + 0.65 * np.clip(lam, 0, 1)
    tex1 = _upsample_grid(g1, cell, hh, ww)
    if s.tufted:
        tuft = np.clip((tex1 - 0.38) * 4.0, 0, 1)
        tex = 0.50 + 0.62 * tuft + 0.18 * (tex2 - 0.5)
    else:
        tex = 1.0 + s.texture_amp * 2 * (tex1 - 0.5) + 0.5 * s.texture_amp * 2 * (tex2 - 0.5)
    edge = 1.0 - 0.25 * np.clip((rr - 0.75) / 0.25, 0, 1)
    lum = (shade * tex * edge).astype(np.float32)
    rgb = col[:, None, None] * lum[None]
    return r_lo, c_lo, inside, z.astype(np.float32), rgb


def _clumped_colour(trees: _Trees, i: int, s: SpeciesLook, seed: int, col: np.ndarray, lam: np.ndarray,
                    gap: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Linear RGB [3, h, w] of a clumped crown: sunlit clump tops, dark gaps, a fine needle/leaf grain."""
    # half the species colour, half a foliage colour of the tree's own (pale yellow-green to dark green)
    crng = np.random.default_rng([seed, 41, *trees.uid[i].tolist()])
    g = crng.uniform(0.22, 0.55)
    own = np.array([g * crng.uniform(0.55, 1.0), g, g * crng.uniform(0.35, 0.75)], np.float32)
    col = 0.5 * col + 0.5 * own
    lum = (0.25 + 1.05 * np.clip(lam, 0, 1) ** 1.5) * (1.0 - 0.65 * gap) * (0.9 + 0.25 * (grain - 0.5) * 2)
    lum = (lum * (1.2 if s.tufted else 1.0)).astype(np.float32)  # sunlit needle tufts
    # sunlit foliage turns yellower (specular and translucent light), shade turns bluer
    warm = np.clip(lum - 0.8, 0, None)
    rgb = col[:, None, None] * lum[None] + np.array([0.10, 0.08, -0.02], np.float32)[:, None, None] * warm
    return rgb.astype(np.float32)


def _clump_surface(trees: _Trees, i: int, s: SpeciesLook, seed: int, z: np.ndarray, inside: np.ndarray,
                   dx: np.ndarray, dy: np.ndarray, gsd_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crown surface built from branch clumps: (surface z in m, rendered-crown mask, gap depth 0..1).

    Seen from above, a real crown is a mosaic of sunlit branch clumps (tufts of needles at branch tips in
    pines, leaf clusters in broadleaves) with shaded gaps between them and a ragged rim. Each clump is a
    small dome (radius ``texture_cell_m`` times 0.6-1.2) set on the crown profile ``z``. Dense crowns keep
    their shaded interior in the gaps; tufted crowns show the ground through them (``inside`` shrinks to
    the clumps). The truth outline is unchanged: the lobed polygon of :func:`crown_polygons`.
    """
    rng = np.random.default_rng([seed, 37, *trees.uid[i].tolist()])
    radius = float(trees.radius_m[i])
    r_clump = float(np.clip(0.7 * s.texture_cell_m + 0.12 * radius, 0.3, 1.4))
    cover = 2.0 if not s.tufted else 1.5
    n = int(np.clip(cover * radius * radius / (r_clump * r_clump), 6, 400))
    theta = rng.uniform(0, 2 * np.pi, n)
    k = np.arange(1, _N_HARMONICS + 1)
    r_out = radius * (1 + (trees.harm_amp[i] * np.cos(k * theta[:, None] + trees.harm_phase[i])).sum(axis=-1))
    rc = r_clump * rng.uniform(0.6, 1.2, n)
    rho = np.sqrt(rng.uniform(0, 1, n)) * np.maximum(r_out - 0.3 * rc, 0.2 * r_out)  # rims stay ragged
    cx, cy = rho * np.cos(theta), rho * np.sin(theta)
    xs, ys = dx[0], dy[:, 0]
    ys_up, n_rows = ys[::-1], len(ys)  # dy decreases down the rows: search on the reversed axis
    surf = np.full(z.shape, -np.inf, dtype=np.float64)
    for x0, y0, r in zip(cx, cy, rc, strict=True):
        c0, c1 = np.searchsorted(xs, [x0 - r, x0 + r])
        r1, r0 = n_rows - np.searchsorted(ys_up, [y0 - r, y0 + r])
        if c0 >= c1 or r0 >= r1:
            continue
        d2 = ((xs[c0:c1][None, :] - x0) ** 2 + (ys[r0:r1][:, None] - y0) ** 2) / (r * r)
        zc = z[r0:r1, c0:c1] + 0.6 * r * (1.0 - d2)
        zc = np.where(d2 <= 1.0, zc, -np.inf)
        np.maximum(surf[r0:r1, c0:c1], zc, out=surf[r0:r1, c0:c1])
    clump = np.isfinite(surf)
    if s.tufted:
        inside = clump
        base = z - 0.4
    else:
        base = z - 0.6
        inside = inside | clump
    out = np.where(clump, np.maximum(surf, base), base)
    gap = np.clip((np.where(clump, 0.0, 0.6) + (z - out).clip(0, None)), 0, 1)
    return out, inside, gap


def _upsample_grid(g: np.ndarray, cell: float, h: int, w: int) -> np.ndarray:
    rows = np.arange(h) / cell
    cols = np.arange(w) / cell
    ir = rows.astype(np.int64)
    ic = cols.astype(np.int64)
    tr = _smooth((rows - ir).astype(np.float32))
    tc = _smooth((cols - ic).astype(np.float32))
    a = g[ir] * (1 - tr)[:, None] + g[ir + 1] * tr[:, None]
    return a[:, ic] * (1 - tc) + a[:, ic + 1] * tc


def _render_window(trees: _Trees, tree_idx: np.ndarray, logs: np.ndarray, seed: int, r0: int, c0: int,
                   h: int, w: int, origin: tuple[float, float], gsd_m: float, light: _Light,
                   crown_style: str = "smooth") -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [3, h, w] and CHM float32 [h, w] of one window (global pixel offset r0, c0)."""
    rgb, surf = _render_background(seed, r0, c0, h, w, gsd_m, light.exposure)
    _draw_logs(logs, seed, rgb, surf, r0, c0, origin, gsd_m)
    owner = np.full((h, w), -1, dtype=np.int64)
    patches = []
    for i in tree_idx:
        pr, pc, inside, z, col = _crown_patch(trees, int(i), seed, origin, gsd_m, crown_style)
        a0, a1 = max(pr, r0), min(pr + z.shape[0], r0 + h)
        b0, b1 = max(pc, c0), min(pc + z.shape[1], c0 + w)
        patches.append((int(i), pr, pc, inside))
        if a0 >= a1 or b0 >= b1:
            continue
        sl_p = (slice(a0 - pr, a1 - pr), slice(b0 - pc, b1 - pc))
        sl_w = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
        win = inside[sl_p] & (z[sl_p] > surf[sl_w])  # taller surface wins: independent of drawing order
        surf[sl_w][win] = z[sl_p][win]
        owner[sl_w][win] = i
        for ch in range(3):
            rgb[ch][sl_w][win] = col[ch][sl_p][win]
    # shadows: each crown's footprint shifted away from the sun darkens lower surfaces
    az = math.radians(light.sun_azimuth_deg)
    cot = 1.0 / math.tan(math.radians(light.sun_elevation_deg))
    shadow = np.zeros((h, w), dtype=bool)
    for i, pr, pc, inside in patches:
        s = SPECIES[int(trees.species[i])]
        zmid = trees.height_m[i] * (1 - 0.5 * s.depth_frac)
        off_m = 0.6 * zmid * cot
        # shadow goes opposite to the sun: east/north offsets negative of the sun direction
        for frac in (0.35, 0.7, 1.0):  # a smear from the crown to its full offset: an attached shadow
            dcol = int(round(-math.sin(az) * off_m * frac / gsd_m))
            drow = int(round(math.cos(az) * off_m * frac / gsd_m))
            sr, sc = pr + drow, pc + dcol
            a0, a1 = max(sr, r0), min(sr + inside.shape[0], r0 + h)
            b0, b1 = max(sc, c0), min(sc + inside.shape[1], c0 + w)
            if a0 >= a1 or b0 >= b1:
                continue
            sl_p = (slice(a0 - sr, a1 - sr), slice(b0 - sc, b1 - sc))
            sl_w = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
            shadow[sl_w] |= inside[sl_p] & (surf[sl_w] < zmid - 1.0) & (owner[sl_w] != i)
    rgb *= np.where(shadow, np.float32(light.shadow_factor), np.float32(1.0))[None]
    out = np.clip(np.sqrt(np.clip(rgb, 0, 1)) * 255.0 + 0.5, 0, 255).astype(np.uint8)  # gamma 2
    return out, (np.round(surf * 100.0) / 100.0).astype(np.float32)  # CHM in cm steps (compresses well)


# --------------------------------------------------------------------------------------------- truth


def tree_truth(trees: _Trees, size_m: float, origin: tuple[float, float], crs: str, biome: str = "temperate"):
    """GeoDataFrame of truth crowns with the carbon allometry (AGB in kg, DBH in cm, heights in m)."""
    import geopandas as gpd
    import shapely

    from pipeline.carbon.allometry import agb_chave2014_eq4_kg, dbh_jucker2017_cm
    from pipeline.carbon.wood_density import WoodDensityTable, plant_group_of

    polys = crown_polygons(trees)
    area = shapely.area(polys)
    cd = 2.0 * np.sqrt(area / np.pi)
    names = np.array(SPECIES_NAMES, dtype=object)[trees.species]
    table = WoodDensityTable.default()
    groups = {n: plant_group_of(n) for n in SPECIES_NAMES}
    rho = {n: table.lookup(n)[0] for n in SPECIES_NAMES}
    group = np.array([groups[n] for n in names], dtype=object)
    wd = np.array([rho[n] for n in names], dtype=float)
    dbh = np.empty(len(trees))
    for g in set(groups.values()):
        m = group == g
        if m.any():
            dbh[m] = dbh_jucker2017_cm(trees.height_m[m], cd[m], plant_group=g, biome=biome)
    agb = agb_chave2014_eq4_kg(wd, dbh, trees.height_m)
    box = shapely.box(origin[0], origin[1] - size_m, origin[0] + size_m, origin[1])
    geom = shapely.intersection(polys, box)
    visible = _visible_area_m2(geom, trees.height_m)
    return gpd.GeoDataFrame({
        "tree_id": np.arange(len(trees), dtype=np.int64),
        "species": names.astype(str),
        "plant_group": group.astype(str),
        "height_m": trees.height_m.astype(float),
        "crown_diameter_m": cd,
        "crown_area_m2": area,
        "dbh_cm": np.asarray(dbh, dtype=float),
        "wood_density": wd,
        "agb_kg": np.asarray(agb, dtype=float),
        "visible_area_m2": visible,
        "visible_fraction": visible / np.maximum(area, 1e-9),
        "x": trees.x, "y": trees.y,
    }, geometry=geom, crs=crs)


def _visible_area_m2(polys: np.ndarray, height_m: np.ndarray) -> np.ndarray:
    """Area of each crown (clipped to the scene) not covered by a taller crown: what a camera overhead
    sees, m². Shadows are not subtracted."""
    import shapely

    tree = shapely.STRtree(polys)
    i, j = tree.query(polys, predicate="intersects")
    taller = (i != j) & (height_m[j] > height_m[i])
    i, j = i[taller], j[taller]
    visible = shapely.area(polys).astype(float)
    if len(i):
        order = np.argsort(i, kind="stable")
        i, j = i[order], j[order]
        starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(i)], strict=True):
            cover = shapely.union_all(polys[j[a:b]])
            visible[i[a]] = shapely.area(shapely.difference(polys[i[a]], cover))
    return visible


# --------------------------------------------------------------------------------------------- entry point


def generate_scene(out_dir: str | Path, size_m: float = 200.0, gsd_m: float = 0.1, seed: int = 0,
                   crs: str = "EPSG:32617", origin: tuple[float, float] = (400000.0, 3285000.0),
                   window_px: int = 1024, block_m: float = 50.0, trees_per_ha_candidates: float = 900.0,
                   overlap: float = 0.65, logs_per_ha: float = 12.0, compress: str = "deflate",
                   biome: str = "temperate", crown_style: str = "smooth") -> SceneFiles:
    """Write ortho.tif (RGB uint8), chm.tif (float32, m), dsm.tif (float32, m: ``ground_elevation_m`` plus
    the canopy), truth.gpkg and scene.json in ``out_dir``.

    ``origin`` is the upper-left corner (easting, northing) in metres of ``crs`` (must be projected).
    ``compress`` is ``deflate`` (lossless, default) or ``jpeg`` (quality 90, smaller and closer to drone
    orthos). ``crown_style`` is ``smooth`` (default: shaded crown profiles with a noise texture; what the
    species model and the benchmarks use) or ``clumped`` (crowns built from sunlit branch clumps with dark
    gaps and ragged rims, closer to real crowns; the crown model's training scenes).
    Output files go through :func:`pipeline.atomic.atomic_path`.
    """
    import rasterio
    from pyproj import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if size_m <= 0 or gsd_m <= 0:
        raise InputError(f"synth: --size-m {size_m} and --gsd-m {gsd_m} must be positive")
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception:  # noqa: BLE001 - any pyproj failure is a bad --crs
        raise InputError(f"synth: --crs {crs!r} is not a known CRS: use e.g. EPSG:32617") from None
    if not crs_obj.is_projected:
        raise InputError(f"synth: --crs {crs!r} is not projected (metres): use a UTM zone such as EPSG:32617")
    if crown_style not in CROWN_STYLES:
        raise InputError(f"synth: --crown-style {crown_style!r} must be one of {', '.join(CROWN_STYLES)}")
    if compress not in {"deflate", "jpeg"}:
        raise InputError(f"synth: --compress {compress!r} must be deflate or jpeg")
    n_px = int(round(size_m / gsd_m))
    if n_px < 16:
        raise InputError(f"synth: a {size_m} m scene at {gsd_m} m is under 16 px: increase --size-m")
    if window_px % 256:
        raise InputError(f"synth: window_px={window_px} must be a multiple of 256")
    crs_str = crs_obj.to_string()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 5])
    light = _Light(sun_azimuth_deg=float(rng.uniform(110, 160)), sun_elevation_deg=float(rng.uniform(55, 68)),
                   exposure=float(rng.uniform(0.92, 1.08)))

    trees = place_trees(seed, size_m, origin, block_m, trees_per_ha_candidates, overlap, gsd_m)
    logs = _place_logs(seed, size_m, origin, block_m, logs_per_ha)
    # pixel bounding boxes of crowns including their shadows, for selecting crowns per window
    cot = 1.0 / math.tan(math.radians(light.sun_elevation_deg))
    reach = (trees.radius_m * (1 + trees.harm_amp.sum(axis=1)) + trees.height_m * cot) / gsd_m + 2
    tc = (trees.x - origin[0]) / gsd_m
    tr = (origin[1] - trees.y) / gsd_m

    transform = from_origin(origin[0], origin[1], gsd_m, gsd_m)
    common = dict(driver="GTiff", width=n_px, height=n_px, crs=crs_obj, transform=transform, tiled=True,
                  blockxsize=256, blockysize=256, BIGTIFF="IF_SAFER")
    ortho_prof = dict(common, count=3, dtype="uint8", interleave="pixel")
    if compress == "jpeg":
        ortho_prof.update(compress="jpeg", photometric="ycbcr", jpeg_quality=90)
    else:
        ortho_prof.update(compress="deflate", predictor=2)
    chm_prof = dict(common, count=1, dtype="float32", compress="deflate", predictor=3, nodata=-9999.0)

    ortho_path, chm_path, dsm_path = out / "ortho.tif", out / "chm.tif", out / "dsm.tif"
    with atomic_path(ortho_path) as t_ortho, atomic_path(chm_path) as t_chm, atomic_path(dsm_path) as t_dsm:
        with rasterio.open(t_ortho, "w", **ortho_prof) as dst_o, \
                rasterio.open(t_chm, "w", **chm_prof) as dst_c, \
                rasterio.open(t_dsm, "w", **chm_prof) as dst_d:
            dst_o.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                                 rasterio.enums.ColorInterp.blue]
            dst_c.set_band_description(1, "canopy height (m)")
            dst_d.set_band_description(1, "surface elevation (m): ground with relief plus canopy")
            for r0 in range(0, n_px, window_px):
                h = min(window_px, n_px - r0)
                rows_hit = (tr + reach >= r0) & (tr - reach <= r0 + h)
                for c0 in range(0, n_px, window_px):
                    w = min(window_px, n_px - c0)
                    hit = np.flatnonzero(rows_hit & (tc + reach >= c0) & (tc - reach <= c0 + w))
                    rgb, chm = _render_window(trees, hit, logs, seed, r0, c0, h, w, origin, gsd_m, light,
                                              crown_style)
                    win = Window(c0, r0, w, h)
                    dst_o.write(rgb, window=win)
                    dst_c.write(chm, 1, window=win)
                    ys = origin[1] - (r0 + np.arange(h)[:, None] + 0.5) * gsd_m
                    xs = origin[0] + (c0 + np.arange(w)[None, :] + 0.5) * gsd_m
                    ground = ground_elevation_m(xs, ys, seed, origin).astype(np.float32)
                    dst_d.write(np.where(chm == chm_prof["nodata"], chm, ground + chm), 1, window=win)
            dst_o.update_tags(generator="pipeline.synthetic", seed=str(seed))

    truth = tree_truth(trees, size_m, origin, crs_str, biome=biome)
    truth_path = out / "truth.gpkg"
    with atomic_path(truth_path) as t_truth:
        truth.to_file(t_truth, layer="crowns", driver="GPKG")
    meta = {
        "generator": "pipeline.synthetic.generate_scene", "seed": seed, "size_m": size_m, "gsd_m": gsd_m,
        "crs": crs_str, "origin": list(origin), "width_px": n_px, "height_px": n_px,
        "n_trees": int(len(truth)), "species": list(SPECIES_NAMES),
        "species_counts": {k: int(v) for k, v in truth["species"].value_counts().sort_index().items()},
        "agb_t_total": float(truth["agb_kg"].sum() / 1000.0),
        "agb_t_per_ha": float(truth["agb_kg"].sum() / 1000.0 / (size_m * size_m / 1e4)),
        "canopy_trees_per_ha": float(len(truth) / (size_m * size_m / 1e4)),
        "mean_visible_fraction": float(truth["visible_fraction"].mean()) if len(truth) else 1.0,
        "light": {"sun_azimuth_deg": light.sun_azimuth_deg, "sun_elevation_deg": light.sun_elevation_deg},
        "allometry": "dbh_jucker2017_cm(height_m, crown_diameter_m, plant_group, biome) -> "
                     "agb_chave2014_eq4_kg(wood_density, dbh_cm, height_m)",
        "biome": biome, "compress": compress, "crown_style": crown_style,
    }
    meta_path = out / "scene.json"
    with atomic_path(meta_path) as t_meta:
        t_meta.write_text(json.dumps(meta, indent=2))
    return SceneFiles(ortho=ortho_path, chm=chm_path, truth=truth_path, meta=meta_path,
                      n_trees=int(len(truth)), crs=crs_str, gsd_m=gsd_m, size_m=size_m, dsm=dsm_path)
