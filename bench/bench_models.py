"""ONNX Runtime CPU latency of crown models: dense vs compressed vs int8.

Batch 1 at each model's own input size (the engine tile), ``--threads`` intra-op threads (default 2),
sequential execution, spinning off, ``--warmup`` runs then ``--runs`` timed runs. Models are timed
round-robin (one run of each in turn) so that load from other processes on a shared machine hits all
of them alike. Writes JSON: per model median/p90/mean ms, file size, parameter count, input shape.

    python -m bench.bench_models models/zoo/crowns-dense.onnx models/zoo/crowns.onnx --out bench.json

``--threads 1,2`` times every model at each thread count in ONE round-robin (the same process and the same
minutes for all), and reports each model's speed-up over the first model at each thread count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.latency import bench, bench_thread_counts, onnx_param_count, round_robin_ms  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", default="2", help="intra-op threads, or a list (1,2) timed side by side")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=None, help="JSON output path (default: print)")
    a = ap.parse_args(argv)
    counts = [int(t) for t in str(a.threads).split(",")]
    if len(counts) == 1:
        res = bench(a.models, counts[0], a.warmup, a.runs)
    else:
        res = bench_thread_counts(a.models, counts, a.warmup, a.runs)
    text = json.dumps(res, indent=2)
    if a.out:
        from pipeline.atomic import atomic_path

        with atomic_path(Path(a.out)) as tmp:
            Path(tmp).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
