"""The settings of an ``s2h prune`` run: :class:`PruneConfig`, their validation, which of them
``--resume`` may change, and the phases (gate warm-up, architecture freeze) they imply."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .losses import VARIANTS


@dataclass
class PruneConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    target_flops: float = 0.35
    epochs: int = 2
    steps_per_epoch: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    gate_lr: float = 0.1  # chosen on --split val (bench/fashion_mnist.py; README)
    weight_decay: float = 5e-4
    alpha: float = 1.0
    lam: float = 4.0
    divisor: int = 8
    tau: float = 1.0
    warmup_steps: int = 50
    # the gates' lr follows the weights' schedule (warm-up + cosine) by default, as in the demo
    gate_schedule: str = "cosine"  # cosine | constant
    resource_mode: str = "normalized"  # normalized | quadratic (S2HPruner.resource_mode)
    resource_ratio: float = 2.0
    resource_band: float = 0.02
    gate_warmup_steps: int = 0  # dense weight training before the gates train
    importance_from: str = "warmup"  # warmup (L1 order at the end of the warm-up) | init
    freeze_arch_at: float = 0.8  # fraction of training; from then on the architecture is fixed
    holdout: int = 0  # > 0: evaluate on that many held-out training images instead of the test set
    variant: str = "s2h"  # s2h | no_gap | coupled_gap | direct_hard (S2HPruner's ablations)
    method: str = "s2h"  # s2h | stp (STPPruner, METHOD §8)
    stp_trials: int = 2  # STP: training steps per exploration round (probe scoring)
    stp_width_step: int = 1  # STP: divisor steps a width candidate narrows by
    stp_commits_per_round: int = 1  # STP: best candidates committed per exploration round
    stp_scoring: str = "probe"  # STP: probe (no-grad forwards on the round's batches) | trial
    stp_probe_size: int = 32  # STP: samples of each batch the candidates are scored on
    stp_expand_prob: float = 0.5  # STP: probability of a second sub-network between base and full
    stp_depth: bool = True  # STP: also explore dropping residual blocks
    stp_kd_weight: float = 1.0  # STP: weight of the sub-network(s)' KL terms
    stp_rank: str = "kd"  # STP commit ranking: kd (METHOD §8) | kd_per_flop (KD added / FLOP saved)
    # STP: weight of the sub-network's own loss on the labels (0: METHOD §8's KD only); 1 was
    # chosen on --split val (bench/results/fashion_mnist-2026-11-29-stp-val-sweep.md)
    stp_label_weight: float = 1.0
    # STP: the full network's loss weight once the architecture is fixed (1 = METHOD §8); 0.5 was
    # chosen on --split val (bench/results/fashion_mnist-2026-11-30-stp-val-sweep.md)
    stp_full_weight_after: float = 0.5
    ckpt_every: int | None = None  # also checkpoint every N steps (mid-epoch)
    max_grad_norm: float | None = 5.0
    amp: str = "none"  # none | bf16 | fp16
    device: str = "auto"
    out: str = "runs/s2h"
    resume: bool = False
    seed: int = 0
    workers: int = 0
    eval_batches: int | None = None
    dense_baseline: bool = True
    latency: bool = True
    log_every: int = 10
    progress: bool = True
    plots: bool = True
    tensorboard: bool = False
    extra: dict = field(default_factory=dict)


def validate_config(cfg: PruneConfig) -> None:
    """Refuse settings that cannot mean anything (ValueError, before any work)."""
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.steps_per_epoch is None or cfg.steps_per_epoch >= 1,
         f"--steps-per-epoch must be >= 1, got {cfg.steps_per_epoch}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (math.isfinite(cfg.gate_lr) and cfg.gate_lr >= 0, f"--gate-lr must be >= 0, got "
                                                          f"{cfg.gate_lr}"),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.ckpt_every is None or cfg.ckpt_every >= 1,
         f"--ckpt-every must be >= 1, got {cfg.ckpt_every}"),
        (cfg.eval_batches is None or cfg.eval_batches >= 1,
         f"--eval-batches must be >= 1, got {cfg.eval_batches}"),
        (cfg.log_every >= 0, f"--log-every must be >= 0, got {cfg.log_every}"),
        (cfg.max_grad_norm is None or cfg.max_grad_norm > 0,
         f"--max-grad-norm must be > 0, got {cfg.max_grad_norm}"),
        (cfg.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {cfg.variant!r}"),
        (cfg.gate_schedule in ("constant", "cosine"),
         f"gate_schedule must be 'constant' or 'cosine', got {cfg.gate_schedule!r}"),
        (0.0 < cfg.freeze_arch_at <= 1.0,
         f"freeze_arch_at is a fraction of training in (0, 1], got {cfg.freeze_arch_at} "
         "(1: the architecture is fixed at the end)"),
        (cfg.gate_warmup_steps >= 0,
         f"gate_warmup_steps must be >= 0, got {cfg.gate_warmup_steps}"),
        (0.0 <= cfg.stp_expand_prob <= 1.0,
         f"--stp-expand-prob is a probability, got {cfg.stp_expand_prob}"),
        (math.isfinite(cfg.stp_kd_weight) and cfg.stp_kd_weight >= 0,
         f"--stp-kd-weight must be >= 0, got {cfg.stp_kd_weight}"),
        (math.isfinite(cfg.stp_full_weight_after) and cfg.stp_full_weight_after >= 0,
         f"--stp-full-weight-after must be >= 0, got {cfg.stp_full_weight_after}"),
        (math.isfinite(cfg.stp_label_weight) and cfg.stp_label_weight >= 0,
         f"--stp-label-weight must be >= 0, got {cfg.stp_label_weight}"),
        (cfg.stp_rank in ("kd", "kd_per_flop"),
         f"--stp-rank must be 'kd' or 'kd_per_flop', got {cfg.stp_rank!r}"),
        (cfg.importance_from in ("warmup", "init"),
         f"importance_from must be 'warmup' or 'init', got {cfg.importance_from!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


#: settings that --resume may change (applied, with a notice); any other difference is refused
RESUME_CHANGEABLE = ("lr", "gate_lr", "epochs", "target_flops", "ckpt_every", "log_every",
                     "progress", "plots", "tensorboard", "eval_batches", "dense_baseline",
                     "latency", "workers", "device", "out", "resume")


def resume_changes(saved: dict, cfg: PruneConfig) -> dict:
    """``{name: (saved, now)}`` of the settings of ``cfg`` that differ from the checkpoint's
    ``saved`` config; raises ValueError listing those that --resume cannot change."""
    now = asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now
            if k in saved and saved.get(k) != now[k] and k not in ("out", "resume")}
    refused = {k: v for k, v in diff.items() if k not in RESUME_CHANGEABLE}
    if refused:
        lines = ", ".join(f"--{k.replace('_', '-')} {a!r} (checkpoint) vs {b!r} (now)"
                          for k, (a, b) in refused.items())
        raise ValueError(f"--resume with settings that differ from the checkpoint's: {lines}. "
                         "These cannot change in the middle of a run; repeat the original "
                         "values, or start a new run in another --out. (--resume may change: "
                         + ", ".join("--" + k.replace("_", "-") for k in RESUME_CHANGEABLE[:4])
                         + ".)")
    return diff


def phase_steps(cfg: PruneConfig, total_steps: int) -> tuple[int, int]:
    """``(gate warm-up steps, step at which the architecture freezes)`` of an S2H run of
    ``total_steps``; the warm-up is capped so the gates train for at least one step."""
    freeze = max(1, min(total_steps, round(cfg.freeze_arch_at * total_steps)))
    return min(cfg.gate_warmup_steps, freeze - 1), freeze
