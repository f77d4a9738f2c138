"""The S2H pruner: gates on dependency groups, the dual forward, the S2H step, FLOPs, export.

Typical use::

    pruner = s2h.S2HPruner(model, (torch.randn(2, 3, 32, 32),), target_flops=0.35)
    opt = torch.optim.AdamW([
        {"params": pruner.weight_parameters(), "lr": 1e-3, "weight_decay": 5e-4},
        {"params": pruner.gate_parameters(), "lr": 0.1, "weight_decay": 0.0},
    ])
    for x, y in loader:
        metrics = pruner.train_step(x, y, opt)
    small = pruner.export()          # plain torch.nn modules, kept channels only
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from . import graph as _graph
from . import losses as _losses
from . import registry as _registry
from .export import (
    EXPORT_TOLERANCE,
    ExportMismatchWarning,
    detect_builder,
    export_difference,
    routed_swap,
)
from .gates import ChannelGate, GateBank, effective_divisor
from .losses import RESOURCE_MODES, VARIANTS
from .nn import MaskedBatchNorm2d, MaskedLayer
from .numerics import (
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteStateError,
    first_non_finite,
    optimizer_step,
)
from .runtime import GateRuntime, IndexedGate, RepeatedGate, Route, SegmentedGate, WidthAttr
from .utils import Inputs, as_tuple, channels_last_inputs, set_submodule, use_channels_last

__all__ = ["EXPORT_TOLERANCE", "ExportMismatchWarning", "NonFiniteGradientError",
           "NonFiniteLossError", "NonFiniteStateError", "S2HPruner", "export_difference",
           "optimizer_step"]


class S2HPruner:
    """Soft-to-Hard pruning of ``model`` to ``target_flops`` (remaining FLOPs fraction).

    Args:
        model: any ``nn.Module``; its prunable layers (exact ``nn.Conv2d`` / ``nn.Linear`` /
            ``nn.BatchNorm2d`` / ``nn.LayerNorm``) are switched *in place* to their masked
            subclasses (same parameters, same ``state_dict`` keys).
        example_inputs: a tensor or tuple of positional inputs that runs through ``model``; used
            once to find the dependency groups and count FLOPs (batch 1-2 is enough).
        target_flops: remaining FLOPs fraction ``T`` in ``(0, 1]`` (0.15 = keep 15%).
        divisor: width granularity (widths are multiples of it: hardware-friendly).
        tau: gate softmax temperature.
        alpha: weight of the two gap (distillation) terms.
        lam: weight of the resource term ``(F/F_dense - T)^2`` (``resource_mode="quadratic"``;
            in the normalised mode it only scales the logged ``resource`` value).
        resource_mode: how the resource term's gradient reaches the gates (METHOD §4).
            ``"normalized"`` (default): per gate, the gradient of the FLOPs ratio ``r`` is
            rescaled to ``resource_ratio`` times the norm of that gate's *other* gradients
            (performance + both gap terms), with the sign of ``r - T``, and faded inside a band
            around the target by ``min((r - T)^2 / resource_band^2, 1)``: λ drops out, and the
            run settles within about ``resource_band`` of ``T`` whatever the task gradient's
            size.  ``"quadratic"``: the plain ``λ (r - T)^2`` gradient, which settles at an
            offset of about ``‖∂L/∂u‖ / (2λ‖∂r/∂u‖)`` above ``T`` (measured: 0.200 for a 0.15
            target on ResNet-20 / Fashion-MNIST).  A gate whose other gradients are all zero gets
            the plain quadratic gradient.
        resource_ratio: see ``resource_mode`` (default 2.0: above 1, so that the resource
            gradient wins where it directly opposes the others, outside the band).
        resource_band: the fade band ``relax`` of ``resource_mode="normalized"`` (default 0.02).
        init_gap: initial expected width ``C - init_gap * d`` of every gate (:mod:`s2h.gates`).
        ignore: module names (``model.named_modules()``) never pruned; every group touching
            them keeps all channels.
        rounding: how a gate's expected width becomes the hard width: ``"nearest"`` multiple of
            the divisor (default) or ``"ceil"`` (see :mod:`s2h.gates` for why nearest).
        fused: run soft and hard *together* (lockstep, :mod:`s2h.dual`) so that every conv /
            linear computes both paths with one fused dual op (``s2h.functional``):
            ``"auto"`` (default) is two passes for now; ``True`` asks for lockstep (an error
            if the model cannot run in lockstep or fails the check below), ``False`` is two
            passes. Lockstep is validated once against two passes on the example inputs.
            Why ``"auto"`` no longer picks lockstep on CUDA: on an H200 (2026-11-29, torch
            2.11, Triton 3.6) the fused kernels ran 0.35-0.74x the speed of the plain PyTorch
            dual layer (first config, no autotuning), the linear weight-gradient kernel missed
            the error bound at 4 of 8 ViT-B/16 shapes, and the self-check refused ResNet-50
            with TF32 on; see ``bench/results/gpu-2026-11-29.md``.
        grad_balance: deprecated alias: ``grad_balance=r`` is ``resource_mode="normalized",
            resource_ratio=r``.  It used to rescale against the gap gradients only, with no
            fade band; that form was replaced (measured: it ended at 0.521 for a 0.15 target on
            ResNet-20, where the normalised form ends at the target).
        variant: ``"s2h"`` (default, METHOD §4), or one of the paper's ablations:
            ``"no_gap"`` (no distillation: the hard network is just the discretised soft one),
            ``"coupled_gap"`` (plain bidirectional KL, gradients to everything), or
            ``"direct_hard"`` (train the hard network on the labels, gates through its STE).
        warn: emit a warning for each group that is left unpruned for a non-obvious reason.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        target_flops: float,
        *,
        divisor: int = 8,
        tau: float = 1.0,
        alpha: float = 1.0,
        lam: float = 4.0,
        ignore: Iterable[str] = (),
        warn: bool = True,
        rounding: str = "nearest",
        variant: str = "s2h",
        fused: bool | str = "auto",
        grad_balance: float | None = None,
        resource_mode: str = "normalized",
        resource_ratio: float = 2.0,
        resource_band: float = 0.02,
        init_gap: float = 0.25,
    ) -> None:
        if grad_balance is not None:
            if not grad_balance > 0:
                raise ValueError(
                    f"grad_balance must be a positive ratio or None, got {grad_balance!r}")
            warnings.warn("grad_balance=r is deprecated: it is resource_mode='normalized', "
                          "resource_ratio=r", DeprecationWarning, stacklevel=2)
            resource_mode, resource_ratio = "normalized", float(grad_balance)
        if resource_mode not in RESOURCE_MODES:
            raise ValueError(
                f"resource_mode must be one of {RESOURCE_MODES}, got {resource_mode!r}")
        if not resource_ratio > 0 or not resource_band > 0:
            raise ValueError(f"resource_ratio and resource_band must be > 0, got "
                             f"{resource_ratio!r}, {resource_band!r}")
        self.resource_mode = resource_mode
        self.resource_ratio = float(resource_ratio)
        self.resource_band = float(resource_band)
        self.init_gap = float(init_gap)
        self.arch_frozen = False
        self.projection: dict | None = None
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        if isinstance(target_flops, (bool, np.bool_)) \
                or not isinstance(target_flops, numbers.Real) \
                or not (0.0 < float(target_flops) <= 1.0):
            raise ValueError(
                f"target_flops is the remaining FLOPs fraction and must be in (0, 1], got "
                f"{target_flops!r} (e.g. 0.35 keeps 35% of the FLOPs)"
            )
        if not isinstance(divisor, int) or divisor < 1:
            raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
        if any(isinstance(m, MaskedLayer) and m._s2h is not None for m in model.modules()):
            raise ValueError("this model already has an S2HPruner attached; build one per model")
        self.model = model
        self.example_inputs = as_tuple(example_inputs)
        empty = [tuple(t.shape) for t in self.example_inputs
                 if isinstance(t, torch.Tensor) and (t.numel() == 0 or t.dim() and not len(t))]
        if empty or not self.example_inputs:
            raise ValueError(f"example_inputs must hold at least one sample (batch 1-2 is "
                             f"enough); got {empty or 'nothing'}")
        self.target_flops = float(target_flops)
        self.divisor = divisor
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.ignore = sorted(set(ignore))
        self.rounding = rounding
        #: split-size attributes found by value that are not the split's: never rewritten
        self._dropped_width_attrs: set[tuple[int, str]] = set()

        try:
            self.analysis = _graph.analyze(model, self.example_inputs, set(self.ignore))
        except Exception as exc:
            _explain_inputs(model, self.example_inputs, exc)
            raise
        if warn:
            _graph.warn_frozen(self.analysis)
        self.groups = [g for g in self.analysis.groups if g.prunable]
        if not self.groups:
            reasons = sorted({r for g in self.analysis.groups for r in g.reasons[:1]})
            raise ValueError(
                f"nothing prunable in {type(model).__name__}: no channel group can be pruned "
                "exactly. s2h prunes exact nn.Conv2d / nn.Linear (with BatchNorm2d / LayerNorm, "
                "pointwise ops, pooling and residual adds between them). Reasons seen: "
                + ("; ".join(reasons[:6]) or "no nn.Conv2d / nn.Linear layers were called")
            )
        # METHOD §2: a divisor is lowered until it divides C, and the minimum width is the
        # divisor, so a group narrower than the requested divisor has one possible width: it is
        # kept whole (with a warning). Only when that leaves nothing to prune is it an error.
        small = [g for g in self.groups if getattr(g, "divisor", None) is None
                 and divisor > g.channels]
        if small and len(small) == len(self.groups):
            g = max(small, key=lambda g: g.channels)
            raise ValueError(
                f"divisor={divisor} is larger than every prunable group (the widest is {g.name!r}"
                f" with {g.channels} channels, layers {g.producers + g.consumers}): nothing "
                f"could be pruned. Use a divisor <= {g.channels}."
            )
        for g in small:
            g.frozen = True
            g.reasons.append(f"{g.channels} channels, fewer than divisor={divisor}")
            if warn:
                warnings.warn(
                    f"group {g.name!r} ({g.channels} channels, layers {g.producers + g.consumers})"
                    f" is narrower than divisor={divisor} and is kept whole; pass a smaller "
                    "divisor to prune it",
                    stacklevel=2,
                )
        self.groups = [g for g in self.groups if g not in small]

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.channels_last = use_channels_last(model, device)
        if self.channels_last:
            self.example_inputs = channels_last_inputs(self.example_inputs)
        self._build(device)
        failing = self._groups_failing_narrower()
        if failing:  # model code reads these widths (a reshape to a constant): keep them whole
            self._unswap_layers()
            for g, err in failing:
                g.frozen = True
                g.reasons.append(f"the model fails when it is narrowed ({err})")
                if warn:
                    warnings.warn(
                        f"group {g.name!r} ({g.channels} channels) is left unpruned: the hard "
                        f"network fails when it is narrower ({err}); the model's code probably "
                        "reads this width as a constant, or another group's width as this "
                        "one's (e.g. in a reshape)", stacklevel=2)
            self.groups = [g for g in self.groups if not g.frozen]
            if not self.groups:
                raise ValueError(f"nothing prunable in {type(model).__name__}: every group's "
                                 "narrowing makes the model fail (see the warnings)")
            self._build(device)
        min_ratio = self.flops_ratio(lambda g: float(g.divisor))
        if self.target_flops < min_ratio:
            warnings.warn(
                f"target_flops={self.target_flops} is below the smallest reachable ratio "
                f"{min_ratio:.3f} (every group at its minimum width, divisor={self.divisor}); "
                "the hard network will stop there",
                stacklevel=2,
            )
        self.builder = detect_builder(model, self.example_inputs)
        self.step_count = 0
        self.lockstep = self._decide_lockstep(fused)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "/") or "<root>"

    def _build(self, device: torch.device) -> None:
        """Gates for :attr:`groups`, the layers swapped to their masked classes, FLOPs table."""
        self.gates = nn.ModuleDict()
        self._group_gate: dict[int, ChannelGate] = {}
        self._segmented: dict[int, SegmentedGate | None] = {}  # concat group index -> its gate
        for g in self.groups:
            # a group whose layers impose a width granularity (attention heads: head_dim) gets
            # that divisor, whatever the pruner-wide divisor is: whole heads only
            gate = ChannelGate(g.channels, self._group_divisor(g), self.tau,
                               importance=self._importance(g), name=g.name,
                               rounding=self.rounding, init_gap=self.init_gap)
            self.gates[self._key(g.name)] = gate
            self._group_gate[id(g)] = gate
        self.gates.to(device)
        self.runtime = GateRuntime()
        self._swap_layers()
        self._build_flops_table()

    def _unswap_layers(self) -> None:
        """Undo :meth:`_swap_layers`: plain classes, no gates, no hard BatchNorm statistics."""
        for m in self.masked_layers.values():
            m.release()
        self.masked_layers = {}

    @contextlib.contextmanager
    def trial_widths(self) -> Iterator[None]:
        """Context manager for trying other widths: the model in eval mode (no BatchNorm
        statistic moves), and the gate logits and the model's mode put back on exit."""
        saved = [g.logits.detach().clone() for g in self.gates.values()]
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for g, v in zip(self.gates.values(), saved, strict=True):
                    g.logits.copy_(v)
            self.model.train(was)

    @torch.no_grad()
    def _groups_failing_narrower(self) -> list[tuple[_graph.Group, str]]:
        """Groups whose narrowing makes the hard network raise (the model's code reads their
        width as a constant, e.g. a reshape, or reads one group's width where another's
        channels are): found here, once, rather than at the first training step that narrows
        them. The hard network runs with every group one divisor step narrower, then
        ``ceil(log2(groups))`` times with group ``i`` narrowed by ``1 + bit k of i`` steps, so
        that any two groups differ in width in some run (code that assumes two groups equally
        wide fails there). Where a run fails, the groups are narrowed one more at a time, as
        in that run, to find the culprits."""
        steppable = [g for g in self.groups if g.channels > self.gate_of(g).divisor]

        def error(steps: dict[int, int]) -> str | None:
            for g in self.groups:
                gate = self.gate_of(g)
                gate.set_width(g.channels - steps.get(id(g), 0) * gate.divisor)
            try:
                self.hard_forward(self.example_inputs)
            except Exception as exc:  # noqa: BLE001 - any failure of the model's own code
                return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return None

        def two_steps(g: _graph.Group) -> bool:
            return g.channels >= 3 * self.gate_of(g).divisor

        with self.trial_widths():
            # first which attributes hold split sizes (so that the rest runs with those only)
            failing = self._split_sizes_failing()
            bad = {id(g) for g, _ in failing}
            steppable = [g for g in steppable if id(g) not in bad]
            runs = [{id(g): 1 for g in steppable}]
            k = 0
            while (1 << k) < len(steppable):
                runs.append({id(g): 1 + ((i >> k) & 1 if two_steps(g) else 0)
                             for i, g in enumerate(steppable)})
                k += 1
            for run in runs:
                steppable = [g for g in steppable if id(g) not in bad]
                if not steppable or error({i: run[i] for i in map(id, steppable)}) is None:
                    continue
                ok: dict[int, int] = {}
                for g in steppable:
                    err = error({**ok, id(g): run[id(g)]})
                    if err is None:
                        ok[id(g)] = run[id(g)]
                    else:
                        failing.append((g, err))
                        bad.add(id(g))
            return failing

    @torch.no_grad()
    def _split_sizes_failing(self) -> list[tuple[_graph.Group, str]]:
        """The pieces of a split whose sizes the hard network reads from module attributes
        (``runtime.width_attrs``, found by value): with its pieces one step narrower and every
        other group whole, the hard network must equal the masked dense (soft) one, whose
        masks are then exactly 0 / 1. Where several attributes hold the size, the first that
        passes alone is kept (the others are left as they are); where none passes, the
        attribute was not the split's size (or more than the split reads it): the pieces are
        kept whole. Runs in :meth:`trial_widths`."""
        by_gate = {id(self.gate_of(g)): g for g in self.groups}
        done: set[int] = set()
        out: list[tuple[_graph.Group, str]] = []
        splits: dict[tuple, list] = {}  # the attributes of one split share its pieces' gates
        for entry in self.runtime.width_attrs:
            if entry[2].how == "reshape":  # a reshape's width: checked by running narrower
                continue
            splits.setdefault(tuple(id(g) for g in entry[2].gates), []).append(entry)
        every = list({id(by_gate[id(g)]): by_gate[id(g)] for e in self.runtime.width_attrs
                      for g in e[2].gates if id(g) in by_gate
                      and by_gate[id(g)].channels > g.divisor}.values())
        if not every or self._split_mismatch(every) is None:
            return []  # all at once first: one hard and one soft forward in the common case
        for entries in splits.values():
            pieces = [by_gate[id(g)] for g in entries[0][2].gates if id(g) in by_gate]
            pieces = [g for g in pieces if id(g) not in done
                      and g.channels > self.gate_of(g).divisor]
            if not pieces:
                continue
            why = self._split_mismatch(pieces)
            if why is not None and len(entries) > 1:
                for keep in entries:  # one attribute alone
                    self.runtime.width_attrs = [e for e in self.runtime.width_attrs
                                                if e not in entries or e is keep]
                    if self._split_mismatch(pieces) is None:
                        why = None
                        self._dropped_width_attrs |= {(id(e[0]), e[1]) for e in entries
                                                      if e is not keep}
                        break
                    self.runtime.width_attrs.extend(e for e in entries if e is not keep)
            if why is not None:
                for g in pieces:
                    done.add(id(g))
                    out.append((g, why))
        return out

    def _split_mismatch(self, pieces: list[_graph.Group]) -> str | None:
        """Why the hard network with ``pieces`` one step narrower (the rest whole) is not the
        masked dense one; None when it is."""
        for g in self.groups:
            gate = self.gate_of(g)
            gate.set_width(g.channels - gate.divisor if g in pieces else g.channels)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        try:  # full fp32 products: a wrong cut differs by O(1), rounding by ~1e-6
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            hard = [t for t in pytree.tree_leaves(self.hard_forward(self.example_inputs))
                    if isinstance(t, torch.Tensor)]
            soft = [t for t in pytree.tree_leaves(self.soft_forward(self.example_inputs))
                    if isinstance(t, torch.Tensor)]
            diff = max(float((h.float() - s.float()).abs().max())
                       for h, s in zip(hard, soft, strict=True))
        except Exception as exc:  # noqa: BLE001 - any failure of the model's own code
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        scale = max(float(h.float().abs().max()) for h in hard)
        if diff <= 1e-3 * scale + 1e-6:
            return None
        names = ", ".join(f"{type(o).__name__}.{a}" for o, a, _ in self.runtime.width_attrs)
        return (f"with the split sizes ({names}) set to the kept widths the hard network "
                f"differs from the masked dense one by {diff:.3g}")

    def _group_divisor(self, g: _graph.Group) -> int:
        """The divisor of ``g``'s gate: the layers' granularity (attention heads: head_dim),
        else the pruner's; for a group pruned in whole conv groups (:attr:`Group.block`), the
        fewest whole blocks that reach the pruner's divisor, lowered until they divide the
        group (a multiple of the block: every width keeps whole conv groups)."""
        if g.divisor is not None:
            return g.divisor
        if g.block > 1:
            nblocks = g.channels // g.block
            return g.block * effective_divisor(nblocks, -(-self.divisor // g.block))
        return self.divisor

    def _importance(self, group: _graph.Group) -> torch.Tensor:
        """Mean over producers of the per-output-channel L1 norm of the producing weights
        (each layer kind scores its channels: :attr:`s2h.registry.LayerHandler.importance`)."""
        scores = []
        for name in group.producers + group.depthwise:
            m = self.model.get_submodule(name)
            handler = _registry.handler_for(type(m))
            score = handler.importance(m, group.roles.get(name, "out"))
            ranges = group.producer_ranges.get(name)
            if ranges:  # a piece of a split output: its channel ranges (several: a chunk)
                score = torch.stack([score[a:b] for a, b in ranges]).mean(0)
            scores.append(score)
        if not scores:
            return torch.zeros(group.channels)
        score = torch.stack(scores).mean(0)
        if group.block > 1:  # whole conv groups: each channel scores its block's mean, so the
            # (stable) order keeps every block contiguous and a width of whole blocks keeps them
            score = score.view(-1, group.block).mean(1).repeat_interleave(group.block)
        return score

    def gate_of(self, group: _graph.Group) -> ChannelGate:
        """The gate of a prunable group (one of :attr:`groups`)."""
        return self._group_gate[id(group)]

    def _gate_of_group_index(self, idx: int | None) -> ChannelGate | SegmentedGate | None:
        """The gate of group ``idx``: its own, a :class:`SegmentedGate` over its segments' gates
        (a concat's channels), or None (kept whole)."""
        if idx is None:
            return None
        group = self.analysis.groups[idx]
        if group.positions and not group.frozen:
            if idx not in self._segmented:
                gate = self._indexed_gate(group.positions, f"mix:{group.name}")
                self._segmented[idx] = gate if gate.gates else None
            return self._segmented[idx]
        if not group.segments or group.frozen:
            return self._group_gate.get(id(group))
        if idx not in self._segmented:
            segs = [(self._gate_of_group_index(i) if i is not None else None, w)
                    for i, w in group.segments]
            self._segmented[idx] = (SegmentedGate(segs, f"cat:{group.name}")
                                    if any(g is not None for g, _ in segs) else None)
        return self._segmented[idx]

    def _indexed_gate(self, positions: list, name: str) -> IndexedGate:
        """An :class:`IndexedGate` over ``(group index or None, channel)`` positions."""
        pos = []
        for i, c in positions:
            g = self._gate_of_group_index(i)
            if g is not None and not isinstance(g, ChannelGate):
                raise AssertionError(f"{name}: mixed channels of a concat or of mixed channels")
            pos.append((g, c))
        return IndexedGate(pos, name)

    def _build_routes(self) -> None:
        """The modules whose channel shuffle the hard network routes (:class:`Route`)."""
        for mname, sites in self.analysis.routes.items():
            owner = self.model.get_submodule(mname)
            router = _registry.router_for(type(owner))
            cuts = sorted((d, out) for kind, _, out, d in sites if kind == "cut")
            shuffle = next(s for s in sites if s[0] == "shuffle")
            _, cat, out, sigma = shuffle
            self.runtime.routes.append(Route(
                owner, router.routed,
                self._indexed_gate(cuts[0][1], f"{mname}.cut") if cuts else None,
                self._indexed_gate(cat, f"{mname}.cat"), self._indexed_gate(out, f"{mname}.out"),
                list(sigma)))

    def _swap_layers(self) -> None:
        an = self.analysis
        self.masked_layers: dict[str, nn.Module] = {}
        for name, rec in an.layers.items():
            if rec.kind == "fixed":
                continue
            in_gate = self._gate_of_group_index(an.layer_in_group.get(name))
            repeat = an.layer_in_repeat.get(name, 1)
            if in_gate is not None and repeat > 1:  # a linear layer fed a flattened C x h x w
                in_gate = RepeatedGate(in_gate, repeat)
            out_gate = self._gate_of_group_index(an.layer_out_group.get(name))
            extra = {role: self._gate_of_group_index(i)
                     for role, i in an.layer_extra_group.get(name, {}).items()}
            if in_gate is None and out_gate is None and not any(extra.values()):
                continue
            m = rec.module
            cls = _registry.masked_class(type(m))
            m.__class__ = cls
            m.attach_gates(self.runtime, in_gate, out_gate, name, extra=extra)
            if isinstance(m, MaskedBatchNorm2d):
                m.add_hard_stats()
            self.masked_layers[name] = m
        # module attributes holding split sizes (``self.width``): the kept widths in hard mode
        for mname, attr, how, orig, pieces in an.width_attrs:
            wa = WidthAttr(how, orig, [(self._gate_of_group_index(i), w) for i, w in pieces])
            owner = self.model.get_submodule(mname)
            if any(g is not None for g, _ in wa.pieces) \
                    and (id(owner), attr) not in self._dropped_width_attrs:
                self.runtime.width_attrs.append((owner, attr, wa))
        self._build_routes()
        # per-channel parameters outside the layers (layer-scale gamma): sliced in hard mode
        self._param_slices: list[tuple[str, int, ChannelGate]] = []
        for g in self.groups:
            gate = self._group_gate[id(g)]
            for pname, dim in g.params:
                owner_name, _, attr = pname.rpartition(".")
                owner = self.model.get_submodule(owner_name)
                self.runtime.param_slices.append((owner, attr, dim, gate))
                self._param_slices.append((pname, dim, gate))

    def _build_flops_table(self) -> None:
        an = self.analysis
        # (dense_flops, gates): the term scales with width/channels of each gate (METHOD §4:
        # a conv with its input and output groups, a depthwise conv with its one group, the
        # attention matmuls with the kept heads)
        self._flop_terms: list[tuple[str, int, tuple[ChannelGate, ...]]] = []  # (layer, ...)
        prunable_total = 0
        for name, rec in an.layers.items():
            if rec.dense_flops == 0 or rec.kind == "fixed":
                continue
            by_role = {"in": an.layer_in_group.get(name), "out": an.layer_out_group.get(name),
                       **an.layer_extra_group.get(name, {})}
            rows = tuple(self._gate_of_group_index(i) for i in an.layer_row_groups.get(name, []))
            for flops, roles in rec.flop_parts:
                gates = tuple(g for g in (*(self._gate_of_group_index(by_role.get(r))
                                            for r in roles), *rows) if g is not None)
                self._flop_terms.append((name, flops, gates))
                prunable_total += flops
        self.dense_flops = an.total_flops
        self._const_flops = an.total_flops - prunable_total

    # ------------------------------------------------------------------ parameters
    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """The gate logits (one ``(K,)`` tensor per group): give them their own lr, no decay."""
        return iter([g.logits for g in self.gates.values()])

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of the model (the gates live outside it)."""
        return iter(list(self.model.parameters()))

    def to(self, *args: Any, **kwargs: Any) -> S2HPruner:
        self.model.to(*args, **kwargs)
        self.gates.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------ widths and FLOPs
    def flops_ratio(self, width_of: Callable[[ChannelGate], Any],
                    skip: Iterable[str] = frozenset(),
                    mask_of: Callable[[ChannelGate], torch.Tensor] | None = None) -> Any:
        """FLOPs over dense with each gate at ``width_of(gate)``; layers in ``skip`` do not run
        (STP's dropped blocks). ``mask_of``: each gate's soft mask, for the gradient of mixed
        channels' widths (:meth:`IndexedGate.width`)."""
        total = self._const_flops
        widths: dict[int, Any] = {}

        def once(gate: ChannelGate) -> Any:  # each gate's width once per call, not per term
            w = widths.get(id(gate))
            if w is None:
                w = widths[id(gate)] = width_of(gate)
            return w

        for name, flops, gates in self._flop_terms:
            if name in skip:
                continue
            f = 1.0
            for gate in gates:
                if isinstance(gate, IndexedGate):  # once per call too
                    w = widths.get(id(gate))
                    if w is None:
                        w = widths[id(gate)] = gate.width(once, mask_of)
                else:
                    w = gate.width(once) if isinstance(gate, SegmentedGate) else once(gate)
                f = f * (w / gate.channels)
            total = total + flops * f
        return total / self.dense_flops

    def gate_bank(self) -> GateBank:
        """Every gate's expected width in a few ops (:class:`s2h.gates.GateBank`), for the
        step's widths and FLOPs ratio; rebuilt if the gates change."""
        gates = list(self.gates.values())
        bank = getattr(self, "_bank", None)
        if bank is None or not bank.holds(gates):
            bank = self._bank = GateBank(gates)
            self._flops_vec = None
        return bank

    def _gate_widths(self) -> dict[int, int]:
        """``{id(gate): hard width}`` for every gate, with one host read for all of them
        (``hard_width()`` alone reads ``E`` with a device sync per gate)."""
        bank = self.gate_bank()
        return {id(g): k for g, k in zip(bank.gates, bank.hard_widths(), strict=True)}

    def hard_flops_ratio(self) -> float:
        """FLOPs of the current hard network over the dense model (as the exported model counts)."""
        widths = self._gate_widths()
        return float(self.flops_ratio(
            lambda g: float(widths[id(g)] if id(g) in widths else g.hard_width())))

    def _flops_tensors(self, device: torch.device) -> tuple | None:
        """The FLOPs table as tensors for :meth:`soft_flops_ratio`: each term's slots (its gates'
        positions in the bank, a concat's row after them, a constant-one slot as padding), the
        concats' segment matrix and fixed widths, the slots' channels, the terms' FLOPs. None if
        a term's gate is not in the bank (then the per-gate path is used)."""
        bank = self.gate_bank()
        cache = getattr(self, "_flops_vec", None)
        if cache is not None and cache[0] == device:
            return cache[1]
        pos = {id(g): i for i, g in enumerate(bank.gates)}
        n = len(bank.gates)
        segmented: dict[int, int] = {}
        rows: list[SegmentedGate] = []
        slots: list[list[int]] = []
        for _name, _flops, gates in self._flop_terms:
            term = []
            for g in gates:
                if isinstance(g, IndexedGate):  # mixed channels: the per-gate path
                    self._flops_vec = (device, None)
                    return None
                if isinstance(g, SegmentedGate):
                    if id(g) not in segmented:
                        segmented[id(g)] = len(rows)
                        rows.append(g)
                    term.append(n + segmented[id(g)])
                elif id(g) in pos:
                    term.append(pos[id(g)])
                else:
                    self._flops_vec = (device, None)
                    return None
            slots.append(term)
        seg_matrix = torch.zeros(len(rows), n)
        seg_fixed = torch.zeros(len(rows))
        for r, sg in enumerate(rows):
            for g, w in sg.segments:
                if g is None:
                    seg_fixed[r] += w
                elif id(g) in pos:
                    seg_matrix[r, pos[id(g)]] += 1.0
                else:
                    self._flops_vec = (device, None)
                    return None
        one = n + len(rows)  # the padding slot: a factor of 1
        depth = max((len(t) for t in slots), default=0)
        index = torch.full((len(slots), max(depth, 1)), one, dtype=torch.long)
        for i, t in enumerate(slots):
            index[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        channels = torch.tensor([float(g.channels) for g in bank.gates]
                                + [float(sg.channels) for sg in rows] + [1.0])
        flops = torch.tensor([float(f) for _n, f, _g in self._flop_terms], dtype=torch.float64)
        out = tuple(t.to(device) for t in (index, seg_matrix, seg_fixed, channels, flops))
        self._flops_vec = (device, out)
        return out

    def soft_flops_ratio(self) -> torch.Tensor:
        """Differentiable FLOPs ratio: value of the hard widths, gradient of the expected widths.

        Computed for all terms at once from the bank's expected widths (a gather and a product
        over each term's gates), the same value as ``flops_ratio(gate.hard_width_ste)`` in a
        few ops instead of a few per FLOPs term and gate."""
        bank = self.gate_bank()
        device = self.device()
        tensors = self._flops_tensors(device) if len(bank) else None
        if tensors is None:
            masks: dict[int, torch.Tensor] = {}

            def mask_of(g: ChannelGate) -> torch.Tensor:  # mixed channels' expected counts
                if not masks:  # every gate's soft mask at once, only if some term asks
                    masks.update(zip(map(id, bank.gates), bank.soft_masks(), strict=True))
                return masks[id(g)] if id(g) in masks else g.soft_mask()

            return self.flops_ratio(lambda g: g.hard_width_ste(), mask_of=mask_of)
        index, seg_matrix, seg_fixed, channels, flops = tensors
        with torch.autocast(device.type, enabled=False):  # widths exact, not bf16
            e = bank.expected()
            k = torch.tensor(bank.hard_widths(e), dtype=e.dtype, device=e.device)
            w = e + (k - e).detach()  # straight-through: the hard widths' value, E's gradient
            if len(seg_fixed):
                w = torch.cat([w, seg_matrix @ w + seg_fixed])
            frac = torch.cat([w, w.new_ones(1)]) / channels
            prunable = (flops * frac[index].prod(1).double()).sum()
            return ((prunable + self._const_flops) / self.dense_flops).float()

    def widths(self) -> dict[str, int]:
        """Kept channels per group (keyed by the group's first producing layer)."""
        return {g.name: self._group_gate[id(g)].hard_width() for g in self.groups}

    def group_channels(self) -> dict[str, int]:
        """Full channels per group."""
        return {g.name: g.channels for g in self.groups}

    @torch.no_grad()
    def set_widths(self, widths: dict[str, int] | float) -> None:
        """Force the hard widths: a dict ``{group: width}``, or a FLOPs ratio to reach by a
        uniform channel fraction (bisection). For benchmarks, tests and warm starts."""
        if isinstance(widths, dict):
            for g in self.groups:
                if g.name in widths:
                    self._group_gate[id(g)].set_width(int(widths[g.name]))
            return
        target = float(widths)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            for g in self.groups:
                self._group_gate[id(g)].set_width(max(1, round(mid * g.channels)))
            if self.hard_flops_ratio() > target:
                hi = mid
            else:
                lo = mid
        for g in self.groups:
            self._group_gate[id(g)].set_width(max(1, round(hi * g.channels)))

    # ------------------------------------------------------------------ forward
    def mode(self, mode: str) -> AbstractContextManager[None]:
        """Context manager: run ``self.model`` as the ``"soft"``, ``"hard"`` or ``"dense"`` net.

        Gate states are (re)computed on entry, with gradients enabled if autograd is.
        """
        self.runtime.prepare(self.gates.values(), self.device(), self.gate_bank())
        return self.runtime.use(mode)

    def device(self) -> torch.device:
        """The device of the model's parameters (where the gates' states are put)."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def _decide_lockstep(self, fused) -> bool:
        if fused is False or fused == "never":
            return False
        if fused == "auto":  # two passes until the fused path is measured to help (docstring)
            return False
        if fused is not True:
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        from . import dual

        if self.runtime.width_attrs:  # both halves would be cut at the same (full) sizes
            names = sorted({f"{type(o).__name__}.{a}" for o, a, _ in self.runtime.width_attrs})
            reason = f"a split reads its sizes from {', '.join(names)}"
        elif self.runtime.routes:  # the halves need different code (the hard one routed)
            reason = (f"the channel shuffle of {type(self.runtime.routes[0].owner).__name__} is "
                      "routed by index in the hard network only")
        else:
            reason = dual.validate(self)
        if reason is None:
            return True
        msg = (f"lockstep (fused dual) forward is not usable for {type(self.model).__name__}: "
               f"{reason}")
        if fused is True:
            raise ValueError(msg + "; use fused=False (two passes)")
        warnings.warn(msg + "; falling back to two passes", stacklevel=3)
        return False

    def two_pass_forward(self, inputs: tuple) -> tuple[Any, Any]:
        """``(soft_out, hard_out)`` by two passes of the model (soft, then hard)."""
        self.runtime.prepare(self.gates.values(), self.device(), self.gate_bank())
        with self.runtime.use("soft"):
            soft = self.model(*inputs)
        with self.runtime.use("hard"):
            hard = self.model(*inputs)
        return soft, hard

    def dual_forward(self, inputs: Inputs) -> tuple[Any, Any]:
        """``(soft_out, hard_out)``: the full-width relaxed network and the kept-channel one.

        In lockstep mode (``fused``) one pass computes both, through the fused dual ops."""
        inputs = self._inputs(inputs)
        if self.lockstep:
            from . import dual

            self.runtime.prepare(self.gates.values(), self.device(), self.gate_bank())
            return dual.dual_forward(self.model, list(self.masked_layers.values()), inputs)
        return self.two_pass_forward(inputs)

    def _inputs(self, inputs) -> tuple:
        inputs = as_tuple(inputs)
        return channels_last_inputs(inputs) if self.channels_last else inputs

    def hard_forward(self, inputs: Inputs) -> Any:
        inputs = self._inputs(inputs)
        with self.mode("hard"):
            return self.model(*inputs)

    def soft_forward(self, inputs: Inputs) -> Any:
        inputs = self._inputs(inputs)
        with self.mode("soft"):
            return self.model(*inputs)

    # ------------------------------------------------------------------ losses and the step
    def losses(self, soft_out: torch.Tensor, hard_out: torch.Tensor, targets: torch.Tensor,
               loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
        """The four terms of METHOD §4 with this pruner's settings (:func:`s2h.losses.loss_terms`;
        the freeze phase has no resource term)."""
        return _losses.loss_terms(soft_out, hard_out, targets, self.soft_flops_ratio(),
                                  target=self.target_flops, alpha=self.alpha, lam=self.lam,
                                  variant=self.variant, resource=not self.arch_frozen,
                                  loss_fn=loss_fn)

    def backward(self, terms: dict[str, torch.Tensor], scaler: torch.amp.GradScaler | None = None,
                 grad_hook: Callable[[], None] | None = None) -> None:
        """Accumulate the gradients of the four terms with the routing of METHOD §4
        (:func:`s2h.losses.routed_backward`) into the weights and the trainable gate logits."""
        _losses.routed_backward(
            terms, [g for g in self.gate_parameters() if g.requires_grad],
            resource_mode=self.resource_mode, target=self.target_flops,
            resource_ratio=self.resource_ratio, band=self.resource_band, lam=self.lam,
            scaler=scaler, grad_hook=grad_hook)

    def warmup_step(self, inputs: Inputs, targets: torch.Tensor,
                    optimizer: torch.optim.Optimizer, *, loss_fn: Callable | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    max_grad_norm: float | None = None,
                    grad_hook: Callable[[], None] | None = None) -> dict[str, float]:
        """One weight warm-up step (METHOD §4, phases): the dense network on the task loss, no
        gate involved (the hard network is the full one until the gates move).  Same metrics
        keys as :meth:`train_step` (the gap and resource terms are 0)."""
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        with self.mode("dense"):
            out = self.model(*self._inputs(inputs))
        perf = (loss_fn or F.cross_entropy)(out.float(), targets)
        if not torch.isfinite(perf):
            raise NonFiniteLossError("perf", float(perf))
        (scaler.scale(perf) if scaler is not None else perf).backward()
        optimizer_step(self.model, optimizer, scaler, max_grad_norm, grad_hook)
        self.step_count += 1
        with torch.no_grad():
            m = {"perf": float(perf), "gap_weights": 0.0, "gap_gates": 0.0, "resource": 0.0,
                 "flops_ratio": 1.0, "loss": float(perf)}
            if targets is not None and targets.dtype in (torch.int64, torch.int32):
                m["soft_acc"] = m["hard_acc"] = float((out.argmax(-1) == targets).float().mean())
            m["agreement"] = 1.0
            m["hard_flops_ratio"] = self.hard_flops_ratio()
        return m

    def train_step(self, inputs: Inputs, targets: torch.Tensor,
                   optimizer: torch.optim.Optimizer, *, loss_fn: Callable | None = None,
                   scaler: torch.amp.GradScaler | None = None,
                   max_grad_norm: float | None = None,
                   grad_hook: Callable[[], None] | None = None) -> dict[str, float]:
        """One full S2H step (METHOD §4): dual forward, the gate-only backward of the mask-side
        gap term, one backward of the performance and weight-side gap terms, the resource
        gradient (normalised by default, see :meth:`backward`), the optimizer step. After
        :meth:`freeze_architecture` the gates get no gradient and there is no resource term.

        Works under ``torch.autocast``; pass a ``torch.amp.GradScaler`` as ``scaler`` for fp16.
        Raises :class:`NonFiniteLossError` (before any update) if a term is NaN/inf.
        ``grad_hook()`` runs after the backward passes (before the normalised resource gradient
        is added, and before clipping and the optimizer step): data-parallel training averages
        the weight and gate gradients there.
        """
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        if self.variant == "direct_hard":  # no soft network at all
            soft = hard = self.hard_forward(inputs)
        else:
            soft, hard = self.dual_forward(inputs)
        terms = self.losses(soft, hard, targets, loss_fn)
        for key in ("perf", "gap_weights", "gap_gates", "resource"):
            v = terms[key]
            if not torch.isfinite(v):
                raise NonFiniteLossError(key, float(v))
        self.backward(terms, scaler, grad_hook)
        bad = first_non_finite((f"the BatchNorm statistic {n!r}", b)
                               for n, b in self.model.named_buffers() if "running" in n)
        if bad is not None:
            raise NonFiniteGradientError(*bad)
        optimizer_step(self.model, optimizer, scaler, max_grad_norm,
                       names={id(g.logits): f"gate {k}" for k, g in self.gates.items()})
        with torch.no_grad():  # softmax is shift-invariant: keep logits centred
            for g in ([] if self.arch_frozen else self.gate_parameters()):
                g.sub_(g.mean())
        self.step_count += 1
        with torch.no_grad():
            out = {k: float(v) for k, v in terms.items()}
            out["loss"] = out["perf"] + out["gap_weights"] + out["resource"]
            if targets is not None and targets.dtype in (torch.int64, torch.int32):
                out["soft_acc"] = float((soft.argmax(-1) == targets).float().mean())
                out["hard_acc"] = float((hard.argmax(-1) == targets).float().mean())
            out["agreement"] = float((soft.argmax(-1) == hard.argmax(-1)).float().mean())
            out["hard_flops_ratio"] = self.hard_flops_ratio()
        return out

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def reset_importance(self) -> None:
        """Re-take every gate's importance order (L1 of the producing weights) from the current
        weights: at the end of a weight warm-up, when training from scratch (METHOD §4), so the
        order does not come from random initial weights."""
        if self.arch_frozen:
            raise RuntimeError("the architecture is frozen: its kept channels must not change")
        for g in self.groups:
            self._group_gate[id(g)].set_importance(self._importance(g))

    def set_gates_trainable(self, flag: bool) -> None:
        """Turn the gate logits' gradients on or off (off: a weight warm-up or the freeze
        phase; the S2H step then skips the gate-only backward)."""
        for g in self.gate_parameters():
            g.requires_grad_(flag)

    @torch.no_grad()
    def freeze_architecture(self, project: bool = True) -> dict:
        """Start the freeze phase: no gate update and no resource term from now on; the hard
        network keeps training.  With ``project`` (default), the budget is made a guarantee
        first (:meth:`project_to_budget`).  Returns (and keeps in ``self.projection``) what the
        projection did."""
        info = self.project_to_budget() if project else {
            "needed": False, "ratio_before": self.hard_flops_ratio(),
            "ratio_after": self.hard_flops_ratio(), "steps": 0, "narrowed": {}}
        info["at_step"] = self.step_count
        self.projection = info
        self.arch_frozen = True
        self.set_gates_trainable(False)
        return info

    @torch.no_grad()
    def project_to_budget(self, target: float | None = None, floor: float = 0.03) -> dict:
        """Narrow the hard network until its FLOPs ratio is at most ``target`` (default: the
        pruner's): one divisor step at a time, each time in the group with the least probability
        mass on its current width (the least certain one), preferring groups whose step keeps
        the ratio at or above ``target - floor``.  A narrowed gate's logits are set sharply on
        its new width (:meth:`ChannelGate.set_width`).

        Returns ``{"needed", "ratio_before", "ratio_after", "steps", "narrowed": {group:
        [old, new]}}``."""
        target = self.target_flops if target is None else float(target)
        gates = [self._group_gate[id(g)] for g in self.groups]
        names = {id(gate): g.name for g, gate in zip(self.groups, gates, strict=True)}
        width = {id(g): g.hard_width() for g in gates}
        mass = {}
        for g in gates:
            mass[id(g)] = float(g.probs()[width[id(g)] // g.divisor - 1])

        def ratio():
            return float(self.flops_ratio(lambda g: float(width[id(g)])))

        before = r = ratio()
        old = dict(width)
        steps = 0
        while r > target + 1e-9:
            cands = sorted((g for g in gates if width[id(g)] > g.divisor),
                           key=lambda g: (mass[id(g)], names[id(g)]))
            if not cands:
                warnings.warn(f"project_to_budget: every group is at its minimum width and the "
                              f"FLOPs ratio is still {r:.4f} > {target}", stacklevel=2)
                break
            pick = cands[0]
            for g in cands:  # the least certain group whose step does not undershoot the floor
                width[id(g)] -= g.divisor
                ok = ratio() >= target - floor
                width[id(g)] += g.divisor
                if ok:
                    pick = g
                    break
            width[id(pick)] -= pick.divisor
            mass[id(pick)] = 1.0  # set sharply on its new width below
            steps += 1
            r = ratio()
        narrowed = {}
        for g in gates:
            if width[id(g)] != old[id(g)]:
                g.set_width(width[id(g)])
                narrowed[names[id(g)]] = [old[id(g)], width[id(g)]]
        after = self.hard_flops_ratio()
        if steps and after < target - floor - 1e-9:
            warnings.warn(
                f"project_to_budget: no divisor step lands in [{target - floor:.4f}, "
                f"{target:.4f}]; the FLOPs ratio is {after:.4f}, {target - floor - after:.4f} "
                f"below that window (the groups' divisor steps are too coarse here: use a "
                f"smaller divisor)", stacklevel=2)
        return {"needed": steps > 0, "ratio_before": before, "ratio_after": after,
                "steps": steps, "narrowed": narrowed}

    # ------------------------------------------------------------------ BatchNorm
    @torch.no_grad()
    def recalibrate_bn(self, batches: Iterable, max_batches: int = 50) -> int:
        """Re-estimate the hard network's BatchNorm statistics on training batches.

        ``batches``: an iterable of inputs or ``(inputs, targets)``. Returns batches used.
        """
        bns = [m for m in self.masked_layers.values() if isinstance(m, MaskedBatchNorm2d)
               and m.track_running_stats and m.out_gate is not None]
        saved = {}
        for m in bns:
            saved[m] = m.momentum
            m.hard_running_mean.zero_()
            m.hard_running_var.fill_(1.0)
            m.hard_num_batches_tracked.zero_()
            m.momentum = None  # cumulative average over the batches
        was = self.model.training
        self.model.train()
        n = 0
        try:
            with self.mode("hard"):
                for batch in batches:
                    if n >= max_batches:
                        break
                    x = batch[0] if isinstance(batch, (list, tuple)) else batch
                    self.model(*as_tuple(x.to(self.device())))
                    n += 1
        finally:
            for m, mom in saved.items():
                m.momentum = mom
            self.model.train(was)
        return n

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self, check: bool = True) -> nn.Module:
        """A plain ``torch.nn`` copy of the hard network: every pruned layer sliced to its kept
        channels, BatchNorm with the hard network's running statistics, in eval mode.

        No s2h code is needed to run it; ``s2h.save_exported`` stores it without pickle.
        With ``check`` (default), its outputs on the example inputs are compared with the hard
        network's (fp32, :data:`EXPORT_TOLERANCE`) and an :class:`ExportMismatchWarning` gives
        the difference when they do not agree.
        """
        exported = self._export()
        if check:
            try:
                diff, tol = export_difference(self.hard_forward, self.model, exported,
                                              self.example_inputs)
            except Exception as exc:  # noqa: BLE001 - the export itself does not run
                diff, tol = float("inf"), 0.0
                warnings.warn(f"the exported model does not run on the example inputs: "
                              f"{type(exc).__name__}: {exc}", ExportMismatchWarning, stacklevel=2)
            else:
                if not diff <= tol:
                    warnings.warn(
                        f"the exported model differs from the hard network on the example inputs"
                        f" (max |difference| {diff:.3g} > {tol:.3g}): the model's code probably "
                        "reads a pruned layer in a way the analysis did not see",
                        ExportMismatchWarning, stacklevel=2)
        return exported

    def _export(self) -> nn.Module:
        keep = {id(g): g.keep_index() for g in self.gates.values()}

        def keep_of(gate: ChannelGate | RepeatedGate | SegmentedGate | None
                    ) -> torch.Tensor | None:
            if gate is None:
                return None
            if isinstance(gate, RepeatedGate):  # a flatten's columns: h * w per channel
                return gate.expand_keep(keep_of(gate.gate))
            if isinstance(gate, (SegmentedGate, IndexedGate)):  # a concat, mixed channels:
                return gate.combine_keep([keep[id(g)] for g in gate.gates])  # kept positions
            return keep[id(gate)]

        exported = copy.deepcopy(self.model)  # masked layers drop their gates when copied
        for name, m in self.masked_layers.items():
            in_keep, out_keep = keep_of(m.in_gate), keep_of(m.out_gate)
            extra = {r: keep[id(g)] for r, g in m._s2h.extra.items() if g is not None}
            set_submodule(exported, name, m.s2h_export(in_keep, out_keep, extra).train(m.training))
        for pname, dim, gate in getattr(self, "_param_slices", []):  # layer-scale gamma & co.
            owner_name, _, attr = pname.rpartition(".")
            owner = exported.get_submodule(owner_name)
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(
                old.detach().index_select(dim, keep[id(gate)].to(old.device)).clone(),
                requires_grad=old.requires_grad)
        names = {id(m): n for n, m in self.model.named_modules()}
        split_sizes: dict[str, dict[str, Any]] = {}
        for owner, attr, wa in self.runtime.width_attrs:  # split sizes: the kept widths
            value = wa.value(lambda g: int(keep_of(g).numel()))
            exported.get_submodule(names[id(owner)]).__dict__[attr] = value
            split_sizes.setdefault(names[id(owner)], {})[attr] = value
        if split_sizes:  # save_exported records them
            exported.s2h_split_sizes = split_sizes
        for route in self.runtime.routes:  # a channel shuffle: routed by index in the export
            split, order = route.values(lambda g: keep[id(g)], torch.device("cpu"))
            block = exported.get_submodule(names[id(route.owner)])
            routed_swap(block, route.routed, split, order)
        leftovers = [n for n, m in exported.named_modules() if isinstance(m, MaskedLayer)]
        if leftovers:  # layers swapped but not recorded: turn them back into their parents
            for n in leftovers:
                mod = exported.get_submodule(n)
                set_submodule(exported, n, mod.s2h_export(None, None, {}).train(mod.training))
        if self.builder is not None:
            exported.s2h_builder = copy.deepcopy(self.builder)
        return exported.eval()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Gates (logits, importance order), config and widths: tensors and plain types only,
        so a checkpoint loads with ``torch.load(weights_only=True)``. The model's own state
        (weights, both sets of BatchNorm statistics) is ``pruner.model.state_dict()``."""
        return {
            "format": "s2h-pruner",
            "version": 1,
            "config": {"target_flops": self.target_flops, "divisor": self.divisor,
                       "tau": self.tau, "alpha": self.alpha, "lam": self.lam,
                       "ignore": list(self.ignore), "rounding": self.rounding,
                       "variant": self.variant, "resource_mode": self.resource_mode,
                       "resource_ratio": self.resource_ratio,
                       "resource_band": self.resource_band, "init_gap": self.init_gap},
            "groups": {g.name: g.channels for g in self.groups},
            "gates": {k: {"logits": v.logits.detach().clone(), "order": v.order.clone()}
                      for k, v in self.gates.items()},
            "widths": self.widths(),
            "step_count": self.step_count,
            "arch_frozen": self.arch_frozen,
            "projection": self.projection,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != "s2h-pruner":
            raise ValueError(
                "not an s2h pruner state (expected the dict of S2HPruner.state_dict())")
        mine = {g.name: g.channels for g in self.groups}
        if state["groups"] != mine:
            missing = sorted(set(mine) ^ set(state["groups"]))
            raise ValueError(
                "pruner state does not match this model's groups "
                f"(differing groups: {missing[:5] or 'same names, other channel counts'}); "
                "was it saved for another model, ignore= list or divisor?"
            )
        gates = state.get("gates")
        if not isinstance(gates, dict) or set(gates) != set(self.gates):
            have = set(gates) if isinstance(gates, dict) else set()
            raise ValueError(
                "pruner state does not hold exactly this pruner's gates (missing "
                f"{sorted(set(self.gates) - have)[:5]}, unexpected "
                f"{sorted(have - set(self.gates))[:5]}); the checkpoint is incomplete or was "
                "saved for another model")
        with torch.no_grad():
            for k, v in gates.items():
                gate = self.gates[k]
                if gate.logits.shape != v["logits"].shape:
                    raise ValueError(f"gate {k!r}: logits shape {tuple(v['logits'].shape)} does "
                                     f"not match {tuple(gate.logits.shape)} (another divisor?)")
                if not torch.isfinite(v["logits"]).all():
                    raise ValueError(f"gate {k!r}: the saved logits are not finite")
                gate.logits.copy_(v["logits"])
                gate.order.copy_(v["order"])
        cfg = state.get("config", {})
        self.target_flops = float(cfg.get("target_flops", self.target_flops))
        self.alpha = float(cfg.get("alpha", self.alpha))
        self.lam = float(cfg.get("lam", self.lam))
        self.step_count = int(state.get("step_count", 0))
        self.resource_mode = cfg.get("resource_mode", self.resource_mode)
        self.resource_ratio = float(cfg.get("resource_ratio", self.resource_ratio))
        self.resource_band = float(cfg.get("resource_band", self.resource_band))
        self.arch_frozen = bool(state.get("arch_frozen", False))
        self.projection = state.get("projection")
        self.set_gates_trainable(not self.arch_frozen)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        lines = [f"S2HPruner: {len(self.groups)} prunable groups, dense "
                 f"{self.dense_flops / 1e6:.2f} MFLOPs, target {self.target_flops:.2f}, "
                 f"hard ratio now {self.hard_flops_ratio():.3f}"]
        for g in self.groups:
            gate = self._group_gate[id(g)]
            lines.append(f"  {g.name:<40s} {gate.hard_width():>5d}/{g.channels:<5d} "
                         f"(layers: {len(g.producers)} out, {len(g.consumers)} in, "
                         f"{len(g.norms)} norm, {len(g.depthwise)} dw)")
        frozen = [g for g in self.analysis.groups if not g.prunable and g.reasons]
        for g in frozen:
            lines.append(f"  [kept whole] {g.name}: {g.reasons[0]}")
        return "\n".join(lines)


def _explain_inputs(model: nn.Module, example_inputs: tuple, exc: Exception) -> None:
    """Raise a ``ValueError`` naming the inputs when ``model(*example_inputs)`` itself fails
    (the analysis' run raised ``exc``); return when the model runs on them (then ``exc`` came
    from the analysis and is the error to show)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as plain_exc:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in example_inputs]
        raise ValueError(
            f"example_inputs (shapes {shapes}) do not run through {type(model).__name__}: "
            f"{type(plain_exc).__name__}: {plain_exc}. Pass a tensor or tuple that "
            "model(*inputs) accepts, on the model's device."
        ) from plain_exc
    finally:
        model.train(was)
