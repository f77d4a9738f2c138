"""Dependency-group analysis: which channels must be kept or removed together (METHOD §1).

The model is run once on the example inputs under a ``TorchDispatchMode`` that sees every ATen
op with real shapes, while module hooks make the prunable layers (exact ``nn.Conv2d``,
``nn.Linear``, ``nn.BatchNorm2d``, ``nn.LayerNorm``) opaque. Every channel dimension created by a
conv/linear output gets a *label*; labels flow through channel-preserving ops (pointwise ops with
broadcasting, pooling, reductions over other dims, views that keep the dim, permutes) and are
merged (union-find) where two streams meet (residual adds, squeeze-excite multiplies). A concat
along channels makes a label of *segments*, each owned by its input's group, and a split / chunk
of the channel dim cuts a label into pieces, each a group (the producer's output rows are then
segments): see ``_resolve_concats`` and ``_resolve_slices``. A channel shuffle (a view that
splits the channel dim, a transpose, a view back) makes a *mixed* label, each position one
channel of one label, pruned where the shuffle runs in a module s2h routes (``_resolve_mixed``).
A label that reaches something the analysis cannot prune exactly — a grouped conv, any other
reshape that splits or merges the channel dim, a shuffle in code s2h does not route, a slice
with bounds written as numbers, an op it does not know, the model output, an ignored layer — is
*frozen*: its group keeps all channels and a warning names the place.

Running the real model (instead of symbolic tracing) handles Python control flow and timm's
helpers without special cases; the price is one forward pass at construction.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import registry as _registry
from .flops import FlopCounter

aten = torch.ops.aten

#: ops that act elementwise but are not tagged ``pointwise`` in ATen
_EXTRA_POINTWISE = {
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_",
    "relu6", "silu", "silu_", "leaky_relu", "leaky_relu_", "elu", "elu_", "gelu", "gelu_",
    "mish", "mish_", "softplus", "clone", "_to_copy", "detach", "alias", "contiguous",
    "copy_", "dropout", "native_dropout", "lift_fresh", "lift_fresh_copy",
    "threshold", "fill_", "zero_", "bernoulli_",
}
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "expand", "flatten",
             "unflatten", "view_as", "squeeze_", "unsqueeze_", "_reshape_alias"}
#: normalise over one dim: channel-wise unless that dim is the channel dim
_SOFTMAX_OPS = {"_softmax", "_log_softmax", "softmax", "log_softmax"}
#: views with explicit strides: any layout, the channel dim cannot be followed
_STRIDED_OPS = {"as_strided", "as_strided_", "as_strided_scatter"}
_REDUCE_OPS = {"mean", "sum", "amax", "amin", "var", "std", "var_mean", "max", "min", "prod",
               "logsumexp", "norm", "linalg_vector_norm"}
_POOL_OPS = {"avg_pool2d", "max_pool2d_with_indices", "_adaptive_avg_pool2d", "adaptive_max_pool2d",
             "max_pool2d", "avg_pool1d", "max_pool1d", "upsample_nearest2d", "upsample_bilinear2d",
             "_upsample_nearest_exact2d", "_adaptive_avg_pool3d", "avg_pool3d"}
_NO_TENSOR_EFFECT = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride",
                     "dim", "is_same_size", "_local_scalar_dense", "item", "empty", "zeros", "ones",
                     "full", "arange", "empty_like", "zeros_like", "ones_like", "full_like",
                     "scalar_tensor", "rand", "randn", "rand_like", "randn_like", "new_zeros",
                     "new_ones", "new_empty", "new_full", "_assert_async", "eq", "ne"}

#: size attributes of layers that a pruned width changes -> the side of the layer they measure
_SIZE_ATTRS = {"in_channels": "in", "out_channels": "out", "in_features": "in",
               "out_features": "out", "num_features": "in", "normalized_shape": "in"}
#: ops that keep every dim and act only on the dims named by their arguments
_DIM_OPS = {"roll", "flip", "slice", "select", "constant_pad_nd", "narrow"}
#: unary ops through which a parameter stays "the same parameter" (views and dtype casts)
_PARAM_VIEW_OPS = _VIEW_OPS | _STRIDED_OPS | {"permute", "_to_copy", "clone", "detach", "alias",
                                              "contiguous", "t", "transpose"}


def _same_shape_restride(src: torch.Tensor, out: torch.Tensor) -> bool:
    """``out`` has ``src``'s shape and a dense layout of it (only the memory format changes)."""
    if tuple(out.shape) != tuple(src.shape):
        return False
    expect = 1
    for d in sorted(range(out.dim()), key=lambda d: (out.stride(d), out.shape[d])):
        if out.shape[d] == 1:
            continue
        if out.stride(d) != expect:
            return False
        expect *= out.shape[d]
    return True


def _is_layer(m: nn.Module) -> bool:
    return _registry.layer_info(m) is not None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []
        self.reasons: list[list[str]] = []
        self.size: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.frozen.append(False)
        self.reasons.append([])
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.frozen[ra] = self.frozen[ra] or self.frozen[rb]
        self.reasons[ra].extend(self.reasons[rb])
        return ra

    def classes(self) -> dict[int, list[int]]:
        """Root -> every label of its class (ascending)."""
        out: dict[int, list[int]] = {}
        for lab in range(len(self.parent)):
            out.setdefault(self.find(lab), []).append(lab)
        return out

    def freeze(self, a: int, reason: str) -> None:
        r = self.find(a)
        self.frozen[r] = True
        if reason not in self.reasons[r]:
            self.reasons[r].append(reason)


@dataclass
class LayerRecord:
    """One call of a prunable layer seen during the trace."""

    name: str
    module: nn.Module
    kind: str  # "conv", "depthwise", "linear", "batchnorm", "layernorm", "attention", "fixed"
    in_label: int | None = None
    out_label: int | None = None
    in_shape: tuple = ()
    out_shape: tuple = ()
    info: _registry.LayerInfo | None = None
    dense_flops: int = 0  # as torch.utils.flop_counter counted it (every call)
    #: inner groups of the layer by role, e.g. ``{"heads": label}`` of an attention layer
    extra_labels: dict = field(default_factory=dict)
    #: labels of groups in the *row* dims of a linear layer's input (a token-mixing MLP
    #: applied across tokens carries the embedding channels there): its FLOPs scale with them
    row_labels: list = field(default_factory=list)
    #: the dense FLOPs split by the groups they scale with: ``[(flops, roles)]``, roles among
    #: ``"in"``, ``"out"`` and the extra roles (a term scales with each role's kept fraction)
    flop_parts: list = field(default_factory=list)
    #: a linear layer fed a flattened ``C x h x w`` map: its input columns are the channels of
    #: its input group, each repeated ``in_repeat = h * w`` times, channel-major
    in_repeat: int = 1


@dataclass
class Group:
    """A dependency group: channels that are kept or removed together."""

    name: str
    channels: int
    producers: list[str] = field(default_factory=list)  # conv/linear whose output is the group
    consumers: list[str] = field(default_factory=list)  # conv/linear whose input is the group
    norms: list[str] = field(default_factory=list)  # batchnorm/layernorm over the group
    depthwise: list[str] = field(default_factory=list)  # depthwise convs inside the group
    frozen: bool = False
    reasons: list[str] = field(default_factory=list)
    #: width granularity imposed by the layers (attention heads: ``head_dim``); None = any
    divisor: int | None = None
    #: producer -> which of its outputs is this group ("out" or an extra role like "heads")
    roles: dict[str, str] = field(default_factory=dict)
    #: per-channel parameters outside the layers scaled with the group (ConvNeXt ``gamma``):
    #: ``[(parameter name, dim)]``, sliced with the group
    params: list[tuple[str, int]] = field(default_factory=list)
    #: the channels of a concat along the channel dim: ``[(group index or None, width)]`` in
    #: order, each segment the channels of that group (None: a tensor of fixed width). Such a
    #: group has no gate of its own: its layers keep each segment's kept channels at the
    #: segment's offset, and the segments' groups count its consumers as theirs
    segments: list[tuple[int | None, int]] = field(default_factory=list)
    #: a layer whose output is cut into pieces (split / chunk): producer (or depthwise) name ->
    #: the channel ranges of its output that are this group's channels
    producer_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: grouped convs that pass the group through (ResNeXt's 3x3, listed in ``depthwise``): the
    #: group is kept and dropped in whole blocks of ``block`` channels (their conv groups'
    #: widths, aligned at channel 0); 1 = any channels
    block: int = 1
    #: mixed channels (a channel shuffle's output, a piece of it): per position ``(group index
    #: or None, channel of that group)``. Like a concat's, such a group has no gate of its own
    positions: list[tuple[int | None, int]] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.consumers) and not self.segments \
            and not self.positions


@dataclass
class GraphAnalysis:
    layers: dict[str, LayerRecord]
    groups: list[Group]
    layer_in_group: dict[str, int]  # layer name -> index into groups of its input channels
    layer_out_group: dict[str, int]  # layer name -> index of its output channels' group
    warnings: list[str]
    total_flops: int
    #: layer name -> {role: group index} of its inner groups (attention heads)
    layer_extra_group: dict[str, dict[str, int]] = field(default_factory=dict)
    #: layer name -> indices of the groups in the row dims of its input (their widths scale the
    #: layer's FLOPs too, see :attr:`LayerRecord.row_labels`)
    layer_row_groups: dict[str, list[int]] = field(default_factory=dict)
    #: layer name -> how many input columns each channel of its input group owns (> 1 for a
    #: linear layer fed a flattened ``C x h x w`` map; absent = 1)
    layer_in_repeat: dict[str, int] = field(default_factory=dict)
    #: module name (as ``model.named_modules()`` names it) -> the FLOPs torch's counter counted
    #: inside its calls in the traced run (children and inline ops included; 0 if it never ran)
    module_flops: dict[str, int] = field(default_factory=dict)
    #: module attributes that hold split sizes, set to the kept widths in the hard network and
    #: the export: ``(module name, attribute, how, original value, [(group index or None,
    #: width) per piece])``, ``how`` = "piece" (each piece's width), "total" (their sum) or
    #: "list" (each, in order)
    width_attrs: list[tuple[str, str, str, object, list[tuple[int | None, int]]]] = field(
        default_factory=list)
    #: modules whose channel shuffle (and cuts of shuffled channels) the hard network and the
    #: export route by index (:func:`s2h.registry.router_for`): module name -> what ran there,
    #: ``[(kind, input positions, output positions, data)]`` with positions as in
    #: :attr:`Group.positions`; ``kind`` "shuffle" (``data``: output position -> input
    #: position) or "cut" (``data``: ``(start, stop)`` of the input)
    routes: dict[str, list[tuple[str, list, list, object]]] = field(default_factory=dict)


