"""Crown matching metrics on hand-made cases with known precision and recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from pipeline.evaluation.crowns import crown_metrics, match_crowns, metrics_markdown, pixel_iou, write_metrics


def test_known_precision_recall_at_two_thresholds():
    truth = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10), box(60, 0, 70, 10)]
    pred = [
        box(0, 0, 10, 10),  # IoU 1.0
        box(21, 0, 31, 10),  # IoU 9/11 = 0.818
        box(40, 0, 50, 4.5),  # IoU 0.45: a match at 0.4, not at 0.5
        box(100, 0, 110, 10),  # false positive
        box(200, 0, 210, 10),  # false positive
    ]
    m = crown_metrics(pred, truth)
    t4, t5 = m["thresholds"]["0.4"], m["thresholds"]["0.5"]
    assert (t4["tp"], t4["fp"], t4["fn"]) == (3, 2, 1)
    assert t4["precision"] == pytest.approx(3 / 5) and t4["recall"] == pytest.approx(3 / 4)
    assert t4["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert (t5["tp"], t5["fp"], t5["fn"]) == (2, 3, 2)
    assert t5["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    # area error over the 3 matches at 0.4: 0, 0, -0.55
    assert m["area_error"]["n"] == 3
    assert m["area_error"]["mean_rel"] == pytest.approx(-0.55 / 3)


def test_hungarian_finds_the_global_assignment():
    # greedy by best IoU would pair pred0 with truth1 and leave truth0 unmatched
    truth = [box(0, 0, 10, 10), box(6, 0, 16, 10)]
    pred = [box(4, 0, 14, 10), box(-1, 0, 9, 10)]
    pi, ti, iou = match_crowns(pred, truth)
    pairs = dict(zip(pi.tolist(), ti.tolist(), strict=True))
    assert pairs == {0: 1, 1: 0}
    assert np.all(iou > 0.5)


def test_one_prediction_covering_two_crowns_matches_at_most_one():
    truth = [box(0, 0, 10, 10), box(10, 0, 20, 10)]
    pred = [box(0, 0, 20, 10)]
    m = crown_metrics(pred, truth)
    assert m["thresholds"]["0.4"]["tp"] == 1 and m["thresholds"]["0.4"]["fn"] == 1
    assert m["thresholds"]["0.5"]["tp"] == 1  # IoU exactly 0.5
    assert m["pixel_iou"] == pytest.approx(1.0)


def test_empty_inputs_and_pixel_iou_masks():
    m = crown_metrics([], [box(0, 0, 1, 1)])
    assert m["thresholds"]["0.4"]["f1"] == 0.0 and m["thresholds"]["0.4"]["fn"] == 1
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert pixel_iou(a, b) == pytest.approx(4 / 12)


def test_json_and_markdown_written(tmp_path):
    m = crown_metrics([box(0, 0, 1, 1)], [box(0, 0, 1, 1)])
    jp, mp = write_metrics(m, tmp_path)
    assert json.loads(jp.read_text())["thresholds"]["0.4"]["f1"] == 1.0
    md = mp.read_text()
    assert "| 0.4 | 1 | 0 | 0 | 1.000 | 1.000 | 1.000 |" in md
    assert "| 0.4 |" in metrics_markdown(m)


def test_evaluate_runs_the_engine_on_a_disc_scene(tmp_path, write_geotiff, disc_scene):
    """End to end: GeoTIFF + boxes CSV -> engine crowns -> metrics; boxes and GeoPackage truth agree."""
    import geopandas as gpd
    from affine import Affine

    from models.datasets.boxes import boxes_to_polygons, read_boxes
    from pipeline.evaluation.run import evaluate_crowns_on_image
    from tests.tiny_models import write_crown_model

    discs = [(30, 30, 12), (30, 90, 10), (90, 40, 14), (95, 100, 11)]
    transform = Affine(0.1, 0, 400000, 0, -0.1, 3000000)
    write_geotiff(tmp_path / "o.tif", disc_scene(128, discs), transform, "EPSG:32617")
    rows = ["image_path,xmin,ymin,xmax,ymax,label"]
    rows += [f"o.tif,{c - r},{rr - r},{c + r},{rr + r},Tree" for rr, c, r in discs]
    rows.append("o.tif,2,110,14,122,Tree")  # a reference crown with no disc: one false negative
    (tmp_path / "truth.csv").write_text("\n".join(rows) + "\n")
    model = write_crown_model(tmp_path / "m.onnx", tile_size=128, overlap_px=48,
                              postprocess={"min_area_m2": 0.5, "seed_min_distance_m": 1.5})
    res = evaluate_crowns_on_image(tmp_path / "o.tif", tmp_path / "truth.csv", tmp_path / "eval",
                                   crown_model=model, threads=1)
    box = res["scores"]["box"]["thresholds"]["0.4"]
    assert box["tp"] == 4 and box["fn"] == 1 and box["fp"] == 0
    assert res["f1_iou0.4"] == pytest.approx(2 * 1.0 * 0.8 / 1.8)
    assert (tmp_path / "eval" / "crown_metrics.json").exists()
    assert (tmp_path / "eval" / "crown_metrics.md").exists()
    # the same references as polygons (inscribed ellipses in map coordinates) give the ellipse score
    ell = boxes_to_polygons(read_boxes(tmp_path / "truth.csv")[0].boxes, transform=transform)
    gpd.GeoDataFrame(geometry=ell, crs="EPSG:32617").to_file(tmp_path / "truth.gpkg")
    res2 = evaluate_crowns_on_image(tmp_path / "o.tif", tmp_path / "truth.gpkg", tmp_path / "eval2",
                                    crown_model=model, threads=1)
    assert res2["headline"] == "polygon"
    assert res2["scores"]["polygon"]["thresholds"]["0.4"] == res["scores"]["ellipse"]["thresholds"]["0.4"]


def _four_discs_with_boxes(tmp_path, write_geotiff, disc_scene) -> None:
    """o.tif: four crown discs (radius 1.0-1.4 m at 0.1 m, EPSG:32617) and truth.csv: their boxes."""
    from affine import Affine

    discs = [(30, 30, 12), (30, 90, 10), (90, 40, 14), (95, 100, 11)]
    write_geotiff(tmp_path / "o.tif", disc_scene(128, discs), Affine(0.1, 0, 400000, 0, -0.1, 3000000),
                  "EPSG:32617")
    rows = ["image_path,xmin,ymin,xmax,ymax,label"] + [
        f"o.tif,{c - r},{rr - r},{c + r},{rr + r},Tree" for rr, c, r in discs]
    (tmp_path / "truth.csv").write_text("\n".join(rows) + "\n")


def test_evaluate_cli_with_tta(tmp_path, write_geotiff, disc_scene):
    """`forest-inventory evaluate --tta`: the tiny model is per-pixel, so the four views give the same
    crowns; the metrics record that TTA was on."""
    import json

    from typer.testing import CliRunner

    from forest_inventory.cli import app
    from tests.tiny_models import write_crown_model

    _four_discs_with_boxes(tmp_path, write_geotiff, disc_scene)
    model = write_crown_model(tmp_path / "m.onnx", tile_size=128, overlap_px=48,
                              postprocess={"min_area_m2": 0.5, "seed_min_distance_m": 1.5})
    args = ["evaluate", str(tmp_path / "o.tif"), "--truth", str(tmp_path / "truth.csv"), "--crown-model",
            str(model), "--out", str(tmp_path / "ev"), "--threads", "1", "--tta"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "crown_metrics.json").read_text())
    assert metrics["tta"] is True and metrics["f1_iou0.4"] == 1.0
    assert "test-time augmentation" in (tmp_path / "ev" / "crown_metrics.md").read_text()


def test_evaluate_cli_compare_to_a_baseline_model(tmp_path, write_geotiff, disc_scene):
    """`--compare-to`: the F1 difference against a baseline model on the same references, with its
    bootstrap interval; a missing baseline is a one-line error (exit 2)."""
    import json

    from typer.testing import CliRunner

    from forest_inventory.cli import app
    from tests.tiny_models import write_crown_model

    _four_discs_with_boxes(tmp_path, write_geotiff, disc_scene)
    base = write_crown_model(tmp_path / "base.onnx", tile_size=128, overlap_px=48,
                             postprocess={"min_area_m2": 0.5, "seed_min_distance_m": 1.5})
    # the same network with a minimum crown area above the smallest disc's (pi * 1 m^2): 3 of 4 crowns
    strict = write_crown_model(tmp_path / "strict.onnx", tile_size=128, overlap_px=48,
                               postprocess={"min_area_m2": 3.5, "seed_min_distance_m": 1.5})
    args = ["evaluate", str(tmp_path / "o.tif"), "--truth", str(tmp_path / "truth.csv"), "--crown-model",
            str(strict), "--out", str(tmp_path / "ev"), "--threads", "1", "--block-m", "5",
            "--compare-to", str(base)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    paired = json.loads((tmp_path / "ev" / "crown_metrics.json").read_text())["paired"]
    assert paired["f1_a"] == 1.0 and paired["f1_b"] == pytest.approx(6 / 7)
    assert paired["delta_points"] == pytest.approx(100 * (6 / 7 - 1))
    # one crown in each of 4 blocks of 5 m: resamples missing the lost crown's block, (3/4)^4, tie
    assert paired["n_blocks"] == 4 and paired["share_within_tolerance"] == pytest.approx(0.75**4, abs=0.03)
    assert paired["ci_points"][1] == pytest.approx(0.0) and paired["baseline_model"] == str(base)
    assert "-14.3 F1 points" in res.output
    assert "Against the baseline" in (tmp_path / "ev" / "crown_metrics.md").read_text()
    missing = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2 and "nope.onnx: baseline crown model not found" in missing.output


# --- multi-image evaluation (pipeline.evaluation.multi) ---


def _image_boxes(image, site, plot, boxes):
    from pipeline.evaluation.multi import ImageBoxes

    return ImageBoxes(image=Path(image), site=site, plot=plot,
                      boxes=np.asarray(boxes, float).reshape(-1, 4))


def test_multi_image_scores_sum_counts_per_site_and_pooled():
    """Site A: 2 TP, 1 FP; site B: 1 TP, 2 FN (one image each) -> pooled TP 3, FP 1, FN 2:
    P = 3/4, R = 3/5, F1 = 2/3 at IoU 0.4. At IoU 0.5 the loose site-B match (IoU 0.45) fails."""
    from pipeline.evaluation.multi import score_images

    a = _image_boxes("a.tif", "A", "A_1", [[0, 0, 10, 10], [20, 0, 30, 10]])
    b = _image_boxes("b.tif", "B", "B_1", [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]])
    pred_a = [box(0, 0, 10, 10), box(21, 0, 31, 10), box(100, 100, 110, 110)]  # IoU 1, 0.82; one FP
    pred_b = [box(0, 0, 10, 4.5)]  # IoU 0.45 with the first box; two references unmatched
    res = score_images([a, b], [pred_a, pred_b])
    sa, sb = res["sites"]["A"]["thresholds"]["0.4"], res["sites"]["B"]["thresholds"]["0.4"]
    assert (sa["tp"], sa["fp"], sa["fn"]) == (2, 1, 0) and sa["precision"] == pytest.approx(2 / 3)
    assert (sb["tp"], sb["fp"], sb["fn"]) == (1, 0, 2) and sb["recall"] == pytest.approx(1 / 3)
    p4 = res["pooled"]["thresholds"]["0.4"]
    assert (p4["tp"], p4["fp"], p4["fn"]) == (3, 1, 2)
    assert p4["precision"] == pytest.approx(3 / 4) and p4["recall"] == pytest.approx(3 / 5)
    assert p4["f1"] == pytest.approx(2 / 3)
    p5 = res["pooled"]["thresholds"]["0.5"]
    assert (p5["tp"], p5["fp"], p5["fn"]) == (2, 2, 3) and p5["f1"] == pytest.approx(2 * 2 / (4 + 5))
    assert res["pooled"]["n_images"] == 2 and res["pooled"]["n_truth"] == 5 and res["pooled"]["n_pred"] == 4
    assert [r["site"] for r in res["images"]] == ["A", "B"]


def test_pooled_is_a_micro_average_not_a_mean_of_images():
    """Two images of one site: 1/1 correct and 0/3 found -> pooled recall 1/4, not (1 + 0) / 2."""
    from pipeline.evaluation.multi import aggregate_scores

    def rec(tp, fp, fn):
        return {"site": "S", "n_pred": tp + fp, "n_truth": tp + fn,
                "thresholds": {"0.4": {"tp": tp, "fp": fp, "fn": fn}}}

    res = aggregate_scores([rec(1, 0, 0), rec(0, 0, 3), {**rec(0, 2, 0), "site": None}])
    s = res["sites"]["S"]["thresholds"]["0.4"]
    assert s["recall"] == pytest.approx(1 / 4) and s["precision"] == 1.0
    assert res["sites"]["unknown"]["thresholds"]["0.4"]["precision"] == 0.0
    assert res["pooled"]["thresholds"]["0.4"]["precision"] == pytest.approx(1 / 3)


def test_box_table_split_and_plot_selection(tmp_path):
    """Sites and plots from the CSV (missing site -> unknown; missing plot -> image stem; an empty row is an
    image with no reference), a split file's validation plots, both flights of a plot selected together."""
    from pipeline.errors import InputError
    from pipeline.evaluation.multi import read_box_table, read_split, select_images

    (tmp_path / "t.csv").write_text(
        "image_path,xmin,ymin,xmax,ymax,label,site,plot\n"
        "p1.tif,0,0,10,10,Tree,SJER,SJER_1\n"
        "p1_2017.tif,0,0,10,10,Tree,SJER,SJER_1\n"
        "p1_2017.tif,5,5,9,9,Tree,SJER,SJER_1\n"
        "p2.tif,0,0,10,10,Tree,,\n"
        "p3.tif,,,,,,TEAK,TEAK_3\n")
    images = read_box_table(tmp_path / "t.csv")
    assert [(i.image.name, i.site, i.plot, len(i.boxes)) for i in images] == [
        ("p1.tif", "SJER", "SJER_1", 1), ("p1_2017.tif", "SJER", "SJER_1", 2), ("p2.tif", "unknown", "p2", 1),
        ("p3.tif", "TEAK", "TEAK_3", 0)]
    assert images[0].image == tmp_path / "p1.tif"
    (tmp_path / "split.json").write_text(json.dumps({"validation": ["SJER_1", "YELL_9"], "train": ["p2"]}))
    chosen, missing = select_images(images, read_split(tmp_path / "split.json"), tmp_path / "t.csv")
    assert [i.image.name for i in chosen] == ["p1.tif", "p1_2017.tif"] and missing == ["YELL_9"]
    chosen, _ = select_images(images, read_split(tmp_path / "split.json", "train"), tmp_path / "t.csv")
    assert [i.image.name for i in chosen] == ["p2.tif"]
    with pytest.raises(InputError, match="t.csv: none of the 1 selected plots"):
        select_images(images, ["HARV_1"], tmp_path / "t.csv")
    with pytest.raises(InputError, match='split.json: no list of plot ids under "validation"'):
        (tmp_path / "split.json").write_text(json.dumps({"test": []}))
        read_split(tmp_path / "split.json")


