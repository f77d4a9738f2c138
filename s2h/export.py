"""Exported (pruned) models: checking one against the hard network, saving and loading it
without pickle.

:func:`export_difference` measures an export against the hard network it came from (the
pruners warn with :class:`ExportMismatchWarning` above :data:`EXPORT_TOLERANCE`).

A saved model is a directory with

* ``model.safetensors`` — every tensor of ``state_dict()``;
* ``architecture.json`` — how to rebuild the module tree: a *builder* for the dense architecture
  (``s2h.models`` name, timm model name, torchvision classification model name, or a full
  structural description for models made only of standard ``torch.nn`` layers and containers)
  plus the shape of every conv / linear / norm layer of the pruned model, which replace the dense
  ones before the weights are loaded, and the *swaps*: an attention layer whose pruned form is
  another class (``nn.MultiheadAttention`` ->
  :class:`~s2h.torch_attention.PrunedMultiheadAttention`, torchvision's
  ``ShiftedWindowAttention`` -> ``PrunedShiftedWindowAttention``, MaxViT's
  ``RelativePositionalMultiHeadAttention`` -> ``PrunedRelativePositionalMultiHeadAttention``,
  timm's PVT v2 ``Attention`` -> :class:`~s2h.timm_support.PrunedPvtAttention`),
  rebuilt from the dense layer at the same path and the recorded sizes; and the *routed*
  blocks: torchvision's ShuffleNetV2 ``InvertedResidual`` with its channel shuffle routed by
  index (:class:`~s2h.torchvision_support.RoutedInvertedResidual`, the kept-channel split and
  order recorded as integers).

Loading imports no name from the file: builders are looked up in fixed tables and module types in
an allow-list, so an untrusted directory cannot run code (unlike ``torch.load`` of a pickled
model). For a model of your own class, pass ``model_fn`` to :func:`load_exported`.

A torchvision model is recognised (:func:`detect_builder`) when one of torchvision's
classification builders, with ``weights=None`` and the constructor arguments read off the model
(``num_classes``; ViT's ``image_size``; GoogLeNet / Inception's ``aux_logits`` and
``transform_input``; MaxViT's ``input_size`` from the example input), builds exactly the same
module tree: same paths, classes, tensor shapes and plain attributes. Anything else is not
guessed: pass ``builder=`` to :func:`save_exported` and ``model_fn`` to :func:`load_exported`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .utils import as_tuple

FORMAT = "s2h-exported"
VERSION = 1

#: the exported model and the hard network must agree to this (fp32, relative to the output's
#: magnitude when it is above 1)
EXPORT_TOLERANCE = 1e-5


class ExportMismatchWarning(UserWarning):
    """The exported model's outputs differ from the hard network's on the same inputs."""


@torch.no_grad()
def export_difference(hard_fn: Callable, module: nn.Module, exported: nn.Module,
                      inputs: torch.Tensor | tuple) -> tuple[float, float]:
    """``(max |exported(x) - hard_fn(x)|, tolerance)`` on ``inputs`` in fp32, both in eval mode
    (``module``: the model behind ``hard_fn``; training flags are restored). Outputs that do not
    even have the same structure or shapes give ``inf``."""
    inputs = as_tuple(inputs)
    was, was_e = module.training, exported.training
    module.eval()
    exported.eval()
    dev = inputs[0].device if inputs and isinstance(inputs[0], torch.Tensor) else None
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device_type=dev.type if dev is not None else "cpu", enabled=False):
            ref = torch.utils._pytree.tree_leaves(hard_fn(inputs))
            out = torch.utils._pytree.tree_leaves(exported(*inputs))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        module.train(was)
        exported.train(was_e)
    if len(ref) != len(out):
        return float("inf"), EXPORT_TOLERANCE
    diff, scale = 0.0, 1.0
    for a, b in zip(ref, out, strict=True):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf"), EXPORT_TOLERANCE
        if a.numel():
            diff = max(diff, float((a.float() - b.float()).abs().max()))
            scale = max(scale, float(a.float().abs().max()))
    return diff, EXPORT_TOLERANCE * scale


#: leaf layers that can be described and rebuilt from constructor arguments
_LEAF_ARGS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups", "bias", "padding_mode"),
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.GELU: ("approximate",),
    nn.SiLU: ("inplace",), nn.Hardswish: ("inplace",), nn.Hardsigmoid: ("inplace",),
    nn.Sigmoid: (), nn.Tanh: (), nn.Identity: (), nn.Flatten: ("start_dim", "end_dim"),
    nn.Dropout: ("p", "inplace"), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.LeakyReLU: ("negative_slope", "inplace"),
}
_CONTAINERS = {nn.Sequential: "Sequential", nn.ModuleList: "ModuleList"}
_TYPES = {cls.__name__: cls for cls in list(_LEAF_ARGS) + list(_CONTAINERS)}
_RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)

#: layers of other libraries (timm) that an export resizes *in place*: fully qualified class
#: name -> the size attributes recorded in architecture.json (ints / int tuples only). Loading
#: checks that the rebuilt model has a module of exactly that class at that path, sets those
#: attributes, and gives its own parameters / buffers the shapes stored in model.safetensors.
_RESIZED_ATTRS: dict[str, tuple[str, ...]] = {
    "timm.layers.norm_act.BatchNormAct2d": ("num_features",),
    "timm.layers.norm.LayerNorm": ("normalized_shape",),
    "timm.layers.norm.LayerNorm2d": ("normalized_shape",),
    "timm.layers.linear.Linear": ("in_features", "out_features"),
    "timm.layers.attention.Attention": ("num_heads", "attn_dim"),
    "timm.models.swin_transformer.WindowAttention": ("num_heads",),
    "torchvision.models.convnext.LayerNorm2d": ("normalized_shape",),
    "torch.nn.modules.normalization.GroupNorm": ("num_groups", "num_channels"),
    "timm.layers.norm_act.GroupNormAct": ("num_groups", "num_channels"),
    "timm.layers.norm.GroupNorm1": ("num_groups", "num_channels"),
    "timm.layers.conv2d_same.Conv2dSame": ("in_channels", "out_channels", "groups"),
    "timm.layers.std_conv.StdConv2d": ("in_channels", "out_channels", "groups"),
    "timm.layers.std_conv.StdConv2dSame": ("in_channels", "out_channels", "groups"),
    "timm.layers.std_conv.ScaledStdConv2d": ("in_channels", "out_channels", "groups"),
    "timm.layers.std_conv.ScaledStdConv2dSame": ("in_channels", "out_channels", "groups"),
}


def _mha_sizes(m: nn.Module) -> dict:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim,
            "out_dim": m.out_dim, "source_heads": list(m.source_heads or ()),
            "source_num_heads": m.source_num_heads}


def _mha_build(dense: nn.Module, sizes: dict) -> nn.Module:
    from .torch_attention import PrunedMultiheadAttention

    if sizes["source_num_heads"] != dense.num_heads:
        raise ValueError(f"the saved heads come from a layer of {sizes['source_num_heads']} "
                         f"heads, the rebuilt one has {dense.num_heads}")
    heads = sizes["source_heads"]
    if len(heads) != sizes["num_heads"] or len(set(heads)) != len(heads) \
            or not all(0 <= h < dense.num_heads for h in heads):
        raise ValueError(f"bad source_heads {heads!r} for {sizes['num_heads']} of "
                         f"{dense.num_heads} heads")
    if sizes["head_dim"] != dense.head_dim:
        raise ValueError(f"head_dim {sizes['head_dim']} != the rebuilt layer's {dense.head_dim}")
    w = dense.in_proj_weight if dense._qkv_same_embed_dim else dense.q_proj_weight
    same = dense._qkv_same_embed_dim
    return PrunedMultiheadAttention(
        sizes["embed_dim"], sizes["num_heads"], sizes["head_dim"],
        bias=dense.in_proj_bias is not None, kdim=None if same else dense.kdim,
        vdim=None if same else dense.vdim, out_dim=sizes["out_dim"],
        batch_first=dense.batch_first, dropout=dense.dropout, source_heads=heads,
        source_num_heads=dense.num_heads, dtype=w.dtype)


def _swin_sizes(m: nn.Module) -> dict:
    return {"dim": m.qkv.in_features, "num_heads": m.num_heads, "head_dim": m.head_dim,
            "out_dim": m.proj.out_features}


def _swin_build(dense: nn.Module, sizes: dict) -> nn.Module:
    from .torchvision_support import PrunedShiftedWindowAttention

    hd = dense.qkv.in_features // dense.num_heads
    if sizes["head_dim"] != hd or not 0 < sizes["num_heads"] <= dense.num_heads:
        raise ValueError(f"{sizes['num_heads']} heads of {sizes['head_dim']} do not fit the "
                         f"rebuilt layer ({dense.num_heads} heads of {hd})")
    return PrunedShiftedWindowAttention(
        sizes["dim"], dense.window_size, dense.shift_size, sizes["num_heads"], sizes["head_dim"],
        out_dim=sizes["out_dim"], qkv_bias=dense.qkv.bias is not None,
        proj_bias=dense.proj.bias is not None, attention_dropout=dense.attention_dropout,
        dropout=dense.dropout, dtype=dense.qkv.weight.dtype)


def _maxvit_sizes(m: nn.Module) -> dict:
    return {"feat_dim": m.to_qkv.in_features, "n_heads": m.n_heads, "head_dim": m.head_dim,
            "out_dim": m.merge.out_features}


def _maxvit_build(dense: nn.Module, sizes: dict) -> nn.Module:
    from .torchvision_support import PrunedRelativePositionalMultiHeadAttention

    if sizes["head_dim"] != dense.head_dim or not 0 < sizes["n_heads"] <= dense.n_heads:
        raise ValueError(f"{sizes['n_heads']} heads of {sizes['head_dim']} do not fit the "
                         f"rebuilt layer ({dense.n_heads} heads of {dense.head_dim})")
    return PrunedRelativePositionalMultiHeadAttention(
        sizes["feat_dim"], sizes["n_heads"], sizes["head_dim"], dense.max_seq_len,
        dense.scale_factor, out_dim=sizes["out_dim"], dtype=dense.to_qkv.weight.dtype)


def _pvt_sizes(m: nn.Module) -> dict:
    from .timm_support import pvt_swap_sizes

    return pvt_swap_sizes(m)


def _pvt_build(dense: nn.Module, sizes: dict) -> nn.Module:
    from .timm_support import pvt_swap_build

    return pvt_swap_build(dense, sizes)


#: layers whose pruned form is another class (the dense class cannot hold the pruned sizes):
#: pruned class -> (the dense class it replaces, its sizes as JSON, builder from the dense layer
#: at the same path and those sizes). Only these swaps are ever made on loading.
_SWAPS: dict[str, tuple[str, Callable[[nn.Module], dict],
                        Callable[[nn.Module, dict], nn.Module]]] = {
    "s2h.torch_attention.PrunedMultiheadAttention": (
        "torch.nn.modules.activation.MultiheadAttention", _mha_sizes, _mha_build),
    "s2h.torchvision_support.PrunedShiftedWindowAttention": (
        "torchvision.models.swin_transformer.ShiftedWindowAttention", _swin_sizes, _swin_build),
    "s2h.torchvision_support.PrunedRelativePositionalMultiHeadAttention": (
        "torchvision.models.maxvit.RelativePositionalMultiHeadAttention", _maxvit_sizes,
        _maxvit_build),
    "s2h.timm_support.PrunedPvtAttention": (
        "timm.models.pvt_v2.Attention", _pvt_sizes, _pvt_build),
}
#: the keys of each swap's sizes: source_heads a list of ints, every other an int
_SWAP_KEYS = {
    "s2h.torch_attention.PrunedMultiheadAttention": (
        "embed_dim", "num_heads", "head_dim", "out_dim", "source_heads", "source_num_heads"),
    "s2h.torchvision_support.PrunedShiftedWindowAttention": (
        "dim", "num_heads", "head_dim", "out_dim"),
    "s2h.torchvision_support.PrunedRelativePositionalMultiHeadAttention": (
        "feat_dim", "n_heads", "head_dim", "out_dim"),
    "s2h.timm_support.PrunedPvtAttention": ("dim", "num_heads", "head_dim", "sr_dim", "out_dim"),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def routed_swap(block: nn.Module, routed: type, split: int | None, order: torch.Tensor) -> None:
    """Turn ``block`` into ``routed`` (its :class:`s2h.registry.Router` subclass) in place, with
    the routing of its kept channels: ``s2h_split`` and the non-persistent ``s2h_order``."""
    block.__class__ = routed
    block.s2h_split = split
    p = next(iter(block.parameters()), None)
    dev = p.device if p is not None else order.device
    block.register_buffer("s2h_order", order.detach().to(dev, torch.long).clone(),
                          persistent=False)


def _routed_classes() -> dict:
    """Qualified name of each routed class -> its :class:`s2h.registry.Router`."""
    from . import registry as _registry

    _registry._load_builtin()
    return {_qualname(r.routed): r for r in _registry._ROUTERS.values()}


def _apply_routed(model: nn.Module, routed: dict) -> None:
    """architecture.json's routed blocks (a channel shuffle routed by index): each the dense
    block at that path turned into its routed class with the saved split and order."""
    if not isinstance(routed, dict):
        raise ValueError("architecture.json: routed must be an object")
    known = _routed_classes()
    for name, spec in routed.items():
        if not isinstance(spec, dict) or spec.get("type") not in known:
            raise ValueError(f"architecture.json routes {name!r} through a class that is not "
                             f"allowed: {spec!r}"[:300])
        router = known[spec["type"]]
        try:
            block = model.get_submodule(name)
        except AttributeError:
            block = None
        if block is None or type(block) is not router.plain \
                or spec.get("from") != _qualname(router.plain):
            raise ValueError(f"architecture.json names a {_qualname(router.plain)} at {name!r}, "
                             "which the rebuilt model does not have (another model version?)")
        split, order = spec.get("split"), spec.get("order")
        if split is not None and (isinstance(split, bool) or not isinstance(split, int)
                                  or split < 0):
            raise ValueError(f"architecture.json: bad split {split!r} of {name!r}")
        if not isinstance(order, list) or sorted(order) != list(range(len(order))) \
                or any(isinstance(v, bool) for v in order) or not order:
            raise ValueError(f"architecture.json: the order of {name!r} is not a permutation")
        if split is not None and split > len(order):
            raise ValueError(f"architecture.json: split {split} of {name!r} exceeds its width")
        routed_swap(block, router.routed, split, torch.tensor(order, dtype=torch.long))


def _int_value(v):
    """A size attribute as JSON: an int or a list of ints (anything else is refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list)):
        raise TypeError(f"size attribute {v!r} is not an int or a tuple of ints")
    if isinstance(v, int):
        return v
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise TypeError(f"size attribute {v!r} is not a tuple of ints")
    return list(v)


