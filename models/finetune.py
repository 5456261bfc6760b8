"""Fine-tune a crown model on a site's annotated tiles (issue 21: site adaptation on a laptop).

Data: the user's annotated tiles (:class:`~models.datasets.chips.Scene`, crowns as boxes: ellipses inscribed
in the boxes, the training recipe of the shipped model) plus a replay sample of the original training data
(so the model does not forget the other sites). Whole spatial blocks of every user tile
(``val_fraction`` of ``val_block_px`` blocks) are held out: the network never trains on them, and the
post-processing thresholds are chosen on them (grid of :data:`models.train_crowns.PARAM_GRID`; the starting
model's own thresholds win ties).

Budget: ``steps`` at most and ``budget_s`` seconds of training at most. After a few steps the rate is measured
and the step count is cut to fit the time budget, so the cosine learning-rate schedule always ends at its
floor (a fine-tune stopped by the clock half-way would keep a high learning rate).

The starting weights come from a weights-only state dict (``torch.load(weights_only=True)``): either a
training checkpoint (``last.pt``) or the ``*.pt`` beside a zoo ONNX model (:func:`load_base_model`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.datasets.boxes import BoxSet, boxes_to_crown_mask, ellipse_masks, read_boxes
from models.datasets.chips import IGNORE, Scene, _finish, load_box_scene, scaled_shape
from models.datasets.splits import BlockSplit, block_split
from models.nets import SegNetConfig, build_crown_net, load_net_state
from models.train_crowns import (
    PARAM_GRID,
    TrainCrownsConfig,
    ValCase,
    _image_shape_gsd,
    make_batch,
    normalise,
    score_cases,
    validation_cases,
    warmup_cosine,
)
from pipeline.errors import InputError

USER_SITE = "user"  # site tag of the user's tiles (their held-out blocks form the validation group)
MIN_CALIBRATION_CROWNS = 25  # fewer held-out reference crowns than this: keep the starting thresholds


@dataclass
class FinetuneConfig:
    """Fine-tuning settings. Defaults: the issue's laptop budget (10 min on 2 CPU cores)."""

    steps: int = 600  # most optimiser steps
    budget_s: float = 600.0  # most seconds of training (the loop; loading and calibration come on top)
    lr: float = 1e-3  # peak learning rate (half the base training's)
    warmup: int = 10
    batch_size: int = 8
    chip_px: int = 192
    replay_fraction: float = 0.3  # share of each batch drawn from the original training data
    val_fraction: float = 0.25  # share of each user tile's blocks held out for the thresholds
    val_block_px: int = 100  # held-out block edge, px at the model GSD (10 m at 0.10 m)
    threads: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps {self.steps} must be at least 1 (e.g. 600)")
        if self.budget_s <= 0:
            raise InputError(f"--budget-min must be positive (e.g. 10), got {self.budget_s / 60:g}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise InputError(f"--replay-fraction {self.replay_fraction} must be in [0, 1) (e.g. 0.3)")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"--val-fraction {self.val_fraction} must be in (0, 1) (e.g. 0.25)")


# ------------------------------------------------------------------------------------------ base model


def load_base_model(path: str | Path) -> tuple[nn.Module, TrainCrownsConfig, dict[str, float]]:
    """(network in eval mode, its training config, its post-processing thresholds) of a crown model.

    ``path``: a training checkpoint (``last.pt``, with ``validation.json`` beside it for the thresholds) or
    a crown ONNX model with its weights-only state dict beside it (same stem, ``.pt``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from models.export import read_metadata

        if not path.is_file():
            raise InputError(f"{path}: crown model not found; pass --model models/zoo/crowns-dense.onnx")
        meta = read_metadata(path)
        weights = path.with_suffix(".pt")
        if not weights.is_file():
            raise InputError(f"{path}: no weights beside it ({weights.name}); fine-tune a model that "
                             "ships its state dict, e.g. models/zoo/crowns-dense.onnx")
        if "net" not in meta:
            raise InputError(f"{path}: metadata has no 'net' (network config); re-export the model")
        net = build_crown_net(SegNetConfig.from_dict(json.loads(meta["net"])))
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
            raise InputError(f"{weights}: not a readable state dict ({type(exc).__name__})") from None
        load_net_state(net, state.get("model", state))
        cfg = TrainCrownsConfig.from_dict({**json.loads(meta.get("train_config", "{}")),
                                           "net": json.loads(meta["net"])})
        post = json.loads(meta.get("postprocess", "{}"))
        return net.eval(), cfg, post
    from models.train_crowns import load_crown_net

    net, cfg = load_crown_net(path)
    val = path.parent / "validation.json"
    post = json.loads(val.read_text())["postprocess"] if val.is_file() else {}
    return net, cfg, post


def save_state_dict(net: nn.Module, path: str | Path) -> Path:
    """Weights-only fp32 state dict (loads with ``torch.load(weights_only=True)``), written atomically."""
    from pipeline.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                    for k, v in net.state_dict().items()}, tmp)
    return path


# ------------------------------------------------------------------------------------------ scenes


def user_scene(
    name: str,
    rgb: np.ndarray,
    valid: np.ndarray,
    boxes: pd.DataFrame,
    split: BlockSplit | None,
    interior_ratio: float = 0.7,
) -> Scene:
    """A user tile as a training scene: rgb uint8 [3,h,w] at the model GSD, boxes in its pixels (xmin, ymin,
    xmax, ymax; origin top-left); ``split``'s blocks are held out (ignore in training)."""
    h, w = rgb.shape[1:]
    boxes = boxes.copy()
    if "label" not in boxes:
        boxes["label"] = "Tree"
    target = boxes_to_crown_mask(boxes, h, w, interior_ratio)
    scene = _finish(name, rgb, valid, target, ellipse_masks(boxes, h, w), boxes, split, 1.0)
    scene.site, scene.plot = USER_SITE, name
    return scene


def scenes_from_boxes(
    boxsets: list[BoxSet], gsd_m: float, image_gsd_m: float = 0.1, site: str = USER_SITE,
    interior_ratio: float = 0.7,
) -> list[Scene]:
    """Scenes of box sets (e.g. NEON plots) resampled to ``gsd_m``: whole images for training (replay) or,
    when ``site`` is a test site, for scoring (:func:`test_scenes`)."""
    out = []
    for bs in boxsets:
        h, w, gsd = _image_shape_gsd(bs.image_path, image_gsd_m)
        scale = gsd / gsd_m
        h, w = scaled_shape(h, w, scale)
        scene = load_box_scene(bs, None, interior_ratio, weight=1.0, scale=scale)
        scene.site, scene.plot = site, bs.plot or Path(bs.image_path).stem
        out.append(scene)
    return out


def test_scenes(boxsets: list[BoxSet], gsd_m: float, site: str, image_gsd_m: float = 0.1) -> list[Scene]:
    """Whole images held out for scoring only (weight 0, every pixel a validation pixel)."""
    out = []
    for bs in boxsets:
        h, w, gsd = _image_shape_gsd(bs.image_path, image_gsd_m)
        scale = gsd / gsd_m
        h, w = scaled_shape(h, w, scale)
        block = BlockSplit(h, w, max(h, w), frozenset({(0, 0)}))
        scene = load_box_scene(bs, block, 0.7, weight=0.0, scale=scale)
        scene.site, scene.plot = site, bs.plot or Path(bs.image_path).stem
        out.append(scene)
    return out


def replay_scenes(cfg: TrainCrownsConfig, n: int, seed: int = 0) -> list[Scene]:
    """``n`` training plots of the base model's own plot data (its ``plot_csvs`` and ``plot_split``), drawn
    seeded; empty when that data is not on this machine (the fine-tune then has no replay)."""
    if n <= 0 or not cfg.plot_csvs or not cfg.plot_split or not Path(cfg.plot_split).is_file():
        return []
    if not all(Path(p).is_file() for p in cfg.plot_csvs):
        return []
    from models.train_crowns import read_plot_split

    split = read_plot_split(cfg.plot_split)
    sets = [bs for p in cfg.plot_csvs for bs in read_boxes(p, cfg.plot_image_root or None)]
    held = split["validation"] | split["excluded"]
    sets = [bs for bs in sets
            if (bs.plot or Path(bs.image_path).stem) not in held and Path(bs.image_path).exists()]
    if not sets:
        return []
    rng = np.random.default_rng([seed, 77])
    pick = sorted(rng.choice(len(sets), size=min(n, len(sets)), replace=False).tolist())
    return scenes_from_boxes([sets[i] for i in pick], cfg.gsd_m, cfg.image_gsd_m, site="replay")


# ------------------------------------------------------------------------------------------ training


def _mix_weights(user: list[Scene], replay: list[Scene], replay_fraction: float) -> list[Scene]:
    """Copies of the scenes whose ``weight`` makes :func:`models.train_crowns.make_batch` draw replay chips
    with probability ``replay_fraction`` (make_batch weighs a scene by weight x labelled pixels)."""
    def labelled(s: Scene) -> int:
        return max(1, int((s.target != IGNORE).sum()))

    share_user = 1.0 if not replay else 1.0 - replay_fraction
    out = []
    for group, share in ((user, share_user), (replay, 1.0 - share_user)):
        total = sum(labelled(s) for s in group)
        for s in group:
            s2 = copy.copy(s)
            s2.weight = share / total
            out.append(s2)
    return out


def _lr(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, then cosine to 2 % of the peak."""
    return cfg.lr * warmup_cosine(step, cfg.warmup, total)


def finetune_net(
    net: nn.Module,
    base_cfg: TrainCrownsConfig,
    user: list[Scene],
    replay: list[Scene],
    cfg: FinetuneConfig,
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune ``net`` in place on ``user`` scenes (+ ``replay``); returns {"steps", "seconds", "loss"}.

    ``progress(step, total_steps, loss)`` is called after every step (the CLI's progress bar)."""
    cfg.validate()
    if not user:
        raise InputError("no annotated tile to fine-tune on: draw crowns in annotations.gpkg first")
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    bcfg = copy.deepcopy(base_cfg)
    bcfg.batch_size, bcfg.chip_px, bcfg.seed = cfg.batch_size, cfg.chip_px, cfg.seed
    bcfg.savanna_fraction, bcfg.synthetic_fraction = 0.0, 0.0
    scenes = _mix_weights(user, replay, cfg.replay_fraction)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(bcfg.class_weights, dtype=torch.float32),
                                  ignore_index=IGNORE)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=bcfg.weight_decay)
    net.train()
    total, t0, losses = cfg.steps, time.time(), []
    step = 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, cfg)
        x, y = make_batch(step, bcfg, scenes, [], None)
        loss = loss_fn(net(normalise(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step == 5 and total > 5:  # fit the schedule to the time budget, measured on this machine
            per_step = (time.time() - t0) / step
            total = max(step, min(total, int(cfg.budget_s / per_step)))
        if progress is not None:
            progress(step, total, losses[-1])
        if step % 50 == 0 or step == total:
            log(f"fine-tune step {step}/{total} loss {np.mean(losses[-20:]):.4f}")
    net.eval()
    return {"steps": step, "seconds": round(time.time() - t0, 1),
            "loss_last20": round(float(np.mean(losses[-20:])), 4)}


# ------------------------------------------------------------------------------------------ thresholds


def calibrate_thresholds(
    cases: list[ValCase], gsd_m: float, base: dict[str, float] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Thresholds with the best pooled F1@0.4 on the held-out cases over :data:`PARAM_GRID`; the base
    model's thresholds are tried first and kept on ties (few held-out crowns: no change without a gain)."""
    import itertools

    keys = list(PARAM_GRID)
    grid = [dict(zip(keys, v, strict=True)) for v in itertools.product(*(PARAM_GRID[k] for k in keys))]
    if base:
        b = dict(base)
        if "min_crown_area_m2" in b:
            b.setdefault("min_area_m2", b.pop("min_crown_area_m2"))
        grid.insert(0, {k: b[k] for k in keys if k in b})
    best, best_f1, best_m = None, -1.0, {}
    for params in grid:
        m = score_cases(cases, params, gsd_m)
        f1 = m.get("real_f1_iou0.4", 0.0)
        if f1 > best_f1:
            best, best_f1, best_m = params, f1, m
    return dict(best), {k: round(float(v), 4) for k, v in best_m.items()}


def score_scenes(net: nn.Module, scenes: list[Scene], cfg: TrainCrownsConfig,
                 post: dict[str, float]) -> dict[str, float]:
    """Pooled P/R/F1@0.4 (box IoU) of ``net`` with thresholds ``post`` on the scenes' held-out pixels."""
    cases = validation_cases(net, scenes, cfg)
    return {k: round(float(v), 4) for k, v in score_cases(cases, post, cfg.gsd_m).items()}


def adapt(
    net: nn.Module,
    base_cfg: TrainCrownsConfig,
    base_post: dict[str, float],
    user: list[Scene],
    replay: list[Scene],
    cfg: FinetuneConfig,
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the starting model on the user tiles' held-out blocks, fine-tune, choose thresholds there.

    Returns {"net", "postprocess", "postprocess_source", "cases" (the held-out blocks, predicted),
    "validation_before", "validation_after", "train"}; the network is fine-tuned in place. The validation
    scores are on the held-out blocks of the user's tiles only. Thresholds are chosen there only with at
    least :data:`MIN_CALIBRATION_CROWNS` held-out crowns."""
    before = validation_cases(net, user, base_cfg)
    val_before = {k: round(float(v), 4) for k, v in score_cases(before, base_post, base_cfg.gsd_m).items()}
    train = finetune_net(net, base_cfg, user, replay, cfg, progress=progress, log=log)
    after = validation_cases(net, user, base_cfg)
    n_held = int(score_cases(after, base_post, base_cfg.gsd_m).get("real_n_truth", 0))
    if n_held >= MIN_CALIBRATION_CROWNS:
        post, val_after = calibrate_thresholds(after, base_cfg.gsd_m, base_post)
        post_source = f"chosen on {n_held} held-out crowns of the user's tiles"
    else:  # a grid of 81 threshold sets over a handful of crowns picks noise: keep the start's
        post = dict(base_post)
        val_after = {k: round(float(v), 4) for k, v in score_cases(after, post, base_cfg.gsd_m).items()}
        post_source = (f"the starting model's (only {n_held} held-out crowns, under "
                       f"{MIN_CALIBRATION_CROWNS}: too few to choose thresholds)")
    log(f"held-out F1@0.4 {val_before.get('real_f1_iou0.4', 0):.3f} -> "
        f"{val_after.get('real_f1_iou0.4', 0):.3f}"
        f" ({int(val_after.get('real_n_truth', 0))} crowns), thresholds {post}")
    if n_held >= MIN_CALIBRATION_CROWNS:  # scored on the blocks the thresholds were chosen on
        val_after["optimistic"] = "thresholds chosen on these held-out blocks"
    return {"net": net, "postprocess": post, "postprocess_source": post_source, "cases": after,
            "validation_before": val_before, "validation_after": val_after,
            "train": {**train, "config": asdict(cfg), "n_user_tiles": len(user), "n_replay": len(replay)}}


# ------------------------------------------------------------------------------------------ user files


def annotated_scenes(
    annotations: str | Path, tiles: str | Path, ortho_path: str | Path, gsd_m: float, cfg: FinetuneConfig,
    interior_ratio: float = 0.7,
) -> tuple[list[Scene], list[int]]:
    """The user's annotated tiles as scenes (held-out blocks seeded per tile) and their tile ids.

    ``annotations``: polygons (crowns or boxes) drawn in QGIS, layer ``annotations`` (or the only layer);
    ``tiles``: ``suggested_tiles.gpkg`` of ``suggest``. A tile counts as annotated when the centroid of at
    least one annotation lies in it (every crown of such a tile must be drawn); each annotation becomes its
    bounding box in the tile's pixels (the training target of the shipped model: ellipses in boxes)."""
    import geopandas as gpd
    import pyogrio

    from pipeline.raster import open_ortho

    for path, what in ((annotations, "--annotations"), (tiles, "--tiles"), (ortho_path, "--ortho")):
        if not Path(path).is_file():
            raise InputError(f"{path}: not found; pass {what} (written by forest-inventory suggest)")
    try:
        layers = [name for name, _ in pyogrio.list_layers(annotations)]
        ann = gpd.read_file(annotations, layer="annotations" if "annotations" in layers else layers[0])
        tl = gpd.read_file(tiles, layer="tiles")
    except Exception as exc:  # noqa: BLE001 - GDAL raises several types for unreadable files
        raise InputError(f"{annotations}: cannot read the annotations or {tiles} ({type(exc).__name__}); "
                         "pass the GeoPackages written by forest-inventory suggest") from None
    if "tile_id" not in tl.columns:
        raise InputError(f"{tiles}: no tile_id column; pass the suggested_tiles.gpkg of forest-inventory "
                         "suggest")
    ann = ann[ann.geometry.notna() & ~ann.geometry.is_empty]
    if ann.empty:
        raise InputError(f"{annotations}: no crown drawn yet; draw every crown of a few suggested tiles in "
                         "QGIS")
    if ann.crs is not None and tl.crs is not None and ann.crs != tl.crs:
        ann = ann.to_crs(tl.crs)
    cent = ann.geometry.centroid
    scenes, ids = [], []
    with open_ortho(ortho_path, target_gsd_m=gsd_m) as ortho:
        inv = ~ortho.transform
        for _, t in tl.sort_values("rank").iterrows():
            inside = ann[cent.within(t.geometry)]
            if inside.empty:
                continue
            from rasterio.windows import Window

            x0, _, _, y1 = t.geometry.bounds
            c0, r0 = inv * (x0, y1)
            size = int(round((t.geometry.bounds[2] - x0) / abs(ortho.transform.a)))
            window = Window(int(round(c0)), int(round(r0)), size, size)
            rgb, valid = ortho.read(window)
            tinv = ~ortho.window_transform(window)
            rows = []
            for geom in inside.geometry:
                gx0, gy0, gx1, gy1 = geom.bounds
                (a0, b0), (a1, b1) = tinv * (gx0, gy1), tinv * (gx1, gy0)
                rows.append((min(a0, a1), min(b0, b1), max(a0, a1), max(b0, b1)))
            boxes = pd.DataFrame(rows, columns=["xmin", "ymin", "xmax", "ymax"]).clip(0, size)
            boxes = boxes[(boxes.xmax - boxes.xmin >= 2) & (boxes.ymax - boxes.ymin >= 2)]
            block = min(cfg.val_block_px, max(8, size // 4))  # small tiles: at least 16 blocks
            split = block_split(size, size, block, cfg.val_fraction, cfg.seed * 1000 + int(t.tile_id))
            scenes.append(user_scene(f"tile_{int(t.tile_id):05d}", rgb, valid, boxes.reset_index(drop=True),
                                     split, interior_ratio))
            ids.append(int(t.tile_id))
    if not scenes:
        raise InputError(f"{annotations}: no annotation lies inside a suggested tile of {tiles}; draw crowns "
                         "inside the tiles suggest wrote")
    return scenes, ids


def heldout_crown_areas(cases: list[ValCase], post: dict[str, float], gsd_m: float
                        ) -> tuple[list[float], list[float]]:
    """(reference m², detected m²) per case on its held-out pixels: ellipses inscribed in the reference
    boxes, and the areas of the detected crowns whose centroid is held out."""
    from affine import Affine

    from pipeline.crowns import extract_crowns

    tr = Affine(gsd_m, 0, 0, 0, gsd_m, 0)
    ref, det = [], []
    for c in cases:
        p = dict(post)
        min_area = p.pop("min_area_m2", 1.0)
        cands = extract_crowns(c.probs, c.valid, tr, min_area, **p)
        det.append(float(sum(k.polygon.area for k in cands
                             if c.keep(k.centroid_xy[0] / gsd_m, k.centroid_xy[1] / gsd_m))))
        ref.append(float(sum(np.pi / 4 * (g.bounds[2] - g.bounds[0]) * (g.bounds[3] - g.bounds[1])
                             for g in c.truth)) * gsd_m**2)
    return ref, det


def detection_calibration_of(cases: list[ValCase], post: dict[str, float], gsd_m: float, source: str
                             ) -> dict[str, Any] | None:
    """The ``detection_calibration`` metadata from held-out user tiles, or None with fewer than 2 tiles
    holding reference crowns (or no detection at all)."""
    from pipeline.carbon.detection import calibrate_detection_error

    ref, det = heldout_crown_areas(cases, post, gsd_m)
    pairs = [(r, d) for r, d in zip(ref, det, strict=True) if r > 0]
    if len(pairs) < 2 or sum(d for _, d in pairs) <= 0:
        return None
    cal = calibrate_detection_error([r for r, _ in pairs], [d for _, d in pairs], quantity="crown_area")
    cal["source"] = source
    return cal


def finetune_from_annotations(
    annotations: str | Path,
    ortho_path: str | Path,
    out_dir: str | Path,
    model: str | Path,
    tiles: str | Path | None = None,
    cfg: FinetuneConfig | None = None,
    n_replay: int = 16,
    compress_target: float = 0.0,
    compress_steps: int = 100,
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``finetune`` command: adapt ``model`` (ONNX with its ``.pt`` beside it, or a ``last.pt``) to the
    annotated tiles; writes ``OUT/crowns-finetuned.onnx`` (+ ``.pt`` weights, ``finetune.json``) and, with
    ``compress_target`` > 0, ``OUT/crowns-finetuned-compressed.onnx`` (the compression recipe of
    :func:`models.compression.crown_study.compress_crown_checkpoint`: SbF scores, channel removal,
    distilled fine-tune from the adapted network on the same tiles)."""
    from pipeline.atomic import atomic_path

    cfg = cfg or FinetuneConfig()
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiles = Path(tiles) if tiles else Path(annotations).parent / "suggested_tiles.gpkg"
    net, base_cfg, base_post = load_base_model(model)
    user, ids = annotated_scenes(annotations, tiles, ortho_path, base_cfg.gsd_m, cfg, base_cfg.interior_ratio)
    replay = replay_scenes(base_cfg, n_replay, cfg.seed)
    log(f"{len(user)} annotated tiles ({sum(len(s.boxes) for s in user)} crowns), {len(replay)} replay images"
        + ("" if replay else " (the base model's training data is not on this machine: no replay)"))
    res = adapt(net, base_cfg, base_post, user, replay, cfg, progress=progress, log=log)
    cal = detection_calibration_of(res["cases"], res["postprocess"], base_cfg.gsd_m,
                                   f"held-out blocks of {len(user)} annotated tiles "
                                   f"({Path(annotations).name})")
    meta = _finetune_metadata(model, base_cfg, res, ids, annotations, ortho_path, cal)
    from models.train_crowns import export_crown_model

    onnx_path = out / "crowns-finetuned.onnx"
    export_crown_model(res["net"], base_cfg, onnx_path, res["postprocess"], meta["validation_metrics"],
                       meta["model_version"])
    from models.export import copy_with_metadata

    extra = {"training_data": meta["training_data"], "finetune": json.dumps(meta["finetune"])}
    if cal is not None:
        extra["detection_calibration"] = json.dumps(cal)
    copy_with_metadata(onnx_path, onnx_path, extra)
    save_state_dict(res["net"], onnx_path.with_suffix(".pt"))
    record = {"onnx": str(onnx_path), **meta, "detection_calibration": cal}
    if compress_target > 0:
        record["compressed"] = compress_adapted(res["net"], base_cfg, user, replay, res["postprocess"],
                                                onnx_path, compress_target, compress_steps, cfg, log)
    with atomic_path(out / "finetune.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str))
    return record


def _finetune_metadata(model, base_cfg, res, ids, annotations, ortho_path, cal) -> dict[str, Any]:
    from models.export import read_metadata

    base_version = (read_metadata(model).get("model_version", Path(model).stem)
                    if str(model).endswith(".onnx") else Path(model).parent.name)
    val = {**res["validation_after"], "scope": "held-out blocks of the annotated tiles",
           "before_finetune_f1_iou0.4": res["validation_before"].get("real_f1_iou0.4"),
           "postprocess_source": res["postprocess_source"]}
    return {
        "model_version": f"{base_version}+site-{Path(ortho_path).stem}",
        "training_data": (f"fine-tuned from {base_version} on {len(ids)} annotated tiles {ids} of "
                          f"{Path(ortho_path).name} ({Path(annotations).name}; crowns as ellipses "
                          f"in their boxes) + {res['train']['n_replay']} replay images of the base "
                          "model's training plots"),
        "validation_metrics": val,
        "finetune": {k: v for k, v in res["train"].items()},
        "base_model": str(model),
    }


def compress_adapted(net: nn.Module, base_cfg: TrainCrownsConfig, user: list[Scene], replay: list[Scene],
                     post: dict[str, float], dense_onnx: Path, target: float, steps: int,
                     cfg: FinetuneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """SbF channel removal of the adapted network (``target`` share of MACs), a distilled fine-tune on the
    same tiles + replay (``steps``), thresholds recalibrated on the held-out blocks; writes
    ``<dense stem>-compressed.onnx`` with a ``compression`` record."""
    from models.compression.compress import compress, export_compressed
    from models.compression.cost import count_cost
    from models.export import read_metadata

    tile = base_cfg.tile_size
    bcfg = copy.deepcopy(base_cfg)
    bcfg.batch_size, bcfg.chip_px, bcfg.savanna_fraction, bcfg.synthetic_fraction = 4, 128, 0.0, 0.0
    scenes = _mix_weights(user, replay, cfg.replay_fraction)
    calib = [normalise(torch.cat([make_batch(10_000_000 + i, bcfg, scenes, [], None)[0] for i in range(2)]))]
    res = compress(copy.deepcopy(net), "sbf", target, (3, 256, 256), calibration=calib, budget="macs",
                   round_to=8, score_steps=50)
    small = res.model
    teacher = net.eval()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(bcfg.class_weights, dtype=torch.float32),
                                  ignore_index=IGNORE)
    opt = torch.optim.AdamW(small.parameters(), lr=cfg.lr, weight_decay=bcfg.weight_decay)
    small.train()
    fcfg = copy.deepcopy(cfg)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, fcfg)
        x, y = make_batch(20_000_000 + step, bcfg, scenes, [], None)
        xn = normalise(x)
        logits = small(xn)
        with torch.no_grad():
            soft = torch.softmax(teacher(xn), 1)
        kd = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
        loss = 0.5 * loss_fn(logits, y) + 0.5 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    small.eval()
    cases = validation_cases(small, user, base_cfg)
    n_held = int(score_cases(cases, post, base_cfg.gsd_m).get("real_n_truth", 0))
    if n_held >= MIN_CALIBRATION_CROWNS:
        post_c, val = calibrate_thresholds(cases, base_cfg.gsd_m, post)
        val["optimistic"] = "thresholds chosen on these held-out blocks"
    else:
        post_c = dict(post)
        val = {k: round(float(v), 4) for k, v in score_cases(cases, post_c, base_cfg.gsd_m).items()}
    res.before, res.after = count_cost(net, (3, tile, tile)), count_cost(small, (3, tile, tile))
    res.input_shape = (3, tile, tile)
    res.details["finetune"] = {"steps": steps, "distill": 0.5, "data": "annotated tiles + replay",
                               "postprocess_source": "held-out blocks" if n_held >= MIN_CALIBRATION_CROWNS
                               else "the adapted dense model's"}
    path = dense_onnx.with_name(dense_onnx.stem + "-compressed.onnx")
    meta: dict[str, Any] = dict(read_metadata(dense_onnx))
    meta.pop("compression", None)
    meta["postprocess"] = post_c
    meta["validation_metrics"] = {**val, "scope": "held-out blocks of the annotated tiles"}
    meta["model_version"] = meta.get("model_version", "crowns") + f"+sbf{int(round(target * 100))}"
    record = export_compressed(res, path, tile, metadata=meta)
    log(f"compressed copy {path.name}: held-out F1@0.4 {val.get('real_f1_iou0.4', 0):.3f}, "
        f"MACs {res.before.macs / 1e9:.2f} G -> {res.after.macs / 1e9:.2f} G")
    return {"onnx": str(path), "heldout_f1_iou0.4": val.get("real_f1_iou0.4"), "postprocess": post_c,
            "record": record}
