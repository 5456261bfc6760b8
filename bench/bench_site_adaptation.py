"""Leave-one-site-out site adaptation (issue 21): which plots to label, and what fine-tuning on them buys.

For a site S, the starting model was trained without any plot of S (``models/data/loso/
split_without_S.json``). S's plots are split in two fixed sets: a *pool* the user may label and a *test* set
never labelled. SJER and TEAK: pool = S's training plots of ``models/data/neon_plots_split.json``, test =
S's validation plots there. OSBS (only 3 labelled plots in the shared set): pool = the 7 OSBS plots of
``models/data/neon-osbs-extra`` (another flight's boxes, see its README), test = the 3 OSBS plots of the
shared set; OSBS_029 is in neither.

k plots of the pool are revealed, chosen by (a) sleeping experts (:mod:`pipeline.active_learning`; the
starting model's error on each revealed plot updates the expert weights), (b) the single expert that best
ranked the starting model's errors on its own validation plots (other sites: chosen without S's labels),
(c) uniform random (several seeds). The starting model is fine-tuned on them
(:func:`models.finetune.adapt`, replay of its own training plots) and scored on S's test plots: pooled
F1@0.4, crown envelope vs reference box (the training code's validation metric).

Results go to a JSON file after every run; rerunning skips the runs already there (resume).

    python -m bench.bench_site_adaptation --start-root /work/main/checkpoints/loso \
        --out bench/results/site_adaptation.json --steps 80 --seeds 0 1
    python -m bench.bench_site_adaptation --report bench/results/site_adaptation.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "neon-plots"
SPLIT = REPO / "models" / "data" / "neon_plots_split.json"
OSBS_EXTRA = REPO / "models" / "data" / "neon-osbs-extra" / "annotations.csv"
EXCLUDED = {"OSBS_029"}


def site_plots(site: str, shared: Path = SHARED) -> tuple[list, list]:
    """(pool box sets, test box sets) of ``site`` (see the module docstring)."""
    from models.datasets.boxes import read_boxes
    from models.train_crowns import read_plot_split

    split = read_plot_split(SPLIT)
    sets = [bs for bs in read_boxes(shared / "annotations.csv", shared) if bs.site == site]
    sets = [bs for bs in sets if bs.plot not in EXCLUDED]
    if site == "OSBS":
        pool = [bs for bs in read_boxes(OSBS_EXTRA, shared) if bs.plot not in EXCLUDED]
        return pool, sets
    pool = [bs for bs in sets if bs.plot in split["train"]]
    return pool, [bs for bs in sets if bs.plot in split["validation"]]


def view_probs(net, rgb: np.ndarray) -> list[np.ndarray]:
    """Softmax [3, h, w] of each TTA view of a whole image, mapped back to its grid."""
    import torch

    from models.train_crowns import normalise
    from pipeline.tta import VIEWS

    _, h, w = rgb.shape
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    x = torch.zeros(1, 3, ph, pw)
    x[0, :, :h, :w] = torch.from_numpy(rgb).float()
    x = normalise(x)
    out = []
    with torch.no_grad():
        for flip, k in VIEWS:
            xi = x.flip(-1) if flip else x
            p = torch.softmax(net(torch.rot90(xi, k, (-2, -1))), 1)
            p = torch.rot90(p, -k, (-2, -1))
            p = p.flip(-1) if flip else p
            out.append(p[0, :, :h, :w].numpy())
    return out


def plot_scores(net, scenes: list, post: dict, gsd_m: float, reference: np.ndarray | None) -> dict[str, Any]:
    """Per plot: raw expert scores (mean over its images), and the starting model's error 1 - F1@0.4."""
    from affine import Affine

    from models.train_crowns import ValCase, score_cases
    from pipeline.active_learning import EXPERTS, expert_scores, novelty, tile_features
    from pipeline.crowns import extract_crowns

    tr = Affine(gsd_m, 0, 0, 0, gsd_m, 0)
    params = dict(post)
    min_area = params.pop("min_area_m2", 1.0)
    by_plot: dict[str, dict] = {}
    for s in scenes:
        views = view_probs(net, s.rgb)
        counts = [len(extract_crowns(v, s.valid, tr, min_area, **params)) for v in views]
        sc = expert_scores(views, s.valid, counts)
        sc["novelty"] = float(novelty(tile_features(s.rgb, s.valid)[None], reference)[0])
        from models.datasets.boxes import boxes_to_polygons

        case = ValCase(s.name, np.mean(views, 0), s.valid, boxes_to_polygons(s.boxes, shape="box"),
                       lambda x, y: True, s.site)
        d = by_plot.setdefault(s.plot, {"scores": [], "cases": []})
        d["scores"].append([sc[e] for e in EXPERTS])
        d["cases"].append(case)
    out = {}
    for plot, d in by_plot.items():
        m = score_cases(d["cases"], post, gsd_m)
        arr = np.array(d["scores"], float)
        raw = [float(np.mean(c[np.isfinite(c)])) if np.isfinite(c).any() else float("nan") for c in arr.T]
        out[plot] = {"raw": [None if not np.isfinite(v) else float(v) for v in raw],
                     "error": 1.0 - float(m.get("real_f1_iou0.4", 0.0)),
                     "n_truth": int(m.get("real_n_truth", 0))}
    return out


