"""ONNX export of the crown network: parity with torch, the metadata contract read back by the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.export import export_onnx, parity_max_abs_diff, quantize_static_qdq, read_metadata
from models.nets import SegNetConfig, build_crown_net
from models.train_crowns import TrainCrownsConfig, export_crown_model
from pipeline.onnx_model import OnnxModel

TINY = SegNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = build_crown_net(TINY)
    # non-trivial BN statistics so eval-mode folding is exercised
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 3, 64, 64))
    return net.eval()


def test_parity_dynamic_batch_single_file(tiny_net, tmp_path):
    path = export_onnx(
        tiny_net, tmp_path / "m.onnx", (3, 64, 64), {"task": "crown_segmentation", "x": [1, 2]}
    )
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [
        "m.onnx"
    ]  # no external data
    batch = np.random.default_rng(1).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    assert parity_max_abs_diff(tiny_net, path, batch) < 1e-4
    meta = read_metadata(path)
    assert meta["task"] == "crown_segmentation" and json.loads(meta["x"]) == [1, 2]
    import onnx

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_crown_model_metadata_round_trip_through_engine(tiny_net, tmp_path):
    cfg = TrainCrownsConfig(gsd_m=0.15, tile_size=64, overlap_px=16, net=TINY.to_dict())
    post = {"fg_threshold": 0.45, "interior_threshold": 0.55, "seed_min_distance_m": 1.2, "min_area_m2": 1.5}
    path = export_crown_model(tiny_net, cfg, tmp_path / "crowns.onnx", post, {"real_f1_iou0.4": 0.5}, "t-1")
    model = OnnxModel(path, threads=1)
    assert model.meta.task == "crown_segmentation"
    assert model.meta.class_names == ["background", "crown", "boundary"]
    assert (
        model.meta.gsd_m == pytest.approx(0.15) and model.meta.tile_size == 64 and model.meta.overlap_px == 16
    )
    assert model.meta.postprocess == post
    assert model.meta.validation_metrics["real_f1_iou0.4"] == 0.5
    from pipeline.crowns import postprocess_kwargs

    assert postprocess_kwargs(model.meta.postprocess)["fg_threshold"] == 0.45
    probs = model.run(np.zeros((2, 3, 64, 64), np.uint8))
    assert probs.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_static_qdq_keeps_metadata(tiny_net, tmp_path):
    path = export_onnx(tiny_net, tmp_path / "f.onnx", (3, 64, 64), {"task": "crown_segmentation"})
    tiles = np.random.default_rng(2).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    q = quantize_static_qdq(path, tmp_path / "q.onnx", tiles, extra_metadata={"compression": {"int8": True}})
    meta = read_metadata(q)
    assert meta["task"] == "crown_segmentation" and json.loads(meta["compression"]) == {"int8": True}
    import onnx

    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_zoo_int8_copy_calibrates_on_the_models_own_training_data(tiny_net, tmp_path):
    from models.compression.int8 import calibration_tiles, quantize_crown_model
    from models.train_crowns import DEFAULT_ANNOTATIONS

    # the stored training config names boxes that do not exist here: the shipped NEON scenes are used
    cfg = TrainCrownsConfig(gsd_m=0.15, tile_size=64, overlap_px=16, net=TINY.to_dict(),
                            boxes=[str(tmp_path / "gone.xml")])
    path = export_crown_model(tiny_net, cfg, tmp_path / "crowns.onnx", {}, {}, "t-1")
    tiles = calibration_tiles(path, 3)
    assert tiles.shape == (3, 3, 64, 64) and tiles.dtype == np.uint8 and tiles.std() > 10
    assert all(Path(b).is_file() for b in DEFAULT_ANNOTATIONS)
    q = quantize_crown_model(path, tmp_path / "crowns.int8.onnx", n_tiles=3)
    model = OnnxModel(q, threads=1)  # the engine takes it: same contract, plus the compression record
    assert model.meta.task == "crown_segmentation" and model.meta.tile_size == 64
    record = json.loads(read_metadata(q)["compression"])
    assert record["method"] == "int8" and record["source"] == "crowns.onnx"
    ref = OnnxModel(path, threads=1).run(tiles)
    diff = np.abs(model.run(tiles) - ref)
    assert diff.mean() < 0.02 and np.quantile(diff, 0.99) < 0.1  # int8 stays close to the float probs


def test_copy_with_metadata_changes_only_the_named_entries(tiny_net, tmp_path):
    """A compressed model gets its own postprocess thresholds this way; the engine must read them."""
    from models.export import copy_with_metadata

    cfg = TrainCrownsConfig(gsd_m=0.15, tile_size=64, overlap_px=16, net=TINY.to_dict())
    post = {"fg_threshold": 0.35, "interior_threshold": 0.3, "seed_min_distance_m": 1.2, "min_area_m2": 2.5}
    src = export_crown_model(tiny_net, cfg, tmp_path / "crowns.onnx", post, {"real_f1_iou0.4": 0.5}, "t-1")
    own = dict(post, interior_threshold=0.5, min_area_m2=1.0)
    dst = copy_with_metadata(src, tmp_path / "crowns-cal.onnx", {"postprocess": own})
    before, after = read_metadata(src), read_metadata(dst)
    assert json.loads(after["postprocess"]) == own and json.loads(before["postprocess"]) == post
    assert {k: v for k, v in after.items() if k != "postprocess"} == {
        k: v for k, v in before.items() if k != "postprocess"}
    assert OnnxModel(dst, threads=1).meta.postprocess == own
    batch = np.random.default_rng(2).integers(0, 256, (1, 3, 64, 64), dtype=np.uint8)
    np.testing.assert_array_equal(OnnxModel(src, threads=1).run(batch), OnnxModel(dst, threads=1).run(batch))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crowns-cal.onnx", "crowns.onnx"]  # no temp left
