"""A small CNN that classifies one crown chip (3 x C x C, pixels outside the crown zeroed) into K species.

Four conv-BN-ReLU stages (one conv at full resolution, then two per stage) with max-pooling, global
average and max pooling and a linear head: about 0.2 M parameters, under 1 MB as ONNX. Input: float NCHW
already normalised (the ONNX wrapper in
``models.export`` does the uint8 -> normalised step inside the graph). Output: logits [N, K].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeciesNetConfig:
    n_classes: int
    chip_px: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 96)
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _stage(c_in: int, c_out: int, n_convs: int) -> nn.Sequential:
    layers = _conv(c_in, c_out)
    for _ in range(n_convs - 1):
        layers += _conv(c_out, c_out)
    return nn.Sequential(*layers)


class SpeciesNet(nn.Module):
    """Chip classifier; see the module docstring."""

    def __init__(self, config: SpeciesNetConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(config.widths):
            layers.append(_stage(c, w, 1 if i == 0 else 2))  # one conv at full resolution (CPU cost)
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(2 * c, config.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def build_species_net(config: SpeciesNetConfig) -> SpeciesNet:
    return SpeciesNet(config)
