"""A concat along the channel dim (issue 18, item 1): the consumer's input is a sequence of
segments, each owned by the group of its producer, so every producer keeps its own group.

References, independent of the code under test: each model below states by hand which groups'
channels its consumers read, in which order (``SPEC``); from the gates' kept channels the test
builds each consumer's kept input columns (segment offsets in the full tensor) and checks the
exported weights against the dense ones, and the exported model against the dense model in
float64 with every removed column zeroed (removing a channel and zeroing what reads it compute
the same). FLOPs by torch's counter on the export.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _exact import lockstep_pair
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # running statistics that matter
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class TwoConvCat(nn.Module):
    """Two convs concatenated (BN over the concat) into a conv."""

    SPEC = {"c": ["a", "b"], "fc": ["c"]}

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 1)
        self.bn = _bn(20)
        self.c = nn.Conv2d(20, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), torch.relu(self.b(x))], 1)))
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


class DenseBlock(nn.Module):
    """DenseNet-like: each layer reads BN(concat of all earlier features); a final BN over the
    concat of every feature. ``iterative``: ``x = cat([x, new])`` (a concat of a concat)
    instead of torchvision's ``cat(list_of_features)``."""

    SPEC = {"l0_c1": ["conv0"], "l0_c2": ["l0_c1"], "l1_c1": ["conv0", "l0_c2"],
            "l1_c2": ["l1_c1"], "l2_c1": ["conv0", "l0_c2", "l1_c2"], "l2_c2": ["l2_c1"],
            "fc": ["conv0", "l0_c2", "l1_c2", "l2_c2"]}

    def __init__(self, iterative: bool = False) -> None:
        super().__init__()
        self.iterative = iterative
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        c = 8
        for i in range(3):
            setattr(self, f"l{i}_bn1", _bn(c))
            setattr(self, f"l{i}_c1", nn.Conv2d(c, 8, 1))
            setattr(self, f"l{i}_bn2", _bn(8))
            setattr(self, f"l{i}_c2", nn.Conv2d(8, 4, 3, padding=1))
            c += 4
        self.norm5 = _bn(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        feats = [self.conv0(x)]
        cur = feats[0]
        for i in range(3):
            inp = cur if self.iterative else torch.cat(feats, 1)
            h = getattr(self, f"l{i}_c1")(torch.relu(getattr(self, f"l{i}_bn1")(inp)))
            new = getattr(self, f"l{i}_c2")(torch.relu(getattr(self, f"l{i}_bn2")(h)))
            feats.append(new)
            cur = torch.cat([cur, new], 1)
        out = torch.relu(self.norm5(cur if self.iterative else torch.cat(feats, 1)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Inception(nn.Module):
    """Three branches (1x1; 1x1 -> 3x3; max-pool -> 1x1) concatenated into a conv."""

    SPEC = {"b1": ["stem"], "b2a": ["stem"], "b2b": ["b2a"], "b3": ["stem"],
            "out": ["b1", "b2b", "b3"], "fc": ["out"]}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2a = nn.Conv2d(8, 4, 1)
        self.b2b = nn.Conv2d(4, 6, 3, padding=1)
        self.b3 = nn.Conv2d(8, 4, 1)
        self.out = nn.Conv2d(14, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b2b(torch.relu(self.b2a(x))),
                       self.b3(F.max_pool2d(x, 3, 1, 1))], 1)
        return self.fc(torch.relu(self.out(torch.relu(y))).mean((2, 3)))


class Fire(nn.Module):
    """Two SqueezeNet fires: squeeze 1x1, expand 1x1 and 3x3 concatenated, into the next."""

    SPEC = {"s1": ["stem"], "e1a": ["s1"], "e1b": ["s1"], "s2": ["e1a", "e1b"],
            "e2a": ["s2"], "e2b": ["s2"], "head": ["e2a", "e2b"]}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.s1, self.e1a = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 6, 1)
        self.e1b = nn.Conv2d(4, 6, 3, 1, 1)
        self.s2, self.e2a = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 8, 1)
        self.e2b = nn.Conv2d(4, 8, 3, 1, 1)
        self.head = nn.Conv2d(16, 5, 1)

    @staticmethod
    def fire(x, s, ea, eb):
        x = torch.relu(s(x))
        return torch.cat([torch.relu(ea(x)), torch.relu(eb(x))], 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.fire(x, self.s1, self.e1a, self.e1b)
        x = self.fire(F.max_pool2d(x, 2, ceil_mode=True), self.s2, self.e2a, self.e2b)
        return self.head(x).mean((2, 3))


class UNet(nn.Module):
    """A U-Net skip: the upsampled deep features concatenated with the encoder's."""

    SPEC = {"enc2": ["enc1"], "dec": ["enc2", "enc1"], "head": ["dec"]}

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 6, 3, padding=1)
        self.enc2 = nn.Conv2d(6, 8, 3, padding=1)
        self.dec = nn.Conv2d(14, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        e1 = torch.relu(self.enc1(x))
        e2 = torch.relu(self.enc2(F.max_pool2d(e1, 2)))
        up = F.interpolate(e2, scale_factor=2, mode="nearest")
        return self.head(torch.relu(self.dec(torch.cat([up, e1], 1))))


class SameTwice(nn.Module):
    """The same channels concatenated twice, and an unpruned tensor (the image) before them."""

    SPEC = {"c": [3, "a", "a"], "fc": ["c"]}

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(19, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.fc(torch.relu(self.c(torch.cat([x, y, y * 2], 1))).mean((2, 3)))


class TwoCatsAdded(nn.Module):
    """cat([a, b]) + cat([c, d]): the segments at the same offsets become one group each."""

    SPEC = {"e": ["a", "b"], "fc": ["e"]}

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.e = nn.Conv2d(14, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) + torch.cat([self.c(x), self.d(x)], 1)
        return self.fc(torch.relu(self.e(torch.relu(y))).mean((2, 3)))


EXACT = {"two_conv": TwoConvCat, "dense": DenseBlock,
         "dense_iterative": lambda: DenseBlock(iterative=True), "inception": Inception,
         "fire": Fire, "unet": UNet, "same_twice": SameTwice, "two_cats_added": TwoCatsAdded,
         "cat_plus_conv": lambda: CatPlusConv()}


def _setup(make, divisor: int = 2, **kw):
    torch.manual_seed(0)
    model = make().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.5, divisor=divisor, **kw)
    return pruner, dense, x, [str(w.message) for w in caught]


def _keep(pruner, group: str) -> list[int] | None:
    """The kept channels of a group, None if it is not pruned."""
    for g in pruner.groups:
        if g.name == group:
            return [int(i) for i in pruner.gate_of(g).keep_index()]
    return None


def _in_columns(pruner, dense: nn.Module, segments: list) -> tuple[list[int], int]:
    """A consumer's kept input columns by hand: each segment's kept channels at its offset (a
    number is a fixed-width input kept whole; a name, the output of that layer's group; a
    ``(group, width)`` pair, a piece of a split). Returns (columns, full width)."""
    cols, off = [], 0
    for seg in segments:
        if isinstance(seg, tuple):
            seg, width = seg
        else:
            width = seg if isinstance(seg, int) else dense.get_submodule(seg).weight.shape[0]
        keep = None if isinstance(seg, int) else _keep(pruner, seg)
        cols += [off + c for c in (range(width) if keep is None else keep)]
        off += width
    return cols, off


def _zeroed(pruner, dense: nn.Module, spec: dict) -> nn.Module:
    """The dense model (float64) with every removed input column of each consumer zeroed."""
    z = copy.deepcopy(dense).double().eval()
    with torch.no_grad():
        for name, segments in spec.items():
            cols, full = _in_columns(pruner, dense, segments)
            drop = [c for c in range(full) if c not in cols]
            z.get_submodule(name).weight[:, drop] = 0
    return z


def _widths(pruner, step: int) -> dict[str, int]:
    """Uneven widths: group i loses (i + step) % 3 + 1 divisor steps (at least one kept)."""
    out = {}
    for i, g in enumerate(pruner.groups):
        d = pruner.gate_of(g).divisor
        out[g.name] = max(d, g.channels - d * ((i + step) % 3 + 1))
    return out


def _check_exact(pruner, dense, x, spec, rows_spec=None):
    """Export == hard network (fp32), export == the zeroed dense model (float64), sliced weights
    == the dense ones at the hand-built columns (and, for a layer in ``rows_spec`` whose output
    is cut into pieces, rows), FLOPs == torch's counter on the export."""
    pruner.model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        exported = pruner.export(check=False)
        out = exported(x)
    assert torch.allclose(out, hard, atol=1e-5, rtol=0), float((out - hard).abs().max())
    with torch.no_grad():
        ref = _zeroed(pruner, dense, spec)(x.double())
        assert torch.allclose(copy.deepcopy(exported).double()(x.double()), ref, atol=1e-9, rtol=0)
    for name, segments in spec.items():
        cols, _ = _in_columns(pruner, dense, segments)
        rows = _in_columns(pruner, dense, rows_spec[name])[0] if name in (rows_spec or {}) \
            else _keep(pruner, name)
        w = dense.get_submodule(name).weight
        w = w if rows is None else w[rows]
        assert torch.equal(exported.get_submodule(name).weight, w[:, cols]), name
    for name, segments in (rows_spec or {}).items():  # a cut producer fed the input
        if name in spec:
            continue
        rows = _in_columns(pruner, dense, segments)[0]
        assert torch.equal(exported.get_submodule(name).weight,
                           dense.get_submodule(name).weight[rows]), name
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x)
    counted = fc.get_total_flops() / pruner.dense_flops
    assert pruner.hard_flops_ratio() == pytest.approx(counted, rel=1e-9)
    assert counted < 1.0
    return exported


