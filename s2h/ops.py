"""Channel gather / scatter ops: the Python face of ``torch.ops.s2h.*`` (csrc/channel_ops*).

The hard network of S2H runs on the *kept* channels of every dependency group. These ops move
them in one pass:

=============================================  ==============================================
``gather_channels(x, index, dim)``             ``x.index_select(dim, index)``
``gather_weight(w, out_index, in_index)``      ``w[out_index][:, in_index]`` (one pass)
``scatter_channels(grad, index, dim, size)``   zeros with ``size`` at ``dim``, ``grad`` added at
                                               ``index`` (backward of ``gather_channels``)
``scatter_weight(grad, out_index, in_index,    zeros of ``full_shape``, ``grad`` added at
full_shape)``                                  ``[out_index][:, in_index]``
=============================================  ==============================================

The gathers are differentiable through the scatters and vice versa (to any order). Scatters add
up repeated indices deterministically: every output element is written by one thread that sums
its contributions in increasing index position, accumulating in float32 (float64 for float64
tensors), identically on CPU and CUDA.

Back-ends, chosen per call from the devices of the tensors:

* ``s2h._C`` (C++, parallel with ``at::parallel_for``) for CPU tensors,
* ``s2h._C`` (CUDA) for CUDA tensors when the extension was compiled with CUDA for an arch
  the device can run,
* the *torch fallback* (``index_select`` / ``index_add``) otherwise, e.g. when the extension is
  missing, was built against another torch, or ``S2H_DISABLE_EXT=1`` is set. It raises the same
  exceptions with the same messages for bad input.

Layouts: a contiguous input gives a contiguous output, a channels-last (3d) input a
channels-last (3d) output; any other layout (transposed, sliced, expanded, ...) is copied to a
contiguous tensor first, once, inside the op. Index tensors may have any strides.

Errors (raised on the host before any kernel runs, on CUDA too -- never a device assert):
``TypeError`` for a bad dtype (e.g. a float index), ``ValueError`` for inconsistent shapes,
``IndexError`` for a bad ``dim`` or an index entry outside ``[0, size)`` (negative included),
``RuntimeError`` for tensors on different devices.

Index range checks on CUDA: one reduction and a single device-to-host copy the first time an
index tensor is seen; the result is remembered for that tensor object while it is unmodified
(see :func:`set_index_check`), so reusing a group's kept-index tensor across layers and steps
costs no host sync. Keep index tensors alive and reuse them rather than re-slicing every call.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "OPS",
    "available",
    "build_info",
    "channel_mask_backward",
    "gather_channels",
    "gather_weight",
    "get_index_check",
    "op_backends",
    "scatter_channels",
    "scatter_weight",
    "set_index_check",
]

#: names of the ops registered in ``torch.ops.s2h``
OPS: tuple[str, ...] = ("gather_channels", "gather_weight", "scatter_channels", "scatter_weight")

BACKEND_CPP = "s2h._C (C++)"
BACKEND_CUDA = "s2h._C (CUDA)"
BACKEND_FALLBACK = "torch fallback"

_INDEX_DTYPES = (torch.int32, torch.int64)
_GRAD_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Loading the extension
# ------------------------------------------------------------------------------------------------


def _load_extension():
    """Import ``s2h._C``; returns ``(module or None, build info dict or None, error or None)``."""
    if os.environ.get("S2H_DISABLE_EXT", "0") == "1":
        return None, None, "disabled by S2H_DISABLE_EXT=1"
    try:
        from . import _C as ext  # registers torch.ops.s2h.* (TORCH_LIBRARY) as a side effect
    except Exception as exc:  # noqa: BLE001 - missing build, or one for another torch / Python
        return None, None, f"{type(exc).__name__}: {exc}"
    try:
        info = dict(ext.build_info())
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - a broken build
        return None, None, f"build_info() failed: {type(exc).__name__}: {exc}"
    built = str(info.get("torch") or "")
    running = torch.__version__.split("+")[0]
    if built and built.split(".")[:2] != running.split(".")[:2]:
        return (
            None,
            info,
            f"s2h._C was built against torch {built}, running torch {torch.__version__}",
        )
    if not all(hasattr(torch.ops.s2h, name) for name in OPS):  # pragma: no cover
        return None, info, "s2h._C imported but torch.ops.s2h is incomplete"
    return ext, info, None


_C, _BUILD_INFO, _LOAD_ERROR = _load_extension()
if _LOAD_ERROR is not None and os.environ.get("S2H_DISABLE_EXT", "0") != "1":
    warnings.warn(
        f"s2h: the C++/CUDA channel ops are not available ({_LOAD_ERROR}); using the PyTorch "
        "fallback. Rebuild with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )
#: the one-pass mask backward (a build from before it was added lacks it: torch ops then)
_HAS_MASK_OP = bool(_C is not None and hasattr(torch.ops.s2h, "channel_mask_backward"))
_EXT_WITH_CUDA = bool(_C is not None and _BUILD_INFO and _BUILD_INFO.get("with_cuda"))
_cuda_ok: bool | None = None  # decided on first use (probing devices initialises CUDA)


def _arch_runs_on(archs: str, major: int, minor: int) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST string has code that runs on a ``major.minor`` device.

    SASS for ``X.Y`` runs on ``X.Z`` with ``Z >= Y`` (``X.Ya`` only on ``X.Y``); ``+PTX`` code
    for ``X.Y`` is JIT-compiled on any newer device.
    """
    entries = re.findall(r"(\d+)\.(\d+)([af]?)(\+PTX)?", archs)
    if not entries:
        return True  # unknown list: let the runtime decide
    for a_major, a_minor, suffix, ptx in entries:
        am, an = int(a_major), int(a_minor)
        if ptx and (major, minor) >= (am, an):
            return True
        if suffix == "a" and (major, minor) == (am, an):
            return True
        if not suffix and major == am and minor >= an:
            return True
        if suffix == "f" and major == am and minor >= an:
            return True
    return False


