"""Resumable training checkpoints: a plain dict of tensors and primitives, loaded with weights_only=True.

Layout: ``{"format": 1, "kind": "crowns"|..., "config": dict, "net": dict, "model": state_dict,
"optimizer": state_dict, "scheduler": state_dict, "step": int, "rng": {...}, "metrics": dict}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

FORMAT = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (see module docstring) atomically with ``torch.save``."""
    path = Path(path)
    data = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        raise InputError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}); delete it to start over"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise InputError(f"{path}: not a forest-inventory checkpoint (format {FORMAT})")
    return data
