"""A flatten of ``C x h x w`` into a classifier (VGG): each kept channel keeps its ``h x w``
columns of the linear layer, so the last conv's group is pruned (issue 18, item 4).

References: a plain model built by hand from the kept channels' weights, and the dense model in
which every removed channel's weights in its consumers are zeroed (removing a channel and
zeroing what reads it compute the same), in float64; FLOPs by torch's counter.
"""

import copy
import warnings

import pytest
import torch
from _exact import lockstep_pair
from torch import nn

import s2h
from s2h.flops import count_flops

HW = 4  # the feature map before the flatten is HW x HW


def _flat_fn(kind: str):
    return {
        "method": lambda x: x.flatten(1),
        "torch": lambda x: torch.flatten(x, 1),
        "view_size": lambda x: x.view(x.size(0), -1),
        "reshape_shape": lambda x: x.reshape(x.shape[0], -1),
        "module": nn.Flatten(),
        # channels-last flatten: the channel dim innermost (columns h, w, c)
        "channels_last": lambda x: x.permute(0, 2, 3, 1).flatten(1),
        # a width written as a number: would not follow a pruned width
        "constant": lambda x: x.view(-1, 16 * HW * HW),
    }[kind]


class VGGish(nn.Module):
    """conv-bn-relu x 2, maxpool, flatten, Linear, ReLU, Linear."""

    def __init__(self, kind: str = "method") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.flat = _flat_fn(kind)
        self.fc1 = nn.Linear(16 * HW * HW, 24)
        self.fc2 = nn.Linear(24, 5)
        with torch.no_grad():  # running statistics that matter
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.pool(torch.relu(self.bn2(self.conv2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.flat(self.features(x)))))


def _setup(kind: str = "method", divisor: int = 2):
    torch.manual_seed(0)
    model = VGGish(kind).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 2 * HW, 2 * HW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=divisor)
    return pruner, dense, x, [str(w.message) for w in caught]


def _hard(pruner, x):
    pruner.model.eval()
    with torch.no_grad(), pruner.mode("hard"):
        return pruner.model(x)


def _keep(pruner, group: str) -> list[int]:
    gate = next(pruner.gate_of(g) for g in pruner.groups if g.name == group)
    return [int(i) for i in gate.keep_index()]


def _columns(channels: list[int], repeat: int) -> list[int]:
    """The fc1 columns of the kept channels in NCHW flatten order, by hand."""
    return [c * repeat + j for c in channels for j in range(repeat)]


def _by_hand(dense: VGGish, k1: list[int], k2: list[int], k3: list[int]) -> nn.Module:
    """The plain smaller model, from the dense weights of the kept channels (float64)."""
    d = copy.deepcopy(dense).double()
    small = VGGish().double().eval()
    small.conv1 = nn.Conv2d(3, len(k1), 3, padding=1).double()
    small.bn1 = nn.BatchNorm2d(len(k1)).double().eval()
    small.conv2 = nn.Conv2d(len(k1), len(k2), 3, padding=1).double()
    small.bn2 = nn.BatchNorm2d(len(k2)).double().eval()
    small.fc1 = nn.Linear(len(k2) * HW * HW, len(k3)).double()
    small.fc2 = nn.Linear(len(k3), 5).double()
    cols = _columns(k2, HW * HW)
    with torch.no_grad():
        small.conv1.weight.copy_(d.conv1.weight[k1])
        small.conv1.bias.copy_(d.conv1.bias[k1])
        small.conv2.weight.copy_(d.conv2.weight[k2][:, k1])
        small.conv2.bias.copy_(d.conv2.bias[k2])
        for sb, db, k in ((small.bn1, d.bn1, k1), (small.bn2, d.bn2, k2)):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(sb, attr).copy_(getattr(db, attr)[k])
        small.fc1.weight.copy_(d.fc1.weight[k3][:, cols])
        small.fc1.bias.copy_(d.fc1.bias[k3])
        small.fc2.weight.copy_(d.fc2.weight[:, k3])
        small.fc2.bias.copy_(d.fc2.bias)
    return small


