"""Baselines under the same budget as PFP: L1-norm filter pruning, uniform width, random widths.

All three remove channels through the same ``structured.ChannelPlan`` (Torch-Pruning groups) and
meet the budget with the same 1-D level search; they differ in how widths are allocated:
- ``l1``: channels ranked by group L1 norm (sum of |filter| over the group's producers), normalised by
  the group mean so one global threshold spans layers (Li et al., 2017, with a global threshold);
- ``uniform``: the same keep fraction in every group (a width multiplier), L1 choice within a group;
- ``random``: random relative widths per group scaled by one multiplier, L1 choice within a group
  (Li, Adamczewski et al., CVPR 2022); ``random_search`` keeps the best of N after a short fine-tune.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
from torch import nn

from models.compression.structured import ChannelPlan, allocate, prune_channels


def prune_l1(model: nn.Module, input_shape: tuple[int, int, int], target_ratio: float,
             budget: str = "macs", round_to: int | None = None,
             ignored_layers: Iterable[nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """Global L1-norm filter pruning (layer-mean-normalised scores, one threshold)."""
    plan = ChannelPlan(model, input_shape, ignored_layers)
    scores = plan.group_l1()
    normalised = [s / max(float(s.mean()), 1e-12) for s in scores]

    def keep_at(tau: float) -> np.ndarray:
        return np.array([float((s >= tau).sum()) for s in normalised])

    keep, sol = allocate(plan, keep_at, target_ratio, budget, lo=1e-4, hi=1e3, round_to=round_to)
    prune_channels(plan, keep, scores)
    return model, {"method": "l1", "threshold": sol.level, "keep": keep.tolist()}


def prune_uniform(model: nn.Module, input_shape: tuple[int, int, int], target_ratio: float,
                  budget: str = "macs", round_to: int | None = None,
                  ignored_layers: Iterable[nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """The same keep fraction in every channel group (L1 choice of channels within a group)."""
    plan = ChannelPlan(model, input_shape, ignored_layers)
    scores = plan.group_l1()
    keep, sol = allocate(plan, lambda f: f * plan.full_keep, target_ratio, budget, lo=0.0, hi=1.0, log=False,
                         round_to=round_to)
    prune_channels(plan, keep, scores)
    return model, {"method": "uniform", "keep_fraction": sol.level, "keep": keep.tolist()}


def prune_random(model: nn.Module, input_shape: tuple[int, int, int], target_ratio: float,
                 budget: str = "macs", seed: int = 0, round_to: int | None = None,
                 ignored_layers: Iterable[nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """Random relative widths per group in [0.1, 1], scaled by one multiplier to meet the budget."""
    plan = ChannelPlan(model, input_shape, ignored_layers)
    scores = plan.group_l1()
    rng = np.random.default_rng(seed)
    rel = rng.uniform(0.1, 1.0, size=len(plan.groups))
    keep, sol = allocate(plan, lambda t: t * rel * plan.full_keep, target_ratio, budget, lo=0.0,
                         hi=1.0 / rel.min(), log=False, round_to=round_to)
    prune_channels(plan, keep, scores)
    return model, {"method": "random", "seed": seed, "multiplier": sol.level, "keep": keep.tolist()}


def random_search(model: nn.Module, input_shape: tuple[int, int, int], target_ratio: float,
                  finetune: Callable[[nn.Module], nn.Module], score: Callable[[nn.Module], float],
                  n_candidates: int = 4, budget: str = "macs", seed: int = 0,
                  round_to: int | None = None) -> tuple[nn.Module, dict]:
    """Best of ``n_candidates`` random-width networks after ``finetune`` (higher ``score`` is better)."""
    results = []
    best_model, best_rec, best_score = None, None, -np.inf
    for i in range(n_candidates):
        cand, rec = prune_random(copy.deepcopy(model), input_shape, target_ratio, budget, seed=seed + i,
                                 round_to=round_to)
        cand = finetune(cand)
        s = float(score(cand))
        results.append({"seed": seed + i, "score": s})
        if s > best_score:
            best_model, best_rec, best_score = cand, rec, s
    best_rec = dict(best_rec, candidates=results)
    return best_model, best_rec
