"""The nsfwjs MobileNetV2 converter: TF.js parsing, dequantisation, Keras -> smp mapping (no network)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.export import normalise_uint8
from models.nets import SegNetConfig, build_crown_net
from models.pretrained import (
    KERAS_BN_EPS,
    TORCH_BN_EPS,
    dequantise_manifest,
    extract_base64_buffer,
    frozen_upto_block,
    keras_mobilenetv2_to_smp,
    load_pretrained_encoder,
    load_tfjs_weights,
    parse_js_literal,
    read_tfjs_model,
)

# Keras MobileNetV2 (alpha 1.0): (expansion, output channels) of block_1 .. block_16
_BLOCKS = [(6, 24), (6, 24), (6, 32), (6, 32), (6, 32), (6, 64), (6, 64), (6, 64), (6, 64),
           (6, 96), (6, 96), (6, 96), (6, 160), (6, 160), (6, 160), (6, 320)]


def _bn(rng: np.random.Generator, name: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{name}/gamma": rng.normal(1.0, 0.1, c).astype(np.float32),
        f"{name}/beta": rng.normal(0.0, 0.1, c).astype(np.float32),
        f"{name}/moving_mean": rng.normal(0.0, 0.5, c).astype(np.float32),
        f"{name}/moving_variance": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def keras_mobilenetv2(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with the names and Keras shapes of a full MobileNetV2 (+ a dense head to ignore)."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {"Conv1/kernel": rng.normal(0, 0.3, (3, 3, 3, 32)).astype(np.float32)}
    w.update(_bn(rng, "bn_Conv1", 32))
    w["expanded_conv_depthwise/depthwise_kernel"] = rng.normal(0, 0.3, (3, 3, 32, 1)).astype(np.float32)
    w.update(_bn(rng, "expanded_conv_depthwise_BN", 32))
    w["expanded_conv_project/kernel"] = rng.normal(0, 0.3, (1, 1, 32, 16)).astype(np.float32)
    w.update(_bn(rng, "expanded_conv_project_BN", 16))
    cin = 16
    for n, (t, cout) in enumerate(_BLOCKS, start=1):
        hid = cin * t
        w[f"block_{n}_expand/kernel"] = rng.normal(0, 0.1, (1, 1, cin, hid)).astype(np.float32)
        w.update(_bn(rng, f"block_{n}_expand_BN", hid))
        w[f"block_{n}_depthwise/depthwise_kernel"] = rng.normal(0, 0.3, (3, 3, hid, 1)).astype(np.float32)
        w.update(_bn(rng, f"block_{n}_depthwise_BN", hid))
        w[f"block_{n}_project/kernel"] = rng.normal(0, 0.1, (1, 1, hid, cout)).astype(np.float32)
        w.update(_bn(rng, f"block_{n}_project_BN", cout))
        cin = cout
    w["Conv_1/kernel"] = rng.normal(0, 0.1, (1, 1, 320, 1280)).astype(np.float32)
    w.update(_bn(rng, "Conv_1_bn", 1280))
    w["dense_1/kernel"] = rng.normal(0, 0.1, (1280, 8)).astype(np.float32)
    w["dense_1/bias"] = np.zeros(8, np.float32)
    return w


def _smp_encoder() -> torch.nn.Module:
    net = build_crown_net(SegNetConfig(encoder="mobilenet_v2", encoder_depth=5,
                                       decoder_channels=(32, 16, 16, 16, 16)))
    return net.encoder


def test_mapping_covers_the_full_encoder_with_known_elements() -> None:
    w = keras_mobilenetv2()
    sd = keras_mobilenetv2_to_smp(w, absorb_input_norm=False)
    enc = _smp_encoder()
    own = {k: v for k, v in enc.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(sd) == set(own)  # strict coverage, the dense head dropped
    for k in own:
        assert sd[k].shape == own[k].shape, k
    enc.load_state_dict(sd, strict=False)
    # conv kernel: torch [o, i, h, w] == keras [h, w, i, o]
    assert sd["features.0.0.weight"][5, 2, 0, 1] == w["Conv1/kernel"][0, 1, 2, 5]
    assert sd["features.4.conv.0.0.weight"][7, 3, 0, 0] == w["block_3_expand/kernel"][0, 0, 3, 7]
    assert sd["features.11.conv.2.weight"][4, 100, 0, 0] == w["block_10_project/kernel"][0, 0, 100, 4]
    # depthwise: torch [c, 0, h, w] == keras [h, w, c, 0]
    dw0, dw7 = w["expanded_conv_depthwise/depthwise_kernel"], w["block_7_depthwise/depthwise_kernel"]
    assert sd["features.1.conv.0.0.weight"][9, 0, 2, 1] == dw0[2, 1, 9, 0]
    assert sd["features.8.conv.1.0.weight"][200, 0, 1, 2] == dw7[1, 2, 200, 0]
    # BN: gamma/beta/mean as they are, variance + (1e-3 - 1e-5)
    bn = enc.features[11].conv[3]
    assert torch.equal(bn.weight.detach(), torch.from_numpy(w["block_10_project_BN/gamma"]))
    assert torch.equal(bn.bias.detach(), torch.from_numpy(w["block_10_project_BN/beta"]))
    assert torch.equal(bn.running_mean, torch.from_numpy(w["block_10_project_BN/moving_mean"]))
    var = w["block_10_project_BN/moving_variance"]
    np.testing.assert_allclose(bn.running_var.numpy(), var + KERAS_BN_EPS - TORCH_BN_EPS, rtol=1e-6)
    assert bn.eps == TORCH_BN_EPS
    assert torch.equal(enc.features[18][1].running_mean, torch.from_numpy(w["Conv_1_bn/moving_mean"]))
    gamma = torch.from_numpy(w["block_1_depthwise_BN/gamma"])
    assert torch.equal(enc.features[2].conv[1][1].weight.detach(), gamma)


def test_upto_block_keeps_only_the_imagenet_blocks() -> None:
    sd = keras_mobilenetv2_to_smp(keras_mobilenetv2(), upto_block=10)
    assert "features.11.conv.3.running_var" in sd  # block_10
    assert not any(k.startswith(("features.12.", "features.17.", "features.18.")) for k in sd)


def _keras_first_layer(x_keras: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """Keras Conv1 (pad bottom/right, stride 2) + bn_Conv1 (eps 1e-3) + ReLU6 in numpy, NHWC in/out."""
    k = w["Conv1/kernel"].astype(np.float64)
    xp = np.pad(x_keras.astype(np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
    n, hp, wp, _ = xp.shape
    ho, wo = (hp - 3) // 2 + 1, (wp - 3) // 2 + 1
    y = np.zeros((n, ho, wo, k.shape[3]))
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, dy: dy + 2 * ho: 2, dx: dx + 2 * wo: 2, :]
            y += patch @ k[dy, dx]
    g, b = w["bn_Conv1/gamma"], w["bn_Conv1/beta"]
    mu, var = w["bn_Conv1/moving_mean"], w["bn_Conv1/moving_variance"]
    y = (y - mu) / np.sqrt(var + KERAS_BN_EPS) * g + b
    return np.clip(y, 0.0, 6.0)


def test_first_layer_with_absorbed_normalisation_matches_keras() -> None:
    """Our normalised input through the converted layer == Keras' x/127.5-1 through Keras (image interior)."""
    w = keras_mobilenetv2(seed=3)
    enc = _smp_encoder()
    enc.load_state_dict(keras_mobilenetv2_to_smp(w, upto_block=0), strict=False)
    enc.eval()
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1, 3, 32, 32)).astype(np.float32)  # uint8-range RGB, NCHW
    ref = _keras_first_layer(img.transpose(0, 2, 3, 1) / 127.5 - 1.0, w)  # (1, 16, 16, 32)
    # torch pads one pixel on every side: feeding the image shifted by one pixel lines its windows up
    # with Keras' (bottom/right padded) windows; compare where no padding is involved
    x = normalise_uint8(torch.from_numpy(img))[:, :, 1:, 1:]
    with torch.no_grad():
        got = enc.features[0](x).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-4)
    # the same without absorbing: Keras' own normalisation in, same answer
    enc.load_state_dict(keras_mobilenetv2_to_smp(w, upto_block=0, absorb_input_norm=False), strict=False)
    with torch.no_grad():
        x2 = torch.from_numpy(img / 127.5 - 1.0)[:, :, 1:, 1:]
        got2 = enc.features[0](x2).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got2[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-4)


