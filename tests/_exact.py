"""Shared checks of the coverage tests: build a pruner recording its warnings, and assert that
an export is exact against independent references (the hard network's outputs, torch's FLOP
counter on the dense model and on the export, a save / load round trip)."""

from __future__ import annotations

import copy
import tempfile
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import s2h
from s2h.export import ExportMismatchWarning


def counted(model, *inputs) -> int:
    """torch's FLOP count of one eval-mode forward (autograd on: nn.MultiheadAttention then
    takes its ordinary, counted path; its no-grad inference fast path is an op the counter
    does not count)."""
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(*inputs)
    finally:
        model.train(was)
    return fc.get_total_flops()


def prune(model, x, divisor=8, target=0.5):
    """``(pruner, warning messages)`` of ``S2HPruner(model, (x,), target, divisor=divisor)``."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, (x,), target, divisor=divisor)
    return pruner, [str(m.message) for m in w]


def check_exact(pruner, model, x, dense, model_fn=None, name="net"):
    """The export equals the hard network (1e-5 of the output's scale, fp32), the pruner's dense
    FLOPs equal the counter's on ``dense``, ``hard_flops_ratio()`` equals the counter's ratio on
    the export (1%), and a save / load round trip gives the same outputs. Returns the export."""
    model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward((x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportMismatchWarning)
        exported = pruner.export()
    with torch.no_grad():
        out = exported(x)
    assert out.shape == hard.shape
    assert float(hard.abs().max()) > 0
    assert torch.allclose(out, hard, rtol=1e-5, atol=1e-5 * float(hard.abs().max()))
    assert pruner.dense_flops == counted(dense, x)
    ratio = counted(exported, x) / pruner.dense_flops
    assert ratio == pytest.approx(pruner.hard_flops_ratio(), rel=0.01)
    with tempfile.TemporaryDirectory() as d:
        if model_fn is None:
            loaded = s2h.load_exported(s2h.save_exported(exported, d))
        else:
            path = s2h.save_exported(exported, d, builder={"kind": "custom", "name": name})
            loaded = s2h.load_exported(path, model_fn=model_fn)
        with torch.no_grad():
            assert torch.equal(loaded(x), out)
    return exported


def random_gates(pruner, seed: int, scale: float = 2.0) -> None:
    """Every gate's logits ``randn * scale`` (seeded): uneven, unbalanced widths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def soft_gate_grads(pruner, x) -> tuple:
    """``(soft output, gate-logit gradients)`` of ``soft_forward(x).square().sum()`` with every
    gate's logits set
    to ``linspace(-0.5, 0.5)`` (every soft mask below 1 somewhere), model in train mode; the
    gradients are cleared afterwards so a reference can be computed from the same gates."""
    with torch.no_grad():
        for gate in pruner.gates.values():
            gate.logits.copy_(torch.linspace(-0.5, 0.5, gate.logits.numel()))
    pruner.model.train()
    out = pruner.soft_forward(x)
    out.square().sum().backward()
    got = {k: g.logits.grad.clone() for k, g in pruner.gates.items()}
    for g in pruner.gates.values():
        g.logits.grad = None
    return out.detach(), got


def lockstep_pair(model, x, divisor):
    """Two pruners of identical copies of ``model``: lockstep (``fused=True``) and two passes
    (``fused=False``), with the same random gate logits (``randn * 1.5``, seed 1)."""
    twin = copy.deepcopy(model)
    a = s2h.S2HPruner(model, x[:2], 0.5, divisor=divisor, fused=True)
    b = s2h.S2HPruner(twin, x[:2], 0.5, divisor=divisor, fused=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pa, pb in zip(a.gate_parameters(), b.gate_parameters(), strict=True):
            pa.copy_(torch.randn(pa.shape, generator=g) * 1.5)
            pb.copy_(pa)
    return a, b


def full_width_matches_dense(pruner, model, dense, x) -> None:
    """With every group at full width, the soft and the hard network both equal ``dense``
    (1e-5)."""
    pruner.set_widths({g.name: g.channels for g in pruner.groups})
    with torch.no_grad():
        ref = dense(x)
        for mode in ("soft", "hard"):
            with pruner.mode(mode):
                assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-5), mode
