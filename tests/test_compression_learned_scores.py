"""Learned channel scores (SbF-style, models.compression.learned_scores): known answers on tiny networks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from torch import nn  # noqa: E402

from models.compression.learned_scores import fold_scores, learn_channel_scores, prune_sbf  # noqa: E402
from models.compression.structured import ChannelPlan  # noqa: E402

SHAPE = (3, 16, 16)


def two_layer_net(dead: slice = slice(4, 8)) -> nn.Sequential:
    """conv(3->8) + BN + ReLU, then a 1x1 head (8->2) that reads nothing from the channels ``dead``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].bias.fill_(0.5)
        net[3].weight.mul_(4.0)
        net[3].weight[:, dead] = 0.0
    return net.eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, *SHAPE, generator=g) for _ in range(2)]


def test_channels_the_output_does_not_read_get_the_lowest_scores_and_are_cut():
    """Known answer: the head ignores channels 4-7, so the fidelity term never holds them up; at half the
    MACs the learned scores rank all four below the four the head reads, and exactly those are removed."""
    net = two_layer_net()
    plan = ChannelPlan(net, SHAPE)
    assert len(plan.groups) == 1 and plan.groups[0].n_channels == 8
    scores, rec = learn_channel_scores(plan, batches(), 0.5, steps=150)
    s = scores[0]
    assert s[:4].min() > s[4:].max()
    assert rec["score_history"][-1]["soft_cost_fraction"] == pytest.approx(0.5, abs=0.05)

    net2 = two_layer_net()
    kept_w = net2[3].weight[:, :4].clone()
    pruned, details = prune_sbf(net2, SHAPE, batches(), 0.5, steps=150)
    assert details["keep"] == [4] and pruned[0].out_channels == 4
    torch.testing.assert_close(pruned[3].weight, kept_w)  # the head's live columns kept, in order


def test_folded_scores_reproduce_the_gated_network():
    """fold_scores: the ungated network with the scores folded into the batch norm computes exactly
    head(relu(bn(conv x) * s)), the network the scores were learned on."""
    net = two_layer_net(dead=slice(0, 0))
    x = torch.randn(2, *SHAPE)
    s = np.linspace(0.1, 1.0, 8)
    gate = torch.as_tensor(s, dtype=torch.float32).view(1, -1, 1, 1)
    with torch.no_grad():
        gated = net[3](torch.relu(net[1](net[0](x)) * gate))
    plan = ChannelPlan(net, SHAPE)
    fold_scores(plan, [s])
    with torch.no_grad():
        torch.testing.assert_close(net(x), gated, atol=1e-5, rtol=1e-5)


def test_soft_cost_is_the_analytic_cost_and_differentiable():
    net = two_layer_net()
    plan = ChannelPlan(net, SHAPE)
    keep = torch.tensor([5.0], requires_grad=True)
    cost = plan.soft_cost(keep, "macs")
    assert float(cost.detach()) == pytest.approx(plan.cost(np.array([5]), "macs"))
    cost.backward()
    # one channel of the group costs its conv row (3 * 9 taps) and its head column (2), at every pixel
    assert float(keep.grad) == pytest.approx((3 * 9 + 2) * SHAPE[1] * SHAPE[2])
