"""Fused dual (soft + hard) masked depthwise conv2d: Triton kernels and their launches.

Math (``W`` is ``[C, 1, KH, KW]``, ``groups == C == O``, ``k = in_keep == out_keep``)::

    y_soft = conv2d(x_soft * soft_in_mask[:, None, None], W, b, groups=C)
    y_hard = conv2d(x_hard * hard_in_mask[:, None, None], W[k], b[k], groups=len(k))

Depthwise convolutions are not GEMMs (one channel in, one out): direct kernels over
``pixels x channels`` tiles, the hard path reading ``W`` and ``b`` through ``out_keep`` (no
gathered copy). Every launch covers the soft problem's tiles first, then the hard problem's.
The registered ops ``torch.ops.s2h_kernels.dual_conv2d*`` (in :mod:`.dual_conv2d`, with their
autograd and FLOP formulas) call the launches here when the convolution is depthwise.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    dual_grid,
    launcher,
    pick_configs,
    row_splits,
    split_grid,
    tune_key,
    wgrad_partials,
)
from ._conv_common import CONV_MAX_SPLITS, CONV_SPLIT_MIN_ROWS, strides4
from ._tiles import (
    block_offsets,
    dgrad_epilogue,
    pixel_coords,
    split_rows,
    tap_input,
    tap_output,
    tile_offsets,
)

# --------------------------------------------------------------------------------------------
# Autotune configs: ``BLOCK_M`` pixels x ``BLOCK_C`` channels. Each kernel's keep-list (beside
# it) names the candidates it tunes over; see the note in _common.py on how they are measured.
# --------------------------------------------------------------------------------------------


def depthwise_candidates() -> list[triton.Config]:
    """Candidate configs of the depthwise (direct, non-GEMM) kernels."""
    cfg = triton.Config
    return [  # BLOCK_M: multiples of PARTIAL_ROWS
        cfg({"BLOCK_M": 64, "BLOCK_C": 64}, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_C": 32}, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_C": 128}, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_C": 64}, num_warps=8),
    ]


def depthwise_configs(keep: tuple[int, ...]) -> list[triton.Config]:
    """Autotune configs of a depthwise kernel that keeps ``keep`` of the candidates."""
    return pick_configs(depthwise_candidates(), keep, {"BLOCK_M": 64, "BLOCK_C": 32})


# --------------------------------------------------------------------------------------------
# Depthwise (groups == C == O) direct kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dw_tile(
    tile, M, C, chan_ptr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    """Tile ``tile`` (row-major) of ``M`` pixels x ``C`` channels: ``(pid_m, offs_m, offs_c,
    m_ok, c_ok, w_row)``, ``w_row`` the rows of ``w``/``b`` of those channels (read through
    ``chan`` when ``GATHER``: the hard path)."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid_m = tile // num_c
    offs_m, offs_c, m_ok, c_ok = tile_offsets(pid_m, tile % num_c, M, C, BLOCK_M, BLOCK_C)
    if GATHER:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        w_row = tl.load(chan_ptr + offs_c, mask=c_ok, other=0)
    else:
        w_row = offs_c
    return pid_m, offs_m, offs_c, m_ok, c_ok, w_row


