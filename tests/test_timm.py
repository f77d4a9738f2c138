"""Every architecture family of the paper, from timm (and s2h.models), pruned and exported exactly.

Each family: the groups are the expected ones, the S2H loop trains, ``export()`` returns timm's /
torch's own modules with smaller layers, its eval output equals the hard network's, the FLOPs
that ``torch.utils.flop_counter`` counts on it equal ``pruner.hard_flops_ratio()``, and
``save_exported`` / ``load_exported`` round-trips it. Small inputs, batch 2.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h
from s2h import models

timm = pytest.importorskip("timm")


def _build(name, img, **kw):
    torch.manual_seed(0)
    if name in ("resnet56", "wrn28_10", "wide_resnet"):
        return models.create_model(name, num_classes=10, **kw), torch.randn(2, 3, img, img)
    return timm.create_model(name, num_classes=10, **kw), torch.randn(2, 3, img, img)


def _prune(model, x, divisor=8):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.4, divisor=divisor)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return pruner, [str(m.message) for m in w]


def _check_exact(pruner, model, x, tmp_path):
    """Train 2 steps, then: export plain + exact, FLOPs counted == hard ratio, round trip."""
    opt = torch.optim.SGD([{"params": list(pruner.weight_parameters())},
                           {"params": list(pruner.gate_parameters()), "lr": 0.05}], lr=1e-3)
    y = torch.randint(0, 10, (x.shape[0],))
    for _ in range(2):  # clipped: BatchNorm over 2 samples at low resolution has huge gradients
        m = pruner.train_step(x, y, opt, max_grad_norm=5.0)
        assert all(math.isfinite(v) for v in m.values())
    widths, full = pruner.widths(), pruner.group_channels()
    assert any(w < full[k] for k, w in widths.items())
    model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
    exported = pruner.export()
    assert not any(type(m).__module__.startswith("s2h.") and "models" not in type(m).__module__
                   for m in exported.modules())
    with torch.no_grad():
        out = exported(x)
    assert torch.allclose(out, hard, rtol=1e-5, atol=1e-5 * float(hard.abs().max()))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x)
    assert fc.get_total_flops() / pruner.dense_flops == pytest.approx(
        pruner.hard_flops_ratio(), rel=0.01)
    assert pruner.hard_flops_ratio() < 0.95
    loaded = s2h.load_exported(s2h.save_exported(exported, str(tmp_path / "m")))
    for name, m in loaded.named_modules():  # a runtime switch, not part of the architecture
        if hasattr(m, "fused_attn"):
            m.fused_attn = exported.get_submodule(name).fused_attn
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    return exported


# ------------------------------------------------------------------------ CNN families


def test_mobilenetv3_se_depthwise_hardswish_head(tmp_path):
    model, x = _build("mobilenetv3_small_100", 64)
    pruner, msgs = _prune(model, x)
    groups = {g.name: g for g in pruner.groups}
    assert not msgs  # nothing left unpruned but the classifier output
    # an inverted residual with SE: expansion conv, BatchNormAct2d, depthwise, SE reduce/expand
    g = groups["blocks.2.1.conv_pw"]
    assert set(g.producers) == {"blocks.2.1.conv_pw", "blocks.2.1.se.conv_expand"}
    assert set(g.consumers) == {"blocks.2.1.se.conv_reduce", "blocks.2.1.conv_pwl"}
    assert g.depthwise == ["blocks.2.1.conv_dw"]
    assert set(g.norms) == {"blocks.2.1.bn1", "blocks.2.1.bn2"}
    assert groups["blocks.2.1.se.conv_reduce"].consumers == ["blocks.2.1.se.conv_expand"]
    assert groups["conv_head"].consumers == ["classifier"]  # the conv head is pruned too
    exported = _check_exact(pruner, model, x, tmp_path)
    bn = exported.get_submodule("blocks.2.1.bn1")
    assert type(bn) is timm.layers.BatchNormAct2d and isinstance(bn.act, nn.Hardswish)
    assert bn.num_features == pruner.widths()["blocks.2.1.conv_pw"]


@pytest.mark.slow
def test_mobilenetv3_large(tmp_path):
    model, x = _build("mobilenetv3_large_100", 64)
    pruner, msgs = _prune(model, x)
    assert not msgs
    _check_exact(pruner, model, x, tmp_path)


def test_efficientnet_b0(tmp_path):
    model, x = _build("efficientnet_b0", 64)
    # the SE of the first blocks has 4 channels: divisor 4 lets every group be pruned
    pruner, msgs = _prune(model, x, divisor=4)
    assert not msgs
    assert len(pruner.groups) == 40  # 16 blocks: expansion + SE + 7 stage outputs, stem, head
    _check_exact(pruner, model, x, tmp_path)


def test_convnext_layer_scale_gamma_is_sliced(tmp_path):
    model, x = _build("convnext_atto", 64)
    pruner, msgs = _prune(model, x)
    assert not msgs
    groups = {g.name: g for g in pruner.groups}
    res = groups["stem.0"]  # the stage-0 residual stream: stem, LayerNorm2d, dw convs, gamma
    assert ("stages.0.blocks.0.gamma", 0) in res.params
    assert {"stem.1", "stages.0.blocks.0.norm"} <= set(res.norms)
    exported = _check_exact(pruner, model, x, tmp_path)
    k = pruner.widths()["stem.0"]
    assert exported.stages[0].blocks[0].gamma.shape == (k,)
    assert type(exported.stem[1]) is timm.layers.LayerNorm2d
    assert exported.stem[1].normalized_shape == (k,)
    # nothing of s2h is left on the model after a hard forward (the sliced gamma is temporary)
    assert "gamma" not in model.stages[0].blocks[0].__dict__


@pytest.mark.slow
def test_resnet50_timm(tmp_path):
    model, x = _build("resnet50", 32)
    pruner, _ = _prune(model, x)
    _check_exact(pruner, model, x, tmp_path)


def test_resnet56(tmp_path):
    model, x = _build("resnet56", 16)
    pruner, msgs = _prune(model, x)
    assert not msgs and len(pruner.groups) == 27 + 3  # one per block + 3 residual streams
    _check_exact(pruner, model, x, tmp_path)


def test_wide_resnet_pre_activation_groups(tmp_path):
    """BN-ReLU-conv blocks: a block's first BN normalises the residual stream it reads."""
    model, x = _build("wide_resnet", 16, depth=10, widen_factor=2)
    pruner, msgs = _prune(model, x)
    assert not msgs
    g = {g.name: (sorted(g.producers), sorted(g.consumers), g.norms) for g in pruner.groups}
    assert g == {
        "conv1": (["conv1"], ["layer1.0.conv1", "layer1.0.shortcut"], ["layer1.0.bn1"]),
        "layer1.0.conv1": (["layer1.0.conv1"], ["layer1.0.conv2"], ["layer1.0.bn2"]),
        "layer1.0.conv2": (["layer1.0.conv2", "layer1.0.shortcut"],
                           ["layer2.0.conv1", "layer2.0.shortcut"], ["layer2.0.bn1"]),
        "layer2.0.conv1": (["layer2.0.conv1"], ["layer2.0.conv2"], ["layer2.0.bn2"]),
        "layer2.0.conv2": (["layer2.0.conv2", "layer2.0.shortcut"],
                           ["layer3.0.conv1", "layer3.0.shortcut"], ["layer3.0.bn1"]),
        "layer3.0.conv1": (["layer3.0.conv1"], ["layer3.0.conv2"], ["layer3.0.bn2"]),
        "layer3.0.conv2": (["layer3.0.conv2", "layer3.0.shortcut"], ["fc"], ["bn"]),
    }
    _check_exact(pruner, model, x, tmp_path)


