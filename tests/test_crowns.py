"""Crown extraction: touching crowns split, fragments dropped, seam rule keeps each crown once."""

import numpy as np
import pytest
from affine import Affine

from pipeline.crowns import (
    extract_crowns,
    keep_in_core,
    label_crowns,
    postprocess_kwargs,
    resolve_seam_overlaps,
)
from pipeline.errors import InputError
from pipeline.tiling import plan_tiles

GSD = 0.1
ORIGIN = Affine(GSD, 0, 500000.0, 0, -GSD, 4000000.0)


def disc_probs(shape, discs, boundary_ring=False):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    crown = np.zeros(shape, dtype=np.float32)
    boundary = np.zeros(shape, dtype=np.float32)
    for cy, cx, r in discs:
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        crown[d2 <= r * r] = 1.0
        if boundary_ring:
            boundary[(d2 <= r * r) & (d2 > (r - 2) ** 2)] = 1.0
    crown = np.where(boundary > 0, 0.0, crown)
    return np.stack([1 - crown - boundary, crown, boundary]).astype(np.float32)


def test_touching_crowns_are_split_with_correct_areas():
    probs = disc_probs((128, 128), [(40, 40, 15), (40, 68, 15), (100, 100, 10)])
    crowns = extract_crowns(probs, np.ones((128, 128), bool), ORIGIN)
    assert len(crowns) == 3
    areas = sorted(c.polygon.area for c in crowns)
    assert areas[0] == pytest.approx(np.pi * 10**2 * GSD**2, rel=0.08)
    assert sum(areas[1:]) == pytest.approx(sum(c.area_px for c in crowns if c.area_px > 400) * GSD**2)
    assert all(c.score == pytest.approx(1.0) for c in crowns)
    # centroids are in map coordinates of the working CRS
    x, y = min(crowns, key=lambda c: c.polygon.area).centroid_xy
    assert x == pytest.approx(500000.0 + 100.5 * GSD) and y == pytest.approx(4000000.0 - 100.5 * GSD)


def test_boundary_class_separates_touching_crowns():
    probs = disc_probs((96, 96), [(48, 30, 16), (48, 60, 16)], boundary_ring=True)
    labels, _ = label_crowns(probs, np.ones((96, 96), bool), ORIGIN, seed_min_distance_m=5.0)
    assert labels.max() == 2


def test_min_area_and_invalid_pixels():
    probs = disc_probs((64, 64), [(20, 20, 12), (50, 50, 3)])
    crowns = extract_crowns(probs, np.ones((64, 64), bool), ORIGIN, min_area_m2=1.0)
    assert len(crowns) == 1  # the r=3 px disc (~0.28 m2) is a fragment
    valid = np.zeros((64, 64), bool)
    assert extract_crowns(probs, valid, ORIGIN) == []


def test_chm_maxima_split_crowns():
    shape = (80, 120)
    probs = disc_probs(shape, [(40, 40, 25), (40, 80, 25)])  # heavy overlap: one blob
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    chm = np.maximum(20 - 0.5 * np.hypot(yy - 40, xx - 35), 15 - 0.5 * np.hypot(yy - 40, xx - 85))
    crowns = extract_crowns(probs, np.ones(shape, bool), ORIGIN, chm=chm.astype(np.float32),
                            seed_min_distance_m=2.0)
    assert len(crowns) == 2


def test_border_crown_kept_exactly_once_across_tiles():
    width = height = 400
    tile, overlap = 160, 64
    discs = [(80, 128, 20), (200, 200, 18), (300, 96, 15), (128, 300, 22)]  # several straddle tile borders
    full = disc_probs((height, width), discs)
    tiles = plan_tiles(width, height, tile, overlap)
    kept = []
    for t in tiles:
        r0, c0 = int(t.window.row_off), int(t.window.col_off)
        sub = np.zeros((3, tile, tile), np.float32)
        sub[0] = 1
        h, w = min(tile, height - r0), min(tile, width - c0)
        sub[:, :h, :w] = full[:, r0:r0 + h, c0:c0 + w]
        valid = np.zeros((tile, tile), bool)
        valid[:h, :w] = True
        tt = ORIGIN @ Affine.translation(c0, r0)
        cands = extract_crowns(sub, valid, tt)
        kept += keep_in_core(cands, t, ORIGIN)
        # the core-aware fast path gives the same crowns
        fast = extract_crowns(sub, valid, tt, core=t.core_in_tile())
        assert len(fast) == len(keep_in_core(cands, t, ORIGIN))
    assert len(kept) == len(discs)
    for cy, cx, r in discs:
        x, y = ORIGIN @ (cx + 0.5, cy + 0.5)
        match = [c for c in kept if abs(c.centroid_xy[0] - x) < 0.2 and abs(c.centroid_xy[1] - y) < 0.2]
        assert len(match) == 1
        assert match[0].polygon.area == pytest.approx(np.pi * r * r * GSD**2, rel=0.06)


def test_postprocess_metadata_overrides():
    assert postprocess_kwargs({"min_crown_area_m2": 2, "fg_threshold": "0.4"}) == \
        {"min_area_m2": 2.0, "fg_threshold": 0.4}
    with pytest.raises(InputError):
        postprocess_kwargs({"typo_threshold": 0.3})


def test_chm_without_coverage_falls_back_to_probability_seeds():
    probs = disc_probs((64, 64), [(20, 20, 10), (44, 44, 10)])
    chm = np.full((64, 64), np.nan, np.float32)  # the CHM does not reach this tile
    crowns = extract_crowns(probs, np.ones((64, 64), bool), ORIGIN, chm=chm)
    assert len(crowns) == 2


def test_crowns_have_no_holes():
    probs = disc_probs((64, 64), [(32, 32, 15)])
    valid = np.ones((64, 64), bool)
    valid[30:33, 30:33] = False  # a saturated highlight that equals the nodata value
    probs[:, 36:38, 26:28] = np.array([1.0, 0.0, 0.0])[:, None, None]  # a low-probability speck
    (crown,) = extract_crowns(probs, valid, ORIGIN)
    assert len(crown.polygon.interiors) == 0
    assert crown.polygon.area == pytest.approx(np.pi * 15 ** 2 * GSD ** 2, rel=0.05)


def test_seam_duplicates_from_neighbouring_tiles_are_resolved():
    from shapely.geometry import Point

    whole = Point(0, 0).buffer(3.0)  # tile 0 saw the whole crown
    fragment = Point(1.5, 0).buffer(1.2)  # tile 1 saw a fragment of it (centroid in its own core)
    neighbour = Point(6.5, 0).buffer(3.0)  # touching crown from tile 1: small overlap, kept
    same_tile = Point(0.5, 0).buffer(1.0)  # same tile: the watershed already separated them, kept
    polys = np.array([whole, fragment, neighbour, same_tile], dtype=object)
    keep = resolve_seam_overlaps(polys, np.array([0, 1, 1, 0]))
    assert keep.tolist() == [True, False, True, True]
