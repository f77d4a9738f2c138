"""The gate runtime: the one switch that tells every masked layer of a pruned model which path
to compute (``"dense"``, ``"soft"`` or ``"hard"``) and with which per-step gate tensors.

A :class:`GateRuntime` is shared by all masked layers of one model. Each step,
:meth:`GateRuntime.prepare` computes every gate's soft mask, kept channels and straight-through
hard mask once (:class:`GateState`); the layers read them through their :class:`Binding`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .gates import ChannelGate

__all__ = ["MODES", "Binding", "GateRuntime", "GateState", "RepeatedGate"]

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


class RepeatedGate:
    """A gate seen through a flatten: a layer whose input holds each channel of the gate's group
    ``repeat`` times, channel-major (a ``C x h x w`` map flattened into a linear layer: channel
    ``c`` owns the columns ``c * repeat`` to ``c * repeat + repeat - 1``).

    :meth:`GateRuntime.state` gives its state in those columns, so a masked layer bound to it
    (and the lockstep dual ops) mask and gather columns exactly as they do channels.
    """

    def __init__(self, gate: ChannelGate, repeat: int) -> None:
        self.gate = gate
        self.repeat = int(repeat)

    @property
    def name(self) -> str:
        return self.gate.name

    @property
    def channels(self) -> int:
        return self.gate.channels * self.repeat

    def expand_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """The kept columns ``(k * repeat,)`` (ascending) of the kept channels ``keep``."""
        cols = torch.arange(self.repeat, device=keep.device, dtype=keep.dtype)
        return (keep[:, None] * self.repeat + cols).flatten()

    def expand(self, state: GateState) -> GateState:
        """The gate's state (per channel) as the state of the repeated columns."""
        return GateState(state.soft_mask.repeat_interleave(self.repeat),
                         self.expand_keep(state.keep),
                         state.hard_mask.repeat_interleave(self.repeat))


class GateRuntime:
    """Shared switch for every masked layer of one pruned model: the mode and the gate states."""

    def __init__(self) -> None:
        self.mode = "dense"
        self.states: dict[int, GateState] = {}
        #: per-channel parameters outside the masked layers (ConvNeXt's layer-scale ``gamma``, a
        #: ``LayerScale``): ``(owner module, attribute, dim, gate)``. In hard mode the owner sees
        #: the kept slice (see :meth:`_sync_param_slices`).
        self.param_slices: list[tuple[nn.Module, str, int, ChannelGate]] = []
        self._installed = False

    def prepare(self, gates: Iterable[ChannelGate], device: torch.device | None = None) -> None:
        """Compute every gate's soft mask, kept set and STE mask for the coming forward(s)."""
        self.states = {}
        for gate in gates:
            soft = gate.soft_mask()
            keep = gate.keep_index()
            if device is not None:
                soft, keep = soft.to(device), keep.to(device)
            self.states[id(gate)] = GateState(soft, keep, gate.hard_mask(soft, keep))

    def state(self, gate: ChannelGate | RepeatedGate) -> GateState:
        if isinstance(gate, RepeatedGate):
            return gate.expand(self.state(gate.gate))
        try:
            return self.states[id(gate)]
        except KeyError:
            raise RuntimeError(
                f"gate {gate.name!r} has no prepared state: call pruner.dual_forward(), or run "
                "the model inside `with pruner.mode('soft'|'hard'):`"
            ) from None

    @contextlib.contextmanager
    def use(self, mode: str) -> Iterator[None]:
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


class Binding:
    """What a masked layer knows about its gates (kept outside ``_modules``: no new state keys)."""

    __slots__ = ("runtime", "in_gate", "out_gate", "name", "extra")

    def __init__(self, runtime: GateRuntime, in_gate: ChannelGate | RepeatedGate | None,
                 out_gate: ChannelGate | None, name: str,
                 extra: dict[str, ChannelGate | None] | None = None) -> None:
        self.runtime = runtime
        self.in_gate = in_gate
        self.out_gate = out_gate
        self.name = name
        self.extra = dict(extra or {})  # role -> gate, e.g. {"heads": gate} of an attention
