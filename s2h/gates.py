"""Per-group width parameterisation (METHOD §2): :class:`ChannelGate`.

A gate owns the logits ``u`` (shape ``(K,)``) over the candidate widths ``c_k = k * d`` of one
dependency group of ``C`` channels, and a fixed importance order ``π`` of those channels.

* ``p = softmax(u / τ)``                      distribution over widths
* ``q_k = Σ_{j >= k} p_j``                    probability that width >= ``c_k``
* ``soft_mask`` = ``repeat_interleave(q, d)`` in importance order, scattered back to channel order
* ``expected_width`` ``E = Σ_k p_k c_k``
* ``hard_width`` = ``E`` rounded to a multiple of ``d`` (straight-through: gradient of ``E``);
  ``rounding="nearest"`` (default) or ``"ceil"`` (METHOD §2 as written, see below)
* ``keep_index`` = ``sorted(π[:hard_width])``
* ``hard_mask`` = ``soft_mask[keep] + (1 - soft_mask[keep]).detach()`` (ones, gradient to ``u``)

Why "nearest" by default: ``E`` is an expectation under a softmax, so it always sits strictly
above the smallest width and a little above any width that holds almost all the probability.
With ``ceil`` the hard network therefore keeps one extra block of ``d`` channels even when the
soft network has put 99.7% of its mass on the narrower width (measured: ResNet-20 groups of 16
channels stuck at 16 with ``p = [0.997, 0.003]``, E = 8.05), and a group can never reach its
minimum width; the FLOPs ratio stalled at 0.47 for a 0.35 target. Rounding to the nearest
multiple removes that one-sided bias; ``ceil`` stays available.

Initialisation (METHOD §2 item 8): the last width gets probability ``t`` and the others share
``1 - t`` equally, so ``E = C (1 + t) / 2``; ``t`` is chosen for ``E = C - init_gap * d`` with
``init_gap = 0.25`` by default: a quarter block *above* the round-to-nearest boundary
``C - d/2``, so the hard network is the full network until the gates have moved.  The demo's
start ``E = C - d/2`` sat exactly on that boundary: measured on ResNet-20 (divisor 8), the first
gate update dropped one block of every group (target 0.9: hard FLOPs 1.000 -> 0.669 after one
step; target 0.5: 1.000 -> 0.509 at step 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def effective_divisor(channels: int, divisor: int) -> int:
    """The largest ``d <= divisor`` that divides ``channels`` (METHOD §2)."""
    if divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor}")
    d = min(divisor, channels)
    while channels % d:
        d -= 1
    return d


class ChannelGate(nn.Module):
    """Learned width of one dependency group of ``channels`` channels.

    Args:
        channels: ``C``, the full width of the group.
        divisor: requested width granularity; lowered until it divides ``C``.
        tau: softmax temperature ``τ``.
        importance: optional ``(C,)`` float tensor of channel importances (higher = kept first).
            Sets the fixed importance order; default: channel order.
        name: a readable name for messages (usually the producing module's name).
        rounding: ``"nearest"`` or ``"ceil"``: how ``E`` becomes the hard width.
        init_gap: the initial ``E`` is ``C - init_gap * d`` (in ``(0, 0.5)`` for ``"nearest"``:
            below 0.5 keeps the hard network full at the start; default 0.25, see above).

    The logits live in ``self.logits`` (``(K,)`` float32 parameter); the order in the buffer
    ``self.order`` (``(C,)`` int64).  ``K == 1`` gates (``C == d``) are fixed at full width.
    """

    def __init__(
        self,
        channels: int,
        divisor: int = 8,
        tau: float = 1.0,
        importance: torch.Tensor | None = None,
        name: str = "",
        rounding: str = "nearest",
        init_gap: float = 0.25,
    ) -> None:
        super().__init__()
        if not 0.0 < init_gap < 1.0:
            raise ValueError(
                f"init_gap must be in (0, 1) (a fraction of the divisor), got {init_gap}")
        if rounding not in ("nearest", "ceil"):
            raise ValueError(f"rounding must be 'nearest' or 'ceil', got {rounding!r}")
        self.rounding = rounding
        if channels < 1:
            raise ValueError(f"ChannelGate needs at least one channel, got {channels}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.channels = int(channels)
        self.requested_divisor = int(divisor)
        self.divisor = effective_divisor(self.channels, int(divisor))
        self.num_widths = self.channels // self.divisor
        self.tau = float(tau)
        self.name = name
        logits = torch.zeros(self.num_widths)
        if self.num_widths > 1:
            # p_K = t, the other K - 1 widths share 1 - t: E = C (1 + t) / 2 = C - init_gap * d
            t = 1.0 - 2.0 * init_gap * self.divisor / self.channels
            logits[-1] = self.tau * math.log((self.num_widths - 1) * t / (1 - t))
        self.logits = nn.Parameter(logits)
        self.register_buffer("order", torch.arange(self.channels), persistent=True)
        self.register_buffer(
            "widths_table",
            torch.arange(1, self.num_widths + 1, dtype=torch.float32) * self.divisor,
            persistent=False,
        )
        if importance is not None:
            self.set_importance(importance)

    # ------------------------------------------------------------------ order
    @torch.no_grad()
    def set_importance(self, importance: torch.Tensor) -> None:
        """Fix the importance order from a ``(C,)`` score (descending; ties by channel index)."""
        importance = importance.detach().flatten().float().cpu()
        if importance.numel() != self.channels:
            raise ValueError(
                f"gate {self.name!r}: importance has {importance.numel()} entries, "
                f"expected {self.channels}"
            )
        # stable sort so equal scores keep channel order (deterministic across runs)
        order = torch.sort(-importance, stable=True).indices
        self.order.copy_(order.to(self.order.device))

    # ------------------------------------------------------------------ distributions
    def probs(self) -> torch.Tensor:
        """``(K,)`` float32: ``softmax(u / τ)``."""
        return torch.softmax(self.logits.float() / self.tau, dim=0)

    def width_survival(self) -> torch.Tensor:
        """``(K,)`` float32: ``q_k = P(width >= c_k)``; ``q_1 == 1``."""
        p = self.probs()
        return torch.flip(torch.cumsum(torch.flip(p, (0,)), 0), (0,))

    def soft_mask(self) -> torch.Tensor:
        """``(C,)`` float32 relaxed mask in *channel* order (values in ``(0, 1]``)."""
        sorted_mask = torch.repeat_interleave(self.width_survival(), self.divisor)
        # channel order: mask[order[i]] = sorted_mask[i]; an index_put keeps the graph.
        return torch.zeros_like(sorted_mask).index_put((self.order,), sorted_mask)

    def expected_width(self) -> torch.Tensor:
        """Scalar float32 ``E = Σ_k p_k c_k`` (differentiable)."""
        return (self.probs() * self.widths_table.to(self.logits.device)).sum()

    # ------------------------------------------------------------------ hard network
    def hard_width(self, expected: float | None = None) -> int:
        """Kept channels of the hard network: ``E`` rounded to a multiple of ``d`` in ``[d, C]``.

        ``expected``: ``E`` already read to the host (``float(self.expected_width())``), so that
        many gates' widths cost one host read together (:meth:`s2h.runtime.GateRuntime.prepare`)
        instead of a device sync each."""
        if expected is None:
            with torch.no_grad():
                expected = float(self.expected_width())
        e = float(expected)
        if self.rounding == "ceil":
            # guard the float rounding of E just above a multiple of d (e.g. 16.000001)
            k = math.ceil(e / self.divisor - 1e-6) * self.divisor
        else:
            # half-way rounds up (1e-4: float32 error of E/d)
            k = math.floor(e / self.divisor + 0.5 + 1e-4) * self.divisor
        return int(min(self.channels, max(self.divisor, k)))

    def hard_width_ste(self) -> torch.Tensor:
        """Scalar: forward value ``hard_width()``, gradient of ``expected_width()``."""
        e = self.expected_width()
        return e + (float(self.hard_width()) - e).detach()

    def keep_index(self, width: int | None = None) -> torch.Tensor:
        """``(k,)`` int64, ascending: the channels the hard network keeps.

        The tensor is cached while the width and the order stay the same: the channel ops check
        an index tensor's range once per tensor object (a host sync on CUDA), so handing every
        step the same object keeps the hard path free of syncs."""
        k = self.hard_width() if width is None else int(width)
        key = (k, self.order.device, self.order._version, self.order.data_ptr())
        cached = getattr(self, "_keep_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        keep = torch.sort(self.order[:k]).values
        object.__setattr__(self, "_keep_cache", (key, keep))
        return keep

    def hard_mask(self, soft_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(k,)`` straight-through mask: value 1, gradient to ``soft_mask[keep]``."""
        kept = soft_mask.index_select(0, keep)
        return kept + (1.0 - kept).detach()

    # ------------------------------------------------------------------ control
    @torch.no_grad()
    def set_width(self, width: int, sharpness: float = 20.0) -> None:
        """Set the logits so the hard width is ``width`` (rounded to the divisor).

        Puts almost all probability on ``width`` (benchmarks, tests, STP-style control).
        """
        k = min(self.num_widths, max(1, math.ceil(width / self.divisor)))
        logits = torch.full_like(self.logits, -sharpness * self.tau)
        logits[k - 1] = sharpness * self.tau
        self.logits.copy_(logits)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, channels={self.channels}, divisor={self.divisor}, "
            f"widths={self.num_widths}, tau={self.tau}, rounding={self.rounding!r}"
        )


