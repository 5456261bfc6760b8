"""Every crown model shipped in models/zoo keeps the engine's ONNX contract (what `--crown-model` loads):
metadata, one tile in, class probabilities out; the compressed ones carry their compression record."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.onnx_model import OnnxModel

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
CROWN_MODELS = sorted(p.name for p in ZOO.glob("crowns*.onnx"))


def test_the_zoo_ships_the_default_the_dense_and_the_recommended_fast_crown_model():
    assert {"crowns.onnx", "crowns-dense.onnx", "crowns-sbf75.onnx"} <= set(CROWN_MODELS)


@pytest.mark.parametrize("name", CROWN_MODELS)
def test_zoo_crown_model_runs_in_the_engine(name):
    model = OnnxModel(ZOO / name, threads=1, expected_task="crown_segmentation")
    t = model.meta.tile_size
    tile = np.random.default_rng(0).integers(0, 256, (1, 3, t, t), dtype=np.uint8)
    probs = model.run(tile)
    assert probs.shape == (1, len(model.meta.class_names), t, t)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
    assert model.meta.postprocess  # thresholds chosen on validation travel with the model
    rec = model.meta.compression
    if name == "crowns-dense.onnx":
        assert rec is None
        return
    if name == "crowns.onnx" and rec is None:  # the default may be the dense model itself
        return
    assert rec is not None, f"{name}: a compressed zoo model without its compression record"
    if "quantization" not in rec:  # pruned: really smaller
        assert rec["params_after"] < 0.5 * rec["params_before"]
