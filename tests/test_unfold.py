"""Channels merged with other dims and split back out (MobileViT's unfold / fold, issue 18):
``(B, C, H, W) -> (B * C * n_h, p_h, n_w, p_w) -> ... -> (B * P, N, C)`` and back. The analysis
follows each dim as a product of atoms, so the channels that reach the transformer's channel dim
are the conv's own, and a reshape that would cut a channel atom keeps them whole.

References, independent of the code under test: a float64 copy of the dense model with every
dropped channel's consumer columns zeroed (removing a channel and zeroing what reads it compute
the same), through the model's own unfold and fold; torch's FLOP counter on the export; timm's
``mobilevit_xxs``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _exact import check_exact, prune, random_gates
from torch import nn


def _unfold(x: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple]:
    """timm MobileVitBlock's unfold: ``(B, C, H, W) -> (B * p * p, N, C)``."""
    b, c, h, w = x.shape
    nh, nw = h // p, w // p
    x = x.reshape(b * c * nh, p, nw, p).transpose(1, 2)
    x = x.reshape(b, c, nh * nw, p * p).transpose(1, 3).reshape(b * p * p, nh * nw, -1)
    return x, (b, c, h, w)


def _fold(x: torch.Tensor, p: int, shape: tuple) -> torch.Tensor:
    b, c, h, w = shape
    nh, nw = h // p, w // p
    x = x.contiguous().view(b, p * p, nh * nw, -1)
    x = x.transpose(1, 3).reshape(b * c * nh, nw, p, p)
    return x.transpose(1, 2).reshape(b, c, h, w)


