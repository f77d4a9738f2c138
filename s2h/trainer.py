"""The S2H training loop behind ``s2h prune``: data, optimiser, progress, phases, export.

Everything a run writes goes to ``--out DIR``:

* ``checkpoint.pt``      — written atomically (temp file + rename) at the end of every epoch
  and every ``ckpt_every`` steps; tensors and plain types only, so it loads with
  ``torch.load(weights_only=True)``. It holds everything an exact ``--resume`` needs: the
  position in the epoch, optimizer / scheduler / grad-scaler state, every RNG state
  (:mod:`s2h.checkpoint`);
* ``metrics.jsonl``      — one JSON object per logged step and per epoch;
* ``exported/``          — the pruned model (``s2h.save_exported`` format);
* ``summary.json``       — the final table (dense vs exported) as data (:mod:`s2h.report`);
* ``plots/``             — PNG figures of the run (:mod:`s2h.plots`);
* ``tensorboard/``       — with ``tensorboard=True``, when the package is installed.

The settings are a :class:`s2h.prune_config.PruneConfig`. Under ``torchrun`` every rank trains
on its shard of each global batch; gradients of weights and gates are averaged by
:mod:`s2h.distributed`; rank 0 alone evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as _dist
from .checkpoint import atomic_save as _atomic_save  # (tests wrap trainer._atomic_save)
from .checkpoint import (
    atomic_write,
    load_checkpoint,
    lock_run_dir,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .cpu import tune_allocator
from .export import export_difference, save_exported
from .flops import count_flops
from .numerics import NonFiniteLossError, NonFiniteStateError, first_non_finite, optimizer_step
from .prune_config import PruneConfig, phase_steps, resume_changes, validate_config
from .pruner import S2HPruner
from .report import format_table, log, read_metrics, tensorboard_writer, write_plots
from .utils import use_channels_last

__all__ = [
    "RECALIBRATION_BATCHES",
    "Interrupted",
    "PruneConfig",
    "build_model",
    "build_pruner",
    "compare_latency",
    "count_flops",
    "evaluate",
    "format_table",
    "freeze_for_export",
    "load_checkpoint",
    "read_metrics",
    "recalibrate_for_export",
    "rng_state",
    "run_prune",
    "seed_everything",
    "set_rng_state",
    "train_dense",
]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """``s2h.models`` names first, then any timm model (random init: nothing is downloaded)."""
    from . import models

    if name in models.list_models():
        return models.create_model(name, num_classes=num_classes, in_chans=in_chans)
    if ":" in name or "/" in name:  # hf-hub:org/name, timm/name@...: would download
        raise ValueError(f"model {name!r} names a hub model: s2h prune builds models from "
                         "their architecture name with random weights and downloads nothing; "
                         "pass a plain name (e.g. 'resnet18')")
    try:
        import timm
    except ImportError as exc:  # pragma: no cover
        raise ValueError(f"unknown model {name!r}: not in s2h.models ({models.list_models()}) "
                         "and timm is not installed") from exc
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, models.list_models() + timm.list_models(), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}: not in s2h.models {models.list_models()} "
                         f"nor in timm.list_models(){hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; image batches in channels-last on CUDA (see use_channels_last)."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.dim() == 4 and torch.is_floating_point(x):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model_fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable,
             device: torch.device, max_batches: int | None = None, amp: str = "none",
             module: nn.Module | None = None) -> float:
    """Top-1 accuracy (%) of ``model_fn(x)`` over ``loader``, with ``module`` (default:
    ``model_fn`` itself) in eval mode; its training flag is restored afterwards."""
    module = model_fn if module is None else module
    was = module.training
    module.eval()
    try:
        correct = total = 0
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _to_device(x, device), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                out = model_fn(x)
            correct += int((out.argmax(-1) == y).sum())
            total += y.numel()
        return 100.0 * correct / max(1, total)
    finally:
        module.train(was)


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], shape: tuple[int, ...],
                    device: torch.device, rounds: int = 15, warmup: int = 3) -> Any:
    """Median forward latency (ms) of each model for a random input of ``shape``: a
    :class:`s2h.latency.Latency` (a dict of ms, with ``spread`` and ``noisy``).

    The models are timed side by side, alternating within every round, so machine noise hits
    them alike (the ratio is what to read); the rounds are split into 3 blocks whose medians
    must agree within ``s2h.latency.NOISE_LIMIT``, else ``noisy`` is set."""
    from .latency import time_side_by_side

    x = torch.randn(*shape, device=device)
    return time_side_by_side(models, x, rounds, warmup=warmup)


def _lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _gate_lambda(cfg: PruneConfig, total_steps: int) -> Callable[[int], float]:
    if cfg.gate_schedule == "constant":
        return lambda s: 1.0
    return _lr_lambda(total_steps, cfg.warmup_steps)  # cosine (validate_config checks)


def build_pruner(cfg: PruneConfig, model: nn.Module, example: torch.Tensor,
                 warn: bool = True) -> Any:
    """The pruner of ``cfg.method``: S2HPruner (default) or STPPruner."""
    if cfg.method == "stp":
        from .stp import STPPruner

        return STPPruner(model, (example,), cfg.target_flops, divisor=cfg.divisor,
                         trials=cfg.stp_trials, width_step=cfg.stp_width_step,
                         commits_per_round=cfg.stp_commits_per_round, scoring=cfg.stp_scoring,
                         probe_size=cfg.stp_probe_size, expand_prob=cfg.stp_expand_prob,
                         depth=cfg.stp_depth, kd_weight=cfg.stp_kd_weight,
                         rank=cfg.stp_rank, label_weight=cfg.stp_label_weight,
                         full_weight_after=cfg.stp_full_weight_after,
                         seed=cfg.seed,
                         warn=warn)
    if cfg.method != "s2h":
        raise ValueError(f"method must be 's2h' or 'stp', got {cfg.method!r}")
    return S2HPruner(model, (example,), cfg.target_flops, divisor=cfg.divisor, tau=cfg.tau,
                     alpha=cfg.alpha, lam=cfg.lam, variant=cfg.variant, warn=warn,
                     resource_mode=cfg.resource_mode, resource_ratio=cfg.resource_ratio,
                     resource_band=cfg.resource_band)


def _make_optimizer(cfg: PruneConfig, weights: Iterable[torch.Tensor],
                    gates: Iterable[torch.Tensor] | None = None) -> torch.optim.AdamW:
    groups = [{"params": list(weights), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if gates is not None:
        groups.append({"params": list(gates), "lr": cfg.gate_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def train_dense(model: nn.Module, cfg: PruneConfig, train_loader: Any, device: torch.device,
                steps_per_epoch: int, dist_info: _dist.DistInfo | None = None) -> nn.Module:
    """The dense reference: the same architecture, epochs, steps and optimiser, no pruning.

    Also the fine-tuning loop of a plain (e.g. exported) model. Under torchrun every rank calls
    it; gradients are averaged over the ranks like the S2H step's."""
    dist_info = dist_info or _dist.DistInfo()
    _dist.broadcast_state([model], dist_info)
    opt = _make_optimizer(cfg, model.parameters())
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for epoch in range(cfg.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        it = _progress(train_loader, steps_per_epoch, f"dense {epoch + 1}/{cfg.epochs}",
                       cfg.progress and dist_info.is_main)
        for i, (x, y) in enumerate(it):
            if i >= steps_per_epoch:
                break
            x, y = _to_device(x, device), y.to(device)
            opt.zero_grad(set_to_none=True)
            with _autocast(device, cfg.amp):
                loss = F.cross_entropy(model(x).float(), y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            optimizer_step(model, opt, scaler, cfg.max_grad_norm,
                           grad_hook=lambda: _dist.average_gradients(params, dist_info))
            sched.step()
    _dist.broadcast_state([model], dist_info)  # rank 0's BN statistics everywhere
    return model


def run_prune(cfg: PruneConfig) -> dict:
    """Run the whole S2H job described by ``cfg``; returns the summary dict (empty on the
    ranks other than 0 of a torchrun job)."""
    device = _device(cfg.device)
    dist_info = _dist.init_from_env(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    lock = None
    # CPU runs flush float32 denormals to zero: sharp gates put soft masks of ~1e-18 on pruned
    # channels and the backward then runs into denormals, which the CPU computes far slower
    # (bench/s2h_step.py: 5.1 -> 2.5 dense steps per S2H step). A number below 1.2e-38
    # becomes 0; nothing else changes. Restored when the run ends.
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    if device.type == "cpu":  # no page faults per step (s2h/cpu.py); lasts for the process
        tune_allocator()
    try:
        validate_config(cfg)
        lock = lock_run_dir(cfg.out) if dist_info.is_main else None
        return _run(cfg, device, dist_info)
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if lock is not None:
            lock.close()
        _dist.shutdown(dist_info)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: the step under way was finished and a checkpoint
    saved, from which ``--resume`` continues exactly."""

    def __init__(self, checkpoint: str, step: int, epoch: int, batch: int) -> None:
        super().__init__(checkpoint, step, epoch, batch)
        self.checkpoint, self.step, self.epoch, self.batch = checkpoint, step, epoch, batch


def _stop_on_sigint(enabled: bool) -> tuple[dict, Callable[[], Any]]:
    """``(stop, restore)``: while installed, the first SIGINT only sets ``stop["signal"]``
    (the loop finishes its step, saves a checkpoint and raises :class:`Interrupted`); a second
    one raises KeyboardInterrupt at once. Not under torchrun (the ranks could stop at different
    steps) nor outside the main thread: there SIGINT keeps its default behaviour."""
    stop: dict = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        return stop, lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not print: the handler may run in the middle of a buffered write to
        # stderr (the progress bar), and a second buffered write there would raise
        os.write(2, b"\ninterrupt: finishing this step, then saving a checkpoint "
                    b"(Ctrl-C again to stop at once)\n")

    signal.signal(signal.SIGINT, handler)
    return stop, lambda: signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------
# One run, step by step: _run calls the steps below in order
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one run share: settings, data, model, pruner, optimiser, progress."""

    cfg: PruneConfig
    device: torch.device
    dist: _dist.DistInfo
    train_loader: Any
    test_loader: Any
    info: Any
    steps_per_epoch: int
    model: nn.Module
    init_state: dict  # the dense reference starts from here
    example: torch.Tensor
    pruner: Any
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    # where training (re)starts, the running sums of the epoch under way, --resume's changes
    start_epoch: int = 0
    start_batch: int = 0
    sums: dict = field(default_factory=dict)
    n: int = 0
    resume_log: list = field(default_factory=list)
    mlog: IO | None = None  # metrics.jsonl (rank 0)
    tb: Any = None

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def rank_batch(self) -> int:
        return self.cfg.batch_size // self.dist.world_size

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out, "checkpoint.pt")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.out, "metrics.jsonl")


def _run(cfg: PruneConfig, device: torch.device, dist_info: _dist.DistInfo) -> dict:
    world = dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible "
                         f"by the {world} processes")
    seed_everything(cfg.seed)
    if dist_info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    ckpt, changes = _read_resume(cfg, dist_info.is_main)
    run = _set_up(cfg, device, dist_info)
    if ckpt is not None:
        _restore(run, ckpt)
    elif run.main and os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)
    _dist.broadcast_state([run.model, run.pruner.gates], dist_info)
    run.resume_log = list(ckpt.get("resume_changes", [])) if ckpt is not None else []
    if changes:
        run.resume_log.append({"step": run.pruner.step_count,
                               "changes": {k: list(v) for k, v in changes.items()}})
    _train(run)
    return _finish(run)


