"""Fused dual (soft + hard) masked conv2d: Triton kernels, the ops that launch them, autograd.

Math (``W`` is ``[O, C, KH, KW]``, ``i = in_keep``, ``o = out_keep``, NCHW logical layout)::

    y_soft = conv2d(x_soft * soft_in_mask[:, None, None], W, b)                  # [B, O, OH, OW]
    y_hard = conv2d(x_hard * hard_in_mask[:, None, None], W[o][:, i], b[o])      # [B, O_h, OH, OW]

Depthwise convolutions (``groups == C == O``, ``i == o``; ``y_hard`` uses ``W[o]`` with
``len(o)`` groups) run the direct kernels of :mod:`.dual_depthwise`, launched from the op
bodies here; the ops, their autograd (:mod:`._autograd`) and FLOP formulas cover both.

Dense convolutions (``groups == 1``) are implicit GEMMs, never materialising im2col:

* forward ``[B*OH*OW, O] = A @ W'`` with rows = output pixels, the reduction walked as
  (filter tap, channel block) so that every A row of a tap is one pixel's channel vector
  (contiguous for channels-last input); the input mask is folded into the tap-major weight
  copy once per call (as in ``dual_linear``), the bias is added in the epilogue.
* data gradient ``[B*H*W, C]`` with rows = input pixels, split into the ``stride_h *
  stride_w`` stride phases (``ih % stride_h``, ``iw % stride_w``): a tile holds the pixels of
  one phase and loops over the taps that reach that phase only (for dilation 1, taps ``r`` with
  ``r == ih + pad (mod stride)``), each mapping the tile's pixels back to the output pixels that
  read them without a division; so a stride-2 3x3 conv runs 9 (tap, phase) MMA loops where
  every tap on every pixel would run 36, 3/4 of them on masked-off rows (stride 1: one phase,
  every tap); epilogue: ``dx = g * mask`` and per-row-tile partials of ``g * x`` for the mask
  gradient.
* weight gradient ``[O, KH*KW*C]`` tiles, each inside one tap, reduced over output pixels in
  ``SPLIT`` row chunks into fp32 partial buffers (deterministic, autotune-safe); the input
  mask scales the finished tile (it is constant along the reduction), and the bias gradient
  rides along in the tiles of the first tap and channel block.

Every launch covers the soft problem's tiles first, then the hard problem's. As for the
linear op, the dense hard path reads a gathered, tap-major copy of ``W[o][:, i]`` (see
``dual_linear``'s module docstring for why); the soft path reads ``W`` through its strides,
made tap-major (``[O, KH, KW, C]`` contiguous) once per call unless it already is
(channels-last weights) so that channel blocks load as vectors.
"""

