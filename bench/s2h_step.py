"""Time of one full S2H step against a dense training step and the plain PyTorch S2H step.

    python bench/s2h_step.py [--cases resnet50:32:256,vit_small_patch16_224:224:128]
                             [--keep 0.15,0.35] [--dtype bf16] [--out rows.jsonl]

Per case and hard-FLOPs ratio ``p`` (widths forced uniformly with ``pruner.set_widths``):

* ``ms``            one ``train_step`` on the fast path (``fused=True``: lockstep + Triton dual
                    kernels on CUDA, or two passes where the pruner refuses lockstep; the row's
                    ``lockstep`` says which; on the CPU this is the same as the reference);
* ``reference_ms``  the same step with ``fused=False`` (two passes, plain PyTorch ops);
* ``dense_ms``      a plain training step of the unpruned model (forward, backward, step);
* ``peak_mem_ratio`` peak CUDA memory of the fast S2H step over the dense step's.

Timing: warm-up first, then medians of ``--reps`` steps with CUDA events (wall clock on CPU),
random data. The floor of ``ratio_to_dense`` is ``(4 + 3p) / 3`` (METHOD §6); the issue's bars
(H100): <= 1.6 at p ~ 0.15, reference / fast >= 1.5, peak memory <= 1.4.
On the CPU the batch is cut to ``--cpu-batch`` (the rows say so): CPU rows are for plumbing only.

CPU rows of the main job (``--cpu-rows``, on by default on a CPU-only machine; ``--cpu-rows
only`` skips the timm cases): ``s2h.models`` ResNet-20, batch 64, 28x28 one-channel input (the
Fashion-MNIST job), one thread, AdamW for both, the dense step and the S2H step *interleaved*
(alternating, medians of ``--cpu-reps``) so machine load hits both alike. ``ratio_to_floor`` is
``(s2h_ms / dense_ms) / ((4 + 3p) / 3)``; the issue's bar is ~1.2. The gates are set by
``set_widths`` with logit gaps of ``2 * --sharpness`` (20 and 5: the default ``set_width``
state and a milder one); with gaps of ~40 the soft masks of pruned channels reach ~1e-18 and
the backward runs into float32 denormals (many times slower on x86), which the
``flush_denormal`` rows (``torch.set_flush_denormal(True)``) remove.

``malloc_tuned`` rows run after :func:`s2h.cpu.tune_allocator` (what ``s2h prune`` does on the
CPU: glibc's mmap / trim thresholds raised, so the blocks a step frees are reused instead of
returned to the system and faulted in again); they run last because the setting lasts for the
process. ``s2h_faults`` / ``dense_faults``: median minor page faults per step.

``wall_floor``: the same passes timed on this machine instead of counted in FLOPs — (dense
forward + exported-model forward + an input-gradient-only dense backward + dense backward +
exported-model backward) / (dense forward + backward), each timed in the same interleaved
rounds; narrow convolutions do not run at their FLOPs share on a CPU, so this floor is higher
than ``(4 + 3p) / 3``. ``ratio_to_wall_floor`` is what s2h's own overhead leaves.
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
    if os.environ.get("S2H_BENCH_COMMIT"):  # a copy without .git (the GPU host)
        return os.environ["S2H_BENCH_COMMIT"]
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
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        return x, ys[it["i"]]

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
    dense = opt = None  # free the memory before the pruned runs (dense_step is done)
    out = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = _model(name, img, device)
        try:  # lockstep where the model runs in it and passes the self-check, else two passes
            pruner = s2h.S2HPruner(model, xs[0][:2], keep, warn=False, fused=fused)
        except ValueError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            torch.manual_seed(0)
            model = _model(name, img, device)
            pruner = s2h.S2HPruner(model, xs[0][:2], keep, warn=False, fused=False)
        pruner.set_widths(keep)
        sopt = torch.optim.SGD([{"params": pruner.weight_parameters()},
                                {"params": pruner.gate_parameters()}], lr=0.0, momentum=0.9)

        def step(pruner=pruner, sopt=sopt):
            x, y = nxt()
            with amp:
                pruner.train_step(x, y, sopt)

        out[fused] = (_timer(device, step, reps), _peak(device, step), pruner.hard_flops_ratio(),
                      pruner.lockstep)
        del model, pruner, sopt, step
    (ms, peak, p, lockstep), (ref_ms, _, _, _) = out[True], out[False]
    return {"bench": "s2h_step", "case": f"{name}@{img}", "device": _device_name(device),
            "commit": _commit(), "torch": torch.__version__, "triton": _triton(),
            "dtype": str(dtype).replace("torch.", ""), "keep": round(p, 4), "batch": batch,
            "ms": ms, "dense_ms": dense_ms, "ratio_to_dense": ms / dense_ms,
            "floor": (4 + 3 * p) / 3, "reference_ms": ref_ms, "speedup": ref_ms / ms,
            "lockstep": lockstep, "autotune": os.environ.get("S2H_AUTOTUNE", "1") != "0",
            "peak_mem_ratio": (peak / dense_peak) if peak and dense_peak else None}


def _triton():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _minflt():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_cpu_case(keep, reps, sharpness, flush_denormal, batch=64, threads=1):
    """The main job's step on the CPU: s2h.models ResNet-20, 28x28x1, dense and S2H interleaved."""
    from s2h import models
    from s2h.cpu import allocator_state

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    try:
        def make():
            torch.manual_seed(0)
            return models.create_model("resnet20", num_classes=10, in_chans=1)

        dense = make()
        dopt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
        model = make()
        pruner = s2h.S2HPruner(model, torch.randn(2, 1, 28, 28), keep, warn=False)
        pruner.set_widths(keep)
        with torch.no_grad():  # set_width puts gaps of 2 * 20 between the logits
            for g in pruner.gate_parameters():
                g.mul_(sharpness / 20.0)
        p = pruner.hard_flops_ratio()
        sopt = torch.optim.AdamW([{"params": list(pruner.weight_parameters())},
                                  {"params": list(pruner.gate_parameters()), "lr": 0.0}], lr=1e-3)
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(batch, 1, 28, 28, generator=g) for _ in range(2)]
        ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(2)]

        def dense_step(i):
            dopt.zero_grad(set_to_none=True)
            F.cross_entropy(dense(xs[i % 2]), ys[i % 2]).backward()
            dopt.step()

        def s2h_step(i):
            pruner.train_step(xs[i % 2], ys[i % 2], sopt)

        exported = pruner.export().train()
        for q in exported.parameters():
            q.requires_grad_(True)

        def passes(net, i, input_grad_only=False):
            """(forward s, backward s) of a plain training pass; input_grad_only: the weights'
            gradients are not computed (the shape of the gate-only backward)."""
            x = xs[i % 2].clone().requires_grad_(input_grad_only)
            params = list(net.parameters())
            if input_grad_only:
                for q in params:
                    q.requires_grad_(False)
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), ys[i % 2])
            t1 = time.perf_counter()
            if input_grad_only:
                torch.autograd.grad(loss, x)
                for q in params:
                    q.requires_grad_(True)
            else:
                loss.backward()
                net.zero_grad(set_to_none=True)
            return t1 - t0, time.perf_counter() - t1

        for i in range(2):
            dense_step(i)
            s2h_step(i)
        td, ts, pd, pe, pi, fd, fs = [], [], [], [], [], [], []
        for i in range(reps):
            f, t = _minflt(), time.perf_counter()
            dense_step(i)
            td.append(time.perf_counter() - t)
            fd.append(_minflt() - f)
            f, t = _minflt(), time.perf_counter()
            s2h_step(i)
            ts.append(time.perf_counter() - t)
            fs.append(_minflt() - f)
            pd.append(passes(dense, i))
            pe.append(passes(exported, i))
            pi.append(passes(dense, i, input_grad_only=True))
        dense_ms, ms = 1e3 * statistics.median(td), 1e3 * statistics.median(ts)

        def med(rows, j):
            return statistics.median(r[j] for r in rows)

        fwd, bwd = med(pd, 0), med(pd, 1)
        wall_floor = (fwd + med(pe, 0) + med(pi, 1) + bwd + med(pe, 1)) / (fwd + bwd)
        floor = (4 + 3 * p) / 3
        return {"bench": "s2h_step", "case": "s2h.models/resnet20@28x1", "device": "cpu",
                "threads": threads, "commit": _commit(), "torch": torch.__version__,
                "dtype": "float32", "keep": round(p, 4), "batch": batch, "ms": ms,
                "dense_ms": dense_ms, "ratio_to_dense": ms / dense_ms, "floor": floor,
                "ratio_to_floor": ms / dense_ms / floor, "sharpness": sharpness,
                "wall_floor": wall_floor, "ratio_to_wall_floor": ms / dense_ms / wall_floor,
                "exported_fwd_share": med(pe, 0) / fwd, "exported_bwd_share": med(pe, 1) / bwd,
                "input_grad_bwd_share": med(pi, 1) / bwd,
                "flush_denormal": flush_denormal, "reps": reps, "interleaved": True,
                "malloc_tuned": allocator_state()["tuned"],
                "s2h_faults": statistics.median(fs), "dense_faults": statistics.median(fd)}
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(prev_threads)


