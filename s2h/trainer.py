"""The S2H training loop behind ``s2h prune``: data, optimiser, progress, checkpoints, report.

Everything a run writes goes to ``--out DIR``:

* ``checkpoint.pt``      — written atomically (temp file + rename) at the end of every epoch
  and every ``ckpt_every`` steps; tensors and plain types only, so it loads with
  ``torch.load(weights_only=True)``. It holds everything an exact ``--resume`` needs: the
  position in the epoch, optimizer / scheduler / grad-scaler state, every RNG state;
* ``metrics.jsonl``      — one JSON object per logged step and per epoch;
* ``exported/``          — the pruned model (``s2h.save_exported`` format);
* ``summary.json``       — the final table (dense vs exported) as data;
* ``plots/``             — PNG figures of the run (:mod:`s2h.plots`);
* ``tensorboard/``       — with ``tensorboard=True``, when the package is installed.

Under ``torchrun`` every rank trains on its shard of each global batch; gradients of weights
and gates are averaged by :mod:`s2h.distributed`; rank 0 alone evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as _dist
from .export import save_exported
from .pruner import (
    VARIANTS,
    NonFiniteLossError,
    NonFiniteStateError,
    S2HPruner,
    export_difference,
    first_non_finite,
    use_channels_last,
)


@dataclass
class PruneConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    target_flops: float = 0.35
    epochs: int = 3
    steps_per_epoch: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    gate_lr: float = 5e-2
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
    stp_trials: int = 2  # STP: steps each candidate is tried before a commit
    stp_width_step: int = 1  # STP: divisor steps a width candidate narrows by
    stp_commits_per_round: int = 1  # STP: best candidates committed per exploration round
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


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model_fn, loader, device, max_batches=None, amp="none", module=None) -> float:
    """Top-1 accuracy (%) of ``model_fn(x)`` over ``loader``, with ``module`` (default:
    ``model_fn`` itself) in eval mode; its training flag is restored afterwards."""
    module = model_fn if module is None else module
    was = module.training
    module.eval()
    try:
        return _accuracy(model_fn, loader, device, max_batches, amp)
    finally:
        module.train(was)


def _accuracy(model_fn, loader, device, max_batches, amp) -> float:
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


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], shape, device, rounds: int = 15,
                    warmup: int = 3):
    """Median forward latency (ms) of each model for a random input of ``shape``: a
    :class:`s2h.latency.Latency` (a dict of ms, with ``spread`` and ``noisy``).

    The models are timed side by side, alternating within every round, so machine noise hits
    them alike (the ratio is what to read); the rounds are split into 3 blocks whose medians
    must agree within ``s2h.latency.NOISE_LIMIT``, else ``noisy`` is set."""
    from .latency import time_side_by_side

    x = torch.randn(*shape, device=device)
    return time_side_by_side(models, x, rounds, warmup=warmup)


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(example)
    model.train(was)
    return int(fc.get_total_flops())


def _tmp_name(path: str) -> str:
    """A temp name next to ``path`` that no other writer uses (pid + random)."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _atomic_write(path: str, write, mode: str = "wb") -> None:
    """Write ``path`` so that a process killed at any moment leaves either the old file or the
    new one, never a torn one: ``write(f)`` into a unique temp file, fsync, rename over. On an
    error (disk full, ...) the temp file is removed and the old file is left as it was."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        what = "no space left on the device" if exc.errno == errno.ENOSPC else \
            (exc.strerror or str(exc))
        raise OSError(exc.errno, f"could not write {path}: {what}; the previous "
                                 f"{os.path.basename(path)} (if any) is intact") from exc


def _atomic_save(obj, path: str) -> None:
    """``torch.save`` through :func:`_atomic_write`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


class RunDirLocked(ValueError):
    """Another process is writing the same ``--out`` directory."""


