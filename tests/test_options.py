"""Issue 18: one run options model (pipeline.options) behind the CLI flags, the TOML config file, the flows
and the Python API; checked before any work; CLI conventions (help, --version, logging flags).

Scenes are generated here (pipeline.synthetic.generate_scene, 40 m) and inventoried with the tiny ONNX
models of tests/tiny_models.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forest_inventory.cli import app
from forest_inventory.logs import reset_logging
from pipeline.errors import InputError
from pipeline.inventory import InventoryConfig
from pipeline.options import available_cores, config_template, load_config_file, make_config, options
from tests.flows.conftest import output_digest
from tests.tiny_models import write_crown_model, write_species_model


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from pipeline.synthetic import generate_scene

    d = tmp_path_factory.mktemp("scene")
    files = generate_scene(d / "scene", size_m=40, seed=3)
    return {"ortho": files.ortho, "chm": files.chm, "crown": write_crown_model(d / "crowns.onnx"),
            "species": write_species_model(d / "species.onnx")}


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def base_args(scene, out: Path) -> list[str]:
    return ["run", str(scene["ortho"]), "--out", str(out), "--crown-model", str(scene["crown"]),
            "--species-model", str(scene["species"]), "--threads", "1"]


# --- the options model ---


def test_template_loads_back_to_the_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(config_template())
    values = load_config_file(path)
    assert values["n_draws"] == 1000 and values["cell_m"] == 100.0 and values["tta"] is False
    config = make_config({**values, "ortho": "a.tif", "out_dir": "out"})
    default = InventoryConfig(ortho=Path("a.tif"), out_dir=Path("out"))
    assert dataclasses.replace(config, carbon={}) == default  # top-level options: exactly the defaults
    from pipeline.carbon.estimate import CarbonConfig

    assert CarbonConfig(**config.carbon).as_dict() == CarbonConfig().as_dict()  # carbon: the defaults too


def test_every_inventory_config_field_is_an_option_and_a_flag():
    # generic: a field added to InventoryConfig (e.g. overwrite) becomes a key and a `run` flag by itself
    fields = {f.name for f in dataclasses.fields(InventoryConfig)} - {"carbon", "postprocess"}
    assert fields <= set(options())
    help_text = invoke(["run", "--help"]).stdout
    for key in fields - {"ortho"}:
        assert options()[key].flags[0].split("/")[0] in help_text, key


@pytest.mark.parametrize("kwargs, words", [
    ({"carbon": {"n_draw": 5}}, ("'n_draw'", "did you mean 'n_draws'", "allowed:")),
    ({"carbon": {"ecozone": "tundra"}}, ("ecozone", "'tundra'", "boreal", "temperate_conifer")),
    ({"carbon": {"agb_model": "x"}}, ("agb_model", "chave2014_eq4", "jucker2017_hcd")),
    ({"postprocess": {"fg": 0.3}}, ("'fg'", "fg_threshold")),
    ({"postprocess": {"fg_threshold": 1.5}}, ("fg_threshold", "0-1")),
    ({"threads": 100000}, ("threads", "100000", f"1 to {available_cores()}")),
    ({"threads": -1}, ("threads", "-1", f"1 to {available_cores()}")),
    ({"cell_m": 0}, ("cell_m", "above 0")),
])
def test_python_config_fails_on_construction_with_one_line(kwargs, words):
    # before: an unknown carbon key was a raw TypeError after segmentation had run
    with pytest.raises(InputError) as err:
        InventoryConfig(ortho="a.tif", out_dir="out", **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_flat_and_nested_options_agree():
    flat = make_config({"ortho": "a.tif", "out_dir": "o", "n_draws": 50, "fg_threshold": 0.4,
                        "carbon_fraction": 0.48, "hd_local": "0.9,0.7,0,0.2"})
    nested = make_config({"ortho": "a.tif", "out_dir": "o", "carbon": {
        "n_draws": 50, "carbon_fraction": {"angiosperm": 0.48, "gymnosperm": 0.48},
        "hd_local": {"a": 0.9, "b": 0.7, "c": 0, "rse": 0.2}}, "postprocess": {"fg_threshold": 0.4}})
    assert flat == nested
    assert flat.carbon["hd_model"] == "local"  # a local fit given is the fit used


# --- the CLI ---


def test_run_sets_the_carbon_and_crown_options_by_flag(tmp_path, scene):
    out = tmp_path / "o"
    res = invoke(base_args(scene, out) + ["--n-draws", "64", "--ecozone", "boreal", "--wood-density-region",
                                          "europe", "--agb-model", "jucker2017_hcd", "--carbon-fraction",
                                          "0.5", "--cell-m", "20", "--fg-threshold", "0.45", "--seed", "7"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    carbon = summary["carbon"]["carbon_config"]
    assert carbon["n_draws"] == 64 and carbon["ecozone"] == "boreal"
    assert carbon["agb_model"] == "jucker2017_hcd"
    assert carbon["wood_density_region"] == "europe" and carbon["seed"] == 7
    assert carbon["carbon_fraction"] == {"angiosperm": 0.5, "gymnosperm": 0.5}
    assert summary["crown_model"]["postprocess"]["fg_threshold"] == 0.45
    assert "64 draws" in res.stdout
    # the ART-TREES rule states the draws the run used (it said "10,000 draws" after a 1,000-draw run)
    assert "64 draws; ART-TREES asks for 10,000" in json.dumps(summary["standards"])


@pytest.mark.parametrize("toml, words", [
    ("[carbon]\nn_draw = 10000\n", ("'n_draw'", "[carbon]", "did you mean 'n_draws'")),
    ("[carbon]\necozone = 'tundra'\n", ("ecozone", "'tundra'", "boreal")),
    ("threads = 100000\n", ("threads", "100000")),
    ("cell = 50\n", ("'cell'", "cell_m")),
    ("n_draws = \n", ("not valid TOML",)),
])
def test_bad_config_file_fails_before_any_work(tmp_path, scene, toml, words):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    out = tmp_path / "o"
    res = invoke(base_args(scene, out) + ["--config", str(config)])
    assert res.exit_code == 2, res.output
    assert len(error_lines(res)) == 1 and "Traceback" not in res.output
    for word in words + ("run.toml",):
        assert word in error_lines(res)[0], (word, res.stderr)
    assert not out.exists()  # nothing ran, not even the output folder


@pytest.mark.parametrize("value", ["100000", "-1", "0"])
def test_threads_out_of_range_is_refused_up_front(tmp_path, scene, value):
    res = invoke(base_args(scene, tmp_path / "o")[:-2] + ["--threads", value])
    assert res.exit_code == 2
    assert error_lines(res) == [f"error: option threads = {int(value)} (--threads): this machine has "
                                f"{available_cores()} CPU core(s): use 1 to {available_cores()}, or leave "
                                "it unset for all cores"]
    assert not (tmp_path / "o").exists()


def test_config_file_and_flags_give_identical_outputs(tmp_path, scene):
    options_given = {"n_draws": 80, "seed": 5, "ecozone": "temperate_broadleaf", "cell_m": 20.0,
                     "fg_threshold": 0.45}
    config = tmp_path / "run.toml"
    config.write_text(f'crown_model = "{scene["crown"]}"\nspecies_model = "{scene["species"]}"\n'
                      f'threads = 1\nseed = 5\ncell_m = 20.0\nchm = "{scene["chm"]}"\n'
                      '[postprocess]\nfg_threshold = 0.45\n'
                      '[carbon]\nn_draws = 80\necozone = "temperate_broadleaf"\n')
    assert {k: v for k, v in load_config_file(config).items() if k in options_given} == options_given
    by_file = invoke(["run", str(scene["ortho"]), "--out", str(tmp_path / "a"), "--config", str(config)])
    by_flags = invoke(base_args(scene, tmp_path / "b") + [
        "--chm", str(scene["chm"]), "--seed", "5", "--cell-m", "20", "--fg-threshold", "0.45",
        "--n-draws", "80", "--ecozone", "temperate_broadleaf"])
    assert by_file.exit_code == 0 and by_flags.exit_code == 0, by_file.output + by_flags.output
    a, b = output_digest(tmp_path / "a"), output_digest(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) >= 8
    assert a == b  # byte-identical apart from the run's time (and the output path) in summary/report
    # a flag overrides the file
    over = invoke(["run", str(scene["ortho"]), "--out", str(tmp_path / "c"), "--config", str(config),
                   "--n-draws", "40"])
    assert over.exit_code == 0, over.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["carbon"]["carbon_config"]["n_draws"] == 40 and summary["seed"] == 5


def test_config_command_prints_and_checks(tmp_path):
    res = invoke(["config", "--print-defaults"])
    assert res.exit_code == 0
    doc = tomllib.loads(res.stdout)
    assert doc["carbon"]["n_draws"] == 1000 and "postprocess" in doc
    assert "# Monte Carlo draws (use 10000 for reported numbers" in res.stdout
    path = tmp_path / "run.toml"
    path.write_text(res.stdout)
    assert invoke(["config", "--check", str(path)]).exit_code == 0
    path.write_text("[carbon]\nn_draws = 1\n")
    bad = invoke(["config", "--check", str(path)])
    assert bad.exit_code == 2 and "n_draws" in error_lines(bad)[0] and "at least 2" in error_lines(bad)[0]


def test_help_shows_defaults_flags_and_metavars():
    text = invoke(["run", "--help"]).stdout
    flat = " ".join(text.split())
    assert "Usage: " in text and "[OPTIONS] ORTHO" in flat and "{ortho}" not in text.lower()
    assert "<str>" not in text and "<bool>" not in text and "<int>" not in text
    assert "Crown ONNX model (unset: models/zoo/crowns.onnx)." in flat  # the bracket text was eaten before
    assert re.search(r"--n-draws, --draws N\s+Monte Carlo draws", text)
    for default in ("[default: 1000]", "[default: 100.0]", "[default: subtropical_humid_forest]"):
        assert default in flat
    assert "--tta / --no-tta" in text and "--species / --no-species" in text  # flags, not values
    assert "--threads N" in text and "--bands R,G,B" in text and "--log-file PATH" in text
    evaluate = " ".join(invoke(["evaluate", "--help"]).stdout.split())
    assert "--debug Show tracebacks." in evaluate


def test_version():
    from forest_inventory import __version__

    res = invoke(["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"forest-inventory {__version__}"


def test_logging_flags(tmp_path, scene):
    log_file = tmp_path / "logs" / "run.log"
    verbose = invoke(base_args(scene, tmp_path / "v") + ["--n-draws", "20", "-v", "--log-file",
                                                         str(log_file)])
    assert verbose.exit_code == 0, verbose.output
    assert re.search(r"^info: ortho\.tif: \d+ x \d+ px", verbose.stderr, re.M)  # pipeline.inventory logger
    assert "Created" not in verbose.stderr  # other libraries' info stays off the console
    logged = log_file.read_text()
    assert "INFO pipeline.inventory: carbon:" in logged and "20 Monte Carlo draws" in logged
    quiet = invoke(base_args(scene, tmp_path / "q") + ["--n-draws", "20", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stdout == ""  # no table
    assert "info:" not in quiet.stderr and "segmenting" not in quiet.stderr  # no progress, no info
    assert (tmp_path / "q" / "summary.json").is_file()
    plain = invoke(base_args(scene, tmp_path / "p") + ["--n-draws", "20"])
    assert "info:" not in plain.stderr and "Inventory of" in plain.stdout
    reset_logging()  # leave no file handler to later tests


@pytest.mark.parametrize("command", ["batch", "serve"])
def test_batch_and_serve_take_every_run_option(command, tmp_path):
    text = invoke([command, "--help"]).stdout
    for flag in ("--bands R,G,B", "--crs CRS", "--threads N", "--seed N", "--species / --no-species",
                 "--plots PATH", "--tta / --no-tta", "--dsm PATH", "--dtm PATH", "--chm PATH", "--n-draws",
                 "--config PATH", "--log-file PATH"):
        assert flag in text, (command, flag)
    # checked before anything starts (serve: before it looks for a Prefect server)
    args = [command, str(tmp_path)] if command == "batch" else [command]
    res = invoke(args + ["--out", str(tmp_path / "o"), "--threads", "100000"])
    assert res.exit_code == 2 and len(error_lines(res)) == 1 and "--threads" in error_lines(res)[0]
    res = invoke(args + ["--out", str(tmp_path / "o"), "--ecozone", "tundra"])
    assert res.exit_code == 2 and "allowed: tropical_rainforest" in error_lines(res)[0]


def test_readme_and_makefile_agree():
    root = Path(__file__).resolve().parents[1]
    readme, makefile = (root / "README.md").read_text(), (root / "Makefile").read_text()
    extras = re.search(r"install-dev:.*?install -q -e \"\.\[([a-z,]+)\]\"", makefile, re.S)
    assert extras, "Makefile install-dev line not found"
    make_test = next(line for line in readme.splitlines() if line.startswith("make test"))
    assert f".[{extras.group(1)}]" in make_test
    # one Monte Carlo figure, the same wherever the README quotes it, with the command that measured it
    figures = set(re.findall(r"median (\d+\.\d+) s wall", readme) +
                  re.findall(r"Monte Carlo, 100k trees × 1000 draws[^|]*\| (\d+\.\d+) s median wall", readme))
    assert len(figures) == 1, figures
    assert readme.count("python -m bench.bench_montecarlo") >= 2


def test_console_log_is_one_line_and_the_file_has_the_traceback(tmp_path, capsys):
    import logging

    from forest_inventory.logs import setup_logging

    setup_logging(log_file=tmp_path / "x.log")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("flows.batch").exception("c.tif: corrupt\nsecond line")
    logging.getLogger("prefect.flow_runs").error("Finished in state Failed")  # Prefect's: log file only
    logging.getLogger("pipeline.inventory").info("not on the console by default")
    assert capsys.readouterr().err == "error: c.tif: corrupt\n"
    logged = (tmp_path / "x.log").read_text()
    assert "Traceback" in logged and "ValueError: boom" in logged and "Finished in state Failed" in logged
    assert "not on the console by default" in logged
    setup_logging(debug=True)  # --debug: the traceback on the console too
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("flows.batch").exception("c.tif: corrupt")
    assert "Traceback" in capsys.readouterr().err
    reset_logging()
