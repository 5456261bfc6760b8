"""The ``forest-inventory`` command: a thin typer layer over the library API.

Each command calls library functions only. Commands that need the ``train`` extra import ``models``
lazily inside their body and say "install the train extra" when torch is missing.
Bad input -> one line on stderr and exit 2; internal failure -> exit 1; tracebacks only with --debug.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from forest_inventory.cli_options import PlainArgumentsCommand, merged_options, with_run_options
from pipeline.errors import InputError, InventoryError

# plain help (rich_markup_mode=None): square brackets in help texts stay text, flags show no value type
log = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Drone orthomosaics to forest-carbon inventories.")
train_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Train the crown or species model (needs the train extra).")
app.add_typer(train_app, name="train")

DEBUG_HELP = "Show tracebacks."
EXIT_PARTIAL = 3  # batch: at least one orthomosaic failed, the others were inventoried

#: logging flags given before the command (forest-inventory -v run ...); a command's own flags add to them
_APP_LOGGING: dict[str, Any] = {"verbose": 0, "quiet": False, "log_file": None}


def _version(value: bool) -> None:
    if value:
        from forest_inventory import __version__

        typer.echo(f"forest-inventory {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                help="More messages: -v stages and timings, -vv debug and Prefect's "
                                "run logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no progress bars, no info."),
    log_file: Path | None = typer.Option(None, "--log-file", metavar="PATH", help="Append every message, "
                                         "with tracebacks, to this file."),
) -> None:
    """Drone orthomosaics to forest-carbon inventories."""
    _APP_LOGGING.update(verbose=verbose, quiet=quiet, log_file=log_file)
    from forest_inventory.logs import setup_logging

    setup_logging(verbose, quiet, log_file)


def _logging(verbose: int = 0, quiet: bool = False, log_file: Path | None = None,
             debug: bool = False) -> dict[str, Any]:
    """Set up logging from a command's flags added to the ones given before the command; returns them."""
    from forest_inventory.logs import setup_logging

    chosen = {"verbose": max(verbose, _APP_LOGGING["verbose"]), "quiet": quiet or _APP_LOGGING["quiet"],
              "log_file": log_file or _APP_LOGGING["log_file"], "debug": debug}
    setup_logging(**chosen)
    return chosen


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line messages and exit codes; ``debug=True`` re-raises."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug", False))
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except InventoryError as exc:
            if debug:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except ModuleNotFoundError as exc:
            if debug:
                raise
            if exc.name and exc.name.split(".")[0] in {"torch", "torchvision", "segmentation_models_pytorch",
                                                       "torch_pruning", "onnx", "onnxscript"}:
                typer.echo(f"error: {exc.name} is missing: install the train extra (pip install '.[train]')",
                           err=True)
                raise typer.Exit(2) from None
            typer.echo(f"error: internal error: {exc} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI boundary
            if debug:
                raise
            typer.echo(f"error: internal error: {type(exc).__name__}: {exc} "
                       "(rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def parse_bands(text: str) -> tuple[int, ...]:
    """Parse ``--bands 1,2,3`` into 1-based band indexes (the ``bands`` run option)."""
    from pipeline.options import check_value, options

    return check_value(options()["bands"], text, "--bands")


def check_threads(threads: int | None) -> int | None:
    """``--threads`` of a command outside the run options, checked the same way (1 to the cores)."""
    from pipeline.options import check_value, options

    return check_value(options()["threads"], threads, "--threads")


# --- commands: inventory (run) ---


CONFIG_HELP = ("TOML file of run options (template: forest-inventory config --print-defaults); flags "
               "override it.")
VERBOSE_HELP = "More messages: -v stages and timings, -vv debug and Prefect's run logs."
QUIET_HELP = "Errors only: no progress bars, no info."
LOG_FILE_HELP = "Append every message, with tracebacks, to this file."


@app.command("run", cls=PlainArgumentsCommand)
@with_run_options(exclude={"ortho"})
@handle_errors
def run_cmd(
    ortho: str = typer.Argument(..., metavar="ORTHO",
                                help="Orthomosaic (GeoTIFF, COG or VRT; RGB, RGBA or multiband)."),
    config: Path | None = typer.Option(None, "--config", metavar="PATH", help=CONFIG_HELP),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=VERBOSE_HELP,
                                 show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    log_file: Path | None = typer.Option(None, "--log-file", metavar="PATH", help=LOG_FILE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    **flags: Any,
) -> None:
    """Inventory one orthomosaic: crowns, species, height, carbon; GIS layers and a summary in --out.

    Every option can also come from a --config TOML file; flags given here override it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pipeline.inventory import run_inventory
    from pipeline.options import make_config, options
    from pipeline.summary import gsd_note

    chosen = _logging(verbose, quiet, log_file, debug)
    config_obj = make_config({**merged_options(config, flags), "ortho": ortho})  # every check, before work
    console = Console(stderr=True)
    labels = {"tiles": "segmenting tiles", "attributes": "species and height",
              "carbon": "carbon (Monte Carlo)", "outputs": "writing outputs"}
    columns = (TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=chosen["quiet"]) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=max(total, 1))
            if stage == "tiles":
                bar.advance(tasks[stage], done)
            else:
                bar.update(tasks[stage], completed=done, total=max(total, 1))

        summary = run_inventory(config_obj, progress=progress)
    for warning in summary.get("warnings") or []:  # loud: allometric heights, detection error not included
        log.warning("%s", warning)  # one line on the console (not with --quiet), and in --log-file
    if chosen["quiet"]:
        return
    table = Table(title=f"Inventory of {ortho}", show_header=False)
    ci = summary.get("co2e_t_ci90") or [float("nan")] * 2
    rows = [("trees", f"{summary['n_trees']:,}"), ("area (valid)", f"{summary['area_ha']:.3f} ha"),
            ("trees per ha", f"{summary['trees_per_ha']:.1f}"), ("AGB", f"{summary['agb_t']:.2f} t"),
            ("carbon", f"{summary['carbon_t']:.2f} t C"),
            ("CO2e", f"{summary['co2e_t']:.2f} t (90% CI {ci[0]:.2f} to {ci[1]:.2f}, "
                     f"{config_obj.carbon.get('n_draws', options()['n_draws'].default):,} draws)"),
            ("heights", "ALLOMETRIC (no CHM/DSM): see the warning above"
             if any("ALLOMETRIC" in w for w in summary.get("warnings") or []) else
             ", ".join(sorted(summary.get("height_inputs") or {})) or "-"),
            ("CRS", summary["crs"]), ("GSD", gsd_note(summary)),
            ("time", f"{summary['elapsed_s']:.1f} s"), ("outputs", str(config_obj.out_dir))]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


@app.command("config")
@handle_errors
def config_cmd(
    print_defaults: bool = typer.Option(False, "--print-defaults", help="Write a commented TOML template of "
                                        "every run option at its default to stdout."),
    check: Path | None = typer.Option(None, "--check", metavar="PATH", help="Check a config file: every key "
                                      "known, every value allowed."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Run options as a TOML file: print the template, or check a file (forest-inventory run --config)."""
    from pipeline.options import config_template, load_config_file

    if not print_defaults and check is None:
        raise InputError("config needs --print-defaults (write a template) or --check FILE")
    if print_defaults:
        typer.echo(config_template(), nl=False)
    if check is not None:
        values = load_config_file(check)
        typer.echo(f"{check}: {len(values)} option(s), all valid")


# --- commands: synth ---


@app.command("synth")
@handle_errors
def synth_cmd(
    out: str = typer.Option(..., "--out", help="Output folder (ortho.tif, chm.tif, dsm.tif, truth.gpkg, "
                            "scene.json)."),
    size_m: float = typer.Option(500.0, "--size-m", help="Scene edge in metres (square scene)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same scene."),
    gsd_m: float = typer.Option(0.1, "--gsd-m", help="Ground sample distance in metres per pixel."),
    crs: str = typer.Option("EPSG:32617", "--crs", help="Projected CRS of the scene (metres)."),
    compress: str = typer.Option("deflate", "--compress", help="Orthomosaic compression: deflate or jpeg."),
    crown_style: str = typer.Option("smooth", "--crown-style",
                                    help="Crown look: smooth (default) or clumped (branch clumps)."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Generate a synthetic forest scene with known truth (crowns, species, height, DBH, AGB)."""
    import time

    from pipeline.synthetic import generate_scene

    t0 = time.perf_counter()
    files = generate_scene(out, size_m=size_m, gsd_m=gsd_m, seed=seed, crs=crs, compress=compress,
                           crown_style=crown_style)
    typer.echo(f"{files.n_trees} trees, {size_m:g} m x {size_m:g} m at {gsd_m:g} m ({files.crs}) "
               f"in {time.perf_counter() - t0:.1f} s")
    for path in (files.ortho, files.chm, files.dsm, files.truth, files.meta):
        typer.echo(f"  {path}")


# --- commands: models (train, evaluate) ---

@train_app.command("crowns")
@handle_errors
def train_crowns_cmd(
    boxes: list[str] = typer.Option(None, "--boxes", help="DeepForest CSV or Pascal VOC XML (repeatable); "
                                    "default: the NEON YELL + SOAP boxes in models/data/neon"),
    polygons: list[str] = typer.Option(None, "--polygons",
                                       help="crown polygons (GeoJSON/GPKG/shp), repeatable"),
    polygon_image: list[str] = typer.Option(None, "--polygon-image", help="GeoTIFF under each --polygons"),
    plots_csv: list[str] = typer.Option(None, "--plots-csv", help="DeepForest CSV with site and plot columns "
                                        "(repeatable), split by whole plot with --plot-split"),
    plot_image_root: str = typer.Option("", "--plot-image-root",
                                        help="folder the --plots-csv image paths are relative to"),
    plot_split: str = typer.Option("models/data/neon_plots_split.json", "--plot-split",
                                   help="JSON of validation/train/excluded plot ids"),
    train_plot_fraction: float = typer.Option(1.0, "--train-plot-fraction",
                                              help="share of each site's training plots (learning curve)"),
    savanna_fraction: float = typer.Option(0.5, "--savanna-fraction",
                                           help="share of open-ground chips (pasted crowns)"),
    encoder: str = typer.Option("resnet18", "--encoder", help="smp encoder of the U-Net"),
    out: str = typer.Option("checkpoints/crowns", "--out", help="checkpoint folder (resumes from last.pt)"),
    export: str = typer.Option(None, "--export", help="write the ONNX model here (default OUT/crowns.onnx)"),
    iterations: int = typer.Option(1500, "--iterations", help="training steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    gsd_m: float = typer.Option(0.15, "--gsd-m", help="model ground sample distance, m"),
    image_gsd_m: float = typer.Option(0.1, "--image-gsd-m", help="GSD of non-georeferenced images, m"),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
    model_version: str = typer.Option("crowns-custom", "--model-version"),
    no_resume: bool = typer.Option(False, "--no-resume", help="ignore an existing checkpoint"),
    tta: bool = typer.Option(False, "--tta", help="flip/rotate test-time augmentation during validation"),
    colour_strength: float = typer.Option(1.0, "--colour-strength",
                                          help="colour-jitter strength (1 = default)"),
    greyscale_p: float = typer.Option(0.0, "--greyscale-p", help="share of chips turned grey before jitter"),
    savanna_crown_jitter: float = typer.Option(0.0, "--savanna-crown-jitter",
                                               help="per-crown colour spread on the open-ground chips"),
    savanna_max_crowns: int = typer.Option(14, "--savanna-max-crowns",
                                           help="most crowns pasted on one open-ground chip (density)"),
    synthetic_scenes: int = typer.Option(0, "--synthetic-scenes",
                                         help="generated scenes mixed into training (pretraining)"),
    synthetic_fraction: float = typer.Option(0.25, "--synthetic-fraction",
                                             help="share of chips cut from the synthetic scenes"),
    synthetic_style: str = typer.Option("smooth", "--synthetic-style",
                                        help="crown look of the synthetic scenes: smooth or clumped"),
    encoder_init: str = typer.Option("", "--encoder-init",
                                     help="'' = random encoder; 'nsfwjs' = ImageNet MobileNetV2 start "
                                     "(fetched with npm; switches the encoder to mobilenet_v2)"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Train the crown model on boxes or polygons, calibrate thresholds on held-out blocks, export ONNX."""
    from models.train_crowns import DEFAULT_ANNOTATIONS, TrainCrownsConfig, run_training

    cfg = TrainCrownsConfig(boxes=list(boxes) if boxes else ([] if polygons else list(DEFAULT_ANNOTATIONS)),
                            polygons=list(polygons or []), polygon_images=list(polygon_image or []),
                            plot_csvs=list(plots_csv or []), plot_image_root=plot_image_root,
                            plot_split=plot_split if plots_csv else "", savanna_fraction=savanna_fraction,
                            train_plot_fraction=train_plot_fraction,
                            net={**TrainCrownsConfig().net, "encoder": encoder},
                            out_dir=out, iterations=iterations, batch_size=batch_size, seed=seed, gsd_m=gsd_m,
                            image_gsd_m=image_gsd_m, threads=threads,
                            colour_strength=colour_strength, greyscale_p=greyscale_p,
                            savanna_crown_jitter=savanna_crown_jitter, savanna_max_crowns=savanna_max_crowns,
                            synthetic_scenes=synthetic_scenes,
                            synthetic_fraction=synthetic_fraction if synthetic_scenes > 0 else 0.0,
                            synthetic_style=synthetic_style, encoder_init=encoder_init)
    if encoder_init:
        cfg.net = {**cfg.net, "encoder": "mobilenet_v2"}
    result = run_training(cfg, export or f"{out}/crowns.onnx", model_version=model_version,
                          resume=not no_resume, tta=tta, log=typer.echo)
    typer.echo(f"model: {result['onnx']}  validation: {result['validation']}")


@app.command("evaluate", cls=PlainArgumentsCommand)
@handle_errors
def evaluate_cmd(
    image: str = typer.Argument(None, metavar="[IMAGE]",
                                help="orthomosaic (GeoTIFF) to segment; omit it to score every image "
                                "of a multi-image --truth CSV"),
    truth: str = typer.Option(..., "--truth",
                              help="reference crowns: DeepForest CSV (one or many images), Pascal VOC XML "
                              "or polygons"),
    out: str = typer.Option("out/eval", "--out", help="folder for crown_metrics.json/.md"),
    crown_model: str = typer.Option(None, "--crown-model",
                                    help="ONNX crown model (default models/zoo/crowns.onnx)"),
    split: str = typer.Option(None, "--split", help="multi-image: split JSON with \"validation\" and "
                              "\"train\" lists of plot ids; score only the --subset plots"),
    subset: str = typer.Option("validation", "--subset",
                               help="multi-image: validation | train (with --split)"),
    plots: str = typer.Option(None, "--plots", help="multi-image: comma-separated plot ids (the CSV's plot "
                              "column, or image file stems) to score"),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime threads (default: all cores)"),
    bands: str | None = typer.Option(None, "--bands", help="red,green,blue band numbers [default: auto]"),
    tta: bool = typer.Option(False, "--tta", help="test-time augmentation: 4 flipped/rotated views a tile"),
    compare_to: str = typer.Option(None, "--compare-to", help="baseline crown model (e.g. models/zoo/"
                                   "crowns-dense.onnx): F1 difference, paired block-bootstrap interval"),
    block_m: float = typer.Option(10.0, "--block-m", help="bootstrap block side for --compare-to, m "
                                  "(multi-image: the blocks are plots)"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Crown precision/recall/F1 at IoU 0.4 and 0.5 (Hungarian matching), area error and pixel IoU.

    Without IMAGE, --truth is a multi-image DeepForest CSV (optional site and plot columns): per-site and
    pooled P / R / F1 over its images, or over the plots of --split/--subset or --plots."""
    threads = check_threads(threads)
    if compare_to is not None and not Path(compare_to).is_file():
        raise InputError(f"{compare_to}: baseline crown model not found; pass an ONNX file to --compare-to")
    if image is None:
        _evaluate_multi(truth, out, crown_model, split, subset, plots, threads, bands, tta, compare_to)
        return
    if split or plots:
        raise InputError("--split/--plots select images of a multi-image CSV: drop the IMAGE argument "
                         f"({image}) to use them")
    from pipeline.evaluation.run import evaluate_crowns_on_image

    res = evaluate_crowns_on_image(image, truth, out, crown_model=crown_model, threads=threads,
                                   bands=parse_bands(bands) if bands else None, tta=tta,
                                   compare_to=compare_to, block_m=block_m)
    for warning in res.get("warnings") or []:
        typer.echo(f"warning: {warning}", err=True)
    head = res["scores"][res["headline"]]
    t4, t5 = head["thresholds"]["0.4"], head["thresholds"]["0.5"]
    typer.echo(f"{head['n_pred']} predicted / {head['n_truth']} reference crowns ({res['headline']} IoU): "
               f"F1@0.4 {t4['f1']:.3f} (P {t4['precision']:.3f} R {t4['recall']:.3f}), "
               f"F1@0.5 {t5['f1']:.3f}; "
               f"written {out}/crown_metrics.json and .md")
    if "paired" in res:
        p = res["paired"]
        typer.echo(f"against {compare_to}: {p['delta_points']:+.1f} F1 points (90 % interval "
                   f"{p['ci_points'][0]:+.1f} to {p['ci_points'][1]:+.1f}, block bootstrap); within "
                   f"{p['tolerance_points']:g} point in {100 * p['share_within_tolerance']:.0f} % of "
                   "resamples")


def _evaluate_multi(truth: str, out: str, crown_model: str | None, split: str | None, subset: str,
                    plots: str | None, threads: int | None, bands: str | None, tta: bool,
                    compare_to: str | None) -> None:
    """``evaluate`` without an image: every (selected) image of a multi-image CSV, a per-site table."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.evaluation.multi import evaluate_crowns_on_csv, read_split

    if split and plots:
        raise InputError("--split and --plots both select plots: give one of them")
    if not Path(truth).suffix.lower() == ".csv":
        raise InputError(f"{truth}: without an IMAGE argument --truth must be a multi-image DeepForest CSV "
                         "(or give the image to score: forest-inventory evaluate IMAGE --truth ...)")
    chosen, note = None, None
    if split:
        chosen, note = read_split(split, subset), f"{subset} plots of {Path(split).name}"
    elif plots:
        chosen = [p.strip() for p in plots.split(",") if p.strip()]
        note = f"plots {', '.join(chosen)}"
    err = Console(stderr=True)

    def progress(done: int, total: int, name: str) -> None:
        if name:
            err.print(f"[{done + 1}/{total}] {name}", highlight=False)

    res = evaluate_crowns_on_csv(truth, out, crown_model=crown_model, plots=chosen, threads=threads,
                                 bands=parse_bands(bands) if bands else None, tta=tta,
                                 compare_to=compare_to, selection=note, progress=progress)
    table = Table(title=f"Crowns vs {Path(truth).name}" + (f" ({note})" if note else "")
                  + f", model {Path(res['crown_model']).name}")
    for col in ("site", "images", "pred", "ref", "P@0.4", "R@0.4", "F1@0.4", "P@0.5", "R@0.5", "F1@0.5"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, s in [*res["sites"].items(), ("pooled", res["pooled"])]:
        t4, t5 = s["thresholds"]["0.4"], s["thresholds"]["0.5"]
        table.add_row(site, str(s["n_images"]), str(s["n_pred"]), str(s["n_truth"]),
                      *(f"{t[k]:.3f}" for t in (t4, t5) for k in ("precision", "recall", "f1")),
                      end_section=site == list(res["sites"])[-1])
    Console().print(table)
    if res["missing_plots"]:
        typer.echo(f"note: {len(res['missing_plots'])} selected plot(s) not in {truth}: "
                   f"{', '.join(res['missing_plots'][:10])}")
    if "paired" in res:
        p = res["paired"]
        typer.echo(f"against {compare_to}: pooled F1@0.4 {p['delta_points']:+.1f} points (90 % interval "
                   f"{p['ci_points'][0]:+.1f} to {p['ci_points'][1]:+.1f}, bootstrap over "
                   f"{p['n_blocks']} plots)")
    typer.echo(f"written {out}/crown_metrics.json and .md")


@train_app.command("species")
@handle_errors
def train_species_cmd(
    out: str = typer.Option("out/species", "--out", help="Output folder (species.onnx, metrics)."),
    ortho: list[str] = typer.Option(None, "--ortho", help="Orthomosaic of user crowns (repeatable, pairs "
                                    "with --crowns). Default: synthetic scenes generated by seed."),
    crowns: list[str] = typer.Option(None, "--crowns", help="Crown polygons with species (repeatable)."),
    species_column: str = typer.Option("species", "--species-column", help="Column with the species."),
    train_seeds: str = typer.Option("101,102,103,104", "--train-seeds", help="Synthetic training seeds."),
    val_seed: int = typer.Option(201, "--val-seed", help="Synthetic validation scene (model selection)."),
    test_seed: int = typer.Option(301, "--test-seed", help="Synthetic test scene (never trained on)."),
    scene_size_m: float = typer.Option(250.0, "--scene-size-m", help="Edge of each synthetic scene, m."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    chip_px: int = typer.Option(64, "--chip-px", help="Chip edge in px (model tile_size)."),
    chip_gsd_m: float = typer.Option(0.2, "--chip-gsd-m", help="GSD at which chips are cut, m."),
    unknown_threshold: float = typer.Option(0.4, "--unknown-threshold", help="Below this top probability the "
                                            "species is 'unknown'."),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
    seed: int = typer.Option(0, "--seed", help="Training seed (initialisation, shuffling, augmentation)."),
    model_version: str = typer.Option("species-custom", "--model-version"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Train the species chip classifier (synthetic scenes by default, or labelled crowns), export ONNX."""
    from models.train_species import SpeciesTrainConfig, train_species

    try:
        seeds = tuple(int(s) for s in train_seeds.split(","))
    except ValueError:
        raise InputError(f"--train-seeds {train_seeds!r} must be integers, e.g. 101,102") from None
    cfg = SpeciesTrainConfig(out_dir=out, ortho=list(ortho or []), crowns=list(crowns or []),
                             species_column=species_column, train_seeds=seeds, val_seed=val_seed,
                             test_seed=test_seed, scene_size_m=scene_size_m, epochs=epochs,
                             batch_size=batch_size,
                             chip_px=chip_px, chip_gsd_m=chip_gsd_m, unknown_threshold=unknown_threshold,
                             threads=threads, seed=seed, model_version=model_version)
    result = train_species(cfg, log=typer.echo)
    typer.echo(f"model: {result['onnx']}  validation macro-F1: {result['validation_macro_f1']:.3f}"
               + (f"  test macro-F1: {result['test']['macro_f1']:.3f}" if "test" in result else ""))


# --- commands: compress ---


@app.command("compress")
@handle_errors
def compress_cmd(
    model: str = typer.Option(..., "--model", help="Crown-model checkpoint (.pt) to compress."),
    method: str = typer.Option(..., "--method",
                               help="pfp | sipp | alds | l1 | uniform | random | sbf (learned scores)"),
    target: float = typer.Option(..., "--target", help="Fraction removed, e.g. 0.7 (SiPP: params)."),
    finetune: int = typer.Option(0, "--finetune", help="Fine-tune steps with LR rewinding (0 = none)."),
    distill: float = typer.Option(0.0, "--distill", help="Weight of distillation from the dense model in "
                                  "the fine-tune loss, 0-1 (0 = labels only)."),
    quantize: bool = typer.Option(False, "--quantize", help="Also write a static int8 QDQ copy."),
    out: str = typer.Option(None, "--out", help="Output ONNX (default: out/compress/crowns-M-PCT.onnx)."),
    budget: str = typer.Option("macs", "--budget", help="What --target counts: macs or params."),
    reference_onnx: str = typer.Option(None, "--reference-onnx",
                                       help="ONNX whose metadata is copied (default: zoo crowns-dense)."),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    score_steps: int = typer.Option(200, "--score-steps", help="sbf: score-learning steps on the "
                                    "calibration crops (more: slower, steadier scores)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Choose the compressed model's own "
                                     "post-processing thresholds on the training run's validation."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Compress the crown model (PFP, SiPP, ALDS, SbF or a baseline); export it with a compression record."""
    if budget not in ("macs", "params"):
        raise InputError(f"--budget {budget!r} must be macs or params")
    from models.compression.crown_study import compress_crown_checkpoint

    result = compress_crown_checkpoint(model, method, target, out=out, finetune_steps=finetune,
                                       quantize=quantize, reference_onnx=reference_onnx, budget=budget,
                                       threads=threads, log=typer.echo, distill=distill,
                                       score_steps=score_steps, recalibrate=recalibrate)
    rec = result["record"]
    typer.echo(f"{rec['method']}: params {rec['params_before']:,} -> {rec['params_after']:,} "
               f"(nonzero {rec['nonzero_params_after']:,}), "
               f"MACs {rec['macs_before']:,} -> {rec['macs_after']:,}")
    typer.echo(f"  {result['onnx']}")
    if result["int8_onnx"]:
        typer.echo(f"  {result['int8_onnx']}")

# --- commands: flows (batch, serve) ---


def _flow_options(config: Path | None, flags: dict[str, Any], placeholder: Path) -> dict[str, Any]:
    """The run options of a flow command (config file + flags), checked up front and JSON-able (flow
    parameters are stored). ``placeholder``: stands in for the per-file ORTHO/--out in the check."""
    from pipeline.options import make_config, to_jsonable

    values = merged_options(config, flags)
    make_config({**values, "ortho": placeholder, "out_dir": placeholder})  # every check, before any work
    return to_jsonable(values)


def _fmt(value: Any, digits: int = 2) -> str:
    """A number for the console: rounded; '' for none."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@app.command("batch", cls=PlainArgumentsCommand)
@with_run_options(exclude={"ortho", "out_dir"})
@handle_errors
def batch_command(
    folder: Path = typer.Argument(..., metavar="FOLDER",
                                  help="Folder of orthomosaics (*.tif, *.tiff, *.vrt); "
                                  "<stem>_chm.tif, <stem>_dsm.tif, <stem>_dtm.tif next to one are its height "
                                  "rasters."),
    out: Path = typer.Option(..., "--out", metavar="PATH", help="Output folder: one sub-folder per "
                             "orthomosaic, and batch_summary.csv."),
    config: Path | None = typer.Option(None, "--config", metavar="PATH", help=CONFIG_HELP),
    force: bool = typer.Option(False, "--force", help="Redo orthomosaics that are already done."),
    task_runner: str = typer.Option("threads", "--task-runner", metavar="threads|dask",
                                    help="Prefect task runner. [default: threads]", show_default=False),
    dask_address: str | None = typer.Option(None, "--dask-address", metavar="URL",
                                            help="Existing Dask scheduler, e.g. tcp://10.0.0.5:8786 "
                                            "(default: a temporary local cluster)."),
    workers: int | None = typer.Option(None, "--workers", min=1, metavar="N", help="Task threads or local "
                                       "Dask workers (default: 2 on 4+ cores, else 1)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=VERBOSE_HELP,
                                 show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    log_file: Path | None = typer.Option(None, "--log-file", metavar="PATH", help=LOG_FILE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    **flags: Any,
) -> None:
    """Inventory every orthomosaic in FOLDER as Prefect flows (embedded server: nothing to start).

    Finished orthomosaics are skipped; an interrupted one resumes from its finished tile groups. Every run
    option applies to each orthomosaic (a --chm/--dsm/--dtm given here is a site-wide raster; side files win).
    Exit code 0: all done or skipped; 3: some orthomosaics failed (one error line each; the others'
    inventories are written; see batch_summary.csv); 2: bad input or options, nothing run.
    """
    chosen = _logging(verbose, quiet, log_file, debug)
    options = _flow_options(config, flags, out)
    from flows.settings import configure, temporary_server_notice

    configure(out)
    if (notice := temporary_server_notice()) is not None:
        log.warning("batch: %s", notice)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from flows.batch import find_orthomosaics, run_batch

    n_files = len(find_orthomosaics(folder))
    _logging(**chosen)  # again: importing Prefect installed its own console handler
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=chosen["quiet"]) as bar:
        files = bar.add_task("orthomosaics", total=max(n_files, 1))
        tiles = bar.add_task("tiles of this one", total=1)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "files":
                bar.update(files, completed=done, total=max(total, 1))
                if done < total:  # the next orthomosaic starts
                    bar.update(tiles, completed=0, total=1)
            elif stage == "tiles":
                bar.update(tiles, total=max(total, 1))
                bar.advance(tiles, done)

        rows = run_batch(folder, out, options=options, force=force, task_runner=task_runner,
                         workers=workers, dask_address=dask_address, progress=progress)
    failed = [row for row in rows if row["status"] == "failed"]
    if not chosen["quiet"]:
        table = Table(title=f"batch {folder} -> {out}")
        for column in ("name", "status", "trees", "CO2e t", "90% CI t", "seconds"):
            table.add_column(column, justify="left" if column in ("name", "status") else "right")
        for row in rows:
            ci = (f"{_fmt(row.get('co2e_t_ci90_low'))} to {_fmt(row.get('co2e_t_ci90_high'))}"
                  if row.get("co2e_t_ci90_low") not in (None, "") else "")
            table.add_row(row["name"], row["status"], _fmt(row.get("n_trees")), _fmt(row.get("co2e_t")), ci,
                          _fmt(row.get("seconds"), 1))
        Console().print(table)
        typer.echo(f"summary: {out / 'batch_summary.csv'}")
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("serve")
@with_run_options(exclude={"ortho", "out_dir"})
@handle_errors
def serve_command(
    out: Path = typer.Option(..., "--out", metavar="PATH", help="Output folder: one sub-folder per "
                             "orthomosaic."),
    folder: Path | None = typer.Option(None, "--folder", metavar="PATH",
                                       help="Input folder for --cron and --watch."),
    config: Path | None = typer.Option(None, "--config", metavar="PATH", help=CONFIG_HELP),
    cron: str | None = typer.Option(None, "--cron", metavar="CRON", help="Batch over --folder on this "
                                    "schedule, e.g. '0 2 * * *' (02:00 daily)."),
    watch: bool = typer.Option(False, "--watch", help="Start an inventory for each new file in --folder."),
    watch_interval: float = typer.Option(30.0, "--watch-interval", min=1.0, metavar="S",
                                         help="Seconds between scans."),
    name: str = typer.Option("forest-inventory", "--name", metavar="NAME", help="Deployment name."),
    api_url: str | None = typer.Option(None, "--api-url", metavar="URL", help="Prefect server API (default: "
                                       "$PREFECT_API_URL), e.g. http://127.0.0.1:4200/api"),
    task_runner: str = typer.Option("threads", "--task-runner", metavar="threads|dask",
                                    help="Prefect task runner. [default: threads]", show_default=False),
    dask_address: str | None = typer.Option(None, "--dask-address", metavar="URL",
                                            help="Existing Dask scheduler."),
    workers: int | None = typer.Option(None, "--workers", min=1, metavar="N", help="Task threads or local "
                                       "Dask workers (default: 2 on 4+ cores, else 1)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help=VERBOSE_HELP,
                                 show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    log_file: Path | None = typer.Option(None, "--log-file", metavar="PATH", help=LOG_FILE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    **flags: Any,
) -> None:
    """Serve the inventory deployments on a running local Prefect server (`prefect server start`).

    The run options (flags or --config) are the deployments' default options."""
    import os

    chosen = _logging(verbose, quiet, log_file, debug)
    options = _flow_options(config, flags, out)
    from flows.settings import configure

    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    configure(out)
    from flows.serve import serve

    _logging(**chosen)
    serve(out.resolve(), folder=folder.resolve() if folder else None, cron=cron, watch=watch,
          watch_interval_s=watch_interval, name=name, options=options,
          task_runner=task_runner, workers=workers, dask_address=dask_address)


from forest_inventory.cli_adapt import register as _register_adapt  # noqa: E402 - needs handle_errors

_register_adapt(app, handle_errors)  # suggest, finetune (issue 21)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
