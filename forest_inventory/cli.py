"""The ``forest-inventory`` command: a thin typer layer over the library API.

Each command calls library functions only. Commands that need the ``train`` extra import ``models``
lazily inside their body and say "install the train extra" when torch is missing.
Bad input -> one line on stderr and exit 2; internal failure -> exit 1; tracebacks only with --debug.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from pipeline.errors import InputError, InventoryError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Drone orthomosaics to forest-carbon inventories.")
train_app = typer.Typer(no_args_is_help=True,
                        help="Train the crown or species model (needs the train extra).")
app.add_typer(train_app, name="train")


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
    """Parse ``--bands 1,2,3`` into 1-based band indexes."""
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise InputError(f"--bands {text!r} is not a comma-separated list of band numbers: "
                         "use e.g. --bands 1,2,3") from None
    if len(bands) != 3 or min(bands) < 1:
        raise InputError(f"--bands {text!r} must name three 1-based bands (red,green,blue), "
                         "e.g. --bands 1,2,3")
    return bands


def height_diameter_options(hd_e: float | None, hd_local: str | None) -> dict[str, Any]:
    """CarbonConfig fields from ``--hd-e`` and ``--hd-local a,b,c,rse``."""
    options: dict[str, Any] = {}
    if hd_e is not None:
        options["hd_environmental_stress_e"] = float(hd_e)
    if hd_local:
        try:
            values = [float(v) for v in hd_local.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise InputError(f"--hd-local {hd_local!r} needs four numbers a,b,c,rse "
                             "(ln H = a + b ln D + c (ln D)^2), e.g. --hd-local 0.9,0.7,0,0.2")
        options["hd_model"] = "local"
        options["hd_local"] = dict(zip(("a", "b", "c", "rse"), values, strict=True))
    return options


# --- commands: inventory (run) ---


@app.command("run")
@handle_errors
def run_cmd(
    ortho: str = typer.Argument(..., help="Orthomosaic (GeoTIFF, COG or VRT; RGB, RGBA or multiband)."),
    out: str = typer.Option(..., "--out", help="Output folder (created; rerunning resumes unfinished work)."),
    chm: str = typer.Option(None, "--chm", help="Canopy height model (any CRS/resolution), m."),
    dtm: str = typer.Option(None, "--dtm", help="Digital terrain model, with --dsm: height = DSM - DTM."),
    dsm: str = typer.Option(None, "--dsm", help="Digital surface model; alone, the ground comes from its "
                            "gaps between crowns (interpolated)."),
    crown_model: str = typer.Option(None, "--crown-model", help="Crown ONNX model [models/zoo/crowns.onnx]."),
    species_model: str = typer.Option(None, "--species-model",
                                      help="Species ONNX model [models/zoo/species.onnx when present]."),
    no_species: bool = typer.Option(False, "--no-species", help="Skip species: every tree is 'unknown'."),
    bands: str | None = typer.Option(None, "--bands", help="1-based red,green,blue band numbers "
                                      "[default: RGB-tagged bands, or 1,2,3]."),
    crs: str = typer.Option(None, "--crs", help="CRS for an input without one, e.g. EPSG:32617."),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime threads [all cores]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the carbon Monte Carlo."),
    plots: str = typer.Option(None, "--plots", help="Plot polygons (GPKG/GeoJSON) for per-plot totals."),
    batch_size: int = typer.Option(1, "--batch-size", help="Tiles per ONNX call (more: more memory)."),
    tta: bool = typer.Option(False, "--tta", help="Average the crown model over 4 flipped/rotated views "
                             "of each tile (4x segmentation time)."),
    hd_e: float = typer.Option(None, "--hd-e", help="Chave 2014 E of the site (heights without CHM/DSM); "
                               "unset: E 0 with SD 0.5 in the interval."),
    hd_local: str = typer.Option(None, "--hd-local", help="Local height-diameter fit a,b,c,rse: "
                                 "ln H = a + b ln D + c (ln D)^2 (H m, D cm), residual SD rse."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Inventory one orthomosaic: crowns, species, height, carbon; GIS layers and a summary in --out."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pipeline.inventory import InventoryConfig, run_inventory

    config = InventoryConfig(ortho=ortho, out_dir=out, chm=chm, dtm=dtm, dsm=dsm, crown_model=crown_model,
                             species_model=species_model, use_species_model=not no_species,
                             bands=parse_bands(bands) if bands else None, crs=crs, threads=threads,
                             seed=seed, plots=plots,
                             batch_size=batch_size, tta=tta, carbon=height_diameter_options(hd_e, hd_local))
    console = Console(stderr=True)
    labels = {"tiles": "segmenting tiles", "attributes": "species and height",
              "carbon": "carbon (Monte Carlo)", "outputs": "writing outputs"}
    columns = (TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=max(total, 1))
            if stage == "tiles":
                bar.advance(tasks[stage], done)
            else:
                bar.update(tasks[stage], completed=done, total=max(total, 1))

        summary = run_inventory(config, progress=progress)
    table = Table(title=f"Inventory of {ortho}", show_header=False)
    ci = summary.get("co2e_t_ci90") or [float("nan")] * 2
    rows = [("trees", f"{summary['n_trees']:,}"), ("area (valid)", f"{summary['area_ha']:.3f} ha"),
            ("trees per ha", f"{summary['trees_per_ha']:.1f}"), ("AGB", f"{summary['agb_t']:.2f} t"),
            ("carbon", f"{summary['carbon_t']:.2f} t C"),
            ("CO2e", f"{summary['co2e_t']:.2f} t (90% CI {ci[0]:.2f} to {ci[1]:.2f})"),
            ("heights", "ALLOMETRIC (no CHM/DSM): see the warning below"
             if any("ALLOMETRIC" in w for w in summary.get("warnings") or []) else
             ", ".join(sorted(summary.get("height_inputs") or {})) or "-"),
            ("CRS / GSD", f"{summary['crs']} / {summary['gsd_m']:.3f} m"),
            ("time", f"{summary['elapsed_s']:.1f} s"), ("outputs", str(out))]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    for warning in summary.get("warnings") or []:  # loud: allometric heights, detection error not included
        console.print(f"[bold red]warning:[/] {warning}")


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
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
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
    debug: bool = typer.Option(False, "--debug"),
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


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    image: str = typer.Argument(None, help="orthomosaic (GeoTIFF) to segment; omit it to score every image "
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
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Crown precision/recall/F1 at IoU 0.4 and 0.5 (Hungarian matching), area error and pixel IoU.

    Without IMAGE, --truth is a multi-image DeepForest CSV (optional site and plot columns): per-site and
    pooled P / R / F1 over its images, or over the plots of --split/--subset or --plots."""
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
    debug: bool = typer.Option(False, "--debug"),
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
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
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


