"""``@triton.jit`` helpers shared by the dual kernels (Triton inlines them into each kernel).

Each piece of tile logic the linear, dense-conv and depthwise kernels have in common lives
here once: tile coordinates and index blocks, the dot step of a K loop, the bias epilogue of
a forward, the row range of a split-K weight-gradient tile with its bias and epilogue, the
data-gradient epilogue (``dx`` and mask-gradient partials), and the convolution index maps
(flat pixel index to coordinates, a filter tap forwards and backwards).

Only imported when triton is importable (see ``kernels/__init__.py``).
"""

import triton
import triton.language as tl

from ._common import PARTIAL_ROWS_C

# --------------------------------------------------------------------------------------------
# Tiles and index blocks
# --------------------------------------------------------------------------------------------


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """``x`` rounded down to a multiple of ``ALIGN``: value-preserving for the sizes and strides
    ``_common.with_align_hint`` checked, and a multiple Triton's axis analysis can see."""
    return x // ALIGN * ALIGN


@triton.jit
def block_offsets(start, size, BLOCK: tl.constexpr):
    """Indices ``start + [0, BLOCK)`` and whether each is below ``size``."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < size


@triton.jit
def grouped_tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile id to (pid_m, pid_n), ``GROUP_M`` row tiles at a time (L2 reuse of B)."""
    num_in_group = GROUP_M * num_pid_n
    group_id = tile // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % num_in_group) % group_size
    pid_n = (tile % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def tile_offsets(
    pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """Indices and bounds masks of tile ``(pid_m, pid_n)`` of an ``M x N`` output:
    ``(offs_m, offs_n, m_ok, n_ok)``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def grouped_tile(
    tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr
):  # fmt: skip
    """The ``BLOCK_M x BLOCK_N`` tile ``tile`` of an ``M x N`` output in grouped order:
    ``(pid_m, offs_m, offs_n, m_ok, n_ok)``."""
    pid_m, pid_n = grouped_tile_coords(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    return pid_m, offs_m, offs_n, m_ok, n_ok


@triton.jit
def split_rows(split, M, SPLIT, BLOCK_M: tl.constexpr):
    """Rows ``[m_lo, m_hi)`` of row split ``split`` of ``M`` rows in ``SPLIT`` splits (each a
    whole number of ``BLOCK_M`` blocks; the last ones may be short or empty)."""
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    m_lo = split * rows_per_split
    return m_lo, tl.minimum(M, m_lo + rows_per_split)


# --------------------------------------------------------------------------------------------
# GEMM steps and epilogues
# --------------------------------------------------------------------------------------------


@triton.jit
def mma(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32 (operands cast to fp32 first when ``UPCAST``, see
    ``_common.upcast_dot``)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)


@triton.jit
def add_bias(acc, b_ptr, index_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr):
    """``acc`` plus the bias of its columns ``offs_n`` (read through ``index_ptr`` when
    ``GATHER``: the hard path's kept output channels)."""
    if HAS_BIAS:
        if GATHER:
            bias_rows = tl.load(index_ptr + offs_n, mask=n_ok, other=0)
            bias = tl.load(b_ptr + bias_rows, mask=n_ok, other=0.0)
        else:
            bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc


@triton.jit
def store_partial_column_sums(
    part_ptr, values, pid_m, M, n_cols, offs_col, col_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Store the column sums of ``values`` (``[BLOCK_M, BLOCK_N]`` fp32, row tile ``pid_m``)
    per group of ``ROWS`` rows into ``part`` (contiguous ``[cdiv(M, ROWS), n_cols]`` fp32).

    Rows of ``values`` past ``M`` must be zero. Summing them later over the first axis gives
    the full column sums, deterministically and independently of ``BLOCK_M``.
    """
    GROUPS: tl.constexpr = BLOCK_M // ROWS
    sums = tl.sum(tl.reshape(values, (GROUPS, ROWS, BLOCK_N)), axis=1)
    rows = pid_m * GROUPS + tl.arange(0, GROUPS)
    ok = (rows < tl.cdiv(M, ROWS))[:, None] & col_ok[None, :]
    tl.store(part_ptr + rows[:, None] * n_cols + offs_col[None, :], sums, mask=ok)


@triton.jit
def dgrad_epilogue(
    acc, dx_ptrs, x_ptrs, mask_ptr, dmask_part_ptr, pid_m, M, m_ok, C, offs_c, c_ok,
    NEED_DX: tl.constexpr, NEED_DMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Epilogue of a data-gradient tile ``acc`` = ``g`` (the gradient w.r.t. the masked
    input, rows ``m_ok`` x channels ``offs_c``): store ``dx = g * mask`` at ``dx_ptrs`` and
    the mask-gradient partials of ``g * x`` (``x`` at ``x_ptrs``) into ``dmask_part``
    (contiguous ``[*, C]`` fp32, one row per ``PARTIAL_ROWS`` rows)."""
    ok = m_ok[:, None] & c_ok[None, :]
    if NEED_DX:
        gate = tl.load(mask_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(dx_ptrs, (acc * gate[None, :]).to(dx_ptrs.dtype.element_ty), mask=ok)
    if NEED_DMASK:
        x = tl.load(x_ptrs, mask=ok, other=0.0)
        store_partial_column_sums(
            dmask_part_ptr, acc * x.to(tl.float32), pid_m, M, C, offs_c, c_ok,
            BLOCK_M, BLOCK_N, PARTIAL_ROWS_C,
        )  # fmt: skip


@triton.jit
def wgrad_step(
    acc, bias_acc, a, x, first, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One row block of a weight-gradient tile: ``acc += a @ x`` with ``a`` the transposed
    ``dy`` block (``[BLOCK_N, BLOCK_M]``), and the bias gradient (row sums of ``a``) in the
    tiles that carry it (``first``)."""
    if HAS_BIAS:  # noqa: SIM102 (a constexpr gate, then a runtime test)
        if first:
            bias_acc += tl.sum(a.to(tl.float32), axis=1)
    return mma(acc, a, x, UPCAST, PRECISION), bias_acc


@triton.jit
def wgrad_epilogue(
    acc, bias_acc, dw_ptrs, db_ptrs, mask_ptr, offs_n, n_ok, offs_k, k_ok, first,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Store a weight-gradient tile (``[BLOCK_N, BLOCK_K]`` fp32) scaled by the input mask of
    its columns, and its bias gradient where it carries one (``first``)."""
    # The mask is constant along the reduction: dy.T @ (x * m) == (dy.T @ x) * m, so it is
    # applied once here, keeping the loop a plain GEMM (and x * m unrounded).
    gate = tl.load(mask_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    acc = acc * gate[None, :]
    tl.store(dw_ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:  # noqa: SIM102 (a constexpr gate, then a runtime test)
        if first:
            tl.store(db_ptrs, bias_acc, mask=n_ok)


# --------------------------------------------------------------------------------------------
# Convolution index maps
# --------------------------------------------------------------------------------------------


@triton.jit
def pixel_coords(offs_m, H, W):
    """``(batch, row, column)`` of flat pixel indices over ``[B, H, W]``."""
    col = offs_m % W
    row = (offs_m // W) % H
    return offs_m // (W * H), row, col


@triton.jit
def tap_input(o, stride, pad, k, dil, size, ok):
    """The input coordinate output coordinate ``o`` reads through filter index ``k``, and
    ``ok`` narrowed to where it lies inside the input (``size``)."""
    i = o * stride - pad + k * dil
    return i, ok & (i >= 0) & (i < size)


@triton.jit
def tap_output(i, stride, pad, k, dil, size, ok):
    """The output coordinate that read input coordinate ``i`` through filter index ``k``, and
    ``ok`` narrowed to where there is one (inside the output, ``size``, on the stride grid)."""
    num = i + pad - k * dil
    # clamp before dividing so that no negative operand reaches // (C and numpy round those
    # differently, and the interpreter is numpy)
    num_c = tl.where(num >= 0, num, 0)
    o = num_c // stride
    return o, ok & (num >= 0) & (o * stride == num_c) & (o < size)


@triton.jit
def phase_taps(p, stride, pad, dil, gcd, inv, K):
    """The filter taps of one dimension that reach the input coordinates ``i = p + stride * t``
    (one stride phase ``p``), for a data gradient that loops over those taps only.

    Input ``i`` receives from tap ``k`` the output ``o`` with ``o * stride == i + pad - k * dil``,
    so ``k * dil == p + pad (mod stride)``: with ``g = gcd`` (of ``dil`` and ``stride``, from the
    host) there is no such tap unless ``g`` divides ``p + pad``, and otherwise the taps are
    ``k0 + j * (stride // g)``, ``k0 = ((p + pad) // g) * inv % (stride // g)``, ``inv`` the
    inverse of ``dil // g`` modulo ``stride // g`` (host). Returns ``(k0, step, n, base, jump)``:
    the ``n`` taps are ``k0 + j * step`` and input ``p + stride * t`` reads through tap ``j`` the
    output ``base + t - j * jump`` (if inside the output): no division in the tap loop.
    """
    q = p + pad
    step = stride // gcd
    k0 = ((q // gcd) * inv) % step
    n = tl.where(q % gcd == 0, tl.maximum(K - k0 + step - 1, 0) // step, 0)
    # q - k0 * dil is a multiple of stride by construction (and may be negative: exact
    # division, so C's truncation and numpy's floor agree)
    base = (q - k0 * dil) // stride
    return k0, step, n, base, dil // gcd

