"""Model build as a Prefect flow: train, compress (methods x ratios, with fine-tuning), export, evaluate,
report. Orchestration only: every task is one call into ``models`` (needs the ``train`` extra).

- train: ``models.train_crowns.run_training`` (skipped when a checkpoint is given)
- compress + fine-tune + export: ``models.compression.crown_study.compress_crown_checkpoint`` per
  (method, ratio), mapped
- evaluate: ``models.compression.robustness.evaluate_under_shifts`` (the ``forest-inventory evaluate``
  path) on the validation image and each drone shift (``shifted_copies``), for the dense reference and
  every compressed model
- report: the results JSON of ``models.compression.crown_study`` plus ``models.compression.report``

Each step is cached on the identity of its inputs (files by path + size + mtime, ONNX models by sha256)
and its parameters; results live in ``flows.settings.result_dir`` (never inside the output folder: Prefect
pickles them), so a rerun only does what changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from flows.inventory import _package_version, file_identity, retry_on_transient_io
from flows.settings import result_dir
from pipeline.atomic import atomic_path
from pipeline.errors import InputError

DEFAULT_METHODS = ("pfp", "alds", "l1")
DEFAULT_RATIOS = (0.7, 0.8)


def _identity(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if isinstance(value, str) and Path(value).is_file():
        return file_identity(value)
    return value


#: parameters that name files a step WRITES: keyed by name (their identity changes once they exist)
OUTPUT_PARAMETERS = frozenset({"onnx_path", "out_path", "out_dir"})


def step_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Task name + digest of its parameters, with input files replaced by their identity (not their bytes)."""
    params = {k: (str(v) if k in OUTPUT_PARAMETERS else _identity(v)) for k, v in parameters.items()}
    doc = {"task": context.task.name, "params": params, "version": _package_version()}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return f"{context.task.name}-{digest}"


_OPTIONS: dict[str, Any] = {"cache_key_fn": step_cache_key, "persist_result": True, "retries": 1,
                            "retry_delay_seconds": 5, "retry_condition_fn": retry_on_transient_io}


@task(name="train", **_OPTIONS)
def train_task(train_config: dict[str, Any], onnx_path: str, model_version: str) -> dict[str, Any]:
    """Train the crown model, calibrate its post-processing, export ONNX; returns checkpoint and ONNX."""
    from models.train_crowns import TrainCrownsConfig, run_training

    res = run_training(TrainCrownsConfig.from_dict(train_config), onnx_path, model_version=model_version)
    return {"checkpoint": str(res["checkpoint"]), "onnx": str(res["onnx"]), "validation": res["validation"]}


@task(name="compress", **_OPTIONS)
def compress_task(checkpoint: str, method: str, ratio: float, out_path: str, reference_onnx: str,
                  finetune_steps: int, quantize: bool, threads: int, distill: float = 0.0) -> dict[str, Any]:
    """Compress one (method, ratio), fine-tune with LR rewinding (``distill``: weight of distillation from
    the dense model), export for the engine."""
    from models.compression.crown_study import compress_crown_checkpoint

    res = compress_crown_checkpoint(checkpoint, method, ratio, out=out_path, finetune_steps=finetune_steps,
                                    quantize=quantize, reference_onnx=reference_onnx, threads=threads,
                                    distill=distill)
    return {"method": method, "ratio": ratio, **res}


@task(name="shift-images", **_OPTIONS)
def shift_images_task(image: str, truth_csv: str, shifts: list[str],
                      out_dir: str) -> dict[str, tuple[str, str]]:
    """The validation image under each drone shift, with its reference boxes (written once)."""
    from models.compression.robustness import shifted_copies

    return shifted_copies(image, truth_csv, shifts, out_dir)


@task(name="evaluate", **_OPTIONS)
def evaluate_task(onnx_path: str, image: str, truth_csv: str, shift_images: dict[str, tuple[str, str]],
                  threads: int) -> dict[str, Any]:
    """F1/precision/recall at IoU 0.4 as ``forest-inventory evaluate`` computes them, nominal and per
    shift."""
    from models.compression.robustness import evaluate_under_shifts

    return evaluate_under_shifts(onnx_path, image, truth_csv, shift_images, threads)


