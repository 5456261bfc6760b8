"""Monte Carlo propagation of the per-tree AGB uncertainty to trees, groups and the total (pure numpy).

Model (log scale, per tree t and draw d):

    ln AGB[t, d] = ln AGB_point[t] + sum_j L[t, j] sigma_j w[j, d] + sqrt(v[t]) z[t, d]
                   - (var_S[t] + v[t]) / 2

- ``w[j, d] ~ N(0, 1)`` are the allometric PARAMETER errors: one draw per iteration shared by all trees, so
  they do not average out with more trees. ``L`` are the loadings of the parameters on ln AGB.
- ``z[t, d] ~ N(0, 1)`` carries every independent per-tree error (crown-diameter and height measurement,
  the allometric residuals, wood density), combined into one normal with variance ``v[t]`` because they add
  on the log scale.
- The ``-(var_S + v)/2`` term centres the draws so that their expectation is the point estimate: the
  published intercepts already contain the log-bias correction and it must not be applied a second time.
  After drawing, each tree's draws are rescaled by ``point / mean(draws)`` (typically within 1%), so the
  reported per-tree Monte Carlo mean equals the point estimate at the recorded D, H and wood density.
- Optionally the species is drawn from the classifier's probabilities (per tree and draw); each candidate
  species has its own ln AGB point and variance.
- Carbon: CO2e[t, d] = AGB[t, d] (1 + R[d]) CF[group(t), d] 44/12 with R and CF drawn once per iteration.

Group totals are accumulated per draw into [n_groups, n_draws] arrays, chunk by chunk (memory-bounded),
with the chunks processed by a small thread pool (numpy releases the GIL) and summed in chunk order so that
the same seed gives the same numbers whatever the thread count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from pipeline.carbon.allometry import CO2_PER_C

# Elements (trees x draws) per chunk: bounds the memory to about 15 MB per worker. 1 << 20 held 140 MB at
# 23,800 trees with species draws (4 chunks in flight); 1 << 18 holds 58 MB for 20 % more time.
CHUNK_ELEMENTS = 1 << 16
Z95 = 1.6448536269514722  # standard normal 95th percentile


@dataclass
class McInputs:
    """Per-tree terms of the model above (arrays of length n unless stated)."""

    ln_point: np.ndarray  # ln AGB point estimate (kg) at the recorded species
    noise_var: np.ndarray  # v[t]: variance of the independent per-tree log error
    loadings: np.ndarray  # [n, m] loadings of the shared parameter errors
    param_sd: np.ndarray  # [m] SDs of the shared parameter errors
    plant_group: np.ndarray  # int 0 (angiosperm) / 1 (gymnosperm): selects the carbon fraction
    species_probs: np.ndarray | None = None  # [n, K] probabilities; None: species fixed
    ln_point_k: np.ndarray | None = None  # [n, K] ln AGB point per candidate species
    noise_var_k: np.ndarray | None = None  # [n, K]


@dataclass
class SharedFactors:
    """Stand-level factors drawn once per iteration: root-to-shoot ratio and carbon fraction."""

    root_shoot: float
    root_shoot_sd: float
    carbon_fraction: tuple[float, float]  # (angiosperm, gymnosperm)
    carbon_fraction_sd: float


@dataclass
class McResult:
    """Per-tree AGB statistics (kg) and per-group / total draws (kg)."""

    agb_mean: np.ndarray
    agb_sd: np.ndarray
    agb_p5: np.ndarray
    agb_p95: np.ndarray
    centring: np.ndarray  # point / raw MC mean per tree (the rescaling applied)
    group_agb: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [G, d]
    group_co2e: dict[str, np.ndarray] = field(default_factory=dict)
    total_agb: np.ndarray | None = None  # [d]
    total_co2e: np.ndarray | None = None
    co2e_factor: np.ndarray | None = None  # [2, d]: (1 + R) CF 44/12 per plant group
    n_draws: int = 0
    seed: int = 0


def chunk_size(n_draws: int) -> int:
    """Trees per chunk for ``n_draws`` (fixed for a given n_draws: part of the reproducibility)."""
    return max(16, CHUNK_ELEMENTS // max(n_draws, 1))


def _shared_draws(seed: int, n_draws: int, m: int, factors: SharedFactors) -> tuple[np.ndarray, np.ndarray]:
    """Parameter draws w [m, d] and CO2e factors [2, d] from their own stream (independent of chunking)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    w = rng.standard_normal((m, n_draws))
    r = factors.root_shoot + factors.root_shoot_sd * _centred_normal(rng, n_draws)
    r = np.maximum(r, 0.0)
    z_cf = _centred_normal(rng, n_draws)
    cf = np.stack([np.clip(c + factors.carbon_fraction_sd * z_cf, 0.0, 1.0) for c in factors.carbon_fraction])
    return w, (1.0 + r)[None, :] * cf * CO2_PER_C


