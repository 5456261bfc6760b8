"""Weight averaging ("model soup") of several fine-tunes of one compressed network.

Fine-tunes that start from the same pruned network and differ only in the training batches they draw stay
in one basin of the loss, so the plain average of their weights is itself a good network and varies less
from one batch stream to the next than any single fine-tune (Wortsman et al. 2022, "Model soups";
Izmailov et al. 2018, stochastic weight averaging). The batch-norm running statistics of the averaged
weights are not the average of the members' statistics, so they are estimated again on training batches,
as SWA does (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def soup_state_dicts(members: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of the floating-point tensors of ``members`` (state dicts of one architecture).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are not weights: the first member's is kept.
    Raises ``ValueError`` naming the first tensor whose name or shape differs between members: a soup
    needs fine-tunes of the *same* pruned network."""
    if not members:
        raise ValueError("a soup needs at least one member")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        if set(m) != set(first):
            diff = sorted(set(m) ^ set(first))
            raise ValueError(f"member {i} has other tensors than member 0 (e.g. {diff[0]!r})")
        for k, v in first.items():
            if m[k].shape != v.shape:
                raise ValueError(f"member {i}: {k} has shape {tuple(m[k].shape)}, member 0 "
                                 f"{tuple(v.shape)}: not fine-tunes of the same pruned network")
    out: dict[str, torch.Tensor] = {}
    for k, v in first.items():
        if torch.is_floating_point(v):
            out[k] = torch.stack([m[k].to(torch.float64) for m in members]).mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def reestimate_batchnorm(net: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Estimate every BatchNorm layer's running mean and variance again from ``batches`` (network inputs),
    as the plain average over all of them; weights are not changed. Returns the number of batches used.
    The network is left in eval mode."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return 0
    seen = 0

    def counted():  # streamed: the batches are never all held at once
        nonlocal seen
        for x in batches:
            seen += 1
            yield x

    torch.optim.swa_utils.update_bn(counted(), net)
    net.eval()
    return seen
