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
)
from .registry import LayerHandler, LayerInfo

try:
    from timm.models.swin_transformer import WindowAttention
except Exception:  # pragma: no cover - older/newer timm layout
    WindowAttention = None

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
        new = _plain_copy(self, GroupNormAct)
        new.num_groups, new.num_channels = self._export_sizes(out_keep)
        _set_param(new, "weight", _sel(self.weight, out_keep))
        _set_param(new, "bias", _sel(self.bias, out_keep))
        return new


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
        rows = None
        if head_keep is not None:
            rows = torch.cat([head_keep + i * attn_dim for i in range(3)])
        w_qkv = gather_kept_weight(w_qkv, rows, in_keep)
        if b_qkv is not None:
            b_qkv = gather_kept(b_qkv, rows, 0)
        w_proj = gather_kept_weight(w_proj, out_keep, head_keep)
        if b_proj is not None:
            b_proj = gather_kept(b_proj, out_keep, 0)
        return x, w_qkv, b_qkv, w_proj, b_proj, n_heads, head_mul, head_index

    def _finish(self, x, w_proj, b_proj, head_mul):
        if head_mul is not None:
            x = x * head_mul.to(x.dtype)
        return self.proj_drop(F.linear(x, w_proj, b_proj))


def _whole_heads(keep: torch.Tensor, hd: int, name: str) -> torch.Tensor:
    """``(h,)`` kept head indices from the kept channels ``keep`` (``(h*hd,)``, ascending)."""
    heads = keep[::hd] // hd
    expect = (heads[:, None] * hd + torch.arange(hd, device=keep.device)).flatten()
    if keep.numel() % hd or not torch.equal(keep, expect):
        raise RuntimeError(f"{name}: the kept channels of the heads group are not whole heads "
                           f"(head_dim={hd}); was the gate's importance order changed by hand?")
    return heads


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
_registry.register(LayerHandler(Conv2dSame, MaskedConv2dSame, _conv_info))
for _plain, _masked in ((StdConv2d, MaskedStdConv2d), (StdConv2dSame, MaskedStdConv2dSame),
                        (ScaledStdConv2d, MaskedScaledStdConv2d),
                        (ScaledStdConv2dSame, MaskedScaledStdConv2dSame)):
    _registry.register(LayerHandler(_plain, _masked, _conv_info, importance=_std_conv_importance))
if WindowAttention is not None:
    _registry.register(_attention_handler(WindowAttention, MaskedWindowAttention,
                                          _window_attention_info))
