"""The quality benchmark on real data: ResNet-20 on Fashion-MNIST, several seeds, equal FLOPs.

    python bench/fashion_mnist.py [--steps 300] [--seeds 0 1 2] [--targets 0.15 0.35 0.55]
                                  [--split test|val] [--methods ...] [--no-equal-compute]

For every seed, every row gets the same training budget (``--steps`` optimizer steps at
``--batch-size``) from the same initial weights:

* ``dense``         — the unpruned network;
* ``s2h``           — the S2H loop (``s2h prune`` with its defaults, METHOD §4), no fine-tuning;
* ``no_gap`` / ``coupled_gap`` / ``direct_hard`` — the paper's ablations (``--variant``);
* ``l1_finetune``   — train dense for half the budget, prune every group to a uniform fraction by
  the L1 norm of its producing filters, projected onto the budget like S2H
  (``set_widths(target)`` then ``project_to_budget()``), recalibrate BN, fine-tune the other half;
* ``torch_pruning`` — Torch-Pruning's Group-SL recipe (``GroupNormPruner``: sparse training with
  its group-norm regulariser for half the budget, one-shot global pruning at the smallest ratio
  whose FLOPs are at or below the target (bisection), fine-tuning for the other half). Needs the
  ``torch-pruning`` package (a bench-only optional dependency); skipped with a note otherwise;
* ``stp``           — STPPruner (METHOD §8), not in the default set.

An S2H step costs about ``(4 + 3p)/3`` dense steps (METHOD §6), so unless
``--no-equal-compute`` the two fine-tuning baselines are also run at equal training compute:
``round(steps * (4 + 3 T)/3)`` steps (rows ``l1_finetune@compute``, ``torch_pruning@compute``).

Every pruned row is meant to land at the same exported FLOPs: the table flags rows more than
0.01 away from S2H's ratio. ``--split val`` evaluates every row on the last ``--holdout`` (5000)
training images, which then are not trained on: choose hyper-parameters there, never on the
test set; ``--split test`` (default) is the final report on the 10k test images.

Columns (mean ± std over the seeds): ``exported`` = accuracy of the exported plain model (after BN
recalibration on 20 training batches, as ``s2h prune`` does; for the fine-tuning baselines after
fine-tuning); ``gap`` = soft − hard accuracy at the end of training (S2H and its ablations;
``direct_hard`` has no usable soft network); ``FLOPs ratio`` of the exported model (torch's
counter). Latency: ``bench/export_latency.py``.

Writes ``bench/results/fashion_mnist-<date><tag>.json`` and ``.md`` and, with ``--readme``
(default: the repository's README.md, only for ``--split test``), replaces the table between
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
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from s2h import S2HPruner, load_exported  # noqa: E402
from s2h import trainer as T  # noqa: E402
from s2h.data import build_loaders  # noqa: E402

VARIANTS = ("s2h", "no_gap", "coupled_gap", "direct_hard")
BASELINES = ("l1_finetune", "torch_pruning")
ALL_METHODS = ("dense", *VARIANTS, *BASELINES, "stp")
DEFAULT_METHODS = ("dense", *VARIANTS, *BASELINES)
START, END = "<!-- fashion-mnist:start -->", "<!-- fashion-mnist:end -->"


def _commit() -> str | None:
    if os.environ.get("S2H_BENCH_COMMIT"):  # a copy without .git (the GPU host)
        return os.environ["S2H_BENCH_COMMIT"]
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


def _cfg(args, seed, **kw) -> T.PruneConfig:
    base = dict(model="resnet20", dataset="fashion-mnist", data_dir=args.data_dir,
                batch_size=args.batch_size, seed=seed, device=args.device,
                eval_batches=args.eval_batches, dense_baseline=False, latency=False,
                progress=False, log_every=10, workers=args.workers, plots=False,
                holdout=args.holdout if args.split == "val" else 0)
    base.update(kw)
    return T.PruneConfig(**base)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def equal_compute_steps(steps: int, target: float) -> int:
    """Dense steps with the training compute of ``steps`` S2H steps at FLOPs fraction
    ``target`` (METHOD §6: an S2H step >= (4 + 3p)/3 dense steps)."""
    return round(steps * (4 + 3 * target) / 3)


def _train_with_hook(model, cfg, loader, device, steps, after_backward) -> None:
    """``steps`` AdamW steps of ``model`` on the task loss, warm-up + cosine like every row,
    calling ``after_backward()`` between the backward and the step (a regulariser)."""
    opt = T._make_optimizer(cfg, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T._lr_lambda(steps, cfg.warmup_steps))
    model.train()
    done, epoch = 0, 0
    while done < steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            if done >= steps:
                break
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            after_backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            done += 1
        epoch += 1


def run_seed(args, seed: int, device) -> list[dict]:
    """Every row of one seed (see the module docstring)."""
    T.seed_everything(seed)
    holdout = args.holdout if args.split == "val" else 0
    train_loader, eval_loader, info = build_loaders(
        "fashion-mnist", args.data_dir, args.batch_size, workers=args.workers, seed=seed,
        test_batch_size=args.batch_size, holdout=holdout)
    dense = T.build_model("resnet20", info.num_classes, info.in_chans).to(device)
    init_state = copy.deepcopy(dense.state_dict())
    epochs, spe = _budget(args.steps, len(train_loader))
    steps = epochs * spe
    example = torch.randn(1, info.in_chans, info.image_size, info.image_size, device=device)
    dense_flops = T.count_flops(dense, example)
    rows: list[dict] = []
    methods = set(args.methods)
    t_seed = time.time()

    def log(msg):
        print(f"[seed {seed} {time.time() - t_seed:7.0f}s] {msg}", flush=True)

    def add(row, model):
        row.update(seed=seed, flops=T.count_flops(model, example), params=_params(model))
        row["flops_ratio"] = row["flops"] / dense_flops
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "widths"}))

    def evaluate(fn, module=None):
        return T.evaluate(fn, eval_loader, device, args.eval_batches, module=module)

    def fresh():
        m = T.build_model("resnet20", info.num_classes, info.in_chans).to(device)
        m.load_state_dict(init_state)
        return m

    t0 = time.time()
    acc = None
    if "dense" in methods:
        T.train_dense(dense, _cfg(args, seed, epochs=epochs, steps_per_epoch=spe),
                      train_loader, device, spe)
        acc = evaluate(dense)
    add({"method": "dense", "target": 1.0, "steps": steps, "soft": None, "hard": None,
         "gap": None, "exported": acc, "seconds": time.time() - t0}, dense)

    halves: dict[int, tuple] = {}  # total steps -> (dense model after half of them, its acc, s)

    def dense_half(total):
        if total not in halves:
            e, s = _budget(total // 2, len(train_loader))
            m, t0 = fresh(), time.time()
            T.train_dense(m, _cfg(args, seed, epochs=e, steps_per_epoch=s), train_loader,
                          device, s)
            halves[total] = (m, evaluate(m), e * s, time.time() - t0)
        return halves[total]

    def finetune(model, total, done):
        e, s = _budget(total - done, len(train_loader))
        T.train_dense(model, _cfg(args, seed, epochs=e, steps_per_epoch=s), train_loader,
                      device, s)

    def l1_row(target, total, name):
        half, half_acc, done, half_s = dense_half(total)
        t0 = time.time()
        model = copy.deepcopy(half)
        pruner = S2HPruner(model, (example,), target, warn=False)  # L1 order from these weights
        pruner.set_widths(target)
        pruner.project_to_budget()
        train_loader.sampler.set_epoch(10_000)  # recalibration batches apart from training's
        pruner.recalibrate_bn(((x,) for x, _ in train_loader), max_batches=20)
        hard = evaluate(pruner.hard_forward, module=model)
        pruned = pruner.export().to(device)
        finetune(pruned, total, done)
        add({"method": name, "target": target, "steps": total, "soft": half_acc, "hard": hard,
             "gap": None, "exported": evaluate(pruned), "widths": pruner.widths(),
             "seconds": time.time() - t0 + half_s}, pruned)

    def tp_row(target, total, name):
        try:
            import torch_pruning as tp
        except ImportError:
            log(f"{name}: torch-pruning is not installed (pip install torch-pruning); skipped")
            return
        def group_sl(m, ratio):
            fc = [x for x in m.modules() if isinstance(x, torch.nn.Linear)][-1]
            return tp.pruner.GroupNormPruner(
                m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                reg=args.tp_reg, global_pruning=True, pruning_ratio=ratio,
                max_pruning_ratio=0.95, ignored_layers=[fc])

        t0 = time.time()
        model = fresh()
        pruner = group_sl(model, 0.5)
        half = total // 2
        pruner.update_regularizer()
        _train_with_hook(model, _cfg(args, seed), train_loader, device, half,
                         lambda: pruner.regularize(model))
        sparse_acc = evaluate(model)
        # the smallest global channel-pruning ratio whose FLOPs are at or below the target:
        # bisection over one-shot prunes of copies of the sparse-trained model, keeping the
        # candidate with the most FLOPs at or below the target seen on the way. Widths are not
        # rounded (round_to=8 made the FLOPs jump non-monotonically with the ratio on
        # ResNet-20's 16-channel groups, and 0.15 was out of reach)
        lo, hi, best, best_ratio = 0.0, 0.95, None, -1.0
        for _ in range(14):
            mid = (lo + hi) / 2
            cand = copy.deepcopy(model).eval()
            group_sl(cand, mid).step()
            r = T.count_flops(cand, example) / dense_flops
            if r <= target:
                hi = mid
                if r > best_ratio:
                    best, best_ratio = cand, r
            else:
                lo = mid
        if best is None:
            raise RuntimeError(f"{name}: no Group-SL pruning ratio reaches FLOPs {target}")
        model = best.train()
        pruned_acc = evaluate(model)
        finetune(model, total, half)
        add({"method": name, "target": target, "steps": total, "soft": sparse_acc,
             "hard": pruned_acc, "gap": None, "exported": evaluate(model),
             "seconds": time.time() - t0}, model)

    for target in args.targets:
        if "stp" in methods:  # METHOD §8, the same budget, `s2h prune --method stp` defaults
            # (with --stp-set's changes)
            out = os.path.join(args.work, f"seed{seed}", f"stp-{target:g}")
            cfg = _cfg(args, seed, target_flops=target, method="stp", epochs=epochs,
                       steps_per_epoch=spe, out=out, **args.stp_set)
            t0 = time.time()
            summary = T.run_prune(cfg)
            last = summary["last_epoch"]
            exported = load_exported(os.path.join(out, "exported")).to(device)
            add({"method": "stp", "target": target, "steps": steps,
                 "soft": last["test_soft_acc"], "hard": last["test_hard_acc"], "gap": None,
                 "exported": summary["rows"]["exported"]["accuracy"],
                 "widths": summary["widths"], "seconds": time.time() - t0}, exported)
        for variant in VARIANTS:
            if variant not in methods:
                continue
            out = os.path.join(args.work, f"seed{seed}", f"{variant}-{target:g}")
            cfg = _cfg(args, seed, target_flops=target, variant=variant, epochs=epochs,
                       steps_per_epoch=spe, out=out, **args.s2h_set)
            t0 = time.time()
            summary = T.run_prune(cfg)
            last = summary["last_epoch"]
            exported = load_exported(os.path.join(out, "exported")).to(device)
            gap = None if variant == "direct_hard" else \
                last["test_soft_acc"] - last["test_hard_acc"]
            add({"method": variant, "target": target, "steps": steps,
                 "soft": last["test_soft_acc"], "hard": last["test_hard_acc"], "gap": gap,
                 "exported": summary["rows"]["exported"]["accuracy"],
                 "projection": summary.get("projection"),
                 "widths": summary["widths"], "seconds": time.time() - t0}, exported)
        budgets = [(steps, "")]
        if args.equal_compute:
            budgets.append((equal_compute_steps(steps, target), "@compute"))
        for total, suffix in budgets:
            if "l1_finetune" in methods:
                l1_row(target, total, "l1_finetune" + suffix)
            if "torch_pruning" in methods:
                tp_row(target, total, "torch_pruning" + suffix)
    return rows


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (method, target): mean and std over the seeds."""
    keys = []
    for r in rows:
        if (r["method"], r["target"]) not in keys:
            keys.append((r["method"], r["target"]))
    out = []
    for method, target in keys:
        rs = [r for r in rows if r["method"] == method and r["target"] == target]
        agg = {"method": method, "target": target, "seeds": [r["seed"] for r in rs],
               "steps": rs[0]["steps"]}
        for k in ("exported", "gap", "soft", "hard", "flops_ratio", "params"):
            agg[k], agg[k + "_std"] = _mean_std([r.get(k) for r in rs])
        agg["flops_ratio_min"] = min(r["flops_ratio"] for r in rs)
        agg["flops_ratio_max"] = max(r["flops_ratio"] for r in rs)
        out.append(agg)
    return out


