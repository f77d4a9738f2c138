"""ChannelGate (METHOD §2) against hand-computed references."""

import math

import pytest
import torch

from s2h.gates import ChannelGate, effective_divisor


@pytest.mark.parametrize("c,d,expected",
                         [(64, 8, 8), (24, 16, 12), (10, 8, 5), (7, 8, 7), (13, 4, 1)])
def test_divisor_is_lowered_until_it_divides(c, d, expected):
    assert effective_divisor(c, d) == expected
    assert ChannelGate(c, d).divisor == expected


def test_divisor_must_be_positive():
    with pytest.raises(ValueError, match="divisor"):
        effective_divisor(8, 0)


@pytest.mark.parametrize("c,d", [(64, 8), (48, 16), (256, 8), (16, 8)])
def test_initialisation_near_full_width(c, d):
    """E starts a quarter block below C: a margin of d/4 above the round-to-nearest boundary
    C - d/2 (METHOD §2 item 8), so the hard network is the full one until the gates move."""
    g = ChannelGate(c, d)
    e = g.expected_width().item()
    # by hand: p_K = t, the K - 1 others share 1 - t equally
    k = c // d
    t = 1 - 2 * 0.25 * d / c
    e_ref = t * c + (1 - t) * sum(j * d for j in range(1, k)) / (k - 1)
    assert e_ref == pytest.approx(c - d / 4)
    assert e == pytest.approx(e_ref, rel=1e-5)
    assert g.hard_width() == c
    assert g.keep_index().tolist() == list(range(c))
    # the margin survives a nudge of the logits that the old start (E = C - d/2) did not
    with torch.no_grad():
        g.logits[-1] -= 0.05
    assert g.hard_width() == c
    old = ChannelGate(c, d, init_gap=0.5)
    assert old.expected_width().item() == pytest.approx(c - d / 2, rel=1e-5)
    with torch.no_grad():
        old.logits[-1] -= 0.05
    assert old.hard_width() == c - d
    with pytest.raises(ValueError, match="init_gap"):
        ChannelGate(c, d, init_gap=0.0)


@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_probabilities_survival_and_mask_by_hand(rounding):
    g = ChannelGate(12, 4, tau=0.5, rounding=rounding)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([0.3, -1.0, 0.7]))
    p = torch.softmax(torch.tensor([0.3, -1.0, 0.7]) / 0.5, 0)
    q = torch.tensor([1.0, p[1] + p[2], p[2]])
    assert torch.allclose(g.probs(), p)
    assert torch.allclose(g.width_survival(), q, atol=1e-6)
    assert torch.allclose(g.soft_mask(), q.repeat_interleave(4), atol=1e-6)
    e = (p * torch.tensor([4.0, 8.0, 12.0])).sum()
    assert g.expected_width().item() == pytest.approx(e.item(), rel=1e-6)
    assert g.soft_mask().sum().item() == pytest.approx(e.item(), rel=1e-5)
    if rounding == "ceil":
        assert g.hard_width() == min(12, math.ceil(e.item() / 4) * 4)
    else:
        assert g.hard_width() == min(12, max(4, round(e.item() / 4) * 4))


def test_importance_order_drives_soft_and_hard_masks():
    g = ChannelGate(8, 2)
    scores = torch.tensor([0.1, 5.0, 0.2, 4.0, 3.0, 0.3, 2.0, 1.0])
    g.set_importance(scores)
    assert g.order.tolist() == [1, 3, 4, 6, 7, 5, 2, 0]
    g.set_width(4)
    assert g.hard_width() == 4
    assert g.keep_index().tolist() == [1, 3, 4, 6]  # the four most important, ascending
    g.set_width(2)
    assert g.keep_index().tolist() == [1, 3]
    m = g.soft_mask().detach()
    ordered = m[g.order]
    assert torch.all(ordered[:-1] >= ordered[1:] - 1e-7)  # non-increasing in importance order


def test_straight_through_width_and_mask_gradients():
    g = ChannelGate(32, 8)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([0.5, 0.1, -0.2, 0.4]))
    w = g.hard_width_ste()
    assert float(w) == g.hard_width()
    (gw,) = torch.autograd.grad(w, g.logits)
    (ge,) = torch.autograd.grad(g.expected_width(), g.logits)
    assert torch.allclose(gw, ge)

    soft = g.soft_mask()
    keep = g.keep_index()
    hard = g.hard_mask(soft, keep)
    assert torch.equal(hard.detach(), torch.ones(keep.numel()))
    coef = torch.randn(keep.numel())
    (gh,) = torch.autograd.grad((hard * coef).sum(), g.logits, retain_graph=True)
    (gs,) = torch.autograd.grad((soft[keep] * coef).sum(), g.logits)
    assert torch.allclose(gh, gs)
    assert gh.abs().sum() > 0


def test_single_width_gate_is_fixed():
    g = ChannelGate(8, 8)
    assert g.num_widths == 1 and g.hard_width() == 8
    assert torch.allclose(g.soft_mask(), torch.ones(8))


@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_hard_width_is_a_multiple_of_the_divisor(rounding):
    torch.manual_seed(1)
    g = ChannelGate(96, 8, rounding=rounding)
    for _ in range(50):
        with torch.no_grad():
            g.logits.normal_(0, 2)
        k = g.hard_width()
        assert k % 8 == 0 and 8 <= k <= 96
        e = g.expected_width().item()
        if rounding == "ceil":
            assert e - 1e-4 <= k < e + 8
        else:
            assert abs(k - e) <= 4 + 1e-3


def test_nearest_rounding_reaches_the_minimum_width_where_ceil_cannot():
    """A gate with 99.7% of its mass on the narrowest width (E slightly above d)."""
    for rounding, expected in (("nearest", 8), ("ceil", 16)):
        g = ChannelGate(16, 8, rounding=rounding)
        with torch.no_grad():
            g.logits.copy_(torch.tensor([2.9, -2.9]))
        assert 8 < g.expected_width().item() < 8.1
        assert g.hard_width() == expected


def test_keep_index_object_is_reused_while_the_width_is_unchanged():
    g = ChannelGate(32, 8)
    a = g.keep_index()
    assert g.keep_index() is a  # the channel ops check an index tensor once per object
    g.set_width(16)
    b = g.keep_index()
    assert b is not a and b.numel() == 16
    g.set_importance(torch.arange(32.0))
    assert g.keep_index() is not b and g.keep_index().tolist() == list(range(16, 32))
