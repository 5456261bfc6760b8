"""The physical floor of an inventory on this machine: decoding the orthomosaic, and the crown model alone.

Run in a fresh process by ``bench.bench_inventory`` (one per scene), or by hand:

    python -m bench.bench_floor bench/data/scene_1000m_seed0_jpeg/ortho.tif --model models/zoo/crowns.onnx

- ``decode_s``: every block of the file read once at full resolution (rasterio/GDAL, one thread: the JPEG or
  deflate decode the engine cannot avoid), and ``tile_read_s``: the engine's own ``Ortho.read`` of every tile
  window (the overlap reads pixels twice; the stretch and mask are applied);
- ``model_s``: the crown model over ``--sample-tiles`` real tiles of the scene with the sessions the engine
  uses (``pipeline.segment.session_plan``: N single-thread sessions on N tiles at a time, or one session with
  every core), scaled to the scene's tile count; also 1 session x all cores for comparison;
- ``floor_s`` = decode_s + model_s (the two compete for the same cores), and the hectares per minute it
  allows. Everything else the engine does (crown extraction, species, heights, carbon, writing) comes on top;
- ``model_cpu_floor_s``: the model's CPU seconds per tile x tiles / cores: what the model alone needs on an
  otherwise idle machine (CPU time does not grow with other processes' load, wall time does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _decode_all(path: Path) -> tuple[float, int]:
    import rasterio

    t0 = time.perf_counter()
    n = 0
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            src.read(window=window)
            n += 1
    return time.perf_counter() - t0, n


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _model_time(model_path: Path, tiles: list[np.ndarray], sessions: int,
                threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per tile over ``tiles`` with ``sessions`` sessions of ``threads`` threads,
    one tile each. CPU seconds do not depend on the machine's load: ``cores / cpu`` tiles a second is the
    most this machine can do with the model alone."""
    from pipeline.onnx_model import OnnxModel

    models = [OnnxModel(model_path, threads=threads) for _ in range(sessions)]
    for m in models:
        m.run(tiles[0][None])  # warm-up
    chunks = [tiles[k::sessions] for k in range(sessions)]

    def run(k: int) -> None:
        for t in chunks[k]:
            models[k].run(t[None])

    t0, c0 = time.perf_counter(), _cpu_s()
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        list(pool.map(run, range(sessions)))
    return (time.perf_counter() - t0) / len(tiles), (_cpu_s() - c0) / len(tiles)


def floor(ortho_path: str, model_path: str, sample_tiles: int = 24) -> dict:
    from pipeline.onnx_model import OnnxModel
    from pipeline.raster import open_ortho
    from pipeline.segment import session_plan
    from pipeline.tiling import plan_tiles

    model_path = Path(model_path)
    meta = OnnxModel(model_path, threads=1).meta
    decode_s, n_blocks = _decode_all(Path(ortho_path))
    with open_ortho(ortho_path, target_gsd_m=meta.gsd_m) as ortho:
        tiles = plan_tiles(ortho.width, ortho.height, meta.tile_size, meta.overlap_px)
        t0 = time.perf_counter()
        sample = []
        step = max(1, len(tiles) // sample_tiles)
        for k, tile in enumerate(tiles):
            rgb, _ = ortho.read(tile.window)
            if k % step == 0 and len(sample) < sample_tiles:
                sample.append(rgb)
        tile_read_s = time.perf_counter() - t0
        area_ha = ortho.valid_area_m2() / 1e4
    cores = os.cpu_count() or 1
    n_sess, threads = session_plan(model_path.stat().st_size, None, cores)
    timed = {"engine": _model_time(model_path, sample, n_sess, threads),
             "one_session_all_cores": _model_time(model_path, sample, 1, cores)}
    per_tile = {k: v[0] for k, v in timed.items()}
    cpu_per_tile = {k: v[1] for k, v in timed.items()}
    model_s = per_tile["engine"] * len(tiles)
    floor_s = decode_s + model_s
    # without any other load: the model's CPU seconds spread over every core
    unloaded_model_s = cpu_per_tile["engine"] * len(tiles) / cores
    return {"ortho": ortho_path, "model": str(model_path), "n_tiles": len(tiles), "n_blocks": n_blocks,
            "area_ha": area_ha, "decode_s": decode_s, "tile_read_s": tile_read_s,
            "sessions": n_sess, "threads_per_session": threads, "cores": cores,
            "model_ms_per_tile": {k: 1000 * v for k, v in per_tile.items()},
            "model_cpu_ms_per_tile": {k: 1000 * v for k, v in cpu_per_tile.items()},
            "model_cpu_floor_s": unloaded_model_s,
            "model_cpu_floor_ha_per_min": area_ha / (unloaded_model_s / 60.0),
            "model_s": model_s, "floor_s": floor_s, "floor_ha_per_min": area_ha / (floor_s / 60.0),
            "model_only_ha_per_min": area_ha / (model_s / 60.0), "load_avg": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ortho", nargs="?")
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "zoo"
                                           / "crowns.onnx"))
    ap.add_argument("--sample-tiles", type=int, default=24)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # bench.bench_inventory's protocol
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        Path(spec["result"]).write_text(json.dumps(floor(spec["ortho"], spec["model"])))
        return 0
    res = floor(a.ortho, a.model, a.sample_tiles)
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
