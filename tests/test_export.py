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


# ----------------------------------------------------- layers whose pruned form is another class


class _MHANet(nn.Module):
    """fc_in -> nn.MultiheadAttention (self-attention, or a key / value of width ``kdim``:
    separate q / k / v weights) -> fc_out."""

    def __init__(self, batch_first=True, kdim=None):
        super().__init__()
        self.fc_in = nn.Linear(12, 32)
        self.kv = nn.Linear(12, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.fc_out = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.fc_in(x))
        kv = h if self.kv is None else self.kv(x)
        return self.fc_out(torch.relu(self.attn(h, kv, kv, need_weights=False)[0]))


def _heads_pruned(model, x, widths):
    """The export of ``model`` with the given group widths (every group named in ``widths``
    must exist), the others at full width."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parts kept whole (class token concat, ...)
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=4)
    names = {g.name for g in pruner.groups}
    assert set(widths) <= names, sorted(names)
    pruner.set_widths(widths)
    return pruner, pruner.export()


def _assert_round_trip(exported, d, x, model_fn=None):
    """Loaded == exported: same state (names, shapes, values), classes at every path, outputs
    equal to 1e-6; returns the loaded model."""
    loaded = s2h.load_exported(d, model_fn=model_fn)
    a, b = exported.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert {n: type(m) for n, m in exported.named_modules()} == \
        {n: type(m) for n, m in loaded.named_modules()}
    exported.eval()
    with torch.no_grad():
        ref, out = exported(x), loaded(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    return loaded


@pytest.mark.parametrize("batch_first,kdim", [(True, None), (False, None), (True, 20)])
def test_multihead_attention_with_heads_pruned_round_trips(tmp_path, batch_first, kdim):
    from s2h.torch_attention import PrunedMultiheadAttention

    torch.manual_seed(0)
    x = torch.randn(2, 7, 12) if batch_first else torch.randn(7, 2, 12)
    pruner, exported = _heads_pruned(_MHANet(batch_first, kdim), x,
                                     {"attn.heads": 16, "fc_in": 24})
    a = exported.attn
    assert type(a) is PrunedMultiheadAttention
    assert (a.num_heads, a.head_dim, a.embed_dim) == (2, 8, 24)
    with torch.no_grad():  # the export is the hard network (the reference the loader must meet)
        assert torch.allclose(exported(x), pruner.hard_forward((x,)), atol=1e-5)
    d = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom",
                                                                    "name": "mha"})
    with open(os.path.join(d, "architecture.json")) as f:
        arch = json.load(f)
    spec = arch["swapped"]["attn"]
    assert spec["type"] == "s2h.torch_attention.PrunedMultiheadAttention"
    assert spec["from"] == "torch.nn.modules.activation.MultiheadAttention"
    assert spec["sizes"]["source_heads"] == list(a.source_heads)
    loaded = _assert_round_trip(exported, d, x, lambda: _MHANet(batch_first, kdim))
    assert loaded.attn.source_heads == a.source_heads and loaded.attn.batch_first == batch_first


def _small_vit(tv):
    return tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                       hidden_dim=64, mlp_dim=128, num_classes=10)


def _small_swin(tv):
    return tv.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                     num_heads=[2, 4], window_size=[4, 4], num_classes=10)


def test_torchvision_vit_with_heads_pruned_round_trips(tmp_path):
    tv = pytest.importorskip("torchvision")
    from s2h.torch_attention import PrunedMultiheadAttention

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    pruner, exported = _heads_pruned(_small_vit(tv), x, {
        "encoder.layers.encoder_layer_0.self_attention.heads": 32,
        "encoder.layers.encoder_layer_1.self_attention.heads": 16,
        "encoder.layers.encoder_layer_0.mlp.0": 64})
    assert pruner.builder is None  # no torchvision builder makes this reduced ViT
    assert type(exported.encoder.layers[1].self_attention) is PrunedMultiheadAttention
    with pytest.raises(ValueError, match="don't know how to rebuild VisionTransformer"):
        s2h.save_exported(exported, str(tmp_path / "a"))
    d = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom",
                                                                    "name": "vit"})
    loaded = _assert_round_trip(exported, d, x, lambda: _small_vit(tv))
    assert loaded.encoder.layers[1].self_attention.num_heads == 1


def test_torchvision_swin_with_heads_pruned_round_trips(tmp_path):
    tv = pytest.importorskip("torchvision")
    from s2h.torchvision_support import PrunedShiftedWindowAttention

    torch.manual_seed(0)
    x = torch.randn(2, 3, 36, 36)  # padded windows, shifted
    _, exported = _heads_pruned(_small_swin(tv), x, {"features.1.1.attn.heads": 16,
                                                     "features.3.0.attn.heads": 32,
                                                     "features.3.1.attn.heads": 16,
                                                     "features.1.0.mlp.0": 64})
    assert type(exported.features[3][0].attn) is PrunedShiftedWindowAttention
    assert type(exported.features[1][0].attn) is tv.models.swin_transformer.ShiftedWindowAttention
    d = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom",
                                                                    "name": "swin"})
    loaded = _assert_round_trip(exported, d, x, lambda: _small_swin(tv))
    a = loaded.features[3][1].attn  # a shifted block: shift_size comes from the dense layer
    assert (a.num_heads, a.head_dim, a.shift_size) == (1, 16, [2, 2])


@pytest.mark.parametrize("name,kwargs,size", [
    ("vit_b_16", {"image_size": 32, "num_classes": 10}, 32),
    ("swin_t", {"num_classes": 10}, 32),
    ("googlenet", {"aux_logits": False, "init_weights": True, "num_classes": 10}, 32),
    ("squeezenet1_1", {"num_classes": 7}, 32),
    ("regnet_x_400mf", {"num_classes": 10}, 32),  # its builder cannot run on the meta device
])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchvision_models_are_rebuilt_by_name(tmp_path, name, kwargs, size):
    """The pruner records torchvision's builder (weights=None); loading needs no model_fn."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None, **kwargs)
    x = torch.randn(2, 3, size, size)
    pruner, exported = _pruned(model, x)
    expect = {k: v for k, v in kwargs.items() if k != "num_classes" or v != 1000}
    assert pruner.builder["kind"] == "torchvision" and pruner.builder["name"] == name
    assert {k: v for k, v in pruner.builder["kwargs"].items() if k in expect} == expect
    d = s2h.save_exported(exported, str(tmp_path / "m"))
    loaded = _assert_round_trip(exported, d, x)
    if name in ("vit_b_16", "swin_t"):  # heads were pruned: a swapped attention class
        assert any(type(m).__name__.startswith("Pruned") for m in loaded.modules())


