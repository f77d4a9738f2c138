"""``torch.nn.MultiheadAttention`` pruned by whole heads.

The layer is opaque to the graph analysis (like timm's ``Attention``, :mod:`s2h.timm_support`):
its groups are

* ``in``: the channels of the query (and of the key and value when q, k and v share the packed
  ``in_proj_weight``: self-attention, or cross-attention whose key / value have the query's
  width; the three inputs then join one group);
* ``heads``: ``num_heads * head_dim`` channels in head-major order, granularity ``head_dim``:
  the rows of q, k and v of each head (and their biases) and the matching input columns of
  ``out_proj``. ``head_dim``, hence the attention scale ``head_dim ** -0.5``, never changes;
* ``out``: the rows of ``out_proj`` (the residual stream in a transformer).

With separate q / k / v weights (``kdim`` or ``vdim`` != ``embed_dim``) the key and value are
kept at full width (only the query's columns follow ``in``); their rows still follow the heads.
``add_bias_kv`` / ``add_zero_attn`` layers are kept whole (a warning names them).

Paths (METHOD §3): soft: the inputs ``⊙`` the ``in`` soft mask, the attention output
``⊙`` the heads soft mask before ``out_proj``, at full width; hard: the kept heads' rows of
q, k, v and the kept input columns, attention over the kept heads, ``out_proj`` on the kept head
channels and the kept output rows. A per-head 3-D ``attn_mask`` (``(N * num_heads, L, S)``) is
indexed by the kept heads.

Export. ``nn.MultiheadAttention`` cannot hold fewer heads of the same ``head_dim``: it derives
``head_dim = embed_dim // num_heads`` and needs the inner width ``num_heads * head_dim`` to be
``embed_dim``, the query's and the output's width, which stays the residual width. So a layer
with heads dropped (or its input / output narrowed) exports as :class:`PrunedMultiheadAttention`:
a small plain module (torch only, no gates) with ``nn.MultiheadAttention``'s call signature,
return values and parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), whose
inner width may differ from ``embed_dim``. A layer with nothing removed exports as a plain
``nn.MultiheadAttention``.

FLOPs: the in- and out-projections are computed from the token counts of the calls the
analysis saw; the rest of what torch's counter counted in the call (the attention matmuls:
``bmm`` with ``need_weights=True``; ``scaled_dot_product_attention``, which the counter counts on
CUDA only) scales with the heads.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import registry as _registry
from .nn import MaskedLayer, gather_kept, gather_kept_weight
from .registry import LayerCall, LayerHandler, LayerInfo

__all__ = ["MaskedMultiheadAttention", "PrunedMultiheadAttention", "multi_head_attention"]


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask, as torch's MHA does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf"))


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    in_proj: tuple[torch.Tensor, ...],
    in_bias: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    *,
    batch_first: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    mask_heads: torch.Tensor | None = None,
    head_mul: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention as ``nn.MultiheadAttention`` computes it, with an inner width
    ``num_heads * head_dim`` that need not be the query's width.

    query ``(L, N, E)`` (``(N, L, E)`` if ``batch_first``, ``(L, E)`` unbatched), key / value
    ``(S, N, E_k)`` / ``(S, N, E_v)``; ``in_proj``: the packed ``(3 * A, E)`` weight, or the
    three weights of q, k and v (``A = num_heads * head_dim``); ``in_bias`` ``(3 * A,)``;
    ``out_weight`` ``(E_out, A)``. ``mask_heads``: the heads of a per-head 3-D ``attn_mask``
    (``(N * H, L, S)`` for the ``H`` heads of the layer it was written for) that these
    ``num_heads`` heads are; ``head_mul``: ``(A,)`` multiplies the attention output before the
    out-projection (the pruner's heads mask). Returns ``(output, weights or None)``.
    """
    unbatched = query.dim() == 2
    if unbatched:  # one sequence: a batch of one, batch first
        to_nle = lambda t: t.unsqueeze(0)  # noqa: E731
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        to_nle = lambda t: t  # noqa: E731
    else:  # work batch first: (N, L, E)
        to_nle = lambda t: t.transpose(0, 1)  # noqa: E731
    q_in = to_nle(query)
    k_in = q_in if key is query else to_nle(key)
    v_in = q_in if value is query else (k_in if value is key else to_nle(value))
    bsz, tgt_len, _ = q_in.shape
    src_len = k_in.shape[1]
    a = num_heads * head_dim
    b_q, b_k, b_v = (None, None, None) if in_bias is None else in_bias.split(a)
    if len(in_proj) == 1 and q_in is k_in and k_in is v_in:  # self-attention: one matmul
        q, k, v = F.linear(q_in, in_proj[0], in_bias).split(a, -1)
    else:
        w_q, w_k, w_v = in_proj[0].split(a) if len(in_proj) == 1 else in_proj
        q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)
    q = q.view(bsz, tgt_len, num_heads, head_dim).transpose(1, 2)
    k = k.view(bsz, src_len, num_heads, head_dim).transpose(1, 2)
    v = v.view(bsz, src_len, num_heads, head_dim).transpose(1, 2)

    key_padding_mask = _float_mask(key_padding_mask, q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                           "nn.MultiheadAttention)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint is passed on to scaled_dot_product_attention
    else:
        attn_mask = _float_mask(attn_mask, q.dtype)
        is_causal = False
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
        else:  # (N * H, L, S) for the H heads of the layer the mask was made for
            attn_mask = attn_mask.view(bsz, -1, tgt_len, src_len)
            if mask_heads is not None:
                attn_mask = attn_mask.index_select(1, mask_heads.to(attn_mask.device))
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm

    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = scores.softmax(-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.transpose(1, 2).reshape(bsz, tgt_len, a)
    if head_mul is not None:
        out = out * head_mul.to(out.dtype)
    out = F.linear(out, out_weight, out_bias)
    if unbatched:
        out = out.squeeze(0)
        if weights is not None:
            weights = weights.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, weights


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim`` free of ``embed_dim``: what a
    pruned ``nn.MultiheadAttention`` exports to (see the module docstring for why).

    Same call (``query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal``), same return ``(output, weights or None)``, same
    parameter names. ``embed_dim``: the query's width; ``out_dim``: the output's (default
    ``embed_dim``). ``source_heads``: the heads of the original layer these are, so that a
    per-head 3-D ``attn_mask`` written for the original ``source_num_heads`` heads still applies.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, out_dim: int | None = None,
                 batch_first: bool = False, dropout: float = 0.0,
                 source_heads: Sequence[int] | None = None, source_num_heads: int | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.out_dim = embed_dim if out_dim is None else out_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.source_heads = None if source_heads is None else tuple(int(h) for h in source_heads)
        self.source_num_heads = source_num_heads
        a = num_heads * head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * a, embed_dim, **kw))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(a, embed_dim, **kw))
            self.k_proj_weight = nn.Parameter(torch.empty(a, self.kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(a, self.vdim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * a, **kw)) if bias else None
        self.out_proj = nn.Linear(a, self.out_dim, bias=bias, **kw)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask_heads = None
        if attn_mask is not None and attn_mask.dim() == 3 and self.source_heads is not None:
            mask_heads = torch.tensor(self.source_heads, device=attn_mask.device)
        return multi_head_attention(
            query, key, value, _in_weights(self), self.in_proj_bias, self.out_proj.weight,
            self.out_proj.bias, self.num_heads, self.head_dim, batch_first=self.batch_first,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, mask_heads=mask_heads)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, out_dim={self.out_dim}, "
                f"batch_first={self.batch_first}")