def _flow_options(crown_model: Path | None, species_model: Path | None) -> dict[str, Any]:
    """InventoryConfig fields the flow commands pass through (JSON-able: flow parameters are stored)."""
    options: dict[str, Any] = {}
    if crown_model is not None:
        options["crown_model"] = str(crown_model)
    if species_model is not None:
        options["species_model"] = str(species_model)
    return options


@app.command("batch")
@handle_errors
def batch_command(
    folder: Path = typer.Argument(..., help="Folder of orthomosaics (*.tif, *.tiff, *.vrt); <stem>_chm.tif "
                                  "next to one is its CHM."),
    out: Path = typer.Option(..., "--out", help="Output folder: one sub-folder per orthomosaic."),
    crown_model: Path | None = typer.Option(None, "--crown-model", help="Crown ONNX model (default: zoo)."),
    species_model: Path | None = typer.Option(None, "--species-model", help="Species ONNX model."),
    force: bool = typer.Option(False, "--force", help="Redo orthomosaics that are already done."),
    task_runner: str = typer.Option("threads", "--task-runner", help="threads | dask"),
    dask_address: str | None = typer.Option(None, "--dask-address",
                                            help="Existing Dask scheduler, e.g. tcp://10.0.0.5:8786 "
                                            "(default: a temporary local cluster)."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Task threads or local Dask workers "
                                       "(default: 2 on 4+ cores, else 1)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Inventory every orthomosaic in FOLDER as Prefect flows (embedded server: nothing to start).

    Finished orthomosaics are skipped; an interrupted one resumes from its finished tile groups.
    """
    from flows.settings import configure

    configure(out)
    from flows.batch import run_batch

    rows = run_batch(folder, out, options=_flow_options(crown_model, species_model), force=force,
                     task_runner=task_runner, workers=workers, dask_address=dask_address)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"batch {folder} -> {out}")
    for column in ("name", "status", "n_trees", "co2e_t", "seconds", "message"):
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in
                        ("name", "status", "n_trees", "co2e_t", "seconds", "message")))
    Console().print(table)
    typer.echo(f"summary: {out / 'batch_summary.csv'}")
    if any(row["status"] == "failed" for row in rows):
        raise typer.Exit(1)


@app.command("serve")
@handle_errors
def serve_command(
    out: Path = typer.Option(..., "--out", help="Output folder: one sub-folder per orthomosaic."),
    folder: Path | None = typer.Option(None, "--folder", help="Input folder for --cron and --watch."),
    cron: str | None = typer.Option(None, "--cron", help="Batch over --folder on this schedule, e.g. "
                                    "'0 2 * * *' (02:00 daily)."),
    watch: bool = typer.Option(False, "--watch", help="Start an inventory for each new file in --folder."),
    watch_interval: float = typer.Option(30.0, "--watch-interval", min=1.0, help="Seconds between scans."),
    name: str = typer.Option("forest-inventory", "--name", help="Deployment name."),
    api_url: str | None = typer.Option(None, "--api-url", help="Prefect server API (default: "
                                       "$PREFECT_API_URL), e.g. http://127.0.0.1:4200/api"),
    crown_model: Path | None = typer.Option(None, "--crown-model", help="Crown ONNX model (default: zoo)."),
    species_model: Path | None = typer.Option(None, "--species-model", help="Species ONNX model."),
    task_runner: str = typer.Option("threads", "--task-runner", help="threads | dask"),
    dask_address: str | None = typer.Option(None, "--dask-address", help="Existing Dask scheduler."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Task threads or local Dask workers "
                                       "(default: 2 on 4+ cores, else 1)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Serve the inventory deployments on a running local Prefect server (`prefect server start`)."""
    import os

    from flows.settings import configure

    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    configure(out)
    from flows.serve import serve

    serve(out.resolve(), folder=folder.resolve() if folder else None, cron=cron, watch=watch,
          watch_interval_s=watch_interval, name=name, options=_flow_options(crown_model, species_model),
          task_runner=task_runner, workers=workers, dask_address=dask_address)


from forest_inventory.cli_adapt import register as _register_adapt  # noqa: E402 - needs handle_errors

_register_adapt(app, handle_errors)  # suggest, finetune (issue 21)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
