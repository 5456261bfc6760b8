"""Weight averaging of fine-tunes of one pruned network (models.compression.soup, crown_study --soup)."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("segmentation_models_pytorch")

from torch import nn  # noqa: E402

from models.compression.compress import compress  # noqa: E402
from models.compression.soup import reestimate_batchnorm, soup_state_dicts  # noqa: E402
from models.compression.structured import rebuild_pruned  # noqa: E402
from pipeline.errors import InputError  # noqa: E402


def test_soup_is_the_mean_of_the_weights_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    c = {"w": torch.tensor([2.0, 1.0]), "bn.num_batches_tracked": torch.tensor(1)}
    s = soup_state_dicts([a, b, c])
    assert torch.equal(s["w"], torch.tensor([2.0, 3.0]))
    assert s["bn.num_batches_tracked"].item() == 7 and s["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(soup_state_dicts([a])["w"], a["w"])


def test_soup_refuses_members_of_different_networks():
    a = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="w has shape"):
        soup_state_dicts([a, {"w": torch.zeros(3, 3)}])
    with pytest.raises(ValueError, match="other tensors"):
        soup_state_dicts([a, {"v": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match="at least one"):
        soup_state_dicts([])


def test_batchnorm_reestimation_gives_the_mean_over_all_batches():
    """Known answer: running mean = mean of the batch means, running var = mean of the unbiased batch
    variances; affine weights untouched, network back in eval mode."""
    bn = nn.BatchNorm2d(1)
    bn.weight.data.fill_(2.0)
    b1 = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)  # mean 2, unbiased var 2
    b2 = torch.tensor([5.0, 9.0]).reshape(2, 1, 1, 1)  # mean 7, unbiased var 8
    assert reestimate_batchnorm(bn, [b1, b2]) == 2
    assert bn.running_mean.item() == pytest.approx(4.5)
    assert bn.running_var.item() == pytest.approx(5.0)
    assert bn.weight.item() == 2.0 and not bn.training
    assert reestimate_batchnorm(nn.Conv2d(1, 1, 1), [b1]) == 0  # no batch norm: nothing to do


@pytest.fixture()
def soup_study(crown_checkpoint, tmp_path):
    """A results JSON with two fine-tunes (``-s0``, ``-s1``) of one PFP-pruned copy of the fixture's network
    and one of another ratio; returns (StudyConfig, the members' state dicts)."""
    from models.compression.crown_study import StudyConfig
    from models.train_crowns import load_crown_net

    ck, ref = crown_checkpoint
    shape = (3, 64, 64)
    calib = [torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))]
    runs, states = {}, {}
    for key, ratio, seed in (("pfp@0.5-s0", 0.5, 0), ("pfp@0.5-s1", 0.5, 1), ("pfp@0.3", 0.3, 0)):
        net, _ = load_crown_net(ck)
        pruned = compress(net, "pfp", ratio, shape, calibration=calib, round_to=None).model
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in pruned.parameters():  # a "fine-tune": every weight moved differently per seed
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        stem = tmp_path / f"crowns-{key.replace('@', '-').replace('.', '')}"
        torch.save(pruned.state_dict(), stem.with_suffix(".pt"))
        states[key] = pruned.state_dict()
        runs[key] = {"method": "pfp", "ratio": ratio, "tag": key[len(f"pfp@{ratio:g}"):],
                     "onnx": str(stem.with_suffix(".onnx")), "f1": 0.0}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"dense": {"onnx": str(ref), "f1": 0.0}, "runs": runs}))
    cfg = StudyConfig(checkpoint=str(ck), dense_onnx=str(ref), out_dir=str(tmp_path / "out"),
                      results=str(results), shifts=["brightness"], threads=1, tag="-soup")
    (tmp_path / "out").mkdir()
    return cfg, states


def test_soup_run_averages_fine_tunes_and_evaluates_the_soup(soup_study):
    """crown_study --soup: the soup is a run of its own with the members' shapes, their mean weights,
    batch norm estimated again, an engine ONNX with a record, and the study's evaluation."""
    from models.compression.crown_study import soup_run
    from models.export import read_metadata

    cfg, states = soup_study
    run = soup_run(cfg, ["pfp@0.5-s0", "pfp@0.5-s1"], bn_batches=2, log=lambda *_: None)
    saved = json.loads(open(cfg.results).read())["runs"]
    assert saved["pfp@0.5-soup"]["soup_of"] == ["pfp@0.5-s0", "pfp@0.5-s1"] == run["soup_of"]
    assert run["record"]["soup_of"] == run["soup_of"] and run["record"]["bn_reestimated_batches"] == 2
    soup = torch.load(f"{cfg.out_dir}/crowns-pfp-50-soup.pt", weights_only=True)
    a, b = states["pfp@0.5-s0"], states["pfp@0.5-s1"]
    conv = next(k for k, v in soup.items() if k.endswith(".weight") and v.ndim == 4)
    assert torch.allclose(soup[conv], (a[conv] + b[conv]) / 2)
    bn_mean = next(k for k in soup if k.endswith("running_mean"))
    assert not torch.allclose(soup[bn_mean], (a[bn_mean] + b[bn_mean]) / 2)  # estimated again, not averaged
    from models.train_crowns import load_crown_net

    member = rebuild_pruned(load_crown_net(cfg.checkpoint)[0], a)
    assert run["params"] == sum(p.numel() for p in member.parameters())
    assert 0.0 <= run["f1"] <= 1.0 and set(run["f1_shift"]) == {"brightness"}
    assert "delta_points" in run["paired_vs_dense"] and run["validation"]
    assert json.loads(read_metadata(run["onnx"])["compression"])["method"] == "pfp"


def test_soup_run_refuses_runs_of_different_recipes(soup_study):
    from models.compression.crown_study import soup_run

    cfg, _ = soup_study
    with pytest.raises(InputError, match="share method and ratio"):
        soup_run(cfg, ["pfp@0.5-s0", "pfp@0.3"], log=lambda *_: None)
    with pytest.raises(InputError, match="not found"):
        soup_run(cfg, ["pfp@0.5-s0", "pfp@0.9"], log=lambda *_: None)
    with pytest.raises(InputError, match=">= 2"):
        soup_run(cfg, ["pfp@0.5-s0"], log=lambda *_: None)
