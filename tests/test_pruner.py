"""The S2H step (METHOD §4): gradient routing of every term, FLOPs, BatchNorm, export, resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h
from s2h.nn import MaskedBatchNorm2d

from _models import ConcatNet, DepthwiseNet, mlp, plain_cnn


def _randomise_gates(pruner, scale=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in pruner.gate_parameters():
            gate.copy_(torch.randn(gate.shape, generator=g) * scale)


def _cnn_pruner(target=0.5, **kw):
    torch.manual_seed(0)
    model = plain_cnn()
    pruner = s2h.S2HPruner(model, torch.randn(2, 3, 16, 16), target, divisor=4, **kw)
    _randomise_gates(pruner)
    return model, pruner


def _grads(term, params):
    gs = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]


# ------------------------------------------------------- references independent of the pruner
GROUPS = ("0", "3", "6")  # plain_cnn's prunable groups: the outputs of its three convs


def _plain_flops(widths: tuple[int, ...] = (16, 32, 32)) -> int:
    """FlopCounterMode's count of a plain ``plain_cnn`` with these widths (batch 2, 16x16)."""
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        plain_cnn(widths=tuple(widths))(torch.empty(2, 3, 16, 16))
    return fc.get_total_flops()


def _reference_ratio(pruner: s2h.S2HPruner) -> torch.Tensor:
    """The hard network's FLOPs ratio, counted by FlopCounterMode on the plain network of the
    kept widths, with the straight-through gradient ``sum_i dr/dw_i * dE_i/du_i`` (METHOD §4).
    The count is linear in each width on its own, so ``dr/dw_i`` is exactly the count of the
    network one channel wider in group i minus the count at ``w``."""
    dense = _plain_flops()
    widths = [pruner.widths()[k] for k in GROUPS]
    base = _plain_flops(widths)
    r = torch.tensor(base / dense, dtype=torch.float64)
    for i, k in enumerate(GROUPS):
        wider = list(widths)
        wider[i] += 1
        e = pruner.gates[k].expected_width().double()
        r = r + (_plain_flops(wider) - base) / dense * (e - e.detach())
    return r


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per sample, batch mean, written out."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _reference_terms(soft: torch.Tensor, hard: torch.Tensor, y: torch.Tensor, ratio,
                     *, target: float, lam: float, alpha: float,
                     variant: str = "s2h") -> dict[str, torch.Tensor]:
    """METHOD §4's terms by hand: cross-entropy, KL(p_s || p_h) in float64 with the decoupled
    detaches of each variant, lam * (r - T)^2."""
    ls, lh = torch.log_softmax(soft.double(), -1), torch.log_softmax(hard.double(), -1)
    zero = torch.zeros((), dtype=torch.float64)
    terms = {"perf": F.cross_entropy(soft, y), "gap_weights": zero, "gap_gates": zero,
             "resource": lam * (ratio - target) ** 2}
    if variant == "s2h":
        terms["gap_weights"] = alpha * _kl(ls.detach(), lh)
        terms["gap_gates"] = alpha * _kl(ls, lh.detach())
    elif variant == "coupled_gap":
        terms["gap_weights"] = alpha * _kl(ls, lh)
    return terms


def _routed(pruner, x, y, only):
    """Gradients that pruner.backward() gives when only term ``only`` is non-zero."""
    for p in list(pruner.weight_parameters()) + list(pruner.gate_parameters()):
        p.grad = None
    soft, hard = pruner.dual_forward(x)
    terms = pruner.losses(soft, hard, y)
    assert terms["gap_gates"].item() > 1e-4  # soft and hard differ: the test is not vacuous
    terms = {k: (v if k == only else v * 0.0) for k, v in terms.items()}
    pruner.backward(terms)
    w = sum(float(p.grad.abs().sum()) for p in pruner.weight_parameters() if p.grad is not None)
    u = sum(float(p.grad.abs().sum()) for p in pruner.gate_parameters() if p.grad is not None)
    return w, u


