"""The repository's import graph between its packages, read from the code (``ast``), and the layering rule.

Floors, top to bottom: ``bench`` > ``forest_inventory`` (CLI, options, notebook API) > ``flows`` (Prefect) >
``models`` (training, torch) > ``pipeline`` (inference core, no torch). An import may point down or sideways
within a package, never up; ``pipeline`` never imports torch. Lazy imports inside functions count too.

    python -m bench.import_graph            # print the Mermaid graph
    python -m bench.import_graph --check    # exit 1 on an upward arrow or a stale graph in ARCHITECTURE.md
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("pipeline", "models", "flows", "forest_inventory", "bench")  # bottom to top
TORCH = ("torch", "torchvision", "segmentation_models_pytorch", "torch_pruning")
BEGIN, END = "<!-- import-graph:begin (python -m bench.import_graph) -->", "<!-- import-graph:end -->"


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in a Python file (top level or inside functions), with
    their line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


GENERATED = ("bench/out", "bench/data")  # git-ignored outputs (e.g. a baseline's source tree) are not code


def _sources(root: Path, package: str) -> list[Path]:
    skip = [root / g for g in GENERATED]
    return [p for p in sorted((root / package).rglob("*.py")) if not any(s in p.parents for s in skip)]


def package_edges(root: Path = ROOT) -> Counter:
    """(importer package, imported package) -> number of import statements, for the floors and torch."""
    edges: Counter = Counter()
    for package in FLOORS:
        for path in _sources(root, package):
            for name, _ in imported_modules(path):
                top = name.split(".")[0]
                target = "torch" if top in TORCH else top
                if target in FLOORS or target == "torch":
                    if target != package:
                        edges[(package, target)] += 1
    return edges


def violations(root: Path = ROOT) -> list[str]:
    """One line per import that runs up a floor, or brings torch into ``pipeline``."""
    rank = {p: i for i, p in enumerate(FLOORS)}
    bad = []
    for package in FLOORS:
        for path in _sources(root, package):
            for name, line in imported_modules(path):
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{line}"
                if top in rank and rank[top] > rank[package]:
                    bad.append(f"{where}: {package} imports {name} (a floor above it)")
                if package == "pipeline" and top in TORCH:
                    bad.append(f"{where}: pipeline imports {name} (the inference core is torch-free)")
    return bad


def mermaid(root: Path = ROOT) -> str:
    """The package graph as a Mermaid flowchart (arrow label: number of import statements)."""
    lines = ["```mermaid", "flowchart TD"]
    for (src, dst), n in sorted(package_edges(root).items()):
        lines.append(f"    {src} -->|{n}| {dst}")
    lines.append("```")
    return "\n".join(lines)


def graph_in_architecture(root: Path = ROOT) -> str | None:
    """The graph block committed in ARCHITECTURE.md (between the markers), or None."""
    text = (root / "ARCHITECTURE.md").read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail on upward imports or a stale ARCHITECTURE.md")
    a = ap.parse_args(argv)
    graph = mermaid()
    if not a.check:
        print(graph)
        return 0
    problems = violations()
    if graph_in_architecture() != graph:
        problems.append("ARCHITECTURE.md: the import graph is stale; paste the output of "
                        "`python -m bench.import_graph` between its markers")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
