"""Crowns, species and carbon of this code against a baseline commit's code on the same inputs.

Each side runs ``forest-inventory run`` (through ``pipeline.inventory.run_inventory``) in its own process
(the baseline from ``git archive`` of the commit, as in ``bench.bench_inventory``), with the same models, and
their crowns.csv / crowns.geojson are compared tree by tree (matched by tree_id, then checked by position).
Wall and CPU seconds of both runs are recorded too (one run each, baseline first: a rough ratio; the
alternating runs of ``bench.bench_inventory`` are the measurement).

    python -m bench.compare_baseline sample_data/OSBS_029.tif --out bench/out/compare_demo
    python -m bench.compare_baseline bench/data/scene_500m_seed0_jpeg/ortho.tif \\
        --chm bench/data/scene_500m_seed0_jpeg/chm.tif --out bench/out/compare_500m
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_inventory import BASELINE_COMMIT, REPO, baseline_tree

_RUN = """
import json, sys
import pipeline.inventory as inv
spec = json.loads(sys.argv[1])
cfg = inv.InventoryConfig(ortho=spec["ortho"], out_dir=spec["out"], chm=spec.get("chm"),
                          crown_model=spec["crown_model"], species_model=spec["species_model"], seed=0)
print(json.dumps(inv.run_inventory(cfg)["co2e_t"]))
"""


def run(tree: Path, spec: dict) -> dict:
    """One run in its own process; its wall and CPU seconds (os.wait4 rusage of that process)."""
    shutil.rmtree(spec["out"], ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _RUN, json.dumps(spec)], cwd=tree,
                            env=os.environ | {"PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the run in {tree} failed")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024.0, "load_avg_1m": os.getloadavg()[0]}


def compare(a: Path, b: Path) -> dict:
    """Tree-by-tree differences of run ``b`` (new) against run ``a`` (baseline)."""
    import geopandas as gpd
    import pandas as pd

    ta, tb = pd.read_csv(a / "crowns.csv"), pd.read_csv(b / "crowns.csv")
    ga, gb = gpd.read_file(a / "crowns.geojson"), gpd.read_file(b / "crowns.geojson")
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    out = {"n_trees": [len(ta), len(tb)], "co2e_t": [sa["co2e_t"], sb["co2e_t"]],
           "co2e_t_ci90": [sa.get("co2e_t_ci90"), sb.get("co2e_t_ci90")]}
    if len(ta) != len(tb):
        return out | {"identical_crowns": False}
    same_xy = np.allclose(ta[["x", "y"]].to_numpy(), tb[["x", "y"]].to_numpy(), atol=1e-3)
    sym = np.asarray(ga.to_crs(ga.estimate_utm_crs()).geometry.symmetric_difference(
        gb.to_crs(ga.estimate_utm_crs()).geometry, align=False).area)
    out.update({
        "identical_crowns": bool(same_xy and np.all(sym < 1e-6)),
        "crown_outline_sym_diff_m2_max": float(sym.max()) if len(sym) else 0.0,
        "species_equal_fraction": float((ta["species"] == tb["species"]).mean()) if len(ta) else 1.0,
        "species_prob_abs_diff_max": float(np.nanmax(np.abs(ta["species_prob"] - tb["species_prob"])))
        if len(ta) and ta["species_prob"].notna().any() else 0.0,
        "agb_kg_abs_diff_max": float(np.abs(ta["agb_kg"] - tb["agb_kg"]).max()) if len(ta) else 0.0,
        "agb_kg_total": [float(ta["agb_kg"].sum()), float(tb["agb_kg"].sum())],
    })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ortho")
    ap.add_argument("--chm", default=None)
    ap.add_argument("--crown-model", default=str(REPO / "models" / "zoo" / "crowns.onnx"))
    ap.add_argument("--species-model", default=str(REPO / "models" / "zoo" / "species.onnx"))
    ap.add_argument("--baseline", default=BASELINE_COMMIT)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    spec = {"ortho": str(Path(a.ortho).resolve()), "chm": str(Path(a.chm).resolve()) if a.chm else None,
            "crown_model": str(Path(a.crown_model).resolve()),
            "species_model": str(Path(a.species_model).resolve())}
    base = run(baseline_tree(a.baseline), spec | {"out": str(out / "baseline")})
    new = run(REPO, spec | {"out": str(out / "new")})
    summary = json.loads((out / "new" / "summary.json").read_text())
    res = {"ortho": a.ortho, "chm": a.chm, "baseline": a.baseline, "crown_model": a.crown_model,
           "cores": os.cpu_count(), "runs": {"baseline": base, "new": new},
           "speedup_wall": base["wall_s"] / new["wall_s"], "cpu_ratio": base["cpu_s"] / new["cpu_s"],
           "n_tiles": summary.get("n_tiles"), "n_tiles_no_canopy": summary.get("n_tiles_no_canopy"),
           **compare(out / "baseline", out / "new")}
    (out / "compare.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