def test_gradient_routing_of_every_term():
    model, pruner = _cnn_pruner(resource_mode="quadratic")
    weights, gates = list(pruner.weight_parameters()), list(pruner.gate_parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    w, u = _routed(pruner, x, y, "gap_gates")
    assert w == 0.0 and u > 0  # mask side of the gap: gates only, never weights
    # ... although the term itself does depend on the weights (the routing is what stops it)
    soft, hard = pruner.dual_forward(x)
    t = pruner.losses(soft, hard, y)
    assert sum(float(g.abs().sum()) for g in _grads(t["gap_gates"], weights)) > 0
    w, u = _routed(pruner, x, y, "resource")
    assert w == 0.0 and u > 0  # resource: gates only
    w, u = _routed(pruner, x, y, "perf")
    assert w > 0 and u > 0  # performance: weights and gates through the soft path
    w, u = _routed(pruner, x, y, "gap_weights")
    assert w > 0 and u > 0  # weight side of the gap: weights, and gates through the hard STE

    # gap_weights reaches the weights only through the hard path: with the soft output held
    # fixed its gradient equals that of KL(p_s.detach() || softmax(hard))
    ps = torch.softmax(soft.detach(), -1)
    ref = (ps * (ps.log() - torch.log_softmax(hard, -1))).sum(-1).mean()
    for a, b in zip(_grads(t["gap_weights"], weights), _grads(ref, weights), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # and gap_gates reaches the gates only through the soft path: hard output held fixed
    ph = torch.log_softmax(hard.detach(), -1)
    ls = torch.log_softmax(soft, -1)
    ref = (ls.exp() * (ls - ph)).sum(-1).mean()
    for a, b in zip(_grads(t["gap_gates"], gates), _grads(ref, gates), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


class _Capture(torch.optim.Optimizer):
    """Records the gradients at step() and leaves the parameters alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = None

    def step(self, closure=None):
        self.seen = [None if p.grad is None else p.grad.clone()
                     for g in self.param_groups for p in g["params"]]


def _expected_step(pruner: s2h.S2HPruner, x: torch.Tensor, y: torch.Tensor, *, target: float,
                   lam: float, alpha: float) -> tuple[list[torch.Tensor], dict]:
    """The gradients METHOD §4 routes to (weights, gates), from the hand-written terms: one
    backward of perf + gap_weights + resource to everything, gap_gates to the gates only."""
    weights, gates = list(pruner.weight_parameters()), list(pruner.gate_parameters())
    soft, hard = pruner.dual_forward(x)
    t = _reference_terms(soft, hard, y, _reference_ratio(pruner), target=target, lam=lam,
                         alpha=alpha)
    main = _grads(t["perf"] + t["gap_weights"] + t["resource"], weights + gates)
    mask_side = _grads(t["gap_gates"], gates)
    gate_grads = [a + b for a, b in zip(main[len(weights):], mask_side, strict=True)]
    return main[: len(weights)] + gate_grads, {k: float(v.detach()) for k, v in t.items()}


def test_train_step_applies_exactly_the_routed_gradients():
    model, pruner = _cnn_pruner(resource_mode="quadratic", lam=3.0, alpha=0.7)
    weights, gates = list(pruner.weight_parameters()), list(pruner.gate_parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    expected, terms = _expected_step(pruner, x, y, target=0.5, lam=3.0, alpha=0.7)
    assert abs(terms["resource"]) > 1e-3 and terms["gap_gates"] > 1e-4  # neither is vacuous
    ratio = _plain_flops([pruner.widths()[k] for k in GROUPS]) / _plain_flops()

    opt = _Capture([{"params": weights}, {"params": gates}])
    metrics = pruner.train_step(x, y, opt)
    assert len(opt.seen) == len(expected)
    for got, exp in zip(opt.seen, expected, strict=True):
        got = torch.zeros_like(exp) if got is None else got
        assert torch.allclose(got, exp, atol=1e-6, rtol=1e-5)
    for k in ("perf", "gap_weights", "gap_gates", "resource"):
        assert metrics[k] == pytest.approx(terms[k], rel=1e-5, abs=1e-7), k
    assert metrics["hard_flops_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert metrics["loss"] == pytest.approx(
        terms["perf"] + terms["gap_weights"] + terms["resource"], rel=1e-5)
    for k in ("soft_acc", "hard_acc", "agreement"):
        assert 0.0 <= metrics[k] <= 1.0


def test_hard_path_costs_kept_channels_only_and_gate_backward_skips_weight_grads():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    pruner = s2h.S2HPruner(model, x, 0.35)
    pruner.set_widths(0.35)
    _ = pruner.dual_forward(x)  # warm
    pruner.runtime.prepare(pruner.gates.values())
    with FlopCounterMode(display=False) as fc, pruner.runtime.use("hard"):
        model(x)
    hard_fwd = fc.get_total_flops()
    assert hard_fwd == pytest.approx(pruner.hard_flops_ratio() * pruner.dense_flops, rel=1e-6)

    soft, hard = pruner.dual_forward(x)
    terms = pruner.losses(soft, hard, torch.randint(0, 10, (2,)))
    with FlopCounterMode(display=False) as fc:
        torch.autograd.backward(terms["gap_gates"], inputs=list(pruner.gate_parameters()),
                                retain_graph=True)
    gate_bwd = fc.get_total_flops()
    # activation gradients only: about one forward (a weight gradient would double it)
    assert gate_bwd <= 1.01 * pruner.dense_flops
    assert all(p.grad is None for p in model.parameters())


def _export_case(name):
    torch.manual_seed(0)
    if name == "cnn":
        return plain_cnn(), torch.randn(4, 3, 16, 16)
    if name == "mlp":
        return mlp(), torch.randn(6, 20)
    if name == "depthwise":
        return DepthwiseNet(), torch.randn(4, 3, 8, 8)
    timm = pytest.importorskip("timm")
    return timm.create_model(name, num_classes=10), torch.randn(4, 3, 32, 32)


@pytest.mark.parametrize("name", ["cnn", "mlp", "depthwise", "resnet18", "resnet50"])
def test_export_is_plain_exact_and_counts_the_same_flops(name):
    model, x = _export_case(name)
    dense_shapes = {k: v.shape for k, v in model.named_parameters()}
    pruner = s2h.S2HPruner(model, x[:2], 0.4, divisor=4)
    _randomise_gates(pruner, scale=2.0, seed=3)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01)
    y = torch.randint(0, model(x).shape[-1], (x.shape[0],))
    for _ in range(2):  # moves BN statistics (soft and hard) away from their initial values
        pruner.train_step(x, y, opt)
    widths = pruner.widths()
    assert any(w < pruner.group_channels()[k] for k, w in widths.items())
    assert all(w % 4 == 0 for w in widths.values())
    model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward(x)
    exported = pruner.export()
    assert not any(type(m).__module__.startswith("s2h") for m in exported.modules())
    with torch.no_grad():
        out = exported(x)
    assert torch.allclose(out, hard, rtol=1e-5, atol=1e-5 * float(hard.abs().max()))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        exported(x[:2])
    assert fc.get_total_flops() / pruner.dense_flops == pytest.approx(
        pruner.hard_flops_ratio(), rel=0.01)
    # the original model is left full-size and pruning goes on: every parameter keeps its
    # shape, the exported copy is smaller, and the hard network is unchanged
    assert {k: v.shape for k, v in model.named_parameters()} == dense_shapes
    assert (sum(p.numel() for p in exported.parameters())
            < sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        assert torch.equal(pruner.hard_forward(x), hard)


def test_export_uses_the_hard_networks_batchnorm_statistics():
    model, pruner = _cnn_pruner()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.0)
    for _ in range(3):
        pruner.train_step(x, y, opt)
    bn = model[4]  # its input differs between the soft and the hard network
    assert isinstance(bn, MaskedBatchNorm2d)
    keep = pruner.gates["3"].keep_index()
    exported = pruner.export()
    assert torch.allclose(exported[4].running_mean, bn.hard_running_mean[keep])
    assert not torch.allclose(exported[4].running_mean, bn.running_mean[keep])


def test_soft_flops_ratio_is_differentiable_with_the_hard_value():
    model, pruner = _cnn_pruner()
    assert pruner.dense_flops == _plain_flops()
    assert any(w < c for w, c in zip(pruner.widths().values(),
                                     pruner.group_channels().values(), strict=True))
    r = pruner.soft_flops_ratio()
    ref = _reference_ratio(pruner)  # FlopCounterMode on the plain network of the kept widths
    assert float(r) == pytest.approx(float(ref), rel=1e-6)
    assert pruner.hard_flops_ratio() == pytest.approx(float(ref), rel=1e-6)
    logits = [pruner.gates[k].logits for k in GROUPS]
    got = torch.autograd.grad(r, logits)
    want = torch.autograd.grad(ref, logits)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=1e-7, rtol=1e-5)
    assert all(float(t.abs().sum()) > 0 for t in got)


def test_state_dict_resume_restores_the_same_hard_network(tmp_path):
    model, pruner = _cnn_pruner()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    opt = torch.optim.AdamW([{"params": pruner.weight_parameters()},
                             {"params": pruner.gate_parameters(), "lr": 0.05}], lr=1e-3)
    for _ in range(3):
        pruner.train_step(x, y, opt)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)

    torch.manual_seed(123)
    model2 = plain_cnn()
    pruner2 = s2h.S2HPruner(model2, torch.randn(2, 3, 16, 16), 0.5, divisor=4)
    model2.load_state_dict(ckpt["model"])
    pruner2.load_state_dict(ckpt["pruner"])
    assert pruner2.widths() == pruner.widths()
    model.eval()
    model2.eval()
    with torch.no_grad():
        assert torch.equal(pruner.hard_forward(x), pruner2.hard_forward(x))
        assert torch.equal(pruner.soft_forward(x), pruner2.soft_forward(x))
    with pytest.raises(ValueError, match="does not match this model's groups"):
        s2h.S2HPruner(mlp(), torch.randn(2, 20), 0.5).load_state_dict(ckpt["pruner"])


def test_training_moves_the_hard_network_toward_the_target():
    torch.manual_seed(0)
    model = plain_cnn()
    pruner = s2h.S2HPruner(model, torch.randn(2, 3, 16, 16), 0.4, divisor=4, lam=8.0)
    opt = torch.optim.AdamW([{"params": pruner.weight_parameters(), "lr": 1e-3},
                             {"params": pruner.gate_parameters(), "lr": 0.1, "weight_decay": 0}])
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    start = pruner.hard_flops_ratio()
    for _ in range(40):
        m = pruner.train_step(x, y, opt)
    assert start == 1.0
    assert m["hard_flops_ratio"] < 0.6


def test_train_step_under_bf16_autocast():
    """Under bf16 autocast the step applies the routed gradients of the hand-written terms on
    the bf16 forward, and these are the fp32 step's up to bf16 rounding."""
    model, pruner = _cnn_pruner(resource_mode="quadratic")
    weights, gates = list(pruner.weight_parameters()), list(pruner.gate_parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    kw = {"target": 0.5, "lam": 4.0, "alpha": 1.0}
    fp32, terms32 = _expected_step(pruner, x, y, **kw)
    opt = _Capture([{"params": weights}, {"params": gates}])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, terms = _expected_step(pruner, x, y, **kw)
        m = pruner.train_step(x, y, opt)
    for got, exp in zip(opt.seen, bf16, strict=True):
        assert got is not None and got.dtype == torch.float32
        assert torch.allclose(got, exp, atol=1e-6, rtol=1e-5)
    for k in ("perf", "gap_weights", "gap_gates", "resource"):
        assert m[k] == pytest.approx(terms[k], rel=1e-5, abs=1e-7), k
        assert m[k] == pytest.approx(terms32[k], rel=0.01), k
    # the convolutions did run in bf16: the weight gradients are not the fp32 ones; the gate
    # gradients stay within 1% of them
    nw = len(weights)
    assert not any(torch.equal(a, b) for a, b in zip(bf16[:nw], fp32[:nw], strict=True))
    for a, b in zip(opt.seen[nw:], fp32[nw:], strict=True):
        assert float((a - b).norm()) <= 0.01 * float(b.norm())


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("target", [0, 0.0, -0.1, 1.5, "0.3", float("nan")])
def test_target_flops_out_of_range(target):
    with pytest.raises(ValueError, match="target_flops"):
        s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), target)


def test_example_inputs_that_do_not_run():
    with pytest.raises(ValueError,
                       match=r"example_inputs \(shapes \[\(2, 5, 8, 8\)\]\) do not run"):
        s2h.S2HPruner(plain_cnn(), torch.randn(2, 5, 8, 8), 0.5)


def test_nothing_prunable():
    with pytest.raises(ValueError, match="nothing prunable in Linear"):
        s2h.S2HPruner(nn.Linear(8, 4), torch.randn(2, 8), 0.5)
    with pytest.raises(ValueError, match="nothing prunable"):
        s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), 0.5, ignore=["0", "3", "6"])


