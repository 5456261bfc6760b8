"""Compressed networks export to ONNX that agrees with torch; ALDS at full rank is exact."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("segmentation_models_pytorch")

from torch import nn  # noqa: E402

from models.compression.alds import FactorisedConv2d, layer_spectra  # noqa: E402
from models.compression.compress import compress, export_compressed  # noqa: E402
from models.export import parity_max_abs_diff, read_metadata  # noqa: E402
from models.nets import SegNetConfig, build_segmentation_net  # noqa: E402

TILE = 64
torch.set_num_threads(1)


def tiny_unet():
    torch.manual_seed(0)
    cfg = SegNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8))
    return build_segmentation_net(cfg)


@pytest.mark.parametrize("method", ["pfp", "alds", "sbf"])
def test_pruned_model_and_onnx_agree(method, tmp_path):
    calib = [torch.randn(2, 3, TILE, TILE)]
    res = compress(tiny_unet(), method, 0.6, (3, TILE, TILE), calibration=calib, score_steps=20)
    path = tmp_path / "m.onnx"
    export_compressed(res, path, TILE, metadata={"task": "crown_segmentation"})
    assert parity_max_abs_diff(res.model, path) < 1e-4
    meta = read_metadata(path)
    rec = json.loads(meta["compression"])
    assert rec["method"] == method and rec["macs_after"] < rec["macs_before"]
    assert rec["params_after"] == res.after.params
    assert meta["task"] == "crown_segmentation"
    # the file really shrank (weights removed, not masked)
    dense = tmp_path / "d.onnx"
    export_compressed(compress(tiny_unet(), "uniform", 0.0, (3, TILE, TILE)), dense, TILE)
    assert path.stat().st_size < 0.8 * dense.stat().st_size


@pytest.mark.parametrize("k", [1, 2, 4])
def test_alds_full_rank_reproduces_layer(k):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 8, 11, 11)
    full = min(6, (8 // k) * 9)
    fc = FactorisedConv2d(conv, k, full)
    with torch.no_grad():
        torch.testing.assert_close(fc(x), conv(x), atol=1e-5, rtol=1e-5)
    assert fc[0].groups == k and fc[0].out_channels == k * full and fc[1].kernel_size == (1, 1)


def test_alds_error_is_the_eckart_young_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    (ly,) = layer_spectra(net, (4, 8, 8))
    w = net[0].weight.detach().double()
    r = 2
    for k in ly.spectra:
        fc = FactorisedConv2d(net[0], k, r)
        errs = []  # spectral error of each group's rank-r approximation, as materialised
        for i, wi in enumerate(torch.chunk(w, k, dim=1)):
            pw = fc[0].weight.detach().double()[i * r:(i + 1) * r].reshape(r, -1)
            cw = fc[1].weight.detach().double()[:, i * r:(i + 1) * r, 0, 0]
            errs.append(float(torch.linalg.matrix_norm(wi.reshape(8, -1) - cw @ pw, ord=2)))
        assert max(errs) / ly.sigma1 == pytest.approx(ly.error(k, r), rel=1e-4)


def test_static_int8_export(tmp_path):
    pytest.importorskip("onnxruntime")
    res = compress(tiny_unet(), "l1", 0.5, (3, TILE, TILE))
    tiles = np.random.default_rng(0).integers(0, 256, size=(4, 3, TILE, TILE), dtype=np.uint8)
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    export_compressed(res, fp32, TILE, calibration_tiles=tiles, quantized_path=int8)
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "ConvInteger" not in ops
    assert "quantization" in json.loads(read_metadata(int8)["compression"])


def test_channel_softmax_equals_softmax():
    from models.export import channel_softmax

    x = torch.randn(2, 3, 5, 5) * 20
    torch.testing.assert_close(channel_softmax(x), torch.softmax(x, 1))


def test_pruned_network_rebuilds_from_a_plain_state_dict(tmp_path):
    """A pruned model is saved as a state dict and loaded with weights_only=True: same outputs."""
    from models.compression.structured import rebuild_pruned

    calib = [torch.randn(2, 3, TILE, TILE)]
    res = compress(tiny_unet(), "pfp", 0.6, (3, TILE, TILE), calibration=calib)
    torch.save(res.model.state_dict(), tmp_path / "pruned.pt")
    state = torch.load(tmp_path / "pruned.pt", weights_only=True)
    rebuilt = rebuild_pruned(tiny_unet(), state)
    x = torch.randn(1, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), res.model.eval()(x))
    assert sum(p.numel() for p in rebuilt.parameters()) == res.after.params
    alds = compress(tiny_unet(), "alds", 0.6, (3, TILE, TILE))
    with pytest.raises(ValueError, match="ALDS"):
        rebuild_pruned(tiny_unet(), alds.model.state_dict())
