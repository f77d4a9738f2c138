"""timm's conv variants pruned by what they compute (issue 18, item 5): ``Conv2dSame`` (TF
"SAME" padding computed from the input size, then a conv), ``StdConv2d`` / ``StdConv2dSame``
(each output row of the weight standardised over its ``C_in * kh * kw`` entries) and
``ScaledStdConv2d`` / ``ScaledStdConv2dSame`` (the same times ``gain * scale``).

A weight-standardised conv with fewer input channels standardises over the kept columns only:
the hard network does exactly that and exports as the same timm class with the kept channels;
the soft network weights the statistics by the input mask. References, independent of the code
under test: the layers written by hand in float64 (pad, mean / biased variance of the kept
block, conv) for the hard path and for the soft path with its gate gradients (autograd through
the hand-written network), the exported model against the hard network (1e-5, fp32), torch's
FLOP counter on the export against ``hard_flops_ratio()`` (1%), the lockstep forward against
two passes, a save / load round trip, and the real timm models. BiT's ``GroupNormAct`` (and
``nn.GroupNorm``) is pruned in whole norm groups (the statistics of a kept norm group are its
own): reference, the group norm of the kept channels by hand in float64.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from _exact import check_exact, prune, soft_gate_grads
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    Conv2dSame,
    GroupNormAct,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)

from s2h.dual import validate  # noqa: E402


class Net(nn.Module):
    """Every variant in a chain, a depthwise ``Conv2dSame`` among them; odd input sizes make
    the "SAME" pads asymmetric."""

    CONVS = ("c1", "c2", "dw", "c3", "c4", "c5")

    def __init__(self):
        super().__init__()
        self.c1 = Conv2dSame(3, 16, 3, stride=2)
        self.c2 = StdConv2d(16, 24, 3, padding=1)
        self.dw = Conv2dSame(24, 24, 3, stride=2, groups=24)
        self.c3 = StdConv2dSame(24, 16, 3, stride=2)
        self.c4 = ScaledStdConv2d(16, 32, 3, padding=1, gamma=1.7)
        self.c5 = ScaledStdConv2dSame(32, 24, 1)
        self.fc = nn.Linear(24, 5)
        with torch.no_grad():
            self.c4.gain.uniform_(0.5, 1.5)
            self.c5.gain.uniform_(0.5, 1.5)

    def forward(self, x):
        for name in self.CONVS:
            x = torch.relu(getattr(self, name)(x))
        return self.fc(x.mean((2, 3)))


def _same_pad(x, k, s):
    """TF "SAME" padding by hand (dilation 1)."""
    pads = []
    for size, kk, ss in ((x.shape[-1], k[1], s[1]), (x.shape[-2], k[0], s[0])):
        total = max((-(-size // ss) - 1) * ss + kk - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _hand_conv(m, x, in_mask, out_keep=None, in_keep=None):
    """Layer ``m`` (plain timm class) by hand in float64 on ``x``: ``in_mask`` (C_in,) multiplies
    the input and weights the standardisation's statistics; ``out_keep`` / ``in_keep`` restrict
    to a block first (the hard path, ``in_mask`` then all ones)."""
    w = m.weight.double()
    b = None if m.bias is None else m.bias.double()
    gain = getattr(m, "gain", None)
    gain = None if gain is None else gain.double().flatten()
    if out_keep is not None:
        w = w[out_keep]
        b = None if b is None else b[out_keep]
        gain = None if gain is None else gain[out_keep]
    if in_keep is not None and m.groups == 1:
        w = w[:, in_keep]
    if isinstance(m, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)):
        cols = (in_mask if m.groups == 1 else torch.ones(w.shape[1], dtype=w.dtype))
        a = cols.double()[None, :, None, None].expand_as(w)
        n = a.sum((1, 2, 3), keepdim=True)
        mean = (w * a).sum((1, 2, 3), keepdim=True) / n
        var = ((w - mean) ** 2 * a).sum((1, 2, 3), keepdim=True) / n
        w = (w - mean) / torch.sqrt(var + m.eps)
        if gain is not None:
            w = w * (gain * m.scale)[:, None, None, None]
    x = x * in_mask.double()[None, :, None, None]
    padding = m.padding
    if isinstance(m, Conv2dSame) or getattr(m, "same_pad", False):
        x, padding = _same_pad(x, m.kernel_size, m.stride), 0
    groups = m.groups if m.groups == 1 else x.shape[1]
    return F.conv2d(x, w, b, m.stride, padding, m.dilation, groups)


def _setup():
    torch.manual_seed(0)
    model = Net()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 15, 13)
    pruner, msgs = prune(model, x, divisor=4)
    return pruner, model, dense, x, msgs


def _random_gates(pruner, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)


def test_variants_are_layers_with_their_groups_pruned_exactly():
    pruner, model, dense, x, msgs = _setup()
    assert not any("left unpruned" in m for m in msgs), msgs
    groups = {g.name: g for g in pruner.groups}
    assert set(groups) == {"c1", "c2", "c3", "c4", "c5"}
    assert groups["c2"].depthwise == ["dw"]
    pruner.set_widths({"c1": 8, "c2": 12, "c3": 8, "c4": 20, "c5": 12})
    exported = check_exact(pruner, model, x, dense, model_fn=Net)
    assert pruner.hard_flops_ratio() < 0.5
    for name, cls in (("c1", Conv2dSame), ("c2", StdConv2d), ("dw", Conv2dSame),
                      ("c3", StdConv2dSame), ("c4", ScaledStdConv2d),
                      ("c5", ScaledStdConv2dSame)):
        assert type(getattr(exported, name)) is cls
    assert (exported.dw.in_channels, exported.dw.out_channels, exported.dw.groups) == (12, 12, 12)
    assert exported.c4.weight.shape == (20, 8, 3, 3) and exported.c4.gain.shape == (20, 1, 1, 1)
    assert exported.c4.scale == dense.c4.scale and exported.c5.eps == dense.c5.eps
    assert exported.c3.same_pad and not exported.c5.same_pad
    # the lockstep forward (fused dual ops elsewhere) runs these layers' own code: it agrees
    # with two passes
    assert validate(pruner) is None


def test_hard_layers_equal_the_kept_block_standardised_by_hand():
    """Each exported layer (== the hard network's, checked above) against the layer by hand in
    float64: the kept rows and columns of the dense weight, standardised over the kept columns,
    the kept gains, the "SAME" pad of the input size."""
    pruner, model, dense, x, _ = _setup()
    _random_gates(pruner)
    model.eval()
    exported = pruner.export()
    keep = {}
    for name in Net.CONVS:
        m = pruner.masked_layers[name]
        in_keep = None if m.in_gate is None else m.in_gate.keep_index()
        out_keep = (in_keep if m.passes_group else
                    None if m.out_gate is None else m.out_gate.keep_index())
        keep[name] = (in_keep, out_keep)
    assert any(o is not None and o.numel() < getattr(dense, n).out_channels
               for n, (_, o) in keep.items())
    h = x.double()
    with torch.no_grad():
        for name in Net.CONVS:
            in_keep, out_keep = keep[name]
            exp = getattr(exported, name)
            got = exp.double()(h)
            ones = torch.ones(h.shape[1], dtype=torch.float64)
            ref = _hand_conv(getattr(dense, name), h, ones, out_keep,
                             None if name == "dw" else in_keep)
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
            h = torch.relu(ref)


def test_soft_path_and_gate_gradients_match_float64_autograd():
    pruner, model, dense, x, _ = _setup()
    out, got = soft_gate_grads(pruner, (x,))
    # reference: the network by hand in float64, each layer's input times its gate's soft mask,
    # the standardisation's statistics weighted by it
    h = x.double()
    for name in Net.CONVS:
        gate = pruner.masked_layers[name].in_gate
        mask = (torch.ones(h.shape[1], dtype=torch.float64) if gate is None
                else gate.soft_mask().double())
        h = torch.relu(_hand_conv(getattr(dense, name), h, mask))
    mask = pruner.masked_layers["fc"].in_gate.soft_mask().double()
    ref = F.linear(h.mean((2, 3)) * mask, dense.fc.weight.double(), dense.fc.bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    ref.square().sum().backward()
    assert all(g.abs().sum() > 0 for g in got.values())
    for k, g in pruner.gates.items():
        torch.testing.assert_close(got[k].double(), g.logits.grad.double(), rtol=1e-4, atol=1e-7)


def test_soft_standardisation_at_a_binary_mask_is_the_hard_one():
    """The soft statistics at a 0/1 mask are those of the kept columns; at all ones timm's."""
    from s2h.timm_support import standardised

    torch.manual_seed(0)
    m = ScaledStdConv2d(6, 4, 3, gamma=1.3).double()
    with torch.no_grad():
        m.gain.uniform_(0.5, 1.5)
    keep = torch.tensor([0, 2, 3])
    mask = torch.zeros(6, dtype=torch.float64)
    mask[keep] = 1
    soft = standardised(m, m.weight, m.gain, mask)[:, keep]
    hard = standardised(m, m.weight[:, keep], m.gain)
    torch.testing.assert_close(soft, hard, rtol=1e-12, atol=1e-12)
    full = standardised(m, m.weight, m.gain, torch.ones(6, dtype=torch.float64))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, full, m.bias, padding=m.padding), m(x), rtol=1e-10,
                               atol=1e-10)


