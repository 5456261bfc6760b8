"""Monte Carlo propagation of the per-tree AGB uncertainty to trees, groups and the total (pure numpy).

Model (log scale, per tree t and draw d; s = s(t, d) the species of the tree in that draw):

    ln AGB[t, d] = ln AGB_point[t, s] + sum_j L[t, j] sigma_j w[j, d] + b_rho sigma_rho[tax(s)] u[tax(s), d]
                   + sqrt(v[t, s]) z[t, d] - (b_rho sigma_rho[tax(s)]² + c[t, s]) / 2

- ``w[j, d] ~ N(0, 1)`` are the errors SHARED by all trees in an iteration: allometric parameters, the
  run's systematic height bias and crown-diameter bias, the H-D model's E (allometric heights). ``L`` are
  their loadings on ln AGB. They do not average out as trees are added.
- ``u[k, d] ~ N(0, 1)``: the wood-density mean error of each taxon, shared by all trees of that taxon in an
  iteration (the table value is one number for the whole stand); ``b_rho`` is d ln AGB / d ln rho.
- ``z[t, d] ~ N(0, 1)`` carries every independent per-tree error (crown-diameter and height measurement,
  the allometric residuals, tree-to-tree wood density), combined into one normal with variance ``v``.
- The ``-(...)/2`` term centres the terms whose point value is a MEAN: the allometric residuals (the
  published intercepts already contain the log-bias correction, which must not be applied a second time)
  and the wood density (table means). A mean-centred error of a quantity entering ln AGB with loading k
  (e.g. Jucker's DBH, k = 2 * 0.976) is drawn as k (e - sigma²/2): ``c`` = sum k sigma², not k² sigma²,
  so the draws keep the convexity of the chain (the mean of AGB over the DBH residual is about 5 % above
  the plug-in point estimate; the point errs low). Measurement
  errors, the shared biases and parameter errors are not centred: the measured or assumed value is the
  median of the truth, so the draws' median sits on the point estimate. The draws are NOT rescaled
  afterwards.
- Optionally the species is drawn from the classifier's probabilities (per tree and draw); each candidate
  species brings its own ln AGB point, variance, taxon (wood-density error) and plant group (carbon
  fraction).
- Carbon: CO2e[t, d] = AGB[t, d] (1 + R[d]) CF[group(t, d), d] 44/12 with R and CF drawn once per iteration.

Group totals are accumulated per draw into [n_groups, n_draws] arrays, chunk by chunk (memory-bounded),
with the chunks processed by a small thread pool (numpy releases the GIL) and summed in chunk order so that
the same seed gives the same numbers whatever the thread count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
    loadings: np.ndarray  # [n, m] loadings of the shared errors on ln AGB
    param_sd: np.ndarray  # [m] SDs of the shared errors
    plant_group: np.ndarray  # int 0 (angiosperm) / 1 (gymnosperm): selects the carbon fraction
    species_probs: np.ndarray | None = None  # [n, K] probabilities; None: species fixed
    ln_point_k: np.ndarray | None = None  # [n, K] ln AGB point per candidate species
    noise_var_k: np.ndarray | None = None  # [n, K]
    centre_var_k: np.ndarray | None = None  # [n, K] (None: all of noise_var_k)
    plant_group_k: np.ndarray | None = None  # [K] plant group of each candidate species
    taxon: np.ndarray | None = None  # [n] taxon index of each tree (shared wood-density error); None: none
    taxon_k: np.ndarray | None = None  # [K] taxon index of each candidate species
    taxon_ln_sd: np.ndarray | None = None  # [T] SD of the shared ln wood-density error per taxon
    wd_loading: float = 0.0  # d ln AGB / d ln rho (0.976 for Chave eq. 4, 0 for Jucker's direct model)
    centre_var: np.ndarray | None = None  # c[t] <= v[t]: the part whose point value is a mean (None: all)


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

    agb_mean: np.ndarray  # per-tree Monte Carlo mean (kg)
    agb_sd: np.ndarray
    agb_p5: np.ndarray
    agb_p95: np.ndarray
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


def _shared_draws(seed: int, n_draws: int, m: int, n_taxa: int,
                  factors: SharedFactors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared draws w [m, d], taxon draws u [T, d] and CO2e factors [2, d] from their own stream
    (independent of chunking)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    w = rng.standard_normal((m, n_draws))
    r = factors.root_shoot + factors.root_shoot_sd * _centred_normal(rng, n_draws)
    r = np.maximum(r, 0.0)
    z_cf = _centred_normal(rng, n_draws)
    cf = np.stack([np.clip(c + factors.carbon_fraction_sd * z_cf, 0.0, 1.0) for c in factors.carbon_fraction])
    rng_tax = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    u = rng_tax.standard_normal((n_taxa, n_draws))
    return w, u, (1.0 + r)[None, :] * cf * CO2_PER_C


def _centred_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Standard normal draws with their sample mean removed (n > 1), so stand factors average exactly."""
    z = rng.standard_normal(n)
    return z - z.mean() if n > 1 else z * 0.0


