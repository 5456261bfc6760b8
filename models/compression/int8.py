"""Static int8 copy of a shipped crown model, calibrated on its own training chips (never OSBS).

``python -m models.compression.int8 models/zoo/crowns-dense.onnx models/zoo/crowns-dense.int8.onnx``

QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration (``models.export.
quantize_static_qdq``); the float model's metadata is kept, plus a ``compression`` record saying so. The
calibration chips come from the training configuration stored in the model's metadata (``train_config``):
its box annotations when they exist on this machine, else the NEON training scenes shipped in the repo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def calibration_tiles(onnx_path: str | Path, n_tiles: int = 32) -> np.ndarray:
    """``n_tiles`` uint8 training chips [n, 3, T, T] of the crown model at ``onnx_path``."""
    from models.compression.crown_study import CrownData
    from models.export import read_metadata
    from models.train_crowns import DEFAULT_ANNOTATIONS, TrainCrownsConfig

    meta = read_metadata(onnx_path)
    cfg = TrainCrownsConfig.from_dict(json.loads(meta.get("train_config", "{}")))
    if not cfg.boxes or not all(Path(b).is_file() for b in cfg.boxes):
        cfg.boxes, cfg.polygons, cfg.polygon_images = list(DEFAULT_ANNOTATIONS), [], []
    return CrownData(cfg, 8).uint8_tiles(n_tiles, int(meta.get("tile_size", cfg.tile_size)))


def quantize_crown_model(onnx_path: str | Path, out_path: str | Path, n_tiles: int = 32) -> Path:
    """Write the static int8 QDQ copy of a crown model; returns its path."""
    from models.export import quantize_static_qdq

    record = {"method": "int8", "quantization": "static int8 QDQ, per-channel weights, uint8 activations",
              "source": Path(onnx_path).name, "calibration": f"{n_tiles} training chips"}
    return quantize_static_qdq(onnx_path, out_path, calibration_tiles(onnx_path, n_tiles), per_channel=True,
                               extra_metadata={"compression": record})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("out")
    ap.add_argument("--tiles", type=int, default=32, help="calibration chips")
    a = ap.parse_args(argv)
    print(quantize_crown_model(a.onnx, a.out, a.tiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
