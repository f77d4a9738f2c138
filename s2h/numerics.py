"""Non-finite values in a training step: the errors, their detection, and the guarded
optimizer step (nothing is updated when a loss, a gradient or a statistic is NaN / inf)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["NonFiniteGradientError", "NonFiniteLossError", "NonFiniteStateError",
           "check_gradients", "first_non_finite", "optimizer_step"]


class NonFiniteLossError(FloatingPointError):
    """A loss term of the S2H step is NaN or infinite; nothing was updated."""

    def __init__(self, term: str, value: float) -> None:
        super().__init__(
            f"the {term} loss is {value} at this step; no gradient was applied. "
            "Lower the learning rate(s), use --amp bf16 instead of fp16, or clip gradients; "
            "resume from the last good checkpoint."
        )
        self.term = term
        self.value = value


class NonFiniteGradientError(NonFiniteLossError):
    """A gradient (or a BatchNorm statistic) of the step is NaN or infinite while every loss
    term is finite; the optimizer step was not taken."""

    def __init__(self, what: str, value: float) -> None:
        FloatingPointError.__init__(
            self,
            f"{what} is {value} at this step (every loss term is finite); no gradient was "
            "applied. Lower the learning rate(s), use --amp bf16 instead of fp16, or clip "
            "gradients; resume from the last good checkpoint.")
        self.term = what
        self.value = value


class NonFiniteStateError(NonFiniteLossError):
    """The state about to be saved (weights, BatchNorm statistics, gates) holds NaN/inf."""

    def __init__(self, message: str) -> None:
        FloatingPointError.__init__(self, message)
        self.term = "state"
        self.value = float("nan")


def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor | None]]
                     ) -> tuple[str, float] | None:
    """``(name, a non-finite value)`` of the first tensor holding NaN/inf, or None. One device
    sync for the whole set; the culprit is looked up only when there is one."""
    named = [(n, t) for n, t in named_tensors if t is not None and t.numel()]
    floats = [t for _, t in named if t.is_floating_point()]
    if not floats:
        return None
    norms = torch._foreach_norm([t.detach().float() for t in floats], float("inf"))
    if bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()):
        return None
    for n, t in named:
        if t.is_floating_point():
            bad = t.detach()[~torch.isfinite(t.detach())]
            if bad.numel():
                return n, float(bad.flatten()[0])
    return None


def check_gradients(model: nn.Module, optimizer: torch.optim.Optimizer,
                    gate_names: dict[int, str] | None = None) -> None:
    """Raise :class:`NonFiniteGradientError` naming the first parameter of ``optimizer`` whose
    gradient is NaN/inf (names from ``model``, gates from ``gate_names`` ``{id: name}``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    names.update(gate_names or {})
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    bad = first_non_finite((f"the gradient of {names.get(id(p), 'a parameter')!r}", p.grad)
                           for p in params)
    if bad is not None:
        raise NonFiniteGradientError(*bad)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None,
                   max_grad_norm: float | None = None,
                   grad_hook: Callable[[], None] | None = None,
                   names: dict[int, str] | None = None) -> None:
    """After the backward passes: ``grad_hook()`` (e.g. data-parallel gradient averaging), clip
    the model's gradients (unscaled first under a GradScaler), then the (scaled) optimizer step."""
    if grad_hook is not None:
        grad_hook()
    if scaler is None:  # (a GradScaler skips steps with non-finite gradients itself)
        check_gradients(model, optimizer, names)
    if max_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
