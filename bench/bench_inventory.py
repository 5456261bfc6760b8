"""End-to-end inventory speed and memory on generated orthomosaics of about 0.25, 1 and 4 km² at 10 cm.

Each run is a fresh Python process (``--child``) that calls ``pipeline.inventory.run_inventory`` exactly as
``forest-inventory run`` does (with the scene's CHM, default models), with timing wrappers around the public
stages and their main calls, so the time is split by stage. Peak RSS is the child's own high-water mark
(``os.wait4`` rusage of that one process); ``VmHWM`` is also sampled at the end of every stage to show
which stage sets the peak. Scenes come from ``pipeline.synthetic.generate_scene`` (JPEG-compressed like
drone orthomosaics) into ``bench/data/`` (git-ignored) and are reused when present.

    python -m bench.bench_inventory --out bench/out/bench_inventory.json
    python -m bench.bench_inventory --areas-km2 0.25,1 --runs 3 --large-runs 1 --out bench/out/inv.json

Figures: hectares per minute (valid area / wall time), median over ``--runs`` runs (``--large-runs`` for
areas >= 4 km²), peak RSS (MB), CPU seconds, load average before/after each run, core count.
Every area also gets the physical floor (``bench.bench_floor``: decoding the mosaic + the crown model alone)
and, with ``--baseline COMMIT`` (default: 147f41a, the release before issue 19), the same runs of that
commit's code (``git archive`` into bench/out/baseline_<commit>/, run as its own child process with the same
scene and model files), alternating with this code's runs so both see the same load: the speed-up is a ratio
measured side by side.

Targets (issue 19, 2 cores): >= 250 ha/min, >= 2.8 x the baseline in the same run, peak RSS <= 700 MB growing
< 10 % from smallest to largest; (issue 7) time(4 km²) <= 4.4 x time(1 km²).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"
STAGES = ("validate", "infer_group", "collect_crowns", "add_attributes", "add_carbon", "write_outputs")
TARGET_HA_PER_MIN = 250.0
TARGET_RSS_MB = 700.0
TARGET_SPEEDUP = 2.8  # issue 19: over the previous release, measured in the same run
BASELINE_COMMIT = "147f41a"  # the previous release (main before issue 19)
TARGET_RSS_GROWTH_PCT = 10.0
TARGET_TIME_RATIO_4_TO_1 = 4.4


# --- the child: one timed run ----------------------------------------------------------------------------

def _vm_hwm_mb() -> float:
    """This process's peak resident set so far (MB), from /proc (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Timer:
    """Accumulates wall seconds per name; ``wrap(obj, attr, name)`` times every call of obj.attr."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.hwm_mb: dict[str, float] = {}

    def wrap(self, obj, attr: str, name, stage: bool = False) -> None:
        """``name``: a string, or a function of the call's first argument (e.g. the model) giving one."""
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            key = name(args[0]) if callable(name) else name
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1
                if stage:
                    self.hwm_mb[key] = _vm_hwm_mb()

        setattr(obj, attr, timed)


def child(spec: dict) -> dict:
    """One inventory run as the CLI does it; returns stage times, summary figures and memory."""
    import pipeline.export
    import pipeline.height
    import pipeline.inventory as inv
    import pipeline.species
    from pipeline.onnx_model import OnnxModel
    from pipeline.raster import Ortho

    timer = _Timer()
    for stage in STAGES:
        timer.wrap(inv, stage, stage, stage=True)
    timer.wrap(OnnxModel, "run", lambda model: f"onnx_run_{model.meta.task}")  # model threads: overlap
    timer.wrap(Ortho, "read", "tile_read")  # in the background reader thread: overlaps ONNX
    timer.wrap(inv, "extract_crowns", "extract_crowns")
    timer.wrap(inv, "_heights_for_tile", "chm_for_tiles")
    timer.wrap(pipeline.species, "classify_crowns", "species")
    timer.wrap(pipeline.height, "crown_heights", "heights")
    for name in ("write_geojson", "write_csv", "write_crown_mask", "write_quicklook", "write_gpkg",
                 "write_summary_json"):
        if hasattr(pipeline.export, name):
            timer.wrap(pipeline.export, name, name)
    config = inv.InventoryConfig(ortho=spec["ortho"], out_dir=spec["out"], chm=spec.get("chm"),
                                 crown_model=spec.get("crown_model"), species_model=spec.get("species_model"),
                                 use_species_model=not spec.get("no_species", False),
                                 threads=spec.get("threads"), seed=0)
    t0 = time.perf_counter()
    summary = inv.run_inventory(config)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "stage_s": timer.seconds, "calls": timer.calls, "hwm_mb_after": timer.hwm_mb,
            "peak_rss_mb_self": _vm_hwm_mb(), "n_trees": summary["n_trees"], "area_ha": summary["area_ha"],
            "n_tiles": summary.get("n_tiles"), "n_tiles_skipped": summary.get("n_tiles_skipped"),
            "n_tiles_no_canopy": summary.get("n_tiles_no_canopy"),
            "models": summary.get("models"), "gsd_m": summary.get("gsd_m"),
            "co2e_t": summary.get("co2e_t")}


