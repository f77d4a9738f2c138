"""The layer handler registry: everything s2h knows about one kind of layer, in one place.

The graph analysis (:mod:`s2h.graph`) treats a *layer* as opaque: it sees the module's input and
output, never the ops inside. A :class:`LayerHandler` says, for one plain layer class:

* ``info(m)``: whether an instance is prunable and how (:class:`LayerInfo`: kind, channel dim,
  or why it is kept whole);
* ``masked``: the masked subclass its instances are switched to (an in-place ``__class__``
  swap), which computes the soft and hard paths and exports itself (``s2h_export``);
* ``flop_parts(m, info, flops_of)``: the layer's FLOPs -- as ``torch.utils.flop_counter``
  counted them during the trace (``flops_of(child)``; ``""`` is the layer itself) -- split by
  the groups each part scales with (``"in"``, ``"out"`` and the layer's inner roles);
* ``importance(m, role)``: per-channel importance of the channels it produces in ``role``;
* ``inner_groups(m)``: groups that live inside the layer (attention heads):
  ``{role: (channels, width granularity)}``;
* ``call(m, args, out)``: which tensors of one call are the layer's input and output
  (:class:`LayerCall`); by default the first positional argument and the output, for layers
  such as ``nn.MultiheadAttention`` the query (with the key and value) and the first element
  of the output tuple.

Handlers register themselves: the torch layers in :mod:`s2h.nn` and
:mod:`s2h.torch_attention` (``nn.MultiheadAttention``), timm's in
:mod:`s2h.timm_support` (imported here only once timm itself is imported, so s2h does not depend
on timm), torchvision's Swin attention in :mod:`s2h.torchvision_support` (likewise). Any other
subclass of a registered torch class is a layer of kind ``"fixed"``: its forward may do anything,
so the groups it touches are kept whole and the warning names it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerCall", "LayerHandler", "LayerInfo", "Router", "handler_for", "layer_call",
           "layer_info", "masked_class", "register", "register_router", "router_for"]


@dataclass(frozen=True)
class LayerInfo:
    """What the graph analysis needs to know about one layer.

    kind: ``"conv"``, ``"linear"``, ``"attention"`` (input and output are separate groups),
        ``"depthwise"``, ``"batchnorm"``, ``"layernorm"`` (one group passes through) or
        ``"fixed"`` (kept whole, ``reason`` says why). A grouped conv with as many output as
        input channels (ResNeXt's, RegNet's 3x3) is ``"depthwise"`` too, with ``block`` > 1.
    channel_dim: where the channels are in the layer's input and output (1 for NCHW layers,
        -1 for linear / channels-last layers).
    block: the channels of one conv group of a ``"depthwise"`` grouped conv (``in_channels //
        groups``; 1 for a true depthwise conv): its group is kept and dropped in whole blocks
        of ``block`` channels, so the kept conv groups stay whole and the conv's input and
        output drop the same ones (exported with ``groups`` = the kept blocks). A group norm
        (kind ``"batchnorm"``) has ``block`` = its norm groups' width: kept in whole norm groups.
    """

    kind: str
    channel_dim: int
    reason: str = ""
    block: int = 1


FlopParts = list[tuple[int, tuple[str, ...]]]


def l1_of_rows(m: nn.Module, role: str) -> torch.Tensor:
    """``(C_out,)`` float32 L1 norms of the producing weight's rows (METHOD §2 item 7)."""
    return m.weight.detach().float().abs().flatten(1).sum(1).cpu()


def own_flops(m: nn.Module, info: LayerInfo, flops_of: Callable[[str], int]) -> FlopParts:
    """The layer's counted FLOPs, scaling with its input group (and its output group unless it
    passes its group through, as a depthwise conv does)."""
    if info.kind in ("batchnorm", "layernorm"):
        return []
    roles = ("in",) if info.kind == "depthwise" else ("in", "out")
    return [(flops_of(""), roles)]


def no_inner_groups(m: nn.Module) -> dict[str, tuple[int, int]]:
    """A layer without groups of its own (every kind but attention)."""
    return {}


@dataclass(frozen=True)
class LayerCall:
    """The tensors of one call of a layer that the graph analysis follows.

    x: the input whose channels are the layer's ``"in"`` group; y: the output.
    same: more inputs whose channels must be the same group as ``x`` (the key and value of an
        attention whose q, k and v projections share their input columns).
    whole: inputs the layer needs at full width (their groups are kept whole).
    """

    x: torch.Tensor
    y: torch.Tensor
    same: tuple[torch.Tensor, ...] = ()
    whole: tuple[torch.Tensor, ...] = ()


