"""Attacks on s2h (issue #12): graph patterns that used to export silently wrong models,
aliased modules, tampered export folders and checkpoints, NaN gradients, concurrent writers,
bad flags and data. Each test failed before its fix; keep them so no change can reopen a hole."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import s2h
from s2h import S2HPruner


# ----------------------------------------------------------------------------- graph patterns
class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def head(self, x):
        return self.fc(self.b(x).mean((2, 3)))


class WeightRead(_Base):  # a pruned layer's weight used directly, outside its call
    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.head(y) + F.conv2d(x, self.a.weight, padding=1).mean()


class WidthRead(_Base):  # a pruned width read by Python
    def forward(self, x):
        return self.head(torch.relu(self.a(x)) / self.a.out_channels ** 0.5)


class NormWidthRead(_Base):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        y = self.bn(self.a(x))
        if self.bn.num_features == 16:
            y = y * 2
        return self.head(y)


class Strided(_Base):  # an explicit-stride view
    def forward(self, x):
        y = torch.relu(self.a(x))
        n, _, h, w = y.shape
        y = y.as_strided((n, 16, h, w), (16 * h * w, h * w, w, 1))
        return self.head(y)


class ToBatch(nn.Module):  # channels swapped into the batch dim of the next conv
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(2, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x)).transpose(0, 1)
        return self.fc(self.b(y).mean((0, 2, 3))).expand(x.shape[0], -1) + x.mean()


class LogSoftmaxOverChannels(_Base):
    def forward(self, x):
        return self.head(F.log_softmax(self.a(x), dim=1))


class SoftmaxOverChannels(_Base):
    def forward(self, x):
        return self.head(torch.softmax(self.a(x), dim=1))


def _build(cls, divisor=4):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pruner = S2HPruner(model, (x,), 0.5, divisor=divisor)
    return model, pruner, x, [str(w.message) for w in rec]


@pytest.mark.parametrize("cls,why", [
    (WeightRead, "'a.weight' is used by aten.convolution"),
    (WidthRead, "a.out_channels is read"),
    (NormWidthRead, "bn.num_features is read"),
    (Strided, "aten.as_strided"),
    (ToBatch, "not in its channel dim"),
    (LogSoftmaxOverChannels, "_log_softmax over the channel dim"),
    (SoftmaxOverChannels, "_softmax over the channel dim"),
])
def test_graph_patterns_keep_the_group_whole_by_name(cls, why):
    """Each pattern used to prune group 'a' (silently: wrong export, a crash, or soft != hard);
    now 'a' is kept whole with a warning naming it and the reason, the other groups still
    prune, and the export computes what the hard network computes."""
    model, pruner, x, msgs = _build(cls)
    assert "a" not in [g.name for g in pruner.groups]
    assert [g.name for g in pruner.groups] == ["b"]
    assert any(m.startswith("group 'a' (16 channels) is left unpruned") and why in m
               for m in msgs), msgs
    pruner.set_widths({"b": 8})
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", s2h.ExportMismatchWarning)
        exported = pruner.export()
    assert exported.b.out_channels == 8 and exported.a.out_channels == 16
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        torch.testing.assert_close(exported(x), hard, rtol=0, atol=1e-5)
        # 'a' untouched: with b at full width the hard network is the dense model
        pruner.set_widths({"b": 16})
        ref = cls.forward(_dense_copy(model), x)
        torch.testing.assert_close(pruner.hard_forward(x), ref, rtol=0, atol=1e-5)


def _dense_copy(model):
    """The same weights in a fresh plain model of the same class (an independent reference)."""
    fresh = type(model)()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "hard_" not in k})
    return fresh.eval()


def test_softmax_over_other_dims_stays_prunable():
    class M(_Base):
        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = torch.softmax(y.flatten(2), dim=-1).view(n, c, h, w)  # over space: channel-wise
            return self.head(y)

    _, pruner, _, msgs = _build(M)
    assert sorted(g.name for g in pruner.groups) == ["a", "b"], msgs


def test_export_compares_outputs_with_the_hard_network(monkeypatch):
    """export() runs both on the example inputs: a wrong export is a loud warning, not a
    silent 'True' (here a layer exported with a perturbed bias stands in for any such bug)."""
    import s2h.pruner as P

    model, pruner, x, _ = _build(WidthRead)
    pruner.set_widths({"b": 8})
    model.eval()
    orig = P._plain_layer

    def bad(m, *a, **k):
        new = orig(m, *a, **k)
        if isinstance(new, nn.Conv2d) and new.out_channels == 8:
            with torch.no_grad():
                new.bias.add_(0.01)
        return new

    monkeypatch.setattr(P, "_plain_layer", bad)
    with pytest.warns(s2h.ExportMismatchWarning, match="differs from the hard network"):
        exported = pruner.export()
    diff, tol = s2h.export_difference(pruner.hard_forward, model, exported, x)
    assert diff > 1e-3 > tol


# ----------------------------------------------------------------------------- aliasing
class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = self.c  # one module, two names
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.c(x))
        return self.fc(self.c2(x).mean((2, 3)))


def test_module_registered_under_two_names_exports_and_loads(tmp_path):
    model, pruner, x, _ = _build(Aliased)
    pruner.set_widths(0.5)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", s2h.ExportMismatchWarning)
        exported = pruner.export()
    assert exported.c is exported.c2 and exported.c.in_channels < 16
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        torch.testing.assert_close(exported(x), hard, rtol=0, atol=1e-5)
        # independent reference: the same computation written out with the kept channels
        keep = pruner.gates["a"].keep_index()
        e = exported
        ref_a = torch.relu(F.conv2d(x, model.a.weight[keep], model.a.bias[keep], padding=1))
        ref = torch.relu(F.conv2d(ref_a, e.c.weight, e.c.bias, padding=1))
        ref = e.fc(F.conv2d(ref, e.c.weight, e.c.bias, padding=1).mean((2, 3)))
        torch.testing.assert_close(hard, ref, rtol=0, atol=1e-5)
    d = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom", "name": "x"})
    loaded = s2h.load_exported(d, model_fn=Aliased)
    assert loaded.c is loaded.c2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hard, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- export folders
def _saved_mlp(tmp_path, name="m"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    return model, s2h.save_exported(model, str(tmp_path / name))


def _edit_arch(d, fn):
    path = os.path.join(d, "architecture.json")
    arch = json.load(open(path))
    arch = fn(arch)
    with open(path, "w") as f:
        json.dump(arch, f)


def _maxrss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("where", ["layers", "tree"])
def test_memory_bomb_in_architecture_json_is_refused_before_allocating(tmp_path, where):
    """40,000,000 channels in a 2 KB JSON: refused from the safetensors header, on the meta
    device, before any memory is used (it used to allocate GBs and take half a minute)."""
    import time

    _, d = _saved_mlp(tmp_path)
    big = 40_000_000

    def bomb(arch):
        if where == "layers":
            arch["layers"]["0"]["args"]["out_features"] = big
            arch["layers"]["2"]["args"]["in_features"] = big
        else:  # the dense tree, whose layers architecture.json then replaces
            arch["builder"]["tree"]["children"][0][1]["args"]["out_features"] = big
            arch["builder"]["tree"]["children"][2][1]["args"]["in_features"] = big
        return arch

    _edit_arch(d, bomb)
    assert os.path.getsize(os.path.join(d, "architecture.json")) < 4096
    rss, t = _maxrss_mb(), time.perf_counter()
    with pytest.raises(ValueError, match="40000000|elements"):
        s2h.load_exported(d)
    assert time.perf_counter() - t < 5
    assert _maxrss_mb() - rss < 300  # a real build would be 40M x 8 x 2 x 4 bytes = 2.5 GB


def test_load_exported_refuses_non_float_tensors(tmp_path):
    model, d = _saved_mlp(tmp_path)
    w = os.path.join(d, "model.safetensors")
    for dtype in (torch.int64, torch.bool):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["0.weight"] = (state["0.weight"] * 100).to(dtype)
        save_file(state, w, metadata={"format": "s2h-exported"})
        with pytest.raises(ValueError, match="'0.weight' is (I64|BOOL).*floating point"):
            s2h.load_exported(d)
    save_file({k: v.double() for k, v in model.state_dict().items()}, w)
    loaded = s2h.load_exported(d)  # another float dtype is fine: cast to the model's
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("content", [
    "[]", "null", '"s2h-exported"', '{"format": "s2h-exported", "version": 1}',
    '{"format": "s2h-exported", "builder": null}',
    '{"format": "s2h-exported", "builder": {"kind": "structure"}}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": []}}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": {"type": "Linear", '
    '"args": {"in_features": "x"}}}}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": {"type": "Sequential"}},'
    ' "layers": [1]}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": {"type": "Sequential"}},'
    ' "layers": {"0": 7}}',
    '{"format": "s2h-exported", "builder": {"kind": "s2h.models"}}',
    "[" * 100_000 + "]" * 100_000,
    '{"format": "s2h-exported", "builder": ' + '{"kind": "structure", "tree": {"type": '
    '"Sequential", "children": [["0", ' * 3000 + '{"type": "ReLU"}' + "]]}}" * 3000 + "}",
])
def test_malformed_architecture_json_is_a_clear_value_error(tmp_path, content):
    _, d = _saved_mlp(tmp_path)
    with open(os.path.join(d, "architecture.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError) as exc:
        s2h.load_exported(d)
    assert "architecture.json" in str(exc.value) or "unexpected" in str(exc.value) \
        or "builder" in str(exc.value), str(exc.value)


def test_checkpoint_with_only_some_gates_is_refused():
    _, pruner, _, _ = _build(WidthRead)
    _, other, _, _ = _build(_PlainTwo)
    state = other.state_dict()
    assert len(state["gates"]) == 2
    other.load_state_dict(state)  # complete: fine
    partial = dict(state, gates={k: v for k, v in list(state["gates"].items())[:1]})
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(partial)
    bad = dict(state, gates={k: dict(v, logits=v["logits"] * float("nan"))
                             for k, v in state["gates"].items()})
    with pytest.raises(ValueError, match="not finite"):
        other.load_state_dict(bad)


class _PlainTwo(_Base):
    def forward(self, x):
        return self.head(torch.relu(self.a(x)))
