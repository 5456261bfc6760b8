"""report.html: self-contained structure (always) and rendering in headless Chromium (when installed)."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from affine import Affine
from PIL import Image
from shapely.geometry import Point

from pipeline.aggregate import assign_cells, grid_cells
from pipeline.carbon import CarbonConfig, estimate_carbon
from pipeline.export import crown_map_image, species_colours
from pipeline.onnx_model import ModelMeta
from pipeline.report import write_report
from pipeline.summary import model_record

CROWN_METRICS = {"real_f1_iou0.4": 0.4196, "real_precision_iou0.4": 0.4724, "real_recall_iou0.4": 0.3775,
                 "real_n_truth": 249.0, "site_OSBS_f1_iou0.4": 0.0, "site_OSBS_n_truth": 14.0,
                 "site_HARV_f1_iou0.4": 0.4516, "site_HARV_n_truth": 57.0}
COMPRESSION = {"method": "sbf", "target_ratio": 0.7, "budget": "macs", "achieved_ratio": 0.7001,
               "params_before": 702451, "params_after": 246171,
               "finetune": {"distillation": {"weight": 0.5}}}


def crown_meta(metrics=CROWN_METRICS, compression=COMPRESSION) -> ModelMeta:
    return ModelMeta(task="crown_segmentation", class_names=["background", "crown", "boundary"], gsd_m=0.1,
                     tile_size=512, bands=["red", "green", "blue"], model_version="crowns-r6-test",
                     overlap_px=120, training_data="NEON plots (test)", validation_metrics=dict(metrics),
                     compression=compression)


def crown_map(trees: pd.DataFrame, x0: float, y0: float) -> dict:
    """The report's crown map of the test trees: a 300 m x 200 m picture at 0.5 m, crowns as circles."""
    rng = np.random.default_rng(1)
    rgb = np.empty((3, 400, 600), np.uint8)
    rgb[:] = np.array([70, 90, 60], np.uint8)[:, None, None]
    rgb += rng.integers(0, 30, rgb.shape, dtype=np.uint8)
    geoms = [Point(x, y).buffer(np.sqrt(a / np.pi))
             for x, y, a in zip(trees["x"], trees["y"], trees["crown_area_m2"], strict=True)]
    crowns = gpd.GeoDataFrame(trees[["tree_id", "species"]].assign(tree_id=trees["tree_id"] + 1),
                              geometry=geoms, crs="EPSG:32617")
    transform = Affine(0.5, 0, x0, 0, -0.5, y0 + 200)
    return crown_map_image(rgb, np.ones((400, 600), bool), transform, crowns, max_px=900)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.attrs = []
        self.svg_titles = []
        self._in_svg_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v or "") for k, v in attrs)
        self._in_svg_title = tag == "title" and "svg" in self.tags[-3:]

    def handle_data(self, data):
        if self._in_svg_title:
            self.svg_titles.append(data)
            self._in_svg_title = False


SPECIES = ["Pinus palustris", "Quercus laevis", "Quercus <geminata>"]


def _report(tmp_path):
    rng = np.random.default_rng(0)
    n = 600
    x0, y0 = 400000.0, 3280000.0
    x, y = x0 + rng.uniform(0, 300, n), y0 + rng.uniform(0, 200, n)
    trees = pd.DataFrame({"tree_id": np.arange(n), "x": x, "y": y, "crown_area_m2": rng.uniform(4, 60, n),
                          "height_m": np.where(rng.random(n) < 0.2, np.nan, rng.uniform(8, 26, n)),
                          "height_source": "chm",
                          "species": rng.choice(SPECIES, n),
                          "species_prob": 0.9})
    grid = grid_cells((x0, y0, x0 + 300, y0 + 200), "EPSG:32617", 100.0)
    groups = {"cell": assign_cells(x, y, grid), "plot": np.where(x < x0 + 100, 0, -1)}
    res = estimate_carbon(trees, CarbonConfig(n_draws=300, area_ha=6.0), groups)
    record = model_record(Path("models/crowns-test.onnx"), crown_meta(), "abc123")
    summary = {**res.total, "standards": res.standards, "input": "synthetic <test>", "crs": "EPSG:32617",
               "co2e_t_ci90": [res.total["co2e_t_ci90_low"], res.total["co2e_t_ci90_high"]],
               "models": {"crowns-test": "abc123"}, "n_trees": n, "gsd_m": 0.1, "input_gsd_m": 0.05,
               "model_gsd_m": 0.1, "resampled_or_reprojected": True,
               "crown_model": record, "warnings": [record["caveat"], *res.warnings]}
    groups_named = dict(res.groups)
    groups_named["plot"] = res.groups["plot"].assign(plot_id="P1")  # as write_outputs names them
    path = tmp_path / "report.html"
    write_report(path, summary, res.trees, groups_named, grid=grid, carbon=res,
                 crown_map=crown_map(trees, x0, y0))
    return path


