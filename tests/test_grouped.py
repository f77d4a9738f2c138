"""Grouped convs (issue 18, item 3): a grouped conv with as many output as input channels
(ResNeXt's, RegNet's 3x3) passes its group through and is pruned in whole conv groups: its
producer (the block's first 1x1) and its consumer (the last 1x1) drop the same conv groups, and
the exported conv has ``groups`` = the kept conv groups.

References, independent of the code under test: the kept channels are checked to be whole,
aligned conv groups by hand; the exported grouped conv's weight is the dense one's rows of those
channels; the exported model equals the dense model in float64 with every removed input column
of each (non-grouped) consumer zeroed (removing channels and zeroing what reads them compute the
same); FLOPs by torch's counter on the export; the soft path's gate gradients against autograd
through the dense float64 model with each layer's input multiplied by its gate's soft mask.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Block(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 (in = out = width) -> 1x1, residual; ``se``: a
    RegNet-Y squeeze-excitation on the grouped conv's output."""

    def __init__(self, cin: int, cout: int, width: int, groups: int, stride: int = 1,
                 se: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=True)
        self.bn2 = _bn(width)
        self.se = se
        if se:
            self.se1, self.se2 = nn.Conv2d(width, 4, 1), nn.Conv2d(4, width, 1)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), _bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        if self.se:
            s = torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
            y = y * s
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNeXt(nn.Module):
    #: grouped conv -> channels per conv group
    GROUPED = {"b1.conv2": 4, "b2.conv2": 8, "b3.conv2": 8}

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), _bn(16)
        self.b1 = Block(16, 16, 16, groups=4)                     # 4 conv groups of 4
        self.b2 = Block(16, 32, 24, groups=3, stride=2, se=True)  # 3 conv groups of 8
        self.b3 = Block(32, 32, 32, groups=4, se=True)            # 4 conv groups of 8
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(x.mean((2, 3)))


def _setup(divisor: int = 4):
    torch.manual_seed(0)
    model = TinyResNeXt().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    pruner = s2h.S2HPruner(model, x, 0.5, divisor=divisor)
    return pruner, dense, x


def _group_of(pruner, layer: str):
    idx = pruner.analysis.layer_in_group[layer]
    return pruner.analysis.groups[idx]


def _uneven(pruner, step: int = 0) -> dict[str, int]:
    out = {}
    for i, g in enumerate(pruner.groups):
        d = pruner.gate_of(g).divisor
        out[g.name] = max(d, g.channels - d * ((i + step) % 3 + 1))
    return out


def _zeroed(pruner, dense: nn.Module) -> nn.Module:
    """Dense float64 copy with each non-grouped consumer's removed input columns zeroed."""
    z = copy.deepcopy(dense).double().eval()
    with torch.no_grad():
        for g in pruner.groups:
            keep = set(pruner.gate_of(g).keep_index().tolist())
            drop = [c for c in range(g.channels) if c not in keep]
            for name in g.consumers:
                m = z.get_submodule(name)
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    continue  # passes the group through: its dropped outputs are dropped too
                m.weight[:, drop] = 0
    return z


