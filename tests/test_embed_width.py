"""The embedding width of a vision transformer as one prunable group (issue 18, item 6).

The residual stream -- the patch embedding conv's output, the class token and the position
embedding (parameters sliced along their channel dim), every LayerNorm on the stream, every
block's q/k/v input columns and output-projection rows, the MLP's input / output, the head's
input -- is one group; attention keeps ``head_dim``. References: the exported model against the
hard network (1e-5, fp32), ``torch.utils.flop_counter`` on the export against
``pruner.hard_flops_ratio()`` (1%), the exported parameters' shapes against the kept widths,
and a save / load round trip.
"""

import copy

import pytest
import torch
from _exact import check_exact, prune
from torch import nn


def _random_init(model):
    """torchvision zero-initialises the head: random weights, so the output depends on them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _stream(pruner, producer):
    groups = [g for g in pruner.groups if producer in g.producers]
    assert len(groups) == 1, [g.name for g in pruner.analysis.groups if producer in g.producers]
    return groups[0]


# ----------------------------------------------------------------------- a small ViT


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln_2(x))))


class TinyViT(nn.Module):
    """Patch conv -> reshape with the width as an attribute (as torchvision's ViT) -> class
    token concat -> + position embedding -> blocks -> LayerNorm -> class token -> head."""

    def __init__(self, d=32, heads=4, hidden=48, layers=2, patch=8, size=32, classes=5):
        super().__init__()
        self.hidden_dim = d
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = x + self.pos_embedding
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x)[:, 0])


def test_small_vit_embedding_width_is_one_group_and_exports_exactly():
    torch.manual_seed(0)
    model = TinyViT()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    pruner, msgs = prune(model, x, divisor=8)
    g = _stream(pruner, "conv_proj")
    assert g.channels == 32
    assert sorted(g.params) == [("class_token", 2), ("pos_embedding", 2)]
    for i in range(2):
        assert f"blocks.{i}.attn" in g.consumers and f"blocks.{i}.fc1" in g.consumers
        assert f"blocks.{i}.fc2" in g.producers and f"blocks.{i}.attn" in g.producers
        assert {f"blocks.{i}.ln_1", f"blocks.{i}.ln_2"} <= set(g.norms)
    assert "head" in g.consumers and "ln" in g.norms
    assert not any("class_token" in m or "pos_embedding" in m for m in msgs)
    assert len(pruner.groups) == 1 + 2 * 2  # the stream, per block heads and MLP hidden
    pruner.set_widths({g.name: 16, "blocks.0.attn.heads": 16, "blocks.1.fc1": 24})
    exported = check_exact(pruner, model, x, dense, model_fn=TinyViT, name="vit")
    assert exported.class_token.shape == (1, 1, 16)
    assert exported.pos_embedding.shape == (1, 17, 16)
    assert exported.conv_proj.out_channels == 16 and exported.hidden_dim == 16
    assert exported.head.in_features == 16 and exported.ln.normalized_shape == (16,)
    a = exported.blocks[0].attn
    assert (a.num_heads, a.head_dim) == (2, 8)  # head_dim kept, two of four heads
    # the kept channels of the class token are the dense one's at the kept indices
    keep = pruner.gate_of(g).keep_index()
    assert torch.equal(exported.class_token.detach(), dense.class_token.detach()[..., keep])


def test_position_embedding_used_elsewhere_keeps_the_stream_whole():
    """A position embedding also added along its channel dim to a tensor kept whole: it could
    not be sliced for one use only, so the stream stays whole."""

    class Twice(TinyViT):
        def forward(self, x):
            y = super().forward(x)
            return y + (self.pos_embedding * 1.0).sum()  # a reduction over the channels

    torch.manual_seed(0)
    model = Twice()
    pruner, _ = prune(model, torch.randn(2, 3, 32, 32))
    assert not any("conv_proj" in g.producers for g in pruner.groups)


# ----------------------------------------------------------------------- real models


def test_torchvision_vit_b_16_embedding_width():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.vit_b_16(weights=None, image_size=64, num_classes=10)
    _random_init(model)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pruner, _ = prune(model, x, divisor=8)
    g = _stream(pruner, "conv_proj")
    assert g.channels == 768
    assert sorted(g.params) == [("class_token", 2), ("encoder.pos_embedding", 2)]
    n_all = sum(1 for grp in pruner.analysis.groups if grp.producers)
    assert (len(pruner.groups), n_all) == (25, 26)  # all but the classifier's output
    pruner.set_widths({g.name: 512})
    pruner.set_widths({grp.name: grp.channels // 2 for grp in pruner.groups
                       if grp is not g and "heads" not in grp.name})
    exported = check_exact(pruner, model, x, dense)
    assert exported.class_token.shape == (1, 1, 512) and exported.hidden_dim == 512
    assert exported.encoder.pos_embedding.shape == (1, 17, 512)
    assert exported.heads.head.in_features == 512
    a = exported.encoder.layers[0].self_attention
    assert a.head_dim == 64


def test_timm_vit_small_embedding_width():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pruner, _ = prune(model, x, divisor=8)
    g = _stream(pruner, "patch_embed.proj")
    assert g.channels == 384
    assert sorted(g.params) == [("cls_token", 2), ("pos_embed", 2)]
    n_all = sum(1 for grp in pruner.analysis.groups if grp.producers)
    assert (len(pruner.groups), n_all) == (25, 26)
    pruner.set_widths({g.name: 256})
    exported = check_exact(pruner, model, x, dense)
    assert exported.cls_token.shape == (1, 1, 256)
    assert exported.pos_embed.shape == (1, 17, 256)
    assert exported.blocks[0].attn.head_dim == 64
    assert exported.head.in_features == 256
