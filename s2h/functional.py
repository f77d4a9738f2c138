"""Fused dual (soft + hard) layers: the public face of the kernels in ``s2h.kernels``.

A *dual* layer computes, with one shared weight, the soft path of a layer (full width, input
channels scaled by the relaxed mask) and its hard path (kept channels only, compact
activations, scaled by the straight-through hard mask) -- METHOD.md sections 3 and 4::

    y_soft, y_hard = dual_linear(x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask,
                                 in_keep, out_keep)
    y_soft, y_hard = dual_conv2d(..., stride=1, padding=0, dilation=1, groups=1)

Back-ends (DESIGN.md "Dispatch"), chosen per call by ``S2H_BACKEND``:

* ``auto`` (default): the Triton kernels for CUDA tensors, the PyTorch reference otherwise;
* ``reference``: the plain PyTorch reference on any device (debugging, benchmark baseline);
* ``triton``: the Triton kernels always; on CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported) and is meant for tests only.

Under ``torch.compile`` the back-end is picked when the function is traced. Under
``torch.autocast`` the inputs and weights are cast to the autocast dtype (the masks keep
theirs; they are multiplied in fp32), as ``F.linear``/``F.conv2d`` would.

Numerics of the Triton path: fp32 accumulation always; fp32 operands use TF32 tensor cores
exactly when PyTorch would for the same layer (``torch.backends.cuda.matmul.allow_tf32`` for
linear, ``torch.backends.cudnn.allow_tf32`` for conv). In the forward the input mask is folded
into the weight, ``x @ (W * mask).T`` with ``W * mask`` rounded once to the operand dtype (the
reference rounds ``x * mask`` once instead; both are held to the same error rule), so the
kernels' K loops read plain operands. Weight gradients are deterministic (split-K partials
summed in a fixed order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import backend_for, kernels, use_triton
from .kernels._conv_common import is_depthwise  # needs no triton

__all__ = [
    "backend_for",
    "dual_conv2d",
    "dual_conv2d_reference",
    "dual_linear",
    "dual_linear_reference",
]

def _autocast(
    device: torch.device, *tensors: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Cast floating ``tensors`` to the autocast dtype when autocast is on for ``device``."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    )


def _check_index(name: str, index: torch.Tensor) -> torch.Tensor:
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name} must be a 1-D int64/int32 tensor, got {index.dtype} {tuple(index.shape)}"
        )
    return index.long()


def _check_common(
    kind: str,
    x_soft: torch.Tensor,
    x_hard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor,
    in_keep: torch.Tensor,
    out_keep: torch.Tensor,
    in_channels: int,
    soft_channels: int,
    hard_channels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    in_keep = _check_index("in_keep", in_keep)
    out_keep = _check_index("out_keep", out_keep)
    if soft_channels != in_channels:
        raise ValueError(
            f"{kind}: x_soft has {soft_channels} channels, weight expects {in_channels}"
        )
    if hard_channels != in_keep.numel():
        raise ValueError(
            f"{kind}: x_hard has {hard_channels} channels but in_keep keeps {in_keep.numel()}"
        )
    if soft_in_mask.numel() != in_channels or soft_in_mask.dim() != 1:
        raise ValueError(
            f"{kind}: soft_in_mask must have shape ({in_channels},), "
            f"got {tuple(soft_in_mask.shape)}"
        )
    if hard_in_mask.numel() != in_keep.numel() or hard_in_mask.dim() != 1:
        raise ValueError(
            f"{kind}: hard_in_mask must have shape ({in_keep.numel()},), "
            f"got {tuple(hard_in_mask.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{kind}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    return in_keep, out_keep


def _check_dtypes(kind: str, *tensors: torch.Tensor | None) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise TypeError(
            f"{kind}: x_soft, x_hard, weight and bias must share one dtype (got "
            f"{sorted(str(d) for d in dtypes)}); use torch.autocast for mixed precision"
        )


# ------------------------------------------------------------------------------------------
# Linear
# ------------------------------------------------------------------------------------------


def dual_linear_reference(
    x_soft: torch.Tensor,
    x_hard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor,
    in_keep: torch.Tensor,
    out_keep: torch.Tensor,
    *,
    weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch dual linear (the CPU path and the test oracle); arguments as
    :func:`dual_linear`. ``weight_grad=False`` detaches the weight and bias."""
    if not weight_grad:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
    y_soft = F.linear(x_soft * soft_in_mask.to(x_soft.dtype), weight, bias)
    w_hard = weight.index_select(0, out_keep).index_select(1, in_keep)
    b_hard = bias.index_select(0, out_keep) if bias is not None else None
    y_hard = F.linear(x_hard * hard_in_mask.to(x_hard.dtype), w_hard, b_hard)
    return y_soft, y_hard


