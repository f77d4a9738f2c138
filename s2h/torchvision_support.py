"""torchvision's Swin window attention and MaxViT attention pruned by whole heads; ShuffleNetV2's
channel shuffle routed by index (:class:`RoutedInvertedResidual`).

Imported by :mod:`s2h.registry` only once torchvision itself is imported. (torchvision's ViT
needs nothing here: its ``EncoderBlock`` calls ``nn.MultiheadAttention``, see
:mod:`s2h.torch_attention`.)

``ShiftedWindowAttention`` (Swin v1) calls ``shifted_window_attention`` with its ``qkv`` and
``proj`` weights; it is opaque to the graph analysis, with the groups of an attention layer:
``in`` (the input channels, last dim of ``(B, H, W, C)``), ``heads`` (``num_heads * head_dim``
channels, granularity ``head_dim``: q, k, v rows, the relative-position bias table's columns and
the input columns of ``proj``) and ``out`` (the rows of ``proj``).

torchvision derives ``head_dim`` from the input width (``C // num_heads``), so a layer with
fewer heads of the same ``head_dim`` cannot be a ``ShiftedWindowAttention``: it exports as
:class:`PrunedShiftedWindowAttention`, a plain module computing the same window attention
(:func:`window_attention`) with an inner width free of the input width. Swin v2's
``ShiftedWindowAttentionV2`` (cosine attention, a bias MLP) is a subclass s2h does not know,
hence kept whole with a warning that names it.

MaxViT's ``RelativePositionalMultiHeadAttention`` (input ``(B, G, P, D)``: ``G`` windows of
``P`` tokens) is pruned the same way: groups ``in`` (``D``, the input columns of ``to_qkv``),
``heads`` (``n_heads * head_dim``: q, k, v rows of ``to_qkv``, the bias table's columns, the
input columns of ``merge``) and ``out`` (the rows of ``merge``). torchvision reshapes the heads'
output to the *input* width ``D``, so a layer whose heads and input differ in width exports as
:class:`PrunedRelativePositionalMultiHeadAttention` (:func:`relative_attention`); its
``scale_factor`` stays the dense layer's (``feat_dim ** -0.5`` of the unpruned width).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.shufflenetv2 import InvertedResidual as ShuffleInvertedResidual
from torchvision.models.swin_transformer import ShiftedWindowAttention

from . import registry as _registry
from .nn import (
    MaskedLayer,
    MaskedLayerNorm,
    gather_kept,
    gather_kept_weight,
    gather_qkv_out,
    soft_masked,
    straight_through,
)
from .registry import LayerCall, LayerHandler, LayerInfo
from .torch_attention import _head_rows, _whole_heads

__all__ = ["MaskedLayerNorm2d", "MaskedRelativePositionalMultiHeadAttention",
           "MaskedShiftedWindowAttention", "PrunedRelativePositionalMultiHeadAttention",
           "PrunedShiftedWindowAttention", "RoutedInvertedResidual", "relative_attention",
           "window_attention"]


def _window_regions(hp: int, wp: int, window: Sequence[int], shift: Sequence[int],
                    device: torch.device) -> torch.Tensor:
    """``(num_windows, wh * ww)``: for each token of each window, which of the (up to 9) regions
    of the rolled map it came from; tokens of different regions must not attend to each other."""

    def bands(size: int, win: int, sh: int) -> torch.Tensor:
        pos = torch.arange(size, device=device)
        return (pos >= size - win).long() + (pos >= size - sh).long()

    ids = bands(hp, window[0], shift[0])[:, None] * 3 + bands(wp, window[1], shift[1])[None, :]
    ids = ids.view(hp // window[0], window[0], wp // window[1], window[1])
    return ids.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])


def window_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    relative_position_bias: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    head_dim: int,
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
    head_mul: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swin (v1) shifted-window multi-head self-attention on ``x`` ``(B, H, W, C)`` with
    ``num_heads`` heads of ``head_dim`` (any inner width); output ``(B, H, W, C_out)``.

    ``relative_position_bias``: ``(1, num_heads, N, N)`` for ``N = wh * ww`` tokens per window;
    ``head_mul``: ``(num_heads * head_dim,)`` multiplies the attention output before ``proj``."""
    b, h, w, c = x.shape
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
    hp, wp = x.shape[1], x.shape[2]
    shift = [0 if wh >= hp else shift_size[0], 0 if ww >= wp else shift_size[1]]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = hp // wh, wp // ww
    n = wh * ww
    t = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
    qkv = F.linear(t, qkv_weight, qkv_bias).view(t.shape[0], n, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1)) + relative_position_bias
    if shifted:
        ids = _window_regions(hp, wp, window_size, shift, x.device)
        mask = torch.zeros(ids.shape[0], n, n, dtype=attn.dtype, device=attn.device)
        mask = mask.masked_fill(ids[:, :, None] != ids[:, None, :], -100.0)
        attn = (attn.view(b, nh * nw, num_heads, n, n) + mask[None, :, None]).view(-1, num_heads,
                                                                                    n, n)
    attn = F.dropout(attn.softmax(-1), p=attention_dropout, training=training)
    out = attn.matmul(v).transpose(1, 2).reshape(t.shape[0], n, num_heads * head_dim)
    if head_mul is not None:
        out = out * head_mul.to(out.dtype)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    c_out = out.shape[-1]
    out = out.view(b, nh, nw, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c_out)
    if shifted:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def _relative_bias(table: torch.Tensor, index: torch.Tensor, window: Sequence[int]
                   ) -> torch.Tensor:
    """``(1, heads, N, N)`` bias from the ``(L, heads)`` table and the ``(N * N,)`` index."""
    n = window[0] * window[1]
    return table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