def _ext_cuda_ok() -> bool:
    global _cuda_ok
    if not _EXT_WITH_CUDA:
        return False
    if _cuda_ok is None:
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return True  # decided later, eagerly
        archs = str(_BUILD_INFO.get("cuda_archs", "")) if _BUILD_INFO else ""
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        _cuda_ok = all(_arch_runs_on(archs, *cap) for cap in caps)
    return _cuda_ok


def _use_extension(*tensors: torch.Tensor) -> bool:
    if _C is None:
        return False
    for t in tensors:
        kind = t.device.type
        if kind == "cuda":
            if not _ext_cuda_ok():
                return False
        elif kind not in ("cpu", "meta"):
            return False
    return True


def available() -> bool:
    """Whether the compiled extension ``s2h._C`` is loaded and used."""
    return _C is not None


def build_info() -> dict:
    """What ``s2h._C`` was built with: ``loaded``, ``with_cuda``, ``cuda_archs`` (the
    TORCH_CUDA_ARCH_LIST string), ``cuda_runtime``, ``torch`` (compiled against), ``openmp``,
    ``ops``, ``index_check``; ``error`` says why the fallback is used when ``loaded`` is False.
    """
    info: dict = {
        "loaded": _C is not None,
        "with_cuda": False,
        "cuda_archs": "",
        "cuda_runtime": None,
        "torch": None,
        "ops": list(OPS),
    }
    if _BUILD_INFO:
        info.update(_BUILD_INFO)
    if _C is not None:
        info["index_check"] = get_index_check()
    if _LOAD_ERROR is not None:
        info["error"] = _LOAD_ERROR
    return info


def op_backends() -> dict[str, str]:
    """The back-end each op uses here, per device type: keys ``"<op>/cpu"`` and ``"<op>/cuda"``,
    values ``"s2h._C (C++)"``, ``"s2h._C (CUDA)"`` or ``"torch fallback"``. The CUDA entry says
    what a CUDA tensor would use, also on a machine without a GPU.
    """
    cpu = BACKEND_CPP if _C is not None else BACKEND_FALLBACK
    cuda = BACKEND_CUDA if _ext_cuda_ok() else BACKEND_FALLBACK
    out: dict[str, str] = {}
    for name in OPS:
        out[f"{name}/cpu"] = cpu
        out[f"{name}/cuda"] = cuda
    return out