# torch.library infers op schemas from typing.Optional (the GPU host's torch 2.11 included);
# keep it rather than `X | None`.
# ruff: noqa: UP045
# The kernels name sizes as the math does (B, C, H, W, O: batch, channels, height, width,
# output channels), hence E741 off for this file.
# ruff: noqa: E741
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._autograd import register_dual_autograd
from ._common import (
    PARTIAL_ROWS,
    PARTIAL_ROWS_C,
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
from ._conv_common import (
    CONV_MAX_SPLITS,
    CONV_SPLIT_MIN_ROWS,
    conv_params,
    is_depthwise,
    new_like,
    out_size,
    strides4,
)
from ._tiles import (
    add_bias,
    block_offsets,
    dgrad_epilogue,
    grouped_tile,
    mma,
    phase_taps,
    pixel_coords,
    split_rows,
    tap_input,
    tile_offsets,
    wgrad_epilogue,
    wgrad_step,
)
from .dual_depthwise import depthwise_dgrad, depthwise_fwd, depthwise_wgrad

# --------------------------------------------------------------------------------------------
# Dense (groups == 1) implicit-GEMM kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _conv_fwd_tile(
    tile, x_ptr, w_ptr, b_ptr, bias_index_ptr, y_ptr,
    B, C, H, W, O, OH, OW,
    sxb, sxc, sxh, sxw, swo, swc, swr, sws, syb, syc, syh, syw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GATHER: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M`` output pixels x ``BLOCK_N`` output channels tile; ``w`` has the input
    mask folded in, so the loop is a plain implicit GEMM."""
    M = B * OH * OW
    _, offs_m, offs_n, m_ok, n_ok = grouped_tile(tile, M, O, BLOCK_M, BLOCK_N, GROUP_M)
    bb, oh, ow = pixel_coords(offs_m, OH, OW)
    x_img = x_ptr + bb.to(tl.int64) * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block) rather than nested loops: Triton pipelines the
    # innermost loop only, and with few channels per tap a nested channel loop is too short.
    c_blocks = tl.cdiv(C, BLOCK_K)
    for it in range(KH * KW * c_blocks):
        tap = it // c_blocks
        r = tap // KW
        s = tap % KW
        offs_c, c_ok = block_offsets((it % c_blocks) * BLOCK_K, C, BLOCK_K)
        ih, row_ok = tap_input(oh, conv_sh, pad_h, r, dil_h, H, m_ok)
        iw, row_ok = tap_input(ow, conv_sw, pad_w, s, dil_w, W, row_ok)
        a = tl.load(
            x_img[:, None] + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
            mask=row_ok[:, None] & c_ok[None, :], other=0.0,
        )  # fmt: skip
        wt = tl.load(
            w_ptr + r * swr + s * sws + offs_c[:, None] * swc + offs_n[None, :] * swo,
            mask=c_ok[:, None] & n_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = mma(acc, a, wt, UPCAST, PRECISION)
    acc = add_bias(acc, b_ptr, bias_index_ptr, offs_n, n_ok, HAS_BIAS, BIAS_GATHER)
    y_rows = bb.to(tl.int64) * syb + oh * syh + ow * syw
    y_ptrs = y_ptr + y_rows[:, None] + offs_n[None, :] * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Autotune keep-lists: which of _common's candidates each kernel tunes over (see the note there
# on how they are measured with bench/compile_kernels.py).
FWD_KEEP = (0, 3, 4, 5)  # of gemm_candidates(): 128x256 and 256x128 spill 112-240 B


@triton.autotune(configs=gemm_configs(FWD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_conv_fwd_kernel(
    xs_ptr, xh_ptr, w_ptr, wh_ptr, b_ptr, out_keep_ptr, ys_ptr, yh_ptr,
    B_s, B_h, C, H, W, O, C_h, O_h, OH, OW,
    s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
    s_w_o, s_w_c, s_w_r, s_w_s, s_wh_o, s_wh_c, s_wh_r, s_wh_s,
    s_ys_b, s_ys_c, s_ys_h, s_ys_w, s_yh_b, s_yh_c, s_yh_h, s_yh_w,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Grouped launch: programs ``[0, T_s)`` do soft tiles, the rest hard tiles."""
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        C = C // ALIGN * ALIGN
        O = O // ALIGN * ALIGN
        C_h = C_h // ALIGN * ALIGN
        O_h = O_h // ALIGN * ALIGN
        s_xs_b = s_xs_b // ALIGN * ALIGN
        s_xs_h = s_xs_h // ALIGN * ALIGN
        s_xs_w = s_xs_w // ALIGN * ALIGN
        s_xh_b = s_xh_b // ALIGN * ALIGN
        s_xh_h = s_xh_h // ALIGN * ALIGN
        s_xh_w = s_xh_w // ALIGN * ALIGN
        s_ys_b = s_ys_b // ALIGN * ALIGN
        s_ys_h = s_ys_h // ALIGN * ALIGN
        s_ys_w = s_ys_w // ALIGN * ALIGN
        s_yh_b = s_yh_b // ALIGN * ALIGN
        s_yh_h = s_yh_h // ALIGN * ALIGN
        s_yh_w = s_yh_w // ALIGN * ALIGN
        s_w_o = s_w_o // ALIGN * ALIGN
        s_w_r = s_w_r // ALIGN * ALIGN
        s_w_s = s_w_s // ALIGN * ALIGN
        s_wh_o = s_wh_o // ALIGN * ALIGN
        s_wh_r = s_wh_r // ALIGN * ALIGN
        s_wh_s = s_wh_s // ALIGN * ALIGN
    pid = tl.program_id(0)
    soft_tiles = tl.cdiv(B_s * OH * OW, BLOCK_M) * tl.cdiv(O, BLOCK_N)
    if pid < soft_tiles:
        _conv_fwd_tile(
            pid, xs_ptr, w_ptr, b_ptr, out_keep_ptr, ys_ptr, B_s, C, H, W, O, OH, OW,
            s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_w_o, s_w_c, s_w_r, s_w_s,
            s_ys_b, s_ys_c, s_ys_h, s_ys_w, conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, HAS_BIAS, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip
    else:
        _conv_fwd_tile(
            pid - soft_tiles, xh_ptr, wh_ptr, b_ptr, out_keep_ptr, yh_ptr,
            B_h, C_h, H, W, O_h, OH, OW,
            s_xh_b, s_xh_c, s_xh_h, s_xh_w, s_wh_o, s_wh_c, s_wh_r, s_wh_s,
            s_yh_b, s_yh_c, s_yh_h, s_yh_w, conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, HAS_BIAS, True, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


_dual_conv_fwd_kernel.align_args = (  # sizes and strides ALIGN asserts are multiples of it
    "C", "O", "C_h", "O_h", "s_xs_b", "s_xs_h", "s_xs_w", "s_xh_b", "s_xh_h", "s_xh_w",
    "s_ys_b", "s_ys_h", "s_ys_w", "s_yh_b", "s_yh_h", "s_yh_w", "s_w_o", "s_w_r", "s_w_s",
    "s_wh_o", "s_wh_r", "s_wh_s",
)
add_wide_variant(_dual_conv_fwd_kernel, "BLOCK_K")  # fp32 operands: half the reduction step


@triton.jit
def _conv_dgrad_tile(
    tile, dy_ptr, w_ptr, x_ptr, mask_ptr, dx_ptr, dmask_part_ptr,
    B, C, H, W, O, OH, OW,
    sdyb, sdyc, sdyh, sdyw, swo, swc, swr, sws, sxb, sxc, sxh, sxw, sdxb, sdxc, sdxh, sdxw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, gcd_h, gcd_w, inv_h, inv_w,
    KH: tl.constexpr, KW: tl.constexpr, NEED_DX: tl.constexpr, NEED_DMASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M`` input pixels x ``BLOCK_N`` input channels tile of ``g = dL/d(x*mask)``.

    The input pixels are split into ``conv_sh * conv_sw`` stride phases (``ih % conv_sh``,
    ``iw % conv_sw``); a tile holds pixels of one phase only, numbered over the largest phase's
    ``cdiv(H, conv_sh) x cdiv(W, conv_sw)`` grid (pixels past the input are masked), and loops
    over the taps that reach that phase only: for a 3x3 stride-2 conv 9 of the 36 (tap, pixel
    phase) pairs, where running every tap on every pixel masked off 3/4 of the MMAs' rows.
    ``dmask_part`` is contiguous ``[phases * cdiv(B * cdiv(H, sh) * cdiv(W, sw), PARTIAL_ROWS),
    C]`` fp32: each phase's row tiles write their own block of rows."""
    HP = tl.cdiv(H, conv_sh)
    WP = tl.cdiv(W, conv_sw)
    M = B * HP * WP  # rows of one phase
    per_phase = tl.cdiv(M, BLOCK_M) * tl.cdiv(C, BLOCK_N)
    phase = tile // per_phase
    ph = phase // conv_sw
    pw = phase % conv_sw
    pid_m, offs_m, offs_c, m_ok, c_ok = grouped_tile(
        tile % per_phase, M, C, BLOCK_M, BLOCK_N, GROUP_M
    )
    bb, th, tw = pixel_coords(offs_m, HP, WP)
    ih = ph + th * conv_sh
    iw = pw + tw * conv_sw
    m_ok = m_ok & (ih < H) & (iw < W)
    r0, step_h, n_r, base_h, jump_h = phase_taps(ph, conv_sh, pad_h, dil_h, gcd_h, inv_h, KH)
    s0, step_w, n_s, base_w, jump_w = phase_taps(pw, conv_sw, pad_w, dil_w, gcd_w, inv_w, KW)
    dy_img = dy_ptr + bb.to(tl.int64) * sdyb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Flat loop over (tap of this phase, output-channel block): see _conv_fwd_tile.
    o_blocks = tl.cdiv(O, BLOCK_K)
    n_s_div = tl.maximum(n_s, 1)  # n_s == 0: no iteration, but no division by zero either
    for it in range(n_r * n_s * o_blocks):
        tap = it // o_blocks
        jr = tap // n_s_div
        js = tap % n_s_div
        offs_o, o_ok = block_offsets((it % o_blocks) * BLOCK_K, O, BLOCK_K)
        # the output pixel that read input pixel (ih, iw) through tap (r, s)
        oh = base_h + th - jr * jump_h
        ow = base_w + tw - js * jump_w
        row_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        a = tl.load(
            dy_img[:, None] + (oh * sdyh + ow * sdyw)[:, None] + offs_o[None, :] * sdyc,
            mask=row_ok[:, None] & o_ok[None, :], other=0.0,
        )  # fmt: skip
        r = r0 + jr * step_h
        s = s0 + js * step_w
        wt = tl.load(
            w_ptr + r * swr + s * sws + offs_o[:, None] * swo + offs_c[None, :] * swc,
            mask=o_ok[:, None] & c_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = mma(acc, a, wt, UPCAST, PRECISION)
    dx_rows = bb.to(tl.int64) * sdxb + ih * sdxh + iw * sdxw
    x_rows = bb.to(tl.int64) * sxb + ih * sxh + iw * sxw
    part_rows = phase * tl.cdiv(M, PARTIAL_ROWS_C)
    dgrad_epilogue(
        acc, dx_ptr + dx_rows[:, None] + offs_c[None, :] * sdxc,
        x_ptr + x_rows[:, None] + offs_c[None, :] * sxc, mask_ptr,
        dmask_part_ptr + part_rows.to(tl.int64) * C,
        pid_m, M, m_ok, C, offs_c, c_ok, NEED_DX, NEED_DMASK, BLOCK_M, BLOCK_N,
    )  # fmt: skip


# of gemm_candidates(): the wide tiles spill, and 128x64 (4 warps) spills 204 B on sm_80 for a
# 3x3 stride-2 conv
DGRAD_KEEP = (0, 4, 5)


@triton.autotune(configs=gemm_configs(DGRAD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_conv_dgrad_kernel(
    dys_ptr, dyh_ptr, w_ptr, wh_ptr, xs_ptr, xh_ptr, ms_ptr, mh_ptr,
    dxs_ptr, dxh_ptr, dms_part_ptr, dmh_part_ptr,
    B_s, B_h, C, H, W, O, C_h, O_h, OH, OW,
    s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w,
    s_w_o, s_w_c, s_w_r, s_w_s, s_wh_o, s_wh_c, s_wh_r, s_wh_s,
    s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
    s_dxs_b, s_dxs_c, s_dxs_h, s_dxs_w, s_dxh_b, s_dxh_c, s_dxh_h, s_dxh_w,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, gcd_h, gcd_w, inv_h, inv_w,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    NEED_DX_S: tl.constexpr, NEED_DM_S: tl.constexpr,
    NEED_DX_H: tl.constexpr, NEED_DM_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Grouped data-gradient launch over the soft then the hard problem's tiles."""
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        C = C // ALIGN * ALIGN
        O = O // ALIGN * ALIGN
        C_h = C_h // ALIGN * ALIGN
        O_h = O_h // ALIGN * ALIGN
        s_dys_b = s_dys_b // ALIGN * ALIGN
        s_dys_h = s_dys_h // ALIGN * ALIGN
        s_dys_w = s_dys_w // ALIGN * ALIGN
        s_dyh_b = s_dyh_b // ALIGN * ALIGN
        s_dyh_h = s_dyh_h // ALIGN * ALIGN
        s_dyh_w = s_dyh_w // ALIGN * ALIGN
        s_xs_b = s_xs_b // ALIGN * ALIGN
        s_xs_h = s_xs_h // ALIGN * ALIGN
        s_xs_w = s_xs_w // ALIGN * ALIGN
        s_xh_b = s_xh_b // ALIGN * ALIGN
        s_xh_h = s_xh_h // ALIGN * ALIGN
        s_xh_w = s_xh_w // ALIGN * ALIGN
        s_dxs_b = s_dxs_b // ALIGN * ALIGN
        s_dxs_h = s_dxs_h // ALIGN * ALIGN
        s_dxs_w = s_dxs_w // ALIGN * ALIGN
        s_dxh_b = s_dxh_b // ALIGN * ALIGN
        s_dxh_h = s_dxh_h // ALIGN * ALIGN
        s_dxh_w = s_dxh_w // ALIGN * ALIGN
        s_w_o = s_w_o // ALIGN * ALIGN
        s_w_r = s_w_r // ALIGN * ALIGN
        s_w_s = s_w_s // ALIGN * ALIGN
        s_wh_o = s_wh_o // ALIGN * ALIGN
        s_wh_r = s_wh_r // ALIGN * ALIGN
        s_wh_s = s_wh_s // ALIGN * ALIGN
    pid = tl.program_id(0)
    phases = conv_sh * conv_sw
    soft_rows = B_s * tl.cdiv(H, conv_sh) * tl.cdiv(W, conv_sw)  # per phase
    soft_tiles = phases * tl.cdiv(soft_rows, BLOCK_M) * tl.cdiv(C, BLOCK_N)
    if pid < soft_tiles:
        _conv_dgrad_tile(
            pid, dys_ptr, w_ptr, xs_ptr, ms_ptr, dxs_ptr, dms_part_ptr, B_s, C, H, W, O, OH, OW,
            s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_w_o, s_w_c, s_w_r, s_w_s,
            s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_dxs_b, s_dxs_c, s_dxs_h, s_dxs_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, gcd_h, gcd_w, inv_h, inv_w,
            KH, KW, NEED_DX_S, NEED_DM_S,
            UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip
    else:
        _conv_dgrad_tile(
            pid - soft_tiles, dyh_ptr, wh_ptr, xh_ptr, mh_ptr, dxh_ptr, dmh_part_ptr,
            B_h, C_h, H, W, O_h, OH, OW,
            s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w, s_wh_o, s_wh_c, s_wh_r, s_wh_s,
            s_xh_b, s_xh_c, s_xh_h, s_xh_w, s_dxh_b, s_dxh_c, s_dxh_h, s_dxh_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, gcd_h, gcd_w, inv_h, inv_w,
            KH, KW, NEED_DX_H, NEED_DM_H,
            UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


_dual_conv_dgrad_kernel.align_args = (  # sizes and strides ALIGN asserts are multiples of it
    "C", "O", "C_h", "O_h", "s_dys_b", "s_dys_h", "s_dys_w", "s_dyh_b", "s_dyh_h", "s_dyh_w",
    "s_xs_b", "s_xs_h", "s_xs_w", "s_xh_b", "s_xh_h", "s_xh_w", "s_dxs_b", "s_dxs_h", "s_dxs_w",
    "s_dxh_b", "s_dxh_h", "s_dxh_w", "s_w_o", "s_w_r", "s_w_s", "s_wh_o", "s_wh_r", "s_wh_s",
)
add_wide_variant(_dual_conv_dgrad_kernel, "BLOCK_K")  # fp32 operands: half the reduction step


@triton.jit
def _conv_wgrad_tile(
    tile, dy_ptr, x_ptr, mask_ptr, dw_part_ptr, db_part_ptr,
    B, C, H, W, O, OH, OW, SPLIT,
    sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (row split, ``BLOCK_N`` out channels, tap, ``BLOCK_K`` in channels) tile of dW.
    ``dw_part`` is contiguous ``[SPLIT, O, KH*KW, C]`` fp32, ``db_part`` ``[SPLIT, O]``."""
    M = B * OH * OW
    taps: tl.constexpr = KH * KW
    num_o = tl.cdiv(O, BLOCK_N)
    num_c = tl.cdiv(C, BLOCK_K)
    split = tile // (num_o * taps * num_c)
    rest = tile % (num_o * taps * num_c)
    pid_o = rest // (taps * num_c)
    rest = rest % (taps * num_c)
    tap = rest // num_c
    pid_c = rest % num_c
    r = tap // KW
    s = tap % KW
    m_lo, m_hi = split_rows(split, M, SPLIT, BLOCK_M)
    offs_o, offs_c, o_ok, c_ok = tile_offsets(pid_o, pid_c, O, C, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m, m_ok = block_offsets(m0, m_hi, BLOCK_M)
        bb, oh, ow = pixel_coords(offs_m, OH, OW)
        bb = bb.to(tl.int64)
        ih, x_ok = tap_input(oh, conv_sh, pad_h, r, dil_h, H, m_ok)
        iw, x_ok = tap_input(ow, conv_sw, pad_w, s, dil_w, W, x_ok)
        dy_rows = bb * sdyb + oh * sdyh + ow * sdyw
        # dy loaded already transposed ([BLOCK_N, BLOCK_M]) so the dot needs no permute.
        a = tl.load(
            dy_ptr + dy_rows[None, :] + offs_o[:, None] * sdyc,
            mask=o_ok[:, None] & m_ok[None, :], other=0.0,
        )  # fmt: skip
        x_rows = bb * sxb + ih * sxh + iw * sxw
        xb = tl.load(
            x_ptr + x_rows[:, None] + offs_c[None, :] * sxc,
            mask=x_ok[:, None] & c_ok[None, :], other=0.0,
        )  # fmt: skip
        acc, bias_acc = wgrad_step(
            acc, bias_acc, a, xb, (tap == 0) & (pid_c == 0), HAS_BIAS, UPCAST, PRECISION
        )
    dw_ptrs = (
        dw_part_ptr + split.to(tl.int64) * O * taps * C
        + offs_o[:, None] * (taps * C) + tap * C + offs_c[None, :]
    )  # fmt: skip
    wgrad_epilogue(  # the bias gradient rides in the tiles of the first tap and channel block
        acc, bias_acc, dw_ptrs, db_part_ptr + split * O + offs_o, mask_ptr,
        offs_o, o_ok, offs_c, c_ok, (tap == 0) & (pid_c == 0), HAS_BIAS,
    )  # fmt: skip


WGRAD_KEEP = (3,)  # of wgrad_candidates(): every wider tile spills 144-564 B on sm_80


@triton.autotune(configs=wgrad_configs(WGRAD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_conv_wgrad_kernel(
    dys_ptr, dyh_ptr, xs_ptr, xh_ptr, ms_ptr, mh_ptr,
    dws_part_ptr, dwh_part_ptr, dbs_part_ptr, dbh_part_ptr,
    B_s, B_h, C, H, W, O, C_h, O_h, OH, OW, SPLIT, soft_on,
    s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w,
    s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grouped weight-gradient launch; ``soft_on`` is 0 when the soft problem is skipped."""
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        C = C // ALIGN * ALIGN
        O = O // ALIGN * ALIGN
        C_h = C_h // ALIGN * ALIGN
        O_h = O_h // ALIGN * ALIGN
        s_dys_b = s_dys_b // ALIGN * ALIGN
        s_dys_h = s_dys_h // ALIGN * ALIGN
        s_dys_w = s_dys_w // ALIGN * ALIGN
        s_dyh_b = s_dyh_b // ALIGN * ALIGN
        s_dyh_h = s_dyh_h // ALIGN * ALIGN
        s_dyh_w = s_dyh_w // ALIGN * ALIGN
        s_xs_b = s_xs_b // ALIGN * ALIGN
        s_xs_h = s_xs_h // ALIGN * ALIGN
        s_xs_w = s_xs_w // ALIGN * ALIGN
        s_xh_b = s_xh_b // ALIGN * ALIGN
        s_xh_h = s_xh_h // ALIGN * ALIGN
        s_xh_w = s_xh_w // ALIGN * ALIGN
    pid = tl.program_id(0)
    soft_tiles = SPLIT * tl.cdiv(O, BLOCK_N) * (KH * KW) * tl.cdiv(C, BLOCK_K) * soft_on
    if pid < soft_tiles:
        _conv_wgrad_tile(
            pid, dys_ptr, xs_ptr, ms_ptr, dws_part_ptr, dbs_part_ptr,
            B_s, C, H, W, O, OH, OW, SPLIT,
            s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_xs_b, s_xs_c, s_xs_h, s_xs_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        _conv_wgrad_tile(
            pid - soft_tiles, dyh_ptr, xh_ptr, mh_ptr, dwh_part_ptr, dbh_part_ptr,
            B_h, C_h, H, W, O_h, OH, OW, SPLIT,
            s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


_dual_conv_wgrad_kernel.align_args = (  # sizes and strides ALIGN asserts are multiples of it
    "C", "O", "C_h", "O_h", "s_dys_b", "s_dys_h", "s_dys_w", "s_dyh_b", "s_dyh_h", "s_dyh_w",
    "s_xs_b", "s_xs_h", "s_xs_w", "s_xh_b", "s_xh_h", "s_xh_w",
)
add_wide_variant(_dual_conv_wgrad_kernel, "BLOCK_M")  # fp32 operands: half the reduction step


# --------------------------------------------------------------------------------------------
# Launchers (the bodies of the registered ops)
# --------------------------------------------------------------------------------------------


def _tap_major(w: torch.Tensor) -> torch.Tensor:
    """``w`` ([O, C, KH, KW]) laid out so channels are contiguous within a tap (see module doc)."""
    return w.contiguous(memory_format=torch.channels_last)


def _gather_hard(w: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor) -> torch.Tensor:
    """The hard path's weight ``w[out_keep][:, in_keep]``, tap-major (built once per forward
    and saved for the data gradient)."""
    return _tap_major(w.index_select(0, out_keep).index_select(1, in_keep))


def _tap_strides(w: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a :func:`_tap_major` weight as its layout defines them, size-1 dims included.

    For a 1x1 conv, torch reports stride 1 for the size-1 KH / KW dims (a contiguous tensor
    already counts as channels-last there), and Triton then specialises those strides to the
    constant 1: the tap offset ``r * s_r + s * s_s`` loses its known alignment and every weight
    load of the K loop becomes scalar. The kernels only index those dims at 0, so the canonical
    strides are equally right and keep the offset a multiple of ``C``.
    """
    o, c, kh, kw = w.shape
    assert w.is_contiguous(memory_format=torch.channels_last)
    return kh * kw * c, 1, kw * c, c


def _phase_pixels(h: int, w: int, stride: list[int]) -> int:
    """Pixels per image of the largest stride phase, the grid every phase is tiled over."""
    return triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1])


def _phase_params(stride: list[int], dilation: list[int]) -> tuple[int, int, int, int]:
    """``(gcd_h, gcd_w, inv_h, inv_w)`` of the data gradient's phase decomposition (see
    ``_tiles.phase_taps``): ``gcd`` of dilation and stride, and the inverse of ``dil // gcd``
    modulo ``stride // gcd`` (0 when that modulus is 1)."""
    out = []
    for s, d in zip(stride, dilation, strict=True):
        g = math.gcd(s, d)
        out.append((g, pow(d // g, -1, s // g) if s // g > 1 else 0))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _fwd_fake(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    soft_in_mask: torch.Tensor, hard_in_mask: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    n_out, _, kh, kw = weight.shape
    oh = out_size(x_soft.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = out_size(x_soft.shape[3], kw, stride[1], padding[1], dilation[1])
    y_soft = new_like(x_soft, (x_soft.shape[0], n_out, oh, ow))
    y_hard = new_like(x_hard, (x_hard.shape[0], out_keep.shape[0], oh, ow))
    if is_depthwise(weight.shape, groups):  # the hard path reads W through out_keep
        return y_soft, y_hard, weight.new_empty((0,))
    # as _gather_hard makes it (a contiguous gather made tap-major: same strides)
    hard_weight = _tap_major(weight.new_empty((out_keep.shape[0], in_keep.shape[0], kh, kw)))
    return y_soft, y_hard, hard_weight


@register_op("s2h_kernels::dual_conv2d", fake=_fwd_fake)
def dual_conv2d_op(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    soft_in_mask: torch.Tensor, hard_in_mask: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward of the dual conv2d (one launch). Arguments as ``s2h.functional.dual_conv2d``
    (``stride``/``padding``/``dilation`` as 2-lists); ``weight_grad`` only matters to autograd.

    Returns ``(y_soft, y_hard, hard_weight)``: ``hard_weight`` is the gathered, tap-major,
    unmasked ``W[out_keep][:, in_keep]`` the forward builds anyway (empty for a depthwise
    conv, whose hard path reads ``W`` through ``out_keep``), which autograd saves for the data
    gradient so that the backward does not gather it again.
    """
    y_soft, y_hard, _ = _fwd_fake(
        x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
        stride, padding, dilation, groups,
    )  # fmt: skip
    b_s, c, h, w = x_soft.shape
    b_h, c_h = x_hard.shape[0], x_hard.shape[1]
    n_out, n_out_h = weight.shape[0], out_keep.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = y_soft.shape[2], y_soft.shape[3]
    geo = conv_params(stride, padding, dilation)
    ms, mh = soft_in_mask.contiguous(), hard_in_mask.contiguous()
    if is_depthwise(weight.shape, groups):
        if y_soft.numel() + y_hard.numel() > 0:
            depthwise_fwd(x_soft, x_hard, weight, bias, ms, mh, out_keep, y_soft, y_hard, geo)
        return y_soft, y_hard, weight.new_empty((0,))
    hard_weight = _gather_hard(weight, in_keep, out_keep)
    if y_soft.numel() + y_hard.numel() == 0:
        return y_soft, y_hard, hard_weight
    # the input masks folded into the tap-major weight copies the kernel reads anyway (rounded
    # once): the implicit-GEMM loop then reads plain operands
    w_soft = _tap_major(mask_columns(weight, ms))
    w_hard = _tap_major(mask_columns(hard_weight, mh))
    grid = dual_grid(b_s * oh * ow, n_out, b_h * oh * ow, n_out_h)
    launcher(_dual_conv_fwd_kernel)[grid](
        x_soft, x_hard, w_soft, w_hard, bias if bias is not None else weight, out_keep,
        y_soft, y_hard,
        b_s, b_h, c, h, w, n_out, c_h, n_out_h, oh, ow,
        *strides4(x_soft), *strides4(x_hard), *_tap_strides(w_soft), *_tap_strides(w_hard),
        *strides4(y_soft), *strides4(y_hard), *geo,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, UPCAST=upcast_dot(weight.dtype),
        PRECISION=dot_precision(weight.dtype, "conv"),
        TUNE_KEY=tune_key(b_s * oh * ow, b_h * oh * ow, c, n_out, c_h, n_out_h, kh * kw),
    )  # fmt: skip
    return y_soft, y_hard, hard_weight


def _dgrad_fake(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    need_x_soft: bool, need_x_hard: bool, need_soft_mask: bool, need_hard_mask: bool,
    hard_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    soft, hard = grad_soft is not None, grad_hard is not None
    return (
        new_like(x_soft, tuple(x_soft.shape)) if soft and need_x_soft else x_soft.new_empty((0,)),
        new_like(x_hard, tuple(x_hard.shape)) if hard and need_x_hard else x_soft.new_empty((0,)),
        torch.empty_like(soft_in_mask) if soft and need_soft_mask else x_soft.new_empty((0,)),
        torch.empty_like(hard_in_mask) if hard and need_hard_mask else x_soft.new_empty((0,)),
    )


@register_op("s2h_kernels::dual_conv2d_dgrad", fake=_dgrad_fake)
def dual_conv2d_dgrad_op(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    need_x_soft: bool, need_x_hard: bool, need_soft_mask: bool, need_hard_mask: bool,
    hard_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Activation and mask gradients of both paths in one launch.

    Returns ``(dx_soft, dx_hard, d_soft_mask, d_hard_mask)``; an output that was not asked
    for, or whose path has no incoming gradient (``None``), is an empty tensor.
    ``hard_weight``: the forward's gathered tap-major ``W[out_keep][:, in_keep]`` (gathered
    here when ``None`` or empty).
    """
    do_soft = grad_soft is not None and (need_x_soft or need_soft_mask)
    do_hard = grad_hard is not None and (need_x_hard or need_hard_mask)
    b_s = x_soft.shape[0] if do_soft else 0
    b_h = x_hard.shape[0] if do_hard else 0
    _, c, h, w = x_soft.shape
    c_h = x_hard.shape[1]
    n_out, n_out_h = weight.shape[0], out_keep.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    geo = conv_params(stride, padding, dilation)
    dys = grad_soft if do_soft else x_soft
    dyh = grad_hard if do_hard else x_hard
    dxs = new_like(x_soft, tuple(x_soft.shape)) if do_soft else x_soft.new_empty((0, 1, 1, 1))
    dxh = new_like(x_hard, tuple(x_hard.shape)) if do_hard else x_hard.new_empty((0, 1, 1, 1))
    f32 = {"dtype": torch.float32, "device": x_soft.device}
    depthwise = is_depthwise(weight.shape, groups)
    # the dense kernel tiles each stride phase's pixels separately (see _conv_dgrad_tile): its
    # mask-gradient partials have a block of rows per phase
    phases = 1 if depthwise else stride[0] * stride[1]
    rows_s, rows_h = (b_s * h * w, b_h * h * w) if depthwise else (
        b_s * _phase_pixels(h, w, stride), b_h * _phase_pixels(h, w, stride)
    )  # fmt: skip
    dms_part = torch.empty((phases * triton.cdiv(rows_s, PARTIAL_ROWS), c), **f32)
    dmh_part = torch.empty((phases * triton.cdiv(rows_h, PARTIAL_ROWS), c_h), **f32)
    ms, mh = soft_in_mask.contiguous(), hard_in_mask.contiguous()
    if do_soft or do_hard:
        if depthwise:
            depthwise_dgrad(
                dys, dyh, weight, out_keep, x_soft, x_hard, ms, mh, dxs, dxh, dms_part, dmh_part,
                b_s, b_h, oh, ow, geo, need_x_soft, need_x_hard, need_soft_mask, need_hard_mask,
            )  # fmt: skip
        else:
            w_soft = _tap_major(weight)
            if not do_hard:
                w_hard = w_soft
            elif hard_weight is not None and hard_weight.numel() > 0:
                w_hard = _tap_major(hard_weight)  # the forward's (already tap-major)
            else:
                w_hard = _gather_hard(weight, in_keep, out_keep)
            grid = dual_grid(rows_s, c, rows_h, c_h, phases=phases)
            launcher(_dual_conv_dgrad_kernel)[grid](
                dys, dyh, w_soft, w_hard, x_soft, x_hard, ms, mh, dxs, dxh, dms_part, dmh_part,
                b_s, b_h, c, h, w, n_out, c_h, n_out_h, oh, ow,
                *strides4(dys), *strides4(dyh), *_tap_strides(w_soft), *_tap_strides(w_hard),
                *strides4(x_soft), *strides4(x_hard), *strides4(dxs), *strides4(dxh), *geo,
                *_phase_params(stride, dilation),
                KH=kh, KW=kw, NEED_DX_S=need_x_soft, NEED_DM_S=need_soft_mask,
                NEED_DX_H=need_x_hard, NEED_DM_H=need_hard_mask,
                UPCAST=upcast_dot(weight.dtype), PRECISION=dot_precision(weight.dtype, "conv"),
                TUNE_KEY=tune_key(b_s * h * w, b_h * h * w, c, n_out, c_h, n_out_h, kh * kw),
            )  # fmt: skip
    return (
        dxs if do_soft and need_x_soft else x_soft.new_empty((0,)),
        dxh if do_hard and need_x_hard else x_soft.new_empty((0,)),
        dms_part.sum(0).to(soft_in_mask.dtype)
        if do_soft and need_soft_mask
        else x_soft.new_empty((0,)),
        dmh_part.sum(0).to(hard_in_mask.dtype)
        if do_hard and need_hard_mask
        else x_soft.new_empty((0,)),
    )


def _dense_wgrad(
    dys: torch.Tensor, dyh: torch.Tensor, x_soft: torch.Tensor, x_hard: torch.Tensor,
    ms: torch.Tensor, mh: torch.Tensor, weight: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, do_soft: bool, do_hard: bool, b_s: int, b_h: int, oh: int, ow: int,
    geo: tuple[int, int, int, int, int, int], need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The dense (groups == 1) weight gradient, fp32 ``[O, C, KH, KW]`` with both paths summed,
    and the per-split fp32 bias-gradient partials of the soft and hard paths (the depthwise
    counterpart is ``dual_depthwise.depthwise_wgrad``)."""
    _, c, h, w = x_soft.shape
    c_h = x_hard.shape[1]
    n_out, n_out_h = weight.shape[0], out_keep.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    taps = kh * kw
    f32 = {"dtype": torch.float32, "device": x_soft.device}
    tiles = taps * (
        (triton.cdiv(n_out, 128) * triton.cdiv(c, 128) if do_soft else 0)
        + (triton.cdiv(n_out_h, 128) * triton.cdiv(c_h, 128) if do_hard else 0)
    )
    split = row_splits(
        x_soft.device, max(b_s, b_h) * oh * ow, tiles,
        min_rows=CONV_SPLIT_MIN_ROWS, max_splits=CONV_MAX_SPLITS,
    )  # fmt: skip
    dws_part, dwh_part, dbs_part, dbh_part = wgrad_partials(
        split, x_soft.device,
        (n_out, taps, c) if do_soft else None, (n_out_h, taps, c_h) if do_hard else None,
        (n_out,) if do_soft and need_bias else None, (n_out_h,) if do_hard and need_bias else None,
    )  # fmt: skip
    if do_soft or do_hard:
        soft = (n_out, c) if do_soft else None
        hard = (n_out_h, c_h) if do_hard else None
        grid = split_grid(split, taps, soft, hard, ("BLOCK_N", "BLOCK_K"))
        launcher(_dual_conv_wgrad_kernel)[grid](
            dys, dyh, x_soft, x_hard, ms, mh, dws_part, dwh_part, dbs_part, dbh_part,
            b_s, b_h, c, h, w, n_out, c_h, n_out_h, oh, ow, split, int(do_soft),
            *strides4(dys), *strides4(dyh), *strides4(x_soft), *strides4(x_hard), *geo,
            KH=kh, KW=kw, HAS_BIAS=need_bias, UPCAST=upcast_dot(weight.dtype),
            PRECISION=dot_precision(weight.dtype, "conv"),
            TUNE_KEY=tune_key(
                b_s * oh * ow, b_h * oh * ow, c, n_out, c_h, n_out_h, kh * kw, split
            ),
        )  # fmt: skip
    # [split, O, taps, C] -> [O, C, KH, KW]
    if do_soft:
        dw = dws_part.sum(0).reshape(n_out, kh, kw, c).permute(0, 3, 1, 2)
    else:
        dw = torch.zeros(weight.shape, **f32)
    if do_hard:
        hard = dwh_part.sum(0).reshape(n_out_h, kh, kw, c_h).permute(0, 3, 1, 2)
        # Unique kept indices: a deterministic gather-add-scatter into the kept block.
        dw = dw.index_put((out_keep[:, None], in_keep[None, :]), hard, accumulate=True)
    return dw, dbs_part, dbh_part


def _wgrad_fake(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return wgrad_fake(weight, need_bias)


@register_op("s2h_kernels::dual_conv2d_wgrad", fake=_wgrad_fake)
def dual_conv2d_wgrad_op(
    grad_soft: Optional[torch.Tensor], grad_hard: Optional[torch.Tensor], x_soft: torch.Tensor,
    x_hard: torch.Tensor, weight: torch.Tensor, soft_in_mask: torch.Tensor,
    hard_in_mask: torch.Tensor, in_keep: torch.Tensor, out_keep: torch.Tensor,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Weight (and bias) gradient, the sum of both paths, in one launch plus small reductions.

    ``weight`` is only read for its shape and dtype. Returns ``(d_weight, d_bias)``
    (``d_weight`` contiguous NCHW-style ``[O, C/groups, KH, KW]``; ``d_bias`` empty unless
    ``need_bias``).
    """
    do_soft, do_hard = grad_soft is not None, grad_hard is not None
    b_s, _, h, w = x_soft.shape
    b_s, b_h = (b_s if do_soft else 0), (x_hard.shape[0] if do_hard else 0)
    n_out = weight.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    geo = conv_params(stride, padding, dilation)
    dys = grad_soft if do_soft else x_soft
    dyh = grad_hard if do_hard else x_hard
    ms, mh = soft_in_mask.contiguous(), hard_in_mask.contiguous()
    if is_depthwise(weight.shape, groups):
        dw, dbs_part, dbh_part = depthwise_wgrad(
            dys, dyh, x_soft, x_hard, ms, mh, weight, out_keep,
            do_soft, do_hard, b_s, b_h, oh, ow, geo, need_bias,
        )  # fmt: skip
    else:
        dw, dbs_part, dbh_part = _dense_wgrad(
            dys, dyh, x_soft, x_hard, ms, mh, weight, in_keep, out_keep,
            do_soft, do_hard, b_s, b_h, oh, ow, geo, need_bias,
        )  # fmt: skip
    dw = dw.to(weight.dtype).contiguous()
    if not need_bias:
        return dw, weight.new_empty((0,))
    return dw, reduce_bias(dbs_part, dbh_part, out_keep, n_out, do_soft, do_hard).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter), counted like aten.convolution: 2 * output elements
# * (input channels per group * KH * KW) per path; the data and weight gradients as many as
# the forward of the path they run for.
# --------------------------------------------------------------------------------------------


def _path_flops(x, weight, n_out, n_in, depthwise, stride, padding, dilation) -> int:
    """FLOPs of one path's convolution: ``x`` the input shape, ``n_out`` / ``n_in`` its widths."""
    kh, kw = weight[2], weight[3]
    oh = out_size(x[2], kh, stride[0], padding[0], dilation[0])
    ow = out_size(x[3], kw, stride[1], padding[1], dilation[1])
    per_out = (1 if depthwise else n_in) * kh * kw
    return 2 * x[0] * n_out * oh * ow * per_out


def _conv_flops(x_soft, x_hard, weight, in_keep, out_keep, stride, padding, dilation, groups,
                soft: bool, hard: bool) -> int:  # fmt: skip
    depthwise = is_depthwise(weight, groups)
    if groups > 1 and not depthwise:
        raise NotImplementedError("dual_conv2d supports groups=1 and depthwise convs only")
    geo = (stride, padding, dilation)
    return (_path_flops(x_soft, weight, weight[0], x_soft[1], depthwise, *geo) if soft else 0) + (
        _path_flops(x_hard, weight, out_keep[0], in_keep[0], depthwise, *geo) if hard else 0
    )


@register_flop_formula(torch.ops.s2h_kernels.dual_conv2d)
def _fwd_flops(x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
               stride, padding, dilation, groups, weight_grad=True, *, out_shape=None,
               **kwargs) -> int:  # fmt: skip
    return _conv_flops(x_soft, x_hard, weight, in_keep, out_keep, stride, padding, dilation,
                       groups, True, True)


@register_flop_formula(torch.ops.s2h_kernels.dual_conv2d_dgrad)
def _dgrad_flops(grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask,
                 in_keep, out_keep, stride, padding, dilation, groups, need_x_soft, need_x_hard,
                 need_soft_mask, need_hard_mask, hard_weight=None, *, out_shape=None,
                 **kwargs) -> int:  # fmt: skip
    soft = grad_soft is not None and (need_x_soft or need_soft_mask)
    hard = grad_hard is not None and (need_x_hard or need_hard_mask)
    return _conv_flops(x_soft, x_hard, weight, in_keep, out_keep, stride, padding, dilation,
                       groups, soft, hard)


@register_flop_formula(torch.ops.s2h_kernels.dual_conv2d_wgrad)
def _wgrad_flops(grad_soft, grad_hard, x_soft, x_hard, weight, soft_in_mask, hard_in_mask,
                 in_keep, out_keep, stride, padding, dilation, groups, need_bias,
                 *, out_shape=None, **kwargs) -> int:  # fmt: skip
    return _conv_flops(x_soft, x_hard, weight, in_keep, out_keep, stride, padding, dilation,
                       groups, grad_soft is not None, grad_hard is not None)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


register_dual_autograd(
    "s2h_kernels::dual_conv2d",
    torch.ops.s2h_kernels.dual_conv2d_dgrad,
    torch.ops.s2h_kernels.dual_conv2d_wgrad,
    geometry_args=4,  # stride, padding, dilation, groups
)


def dual_conv2d_triton(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    soft_in_mask: torch.Tensor, hard_in_mask: torch.Tensor, in_keep: torch.Tensor,
    out_keep: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], groups: int, *, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused dual conv2d through the registered op (arguments checked by the caller;
    ``groups`` is 1 or depthwise)."""
    y_soft, y_hard, _ = torch.ops.s2h_kernels.dual_conv2d(
        x_soft, x_hard, weight, bias, soft_in_mask, hard_in_mask, in_keep, out_keep,
        list(stride), list(padding), list(dilation), groups, weight_grad,
    )  # fmt: skip
    return y_soft, y_hard