class _ReshapeCalls(TorchFunctionMode):
    """Which Python call a reshape comes from. A flatten, or a ``view`` / ``reshape`` that writes
    the merged width as ``-1``, derives that width from its input, so it follows a pruned width;
    a width written as a number (``x.view(-1, 512 * 7 * 7)``) may be a constant that the pruned
    model would not match. At the ATen level both are the same ``view``, hence this record."""

    _FLATTEN = (torch.flatten, torch.Tensor.flatten)
    _SIZED = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape)
    #: splits of a dim into pieces: how the pieces' sizes are given decides whether the pruned
    #: model can follow them (see :meth:`_Analyzer._resolve_slices`)
    _SPLIT = (torch.split, torch.Tensor.split, torch.Tensor.split_with_sizes)
    _CHUNK = (torch.chunk, torch.Tensor.chunk, torch.tensor_split, torch.Tensor.tensor_split)
    _SLICE = (torch.Tensor.__getitem__, torch.narrow, torch.Tensor.narrow)

    def __init__(self, analysis: _Analyzer) -> None:
        super().__init__()
        self.a = analysis

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SPLIT or func in self._CHUNK or func in self._SLICE:
            return self._split_call(func, args, kwargs)
        if func in self._FLATTEN:
            entry: tuple | None = ("flatten", None)
        elif func in self._SIZED:
            sizes = kwargs.get("size", kwargs.get("shape", list(args[1:])))
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
                sizes = sizes[0]
            ints = all(isinstance(v, int) for v in sizes)
            entry = ("sized", tuple(sizes) if ints else None)
        else:
            return func(*args, **kwargs)
        self.a.reshape_calls.append(entry)
        try:
            return func(*args, **kwargs)
        finally:
            self.a.reshape_calls.pop()

    def _split_call(self, func, args, kwargs):
        if func in self._SPLIT:
            size = args[1] if len(args) > 1 else kwargs.get(
                "split_size_or_sections", kwargs.get("split_size", kwargs.get("split_sizes")))
            if isinstance(size, int):
                kind, value = "split_int", size
            elif isinstance(size, (list, tuple)) and all(isinstance(v, int) for v in size):
                kind, value = "split_list", [int(v) for v in size]
            else:
                kind, value = "const", None
        elif func in self._CHUNK:
            n = args[1] if len(args) > 1 else kwargs.get("chunks", kwargs.get("sections"))
            kind, value = ("chunk", n) if isinstance(n, int) else ("const", None)
        elif func is torch.Tensor.__getitem__ and len(args) > 1:
            kind, value = "getitem", args[1]
        else:
            kind, value = "const", None
        self.a.n_split_calls += 1
        self.a.split_calls.append({"id": self.a.n_split_calls, "kind": kind, "value": value,
                                   "module": self.a.module_stack[-1] if self.a.module_stack
                                   else ""})
        try:
            return func(*args, **kwargs)
        finally:
            self.a.split_calls.pop()


class _Tracer(TorchDispatchMode):
    """Propagates channel labels through ATen ops. ``labels[id(t)]`` = one label or None per dim."""

    def __init__(self, analysis: _Analyzer) -> None:
        super().__init__()
        self.a = analysis

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.a.opaque_depth == 0:
            try:
                self.a.apply_op(func, args, kwargs, out)
            except Exception as exc:  # never let the analysis break the model's forward
                self.a.freeze_inputs(args, kwargs, f"{func} ({exc!r})")
        return out