def _raw_matrix(plots: list[str], scores: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in scores[p]["raw"]] for p in plots], float)


def best_single_expert(val_scores: dict) -> tuple[int, list[float | None]]:
    """Index of the expert whose raw scores rank the starting model's errors on its own validation plots
    best (Spearman), and every expert's correlation (None where it slept on fewer than 3 plots)."""
    from pipeline.active_learning import EXPERTS

    plots = sorted(val_scores)
    raw = _raw_matrix(plots, val_scores)
    err = np.array([val_scores[p]["error"] for p in plots])
    corr: list[float | None] = []
    for j in range(len(EXPERTS)):
        ok = np.isfinite(raw[:, j])
        if ok.sum() < 3:
            corr.append(None)
            continue
        a = np.argsort(np.argsort(raw[ok, j])).astype(float)
        b = np.argsort(np.argsort(err[ok])).astype(float)
        c = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        corr.append(c)
    best = int(np.nanargmax([-np.inf if c is None else c for c in corr]))
    return best, corr


def setup_site(site: str, start_root: Path, n_replay: int, log) -> dict[str, Any]:
    """Load the starting model and the site's plots; score the pool and the start's validation plots."""
    from models.finetune import load_base_model, replay_scenes, scenes_from_boxes, test_scenes
    from pipeline.active_learning import tile_features

    ckpt = start_root / f"wo_{site}" / "last.pt"
    while not (ckpt.parent / "crowns.onnx").is_file():  # the start model is still being trained/calibrated
        time.sleep(15)
    net, cfg, post = load_base_model(ckpt)
    # the start's training plots: replay data and the novelty reference (paths as the run recorded them)
    cfg.plot_csvs = [str(SHARED / "annotations.csv")]
    cfg.plot_image_root = str(SHARED)
    cfg.plot_split = str(REPO / "models" / "data" / "loso" / f"split_without_{site}.json")
    replay_all = replay_scenes(cfg, 10_000, seed=0)
    reference = np.stack([tile_features(s.rgb, s.valid) for s in replay_all])
    pool_sets, test_sets = site_plots(site)
    pool = scenes_from_boxes(pool_sets, cfg.gsd_m, cfg.image_gsd_m, site=site)
    test = test_scenes(test_sets, cfg.gsd_m, site, cfg.image_gsd_m)
    log(f"{site}: {len({s.plot for s in pool})} pool plots ({len(pool)} images), "
        f"{len({s.plot for s in test})} test plots ({len(test)} images), "
        f"{len(replay_all)} start training images")
    pool_scores = plot_scores(net, pool, post, cfg.gsd_m, reference)
    # the start model's own validation plots (other sites): choose the best single expert there
    from models.datasets.boxes import read_boxes
    from models.train_crowns import read_plot_split

    split = read_plot_split(cfg.plot_split)
    val_sets = [bs for bs in read_boxes(SHARED / "annotations.csv", SHARED) if bs.plot in split["validation"]]
    val = scenes_from_boxes(val_sets, cfg.gsd_m, cfg.image_gsd_m, site="val")
    val_scores = plot_scores(net, val, post, cfg.gsd_m, reference)
    best, corr = best_single_expert(val_scores)
    return {"net": net, "cfg": cfg, "post": post, "pool": pool, "test": test, "replay_all": replay_all,
            "pool_scores": pool_scores, "val_scores": val_scores, "greedy_expert": best, "expert_corr": corr}


