"""Shared fixtures: small generated GeoTIFFs (no files are committed).

- ``write_geotiff(path, data, transform, crs, nodata=None, alpha=None, tiled=True, photometric=None)``
  writes a [bands, h, w] array (alpha: optional uint mask band appended with colour interpretation alpha).
- ``disc_scene(size_px, discs, background, crown_rgb)`` returns a uint8 [3, h, w] scene with bright
  "crowns" (discs (row, col, radius_px)) on a dark background, matching tests/tiny_models.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp


def _write_geotiff(path, data, transform, crs, nodata=None, alpha=None, tiled=True, mask=None):
    path = Path(path)
    data = np.asarray(data)
    bands = [data[i] for i in range(data.shape[0])]
    if alpha is not None:
        bands.append(np.asarray(alpha, dtype=data.dtype))
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": len(bands),
               "dtype": str(data.dtype), "transform": transform, "compress": "deflate"}
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled and data.shape[1] >= 16 and data.shape[2] >= 16:
        profile.update(tiled=True, blockxsize=min(256, 16 * (data.shape[2] // 16)),
                       blockysize=min(256, 16 * (data.shape[1] // 16)))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack(bands))
        if alpha is not None:
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue][: data.shape[0]] + \
                [ColorInterp.undefined] * max(0, data.shape[0] - 3) + [ColorInterp.alpha]
        if mask is not None:
            dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def _disc_scene(size_px, discs, background=(30, 40, 30), crown_rgb=(60, 200, 60)):
    h, w = (size_px, size_px) if np.isscalar(size_px) else size_px
    img = np.empty((3, h, w), dtype=np.uint8)
    img[:] = np.asarray(background, dtype=np.uint8)[:, None, None]
    yy, xx = np.mgrid[:h, :w]
    for disc in discs:
        cy, cx, r = disc[:3]
        colour = disc[3] if len(disc) > 3 else crown_rgb
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[:, inside] = np.asarray(colour, dtype=np.uint8)[:, None]
    return img


@pytest.fixture
def write_geotiff():
    return _write_geotiff


@pytest.fixture
def disc_scene():
    return _disc_scene


@pytest.fixture()
def crown_checkpoint(tmp_path):
    """A small untrained crown checkpoint (resnet18 depth 3, 64 px tiles) and its dense engine ONNX export:
    ``(checkpoint_path, onnx_path)``. Needs the ``train`` extra (torch, smp, onnx)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("segmentation_models_pytorch")
    from dataclasses import asdict

    from models.checkpoint import save_checkpoint
    from models.export import export_onnx
    from models.nets import SegNetConfig, build_crown_net
    from models.train_crowns import TrainCrownsConfig

    torch.manual_seed(0)
    net_cfg = SegNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8))
    cfg = TrainCrownsConfig(net=net_cfg.to_dict(), tile_size=64, iterations=10)
    net = build_crown_net(net_cfg)
    ck = save_checkpoint(
        tmp_path / "last.pt",
        {"kind": "crowns", "config": asdict(cfg), "net": net_cfg.to_dict(), "model": net.state_dict(),
         "step": 10},
    )
    meta = {
        "task": "crown_segmentation",
        "class_names": ["background", "crown", "boundary"],
        "gsd_m": 0.1,
        "tile_size": 64,
        "overlap_px": 16,
        "bands": ["red", "green", "blue"],
        "model_version": "tiny",
        "postprocess": {},
    }
    ref = export_onnx(net, tmp_path / "dense.onnx", (3, 64, 64), meta)
    return ck, ref
