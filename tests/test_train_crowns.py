"""Crown training on CPU: one step in seconds, deterministic batches, exact resume from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint
from models.train_crowns import TrainCrownsConfig, load_crown_net, load_scenes, make_batch, train_crowns

VOC = """<annotation><filename>img.png</filename>
<object><name>Tree</name><bndbox><xmin>8</xmin><ymin>8</ymin><xmax>30</xmax><ymax>28</ymax></bndbox></object>
<object><name>Tree</name><bndbox><xmin>60</xmin><ymin>50</ymin><xmax>90</xmax><ymax>84</ymax></bndbox></object>
<object><name>Tree</name><bndbox><xmin>100</xmin><ymin>10</ymin><xmax>120</xmax><ymax>32</ymax></bndbox></object>
</annotation>"""

TINY_NET = {
    "arch": "unet",
    "encoder": "resnet18",
    "classes": 3,
    "decoder_channels": [16, 8, 8],
    "encoder_depth": 3,
}


@pytest.fixture
def tiny_cfg(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(60, 120, (96, 128, 3)).astype(np.uint8)
    img[8:28, 8:30] = (40, 110, 50)
    img[50:84, 60:90] = (40, 120, 60)
    Image.fromarray(img).save(tmp_path / "img.png")
    (tmp_path / "img.xml").write_text(VOC)
    return TrainCrownsConfig(
        boxes=[str(tmp_path / "img.xml")],
        out_dir=str(tmp_path / "ck"),
        iterations=4,
        batch_size=2,
        chip_px=32,
        block_px=48,
        gsd_m=0.1,
        image_gsd_m=0.1,
        tile_size=64,
        overlap_px=16,
        warmup=1,
        checkpoint_every=2,
        threads=1,
        net=dict(TINY_NET),
    )


def test_batches_are_a_function_of_seed_and_step(tiny_cfg):
    scenes = load_scenes(tiny_cfg)
    from models.datasets.savanna import crown_bank

    bank = crown_bank(scenes)
    x1, y1 = make_batch(3, tiny_cfg, scenes, bank)
    x2, y2 = make_batch(3, tiny_cfg, scenes, bank)
    x3, _ = make_batch(4, tiny_cfg, scenes, bank)
    assert x1.shape == (2, 3, 32, 32) and y1.shape == (2, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert set(torch.unique(y1).tolist()) <= {0, 1, 2, 255}


def test_one_step_trains_and_checkpoint_loads_weights_only(tiny_cfg):
    res = train_crowns(tiny_cfg, log=lambda m: None, max_steps=1)
    assert res["step"] == 1
    ck = load_checkpoint(res["checkpoint"])  # torch.load(weights_only=True) inside
    assert ck["step"] == 1 and ck["config"]["seed"] == 0 and ck["net"]["encoder_depth"] == 3
    net, cfg = load_crown_net(res["checkpoint"])
    assert cfg.iterations == 4
    out = net(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32)


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    import dataclasses

    straight = train_crowns(
        dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "a")), log=lambda m: None, max_steps=2
    )
    cfg_b = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "b"))
    train_crowns(cfg_b, log=lambda m: None, max_steps=1)
    messages = []
    resumed = train_crowns(cfg_b, log=messages.append, max_steps=1)
    assert any("resumed" in m for m in messages)
    assert resumed["step"] == 2
    sa, sb = straight["net"].state_dict(), resumed["net"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)


def test_synthetic_scenes_are_generated_once_and_train_like_polygons(tiny_cfg, tmp_path):
    from dataclasses import replace

    from models.datasets.synthetic_scenes import synthetic_scenes
    from models.train_crowns import load_synthetic_scenes

    scenes = synthetic_scenes(2, tmp_path / "syn", size_m=20.0, gsd_m=0.15)
    assert [s.name for s in scenes] == ["synthetic_5000", "synthetic_5001"]
    for s in scenes:
        assert s.rgb.shape == (3, 133, 133) and s.split is None and s.boxes is None
        classes = set(np.unique(s.target).tolist())
        assert {0, 1, 2} <= classes and 255 not in classes  # background, interior, boundary; all valid
    ortho = next((tmp_path / "syn").glob("seed_5000_*")) / "ortho.tif"
    stamp = ortho.stat().st_mtime_ns
    again = synthetic_scenes(2, tmp_path / "syn", size_m=20.0, gsd_m=0.15)
    assert ortho.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert np.array_equal(again[0].rgb, scenes[0].rgb)

    real = load_scenes(tiny_cfg)
    # off by default: no scenes, and the batch stream of earlier configs is unchanged
    assert load_synthetic_scenes(tiny_cfg) == []
    x0, _ = make_batch(3, tiny_cfg, real, [])
    x1, _ = make_batch(3, tiny_cfg, real, [], scenes)
    assert torch.equal(x0, x1)
    # every chip from the synthetic scenes at fraction 1: their targets hold crown interiors
    cfg = replace(tiny_cfg, synthetic_scenes=2, synthetic_fraction=1.0, chip_px=64, batch_size=4)
    _, y = make_batch(3, cfg, real, [], scenes)
    assert (y == 1).sum() > 0 and (y == 255).sum() == 0


def test_postprocess_calibration_picks_the_thresholds_the_validation_needs():
    """Known answer: every reference crown is a 1.4 m² square (62 px at 0.15 m) with a confident core, so
    only the smallest minimum area (1.0 m²) keeps them; the larger grid values drop every crown."""
    from shapely.geometry import box

    from models.train_crowns import PARAM_GRID, ValCase, calibrate_postprocess

    gsd = 0.15
    probs = np.zeros((3, 96, 96), np.float32)
    probs[0] = 1.0
    truth = []
    for r0, c0 in ((10, 10), (10, 60), (60, 30)):
        side = 8  # 8 px = 1.2 m; 1.44 m²
        probs[:, r0:r0 + side, c0:c0 + side] = np.array([0.05, 0.9, 0.05])[:, None, None]
        truth.append(box(c0, r0, c0 + side, r0 + side))
    cases = [ValCase("real_0", probs, np.ones((96, 96), bool), truth, lambda x, y: True)]
    post, metrics = calibrate_postprocess(cases, gsd, log=lambda m: None)
    assert set(post) == set(PARAM_GRID)
    assert post["min_area_m2"] == 1.0
    assert metrics["real_f1_iou0.4"] == 1.0 and metrics["real_n_truth"] == 3


def test_mobilenet_v2_unet_drops_the_blocks_past_its_deepest_output():
    """smp's MobileNetV2 runs every block whatever encoder_depth; the cut net gives the same output, and a
    checkpoint of the uncut net (extra encoder keys) still loads."""
    import segmentation_models_pytorch as smp

    from models.nets import SegNetConfig, build_crown_net, load_net_state

    cfg = SegNetConfig(encoder="mobilenet_v2", encoder_depth=4, decoder_channels=(32, 16, 8, 8))
    torch.manual_seed(0)
    full = smp.Unet("mobilenet_v2", encoder_weights=None, encoder_depth=4, decoder_channels=(32, 16, 8, 8),
                    classes=3).eval()
    cut = load_net_state(build_crown_net(cfg), full.state_dict()).eval()
    assert len(cut.encoder.features) == 14 and len(full.encoder.features) == 19
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(cut(x), full(x))
    with pytest.raises(RuntimeError):  # a missing key is still an error
        partial = {k: v for k, v in full.state_dict().items() if "decoder" not in k}
        load_net_state(build_crown_net(cfg), partial)
