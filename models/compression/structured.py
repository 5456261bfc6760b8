"""Physical channel removal through Torch-Pruning's DependencyGraph, with our importance scores.

``ChannelPlan`` traces the network once with ``torch_pruning.DependencyGraph`` and lists its coupled
channel groups: the channels joined by residual adds (an encoder stage trunk) or read through a U-Net
skip concatenation share one group, and the group records every producer (conv/linear out-channels,
norms) and every consumer slice (conv/linear in-channels, with concat offsets already mapped by
Torch-Pruning). From that list the plan computes the parameters and MACs of any keep-count vector
analytically, so the budget search never touches the network; ``prune_channels`` then removes the
lowest-scored channels of each group for real (smaller Conv/BN tensors, smaller ONNX, faster CPU).

The output layer (the last dense layer run, e.g. smp's segmentation head) keeps its outputs; the input
image bands are never pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from models.compression.allocation import LevelSolution, pfp_expected_kept, solve_shared_level
from models.compression.cost import layer_output_sizes
from models.compression.sensitivity import pfp_layer_alpha, pfp_sensitivities

BUDGETS = ("macs", "params")


@dataclass
class LayerShape:
    name: str
    kind: str  # conv | linear | norm
    in_ch: int
    out_ch: int
    groups: int = 1
    taps: int = 1
    spatial: int = 1
    bias: bool = False


@dataclass
class ChannelGroup:
    """One set of coupled channels; item index arrays are (module index space, root index space)."""

    index: int
    root_name: str
    n_channels: int
    producers: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    consumers: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    norms: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)


def last_dense_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last Conv2d/Linear run in a forward pass: the classifier whose outputs must stay."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1]


class ChannelPlan:
    """Coupled channel groups of ``model`` and an analytic cost model over keep counts."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int],
                 ignored_layers: Iterable[nn.Module] | None = None):
        self.model = model
        self.input_shape = tuple(input_shape)
        example = torch.randn(1, *input_shape)
        ignored = list(ignored_layers) if ignored_layers is not None else [last_dense_layer(model, example)]
        self.ignored_layers = ignored
        self.module_names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        sizes = layer_output_sizes(model, example)
        self.layers: dict[str, LayerShape] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name in sizes:
                self.layers[name] = LayerShape(name, "conv", m.in_channels, m.out_channels, m.groups,
                                               int(np.prod(m.kernel_size)), int(np.prod(sizes[name][1:])),
                                               m.bias is not None)
            elif isinstance(m, nn.Linear) and name in sizes:
                self.layers[name] = LayerShape(name, "linear", m.in_features, m.out_features, 1, 1, 1,
                                               m.bias is not None)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                self.layers[name] = LayerShape(name, "norm", m.num_features, m.num_features,
                                               bias=m.affine)
        model.eval()
        self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        self.groups: list[ChannelGroup] = []
        roots = [nn.Conv2d, nn.Linear]
        for group in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=roots):
            root = group[0].dep.target.module
            g = ChannelGroup(len(self.groups), self.module_names[root], len(group[0].idxs))
            seen: set[tuple[str, str]] = set()
            for item in group.items:
                module = item.dep.target.module
                name = self.module_names.get(module)
                if name is None or name not in self.layers:
                    continue
                shape = self.layers[name]
                out_side = self.graph.is_out_channel_pruning_fn(item.dep.handler)
                side = "norm" if shape.kind == "norm" else ("out" if out_side else "in")
                if shape.kind == "conv" and shape.groups > 1 and side == "in":
                    continue  # depthwise: coupled in = out, counted once on the output side
                if (name, side) in seen:
                    continue
                seen.add((name, side))
                rec = (name, np.asarray(item.idxs, dtype=int), np.asarray(item.root_idxs, dtype=int))
                {"out": g.producers, "in": g.consumers, "norm": g.norms}[side].append(rec)
            self.groups.append(g)
        self.full_keep = np.array([g.n_channels for g in self.groups], dtype=float)
        total_params = sum(p.numel() for p in model.parameters())
        self.fixed_params = total_params - self._modeled_params(self.full_keep)

    # ---- analytic cost -------------------------------------------------------------------------
    def _widths(self, keep: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        ins = {n: float(s.in_ch) for n, s in self.layers.items()}
        outs = {n: float(s.out_ch) for n, s in self.layers.items()}
        for g, k in zip(self.groups, keep, strict=True):
            removed_frac = 1.0 - k / g.n_channels  # k: a float, or a 0-d tensor (soft_cost)
            for name, idxs, _ in g.producers + g.norms:
                outs[name] -= removed_frac * len(idxs)
            for name, idxs, _ in g.consumers:
                ins[name] -= removed_frac * len(idxs)
        for n, s in self.layers.items():  # norms and depthwise convs: in = out
            if s.kind == "norm" or (s.kind == "conv" and s.groups > 1 and s.groups == s.in_ch):
                ins[n] = outs[n]
        return ins, outs

    def _layer_terms(self, keep: np.ndarray) -> tuple[float, float]:
        ins, outs = self._widths(keep)
        params = 0.0
        macs = 0.0
        for n, s in self.layers.items():
            if s.kind == "norm":
                params += 2 * outs[n] if s.bias else 0.0
                continue
            if s.kind == "conv" and s.groups > 1:
                weight = s.taps * outs[n] * (1.0 if s.groups == s.in_ch else s.in_ch / s.groups)
            else:
                weight = s.taps * ins[n] * outs[n]
            params += weight + (outs[n] if s.bias else 0.0)
            macs += weight * s.spatial
        return params, macs

    def _modeled_params(self, keep: np.ndarray) -> float:
        return self._layer_terms(keep)[0]

    def cost(self, keep: np.ndarray, budget: str = "macs") -> float:
        """Parameters or MACs (one input of ``input_shape``) of the network pruned to ``keep`` channels."""
        return self.soft_cost(np.asarray(keep, dtype=float), budget)

    def soft_cost(self, keep: torch.Tensor | np.ndarray, budget: str = "macs") -> torch.Tensor | float:
        """:meth:`cost` of continuous keep counts; a torch tensor gives a differentiable torch scalar (a
        learned-score pruner's budget term: the same analytic model, so the penalty and the cut agree)."""
        params, macs = self._layer_terms(keep)
        return params + self.fixed_params if budget == "params" else macs

    def full_cost(self, budget: str = "macs") -> float:
        return self.cost(self.full_keep, budget)

    # ---- scores ----------------------------------------------------------------------------------
    def group_scores_from_inputs(self, layer_scores: dict[str, np.ndarray]) -> list[np.ndarray | None]:
        """Per-group channel scores: the max over the group's consumers of a per-input-channel score."""
        out: list[np.ndarray | None] = []
        for g in self.groups:
            vals = np.full(g.n_channels, -np.inf)
            for name, idxs, root_idxs in g.consumers:
                if name in layer_scores:
                    np.maximum.at(vals, root_idxs, np.asarray(layer_scores[name], dtype=float)[idxs])
            out.append(vals if np.isfinite(vals).all() else None)
        return out

    def group_l1(self) -> list[np.ndarray]:
        """Per-group channel L1 norm: sum over producers of |filter| (conv/linear out-channel rows)."""
        out = []
        for g in self.groups:
            vals = np.zeros(g.n_channels)
            for name, idxs, root_idxs in g.producers:
                w = self.modules[name].weight.detach()
                norms = w.abs().reshape(w.shape[0], -1).sum(1).double().numpy()
                np.add.at(vals, root_idxs, norms[idxs])
            out.append(vals)
        return out


def round_keep(keep: np.ndarray, plan: ChannelPlan, min_channels: int = 1,
               round_to: int | None = None) -> np.ndarray:
    """Integer keep counts in [min_channels, n] (multiples of ``round_to`` when given)."""
    n = plan.full_keep
    k = np.asarray(keep, dtype=float)
    if round_to:
        k = np.round(k / round_to) * round_to
        k = np.maximum(k, np.minimum(round_to, n))
    else:
        k = np.round(k)
    return np.clip(k, np.minimum(min_channels, n), n).astype(int)


def allocate(plan: ChannelPlan, keep_at: Callable[[float], np.ndarray], target_ratio: float,
             budget: str = "macs", lo: float = 1e-4, hi: float = 1e4, log: bool = True,
             min_channels: int = 1, round_to: int | None = None) -> tuple[np.ndarray, LevelSolution]:
    """Solve the shared level so that the pruned cost is (1 - target_ratio) of the dense cost.

    ``keep_at(level)`` returns continuous per-group keep counts. Rounding is corrected greedily so the
    integer solution stays as close to the target as the channel granularity allows.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}")
    if not 0.0 <= target_ratio < 1.0:
        raise ValueError("target_ratio is the fraction of the budget removed, in [0, 1)")
    n = plan.full_keep
    floor = np.minimum(min_channels, n)
    target = (1.0 - target_ratio) * plan.full_cost(budget)

    def clipped(level: float) -> np.ndarray:
        return np.clip(np.asarray(keep_at(level), dtype=float), floor, n)

    sol = solve_shared_level(lambda t: plan.cost(clipped(t), budget), target, lo, hi, log=log)
    cont = clipped(sol.level)
    keep = round_keep(cont, plan, min_channels, round_to)
    step = round_to or 1
    for _ in range(int(n.sum())):
        c = plan.cost(keep, budget)
        if c > target:
            cand = np.where(keep - step >= floor)[0]
            if len(cand) == 0:
                break
            j = cand[np.argmax((keep - cont)[cand])]
            keep[j] -= step
        else:
            # give a step back to the group furthest below its continuous count whose step still fits;
            # a group whose step does not fit must not stop cheaper groups from filling the budget
            cand = np.where(keep + step <= n)[0]
            grown = None
            for j in cand[np.argsort(-(cont - keep)[cand], kind="stable")]:
                trial = keep.copy()
                trial[j] += step
                if plan.cost(trial, budget) <= target:
                    grown = trial
                    break
            if grown is None:
                break
            keep = grown
    return keep, LevelSolution(sol.level, plan.cost(keep, budget), target)


def prune_channels(plan: ChannelPlan, keep: np.ndarray, scores: list[np.ndarray]) -> nn.Module:
    """Physically remove the lowest-scored channels of every group down to ``keep`` (in place)."""
    for g, k, s in zip(plan.groups, keep, scores, strict=True):
        n_remove = g.n_channels - int(k)
        if n_remove <= 0:
            continue
        idxs = np.argsort(np.asarray(s, dtype=float), kind="stable")[:n_remove]
        root = plan.modules[g.root_name]
        fn = plan.graph.get_pruner_of_module(root).prune_out_channels
        group = plan.graph.get_pruning_group(root, fn, sorted(int(i) for i in idxs))
        group.prune()
    return plan.model


def pfp_group_scores(plan: ChannelPlan, batches: list[torch.Tensor]) -> tuple[list[np.ndarray], np.ndarray]:
    """PFP channel sensitivities per group (max over the group's consumers) and per-group alpha."""
    sens = {k: v.numpy() for k, v in pfp_sensitivities(plan.model, batches).items()}
    scores = plan.group_scores_from_inputs(sens)
    l1 = plan.group_l1()
    alphas = []
    for i, g in enumerate(plan.groups):
        if scores[i] is None:
            scores[i] = l1[i] / max(l1[i].sum(), 1e-12)
        a = [pfp_layer_alpha(plan.layers[name].spatial, plan.layers[name].taps) for name, _, _ in g.consumers]
        alphas.append(max(a) if a else pfp_layer_alpha(1, 1))
    return scores, np.asarray(alphas)


def prune_pfp(model: nn.Module, input_shape: tuple[int, int, int], batches: list[torch.Tensor],
              target_ratio: float, budget: str = "macs", round_to: int | None = None,
              ignored_layers: Iterable[nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """Provable Filter Pruning (deterministic top-k variant) to ``target_ratio`` of the budget removed."""
    plan = ChannelPlan(model, input_shape, ignored_layers)
    scores, alphas = pfp_group_scores(plan, batches)

    def keep_at(eps: float) -> np.ndarray:
        return np.array([pfp_expected_kept(s, a, eps) for s, a in zip(scores, alphas, strict=True)])

    keep, sol = allocate(plan, keep_at, target_ratio, budget, lo=1e-3, hi=1e7, round_to=round_to)
    prune_channels(plan, keep, scores)
    return model, {"method": "pfp", "epsilon": sol.level, "keep": keep.tolist(),
                   "groups": [g.root_name for g in plan.groups]}


def rebuild_pruned(dense: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The channel-pruned network whose weights are ``state_dict``, rebuilt on the dense architecture.

    Channel removal changes only tensor shapes, never the module graph, so every Conv2d, BatchNorm2d and
    Linear of ``dense`` whose weight shape differs from the state dict is replaced by one of the pruned
    shape (same kernel, stride, padding, dilation; grouped and depthwise convs keep their channel ratio).
    This loads a pruned model from a plain state dict (``torch.load(weights_only=True)``), never from a
    pickled module. ``dense`` is changed in place and returned in eval mode. Factorised (ALDS) networks
    change the graph and are refused."""
    modules = dict(dense.named_modules())
    extra = sorted({k.rsplit(".", 1)[0] for k in state_dict} - set(modules) - {""})
    if extra:
        raise ValueError(f"state dict has modules the dense network lacks ({extra[:3]}): not a "
                         "channel-pruned copy of it (ALDS factorisations cannot be rebuilt this way)")
    for name, m in modules.items():
        w = state_dict.get(f"{name}.weight")
        if w is None or w.shape == m.weight.shape:
            continue
        if isinstance(m, nn.Conv2d):
            out_ch, in_per_group = w.shape[0], w.shape[1]
            groups = 1 if m.groups == 1 else out_ch * m.groups // m.out_channels
            new = nn.Conv2d(in_per_group * groups, out_ch, m.kernel_size, m.stride, m.padding, m.dilation,
                            groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(w.shape[0], m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        else:
            raise ValueError(f"{name}: a {type(m).__name__} changed shape; only Conv2d, BatchNorm2d and "
                             "Linear layers can be rebuilt")
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else dense, attr, new)
    dense.load_state_dict(state_dict)
    return dense.eval()
