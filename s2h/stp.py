"""STP: stimulative-training pruning over width and depth, without fine-tuning (METHOD §8).

Each step trains the *full* network on the labels and one sampled *sub-network* by KL to the
full network's detached output, in one optimizer step; with ``label_weight`` (default 1, chosen
on a validation split; 0 is METHOD §8 as written) the sub-network also learns from the labels.
The sub-network space has two dimensions, built on the S2H machinery (dependency groups,
kept-channel hard networks, FLOPs, export):

* width: per dependency group, the top-importance channels in steps of the divisor;
* depth: per residual stage, which blocks are kept (a dropped block is its identity path).
  A block can be dropped when it is a child (not the first) of an ``nn.Sequential`` stage, its
  input and output have the same shape, and its first and last conv/linear sit in the same
  dependency group (the residual stream) — so the identity is exactly "the block removed".

Pruning is *KD-guided exploration*: starting from the full network as the base, every candidate
(each group one divisor step narrower, each droppable block removed) gets a KD loss against the
full network, averaged over ``trials`` steps; the candidate with the lowest is committed to the
base (up to ``commits_per_round`` of them, best first). This repeats until the base meets the
FLOPs target; then the base sub-network keeps training to the end.

How a round scores its candidates (``scoring``), issue 13 item 4:

* ``"probe"`` (default): at each of the round's ``trials`` training steps, before the training
  pass, every candidate runs one no-grad forward on the first ``probe_size`` samples of the
  step's batch, and its KD loss against the full network's output on the same samples is
  recorded. All candidates see the same weights, the same samples, the same dropout draws and
  BatchNorm on the probe's batch statistics (the running statistics are restored): a paired
  comparison. The trained sub-network goes round-robin over the candidates (each is still
  stimulated in turn). Cost of a round: ``trials`` training steps + ``trials * (1 + n)``
  no-grad forwards on ``probe_size`` samples for ``n`` candidates, i.e. per candidate
  ``trials`` forwards, at most ``trials * probe_size / (3 * batch)`` of a training step in
  FLOPs (a step runs at least the full network forward and backward), whatever the model.
* ``"trial"`` (the first implementation): each candidate is the trained sub-network for
  ``trials`` steps and scored by its training KD loss; a round lasts ``trials * n`` steps
  (98 on ResNet-50 with its 49 candidates), the candidates are scored on different batches
  and weights.

In a data-parallel run the KD sums and sample counts are all-reduced before they are recorded
(:func:`s2h.distributed.all_reduce_sum`), and the candidate order, the sampling generator and
the dropout seeds of the probe are the same on every rank: every rank commits the same
architecture. ``probe_size`` counts per process.

The budget: a round commits only candidates that keep the base above the target ``T``. The last
round (every candidate would reach ``T``) commits the one candidate that lands closest to ``T``
from above, provided it stays at or above ``T - floor``; the base is then projected onto the
budget (:meth:`STPPruner.project_to_budget`: one divisor step of one group at a time, finer
than a candidate's ``width_step``) if it is still above ``T``. So the exported ratio lands in
``[T - floor, T]`` whenever one divisor step allows it.

FLOPs of a dropped block: the whole block stops running, so its whole counted FLOPs (layers,
and the ops written inline in its ``forward``: attention matmuls, ...) leave the count
(:meth:`STPPruner.ratio`). *Subnet
mutating expansion* additionally samples, with probability ``expand_prob``, a sub-network
between the base and the full network each step (a second KD term), to narrow the
teacher-student gap.

The final sub-network's BatchNorm statistics are its own (the hard-network statistics of the
masked BatchNorms, recalibrated with :meth:`STPPruner.recalibrate_bn`), so the export is exact.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum
from .numerics import NonFiniteLossError, optimizer_step
from .pruner import S2HPruner
from .utils import Inputs, as_tuple, set_submodule

__all__ = ["Arch", "STPPruner"]

#: the key of the base's own probe KD losses in a round's scores (``rank="kd_per_flop"``)
_BASE = ("base", "")


@dataclass(frozen=True)
class Arch:
    """A sub-network: kept channels per group (by group name) and the dropped blocks."""

    widths: tuple[tuple[str, int], ...]
    dropped: frozenset[str] = frozenset()

    def width(self, group: str) -> int:
        return dict(self.widths)[group]

    def with_width(self, group: str, width: int) -> Arch:
        return Arch(tuple((g, width if g == group else w) for g, w in self.widths), self.dropped)

    def with_dropped(self, block: str) -> Arch:
        return Arch(self.widths, self.dropped | {block})


class STPPruner:
    """Stimulative-training pruning of ``model`` to ``target_flops`` (remaining fraction).

    Same surface as :class:`s2h.S2HPruner` where it applies: ``train_step``, ``export``,
    ``hard_flops_ratio``, ``widths``, ``state_dict`` / ``load_state_dict``,
    ``recalibrate_bn``, ``hard_forward`` (the base sub-network) and ``soft_forward`` (the full
    network).

    Args:
        trials: training steps an exploration round lasts per candidate (``scoring="trial"``)
            or in all (``scoring="probe"``): how many KD losses each candidate's score averages.
        scoring: how a round scores its candidates. ``"probe"`` (default): at each of the
            round's ``trials`` steps, every candidate runs one no-grad forward on the first
            ``probe_size`` samples of the step's batch, against the full network's output on
            the same samples, with the same weights, the same BatchNorm batch statistics
            semantics (running statistics left untouched) and the same dropout draws; the
            trained sub-network goes round-robin over the candidates. A round costs ``trials``
            training steps plus ``trials * (1 + candidates)`` probe forwards, whatever the
            model. ``"trial"``: each candidate is the trained sub-network for ``trials`` steps
            and scored by its training KD loss (a round lasts ``trials * candidates`` steps).
        probe_size: samples per process of the probe batch (``scoring="probe"``).
        kd_weight: weight of the KL terms of the sub-network(s).
        expand_prob: probability of also sampling a sub-network between base and full.
        depth: also explore dropping residual blocks.
        width_step: divisor steps a width candidate narrows by (1 = METHOD §8; larger values
            explore faster on short budgets).
        commits_per_round: how many of the best candidates of a round are committed (1 =
            METHOD §8); they never conflict (one change per group or block).
        rank: how a round's candidates are ranked for a commit. ``"kd"`` (METHOD §8): by their
            mean KD loss. ``"kd_per_flop"`` (probe scoring only): by the KD loss they add to
            the base's (the base is probed too, one more forward) per FLOPs ratio they save,
            so a narrowing that saves many FLOPs for a little KD wins over one that saves few.
        label_weight: weight of the trained sub-network's own task loss on the labels, added
            to its KD term (default 1, chosen on a validation split: on Fashion-MNIST's short
            budget the sub-network then ends as accurate as the full network instead of 1-3
            points below it; 0 = METHOD §8: it learns from the full network's output only).
        full_weight_after: weight of the full network's task loss once the architecture is
            fixed (exploration ended, or frozen by the trainer): 0.5 by default (chosen on a
            validation split: +0.16 to +0.86 points at a 0.15 target over 3 seeds, level at 0.35
            and 0.55), leaving the shared weights more to the sub-network that is exported;
            1 trains the full network as during the exploration (METHOD §8); 0 lets the teacher
            decay (measured: 50% accuracy). The full network still runs, as the KD teacher.
        floor: how far below the target the base may land (the last round and the projection
            never go below ``target - floor`` when a smaller step exists).
    """

    def __init__(self, model: nn.Module, example_inputs: Inputs, target_flops: float, *,
                 divisor: int = 8, ignore: Iterable[str] = (), trials: int = 2,
                 kd_weight: float = 1.0, expand_prob: float = 0.5, depth: bool = True,
                 seed: int = 0, width_step: int = 1, commits_per_round: int = 1,
                 floor: float = 0.03, scoring: str = "probe", probe_size: int = 32,
                 rank: str = "kd", label_weight: float = 1.0, full_weight_after: float = 0.5,
                 warn: bool = True) -> None:
        if trials < 1 or width_step < 1 or commits_per_round < 1 or probe_size < 1:
            raise ValueError("trials, width_step, commits_per_round and probe_size must be >= 1")
        if not 0.0 <= expand_prob <= 1.0:
            raise ValueError(f"expand_prob must be in [0, 1], got {expand_prob}")
        if scoring not in ("probe", "trial"):
            raise ValueError(f"scoring must be 'probe' or 'trial', got {scoring!r}")
        if rank not in ("kd", "kd_per_flop"):
            raise ValueError(f"rank must be 'kd' or 'kd_per_flop', got {rank!r}")
        if rank == "kd_per_flop" and scoring != "probe":
            raise ValueError("rank='kd_per_flop' needs scoring='probe' (the base's KD loss is "
                             "measured on the probe batches)")
        self.rank = rank
        self.scoring = scoring
        self.probe_size = int(probe_size)
        if floor < 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        self.floor = float(floor)
        self.width_step = int(width_step)
        self.commits_per_round = int(commits_per_round)
        self.core = S2HPruner(model, example_inputs, target_flops, divisor=divisor,
                              ignore=ignore, warn=warn, fused=False)
        self.model = model
        self.target_flops = self.core.target_flops
        self.trials = int(trials)
        self.kd_weight = float(kd_weight)
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight}")
        self.label_weight = float(label_weight)
        if not (math.isfinite(full_weight_after) and full_weight_after >= 0):
            raise ValueError(f"full_weight_after must be >= 0, got {full_weight_after}")
        self.full_weight_after = float(full_weight_after)
        self.expand_prob = float(expand_prob)
        self.rng = random.Random(seed)
        self._gate_of = {g.name: self.core.gate_of(g) for g in self.core.groups}
        self.divisors = {name: gate.divisor for name, gate in self._gate_of.items()}
        self.full = Arch(tuple((g.name, g.channels) for g in self.core.groups))
        self.blocks = self._find_blocks(self.core.example_inputs) if depth else {}
        self._block_layers = {b: [n for n in self.core.analysis.layers if n.startswith(b + ".")]
                              for b in self.blocks}
        self._block_const = {b: self._const_flops_of(b) for b in self.blocks}
        self.base = self.full
        self.explore_done = self.ratio(self.base) <= self.target_flops
        #: what the projection onto the budget did when the exploration ended (None before)
        self.projection: dict | None = None
        if self.explore_done:
            self.projection = self._no_projection()
        self._last_scores: dict[tuple[str, str], float] = {}
        self._round: list[tuple[str, str]] = []
        self._scores: dict[tuple[str, str], list[float]] = {}
        self._cursor = 0
        self._trained = 0  # exploring steps so far: the round-robin of the trained candidate
        self.step_count = 0
        self.commits: list[dict] = []
        self._patched: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ architecture space
    def _find_blocks(self, example_inputs) -> dict[str, str]:
        """Droppable residual blocks: ``{block name: stage name}`` (see the module docstring)."""
        an = self.core.analysis
        shapes: dict[str, tuple] = {}
        hooks = []
        names = {m: n for n, m in self.model.named_modules()}
        for m in self.model.modules():
            def hook(mod, args, out):
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    shapes[names[mod]] = (tuple(args[0].shape), tuple(out.shape))
            hooks.append(m.register_forward_hook(hook))
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(*example_inputs)
        finally:
            self.model.train(was)
            for h in hooks:
                h.remove()
        blocks = {}
        for stage_name, stage in self.model.named_modules():
            if not isinstance(stage, nn.Sequential):
                continue
            for i, (child_name, _) in enumerate(stage.named_children()):
                name = f"{stage_name}.{child_name}" if stage_name else child_name
                if i == 0 or name not in shapes or shapes[name][0] != shapes[name][1]:
                    continue
                layers = [n for n in an.layers if n.startswith(name + ".")
                          and an.layers[n].kind in ("conv", "linear")]
                if not layers:
                    continue
                first_in = an.layer_in_group.get(layers[0])
                last_out = an.layer_out_group.get(layers[-1])
                if first_in is not None and first_in == last_out:
                    blocks[name] = stage_name
        return blocks

    def _const_flops_of(self, block: str) -> int:
        """The FLOPs of ``block`` that the pruner counts as constant: everything counted inside
        its calls (inline ops, fixed layers, ...) except its layers' width-scaled terms."""
        an = self.core.analysis
        scaled = 0
        for n in self._block_layers[block]:
            rec = an.layers[n]
            # the terms S2HPruner's FLOPs table scales with the widths (its _build_flops_table)
            if rec.dense_flops != 0 and rec.kind != "fixed":
                scaled += sum(f for f, _ in rec.flop_parts)
        return an.module_flops[block] - scaled

    def _outermost(self, dropped: Iterable[str]) -> list[str]:
        """The dropped blocks not inside another dropped block (only those count)."""
        dropped = set(dropped)
        return sorted(b for b in dropped
                      if not any(b.startswith(o + ".") for o in dropped if o != b))

    def ratio(self, arch: Arch) -> float:
        """FLOPs of sub-network ``arch`` over the dense model (as its export counts them).

        The kept layers scale with the widths (:meth:`S2HPruner.flops_ratio`); a dropped block
        contributes nothing: its layers' width terms are skipped and the rest of what torch's
        counter counted inside the block (inline attention matmuls, fixed layers, ...) leaves
        the constant term."""
        width = {id(self._gate_of[g]): w for g, w in arch.widths}
        blocks = self._outermost(arch.dropped)
        dropped_layers = {n for b in blocks for n in self._block_layers[b]}
        ratio = self.core.flops_ratio(lambda gate: width[id(gate)], skip=dropped_layers)
        return ratio - sum(self._block_const[b] for b in blocks) / self.core.dense_flops

    def candidates(self, arch: Arch) -> list[tuple[str, str]]:
        """One-step-smaller neighbours of ``arch``: ("width", group) and ("depth", block)."""
        out = []
        dropped_layers = {n for b in arch.dropped for n in self._block_layers[b]}
        for g in self.core.groups:
            members = g.producers + g.consumers
            if members and all(m in dropped_layers for m in members):
                continue  # lives only inside dropped blocks: its width no longer matters
            if arch.width(g.name) > self.divisors[g.name]:
                out.append(("width", g.name))
        # a stage's first block is never a candidate, so every stage keeps at least one block
        out.extend(("depth", b) for b in self.blocks if b not in arch.dropped
                   and not any(b.startswith(o + ".") for o in arch.dropped))
        return out

    def apply(self, arch: Arch, cand: tuple[str, str], steps: int | None = None) -> Arch:
        """``arch`` with candidate ``cand``: a width narrowed by ``steps`` divisor steps
        (default ``width_step``), or a block dropped."""
        kind, name = cand
        if kind == "width":
            d = self.divisors[name]
            step = self.width_step if steps is None else steps
            return arch.with_width(name, max(d, arch.width(name) - step * d))
        return arch.with_dropped(name)

    def _sample_between(self, lo: Arch, hi: Arch) -> Arch:
        widths = []
        for (g, a), (_, b) in zip(lo.widths, hi.widths, strict=True):
            d = self.divisors[g]
            widths.append((g, self.rng.randrange(a // d, b // d + 1) * d))
        dropped = frozenset(b for b in lo.dropped - hi.dropped if self.rng.random() < 0.5)
        return Arch(tuple(widths), dropped | hi.dropped)

    # ------------------------------------------------------------------ running a sub-network
    def _set(self, arch: Arch) -> None:
        with torch.no_grad():
            for g, w in arch.widths:
                self._gate_of[g].set_width(w)
            self.core.runtime.prepare(self.core.gates.values(), self.core.device(),
                                      self.core.gate_bank())
        for b in list(self._patched):
            if b not in arch.dropped:
                del self._patched.pop(b).forward
        for b in arch.dropped:
            if b not in self._patched:
                m = self.model.get_submodule(b)
                m.forward = _identity
                self._patched[b] = m

    def _run(self, arch: Arch, inputs):
        self._set(arch)
        try:
            with self.core.runtime.use("hard"):
                return self.model(*inputs)
        finally:
            self._set(Arch(arch.widths))  # blocks back in place (the full network needs them)

    def hard_forward(self, inputs: Inputs) -> Any:
        """The base sub-network (what :meth:`export` returns)."""
        return self._run(self.base, as_tuple(inputs))

    def soft_forward(self, inputs: Inputs) -> Any:
        """The full network (the teacher)."""
        with self.core.runtime.use("dense"):
            return self.model(*as_tuple(inputs))

    # ------------------------------------------------------------------ training
    def weight_parameters(self) -> Iterator[nn.Parameter]:
        return self.core.weight_parameters()

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())  # STP learns no gates: the architecture is searched, not relaxed

    def _ensure_round(self) -> bool:
        """Start a round if none is running; False when the exploration is over."""
        if self.explore_done:
            return False
        if not self._round:
            self._round = self.candidates(self.base)
            self._scores = {c: [] for c in self._round}
            if self.rank == "kd_per_flop":
                self._scores[_BASE] = []
            self._cursor = 0
            if not self._round:
                self._end_exploration()
                return False
        return True

    def _next_candidate(self) -> Arch:
        """The sub-network this step trains: the base while not exploring, else a candidate
        of the round (the one under trial, or round-robin with probe scoring)."""
        if not self._ensure_round():
            return self.base
        i = self._trained if self.scoring == "probe" else self._cursor // self.trials
        return self.apply(self.base, self._round[i % len(self._round)])

    @torch.no_grad()
    def _score_round(self, inputs: tuple) -> None:
        """Probe scoring: the KD loss of every candidate of the round on the first
        ``probe_size`` samples of ``inputs``, from one no-grad forward each, against the full
        network's output on them; all-reduced over the processes (sums and counts).

        Train mode as in the training step (BatchNorm on the probe's batch statistics), but
        every buffer (running statistics) is restored afterwards and every forward draws the
        same random numbers (dropout), so the candidates are compared on equal terms."""
        probe = tuple(t[:self.probe_size] if isinstance(t, torch.Tensor) and t.dim() else t
                      for t in inputs)
        saved = [(b, b.clone()) for b in self.model.buffers()]
        dev = self.core.device()
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else []
        seed = self.step_count
        sums = []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                full = self.soft_forward(probe)
                teacher = torch.softmax(full.float(), dim=-1)
                n = full.numel() // full.shape[-1]
                for cand in self._probed():
                    torch.manual_seed(seed)
                    arch = self.base if cand == _BASE else self.apply(self.base, cand)
                    sums.append(self._kd(self._run(arch, probe), teacher).double() * n)
        finally:
            for b, v in saved:
                b.copy_(v)
        stats = all_reduce_sum(torch.stack(
            [*sums, torch.tensor(float(n), dtype=torch.float64, device=sums[0].device)]))
        values = stats.tolist()
        for cand, total in zip(self._probed(), values[:-1], strict=True):
            self._scores[cand].append(total / values[-1])

    def _probed(self) -> list[tuple[str, str]]:
        """What a probe scores: the round's candidates (and the base, for ``kd_per_flop``)."""
        return self._round + ([_BASE] if self.rank == "kd_per_flop" else [])

    def _rank_keys(self, scores: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
        """The commit ranking's key per candidate (lower first): the mean KD loss (``rank="kd"``)
        or the KD loss added to the base's per FLOPs ratio saved (``"kd_per_flop"``)."""
        base_kd = scores.pop(_BASE, None)
        if self.rank != "kd_per_flop" or base_kd is None:
            return scores
        r0 = self.ratio(self.base)
        return {c: (kd - base_kd) / max(r0 - self.ratio(self.apply(self.base, c)), 1e-9)
                for c, kd in scores.items()}

    def _record(self, kd_sum: torch.Tensor, count: int) -> None:
        """The bookkeeping of an exploring step. Trial scoring records the tried candidate's
        KD loss of this step: ``kd_sum`` over ``count`` samples, summed over the processes of a
        data-parallel run first (:func:`all_reduce_sum`), so every rank records the global
        batch's mean and commits the same architecture. Commits when the round is over."""
        if self.explore_done or not self._round:
            return
        self._trained += 1
        if self.scoring == "probe":
            self._cursor += 1
            if self._cursor >= self.trials:
                self.commit()
            return
        stats = torch.stack([kd_sum.detach().double().reshape(()),
                             torch.tensor(float(count), dtype=torch.float64,
                                          device=kd_sum.device)])
        total, n = all_reduce_sum(stats).tolist()
        cand = self._round[(self._cursor // self.trials) % len(self._round)]
        self._scores[cand].append(total / n)
        self._cursor += 1
        if self._cursor >= self.trials * len(self._round):
            self.commit()

    def _commit_one(self, cand: tuple[str, str], kd: float) -> None:
        self.base = self.apply(self.base, cand)
        self.commits.append({"step": self.step_count, "kind": cand[0], "name": cand[1],
                             "kd": kd, "ratio": self.ratio(self.base)})

    def commit(self) -> tuple[str, str] | None:
        """Commit the tried candidates with the lowest mean KD loss (with ``rank="kd_per_flop"``:
        the lowest KD loss added per FLOPs saved) to the base architecture,
        up to ``commits_per_round`` of them, best first, each only if the base stays above the
        target after it. When none does (the last round), commit the one candidate landing
        closest to the target from above, at or above ``target - floor``; the exploration ends
        and the base is projected onto the budget if still above it (``self.projection``).
        Returns the best-scored candidate."""
        kd = {c: sum(v) / len(v) for c, v in self._scores.items() if v}
        scores = self._rank_keys(dict(kd))
        ranked = sorted(scores, key=lambda c: (scores[c], c))
        target = self.target_flops
        committed = 0
        for cand in ranked:
            if committed >= self.commits_per_round:
                break
            if self.ratio(self.apply(self.base, cand)) > target:
                self._commit_one(cand, kd[cand])
                committed += 1
        if ranked and committed == 0:  # the last round: every candidate reaches the target
            landing = [(self.ratio(self.apply(self.base, c)), c) for c in ranked]
            ok = [(r, c) for r, c in landing if r >= target - self.floor]
            if ok:
                _, cand = max(ok, key=lambda rc: (rc[0], -scores[rc[1]]))
                self._commit_one(cand, kd[cand])
            self._end_exploration()
        self._last_scores = scores
        self._round, self._scores, self._cursor = [], {}, 0
        return ranked[0] if ranked else None

    def _no_projection(self) -> dict:
        r = self.ratio(self.base)
        return {"needed": False, "ratio_before": r, "ratio_after": r, "steps": 0,
                "narrowed": {}, "dropped": [], "at_step": self.step_count}

    def _end_exploration(self, project: bool = True) -> dict:
        self.explore_done = True
        self._round, self._scores, self._cursor = [], {}, 0
        info = self.project_to_budget() if project else self._no_projection()
        info["at_step"] = self.step_count
        self.projection = info
        return info

    @property
    def arch_frozen(self) -> bool:
        """Whether the architecture is final (the exploration has ended)."""
        return self.explore_done

    @torch.no_grad()
    def freeze_architecture(self, project: bool = True) -> dict:
        """End the exploration now (e.g. at the end of a training budget too short for it) and,
        with ``project``, project the base onto the budget. Returns (and keeps in
        ``self.projection``) what the projection did; an ended exploration's projection is
        returned as it was."""
        if self.explore_done and self.projection is not None:
            return self.projection
        return self._end_exploration(project)

    @torch.no_grad()
    def project_to_budget(self, target: float | None = None,
                          floor: float | None = None) -> dict:
        """Narrow the base until its FLOPs ratio is at most ``target`` (default: the
        pruner's), like :meth:`S2HPruner.project_to_budget`: one divisor step of one group at a
        time (finer than a ``width_step`` candidate). Each step is, in this order of
        preference: one that lands in ``[target - floor, target]``; one that stays above the
        target and leaves a step of at most ``floor`` to take next (so the crossing cannot
        undershoot); any other that stays above; when every step goes below ``target -
        floor``, the one that lands highest. Among equals, the group whose candidate scored the
        lowest KD loss in the last round goes first, then the smallest FLOPs change. Blocks are
        dropped only when no group can be narrowed any more: a dropped block is a large jump
        that the KD-guided exploration decides, not the projection.

        Returns ``{"needed", "ratio_before", "ratio_after", "steps", "narrowed": {group:
        [old, new]}, "dropped": [blocks]}``."""
        target = self.target_flops if target is None else float(target)
        floor = self.floor if floor is None else float(floor)
        lo = target - floor
        arch = self.base
        before = r = self.ratio(arch)
        steps = 0

        def moves(a: Arch) -> list[tuple[str, str]]:
            return [c for c in self.candidates(a) if c[0] == "width"] or self.candidates(a)

        def has_fine_step(a: Arch, ra: float) -> bool:
            return any(ra - self.ratio(self.apply(a, c, steps=1)) <= floor for c in moves(a))

        while r > target + 1e-9:
            options = []
            for c in moves(arch):
                nxt = self.apply(arch, c, steps=1)
                q = self.ratio(nxt)
                if q <= target + 1e-9:
                    rank = 0 if q >= lo else 3
                else:
                    rank = 1 if has_fine_step(nxt, q) else 2
                kd = self._last_scores.get(c, float("inf")) if rank < 3 else 0.0
                options.append((rank, kd, -q, c))
            if not options:
                warnings.warn(f"STP project_to_budget: nothing left to narrow and the FLOPs ratio"
                              f" is still {r:.4f} > {target}", stacklevel=2)
                break
            pick = min(options)[3]
            arch = self.apply(arch, pick, steps=1)
            steps += 1
            r = self.ratio(arch)
        if steps and r < lo - 1e-9:
            warnings.warn(
                f"STP project_to_budget: no architecture one step away lands in [{lo:.4f}, "
                f"{target:.4f}]; the FLOPs ratio is {r:.4f}, {lo - r:.4f} below that window (the "
                f"width steps of the divisor are too coarse here: explore depth too, or use a "
                f"smaller divisor)", stacklevel=2)
        old = dict(self.base.widths)
        narrowed = {g: [old[g], w] for g, w in arch.widths if w != old[g]}
        dropped = sorted(arch.dropped - self.base.dropped)
        self.base = arch
        return {"needed": steps > 0, "ratio_before": before, "ratio_after": r, "steps": steps,
                "narrowed": narrowed, "dropped": dropped}

    @staticmethod
    def _kd(student, teacher_probs):
        log_s = F.log_softmax(student.float(), dim=-1)
        return (teacher_probs * (teacher_probs.clamp_min(1e-12).log() - log_s)).sum(-1).mean()

    def train_step(self, inputs: Inputs, targets: torch.Tensor,
                   optimizer: torch.optim.Optimizer, *, loss_fn: Callable | None = None,
                   scaler: torch.amp.GradScaler | None = None,
                   max_grad_norm: float | None = None,
                   grad_hook: Callable[[], None] | None = None) -> dict[str, float]:
        """Full network on the labels + the sampled sub-network(s) by KL to its detached
        output, one optimizer step; then the exploration bookkeeping."""
        inputs = as_tuple(inputs)
        self.model.train()
        if self.scoring == "probe" and self._ensure_round():
            self._score_round(inputs)
        optimizer.zero_grad(set_to_none=True)
        w_full = self.full_weight_after if self.explore_done else 1.0
        with torch.set_grad_enabled(w_full > 0):
            full = self.soft_forward(inputs)
        perf = (loss_fn or F.cross_entropy)(full.float(), targets)
        teacher = torch.softmax(full.detach().float(), dim=-1)
        sub_arch = self._next_candidate()
        sub = self._run(sub_arch, inputs)
        kd = self._kd(sub, teacher)
        loss = w_full * perf + self.kd_weight * kd
        sub_perf = None
        if self.label_weight > 0:
            sub_perf = (loss_fn or F.cross_entropy)(sub.float(), targets)
            loss = loss + self.label_weight * sub_perf
        expand_kd = None
        if self.expand_prob > 0 and self.rng.random() < self.expand_prob and self.base != self.full:
            mid = self._sample_between(self.base, self.full)
            expand_kd = self._kd(self._run(mid, inputs), teacher)
            loss = loss + self.kd_weight * expand_kd
        for key, v in (("perf", perf), ("kd", kd)):
            if not torch.isfinite(v):
                raise NonFiniteLossError(key, float(v))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(self.model, optimizer, scaler, max_grad_norm, grad_hook)
        self.step_count += 1
        n = sub.numel() // sub.shape[-1]  # the samples (and positions) the KD loss averages
        self._record(kd.detach() * n, n)
        with torch.no_grad():
            out = {"loss": float(loss), "perf": float(perf), "kd": float(kd),
                   "sub_flops_ratio": self.ratio(sub_arch),
                   "hard_flops_ratio": self.hard_flops_ratio(),
                   "soft_acc": float((full.argmax(-1) == targets).float().mean()),
                   "hard_acc": float((sub.argmax(-1) == targets).float().mean()),
                   "exploring": float(not self.explore_done)}
            if expand_kd is not None:
                out["expand_kd"] = float(expand_kd)
            if sub_perf is not None:
                out["sub_perf"] = float(sub_perf)
        return out

    # ------------------------------------------------------------------ results
    def hard_flops_ratio(self) -> float:
        return self.ratio(self.base)

    def widths(self) -> dict[str, int]:
        return dict(self.base.widths)

    def group_channels(self) -> dict[str, int]:
        return self.core.group_channels()

    @property
    def dense_flops(self) -> int:
        return self.core.dense_flops

    @property
    def groups(self) -> list:
        return self.core.groups

    @property
    def gates(self) -> nn.ModuleDict:
        return self.core.gates

    def recalibrate_bn(self, batches: Iterable, max_batches: int = 50) -> int:
        """Re-estimate the base sub-network's BatchNorm statistics on training batches."""
        self._set(self.base)
        try:
            return self.core.recalibrate_bn(batches, max_batches)
        finally:
            self._set(Arch(self.base.widths))

    @torch.no_grad()
    def export(self) -> nn.Module:
        """Plain ``torch.nn`` base sub-network: sliced layers, dropped blocks as ``nn.Identity``."""
        self._set(Arch(self.base.widths))
        exported = self.core.export()
        for b in sorted(self.base.dropped):
            set_submodule(exported, b, nn.Identity())
        return exported

    def state_dict(self) -> dict:
        return {"format": "s2h-stp", "version": 1, "target_flops": self.target_flops,
                "base_widths": dict(self.base.widths), "dropped": sorted(self.base.dropped),
                "explore_done": self.explore_done, "step_count": self.step_count,
                "commits": list(self.commits), "groups": self.core.group_channels(),
                "blocks": dict(self.blocks),
                # the exploration round in progress, so a resumed run continues it exactly
                "round": [list(c) for c in self._round],
                "scores": [[k, n, list(v)] for (k, n), v in self._scores.items()],
                "cursor": self._cursor, "rng": _rng_state(self.rng),
                "scoring": self.scoring, "trained": self._trained,
                "projection": self.projection,
                "last_scores": [[k, n, v] for (k, n), v in self._last_scores.items()],
                "core": self.core.state_dict()}  # the importance orders of the groups

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != "s2h-stp":
            raise ValueError("not an STP pruner state (expected STPPruner.state_dict())")
        if state["groups"] != self.core.group_channels():
            raise ValueError("STP state does not match this model's groups")
        self.base = Arch(tuple((g, int(state["base_widths"][g])) for g, _ in self.full.widths),
                         frozenset(state["dropped"]))
        if "core" in state:
            self.core.load_state_dict(state["core"])
        self.explore_done = bool(state["explore_done"])
        self.step_count = int(state["step_count"])
        self.commits = list(state["commits"])
        self._round = [tuple(c) for c in state.get("round", [])]
        self._scores = {(k, n): list(v) for k, n, v in state.get("scores", [])}
        self._cursor = int(state.get("cursor", 0))
        self._trained = int(state.get("trained", 0))
        self.projection = state.get("projection", self.projection)
        self._last_scores = {(k, n): float(v) for k, n, v in state.get("last_scores", [])}
        if state.get("rng") is not None:
            self.rng.setstate(_rng_from_state(state["rng"]))

    def summary(self) -> str:
        lines = [f"STPPruner: {len(self.core.groups)} width groups, {len(self.blocks)} droppable "
                 f"blocks, base at {self.hard_flops_ratio():.3f} of the FLOPs "
                 f"(target {self.target_flops:.2f}), {len(self.commits)} commits"]
        for g, w in self.base.widths:
            lines.append(f"  {g:<40s} {w:>5d}/{self.core.group_channels()[g]}")
        for b in sorted(self.base.dropped):
            lines.append(f"  dropped block {b}")
        return "\n".join(lines)


def _identity(x, *args, **kwargs):
    return x


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_state(state) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(v) for v in internal), gauss)
