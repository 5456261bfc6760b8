"""Parameters and multiply-accumulates (MACs) of a network, measured on one forward pass.

MACs count the multiply-accumulates of convolutions (grouped convs included) and linear layers for ONE
input of the given shape; element-wise ops, norms and activations are not counted. ``nonzero_params``
counts weights that are not exactly zero (what unstructured pruning shrinks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetCost:
    """Size and compute of a network for one input of ``input_shape`` (C, H, W)."""

    params: int
    macs: int
    nonzero_params: int
    nonzero_macs: int

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "nonzero_params": self.nonzero_params,
                "nonzero_macs": self.nonzero_macs}


def layer_output_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every Conv2d/Linear module, keyed by module name."""
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            def hook(mod, inp, out, name=name):
                sizes[name] = tuple(out.shape[1:])
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def count_cost(model: nn.Module, input_shape: tuple[int, int, int]) -> NetCost:
    """Parameters and MACs of ``model`` for one float input of shape ``input_shape`` (C, H, W)."""
    example = torch.zeros((1, *input_shape))
    sizes = layer_output_sizes(model, example)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    macs = 0
    nz_macs = 0
    for name, module in model.named_modules():
        if name not in sizes:
            continue
        spatial = 1
        if isinstance(module, nn.Conv2d):
            out = sizes[name]
            spatial = int(out[1] * out[2])
        w = module.weight
        macs += w.numel() * spatial
        nz_macs += int(torch.count_nonzero(w)) * spatial
    return NetCost(params=int(params), macs=int(macs), nonzero_params=int(nonzero), nonzero_macs=int(nz_macs))
