"""``make bench``: run every benchmark of the project and write bench/RESULTS.md.

Each benchmark is its own module writing JSON into bench/out/ (git-ignored), run here as a subprocess:
- ``bench.bench_inventory``: end-to-end hectares per minute, peak RSS and time by stage on generated 10 cm
  orthomosaics of about 0.25, 1 and 4 km² (scenes cached in bench/data/);
- ``bench.bench_models``: dense vs compressed vs int8 crown-model latency in ONNX Runtime (models/zoo);
- ``bench.bench_montecarlo``: carbon Monte Carlo throughput;
- ``bench.bench_flow_overhead``: Prefect flow overhead over the direct library call.
A benchmark whose module or models are missing is reported as such; a failed one with its log file.

    python -m bench.run_all                          # everything (tens of minutes on 2 cores)
    python -m bench.run_all --only inventory --areas-km2 0.25,1 --runs 3
    python -m bench.run_all --render-only            # rewrite RESULTS.md from the JSON in bench/out/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "RESULTS.md"
ZOO = REPO / "models" / "zoo"
BENCHES = ("inventory", "models", "montecarlo", "flow")
RUN_ORDER = ("montecarlo", "flow", "models", "inventory")  # the long one last
JSON_NAMES = {"inventory": "bench_inventory.json", "models": "bench_models.json",
              "montecarlo": "bench_montecarlo.json", "flow": "bench_flow_overhead.json"}  # own names: the
# owners write bench/out/flow_overhead.json etc. by hand, which must not be mistaken for this run


def _crown_models() -> list[Path]:
    """Every crown model in models/zoo: dense, the default crowns.onnx, the compressed variants
    (crowns-<method>.onnx) and their static int8 copies (*.int8.onnx)."""
    found = [p for p in (ZOO / "crowns-dense.onnx", ZOO / "crowns.onnx") if p.is_file()]
    found += sorted(p for p in ZOO.glob("crowns*.onnx") if p not in found)
    return found


def commands(args: argparse.Namespace) -> dict[str, list[str] | str]:
    """The command line of each benchmark, or the reason it cannot run."""
    py = [sys.executable, "-m"]
    cmds: dict[str, list[str] | str] = {}
    inv = [*py, "bench.bench_inventory", "--areas-km2", args.areas_km2, "--runs", str(args.runs),
           "--large-runs", str(args.large_runs), "--out", str(OUT / "bench_inventory.json")]
    if args.tiny:
        inv.append("--tiny")
    elif args.crown_model:
        inv += ["--crown-model", args.crown_model]
    elif not (ZOO / "crowns.onnx").is_file():
        inv = "models/zoo/crowns.onnx is missing (train and export the default crown model first)"
    cmds["inventory"] = inv
    models = _crown_models()
    cmds["models"] = [*py, "bench.bench_models", *map(str, models), "--threads", "2",
                      "--out", str(OUT / "bench_models.json")] if models else "no crown models in models/zoo"
    cmds["montecarlo"] = [*py, "bench.bench_montecarlo", "--runs", "3", "--out",
                          str(OUT / "bench_montecarlo.json")]
    # on the 0.25 km² scene: on the 0.5 s demo image the flow's fixed cost (about 0.3 s) is the whole story
    cmds["flow"] = [*py, "bench.bench_flow_overhead", "--scene-m", "500", "--repeats", "3", "--out",
                    str(OUT / JSON_NAMES["flow"])]
    for name, module in (("models", "bench_models"), ("montecarlo", "bench_montecarlo"),
                         ("flow", "bench_flow_overhead"), ("inventory", "bench_inventory")):
        if not (REPO / "bench" / f"{module}.py").is_file():
            cmds[name] = f"bench/{module}.py is not present"
    return cmds


def run_one(name: str, cmd: list[str], timeout_s: float) -> dict:
    """Run one benchmark; its status, wall time and log path (the JSON is read later)."""
    log = OUT / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            done = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env=os.environ | {"HF_HUB_OFFLINE": "1"})
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
    return {"status": status, "seconds": time.perf_counter() - t0, "log": str(log.relative_to(REPO))}


def _short(cmd: list[str]) -> str:
    """The command as a user would type it (repo-relative paths, ``python``)."""
    parts = ["python" if c == sys.executable else c.replace(str(REPO) + "/", "") for c in cmd]
    return " ".join(parts)


def _load(name: str) -> dict | None:
    path = OUT / JSON_NAMES[name]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**missed**")


def _f(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


STAGE_LABELS = [
    ("validate", "validate (open inputs, stretch, plan)"),
    ("infer_group", "segment + crowns (all tile groups)"),
    ("onnx_run_crown_segmentation", "  crown model ONNX calls (summed over the sessions; overlaps)"),
    ("extract_crowns", "  of which crown extraction (watershed, polygons)"),
    ("chm_for_tiles", "  CHM reads for seeds and the no-canopy exit (reader thread, overlaps)"),
    ("tile_read", "  tile reads (background thread, overlaps)"),
    ("collect_crowns", "collect crowns"),
    ("add_attributes", "species + height"),
    ("species", "  of which species (chips + model)"),
    ("onnx_run_species_classification", "    species model ONNX calls (model thread, overlaps chips)"),
    ("heights", "  of which CHM heights"),
    ("add_carbon", "carbon (Monte Carlo)"),
    ("write_outputs", "write outputs"),
    ("write_crown_mask", "  of which crown_mask.tif"),
    ("write_quicklook", "  of which quicklook.png"),
    ("write_gpkg", "  of which inventory.gpkg"),
    ("write_geojson", "  of which crowns.geojson"),
]


def render_inventory(res: dict, cmd: str) -> list[str]:
    sizes = sorted(res["sizes"].values(), key=lambda s: s["area_km2"])
    chk, tg = res["checks"], res["targets"]
    lines = [f"## End-to-end inventory at 10 cm{': ' + res['label'] if res.get('label') else ''}", "",
             f"`{cmd}`", "",
             f"Started {res['started_utc']} UTC; {res['cpu_count']} cores ({res['cores_available']} "
             f"available to the process); ONNX threads: {res['threads']}; models: "
             + ", ".join(f"{k} `{v[:12]}`" for k, v in (sizes[0]["models"] or {}).items())
             + (" (tiny test models)" if res.get("tiny_models") else "")
             + f"; with the scene's CHM{'' if res.get('species', True) else ', no species model'}. "
             f"Load average (1 min) at start {res['load_avg_start'][0]:.1f}, "
             f"at end {res['load_avg_end'][0]:.1f}.",
             "",
             "| area | scene | ortho file | tiles | trees | runs | median wall s | **ha/min** | "
             "peak RSS MB | CPU s (median) | load (1 min) per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        lines.append(f"| {s['area_ha']:.1f} ha ({s['area_km2']:g} km²) | {s['scene_size_m']} m square | "
                     f"{s['ortho_mb']:.0f} MB | {s['n_tiles']:,} | {s['n_trees']:,} | {s['runs']} | "
                     f"{_f(s['median_wall_s'])} | **{_f(s['median_ha_per_min'])}** | "
                     f"{_f(s['peak_rss_mb'], 0)} | {_f(s['median_cpu_s'])} | "
                     + ", ".join(f"{v:.1f}" for v in s["load_avg_1m"]) + " |")
    if any("baseline" in s for s in sizes):
        lines += ["", f"The previous release (commit `{res.get('baseline_commit')}`, `git archive` into "
                  "bench/out/) in the same run, alternating with this code's runs, same scenes and model "
                  "files:", "",
                  "| area | this code: wall s / ha/min / CPU s / peak RSS MB | previous release: wall s / "
                  "ha/min / CPU s / peak RSS MB | **speed-up (wall)** | CPU ratio | trees (this / previous) "
                  "| CO2e t (this / previous) |", "|---|---|---|---|---|---|---|"]
        for s in sizes:
            b = s.get("baseline")
            if not b:
                continue
            lines.append(
                f"| {s['area_km2']:g} km² | {_f(s['median_wall_s'])} / {_f(s['median_ha_per_min'])} / "
                f"{_f(s['median_cpu_s'])} / {_f(s['peak_rss_mb'], 0)} | {_f(b['median_wall_s'])} / "
                f"{_f(b['median_ha_per_min'])} / {_f(b['median_cpu_s'])} / {_f(b['peak_rss_mb'], 0)} | "
                f"**{s['speedup_vs_baseline']:.2f}×** | {b['median_cpu_s'] / s['median_cpu_s']:.2f}× | "
                f"{s['n_trees']:,} / {b['n_trees']:,} | {_f(s.get('co2e_t'), 2)} / "
                f"{_f(b.get('co2e_t'), 2)} |")
    if any("floor" in s for s in sizes):
        lines += ["", "Physical floor on this machine (`bench.bench_floor`, measured in the same run): "
                  "decoding the mosaic once, and the crown model alone over the scene's tiles with the "
                  "engine's sessions (a sample of real tiles, scaled to the tile count):", "",
                  "| area | tiles | decode s | engine tile reads s | model ms/tile (engine sessions) | "
                  "model ms/tile (1 session, all cores) | model s | **floor s** | floor ha/min | model CPU "
                  "ms/tile | model alone on an idle machine: s / ha/min |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in sizes:
            f = s.get("floor")
            if not f:
                continue
            ms = f["model_ms_per_tile"]
            lines.append(
                f"| {s['area_km2']:g} km² | {f['n_tiles']:,} | {_f(f['decode_s'])} | "
                f"{_f(f['tile_read_s'])} | "
                f"{_f(ms['engine'])} ({f['sessions']} × {f['threads_per_session']} thread) | "
                f"{_f(ms['one_session_all_cores'])} | {_f(f['model_s'])} | **{_f(f['floor_s'])}** | "
                f"{_f(f['floor_ha_per_min'])} | {_f(f.get('model_cpu_ms_per_tile', {}).get('engine'))} | "
                f"{_f(f.get('model_cpu_floor_s'))} / {_f(f.get('model_cpu_floor_ha_per_min'))} |")
    lines += ["", "| target | measured | |", "|---|---|---|",
              f"| ≥ {tg['ha_per_min']:g} ha/min (slowest size) | {_f(chk['ha_per_min_min'])} ha/min | "
              f"{_ok(chk.get('ha_per_min_ok'))} |",
              f"| peak RSS ≤ {tg['peak_rss_mb']:g} MB | {_f(chk['peak_rss_mb_max'], 0)} MB | "
              f"{_ok(chk.get('rss_ok'))} |"]
    if "speedup_vs_baseline_min" in chk:
        lines.append(f"| ≥ {tg.get('speedup_vs_baseline', 2.8):g} × the previous release (same run, slowest "
                     f"size) | {chk['speedup_vs_baseline_min']:.2f} × | {_ok(chk.get('speedup_ok'))} |")
    if "rss_growth_pct" in chk:
        a, b = chk["rss_growth_between_km2"]
        lines.append(f"| RSS growth < {tg['rss_growth_pct']:g} % ({a:g} → {b:g} km²) | "
                     f"{chk['rss_growth_pct']:+.1f} % | {_ok(chk.get('rss_growth_ok'))} |")
    if "time_ratio_4_to_1" in chk:
        lines.append(f"| time(4 km²) ≤ {tg['time_ratio_4_to_1']:g} × time(1 km²) | "
                     f"{chk['time_ratio_4_to_1']:.2f} × (area ratio {chk['area_ratio_4_to_1']:.2f}) | "
                     f"{_ok(chk.get('time_ratio_ok'))} |")
    lines += ["", "Time by stage (median seconds of the runs; nested rows are parts of the row above):", "",
              "| stage | " + " | ".join(f"{s['area_km2']:g} km²" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for key, label in STAGE_LABELS:
        if any(key in s["median_stage_s"] for s in sizes):
            cells = [_f(s["median_stage_s"].get(key)) for s in sizes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **total (wall)** | " + " | ".join(_f(s["median_wall_s"]) for s in sizes) + " |")
    lines += ["", "Peak RSS (MB, VmHWM) reached by the end of each stage, last run:", "",
              "| stage | " + " | ".join(f"{s['area_km2']:g} km²" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for key in ("validate", "infer_group", "collect_crowns", "add_attributes", "add_carbon", "write_outputs"):
        cells = [_f(s["hwm_mb_after_stage"].get(key), 0) for s in sizes]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_models(res: dict, cmd: str) -> list[str]:
    lines = ["## Crown model latency (ONNX Runtime, CPU)", "", f"`{cmd}`", "",
             f"Batch 1 at each model's tile size, {res['threads']} threads, {res['warmup']} warm-up then "
             f"{res['runs']} timed runs round-robin; {res['cpu_count']} cores; load average (1 min) "
             f"{res['load_avg_1m']:.1f}.", "",
             "| model | file MB | weights | input | median ms | p90 ms |", "|---|---|---|---|---|---|"]
    for path, m in res["models"].items():
        lines.append(f"| `{Path(path).name}` | {m['size_mb']:.1f} | {m['onnx_params']:,} | "
                     f"{'×'.join(map(str, m['input_shape']))} | {m['median_ms']:.1f} | {m['p90_ms']:.1f} |")
    return lines + [""]


def render_montecarlo(res: dict, cmd: str) -> list[str]:
    load = res.get("load_average") or [float("nan")]
    return ["## Carbon Monte Carlo", "", f"`{cmd}`", "",
            "| trees | draws | runs | median wall s | median CPU s | target | |",
            "|---|---|---|---|---|---|---|",
            f"| {res['n_trees']:,} | {res['n_draws']:,} | {res['runs']} | {res['median_s']:.2f} | "
            f"{res['cpu_s_median']:.2f} | ≤ {res['target_s']:g} s | {_ok(res.get('meets_target'))} |", "",
            f"{res['cpu_count']} cores, {res['threads']} threads; load average (1 min) {load[0]:.1f}; "
            f"throughput {res['n_trees'] * res['n_draws'] / res['median_s'] / 1e6:.1f} M tree-draws/s.", ""]


def render_flow(res: dict, cmd: str) -> list[str]:
    machine = res.get("machine", {})
    load = machine.get("load_avg") or [float("nan")]
    return ["## Prefect flow overhead", "", f"`{cmd}`", "",
            "| input | repeats | direct median s | flow median s | overhead | target | |",
            "|---|---|---|---|---|---|---|",
            f"| `{Path(res['input']).name}` | {res['repeats']} | {res['direct_median_s']:.2f} | "
            f"{res['flow_median_s']:.2f} | {res['overhead_pct']:+.1f} % | "
            f"≤ {res['target_overhead_pct']:g} % | "
            f"{_ok(res['overhead_pct'] <= res['target_overhead_pct'])} |",
            "",
            "First flow run including the ephemeral server start: "
            f"{res['first_flow_with_server_start_s']:.1f} s; a cached rerun: "
            f"{_f(res.get('cached_rerun_s'), 2)} s. {machine.get('cpus')} cores; load average (1 min) "
            f"{load[0]:.1f}.", ""]


RENDER = {"inventory": render_inventory, "models": render_models, "montecarlo": render_montecarlo,
          "flow": render_flow}
TITLES = {"inventory": "End-to-end inventory", "models": "Crown model latency",
          "montecarlo": "Carbon Monte Carlo", "flow": "Prefect flow overhead"}


def render(cmds: dict, statuses: dict, load_start: tuple, load_end: tuple, note: str | None = None) -> str:
    now = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    start, end = (", ".join(f"{v:.1f}" for v in load) for load in (load_start, load_end))
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`python -m bench.run_all`) on {now} UTC at commit "
             f"`{_git_commit()}`.", "",
             f"Machine: {_cpu_model()}, **{os.cpu_count()} cores**, Python {platform.python_version()}. "
             f"Load average (1/5/15 min) when this rendering started: {start}; when it ended: {end}. "
             "Wall-clock figures on a shared machine include waiting for the CPU whenever the load average "
             "is above the core count; CPU seconds are given next to them.", ""]
    for name in BENCHES:
        cmd = cmds.get(name)
        res = _load(name)
        status = statuses.get(name, {}).get("status")
        if isinstance(cmd, str):
            lines += [f"## {TITLES[name]}", "", f"Not run: {cmd}.", ""]
            continue
        if res is None:
            lines += [f"## {TITLES[name]}", "", f"`{_short(cmd)}`", "",
                      f"No result: {status or 'not run yet'}"
                      + (f" (log: `{statuses[name]['log']}`)." if name in statuses else "."), ""]
            continue
        shown = res["command"].replace(str(REPO) + "/", "") if name == "inventory" and res.get("command") \
            else _short(cmd)
        try:
            lines += RENDER[name](res, shown)
        except (KeyError, TypeError, ValueError) as exc:
            lines += [f"## {TITLES[name]}", "", f"`{shown}`", "",
                      f"The result could not be rendered ({type(exc).__name__}: {exc}); the raw JSON is in "
                      "bench/out/.", ""]
        if status and status != "ok":
            lines += [f"(This run: {status}; the figures above are from the last successful run.)", ""]
        if name == "inventory" and note:
            lines += [f"Note: {note}", ""]
        if name == "inventory":  # further inventory runs (other models, sizes): bench_inventory_*.json
            for extra in sorted(OUT.glob("bench_inventory_*.json")):
                try:
                    more = json.loads(extra.read_text())
                    lines += render_inventory(more, more["command"].replace(str(REPO) + "/", ""))
                except (OSError, KeyError, TypeError, ValueError) as exc:
                    lines += [f"({extra.name} could not be rendered: {type(exc).__name__}: {exc})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(RUN_ORDER), help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--crown-model", default=None, help="inventory with this crown model, not models/zoo")
    ap.add_argument("--note", default=None, help="a paragraph added under the inventory results")
    ap.add_argument("--areas-km2", default="0.25,1,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--large-runs", type=int, default=3, help="runs of the 4 km² scene")
    ap.add_argument("--tiny", action="store_true", help="inventory with the tiny test models (smoke test)")
    ap.add_argument("--timeout-min", type=float, default=240.0, help="per benchmark")
    ap.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from bench/out/*.json")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    cmds = commands(args)
    statuses: dict[str, dict] = {}
    status_file = OUT / "run_all_status.json"
    if status_file.exists():
        statuses = json.loads(status_file.read_text())
    load_start = os.getloadavg()
    if not args.render_only:
        for name in [n.strip() for n in args.only.split(",") if n.strip()]:
            if name not in BENCHES:
                raise SystemExit(f"--only {name!r}: choose from {', '.join(BENCHES)}")
            cmd = cmds[name]
            if isinstance(cmd, str):
                print(f"{name}: skipped ({cmd})", flush=True)
                continue
            print(f"{name}: {_short(cmd)}", flush=True)
            statuses[name] = run_one(name, cmd, args.timeout_min * 60.0)
            print(f"{name}: {statuses[name]['status']} in {statuses[name]['seconds']:.0f} s", flush=True)
        status_file.write_text(json.dumps(statuses, indent=1))
    from pipeline.atomic import atomic_path

    with atomic_path(RESULTS) as tmp:
        tmp.write_text(render(cmds, statuses, load_start, os.getloadavg(), args.note))
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0 if all(s["status"] == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