def test_divisor_larger_than_a_group():
    with pytest.raises(ValueError, match=r"divisor=128 is larger than every prunable group "
                                         r"\(the widest is '0' with 64 channels"):
        s2h.S2HPruner(mlp(), torch.randn(2, 20), 0.5, divisor=128)
    # larger than one group only: that group is kept whole, with a warning naming it
    with pytest.warns(UserWarning, match=r"group '2' \(48 channels.*narrower than divisor=64"):
        p = s2h.S2HPruner(mlp(), torch.randn(2, 20), 0.5, divisor=64)
    assert set(p.widths()) == {"0"}


def test_nan_loss_stops_before_any_update():
    model, pruner = _cnn_pruner()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1)
    x = torch.randn(8, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(s2h.NonFiniteLossError, match="the perf loss is nan") as exc:
        pruner.train_step(x, torch.randint(0, 10, (8,)), opt)
    assert exc.value.term == "perf"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)


def test_second_pruner_on_the_same_model_is_refused():
    model, _ = _cnn_pruner()
    with pytest.raises(ValueError, match="already has an S2HPruner"):
        s2h.S2HPruner(model, torch.randn(2, 3, 16, 16), 0.5)


def test_recalibrate_bn_sets_hard_stats_from_batches():
    model, pruner = _cnn_pruner()
    batches = [torch.randn(8, 3, 16, 16) * 2 + 1 for _ in range(4)]
    n = pruner.recalibrate_bn(batches)
    assert n == 4
    bn = model[1]
    keep = pruner.gates["0"].keep_index()
    # cumulative average of the batch means of the hard network's first conv output
    conv = model[0]
    with torch.no_grad():
        hs = [F.conv2d(b, conv.weight[keep], conv.bias[keep], padding=1) for b in batches]
    means = [h.mean((0, 2, 3)) for h in hs]
    assert torch.allclose(bn.hard_running_mean[keep], torch.stack(means).mean(0), atol=1e-5)
    # the export carries the recalibrated statistics (mean and unbiased variance, averaged)
    exported = pruner.export()
    variances = [h.var((0, 2, 3)) for h in hs]
    assert torch.allclose(exported[1].running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(exported[1].running_var, torch.stack(variances).mean(0), rtol=1e-4)


@pytest.mark.parametrize("variant", ["no_gap", "coupled_gap", "direct_hard"])
def test_ablation_variants_route_their_terms(variant):
    torch.manual_seed(0)
    model = plain_cnn()
    pruner = s2h.S2HPruner(model, torch.randn(2, 3, 16, 16), 0.5, divisor=4, variant=variant,
                           resource_mode="quadratic")
    _randomise_gates(pruner)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    weights, gates = list(pruner.weight_parameters()), list(pruner.gate_parameters())
    # the reference: the variant's terms by hand (direct_hard: the labels on the hard network)
    if variant == "direct_hard":
        soft = hard = pruner.hard_forward(x)
    else:
        soft, hard = pruner.dual_forward(x)
    t = _reference_terms(soft, hard, y, _reference_ratio(pruner), target=0.5, lam=4.0,
                         alpha=1.0, variant=variant)
    expected = _grads(t["perf"] + t["gap_weights"] + t["resource"], weights + gates)
    opt = _Capture([{"params": weights}, {"params": gates}])
    m = pruner.train_step(x, y, opt)
    assert m["gap_gates"] == 0.0
    for k in ("perf", "gap_weights", "resource"):
        assert m[k] == pytest.approx(float(t[k]), rel=1e-5, abs=1e-7), k
    assert (m["gap_weights"] > 1e-4) == (variant == "coupled_gap")
    for got, exp in zip(opt.seen, expected, strict=True):
        got = torch.zeros_like(exp) if got is None else got
        assert torch.allclose(got, exp, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="variant must be one of"):
        s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), 0.5, variant="nope")