def _two_site_scene(tmp_path, write_geotiff, disc_scene) -> None:
    """a.tif (site A): four discs, four boxes. b.tif (site B, another CRS and origin): three discs, boxes on
    two of them plus one box on bare ground -> at IoU 0.4 A: 4 TP; B: 2 TP, 1 FP, 1 FN."""
    from affine import Affine

    da = [(30, 30, 12), (30, 90, 10), (90, 40, 14), (95, 100, 11)]
    db = [(30, 30, 12), (90, 90, 14), (90, 30, 10)]
    write_geotiff(tmp_path / "a.tif", disc_scene(128, da), Affine(0.1, 0, 400000, 0, -0.1, 3000000),
                  "EPSG:32617")
    (tmp_path / "img").mkdir()
    write_geotiff(tmp_path / "img" / "b.tif", disc_scene(128, db), Affine(0.1, 0, 250000, 0, -0.1, 4100000),
                  "EPSG:32611")
    rows = ["image_path,xmin,ymin,xmax,ymax,label,site,plot"]
    rows += [f"a.tif,{c - r},{rr - r},{c + r},{rr + r},Tree,A,A_001" for rr, c, r in da]
    rows += [f"img/b.tif,{c - r},{rr - r},{c + r},{rr + r},Tree,B,B_002" for rr, c, r in db[:2]]
    rows.append("img/b.tif,100,2,120,22,Tree,B,B_002")  # no disc: a false negative
    (tmp_path / "truth.csv").write_text("\n".join(rows) + "\n")


