"""The autograd of a dual op, shared by ``dual_linear`` and ``dual_conv2d``.

Both forward ops have the schema ``(x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask,
in_keep, out_keep, *geometry, weight_grad) -> (y_soft, y_hard, hard_weight)`` (``geometry``
is empty for the linear op and ``stride, padding, dilation, groups`` for the conv op;
``hard_weight`` is the gathered hard-path weight the forward builds, saved here for the data
gradient, which would otherwise gather it again), and both backward passes are one
data-gradient op (activation and mask gradients of both paths) and one weight-gradient op
(weight and bias), each called with ``geometry`` after ``out_keep``:

* ``dgrad(grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask, in_keep,
  out_keep, *geometry, need_x_soft, need_x_hard, need_soft_mask, need_hard_mask,
  hard_weight)`` returns ``(dx_soft, dx_hard, d_soft_mask, d_hard_mask)``;
* ``wgrad(grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask, in_keep,
  out_keep, *geometry, need_bias)`` returns ``(d_weight, d_bias)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._common import needed_input_grads

_LEADING = 8  # x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep


def register_dual_autograd(
    name: str, dgrad: Callable[..., Any], wgrad: Callable[..., Any], *, geometry_args: int
) -> None:
    """Register the autograd formula of the dual op ``name`` (see the module docstring);
    ``geometry_args`` is how many arguments sit between ``out_keep`` and ``weight_grad``."""
    n_inputs = _LEADING + geometry_args + 1

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        if len(inputs) != n_inputs:
            raise TypeError(f"{name}: expected {n_inputs} inputs, got {len(inputs)}")
        x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep = inputs[
            :_LEADING
        ]
        # The gathered hard weight costs (kept fraction)^2 of the weight's memory until the
        # backward (a few % of the activations it keeps anyway); re-gathering it would re-read
        # the weight and write the copy again in every backward.
        hard_weight = output[2]
        ctx.mark_non_differentiable(hard_weight)
        ctx.save_for_backward(
            x_soft, x_hard, weight, soft_in_mask, hard_in_mask, in_keep, out_keep, hard_weight
        )
        ctx.geometry = tuple(
            list(g) if isinstance(g, (list, tuple)) else g for g in inputs[_LEADING:-1]
        )
        ctx.has_bias = bias is not None
        ctx.weight_grad = inputs[-1]
        ctx.bias = bias  # a leaf input: needed_input_grads asks whether its gradient is used
        # An unused output (e.g. the hard output in the gate-only gap backward) then arrives
        # as None and its tiles are skipped instead of multiplying zeros.
        ctx.set_materialize_grads(False)

    def backward(
        ctx: Any, grad_soft: torch.Tensor | None, grad_hard: torch.Tensor | None,
        _grad_hard_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
        x_soft, x_hard, weight, soft_in_mask, hard_in_mask, in_keep, out_keep, hard_weight = (
            ctx.saved_tensors
        )
        need = needed_input_grads(
            ctx, (x_soft, x_hard, weight, ctx.bias, soft_in_mask, hard_in_mask)
        )
        soft, hard = grad_soft is not None, grad_hard is not None
        dxs = dxh = dms = dmh = dw = db = None
        if (soft and (need[0] or need[4])) or (hard and (need[1] or need[5])):
            dxs, dxh, dms, dmh = dgrad(
                grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask,
                in_keep, out_keep, *ctx.geometry, need[0], need[1], need[4], need[5],
                hard_weight,
            )  # fmt: skip
            dxs = dxs if soft and need[0] else None
            dxh = dxh if hard and need[1] else None
            dms = dms if soft and need[4] else None
            dmh = dmh if hard and need[5] else None
        need_bias = ctx.has_bias and need[3]
        if ctx.weight_grad and (soft or hard) and (need[2] or need_bias):
            dw, db = wgrad(
                grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask,
                in_keep, out_keep, *ctx.geometry, need_bias,
            )  # fmt: skip
            dw = dw if need[2] else None
            db = db if need_bias else None
        # in_keep, out_keep, the geometry and weight_grad have no gradient
        return (dxs, dxh, dw, db, dms, dmh) + (None,) * (n_inputs - 6)

    torch.library.register_autograd(name, backward, setup_context=setup_context)