@pytest.mark.parametrize("offset", [-0.2, -0.01, 0.05])
def test_normalized_resource_gradient_matches_the_formula(offset):
    """Default resource_mode="normalized": per gate, the applied gradient is the other terms'
    gradient plus sign(r - T) * ratio * min((r - T)^2 / band^2, 1) * |other| * dr/du / |dr/du|,
    with every piece computed here separately (autograd per term, formula in float64).
    offset = T - r: far below r (fade 1), inside the band (fade 1/4), above r (sign -)."""
    model, pruner = _cnn_pruner()
    r0 = pruner.hard_flops_ratio()
    pruner.target_flops = target = r0 + offset
    pruner.resource_ratio = 1.5
    weights, gates = list(pruner.weight_parameters()), list(pruner.gate_parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    soft, hard = pruner.dual_forward(x)
    t = pruner.losses(soft, hard, y)
    r = float(t["flops_ratio"].detach())
    assert r == pytest.approx(r0)
    g_perf = _grads(t["perf"], weights + gates)
    g_gapw = _grads(t["gap_weights"], weights + gates)
    g_gapu = _grads(t["gap_gates"], gates)
    g_r = _grads(t["flops_ratio"], gates)
    nw = len(weights)
    fade = min((r - target) ** 2 / 0.02 ** 2, 1.0)
    assert fade == pytest.approx({-0.2: 1.0, -0.01: 0.25, 0.05: 1.0}[offset], rel=1e-4)
    sign = 1.0 if r > target else -1.0
    opt = _Capture([{"params": weights}, {"params": gates}])
    pruner.train_step(x, y, opt)
    seen = zip(opt.seen[:nw], g_perf[:nw], g_gapw[:nw], strict=True)
    for i, (got, perf, gw) in enumerate(seen):
        assert torch.allclose(got, perf + gw, atol=1e-6), f"weight {i}"  # no resource term
    moved = 0
    for j, got in enumerate(opt.seen[nw:]):
        other = (g_perf[nw + j] + g_gapw[nw + j] + g_gapu[j]).double()
        dr = g_r[j].double()
        res = sign * 1.5 * fade * other.norm() * dr / dr.norm()
        assert torch.allclose(got.double(), other + res, atol=1e-6, rtol=1e-5), f"gate {j}"
        moved += float(res.norm()) > 0
    assert moved == len(gates)


def test_grad_balance_is_the_normalized_mode():
    with pytest.warns(DeprecationWarning, match="grad_balance"):
        p = s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), 0.5, grad_balance=0.5)
    assert (p.resource_mode, p.resource_ratio) == ("normalized", 0.5)
    with pytest.raises(ValueError, match="grad_balance"):
        s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), 0.5, grad_balance=-1)
    with pytest.raises(ValueError, match="resource_mode"):
        s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), 0.5, resource_mode="nope")


