"""s2h: Soft-to-Hard structured pruning (S2HPruner, NeurIPS 2024) to a FLOPs budget.

Public API (see DESIGN.md): :class:`S2HPruner`, :func:`save_exported`, :func:`load_exported`,
``s2h.nn`` (``ChannelGate``, ``MaskedConv2d``, ``MaskedLinear``), ``s2h.functional`` (fused dual
kernels), ``torch.ops.s2h.*`` (channel ops, via ``s2h.ops``).
"""

__version__ = "0.1.0"

from . import nn  # noqa: E402
from .export import load_exported, save_exported  # noqa: E402
from .pruner import NonFiniteLossError, S2HPruner  # noqa: E402
from .stp import STPPruner  # noqa: E402

__all__ = ["NonFiniteLossError", "S2HPruner", "STPPruner", "__version__", "load_exported", "nn",
           "save_exported"]