def _centred_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Standard normal draws with their sample mean removed (n > 1), so stand factors average exactly."""
    z = rng.standard_normal(n)
    return z - z.mean() if n > 1 else z * 0.0


def _indicator(groups: dict[str, np.ndarray], sl: slice, pg: np.ndarray,
               weights: np.ndarray) -> tuple[sp.csr_matrix, list]:
    """Sparse matrix [rows, n] selecting each (grouping, group id, plant group) of the chunk's trees, with
    each tree's weight (its centring factor) as the entry.

    Returns the matrix and, per row, (grouping name or None for the total, group id, plant group).
    """
    n = pg.shape[0]
    rows, cols, vals, labels = [], [], [], []
    cols_all = np.arange(n)
    for name, ids in [(None, np.zeros(n, dtype=np.int64))] + [(k, v[sl]) for k, v in groups.items()]:
        key = np.where(ids >= 0, 2 * ids + pg, -1)
        keep = key >= 0
        uniq, inv = np.unique(key[keep], return_inverse=True)
        rows.append(inv + len(labels))
        cols.append(cols_all[keep])
        vals.append(weights[keep])
        labels.extend((name, int(k // 2), int(k % 2)) for k in uniq)
    r, c = np.concatenate(rows), np.concatenate(cols)
    v = np.concatenate(vals).astype(np.float32)
    mat = sp.csr_matrix((v, (r, c)), shape=(len(labels), n))
    return mat, labels


def _chunk(inp: McInputs, w_scaled: np.ndarray, groups: dict[str, np.ndarray], sl: slice, seed: int,
           chunk_index: int, n_draws: int) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, chunk_index)))
    n = sl.stop - sl.start
    load = inp.loadings[sl]
    var_s = (load**2) @ (inp.param_sd**2)
    point = np.exp(inp.ln_point[sl])
    species = inp.species_probs is not None
    nv = inp.noise_var[sl]
    # shared parameter term plus the per-tree log offset in one product: [L | offset] @ [w ; 1]
    offset = -var_s / 2.0 if species else inp.ln_point[sl] - (nv + var_s) / 2.0
    ln = np.concatenate([load, offset[:, None]], axis=1).astype(np.float32) @ w_scaled
    z = rng.standard_normal((n, n_draws), dtype=np.float32)
    if species:
        probs = inp.species_probs[sl]
        cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1).astype(np.float32)
        u = rng.random((n, n_draws), dtype=np.float32)
        cls = (u[:, :, None] > cum[:, None, :]).sum(axis=2)
        np.minimum(cls, probs.shape[1] - 1, out=cls)
        lp = np.take_along_axis(inp.ln_point_k[sl], cls, axis=1)
        nv = np.take_along_axis(inp.noise_var_k[sl], cls, axis=1)
        ln += (lp - nv / 2.0).astype(np.float32)
        ln += np.sqrt(nv).astype(np.float32) * z
    else:
        z *= np.sqrt(nv).astype(np.float32)[:, None]
        ln += z
    del z
    agb = np.exp(ln, out=ln)
    raw_mean = agb.mean(axis=1, dtype=np.float64)
    centring = np.where(raw_mean > 0, point / raw_mean, 1.0)
    # the draws are used as agb * centring (applied through the group-sum weights and to the statistics)
    if not species:
        # each tree's draws are lognormal with log-variance var_s + v: exact per-tree statistics
        s2 = var_s + nv
        mu = np.log(point) - s2 / 2.0
        sd = point * np.sqrt(np.expm1(s2))
        p5, p95 = np.exp(mu - Z95 * np.sqrt(s2)), np.exp(mu + Z95 * np.sqrt(s2))
    else:  # a mixture over species: empirical statistics of the draws
        sd = centring * agb.std(axis=1, dtype=np.float64, ddof=1) if n_draws > 1 else np.zeros(n)
        k5, k95 = int(round(0.05 * (n_draws - 1))), int(round(0.95 * (n_draws - 1)))
        part = np.partition(agb, (k5, k95), axis=1)
        p5, p95 = centring * part[:, k5], centring * part[:, k95]
        del part
    pg = inp.plant_group[sl].astype(np.int64)
    mat, labels = _indicator(groups, sl, pg, centring)
    sums = np.asarray(mat @ agb, dtype=np.float64)
    return {"mean": point, "sd": sd, "p5": p5, "p95": p95, "centring": centring, "labels": labels,
            "sums": sums}


def _chunks(n: int, size: int) -> Iterator[tuple[int, slice]]:
    for i, start in enumerate(range(0, n, size)):
        yield i, slice(start, min(start + size, n))


def run_monte_carlo(inp: McInputs, factors: SharedFactors, groups: dict[str, np.ndarray] | None = None,
                    n_draws: int = 1000, seed: int = 0, threads: int | None = None) -> McResult:
    """Draw ``n_draws`` iterations; per-tree AGB stats (kg) and per-group/total AGB and CO2e draws (kg).

    ``groups`` maps a name to int group ids per tree (-1 = not in any group).
    """
    n = int(inp.ln_point.shape[0])
    if factors.carbon_fraction[0] == factors.carbon_fraction[1]:
        # one carbon fraction for both plant groups: no need to keep them apart (halves the accumulators)
        inp = replace(inp, plant_group=np.zeros(n, dtype=np.int64))
    groups = {k: np.asarray(v, dtype=np.int64) for k, v in (groups or {}).items()}
    n_groups = {k: (int(v.max()) + 1 if v.size and v.max() >= 0 else 0) for k, v in groups.items()}
    w, co2e_factor = _shared_draws(seed, n_draws, inp.param_sd.shape[0], factors)
    w_scaled = np.vstack([inp.param_sd[:, None] * w, np.ones((1, n_draws))]).astype(np.float32)
    n_pg = int(inp.plant_group.max()) + 1 if n else 1
    acc = {k: np.zeros((n_pg, max(g, 1), n_draws)) for k, g in n_groups.items()}
    total = np.zeros((2, n_draws))
    stats = {k: np.zeros(n) for k in ("mean", "sd", "p5", "p95", "centring")}
    threads = threads or min(2, os.cpu_count() or 1)
    size = chunk_size(n_draws)
    jobs = list(_chunks(n, size))

    def work(job: tuple[int, slice]) -> tuple[slice, dict]:
        i, sl = job
        return sl, _chunk(inp, w_scaled, groups, sl, seed, i, n_draws)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # windowed submission keeps at most 2 x threads chunk results alive; summed in chunk order
        window = 2 * threads
        for start in range(0, len(jobs), window):
            for sl, part in pool.map(work, jobs[start:start + window]):
                for key in stats:
                    stats[key][sl] = part[key]
                for (name, gid, pg), row in zip(part["labels"], part["sums"], strict=True):
                    if name is None:
                        total[pg] += row
                    else:
                        acc[name][pg, gid] += row
    res = McResult(agb_mean=stats["mean"], agb_sd=stats["sd"], agb_p5=stats["p5"], agb_p95=stats["p95"],
                   centring=stats["centring"], n_draws=n_draws, seed=seed, co2e_factor=co2e_factor)
    for name, a in acc.items():
        g = n_groups[name]
        res.group_agb[name] = a.sum(axis=0)[:g]
        res.group_co2e[name] = sum(a[k] * co2e_factor[k] for k in range(n_pg))[:g]
    res.total_agb = total[0] + total[1]
    res.total_co2e = total[0] * co2e_factor[0] + total[1] * co2e_factor[1]
    return res


def interval_stats(draws_kg: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, SD, 90% and 95% intervals (t) and the 90% half-width (% of the mean) of draws [..., d] in kg."""
    d = np.asarray(draws_kg, dtype=float) / 1000.0
    mean = d.mean(axis=-1)
    sd = d.std(axis=-1, ddof=1) if d.shape[-1] > 1 else np.zeros_like(mean)
    q = np.quantile(d, [0.05, 0.95, 0.025, 0.975], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        hw90 = np.where(mean > 0, (q[1] - q[0]) / 2.0 / mean * 100.0, np.nan)
        hw95 = np.where(mean > 0, (q[3] - q[2]) / 2.0 / mean * 100.0, np.nan)
    return {"mean": mean, "sd": sd, "ci90_low": q[0], "ci90_high": q[1], "ci95_low": q[2], "ci95_high": q[3],
            "halfwidth90_pct": hw90, "halfwidth95_pct": hw95}