class GateBank:
    """Every gate's per-step quantities at once: one padded softmax over all the gates' logits.

    A step needs every gate's ``E`` several times (the hard widths, the differentiable FLOPs
    ratio, the metrics), and every gate's soft and straight-through masks. Per gate that is a
    few ops each (a softmax, a division, a product and a sum for ``E``; a cumulative sum, two
    flips, a repeat and a scatter for the mask): on a GPU, kernel launches of a host-bound step
    (ResNet-50's 37 gates: ~2,900 of its ~8,200 ATen ops a step). Here the logits are in one
    ``(G, K_max)`` table padded with ``-inf`` (probability 0), so the distributions, ``E``,
    the soft masks (one gather from the survival table) and the straight-through masks (one
    ``index_select``) of all gates cost a handful of ops, forward and backward, whatever the
    number of gates. Each result equals the gate's own method up to float rounding (sums may
    run in another order).
    """

    def __init__(self, gates: Iterable[ChannelGate]) -> None:
        self.gates = list(gates)
        ks = [g.num_widths for g in self.gates]
        self.k_max = max(ks, default=1)
        rows = torch.repeat_interleave(torch.arange(len(ks)), torch.tensor(ks, dtype=torch.long))
        cols = torch.cat([torch.arange(k) for k in ks]) if ks else torch.zeros(0, dtype=torch.long)
        self._flat = rows * self.k_max + cols
        table = torch.zeros(len(ks), self.k_max)
        if ks:
            table[rows, cols] = torch.cat([(torch.arange(1, k + 1) * g.divisor).float()
                                           for k, g in zip(ks, self.gates, strict=True)])
        self._table = table
        self._tau = torch.cat([torch.full((k,), float(g.tau)) for k, g in
                               zip(ks, self.gates, strict=True)]) if ks else torch.zeros(0)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self.gates)

    def holds(self, gates: list[ChannelGate]) -> bool:
        """Whether this bank is of exactly ``gates`` (the same objects, in order)."""
        return len(self.gates) == len(gates) and all(
            a is b for a, b in zip(self.gates, gates, strict=True))

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = tuple(x.to(device) for x in (self._flat, self._table, self._tau))
        return t

    def probs(self) -> torch.Tensor:
        """``(G, K_max)`` float32: row ``i`` is ``gates[i].probs()`` padded with zeros."""
        device = self.gates[0].logits.device
        flat_index, _table, tau = self._tensors(device)
        u = torch.cat([g.logits for g in self.gates]).float() / tau
        padded = u.new_full((len(self.gates) * self.k_max,), float("-inf"))
        padded = padded.index_put((flat_index,), u).view(len(self.gates), self.k_max)
        return torch.softmax(padded, dim=1)

    def expected(self, probs: torch.Tensor | None = None) -> torch.Tensor:
        """``(G,)`` float32: ``E`` of every gate (differentiable w.r.t. every gate's logits);
        ``probs``: :meth:`probs` already computed this step."""
        if not self.gates:
            return torch.zeros(0)
        p = self.probs() if probs is None else probs
        return (p * self._tensors(p.device)[1]).sum(1)

    def _mask_index(self, device: torch.device) -> torch.Tensor:
        """``(Σ C,)``: for every gate's channels in channel order, the entry of the flattened
        ``(G, K_max)`` survival table that is its soft mask (``q[i, rank // d]`` with ``rank``
        the channel's place in the gate's importance order). Rebuilt when an order changes
        (tracked by the order buffers' version counters)."""
        key = (device, *((id(g.order), g.order._version, g.order.data_ptr()) for g in self.gates))
        cached = getattr(self, "_mask_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        parts = []
        for i, g in enumerate(self.gates):
            order = g.order.detach().cpu()
            src = torch.empty(g.channels, dtype=torch.long)
            src[order] = i * self.k_max + torch.arange(g.channels) // g.divisor
            parts.append(src)
        index = torch.cat(parts).to(device)
        self._mask_cache = (key, index)
        return index

    def soft_masks(self, probs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every gate's :meth:`ChannelGate.soft_mask` (``(C_i,)``, channel order), computed for
        all gates at once: views of one tensor, differentiable w.r.t. every gate's logits."""
        if not self.gates:
            return []
        p = self.probs() if probs is None else probs
        q = torch.flip(torch.cumsum(torch.flip(p, (1,)), 1), (1,))  # P(width >= c_k)
        flat = q.reshape(-1).index_select(0, self._mask_index(p.device))
        return list(flat.split([g.channels for g in self.gates]))

    def hard_masks(self, soft: list[torch.Tensor], keeps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every gate's :meth:`ChannelGate.hard_mask` of ``soft[i]`` (from :meth:`soft_masks`,
        views of one tensor) at ``keeps[i]`` (each gate's cached ``keep_index``) in three
        ops for all gates: value 1, gradient to the soft masks' kept entries."""
        if not soft:
            return []
        base = soft[0]._base
        if base is None or any(t._base is not base for t in soft):
            return [g.hard_mask(m, k) for g, m, k in zip(self.gates, soft, keeps, strict=True)]
        key = tuple(id(k) for k in keeps)
        cached = getattr(self, "_keep_cache", None)
        if cached is None or cached[0] != key or cached[1].device != base.device:
            offsets, off = [], 0
            for g in self.gates:
                offsets.append(off)
                off += g.channels
            flat_keep = torch.cat([k.to(base.device) + o for k, o in
                                   zip(keeps, offsets, strict=True)])
            cached = self._keep_cache = (key, flat_keep, keeps)  # keeps: the ids stay theirs
        kept = base.index_select(0, cached[1])
        return list((kept + (1.0 - kept).detach()).split([k.numel() for k in keeps]))

    def hard_widths(self, expected: torch.Tensor | None = None) -> list[int]:
        """Every gate's :meth:`ChannelGate.hard_width`, with one host read for all of them."""
        if expected is None:
            with torch.no_grad():
                expected = self.expected()
        host = expected.detach().tolist()
        return [g.hard_width(e) for g, e in zip(self.gates, host, strict=True)]
