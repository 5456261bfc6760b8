"""The results file of a compression study: one JSON document, read whole and replaced atomically, so a
study that is interrupted and rerun skips the runs already recorded."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import atomic_path


def load_results(path: str | Path) -> dict:
    """The study's results so far (``{"runs": {}}`` when the file does not exist yet)."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {"runs": {}}


def save_results(path: str | Path, results: dict) -> None:
    """Write ``results`` (sorted keys, one-space indent) by temp file + rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
