"""COMPRESSION.md, its JSON and a PNG plot (F1 against CPU latency) from the study's results JSON.

    python -m models.compression.report models/zoo/compression_results.json --out models/zoo

The plot is drawn with Pillow (matplotlib is not a project dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from models.compression.robustness import prune_potential
from pipeline.atomic import atomic_path

COLOURS = {
    "dense": (0, 0, 0),
    "pfp": (214, 39, 40),
    "alds": (31, 119, 180),
    "l1": (44, 160, 44),
    "uniform": (255, 127, 14),
    "random": (148, 103, 189),
    "sipp": (140, 86, 75),
}
GOAL = {"max_f1_loss_points": 1.0, "min_speedup": 2.5, "min_param_reduction": 0.60}


def _latency(run: dict) -> float | None:
    lat = run.get("latency")
    return float(lat["median_ms"]) if lat else None


def speedup(run: dict, dense: dict, shipped: bool = False) -> float | None:
    """Dense / run median latency, with the dense timed in the run's own session when recorded."""
    lat = _latency(run)
    if lat is None:
        return None
    sess = run.get("latency_session") or {}
    ref = sess.get("dense_ms") if shipped else (sess.get("dense_fast_softmax_ms") or sess.get("dense_ms"))
    if ref is None:
        ref = _latency(dense) if shipped else dense_reference_ms(dense)
    return float(ref) / lat if ref else None


def dense_reference_ms(dense: dict) -> float | None:
    """Latency the speed-ups are computed against: the dense network exported exactly like the compressed
    ones (channel softmax) when measured, else the shipped dense file."""
    lat = dense.get("latency_fast_softmax") or dense.get("latency")
    return float(lat["median_ms"]) if lat else None


def goal_runs(results: dict) -> list[str]:
    """Runs meeting the goal on the held-out validation (:func:`val_f1`): <= 1 validation F1 point below the
    dense model, >= 2.5x faster, >= 60% fewer params. OSBS_029 enters no rule: it is scored afterwards.
    A run (or a dense model) without validation scores meets no goal."""
    dense = results["dense"]
    d_val = val_f1(dense)
    ok = []
    for key, r in results["runs"].items():
        sp, v = speedup(r, dense), val_f1(r)
        if sp is None or v is None or d_val is None or r["method"] == "sipp":
            continue
        if (
            (d_val - v) * 100 <= GOAL["max_f1_loss_points"]
            and sp >= GOAL["min_speedup"]
            and 1 - r["params"] / dense["params"] >= GOAL["min_param_reduction"]
        ):
            ok.append(key)
    return ok


def selection(results: dict) -> tuple[str | None, list[str]]:
    """The run to ship and the runs that meet the goal, both on validation only: of the goal runs, the one
    with the highest validation F1 (then the lowest latency). OSBS_029 F1 is reported beside it, after."""
    ok = goal_runs(results)
    runs = results["runs"]
    best = max(ok, key=lambda k: (val_f1(runs[k]), -_latency(runs[k])), default=None)
    return best, ok


