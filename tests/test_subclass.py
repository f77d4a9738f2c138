"""Subclasses of known layers that only re-lay out (issue 18, item 5): torchvision's ConvNeXt
``LayerNorm2d`` (an ``nn.LayerNorm`` subclass normalising dim 1 of NCHW by permuting) and its
``Permute`` module. References: the exported model against the hard network (1e-5, fp32),
``torch.utils.flop_counter`` on the export against ``pruner.hard_flops_ratio()`` (1%), a layer
norm over the kept channels computed by hand in float64, a save / load round trip."""

import copy

import pytest
import torch
from _exact import check_exact, prune
from torch import nn

tv = pytest.importorskip("torchvision")
from torchvision.models.convnext import LayerNorm2d  # noqa: E402
from torchvision.ops.misc import Permute  # noqa: E402


class Net(nn.Module):
    """conv -> LayerNorm2d -> conv -> Permute to NHWC -> LayerNorm -> Linear -> Permute back ->
    conv -> pool -> fc (ConvNeXt's layout changes in small)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.n1 = LayerNorm2d(16)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.to_nhwc = Permute([0, 2, 3, 1])
        self.n2 = nn.LayerNorm(24)
        self.lin = nn.Linear(24, 20)
        self.to_nchw = Permute([0, 3, 1, 2])
        self.c3 = nn.Conv2d(20, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.c2(torch.relu(self.n1(self.c1(x))))
        x = self.to_nchw(torch.relu(self.lin(self.n2(self.to_nhwc(x)))))
        return self.fc(self.c3(x).mean((2, 3)))


def test_layernorm2d_and_permute_are_pruned_exactly():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.n1.weight.normal_()
        model.n1.bias.normal_()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    pruner, msgs = prune(model, x, divisor=4)
    assert not any("left unpruned" in m for m in msgs), msgs
    groups = {g.name: g for g in pruner.groups}
    assert set(groups) == {"c1", "c2", "lin", "c3"}
    assert groups["c1"].norms == ["n1"] and groups["c2"].norms == ["n2"]
    pruner.set_widths({"c1": 8, "c2": 12, "lin": 8, "c3": 4})
    exported = check_exact(pruner, model, x, dense, model_fn=Net)
    assert pruner.hard_flops_ratio() < 0.9
    assert type(exported.n1) is LayerNorm2d and exported.n1.normalized_shape == (8,)
    # the hard LayerNorm2d normalises over the kept channels only (float64, by hand)
    keep = pruner.gate_of(groups["c1"]).keep_index()
    h = dense.c1.double()(x.double())[:, keep]
    mu, var = h.mean(1, keepdim=True), h.var(1, keepdim=True, unbiased=False)
    ref = (h - mu) / torch.sqrt(var + dense.n1.eps)
    ref = ref * dense.n1.weight.double()[keep, None, None] + dense.n1.bias.double()[keep, None,
                                                                                     None]
    with torch.no_grad():
        got = exported.n1(exported.c1(x))
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_convnext_tiny_layernorm2d_groups_are_pruned():
    torch.manual_seed(0)
    model = tv.models.convnext_tiny(weights=None, num_classes=10)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pruner, msgs = prune(model, x, divisor=8)
    assert not any("LayerNorm2d" in m for m in msgs), msgs
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == (22, 23)  # all but the classifier's output
    prunable = sum(f for _, f, gates in pruner._flop_terms if gates)
    assert prunable / pruner.dense_flops > 0.999
    stem = next(g for g in pruner.groups if "features.0.0" in g.producers)
    assert "features.0.1" in stem.norms and stem.channels == 96
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    exported = check_exact(pruner, model, x, dense)
    assert pruner.hard_flops_ratio() < 0.9
    kept = pruner.gate_of(stem).keep_index().numel()
    assert kept < 96 and exported.features[0][1].normalized_shape == (kept,)