def test_report_is_self_contained_with_charts(tmp_path):
    path = _report(tmp_path)
    text = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert "script" not in parser.tags and "link" not in parser.tags
    assert parser.tags.count("img") == 1  # the crown map, inline
    for tag, key, value in parser.attrs:
        if key in ("src", "href") or (key == "xlink:href"):
            assert not re.match(r"^\s*(https?:|//|file:)", value), (tag, key, value)
            assert tag != "img" or value.startswith("data:image/jpeg;base64,"), (tag, key, value[:40])
    assert "@import" not in text and "url(" not in text
    assert parser.tags.count("svg") >= 5
    titles = " ".join(parser.svg_titles)
    for chart in ("Species composition", "height distribution", "stem diameter", "AGB per hectare map",
                  "Interval plot"):
        assert chart in titles, chart
    assert "0.0673" in text and "0.557" in text and "44/12" in text
    for rule in ("VM0047", "VMD0017", "ART-TREES"):
        assert rule in text
    assert "version in force" in text
    # issue 17: what the interval includes and what it does not, detection error stated, models named
    assert "What this interval includes and what it does not" in text
    assert "Detection error is not in the interval" in text
    assert "crowns-test.onnx" in text and "abc123" in text
    assert "HEIGHTS ARE ALLOMETRIC" in text  # 20 % of the trees have no CHM height
    assert "synthetic &lt;test&gt;" in text and "Quercus &lt;geminata&gt;" in text  # escaped


def _section(text: str, title: str) -> str:
    start = text.index(f"<h2>{title}</h2>")
    end = text.find("<h2>", start + 1)
    return text[start:end]


def test_report_names_the_models_and_their_accuracy(tmp_path):
    text = _report(tmp_path).read_text(encoding="utf-8")
    models = _section(text, "Models and their accuracy")
    assert "crowns-test" in models and "crowns-r6-test" in models and "abc123" in models
    assert "sbf, 70 % of the macs removed, parameters 702,451 -&gt; 246,171, distilled" in models
    assert "F1 0.420</b> at IoU 0.4 (precision 0.472, recall 0.378)" in models
    assert ">OSBS<" in models and ">HARV<" in models and "0.452" in models  # per-site scores
    # pooled F1 under 0.6: an explicit caveat, in the section and among the warnings at the top
    caveat = "pooled validation F1 of 0.42 at IoU 0.4 (below 0.6): the crown counts, and so the biomass"
    assert caveat in models and "see the model&#x27;s card" in models
    assert text.index(caveat) < text.index("<h2>Models and their accuracy</h2>")
    assert "input 0.050 m, crown model 0.100 m: segmented on a 0.100 m grid (resampled" in text


def test_model_record_caveat_threshold_and_missing_scores(tmp_path):
    good = model_record(Path("m.onnx"), crown_meta({"real_f1_iou0.4": 0.71}, None))
    assert good["caveat"] is None and good["compression_text"] == "none (dense)"
    assert good["accuracy"]["f1_iou0.4"] == 0.71 and good["accuracy"]["sites"] == {}
    unknown = model_record(Path("m.onnx"), crown_meta({}, None))
    assert unknown["accuracy"]["f1_iou0.4"] is None and "accuracy is unknown" in unknown["caveat"]
    (tmp_path / "CROWNS_MODEL_CARD.md").write_text("# card\n")
    low = model_record(tmp_path / "m.onnx", crown_meta())
    assert f"see {tmp_path / 'CROWNS_MODEL_CARD.md'}" in low["caveat"] and low["card"]


def test_report_counts_are_integers_and_plots_keep_their_names(tmp_path):
    text = _report(tmp_path).read_text(encoding="utf-8")
    totals = _section(text, "Totals by group")
    assert "<h3>per plot</h3>" in totals and "<td>P1</td>" in totals and "plot 0" not in text
    assert "plot P1" in text  # the interval chart's label
    counts = re.findall(r"<tr><td>[^<]*</td><td class=\"n\">([^<]*)</td>", totals)
    assert counts and all(re.fullmatch(r"[\d,]+", c) for c in counts), counts[:5]  # "38", not "38.0"


def test_report_crown_map_is_the_quicklook_picture(tmp_path):
    text = _report(tmp_path).read_text(encoding="utf-8")
    section = _section(text, "Crown map")
    uri = re.search(r'src="data:image/jpeg;base64,([^"]+)"', section).group(1)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
        assert im.format == "JPEG" and im.size == (900, 600)  # 600 x 400 px picture, enlarged whole
        px = np.asarray(im.convert("RGB")).astype(int)
    # crowns outlined in their species' colours (JPEG: colours near, not equal)
    for colour in (species_colours(SPECIES)[s] for s in SPECIES):
        near = (np.abs(px - np.array(colour)).sum(axis=2) < 60).sum()
        assert near > 200, colour
    assert (px.sum(axis=2) < 60).sum() > 100  # legend and scale-bar text and bars (black)
    assert "600 crowns outlined by species" in section


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on this machine")
    path = _report(tmp_path)
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3200", f"--screenshot={shot}",
           path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert shot.exists() and shot.stat().st_size > 10_000, log[-2000:]
    assert "Uncaught" not in log
    assert not re.search(r"CONSOLE\(\d+\)", log), log[-2000:]
    assert "ERR_FILE_NOT_FOUND" not in log and "net::ERR" not in log
    from PIL import Image

    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 10  # not a blank page
    # the map's greens and the bar colours are drawn
    assert ((px[..., 1] > px[..., 0] + 30) & (px[..., 1] > px[..., 2] + 20)).sum() > 500
    # the crown map is drawn in the page (its species outline colours appear), below the models section
    for colour in species_colours(SPECIES).values():
        assert (np.abs(px.astype(int) - np.array(colour)).sum(axis=2) < 60).sum() > 100, colour