def _zeroed(dense: VGGish, k1: list[int], k2: list[int], k3: list[int]) -> nn.Module:
    """The dense model with every removed channel's weights in its consumers zeroed (float64):
    the removed channels of conv2 are zeroed in fc1 through the (out, C, h, w) view of its
    weight, so the column layout is torch's own, not the code's under test."""
    z = copy.deepcopy(dense).double().eval()
    with torch.no_grad():
        drop1 = [c for c in range(8) if c not in k1]
        drop2 = [c for c in range(16) if c not in k2]
        drop3 = [c for c in range(24) if c not in k3]
        z.conv2.weight[:, drop1] = 0
        z.fc1.weight.view(24, 16, HW, HW)[:, drop2] = 0
        z.fc2.weight[:, drop3] = 0
    return z


WIDTHS = [{"conv1": 8, "conv2": 16, "fc1": 24}, {"conv1": 4, "conv2": 6, "fc1": 10},
          {"conv1": 2, "conv2": 2, "fc1": 2}, {"conv1": 6, "conv2": 10, "fc1": 24}]


@pytest.mark.parametrize("kind", ["method", "torch", "view_size", "reshape_shape", "module"])
def test_flatten_into_a_classifier_prunes_the_last_conv(kind):
    pruner, dense, x, msgs = _setup(kind)
    groups = {g.name: g for g in pruner.analysis.groups}
    assert groups["conv2"].prunable, groups["conv2"].reasons
    assert set(pruner.widths()) == {"conv1", "conv2", "fc1"}
    assert pruner.analysis.layer_in_repeat == {"fc1": HW * HW}
    assert not [m for m in msgs if "conv2" in m]
    dense_flops = count_flops(dense, x)
    for widths in WIDTHS:
        pruner.set_widths(widths)
        k1, k2, k3 = _keep(pruner, "conv1"), _keep(pruner, "conv2"), _keep(pruner, "fc1")
        assert (len(k1), len(k2), len(k3)) == tuple(widths.values())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an export mismatch warning fails the test
            exported = pruner.export()
        assert exported.fc1.in_features == len(k2) * HW * HW
        hard = _hard(pruner, x)
        out = exported(x)
        assert (out - hard).abs().max() <= 1e-5
        want = _by_hand(dense, k1, k2, k3)(x.double())
        assert torch.allclose(out.double(), want, atol=1e-5, rtol=0)
        assert torch.allclose(_zeroed(dense, k1, k2, k3)(x.double()), want, atol=1e-10, rtol=0)
        ratio = count_flops(exported, x) / dense_flops
        assert pruner.hard_flops_ratio() == pytest.approx(ratio, rel=1e-9, abs=0)


def test_soft_mask_repeats_each_channel_over_its_columns():
    """Soft mode: fc1 sees the feature map times the group's soft mask per channel (float64
    reference: the mask applied before the flatten, in the (N, C, h, w) layout)."""
    pruner, dense, x, _ = _setup()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pruner.model.eval()
    with torch.no_grad(), pruner.mode("soft"):
        soft = pruner.model(x)
        masks = {k: pruner.runtime.state(gate).soft_mask.double()
                 for k, gate in pruner.gates.items()}
    d = copy.deepcopy(dense).double().eval()
    xd = x.double()
    h = torch.relu(d.bn1(d.conv1(xd))) * masks["conv1"].view(1, -1, 1, 1)
    h = d.pool(torch.relu(d.bn2(d.conv2(h)))) * masks["conv2"].view(1, -1, 1, 1)
    h = torch.relu(d.fc1(h.flatten(1))) * masks["fc1"]
    assert torch.allclose(soft.double(), d.fc2(h), atol=1e-5, rtol=0)


