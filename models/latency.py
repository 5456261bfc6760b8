"""ONNX Runtime CPU latency of models, timed round-robin (one run of each model in turn) so that load
from other processes on a shared machine hits all of them alike.

Batch 1 at each model's own input size, sequential execution, spinning off; milliseconds. Used by the
compression studies (``models.compression``) and by ``bench.bench_models``.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def _session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def onnx_param_count(path: str) -> int:
    """Number of weights stored in the graph initializers (float and int8 alike)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    return int(
        sum(
            numpy_helper.to_array(t).size
            for t in proto.graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
            and len(t.dims) > 1
        )
    )


def round_robin_ms(sessions: dict, batch: int = 1, warmup: int = 10, runs: int = 50,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Time ONNX Runtime sessions round-robin (one call of each in turn, so load from other processes hits
    all alike) on random uint8 inputs with batch ``batch``: (ms per call per path, the feeds)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for p, s in sessions.items():
        inp = s.get_inputs()[0]
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        feeds[p] = {inp.name: rng.integers(0, 256, size=shape, dtype=np.uint8)}
    for _ in range(warmup):
        for p, s in sessions.items():
            s.run(None, feeds[p])
    times: dict[str, list[float]] = {p: [] for p in sessions}
    for _ in range(runs):
        for p, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[p])
            times[p].append((time.perf_counter() - t0) * 1000.0)
    return {p: np.asarray(t) for p, t in times.items()}, feeds


def bench(paths: list[str], threads: int = 2, warmup: int = 10, runs: int = 50, seed: int = 0) -> dict:
    """Latency statistics (ms) of every model, timed round-robin."""
    sessions = {p: _session(p, threads) for p in paths}
    times, inputs = round_robin_ms(sessions, 1, warmup, runs, seed)
    out = {}
    for p in paths:
        t = np.asarray(times[p])
        shape = list(next(iter(inputs[p].values())).shape)
        out[p] = {
            "median_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(t.mean()),
            "runs": int(len(t)),
            "size_mb": os.path.getsize(p) / 1e6,
            "onnx_params": onnx_param_count(p),
            "input_shape": shape,
        }
    return {
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "models": out,
    }


def bench_thread_counts(paths: list[str], thread_counts: list[int], warmup: int = 10, runs: int = 50,
                        seed: int = 0) -> dict:
    """Every model at every thread count, timed in one round-robin; speed-up = first model's median over
    each model's median at the same thread count."""
    sessions = {f"{p}@{t}": _session(p, t) for t in thread_counts for p in paths}
    times, _ = round_robin_ms(sessions, 1, warmup, runs, seed)
    out: dict[str, dict] = {}
    for t in thread_counts:
        med = {p: float(np.median(times[f"{p}@{t}"])) for p in paths}
        out[str(t)] = {p: {"median_ms": med[p], "p90_ms": float(np.percentile(times[f"{p}@{t}"], 90)),
                           "speedup_vs_first": med[paths[0]] / med[p]} for p in paths}
    return {"thread_counts": thread_counts, "warmup": warmup, "runs": runs,
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "by_threads": out}
