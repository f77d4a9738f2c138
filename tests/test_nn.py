"""Masked layers: drop-in behaviour, soft/hard paths vs plain PyTorch, masks after BatchNorm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2h.gates import ChannelGate
from s2h.nn import GateRuntime, MaskedBatchNorm2d, MaskedConv2d, MaskedLinear


@pytest.mark.parametrize("cls,parent,args", [
    (MaskedConv2d, nn.Conv2d, (6, 10, 3)),
    (MaskedLinear, nn.Linear, (12, 7)),
])
def test_drop_in_same_keys_same_output(cls, parent, args):
    torch.manual_seed(0)
    ref = parent(*args)
    m = cls(*args)
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 9, 9) if parent is nn.Conv2d else torch.randn(3, 5, 12)
    assert torch.equal(m(x), ref(x))
    assert isinstance(m, parent)


def _gates(cin, cout, d=2):
    rt = GateRuntime()
    gi, go = ChannelGate(cin, d), ChannelGate(cout, d)
    with torch.no_grad():
        gi.logits.normal_()
        go.logits.normal_()
        gi.set_importance(torch.rand(cin))
        go.set_importance(torch.rand(cout))
    rt.prepare([gi, go])
    return rt, gi, go


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_soft_and_hard_match_plain_pytorch(stride, padding, dilation):
    torch.manual_seed(0)
    m = MaskedConv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation).double()
    rt, gi, go = _gates(6, 10)
    m.attach_gates(rt, gi, go, "conv")
    x = torch.randn(2, 6, 11, 11, dtype=torch.double)
    mask = gi.soft_mask().double()
    with rt.use("soft"):
        ys = m(x)
    ref = F.conv2d(x * mask[None, :, None, None], m.weight, m.bias, stride, padding, dilation)
    assert torch.allclose(ys, ref)
    ik, ok = rt.state(gi).keep, rt.state(go).keep
    with rt.use("hard"):
        yh = m(x[:, ik])
    w = m.weight.detach()[ok][:, ik]
    ref_h = F.conv2d(x[:, ik], w, m.bias.detach()[ok], stride, padding, dilation)
    assert yh.shape[1] == ok.numel()
    assert torch.allclose(yh, ref_h)


def test_depthwise_hard_uses_kept_groups():
    torch.manual_seed(0)
    m = MaskedConv2d(8, 8, 3, padding=1, groups=8).double()
    rt, g, _ = _gates(8, 8)
    m.attach_gates(rt, g, g, "dw")
    keep = rt.state(g).keep
    x = torch.randn(2, 8, 5, 5, dtype=torch.double)
    with rt.use("hard"):
        yh = m(x[:, keep])
    ref = F.conv2d(x[:, keep], m.weight.detach()[keep], m.bias.detach()[keep], 1, 1, 1,
                   keep.numel())
    assert torch.allclose(yh, ref)


def test_linear_soft_hard_and_gate_gradient():
    torch.manual_seed(0)
    m = MaskedLinear(12, 8).double()
    rt, gi, go = _gates(12, 8)
    m.attach_gates(rt, gi, go, "fc")
    x = torch.randn(4, 3, 12, dtype=torch.double)
    with rt.use("soft"):
        ys = m(x)
    assert torch.allclose(ys, F.linear(x * gi.soft_mask().double(), m.weight, m.bias))
    ik, ok = rt.state(gi).keep, rt.state(go).keep
    with rt.use("hard"):
        yh = m(x[..., ik])
    assert torch.allclose(yh, F.linear(x[..., ik], m.weight[ok][:, ik], m.bias[ok]))
    # the straight-through hard mask carries the gradient to the gate logits: METHOD §2.6,
    # m_ste = w + (m - w).detach() on the kept inputs (w the relaxed mask, m the 0/1 mask)
    r = torch.randn_like(yh)
    (g,) = torch.autograd.grad((yh * r).sum(), gi.logits)
    w = gi.soft_mask().double()
    hard = torch.zeros_like(w).index_fill_(0, ik, 1.0)
    m_ste = w + (hard - w).detach()
    ref = F.linear(x[..., ik] * m_ste[ik], m.weight.detach()[ok][:, ik], m.bias.detach()[ok])
    (g_ref,) = torch.autograd.grad((ref * r).sum(), gi.logits)
    assert torch.allclose(g.double(), g_ref.double(), rtol=1e-6, atol=1e-9)
    assert g_ref.abs().sum() > 0


def test_hard_mode_rejects_full_width_input_with_a_clear_error():
    m = MaskedLinear(12, 8)
    rt, gi, go = _gates(12, 8)
    with torch.no_grad():
        gi.set_width(6)
    rt.prepare([gi, go])
    m.attach_gates(rt, gi, go, "blocks.0.fc")
    with rt.use("hard"), pytest.raises(RuntimeError, match="blocks.0.fc.*expected 6"):
        m(torch.randn(2, 12))


def test_mask_after_batchnorm_is_not_cancelled():
    """METHOD §3: a mask on a conv's output before BN is cancelled; s2h masks consumer inputs."""
    torch.manual_seed(0)
    conv1, bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    conv2, bn2 = MaskedConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    x = torch.randn(16, 3, 8, 8)
    mask = torch.full((8,), 0.3)
    # output-masking before BN: cancelled by the batch statistics
    a = bn1(conv1(x))
    b = bn1(conv1(x) * mask[None, :, None, None])
    assert (a - b).abs().max() < 1e-2
    # s2h's input masking of the consumer, with BN after every conv: the output changes
    rt = GateRuntime()
    gate = ChannelGate(8, 2)
    conv2.attach_gates(rt, gate, None, "conv2")
    h = torch.relu(bn1(conv1(x)))
    rt.prepare([gate])
    with rt.use("soft"):
        y_full = bn2(conv2(h))
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([2.0, 0.0, 0.0, -2.0]))
    rt.prepare([gate])
    with rt.use("soft"):
        y_masked = bn2(conv2(h))
    assert (y_full - y_masked).abs().max() > 0.1


