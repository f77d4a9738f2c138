"""The discretization-gap experiment on real data: ResNet-20 on Fashion-MNIST.

    python bench/fashion_mnist.py [--steps 300] [--targets 0.15 0.35 0.55] [--seed 0]

Every row gets the same training budget (``--steps`` optimizer steps at ``--batch-size``) from
the same initial weights (same seed):

* ``dense``        — the unpruned network;
* ``s2h``          — the S2H loop (``s2h prune``, METHOD §4), no fine-tuning;
* ``no_gap``       — ablation: no gap (distillation) loss; the hard network is the discretised
  soft one;
* ``coupled_gap``  — ablation: the gap loss without decoupling (plain KL, gradients to all);
* ``direct_hard``  — ablation: the hard network trained on the labels directly, gates through
  its straight-through estimator;
* ``l1_finetune``  — classic baseline: train dense for half the budget, prune every group to
  a uniform fraction by the L1 norm of its producing filters (the pruner's importance order,
  ``set_widths(target)``), recalibrate BN, export, fine-tune for the other half.

Columns: ``soft`` = test accuracy of the relaxed (soft) network, ``hard`` = of the hard network
as trained (its own BN statistics, no recalibration), ``gap`` = soft - hard, ``exported`` =
the exported plain model (after BN recalibration on 20 training batches, as ``s2h prune``
does; for l1_finetune: after fine-tuning; for l1_finetune ``soft`` is the half-budget dense
model and ``hard`` the pruned one before fine-tuning). FLOPs and parameters are counted on the
exported model; CPU latency is the median over rounds in which all models take turns.

Writes ``bench/results/fashion_mnist-<date>.json`` and ``.md`` and, with ``--readme``
(default: the repository's README.md), replaces the table between
``<!-- fashion-mnist:start -->`` and ``<!-- fashion-mnist:end -->``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from s2h import S2HPruner, load_exported, save_exported  # noqa: E402
from s2h import trainer as T  # noqa: E402
from s2h.data import build_loaders  # noqa: E402

VARIANTS = ("s2h", "no_gap", "coupled_gap", "direct_hard")
ALL_METHODS = ("dense", *VARIANTS, "l1_finetune", "stp")
START, END = "<!-- fashion-mnist:start -->", "<!-- fashion-mnist:end -->"


def _commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def _budget(steps: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps per epoch) with epochs * steps_per_epoch == steps (steps is rounded
    down to a multiple of the epoch count when it spans several epochs)."""
    epochs = max(1, math.ceil(steps / batches_per_epoch))
    return epochs, steps // epochs


