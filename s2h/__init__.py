"""s2h: Soft-to-Hard structured pruning (S2HPruner, NeurIPS 2024) to a FLOPs budget.

Public API (README "Layout"): :class:`S2HPruner`, :class:`STPPruner`, :func:`save_exported`,
:func:`load_exported`, ``s2h.nn`` (``ChannelGate``, ``MaskedConv2d``, ``MaskedLinear``, ...),
``s2h.functional`` (fused dual ops), ``s2h.ops`` (channel ops, registered as
``torch.ops.s2h.*``), ``s2h.registry`` (layer handlers), ``s2h.flops``, ``s2h.losses``.

``import s2h`` imports all of them, so ``torch.ops.s2h.*`` are registered. The one exception is
the ``s2h`` command itself (``s2h ...`` / ``python -m s2h ...``): it starts without torch, so
``s2h --help`` is instant, and its subcommands import what they use; there the names above
are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

_LAZY = {
    "flops": (".flops", None),
    "functional": (".functional", None),
    "losses": (".losses", None),
    "nn": (".nn", None),
    "ops": (".ops", None),
    "registry": (".registry", None),
    "load_exported": (".export", "load_exported"),
    "save_exported": (".export", "save_exported"),
    "NonFiniteLossError": (".numerics", "NonFiniteLossError"),
    "S2HPruner": (".pruner", "S2HPruner"),
    "STPPruner": (".stp", "STPPruner"),
}

__all__ = ["NonFiniteLossError", "S2HPruner", "STPPruner", "__version__", "flops", "functional",
           "load_exported", "losses", "nn", "ops", "registry", "save_exported"]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 's2h' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _command_start() -> bool:
    """Whether this import is the ``s2h`` command starting: its console script, or
    ``python -m s2h`` (whose package import runs while ``sys.argv[0]`` is still ``"-m"``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) in ("s2h", "s2h.exe") or argv0 == "-m"


if not _command_start():
    for _name in _LAZY:
        __getattr__(_name)
    del _name
