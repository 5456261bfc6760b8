"""Every compression method meets its budget within 2 % and leaves a runnable net of the same output."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("segmentation_models_pytorch")

from torch import nn  # noqa: E402

from models.compression.compress import STRUCTURED, compress  # noqa: E402
from models.compression.cost import count_cost  # noqa: E402
from models.compression.structured import ChannelPlan  # noqa: E402
from models.nets import SegNetConfig, build_segmentation_net  # noqa: E402

SHAPE = (3, 64, 64)
torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem, two residual stages (adds couple each stage's trunk), pooled linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = nn.Sequential(Block(32), Block(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64))
        self.stage2 = nn.Sequential(Block(64), Block(64))
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = self.stage2(torch.relu(self.down(self.stage1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def tiny_unet():
    torch.manual_seed(0)
    cfg = SegNetConfig(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8))
    return build_segmentation_net(cfg)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, *SHAPE, generator=g)]


@pytest.mark.parametrize("method", ["pfp", "l1", "uniform", "random", "alds", "sbf"])
@pytest.mark.parametrize("budget,ratio", [("macs", 0.5), ("params", 0.7)])
def test_unet_budget_met_and_output_kept(method, budget, ratio, calib):
    net = tiny_unet()
    x = torch.randn(1, *SHAPE)
    res = compress(net, method, ratio, SHAPE, calibration=calib, budget=budget, score_steps=20)
    after = count_cost(res.model, SHAPE)
    before = count_cost(net, SHAPE)
    key = "macs" if budget == "macs" else "params"
    kept = getattr(after, key) / getattr(before, key)
    assert abs(kept - (1 - ratio)) <= 0.02
    assert res.achieved_ratio == pytest.approx(1 - kept)
    with torch.no_grad():
        y = res.model.eval()(x)
    assert y.shape == (1, 3, *SHAPE[1:])
    assert torch.isfinite(y).all()
    if method in STRUCTURED:  # channels physically removed
        assert after.params < before.params and after.nonzero_params == pytest.approx(after.params, rel=0.01)


@pytest.mark.parametrize("method", ["pfp", "sbf"])
def test_resnet_with_linear_head(method, calib):
    net = TinyResNet()
    res = compress(net, method, 0.6, SHAPE, calibration=calib, budget="params", score_steps=20)
    assert abs(res.after.params / res.before.params - 0.4) <= 0.02
    assert res.model(torch.randn(2, *SHAPE)).shape == (2, 5)


def test_analytic_cost_equals_measured_after_pruning(calib):
    net = tiny_unet()
    plan = ChannelPlan(net, SHAPE)
    assert plan.full_cost("params") == count_cost(net, SHAPE).params
    rng = np.random.default_rng(0)
    keep = np.maximum(1, (plan.full_keep * rng.uniform(0.2, 1.0, len(plan.groups))).astype(int))
    from models.compression.structured import prune_channels

    predicted = (plan.cost(keep, "params"), plan.cost(keep, "macs"))
    prune_channels(plan, keep, plan.group_l1())
    measured = count_cost(net, SHAPE)
    assert predicted == (measured.params, measured.macs)


def test_unet_skip_and_residual_groups_are_coupled():
    net = tiny_unet()
    plan = ChannelPlan(net, SHAPE)
    by_root = {g.root_name: g for g in plan.groups}
    # the stem + layer1 trunk (joined by residual adds) feeds layer1 blocks, layer2 and two decoder skips
    trunk = next(g for g in plan.groups if any(n == "encoder.layer1.0.conv2" for n, _, _ in g.producers))
    consumers = {n for n, _, _ in trunk.consumers}
    assert "decoder.blocks.1.conv1.0" in consumers or "decoder.blocks.2.conv1.0" in consumers
    assert "encoder.layer2.0.conv1" in consumers and "encoder.layer2.0.downsample.0" in consumers
    # the output head is never a root (its classes stay)
    assert "segmentation_head.0" not in by_root


def test_sipp_meets_nonzero_budget_and_keeps_shapes(calib):
    net = tiny_unet()
    res = compress(net, "sipp", 0.8, SHAPE, calibration=calib)
    assert abs(res.after.nonzero_params / res.before.params - 0.2) <= 0.02
    assert res.after.params == res.before.params  # unstructured: no dense shrinkage
    assert res.record()["sparse_size_bytes"] < 4 * res.before.params
    assert res.model(torch.randn(1, *SHAPE)).shape == (1, 3, *SHAPE[1:])


def test_pfp_keeps_more_of_the_layers_that_matter():
    # a network whose second conv reads only 4 of its 16 input channels: PFP must keep those 4
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        net[2].weight[:, 4:] *= 1e-3
    calib = [torch.randn(4, 3, 16, 16)]
    res = compress(net, "pfp", 0.5, (3, 16, 16), calibration=calib, budget="macs")
    kept_in = res.model[2].weight.shape[1]
    assert kept_in >= 4
    w = res.model[2].weight.detach().abs().sum((0, 2, 3))
    assert (w > 0.01).sum() >= 4  # the four strong channels survived


def test_alds_k1_uses_plain_convs_and_meets_budget():
    net = tiny_unet()
    res = compress(net, "alds", 0.6, SHAPE, budget="macs", alds_k_max=1)
    assert abs(res.after.macs / res.before.macs - 0.4) <= 0.02
    assert all(m.groups == 1 for m in res.model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("method", ["pfp", "l1", "uniform"])
def test_budget_met_with_widths_in_multiples_of_8(method, calib):
    # widths rounded to 8 (what gives ONNX Runtime speed-ups): the allocator must keep filling the budget
    # with the groups whose step still fits, not stop at the first one that does not
    net = tiny_unet()
    res = compress(net, method, 0.5, SHAPE, calibration=calib, budget="macs", round_to=8)
    kept = res.after.macs / res.before.macs
    assert abs(kept - 0.5) <= 0.02
    plan = ChannelPlan(res.model, SHAPE)
    widths = plan.full_keep
    assert all(w % 8 == 0 or w == full for w, full in zip(widths, ChannelPlan(tiny_unet(), SHAPE).full_keep,
                                                              strict=True))


def test_iterative_prune_retrain_reaches_the_budget_in_cycles(calib):
    """crown_study's iterative schedule: 2 cycles of PFP to 50 % of the MACs, each followed by its share of
    the fine-tune steps, the network keeping its output."""
    from models.compression.crown_study import StudyConfig, iterative_run
    from models.train_crowns import TrainCrownsConfig

    class Batches:
        def batch(self, step):
            g = torch.Generator().manual_seed(step)
            return torch.randn(2, *SHAPE, generator=g), torch.randint(0, 3, (2, *SHAPE[1:]), generator=g)

    net = tiny_unet()
    cfg = StudyConfig(checkpoint="", dense_onnx="", finetune_steps=4, prune_steps=2, round_to=None)
    train_cfg = TrainCrownsConfig(iterations=10)
    res = iterative_run(net, "pfp", 0.5, SHAPE, calib, Batches(), train_cfg, cfg, total=10, log=None)
    kept = res.after.macs / count_cost(net, SHAPE).macs
    assert abs(kept - 0.5) <= 0.03 and res.achieved_ratio == pytest.approx(1 - kept)
    cycles = res.details["finetune"]["cycles"]
    assert [c["retrain"]["steps"] for c in cycles] == [2, 2] and res.details["finetune"]["steps"] == 4
    assert cycles[0]["ratio"] == pytest.approx(1 - 0.5**0.5) and "epsilon" in cycles[0]
    with torch.no_grad():
        assert res.model.eval()(torch.randn(1, *SHAPE)).shape == (1, 3, *SHAPE[1:])
    with pytest.raises(ValueError, match="structured"):
        iterative_run(net, "alds", 0.5, SHAPE, calib, Batches(), train_cfg, cfg, total=10, log=None)
