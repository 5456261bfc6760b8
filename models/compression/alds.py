"""ALDS: automatic layer-wise decomposition selection (Liebenwein et al., NeurIPS 2021).

Per conv layer (weight f x c x kh x kw, groups=1) the input channels are split into k contiguous
groups; each group's folded weight W_i (f x (c/k)kh kw) is truncated to rank r by SVD (Eckart-Young-
Mirsky), with relative error eps(k, r) = max_i sigma_{r+1}(W_i) / sigma_1(W). The (k, r) of all
layers are chosen together to minimise the maximum relative error under the global budget: for fixed
k a shared error level is solved by a 1-D root search (each layer gets the smallest rank within it);
then each layer keeps its cost and picks the k with the smallest error; alternate, with restarts, and
keep the lowest max error. A factorised layer is a grouped conv (c -> k r, kh x kw, groups=k) followed
by a 1 x 1 conv (k r -> f) carrying the bias. A layer is left dense where factoring would not save.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.compression.allocation import solve_shared_level
from models.compression.cost import layer_output_sizes


@dataclass
class LayerSpectrum:
    name: str
    f: int
    c: int
    taps: int
    spatial: int
    bias: bool
    sigma1: float
    spectra: dict[int, np.ndarray]  # k -> singular values [k, min(f, c/k taps)]

    def dense_cost(self, budget: str) -> float:
        w = self.f * self.c * self.taps
        return w * self.spatial if budget == "macs" else w + (self.f if self.bias else 0)

    def factored_cost(self, k: int, r: int, budget: str) -> float:
        w = r * (k * self.f + self.c * self.taps)
        return w * self.spatial if budget == "macs" else w + (self.f if self.bias else 0)

    def max_rank(self, k: int) -> int:
        return self.spectra[k].shape[1]

    def error(self, k: int, r: int) -> float:
        sv = self.spectra[k]
        if r >= sv.shape[1]:
            return 0.0
        return float(sv[:, r].max() / self.sigma1) if self.sigma1 > 0 else 0.0

    def rank_for_error(self, k: int, eps: float) -> int:
        sv = self.spectra[k]
        errs = np.append(sv.max(0) / max(self.sigma1, 1e-30), 0.0)  # errs[r] = error at rank r
        ok = np.nonzero(errs <= eps)[0]
        return max(1, int(ok[0]))

    def cost(self, k: int, r: int, budget: str) -> float:
        """Cost of the layer as materialised: dense when factoring would not save."""
        return min(self.dense_cost(budget), self.factored_cost(k, r, budget))

    def is_factored(self, k: int, r: int, budget: str) -> bool:
        return self.factored_cost(k, r, budget) < self.dense_cost(budget)


def _divisors(c: int, k_max: int) -> list[int]:
    return [k for k in range(1, min(c, k_max) + 1) if c % k == 0]


def folded_groups(weight: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Split the input channels of ``weight`` [f, c, kh, kw] into k groups, each folded to f x (c/k kh kw)."""
    f = weight.shape[0]
    return [w.reshape(f, -1) for w in torch.chunk(weight, k, dim=1)]


def layer_spectra(model: nn.Module, input_shape: tuple[int, int, int], k_max: int = 8,
                  skip: set[str] | None = None) -> list[LayerSpectrum]:
    """Singular values of every dense conv for every candidate k (divisors of c up to ``k_max``)."""
    sizes = layer_output_sizes(model, torch.zeros(1, *input_shape))
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or name not in sizes or (skip and name in skip):
            continue
        w = m.weight.detach().double()
        sigma1 = float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))
        spectra = {}
        for k in _divisors(m.in_channels, k_max):
            svs = [torch.linalg.svdvals(g).numpy() for g in folded_groups(w, k)]
            spectra[k] = np.stack(svs)
        out.append(LayerSpectrum(name, m.out_channels, m.in_channels, int(np.prod(m.kernel_size)),
                                 int(np.prod(sizes[name][1:])), m.bias is not None, sigma1, spectra))
    return out


@dataclass
class AldsAllocation:
    ks: list[int]
    ranks: list[int]
    max_error: float
    cost: float
    target: float


def _solve_ranks(layers: list[LayerSpectrum], ks: list[int], target: float, fixed: float,
                 budget: str) -> tuple[list[int], float]:
    def total(eps: float) -> float:
        pairs = zip(layers, ks, strict=True)
        return fixed + sum(ly.cost(k, ly.rank_for_error(k, eps), budget) for ly, k in pairs)

    sol = solve_shared_level(total, target, 1e-6, 10.0, log=True, xtol=1e-7)
    ranks = [ly.rank_for_error(k, sol.level) for ly, k in zip(layers, ks, strict=True)]
    return ranks, sol.level


def _max_error(layers, ks, ranks, budget) -> float:
    return max((ly.error(k, r) if ly.is_factored(k, r, budget) else 0.0)
               for ly, k, r in zip(layers, ks, ranks, strict=True))