@pytest.mark.parametrize("case", list(EXACT))
def test_concat_is_pruned_by_segments(case):
    pruner, dense, x, msgs = _setup(EXACT[case])
    spec = EXACT[case]().SPEC
    producers = {s for segs in spec.values() for s in segs if isinstance(s, str)}
    assert producers <= set(pruner.widths()), (msgs, sorted(pruner.widths()))
    assert not [m for m in msgs if "left unpruned" in m]
    for step in (0, 1):
        pruner.set_widths(_widths(pruner, step))
        _check_exact(pruner, dense, x, spec)


def test_cats_added_share_groups_pairwise():
    pruner, *_ = _setup(TwoCatsAdded)
    groups = {g.name: g for g in pruner.groups}
    assert set(groups) == {"a", "b", "e"}
    assert set(groups["a"].producers) == {"a", "c"} and set(groups["b"].producers) == {"b", "d"}


def test_soft_path_masks_each_segment_and_its_gradient_reaches_every_gate():
    """Soft mode multiplies the concat by its segments' soft masks: reference = the dense
    model (float64) whose consumer columns are scaled by the gates' own soft masks, by
    autograd to the gate logits."""
    pruner, dense, x, _ = _setup(TwoConvCat)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    gates = {gr.name: pruner.gate_of(gr) for gr in pruner.groups}
    pruner.model.eval()
    with pruner.mode("soft"):
        out = pruner.model(x)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    got = {k: v.logits.grad.clone() for k, v in gates.items()}
    for v in gates.values():
        v.logits.grad = None

    d = copy.deepcopy(dense).double()
    m_ab = torch.cat([gates["a"].soft_mask(), gates["b"].soft_mask()]).double()
    m_c = gates["c"].soft_mask().double()
    xd = x.double()
    y = torch.relu(d.bn(torch.cat([d.a(xd), torch.relu(d.b(xd))], 1)))
    y = torch.relu(F.conv2d(y * m_ab.view(1, -1, 1, 1), d.c.weight, d.c.bias, padding=1))
    ref = F.linear(y.mean((2, 3)) * m_c, d.fc.weight, d.fc.bias)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    (ref * weights.double()).sum().backward()
    for k, v in gates.items():
        assert float(got[k].abs().max()) > 0, k
        assert torch.allclose(got[k].double(), v.logits.grad.double(), atol=1e-5, rtol=1e-4), k


