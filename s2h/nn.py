"""Drop-in masked layers (METHOD §3) and the runtime that tells them which path to compute.

* :class:`MaskedConv2d` / :class:`MaskedLinear` subclass ``nn.Conv2d`` / ``nn.Linear``: same
  constructor, same ``state_dict`` keys, and the parent's output when no gate is attached (or the
  runtime mode is ``"dense"``).
* With gates attached (by :class:`s2h.S2HPruner`, or by hand with :meth:`attach_gates`):

  - ``"soft"`` mode: ``y = layer(x ⊙ soft_mask_in)`` at full width; the mask acts on the *input*
    channels, i.e. after the producer's normalisation and activation, where BatchNorm cannot
    cancel it;
  - ``"hard"`` mode: ``x`` holds only the kept input channels;
    ``y = layer_kept(x ⊙ hard_mask_in)`` with the weight block ``W[out_keep][:, in_keep]``
    gathered by the channel ops: kept channels only, never a dense multiply by zeros. The
    straight-through ``hard_mask_in`` has value 1 and carries the gap loss's gradient to the gates.
* :class:`MaskedBatchNorm2d` / :class:`MaskedLayerNorm` slice their affine parameters to the kept
  channels in hard mode; the BatchNorm keeps separate running statistics for the hard network
  (``hard_running_mean`` / ``hard_running_var``), so the hard network in eval mode is exactly the
  exported model (METHOD §5).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as _ops
from . import registry as _registry
from .gates import ChannelGate
from .registry import LayerHandler, LayerInfo
from .runtime import Binding, GateRuntime, RepeatedGate

__all__ = [
    "ChannelGate",
    "GateRuntime",
    "MaskedBatchNorm2d",
    "MaskedConv2d",
    "MaskedGroupNorm",
    "MaskedLayerNorm",
    "MaskedLinear",
    "gather_kept",
    "gather_kept_weight",
    "soft_masked",
    "straight_through",
]


def gather_kept(x: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``x.index_select(dim, keep)`` through the channel ops (differentiable); ``None`` keeps
    every channel and costs nothing."""
    return x if keep is None else _ops.gather_channels(x, keep, dim)


def gather_kept_weight(w: torch.Tensor, out_keep: torch.Tensor | None,
                       in_keep: torch.Tensor | None) -> torch.Tensor:
    """``w[out_keep][:, in_keep]`` for a ``(C_out, C_in, ...)`` weight; ``None`` keeps all."""
    if out_keep is None:
        return gather_kept(w, in_keep, 1)
    if in_keep is None:
        return gather_kept(w, out_keep, 0)
    return _ops.gather_weight(w, out_keep, in_keep)


def gather_qkv_out(w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, w_out: torch.Tensor,
                   b_out: torch.Tensor | None, rows: torch.Tensor | None,
                   in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   head_keep: torch.Tensor | None) -> tuple:
    """The kept blocks of an attention's packed q / k / v projection (rows ``rows``, inputs
    ``in_keep``) and of its output projection (rows ``out_keep``, inputs ``head_keep``);
    ``(w_qkv, b_qkv, w_out, b_out)``, a ``None`` bias staying ``None``."""
    w_qkv = gather_kept_weight(w_qkv, rows, in_keep)
    if b_qkv is not None:
        b_qkv = gather_kept(b_qkv, rows, 0)
    w_out = gather_kept_weight(w_out, out_keep, head_keep)
    if b_out is not None:
        b_out = gather_kept(b_out, out_keep, 0)
    return w_qkv, b_qkv, w_out, b_out


