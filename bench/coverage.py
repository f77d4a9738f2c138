"""Which architectures s2h prunes: the compatibility table of README.md ("Supported models").

    python bench/coverage.py [--models a,b,...] [--readme README.md] [--no-write]

For each model (timm, pretrained=False, or ``s2h.models``) at a small input size, batch 2, on
the CPU: build ``S2HPruner(model, x, 0.4)`` with default arguments, then report

* groups: prunable dependency groups / all groups found (frozen ones are kept whole, with a
  warning naming the reason);
* prunable FLOPs: the share of the dense FLOPs that scales with some group's width;
* train step: two ``pruner.train_step`` calls run and give finite losses;
* export exact: with random widths, ``export()`` is plain (no s2h modules), its eval output
  equals the hard network's, ``torch.utils.flop_counter`` on it equals
  ``pruner.hard_flops_ratio()`` (1%), and ``save_exported`` / ``load_exported`` round-trips it.

A model that s2h cannot handle shows the error (which names the module and the reason). The
table is written between ``<!-- coverage:start -->`` and ``<!-- coverage:end -->`` in the README.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h  # noqa: E402

#: (model, input size, timm kwargs): the paper's families first, then popular timm models
MODELS: list[tuple[str, int, dict]] = [
    ("resnet50", 32, {}),
    ("resnet56", 32, {}),
    ("wrn28_10", 32, {}),
    ("mobilenetv3_large_100", 32, {}),
    ("mobilenetv3_small_100", 32, {}),
    ("efficientnet_b0", 32, {}),
    ("convnext_atto", 32, {}),
    ("vit_small_patch16_224", 64, {"img_size": 64}),
    ("vit_base_patch16_224", 64, {"img_size": 64}),
    ("swin_tiny_patch4_window7_224", 64, {"img_size": 64, "window_size": 4}),
    ("resnet18", 32, {}),
    ("resnet34d", 32, {}),
    ("seresnet50", 32, {}),
    ("resnext50_32x4d", 32, {}),
    ("regnety_002", 32, {}),
    ("mobilenetv2_100", 32, {}),
    ("mnasnet_100", 32, {}),
    ("efficientnet_lite0", 32, {}),
    ("tf_efficientnet_b0", 32, {}),
    ("mixnet_s", 32, {}),
    ("ghostnet_100", 32, {}),
    ("densenet121", 32, {}),
    ("convnext_tiny", 32, {}),
    ("deit_tiny_patch16_224", 64, {"img_size": 64}),
    ("vit_tiny_patch16_224", 64, {"img_size": 64}),
    ("repvgg_a0", 32, {}),
    ("dla34", 32, {}),
]


def _build(name: str, size: int, kw: dict):
    torch.manual_seed(0)
    if name in ("resnet56", "wrn28_10"):
        from s2h import models

        return models.create_model(name, num_classes=10)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _short(exc: BaseException, n: int = 160) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def check(name: str, size: int, kw: dict) -> dict:
    """One row of the table (see the module docstring)."""
    row = {"model": name, "input": f"{size}x{size}", "groups": "-", "flops": "-",
           "train": "-", "export": "-", "note": ""}
    t0 = time.time()
    try:
        model = _build(name, size, kw)
        x = torch.randn(2, 3, size, size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pruner = s2h.S2HPruner(model, x, 0.4)
            except ValueError as exc:  # a group narrower than the default divisor 8
                if "is larger than group" not in str(exc):
                    raise
                pruner = s2h.S2HPruner(model, x, 0.4, divisor=4)
                row["note"] = "divisor=4 (groups of 4 channels). "
        frozen = [str(w.message) for w in caught if "left unpruned" in str(w.message)]
        n_all = sum(1 for g in pruner.analysis.groups if g.producers)
        row["groups"] = f"{len(pruner.groups)}/{n_all}"
        prunable = sum(f for _, f, gates in pruner._flop_terms if gates)
        row["flops"] = f"{100 * prunable / pruner.dense_flops:.0f}%"
        if frozen:
            row["note"] += (f"{len(frozen)} kept whole, e.g. "
                            + frozen[0].split(": ", 1)[-1][:90])
    except Exception as exc:  # the model is not supported: show why
        row["note"] = _short(exc)
        row["time_s"] = round(time.time() - t0, 1)
        return row
    try:
        opt = torch.optim.SGD([{"params": list(pruner.weight_parameters())},
                               {"params": list(pruner.gate_parameters()), "lr": 0.05}], lr=1e-3)
        y = torch.randint(0, 10, (2,))
        ok = True
        for _ in range(2):  # clipped: BatchNorm over 2 samples at 1x1 has huge gradients
            m = pruner.train_step(x, y, opt, max_grad_norm=5.0)
            ok = ok and all(math.isfinite(v) for v in m.values())
        row["train"] = "ok" if ok else "non-finite"
    except Exception as exc:
        row["train"] = "error"
        row["note"] = _short(exc)
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in pruner.gate_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)
        model.eval()
        with torch.no_grad():
            hard = pruner.hard_forward(x)
        exported = pruner.export()
        plain = not any(type(m).__module__ in ("s2h.nn", "s2h.timm_support")
                        for m in exported.modules())
        with torch.no_grad():
            out = exported(x)
        same = bool(torch.allclose(out, hard, rtol=1e-5, atol=1e-5 * float(hard.abs().max())))
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            exported(x)
        flops_ok = abs(fc.get_total_flops() / pruner.dense_flops - pruner.hard_flops_ratio()) \
            <= 0.01 * pruner.hard_flops_ratio()
        with tempfile.TemporaryDirectory() as d:
            loaded = s2h.load_exported(s2h.save_exported(exported, d))
            with torch.no_grad():
                rt = bool(torch.equal(loaded(x), out))
        verdict = [k for k, v in (("not plain", plain), ("output differs", same),
                                  ("FLOPs differ", flops_ok), ("round trip differs", rt))
                   if not v]
        row["export"] = ("exact" if not verdict else ", ".join(verdict)) + \
            f" ({pruner.hard_flops_ratio():.2f})"
    except Exception as exc:
        row["export"] = "error"
        row["note"] = _short(exc)
    row["time_s"] = round(time.time() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | input | groups (prunable/all) | prunable FLOPs | train step | "
             "export exact (hard FLOPs ratio) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['input']} | {r['groups']} | {r['flops']} | "
                     f"{r['train']} | {r['export']} | {r['note']} |")
    return "\n".join(lines)


def write_readme(path: str, text: str) -> None:
    start, end = "<!-- coverage:start -->", "<!-- coverage:end -->"
    with open(path) as f:
        readme = f.read()
    if start not in readme or end not in readme:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + start + "\n" + text + "\n" + end + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="", help="comma-separated subset of the default list")
    ap.add_argument("--readme", default=os.path.join(os.path.dirname(__file__), "..",
                                                      "README.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    wanted = [m for m in args.models.split(",") if m]
    todo = [m for m in MODELS if not wanted or m[0] in wanted]
    rows = []
    t0 = time.time()
    for name, size, kw in todo:
        row = check(name, size, kw)
        rows.append(row)
        print(f"{name:32s} {row['groups']:>8s} {row['flops']:>5s} {row['train']:>6s} "
              f"{row['export']:>22s} {row['time_s']:6.1f}s {row['note'][:80]}", flush=True)
    import timm

    text = (table(rows) + f"\n\nCPU, batch 2, `S2HPruner(model, x, 0.4)` with default arguments "
            f"(divisor 8); torch {torch.__version__}, timm {timm.__version__}; "
            f"`python bench/coverage.py` ({time.time() - t0:.0f} s).")
    print(text)
    if not args.no_write:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