def test_gate_gradient_reaches_the_flattened_group():
    """The hard network's straight-through mask of conv2's group reaches its gate through the
    repeated columns: the gradient equals the sum over each channel's h*w columns of
    d loss / d (column mask), computed with autograd on a plain float64 copy."""
    pruner, dense, x, _ = _setup()
    pruner.set_widths({"conv1": 4, "conv2": 6, "fc1": 10})
    pruner.model.eval()
    with pruner.mode("hard"):
        state = pruner.runtime.state(pruner.gates["conv2"])
        hard_mask = state.hard_mask
        hard_mask.retain_grad()
        pruner.model(x).sum().backward()
    k1, k2, k3 = _keep(pruner, "conv1"), _keep(pruner, "conv2"), _keep(pruner, "fc1")
    small = _by_hand(dense, k1, k2, k3)
    col_mask = torch.ones(len(k2) * HW * HW, dtype=torch.float64, requires_grad=True)
    xd = x.double()
    out = small.fc2(torch.relu(small.fc1(small.flat(small.features(xd)) * col_mask)))
    out.sum().backward()
    want = col_mask.grad.view(len(k2), HW * HW).sum(1)
    assert torch.allclose(hard_mask.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_channels_last_flatten_reads_copies_of_the_channels():
    """``x.permute(0, 2, 3, 1).flatten(1)``: columns ``(h, w, c)``, the channel innermost, so
    fc1 reads ``h * w`` copies of conv2's channels one after the other (a concat of the same
    group, the rule of Swin's patch merging): conv2 is pruned, each copy keeps the kept
    channels. Reference: the dense float64 model with the removed channels' columns zeroed
    through the ``(out, h, w, C)`` view of fc1's weight."""
    pruner, dense, x, msgs = _setup("channels_last")
    assert set(pruner.widths()) == {"conv1", "conv2", "fc1"}
    assert not [m for m in msgs if "conv2" in m]
    pruner.set_widths({"conv1": 4, "conv2": 6, "fc1": 10})
    k1, k2, k3 = _keep(pruner, "conv1"), _keep(pruner, "conv2"), _keep(pruner, "fc1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an export mismatch warning fails the test
        exported = pruner.export()
    out = exported(x)
    assert (out - _hard(pruner, x)).abs().max() <= 1e-5
    cols = [p * 16 + c for p in range(HW * HW) for c in k2]
    assert torch.equal(exported.fc1.weight, dense.fc1.weight[k3][:, cols])
    z = copy.deepcopy(dense).double().eval()
    with torch.no_grad():
        z.conv2.weight[:, [c for c in range(8) if c not in k1]] = 0
        z.fc1.weight.view(24, HW, HW, 16)[..., [c for c in range(16) if c not in k2]] = 0
        z.fc2.weight[:, [c for c in range(24) if c not in k3]] = 0
    assert torch.allclose(out.double(), z(x.double()), atol=1e-5, rtol=0)
    assert pruner.hard_flops_ratio() == pytest.approx(
        count_flops(exported, x) / count_flops(dense, x), rel=1e-9, abs=0)


@pytest.mark.parametrize("kind,reason", [
    ("constant", "written as a number"),
])
def test_other_flattens_keep_the_group_whole(kind, reason):
    pruner, dense, x, msgs = _setup(kind)
    groups = {g.name: g for g in pruner.analysis.groups}
    assert not groups["conv2"].prunable
    assert any(reason in r for r in groups["conv2"].reasons), groups["conv2"].reasons
    assert set(pruner.widths()) == {"conv1", "fc1"}
    pruner.set_widths({"conv1": 4, "fc1": 10})
    exported = pruner.export()
    assert exported.conv2.out_channels == 16 and exported.fc1.in_features == 16 * HW * HW
    k1, k3 = _keep(pruner, "conv1"), _keep(pruner, "fc1")
    z = copy.deepcopy(dense).double().eval()
    with torch.no_grad():
        z.conv2.weight[:, [c for c in range(8) if c not in k1]] = 0
        z.fc2.weight[:, [c for c in range(24) if c not in k3]] = 0
    assert (exported(x) - _hard(pruner, x)).abs().max() <= 1e-5
    assert torch.allclose(exported(x).double(), z(x.double()), atol=1e-5, rtol=0)


class _FlattenNorm(nn.Module):
    """A flatten whose merged dim is normalised before the classifier: not a plain column
    selection of a linear layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8 * 9)
        self.fc = nn.Linear(8 * 9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.relu(self.conv(x)).flatten(1)))


class _FlattenTwice(nn.Module):
    """The same flattened map into two linear layers (both take its columns), one with a
    residual add of its own width: only the plain consumers may keep the group prunable."""

    def __init__(self, add: bool) -> None:
        super().__init__()
        self.add = add
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 9, 4)
        self.fc2 = nn.Linear(8 * 9, 4)
        self.extra = nn.Linear(3 * 9, 8 * 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).flatten(1)
        if self.add:
            f = f + self.extra(x.flatten(1))
        return self.fc1(f) + self.fc2(f)


@pytest.mark.parametrize("case", ["norm", "two_linears", "added"])
def test_merged_dim_used_otherwise(case):
    torch.manual_seed(0)
    model = {"norm": _FlattenNorm, "two_linears": lambda: _FlattenTwice(False),
             "added": lambda: _FlattenTwice(True)}[case]()
    x = torch.randn(2, 3, 3, 3)
    an = s2h.graph.analyze(model, (x,))
    conv = next(g for g in an.groups if g.producers == ["conv"])
    if case == "two_linears":
        assert conv.prunable and sorted(conv.consumers) == ["fc1", "fc2"]
        assert an.layer_in_repeat == {"fc1": 9, "fc2": 9}
        dense = copy.deepcopy(model)
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=2)
        pruner.set_widths({"conv": 6})
        keep = _keep(pruner, "conv")
        exported = pruner.export()
        assert len(keep) == 6 and exported.fc1.in_features == exported.fc2.in_features == 54
        z = copy.deepcopy(dense).double()
        with torch.no_grad():
            for fc in (z.fc1, z.fc2):
                fc.weight.view(4, 8, 3, 3)[:, [c for c in range(8) if c not in keep]] = 0
        assert torch.allclose(exported(x).double(), z(x.double()), atol=1e-5, rtol=0)
    else:
        assert not conv.prunable and conv.reasons


def test_lockstep_dual_forward_equals_two_passes():
    """The fused dual ops read the repeated gate's columns like the masked layer does, and a
    training step moves the flattened group's gate the same way in both."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2 * HW, 2 * HW)
    a, b = lockstep_pair(VGGish().eval(), x, divisor=2)
    assert a.lockstep and not b.lockstep
    pb_before = b.gates["conv2"].logits.detach().clone()
    sa, ha = a.dual_forward(x)
    sb, hb = b.dual_forward(x)
    assert torch.allclose(sa, sb, atol=1e-5) and torch.allclose(ha, hb, atol=1e-5)
    y = torch.randint(0, 5, (x.shape[0],))
    opts = [torch.optim.SGD([{"params": p.weight_parameters()}, {"params": p.gate_parameters()}],
                            lr=0.1) for p in (a, b)]
    ma, mb = a.train_step(x, y, opts[0]), b.train_step(x, y, opts[1])
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    la, lb = a.gates["conv2"].logits.detach(), b.gates["conv2"].logits.detach()
    moved = float((lb - pb_before).abs().max())
    assert moved > 0 and torch.allclose(la, lb, atol=1e-5 * max(1.0, moved))


def test_torchvision_vgg11_bn_prunes_every_group_but_the_output():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.vgg11_bn(num_classes=10).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    pruner = s2h.S2HPruner(model, x, 0.5)
    with_producers = [g for g in pruner.analysis.groups if g.producers]
    assert len(with_producers) == 11
    frozen = [g for g in with_producers if not g.prunable]
    # the one group kept whole: the classifier's output (the model output)
    assert [g.producers for g in frozen] == [["classifier.6"]]
    assert pruner.analysis.layer_in_repeat == {"classifier.0": 49}
    pruner.set_widths(0.5)
    exported = pruner.export()
    keep = _keep(pruner, "features.25")
    assert exported.classifier[0].in_features == len(keep) * 49 < 512 * 49
    assert (exported(x) - _hard(pruner, x)).abs().max() <= 1e-5
    ratio = count_flops(exported, x) / count_flops(dense, x)
    assert pruner.hard_flops_ratio() == pytest.approx(ratio, rel=1e-9, abs=0)


def test_flatten_of_a_channels_last_memory_format_is_pruned_exactly():
    """A channels_last *memory format* does not change the logical NCHW flatten (torch copies
    before the view): the group is pruned and the export equals the hand-built model."""
    torch.manual_seed(0)
    model = VGGish().eval().to(memory_format=torch.channels_last)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 2 * HW, 2 * HW).contiguous(memory_format=torch.channels_last)
    pruner = s2h.S2HPruner(model, x, 0.5, divisor=2)
    assert pruner.analysis.layer_in_repeat == {"fc1": HW * HW}
    pruner.set_widths({"conv1": 4, "conv2": 6, "fc1": 10})
    k1, k2, k3 = _keep(pruner, "conv1"), _keep(pruner, "conv2"), _keep(pruner, "fc1")
    exported = pruner.export()
    assert (exported(x) - _hard(pruner, x)).abs().max() <= 1e-5
    want = _by_hand(dense, k1, k2, k3)(x.double())
    assert torch.allclose(exported(x).double(), want, atol=1e-5, rtol=0)
