"""save_exported / load_exported: safetensors + JSON, no pickle, exact round trips."""

import json
import os

import pytest
import torch
from torch import nn

import s2h
from s2h import models

from _models import DepthwiseNet, plain_cnn


def _pruned(model, x, seed=0):
    pruner = s2h.S2HPruner(model, x[:2], 0.4, divisor=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return pruner, pruner.export()


@pytest.mark.parametrize("case", ["sequential", "s2h.models", "timm"])
def test_round_trip_is_exact(tmp_path, case):
    torch.manual_seed(0)
    if case == "sequential":
        model, x = plain_cnn(), torch.randn(3, 3, 16, 16)
    elif case == "s2h.models":
        model = models.create_model("resnet20", num_classes=10, in_chans=1)
        x = torch.randn(3, 1, 28, 28)
    else:
        timm = pytest.importorskip("timm")
        model, x = timm.create_model("resnet18", num_classes=7), torch.randn(3, 3, 32, 32)
    _, exported = _pruned(model, x)
    with torch.no_grad():
        ref = exported(x)
    d = s2h.save_exported(exported, str(tmp_path / "m"))
    assert sorted(os.listdir(d)) == ["architecture.json", "model.safetensors"]
    with open(os.path.join(d, "architecture.json")) as f:
        arch = json.load(f)
    assert arch["format"] == "s2h-exported"
    loaded = s2h.load_exported(d)
    # no s2h machinery (the architecture's own classes may come from s2h.models, like timm's)
    assert not any(type(m).__module__ in ("s2h.nn", "s2h.pruner") for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_custom_model_needs_model_fn(tmp_path):
    torch.manual_seed(0)
    model, x = DepthwiseNet(), torch.randn(2, 3, 8, 8)
    _, exported = _pruned(model, x)
    with pytest.raises(ValueError, match="don't know how to rebuild DepthwiseNet"):
        s2h.save_exported(exported, str(tmp_path / "a"))
    d = s2h.save_exported(exported, str(tmp_path / "b"), builder={"kind": "custom", "name": "dw"})
    with pytest.raises(ValueError, match="unknown builder kind 'custom'"):
        s2h.load_exported(d)
    loaded = s2h.load_exported(d, model_fn=DepthwiseNet)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))


def test_loading_refuses_types_outside_the_allow_list(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    d = s2h.save_exported(model, str(tmp_path / "m"))
    path = os.path.join(d, "architecture.json")
    with open(path) as f:
        arch = json.load(f)
    arch["builder"]["tree"]["children"][1][1] = {"type": "os.system",
                                                 "args": {"command": "echo hi"}}
    with open(path, "w") as f:
        json.dump(arch, f)
    with pytest.raises(ValueError, match="not allowed: 'os.system'"):
        s2h.load_exported(d)


def test_missing_or_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="architecture.json not found"):
        s2h.load_exported(str(tmp_path))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    d = s2h.save_exported(model, str(tmp_path / "m"))
    with open(os.path.join(d, "architecture.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        s2h.load_exported(d)
