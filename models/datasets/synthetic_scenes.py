"""Crown-training scenes from the project's synthetic forest generator (:mod:`pipeline.synthetic`).

The real training scenes (NEON YELL and SOAP) are closed conifer forest, where the bright green surface is
meadow between dark crowns. The generator draws open stands over sand, grass, soil and litter, with
five species of different colour and texture (bright tufted pines among them), cast shadows and touching
crowns, and its truth polygons are exact. Mixed into a batch at a small share, these scenes show the
network crowns that are brighter than their ground and ground that is not meadow, which the real scenes
never do. They are pretraining material, not evaluation data: they are never part of the held-out
validation, and their crowns are not pasted onto the open-ground chips.

Scenes are generated at the model GSD into a cache folder (a pure function of seed and size) and read
through the ordinary polygon adapter, so they go through exactly the path a user's polygons take.
"""

from __future__ import annotations

from pathlib import Path

from models.datasets.chips import Scene, load_polygon_scene
from models.datasets.polygons import read_polygons

SEED_BASE = 5000  # far from the seeds of the benchmarks (0, 11), the species model and the tests


def synthetic_scene_seeds(n: int, seed_base: int = SEED_BASE) -> list[int]:
    """The generator seeds of ``n`` training scenes."""
    return [seed_base + i for i in range(n)]


def synthetic_scenes(n: int, cache_dir: str | Path, size_m: float = 150.0, gsd_m: float = 0.15,
                     interior_ratio: float = 0.7, seed_base: int = SEED_BASE, crown_style: str = "smooth"
                     ) -> list[Scene]:
    """``n`` generated scenes of ``size_m`` metres at ``gsd_m`` (m/px) as crown-training scenes (no split).

    ``crown_style`` is the generator's crown look (``smooth`` or ``clumped``, see
    :func:`pipeline.synthetic.generate_scene`). Generated into ``cache_dir/seed_<s>_<size>m_<gsd>m`` (with a
    ``_clumped`` suffix for that style) once and reused."""
    from pipeline.synthetic import generate_scene

    scenes = []
    for seed in synthetic_scene_seeds(n, seed_base):
        suffix = "" if crown_style == "smooth" else f"_{crown_style}"
        folder = Path(cache_dir) / f"seed_{seed}_{size_m:g}m_{gsd_m:g}m{suffix}"
        ortho, truth = folder / "ortho.tif", folder / "truth.gpkg"
        if not (ortho.is_file() and truth.is_file()):
            generate_scene(folder, size_m=size_m, gsd_m=gsd_m, seed=seed, crown_style=crown_style)
        polys = read_polygons(truth, ortho, layer="crowns")
        scene = load_polygon_scene(polys, None, interior_ratio)
        scene.name = f"synthetic_{seed}"
        scenes.append(scene)
    return scenes
