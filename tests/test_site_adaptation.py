"""Site adaptation end to end (issue 21): suggest on a generated scene, draw crowns, fine-tune, run."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
from typer.testing import CliRunner

from forest_inventory.cli import app
from pipeline.suggest import suggest_tiles
from pipeline.synthetic import generate_scene

torch = pytest.importorskip("torch")

TINY_NET = {"arch": "unet", "encoder": "resnet18", "classes": 3, "decoder_channels": [16, 8, 8],
            "encoder_depth": 3}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 38.4 m generated scene and a tiny crown model (128 px tiles at 0.1 m) with its weights beside it."""
    from models.finetune import save_state_dict
    from models.nets import SegNetConfig, build_crown_net
    from models.train_crowns import TrainCrownsConfig, export_crown_model

    root = tmp_path_factory.mktemp("site")
    scene = generate_scene(root / "scene", size_m=38.4, gsd_m=0.1, seed=4, window_px=256,
                           trees_per_ha_candidates=2000)
    torch.manual_seed(0)
    cfg = TrainCrownsConfig(gsd_m=0.1, image_gsd_m=0.1, tile_size=128, overlap_px=32, net=dict(TINY_NET),
                            boxes=[], plot_csvs=[], threads=1)
    net = build_crown_net(SegNetConfig.from_dict(TINY_NET)).eval()
    post = {"fg_threshold": 0.5, "interior_threshold": 0.3, "seed_min_distance_m": 1.2, "min_area_m2": 1.0}
    model = export_crown_model(net, cfg, root / "tiny.onnx", post, {"real_f1_iou0.4": 0.0}, "tiny-test")
    save_state_dict(net, root / "tiny.pt")
    return scene, model


def test_suggest_writes_tiles_chips_and_an_empty_annotation_layer(site, tmp_path):
    scene, model = site
    rec = suggest_tiles(scene.ortho, tmp_path, model, n=3, threads=1)
    tiles = gpd.read_file(tmp_path / "suggested_tiles.gpkg", layer="tiles")
    assert list(tiles["rank"]) == [1, 2, 3] and len(set(tiles["tile_id"])) == 3
    assert rec["n_tiles_scored"] == 9 and rec["suggested"] == list(tiles["tile_id"])
    for col in ("score", "entropy", "tta_disagreement", "count_instability", "novelty"):
        assert col in tiles.columns
    assert tiles["model_disagreement"].isna().all()  # no second model: that expert sleeps
    assert tiles["entropy"].notna().all() and (tiles["score"] >= 0).all()
    assert all(g.area == pytest.approx(12.8 * 12.8) for g in tiles.geometry)
    for chip in tiles["chip"]:
        assert (tmp_path / chip).stat().st_size > 0 and (tmp_path / chip).with_suffix(".wld").exists()
    ann = gpd.read_file(tmp_path / "annotations.gpkg", layer="annotations")
    assert len(ann) == 0 and "species" in ann.columns and ann.crs == tiles.crs
    # spread: no two suggested tiles share an edge or a corner while others are left
    offs = list(zip(tiles["col_off"], tiles["row_off"], strict=True))
    assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 128
               for i, a in enumerate(offs) for b in offs[i + 1:])
    uni = suggest_tiles(scene.ortho, tmp_path / "u", model, n=3, method="uniform", seed=1, threads=1)
    assert uni["method"] == "uniform" and len(uni["suggested"]) == 3


def _draw_truth_in_tiles(scene, out, n_tiles: int) -> int:
    """What the user does in QGIS: draw every crown whose centre lies in the first suggested tiles; returns
    the number of those tiles holding at least one crown."""
    tiles = gpd.read_file(out / "suggested_tiles.gpkg", layer="tiles").sort_values("rank").head(n_tiles)
    truth = gpd.read_file(scene.truth, layer="crowns").to_crs(tiles.crs)
    inside = truth[truth.geometry.centroid.within(tiles.geometry.union_all())]
    ann = gpd.GeoDataFrame({"species": inside["species"].astype(str), "note": ""},
                           geometry=inside.geometry.values, crs=tiles.crs)
    ann.to_file(out / "annotations.gpkg", layer="annotations", driver="GPKG", engine="pyogrio")
    return int(sum(inside.geometry.centroid.within(g).any() for g in tiles.geometry))