def test_depthwise_block_matches_a_keras_style_reference() -> None:
    """expanded_conv (depthwise 3x3 + BN + ReLU6, project 1x1 + BN) against an explicit computation."""
    w = keras_mobilenetv2(seed=5)
    enc = _smp_encoder()
    enc.load_state_dict(keras_mobilenetv2_to_smp(w, upto_block=0, absorb_input_norm=False), strict=False)
    enc.eval()
    x = torch.randn(1, 32, 9, 9, dtype=torch.float32)
    with torch.no_grad():
        got = enc.features[1](x)

    def bn(y: torch.Tensor, name: str) -> torch.Tensor:
        p = {k: torch.from_numpy(w[f"{name}/{k}"]).view(1, -1, 1, 1)
             for k in ("gamma", "beta", "moving_mean", "moving_variance")}
        sd = torch.sqrt(p["moving_variance"] + KERAS_BN_EPS)
        return (y - p["moving_mean"]) / sd * p["gamma"] + p["beta"]

    dk = torch.from_numpy(w["expanded_conv_depthwise/depthwise_kernel"])  # (3, 3, 32, 1)
    y = F.conv2d(x, dk.permute(2, 3, 0, 1), padding=1, groups=32)
    y = bn(y, "expanded_conv_depthwise_BN").clamp(0, 6)
    pk = torch.from_numpy(w["expanded_conv_project/kernel"])[0, 0]  # (32, 16)
    y = bn(torch.einsum("nchw,co->nohw", y, pk), "expanded_conv_project_BN")
    torch.testing.assert_close(got, y, atol=1e-4, rtol=1e-4)


