"""Latency of exported (pruned) models against the dense model, next to their FLOPs ratio.

    python bench/export_latency.py [--models resnet50,...] [--keeps 0.15,0.35,0.55]
                                   [--cpu-batches 1,32] [--gpu-batches 1,256] [--rounds 5]
                                   [--out bench/results/export_latency.jsonl]

For each model: ``pruner.set_widths(keep)`` forces uniform widths reaching the FLOPs fraction
``keep`` (no training is needed to time a shape), ``pruner.export()`` gives the plain model.
The dense model and every exported one are timed *side by side in one run*: each timing
round runs every model once in turn (alternating), and a model's time is the median over the
rounds, so drifting machine load hits all of them alike. CNNs run channels-last. On the CPU:
fp32 at batch 1 and 32 (instead of 256, so a CPU run takes minutes; said in the output);
on a GPU (when one is present): bf16 at batch 1 and 256. One JSON row per (model, keep,
device, dtype, batch) is appended to ``--out`` with ``bench="export_latency"``, ``case``,
``device``, ``commit``, ``torch``, ``dtype``, ``keep``, ``batch``, ``ms``, ``dense_ms``,
``speedup`` and ``flops_ratio`` (the exported model's FLOPs over the dense one's), plus
``spread`` (the largest relative spread of the repeated block medians, ``s2h.latency``) and
``noisy``: when the spread exceeds ``--noise-limit`` the row's ``speedup`` is null and the line
says "noisy machine" instead of a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h  # noqa: E402
from s2h.latency import NOISE_LIMIT  # noqa: E402
from s2h.latency import time_side_by_side as _timed  # noqa: E402

#: model -> (input size, timm kwargs, channels_last)
CASES = {
    "resnet50": (224, {}, True),
    "mobilenetv3_large_100": (224, {}, True),
    "vit_small_patch16_224": (224, {}, False),
}


def _commit() -> str | None:
    if os.environ.get("S2H_BENCH_COMMIT"):  # a copy without .git (the GPU host)
        return os.environ["S2H_BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(os.path.abspath(__file__)), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def time_side_by_side(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int,
                      warmup: int = 2, limit: float = NOISE_LIMIT):
    """Median ms per forward of each model, alternating the models within every round, with
    the noise check of :func:`s2h.latency.time_side_by_side` (3 blocks of rounds)."""
    return _timed(models, x, rounds, warmup=warmup, limit=limit)


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def run_case(name: str, keeps: list[float], batches: list[int], device: torch.device,
             dtype: torch.dtype, rounds: int, limit: float = NOISE_LIMIT) -> list[dict]:
    import timm

    size, kw, channels_last = CASES.get(name, (224, {}, True))
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, **kw).eval()
    work = copy.deepcopy(dense)
    probe = torch.randn(1, 3, size, size)
    pruner = s2h.S2HPruner(work, probe, 0.5, warn=False)
    models = {"dense": dense}
    ratios = {}
    for keep in keeps:
        pruner.set_widths(keep)
        ex = pruner.export()
        ratios[keep] = _flops(ex, probe) / _flops(dense, probe)
        models[f"keep={keep}"] = ex
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for k in models:
        models[k] = models[k].to(device=device, dtype=dtype, memory_format=fmt).eval()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=fmt)
        ms = time_side_by_side(models, x, rounds, limit=limit)
        for keep in keeps:
            speedup = ms.ratio("dense", f"keep={keep}")
            pair = [ms.spread["dense"], ms.spread[f"keep={keep}"]]
            rows.append({
                "bench": "export_latency", "case": f"{name}@{size}", "device": _device_name(device),
                "commit": _commit(), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
                "keep": keep, "batch": batch, "ms": round(ms[f"keep={keep}"], 3),
                "dense_ms": round(ms["dense"], 3),
                "speedup": None if speedup is None else round(speedup, 3),
                "spread": round(max(pair), 4), "noisy": ms.noisy,
                "flops_ratio": round(ratios[keep], 4),
                "channels_last": channels_last,
            })
            r = rows[-1]
            print(f"{r['case']:28s} {r['device'][:24]:24s} {r['dtype']:8s} b={batch:<4d} "
                  f"keep={keep:<5} FLOPs {r['flops_ratio']:.3f} (1/{1 / r['flops_ratio']:.2f})  "
                  f"{r['ms']:9.2f} ms vs dense {r['dense_ms']:9.2f} ms  "
                  + (f"noisy machine (medians spread {100 * r['spread']:.0f}%)"
                     if r["speedup"] is None else f"speed-up {r['speedup']:.2f}x"), flush=True)
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--keeps", default="0.15,0.35,0.55")
    ap.add_argument("--cpu-batches", default="1,32")
    ap.add_argument("--gpu-batches", default="1,256")
    ap.add_argument("--rounds", type=int, default=6,
                    help="timing rounds in all, in 3 blocks whose medians must agree")
    ap.add_argument("--noise-limit", type=float, default=NOISE_LIMIT,
                    help="largest relative spread of the block medians for a speed-up to print")
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "export_latency.jsonl"))
    args = ap.parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    rows = []
    if not args.no_cpu:
        print(f"CPU fp32, batches {args.cpu_batches} (batch 32 stands in for 256 on the CPU), "
              f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
        for name in args.models.split(","):
            rows += run_case(name, keeps, [int(b) for b in args.cpu_batches.split(",")],
                             torch.device("cpu"), torch.float32, args.rounds, args.noise_limit)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        print(f"GPU bf16, batches {args.gpu_batches}")
        for name in args.models.split(","):
            rows += run_case(name, keeps, [int(b) for b in args.gpu_batches.split(",")],
                             torch.device("cuda"), torch.bfloat16, max(args.rounds, 21),
                             args.noise_limit)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