def test_normalized_resource_falls_back_to_the_quadratic_gradient_without_other_gradients():
    """A gate whose other gradients are all zero has nothing to be normalised against: it gets
    the plain 2 λ (r - T) dr/du (here: every other term multiplied by zero)."""
    model, pruner = _cnn_pruner(target=0.3)
    gates = list(pruner.gate_parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for p in list(pruner.weight_parameters()) + gates:
        p.grad = None
    soft, hard = pruner.dual_forward(x)
    t = pruner.losses(soft, hard, y)
    r = float(t["flops_ratio"].detach())
    dr = _grads(t["flops_ratio"], gates)
    terms = {k: (v * 0.0 if k in ("perf", "gap_weights", "gap_gates") else v)
             for k, v in t.items()}
    pruner.backward(terms)
    for g, d in zip(gates, dr, strict=True):
        assert torch.allclose(g.grad.double(), 2 * pruner.lam * (r - 0.3) * d.double(),
                              atol=1e-7, rtol=1e-5)
    assert any(float(g.grad.abs().sum()) > 0 for g in gates)


def test_conv_models_go_channels_last_on_cuda_only():
    """The fused conv kernels are fast in NHWC: on CUDA the pruner (and the trainer, for the
    exported and dense models) converts conv models and image batches to channels-last; on
    the CPU nothing changes, and a model without convs is left alone."""
    from s2h.pruner import channels_last_inputs, use_channels_last

    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
    assert not use_channels_last(cnn, torch.device("cpu"))
    assert cnn[0].weight.is_contiguous()
    assert use_channels_last(cnn, torch.device("cuda"))  # the layout only; no device move
    assert cnn[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not cnn[0].weight.is_contiguous()
    mlp = nn.Sequential(nn.Linear(4, 4))
    assert not use_channels_last(mlp, "cuda")
    x, y = torch.randn(2, 3, 5, 5), torch.randn(2, 3)
    cx, cy = channels_last_inputs((x, y))
    assert cx.is_contiguous(memory_format=torch.channels_last) and torch.equal(cx, x)
    assert cy is y
    p = s2h.S2HPruner(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)),
                      torch.randn(2, 3, 6, 6), 0.5, divisor=4)
    assert not p.channels_last and p.model[0].weight.is_contiguous()


