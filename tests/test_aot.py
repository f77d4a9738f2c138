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
        timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
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


def test_hard_path_widths_that_are_8_mod_16_load_like_16_aligned_ones():
    """Kept widths are multiples of the divisor (8), so half of them are 8 (mod 16), where
    Triton cannot prove 16-byte alignment by itself and falls back to scalar 2-byte loads.
    The ALIGN hint must make such a layer (ViT-B/16 fc1 at keep 0.55: 424 of 768 inputs,
    1688 of 3072 outputs) compile to the same load mix as a 16-aligned one (keep 0.35)."""
    result = _run(
        """
        import json, sys
        sys.path.insert(0, "bench")
        import compile_kernels as ck
        res = {"kept": [ck.kept(768, 0.35), ck.kept(768, 0.55)]}
        for keep in (0.35, 0.55):
            for r in ck.compile_case(("vit_b16.fc1", keep, True)):
                if r["arch"] == "sm_90":
                    assert r["ok"], r
                    res[f"{r['kernel']}/{keep}"] = [
                        r["loads_16B"], r["loads_2B"], r["async_copies"]
                    ]
        print(json.dumps(res))
        """
    )
    assert result["kept"][0] % 16 == 0 and result["kept"][1] % 16 == 8, result["kept"]
    for kernel in ("_dual_linear_fwd_kernel", "_dual_linear_dgrad_kernel",
                   "_dual_linear_wgrad_kernel"):
        assert result[f"{kernel}/0.55"] == result[f"{kernel}/0.35"], (kernel, result)
        assert result[f"{kernel}/0.55"][0] > 0 and result[f"{kernel}/0.55"][2] > 0


def test_depthwise_kept_widths_that_are_8_mod_16_load_like_16_aligned_ones():
    """The depthwise kernels take the ALIGN hint too: a depthwise 3x3 at keep 0.15 (24 of 144
    channels kept, 8 mod 16) compiles every kernel to the load mix of keep 0.35 (48 kept,
    16-aligned). Without the hint its dgrad had 130 2-byte loads against 2."""
    result = _run(
        """
        import json, sys
        sys.path.insert(0, "bench")
        import compile_kernels as ck
        res = {"kept": [ck.kept(144, 0.15), ck.kept(144, 0.35)]}
        for keep in (0.15, 0.35):
            for r in ck.compile_case(("dw3x3", keep, True)):
                if r["arch"] == "sm_90":
                    assert r["ok"], r
                    res[f"{r['kernel']}/{keep}"] = [
                        r["loads_16B"], r["loads_2B"], r["async_copies"], r["spill_bytes"]
                    ]
        print(json.dumps(res))
        """
    )
    assert result["kept"] == [24, 48], result["kept"]
    for kernel in ("_dual_dw_fwd_kernel", "_dual_dw_dgrad_kernel", "_dual_dw_wgrad_kernel"):
        assert result[f"{kernel}/0.15"] == result[f"{kernel}/0.35"], (kernel, result)
        assert result[f"{kernel}/0.15"][0] > 0 and result[f"{kernel}/0.15"][3] == 0


def test_one_by_one_convs_load_weights_vectorised_and_do_not_spill():
    """A 1x1 conv's weight has size-1 KH/KW dims whose torch strides are 1: Triton specialised
    them to the constant 1, the tap offset lost its alignment and every weight load of the K
    loop became a 2-byte load (and the default config spilled). With the layout's canonical
    strides a ResNet-50 1x1 conv compiles to the load mix of a 3x3 one, with no spills."""
    result = _run(
        """
        import json, sys
        sys.path.insert(0, "bench")
        import compile_kernels as ck
        res = {}
        for case in ("r50.conv1x1", "r50.conv3x3"):
            for r in ck.compile_case((case, 0.35, True)):
                if r["arch"] == "sm_90":
                    assert r["ok"], r
                    res[f"{r['kernel']}/{case}"] = [r["loads_16B"], r["loads_2B"], r["spill_bytes"]]
        print(json.dumps(res))
        """
    )
    for kernel in ("_dual_conv_fwd_kernel", "_dual_conv_dgrad_kernel", "_dual_conv_wgrad_kernel"):
        one, three = result[f"{kernel}/r50.conv1x1"], result[f"{kernel}/r50.conv3x3"]
        assert one[:2] == three[:2], (kernel, result)
        assert one[2] == 0, (kernel, result)