def test_batchnorm_hard_statistics_are_separate():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    bn.__class__ = MaskedBatchNorm2d
    bn.add_hard_stats()
    rt = GateRuntime()
    g = ChannelGate(8, 2)
    g.set_importance(torch.arange(8.0))
    g.set_width(4)
    bn.attach_gates(rt, g, g, "bn")
    rt.prepare([g])
    keep = rt.state(g).keep
    assert keep.tolist() == [4, 5, 6, 7]
    x = torch.randn(6, 8, 4, 4) * 3 + 1
    with rt.use("soft"):
        bn(x)
    soft_mean = bn.running_mean.clone()
    assert torch.equal(bn.hard_running_mean, torch.zeros(8))
    with rt.use("hard"):
        y = bn(x[:, keep])
    ref = F.batch_norm(x[:, keep], None, None, bn.weight[keep], bn.bias[keep], True, 0.1, bn.eps)
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.equal(bn.running_mean, soft_mean)  # soft stats untouched by the hard pass
    expected = 0.1 * x[:, keep].mean((0, 2, 3))
    assert torch.allclose(bn.hard_running_mean[keep], expected, atol=1e-6)
    assert torch.equal(bn.hard_running_mean[:4], torch.zeros(4))  # pruned entries untouched


@pytest.mark.parametrize("straight", [False, True])
def test_mask_gradient_of_bf16_activations_is_not_rounded_to_bf16(straight):
    """With bf16 activations and a float32 gate mask, the mask's gradient ``Σ grad ⊙ x`` is
    accumulated and returned in float32 (not cast to bf16 and back): it equals the float64 sum
    of the same bf16 products to float32 precision, far inside bf16's rounding (2^-9)."""
    from s2h.nn import soft_masked, straight_through

    torch.manual_seed(0)
    x = torch.randn(4, 24, 5, 5).bfloat16()
    g = torch.randn(4, 24, 5, 5).bfloat16()
    mask = (torch.rand(24) + 0.5).requires_grad_()
    y = straight_through(x, mask, 1) if straight else soft_masked(x, mask, 1)
    (gm,) = torch.autograd.grad(y, mask, g)
    assert gm.dtype == torch.float32
    want = (g * x).double().sum((0, 2, 3))  # the products as the kernel forms them (bf16)
    rel = ((gm.double() - want).abs() / want.abs().clamp_min(1e-3)).max().item()
    assert rel < 1e-5, rel