def _scalar_reads(fn) -> list:
    """The per-value host reads (``item`` / ``_local_scalar_dense``: a device sync each on
    CUDA) that ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "item"):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return reads


def _random_gates_pruner():
    torch.manual_seed(0)
    p = s2h.S2HPruner(plain_cnn(), torch.randn(2, 3, 8, 8), 0.5)
    with torch.no_grad():
        for g in p.gate_parameters():
            g.copy_(torch.randn(g.shape) * 2)
    return p


def test_prepare_reads_every_gate_width_in_one_host_transfer():
    """Preparing a step reads the gates' expected widths to the host together (one transfer,
    no per-gate scalar read), and keeps the same channels as each gate's own
    ``hard_width()``."""
    p = _random_gates_pruner()
    assert _scalar_reads(lambda: p.runtime.prepare(p.gates.values(), p.device())) == []
    for gate in p.gates.values():
        assert p.runtime.state(gate).keep.numel() == gate.hard_width()


def test_flops_ratios_read_the_gate_widths_once_and_equal_the_per_gate_form():
    """``soft_flops_ratio`` / ``hard_flops_ratio`` read every gate's width in one transfer (no
    per-gate scalar read) and equal the per-gate form ``flops_ratio(hard_width_ste)`` -- value
    and gate-logit gradients -- and ``flops_ratio(hard_width)``."""
    p = _random_gates_pruner()
    out = {}
    assert _scalar_reads(lambda: out.update(soft=p.soft_flops_ratio(),
                                            hard=p.hard_flops_ratio())) == []
    soft, hard = out["soft"], out["hard"]
    want = p.flops_ratio(lambda g: g.hard_width_ste())
    assert float(soft.detach()) == float(want.detach())
    assert hard == float(p.flops_ratio(lambda g: float(g.hard_width())))
    gates = list(p.gate_parameters())
    for a, b in zip(torch.autograd.grad(soft, gates), torch.autograd.grad(want, gates),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _aten_ops(fn) -> int:
    """How many ATen ops other than views ``fn()`` dispatches (on a GPU, about its kernel
    launches; a view -- a slice, a detach -- launches nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            rets = func._schema.returns
            view = bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write
                                      for r in rets)
            n[0] += not view
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return n[0]


