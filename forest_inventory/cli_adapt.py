"""``forest-inventory suggest`` and ``forest-inventory finetune``: adapting the crown model to a site.

``suggest`` runs on the light install (ONNX only); ``finetune`` needs the train extra (torch), imported
inside the command. Registered on the main app by :func:`register`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.active_learning import EXPERTS


class _LazyBar:
    """A typer progress bar opened on the first update (bad input fails before anything is printed)."""

    def __init__(self, label: str) -> None:
        self.label, self.bar, self.done = label, None, 0

    def to(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = typer.progressbar(length=total, label=self.label)
            self.bar.__enter__()
        self.bar.length = total
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def suggest(
    ortho: Path = typer.Argument(..., help="Orthomosaic (GeoTIFF) of the site."),
    out: Path = typer.Option(..., "--out", help="Folder for suggested_tiles.gpkg, chips/, annotations.gpkg."),
    n: int = typer.Option(8, "--n", min=1, help="Tiles to suggest."),
    method: str = typer.Option("sleeping", "--method", help="sleeping | greedy | uniform"),
    expert: str = typer.Option("entropy", "--expert", help=f"greedy's measure: {' | '.join(EXPERTS)}"),
    crown_model: Path | None = typer.Option(None, "--crown-model",
                                            help="Crown ONNX model [models/zoo/crowns-dense.onnx]."),
    second_model: Path | None = typer.Option(None, "--second-model",
                                             help="A compressed copy of the model (disagreement expert), "
                                                  "e.g. "
                                                  "models/zoo/crowns-sbf70kd.onnx; without it that expert "
                                                  "sleeps."),
    weights: str | None = typer.Option(None, "--weights", help="Expert weights from an earlier round "
                                       "(suggest.json 'weights'), comma-separated."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Rank the tiles of a flight by how much labelling them should teach the crown model."""
    from pipeline.errors import InputError
    from pipeline.inventory import default_model_path
    from pipeline.suggest import suggest_tiles

    w = None
    if weights:
        try:
            w = [float(v) for v in weights.split(",")]
        except ValueError:
            raise InputError(f"--weights {weights!r}: give {len(EXPERTS)} comma-separated numbers "
                             f"({', '.join(EXPERTS)})") from None
    model = crown_model or default_model_path("crowns-dense.onnx")
    bar = _LazyBar("scoring tiles")
    try:
        rec = suggest_tiles(ortho, out, model, n=n, method=method, expert=expert, second_model=second_model,
                            weights=w, seed=seed, threads=threads, progress=lambda i, total: bar.to(i, total))
    finally:
        bar.close()
    typer.echo(f"{len(rec['suggested'])} of {rec['n_tiles_scored']} tiles suggested ({method}); "
               f"draw every crown of a tile in {out / 'annotations.gpkg'} (QGIS), then run "
               f"forest-inventory finetune --annotations {out / 'annotations.gpkg'} --ortho {ortho} "
               "--out DIR")


def finetune(
    annotations: Path = typer.Option(..., "--annotations", help="annotations.gpkg with the drawn crowns."),
    ortho: Path = typer.Option(..., "--ortho", help="The orthomosaic the tiles were cut from."),
    out: Path = typer.Option(..., "--out", help="Folder for crowns-finetuned.onnx and finetune.json."),
    tiles: Path | None = typer.Option(None, "--tiles", help="suggested_tiles.gpkg [beside --annotations]."),
    model: Path | None = typer.Option(None, "--model", help="Model to adapt: an ONNX with its .pt weights "
                                      "beside it, or a training last.pt [models/zoo/crowns-dense.onnx]."),
    budget_min: float = typer.Option(10.0, "--budget-min", help="Most minutes of training."),
    steps: int = typer.Option(600, "--steps", min=1, help="Most optimiser steps."),
    replay: int = typer.Option(16, "--replay", min=0, help="Images of the base model's training plots mixed "
                               "in (when that data is on this machine)."),
    compress_target: float = typer.Option(0.7, "--compress-target", help="Share of MACs the compressed "
                                          "copy removes (0 = no compressed copy)."),
    compress_steps: int = typer.Option(100, "--compress-steps", min=1),
    threads: int = typer.Option(2, "--threads", min=1),
    seed: int = typer.Option(0, "--seed"),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Fine-tune the crown model on the annotated tiles (needs the train extra)."""
    from models.finetune import FinetuneConfig, finetune_from_annotations
    from pipeline.inventory import default_model_path

    cfg = FinetuneConfig(steps=steps, budget_s=budget_min * 60.0, threads=threads, seed=seed)
    base = model or default_model_path("crowns-dense.onnx")
    bar = _LazyBar("fine-tuning")
    try:
        rec = finetune_from_annotations(annotations, ortho, out, base, tiles=tiles, cfg=cfg, n_replay=replay,
                                        compress_target=compress_target, compress_steps=compress_steps,
                                        progress=lambda step, total, loss: bar.to(step, total),
                                        log=lambda m: None)
    finally:
        bar.close()
    val = rec["validation_metrics"]
    typer.echo(f"wrote {rec['onnx']}: held-out F1@0.4 {val.get('before_finetune_f1_iou0.4')} before, "
               f"{val.get('real_f1_iou0.4')} after ({int(val.get('real_n_truth', 0))} held-out crowns); "
               f"run it with forest-inventory run ORTHO --crown-model {rec['onnx']}")


def register(app: typer.Typer, handle_errors) -> None:
    """Add ``suggest`` and ``finetune`` to the main app."""
    app.command("suggest")(handle_errors(suggest))
    app.command("finetune")(handle_errors(finetune))
