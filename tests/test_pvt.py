"""timm's PVT v2 attention pruned by whole heads, with its input, output and spatial-reduction
widths (issue 18: ``pvt_v2_b0`` had 69% of its FLOPs prunable, its attention kept whole).

References: attention computed by hand in float64 from the original weights of the kept heads and
channels (hard path), the same hand computation with the soft masks (soft path), float64 autograd
through it for the gradients the masks receive, the exported model against the hard network
(1e-5, fp32), ``torch.utils.flop_counter`` on the export against ``pruner.hard_flops_ratio()``
(1%), and a save / load round trip.
"""

import copy
import warnings

import pytest
import torch
from _exact import check_exact, counted, prune
from torch import nn

import s2h

timm = pytest.importorskip("timm")
from timm.models.pvt_v2 import Attention as PvtAttention  # noqa: E402

FEAT = (6, 6)


class PvtNet(nn.Module):
    """fc_in -> timm's PVT v2 attention on a 6x6 token map -> fc_out."""

    def __init__(self, sr_ratio=2, linear=False, fused=True, qkv_bias=True):
        super().__init__()
        self.fc_in = nn.Linear(6, 32)
        self.attn = PvtAttention(32, num_heads=4, sr_ratio=sr_ratio, linear_attn=linear,
                                 qkv_bias=qkv_bias)
        self.attn.fused_attn = fused
        self.fc_out = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc_out(torch.relu(self.attn(torch.relu(self.fc_in(x)), FEAT)))


def _input():
    torch.manual_seed(1)
    return torch.randn(2, FEAT[0] * FEAT[1], 6)


def _sel(t, rows=None, cols=None):
    t = t.double()
    if rows is not None:
        t = t[rows]
    if cols is not None:
        t = t[:, cols]
    return t


