"""The crown-model compression study: every method at several MAC-reduction ratios, fine-tuned with LR
rewinding on the crown training data, exported for the engine, and measured (F1 on OSBS_029 through the
engine stages, F1 under each drone shift, ONNX Runtime latency). Results go to one JSON file that
``models.compression.report`` turns into ``models/zoo/COMPRESSION.md``; finished runs are skipped on a
rerun, so the study resumes after an interruption.

    python -m models.compression.crown_study --checkpoint checkpoints/crowns/last.pt \
        --dense-onnx models/zoo/crowns-dense.onnx --methods pfp,alds,l1 --ratios 0.7,0.8
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.compression.compress import compress, export_compressed
from models.compression.finetune import MixupViews, finetune, rewound_schedule
from models.compression.results import load_results, save_results
from models.compression.robustness import SHIFTS, evaluate_f1, evaluate_under_shifts, shifted_copies


@dataclass
class StudyConfig:
    checkpoint: str
    dense_onnx: str
    out_dir: str = "out/compression"
    results: str = "models/zoo/compression_results.json"
    methods: list[str] = field(default_factory=lambda: ["pfp", "alds", "l1", "uniform", "random", "sipp"])
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.5])
    budget: str = "macs"
    finetune_steps: int = 60
    finetune_batch: int = 4
    finetune_seconds: float = 300.0
    random_candidates: int = 3
    calib_images: int = 8
    calib_px: int = 128
    plan_px: int = 256
    round_to: int | None = 8
    alds_k_max: int = 8
    tag: str = ""  # suffix of the run keys/files, e.g. "-ft100" for a longer fine-tune of the same method
    distill: float = 0.0  # weight of distillation from the dense model in the fine-tune loss (0: none)
    distill_mixup: float = 0.0  # > 0: distil on mixup views with lam ~ Beta(a, a) (function matching)
    prune_steps: int = 1  # > 1: iterative prune-retrain cycles (structured methods), fine-tune steps split
    finetune_seed: int = 0  # which stream of training batches the fine-tune draws (a repeat of a recipe)
    threads: int = 2
    image: str = "sample_data/OSBS_029.tif"
    truth: str = "sample_data/OSBS_029.csv"
    shifts: list[str] = field(default_factory=lambda: list(SHIFTS))


class CrownData:
    """Training batches and calibration tiles of the crown model (its own training data, never OSBS)."""

    def __init__(self, train_cfg, batch_size: int):
        from models.datasets.savanna import crown_bank
        from models.train_crowns import load_scenes, load_synthetic_scenes

        self.cfg = copy.deepcopy(train_cfg)
        self.cfg.batch_size = batch_size
        self.scenes = load_scenes(self.cfg)
        self.bank = crown_bank(self.scenes)
        self.synthetic = load_synthetic_scenes(self.cfg)  # the same mix the dense model trained on

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from models.train_crowns import make_batch, normalise

        x, y = make_batch(step, self.cfg, self.scenes, self.bank, self.synthetic)
        return normalise(x), y

    def calibration(self, n: int, px: int, offset: int = 10_000_000) -> list[torch.Tensor]:
        """``n`` normalised float training crops of ``px`` px (for the data-informed sensitivities)."""
        xs = []
        step = 0
        while sum(len(x) for x in xs) < n:
            x, _ = self.batch(offset + step)
            xs.append(x[:, :, :px, :px])
            step += 1
        return [torch.cat(xs)[:n]]

    def uint8_tiles(self, n: int, size: int, offset: int = 20_000_000) -> np.ndarray:
        """Raw uint8 training chips for static int8 calibration, padded/cropped to ``size``."""
        from models.train_crowns import make_batch

        out = []
        step = 0
        while len(out) < n:
            x, _ = make_batch(offset + step, self.cfg, self.scenes, self.bank, self.synthetic)
            for img in x.clamp(0, 255).byte().numpy():
                tile = np.zeros((3, size, size), np.uint8)
                h, w = min(size, img.shape[1]), min(size, img.shape[2])
                tile[:, :h, :w] = img[:, :h, :w]
                out.append(tile)
            step += 1
        return np.stack(out[:n])


def _loss_fn(train_cfg) -> nn.Module:
    from models.datasets.chips import IGNORE

    return nn.CrossEntropyLoss(
        weight=torch.tensor(train_cfg.class_weights, dtype=torch.float32), ignore_index=IGNORE
    )


def trained_steps(checkpoint: str | Path) -> int:
    """Steps the checkpoint was trained for (the point LR rewinding replays the schedule up to)."""
    from models.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint)["step"])


def run_finetune(
    net: nn.Module,
    data: CrownData,
    train_cfg,
    steps: int,
    seconds: float,
    masks=None,
    step_offset: int = 5_000_000,
    log=print,
    total_steps: int | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    distill_mixup: float = 0.0,
) -> dict:
    """LR-rewinding fine-tune: replay the ``steps`` schedule steps before ``total_steps`` (default: the
    configured iterations) of the crown model's own LR schedule; with a ``teacher``, distil from it (on
    mixup views of each batch when ``distill_mixup`` > 0)."""
    from models.train_crowns import _lr_factor

    total = int(total_steps or train_cfg.iterations)
    sched = rewound_schedule(lambda s: _lr_factor(s, train_cfg), total, steps)
    rec = finetune(
        net,
        lambda i: data.batch(step_offset + i),
        _loss_fn(train_cfg),
        steps,
        train_cfg.lr,
        sched,
        train_cfg.weight_decay,
        masks=masks,
        time_limit_s=seconds,
        log=log,
        teacher=teacher,
        distill_weight=distill_weight,
        distill_inputs=MixupViews(distill_mixup, seed=step_offset) if distill_mixup > 0 else None,
    )
    rec["lr_rewinding"] = f"LR schedule replayed from step {max(0, total - steps)} to {total}"
    return rec


def study_finetune(net: nn.Module, dense_net: nn.Module, data: CrownData, train_cfg, cfg: StudyConfig,
                   total: int, steps: int, seconds: float, masks=None, log=print) -> dict:
    """``run_finetune`` with the study's recipe: distillation from ``dense_net`` (``cfg.distill``, on mixup
    views with ``cfg.distill_mixup``) and the batch stream of ``cfg.finetune_seed`` (seed 0: the original
    stream from index 5,000,000; each further seed a disjoint one, batches being a pure function of their
    index)."""
    return run_finetune(net, data, train_cfg, steps, seconds, masks=masks, log=log, total_steps=total,
                        teacher=dense_net if cfg.distill > 0 else None, distill_weight=cfg.distill,
                        distill_mixup=cfg.distill_mixup,
                        step_offset=5_000_000 + 1_000_000 * cfg.finetune_seed)


def iterative_run(dense_net: nn.Module, method: str, ratio: float, shape: tuple[int, int, int], calib,
                  data: CrownData, train_cfg, cfg: StudyConfig, total: int, log=print):
    """``cfg.prune_steps`` prune-retrain cycles reaching ``ratio`` of the dense MACs (each cycle removes the
    same share of what is left, sensitivities recomputed on the current network); each retrain replays the
    last ``finetune_steps / prune_steps`` steps of the schedule (LR rewinding per cycle)."""
    from models.compression.compress import STRUCTURED, CompressionResult
    from models.compression.cost import count_cost
    from models.compression.finetune import iterative_prune

    if method not in STRUCTURED:
        raise ValueError(f"--prune-steps needs a structured method {STRUCTURED}, got {method}")
    cycles: list[dict] = []

    def compress_step(net: nn.Module, q: float) -> nn.Module:
        r = compress(net, method, q, shape, calibration=calib, budget=cfg.budget, round_to=cfg.round_to)
        cycles.append({k: r.details[k] for k in ("epsilon", "max_relative_error") if k in r.details})
        return r.model

    def retrain(net: nn.Module) -> dict:
        return study_finetune(net, dense_net, data, train_cfg, cfg, total,
                              cfg.finetune_steps // cfg.prune_steps, cfg.finetune_seconds / cfg.prune_steps,
                              log=log)

    model, history = iterative_prune(dense_net, compress_step, retrain, ratio, cfg.prune_steps)
    for h, c in zip(history, cycles, strict=True):
        h.update(c)
    ft = {
        "steps": sum(h["retrain"]["steps"] for h in history),
        "seconds": round(sum(h["retrain"]["seconds"] for h in history), 1),
        "cycles": history,
    }
    return CompressionResult(model, method, ratio, cfg.budget, shape, count_cost(dense_net, shape),
                             count_cost(model, shape), details={"finetune": ft})


def validation_score(net: nn.Module, data: CrownData, train_cfg, postprocess: dict) -> float:
    """Mean F1@0.4 on the crown model's held-out validation (2 open-ground chips; selection only, never
    OSBS)."""
    m = heldout_validation(net, data, train_cfg, postprocess, n_savanna=2)
    f1s = [v for k, v in m.items() if k.endswith("_f1_iou0.4")]
    return float(np.mean(f1s)) if f1s else 0.0


def heldout_validation(net: nn.Module, data: CrownData, train_cfg, postprocess: dict,
                       n_savanna: int = 8) -> dict:
    """Held-out validation scores of a (compressed) torch network with the dense model's postprocess:
    real YELL + SOAP blocks and ``n_savanna`` open-ground chips of held-out crowns (8: the model card's)."""
    from models.train_crowns import score_cases, validation_cases

    cases = validation_cases(net.eval(), data.scenes, train_cfg, n_savanna=n_savanna)
    return {k: round(float(v), 4) for k, v in score_cases(cases, postprocess, train_cfg.gsd_m).items()}


def evaluate_onnx(path: str | Path, cfg: StudyConfig, shift_images: dict[str, tuple[str, str]],
                  against_dense: bool = False) -> dict:
    """Nominal and per-shift F1@0.4 on the study image through ``forest-inventory evaluate``'s code path;
    ``against_dense`` adds ``paired_vs_dense`` from the same nominal prediction (``evaluate --compare-to``:
    the difference to the dense model with its paired block-bootstrap interval)."""
    ev = evaluate_under_shifts(path, cfg.image, cfg.truth, shift_images, cfg.threads,
                               compare_to=cfg.dense_onnx if against_dense else None)
    if against_dense:
        ev["paired_vs_dense"] = ev.pop("paired")
    return ev


def add_paired(cfg: StudyConfig, log=print) -> dict:
    """Give every finished run without one its paired comparison with the dense model."""
    results = load_results(cfg.results)
    for key, r in results["runs"].items():
        if "paired_vs_dense" not in r and Path(r["onnx"]).exists():
            r["paired_vs_dense"] = evaluate_f1(r["onnx"], cfg.image, cfg.truth, cfg.threads,
                                               compare_to=cfg.dense_onnx)["paired"]
            p = r["paired_vs_dense"]
            log(f"{key}: {p['delta_points']:+.1f} F1 points, 90 % interval {p['ci_points']}")
    save_results(cfg.results, results)
    return results


def prepare_shift_images(cfg: StudyConfig) -> dict[str, tuple[str, str]]:
    """Shifted copies of the evaluation image and their reference CSVs (written once)."""
    return shifted_copies(cfg.image, cfg.truth, cfg.shifts, Path(cfg.out_dir) / "shifts")


def run_entry(res, cfg: StudyConfig, path: Path, record: dict, ev: dict, seconds: float, **extra) -> dict:
    """The results-JSON entry of one finished run: its recipe, sizes, ONNX file and evaluation ``ev``."""
    return {
        "method": res.method,
        "ratio": res.target_ratio,
        "tag": cfg.tag,
        "onnx": str(path),
        "record": record,
        **extra,
        "params": res.after.params,
        "nonzero_params": res.after.nonzero_params,
        "macs": res.after.macs,
        "size_mb": path.stat().st_size / 1e6,
        "seconds": round(seconds, 1),
        **ev,
    }


def engine_metadata(onnx_path: str | Path, train_cfg) -> tuple[dict, dict, int]:
    """The engine metadata of a crown ONNX model without its compression record (the template of every
    compressed copy), its postprocess thresholds and its tile size (px)."""
    from models.export import read_metadata

    meta = read_metadata(onnx_path)
    meta.pop("compression", None)
    return meta, json.loads(meta.get("postprocess", "{}")), int(meta.get("tile_size", train_cfg.tile_size))


def export_and_evaluate(res, cfg: StudyConfig, dense_meta: dict, tile: int, shift_images, data: CrownData,
                        train_cfg, postprocess: dict) -> tuple[Path, dict, dict]:
    """Export a finished run for the engine (``crowns-<method>-<pct><tag>.onnx`` + its plain state dict
    ``.pt``) and evaluate it: study image, shifts, paired comparison with the dense model, validation.
    Returns (ONNX path, compression record, evaluation)."""
    pct = int(round(res.target_ratio * 100))
    stem = f"crowns-{res.method}-{pct}{cfg.tag}"
    path = Path(cfg.out_dir) / f"{stem}.onnx"
    meta = dict(dense_meta, model_version=f"{dense_meta.get('model_version', 'crowns')}+{res.method}{pct}")
    record = export_compressed(res, path, tile, metadata=meta)
    ev = evaluate_onnx(path, cfg, shift_images, against_dense=True)
    ev["validation"] = heldout_validation(res.model, data, train_cfg, postprocess)
    # a plain state dict: loaded with weights_only=True and rebuilt by structured.rebuild_pruned
    torch.save(res.model.state_dict(), path.with_suffix(".pt"))
    return path, record, ev


def run_study(cfg: StudyConfig, log=print) -> dict:
    from models.train_crowns import load_crown_net

    torch.set_num_threads(cfg.threads)
    results = load_results(cfg.results)
    results["config"] = asdict(cfg)
    dense_net, train_cfg = load_crown_net(cfg.checkpoint)
    dense_meta, postprocess, tile = engine_metadata(cfg.dense_onnx, train_cfg)
    shift_images = prepare_shift_images(cfg)
    if "dense" not in results:
        from models.compression.cost import count_cost

        c = count_cost(dense_net, (3, tile, tile))
        results["dense"] = {
            "onnx": cfg.dense_onnx,
            "params": c.params,
            "macs": c.macs,
            "size_mb": Path(cfg.dense_onnx).stat().st_size / 1e6,
            **evaluate_onnx(cfg.dense_onnx, cfg, shift_images),
        }
        save_results(cfg.results, results)
        log(f"dense: F1 {results['dense']['f1']:.3f}")
    if "onnx_fast_softmax" not in results["dense"] and _has_softmax_op(cfg.dense_onnx):
        # a dense file exported with ONNX Softmax (older zoo models): time the channel-softmax twin too
        from models.compression.compress import export_engine_onnx

        fs_path = Path(cfg.out_dir) / "crowns-dense-fastsoftmax.onnx"
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        export_engine_onnx(dense_net, fs_path, tile, dense_meta)
        results["dense"]["onnx_fast_softmax"] = str(fs_path)
        results["dense"]["f1_fast_softmax"] = evaluate_f1(fs_path, cfg.image, cfg.truth, threads=cfg.threads)[
            "f1"
        ]
        save_results(cfg.results, results)
    data = CrownData(train_cfg, cfg.finetune_batch)
    calib = data.calibration(cfg.calib_images, cfg.calib_px)
    total = trained_steps(cfg.checkpoint)
    results["dense"]["trained_steps"] = total
    if "validation" not in results["dense"]:
        results["dense"]["validation"] = heldout_validation(dense_net, data, train_cfg, postprocess)
        save_results(cfg.results, results)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    for ratio in cfg.ratios:
        for method in cfg.methods:
            key = f"{method}@{ratio:g}{cfg.tag}"
            if key in results["runs"]:
                continue
            t0 = time.time()
            log(f"{key}: compressing")
            shape = (3, cfg.plan_px, cfg.plan_px)
            if method == "random":
                best = None
                cands = []
                for i in range(cfg.random_candidates):
                    r = compress(
                        dense_net, "random", ratio, shape, budget=cfg.budget, round_to=cfg.round_to, seed=i
                    )
                    run_finetune(
                        r.model,
                        data,
                        train_cfg,
                        max(1, cfg.finetune_steps // cfg.random_candidates),
                        cfg.finetune_seconds / cfg.random_candidates,
                        log=log,
                        total_steps=total,
                    )
                    score = validation_score(r.model, data, train_cfg, postprocess)
                    cands.append({"seed": i, "val_f1": score})
                    if best is None or score > best[0]:
                        best = (score, r)
                res = best[1]
                res.details["candidates"] = cands
            elif cfg.prune_steps > 1:
                res = iterative_run(dense_net, method, ratio, shape, calib, data, train_cfg, cfg, total, log)
            else:
                res = compress(
                    dense_net,
                    method,
                    ratio,
                    shape,
                    calibration=calib,
                    budget=cfg.budget,
                    round_to=cfg.round_to,
                    alds_k_max=cfg.alds_k_max,
                )
            if "finetune" in res.details:  # the iterative schedule fine-tuned after every cycle
                ft = res.details["finetune"]
            else:
                masks = res.details.get("masks") if method == "sipp" else None
                ft = study_finetune(res.model, dense_net, data, train_cfg, cfg, total, cfg.finetune_steps,
                                    cfg.finetune_seconds, masks, log=log)
            res.details["finetune"] = ft
            from models.compression.cost import count_cost

            res.before = count_cost(dense_net, (3, tile, tile))
            res.after = count_cost(res.model, (3, tile, tile))
            res.input_shape = (3, tile, tile)
            path, record, ev = export_and_evaluate(res, cfg, dense_meta, tile, shift_images, data, train_cfg,
                                                   postprocess)
            results["runs"][key] = run_entry(res, cfg, path, record, ev, time.time() - t0)
            save_results(cfg.results, results)
            log(
                f"{key}: F1 {ev['f1']:.3f} params {res.after.params / 1e6:.2f}M "
                f"macs {res.after.macs / 1e9:.2f}G "
                f"({time.time() - t0:.0f} s)"
            )
    return results


def quantize_run(cfg: StudyConfig, key: str, n_tiles: int = 32) -> dict:
    """Static int8 QDQ copy of one finished run (calibrated on crown training tiles); evaluated too."""
    from models.export import quantize_static_qdq
    from models.train_crowns import load_crown_net

    results = load_results(cfg.results)
    run = results["runs"][key]
    _, train_cfg = load_crown_net(cfg.checkpoint)
    data = CrownData(train_cfg, 8)
    tile = int(run["record"]["input_shape"][-1])
    q_path = Path(run["onnx"]).with_suffix(".int8.onnx")
    quantize_static_qdq(
        run["onnx"],
        q_path,
        data.uint8_tiles(n_tiles, tile),
        per_channel=True,
        extra_metadata={"compression": dict(run["record"], quantization="static int8 QDQ")},
    )
    ev = evaluate_onnx(q_path, cfg, prepare_shift_images(cfg))
    results["runs"][key + "+int8"] = dict(
        run, onnx=str(q_path), size_mb=q_path.stat().st_size / 1e6, quantized=True, **ev
    )
    save_results(cfg.results, results)
    return results["runs"][key + "+int8"]


def recalibrate_run(cfg: StudyConfig, key: str, log=print) -> dict:
    """Give one finished run post-processing thresholds of its own, chosen exactly as the dense model's were.

    A pruned network's class probabilities are not calibrated like the dense network's, so the dense
    model's thresholds (used for every run by default) can cost it crowns. This grid-searches
    :data:`models.train_crowns.PARAM_GRID` on the run's held-out validation (real blocks + 8 open-ground
    chips; never the study image), writes a copy of the run's ONNX with those thresholds in its metadata
    (``<name>-cal.onnx``) and evaluates it as a new run ``<key>-cal``: study image, shifts, validation."""
    from models.compression.structured import rebuild_pruned
    from models.export import copy_with_metadata
    from models.train_crowns import calibrate_on_validation, load_crown_net, load_scenes
    from pipeline.errors import InputError

    results = load_results(cfg.results)
    if key not in results["runs"]:
        raise InputError(f"{cfg.results}: no run {key!r}; finished runs: {', '.join(results['runs'])}")
    run = results["runs"][key]
    src = Path(run["onnx"])
    dense, train_cfg = load_crown_net(cfg.checkpoint)
    net = rebuild_pruned(dense, torch.load(src.with_suffix(".pt"), weights_only=True))
    post, metrics = calibrate_on_validation(net, load_scenes(train_cfg), train_cfg, log=log)
    dst = copy_with_metadata(src, src.with_name(src.stem + "-cal.onnx"), {"postprocess": post})
    ev = evaluate_onnx(dst, cfg, prepare_shift_images(cfg), against_dense=True)
    new = dict(run, onnx=str(dst), tag=run.get("tag", "") + "-cal", postprocess=post,
               postprocess_source="own held-out validation (models.train_crowns.calibrate_postprocess)",
               validation=metrics, **ev)
    new.pop("latency", None)
    new.pop("latency_session", None)
    results["runs"][key + "-cal"] = new
    save_results(cfg.results, results)
    log(f"{key}-cal: postprocess {post}: F1 {ev['f1']:.3f}")
    return new


SOUP_BN_OFFSET = 40_000_000  # training-batch stream of the soup's batch-norm re-estimation


def soup_run(cfg: StudyConfig, keys: list[str], bn_batches: int = 100, log=print) -> dict:
    """Average the weights of finished runs ``keys`` (fine-tunes of one pruned network on different batch
    streams, e.g. ``--finetune-seed`` repeats), re-estimate batch norm on ``bn_batches`` training batches,
    export and evaluate the soup as run ``<method>@<ratio><cfg.tag>`` like any other run (study image,
    shifts, paired comparison, validation)."""
    from models.compression.compress import CompressionResult
    from models.compression.cost import count_cost
    from models.compression.soup import reestimate_batchnorm, soup_state_dicts
    from models.compression.structured import rebuild_pruned
    from models.train_crowns import load_crown_net
    from pipeline.errors import InputError

    results = load_results(cfg.results)
    missing = [k for k in keys if k not in results["runs"]]
    if missing or len(keys) < 2:
        raise InputError(f"{cfg.results}: a soup needs >= 2 finished runs; not found: {missing or keys}; "
                         f"finished runs: {', '.join(results['runs'])}")
    members = [results["runs"][k] for k in keys]
    recipe = {(m["method"], m["ratio"]) for m in members}
    if len(recipe) != 1:
        raise InputError(f"soup members must share method and ratio, got {sorted(recipe)}")
    method, ratio = recipe.pop()
    key = f"{method}@{ratio:g}{cfg.tag}"
    torch.set_num_threads(cfg.threads)
    dense_net, train_cfg = load_crown_net(cfg.checkpoint)
    dense_meta, postprocess, tile = engine_metadata(cfg.dense_onnx, train_cfg)
    shape = (3, tile, tile)
    before = count_cost(dense_net, shape)
    t0 = time.time()
    states = [torch.load(Path(m["onnx"]).with_suffix(".pt"), weights_only=True) for m in members]
    net = rebuild_pruned(dense_net, soup_state_dicts(states))  # rebuilds dense_net in place
    data = CrownData(train_cfg, cfg.finetune_batch)
    n_bn = reestimate_batchnorm(net, (data.batch(SOUP_BN_OFFSET + i)[0] for i in range(bn_batches)))
    res = CompressionResult(net, method, ratio, cfg.budget, shape, before, count_cost(net, shape),
                            details={"soup_of": keys, "bn_reestimated_batches": n_bn})
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    path, record, ev = export_and_evaluate(res, cfg, dense_meta, tile, prepare_shift_images(cfg), data,
                                           train_cfg, postprocess)
    results = load_results(cfg.results)  # re-read: the evaluation took minutes
    results["runs"][key] = run_entry(res, cfg, path, record, ev, time.time() - t0, soup_of=keys)
    save_results(cfg.results, results)
    log(f"{key} (soup of {', '.join(keys)}): F1 {ev['f1']:.3f}")
    return results["runs"][key]


def _has_softmax_op(onnx_path: str | Path) -> bool:
    import onnx

    return any(n.op_type == "Softmax" for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def reevaluate(cfg: StudyConfig, log=print) -> dict:
    """Recompute every F1 (dense, dense channel-softmax, all runs) with the official evaluator."""
    results = load_results(cfg.results)
    shift_images = prepare_shift_images(cfg)
    d = results["dense"]
    d.update(evaluate_onnx(d["onnx"], cfg, shift_images))
    if d.get("onnx_fast_softmax"):
        d["f1_fast_softmax"] = evaluate_f1(d["onnx_fast_softmax"], cfg.image, cfg.truth, cfg.threads)["f1"]
    save_results(cfg.results, results)
    log(f"dense: F1 {d['f1']:.3f}")
    for key, r in results["runs"].items():
        if r.get("evaluator", "").startswith("pipeline.evaluation.run"):
            continue
        r.update(evaluate_onnx(r["onnx"], cfg, shift_images))
        save_results(cfg.results, results)
        log(f"{key}: F1 {r['f1']:.3f}")
    return results


def latency_path(results_path: str | Path) -> Path:
    """Latency sessions live beside the results (``*.latency.json``) so that timing can run while the
    study is still adding runs to the results file."""
    p = Path(results_path)
    return p.with_name(p.stem + ".latency.json")


def merge_latency(results: dict, latency: dict) -> dict:
    """Copy the latency sessions into the results: per run its latency and its session's dense times."""
    results = copy.deepcopy(results)
    sessions = latency.get("sessions", [])
    results["latency_sessions"] = [{k: v for k, v in s.items() if k != "models"} for s in sessions]
    for sess in sessions:
        meta = {k: v for k, v in sess.items() if k not in ("models", "runs_timed")}
        results["latency"] = meta
        models = sess["models"]
        dense = results["dense"]
        if dense["onnx"] in models:  # the latest session's dense figures
            dense["latency"] = models[dense["onnx"]]
            if dense.get("onnx_fast_softmax") in models:
                dense["latency_fast_softmax"] = models[dense["onnx_fast_softmax"]]
        for key in sess.get("runs_timed", []):
            if key in results["runs"]:
                results["runs"][key]["latency"] = models[results["runs"][key]["onnx"]]
                results["runs"][key]["latency_session"] = meta
    return results


def add_latency(
    cfg: StudyConfig,
    runs: int = 50,
    warmup: int = 10,
    keys: list[str] | None = None,
    skip_methods: tuple[str, ...] = (),
) -> dict:
    """Round-robin ONNX Runtime latency of the dense models and the runs ``keys`` (default: the finished
    runs not timed yet, except ``skip_methods``), timed in ONE session so their ratios are comparable.
    Appends the session to ``*.latency.json``; every run keeps its session's dense times for its speed-up."""
    from models.latency import bench

    results = load_results(cfg.results)
    lat_file = latency_path(cfg.results)
    latency = json.loads(lat_file.read_text()) if lat_file.exists() else {"sessions": []}
    timed = {k for s in latency["sessions"] for k in s.get("runs_timed", [])}
    fs = results["dense"].get("onnx_fast_softmax")
    if keys is None:
        keys = [k for k, r in results["runs"].items() if k not in timed and r["method"] not in skip_methods]
    paths = [results["dense"]["onnx"]] + ([fs] if fs else []) + [results["runs"][k]["onnx"] for k in keys]
    b = bench(paths, threads=cfg.threads, warmup=warmup, runs=runs)
    session = {k: v for k, v in b.items() if k != "models"}
    session["dense_ms"] = b["models"][results["dense"]["onnx"]]["median_ms"]
    if fs:
        session["dense_fast_softmax_ms"] = b["models"][fs]["median_ms"]
    session["runs_timed"] = keys
    session["models"] = b["models"]
    latency["sessions"].append(session)
    save_results(lat_file, latency)
    return merge_latency(results, latency)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="crown-model compression study")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dense-onnx", required=True)
    ap.add_argument("--methods", default="pfp,alds,l1,uniform,random,sipp")
    ap.add_argument("--ratios", default="0.7,0.8,0.5")
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--finetune-seconds", type=float, default=300.0)
    ap.add_argument("--results", default="models/zoo/compression_results.json")
    ap.add_argument("--out-dir", default="out/compression")
    ap.add_argument("--reevaluate", action="store_true", help="only recompute F1 with the official evaluator")
    ap.add_argument(
        "--latency", action="store_true", help="only measure latency of finished, unmeasured runs"
    )
    ap.add_argument("--paired", action="store_true",
                    help="only add the paired F1 difference to the dense model (block bootstrap) to runs")
    ap.add_argument("--skip-latency-methods", default="sipp", help="methods not timed (sipp: dense shapes)")
    ap.add_argument("--quantize", default=None, help="only quantize this finished run key, e.g. pfp@0.7")
    ap.add_argument("--recalibrate", default=None,
                    help="only give this finished run key its own postprocess thresholds (validation)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch/ORT threads")
    ap.add_argument("--tag", default="", help="suffix of run keys and files (e.g. -ft100)")
    ap.add_argument("--shifts", default=",".join(SHIFTS), help="comma-separated shift names")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of distillation from the dense model in the fine-tune loss (0: none)")
    ap.add_argument("--prune-steps", type=int, default=1,
                    help="> 1: iterative prune-retrain cycles; the fine-tune steps are split across them")
    ap.add_argument("--finetune-seed", type=int, default=0,
                    help="training-batch stream of the fine-tune (repeat a recipe with another seed)")
    ap.add_argument("--distill-mixup", type=float, default=0.0,
                    help="> 0: distil on mixup views of each batch, lam ~ Beta(A, A) (function matching)")
    ap.add_argument("--soup", default=None,
                    help="only average the weights of these finished runs (comma-separated keys of one "
                         "method and ratio, e.g. --finetune-seed repeats) into run <method>@<ratio><tag>")
    ap.add_argument("--soup-bn-batches", type=int, default=100,
                    help="training batches for the soup's batch-norm re-estimation")
    a = ap.parse_args(argv)
    cfg = StudyConfig(
        checkpoint=a.checkpoint,
        dense_onnx=a.dense_onnx,
        out_dir=a.out_dir,
        results=a.results,
        methods=a.methods.split(","),
        ratios=[float(r) for r in a.ratios.split(",")],
        finetune_steps=a.finetune_steps,
        finetune_seconds=a.finetune_seconds,
        threads=a.threads,
        shifts=a.shifts.split(","),
        tag=a.tag,
        distill=a.distill,
        distill_mixup=a.distill_mixup,
        prune_steps=a.prune_steps,
        finetune_seed=a.finetune_seed,
    )
    if a.reevaluate:
        reevaluate(cfg)
    elif a.paired:
        add_paired(cfg)
    elif a.latency:
        add_latency(cfg, runs=a.runs, skip_methods=tuple(m for m in a.skip_latency_methods.split(",") if m))
    elif a.quantize:
        print(json.dumps(quantize_run(cfg, a.quantize), indent=1))
    elif a.recalibrate:
        recalibrate_run(cfg, a.recalibrate)
    elif a.soup:
        soup_run(cfg, a.soup.split(","), bn_batches=a.soup_bn_batches)
    else:
        run_study(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def compress_crown_checkpoint(
    checkpoint: str | Path,
    method: str,
    target_ratio: float,
    out: str | Path | None = None,
    finetune_steps: int = 0,
    quantize: bool = False,
    reference_onnx: str | Path | None = None,
    budget: str = "macs",
    threads: int = 2,
    log=print,
    distill: float = 0.0,
    score_steps: int = 200,
    recalibrate: bool = False,
) -> dict:
    """Compress a crown-model checkpoint and export it for the engine (the ``compress`` command).

    Metadata (postprocess, GSD, tile size, ...) is copied from ``reference_onnx`` (default: the dense
    zoo model) and a ``compression`` record is added. ``finetune_steps`` > 0 fine-tunes with LR rewinding
    on the crown training data, with ``distill`` > 0 the weight of distillation from the dense network in
    that loss; ``quantize`` also writes a static int8 QDQ copy (``*.int8.onnx``); ``score_steps``: the
    learned-score steps of ``sbf``; ``recalibrate`` chooses the compressed network's own post-processing
    thresholds on the training run's validation (:func:`models.train_crowns.calibrate_on_validation`: the
    validation plots of a plot-split run) instead of copying the reference's.
    """
    from models.compression.compress import DATA_INFORMED, METHODS
    from models.train_crowns import load_crown_net
    from pipeline.errors import InputError

    if method not in METHODS:
        raise InputError(f"--method {method!r} is unknown: use one of {', '.join(METHODS)}")
    if not 0.0 < target_ratio < 1.0:
        raise InputError(f"--target {target_ratio} must be the fraction removed, between 0 and 1 (e.g. 0.7)")
    if not 0.0 <= distill <= 1.0:
        raise InputError(f"--distill {distill} must be a loss weight between 0 and 1 (e.g. 0.5)")
    if score_steps < 1:
        raise InputError(f"--score-steps {score_steps} must be at least 1 (e.g. 200)")
    torch.set_num_threads(max(1, threads))
    net, train_cfg = load_crown_net(checkpoint)
    zoo = Path(__file__).resolve().parents[1] / "zoo"
    if reference_onnx is None:
        for cand in (zoo / "crowns-dense.onnx", zoo / "crowns.onnx"):
            if cand.exists():
                reference_onnx = cand
                break
    if reference_onnx is None or not Path(reference_onnx).exists():
        raise InputError(
            "no reference crown ONNX for the metadata: pass --reference-onnx models/zoo/crowns-dense.onnx"
        )
    meta, _, tile = engine_metadata(reference_onnx, train_cfg)
    pct = int(round(target_ratio * 100))
    out = Path(out) if out else Path("out/compress") / f"crowns-{method}-{pct}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    needs_data = method in DATA_INFORMED or finetune_steps > 0 or quantize
    data = CrownData(train_cfg, 4) if needs_data else None
    calib = data.calibration(8, 128) if method in DATA_INFORMED else None
    res = compress(net, method, target_ratio, (3, 256, 256), calibration=calib, budget=budget, round_to=8,
                   score_steps=score_steps)
    if finetune_steps > 0:
        masks = res.details.get("masks") if method == "sipp" else None
        res.details["finetune"] = run_finetune(
            res.model,
            data,
            train_cfg,
            finetune_steps,
            1e9,
            masks=masks,
            log=log,
            total_steps=trained_steps(checkpoint),
            teacher=net if distill > 0 else None,  # compress() pruned a copy: net is still dense
            distill_weight=distill,
        )
    from models.compression.cost import count_cost

    res.before = count_cost(net, (3, tile, tile))
    res.after = count_cost(res.model, (3, tile, tile))
    res.input_shape = (3, tile, tile)
    meta["model_version"] = f"{meta.get('model_version', 'crowns')}+{method}{pct}"
    if recalibrate:
        from models.train_crowns import calibrate_on_validation, load_scenes

        scenes = data.scenes if data is not None else load_scenes(train_cfg)  # read once when fine-tuned
        post, metrics = calibrate_on_validation(res.model.eval(), scenes, train_cfg, log=log)
        meta["postprocess"], meta["validation_metrics"] = post, {**metrics, "postprocess_source": "own"}
    q_path = out.with_suffix(".int8.onnx") if quantize else None
    tiles = data.uint8_tiles(32, tile) if quantize else None
    record = export_compressed(res, out, tile, metadata=meta, calibration_tiles=tiles, quantized_path=q_path)
    return {"onnx": str(out), "int8_onnx": str(q_path) if q_path else None, "record": record}