def _resize_tensors(module: nn.Module, prefix: str, shapes: dict) -> None:
    """Give ``module``'s own parameters and buffers the saved shapes (``name -> shape``)."""
    for store in (module._parameters, module._buffers):
        for k, t in list(store.items()):
            saved = shapes.get(prefix + k)
            if t is None or saved is None or tuple(saved) == tuple(t.shape):
                continue
            new = torch.empty(tuple(saved), dtype=t.dtype, device=t.device)
            store[k] = (nn.Parameter(new, requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter) else new)


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"cannot describe value {v!r}")


def describe_layer(m: nn.Module) -> dict:
    """``{"type": ..., "args": {...}}`` for an allow-listed leaf layer."""
    cls = type(m)
    if cls not in _LEAF_ARGS:
        raise TypeError(f"{cls.__name__} is not an allow-listed layer")
    args = {}
    for a in _LEAF_ARGS[cls]:
        if a == "bias":
            args[a] = getattr(m, "bias", None) is not None
        elif a == "approximate":
            args[a] = m.approximate
        else:
            args[a] = _jsonable(getattr(m, a))
    return {"type": cls.__name__, "args": args}


def build_layer(spec: dict) -> nn.Module:
    cls = _TYPES.get(spec.get("type"))
    if cls is None or cls not in _LEAF_ARGS:
        raise ValueError(f"architecture.json names a layer type that is not allowed: "
                         f"{spec.get('type')!r}")
    allowed = set(_LEAF_ARGS[cls])
    args = spec.get("args", {})
    if set(args) - allowed:
        raise ValueError(f"unexpected arguments for {cls.__name__}: {sorted(set(args) - allowed)}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return cls(**args)


def describe_structure(m: nn.Module) -> dict | None:
    """A full JSON description if ``m`` is made only of allow-listed layers and containers."""
    cls = type(m)
    if cls in _CONTAINERS:
        children = []
        for name, child in m.named_children():
            d = describe_structure(child)
            if d is None:
                return None
            children.append([name, d])
        return {"type": _CONTAINERS[cls], "children": children}
    if cls in _LEAF_ARGS:
        return describe_layer(m)
    return None


def build_structure(spec: dict) -> nn.Module:
    t = spec.get("type")
    if t in ("Sequential", "ModuleList"):
        cls = nn.Sequential if t == "Sequential" else nn.ModuleList
        mod = cls()
        for name, child in spec.get("children", []):
            if not isinstance(name, str) or "." in name or not name:
                raise ValueError(f"bad child name {name!r} in architecture.json")
            mod.add_module(name, build_structure(child))
        return mod
    return build_layer(spec)


def detect_builder(model: nn.Module, example_inputs: tuple = ()) -> dict | None:
    """How to rebuild ``model``'s dense architecture, or None if unknown."""
    b = getattr(model, "s2h_builder", None)
    if isinstance(b, dict):
        return b
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture") and type(model).__module__.startswith(
        "timm."
    ):
        kwargs = {}
        if hasattr(model, "num_classes"):
            kwargs["num_classes"] = int(model.num_classes)
        x = example_inputs[0] if example_inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            kwargs["in_chans"] = int(x.shape[1])
        kwargs.update(_timm_size_kwargs(model))
        return {"kind": "timm", "name": cfg["architecture"], "kwargs": kwargs}
    if type(model).__module__.startswith("torchvision.models."):
        b = _detect_torchvision(model, example_inputs)
        if b is not None:
            return b
    s = describe_structure(model)
    if s is not None:
        return {"kind": "structure", "tree": s}
    return None


