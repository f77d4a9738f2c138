"""Dependency-group analysis on small models and timm ResNets."""

import warnings

import pytest
import torch

import s2h
from s2h.graph import analyze

from _models import ConcatNet, DepthwiseNet, FlattenNet, GroupedNet, mlp, plain_cnn


def _groups(model, x, ignore=()):
    return {g.name: g for g in analyze(model, (x,), set(ignore)).groups}


def test_plain_cnn_chain():
    g = _groups(plain_cnn(), torch.randn(2, 3, 16, 16))
    assert g["0"].prunable and g["0"].consumers == ["3"] and g["0"].norms == ["1"]
    assert g["3"].consumers == ["6"] and g["6"].consumers == ["11"]
    assert not g["11"].prunable  # the classifier output is never pruned


def test_mlp_groups():
    g = _groups(mlp(), torch.randn(4, 20))
    assert g["0"].prunable and g["0"].consumers == ["2"]
    assert g["2"].prunable and g["2"].consumers == ["4"]
    assert not g["4"].prunable


def test_depthwise_and_squeeze_excite_join_the_group():
    g = _groups(DepthwiseNet(), torch.randn(2, 3, 8, 8))
    stem = g["stem"]
    assert stem.depthwise == ["dw"]
    assert set(stem.norms) == {"bn0", "bn1"}
    # the SE expand conv's output is multiplied into the block's channels: same group
    assert "se_expand" in stem.producers
    assert set(stem.consumers) == {"se_reduce", "pw"}
    assert g["se_reduce"].prunable


def _frozen_warnings(model, x):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=4)
    return pruner, [str(m.message) for m in w]


def test_concat_across_groups_is_pruned_by_segments():
    """Two convs concatenated into a conv: each input keeps its group (more in test_concat.py)."""
    pruner, msgs = _frozen_warnings(ConcatNet(), torch.randn(2, 3, 8, 8))
    assert not msgs and set(pruner.widths()) == {"a", "b", "c"}
    groups = {g.name: g for g in pruner.analysis.groups}
    cat = next(g for g in pruner.analysis.groups if g.segments)
    names = [pruner.analysis.groups[i].name for i, _ in cat.segments]
    assert names == ["a", "b"] and [w for _, w in cat.segments] == [8, 8]
    assert cat.consumers == ["c"] and groups["a"].consumers == ["c"]


def test_grouped_conv_passes_its_group_through_in_whole_conv_groups():
    """A grouped conv with in = out channels joins its producer's group, pruned in whole conv
    groups (issue 18 item 3; exactness in test_grouped.py)."""
    pruner, msgs = _frozen_warnings(GroupedNet(), torch.randn(2, 3, 8, 8))
    assert not msgs and set(pruner.widths()) == {"a", "b"}
    group = pruner.analysis.groups[pruner.analysis.layer_in_group["g"]]
    assert group.name == "a" and group.depthwise == ["g"] and group.block == 4


def test_flatten_into_a_classifier_is_pruned_with_its_columns():
    """flatten(1) of (N, C, h, w) into a Linear: the last conv's group is pruned, each kept
    channel keeping its h*w columns (more cases, and the reshapes still left whole, in
    test_flatten.py)."""
    pruner, msgs = _frozen_warnings(FlattenNet(), torch.randn(2, 3, 4, 4))
    assert not msgs and set(pruner.widths()) == {"a", "b"}


def test_ignore_keeps_groups_whole_and_unknown_names_are_refused():
    g = _groups(plain_cnn(), torch.randn(2, 3, 16, 16), ignore=["6"])
    assert g["0"].prunable and not g["3"].prunable
    with pytest.raises(ValueError, match="do not exist.*'nope'"):
        analyze(plain_cnn(), (torch.randn(2, 3, 8, 8),), {"nope"})


@pytest.mark.parametrize("name,n_groups", [("resnet18", 12), ("resnet50", 37)])
def test_timm_resnet_groups(name, n_groups):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, num_classes=10)
    groups = {g.name: g for g in analyze(model, (torch.randn(2, 3, 32, 32),)).groups}
    prunable = [g for g in groups.values() if g.prunable]
    assert len(prunable) == n_groups
    stem = groups["conv1"]
    # layer1 has no downsample: the stem's channels are the residual stream of stage 1
    if name == "resnet18":
        assert set(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
        assert {"layer2.0.conv1", "layer2.0.downsample.0"} <= set(stem.consumers)
        res2 = groups["layer2.0.conv2"]
        assert "layer2.0.downsample.0" in res2.producers and "layer2.0.downsample.1" in res2.norms
    else:
        res1 = groups["layer1.0.conv3"]
        assert {"layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"} <= set(res1.producers)
    assert not groups["fc"].prunable


class _ShiftNet(torch.nn.Module):
    """Spatial roll / slice / pad between two convs keep the channels; a channel roll does not."""

    def __init__(self, channel_roll=False):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)
        self.channel_roll = channel_roll

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.roll(x, 1, dims=1 if self.channel_roll else 2)
        x = torch.nn.functional.pad(x[:, :, 1:, :], (1, 1, 0, 1))
        return self.fc(self.b(x).mean((2, 3)))


def test_spatial_roll_slice_pad_keep_the_group_and_a_channel_roll_freezes_it():
    g = _groups(_ShiftNet(), torch.randn(2, 3, 8, 8))
    assert g["a"].prunable and g["a"].consumers == ["b"]
    g = _groups(_ShiftNet(channel_roll=True), torch.randn(2, 3, 8, 8))
    assert not g["a"].prunable and "aten.roll along the channel dim" in g["a"].reasons[0]


class _ScaleNet(torch.nn.Module):
    """A per-channel parameter (layer scale) multiplied into a group is sliced with it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x)) * self.gamma.view(1, -1, 1, 1)
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


def test_per_channel_parameter_is_sliced_with_its_group():
    torch.manual_seed(0)
    model, x = _ScaleNet(), torch.randn(2, 3, 8, 8)
    pruner = s2h.S2HPruner(model, x, 0.5, divisor=4)
    assert pruner.groups[0].params == [("gamma", 0)]
    pruner.set_widths({"a": 4})
    keep = pruner.gates["a"].keep_index()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        h = torch.relu(torch.nn.functional.conv2d(x, model.a.weight[keep], model.a.bias[keep],
                                                  padding=1)) * model.gamma[keep].view(1, -1, 1, 1)
        ref = model.fc(torch.relu(torch.nn.functional.conv2d(
            h, model.b.weight[:, keep], model.b.bias, padding=1)).mean((2, 3)))
        assert torch.allclose(hard, ref, atol=1e-6)
        exported = pruner.export()
        assert exported.gamma.shape == (4,) and torch.allclose(exported(x), hard, atol=1e-6)
    assert "gamma" not in model.__dict__  # the slice lives only inside hard mode