def set_index_check(mode: str) -> None:
    """How the CUDA ops check that index entries lie in range (CPU always checks, for free).

    * ``"cached"`` (default, also ``S2H_INDEX_CHECK=cached``): one reduction + one host sync the
      first time an index tensor is seen; remembered while that tensor object is unmodified
      (same version counter, data pointer, shape). Steady-state training pays nothing.
    * ``"always"``: the reduction + sync on every call (debugging).
    * ``"off"``: no check; the kernels stay memory-safe (out-of-range entries read as zeros /
      are dropped) but give no error.

    Writes that bypass autograd's version counter (``t.data.copy_(...)``) are not seen by the
    cache; inference tensors are never cached. The torch fallback always checks (with a sync on
    CUDA).
    """
    if mode not in ("cached", "always", "off"):
        raise ValueError(
            f"s2h.set_index_check: mode must be 'cached', 'always' or 'off', got {mode!r}"
        )
    if _C is not None:
        _C.set_index_check(mode)


def get_index_check() -> str:
    """The current CUDA index-check mode (see :func:`set_index_check`)."""
    return str(_C.get_index_check()) if _C is not None else "always"


# ------------------------------------------------------------------------------------------------
# Argument checks: the same text as csrc/channel_ops.cpp. They are the fake (meta)
# implementations' checks and the fallback's.
# ------------------------------------------------------------------------------------------------


def _check_index_arg(op: str, tname: str, t: torch.Tensor, name: str, index: torch.Tensor) -> None:
    if index.device != t.device:
        raise RuntimeError(
            f"{op}: {tname} and {name} must be on the same device, "
            f"got {t.device} and {index.device}"
        )
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be an int32 or int64 tensor, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got a {index.dim()}-D tensor")


def _check_float_grad(op: str, grad: torch.Tensor) -> None:
    if grad.dtype not in _GRAD_DTYPES:
        raise TypeError(
            f"{op}: grad must be float64, float32, float16 or bfloat16, got {grad.dtype}"
        )


def _wrap_dim(op: str, tname: str, t: torch.Tensor, dim: int) -> int:
    n = t.dim()
    if n < 1:
        raise ValueError(f"{op}: {tname} must have at least one dimension, got a 0-D tensor")
    if not -n <= dim < n:
        raise IndexError(
            f"{op}: dim {dim} is out of range for a {n}-D tensor (expected {-n} to {n - 1})"
        )
    return dim + n if dim < 0 else dim


def _check_gather_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> int:
    op = "s2h.gather_channels"
    dim = _wrap_dim(op, "x", x, dim)
    _check_index_arg(op, "x", x, "index", index)
    return dim


def _check_scatter_channels(grad: torch.Tensor, index: torch.Tensor, dim: int, size) -> int:
    op = "s2h.scatter_channels"
    dim = _wrap_dim(op, "grad", grad, dim)
    _check_index_arg(op, "grad", grad, "index", index)
    _check_float_grad(op, grad)
    if size < 0:
        raise ValueError(f"{op}: size must be >= 0, got {size}")
    if grad.shape[dim] != index.numel():
        raise ValueError(
            f"{op}: grad.size({dim}) is {grad.shape[dim]} but index has {index.numel()} entries"
        )
    return dim


def _check_gather_weight(w: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor) -> None:
    op = "s2h.gather_weight"
    if w.dim() < 2:
        raise ValueError(
            f"{op}: w must have at least 2 dims (out, in, ...), got a {w.dim()}-D tensor"
        )
    _check_index_arg(op, "w", w, "out_index", out_index)
    _check_index_arg(op, "w", w, "in_index", in_index)


def _check_scatter_weight(
    grad: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor, full_shape: list
) -> None:
    op = "s2h.scatter_weight"
    if grad.dim() < 2:
        raise ValueError(
            f"{op}: grad must have at least 2 dims (out, in, ...), got a {grad.dim()}-D tensor"
        )
    _check_index_arg(op, "grad", grad, "out_index", out_index)
    _check_index_arg(op, "grad", grad, "in_index", in_index)
    _check_float_grad(op, grad)
    if len(full_shape) != grad.dim():
        raise ValueError(
            f"{op}: full_shape has {len(full_shape)} entries but grad has {grad.dim()} dims"
        )
    if full_shape[0] < 0 or full_shape[1] < 0:
        raise ValueError(f"{op}: full_shape must not be negative, got {list(full_shape)}")
    for d in range(2, grad.dim()):
        if full_shape[d] != grad.shape[d]:
            raise ValueError(
                f"{op}: full_shape[{d}] is {full_shape[d]} but grad.size({d}) is {grad.shape[d]}"
            )
    if grad.shape[0] != out_index.numel():
        raise ValueError(
            f"{op}: grad.size(0) is {grad.shape[0]} but out_index has {out_index.numel()} entries"
        )
    if grad.shape[1] != in_index.numel():
        raise ValueError(
            f"{op}: grad.size(1) is {grad.shape[1]} but in_index has {in_index.numel()} entries"
        )