def _timm_size_kwargs(model: nn.Module) -> dict:
    """Constructor arguments that shape a timm model's parameters besides the layer widths:
    the image size of a patch embedding (ViT position embedding, Swin attention masks) and
    Swin's window size."""
    kwargs = {}
    pe = getattr(model, "patch_embed", None)
    if pe is None:  # MLP-Mixer / ResMLP call theirs `stem`
        pe = getattr(model, "stem", None)
    img = getattr(pe, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
        kwargs["img_size"] = int(img[0]) if img[0] == img[1] else [int(v) for v in img]
    if type(model).__name__ == "SwinTransformer":
        # the first stage's window: later stages clamp it to their resolution themselves
        ws = next((m.window_size for m in model.modules()
                   if type(m).__name__.endswith("WindowAttention")), None)
        if isinstance(ws, tuple) and len(ws) == 2:
            kwargs["window_size"] = int(ws[0]) if ws[0] == ws[1] else [int(v) for v in ws]
    return kwargs


def _torchvision_names() -> list[str]:
    """torchvision's classification model builders (``torchvision.models.<name>``; detection,
    segmentation, video, quantized and optical-flow builders are not among them)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_kwargs(model: nn.Module, example_inputs: tuple) -> dict:
    """Constructor arguments of a torchvision model that its builders do not fix and that its
    tree does not show through tensor shapes alone."""
    name, kwargs = type(model).__name__, {}
    if name == "VisionTransformer":
        kwargs["image_size"] = int(model.image_size)
    elif name in ("GoogLeNet", "Inception3"):
        kwargs.update(aux_logits=bool(model.aux_logits),
                      transform_input=bool(model.transform_input), init_weights=True)
    elif name == "MaxVit":
        x = example_inputs[0] if example_inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            kwargs["input_size"] = [int(x.shape[-2]), int(x.shape[-1])]
    return kwargs


def _plain_attrs(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k != "training"
            and isinstance(v, (bool, int, float, str, tuple, list, type(None)))}


class _Signature:
    """What :func:`_mismatch` compares of a candidate architecture: its class, each module's
    class and plain attributes by path, each tensor's shape by name (kept instead of the
    module, so that a cached candidate holds no weights)."""

    def __init__(self, cand: nn.Module) -> None:
        self.type = type(cand)
        self.modules = {n: (type(c), _plain_attrs(c)) for n, c in cand.named_modules()}
        self.shapes = {k: tuple(t.shape) for k, t in cand.state_dict().items()}


def _mismatch(model: nn.Module, cand: _Signature) -> list[str] | None:
    """None if ``cand`` (a candidate's signature) has ``model``'s tree: the same module paths,
    each of ``model``'s modules an instance of ``cand``'s class there with the same plain
    attributes, and ``cand``'s tensors in ``model`` with the same shapes (``model`` may hold
    more: s2h's hard-path BatchNorm statistics). Otherwise the tensor names whose shape differs
    (empty when something else differs)."""
    mods = dict(model.named_modules())
    if set(mods) != set(cand.modules):
        return []
    if any(not isinstance(mods[n], t) for n, (t, _) in cand.modules.items()):
        return []
    state = model.state_dict()
    wrong = []
    for k, shape in cand.shapes.items():
        if k not in state:
            return []
        if tuple(state[k].shape) != shape:
            wrong.append(k)
    if wrong:
        return wrong
    for n, (_, attrs) in cand.modules.items():
        own = vars(mods[n])
        if any(k not in own or own[k] != v for k, v in attrs.items()):
            return []
    return None


_CANDIDATES: dict[tuple, _Signature | None] = {}


def _torchvision_candidate(name: str, kwargs: dict, numel: int) -> _Signature | None:
    """The signature of torchvision's ``name`` with ``kwargs``, remembered for the process
    (each detection would otherwise build every builder of the model's module again: 0.4-1.3 s
    per pruner of a torchvision model)."""
    key = (name, json.dumps(kwargs, sort_keys=True), numel)
    if key not in _CANDIDATES:
        cand = _build_candidate(name, kwargs, numel)
        _CANDIDATES[key] = None if cand is None else _Signature(cand)
    return _CANDIDATES[key]


def _build_candidate(name: str, kwargs: dict, numel: int) -> nn.Module | None:
    """torchvision's ``name`` built on the meta device, or for real (on the CPU) when its
    builder computes with tensors (RegNet's widths) and its published parameter count is
    within twice ``numel`` (no large model is built to be compared and thrown away)."""
    builder = {"kind": "torchvision", "name": name, "kwargs": kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return _build_from(builder)
        except Exception:
            pass
        try:
            import torchvision

            weights = list(torchvision.models.get_model_weights(name))
            n = int(weights[0].meta["num_params"])
        except Exception:
            return None
        if n > 2 * numel:
            return None
        try:
            with torch.device("cpu"):
                return _build_from(builder)
        except Exception:
            return None


def _detect_torchvision(model: nn.Module, example_inputs: tuple) -> dict | None:
    """The torchvision builder that rebuilds ``model`` exactly (see the module docstring)."""
    try:
        import torchvision

        names = [n for n in _torchvision_names()
                 if torchvision.models.get_model_builder(n).__module__ == type(model).__module__]
    except Exception:
        return None
    base = _torchvision_kwargs(model, example_inputs)
    state = model.state_dict()
    numel = sum(t.numel() for t in state.values())
    for name in names:
        kwargs = dict(base)
        for _ in range(2):  # the second time with the model's number of classes
            cand = _torchvision_candidate(name, kwargs, numel)
            if cand is None:
                break
            if cand.type is not type(model):
                break
            wrong = _mismatch(model, cand)
            if wrong is None:
                return {"kind": "torchvision", "name": name, "kwargs": kwargs}
            # only the classifier's rows differ: the number of classes
            rows = {state[k].shape[0] for k in wrong}
            if not wrong or "num_classes" in kwargs or len(rows) != 1 or any(
                    tuple(state[k].shape[1:]) != cand.shapes[k][1:] for k in wrong):
                break
            kwargs["num_classes"] = int(rows.pop())
    return None


def _build_from(builder: dict) -> nn.Module:
    kind = builder.get("kind")
    kwargs = builder.get("kwargs", {}) or {}
    for k, v in kwargs.items():
        if not isinstance(v, (bool, int, float, str, list)) and v is not None:
            raise ValueError(f"builder argument {k!r} is not a plain value")
    if kind == "s2h.models":
        from . import models

        return models.create_model(builder["name"], **kwargs)
    if kind == "timm":
        import timm

        return timm.create_model(builder["name"], pretrained=False, **kwargs)
    if kind == "torchvision":
        import torchvision

        name = builder.get("name")
        if not isinstance(name, str) or name not in _torchvision_names():
            raise ValueError(f"architecture.json names {name!r}, which is not one of "
                             "torchvision's classification models")
        if set(kwargs) & {"weights", "progress", "weights_backbone"}:
            raise ValueError("a torchvision builder in architecture.json may not name weights")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if kind == "structure":
        return build_structure(builder["tree"])
    raise ValueError(f"unknown builder kind {kind!r} in architecture.json")


def _resize_tensors_one(owner: nn.Module, attr: str, saved: tuple) -> None:
    p = owner._parameters[attr]
    if tuple(p.shape) != tuple(saved):
        owner._parameters[attr] = nn.Parameter(
            torch.empty(tuple(saved), dtype=p.dtype, device=p.device),
            requires_grad=p.requires_grad)


def save_exported(model: nn.Module, directory: str, builder: dict | None = None) -> str:
    """Save an exported model as safetensors weights + ``architecture.json``. Returns the dir.

    ``builder`` overrides the detected way to rebuild the dense architecture
    (``{"kind": "s2h.models"|"timm", "name": ..., "kwargs": {...}}``). Models of other classes
    can be saved with ``builder={"kind": "custom", "name": "<anything>"}`` and loaded with
    ``load_exported(dir, model_fn=...)``.
    """
    from safetensors.torch import save as safetensors_bytes

    builder = builder or detect_builder(model)
    if builder is None:
        raise ValueError(
            f"don't know how to rebuild {type(model).__name__}: pass builder={{'kind': 'custom', "
            "'name': ...}} and load with load_exported(dir, model_fn=<function returning the "
            "dense model>)"
        )
    layers, resized, swapped, in_layers = {}, {}, {}, set()
    routers, routed = _routed_classes(), {}
    for name, m in model.named_modules():  # a channel shuffle routed by index
        router = routers.get(_qualname(type(m)))
        if router is not None:
            routed[name] = {"type": _qualname(type(m)), "from": _qualname(router.plain),
                            "split": m.s2h_split,
                            "order": [int(v) for v in m.s2h_order.tolist()]}
    inside: tuple[str, ...] = ()  # prefixes of swapped layers: their sublayers come with them
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            in_layers.add(name)
            continue
        qn = _qualname(type(m))
        if qn in _SWAPS:
            sizes = _SWAPS[qn][1](m)
            swapped[name] = {"type": qn, "from": _SWAPS[qn][0],
                             "sizes": {k: _int_value(sizes[k]) for k in _SWAP_KEYS[qn]}}
            in_layers.add(name)
            inside = (*inside, f"{name}.")
        elif type(m) in _RESIZABLE:
            layers[name] = describe_layer(m)
            in_layers.add(name)
        elif qn in _RESIZED_ATTRS:
            resized[name] = {"type": qn,
                             "attrs": {a: _int_value(getattr(m, a)) for a in _RESIZED_ATTRS[qn]}}
            in_layers.add(name)
    # parameters outside the layers (layer-scale gamma, a class token, a position embedding):
    # their shapes may change; loading gives them the file's shapes (same number of dims)
    channel_params = []
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner not in in_layers and any(s > 1 for s in p.shape):
            channel_params.append(name)
    # blocks removed by depth pruning (STP) are nn.Identity: the rebuilt model drops them too
    identities = [name for name, m in model.named_modules() if type(m) is nn.Identity and name]
    # split sizes held in module attributes (``self.width`` of ``split(x, self.width)``),
    # set to the kept widths by the export (:attr:`S2HPruner.export`)
    split_sizes = {name: {a: _int_value(v) for a, v in attrs.items()}
                   for name, attrs in getattr(model, "s2h_split_sizes", {}).items()}
    arch = {"format": FORMAT, "version": VERSION, "builder": builder, "layers": layers,
            "resized": resized, "swapped": swapped, "channel_params": channel_params,
            "identities": identities, "split_sizes": split_sizes, "routed": routed,
            "torch": torch.__version__}
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    tag = f"{os.getpid()}.{os.urandom(4).hex()}.tmp"  # unique: concurrent writers never share
    tmp_w = os.path.join(directory, f"model.safetensors.{tag}")
    tmp_a = os.path.join(directory, f"architecture.json.{tag}")
    # safetensors' save_file creates its file with mode 0600; written here like any other
    # file (0666 less the umask: 0644 usually), so a saved model is readable by others
    with open(tmp_w, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata={"format": FORMAT}))
    with open(tmp_a, "w") as f:
        json.dump(arch, f, indent=1)
    os.replace(tmp_w, os.path.join(directory, "model.safetensors"))
    os.replace(tmp_a, os.path.join(directory, "architecture.json"))
    return directory


#: safetensors dtype names of floating-point tensors
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
#: the dense model built before the pruned layers replace its own may hold at most this many
#: elements beyond 100x the saved ones (a small file cannot make the loader allocate gigabytes)
_DENSE_SLACK = 20_000_000


def _read_header(w_path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    try:
        with safe_open(w_path, "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise ValueError(f"{w_path} is not a readable safetensors file: {exc}") from exc


def _set_all(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule ``name`` (and every other name of the same module object) to ``new``."""
    old = model.get_submodule(name)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for n in names:
        parent_name, _, attr = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)


def _assemble(arch: dict, model: nn.Module, shapes: dict) -> nn.Module:
    """Apply architecture.json's identities, pruned layers and resized tensors to the dense
    ``model``; new layers are built on the meta device (no memory), tensors that change shape
    take the shapes of the header (``shapes``), on the device of the tensor they replace."""
    identities = arch.get("identities", [])
    layers = arch.get("layers", {})
    resized = arch.get("resized", {})
    channel_params = arch.get("channel_params", [])
    if not isinstance(identities, list) or not isinstance(layers, dict) \
            or not isinstance(resized, dict) or not isinstance(channel_params, list):
        raise ValueError("architecture.json: identities / channel_params must be lists, layers "
                         "/ resized objects")
    for name in identities:
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad module name {name!r} in architecture.json")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, attr):
            raise ValueError(f"architecture.json names module {name!r}, which the rebuilt model "
                             "does not have (another model version?)")
        setattr(parent, attr, nn.Identity())
    swapped = arch.get("swapped", {})
    if not isinstance(swapped, dict):
        raise ValueError("architecture.json: swapped must be an object")
    for name, spec in swapped.items():
        _swap(model, name, spec)
    _apply_routed(model, arch.get("routed", {}))
    for name, spec in layers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("args", {}), dict):
            raise ValueError(f"architecture.json: layer {name!r} is not an object with 'args'")
        with torch.device("meta"):
            new = build_layer(spec)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not name or not hasattr(parent, attr):
            raise ValueError(f"architecture.json names layer {name!r}, which the rebuilt model "
                             "does not have (another model version?)")
        _set_all(model, name, new)
    for name, spec in resized.items():
        if not isinstance(spec, dict):
            raise ValueError(f"architecture.json: resized layer {name!r} is not an object")
        qn = spec.get("type")
        if qn not in _RESIZED_ATTRS:
            raise ValueError(f"architecture.json resizes a layer type that is not allowed: {qn!r}")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or _qualname(type(mod)) != qn:
            raise ValueError(f"architecture.json names a {qn} at {name!r}, which the rebuilt "
                             "model does not have (another model version?)")
        attrs = spec.get("attrs", {})
        if not isinstance(attrs, dict) or set(attrs) - set(_RESIZED_ATTRS[qn]):
            raise ValueError(f"unexpected attributes for {qn}: {attrs!r}")
        for a, v in attrs.items():
            v = _int_value(v)
            setattr(mod, a, tuple(v) if isinstance(v, list) else v)
        _resize_tensors(mod, f"{name}." if name else "", shapes)
    split_sizes = arch.get("split_sizes", {})
    if not isinstance(split_sizes, dict):
        raise ValueError("architecture.json: split_sizes must be an object")
    for name, attrs in split_sizes.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or not isinstance(attrs, dict):
            raise ValueError(f"architecture.json sets split sizes of {name!r}, which the rebuilt "
                             "model does not have (another model version?)")
        for a, v in attrs.items():
            old = mod.__dict__.get(a)
            v = _int_value(v)
            if isinstance(old, bool) or type(old) not in (int, list, tuple) \
                    or isinstance(old, int) != isinstance(v, int):
                raise ValueError(f"architecture.json sets {name}.{a} = {v!r}, but the rebuilt "
                                 f"model's value is {old!r}")
            mod.__dict__[a] = v if isinstance(v, int) else type(old)(v)
    if split_sizes:
        model.s2h_split_sizes = split_sizes
    for pname in channel_params:
        if not isinstance(pname, str):
            raise ValueError(f"bad parameter name {pname!r} in architecture.json")
        owner_name, _, attr = pname.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue
        p = owner._parameters.get(attr)
        saved = shapes.get(pname)
        if p is not None and saved is not None and len(saved) == p.dim():
            _resize_tensors_one(owner, attr, saved)
    return model