def test_load_pretrained_encoder_reports_keys_and_respects_depth() -> None:
    small = {"encoder_depth": 4, "decoder_channels": (64, 32, 16, 16)}
    net = build_crown_net(SegNetConfig(encoder="mobilenet_v2", **small))
    assert len(net.encoder.features) == 14  # blocks past the depth-4 output (index 13) are cut off
    before = net.encoder.features[13].conv[0][0].weight.detach().clone()
    rep = load_pretrained_encoder(net, weights=keras_mobilenetv2())
    assert "features.0.0.weight" in rep["loaded"] and "features.11.conv.3.running_var" in rep["loaded"]
    assert not any(k.startswith("features.12.") for k in rep["loaded"])  # block_11: not ImageNet
    assert rep["loaded"][-1].startswith("features.11.") and len(rep["loaded"]) == 5 + 10 + 10 * 15
    assert not any(k.endswith("num_batches_tracked") for k in rep["not_loaded"])
    assert torch.equal(net.encoder.features[13].conv[0][0].weight.detach(), before)
    assert any(k.startswith("features.12.") for k in rep["not_loaded"])
    net_r18 = build_crown_net(SegNetConfig(encoder="resnet18", **small))
    with pytest.raises(Exception, match="mobilenet_v2"):
        load_pretrained_encoder(net_r18, weights=keras_mobilenetv2())


def test_dequantise_hand_made_manifest() -> None:
    manifest = [
        {"name": "a/kernel", "shape": [2, 2], "dtype": "float32",
         "quantization": {"min": -1.0, "scale": 0.5, "dtype": "uint8"}},
        {"name": "b/bias", "shape": [3], "dtype": "float32"},
        {"name": "c/gamma", "shape": [2], "dtype": "float32",
         "quantization": {"min": 0.25, "scale": 0.001, "dtype": "uint16"}},
        {"name": "d/beta", "shape": [1], "dtype": "float32", "quantization": {"dtype": "float16"}},
    ]
    buf = (bytes([0, 1, 4, 255]) + np.array([1.5, -2.0, 3.25], "<f4").tobytes()
           + np.array([0, 1000], "<u2").tobytes() + np.array([0.5], "<f2").tobytes())
    out = dequantise_manifest(manifest, buf)
    np.testing.assert_allclose(out["a/kernel"], [[-1.0, -0.5], [1.0, 126.5]])
    assert out["a/kernel"].dtype == np.float32
    np.testing.assert_array_equal(out["b/bias"], [1.5, -2.0, 3.25])
    np.testing.assert_allclose(out["c/gamma"], [0.25, 1.25], rtol=1e-6)
    np.testing.assert_array_equal(out["d/beta"], [0.5])
    with pytest.raises(ValueError):
        dequantise_manifest(manifest, buf[:-1])
    with pytest.raises(ValueError):
        dequantise_manifest(manifest, buf + b"\0")