def test_lockstep_dual_forward_equals_two_passes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    a, b = lockstep_pair(DenseBlock().eval(), x, divisor=2)
    assert a.lockstep and not b.lockstep
    sa, ha = a.dual_forward(x)
    sb, hb = b.dual_forward(x)
    assert torch.allclose(sa, sb, atol=1e-5) and torch.allclose(ha, hb, atol=1e-5)
    y = torch.randint(0, 5, (x.shape[0],))
    opts = [torch.optim.SGD([{"params": p.weight_parameters()}, {"params": p.gate_parameters()}],
                            lr=0.1) for p in (a, b)]
    ma, mb = a.train_step(x, y, opts[0]), b.train_step(x, y, opts[1])
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    la, lb = a.gates["l0_c2"].logits.detach(), b.gates["l0_c2"].logits.detach()
    assert torch.allclose(la, lb, atol=1e-5)


# ------------------------------------------------------------------ kept whole, by name


class Shuffle(nn.Module):
    """ShuffleNet's concat + channel shuffle: the shuffle mixes the segments."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


class CatPlusConv(nn.Module):
    """A concat added to a conv's output (a residual): that conv's output channels become the
    same segments, each in the group of the concat's segment at its offset."""

    SPEC = {"c": ["a", "b"], "fc": ["c"]}

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(3, 16, 1)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) + self.d(x)
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