def test_finetune_end_to_end_and_the_model_runs(site, tmp_path):
    scene, model = site
    runner = CliRunner()
    sug = tmp_path / "suggest"
    r = runner.invoke(app, ["suggest", str(scene.ortho), "--out", str(sug), "--n", "4",
                            "--crown-model", str(model), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert (sug / "suggested_tiles.gpkg").exists() and (sug / "annotations.gpkg").exists()
    n_drawn = _draw_truth_in_tiles(scene, sug, 4)
    assert n_drawn >= 3
    ft = tmp_path / "ft"
    r = runner.invoke(app, ["finetune", "--annotations", str(sug / "annotations.gpkg"), "--ortho",
                            str(scene.ortho), "--out", str(ft), "--model", str(model), "--steps", "4",
                            "--threads", "1", "--compress-target", "0.5", "--compress-steps", "2"])
    assert r.exit_code == 0, r.output
    rec = json.loads((ft / "finetune.json").read_text())
    assert rec["finetune"]["steps"] == 4 and rec["finetune"]["n_user_tiles"] == n_drawn
    from pipeline.onnx_model import OnnxModel

    m = OnnxModel(ft / "crowns-finetuned.onnx")
    assert m.meta.model_version.startswith("tiny-test+site-")
    assert f"fine-tuned from tiny-test on {n_drawn} annotated tiles" in m.meta.training_data
    assert "before_finetune_f1_iou0.4" in m.meta.validation_metrics
    assert json.loads(m.meta.raw["finetune"])["steps"] == 4
    assert (ft / "crowns-finetuned.pt").exists()
    state = torch.load(ft / "crowns-finetuned.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    comp = OnnxModel(ft / "crowns-finetuned-compressed.onnx")
    assert comp.meta.compression is not None and comp.meta.tile_size == 128
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", str(scene.ortho), "--crown-model", str(ft / "crowns-finetuned.onnx"),
                            "--out", str(run), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert (run / "summary.json").exists()


def test_finetune_without_drawn_crowns_is_a_one_line_input_error(site, tmp_path):
    scene, model = site
    suggest_tiles(scene.ortho, tmp_path, model, n=2, threads=1)
    r = CliRunner().invoke(app, ["finetune", "--annotations", str(tmp_path / "annotations.gpkg"), "--ortho",
                                 str(scene.ortho), "--out", str(tmp_path / "ft"), "--model", str(model)])
    assert r.exit_code == 2
    assert "no crown drawn yet" in r.output and len(r.output.strip().splitlines()) == 1


def test_detection_calibration_from_held_out_tiles():
    from affine import Affine  # noqa: F401 - the areas below are in the cases' pixel units x gsd
    from shapely.geometry import box

    from models.finetune import heldout_crown_areas
    from models.train_crowns import ValCase

    probs = np.zeros((3, 40, 40), np.float32)
    probs[0] = 1.0
    probs[:, 5:15, 5:15] = np.array([0.0, 1.0, 0.0])[:, None, None]  # one 10x10 px crown
    case = ValCase("a", probs, np.ones((40, 40), bool), [box(5, 5, 15, 15)], lambda x, y: True)
    ref, det = heldout_crown_areas([case], {"fg_threshold": 0.5, "interior_threshold": 0.3,
                                            "seed_min_distance_m": 0.5, "min_area_m2": 0.1}, 0.1)
    assert ref[0] == pytest.approx(np.pi / 4 * 1.0)  # ellipse in a 1 m x 1 m box
    assert det[0] == pytest.approx(1.0, rel=0.1)