def _read_resume(cfg: PruneConfig, main: bool) -> tuple[dict | None, dict]:
    """With ``--resume``, before any work: the checkpoint and the settings that changed since
    (a change --resume cannot apply is refused, the others are said)."""
    if not cfg.resume:
        return None, {}
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    bad = first_non_finite(ckpt.get("model", {}).items()) if isinstance(
        ckpt.get("model"), dict) else None
    if bad is not None:
        raise ValueError(f"--resume: {ckpt_path} holds a non-finite value ({bad[0]} = "
                         f"{bad[1]}); it cannot be resumed")
    changes = resume_changes(ckpt.get("config", {}), cfg)
    if changes.get("epochs") and cfg.epochs < int(ckpt["epoch"]):
        raise ValueError(f"--resume --epochs {cfg.epochs}: the checkpoint has already done "
                         f"{int(ckpt['epoch'])} epochs")
    if main and changes:
        log("--resume: applying changed settings: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    return ckpt, changes


def _set_up(cfg: PruneConfig, device: torch.device, dist_info: _dist.DistInfo) -> _Run:
    """Loaders, model, pruner, optimiser and schedules of a fresh run (in this order: the
    model's initialisation and the example input draw from the seeded global generator)."""
    from .data import build_loaders

    world = dist_info.world_size
    rank_batch = cfg.batch_size // world
    train_loader, test_loader, info = build_loaders(
        cfg.dataset, cfg.data_dir, rank_batch, workers=cfg.workers, seed=cfg.seed,
        test_batch_size=cfg.batch_size, rank=dist_info.rank, world_size=world,
        holdout=cfg.holdout,
    )
    if hasattr(train_loader.dataset, "verify"):  # image folders: every file decodes, or exit 2
        train_loader.dataset.verify()
        test_loader.dataset.verify()
    steps_per_epoch = len(train_loader)
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    model = build_model(cfg.model, info.num_classes, info.in_chans).to(device)
    init_state = copy.deepcopy(model.state_dict())
    size = info.image_size
    example = torch.randn(2, info.in_chans, size, size, device=device)
    pruner = build_pruner(cfg, model, example, warn=dist_info.is_main)
    if dist_info.is_main:
        log(f"s2h prune: {cfg.model} on {cfg.dataset} ({info.num_classes} classes, "
            f"{info.in_chans}x{size}x{size}), target {cfg.target_flops:.2f} of "
            f"{pruner.dense_flops / example.shape[0] / 1e6:.1f} MFLOPs/image, "
            f"{len(pruner.groups)} prunable groups, "
            + (f"variant {cfg.variant}" if cfg.method == "s2h" else "method stp")
            + f", device {device}"
            + (f", {world} processes x batch {rank_batch}" if dist_info.enabled else ""))
    opt = _make_optimizer(cfg, pruner.weight_parameters(), pruner.gate_parameters())
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [_lr_lambda(total_steps, cfg.warmup_steps), _gate_lambda(cfg, total_steps)]
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    return _Run(cfg, device, dist_info, train_loader, test_loader, info, steps_per_epoch,
                model, init_state, example, pruner, opt, sched, scaler)


def _restore(run: _Run, ckpt: dict) -> None:
    """Continue from ``ckpt``: states, position, RNGs; metrics.jsonl rows logged after the
    checkpoint are dropped (they are redone)."""
    cfg, opt, sched = run.cfg, run.opt, run.sched
    try:
        run.model.load_state_dict(ckpt["model"])
        run.pruner.load_state_dict(ckpt["pruner"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"--resume: {run.ckpt_path} does not fit this run "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    # what this run says, not what the checkpoint held (the same values when unchanged):
    # the learning rates continue on the new schedule, the pruner aims at the new target
    sched.base_lrs = [cfg.lr, cfg.gate_lr]
    for g, base, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        g["initial_lr"] = base
        g["lr"] = base * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    if hasattr(run.pruner, "target_flops"):
        run.pruner.target_flops = float(cfg.target_flops)
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.start_epoch, run.start_batch = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
    run.sums, run.n = dict(ckpt.get("epoch_sums", {})), int(ckpt.get("epoch_steps", 0))
    set_rng_state(ckpt["rng"] if isinstance(ckpt["rng"], dict) else {"torch": ckpt["rng"]})
    if run.main:  # rows logged after the checkpoint are redone: drop them, keep the rest
        keep = read_metrics(run.metrics_path, run.pruner.step_count)
        atomic_write(run.metrics_path,
                     lambda f: f.writelines(json.dumps(r) + "\n" for r in keep), "w")
        where = f"epoch {run.start_epoch + 1}, batch {run.start_batch}" if run.start_batch \
            else f"the end of epoch {run.start_epoch}"
        log(f"resumed from {run.ckpt_path} at {where} (step {run.pruner.step_count})")


def _save_checkpoint(run: _Run, epochs_done: int, batch: int) -> None:
    """Every rank joins the broadcast; rank 0 alone writes. Rows logged so far are flushed
    first, so the checkpoint never runs ahead of metrics.jsonl."""
    model, pruner = run.model, run.pruner
    _dist.broadcast_state([model], run.dist)
    if not run.main:
        return
    run.mlog.flush()
    os.fsync(run.mlog.fileno())
    # never replace a good checkpoint with a state that holds NaN/inf
    bad = first_non_finite([*((f"parameter {k!r}", v) for k, v in model.state_dict().items()),
                            *((f"gate {k!r}", g.logits) for k, g in pruner.gates.items())])
    if bad is not None:
        good = run.ckpt_path if os.path.exists(run.ckpt_path) else "none yet"
        raise NonFiniteStateError(
            f"the model state to checkpoint holds a non-finite value ({bad[0]} = {bad[1]}); "
            f"it was not written. Last good checkpoint (left untouched): {good}")
    _atomic_save({"format": "s2h-checkpoint", "version": 2, "config": asdict(run.cfg),
                  "resume_changes": run.resume_log,
                  "epoch": epochs_done, "batch": batch, "step": pruner.step_count,
                  "world_size": run.dist.world_size,
                  "epoch_sums": run.sums, "epoch_steps": run.n,
                  "model": model.state_dict(), "pruner": pruner.state_dict(),
                  "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                  "scaler": run.scaler.state_dict() if run.scaler is not None else {},
                  "rng": rng_state()}, run.ckpt_path)


def _train(run: _Run) -> None:
    """Every epoch from where the run starts: train, evaluate, checkpoint. Ctrl-C: the step
    under way is finished, a checkpoint saved and :class:`Interrupted` raised."""
    cfg = run.cfg
    run.tb = tensorboard_writer(cfg.tensorboard and run.main, cfg.out)
    run.mlog = open(run.metrics_path, "a") if run.main else None  # noqa: SIM115 (closed below)
    stop, restore_sigint = _stop_on_sigint(not run.dist.enabled)
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            t0 = time.time()
            skip = run.start_batch if epoch == run.start_epoch else 0
            if skip == 0:
                run.sums, run.n = {}, 0
            ran = _train_epoch(run, epoch, skip, stop)
            train_seconds = time.time() - t0
            _dist.broadcast_state([run.model], run.dist)
            if run.main:
                _end_of_epoch_report(run, epoch, t0, train_seconds, ran)
            _save_checkpoint(run, epoch + 1, 0)
            if stop["signal"] is not None:  # Ctrl-C in the epoch's last step or its evaluation
                raise Interrupted(run.ckpt_path, run.pruner.step_count, epoch + 2, 0)
    finally:
        restore_sigint()
        if run.mlog is not None:
            run.mlog.close()
        if run.tb is not None:
            run.tb.close()


def _step_phase(run: _Run) -> tuple[Callable, str]:
    """The step function and phase name of the next step (METHOD §4), decided from the step
    count alone, so a resumed run lands in the same phase as the run it continues: the gate
    warm-up, the importance reset at its end, the freeze of the architecture."""
    cfg, pruner = run.cfg, run.pruner
    step_fn, phase = pruner.train_step, cfg.method
    if cfg.method != "s2h":
        return step_fn, phase
    gate_warmup, freeze_step = phase_steps(cfg, cfg.epochs * run.steps_per_epoch)
    s = pruner.step_count
    if s < gate_warmup:
        step_fn, phase = pruner.warmup_step, "warmup"
    elif s == gate_warmup and gate_warmup > 0 and cfg.importance_from == "warmup":
        pruner.reset_importance()
    if s >= freeze_step and not pruner.arch_frozen:
        proj = pruner.freeze_architecture()
        if run.main:
            log(f"step {s}: architecture frozen at a FLOPs ratio of "
                f"{proj['ratio_after']:.3f}" + (
                    f" (projected from {proj['ratio_before']:.3f}: "
                    f"{proj['steps']} divisor steps)" if proj["needed"] else ""))
    return step_fn, "frozen" if pruner.arch_frozen else phase


def _train_epoch(run: _Run, epoch: int, skip: int, stop: dict) -> int:
    """The steps of ``epoch`` after its first ``skip`` batches; returns how many ran."""
    cfg, pruner, opt, device = run.cfg, run.pruner, run.opt, run.device
    steps = run.steps_per_epoch
    params = [p for group in opt.param_groups for p in group["params"]]
    sync_grads = (lambda: _dist.average_gradients(params, run.dist)) if run.dist.enabled \
        else None
    # same data order after --resume, without loading the batches already done
    run.train_loader.sampler.set_epoch(epoch, skip=skip * run.rank_batch)
    it = _progress(run.train_loader, steps - skip, f"s2h {epoch + 1}/{cfg.epochs}",
                   cfg.progress and run.main)
    ran = 0  # steps this process ran in this epoch (for the time per step)
    for i, (x, y) in enumerate(it, start=skip):
        if i >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lrs = [g["lr"] for g in opt.param_groups]  # the rates this step uses
        step_fn, phase = _step_phase(run)
        try:
            with _autocast(device, cfg.amp):
                m = step_fn(x, y, opt, scaler=run.scaler, max_grad_norm=cfg.max_grad_norm,
                            grad_hook=sync_grads)
        except NonFiniteLossError as exc:
            good = run.ckpt_path if os.path.exists(run.ckpt_path) else "none yet"
            exc.args = (f"{exc.args[0]} Stopped at epoch {epoch + 1}, step {i}; "
                        f"last good checkpoint (left untouched): {good}",)
            raise
        run.sched.step()
        run.n += 1
        ran += 1
        for k, v in m.items():
            run.sums[k] = run.sums.get(k, 0.0) + v
        step = pruner.step_count
        if hasattr(it, "set_postfix"):  # every step (drawn at most once a second), so the
            # bar's last value is the one the epoch line prints
            it.set_postfix(loss=f"{m['loss']:.3f}", hard_flops=f"{m['hard_flops_ratio']:.3f}",
                           hard_acc=f"{m['hard_acc']:.2f}", refresh=False)
        if run.main and cfg.log_every and step % cfg.log_every == 0:
            _log_step(run, {"kind": "step", "epoch": epoch + 1, "step": step, "phase": phase,
                            "lr": lrs[0], "gate_lr": lrs[1], **m, "widths": pruner.widths()}, m)
        checkpointed = bool(cfg.ckpt_every and step % cfg.ckpt_every == 0)
        if checkpointed and i + 1 < steps:
            _save_checkpoint(run, epoch, i + 1)
        if stop["signal"] is not None and i + 1 < steps:
            if not checkpointed:
                _save_checkpoint(run, epoch, i + 1)
            if hasattr(it, "close"):
                it.close()
            raise Interrupted(run.ckpt_path, pruner.step_count, epoch + 1, i + 1)
    return ran


def _log_step(run: _Run, row: dict, metrics: dict) -> None:
    run.mlog.write(json.dumps(row) + "\n")
    run.mlog.flush()  # readable at once (python -m s2h.plots on a running job)
    if run.tb is not None:
        for k, v in metrics.items():
            run.tb.add_scalar(f"train/{k}", v, row["step"])


def _end_of_epoch_report(run: _Run, epoch: int, t0: float, train_seconds: float,
                         ran: int) -> None:
    """Rank 0: test accuracies of the soft and hard networks, the epoch's metrics row and
    line."""
    cfg, pruner = run.cfg, run.pruner
    avg = {k: v / max(1, run.n) for k, v in run.sums.items()}
    soft_acc = evaluate(pruner.soft_forward, run.test_loader, run.device, cfg.eval_batches,
                        cfg.amp, module=run.model)
    hard_acc = evaluate(pruner.hard_forward, run.test_loader, run.device, cfg.eval_batches,
                        cfg.amp, module=run.model)
    row = {"kind": "epoch", "epoch": epoch + 1, "step": pruner.step_count,
           "train": avg, "test_soft_acc": soft_acc, "test_hard_acc": hard_acc,
           "hard_flops_ratio": pruner.hard_flops_ratio(), "widths": pruner.widths(),
           "seconds": time.time() - t0, "train_seconds": train_seconds, "train_steps": ran}
    run.mlog.write(json.dumps(row) + "\n")
    run.mlog.flush()
    if run.tb is not None:
        run.tb.add_scalar("test/soft_acc", soft_acc, row["step"])
        run.tb.add_scalar("test/hard_acc", hard_acc, row["step"])
        run.tb.add_scalar("test/hard_flops_ratio", row["hard_flops_ratio"], row["step"])
    log(f"epoch {epoch + 1}/{cfg.epochs}  loss {avg.get('loss', float('nan')):.3f} "
        + (f"(perf {avg.get('perf', 0):.3f} kd {avg.get('kd', 0):.4f})  "
           if cfg.method == "stp" else
           f"(perf {avg.get('perf', 0):.3f} gap {avg.get('gap_weights', 0):.4f} "
           f"res {avg.get('resource', 0):.4f})  ")
        + f"test acc soft {soft_acc:.2f}% "
        f"hard {hard_acc:.2f}%  hard FLOPs {row['hard_flops_ratio']:.3f}  "
        f"{row['seconds']:.0f}s")


#: training batches the hard network's BatchNorm statistics are re-estimated on before export
RECALIBRATION_BATCHES = 20


def freeze_for_export(cfg: PruneConfig, pruner: Any) -> None:
    """Every export of a run is of a frozen architecture, projected onto the budget (an S2H run
    with ``freeze_arch_at=1``, a checkpoint taken before the freeze, or an STP run whose
    exploration did not reach the target in its steps, is frozen here)."""
    if not pruner.arch_frozen:
        pruner.freeze_architecture()


def recalibrate_for_export(cfg: PruneConfig, pruner: Any, train_loader: Any) -> int:
    """The BatchNorm recalibration of every export of a run (its ``exported/`` and ``s2h
    export CHECKPOINT``): the first :data:`RECALIBRATION_BATCHES` training batches of epoch
    index ``cfg.epochs`` — a fixed index, so the same batches whether or not the run was
    resumed (the data order and augmentation are a function of seed and epoch only)."""
    train_loader.sampler.set_epoch(cfg.epochs)
    return pruner.recalibrate_bn(((x,) for x, _ in train_loader),
                                 max_batches=RECALIBRATION_BATCHES)


def _finish(run: _Run) -> dict:
    """After training: export, the dense reference, latency, ``summary.json``, plots and the
    table (rank 0; the other ranks join the dense training and return ``{}``)."""
    cfg, pruner = run.cfg, run.pruner
    freeze_for_export(cfg, pruner)
    n_recal = recalibrate_for_export(cfg, pruner, run.train_loader)
    _dist.broadcast_state([run.model], run.dist)
    rows: dict = {}
    exported = checks = None
    if run.main:
        exported, checks = _export(run, rows)
    dense, dense_step_s = _dense_reference(run)
    if not run.main:
        _dist.barrier(run.dist)
        return {}
    acc = evaluate(dense, run.test_loader, run.device, cfg.eval_batches) \
        if cfg.dense_baseline else None
    rows["dense"] = {"accuracy": acc, "flops": count_flops(dense, run.example[:1]),
                     "params": sum(p.numel() for p in dense.parameters())}
    noisy = _latency(run, rows, dense, exported) if cfg.latency else {}
    summary = _summary(run, rows, checks, n_recal, noisy, dense_step_s)
    atomic_write(os.path.join(cfg.out, "summary.json"),
                 lambda f: json.dump(summary, f, indent=1), "w")
    if cfg.plots:
        write_plots(cfg.out, summary)
    log(format_table(summary))
    _dist.barrier(run.dist)
    return summary


def _export(run: _Run, rows: dict) -> tuple[nn.Module, dict]:
    """Rank 0: the hard network's accuracy, the exported model (saved, measured) and how far
    its outputs are from the hard network's (fp32, first test batch)."""
    cfg, device, test_loader = run.cfg, run.device, run.test_loader
    hard_acc = evaluate(run.pruner.hard_forward, test_loader, device, cfg.eval_batches,
                        module=run.model)
    exported = run.pruner.export().to(device)
    use_channels_last(exported, device)
    exp_acc = evaluate(exported, test_loader, device, cfg.eval_batches)
    x_cmp = next(iter(test_loader))[0].to(device)
    diff, tol = export_difference(run.pruner.hard_forward, run.model, exported, x_cmp)
    save_exported(exported, os.path.join(cfg.out, "exported"))
    rows["exported"] = {"accuracy": exp_acc, "flops": count_flops(exported, run.example[:1]),
                        "params": sum(p.numel() for p in exported.parameters())}
    return exported, {"hard_acc": hard_acc, "diff": diff, "tol": tol}


def _dense_reference(run: _Run) -> tuple[nn.Module, float | None]:
    """The dense model of the same architecture, trained from the same initial weights when
    ``dense_baseline`` (every rank trains it, rank 0 reports); its seconds per step."""
    cfg = run.cfg
    dense = build_model(cfg.model, run.info.num_classes, run.info.in_chans).to(run.device)
    use_channels_last(dense, run.device)
    if not cfg.dense_baseline:
        return dense, None
    dense.load_state_dict(run.init_state)
    if run.main:
        log(f"training the dense reference ({cfg.epochs} epochs x {run.steps_per_epoch} steps)")
    t_dense = time.time()
    train_dense(dense, cfg, run.train_loader, run.device, run.steps_per_epoch, run.dist)
    return dense, (time.time() - t_dense) / max(1, cfg.epochs * run.steps_per_epoch)


def _latency(run: _Run, rows: dict, dense: nn.Module, exported: nn.Module) -> dict:
    """Batch-1 and batch-64 latency of dense vs exported into ``rows``; returns, per latency
    key, whether the repeated medians disagreed (s2h.latency)."""
    info = run.info
    shape1 = (1, info.in_chans, info.image_size, info.image_size)
    shape_b = (64, info.in_chans, info.image_size, info.image_size)
    noisy = {}
    pair = {"dense": dense, "exported": exported}
    for key, shape, rounds in (("latency_ms_b1", shape1, 30), ("latency_ms_b64", shape_b, 12)):
        lat = compare_latency(pair, shape, run.device, rounds)
        for name, ms in lat.items():
            rows[name][key] = ms
            rows[name][key.replace("_ms_", "_spread_")] = lat.spread[name]
        noisy[key] = lat.noisy
    return noisy


def _summary(run: _Run, rows: dict, checks: dict, n_recal: int, noisy: dict,
             dense_step_s: float | None) -> dict:
    """The content of ``summary.json``."""
    cfg, pruner = run.cfg, run.pruner
    epochs = [r for r in read_metrics(run.metrics_path) if r.get("kind") == "epoch"]
    return {
        "config": asdict(cfg),
        "method": cfg.method,
        "variant": cfg.variant,
        "hard_flops_ratio": pruner.hard_flops_ratio(),
        "exported_flops_ratio": rows["exported"]["flops"] / rows["dense"]["flops"],
        "projection": getattr(pruner, "projection", None),
        "last_epoch": epochs[-1] if epochs else None,
        "hard_acc_after_bn_recalibration": checks["hard_acc"],
        "bn_recalibration_batches": n_recal,
        "export_matches_hard_network": bool(checks["diff"] <= checks["tol"]),
        "export_max_abs_difference": checks["diff"],
        "resume_changes": list(run.resume_log),
        "widths": pruner.widths(),
        "group_channels": pruner.group_channels(),
        "rows": rows,
        "latency_noisy": noisy,
        "device": str(run.device),
        "world_size": run.dist.world_size,
        # the budget: time per training step (data loading included), to size --epochs and
        # --steps-per-epoch; S2H from the epochs this process trained (resumed runs: their part)
        "seconds_per_step": {
            "s2h": (sum(r.get("train_seconds", 0.0) for r in epochs)
                    / max(1, sum(r.get("train_steps", 0) for r in epochs)))
            if any(r.get("train_steps") for r in epochs) else None,
            "dense": dense_step_s},
        "steps": cfg.epochs * run.steps_per_epoch,
        "torch": torch.__version__,
    }
