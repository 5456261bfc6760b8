"""Data-informed sensitivities: PFP per input channel (structured) and SiPP per weight (unstructured).

Both measure how much of a pre-activation of layer l one input channel (PFP) or one weight (SiPP)
contributes, relative to the pre-activation built from contributions of the same sign. Weights and
activations are split into positive and negative parts (w = w+ - w-, a = a+ - a-): products w+a+ and
w-a- add to the positive sum z+, products w+a- and w-a+ to the negative sum z-, so a ratio is always in
[0, 1] even when inputs are signed (the normalised image, pre-ReLU decoder features). Biases are left out.

PFP (Liebenwein et al., ICLR 2020), channel j of layer l:
    s_j = max over images x, output channels i, output positions p of
          max( C+_ij(x,p) / z+_i(x,p), C-_ij(x,p) / z-_i(x,p) )
    with C+_ij = sum over kernel taps k of (w+_ijk a+_jk + w-_ijk a-_jk) and z+_i = sum_j C+_ij
    (and the mirror for the negative part). A ratio with z <= eps counts 0.
SiPP (Baykal et al.), weight (i, j, k):
    s_ijk = max over images x of the mean over positions p of the relative contribution
            |w_ijk a_jk(x,p)| / z_i(x,p), with z the same-sign sum of that product (z+ or z-).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.clamp(min=0), (-t).clamp(min=0)


def pfp_conv_sensitivity(weight: torch.Tensor, inputs: torch.Tensor, stride=1, padding=0, dilation=1,
                         eps: float = EPS, max_elements: int = 4_000_000) -> torch.Tensor:
    """PFP sensitivity s_j of every input channel j of a groups=1 conv (weight [f, c, kh, kw]).

    ``inputs`` is the layer input [N, c, H, W]; returns float64 [c]. Channel contributions are batched
    matrix products over the unfolded input (one GEMM per input channel), chunked over positions.
    """
    weight = weight.detach().double()
    f, c, kh, kw = weight.shape
    taps = kh * kw
    w_pos, w_neg = (t.reshape(f, c, taps).permute(1, 0, 2).contiguous() for t in _split(weight))  # [c, f, K]
    s = torch.zeros(c, dtype=torch.float64)
    for x in inputs.detach().double():
        cols = F.unfold(x.unsqueeze(0), (kh, kw), dilation=dilation, padding=padding, stride=stride)[0]
        cols = cols.reshape(c, taps, -1)  # [c, K, P]
        n_pos = cols.shape[-1]
        chunk = max(1, int(max_elements // max(1, c * f)))
        for p0 in range(0, n_pos, chunk):
            a_pos, a_neg = _split(cols[:, :, p0:p0 + chunk])
            pos = torch.bmm(w_pos, a_pos) + torch.bmm(w_neg, a_neg)  # [c, f, P]: C+_ij(p)
            neg = torch.bmm(w_pos, a_neg) + torch.bmm(w_neg, a_pos)
            for part in (pos, neg):
                z = part.sum(0, keepdim=True)
                ratio = torch.where(z > eps, part / z.clamp(min=eps), torch.zeros_like(part))
                s = torch.maximum(s, ratio.amax(dim=(1, 2)))
    return s


def pfp_linear_sensitivity(weight: torch.Tensor, inputs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """PFP sensitivity of every input feature of a linear layer (weight [f, c], inputs [N, c])."""
    w_pos, w_neg = _split(weight.detach().double())
    a_pos, a_neg = _split(inputs.detach().double().reshape(-1, weight.shape[1]))
    s = torch.zeros(weight.shape[1], dtype=torch.float64)
    for ap, an in zip(a_pos, a_neg, strict=True):
        pos = w_pos * ap + w_neg * an  # [f, c]
        neg = w_pos * an + w_neg * ap
        for part in (pos, neg):
            z = part.sum(1, keepdim=True)
            ratio = torch.where(z > eps, part / z.clamp(min=eps), torch.zeros_like(part))
            s = torch.maximum(s, ratio.amax(0))
    return s


def sipp_conv_sensitivity(weight: torch.Tensor, inputs: torch.Tensor, stride=1, padding=0, dilation=1,
                          eps: float = EPS) -> torch.Tensor:
    """SiPP sensitivity of every weight of a groups=1 conv; returns float64 shaped like ``weight``."""
    weight = weight.detach().double()
    f = weight.shape[0]
    kh, kw = weight.shape[-2:]
    w_pos, w_neg = (t.reshape(f, -1) for t in _split(weight))
    s = torch.zeros_like(w_pos)
    for x in inputs.detach().double():
        cols = F.unfold(x.unsqueeze(0), (kh, kw), dilation=dilation, padding=padding, stride=stride)[0]
        a_pos, a_neg = _split(cols)  # [cK, P]
        n_pos = cols.shape[1]
        z_pos = w_pos @ a_pos + w_neg @ a_neg  # [f, P]
        z_neg = w_pos @ a_neg + w_neg @ a_pos
        inv_pos = torch.where(z_pos > eps, 1.0 / z_pos.clamp(min=eps), torch.zeros_like(z_pos))
        inv_neg = torch.where(z_neg > eps, 1.0 / z_neg.clamp(min=eps), torch.zeros_like(z_neg))
        g_pos = w_pos * (inv_pos @ a_pos.T) + w_neg * (inv_pos @ a_neg.T)
        g_neg = w_pos * (inv_neg @ a_neg.T) + w_neg * (inv_neg @ a_pos.T)
        # one weight at one position makes exactly one product, of one sign: the two parts add
        s = torch.maximum(s, (g_pos + g_neg) / n_pos)
    return s.reshape(weight.shape)


def sipp_linear_sensitivity(weight: torch.Tensor, inputs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SiPP sensitivity of every weight of a linear layer (inputs [N, c])."""
    w = weight.detach().double()
    x = inputs.detach().double().reshape(-1, w.shape[1], 1)  # treat as conv 1x1 on one position
    return sipp_conv_sensitivity(w.reshape(*w.shape, 1, 1), x.unsqueeze(-1)).reshape(w.shape)


