"""Checkpoints of ``s2h prune`` runs: atomic writes, the lock on a run directory, loading, and
the state of every random generator (what an exact ``--resume`` needs besides the tensors)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch


def _tmp_name(path: str) -> str:
    """A temp name next to ``path`` that no other writer uses (pid + random)."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def atomic_write(path: str, write: Callable[[IO], Any], mode: str = "wb") -> None:
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


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


class RunDirLocked(ValueError):
    """Another process is writing the same ``--out`` directory."""


def lock_run_dir(out: str) -> IO:
    """Create ``out`` and take an exclusive lock on ``out/.lock`` for this run (released when
    the returned file is closed or the process dies). Refuses a second writer clearly."""
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")  # noqa: SIM115 (held by the run)
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
    """Restore what :func:`rng_state` returned (a state without some generators leaves them)."""
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