class _Analyzer:
    def __init__(self, model: nn.Module, ignore: set[str]) -> None:
        self.model = model
        self.ignore = ignore
        self.uf = _UnionFind()
        self.labels: dict[int, list[int | None]] = {}
        self.keepalive: list[torch.Tensor] = []
        self.opaque_depth = 0
        self.module_stack: list[str] = []
        self.layers: dict[str, LayerRecord] = {}
        self.out_label_of: dict[str, int] = {}
        self.warnings: list[str] = []
        self.param_ids = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
        #: id of a parameter, or of a view / cast of one -> the parameter's name
        self.param_of: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())
        #: parameter name -> label of the channels it scales elementwise (layer-scale gamma)
        self.channel_params: dict[str, int] = {}
        self.bad_params: set[str] = set()
        #: embedding parameters (see :meth:`_param_dim`): id of the parameter, or of a cast /
        #: broadcast of it, -> (its name, how many leading dims the tensor has in front of it)
        self.param_align: dict[int, tuple[str, int]] = {id(p): (n, 0)
                                                          for n, p in model.named_parameters()}
        #: a parameter of several non-1 dims scaled with a group along one of them (a position
        #: embedding ``(1, N, C)`` added to the tokens): its name -> that dim
        self.channel_param_dim: dict[str, int] = {}
        #: module int attributes a reshape passes as the channel width (``x.reshape(n,
        #: self.hidden_dim, -1)``): ``(module name, attribute, value, label)``, see
        #: :meth:`_reshape_width_attr`
        self.reshape_attrs: list[tuple[str, str, int, int]] = []
        #: (parameter, dim) of embedding parameters met along a dim without channels: bad if
        #: that is the dim they are sliced along
        self.unbound_param_dims: set[tuple[str, int]] = set()
        #: parameters read by an op other than a cast / broadcast of them or an elementwise op
        #: (or concat) with channels: an embedding parameter among them is not sliced
        self.param_other_use: set[str] = set()
        #: id of a layer's own parameter / buffer (or a view of one) -> (layer name, its name)
        self.layer_tensor_of: dict[int, tuple[str, str]] = {}
        for lname, m in model.named_modules():
            if _is_layer(m):
                for tname, t in list(m.named_parameters()) + list(m.named_buffers()):
                    self.layer_tensor_of.setdefault(id(t), (lname, f"{lname}.{tname}".lstrip(".")))
        #: layer name -> [(side "in"/"out"/"all", what was read, where)] read by the model's own
        #: code outside the layer's call: a pruned width would change what that code computes
        self.outside_reads: dict[str, list[tuple[str, str, str]]] = {}
        self._internal = 0  # > 0 while the analysis itself (hooks) runs
        #: torch's FLOP counter over the trace, with each module call's share
        self.flops = FlopCounter()
        #: a label made by a flatten (see :meth:`_repeat_merge`) -> (the channels' label,
        #: columns per channel)
        self.repeat_of: dict[int, tuple[int, int]] = {}
        #: the Python reshape calls being run (innermost last), see :class:`_ReshapeCalls`
        self.reshape_calls: list[tuple | None] = []
        #: a label made by a concat along a labelled dim -> its segments in order:
        #: ``[(label or None for an unpruned tensor, width)]`` (see :meth:`_resolve_concats`)
        self.concat_of: dict[int, list[tuple[int | None, int]]] = {}
        #: a concat label -> where the concat ran (for the reasons of a frozen concat)
        self.concat_where: dict[int, str] = {}
        #: root of a consistent concat class -> one of its concat labels
        self._concat_rep: dict[int, int] = {}
        #: the Python split / chunk / slice calls being run (innermost last), see _ReshapeCalls
        self.split_calls: list[dict] = []
        self._module_names = {n for n, _ in model.named_modules()}
        #: (module name, attribute) -> the cut class whose sizes it holds
        self._claimed: dict[tuple[str, str], int] = {}
        self.n_split_calls = 0
        #: pieces cut from a labelled dim: ``(source label, start, stop, piece label, call,
        #: dim)``
        self.slices: list[tuple[int, int, int, int, dict | None, int]] = []
        #: module attributes that hold split sizes: ``(module name, attribute, how, original,
        #: piece labels)``, ``how`` = "piece" (each piece's width), "total" (the pieces' sum) or
        #: "list" (every piece's width, in order); rewritten to the kept widths
        self.width_attrs: list[tuple[str, str, str, object, list[int]]] = []
        #: a *mixed* label: channels drawn one by one from other labels, in an order no group
        #: has (a channel shuffle's output, a piece of it, a concat with it): label -> per
        #: position ``(label or None for an unpruned tensor, channel of that label)``, see
        #: :meth:`_resolve_mixed`
        self.mix_of: dict[int, list[tuple[int | None, int]]] = {}
        #: a view that splits a labelled channel dim into ``(n, m)`` makes a fresh label for
        #: the inner dim; whether it is the first half of a channel shuffle (view, transpose,
        #: view back) or a chunk-then-stack (:meth:`_resolve_pending_splits`) is decided at the
        #: end: inner label -> ``{"src", "n", "m", "dim", "call", "at", "shuffles"}``
        self.pending_split: dict[int, dict] = {}
        #: tensors carrying such a split: id -> ``(outer dim, inner dim, inner label,
        #: transposed)``
        self.split_marks: dict[int, tuple[int, int, int, bool]] = {}
        #: the modules running a shuffle or a cut of mixed channels, with what ran there:
        #: ``(module, module name, kind, input label, output label(s), data)``
        self.route_sites: list[tuple] = []
        self.module_objs: list[nn.Module] = []
        #: mixed labels made invalid by their split view (see _resolve_pending_splits) -> why
        self.bad_mixed: dict[int, str] = {}
        #: the modules whose shuffles are routed: id -> (module, name, sites), _resolve_mixed
        self.routed: dict[int, tuple[nn.Module, str, list]] = {}
        #: tensors whose dims merge a labelled channel dim with other dims (MobileViT's unfold
        #: ``(B, C, H, W) -> (B * C * n_h, p_h, n_w, p_w)``): id -> {dim: atoms}, the dim's
        #: size as a product of ``(size, label or None)``, outermost first (see
        #: :meth:`_atoms_view`). Only views, transposes and copies may carry them; anything else
        #: keeps the labels whole
        self.factors: dict[int, dict[int, list[tuple[int, int | None]]]] = {}

    # ----------------------------------------------------------------- label helpers
    def get(self, t: torch.Tensor) -> list[int | None]:
        lab = self.labels.get(id(t))
        if lab is None or len(lab) != t.dim():
            return [None] * t.dim()
        return lab

    def set(self, t: torch.Tensor, lab: list[int | None]) -> None:
        self.labels[id(t)] = list(lab)
        self.keepalive.append(t)

    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<model>"

    def freeze_label(self, lab: int | None, reason: str) -> None:
        if lab is not None:
            self.uf.freeze(lab, reason)

    def freeze_tensor(self, t: torch.Tensor, reason: str) -> None:
        for lab in self.get(t):
            self.freeze_label(lab, reason)

    def freeze_inputs(self, args, kwargs, what: str) -> None:
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and any(x is not None for x in self.get(t)):
                self.freeze_tensor(t, f"{what} in {self.where()}")

    # ----------------------------------------------------------------- op rules
    def apply_op(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        tensors_in = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        labelled = [t for t in tensors_in if any(x is not None for x in self.get(t))]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        owned = [self.layer_tensor_of[id(t)] for t in tensors_in if id(t) in self.layer_tensor_of]
        if owned:
            if name in _PARAM_VIEW_OPS and len(tensors_in) == 1:
                for o in outs:  # a view / cast of a layer's weight: follow it, the use decides
                    self.layer_tensor_of[id(o)] = owned[0]
                    self.keepalive.append(o)
            elif name not in _NO_TENSOR_EFFECT:
                for lname, tname in owned:
                    self.outside_reads.setdefault(lname, []).append(
                        ("all", f"its tensor {tname!r} is used by aten.{name}", self.where()))
        self._follow_param_align(name, tensors_in, outs)
        self._param_other_uses(func, name, tensors_in, bool(labelled))
        if any(id(t) in self.factors for t in tensors_in) and self._factored_op(
                name, args, tensors_in, outs):
            return
        if not labelled:
            # follow views / casts of parameters, to recognise per-channel scales later
            if name in _PARAM_VIEW_OPS and tensors_in and id(tensors_in[0]) in self.param_of:
                for o in outs:
                    self.param_of[id(o)] = self.param_of[id(tensors_in[0])]
                    self.keepalive.append(o)
            return  # nothing to propagate; outputs stay unlabelled
        if name in _NO_TENSOR_EFFECT:
            return
        if name == "as_strided_" and _same_shape_restride(args[0], outs[0]):
            # torch's own kernels restride a fresh output in place (memory format): same dims
            self.set(outs[0], self.get(args[0]))
        elif name in _STRIDED_OPS:
            self.freeze_inputs(args, kwargs, f"aten.{name} (explicit strides: the channel layout "
                                             "cannot be followed)")
        elif name in _SOFTMAX_OPS:
            src = list(self.get(args[0]))
            d = (args[1] if len(args) > 1 else kwargs.get("dim", -1)) % max(1, len(src))
            if src and src[d] is not None:
                self.freeze_label(src[d], f"aten.{name} over the channel dim in {self.where()} "
                                          "(not channel-wise)")
                src[d] = None
            for o in outs:
                if o.dim() == len(src):
                    self.set(o, src)
        elif torch.Tag.pointwise in func.tags or name in _EXTRA_POINTWISE:
            self._pointwise(tensors_in, outs, name)
            mark = self.split_marks.get(id(args[0])) if args else None
            if mark is not None and name in self._COPY_OPS and outs \
                    and outs[0].shape == args[0].shape:
                self.split_marks[id(outs[0])] = mark  # .contiguous() of a shuffle's transpose
        elif name in _VIEW_OPS:
            self._view(args[0], outs[0], name)
        elif name in self._REORDER_OPS:
            src = self.get(args[0])
            dims = self._dim_order(name, args, len(src))
            self.set(outs[0], [src[d] for d in dims])
            mark = self.split_marks.get(id(args[0]))
            if mark is not None and name in self._TRANSPOSE_OPS and {
                    args[1] % len(src), args[2] % len(src)} == {mark[0], mark[1]}:
                self.split_marks[id(outs[0])] = (mark[1], mark[0], mark[2], not mark[3])
        elif name in _REDUCE_OPS:
            self._reduce(func, args, kwargs, outs, name)
        elif name in _POOL_OPS:
            src = self.get(args[0])
            for o in outs:
                if o.dim() == len(src):
                    lab = list(src[:-2]) + [None] * (o.dim() - len(src) + 2)
                    self.set(o, lab)
        elif name in ("cat", "concat"):
            self._cat(args, kwargs, outs[0])
        elif name == "stack":
            self._stack(args, kwargs, outs[0])
        elif name in ("split", "split_with_sizes"):
            self._split(args, kwargs, outs, name)
        elif name in _DIM_OPS:
            self._dim_op(name, args, kwargs, outs)
        else:
            self.freeze_inputs(args, kwargs, f"op aten.{name} (not channel-preserving)")

    _COPY_OPS = {"clone", "contiguous", "_to_copy", "alias", "detach", "lift_fresh_copy"}
    _TRANSPOSE_OPS = {"transpose", "transpose_", "swapaxes"}
    _REORDER_OPS = _TRANSPOSE_OPS | {"permute", "t"}

    @classmethod
    def _dim_order(cls, name: str, args, nd: int) -> list[int]:
        """Output dim -> input dim of a permute / transpose / ``t``."""
        if name == "permute":
            return [d % nd for d in args[1]]
        if name == "t":
            return list(reversed(range(nd)))
        dims = list(range(nd))
        d0, d1 = args[1] % nd, args[2] % nd
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return dims

    def _map_of(self, lab: int | None, width: int) -> list[tuple[int | None, int]]:
        """Per position ``(label, channel)`` of the channels a tensor dim labelled ``lab``
        holds: a mixed label's map, a concat's segments channel by channel, else ``lab``'s own
        channels in order."""
        if lab is None:
            return [(None, i) for i in range(width)]
        if lab in self.mix_of:
            return list(self.mix_of[lab])
        if lab in self.concat_of:
            out: list[tuple[int | None, int]] = []
            for seg, w in self.concat_of[lab]:
                out.extend(self._map_of(seg, w))
            return out
        return [(lab, i) for i in range(width)]

    def _mixed(self, entries: list[tuple[int | None, int]]) -> int:
        lab = self.uf.new(len(entries))
        self.mix_of[lab] = entries
        return lab

    def _shuffle_merge(self, src_t, src, in_dims, big_in, big_out, out_shape) -> int | None:
        """The view back of a channel shuffle (``view(b, n, m, ...)``, ``transpose(1, 2)``,
        ``view(b, n * m, ...)``): a mixed label whose channel ``i * n + j`` is channel
        ``j * m + i`` of the split input. None if this view is not one."""
        mark = self.split_marks.get(id(src_t))
        if mark is None or len(big_out) != 1 or len(big_in) != 2 or not mark[3]:
            return None
        outer, inner, lab, _ = mark
        pend = self.pending_split.get(lab)
        if pend is None or big_in != [inner, outer] or src[inner] != lab \
                or src[outer] is not None:
            return None
        n, m = pend["n"], pend["m"]
        sigma = [j * m + i for i in range(m) for j in range(n)]
        full = self._map_of(pend["src"], n * m)
        mixed = self._mixed([full[q] for q in sigma])
        pend["shuffles"].append(mixed)
        self._route_site("shuffle", pend["src"], mixed, sigma)
        return mixed

    def _route_site(self, kind: str, src: int, out, data) -> None:
        mod = self.module_objs[-1] if self.module_objs else self.model
        name = self.module_stack[-1] if self.module_stack else ""
        if mod is self.model:
            name = ""
        self.route_sites.append((mod, name, kind, src, out, data, self.where()))

    def _pointwise(self, tensors_in, outs, name) -> None:
        if not outs:
            return
        out = outs[0]
        nd = out.dim()
        result: list[int | None] = [None] * nd
        for d in range(nd):
            size = out.shape[d]
            dim_labels, unlabelled_full, scales, embeds = [], False, [], []
            for t in tensors_in:
                off = nd - t.dim()
                td = d - off
                if td < 0 or t.shape[td] == 1 and size != 1:
                    continue  # broadcast along this dim
                lab = self.get(t)[td]
                if lab is None:
                    if size > 1 and t.numel() > 1:
                        pname = self.param_of.get(id(t))
                        if pname is not None and t.numel() == t.shape[td]:
                            scales.append(pname)  # a per-channel parameter: sliced with the group
                        elif (pd := self._param_dim(t, td)) is not None:
                            embeds.append(pd)  # a position embedding: sliced along its dim
                        else:
                            unlabelled_full = pname or True
                else:
                    dim_labels.append(lab)
            if not dim_labels:
                for pname in scales:
                    self.bad_params.add(pname)
                self.unbound_param_dims.update(embeds)
                continue
            root = dim_labels[0]
            for lab in dim_labels[1:]:
                root = self.uf.union(root, lab)
            for pname, pd in embeds:
                self._bind_param_dim(pname, pd)
                scales.append(pname)
            for pname in scales:
                if pname in self.channel_params:
                    root = self.uf.union(root, self.channel_params[pname])
                self.channel_params[pname] = root
            if unlabelled_full:
                what = (f"the parameter {unlabelled_full!r}" if isinstance(unlabelled_full, str)
                        else "an unpruned tensor (a fixed-width activation or buffer)")
                self.uf.freeze(
                    root, f"aten.{name} in {self.where()} combines the channels with {what}",
                )
            result[d] = root
        for o in outs:
            if o.dim() == nd:
                self.set(o, result)

    def _view(self, src_t, out, name) -> None:
        src = self.get(src_t)
        in_shape, out_shape = list(src_t.shape), list(out.shape)
        result: list[int | None] = [None] * len(out_shape)
        if name == "expand":
            off = len(out_shape) - len(in_shape)
            for d, lab in enumerate(src):
                if lab is not None and in_shape[d] == out_shape[d + off]:
                    result[d + off] = lab
                elif lab is not None:
                    self.freeze_label(lab, f"expand in {self.where()}")
            self.set(out, result)
            return
        fin = self.factors.get(id(src_t), {})
        out_factors: dict[int, list[tuple[int, int | None]]] = {}
        # match blocks of equal products; a labelled dim survives if its block is 1 <-> 1
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            i0, j0 = i, j
            pi = in_shape[i] if i < len(in_shape) else 1
            pj = out_shape[j] if j < len(out_shape) else 1
            i += 1
            j += 1
            while pi != pj:
                if pi < pj and i < len(in_shape):
                    pi *= in_shape[i]
                    i += 1
                elif j < len(out_shape):
                    pj *= out_shape[j]
                    j += 1
                else:
                    break
            in_dims = [d for d in range(i0, min(i, len(in_shape)))]
            out_dims = [d for d in range(j0, min(j, len(out_shape)))]
            big_in = [d for d in in_dims if in_shape[d] > 1]
            big_out = [d for d in out_dims if out_shape[d] > 1]
            labs = [src[d] for d in in_dims if src[d] is not None]
            if any(d in fin for d in in_dims):  # merged channels (MobileViT's unfold)
                if not self._atoms_view(src_t, src, in_dims, out_dims, in_shape, out_shape,
                                        result, out_factors):
                    self._freeze_atoms([a for d in in_dims for a in fin.get(d, [])] + [
                        (1, lab) for lab in labs], f"a reshape in {self.where()} that moves "
                        f"merged channels ({tuple(in_shape)} -> {tuple(out_shape)})")
            elif (len(big_in) == 1 and len(big_out) == 1
                    and in_shape[big_in[0]] == out_shape[big_out[0]]):
                result[big_out[0]] = src[big_in[0]]
                if src[big_in[0]] is not None:
                    self._reshape_width_attr(src[big_in[0]], big_out[0], out_shape)
                for d in in_dims:
                    if d != big_in[0] and src[d] is not None:
                        self.freeze_label(src[d], f"view in {self.where()}")
            elif (merged := self._repeat_merge(src, in_shape, in_dims, big_in, big_out,
                                               out_shape)) is not None or (
                    merged := self._copies_merge(src, in_shape, in_dims, big_in, big_out,
                                                 out_shape)) is not None:
                result[big_out[0]] = merged
            elif len(big_in) == 1 and len(big_out) == 2 and src[big_in[0]] is not None \
                    and len(labs) == 1:
                # (C) -> (n, C/n), the pieces outermost: n equal contiguous pieces, one group
                # (a chunk(n) then a stack), unless a transpose and a view back make it a
                # channel shuffle: decided at the end (_resolve_pending_splits)
                n, m = out_shape[big_out[0]], out_shape[big_out[1]]
                call = {"id": -len(self.slices) - 1, "kind": "chunk", "value": n,
                        "module": self.module_stack[-1] if self.module_stack else ""}
                inner = self.uf.new(m)
                self.pending_split[inner] = {"src": src[big_in[0]], "n": n, "m": m,
                                             "dim": big_in[0], "call": call, "shuffles": [],
                                             "at": len(self.slices)}
                self.split_marks[id(out)] = (big_out[0], big_out[1], inner, False)
                result[big_out[1]] = inner
            elif (shuffled := self._shuffle_merge(src_t, src, in_dims, big_in, big_out,
                                                  out_shape)) is not None:
                result[big_out[0]] = shuffled
            elif labs and self._atoms_view(src_t, src, in_dims, out_dims, in_shape, out_shape,
                                           result, out_factors):
                pass  # the channels merged with other dims, each atom followed
            else:
                for lab in labs:
                    self.freeze_label(
                        lab,
                        f"a reshape in {self.where()} that merges or splits the channel dim "
                        f"({tuple(in_shape)} -> {tuple(out_shape)})",
                    )
        self.set(out, result)
        if out_factors:
            self.factors[id(out)] = out_factors

    # ----------------------------------------------------------------- merged channels
    def _atoms_view(self, src_t, src, in_dims, out_dims, in_shape, out_shape, result,
                    out_factors) -> bool:
        """One block of a reshape, dim sizes as products of *atoms* ``(size, label or None)``:
        the input dims' atoms (a labelled dim is one atom, a merged dim its atoms) are dealt
        to the output dims in order, an unlabelled atom split where an output dim ends inside
        it. A labelled atom is never split. An output dim that is exactly one labelled atom is
        that label again (MobileViT's fold back to ``(B, C, H, W)``, or its ``(B * P, N, C)``
        tokens); one that holds a labelled atom among others is a merged dim
        (``out_factors``). False if the block cannot be dealt so."""
        fin = self.factors.get(id(src_t), {})
        atoms: list[tuple[int, int | None]] = []
        for d in in_dims:
            atoms.extend(fin[d] if d in fin else [(in_shape[d], src[d])])
        atoms = [a for a in atoms if a[0] != 1 or a[1] is not None]
        dealt: dict[int, list[tuple[int, int | None]]] = {}
        k = 0
        for d in out_dims:
            want, mine = out_shape[d], []
            while want > 1 or (k < len(atoms) and atoms[k][0] == 1):
                if k >= len(atoms):
                    return False
                size, lab = atoms[k]
                if size <= want and want % size == 0:
                    mine.append(atoms[k])
                    want //= size
                    k += 1
                elif lab is None and size % want == 0:  # split an unlabelled atom
                    mine.append((want, None))
                    atoms[k] = (size // want, None)
                    want = 1
                else:
                    return False
            dealt[d] = mine
        if k != len(atoms):
            return False
        for d, mine in dealt.items():
            labelled = [a for a in mine if a[1] is not None]
            if len(mine) == 1 and labelled:
                result[d] = labelled[0][1]
            elif labelled:
                out_factors[d] = mine
        return True

    def _freeze_atoms(self, atoms, why: str) -> None:
        for _, lab in atoms:
            self.freeze_label(lab, why)

    def _freeze_factors(self, t: torch.Tensor, why: str) -> None:
        for atoms in self.factors.get(id(t), {}).values():
            self._freeze_atoms(atoms, why)

    def _factored_op(self, name: str, args, tensors_in, outs) -> bool:
        """An op on a tensor with merged channels (:attr:`factors`): views, transposes and
        copies carry them (True: handled); anything else keeps them whole (False: the op's
        own rule runs)."""
        src_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        fin = self.factors.get(id(src_t), {}) if src_t is not None else {}
        if fin and outs and len(tensors_in) == 1:
            out = outs[0]
            if name in _VIEW_OPS and name != "expand":
                self._view(src_t, out, name)
                return True
            if name in self._REORDER_OPS:
                dims = self._dim_order(name, args, src_t.dim())
                src = self.get(src_t)
                self.set(out, [src[d] for d in dims])
                self.factors[id(out)] = {i: fin[d] for i, d in enumerate(dims) if d in fin}
                return True
            if name in self._COPY_OPS and out.shape == src_t.shape:
                self.set(out, self.get(src_t))
                self.factors[id(out)] = dict(fin)
                return True
        for t in tensors_in:
            self._freeze_factors(t, f"aten.{name} in {self.where()} reads channels merged with "
                                    "other dims")
        return False

    # ----------------------------------------------------------------- embedding width
    _ALIGN_OPS = {"expand", "_to_copy", "clone", "detach", "alias", "contiguous", "lift_fresh",
                  "lift_fresh_copy"}

    def _follow_param_align(self, name: str, tensors_in: list, outs: list) -> None:
        """Follow a parameter through casts and broadcasts (``class_token.expand(n, -1, -1)``)
        that keep its dims in place, counted from the right (see :meth:`_param_dim`)."""
        if name not in self._ALIGN_OPS or len(tensors_in) != 1 or len(outs) != 1:
            return
        ent = self.param_align.get(id(tensors_in[0]))
        if ent is None:
            return
        src, o = tensors_in[0], outs[0]
        lead = o.dim() - src.dim()
        if lead < 0 or any(n != 1 and o.shape[d + lead] != n for d, n in enumerate(src.shape)):
            return
        self.param_align[id(o)] = (ent[0], ent[1] + lead)
        self.keepalive.append(o)

    def _param_other_uses(self, func, name: str, tensors_in: list, labelled: bool) -> None:
        uses = [self.param_align[id(t)][0] for t in tensors_in if id(t) in self.param_align]
        if not uses or name in self._ALIGN_OPS or name in _PARAM_VIEW_OPS \
                or name in _NO_TENSOR_EFFECT:
            return
        if labelled and (torch.Tag.pointwise in func.tags or name in _EXTRA_POINTWISE
                         or name in ("cat", "concat")):
            return  # _pointwise / _cat decide
        self.param_other_use.update(uses)

    def _param_dim(self, t: torch.Tensor, d: int) -> tuple[str, int] | None:
        """``(parameter name, its dim)`` when ``t`` is a parameter (or a cast / broadcast of
        it) whose dim ``d`` is one of the parameter's own dims of the same size: along ``d``
        it holds one value per channel (a class token ``(1, 1, C)``, a position embedding
        ``(1, N, C)``), so it can be sliced with the channels there. None otherwise."""
        ent = self.param_align.get(id(t))
        if ent is None:
            return None
        pname, off = ent
        p = self.params.get(pname)
        pd = d - off
        if p is None or pd < 0 or pd >= p.dim() or p.shape[pd] != t.shape[d] or p.shape[pd] < 2:
            return None
        return pname, pd

    def _bind_param_dim(self, pname: str, pd: int) -> None:
        """``pname`` is sliced with a group along its dim ``pd``."""
        if self.channel_param_dim.setdefault(pname, pd) != pd:
            self.bad_params.add(pname)  # scaled with channels along two of its dims

    def _reshape_width_attr(self, lab: int, d: int, out_shape: list) -> None:
        """A reshape that keeps the channel dim and writes its width as a number (``x.reshape(
        n, self.hidden_dim, h * w)``, torchvision's ViT): the pruned model would pass the same
        number. Where the module running it has an int attribute of that value, the hard
        network and the export set it to the kept width (a width attribute, checked at
        construction by running the hard network narrower); otherwise nothing is recorded
        (that check then keeps the group whole if the reshape fails)."""
        call = self.reshape_calls[-1] if self.reshape_calls else None
        if call is None or call[0] != "sized" or call[1] is None or len(call[1]) != len(out_shape):
            return
        width = call[1][d]
        if width != out_shape[d] or width < 2:
            return
        mname = self.where()
        mname = mname if mname in self._module_names else ""
        for attr, v in vars(self.model.get_submodule(mname)).items():
            if attr.startswith("_") or isinstance(v, bool) or not isinstance(v, int):
                continue
            if v == width and (mname, attr) not in {(m, a) for m, a, _, _ in self.reshape_attrs}:
                self.reshape_attrs.append((mname, attr, v, lab))

    def _repeat_merge(self, src, in_shape, in_dims, big_in, big_out, out_shape) -> int | None:
        """A reshape merging a labelled channel dim with the unlabelled dims after it into the
        last dim, the channel dim outermost (the NCHW flatten of ``C x h x w`` before a
        classifier): a new label for the merged dim, each channel repeated ``h * w`` times,
        channel-major. Only a linear layer may consume it (see :meth:`_resolve_repeats`).
        None where the merge is of another kind (the caller freezes it)."""
        if len(big_out) != 1 or len(big_in) < 2:
            return None
        if any(n > 1 for n in in_shape[in_dims[-1] + 1:]) or any(
                n > 1 for n in out_shape[big_out[0] + 1:]):
            return None  # not the last dims: a linear layer could not take it as its input
        lab = src[big_in[0]]
        if lab is None or any(src[d] is not None for d in in_dims if d != big_in[0]):
            return None  # the channels not outermost (channels-last flatten), or two groups
        if any(self.uf.find(m) == self.uf.find(lab) for m in self.repeat_of):
            return None  # a flatten of a flatten's merged dim
        call = self.reshape_calls[-1] if self.reshape_calls else None
        if call is None or call[0] != "flatten" and (
                call[1] is None or len(call[1]) != len(out_shape) or call[1][big_out[0]] != -1):
            self.freeze_label(
                lab, f"a reshape in {self.where()} that merges the channel dim into a width "
                     f"written as a number ({tuple(in_shape)} -> {tuple(out_shape)}): it would "
                     "not follow a pruned width; flatten(1) or view(n, -1) would")
            return None
        repeat = 1
        for d in big_in[1:]:
            repeat *= in_shape[d]
        merged = self.uf.new(out_shape[big_out[0]])
        self.repeat_of[merged] = (lab, repeat)
        return merged

    def _copies_merge(self, src, in_shape, in_dims, big_in, big_out, out_shape) -> int | None:
        """A reshape merging unlabelled dims with a labelled channel dim *innermost* into one
        dim (Swin's patch merging: ``(B, H/2, W/2, 2, 2, C) -> (B, H/2, W/2, 4C)``): the merged
        dim is ``n`` copies of the channels one after the other, as a concat of the same
        tensor ``n`` times. It gets a concat label of ``n`` segments of the channels' label
        (:meth:`_resolve_concats` decides the rest), so the layers reading it (the merge's
        LayerNorm and reduction) read ``n`` copies of the group's kept channels. The merged
        width must follow the input (a flatten, or ``-1`` in a view / reshape): a width written
        as a number would not. None where the merge is of another kind."""
        if len(big_out) != 1 or len(big_in) < 2 or any(n > 1 for n in out_shape[big_out[0] + 1:]):
            return None  # (merging into an outer dim, e.g. the batch: see _atoms_view)
        lab = src[big_in[-1]]
        if lab is None or any(src[d] is not None for d in in_dims if d != big_in[-1]):
            return None
        call = self.reshape_calls[-1] if self.reshape_calls else None
        if call is None or call[0] != "flatten" and (
                call[1] is None or len(call[1]) != len(out_shape) or call[1][big_out[0]] != -1):
            self.freeze_label(
                lab, f"a reshape in {self.where()} that merges copies of the channel dim into a "
                     f"width written as a number ({tuple(in_shape)} -> {tuple(out_shape)}): it "
                     "would not follow a pruned width; flatten or -1 would")
            return None
        n = 1
        for d in big_in[:-1]:
            n *= in_shape[d]
        merged = self.uf.new(out_shape[big_out[0]])
        self.concat_of[merged] = [(lab, in_shape[big_in[-1]])] * n
        self.concat_where[merged] = self.where()
        return merged

    def _resolve_repeats(self) -> None:
        """Keep a flatten's channels prunable where its merged dim goes only to the input dim
        of plain ``nn.Linear`` layers and nowhere else: those layers then consume the channels'
        group with ``in_repeat`` columns per channel. Anything else (a merged dim that meets
        other channels, is normalised, reshaped again, read in a row dim, frozen...) freezes
        the channels' group, as any reshape of the channel dim does."""
        if not self.repeat_of:
            return
        members: dict[int, int] = {}
        for lab in range(len(self.uf.parent)):
            r = self.uf.find(lab)
            members[r] = members.get(r, 0) + 1
        roots = {self.uf.find(m) for m in self.repeat_of}
        bad: dict[int, str] = {}
        for name, rec in self.layers.items():
            for lab in [rec.out_label, *rec.extra_labels.values(), *rec.row_labels]:
                if lab is not None and self.uf.find(lab) in roots:
                    bad.setdefault(self.uf.find(lab), f"{name} reads it outside its input dim")
            if rec.in_label is not None and self.uf.find(rec.in_label) in roots and not (
                    rec.kind == "linear" and type(rec.module) is nn.Linear):
                bad.setdefault(self.uf.find(rec.in_label),
                               f"{name} ({type(rec.module).__name__}) consumes it")
        for pname, lab in self.channel_params.items():
            if self.uf.find(lab) in roots:
                bad.setdefault(self.uf.find(lab), f"the parameter {pname!r} scales it")
        for m in self.repeat_of:
            if members[self.uf.find(m)] > 1:
                bad.setdefault(self.uf.find(m), "it meets other channels")
        changed = True
        while changed:  # a frozen merged dim freezes its channels (and a flatten of those)
            changed = False
            for m, (base, _) in self.repeat_of.items():
                r = self.uf.find(m)
                if (r in bad or self.uf.frozen[r]) and not self.uf.frozen[self.uf.find(base)]:
                    why = bad.get(r) or (self.uf.reasons[r] or ["it is kept whole"])[0]
                    self.uf.freeze(r, why)
                    self.uf.freeze(base, f"a flatten of these channels: {why}")
                    changed = True
        for rec in self.layers.values():
            m = rec.in_label
            if m in self.repeat_of and not self.uf.frozen[self.uf.find(m)]:
                rec.in_label, rec.in_repeat = self.repeat_of[m]

    def _reduce(self, func, args, kwargs, outs, name) -> None:
        src_t = args[0]
        src = self.get(src_t)
        nd = len(src)
        dims = None
        if len(args) > 1 and isinstance(args[1], (list, tuple)):
            dims = list(args[1])
        elif len(args) > 1 and isinstance(args[1], int):
            dims = [args[1]]
        dims = kwargs.get("dim", dims)
        if isinstance(dims, int):
            dims = [dims]
        if not dims:
            dims = list(range(nd))
        dims = [d % nd for d in dims] if nd else []
        positional = args[2] if len(args) > 2 and isinstance(args[2], bool) else False
        keepdim = bool(kwargs.get("keepdim", positional))
        for d in dims:
            if src[d] is not None:
                self.freeze_label(src[d], f"aten.{name} over the channel dim in {self.where()}")
        if keepdim:
            lab = [None if d in dims else src[d] for d in range(nd)]
        else:
            lab = [src[d] for d in range(nd) if d not in dims]
        for o in outs:
            if o.dim() == len(lab):
                self.set(o, lab)

    def _dim_op(self, name, args, kwargs, outs) -> None:
        """roll / flip / slice / select / narrow / constant_pad_nd: the labels of the dims they do
        not touch survive; touching a labelled dim (other than a full slice) freezes it."""
        src_t = args[0]
        src = list(self.get(src_t))
        nd = len(src)
        out = outs[0]
        touched: list[int] = []
        if name == "roll":
            dims = args[2] if len(args) > 2 else kwargs.get("dims", [])
            dims = [dims] if isinstance(dims, int) else list(dims)
            touched = [d % nd for d in dims] if dims else list(range(nd))
        elif name == "flip":
            touched = [d % nd for d in args[1]]
        elif name in ("slice", "narrow", "select"):
            d = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % nd
            if name == "select" or out.shape[d] != src_t.shape[d]:
                touched = [d]
            if name != "select" and touched and src[d] is not None:
                bounds = self._slice_bounds(name, args, kwargs, int(src_t.shape[d]))
                if bounds is not None and bounds[1] - bounds[0] == out.shape[d]:
                    src[d] = self._piece(src[d], *bounds, d)
                    touched = []
        elif name == "constant_pad_nd":
            pad = list(args[1])
            for i in range(0, len(pad), 2):
                if pad[i] or pad[i + 1]:
                    touched.append(nd - 1 - i // 2)
        for d in touched:
            if src[d] is not None:
                self.freeze_label(src[d], f"aten.{name} along the channel dim in {self.where()}")
                src[d] = None
        if name == "select":
            src.pop(touched[0])
        if out.dim() == len(src):
            self.set(out, src)

    @staticmethod
    def _slice_bounds(name, args, kwargs, size: int) -> tuple[int, int] | None:
        """``(start, stop)`` of a step-1 ``aten.slice`` / ``aten.narrow``; None otherwise."""
        if name == "narrow":
            start = int(args[2]) % size if args[2] < 0 else int(args[2])
            return start, start + int(args[3])
        rest = list(args[2:]) + [None] * 3
        start, stop, step = rest[0], rest[1], rest[2]
        start = kwargs.get("start", start)
        stop = kwargs.get("end", stop)
        step = kwargs.get("step", step)
        if step not in (None, 1):
            return None
        start = 0 if start is None else int(start)
        stop = size if stop is None else int(stop)
        start = start + size if start < 0 else start
        stop = stop + size if stop < 0 else stop
        return max(0, min(start, size)), max(0, min(stop, size))

    def _piece(self, lab: int, start: int, stop: int, dim: int, call: dict | None = None
               ) -> int:
        """A new label for the channels ``[start, stop)`` of ``lab``'s (see _resolve_slices).
        A piece of mixed channels is mixed: its part of the map (:meth:`_resolve_mixed`)."""
        if lab in self.mix_of:
            piece = self._mixed(self.mix_of[lab][start:stop])
            self._route_site("cut", lab, piece, (start, stop))
            return piece
        piece = self.uf.new(stop - start)
        if call is None:
            call = self.split_calls[-1] if self.split_calls else None
        self.slices.append((lab, start, stop, piece, call, dim))
        return piece

    def _split(self, args, kwargs, outs, name) -> None:
        """``aten.split`` / ``split_with_sizes``: each output is a piece of the split dim."""
        src_t = args[0]
        src = self.get(src_t)
        nd = len(src)
        d = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % nd
        off = 0
        for o in outs:
            lab = list(src)
            w = int(o.shape[d])
            if src[d] is not None and w != src_t.shape[d]:
                lab[d] = self._piece(src[d], off, off + w, d)
            off += w
            self.set(o, lab)

    def _stack(self, args, kwargs, out) -> None:
        """``torch.stack`` along a new dim: the inputs' labels dim by dim merge (they are the
        same channels side by side), the new dim has none."""
        tensors = list(args[0])
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
        result: list[int | None] = [None] * out.dim()
        unlabelled = [False] * out.dim()
        for t in tensors:
            for i, lab in enumerate(self.get(t)):
                d = i if i < dim else i + 1
                if lab is None:
                    unlabelled[d] = unlabelled[d] or t.shape[i] > 1
                else:
                    result[d] = lab if result[d] is None else self.uf.union(result[d], lab)
        for d, lab in enumerate(result):
            if lab is not None and unlabelled[d]:
                self.freeze_label(lab, f"stack with an unpruned tensor in {self.where()}")
        self.set(out, result)

    def _cat(self, args, kwargs, out) -> None:
        """A concat: the labels of the other dims merge; along the concat dim, where some input
        is labelled, the output gets a new *concat label* whose channels are the inputs'
        channels in segments (:attr:`concat_of`), each owned by its input's group (an unlabelled
        input is a segment of fixed width). :meth:`_resolve_concats` decides at the end whether
        the segments can be pruned through it."""
        tensors = list(args[0])
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        dim = dim % out.dim()
        result: list[int | None] = [None] * out.dim()
        unlabelled: list = [False] * out.dim()  # dims where some input has no label
        embed: list[list] = [[] for _ in range(out.dim())]  # class tokens along a dim
        segments: list[tuple[int | None, int]] = []
        for t in tensors:
            if t.dim() != out.dim():
                continue
            lab = self.get(t)
            if t.shape[dim] > 0:
                segments.append((lab[dim], int(t.shape[dim])))
            for d in range(out.dim()):
                if d == dim:
                    continue
                if lab[d] is None:
                    if t.shape[d] > 1 and (pd := self._param_dim(t, d)) is not None:
                        embed[d].append(pd)  # a class token: sliced with the channels
                    elif t.shape[d] > 1 and not unlabelled[d]:
                        unlabelled[d] = self.param_of.get(id(t), True)
                elif result[d] is None:
                    result[d] = lab[d]
                else:
                    result[d] = self.uf.union(result[d], lab[d])
        if any(lab is not None for lab, _ in segments):
            if len(segments) == 1:  # a concat of one tensor: a copy
                result[dim] = segments[0][0]
            elif any(lab in self.mix_of for lab, _ in segments):
                # mixed channels in it: the concat is mixed too, position by position
                result[dim] = self._mixed([e for lab, w in segments for e in self._map_of(lab, w)])
            else:
                cat_lab = self.uf.new(int(out.shape[dim]))
                self.concat_of[cat_lab] = segments
                self.concat_where[cat_lab] = self.where()
                result[dim] = cat_lab
        for d in range(out.dim()):
            if d != dim and embed[d] and result[d] is not None:
                for pname, pd in embed[d]:
                    self._bind_param_dim(pname, pd)
                    if pname in self.channel_params:
                        result[d] = self.uf.union(result[d], self.channel_params[pname])
                    self.channel_params[pname] = result[d]
            elif d != dim and embed[d]:
                self.unbound_param_dims.update(embed[d])
        for d in range(out.dim()):
            if d != dim and unlabelled[d] and result[d] is not None:
                # e.g. a class token (a parameter) concatenated to the tokens: its channels
                # would have to be sliced too
                what = (f"the parameter {unlabelled[d]!r}" if isinstance(unlabelled[d], str)
                        else "an unpruned tensor")
                self.freeze_label(result[d], f"concat with {what} in {self.where()}")
        self.set(out, result)

    def _resolve_slices(self) -> None:
        """Decide, for every channel dim cut into pieces (split / chunk / slice), whether the
        pieces can be pruned: then every label of the cut class becomes a concat of the pieces
        (its producer's output channels are segments, :meth:`_resolve_concats` checks the rest).

        The pruned model must cut at the kept widths. ``chunk(n)`` / ``tensor_split(n)`` derive
        the sizes from the input: the pieces become one group (each piece keeps the same
        channels, so the n pieces stay equal). ``split(s)`` and ``split([s1, s2, ...])`` pass
        sizes: they follow only where the sizes are attributes of the module that runs the
        split (``self.width``, ``self.splits``), which the hard network and the export then
        set to the kept widths (``width_attrs``): ``split(s)`` keeps its pieces one group,
        ``split(list)`` makes each piece its own group. Slices with bounds written as numbers
        (``x[:, :c]``), unequal chunks, and cuts that do not tile the dim the same way each time
        keep the channels whole."""
        uf = self.uf
        done: set[int] = set()
        extra = {lab for rec in self.layers.values() for lab in rec.extra_labels.values()}
        for i, first in enumerate(self.slices):
            if i in done:
                continue
            r = uf.find(first[0])
            recs = [(j, s) for j, s in enumerate(self.slices)
                    if j not in done and uf.find(s[0]) == r]
            done.update(j for j, _ in recs)
            recs = [s for _, s in recs]
            why = self._cut_plan_problem(r, recs, extra)
            if isinstance(why, str):
                for rec in recs:
                    uf.freeze(rec[3], why)
                uf.freeze(r, why)
                continue
            segments, attrs, where = why
            # one concat label of the pieces in the class: the cut's channels are the pieces
            # (matched up with any concat in the class by _resolve_concats)
            link = uf.new(uf.size[r])
            uf.union(r, link)
            r = uf.find(r)
            for lab in range(len(uf.parent)):
                # a concat among them keeps its segments: _resolve_concats matches them up
                if uf.find(lab) == r and lab not in self.concat_of:
                    self.concat_of[lab] = list(segments)
                    self.concat_where[lab] = where
            self.width_attrs.extend(attrs)

    def _cut_plan_problem(self, r: int, recs: list, extra: set):
        """The pieces of one cut class: ``(segments, width attributes, where)``, or why not."""
        uf = self.uf
        where = recs[0][4]["module"] if recs[0][4] else "the model"
        what = f"a cut of the channel dim into pieces in {where}"
        if uf.frozen[r]:
            return f"{what}, of channels kept whole ({(uf.reasons[r] or ['?'])[0]})"
        members = [lab for lab in range(len(uf.parent)) if uf.find(lab) == r]
        if any(lab in self.repeat_of or lab in extra for lab in members):
            return f"{what}, of flattened or attention channels"
        calls: dict[int, list] = {}
        const = (f"{what} with bounds written as numbers (a slice such as x[:, :8]); chunk(n), "
                 "or sizes / bounds held in a module attribute, would follow a pruned width")
        for rec in recs:
            call = rec[4]
            if call is None or call["kind"] == "const":
                return const
            calls.setdefault(call["id"], []).append(rec)
        size = uf.size[r]
        n_getitem = sum(rec[4]["kind"] == "getitem" for rec in recs)
        if n_getitem:  # slices only, or a slice with other cuts (not followed)
            return self._getitem_plan(r, recs, what, const) if n_getitem == len(recs) else const
        plans = []
        for pieces in calls.values():
            pieces.sort(key=lambda p: p[1])
            stops = [p[1] for p in pieces[1:]]
            if pieces[0][1] != 0 or pieces[-1][2] != size or stops != [p[2] for p in pieces[:-1]]:
                return f"{what} that does not cut the whole dim into pieces"
            plans.append((pieces[0][4], [p[2] - p[1] for p in pieces], [p[3] for p in pieces]))
        call0, widths, _ = plans[0]
        kinds = {c["kind"] for c, _, _ in plans}
        if any(w != widths for _, w, _ in plans) or len(kinds) > 1:
            return f"{what}, cut in different ways"
        kind = call0["kind"]
        if kind in ("chunk", "split_int") and len(set(widths)) > 1:
            return f"{what} of unequal pieces ({widths})"
        found = []  # (module, attribute, how, value) for every module that runs a cut
        tied = kind != "split_list"  # the pieces one group (they stay equal)
        #: split(x, [1, self.c, self.c]) (MobileViT v2's q, k, v): the pieces of an int
        #: attribute's size are one group, the others (constants) are kept whole
        attr_pos: list[int] = []
        for mname in dict.fromkeys(c["module"] for c, _, _ in plans):
            if kind == "chunk":
                break  # the sizes follow the input
            mname = mname if mname in self._module_names else ""
            here = []
            for attr, v in vars(self.model.get_submodule(mname)).items():
                if attr.startswith("_") or isinstance(v, bool):
                    continue
                if kind == "split_int" and isinstance(v, int) and v in (widths[0], size):
                    here.append((mname, attr, "piece" if v == widths[0] else "total", v))
                elif kind == "split_list" and isinstance(v, (list, tuple)) and list(v) == widths:
                    here.append((mname, attr, "list", v))
            if not here and kind == "split_list" and len(set(widths)) == 1:
                # split(x, (self.c, self.c)): equal pieces, each the size of an int attribute
                here = [(mname, attr, "piece", v) for attr, v in
                        vars(self.model.get_submodule(mname)).items()
                        if not attr.startswith("_") and type(v) is int and v == widths[0]]
                tied = tied or bool(here)
            if not here and kind == "split_list" and len(plans) == 1:
                ints = {v for a, v in vars(self.model.get_submodule(mname)).items()
                        if not a.startswith("_") and type(v) is int and v > 1 and v in widths}
                if len(ints) == 1:
                    v = ints.pop()
                    here = [(mname, a, "piece", v) for a, w in
                            vars(self.model.get_submodule(mname)).items()
                            if not a.startswith("_") and type(w) is int and w == v]
                    attr_pos = [i for i, w in enumerate(widths) if w == v]
            if not here:
                return (f"{what} with sizes {call0['value']} that are not an attribute of "
                        f"{mname or 'the model'} (the pruned model could not follow them)")
            if any(self._claimed.get(h[:2], r) != r for h in here):
                return f"{what} with sizes in attributes of {mname} that another cut reads too"
            found += here
        for h in found:
            self._claimed[h[:2]] = r
        # the pieces: one group for equal pieces, one per position for a split list
        pieces_by_pos = list(zip(*[p for _, _, p in plans], strict=True))
        if attr_pos:
            lab = pieces_by_pos[attr_pos[0]][0]
            for i in attr_pos:
                for other in pieces_by_pos[i]:
                    lab = uf.union(lab, other)
            labs = []
            for i, same in enumerate(pieces_by_pos):
                if i in attr_pos:
                    labs.append(lab)
                    continue
                other = same[0]
                for o in same[1:]:
                    other = uf.union(other, o)
                uf.freeze(other, f"{what}: a piece of constant size ({widths[i]} of "
                                 f"{call0['value']})")
                labs.append(other)
            attrs = [(mname, a, how, v, [lab]) for mname, a, how, v in found]
            return list(zip(labs, widths, strict=True)), attrs, call0["module"]
        if not tied:
            labs = []
            for same in pieces_by_pos:
                lab = same[0]
                for other in same[1:]:
                    lab = uf.union(lab, other)
                labs.append(lab)
        else:
            lab = pieces_by_pos[0][0]
            for same in pieces_by_pos:
                for other in same:
                    lab = uf.union(lab, other)
            labs = [lab] * len(widths)
        segments = list(zip(labs, widths, strict=True))
        attrs = [(mname, a, how, v, labs) for mname, a, how, v in found]
        return segments, attrs, call0["module"]

    def _getitem_plan(self, r: int, recs: list, what: str, const: str):
        """Slices ``x[:, a:b]`` of one class: the pieces must tile the dim, each its own group,
        and every bound written in the index must be 0 or the value of an int attribute of the
        module that slices (``x[:, :self.c]``), which is then set to the kept width of the
        pieces before it."""
        uf = self.uf
        size = uf.size[r]
        ranges: dict[tuple[int, int], int] = {}
        bounds: list[tuple[str, int]] = []  # (module, bound written in the index)
        for _lab, start, stop, piece, call, d in recs:
            idx = call["value"] if isinstance(call["value"], tuple) else (call["value"],)
            if len(idx) <= d or not all(isinstance(e, slice) for e in idx[:d + 1]):
                return const
            e = idx[d]
            if e.step not in (None, 1):
                return const
            for b in (e.start, e.stop):
                if b is None:
                    continue
                if type(b) is not int or b < 0:
                    return const
                if b != 0:
                    bounds.append((call["module"], b))
            key = (start, stop)
            ranges[key] = piece if key not in ranges else uf.union(ranges[key], piece)
        keys = sorted(ranges)
        if keys[0][0] != 0 or keys[-1][1] != size or any(
                a[1] != b[0] for a, b in zip(keys, keys[1:], strict=False)):
            return f"{what} that does not cut the whole dim into pieces"
        labs = [ranges[k] for k in keys]
        found = []
        for mname, b in dict.fromkeys(bounds):
            mname = mname if mname in self._module_names else ""
            here = [(mname, attr, "total", v, labs[:sum(1 for k in keys if k[1] <= b)])
                    for attr, v in vars(self.model.get_submodule(mname)).items()
                    if not attr.startswith("_") and type(v) is int and v == b]
            if not here:
                return const
            if any(self._claimed.get(h[:2], r) != r for h in here):
                return f"{what} with bounds in attributes of {mname} that another cut reads too"
            found += here
        for h in found:
            self._claimed[h[:2]] = r
        segments = [(ranges[k], k[1] - k[0]) for k in keys]
        return segments, found, recs[0][4]["module"]

    def _refine(self, ref: list, other: list, extra: set) -> str | None:
        """Cut the segments of two segmentations of the same channels at the boundaries of
        both: a segment spanning a boundary of the other has its class cut there (every label
        of it becomes a concat of new pieces, as a split's producer does). None when done (the
        caller looks again), else why it cannot be."""
        uf = self.uf

        def bounds(segs):
            out, off = set(), 0
            for _, w in segs:
                off += w
                out.add(off)
            return out

        every = bounds(ref) | bounds(other)
        if max(every) != sum(w for _, w in ref):
            return "of different total widths"
        for segs in (ref, other):
            off = 0
            for lab, w in segs:
                inner = sorted(b - off for b in every if off < b < off + w)
                off += w
                if not inner:
                    continue
                if lab is None:
                    return "a fixed-width input would be cut"
                r = uf.find(lab)
                members = [m for m in range(len(uf.parent)) if uf.find(m) == r]
                if uf.frozen[r] or any(m in self.concat_of or m in self.repeat_of or m in extra
                                       for m in members):
                    return "a segment that cannot be cut"
                cuts = [0, *inner, w]
                pieces = [(uf.new(b - a), b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
                link = uf.new(w)  # the pieces' concat, in the class
                uf.union(r, link)
                for m in [*members, link]:
                    self.concat_of[m] = list(pieces)
                    self.concat_where[m] = "a cut matching another concat of these channels"
                return None
        return "no segment to cut"

    def _flat_segments(self, cat_lab: int, seen: frozenset = frozenset()
                       ) -> list[tuple[int | None, int]]:
        """The segments of a concat label, a segment that is itself a concat (of a consistent
        class: :meth:`_resolve_concats`) replaced by its segments."""
        out: list[tuple[int | None, int]] = []
        for lab, width in self.concat_of[cat_lab]:
            r = None if lab is None else self.uf.find(lab)
            rep = self._concat_rep.get(r) if r is not None else None
            if rep is not None and r not in seen:
                out.extend(self._flat_segments(rep, seen | {r}))
            else:
                out.append((lab, width))
        return out

    def _resolve_pending_splits(self) -> None:
        """A view that split a labelled channel dim into ``(n, m)`` and was not exactly the first
        half of a channel shuffle: its inner dim holds ``n`` equal contiguous pieces of the
        channels, one group (a chunk(n) then a stack), as :meth:`_resolve_slices` cuts them."""
        uf = self.uf
        members = uf.classes()
        for inner, pend in sorted(self.pending_split.items(), key=lambda kv: -kv[1]["at"]):
            if pend["shuffles"] and members.get(uf.find(inner)) == [inner] \
                    and not uf.frozen[uf.find(inner)] and len(pend["shuffles"]) == 1:
                continue
            for mixed in pend["shuffles"]:
                self.bad_mixed[mixed] = (f"the split view of the channel shuffle in "
                                         f"{pend['call']['module'] or 'the model'} is used by "
                                         "other ops too")
            n, m, at = pend["n"], pend["m"], pend["at"]
            saved, self.slices = self.slices, []
            piece = None
            for k in range(n):
                p = self._piece(pend["src"], k * m, (k + 1) * m, pend["dim"], pend["call"])
                piece = p if piece is None else uf.union(piece, p)
            uf.union(inner, piece)
            self.slices = saved[:at] + self.slices + saved[at:]

    def _resolve_mixed(self) -> None:
        """Decide, for every mixed label (a channel shuffle's output, a piece of it, a concat
        with it), whether its channels stay prunable, each with its own group.

        The hard network and the export cannot run the model's own shuffle (it interleaves the
        kept channels by rank, not by identity): each shuffle and cut of mixed channels must run
        in a module whose class s2h *routes* (:func:`s2h.registry.router_for`: the kept channels
        moved by index). A mixed class must also be only mixed labels of one map (no add with
        other channels), and its channels plain groups. Otherwise the mixed channels are kept
        whole, and with them every group they come from."""
        if not self.mix_of:
            return
        uf = self.uf
        bad = dict(self.bad_mixed)
        by_module: dict[int, list] = {}
        for site in self.route_sites:
            by_module.setdefault(id(site[0]), []).append(site)
        for sites in by_module.values():
            mod, name = sites[0][0], sites[0][1]
            router = _registry.router_for(type(mod))
            kinds = [(kind, data) for _, _, kind, _, _, data, _ in sites]
            why = (f"s2h routes the kept channels of a channel shuffle only in "
                   f"{_registry.routed_names()}, not in {type(mod).__name__}'s own code"
                   if router is None else router.check(mod, kinds))
            if why is not None:
                for site in sites:
                    what = ("a channel shuffle (a view, transpose and view back of the channel "
                            "dim)" if site[2] == "shuffle" else "a cut of shuffled channels")
                    bad.setdefault(site[4], f"{what} in {site[6]}: {why}")
            else:
                self.routed[id(mod)] = (mod, name, sites)
        members = uf.classes()
        roots: dict[int, list[int]] = {}
        for mixed in self.mix_of:
            roots.setdefault(uf.find(mixed), []).append(mixed)
        concat_roots = {uf.find(c) for c in self.concat_of}

        def resolved(mixed: int) -> list:
            return [(None if lab is None else uf.find(lab), ch) for lab, ch in self.mix_of[mixed]]

        for r, ms in roots.items():
            ref = resolved(ms[0])
            if sorted(members[r]) != sorted(ms) or any(resolved(x) != ref for x in ms[1:]):
                bad.setdefault(ms[0], "the shuffled channels meet other channels (an add, or a "
                                      "layer called on other inputs too)")
            elif any(lab is not None and (lab in roots or lab in concat_roots)
                     for lab, _ in ref):
                bad.setdefault(ms[0], "shuffled channels of a concatenation that is cut again")
        changed = True
        while changed:  # a whole mixed label keeps every channel it holds whole
            changed = False
            for r, ms in roots.items():
                why = next((bad[x] for x in ms if x in bad), None)
                if why is None and not uf.frozen[uf.find(r)]:
                    continue
                if why is not None and not uf.frozen[uf.find(r)]:
                    uf.freeze(r, why)
                why = why or (uf.reasons[uf.find(r)] or ["it is kept whole"])[0]
                for x in ms:
                    for lab, _ in self.mix_of[x]:
                        if lab is not None and not uf.frozen[uf.find(lab)]:
                            uf.freeze(lab, f"shuffled into channels that are kept whole: {why}")
                            changed = True

    def _resolve_concats(self) -> None:
        """Decide, for every concat along a labelled dim, whether its segments stay prunable.

        A concat label's class (everything its channels met) must hold concat labels only, all
        with the same segment widths: then the segments at each position are the same channels
        and are merged pairwise (two concats added together), a segment meeting a fixed-width
        segment is kept whole, and each consumer of the class reads every segment at its
        offset. Anything else -- the concatenated channels met a layer's output (an add), were
        reshaped (a channel shuffle), reduced, normalised over, reached the model output, or are
        read in a linear's row dims or scaled by a parameter -- keeps the class whole, and with
        it every segment (the consumer sees all of them)."""
        if not self.concat_of:
            return
        uf = self.uf
        bad: dict[int, str] = {}
        extra = {lab for rec in self.layers.values() for lab in rec.extra_labels.values()}
        while True:  # each pass merges or cuts something (cuts only refine: it ends)
            changed = False
            cat_roots: dict[int, list[int]] = {}
            for c in self.concat_of:
                cat_roots.setdefault(uf.find(c), []).append(c)
            plain: dict[int, list[int]] = {}
            for lab in range(len(uf.parent)):
                if lab not in self.concat_of and uf.find(lab) in cat_roots:
                    plain.setdefault(uf.find(lab), []).append(lab)
            mixed = {r for r, labs in plain.items()
                     if any(lab in self.repeat_of or lab in extra for lab in labs)}
            self._concat_rep = {r: cs[0] for r, cs in cat_roots.items() if r not in mixed}
            for r, labs in plain.items():
                # a layer's output that meets concatenated channels (a residual add): its
                # output channels become the same segments (its rows are cut by them)
                if r not in mixed and r not in bad:
                    ref = self._flat_segments(cat_roots[r][0], frozenset({r}))
                    for lab in labs:
                        self.concat_of[lab] = list(ref)
                        self.concat_where[lab] = self.concat_where[cat_roots[r][0]]
                    changed = True
            if changed:
                continue
            for r, cs in cat_roots.items():
                if r in mixed or r in bad:
                    continue
                ref = self._flat_segments(cs[0], frozenset({r}))
                for c in cs[1:]:
                    other = self._flat_segments(c, frozenset({r}))
                    if [w for _, w in other] != [w for _, w in ref]:
                        # cut the segments at each other's boundaries (MixNet: a split in 3
                        # after a split in 2), or keep the class whole where they cannot be
                        why = self._refine(ref, other, extra)
                        if why is not None:
                            bad[r] = (f"two concatenations of other segment widths meet (in "
                                      f"{self.concat_where[cs[0]]} and {self.concat_where[c]})"
                                      f": {why}")
                        changed = True
                        break
                    for (a, _), (b, _) in zip(ref, other, strict=True):
                        if a is None and b is None:
                            continue
                        if a is None or b is None:
                            lab = a if b is None else b
                            if not uf.frozen[uf.find(lab)]:
                                uf.freeze(lab, f"concatenated in {self.concat_where[c]} where "
                                               "the same positions hold an unpruned tensor")
                                changed = True
                        elif uf.find(a) != uf.find(b):
                            uf.union(a, b)
                            changed = True
            if not changed:
                break
        cat_roots = {uf.find(c) for c in self.concat_of}
        for r in mixed:
            bad.setdefault(r, "the concatenated channels meet flattened or attention channels")
        for name, rec in self.layers.items():
            for lab in rec.row_labels:
                if uf.find(lab) in cat_roots:
                    bad.setdefault(uf.find(lab), f"{name} reads them in a row dim")
        for pname, lab in self.channel_params.items():
            if uf.find(lab) in cat_roots:
                bad.setdefault(uf.find(lab), f"the parameter {pname!r} scales them")
        changed = True
        while changed:  # a whole concat keeps its segments whole (and a concat of those ...)
            changed = False
            for c, segs in self.concat_of.items():
                r = uf.find(c)
                if r not in bad and not uf.frozen[r]:
                    continue
                why = bad.get(r) or (uf.reasons[r] or ["it is kept whole"])[0]
                if not uf.frozen[r]:
                    uf.freeze(r, why)
                for lab, _ in segs:
                    if lab is not None and not uf.frozen[uf.find(lab)]:
                        uf.freeze(lab, f"concatenated along the channel dim in "
                                       f"{self.concat_where[c]}, and the concatenation is kept "
                                       f"whole: {why}")
                        changed = True
        self._concat_rep = {uf.find(c): c for c in self.concat_of}

    # ----------------------------------------------------------------- module rules
    def layer_info(self, name: str, m: nn.Module) -> _registry.LayerInfo:
        info = _registry.layer_info(m)
        if info is None:  # not a layer at all (cannot happen for modules passed here)
            info = _registry.LayerInfo("fixed", -1, "not a known layer")
        if name in self.ignore:
            return _registry.LayerInfo("fixed", info.channel_dim, "in ignore=")
        return info

    def on_layer(self, name: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self._freeze_factors(x, f"{name} reads channels merged with other dims")
        info = self.layer_info(name, m)
        kind = info.kind
        in_lab = self.get(x)
        rec = self.layers.get(name)
        channel_dim = info.channel_dim
        lab_in = in_lab[channel_dim] if x.dim() else None
        if rec is None:
            rec = LayerRecord(name, m, kind, in_shape=tuple(x.shape), out_shape=tuple(y.shape),
                              info=info)
            self.layers[name] = rec
        if kind == "fixed":
            reason = (
                f"{name} ({type(m).__name__}"
                + (f", groups={m.groups}" if isinstance(m, nn.Conv2d)
                   and "groups=" not in info.reason else "")
                + (f", {info.reason}" if info.reason else ", not prunable")
                + ")"
            )
            self.freeze_label(lab_in, reason)
            for lab in in_lab:
                self.freeze_label(lab, reason)
            if name in self.out_label_of:
                out_lab = self.out_label_of[name]
            else:
                out_lab = self.uf.new(y.shape[channel_dim] if y.dim() else 0)
                self.out_label_of[name] = out_lab
            self.uf.freeze(out_lab, reason)
            self.set(y, [None] * y.dim())
            return
        # input side: record / merge the consumer label
        if kind in ("conv", "linear", "attention"):
            if rec.in_label is None and lab_in is not None and name not in self._seen_calls:
                rec.in_label = lab_in
            elif name in self._seen_calls:
                if (rec.in_label is None) != (lab_in is None):
                    self.freeze_label(rec.in_label if rec.in_label is not None else lab_in,
                                      f"{name} is called on tensors of different groups")
                elif lab_in is not None:
                    rec.in_label = self.uf.union(rec.in_label, lab_in)
            out = [None] * y.dim()
            for d in range(y.dim() - (2 if kind == "conv" else 1)):
                if kind == "linear" and d < len(in_lab) - 1:
                    out[d] = in_lab[d]
                    if in_lab[d] is not None and in_lab[d] not in rec.row_labels:
                        rec.row_labels.append(in_lab[d])
            if name in self.out_label_of:
                olab = self.out_label_of[name]
            else:
                olab = self.uf.new(y.shape[channel_dim])
                self.out_label_of[name] = olab
            out[channel_dim] = olab
            rec.out_label = olab
            for role, (channels, _) in _registry.handler_for(type(m)).inner_groups(m).items():
                if role not in rec.extra_labels:
                    rec.extra_labels[role] = self.uf.new(channels)
            self.set(y, out)
        else:  # depthwise conv, batchnorm, layernorm: output channels = input channels
            if lab_in is None:
                self.set(y, list(in_lab) if kind != "depthwise" else [None] * y.dim())
                rec.in_label = rec.out_label = None
            else:
                rec.in_label = rec.out_label = lab_in if rec.in_label is None else self.uf.union(
                    rec.in_label, lab_in
                )
                out = (list(in_lab) if kind != "depthwise"
                       else [None, lab_in] + [None] * (y.dim() - 2))
                self.set(y, out)
        # channels of a group in another dim of the input (moved there by a transpose / view):
        # the layer does not carry them to its output, so they could not be pruned consistently
        kept = set(self.get(y))
        for d, lab in enumerate(in_lab):
            if lab is not None and d != channel_dim % len(in_lab) and lab not in kept:
                self.freeze_label(lab, f"{name} receives these channels in dim {d}, not in its "
                                       f"channel dim (a transpose / channel-swapping view before "
                                       f"it?)")
        self._seen_calls.add(name)

    def on_more_inputs(self, name: str, call: _registry.LayerCall) -> None:
        """A layer's inputs besides ``call.x`` (an attention's key and value): ``call.same``
        join the layer's input group, ``call.whole`` are kept whole."""
        rec = self.layers[name]
        dim = rec.info.channel_dim
        for t in call.whole:
            self.freeze_tensor(t, f"{name} needs this input at full width")
        for t in call.same:
            if t is call.x:
                continue
            lab = self.get(t)
            own = lab[dim] if t.dim() else None
            for d, other in enumerate(lab):
                if other is not None and d != dim % t.dim():
                    self.freeze_label(other, f"{name} receives these channels in dim {d}, not "
                                             "in its channel dim")
            if rec.kind == "fixed" or rec.in_label is None or own is None:
                reason = f"{name} is called on inputs of different groups"
                self.freeze_label(own, reason)
                self.freeze_label(rec.in_label, reason)
            else:
                rec.in_label = self.uf.union(rec.in_label, own)

    # ----------------------------------------------------------------- run
    def run(self, example_inputs) -> None:
        self._seen_calls: set[str] = set()
        hooks = []
        names = {m: n for n, m in self.model.named_modules()}

        is_layer = {m: _is_layer(m) for m in names}

        def pre(m, args):
            self._internal += 1
            try:
                self.flops.enter(m)
                name = names[m]
                self.module_stack.append(name or type(m).__name__)
                self.module_objs.append(m)
                if is_layer[m]:
                    self.opaque_depth += 1
            finally:
                self._internal -= 1

        def post(m, args, out):
            self._internal += 1
            try:
                self.flops.exit(m)
                name = names[m]
                self.module_stack.pop()
                self.module_objs.pop()
                if is_layer[m]:
                    self.opaque_depth -= 1
                    if self.opaque_depth == 0:
                        call = _registry.layer_call(m, args, out)
                        if call is not None:
                            self.on_layer(name, m, call.x, call.y)
                            self.on_more_inputs(name, call)
                        else:
                            self.freeze_inputs(args, {}, f"{name} called with non-tensor arguments")
            finally:
                self._internal -= 1

        for m in self.model.modules():
            hooks.append(m.register_forward_pre_hook(pre))
            hooks.append(m.register_forward_hook(post))
        try:
            with (self._size_reads(names, is_layer), _ReshapeCalls(self), self.flops,
                  self._tracer()):
                out = self.model(*example_inputs)
        finally:
            for h in hooks:
                h.remove()
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for lab in self.get(t):
                    self.freeze_label(lab, "the model output (never pruned)")
                self._freeze_factors(t, "the model output (never pruned)")
        # a layer whose weights or sizes the model's own code reads outside the layer's call:
        # that code would see other values in the exported (smaller) model, so keep it whole
        for lname, reads in self.outside_reads.items():
            rec = self.layers.get(lname)
            if rec is None:
                continue
            for side, what, where in reads:
                labs = {"in": [rec.in_label], "out": [rec.out_label]}.get(
                    side, [rec.in_label, rec.out_label, *rec.extra_labels.values()])
                for lab in labs:
                    self.freeze_label(lab, f"{lname} is read outside its own call ({what}, in "
                                           f"{where}): the exported model would differ")
        self._resolve_repeats()
        self._resolve_pending_splits()
        self._resolve_slices()
        self._resolve_concats()
        self._resolve_mixed()
        self._resolve_reshape_attrs()

    def _resolve_reshape_attrs(self) -> None:
        """The widths a reshape passes from module attributes (:meth:`_reshape_width_attr`)
        become width attributes of kind ``"reshape"`` (the kept width of the one group), unless
        the channels are kept whole anyway or are the segments of a concat / cut."""
        taken = {(m, a) for m, a, *_ in self.width_attrs}
        for mname, attr, value, lab in self.reshape_attrs:
            r = self.uf.find(lab)
            if self.uf.frozen[r] or (mname, attr) in taken or lab in self.concat_of \
                    or r in self._concat_rep:
                continue
            taken.add((mname, attr))
            self.width_attrs.append((mname, attr, "reshape", value, [lab]))

    @contextlib.contextmanager
    def _size_reads(self, names, is_layer):
        """Record Python reads of the layers' size attributes (``conv.out_channels``,
        ``bn.num_features``, ...) made by the model's own code outside the layer's call.

        The attributes are moved out of the instances' ``__dict__`` for the trace, so that a read
        reaches ``nn.Module.__getattr__``, replaced for the trace by one that records it."""
        stash: dict[int, tuple[str, dict]] = {}
        for m, name in names.items():
            if is_layer[m]:
                vals = {a: m.__dict__.pop(a) for a in _SIZE_ATTRS if a in m.__dict__}
                if vals:
                    stash[id(m)] = (name, vals)
        orig = nn.Module.__getattr__
        an = self

        def getattr_(mod, attr):
            ent = stash.get(id(mod))
            if ent is not None and attr in ent[1]:
                if an.opaque_depth == 0 and an._internal == 0:
                    an.outside_reads.setdefault(ent[0], []).append(
                        (_SIZE_ATTRS[attr], f"its size {ent[0]}.{attr} is read", an.where()))
                return ent[1][attr]
            return orig(mod, attr)

        nn.Module.__getattr__ = getattr_
        try:
            yield
        finally:
            nn.Module.__getattr__ = orig
            for m in names:
                ent = stash.get(id(m))
                if ent is not None:
                    m.__dict__.update(ent[1])

    def _tracer(self):
        return _Tracer(self)


def analyze(
    model: nn.Module, example_inputs: tuple, ignore: set[str] | None = None
) -> GraphAnalysis:
    """Find the dependency groups of ``model`` by running it on ``example_inputs``.

    The model is put in eval mode for the trace (BatchNorm statistics are not touched) and
    restored afterwards. Returns every group found, prunable or not, with the reason a frozen
    group is kept whole.
    """
    ignore = set(ignore or ())
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(ignore - names)
    if unknown:
        raise ValueError(
            f"ignore= names modules that do not exist: {unknown}. Module names are those of "
            "model.named_modules(), e.g. 'layer1.0.conv1'."
        )
    an = _Analyzer(model, ignore)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            an.run(example_inputs)
    finally:
        model.train(was_training)

    # collect groups by root label, in order of first appearance
    roots: dict[int, Group] = {}
    order: list[int] = []
    layer_in_group: dict[str, int] = {}
    layer_out_group: dict[str, int] = {}

    def group_of(lab: int, first_member: str) -> Group:
        r = an.uf.find(lab)
        if r not in roots:
            roots[r] = Group(name=first_member, channels=an.uf.size[r])
            order.append(r)
        return roots[r]

    for name, rec in an.layers.items():
        if rec.kind in ("conv", "linear", "attention") and rec.out_label is not None:
            g = group_of(rec.out_label, name)
            g.producers.append(name)
            g.roles[name] = "out"
        if rec.kind == "fixed" and name in an.out_label_of:
            group_of(an.out_label_of[name], name).producers.append(name)
        for role, lab in rec.extra_labels.items():
            g = group_of(lab, f"{name}.{role}")
            g.producers.append(name)
            g.consumers.append(name)
            g.roles[name] = role
            g.divisor = _registry.handler_for(type(rec.module)).inner_groups(rec.module)[role][1]
    for name, rec in an.layers.items():
        if rec.kind in ("conv", "linear", "attention") and rec.in_label is not None:
            group_of(rec.in_label, name).consumers.append(name)
        elif rec.kind in ("batchnorm", "layernorm") and rec.in_label is not None:
            group_of(rec.in_label, name).norms.append(name)
        elif rec.kind == "depthwise" and rec.in_label is not None:
            group_of(rec.in_label, name).depthwise.append(name)
    for r, c in an._concat_rep.items():  # a piece read only through a concat: a group too
        if r in roots and not an.uf.frozen[r]:
            for lab, _ in an._flat_segments(c, frozenset({r})):
                if lab is not None and an.uf.find(lab) not in an._concat_rep:
                    group_of(lab, f"{roots[r].name}.piece")
    groups = []
    for r in order:
        g = roots[r]
        g.frozen = an.uf.frozen[r]
        g.reasons = list(an.uf.reasons[r])
        groups.append(g)
    index = {id(g): i for i, g in enumerate(groups)}
    # a concat's channels: segments owned by their groups, which its consumers consume too
    for r, c in an._concat_rep.items():
        g = roots.get(r)
        if g is None or g.frozen:
            continue
        off = 0
        for lab, width in an._flat_segments(c, frozenset({r})):
            seg = None if lab is None else roots.get(an.uf.find(lab))
            g.segments.append((None if seg is None else index[id(seg)], width))
            if seg is not None:
                seg.consumers.extend(n for n in g.consumers if n not in seg.consumers)
                # a cut producer's output: each piece's group produces its channel range
                if g.producers and not seg.producers:  # named after its producer's range
                    seg.name = f"{g.producers[0]}[{off}:{off + width}]"
                for n in g.producers + g.depthwise:
                    dst = seg.depthwise if n in g.depthwise else seg.producers
                    if n not in dst:
                        dst.append(n)
                    seg.roles.setdefault(n, g.roles.get(n, "out"))
                    seg.producer_ranges.setdefault(n, []).append((off, off + width))
            off += width
        g.producers, g.depthwise = [], []
    # mixed channels (a channel shuffle): each position a channel of its group, whose consumers
    # these are too
    def positions_of(entries: list) -> list[tuple[int | None, int]]:
        out = []
        for lab, ch in entries:
            g = None if lab is None else roots.get(an.uf.find(lab))
            out.append((None if g is None else index[id(g)], ch))
        return out

    for mixed, entries in an.mix_of.items():
        g = roots.get(an.uf.find(mixed))
        if g is None or g.frozen or g.positions:
            continue
        g.positions = positions_of(entries)
        for i in {i for i, _ in g.positions if i is not None}:
            seg = groups[i]
            seg.consumers.extend(n for n in g.consumers if n not in seg.consumers)
    routes: dict[str, list] = {}
    for _mod, mname, sites in an.routed.values():
        routes[mname] = [(kind, positions_of(an._map_of(src, an.uf.size[src])),
                          positions_of(an.mix_of[out]), data)
                         for _, _, kind, src, out, data, _ in sites]
    _resolve_grouped_convs(groups, an.layers)
    # unique names (the gates are keyed by them): a group named after a layer that it is only
    # the input of (a piece of a cut, a concat) yields to the layer's own output group
    taken = {g.name for g in groups if g.name in g.producers}
    for g in groups:
        if g.name in g.producers:
            continue
        base, k = f"{g.name}:in", 1
        name = g.name if g.name not in taken else base
        while name in taken:
            k += 1
            name = f"{base}{k}"
        g.name = name
        taken.add(name)
    width_attrs = []
    for mname, attr, how, orig, labs in an.width_attrs:
        idx = [(None if roots.get(an.uf.find(lab)) is None
                else index[id(roots[an.uf.find(lab)])], an.uf.size[lab]) for lab in labs]
        width_attrs.append((mname, attr, how, orig, idx))
    for g in groups:
        if not g.consumers and not g.frozen and not g.segments and not g.positions:
            g.reasons.append("no conv/linear consumes these channels")
    layer_extra_group: dict[str, dict[str, int]] = {}
    layer_row_groups: dict[str, list[int]] = {}
    layer_in_repeat: dict[str, int] = {}
    for name, rec in an.layers.items():
        if rec.in_label is not None:
            layer_in_group[name] = index[id(roots[an.uf.find(rec.in_label)])]
        if rec.out_label is not None:
            layer_out_group[name] = index[id(roots[an.uf.find(rec.out_label)])]
        for role, lab in rec.extra_labels.items():
            layer_extra_group.setdefault(name, {})[role] = index[id(roots[an.uf.find(lab)])]
        rows = sorted({index[id(roots[an.uf.find(lab)])] for lab in rec.row_labels
                       if an.uf.find(lab) in roots})
        if rows:
            layer_row_groups[name] = rows
        if rec.in_repeat > 1 and name in layer_in_group:
            layer_in_repeat[name] = rec.in_repeat
    # per-channel parameters: sliced with their group, or (used elsewhere too) freeze it
    for pname, lab in an.channel_params.items():
        r = an.uf.find(lab)
        if r not in roots:
            continue
        g = roots[r]
        p = an.params[pname]
        dims = [d for d, s in enumerate(p.shape) if s > 1]
        if pname in an.channel_param_dim:  # a class token / position embedding
            dims = [an.channel_param_dim[pname]]
            if (pname, dims[0]) in an.unbound_param_dims or pname in an.param_other_use:
                an.bad_params.add(pname)
        if pname in an.bad_params or len(dims) != 1 or p.shape[dims[0]] != g.channels:
            if not g.frozen:
                g.frozen = True
                g.reasons.append(f"the parameter {pname!r} scales these channels and is also "
                                 "used elsewhere")
            continue
        g.params.append((pname, dims[0]))
    # each layer's FLOPs as torch's counter counted them in the trace, split by the handler
    # into the parts that scale with its groups
    for rec in an.layers.values():
        m = rec.module

        def flops_of(child: str, m: nn.Module = m) -> int:
            return an.flops.of(m.get_submodule(child) if child else m)

        rec.dense_flops = flops_of("")
        handler = _registry.handler_for(type(m))
        if rec.kind != "fixed" and handler is not None:
            rec.flop_parts = handler.flop_parts(m, rec.info, flops_of)
    for g in groups:
        if g.frozen and g.reasons and g.producers:
            msg = f"group {g.name!r} ({g.channels} channels) is left unpruned: {g.reasons[0]}"
            an.warnings.append(msg)
    return GraphAnalysis(
        layers=an.layers,
        groups=groups,
        layer_in_group=layer_in_group,
        layer_out_group=layer_out_group,
        warnings=an.warnings,
        total_flops=an.flops.total(),
        layer_extra_group=layer_extra_group,
        layer_row_groups=layer_row_groups,
        layer_in_repeat=layer_in_repeat,
        module_flops={n: an.flops.of(m) for n, m in model.named_modules()},
        width_attrs=width_attrs,
        routes=routes,
    )


def _resolve_grouped_convs(groups: list[Group], layers: dict[str, LayerRecord]) -> None:
    """Grouped convs with as many output as input channels (``LayerInfo.block`` > 1) pass their
    group through, pruned in whole conv groups (a group norm's norm groups likewise): each
    group gets the least common multiple of its grouped convs' blocks as :attr:`Group.block`
    (the blocks of all of them then line up at channel 0). Kept whole where that cannot be
    exact: the blocks do not tile the group, the group's channels reach the conv through a
    concat or a split (its conv groups would not start at the group's channel 0), or the group
    has a width granularity of its own (heads)."""
    from math import lcm

    for g in groups:
        blocks = {name: layers[name].info.block for name in g.depthwise + g.norms
                  if layers[name].info is not None and layers[name].info.block > 1}
        if not blocks or g.frozen:
            continue
        why = None
        block = lcm(*blocks.values())
        names = ", ".join(sorted(blocks))
        if any(name in g.producer_ranges for name in blocks) or g.segments:
            why = f"the grouped conv {names} reads these channels through a concat or a split"
        elif g.channels % block:
            why = f"the conv groups of {names} (blocks of {sorted(set(blocks.values()))} " \
                  f"channels) do not tile its {g.channels} channels"
        elif g.divisor is not None:
            why = f"the grouped conv {names} and a width granularity of {g.divisor} (heads)"
        if why is not None:
            g.frozen = True
            g.reasons.append(why)
        else:
            g.block = block


def warn_frozen(analysis: GraphAnalysis) -> None:
    """Emit one ``UserWarning`` per frozen group whose freezing the user may not expect."""
    for msg in analysis.warnings:
        if "the model output" in msg:
            continue  # the classifier's output: expected, not worth a warning
        warnings.warn(msg, stacklevel=3)