def _is_dense_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def record_layer_inputs(model: nn.Module, batches: Iterable[torch.Tensor],
                        names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and keep every dense layer's input."""
    store: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if _is_dense_layer(module) and (names is None or name in names):
            def pre_hook(mod, inp, name=name):
                store.setdefault(name, []).append(inp[0].detach())
            hooks.append(module.register_forward_pre_hook(pre_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: torch.cat(v) for k, v in store.items()}


def _layer_sensitivity(module: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return (pfp_linear_sensitivity if kind == "pfp" else sipp_linear_sensitivity)(module.weight, x)
    fn = pfp_conv_sensitivity if kind == "pfp" else sipp_conv_sensitivity
    return fn(module.weight, x, stride=module.stride, padding=module.padding, dilation=module.dilation)


def pfp_sensitivities(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """PFP input-channel sensitivities [c] of every dense conv/linear layer, keyed by module name.

    The layer-by-layer loop keeps memory to one layer's inputs at a time after recording.
    """
    batches = list(batches)
    modules = dict(model.named_modules())
    inputs = record_layer_inputs(model, batches)
    return {name: _layer_sensitivity(modules[name], x, "pfp") for name, x in inputs.items()}


def sipp_sensitivities(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """SiPP per-weight sensitivities (shaped like each weight) of every dense conv/linear layer."""
    batches = list(batches)
    modules = dict(model.named_modules())
    inputs = record_layer_inputs(model, batches)
    return {name: _layer_sensitivity(modules[name], x, "sipp") for name, x in inputs.items()}


def pfp_layer_alpha(n_patches: int, kernel_taps: int, delta: float = 1e-16) -> float:
    """PFP's per-layer log factor alpha_l = 6 ln(8 (P_l + 1) K_l / delta) (P: output patches, K: taps)."""
    import math

    return 6.0 * math.log(8.0 * (n_patches + 1) * kernel_taps / delta)