def test_torchvision_detection_needs_the_same_tree():
    """No builder is recorded for a torchvision class built with arguments no builder takes."""
    tv = pytest.importorskip("torchvision")
    from s2h.export import detect_builder

    assert detect_builder(_small_vit(tv)) is None
    m = tv.models.resnet18(num_classes=10)
    m.layer1[0].conv1.stride = (2, 2)  # same shapes, another computation
    assert detect_builder(m) is None
    assert detect_builder(tv.models.resnet18(num_classes=10)) == {
        "kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}


def test_torchvision_detection_builds_each_candidate_once(monkeypatch):
    """A second pruner of the same torchvision architecture reuses the candidates' signatures
    (no builder runs again), and a remembered candidate still compares the whole tree."""
    tv = pytest.importorskip("torchvision")
    from s2h import export

    built = []
    real = export._build_from
    monkeypatch.setattr(export, "_build_from", lambda b: built.append(b["name"]) or real(b))
    monkeypatch.setattr(export, "_CANDIDATES", {})
    want = {"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}
    assert export.detect_builder(tv.models.resnet18(num_classes=10)) == want
    first = len(built)
    assert "resnet18" in built
    assert export.detect_builder(tv.models.resnet18(num_classes=10)) == want
    assert len(built) == first
    m = tv.models.resnet18(num_classes=10)
    m.layer1[0].conv1.stride = (2, 2)  # same shapes, another computation: no builder matches
    assert export.detect_builder(m) is None
    every = len(built)  # the builders after resnet18 in torchvision's list were tried too
    assert export.detect_builder(m) is None
    assert len(built) == every


def test_timm_builder_records_the_image_size_of_a_stem_patch_embedding(tmp_path):
    """MLP-Mixer's patch embedding is `stem`, not `patch_embed`: its image size must be in the
    builder, or the reloaded model refuses the input it was pruned for."""
    timm = pytest.importorskip("timm")
    from s2h.export import detect_builder

    model = timm.create_model("mixer_s16_224", num_classes=10, img_size=32)
    assert detect_builder(model)["kwargs"]["img_size"] == 32
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    d = s2h.save_exported(model, str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(s2h.load_exported(d)(x), model(x))


def _tamper(d, edit):
    path = os.path.join(d, "architecture.json")
    with open(path) as f:
        arch = json.load(f)
    edit(arch)
    with open(path, "w") as f:
        json.dump(arch, f)


def test_loading_refuses_swaps_outside_the_allow_list(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12)
    _, exported = _heads_pruned(_MHANet(), x, {"attn.heads": 16})
    d0 = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom", "name": "n"})

    def fresh(i):
        d = str(tmp_path / f"t{i}")
        return s2h.save_exported(exported, d, builder={"kind": "custom", "name": "n"})

    edits = [
        (lambda a: a["swapped"]["attn"].update(type="subprocess.Popen"),
         "not allowed: 'subprocess.Popen'"),
        (lambda a: a["swapped"]["attn"].update(
            type="s2h.torchvision_support.PrunedShiftedWindowAttention"),
         "replaces a torchvision.models.swin_transformer.ShiftedWindowAttention"),
        (lambda a: a["swapped"].update(fc_out=a["swapped"].pop("attn")),
         "names a torch.nn.modules.activation.MultiheadAttention at 'fc_out'"),
        (lambda a: a["swapped"]["attn"]["sizes"].update(source_heads=[0, 9]), "bad source_heads"),
        (lambda a: a["swapped"]["attn"]["sizes"].update(command="echo hi"), "sizes of"),
        (lambda a: a["swapped"]["attn"]["sizes"].update(num_heads="2"), "is not an int"),
    ]
    for i, (edit, msg) in enumerate(edits):
        d = fresh(i)
        _tamper(d, edit)
        with pytest.raises(ValueError, match=msg):
            s2h.load_exported(d, model_fn=_MHANet)
    assert s2h.load_exported(d0, model_fn=_MHANet).attn.num_heads == 2


def test_loading_refuses_torchvision_builders_outside_classification(tmp_path):
    pytest.importorskip("torchvision")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for i, builder in enumerate([
            {"kind": "torchvision", "name": "fasterrcnn_resnet50_fpn", "kwargs": {}},
            {"kind": "torchvision", "name": "os.system", "kwargs": {}},
            {"kind": "torchvision", "name": "resnet18", "kwargs": {"weights": "DEFAULT"}}]):
        d = s2h.save_exported(model, str(tmp_path / f"m{i}"), builder=builder)
        with pytest.raises(ValueError, match="not one of torchvision's|may not name weights"):
            s2h.load_exported(d)


class _TokenNet(nn.Module):
    """A ViT-like stem: a class token and a position embedding on the residual width ``d``."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos
        return self.head(h[:, 0] + h[:, 1:].mean(1))


def test_parameters_outside_layers_take_the_saved_shapes(tmp_path):
    """A narrowed residual width (class token ``(1, 1, d)``, position embedding ``(1, n, d)``)
    loads: the export is written here by hand, keeping channels [0, 2, 3, 5, 7]."""
    torch.manual_seed(0)
    dense, x = _TokenNet(), torch.randn(2, 4, 6)
    keep = torch.tensor([0, 2, 3, 5, 7])
    small = _TokenNet(5)
    with torch.no_grad():
        small.embed.weight.copy_(dense.embed.weight[keep])
        small.embed.bias.copy_(dense.embed.bias[keep])
        small.cls.copy_(dense.cls[..., keep])
        small.pos.copy_(dense.pos[..., keep])
        small.head.weight.copy_(dense.head.weight[:, keep])
        small.head.bias.copy_(dense.head.bias)
    d = s2h.save_exported(small, str(tmp_path / "m"), builder={"kind": "custom", "name": "t"})
    _assert_round_trip(small, d, x, _TokenNet)
