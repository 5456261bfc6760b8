"""Test-time augmentation: the views map back to the tile's grid; the engine uses the TTA thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import inventory
from pipeline.tta import VIEWS, predict_with_tta
from tests.test_engine import UTM, T, config, match_discs, run_groups, scene_discs
from tests.tiny_models import write_crown_model, write_species_model


def test_every_view_maps_back_to_the_tile_grid():
    """A model that returns its input: every view is inverted exactly, so the mean is the input."""
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    out = predict_with_tta(lambda x: x.astype(np.float32), batch)
    assert out.dtype == np.float32 and out.shape == batch.shape
    np.testing.assert_array_equal(out, batch.astype(np.float32))


def test_known_answer_for_a_model_that_is_not_rotation_invariant():
    """A model that marks the top-left pixel of what it sees: in the tile's grid that pixel is (0, 0) for
    the identity, (0, T-1) for the mirror and for the 90° turn, (T-1, T-1) for the mirror turned 270°."""
    t = 8

    def top_left(x):
        y = np.zeros((x.shape[0], 1, t, t), np.float32)
        y[:, 0, 0, 0] = 1.0
        return y

    out = predict_with_tta(top_left, np.zeros((1, 3, t, t), np.uint8))[0, 0]
    assert len(VIEWS) == 4
    assert out[0, 0] == 0.25 and out[0, t - 1] == 0.5 and out[t - 1, t - 1] == 0.25
    assert out.sum() == pytest.approx(1.0)


def test_square_tiles_only():
    with pytest.raises(ValueError, match="square"):
        predict_with_tta(lambda x: x, np.zeros((1, 3, 8, 16), np.uint8))


def test_engine_tta_finds_the_same_crowns_and_uses_the_tta_thresholds(tmp_path, write_geotiff, disc_scene):
    """The tiny crown model is per-pixel, so the views agree and every disc is still found exactly once;
    the plan takes the model's ``postprocess_tta`` thresholds and a TTA run never reuses plain groups."""
    discs = scene_discs()
    ortho = write_geotiff(tmp_path / "ortho.tif", disc_scene(400, discs), T, UTM)
    plain_pp = {"fg_threshold": 0.5, "min_area_m2": 1.0}
    tta_pp = {"fg_threshold": 0.45, "min_area_m2": 1.0}
    models = (write_crown_model(tmp_path / "crowns.onnx", tile_size=128, overlap_px=56,
                                brightness_threshold=0.36, postprocess=plain_pp,
                                metadata={"postprocess_tta": json.dumps(tta_pp)}),
              write_species_model(tmp_path / "species.onnx", chip_size=32, gsd_m=0.2))
    out = tmp_path / "out"
    plain = inventory.validate(config(ortho, out, models))
    fp_plain = plain.fingerprint
    plain.close()
    plan = inventory.validate(config(ortho, out, models, tta=True))
    assert plan.postprocess["fg_threshold"] == 0.45 and plan.fingerprint != fp_plain
    model = plan.crown_model()
    calls = model.calls
    crowns = inventory.collect_crowns(plan, run_groups(plan))
    assert model.calls - calls == 4 * len(plan.tiles)  # four views a tile
    counts, _ = match_discs(crowns, discs)
    assert counts == [1] * len(discs)
    plan.close()


def test_same_views_as_the_training_validation():
    """TTA thresholds are calibrated with the training code's TTA: both must average the same views."""
    torch = pytest.importorskip("torch")
    from models.nets import SegNetConfig, build_crown_net
    from models.train_crowns import normalise, predict_image

    torch.manual_seed(0)
    net = build_crown_net(SegNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8)))
    net.eval()
    img = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)

    def run(x):
        with torch.no_grad():
            return torch.softmax(net(normalise(torch.from_numpy(np.ascontiguousarray(x)))), 1).numpy()

    ours = predict_with_tta(run, img[None])[0]
    np.testing.assert_allclose(ours, predict_image(net, img, tta=True), atol=1e-6)