class MaskedLayer:
    """Common gate plumbing of the masked layers."""

    _s2h: Binding | None = None

    def attach_gates(
        self,
        runtime: GateRuntime,
        in_gate: ChannelGate | RepeatedGate | None,
        out_gate: ChannelGate | None,
        name: str = "",
        extra: dict[str, ChannelGate | None] | None = None,
    ) -> None:
        """Bind this layer to the gate of its input channels and the gate of its output channels
        (and, for layers with inner groups such as attention heads, ``extra`` gates by role).
        A linear layer fed a flattened ``C x h x w`` map gets a :class:`RepeatedGate`: its
        input columns are the group's channels, each repeated ``h * w`` times.

        Gates are *not* registered as submodules, so ``state_dict`` keys stay the parent's.
        """
        object.__setattr__(self, "_s2h", Binding(runtime, in_gate, out_gate, name, extra))

    def release(self) -> None:
        """Undo the pruner's swap: no gates, and the plain class again (the registry's)."""
        object.__setattr__(self, "_s2h", None)
        self.__class__ = _registry.plain_class(type(self))

    def extra_gate(self, role: str) -> ChannelGate | None:
        return None if self._s2h is None else self._s2h.extra.get(role)

    @property
    def in_gate(self) -> ChannelGate | RepeatedGate | None:
        return None if self._s2h is None else self._s2h.in_gate

    @property
    def out_gate(self) -> ChannelGate | None:
        return None if self._s2h is None else self._s2h.out_gate

    def _mode(self) -> str:
        return "dense" if self._s2h is None else self._s2h.runtime.mode

    def _hard_keep(self) -> torch.Tensor | None:
        """The kept channels of a norm layer's group in hard mode; None in any other case (the
        layer then computes its parent's forward)."""
        gate = self.out_gate
        if gate is None or self._mode() != "hard":
            return None
        return self._s2h.runtime.state(gate).keep

    def kept_weight_bias(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W[out_keep][:, in_keep]`` and ``bias[out_keep]`` (``None`` keeps every channel)."""
        weight = gather_kept_weight(self.weight, out_keep, in_keep)
        bias = None if self.bias is None else gather_kept(self.bias, out_keep, 0)
        return weight, bias

    def _check_width(self, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
        if x.shape[dim] != expected:
            name = self._s2h.name if self._s2h is not None else type(self).__name__
            raise RuntimeError(
                f"{name}: {what} has {x.shape[dim]} channels in dim {dim}, expected {expected}. "
                "In hard mode every layer must receive only the kept channels; a module between "
                "two pruned layers that changes channels is not supported - pass it (or the "
                "layers around it) in ignore=[...]."
            )

    def __deepcopy__(self, memo):
        # A copy never shares the runtime/gates of the original (export copies the model).
        binding = self._s2h
        object.__setattr__(self, "_s2h", None)
        try:
            cls = type(self)
            new = cls.__new__(cls)
            memo[id(self)] = new
            for k, v in self.__dict__.items():
                new.__dict__[k] = copy.deepcopy(v, memo)
            return new
        finally:
            object.__setattr__(self, "_s2h", binding)


def _channel_view(mask: torch.Tensor, ndim: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return mask.to(dtype).view(shape)


class _SoftMask(torch.autograd.Function):
    """``x ⊙ mask`` along ``dim``; the backward computes ``grad ⊙ mask`` and the mask's
    ``Σ grad ⊙ x`` in one pass (:func:`s2h.ops.channel_mask_backward`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim % x.ndim
        ctx.save_for_backward(x if mask.requires_grad else None, mask)
        return x * _channel_view(mask, x.ndim, ctx.dim, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, mask = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return grad * _channel_view(mask, grad.ndim, ctx.dim, grad.dtype), None, None
        gx, gm = _ops.channel_mask_backward(grad, x, mask.to(x.dtype), ctx.dim,
                                            need_grad_x=ctx.needs_input_grad[0],
                                            grad_mask_dtype=mask.dtype)
        return gx, gm, None


class _StraightThrough(torch.autograd.Function):
    """``x ⊙ hard_mask`` along ``dim`` for a straight-through mask (value 1): the forward
    passes ``x`` through without a multiply; the backward gives ``x`` the output gradient as
    it is and the mask ``Σ grad ⊙ x`` over every other dim (what the multiply's backward
    gives, without its activation-sized ``grad ⊙ mask``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim % x.ndim
        ctx.save_for_backward(x, mask)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, mask = ctx.saved_tensors
        grad_mask = None
        if ctx.needs_input_grad[1]:
            _, gm = _ops.channel_mask_backward(grad, x, mask.to(x.dtype), ctx.dim,
                                               need_grad_x=False, grad_mask_dtype=mask.dtype)
            grad_mask = gm
        return grad, grad_mask, None


def soft_masked(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` times the relaxed mask ``mask`` (``(C,)``) along ``dim``, with the one-pass
    backward of :class:`_SoftMask` when the mask takes a gradient (a plain multiply
    otherwise)."""
    if not (mask.requires_grad and torch.is_grad_enabled()):
        return x * _channel_view(mask, x.ndim, dim % x.ndim, x.dtype)
    return _SoftMask.apply(x, mask, dim)


def straight_through(x: torch.Tensor, hard_mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` scaled along ``dim`` by the straight-through mask ``hard_mask`` (``(k,)``, value 1:
    :meth:`ChannelGate.hard_mask`): the value of ``x``, the gradient of the multiply. Without
    gradients to ``hard_mask`` (the freeze phase) this is ``x`` itself."""
    if not (hard_mask.requires_grad and torch.is_grad_enabled()):
        return x
    return _StraightThrough.apply(x, hard_mask, dim)


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input channels are masked (soft) or gathered (hard).

    Input ``x``: ``(N, C_in, H, W)`` (any memory format); output ``(N, C_out, H', W')``.
    Depthwise convolutions (``groups == in_channels == out_channels``) belong to one group: their
    input and output gate are the same, and the hard layer has ``groups = k``. So do grouped
    convolutions with ``in_channels == out_channels`` (ResNeXt's, RegNet's): their group is
    kept in whole conv groups of ``c = in_channels // groups`` channels (the gate's divisor is a
    multiple of ``c`` and its importance order is constant per conv group, see
    :attr:`s2h.registry.LayerInfo.block`), and the hard layer has ``groups = k // c``.
    """

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def passes_group(self) -> bool:
        """A depthwise or grouped conv with as many output as input channels: its input and
        output channels are one group, pruned in whole conv groups."""
        return self.groups > 1 and self.in_channels == self.out_channels

    def _kept_groups(self, keep: torch.Tensor) -> int:
        """The conv groups of the kept channels ``keep`` (whole conv groups, ascending)."""
        c = self.in_channels // self.groups
        if keep.numel() % c:
            name = self._s2h.name if self._s2h is not None else type(self).__name__
            raise RuntimeError(f"{name}: {keep.numel()} kept channels are not whole conv groups "
                               f"of {c} (groups={self.groups})")
        return keep.numel() // c

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the kept channels only (a depthwise or grouped conv that
        passes its group through: ``in_keep``, whole conv groups)."""
        dev, dt = self.weight.device, self.weight.dtype
        if self.passes_group:
            k = self.in_channels if in_keep is None else in_keep.numel()
            groups = self.groups if in_keep is None else self._kept_groups(in_keep)
            if in_keep is not None:
                c = self.in_channels // self.groups
                blocks = in_keep.view(groups, c).cpu()
                if not bool(((blocks - blocks[:, :1]) == torch.arange(c)).all()
                            and (blocks[:, 0] % c == 0).all()):
                    raise RuntimeError(f"the kept channels of a grouped conv (groups="
                                       f"{self.groups}) are not whole conv groups of {c}")
            new = nn.Conv2d(k, k, self.kernel_size, self.stride, self.padding, self.dilation,
                            groups, self.bias is not None, self.padding_mode, device=dev,
                            dtype=dt)
            w = gather_kept(self.weight, in_keep, 0)
            b = None if self.bias is None else gather_kept(self.bias, in_keep, 0)
        else:
            cin = self.in_channels if in_keep is None else in_keep.numel()
            cout = self.out_channels if out_keep is None else out_keep.numel()
            new = nn.Conv2d(cin, cout, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.groups, self.bias is not None, self.padding_mode, device=dev,
                            dtype=dt)
            w, b = self.kept_weight_bias(in_keep, out_keep)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        return new

    def _conv(self, x, weight, bias, groups):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        if mode == "dense":
            return super().forward(x)
        rt, in_gate, out_gate = self._s2h.runtime, self._s2h.in_gate, self._s2h.out_gate
        if mode == "soft":
            if in_gate is not None:
                self._check_width(x, 1, self.in_channels, "input")
                x = soft_masked(x, rt.state(in_gate).soft_mask, 1)
            return super().forward(x)
        # hard
        in_state = rt.state(in_gate) if in_gate is not None else None
        out_state = rt.state(out_gate) if out_gate is not None else None
        if in_state is not None:
            self._check_width(x, 1, in_state.keep.numel(), "input")
            x = straight_through(x, in_state.hard_mask, 1)
        if self.passes_group:
            if in_state is None:
                return super().forward(x)
            keep = in_state.keep
            weight = gather_kept(self.weight, keep, 0)
            bias = None if self.bias is None else gather_kept(self.bias, keep, 0)
            return self._conv(x, weight, bias, self._kept_groups(keep))
        weight, bias = self.kept_weight_bias(
            None if in_state is None else in_state.keep,
            None if out_state is None else out_state.keep,
        )
        return self._conv(x, weight, bias, self.groups)


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` whose input features (last dim) are masked (soft) or gathered (hard).

    Input ``x``: ``(..., in_features)``; output ``(..., out_features)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        if mode == "dense":
            return super().forward(x)
        rt, in_gate, out_gate = self._s2h.runtime, self._s2h.in_gate, self._s2h.out_gate
        if mode == "soft":
            if in_gate is not None:
                self._check_width(x, -1, self.in_features, "input")
                x = soft_masked(x, rt.state(in_gate).soft_mask, -1)
            return super().forward(x)
        in_state = rt.state(in_gate) if in_gate is not None else None
        out_state = rt.state(out_gate) if out_gate is not None else None
        if in_state is not None:
            self._check_width(x, -1, in_state.keep.numel(), "input")
            x = straight_through(x, in_state.hard_mask, -1)
        weight, bias = self.kept_weight_bias(
            None if in_state is None else in_state.keep,
            None if out_state is None else out_state.keep,
        )
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict) -> nn.Linear:
        """A plain ``nn.Linear`` with the kept features only."""
        cin = self.in_features if in_keep is None else in_keep.numel()
        cout = self.out_features if out_keep is None else out_keep.numel()
        new = nn.Linear(cin, cout, self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        w, b = self.kept_weight_bias(in_keep, out_keep)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        return new


class MaskedBatchNorm2d(MaskedLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in hard mode, normalises only the kept channels of its group.

    The hard network has its own running statistics (buffers ``hard_running_mean``,
    ``hard_running_var``, ``hard_num_batches_tracked``), created by :meth:`add_hard_stats` from
    the current ones; only the kept entries are updated by a hard training forward.
    """

    #: the hard network's running statistics, copies of these buffers
    HARD_STATS = {"hard_running_mean": "running_mean", "hard_running_var": "running_var",
                  "hard_num_batches_tracked": "num_batches_tracked"}

    def add_hard_stats(self) -> None:
        if not self.track_running_stats or hasattr(self, "hard_running_mean"):
            return
        for hard, own in self.HARD_STATS.items():
            self.register_buffer(hard, getattr(self, own).detach().clone())

    def release(self) -> None:
        """As :meth:`MaskedLayer.release`, and the hard running statistics are dropped."""
        for hard in self.HARD_STATS:
            self._buffers.pop(hard, None)
        super().release()

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict) -> nn.BatchNorm2d:
        """A plain ``nn.BatchNorm2d`` of the kept channels, with the hard network's running
        statistics (METHOD §5)."""
        keep = out_keep
        k = self.num_features if keep is None else keep.numel()
        ref = self.running_mean if self.running_mean is not None else self.weight
        new = nn.BatchNorm2d(k, self.eps, self.momentum, self.affine, self.track_running_stats,
                             device=ref.device if ref is not None else None,
                             dtype=ref.dtype if ref is not None else None)

        def sl(t: torch.Tensor) -> torch.Tensor:
            return t if keep is None else t.index_select(0, keep)

        if self.affine:
            new.weight.copy_(sl(self.weight))
            new.bias.copy_(sl(self.bias))
        if self.track_running_stats:
            use_hard = keep is not None and hasattr(self, "hard_running_mean")
            new.running_mean.copy_(sl(self.hard_running_mean if use_hard else self.running_mean))
            new.running_var.copy_(sl(self.hard_running_var if use_hard else self.running_var))
            new.num_batches_tracked.copy_(
                self.hard_num_batches_tracked if use_hard else self.num_batches_tracked)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        return super().forward(x) if keep is None else self._hard_bn(x, keep)

    def _hard_bn(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Batch norm of the kept channels ``keep`` (``(k,)``) of ``x`` ``(N, k, H, W)``."""
        self._check_width(x, 1, keep.numel(), "input")
        weight = None if self.weight is None else gather_kept(self.weight, keep, 0)
        bias = None if self.bias is None else gather_kept(self.bias, keep, 0)
        if not self.track_running_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if self.training:
            self.hard_num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.hard_num_batches_tracked)
            else:
                factor = self.momentum
            mean = self.hard_running_mean.index_select(0, keep)
            var = self.hard_running_var.index_select(0, keep)
            y = F.batch_norm(x, mean, var, weight, bias, True, factor, self.eps)
            with torch.no_grad():  # F.batch_norm updated the compact copies in place
                self.hard_running_mean.index_copy_(0, keep, mean)
                self.hard_running_var.index_copy_(0, keep, var)
            return y
        mean = self.hard_running_mean.index_select(0, keep)
        var = self.hard_running_var.index_select(0, keep)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


class MaskedLayerNorm(MaskedLayer, nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim; in hard mode it normalises over the kept channels.

    Note: in soft mode the statistics run over all ``C`` channels while the exported layer uses
    the kept ones; the soft network is a proxy here (exact for BatchNorm, not for LayerNorm).
    """

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict) -> nn.LayerNorm:
        """A plain ``nn.LayerNorm`` over the kept channels."""
        keep = out_keep
        k = self.normalized_shape[0] if keep is None else keep.numel()
        has_bias = self.bias is not None
        ref = self.weight
        new = nn.LayerNorm(k, self.eps, self.elementwise_affine, bias=has_bias,
                           device=ref.device if ref is not None else None,
                           dtype=ref.dtype if ref is not None else None)
        if self.elementwise_affine:
            new.weight.copy_(gather_kept(self.weight, keep, 0).detach())
            if has_bias:
                new.bias.copy_(gather_kept(self.bias, keep, 0).detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        return super().forward(x) if keep is None else self._hard_ln(x, keep)

    def _hard_ln(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Layer norm over the kept channels: ``x`` ``(..., k)`` -> ``(..., k)``."""
        self._check_width(x, -1, keep.numel(), "input")
        weight = None if self.weight is None else gather_kept(self.weight, keep, 0)
        bias = None if self.bias is None else gather_kept(self.bias, keep, 0)
        return F.layer_norm(x, (keep.numel(),), weight, bias, self.eps)


class MaskedGroupNorm(MaskedLayer, nn.GroupNorm):
    """``nn.GroupNorm`` over dim 1 of ``(N, C, *)``. Its group is kept and dropped in whole
    norm groups of ``c = num_channels // num_groups`` channels (:attr:`LayerInfo.block`, as a
    grouped conv's): the statistics of a norm group are over its own channels only, so the hard
    layer -- a group norm of the kept norm groups, ``num_groups = k // c`` -- computes on every
    kept channel exactly what the full layer does (soft, hard and exported layers agree).
    With ``num_groups = 1`` (a layer norm over ``(C, *)``: MobileViT v2's) any channels may go,
    as for :class:`MaskedLayerNorm`: the hard layer normalises over the kept ones (the soft
    network is then a proxy)."""

    def _kept_norm_groups(self, keep: torch.Tensor) -> int:
        if self.num_groups == 1:  # one norm group over every channel: over the kept ones
            return 1
        c = self.num_channels // self.num_groups
        if keep.numel() % c:
            name = self._s2h.name if self._s2h is not None else type(self).__name__
            raise RuntimeError(f"{name}: {keep.numel()} kept channels are not whole norm groups "
                               f"of {c} (num_groups={self.num_groups})")
        return keep.numel() // c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._hard_keep()
        return super().forward(x) if keep is None else self._hard_gn(x, keep)

    def _hard_gn(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Group norm of the kept norm groups: ``x`` ``(N, k, *)`` -> ``(N, k, *)``."""
        self._check_width(x, 1, keep.numel(), "input")
        weight = None if self.weight is None else gather_kept(self.weight, keep, 0)
        bias = None if self.bias is None else gather_kept(self.bias, keep, 0)
        return F.group_norm(x, self._kept_norm_groups(keep), weight, bias, self.eps)

    def _export_sizes(self, keep: torch.Tensor | None) -> tuple[int, int]:
        """``(num_groups, num_channels)`` of the layer keeping ``keep`` (whole norm groups)."""
        if keep is None:
            return self.num_groups, self.num_channels
        if self.num_groups == 1:
            return 1, keep.numel()
        groups = self._kept_norm_groups(keep)
        c = self.num_channels // self.num_groups
        blocks = keep.view(groups, c).cpu()
        if not bool(((blocks - blocks[:, :1]) == torch.arange(c)).all()
                    and (blocks[:, 0] % c == 0).all()):
            raise RuntimeError(f"the kept channels of a group norm (num_groups={self.num_groups}"
                               f") are not whole norm groups of {c}")
        return groups, keep.numel()

    @torch.no_grad()
    def s2h_export(self, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None,
                   extra: dict) -> nn.GroupNorm:
        """A plain ``nn.GroupNorm`` of the kept norm groups."""
        groups, k = self._export_sizes(out_keep)
        ref = self.weight
        new = nn.GroupNorm(groups, k, self.eps, self.affine,
                           device=ref.device if ref is not None else None,
                           dtype=ref.dtype if ref is not None else None)
        if self.affine:
            new.weight.copy_(gather_kept(self.weight, out_keep, 0))
            new.bias.copy_(gather_kept(self.bias, out_keep, 0))
        return new


def _groupnorm_info(m: nn.Module) -> LayerInfo:
    if m.num_groups == 1:  # a layer norm over (C, *): over the kept channels, as LayerNorm
        return LayerInfo("layernorm", 1)
    return LayerInfo("batchnorm", 1, block=m.num_channels // m.num_groups)


# ------------------------------------------------------------------ the torch layers' handlers
def _conv_info(m: nn.Module) -> LayerInfo:
    if m.groups == 1:
        return LayerInfo("conv", 1)
    if m.in_channels == m.out_channels:  # depthwise, or grouped (ResNeXt): whole conv groups
        return LayerInfo("depthwise", 1, block=m.in_channels // m.groups)
    return LayerInfo("fixed", 1, f"groups={m.groups}, {m.out_channels} output channels from "
                                 f"{m.in_channels} input channels")


def _layernorm_info(m: nn.Module) -> LayerInfo:
    if len(m.normalized_shape) == 1:
        return LayerInfo("layernorm", -1)
    return LayerInfo("fixed", -1, f"normalized_shape={tuple(m.normalized_shape)}")


# the swap is an in-place ``__class__`` change, so the parameters stay the same objects and any
# optimizer built before the pruner keeps working
_registry.register(LayerHandler(nn.Conv2d, MaskedConv2d, _conv_info))
_registry.register(LayerHandler(nn.Linear, MaskedLinear, lambda m: LayerInfo("linear", -1)))
_registry.register(LayerHandler(nn.BatchNorm2d, MaskedBatchNorm2d,
                                lambda m: LayerInfo("batchnorm", 1)))
_registry.register(LayerHandler(nn.LayerNorm, MaskedLayerNorm, _layernorm_info))
_registry.register(LayerHandler(nn.GroupNorm, MaskedGroupNorm, _groupnorm_info))