def orders(ctx: dict, k_max: int, seeds: list[int]) -> dict[str, dict]:
    """Plot order of every method (the first k of an order = the k plots revealed)."""
    from pipeline.active_learning import EXPERTS, select_tiles

    plots = sorted(ctx["pool_scores"])
    raw = _raw_matrix(plots, ctx["pool_scores"])
    err = {i: ctx["pool_scores"][p]["error"] for i, p in enumerate(plots)}
    out = {}
    se = select_tiles(raw, k_max, "sleeping", reveal=lambda i: err[i])
    out["sleeping"] = {"plots": [plots[i] for i in se.order], "weights": se.weights, "outcomes": se.outcomes,
                       "experts": list(EXPERTS)}
    g = select_tiles(raw, k_max, "greedy", expert=ctx["greedy_expert"])
    out["greedy"] = {"plots": [plots[i] for i in g.order], "expert": EXPERTS[ctx["greedy_expert"]]}
    for s in seeds:
        u = select_tiles(raw, k_max, "uniform", seed=s)
        out[f"uniform_s{s}"] = {"plots": [plots[i] for i in u.order]}
    return out


def run_one(ctx: dict, plots: list[str], steps: int, budget_s: float, n_replay: int, seed: int,
            log) -> dict[str, Any]:
    """Fine-tune the starting model on ``plots`` of the pool and score it on the test plots."""
    from models.datasets.splits import block_split
    from models.finetune import FinetuneConfig, adapt, score_scenes

    fcfg = FinetuneConfig(steps=steps, budget_s=budget_s, threads=1, seed=seed)
    user = []
    for i, s in enumerate([s for s in ctx["pool"] if s.plot in set(plots)]):
        s2 = copy.copy(s)
        s2.split = block_split(s.height, s.width, fcfg.val_block_px, fcfg.val_fraction, seed * 1000 + i)
        s2.target = s.target.copy()
        s2.target[s2.split.val_mask()] = 255
        s2.site = "user"
        user.append(s2)
    rng = np.random.default_rng([seed, 5])
    pick = rng.choice(len(ctx["replay_all"]), size=min(n_replay, len(ctx["replay_all"])), replace=False)
    replay = [ctx["replay_all"][i] for i in sorted(pick.tolist())]
    net = copy.deepcopy(ctx["net"])
    t0 = time.time()
    res = adapt(net, ctx["cfg"], ctx["post"], user, replay, fcfg, log=lambda m: None)
    test = score_scenes(res["net"], ctx["test"], ctx["cfg"], res["postprocess"])
    log(f"  {len(plots)} plots: test F1@0.4 {test['real_f1_iou0.4']:.3f} held-out "
        f"{res['validation_before'].get('real_f1_iou0.4', 0):.3f}->"
        f"{res['validation_after'].get('real_f1_iou0.4', 0):.3f}"
        f" ({res['train']['steps']} steps, {time.time() - t0:.0f} s)")
    return {"plots": plots, "test": test, "postprocess": res["postprocess"],
            "postprocess_source": res["postprocess_source"], "heldout_before": res["validation_before"],
            "heldout_after": res["validation_after"],
            "steps": res["train"]["steps"], "train_seconds": res["train"]["seconds"],
            "finetune_config": res["train"]["config"], "n_replay": res["train"]["n_replay"],
            "seconds": round(time.time() - t0, 1)}


