"""Convolution geometry shared by the dense and the depthwise dual conv2d kernels.

Plain Python and torch (no triton): ``is_depthwise`` is the one definition of "a depthwise
convolution" for the kernels, their FLOP formulas and the PyTorch reference path, which must
work where triton is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Row-split rule of the conv weight gradients (dense and depthwise), see
# ``_common.row_splits``: each split keeps at least this many output pixels, at most this many
# splits. The linear op uses 512 / 64 (its own values, in dual_linear.py); both are kept as
# they were set, since another split factor changes the fp32 summation order of the weight
# gradient and so its bits.
CONV_SPLIT_MIN_ROWS: int = 1024
CONV_MAX_SPLITS: int = 128


def is_depthwise(weight_shape: Sequence[int], groups: int) -> bool:
    """Whether a conv with weight shape ``[O, C/groups, KH, KW]`` and ``groups`` is depthwise
    (one input channel per group, as many groups as output channels: ``groups == C == O``)."""
    return groups > 1 and weight_shape[1] == 1 and groups == weight_shape[0]


def out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of a convolution along one spatial dimension."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def new_like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An output in ``x``'s memory format (channels-last in, channels-last out), as cuDNN does.
    The fake kernels use the same rule so that compiled graphs see the real strides."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """The four strides of a 4-D tensor (kernels take NCHW-ordered strides)."""
    return tuple(t.stride())  # type: ignore[return-value]


def conv_params(
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int, int, int]:
    """``(stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)`` as the kernels take them."""
    return stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]
