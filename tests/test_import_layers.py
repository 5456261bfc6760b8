"""Imports point down the floors (pipeline < models < flows < forest_inventory < bench), pipeline has no
torch, and ARCHITECTURE.md shows the graph as generated from the code."""

from __future__ import annotations

from pathlib import Path

from bench.import_graph import graph_in_architecture, mermaid, package_edges, violations


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_upward_and_torch_imports_are_found_including_lazy_ones(tmp_path):
    _write(tmp_path, "pipeline/a.py", "import numpy\nfrom pipeline import b\n\n"
                                      "def f():\n    from models.train import x\n    import torch.nn\n")
    _write(tmp_path, "models/m.py", "from pipeline.a import f\nimport bench.bench_models\n")
    _write(tmp_path, "flows/f.py", "from models.m import f\nfrom forest_inventory.cli import app\n")
    for pkg in ("forest_inventory", "bench"):
        (tmp_path / pkg).mkdir()
    found = violations(tmp_path)
    assert found == [
        "pipeline/a.py:5: pipeline imports models.train (a floor above it)",
        "pipeline/a.py:6: pipeline imports torch.nn (the inference core is torch-free)",
        "models/m.py:2: models imports bench.bench_models (a floor above it)",
        "flows/f.py:2: flows imports forest_inventory.cli (a floor above it)",
    ]
    edges = package_edges(tmp_path)
    assert edges[("pipeline", "models")] == 1 and edges[("pipeline", "torch")] == 1
    assert ("pipeline", "pipeline") not in edges and edges[("models", "pipeline")] == 1


def test_the_repository_keeps_the_layering():
    assert violations() == []


def test_architecture_shows_the_generated_graph():
    assert graph_in_architecture() == mermaid(), "paste `python -m bench.import_graph` in ARCHITECTURE.md"