def plot_f1_latency(results: dict, path: str | Path, size: tuple[int, int] = (900, 600)) -> Path:
    """Scatter of F1@0.4 (OSBS_029) against ONNX Runtime median latency, one colour per method."""
    pts = []
    if _latency(results["dense"]) is not None:
        pts.append(("dense", "dense", _latency(results["dense"]), results["dense"]["f1"]))
    if results["dense"].get("latency_fast_softmax"):
        pts.append(("dense", "dense-cs", dense_reference_ms(results["dense"]), results["dense"]["f1"]))
    for key, r in results["runs"].items():
        if _latency(r) is not None:
            pts.append((r["method"] + ("+int8" if r.get("quantized") else ""), key, _latency(r), r["f1"]))
    w, h = size
    left, right, top, bottom = 80, 170, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    if not pts:
        d.text((20, 20), "no latency measured", fill="black")
    else:
        xs = [p[2] for p in pts]
        ys = [p[3] for p in pts]
        x0, x1 = 0.0, max(xs) * 1.1
        y0, y1 = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)

        def sx(x):
            return left + (x - x0) / (x1 - x0) * (w - left - right)

        def sy(y):
            return h - bottom - (y - y0) / max(y1 - y0, 1e-9) * (h - top - bottom)

        d.rectangle([left, top, w - right, h - bottom], outline="black")
        for i in range(6):
            xv = x0 + (x1 - x0) * i / 5
            yv = y0 + (y1 - y0) * i / 5
            d.line([sx(xv), h - bottom, sx(xv), h - bottom + 5], fill="black")
            d.text((sx(xv) - 12, h - bottom + 8), f"{xv:.0f}", fill="black")
            d.line([left - 5, sy(yv), left, sy(yv)], fill="black")
            d.text((left - 45, sy(yv) - 6), f"{yv:.3f}", fill="black")
        d.text(
            ((left + w - right) / 2 - 120, h - 25),
            "ONNX Runtime latency, median ms (batch 1, 2 threads)",
            fill="black",
        )
        d.text((10, 10), "F1 at IoU 0.4 on OSBS_029 (engine) vs CPU latency", fill="black")
        for name, key, x, y in pts:
            col = COLOURS.get(name.split("+")[0], (100, 100, 100))
            r = 6
            if name.endswith("+int8"):
                d.rectangle([sx(x) - r, sy(y) - r, sx(x) + r, sy(y) + r], outline=col, width=2)
            else:
                d.ellipse([sx(x) - r, sy(y) - r, sx(x) + r, sy(y) + r], fill=col)
            d.text((sx(x) + 8, sy(y) - 6), key.split("@")[-1] if "@" in key else key, fill=col)
        for i, (name, col) in enumerate(COLOURS.items()):
            yy = top + 10 + i * 20
            d.ellipse([w - right + 15, yy, w - right + 27, yy + 12], fill=col)
            d.text((w - right + 35, yy), name, fill="black")
        d.text((w - right + 15, top + 10 + len(COLOURS) * 20), "square: int8", fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _val_cell(run: dict) -> str:
    v = run.get("validation")
    if not v:
        return "–"
    return f"{v.get('real_f1_iou0.4', float('nan')):.3f} / {v.get('savanna_f1_iou0.4', float('nan')):.3f}"


def _delta_cell(run: dict, dense: dict) -> str:
    """F1 difference to the dense model in points, with its paired block-bootstrap interval when measured."""
    p = run.get("paired_vs_dense")
    if not p:
        return f"{(run['f1'] - dense['f1']) * 100:+.1f}"
    lo, hi = p["ci_points"]
    return f"{p['delta_points']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _finetune_cell(run: dict) -> str:
    """Fine-tune steps / seconds of a run, or the runs a soup averaged."""
    if run.get("soup_of"):
        return f"soup of {len(run['soup_of'])} fine-tunes"
    ft = run["record"].get("finetune") or {}
    return f"{ft.get('steps', '–')} / {ft.get('seconds', '–')}"


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(results: dict, plot_name: str = "compression_f1_latency.png",
             source: str = "models/zoo/compression_results.json", out: str = "models/zoo") -> str:
    dense = results["dense"]
    d_lat = dense_reference_ms(dense)
    runs = results["runs"]
    best, ok = selection(results)
    lines = ["# Crown model compression", ""]
    lines += [
        f"Generated by `python -m models.compression.report {source} --out {out}` "
        "from the results of `python -m models.compression.crown_study` (see the commands below). Every "
        "figure "
        "here was measured by those commands on this machine; nothing is estimated.",
        "",
        "- **Budget**: the target ratio is the fraction of conv/linear MACs removed at the engine tile size "
        "(SiPP: the fraction of all parameters zeroed).",
        "- **Fine-tune**: after compression, LR rewinding on the crown model's own training data (never "
        "OSBS): "
        "the last N steps of the original cosine schedule are replayed.",
        "- **Selection**: on validation only (`report.selection`): a run qualifies when its validation F1 "
        "(below) is at most 1 point below the dense model's, it is >= 2.5x faster and has >= 60 % fewer "
        "parameters; the shipped run is the qualifying one with the highest validation F1. OSBS_029 enters "
        "no rule: it is scored once, after selection, as a held-out figure.",
        "- **F1 (OSBS_029, held out)**: F1 at IoU 0.4 on OSBS_029 (61 reference boxes; cross-site, never "
        "used for training, tuning or selection), computed by `forest-inventory evaluate`'s code path "
        "(`pipeline.evaluation.run.evaluate_crowns_on_image`: the engine's validate / infer_group / "
        "collect_crowns, predicted crown envelopes vs reference boxes, Hungarian matching) with the dense "
        "model's postprocess thresholds. Shifted images are scored against the same boxes in their own pixel "
        "grid. With 61 crowns one crown is about 1.6 F1 points. ΔF1 is the run minus the dense model; the "
        "bracket, where measured, is its 90 % interval from a paired spatial block bootstrap (both models "
        "matched once, 10 m blocks resampled together, 4000 resamples; `forest-inventory evaluate "
        "--compare-to`, `pipeline/evaluation/paired.py`).",
        "- **Validation F1**: F1@0.4 on the crown model's own held-out validation blocks (`real`, YELL + "
        "SOAP) and open-ground chips built from held-out crowns (`open`), with the dense model's postprocess "
        "thresholds (`models.train_crowns.validation_cases` / `score_cases`, the model card's numbers).",
        "- **Latency**: ONNX Runtime CPU, batch 1 at the engine tile size, 2 intra-op threads, sequential, "
        "10 warm-up runs then >= 50 timed runs, models timed round-robin; median and p90. "
        f"Machine: {results.get('latency', {}).get('cpu_count', '?')} cores "
        f"(1-min load average {_fmt(results.get('latency', {}).get('load_avg_1m'), 1)} when measured; above "
        "the core count other jobs shared the CPU); the ratios between models timed together are the "
        "meaningful figure.",
    ]
    if any(r.get("postprocess_source") for r in runs.values()):
        lines.append(
            "- **`-cal` runs**: the same network as the run without `-cal`, with post-processing thresholds "
            "of its own, grid-searched on its held-out validation exactly as the dense model's were "
            "(`crown_study --recalibrate KEY`); its F1 and validation F1 use those thresholds.")
    soups = {k: r["soup_of"] for k, r in runs.items() if r.get("soup_of")}
    if soups:
        lines.append(
            "- **Soups**: the weight average of fine-tunes of the same pruned network (the members differ "
            "only in the training batches they drew), with batch norm estimated again on training batches "
            "(`crown_study --soup`, `models/compression/soup.py`): "
            + "; ".join(f"`{k}` = {' + '.join(f'`{m}`' for m in v)}" for k, v in soups.items()) + ".")
    lines += ["", "## Summary", ""]
    if best:
        r = runs[best]
        v, d_v = val_f1(r), val_f1(dense)
        lines.append(
            f"**Shipped as `crowns.onnx`: `{best}`** (chosen on validation) — validation F1 "
            f"{v:.3f} vs dense {d_v:.3f} ({(v - d_v) * 100:+.1f} points), "
            f"{speedup(r, dense):.2f}x faster, {(1 - r['params'] / dense['params']) * 100:.0f}% fewer "
            f"parameters. Held out, scored after selection: OSBS_029 F1 {r['f1']:.3f} vs dense "
            f"{dense['f1']:.3f} ({(r['f1'] - dense['f1']) * 100:+.1f} points)."
        )
    else:
        lines.append(
            "**No compressed model is shipped; the dense model stays the default.** No run met the goal on "
            "validation (<= 1.0 validation F1 point below the dense model, >= 2.5x faster, >= 60% fewer "
            "parameters)"
            + ("." if val_f1(dense) is not None else "; the dense model has no validation score recorded.")
        )
    lines += [
        "",
        f"![F1 vs latency]({plot_name})",
        "",
        "## Per method and ratio",
        "",
        (
            "Speed-up = dense latency / run latency, against the dense network exported like the compressed "
            "ones (`dense (channel softmax)`: same weights, same probabilities, softmax written as "
            "max/exp/sum — see `models.export.channel_softmax`); the last column is against the shipped "
            "dense file (ONNX `Softmax`)."
            if dense.get("latency_fast_softmax")
            else "Speed-up = dense latency / run latency; the dense model and the compressed ones are "
            "exported alike (softmax written as max/exp/sum, `models.export.channel_softmax`), and each "
            "run is timed in one round-robin session with the dense model."
        ),
        "",
        "| run | params | % dense | MACs (G) | % dense | ONNX MB | latency ms (median / p90) | speed-up "
        "| OSBS_029 F1@0.4 (held out) | ΔF1 (points) | fine-tune steps / s | speed-up vs shipped dense "
        "| val F1 real / open |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, lat_key, f1_key in (
        ("dense (shipped)", "latency", "f1"),
        ("dense (channel softmax)", "latency_fast_softmax", "f1_fast_softmax"),
    ):
        dl = dense.get(lat_key)
        if lat_key != "latency" and not dl:
            continue
        dl = dl or {}
        sp_d = d_lat / dl["median_ms"] if dl and d_lat else None
        lines.append(
            f"| {label} | {dense['params'] / 1e6:.2f}M | 100 | {dense['macs'] / 1e9:.2f} | 100 | "
            f"{dense['size_mb']:.1f} | {_fmt(dl.get('median_ms'), 1)} / {_fmt(dl.get('p90_ms'), 1)} | "
            f"{_fmt(sp_d, 2)} | {_fmt(dense.get(f1_key))} | – | – | – | {_val_cell(dense)} |"
        )
    for key in sorted(runs, key=lambda k: (runs[k]["ratio"], runs[k]["method"], k)):
        r = runs[key]
        lat = r.get("latency") or {}
        sp = speedup(r, dense)
        sp_shipped = speedup(r, dense, shipped=True)
        params = r["nonzero_params"] if r["method"] == "sipp" else r["params"]
        p_label = f"{params / 1e6:.2f}M" + (" nz" if r["method"] == "sipp" else "")
        lines.append(
            f"| {key} | {p_label} | {params / dense['params'] * 100:.0f} | {r['macs'] / 1e9:.2f} | "
            f"{r['macs'] / dense['macs'] * 100:.0f} | {r['size_mb']:.1f} | {_fmt(lat.get('median_ms'), 1)} / "
            f"{_fmt(lat.get('p90_ms'), 1)} | {_fmt(sp, 2)} | {r['f1']:.3f} | "
            f"{_delta_cell(r, dense)} | "
            f"{_finetune_cell(r)} | {_fmt(sp_shipped, 2)} | {_val_cell(r)} |"
        )
    sipp = [r for r in runs.values() if r["method"] == "sipp"]
    sparse = (
        ", ".join(f"{r['record'].get('sparse_size_bytes', 0) / 1e6:.1f} MB at {r['ratio']:g}" for r in sipp)
        if sipp
        else "not run here"
    )
    lines += [
        "",
        "SiPP zeroes weights inside dense tensors: its parameter count is the non-zeros (`nz`); the ONNX "
        "file "
        "and the CPU latency stay those of the dense model (no dense-CPU speed-up). It is the baseline for "
        f"what unstructured pruning buys: a smaller sparse file (float32 values + 16-bit indices: {sparse}).",
        "",
    ]
    shifts = list(dense.get("f1_shift", {}))
    if shifts:
        lines += [
            "## F1 under drone-imagery shifts",
            "",
            "Shifts (`models/compression/robustness.py`): gaussian noise sigma 10 DN, motion blur 7 px, "
            "defocus disc r 2.5 px, brightness x1.35, contrast x0.6, white balance gains (1.15, 1.0, 0.8), "
            "JPEG q25, haze 35 %, GSD +25 % / -25 % (resampled and georeferenced; the engine resamples to "
            "the model GSD).",
            "",
            "| run | nominal | " + " | ".join(shifts) + " |",
            "|---" * (len(shifts) + 2) + "|",
            "| dense | "
            + f"{dense['f1']:.3f} | "
            + " | ".join(f"{dense['f1_shift'][s]:.3f}" for s in shifts)
            + " |",
        ]
        for key in sorted(runs, key=lambda k: (runs[k]["ratio"], runs[k]["method"], k)):
            r = runs[key]
            lines.append(
                f"| {key} | {r['f1']:.3f} | " + " | ".join(_fmt(r["f1_shift"].get(s)) for s in shifts) + " |"
            )
        lines += [
            "",
            "## Prune potential per shift",
            "",
            "Largest MAC-reduction ratio whose F1 stays within 0.5 F1 points of the dense model on the same "
            "shift (Lost in Pruning); 0 = no tested ratio qualifies. Ratios tested: "
            + ", ".join(sorted({f"{r['ratio']:g}" for r in runs.values()}))
            + ". "
            + (
                "Not informative where the dense F1 is itself near 0 ("
                + ", ".join(
                    s
                    for s in ["nominal", *shifts]
                    if (dense["f1"] if s == "nominal" else dense["f1_shift"][s]) < 0.1
                )
                + ": dense F1 < 0.1, so any model qualifies) or where a compressed model scores above the "
                "dense one, which on one image is noise, not robustness."
                if any(v < 0.1 for v in [dense["f1"], *dense["f1_shift"].values()])
                else ""
            ),
            "",
            "One row per recipe (method + tag: the runs fine-tuned alike), over the ratios it was run at.",
            "",
            "| method, recipe | ratios | nominal | " + " | ".join(shifts) + " |",
            "|---" * (len(shifts) + 3) + "|",
        ]
        dense_all = {"nominal": dense["f1"], **dense["f1_shift"]}
        recipes = sorted({(r["method"], r.get("tag") or "") for r in runs.values() if not r.get("quantized")})
        for method, tag in recipes:
            by_ratio = {
                r["ratio"]: {"nominal": r["f1"], **r["f1_shift"]}
                for r in runs.values()
                if r["method"] == method and not r.get("quantized") and (r.get("tag") or "") == tag
            }
            pp = prune_potential(by_ratio, dense_all)
            lines.append(
                f"| {method}{' ' + tag if tag else ''} | {', '.join(f'{x:g}' for x in sorted(by_ratio))} | "
                f"{pp['nominal']:g} | " + " | ".join(f"{pp[s]:g}" for s in shifts) + " |"
            )
    lines += [
        "",
        "## Methods at equal budget",
        "",
        "Same MAC budget; runs with the same tag share the same fine-tune recipe (steps in the table "
        "above), ordered by validation F1. OSBS F1 (held out), speed-up, and validation F1 (real / open):",
        "",
    ]
    for ratio, tag in sorted({(r["ratio"], r.get("tag") or "") for r in runs.values()}):
        same = [
            (k, r)
            for k, r in runs.items()
            if r["ratio"] == ratio and not r.get("quantized") and (r.get("tag") or "") == tag
        ]
        same.sort(key=lambda kr: -(val_f1(kr[1]) if val_f1(kr[1]) is not None else -1.0))
        lines.append(
            f"- ratio {ratio:g}{' ' + tag if tag else ''}: "
            + "; ".join(
                f"{k.split('@')[0]} F1 {r['f1']:.3f}"
                + (f", {speedup(r, dense):.2f}x" if speedup(r, dense) else "")
                + (f", val {_val_cell(r)}" if r.get("validation") else "")
                for k, r in same
            )
        )
    q = results.get("int8")
    if q:
        lines += [
            "",
            "## Static int8 (QDQ, per-channel)",
            "",
            q.get("note", ""),
            "",
            "| model | latency ms (median / p90) | ONNX MB | F1@0.4 OSBS |",
            "|---|---|---|---|",
        ]
        for row in q.get("rows", []):
            lines.append(
                f"| {row['name']} | {row['median_ms']:.1f} / {row['p90_ms']:.1f} | {row['size_mb']:.2f} | "
                f"{_fmt(row.get('f1'))} |"
            )
    lines += [
        "",
        "## Commands",
        "",
        "```",
        *results.get(
            "commands",
            [
                "python -m models.compression.crown_study --checkpoint CKPT "
                "--dense-onnx models/zoo/crowns-dense.onnx",
                "python -m models.compression.crown_study --checkpoint CKPT "
                "--dense-onnx models/zoo/crowns-dense.onnx --latency",
                f"python -m models.compression.report {source} --out {out}",
            ],
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


def merge_validation(results: dict, validation: dict) -> dict:
    """Attach held-out validation scores ({"dense"|"<method>-<pct><tag>": score_cases dict}) to the runs."""
    if "dense" in validation:
        results["dense"]["validation"] = validation["dense"]
    for r in results["runs"].values():
        name = Path(r["onnx"]).stem.removeprefix("crowns-")
        if name in validation:
            r["validation"] = validation[name]
    return results


def val_f1(run: dict) -> float | None:
    """Held-out validation F1@0.4 of a run, when measured: the pooled figure over the validation plots
    (``pooled_f1_iou0.4``) where recorded, else the mean of the recorded ones (real blocks, open chips)."""
    v = run.get("validation")
    if not v:
        return None
    if v.get("pooled_f1_iou0.4") is not None:
        return float(v["pooled_f1_iou0.4"])
    f1s = [x for k, x in v.items() if k.endswith("_f1_iou0.4")]
    return sum(f1s) / len(f1s) if f1s else None


def write_report(
    results_path: str | Path, out_dir: str | Path, validation_path: str | Path | None = None
) -> dict[str, Path]:
    from models.compression.crown_study import latency_path, merge_latency

    results = json.loads(Path(results_path).read_text())
    lat = latency_path(results_path)
    if lat.exists():
        results = merge_latency(results, json.loads(lat.read_text()))
    if validation_path and Path(validation_path).exists():
        results = merge_validation(results, json.loads(Path(validation_path).read_text()))
    out_dir = Path(out_dir)
    png = plot_f1_latency(results, out_dir / "compression_f1_latency.png")
    md_path = out_dir / "COMPRESSION.md"
    with atomic_path(md_path) as tmp:
        Path(tmp).write_text(markdown(results, png.name, str(results_path), str(out_dir)))
    json_path = out_dir / "compression_results.json"
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1, sort_keys=True))
    return {"markdown": md_path, "png": png, "json": json_path}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write COMPRESSION.md + PNG from the study results")
    ap.add_argument("results")
    ap.add_argument("--out", default="models/zoo")
    ap.add_argument("--validation", default=None, help="held-out validation scores JSON to merge")
    a = ap.parse_args(argv)
    for k, v in write_report(a.results, a.out, a.validation).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
