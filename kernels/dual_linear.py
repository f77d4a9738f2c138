"""Fused dual (soft + hard) masked linear: Triton kernels, the ops that launch them, autograd.

Math (``W`` is ``[N, K]``, ``i = in_keep``, ``o = out_keep``)::

    y_soft = (x_soft * soft_in_mask) @ W.T + b                    # [M_s, N]
    y_hard = (x_hard * hard_in_mask) @ W[o][:, i].T + b[o]        # [M_h, N_h]

Kernels (each one launch covering the tiles of *both* problems; soft tiles come first
because their reduction is longer, so the short hard tiles fill the tail of the wave):

* ``_dual_linear_fwd_kernel``   a plain GEMM of ``x`` and ``W * mask`` (the input mask is
  folded into the weight copy once per call, out of the K loop: ``(x * m) @ W.T ==
  x @ (W * m).T``); the bias is added in the epilogue (gathered through ``out_keep`` for the
  hard problem).
* ``_dual_linear_dgrad_kernel`` ``g = dY @ W`` (gradient w.r.t. the masked input); the
  epilogue writes ``dx = g * mask`` and the per-row-tile partial sums of ``g * x`` that give
  the mask gradient, so neither ``g`` nor ``x * mask`` is ever materialised.
* ``_dual_linear_wgrad_kernel`` ``dW = (dY.T @ x) * mask`` with the rows split in
  ``SPLIT`` chunks (the reduction is over the batch, which is long while ``N x K`` may give
  few tiles); the bias gradient (column sums of ``dY``) rides along in the tiles of the
  first ``K`` block. Partial sums go to fp32 buffers that are summed afterwards: no atomics,
  so results are deterministic and autotuning may rerun the kernel freely.

The hard problem reads a gathered copy ``W[o][:, i]`` (``N_h x K_h``, contiguous) rather
than gathering inside the kernel: ``i`` indexes the contiguous dimension of ``W``, so an
in-kernel gather would turn every weight-tile load into scattered scalar loads (no
vectorisation, no TMA) on the hot loop, while the copy costs one pass over at most the size
of ``W`` per call, which is ``M_h / BLOCK_M`` times less traffic than the GEMM reads of that
operand. The bias is gathered in the kernel (one vector per tile). The hard weight gradient is
computed compact and scattered into ``dW[o][:, i]`` by an index-add.
"""