def _lock_run_dir(out: str):
    """Create ``out`` and take an exclusive lock on ``out/.lock`` for this run (released when
    the returned file is closed or the process dies). Refuses a second writer clearly."""
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as exc:
        raise ValueError(f"cannot write to --out {out}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise RunDirLocked(f"--out {out} is in use by another s2h run ({holder or 'a process'}); "
                           "wait for it to finish or use another --out") from exc
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


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
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _lr_lambda(total_steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_pruner(cfg: PruneConfig, model: nn.Module, example: torch.Tensor, warn: bool = True):
    """The pruner of ``cfg.method``: S2HPruner (default) or STPPruner."""
    if cfg.method == "stp":
        from .stp import STPPruner

        return STPPruner(model, (example,), cfg.target_flops, divisor=cfg.divisor,
                         trials=cfg.stp_trials, width_step=cfg.stp_width_step,
                         commits_per_round=cfg.stp_commits_per_round, seed=cfg.seed, warn=warn)
    if cfg.method != "s2h":
        raise ValueError(f"method must be 's2h' or 'stp', got {cfg.method!r}")
    return S2HPruner(model, (example,), cfg.target_flops, divisor=cfg.divisor, tau=cfg.tau,
                     alpha=cfg.alpha, lam=cfg.lam, variant=cfg.variant, warn=warn,
                     resource_mode=cfg.resource_mode, resource_ratio=cfg.resource_ratio,
                     resource_band=cfg.resource_band)


def _make_optimizer(cfg: PruneConfig, weights, gates=None):
    groups = [{"params": list(weights), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if gates is not None:
        groups.append({"params": list(gates), "lr": cfg.gate_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def train_dense(model, cfg, train_loader, device, steps_per_epoch, dist_info=None) -> nn.Module:
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
            _dist.average_gradients(params, dist_info)
            if scaler is not None:
                scaler.unscale_(opt)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
    _dist.broadcast_state([model], dist_info)  # rank 0's BN statistics everywhere
    return model


def seed_everything(seed: int) -> None:
    """Seed every generator a run may draw from: torch (CPU and CUDA), python, numpy."""
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    """The state of every generator, as tensors and plain types (``weights_only`` loads it)."""
    np_state = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))


def _gate_lambda(cfg: PruneConfig, total_steps: int):
    if cfg.gate_schedule == "constant":
        return lambda s: 1.0
    if cfg.gate_schedule == "cosine":
        return _lr_lambda(total_steps, cfg.warmup_steps)
    raise ValueError(f"gate_schedule must be 'constant' or 'cosine', got {cfg.gate_schedule!r}")


def _check_phases(cfg: PruneConfig) -> None:
    if not 0.0 < cfg.freeze_arch_at <= 1.0:
        raise ValueError(f"freeze_arch_at is a fraction of training in (0, 1], got "
                         f"{cfg.freeze_arch_at} (1: the architecture is fixed at the end)")
    if cfg.gate_warmup_steps < 0:
        raise ValueError(f"gate_warmup_steps must be >= 0, got {cfg.gate_warmup_steps}")
    if cfg.importance_from not in ("warmup", "init"):
        raise ValueError(f"importance_from must be 'warmup' or 'init', got "
                         f"{cfg.importance_from!r}")


def phase_steps(cfg: PruneConfig, total_steps: int) -> tuple[int, int]:
    """``(gate warm-up steps, step at which the architecture freezes)`` of an S2H run of
    ``total_steps``; the warm-up is capped so the gates train for at least one step."""
    freeze = max(1, min(total_steps, round(cfg.freeze_arch_at * total_steps)))
    return min(cfg.gate_warmup_steps, freeze - 1), freeze


def _budget_line(summary: dict) -> str | None:
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


def _tensorboard(cfg: PruneConfig, main: bool):
    """A SummaryWriter in ``OUT/tensorboard`` if asked for and importable, else None."""
    if not (cfg.tensorboard and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _log("--tensorboard: the tensorboard package is not installed; logging to "
             "metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(os.path.join(cfg.out, "tensorboard"))


def run_prune(cfg: PruneConfig) -> dict:
    """Run the whole S2H job described by ``cfg``; returns the summary dict (empty on the
    ranks other than 0 of a torchrun job)."""
    device = _device(cfg.device)
    dist_info = _dist.init_from_env(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    lock = None
    try:
        validate_config(cfg)
        lock = _lock_run_dir(cfg.out) if dist_info.is_main else None
        return _run(cfg, device, dist_info)
    finally:
        if lock is not None:
            lock.close()
        _dist.shutdown(dist_info)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: the step under way was finished and a checkpoint
    saved, from which ``--resume`` continues exactly."""

    def __init__(self, checkpoint: str, step: int, epoch: int, batch: int):
        super().__init__(checkpoint, step, epoch, batch)
        self.checkpoint, self.step, self.epoch, self.batch = checkpoint, step, epoch, batch


def _stop_on_sigint(enabled: bool):
    """``(stop, restore)``: while installed, the first SIGINT only sets ``stop["signal"]``
    (the loop finishes its step, saves a checkpoint and raises :class:`Interrupted`); a second
    one raises KeyboardInterrupt at once. Not under torchrun (the ranks could stop at different
    steps) nor outside the main thread: there SIGINT keeps its default behaviour."""
    stop: dict = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        return stop, lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not print: the handler may run in the middle of a buffered write to
        # stderr (the progress bar), and a second buffered write there would raise
        os.write(2, b"\ninterrupt: finishing this step, then saving a checkpoint "
                    b"(Ctrl-C again to stop at once)\n")

    signal.signal(signal.SIGINT, handler)
    return stop, lambda: signal.signal(signal.SIGINT, previous)


def _run(cfg: PruneConfig, device: torch.device, dist_info) -> dict:
    from .data import build_loaders

    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")
    _gate_lambda(cfg, 1)  # validate early
    _check_phases(cfg)
    main = dist_info.is_main
    world = dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible "
                         f"by the {world} processes")
    seed_everything(cfg.seed)
    if main:
        os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    rank_batch = cfg.batch_size // world
    ckpt, changes = None, {}
    if cfg.resume:  # before any work: a changed setting is refused or applied, and said so
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
            _log("--resume: applying changed settings: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))

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
    init_state = copy.deepcopy(model.state_dict())  # the dense reference starts from here
    size = info.image_size
    example = torch.randn(2, info.in_chans, size, size, device=device)
    if cfg.method == "stp" and dist_info.enabled:
        raise ValueError("--method stp does not run under torchrun yet: its exploration "
                         "statistics (per-candidate KD losses) are not all-reduced across "
                         "processes, so ranks could commit different architectures")
    pruner = build_pruner(cfg, model, example, warn=main)
    if main:
        _log(f"s2h prune: {cfg.model} on {cfg.dataset} ({info.num_classes} classes, "
             f"{info.in_chans}x{size}x{size}), target {cfg.target_flops:.2f} of "
             f"{pruner.dense_flops / example.shape[0] / 1e6:.1f} MFLOPs/image, "
             f"{len(pruner.groups)} prunable groups, "
             + (f"variant {cfg.variant}" if cfg.method == "s2h" else "method stp")
             + f", device {device}"
             + (f", {world} processes x batch {rank_batch}" if dist_info.enabled else ""))
    opt = _make_optimizer(cfg, pruner.weight_parameters(), pruner.gate_parameters())
    total_steps = cfg.epochs * steps_per_epoch
    gate_warmup, freeze_step = phase_steps(cfg, total_steps)
    s2h_phases = cfg.method == "s2h"
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [_lr_lambda(total_steps, cfg.warmup_steps), _gate_lambda(cfg, total_steps)]
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    params = [p for group in opt.param_groups for p in group["params"]]

    def sync_grads() -> None:
        _dist.average_gradients(params, dist_info)

    start_epoch, start_batch = 0, 0
    sums: dict[str, float] = {}
    n = 0
    if cfg.resume:
        try:
            model.load_state_dict(ckpt["model"])
            pruner.load_state_dict(ckpt["pruner"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise ValueError(f"--resume: {ckpt_path} does not fit this run "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        # what this run says, not what the checkpoint held (the same values when unchanged):
        # the learning rates continue on the new schedule, the pruner aims at the new target
        sched.base_lrs = [cfg.lr, cfg.gate_lr]
        for g, base, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["initial_lr"] = base
            g["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        if hasattr(pruner, "target_flops"):
            pruner.target_flops = float(cfg.target_flops)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
        sums, n = dict(ckpt.get("epoch_sums", {})), int(ckpt.get("epoch_steps", 0))
        set_rng_state(ckpt["rng"] if isinstance(ckpt["rng"], dict) else {"torch": ckpt["rng"]})
        if main:  # rows logged after the checkpoint are redone: drop them, keep the rest
            keep = read_metrics(metrics_path, pruner.step_count)
            _atomic_write(metrics_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in keep),
                          "w")
            where = f"epoch {start_epoch + 1}, batch {start_batch}" if start_batch else \
                f"the end of epoch {start_epoch}"
            _log(f"resumed from {ckpt_path} at {where} (step {pruner.step_count})")
    elif main and os.path.exists(metrics_path):
        os.remove(metrics_path)
    _dist.broadcast_state([model, pruner.gates], dist_info)
    resume_log = list(ckpt.get("resume_changes", [])) if ckpt is not None else []
    if changes:
        resume_log.append({"step": pruner.step_count,
                           "changes": {k: list(v) for k, v in changes.items()}})

    tb = _tensorboard(cfg, main)
    mlog = open(metrics_path, "a") if main else None
    stop, restore_sigint = _stop_on_sigint(not dist_info.enabled)

    def save_checkpoint(epochs_done: int, batch: int) -> None:
        # Every rank joins the broadcast; rank 0 alone writes. Rows logged so far are flushed
        # first, so the checkpoint never runs ahead of metrics.jsonl.
        _dist.broadcast_state([model], dist_info)
        if not main:
            return
        mlog.flush()
        os.fsync(mlog.fileno())
        # never replace a good checkpoint with a state that holds NaN/inf
        bad = first_non_finite([*((f"parameter {k!r}", v) for k, v in model.state_dict().items()),
                                *((f"gate {k!r}", g.logits) for k, g in pruner.gates.items())])
        if bad is not None:
            good = ckpt_path if os.path.exists(ckpt_path) else "none yet"
            raise NonFiniteStateError(
                f"the model state to checkpoint holds a non-finite value ({bad[0]} = {bad[1]}); "
                f"it was not written. Last good checkpoint (left untouched): {good}")
        _atomic_save({"format": "s2h-checkpoint", "version": 2, "config": asdict(cfg),
                      "resume_changes": resume_log,
                      "epoch": epochs_done, "batch": batch, "step": pruner.step_count,
                      "world_size": world,
                      "epoch_sums": sums, "epoch_steps": n,
                      "model": model.state_dict(), "pruner": pruner.state_dict(),
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "scaler": scaler.state_dict() if scaler is not None else {},
                      "rng": rng_state()}, ckpt_path)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            skip = start_batch if epoch == start_epoch else 0
            if skip == 0:
                sums, n = {}, 0
            # same data order after --resume, without loading the batches already done
            train_loader.sampler.set_epoch(epoch, skip=skip * rank_batch)
            it = _progress(train_loader, steps_per_epoch - skip,
                           f"s2h {epoch + 1}/{cfg.epochs}", cfg.progress and main)
            ran = 0  # steps this process ran in this epoch (for the time per step)
            for i, (x, y) in enumerate(it, start=skip):
                if i >= steps_per_epoch:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lrs = [g["lr"] for g in opt.param_groups]  # the rates this step uses
                step_fn, phase = pruner.train_step, cfg.method
                if s2h_phases:  # phases (METHOD §4), decided from the step count alone: resume
                    s = pruner.step_count  # lands in the same phase as the run it continues
                    if s < gate_warmup:
                        step_fn, phase = pruner.warmup_step, "warmup"
                    elif s == gate_warmup and gate_warmup > 0 and cfg.importance_from == "warmup":
                        pruner.reset_importance()
                    if s >= freeze_step and not pruner.arch_frozen:
                        proj = pruner.freeze_architecture()
                        if main:
                            _log(f"step {s}: architecture frozen at a FLOPs ratio of "
                                 f"{proj['ratio_after']:.3f}" + (
                                     f" (projected from {proj['ratio_before']:.3f}: "
                                     f"{proj['steps']} divisor steps)" if proj["needed"] else ""))
                    if pruner.arch_frozen:
                        phase = "frozen"
                try:
                    with _autocast(device, cfg.amp):
                        m = step_fn(x, y, opt, scaler=scaler, max_grad_norm=cfg.max_grad_norm,
                                    grad_hook=sync_grads if dist_info.enabled else None)
                except NonFiniteLossError as exc:
                    good = ckpt_path if os.path.exists(ckpt_path) else "none yet"
                    exc.args = (f"{exc.args[0]} Stopped at epoch {epoch + 1}, step {i}; "
                                f"last good checkpoint (left untouched): {good}",)
                    raise
                sched.step()
                n += 1
                ran += 1
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                step = pruner.step_count
                if hasattr(it, "set_postfix"):  # every step (drawn at most once a second), so
                    # the bar's last value is the one the epoch line prints
                    it.set_postfix(loss=f"{m['loss']:.3f}",
                                   hard_flops=f"{m['hard_flops_ratio']:.3f}",
                                   hard_acc=f"{m['hard_acc']:.2f}", refresh=False)
                if main and cfg.log_every and step % cfg.log_every == 0:
                    mlog.write(json.dumps({"kind": "step", "epoch": epoch + 1, "step": step,
                                           "phase": phase, "lr": lrs[0], "gate_lr": lrs[1], **m,
                                           "widths": pruner.widths()}) + "\n")
                    mlog.flush()  # readable at once (python -m s2h.plots on a running job)
                    if tb is not None:
                        for k, v in m.items():
                            tb.add_scalar(f"train/{k}", v, step)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and i + 1 < steps_per_epoch:
                    save_checkpoint(epoch, i + 1)
                if stop["signal"] is not None and i + 1 < steps_per_epoch:
                    if not (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                        save_checkpoint(epoch, i + 1)
                    if hasattr(it, "close"):
                        it.close()
                    raise Interrupted(ckpt_path, pruner.step_count, epoch + 1, i + 1)
            train_seconds = time.time() - t0
            avg = {k: v / max(1, n) for k, v in sums.items()}
            _dist.broadcast_state([model], dist_info)
            if main:
                soft_acc = evaluate(pruner.soft_forward, test_loader, device, cfg.eval_batches,
                                    cfg.amp, module=model)
                hard_acc = evaluate(pruner.hard_forward, test_loader, device, cfg.eval_batches,
                                    cfg.amp, module=model)
                row = {"kind": "epoch", "epoch": epoch + 1, "step": pruner.step_count,
                       "train": avg, "test_soft_acc": soft_acc, "test_hard_acc": hard_acc,
                       "hard_flops_ratio": pruner.hard_flops_ratio(), "widths": pruner.widths(),
                       "seconds": time.time() - t0, "train_seconds": train_seconds,
                       "train_steps": ran}
                mlog.write(json.dumps(row) + "\n")
                mlog.flush()
                if tb is not None:
                    tb.add_scalar("test/soft_acc", soft_acc, row["step"])
                    tb.add_scalar("test/hard_acc", hard_acc, row["step"])
                    tb.add_scalar("test/hard_flops_ratio", row["hard_flops_ratio"], row["step"])
                _log(f"epoch {epoch + 1}/{cfg.epochs}  loss {avg.get('loss', float('nan')):.3f} "
                     + (f"(perf {avg.get('perf', 0):.3f} kd {avg.get('kd', 0):.4f})  "
                        if cfg.method == "stp" else
                        f"(perf {avg.get('perf', 0):.3f} gap {avg.get('gap_weights', 0):.4f} "
                        f"res {avg.get('resource', 0):.4f})  ")
                     + f"test acc soft {soft_acc:.2f}% "
                     f"hard {hard_acc:.2f}%  hard FLOPs {row['hard_flops_ratio']:.3f}  "
                     f"{row['seconds']:.0f}s")
            save_checkpoint(epoch + 1, 0)
            if stop["signal"] is not None:  # Ctrl-C in the epoch's last step or its evaluation
                raise Interrupted(ckpt_path, pruner.step_count, epoch + 2, 0)
    finally:
        restore_sigint()
        if mlog is not None:
            mlog.close()
        if tb is not None:
            tb.close()

    return _finish(cfg, pruner, model, init_state, train_loader, test_loader, info, device,
                   steps_per_epoch, example, dist_info, resume_log)


def load_checkpoint(path: str) -> dict:
    """Load a training checkpoint safely (``weights_only=True``), with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: the file does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. "
                         "It may be truncated or not an s2h checkpoint.") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "s2h-checkpoint":
        raise ValueError(f"{path} is not an s2h checkpoint")
    return ckpt


#: training batches the hard network's BatchNorm statistics are re-estimated on before export
RECALIBRATION_BATCHES = 20


def freeze_for_export(cfg: PruneConfig, pruner) -> None:
    """Every export of an S2H run is of a frozen architecture, projected onto the budget (a
    run with ``freeze_arch_at=1``, or a checkpoint taken before the freeze, is frozen here)."""
    if cfg.method == "s2h" and not pruner.arch_frozen:
        pruner.freeze_architecture()


def recalibrate_for_export(cfg: PruneConfig, pruner, train_loader) -> int:
    """The BatchNorm recalibration of every export of a run (its ``exported/`` and ``s2h
    export CHECKPOINT``): the first :data:`RECALIBRATION_BATCHES` training batches of epoch
    index ``cfg.epochs`` — a fixed index, so the same batches whether or not the run was
    resumed (the data order and augmentation are a function of seed and epoch only)."""
    train_loader.sampler.set_epoch(cfg.epochs)
    return pruner.recalibrate_bn(((x,) for x, _ in train_loader),
                                 max_batches=RECALIBRATION_BATCHES)


def _finish(cfg, pruner, model, init_state, train_loader, test_loader, info, device,
            steps_per_epoch, example, dist_info, resume_log=()) -> dict:
    main = dist_info.is_main
    freeze_for_export(cfg, pruner)
    n = recalibrate_for_export(cfg, pruner, train_loader)
    _dist.broadcast_state([model], dist_info)
    rows: dict = {}
    exported = None
    hard_acc = exp_acc = None
    ex1 = example[:1]
    if main:
        hard_acc = evaluate(pruner.hard_forward, test_loader, device, cfg.eval_batches,
                            module=model)
        exported = pruner.export().to(device)
        use_channels_last(exported, device)
        exp_acc = evaluate(exported, test_loader, device, cfg.eval_batches)
        # the outputs, not only the accuracies: fp32, on the first test batch
        x_cmp = next(iter(test_loader))[0].to(device)
        exp_diff, exp_tol = export_difference(pruner.hard_forward, model, exported, x_cmp)
        save_exported(exported, os.path.join(cfg.out, "exported"))
        rows["exported"] = {"accuracy": exp_acc, "flops": count_flops(exported, ex1),
                            "params": sum(p.numel() for p in exported.parameters())}
    dense = build_model(cfg.model, info.num_classes, info.in_chans).to(device)
    use_channels_last(dense, device)
    dense_step_s = None
    if cfg.dense_baseline:  # every rank trains it (gradients are averaged), rank 0 reports
        dense.load_state_dict(init_state)
        if main:
            _log(f"training the dense reference ({cfg.epochs} epochs x {steps_per_epoch} steps)")
        t_dense = time.time()
        train_dense(dense, cfg, train_loader, device, steps_per_epoch, dist_info)
        dense_step_s = (time.time() - t_dense) / max(1, cfg.epochs * steps_per_epoch)
    if not main:
        _dist.barrier(dist_info)
        return {}
    acc = evaluate(dense, test_loader, device, cfg.eval_batches) if cfg.dense_baseline else None
    rows["dense"] = {"accuracy": acc, "flops": count_flops(dense, ex1),
                     "params": sum(p.numel() for p in dense.parameters())}
    noisy: dict = {}  # latency key -> the repeated medians disagreed (s2h.latency)
    if cfg.latency:
        shape1 = (1, info.in_chans, info.image_size, info.image_size)
        shape_b = (64, info.in_chans, info.image_size, info.image_size)
        pair = {"dense": dense, "exported": exported}
        for key, shape, rounds in (("latency_ms_b1", shape1, 30), ("latency_ms_b64", shape_b, 12)):
            lat = compare_latency(pair, shape, device, rounds)
            for name, ms in lat.items():
                rows[name][key] = ms
                rows[name][key.replace("_ms_", "_spread_")] = lat.spread[name]
            noisy[key] = lat.noisy
    epochs = [r for r in read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
              if r.get("kind") == "epoch"]
    summary = {
        "config": asdict(cfg),
        "variant": cfg.variant,
        "hard_flops_ratio": pruner.hard_flops_ratio(),
        "exported_flops_ratio": rows["exported"]["flops"] / rows["dense"]["flops"],
        "projection": getattr(pruner, "projection", None),
        "last_epoch": epochs[-1] if epochs else None,
        "hard_acc_after_bn_recalibration": hard_acc,
        "bn_recalibration_batches": n,
        "export_matches_hard_network": bool(exp_diff <= exp_tol),
        "export_max_abs_difference": exp_diff,
        "resume_changes": list(resume_log),
        "widths": pruner.widths(),
        "group_channels": pruner.group_channels(),
        "rows": rows,
        "latency_noisy": noisy,
        "device": str(device),
        "world_size": dist_info.world_size,
        # the budget: time per training step (data loading included), to size --epochs and
        # --steps-per-epoch; S2H from the epochs this process trained (resumed runs: their part)
        "seconds_per_step": {
            "s2h": (sum(r.get("train_seconds", 0.0) for r in epochs)
                    / max(1, sum(r.get("train_steps", 0) for r in epochs)))
            if any(r.get("train_steps") for r in epochs) else None,
            "dense": dense_step_s},
        "steps": cfg.epochs * steps_per_epoch,
        "torch": torch.__version__,
    }
    _atomic_write(os.path.join(cfg.out, "summary.json"),
                  lambda f: json.dump(summary, f, indent=1), "w")
    if cfg.plots:
        _write_plots(cfg.out, summary)
    _log(format_table(summary))
    _dist.barrier(dist_info)
    return summary


def _write_plots(out: str, summary: dict) -> None:
    try:  # matplotlib is optional at run time (s2h.plots imports it lazily: check it here)
        import matplotlib  # noqa: F401

        from .plots import plot_run
    except ImportError:
        _log("plots skipped: matplotlib is not installed (pip install matplotlib, or "
             "pip install 's2h[plots]'; then python -m s2h.plots OUT to draw them)")
        return
    paths = plot_run(os.path.join(out, "metrics.jsonl"), os.path.join(out, "plots"),
                     summary=summary)
    _log("plots: " + ", ".join(os.path.relpath(p, out) for p in paths))


def format_table(summary: dict) -> str:
    d, e = summary["rows"]["dense"], summary["rows"]["exported"]

    def acc(v):
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
    budget = _budget_line(summary)
    if budget is not None:
        lines.append(budget)
    sps = summary.get("seconds_per_step") or {}
    if sps.get("s2h") is not None:
        lines.append(f"time per training step: S2H {sps['s2h']:.2f} s"
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
