"""Throughput of the fused dual (soft + hard) layers against their PyTorch baselines.

Three implementations of one dual layer (METHOD.md section 3) are timed:

* ``fused``    -- ``s2h.functional.dual_linear`` / ``dual_conv2d`` on the Triton kernels
  (one launch for both problems' tiles; mask in the A-operand prologue, bias in the epilogue);
* ``eager``    -- the plain PyTorch reference: a cuBLAS/cuDNN call for the soft path, a gather
  of the kept weight block, a compact cuBLAS/cuDNN call for the hard path, and the mask
  multiplies as separate elementwise kernels (the baseline of every ``speedup``);
* ``compiled`` -- ``torch.compile(reference, mode="max-autotune")``.

Each in ``fwd`` (forward) and ``fwd+bwd`` (forward and backward of both outputs, all input,
weight and mask gradients) modes, in bf16 by default, at hard-FLOPs fractions ``keep`` =
0.15 / 0.35 / 0.55 (the kept channel fraction is ``sqrt(keep)`` on both the input and the
output side, rounded to a multiple of 8), on ResNet-50 CIFAR layer shapes (batch 256, 32x32
input, channels-last) and ViT-B/16 attention/MLP shapes (batch 64 x 197 tokens).

Reported: the median time (``triton.testing.do_bench``), the achieved TFLOP/s counting the
useful work only -- ``(1 + p) F`` forward, ``3 (1 + p) F`` forward+backward, with ``F`` the
soft (dense) layer's forward FLOPs and ``p`` the hard path's exact fraction -- and that
roofline's fraction of the device's dense peak (``--peak-tflops``, guessed from the GPU name).

On a machine without CUDA only the eager reference runs, at reduced sizes, and the table says
that the fused and compiled rows need a GPU.

    python bench/dual_forward.py --out bench/results/dual_forward.jsonl
    python bench/dual_forward.py --cases vit --keep 0.35 --compile none
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from s2h import functional as sf  # noqa: E402 (after the sys.path line above)

# (C_in, C_out, H=W of the input, kernel, stride) -- ResNet-50 bottleneck convs on CIFAR
# (stride-1 stem, so the stages run at 32, 16, 8, 4 pixels).
RESNET50_CIFAR = {
    "r50.l1.conv1x1_256_64": (256, 64, 32, 1, 1),
    "r50.l1.conv3x3_64_64": (64, 64, 32, 3, 1),
    "r50.l1.conv1x1_64_256": (64, 256, 32, 1, 1),
    "r50.l2.conv3x3_128_128_s2": (128, 128, 32, 3, 2),
    "r50.l2.conv3x3_128_128": (128, 128, 16, 3, 1),
    "r50.l3.conv3x3_256_256": (256, 256, 8, 3, 1),
    "r50.l4.conv3x3_512_512": (512, 512, 4, 3, 1),
    "r50.l4.conv1x1_512_2048": (512, 2048, 4, 1, 1),
}
# (in, out) -- ViT-B/16 linears.
VIT_B16 = {
    "vit.qkv": (768, 2304),
    "vit.proj": (768, 768),
    "vit.fc1": (768, 3072),
    "vit.fc2": (3072, 768),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


@dataclass
class Problem:
    """One benchmark case: the arguments of a dual op plus its FLOPs."""

    bench: str  # "dual_linear" | "dual_conv2d"
    case: str
    batch: int
    args: dict
    kwargs: dict
    flops_soft: float  # F: forward FLOPs of the full-width layer
    flops_hard: float  # p F: forward FLOPs of the compact layer


def _kept(n: int, frac: float, multiple: int = 8) -> torch.Tensor:
    """``frac * n`` channels rounded to a multiple of ``multiple`` (importance order: random)."""
    k = min(n, max(multiple, multiple * round(n * frac / multiple)))
    return torch.randperm(n)[:k]


def make_problem(
    name: str, keep: float, dtype: torch.dtype, device: torch.device, scale: float
) -> Problem:
    """Inputs for case ``name`` at hard-FLOPs fraction ``keep``; ``scale`` shrinks the batch."""
    side = math.sqrt(keep)
    mask = {"dtype": torch.float32, "device": device}
    if name in RESNET50_CIFAR:
        c, o, hw, k, stride = RESNET50_CIFAR[name]
        batch = max(1, int(256 * scale))
        in_keep, out_keep = _kept(c, side), _kept(o, side)
        cl = torch.channels_last

        def act(ch: int) -> torch.Tensor:
            x = torch.randn(batch, ch, hw, hw, dtype=dtype, device=device)
            return x.contiguous(memory_format=cl)

        weight = torch.randn(o, c, k, k, dtype=dtype, device=device) / math.sqrt(c * k * k)
        args = {
            "x_soft": act(c),
            "x_hard": act(in_keep.numel()),
            "weight": weight,
            "bias": None,  # convs before BatchNorm carry no bias
            "soft_in_mask": torch.rand(c, **mask),
            "hard_in_mask": torch.ones(in_keep.numel(), **mask),
            "in_keep": in_keep.to(device),
            "out_keep": out_keep.to(device),
        }
        out_hw = (hw + 2 * (k // 2) - k) // stride + 1
        pixels = batch * out_hw * out_hw
        flops_soft = 2.0 * pixels * o * c * k * k
        flops_hard = 2.0 * pixels * out_keep.numel() * in_keep.numel() * k * k
        kwargs = {"stride": stride, "padding": k // 2}
        return Problem("dual_conv2d", name, batch, args, kwargs, flops_soft, flops_hard)
    n_in, n_out = VIT_B16[name]
    batch = max(1, int(64 * scale))
    in_keep, out_keep = _kept(n_in, side), _kept(n_out, side)
    args = {
        "x_soft": torch.randn(batch, 197, n_in, dtype=dtype, device=device),
        "x_hard": torch.randn(batch, 197, in_keep.numel(), dtype=dtype, device=device),
        "weight": torch.randn(n_out, n_in, dtype=dtype, device=device) / math.sqrt(n_in),
        "bias": torch.randn(n_out, dtype=dtype, device=device),
        "soft_in_mask": torch.rand(n_in, **mask),
        "hard_in_mask": torch.ones(in_keep.numel(), **mask),
        "in_keep": in_keep.to(device),
        "out_keep": out_keep.to(device),
    }
    rows = batch * 197
    flops_soft = 2.0 * rows * n_out * n_in
    flops_hard = 2.0 * rows * out_keep.numel() * in_keep.numel()
    return Problem("dual_linear", name, batch, args, {}, flops_soft, flops_hard)


_ORDER = ("x_soft", "x_hard", "weight", "bias", "soft_in_mask", "hard_in_mask")


def _leaves(p: Problem) -> list[torch.Tensor]:
    return [p.args[n] for n in _ORDER if p.args[n] is not None]


def make_step(fn: Callable, p: Problem, mode: str) -> Callable[[], None]:
    """A closure running ``fn`` on ``p`` in ``mode`` (``fwd`` under no_grad, or ``fwd+bwd``)."""
    pos = [p.args[n] for n in _ORDER] + [p.args["in_keep"], p.args["out_keep"]]
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad():
                fn(*pos, **p.kwargs)

        return fwd
    with torch.no_grad():
        y_soft, y_hard = fn(*pos, **p.kwargs)
    grads = (torch.randn_like(y_soft), torch.randn_like(y_hard))

    def fwd_bwd() -> None:
        outs = fn(*pos, **p.kwargs)
        torch.autograd.backward(outs, grads)

    return fwd_bwd


def time_ms(step: Callable[[], None], device: torch.device, leaves: list[torch.Tensor]) -> float:
    """Median milliseconds of ``step``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median"))
    step()  # warm-up
    samples = []
    for _ in range(5):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _fused(bench: str) -> Callable:
    return sf.dual_linear if bench == "dual_linear" else sf.dual_conv2d


