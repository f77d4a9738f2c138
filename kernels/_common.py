"""Pieces shared by the dual kernels: interpreter detection, shared autotune candidates, op
registration and launch helpers (the ``@triton.jit`` helpers several kernels call are in
:mod:`._tiles`).

Only imported when triton is importable (see ``kernels/__init__.py``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

# Triton decides at ``@triton.jit`` time whether kernels are interpreted, from this variable;
# reading it once at import keeps our choices (configs, op registration) in step with it.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ``torch.library.triton_op`` lets torch.compile see (and fuse around) the kernels, but its
# implementation doubles as the fake kernel, which only works when ``wrap_triton`` recognises
# the kernel: interpreted kernels are not recognised. Under the interpreter (and on torch
# without triton_op) we register an opaque ``custom_op`` with an explicit fake instead.
# ``S2H_AUTOTUNE=0``: every kernel runs its first kept config (the one CI's compile check
# compiles) instead of benchmarking its keep-list at each new width bucket. For a short GPU run
# (``bench/run_gpu.sh --quick``), where compiling every candidate would take most of the time;
# rows timed this way record ``autotune: false``.
AUTOTUNE: bool = os.environ.get("S2H_AUTOTUNE", "1") != "0"

USE_TRITON_OP: bool = hasattr(torch.library, "triton_op") and not INTERPRET

# Row granularity of the mask-gradient partial sums (one fp32 row of partials per PARTIAL_ROWS
# rows of activations). Every config's BLOCK_M is a multiple of it, so each buffer row is
# written by exactly one tile whatever config autotuning picks (and re-running a config while
# benchmarking rewrites the same rows: no stale partials).
PARTIAL_ROWS: int = 64
# The same value as seen from ``@triton.jit`` code: the compiler only lets kernels read globals
# that are ``tl.constexpr`` objects (a plain int compiles under the interpreter only, and fails
# on a GPU with "Cannot access global variable PARTIAL_ROWS from within @jit'ed function").
PARTIAL_ROWS_C: tl.constexpr = tl.constexpr(PARTIAL_ROWS)


def _config(bm: int, bn: int, bk: int, *, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Autotuning. The linear and the dense conv kernels share two candidate lists (below); each
# kernel's keep-list -- which candidates it autotunes over -- sits beside the kernel, in its
# file. A candidate is dropped for a kernel when it spills registers (or would not fit shared
# memory) on sm_90 or sm_80 in any representative case of ``python bench/compile_kernels.py``
# (the table in bench/results/compile_kernels.md); the numbers say which, so the keep-lists
# change with the kernels, from measurements. Under the interpreter a kernel tunes over one
# config (no benchmarking) with large tiles: the interpreter's cost is per operation, not per
# element, so fewer, bigger tiles keep the CPU tests fast.


def gemm_candidates() -> list[triton.Config]:
    """Candidate configs of the 2-D tile GEMMs (forward and data gradient, linear and conv):
    ``BLOCK_M`` x ``BLOCK_N`` is the output tile, ``BLOCK_K`` the reduction step."""
    return [  # BLOCK_M: multiples of PARTIAL_ROWS
        _config(128, 128, 64, warps=8, stages=3),
        _config(128, 256, 64, warps=8, stages=3),
        _config(256, 128, 64, warps=8, stages=3),
        _config(128, 64, 64, warps=4, stages=4),
        _config(64, 128, 64, warps=4, stages=4),
        _config(64, 64, 32, warps=4, stages=4),
    ]


def wgrad_candidates() -> list[triton.Config]:
    """Candidate configs of the weight-gradient GEMMs (linear and conv): output tile
    ``BLOCK_N`` x ``BLOCK_K``, row step ``BLOCK_M``."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


def pick_configs(
    candidates: list[triton.Config], keep: tuple[int, ...], interpret: dict[str, int]
) -> list[triton.Config]:
    """The configs a kernel autotunes over: ``candidates[i] for i in keep`` (in that order),
    only the first of them with ``S2H_AUTOTUNE=0``, or under the interpreter the single config
    ``interpret``."""
    if INTERPRET:
        return [triton.Config(interpret)]
    if not AUTOTUNE:
        return [candidates[keep[0]]]
    return [candidates[i] for i in keep]