@pytest.mark.slow
def test_wrn28_10(tmp_path):
    model, x = _build("wrn28_10", 16)
    pruner, msgs = _prune(model, x)
    assert not msgs and len(pruner.groups) == 12 + 3 + 1
    _check_exact(pruner, model, x, tmp_path)


# ------------------------------------------------------------------------ transformers


@pytest.mark.parametrize("fused", [True, False])
def test_vit_heads_and_mlp(tmp_path, fused):
    model, x = _build("vit_small_patch16_224", 64, img_size=64)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    pruner, msgs = _prune(model, x)
    # the embedding width is a group too (cls token / position embedding sliced with it:
    # tests/test_embed_width.py)
    assert not any("'cls_token'" in m for m in msgs)
    groups = {g.name: g for g in pruner.groups}
    heads = groups["blocks.0.attn.heads"]
    assert heads.channels == 384 and heads.divisor == 64
    assert pruner.gates["blocks/0/attn/heads"].divisor == 64  # whole heads only
    assert groups["blocks.0.mlp.fc1"].consumers == ["blocks.0.mlp.fc2"]
    assert len(groups) == 25  # 12 blocks x (heads, MLP hidden), the embedding width
    exported = _check_exact(pruner, model, x, tmp_path)
    for i, blk in enumerate(exported.blocks):
        a = blk.attn
        kept = pruner.widths()[f"blocks.{i}.attn.heads"]
        assert type(a) is timm.layers.Attention
        assert a.head_dim == 64 and a.scale == 64 ** -0.5 and a.num_heads == kept // 64
        assert a.qkv.out_features == 3 * kept and a.proj.in_features == kept


