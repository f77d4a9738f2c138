"""Time of one full S2H step against a dense training step and the plain PyTorch S2H step.

    python bench/s2h_step.py [--cases resnet50:32:256,vit_small_patch16_224:224:128]
                             [--keep 0.15,0.35] [--dtype bf16] [--out rows.jsonl]

Per case and hard-FLOPs ratio ``p`` (widths forced uniformly with ``pruner.set_widths``):

* ``ms``            one ``train_step`` on the fast path (``fused="auto"``: lockstep + Triton dual
                    kernels on CUDA; on the CPU this is the same as the reference);
* ``reference_ms``  the same step with ``fused=False`` (two passes, plain PyTorch ops);
* ``dense_ms``      a plain training step of the unpruned model (forward, backward, step);
* ``peak_mem_ratio`` peak CUDA memory of the fast S2H step over the dense step's.

Timing: warm-up first, then medians of ``--reps`` steps with CUDA events (wall clock on CPU),
random data. The floor of ``ratio_to_dense`` is ``(4 + 3p) / 3`` (METHOD §6); the issue's bars
(H100): <= 1.6 at p ~ 0.15, reference / fast >= 1.5, peak memory <= 1.4.
On the CPU the batch is cut to ``--cpu-batch`` (the rows say so): CPU rows are for plumbing only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h  # noqa: E402


def _commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(__file__),
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def _model(name, img, device):
    import timm

    kw = {"img_size": img} if "vit" in name or "swin" in name else {}
    m = timm.create_model(name, pretrained=False, num_classes=100, **kw).to(device)
    return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m


def _timer(device, fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _peak(device, fn):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run_case(name, img, batch, keep, dtype, device, reps):
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
           else contextlib.nullcontext())
    xs = [torch.randn(batch, 3, img, img, device=device) for _ in range(4)]  # rotate buffers
    ys = [torch.randint(0, 100, (batch,), device=device) for _ in range(4)]
    it = {"i": 0}

    def nxt():
        it["i"] = (it["i"] + 1) % 4
        x = xs[it["i"]]
        return (x.to(memory_format=torch.channels_last) if device.type == "cuda" else x), ys[it["i"]]

    torch.manual_seed(0)
    dense = _model(name, img, device)
    opt = torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9)

    def dense_step():
        x, y = nxt()
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = F.cross_entropy(dense(x).float(), y)
        loss.backward()
        opt.step()

    dense_ms = _timer(device, dense_step, reps)
    dense_peak = _peak(device, dense_step)
    del dense, opt
    out = {}
    for fused in ("auto", False):
        torch.manual_seed(0)
        model = _model(name, img, device)
        pruner = s2h.S2HPruner(model, xs[0][:2], keep, warn=False, fused=fused)
        pruner.set_widths(keep)
        sopt = torch.optim.SGD([{"params": pruner.weight_parameters()},
                                {"params": pruner.gate_parameters()}], lr=0.0, momentum=0.9)

        def step():
            x, y = nxt()
            with amp:
                pruner.train_step(x, y, sopt)

        out[fused] = (_timer(device, step, reps), _peak(device, step), pruner.hard_flops_ratio(),
                      pruner.lockstep)
        del model, pruner, sopt
    (ms, peak, p, lockstep), (ref_ms, _, _, _) = out["auto"], out[False]
    return {"bench": "s2h_step", "case": f"{name}@{img}", "device": _device_name(device),
            "commit": _commit(), "torch": torch.__version__, "triton": _triton(),
            "dtype": str(dtype).replace("torch.", ""), "keep": round(p, 4), "batch": batch,
            "ms": ms, "dense_ms": dense_ms, "ratio_to_dense": ms / dense_ms,
            "floor": (4 + 3 * p) / 3, "reference_ms": ref_ms, "speedup": ref_ms / ms,
            "lockstep": lockstep,
            "peak_mem_ratio": (peak / dense_peak) if peak and dense_peak else None}


def _triton():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="resnet50:32:256,vit_small_patch16_224:224:128",
                    help="model:image_size:batch,...")
    ap.add_argument("--keep", default="0.15,0.35")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--cpu-batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reps = args.reps or (20 if device.type == "cuda" else 3)
    rows = []
    for case in args.cases.split(","):
        name, img, batch = case.split(":")
        batch = int(batch) if device.type == "cuda" else min(int(batch), args.cpu_batch)
        for k in [float(v) for v in args.keep.split(",")]:
            try:
                rows.append(run_case(name, int(img), batch, k, dtype, device, reps))
            except Exception as exc:  # keep going: one unsupported model must not hide the rest
                print(f"{name} @ {k}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\nS2H step vs dense step on {_device_name(device)} ({args.dtype}; medians of {reps})")
    print(f"{'case':30s}{'batch':>6s}{'p':>7s}{'fast ms':>10s}{'ref ms':>10s}{'dense ms':>10s}"
          f"{'fast/dense':>11s}{'floor':>7s}{'ref/fast':>9s}{'mem':>6s}{'lockstep':>9s}")
    for r in rows:
        mem = "n/a" if r["peak_mem_ratio"] is None else f"{r['peak_mem_ratio']:.2f}"
        print(f"{r['case']:30s}{r['batch']:6d}{r['keep']:7.3f}{r['ms']:10.1f}"
              f"{r['reference_ms']:10.1f}{r['dense_ms']:10.1f}{r['ratio_to_dense']:11.2f}"
              f"{r['floor']:7.2f}{r['speedup']:9.2f}{mem:>6s}{str(r['lockstep']):>9s}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
