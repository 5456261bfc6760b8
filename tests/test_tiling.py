"""Tile plan: fixed windows, cores partition the image, margins honour the overlap."""

import numpy as np
import pytest

from pipeline.tiling import group_tiles, plan_tiles


@pytest.mark.parametrize("width,height,tile,overlap", [(400, 400, 512, 128), (1000, 700, 256, 64),
                                                        (513, 257, 256, 65), (256, 256, 256, 64)])
def test_cores_partition_image(width, height, tile, overlap):
    tiles = plan_tiles(width, height, tile, overlap)
    cover = np.zeros((height, width), dtype=np.int32)
    for t in tiles:
        assert t.window.width == tile and t.window.height == tile
        r0, r1, c0, c1 = int(t.core.row_off), int(t.core.row_off + t.core.height), \
            int(t.core.col_off), int(t.core.col_off + t.core.width)
        cover[r0:r1, c0:c1] += 1
        # the core lies inside the read window
        tr0, tr1, tc0, tc1 = t.core_in_tile()
        assert 0 <= tr0 < tr1 <= tile and 0 <= tc0 < tc1 <= tile
    assert (cover == 1).all()
    assert [t.index for t in tiles] == list(range(len(tiles)))


def test_interior_core_margins_are_half_overlap():
    tiles = plan_tiles(2000, 2000, 256, 64)
    for t in tiles:
        r0, r1, c0, c1 = t.core_in_tile()
        if t.core.col_off > 0:
            assert c0 >= 32
        if t.core.col_off + t.core.width < 2000:
            assert 256 - c1 >= 32
        if t.core.row_off > 0:
            assert r0 >= 32


def test_small_image_is_one_tile_and_groups():
    assert len(plan_tiles(100, 80, 512, 128)) == 1
    tiles = plan_tiles(1000, 1000, 256, 56)
    groups = group_tiles(tiles, 4)
    assert sum(len(g) for g in groups) == len(tiles)
    assert groups[0] == [0, 1, 2, 3]


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(ValueError):
        plan_tiles(100, 100, 64, 64)


def test_tile_beyond_image_edge_is_mirrored_for_the_model():
    from pipeline.segment import mirror_outside

    tile = plan_tiles(6, 5, 8, 2)[0]
    rgb = np.zeros((3, 8, 8), np.uint8)
    rgb[:, :5, :6] = np.arange(30, dtype=np.uint8).reshape(5, 6) + 1
    out = mirror_outside(rgb, tile, width=6, height=5)
    assert (out[:, :5, :6] == rgb[:, :5, :6]).all()
    assert (out[:, :5, 6] == rgb[:, :5, 5]).all() and (out[:, 5, :6] == rgb[:, 4, :6]).all()
    assert out.min() > 0  # no black border left


def test_masked_pixels_take_the_nearest_valid_colour():
    from pipeline.segment import fill_masked

    tile = plan_tiles(8, 8, 8, 2)[0]
    rgb = np.zeros((3, 8, 8), np.uint8)
    rgb[:, :, 4:] = 200
    valid = np.zeros((8, 8), bool)
    valid[:, 4:] = True  # left half masked (alpha 0): black in the file
    out = fill_masked(rgb, valid, tile, 8, 8)
    assert (out == 200).all() and (rgb[:, :, :4] == 0).all()
