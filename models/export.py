"""ONNX export following the project's model contract (ARCHITECTURE.md, "ONNX model contract").

* input ``image``: uint8 NCHW, 3 bands; scaling to [0, 1] and mean/std normalisation happen inside the graph;
* fixed H and W, dynamic batch; opset >= 17; one file (no external data);
* output (default ``probs``): softmax over dim 1 of the wrapped module's logits;
* ``metadata_props``: every key of ``metadata`` as a string (dicts/lists/tuples JSON-encoded).

Also: an ONNX Runtime vs torch parity check and static int8 QDQ quantisation (per-channel weights).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_uint8(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8-range NCHW tensor -> mean/std-normalised float32, the same arithmetic as the exported graph."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    sd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (x.to(torch.float32) - m) / sd


class UInt8Normalised(nn.Module):
    """Wrap a float network: uint8 NCHW in, ``softmax(module(normalise(x)), dim=1)`` out."""

    def __init__(
        self,
        module: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        softmax: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.softmax = softmax
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        std_255 = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.register_buffer("inv_std", 1.0 / std_255)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.to(torch.float32) - self.mean) * self.inv_std
        y = self.module(x)
        return channel_softmax(y) if self.softmax else y


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 written as max/exp/sum: ONNX Runtime's Softmax op over a non-last axis inserts
    two transposes of the whole [N, C, H, W] map, which cost more than the elementwise ops (measured in
    ``models/zoo/CROWNS_MODEL_CARD.md``). Numerically the stable softmax."""
    e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)


def _metadata_strings(metadata: Mapping[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, (dict, list, tuple, bool)) or value is None:
            out[str(key)] = json.dumps(value)
        else:
            out[str(key)] = str(value)
    return out


def set_metadata(model_proto, metadata: Mapping[str, object]) -> None:
    """Replace/add ``metadata_props`` entries on an ``onnx.ModelProto`` in place."""
    strings = _metadata_strings(metadata)
    kept = [p for p in model_proto.metadata_props if p.key not in strings]
    del model_proto.metadata_props[:]
    for p in kept:
        model_proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in strings.items():
        model_proto.metadata_props.add(key=k, value=v)


def copy_with_metadata(src: str | os.PathLike, dst: str | os.PathLike,
                       metadata: Mapping[str, object]) -> Path:
    """Write a copy of the ONNX model ``src`` to ``dst`` (atomically) with ``metadata`` entries replaced or
    added; the graph and the other entries are unchanged."""
    import onnx

    from pipeline.atomic import atomic_path

    proto = onnx.load(str(src))
    set_metadata(proto, metadata)
    with atomic_path(dst) as tmp:
        onnx.save(proto, str(tmp))
    return Path(dst)


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int] = (3, 512, 512),
    metadata: Mapping[str, object] | None = None,
    output_name: str = "probs",
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    softmax: bool = True,
    opset: int = 17,
) -> Path:
    """Export ``module`` (float NCHW in, logits out) as a one-file ONNX model with uint8 input ``image``.

    ``input_shape`` is (C, H, W); H and W are fixed, the batch is dynamic. The module is put in eval mode
    (on CPU) and wrapped in :class:`UInt8Normalised`. Returns the written path (atomic write).
    """
    import onnx

    if opset < 17:
        raise ValueError("opset must be >= 17")
    module = module.cpu().eval()
    wrapper = UInt8Normalised(module, mean, std, softmax=softmax).eval()
    dummy = torch.randint(0, 256, (1, *input_shape), dtype=torch.uint8)
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=[output_name],
            dynamic_axes={"image": {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        set_metadata(proto, metadata or {})
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return path


def ort_session(onnx_path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


def parity_max_abs_diff(
    module: nn.Module,
    onnx_path: str | os.PathLike,
    batch: np.ndarray | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    softmax: bool = True,
    seed: int = 0,
) -> float:
    """Max |ORT - torch| on ``batch`` (uint8 NCHW; random of the model's input shape when None)."""
    sess = ort_session(onnx_path)
    inp = sess.get_inputs()[0]
    if batch is None:
        shape = [2 if not isinstance(d, int) else d for d in inp.shape]
        batch = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    got = sess.run(None, {inp.name: batch})[0]
    wrapper = UInt8Normalised(module.cpu().eval(), mean, std, softmax=softmax).eval()
    with torch.no_grad():
        want = wrapper(torch.from_numpy(batch)).numpy()
    return float(np.max(np.abs(got - want)))


class _TileReader:
    def __init__(self, input_name: str, tiles: Iterable[np.ndarray], batch_size: int = 1) -> None:
        self.input_name = input_name
        arr = np.asarray(list(tiles) if not isinstance(tiles, np.ndarray) else tiles, dtype=np.uint8)
        if arr.ndim == 3:
            arr = arr[None]
        self.batches = [arr[i : i + batch_size] for i in range(0, len(arr), batch_size)]
        self.it = iter(self.batches)

    def get_next(self):
        b = next(self.it, None)
        return None if b is None else {self.input_name: b}

    def rewind(self) -> None:
        self.it = iter(self.batches)


def quantize_static_qdq(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_tiles: Iterable[np.ndarray] | np.ndarray,
    *,
    per_channel: bool = True,
    extra_metadata: Mapping[str, object] | None = None,
) -> Path:
    """Static int8 quantisation in QDQ format (QUInt8 activations, per-channel QInt8 weights).

    ``calibration_tiles``: uint8 arrays [3, H, W] (or a [N, 3, H, W] array) of real imagery at the model's
    input size. The float model's metadata_props are kept (plus ``extra_metadata``).
    """
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src_meta = read_metadata(onnx_path)
    sess = ort_session(onnx_path, threads=1)
    reader = _TileReader(sess.get_inputs()[0].name, calibration_tiles)
    del sess
    out_path = Path(out_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs one WARNING per folded bias
    with atomic_path(out_path) as tmp:
        quantize_static(
            str(onnx_path),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(tmp))
        meta = dict(src_meta)
        meta.update(_metadata_strings(extra_metadata or {}))
        set_metadata(proto, meta)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    root.setLevel(level)
    return out_path


def measure_latency_ms(onnx_path: str | os.PathLike, threads: int = 2, runs: int = 20, batch: int = 1,
                       warmup: int = 3, seed: int = 0) -> dict[str, float]:
    """ONNX Runtime CPU latency per call on random uint8 tiles: median/p10/p90 in ms over ``runs`` calls."""
    import time

    sess = ort_session(onnx_path, threads=threads)
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1000)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"median_ms": float(np.median(times)), "p10_ms": float(np.percentile(times, 10)),
            "p90_ms": float(np.percentile(times, 90)), "runs": runs, "threads": threads, "batch": batch,
            "load_avg_1min": load1}
