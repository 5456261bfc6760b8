"""Budget allocation: one shared level across layers, solved by a 1-D root search to meet a budget.

Every method maps a scalar level t (PFP: the error level epsilon; uniform: the keep fraction; L1: a
global score threshold; random: a width multiplier) to per-layer keep counts; ``solve_shared_level``
finds the t at which the network cost (parameters or MACs, see ``structured.ChannelPlan.cost``) meets the
target with scipy's Brent method, searching log10(t) when the level spans decades.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq


@dataclass(frozen=True)
class LevelSolution:
    level: float
    cost: float
    target: float

    @property
    def relative_error(self) -> float:
        return (self.cost - self.target) / self.target


def solve_shared_level(cost_at: Callable[[float], float], target: float, lo: float, hi: float,
                       log: bool = True, xtol: float = 1e-6) -> LevelSolution:
    """Level t in [lo, hi] with cost_at(t) = target (cost monotone in t, either direction).

    If the cost is a step function the root is a step edge; the side whose cost does not exceed the
    target is returned. If the target lies outside [cost(lo), cost(hi)] the nearer end is returned.
    """
    def x_to_t(x: float) -> float:
        return 10.0 ** x if log else x

    a, b = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
    fa, fb = cost_at(x_to_t(a)) - target, cost_at(x_to_t(b)) - target
    if fa * fb > 0:
        best = a if abs(fa) < abs(fb) else b
        return LevelSolution(x_to_t(best), cost_at(x_to_t(best)), target)
    root = brentq(lambda x: cost_at(x_to_t(x)) - target, a, b, xtol=xtol)
    # step functions: look at both sides of the edge and prefer the one within the budget
    candidates = [root - 2 * xtol, root, root + 2 * xtol]
    scored = [(x, cost_at(x_to_t(x))) for x in candidates]
    within = [(x, c) for x, c in scored if c <= target]
    x, c = max(within, key=lambda xc: xc[1]) if within else min(scored, key=lambda xc: abs(xc[1] - target))
    return LevelSolution(x_to_t(x), c, target)


def pfp_expected_kept(sensitivity: np.ndarray, alpha: float, epsilon: float) -> float:
    """PFP keep count of one layer at error level ``epsilon`` (continuous).

    S = alpha * sum_j s_j; sample count m(eps) = 3 (6 + 2 eps) S / eps^2; kept = expected number of
    distinct channels among m draws with p_j = s_j / sum s: sum_j 1 - (1 - p_j)^m.
    """
    s = np.asarray(sensitivity, dtype=float)
    total = float(s.sum())
    if total <= 0:
        return float(len(s))
    m = 3.0 * (6.0 + 2.0 * epsilon) * alpha * total / epsilon ** 2
    p = s / total
    with np.errstate(divide="ignore"):
        log1m = np.log1p(-np.minimum(p, 1 - 1e-15))
    return float(np.sum(-np.expm1(m * log1m)))


def random_width_fractions(n_layers: int, rng: np.random.Generator, low: float = 0.1) -> np.ndarray:
    """Random relative widths in [low, 1] per layer (before the shared multiplier is applied)."""
    return rng.uniform(low, 1.0, size=n_layers)