def _save(path: Path, results: dict) -> None:
    from pipeline.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("config", {"steps": args.steps, "budget_s": args.budget_s, "n_replay": args.n_replay,
                                  "seeds": args.seeds, "ks": args.ks, "threads": 1,
                                  "metric": "pooled F1 at IoU 0.4, crown envelope vs reference box"})
    sites = results.setdefault("sites", {})
    ctxs: dict[str, dict] = {}

    def log(m: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)

    def context(site: str) -> dict:
        if site not in ctxs:
            ctxs[site] = setup_site(site, Path(args.start_root), args.n_replay, log)
            ctx = ctxs[site]
            rec = sites.setdefault(site, {"runs": {}})
            rec["orders"] = orders(ctx, max(args.ks), args.seeds)
            rec["expert_corr_on_start_validation"] = ctx["expert_corr"]
            rec["pool_plots"] = sorted(ctx["pool_scores"])
            rec["pool_scores"] = ctx["pool_scores"]
            rec["test_plots"] = sorted({s.plot for s in ctx["test"]})
            if "start" not in rec:
                rec["start"] = {"test": score_scenes_start(ctx), "postprocess": ctx["post"]}
                log(f"{site}: start model test F1@0.4 {rec['start']['test']['real_f1_iou0.4']:.3f}")
            _save(out, results)
        return ctxs[site]

    def score_scenes_start(ctx):
        from models.finetune import score_scenes

        return score_scenes(ctx["net"], ctx["test"], ctx["cfg"], ctx["post"])

    extra = [f"{m}_t{t}" for t in args.train_seeds if t != 0 for m in ("sleeping", "greedy")]
    methods = ["sleeping", "greedy"] + extra + [f"uniform_s{s}" for s in args.seeds]
    for k in args.ks:
        for site in args.sites:
            for method in methods:
                key = f"{method}_k{k}"
                if key in sites.get(site, {}).get("runs", {}):
                    continue
                ctx = context(site)
                order = sites[site]["orders"][method.split("_t")[0]]["plots"]
                plots = order[: min(k, len(order))]
                # fine-tune seed (batches, held-out blocks): a uniform run's selection seed, or _t<seed>
                seed = int(method.split("_s")[1]) if method.startswith("uniform") else (
                    int(method.split("_t")[1]) if "_t" in method else 0)
                log(f"{site} {key}: {plots}")
                sites[site]["runs"][key] = {**run_one(ctx, plots, args.steps, args.budget_s, args.n_replay,
                                                      seed, log), "k": k, "method": method}
                _save(out, results)
    return results


# ------------------------------------------------------------------------------------------ report


def summary_rows(results: dict) -> list[dict[str, Any]]:
    """One row per (site, k): start F1, sleeping, greedy, uniform mean and range over seeds."""
    rows = []
    for site, rec in results.get("sites", {}).items():
        start = rec.get("start", {}).get("test", {}).get("real_f1_iou0.4")
        ks = sorted({r["k"] for r in rec.get("runs", {}).values()})
        for k in ks:
            runs = [r for r in rec["runs"].values() if r["k"] == k]
            f = {r["method"]: r["test"]["real_f1_iou0.4"] for r in runs}
            uni = [v for m, v in f.items() if m.startswith("uniform")]
            row: dict[str, Any] = {}
            for name in ("sleeping", "greedy"):
                vals = [v for m, v in f.items() if m == name or m.startswith(f"{name}_t")]
                row.update({name: float(np.mean(vals)) if vals else None, f"{name}_n": len(vals),
                            f"{name}_min": min(vals) if vals else None,
                            f"{name}_max": max(vals) if vals else None})
            rows.append({"site": site, "k": k, "n_pool": len(rec.get("pool_plots", [])), "start": start,
                         **row,
                         "greedy_expert": rec.get("orders", {}).get("greedy", {}).get("expert"),
                         "uniform_mean": float(np.mean(uni)) if uni else None,
                         "uniform_min": min(uni) if uni else None, "uniform_max": max(uni) if uni else None,
                         "n_uniform": len(uni),
                         "n_test_crowns": int(runs[0]["test"].get("real_n_truth", 0)) if runs else 0})
    return rows


def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _cell(r: dict, name: str) -> str:
    """Mean, with the range and count when more than one fine-tune seed ran."""
    if r[f"{name}_n"] <= 1:
        return _f(r[name])
    return f"{_f(r[name])} ({_f(r[name + '_min'])}-{_f(r[name + '_max'])}, {r[name + '_n']})"


