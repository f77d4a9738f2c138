"""ShuffleNetV2's concat + channel shuffle (issue 18, item 1).

The model's own code cannot run a pruned stream: ``chunk(2)`` cuts the kept stream at its
middle and the shuffle interleaves the two halves *by rank*, which routes the kept channels as
the dense network does only for keep sets with an exact balance between the halves at every
block a channel lives through -- which no gate can promise. So s2h follows every channel of a
shuffled stream to its own group (a *mixed* group: position -> (group, channel)), and the hard
network and the export run torchvision's ``InvertedResidual`` *routed*: the cut at the kept
width of the first half, the shuffle as a gather of the kept channels
(:class:`s2h.torchvision_support.RoutedInvertedResidual`). A shuffle in code s2h does not
route (a model's own forward) keeps the stream whole, with a reason naming it.

References, independent of the routing code: the dense model's *own* forward in float64 with
each dropped channel silenced where it is made (its BatchNorm's weight and bias zeroed) and
wherever it is normalised again (a marker run of the same dense model, which carries every
channel through its own shuffle, says which), and a hand-stated permutation; torch's FLOP
counter on the export.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _exact import check_exact, counted, full_width_matches_dense, prune, random_gates
from torch import nn

import s2h

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


def test_a_shuffle_in_the_models_own_code_keeps_the_stream_whole():
    """s2h routes only the shuffle of modules it knows (torchvision's ``InvertedResidual``): a
    shuffle written in a model's own forward keeps the shuffled stream whole, with a reason that
    names the shuffle and what s2h routes; everything around it is pruned exactly."""
    torch.manual_seed(0)
    net = ShuffleNet()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 6, 6)
    pruner, messages = prune(net, x, divisor=2)
    assert {g.name for g in pruner.groups} == {"stem", "b2a", "c_a"}
    frozen = {g.name: g.reasons[0] for g in pruner.analysis.groups
              if not g.prunable and g.producers}
    assert set(frozen) == {"b1", "b2b", "c_b", "fc"}  # the shuffled stream and the output
    for name in ("b1", "b2b", "c_b"):
        assert "channel shuffle" in frozen[name] and "InvertedResidual" in frozen[name]
        assert "ShuffleNet's own code" in frozen[name]
    assert any("channel shuffle" in m for m in messages)
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


# ------------------------------------------------------------------ routed (torchvision blocks)
def _tiny_shufflenet():
    """A small ShuffleNetV2 written for the test from torchvision's ``InvertedResidual``: a
    stem, a stage of 3 blocks (8 -> 16), one of 2 (16 -> 24), a 1x1 head, a classifier."""
    tv = pytest.importorskip("torchvision")
    block = tv.models.shufflenetv2.InvertedResidual

    class TinyShuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                       nn.ReLU(inplace=True))
            self.stage2 = nn.Sequential(block(8, 16, 2), block(16, 16, 1), block(16, 16, 1))
            self.stage3 = nn.Sequential(block(16, 24, 2), block(24, 24, 1))
            self.conv5 = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16),
                                       nn.ReLU(inplace=True))
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = self.conv5(self.stage3(self.stage2(self.conv1(x))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    net = TinyShuffle()
    with torch.no_grad():  # BatchNorm statistics and affine terms that matter
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval(), TinyShuffle


def _producer_bn(mods: dict, producer: str) -> nn.BatchNorm2d:
    head, _, idx = producer.rpartition(".")
    bn = mods[f"{head}.{int(idx) + 1}"]
    assert isinstance(bn, nn.BatchNorm2d)
    return bn


@torch.no_grad()
def _silenced_reference(pruner, dense: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense model's own forward (its own chunk and shuffle) in float64 with every channel
    the gates drop silenced: zero BatchNorm weight and bias after its producer, and zero output
    of every other BatchNorm on the channels a marker run marks dropped. The marker run is the
    same dense model with the producers' BatchNorms emitting 1 (kept) or 0 (dropped), depthwise
    weights 1 and the other BatchNorms the identity: a channel reaches a BatchNorm positive iff
    it is kept."""
    mods = dict(dense.named_modules())
    drop = {}  # producer BN name -> dropped channels
    names = {id(m): n for n, m in mods.items()}
    for g in pruner.groups:
        keep = set(pruner.gate_of(g).keep_index().tolist())
        for prod in g.producers:
            drop[names[id(_producer_bn(mods, prod))]] = [c for c in range(g.channels)
                                                         if c not in keep]
    marker = copy.deepcopy(dense).double().eval()
    alive: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in marker.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            if n in drop:
                m.weight.zero_()
                m.bias.fill_(1.0)
                m.bias[drop[n]] = 0.0
            else:
                m.weight.fill_(1.0)
                m.bias.zero_()
                hooks.append(m.register_forward_hook(
                    lambda mod, i, o, n=n: alive.__setitem__(n, i[0].amax((0, 2, 3)) > 0)))
        elif isinstance(m, nn.Conv2d) and m.groups > 1:
            m.weight.fill_(1.0)
    marker(x.double())
    for h in hooks:
        h.remove()
    ref = copy.deepcopy(dense).double().eval()
    for n, m in ref.named_modules():
        if n in drop:
            m.weight[drop[n]] = 0.0
            m.bias[drop[n]] = 0.0
        elif n in alive:
            m.register_forward_hook(
                lambda mod, i, o, n=n: o * alive[n].to(o.dtype).view(1, -1, 1, 1))
    return ref(x.double())


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    """``got`` (fp32) equals the float64 ``ref`` to ``tol`` of the output's scale."""
    return torch.allclose(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_routed_shuffle_prunes_every_branch_output_exactly():
    net, cls = _tiny_shufflenet()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 16, 16)
    pruner, messages = prune(net, x, divisor=2)
    assert not any("left unpruned" in m for m in messages if "fc" not in m), messages
    frozen = {g.name for g in pruner.analysis.groups if g.frozen}
    assert frozen == {"fc"}
    outs = {n for g in pruner.groups for n in g.producers}
    assert {"stage2.0.branch1.2", "stage2.0.branch2.5", "stage2.1.branch2.5",
            "stage2.2.branch2.5", "stage3.0.branch1.2", "stage3.1.branch2.5"} <= outs
    assert set(pruner.analysis.routes) == {f"stage{s}.{b}" for s, n in ((2, 3), (3, 2))
                                           for b in range(n)}
    # mixed groups: every stream position is one channel of one branch output
    mixed = [g for g in pruner.analysis.groups if g.positions]
    assert mixed and all(len(g.positions) == g.channels for g in mixed)
    full_width_matches_dense(pruner, net, dense, x)
    for seed in range(4):  # unbalanced keep sets: the model's own shuffle would misroute them
        random_gates(pruner, seed)
        ref = _silenced_reference(pruner, dense, x)
        with pruner.mode("hard"), torch.no_grad():
            hard = net(x)
        assert _close(hard, ref), seed
        exported = check_exact(pruner, net, x, dense, model_fn=cls, name="tiny_shuffle")
        assert _close(exported(x), ref)
    assert pruner.hard_flops_ratio() < 0.9


def _channel_ids(pruner, dense: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """For every conv / linear of ``dense``: which channel of which gate each of its input
    channels is, found by a marker run of the dense model's own forward (its own shuffle): each
    producer's BatchNorm emits a unique id per channel (``1 + `` a running index), the other
    BatchNorms are exact identities, depthwise convs copy (a centre tap of 1). Returns layer name
    -> ``(C_in,)`` ids (0: not a gated channel)."""
    mods = dict(dense.named_modules())
    names = {id(m): n for n, m in mods.items()}
    ids: dict[str, list[float]] = {}
    nxt = 1
    for g in pruner.groups:
        for prod in g.producers:
            ids[names[id(_producer_bn(mods, prod))]] = [float(nxt + c) for c in range(g.channels)]
        nxt += g.channels
    marker = copy.deepcopy(dense).double().eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    with torch.no_grad():
        for n, m in marker.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.eps = 0.0
                m.weight.fill_(0.0 if n in ids else 1.0)
                m.bias.copy_(torch.tensor(ids[n]) if n in ids else torch.zeros_like(m.bias))
            elif isinstance(m, nn.Conv2d) and m.groups > 1:
                m.weight.zero_()
                m.weight[:, :, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1.0
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                dim = 1 if isinstance(m, nn.Conv2d) else -1

                def hook(mod, args, n=n, dim=dim):
                    t = args[0].movedim(dim, 0).flatten(1)
                    assert torch.equal(t.amax(1), t.amin(1)) or n == "conv1.0"
                    seen[n] = t[:, 0].clone()
                hooks.append(m.register_forward_pre_hook(hook))
        marker(torch.zeros_like(x, dtype=torch.float64))
    for h in hooks:
        h.remove()
    return seen


def test_routed_shuffle_soft_path_masks_each_channel_by_its_own_gate():
    """The soft network (full width, each consumer's input channels times their gate's soft
    mask) equals the dense model's own forward in float64 with each conv / linear input
    multiplied by the soft mask of the channel the marker run finds there; the gate gradients
    of a loss on it equal the reference's (autograd through each gate's own ``soft_mask()``)."""
    net, _ = _tiny_shufflenet()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 16, 16)
    pruner, _ = prune(net, x, divisor=2)
    random_gates(pruner, 3, scale=1.0)
    seen = _channel_ids(pruner, dense, x)
    masks = [pruner.gate_of(g).soft_mask().double() for g in pruner.groups]
    flat = torch.cat([torch.ones(1, dtype=torch.float64)] + masks)  # id 0: no gate
    ref_model = copy.deepcopy(dense).double().eval()
    for n, m in ref_model.named_modules():
        if n in seen and bool((seen[n] > 0).any()):
            dim = 1 if isinstance(m, nn.Conv2d) else -1
            idx = seen[n].long()

            def pre(mod, args, idx=idx, dim=dim):
                shape = [1] * args[0].dim()
                shape[dim] = -1
                return (args[0] * flat[idx].view(shape),)
            m.register_forward_pre_hook(pre)
    ref = ref_model(x.double())
    ref.square().sum().backward()
    want = [pruner.gate_of(g).logits.grad.clone() for g in pruner.groups]
    for g in pruner.groups:
        pruner.gate_of(g).logits.grad = None
    net.eval()
    out = pruner.soft_forward(x)
    assert _close(out.detach(), ref.detach())
    out.square().sum().backward()
    for g, w in zip(pruner.groups, want, strict=True):
        got = pruner.gate_of(g).logits.grad.double()
        w = w.double()
        assert torch.allclose(got, w, rtol=1e-3, atol=1e-4 * float(w.abs().max()) + 1e-8), g.name


def test_the_model_own_shuffle_would_misroute_the_kept_channels():
    """The check above can fail: the same hard network with the routing taken away (the
    blocks' own chunk and shuffle on the kept channels) does not match the reference."""
    net, _ = _tiny_shufflenet()
    dense = copy.deepcopy(net)
    x = torch.randn(2, 3, 16, 16)
    pruner, _ = prune(net, x, divisor=2)
    random_gates(pruner, 0)
    ref = _silenced_reference(pruner, dense, x)
    routes, pruner.runtime.routes = pruner.runtime.routes, []
    try:
        with pruner.mode("hard"), torch.no_grad():
            try:
                wrong = net(x)
            except RuntimeError:  # widths the model's own code cannot even cut
                wrong = None
    finally:
        pruner.runtime.routes = routes
    assert wrong is None or not _close(wrong, ref, 1e-3)


def test_routed_shuffle_trains_and_its_flops_are_the_counters():
    """Train steps run (the routing follows the widths as they move); the differentiable FLOPs
    ratio has the hard network's value and a gradient for every gate, and the hard ratio is
    torch's count on the export."""
    net, _ = _tiny_shufflenet()
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 5, (4,))
    pruner, _ = prune(net, x[:2], divisor=2, target=0.4)
    opt = torch.optim.SGD([{"params": list(pruner.weight_parameters()), "lr": 0.01},
                           {"params": list(pruner.gate_parameters()), "lr": 0.5}])
    net.train()
    widths = []
    for seed in range(4):  # other widths each step: the routing follows them
        random_gates(pruner, seed, scale=1.0)
        widths.append(pruner.widths())
        stats = pruner.train_step(x, y, opt)
        assert all(v == v for v in stats.values() if isinstance(v, float))  # no NaN
    assert len({tuple(w.values()) for w in widths}) == 4
    for gate in pruner.gates.values():
        gate.logits.grad = None
    ratio = pruner.soft_flops_ratio()
    assert float(ratio.detach()) == pytest.approx(pruner.hard_flops_ratio(), rel=1e-5)
    ratio.backward()
    grads = [g.logits.grad for g in pruner.gates.values()]
    assert all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
    net.eval()
    exported = pruner.export()
    assert counted(exported, x[:2]) / pruner.dense_flops == pytest.approx(
        pruner.hard_flops_ratio(), rel=0.01)


def test_routed_shuffle_refuses_lockstep():
    net, _ = _tiny_shufflenet()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="channel shuffle"):
        s2h.S2HPruner(net, (x,), 0.5, divisor=2, fused=True)