def _real(name, size, divisor=8):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size)
    pruner, msgs = prune(model, x, divisor=divisor)
    assert not any(k in m for m in msgs for k in ("Conv2dSame", "StdConv2d")), msgs
    assert sum(f for _, f, gates in pruner._flop_terms if gates) / pruner.dense_flops > 0.999
    _random_gates(pruner)
    check_exact(pruner, model, x, dense)
    assert pruner.hard_flops_ratio() < 0.9
    return pruner


def test_tf_efficientnet_b0_conv2d_same_is_pruned():
    pruner = _real("tf_efficientnet_b0", 32)
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    # before: 32 of 50, the Conv2dSame stem and the depthwise convs kept whole; now all but
    # the classifier's output and 3 squeeze-excite groups narrower than the divisor
    assert (len(pruner.groups), n_all) == (37, 41)
    assert isinstance(pruner.masked_layers["conv_stem"], Conv2dSame)


def test_nfnet_scaled_std_conv_is_pruned():
    pruner = _real("nfnet_l0", 32)
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == (35, 36)
    assert isinstance(pruner.masked_layers["stem.conv1"], ScaledStdConv2d)


class BiTLike(nn.Module):
    """StdConv2d -> GroupNormAct (4 norm groups of 4) -> StdConv2d -> nn.GroupNorm (3 of 8)."""

    def __init__(self):
        super().__init__()
        self.c1 = StdConv2d(3, 16, 3, padding=1)
        self.n1 = GroupNormAct(16, num_groups=4)
        self.c2 = StdConv2d(16, 24, 3, padding=1)
        self.n2 = nn.GroupNorm(3, 24)
        self.fc = nn.Linear(24, 5)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.n1(self.c1(x))
        return self.fc(torch.relu(self.n2(self.c2(x))).mean((2, 3)))


