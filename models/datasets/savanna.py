"""Procedural open-ground chips with pasted real crowns (hard negatives against landscape shift).

The real training scenes are closed conifer forest; an open savanna (bright sand, dry grass, soil, roads,
dead wood) looks nothing like their background. These chips put crowns cut from the training blocks of the
real scenes (inscribed-ellipse cut-outs, feathered edges, cast shadows) onto procedurally generated bare
ground, sparse or clumped, plus crown-free chips. Pure numpy + scipy; deterministic given the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.datasets.chips import IGNORE, Scene
from models.datasets.masks import instances_to_classes

# Mean RGB of ground materials (0-255) and a per-material spread.
MATERIALS = {
    "sand": ((215, 200, 170), 25),
    "pale_sand": ((235, 228, 210), 15),
    "dry_grass": ((170, 160, 115), 25),
    "green_grass": ((110, 140, 75), 25),
    "soil": ((120, 100, 80), 20),
    "litter": ((140, 120, 95), 20),
    "burnt": ((70, 65, 60), 15),
}


@dataclass
class CrownCutout:
    rgb: np.ndarray  # uint8 [3, h, w]
    mask: np.ndarray  # bool [h, w]


def crown_bank(scenes: list[Scene], min_px: int = 8) -> list[CrownCutout]:
    """Cut every annotated crown that lies wholly in training pixels out of ``scenes``."""
    bank = []
    for s in scenes:
        for r0, c0, m in s.instances:
            h, w = m.shape
            if min(h, w) < min_px:
                continue
            tgt = s.target[r0 : r0 + h, c0 : c0 + w]
            if np.any(tgt[m] == IGNORE):
                continue
            bank.append(CrownCutout(s.rgb[:, r0 : r0 + h, c0 : c0 + w].copy(), m.copy()))
    return bank


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def ground(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float [3, size, size] bare-ground texture: 1-3 materials blended by smooth noise, plus grain."""
    names = list(MATERIALS)
    k = int(rng.integers(1, 4))
    picks = rng.choice(len(names), size=k, replace=False)
    layers = []
    for i in picks:
        mean, spread = MATERIALS[names[i]]
        base = np.array(mean, float) + rng.normal(0, spread, 3)
        layers.append(base[:, None, None] * np.ones((3, size, size)))
    img = layers[0]
    for lay in layers[1:]:
        field = _noise(rng, size, rng.uniform(6, 40))
        alpha = 1 / (1 + np.exp(np.clip(-(field - rng.uniform(-0.5, 0.8)) * rng.uniform(2, 8), -50, 50)))
        img = img * (1 - alpha) + lay * alpha
    img = img * (1 + 0.08 * rng.uniform(0.3, 1.5) * _noise(rng, size, rng.uniform(3, 12)))
    img = img + rng.uniform(3, 14) * rng.standard_normal((3, size, size))  # grain
    tuft = _noise(rng, size, 1.0) * rng.uniform(0, 12)
    img = img + tuft[None]
    if rng.random() < 0.25:
        img = _road(rng, img)
    for _ in range(int(rng.poisson(1.0))):
        img = _stick(rng, img)
    return img


