"""Figures of an ``s2h prune`` run, drawn from its ``metrics.jsonl`` (matplotlib, Agg backend).

* ``training.png``     — the hard network's FLOPs ratio and accuracy over training (the
  paper's figure 3): train-batch accuracy of the soft and hard networks (moving average) and
  the test accuracy of both at every epoch end;
* ``widths.png``       — the kept fraction of every dependency group over training (figure 5),
  as a heatmap (one row per group, one column per logged step);
* ``final_widths.png`` — kept vs full channels of every group at the end (figure 4).

``python -m s2h.plots RUN_DIR`` redraws them for a finished or running job.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["plot_run"]


def _rows(metrics_path: str) -> list[dict]:
    rows = []
    with open(metrics_path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
    return rows


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (train-batch accuracies are noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _short(name: str) -> str:
    return name.replace("layer", "L").replace(".conv", ".c").replace("features.", "f")


def plot_run(metrics_path: str, out_dir: str, summary: dict | None = None) -> list[str]:
    """Draw the three figures of the run logged in ``metrics_path`` into ``out_dir``.

    ``summary`` (the run's summary.json) supplies the target, the group sizes and the final
    widths; without it they are taken from the metrics alone. Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(metrics_path)
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return []
    os.makedirs(out_dir, exist_ok=True)
    cfg = (summary or {}).get("config", {})
    target = cfg.get("target_flops")
    channels = (summary or {}).get("group_channels") or {}
    written = []

    # --- figure 3: FLOPs ratio and accuracy over training --------------------------------
    fig, (ax_f, ax_a) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 1.3]})
    xs = [r["step"] for r in steps]
    if steps:
        ax_f.plot(xs, [r["hard_flops_ratio"] for r in steps], color="C0", lw=1.8,
                  label="hard network")
    if target is not None:
        ax_f.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    ax_f.set_ylabel("FLOPs / dense FLOPs")
    ax_f.set_ylim(0, 1.05)
    ax_f.grid(alpha=0.3)
    ax_f.legend(loc="upper right", fontsize=9)
    ax_f.set_title(f"{cfg.get('model', '')} on {cfg.get('dataset', '')}: hard network over "
                   f"training ({cfg.get('variant', 's2h')})", fontsize=11)
    window = max(1, len(steps) // 20)
    for key, color, label in (("soft_acc", "C1", "soft (train batch)"),
                              ("hard_acc", "C2", "hard (train batch)")):
        vals = [100 * r[key] for r in steps if key in r]
        if vals:
            ax_a.plot([r["step"] for r in steps if key in r], _smooth(vals, window), color=color,
                      lw=1.2, alpha=0.8,
                      label=label + (f", mean of {window} rows" if window > 1 else ""))
    for key, color, label in (("test_soft_acc", "C1", "soft (test)"),
                              ("test_hard_acc", "C2", "hard (test)")):
        if epochs:
            ax_a.plot([r["step"] for r in epochs], [r[key] for r in epochs], color=color,
                      marker="o", ls="--", lw=1, label=label)
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel("accuracy (%)")
    ax_a.grid(alpha=0.3)
    ax_a.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "training.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # --- figure 5: width of every group over training -------------------------------------
    with_widths = [r for r in steps if "widths" in r] or [r for r in epochs if "widths" in r]
    if with_widths:
        names = list(with_widths[-1]["widths"])
        full = {k: channels.get(k) or max(r["widths"][k] for r in with_widths) for k in names}
        # a heatmap (group x step) of the kept fraction: stays readable for 12 or 50 groups,
        # where one line per group overplots (equal widths) and neighbouring colours blur
        xs_w = [r["step"] for r in with_widths]
        grid = [[r["widths"][k] / full[k] for r in with_widths] for k in names]
        height = min(14.0, max(3.6, 2.2 + 0.22 * len(names)))
        fig, ax = plt.subplots(figsize=(9.0, height))
        half = (xs_w[1] - xs_w[0]) / 2 if len(xs_w) > 1 else 0.5
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0.0, vmax=1.0, origin="upper",
                       extent=(xs_w[0] - half, xs_w[-1] + half, len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)))
        row_pt = (height - 2.2) / len(names) * 72  # height of one group's row, in points
        label_size = max(4.0, min(8.0, 0.5 * row_pt))
        for y in range(1, len(names)):  # thin separators: equal neighbours stay apart
            ax.axhline(y - 0.5, color="white", lw=0.4)
        ax.set_yticklabels([f"{_short(k)} ({full[k]})" for k in names], fontsize=label_size)
        ax.set_xlabel("training step")
        ax.set_ylabel("group (full channels)")
        ax.set_title("kept fraction of every dependency group over training", fontsize=11)
        cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cbar.set_label("kept channels / full width")
        fig.tight_layout()
        path = os.path.join(out_dir, "widths.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        # --- figure 4: final width per layer ----------------------------------------------
        final = (summary or {}).get("widths") or with_widths[-1]["widths"]
        names = list(final)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4.5))
        pos = range(len(names))
        ax.bar(pos, [full.get(k, final[k]) for k in names], color="0.85", label="full width")
        ax.bar(pos, [final[k] for k in names], color="C0", label="kept")
        for x, k in zip(pos, names, strict=True):
            ax.text(x, final[k], str(final[k]), ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(list(pos))
        ax.set_xticklabels([_short(k) for k in names], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("channels")
        ratio = (summary or {}).get("hard_flops_ratio")
        ax.set_title("final width per group" + (f" (FLOPs ratio {ratio:.3f})" if ratio else ""),
                     fontsize=11)
        ax.legend(fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "final_widths.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m s2h.plots RUN_DIR", file=sys.stderr)
        return 2
    run = args[0]
    summary = None
    if os.path.exists(os.path.join(run, "summary.json")):
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
    for p in plot_run(os.path.join(run, "metrics.jsonl"), os.path.join(run, "plots"), summary):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
