"""Issue 19 (throughput): the faster paths give the answers of the slower ones they replace.

Seeds of unseeded blobs without scipy's whole-image sort, species chip masks from a few rasterizations,
crown-model sessions in parallel, and the CHM early exit for tiles without canopy."""

import numpy as np
import pytest
import rasterio.features
from affine import Affine
from scipy import ndimage as ndi

from pipeline import inventory
from pipeline.crowns import _markers_from_interior, label_argmax, label_crowns, no_canopy
from pipeline.raster import open_ortho
from pipeline.segment import MAX_SESSIONS, PARALLEL_SESSION_MAX_BYTES, session_plan
from pipeline.species import _chip_transform, chip_masks, chip_window
from pipeline.synthetic import generate_scene
from tests.test_engine import UTM, T, config, run_groups, scene_discs
from tests.tiny_models import write_crown_model, write_species_model

GSD = 0.1


@pytest.fixture
def models(tmp_path):
    """The engine tests' tiny models (tests/test_engine.py)."""
    return (write_crown_model(tmp_path / "crowns.onnx", tile_size=128, overlap_px=56,
                              brightness_threshold=0.36),
            write_species_model(tmp_path / "species.onnx", chip_size=32, gsd_m=0.2))


def _old_markers(interior, distance, min_distance_px):
    """The seeds as the previous release placed them (scipy.ndimage.maximum_position for unseeded blobs)."""
    from skimage.feature import peak_local_max

    blobs, n_blobs = ndi.label(interior)
    markers = np.zeros(interior.shape, dtype=np.int32)
    peaks = peak_local_max(distance, min_distance=max(1, min_distance_px), threshold_abs=0.5,
                           exclude_border=False)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    seeded = np.zeros(n_blobs + 1, dtype=bool)
    seeded[blobs[tuple(peaks.T)]] = True
    unseeded = np.flatnonzero(~seeded[1:]) + 1
    for k, (r, c) in enumerate(ndi.maximum_position(distance, blobs, unseeded)):
        markers[int(r), int(c)] = len(peaks) + 1 + k
    return markers


def test_label_argmax_is_scipys_maximum_position_and_first_on_ties():
    rng = np.random.default_rng(0)
    labels, n = ndi.label(rng.random((200, 300)) > 0.6)
    values = rng.random((200, 300))  # distinct values: one maximum per label
    index = np.arange(1, n + 1)[::3]
    expected = [r * 300 + c for r, c in ndi.maximum_position(values, labels, index)]
    assert label_argmax(values, labels, index).tolist() == expected
    flat = np.ones((4, 5))
    lab = np.zeros((4, 5), int)
    lab[1:3, 2:4] = 7
    assert label_argmax(flat, lab, np.array([7])).tolist() == [1 * 5 + 2]  # raster order on ties