def gemm_configs(keep: tuple[int, ...]) -> list[triton.Config]:
    """Autotune configs of a 2-D tile GEMM kernel that keeps ``keep`` of :func:`gemm_candidates`."""
    interpret = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    return pick_configs(gemm_candidates(), keep, interpret)


def wgrad_configs(keep: tuple[int, ...]) -> list[triton.Config]:
    """Autotune configs of a weight-gradient kernel that keeps ``keep`` of
    :func:`wgrad_candidates`."""
    return pick_configs(wgrad_candidates(), keep, {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32})


def mask_columns(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w * mask`` over dim 1 (input channels), in fp32, rounded once to ``w``'s dtype."""
    shape = (1, -1) + (1,) * (w.dim() - 2)
    return (w.float() * mask.float().reshape(shape)).to(w.dtype)


def tune_key(*sizes: int) -> int:
    """The autotune key of a launch: every size rounded up to a power of two, packed in one int.

    Autotuning keyed on the exact sizes re-benchmarks every config whenever a kept width
    changes during training (every layer, every width step). Keyed on power-of-two buckets, a
    kernel is tuned at most once per bucket; the config chosen there is near-best for the
    neighbouring widths too. (The kernels still specialise on a size's divisibility by 16,
    so a compile, not a re-tune, may follow a width change.)
    """
    code = 0
    for size in sizes:
        code = (code << 6) | (max(int(size), 1) - 1).bit_length()
    return code


def dot_precision(dtype: torch.dtype, kind: str) -> str:
    """``input_precision`` for ``tl.dot``, following torch's own TF32 switches for fp32.

    ``kind`` is ``"matmul"`` (F.linear: ``torch.backends.cuda.matmul.allow_tf32``, off by
    default) or ``"conv"`` (F.conv2d: ``torch.backends.cudnn.allow_tf32``, on by default), so
    that the fused op rounds like the PyTorch layer it replaces. For fp16/bf16 operands the
    value is irrelevant (a string is passed all the same: a ``None`` constexpr is one more
    thing for torch.compile's handling of user kernels to get wrong).
    """
    if dtype != torch.float32:
        return "tf32"
    if INTERPRET:
        return "ieee"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the allow_tf32 flags are being deprecated upstream
        if kind == "conv":
            allow = bool(torch.backends.cudnn.allow_tf32)
        else:
            allow = bool(torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if allow else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels cast dot operands to fp32 before ``tl.dot``.

    Triton's interpreter computes bf16 ``tl.dot`` wrongly (garbage of order 1e10, checked with
    triton 3.9), so under the interpreter operands are cast to fp32 first. The products of
    fp16/bf16 values are exact in fp32 and the accumulator is fp32 anyway, so the numerics are
    those of the GPU path (which keeps the narrow operands for the tensor cores).
    """
    return INTERPRET and dtype != torch.float32


def num_programs_target(device: torch.device) -> int:
    """How many programs a launch should have to fill the device (used to pick split-K factors).

    Off CUDA (the interpreter) a number that makes the tests' tiny shapes use the row splits,
    including splits left empty by the row-block rounding.
    """
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 32


def row_splits(
    device: torch.device, rows: int, tiles: int, *, min_rows: int, max_splits: int
) -> int:
    """Split factor over rows for a weight-gradient GEMM so the launch fills the device.

    ``tiles`` is the number of output tiles at the typical config; each split keeps at least
    ``min_rows`` rows (32 under the interpreter) so the fp32 partial buffers stay small
    relative to the work, and there are at most ``max_splits`` splits. The two bounds are the
    op's own (the linear op and the conv ops use different ones, see their call sites).
    """
    target = num_programs_target(device)
    if tiles >= target or rows == 0:
        return 1
    min_rows = 32 if INTERPRET else min_rows
    return max(1, min(triton.cdiv(target, max(tiles, 1)), triton.cdiv(rows, min_rows), max_splits))


ALIGN_ELEMS: int = 8  # the divisor's default: kept widths are multiples of it


def with_align_hint(kernel: Any, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus the ``ALIGN`` constexpr of a kernel that declares ``align_args``.

    Triton proves 16-byte alignment of a size or stride only when its value is divisible by
    16; a kept width that is a multiple of 8 but not 16 (half of them with the default
    divisor) then turns every bf16 load of the hard path into a scalar 2-byte load, with no
    asynchronous copies. When every argument named in ``kernel.align_args`` is a multiple of
    ``ALIGN_ELEMS`` and every tensor starts 16-byte aligned, the kernel is told so (it rounds
    those values ``x // ALIGN * ALIGN``, which keeps them and is a multiple Triton's axis
    analysis can see; ``tl.multiple_of`` on a scalar argument had no effect); otherwise
    ``ALIGN=1`` and nothing is assumed. (Under tracing, where
    tensors have no address, nothing is assumed either.)
    """
    names = getattr(kernel, "align_args", None)
    if not names or "ALIGN" in kwargs:
        return kwargs
    # positional arguments fill the leading parameters only (the rest come as keywords)
    values = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
    try:
        ok = all(int(values[n]) % ALIGN_ELEMS == 0 for n in names) and all(
            t.data_ptr() % 16 == 0
            for t in values.values()
            if isinstance(t, torch.Tensor) and t.numel() > 0
        )
    except Exception:  # noqa: BLE001 (fake tensors / symbolic sizes while tracing)
        ok = False
    return {**kwargs, "ALIGN": ALIGN_ELEMS if ok else 1}


def add_wide_variant(kernel: Any, reduce_block: str) -> None:
    """Give an autotuned kernel ``kernel.wide``: the same kernel over its configs with the
    reduction block ``reduce_block`` halved (at least 16), for 4-byte (fp32) operands.

    The candidate lists are sized and checked for 2-byte operands (bf16 / fp16): with fp32
    operands the same tiles need twice the shared memory per pipeline stage (the linear weight
    gradient's 64x128x128 tile: 288 KB on sm_90, over its 227 KB; the conv GEMMs': 192 KB, over
    sm_80's 163 KB), and a config that does not fit fails at launch ("out of resource: shared
    memory") -- the autotuner skips such a config only when it has others to try. Halving the
    reduction step halves each stage's operand tiles and keeps the output tile, the pipeline
    depth and ``BLOCK_M``'s multiple of ``PARTIAL_ROWS`` for the GEMM kernels. fp32 launches
    come with the pruner's fp32 self-check and with fp32 training. (Under the interpreter there
    is one config and no shared memory: no variant.)
    """
    if INTERPRET:
        return
    configs = [wide_config(c, reduce_block) for c in kernel.configs]
    wide = triton.autotune(configs=configs, key=list(kernel.keys))(kernel.fn)
    wide.align_args = getattr(kernel, "align_args", None)
    kernel.wide = wide


def wide_config(config: triton.Config, reduce_block: str) -> triton.Config:
    """``config`` with its reduction block ``reduce_block`` halved (at least 16): the config
    of :func:`add_wide_variant`'s fp32 variant."""
    kw = dict(config.kwargs)
    kw[reduce_block] = max(16, kw[reduce_block] // 2)
    return triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages)


def kernel_for(kernel: Any, args: tuple) -> Any:
    """``kernel.wide`` (see :func:`add_wide_variant`) when the launch's first floating-point
    tensor argument has 4-byte elements, else ``kernel``."""
    wide = getattr(kernel, "wide", None)
    if wide is None:
        return kernel
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    return wide if first is not None and first.element_size() >= 4 else kernel


class _Launcher:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            kernel = kernel_for(self.kernel, args)
            inner = torch.library.wrap_triton(kernel) if USE_TRITON_OP else kernel
            return inner[grid](*args, **with_align_hint(kernel, args, kwargs))

        return launch


def launcher(kernel: Any) -> Any:
    """The kernel as it must be called inside an op body (``wrap_triton`` when tracing works),
    with its alignment hint (:func:`with_align_hint`) filled in and its fp32 variant
    (:func:`kernel_for`) chosen by the arguments."""
    return _Launcher(kernel)


def register_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: register ``fn`` as the op ``name`` (triton_op when usable, else custom_op
    with the ``fake`` kernel)."""

    def deco(fn: Callable[..., Any]) -> Any:
        if USE_TRITON_OP:
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return deco


def needed_input_grads(ctx: Any, inputs: tuple) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` narrowed to the gradients this backward pass will use.

    ``inputs`` are the op's leading tensor inputs as seen in backward (the saved tensors).
    ``needs_input_grad`` is fixed at forward time; a backward restricted with ``inputs=``
    (the gate-only backward of the mask-side gap term, METHOD section 4) does not use the
    weight gradient, and autograd would compute and drop it. The engine knows which nodes it
    will run in the current pass: a gradient whose node will not run is not computed. Outside
    the engine (e.g. a backward traced by torch.compile) this falls back to
    ``needs_input_grad``.
    """
    from torch.autograd.graph import get_gradient_edge

    need = tuple(ctx.needs_input_grad)
    try:
        with torch.enable_grad():  # the edge of a leaf is found through a recorded view
            return tuple(
                bool(n) and (
                    i >= len(inputs) or not isinstance(inputs[i], torch.Tensor)
                    or not inputs[i].requires_grad
                    or torch._C._will_engine_execute_node(get_gradient_edge(inputs[i]).node)
                )
                for i, n in enumerate(need)
            )  # fmt: skip
    except (RuntimeError, AttributeError, AssertionError):  # not inside the autograd engine
        return need


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for a gradient that was not requested (op schemas cannot return None)."""
    return like.new_empty((0,))


# --------------------------------------------------------------------------------------------
# Host-side pieces of the grouped (soft then hard) launches, shared by the op bodies
# --------------------------------------------------------------------------------------------


def dual_grid(
    m_s: int, n_s: int, m_h: int, n_h: int, n_block: str = "BLOCK_N", phases: int = 1
) -> Callable[[dict], tuple[int]]:
    """Grid of a grouped 2-D tile launch: the ``BLOCK_M x n_block`` tiles of the soft
    ``m_s x n_s`` output, then those of the hard ``m_h x n_h`` one; with ``phases > 1`` each
    output is ``phases`` independent ``m x n`` problems, tiled separately (the stride phases of
    a convolution's data gradient)."""

    def grid(meta: dict) -> tuple[int]:
        bm, bn = meta["BLOCK_M"], meta[n_block]
        soft = triton.cdiv(m_s, bm) * triton.cdiv(n_s, bn)
        return (phases * (soft + triton.cdiv(m_h, bm) * triton.cdiv(n_h, bn)),)

    return grid


def split_grid(
    split: int, taps: int, soft: tuple[int, ...] | None, hard: tuple[int, ...] | None,
    blocks: tuple[str, ...],
) -> Callable[[dict], tuple[int]]:  # fmt: skip
    """Grid of a grouped weight-gradient launch: ``split`` row splits x ``taps`` filter taps x
    the tiles of the soft output (sizes ``soft``, tiled by the ``blocks`` meta-parameters),
    plus those of the hard one; a path that is skipped is ``None``."""

    def tiles(sizes: tuple[int, ...] | None, meta: dict) -> int:
        if sizes is None:
            return 0
        return math.prod(triton.cdiv(n, meta[b]) for n, b in zip(sizes, blocks, strict=True))

    def grid(meta: dict) -> tuple[int]:
        return (split * taps * (tiles(soft, meta) + tiles(hard, meta)),)

    return grid


def wgrad_partials(
    split: int, device: torch.device, *shapes: tuple[int, ...] | None
) -> tuple[torch.Tensor, ...]:
    """The fp32 per-split partial buffers of a weight-gradient launch, ``[split, *shape]`` per
    shape (weight and bias gradients of the soft and hard paths), or an empty buffer where the
    shape is ``None`` (a path that is skipped, a bias gradient not needed)."""
    f32 = {"dtype": torch.float32, "device": device}
    return tuple(torch.empty((split, *s) if s is not None else (0,), **f32) for s in shapes)


def reduce_bias(
    dbs_part: torch.Tensor, dbh_part: torch.Tensor, out_keep: torch.Tensor, n_out: int,
    do_soft: bool, do_hard: bool,
) -> torch.Tensor:  # fmt: skip
    """The fp32 bias gradient ``[n_out]`` from the per-split partials of both paths (the hard
    one scattered into the kept output channels; unique indices, so deterministic)."""
    db = dbs_part.sum(0) if do_soft else torch.zeros((n_out,), dtype=torch.float32,
                                                     device=dbs_part.device)
    if do_hard:
        db = db.index_put((out_keep,), dbh_part.sum(0), accumulate=True)
    return db


def wgrad_fake(weight: torch.Tensor, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a weight-gradient op as its fake kernel returns them."""
    db = weight.new_empty((weight.shape[0],)) if need_bias else weight.new_empty((0,))
    return torch.empty_like(weight, memory_format=torch.contiguous_format), db