# --- the parent ------------------------------------------------------------------------------------------

def ensure_scene(area_km2: float, seed: int = 0, compress: str = "jpeg") -> tuple[dict, float | None]:
    """The generated scene for ``area_km2`` (reused when complete); (paths, generation seconds or None)."""
    size_m = round(math.sqrt(area_km2) * 1000.0)
    folder = DATA / f"scene_{size_m}m_seed{seed}_{compress}"
    files = {"ortho": folder / "ortho.tif", "chm": folder / "chm.tif", "meta": folder / "scene.json"}
    if all(p.is_file() for p in files.values()):
        return {k: str(v) for k, v in files.items()} | {"size_m": size_m}, None
    from pipeline.synthetic import generate_scene

    t0 = time.perf_counter()
    generate_scene(folder, size_m=size_m, gsd_m=0.1, seed=seed, compress=compress)
    return {k: str(v) for k, v in files.items()} | {"size_m": size_m}, time.perf_counter() - t0


def baseline_tree(commit: str) -> Path:
    """The source of ``commit`` (``git archive``) in bench/out/baseline_<commit>/, extracted once."""
    full = subprocess.run(["git", "rev-parse", "--short=12", commit], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    folder = REPO / "bench" / "out" / f"baseline_{full}"
    if not (folder / "pipeline" / "inventory.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", full], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_child(spec: dict, log: Path, tree: Path = REPO, module: str = "bench.bench_inventory") -> dict:
    """Run one child process of the code in ``tree`` (this checkout, or a baseline's source); its own rusage
    (peak RSS, CPU) via os.wait4."""
    result_path = Path(spec["out"]).with_suffix(".result.json")
    spec = dict(spec, result=str(result_path))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(tree)}
    with open(log, "a") as fh:
        proc = subprocess.Popen([sys.executable, "-m", module, "--child", json.dumps(spec)],
                                cwd=tree, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed (exit {proc.returncode}); see {log}")
    res = json.loads(result_path.read_text())
    result_path.unlink()
    res.update(process_s=elapsed, peak_rss_mb=usage.ru_maxrss / 1024.0, cpu_s=usage.ru_utime + usage.ru_stime,
               load_before=list(load_before), load_after=list(os.getloadavg()))
    if "wall_s" in res:
        res["ha_per_min"] = res["area_ha"] / (res["wall_s"] / 60.0)
    return res


def _size_record(done: list[dict]) -> dict:
    walls = [r["wall_s"] for r in done]
    return {"runs": len(done), "wall_s": walls, "median_wall_s": statistics.median(walls),
            "area_ha": done[0]["area_ha"], "n_trees": done[0]["n_trees"], "n_tiles": done[0]["n_tiles"],
            "median_ha_per_min": statistics.median(r["ha_per_min"] for r in done),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
            "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in done),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in done),
            "median_stage_s": _median_stages(done), "hwm_mb_after_stage": done[-1]["hwm_mb_after"],
            "load_avg_1m": [r["load_before"][0] for r in done] + [done[-1]["load_after"][0]],
            "models": done[0]["models"], "co2e_t": done[0].get("co2e_t"),
            "n_tiles_skipped": done[0].get("n_tiles_skipped"), "details": done}


def _median_stages(runs: list[dict]) -> dict[str, float]:
    names = sorted({k for r in runs for k in r["stage_s"]})
    return {n: statistics.median(r["stage_s"].get(n, 0.0) for r in runs) for n in names}


def bench(areas_km2: list[float], runs: int, large_runs: int, models: dict, threads: int | None,
          work: Path, log: Path, keep_outputs: bool = False, baseline: str | None = None,
          floor: bool = True) -> dict:
    """Per area: the floor (decode + model alone), then ``runs`` runs of this code alternating with runs of
    the ``baseline`` commit's code (same scene, models and process setup; order flipped every run)."""
    sizes = {}
    base_tree = None
    if baseline:
        try:
            base_tree = baseline_tree(baseline)
        except (OSError, subprocess.CalledProcessError) as exc:  # no git, or the commit is not here
            print(f"baseline {baseline}: not available ({exc}); timing this code only", flush=True)
    for area in areas_km2:
        scene, gen_s = ensure_scene(area)
        n = large_runs if area >= 4.0 else runs
        record: dict = {}
        if floor:
            crown = models.get("crown_model") or str(REPO / "models" / "zoo" / "crowns.onnx")
            out = work / f"{area:g}km2_floor"
            record["floor"] = run_child({"ortho": scene["ortho"], "model": crown, "out": str(out)}, log,
                                        module="bench.bench_floor")
            f = record["floor"]
            print(f"{area:g} km2 floor: decode {f['decode_s']:.1f} s + model {f['model_s']:.1f} s "
                  f"({f['sessions']} x {f['threads_per_session']} threads) = "
                  f"{f['floor_ha_per_min']:.0f} ha/min", flush=True)
        done: dict[str, list[dict]] = {"new": [], "baseline": []}
        for k in range(n):
            order = ["new", "baseline"] if k % 2 == 0 else ["baseline", "new"]
            for which in order:
                if which == "baseline" and base_tree is None:
                    continue
                out = work / f"{area:g}km2_{which}_run{k}"
                shutil.rmtree(out, ignore_errors=True)
                spec = {"ortho": scene["ortho"], "chm": scene["chm"], "out": str(out), "threads": threads,
                        **models}
                res = run_child(spec, log, tree=base_tree if which == "baseline" else REPO)
                done[which].append(res)
                print(f"{area:g} km2 {which} run {k + 1}/{n}: {res['wall_s']:.1f} s, "
                      f"{res['ha_per_min']:.1f} ha/min, peak RSS {res['peak_rss_mb']:.0f} MB, "
                      f"load {res['load_before'][0]:.1f}", flush=True)
                if not keep_outputs:
                    shutil.rmtree(out, ignore_errors=True)
        record.update(_size_record(done["new"]))
        record.update({"area_km2": area, "scene_size_m": scene["size_m"], "ortho": scene["ortho"],
                       "ortho_mb": Path(scene["ortho"]).stat().st_size / 1e6, "scene_generation_s": gen_s})
        if done["baseline"]:
            base = _size_record(done["baseline"])
            record["baseline"] = base
            record["speedup_vs_baseline"] = base["median_wall_s"] / record["median_wall_s"]
            record["paired_speedups"] = [b["wall_s"] / a["wall_s"]
                                         for a, b in zip(done["new"], done["baseline"], strict=True)]
        sizes[f"{area:g}"] = record
    return sizes


def checks(sizes: dict) -> dict:
    """The issue's targets against what was measured (None where a size was not run)."""
    areas = sorted(sizes.values(), key=lambda s: s["area_km2"])
    out: dict = {"ha_per_min_min": min(s["median_ha_per_min"] for s in areas),
                 "peak_rss_mb_max": max(s["peak_rss_mb"] for s in areas)}
    out["ha_per_min_ok"] = out["ha_per_min_min"] >= TARGET_HA_PER_MIN
    out["rss_ok"] = out["peak_rss_mb_max"] <= TARGET_RSS_MB
    if len(areas) > 1:
        small, large = areas[0], areas[-1]
        out["rss_growth_pct"] = 100.0 * (large["median_peak_rss_mb"] / small["median_peak_rss_mb"] - 1.0)
        out["rss_growth_between_km2"] = [small["area_km2"], large["area_km2"]]
        out["rss_growth_ok"] = out["rss_growth_pct"] < TARGET_RSS_GROWTH_PCT
    if all("speedup_vs_baseline" in s for s in areas):
        out["speedup_vs_baseline_min"] = min(s["speedup_vs_baseline"] for s in areas)
        out["speedup_ok"] = out["speedup_vs_baseline_min"] >= TARGET_SPEEDUP
    by_area = {s["area_km2"]: s for s in areas}
    if 1.0 in by_area and 4.0 in by_area:
        out["time_ratio_4_to_1"] = by_area[4.0]["median_wall_s"] / by_area[1.0]["median_wall_s"]
        out["area_ratio_4_to_1"] = by_area[4.0]["area_ha"] / by_area[1.0]["area_ha"]
        out["time_ratio_ok"] = out["time_ratio_4_to_1"] <= TARGET_TIME_RATIO_4_TO_1
    return out


def default_models(tiny: bool, work: Path) -> dict:
    """models/zoo/crowns.onnx (+ species.onnx when present), or the tiny test models with --tiny."""
    if tiny:
        sys.path.insert(0, str(REPO))
        from tests.tiny_models import write_crown_model, write_species_model

        work.mkdir(parents=True, exist_ok=True)
        crown = write_crown_model(work / "crowns-tiny.onnx", tile_size=256, overlap_px=64)
        species = write_species_model(work / "species-tiny.onnx", chip_size=64, gsd_m=0.2)
        return {"crown_model": str(crown), "species_model": str(species)}
    zoo = REPO / "models" / "zoo"
    if not (zoo / "crowns.onnx").is_file():
        raise SystemExit(f"{zoo / 'crowns.onnx'} is missing: train/export the default crown model, or pass "
                         "--tiny to benchmark with the tiny test models")
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--areas-km2", default="0.25,1,4", help="comma-separated scene areas, km²")
    ap.add_argument("--runs", type=int, default=3, help="runs per area (median reported)")
    ap.add_argument("--large-runs", type=int, default=3, help="runs for areas >= 4 km²")
    ap.add_argument("--threads", type=int, default=None, help="ONNX threads (default: all cores)")
    ap.add_argument("--tiny", action="store_true", help="tiny test models instead of models/zoo")
    ap.add_argument("--crown-model", default=None, help="crown ONNX model instead of models/zoo/crowns.onnx")
    ap.add_argument("--no-species", action="store_true", help="skip the species model")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--baseline", default=BASELINE_COMMIT,
                    help="git commit timed in the same run, alternating with this code ('' for none)")
    ap.add_argument("--no-floor", action="store_true", help="skip the decode + model-alone floor")
    ap.add_argument("--label", default=None, help="heading of this run in RESULTS.md")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "bench_inventory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    if args.child:
        spec = json.loads(args.child)
        res = child(spec)
        Path(spec["result"]).write_text(json.dumps(res))
        return 0
    out = Path(args.out).resolve()  # absolute: the baseline's children run in their own tree
    work = out.parent / "inventory_runs"
    work.mkdir(parents=True, exist_ok=True)
    models = {"crown_model": args.crown_model} if args.crown_model else default_models(args.tiny, work)
    if args.no_species:
        models["no_species"] = True
    areas = [float(a) for a in args.areas_km2.split(",")]
    t0 = time.time()
    load_start = os.getloadavg()
    if not args.tiny and "crown_model" not in models:  # both trees run the same model files
        models["crown_model"] = str(REPO / "models" / "zoo" / "crowns.onnx")
        if (REPO / "models" / "zoo" / "species.onnx").is_file() and not args.no_species:
            models["species_model"] = str(REPO / "models" / "zoo" / "species.onnx")
    sizes = bench(areas, max(1, args.runs), max(1, args.large_runs), models, args.threads, work,
                  out.with_suffix(".log"), baseline=args.baseline or None, floor=not args.no_floor)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    res = {"benchmark": "inventory_end_to_end", "label": args.label, "gsd_m": 0.1,
           "cpu_count": os.cpu_count(),
           "cores_available": affinity, "machine": platform.machine(), "python": platform.python_version(),
           "threads": args.threads or "all cores", "tiny_models": args.tiny, "species": not args.no_species,
           "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
           "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg()),
           "baseline_commit": args.baseline or None,
           "targets": {"ha_per_min": TARGET_HA_PER_MIN, "peak_rss_mb": TARGET_RSS_MB,
                       "speedup_vs_baseline": TARGET_SPEEDUP,
                       "rss_growth_pct": TARGET_RSS_GROWTH_PCT,
                       "time_ratio_4_to_1": TARGET_TIME_RATIO_4_TO_1},
           "sizes": sizes, "checks": checks(sizes),
           "command": shlex.join(["python", "-m", "bench.bench_inventory", *given])}
    from pipeline.atomic import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["checks"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