class CatOut(nn.Module):
    """A concat that is the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.s(x))
        return torch.cat([self.a(x), self.b(x)], 1).mean((2, 3))


def test_a_conv_added_to_a_concat_is_cut_by_its_segments():
    pruner, *_ = _setup(CatPlusConv)
    groups = {g.name: g for g in pruner.groups}
    assert set(groups) == {"a", "b", "c"}
    # d's output rows: the first 8 in a's group, the last 8 in b's
    assert groups["a"].producer_ranges == {"d": [(0, 8)]}
    assert groups["b"].producer_ranges == {"d": [(8, 16)]}


@pytest.mark.parametrize("make, reason", [
    (Shuffle, "channel shuffle"),
    (CatOut, "the model output"),
])
def test_concat_kept_whole_with_its_segments(make, reason):
    pruner, dense, x, msgs = _setup(make)
    for name in ("a", "b"):  # (the shuffle in the model's own code: not routed)
        g = next(g for g in pruner.analysis.groups if name in g.producers)
        assert not g.prunable and any(reason in r for r in g.reasons), g.reasons
        # a warning names it (not for the model output, which is never pruned, as expected)
        assert (make is CatOut) != any(f"'{g.name}'" in m and reason in m for m in msgs), msgs
    assert set(pruner.widths()) == {"c"} if make is not CatOut else {"s"}
    pruner.set_widths(_widths(pruner, 0))
    spec = {"fc": ["c"]} if make is not CatOut else {"a": ["s"], "b": ["s"]}
    _check_exact(pruner, dense, x, spec)


# ------------------------------------------------------------------ torchvision models

def _tv(name: str):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if name == "googlenet":
        return tv.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    return getattr(tv.models, name)(weights=None)


def _real(name: str):
    model = _tv(name).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, x, 0.5)
    frozen = [str(w.message) for w in caught if "left unpruned" in str(w.message)]
    return pruner, dense, x, frozen


def _export_matches(pruner, x, max_ratio=0.6):
    """The export equals the hard network, its FLOPs by torch's counter equal
    ``hard_flops_ratio()`` and are below ``max_ratio`` of the dense model's."""
    pruner.model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        exported = pruner.export(check=False)
        out = exported(x)
    assert torch.allclose(out, hard, atol=1e-5 * max(1.0, float(hard.abs().max())), rtol=0)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x)
    counted = fc.get_total_flops() / pruner.dense_flops
    assert pruner.hard_flops_ratio() == pytest.approx(counted, rel=1e-6)
    assert counted < max_ratio
    return exported


