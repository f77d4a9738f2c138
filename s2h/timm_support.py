"""Masked versions of timm's layer classes, and how to export them as smaller timm layers.

Imported by :mod:`s2h.registry` only once timm itself is imported. Each supported class gets a
masked subclass (switched in place by ``__class__``, like the torch layers of :mod:`s2h.nn`)
with the soft / hard paths of METHOD §3, and an ``s2h_export(in_keep, out_keep, extra)`` that
returns a *plain instance of the same timm class* with the kept channels only, so an exported
model is made of timm's own modules and needs no s2h code to run.

* ``BatchNormAct2d``: BatchNorm then ``drop`` then ``act``; supported when both are elementwise
  (the activation of a kept channel does not depend on the other channels).
* ``timm.layers.Linear``, ``timm.layers.LayerNorm`` (channels last), ``LayerNorm2d`` (NCHW).
* ``GroupNormAct`` (BiT ResNet-V2): group norm then ``drop`` then ``act`` (elementwise), pruned
  in whole norm groups (:class:`s2h.nn.MaskedGroupNorm`).
* ``Attention`` (ViT & co.) and ``WindowAttention`` (Swin): pruned by whole heads. The layer owns
  a *heads group* of ``num_heads * head_dim`` channels (the rows of q, k and v of each head and
  the matching input columns of ``proj``) whose width granularity is ``head_dim``: ``head_dim``
  and hence the attention scale never change; ``num_heads`` does. Swin's relative-position bias
  table is sliced with the heads.
* PVT v2's ``Attention`` (``timm.models.pvt_v2``): q from the tokens, k and v from tokens
  reduced by a strided conv ``sr`` + ``norm`` (or pool + 1x1 conv + norm + GELU), by whole
  heads like ViT's, with a fourth group: ``sr``'s output channels (``norm``'s, ``kv``'s input).
  timm's forward reshapes with the *input's* width, so a pruned layer whose input, heads and
  ``sr`` widths differ exports to :class:`PrunedPvtAttention` (timm's class, with a forward that
  reads the widths off its weights); timm's own class where none of them changed.
* The conv variants ``Conv2dSame`` (TF "SAME" padding computed from the input size, then a
  conv), ``StdConv2d`` / ``StdConv2dSame`` (BiT ResNet-V2: each output channel's weight row
  standardised over its ``C_in * kh * kw`` entries, then a conv) and ``ScaledStdConv2d`` /
  ``ScaledStdConv2dSame`` (NFNet: the same, times ``gain * scale``): pruned like ``nn.Conv2d``
  by what they compute (:class:`_MaskedTimmConv`). A weight-standardised conv with fewer input
  channels standardises its rows over the kept columns only, so the hard network does exactly
  that (it *is* the exported layer, a plain instance of the same class with the kept channels;
  ``scale`` keeps its value), and the soft network standardises with every column weighted by
  its input channel's soft mask: at a 0/1 mask it equals the hard network, at full width the
  dense layer (see :func:`standardised`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import (
    BatchNormAct2d,
    Conv2dSame,
    GroupNorm1,
    GroupNormAct,
    LayerNorm,
    LayerNorm2d,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers import Linear as TimmLinear
from timm.layers.attention import Attention
from timm.layers.padding import pad_same
from torch import nn

from . import registry as _registry
from .nn import (
    MaskedBatchNorm2d,
    MaskedConv2d,
    MaskedGroupNorm,
    MaskedLayer,
    MaskedLayerNorm,
    MaskedLinear,
    _channel_view,
    _conv_info,
    _groupnorm_info,
    gather_kept,
    gather_kept_weight,
    gather_qkv_out,
)
from .registry import LayerHandler, LayerInfo
from .torch_attention import _head_rows, _whole_heads

try:
    from timm.models.swin_transformer import WindowAttention
except Exception:  # pragma: no cover - older/newer timm layout
    WindowAttention = None
try:
    from timm.layers import use_fused_attn
    from timm.models.pvt_v2 import Attention as PvtAttention
except Exception:  # pragma: no cover - older/newer timm layout
    PvtAttention = None

# ---------------------------------------------------------------------------- helpers

#: activation / dropout modules that act on each element independently (checked by exact type)
_ELEMENTWISE = {
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh,
    nn.Dropout,
}
try:
    from timm.layers import activations as _acts

    _ELEMENTWISE |= {getattr(_acts, n) for n in (
        "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU",
        "GELUTanh", "QuickGELU") if hasattr(_acts, n)}
    from timm.layers import activations_me as _acts_me

    _ELEMENTWISE |= {getattr(_acts_me, n) for n in (
        "SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe") if hasattr(_acts_me, n)}
except Exception:  # pragma: no cover
    pass


def _elementwise(m: nn.Module) -> bool:
    return type(m) in _ELEMENTWISE and not any(True for _ in m.parameters())


def _set_param(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(value.detach().clone(),
                                            requires_grad=old.requires_grad)


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module._buffers[name] = value.detach().clone()


def _sel(t: torch.Tensor | None, keep: torch.Tensor | None, dim: int = 0):
    if t is None or keep is None:
        return t
    return t.index_select(dim, keep.to(t.device))


def _plain_copy(m: nn.Module, cls: type) -> nn.Module:
    new = copy.deepcopy(m)  # a masked layer drops its gates when copied
    new.__class__ = cls
    return new


def _sliced_linear(lin: nn.Linear, out_keep, in_keep) -> nn.Linear:
    """A plain ``nn.Linear`` equal to ``lin`` restricted to rows ``out_keep``, cols ``in_keep``."""
    w = _sel(_sel(lin.weight, out_keep, 0), in_keep, 1)
    new = nn.Linear(w.shape[1], w.shape[0], lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(_sel(lin.bias, out_keep))
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new.train(lin.training)


# ---------------------------------------------------------------------------- norms / linear


class MaskedBatchNormAct2d(MaskedBatchNorm2d, BatchNormAct2d):
    """timm ``BatchNormAct2d`` (BN, then ``drop``, then ``act``) on the kept channels in hard mode.

    Input / output ``(N, C, H, W)`` (soft, dense) or ``(N, k, H, W)`` (hard).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        if keep is None:
            return BatchNormAct2d.forward(self, x)
        return self.act(self.drop(self._hard_bn(x, keep)))

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        new = _plain_copy(self, BatchNormAct2d)
        keep = out_keep
        use_hard = keep is not None and hasattr(self, "hard_running_mean")
        for b in ("hard_running_mean", "hard_running_var", "hard_num_batches_tracked"):
            new._buffers.pop(b, None)
        if keep is None:
            return new
        new.num_features = keep.numel()
        _set_param(new, "weight", _sel(self.weight, keep))
        _set_param(new, "bias", _sel(self.bias, keep))
        if self.track_running_stats:
            _set_buffer(new, "running_mean",
                        _sel(self.hard_running_mean if use_hard else self.running_mean, keep))
            _set_buffer(new, "running_var",
                        _sel(self.hard_running_var if use_hard else self.running_var, keep))
            _set_buffer(new, "num_batches_tracked",
                        self.hard_num_batches_tracked if use_hard else self.num_batches_tracked)
        return new