def test_the_compile_check_sees_every_autotuned_kernel_and_its_configs():
    """Every autotuned kernel of every module in s2h.kernels is launched by some op and
    captured by ``aot.capture_launches`` (so ``bench/compile_kernels.py`` compiles it: a kernel
    in a module the capture does not patch would go unchecked), and each launch carries the
    GPU configs of that kernel's keep-list; the data-gradient kernels' ``BLOCK_M`` is a
    multiple of ``PARTIAL_ROWS`` (their mask-gradient partial sums need exactly one writer
    per buffer row, whatever the config). fp32 launches of the GEMM kernels carry the same
    configs with the reduction step halved (``BLOCK_K``; ``BLOCK_M`` for the weight gradients),
    the depthwise kernels' are unchanged."""
    result = _run(
        """
        import importlib, json, pkgutil, torch
        from triton.runtime.autotuner import Autotuner
        import s2h.kernels as K
        from s2h.kernels import aot, _common
        tuners = {}
        for info in pkgutil.iter_modules(K.__path__):
            mod = importlib.import_module(f"s2h.kernels.{info.name}")
            for name, obj in vars(mod).items():
                if isinstance(obj, Autotuner) and name.startswith("_dual"):
                    tuners[name] = [c.all_kwargs() for c in obj.configs]
        ops = torch.ops.s2h_kernels
        captured = {}
        for dt in (torch.bfloat16, torch.float32):
            def r(*shape):
                return torch.randn(*shape).to(dt)
            xs, xh = r(2, 16, 8, 8), r(2, 8, 8, 8)
            ms, mh = torch.rand(16), torch.rand(8)
            ik = torch.arange(0, 16, 2)
            geo = ([1, 1], [1, 1], [1, 1])
            with aot.capture_launches() as launches:
                for w, groups in ((r(24, 16, 3, 3), 1), (r(16, 1, 3, 3), 16)):
                    ok = ik if groups > 1 else torch.arange(0, 24, 2)
                    gs = r(2, w.shape[0], 8, 8)
                    gh = r(2, ok.numel(), 8, 8)
                    ops.dual_conv2d(xs, xh, w, None, ms, mh, ik, ok, *geo, groups, True)
                    ops.dual_conv2d_dgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, *geo, groups,
                                          True, True, True, True)
                    ops.dual_conv2d_wgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, *geo, groups, True)
                x2, xh2, w2 = r(64, 16), r(64, 8), r(24, 16)
                ok2, g2, gh2 = torch.arange(0, 24, 2), r(64, 24), r(64, 12)
                ops.dual_linear(x2, xh2, w2, None, ms, mh, ik, ok2, True)
                ops.dual_linear_dgrad(g2, gh2, x2, xh2, w2, ms, mh, ik, ok2, True, True, True,
                                      True)
                ops.dual_linear_wgrad(g2, gh2, x2, xh2, w2, ms, mh, ik, ok2, False)
            captured[str(dt)] = {l.name: [c.all_kwargs() for c in l.configs()]
                                 for l in launches}
        print(json.dumps({"tuners": tuners, "captured": captured,
                          "rows": _common.PARTIAL_ROWS}))
        """
    )
    tuners, captured = result["tuners"], result["captured"]
    assert len(tuners) == 9, sorted(tuners)  # fwd, dgrad, wgrad of linear, conv, depthwise
    assert captured["torch.bfloat16"] == tuners
    for name, configs in tuners.items():
        assert configs, name
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs), name
        if "dgrad" in name:
            for config in configs:
                assert config["BLOCK_M"] % result["rows"] == 0, (name, config)
        wide = captured["torch.float32"][name]
        if "_dw_" in name:
            assert wide == configs, name
            continue
        block = "BLOCK_M" if "wgrad" in name else "BLOCK_K"
        halved = [{**c, block: max(16, c[block] // 2)} for c in configs]
        assert wide == halved, name
        if "dgrad" in name:
            for config in wide:
                assert config["BLOCK_M"] % result["rows"] == 0, (name, config)


@pytest.mark.parametrize("setting", ["0", "1"])
def test_autotune_switch_keeps_the_first_config_only_when_off(setting):
    """``S2H_AUTOTUNE=0`` (short GPU runs) leaves each kernel its first kept config -- the one
    CI's compile check compiles -- and the default tunes over the whole keep-list."""
    code = """
        import json, os
        os.environ["S2H_AUTOTUNE"] = SETTING
        from s2h.kernels import _common, dual_conv2d, dual_depthwise, dual_linear
        out = {}
        for mod, cands in ((dual_linear, _common.gemm_candidates()),
                           (dual_conv2d, _common.gemm_candidates()),
                           (dual_depthwise, dual_depthwise.depthwise_candidates())):
            kernel = next(v for k, v in vars(mod).items() if k.endswith("_fwd_kernel")
                          or k == "_fwd")
            want = [cands[i] for i in mod.FWD_KEEP]
            have = [str(c) for c in kernel.configs]
            out[mod.__name__] = [len(have), len(want), have == [str(c) for c in want][:len(have)]]
        print(json.dumps(out))
    """.replace("SETTING", repr(setting))
    result = _run(code)
    for name, (n, full, same) in result.items():
        assert same, name
        assert n == (1 if setting == "0" else full), (name, n, full)
