"""Train the crown segmentation model (3 classes: background / crown interior / boundary ring) on CPU.

Data: crown boxes (DeepForest CSV, Pascal VOC) or crown polygons over images at the model GSD. Whole
spatial blocks of every image are held out for validation (their pixels are ignored in training).
Half of each batch (``savanna_fraction``) is procedural open ground with crowns cut from the training
blocks pasted on it (:mod:`models.datasets.savanna`): hard negatives against bright sand, grass and roads.
Augmentation: scale jitter at chip cutting, dihedral flips/rotations, strong colour jitter, mild blur.

Reproducibility: every batch is drawn from generators seeded by ``(seed, step)`` and the learning rate is
a pure function of the step, so a resumed run continues exactly where it stopped, and the same seed gives
the same batches. Checkpoints (``last.pt``) hold state_dicts + config and load with ``weights_only=True``.

After training, post-processing thresholds of :func:`pipeline.crowns.label_crowns` are chosen on the
validation blocks (and on savanna chips built from validation-block crowns) and shipped in the ONNX
metadata key ``postprocess``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.datasets.augment import blur, colour_jitter, dihedral
from models.datasets.boxes import boxes_to_polygons, read_boxes
from models.datasets.chips import IGNORE, Scene, load_box_scene, load_polygon_scene, sample_chip, scaled_shape
from models.datasets.polygons import read_polygons
from models.datasets.savanna import CrownCutout, crown_bank, savanna_chip
from models.datasets.splits import BlockSplit, block_split
from models.export import export_onnx, normalise_uint8
from models.nets import CROWN_CLASS_NAMES, SegNetConfig, build_crown_net, count_parameters, load_net_state
from pipeline.errors import InputError
from pipeline.tta import VIEWS as TTA_VIEWS

NEON_DIR = Path(__file__).parent / "data" / "neon"
DEFAULT_ANNOTATIONS = (
    str(NEON_DIR / "2019_YELL_2_541000_4977000_image_crop.xml"),
    str(NEON_DIR / "SOAP_061.xml"),
)


@dataclass
class TrainCrownsConfig:
    """Every parameter of a crown-model training run (saved in checkpoints and the ONNX metadata)."""

    boxes: list[str] = field(default_factory=lambda: list(DEFAULT_ANNOTATIONS))
    polygons: list[str] = field(default_factory=list)  # vector files, paired with polygon_images
    polygon_images: list[str] = field(default_factory=list)
    # Plot datasets: DeepForest CSVs with `site` and `plot` columns (e.g. ../shared/data/neon-plots/
    # annotations.csv), split by whole plot with the list `plot_split` (models/data/neon_plots_split.json)
    plot_csvs: list[str] = field(default_factory=list)
    plot_image_root: str = ""  # image paths of plot_csvs relative to this folder ("" = each CSV's folder)
    plot_split: str = ""
    train_plot_fraction: float = 1.0  # learning curves: keep this share of each site's training plots
    out_dir: str = "checkpoints/crowns"
    iterations: int = 1500
    batch_size: int = 8
    chip_px: int = 192
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    seed: int = 0
    savanna_fraction: float = 0.5
    val_fraction: float = 0.2
    block_px: int = 160
    interior_ratio: float = 0.7
    scale_jitter: float = 0.25
    colour_strength: float = 1.0
    greyscale_p: float = 0.0  # share of chips turned grey before colour jitter
    savanna_crown_jitter: float = 0.0  # per-pasted-crown colour gain spread
    savanna_max_crowns: int = 14  # most crowns pasted on one open-ground chip (density)
    synthetic_scenes: int = 0  # generated scenes (pipeline.synthetic) mixed into training
    synthetic_fraction: float = 0.0  # share of each batch cut from them (drawn before the savanna share)
    synthetic_size_m: float = 150.0
    synthetic_style: str = "smooth"  # crown look of the generated scenes: smooth or clumped
    class_weights: tuple[float, float, float] = (1.0, 1.0, 1.5)
    threads: int = 2
    checkpoint_every: int = 100
    gsd_m: float = 0.15  # model GSD; training images are resampled to it
    image_gsd_m: float = 0.1  # GSD of images without georeferencing (the NEON PNGs)
    tile_size: int = 512
    overlap_px: int = 80
    encoder_init: str = ""  # "" = random; "nsfwjs" = ImageNet MobileNetV2 blocks 0..10 (models.pretrained)
    net: dict = field(
        default_factory=lambda: SegNetConfig(
            encoder="resnet18", encoder_depth=4, decoder_channels=(64, 32, 16, 16)
        ).to_dict()
    )

    @classmethod
    def from_dict(cls, d: dict) -> TrainCrownsConfig:
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in known}
        if "class_weights" in d:
            d["class_weights"] = tuple(d["class_weights"])
        return cls(**d)


def read_plot_split(path: str | Path) -> dict:
    """The committed plot split (``{"validation": [...], "train": [...], "excluded": [...]}``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return {"validation": set(doc["validation"]), "train": set(doc["train"]),
                "excluded": set(doc.get("excluded", []))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a plot split JSON with 'validation' and 'train' lists ({exc}); "
                         "pass --plot-split models/data/neon_plots_split.json") from None


def load_plot_scenes(cfg: TrainCrownsConfig) -> list[Scene]:
    """Scenes of the plot datasets: validation plots whole-image held out (weight 0), the rest training.

    A plot in the split's ``excluded`` list (OSBS_029) is never loaded; a plot in neither list trains (extra
    labelled plots, e.g. the OSBS labels of another flight)."""
    if not cfg.plot_csvs:
        return []
    if not cfg.plot_split:
        raise InputError("--plots-csv needs --plot-split (the committed models/data/neon_plots_split.json)")
    split = read_plot_split(cfg.plot_split)
    boxsets = [(path, bs) for path in cfg.plot_csvs for bs in read_boxes(path, cfg.plot_image_root or None)]
    dropped = _plots_left_out([bs for _, bs in boxsets], split, cfg.train_plot_fraction, cfg.seed)
    scenes = []
    for path, bs in boxsets:
        plot = bs.plot or Path(bs.image_path).stem
        if plot in split["excluded"] or plot in dropped:
            continue
        if not Path(bs.image_path).exists():
            raise InputError(f"{path}: image {bs.image_path} not found; check --plot-image-root")
        h, w, gsd = _image_shape_gsd(bs.image_path, cfg.image_gsd_m)
        scale = gsd / cfg.gsd_m
        h, w = scaled_shape(h, w, scale)
        is_val = plot in split["validation"]
        block = BlockSplit(h, w, max(h, w), frozenset({(0, 0)})) if is_val else None
        scene = load_box_scene(bs, block, cfg.interior_ratio, weight=0.0 if is_val else 1.0, scale=scale)
        scene.site, scene.plot = bs.site, plot
        scenes.append(scene)
    return scenes


def _plots_left_out(boxsets: list, split: dict, fraction: float, seed: int) -> set[str]:
    """Training plots left out for a learning curve: each site keeps ``max(1, round(fraction * n))`` of its
    training plots (seeded); validation and excluded plots are never touched."""
    if fraction >= 1.0:
        return set()
    by_site: dict[str, set[str]] = {}
    for bs in boxsets:
        plot = bs.plot or Path(bs.image_path).stem
        if plot not in split["validation"] and plot not in split["excluded"]:
            by_site.setdefault(bs.site, set()).add(plot)
    rng = np.random.default_rng([seed, 4242])
    dropped = set()
    for site in sorted(by_site):
        plots = sorted(by_site[site])
        keep = max(1, int(round(fraction * len(plots))))
        kept = set(rng.choice(len(plots), size=keep, replace=False).tolist())
        dropped |= {p for i, p in enumerate(plots) if i not in kept}
    return dropped


def load_scenes(cfg: TrainCrownsConfig) -> list[Scene]:
    """All training scenes with their split: spatial blocks (seeded by ``cfg.seed``) of the box and polygon
    files, whole plots (:func:`load_plot_scenes`) of the plot datasets. With plot datasets, the box and
    polygon files train only (their images are single scenes of other sites: no plot to hold out)."""
    scenes = []
    block_val = 0.0 if cfg.plot_csvs else cfg.val_fraction
    for k, path in enumerate(cfg.boxes):
        for bs in read_boxes(path):
            if not Path(bs.image_path).exists():
                raise InputError(f"{path}: image {bs.image_path} not found next to the annotations")
            h, w, gsd = _image_shape_gsd(bs.image_path, cfg.image_gsd_m)
            scale = gsd / cfg.gsd_m
            h, w = scaled_shape(h, w, scale)
            split = block_split(h, w, cfg.block_px, block_val, cfg.seed + k)
            scenes.append(load_box_scene(bs, split, cfg.interior_ratio, scale=scale))
    if len(cfg.polygons) != len(cfg.polygon_images):
        raise InputError("--polygons and --polygon-image must be given the same number of times (pairs)")
    for k, (vec, img) in enumerate(zip(cfg.polygons, cfg.polygon_images, strict=True)):
        ps = read_polygons(vec, img)
        h, w, gsd = _image_shape_gsd(img, cfg.image_gsd_m)
        scale = gsd / cfg.gsd_m
        h, w = scaled_shape(h, w, scale)
        split = block_split(h, w, cfg.block_px, block_val, cfg.seed + 100 + k)
        scenes.append(load_polygon_scene(ps, split, cfg.interior_ratio, scale=scale))
    scenes += load_plot_scenes(cfg)
    if not scenes:
        raise InputError("no training data: pass --boxes (CSV/VOC) or --polygons with --polygon-image")
    return scenes


def load_synthetic_scenes(cfg: TrainCrownsConfig) -> list[Scene]:
    """``cfg.synthetic_scenes`` generated scenes at the model GSD, cached in ``out_dir/synthetic``."""
    if cfg.synthetic_scenes <= 0 or cfg.synthetic_fraction <= 0:
        return []
    from models.datasets.synthetic_scenes import synthetic_scenes

    return synthetic_scenes(cfg.synthetic_scenes, Path(cfg.out_dir) / "synthetic", cfg.synthetic_size_m,
                            cfg.gsd_m, cfg.interior_ratio, crown_style=cfg.synthetic_style)


def _image_shape_gsd(path: str | Path, default_gsd_m: float) -> tuple[int, int, float]:
    """(height, width, GSD in m): a georeferenced image's pixel size, else ``default_gsd_m``."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            h, w = ds.height, ds.width
            if ds.crs is not None and ds.crs.is_projected and not ds.transform.is_identity:
                return h, w, float(abs(ds.transform.a))
    return h, w, float(default_gsd_m)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine down
    to 2 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _lr_factor(step: int, cfg: TrainCrownsConfig) -> float:
    return warmup_cosine(step, cfg.warmup, cfg.iterations)


def make_batch(
    step: int,
    cfg: TrainCrownsConfig,
    scenes: list[Scene],
    bank: list[CrownCutout],
    synthetic: list[Scene] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` (deterministic in (seed, step)): float images [N,3,T,T] in 0..255, targets [N,T,T].

    Each chip comes from a ``synthetic`` scene with probability ``cfg.synthetic_fraction``, else from an
    open-ground chip with probability ``cfg.savanna_fraction``, else from a real scene."""
    rng = np.random.default_rng([cfg.seed, step])
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    weights = np.array([s.weight * max(1, int((s.target != IGNORE).sum())) for s in scenes], float)
    weights /= weights.sum()
    imgs, tgts = [], []
    for _ in range(cfg.batch_size):
        scale = float(np.exp(rng.uniform(np.log(1 - cfg.scale_jitter), np.log(1 + cfg.scale_jitter))))
        if synthetic and cfg.synthetic_fraction > 0 and rng.random() < cfg.synthetic_fraction:
            img, tgt = sample_chip(synthetic[int(rng.integers(len(synthetic)))], rng, cfg.chip_px, scale)
        elif bank and rng.random() < cfg.savanna_fraction:
            img, tgt = savanna_chip(rng, bank, cfg.chip_px, cfg.interior_ratio,
                                   max_crowns=cfg.savanna_max_crowns, crown_jitter=cfg.savanna_crown_jitter)
        else:
            s = scenes[int(rng.choice(len(scenes), p=weights))]
            img, tgt = sample_chip(s, rng, cfg.chip_px, scale)
        imgs.append(img)
        tgts.append(tgt)
    x = torch.from_numpy(np.stack(imgs)).float()
    y = torch.from_numpy(np.stack(tgts)).long()
    x, y = dihedral(x, y, gen)
    x = colour_jitter(x, gen, cfg.colour_strength, cfg.greyscale_p)
    x = blur(x, gen)
    return x, y


normalise = normalise_uint8  # the training-side twin of the in-graph normalisation


def train_crowns(
    cfg: TrainCrownsConfig,
    log: Callable[[str], None] = print,
    resume: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train (resuming from ``out_dir/last.pt`` when present); returns {"checkpoint", "net", "step"}.

    ``max_steps`` stops early after that many steps in this call (tests), leaving a resumable checkpoint.
    """
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net_cfg = SegNetConfig.from_dict(cfg.net)
    net = build_crown_net(net_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    start = 0
    ckpt_path = out / "last.pt"
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck.get("config", {}).get("net") != cfg.net:
            raise InputError(
                f"{ckpt_path}: checkpoint network differs from this run; use another --out or delete it"
            )
        load_net_state(net, ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["step"])
        log(f"resumed from {ckpt_path} at step {start}")
    elif cfg.encoder_init:
        from models.pretrained import load_pretrained_encoder

        report = load_pretrained_encoder(net, source=cfg.encoder_init)
        log(
            f"encoder start {cfg.encoder_init}: {len(report['loaded'])} encoder tensors loaded, "
            f"{len(report['not_loaded'])} left random (loaded up to {report['loaded'][-1:]})"
        )
    scenes = load_scenes(cfg)
    bank = crown_bank(scenes)
    synthetic = load_synthetic_scenes(cfg)
    log(
        f"{len(scenes)} scenes, {len(synthetic)} synthetic scenes, {len(bank)} crown cut-outs, "
        f"net {net_cfg.arch}/{net_cfg.encoder} "
        f"{count_parameters(net) / 1e6:.2f}M params"
    )
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.tensor(cfg.class_weights, dtype=torch.float32), ignore_index=IGNORE
    )
    net.train()
    t0, running = time.time(), []
    step = start
    stop = cfg.iterations if max_steps is None else min(cfg.iterations, start + max_steps)
    while step < stop:
        x, y = make_batch(step, cfg, scenes, bank, synthetic)
        logits = net(normalise(x))
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        running.append(float(loss.detach()))
        if step % 20 == 0 or step == stop:
            rate = (step - start) / (time.time() - t0)
            log(
                f"step {step}/{cfg.iterations} loss {np.mean(running[-20:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.2f} it/s"
            )
        if step % cfg.checkpoint_every == 0 or step == stop:
            save_checkpoint(
                ckpt_path,
                {
                    "kind": "crowns",
                    "config": asdict(cfg),
                    "net": net_cfg.to_dict(),
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                },
            )
    net.eval()
    return {"checkpoint": ckpt_path, "net": net, "step": step, "scenes": scenes}


def load_crown_net(checkpoint: str | Path) -> tuple[nn.Module, TrainCrownsConfig]:
    """The trained network (eval mode) and run config from a checkpoint."""
    ck = load_checkpoint(checkpoint)
    cfg = TrainCrownsConfig.from_dict(ck["config"])
    net = build_crown_net(SegNetConfig.from_dict(ck["net"]))
    load_net_state(net, ck["model"])
    return net.eval(), cfg


# ----------------------------------------------------------------------------------------- validation


@torch.no_grad()
def predict_image(net: nn.Module, rgb: np.ndarray, tta: bool = False) -> np.ndarray:
    """Softmax probs [3, h, w] for a whole uint8 image [3, h, w] (padded to a multiple of 32)."""
    _, h, w = rgb.shape
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    x = torch.zeros(1, 3, ph, pw)
    x[0, :, :h, :w] = torch.from_numpy(rgb).float()
    x = normalise(x)
    variants = TTA_VIEWS if tta else ((False, 0),)  # the engine's --tta views: its thresholds come from here
    acc = torch.zeros(1, 3, ph, pw)
    for flip, k in variants:
        xi = x.flip(-1) if flip else x
        xi = torch.rot90(xi, k, (-2, -1))
        p = torch.softmax(net(xi), 1)
        p = torch.rot90(p, -k, (-2, -1))
        acc += p.flip(-1) if flip else p
    return (acc / len(variants))[0, :, :h, :w].numpy()


@dataclass
class ValCase:
    """One validation image: probs, valid mask, reference polygons (pixel units x gsd), region filter."""

    name: str
    probs: np.ndarray
    valid: np.ndarray
    truth: list
    keep: Callable[[float, float], bool]  # (x_px, y_px) -> inside the held-out region
    site: str = ""  # plot datasets: the NEON site, for per-site scores


def validation_cases(
    net: nn.Module, scenes: list[Scene], cfg: TrainCrownsConfig, n_savanna: int = 8, tta: bool = False
) -> list[ValCase]:
    """Held-out blocks of the real scenes + savanna chips from held-out crowns (never training pixels).

    With plot datasets (scenes that carry a site) the validation is the held-out plots alone: no savanna
    chips, so thresholds are chosen on real validation plots only."""
    if any(s.site for s in scenes):
        n_savanna = 0
    cases = []
    val_bank: list[CrownCutout] = []
    for s in scenes:
        if s.split is None or not s.split.val_blocks or s.boxes is None:
            continue
        vmask = s.split.val_mask()
        probs = predict_image(net, s.rgb, tta)
        b = s.boxes
        cx, cy = ((b.xmin + b.xmax) / 2).to_numpy(), ((b.ymin + b.ymax) / 2).to_numpy()
        sel = s.split.is_val(cx, cy)
        truth = boxes_to_polygons(b[sel], shape="box")
        split = s.split
        cases.append(
            ValCase(
                s.name,
                probs,
                s.valid,
                truth,
                lambda x, y, split=split: bool(split.is_val(np.array([x]), np.array([y]))[0]),
                s.site,
            )
        )
        for r0, c0, m in s.instances:
            h, w = m.shape
            if vmask[r0 : r0 + h, c0 : c0 + w][m].all() and min(h, w) >= 8:
                val_bank.append(CrownCutout(s.rgb[:, r0 : r0 + h, c0 : c0 + w].copy(), m.copy()))
    rng = np.random.default_rng([cfg.seed, 999_999])
    from scipy import ndimage

    for i in range(n_savanna if val_bank else 0):
        img, tgt = savanna_chip(rng, val_bank, cfg.tile_size, cfg.interior_ratio, max_crowns=40)
        # reference crowns: interior blobs grown over their rings (the pasted instances' extents)
        from skimage.segmentation import watershed

        seeds, _ = ndimage.label(tgt == 1)
        lab = watershed(np.zeros(tgt.shape), seeds, mask=tgt > 0)
        truth = []
        for sl in ndimage.find_objects(lab):
            if sl is None:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            truth.append(_box(x0, y0, x1, y1))
        probs = predict_image(net, img, tta)
        cases.append(ValCase(f"savanna_{i}", probs, np.ones(tgt.shape, bool), truth, lambda x, y: True))
    return cases


def _box(x0, y0, x1, y1):
    from shapely.geometry import box

    return box(x0, y0, x1, y1)


def score_cases(cases: list[ValCase], params: dict[str, float], gsd_m: float) -> dict[str, float]:
    """F1 at IoU 0.4 (predicted crown envelope vs reference box) per group: real blocks and savanna chips,
    and per site (``site_<SITE>_...``) for cases that carry one. TP/FP/FN are pooled over a group's images."""
    from affine import Affine

    from pipeline.crowns import extract_crowns
    from pipeline.evaluation.crowns import crown_metrics

    tr = Affine(gsd_m, 0, 0, 0, gsd_m, 0)  # y down: map = pixel * gsd
    groups: dict[str, list] = {"real": [[], []], "savanna": [[], []]}
    for c in cases:
        p = dict(params)
        min_area = p.pop("min_area_m2", 1.0)
        cands = extract_crowns(c.probs, c.valid, tr, min_area, **p)
        pred = []
        for cand in cands:
            x, y = cand.centroid_xy
            if c.keep(x / gsd_m, y / gsd_m):
                x0, y0, x1, y1 = cand.polygon.bounds
                pred.append(_box(x0 / gsd_m, y0 / gsd_m, x1 / gsd_m, y1 / gsd_m))
        names = ["savanna" if c.name.startswith("savanna_") else "real"]
        if c.site:
            names.append(f"site_{c.site}")
        for name in names:
            g = groups.setdefault(name, [[], []])
            g[0].append(pred)
            g[1].append(c.truth)
    out = {}
    for name, (preds, truths) in groups.items():
        if not preds:
            continue
        tp = fp = fn = 0
        for pr, tr_ in zip(preds, truths, strict=True):
            m = crown_metrics(pr, tr_, (0.4,))["thresholds"]["0.4"]
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        p_ = tp / (tp + fp) if tp + fp else 0.0
        r_ = tp / (tp + fn) if tp + fn else 0.0
        out[f"{name}_f1_iou0.4"] = 2 * p_ * r_ / (p_ + r_) if p_ + r_ else 0.0
        out[f"{name}_precision_iou0.4"] = p_
        out[f"{name}_recall_iou0.4"] = r_
        out[f"{name}_n_truth"] = tp + fn
    return out


PARAM_GRID = {
    "fg_threshold": (0.35, 0.5, 0.65),
    "interior_threshold": (0.3, 0.5, 0.7),
    "seed_min_distance_m": (1.2, 1.8, 2.5),
    "min_area_m2": (1.0, 2.5, 4.0),
}


def calibrate_postprocess(
    cases: list[ValCase], gsd_m: float, log: Callable[[str], None] = print
) -> tuple[dict[str, float], dict[str, float]]:
    """Grid-search :data:`PARAM_GRID` for the best mean F1@0.4 of the real and savanna validation groups."""
    best, best_score, best_metrics = None, -1.0, {}
    keys = list(PARAM_GRID)
    for values in itertools.product(*(PARAM_GRID[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        m = score_cases(cases, params, gsd_m)
        f1s = [m[f"{g}_f1_iou0.4"] for g in ("real", "savanna") if f"{g}_f1_iou0.4" in m]
        score = float(np.mean(f1s)) if f1s else 0.0
        if score > best_score:
            best, best_score, best_metrics = params, score, m
    log(f"postprocess {best}: {json.dumps({k: round(v, 3) for k, v in best_metrics.items()})}")
    return best, best_metrics


def calibrate_on_validation(net: nn.Module, scenes: list[Scene], cfg: TrainCrownsConfig, tta: bool = False,
                            log: Callable[[str], None] = print) -> tuple[dict[str, float], dict[str, float]]:
    """Post-processing thresholds of ``net`` chosen on its held-out validation (:func:`validation_cases`,
    with or without test-time augmentation) and the validation scores they give, rounded to 4 places."""
    post, metrics = calibrate_postprocess(validation_cases(net, scenes, cfg, tta=tta), cfg.gsd_m, log)
    return post, {k: round(float(v), 4) for k, v in metrics.items()}


def _training_data_summary(cfg: TrainCrownsConfig) -> str:
    """One line for the ONNX metadata: what the model was trained on."""
    if list(cfg.boxes) == list(DEFAULT_ANNOTATIONS) and not cfg.polygons and not cfg.plot_csvs:
        text = ("NEON AOP RGB 0.1 m: YELL crop (279 VOC boxes) + SOAP_061 (37 boxes), boxes as inscribed "
                "ellipses; procedural open-ground chips with pasted training crowns; "
                f"{cfg.val_fraction:.0%} of {cfg.block_px}px blocks held out")
    else:
        text = json.dumps({"boxes": [Path(b).name for b in cfg.boxes],
                           "polygons": [Path(p).name for p in cfg.polygons]})
    if cfg.plot_csvs:
        split = read_plot_split(cfg.plot_split)
        text += (f"; NEON plot boxes {[str(Path(p)) for p in cfg.plot_csvs]} split by whole plot "
                 f"({len(split['validation'])} validation plots held out, list {Path(cfg.plot_split).name}; "
                 f"excluded {sorted(split['excluded'])})")
    if cfg.synthetic_scenes > 0 and cfg.synthetic_fraction > 0:
        from models.datasets.synthetic_scenes import synthetic_scene_seeds

        seeds = synthetic_scene_seeds(cfg.synthetic_scenes)
        text += (f"; {cfg.synthetic_scenes} synthetic scenes ({cfg.synthetic_size_m:g} m, seeds {seeds[0]}-"
                 f"{seeds[-1]}, {cfg.synthetic_style} crowns) for {cfg.synthetic_fraction:.0%} of the chips")
    return text


LARGEST_CROWN_M = 12.0  # tile overlap the engine's seam rule needs: the widest crown expected, m


def engine_overlap_px(cfg: TrainCrownsConfig) -> int:
    """Tile overlap (px at the model GSD) written for the engine: ``cfg.overlap_px``, raised to cover
    :data:`LARGEST_CROWN_M` at the model's GSD (80 px at 0.15 m, 120 px at 0.10 m) where that leaves at
    least half of the tile as core (small test tiles keep their own overlap)."""
    wanted = int(round(LARGEST_CROWN_M / cfg.gsd_m))
    return max(int(cfg.overlap_px), wanted) if wanted <= cfg.tile_size // 4 else int(cfg.overlap_px)


def export_crown_model(
    net: nn.Module,
    cfg: TrainCrownsConfig,
    path: str | Path,
    postprocess: dict[str, float],
    validation_metrics: dict[str, Any],
    model_version: str,
) -> Path:
    """Write the crown ONNX model with the full metadata contract."""
    meta = {
        "task": "crown_segmentation",
        "class_names": list(CROWN_CLASS_NAMES),
        "gsd_m": cfg.gsd_m,
        "tile_size": cfg.tile_size,
        "overlap_px": engine_overlap_px(cfg),
        "bands": ["red", "green", "blue"],
        "model_version": model_version,
        "training_data": _training_data_summary(cfg),
        "validation_metrics": validation_metrics,
        "postprocess": postprocess,
        "net": SegNetConfig.from_dict(cfg.net).to_dict(),
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("net",)},
    }
    return export_onnx(net, path, (3, cfg.tile_size, cfg.tile_size), meta)


def run_training(
    cfg: TrainCrownsConfig,
    onnx_path: str | Path,
    model_version: str = "crowns-custom",
    resume: bool = True,
    tta: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, calibrate post-processing on the validation blocks, export ONNX; writes OUT/validation.json."""
    t0 = time.time()
    res = train_crowns(cfg, log=log, resume=resume)
    net, scenes = res["net"], res["scenes"]
    t1 = time.time()
    post, metrics = calibrate_on_validation(net, scenes, cfg, tta=tta, log=log)
    metrics.update(
        {
            "iou": "box (predicted crown envelope vs reference box)",
            "seed": cfg.seed,
            "steps": res["step"],
            "tta": tta,
        }
    )
    out = Path(cfg.out_dir)
    from pipeline.atomic import atomic_path

    with atomic_path(out / "validation.json") as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "postprocess": post,
                    "metrics": metrics,
                    "train_seconds": round(t1 - t0, 1),
                    "validation_seconds": round(time.time() - t1, 1),
                },
                indent=2,
            )
        )
    onnx = export_crown_model(net, cfg, onnx_path, post, metrics, model_version)
    log(f"exported {onnx}")
    return {"onnx": onnx, "validation": metrics, "postprocess": post, "checkpoint": res["checkpoint"]}