def _print_cpu_rows(rows):
    print("\nS2H step vs dense step, CPU (ResNet-20, batch 64, 28x28x1, interleaved medians)")
    print(f"{'threads':>8s}{'p':>7s}{'sharp':>6s}{'ftz':>6s}{'s2h ms':>9s}{'dense ms':>10s}"
          f"{'s2h/dense':>10s}{'floor':>7s}{'/floor':>8s}{'wall floor':>11s}{'/wall':>7s}"
          f"{'malloc':>8s}{'faults':>8s}")
    for r in rows:
        print(f"{r['threads']:8d}{r['keep']:7.3f}{r['sharpness']:6g}{str(r['flush_denormal']):>6s}"
              f"{r['ms']:9.1f}{r['dense_ms']:10.1f}{r['ratio_to_dense']:10.2f}{r['floor']:7.2f}"
              f"{r['ratio_to_floor']:8.2f}{r['wall_floor']:11.2f}{r['ratio_to_wall_floor']:7.2f}"
              f"{'tuned' if r['malloc_tuned'] else 'glibc':>8s}{r['s2h_faults']:8.0f}")


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
    ap.add_argument("--cpu-rows", default="auto", choices=["auto", "yes", "no", "only"],
                    help="the main job's CPU step rows (auto: when no GPU is present)")
    ap.add_argument("--cpu-keep", type=float, default=0.39)
    ap.add_argument("--cpu-reps", type=int, default=7)
    ap.add_argument("--sharpness", default="20,5", help="gate logit half-gaps of the CPU rows")
    ap.add_argument("--malloc", default="both", choices=["both", "default", "tuned"],
                    help="CPU rows with the C library's allocator as it is, after "
                         "s2h.cpu.tune_allocator() (as `s2h prune` runs), or both (tuned last)")
    args = ap.parse_args(argv)
    cpu_rows = []
    if args.cpu_rows in ("yes", "only") or (args.cpu_rows == "auto"
                                             and not torch.cuda.is_available()):
        sharps = [float(v) for v in args.sharpness.split(",")]
        if args.malloc in ("both", "default"):
            for sharp in sharps:
                for ftz in (False, True):
                    cpu_rows.append(run_cpu_case(args.cpu_keep, args.cpu_reps, sharp, ftz))
        if args.malloc in ("both", "tuned"):
            from s2h.cpu import tune_allocator

            tune_allocator()
            for sharp in sharps:
                cpu_rows.append(run_cpu_case(args.cpu_keep, args.cpu_reps, sharp, True))
        _print_cpu_rows(cpu_rows)
        if args.out:
            with open(args.out, "a") as f:
                for r in cpu_rows:
                    f.write(json.dumps(r) + "\n")
        if args.cpu_rows == "only":
            return 0
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
