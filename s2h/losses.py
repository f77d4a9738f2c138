"""The S2H loss terms and the routed backward (METHOD §4), as functions of tensors and gates.

:func:`loss_terms` computes the four terms from the two networks' logits and the
differentiable FLOPs ratio; :func:`routed_backward` sends each term's gradient only where the
method lets it go (the table of METHOD §4); :func:`add_normalized_resource_grad` is the default
form of the resource gradient. None of them needs a model: the pruner calls them with its
outputs, gates and settings, and tests can call them with small tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RESOURCE_MODES", "VARIANTS", "add_normalized_resource_grad", "loss_terms",
           "resource_fade", "routed_backward"]

VARIANTS = ("s2h", "no_gap", "coupled_gap", "direct_hard")
RESOURCE_MODES = ("normalized", "quadratic")


def loss_terms(soft_out: torch.Tensor, hard_out: torch.Tensor, targets: torch.Tensor,
               flops_ratio: torch.Tensor, *, target: float, alpha: float = 1.0,
               lam: float = 4.0, variant: str = "s2h", resource: bool = True,
               loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """The four terms of METHOD §4 (see the table there for what each may reach).

    soft_out, hard_out: ``(B, num_classes)`` logits (any float dtype); targets: ``(B,)``;
    flops_ratio: the differentiable FLOPs ratio of the hard network (returned as
    ``"flops_ratio"``). ``resource=False`` (the freeze phase) makes the resource term a zero
    constant. For the ablation variants the gap terms change (and ``direct_hard`` puts the
    task loss on the hard output); a term that does not exist in a variant is a zero constant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    s = soft_out.float()
    h = hard_out.float()
    zero = torch.zeros((), device=h.device)
    res = lam * (flops_ratio - target) ** 2 if resource else zero
    task = loss_fn or F.cross_entropy
    if variant == "direct_hard":
        return {"perf": task(h, targets), "gap_weights": zero, "gap_gates": zero,
                "resource": res, "flops_ratio": flops_ratio}
    perf = task(s, targets)
    log_ps = F.log_softmax(s, dim=-1)
    log_ph = F.log_softmax(h, dim=-1)
    ps = log_ps.exp()
    if variant == "no_gap":
        gap_weights = gap_gates = zero
    elif variant == "coupled_gap":  # KL(p_s || p_h), gradients to both networks
        gap_weights = alpha * (ps * (log_ps - log_ph)).sum(-1).mean()
        gap_gates = zero
    else:
        # KL(p_s || p_h) = sum p_s (log p_s - log p_h), batch mean, decoupled (METHOD §4)
        gap_weights = alpha * (ps.detach() * (log_ps.detach() - log_ph)).sum(-1).mean()
        gap_gates = alpha * (ps * (log_ps - log_ph.detach())).sum(-1).mean()
    return {"perf": perf, "gap_weights": gap_weights, "gap_gates": gap_gates,
            "resource": res, "flops_ratio": flops_ratio}


def resource_fade(ratio: float, target: float, band: float) -> float:
    """The fade factor ``min((r - T)^2 / band^2, 1)`` of the normalised resource gradient."""
    return min((ratio - target) ** 2 / band ** 2, 1.0)


@torch.no_grad()
def add_normalized_resource_grad(gates: Sequence[torch.Tensor],
                                 res_grads: Sequence[torch.Tensor | None],
                                 before: Sequence[torch.Tensor | None], ratio: float, *,
                                 target: float, resource_ratio: float, band: float, lam: float,
                                 scaler: torch.amp.GradScaler | None = None) -> None:
    """Per gate: ``grad += sign(r - T) * resource_ratio * fade * ‖other‖ * ∂r/∂u / ‖∂r/∂u‖``.

    ``other`` is what the other terms accumulated into the gate's gradient in this step
    (``gate.grad`` minus ``before``); ``res_grads`` are ``∂r/∂u`` per gate. A gate whose other
    gradient is zero gets the plain quadratic gradient ``2 λ (r - T) ∂r/∂u`` instead.
    """
    diff = ratio - target
    fade = resource_fade(ratio, target, band)
    if fade == 0.0:
        return
    sign = 1.0 if diff > 0 else -1.0
    live = [(g, r, b) for g, r, b in zip(gates, res_grads, before, strict=True) if r is not None]
    if not live:
        return
    others = []
    for g, _, b in live:
        other = g.grad if g.grad is not None else torch.zeros_like(g)
        others.append(other - b if b is not None else other)
    # every norm in two multi-tensor launches, and one host read for all the tests below (the
    # per-gate loop used to sync twice per gate: 74 syncs a step for ResNet-50's 37 gates)
    rns = torch._foreach_norm([r for _, r, _ in live])
    ons = torch._foreach_norm(others)
    host = torch.stack([t.float() for t in (*rns, *ons)]).tolist()
    for i, (g, r, _) in enumerate(live):
        if host[i] == 0.0:
            continue
        if host[len(live) + i] > 0.0:
            add = r * (sign * resource_ratio * fade * ons[i] / rns[i])
        else:  # nothing to compare with: the plain quadratic gradient
            add = r * (2.0 * lam * diff)
            if scaler is not None:
                add = scaler.scale(add)
        g.grad = add if g.grad is None else g.grad + add


def routed_backward(terms: dict[str, torch.Tensor], gates: Sequence[torch.Tensor], *,
                    resource_mode: str = "normalized", target: float = 1.0,
                    resource_ratio: float = 2.0, band: float = 0.02, lam: float = 4.0,
                    scaler: torch.amp.GradScaler | None = None,
                    grad_hook: Callable[[], None] | None = None) -> None:
    """Accumulate the gradients of the four terms with the routing of METHOD §4.

    ``gap_gates`` is back-propagated with ``inputs=`` the gate logits only: autograd then
    computes activation gradients through the soft path and no weight gradient at all. The
    performance and weight-side gap terms share one ordinary backward (weights and gates).
    The resource term: ``resource_mode="quadratic"`` adds it to that backward; ``"normalized"``
    adds its gate gradient afterwards, rescaled per gate against the gate gradients the other
    terms left (:func:`add_normalized_resource_grad`). ``gates``: the trainable gate logits
    (none in the freeze phase). ``grad_hook()`` (data-parallel averaging), if given, runs after
    the backward passes and before that rescaling, so that it is measured against the averaged
    gradients (the FLOPs gradient is the same on every process).
    """
    if resource_mode not in RESOURCE_MODES:
        raise ValueError(f"resource_mode must be one of {RESOURCE_MODES}, got {resource_mode!r}")

    def scaled(t: torch.Tensor) -> torch.Tensor:
        return scaler.scale(t) if scaler is not None else t

    gates = list(gates)
    normalized = resource_mode == "normalized" and terms["flops_ratio"].requires_grad
    res_grads = before = None
    if normalized:
        res_grads = torch.autograd.grad(terms["flops_ratio"], gates, allow_unused=True,
                                        retain_graph=True)
        before = [None if g.grad is None else g.grad.detach().clone() for g in gates]
    if terms["gap_gates"].requires_grad and gates:
        torch.autograd.backward(scaled(terms["gap_gates"]), inputs=gates, retain_graph=True)
    main = terms["perf"] + terms["gap_weights"]
    if not normalized:
        main = main + terms["resource"]
    if main.requires_grad:
        scaled(main).backward()
    if grad_hook is not None:
        grad_hook()
    if normalized:
        add_normalized_resource_grad(gates, res_grads, before, float(terms["flops_ratio"].detach()),
                                     target=target, resource_ratio=resource_ratio, band=band,
                                     lam=lam, scaler=scaler)
