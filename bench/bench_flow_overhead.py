"""Overhead of the Prefect inventory flow over the direct library call on the same input.

Runs ``pipeline.inventory.run_inventory`` (what ``forest-inventory run`` calls) and ``flows.inventory``'s
``inventory_flow`` (what ``batch`` and served deployments run) alternately, ``--repeats`` times each, every
run into a fresh output folder (no cache hits, no resumed groups), against one warm ephemeral Prefect
server (its one-time start is reported apart). Default task runner (flows.settings). Writes JSON with the
median times and the overhead in % (target <= 15 %).

    python -m bench.bench_flow_overhead --out bench/out/flow_overhead.json
    python -m bench.bench_flow_overhead --scene-m 200 --out bench/out/flow_overhead_200m.json

Models: models/zoo/crowns.onnx and species.onnx when present, else the tiny test models of
tests/tiny_models.py (``--tiny`` forces them). Input: sample_data/OSBS_029.tif, or a synthetic scene of
``--scene-m`` metres (pipeline.synthetic) generated into a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _models(folder: Path, tiny: bool) -> dict[str, str]:
    from pipeline.inventory import default_model_path

    crown, species = default_model_path("crowns.onnx"), default_model_path("species.onnx")
    if not tiny and crown.is_file():
        return {"crown_model": str(crown), **({"species_model": str(species)} if species.is_file() else {})}
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import write_crown_model, write_species_model

    return {"crown_model": str(write_crown_model(folder / "crowns-tiny.onnx")),
            "species_model": str(write_species_model(folder / "species-tiny.onnx"))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ortho", type=Path, default=REPO / "sample_data" / "OSBS_029.tif")
    parser.add_argument("--scene-m", type=float, default=None, help="synthetic scene edge in m instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles-per-group", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="use the tiny test models")
    parser.add_argument("--threads", type=int, default=2, help="ONNX intra-op threads (both paths)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "flow_overhead.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    from flows.settings import DEFAULT_THREAD_WORKERS, configure, local_run

    configure(work)  # a fresh, private Prefect home: nothing of the user's is touched
    from flows.inventory import inventory_flow
    from pipeline.inventory import InventoryConfig, run_inventory

    ortho = args.ortho
    if args.scene_m:
        from pipeline.synthetic import generate_scene

        ortho = Path(generate_scene(work / "scene", size_m=args.scene_m).ortho)
    options = _models(work, args.tiny)
    options["threads"] = args.threads
    if args.tiles_per_group:
        options["tiles_per_group"] = args.tiles_per_group

    with local_run():
        start = time.perf_counter()
        inventory_flow(ortho=str(ortho), out=str(work / "warmup"), options=options)  # server start + imports
        warmup_s = time.perf_counter() - start
        direct_s, flow_s, n_trees = [], [], set()
        for i in range(args.repeats):
            start = time.perf_counter()
            summary = run_inventory(InventoryConfig(ortho=ortho, out_dir=work / f"direct{i}", **options))
            direct_s.append(time.perf_counter() - start)
            n_trees.add(summary["n_trees"])
            start = time.perf_counter()
            summary = inventory_flow(ortho=str(ortho), out=str(work / f"flow{i}"), options=options)
            flow_s.append(time.perf_counter() - start)
            n_trees.add(summary["n_trees"])
            print(f"repeat {i}: direct {direct_s[-1]:.2f} s, flow {flow_s[-1]:.2f} s", flush=True)
        start = time.perf_counter()
        inventory_flow(ortho=str(ortho), out=str(work / "flow0"), options=options)
        cached_s = time.perf_counter() - start

    direct_med, flow_med = statistics.median(direct_s), statistics.median(flow_s)
    result = {
        "input": str(ortho), "models": {k: Path(v).name for k, v in options.items() if k.endswith("_model")},
        "n_trees": sorted(n_trees), "repeats": args.repeats,
        "direct_s": direct_s, "flow_s": flow_s,
        "direct_median_s": direct_med, "flow_median_s": flow_med,
        "overhead_pct": 100.0 * (flow_med - direct_med) / direct_med,
        "target_overhead_pct": 15.0,
        "first_flow_with_server_start_s": warmup_s,
        "cached_rerun_s": cached_s,
        "task_runner": f"threads ({DEFAULT_THREAD_WORKERS})", "onnx_threads": args.threads,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from pipeline.atomic import atomic_path

    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"direct {direct_med:.2f} s, flow {flow_med:.2f} s: overhead {result['overhead_pct']:.1f} % "
          f"(target <= 15 %); cached rerun {cached_s:.2f} s; first flow incl. server start {warmup_s:.1f} s; "
          f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
