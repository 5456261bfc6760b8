"""Segmentation network builders (segmentation-models-pytorch, never downloading weights).

The crown model is an smp U-Net or FPN with a small encoder, trained from scratch
(``encoder_weights=None``: no model hub is reachable). Its three output channels are logits over
``["background", "crown", "boundary"]``; softmax is applied by the export wrapper, not here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

CROWN_CLASS_NAMES = ("background", "crown", "boundary")


@dataclass(frozen=True)
class SegNetConfig:
    """Everything needed to rebuild the network from a state_dict (stored in every checkpoint)."""

    arch: str = "unet"  # "unet" or "fpn"
    encoder: str = "resnet18"  # e.g. resnet18, mobilenet_v2, efficientnet-b0
    classes: int = 3
    decoder_channels: tuple[int, ...] = field(default=(128, 64, 32, 16, 16))
    encoder_depth: int = 5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegNetConfig:
        d = dict(d)
        if "decoder_channels" in d:
            d["decoder_channels"] = tuple(int(c) for c in d["decoder_channels"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def build_segmentation_net(config: SegNetConfig) -> nn.Module:
    """Build an untrained smp network from ``config`` (no pretrained weights, no network access)."""
    import segmentation_models_pytorch as smp

    if config.arch == "unet":
        channels = tuple(config.decoder_channels)[: config.encoder_depth]
        if len(channels) != config.encoder_depth:
            raise ValueError(f"decoder_channels needs {config.encoder_depth} entries, got {channels}")
        net = smp.Unet(
            encoder_name=config.encoder,
            encoder_weights=None,
            encoder_depth=config.encoder_depth,
            decoder_channels=channels,
            classes=config.classes,
        )
        _drop_unused_stages(net, config)
        return net
    if config.arch == "fpn" and config.encoder_depth != 5:
        raise ValueError("the FPN builder needs encoder_depth=5 (its head upsamples by a fixed 4x)")
    if config.arch == "fpn":
        width = int(config.decoder_channels[0]) if config.decoder_channels else 128
        net = smp.FPN(
            encoder_name=config.encoder,
            encoder_weights=None,
            encoder_depth=config.encoder_depth,
            decoder_pyramid_channels=width,
            decoder_segmentation_channels=max(width // 2, 16),
            classes=config.classes,
        )
        _drop_unused_stages(net, config)
        return net
    raise ValueError(f"unknown arch {config.arch!r}: use 'unet' or 'fpn'")


def _drop_unused_stages(net: nn.Module, config: SegNetConfig) -> None:
    """smp keeps an encoder's unused deep stages when encoder_depth < 5: drop them.

    A ResNet never runs them (their weights only cost memory). smp's MobileNetV2 RUNS them (its forward
    goes on to the last block and slices the outputs afterwards): the blocks past the deepest output used
    cost MACs and are a dead end that channel pruning cannot follow, so they are cut off; the outputs used
    are unchanged."""
    if config.encoder_depth >= 5:
        return
    if config.encoder.startswith("resnet"):
        for depth, name in ((4, "layer4"), (3, "layer3"), (2, "layer2")):
            if config.encoder_depth < depth + 1 and hasattr(net.encoder, name):
                setattr(net.encoder, name, nn.Identity())
    elif config.encoder == "mobilenet_v2":
        last = int(net.encoder._out_indexes[config.encoder_depth - 1])
        net.encoder.features = net.encoder.features[: last + 1]


def load_net_state(net: nn.Module, state_dict: dict) -> nn.Module:
    """Load ``state_dict`` strictly, except encoder weights of stages :func:`_drop_unused_stages` cut off
    (checkpoints written before the cut hold them)."""
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in state_dict.items() if k in own or not k.startswith("encoder.")})
    return net


def build_crown_net(config: SegNetConfig | None = None) -> nn.Module:
    """The crown segmentation network (3 classes: background / crown interior / boundary ring)."""
    return build_segmentation_net(config or SegNetConfig())


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def set_torch_threads(n: int) -> None:
    """Limit torch to ``n`` intra-op threads (shared CPUs)."""
    torch.set_num_threads(max(1, int(n)))