def _swap(model: nn.Module, name: str, spec: dict) -> None:
    """Replace the dense layer at ``name`` by its pruned class (allow-listed in :data:`_SWAPS`),
    built on the meta device from that layer and the recorded sizes."""
    if not isinstance(spec, dict):
        raise ValueError(f"architecture.json: swapped layer {name!r} is not an object")
    qn = spec.get("type")
    if qn not in _SWAPS:
        raise ValueError(f"architecture.json swaps in a layer type that is not allowed: {qn!r}")
    dense_qn, _, build = _SWAPS[qn]
    if spec.get("from") != dense_qn:
        raise ValueError(f"architecture.json: {qn} replaces a {dense_qn}, not "
                         f"{spec.get('from')!r}")
    try:
        dense = model.get_submodule(name) if name else None
    except AttributeError:
        dense = None
    if dense is None or _qualname(type(dense)) != dense_qn:
        raise ValueError(f"architecture.json names a {dense_qn} at {name!r}, which the rebuilt "
                         "model does not have (another model version?)")
    sizes = spec.get("sizes")
    if not isinstance(sizes, dict) or set(sizes) != set(_SWAP_KEYS[qn]):
        raise ValueError(f"architecture.json: the sizes of {qn} at {name!r} must be "
                         f"{list(_SWAP_KEYS[qn])}, not {sizes!r}")
    sizes = {k: _int_value(v) for k, v in sizes.items()}
    for k, v in sizes.items():
        if (k == "source_heads") != isinstance(v, list) or any(
                x < (0 if k == "source_heads" else 1) for x in (v if isinstance(v, list) else [v])):
            raise ValueError(f"architecture.json: bad {k}={v!r} for {qn} at {name!r}")
    with torch.device("meta"):
        new = build(dense, sizes)
    _set_all(model, name, new.train(dense.training))


