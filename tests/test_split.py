"""A split / chunk / slice of the channel dim (issue 18, item 2): the producer's output is a
sequence of pieces, each the channels of a group; the pruned model cuts at the kept widths.

``chunk(n)`` derives the sizes from its input: its pieces are one group (each keeps the same
channels). ``split(x, self.width)`` / ``split(x, self.splits)`` read sizes from a module
attribute, which the hard network and the export set to the kept widths (a split list: one group
per piece). Slices with bounds written as numbers keep the channels whole.

References as in test_concat.py: by-hand kept columns (and rows of the cut producer), the
dense model in float64 with every removed column zeroed, torch's FLOP counter on the export.
"""

import warnings

import pytest
import torch
from test_concat import _bn, _check_exact, _export_matches, _setup, _widths
from torch import nn

import s2h


class Chunk(nn.Module):
    """conv -> BN -> chunk(2): each half into its own conv, concatenated into a conv."""

    P = ("a[0:8]", 8)
    SPEC = {"b": [P], "c": [P], "d": ["b", "c"], "fc": ["d"]}
    ROWS = {"a": [P, P]}

    def __init__(self, how: str = "chunk") -> None:
        super().__init__()
        self.how = how
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), _bn(16)
        self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.d, self.fc = nn.Conv2d(14, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        x1, x2 = y.chunk(2, 1) if self.how == "chunk" else torch.tensor_split(y, 2, dim=1)
        y = torch.cat([self.b(x1), self.c(x2)], 1)
        return self.fc(torch.relu(self.d(y)).mean((2, 3)))


class Res2(nn.Module):
    """Res2Net's block: ``split(out, self.width)``, each piece added to the previous branch's
    output; ``self.scale`` equals the width here and is read by the loop, so only ``width`` may
    be rewritten (the pruner finds it by running both)."""

    G = ("convs.0", 4)
    SPEC = {"convs.0": [G], "convs.1": [G], "convs.2": [G],
            "conv3": [G, G, ("convs.2", 4), G], "fc": ["conv3"]}
    ROWS = {"conv1": [G, G, G, G], "convs.1": [G]}  # convs.1 feeds piece 2: group G

    def __init__(self, width: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.conv1, self.bn1 = nn.Conv2d(3, width * scale, 1), _bn(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1)
                                   for _ in range(scale - 1))
        self.conv3, self.fc = nn.Conv2d(width * scale, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        spx = torch.split(torch.relu(self.bn1(self.conv1(x))), self.width, 1)
        spo, sp = [], spx[0]
        for i in range(self.scale - 1):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = torch.relu(self.convs[i](sp))
            spo.append(sp)
        spo.append(spx[-1])
        return self.fc(torch.relu(self.conv3(torch.cat(spo, 1))).mean((2, 3)))


class CSP(nn.Module):
    """CSPNet's cross stage: ``x.split(self.expand_chs // 2)``, blocks with a residual on one
    half, the halves concatenated into the transition."""

    G = ("b2", 8)
    SPEC = {"b1": [G], "b2": ["b1"], "tb": [G], "tr": [G, "tb"], "fc": ["tr"]}
    ROWS = {"conv_exp": [G, G]}

    def __init__(self) -> None:
        super().__init__()
        self.expand_chs = 16
        self.conv_exp, self.bn = nn.Conv2d(3, 16, 1), _bn(16)
        self.b1, self.b2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.tb, self.tr, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv_exp(x)))
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = xb + self.b2(torch.relu(self.b1(xb)))
        return self.fc(torch.relu(self.tr(torch.cat([xs, self.tb(xb)], 1))).mean((2, 3)))


class Mix(nn.Module):
    """MixNet's mixed conv: ``torch.split(x, self.splits)``, one conv per piece: each piece its
    own group."""

    P0, P1 = ("a[0:4]", 4), ("a[4:16]", 12)
    SPEC = {"p.0": [P0], "p.1": [P1], "d": ["p.0", "p.1"], "fc": ["d"]}
    ROWS = {"a": [P0, P1]}

    def __init__(self) -> None:
        super().__init__()
        self.splits = [4, 12]
        self.a = nn.Conv2d(3, 16, 1)
        self.p = nn.ModuleList([nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(12, 10, 1)])
        self.d, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        xs = torch.split(torch.relu(self.a(x)), self.splits, 1)
        y = torch.cat([c(t) for c, t in zip(self.p, xs, strict=True)], 1)
        return self.fc(torch.relu(self.d(y)).mean((2, 3)))