class MaskedGroupNormAct(MaskedGroupNorm, GroupNormAct):
    """timm ``GroupNormAct`` (group norm, then ``drop`` then ``act``): the kept norm groups in
    hard mode (see :class:`s2h.nn.MaskedGroupNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        if keep is None:
            return GroupNormAct.forward(self, x)
        return self.act(self.drop(self._hard_gn(x, keep)))

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        return _group_norm_export(self, GroupNormAct, out_keep)


def _group_norm_export(m: MaskedGroupNorm, cls: type, out_keep: torch.Tensor | None
                       ) -> nn.Module:
    """A plain ``cls`` (a timm group norm) of ``m``'s kept channels."""
    new = _plain_copy(m, cls)
    new.num_groups, new.num_channels = m._export_sizes(out_keep)
    _set_param(new, "weight", _sel(m.weight, out_keep))
    _set_param(new, "bias", _sel(m.bias, out_keep))
    return new


class MaskedGroupNorm1(MaskedGroupNorm, GroupNorm1):
    """timm ``GroupNorm1`` (a group norm of one group, MobileViT v2): over the kept channels in
    hard mode (see :class:`s2h.nn.MaskedGroupNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        return GroupNorm1.forward(self, x) if keep is None else self._hard_gn(x, keep)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        return _group_norm_export(self, GroupNorm1, out_keep)


class MaskedTimmLinear(MaskedLinear, TimmLinear):
    """timm ``Linear`` (``F.linear`` with the AMP cast workaround) with masked input features."""

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        new = _plain_copy(self, TimmLinear)
        w = _sel(_sel(self.weight, out_keep, 0), in_keep, 1)
        _set_param(new, "weight", w)
        _set_param(new, "bias", _sel(self.bias, out_keep))
        new.out_features, new.in_features = w.shape
        return new


class _MaskedLNExport:
    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        new = _plain_copy(self, _registry.plain_class(type(self)))
        if out_keep is not None:
            new.normalized_shape = (out_keep.numel(),)
            _set_param(new, "weight", _sel(self.weight, out_keep))
            _set_param(new, "bias", _sel(self.bias, out_keep))
        return new


class MaskedTimmLayerNorm(_MaskedLNExport, MaskedLayerNorm, LayerNorm):
    """timm ``LayerNorm`` over the last dim; hard mode normalises over the kept channels."""


class MaskedLayerNorm2d(_MaskedLNExport, MaskedLayerNorm, LayerNorm2d):
    """timm ``LayerNorm2d``: layer norm over the channels of ``(N, C, H, W)`` (dim 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        if keep is None:
            return LayerNorm2d.forward(self, x)
        return self._hard_ln(x.permute(0, 2, 3, 1), keep).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- attention


def attention_dims(m: nn.Module) -> tuple[int, int, int, int]:
    """``(num_heads, head_dim, in_features, out_features)`` of a timm attention module."""
    attn_dim = m.qkv.out_features // 3
    heads = int(m.num_heads)
    return heads, attn_dim // heads, m.qkv.in_features, m.proj.out_features


class _MaskedAttentionBase(MaskedLayer):
    """Soft / hard paths shared by the attention modules (input ``(B, N, C)``, output
    ``(B, N, C_out)``).

    Groups: ``in`` (the input features = qkv input columns), ``out`` (proj output rows) and
    ``heads``: ``num_heads * head_dim`` channels in head-major order; the heads gate has divisor
    ``head_dim`` and a per-head importance, so its kept set is always whole heads.
    Soft: ``x ⊙ w_in`` before qkv, attention output ``⊙ w_heads`` before proj (the input of the
    head group's consumer). Hard: qkv rows of the kept heads (for q, k and v) and kept input
    columns, attention over the kept heads only, proj on the kept head channels.
    """

    def _weights(self, x: torch.Tensor):
        """``(x, w_qkv, b_qkv, w_proj, b_proj, heads, head_mul, head_index)`` for this mode."""
        rt = self._s2h.runtime
        in_gate, out_gate, head_gate = self.in_gate, self.out_gate, self.extra_gate("heads")
        n_heads, hd, _, _ = attention_dims(self)
        attn_dim = n_heads * hd
        w_qkv, b_qkv = self.qkv.weight, self.qkv.bias
        w_proj, b_proj = self.proj.weight, self.proj.bias
        if self._mode() == "soft":
            if in_gate is not None:
                self._check_width(x, -1, self.qkv.in_features, "input")
                x = x * rt.state(in_gate).soft_mask.to(x.dtype)
            head_mul = None if head_gate is None else rt.state(head_gate).soft_mask
            return x, w_qkv, b_qkv, w_proj, b_proj, n_heads, head_mul, None
        in_state = rt.state(in_gate) if in_gate is not None else None
        in_keep = None
        if in_state is not None:
            self._check_width(x, -1, in_state.keep.numel(), "input")
            x = x * in_state.hard_mask.to(x.dtype)
            in_keep = in_state.keep
        out_keep = rt.state(out_gate).keep if out_gate is not None else None
        head_mul = head_keep = head_index = None
        if head_gate is not None:
            st = rt.state(head_gate)
            head_keep, head_mul = st.keep, st.hard_mask
            head_index = _whole_heads(head_keep, hd, self._s2h.name)
            n_heads = head_index.numel()
        rows = None if head_keep is None else _head_rows(head_keep, attn_dim)
        w_qkv, b_qkv, w_proj, b_proj = gather_qkv_out(w_qkv, b_qkv, w_proj, b_proj, rows,
                                                      in_keep, out_keep, head_keep)
        return x, w_qkv, b_qkv, w_proj, b_proj, n_heads, head_mul, head_index

    def _finish(self, x, w_proj, b_proj, head_mul):
        if head_mul is not None:
            x = x * head_mul.to(x.dtype)
        return self.proj_drop(F.linear(x, w_proj, b_proj))


class MaskedAttention(_MaskedAttentionBase, Attention):
    """timm ``Attention`` with masked input, output and heads (see the base class)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if self._mode() == "dense":
            return Attention.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        x, w_qkv, b_qkv, w_proj, b_proj, h, head_mul, _ = self._weights(x)
        B, N, _ = x.shape
        hd = self.head_dim
        qkv = F.linear(x, w_qkv, b_qkv).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # over head_dim: unaffected by the heads kept
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal)
        else:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, h * hd)
        return self._finish(x, w_proj, b_proj, head_mul)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        new = _plain_copy(self, Attention)
        head_keep = extra.get("heads")
        hd = self.head_dim
        rows = None
        if head_keep is not None:
            rows = torch.cat([head_keep + i * self.attn_dim for i in range(3)])
            new.num_heads = head_keep.numel() // hd
            new.attn_dim = new.num_heads * hd
        new.qkv = _sliced_linear(self.qkv, rows, in_keep)
        new.proj = _sliced_linear(self.proj, out_keep, head_keep)
        return new


if WindowAttention is not None:

    class MaskedWindowAttention(_MaskedAttentionBase, WindowAttention):
        """timm Swin ``WindowAttention``; the relative-position bias follows the kept heads."""

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if self._mode() == "dense":
                return WindowAttention.forward(self, x, mask)
            x, w_qkv, b_qkv, w_proj, b_proj, h, head_mul, head_index = self._weights(x)
            B_, N, _ = x.shape
            qkv = F.linear(x, w_qkv, b_qkv).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            bias = self._get_rel_pos_bias()  # (1, num_heads, N, N)
            if head_index is not None:
                bias = bias.index_select(1, head_index)
            if self.fused_attn:
                attn_mask = bias
                if mask is not None:
                    num_win = mask.shape[0]
                    mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, h, -1, -1)
                    attn_mask = attn_mask + mask.reshape(-1, h, N, N)
                x = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask,
                    dropout_p=self.attn_drop.p if self.training else 0.0)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1) + bias
                if mask is not None:
                    num_win = mask.shape[0]
                    attn = attn.view(-1, num_win, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
                    attn = attn.view(-1, h, N, N)
                x = self.attn_drop(self.softmax(attn)) @ v
            x = x.transpose(1, 2).reshape(B_, N, -1)
            return self._finish(x, w_proj, b_proj, head_mul)

        @torch.no_grad()
        def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
            new = _plain_copy(self, WindowAttention)
            n_heads, hd, _, _ = attention_dims(self)
            head_keep = extra.get("heads")
            rows = None
            if head_keep is not None:
                rows = torch.cat([head_keep + i * n_heads * hd for i in range(3)])
                heads = head_keep[::hd] // hd
                new.num_heads = heads.numel()
                _set_param(new, "relative_position_bias_table",
                           self.relative_position_bias_table.index_select(1, heads))
            new.qkv = _sliced_linear(self.qkv, rows, in_keep)
            new.proj = _sliced_linear(self.proj, out_keep, head_keep)
            return new


# ---------------------------------------------------------------------------- PVT v2 attention


def pvt_attention(m: nn.Module, x: torch.Tensor, feat_size: tuple[int, int] | list[int],
                  w: dict[str, torch.Tensor | None], heads: int,
                  sr_mul: torch.Tensor | None = None,
                  head_mul: torch.Tensor | None = None) -> torch.Tensor:
    """timm's PVT v2 attention (``timm.models.pvt_v2.Attention.forward``) computed from the
    weights ``w`` (keys ``q_w q_b kv_w kv_b proj_w proj_b sr_w sr_b norm_w norm_b``) with
    ``heads`` heads of ``m.head_dim``: the widths are read off the weights, never from the
    input's channel count as timm does (``reshape(B, C, ...)``), so the input, the heads and the
    spatial-reduction channels may each have their own width. ``m`` gives the layout (``sr``'s
    stride / padding, ``pool``, ``norm.eps``, ``act``, ``fused_attn``, the dropouts).

    ``x`` ``(B, N, C_in)``, ``feat_size`` ``(H, W)`` with ``H * W == N``. ``sr_mul``: multiplies
    the reduced tokens (after ``norm`` / ``act``: the input of ``kv``); ``head_mul``: the
    attention output (the input of ``proj``)."""
    B, N, C = x.shape
    H, W = feat_size
    hd = m.head_dim
    q = F.linear(x, w["q_w"], w["q_b"]).reshape(B, N, heads, hd).permute(0, 2, 1, 3)
    t = x
    if m.sr is not None:
        t = x.permute(0, 2, 1).reshape(B, C, H, W)
        if m.pool is not None:
            t = m.pool(t)
        t = F.conv2d(t, w["sr_w"], w["sr_b"], m.sr.stride, m.sr.padding, m.sr.dilation)
        t = t.flatten(2).transpose(1, 2)
        t = F.layer_norm(t, (t.shape[-1],), w["norm_w"], w["norm_b"], m.norm.eps)
        if m.act is not None:
            t = m.act(t)
        if sr_mul is not None:
            t = t * sr_mul.to(t.dtype)
    kv = F.linear(t, w["kv_w"], w["kv_b"]).reshape(B, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    if m.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=m.attn_drop.p if m.training else 0.0)
    else:
        attn = (q * m.scale) @ k.transpose(-2, -1)
        o = m.attn_drop(attn.softmax(dim=-1)) @ v
    o = o.transpose(1, 2).reshape(B, N, heads * hd)
    if head_mul is not None:
        o = o * head_mul.to(o.dtype)
    return m.proj_drop(F.linear(o, w["proj_w"], w["proj_b"]))


def _pvt_weights(m: nn.Module) -> dict[str, torch.Tensor | None]:
    sr, norm = m.sr, m.norm
    return {"q_w": m.q.weight, "q_b": m.q.bias, "kv_w": m.kv.weight, "kv_b": m.kv.bias,
            "proj_w": m.proj.weight, "proj_b": m.proj.bias,
            "sr_w": None if sr is None else sr.weight, "sr_b": None if sr is None else sr.bias,
            "norm_w": None if norm is None else norm.weight,
            "norm_b": None if norm is None else norm.bias}


if PvtAttention is not None:

    class PrunedPvtAttention(PvtAttention):
        """What a pruned PVT v2 ``Attention`` exports to: timm's layer (same submodules,
        parameter names and ``head_dim``, so the same attention scale) with ``num_heads`` heads,
        an input of ``dim`` channels, ``sr_dim`` spatial-reduction channels (``sr`` / ``norm``
        / ``kv``'s input) and ``out_dim`` outputs, which timm's own forward cannot hold: it
        reshapes with the input's channel count (see :func:`pvt_attention`)."""

        def __init__(self, dim: int, num_heads: int, head_dim: int, sr_dim: int | None = None,
                     out_dim: int | None = None, sr_ratio: int = 1, linear_attn: bool = False,
                     qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> None:
            nn.Module.__init__(self)
            kw = {"device": device, "dtype": dtype}
            a = num_heads * head_dim
            sr_dim = dim if sr_dim is None else sr_dim
            self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
            self.scale = head_dim ** -0.5
            self.fused_attn = use_fused_attn()
            has_sr = linear_attn or sr_ratio > 1
            self.q = nn.Linear(dim, a, bias=qkv_bias, **kw)
            self.kv = nn.Linear(sr_dim if has_sr else dim, 2 * a, bias=qkv_bias, **kw)
            self.attn_drop = nn.Dropout(attn_drop)
            self.proj = nn.Linear(a, dim if out_dim is None else out_dim, **kw)
            self.proj_drop = nn.Dropout(proj_drop)
            self.pool = nn.AdaptiveAvgPool2d(7) if linear_attn else None
            self.act = nn.GELU() if linear_attn else None
            k = 1 if linear_attn else sr_ratio
            self.sr = nn.Conv2d(dim, sr_dim, kernel_size=k, stride=k, **kw) if has_sr else None
            self.norm = nn.LayerNorm(sr_dim, **kw) if has_sr else None

        def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
            return pvt_attention(self, x, feat_size, _pvt_weights(self), self.num_heads)

    def pvt_swap_sizes(m: nn.Module) -> dict[str, int]:
        """The sizes ``save_exported`` records for a :class:`PrunedPvtAttention`."""
        return {"dim": m.q.in_features, "num_heads": m.num_heads, "head_dim": m.head_dim,
                "sr_dim": m.q.in_features if m.sr is None else m.sr.out_channels,
                "out_dim": m.proj.out_features}

    def pvt_swap_build(dense: nn.Module, sizes: dict[str, int]) -> nn.Module:
        """A :class:`PrunedPvtAttention` of ``sizes`` (:func:`pvt_swap_sizes`) in place of
        timm's dense ``dense`` (its layout, biases and dropouts)."""
        if sizes["head_dim"] != dense.head_dim or not 0 < sizes["num_heads"] <= dense.num_heads:
            raise ValueError(f"{sizes['num_heads']} heads of {sizes['head_dim']} do not fit the "
                             f"rebuilt layer ({dense.num_heads} heads of {dense.head_dim})")
        linear = dense.pool is not None
        ratio = 1 if dense.sr is None or linear else dense.sr.kernel_size[0]
        new = PrunedPvtAttention(
            sizes["dim"], sizes["num_heads"], sizes["head_dim"], sr_dim=sizes["sr_dim"],
            out_dim=sizes["out_dim"], sr_ratio=ratio, linear_attn=linear,
            qkv_bias=dense.q.bias is not None, attn_drop=dense.attn_drop.p,
            proj_drop=dense.proj_drop.p, dtype=dense.q.weight.dtype)
        new.fused_attn = dense.fused_attn  # a runtime switch: as the layer it replaces
        if dense.norm is not None:
            new.norm.eps = dense.norm.eps
        return new

    class MaskedPvtAttention(MaskedLayer, PvtAttention):
        """timm PVT v2 ``Attention`` with masked input, output, heads and spatial-reduction
        channels.

        Groups: ``in`` (the input: ``q``'s columns and ``sr``'s input channels, or ``kv``'s
        columns without ``sr``), ``out`` (``proj``'s rows), ``heads`` (``num_heads * head_dim``
        channels in head-major order, divisor ``head_dim``: the rows of ``q`` and of ``kv``'s
        k and v halves, ``proj``'s columns) and, with ``sr``, ``sr`` (``sr``'s output channels,
        ``norm``'s channels, ``kv``'s columns). Soft: ``x ⊙ w_in``, the reduced tokens after
        ``norm`` / ``act`` ``⊙ w_sr``, the attention output ``⊙ w_heads``; hard: every weight
        gathered to its kept rows and columns, the layer norm over the kept ``sr`` channels,
        attention over the kept heads (:func:`pvt_attention`)."""

        def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
            mode = self._mode()
            if mode == "dense":
                return PvtAttention.forward(self, x, feat_size)
            rt = self._s2h.runtime
            in_gate, out_gate = self.in_gate, self.out_gate
            head_gate, sr_gate = self.extra_gate("heads"), self.extra_gate("sr")
            w, heads = _pvt_weights(self), self.num_heads
            if mode == "soft":
                if in_gate is not None:
                    self._check_width(x, -1, self.q.in_features, "input")
                    x = x * rt.state(in_gate).soft_mask.to(x.dtype)
                head_mul = None if head_gate is None else rt.state(head_gate).soft_mask
                sr_mul = None if sr_gate is None else rt.state(sr_gate).soft_mask
                return pvt_attention(self, x, feat_size, w, heads, sr_mul, head_mul)
            in_keep = out_keep = head_keep = sr_keep = head_mul = sr_mul = None
            if in_gate is not None:
                st = rt.state(in_gate)
                self._check_width(x, -1, st.keep.numel(), "input")
                x, in_keep = x * st.hard_mask.to(x.dtype), st.keep
            if out_gate is not None:
                out_keep = rt.state(out_gate).keep
            if head_gate is not None:
                st = rt.state(head_gate)
                head_keep, head_mul = st.keep, st.hard_mask
                heads = _whole_heads(head_keep, self.head_dim, self._s2h.name).numel()
            if sr_gate is not None:
                st = rt.state(sr_gate)
                sr_keep, sr_mul = st.keep, st.hard_mask
            a = self.num_heads * self.head_dim
            kv_rows = None if head_keep is None else torch.cat([head_keep, head_keep + a])
            w["q_w"] = gather_kept_weight(w["q_w"], head_keep, in_keep)
            w["kv_w"] = gather_kept_weight(w["kv_w"], kv_rows,
                                           in_keep if self.sr is None else sr_keep)
            w["proj_w"] = gather_kept_weight(w["proj_w"], out_keep, head_keep)
            if self.sr is not None:
                w["sr_w"] = gather_kept_weight(w["sr_w"], sr_keep, in_keep)
            for name, rows in (("q_b", head_keep), ("kv_b", kv_rows), ("proj_b", out_keep),
                               ("sr_b", sr_keep), ("norm_w", sr_keep), ("norm_b", sr_keep)):
                if w[name] is not None:
                    w[name] = gather_kept(w[name], rows, 0)
            return pvt_attention(self, x, feat_size, w, heads, sr_mul, head_mul)

        @torch.no_grad()
        def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                       extra: dict[str, torch.Tensor]) -> nn.Module:
            """timm's own ``Attention`` (``proj`` sliced to the kept outputs) when no input,
            head or spatial-reduction channel was removed, else a :class:`PrunedPvtAttention`
            with the kept heads and channels."""
            head_keep, sr_keep = extra.get("heads"), extra.get("sr")
            c, a = self.q.in_features, self.num_heads * self.head_dim
            sr_c = c if self.sr is None else self.sr.out_channels
            if all(k is None or k.numel() == n for k, n in (
                    (head_keep, a), (in_keep, c), (sr_keep, sr_c))):
                new = _plain_copy(self, PvtAttention)
                new.proj = _sliced_linear(self.proj, out_keep, None)
                return new
            ref = self.q.weight
            new = pvt_swap_build(self, {
                "dim": c if in_keep is None else in_keep.numel(),
                "num_heads": (self.num_heads if head_keep is None
                              else head_keep.numel() // self.head_dim),
                "head_dim": self.head_dim,
                "sr_dim": sr_c if sr_keep is None else sr_keep.numel(),
                "out_dim": self.proj.out_features if out_keep is None else out_keep.numel()})
            new = new.to(ref.device).train(self.training)
            kv_rows = None if head_keep is None else torch.cat([head_keep, head_keep + a])
            pairs = [(new.q, self.q, head_keep, in_keep), (new.proj, self.proj, out_keep,
                                                             head_keep),
                     (new.kv, self.kv, kv_rows, in_keep if self.sr is None else sr_keep)]
            if self.sr is not None:
                pairs += [(new.sr, self.sr, sr_keep, in_keep)]
                new.norm.weight.copy_(_sel(self.norm.weight, sr_keep))
                new.norm.bias.copy_(_sel(self.norm.bias, sr_keep))
            for dst, src, rows, cols in pairs:
                dst.weight.copy_(_sel(_sel(src.weight, rows, 0), cols, 1))
                if src.bias is not None:
                    dst.bias.copy_(_sel(src.bias, rows))
            if not ref.requires_grad:
                new.requires_grad_(False)
            return new


# ---------------------------------------------------------------------------- conv variants


class _MaskedTimmConv(MaskedConv2d):
    """A timm conv computing ``pad -> conv``: the pad (TF "SAME", computed from the input's
    spatial size) acts on each channel alike, so the layer prunes like ``nn.Conv2d``; only the
    conv call (:meth:`_conv`) and the exported class differ. The lockstep dual ops do not know
    the pad, so both paths run this class's own code there (``s2h_dual_fused``)."""

    s2h_dual_fused = False

    def _dynamic_pad(self) -> bool:
        return bool(getattr(self, "same_pad", False))

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              groups: int) -> torch.Tensor:
        if self._dynamic_pad():
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        """A plain instance of the same timm class with the kept channels (its ``eps``,
        ``scale``, ``same_pad`` unchanged; a ``gain`` sliced to the kept output channels)."""
        conv = MaskedConv2d.s2h_export(self, in_keep, out_keep, extra)
        new = _plain_copy(self, _registry.plain_class(type(self)))
        new.in_channels, new.out_channels, new.groups = (conv.in_channels, conv.out_channels,
                                                         conv.groups)
        _set_param(new, "weight", conv.weight)
        _set_param(new, "bias", conv.bias)
        if getattr(self, "gain", None) is not None:
            _set_param(new, "gain", _sel(self.gain, in_keep if self.passes_group else out_keep))
        return new


class MaskedConv2dSame(_MaskedTimmConv, Conv2dSame):
    """timm ``Conv2dSame``: ``pad_same`` then a conv with no padding of its own."""

    def _dynamic_pad(self) -> bool:
        return True


def standardised(m: nn.Module, weight: torch.Tensor, gain: torch.Tensor | None,
                 col_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The weight a weight-standardised conv ``m`` convolves with: each row of ``weight``
    ``(C_out, C_in, kh, kw)`` minus its mean, over its standard deviation (biased, ``+ m.eps``),
    times ``gain * m.scale`` (``gain`` ``(C_out, 1, 1, 1)`` or None).

    ``col_mask`` ``(C_in,)``: the mean and variance are weighted by each input channel's mask
    (every ``kh * kw`` entry of a column with its channel's weight): at a 0/1 mask they are
    those of the kept columns, at all ones the plain ones. None: the plain statistics, computed
    as timm computes them."""
    o = weight.shape[0]
    g = None if gain is None else (gain * m.scale).reshape(-1)
    if col_mask is None:
        return F.batch_norm(weight.reshape(1, o, -1), None, None, weight=g, training=True,
                            momentum=0.0, eps=m.eps).reshape_as(weight)
    flat = weight.reshape(o, -1)
    a = col_mask.to(weight.dtype).repeat_interleave(weight[0, 0].numel())
    n = a.sum()
    mean = (flat * a).sum(1, keepdim=True) / n
    var = ((flat - mean).square() * a).sum(1, keepdim=True) / n
    out = (flat - mean) * torch.rsqrt(var + m.eps)
    if g is not None:
        out = out * g[:, None]
    return out.reshape_as(weight)


class _MaskedStdConv(_MaskedTimmConv):
    """A weight-standardised timm conv (``eps``; ``gain`` and ``scale`` for the scaled ones).

    Soft: ``conv(x ⊙ m, standardised(W, gain, m))`` -- the statistics weighted by the input
    mask ``m`` (a depthwise / grouped conv that passes its group through: the plain statistics,
    each row's columns are its own conv group's, kept or dropped with the row). Hard: the
    block ``W[out_keep][:, in_keep]`` standardised over its own columns, ``gain[out_keep]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        if mode == "dense":
            return _registry.plain_class(type(self)).forward(self, x)
        rt, in_gate, out_gate = self._s2h.runtime, self._s2h.in_gate, self._s2h.out_gate
        gain = getattr(self, "gain", None)
        if mode == "soft":
            col = None
            if in_gate is not None:
                self._check_width(x, 1, self.in_channels, "input")
                mask = rt.state(in_gate).soft_mask
                x = x * _channel_view(mask, x.ndim, 1, x.dtype)
                col = None if self.passes_group else mask
            return self._conv(x, standardised(self, self.weight, gain, col), self.bias,
                              self.groups)
        in_state = rt.state(in_gate) if in_gate is not None else None
        out_state = rt.state(out_gate) if out_gate is not None else None
        if in_state is not None:
            self._check_width(x, 1, in_state.keep.numel(), "input")
            x = x * _channel_view(in_state.hard_mask, x.ndim, 1, x.dtype)
        groups = self.groups
        if self.passes_group:
            in_keep, out_keep = None, None if in_state is None else in_state.keep
            if out_keep is not None:
                groups = self._kept_groups(out_keep)
        else:
            in_keep = None if in_state is None else in_state.keep
            out_keep = None if out_state is None else out_state.keep
        weight, bias = self.kept_weight_bias(in_keep, out_keep)
        if gain is not None:
            gain = gather_kept(gain, out_keep, 0)
        return self._conv(x, standardised(self, weight, gain), bias, groups)


class MaskedStdConv2d(_MaskedStdConv, StdConv2d):
    """timm ``StdConv2d`` (static padding)."""


class MaskedStdConv2dSame(_MaskedStdConv, StdConv2dSame):
    """timm ``StdConv2dSame`` (dynamic "SAME" padding where ``same_pad``)."""


class MaskedScaledStdConv2d(_MaskedStdConv, ScaledStdConv2d):
    """timm ``ScaledStdConv2d`` (``gain * scale`` per output channel)."""


class MaskedScaledStdConv2dSame(_MaskedStdConv, ScaledStdConv2dSame):
    """timm ``ScaledStdConv2dSame``."""


def _std_conv_importance(m: nn.Module, role: str) -> torch.Tensor:
    """L1 norms of the rows of the weight the layer convolves with (standardised, times its
    gain): every raw row standardises to the same norm, so the raw weight would not rank them."""
    gain = getattr(m, "gain", None)
    w = standardised(m, m.weight.detach().float(), None if gain is None else gain.detach().float())
    return w.abs().flatten(1).sum(1).cpu()


# ---------------------------------------------------------------------------- handlers


def _batchnorm_act_info(m: nn.Module) -> LayerInfo:
    bad = [n for n in ("drop", "act") if not _elementwise(getattr(m, n))]
    if bad:
        return LayerInfo("fixed", 1, f"its {bad[0]} ({type(getattr(m, bad[0])).__name__}) is "
                                     "not a known elementwise module")
    return LayerInfo("batchnorm", 1)


def _groupnorm_act_info(m: nn.Module) -> LayerInfo:
    bad = [n for n in ("drop", "act") if not _elementwise(getattr(m, n))]
    if bad:
        return LayerInfo("fixed", 1, f"its {bad[0]} ({type(getattr(m, bad[0])).__name__}) is "
                                     "not a known elementwise module")
    return _groupnorm_info(m)


def _layernorm_info(m: nn.Module) -> LayerInfo:
    if len(m.normalized_shape) == 1:
        return LayerInfo("layernorm", -1)
    return LayerInfo("fixed", -1, f"normalized_shape={tuple(m.normalized_shape)}")


def _attention_info(m: nn.Module) -> LayerInfo:
    if getattr(m, "gate", None) is not None:
        return LayerInfo("fixed", -1, "gated attention is not supported")
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return LayerInfo("fixed", -1, "scale_norm over the heads is not supported")
    if type(m.qkv) is not nn.Linear or type(m.proj) is not nn.Linear:
        return LayerInfo("fixed", -1, "qkv/proj are not plain nn.Linear")
    return LayerInfo("attention", -1)


def _window_attention_info(m: nn.Module) -> LayerInfo:
    if type(m.qkv) is not nn.Linear or type(m.proj) is not nn.Linear:
        return LayerInfo("fixed", -1, "qkv/proj are not plain nn.Linear")
    return LayerInfo("attention", -1)


def _attention_flops(m: nn.Module, info: LayerInfo, flops_of) -> list[tuple[int, tuple[str, ...]]]:
    """The counted FLOPs of an attention layer split by the groups they scale with: qkv (in x
    heads), proj (heads x out) and the rest -- q@k^T and attn@v -- (heads)."""
    qkv, proj = flops_of("qkv"), flops_of("proj")
    return [(qkv, ("in", "heads")), (flops_of("") - qkv - proj, ("heads",)),
            (proj, ("heads", "out"))]


def _attention_importance(m: nn.Module, role: str) -> torch.Tensor:
    """``heads``: per head, the mean over its channels of the L1 norms of its q, k, v rows plus
    its proj input columns, repeated ``head_dim`` times (equal scores keep heads whole);
    ``out``: the L1 norms of the proj rows."""
    if role == "out":
        return m.proj.weight.detach().float().abs().sum(1).cpu()
    heads, hd, _, _ = attention_dims(m)
    a = heads * hd
    w = m.qkv.weight.detach().float().abs().sum(1).view(3, a).sum(0)
    w = w + m.proj.weight.detach().float().abs().sum(0)
    return w.view(heads, hd).mean(1).repeat_interleave(hd).cpu()


def _attention_heads(m: nn.Module) -> dict[str, tuple[int, int]]:
    heads, hd, _, _ = attention_dims(m)
    return {"heads": (heads * hd, hd)}


def _attention_handler(plain: type, masked: type, info) -> LayerHandler:
    return LayerHandler(plain, masked, info, flop_parts=_attention_flops,
                        importance=_attention_importance, inner_groups=_attention_heads)


_registry.register(LayerHandler(BatchNormAct2d, MaskedBatchNormAct2d, _batchnorm_act_info))
_registry.register(LayerHandler(TimmLinear, MaskedTimmLinear, lambda m: LayerInfo("linear", -1)))
_registry.register(LayerHandler(LayerNorm, MaskedTimmLayerNorm, _layernorm_info))
_registry.register(LayerHandler(LayerNorm2d, MaskedLayerNorm2d,
                                lambda m: LayerInfo("layernorm", 1)))
_registry.register(_attention_handler(Attention, MaskedAttention, _attention_info))
_registry.register(LayerHandler(GroupNormAct, MaskedGroupNormAct, _groupnorm_act_info))
_registry.register(LayerHandler(GroupNorm1, MaskedGroupNorm1, _groupnorm_info))
_registry.register(LayerHandler(Conv2dSame, MaskedConv2dSame, _conv_info))
for _plain, _masked in ((StdConv2d, MaskedStdConv2d), (StdConv2dSame, MaskedStdConv2dSame),
                        (ScaledStdConv2d, MaskedScaledStdConv2d),
                        (ScaledStdConv2dSame, MaskedScaledStdConv2dSame)):
    _registry.register(LayerHandler(_plain, _masked, _conv_info, importance=_std_conv_importance))
if WindowAttention is not None:
    _registry.register(_attention_handler(WindowAttention, MaskedWindowAttention,
                                          _window_attention_info))


# ---------------------------------------------------------------------------- PVT v2 handler


def _pvt_attention_info(m: nn.Module) -> LayerInfo:
    if any(type(getattr(m, n)) is not nn.Linear for n in ("q", "kv", "proj")):
        return LayerInfo("fixed", -1, "q/kv/proj are not plain nn.Linear")
    if m.q.out_features != m.num_heads * m.head_dim:
        return LayerInfo("fixed", -1, "q's rows are not num_heads * head_dim")
    if m.sr is not None:
        if type(m.sr) is not nn.Conv2d or m.sr.groups != 1 or m.sr.padding_mode != "zeros":
            return LayerInfo("fixed", -1, "sr is not a plain ungrouped nn.Conv2d")
        if type(m.norm) is not nn.LayerNorm or len(m.norm.normalized_shape) != 1 \
                or m.norm.weight is None or m.norm.bias is None:
            return LayerInfo("fixed", -1, "norm is not an affine nn.LayerNorm over the channels")
        if m.act is not None and not _elementwise(m.act):
            return LayerInfo("fixed", -1, f"its act ({type(m.act).__name__}) is not a known "
                                          "elementwise module")
        if m.pool is not None and type(m.pool) is not nn.AdaptiveAvgPool2d:
            return LayerInfo("fixed", -1, "its pool is not nn.AdaptiveAvgPool2d")
    return LayerInfo("attention", -1)


def _pvt_attention_flops(m: nn.Module, info: LayerInfo,
                         flops_of) -> list[tuple[int, tuple[str, ...]]]:
    """The counted FLOPs of a PVT v2 attention split by the groups they scale with: ``q`` (in x
    heads), ``sr`` (in x sr), ``kv`` (sr -- or in without ``sr`` -- x heads), ``proj`` (heads x
    out) and the rest -- q@k^T and attn@v where the counter counts them -- (heads)."""
    q, kv, proj = flops_of("q"), flops_of("kv"), flops_of("proj")
    sr = 0 if m.sr is None else flops_of("sr")
    parts = [(q, ("in", "heads")), (kv, ("in" if m.sr is None else "sr", "heads")),
             (flops_of("") - q - kv - proj - sr, ("heads",)), (proj, ("heads", "out"))]
    if m.sr is not None:
        parts.append((sr, ("in", "sr")))
    return parts


def _pvt_attention_importance(m: nn.Module, role: str) -> torch.Tensor:
    """``heads``: per head, the mean over its channels of the L1 norms of its q, k, v rows plus
    its proj input columns, repeated ``head_dim`` times; ``sr``: the L1 norms of ``sr``'s rows;
    ``out``: the L1 norms of ``proj``'s rows."""
    if role == "out":
        return m.proj.weight.detach().float().abs().sum(1).cpu()
    if role == "sr":
        return m.sr.weight.detach().float().abs().flatten(1).sum(1).cpu()
    heads, hd = m.num_heads, m.head_dim
    a = heads * hd
    w = m.q.weight.detach().float().abs().sum(1)
    w = w + m.kv.weight.detach().float().abs().sum(1).view(2, a).sum(0)
    w = w + m.proj.weight.detach().float().abs().sum(0)
    return w.view(heads, hd).mean(1).repeat_interleave(hd).cpu()


def _pvt_attention_groups(m: nn.Module) -> dict[str, tuple[int, int | None]]:
    """``heads`` (whole heads: divisor ``head_dim``) and, with ``sr``, its output channels
    (``sr``; the pruner's divisor)."""
    groups: dict[str, tuple[int, int | None]] = {"heads": (m.num_heads * m.head_dim,
                                                           m.head_dim)}
    if m.sr is not None:
        groups["sr"] = (m.sr.out_channels, None)
    return groups


if PvtAttention is not None:
    _registry.register(LayerHandler(PvtAttention, MaskedPvtAttention, _pvt_attention_info,
                                    flop_parts=_pvt_attention_flops,
                                    importance=_pvt_attention_importance,
                                    inner_groups=_pvt_attention_groups))
