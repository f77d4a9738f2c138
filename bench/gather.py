"""Achieved bandwidth of the channel gathers (issue 3), next to a copy of the same bytes.

    python bench/gather.py                       # CUDA at full size when a GPU is present
    python bench/gather.py --device cpu          # small shapes, < 1 minute on 2 cores
    python bench/gather.py --dtypes float16,bfloat16 --keep 0.15,0.35,0.55 --out rows.jsonl

For ResNet-50 and ViT-B/16 shapes and keep fractions 0.15 / 0.35 / 0.55 (kept widths rounded to
multiples of 8, the default divisor), it times

* row gathers: ``gather_channels(w, idx, 0)`` on the rows of a 2-D weight,
* channel gathers of activations: NCHW (``dim=1``, rows of H*W), channels-last and token
  tensors ``(N, L, C)`` (``dim=-1``, a gather inside every row),
* 2-D weight gathers: ``gather_weight(w, out_idx, in_idx)`` of linear and conv weights,

and, in the same run, a device-to-device copy of the same number of bytes (the roofline the op
can reach) and the PyTorch way of doing the same (``index_select``, or advanced indexing
``w[o][:, i]`` for weights). Bandwidth counts bytes read + written: ``2 * output bytes`` (the
index reads are negligible). Times are medians: CUDA events around single calls with the L2
cache flushed before each (so weights do not stay L2-resident), or ``torch.utils.benchmark`` on
CPU. ``--out FILE.jsonl`` appends one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ops = importlib.import_module("s2h.ops")  # from the source tree when run as a script

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    name: str
    kind: str  # "row" | "channel" | "weight"
    shape: tuple[int, ...]  # batch dim written as -1
    dim: int = 1  # for row / channel gathers
    channels_last: bool = False

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if s == -1 else s for s in self.shape)


CASES = [
    # ResNet-50 (224 x 224): activations of the four stages, a 3x3 and a 1x1 conv weight
    Case("resnet50.act.stage1", "channel", (-1, 256, 56, 56)),
    Case("resnet50.act.stage3", "channel", (-1, 1024, 14, 14)),
    Case("resnet50.act.stage4_7x7", "channel", (-1, 2048, 7, 7)),
    Case("resnet50.act_cl.stage3", "channel", (-1, 1024, 14, 14), channels_last=True),
    Case("resnet50.w.conv3x3_s3", "weight", (256, 256, 3, 3)),
    Case("resnet50.w.conv1x1_s4", "weight", (2048, 512, 1, 1)),
    Case("resnet50.rows.conv1x1_s4", "row", (2048, 512), dim=0),
    # ViT-B/16 (197 tokens, width 768, MLP 3072)
    Case("vitb16.tokens", "channel", (-1, 197, 768), dim=-1),
    Case("vitb16.mlp_hidden", "channel", (-1, 197, 3072), dim=-1),
    Case("vitb16.w.fc1", "weight", (3072, 768)),
    Case("vitb16.w.fc2", "weight", (768, 3072)),
    Case("vitb16.rows.qkv", "row", (2304, 768), dim=0),
]


def _commit() -> str | None:
    if os.environ.get("S2H_BENCH_COMMIT"):  # a copy without .git (the GPU host)
        return os.environ["S2H_BENCH_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _kept(n: int, keep: float, divisor: int = 8) -> int:
    """Kept width at a keep fraction, a multiple of the divisor, at least the divisor."""
    return min(n, max(divisor, round(keep * n / divisor) * divisor))


class Timer:
    """Median time of one call, in milliseconds."""

    def __init__(self, device: torch.device, reps: int, min_run_time: float):
        self.device = device
        self.reps = reps
        self.min_run_time = min_run_time
        if device.type == "cuda":
            # bigger than any L2 (H100: 50 MB, H200: 60 MB); zeroed before every timed call
            self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            for _ in range(3):
                fn()
            torch.cuda.synchronize(self.device)
            times = []
            for _ in range(self.reps):
                self.flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        from torch.utils import benchmark

        fn()
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
            min_run_time=self.min_run_time
        )
        return m.median * 1e3


def run_case(
    case: Case, dtype: torch.dtype, keep: float, batch: int, timer: Timer, device: torch.device
) -> dict:
    shape = case.concrete_shape(batch)
    gen = torch.Generator(device="cpu").manual_seed(0)
    src = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if case.channels_last:
        src = src.contiguous(memory_format=torch.channels_last)

    if case.kind == "weight":
        ko, ki = _kept(shape[0], keep), _kept(shape[1], keep)
        oi = torch.randperm(shape[0], generator=gen)[:ko].to(device)
        ii = torch.randperm(shape[1], generator=gen)[:ki].to(device)

        def op():
            return ops.gather_weight(src, oi, ii)

        def baseline():
            return src[oi][:, ii]

        baseline_name = "advanced indexing w[o][:, i]"
        index_shape = [ko, ki]
    else:
        n = shape[case.dim]
        k = _kept(n, keep)
        idx = torch.randperm(n, generator=gen)[:k].to(device)
        dim = case.dim

        def op():
            return ops.gather_channels(src, idx, dim)

        def baseline():
            return src.index_select(dim, idx)

        baseline_name = "index_select"
        index_shape = [k]

    out = op()
    ref = baseline()
    if not torch.equal(out, ref):
        raise AssertionError(f"{case.name}: s2h result differs from {baseline_name}")
    nbytes = out.numel() * out.element_size()
    copy_src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    copy_dst = torch.empty_like(copy_src)

    ms = timer(op)
    copy_ms = timer(lambda: copy_dst.copy_(copy_src))
    baseline_ms = timer(baseline)
    moved = 2 * nbytes  # read + write
    gbps = moved / (ms * 1e-3) / 1e9
    copy_gbps = moved / (copy_ms * 1e-3) / 1e9
    backend = ops.op_backends()[
        f"{'gather_weight' if case.kind == 'weight' else 'gather_channels'}/{device.type}"
    ]
    return {
        "bench": "gather",
        "case": case.name,
        "kind": case.kind,
        "layout": "channels_last" if case.channels_last else "contiguous",
        "shape": list(shape),
        "index_shape": index_shape,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": backend,
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "keep": keep,
        "batch": batch if -1 in case.shape else None,
        "bytes": moved,
        "ms": ms,
        "gbps": gbps,
        "copy_ms": copy_ms,
        "copy_gbps": copy_gbps,
        "copy_fraction": gbps / copy_gbps,
        "baseline": baseline_name,
        "baseline_ms": baseline_ms,
        "baseline_gbps": moved / (baseline_ms * 1e-3) / 1e9,
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'case':<26} {'dtype':<9} {'keep':>5} {'MB':>8} {'ms':>9} {'GB/s':>8} "
        f"{'copy GB/s':>9} {'%copy':>6} {'torch ms':>9} {'speedup':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<26} {r['dtype']:<9} {r['keep']:>5.2f} {r['bytes'] / 1e6:>8.2f} "
            f"{r['ms']:>9.4f} {r['gbps']:>8.1f} {r['copy_gbps']:>9.1f} "
            f"{100 * r['copy_fraction']:>5.0f}% {r['baseline_ms']:>9.4f} "
            f"{r['baseline_ms'] / r['ms']:>6.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list of float32,float16,bfloat16 (default: float16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--keep", default="0.15,0.35,0.55", help="comma list of keep fractions")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch of the activation cases (default: 64 on CUDA, 2 on CPU)",
    )
    p.add_argument("--cases", default=None, help="comma list of substrings selecting cases")
    p.add_argument("--reps", type=int, default=50, help="timed calls per measurement (CUDA)")
    p.add_argument("--out", default=None, help="append one JSON object per measurement here")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtypes = [
        DTYPES[d.strip()] for d in (args.dtypes or ("float32" if cpu else "float16")).split(",")
    ]
    keeps = [float(k) for k in args.keep.split(",")]
    batch = args.batch or (2 if cpu else 64)
    cases = CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        cases = [c for c in CASES if any(w in c.name for w in wanted)]
    if cpu:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    timer = Timer(device, args.reps, min_run_time=0.02 if cpu else 0.2)

    name = "cpu" if cpu else torch.cuda.get_device_name(device)
    backend = ops.op_backends()[f"gather_channels/{device.type}"]
    print(
        f"# s2h gather bench: device={device} ({name}), torch {torch.__version__}, "
        f"batch {batch}, gather_channels back-end: {backend}",
        flush=True,
    )
    rows = []
    for dtype in dtypes:
        for case in cases:
            for keep in keeps:
                row = run_case(case, dtype, keep, batch, timer, device)
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(_table(rows))
    if args.out:
        print(f"# appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