@triton.jit
def _dw_fwd_tile(
    tile, x_ptr, mask_ptr, w_ptr, chan_ptr, b_ptr, y_ptr,
    B, C, H, W, OH, OW,
    sxb, sxc, sxh, sxw, swc, swr, sws, syb, syc, syh, syw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``BLOCK_M`` output pixels x ``BLOCK_C`` channels; ``chan`` maps channels to rows of
    ``w``/``b`` when ``GATHER`` (the hard path)."""
    _, offs_m, offs_c, m_ok, c_ok, w_row = _dw_tile(
        tile, B * OH * OW, C, chan_ptr, GATHER, BLOCK_M, BLOCK_C
    )
    bb, oh, ow = pixel_coords(offs_m, OH, OW)
    bb = bb.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r in range(KH):
        ih, h_ok = tap_input(oh, conv_sh, pad_h, r, dil_h, H, m_ok)
        for s in range(KW):
            iw, row_ok = tap_input(ow, conv_sw, pad_w, s, dil_w, W, h_ok)
            x_rows = bb * sxb + ih * sxh + iw * sxw
            xv = tl.load(
                x_ptr + x_rows[:, None] + offs_c[None, :] * sxc,
                mask=row_ok[:, None] & c_ok[None, :], other=0.0,
            )  # fmt: skip
            wv = tl.load(w_ptr + w_row * swc + r * swr + s * sws, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    # The mask is per channel and each output channel reads one input channel: scaling the
    # sum once is the same as scaling every input (in exact arithmetic; here, more exact).
    gate = tl.load(mask_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    acc = acc * gate[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_row, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_rows = bb * syb + oh * syh + ow * syw
    tl.store(
        y_ptr + y_rows[:, None] + offs_c[None, :] * syc,
        acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :],
    )  # fmt: skip


FWD_KEEP = (0, 1, 2, 3)  # every candidate


@triton.autotune(configs=depthwise_configs(FWD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_dw_fwd_kernel(
    xs_ptr, xh_ptr, w_ptr, keep_ptr, b_ptr, ms_ptr, mh_ptr, ys_ptr, yh_ptr,
    B_s, B_h, C, C_h, H, W, OH, OW,
    s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w, s_w_c, s_w_r, s_w_s,
    s_ys_b, s_ys_c, s_ys_h, s_ys_w, s_yh_b, s_yh_c, s_yh_h, s_yh_w,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        C = C // ALIGN * ALIGN
        C_h = C_h // ALIGN * ALIGN
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
    pid = tl.program_id(0)
    soft_tiles = tl.cdiv(B_s * OH * OW, BLOCK_M) * tl.cdiv(C, BLOCK_C)
    if pid < soft_tiles:
        _dw_fwd_tile(
            pid, xs_ptr, ms_ptr, w_ptr, keep_ptr, b_ptr, ys_ptr, B_s, C, H, W, OH, OW,
            s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_w_c, s_w_r, s_w_s,
            s_ys_b, s_ys_c, s_ys_h, s_ys_w, conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, False, HAS_BIAS, BLOCK_M, BLOCK_C,
        )  # fmt: skip
    else:
        _dw_fwd_tile(
            pid - soft_tiles, xh_ptr, mh_ptr, w_ptr, keep_ptr, b_ptr, yh_ptr,
            B_h, C_h, H, W, OH, OW,
            s_xh_b, s_xh_c, s_xh_h, s_xh_w, s_w_c, s_w_r, s_w_s,
            s_yh_b, s_yh_c, s_yh_h, s_yh_w, conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, True, HAS_BIAS, BLOCK_M, BLOCK_C,
        )  # fmt: skip


_dual_dw_fwd_kernel.align_args = (  # sizes and strides ALIGN asserts are multiples of it
    "C", "C_h", "s_xs_b", "s_xs_h", "s_xs_w", "s_xh_b", "s_xh_h", "s_xh_w", "s_ys_b", "s_ys_h",
    "s_ys_w", "s_yh_b", "s_yh_h", "s_yh_w",
)


@triton.jit
def _dw_dgrad_tile(
    tile, dy_ptr, w_ptr, chan_ptr, x_ptr, mask_ptr, dx_ptr, dmask_part_ptr,
    B, C, H, W, OH, OW,
    sdyb, sdyc, sdyh, sdyw, swc, swr, sws, sxb, sxc, sxh, sxw, sdxb, sdxc, sdxh, sdxw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, GATHER: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``BLOCK_M`` input pixels x ``BLOCK_C`` channels of ``g``, then ``dx`` and mask partials."""
    M = B * H * W
    pid_m, offs_m, offs_c, m_ok, c_ok, w_row = _dw_tile(
        tile, M, C, chan_ptr, GATHER, BLOCK_M, BLOCK_C
    )
    bb, ih, iw = pixel_coords(offs_m, H, W)
    bb = bb.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r in range(KH):
        oh, h_ok = tap_output(ih, conv_sh, pad_h, r, dil_h, OH, m_ok)
        for s in range(KW):
            ow, row_ok = tap_output(iw, conv_sw, pad_w, s, dil_w, OW, h_ok)
            dy_rows = bb * sdyb + oh * sdyh + ow * sdyw
            g = tl.load(
                dy_ptr + dy_rows[:, None] + offs_c[None, :] * sdyc,
                mask=row_ok[:, None] & c_ok[None, :], other=0.0,
            )  # fmt: skip
            wv = tl.load(w_ptr + w_row * swc + r * swr + s * sws, mask=c_ok, other=0.0)
            acc += g.to(tl.float32) * wv.to(tl.float32)[None, :]
    dx_rows = bb * sdxb + ih * sdxh + iw * sdxw
    x_rows = bb * sxb + ih * sxh + iw * sxw
    dgrad_epilogue(
        acc, dx_ptr + dx_rows[:, None] + offs_c[None, :] * sdxc,
        x_ptr + x_rows[:, None] + offs_c[None, :] * sxc, mask_ptr, dmask_part_ptr,
        pid_m, M, m_ok, C, offs_c, c_ok, NEED_DX, NEED_DMASK, BLOCK_M, BLOCK_C,
    )  # fmt: skip


DGRAD_KEEP = (2,)  # the others spill 24-48 B


@triton.autotune(configs=depthwise_configs(DGRAD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_dw_dgrad_kernel(
    dys_ptr, dyh_ptr, w_ptr, keep_ptr, xs_ptr, xh_ptr, ms_ptr, mh_ptr,
    dxs_ptr, dxh_ptr, dms_part_ptr, dmh_part_ptr,
    B_s, B_h, C, C_h, H, W, OH, OW,
    s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w,
    s_w_c, s_w_r, s_w_s,
    s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
    s_dxs_b, s_dxs_c, s_dxs_h, s_dxs_w, s_dxh_b, s_dxh_c, s_dxh_h, s_dxh_w,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    NEED_DX_S: tl.constexpr, NEED_DM_S: tl.constexpr,
    NEED_DX_H: tl.constexpr, NEED_DM_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        C = C // ALIGN * ALIGN
        C_h = C_h // ALIGN * ALIGN
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
    pid = tl.program_id(0)
    soft_tiles = tl.cdiv(B_s * H * W, BLOCK_M) * tl.cdiv(C, BLOCK_C)
    if pid < soft_tiles:
        _dw_dgrad_tile(
            pid, dys_ptr, w_ptr, keep_ptr, xs_ptr, ms_ptr, dxs_ptr, dms_part_ptr,
            B_s, C, H, W, OH, OW,
            s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_w_c, s_w_r, s_w_s,
            s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_dxs_b, s_dxs_c, s_dxs_h, s_dxs_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, False, NEED_DX_S, NEED_DM_S, BLOCK_M, BLOCK_C,
        )  # fmt: skip
    else:
        _dw_dgrad_tile(
            pid - soft_tiles, dyh_ptr, w_ptr, keep_ptr, xh_ptr, mh_ptr, dxh_ptr, dmh_part_ptr,
            B_h, C_h, H, W, OH, OW,
            s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w, s_w_c, s_w_r, s_w_s,
            s_xh_b, s_xh_c, s_xh_h, s_xh_w, s_dxh_b, s_dxh_c, s_dxh_h, s_dxh_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
            KH, KW, True, NEED_DX_H, NEED_DM_H, BLOCK_M, BLOCK_C,
        )  # fmt: skip


_dual_dw_dgrad_kernel.align_args = (  # sizes and strides ALIGN asserts are multiples of it
    "C", "C_h", "s_dys_b", "s_dys_h", "s_dys_w", "s_dyh_b", "s_dyh_h", "s_dyh_w", "s_xs_b",
    "s_xs_h", "s_xs_w", "s_xh_b", "s_xh_h", "s_xh_w", "s_dxs_b", "s_dxs_h", "s_dxs_w",
    "s_dxh_b", "s_dxh_h", "s_dxh_w",
)


@triton.jit
def _dw_wgrad_tile(
    tile, dy_ptr, x_ptr, mask_ptr, dw_part_ptr, db_part_ptr,
    B, C, H, W, OH, OW, SPLIT,
    sdyb, sdyc, sdyh, sdyw, sxb, sxc, sxh, sxw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(row split, tap, ``BLOCK_C`` channels) of ``dW``; ``dw_part`` is contiguous
    ``[SPLIT, KH*KW, C]`` fp32 and ``db_part`` ``[SPLIT, C]`` (channels of this problem)."""
    M = B * OH * OW
    taps: tl.constexpr = KH * KW
    num_c = tl.cdiv(C, BLOCK_C)
    split = tile // (taps * num_c)
    rest = tile % (taps * num_c)
    tap = rest // num_c
    pid_c = rest % num_c
    r = tap // KW
    s = tap % KW
    m_lo, m_hi = split_rows(split, M, SPLIT, BLOCK_M)
    offs_c, c_ok = block_offsets(pid_c * BLOCK_C, C, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m, m_ok = block_offsets(m0, m_hi, BLOCK_M)
        bb, oh, ow = pixel_coords(offs_m, OH, OW)
        bb = bb.to(tl.int64)
        ih, x_ok = tap_input(oh, conv_sh, pad_h, r, dil_h, H, m_ok)
        iw, x_ok = tap_input(ow, conv_sw, pad_w, s, dil_w, W, x_ok)
        dy_rows = bb * sdyb + oh * sdyh + ow * sdyw
        g = tl.load(
            dy_ptr + dy_rows[:, None] + offs_c[None, :] * sdyc,
            mask=m_ok[:, None] & c_ok[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        x_rows = bb * sxb + ih * sxh + iw * sxw
        xv = tl.load(
            x_ptr + x_rows[:, None] + offs_c[None, :] * sxc,
            mask=x_ok[:, None] & c_ok[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc += g * xv
        if HAS_BIAS:  # noqa: SIM102 (a constexpr gate, then a runtime test)
            if tap == 0:
                bias_acc += g
    gate = tl.load(mask_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.sum(acc, axis=0) * gate
    tl.store(dw_part_ptr + (split * taps + tap) * C + offs_c, dw, mask=c_ok)
    if HAS_BIAS:  # noqa: SIM102 (a constexpr gate, then a runtime test)
        if tap == 0:
            tl.store(db_part_ptr + split * C + offs_c, tl.sum(bias_acc, axis=0), mask=c_ok)


WGRAD_KEEP = (0, 1, 3)  # 64x128 spills 232 B


@triton.autotune(configs=depthwise_configs(WGRAD_KEEP), key=["TUNE_KEY"])
@triton.jit(do_not_specialize=["TUNE_KEY"])
def _dual_dw_wgrad_kernel(
    dys_ptr, dyh_ptr, xs_ptr, xh_ptr, ms_ptr, mh_ptr,
    dws_part_ptr, dwh_part_ptr, dbs_part_ptr, dbh_part_ptr,
    B_s, B_h, C, C_h, H, W, OH, OW, SPLIT, soft_on,
    s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w,
    s_xs_b, s_xs_c, s_xs_h, s_xs_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    TUNE_KEY,
    ALIGN: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    if ALIGN > 1:  # see with_align_hint: a value-preserving rounding Triton can see
        C = C // ALIGN * ALIGN
        C_h = C_h // ALIGN * ALIGN
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
    soft_tiles = SPLIT * (KH * KW) * tl.cdiv(C, BLOCK_C) * soft_on
    if pid < soft_tiles:
        _dw_wgrad_tile(
            pid, dys_ptr, xs_ptr, ms_ptr, dws_part_ptr, dbs_part_ptr, B_s, C, H, W, OH, OW, SPLIT,
            s_dys_b, s_dys_c, s_dys_h, s_dys_w, s_xs_b, s_xs_c, s_xs_h, s_xs_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, KH, KW, HAS_BIAS, BLOCK_M, BLOCK_C,
        )  # fmt: skip
    else:
        _dw_wgrad_tile(
            pid - soft_tiles, dyh_ptr, xh_ptr, mh_ptr, dwh_part_ptr, dbh_part_ptr,
            B_h, C_h, H, W, OH, OW, SPLIT,
            s_dyh_b, s_dyh_c, s_dyh_h, s_dyh_w, s_xh_b, s_xh_c, s_xh_h, s_xh_w,
            conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, KH, KW, HAS_BIAS, BLOCK_M, BLOCK_C,
        )  # fmt: skip




_dual_dw_wgrad_kernel.align_args = (  # sizes and strides ALIGN asserts are multiples of it
    "C", "C_h", "s_dys_b", "s_dys_h", "s_dys_w", "s_dyh_b", "s_dyh_h", "s_dyh_w", "s_xs_b",
    "s_xs_h", "s_xs_w", "s_xh_b", "s_xh_h", "s_xh_w",
)


# --------------------------------------------------------------------------------------------
# Launches (called by the bodies of the dual_conv2d ops when the convolution is depthwise)
# --------------------------------------------------------------------------------------------


def depthwise_fwd(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, ms: torch.Tensor, mh: torch.Tensor, out_keep: torch.Tensor,
    y_soft: torch.Tensor, y_hard: torch.Tensor, geo: tuple[int, int, int, int, int, int],
) -> None:  # fmt: skip
    """Both paths' forward into ``y_soft`` / ``y_hard`` (allocated by the op, not empty);
    ``ms`` / ``mh`` are the contiguous input masks, ``geo`` as ``conv_params`` gives it."""
    b_s, c, h, w = x_soft.shape
    b_h, c_h = x_hard.shape[0], x_hard.shape[1]
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = y_soft.shape[2], y_soft.shape[3]
    grid = dual_grid(b_s * oh * ow, c, b_h * oh * ow, c_h, "BLOCK_C")
    launcher(_dual_dw_fwd_kernel)[grid](
        x_soft, x_hard, weight, out_keep, bias if bias is not None else weight, ms, mh,
        y_soft, y_hard,
        b_s, b_h, c, c_h, h, w, oh, ow,
        *strides4(x_soft), *strides4(x_hard),
        weight.stride(0), weight.stride(2), weight.stride(3),
        *strides4(y_soft), *strides4(y_hard), *geo,
        KH=kh, KW=kw, HAS_BIAS=bias is not None,
        TUNE_KEY=tune_key(b_s * oh * ow, b_h * oh * ow, c, c_h, kh * kw),
    )  # fmt: skip


def depthwise_dgrad(
    dys: torch.Tensor, dyh: torch.Tensor, weight: torch.Tensor, out_keep: torch.Tensor,
    x_soft: torch.Tensor, x_hard: torch.Tensor, ms: torch.Tensor, mh: torch.Tensor,
    dxs: torch.Tensor, dxh: torch.Tensor, dms_part: torch.Tensor, dmh_part: torch.Tensor,
    b_s: int, b_h: int, oh: int, ow: int, geo: tuple[int, int, int, int, int, int],
    need_x_soft: bool, need_x_hard: bool, need_soft_mask: bool, need_hard_mask: bool,
) -> None:  # fmt: skip
    """Both paths' activation gradients into ``dxs`` / ``dxh`` and mask-gradient partials into
    ``dms_part`` / ``dmh_part`` (all allocated by the op); ``b_s`` / ``b_h`` are 0 for a path
    that is skipped."""
    _, c, h, w = x_soft.shape
    c_h = x_hard.shape[1]
    kh, kw = weight.shape[2], weight.shape[3]
    grid = dual_grid(b_s * h * w, c, b_h * h * w, c_h, "BLOCK_C")
    launcher(_dual_dw_dgrad_kernel)[grid](
        dys, dyh, weight, out_keep, x_soft, x_hard, ms, mh, dxs, dxh, dms_part, dmh_part,
        b_s, b_h, c, c_h, h, w, oh, ow,
        *strides4(dys), *strides4(dyh),
        weight.stride(0), weight.stride(2), weight.stride(3),
        *strides4(x_soft), *strides4(x_hard), *strides4(dxs), *strides4(dxh), *geo,
        KH=kh, KW=kw, NEED_DX_S=need_x_soft, NEED_DM_S=need_soft_mask,
        NEED_DX_H=need_x_hard, NEED_DM_H=need_hard_mask,
        TUNE_KEY=tune_key(b_s * h * w, b_h * h * w, c, c_h, kh * kw),
    )  # fmt: skip


def depthwise_wgrad(
    dys: torch.Tensor, dyh: torch.Tensor, x_soft: torch.Tensor, x_hard: torch.Tensor,
    ms: torch.Tensor, mh: torch.Tensor, weight: torch.Tensor, out_keep: torch.Tensor,
    do_soft: bool, do_hard: bool, b_s: int, b_h: int, oh: int, ow: int,
    geo: tuple[int, int, int, int, int, int], need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The weight gradient (fp32 ``[C, 1, KH, KW]``, both paths summed) and the per-split
    fp32 bias-gradient partials ``([split, C], [split, C_h])`` of the soft and hard paths
    (empty where not computed)."""
    _, c, h, w = x_soft.shape
    c_h = x_hard.shape[1]
    n_out, n_out_h = weight.shape[0], out_keep.shape[0]
    kh, kw = weight.shape[2], weight.shape[3]
    taps = kh * kw
    f32 = {"dtype": torch.float32, "device": x_soft.device}
    tiles = taps * (
        (triton.cdiv(c, 64) if do_soft else 0) + (triton.cdiv(c_h, 64) if do_hard else 0)
    )
    split = row_splits(
        x_soft.device, max(b_s, b_h) * oh * ow, tiles,
        min_rows=CONV_SPLIT_MIN_ROWS, max_splits=CONV_MAX_SPLITS,
    )  # fmt: skip
    dws_part, dwh_part, dbs_part, dbh_part = wgrad_partials(
        split, x_soft.device,
        (taps, c) if do_soft else None, (taps, c_h) if do_hard else None,
        (c,) if do_soft and need_bias else None, (c_h,) if do_hard and need_bias else None,
    )  # fmt: skip
    if do_soft or do_hard:
        soft = (c,) if do_soft else None
        hard = (c_h,) if do_hard else None
        grid = split_grid(split, taps, soft, hard, ("BLOCK_C",))
        launcher(_dual_dw_wgrad_kernel)[grid](
            dys, dyh, x_soft, x_hard, ms, mh, dws_part, dwh_part, dbs_part, dbh_part,
            b_s, b_h, c, c_h, h, w, oh, ow, split, int(do_soft),
            *strides4(dys), *strides4(dyh), *strides4(x_soft), *strides4(x_hard), *geo,
            KH=kh, KW=kw, HAS_BIAS=need_bias,
            TUNE_KEY=tune_key(b_s * oh * ow, b_h * oh * ow, c, c_h, kh * kw, split),
        )  # fmt: skip
    # [split, taps, C] -> [C, 1, KH, KW]
    if do_soft:
        dw = dws_part.sum(0).t().reshape(n_out, 1, kh, kw)
    else:
        dw = torch.zeros(weight.shape, **f32)
    if do_hard:
        hard = dwh_part.sum(0).t().reshape(n_out_h, 1, kh, kw)
        dw = dw.index_put((out_keep,), hard, accumulate=True)
    return dw, dbs_part, dbh_part