def markdown(results: dict) -> str:
    cfg = results.get("config", {})
    lines = [f"Fine-tune budget per run: at most {cfg.get('steps')} steps / {cfg.get('budget_s')} s, "
             "1 thread, "
             f"replay {cfg.get('n_replay')} start-training images. Uniform: one run per seed (n in the cell; "
             "each seed draws the plots and seeds the fine-tune); sleeping / greedy: fine-tune seed 0, "
             "and more fine-tune seeds where a cell shows mean (min-max, n).", "",
             "| site | k plots labelled | start F1@0.4 | sleeping experts | greedy (expert) | uniform mean "
             "(min-max, n) | test crowns |", "|---|---|---|---|---|---|---|"]
    for r in summary_rows(results):
        k = f"{r['k']}" if r["k"] <= r["n_pool"] else f"{r['n_pool']} (all; {r['k']} asked)"
        lines.append(f"| {r['site']} | {k} | {_f(r['start'])} | {_cell(r, 'sleeping')} | "
                     f"{_cell(r, 'greedy')} "
                     f"({r['greedy_expert']}) | {_f(r['uniform_mean'])} ({_f(r['uniform_min'])}-"
                     f"{_f(r['uniform_max'])}, {r['n_uniform']}) | {r['n_test_crowns']} |")
    return "\n".join(lines) + "\n"


def plot_png(results: dict, path: Path, size: tuple[int, int] = (960, 360)) -> Path:
    """F1 versus k per site: sleeping (blue), greedy (orange), uniform mean with its range (grey), start
    (dashed black)."""
    from PIL import Image, ImageDraw

    rows = summary_rows(results)
    sites = sorted({r["site"] for r in rows})
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pw = size[0] // max(1, len(sites))
    colours = {"sleeping": (31, 119, 180), "greedy": (255, 127, 14), "uniform_mean": (110, 110, 110)}
    for si, site in enumerate(sites):
        x0, x1, y0, y1 = si * pw + 45, (si + 1) * pw - 15, 30, size[1] - 40
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0 + 5, 8), f"{site}: F1@0.4 vs plots labelled", fill="black")
        rs = sorted([r for r in rows if r["site"] == site], key=lambda r: r["k"])
        ks = [0] + [r["k"] for r in rs]
        kmax = max(ks) or 1

        def px(k, f, x0=x0, x1=x1, y0=y0, y1=y1, kmax=kmax):
            return x0 + (x1 - x0) * k / kmax, y1 - (y1 - y0) * f / 0.8

        for f in (0.0, 0.2, 0.4, 0.6, 0.8):
            d.text((x0 - 30, px(0, f)[1] - 5), f"{f:.1f}", fill="black")
        for k in ks:
            d.text((px(k, 0)[0] - 3, y1 + 5), str(k), fill="black")
        start = rs[0]["start"] if rs else None
        if start is not None:
            for xa in range(int(x0), int(x1), 8):
                d.line([xa, px(0, start)[1], xa + 4, px(0, start)[1]], fill="black")
        for r in rs:
            if r["uniform_min"] is not None:
                xa = px(r["k"], 0)[0]
                d.line([xa, px(0, r["uniform_min"])[1], xa, px(0, r["uniform_max"])[1]], fill=(170, 170, 170),
                       width=3)
        for key, col in colours.items():
            pts = [px(0, start)] if start is not None else []
            pts += [px(r["k"], r[key]) for r in rs if r[key] is not None]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    d.text((10, size[1] - 18), "blue: sleeping experts   orange: greedy single measure   grey: uniform "
           "random "
           "(mean, bar = seeds' range)   dashed: start model", fill="black")
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start-root", default="checkpoints/loso", help="folder with wo_<SITE>/last.pt")
    ap.add_argument("--out", default="bench/results/site_adaptation.json")
    ap.add_argument("--sites", nargs="+", default=["SJER", "TEAK", "OSBS"])
    ap.add_argument("--ks", nargs="+", type=int, default=[8, 4, 2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0],
                    help="fine-tune seeds of the sleeping and greedy selections (0 = the base runs)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--n-replay", type=int, default=16)
    ap.add_argument("--report", help="write the table (.md) and plot (.png) of this results JSON and stop")
    a = ap.parse_args(argv)
    if a.report:
        res = json.loads(Path(a.report).read_text())
        md = Path(a.report).with_suffix(".md")
        md.write_text(markdown(res))
        plot_png(res, Path(a.report).with_suffix(".png"))
        print(md.read_text())
        return 0
    run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
