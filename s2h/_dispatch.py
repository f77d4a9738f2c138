"""One place that picks the implementation of the channel ops used by the masked layers.

``s2h.ops`` (the registered C++/CUDA ops, with a PyTorch fallback when the extension is not
built) is used when importable; otherwise plain ``index_select``.  ``None`` as an index means
"all channels" and costs nothing.
"""

from __future__ import annotations

import torch

try:  # the channel ops (csrc/ + s2h/ops.py)
    from . import ops as _ops
except Exception:  # pragma: no cover - extension or module missing
    _ops = None


def gather_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.index_select(dim, index)``, differentiable."""
    if _ops is not None:
        return _ops.gather_channels(x, index, dim)
    return x.index_select(dim, index)


def gather_weight(
    w: torch.Tensor, out_index: torch.Tensor | None, in_index: torch.Tensor | None
) -> torch.Tensor:
    """``w[out_index][:, in_index]`` for a ``(C_out, C_in, ...)`` weight; ``None`` keeps all."""
    if out_index is None and in_index is None:
        return w
    if out_index is None:
        return gather_channels(w, in_index, 1)
    if in_index is None:
        return gather_channels(w, out_index, 0)
    if _ops is not None:
        return _ops.gather_weight(w, out_index, in_index)
    return w.index_select(0, out_index).index_select(1, in_index)