# torch.library infers op schemas from typing.Optional (the GPU host's torch 2.11 included);
# keep it rather than `X | None`.
# ruff: noqa: UP045
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._autograd import register_dual_autograd
from ._common import (
    PARTIAL_ROWS,
    add_wide_variant,
    dot_precision,
    dual_grid,
    gemm_configs,
    launcher,
    mask_columns,
    reduce_bias,
    register_op,
    row_splits,
    split_grid,
    tune_key,
    upcast_dot,
    wgrad_configs,
    wgrad_fake,
    wgrad_partials,
)
from ._tiles import (
    add_bias,
    block_offsets,
    dgrad_epilogue,
    grouped_tile,
    mma,
    split_rows,
    tile_offsets,
    wgrad_epilogue,
    wgrad_step,
)

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    tile, x_ptr, w_ptr, b_ptr, bias_index_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BIAS_GATHER: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M x BLOCK_N`` tile of ``y = x @ w.T + b``; ``w`` has the input mask folded in
    (``(x * mask) @ w.T == x @ (w * mask).T``), so the K loop is a plain GEMM loop."""
    _, offs_m, offs_n, m_ok, n_ok = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k, k_ok = block_offsets(k0, K, BLOCK_K)
        a = tl.load(
            x_rows + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            w_cols + offs_k[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = mma(acc, a, b, UPCAST, PRECISION)
    acc = add_bias(acc, b_ptr, bias_index_ptr, offs_n, n_ok, HAS_BIAS, BIAS_GATHER)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Autotune keep-lists: which of _common's candidates each kernel tunes over (see the note there
# on how they are measured with bench/compile_kernels.py).
FWD_KEEP = (0, 1, 3, 4, 5)  # of gemm_candidates(): 256x128 spills 48 B on sm_80


@triton.autotune(configs=gemm_configs(FWD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_linear_fwd_kernel(
    xs_ptr, xh_ptr, w_ptr, wh_ptr, b_ptr, out_keep_ptr, ys_ptr, yh_ptr,
    M_s, M_h, N, K, N_h, K_h,
    stride_xs_m, stride_xs_k, stride_xh_m, stride_xh_k,
    stride_w_n, stride_w_k, stride_wh_n, stride_wh_k,
    stride_ys_m, stride_ys_n, stride_yh_m, stride_yh_n,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Grouped launch: programs ``[0, T_s)`` do soft tiles, ``[T_s, T_s + T_h)`` hard tiles."""
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        N = N // ALIGN * ALIGN
        K = K // ALIGN * ALIGN
        N_h = N_h // ALIGN * ALIGN
        K_h = K_h // ALIGN * ALIGN
        stride_xs_m = stride_xs_m // ALIGN * ALIGN
        stride_xh_m = stride_xh_m // ALIGN * ALIGN
        stride_w_n = stride_w_n // ALIGN * ALIGN
        stride_wh_n = stride_wh_n // ALIGN * ALIGN
        stride_ys_m = stride_ys_m // ALIGN * ALIGN
        stride_yh_m = stride_yh_m // ALIGN * ALIGN
    pid = tl.program_id(0)
    soft_tiles = tl.cdiv(M_s, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if pid < soft_tiles:
        _fwd_tile(
            pid, xs_ptr, w_ptr, b_ptr, out_keep_ptr, ys_ptr, M_s, N, K,
            stride_xs_m, stride_xs_k, stride_w_n, stride_w_k, stride_ys_m, stride_ys_n,
            HAS_BIAS, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip
    else:
        _fwd_tile(
            pid - soft_tiles, xh_ptr, wh_ptr, b_ptr, out_keep_ptr, yh_ptr, M_h, N_h, K_h,
            stride_xh_m, stride_xh_k, stride_wh_n, stride_wh_k, stride_yh_m, stride_yh_n,
            HAS_BIAS, True, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


_dual_linear_fwd_kernel.align_args = (  # sizes and strides that ALIGN asserts are multiples of it
    "N", "K", "N_h", "K_h", "stride_xs_m", "stride_xh_m", "stride_w_n", "stride_wh_n",
    "stride_ys_m", "stride_yh_m",
)
add_wide_variant(_dual_linear_fwd_kernel, "BLOCK_K")  # fp32 operands: half the reduction step


@triton.jit
def _dgrad_tile(
    tile, dy_ptr, w_ptr, x_ptr, mask_ptr, dx_ptr, dmask_part_ptr,
    M, N, K, stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk,
    NEED_DX: tl.constexpr, NEED_DMASK: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M x BLOCK_N`` tile (rows x input features) of ``g = dy @ w``, reduced over
    ``N`` output features in ``BLOCK_K`` steps, with the mask-gradient partial in the epilogue.
    ``dx`` is contiguous ``[M, K]``; ``dmask_part`` is contiguous ``[*, K]`` fp32, one row per
    row tile."""
    pid_m, offs_m, offs_k, m_ok, k_ok = grouped_tile(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        offs_n, n_ok = block_offsets(n0, N, BLOCK_K)
        a = tl.load(
            dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0
        )
        b = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=n_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = mma(acc, a, b, UPCAST, PRECISION)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    dgrad_epilogue(
        acc, dx_ptrs, x_ptrs, mask_ptr, dmask_part_ptr, pid_m, M, m_ok, K, offs_k, k_ok,
        NEED_DX, NEED_DMASK, BLOCK_M, BLOCK_N,
    )  # fmt: skip


DGRAD_KEEP = (0, 3, 4, 5)  # of gemm_candidates(): 128x256 and 256x128 spill 56-304 B


@triton.autotune(configs=gemm_configs(DGRAD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_linear_dgrad_kernel(
    dys_ptr, dyh_ptr, w_ptr, wh_ptr, xs_ptr, xh_ptr, ms_ptr, mh_ptr,
    dxs_ptr, dxh_ptr, dms_part_ptr, dmh_part_ptr,
    M_s, M_h, N, K, N_h, K_h,
    stride_dys_m, stride_dys_n, stride_dyh_m, stride_dyh_n,
    stride_w_n, stride_w_k, stride_wh_n, stride_wh_k,
    stride_xs_m, stride_xs_k, stride_xh_m, stride_xh_k,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    NEED_DX_S: tl.constexpr, NEED_DM_S: tl.constexpr,
    NEED_DX_H: tl.constexpr, NEED_DM_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Grouped data-gradient launch over the soft then the hard problem's tiles."""
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        N = N // ALIGN * ALIGN
        K = K // ALIGN * ALIGN
        N_h = N_h // ALIGN * ALIGN
        K_h = K_h // ALIGN * ALIGN
        stride_dys_m = stride_dys_m // ALIGN * ALIGN
        stride_dyh_m = stride_dyh_m // ALIGN * ALIGN
        stride_w_n = stride_w_n // ALIGN * ALIGN
        stride_wh_n = stride_wh_n // ALIGN * ALIGN
        stride_xs_m = stride_xs_m // ALIGN * ALIGN
        stride_xh_m = stride_xh_m // ALIGN * ALIGN
    pid = tl.program_id(0)
    soft_tiles = tl.cdiv(M_s, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    if pid < soft_tiles:
        _dgrad_tile(
            pid, dys_ptr, w_ptr, xs_ptr, ms_ptr, dxs_ptr, dms_part_ptr, M_s, N, K,
            stride_dys_m, stride_dys_n, stride_w_n, stride_w_k, stride_xs_m, stride_xs_k,
            NEED_DX_S, NEED_DM_S, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip
    else:
        _dgrad_tile(
            pid - soft_tiles, dyh_ptr, wh_ptr, xh_ptr, mh_ptr, dxh_ptr, dmh_part_ptr,
            M_h, N_h, K_h,
            stride_dyh_m, stride_dyh_n, stride_wh_n, stride_wh_k, stride_xh_m, stride_xh_k,
            NEED_DX_H, NEED_DM_H, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


_dual_linear_dgrad_kernel.align_args = (  # sizes and strides that ALIGN asserts are multiples of it
    "N", "K", "N_h", "K_h", "stride_dys_m", "stride_dyh_m", "stride_w_n", "stride_wh_n",
    "stride_xs_m", "stride_xh_m",
)
add_wide_variant(_dual_linear_dgrad_kernel, "BLOCK_K")  # fp32 operands: half the reduction step


@triton.jit
def _wgrad_tile(
    tile, dy_ptr, x_ptr, mask_ptr, dw_part_ptr, db_part_ptr,
    M, N, K, SPLIT, stride_dym, stride_dyn, stride_xm, stride_xk,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_N x BLOCK_K`` tile of one row split of ``dW = dy.T @ (x * mask)``.
    ``dw_part`` is contiguous ``[SPLIT, N, K]`` fp32, ``db_part`` ``[SPLIT, N]`` fp32."""
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    # Split slowest: concurrently running tiles read the same rows of dy and x (L2 reuse).
    split = tile // (num_n * num_k)
    rest = tile % (num_n * num_k)
    pid_n = rest // num_k
    pid_k = rest % num_k
    m_lo, m_hi = split_rows(split, M, SPLIT, BLOCK_M)
    offs_n, offs_k, n_ok, k_ok = tile_offsets(pid_n, pid_k, N, K, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m, m_ok = block_offsets(m0, m_hi, BLOCK_M)
        rows = offs_m.to(tl.int64)
        # dy loaded already transposed ([BLOCK_N, BLOCK_M]) so the dot needs no permute.
        a = tl.load(
            dy_ptr + rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
            mask=n_ok[:, None] & m_ok[None, :], other=0.0,
        )  # fmt: skip
        xb = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )  # fmt: skip
        acc, bias_acc = wgrad_step(acc, bias_acc, a, xb, pid_k == 0, HAS_BIAS, UPCAST, PRECISION)
    dw_ptrs = dw_part_ptr + split.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    wgrad_epilogue(  # the bias gradient rides in the tiles of the first K block
        acc, bias_acc, dw_ptrs, db_part_ptr + split * N + offs_n, mask_ptr,
        offs_n, n_ok, offs_k, k_ok, pid_k == 0, HAS_BIAS,
    )  # fmt: skip


# Of wgrad_candidates(): 64x128 tiles spill 60-360 B on sm_80. No BLOCK_K=128 config: on an H200
# (Triton 3.6, sm_90, 2026-11-30, bench/wgrad_check.py at ViT-B/16 shapes) both of them wrote
# one whole wrong output tile in some runs -- 14 of 48 (case, dtype, path) cells had a bad
# repeat, the wrong tile moving between repeats (a race, not reproduced by the interpreter) --
# while the BLOCK_K=64 configs were right and bit-identical in every run.
WGRAD_KEEP = (4, 3)


@triton.autotune(configs=wgrad_configs(WGRAD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_linear_wgrad_kernel(
    dys_ptr, dyh_ptr, xs_ptr, xh_ptr, ms_ptr, mh_ptr,
    dws_part_ptr, dwh_part_ptr, dbs_part_ptr, dbh_part_ptr,
    M_s, M_h, N, K, N_h, K_h, SPLIT, soft_on,
    stride_dys_m, stride_dys_n, stride_dyh_m, stride_dyh_n,
    stride_xs_m, stride_xs_k, stride_xh_m, stride_xh_k,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grouped weight-gradient launch over the soft then the hard problem's (split, tile)s.
    ``soft_on`` is 0 when the soft problem is skipped (its tiles span ``N x K``, not rows)."""
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        N = N // ALIGN * ALIGN
        K = K // ALIGN * ALIGN
        N_h = N_h // ALIGN * ALIGN
        K_h = K_h // ALIGN * ALIGN
        stride_dys_m = stride_dys_m // ALIGN * ALIGN
        stride_dyh_m = stride_dyh_m // ALIGN * ALIGN
        stride_xs_m = stride_xs_m // ALIGN * ALIGN
        stride_xh_m = stride_xh_m // ALIGN * ALIGN
    pid = tl.program_id(0)
    soft_tiles = SPLIT * tl.cdiv(N, BLOCK_N) * tl.cdiv(K, BLOCK_K) * soft_on
    if pid < soft_tiles:
        _wgrad_tile(
            pid, dys_ptr, xs_ptr, ms_ptr, dws_part_ptr, dbs_part_ptr, M_s, N, K, SPLIT,
            stride_dys_m, stride_dys_n, stride_xs_m, stride_xs_k,
            HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        _wgrad_tile(
            pid - soft_tiles, dyh_ptr, xh_ptr, mh_ptr, dwh_part_ptr, dbh_part_ptr,
            M_h, N_h, K_h, SPLIT,
            stride_dyh_m, stride_dyh_n, stride_xh_m, stride_xh_k,
            HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


_dual_linear_wgrad_kernel.align_args = (  # sizes and strides that ALIGN asserts are multiples of it
    "N", "K", "N_h", "K_h", "stride_dys_m", "stride_dyh_m", "stride_xs_m", "stride_xh_m",
)
add_wide_variant(_dual_linear_wgrad_kernel, "BLOCK_M")  # fp32 operands: half the reduction step


# --------------------------------------------------------------------------------------------
# Launchers (the bodies of the registered ops)
# --------------------------------------------------------------------------------------------


def gather_hard_weight(
    weight: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor
) -> torch.Tensor:
    """``weight[out_keep][:, in_keep]`` as a contiguous ``[N_h, K_h]`` tensor (see module doc)."""
    return weight.index_select(0, out_keep).index_select(1, in_keep)


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """``t`` as ``[rows, features]`` (a view whenever strides allow; kernels take strides)."""
    return t.reshape(-1, features)


# Row splits of the weight gradient (_common.row_splits): at least 512 rows per split, at most
# 64 splits (the conv ops use 1024 / 128: kept per op, as a split factor change would change
# the fp32 summation order, hence the bits, of the weight gradient).
SPLIT_MIN_ROWS = 512
MAX_SPLITS = 64


def _fwd_fake(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    soft_in_mask: torch.Tensor, hard_in_mask: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    y_soft = x_soft.new_empty((*x_soft.shape[:-1], weight.shape[0]))
    y_hard = x_hard.new_empty((*x_hard.shape[:-1], out_keep.shape[0]))
    return y_soft, y_hard, weight.new_empty((out_keep.shape[0], in_keep.shape[0]))


@register_op("s2h_kernels::dual_linear", fake=_fwd_fake)
def dual_linear_op(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    soft_in_mask: torch.Tensor, hard_in_mask: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward of the dual linear (one launch). Arguments as ``s2h.functional.dual_linear``;
    ``weight_grad`` only matters to autograd.

    Returns ``(y_soft, y_hard, hard_weight)``: ``hard_weight`` is the gathered (unmasked)
    ``W[out_keep][:, in_keep]`` the forward builds anyway, which autograd saves for the data
    gradient (see ``_autograd``) so that the backward does not gather it again.
    """
    n_out, n_in = weight.shape
    n_out_h, n_in_h = out_keep.shape[0], in_keep.shape[0]
    xs = _rows(x_soft, n_in)
    xh = _rows(x_hard, n_in_h)
    # the input masks folded into the weights once per call (one pass over W, rounded once):
    # the kernels' K loops then read plain operands
    w_soft = mask_columns(weight, soft_in_mask)
    hard_weight = gather_hard_weight(weight, in_keep, out_keep)
    w_hard = mask_columns(hard_weight, hard_in_mask)
    ys = torch.empty((xs.shape[0], n_out), dtype=x_soft.dtype, device=x_soft.device)
    yh = torch.empty((xh.shape[0], n_out_h), dtype=x_hard.dtype, device=x_hard.device)
    m_s, m_h = xs.shape[0], xh.shape[0]
    if m_s * n_out + m_h * n_out_h > 0:
        launcher(_dual_linear_fwd_kernel)[dual_grid(m_s, n_out, m_h, n_out_h)](
            xs, xh, w_soft, w_hard, bias if bias is not None else weight, out_keep, ys, yh,
            m_s, m_h, n_out, n_in, n_out_h, n_in_h,
            xs.stride(0), xs.stride(1), xh.stride(0), xh.stride(1),
            w_soft.stride(0), w_soft.stride(1), w_hard.stride(0), w_hard.stride(1),
            ys.stride(0), ys.stride(1), yh.stride(0), yh.stride(1),
            HAS_BIAS=bias is not None, UPCAST=upcast_dot(weight.dtype),
            PRECISION=dot_precision(weight.dtype, "matmul"),
            TUNE_KEY=tune_key(m_s, m_h, n_out, n_in, n_out_h, n_in_h),
        )  # fmt: skip
    return (
        ys.reshape(*x_soft.shape[:-1], n_out),
        yh.reshape(*x_hard.shape[:-1], n_out_h),
        hard_weight,
    )


def _dgrad_fake(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor,
    need_x_soft: bool, need_x_hard: bool, need_soft_mask: bool, need_hard_mask: bool,
    hard_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    soft, hard = grad_soft is not None, grad_hard is not None
    return (
        torch.empty_like(x_soft, memory_format=torch.contiguous_format)
        if soft and need_x_soft
        else x_soft.new_empty((0,)),
        torch.empty_like(x_hard, memory_format=torch.contiguous_format)
        if hard and need_x_hard
        else x_soft.new_empty((0,)),
        torch.empty_like(soft_in_mask) if soft and need_soft_mask else x_soft.new_empty((0,)),
        torch.empty_like(hard_in_mask) if hard and need_hard_mask else x_soft.new_empty((0,)),
    )


@register_op("s2h_kernels::dual_linear_dgrad", fake=_dgrad_fake)
def dual_linear_dgrad_op(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor,
    need_x_soft: bool, need_x_hard: bool, need_soft_mask: bool, need_hard_mask: bool,
    hard_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Activation and mask gradients of both paths in one launch.

    Returns ``(dx_soft, dx_hard, d_soft_mask, d_hard_mask)``; an output that was not asked
    for, or whose path has no incoming gradient (``None``), is an empty tensor.
    ``hard_weight``: the forward's gathered ``W[out_keep][:, in_keep]`` (gathered here when
    ``None``).
    """
    n_out, n_in = weight.shape
    n_out_h, n_in_h = out_keep.shape[0], in_keep.shape[0]
    do_soft = grad_soft is not None and (need_x_soft or need_soft_mask)
    do_hard = grad_hard is not None and (need_x_hard or need_hard_mask)
    xs = _rows(x_soft, n_in)
    xh = _rows(x_hard, n_in_h)
    m_s = xs.shape[0] if do_soft else 0
    m_h = xh.shape[0] if do_hard else 0
    dys = _rows(grad_soft, n_out) if do_soft else xs
    dyh = _rows(grad_hard, n_out_h) if do_hard else xh
    if not do_hard:
        w_hard = weight
    elif hard_weight is not None:
        w_hard = hard_weight
    else:
        w_hard = gather_hard_weight(weight, in_keep, out_keep)
    dxs = torch.empty((m_s, n_in), dtype=x_soft.dtype, device=x_soft.device)
    dxh = torch.empty((m_h, n_in_h), dtype=x_hard.dtype, device=x_hard.device)
    dms_part = torch.empty(
        (triton.cdiv(m_s, PARTIAL_ROWS), n_in), dtype=torch.float32, device=xs.device
    )
    dmh_part = torch.empty(
        (triton.cdiv(m_h, PARTIAL_ROWS), n_in_h), dtype=torch.float32, device=xs.device
    )
    if m_s * n_in + m_h * n_in_h > 0:
        launcher(_dual_linear_dgrad_kernel)[dual_grid(m_s, n_in, m_h, n_in_h)](
            dys, dyh, weight, w_hard, xs, xh, soft_in_mask.contiguous(), hard_in_mask.contiguous(),
            dxs, dxh, dms_part, dmh_part,
            m_s, m_h, n_out, n_in, n_out_h, n_in_h,
            dys.stride(0), dys.stride(1), dyh.stride(0), dyh.stride(1),
            weight.stride(0), weight.stride(1), w_hard.stride(0), w_hard.stride(1),
            xs.stride(0), xs.stride(1), xh.stride(0), xh.stride(1),
            NEED_DX_S=need_x_soft, NEED_DM_S=need_soft_mask,
            NEED_DX_H=need_x_hard, NEED_DM_H=need_hard_mask,
            UPCAST=upcast_dot(weight.dtype), PRECISION=dot_precision(weight.dtype, "matmul"),
            TUNE_KEY=tune_key(m_s, m_h, n_out, n_in, n_out_h, n_in_h),
        )  # fmt: skip
    return (
        dxs.reshape(x_soft.shape) if do_soft and need_x_soft else x_soft.new_empty((0,)),
        dxh.reshape(x_hard.shape) if do_hard and need_x_hard else x_soft.new_empty((0,)),
        dms_part.sum(0).to(soft_in_mask.dtype)
        if do_soft and need_soft_mask
        else x_soft.new_empty((0,)),
        dmh_part.sum(0).to(hard_in_mask.dtype)
        if do_hard and need_hard_mask
        else x_soft.new_empty((0,)),
    )


def _wgrad_fake(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return wgrad_fake(weight, need_bias)


@register_op("s2h_kernels::dual_linear_wgrad", fake=_wgrad_fake)
def dual_linear_wgrad_op(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Weight (and bias) gradient, the sum of both paths, in one launch plus small reductions.

    ``weight`` is only read for its shape and dtype. Returns ``(d_weight, d_bias)``;
    ``d_bias`` is empty when ``need_bias`` is false.
    """
    n_out, n_in = weight.shape
    n_out_h, n_in_h = out_keep.shape[0], in_keep.shape[0]
    do_soft, do_hard = grad_soft is not None, grad_hard is not None
    xs = _rows(x_soft, n_in)
    xh = _rows(x_hard, n_in_h)
    m_s = xs.shape[0] if do_soft else 0
    m_h = xh.shape[0] if do_hard else 0
    dys = _rows(grad_soft, n_out) if do_soft else xs
    dyh = _rows(grad_hard, n_out_h) if do_hard else xh
    tiles = (triton.cdiv(n_out, 128) * triton.cdiv(n_in, 128) if do_soft else 0) + (
        triton.cdiv(n_out_h, 128) * triton.cdiv(n_in_h, 128) if do_hard else 0
    )
    split = row_splits(
        xs.device, max(m_s, m_h), tiles, min_rows=SPLIT_MIN_ROWS, max_splits=MAX_SPLITS
    )
    soft = (n_out, n_in) if do_soft else None
    hard = (n_out_h, n_in_h) if do_hard else None
    dws_part, dwh_part, dbs_part, dbh_part = wgrad_partials(
        split, xs.device, soft, hard,
        (n_out,) if do_soft and need_bias else None, (n_out_h,) if do_hard and need_bias else None,
    )  # fmt: skip
    if do_soft or do_hard:
        grid = split_grid(split, 1, soft, hard, ("BLOCK_N", "BLOCK_K"))
        launcher(_dual_linear_wgrad_kernel)[grid](
            dys, dyh, xs, xh, soft_in_mask.contiguous(), hard_in_mask.contiguous(),
            dws_part, dwh_part, dbs_part, dbh_part,
            m_s, m_h, n_out, n_in, n_out_h, n_in_h, split, int(do_soft),
            dys.stride(0), dys.stride(1), dyh.stride(0), dyh.stride(1),
            xs.stride(0), xs.stride(1), xh.stride(0), xh.stride(1),
            HAS_BIAS=need_bias, UPCAST=upcast_dot(weight.dtype),
            PRECISION=dot_precision(weight.dtype, "matmul"),
            TUNE_KEY=tune_key(m_s, m_h, n_out, n_in, n_out_h, n_in_h, split),
        )  # fmt: skip
    dw = dws_part.sum(0) if do_soft else weight.new_zeros((n_out, n_in), dtype=torch.float32)
    if do_hard:
        # Scatter the compact hard gradient into the kept block; the kept indices are
        # unique, so the accumulate is a plain, deterministic gather-add-scatter.
        dw = dw.index_put((out_keep[:, None], in_keep[None, :]), dwh_part.sum(0), accumulate=True)
    if not need_bias:
        return dw.to(weight.dtype), weight.new_empty((0,))
    db = reduce_bias(dbs_part, dbh_part, out_keep, n_out, do_soft, do_hard)
    return dw.to(weight.dtype), db.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter): the matmul FLOPs each launch computes, 2*M*K*N per
# path (the soft path on full widths, the hard one on the kept widths), counted like aten.mm
# so that a fused step and a plain-PyTorch step are counted alike.
# --------------------------------------------------------------------------------------------


def _rows_of(shape) -> int:
    return math.prod(shape[:-1]) if shape is not None else 0


@register_flop_formula(torch.ops.s2h_kernels.dual_linear)
def _fwd_flops(x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
               weight_grad=True, *, out_shape=None, **kwargs) -> int:  # fmt: skip
    n_out, n_in = weight
    return 2 * _rows_of(x_soft) * n_in * n_out + 2 * _rows_of(x_hard) * in_keep[0] * out_keep[0]


@register_flop_formula(torch.ops.s2h_kernels.dual_linear_dgrad)
def _dgrad_flops(grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask,
                 in_keep, out_keep, need_x_soft, need_x_hard, need_soft_mask, need_hard_mask,
                 hard_weight=None, *, out_shape=None, **kwargs) -> int:  # fmt: skip
    n_out, n_in = weight
    soft = grad_soft is not None and (need_x_soft or need_soft_mask)
    hard = grad_hard is not None and (need_x_hard or need_hard_mask)
    return (2 * _rows_of(x_soft) * n_in * n_out if soft else 0) + (
        2 * _rows_of(x_hard) * in_keep[0] * out_keep[0] if hard else 0
    )


@register_flop_formula(torch.ops.s2h_kernels.dual_linear_wgrad)
def _wgrad_flops(grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask,
                 in_keep, out_keep, need_bias, *, out_shape=None, **kwargs) -> int:  # fmt: skip
    n_out, n_in = weight
    return (2 * _rows_of(x_soft) * n_in * n_out if grad_soft is not None else 0) + (
        2 * _rows_of(x_hard) * in_keep[0] * out_keep[0] if grad_hard is not None else 0
    )


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


register_dual_autograd(
    "s2h_kernels::dual_linear",
    torch.ops.s2h_kernels.dual_linear_dgrad,
    torch.ops.s2h_kernels.dual_linear_wgrad,
    geometry_args=0,
)


def dual_linear_triton(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    soft_in_mask: torch.Tensor, hard_in_mask: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, *, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused dual linear through the registered op (arguments checked by the caller)."""
    y_soft, y_hard, _ = torch.ops.s2h_kernels.dual_linear(
        x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep, weight_grad
    )
    return y_soft, y_hard
