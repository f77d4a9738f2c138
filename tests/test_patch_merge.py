"""Swin's patch merging (issue 18, item 6): ``(B, H, W, C) -> (B, H/2, W/2, 2, 2, C) ->
(B, H/2, W/2, 4C)`` (timm: reshape, permute, flatten) holds 4 copies of the stream's channels
one after the other; the merge's LayerNorm and reduction read the stream group's kept channels
4 times (a concat of the same group, ``Group.segments``), so the stream stays one prunable
group. torchvision's PatchMerging concatenates 4 strided slices (the concat rule).

References, independent of the code under test: the exported norm / reduction weights against
the dense ones at the 4 copies of the kept channels (offsets by hand), the soft path and the
gate gradients against the model written by hand in float64 (each layer's input times its
mask, the merge's mask the stream's 4 times), the exported model against the hard network
(1e-5, fp32), torch's FLOP counter on the export against ``hard_flops_ratio()`` (1%), a
save / load round trip, and the real timm / torchvision Swin.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from _exact import check_exact, prune, soft_gate_grads
from torch import nn


class Merge(nn.Module):
    """timm's PatchMerging; ``how``: "flatten" (timm), "minus1" (``reshape(..., -1)``) or
    "number" (the merged width written as ``4 * self.dim``)."""

    def __init__(self, dim, how="flatten"):
        super().__init__()
        self.dim, self.how = dim, how
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5)
        if self.how == "flatten":
            x = x.flatten(3)
        elif self.how == "minus1":
            x = x.reshape(b, h // 2, w // 2, -1)
        else:
            x = x.reshape(b, h // 2, w // 2, 4 * self.dim)
        return self.reduction(self.norm(x))


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinySwin(nn.Module):
    """Patch conv -> NHWC -> LayerNorm -> MLP block -> patch merging -> MLP block -> head."""

    def __init__(self, how="flatten", d=16):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 2, 2)
        self.embed_norm = nn.LayerNorm(d)
        self.block1 = Mlp(d, 24)
        self.merge = Merge(d, how)
        self.block2 = Mlp(2 * d, 40)
        self.norm = nn.LayerNorm(2 * d)
        self.head = nn.Linear(2 * d, 5)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.embed_norm(self.embed(x).permute(0, 2, 3, 1))
        x = self.block2(self.merge(self.block1(x)))
        return self.head(self.norm(x).mean((1, 2)))


def _setup(how="flatten"):
    torch.manual_seed(0)
    model = TinySwin(how)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    pruner, msgs = prune(model, x, divisor=4)
    return pruner, model, dense, x, msgs


def _stream(pruner, producer):
    (g,) = [g for g in pruner.groups if producer in g.producers]
    return g


@pytest.mark.parametrize("how", ["flatten", "minus1"])
def test_patch_merging_reads_four_copies_of_the_stream_group(how):
    pruner, model, dense, x, msgs = _setup(how)
    assert not any("left unpruned" in m for m in msgs), msgs
    stream = _stream(pruner, "embed")
    assert "merge.reduction" in stream.consumers and "block1.fc2" in stream.producers
    merged = next(g for g in pruner.analysis.groups if "merge.norm" in g.norms)
    i = pruner.analysis.groups.index(stream)
    assert merged.segments == [(i, 16)] * 4
    widths = {g.name: g.channels // 2 for g in pruner.groups}
    pruner.set_widths(widths)
    exported = check_exact(pruner, model, x, dense, model_fn=lambda: TinySwin(how))
    assert pruner.hard_flops_ratio() < 0.6
    keep = pruner.gate_of(stream).keep_index()
    cols = torch.cat([keep + j * 16 for j in range(4)])  # the 4 copies, by hand
    out_keep = pruner.gate_of(_stream(pruner, "merge.reduction")).keep_index()
    assert exported.merge.norm.normalized_shape == (32,)
    assert torch.equal(exported.merge.norm.weight, dense.merge.norm.weight[cols])
    assert torch.equal(exported.merge.norm.bias, dense.merge.norm.bias[cols])
    assert torch.equal(exported.merge.reduction.weight,
                       dense.merge.reduction.weight[out_keep][:, cols])


def test_merged_width_written_as_a_number_is_kept_whole():
    pruner, model, dense, x, msgs = _setup("number")
    assert any("merges copies of the channel dim into a width written as a number" in m
               for m in msgs), msgs
    assert not any("embed" in g.producers for g in pruner.groups)
    check_exact(pruner, model, x, dense, model_fn=lambda: TinySwin("number"))


def test_soft_path_and_gate_gradients_match_float64_autograd():
    pruner, model, dense, x, _ = _setup()
    out, got = soft_gate_grads(pruner, (x,))

    def mask(producer):
        return pruner.gate_of(_stream(pruner, producer)).soft_mask().double()

    d = copy.deepcopy(dense).double()
    s1, s2 = mask("embed"), mask("merge.reduction")
    h = d.embed_norm(d.embed(x.double()).permute(0, 2, 3, 1))

    def block(blk, h, s, hidden):
        return h + blk.fc2(F.gelu(blk.fc1(blk.norm(h) * s)) * mask(hidden))

    h = block(d.block1, h, s1, "block1.fc1")
    b, hh, ww, c = h.shape
    m = h.reshape(b, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
    h = d.merge.reduction(d.merge.norm(m) * torch.cat([s1] * 4))
    h = block(d.block2, h, s2, "block2.fc1")
    ref = d.head(d.norm(h).mean((1, 2)) * s2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    ref.square().sum().backward()
    assert all(g.abs().sum() > 0 for g in got.values())
    for k, g in pruner.gates.items():
        torch.testing.assert_close(got[k].double(), g.logits.grad.double(), rtol=1e-4, atol=1e-7)


def _random_gates(pruner, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)


def test_timm_swin_patch_merging_keeps_the_stream_prunable():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10,
                              img_size=64, window_size=4)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pruner, msgs = prune(model, x)
    assert not any("merges or splits the channel dim" in m for m in msgs), msgs
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == (28, 29)  # before: 25 of 29 (3 stages' streams)
    assert sum(f for _, f, gates in pruner._flop_terms if gates) / pruner.dense_flops > 0.999
    for i, c in ((1, 96), (2, 192), (3, 384)):
        merged = next(g for g in pruner.analysis.groups if f"layers.{i}.downsample.norm" in g.norms)
        assert [w for _, w in merged.segments] == [c] * 4
        assert len({s for s, _ in merged.segments}) == 1
    _random_gates(pruner)
    exported = check_exact(pruner, model, x, dense)
    assert pruner.hard_flops_ratio() < 0.9
    ds = exported.layers[1].downsample
    k = pruner.gate_of(_stream(pruner, "patch_embed.proj")).keep_index().numel()
    assert k < 96 and ds.norm.normalized_shape == (4 * k,) and ds.reduction.in_features == 4 * k


def test_torchvision_swin_patch_merging_concat_keeps_the_stream_prunable():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.swin_t(weights=None, num_classes=10)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pruner, msgs = prune(model, x)
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == (28, 29)
    assert sum(f for _, f, gates in pruner._flop_terms if gates) / pruner.dense_flops > 0.999
    merged = next(g for g in pruner.analysis.groups if "features.2.norm" in g.norms)
    assert [w for _, w in merged.segments] == [96] * 4 and len({s for s, _ in merged.segments}) == 1
    _random_gates(pruner)
    exported = check_exact(pruner, model, x, dense)
    k = pruner.gate_of(_stream(pruner, "features.0.0")).keep_index().numel()
    assert k < 96 and exported.features[2].reduction.in_features == 4 * k
