"""Issue 18: the notebook API (forest_inventory.api): the README's example runs as written on a generated
scene, and the plot helper draws known crowns in known colours."""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from rasterio.transform import from_origin
from shapely.geometry import box

import forest_inventory as fi
from pipeline.errors import InputError
from tests.conftest import _write_geotiff

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_notebook_block() -> str:
    """The python code block of the README's "Notebook API" section."""
    text = README.read_text()
    section = text[text.index("### Notebook API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_example_runs(tmp_path, monkeypatch):
    from pipeline.synthetic import generate_scene

    scene = generate_scene(tmp_path / "scene", size_m=40, seed=5)
    code = readme_notebook_block()
    assert "sample_data/OSBS_029.tif" in code and "fi.plot_crowns" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # the README's code, on a generated scene instead of the sample image; default (zoo) models
    exec(compile(code.replace("sample_data/OSBS_029.tif", str(scene.ortho)), "README.md", "exec"), namespace)
    inv = namespace["inv"]
    assert isinstance(inv, fi.Inventory) and isinstance(inv.crowns, gpd.GeoDataFrame)
    assert len(inv.crowns) == inv.summary["n_trees"] > 0
    assert inv.crowns.crs.to_epsg() == 32617
    assert inv.summary["carbon"]["carbon_config"]["n_draws"] == 10000  # the keyword reached the Monte Carlo
    assert inv.out_dir == Path("out/notebook") and (tmp_path / "out/notebook/crowns.geojson").is_file()
    assert inv.crowns["co2e_kg"].sum() == pytest.approx(inv.summary["co2e_t"] * 1000, rel=1e-6)
    image = fi.plot_crowns(inv, by="co2e_kg", max_px=200)
    assert image.size == (200, 200)
    again = fi.load_inventory(tmp_path / "out/notebook")
    assert again.summary == inv.summary and len(again.crowns) == len(inv.crowns)


def test_inventory_refuses_unknown_options_before_work(tmp_path):
    with pytest.raises(InputError, match="unknown option 'n_draw'.*did you mean 'n_draws'"):
        fi.inventory(tmp_path / "missing.tif", out=tmp_path / "o", n_draw=10)
    assert not (tmp_path / "o").exists()


def test_plot_crowns_draws_each_species_in_its_colour(tmp_path):
    # a grey 100 x 100 px image at 0.1 m and two square crowns of known species
    transform = from_origin(500000.0, 4000000.0, 0.1, 0.1)
    ortho = _write_geotiff(tmp_path / "grey.tif", np.full((3, 100, 100), 128, np.uint8), transform,
                           "EPSG:32617")
    crowns = gpd.GeoDataFrame({"species": ["Pinus palustris", "Quercus laevis"], "co2e_kg": [10.0, 30.0]},
                              geometry=[box(500001.0, 3999995.0, 500004.0, 3999998.0),
                                        box(500006.0, 3999992.0, 500009.0, 3999995.0)], crs="EPSG:32617")
    inv = fi.Inventory(crowns=crowns, summary={"input": str(ortho), "bands": [1, 2, 3]}, out_dir=tmp_path)
    image = np.asarray(fi.plot_crowns(inv, by="species", width_px=1))
    colours = fi.api._category_colours(list(crowns["species"]))
    # the left edge of each square (x = 1 m -> column 10; x = 6 m -> column 60), halfway down it
    assert tuple(image[35, 10]) == colours["Pinus palustris"]
    assert tuple(image[65, 60]) == colours["Quercus laevis"]
    assert tuple(image[35, 25]) == (128, 128, 128)  # inside a crown: the image
    ramp = np.asarray(fi.plot_crowns(inv, by="co2e_kg", width_px=1))
    assert tuple(ramp[35, 10]) != tuple(ramp[65, 60])  # low and high CO2e on the two ends of the ramp
    with pytest.raises(InputError, match="no column 'carbon'"):
        fi.plot_crowns(inv, by="carbon")
