"""STP (s2h.stp): exploration commits, exact export, exact depth removal, the training step."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from s2h.stp import Arch, STPPruner

from _models import ResBlock


class TinyResNet(nn.Module):
    def __init__(self, c=16, blocks=3, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.stage = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
        self.plain = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.plain(self.stage(self.stem(x))).mean((2, 3)))


def _pruner(target=0.6, **kw):
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(8, 3, 8, 8)
    return model, STPPruner(model, x[:2], target, divisor=4, **kw), x


def test_droppable_blocks_are_residual_only():
    _, p, _ = _pruner()
    # stage.0 is the first block of its stage; plain.2 has equal shapes but is no residual
    assert p.blocks == {"stage.1": "stage", "stage.2": "stage"}


def test_commit_takes_the_lowest_kd_candidate():
    _, p, _ = _pruner()
    p._round = [("width", "stem.0"), ("depth", "stage.1"), ("width", "plain.0")]
    p._scores = {("width", "stem.0"): [0.5, 0.4], ("depth", "stage.1"): [0.2, 0.3],
                 ("width", "plain.0"): [0.6]}
    assert p.commit() == ("depth", "stage.1")
    assert p.base.dropped == {"stage.1"}
    assert p.commits[-1]["kd"] == pytest.approx(0.25)


@pytest.mark.slow  # trains until the exploration commits
@pytest.mark.parametrize("scoring", ["probe", "trial"])
def test_exploration_commits_until_the_target_is_met(scoring):
    model, p, x = _pruner(target=0.6, trials=1, expand_prob=0.5, scoring=scoring)
    y = torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.01)
    for _ in range(400):
        p.train_step(x, y, opt)
        if p.explore_done:
            break
    assert p.explore_done and p.hard_flops_ratio() <= 0.6
    ratios = [c["ratio"] for c in p.commits]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)
    assert all(w % 4 == 0 for w in p.widths().values())


def _check_export(model, p, x):
    model.eval()
    with torch.no_grad():
        hard = p.hard_forward(x)
        exported = p.export()
        out = exported(x)
    assert torch.allclose(out, hard, atol=1e-5, rtol=1e-5)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x[:2])
    assert fc.get_total_flops() / p.dense_flops == pytest.approx(p.hard_flops_ratio(), rel=1e-6)
    assert not any(type(m).__module__.startswith("s2h") for m in exported.modules())
    return exported


def test_export_equals_the_chosen_subnetwork_with_widths_and_depth():
    model, p, x = _pruner()
    p.base = Arch(tuple((g, 8 if g != "stem.0" else 12) for g, _ in p.full.widths),
                  frozenset({"stage.2"}))
    exported = _check_export(model, p, x)
    assert isinstance(exported.stage[2], nn.Identity)
    assert exported.stage[0].conv1.in_channels == 12


def test_save_and_load_an_export_with_dropped_blocks(tmp_path):
    import s2h
    from s2h import models

    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    p = STPPruner(model, x, 0.6)
    p.base = p.full.with_dropped("layer2.1").with_dropped("layer3.2")
    exported = p.export()
    d = s2h.save_exported(exported, str(tmp_path / "m"))
    loaded = s2h.load_exported(d)
    assert isinstance(loaded.layer2[1], nn.Identity) and isinstance(loaded.layer3[2], nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported(x))


def test_depth_removal_is_exact():
    model, p, x = _pruner()
    reference = copy.deepcopy(model)  # masked layers drop their gates: a dense copy
    reference.stage[1] = nn.Identity()
    p.base = p.full.with_dropped("stage.1")
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(p.hard_forward(x), reference(x), atol=1e-6)
        # and the full network (the teacher) still runs every block
        assert not torch.allclose(p.soft_forward(x), reference(x), atol=1e-3)
    _check_export(model, p, x)


def _tiny_resnet_forward(model: TinyResNet, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """TinyResNet in plain torch.nn.functional (BatchNorm on batch statistics, as in training),
    with its residual stream (the stem's group) cut to the channels ``keep``."""
    every = slice(None)

    def bn(h, m, k):
        return F.batch_norm(h, None, None, m.weight[k], m.bias[k], True, 0.0, m.eps)

    h = torch.relu(bn(F.conv2d(x, model.stem[0].weight[keep], padding=1), model.stem[1], keep))
    for b in model.stage:
        t = torch.relu(bn(F.conv2d(h, b.conv1.weight[:, keep], padding=1), b.bn1, every))
        h = torch.relu(h + bn(F.conv2d(t, b.conv2.weight[keep], padding=1), b.bn2, keep))
    p0, p2 = model.plain[0], model.plain[2]
    h = F.conv2d(torch.relu(F.conv2d(h, p0.weight[:, keep], p0.bias)), p2.weight, p2.bias)
    return F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)