def test_squeezenet1_1_fires_are_pruned():
    pruner, dense, x, frozen = _real("squeezenet1_1")
    assert not frozen
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == (25, 26)  # all but the classifier's output
    pruner.set_widths(0.5)
    exported = _export_matches(pruner, x)
    # the next fire's squeeze reads expand1x1's then expand3x3's kept channels
    cols, _ = _in_columns(pruner, dense, ["features.3.expand1x1", "features.3.expand3x3"])
    rows = _keep(pruner, "features.4.squeeze")
    w = dense.features[4].squeeze.weight[rows][:, cols]
    assert torch.equal(exported.features[4].squeeze.weight, w)


@pytest.mark.parametrize("name, counts", [("densenet121", (120, 121)), ("googlenet", (57, 58))])
def test_densenet_and_googlenet_concats_are_pruned(name, counts):
    pruner, dense, x, frozen = _real(name)
    assert not frozen
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == counts
    pruner.set_widths(0.5)
    _export_matches(pruner, x)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    _export_matches(pruner, x)


class CatFlatten(nn.Module):
    """A concat flattened into a classifier: each kept channel of each segment keeps its h*w
    columns (test_flatten.py's case, with segments)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.fc, self.fc2 = nn.Linear(10 * 16, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = F.max_pool2d(torch.cat([self.a(x), self.b(x)], 1), 2).flatten(1)
        return self.fc2(torch.relu(self.fc(y)))


def test_flatten_of_a_concat_keeps_each_segments_columns():
    pruner, dense, x, msgs = _setup(CatFlatten)
    assert set(pruner.widths()) == {"a", "b", "fc"} and not msgs
    pruner.set_widths({"a": 2, "b": 4, "fc": 4})
    channels, _ = _in_columns(pruner, dense, ["a", "b"])
    z = copy.deepcopy(dense).double()
    with torch.no_grad():  # the columns by torch's own (out, C, h, w) view of the weight
        z.fc.weight.view(8, 10, 4, 4)[:, [c for c in range(10) if c not in channels]] = 0
        z.fc2.weight[:, [c for c in range(8) if c not in _keep(pruner, "fc")]] = 0
    pruner.model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        exported = pruner.export(check=False)
        assert torch.allclose(exported(x), hard, atol=1e-5, rtol=0)
    assert exported.fc.in_features == 6 * 16
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x)
    assert pruner.hard_flops_ratio() == pytest.approx(fc.get_total_flops() / pruner.dense_flops,
                                                      rel=1e-9)
    with torch.no_grad():
        assert torch.allclose(copy.deepcopy(exported).double()(x.double()), z(x.double()),
                              atol=1e-9, rtol=0)


def test_batchnorm_after_a_concat_updates_the_kept_statistics_of_each_segment():
    """A hard training forward moves the hard running mean of exactly the kept channels of
    each segment (at their offsets in the full BN), by momentum towards the batch mean of the
    hard network's BN input (hooked), and leaves the others as they were."""
    pruner, dense, x, _ = _setup(TwoConvCat)
    pruner.set_widths({"a": 4, "b": 6, "c": 8})
    kept, _ = _in_columns(pruner, dense, ["a", "b"])
    bn = pruner.model.bn
    before = bn.hard_running_mean.clone()
    seen = []
    h = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    pruner.model.train()
    with torch.no_grad(), pruner.mode("hard"):
        pruner.model(x)
    h.remove()
    assert seen[0].shape[1] == len(kept) == 10
    dropped = [c for c in range(20) if c not in kept]
    assert torch.equal(bn.hard_running_mean[dropped], before[dropped])
    expect = 0.9 * before[kept] + 0.1 * seen[0].mean((0, 2, 3))
    assert torch.allclose(bn.hard_running_mean[kept], expect, atol=1e-6)
    assert torch.equal(bn.running_mean, dense.bn.running_mean)  # the dense statistics stay
    pruner.model.eval()
    with torch.no_grad():
        exported = pruner.export(check=False)
    assert torch.equal(exported.bn.running_mean, bn.hard_running_mean[kept])