def _reference(model, x, keep, mul):
    """The network by hand in float64 on the kept channels ``keep`` (role -> index tensor;
    roles ``in`` = fc_in's outputs, ``heads``, ``sr``, ``out`` = attn's outputs), each role's
    channels multiplied by ``mul[role]`` where its consumer reads them (the soft / hard masks)."""
    a = model.attn
    hd, big_a = a.head_dim, a.num_heads * a.head_dim
    k_in, k_h, k_sr, k_out = keep["in"], keep["heads"], keep.get("sr"), keep["out"]
    h = torch.relu(x.double() @ _sel(model.fc_in.weight, k_in).T + _sel(model.fc_in.bias, k_in))
    h = h * mul["in"]
    q = h @ _sel(a.q.weight, k_h, k_in).T + _sel(a.q.bias, k_h)
    t = h
    if a.sr is not None:
        b, n, c = h.shape
        t = h.transpose(1, 2).reshape(b, c, *FEAT)
        if a.pool is not None:
            t = a.pool(t)
        t = torch.nn.functional.conv2d(t, _sel(a.sr.weight, k_sr, k_in), _sel(a.sr.bias, k_sr),
                                       a.sr.stride)
        t = t.flatten(2).transpose(1, 2)
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        t = (t - mu) / torch.sqrt(var + a.norm.eps) * _sel(a.norm.weight, k_sr) \
            + _sel(a.norm.bias, k_sr)
        if a.act is not None:
            t = 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))
        t = t * mul["sr"]
    outs = []
    for j, head in enumerate((k_h[::hd] // hd).tolist()):
        rows = torch.arange(head * hd, (head + 1) * hd)
        kw = _sel(a.kv.weight, rows, k_sr if a.sr is not None else k_in)
        vw = _sel(a.kv.weight, rows + big_a, k_sr if a.sr is not None else k_in)
        k = t @ kw.T + _sel(a.kv.bias, rows)
        v = t @ vw.T + _sel(a.kv.bias, rows + big_a)
        qj = q[..., j * hd:(j + 1) * hd]
        outs.append(torch.softmax(qj @ k.transpose(-1, -2) / hd ** 0.5, -1) @ v)
    o = torch.cat(outs, -1) * mul["heads"]
    y = o @ _sel(a.proj.weight, k_out, k_h).T + _sel(a.proj.bias, k_out)
    y = torch.relu(y) * mul["out"]
    return y @ _sel(model.fc_out.weight, None, k_out).T + model.fc_out.bias.double()


GATES = {"in": "fc_in", "heads": "attn/heads", "sr": "attn/sr", "out": "attn"}
VARIANTS = [  # (sr_ratio, linear_attn, fused_attn)
    (2, False, True), (2, False, False), (1, False, True), (1, True, True), (1, True, False)]


def _pruned(sr_ratio, linear, fused, widths=None):
    torch.manual_seed(0)
    model = PvtNet(sr_ratio, linear, fused)
    dense = copy.deepcopy(model)
    pruner, msgs = prune(model, _input(), divisor=4)
    pruner.set_widths(widths or {"fc_in": 20, "attn.heads": 16, "attn.sr": 12, "attn": 24})
    return model, dense, pruner, msgs


@pytest.mark.parametrize(("sr_ratio", "linear", "fused"), VARIANTS)
def test_groups_are_input_heads_sr_and_output(sr_ratio, linear, fused):
    model, _, pruner, msgs = _pruned(sr_ratio, linear, fused)
    groups = {g.name: g for g in pruner.groups}
    has_sr = sr_ratio > 1 or linear
    assert set(groups) == {"fc_in", "attn.heads", "attn"} | ({"attn.sr"} if has_sr else set())
    assert groups["attn.heads"].channels == 32 and groups["attn.heads"].divisor == 8
    assert groups["fc_in"].consumers == ["attn"] and groups["attn"].consumers == ["fc_out"]
    if has_sr:
        assert groups["attn.sr"].channels == 32 and groups["attn.sr"].producers == ["attn"]
    assert not any("left unpruned" in m and "attn" in m for m in msgs)


@pytest.mark.parametrize(("sr_ratio", "linear", "fused"), VARIANTS)
def test_hard_path_matches_a_float64_reference(sr_ratio, linear, fused):
    """The hard network equals attention computed by hand on the kept heads and channels."""
    model, _, pruner, _ = _pruned(sr_ratio, linear, fused)
    x = _input()
    keep = {r: pruner.gates[n].keep_index() for r, n in GATES.items() if n in pruner.gates}
    assert [keep[r].numel() for r in ("in", "heads", "out")] == [20, 16, 24]
    model.eval()
    with torch.no_grad():
        got = pruner.hard_forward(x)
    ref = _reference(model, x, keep, dict.fromkeys(GATES, 1.0))
    assert torch.allclose(got.double(), ref, atol=1e-5)


@pytest.mark.parametrize(("sr_ratio", "linear", "fused"), VARIANTS)
def test_export_is_exact_and_counted_and_round_trips(sr_ratio, linear, fused):
    model, dense, pruner, _ = _pruned(sr_ratio, linear, fused)
    x = _input()
    exported = check_exact(pruner, model, x, dense, lambda: PvtNet(sr_ratio, linear, fused))
    a = exported.attn
    assert type(a).__name__ == "PrunedPvtAttention" and isinstance(a, PvtAttention)
    assert (a.num_heads, a.head_dim, a.scale) == (2, 8, 8 ** -0.5)
    assert a.q.weight.shape == (16, 20) and a.proj.weight.shape == (24, 16)
    if a.sr is not None:
        assert a.sr.weight.shape[:2] == (12, 20) and a.norm.normalized_shape == (12,)
        assert a.kv.weight.shape == (32, 12)
    else:
        assert a.kv.weight.shape == (32, 20)
    assert pruner.hard_flops_ratio() < 0.8


def test_export_is_timm_s_own_class_when_only_the_output_is_pruned():
    model, dense, pruner, _ = _pruned(2, False, True, {"attn": 16})
    exported = check_exact(pruner, model, _input(), dense, lambda: PvtNet(2, False, True))
    assert type(exported.attn) is PvtAttention and exported.attn.proj.out_features == 16


@pytest.mark.parametrize(("sr_ratio", "linear", "fused"), [(2, False, True), (1, True, False)])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_mask_gradients_match_float64_autograd(sr_ratio, linear, fused, mode):
    """The gradients each group's mask receives (soft masks in the soft network, the
    straight-through masks in the hard one) equal float64 autograd through the hand
    computation."""
    torch.manual_seed(0)
    model = PvtNet(sr_ratio, linear, fused)
    x = _input()
    pruner, _ = prune(model, x, divisor=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    model.eval()  # no dropout anyway; the same network in both computations
    target = torch.randn(2, 36, 5, generator=g)
    with pruner.mode(mode):
        states = {r: pruner.runtime.state(pruner.gates[n]) for r, n in GATES.items()}
        masks = {r: (st.soft_mask if mode == "soft" else st.hard_mask) for r, st in states.items()}
        loss = (model(x) - target).square().mean()
        got = torch.autograd.grad(loss, list(masks.values()))
    if mode == "soft":
        keep = {r: torch.arange(pruner.gates[n].channels) for r, n in GATES.items()}
    else:
        keep = {r: st.keep for r, st in states.items()}
        assert any(keep[r].numel() < pruner.gates[GATES[r]].channels for r in keep)
    leaf = {r: m.detach().double().requires_grad_() for r, m in masks.items()}
    ref_loss = (_reference(model, x, keep, leaf) - target.double()).square().mean()
    want = torch.autograd.grad(ref_loss, list(leaf.values()))
    for r, a, b in zip(leaf, got, want, strict=True):
        assert b.abs().max() > 0, r
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6 * float(b.abs().max())), r


def test_soft_path_at_full_width_equals_timm_s_layer():
    torch.manual_seed(0)
    model = PvtNet()
    dense = copy.deepcopy(model).eval()
    x = _input()
    pruner, _ = prune(model, x, divisor=4)
    pruner.set_widths({g.name: g.channels for g in pruner.groups})
    model.eval()
    with torch.no_grad():
        assert all(float(gate.soft_mask().min()) > 1 - 1e-6 for gate in pruner.gates.values())
        torch.testing.assert_close(pruner.soft_forward(x), dense(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pruner.hard_forward(x), dense(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- the real pvt_v2_b0


def test_pvt_v2_b0_is_pruned_exactly(tmp_path):
    """pvt_v2_b0 at 64x64: at least 95% of the FLOPs in prunable groups (heads, the sr
    channels, the MLP with its depthwise conv, the residual stream of every stage), the export
    equals the hard network, torch's counter on it equals hard_flops_ratio(), and it reloads
    by name."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", num_classes=10)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, (x,), 0.4)
    frozen = [str(w.message) for w in caught if "left unpruned" in str(w.message)]
    assert frozen == [], frozen
    prunable = sum(f for _, f, gates in pruner._flop_terms if gates)
    assert prunable / pruner.dense_flops >= 0.95
    assert pruner.dense_flops == counted(dense, x)
    groups = {g.name: g for g in pruner.groups}
    for s in range(4):  # the residual stream of each stage: one group with its norms
        stream = groups["patch_embed.proj" if s == 0 else f"stages.{s}.downsample.proj"]
        assert f"stages.{s}.norm" in stream.norms and f"stages.{s}.blocks.1.norm2" in stream.norms
        assert f"stages.{s}.blocks.0.attn" in stream.consumers
        fc1 = groups[f"stages.{s}.blocks.0.mlp.fc1"]
        assert fc1.depthwise == [f"stages.{s}.blocks.0.mlp.dwconv"]
        assert groups[f"stages.{s}.blocks.0.attn.heads"].divisor == 32
        assert (f"stages.{s}.blocks.0.attn.sr" in groups) == (s < 3)
    pruner.set_widths({name: max(g.channels // 2, pruner.gate_of(g).divisor)
                       for name, g in groups.items()})
    pruner.set_widths({"stages.3.blocks.1.attn.heads": 96, "stages.2.blocks.0.attn.heads": 64,
                       "stages.2.blocks.0.attn.sr": 72})
    exported = check_exact(pruner, model, x, dense)
    b = exported.stages[2].blocks[0]
    assert (b.attn.num_heads, b.attn.head_dim) == (2, 32)  # 5 heads of 32 -> 2
    assert b.attn.sr.out_channels == 72 and b.attn.norm.normalized_shape == (72,)
    assert b.attn.q.in_features == 80 and b.mlp.dwconv.in_channels == b.mlp.fc1.out_features
    assert b.mlp.dwconv.groups == b.mlp.fc1.out_features == 320
    assert exported.stages[3].blocks[1].attn.num_heads == 3
    assert pruner.hard_flops_ratio() < 0.4