def first_arg_call(m: nn.Module, args: tuple, out: object) -> LayerCall | None:
    """The default :class:`LayerCall`: the first positional argument and a tensor output
    (None when the call is not of that form: the analysis then keeps its inputs whole)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
        return LayerCall(x, out)
    return None


@dataclass(frozen=True)
class LayerHandler:
    """One layer kind; see the module docstring for what each field answers."""

    plain: type
    masked: type
    info: Callable[[nn.Module], LayerInfo]
    flop_parts: Callable[[nn.Module, LayerInfo, Callable[[str], int]], FlopParts] = own_flops
    importance: Callable[[nn.Module, str], torch.Tensor] = l1_of_rows
    inner_groups: Callable[[nn.Module], dict[str, tuple[int, int]]] = no_inner_groups
    call: Callable[[nn.Module, tuple, object], LayerCall | None] = first_arg_call


_HANDLERS: dict[type, LayerHandler] = {}
_BY_MASKED: dict[type, LayerHandler] = {}
#: torch classes whose subclasses are layers (opaque) even when s2h cannot prune them
LAYER_BASES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def register(handler: LayerHandler) -> LayerHandler:
    """Make ``handler.plain`` instances prunable layers (a later registration replaces one for
    the same class)."""
    _HANDLERS[handler.plain] = handler
    _BY_MASKED[handler.masked] = handler
    return handler


def _load_builtin() -> None:
    """Import the modules whose handlers register themselves (timm's only once timm is,
    torchvision's only once torchvision is)."""
    importlib.import_module(".nn", __package__)
    importlib.import_module(".torch_attention", __package__)
    if "timm" in sys.modules:
        # a timm version whose classes moved: no timm layers
        with contextlib.suppress(Exception):
            importlib.import_module(".timm_support", __package__)
    if "torchvision" in sys.modules:  # Swin's window attention (likewise only once imported)
        with contextlib.suppress(Exception):
            importlib.import_module(".torchvision_support", __package__)


def handler_for(cls: type) -> LayerHandler | None:
    """The handler of the plain or masked class ``cls`` (exact class, no subclasses)."""
    _load_builtin()
    return _HANDLERS.get(cls) or _BY_MASKED.get(cls)


@dataclass(frozen=True)
class Router:
    """A module class whose channel shuffle s2h *routes*: the hard network and the export run
    ``routed`` (a subclass of ``plain``) instead, which moves the kept channels by index --
    ``s2h_split`` (where a cut of the kept stream falls) and ``s2h_order`` (the shuffle as a
    gather of the kept channels) -- because the model's own shuffle interleaves the kept
    channels by rank, which is right only when every group keeps all of them.

    check(module, sites): None if the shuffles and cuts seen in one call of ``module`` (``[(kind,
    data)]``, see :attr:`s2h.graph.GraphAnalysis.routes`) are the ones ``routed`` computes, else
    why not (its channels are then kept whole).
    """

    plain: type
    routed: type
    check: Callable[[nn.Module, list], str | None]


_ROUTERS: dict[type, Router] = {}


def register_router(router: Router) -> Router:
    _ROUTERS[router.plain] = router
    return router


def router_for(cls: type) -> Router | None:
    """The :class:`Router` of the module class ``cls`` (exact class), or None."""
    _load_builtin()
    return _ROUTERS.get(cls)


def routed_names() -> str:
    """The classes s2h routes, for messages."""
    _load_builtin()
    names = sorted(f"{c.__module__}.{c.__qualname__}" for c in _ROUTERS)
    return ", ".join(names) if names else "no module class (none registered)"


def layer_info(m: nn.Module) -> LayerInfo | None:
    """The :class:`LayerInfo` of ``m``, or None if ``m`` is not a layer (its ops are traced)."""
    handler = handler_for(type(m))
    if handler is not None:
        return handler.info(m)
    for base in LAYER_BASES:
        if isinstance(m, base):
            dim = 1 if base in (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm) else -1
            return LayerInfo(
                "fixed", dim,
                f"a subclass of nn.{base.__name__} whose forward s2h does not know to be "
                "channel-wise",
            )
    for h in list(_HANDLERS.values()):  # a subclass of another registered layer (timm's)
        if isinstance(m, h.plain):
            return LayerInfo("fixed", -1, f"a subclass of {h.plain.__name__} s2h does not know")
    return None


def layer_call(m: nn.Module, args: tuple, out: object) -> LayerCall | None:
    """The :class:`LayerCall` of one call of the layer ``m`` (positional ``args``, output
    ``out``), as its handler reads it; None if the call has no tensor input and output."""
    handler = handler_for(type(m))
    return (first_arg_call if handler is None else handler.call)(m, args, out)


def masked_class(cls: type) -> type:
    """The masked subclass that ``cls`` instances are switched to (``__class__`` swap)."""
    handler = handler_for(cls)
    if handler is None:
        raise TypeError(f"no masked implementation of {cls.__name__}")
    return handler.masked


def plain_class(cls: type) -> type:
    """The plain class of a masked class (``cls`` itself for any other class)."""
    handler = _BY_MASKED.get(cls)
    return cls if handler is None else handler.plain