def _indicator(groups: dict[str, np.ndarray], sl: slice, n: int) -> tuple[sp.csr_matrix, list]:
    """Sparse 0/1 matrix [rows, n] selecting each (grouping, group id) of the chunk's trees.

    Returns the matrix and, per row, (grouping name or None for the total, group id).
    """
    rows, cols, labels = [], [], []
    cols_all = np.arange(n)
    for name, ids in [(None, np.zeros(n, dtype=np.int64))] + [(k, v[sl]) for k, v in groups.items()]:
        keep = ids >= 0
        uniq, inv = np.unique(ids[keep], return_inverse=True)
        rows.append(inv + len(labels))
        cols.append(cols_all[keep])
        labels.extend((name, int(k)) for k in uniq)
    r, c = np.concatenate(rows), np.concatenate(cols)
    mat = sp.csr_matrix((np.ones(r.shape[0], dtype=np.float32), (r, c)), shape=(len(labels), n))
    return mat, labels


def _chunk(inp: McInputs, w_scaled: np.ndarray, u_scaled: np.ndarray | None, groups: dict[str, np.ndarray],
           sl: slice, seed: int, chunk_index: int, n_draws: int, n_pg: int) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, chunk_index)))
    n = sl.stop - sl.start
    load = inp.loadings[sl]
    var_s = (load**2) @ (inp.param_sd**2)
    species = inp.species_probs is not None
    nv = inp.noise_var[sl]
    cv = nv if inp.centre_var is None else inp.centre_var[sl]
    taxa = (inp.taxon is not None or inp.taxon_k is not None) and u_scaled is not None
    tax_var = (inp.wd_loading * inp.taxon_ln_sd) ** 2 if taxa else None
    tax_c = inp.wd_loading * inp.taxon_ln_sd**2 if taxa else None  # centring of the taxon term
    # shared term plus the per-tree log offset in one product: [L | offset] @ [w ; 1]
    if species:
        offset = np.zeros(n)
    else:
        offset = inp.ln_point[sl] - cv / 2.0
        if taxa:
            offset = offset - tax_c[inp.taxon[sl]] / 2.0
    ln = np.concatenate([load, offset[:, None]], axis=1).astype(np.float32) @ w_scaled
    z = rng.standard_normal((n, n_draws), dtype=np.float32)
    pg_draw = None
    if species:
        probs = inp.species_probs[sl]
        cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1).astype(np.float32)
        u = rng.random((n, n_draws), dtype=np.float32)
        cls = (u[:, :, None] > cum[:, None, :]).sum(axis=2)
        np.minimum(cls, probs.shape[1] - 1, out=cls)
        lp = np.take_along_axis(inp.ln_point_k[sl], cls, axis=1)
        nv_d = np.take_along_axis(inp.noise_var_k[sl], cls, axis=1)
        cv_d = nv_d if inp.centre_var_k is None else np.take_along_axis(inp.centre_var_k[sl], cls, axis=1)
        ln += (lp - cv_d / 2.0).astype(np.float32)
        ln += np.sqrt(nv_d).astype(np.float32) * z
        if taxa:
            tax = inp.taxon_k[cls]
            ln += u_scaled[tax, np.arange(n_draws)[None, :]]
            ln -= (tax_c[tax] / 2.0).astype(np.float32)
        if n_pg > 1:
            pg_draw = inp.plant_group_k[cls]
        del cls, lp, nv_d, cv_d, u
    else:
        z *= np.sqrt(nv).astype(np.float32)[:, None]
        ln += z
        if taxa:
            ln += u_scaled[inp.taxon[sl]]
    del z
    agb = np.exp(ln, out=ln)
    if not species:
        # each tree's draws are lognormal with log-variance var_s + v (+ taxon term): exact statistics
        t2 = tax_var[inp.taxon[sl]] if taxa else 0.0
        s2 = var_s + nv + t2
        mu = inp.ln_point[sl] - (cv + (tax_c[inp.taxon[sl]] if taxa else 0.0)) / 2.0
        mean = np.exp(mu + s2 / 2.0)
        sd = mean * np.sqrt(np.expm1(s2))
        p5, p95 = np.exp(mu - Z95 * np.sqrt(s2)), np.exp(mu + Z95 * np.sqrt(s2))
    else:  # a mixture over species: empirical statistics of the draws
        mean = agb.mean(axis=1, dtype=np.float64)
        sd = agb.std(axis=1, dtype=np.float64, ddof=1) if n_draws > 1 else np.zeros(n)
        k5, k95 = int(round(0.05 * (n_draws - 1))), int(round(0.95 * (n_draws - 1)))
        part = np.partition(agb, (k5, k95), axis=1)
        p5, p95 = part[:, k5].astype(np.float64), part[:, k95].astype(np.float64)
        del part
    mat, labels = _indicator(groups, sl, n)
    if n_pg == 1:
        sums = np.asarray(mat @ agb, dtype=np.float64)[None]
    elif pg_draw is None:
        pg = inp.plant_group[sl]
        sums = np.stack([np.asarray(mat @ (agb * (pg == g)[:, None]), dtype=np.float64) for g in range(n_pg)])
    else:
        sums = np.stack([np.asarray(mat @ np.where(pg_draw == g, agb, 0.0), dtype=np.float64)
                         for g in range(n_pg)])
    return {"mean": mean, "sd": sd, "p5": p5, "p95": p95, "labels": labels, "sums": sums}


