"""What an ``s2h prune`` run reports: the ``metrics.jsonl`` rows, TensorBoard, the plots and
the final table (dense vs exported, the FLOPs budget line, time per step)."""

from __future__ import annotations

import json
import os
from typing import Any


def log(msg: str) -> None:
    """A line for the user, at once (the progress bars write to stderr in between)."""
    print(msg, flush=True)


def read_metrics(path: str, max_step: int | None = None) -> list[dict]:
    """The rows of ``metrics.jsonl`` (optionally only those up to ``max_step``); a last line
    cut short by a killed process is ignored."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if max_step is None or int(row.get("step", 0)) <= max_step:
                rows.append(row)
    return rows


def tensorboard_writer(enabled: bool, out: str) -> Any:
    """A SummaryWriter in ``out/tensorboard`` if ``enabled`` and importable, else None."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("--tensorboard: the tensorboard package is not installed; logging to "
            "metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def write_plots(out: str, summary: dict) -> None:
    """``out/plots/*.png`` of the run (says why not when matplotlib is missing)."""
    try:  # matplotlib is optional at run time (s2h.plots imports it lazily: check it here)
        import matplotlib  # noqa: F401

        from .plots import plot_run
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install matplotlib, or "
            "pip install 's2h[plots]'; then python -m s2h.plots OUT to draw them)")
        return
    paths = plot_run(os.path.join(out, "metrics.jsonl"), os.path.join(out, "plots"),
                     summary=summary)
    log("plots: " + ", ".join(os.path.relpath(p, out) for p in paths))


def budget_line(summary: dict) -> str | None:
    """One line of the final table: target, exported ratio, what the projection did (None for
    a summary without a target)."""
    proj = summary.get("projection")
    target = summary.get("config", {}).get("target_flops")
    if target is None:
        return None
    exp = summary.get("exported_flops_ratio")
    head = f"FLOPs budget: target {target:.3f}" + (f", exported {exp:.3f}" if exp else "")
    if not proj:
        return head
    if not proj["needed"]:
        return head + f"; projection not needed (hard ratio {proj['ratio_before']:.3f} at step " \
                      f"{proj['at_step']})"
    return head + (f"; projection at step {proj['at_step']}: {proj['ratio_before']:.3f} -> "
                   f"{proj['ratio_after']:.3f} ({proj['steps']} divisor steps in "
                   f"{len(proj['narrowed'])} groups)")


def format_table(summary: dict) -> str:
    """The final table of a run's ``summary.json``: dense vs exported accuracy, FLOPs,
    parameters, latency, then the budget, time per step and export check lines."""
    d, e = summary["rows"]["dense"], summary["rows"]["exported"]

    def acc(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:6.2f}"

    lines = [
        "",
        f"{'':28s}{'dense':>12s}"
        f"{'exported (' + summary['config'].get('method', 's2h').upper() + ')':>18s}{'ratio':>9s}",
        f"{'test accuracy (%)':28s}{acc(d['accuracy']):>12s}{acc(e['accuracy']):>18s}",
        f"{'MFLOPs / image':28s}{d['flops'] / 1e6:12.2f}{e['flops'] / 1e6:18.2f}"
        f"{e['flops'] / d['flops']:9.3f}",
        f"{'parameters (M)':28s}{d['params'] / 1e6:12.3f}{e['params'] / 1e6:18.3f}"
        f"{e['params'] / d['params']:9.3f}",
    ]
    dev = summary.get("device", "cpu").upper()
    noisy = summary.get("latency_noisy", {})
    for key, label in (("latency_ms_b1", "batch 1"), ("latency_ms_b64", "batch 64")):
        if key in d:
            line = f"{dev + ' latency ' + label + ' (ms)':28s}{d[key]:12.2f}{e[key]:18.2f}"
            if noisy.get(key):  # the repeated medians disagree: no ratio to read
                sk = key.replace("_ms_", "_spread_")
                spread = max(d.get(sk, 0.0), e.get(sk, 0.0))
                line += f"  noisy machine (medians spread {100 * spread:.0f}%)"
            else:
                line += f"{d[key] / e[key]:8.2f}x"
            lines.append(line)
    budget = budget_line(summary)
    if budget is not None:
        lines.append(budget)
    sps = summary.get("seconds_per_step") or {}
    if sps.get("s2h") is not None:
        method = "STP" if summary.get("method") == "stp" else "S2H"
        lines.append(f"time per training step: {method} {sps['s2h']:.2f} s"
                     + (f", dense {sps['dense']:.2f} s" if sps.get("dense") is not None else "")
                     + f" ({summary.get('steps')} steps each; --epochs and --steps-per-epoch "
                       "set the budget)")
    hard = summary.get("hard_acc_after_bn_recalibration")
    if hard is not None:
        lines.append(f"hard network after BatchNorm recalibration "
                     f"({summary.get('bn_recalibration_batches')} train batches): "
                     f"test accuracy {hard:.2f}%")
    lines.append(f"exported == hard network: {summary['export_matches_hard_network']}; "
                 f"model saved to {summary['config']['out']}/exported")
    if "export_max_abs_difference" in summary:
        lines.append(f"  (their outputs on a test batch, fp32: max |difference| "
                     f"{summary['export_max_abs_difference']:.2g})")
    return "\n".join(lines)