def _hand_gn(h, n, keep, c):
    """Group norm by hand (float64) of the kept channels ``keep`` of ``h`` (N, k, H, W), in
    norm groups of ``c`` channels, with ``n``'s affine parameters of those channels."""
    b, k = h.shape[:2]
    g = h.reshape(b, k // c, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                     + n.eps)
    return (g.reshape_as(h) * n.weight.double()[keep, None, None]
            + n.bias.double()[keep, None, None])


def _norm_model(cls):
    """``(model, dense copy, x, pruner, groups by name)`` of a two-conv ``cls``, both convs'
    groups pruned (no warning)."""
    torch.manual_seed(0)
    model = cls()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    pruner, msgs = prune(model, x, divisor=2)
    assert not any("left unpruned" in m for m in msgs), msgs
    groups = {g.name: g for g in pruner.groups}
    assert set(groups) == {"c1", "c2"}
    return model, dense, x, pruner, groups


def test_group_norm_is_pruned_in_whole_norm_groups():
    model, dense, x, pruner, groups = _norm_model(BiTLike)
    assert (groups["c1"].norms, groups["c1"].block) == (["n1"], 4)
    assert (groups["c2"].norms, groups["c2"].block) == (["n2"], 8)
    pruner.set_widths({"c1": 8, "c2": 16})
    exported = check_exact(pruner, model, x, dense, model_fn=BiTLike)
    assert type(exported.n1) is GroupNormAct and type(exported.n2) is nn.GroupNorm
    assert (exported.n1.num_groups, exported.n1.num_channels) == (2, 8)
    assert (exported.n2.num_groups, exported.n2.num_channels) == (2, 16)
    k1 = pruner.gate_of(groups["c1"]).keep_index()
    k2 = pruner.gate_of(groups["c2"]).keep_index()
    for keep, c in ((k1, 4), (k2, 8)):  # whole norm groups
        assert torch.equal(keep.view(-1, c) % c, torch.arange(c).expand(keep.numel() // c, c))
    with torch.no_grad():
        ones = torch.ones(3, dtype=torch.float64)
        h1 = torch.relu(_hand_gn(_hand_conv(dense.c1, x.double(), ones, k1), dense.n1, k1, 4))
        torch.testing.assert_close(exported.n1(exported.c1(x)).double(), h1, rtol=1e-5,
                                   atol=1e-5)
        ones = torch.ones(8, dtype=torch.float64)
        h2 = _hand_gn(_hand_conv(dense.c2, h1, ones, k2, k1), dense.n2, k2, 8)
        torch.testing.assert_close(exported.n2(exported.c2(exported.n1(exported.c1(x))))
                                   .double(), h2, rtol=1e-5, atol=1e-5)


def test_bit_resnetv2_std_conv_and_group_norm_are_pruned():
    pruner = _real("resnetv2_50x1_bit", 32)
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    # before: nothing prunable (every group met a GroupNormAct, and the StdConv2d were unknown)
    assert (len(pruner.groups), n_all) == (37, 38)
    assert isinstance(pruner.masked_layers["stem.conv"], StdConv2d)
    assert all(g.block > 1 for g in pruner.groups if g.norms)


class OneGroupNorms(nn.Module):
    """``nn.GroupNorm(1, C)`` and timm's ``GroupNorm1`` (MobileViT v2): a layer norm over
    ``(C, H, W)``, pruned as a LayerNorm is (over the kept channels)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import GroupNorm1

        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8)
        self.c2, self.n2 = nn.Conv2d(8, 12, 1), GroupNorm1(12)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.n1(self.c1(x)))
        return self.fc(torch.relu(self.n2(self.c2(x))).mean((2, 3)))


def test_one_group_norms_are_pruned_over_the_kept_channels():
    """Reference: the norm by hand in float64 over the kept channels only (one norm group)."""
    from timm.layers import GroupNorm1

    model, dense, x, pruner, groups = _norm_model(OneGroupNorms)
    assert groups["c1"].norms == ["n1"] and groups["c2"].norms == ["n2"]
    pruner.set_widths({"c1": 6, "c2": 4})
    exported = check_exact(pruner, model, x, dense, model_fn=OneGroupNorms)
    assert type(exported.n1) is nn.GroupNorm and type(exported.n2) is GroupNorm1
    assert (exported.n1.num_groups, exported.n1.num_channels) == (1, 6)
    assert (exported.n2.num_groups, exported.n2.num_channels) == (1, 4)
    k1 = pruner.gate_of(groups["c1"]).keep_index()
    k2 = pruner.gate_of(groups["c2"]).keep_index()
    with torch.no_grad():
        h1 = torch.relu(_hand_gn(_hand_conv(dense.c1, x.double(), torch.ones(3,
                        dtype=torch.float64), k1), dense.n1, k1, 6))
        h2 = torch.relu(_hand_gn(_hand_conv(dense.c2, h1, torch.ones(6, dtype=torch.float64),
                                            k2, k1), dense.n2, k2, 4))
        ref = F.linear(h2.mean((2, 3)), dense.fc.weight.double()[:, k2], dense.fc.bias.double())
        torch.testing.assert_close(exported(x).double(), ref, rtol=1e-5, atol=1e-5)