def _reference(bench: str) -> Callable:
    return sf.dual_linear_reference if bench == "dual_linear" else sf.dual_conv2d_reference


def _environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    commit = os.environ.get("S2H_BENCH_COMMIT") or commit  # a copy without .git (the GPU host)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"commit": commit, "torch": torch.__version__, "triton": triton_version}


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def _max_diff(a: Callable, b: Callable, p: Problem) -> float:
    pos = [p.args[n] for n in _ORDER] + [p.args["in_keep"], p.args["out_keep"]]
    with torch.no_grad():
        ya, yb = a(*pos, **p.kwargs), b(*pos, **p.kwargs)
    return max((u.float() - v.float()).abs().max().item() for u, v in zip(ya, yb, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="append one JSON row per measurement")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.15, 0.35, 0.55])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument(
        "--cases", nargs="+", default=["all"],
        help="case names or prefixes: all, r50, vit, vit.fc1, r50.l1.conv3x3_64_64, ...",
    )  # fmt: skip
    parser.add_argument(
        "--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"]
    )
    parser.add_argument(
        "--compile", choices=["max-autotune", "default", "none"], default="max-autotune",
        help="mode of the torch.compile baseline (max-autotune compiles for minutes per case)",
    )  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, help="dense peak for the roofline column")
    parser.add_argument("--scale", type=float, help="batch scale (default 1 on CUDA, 1/128 on CPU)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    scale = args.scale if args.scale is not None else (1.0 if on_gpu else 1 / 128)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    names = [
        n for n in (*RESNET50_CIFAR, *VIT_B16)
        if "all" in args.cases or any(n == c or n.startswith(c + ".") for c in args.cases)
    ]  # fmt: skip
    if not names:
        parser.error(f"no case matches {args.cases}")
    env = _environment()
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = _peak_tflops(device, args.peak_tflops)
    if on_gpu:
        os.environ["S2H_BACKEND"] = "triton"
    impls: dict[str, Callable[[str], Callable]] = {"eager": _reference}
    if on_gpu:
        impls["fused"] = _fused
        if args.compile != "none":
            mode = None if args.compile == "default" else args.compile
            impls["compiled"] = lambda bench: torch.compile(
                _reference(bench), mode=mode, dynamic=False
            )

    header = (
        f"{'case':28s} {'keep':>5s} {'mode':8s} {'impl':9s} {'ms':>9s} {'TFLOP/s':>8s} "
        f"{'roofline':>8s} {'speedup':>7s}"
    )
    print(f"# {device_name}, torch {env['torch']}, triton {env['triton']}, {args.dtype}")
    print(header)
    rows = []
    for name in names:
        for keep in args.keep:
            torch.manual_seed(0)
            problem = make_problem(name, keep, dtype, device, scale)
            p = problem.flops_hard / problem.flops_soft
            for t in _leaves(problem):
                t.requires_grad_(True)
            if on_gpu:
                diff = _max_diff(_fused(problem.bench), _reference(problem.bench), problem)
                print(f"# {name} keep={keep}: fused vs eager max |diff| = {diff:.3g}")
            torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit
            for mode in args.modes:
                useful = (1 + p) * problem.flops_soft * (1 if mode == "fwd" else 3)
                results: dict[str, float] = {}
                for impl, make in impls.items():
                    fn = make(problem.bench)
                    step = make_step(fn, problem, mode)
                    results[impl] = time_ms(step, device, _leaves(problem))
                base = results["eager"]
                for impl, ms in results.items():
                    tflops = useful / (ms * 1e-3) / 1e12
                    roofline = (tflops / peak) if peak else float("nan")
                    print(
                        f"{name:28s} {keep:5.2f} {mode:8s} {impl:9s} {ms:9.3f} {tflops:8.2f} "
                        f"{roofline:8.1%} {base / ms:7.2f}x"
                    )
                    rows.append(
                        {
                            "bench": problem.bench,
                            "case": name,
                            "impl": impl,
                            "mode": mode,
                            "device": device_name,
                            **env,
                            "dtype": args.dtype,
                            "keep": keep,
                            "hard_flops_fraction": p,
                            "batch": problem.batch,
                            "ms": ms,
                            "tflops": tflops,
                            "roofline_fraction": roofline if peak else None,
                            "baseline": "eager",
                            "baseline_ms": base,
                            "speedup": base / ms,
                            "autotune": os.environ.get("S2H_AUTOTUNE", "1") != "0",
                            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(
                                timespec="seconds"
                            ),
                        }
                    )
            del problem
    if not on_gpu:
        print(
            "# no CUDA device: only the eager reference ran (at reduced batch); the fused "
            "Triton rows and the torch.compile rows need a GPU."
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"# appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