def _road(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    size = img.shape[1]
    yy, xx = np.mgrid[0:size, 0:size]
    theta = rng.uniform(0, np.pi)
    d = (xx - rng.uniform(0, size)) * np.cos(theta) + (yy - rng.uniform(0, size)) * np.sin(theta)
    half = rng.uniform(8, 40)
    band = np.clip(half - np.abs(d), 0, 2) / 2
    color = np.array(rng.choice([(225, 222, 215), (200, 190, 170), (150, 145, 140)]), float)
    return img * (1 - band) + color[:, None, None] * band


def _stick(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    size = img.shape[1]
    yy, xx = np.mgrid[0:size, 0:size]
    x0, y0 = rng.uniform(0, size, 2)
    theta = rng.uniform(0, np.pi)
    length, width = rng.uniform(20, 120), rng.uniform(1, 3)
    u = (xx - x0) * np.cos(theta) + (yy - y0) * np.sin(theta)
    v = -(xx - x0) * np.sin(theta) + (yy - y0) * np.cos(theta)
    m = (np.abs(u) < length / 2) & (np.abs(v) < width)
    color = np.array((230, 225, 215) if rng.random() < 0.6 else (70, 60, 50), float)
    img = img.copy()
    img[:, m] = img[:, m] * 0.3 + color[:, None] * 0.7
    return img


def savanna_chip(
    rng: np.random.Generator,
    bank: list[CrownCutout],
    size: int = 256,
    interior_ratio: float = 0.7,
    max_crowns: int = 14,
    crown_jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic open-ground chip: rgb uint8 [3, size, size] and its 3-class target."""
    img = ground(rng, size)
    instances = []
    n = 0 if (rng.random() < 0.2 or not bank) else int(rng.integers(1, max_crowns + 1))
    sun = rng.uniform(0, 2 * np.pi)
    shadow_len = rng.uniform(0.1, 0.6)
    clump = rng.random() < 0.4
    centre = rng.uniform(0, size, 2)
    for _ in range(n):
        cut = bank[int(rng.integers(len(bank)))]
        rgb, m = cut.rgb.astype(float), cut.mask
        if crown_jitter > 0:  # each crown its own colour: crown colour must not be a cue
            gain = rng.uniform(1 - 0.3 * crown_jitter, 1 + 0.6 * crown_jitter) * rng.uniform(0.85, 1.15, 3)
            rgb = rgb * gain[:, None, None]
        k = int(rng.integers(4))
        rgb, m = np.rot90(rgb, k, axes=(1, 2)), np.rot90(m, k)
        if rng.random() < 0.5:
            rgb, m = rgb[:, :, ::-1], m[:, ::-1]
        h, w = m.shape
        if h >= size or w >= size:
            continue
        if clump:
            r0 = int(np.clip(centre[0] + rng.normal(0, size / 6) - h / 2, -h / 2, size - h / 2))
            c0 = int(np.clip(centre[1] + rng.normal(0, size / 6) - w / 2, -w / 2, size - w / 2))
        else:
            r0, c0 = int(rng.integers(-h // 2, size - h // 2)), int(rng.integers(-w // 2, size - w // 2))
        # cast shadow: darken the ground in the crown's shape, offset away from the sun
        dr, dc = int(np.sin(sun) * shadow_len * h), int(np.cos(sun) * shadow_len * w)
        shade = rng.uniform(0.35, 0.7)
        _blend(
            img,
            np.full_like(rgb, 0.0),
            ndimage.gaussian_filter(m.astype(float), 1.5) * (1 - shade),
            r0 + dr,
            c0 + dc,
            mode="multiply",
        )
        alpha = _feather(m)
        _blend(img, rgb, alpha, r0, c0)
        instances.append((r0, c0, m.copy()))
    img = np.clip(img, 0, 255).astype(np.uint8)
    clipped = []
    for r0, c0, m in instances:
        rs, cs = max(0, -r0), max(0, -c0)
        re, ce = min(m.shape[0], size - r0), min(m.shape[1], size - c0)
        if re > rs and ce > cs:
            clipped.append((r0 + rs, c0 + cs, m[rs:re, cs:ce]))
    target = instances_to_classes(clipped, size, size, interior_ratio)
    return img, target


def _feather(mask: np.ndarray) -> np.ndarray:
    """Paste opacity inside a crown ellipse: 1 over the inner 70 %, fading to 0.35 at the edge, so the
    ellipse's corners (ground of the source scene) blend into the new ground instead of a hard disc."""
    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ramp = d / max(0.3 * float(d.max()), 1.0)
    return np.clip(0.35 + 0.65 * ramp, 0.0, 1.0) * mask


def _blend(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, r0: int, c0: int, mode: str = "over") -> None:
    size = img.shape[1]
    h, w = alpha.shape
    rs, cs = max(0, -r0), max(0, -c0)
    re, ce = min(h, size - r0), min(w, size - c0)
    if re <= rs or ce <= cs:
        return
    a = alpha[rs:re, cs:ce][None]
    dst = img[:, r0 + rs : r0 + re, c0 + cs : c0 + ce]
    if mode == "multiply":
        dst *= 1 - a
    else:
        dst[:] = dst * (1 - a) + rgb[:, rs:re, cs:ce] * a
