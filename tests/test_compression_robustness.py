"""Drone shifts, prune potential, LR rewinding, masks during fine-tuning, and the report writer."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
rasterio = pytest.importorskip("rasterio")

from affine import Affine  # noqa: E402
from PIL import Image  # noqa: E402

from models.compression.finetune import (  # noqa: E402
    MixupViews,
    distillation_loss,
    finetune,
    iterative_ratios,
    rewound_schedule,
)
from models.compression.report import selection, write_report  # noqa: E402
from models.compression.robustness import SHIFTS, prune_potential, write_shifted  # noqa: E402
from models.compression.unstructured import apply_masks  # noqa: E402


@pytest.fixture()
def scene():
    rng = np.random.default_rng(0)
    return rng.integers(20, 200, size=(3, 40, 60), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_shifts_change_the_image_and_keep_uint8(name, scene):
    fn, scale = SHIFTS[name]
    out = fn(scene)
    assert out.dtype == np.uint8 and out.shape[0] == 3
    assert out.shape[1:] == (round(40 / scale), round(60 / scale))
    if scale == 1.0:
        assert np.abs(out.astype(int) - scene).mean() > 0.5


def test_brightness_and_white_balance_known_values():
    img = np.full((3, 2, 2), 100, np.uint8)
    assert (SHIFTS["brightness"][0](img) == 135).all()
    wb = SHIFTS["white_balance"][0](img)
    assert wb[0, 0, 0] == 115 and wb[1, 0, 0] == 100 and wb[2, 0, 0] == 80


def test_write_shifted_keeps_georeference_and_nodata(tmp_path, scene):
    src = tmp_path / "src.tif"
    data = scene.copy()
    data[:, :4, :4] = 255
    t = Affine(0.1, 0, 500000, 0, -0.1, 3000000)
    with rasterio.open(
        src,
        "w",
        driver="GTiff",
        width=60,
        height=40,
        count=3,
        dtype="uint8",
        crs="EPSG:32617",
        transform=t,
        nodata=255,
    ) as ds:
        ds.write(data)
    for name in ("brightness", "gsd_plus25"):
        dst = write_shifted(src, name, tmp_path / f"{name}.tif")
        with rasterio.open(src) as a, rasterio.open(dst) as b:
            assert b.bounds == pytest.approx(a.bounds)
            assert b.nodata == 255
            arr = b.read()
            assert (arr[:, 0, 0] == 255).all()  # nodata stays nodata
            assert (arr[:, 10:, 10:] < 255).all()  # no new nodata created by the brightening
            if name == "gsd_plus25":
                assert b.res == pytest.approx((0.125, 0.125), rel=0.02)


def test_prune_potential_known_answer():
    dense = {"nominal": 0.80, "haze": 0.60}
    by_ratio = {
        0.5: {"nominal": 0.799, "haze": 0.59},
        0.7: {"nominal": 0.796, "haze": 0.50},
        0.8: {"nominal": 0.70, "haze": 0.40},
    }
    pp = prune_potential(by_ratio, dense)
    assert pp == {"nominal": 0.7, "haze": 0.0}


def test_lr_rewinding_replays_the_end_of_the_schedule():
    sched = rewound_schedule(lambda s: 1.0 - s / 100, total_steps=100, rewind_steps=20)
    assert sched(0) == pytest.approx(0.20) and sched(19) == pytest.approx(0.01)
    q = iterative_ratios(0.875, 3)
    assert (1 - q[0]) ** 3 == pytest.approx(0.125)


def test_finetune_reduces_loss_and_keeps_masked_weights_zero():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    mask = torch.rand_like(net[0].weight) > 0.5
    masks = {"0": mask}
    apply_masks(net, masks)
    x = torch.randn(8, 3, 8, 8)
    y = (x[:, 0] > 0).long()
    rec = finetune(
        net, lambda i: (x, y), torch.nn.functional.cross_entropy, 40, 1e-2, lambda i: 1.0, masks=masks
    )
    assert rec["steps"] == 40 and rec["loss_last"] < rec["loss_first"]
    assert (net[0].weight[~mask] == 0).all()


def test_distillation_loss_is_zero_for_the_teacher_and_pulls_a_student_towards_it():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 3, 1))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert distillation_loss(teacher(x), teacher, x, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # known value: one pixel, teacher (0, 0) vs student (log 3, 0) at T = 1 -> KL([.5, .5] || [.75, .25])
    one = torch.nn.Conv2d(1, 2, 1, bias=False)
    torch.nn.init.zeros_(one.weight)
    student_logits = torch.tensor([np.log(3.0), 0.0]).reshape(1, 2, 1, 1)
    kl = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert distillation_loss(student_logits, one, torch.zeros(1, 1, 1, 1), 1.0).item() == pytest.approx(kl)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    y = torch.zeros(4, 8, 8, dtype=torch.long)
    before = distillation_loss(student(x), teacher, x, 2.0).item()
    rec = finetune(student, lambda i: (x, y), torch.nn.functional.cross_entropy, 60, 1e-2, lambda i: 1.0,
                   teacher=teacher, distill_weight=1.0)
    with torch.no_grad():
        assert distillation_loss(student(x), teacher, x, 2.0).item() < before
    assert rec["distillation"] == {"weight": 1.0, "temperature": 2.0}


def test_mixup_views_are_reproducible_convex_mixes_of_batch_pairs():
    x = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1) * torch.ones(4, 2, 3, 3)
    views = MixupViews(alpha=1.0, seed=7)
    lam, perm = views.lambdas_and_partners(4, step=3)
    out = views(x, 3)
    for b in range(4):  # known answer: lam_b * b + (1 - lam_b) * perm_b, everywhere in the sample
        assert torch.allclose(out[b], torch.full((2, 3, 3), float(lam[b] * b + (1 - lam[b]) * perm[b])))
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and ((lam > 0) & (lam < 1)).all()
    assert torch.equal(views(x, 3), out) and not torch.equal(views(x, 4), out)
    with pytest.raises(ValueError, match="alpha"):
        MixupViews(alpha=0.0)


def test_function_matching_distils_on_the_views_and_skips_the_task_term_at_weight_one():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 3, 1))
    x = torch.randn(4, 3, 8, 8)
    y = torch.zeros(4, 8, 8, dtype=torch.long)
    views = MixupViews(alpha=0.5, seed=1)
    seen = []

    def task_loss(out, target):
        seen.append(out.shape)
        return torch.nn.functional.cross_entropy(out, target)

    student = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    mixed = torch.cat([views(x, i) for i in range(3)])
    with torch.no_grad():
        before = distillation_loss(student(mixed), teacher, mixed, 2.0).item()
    rec = finetune(student, lambda i: (x, y), task_loss, 60, 1e-2, lambda i: 1.0, teacher=teacher,
                   distill_weight=1.0, distill_inputs=views)
    assert seen == []  # weight 1: the labels are never used
    with torch.no_grad():
        assert distillation_loss(student(mixed), teacher, mixed, 2.0).item() < before
    assert rec["distillation"]["inputs"] == "mixup views, lam ~ Beta(0.5, 0.5)"
    finetune(student, lambda i: (x, y), task_loss, 2, 1e-2, lambda i: 1.0, teacher=teacher,
             distill_weight=0.5, distill_inputs=views)
    assert len(seen) == 2  # weight 0.5: the task term on the batch itself, once a step


def _results():
    shift = {"haze": 0.5}
    return {
        "dense": {
            "onnx": "d.onnx",
            "params": 1000,
            "macs": 10_000,
            "size_mb": 4.0,
            "f1": 0.80,
            "precision": 0.8,
            "recall": 0.8,
            "f1_shift": shift,
            "latency": {"median_ms": 100.0, "p90_ms": 110.0},
            "validation": {"real_f1_iou0.4": 0.60, "savanna_f1_iou0.4": 0.90},
        },
        "latency": {"cpu_count": 2, "load_avg_1m": 3.0},
        "runs": {
            "pfp@0.7": {
                "method": "pfp",
                "ratio": 0.7,
                "onnx": "p.onnx",
                "params": 300,
                "nonzero_params": 300,
                "macs": 3000,
                "size_mb": 1.2,
                "f1": 0.795,
                "f1_shift": {"haze": 0.49},
                "record": {"finetune": {"steps": 10, "seconds": 5}},
                "latency": {"median_ms": 35.0, "p90_ms": 40.0},
                "validation": {"real_f1_iou0.4": 0.595, "savanna_f1_iou0.4": 0.90},
            },
            "l1@0.7": {
                "method": "l1",
                "ratio": 0.7,
                "onnx": "l.onnx",
                "params": 300,
                "nonzero_params": 300,
                "macs": 3000,
                "size_mb": 1.2,
                "f1": 0.75,
                "f1_shift": {"haze": 0.45},
                "record": {},
                "latency": {"median_ms": 34.0, "p90_ms": 40.0},
                "validation": {"real_f1_iou0.4": 0.55, "savanna_f1_iou0.4": 0.85},
            },
            "sipp@0.7": {
                "method": "sipp",
                "ratio": 0.7,
                "onnx": "s.onnx",
                "params": 1000,
                "nonzero_params": 300,
                "macs": 10_000,
                "size_mb": 4.0,
                "f1": 0.80,
                "f1_shift": {"haze": 0.5},
                "record": {"sparse_size_bytes": 1800},
                "latency": {"median_ms": 100.0, "p90_ms": 110.0},
            },
        },
    }


def test_selection_applies_the_goal():
    best, ok = selection(_results())
    assert best == "pfp@0.7" and ok == ["pfp@0.7"]  # l1 loses 5 validation points; sipp is not faster


def test_selection_uses_validation_only_never_osbs():
    """OSBS_029 F1 enters no rule: a run 20 OSBS points down but within 1 validation point is shipped, a run
    above the dense model on OSBS but 5 validation points down is not, a run without validation never is;
    the pooled validation F1 is used where a record carries it."""
    results = _results()
    runs = results["runs"]
    runs["pfp@0.7"]["f1"] = 0.60  # -20 OSBS points
    runs["l1@0.7"]["f1"] = 0.95  # +15 OSBS points, -5 validation points
    runs["uniform@0.7"] = dict(runs["l1@0.7"], method="uniform", f1=0.99)
    del runs["uniform@0.7"]["validation"]  # no validation: not eligible
    assert selection(results) == ("pfp@0.7", ["pfp@0.7"])
    # pooled validation F1 over the validation plots outranks the older per-set figures
    results["dense"]["validation"]["pooled_f1_iou0.4"] = 0.50
    runs["pfp@0.7"]["validation"]["pooled_f1_iou0.4"] = 0.48  # -2 points: out
    runs["l1@0.7"]["validation"]["pooled_f1_iou0.4"] = 0.495  # -0.5 points: in
    assert selection(results) == ("l1@0.7", ["l1@0.7"])
    del results["dense"]["validation"]
    assert selection(results) == (None, [])  # no dense validation: nothing to compare against


def test_report_writes_markdown_and_png(tmp_path):
    path = tmp_path / "results.json"
    results = _results()
    results["runs"]["l1@0.7"]["paired_vs_dense"] = {"delta_points": -5.0, "ci_points": [-9.25, -1.0]}
    # a second recipe at the same ratio (tagged) gets its own prune-potential row
    results["runs"]["pfp@0.7-kd"] = dict(results["runs"]["pfp@0.7"], tag="-kd", f1_shift={"haze": 0.5})
    results["runs"]["pfp@0.7-soup"] = dict(results["runs"]["pfp@0.7"], tag="-soup", f1=0.7,
                                           soup_of=["pfp@0.7", "pfp@0.7-kd"])
    path.write_text(json.dumps(results))
    out = write_report(path, tmp_path)
    md = out["markdown"].read_text()
    assert "pfp@0.7" in md and "Shipped as `crowns.onnx`: `pfp@0.7`** (chosen on validation)" in md
    assert "Held out, scored after selection: OSBS_029 F1 0.795 vs dense 0.800" in md
    assert "`pfp@0.7-soup` = `pfp@0.7` + `pfp@0.7-kd`" in md and "| soup of 2 fine-tunes |" in md
    assert "| 10 / 5 |" in md  # a fine-tuned run's steps / seconds
    assert "| pfp | 0.7 | 0.7 | 0 |" in md and "| pfp -kd | 0.7 | 0.7 | 0.7 |" in md  # per recipe
    assert "| 0.795 | -0.5 |" in md and "| 0.750 | -5.0 [-9.2, -1.0] |" in md  # the interval when measured
    with Image.open(out["png"]) as im:
        assert im.size == (900, 600) and im.format == "PNG"