class Nested(nn.Module):
    """A chunk whose first half is split again (``split(x1, self.w)``): all four quarters are
    one group (the chunk ties its halves, the split its pieces)."""

    A = ("a[0:4]", 4)
    SPEC = {"p": [A], "q": [A], "r": [A, A], "d": ["p", "q", "r"], "fc": ["d"]}
    ROWS = {"a": [A, A, A, A]}

    def __init__(self) -> None:
        super().__init__()
        self.w = 4
        self.a = nn.Conv2d(3, 16, 1)
        self.p, self.q, self.r = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(8, 6, 1)
        self.d, self.fc = nn.Conv2d(18, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        x1, x2 = torch.relu(self.a(x)).chunk(2, 1)
        u, v = x1.split(self.w, 1)
        y = torch.cat([self.p(u), self.q(v), self.r(x2)], 1)
        return self.fc(torch.relu(self.d(y)).mean((2, 3)))


class SK(nn.Module):
    """SKNet's selective kernel: two paths stacked, an attention conv whose output is viewed as
    (paths, C) -- a cut into equal pieces, one group with the paths' outputs -- softmax over the
    paths, weighted sum."""

    P = ("paths.0", 8)
    SPEC = {"paths.0": ["stem"], "paths.1": ["stem"], "fc_reduce": [P],
            "fc_select": ["fc_reduce"], "out": [P], "fc": ["out"]}
    ROWS = {"paths.1": [P], "fc_select": [P, P]}

    def __init__(self) -> None:
        super().__init__()
        self.num_paths = 2
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.paths = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1),
                                    nn.Conv2d(8, 8, 3, padding=2, dilation=2)])
        self.fc_reduce, self.fc_select = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 16, 1)
        self.out, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.stack([torch.relu(p(x)) for p in self.paths], dim=1)
        a = self.fc_select(torch.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, self.num_paths, c // self.num_paths, h, w), dim=1)
        x = (x * a).sum(1)
        return self.fc(torch.relu(self.out(x)).mean((2, 3)))


class MixMix(nn.Module):
    """MixNet's blocks back to back: depthwise convs on a split in three ([8, 8, 8]),
    concatenated, then a split in two ([12, 12]) of the same channels. The middle piece of the
    first and the conv before it are cut at 12 to match: B = B1 + B2, P = A + B1, Q = B2 + C."""

    A, B1, B2, C = ("a[0:8]", 8), ("a[8:12]", 4), ("a[12:16]", 4), ("a[16:24]", 8)
    SPEC = {"pw.0": [A, B1], "pw.1": [B2, C], "d": ["pw.0", "pw.1"], "fc": ["d"]}
    ROWS = {"a": [A, B1, B2, C]}

    def __init__(self) -> None:
        super().__init__()
        self.s1, self.s2 = [8, 8, 8], [12, 12]
        self.a, self.bn = nn.Conv2d(3, 24, 1), _bn(24)
        self.dw = nn.ModuleList(nn.Conv2d(8, 8, k, padding=k // 2, groups=8) for k in (3, 5, 7))
        self.pw = nn.ModuleList([nn.Conv2d(12, 6, 1), nn.Conv2d(12, 10, 1)])
        self.d, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        xs = torch.split(torch.relu(self.a(x)), self.s1, 1)
        y = torch.relu(self.bn(torch.cat([c(t) for c, t in zip(self.dw, xs, strict=True)], 1)))
        ys = torch.split(y, self.s2, 1)
        y = torch.cat([c(t) for c, t in zip(self.pw, ys, strict=True)], 1)
        return self.fc(torch.relu(self.d(y)).mean((2, 3)))


CASES = {"chunk": Chunk, "tensor_split": lambda: Chunk("tensor_split"), "res2": Res2,
         "csp": CSP, "mix": Mix, "nested": Nested, "sk": SK, "mixmix": MixMix}


@pytest.mark.parametrize("case", list(CASES))
def test_split_is_pruned_by_pieces(case):
    pruner, dense, x, msgs = _setup(CASES[case])
    model = CASES[case]()
    assert not [m for m in msgs if "left unpruned" in m], msgs
    names = {s[0] for segs in [*model.SPEC.values(), *model.ROWS.values()] for s in segs
             if isinstance(s, tuple)}
    assert names <= set(pruner.widths()), sorted(pruner.widths())
    for step in (0, 1, 2):
        pruner.set_widths(_widths(pruner, step))
        exported = _check_exact(pruner, dense, x, model.SPEC, model.ROWS)
        # the export cuts at the kept widths: its size attribute says so
        if case == "res2":
            assert exported.width == pruner.widths()["convs.0"] and exported.scale == 4
        elif case == "csp":
            assert exported.expand_chs == 2 * pruner.widths()["b2"]
        elif case == "mix":
            w = pruner.widths()
            assert exported.splits == [w["a[0:4]"], w["a[4:16]"]]
        elif case == "mixmix":
            a, b1, b2, c = (pruner.widths()[n] for n, _ in MixMix.ROWS["a"])
            assert exported.s1 == [a, b1 + b2, c] and exported.s2 == [a + b1, b2 + c]
    # the pruned model itself is untouched (the attributes are set only in hard mode)
    assert getattr(pruner.model, "splits", [4, 12]) == [4, 12]
    assert getattr(pruner.model, "width", 4) == 4


def test_gradients_reach_the_pieces_gates():
    pruner, _, x, _ = _setup(Mix)
    opt = torch.optim.SGD([{"params": pruner.weight_parameters()},
                           {"params": pruner.gate_parameters()}], lr=0.1)
    before = {k: g.logits.detach().clone() for k, g in pruner.gates.items()}
    pruner.train_step(torch.cat([x, x]), torch.tensor([0, 1, 2, 3]), opt)
    for key in ("a[0:4]", "a[4:16]"):
        assert float((pruner.gates[key].logits.detach() - before[key]).abs().max()) > 0, key


class Const(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.how == "getitem":
            y1, y2 = y[:, :8], y[:, 8:]
        elif self.how == "narrow":
            y1, y2 = y.narrow(1, 0, 8), y.narrow(1, 8, 8)
        elif self.how == "split_number":  # a size written as a number
            y1, y2 = y.split(8, 1)
        else:  # chunks of unequal sizes
            y1, y2 = torch.split(y, [8, 8], 1)[0], y[:, 6:14]
        return self.fc(torch.cat([self.b(y1), self.c(y2)], 1).mean((2, 3)))


@pytest.mark.parametrize("how, reason", [
    ("getitem", "bounds written as numbers"), ("narrow", "bounds written as numbers"),
    ("split_number", "not an attribute"), ("overlap", "bounds written as numbers"),
])
def test_cuts_the_pruned_model_could_not_follow_keep_the_channels_whole(how, reason):
    pruner, dense, x, msgs = _setup(lambda: Const(how))
    g = next(g for g in pruner.analysis.groups if g.name == "a")
    assert not g.prunable and any(reason in r for r in g.reasons), g.reasons
    assert any("'a'" in m and reason in m for m in msgs), msgs
    assert set(pruner.widths()) == {"b", "c"}
    pruner.set_widths(_widths(pruner, 0))
    _check_exact(pruner, dense, x, {"fc": ["b", "c"]})


def test_an_attribute_that_is_not_the_split_size_is_left_alone():
    """Res2(width=4, scale=4): both attributes hold 4; rewriting scale would change the loop,
    so the construction check keeps width only (see Res2)."""
    pruner, *_ = _setup(Res2)
    assert [attr for _, attr, _ in pruner.runtime.width_attrs] == ["width"]


# ------------------------------------------------------------------ timm models


@pytest.mark.parametrize("name, counts", [("res2net50_14w_8s", (61, 62)),
                                          ("cspresnet50", (42, 43)),
                                          ("skresnet18", (20, 21)),
                                          ("mixnet_s", (72, 73)),
                                          ("ghostnet_100", (31, 32))])
def test_timm_split_models_are_pruned_exactly(name, counts, tmp_path):
    timm = pytest.importorskip("timm")

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = s2h.S2HPruner(model, x, 0.5)
    n_all = sum(1 for g in pruner.analysis.groups if g.producers)
    assert (len(pruner.groups), n_all) == counts
    g = torch.Generator().manual_seed(1)
    for widths in (0.5, "random"):
        if widths == "random":
            with torch.no_grad():
                for p in pruner.gate_parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 2)
        else:
            pruner.set_widths(widths)
        exported = _export_matches(pruner, x, max_ratio=0.75)
    # save / load: the rebuilt model gets the kept split sizes too
    loaded = s2h.load_exported(s2h.save_exported(exported, str(tmp_path / "m")))
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))


def test_lockstep_is_refused_when_a_split_reads_its_sizes_from_an_attribute():
    """Both halves of a lockstep forward would be cut at the same (full) sizes."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="a split reads its sizes from Mix.splits"):
        s2h.S2HPruner(Mix().eval(), torch.randn(2, 3, 8, 8), 0.5, divisor=2, fused=True)
    pruner = s2h.S2HPruner(Chunk().eval(), torch.randn(2, 3, 8, 8), 0.5, divisor=2, fused=True)
    assert pruner.lockstep  # a chunk follows its input: lockstep works


class C2f(nn.Module):
    """YOLOv8's C2f: ``cv1(x).split((self.c, self.c), 1)``, each new block appended, all
    concatenated into cv2: the sizes are an int attribute, so the two pieces are one group."""

    G = ("cv1[0:4]", 4)
    SPEC = {"m.0": [G], "m.1": ["m.0"], "cv2": [G, G, "m.0", "m.1"], "fc": ["cv2"]}
    ROWS = {"cv1": [G, G]}

    def __init__(self) -> None:
        super().__init__()
        self.c = 4
        self.cv1, self.bn = nn.Conv2d(3, 8, 1), _bn(8)
        self.m = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.cv2, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = list(torch.relu(self.bn(self.cv1(x))).split((self.c, self.c), 1))
        y.extend(torch.relu(m(y[-1])) for m in self.m)
        return self.fc(torch.relu(self.cv2(torch.cat(y, 1))).mean((2, 3)))


def test_split_with_a_tuple_of_an_int_attribute_ties_the_pieces():
    pruner, dense, x, msgs = _setup(C2f)
    assert not [m for m in msgs if "left unpruned" in m], msgs
    assert set(pruner.widths()) == {"cv1[0:4]", "m.0", "m.1", "cv2"}
    assert [a for _, a, _ in pruner.runtime.width_attrs] == ["c"]
    for step in (0, 1):
        pruner.set_widths(_widths(pruner, step))
        exported = _check_exact(pruner, dense, x, C2f.SPEC, C2f.ROWS)
        assert exported.c == pruner.widths()["cv1[0:4]"]


class SliceAttr(nn.Module):
    """DPN-style slices ``y[:, :self.c]`` / ``y[:, self.c:]``: two independent pieces, the bound
    an int attribute (set to the first piece's kept width)."""

    P0, P1 = ("a[0:6]", 6), ("a[6:16]", 10)
    SPEC = {"b": [P0], "c_conv": [P1], "d": ["b", "c_conv"], "fc": ["d"]}
    ROWS = {"a": [P0, P1]}

    def __init__(self) -> None:
        super().__init__()
        self.c = 6
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), _bn(16)
        self.b, self.c_conv = nn.Conv2d(6, 8, 1), nn.Conv2d(10, 8, 1)
        self.d, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = torch.cat([self.b(y[:, :self.c]), self.c_conv(y[:, self.c:])], 1)
        return self.fc(torch.relu(self.d(y)).mean((2, 3)))


def test_slices_bounded_by_an_attribute_are_pieces():
    pruner, dense, x, msgs = _setup(SliceAttr)
    assert not [m for m in msgs if "left unpruned" in m], msgs
    assert {"a[0:6]", "a[6:16]"} <= set(pruner.widths())
    for step in (0, 1, 2):
        pruner.set_widths(_widths(pruner, step))
        exported = _check_exact(pruner, dense, x, SliceAttr.SPEC, SliceAttr.ROWS)
        assert exported.c == pruner.widths()["a[0:6]"]


class QKV1(nn.Module):
    """MobileViT v2's linear attention: ``qkv(y).split([1, self.embed_dim, self.embed_dim])``:
    the 1-channel query (a softmax over the positions) is a piece of constant size, kept whole;
    the key and value pieces are the attribute's size, one group (they multiply each other)."""

    G = ("qkv[1:9]", 8)
    SPEC = {"qkv": ["a"], "out": [G], "fc": ["out"]}
    ROWS = {"qkv": [1, G, G]}

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 8
        self.a = nn.Conv2d(3, 8, 1)
        self.qkv = nn.Conv2d(8, 17, 1)
        self.out, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        q, k, v = self.qkv(torch.relu(self.a(x))).split([1, self.embed_dim, self.embed_dim], 1)
        context = (k * q.flatten(2).softmax(-1).view_as(q)).sum((2, 3), keepdim=True)
        return self.fc(torch.relu(self.out(torch.relu(v) * context)).mean((2, 3)))


def test_split_with_a_constant_piece_and_attribute_pieces():
    pruner, dense, x, msgs = _setup(QKV1)
    assert set(pruner.widths()) == {"a", "qkv[1:9]", "out"}
    query = next(g for g in pruner.analysis.groups if g.name == "qkv[0:1]")
    assert query.frozen and "a piece of constant size" in query.reasons[0]
    assert [a for _, a, _ in pruner.runtime.width_attrs] == ["embed_dim"]
    for step in (0, 1):
        pruner.set_widths(_widths(pruner, step))
        exported = _check_exact(pruner, dense, x, QKV1.SPEC, QKV1.ROWS)
        assert exported.embed_dim == pruner.widths()["qkv[1:9]"] < 8