class Unfolded(nn.Module):
    """conv -> unfold -> token MLP (two linears) -> fold -> conv -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        self.proj = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        t, (b, _, h, w) = _unfold(torch.relu(self.conv(x)), 2)
        t = self.fc2(torch.relu(self.fc1(t)))
        y = torch.relu(self.proj(_fold(t, 2, (b, t.shape[-1], h, w))))
        return self.head(y.mean((2, 3)))


class FoldsWithTheOtherWidth(Unfolded):
    """The fold reads the width of the *unfolded* tensor (conv's group) for the folded one
    (fc2's group): right only while both groups are equally wide."""

    def forward(self, x):
        t, shape = _unfold(torch.relu(self.conv(x)), 2)
        t = self.fc2(torch.relu(self.fc1(t)))
        y = torch.relu(self.proj(_fold(t, 2, shape)))
        return self.head(y.mean((2, 3)))


@torch.no_grad()
def _reference(pruner, dense: Unfolded, x: torch.Tensor) -> torch.Tensor:
    """float64 dense model, each group's dropped channels zeroed in the columns that read
    them (the consumer of each producer stated by hand)."""
    ref = copy.deepcopy(dense).double()
    reader = {"conv": "fc1", "fc1": "fc2", "fc2": "proj", "proj": "head"}
    for g in pruner.groups:
        keep = set(pruner.gate_of(g).keep_index().tolist())
        drop = [c for c in range(g.channels) if c not in keep]
        for prod in g.producers:
            getattr(ref, reader[prod]).weight[:, drop] = 0.0
    return ref(x.double())


def _setup(cls):
    """``(model, dense copy, x, pruner, warnings)`` of ``cls`` at divisor 2."""
    torch.manual_seed(0)
    net = cls()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    pruner, messages = prune(net, x, divisor=2)
    return net, dense, x, pruner, messages


def test_unfold_and_fold_keep_each_channel_its_own():
    net, dense, x, pruner, messages = _setup(Unfolded)
    assert {g.name for g in pruner.groups} == {"conv", "fc1", "fc2", "proj"}, messages
    for seed in range(3):
        random_gates(pruner, seed)
        widths = pruner.widths()
        assert min(widths[n] for n in ("conv", "fc2")) < 8
        ref = _reference(pruner, dense, x)
        with pruner.mode("hard"), torch.no_grad():
            hard = net(x)
        tol = 1e-5 * float(ref.abs().max())
        assert torch.allclose(hard.double(), ref, rtol=1e-5, atol=tol), seed
        exported = check_exact(pruner, net, x, dense, model_fn=Unfolded, name="unfolded")
        assert exported.fc1.in_features == widths["conv"]
        assert exported.proj.in_channels == widths["fc2"]


def test_a_fold_reading_another_groups_width_is_found_at_construction():
    """Narrowing every group by the same step would not show it (conv and fc2 stay equally
    wide): the construction's narrowing runs also narrow groups by different steps, so both
    are kept whole with a warning, and the hard network never fails later."""
    net, dense, x, pruner, messages = _setup(FoldsWithTheOtherWidth)
    kept = {g.name for g in pruner.analysis.groups if g.frozen and g.producers}
    assert {"conv", "fc2"} <= kept and "fc1" not in kept, kept
    assert any("'conv'" in m and "fails when it is narrower" in m for m in messages), messages
    random_gates(pruner, 0)
    with pruner.mode("hard"), torch.no_grad():
        net(x)
    check_exact(pruner, net, x, dense, model_fn=FoldsWithTheOtherWidth, name="folds")


class CutsAChannel(nn.Module):
    """A reshape that splits the channel dim itself inside a merge (``C = 8 -> (2, 4)`` moved
    apart): the channels cannot be followed and are kept whole, with a reason."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.conv(torch.relu(self.conv0(x))))  # (B, 8, H, W)
        b = y.shape[0]
        t = y.reshape(b * 2, 4, -1).transpose(1, 2)  # channels split in 2 x 4, moved apart
        return self.fc(t).mean(1).reshape(b, 2, 5).sum(1)


def test_a_reshape_that_cuts_merged_channels_keeps_them_whole():
    torch.manual_seed(0)
    net = CutsAChannel()
    x = torch.randn(2, 3, 4, 4)
    pruner, messages = prune(net, x, divisor=2)
    conv = next(g for g in pruner.analysis.groups if "conv" in g.producers)
    assert conv.frozen and not conv.prunable
    assert any("'conv'" in m and "merges or splits the channel dim" in m for m in messages)
    assert {g.name for g in pruner.groups} == {"conv0"}


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevitv2_050"])
def test_timm_mobilevit_prunes_its_transformer_width(name):
    """timm's MobileViT: the transformer width of each MobileViT block (conv_1x1's output, the
    unfolded tokens, every norm and projection on them) is pruned, and the block's concat of
    its input with the folded output (v1); v2's one-group norms and its linear attention's key
    and value (``split([1, self.embed_dim, self.embed_dim])``) too, only the 1-channel query
    kept whole. The export is exact and reloads."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    dense = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner, _ = prune(model, x, divisor=8)
    frozen = {g.name for g in pruner.analysis.groups if g.frozen and g.producers}
    if name == "mobilevit_xxs":
        assert frozen == {"head.fc"}
        names = {g.name for g in pruner.groups}
        assert {"stages.2.1.conv_1x1", "stages.3.1.conv_1x1", "stages.4.1.conv_1x1",
                "stages.4.1.conv_proj.conv"} <= names
    else:
        queries = frozen - {"head.fc"}
        assert queries and all(n.endswith("attn.qkv_proj[0:1]") for n in queries), frozen
        assert all(g.channels == 1 for g in pruner.analysis.groups if g.name in queries)
    random_gates(pruner, 0)
    assert pruner.hard_flops_ratio() < 0.9
    exported = check_exact(pruner, model, x, dense)
    blk = exported.stages[2][1]
    if name == "mobilevit_xxs":
        assert blk.transformer[0].attn.qkv.in_features == blk.conv_1x1.out_channels < 64
    else:
        attn = blk.transformer[0].attn
        assert attn.qkv_proj.out_channels == 1 + 2 * attn.embed_dim < 1 + 2 * 64
