"""Post-processing thresholds for test-time augmentation, written into a crown model's metadata.

With ``--tta`` the engine averages the crown model over four views of each tile (:mod:`pipeline.tta`).
Averaged probabilities are smoother and less extreme than single-view ones, so the thresholds chosen for
single views do not fit them. This grid-searches :data:`models.train_crowns.PARAM_GRID` on the model's
held-out validation predicted with the same four views (never on an evaluation image) and stores the result
as the ONNX metadata ``postprocess_tta`` (with ``validation_metrics_tta``), which the engine reads when
``--tta`` is on.

    python -m models.tta_calibration --checkpoint checkpoints/crowns_r4/last.pt \
        --onnx models/zoo/crowns-dense.onnx [--out OUT.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def calibrate_tta(checkpoint: str | Path, onnx_path: str | Path, out: str | Path | None = None,
                  threads: int = 2, log=print) -> dict:
    """Choose the TTA thresholds of the network in ``checkpoint`` and write them into a copy of
    ``onnx_path`` (default: in place). Returns ``{"postprocess_tta": ..., "validation_metrics_tta": ...}``."""
    import torch

    from models.export import copy_with_metadata
    from models.train_crowns import calibrate_on_validation, load_crown_net, load_scenes

    torch.set_num_threads(max(1, threads))
    net, cfg = load_crown_net(checkpoint)
    post, scores = calibrate_on_validation(net, load_scenes(cfg), cfg, tta=True, log=log)
    meta = {"postprocess_tta": post, "validation_metrics_tta": scores}
    copy_with_metadata(onnx_path, out or onnx_path, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TTA post-processing thresholds into a crown model's metadata")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--onnx", required=True, help="the crown model exported from that checkpoint")
    ap.add_argument("--out", default=None, help="write a copy here (default: update --onnx in place)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(calibrate_tta(a.checkpoint, a.onnx, a.out, a.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
