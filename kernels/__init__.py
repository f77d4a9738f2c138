"""Triton kernels of s2h (installed as ``s2h.kernels``): fused dual (soft + hard) layers.

One op per file, each holding its Triton kernels (with their autotune keep-lists), the
``torch.library`` ops that launch them and their FLOP formulas:

* :mod:`.dual_linear` -- ``dual_linear_triton`` (ops ``torch.ops.s2h_kernels.dual_linear*``)
* :mod:`.dual_conv2d` -- ``dual_conv2d_triton`` (ops ``torch.ops.s2h_kernels.dual_conv2d*``):
  the dense (``groups == 1``) implicit-GEMM kernels and the ops, which launch
* :mod:`.dual_depthwise` -- the depthwise direct kernels when the convolution is depthwise.

Shared pieces: :mod:`._autograd` (the one autograd formula of both dual ops), :mod:`._common`
(interpreter detection, the GEMM autotune candidates, op registration, launch helpers),
:mod:`._tiles` (the ``@triton.jit`` tile helpers the kernels share), :mod:`._conv_common`
(conv geometry, ``is_depthwise``; no triton needed) and :mod:`.aot` (compiling every kernel
for a GPU target without a GPU).

Importing this package never fails when triton is missing or unusable: ``TRITON_AVAILABLE``
is then ``False`` and ``TRITON_IMPORT_ERROR`` says why. The public, dispatching face of these
kernels is :mod:`s2h.functional`.
"""

from __future__ import annotations

TRITON_AVAILABLE: bool = False
TRITON_IMPORT_ERROR: str | None = None
INTERPRET: bool = False

try:
    import triton  # noqa: F401 (fails here, clearly, when triton is missing)

    from ._common import INTERPRET, USE_TRITON_OP
    from .dual_conv2d import dual_conv2d_triton
    from .dual_linear import dual_linear_triton

    TRITON_AVAILABLE = True
except Exception as exc:  # noqa: BLE001 (also a triton/torch pair that fails to register)
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    USE_TRITON_OP = False

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"s2h Triton kernels are unavailable ({TRITON_IMPORT_ERROR})")

    dual_linear_triton = _unavailable  # type: ignore[assignment]
    dual_conv2d_triton = _unavailable  # type: ignore[assignment]

__all__ = [
    "INTERPRET",
    "TRITON_AVAILABLE",
    "TRITON_IMPORT_ERROR",
    "USE_TRITON_OP",
    "dual_conv2d_triton",
    "dual_linear_triton",
]