def test_evaluate_on_csv_two_images_known_answer(tmp_path, write_geotiff, disc_scene):
    """Two GeoTIFFs in two CRSs through the engine (tiny per-pixel model): boxes are compared in each
    image's own pixel grid; per-site and pooled counts are the hand counts."""
    from pipeline.evaluation.multi import evaluate_crowns_on_csv
    from tests.tiny_models import write_crown_model

    _two_site_scene(tmp_path, write_geotiff, disc_scene)
    model = write_crown_model(tmp_path / "m.onnx", tile_size=128, overlap_px=48,
                              postprocess={"min_area_m2": 0.5, "seed_min_distance_m": 1.5})
    res = evaluate_crowns_on_csv(tmp_path / "truth.csv", tmp_path / "ev", crown_model=model, threads=1)
    a, b = res["sites"]["A"]["thresholds"]["0.4"], res["sites"]["B"]["thresholds"]["0.4"]
    assert (a["tp"], a["fp"], a["fn"]) == (4, 0, 0)
    assert (b["tp"], b["fp"], b["fn"]) == (2, 1, 1)
    p = res["pooled"]["thresholds"]["0.4"]
    assert (p["tp"], p["fp"], p["fn"]) == (6, 1, 1) and res["f1_iou0.4"] == pytest.approx(6 / 7)
    assert res["pooled"]["n_images"] == 2 and res["missing_plots"] == []
    saved = json.loads((tmp_path / "ev" / "crown_metrics.json").read_text())
    assert saved["sites"]["B"]["thresholds"]["0.4"]["f1"] == pytest.approx(2 / 3)
    assert "| **pooled** | 2 | 7 | 7 |" in (tmp_path / "ev" / "crown_metrics.md").read_text()


