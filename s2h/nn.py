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

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .gates import ChannelGate

__all__ = [
    "ChannelGate",
    "GateRuntime",
    "MaskedBatchNorm2d",
    "MaskedConv2d",
    "MaskedLayerNorm",
    "MaskedLinear",
]

MODES = ("dense", "soft", "hard")


@dataclass
class GateState:
    """Per-step tensors of one gate, computed once and shared by every layer of the group.

    soft_mask: ``(C,)`` float32, relaxed mask in channel order (differentiable).
    keep: ``(k,)`` int64, kept channels (ascending), on the layers' device.
    hard_mask: ``(k,)`` float32, straight-through mask (ones; gradient to the gate).
    """

    soft_mask: torch.Tensor
    keep: torch.Tensor
    hard_mask: torch.Tensor


class GateRuntime:
    """Shared switch for every masked layer of one pruned model: the mode and the gate states."""

    def __init__(self) -> None:
        self.mode = "dense"
        self.states: dict[int, GateState] = {}
        self._frozen_widths: dict[int, int] | None = None
        #: per-channel parameters outside the masked layers (ConvNeXt's layer-scale ``gamma``, a
        #: ``LayerScale``): ``(owner module, attribute, dim, gate)``. In hard mode the owner sees
        #: the kept slice (see :meth:`_install_param_slices`).
        self.param_slices: list[tuple[nn.Module, str, int, ChannelGate]] = []
        self._installed = False

    def prepare(self, gates, device: torch.device | None = None) -> None:
        """Compute every gate's soft mask, kept set and STE mask for the coming forward(s)."""
        self.states = {}
        for gate in gates:
            soft = gate.soft_mask()
            keep = gate.keep_index()
            if device is not None:
                soft, keep = soft.to(device), keep.to(device)
            self.states[id(gate)] = GateState(soft, keep, gate.hard_mask(soft, keep))

    def state(self, gate: ChannelGate) -> GateState:
        try:
            return self.states[id(gate)]
        except KeyError:
            raise RuntimeError(
                f"gate {gate.name!r} has no prepared state: call pruner.dual_forward(), or run "
                "the model inside `with pruner.mode('soft'|'hard'):`"
            ) from None

    @contextlib.contextmanager
    def use(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        prev, self.mode = self.mode, mode
        self._sync_param_slices()
        try:
            yield
        finally:
            self.mode = prev
            self._sync_param_slices()

    def _sync_param_slices(self) -> None:
        """Show the owners of per-channel parameters their kept slice while in hard mode.

        The slice ``p.index_select(dim, keep)`` is put in the owner's instance ``__dict__``, which
        Python's attribute lookup consults before ``nn.Module.__getattr__`` (where parameters
        live): the module's own forward then reads the compact tensor, gradients flow back to
        the full parameter, and ``state_dict`` / ``parameters()`` never see it. Leaving hard
        mode removes it, so nothing of s2h stays on the model (nor on a deep copy of it).
        """
        want = self.mode == "hard" and bool(self.param_slices)
        if want == self._installed and not want:
            return
        for owner, attr, _dim, _gate in self.param_slices:
            owner.__dict__.pop(attr, None)
        self._installed = False
        if want:
            for owner, attr, dim, gate in self.param_slices:
                param = owner._parameters[attr]
                keep = self.state(gate).keep
                owner.__dict__[attr] = param.index_select(dim, keep.to(param.device))
            self._installed = True


class _Binding:
    """What a masked layer knows about its gates (kept outside ``_modules``: no new state keys)."""

    __slots__ = ("runtime", "in_gate", "out_gate", "name", "extra")

    def __init__(self, runtime, in_gate, out_gate, name, extra=None):
        self.runtime = runtime
        self.in_gate = in_gate
        self.out_gate = out_gate
        self.name = name
        self.extra = dict(extra or {})  # role -> gate, e.g. {"heads": gate} of an attention


def _gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    from . import _dispatch

    return _dispatch.gather_channels(x, index, dim)


def _gather_weight(w: torch.Tensor, out_index, in_index) -> torch.Tensor:
    from . import _dispatch

    return _dispatch.gather_weight(w, out_index, in_index)


class _MaskedMixin:
    """Common gate plumbing of the masked layers."""

    _s2h: _Binding | None = None

    def attach_gates(
        self,
        runtime: GateRuntime,
        in_gate: ChannelGate | None,
        out_gate: ChannelGate | None,
        name: str = "",
        extra: dict[str, ChannelGate | None] | None = None,
    ) -> None:
        """Bind this layer to the gate of its input channels and the gate of its output channels
        (and, for layers with inner groups such as attention heads, ``extra`` gates by role).

        Gates are *not* registered as submodules, so ``state_dict`` keys stay the parent's.
        """
        object.__setattr__(self, "_s2h", _Binding(runtime, in_gate, out_gate, name, extra))

    def extra_gate(self, role: str) -> ChannelGate | None:
        return None if self._s2h is None else self._s2h.extra.get(role)

    def detach_gates(self) -> None:
        object.__setattr__(self, "_s2h", None)

    @property
    def in_gate(self) -> ChannelGate | None:
        return None if self._s2h is None else self._s2h.in_gate

    @property
    def out_gate(self) -> ChannelGate | None:
        return None if self._s2h is None else self._s2h.out_gate

    def _mode(self) -> str:
        return "dense" if self._s2h is None else self._s2h.runtime.mode

    def kept_weight_bias(self, in_keep, out_keep):
        """``W[out_keep][:, in_keep]`` and ``bias[out_keep]`` (``None`` keeps every channel)."""
        weight = _gather_weight(self.weight, out_keep, in_keep)
        bias = self.bias
        if bias is not None and out_keep is not None:
            bias = _gather(bias, out_keep, 0)
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


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input channels are masked (soft) or gathered (hard).

    Input ``x``: ``(N, C_in, H, W)`` (any memory format); output ``(N, C_out, H', W')``.
    Depthwise convolutions (``groups == in_channels == out_channels``) belong to one group: their
    input and output gate are the same, and the hard layer has ``groups = k``.
    """

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

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
                x = x * _channel_view(rt.state(in_gate).soft_mask, x.ndim, 1, x.dtype)
            return super().forward(x)
        # hard
        in_state = rt.state(in_gate) if in_gate is not None else None
        out_state = rt.state(out_gate) if out_gate is not None else None
        if in_state is not None:
            self._check_width(x, 1, in_state.keep.numel(), "input")
            x = x * _channel_view(in_state.hard_mask, x.ndim, 1, x.dtype)
        if self.is_depthwise:
            if in_state is None:
                return super().forward(x)
            keep = in_state.keep
            weight = _gather(self.weight, keep, 0)
            bias = None if self.bias is None else _gather(self.bias, keep, 0)
            return self._conv(x, weight, bias, keep.numel())
        weight, bias = self.kept_weight_bias(
            None if in_state is None else in_state.keep, None if out_state is None else out_state.keep
        )
        return self._conv(x, weight, bias, self.groups)


class MaskedLinear(_MaskedMixin, nn.Linear):
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
                x = x * rt.state(in_gate).soft_mask.to(x.dtype)
            return super().forward(x)
        in_state = rt.state(in_gate) if in_gate is not None else None
        out_state = rt.state(out_gate) if out_gate is not None else None
        if in_state is not None:
            self._check_width(x, -1, in_state.keep.numel(), "input")
            x = x * in_state.hard_mask.to(x.dtype)
        weight, bias = self.kept_weight_bias(
            None if in_state is None else in_state.keep, None if out_state is None else out_state.keep
        )
        return F.linear(x, weight, bias)


class MaskedBatchNorm2d(_MaskedMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in hard mode, normalises only the kept channels of its group.

    The hard network has its own running statistics (buffers ``hard_running_mean``,
    ``hard_running_var``, ``hard_num_batches_tracked``), created by :meth:`add_hard_stats` from
    the current ones; only the kept entries are updated by a hard training forward.
    """

    def add_hard_stats(self) -> None:
        if not self.track_running_stats or hasattr(self, "hard_running_mean"):
            return
        self.register_buffer("hard_running_mean", self.running_mean.detach().clone())
        self.register_buffer("hard_running_var", self.running_var.detach().clone())
        self.register_buffer("hard_num_batches_tracked", self.num_batches_tracked.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        gate = self._s2h.out_gate if self._s2h is not None else None
        if mode != "hard" or gate is None:
            return super().forward(x)
        return self._hard_bn(x, self._s2h.runtime.state(gate).keep)

    def _hard_bn(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Batch norm of the kept channels ``keep`` (``(k,)``) of ``x`` ``(N, k, H, W)``."""
        self._check_width(x, 1, keep.numel(), "input")
        weight = None if self.weight is None else _gather(self.weight, keep, 0)
        bias = None if self.bias is None else _gather(self.bias, keep, 0)
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


class MaskedLayerNorm(_MaskedMixin, nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim; in hard mode it normalises over the kept channels.

    Note: in soft mode the statistics run over all ``C`` channels while the exported layer uses
    the kept ones; the soft network is a proxy here (exact for BatchNorm, not for LayerNorm).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode()
        gate = self._s2h.out_gate if self._s2h is not None else None
        if mode != "hard" or gate is None:
            return super().forward(x)
        return self._hard_ln(x, self._s2h.runtime.state(gate).keep)

    def _hard_ln(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Layer norm over the kept channels: ``x`` ``(..., k)`` -> ``(..., k)``."""
        self._check_width(x, -1, keep.numel(), "input")
        weight = None if self.weight is None else _gather(self.weight, keep, 0)
        bias = None if self.bias is None else _gather(self.bias, keep, 0)
        return F.layer_norm(x, (keep.numel(),), weight, bias, self.eps)


#: exact torch class -> masked subclass (the swap is an in-place ``__class__`` change, so the
#: parameters stay the same objects and any optimizer built before the pruner keeps working)
MASKED_CLASSES: dict[type, type] = {
    nn.Conv2d: MaskedConv2d,
    nn.Linear: MaskedLinear,
    nn.BatchNorm2d: MaskedBatchNorm2d,
    nn.LayerNorm: MaskedLayerNorm,
}
PLAIN_CLASSES: dict[type, type] = {v: k for k, v in MASKED_CLASSES.items()}
