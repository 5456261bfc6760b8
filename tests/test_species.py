"""Species model: metrics on a hand-made case, crown chips, one training step, export + metadata."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.errors import InputError
from pipeline.evaluation.species import metrics_markdown, species_metrics
from pipeline.synthetic import SPECIES_NAMES, generate_scene

torch = pytest.importorskip("torch")


def test_metrics_on_a_hand_made_confusion():
    truth = ["A", "A", "A", "B", "B", "C"]
    pred = ["A", "A", "B", "B", "unknown", "C"]
    m = species_metrics(truth, pred, ["A", "B", "C"])
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.unknown_rate == pytest.approx(1 / 6)
    assert m.precision == pytest.approx({"A": 1.0, "B": 0.5, "C": 1.0})
    assert m.recall == pytest.approx({"A": 2 / 3, "B": 0.5, "C": 1.0})
    assert m.f1["A"] == pytest.approx(0.8)
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert m.confusion == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert m.columns[-1] == "unknown"
    md = metrics_markdown(m)
    assert "| B | 0.500 | 0.500 | 0.500 | 2 |" in md
    with pytest.raises(ValueError):
        species_metrics(["A"], ["A", "B"])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_scene(tmp_path_factory.mktemp("sp"), size_m=40, gsd_m=0.1, seed=5)


def test_chips_are_masked_to_the_crown_and_labelled(scene, tmp_path):
    from models.datasets.species_chips import cut_species_chips, read_labelled_crowns, spatial_split

    truth = read_labelled_crowns(scene.truth)
    chips = cut_species_chips(scene.ortho, truth, chip_px=32, chip_gsd_m=0.2, class_names=SPECIES_NAMES)
    assert chips.chips.shape == (len(truth), 3, 32, 32) and chips.chips.dtype == np.uint8
    assert [SPECIES_NAMES[i] for i in chips.labels] == list(truth["species"])
    # corners lie outside any crown whose half-width is below the 3.2 m half-chip: zero there
    small = (truth["crown_diameter_m"] < 4.0).to_numpy()
    if small.any():
        assert (chips.chips[small][:, :, 0, 0] == 0).all()
    assert (chips.chips[:, :, 16, 16] > 0).any(axis=1).mean() > 0.9  # the centroid pixel is crown
    # the same crowns in another CRS give (almost) the same chips: reprojected to the ortho's CRS
    path = tmp_path / "crowns_wgs84.gpkg"
    truth.to_crs("EPSG:4326").to_file(path)
    again = cut_species_chips(scene.ortho, read_labelled_crowns(path), chip_px=32, chip_gsd_m=0.2,
                              class_names=SPECIES_NAMES)
    diff = np.abs(again.chips.astype(int) - chips.chips.astype(int))
    assert (diff > 0).mean() < 0.02
    tr, va = spatial_split(chips, block_m=10.0, val_fraction=0.3, seed=0)
    assert len(tr) and len(va) and not set(tr) & set(va) and len(tr) + len(va) == len(chips)


def test_labelled_crowns_need_the_species_column(scene, tmp_path):
    from models.datasets.species_chips import read_labelled_crowns

    path = tmp_path / "nolabel.gpkg"
    gpd.read_file(scene.truth)[["tree_id", "geometry"]].to_file(path)
    with pytest.raises(InputError, match="species"):
        read_labelled_crowns(path)


def test_one_training_step_changes_the_weights(scene):
    from models.datasets.species_chips import cut_species_chips, read_labelled_crowns
    from models.train_species import SpeciesTrainConfig, train_loop

    data = cut_species_chips(scene.ortho, read_labelled_crowns(scene.truth), chip_px=32, chip_gsd_m=0.2,
                             class_names=SPECIES_NAMES)
    cfg = SpeciesTrainConfig(out_dir="unused", chip_px=32, epochs=1, batch_size=16, max_steps=1, threads=1)
    torch.manual_seed(0)
    from models.species_net import SpeciesNet, SpeciesNetConfig

    before = SpeciesNet(SpeciesNetConfig(n_classes=len(SPECIES_NAMES), chip_px=32)).state_dict()
    net, hist = train_loop(cfg, data, data, log=lambda _: None)
    after = net.state_dict()
    assert np.isfinite(hist["history"][0]["loss"])
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].dtype.is_floating_point)
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, len(SPECIES_NAMES))


def test_train_species_cli_exports_a_model_the_engine_reads(tmp_path):
    from forest_inventory.cli import app
    from pipeline.onnx_model import SPECIES_TASK, OnnxModel

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "species", "--out", str(out), "--train-seeds", "11", "--val-seed",
                                   "12", "--test-seed", "13", "--scene-size-m", "30", "--epochs", "1",
                                   "--chip-px", "32", "--threads", "1", "--model-version", "test-1"])
    assert res.exit_code == 0, res.output
    model = OnnxModel(out / "species.onnx", expected_task=SPECIES_TASK)
    assert model.meta.class_names == list(SPECIES_NAMES)
    assert model.meta.tile_size == 32 and model.meta.gsd_m == pytest.approx(0.2)
    assert model.meta.unknown_threshold == pytest.approx(0.4) and model.meta.model_version == "test-1"
    assert "test_seed13" in model.meta.validation_metrics
    probs = model.run(np.zeros((3, 3, 32, 32), dtype=np.uint8))
    assert probs.shape == (3, len(SPECIES_NAMES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["species"]["n"] > 0 and 0.0 <= metrics["species"]["macro_f1"] <= 1.0
    assert (out / "metrics.md").read_text().startswith("### Species")
    assert (out / "species.onnx").stat().st_size < 5_000_000