def _full_sub_kd(model: TinyResNet, x: torch.Tensor):
    """The full network, the sub-network with the stream cut to its 12 most important channels
    (the mean over its producers -- the stem and every block's conv2 -- of the L1 norms of
    their output channels, METHOD §2), and the KL of the second to the first's detached output,
    in plain torch."""
    producers = [model.stem[0]] + [b.conv2 for b in model.stage]
    score = torch.stack([m.weight.detach().abs().sum((1, 2, 3)) for m in producers]).mean(0)
    keep = torch.sort(torch.topk(score, 12).indices).values
    full = _tiny_resnet_forward(model, x, torch.arange(16))
    sub = _tiny_resnet_forward(model, x, keep)
    log_t = torch.log_softmax(full.detach().double(), -1)
    kd = (log_t.exp() * (log_t - torch.log_softmax(sub.double(), -1))).sum(-1).mean()
    return full, sub, kd


@pytest.mark.parametrize("full_weight_after", [0.0, 0.5])
def test_full_weight_after_scales_the_full_networks_loss_once_the_arch_is_fixed(
        full_weight_after):
    """Once the exploration has ended, the step's loss is ``w * CE(full) + KD(base) + CE(base)``
    (the base: here the stream narrowed to its 12 most important channels), checked against
    the plain-functional network's autograd gradients; before, ``w`` is 1 (the test above)."""
    model, p, x = _pruner(expand_prob=0.0, trials=1, full_weight_after=full_weight_after)
    y = torch.randint(0, 5, (8,))
    p.base = p.apply(p.full, ("width", "stem.0"))
    p.explore_done = True
    full, sub, kd = _full_sub_kd(model, x)
    loss = full_weight_after * F.cross_entropy(full, y) + kd + F.cross_entropy(sub, y)
    params = list(p.weight_parameters())
    expected = torch.autograd.grad(loss, params, allow_unused=True)
    opt = torch.optim.SGD(params, lr=0.0)
    seen = []
    opt.step = lambda closure=None: seen.extend(  # capture the gradients the step leaves
        q.grad.clone() if q.grad is not None else None for q in params)
    p.train_step(x, y, opt)
    for got, exp in zip(seen, expected, strict=True):
        if exp is None or float(exp.abs().sum()) == 0:
            assert got is None or float(got.abs().sum()) == 0
        else:
            assert torch.allclose(got, exp, atol=1e-6)


def test_full_weight_after_must_be_non_negative():
    with pytest.raises(ValueError, match="full_weight_after"):
        _pruner(full_weight_after=-0.5)


@pytest.mark.parametrize("label_weight", [0.0, 1.0])  # METHOD §8 and the default
def test_train_step_is_full_on_labels_plus_kd_of_the_subnetwork(label_weight):
    model, p, x = _pruner(expand_prob=0.0, trials=1, label_weight=label_weight)
    y = torch.randint(0, 5, (8,))
    # the first candidate tried: the residual stream (stem.0's group) one divisor step narrower,
    # keeping its 12 most important channels: the mean over its producers (the stem and every
    # block's conv2) of the L1 norms of their output channels (METHOD §2)
    assert p.candidates(p.full)[0] == ("width", "stem.0")
    assert p.apply(p.full, ("width", "stem.0")).width("stem.0") == 12
    full, sub, kd = _full_sub_kd(model, x)
    loss = F.cross_entropy(full, y) + kd + label_weight * F.cross_entropy(sub, y)
    params = list(p.weight_parameters())
    expected = torch.autograd.grad(loss, params, allow_unused=True)

    class Capture(torch.optim.Optimizer):
        def __init__(self, ps):
            super().__init__(ps, {})

        def step(self, closure=None):
            self.seen = [q.grad.clone() if q.grad is not None else None
                         for g in self.param_groups for q in g["params"]]

    opt = Capture(params)
    m = p.train_step(x, y, opt)
    for got, exp in zip(opt.seen, expected, strict=True):
        if exp is None:
            assert got is None or float(got.abs().sum()) == 0
        else:
            assert torch.allclose(got, exp, atol=1e-6)
    assert m["perf"] == pytest.approx(float(F.cross_entropy(full, y)), rel=1e-6)
    assert m["kd"] == pytest.approx(float(kd), rel=1e-4) and m["kd"] > 0
    assert m["exploring"] == 1.0