@task(name="report", **_OPTIONS)
def report_task(dense: dict[str, Any], runs: list[dict[str, Any]], evaluations: list[dict[str, Any]],
                dense_eval: dict[str, Any], out_dir: str) -> dict[str, str]:
    """compression_results.json (the study's format) and COMPRESSION.md + F1/latency plot."""
    from models.compression.report import write_report

    results: dict[str, Any] = {"dense": {**dense, **dense_eval}, "runs": {}}
    for run, ev in zip(runs, evaluations, strict=True):
        record = run["record"]
        results["runs"][f"{run['method']}@{run['ratio']:g}"] = {
            "method": run["method"], "ratio": run["ratio"], "onnx": run["onnx"], "record": record,
            "params": record.get("params_after"), "nonzero_params": record.get("nonzero_params_after"),
            "macs": record.get("macs_after"), "size_mb": Path(run["onnx"]).stat().st_size / 1e6, **ev}
    first = runs[0]["record"] if runs else {}
    results["dense"].setdefault("params", first.get("params_before"))
    results["dense"].setdefault("macs", first.get("macs_before"))
    path = Path(out_dir) / "compression_results.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return {k: str(v) for k, v in write_report(path, out_dir).items()}


@flow(name="compress", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def compress_flow(out: str = "out/compress", checkpoint: str | None = None,
                  train_config: dict[str, Any] | None = None, reference_onnx: str | None = None,
                  methods: list[str] | None = None, ratios: list[float] | None = None,
                  finetune_steps: int = 60, quantize: bool = False,
                  image: str = "sample_data/OSBS_029.tif", truth_csv: str = "sample_data/OSBS_029.csv",
                  shifts: list[str] | None = None, threads: int = 2, distill: float = 0.0) -> dict[str, Any]:
    """Train (unless ``checkpoint``), compress every method x ratio, evaluate, report into ``out``.

    Defaults: methods ``pfp, alds, l1``, ratios ``0.7, 0.8`` (fraction of MACs removed).

    One worker: each step already uses ``threads`` torch/ORT threads. ``shifts``: drone shifts of
    ``models.compression.robustness.SHIFTS`` to evaluate (default: all). ``distill``: weight of
    distillation from the dense model in the fine-tune loss (0-1). Returns the report paths.
    """
    from models.compression.robustness import SHIFTS

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = {"result_storage": result_dir("compress", out_dir)}
    if checkpoint is None:
        if train_config is None:
            raise InputError("compress_flow needs a checkpoint or a train_config: pass checkpoint=PATH.pt")
        cfg = dict(train_config)
        cfg.setdefault("out_dir", str(out_dir / "train"))
        trained = train_task.with_options(**storage)(cfg, str(out_dir / "crowns-dense.onnx"), "crowns-flow")
        checkpoint, reference_onnx = trained["checkpoint"], reference_onnx or trained["onnx"]
    if reference_onnx is None:
        raise InputError("compress_flow needs reference_onnx (the dense model's ONNX, for its metadata) when "
                         "a checkpoint is given: pass reference_onnx=models/zoo/crowns-dense.onnx")
    shift_names = list(SHIFTS) if shifts is None else list(shifts)
    unknown = sorted(set(shift_names) - set(SHIFTS))
    if unknown:
        raise InputError(f"unknown drone shift(s) {', '.join(unknown)}: use names of {', '.join(SHIFTS)}")

    pairs = [(m, float(r)) for r in (ratios or DEFAULT_RATIOS) for m in (methods or DEFAULT_METHODS)]
    compress = compress_task.with_options(**storage)
    run_futures = compress.map(
        unmapped(checkpoint), [m for m, _ in pairs], [r for _, r in pairs],
        [str(out_dir / f"crowns-{m}-{int(round(r * 100))}.onnx") for m, r in pairs],
        unmapped(reference_onnx), unmapped(finetune_steps), unmapped(quantize), unmapped(threads),
        unmapped(distill))
    runs = [f.result() for f in run_futures]
    for i, (run, (m, r)) in enumerate(zip(runs, pairs, strict=True)):  # cached, but its file was deleted
        if not Path(run["onnx"]).is_file():
            runs[i] = compress.with_options(refresh_cache=True)(checkpoint, m, r, run["onnx"], reference_onnx,
                                                                finetune_steps, quantize, threads, distill)

    shifted = shift_images_task.with_options(**storage)(image, truth_csv, shift_names,
                                                        str(out_dir / "shifts"))
    evaluate = evaluate_task.with_options(**storage)
    dense_eval = evaluate(reference_onnx, image, truth_csv, shifted, threads)
    eval_futures = evaluate.map([r["onnx"] for r in runs], unmapped(image), unmapped(truth_csv),
                                unmapped(shifted), unmapped(threads))
    evaluations = [f.result() for f in eval_futures]
    dense = {"onnx": reference_onnx, "size_mb": Path(reference_onnx).stat().st_size / 1e6}
    return report_task.with_options(**storage)(dense, runs, evaluations, dense_eval, str(out_dir))