def _chunks(n: int, size: int) -> Iterator[tuple[int, slice]]:
    for i, start in enumerate(range(0, n, size)):
        yield i, slice(start, min(start + size, n))


def run_monte_carlo(inp: McInputs, factors: SharedFactors, groups: dict[str, np.ndarray] | None = None,
                    n_draws: int = 1000, seed: int = 0, threads: int | None = None) -> McResult:
    """Draw ``n_draws`` iterations; per-tree AGB stats (kg) and per-group/total AGB and CO2e draws (kg).

    ``groups`` maps a name to int group ids per tree (-1 = not in any group).
    """
    n = int(inp.ln_point.shape[0])
    # one carbon fraction for both plant groups: no need to keep them apart (halves the accumulators)
    n_pg = 1 if factors.carbon_fraction[0] == factors.carbon_fraction[1] else 2
    groups = {k: np.asarray(v, dtype=np.int64) for k, v in (groups or {}).items()}
    n_groups = {k: (int(v.max()) + 1 if v.size and v.max() >= 0 else 0) for k, v in groups.items()}
    n_taxa = int(inp.taxon_ln_sd.shape[0]) if inp.taxon_ln_sd is not None else 0
    w, u, co2e_factor = _shared_draws(seed, n_draws, inp.param_sd.shape[0], n_taxa, factors)
    w_scaled = np.vstack([inp.param_sd[:, None] * w, np.ones((1, n_draws))]).astype(np.float32)
    u_scaled = None
    if n_taxa and inp.wd_loading:
        u_scaled = (inp.wd_loading * inp.taxon_ln_sd[:, None] * u).astype(np.float32)
    acc = {k: np.zeros((n_pg, max(g, 1), n_draws)) for k, g in n_groups.items()}
    total = np.zeros((n_pg, n_draws))
    stats = {k: np.zeros(n) for k in ("mean", "sd", "p5", "p95")}
    threads = threads or min(2, os.cpu_count() or 1)
    jobs = list(_chunks(n, chunk_size(n_draws)))

    def work(job: tuple[int, slice]) -> tuple[slice, dict]:
        i, sl = job
        return sl, _chunk(inp, w_scaled, u_scaled, groups, sl, seed, i, n_draws, n_pg)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # windowed submission keeps at most 2 x threads chunk results alive; summed in chunk order
        window = 2 * threads
        for start in range(0, len(jobs), window):
            for sl, part in pool.map(work, jobs[start:start + window]):
                for key in stats:
                    stats[key][sl] = part[key]
                for row, (name, gid) in enumerate(part["labels"]):
                    if name is None:
                        total += part["sums"][:, row]
                    else:
                        acc[name][:, gid] += part["sums"][:, row]
    res = McResult(agb_mean=stats["mean"], agb_sd=stats["sd"], agb_p5=stats["p5"], agb_p95=stats["p95"],
                   n_draws=n_draws, seed=seed, co2e_factor=co2e_factor)
    for name, a in acc.items():
        g = n_groups[name]
        res.group_agb[name] = a.sum(axis=0)[:g]
        res.group_co2e[name] = sum(a[k] * co2e_factor[k] for k in range(n_pg))[:g]
    res.total_agb = total.sum(axis=0)
    res.total_co2e = sum(total[k] * co2e_factor[k] for k in range(n_pg))
    return res


def interval_stats(draws_kg: np.ndarray, point_kg: np.ndarray | float | None = None) -> dict[str, np.ndarray]:
    """Centre, SD, 90% and 95% intervals (t) and the half-widths (% of the centre) of draws [..., d] in kg.

    The centre is ``point_kg`` (the point estimate, the project's convention for totals and tables) when
    given, else the mean of the draws; the SD and the intervals always come from the draws.
    """
    d = np.asarray(draws_kg, dtype=float) / 1000.0
    mean = d.mean(axis=-1) if point_kg is None else np.asarray(point_kg, dtype=float) / 1000.0
    sd = d.std(axis=-1, ddof=1) if d.shape[-1] > 1 else np.zeros_like(mean)
    q = np.quantile(d, [0.05, 0.95, 0.025, 0.975], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        hw90 = np.where(mean > 0, (q[1] - q[0]) / 2.0 / mean * 100.0, np.nan)
        hw95 = np.where(mean > 0, (q[3] - q[2]) / 2.0 / mean * 100.0, np.nan)
    return {"mean": mean, "sd": sd, "ci90_low": q[0], "ci90_high": q[1], "ci95_low": q[2], "ci95_high": q[3],
            "halfwidth90_pct": hw90, "halfwidth95_pct": hw95}
