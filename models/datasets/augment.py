"""Batch augmentation for crown chips (torch, on CPU): dihedral flips/rotations and colour jitter.

Scale jitter happens when chips are cut (:func:`models.datasets.chips.sample_chip`), so that the target is
resampled with nearest neighbour. Colour jitter is strong on purpose: the model must not key on the
brightness or hue of one site's ground or illumination.
"""

from __future__ import annotations

import torch


def dihedral(
    img: torch.Tensor, target: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90-degree rotations per sample; img [N,3,H,W], target [N,H,W] (square chips)."""
    out_i, out_t = [], []
    for i in range(img.shape[0]):
        k = int(torch.randint(0, 4, (1,), generator=gen))
        flip = bool(torch.randint(0, 2, (1,), generator=gen))
        a, b = img[i], target[i]
        if flip:
            a, b = a.flip(-1), b.flip(-1)
        out_i.append(torch.rot90(a, k, (-2, -1)))
        out_t.append(torch.rot90(b, k, (-2, -1)))
    return torch.stack(out_i), torch.stack(out_t)


def colour_jitter(
    img: torch.Tensor, gen: torch.Generator, strength: float = 1.0, greyscale_p: float = 0.0
) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation, per-channel gain (white balance), gamma, hue rotation
    and sensor noise on float images in [0, 255]; returns [0, 255] floats. ``greyscale_p``: share of samples
    turned grey first (crowns must then be found by texture and shape, not colour)."""
    n = img.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)

    s = strength
    x = img / 255.0
    if greyscale_p > 0:
        grey_mask = (torch.rand(n, generator=gen) < greyscale_p)[:, None, None, None]
        x = torch.where(grey_mask, x.mean(dim=1, keepdim=True).expand_as(x), x)
    x = x * u(1 - 0.12 * s, 1 + 0.12 * s, 3, 1, 1)  # white balance
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * u(1 - 0.45 * s, 1 + 0.45 * s, 1, 1, 1)  # saturation
    # hue: rotate chroma around the grey axis by a small angle
    theta = u(-0.25 * s, 0.25 * s)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    k = 1.0 / 3.0
    sq = (1.0 / 3.0) ** 0.5
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    x = torch.stack(
        [
            r * (cos + (1 - cos) * k) + g * (k * (1 - cos) - sq * sin) + b * (k * (1 - cos) + sq * sin),
            r * (k * (1 - cos) + sq * sin) + g * (cos + k * (1 - cos)) + b * (k * (1 - cos) - sq * sin),
            r * (k * (1 - cos) - sq * sin) + g * (k * (1 - cos) + sq * sin) + b * (cos + k * (1 - cos)),
        ],
        dim=1,
    )
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(1 - 0.35 * s, 1 + 0.35 * s, 1, 1, 1)  # contrast
    x = x * u(1 - 0.35 * s, 1 + 0.35 * s, 1, 1, 1)  # brightness
    x = x.clamp(0, 1) ** u(1 - 0.25 * s, 1 + 0.3 * s, 1, 1, 1)  # gamma
    x = x + torch.randn(x.shape, generator=gen) * u(0, 0.03 * s, 1, 1, 1)
    return x.clamp(0, 1) * 255.0


def blur(img: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Mild box-ish blur (3x3) on a random subset: softens sharp-resolution differences between sensors."""
    mask = torch.rand(img.shape[0], generator=gen) < p
    if not mask.any():
        return img
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :]) / 16.0
    w = kernel.expand(3, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(img, (1, 1, 1, 1), mode="replicate"), w, groups=3
    )
    return torch.where(mask[:, None, None, None], blurred, img)
