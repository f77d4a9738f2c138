"""The CPU S2H step's own costs (issue 16, item 7): the one-pass mask backward, the
straight-through mask without a multiply, and the allocator setting that keeps a step from
faulting in fresh pages. References: float64 autograd of the plain multiply, and the kernel's
page-fault counter (``getrusage``) of a subprocess."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from s2h import ops
from s2h.nn import soft_masked, straight_through

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [  # shape, dim, channels_last
    ((4, 5, 6, 7), 1, False),
    ((4, 5, 6, 7), 1, True),
    ((3, 4, 9), -1, False),
    ((2, 3, 5), 1, False),
    ((8, 16), 1, False),
    ((8, 16), -1, False),
    ((2, 300), -1, False),  # more channels than one task block of the channels-last loop
]


def _reference(x, mask, dim, grad):
    """float64 autograd of ``x * mask`` (mask broadcast along ``dim``)."""
    xr = x.detach().double().requires_grad_(True)
    mr = mask.detach().double().requires_grad_(True)
    view = [1] * x.dim()
    view[dim] = -1
    (xr * mr.view(view)).backward(grad.double())
    return xr.grad, mr.grad


def _inputs(shape, dim, channels_last, dtype):
    g = torch.Generator().manual_seed(hash((shape, dim)) % 1000)
    x = torch.randn(shape, generator=g, dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        grad = grad.to(memory_format=torch.channels_last)
    mask = torch.rand(shape[dim], generator=g)
    return x, grad, mask


@pytest.mark.parametrize("extension", [True, False], ids=["ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-cl{int(c[2])}")
def test_soft_mask_backward_matches_float64_autograd(case, dtype, extension, monkeypatch):
    if extension and not ops._HAS_MASK_OP:
        pytest.skip("s2h._C without channel_mask_backward")
    monkeypatch.setattr(ops, "_HAS_MASK_OP", extension and ops._HAS_MASK_OP)
    shape, dim, cl = case
    x, grad, mask = _inputs(shape, dim, cl, dtype)
    x.requires_grad_(True)
    mask.requires_grad_(True)
    y = soft_masked(x, mask, dim)
    ref_gx, ref_gm = _reference(x, mask, dim, grad)
    view = [1] * x.dim()
    view[dim] = -1
    assert torch.equal(y, x.detach() * mask.detach().to(dtype).view(view))
    y.backward(grad)
    assert torch.allclose(x.grad.double(), ref_gx, rtol=1e-6, atol=1e-6)
    assert torch.allclose(mask.grad.double(), ref_gm, rtol=1e-5, atol=1e-5)
    if cl:
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-cl{int(c[2])}")
def test_straight_through_mask_is_x_with_the_multiplys_gradients(case):
    shape, dim, cl = case
    x, grad, u = _inputs(shape, dim, cl, torch.float32)
    x.requires_grad_(True)
    u.requires_grad_(True)
    hard = u + (1.0 - u).detach()  # value 1, gradient to u: ChannelGate.hard_mask
    y = straight_through(x, hard, dim)
    assert torch.equal(y, x.detach())  # no multiply by a mask that is 1 up to rounding
    y.backward(grad)
    ref_gx, ref_gu = _reference(x, torch.ones_like(u), dim, grad)
    assert torch.equal(x.grad, grad)
    assert torch.allclose(u.grad.double(), ref_gu, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ref_gx.float(), grad)
    # without a gradient to the gates (the freeze phase) it is x itself
    assert straight_through(x, hard.detach(), dim) is x


@pytest.mark.skipif(not ops._HAS_MASK_OP, reason="s2h._C without channel_mask_backward")
def test_channel_mask_backward_opcheck_and_errors():
    x, grad, mask = _inputs((2, 3, 4, 5), 1, False, torch.float32)
    for need in (True, False):
        torch.library.opcheck(torch.ops.s2h.channel_mask_backward, (grad, x, mask, 1, need))
    gx, gm = torch.ops.s2h.channel_mask_backward(grad, x, mask, 1, False)
    assert gx.numel() == 0 and gm.shape == (3,)
    with pytest.raises(RuntimeError, match="mask must be"):
        torch.ops.s2h.channel_mask_backward(grad, x, mask[:2], 1, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.s2h.channel_mask_backward(grad.half(), x.half(), mask.half(), 1, True)


def test_masked_conv_gate_gradients_unchanged_by_the_one_pass_backward(monkeypatch):
    """A pruned model's gate gradients (soft and hard paths, both backward passes of a step)
    are the same with the extension's one-pass backward and with plain torch ops."""
    import s2h
    from s2h import models

    def grads(extension):
        monkeypatch.setattr(ops, "_HAS_MASK_OP", extension)
        torch.manual_seed(0)
        model = models.create_model("resnet20", num_classes=10, in_chans=1)
        pr = s2h.S2HPruner(model, torch.randn(2, 1, 28, 28), 0.4, warn=False)
        with torch.no_grad():
            for i, g in enumerate(pr.gate_parameters()):
                g.copy_(torch.linspace(-1, 1, g.numel()) * (i % 3 - 1))
        opt = torch.optim.SGD([{"params": list(pr.weight_parameters())},
                               {"params": list(pr.gate_parameters())}], lr=0.0)
        x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        y = torch.arange(8) % 10
        pr.train_step(x, y, opt)
        return [g.grad.clone() for g in pr.gate_parameters()], \
            [p.grad.clone() for p in pr.weight_parameters() if p.grad is not None]

    if not ops._HAS_MASK_OP:
        pytest.skip("s2h._C without channel_mask_backward")
    gates_ext, weights_ext = grads(True)
    gates_ref, weights_ref = grads(False)
    for a, b in zip(gates_ext, gates_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(weights_ext, weights_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import torch
    sys.path.insert(0, {root!r})
    import s2h
    from s2h import models
    from s2h.cpu import tune_allocator
    state = tune_allocator() if sys.argv[1] == "tuned" else {{"tuned": False}}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=10, in_chans=1)
    pr = s2h.S2HPruner(model, torch.randn(2, 1, 28, 28), 0.39, warn=False)
    pr.set_widths(0.39)
    opt = torch.optim.SGD([{{"params": list(pr.weight_parameters())}},
                           {{"params": list(pr.gate_parameters()), "lr": 0.0}}], lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for _ in range(5):
        pr.train_step(x, y, opt)
    faults = []
    for _ in range(4):
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pr.train_step(x, y, opt)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    print(json.dumps({{"state": state, "faults": faults}}))
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is for glibc")
def test_tuned_allocator_keeps_the_s2h_step_from_faulting_in_pages(tmp_path):
    """With glibc's defaults a ResNet-20 S2H step (batch 64) faults in thousands of fresh
    pages each step (it frees more than the trim threshold at its end); after
    ``tune_allocator()`` (what ``s2h prune`` does on the CPU) steady steps fault in none."""
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("S2H_TUNE_MALLOC", None)
    out = {}
    for mode in ("default", "tuned"):
        res = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["tuned"]["state"]["tuned"] is True
    # a page is 4 KiB: one S2H step allocates ~100 MB of activations and gradients. Measured:
    # 26,000-48,000 faults per default step; tuned, the heap may still grow by a few hundred
    # pages in a step while it settles, then 0-3
    default, tuned = out["default"]["faults"], out["tuned"]["faults"]
    assert min(default) > 5000, out
    assert sum(tuned) < min(default) / 5 and min(tuned) < 50, out


def test_tune_allocator_can_be_turned_off(tmp_path):
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); from s2h.cpu import "
            "tune_allocator, allocator_state; a = allocator_state(); b = tune_allocator(); "
            "print(json.dumps([a, b, tune_allocator()]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "S2H_TUNE_MALLOC": "0"}, timeout=120)
    assert res.returncode == 0, res.stderr
    before, first, again = json.loads(res.stdout)
    assert before == {"tuned": False, "reason": "not requested"}
    assert first == again == {"tuned": False, "reason": "S2H_TUNE_MALLOC=0"}


def test_cpu_runs_tune_the_allocator(monkeypatch, tmp_path):
    """``run_prune`` on the CPU calls ``tune_allocator`` (once per process)."""
    from s2h import trainer

    calls = []
    monkeypatch.setattr(trainer, "tune_allocator", lambda: calls.append(1) or {})
    monkeypatch.setattr(trainer, "_run", lambda cfg, device, dist_info: {"ran": device.type})
    from s2h.prune_config import PruneConfig

    out = trainer.run_prune(PruneConfig(device="cpu", out=str(tmp_path / "run")))
    assert out == {"ran": "cpu"} and calls == [1]
