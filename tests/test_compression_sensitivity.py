"""PFP and SiPP sensitivities against brute-force loops on tiny layers (known answers)."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.compression.sensitivity import (  # noqa: E402
    pfp_conv_sensitivity,
    pfp_linear_sensitivity,
    sipp_conv_sensitivity,
)


def _contributions(w, x, i, j, oy, ox, pad):
    """Positive and negative parts of channel j's contribution to output (i, oy, ox) and its products."""
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    taps = itertools.product(range(kh), range(kw))
    return np.array([w[i, j, a, b] * xp[j, oy + a, ox + b] for a, b in taps])


def brute_pfp(w, xs, pad):
    f, c, kh, kw = w.shape
    s = np.zeros(c)
    for x in xs:
        h_out = x.shape[1] + 2 * pad - kh + 1
        w_out = x.shape[2] + 2 * pad - kw + 1
        for i, oy, ox in itertools.product(range(f), range(h_out), range(w_out)):
            per_channel = [_contributions(w, x, i, j, oy, ox, pad) for j in range(c)]
            pos = np.array([p[p > 0].sum() for p in per_channel])
            neg = np.array([-p[p < 0].sum() for p in per_channel])
            for part in (pos, neg):
                z = part.sum()
                if z > 1e-12:
                    s = np.maximum(s, part / z)
    return s


def brute_sipp(w, xs, pad):
    f, c, kh, kw = w.shape
    s = np.zeros_like(w)
    for x in xs:
        h_out = x.shape[1] + 2 * pad - kh + 1
        w_out = x.shape[2] + 2 * pad - kw + 1
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
        acc = np.zeros_like(w)
        for i, oy, ox in itertools.product(range(f), range(h_out), range(w_out)):
            prods = w[i] * xp[:, oy:oy + kh, ox:ox + kw]
            zp, zn = prods[prods > 0].sum(), -prods[prods < 0].sum()
            g = np.zeros_like(prods)
            if zp > 1e-12:
                g = np.where(prods > 0, prods / zp, g)
            if zn > 1e-12:
                g = np.where(prods < 0, -prods / zn, g)
            acc[i] += g
        s = np.maximum(s, acc / (h_out * w_out))
    return s


@pytest.fixture()
def tiny_layer():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 4, 3, 3))
    xs = rng.normal(size=(2, 4, 5, 5))  # signed inputs exercise the negative parts
    xs[0, 1] = np.abs(xs[0, 1])
    return w, xs


def test_pfp_conv_matches_brute_force(tiny_layer):
    w, xs = tiny_layer
    got = pfp_conv_sensitivity(torch.from_numpy(w), torch.from_numpy(xs), padding=1).numpy()
    want = brute_pfp(w, xs, pad=1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all((got > 0) & (got <= 1))


def test_pfp_chunking_does_not_change_result(tiny_layer):
    w, xs = tiny_layer
    a = pfp_conv_sensitivity(torch.from_numpy(w), torch.from_numpy(xs), padding=1)
    b = pfp_conv_sensitivity(torch.from_numpy(w), torch.from_numpy(xs), padding=1, max_elements=10)
    np.testing.assert_allclose(a.numpy(), b.numpy())


def test_pfp_linear_matches_brute_force():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 6))
    xs = rng.normal(size=(4, 6))
    got = pfp_linear_sensitivity(torch.from_numpy(w), torch.from_numpy(xs)).numpy()
    want = brute_pfp(w[:, :, None, None], xs[:, :, None, None], pad=0)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_pfp_dominant_channel_scores_one():
    # one input channel alone drives every output: its relative contribution is 1, the others' 0
    w = torch.zeros(2, 3, 1, 1, dtype=torch.float64)
    w[:, 1] = 1.0
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64) + 0.1
    s = pfp_conv_sensitivity(w, x)
    np.testing.assert_allclose(s.numpy(), [0.0, 1.0, 0.0])


def test_sipp_conv_matches_brute_force(tiny_layer):
    w, xs = tiny_layer
    got = sipp_conv_sensitivity(torch.from_numpy(w), torch.from_numpy(xs), padding=1).numpy()
    want = brute_sipp(w, xs, pad=1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
