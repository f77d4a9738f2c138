"""torchvision MaxViT: its ``RelativePositionalMultiHeadAttention`` pruned by whole heads, with
its input (the residual stream) and output channels.

References: the attention computed by hand in float64 from the original weights of the kept
heads and channels (hard path, export), the same with the gates' soft masks and autograd to the
gate logits (soft path), torchvision's own forward at full width, the dense model with the
dropped heads' ``merge`` columns zeroed, torch's FLOP counter on the export, and a save / load
round trip (a reduced MaxVit rebuilt by ``model_fn``, ``maxvit_t`` by its torchvision name).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _exact import check_exact, full_width_matches_dense, prune
from torch import nn

tv = pytest.importorskip("torchvision")
from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention  # noqa: E402

from s2h.torchvision_support import PrunedRelativePositionalMultiHeadAttention  # noqa: E402


def _small_maxvit() -> nn.Module:
    torch.manual_seed(0)
    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[32, 64],
                  block_layers=[1, 2], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


class AttnNet(nn.Module):
    """Linear -> MaxViT attention (4 heads of 8 over 16 tokens per window) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(12, 32)
        self.attn = RelativePositionalMultiHeadAttention(32, 8, 16)
        self.fc_out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.attn(self.fc_in(x)))


def _by_hand(net: AttnNet, x, k_in, k_heads, k_out, m_in, m_heads, m_out):
    """float64 attention from ``net``'s original weights: the input columns ``k_in`` (scaled by
    ``m_in``), the heads whose channels are ``k_heads`` (their outputs scaled by ``m_heads``),
    the output rows ``k_out`` (scaled by ``m_out``, before ``fc_out``). Keys are scaled by the
    dense layer's ``32 ** -0.5``; the bias of head ``h`` is ``table[index, h]``."""
    a = net.attn
    hd, c = 8, 32
    h_in = F.linear(x.double(), net.fc_in.weight.double(), net.fc_in.bias.double())
    h_in = h_in[..., k_in] * m_in
    w, b = a.to_qkv.weight.double(), a.to_qkv.bias.double()
    outs = []
    for head in sorted({int(i) // hd for i in k_heads}):
        rows = torch.arange(head * hd, head * hd + hd)
        q, k, v = (h_in @ w[rows + j * c][:, k_in].T + b[rows + j * c] for j in range(3))
        bias = a.relative_position_bias_table.double()[a.relative_position_index, head]
        s = (q @ k.transpose(-1, -2)) * c ** -0.5 + bias
        outs.append(s.softmax(-1) @ v)
    o = torch.cat(outs, -1) * m_heads
    y = o @ a.merge.weight.double()[k_out][:, k_heads].T + a.merge.bias.double()[k_out]
    y = y * m_out
    return F.linear(y, net.fc_out.weight.double()[:, k_out], net.fc_out.bias.double())


def _attn_setup():
    torch.manual_seed(0)
    net = AttnNet()
    with torch.no_grad():
        net.attn.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(2, 3, 16, 12)  # (B, G windows, P tokens, features)
    pruner, _ = prune(net, x, divisor=4)
    return net, x, pruner


def test_groups_of_the_attention():
    net, x, pruner = _attn_setup()
    groups = {g.name: g for g in pruner.groups}
    assert set(groups) == {"fc_in", "attn.heads", "attn"}
    assert groups["attn.heads"].divisor == 8 and groups["attn.heads"].channels == 32
    assert groups["fc_in"].consumers == ["attn"] and groups["attn"].consumers == ["fc_out"]


def test_hard_path_and_export_match_a_float64_reference():
    net, x, pruner = _attn_setup()
    dense = copy.deepcopy(net)
    pruner.set_widths({"fc_in": 20, "attn.heads": 16, "attn": 24})
    keep = {k: pruner.gates[k].keep_index() for k in ("fc_in", "attn/heads", "attn")}
    assert keep["attn/heads"].numel() == 16
    ref = _by_hand(dense, x, keep["fc_in"], keep["attn/heads"], keep["attn"], 1.0, 1.0, 1.0)
    net.eval()
    with pruner.mode("hard"), torch.no_grad():
        hard = net(x)
    assert torch.allclose(hard.double(), ref, atol=1e-5)
    exported = check_exact(pruner, net, x, dense, model_fn=AttnNet, name="maxvit_attn")
    a = exported.attn
    assert type(a) is PrunedRelativePositionalMultiHeadAttention
    assert (a.n_heads, a.head_dim, a.to_qkv.in_features, a.merge.out_features) == (2, 8, 20, 24)
    assert a.scale_factor == 32 ** -0.5
    with torch.no_grad():
        assert torch.allclose(exported(x).double(), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gate_gradients_match_autograd_in_float64(mode):
    """The gate logits' gradients through the soft path (soft masks on every channel) and the
    hard path (kept channels times the straight-through hard masks) equal autograd through the
    float64 reference built from the gates' own masks."""
    net, x, pruner = _attn_setup()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    gates = {k: pruner.gates[k] for k in ("fc_in", "attn/heads", "attn")}
    net.eval()
    with pruner.mode(mode):
        out = net(x)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    got = {k: v.logits.grad.clone() for k, v in gates.items()}
    for v in gates.values():
        v.logits.grad = None
    keeps, masks = [], []
    for v in gates.values():
        soft = v.soft_mask().double()
        if mode == "soft":
            keeps.append(torch.arange(soft.numel()))
            masks.append(soft)
        else:
            k = v.keep_index()
            keeps.append(k)
            masks.append(soft[k] + (1 - soft[k]).detach())
    if mode == "hard":
        assert any(k.numel() < v.channels for k, v in zip(keeps, gates.values(), strict=True))
    ref = _by_hand(net, x, *keeps, *masks)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    (ref * weights.double()).sum().backward()
    for k, v in gates.items():
        assert float(got[k].abs().max()) > 0, k
        assert torch.allclose(got[k].double(), v.logits.grad.double(), atol=1e-5, rtol=1e-4), k


def test_reduced_maxvit_prunes_heads_and_the_residual_stream_exactly():
    """Every group of a reduced MaxVit is prunable (the model output aside): full width equals
    torchvision's forward; heads only pruned equals the dense model with the dropped heads'
    ``merge`` columns zeroed; random widths of every group export exactly."""
    model = _small_maxvit()
    dense = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner, _ = prune(model, x, divisor=4)
    frozen = [g.name for g in pruner.analysis.groups if not g.prunable]
    assert frozen == ["classifier.5"]
    names = {g.name for g in pruner.groups}
    stream = "blocks.1.layers.0.layers.MBconv.proj.1"  # block 1's residual stream (64)
    assert stream in names and "blocks.1.layers.1.layers.grid_attention.attn_layer.1.heads" in names
    model.eval()
    full_width_matches_dense(pruner, model, dense, x)
    heads = {"blocks.0.layers.0.layers.window_attention.attn_layer.1.heads": 16,
             "blocks.1.layers.1.layers.grid_attention.attn_layer.1.heads": 24}
    pruner.set_widths(heads)
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for name, width in heads.items():
            attn = zeroed.get_submodule(name.rpartition(".")[0])
            dropped = torch.ones(attn.merge.in_features, dtype=torch.bool)
            dropped[pruner.gates[name.replace(".", "/")].keep_index()] = False
            assert int((~dropped).sum()) == width
            attn.merge.weight[:, dropped] = 0
        with pruner.mode("hard"):
            assert torch.allclose(model(x), zeroed(x), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    assert pruner.gates[stream.replace(".", "/")].keep_index().numel() < 64
    exported = check_exact(pruner, model, x, dense, model_fn=_small_maxvit, name="small_maxvit")
    swapped = {n: m for n, m in exported.named_modules()
               if type(m) is PrunedRelativePositionalMultiHeadAttention}
    assert swapped
    for n, m in swapped.items():  # keys scaled as the dense layer scaled them
        assert m.scale_factor == dense.get_submodule(n).scale_factor


@pytest.mark.slow
def test_maxvit_t():
    """torchvision ``maxvit_t`` at 224x224: every group but the classifier's output prunable,
    export exact, reloaded by its torchvision name."""
    torch.manual_seed(0)
    model = tv.models.maxvit_t()
    dense = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 224, 224)
    pruner, _ = prune(model, x, divisor=8)
    assert [g.name for g in pruner.analysis.groups if not g.prunable] == ["classifier.5"]
    assert pruner.builder["kind"] == "torchvision" and pruner.builder["name"] == "maxvit_t"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    assert math.isfinite(pruner.hard_flops_ratio()) and pruner.hard_flops_ratio() < 0.9
    check_exact(pruner, model, x, dense)