def test_state_dict_round_trip():
    model, p, x = _pruner()
    p.base = p.full.with_dropped("stage.2").with_width("stem.0", 8)
    state = p.state_dict()
    torch.manual_seed(0)
    q = STPPruner(TinyResNet(), x[:2], 0.6, divisor=4)
    q.load_state_dict(state)
    assert q.base == p.base and q.hard_flops_ratio() == p.hard_flops_ratio()


def test_faster_exploration_options():
    _, p, _ = _pruner(width_step=2, commits_per_round=2)
    p._round = [("width", "stem.0"), ("depth", "stage.1"), ("width", "plain.0")]
    p._scores = {c: [s] for c, s in zip(p._round, (0.3, 0.1, 0.2), strict=True)}
    assert p.commit() == ("depth", "stage.1")
    assert p.base.dropped == {"stage.1"} and p.base.width("plain.0") == 8  # 16 - 2*4
    assert p.base.width("stem.0") == 16
    with pytest.raises(ValueError, match=">= 1"):
        _pruner(trials=0)


@pytest.mark.slow  # a whole (short) CLI training run: about a minute on the CPU
def test_cli_prune_method_stp_and_export(tmp_path, capsys):
    import s2h
    from s2h.cli import main
    from s2h.models import create_model

    out = tmp_path / "run"
    args = ["prune", "--method", "stp", "--dataset", "synthetic", "--batch-size", "16",
            "--steps-per-epoch", "6", "--epochs", "2", "--target-flops", "0.5",
            "--stp-trials", "1", "--stp-width-step", "2", "--eval-batches", "1", "--no-progress",
            "--no-dense-baseline", "--no-latency", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "method stp" in text and "kd" in text and "exported == hard network: True" in text
    assert main(["export", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e")]) == 0

    a = s2h.load_exported(str(out / "exported"))
    b = s2h.load_exported(str(tmp_path / "e"))
    # 12 one-step rounds (probe scoring: one round per --stp-trials step) commit 12 candidates
    # but do not reach 0.5: the exploration is unfinished, so both exports (the run's and `s2h
    # export` of its checkpoint) freeze the architecture and project it onto the budget (issue
    # 13: STP lands on its target like S2H), with the same trained weights and BatchNorm
    # statistics recalibrated on the same training batches
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ck["pruner"]["commits"]) == 12 and not ck["pruner"]["explore_done"]
    assert ck["pruner"]["commits"][-1]["ratio"] > 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["projection"]["needed"] and summary["projection"]["narrowed"]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    flops = []
    for m in (a, b, create_model("resnet20", num_classes=10).eval()):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        flops.append(fc.get_total_flops())
    assert flops[0] == flops[1]
    assert 0.5 - 0.03 <= flops[0] / flops[2] <= 0.5 + 0.005  # torch's counter, dense resnet20


@pytest.mark.slow  # trains until the exploration commits
@pytest.mark.parametrize("scoring, trials", [("probe", 3), ("trial", 1)])
def test_resume_mid_round_continues_the_exploration_exactly(tmp_path, scoring, trials):
    """Two pruners on identical models; one is saved mid-round and restored into a third."""
    kw = {"divisor": 4, "trials": trials, "expand_prob": 0.5, "scoring": scoring}
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    models = [TinyResNet() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    a = STPPruner(models[0], x[:2], 0.6, **kw)
    b = STPPruner(models[1], x[:2], 0.6, **kw)
    oa = torch.optim.SGD(a.weight_parameters(), lr=0.01)
    ob = torch.optim.SGD(b.weight_parameters(), lr=0.01)
    for _ in range(5):  # mid-way through a round
        a.train_step(x, y, oa)
        b.train_step(x, y, ob)
    path = tmp_path / "stp.pt"
    torch.save({"model": models[1].state_dict(), "stp": b.state_dict()}, path)
    ck = torch.load(path, weights_only=True)
    m3 = TinyResNet()
    c = STPPruner(m3, x[:2], 0.6, **kw)
    m3.load_state_dict(ck["model"])
    c.load_state_dict(ck["stp"])
    oc = torch.optim.SGD(c.weight_parameters(), lr=0.01)
    for _ in range(40):
        a.train_step(x, y, oa)
        c.train_step(x, y, oc)
    assert a.commits and [d["name"] for d in a.commits] == [d["name"] for d in c.commits]
    assert a.base == c.base
