"""Learned channel-importance scores (SbF-style: scores learned end-to-end from the filter weights).

After Babaiee, Liebenwein et al. 2022 ("End-to-End Sensitivity-Based Filter Pruning"), written from its
idea, not its code: every coupled channel group of :class:`~models.compression.structured.ChannelPlan`
gets a score in (0, 1) per channel, computed by a small network from the group's filter weights, so the
scores of a layer see each other's filters (an attention step across the channels of the group) and all
layers are scored together through one loss. During score learning the network's weights are frozen and
every channel's output is multiplied by its score (after the batch norm that follows it, so the norm cannot
undo the gate). The loss is

    ||gated logits - dense logits||^2 / variance of the dense logits   (the relative output error;
                                                                       label-free: calibration inputs only)
    + penalty * | cost(keep = sum of scores per group) / dense cost - (1 - target_ratio) |

where cost is the plan's analytic MAC (or parameter) count of the soft widths (``ChannelPlan.soft_cost``),
so the soft widths are held at the budget and the fidelity term decides which channels keep high
scores.
The cut itself is the shared one of every pruner here: one global threshold on the scores, solved by
the 1-D level search to meet the budget exactly (``structured.allocate``), then ``prune_channels``
through Torch-Pruning. The kept channels' scores are folded into their batch norm (or producer) weights,
so the pruned network starts from the gated network's function.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from models.compression.structured import ChannelGroup, ChannelPlan, allocate, prune_channels

SCORE_DIM = 16


class GroupScorer(nn.Module):
    """Scores in (0, 1) of one channel group's channels, from its producers' filter weights.

    Each producer's filter rows (scaled by the producer's mean row norm, so magnitude and direction both
    count) are projected to ``dim`` features and summed per group channel; one attention step across the
    group's channels adds what the other filters look like; a linear read-out and a sigmoid give the score
    (initial bias ``init`` so that the gated network starts close to the dense one)."""

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor]], n_channels: int, dim: int = SCORE_DIM,
                 init: float = 3.0):
        super().__init__()
        self.n = n_channels
        self.dim = dim
        self.rows = [(r / r.norm(dim=1).mean().clamp_min(1e-12), root) for r, root in rows]
        self.proj = nn.ModuleList(nn.Linear(r.shape[1], dim) for r, _ in rows)
        self.readout = nn.Linear(2 * dim, 1)
        nn.init.zeros_(self.readout.weight)
        nn.init.constant_(self.readout.bias, init)

    def forward(self) -> torch.Tensor:
        feats = torch.zeros(self.n, self.dim)
        for (r, root), proj in zip(self.rows, self.proj, strict=True):
            feats = feats.index_add(0, root, proj(r))
        attn = torch.softmax(feats @ feats.T / self.dim**0.5, dim=1)
        return torch.sigmoid(self.readout(torch.cat([feats, attn @ feats], dim=1)).squeeze(1))


def _producer_rows(plan: ChannelPlan, g: ChannelGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows = []
    for name, idxs, root_idxs in g.producers:
        w = plan.modules[name].weight.detach()
        rows.append((w[torch.as_tensor(idxs)].reshape(len(idxs), -1).float(), torch.as_tensor(root_idxs)))
    return rows


def _gated_modules(plan: ChannelPlan) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Per module whose output carries the gate: (group, module channel idxs, root idxs). A group is gated
    at its norms when it has any (after the norm, which would otherwise undo the gate), else at its
    producers."""
    gated: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for gi, g in enumerate(plan.groups):
        for name, idxs, root_idxs in g.norms or g.producers:
            gated.setdefault(name, []).append((gi, torch.as_tensor(idxs), torch.as_tensor(root_idxs)))
    return gated


def _gate_vector(n_out: int, entries, scores: list[torch.Tensor]) -> torch.Tensor:
    gate = torch.ones(n_out)
    for gi, idxs, root_idxs in entries:
        gate = gate.index_put((idxs,), scores[gi][root_idxs])
    return gate


def learn_channel_scores(plan: ChannelPlan, batches: list[torch.Tensor], target_ratio: float,
                         budget: str = "macs", steps: int = 200, lr: float = 0.02, penalty: float = 1.0,
                         seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """Learn per-group channel scores of ``plan.model`` (weights frozen) on the input ``batches``.

    Returns the scores (one array per group, values in (0, 1)) and a record: the loss terms at the first
    and the last step and the soft cost fraction reached."""
    torch.manual_seed(seed)
    model = plan.model.eval()
    with torch.no_grad():
        targets = [model(x) for x in batches]
        energy = [((t - t.mean(dim=0, keepdim=True)) ** 2).mean().clamp_min(1e-12) for t in targets]
    scorers = nn.ModuleList(GroupScorer(_producer_rows(plan, g), g.n_channels) for g in plan.groups)
    gated = _gated_modules(plan)
    current: list[torch.Tensor] = []

    def hook(name):
        def apply(module, inputs, out):
            gate = _gate_vector(out.shape[1], gated[name], current)
            return out * gate.reshape(1, -1, *([1] * (out.dim() - 2)))
        return apply

    handles = [plan.modules[n].register_forward_hook(hook(n)) for n in gated]
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(scorers.parameters(), lr=lr)
    full = plan.full_cost(budget)
    history = []
    try:
        for step in range(steps):
            current[:] = [s() for s in scorers]
            i = step % len(batches)
            fidelity = ((model(batches[i]) - targets[i]) ** 2).mean() / energy[i]
            frac = plan.soft_cost(torch.stack([s.sum() for s in current]), budget) / full
            loss = fidelity + penalty * (frac - (1.0 - target_ratio)).abs()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (0, steps - 1):
                history.append({"step": step, "relative_output_error": round(float(fidelity.detach()), 5),
                                "soft_cost_fraction": round(float(frac.detach()), 4)})
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(f)
    with torch.no_grad():
        scores = [s().double().numpy() for s in scorers]
    return scores, {"score_steps": steps, "score_history": history}


def fold_scores(plan: ChannelPlan, scores: list[np.ndarray]) -> None:
    """Multiply every gated output channel's weights by its score (norm affine weight and bias, or the
    producer's filter and bias), so the ungated network computes what the gated one did."""
    gated = _gated_modules(plan)
    with torch.no_grad():
        for name, entries in gated.items():
            m = plan.modules[name]
            n_out = m.weight.shape[0]
            gate = _gate_vector(n_out, entries, [torch.as_tensor(s, dtype=torch.float32) for s in scores])
            m.weight.mul_(gate.reshape(-1, *([1] * (m.weight.dim() - 1))))
            if m.bias is not None:
                m.bias.mul_(gate)


def prune_sbf(model: nn.Module, input_shape: tuple[int, int, int], batches: list[torch.Tensor],
              target_ratio: float, budget: str = "macs", round_to: int | None = None,
              ignored_layers: Iterable[nn.Module] | None = None, steps: int = 200,
              seed: int = 0) -> tuple[nn.Module, dict]:
    """Channel pruning with learned scores (SbF-style) to ``target_ratio`` of the budget removed."""
    plan = ChannelPlan(model, input_shape, ignored_layers)
    scores, record = learn_channel_scores(plan, batches, target_ratio, budget, steps=steps, seed=seed)

    def keep_at(tau: float) -> np.ndarray:
        return np.array([float((s >= tau).sum()) for s in scores])

    keep, sol = allocate(plan, keep_at, target_ratio, budget, lo=1e-6, hi=1.0, round_to=round_to)
    fold_scores(plan, scores)
    prune_channels(plan, keep, scores)
    return model, {"method": "sbf", "threshold": sol.level, "keep": keep.tolist(), **record}