def test_grouped_conv_joins_its_producer_and_is_cut_in_whole_conv_groups():
    pruner, _, _ = _setup()
    for name, c in TinyResNeXt.GROUPED.items():
        g = _group_of(pruner, name)
        assert g in pruner.groups, (name, g.reasons)  # prunable (kept whole before)
        block = name.split(".")[0]
        # the grouped conv's input group is its own output group: conv1's, read by conv3
        assert f"{block}.conv1" in g.producers and f"{block}.conv3" in g.consumers
        assert pruner.analysis.layer_out_group[name] == pruner.analysis.layer_in_group[name]
        assert g.block == c and pruner.gate_of(g).divisor % c == 0
    # the divisor: the fewest whole conv groups reaching divisor=4 (b1: 1 group of 4) or the
    # conv group when wider (b2, b3: 8)
    assert [pruner.gate_of(_group_of(pruner, n)).divisor for n in TinyResNeXt.GROUPED] == [4, 8, 8]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_export_equals_hard_network_and_dense_with_dropped_columns_zeroed(step):
    pruner, dense, x = _setup()
    pruner.set_widths(_uneven(pruner, step))
    pruner.model.eval()
    narrowed = 0
    for name, c in TinyResNeXt.GROUPED.items():
        keep = pruner.gate_of(_group_of(pruner, name)).keep_index()
        blocks = keep.view(-1, c)  # whole conv groups, aligned, ascending
        assert torch.equal(blocks, blocks[:, :1] + torch.arange(c)) and bool(
            (blocks[:, 0] % c == 0).all())
        narrowed += keep.numel() < dense.get_submodule(name).in_channels
    assert narrowed >= 2
    with torch.no_grad():
        hard = pruner.hard_forward(x)
    exported = pruner.export()
    for name, c in TinyResNeXt.GROUPED.items():
        keep = pruner.gate_of(_group_of(pruner, name)).keep_index()
        conv, ref = exported.get_submodule(name), dense.get_submodule(name)
        assert conv.groups == keep.numel() // c
        assert conv.in_channels == conv.out_channels == keep.numel()
        assert torch.equal(conv.weight, ref.weight[keep]) and torch.equal(conv.bias, ref.bias[keep])
    with torch.no_grad():
        out = exported(x)
        ref = _zeroed(pruner, dense)(x.double())
    torch.testing.assert_close(out, hard, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x)
    with FlopCounterMode(display=False) as fd, torch.no_grad():
        dense(x)
    assert pruner.hard_flops_ratio() == pytest.approx(
        fc.get_total_flops() / fd.get_total_flops(), rel=0.01)
    assert pruner.hard_flops_ratio() < 0.9


def test_soft_path_gradients_reach_the_gates():
    pruner, dense, x = _setup()
    with torch.no_grad():  # gates in the middle: every soft mask below 1 somewhere
        for gate in pruner.gates.values():
            gate.logits.copy_(torch.linspace(-0.5, 0.5, gate.logits.numel()))
    pruner.model.train()
    dense.train()
    out = pruner.soft_forward(x)
    out.square().sum().backward()
    got = {k: g.logits.grad.clone() for k, g in pruner.gates.items()}
    # reference: the dense model (float64) with each masked layer's input times its gate's mask
    for g in pruner.gates.values():
        g.logits.grad = None
    ref_model = copy.deepcopy(dense).double().train()
    hooks = []
    for name, m in pruner.masked_layers.items():
        gate = m.in_gate  # the soft network masks the inputs of convs and linears (METHOD §3)
        if gate is None or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue

        def pre(mod, args, gate=gate):
            mask = gate.soft_mask().double()
            return (args[0] * (mask.view(1, -1, 1, 1) if args[0].dim() == 4 else mask),)

        hooks.append(ref_model.get_submodule(name).register_forward_pre_hook(pre))
    ref_model(x.double()).square().sum().backward()
    for h in hooks:
        h.remove()
    for name in TinyResNeXt.GROUPED:
        k = pruner._key(_group_of(pruner, name).name)
        assert got[k].abs().sum() > 0
        # every channel of a conv group has the same soft mask (they are kept together)
        c = TinyResNeXt.GROUPED[name]
        sm = pruner.gates[k].soft_mask().view(-1, c)
        assert torch.equal(sm, sm[:, :1].expand_as(sm))
    for k, g in pruner.gates.items():
        torch.testing.assert_close(got[k].double(), g.logits.grad.double(), rtol=1e-3, atol=1e-6)


def test_budget_projection_and_narrowing_check_step_whole_conv_groups():
    pruner, dense, x = _setup()
    res = pruner.project_to_budget(0.4)
    assert res["ratio_after"] <= 0.4 + 1e-9
    for name, c in TinyResNeXt.GROUPED.items():
        g = _group_of(pruner, name)
        assert pruner.gate_of(g).hard_width() % c == 0
    pruner.model.eval()
    exported = pruner.export()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=1e-5, atol=1e-5)


