"""The species-model compression study: PFP, SiPP, ALDS and the L1 / uniform baselines at several
MAC-reduction ratios, each fine-tuned with LR rewinding on the species training chips, exported for the
engine and measured (parameters, MACs, ONNX size, ONNX Runtime latency at batch 64 and 1, macro-F1 and
accuracy on the synthetic test seed through ``pipeline.species.classify_crowns``).

The dense weights are the training run's ``species_best.pt`` (state_dict + config, ``weights_only=True``);
when the checkpoint is missing the study first trains it with the model card's configuration
(``SpeciesTrainConfig(out_dir=<checkpoint folder>, model_version="species-synthetic-1")``). Results go to
one JSON file (finished runs are skipped on a rerun) and a markdown report.

    python -m models.compression.species_study --threads 1
    python -m models.compression.species_study --latency-only     # re-time every model, one session
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.compression.compress import compress, export_compressed
from models.compression.cost import count_cost
from models.compression.finetune import finetune, rewound_schedule
from models.compression.results import load_results, save_results
from pipeline.atomic import atomic_path

SPECIES_METHODS = ("pfp", "l1", "uniform", "sipp", "alds")
# run variants: a method name, "-r1" = structured widths not rounded to multiples of ``round_to``,
# "-k1" = ALDS with k = 1 only (plain SVD pairs, no grouped convs)
SPECIES_VARIANTS = ("pfp", "l1", "uniform", "sipp", "alds", "pfp-r1", "l1-r1", "uniform-r1", "alds-k1")
CONTROL = "dense-ft"  # the dense net fine-tuned with the same schedule: what the fine-tune alone does


def default_dense_onnx(zoo: str | Path = "models/zoo") -> str:
    """The dense species model: ``species-dense.onnx`` once a compressed model is shipped, else
    ``species.onnx``."""
    dense = Path(zoo) / "species-dense.onnx"
    return str(dense if dense.exists() else Path(zoo) / "species.onnx")


@dataclass
class SpeciesStudyConfig:
    """Every setting of one study run (stored in the results JSON)."""

    checkpoint: str = "checkpoints/species/species_best.pt"
    dense_onnx: str = field(default_factory=lambda: default_dense_onnx())
    out_dir: str = "out/species_compression"
    results: str = "models/zoo/species_compression_results.json"
    report: str = "models/zoo/SPECIES_COMPRESSION.md"
    methods: list[str] = field(default_factory=lambda: list(SPECIES_VARIANTS))
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.7])
    budget: str = "macs"
    control: bool = True  # also fine-tune the dense net (ratio 0) with the same schedule
    finetune_steps: int = 240  # half of the original 480-step schedule, replayed from step 240
    calib_chips: int = 32
    round_to: int = 8  # structured widths in multiples of 8 (ONNX Runtime's blocked conv kernels)
    alds_k_max: int = 8
    threads: int = 1  # torch threads (training, compression)
    ort_threads: int = 2  # ONNX Runtime intra-op threads (latency, evaluation uses 2 as the engine test)
    latency_runs: int = 100
    latency_warmup: int = 10
    latency_batches: list[int] = field(default_factory=lambda: [64, 1])
    seed: int = 0


# ---- results file ----------------------------------------------------------------------------------
# ---- dense model and data --------------------------------------------------------------------------
def ensure_checkpoint(checkpoint: str | Path, threads: int = 2, log=print) -> dict:
    """Train the species model with the model card's configuration when ``checkpoint`` is missing.

    ``train_species`` writes ``species_best.pt`` into its ``out_dir``, so the checkpoint's folder is the
    training folder. Returns {"trained": bool, "seconds": wall-clock s of the training, or None}.
    """
    path = Path(checkpoint)
    if path.exists():
        return {"trained": False, "seconds": None}
    if path.name != "species_best.pt":
        raise FileNotFoundError(f"{path}: missing, and only a species_best.pt can be retrained here")
    from models.train_species import SpeciesTrainConfig, train_species

    log(f"{path}: missing; training it with the model card's configuration (out_dir {path.parent})")
    t0 = time.perf_counter()
    train_species(SpeciesTrainConfig(out_dir=str(path.parent), model_version="species-synthetic-1",
                                     threads=threads), log=log)
    return {"trained": True, "seconds": round(time.perf_counter() - t0, 1)}


def load_species_checkpoint(path: str | Path) -> tuple[nn.Module, dict, list[str]]:
    """(SpeciesNet in eval mode, training config dict, class names) from ``species_best.pt``."""
    from models.species_net import SpeciesNet, SpeciesNetConfig

    ck = torch.load(Path(path), map_location="cpu", weights_only=True)
    nc = dict(ck["net_config"])
    nc["widths"] = tuple(nc["widths"])
    net = SpeciesNet(SpeciesNetConfig(**nc))
    net.load_state_dict(ck["state_dict"])
    return net.eval(), dict(ck["train_config"]), list(ck["class_names"])


class SpeciesData:
    """The species model's own training and validation chips (synthetic seeds of its training config)."""

    def __init__(self, train_cfg: dict, work_dir: str | Path, seed: int = 0):
        from models.datasets.species_chips import synthetic_species_chips

        c = train_cfg
        args = (c["scene_size_m"], c["scene_gsd_m"], c["chip_px"], c["chip_gsd_m"])
        self.train = synthetic_species_chips(work_dir, list(c["train_seeds"]), *args)
        self.val = synthetic_species_chips(work_dir, [c["val_seed"]], *args)
        self.batch_size = int(c["batch_size"])
        self.seed = seed
        self.x = torch.from_numpy(self.train.chips)
        self.y = torch.from_numpy(self.train.labels).long()
        k = len(self.train.class_names)
        counts = np.bincount(self.train.labels, minlength=k).astype(float)
        self.class_weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / k, dtype=torch.float32)
        self._orders: list[torch.Tensor] = []

    def steps_per_epoch(self) -> int:
        return max(1, int(np.ceil(len(self.train) / self.batch_size)))

    def _order(self, epoch: int) -> torch.Tensor:
        while len(self._orders) <= epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000 + len(self._orders) + 7)
            self._orders.append(torch.randperm(len(self.train), generator=g))
        return self._orders[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised augmented batch ``step`` (epoch-wise permutations; deterministic in ``step``)."""
        from models.export import normalise_uint8
        from models.train_species import augment

        spe = self.steps_per_epoch()
        idx = self._order(step // spe)[(step % spe) * self.batch_size:(step % spe + 1) * self.batch_size]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return normalise_uint8(augment(self.x[idx], g)), self.y[idx]

    def calibration(self, n: int) -> list[torch.Tensor]:
        """``n`` normalised, un-augmented training chips (one batch) for the data-informed methods."""
        from models.export import normalise_uint8

        g = torch.Generator().manual_seed(self.seed + 12_345)
        idx = torch.randperm(len(self.train), generator=g)[:n]
        return [normalise_uint8(self.x[idx])]

    def loss_fn(self) -> nn.Module:
        """The training loss: class-weighted cross-entropy with label smoothing 0.05."""
        return nn.CrossEntropyLoss(weight=self.class_weights, label_smoothing=0.05)


def onecycle_factors(lr: float, total_steps: int, pct_start: float = 0.2) -> list[float]:
    """LR of every step of the training run's OneCycle schedule, divided by its maximum ``lr``."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 1),
                                                pct_start=pct_start)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"] / lr)
        opt.step()
        sched.step()
    return out