def test_evaluate_cli_multi_image_with_split(tmp_path, write_geotiff, disc_scene):
    """`forest-inventory evaluate --truth CSV` (no image): per-site JSON; `--split --subset validation`
    scores the validation plots only; `--compare-to` gives the pooled difference over plots."""
    from typer.testing import CliRunner

    from forest_inventory.cli import app
    from tests.tiny_models import write_crown_model

    _two_site_scene(tmp_path, write_geotiff, disc_scene)
    model = write_crown_model(tmp_path / "m.onnx", tile_size=128, overlap_px=48,
                              postprocess={"min_area_m2": 0.5, "seed_min_distance_m": 1.5})
    args = ["evaluate", "--truth", str(tmp_path / "truth.csv"), "--crown-model", str(model), "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "all" / "crown_metrics.json").read_text())
    assert set(saved["sites"]) == {"A", "B"} and saved["f1_iou0.4"] == pytest.approx(6 / 7)
    assert "pooled" in res.output and "0.857" in res.output
    (tmp_path / "split.json").write_text(json.dumps({"validation": ["B_002"], "train": ["A_001"]}))
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "val"), "--split",
                                   str(tmp_path / "split.json"), "--subset", "validation", "--compare-to",
                                   str(model)])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "val" / "crown_metrics.json").read_text())
    assert list(saved["sites"]) == ["B"] and saved["f1_iou0.4"] == pytest.approx(2 / 3)
    assert saved["selection"] == "validation plots of split.json"
    assert saved["paired"]["delta_points"] == 0.0 and saved["paired"]["n_blocks"] == 1
    assert saved["baseline"]["pooled"]["thresholds"]["0.4"]["f1"] == pytest.approx(2 / 3)


def test_evaluate_cli_multi_image_bad_inputs(tmp_path):
    """A CSV missing a box column, a missing image, a bad subset: exit 2 with one line naming the file."""
    from typer.testing import CliRunner

    from forest_inventory.cli import app

    (tmp_path / "t.csv").write_text("image_path,xmin,ymin,xmax,label,site\na.tif,0,0,10,Tree,A\n")
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "t.csv"), "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "t.csv: missing column(s) ymax" in res.output
    assert "Traceback" not in res.output
    (tmp_path / "t.csv").write_text("image_path,xmin,ymin,xmax,ymax\nnope.tif,0,0,10,10\n")
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "t.csv"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "t.csv: 1 image(s) not found" in res.output
    (tmp_path / "t.csv").write_text("image_path,xmin,ymin,xmax,ymax\n")
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "t.csv"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "t.csv: no rows" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "t.csv"), "--split",
                                   str(tmp_path / "s.json"), "--subset", "test"])
    assert res.exit_code == 2 and "--subset 'test'" in res.output
