"""SiPP: unstructured weight pruning with one global sensitivity threshold, kept as weight masks.

Zeroed weights keep every tensor shape, so the dense CPU model is exactly as fast as before: SiPP is
the baseline for what unstructured pruning buys (a smaller sparse file), not a speed-up.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from models.compression.sensitivity import sipp_sensitivities


def sipp_masks(model: nn.Module, batches: Iterable[torch.Tensor], target_ratio: float,
               ignored: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Boolean keep masks per dense layer so that ``target_ratio`` of ALL parameters become zero.

    Sensitivities are ranked globally across layers (SiPP's deterministic allocation); parameters
    outside dense conv/linear weights (biases, norms) are kept and count toward the budget.
    """
    sens = {k: v for k, v in sipp_sensitivities(model, batches).items() if k not in set(ignored)}
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(modules[k].weight.numel() for k in sens)
    keep_total = (1.0 - target_ratio) * total - (total - prunable)
    if keep_total <= 0:
        raise ValueError(f"target {target_ratio} removes more than all prunable weights")
    flat = torch.cat([v.flatten() for v in sens.values()]).numpy()
    n_keep = int(round(keep_total))
    order = np.argsort(-flat, kind="stable")
    keep_flat = np.zeros(flat.shape, dtype=bool)
    keep_flat[order[:n_keep]] = True
    masks: dict[str, torch.Tensor] = {}
    offset = 0
    for name, s in sens.items():
        n = s.numel()
        masks[name] = torch.from_numpy(keep_flat[offset:offset + n].reshape(s.shape))
        offset += n
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the masked weights in place (call again after every optimiser step while fine-tuning)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            w = modules[name].weight
            w.mul_(mask.to(dtype=w.dtype, device=w.device))
    return model


def sparse_size_bytes(model: nn.Module, index_bits: int = 16) -> int:
    """Bytes of the weights stored sparsely: non-zeros as float32 + one ``index_bits`` index each.

    Dense tensors with no zeros are counted dense. A plain estimate of what a sparse format would hold.
    """
    total = 0
    for p in model.parameters():
        nnz = int(torch.count_nonzero(p))
        dense = p.numel() * 4
        sparse = nnz * (4 + index_bits // 8)
        total += min(dense, sparse)
    return total


def prune_sipp(model: nn.Module, batches: list[torch.Tensor], target_ratio: float) -> tuple[nn.Module, dict]:
    """Prune ``target_ratio`` of all parameters (unstructured, in place); returns the model and masks."""
    masks = sipp_masks(model, batches, target_ratio)
    apply_masks(model, masks)
    return model, {"method": "sipp", "masks": masks}
