"""The ahead-of-time compile check (``s2h.kernels.aot``) compiles for real GPUs, without one.

These run in a subprocess: the test session imports triton under ``TRITON_INTERPRET=1`` (see
conftest.py), and interpreted kernels are never compiled. The subprocess imports triton
without it, captures the launches of the real ops and compiles them for sm_90 / sm_80.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_KERNELS = """
import triton
import triton.language as tl

ROWS = 64
ROWS_C = tl.constexpr(64)


@triton.jit
def plain(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * ROWS, mask=offs < n)


@triton.jit
def const(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * ROWS_C, mask=offs < n)
"""


def test_check_rejects_a_plain_global_read_in_a_kernel(tmp_path):
    """The bug the interpreter let through: a plain Python int read inside @triton.jit. The
    check must fail on it (and pass on the same kernel reading a tl.constexpr global)."""
    (tmp_path / "k_mod.py").write_text(_KERNELS)
    result = _run(
        f"""
        import json, sys
        import torch
        from triton.backends.compiler import GPUTarget
        from s2h.kernels import aot
        sys.path.insert(0, {str(tmp_path)!r})
        import k_mod
        x = torch.zeros(64, dtype=torch.float32)
        res = {{}}
        for name in ("plain", "const"):
            launch = aot.Launch(getattr(k_mod, name), (x, 64), {{"BLOCK": 64}})
            try:
                aot.compile_launch(launch, launch.configs()[0], GPUTarget("cuda", 90, 32))
                res[name] = "ok"
            except Exception as exc:
                res[name] = type(exc).__name__ + ": " + str(exc)
        print(json.dumps(res))
        """
    )
    assert result["const"] == "ok"
    assert "Cannot access global variable ROWS" in result["plain"]


def test_dual_linear_kernels_compile_for_hopper_and_ampere():
    """Capture the real op's launches (forward, dgrad with mask gradients, wgrad) at a small
    bf16 shape and compile each for sm_90 and sm_80; Hopper must use wgmma, Ampere mma.sync."""
    result = _run(
        """
        import json, torch
        from triton.backends.compiler import GPUTarget
        from s2h.kernels import aot
        ops = torch.ops.s2h_kernels
        bf = torch.bfloat16
        xs, xh = torch.randn(256, 96, dtype=bf), torch.randn(256, 48, dtype=bf)
        w = torch.randn(128, 96, dtype=bf)
        ms, mh = torch.rand(96), torch.ones(48)
        ik, ok = torch.arange(0, 96, 2), torch.arange(0, 128, 2)
        gs, gh = torch.randn(256, 128, dtype=bf), torch.randn(256, 64, dtype=bf)
        with aot.capture_launches() as launches:
            ops.dual_linear(xs, xh, w, None, ms, mh, ik, ok, True)
            ops.dual_linear_dgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, True, True, True, True)
            ops.dual_linear_wgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, False)
        res = {}
        for launch in launches:
            for arch in (90, 80):
                c = aot.compile_launch(launch, launch.configs()[-1], GPUTarget("cuda", arch, 32))
                s = aot.kernel_stats(c)
                res[f"{launch.name}/{arch}"] = [s.shared_bytes, s.mma, "wgmma" in c.asm["ptx"]]
        print(json.dumps(res))
        """
    )
    names = {k.split("/")[0] for k in result}
    assert names == {
        "_dual_linear_fwd_kernel", "_dual_linear_dgrad_kernel", "_dual_linear_wgrad_kernel"
    }  # fmt: skip
    for key, (smem, mma, wgmma) in result.items():
        arch = int(key.split("/")[1])
        assert mma > 0, key
        assert wgmma == (arch == 90), key
        assert 0 < smem <= {90: 232448, 80: 166912}[arch], key
