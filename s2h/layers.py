"""Which modules are prunable layers, and how each kind is masked, scored and exported.

The graph analysis (:mod:`s2h.graph`) treats a *layer* as opaque: it sees the module's input and
output, never the ops inside. This module decides, per module, whether it is such a layer and
of which kind:

* exact ``nn.Conv2d`` (dense or depthwise), ``nn.Linear``, ``nn.BatchNorm2d``, ``nn.LayerNorm``;
* timm's channel-wise subclasses (``BatchNormAct2d`` with an elementwise activation, ``Linear``,
  ``LayerNorm``, ``LayerNorm2d``) and timm's attention modules (``Attention``,
  ``WindowAttention``), pruned by whole heads (see :mod:`s2h.timm_support`);
* any other subclass of those four torch classes is a layer of kind ``"fixed"``: its forward may
  do anything, so the groups it touches are kept whole and the warning names it.

Everything timm-specific is imported only when timm itself is already imported (a model that
uses timm classes has imported it), so s2h does not depend on timm.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from . import nn as _snn

#: torch classes whose subclasses are layers (opaque) even when s2h cannot prune them
LAYER_BASES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)


@dataclass(frozen=True)
class LayerInfo:
    """What the graph analysis needs to know about one layer.

    kind: ``"conv"``, ``"depthwise"``, ``"linear"``, ``"batchnorm"``, ``"layernorm"``,
        ``"attention"`` or ``"fixed"`` (kept whole, ``reason`` says why).
    channel_dim: where the channels are in the layer's input and output (1 for NCHW layers,
        -1 for linear / channels-last layers).
    """

    kind: str
    channel_dim: int
    reason: str = ""


def _timm():
    """The timm support module, or None when timm is not imported (then no timm layer exists)."""
    if "timm" not in sys.modules:
        return None
    try:
        from . import timm_support
    except Exception:  # pragma: no cover - a timm version whose classes moved
        return None
    return timm_support


def layer_info(m: nn.Module) -> LayerInfo | None:
    """The :class:`LayerInfo` of ``m``, or None if ``m`` is not a layer (its ops are traced)."""
    t = type(m)
    if t in _snn.PLAIN_CLASSES:  # already swapped (a second analysis of a pruned model)
        t = _snn.PLAIN_CLASSES[t]
    ts = _timm()
    if ts is not None:
        if t in ts.PLAIN_OF:
            t = ts.PLAIN_OF[t]
        info = ts.layer_info(m, t)
        if info is not None:
            return info
    if t is nn.Conv2d:
        if m.groups == 1:
            return LayerInfo("conv", 1)
        if m.groups == m.in_channels == m.out_channels:
            return LayerInfo("depthwise", 1)
        return LayerInfo("fixed", 1, f"groups={m.groups}")
    if t is nn.Linear:
        return LayerInfo("linear", -1)
    if t is nn.BatchNorm2d:
        return LayerInfo("batchnorm", 1)
    if t is nn.LayerNorm:
        if len(m.normalized_shape) == 1:
            return LayerInfo("layernorm", -1)
        return LayerInfo("fixed", -1, f"normalized_shape={tuple(m.normalized_shape)}")
    for base in LAYER_BASES:
        if isinstance(m, base):
            dim = 1 if base in (nn.Conv2d, nn.BatchNorm2d) else -1
            return LayerInfo(
                "fixed", dim,
                f"a subclass of nn.{base.__name__} whose forward s2h does not know to be "
                "channel-wise",
            )
    return None


def masked_class(cls: type) -> type:
    """The masked subclass that ``cls`` instances are switched to (``__class__`` swap)."""
    if cls in _snn.MASKED_CLASSES:
        return _snn.MASKED_CLASSES[cls]
    ts = _timm()
    if ts is not None and cls in ts.MASKED_OF:
        return ts.MASKED_OF[cls]
    raise TypeError(f"no masked implementation of {cls.__name__}")


def producer_scores(m: nn.Module, role: str) -> torch.Tensor:
    """Per-channel importance of the channels ``m`` produces in ``role`` (``"out"``, ``"heads"``):
    ``(C,)`` float32 L1 norms of the producing weights (METHOD §2 item 7)."""
    ts = _timm()
    if ts is not None:
        scores = ts.producer_scores(m, role)
        if scores is not None:
            return scores
    return m.weight.detach().float().abs().flatten(1).sum(1).cpu()


def head_dim_of(m: nn.Module) -> int:
    """Channels per head of an attention layer (the width granularity of its heads group)."""
    ts = _timm()
    return ts.attention_dims(m)[1]


def attention_dims(m: nn.Module) -> tuple[int, int, int, int]:
    """``(num_heads, head_dim, in_features, out_features)`` of an attention layer."""
    ts = _timm()
    return ts.attention_dims(m)