def _in_weights(m: nn.Module) -> tuple[torch.Tensor, ...]:
    """The input projection weights of an MHA-like module: the packed q/k/v weight, or the
    three separate ones when key / value widths differ."""
    if m._qkv_same_embed_dim:
        return (m.in_proj_weight,)
    return (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)


def _whole_heads(keep: torch.Tensor, hd: int, name: str) -> torch.Tensor:
    """``(h,)`` kept head indices from the kept channels ``keep`` (``(h*hd,)``, ascending)."""
    heads = keep[::hd] // hd
    expect = (heads[:, None] * hd + torch.arange(hd, device=keep.device)).flatten()
    if keep.numel() % hd or not torch.equal(keep, expect):
        raise RuntimeError(f"{name}: the kept channels of the heads group are not whole heads "
                           f"(head_dim={hd}); was the gate's importance order changed by hand?")
    return heads


def _head_rows(head_keep: torch.Tensor, a: int) -> torch.Tensor:
    """Rows of the packed ``(3 * a, E)`` q / k / v weight of the kept head channels."""
    return torch.cat([head_keep + i * a for i in range(3)])


class MaskedMultiheadAttention(MaskedLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with masked input, output and heads (module docstring)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mode = self._mode()
        if mode == "dense":
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal)
        rt = self._s2h.runtime
        in_gate, out_gate, head_gate = self.in_gate, self.out_gate, self.extra_gate("heads")
        hd, heads, a = self.head_dim, self.num_heads, self.embed_dim
        packed = self._qkv_same_embed_dim
        w_in, b_in = _in_weights(self), self.in_proj_bias
        w_out, b_out = self.out_proj.weight, self.out_proj.bias
        in_keep = out_keep = head_keep = head_index = head_mul = None
        if mode == "soft":
            if in_gate is not None:
                self._check_width(query, -1, self.embed_dim, "query")
                query, key, value = self._scaled(query, key, value,
                                                 rt.state(in_gate).soft_mask, packed)
            if head_gate is not None:
                head_mul = rt.state(head_gate).soft_mask
        else:
            if in_gate is not None:
                st = rt.state(in_gate)
                self._check_width(query, -1, st.keep.numel(), "query")
                query, key, value = self._scaled(query, key, value, st.hard_mask, packed)
                in_keep = st.keep
            if out_gate is not None:
                out_keep = rt.state(out_gate).keep
            if head_gate is not None:
                st = rt.state(head_gate)
                head_keep, head_mul = st.keep, st.hard_mask
                head_index = _whole_heads(head_keep, hd, self._s2h.name)
                heads = head_index.numel()
            if packed:
                rows = None if head_keep is None else _head_rows(head_keep, a)
                w_in = (gather_kept_weight(w_in[0], rows, in_keep),)
            else:
                w_in = (gather_kept_weight(w_in[0], head_keep, in_keep),
                        *(gather_kept(w, head_keep, 0) for w in w_in[1:]))
            if b_in is not None and head_keep is not None:
                b_in = gather_kept(b_in, _head_rows(head_keep, a), 0)
            w_out = gather_kept_weight(w_out, out_keep, head_keep)
            if b_out is not None:
                b_out = gather_kept(b_out, out_keep, 0)
        return multi_head_attention(
            query, key, value, w_in, b_in, w_out, b_out, heads, hd, batch_first=self.batch_first,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, mask_heads=head_index,
            head_mul=head_mul)

    @staticmethod
    def _scaled(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, packed: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs ``⊙ mask`` (the key and value only when they share the query's group),
        keeping self-attention's ``query is key is value``."""
        q = query * mask.to(query.dtype)
        if not packed:
            return q, key, value
        k = q if key is query else key * mask.to(key.dtype)
        v = q if value is query else (k if value is key else value * mask.to(value.dtype))
        return q, k, v

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict[str, torch.Tensor]) -> nn.Module:
        """A plain ``nn.MultiheadAttention`` when nothing was removed, else a
        :class:`PrunedMultiheadAttention` with the kept heads and channels only."""
        head_keep = extra.get("heads")
        a, hd = self.embed_dim, self.head_dim
        full = all(k is None or k.numel() == n for k, n in (
            (head_keep, a), (in_keep, a), (out_keep, self.out_proj.out_features)))
        if full:
            new = copy.deepcopy(self)  # a masked layer drops its gates when copied
            new.__class__ = nn.MultiheadAttention
            return new
        heads = (torch.arange(self.num_heads) if head_keep is None
                 else _whole_heads(head_keep, hd, "export"))
        rows = None if head_keep is None else _head_rows(head_keep, a)
        w = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        new = PrunedMultiheadAttention(
            w.shape[1] if in_keep is None else in_keep.numel(), heads.numel(), hd,
            bias=self.in_proj_bias is not None,
            kdim=None if self._qkv_same_embed_dim else self.kdim,
            vdim=None if self._qkv_same_embed_dim else self.vdim,
            out_dim=self.out_proj.out_features if out_keep is None else out_keep.numel(),
            batch_first=self.batch_first, dropout=self.dropout, source_heads=heads.tolist(),
            source_num_heads=self.num_heads, device=w.device, dtype=w.dtype)
        if self._qkv_same_embed_dim:
            new.in_proj_weight.copy_(gather_kept_weight(self.in_proj_weight, rows, in_keep))
        else:
            new.q_proj_weight.copy_(gather_kept_weight(self.q_proj_weight, head_keep, in_keep))
            new.k_proj_weight.copy_(gather_kept(self.k_proj_weight, head_keep, 0))
            new.v_proj_weight.copy_(gather_kept(self.v_proj_weight, head_keep, 0))
        if self.in_proj_bias is not None:
            new.in_proj_bias.copy_(gather_kept(self.in_proj_bias, rows, 0))
        new.out_proj.weight.copy_(gather_kept_weight(self.out_proj.weight, out_keep, head_keep))
        if self.out_proj.bias is not None:
            new.out_proj.bias.copy_(gather_kept(self.out_proj.bias, out_keep, 0))
        if not w.requires_grad:  # a frozen layer stays frozen
            new.requires_grad_(False)
        return new


# ---------------------------------------------------------------------------- the handler

#: token counts ``(query, key, value)`` of each call the graph analysis saw, per layer, for
#: :func:`_mha_flops` (read once, right after the analysis's run). Known gap: a layer passed in
#: ``ignore=`` is recorded but never read, so a second analysis of the same model would count
#: its calls twice; a ``flop_parts`` that received the layer's recorded calls would remove this.
_CALLS: weakref.WeakKeyDictionary[nn.Module, list[tuple[int, int, int]]] = \
    weakref.WeakKeyDictionary()


def _mha_info(m: nn.Module) -> LayerInfo:
    if m.bias_k is not None or m.add_zero_attn:
        what = "add_bias_kv" if m.bias_k is not None else "add_zero_attn"
        return LayerInfo("fixed", -1, f"{what}=True is not supported")
    if type(m.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return LayerInfo("fixed", -1, "out_proj is not a plain nn.Linear")
    return LayerInfo("attention", -1)


def _mha_call(m: nn.Module, args: tuple, out: object) -> LayerCall | None:
    """query = the ``in`` input; key and value join it (packed q/k/v weight) or stay whole;
    the output is the first element of ``(output, weights)``."""
    if len(args) < 3 or not all(isinstance(t, torch.Tensor) for t in args[:3]):
        return None
    if not isinstance(out, tuple) or not isinstance(out[0], torch.Tensor):
        return None
    q, k, v = args[:3]
    _CALLS.setdefault(m, []).append(tuple(t.numel() // t.shape[-1] for t in (q, k, v)))
    others = tuple(t for t in (k, v) if t is not q)
    if m._qkv_same_embed_dim:
        return LayerCall(q, out[0], same=others)
    return LayerCall(q, out[0], whole=others)


def _mha_flops(m: nn.Module, info: LayerInfo,
               flops_of: Callable[[str], int]) -> list[tuple[int, tuple[str, ...]]]:
    """The layer's counted FLOPs: q/k/v projections (``in`` x ``heads``; ``heads`` alone for
    the key and value of separate weights), the attention (``heads``) and ``out_proj``
    (``heads`` x ``out``)."""
    calls = _CALLS.pop(m, [])
    e, a = m.embed_dim, m.embed_dim
    q_proj = sum(2 * nq * e * a for nq, _, _ in calls)
    kv_proj = sum(2 * (nk * m.kdim + nv * m.vdim) * a for _, nk, nv in calls)
    out = sum(2 * nq * a * m.out_proj.out_features for nq, _, _ in calls)
    total = flops_of("")
    rest = total - q_proj - kv_proj - out
    if rest < 0:  # the counter did not see the projections: nothing to split
        return [(total, ("heads",))]
    if m._qkv_same_embed_dim:
        parts = [(q_proj + kv_proj, ("in", "heads"))]
    else:
        parts = [(q_proj, ("in", "heads")), (kv_proj, ("heads",))]
    return [*parts, (rest, ("heads",)), (out, ("heads", "out"))]


def _mha_importance(m: nn.Module, role: str) -> torch.Tensor:
    """``heads``: per head, the mean over its channels of the L1 norms of its q, k, v rows plus
    its ``out_proj`` input columns, repeated ``head_dim`` times (equal scores keep heads whole);
    ``out``: the L1 norms of the ``out_proj`` rows."""
    if role == "out":
        return m.out_proj.weight.detach().float().abs().sum(1).cpu()
    a, hd = m.embed_dim, m.head_dim
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight.detach().float().abs().sum(1).view(3, a).sum(0)
    else:
        w = sum(p.detach().float().abs().sum(1)
                for p in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    w = w + m.out_proj.weight.detach().float().abs().sum(0)
    return w.view(m.num_heads, hd).mean(1).repeat_interleave(hd).cpu()


def _mha_heads(m: nn.Module) -> dict[str, tuple[int, int]]:
    return {"heads": (m.embed_dim, m.head_dim)}


_registry.register(LayerHandler(nn.MultiheadAttention, MaskedMultiheadAttention, _mha_info,
                                flop_parts=_mha_flops, importance=_mha_importance,
                                inner_groups=_mha_heads, call=_mha_call))
