"""One entry point for every compression method, plus the ``compression`` metadata record.

``compress(model, method, target_ratio, ...)`` prunes or factorises a float network in place and
returns it with its cost before and after. ``target_ratio`` is the fraction of the budget REMOVED
(0.7 = keep 30 % of the MACs). Budgets: ``macs`` (default) or ``params``; SiPP always counts non-zero
parameters (it removes weights, not channels, and gives no dense speed-up).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from models.compression.alds import compress_alds
from models.compression.baselines import prune_l1, prune_random, prune_uniform
from models.compression.cost import NetCost, count_cost
from models.compression.learned_scores import prune_sbf
from models.compression.structured import prune_pfp
from models.compression.unstructured import prune_sipp, sparse_size_bytes

METHODS = ("pfp", "sipp", "alds", "l1", "uniform", "random", "sbf")
STRUCTURED = ("pfp", "l1", "uniform", "random", "sbf")
DATA_INFORMED = ("pfp", "sipp", "sbf")


@dataclass
class CompressionResult:
    model: nn.Module
    method: str
    target_ratio: float
    budget: str
    input_shape: tuple[int, int, int]
    before: NetCost
    after: NetCost
    details: dict = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the budget removed, as measured on the compressed network."""
        if self.method == "sipp":
            return 1.0 - self.after.nonzero_params / self.before.params
        key = "macs" if self.budget == "macs" else "params"
        return 1.0 - getattr(self.after, key) / getattr(self.before, key)

    def record(self) -> dict:
        """The ``compression`` metadata record (JSON-able) for the ONNX file and the report."""
        rec = {
            "method": self.method, "target_ratio": self.target_ratio, "budget": self.budget,
            "achieved_ratio": round(self.achieved_ratio, 4), "input_shape": list(self.input_shape),
            "params_before": self.before.params, "params_after": self.after.params,
            "macs_before": self.before.macs, "macs_after": self.after.macs,
            "nonzero_params_after": self.after.nonzero_params,
        }
        if self.method == "sipp":
            rec["sparse_size_bytes"] = sparse_size_bytes(self.model)
            rec["note"] = "unstructured: zeroed weights, dense shapes; no dense-CPU speed-up"
        for key in ("epsilon", "max_relative_error", "keep_fraction", "threshold", "seed", "finetune",
                    "soup_of", "bn_reestimated_batches", "score_steps", "score_history"):
            if key in self.details:
                rec[key] = self.details[key]
        return rec


def compress(model: nn.Module, method: str, target_ratio: float, input_shape: tuple[int, int, int],
             calibration: list[torch.Tensor] | None = None, budget: str = "macs",
             round_to: int | None = None, seed: int = 0, inplace: bool = False,
             alds_k_max: int = 8, score_steps: int = 200) -> CompressionResult:
    """Compress a float network (NCHW float in, logits out) with ``method`` to ``target_ratio``.

    ``calibration``: float input batches for the data-informed methods (PFP, SiPP, SbF: the learned
    scores train on them, label-free), e.g. 8-32 normalised training tiles; ``input_shape`` (C, H, W) is
    the shape MACs are counted at.
    ``alds_k_max``: largest ALDS group count (1 = plain SVD low-rank pairs, no grouped convs).
    ``score_steps``: SbF score-learning steps (one calibration batch each).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    if method in DATA_INFORMED and not calibration:
        raise ValueError(f"{method} is data-informed: pass calibration batches")
    net = model if inplace else copy.deepcopy(model)
    net.eval()
    before = count_cost(net, input_shape)
    if method == "pfp":
        net, details = prune_pfp(net, input_shape, calibration, target_ratio, budget, round_to)
    elif method == "sipp":
        net, details = prune_sipp(net, calibration, target_ratio)
        details = {k: v for k, v in details.items() if k != "masks"} | {"masks": details["masks"]}
    elif method == "alds":
        net, details = compress_alds(net, input_shape, target_ratio, budget, k_max=alds_k_max, seed=seed)
    elif method == "sbf":
        net, details = prune_sbf(net, input_shape, calibration, target_ratio, budget, round_to,
                                 steps=score_steps, seed=seed)
    elif method == "l1":
        net, details = prune_l1(net, input_shape, target_ratio, budget, round_to)
    elif method == "uniform":
        net, details = prune_uniform(net, input_shape, target_ratio, budget, round_to)
    else:
        net, details = prune_random(net, input_shape, target_ratio, budget, seed=seed, round_to=round_to)
    after = count_cost(net, input_shape)
    return CompressionResult(net, method, target_ratio, "params" if method == "sipp" else budget,
                             tuple(input_shape), before, after, details)


def export_engine_onnx(module: nn.Module, path, tile_size: int, metadata: dict | None = None):
    """Export a float crown network (logits out) for the engine, softmax inside the graph (written as
    max/exp/sum, :func:`models.export.channel_softmax`)."""
    from models.export import export_onnx

    return export_onnx(module, path, input_shape=(3, tile_size, tile_size), metadata=metadata,
                       output_name="probs")


def export_compressed(result: CompressionResult, path, tile_size: int, metadata: dict | None = None,
                      calibration_tiles=None, quantized_path=None) -> dict:
    """Export the compressed network as an engine ONNX model with a ``compression`` metadata record.

    ``tile_size``: the engine tile edge (input H = W).
    With ``calibration_tiles`` (uint8 [N, 3, T, T]) and ``quantized_path``, also writes a static int8
    QDQ copy (per-channel weights). Returns the record.
    """
    from models.export import quantize_static_qdq

    record = result.record()
    record["softmax"] = "channel (max/exp/sum)"
    meta = dict(metadata or {})
    meta["compression"] = record
    export_engine_onnx(result.model, path, tile_size, meta)
    if quantized_path is not None:
        if calibration_tiles is None:
            raise ValueError("static int8 quantization needs calibration tiles")
        q_record = dict(record, quantization="static int8 QDQ, per-channel weights, uint8 activations")
        quantize_static_qdq(path, quantized_path, calibration_tiles, per_channel=True,
                            extra_metadata={"compression": q_record})
    return record
