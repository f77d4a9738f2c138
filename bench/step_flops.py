"""FLOPs of one S2H step over one dense training step (METHOD §6), counted, not timed.

    python bench/step_flops.py [--model resnet50] [--image-size 224] [--batch 2] [--out rows.jsonl]

Counts with ``torch.utils.flop_counter`` one ``pruner.train_step`` (soft forward, hard forward
on kept channels, gate-only backward of the mask-side gap term, the main backward) against a
dense forward + backward of the same model. The floor is ``(4 + 3p) / 3`` (METHOD §6); the bar
is ``<= 1.1 x floor``.

``--path reference`` (default) counts the plain PyTorch two-pass step; ``--path fused`` the
lockstep step through the fused dual kernels (FLOP formulas registered for
``torch.ops.s2h_kernels.*``), which needs CUDA or, on a CPU, Triton's interpreter::

    TRITON_INTERPRET=1 python bench/step_flops.py --path both --model resnet18 --image-size 32

``--dgrad-mmas`` instead counts the tensor-core work the conv data-gradient kernel *executes*
(every ``tl.dot`` the interpreter runs, ``2 * M * K * N`` FLOPs each, tile padding and masked
rows included) for ResNet-50's 3x3 stride-2 conv (128 -> 128 channels, 32x32 input, keep
0.35), against the op's counted (useful) FLOPs: a kernel that runs every tap on every pixel of
a stride-2 conv executes about 4x the useful work::

    TRITON_INTERPRET=1 python bench/step_flops.py --dgrad-mmas [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h  # noqa: E402


def _commit() -> str | None:
    if os.environ.get("S2H_BENCH_COMMIT"):  # a copy without .git (the GPU host)
        return os.environ["S2H_BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(__file__), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def _model(name: str):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=1000)


def count_dense_step(name, x, y) -> int:
    torch.manual_seed(0)
    model = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as fc:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return fc.get_total_flops()


def count_s2h_step(name, x, y, ratio, fused: bool = False) -> tuple[int, float, int]:
    torch.manual_seed(0)
    model = _model(name)
    if fused:
        os.environ["S2H_BACKEND"] = "triton"
    pruner = s2h.S2HPruner(model, x[:1], ratio, warn=False, fused=fused)
    pruner.set_widths(ratio)
    opt = torch.optim.SGD([{"params": pruner.weight_parameters()},
                           {"params": pruner.gate_parameters()}], lr=0.0)
    with FlopCounterMode(display=False) as fc:
        pruner.train_step(x, y, opt)
    return fc.get_total_flops(), pruner.hard_flops_ratio(), pruner.dense_flops


def count_dgrad_mmas(batch: int, c: int = 128, h: int = 32, k: int = 3, stride: int = 2,
                     keep: float = 0.35) -> dict:
    """Dots the fused conv data-gradient op executes under Triton's interpreter, and the op's
    counted FLOPs (its registered formula, as FlopCounterMode sees it), for a ``c -> c``
    ``k x k`` conv of stride ``stride``, channels-last bf16, kept width ``keep`` (multiple of 8)."""
    from triton.runtime import interpreter

    if not s2h.functional.kernels.INTERPRET:
        raise SystemExit("--dgrad-mmas counts interpreted dots: set TRITON_INTERPRET=1")
    dots: list[tuple[int, int, int]] = []
    orig = interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, d, *rest):
        dots.append((a.data.shape[0], a.data.shape[1], b.data.shape[1]))
        return orig(self, a, b, d, *rest)

    gen = torch.Generator().manual_seed(0)
    kept = max(8, round(c * keep / 8) * 8)
    cl, bf = torch.channels_last, torch.bfloat16
    xs = torch.randn(batch, c, h, h, dtype=bf).to(memory_format=cl)
    xh = torch.randn(batch, kept, h, h, dtype=bf).to(memory_format=cl)
    w = torch.randn(c, c, k, k, dtype=bf)
    ms, mh = torch.rand(c), torch.rand(kept)
    ik = torch.randperm(c, generator=gen)[:kept].sort().values
    ok = torch.randperm(c, generator=gen)[:kept].sort().values
    oh = (h + 2 * (k // 2) - k) // stride + 1
    gs = torch.randn(batch, c, oh, oh, dtype=bf).to(memory_format=cl)
    gh = torch.randn(batch, kept, oh, oh, dtype=bf).to(memory_format=cl)
    args = (gs, gh, xs, xh, w, ms, mh, ik, ok, [stride, stride], [k // 2, k // 2], [1, 1], 1,
            True, True, True, True)
    interpreter.InterpreterBuilder.create_dot = counting
    try:
        with FlopCounterMode(display=False) as fc:
            torch.ops.s2h_kernels.dual_conv2d_dgrad(*args)
    finally:
        interpreter.InterpreterBuilder.create_dot = orig
    executed = sum(2 * m * kk * n for m, kk, n in dots)
    useful = fc.get_total_flops()
    return {"bench": "dgrad_mmas", "case": f"r50.conv{k}x{k}_s{stride}", "batch": batch,
            "kept": kept, "dots": len(dots), "executed_mma_gflops": executed / 1e9,
            "counted_gflops": useful / 1e9, "executed_over_counted": executed / useful,
            "commit": _commit()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ratios", default="0.15,0.35")
    ap.add_argument("--out", default=None, help="append JSON rows to this file")
    ap.add_argument("--path", default="reference", choices=["reference", "fused", "both"],
                    help="count the two-pass PyTorch step, the fused lockstep step, or both")
    ap.add_argument("--dgrad-mmas", action="store_true",
                    help="count the dots the conv dgrad kernel executes (interpreter) instead")
    args = ap.parse_args(argv)
    if args.dgrad_mmas:
        row = count_dgrad_mmas(args.batch)
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return 0
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch,))
    dense = count_dense_step(args.model, x, y)
    rows = []
    paths = ["reference", "fused"] if args.path == "both" else [args.path]
    for r, path in [(float(v), path) for v in args.ratios.split(",") for path in paths]:
        step, p, _ = count_s2h_step(args.model, x, y, r, fused=path == "fused")
        floor = (4 + 3 * p) / 3
        rows.append({"bench": "step_flops", "case": f"{args.model}@{args.image_size}",
                     "path": path,
                     "keep": round(p, 4), "batch": args.batch, "dense_step_gflops": dense / 1e9,
                     "s2h_step_gflops": step / 1e9, "ratio_to_dense": step / dense,
                     "floor": floor, "ratio_to_floor": step / dense / floor,
                     "within_bar": step / dense <= 1.1 * floor, "commit": _commit(),
                     "torch": torch.__version__})
    print(f"\nS2H step FLOPs vs dense training step: {args.model}, {args.image_size}x"
          f"{args.image_size}, batch {args.batch} (torch.utils.flop_counter)")
    print(f"{'path':>10s}{'hard FLOPs p':>13s}{'dense GFLOP':>13s}{'S2H GFLOP':>12s}"
          f"{'S2H/dense':>11s}"
          f"{'floor (4+3p)/3':>16s}{'/ floor':>9s}{'<=1.1x floor':>14s}")
    for r in rows:
        print(f"{r['path']:>10s}{r['keep']:13.3f}{r['dense_step_gflops']:13.2f}{r['s2h_step_gflops']:12.2f}"
              f"{r['ratio_to_dense']:11.3f}{r['floor']:16.3f}{r['ratio_to_floor']:9.3f}"
              f"{str(r['within_bar']):>14s}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0 if all(r["within_bar"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
