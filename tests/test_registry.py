"""The layer handler registry: a layer kind registered from outside s2h is pruned like a built-in
one (checked against the plain model and torch's FLOP counter), and is opaque without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2h import S2HPruner, registry
from s2h.flops import count_flops
from s2h.nn import MaskedLayer
from s2h.registry import LayerHandler, LayerInfo


class Affine(nn.Module):
    """A user's own fully connected layer (not an nn.Linear): ``y = x W^T + b``, 2-D input."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin ** 0.5)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.t())


class MaskedAffine(MaskedLayer, Affine):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        if mode == "dense":
            return Affine.forward(self, x)
        rt, in_gate, out_gate = self._s2h.runtime, self.in_gate, self.out_gate
        if mode == "soft":
            if in_gate is not None:
                x = x * rt.state(in_gate).soft_mask.to(x.dtype)
            return Affine.forward(self, x)
        in_keep = out_keep = None
        if in_gate is not None:
            st = rt.state(in_gate)
            x, in_keep = x * st.hard_mask.to(x.dtype), st.keep
        if out_gate is not None:
            out_keep = rt.state(out_gate).keep
        w, b = self.kept_weight_bias(in_keep, out_keep)
        return torch.addmm(b, x, w.t())

    @torch.no_grad()
    def s2h_export(self, in_keep, out_keep, extra) -> Affine:
        w, b = self.kept_weight_bias(in_keep, out_keep)
        new = Affine(w.shape[1], w.shape[0])
        new.weight.copy_(w)
        new.bias.copy_(b)
        return new


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Affine(16, 64), nn.ReLU(), Affine(64, 48), nn.GELU(), Affine(48, 10))


@pytest.fixture
def affine_registered(monkeypatch):
    handler = LayerHandler(Affine, MaskedAffine, lambda m: LayerInfo("linear", -1))
    monkeypatch.setitem(registry._HANDLERS, Affine, handler)
    monkeypatch.setitem(registry._BY_MASKED, MaskedAffine, handler)
    return handler


def test_a_registered_layer_kind_is_pruned_exported_and_counted(affine_registered):
    model = _model()
    x = torch.randn(4, 16)
    dense_out = model(x).detach()
    dense_flops = count_flops(model, x[:2])
    pruner = S2HPruner(model, (x[:2],), 0.5, divisor=8)
    assert sorted(pruner.group_channels().values()) == [48, 64]
    assert pruner.dense_flops == dense_flops
    torch.testing.assert_close(pruner.model(x), dense_out)  # dense mode: the model unchanged
    pruner.set_widths({"0": 24, "2": 16})
    exported = pruner.export()
    assert [type(m) for m in exported] == [type(m) for m in _model()]
    assert exported[0].weight.shape == (24, 16) and exported[2].weight.shape == (16, 24)
    torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=0, atol=1e-6)
    # the hard network by hand: the kept rows / columns of the plain weights
    keep0 = pruner.gate_of(pruner.groups[0]).keep_index()
    keep1 = pruner.gate_of(pruner.groups[1]).keep_index()
    ref = _model()
    h = F.relu(x @ ref[0].weight[keep0].t() + ref[0].bias[keep0])
    h = F.gelu(h @ ref[2].weight[keep1][:, keep0].t() + ref[2].bias[keep1])
    h = h @ ref[4].weight[:, keep1].t() + ref[4].bias
    torch.testing.assert_close(exported(x), h, rtol=1e-5, atol=1e-6)
    # FLOPs: the pruner's ratio is what torch's counter says of the export
    assert pruner.hard_flops_ratio() == pytest.approx(count_flops(exported, x[:2]) / dense_flops,
                                                      rel=1e-9)


def test_an_unregistered_layer_kind_is_traced_and_left_whole():
    model = _model()
    with pytest.raises(ValueError, match="nothing prunable"):
        S2HPruner(model, (torch.randn(2, 16),), 0.5, warn=False)


def test_subclasses_of_torch_layers_are_opaque_and_kept_whole():
    class MyConv(nn.Conv2d):  # its forward could do anything with the channels
        def forward(self, x):
            return super().forward(x).flip(1)

    info = registry.layer_info(MyConv(4, 8, 3))
    assert info.kind == "fixed" and "subclass of nn.Conv2d" in info.reason
    assert registry.layer_info(nn.Conv2d(4, 8, 3, groups=2)).kind == "fixed"
    assert registry.layer_info(nn.Conv2d(4, 4, 3, groups=4)).kind == "depthwise"
    assert registry.layer_info(nn.ReLU()) is None
