"""Compile every dual kernel for real GPU targets, without a GPU (``s2h.kernels.aot``).

Each representative layer (ViT-B/16 linears over 64x197 tokens, ResNet-50 CIFAR convs at
batch 32, channels-last, and a depthwise 3x3) at keep 0.15 / 0.35 / 0.55, bf16, runs the
forward, data-gradient and weight-gradient ops' host code with launches captured; every
captured kernel is compiled with Triton for sm_90 (H100/H200) and sm_80 (A100) and its
registers, spills, shared memory and instruction mix are tabulated.

    python bench/compile_kernels.py --quick   # CI: the first (default) config of each kernel
    python bench/compile_kernels.py           # every autotune config; table to bench/results/

Exits non-zero on any compile error, on shared memory above the target's per-block limit, or on
a config that spills registers (``--allow-spills`` reports spills without failing). Each kernel
autotunes over the candidates its keep-list names (``FWD_KEEP`` / ``DGRAD_KEEP`` /
``WGRAD_KEEP`` beside the kernel in ``kernels/dual_linear.py``, ``dual_conv2d.py`` and
``dual_depthwise.py``; the shared GEMM candidates are in ``kernels/_common.py``): a keep-list
names only configs that spill nowhere in this table. Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE = torch.bfloat16  # the default; --dtype chooses (fp32: what the pruner's self-check runs)
KEEPS = (0.15, 0.35, 0.55)
TARGETS = ((90, "sm_90"), (80, "sm_80"))
TOKENS = 64 * 197
LINEARS = {  # ViT-B/16: (in, out)
    "vit_b16.qkv": (768, 2304),
    "vit_b16.proj": (768, 768),
    "vit_b16.fc1": (768, 3072),
    "vit_b16.fc2": (3072, 768),
}
CONVS = {  # ResNet-50 on 32x32 inputs, batch 32: (C, O, k, stride, H, groups)
    "r50.conv3x3": (64, 64, 3, 1, 32, 1),
    "r50.conv1x1": (64, 256, 1, 1, 32, 1),
    "r50.conv3x3_s2": (128, 128, 3, 2, 32, 1),
    "r50.down1x1_s2": (256, 512, 1, 2, 16, 1),
    "dw3x3": (144, 144, 3, 1, 16, 144),
}
CONV_BATCH = 32


def kept(n: int, keep: float, divisor: int = 8) -> int:
    """A kept width as the pruner makes it: a multiple of the divisor, at least one divisor."""
    return max(divisor, int(round(n * keep / divisor)) * divisor)


def _keep_index(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values


def capture_case(case: str, keep: float, dtype: torch.dtype = DTYPE) -> list:
    """The kernel launches of one layer's forward, data gradient and weight gradient."""
    from s2h.kernels import aot

    DTYPE = dtype  # noqa: N806 - the module default, overridden per job

    ops = torch.ops.s2h_kernels
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), aot.capture_launches() as launches:
        if case in LINEARS:
            n_in, n_out = LINEARS[case]
            k_in, k_out = kept(n_in, keep), kept(n_out, keep)
            xs = torch.randn(TOKENS, n_in, dtype=DTYPE)
            xh = torch.randn(TOKENS, k_in, dtype=DTYPE)
            w = torch.randn(n_out, n_in, dtype=DTYPE)
            b = torch.randn(n_out, dtype=DTYPE)
            ms, mh = torch.rand(n_in), torch.ones(k_in)
            ik, ok = _keep_index(n_in, k_in, gen), _keep_index(n_out, k_out, gen)
            gs = torch.randn(TOKENS, n_out, dtype=DTYPE)
            gh = torch.randn(TOKENS, k_out, dtype=DTYPE)
            ops.dual_linear(xs, xh, w, b, ms, mh, ik, ok, True)
            ops.dual_linear_dgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, True, True, True, True)
            ops.dual_linear_wgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, True)
        else:
            c, o, k, stride, h, groups = CONVS[case]
            depthwise = groups > 1
            k_in = kept(c, keep)
            k_out = k_in if depthwise else kept(o, keep)
            cl = torch.channels_last
            xs = torch.randn(CONV_BATCH, c, h, h, dtype=DTYPE).to(memory_format=cl)
            xh = torch.randn(CONV_BATCH, k_in, h, h, dtype=DTYPE).to(memory_format=cl)
            w = torch.randn(o, c // groups, k, k, dtype=DTYPE)
            b = torch.randn(o, dtype=DTYPE)
            ms, mh = torch.rand(c), torch.ones(k_in)
            ik = _keep_index(c, k_in, gen)
            ok = ik if depthwise else _keep_index(o, k_out, gen)
            geo = ([stride, stride], [k // 2, k // 2], [1, 1], groups)
            ys, yh, _ = ops.dual_conv2d(xs, xh, w, b, ms, mh, ik, ok, *geo, True)
            gs = torch.randn(ys.shape, dtype=DTYPE).to(memory_format=cl)
            gh = torch.randn(yh.shape, dtype=DTYPE).to(memory_format=cl)
            ops.dual_conv2d_dgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, *geo, True, True, True, True)
            ops.dual_conv2d_wgrad(gs, gh, xs, xh, w, ms, mh, ik, ok, *geo, True)
    return launches


def compile_case(job: tuple) -> list[dict]:
    """Compile every launch of one ``(case, keep, quick[, allow_spills])`` for every target;
    one row per compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    from s2h.kernels import aot

    case, keep, quick = job[:3]
    allow_spills = job[3] if len(job) > 3 else False
    dtype = DTYPES[job[4]] if len(job) > 4 else DTYPE
    rows = []
    for launch in capture_case(case, keep, dtype):
        configs = launch.configs()[:1] if quick else launch.configs()
        for ci, config in enumerate(configs):
            for arch, arch_name in TARGETS:
                row = {
                    "case": case, "keep": keep, "kernel": launch.name, "arch": arch_name,
                    "config": ci, "config_str": str(config), "dtype": str(dtype).split(".")[-1],
                }  # fmt: skip
                t0 = time.perf_counter()
                try:
                    compiled = aot.compile_launch(launch, config, GPUTarget("cuda", arch, 32))
                    stats = aot.kernel_stats(compiled)
                    row.update(vars(stats))
                    row["smem_limit"] = aot.SMEM_LIMIT[arch]
                    row["ok"] = stats.shared_bytes <= aot.SMEM_LIMIT[arch]
                    if not row["ok"]:
                        row["error"] = (
                            f"shared memory {stats.shared_bytes} B > {aot.SMEM_LIMIT[arch]} B"
                        )
                    elif stats.spill_bytes and not allow_spills:
                        row["ok"] = False
                        row["error"] = f"spills {stats.spill_bytes} B"
                except Exception as exc:  # noqa: BLE001 (a compile error is a row, then exit 1)
                    row["ok"] = False
                    row["error"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
                row["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
    del triton
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'case':16s} {'keep':>4s} {'kernel':28s} {'arch':5s} {'cfg':>3s} {'regs':>4s} "
        f"{'spill':>5s} {'smem KB':>7s} {'mma':>4s} {'async':>5s} {'ld16B':>5s} {'ld2B':>4s}"
        "  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "registers" in r:  # compiled (possibly over a limit: the status says)
            lines.append(
                f"{r['case']:16s} {r['keep']:4.2f} {r['kernel']:28s} {r['arch']:5s} "
                f"{r['config']:3d} {r['registers']:4d} {r['spill_bytes']:5d} "
                f"{r['shared_bytes'] / 1024:7.1f} {r['mma']:4d} {r['async_copies']:5d} "
                f"{r['loads_16B']:5d} {r['loads_2B']:4d}  {'ok' if r['ok'] else r['error']}"
            )
        else:
            lines.append(
                f"{r['case']:16s} {r['keep']:4.2f} {r['kernel']:28s} {r['arch']:5s} "
                f"{r['config']:3d}  FAILED: {r['error']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="only the first (default) autotune config of each kernel (CI)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                    help="operand dtype of the captured launches (fp32: the pruner's fp32 "
                         "self-check and fp32 training)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--allow-spills", action="store_true",
                    help="report register spills without failing")
    ap.add_argument("--out", default=None,
                    help="write the rows (JSONL) and the table (.md) here; default: "
                         "bench/results/compile_kernels[-quick].{jsonl,md} unless --quick")
    args = ap.parse_args(argv)
    jobs = [(case, keep, args.quick, args.allow_spills, args.dtype)
            for case in (*LINEARS, *CONVS) for keep in KEEPS]
    t0 = time.perf_counter()
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for part in pool.map(compile_case, jobs):
            rows.extend(part)
    table = format_table(rows)
    print(table)
    failed = [r for r in rows if not r["ok"]]
    import triton

    print(
        f"\n{len(rows)} compiles ({len(rows) - len(failed)} ok, {len(failed)} failed) for "
        f"{', '.join(n for _, n in TARGETS)} with triton {triton.__version__}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    out = args.out
    if out is None and not args.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_kernels")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({**r, "triton": triton.__version__, "torch": torch.__version__})
                        + "\n")
        with open(out + ".md", "w") as f:
            f.write(
                f"# Dual kernels compiled for sm_90 / sm_80 without a GPU\n\n"
                f"`python bench/compile_kernels.py{' --quick' if args.quick else ''}`, "
                f"triton {triton.__version__}, torch {torch.__version__}, {args.dtype}. "
                f"Columns: registers per thread and spill bytes (ptxas -v), shared memory, "
                f"tensor-core instructions (wgmma / mma.sync), asynchronous copies, 16-byte and "
                f"2-byte global loads in the PTX.\n\n```\n{table}\n```\n"
            )
        print(f"rows written to {out}.jsonl, table to {out}.md")
    for r in failed:
        print(f"FAILED {r['case']} keep={r['keep']} {r['kernel']} {r['arch']} config "
              f"{r['config']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