def test_attention_hard_path_matches_a_float64_reference():
    """The hard attention equals attention computed by hand on the kept heads' weights."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, num_classes=5, depth=1)
    x = torch.randn(2, 3, 32, 32)
    pruner, _ = _prune(model, x)
    # 2 of 6 heads; the embedding width (a group since issue 18 item 6) whole: full tokens
    pruner.set_widths({"blocks.0.attn.heads": 128, "patch_embed.proj": 384})
    attn = model.blocks[0].attn
    keep = pruner.gates["blocks/0/attn/heads"].keep_index()
    assert keep.numel() == 128
    tokens = torch.randn(2, 5, 384)
    with pruner.mode("hard"), torch.no_grad():
        got = attn(tokens)
    # reference in float64, straight from the definition of multi-head attention
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    t = tokens.double()
    outs = []
    for h in (keep[::64] // 64).tolist():
        sl = slice(h * 64, (h + 1) * 64)
        q = t @ w[sl].T + b[sl]
        k = t @ w[384:][sl].T + b[384:][sl]
        v = t @ w[768:][sl].T + b[768:][sl]
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1)
        outs.append(a @ v)
    ref = torch.cat(outs, -1) @ attn.proj.weight.double()[:, keep].T + attn.proj.bias.double()
    assert torch.allclose(got.double(), ref, atol=1e-4)


@pytest.mark.slow
def test_vit_base(tmp_path):
    model, x = _build("vit_base_patch16_224", 32, img_size=32)
    pruner, _ = _prune(model, x)
    _check_exact(pruner, model, x, tmp_path)


def test_swin_heads_mlp_and_relative_position_bias(tmp_path):
    model, x = _build("swin_tiny_patch4_window7_224", 64, img_size=64, window_size=4)
    pruner, msgs = _prune(model, x)
    # patch merging concatenates 2x2 neighbours along the channels: 4 copies of the stream's
    # group (tests/test_patch_merge.py), no stream is kept whole for it
    assert not any("downsample" in m for m in msgs), msgs
    groups = {g.name: g for g in pruner.groups}
    assert groups["layers.0.blocks.0.attn.heads"].divisor == 32
    assert "layers.3.downsample.reduction" in groups  # the last stage's width is pruned
    exported = _check_exact(pruner, model, x, tmp_path)
    a = exported.layers[1].blocks[0].attn
    kept = pruner.widths()["layers.1.blocks.0.attn.heads"] // 32
    assert a.num_heads == kept and a.relative_position_bias_table.shape[1] == kept


# ------------------------------------------------------------------------ subclasses


def test_batchnormact_hard_path_matches_plain_pytorch():
    torch.manual_seed(0)
    bn = timm.layers.BatchNormAct2d(12, act_layer=nn.Hardswish)
    conv = nn.Conv2d(3, 12, 3, padding=1)
    head = nn.Conv2d(12, 4, 1)
    model = nn.Sequential(conv, bn, head, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(4, 3, 8, 8)
    pruner, _ = _prune(model, x, divisor=4)
    pruner.set_widths({"0": 8})
    keep = pruner.gates["0"].keep_index()
    model.eval()
    with torch.no_grad():
        got = pruner.hard_forward(x)
        h = F.conv2d(x, conv.weight[keep], conv.bias[keep], padding=1)
        h = F.batch_norm(h, bn.hard_running_mean[keep], bn.hard_running_var[keep],
                         bn.weight[keep], bn.bias[keep], False, 0.0, bn.eps)
        ref = F.conv2d(F.hardswish(h), head.weight[:, keep], head.bias).mean((2, 3))
    assert torch.allclose(got, ref, atol=1e-6)


def test_unknown_subclass_is_left_unpruned_with_a_warning_naming_it():
    class MyNorm(nn.BatchNorm2d):
        def forward(self, x):  # mixes channels: must not be treated as channel-wise
            return super().forward(x) + x.mean(1, keepdim=True)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyNorm(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Conv2d(8, 4, 1))
    bad_act = timm.layers.BatchNormAct2d(8, act_layer=nn.PReLU)
    model2 = nn.Sequential(nn.Conv2d(3, 8, 3), bad_act, nn.Conv2d(8, 8, 3), nn.ReLU(),
                           nn.Conv2d(8, 4, 1))
    # the unknown layer's group (conv "0") is left whole; only the group after it is pruned
    for mdl, needle, pruned in ((model, "1 (MyNorm, a subclass of nn.BatchNorm2d", {"3"}),
                                (model2, "1 (BatchNormAct2d, its act (PReLU)", {"2"})):
        pruner, msgs = _prune(mdl, torch.randn(2, 3, 8, 8), divisor=4)
        assert any(needle in m for m in msgs), msgs
        assert set(pruner.widths()) == pruned
