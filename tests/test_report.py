"""report.html: self-contained structure (always) and rendering in headless Chromium (when installed)."""

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from pipeline.aggregate import assign_cells, grid_cells
from pipeline.carbon import CarbonConfig, estimate_carbon
from pipeline.report import write_report


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
    summary = {**res.total, "standards": res.standards, "input": "synthetic <test>", "crs": "EPSG:32617",
               "co2e_t_ci90": [res.total["co2e_t_ci90_low"], res.total["co2e_t_ci90_high"]],
               "models": {"crowns-test": "abc123"},
               "crown_model": {"path": "models/crowns-test.onnx", "version": "t1"}, "warnings": res.warnings}
    path = tmp_path / "report.html"
    write_report(path, summary, res.trees, res.groups, grid=grid, carbon=res)
    return path


def test_report_is_self_contained_with_charts(tmp_path):
    path = _report(tmp_path)
    text = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags
    for tag, key, value in parser.attrs:
        if key in ("src", "href") or (key == "xlink:href"):
            assert not re.match(r"^\s*(https?:|//|file:)", value), (tag, key, value)
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
           "--no-first-run", "--disable-background-networking", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400", f"--screenshot={shot}",
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