def _check_ranges(op: str, args: Sequence[tuple[str, torch.Tensor, int, int]]) -> None:
    """Value check of the fallback: ``(name, index, dim, size)`` per index; one sync in all."""
    if torch.compiler.is_compiling():
        return  # data-dependent; index_select itself still refuses bad entries on CPU
    live = [a for a in args if a[1].numel() > 0]
    if not live:
        return
    stats = torch.stack([torch.stack(a[1].aminmax()).to(torch.int64) for a in live]).tolist()
    for (name, _, dim, size), (lo, hi) in zip(live, stats, strict=True):
        if lo < 0:
            raise IndexError(
                f"{op}: {name} contains a negative entry ({lo}); entries must lie in [0, {size}) "
                f"for dim {dim}"
            )
        if hi >= size:
            raise IndexError(
                f"{op}: {name} entry {hi} is out of range; "
                f"entries must lie in [0, {size}) for dim {dim}"
            )


def _kept_format(t: torch.Tensor) -> torch.memory_format:
    """Memory format of the output (the rule of csrc/channel_ops.cpp ``kept_format``)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty_like_layout(t: torch.Tensor, shape: Sequence) -> torch.Tensor:
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=_kept_format(t))


# ------------------------------------------------------------------------------------------------
# Torch fallback (same semantics, same errors)
# ------------------------------------------------------------------------------------------------


def _fallback_gather_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    dim = _check_gather_channels(x, index, dim)
    _check_ranges("s2h.gather_channels", [("index", index, dim, x.shape[dim])])
    return x.index_select(dim, index)


def _fallback_gather_weight(
    w: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor
) -> torch.Tensor:
    _check_gather_weight(w, out_index, in_index)
    _check_ranges(
        "s2h.gather_weight",
        [("out_index", out_index, 0, w.shape[0]), ("in_index", in_index, 1, w.shape[1])],
    )
    return w.index_select(0, out_index).index_select(1, in_index)


def _fallback_scatter_channels(
    grad: torch.Tensor, index: torch.Tensor, dim: int, size: int
) -> torch.Tensor:
    dim = _check_scatter_channels(grad, index, dim, size)
    _check_ranges("s2h.scatter_channels", [("index", index, dim, size)])
    shape = list(grad.shape)
    shape[dim] = size
    return grad.new_zeros(shape).index_add(dim, index, grad)


def _fallback_scatter_weight(
    grad: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor, full_shape: list
) -> torch.Tensor:
    _check_scatter_weight(grad, out_index, in_index, full_shape)
    _check_ranges(
        "s2h.scatter_weight",
        [("out_index", out_index, 0, full_shape[0]), ("in_index", in_index, 1, full_shape[1])],
    )
    rows = grad.new_zeros([full_shape[0]] + list(grad.shape[1:])).index_add(0, out_index, grad)
    return grad.new_zeros(list(full_shape)).index_add(1, in_index, rows)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def gather_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Entries ``index`` of ``x`` along ``dim``, in that order: ``x.index_select(dim, index)``.

    Args:
        x: any dtype, any shape with ``x.dim() >= 1``: NCHW or channels-last activations
            (``dim=1``), ``(..., C)`` tensors (``dim=-1``), 1-D parameters (``dim=0``), ...
        index: ``(K,)`` int32 or int64 on ``x``'s device, entries in ``[0, x.size(dim))``;
            repeats allowed.
        dim: the dimension to gather (negative counts from the end).

    Returns:
        ``x``'s shape with ``K`` at ``dim``, ``x``'s dtype, device and (kept) memory format.
        Differentiable in ``x`` (backward: :func:`scatter_channels`).
    """
    if _use_extension(x, index):
        return torch.ops.s2h.gather_channels(x, index, dim)
    return _fallback_gather_channels(x, index, dim)


