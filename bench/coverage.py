"""Which architectures s2h prunes: the compatibility table of README.md ("Supported models").

    python bench/coverage.py [--models a,b,...|torchvision|timm] [--time-limit S] [--out FILE]
                             [--readme README.md] [--no-write]

For each model (timm, pretrained=False; ``s2h.models``; torchvision, ``weights=None``, rows named
``torchvision.<name>``) at a small input size, batch 2, on the CPU: build
``S2HPruner(model, x, 0.4)`` with default arguments, then report

* groups: prunable dependency groups / all groups found (frozen ones are kept whole, with a
  warning naming the reason);
* prunable FLOPs: the share of the dense FLOPs that scales with some group's width;
* train step: two ``pruner.train_step`` calls run and give finite losses;
* export exact: with random widths, ``export()`` is plain (no s2h masked layers or gates), its
  eval output equals the hard network's, ``torch.utils.flop_counter`` on it equals
  ``pruner.hard_flops_ratio()`` (1%), and ``save_exported`` / ``load_exported`` round-trips it
  (torchvision models are rebuilt by name, with no ``model_fn``).

A model that s2h cannot handle shows the error (which names the module and the reason) in its
row; a model past ``--time-limit`` seconds shows that, and the run goes on. The whole table is
written between ``<!-- coverage:start -->`` and ``<!-- coverage:end -->`` in the README (not when
``--models`` selects a subset, unless ``--readme`` is given); ``--out`` writes it to a file too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h  # noqa: E402
from s2h.nn import ChannelGate, MaskedLayer  # noqa: E402

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
    ("resnetv2_50x1_bit", 32, {}),  # StdConv2d + GroupNormAct
    ("nfnet_l0", 32, {}),  # ScaledStdConv2d
    ("res2net50_14w_8s", 32, {}),  # split along channels
    ("cspresnet50", 32, {}),
    ("skresnet18", 32, {}),
    ("pvt_v2_b0", 64, {}),  # reshapes that read a width
    ("mixer_b16_224", 64, {"img_size": 64}),
    ("mobilevit_xxs", 64, {}),  # unfold / fold of the channels with the batch, concat
    ("mobilevitv2_050", 64, {}),  # GroupNorm1, split([1, self.embed_dim, self.embed_dim])
    # torchvision (weights=None, num_classes=10): the architectures of issue 18
    ("torchvision.resnet50", 64, {}),
    ("torchvision.resnext50_32x4d", 64, {}),
    ("torchvision.regnet_x_400mf", 64, {}),
    ("torchvision.regnet_y_400mf", 64, {}),
    ("torchvision.densenet121", 64, {}),
    ("torchvision.googlenet", 64, {"aux_logits": False, "init_weights": True}),
    ("torchvision.inception_v3", 80, {"aux_logits": False, "init_weights": True}),  # >= 75
    ("torchvision.squeezenet1_1", 64, {}),
    ("torchvision.shufflenet_v2_x1_0", 64, {}),
    ("torchvision.mobilenet_v3_large", 64, {}),
    ("torchvision.efficientnet_b0", 64, {}),
    ("torchvision.convnext_tiny", 64, {}),
    ("torchvision.vgg11_bn", 64, {}),
    ("torchvision.vit_b_16", 64, {"image_size": 64}),  # vit_b_16's layers, 4x4 patches
    ("torchvision.swin_t", 64, {}),
    ("torchvision.maxvit_t", 224, {}),  # every stage's grid must divide by its 7x7 partitions
]
TORCHVISION = "torchvision."


def _build(name: str, size: int, kw: dict):
    torch.manual_seed(0)
    if name.startswith(TORCHVISION):
        import torchvision

        return torchvision.models.get_model(name[len(TORCHVISION):], weights=None,
                                            num_classes=10, **kw)
    if name in ("resnet56", "wrn28_10"):
        from s2h import models

        return models.create_model(name, num_classes=10)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _short(exc: BaseException, n: int = 160) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_TimeLimit` in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise _TimeLimit(f"over the time limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(name: str, size: int, kw: dict, time_limit: float = 0) -> dict:
    """One row of the table (see the module docstring); an error or the time limit ends the
    row with the message in its notes."""
    row = {"model": name, "input": f"{size}x{size}", "groups": "-", "flops": "-",
           "train": "-", "export": "-", "note": ""}
    t0 = time.time()
    try:
        with _time_limit(time_limit):
            _check(row, name, size, kw)
    except _TimeLimit as exc:
        row["note"] += ("; " if row["note"] else "") + _short(exc)
    except Exception as exc:  # anything _check did not catch itself
        row["note"] += ("; " if row["note"] else "") + _short(exc)
    row["time_s"] = round(time.time() - t0, 1)
    gc.collect()
    return row


def _check(row: dict, name: str, size: int, kw: dict) -> None:
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
    except _TimeLimit:
        raise
    except Exception as exc:  # the model is not supported: show why
        row["note"] += _short(exc)
        return
    try:
        opt = torch.optim.SGD([{"params": list(pruner.weight_parameters())},
                               {"params": list(pruner.gate_parameters()), "lr": 0.05}], lr=1e-3)
        y = torch.randint(0, 10, (2,))
        ok = True
        for _ in range(2):  # clipped: BatchNorm over 2 samples at 1x1 has huge gradients
            m = pruner.train_step(x, y, opt, max_grad_norm=5.0)
            ok = ok and all(math.isfinite(v) for v in m.values())
        row["train"] = "ok" if ok else "non-finite"
    except _TimeLimit:
        raise
    except Exception as exc:
        row["train"] = "error"
        row["note"] += ("; " if row["note"] else "") + "train: " + _short(exc)
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in pruner.gate_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)
        model.eval()
        with torch.no_grad():
            hard = pruner.hard_forward(x)
        exported = pruner.export()
        plain = not any(isinstance(m, (MaskedLayer, ChannelGate))
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
    except _TimeLimit:
        raise
    except Exception as exc:
        row["export"] = "error"
        row["note"] += ("; " if row["note"] else "") + "export: " + _short(exc)


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
    ap.add_argument("--models", default="",
                    help="comma-separated subset of the default list; 'torchvision' / 'timm' "
                         "select those rows")
    ap.add_argument("--readme", default=None,
                    help="README to update (default: ../README.md, for a full run only)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--time-limit", type=float, default=1200.0,
                    help="seconds per model (0: none); a model past it shows that in its row")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    wanted = {m for m in args.models.split(",") if m}
    todo = [m for m in MODELS if not wanted or m[0] in wanted
            or ("torchvision" in wanted and m[0].startswith(TORCHVISION))
            or ("timm" in wanted and not m[0].startswith(TORCHVISION))]
    unknown = wanted - {m[0] for m in MODELS} - {"torchvision", "timm"}
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}")
    rows = []
    t0 = time.time()
    for name, size, kw in todo:
        row = check(name, size, kw, args.time_limit)
        rows.append(row)
        print(f"{name:32s} {row['groups']:>8s} {row['flops']:>5s} {row['train']:>6s} "
              f"{row['export']:>22s} {row['time_s']:6.1f}s {row['note'][:80]}", flush=True)
    import timm
    import torchvision

    text = (table(rows) + f"\n\nCPU, batch 2, `S2HPruner(model, x, 0.4)` with default arguments "
            f"(divisor 8); torch {torch.__version__}, timm {timm.__version__}, torchvision "
            f"{torchvision.__version__}; `python bench/coverage.py"
            + (f" --models {args.models}" if wanted else "")
            + f"` ({time.time() - t0:.0f} s, {torch.get_num_threads()} threads).")
    print(text)
    if args.out and not args.no_write:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    readme = args.readme or (None if wanted else os.path.join(os.path.dirname(__file__), "..",
                                                              "README.md"))
    if readme and not args.no_write:
        write_readme(readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