def run(args) -> dict:
    device = torch.device("cpu" if args.device == "auto" and not torch.cuda.is_available()
                          else ("cuda" if args.device == "auto" else args.device))
    t_all = time.time()
    rows = []
    for seed in args.seeds:
        rows += run_seed(args, seed, device)
    steps = next(r["steps"] for r in rows if r["method"] == "dense")
    return {
        "bench": "fashion_mnist",
        "date": datetime.date.today().isoformat(),
        "command": ("python bench/fashion_mnist.py " + " ".join(sys.argv[1:])).strip(),
        "seeds": args.seeds, "steps": steps, "batch_size": args.batch_size,
        "s2h_set": args.s2h_set, "stp_set": args.stp_set,
        # every STP setting the STP row ran with (its defaults of this commit + --stp-set)
        "stp_config": {k: v for k, v in vars(_cfg(args, 0, **args.stp_set)).items()
                       if k.startswith("stp_")},
        "targets": args.targets, "split": args.split,
        "eval": (f"validation: the last {args.holdout} training images"
                 if args.split == "val" else "the 10k test images")
                + ("" if args.eval_batches is None else f", {args.eval_batches} batches"),
        "device": str(device), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": _commit(),
        "started": t_all, "minutes": (time.time() - t_all) / 60,
        "rows": rows, "summary": aggregate(rows),
    }


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def _pm(row, key, fmt="{:.2f}"):
    if row[key] is None:
        return "–"
    return fmt.format(row[key]) + (" ± " + fmt.format(row[key + "_std"])
                                   if len(row["seeds"]) > 1 else "")


