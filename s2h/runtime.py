"""The gate runtime: the one switch that tells every masked layer of a pruned model which path
to compute (``"dense"``, ``"soft"`` or ``"hard"``) and with which per-step gate tensors.

A :class:`GateRuntime` is shared by all masked layers of one model. Each step,
:meth:`GateRuntime.prepare` computes every gate's soft mask, kept channels and straight-through
hard mask once (:class:`GateState`); the layers read them through their :class:`Binding`.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gates import ChannelGate, GateBank

__all__ = ["MODES", "Binding", "GateRuntime", "GateState", "IndexedGate", "RepeatedGate",
           "Route", "SegmentedGate", "WidthAttr"]

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

    def __init__(self, gate: ChannelGate | SegmentedGate, repeat: int) -> None:
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


class SegmentedGate:
    """The channels of a concat along the channel dim, seen by the layers that read it: a
    sequence of segments ``(gate or None, width)``, each the channels of one group (None: a
    tensor of fixed width, kept whole), at offset = the widths before it.

    Its kept channels are each segment's kept channels at the segment's offset in the full
    tensor (the index into the consumer's weight); the hard network's concat of the kept
    tensors holds exactly those channels in that order. :meth:`GateRuntime.state` gives the
    segments' states concatenated, so a masked layer bound to it masks and gathers as it does
    for one gate.
    """

    def __init__(self, segments: list[tuple[ChannelGate | None, int]], name: str = "") -> None:
        self.segments = [(g, int(w)) for g, w in segments]
        self.name = name
        self.offsets: list[int] = []
        off = 0
        for _, w in self.segments:
            self.offsets.append(off)
            off += w
        self.channels = off
        self._keep_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def gates(self) -> list[ChannelGate]:
        """The segments' gates (a gate may own several segments)."""
        return [g for g, _ in self.segments if g is not None]

    def width(self, width_of: Callable[[ChannelGate], Any]) -> Any:
        """Kept channels with each segment's gate at ``width_of(gate)`` (fixed ones whole)."""
        total: Any = 0
        for g, w in self.segments:
            total = total + (w if g is None else width_of(g))
        return total

    def combine_keep(self, keeps: list[torch.Tensor]) -> torch.Tensor:
        """The kept channels ``(k,)`` (ascending) of the whole input from the kept channels of
        each gated segment (``keeps``, in segment order). Cached while ``keeps`` are the same
        tensor objects (the gates cache theirs), so the hard path sees one index tensor."""
        cached = self._keep_cache
        if cached is not None and len(cached[0]) == len(keeps) and all(
                a is b for a, b in zip(cached[0], keeps, strict=True)):
            return cached[1]
        it = iter(keeps)
        dev = keeps[0].device if keeps else None
        parts = []
        for (g, w), off in zip(self.segments, self.offsets, strict=True):
            parts.append(torch.arange(off, off + w, device=dev) if g is None
                         else next(it).to(dev) + off)
        keep = torch.cat(parts)
        self._keep_cache = (tuple(keeps), keep)
        return keep

    def expand(self, state_of: Callable[[ChannelGate], GateState]) -> GateState:
        """The segments' states as the state of the whole input."""
        states = [state_of(g) for g in self.gates]
        ref = states[0].soft_mask
        soft, hard = [], []
        it = iter(states)
        for g, w in self.segments:
            if g is None:
                ones = torch.ones(w, device=ref.device, dtype=ref.dtype)
                soft.append(ones)
                hard.append(ones)
            else:
                st = next(it)
                soft.append(st.soft_mask)
                hard.append(st.hard_mask)
        keep = self.combine_keep([st.keep for st in states])
        return GateState(torch.cat(soft), keep, torch.cat(hard))


class IndexedGate:
    """Mixed channels (a channel shuffle's output, a piece of it): position ``p`` holds channel
    ``c_p`` of the group of gate ``g_p`` (None: a channel kept whole). The hard network holds
    the kept positions in ascending order (the routed modules put them there, see
    :class:`s2h.registry.Router`), so a masked layer bound to it masks and gathers as it does
    for one gate: :meth:`expand` gives the per-position state.
    """

    def __init__(self, positions: list[tuple[ChannelGate | None, int]], name: str = "") -> None:
        self.name = name
        self.channels = len(positions)
        self.gates: list[ChannelGate] = []
        where: dict[int, int] = {}
        pos: list[list[int]] = []
        chans: list[list[int]] = []
        fixed: list[int] = []
        for p, (g, c) in enumerate(positions):
            if g is None:
                fixed.append(p)
                continue
            if id(g) not in where:
                where[id(g)] = len(self.gates)
                self.gates.append(g)
                pos.append([])
                chans.append([])
            pos[where[id(g)]].append(p)
            chans[where[id(g)]].append(int(c))
        self._pos = [torch.tensor(x, dtype=torch.long) for x in pos]
        self._chans = [torch.tensor(x, dtype=torch.long) for x in chans]
        self._fixed = torch.tensor(fixed, dtype=torch.long)
        self._keep_cache: tuple[tuple, torch.Tensor] | None = None
        self._dev: dict = {}
        self._rank_cache: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._count_cache: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}

    def _on(self, device: torch.device) -> tuple[list, list, torch.Tensor]:
        t = self._dev.get(device)
        if t is None:
            t = self._dev[device] = ([x.to(device) for x in self._pos],
                                     [x.to(device) for x in self._chans], self._fixed.to(device))
        return t

    def _kept(self, gate: ChannelGate, keep: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
        flag = torch.zeros(gate.channels, dtype=torch.bool, device=keep.device)
        flag[keep] = True
        return flag[chans]

    def combine_keep(self, keeps: list[torch.Tensor], device: torch.device | None = None
                     ) -> torch.Tensor:
        """The kept positions ``(k,)`` (ascending) from the kept channels of each gate
        (``keeps``, in :attr:`gates` order). Cached while ``keeps`` are the same objects."""
        cached = self._keep_cache
        if cached is not None and len(cached[0]) == len(keeps) and all(
                a is b for a, b in zip(cached[0], keeps, strict=True)) and (
                    device is None or cached[1].device == device):
            return cached[1]
        dev = keeps[0].device if keeps else (device or self._fixed.device)
        pos, chans, fixed = self._on(dev)
        parts = [fixed] + [p[self._kept(g, k, c)] for g, k, p, c
                           in zip(self.gates, keeps, pos, chans, strict=True)]
        keep = torch.sort(torch.cat(parts)).values
        self._keep_cache = (tuple(keeps), keep)
        return keep

    def expand(self, state_of: Callable[[ChannelGate], GateState]) -> GateState:
        """The gates' states as the state of the mixed positions."""
        states = [state_of(g) for g in self.gates]
        ref = states[0].soft_mask
        pos, chans, fixed = self._on(ref.device)
        soft = torch.ones(self.channels, device=ref.device, dtype=ref.dtype)
        hard = torch.ones(self.channels, device=ref.device, dtype=ref.dtype)
        for g, st, p, c in zip(self.gates, states, pos, chans, strict=True):
            soft = soft.index_put((p,), st.soft_mask.index_select(0, c))
            full = torch.zeros(g.channels, device=ref.device, dtype=ref.dtype).index_put(
                (st.keep,), st.hard_mask)
            hard = hard.index_put((p,), full.index_select(0, c))
        keep = self.combine_keep([st.keep for st in states])
        return GateState(soft, keep, hard.index_select(0, keep))

    def width(self, width_of: Callable[[ChannelGate], Any],
              mask_of: Callable[[ChannelGate], torch.Tensor] | None = None) -> Any:
        """Kept positions with each gate at ``width_of(gate)``: the count (a float), or, for a
        tensor width, that count as value with the gradient of the expected count
        ``Σ_p mask_of(g_p)[c_p]`` (each gate's soft mask; without ``mask_of``, the positions'
        share of the gate's width)."""
        total: Any = float(self._fixed.numel())
        for i, (g, c) in enumerate(zip(self.gates, self._chans, strict=True)):
            w = width_of(g)
            k = int(round(float(w.detach() if isinstance(w, torch.Tensor) else w)))
            count = self._count(i, k)
            if isinstance(w, torch.Tensor) and w.requires_grad:
                soft = (mask_of(g).index_select(0, self._on(w.device)[1][i]).sum()
                        if mask_of is not None else w * (c.numel() / g.channels))
                total = total + (soft + (count - soft).detach())
            else:
                total = total + count
        return total

    def _count(self, i: int, k: int) -> float:
        """How many of gate ``i``'s positions its top ``k`` channels keep (cached per order)."""
        ranks = self._ranks(i)
        hit = self._count_cache.get((i, k))
        if hit is None or hit[0] is not ranks:
            hit = self._count_cache[(i, k)] = (ranks, float((ranks < k).sum()))
        return hit[1]

    def _ranks(self, i: int) -> torch.Tensor:
        """The importance ranks of gate ``i``'s channels at its positions (cached per order)."""
        g = self.gates[i]
        key = (g.order._version, g.order.data_ptr())
        hit = self._rank_cache.get(i)
        if hit is not None and hit[0] == key:
            return hit[1]
        rank = torch.empty(g.channels, dtype=torch.long)
        rank[g.order.detach().cpu()] = torch.arange(g.channels)
        self._rank_cache[i] = (key, rank[self._chans[i]])
        return self._rank_cache[i][1]


class Route:
    """A module whose channel shuffle the hard network routes by index (a
    :class:`s2h.registry.Router`'s ``routed`` forward runs instead of the module's own):
    ``s2h_split`` = the kept width of the first piece its input is cut into (``cut``; None
    without a cut), ``s2h_order`` = for each kept output position (ascending) its index among
    the kept positions of the shuffle's input (``cat``, ``out``, ``sigma``: output position ->
    input position)."""

    def __init__(self, owner: nn.Module, routed: type, cut: IndexedGate | None,
                 cat: IndexedGate, out: IndexedGate, sigma: list[int]) -> None:
        self.owner, self.routed = owner, routed
        self.cut, self.cat, self.out = cut, cat, out
        self.sigma = torch.tensor(sigma, dtype=torch.long)
        self._cache: tuple | None = None

    @staticmethod
    def _keep(gate: IndexedGate, keep_of: Callable[[ChannelGate], torch.Tensor],
              device: torch.device) -> torch.Tensor:
        return gate.combine_keep([keep_of(g).to(device) for g in gate.gates], device)

    def values(self, keep_of: Callable[[ChannelGate], torch.Tensor], device: torch.device
               ) -> tuple[int | None, torch.Tensor]:
        """``(s2h_split, s2h_order)`` with each gate keeping ``keep_of(gate)``."""
        split = None if self.cut is None else int(self._keep(self.cut, keep_of, device).numel())
        k_cat = self._keep(self.cat, keep_of, device)
        k_out = self._keep(self.out, keep_of, device)
        c = self._cache
        if c is not None and c[0] is k_cat and c[1] is k_out:
            return split, c[2]
        order = torch.searchsorted(k_cat, self.sigma.to(device).index_select(0, k_out))
        self._cache = (k_cat, k_out, order)
        return split, order


class WidthAttr:
    """A module attribute that holds the sizes of a split of pruned channels: ``how`` =
    ``"piece"`` (one piece's width: ``split(x, self.width)``), ``"total"`` (the sum of the
    pieces: ``split(x, self.chs // 2)``) or ``"list"`` (every piece's width, in order:
    ``split(x, self.splits)``) or ``"reshape"`` (the width a reshape passes:
    ``x.reshape(n, self.hidden_dim, -1)``, one piece); ``pieces`` = ``[(gate or None, full
    width)]``."""

    def __init__(self, how: str, original: Any,
                 pieces: list[tuple[ChannelGate | SegmentedGate | None, int]]) -> None:
        self.how = how
        self.original = original
        self.pieces = list(pieces)

    @property
    def gates(self) -> list[ChannelGate]:
        """The pieces' gates (the same gate for pieces that are one group; a piece cut again
        gives its pieces' gates)."""
        out: list[ChannelGate] = []
        for g, _ in self.pieces:
            for gate in (g.gates if isinstance(g, SegmentedGate) else [g]):
                if gate is not None and all(gate is not o for o in out):
                    out.append(gate)
        return out

    def value(self, kept_of: Callable[[ChannelGate], int]) -> Any:
        """The attribute's value with each piece's gate keeping ``kept_of(gate)`` channels."""
        widths = [w if g is None else kept_of(g) for g, w in self.pieces]
        if self.how == "piece":
            return widths[0]
        if self.how in ("total", "reshape"):
            return sum(widths)
        return type(self.original)(widths)


class GateRuntime:
    """Shared switch for every masked layer of one pruned model: the mode and the gate states."""

    def __init__(self) -> None:
        self.mode = "dense"
        self.states: dict[int, GateState] = {}
        #: per-channel parameters outside the masked layers (ConvNeXt's layer-scale ``gamma``, a
        #: ``LayerScale``): ``(owner module, attribute, dim, gate)``. In hard mode the owner sees
        #: the kept slice (see :meth:`_sync_param_slices`).
        self.param_slices: list[tuple[nn.Module, str, int, ChannelGate]] = []
        #: module attributes holding the sizes of a split of pruned channels (``self.width``
        #: of a ``torch.split(x, self.width, 1)``): ``(owner, attribute, value)``, ``value``
        #: a :class:`WidthAttr`; in hard mode the owner sees the kept widths
        self.width_attrs: list[tuple[nn.Module, str, WidthAttr]] = []
        #: modules whose channel shuffle is routed by index in hard mode (:class:`Route`)
        self.routes: list[Route] = []
        self._installed = False

    def prepare(self, gates: Iterable[ChannelGate], device: torch.device | None = None,
                bank: GateBank | None = None) -> None:
        """Compute every gate's soft mask, kept set and STE mask for the coming forward(s).
        ``bank``: a :class:`~s2h.gates.GateBank` of the same gates (their widths in a few ops)."""
        self.states = {}
        gates = list(gates)
        if bank is None or not bank.holds(gates):
            bank = GateBank(gates)
        # every gate's distribution once, E read in one host transfer (not a sync per gate), and
        # the soft and hard masks of all gates in a few ops (not a few per gate)
        probs = bank.probs() if gates else None
        with torch.no_grad():
            widths = bank.hard_widths(bank.expected(probs.detach())) if gates else []
        softs = bank.soft_masks(probs)
        keeps = [g.keep_index(w) for g, w in zip(gates, widths, strict=True)]
        if device is None or all(k.device == device for k in keeps):
            hards = bank.hard_masks(softs, keeps)
            for gate, soft, keep, hard in zip(gates, softs, keeps, hards, strict=True):
                self.states[id(gate)] = GateState(soft, keep, hard)
            return
        for gate, soft, keep in zip(gates, softs, keeps, strict=True):
            if device is not None:
                soft, keep = soft.to(device), keep.to(device)
            self.states[id(gate)] = GateState(soft, keep, gate.hard_mask(soft, keep))

    def state(self, gate: ChannelGate | RepeatedGate | SegmentedGate) -> GateState:
        if isinstance(gate, RepeatedGate):
            return gate.expand(self.state(gate.gate))
        if isinstance(gate, (SegmentedGate, IndexedGate)):  # once per step, for all its layers
            st = self.states.get(id(gate))
            if st is None:
                st = self.states[id(gate)] = gate.expand(self.state)
            return st
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
        want = self.mode == "hard" and bool(self.param_slices or self.width_attrs or self.routes)
        if want == self._installed and not want:
            return
        for owner, attr, _dim, _gate in self.param_slices:
            owner.__dict__.pop(attr, None)
        for route in self.routes:
            for attr in ("forward", "s2h_split", "s2h_order"):
                route.owner.__dict__.pop(attr, None)
        for owner, attr, wa in self.width_attrs:
            owner.__dict__[attr] = wa.original
        self._installed = False
        if want:
            for owner, attr, dim, gate in self.param_slices:
                param = owner._parameters[attr]
                keep = self.state(gate).keep
                owner.__dict__[attr] = param.index_select(dim, keep.to(param.device))
            for owner, attr, wa in self.width_attrs:
                owner.__dict__[attr] = wa.value(lambda g: int(self.state(g).keep.numel()))
            for route in self.routes:
                dev = next(route.owner.parameters()).device
                split, order = route.values(lambda g: self.state(g).keep, dev)
                route.owner.__dict__.update(
                    forward=types.MethodType(route.routed.forward, route.owner),
                    s2h_split=split, s2h_order=order)
            self._installed = True


class Binding:
    """What a masked layer knows about its gates (kept outside ``_modules``: no new state keys)."""

    __slots__ = ("runtime", "in_gate", "out_gate", "name", "extra")

    def __init__(self, runtime: GateRuntime,
                 in_gate: ChannelGate | RepeatedGate | SegmentedGate | None,
                 out_gate: ChannelGate | SegmentedGate | None, name: str,
                 extra: dict[str, ChannelGate | None] | None = None) -> None:
        self.runtime = runtime
        self.in_gate = in_gate
        self.out_gate = out_gate
        self.name = name
        self.extra = dict(extra or {})  # role -> gate, e.g. {"heads": gate} of an attention
