"""ShuffleNetV2's concat + channel shuffle (issue 18, item 1).

The pruned network runs the model's own code at the kept widths: ``chunk(2)`` cuts the kept
stream at its middle and the shuffle interleaves the two halves *by rank*. That routes the kept
channels as the dense network does only for keep sets with an exact balance between the halves
at every block a channel lives through: over all keep sets of a 3-block stage of 4 + 4
channels, none that keeps part of the first block's output the same in both its branches (as
the analysis ties them) routes exactly, and the exact sets of other stages are particular
subsets (6 + 6 channels: branches {1, 3}, then {0, 3}, then {0, 1}) that a gate -- the top
``k`` channels of a fixed importance order -- cannot promise. So the shuffled stream is kept
whole, with a reason naming the reshape, and everything around it -- the stem before the first
shuffle, each branch's inner width, the head -- is pruned. These tests pin that down against a
float64 reference with the shuffle written as a hand-stated channel permutation, and on
torchvision's ``shufflenet_v2_x1_0`` (export exact, FLOPs equal to torch's counter, reloaded by
name).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _exact import check_exact, prune
from torch import nn

#: channel c of ShuffleNet's 2-group shuffle of 8 channels is input channel PERM[c]: the output
#: alternates the first half (0-3) and the second half (4-7)
PERM = [0, 4, 1, 5, 2, 6, 3, 7]


def _shuffle(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``channel_shuffle(x, 2)``."""
    b, c, h, w = x.shape
    return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleNet(nn.Module):
    """stem -> (stride-2 block: two branches, concat, shuffle) -> (stride-1 block: chunk, one
    branch, concat, shuffle) -> head, as ShuffleNetV2 does it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)  # block 0, branch 1
        self.b2a = nn.Conv2d(8, 6, 1)  # block 0, branch 2: 8 -> 6 -> 4
        self.b2b = nn.Conv2d(6, 4, 1)
        self.c_a = nn.Conv2d(4, 6, 1)  # block 1, branch 2 on x2: 4 -> 6 -> 4
        self.c_b = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = _shuffle(torch.cat([self.b1(s), self.b2b(torch.relu(self.b2a(s)))], 1))
        x1, x2 = y.chunk(2, dim=1)
        y = _shuffle(torch.cat([x1, self.c_b(torch.relu(self.c_a(x2)))], 1))
        return self.fc(y.mean((2, 3)))


def _reference(net: ShuffleNet, x: torch.Tensor, keep: dict[str, list[int]]) -> torch.Tensor:
    """float64, the shuffle as the hand-stated PERM, each consumer reading only the kept
    channels of its input (``keep``: group name -> kept channels; others whole)."""
    d = {n: (m.weight.double(), m.bias.double()) for n, m in net.named_children()}

    def conv(name, t, cols=None):
        w, b = d[name]
        if cols is not None:
            w = w[:, cols]
        return F.conv2d(t, w, b, padding=w.shape[-1] // 2)

    ks, kin, kc = keep["stem"], keep["b2a"], keep["c_a"]
    s = torch.relu(conv("stem", x.double()))[:, ks]
    h = torch.relu(conv("b2a", s, ks))[:, kin]
    y = torch.cat([conv("b1", s, ks), conv("b2b", h, kin)], 1)[:, PERM]
    x1, x2 = y[:, :4], y[:, 4:]
    h = torch.relu(conv("c_a", x2))[:, kc]
    y = torch.cat([x1, conv("c_b", h, kc)], 1)[:, PERM]
    return F.linear(y.mean((2, 3)), *d["fc"])


def test_the_hand_stated_permutation_is_torchvisions_shuffle():
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(tv.models.shufflenetv2.channel_shuffle(x, 2), x[:, PERM])
    assert torch.equal(_shuffle(x), x[:, PERM])


def test_small_shuffle_net_prunes_around_the_shuffle_exactly():
    torch.manual_seed(0)
    net = ShuffleNet()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 6, 6)
    pruner, messages = prune(net, x, divisor=2)
    assert {g.name for g in pruner.groups} == {"stem", "b2a", "c_a"}
    frozen = {g.name: g.reasons[0] for g in pruner.analysis.groups if not g.prunable}
    assert set(frozen) == {"b1", "c_b", "fc"}  # the shuffled stream (b1 + b2b, c_b) and output
    assert "merges or splits the channel dim" in frozen["b1"]
    assert any("merges or splits the channel dim" in m for m in messages)
    pruner.set_widths({"stem": 4, "b2a": 2, "c_a": 4})
    keep = {n: pruner.gates[n].keep_index().tolist() for n in ("stem", "b2a", "c_a")}
    assert [len(keep[n]) for n in ("stem", "b2a", "c_a")] == [4, 2, 4]
    ref = _reference(dense, x, keep)
    net.eval()
    with pruner.mode("hard"), torch.no_grad():
        assert torch.allclose(net(x).double(), ref, atol=1e-5)
    exported = check_exact(pruner, net, x, dense, model_fn=ShuffleNet, name="shuffle")
    assert (exported.stem.out_channels, exported.b2a.out_channels, exported.c_a.out_channels,
            exported.b1.out_channels, exported.c_b.out_channels) == (4, 2, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(exported(x).double(), ref, atol=1e-5)


def test_torchvision_shufflenet_v2():
    """The stream of every stage is kept whole (the shuffle), every branch's inner width, the
    stem and conv5 are pruned; >= 95% of the FLOPs scale with a pruned width; the export is
    exact and reloads by torchvision's name."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.shufflenet_v2_x1_0()
    dense = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner, _ = prune(model, x, divisor=8)
    assert pruner.builder["kind"] == "torchvision"
    assert pruner.builder["name"] == "shufflenet_v2_x1_0"
    frozen = {g.name: g.reasons[0] for g in pruner.analysis.groups if not g.prunable}
    stream = {n for n in frozen if n != "fc"}
    assert len(stream) == 16 and all(n.endswith(("branch1.2", "branch2.5")) for n in stream)
    assert all("merges or splits the channel dim" in frozen[n] for n in stream)
    names = {g.name for g in pruner.groups}
    assert {"conv1.0", "conv5.0", "stage3.4.branch2.0"} <= names
    prunable = sum(f for _, f, gates in pruner._flop_terms if gates)
    assert prunable / pruner.dense_flops >= 0.95
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    assert pruner.hard_flops_ratio() < 0.9
    check_exact(pruner, model, x, dense)
