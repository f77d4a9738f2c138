"""s2h: Soft-to-Hard structured pruning (S2HPruner, NeurIPS 2024) to a FLOPs budget.

Public API (see DESIGN.md): :class:`S2HPruner`, :func:`save_exported`, :func:`load_exported`,
``s2h.nn`` (``ChannelGate``, ``MaskedConv2d``, ``MaskedLinear``), ``s2h.functional`` (fused dual
kernels), ``torch.ops.s2h.*`` (channel ops, via ``s2h.ops``).

The names are imported on first use (PEP 562), so ``s2h --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "nn": (".nn", None),
    "load_exported": (".export", "load_exported"),
    "save_exported": (".export", "save_exported"),
    "NonFiniteLossError": (".pruner", "NonFiniteLossError"),
    "S2HPruner": (".pruner", "S2HPruner"),
    "STPPruner": (".stp", "STPPruner"),
}

__all__ = ["NonFiniteLossError", "S2HPruner", "STPPruner", "__version__", "load_exported", "nn",
           "save_exported"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 's2h' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