def _deep_cnn(depth: int) -> nn.Sequential:
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 16, 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_soft_flops_ratio_costs_the_same_few_ops_whatever_the_number_of_gates():
    """The step's differentiable FLOPs ratio and the gates' widths are computed for all gates
    at once (``GateBank``): the ops they dispatch, forward and backward, do not grow with the
    number of gates (per gate they were ~4 forward + ~8 backward per use: on a GPU, launches
    of a host-bound step)."""
    counts = []
    for depth in (2, 8):
        torch.manual_seed(0)
        p = s2h.S2HPruner(_deep_cnn(depth), torch.randn(2, 3, 8, 8), 0.5, warn=False)
        gates = list(p.gate_parameters())
        p.soft_flops_ratio()  # the first call builds the FLOPs table's tensors (once)
        fwd = _aten_ops(p.soft_flops_ratio)
        r = p.soft_flops_ratio()
        bwd = _aten_ops(lambda r=r, gates=gates: torch.autograd.grad(r, gates))
        counts.append((len(gates), fwd, bwd, _aten_ops(p.hard_flops_ratio)))
    (g2, *ops2), (g8, *ops8) = counts
    assert g8 >= g2 + 6, counts
    assert ops8 == ops2, counts  # the same ops for 4x the gates (terms differ, not op counts)
    assert max(ops8) <= 40, counts


