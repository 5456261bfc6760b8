"""Compression of the species CNN: every method meets its budget, keeps the [N, K] output, and the
exported engine ONNX (uint8 ``image`` in, ``probs`` out, species metadata) agrees with torch."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from models.compression.compress import compress, export_compressed  # noqa: E402
from models.compression.cost import count_cost  # noqa: E402
from models.compression.species_study import (  # noqa: E402
    CONTROL,
    compress_near_target,
    onecycle_factors,
    onnx_io,
    parse_variant,
    ship_decision,
)
from models.export import parity_max_abs_diff, read_metadata  # noqa: E402
from models.species_net import SpeciesNet, SpeciesNetConfig  # noqa: E402

CHIP = 32
K = 4
SHAPE = (3, CHIP, CHIP)
torch.set_num_threads(1)

META = {"task": "species_classification", "class_names": [f"sp{i}" for i in range(K)], "gsd_m": 0.2,
        "tile_size": CHIP, "unknown_threshold": 0.4, "bands": ["red", "green", "blue"],
        "model_version": "tiny-species", "training_data": "none (test)", "validation_metrics": {},
        "chip_convention": "test"}


def tiny_species_net() -> SpeciesNet:
    """The species architecture at test size (4 stages, 32 px chips): ~18 k parameters."""
    torch.manual_seed(0)
    net = SpeciesNet(SpeciesNetConfig(n_classes=K, chip_px=CHIP, widths=(16, 24, 32, 48)))
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, *SHAPE, generator=g)]


@pytest.mark.parametrize("method", ["pfp", "l1", "uniform", "alds"])
@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_mac_budget_met_and_output_shape_kept(method, ratio, calib):
    net = tiny_species_net()
    res = compress(net, method, ratio, SHAPE, calibration=calib, budget="macs")
    before, after = count_cost(net, SHAPE), count_cost(res.model, SHAPE)
    kept = after.macs / before.macs
    assert abs(kept - (1 - ratio)) <= 0.02
    assert res.achieved_ratio == pytest.approx(1 - kept)
    with torch.no_grad():
        y = res.model.eval()(torch.randn(5, *SHAPE))
    assert y.shape == (5, K) and torch.isfinite(y).all()
    assert after.params < before.params  # physically smaller, not masked


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_sipp_meets_nonzero_budget_with_dense_shapes(ratio, calib):
    net = tiny_species_net()
    res = compress(net, "sipp", ratio, SHAPE, calibration=calib)
    assert abs(res.after.nonzero_params / res.before.params - (1 - ratio)) <= 0.02
    assert res.after.params == res.before.params and res.after.macs == res.before.macs  # no dense speed-up
    assert res.model(torch.randn(3, *SHAPE)).shape == (3, K)


@pytest.mark.parametrize("method", ["pfp", "l1", "uniform", "sipp", "alds"])
def test_exported_engine_onnx_agrees_with_torch(method, calib, tmp_path):
    from pipeline.onnx_model import SPECIES_TASK, OnnxModel

    res = compress(tiny_species_net(), method, 0.5, SHAPE, calibration=calib)
    path = tmp_path / f"species-{method}.onnx"
    export_compressed(res, path, CHIP, metadata=META)
    chips = np.random.default_rng(0).integers(0, 256, size=(16, *SHAPE), dtype=np.uint8)
    chips[:, :, :4] = 0  # outside-crown pixels are zero in real chips
    assert parity_max_abs_diff(res.model, path, chips) < 1e-4
    io = onnx_io(path)
    assert io["inputs"] == [{"name": "image", "dtype": "UINT8", "shape": ["batch", 3, CHIP, CHIP]}]
    assert io["outputs"] == [{"name": "probs", "dtype": "FLOAT", "shape": ["batch", K]}]
    meta = read_metadata(path)
    assert set(META) <= set(meta)
    rec = json.loads(meta["compression"])
    assert rec["method"] == method and rec["params_before"] == res.before.params
    model = OnnxModel(path, threads=1, expected_task=SPECIES_TASK)  # what classify_crowns loads
    probs = model.run(chips)
    assert probs.shape == (16, K) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert model.meta.compression["method"] == method and model.meta.class_names == META["class_names"]


def test_rounded_widths_and_near_target_search(calib):
    net = tiny_species_net()
    res = compress_near_target(net, "l1", 0.5, SHAPE, calib, round_to=8)
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    assert res.target_ratio == 0.5 and res.details["requested_ratio"] <= 0.5
    assert res.model(torch.randn(2, *SHAPE)).shape == (2, K)


def test_lr_rewinding_replays_the_onecycle_tail():
    from models.compression.finetune import rewound_schedule

    total = 50
    f = onecycle_factors(3e-3, total)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total, pct_start=0.2)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"] / 3e-3)
        opt.step()
        sched.step()
    assert f == pytest.approx(ref)
    assert max(f) == pytest.approx(1.0)
    rew = rewound_schedule(lambda s: f[s], total, 20)
    assert [rew(i) for i in range(20)] == pytest.approx(f[30:])


def test_variants_and_ship_rule():
    assert parse_variant("pfp", 8, 8) == ("pfp", 8, 8)
    assert parse_variant("l1-r1", 8, 8) == ("l1", None, 8)
    assert parse_variant("alds-k1", 8, 8) == ("alds", 8, 1)

    def lat(ms, p90, speedup):
        return {"batch64": {"median_ms": ms, "p90_ms": p90, "speedup": speedup}}

    results = {"dense": {"test": {"macro_f1": 0.99}, "latency": lat(100.0, 110.0, 1.0)},
               "runs": {"a": {"method": "pfp", "test": {"macro_f1": 0.985}, "latency": lat(50.0, 60.0, 2.0)},
                        "b": {"method": "l1", "test": {"macro_f1": 0.97}, "latency": lat(30.0, 35.0, 3.3)},
                        "c": {"method": "uniform", "test": {"macro_f1": 0.99},
                              "latency": lat(95.0, 99.0, 1.05)},
                        "s": {"method": "sipp", "test": {"macro_f1": 0.99}, "latency": lat(40.0, 45.0, 2.5)},
                        CONTROL: {"method": CONTROL, "test": {"macro_f1": 1.0}, "latency": lat(1, 1, 100)}}}
    d = ship_decision(results)
    # b loses > 1 point, c is not measurably faster, s is SiPP (dense shapes)
    assert d["ship"] == "a" and d["eligible"] == ["a"]
    results["runs"]["a"]["test"]["macro_f1"] = 0.5
    assert ship_decision(results)["ship"] is None
