"""Tests of the s2h.models zoo: shapes, published parameter counts, registry, fx tracing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from s2h.models import create_model, list_models, rebuild_model


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Small configurations: every architecture, cheap enough for CPU forwards.
SMALL_CONFIGS = {
    "resnet20": {"width": 0.5},
    "resnet32": {"width": 0.25},
    "resnet56": {"width": 0.25},
    "resnet110": {"width": 0.25},
    "cifar_resnet": {"depth": 14, "width": 0.5},
    "wrn28_10": {},  # full size (36.5M parameters): built on the meta device below
    "wide_resnet": {"depth": 10, "widen_factor": 1},
    "small_cnn": {"channels": [8, 16]},
    "mlp": {"hidden": [32]},
}


def test_list_models():
    names = list_models()
    assert names == sorted(names)
    assert set(SMALL_CONFIGS) == set(names)


def _bn(h: torch.Tensor, m: torch.nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _reference_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The architectures as the papers describe them (module docstring of s2h.models), in
    torch.nn.functional with the model's weights; BatchNorm in eval mode."""
    kind = type(model).__name__
    if kind == "MLP":
        h = x.flatten(1)
        for lin in model.hidden[::2]:
            h = torch.relu(F.linear(h, lin.weight, lin.bias))
        return F.linear(h, model.fc.weight, model.fc.bias)
    if kind == "SmallCNN":  # conv3x3-BN-ReLU, stride 2 after the first, pool, linear
        h = x
        for i in range(0, len(model.features), 3):
            conv, bn = model.features[i], model.features[i + 1]
            h = torch.relu(_bn(F.conv2d(h, conv.weight, None, 1 if i == 0 else 2, 1), bn))
        return F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)
    stages = (model.layer1, model.layer2, model.layer3)
    if kind == "CifarResNet":  # He et al.: post-activation blocks, option-B projections
        h = torch.relu(_bn(F.conv2d(x, model.conv1.weight, None, 1, 1), model.bn1))
        for s, stage in enumerate(stages):
            for i, b in enumerate(stage):
                stride = 2 if s > 0 and i == 0 else 1
                out = torch.relu(_bn(F.conv2d(h, b.conv1.weight, None, stride, 1), b.bn1))
                out = _bn(F.conv2d(out, b.conv2.weight, None, 1, 1), b.bn2)
                if b.conv1.weight.shape[:2] == b.conv1.weight.shape[1::-1] and stride == 1:
                    short = h
                else:
                    short = _bn(F.conv2d(h, b.shortcut[0].weight, None, stride), b.shortcut[1])
                h = torch.relu(out + short)
        return F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)
    assert kind == "WideResNet", kind  # Zagoruyko & Komodakis: pre-activation blocks
    h = F.conv2d(x, model.conv1.weight, None, 1, 1)
    for s, stage in enumerate(stages):
        for i, b in enumerate(stage):
            stride = 2 if s > 0 and i == 0 else 1
            act = torch.relu(_bn(h, b.bn1))
            out = F.conv2d(act, b.conv1.weight, None, stride, 1)
            out = F.conv2d(torch.relu(_bn(out, b.bn2)), b.conv2.weight, None, 1, 1)
            same = b.conv1.weight.shape[0] == b.conv1.weight.shape[1] and stride == 1
            h = out + (h if same else F.conv2d(act, b.shortcut.weight, None, stride))
    h = torch.relu(_bn(h, model.bn))
    return F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize(("in_chans", "size"), [(3, 32), (1, 28)])
def test_forward_matches_the_papers_architecture(name, in_chans, size):
    kwargs = dict(SMALL_CONFIGS[name], num_classes=7, in_chans=in_chans)
    if name == "mlp":
        kwargs["image_size"] = size
    x = torch.randn(2, in_chans, size, size)
    if name == "wrn28_10":
        # 36.5M parameters: built on the meta device, shapes only; its forward is the code of
        # the small ``wide_resnet`` configuration checked against the reference here
        with torch.device("meta"), torch.no_grad():
            out = create_model(name, **kwargs).eval()(x.to("meta"))
        assert out.shape == (2, 7) and out.dtype == torch.float32
        return
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():  # BatchNorm statistics and affine terms away from the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        out = model(x)
        ref = _reference_forward(model, x)
    assert out.shape == (2, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "published"),
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6),
     ("wrn28_10", 36.5e6)],
)  # fmt: skip
def test_parameter_counts_match_papers(name, published):
    """He et al. 2016 table 6 and Zagoruyko & Komodakis 2016 table 5, CIFAR-10 heads."""
    with torch.device("meta"):  # counting needs no memory or init time
        count = _num_params(create_model(name, num_classes=10))
    assert abs(count - published) / published < 0.02, count


def test_width_and_num_classes():
    narrow = create_model("resnet20", width=0.5)
    assert narrow.conv1.out_channels == 8 and narrow.fc.in_features == 32
    assert create_model("resnet20", num_classes=100).fc.out_features == 100
    # stage 1 has no projection: the stem's channels join the residual group
    resnet = create_model("resnet20")
    assert isinstance(resnet.layer1[0].shortcut, torch.nn.Identity)
    assert isinstance(resnet.layer2[0].shortcut, torch.nn.Sequential)
    with torch.device("meta"):
        assert create_model("wrn28_10", dropout=0.3).layer1[0].dropout.p == 0.3


def test_create_model_errors():
    with pytest.raises(ValueError) as err:
        create_model("resnet18")
    for name in list_models():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("cifar_resnet", depth=21)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wide_resnet", depth=27, widen_factor=2)
    with pytest.raises(TypeError, match="JSON"):
        create_model("small_cnn", channels=torch.tensor([4, 8]))
    assert create_model("Small-CNN").s2h_builder["name"] == "small_cnn"


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_builder_roundtrip_through_json(name):
    with torch.device("meta" if name == "wrn28_10" else "cpu"):
        model = create_model(name, num_classes=5, in_chans=1, **SMALL_CONFIGS[name])
        rebuilt = rebuild_model(json.loads(json.dumps(model.s2h_builder)))
    builder = json.loads(json.dumps(model.s2h_builder))
    assert builder["kind"] == "s2h.models" and builder["name"] == name
    assert builder["kwargs"]["num_classes"] == 5
    reference = model.state_dict()
    rebuilt_state = rebuilt.state_dict()
    assert list(rebuilt_state) == list(reference)
    assert all(rebuilt_state[k].shape == v.shape for k, v in reference.items())
    assert rebuilt.s2h_builder == builder
    with pytest.raises(ValueError):
        rebuild_model({"kind": "timm", "name": name})


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_fx_symbolic_trace(name):
    device = "meta" if name == "wrn28_10" else "cpu"
    with torch.device(device):
        model = create_model(name, **SMALL_CONFIGS[name]).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        if device == "cpu":
            torch.testing.assert_close(traced(x), model(x))
        else:
            assert traced(x).shape == (2, 10)
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert "fc" in called
