"""The loss terms and the routed backward of METHOD §4, without a model: against float64 hand
computations and autograd on small tensors."""

from __future__ import annotations

import pytest
import torch

from s2h.losses import add_normalized_resource_grad, loss_terms, resource_fade, routed_backward


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q), batch mean, written out in float64."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def test_loss_terms_equal_the_hand_computation():
    torch.manual_seed(0)
    s, h = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    ratio = torch.tensor(0.47)
    t = loss_terms(s, h, y, ratio, target=0.35, alpha=0.7, lam=3.0)
    ce = -torch.log_softmax(s.double(), -1)[torch.arange(6), y].mean()
    assert float(t["perf"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(t["gap_weights"]) == pytest.approx(0.7 * float(_kl(s, h)), rel=1e-5)
    assert float(t["gap_gates"]) == pytest.approx(0.7 * float(_kl(s, h)), rel=1e-5)
    assert float(t["resource"]) == pytest.approx(3.0 * (0.47 - 0.35) ** 2, rel=1e-6)
    frozen = loss_terms(s, h, y, ratio, target=0.35, resource=False)
    assert float(frozen["resource"]) == 0.0
    direct = loss_terms(s, h, y, ratio, target=0.35, variant="direct_hard")
    ce_h = -torch.log_softmax(h.double(), -1)[torch.arange(6), y].mean()
    assert float(direct["perf"]) == pytest.approx(float(ce_h), rel=1e-6)
    with pytest.raises(ValueError, match="variant"):
        loss_terms(s, h, y, ratio, target=0.35, variant="nope")


def test_the_gap_terms_reach_only_their_side():
    """gap_weights: gradient to the hard logits only; gap_gates: to the soft logits only, each
    equal to the float64 autograd gradient of KL(p_s || p_h) with the other side fixed."""
    torch.manual_seed(1)
    s = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(4, 3, requires_grad=True)
    t = loss_terms(s, h, torch.zeros(4, dtype=torch.long), torch.tensor(0.5), target=0.5)
    gw_s, gw_h = torch.autograd.grad(t["gap_weights"], (s, h), allow_unused=True)
    gg_s, gg_h = torch.autograd.grad(t["gap_gates"], (s, h), allow_unused=True)
    assert gw_s is None and gg_h is None
    s64 = s.detach().double().requires_grad_()
    h64 = h.detach().double().requires_grad_()
    want_h, = torch.autograd.grad(_kl(s64.detach(), h64), h64)
    want_s, = torch.autograd.grad(_kl(s64, h64.detach()), s64)
    torch.testing.assert_close(gw_h.double(), want_h, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gg_s.double(), want_s, rtol=1e-4, atol=1e-7)


def test_routed_backward_keeps_gap_gates_off_the_weights_and_normalizes_the_resource():
    """A toy pruned 'network': logits = x @ (W * m(u)); the gate u gets gap_gates, perf and the
    resource gradient rescaled to resource_ratio x the norm of its other gradients."""
    torch.manual_seed(2)
    x = torch.randn(8, 4)
    w = torch.randn(4, 3, requires_grad=True)
    u = torch.randn(4, requires_grad=True)
    y = torch.randint(0, 3, (8,))

    def terms():
        m = torch.sigmoid(u)
        soft = x @ (w * m[:, None])
        hard = x @ (w * (m > 0.5).float()[:, None])
        ratio = m.mean()
        return loss_terms(soft, hard, y, ratio, target=0.2, lam=4.0)

    # reference: each term's gradient separately, by plain autograd
    t = terms()
    g_perf_w, g_perf_u = torch.autograd.grad(t["perf"] + t["gap_weights"], (w, u),
                                             retain_graph=True)
    g_gap_u, g_gap_w = torch.autograd.grad(t["gap_gates"], (u, w), retain_graph=True)
    g_ratio_u, = torch.autograd.grad(t["flops_ratio"], u)
    assert g_gap_w.abs().sum() > 0  # gap_gates would reach W if it were not routed

    t = terms()
    routed_backward(t, [u], resource_mode="normalized", target=0.2, resource_ratio=2.0,
                    band=0.02, lam=4.0)
    torch.testing.assert_close(w.grad, g_perf_w)  # no gap_gates gradient on the weights
    other = g_perf_u + g_gap_u
    r = float(t["flops_ratio"])
    fade = resource_fade(r, 0.2, 0.02)
    assert fade == 1.0
    want = other + (1.0 if r > 0.2 else -1.0) * 2.0 * other.norm() * g_ratio_u / g_ratio_u.norm()
    torch.testing.assert_close(u.grad, want, rtol=1e-5, atol=1e-7)

    w.grad = u.grad = None
    t = terms()
    routed_backward(t, [u], resource_mode="quadratic", lam=4.0)
    want_q = other + 2 * 4.0 * (r - 0.2) * g_ratio_u
    torch.testing.assert_close(u.grad, want_q, rtol=1e-5, atol=1e-7)


def test_normalized_resource_grad_fades_inside_the_band_and_falls_back_without_others():
    g = torch.zeros(3, requires_grad=True)
    r = torch.tensor([1.0, 0.0, 0.0])
    g.grad = torch.tensor([0.0, 3.0, 4.0])  # |other| = 5 (nothing before)
    add_normalized_resource_grad([g], [r], [None], 0.36, target=0.35, resource_ratio=2.0,
                                 band=0.02, lam=4.0)
    fade = (0.01 / 0.02) ** 2
    torch.testing.assert_close(g.grad, torch.tensor([2.0 * fade * 5.0, 3.0, 4.0]))
    g.grad = None  # no other gradient: the plain quadratic one, 2 * lam * (r - T) * dr/du
    add_normalized_resource_grad([g], [r], [None], 0.45, target=0.35, resource_ratio=2.0,
                                 band=0.02, lam=4.0)
    torch.testing.assert_close(g.grad, torch.tensor([2 * 4.0 * 0.1, 0.0, 0.0]))