def _best_k_for_budget(ly: LayerSpectrum, spend: float, budget: str) -> tuple[int, int]:
    best = None
    for k in ly.spectra:
        per_rank = ly.factored_cost(k, 1, budget) - (ly.f if (budget == "params" and ly.bias) else 0)
        fixed = ly.f if (budget == "params" and ly.bias) else 0
        r = int(min(ly.max_rank(k), max(1, (spend - fixed) // per_rank)))
        err = ly.error(k, r) if ly.is_factored(k, r, budget) else 0.0
        if ly.cost(k, r, budget) > spend + 1e-9 and r > 1:
            continue
        if best is None or err < best[0] - 1e-15:
            best = (err, k, r)
    return best[1], best[2]


def allocate_alds(layers: list[LayerSpectrum], total_cost: float, target_ratio: float, budget: str = "macs",
                  n_restarts: int = 15, n_iters: int = 4, seed: int = 0) -> AldsAllocation:
    """(k, rank) per layer minimising the max relative error with total cost = (1 - ratio) x dense."""
    target = (1.0 - target_ratio) * total_cost
    fixed = total_cost - sum(ly.dense_cost(budget) for ly in layers)
    rng = np.random.default_rng(seed)
    best: AldsAllocation | None = None
    starts = [1, 2, 4, 8]
    for restart in range(n_restarts):
        if restart < len(starts):
            ks = [max(k for k in ly.spectra if k <= starts[restart]) for ly in layers]
        else:
            ks = [int(rng.choice(list(ly.spectra))) for ly in layers]
        for _ in range(n_iters):
            ranks, _ = _solve_ranks(layers, ks, target, fixed, budget)
            new_ks = []
            new_ranks = []
            for ly, k, r in zip(layers, ks, ranks, strict=True):
                if not ly.is_factored(k, r, budget):
                    new_ks.append(k)
                    new_ranks.append(r)
                    continue
                k2, r2 = _best_k_for_budget(ly, ly.cost(k, r, budget), budget)
                new_ks.append(k2)
                new_ranks.append(r2)
            if new_ks == ks:
                break
            ks = new_ks
        ranks, _ = _solve_ranks(layers, ks, target, fixed, budget)
        cost = fixed + sum(ly.cost(k, r, budget) for ly, k, r in zip(layers, ks, ranks, strict=True))
        err = _max_error(layers, ks, ranks, budget)
        cand = AldsAllocation(list(ks), list(ranks), err, cost, target)
        within = abs(cost - target) / target <= 0.02
        best_off = best is not None and abs(best.cost - best.target) / best.target > 0.02
        if best is None or (within and (err < best.max_error or best_off)):
            best = cand
    return best


class FactorisedConv2d(nn.Sequential):
    """Grouped k x k conv (c -> k r, groups=k) then 1 x 1 conv (k r -> f): a rank-r-per-group conv."""

    def __init__(self, conv: nn.Conv2d, k: int, r: int):
        f, c = conv.out_channels, conv.in_channels
        kh, kw = conv.kernel_size
        project = nn.Conv2d(c, k * r, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                            dilation=conv.dilation, groups=k, bias=False, padding_mode=conv.padding_mode)
        combine = nn.Conv2d(k * r, f, 1, bias=conv.bias is not None)
        w = conv.weight.detach().double()
        p_w = torch.zeros(k * r, c // k, kh, kw, dtype=torch.float64)
        c_w = torch.zeros(f, k * r, dtype=torch.float64)
        for i, wi in enumerate(folded_groups(w, k)):
            u, s, vh = torch.linalg.svd(wi, full_matrices=False)
            rr = min(r, s.shape[0])
            root = s[:rr].sqrt()
            p_w[i * r:i * r + rr] = (root[:, None] * vh[:rr]).reshape(rr, c // k, kh, kw)
            c_w[:, i * r:i * r + rr] = u[:, :rr] * root[None, :]
        project.weight.data.copy_(p_w.to(conv.weight.dtype))
        combine.weight.data.copy_(c_w.reshape(f, k * r, 1, 1).to(conv.weight.dtype))
        if conv.bias is not None:
            combine.bias.data.copy_(conv.bias.detach())
        super().__init__(project, combine)
        self.k, self.r = k, r


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_alds(model: nn.Module, layers: list[LayerSpectrum], alloc: AldsAllocation,
               budget: str = "macs") -> nn.Module:
    """Replace each layer that saves by its factorised pair (in place)."""
    for ly, k, r in zip(layers, alloc.ks, alloc.ranks, strict=True):
        if ly.is_factored(k, r, budget):
            _set_module(model, ly.name, FactorisedConv2d(model.get_submodule(ly.name), k, r))
    return model


def compress_alds(model: nn.Module, input_shape: tuple[int, int, int], target_ratio: float,
                  budget: str = "macs", k_max: int = 8, n_restarts: int = 15, seed: int = 0,
                  skip: set[str] | None = None) -> tuple[nn.Module, dict]:
    """ALDS to ``target_ratio`` of the budget removed; returns the model and the allocation record."""
    from models.compression.cost import count_cost

    dense = count_cost(model, input_shape)
    total = float(dense.macs if budget == "macs" else dense.params)
    layers = layer_spectra(model, input_shape, k_max=k_max, skip=skip)
    alloc = allocate_alds(layers, total, target_ratio, budget, n_restarts=n_restarts, seed=seed)
    apply_alds(model, layers, alloc, budget)
    return model, {"method": "alds", "max_relative_error": alloc.max_error,
                   "layers": {ly.name: [k, r] for ly, k, r in zip(layers, alloc.ks, alloc.ranks, strict=True)
                              if ly.is_factored(k, r, budget)}}
