"""Where one S2H step's time goes: torch.profiler over a few steps, launch and sync counts.

    python bench/profile_step.py [--model resnet50] [--img 32] [--batch 256] [--keep 0.15]
                                 [--fused true,false] [--steps 3] [--out rows.jsonl]

Per path (``fused``): the step's wall time with and without waiting for the device (when the
two are close, the host -- Python and the launches -- is what the step waits for), the number
of kernel launches and of host syncs per step (``cudaLaunchKernel`` / ``cuLaunchKernel``,
``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / device-to-host copies), and the
operators with the most host time. The dense step of the same model is profiled the same way,
as the reference. Runs on the CPU too (no launch counts there).

``--count-ops``: instead, count the aten operators one S2H step dispatches (a
``TorchDispatchMode``; on a GPU nearly every one is a kernel launch: 7,403 ops on the CPU
against 7,494 launches on an H200 for the ResNet-50 two-pass step), grouped by the line of
s2h that issued them (operators the autograd engine runs for a backward count under the
forward line that built them only when Python is on the stack, else under "(engine)").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h  # noqa: E402

LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _model(name, img, device):
    if name.startswith("torchvision."):  # e.g. torchvision.shufflenet_v2_x1_0 (weights=None)
        import torchvision

        m = torchvision.models.get_model(name.split(".", 1)[1], weights=None,
                                         num_classes=100).to(device)
        return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m
    import timm

    kw = {"img_size": img} if "vit" in name else {}
    m = timm.create_model(name, pretrained=False, num_classes=100, **kw).to(device)
    return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m


def _profile(step, device, steps):
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - t0) / steps  # without waiting for the device at the end
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ka = prof.key_averages()
    launches = sum(e.count for e in ka if e.key in LAUNCH) / steps
    syncs = sum(e.count for e in ka if e.key in SYNC) / steps
    d2h = sum(e.count for e in ka if e.key in ("cudaMemcpyAsync", "cudaMemcpy")) / steps
    ops = sorted((e for e in ka if not e.key.startswith("cuda") and not e.key.startswith("cu")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top = [(e.key, e.count / steps, e.self_cpu_time_total / steps / 1e3) for e in ops]
    dev_ms = None
    if device.type == "cuda":
        dev_ms = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                     for e in ka) / steps / 1e3
    return {"wall_ms": wall * 1e3, "host_ms": host * 1e3, "launches": launches, "syncs": syncs,
            "memcpy": d2h, "device_busy_ms": dev_ms, "top_host_ops": top}


def count_ops(step, top: int = 30) -> tuple[int, list]:
    """``(total aten ops, [(count, op, s2h line)])`` of one call of ``step``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    by_site: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            frames = traceback.extract_stack(limit=16)[:-1]
            site = next((f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                         for f in reversed(frames) if f"{os.sep}s2h{os.sep}" in f.filename),
                        "(engine)")
            by_site[(func.overloadpacket.__name__, site)] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    rows = [(c, op, site) for (op, site), c in by_site.most_common(top)]
    return sum(by_site.values()), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--keep", type=float, default=0.15)
    ap.add_argument("--fused", default="true,false")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--count-ops", action="store_true",
                    help="count the aten ops of one S2H step by s2h source line instead")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch if device.type == "cuda" else min(args.batch, 4)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else contextlib.nullcontext())
    x = torch.randn(batch, 3, args.img, args.img, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    rows = []
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    def emit(row: dict) -> None:  # each row as soon as it is measured (a run may be cut short)
        rows.append(row)
        print(f"measured {row['path']}: wall {row['wall_ms']:.1f} ms, {row['launches']:.0f} "
              f"launches, {row['syncs']:.0f} syncs", flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps({"bench": "profile_step", "case": f"{args.model}@{args.img}",
                                     "device": name, "batch": batch, "keep": args.keep,
                                     "commit": os.environ.get("S2H_BENCH_COMMIT"),
                                     "torch": torch.__version__, **row}) + "\n")

    torch.manual_seed(0)
    dense = _model(args.model, args.img, device)
    opt = torch.optim.SGD(dense.parameters(), lr=0.0, momentum=0.9)

    def dense_step(dense=dense, opt=opt):
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = F.cross_entropy(dense(x).float(), y)
        loss.backward()
        opt.step()

    emit({"path": "dense", **_profile(dense_step, device, args.steps)})
    del dense, opt
    for fused in args.fused.split(","):
        f = {"auto": "auto", "false": False, "true": True}[fused]
        torch.manual_seed(0)
        model = _model(args.model, args.img, device)
        try:
            pruner = s2h.S2HPruner(model, x[:2], args.keep, warn=False, fused=f)
        except ValueError as exc:  # fused=True refused: say why, profile two passes instead
            print(f"fused={fused}: {exc}", file=sys.stderr)
            torch.manual_seed(0)
            model = _model(args.model, args.img, device)
            pruner = s2h.S2HPruner(model, x[:2], args.keep, warn=False, fused=False)
        pruner.set_widths(args.keep)
        sopt = torch.optim.SGD([{"params": pruner.weight_parameters()},
                                {"params": pruner.gate_parameters()}], lr=0.0, momentum=0.9)

        def step(pruner=pruner, sopt=sopt):
            with amp:
                pruner.train_step(x, y, sopt)

        if args.count_ops:
            step()  # warm: caches and optimizer state as in a steady step
            total, top = count_ops(step)
            print(f"\n{args.model} S2H step (fused={fused}, lockstep={pruner.lockstep}): "
                  f"{total} aten ops; by s2h line:")
            for c, op, site in top:
                print(f"{c:7d}  {op:24s} {site}")
            continue
        emit({"path": f"s2h fused={fused} lockstep={pruner.lockstep}",
              **_profile(step, device, args.steps)})
        del model, pruner, sopt, step
    print(f"\nS2H step profile: {args.model}@{args.img} b{batch} p={args.keep} {args.dtype} "
          f"on {name}")
    print(f"{'path':36s}{'wall ms':>9s}{'host ms':>9s}{'dev ms':>8s}{'launch':>8s}{'sync':>6s}"
          f"{'memcpy':>7s}")
    for r in rows:
        dev = "-" if r["device_busy_ms"] is None else f"{r['device_busy_ms']:.1f}"
        print(f"{r['path'][:36]:36s}{r['wall_ms']:9.1f}{r['host_ms']:9.1f}{dev:>8s}"
              f"{r['launches']:8.0f}{r['syncs']:6.0f}{r['memcpy']:7.0f}")
    for r in rows:
        print(f"-- {r['path']}: top host ops (calls/step, host ms/step)")
        for k, n, ms in r["top_host_ops"][:8]:
            print(f"   {k[:48]:48s} {n:7.0f} {ms:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