def _check_against_header(model: nn.Module, header: dict, w_path: str) -> None:
    """Every tensor the model expects is in the file with that shape and a compatible dtype
    (floating point where the model has floating point), and nothing else is."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise ValueError(f"{w_path} does not match architecture.json: missing tensors "
                         f"{missing[:5]}, unexpected tensors {extra[:5]}")
    for k, t in expected.items():
        shape, dtype = header[k]
        if tuple(shape) != tuple(t.shape):
            raise ValueError(f"{w_path}: tensor {k!r} has shape {tuple(shape)} but "
                             f"architecture.json describes {tuple(t.shape)}")
        if t.is_floating_point() != (dtype in _FLOAT_DTYPES):
            raise ValueError(f"{w_path}: tensor {k!r} is {dtype}, the model's is {t.dtype} "
                             "(a floating-point tensor must be saved as floating point and "
                             "the other way round)")


def load_exported(directory: str, model_fn: Callable[[], nn.Module] | None = None,
                  device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_exported` (no pickle; see the module docstring).

    Nothing is allocated before every size of ``architecture.json`` has been checked against
    the tensor shapes in the safetensors header: the model is first assembled on the meta
    device and compared with the header, then built and loaded."""
    from safetensors.torch import load_file

    arch_path = os.path.join(directory, "architecture.json")
    w_path = os.path.join(directory, "model.safetensors")
    for p in (arch_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: not a directory written by s2h.save_exported")
    with open(arch_path) as f:
        try:
            arch = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{arch_path} is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise ValueError(f"{arch_path} is nested too deeply to be an s2h export") from exc
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        fmt = arch.get("format") if isinstance(arch, dict) else type(arch).__name__
        raise ValueError(f"{arch_path} is not an s2h export (format={fmt!r})")
    builder = arch.get("builder")
    if not isinstance(builder, dict) or (model_fn is None and not builder.get("kind")):
        raise ValueError(f"{arch_path} has no valid 'builder' (how to rebuild the model): "
                         f"{builder!r}")
    header = _read_header(w_path)
    shapes = {k: v[0] for k, v in header.items()}
    saved_numel = sum(math.prod(s) for s in shapes.values())

    def dense() -> nn.Module:
        return model_fn() if model_fn is not None else _build_from(builder)

    try:
        # 1. on the meta device: every size checked against the header, nothing allocated
        try:
            with torch.device("meta"):
                meta = dense()
        except (ValueError, TypeError, KeyError, RecursionError):
            raise
        except Exception:  # a builder that cannot run on meta: checked after a real build
            meta = None
        if meta is not None:
            n_dense = sum(t.numel() for t in meta.state_dict().values())
            if n_dense > 100 * saved_numel + _DENSE_SLACK:
                raise ValueError(f"{arch_path}: the dense model it describes has {n_dense} "
                                 f"elements for {saved_numel} saved ones: refusing to build it")
            _check_against_header(_assemble(arch, meta, shapes), header, w_path)
        # 2. for real: the dense model (on meta when fully described by the file), the pruned
        # layers on meta, then every tensor assigned from the file
        if builder.get("kind") == "structure" and model_fn is None:
            with torch.device("meta"):
                model = dense()
        else:
            model = dense()
        model = _assemble(arch, model, shapes)
        _check_against_header(model, header, w_path)
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        raise ValueError(f"{arch_path} is malformed: {type(exc).__name__}: {exc}") from exc
    state = load_file(w_path, device=str(device))
    current = model.state_dict(keep_vars=True)
    state = {k: v.to(current[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"{arch_path}: tensors {left[:5]} are not in the file (not persistent?)")
    if builder.get("kind") != "custom":
        model.s2h_builder = builder
    return model.to(device).eval()