class PrunedShiftedWindowAttention(nn.Module):
    """What a pruned ``ShiftedWindowAttention`` exports to: the same window attention with
    ``num_heads`` heads of ``head_dim`` (not ``dim // num_heads``), ``qkv`` ``dim -> 3 * A``,
    ``proj`` ``A -> out_dim``; same parameter and buffer names."""

    def __init__(self, dim: int, window_size: Sequence[int], shift_size: Sequence[int],
                 num_heads: int, head_dim: int, out_dim: int | None = None,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_dropout, self.dropout = attention_dropout, dropout
        a = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * a, bias=qkv_bias, **kw)
        self.proj = nn.Linear(a, dim if out_dim is None else out_dim, bias=proj_bias, **kw)
        table = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads, **kw))
        n = window_size[0] * window_size[1]
        self.register_buffer("relative_position_index",
                             torch.zeros(n * n, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = _relative_bias(self.relative_position_bias_table, self.relative_position_index,
                              self.window_size)
        return window_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight,
                                self.proj.bias, bias, self.window_size, self.shift_size,
                                self.num_heads, self.head_dim, self.attention_dropout,
                                self.dropout, self.training)


def _masked_head_params(layer: MaskedLayer, mode: str, x: torch.Tensor, in_width: int,
                        heads: int, hd: int, qkv: nn.Linear, out: nn.Linear,
                        table: torch.Tensor) -> tuple:
    """The soft or hard operands of a windowed attention pruned by whole heads (Swin's and
    MaxViT's): ``(x, w_qkv, b_qkv, w_out, b_out, bias table, heads, head multiplier)``, the
    input masked (soft) or straight-through scaled with the kept rows, columns and heads
    gathered (hard)."""
    rt = layer._s2h.runtime
    in_gate, out_gate, head_gate = layer.in_gate, layer.out_gate, layer.extra_gate("heads")
    w_qkv, b_qkv, w_out, b_out = qkv.weight, qkv.bias, out.weight, out.bias
    head_mul = None
    if mode == "soft":
        if in_gate is not None:
            layer._check_width(x, -1, in_width, "input")
            x = soft_masked(x, rt.state(in_gate).soft_mask, -1)
        if head_gate is not None:
            head_mul = rt.state(head_gate).soft_mask
        return x, w_qkv, b_qkv, w_out, b_out, table, heads, head_mul
    attn_width = heads * hd
    in_keep = out_keep = head_keep = None
    if in_gate is not None:
        st = rt.state(in_gate)
        layer._check_width(x, -1, st.keep.numel(), "input")
        x, in_keep = straight_through(x, st.hard_mask, -1), st.keep
    if out_gate is not None:
        out_keep = rt.state(out_gate).keep
    if head_gate is not None:
        st = rt.state(head_gate)
        head_keep, head_mul = st.keep, st.hard_mask
        index = _whole_heads(head_keep, hd, layer._s2h.name)
        heads = index.numel()
        table = gather_kept(table, index, 1)
    rows = None if head_keep is None else _head_rows(head_keep, attn_width)
    w_qkv, b_qkv, w_out, b_out = gather_qkv_out(w_qkv, b_qkv, w_out, b_out, rows, in_keep,
                                                out_keep, head_keep)
    return x, w_qkv, b_qkv, w_out, b_out, table, heads, head_mul


class MaskedShiftedWindowAttention(MaskedLayer, ShiftedWindowAttention):
    """torchvision ``ShiftedWindowAttention`` with masked input, output and heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        if mode == "dense":
            return ShiftedWindowAttention.forward(self, x)
        c = self.qkv.in_features
        hd = c // self.num_heads
        x, w_qkv, b_qkv, w_proj, b_proj, table, heads, head_mul = _masked_head_params(
            self, mode, x, c, self.num_heads, hd, self.qkv, self.proj,
            self.relative_position_bias_table)
        bias = _relative_bias(table, self.relative_position_index, self.window_size)
        return window_attention(x, w_qkv, b_qkv, w_proj, b_proj, bias, self.window_size,
                                self.shift_size, heads, hd, self.attention_dropout, self.dropout,
                                self.training, head_mul)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        """A plain ``ShiftedWindowAttention`` when nothing was removed, else a
        :class:`PrunedShiftedWindowAttention` with the kept heads and channels."""
        head_keep = extra.get("heads")
        c = self.qkv.in_features
        hd = c // self.num_heads
        if all(k is None or k.numel() == n for k, n in (
                (head_keep, c), (in_keep, c), (out_keep, self.proj.out_features))):
            new = copy.deepcopy(self)  # a masked layer drops its gates when copied
            new.__class__ = ShiftedWindowAttention
            return new
        heads = (torch.arange(self.num_heads) if head_keep is None
                 else _whole_heads(head_keep, hd, "export"))
        rows = None if head_keep is None else _head_rows(head_keep, c)
        w = self.qkv.weight
        new = PrunedShiftedWindowAttention(
            c if in_keep is None else in_keep.numel(), self.window_size, self.shift_size,
            heads.numel(), hd,
            out_dim=self.proj.out_features if out_keep is None else out_keep.numel(),
            qkv_bias=self.qkv.bias is not None, proj_bias=self.proj.bias is not None,
            attention_dropout=self.attention_dropout, dropout=self.dropout, device=w.device,
            dtype=w.dtype)
        new.qkv.weight.copy_(gather_kept_weight(w, rows, in_keep))
        if self.qkv.bias is not None:
            new.qkv.bias.copy_(gather_kept(self.qkv.bias, rows, 0))
        new.proj.weight.copy_(gather_kept_weight(self.proj.weight, out_keep, head_keep))
        if self.proj.bias is not None:
            new.proj.bias.copy_(gather_kept(self.proj.bias, out_keep, 0))
        new.relative_position_bias_table.copy_(
            self.relative_position_bias_table.index_select(1, heads))
        new.relative_position_index.copy_(self.relative_position_index)
        if not w.requires_grad:
            new.requires_grad_(False)
        return new


# ---------------------------------------------------------------------------- the handler

#: padded token count of each call the graph analysis saw (for :func:`_swin_flops`)
_CALLS: weakref.WeakKeyDictionary[nn.Module, list[int]] = weakref.WeakKeyDictionary()


def _swin_call(m: nn.Module, args: tuple, out: object) -> LayerCall | None:
    call = _registry.first_arg_call(m, args, out)
    if call is not None and call.x.dim() == 4:
        b, h, w, _ = call.x.shape
        wh, ww = m.window_size
        _CALLS.setdefault(m, []).append(b * (h + (-h) % wh) * (w + (-w) % ww))
    return call


def _swin_info(m: nn.Module) -> LayerInfo:
    if type(m.qkv) is not nn.Linear or type(m.proj) is not nn.Linear:
        return LayerInfo("fixed", -1, "qkv/proj are not plain nn.Linear")
    return LayerInfo("attention", -1)


def _swin_flops(m: nn.Module, info: LayerInfo,
                flops_of: Callable[[str], int]) -> list[tuple[int, tuple[str, ...]]]:
    """qkv (``in`` x ``heads``), the window attention matmuls (``heads``), proj (``heads`` x
    ``out``), from the padded token counts of the calls."""
    tokens = sum(_CALLS.pop(m, []))
    c = m.qkv.in_features
    qkv, proj = 2 * tokens * c * 3 * c, 2 * tokens * c * m.proj.out_features
    total = flops_of("")
    rest = total - qkv - proj
    if rest < 0:  # the counter did not see the projections: nothing to split
        return [(total, ("heads",))]
    return [(qkv, ("in", "heads")), (rest, ("heads",)), (proj, ("heads", "out"))]


def _swin_importance(m: nn.Module, role: str) -> torch.Tensor:
    """As timm's attention: per head, mean L1 of its q, k, v rows and proj columns."""
    if role == "out":
        return m.proj.weight.detach().float().abs().sum(1).cpu()
    c = m.qkv.in_features
    hd = c // m.num_heads
    w = m.qkv.weight.detach().float().abs().sum(1).view(3, c).sum(0)
    w = w + m.proj.weight.detach().float().abs().sum(0)
    return w.view(m.num_heads, hd).mean(1).repeat_interleave(hd).cpu()


def _swin_heads(m: nn.Module) -> dict[str, tuple[int, int]]:
    c = m.qkv.in_features
    return {"heads": (c, c // m.num_heads)}


_registry.register(LayerHandler(ShiftedWindowAttention, MaskedShiftedWindowAttention, _swin_info,
                                flop_parts=_swin_flops, importance=_swin_importance,
                                inner_groups=_swin_heads, call=_swin_call))


# ---------------------------------------------------------------------------- MaxViT attention


def relative_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    merge_weight: torch.Tensor,
    merge_bias: torch.Tensor | None,
    table: torch.Tensor,
    index: torch.Tensor,
    n_heads: int,
    head_dim: int,
    scale: float,
    head_mul: torch.Tensor | None = None,
) -> torch.Tensor:
    """MaxViT's relative-position multi-head self-attention on ``x`` ``(B, G, P, D)`` (``G``
    windows of ``P`` tokens) with ``n_heads`` heads of ``head_dim`` (any inner width) and
    keys scaled by ``scale``; output ``(B, G, P, D_out)``.

    ``table``: ``(L, n_heads)`` bias table, ``index``: ``(P, P)`` indices into it; ``head_mul``:
    ``(n_heads * head_dim,)`` multiplies the heads' output before ``merge``."""
    b, g, p, _ = x.shape
    a = n_heads * head_dim
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = (t.reshape(b, g, p, n_heads, head_dim).permute(0, 1, 3, 2, 4)
               for t in qkv.split(a, dim=-1))
    bias = table[index.reshape(-1)].view(p, p, n_heads).permute(2, 0, 1).unsqueeze(0)
    attn = F.softmax(q.matmul((k * scale).transpose(-2, -1)) + bias, dim=-1)
    out = attn.matmul(v).permute(0, 1, 3, 2, 4).reshape(b, g, p, a)
    if head_mul is not None:
        out = out * head_mul.to(out.dtype)
    return F.linear(out, merge_weight, merge_bias)


class PrunedRelativePositionalMultiHeadAttention(nn.Module):
    """What a pruned MaxViT ``RelativePositionalMultiHeadAttention`` exports to: the same
    attention with ``n_heads`` heads of ``head_dim`` (not ``feat_dim // head_dim``), ``to_qkv``
    ``feat_dim -> 3 * A``, ``merge`` ``A -> out_dim``, keys scaled by ``scale_factor`` (the
    dense layer's); same parameter and buffer names."""

    def __init__(self, feat_dim: int, n_heads: int, head_dim: int, max_seq_len: int,
                 scale_factor: float, out_dim: int | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.n_heads, self.head_dim = n_heads, head_dim
        self.max_seq_len = max_seq_len
        self.size = int(round(max_seq_len ** 0.5))
        self.scale_factor = float(scale_factor)
        a = n_heads * head_dim
        self.to_qkv = nn.Linear(feat_dim, 3 * a, **kw)
        self.merge = nn.Linear(a, feat_dim if out_dim is None else out_dim, **kw)
        table = (2 * self.size - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, n_heads, **kw))
        self.register_buffer("relative_position_index",
                             torch.zeros(max_seq_len, max_seq_len, dtype=torch.long,
                                         device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relative_attention(x, self.to_qkv.weight, self.to_qkv.bias, self.merge.weight,
                                  self.merge.bias, self.relative_position_bias_table,
                                  self.relative_position_index, self.n_heads, self.head_dim,
                                  self.scale_factor)


class MaskedRelativePositionalMultiHeadAttention(MaskedLayer,
                                                 RelativePositionalMultiHeadAttention):
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention`` with masked input, output and
    heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        if mode == "dense":
            return RelativePositionalMultiHeadAttention.forward(self, x)
        heads, hd = self.n_heads, self.head_dim
        x, w_qkv, b_qkv, w_m, b_m, table, heads, head_mul = _masked_head_params(
            self, mode, x, self.to_qkv.in_features, heads, hd, self.to_qkv, self.merge,
            self.relative_position_bias_table)
        return relative_attention(x, w_qkv, b_qkv, w_m, b_m, table, self.relative_position_index,
                                  heads, hd, self.scale_factor, head_mul)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        """A plain ``RelativePositionalMultiHeadAttention`` when nothing was removed, else a
        :class:`PrunedRelativePositionalMultiHeadAttention` with the kept heads and channels."""
        head_keep = extra.get("heads")
        c, hd = self.to_qkv.in_features, self.head_dim
        a = self.n_heads * hd
        if all(k is None or k.numel() == n for k, n in (
                (head_keep, a), (in_keep, c), (out_keep, self.merge.out_features))):
            new = copy.deepcopy(self)  # a masked layer drops its gates when copied
            new.__class__ = RelativePositionalMultiHeadAttention
            return new
        heads = (torch.arange(self.n_heads) if head_keep is None
                 else _whole_heads(head_keep, hd, "export"))
        rows = None if head_keep is None else _head_rows(head_keep, a)
        w = self.to_qkv.weight
        new = PrunedRelativePositionalMultiHeadAttention(
            c if in_keep is None else in_keep.numel(), heads.numel(), hd, self.max_seq_len,
            self.scale_factor,
            out_dim=self.merge.out_features if out_keep is None else out_keep.numel(),
            device=w.device, dtype=w.dtype)
        new.to_qkv.weight.copy_(gather_kept_weight(w, rows, in_keep))
        new.to_qkv.bias.copy_(gather_kept(self.to_qkv.bias, rows, 0))
        new.merge.weight.copy_(gather_kept_weight(self.merge.weight, out_keep, head_keep))
        new.merge.bias.copy_(gather_kept(self.merge.bias, out_keep, 0))
        new.relative_position_bias_table.copy_(
            self.relative_position_bias_table.index_select(1, heads.to(w.device)))
        new.relative_position_index.copy_(self.relative_position_index)
        if not w.requires_grad:
            new.requires_grad_(False)
        return new


def _maxvit_info(m: nn.Module) -> LayerInfo:
    if type(m.to_qkv) is not nn.Linear or type(m.merge) is not nn.Linear \
            or m.to_qkv.bias is None or m.merge.bias is None:
        return LayerInfo("fixed", -1, "to_qkv/merge are not plain nn.Linear with a bias")
    if m.n_heads * m.head_dim != m.to_qkv.in_features:
        return LayerInfo("fixed", -1, "n_heads * head_dim differs from the input width")
    return LayerInfo("attention", -1)


def _maxvit_flops(m: nn.Module, info: LayerInfo,
                  flops_of: Callable[[str], int]) -> list[tuple[int, tuple[str, ...]]]:
    """``to_qkv`` (``in`` x ``heads``), the attention matmuls (``heads``), ``merge``
    (``heads`` x ``out``), as the counter counted them."""
    qkv, merge, total = flops_of("to_qkv"), flops_of("merge"), flops_of("")
    rest = total - qkv - merge
    if rest < 0:
        return [(total, ("heads",))]
    return [(qkv, ("in", "heads")), (rest, ("heads",)), (merge, ("heads", "out"))]


def _maxvit_importance(m: nn.Module, role: str) -> torch.Tensor:
    """As Swin's: per head, mean L1 of its q, k, v rows and ``merge`` columns."""
    if role == "out":
        return m.merge.weight.detach().float().abs().sum(1).cpu()
    a = m.n_heads * m.head_dim
    w = m.to_qkv.weight.detach().float().abs().sum(1).view(3, a).sum(0)
    w = w + m.merge.weight.detach().float().abs().sum(0)
    return w.view(m.n_heads, m.head_dim).mean(1).repeat_interleave(m.head_dim).cpu()


def _maxvit_heads(m: nn.Module) -> dict[str, tuple[int, int]]:
    return {"heads": (m.n_heads * m.head_dim, m.head_dim)}


_registry.register(LayerHandler(RelativePositionalMultiHeadAttention,
                                MaskedRelativePositionalMultiHeadAttention, _maxvit_info,
                                flop_parts=_maxvit_flops, importance=_maxvit_importance,
                                inner_groups=_maxvit_heads))


# ---------------------------------------------------------------------------- ConvNeXt's norm


class MaskedLayerNorm2d(MaskedLayerNorm, LayerNorm2d):
    """torchvision's ``LayerNorm2d`` (ConvNeXt): a ``nn.LayerNorm`` subclass whose forward
    permutes ``(N, C, H, W)`` to channels-last, normalises over ``C`` and permutes back, i.e.
    a layer norm over dim 1. Hard mode normalises over the kept channels; the export is a
    ``LayerNorm2d`` over them (``normalized_shape``, ``weight``, ``bias`` sliced in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        if keep is None:
            return LayerNorm2d.forward(self, x)
        return self._hard_ln(x.permute(0, 2, 3, 1), keep).permute(0, 3, 1, 2)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict) -> nn.Module:
        """A plain ``LayerNorm2d`` over the kept channels."""
        new = copy.deepcopy(self)  # a masked layer drops its gates when copied
        new.__class__ = LayerNorm2d
        if out_keep is not None:
            new.normalized_shape = (out_keep.numel(),)
            for name in ("weight", "bias"):
                p = new._parameters.get(name)
                if p is not None:
                    new._parameters[name] = nn.Parameter(
                        gather_kept(p, out_keep, 0).detach().clone(),
                        requires_grad=p.requires_grad)
        return new


def _layernorm2d_info(m: nn.Module) -> LayerInfo:
    if len(m.normalized_shape) == 1:
        return LayerInfo("layernorm", 1)
    return LayerInfo("fixed", 1, f"normalized_shape={tuple(m.normalized_shape)}")


_registry.register(LayerHandler(LayerNorm2d, MaskedLayerNorm2d, _layernorm2d_info))


# ---------------------------------------------------------------------------- ShuffleNetV2
class RoutedInvertedResidual(ShuffleInvertedResidual):
    """torchvision's ShuffleNetV2 block with its ``chunk(2)`` and channel shuffle routed by index
    (:class:`s2h.registry.Router`): the pruned stream holds each kept channel where the dense
    model's shuffle puts it, for any kept set -- the block's own code interleaves the kept
    channels by rank, which is right only when every group keeps all of them.

    ``s2h_split``: the kept channels of the stream's first half (a stride-1 block passes them
    on, the rest go to ``branch2``); ``s2h_order``: the shuffle as a gather of the concatenated
    kept channels. The export holds them (a plain int and a non-persistent buffer; saved in
    ``architecture.json``)."""

    s2h_split: int | None
    s2h_order: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            k = self.s2h_split
            out = torch.cat((x[:, :k], self.branch2(x[:, k:])), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return out.index_select(1, self.s2h_order.to(out.device))


def _shuffle_check(m: nn.Module, sites: list) -> str | None:
    """The shuffles and cuts of one call of ``InvertedResidual`` are its own: a stride-1 block
    cuts its input at the middle, then shuffles; a strided block only shuffles. The shuffle is
    a 2-group one (``channel_shuffle(out, 2)``)."""
    shuffles = [d for k, d in sites if k == "shuffle"]
    cuts = [d for k, d in sites if k == "cut"]
    if len(shuffles) != 1:
        return f"{len(shuffles)} channel shuffles in one call"
    sigma = shuffles[0]
    c = len(sigma)
    if c % 2 or list(sigma) != [j * (c // 2) + i for i in range(c // 2) for j in range(2)]:
        return "a channel shuffle of other than 2 groups"
    if m.stride == 1:
        if sorted(cuts) != [(0, c // 2), (c // 2, c)]:
            return f"the input is cut into {sorted(cuts)}, not its two halves"
    elif cuts:
        return "a strided block that cuts its input"
    return None


_registry.register_router(_registry.Router(ShuffleInvertedResidual, RoutedInvertedResidual,
                                           _shuffle_check))