def run_finetune(net: nn.Module, data: SpeciesData, train_cfg: dict, steps: int, masks=None,
                 log=print) -> dict:
    """LR-rewinding fine-tune: replay the last ``steps`` steps of the original OneCycle schedule."""
    total = data.steps_per_epoch() * int(train_cfg["epochs"])
    if train_cfg.get("max_steps"):
        total = min(total, int(train_cfg["max_steps"]))
    factors = onecycle_factors(float(train_cfg["lr"]), total)
    sched = rewound_schedule(lambda s: factors[s], total, steps)
    rec = finetune(net, lambda i: data.batch(10_000_000 + i), data.loss_fn(), steps, float(train_cfg["lr"]),
                   sched, float(train_cfg["weight_decay"]), masks=masks, log=_every(log, 60))
    rec["lr_rewinding"] = (f"OneCycle LR (max {train_cfg['lr']}) replayed from step {max(0, total - steps)}"
                           f" to {total} of {total}; batch {data.batch_size}, augmented training chips")
    return rec


def _every(log, n: int):
    """A fine-tune logger that passes on every ``n``-th step line (and the last)."""

    def inner(line: str) -> None:
        done, total = line.split()[2].split("/")
        if int(done) % n == 0 or done == total:
            log(line)

    return inner


def torch_val_metrics(net: nn.Module, data: SpeciesData) -> dict:
    """Macro-F1 and accuracy of a torch net on the validation seed's chips (selection data, not test)."""
    from models.train_species import _predict
    from pipeline.evaluation.species import species_metrics

    names = data.train.class_names
    probs = _predict(net, data.val.chips)
    m = species_metrics([names[j] for j in data.val.labels], [names[j] for j in probs.argmax(1)], names)
    return {"macro_f1": round(m.macro_f1, 4), "accuracy": round(m.accuracy, 4)}


def test_scene(train_cfg: dict, work_dir: str | Path) -> tuple[Path, Path]:
    """(ortho, truth crowns) of the training run's test seed (generated once, never trained on)."""
    from models.datasets.species_chips import synthetic_scene

    folder = synthetic_scene(work_dir, int(train_cfg["test_seed"]), train_cfg["scene_size_m"],
                             train_cfg["scene_gsd_m"])
    return folder / "ortho.tif", folder / "truth.gpkg"


