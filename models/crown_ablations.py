"""Markdown table of crown-model ablations from `forest-inventory evaluate` results on the validation plots.

    python -m models.crown_ablations NAME=out/eval_x/crown_metrics.json [NAME=...] > table.md

One row per run: pooled and per-site F1 at IoU 0.4 (P / R pooled), pooled F1 at IoU 0.5, and reference
crowns; sites in a fixed order so rows line up. Rows are in the order given (the order of the ablation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SITES = ("HARV", "OSBS", "SJER", "TEAK")


def ablation_row(name: str, result: dict) -> str:
    """One markdown row of an evaluate result (``crown_metrics.json`` of a multi-image run)."""
    pooled = result["pooled"]["thresholds"]
    cells = [name, f"{pooled['0.4']['f1']:.3f}", f"{pooled['0.4']['precision']:.3f} / "
             f"{pooled['0.4']['recall']:.3f}", f"{pooled['0.5']['f1']:.3f}"]
    for site in SITES:
        s = result["sites"].get(site)
        cells.append(f"{s['thresholds']['0.4']['f1']:.3f}" if s else "–")
    cells.append(str(result["pooled"]["n_truth"]))
    return "| " + " | ".join(cells) + " |"


def ablation_table(runs: list[tuple[str, dict]]) -> str:
    head = ("| run | pooled F1@0.4 | P / R @0.4 | pooled F1@0.5 | " + " | ".join(f"{s} F1@0.4" for s in SITES)
            + " | reference crowns |")
    sep = "|" + "---|" * (5 + len(SITES))
    return "\n".join([head, sep, *(ablation_row(n, r) for n, r in runs)])


def main(argv: list[str] | None = None) -> int:
    runs = []
    for arg in argv if argv is not None else sys.argv[1:]:
        name, _, path = arg.rpartition("=")  # names may hold "="
        runs.append((name, json.loads(Path(path).read_text())))
    print(ablation_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