def test_js_literal_and_base64_shard(tmp_path) -> None:
    payload = bytes([3, 250]) + np.array([0.75], "<f4").tobytes()
    b64 = base64.b64encode(payload).decode()
    shard = ('!function(e){module.exports=e()}(function(){return function e(h,n,d){var x="not base64!";'
             f'return x}}({{1:[function(e,h,n){{h.exports="{b64}"}},{{}}]}},{{}},[1])(1)}});')
    assert extract_base64_buffer(shard) == payload
    model_js = (
        '!function(e){module.exports=e()}(function(){return function(){}({1:[function(e,a,n){a.exports='
        '{modelTopology:{keras_version:"2.2.4",model_config:{class_name:"Model",config:{name:"m",layers:['
        '{name:"Conv1",class_name:"Conv2D",config:{trainable:!1,strides:[2,2],padding:"valid"}},'
        '{name:"block_1_expand",class_name:"Conv2D",config:{trainable:!1,x:null}},'
        '{name:"block_2_expand",class_name:"Conv2D",config:{trainable:!0,y:-.5e-1,"quoted key":"a\\"b"}}]}}},'
        'weightsManifest:[{paths:["group1-shard1of1"],weights:['
        '{name:"Conv1/kernel",shape:[2],dtype:"float32",quantization:{min:-.5,scale:.25,dtype:"uint8"}},'
        '{name:"bn_Conv1/gamma",shape:[1],dtype:"float32"}]}]}}]},{},[1])(1)});'
    )
    (tmp_path / "model.min.js").write_text(model_js)
    (tmp_path / "group1-shard1of1.min.js").write_text(shard)
    w = load_tfjs_weights(tmp_path)
    np.testing.assert_allclose(w["Conv1/kernel"], [0.25, 62.0])
    np.testing.assert_array_equal(w["bn_Conv1/gamma"], [0.75])
    model = read_tfjs_model(tmp_path)
    layers = model["modelTopology"]["model_config"]["config"]["layers"]
    assert layers[2]["config"] == {"trainable": True, "y": -0.05, "quoted key": 'a"b'}
    assert layers[1]["config"]["x"] is None
    assert frozen_upto_block(model) == 1
    value, end = parse_js_literal("[1, .5, -2e3, 'x', {a: !0}] tail")
    assert value == [1, 0.5, -2000.0, "x", {"a": True}] and end == len("[1, .5, -2e3, 'x', {a: !0}]")



class _Stop(Exception):
    pass


def test_train_crowns_applies_the_encoder_init_before_training(tmp_path, monkeypatch) -> None:
    import models.pretrained as pretrained
    from models.train_crowns import TrainCrownsConfig, train_crowns

    calls = []

    def fake_load(net: torch.nn.Module, source: str = "nsfwjs", **kw: object) -> dict:
        calls.append((type(net.encoder).__name__, source))
        raise _Stop

    monkeypatch.setattr(pretrained, "load_pretrained_encoder", fake_load)
    net = SegNetConfig(encoder="mobilenet_v2", encoder_depth=4, decoder_channels=(64, 32, 16, 16)).to_dict()
    cfg = TrainCrownsConfig(out_dir=str(tmp_path), encoder_init="nsfwjs", net=net)
    with pytest.raises(_Stop):
        train_crowns(cfg, log=lambda s: None)
    assert calls and calls[0][1] == "nsfwjs" and "MobileNet" in calls[0][0]


def test_cli_encoder_init_flag_switches_to_mobilenet_v2(monkeypatch) -> None:
    from typer.testing import CliRunner

    import models.train_crowns as tc
    from forest_inventory.cli import app

    seen = {}

    def fake_run(cfg: object, onnx: str, **kw: object) -> dict:
        seen["cfg"] = cfg
        return {"onnx": onnx, "validation": {}}

    monkeypatch.setattr(tc, "run_training", fake_run)
    res = CliRunner().invoke(app, ["train", "crowns", "--encoder-init", "nsfwjs", "--out", "x"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].encoder_init == "nsfwjs" and seen["cfg"].net["encoder"] == "mobilenet_v2"
    res = CliRunner().invoke(app, ["train", "crowns", "--out", "x"])
    assert seen["cfg"].encoder_init == "" and seen["cfg"].net["encoder"] == "resnet18"


def test_fetch_without_npm_or_with_failing_npm_is_an_input_error(tmp_path, monkeypatch) -> None:
    import models.pretrained as pretrained
    from pipeline.errors import InputError

    monkeypatch.setattr(pretrained.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="npm not found") as err:
        pretrained.fetch_nsfwjs(tmp_path / "cache")
    assert "\n" not in str(err.value)
    fake = tmp_path / "npm"
    fake.write_text("#!/bin/sh\necho 'npm error 404 Not Found - GET nsfwjs' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(pretrained.shutil, "which", lambda name: str(fake))
    with pytest.raises(InputError, match="npm pack nsfwjs@4.4.0 failed.*404") as err:
        pretrained.fetch_nsfwjs(tmp_path / "cache")
    assert "\n" not in str(err.value)