def markdown(res: dict) -> str:
    n = len(res["seeds"])
    lines = [
        f"ResNet-20 on Fashion-MNIST (real data), {res['steps']} steps of batch "
        f"{res['batch_size']} per row unless the steps column says more (equal training "
        f"compute), {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, res['seeds']))}), "
        f"mean ± std; evaluated on {res['eval']}; {res['device']}, torch {res['torch']}, "
        f"commit {res['commit']}, "
        + (f"{res['minutes']:.0f} process-minutes in {len(res['merged_from'])} runs, "
           f"{res['wall_minutes']:.0f} min wall. " if res.get("wall_minutes") else
           f"{res['minutes']:.0f} min in all. ")
        + (f"Runs (one process per seed, target and rows, merged with `--merge`), e.g. "
           f"`{res['commands'][0]}`." if res.get("commands") else
           f"Command: `{res['command']}`.")
        + (" STP settings (`--stp-set`): " + ", ".join(f"{k}={v}" for k, v in
                                                      res["stp_set"].items()) + "."
           if res.get("stp_set") else ""),
        "",
        "| target | method | steps | exported acc | gap (soft−hard) | FLOPs ratio | params (k) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = res["summary"]
    for r in summary:
        target = "dense" if r["method"] == "dense" else f"{r['target']:.2f}"
        ref = next((x for x in summary if x["method"] == "s2h" and x["target"] == r["target"]),
                   None)
        flag = ""
        if ref is not None and r["method"] != "dense" and (
                abs(r["flops_ratio_max"] - ref["flops_ratio"]) > 0.01
                or abs(r["flops_ratio_min"] - ref["flops_ratio"]) > 0.01):
            flag = " ⚠ not at S2H's FLOPs (±0.01)"
        ratio = f"{r['flops_ratio']:.3f}"
        if r["flops_ratio_max"] - r["flops_ratio_min"] > 5e-4:
            ratio += f" ({r['flops_ratio_min']:.3f}–{r['flops_ratio_max']:.3f})"
        lines.append(f"| {target} | {r['method']} | {r['steps']} | {_pm(r, 'exported')} "
                     f"| {_pm(r, 'gap')} | {ratio}{flag} | {r['params'] / 1e3:.1f} |")
    if any(r["method"] == "s2h" for r in summary):
        lines += ["", verdict(res)]
    return "\n".join(lines)


def verdict(res: dict) -> str:
    """The goals of issue 17, as the numbers show them (mean over the seeds)."""
    summary = res["summary"]
    dense = next((r for r in summary if r["method"] == "dense"), None)
    out = []
    for t in res["targets"]:
        rows = [r for r in summary if r["method"] != "dense" and r["target"] == t]
        s2h = next((r for r in rows if r["method"] == "s2h"), None)
        if s2h is None or s2h["exported"] is None:
            continue
        best = max(rows, key=lambda r: r["exported"] if r["exported"] is not None else -1)
        text = (f"target {t:.2f}: best mean exported {best['method']} ({best['exported']:.2f}; "
                f"s2h {s2h['exported']:.2f}), s2h gap {s2h['gap']:+.2f}")
        if dense is not None and dense["exported"] is not None:
            text += f", s2h − dense {s2h['exported'] - dense['exported']:+.2f}"
        out.append(text)
    return "Goals (S2H's mean exported accuracy ≥ every other row's; gap ≤ 0.5 pt; within 1 pt " \
        "of dense at 0.35, 2 pts at 0.15): " + "; ".join(out) + "."


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


def _settings(parser: argparse.ArgumentParser, items: list[str],
              flag: str = "--s2h-set") -> dict:
    """``["gate_lr=0.1", ...]`` -> ``{"gate_lr": 0.1}``, typed like PruneConfig's defaults."""
    defaults = T.PruneConfig()
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(defaults, key):
            parser.error(f"{flag} {item!r}: expected KEY=VALUE with KEY a PruneConfig field")
        kind = type(getattr(defaults, key))
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else (
            kind(value) if kind in (int, float, str) else float(value))
    return out


def merge(paths: list[str]) -> dict:
    """One result from several runs of this script (e.g. one process per seed and target, run
    side by side): their rows together, re-aggregated. The runs must share the settings that
    make rows comparable (steps, batch size, split, S2H and STP settings; a run without
    ``stp_set`` predates the option and ran STP's defaults of its time: it counts as ``{}``); a
    dense row is kept once per seed."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    same = ("steps", "batch_size", "split", "eval", "s2h_set", "stp_set")

    def setting(res, k):
        return res.get(k, {}) if k == "stp_set" else res.get(k)

    for res in parts[1:]:
        for k in same:
            if setting(res, k) != setting(parts[0], k):
                raise SystemExit(f"--merge: {k} differs between the runs: "
                                 f"{setting(parts[0], k)!r} vs {setting(res, k)!r}")
    # STP's defaults change between commits: runs with STP rows must have run the same STP
    # settings (a run from before stp_config was recorded has none: it merges only with such)
    stp_runs = [res for res in parts if any(r["method"] == "stp" for r in res["rows"])]
    for res in stp_runs[1:]:
        if res.get("stp_config") != stp_runs[0].get("stp_config"):
            raise SystemExit("--merge: the STP rows ran with different STP settings: "
                             f"{stp_runs[0].get('stp_config')!r} vs {res.get('stp_config')!r}")
    rows, dense_seen = [], set()
    for res in parts:
        for r in res["rows"]:
            if r["method"] == "dense":
                if r["seed"] in dense_seen or r.get("exported") is None:
                    continue  # counted only (no 'dense' in --methods) or already kept
                dense_seen.add(r["seed"])
            elif any((q["method"], q["target"], q["seed"]) == (r["method"], r["target"], r["seed"])
                     for q in rows):
                raise SystemExit(f"--merge: {r['method']} at {r['target']} seed {r['seed']} is "
                                 "in more than one of the runs")
            rows.append(r)
    rows.sort(key=lambda r: (r["seed"], r["method"] != "dense", r["target"]))
    out = dict(parts[0])
    out.update(
        seeds=sorted({r["seed"] for r in rows}),
        targets=sorted({r["target"] for r in rows if r["method"] != "dense"}),
        commit=",".join(sorted({str(r.get("commit")) for r in parts})),
        minutes=sum(r["minutes"] for r in parts),
        wall_minutes=(max(r["started"] + 60 * r["minutes"] for r in parts)
                      - min(r["started"] for r in parts)) / 60
        if all("started" in r for r in parts) else None,
        command="python bench/fashion_mnist.py --merge " + " ".join(
            os.path.basename(p) for p in paths),
        commands=[r["command"] for r in parts],
        merged_from=[os.path.basename(p) for p in paths],
        stp_set=setting(parts[0], "stp_set"),
        stp_config=stp_runs[0].get("stp_config") if stp_runs else parts[0].get("stp_config"),
        rows=rows, summary=aggregate(rows))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300,
                   help="optimizer steps per row (the budget)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="64 x 300 steps (0.32 epochs): the full grid took 316 process-minutes "
                        "on the shared 2-core machine (2026-11-29); at 128, about twice that")
    p.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.35, 0.55])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   choices=list(ALL_METHODS),
                   help="rows to run (without 'dense' the dense model is only counted, untrained)")
    p.add_argument("--no-equal-compute", dest="equal_compute", action="store_false",
                   help="skip the baselines' rows at equal training compute")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="val: evaluate on --holdout training images held out of training")
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--s2h-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="PruneConfig settings of the S2H rows (s2h and its ablations), e.g. "
                        "gate_lr=0.1: choose them with --split val, never on the test set")
    p.add_argument("--stp-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="PruneConfig settings of the STP row, e.g. stp_depth=false "
                        "stp_expand_prob=1: choose them with --split val, never on the test set")
    p.add_argument("--tp-reg", type=float, default=5e-4,
                   help="Torch-Pruning Group-SL: group-norm regularisation strength")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="do not train: merge the results of several runs of this script "
                        "(e.g. one process per seed/target) into one table")
    p.add_argument("--tag", default="", help="suffix of the results files, e.g. '-stp'")
    p.add_argument("--data-dir", default=None, help="default: /usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads. 1 by default: on a shared 2-core machine two "
                        "spinning OpenMP threads per process made a step 5x slower, not faster")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="limit evaluation to this many batches (default: the whole split)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_fashion_mnist"),
                   help="run folders of the pruning rows")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="README to update between the fashion-mnist markers ('' to skip; "
                        "never with --split val)")
    args = p.parse_args(argv)
    args.s2h_set = _settings(p, args.s2h_set)
    args.stp_set = _settings(p, args.stp_set, "--stp-set")
    if any(not k.startswith("stp_") for k in args.stp_set):
        p.error("--stp-set takes STP settings only (stp_*); the others are shared by every row")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # every row with float32 denormals flushed, as `s2h prune` runs on the CPU
    torch.set_flush_denormal(True)
    res = merge(args.merge) if args.merge else run(args)
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"fashion_mnist-{res['date']}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    if args.readme and args.split == "test":
        write_readme(args.readme, table)
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
