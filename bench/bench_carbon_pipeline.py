"""Whole-pipeline carbon check (issue 5): inventory a synthetic scene whose truth AGB comes from the same
allometry, and compare the AGB per 1-ha plot and in total with the truth.

    python -m bench.bench_carbon_pipeline --size-m 200 --seed 11 --out bench/out/carbon_pipeline.json

The scene has a CHM, so heights come from it; crowns are the crown model's detections (default models), so
the error includes crown omission, commission and merging, which the Monte Carlo does not model.
``--truth-crowns`` instead hands the truth outlines to the carbon stage, isolating the carbon chain.

The truth here comes from the same point allometry as the estimate, so this check cannot find an interval
that is too narrow: ``python -m bench.bench_carbon_coverage`` (``pipeline.carbon.coverage``) draws the truth
from the stated uncertainties plus misspecifications (issue 17) and measures the interval's coverage.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio

from pipeline.aggregate import assign_cells
from pipeline.inventory import InventoryConfig, run_inventory
from pipeline.synthetic import generate_scene


def plot_errors(grid: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> list[dict]:
    """Per grid cell: estimated AGB (t) with its 90% interval against the truth AGB (t) of the trees whose
    centre lies in the cell (projected CRS of the scene)."""
    cells = assign_cells(truth["x"].to_numpy(), truth["y"].to_numpy(), grid)
    truth_t = (truth["agb_kg"] / 1000.0).groupby(cells).sum().to_dict()  # cell_id -> t
    rows = []
    for cell in grid.itertuples():
        est, lo, hi = float(cell.agb_t), float(cell.agb_t_ci90_low), float(cell.agb_t_ci90_high)
        t = float(truth_t.get(int(cell.cell_id), 0.0))
        rows.append({"cell": int(cell.cell_id), "truth_agb_t": t, "est_agb_t": est, "ci90": [lo, hi],
                     "error_pct": 100.0 * (est - t) / t if t > 0 else None, "truth_in_ci90": lo <= t <= hi})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-m", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--work", default="bench/data/carbon_pipeline")
    ap.add_argument("--out", default="bench/out/carbon_pipeline.json")
    args = ap.parse_args()

    work = Path(args.work) / f"scene_{int(args.size_m)}m_seed{args.seed}"
    scene = generate_scene(work, size_m=args.size_m, seed=args.seed) if not (work / "truth.gpkg").exists() \
        else None
    ortho, chm, truth_path = work / "ortho.tif", work / "chm.tif", work / "truth.gpkg"
    t0 = time.perf_counter()
    summary = run_inventory(InventoryConfig(ortho=ortho, out_dir=work / "inventory", chm=chm, seed=0))
    elapsed = time.perf_counter() - t0
    grid = gpd.read_file(work / "inventory" / "inventory.gpkg", layer="grid")
    truth = pyogrio.read_dataframe(truth_path, layer="crowns")
    rows = [r for r in plot_errors(grid, truth) if r["truth_agb_t"] > 0]
    errors = np.array([r["error_pct"] for r in rows])
    truth_total = float(truth["agb_kg"].sum() / 1000.0)
    result = {
        "command": f"python -m bench.bench_carbon_pipeline --size-m {args.size_m:g} --seed {args.seed}",
        "cores": os.cpu_count(), "elapsed_s": elapsed,
        "n_trees_truth": len(truth), "n_trees_detected": summary["n_trees"],
        "truth_agb_t": truth_total, "est_agb_t": summary["agb_t"],
        "total_error_pct": 100.0 * (summary["agb_t"] - truth_total) / truth_total,
        "plots": rows,
        "plot_mean_abs_error_pct": float(np.mean(np.abs(errors))) if len(errors) else None,
        "plots_truth_in_ci90": int(sum(r["truth_in_ci90"] for r in rows)), "n_plots": len(rows),
        "scene_generated_now": scene is not None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "plots"}, indent=2))


if __name__ == "__main__":
    main()