@pytest.mark.parametrize("seed", range(6))
def test_interior_seeds_equal_the_previous_release(seed):
    """Generated tiles of discs, specks and flat blobs: the same peaks, and every unseeded blob's seed in the
    same blob at the same (maximum) distance; the pixel differs only where that maximum is tied."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    interior = np.zeros((256, 256), bool)
    for _ in range(40):
        cy, cx, r = rng.integers(0, 256), rng.integers(0, 256), rng.integers(1, 18)
        interior |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    interior |= rng.random((256, 256)) > 0.995  # one-pixel specks: flat blobs without a strict maximum
    distance = ndi.distance_transform_edt(interior).astype(np.float32)
    new, old = _markers_from_interior(interior, distance, 10), _old_markers(interior, distance, 10)
    assert (new > 0).sum() == (old > 0).sum()
    blobs, _ = ndi.label(interior)
    for value in np.unique(old[old > 0]):
        (r0, c0), (r1, c1) = np.argwhere(old == value)[0], np.argwhere(new == value)[0]
        assert blobs[r0, c0] == blobs[r1, c1] and distance[r0, c0] == distance[r1, c1]


def test_no_canopy_is_exact():
    valid = np.ones((64, 64), bool)
    low = np.full((64, 64), 1.5, np.float32)
    probs = np.zeros((3, 64, 64), np.float32)
    probs[1, 10:40, 10:40] = 1.0
    probs[0] = 1.0 - probs[1]
    assert no_canopy(low, valid, 2.0)
    assert label_crowns(probs, valid, Affine(GSD, 0, 0, 0, -GSD, 0), chm=low)[0].max() == 0
    tall = low.copy()
    tall[0, 0] = 2.5
    assert not no_canopy(tall, valid, 2.0)
    gaps = low.copy()
    gaps[30, 30] = np.nan  # a valid pixel without height: the crowns may seed from the probabilities
    assert not no_canopy(gaps, valid, 2.0)
    hidden = low.copy()
    hidden[:, 60:] = 9.0  # tall heights under masked pixels still reach the smoothed CHM: no early exit
    valid_left = valid.copy()
    valid_left[:, 60:] = False
    assert not no_canopy(hidden, valid_left, 2.0)


def test_session_plan():
    assert session_plan(3 << 20, None, cores=2) == (min(2, MAX_SESSIONS), 1)
    assert session_plan(3 << 20, 2, cores=2) == (1, 2)  # the user's --threads: one session
    assert session_plan(PARALLEL_SESSION_MAX_BYTES + 1, None, cores=2) == (1, 2)
    assert session_plan(3 << 20, None, cores=1) == (1, 1)


@pytest.fixture(scope="module")
def overlapping_crowns(tmp_path_factory):
    """A generated scene whose truth crowns overlap (the colouring has several layers)."""
    import pyogrio

    scene = generate_scene(tmp_path_factory.mktemp("chips"), size_m=40, gsd_m=0.1, seed=3)
    return scene, pyogrio.read_dataframe(scene.truth, layer="crowns")


@pytest.mark.parametrize("chip_px,chip_gsd_m", [(64, 0.2), (32, 0.2), (64, 0.15)])
def test_chip_masks_equal_one_rasterization_per_crown(overlapping_crowns, chip_px, chip_gsd_m):
    scene, truth = overlapping_crowns
    with open_ortho(scene.ortho) as ortho:
        geoms = list(truth.geometry)
        cents = truth.geometry.centroid
        wins = [chip_window(ortho, xy, chip_px, chip_gsd_m) for xy in zip(cents.x, cents.y, strict=True)]
        masks = chip_masks(ortho, geoms, wins, chip_px)
        for g, w, m in zip(geoms, wins, masks, strict=True):
            own = rasterio.features.rasterize([(g, 1)], out_shape=(chip_px, chip_px),
                                              transform=_chip_transform(ortho, w, chip_px), fill=0,
                                              dtype="uint8") > 0
            assert np.array_equal(m, own)
    assert len(truth) > 20


def _height_scene(tmp_path, write_geotiff, disc_scene):
    """The engine test scene plus a CHM: 12 m on the discs of the left half, 0.5 m everywhere else."""
    discs = scene_discs()
    ortho = write_geotiff(tmp_path / "ortho.tif", disc_scene(400, discs), T, UTM)
    chm = np.full((1, 400, 400), 0.5, np.float32)
    yy, xx = np.mgrid[:400, :400]
    for r, c, rad, _ in discs:
        if c < 200:
            chm[0][(yy - r) ** 2 + (xx - c) ** 2 <= rad * rad] = 12.0
    return ortho, write_geotiff(tmp_path / "chm.tif", chm, T, UTM)


def _crowns(plan):
    crowns = inventory.collect_crowns(plan, run_groups(plan))
    plan.close()
    return crowns


def test_tiles_without_canopy_skip_the_model_with_the_same_crowns(tmp_path, write_geotiff, disc_scene,
                                                                   models, monkeypatch):
    ortho, chm = _height_scene(tmp_path, write_geotiff, disc_scene)
    plan = inventory.validate(config(ortho, tmp_path / "a", models, chm=chm))
    model = plan.crown_model()
    calls = model.calls
    fast = _crowns(plan)
    stats = inventory.group_stats(plan)
    assert stats["n_no_canopy"] > 0 and stats["n_skipped"] == stats["n_no_canopy"]
    assert model.calls - calls == len(plan.tiles) - stats["n_no_canopy"]
    assert stats["valid_area_m2"] == pytest.approx(400 * 400 * GSD ** 2)  # skipped tiles' area counts
    monkeypatch.setattr(inventory, "no_canopy", lambda *a: False)
    slow = _crowns(inventory.validate(config(ortho, tmp_path / "b", models, chm=chm)))
    assert len(fast) == len(slow) > 0
    assert fast.geometry.geom_equals_exact(slow.geometry, 1e-9).all()


def test_parallel_sessions_give_the_same_crowns(tmp_path, write_geotiff, disc_scene, models, monkeypatch):
    discs = scene_discs()
    ortho = write_geotiff(tmp_path / "ortho.tif", disc_scene(400, discs), T, UTM)
    one = _crowns(inventory.validate(config(ortho, tmp_path / "one", models)))
    monkeypatch.setattr("pipeline.segment.os.cpu_count", lambda: 2)
    cfg = config(ortho, tmp_path / "two", models)
    cfg.threads = None  # sessions as session_plan picks them
    plan = inventory.validate(cfg)
    assert len(plan.crown_sessions()) == 2
    two = _crowns(plan)
    assert len(one) == len(two) == len(discs)
    assert one.geometry.geom_equals_exact(two.geometry, 1e-9).all()


def test_batch_says_when_it_starts_a_temporary_prefect_server(monkeypatch):
    from flows.settings import temporary_server_notice

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    notice = temporary_server_notice()
    assert "temporary Prefect server" in notice and "prefect server start" in notice
    assert "PREFECT_API_URL" in notice
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert temporary_server_notice() is None