def gather_weight(w: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor) -> torch.Tensor:
    """``w[out_index][:, in_index]`` in one pass, for linear ``(O, I)`` and conv
    ``(O, I, *kernel)`` weights (contiguous or channels-last).

    Args:
        w: ``(O, I, ...)``, any dtype.
        out_index: ``(Ko,)`` int32 / int64, entries in ``[0, O)``.
        in_index: ``(Ki,)`` int32 / int64, entries in ``[0, I)``.

    Returns:
        ``(Ko, Ki, ...)``, ``w``'s dtype, device and (kept) memory format. Differentiable in
        ``w`` (backward: :func:`scatter_weight`). For a depthwise ``(C, 1, kh, kw)`` weight use
        ``gather_channels(w, index, 0)``.
    """
    if _use_extension(w, out_index, in_index):
        return torch.ops.s2h.gather_weight(w, out_index, in_index)
    return _fallback_gather_weight(w, out_index, in_index)


def scatter_channels(grad: torch.Tensor, index: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The backward of :func:`gather_channels`: a zero tensor with ``size`` at ``dim`` into which
    ``grad``'s slices are added at ``index`` (repeats summed, deterministically).

    Args:
        grad: float64 / float32 / float16 / bfloat16, ``(..., K, ...)`` with ``K`` at ``dim``.
        index: ``(K,)`` int32 / int64 on ``grad``'s device, entries in ``[0, size)``.
        dim: the scattered dimension (negative counts from the end).
        size: extent of ``dim`` in the result.

    Returns:
        ``grad``'s shape with ``size`` at ``dim``; ``grad``'s dtype, device and (kept) memory
        format. Differentiable in ``grad`` (backward: :func:`gather_channels`).
    """
    if _use_extension(grad, index):
        return torch.ops.s2h.scatter_channels(grad, index, dim, size)
    return _fallback_scatter_channels(grad, index, dim, size)


def scatter_weight(
    grad: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor, full_shape: Sequence[int]
) -> torch.Tensor:
    """The backward of :func:`gather_weight`: ``zeros(full_shape)`` with ``grad`` added at
    ``[out_index][:, in_index]`` (repeats summed, deterministically).

    Args:
        grad: float64 / float32 / float16 / bfloat16, ``(Ko, Ki, ...)``.
        out_index: ``(Ko,)`` int32 / int64, entries in ``[0, full_shape[0])``.
        in_index: ``(Ki,)`` int32 / int64, entries in ``[0, full_shape[1])``.
        full_shape: ``(O, I, ...)``; the trailing dims must equal ``grad.shape[2:]``.

    Returns:
        ``full_shape``, ``grad``'s dtype, device and (kept) memory format. Differentiable in
        ``grad`` (backward: :func:`gather_weight`).
    """
    full_shape = list(full_shape)
    if _use_extension(grad, out_index, in_index):
        return torch.ops.s2h.scatter_weight(grad, out_index, in_index, full_shape)
    return _fallback_scatter_weight(grad, out_index, in_index, full_shape)


def channel_mask_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, dim: int,
                          need_grad_x: bool = True, grad_mask_dtype: torch.dtype | None = None,
                          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The backward of ``y = x * mask`` with ``mask`` ``(C,)`` along ``dim`` of ``x``:
    ``(grad * mask, Σ grad * x over every dim but dim)`` (the first ``None`` without
    ``need_grad_x``). On CPU float32 / float64 tensors the extension does both in one pass
    over ``grad`` and ``x`` (``torch.ops.s2h.channel_mask_backward``; the sums accumulate in
    float64); otherwise, and under ``create_graph`` (this path is not differentiable), the
    same with torch ops, the sums in float32 (float64 for float64 inputs). The mask gradient
    is returned in ``grad_mask_dtype`` (default ``mask``'s dtype: pass the gate's float32 when
    ``mask`` was cast to bf16 activations, so it is not rounded to bf16 and back)."""
    gx, gm = _channel_mask_backward(grad, x, mask, dim, need_grad_x)
    return gx, gm.to(grad_mask_dtype or mask.dtype)


def _channel_mask_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, dim: int,
                           need_grad_x: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`channel_mask_backward` with the mask gradient in the dtype it was summed in."""
    dim = dim % x.dim()
    if (_HAS_MASK_OP and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and grad.dtype == x.dtype and mask.dtype == x.dtype and not torch.is_grad_enabled()
            and grad.shape == x.shape):
        if (x.dim() == 4 and dim == 1 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)
                and grad.is_contiguous(memory_format=torch.channels_last)):
            gx, gm = torch.ops.s2h.channel_mask_backward(grad.permute(0, 2, 3, 1),
                                                         x.permute(0, 2, 3, 1), mask, 3,
                                                         need_grad_x)
            return (gx.permute(0, 3, 1, 2) if need_grad_x else None), gm
        gx, gm = torch.ops.s2h.channel_mask_backward(grad, x, mask, dim, need_grad_x)
        return (gx if need_grad_x else None), gm
    shape = [1] * x.dim()
    shape[dim] = -1
    dims = [d for d in range(x.dim()) if d != dim]
    gm = (grad * x).sum(dims, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (grad * mask.view(shape) if need_grad_x else None), gm


# ------------------------------------------------------------------------------------------------
# Fake (meta) implementations and autograd of torch.ops.s2h.*
# ------------------------------------------------------------------------------------------------


def _register() -> None:
    @torch.library.register_fake("s2h::gather_channels")
    def _(x, index, dim):
        dim = _check_gather_channels(x, index, dim)
        shape = list(x.shape)
        shape[dim] = index.shape[0]
        return _empty_like_layout(x, shape)

    @torch.library.register_fake("s2h::gather_weight")
    def _(w, out_index, in_index):
        _check_gather_weight(w, out_index, in_index)
        shape = [out_index.shape[0], in_index.shape[0], *w.shape[2:]]
        return _empty_like_layout(w, shape)

    @torch.library.register_fake("s2h::scatter_channels")
    def _(grad, index, dim, size):
        dim = _check_scatter_channels(grad, index, dim, size)
        shape = list(grad.shape)
        shape[dim] = size
        return _empty_like_layout(grad, shape)

    @torch.library.register_fake("s2h::scatter_weight")
    def _(grad, out_index, in_index, full_shape):
        full_shape = list(full_shape)
        _check_scatter_weight(grad, out_index, in_index, full_shape)
        return _empty_like_layout(grad, full_shape)

    if _HAS_MASK_OP:
        @torch.library.register_fake("s2h::channel_mask_backward")
        def _(grad, x, mask, dim, need_grad_x):
            dim = dim % x.dim()
            gx = torch.empty_like(grad) if need_grad_x else grad.new_empty((0,))
            return gx, x.new_empty((x.shape[dim],))

    # gather_channels <-> scatter_channels
    def gc_setup(ctx, inputs, output):
        x, index, dim = inputs
        ctx.save_for_backward(index)
        ctx.dim = dim
        ctx.size = x.shape[dim]

    def gc_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.s2h.scatter_channels(grad, index, ctx.dim, ctx.size), None, None

    def sc_setup(ctx, inputs, output):
        _, index, dim, _ = inputs
        ctx.save_for_backward(index)
        ctx.dim = dim

    def sc_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.s2h.gather_channels(grad, index, ctx.dim), None, None, None

    # gather_weight <-> scatter_weight
    def gw_setup(ctx, inputs, output):
        w, out_index, in_index = inputs
        ctx.save_for_backward(out_index, in_index)
        ctx.full_shape = list(w.shape)

    def gw_backward(ctx, grad):
        out_index, in_index = ctx.saved_tensors
        return (
            torch.ops.s2h.scatter_weight(grad, out_index, in_index, ctx.full_shape),
            None,
            None,
        )

    def sw_setup(ctx, inputs, output):
        _, out_index, in_index, _ = inputs
        ctx.save_for_backward(out_index, in_index)

    def sw_backward(ctx, grad):
        out_index, in_index = ctx.saved_tensors
        return torch.ops.s2h.gather_weight(grad, out_index, in_index), None, None, None

    torch.library.register_autograd("s2h::gather_channels", gc_backward, setup_context=gc_setup)
    torch.library.register_autograd("s2h::scatter_channels", sc_backward, setup_context=sc_setup)
    torch.library.register_autograd("s2h::gather_weight", gw_backward, setup_context=gw_setup)
    torch.library.register_autograd("s2h::scatter_weight", sw_backward, setup_context=sw_setup)


if _C is not None:
    _register()