@pytest.mark.parametrize("autocast", [False, True])
def test_vectorised_flops_ratio_equals_the_per_gate_form_on_concats(autocast):
    """With concat (segmented) gates, random logits, and under bf16 autocast (the widths must
    not be rounded to bf16: 1,000 is not a bf16 value), ``soft_flops_ratio`` equals the
    per-gate ``flops_ratio(hard_width_ste)`` in value and gate gradients, and
    ``hard_flops_ratio`` equals torch's FLOP counter on the exported model."""
    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(2, 3, 8, 8)
    p = s2h.S2HPruner(model, x, 0.5, warn=False)
    assert p._flops_tensors(p.device())[1].shape[0] > 0  # a concat's row: segmented gates
    with torch.no_grad():
        for g in p.gate_parameters():
            g.copy_(torch.randn(g.shape) * 2)
    gates = list(p.gate_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        soft = p.soft_flops_ratio()
        want = p.flops_ratio(lambda g: g.hard_width_ste())
    assert soft.dtype == torch.float32
    assert float(soft) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(torch.autograd.grad(soft, gates), torch.autograd.grad(want, gates),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    exported = p.export()
    with FlopCounterMode(display=False) as fc:
        exported.eval()(x)
    assert p.hard_flops_ratio() == pytest.approx(fc.get_total_flops() / p.dense_flops, rel=1e-9)


def test_gate_bank_expected_widths_equal_each_gates_own():
    from s2h.gates import ChannelGate, GateBank

    torch.manual_seed(0)
    gates = [ChannelGate(c, d, tau=t, name=str(i))
             for i, (c, d, t) in enumerate([(16, 8, 1.0), (64, 8, 0.5), (24, 8, 1.0), (8, 8, 1.0),
                                            (96, 16, 2.0)])]
    with torch.no_grad():
        for g in gates:
            g.logits.normal_()
    bank = GateBank(gates)
    e = bank.expected()
    want = torch.stack([g.expected_width() for g in gates])
    torch.testing.assert_close(e, want, rtol=1e-6, atol=1e-5)
    assert bank.hard_widths() == [g.hard_width() for g in gates]
    w = torch.arange(1.0, 6.0)
    logits = [g.logits for g in gates]
    for a, b in zip(torch.autograd.grad((e * w).sum(), logits, allow_unused=True),
                    torch.autograd.grad((want * w).sum(), logits, allow_unused=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