class ReadsGroupedWidth(nn.Module):
    """A reshape to a constant width on the grouped conv's output: found when the pruner is
    built (one whole conv group narrower fails), kept whole, never a crash in training."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.g(torch.relu(self.a(x))))
        n, _, h, w = y.shape
        y = y.reshape(n, 16, h * w).reshape(n, 16, h, w)
        z = torch.relu(self.c(torch.cat([y, torch.relu(self.b(x))], 1)))
        return self.head(z.mean((2, 3)))


def test_width_read_on_grouped_output_is_kept_whole_at_construction():
    torch.manual_seed(0)
    model = ReadsGroupedWidth()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=4)
    msgs = [str(w.message) for w in caught]
    assert any("group 'a'" in m and "fails when it is narrower" in m for m in msgs), msgs
    assert "a" not in pruner.widths() and "b" in pruner.widths()
    opt = torch.optim.SGD(list(pruner.weight_parameters()) + list(pruner.gate_parameters()), 0.1)
    pruner.set_widths({"b": 4, "c": 4})
    pruner.train_step(x, torch.tensor([0, 1]), opt)
    model.eval()
    exported = pruner.export()
    assert exported.g.groups == 4 and exported.g.in_channels == 16
    torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=1e-5, atol=1e-5)


def test_grouped_conv_with_other_output_width_is_kept_whole():
    class Multiplier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # 2 in, 4 out per conv group
            self.c = nn.Conv2d(16, 8, 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.relu(self.g(torch.relu(self.a(x))))
            return self.head(torch.relu(self.c(y)).mean((2, 3)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(Multiplier(), torch.randn(2, 3, 6, 6), 0.5, divisor=4)
    assert set(pruner.widths()) == {"c"}
    assert any("groups=4" in str(w.message) for w in caught)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf"])
def test_torchvision_grouped_models_prune_every_grouped_conv_exactly(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = s2h.S2HPruner(model, x, 0.4)
    grouped = [n for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped
    for n in grouped:  # every grouped conv's group is pruned, in whole conv groups
        g = _group_of(pruner, n)
        conv = model.get_submodule(n)
        assert g in pruner.groups and g.block % (conv.in_channels // conv.groups) == 0
    # everything but the classifier's output group
    frozen = [g for g in pruner.analysis.groups if g.producers and g not in pruner.groups]
    assert [g.producers for g in frozen] == [["fc"]]
    pruner.set_widths(0.5)
    model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
    exported = pruner.export()
    smaller = 0
    for n in grouped:
        conv, ref = exported.get_submodule(n), model.get_submodule(n)
        assert conv.in_channels // conv.groups == ref.in_channels // ref.groups
        smaller += conv.groups < ref.groups
    assert smaller > len(grouped) // 2
    with torch.no_grad():
        out = exported(x)
    torch.testing.assert_close(out, hard, rtol=1e-5, atol=1e-5 * float(hard.abs().max()))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x)
    assert pruner.hard_flops_ratio() == pytest.approx(
        fc.get_total_flops() / pruner.dense_flops, rel=0.01)


def test_lockstep_runs_grouped_convs_like_two_passes():
    from s2h import dual

    pruner, _, x = _setup()
    assert dual.validate(pruner) is None  # forward and backward against two passes
    pruner.set_widths(_uneven(pruner))
    pruner.model.eval()
    pruner.runtime.prepare(pruner.gates.values(), pruner.device())
    with torch.no_grad():
        soft, hard = dual.dual_forward(pruner.model, pruner.masked_layers.values(), (x,))
        torch.testing.assert_close(soft, pruner.soft_forward(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hard, pruner.hard_forward(x), rtol=1e-5, atol=1e-6)


def test_grouped_conv_reading_a_concat_keeps_the_segments_whole():
    """Its conv groups would not start at each segment's channel 0: the segments are kept
    whole (with the reason), the rest is pruned, and the export is exact."""

    class CatGrouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
            self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.c = nn.Conv2d(16, 8, 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.relu(self.g(torch.relu(torch.cat([self.a(x), self.b(x)], 1))))
            return self.head(self.c(y).mean((2, 3)))

    torch.manual_seed(0)
    model, x = CatGrouped(), torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=2)
    msgs = [str(w.message) for w in caught]
    assert sum("grouped conv g reads these channels through a concat" in m for m in msgs) == 2
    assert set(pruner.widths()) == {"c"}
    pruner.set_widths({"c": 2})
    model.eval()
    exported = pruner.export()
    assert exported.g.groups == 4 and exported.c.out_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=1e-5, atol=1e-6)
