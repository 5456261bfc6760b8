"""Plot datasets: whole plots split by site (never a plot on both sides), and a plot-split training run end
to end on a tiny generated set (two sites, a plot with two flights), without ../shared."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from models.datasets.splits import plot_split, plots_by_site, write_plot_split


def test_plot_split_is_stratified_whole_plot_and_seeded():
    plots = {"SJER": [f"SJER_{i:03d}" for i in range(31)], "HARV": [f"HARV_{i:03d}" for i in range(11)],
             "OSBS": ["OSBS_022", "OSBS_023", "OSBS_029", "OSBS_036"], "YELL": ["YELL_1"]}
    doc = plot_split(plots, 0.2, seed=0)
    val, train = set(doc["validation"]), set(doc["train"])
    assert not val & train  # no plot on both sides
    assert doc["excluded"] == ["OSBS_029"] and "OSBS_029" not in val | train
    per_site = {s: sum(p.startswith(s) for p in val) for s in plots}
    assert per_site == {"SJER": 6, "HARV": 2, "OSBS": 1, "YELL": 0}  # round(0.2 n), >= 1 from 2 plots on
    assert val | train | {"OSBS_029"} == {p for v in plots.values() for p in v}
    assert plot_split(dict(reversed(list(plots.items()))), 0.2, seed=0) == doc  # order-free
    assert plot_split(plots, 0.2, seed=1)["validation"] != doc["validation"]


def test_committed_split_covers_every_plot_once():
    """The committed list: every plot id appears on exactly one side; OSBS_029 on neither."""
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "models/data/neon_plots_split.json").read_text())
    val, train = doc["validation"], doc["train"]
    assert len(set(val)) == len(val) and len(set(train)) == len(train)
    assert not set(val) & set(train)
    assert all("029" not in p for p in val + train if p.startswith("OSBS"))
    sites = {p.split("_")[0] for p in val}
    assert sites == {"SJER", "TEAK", "HARV", "OSBS"}


def _plot_image(path, seed, centres):
    rng = np.random.default_rng(seed)
    img = rng.integers(150, 200, (3, 80, 80)).astype(np.uint8)  # bright open ground
    yy, xx = np.mgrid[0:80, 0:80]
    for cy, cx in centres:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2
        img[:, disc] = np.array([40, 100, 45], np.uint8)[:, None]
    with rasterio.open(path, "w", driver="GTiff", width=80, height=80, count=3, dtype="uint8",
                       crs="EPSG:32611", transform=from_origin(500000, 4100000, 0.1, 0.1)) as ds:
        ds.write(img)


@pytest.fixture
def plot_csv(tmp_path):
    rows = ["image_path,xmin,ymin,xmax,ymax,label,site,plot,year"]
    images = [("AAA_001.tif", "AAA", "AAA_001"), ("AAA_001_2017.tif", "AAA", "AAA_001"),
              ("AAA_002.tif", "AAA", "AAA_002"), ("BBB_001.tif", "BBB", "BBB_001"),
              ("BBB_002.tif", "BBB", "BBB_002"), ("OSBS_029.tif", "OSBS", "OSBS_029")]
    for k, (name, site, plot) in enumerate(images):
        centres = [(20, 20), (55, 50)]
        _plot_image(tmp_path / name, k, centres)
        for cy, cx in centres:
            rows.append(f"{name},{cx - 8},{cy - 8},{cx + 8},{cy + 8},Tree,{site},{plot},2018")
    (tmp_path / "annotations.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "annotations.csv"


def test_plot_dataset_trains_end_to_end_with_whole_plots_held_out(plot_csv, tmp_path):
    from models.train_crowns import TrainCrownsConfig, load_scenes, run_training

    assert plots_by_site([str(plot_csv)]) == {"AAA": ["AAA_001", "AAA_002"], "BBB": ["BBB_001", "BBB_002"],
                                              "OSBS": ["OSBS_029"]}
    split_path = tmp_path / "split.json"
    doc = write_plot_split([str(plot_csv)], str(split_path), 0.5, seed=0)
    assert len(doc["validation"]) == 2 and doc["excluded"] == ["OSBS_029"]
    cfg = TrainCrownsConfig(boxes=[], plot_csvs=[str(plot_csv)], plot_split=str(split_path),
                            out_dir=str(tmp_path / "ck"), iterations=2, batch_size=2, chip_px=32,
                            gsd_m=0.1, tile_size=64, overlap_px=16, warmup=1, threads=1,
                            savanna_fraction=0.0,
                            net={"arch": "unet", "encoder": "resnet18", "classes": 3,
                                 "decoder_channels": [16, 8, 8], "encoder_depth": 3})
    scenes = load_scenes(cfg)
    assert "OSBS_029" not in {s.name for s in scenes}  # excluded plot never loaded
    by_plot: dict[str, set[float]] = {}
    for s in scenes:
        by_plot.setdefault(s.plot, set()).add(s.weight)
        if s.plot in doc["validation"]:
            assert (s.target == 255).all()  # every pixel of a validation plot is withheld from training
    assert all(len(w) == 1 for w in by_plot.values())  # both flights of a plot on the same side
    res = run_training(cfg, tmp_path / "crowns.onnx", log=lambda m: None)
    metrics = res["validation"]
    assert "savanna_f1_iou0.4" not in metrics  # thresholds chosen on real validation plots only
    val_sites = {p.split("_")[0] for p in doc["validation"]}
    assert {f"site_{s}_f1_iou0.4" for s in val_sites} <= set(metrics)
    n_val_images = sum(s.plot in doc["validation"] for s in scenes)
    assert metrics["real_n_truth"] == 2 * n_val_images
    assert (tmp_path / "crowns.onnx").stat().st_size > 0
    # the compressed model gets thresholds of its own, chosen on the same validation plots
    import onnx

    from models.compression.crown_study import compress_crown_checkpoint
    from models.train_crowns import PARAM_GRID

    out = compress_crown_checkpoint(res["checkpoint"], "l1", 0.5, out=tmp_path / "c.onnx", threads=1,
                                    reference_onnx=tmp_path / "crowns.onnx", recalibrate=True,
                                    log=lambda m: None)
    meta = {p.key: p.value for p in onnx.load(out["onnx"]).metadata_props}
    assert set(json.loads(meta["postprocess"])) == set(PARAM_GRID)
    assert json.loads(meta["validation_metrics"])["postprocess_source"] == "own"


def test_learning_curve_keeps_a_share_of_each_sites_training_plots_only():
    from pathlib import Path

    from models.datasets.boxes import BoxSet
    from models.train_crowns import _plots_left_out

    sets = [BoxSet(Path(f"{p}.tif"), None, site, p)
            for site, n in (("A", 8), ("B", 3)) for p in (f"{site}_{i}" for i in range(n))]
    split = {"validation": {"A_0", "B_0"}, "train": set(), "excluded": {"A_7"}}
    dropped = _plots_left_out(sets, split, 0.5, seed=0)
    assert not dropped & (split["validation"] | split["excluded"])
    assert sum(p.startswith("A") for p in dropped) == 3  # 6 training plots of A, keep 3
    assert sum(p.startswith("B") for p in dropped) == 1  # 2 training plots of B, keep 1
    assert _plots_left_out(sets, split, 0.5, seed=0) == dropped
    assert _plots_left_out(sets, split, 1.0, seed=0) == set()


def test_ablation_row_reads_pooled_and_per_site_scores():
    from models.crown_ablations import ablation_table

    thr = {"0.4": {"f1": 0.5, "precision": 0.6, "recall": 0.4286}, "0.5": {"f1": 0.25}}
    res = {"pooled": {"thresholds": thr, "n_truth": 21},
           "sites": {"TEAK": {"thresholds": {"0.4": {"f1": 0.75}}}}}
    table = ablation_table([("base", res)]).splitlines()
    assert table[0].startswith("| run | pooled F1@0.4 |") and len(table) == 3
    assert table[2] == "| base | 0.500 | 0.600 / 0.429 | 0.250 | – | – | – | 0.750 | 21 |"


def test_detection_calibration_sums_a_plots_images_then_takes_the_pooled_ratio():
    from models.detection_calibration import detection_calibration_from_metrics, plot_crown_areas

    images = [{"image": "a/SJER_001.tif", "plot": "SJER_001", "truth_crown_area_m2": 30.0,
               "pred_crown_area_m2": 10.0},
              {"image": "a/SJER_001_2017.tif", "plot": "SJER_001", "truth_crown_area_m2": 30.0,
               "pred_crown_area_m2": 20.0},
              {"image": "a/TEAK_002.tif", "plot": "TEAK_002", "truth_crown_area_m2": 40.0,
               "pred_crown_area_m2": 50.0}]
    assert plot_crown_areas({"images": images}) == (["SJER_001", "TEAK_002"], [60.0, 40.0], [30.0, 50.0])
    cal = detection_calibration_from_metrics({"images": images})
    assert cal["quantity"] == "crown_area" and cal["n_plots"] == 2
    assert cal["ratio_mean"] == pytest.approx(100.0 / 80.0)  # pooled: sum reference / sum detected
    assert cal["ln_sd"] > 0 and "SJER_001" in cal["source"]


def test_validation_metrics_from_evaluate_flattens_pooled_and_site_scores():
    from models.detection_calibration import validation_metrics_from_evaluate

    block = {"n_truth": 10, "thresholds": {"0.4": {"f1": 0.5, "precision": 0.625, "recall": 0.41666},
                                           "0.5": {"f1": 0.25, "precision": 0.3, "recall": 0.2}}}
    out = validation_metrics_from_evaluate({"pooled": block, "sites": {"TEAK": block}, "truth": "a.csv",
                                            "postprocess": {"fg_threshold": 0.5}})
    assert out["real_f1_iou0.4"] == 0.5 and out["real_recall_iou0.4"] == 0.4167
    assert out["site_TEAK_precision_iou0.5"] == 0.3 and out["site_TEAK_n_truth"] == 10
    assert "a.csv" in out["source"] and out["postprocess"] == {"fg_threshold": 0.5}


def test_engine_overlap_covers_the_widest_crown_at_the_model_gsd():
    from models.train_crowns import TrainCrownsConfig, engine_overlap_px

    assert engine_overlap_px(TrainCrownsConfig(gsd_m=0.15)) == 80
    assert engine_overlap_px(TrainCrownsConfig(gsd_m=0.1)) == 120
    assert engine_overlap_px(TrainCrownsConfig(gsd_m=0.15, overlap_px=96)) == 96
    assert engine_overlap_px(TrainCrownsConfig(gsd_m=0.15, tile_size=64, overlap_px=16)) == 16  # test tiles
