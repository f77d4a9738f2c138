"""Dispatch: which implementation runs each s2h op, decided in one place.

* **Channel ops** (``gather_channels`` / ``gather_weight`` / scatters, :mod:`s2h.ops`): per call,
  from the tensors' devices -- the compiled extension ``s2h._C`` (C++ / CUDA) where it is built
  for that device, its PyTorch fallback otherwise (``S2H_DISABLE_EXT=1`` forces the fallback).
  That choice lives in :mod:`s2h.ops` itself (``s2h info`` prints it per op).
* **Dual ops** (``dual_linear`` / ``dual_conv2d``, :mod:`s2h.functional`): per call, from
  ``S2H_BACKEND`` and the device, by :func:`backend_for` below:

  - ``auto`` (default): the Triton kernels for CUDA tensors, the PyTorch reference otherwise;
  - ``reference``: the plain PyTorch reference on any device;
  - ``triton``: the Triton kernels always; on CPU tensors only under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before triton is imported: tests only).

The Triton kernels are the ``s2h.kernels`` package (the top-level ``kernels/`` folder of a
source checkout, installed under that name); :func:`load_kernels` finds it either way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["BACKENDS", "TRITON_AVAILABLE", "backend_for", "kernels", "load_kernels",
           "use_triton"]

BACKENDS = ("auto", "reference", "triton")


def load_kernels() -> ModuleType:
    """``s2h.kernels``; from a source checkout that was not installed, the top-level
    ``kernels/`` folder loaded *under that name* (it must never become a bare ``kernels``)."""
    try:
        return importlib.import_module("s2h.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "s2h.kernels":
            raise
        src = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
        if not src.is_file():
            raise
        spec = importlib.util.spec_from_file_location(
            "s2h.kernels", src, submodule_search_locations=[str(src.parent)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["s2h.kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["s2h.kernels"]
            raise
        sys.modules["s2h"].kernels = module  # as the import system would have done
        return module


kernels: ModuleType = load_kernels()
TRITON_AVAILABLE: bool = kernels.TRITON_AVAILABLE


def _requested_backend() -> str:
    name = os.environ.get("S2H_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"S2H_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _triton_unusable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device`` (None when they can)."""
    if not TRITON_AVAILABLE:
        return f"triton is unavailable ({kernels.TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        if kernels.INTERPRET:
            return "TRITON_INTERPRET=1 is set, which runs kernels on CPU tensors only"
        return None
    if device.type == "cpu":
        if kernels.INTERPRET:
            return None
        return (
            "the Triton kernels need CUDA tensors; on CPU they run only under Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing triton), or use "
            "S2H_BACKEND=reference / auto"
        )
    return f"the Triton kernels do not support device type {device.type!r}"


def backend_for(device: torch.device | str) -> str:
    """The back-end a dual op uses for tensors on ``device`` under the current ``S2H_BACKEND``.

    Returns ``"triton"``, ``"triton-interpreter"`` (Triton kernels run by the CPU interpreter),
    ``"reference"``, or ``"unavailable: <why>"`` when ``S2H_BACKEND=triton`` cannot be honoured.
    """
    device = torch.device(device)
    requested = _requested_backend()
    if requested == "reference":
        return "reference"
    reason = _triton_unusable_reason(device)
    if requested == "auto":
        # auto never picks the interpreter: it is a test vehicle, orders of magnitude slow.
        return "triton" if device.type == "cuda" and reason is None else "reference"
    if reason is not None:
        return f"unavailable: {reason}"
    return "triton-interpreter" if device.type == "cpu" else "triton"


def use_triton(device: torch.device) -> bool:
    """Whether a dual op on ``device`` tensors runs the Triton kernels (raises when
    ``S2H_BACKEND=triton`` cannot be honoured)."""
    backend = backend_for(device)
    if backend.startswith("unavailable"):
        raise RuntimeError(
            f"S2H_BACKEND=triton cannot be used for {device} tensors: {backend[13:]}"
        )
    return backend != "reference"