def _cfg(args, **kw) -> T.PruneConfig:
    base = dict(model="resnet20", dataset="fashion-mnist", data_dir=args.data_dir,
                batch_size=args.batch_size, seed=args.seed, device=args.device,
                eval_batches=args.eval_batches, dense_baseline=False, latency=False,
                progress=False, log_every=10, workers=args.workers)
    base.update(kw)
    return T.PruneConfig(**base)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args) -> dict:
    device = torch.device("cpu" if args.device == "auto" and not torch.cuda.is_available()
                          else ("cuda" if args.device == "auto" else args.device))
    # Seed, loaders, model: the order run_prune uses, so every row starts from the same weights.
    T.seed_everything(args.seed)
    train_loader, test_loader, info = build_loaders(
        "fashion-mnist", args.data_dir, args.batch_size, workers=args.workers, seed=args.seed,
        test_batch_size=args.batch_size)
    dense = T.build_model("resnet20", info.num_classes, info.in_chans).to(device)
    init_state = copy.deepcopy(dense.state_dict())
    epochs, spe = _budget(args.steps, len(train_loader))
    steps = epochs * spe
    example = torch.randn(1, info.in_chans, info.image_size, info.image_size, device=device)
    rows: list[dict] = []
    models: dict[str, torch.nn.Module] = {}
    t_all = time.time()

    def log(msg):
        print(f"[{time.time() - t_all:7.0f}s] {msg}", flush=True)

    def add(row, model):
        row["flops"] = T.count_flops(model, example)
        row["params"] = _params(model)
        rows.append(row)
        models[f"{row['method']}@{row['target']}"] = model.eval()
        log(json.dumps({k: v for k, v in row.items() if k != "widths"}))

    methods = set(args.methods)
    # dense, the full budget (without the "dense" method: untrained, for FLOPs and latency only)
    t0 = time.time()
    acc = None
    if "dense" in methods:
        T.train_dense(dense, _cfg(args, epochs=epochs, steps_per_epoch=spe), train_loader,
                      device, spe)
        acc = T.evaluate(dense, test_loader, device, args.eval_batches)
    add({"method": "dense", "target": 1.0, "soft": None, "hard": None, "gap": None,
         "exported": acc, "seconds": time.time() - t0}, dense)

    # dense for half the budget: the starting point of the L1 rows
    half_epochs, half_spe = _budget(steps // 2, len(train_loader))
    if "l1_finetune" not in methods:
        half_epochs = 0
    dense_half = T.build_model("resnet20", info.num_classes, info.in_chans).to(device)
    dense_half.load_state_dict(init_state)
    t0 = time.time()
    if half_epochs:
        T.train_dense(dense_half, _cfg(args, epochs=half_epochs, steps_per_epoch=half_spe),
                      train_loader, device, half_spe)
        half_acc = T.evaluate(dense_half, test_loader, device, args.eval_batches)
        log(f"dense, half budget ({half_epochs * half_spe} steps): {half_acc:.2f}%")
    half_seconds = time.time() - t0

    for target in args.targets:
        if "stp" in methods:  # METHOD §8, the same budget; faster exploration for short runs
            out = os.path.join(args.work, f"stp-{target:g}")
            cfg = _cfg(args, target_flops=target, method="stp", epochs=epochs,
                       steps_per_epoch=spe, out=out, stp_trials=1, stp_width_step=2,
                       stp_commits_per_round=3)
            t0 = time.time()
            summary = T.run_prune(cfg)
            last = summary["last_epoch"]
            exported = load_exported(os.path.join(out, "exported")).to(device)
            add({"method": "stp", "target": target, "soft": last["test_soft_acc"],
                 "hard": last["test_hard_acc"],
                 "gap": last["test_soft_acc"] - last["test_hard_acc"],
                 "exported": summary["rows"]["exported"]["accuracy"],
                 "hard_flops_ratio": summary["hard_flops_ratio"],
                 "widths": summary["widths"], "seconds": time.time() - t0}, exported)
        for variant in VARIANTS:
            if variant not in methods:
                continue
            out = os.path.join(args.work, f"{variant}-{target:g}")
            cfg = _cfg(args, target_flops=target, variant=variant, epochs=epochs,
                       steps_per_epoch=spe, out=out)
            t0 = time.time()
            summary = T.run_prune(cfg)
            last = summary["last_epoch"]
            exported = load_exported(os.path.join(out, "exported")).to(device)
            add({"method": variant, "target": target, "soft": last["test_soft_acc"],
                 "hard": last["test_hard_acc"],
                 "gap": last["test_soft_acc"] - last["test_hard_acc"],
                 "exported": summary["rows"]["exported"]["accuracy"],
                 "hard_flops_ratio": summary["hard_flops_ratio"],
                 "widths": summary["widths"], "seconds": time.time() - t0}, exported)

        if "l1_finetune" not in methods:
            continue
        # L1-norm pruning of the half-budget dense model, then fine-tuning for the other half
        t0 = time.time()
        model = copy.deepcopy(dense_half)
        pruner = S2HPruner(model, (example,), target, warn=False)  # L1 order from these weights
        pruner.set_widths(target)
        train_loader.sampler.set_epoch(10_000)  # recalibration batches apart from training's
        pruner.recalibrate_bn(((x,) for x, _ in train_loader), max_batches=20)
        hard = T.evaluate(pruner.hard_forward, test_loader, device, args.eval_batches,
                          module=model)
        pruned = pruner.export().to(device)
        ft_epochs, ft_spe = _budget(steps - half_epochs * half_spe, len(train_loader))
        T.train_dense(pruned, _cfg(args, epochs=ft_epochs, steps_per_epoch=ft_spe),
                      train_loader, device, ft_spe)
        acc = T.evaluate(pruned, test_loader, device, args.eval_batches)
        save_exported(pruned, os.path.join(args.work, f"l1_finetune-{target:g}", "exported"))
        add({"method": "l1_finetune", "target": target, "soft": half_acc, "hard": hard,
             "gap": half_acc - hard, "exported": acc,
             "hard_flops_ratio": pruner.hard_flops_ratio(), "widths": pruner.widths(),
             "seconds": time.time() - t0 + half_seconds}, pruned)

    # CPU latency of every model side by side (alternating, so load hits them alike)
    cpu_models = {k: copy.deepcopy(m).cpu() for k, m in models.items()}
    shape1 = (1, info.in_chans, info.image_size, info.image_size)
    shape64 = (64, info.in_chans, info.image_size, info.image_size)
    lat1 = T.compare_latency(cpu_models, shape1, torch.device("cpu"), rounds=30)
    lat64 = T.compare_latency(cpu_models, shape64, torch.device("cpu"), rounds=10)
    dense_flops = rows[0]["flops"]
    for r in rows:
        key = f"{r['method']}@{r['target']}"
        r["flops_ratio"] = r["flops"] / dense_flops
        r["latency_ms_b1"] = lat1[key]
        r["latency_ms_b64"] = lat64[key]
    return {
        "bench": "fashion_mnist",
        "date": datetime.date.today().isoformat(),
        "command": ("python bench/fashion_mnist.py " + " ".join(sys.argv[1:])).strip(),
        "seed": args.seed, "steps": steps, "epochs": epochs, "steps_per_epoch": spe,
        "batch_size": args.batch_size, "targets": args.targets,
        "eval": "full 10k test set" if args.eval_batches is None else
                f"{args.eval_batches} test batches",
        "device": str(device), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": _commit(),
        "minutes": (time.time() - t_all) / 60, "rows": rows,
    }


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    lines = [
        f"ResNet-20 on Fashion-MNIST (real data, 60k train / 10k test), {res['steps']} steps of "
        f"batch {res['batch_size']} for every row (≈{res['steps'] * res['batch_size'] / 60000:.2f} "
        f"epochs), seed {res['seed']}, {res['eval']}; {res['device']}, torch {res['torch']}, "
        f"commit {res['commit']}, {res['minutes']:.0f} min in all. "
        f"Command: `{res['command']}`.",
        "",
        "| target | method | soft acc | hard acc | gap (soft−hard) | exported acc | FLOPs (M) "
        "| FLOPs ratio | params (k) | CPU ms b1 | CPU ms b64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        target = "dense" if r["method"] == "dense" else f"{r['target']:.2f}"
        lines.append(
            f"| {target} | {r['method']} | {_f(r['soft'])} | {_f(r['hard'])} | {_f(r['gap'])} "
            f"| {_f(r['exported'])} | {r['flops'] / 1e6:.2f} | {r['flops_ratio']:.3f} "
            f"| {r['params'] / 1e3:.1f} | {r['latency_ms_b1']:.2f} | {r['latency_ms_b64']:.1f} |")
    if any(r["method"] == "s2h" for r in res["rows"]):
        lines += ["", verdict(res)]
    return "\n".join(lines)


def verdict(res: dict) -> str:
    """Does S2H have the smallest gap and the best exported accuracy at every target?"""
    out = []
    for t in res["targets"]:
        rows = [r for r in res["rows"] if r["method"] != "dense" and r["target"] == t]
        s2h = next(r for r in rows if r["method"] == "s2h")
        gaps = [r for r in rows if r["method"] in VARIANTS]  # l1's "gap" means something else
        best_gap = min(gaps, key=lambda r: abs(r["gap"]))
        best_exp = max(rows, key=lambda r: r["exported"])
        out.append(f"target {t:.2f}: smallest |gap| {best_gap['method']} "
                   f"({best_gap['gap']:+.2f}), best exported {best_exp['method']} "
                   f"({best_exp['exported']:.2f}; s2h {s2h['exported']:.2f})")
    claim = all(
        min((r for r in res["rows"] if r["target"] == t and r["method"] in VARIANTS),
            key=lambda r: abs(r["gap"]))["method"] == "s2h"
        and max((r for r in res["rows"] if r["target"] == t and r["method"] != "dense"),
                key=lambda r: r["exported"])["method"] == "s2h"
        for t in res["targets"])
    return ("Claim \"S2H has the smallest gap and the best exported accuracy at every target\": "
            + ("holds" if claim else "does not hold") + " in this run. " + "; ".join(out) + ".")


def write_readme(path: str, table: str) -> bool:
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        print(f"{path}: markers {START} / {END} not found; README not updated", file=sys.stderr)
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + START + "\n" + table + "\n" + END + tail)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300,
                   help="optimizer steps per row (the budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.35, 0.55])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=list(ALL_METHODS),
                   help="rows to run (without 'dense' the dense model is only timed, untrained)")
    p.add_argument("--tag", default="", help="suffix of the results files, e.g. '-stp'")
    p.add_argument("--data-dir", default=None, help="default: /usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads. 1 by default: on a shared 2-core machine two "
                        "spinning OpenMP threads per process made a step 5x slower, not faster")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="limit evaluation to this many test batches (default: all 10k images)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_fashion_mnist"),
                   help="run folders of the pruning rows")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="README to update between the fashion-mnist markers ('' to skip)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run(args)
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"fashion_mnist-{res['date']}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    if args.readme:
        write_readme(args.readme, table)
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