def dual_linear(
    x_soft: torch.Tensor,
    x_hard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor,
    in_keep: torch.Tensor,
    out_keep: torch.Tensor,
    *,
    weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft and hard path of one linear layer sharing ``weight``.

    ``y_soft = linear(x_soft * soft_in_mask, weight, bias)`` and
    ``y_hard = linear(x_hard * hard_in_mask, weight[out_keep][:, in_keep], bias[out_keep])``.

    Args:
        x_soft: ``[*, K]`` float (fp32/fp16/bf16), the full-width input.
        x_hard: ``[*', K_h]`` same dtype, the kept input channels in the order of ``in_keep``
            (leading dims may differ from ``x_soft``'s).
        weight: ``[N, K]`` same dtype.
        bias: ``[N]`` same dtype, or None.
        soft_in_mask: ``[K]`` float (any float dtype, typically fp32 gates), relaxed mask.
        hard_in_mask: ``[K_h]`` float, straight-through hard mask (value ones; gradient to the
            gates).
        in_keep: ``[K_h]`` int64/int32, kept input channels (indices into ``K``).
        out_keep: ``[N_h]`` int64/int32, kept output channels (indices into ``N``).
        weight_grad: False computes only activation and mask gradients (no weight/bias
            gradient from this call), for the gate-only gap term of METHOD section 4.

    Returns:
        ``(y_soft [*, N], y_hard [*', N_h])`` in the input dtype.

    Gradients reach ``x_soft``, ``x_hard``, ``weight`` (both paths, the hard one into the kept
    block), ``bias``, ``soft_in_mask`` and ``hard_in_mask``.
    """
    if x_soft.dim() < 1 or x_hard.dim() < 1 or weight.dim() != 2:
        raise ValueError("dual_linear: x_soft/x_hard need a feature dim and weight must be 2-D")
    in_keep, out_keep = _check_common(
        "dual_linear", x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep,
        out_keep, weight.shape[1], x_soft.shape[-1], x_hard.shape[-1],
    )  # fmt: skip
    if not use_triton(x_soft.device):
        return dual_linear_reference(
            x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
            weight_grad=weight_grad,
        )  # fmt: skip
    x_soft, x_hard, weight, bias = _autocast(x_soft.device, x_soft, x_hard, weight, bias)
    _check_dtypes("dual_linear", x_soft, x_hard, weight, bias)
    return kernels.dual_linear_triton(
        x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
        weight_grad=weight_grad,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Conv2d
# ------------------------------------------------------------------------------------------


def _pair(name: str, value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"dual_conv2d: {name} must be an int or a pair of ints, got {value!r}")


def dual_conv2d_reference(
    x_soft: torch.Tensor,
    x_hard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor,
    in_keep: torch.Tensor,
    out_keep: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch dual conv2d (the CPU path and the test oracle); arguments as
    :func:`dual_conv2d`. ``weight_grad=False`` detaches the weight and bias."""
    if not weight_grad:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
    ms = soft_in_mask.to(x_soft.dtype)[:, None, None]
    y_soft = F.conv2d(x_soft * ms, weight, bias, stride, padding, dilation, groups)
    b_hard = bias.index_select(0, out_keep) if bias is not None else None
    mh = hard_in_mask.to(x_hard.dtype)[:, None, None]
    if is_depthwise(weight.shape, groups):
        w_hard = weight.index_select(0, out_keep)
        hard_groups = out_keep.numel()
    else:
        w_hard = weight.index_select(0, out_keep).index_select(1, in_keep)
        hard_groups = 1
    y_hard = F.conv2d(x_hard * mh, w_hard, b_hard, stride, padding, dilation, hard_groups)
    return y_soft, y_hard


def dual_conv2d(
    x_soft: torch.Tensor,
    x_hard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor,
    in_keep: torch.Tensor,
    out_keep: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft and hard path of one conv2d layer sharing ``weight``.

    ``y_soft = conv2d(x_soft * soft_in_mask[:, None, None], weight, bias, ...)`` and
    ``y_hard = conv2d(x_hard * hard_in_mask[:, None, None], weight[out_keep][:, in_keep],
    bias[out_keep], ...)``. Depthwise (``groups == C == O``): ``in_keep`` must equal
    ``out_keep``; the hard weight is ``weight[out_keep]`` with ``len(out_keep)`` groups.

    Args:
        x_soft: ``[B, C, H, W]`` float (fp32/fp16/bf16), any strides (channels-last is the
            fast layout for the kernels; outputs follow the input's memory format).
        x_hard: ``[B', C_h, H, W]`` same dtype, kept input channels in ``in_keep`` order.
        weight: ``[O, C, KH, KW]`` (``[C, 1, KH, KW]`` depthwise), same dtype.
        bias: ``[O]`` same dtype, or None.
        soft_in_mask: ``[C]`` float, relaxed mask per input channel.
        hard_in_mask: ``[C_h]`` float, straight-through hard mask.
        in_keep: ``[C_h]`` int64/int32, kept input channels.
        out_keep: ``[O_h]`` int64/int32, kept output channels.
        stride, padding, dilation: int or pair of ints (no string padding).
        groups: 1 or depthwise (``groups == C == O``); other groupings are not supported.
        weight_grad: False computes only activation and mask gradients (METHOD section 4).

    Returns:
        ``(y_soft [B, O, OH, OW], y_hard [B', O_h, OH, OW])`` in the input dtype.
    """
    if x_soft.dim() != 4 or x_hard.dim() != 4 or weight.dim() != 4:
        raise ValueError("dual_conv2d: x_soft, x_hard and weight must be 4-D (NCHW / OIHW)")
    stride, padding, dilation = (
        _pair("stride", stride),
        _pair("padding", padding),
        _pair("dilation", dilation),
    )
    depthwise = is_depthwise(weight.shape, groups)
    if groups != 1 and not depthwise:
        raise ValueError(
            f"dual_conv2d: groups={groups} with weight {tuple(weight.shape)} is neither a dense "
            "(groups=1) nor a depthwise (groups == in == out channels) convolution"
        )
    in_channels = weight.shape[0] if depthwise else weight.shape[1]
    in_keep, out_keep = _check_common(
        "dual_conv2d", x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep,
        out_keep, in_channels, x_soft.shape[1], x_hard.shape[1],
    )  # fmt: skip
    if depthwise and in_keep.numel() != out_keep.numel():
        raise ValueError("dual_conv2d: depthwise convolutions need in_keep == out_keep")
    if x_soft.shape[2:] != x_hard.shape[2:]:
        raise ValueError("dual_conv2d: x_soft and x_hard must have the same spatial size")
    if not use_triton(x_soft.device):
        return dual_conv2d_reference(
            x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
            stride, padding, dilation, groups, weight_grad=weight_grad,
        )  # fmt: skip
    x_soft, x_hard, weight, bias = _autocast(x_soft.device, x_soft, x_hard, weight, bias)
    _check_dtypes("dual_conv2d", x_soft, x_hard, weight, bias)
    return kernels.dual_conv2d_triton(
        x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
        stride, padding, dilation, groups, weight_grad=weight_grad,
    )  # fmt: skip