def evaluate_test(onnx_path: str | Path, scene: tuple[Path, Path]) -> dict:
    """Seed-301 metrics through the engine path (``evaluate_species_onnx``: OnnxModel + classify_crowns)."""
    from models.train_species import evaluate_species_onnx

    m = evaluate_species_onnx(onnx_path, *scene)
    return {**m.summary(), "f1_per_class": {k: round(v, 4) for k, v in m.f1.items()}}


def update_metadata(path: str | Path, updates: dict) -> None:
    """Rewrite some ``metadata_props`` of an ONNX file in place (atomic)."""
    import onnx

    from models.export import set_metadata

    proto = onnx.load(str(path))
    set_metadata(proto, updates)
    with atomic_path(Path(path)) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)


def onnx_io(path: str | Path) -> dict:
    """Input/output names, element types and shapes of an ONNX model (the engine contract check)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph

    def desc(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type), "shape": dims}

    return {"inputs": [desc(v) for v in g.input], "outputs": [desc(v) for v in g.output]}


# ---- latency ---------------------------------------------------------------------------------------
def time_onnx(paths: list[str], batch: int, threads: int = 2, warmup: int = 10, runs: int = 100,
              seed: int = 0) -> dict:
    """Round-robin ONNX Runtime latency (ms per call of ``batch`` chips) of every model, in one process.

    Sessions are the engine's (``models.export.ort_session``: sequential, no spinning); one run of each
    model in turn, so load from other processes hits all alike. Load averages are recorded around it.
    """
    from models.export import ort_session
    from models.latency import round_robin_ms

    sessions = {p: ort_session(p, threads=threads) for p in paths}
    load_before = list(os.getloadavg())
    t_start = time.time()
    times, _ = round_robin_ms(sessions, batch, warmup, runs, seed)
    models = {}
    for p in paths:
        t = np.asarray(times[p])
        models[p] = {"median_ms": round(float(np.median(t)), 3),
                     "p10_ms": round(float(np.percentile(t, 10)), 3),
                     "p90_ms": round(float(np.percentile(t, 90)), 3), "mean_ms": round(float(t.mean()), 3)}
    return {"batch": batch, "threads": threads, "warmup": warmup, "runs": runs,
            "seconds": round(time.time() - t_start, 1), "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "models": models}


def measure_latency(cfg: SpeciesStudyConfig, results: dict, log=print) -> dict:
    """Time the dense models and every finished run in one session per batch size; store it in results."""
    paths = [results["dense"]["onnx"]]
    if results["dense"].get("onnx_reexport"):
        paths.append(results["dense"]["onnx_reexport"])
    paths += [r["onnx"] for r in results["runs"].values()]
    if results.get("latency_sessions"):  # keep the earlier session's figures beside the new one
        old = {"sessions": results["latency_sessions"], "speedup": {}}
        for b in cfg.latency_batches:
            old["speedup"][f"batch{b}"] = {k: r["latency"][f"batch{b}"]["speedup"]
                                           for k, r in results["runs"].items()
                                           if f"batch{b}" in r.get("latency", {})}
            dense_ms = results["dense"]["latency"][f"batch{b}"]["median_ms"]
            old["speedup"][f"batch{b}"]["dense_median_ms"] = dense_ms
        results.setdefault("latency_history", []).append(old)
    sessions = []
    for b in cfg.latency_batches:
        log(f"latency: batch {b}, {len(paths)} models, {cfg.latency_runs} runs each, "
            f"{cfg.ort_threads} threads")
        s = time_onnx(paths, b, cfg.ort_threads, cfg.latency_warmup, cfg.latency_runs)
        sessions.append({k: v for k, v in s.items() if k != "models"})
        dense_ms = s["models"][results["dense"]["onnx"]]["median_ms"]
        for rec in [results["dense"], *results["runs"].values()]:
            lat = s["models"][rec["onnx"]]
            speedup = round(dense_ms / lat["median_ms"], 3)
            rec.setdefault("latency", {})[f"batch{b}"] = dict(lat, speedup=speedup)
        if results["dense"].get("onnx_reexport"):
            lat = s["models"][results["dense"]["onnx_reexport"]]
            results["dense"].setdefault("latency_reexport", {})[f"batch{b}"] = lat
        log(f"latency batch {b}: load {s['load_avg_before']} -> {s['load_avg_after']}")
    results["latency_sessions"] = sessions
    return results


# ---- the study -------------------------------------------------------------------------------------
def _dense_entry(cfg: SpeciesStudyConfig, net: nn.Module, data: SpeciesData, scene, meta: dict,
                 tile: int, log) -> dict:
    from models.export import export_onnx, parity_max_abs_diff
    from pipeline.onnx_model import file_sha256

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reexport = out / "species-dense-reexport.onnx"
    export_onnx(net, reexport, input_shape=(3, tile, tile), metadata=meta, output_name="probs")
    c = count_cost(net, (3, tile, tile))
    from models.export import ort_session

    chips = data.val.chips[:64]
    a = ort_session(cfg.dense_onnx, 1).run(None, {"image": chips})[0]
    b = ort_session(reexport, 1).run(None, {"image": chips})[0]
    entry = {
        "onnx": cfg.dense_onnx, "onnx_reexport": str(reexport), "sha256": file_sha256(cfg.dense_onnx),
        "checkpoint_vs_shipped_max_abs_diff": float(np.max(np.abs(a - b))),
        "parity_max_abs_diff": parity_max_abs_diff(net, cfg.dense_onnx, data.val.chips[:32]),
        "params": c.params, "macs": c.macs, "size_bytes": Path(cfg.dense_onnx).stat().st_size,
        "conv_widths": [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)],
        "val": torch_val_metrics(net, data), "test": evaluate_test(cfg.dense_onnx, scene),
        "test_reexport": evaluate_test(reexport, scene), "io": onnx_io(cfg.dense_onnx),
    }
    log(f"dense: test macro-F1 {entry['test']['macro_f1']:.4f}, checkpoint vs shipped ONNX "
        f"{entry['checkpoint_vs_shipped_max_abs_diff']:.1e}")
    return entry


def parse_variant(variant: str, round_to: int, alds_k_max: int) -> tuple[str, int | None, int]:
    """(method, round_to, alds_k_max) of a run variant such as ``pfp``, ``pfp-r1`` or ``alds-k1``."""
    base, _, opt = variant.partition("-")
    if opt == "r1":
        return base, None, alds_k_max
    if opt == "k1":
        return base, round_to, 1
    if opt:
        raise ValueError(f"unknown variant {variant!r}")
    return base, round_to, alds_k_max


def compress_near_target(net: nn.Module, method: str, ratio: float, shape: tuple[int, int, int], calib,
                         budget: str = "macs", round_to: int | None = None, alds_k_max: int = 8,
                         seed: int = 0, tol: float = 0.01, max_tries: int = 12):
    """``compress`` whose achieved ratio lands within ``tol`` of ``ratio`` where the channel granularity
    allows: rounded widths step in whole multiples of ``round_to``; when the result removes more than
    ``tol`` beyond the ask, the requested ratio is lowered in 0.005 steps and the closest result kept.
    (The shipped study needed this because ``structured.allocate`` stopped filling the budget at the first
    group whose step did not fit; the allocator now tries every group, so the first try normally lands.)
    The requested ratio is recorded in ``details["requested_ratio"]``."""
    best = None
    for i in range(max_tries + 1):
        asked = ratio - 0.005 * i
        res = compress(net, method, asked, shape, calibration=calib, budget=budget, round_to=round_to,
                       alds_k_max=alds_k_max, seed=seed)
        res.target_ratio = ratio
        res.details["requested_ratio"] = round(asked, 4)
        if best is None or abs(res.achieved_ratio - ratio) < abs(best.achieved_ratio - ratio):
            best = res
        if abs(res.achieved_ratio - ratio) <= tol or res.achieved_ratio < ratio:
            break
    return best


def run_study(cfg: SpeciesStudyConfig, command: str = "", log=print) -> dict:
    """Compress, fine-tune, export and evaluate every (method, ratio); latency in one session at the end."""
    from models.export import parity_max_abs_diff, read_metadata

    torch.set_num_threads(max(1, cfg.threads))
    results = load_results(cfg.results)
    results["config"] = asdict(cfg)
    results.setdefault("commands", []).append({"command": command,
                                               "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    results["checkpoint_training"] = results.get("checkpoint_training") or ensure_checkpoint(
        cfg.checkpoint, max(1, cfg.threads), log)
    net, train_cfg, names = load_species_checkpoint(cfg.checkpoint)
    work = Path(cfg.checkpoint).parent / ".work"
    data = SpeciesData(train_cfg, work, cfg.seed)
    scene = test_scene(train_cfg, work)
    dense_meta = read_metadata(cfg.dense_onnx)
    dense_meta.pop("compression", None)
    tile = int(dense_meta.get("tile_size", train_cfg["chip_px"]))
    shape = (3, tile, tile)
    results["data"] = {"train_chips": len(data.train), "val_chips": len(data.val),
                       "test_scene": str(scene[0]),
                       "train_seeds": list(train_cfg["train_seeds"]), "val_seed": train_cfg["val_seed"],
                       "test_seed": train_cfg["test_seed"], "class_names": names,
                       "original_schedule_steps": data.steps_per_epoch() * int(train_cfg["epochs"])}
    if "dense" not in results:
        results["dense"] = _dense_entry(cfg, net, data, scene, dense_meta, tile, log)
        save_results(cfg.results, results)
    calib = data.calibration(cfg.calib_chips)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(CONTROL, 0.0)] if cfg.control else []
    jobs += [(m, r) for r in cfg.ratios for m in cfg.methods]
    for method, ratio in jobs:
        key = CONTROL if method == CONTROL else f"{method}@{ratio:g}"
        if key in results["runs"]:
            continue
        t0 = time.time()
        log(f"{key}: compressing")
        torch.manual_seed(cfg.seed)
        if method == CONTROL:
            res = compress(net, "uniform", 0.0, shape)  # a copy of the dense net, same record format
            res.method = CONTROL
        else:
            base, round_to, k_max = parse_variant(method, cfg.round_to, cfg.alds_k_max)
            res = compress_near_target(net, base, ratio, shape, calib, cfg.budget, round_to, k_max, cfg.seed)
            res.details["variant"] = {"round_to": round_to if base in ("pfp", "l1", "uniform") else None,
                                      "alds_k_max": k_max if base == "alds" else None}
        t_compress = time.time() - t0
        masks = res.details.get("masks") if method == "sipp" else None
        ft = run_finetune(res.model, data, train_cfg, cfg.finetune_steps, masks=masks, log=log)
        res.details["finetune"] = ft
        res.after = count_cost(res.model, shape)
        pct = int(round(ratio * 100))
        path = out / (f"species-{CONTROL}.onnx" if method == CONTROL else f"species-{method}-{pct}.onnx")
        meta = dict(dense_meta)
        suffix = "ft" if method == CONTROL else f"{method}{pct}"
        meta["model_version"] = f"{dense_meta.get('model_version', 'species')}+{suffix}"
        record = export_compressed(res, path, tile, metadata=meta)
        val = torch_val_metrics(res.model, data)
        test = evaluate_test(path, scene)
        if "requested_ratio" in res.details:  # the ratio passed to compress (see compress_near_target)
            record["requested_ratio"] = res.details["requested_ratio"]
        update_metadata(path, {"compression": record, "validation_metrics": {
            "validation_macro_f1": val["macro_f1"],
            f"test_seed{train_cfg['test_seed']}": {k: v for k, v in test.items() if k != "f1_per_class"}}})
        parity = parity_max_abs_diff(res.model, path, data.val.chips[:32])
        run = {
            "method": method, "ratio": ratio, "onnx": str(path), "record": record,
            "params": res.after.params, "nonzero_params": res.after.nonzero_params, "macs": res.after.macs,
            "achieved_ratio": round(res.achieved_ratio, 4), "size_bytes": path.stat().st_size,
            "parity_max_abs_diff": parity, "val": val, "test": test, "io": onnx_io(path),
            "compress_seconds": round(t_compress, 1), "seconds": round(time.time() - t0, 1),
        }
        for k in ("keep", "layers", "variant", "requested_ratio"):
            if k in res.details:
                run[k] = res.details[k]
        run["conv_widths"] = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
        results["runs"][key] = run
        save_results(cfg.results, results)
        log(f"{key}: MACs {res.after.macs / 1e6:.1f} M ({run['achieved_ratio']:.3f} removed), params "
            f"{res.after.params:,}, val macro-F1 {val['macro_f1']:.4f}, test macro-F1 {test['macro_f1']:.4f} "
            f"({run['seconds']:.0f} s)")
    results = measure_latency(cfg, results, log)
    results["decision"] = ship_decision(results)
    save_results(cfg.results, results)
    return results


# ---- decision and report ---------------------------------------------------------------------------
F1_TOLERANCE = 0.010  # 1.0 macro-F1 point
MIN_SPEEDUP = 1.10  # "measurably faster" at batch 64: >= 10 % lower median ...
# ... and the compressed model's p90 below the dense model's median (timed in the same session)


def ship_decision(results: dict) -> dict:
    """The fastest run at batch 64 within 1.0 macro-F1 point of the dense model and measurably faster."""
    dense = results["dense"]
    d_f1 = dense["test"]["macro_f1"]
    d_lat = dense["latency"]["batch64"]
    eligible = []
    for key, r in results["runs"].items():
        if r["method"] in (CONTROL, "sipp"):  # dense shapes: any timing difference is noise
            continue
        lat = r.get("latency", {}).get("batch64")
        f1_ok = r["test"]["macro_f1"] >= d_f1 - F1_TOLERANCE - 1e-9
        fast = lat is not None and lat["speedup"] >= MIN_SPEEDUP and lat["p90_ms"] < d_lat["median_ms"]
        if f1_ok and fast:
            eligible.append((lat["speedup"], key))
    rule = (f"macro-F1 on the test seed >= dense - {F1_TOLERANCE:.3f}, and at batch 64 a median speed-up >= "
            f"{MIN_SPEEDUP:.2f}x with p90 below the dense median (same timing session); SiPP is never "
            "eligible (dense shapes); the fastest eligible run at batch 64 is shipped")
    if not eligible:
        return {"ship": None, "rule": rule, "eligible": []}
    eligible.sort(reverse=True)
    return {"ship": eligible[0][1], "rule": rule, "eligible": [k for _, k in eligible]}


def _fmt_ms(lat: dict | None) -> str:
    if not lat:
        return "–"
    return f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f}"


def write_report(results: dict, path: str | Path) -> Path:
    """``SPECIES_COMPRESSION.md`` from the results JSON (tables, commands, load, decision, conclusion)."""
    d = results["dense"]
    cfg = results["config"]
    data = results["data"]
    seed = data["test_seed"]
    lines = [
        "# Species model compression (issue 4)",
        "",
        f"The species model (`{d['onnx']}`, `models/species_net.py`) compressed with PFP, SiPP, ALDS and the "
        "L1-norm and uniform-width baselines at MAC-reduction ratios "
        f"{', '.join(f'{r:g}' for r in cfg['ratios'])} (the fraction of the multiply-accumulates removed), "
        f"each fine-tuned for {cfg['finetune_steps']} steps with learning-rate rewinding, exported for the "
        "engine and measured. Produced by `models/compression/species_study.py`; every figure below is in "
        "`models/zoo/species_compression_results.json`.",
        "",
        "## Setup",
        f"- Dense weights: `{cfg['checkpoint']}` (the training run that produced `{d['onnx']}`, sha256 "
        f"`{d.get('sha256', '?')[:12]}…`, the `species.onnx` shipped before this study; re-exported from it, "
        "the ONNX outputs match that file to "
        f"{d['checkpoint_vs_shipped_max_abs_diff']:.1e} on 64 validation chips).",
        f"- Calibration (PFP, SiPP): {cfg['calib_chips']} normalised training chips, un-augmented.",
        f"- Fine-tune: {cfg['finetune_steps']} AdamW steps of batch 64 on the augmented training chips "
        f"(seeds {data['train_seeds']}, {data['train_chips']:,} chips), the training loss "
        f"(class-weighted CE, label smoothing 0.05), LR rewinding: the last {cfg['finetune_steps']} of the "
        "original "
        f"{data['original_schedule_steps']} OneCycle steps replayed (weights are not rewound; SiPP masks "
        "are re-applied after every step). The final weights are kept (no selection).",
        f"- Variants: `pfp`, `l1`, `uniform` keep channel counts in multiples of {cfg['round_to']} "
        "(`round_to`, as in the crown study); `-r1` rows are the same methods with unrounded widths. The "
        "rounding steps down in whole multiples, so a rounded run can remove somewhat more than its target "
        "(column `removed`). `alds` chooses k <= "
        f"{cfg['alds_k_max']} input-channel groups per layer (grouped conv + 1 x 1 conv); `alds-k1` is "
        "k = 1 only (plain SVD pairs, no grouped convs).",
        f"- `{CONTROL}`: the dense net fine-tuned with the same schedule, to separate the effect of the "
        "extra training from that of compression.",
        f"- Test: synthetic seed {seed} ({d['test']['n']} truth crowns), the exported ONNX run through "
        "`models.train_species.evaluate_species_onnx` (the engine's `OnnxModel` + "
        "`pipeline.species.classify_crowns`). Validation (seed "
        f"{data['val_seed']}, {data['val_chips']} chips) is the torch net on cut chips, reported only.",
        f"- Latency: ONNX Runtime CPU, {cfg['ort_threads']} intra-op threads, sequential, no spinning "
        f"(`models.export.ort_session`), random uint8 chips, {cfg['latency_warmup']} warm-up then "
        f"{cfg['latency_runs']} timed runs per model, all models round-robin in one process per batch size. "
        "Median / p90 in ms per call.",
        "- MACs: multiply-accumulates of conv and linear layers for one 64 x 64 chip "
        "(`models.compression.cost.count_cost`). Params: all parameters; for SiPP the non-zero count is "
        "given.",
        "",
        "## Results",
        "",
        f"Dense: {d['params']:,} parameters, {d['macs'] / 1e6:.2f} M MACs per chip, "
        f"{d['size_bytes']:,} bytes; seed {seed} macro-F1 {d['test']['macro_f1']:.4f}, "
        f"accuracy {d['test']['accuracy']:.4f}.",
        "",
        "| model | MACs (M) | removed | params | ONNX bytes | batch 64 ms (median / p90) | speed-up | "
        "batch 1 ms (median / p90) | speed-up | val macro-F1 | test macro-F1 | test accuracy "
        "| Δ macro-F1 (pts) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict, removed: str, params: str) -> str:
        lat = r.get("latency", {})
        b64, b1 = lat.get("batch64"), lat.get("batch1")
        sp64 = f"{b64['speedup']:.2f}x" if b64 and "speedup" in b64 else "1.00x"
        sp1 = f"{b1['speedup']:.2f}x" if b1 and "speedup" in b1 else "1.00x"
        delta = 100 * (r["test"]["macro_f1"] - d["test"]["macro_f1"])
        return (f"| {name} | {r['macs'] / 1e6:.2f} | {removed} | {params} | {r['size_bytes']:,} | "
                f"{_fmt_ms(b64)} | {sp64} | {_fmt_ms(b1)} | {sp1} | {r['val']['macro_f1']:.4f} | "
                f"{r['test']['macro_f1']:.4f} | {r['test']['accuracy']:.4f} | {delta:+.1f} |")

    lines.append(row(f"dense (`{Path(d['onnx']).name}`)", d, "0", f"{d['params']:,}"))
    runs = results["runs"]
    order = sorted(runs, key=lambda k: (runs[k]["ratio"], SPECIES_VARIANTS.index(runs[k]["method"])
                                        if runs[k]["method"] in SPECIES_VARIANTS else -1))
    for key in order:
        r = runs[key]
        if r["method"] == "sipp":
            params = f"{r['nonzero_params']:,} non-zero of {r['params']:,}"
            removed = f"{r['achieved_ratio']:.3f} of params"
        else:
            params = f"{r['params']:,}"
            removed = f"{r['achieved_ratio']:.3f}"
        lines.append(row(key, r, removed, params))
    lines += ["", "Speed-up: dense median / model median in the same timing session. Δ: test macro-F1 minus "
              "the dense model's, in points (x 100).", ""]
    sipp = [r for r in runs.values() if r["method"] == "sipp"]
    if sipp:
        lines.append("SiPP removes weights, not channels: every tensor keeps its dense shape, the ONNX file "
                     "stores the zeros, and dense CPU kernels do the same work, so it gives **no dense-CPU "
                     "speed-up** by construction (its latency above is the dense model's up to noise). What "
                     "it buys is a smaller sparse encoding: " + ", ".join(
                         f"{r['record']['sparse_size_bytes']:,} bytes at {r['ratio']:g}" for r in sipp)
                     + " (non-zeros as float32 + a 16-bit index each).")
        lines.append("")
    alds = [k for k in order if runs[k]["method"].startswith("alds")]
    if alds:
        lines.append("ALDS layers (name: [k groups, rank per group]): " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {v}" for n, v in runs[k].get("layers", {}).items()) for k in alds)
            + ".")
        lines.append("")
    structured = [k for k in order if runs[k]["method"].split("-")[0] in ("pfp", "l1", "uniform")]
    if structured:
        dense_w = d.get("conv_widths")
        lines.append("Conv output widths, first conv to last"
                     + (f" (dense {', '.join(map(str, dense_w))})" if dense_w else "") + ": "
                     + "; ".join(f"{k} {runs[k]['conv_widths']}" for k in structured) + ".")
        lines.append("")
    lines += ["## Machine load while timing", ""]
    for s in results.get("latency_sessions", []):
        lines.append(f"- batch {s['batch']}: `os.getloadavg()` (1, 5, 15 min) "
                     f"{tuple(s['load_avg_before'])} before, {tuple(s['load_avg_after'])} after; "
                     f"{s['cpu_count']} CPUs; {s['seconds']:.0f} s for the whole round-robin session.")
    lines += ["", "The load averages include the timing process itself (2 ONNX Runtime threads); the 1-min "
              "figure before each session is the load of everything else that had been running. Models are "
              "timed round-robin, so the ratios between models of one session are the meaningful figure."]
    same = [("dense re-export", d.get("latency_reexport", {}).get("batch64"))]
    same += [(k, r.get("latency", {}).get("batch64")) for k, r in runs.items()
             if r["method"] in (CONTROL, "sipp")]
    dense64 = d.get("latency", {}).get("batch64")
    same = [(k, dense64["median_ms"] / v["median_ms"]) for k, v in same if v and dense64]
    if same:
        lines.append("")
        lines.append("Noise floor: models with exactly the dense architecture time at "
                     + ", ".join(f"{k} {x:.2f}x" for k, x in same)
                     + " the shipped file at batch 64 in the same session; speed-ups inside that spread are "
                     "not differences.")
    lines.append("")
    for i, h in enumerate(results.get("latency_history", [])):
        sp = h["speedup"].get("batch64", {})
        load = h["sessions"][0]["load_avg_before"] if h["sessions"] else "?"
        lines.append(f"Earlier timing session {i + 1} (batch 64, load before {tuple(load)}; dense "
                     f"{sp.get('dense_median_ms', float('nan')):.2f} ms): speed-ups "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items() if k != "dense_median_ms") + ".")
        lines.append("")
    dec = results.get("decision", {})
    lines += ["## Decision", "", f"Rule: {dec.get('rule', '')}.", ""]
    if dec.get("ship"):
        lines.append(f"Shipped: `{dec['ship']}` as `models/zoo/species.onnx`; the dense model stays beside "
                     "it as `models/zoo/species-dense.onnx`. Eligible runs (fastest first): "
                     f"{', '.join(dec['eligible'])}.")
    else:
        lines.append("No run met the rule, so `models/zoo/species.onnx` stays the dense model.")
    if results.get("conclusion"):
        lines += ["", "## Conclusion", "", results["conclusion"]]
    lines += ["", "## Reproduce", "", "```bash"]
    for c in results.get("commands", []):
        lines.append(c["command"])
    lines += ["```", "", f"`{Path(cfg['checkpoint']).parent}/` is the training folder of the dense model "
              "(`species_best.pt` and the cached synthetic scenes in `.work/`); when `species_best.pt` is "
              "missing the study first trains it with the model card's configuration. The conclusion and "
              "notes are stored in the JSON (`--conclusion FILE`, `--note FILE`); `--report-only` rewrites "
              "this file from the JSON.", "",
              "The study skips runs already in the results JSON; delete it (and "
              f"`{cfg['out_dir']}/`) to start over. Wall-clock time of each run (compression + fine-tune + "
              "export + evaluation, 1 torch thread on the shared machine): " + ", ".join(
                  f"{k} {runs[k]['seconds']:.0f} s" for k in order) + "."]
    for note in results.get("notes", []):
        lines += ["", note]
    ck = results.get("checkpoint_training", {})
    if ck.get("trained"):
        lines.append(f"The checkpoint was missing and was trained first ({ck['seconds']:.0f} s).")
    p = Path(path)
    with atomic_path(p) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return p


def ship(results: dict, zoo: str | Path = "models/zoo") -> dict:
    """Copy the decided run to ``species.onnx``, the dense model to ``species-dense.onnx`` (once)."""
    import shutil

    key = results.get("decision", {}).get("ship")
    if not key:
        raise SystemExit("no run meets the shipping rule; species.onnx stays dense")
    from pipeline.onnx_model import file_sha256

    zoo = Path(zoo)
    dense_dst = zoo / "species-dense.onnx"
    if not dense_dst.exists():
        shutil.copyfile(results["dense"]["onnx"], dense_dst)
    if file_sha256(dense_dst) != results["dense"].get("sha256", file_sha256(dense_dst)):
        raise SystemExit(f"{dense_dst} is not the dense model of this study")
    results["dense"]["onnx_timed_as"] = results["dense"]["onnx"]
    results["dense"]["onnx"] = str(dense_dst)  # species.onnx is about to become the compressed model
    for rec in results.get("latency_sessions", []):
        rec.setdefault("dense_file", str(dense_dst))
    shutil.copyfile(results["runs"][key]["onnx"], zoo / "species.onnx")
    results["shipped"] = {"run": key, "species.onnx": file_sha256(zoo / "species.onnx"),
                          "species-dense.onnx": file_sha256(dense_dst)}
    return results["shipped"]


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    d = SpeciesStudyConfig()
    ap = argparse.ArgumentParser(description="species-model compression study")
    ap.add_argument("--checkpoint", default=d.checkpoint, help="species_best.pt (trained first when missing)")
    ap.add_argument("--dense-onnx", default=d.dense_onnx)
    ap.add_argument("--out-dir", default=d.out_dir)
    ap.add_argument("--results", default=d.results)
    ap.add_argument("--report", default=d.report)
    ap.add_argument("--methods", default=",".join(d.methods))
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in d.ratios))
    ap.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    ap.add_argument("--no-control", action="store_true", help=f"skip the {CONTROL} control run")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    ap.add_argument("--ort-threads", type=int, default=d.ort_threads, help="ONNX Runtime threads (latency)")
    ap.add_argument("--latency-runs", type=int, default=d.latency_runs)
    ap.add_argument("--latency-only", action="store_true",
                    help="re-time every finished model, rewrite the report")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON")
    ap.add_argument("--conclusion", default=None, help="file whose text is the report's conclusion")
    ap.add_argument("--ship", action="store_true", help="copy the decided run to models/zoo/species.onnx")
    ap.add_argument("--note", default=None, help="file whose text is appended to the report's notes")
    a = ap.parse_args(argv)
    cfg = SpeciesStudyConfig(
        checkpoint=a.checkpoint, dense_onnx=a.dense_onnx, out_dir=a.out_dir, results=a.results,
        report=a.report, methods=[m for m in a.methods.split(",") if m],
        ratios=[float(r) for r in a.ratios.split(",") if r], control=not a.no_control,
        finetune_steps=a.finetune_steps, threads=a.threads, ort_threads=a.ort_threads,
        latency_runs=a.latency_runs,
    )
    command = "python -m models.compression.species_study " + " ".join(shlex.quote(x) for x in argv)
    if a.latency_only or a.report_only or a.conclusion or a.ship or a.note:
        results = load_results(cfg.results)
        if a.latency_only:
            results["config"] = dict(results.get("config", {}), latency_runs=cfg.latency_runs,
                                     ort_threads=cfg.ort_threads)
            results = measure_latency(cfg, results)
            results["decision"] = ship_decision(results)
            results.setdefault("commands", []).append({"command": command,
                                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        if a.conclusion:
            results["conclusion"] = Path(a.conclusion).read_text().strip()
        if a.note:
            results.setdefault("notes", []).append(Path(a.note).read_text().strip())
        if a.ship:
            print(json.dumps(ship(results), indent=1))
            results.setdefault("commands", []).append({"command": command,
                                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        save_results(cfg.results, results)
    else:
        results = run_study(cfg, command)
    write_report(results, cfg.report)
    print(json.dumps(results.get("decision", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