def test_torchvision_shufflenet_v2():
    """Every group but the classifier's output is pruned, the 16 shuffled streams included
    (each branch output its own group); the hard network equals the silenced dense reference;
    the export is exact, its FLOPs are the counter's, and it reloads by torchvision's name."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.shufflenet_v2_x1_0()
    dense = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner, messages = prune(model, x, divisor=8)
    assert pruner.builder["kind"] == "torchvision"
    assert pruner.builder["name"] == "shufflenet_v2_x1_0"
    assert {g.name for g in pruner.analysis.groups if g.frozen} == {"fc"}
    assert not any("left unpruned" in m and "fc" not in m for m in messages)
    names = {g.name for g in pruner.groups}
    assert {"conv1.0", "conv5.0", "stage3.4.branch2.0", "stage2.0.branch1.2",
            "stage4.3.branch2.5"} <= names
    assert len(pruner.analysis.routes) == 16
    prunable = sum(f for _, f, gates in pruner._flop_terms if gates)
    assert prunable / pruner.dense_flops >= 0.99
    random_gates(pruner, 0)
    assert pruner.hard_flops_ratio() < 0.9
    model.eval()
    ref = _silenced_reference(pruner, dense, x)
    with pruner.mode("hard"), torch.no_grad():
        assert _close(model(x), ref)
    exported = check_exact(pruner, model, x, dense)
    assert exported.stage3[4].branch2[0].in_channels < 116


def test_saved_routing_is_checked_on_load(tmp_path):
    """architecture.json's routed blocks: saved as integers, reloaded into the same outputs; an
    order that is not a permutation, a split beyond the width or a class that is not a
    registered router is refused."""
    import json

    net, cls = _tiny_shufflenet()
    x = torch.randn(2, 3, 16, 16)
    pruner, _ = prune(net, x, divisor=2)
    random_gates(pruner, 1)
    exported = pruner.export()
    path = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom",
                                                                    "name": "tiny"})
    arch_file = tmp_path / "m" / "architecture.json"
    arch = json.loads(arch_file.read_text())
    assert set(arch["routed"]) == set(pruner.analysis.routes)
    spec = arch["routed"]["stage2.1"]
    assert spec["type"] == "s2h.torchvision_support.RoutedInvertedResidual"
    assert spec["split"] == exported.stage2[1].s2h_split
    loaded = s2h.load_exported(path, model_fn=cls)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))
    for bad, match in [({"order": spec["order"][:-1] + spec["order"][:1]}, "permutation"),
                       ({"split": len(spec["order"]) + 1}, "exceeds"),
                       ({"type": "torch.nn.modules.container.Sequential"}, "not allowed")]:
        broken = json.loads(json.dumps(arch))
        broken["routed"]["stage2.1"].update(bad)
        arch_file.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            s2h.load_exported(path, model_fn=cls)
