"""Tests of the channel ops (s2h/ops.py, csrc/channel_ops*.{cpp,cu}).

References are independent of the ops and of the torch fallback (which is ``index_select`` /
``index_add``): a Python loop over the index entries, one ``select`` and ``stack`` per entry for
the gathers, a float64 accumulation per entry for the scatters. Every CPU test runs against the
compiled extension (when built) and against the torch fallback; CUDA tests are marked ``gpu``
(skipped without a device, see conftest.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from s2h import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]

HAS_EXT = ops.available()
BACKENDS = [
    pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT, reason="s2h._C not built")),
    "fallback",
]

IMPLS = {
    "ext": {
        "gc": ops.gather_channels,
        "gw": ops.gather_weight,
        "sc": ops.scatter_channels,
        "sw": ops.scatter_weight,
    },
    "fallback": {
        "gc": ops._fallback_gather_channels,
        "gw": ops._fallback_gather_weight,
        "sc": ops._fallback_scatter_channels,
        "sw": ops._fallback_scatter_weight,
    },
}


@pytest.fixture(params=BACKENDS)
def impl(request):
    return IMPLS[request.param]


def _rand(shape, dtype, device="cpu"):
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


def _index(n_from, k, dtype, device="cpu", repeats=False):
    if repeats:
        idx = torch.randint(0, n_from, (k,), device=device)
    else:
        idx = torch.randperm(n_from, device=device)[:k]
    return idx.to(dtype)


# ---- references ---------------------------------------------------------------------------------


def ref_gather_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``out.select(dim, j) == x.select(dim, index[j])``, entry by entry."""
    dim = dim % x.dim()
    rows = [x.select(dim, i) for i in index.tolist()]
    if not rows:
        return x.narrow(dim, 0, 0).clone()
    return torch.stack(rows, dim)


def ref_gather_weight(w: torch.Tensor, out_index: torch.Tensor,
                      in_index: torch.Tensor) -> torch.Tensor:
    """``out[a, b] == w[out_index[a], in_index[b]]``."""
    return ref_gather_channels(ref_gather_channels(w, out_index, 0), in_index, 1)


def ref_scatter_channels(grad: torch.Tensor, index: torch.Tensor, dim: int,
                         size: int) -> torch.Tensor:
    """``out.select(dim, i) == sum of grad.select(dim, j) over j with index[j] == i``, summed
    in float64 and rounded once."""
    dim = dim % grad.dim()
    shape = list(grad.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=torch.float64, device=grad.device)
    for j, i in enumerate(index.tolist()):
        out.select(dim, i).add_(grad.select(dim, j).double())
    return out.to(grad.dtype)


def ref_scatter_weight(grad: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor,
                       full_shape: list[int]) -> torch.Tensor:
    """``out[o, i] == sum of grad[a, b] over out_index[a] == o, in_index[b] == i`` (float64)."""
    rows = torch.zeros([full_shape[0], *grad.shape[1:]], dtype=torch.float64,
                       device=grad.device)
    for a, o in enumerate(out_index.tolist()):
        rows[o] += grad[a].double()
    out = torch.zeros(full_shape, dtype=torch.float64, device=grad.device)
    for b, i in enumerate(in_index.tolist()):
        out[:, i] += rows[:, b]
    return out.to(grad.dtype)


# ---- layouts ------------------------------------------------------------------------------------

# (name, shape, dim, memory format or None, index length K)
GATHER_CASES = [
    ("nchw_rows_unaligned", (2, 24, 5, 7), 1, None, 9),
    ("nchw_rows_aligned", (2, 24, 4, 4), 1, None, 8),
    ("channels_last", (2, 24, 5, 3), 1, torch.channels_last, 8),
    ("channels_last_odd_k", (2, 24, 3, 3), 1, torch.channels_last, 7),
    ("channels_last_dim2", (2, 6, 5, 3), 2, torch.channels_last, 3),
    ("batch_dim0", (6, 4, 3, 3), 0, None, 4),
    ("channels_last_3d", (2, 16, 2, 3, 2), 1, torch.channels_last_3d, 8),
    ("tokens_last_dim", (3, 5, 40), -1, None, 16),
    ("tokens_middle_dim", (3, 40, 5), 1, None, 16),
    ("param_1d", (40,), 0, None, 24),
    ("param_1d_unaligned", (13,), 0, None, 5),
    ("empty_index", (2, 8, 3), 1, None, 0),
]


def _sum_tol(dtype):
    """Tolerance for sums of repeated indices in low precision (a few roundings apart)."""
    if dtype == torch.float16:
        return {"rtol": 2e-3, "atol": 2e-3}
    return {"rtol": 1.6e-2, "atol": 1.6e-2}


def _make(shape, dtype, fmt):
    x = _rand(shape, dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _expected_format_ok(out, fmt):
    if fmt is None:
        return out.is_contiguous()
    return out.is_contiguous(memory_format=fmt)


# ---- gather_channels ----------------------------------------------------------------------------


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATHER_CASES, ids=[c[0] for c in GATHER_CASES])
def test_gather_channels_matches_the_loop_reference(impl, case, dtype, idx_dtype):
    _, shape, dim, fmt, k = case
    x = _make(shape, dtype, fmt)
    index = _index(shape[dim], k, idx_dtype)
    out = impl["gc"](x, index, dim)
    ref = ref_gather_channels(x, index, dim)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if impl is IMPLS["ext"]:
        assert _expected_format_ok(out, fmt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_channels_repeated_and_any_dtype(backend):
    f = IMPLS[backend]["gc"]
    x = torch.arange(2 * 7 * 3).reshape(2, 7, 3)  # int64 data: gathers are pure copies
    index = torch.tensor([6, 0, 6, 2, 2])
    # x[b, a, c] = 21 b + 3 a + c: the expected output written out
    want = torch.tensor([[[21 * b + 3 * a + c for c in range(3)] for a in (6, 0, 6, 2, 2)]
                         for b in range(2)])
    torch.testing.assert_close(f(x, index, 1), want, rtol=0, atol=0)
    torch.testing.assert_close(f(x, index, 1), ref_gather_channels(x, index, 1), rtol=0, atol=0)
    xb = torch.rand(4, 9) > 0.5
    torch.testing.assert_close(f(xb, index, 1), ref_gather_channels(xb, index, 1))
    xd = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(f(xd, index, -1), ref_gather_channels(xd, index, 1), rtol=0,
                               atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(24, 2, 5).transpose(0, 1),  # transposed
        lambda: torch.randn(2, 48, 5)[:, ::2],  # strided slice
        lambda: torch.randn(2, 24, 1).expand(2, 24, 5),  # expanded (stride 0)
        lambda: torch.randn(2, 24, 5, 6)[..., 1:4],  # offset view, odd row width
        lambda: torch.randn(2, 5, 6, 24).permute(0, 3, 1, 2)[:, :, 1:],  # broken channels-last
    ],
    ids=["transposed", "strided", "expanded", "offset_view", "sliced_channels_last"],
)
def test_gather_channels_non_contiguous_input(impl, make):
    x = make()
    index = torch.tensor([5, 1, 23, 0, 7, 7, 2, 11])
    out = impl["gc"](x, index, 1)
    torch.testing.assert_close(out, ref_gather_channels(x, index, 1), rtol=0, atol=0)


def test_gather_channels_non_contiguous_index(impl):
    x = torch.randn(3, 24, 4)
    index = torch.arange(24).flip(0)[::3]  # a strided view
    assert not index.is_contiguous()
    torch.testing.assert_close(impl["gc"](x, index, 1), ref_gather_channels(x, index, 1))


# ---- gather_weight ------------------------------------------------------------------------------

WEIGHT_CASES = [
    ("linear", (24, 40), None, 8, 16),
    ("linear_odd", (13, 11), None, 5, 3),
    ("conv3x3", (16, 24, 3, 3), None, 8, 16),
    ("conv3x3_channels_last", (16, 24, 3, 3), torch.channels_last, 8, 16),
    ("conv1x1", (32, 16, 1, 1), None, 8, 8),
    ("conv1d", (16, 8, 5), None, 4, 8),
    ("conv3d_channels_last", (8, 16, 2, 2, 2), torch.channels_last_3d, 4, 8),
    ("empty_out", (8, 8, 3, 3), None, 0, 4),
]


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_gather_weight_matches_the_loop_reference(impl, case, dtype, idx_dtype):
    _, shape, fmt, ko, ki = case
    w = _make(shape, dtype, fmt)
    oi = _index(shape[0], ko, idx_dtype)
    ii = _index(shape[1], ki, idx_dtype)
    out = impl["gw"](w, oi, ii)
    ref = ref_gather_weight(w, oi, ii)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if impl is IMPLS["ext"]:
        assert _expected_format_ok(out, fmt)


def test_gather_weight_mixed_index_dtypes_and_views(impl):
    w = torch.randn(12, 20, 3, 3).transpose(2, 3)  # not contiguous in any kept format
    oi = torch.tensor([3, 3, 0, 11], dtype=torch.int32)
    ii = torch.arange(20)[::2]
    torch.testing.assert_close(impl["gw"](w, oi, ii), ref_gather_weight(w, oi, ii), rtol=0, atol=0)


# ---- scatters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("repeats", [False, True], ids=["unique", "repeats"])
@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATHER_CASES, ids=[c[0] for c in GATHER_CASES])
def test_scatter_channels_matches_the_loop_reference(impl, case, dtype, idx_dtype, repeats):
    _, shape, dim, fmt, k = case
    size = shape[dim]
    index = _index(size, k, idx_dtype, repeats=repeats)
    gshape = list(shape)
    gshape[dim] = k
    grad = _make(gshape, dtype, fmt)
    out = impl["sc"](grad, index, dim, size)
    ref = ref_scatter_channels(grad, index, dim, size)
    assert out.shape == ref.shape and out.dtype == dtype
    if repeats and dtype != torch.float32:
        torch.testing.assert_close(out, ref, **_sum_tol(dtype))  # rounded once (ext) / per add
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if repeats else 0)
    if impl is IMPLS["ext"]:
        assert _expected_format_ok(out, fmt)


@pytest.mark.parametrize("repeats", [False, True], ids=["unique", "repeats"])
@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_scatter_weight_matches_the_loop_reference(impl, case, dtype, idx_dtype, repeats):
    _, shape, fmt, ko, ki = case
    oi = _index(shape[0], ko, idx_dtype, repeats=repeats)
    ii = _index(shape[1], ki, idx_dtype, repeats=repeats)
    grad = _make((ko, ki, *shape[2:]), dtype, fmt)
    out = impl["sw"](grad, oi, ii, list(shape))
    ref = ref_scatter_weight(grad, oi, ii, list(shape))
    assert out.shape == ref.shape
    if repeats and dtype != torch.float32:
        torch.testing.assert_close(out, ref, **_sum_tol(dtype))
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if repeats else 0)
    if impl is IMPLS["ext"]:
        assert _expected_format_ok(out, fmt)


@pytest.mark.skipif(not HAS_EXT, reason="s2h._C not built")
def test_scatter_is_deterministic_across_thread_counts():
    grad = torch.randn(64, 300, 9)
    index = torch.randint(0, 40, (300,))
    oi = torch.randint(0, 70, (64,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.scatter_channels(grad, index, 1, 40)
        c = ops.scatter_weight(grad, oi, index, [70, 40, 9])
        torch.set_num_threads(max(2, threads))
        b = ops.scatter_channels(grad, index, 1, 40)
        d = ops.scatter_weight(grad, oi, index, [70, 40, 9])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(c, d)


# ---- autograd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "channels_last"])
def test_gather_gradients_match_reference(impl, fmt):
    x = _make((2, 16, 3, 5), torch.float32, fmt).requires_grad_()
    index = torch.tensor([3, 0, 3, 9, 15, 2])  # with a repeat
    w = _make((12, 16, 3, 3), torch.float32, fmt).requires_grad_()
    oi = torch.tensor([1, 7, 7, 0], dtype=torch.int32)
    ii = torch.tensor([15, 2, 2, 4, 9], dtype=torch.int32)

    out = impl["gc"](x, index, 1)
    r = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * r).sum(), x)
    (gx_ref,) = torch.autograd.grad((ref_gather_channels(x, index, 1) * r).sum(), x)
    torch.testing.assert_close(gx, gx_ref)

    out = impl["gw"](w, oi, ii)
    r = torch.randn_like(out)
    (gw,) = torch.autograd.grad((out * r).sum(), w)
    (gw_ref,) = torch.autograd.grad((ref_gather_weight(w, oi, ii) * r).sum(), w)
    torch.testing.assert_close(gw, gw_ref)


def test_scatter_gradients_match_reference(impl):
    g = torch.randn(2, 6, 5, requires_grad=True)
    index = torch.tensor([3, 0, 3, 9, 1, 2])
    out = impl["sc"](g, index, 1, 10)
    r = torch.randn_like(out)
    (gg,) = torch.autograd.grad((out * r).sum(), g)
    torch.testing.assert_close(gg, ref_gather_channels(r, index, 1))

    g = torch.randn(3, 4, 2, 2, requires_grad=True)
    oi, ii = torch.tensor([4, 0, 4]), torch.tensor([1, 5, 2, 0])
    out = impl["sw"](g, oi, ii, [6, 6, 2, 2])
    r = torch.randn_like(out)
    (gg,) = torch.autograd.grad((out * r).sum(), g)
    torch.testing.assert_close(gg, ref_gather_weight(r, oi, ii))


def test_gradcheck_float64(impl):
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([6, 1, 1, 4])
    w = torch.randn(5, 6, 2, dtype=torch.float64, requires_grad=True)
    oi, ii = torch.tensor([4, 0, 4]), torch.tensor([5, 2])
    g = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    cases = [
        (lambda t: impl["gc"](t, index, 1), x),
        (lambda t: impl["gw"](t, oi, ii), w),
        (lambda t: impl["sc"](t, index, 1, 7), g),
        (lambda t: impl["sw"](t, oi, ii, [5, 6, 2]), gw),
    ]
    for fn, inp in cases:
        assert torch.autograd.gradcheck(fn, (inp,))
        assert torch.autograd.gradgradcheck(fn, (inp,))


# ---- opcheck / compile --------------------------------------------------------------------------


def _opcheck_samples(device="cpu"):
    idx = torch.tensor([2, 0, 5, 5], device=device)
    idx32 = idx.int()
    x = torch.randn(2, 6, 3, 3, device=device)
    xcl = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 6, 3, 3, device=device)
    g = torch.randn(2, 4, 3, 3, device=device)
    gw = torch.randn(4, 4, 3, 3, device=device)
    return [
        ("gather_channels", (x, idx, 1)),
        ("gather_channels", (xcl.requires_grad_(), idx32, 1)),
        ("gather_channels", (torch.randn(3, 6, device=device, requires_grad=True), idx, -1)),
        ("gather_channels", (torch.randn(6, device=device).half(), idx32, 0)),
        ("gather_weight", (w, idx, idx32)),
        (
            "gather_weight",
            (w.contiguous(memory_format=torch.channels_last).requires_grad_(), idx, idx),
        ),
        ("gather_weight", (torch.randn(7, 6, device=device, requires_grad=True), idx32, idx)),
        ("scatter_channels", (g, idx, 1, 6)),
        (
            "scatter_channels",
            (g.contiguous(memory_format=torch.channels_last).requires_grad_(), idx32, 1, 6),
        ),
        ("scatter_channels", (torch.randn(3, 4, device=device).bfloat16(), idx, 1, 6)),
        ("scatter_weight", (gw, idx, idx32, [7, 6, 3, 3])),
        ("scatter_weight", (gw.clone().requires_grad_(), idx, idx, [6, 8, 3, 3])),
        (
            "scatter_weight",
            (torch.randn(4, 4, device=device, requires_grad=True), idx32, idx, [6, 6]),
        ),
    ]


@pytest.mark.skipif(not HAS_EXT, reason="s2h._C not built")
@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck_cpu(name):
    samples = [args for op, args in _opcheck_samples() if op == name]
    assert samples
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.s2h, name), args)


def test_torch_compile_fullgraph():
    """A hard-path-like layer (gather weight, gather activations, conv) under torch.compile."""
    torch._dynamo.reset()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(12, 8, 3, 3, requires_grad=True)
    keep_in = torch.tensor([0, 2, 5, 7])
    keep_out = torch.tensor([11, 3, 4, 0, 8, 1])

    def layer(x, w):
        xk = ops.gather_channels(x, keep_in, 1)
        wk = ops.gather_weight(w, keep_out, keep_in)
        y = torch.nn.functional.conv2d(xk, wk, padding=1)
        return ops.scatter_channels(y, keep_out, 1, 12).square().mean()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w)
    gx, gw = torch.autograd.grad(loss, (x, w))
    loss_ref = layer(x, w)
    gx_ref, gw_ref = torch.autograd.grad(loss_ref, (x, w))
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


# ---- bad input ----------------------------------------------------------------------------------

x4 = torch.randn(2, 8, 3, 3)
w4 = torch.randn(6, 8, 3, 3)
i3 = torch.tensor([0, 1, 2])

BAD = [
    # (id, op, args, exception, message regex)
    (
        "out_of_range",
        "gc",
        (x4, torch.tensor([0, 8]), 1),
        IndexError,
        (
            r"s2h\.gather_channels: index entry 8 is out of range"
            r"; entries must lie in \[0, 8\) for dim 1"
        ),
    ),
    (
        "negative",
        "gc",
        (x4, torch.tensor([1, -1]), 1),
        IndexError,
        (
            r"s2h\.gather_channels: index contains a negative entry \(-1\)"
            r"; entries must lie in \[0, 8\)"
        ),
    ),
    (
        "float_index",
        "gc",
        (x4, torch.tensor([1.0, 2.0]), 1),
        TypeError,
        r"s2h\.gather_channels: index must be an int32 or int64 tensor, got torch\.float32",
    ),
    (
        "index_2d",
        "gc",
        (x4, torch.tensor([[1, 2]]), 1),
        ValueError,
        r"s2h\.gather_channels: index must be 1-D, got a 2-D tensor",
    ),
    (
        "wrong_dim",
        "gc",
        (x4, i3, 4),
        IndexError,
        r"s2h\.gather_channels: dim 4 is out of range for a 4-D tensor \(expected -4 to 3\)",
    ),
    (
        "wrong_dim_negative",
        "gc",
        (x4, i3, -5),
        IndexError,
        r"s2h\.gather_channels: dim -5 is out of range for a 4-D tensor",
    ),
    (
        "scalar_x",
        "gc",
        (torch.tensor(1.0), i3, 0),
        ValueError,
        r"s2h\.gather_channels: x must have at least one dimension",
    ),
    (
        "device_mismatch",
        "gc",
        (x4, i3.to("meta"), 1),
        RuntimeError,
        r"s2h\.gather_channels: x and index must be on the same device, got cpu and meta",
    ),
    (
        "w_out_of_range",
        "gw",
        (w4, torch.tensor([6]), i3),
        IndexError,
        (
            r"s2h\.gather_weight: out_index entry 6 is out of range"
            r"; entries must lie in \[0, 6\) for dim 0"
        ),
    ),
    (
        "w_in_negative",
        "gw",
        (w4, i3, torch.tensor([-3, 1])),
        IndexError,
        (
            r"s2h\.gather_weight: in_index contains a negative entry \(-3\)"
            r"; entries must lie in \[0, 8\) for dim 1"
        ),
    ),
    (
        "w_float_index",
        "gw",
        (w4, i3.double(), i3),
        TypeError,
        r"s2h\.gather_weight: out_index must be an int32 or int64 tensor, got torch\.float64",
    ),
    (
        "w_1d",
        "gw",
        (torch.randn(8), i3, i3),
        ValueError,
        r"s2h\.gather_weight: w must have at least 2 dims \(out, in, \.\.\.\), got a 1-D tensor",
    ),
    (
        "w_device_mismatch",
        "gw",
        (w4, i3, i3.to("meta")),
        RuntimeError,
        r"s2h\.gather_weight: w and in_index must be on the same device, got cpu and meta",
    ),
    (
        "sc_out_of_range",
        "sc",
        (torch.randn(2, 3), i3, 1, 2),
        IndexError,
        (
            r"s2h\.scatter_channels: index entry 2 is out of range"
            r"; entries must lie in \[0, 2\) for dim 1"
        ),
    ),
    (
        "sc_count_mismatch",
        "sc",
        (torch.randn(2, 4), i3, 1, 5),
        ValueError,
        r"s2h\.scatter_channels: grad\.size\(1\) is 4 but index has 3 entries",
    ),
    (
        "sc_int_grad",
        "sc",
        (torch.ones(2, 3, dtype=torch.int64), i3, 1, 5),
        TypeError,
        (
            r"s2h\.scatter_channels: grad must be float64, float32"
            r", float16 or bfloat16, got torch\.int64"
        ),
    ),
    (
        "sc_negative_size",
        "sc",
        (torch.randn(2, 3), i3, 1, -1),
        ValueError,
        r"s2h\.scatter_channels: size must be >= 0, got -1",
    ),
    (
        "sc_wrong_dim",
        "sc",
        (torch.randn(2, 3), i3, 2, 5),
        IndexError,
        r"s2h\.scatter_channels: dim 2 is out of range for a 2-D tensor",
    ),
    (
        "sw_shape_mismatch",
        "sw",
        (torch.randn(3, 3, 2), i3, i3, [4, 4, 3]),
        ValueError,
        r"s2h\.scatter_weight: full_shape\[2\] is 3 but grad\.size\(2\) is 2",
    ),
    (
        "sw_rank_mismatch",
        "sw",
        (torch.randn(3, 3), i3, i3, [4, 4, 1]),
        ValueError,
        r"s2h\.scatter_weight: full_shape has 3 entries but grad has 2 dims",
    ),
    (
        "sw_out_of_range",
        "sw",
        (torch.randn(3, 3), i3, i3, [4, 2]),
        IndexError,
        (
            r"s2h\.scatter_weight: in_index entry 2 is out of range"
            r"; entries must lie in \[0, 2\) for dim 1"
        ),
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(impl, case):
    _, op, args, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        impl[op](*args)


@pytest.mark.skipif(not HAS_EXT, reason="s2h._C not built")
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_same_message_as_fallback(case):
    _, op, args, exc, _ = case
    with pytest.raises(exc) as from_ext:
        IMPLS["ext"][op](*args)
    with pytest.raises(exc) as from_fallback:
        IMPLS["fallback"][op](*args)
    assert str(from_ext.value).splitlines()[0] == str(from_fallback.value).splitlines()[0]


@pytest.mark.skipif(not HAS_EXT, reason="s2h._C not built")
def test_bad_input_through_torch_ops_and_meta():
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.s2h.gather_channels(x4, torch.tensor([9]), 1)
    # the fake (meta) implementation checks metadata with the same messages
    with pytest.raises(TypeError, match="int32 or int64"):
        torch.ops.s2h.gather_channels(x4.to("meta"), torch.ones(2, device="meta"), 1)
    out = torch.ops.s2h.gather_weight(w4.to("meta"), i3.to("meta"), i3[:2].to("meta"))
    assert out.shape == (3, 2, 3, 3) and out.device.type == "meta"


# ---- range-check policy (the CUDA path, exercised on CPU through a test hook) --------------------


@pytest.mark.skipif(not HAS_EXT, reason="s2h._C not built")
def test_index_check_cache_and_modes():
    C = ops._C
    old = ops.get_index_check()
    try:
        ops.set_index_check("cached")
        C.index_cache_clear()
        idx = torch.tensor([3, 1, 2])
        C._check_index_range(idx, 4)
        assert C.index_cache_size() == 1
        C._check_index_range(idx, 4)  # cached: no new entry
        assert C.index_cache_size() == 1
        with pytest.raises(IndexError, match="entry 3 is out of range"):
            C._check_index_range(idx, 3)  # cached min/max, new bound
        idx[0] = 7  # in-place write bumps the version counter: the entry is stale
        with pytest.raises(IndexError, match="entry 7 is out of range"):
            C._check_index_range(idx, 4)
        with pytest.raises(IndexError, match="negative"):
            C._check_index_range(torch.tensor([-1]), 4)
        ops.set_index_check("off")
        C._check_index_range(torch.tensor([-1]), 4)  # no check at all
        ops.set_index_check("always")
        C._check_index_range(idx[1:], 4)
        assert C.index_cache_size() == 0
        with pytest.raises(ValueError, match="mode must be"):
            ops.set_index_check("sometimes")
    finally:
        ops.set_index_check(old)


# ---- module face --------------------------------------------------------------------------------


def test_build_info_and_backends():
    info = ops.build_info()
    assert info["loaded"] == ops.available()
    assert set(ops.OPS) <= set(info["ops"])
    backends = ops.op_backends()
    assert set(backends) == {f"{n}/{d}" for n in ops.OPS for d in ("cpu", "cuda")}
    allowed = {ops.BACKEND_CPP, ops.BACKEND_CUDA, ops.BACKEND_FALLBACK}
    assert set(backends.values()) <= allowed
    if ops.available():
        assert info["torch"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
        assert backends["gather_channels/cpu"] == ops.BACKEND_CPP
        assert info["with_cuda"] == (backends["gather_channels/cuda"] == ops.BACKEND_CUDA) or (
            torch.cuda.is_available()
        )
    else:
        assert "error" in info


def test_arch_list_parsing():
    assert ops._arch_runs_on("8.0;9.0", 9, 0)
    assert ops._arch_runs_on("8.0;9.0", 8, 6)  # sm_80 SASS runs on 8.6
    assert not ops._arch_runs_on("8.0;9.0", 7, 5)
    assert not ops._arch_runs_on("8.0;9.0", 10, 0)
    assert ops._arch_runs_on("8.0;9.0+PTX", 10, 0)
    assert not ops._arch_runs_on("9.0a", 9, 1)


def test_disable_env_var_forces_fallback():
    code = (
        "import torch, s2h.ops as o\n"
        "assert not o.available(), 'extension loaded'\n"
        "assert set(o.op_backends().values()) == {'torch fallback'}\n"
        "assert 'S2H_DISABLE_EXT' in o.build_info()['error']\n"
        "x = torch.randn(2, 5, 3); i = torch.tensor([4, 0])\n"
        "assert torch.equal(o.gather_channels(x, i, 1), torch.stack([x[:, 4], x[:, 0]], 1))\n"
    )
    env = dict(os.environ, S2H_DISABLE_EXT="1")
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "not available" not in res.stderr  # disabling on purpose is not warned about


# ---- CUDA ---------------------------------------------------------------------------------------

CUDA_SHAPES = [
    # NCHW rows: aligned (56*56 fp16 = 16-byte multiple), unaligned (7*7), (..., C), 1-D, weights
    ("resnet_nchw_aligned", (4, 64, 56, 56), 1, None),
    ("resnet_nchw_7x7", (4, 512, 7, 7), 1, None),
    ("resnet_channels_last", (4, 256, 14, 14), 1, torch.channels_last),
    ("vit_tokens", (4, 197, 768), -1, None),
    ("param_1d", (768,), 0, None),
    ("odd", (3, 13, 5), 1, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CUDA_SHAPES, ids=[c[0] for c in CUDA_SHAPES])
def test_cuda_gather_scatter_channels(case, dtype, idx_dtype):
    _, shape, dim, fmt = case
    x = _make(shape, dtype, fmt).cuda()
    n = x.shape[dim]
    for k, repeats in ((max(1, (n * 35 // 100) // 8 * 8), False), (n // 3 + 1, True)):
        index = _index(n, k, idx_dtype, "cuda", repeats=repeats)
        out = ops.gather_channels(x, index, dim)
        torch.testing.assert_close(out, ref_gather_channels(x, index, dim), rtol=0, atol=0)
        assert _expected_format_ok(out, fmt)
        sc = ops.scatter_channels(out, index, dim, n)
        tol = _sum_tol(dtype) if repeats and dtype != torch.float32 else {"rtol": 0, "atol": 1e-6}
        torch.testing.assert_close(sc, ref_scatter_channels(out, index, dim, n), **tol)
        cpu = ops.scatter_channels(out.cpu(), index.cpu(), dim, n)
        assert torch.equal(sc.cpu(), cpu)  # same summation order and rounding as the CPU op


@pytest.mark.gpu
@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((3072, 768), None),
        ((256, 128, 3, 3), None),
        ((256, 128, 3, 3), torch.channels_last),
        ((512, 256, 1, 1), None),
        ((13, 11), None),
    ],
)
def test_cuda_gather_scatter_weight(shape, fmt, dtype, idx_dtype):
    w = _make(shape, dtype, fmt).cuda()
    oi = _index(shape[0], max(1, shape[0] // 3), idx_dtype, "cuda")
    ii = _index(shape[1], max(1, shape[1] // 2), idx_dtype, "cuda", repeats=True)
    out = ops.gather_weight(w, oi, ii)
    torch.testing.assert_close(out, ref_gather_weight(w, oi, ii), rtol=0, atol=0)
    assert _expected_format_ok(out, fmt)
    sw = ops.scatter_weight(out, oi, ii, list(shape))
    tol = _sum_tol(dtype) if dtype != torch.float32 else {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(sw, ref_scatter_weight(out, oi, ii, list(shape)), **tol)
    assert torch.equal(sw.cpu(), ops.scatter_weight(out.cpu(), oi.cpu(), ii.cpu(), list(shape)))


@pytest.mark.gpu
def test_cuda_bad_input_is_a_host_error_not_a_device_assert():
    x = torch.randn(2, 8, 4, device="cuda")
    for mode in ("cached", "always"):
        ops.set_index_check(mode)
        with pytest.raises(IndexError, match="entry 8 is out of range"):
            ops.gather_channels(x, torch.tensor([0, 8], device="cuda"), 1)
        with pytest.raises(IndexError, match="negative"):
            ops.gather_weight(
                x, torch.tensor([-1], device="cuda"), torch.tensor([0], device="cuda")
            )
    ops.set_index_check("cached")
    with pytest.raises(RuntimeError, match="same device, got cuda:0 and cpu"):
        ops.gather_channels(x, torch.tensor([0]), 1)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.gather_channels(x, torch.tensor([0.0], device="cuda"), 1)
    # "off": no error, but memory-safe (zeros for out-of-range rows), and the context survives
    ops.set_index_check("off")
    try:
        out = ops.gather_channels(x, torch.tensor([1, 100], device="cuda"), 1)
        torch.cuda.synchronize()
        assert torch.equal(out[:, 0], x[:, 1]) and not out[:, 1].any()
    finally:
        ops.set_index_check("cached")
    assert torch.equal(ops.gather_channels(x, torch.tensor([1], device="cuda"), 1), x[:, 1:2])


@pytest.mark.gpu
def test_cuda_no_host_sync_after_first_use():
    x = torch.randn(8, 64, 28, 28, device="cuda", dtype=torch.float16, requires_grad=True)
    w = torch.randn(128, 64, 3, 3, device="cuda", dtype=torch.float16, requires_grad=True)
    keep_in = torch.randperm(64, device="cuda")[:24]
    keep_out = torch.randperm(128, device="cuda")[:48]
    ops.gather_channels(x, keep_in, 1)  # first use validates (one sync) and caches
    ops.gather_weight(w, keep_out, keep_in)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xk = ops.gather_channels(x, keep_in, 1)
        wk = ops.gather_weight(w, keep_out, keep_in)
        (xk.float().sum() + wk.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and w.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck_cuda(name):
    for op, args in _opcheck_samples("cuda"):
        if op == name:
            torch.library.opcheck(getattr(torch.ops.s2h, name), args)


@pytest.mark.gpu
def test_cuda_channels_last_conv_layer_grad():
    x = torch.randn(4, 32, 14, 14, device="cuda").to(memory_format=torch.channels_last)
    x.requires_grad_()
    keep = torch.randperm(32, device="cuda")[:16]
    out = ops.gather_channels(x, keep, 1)
    out.sum().backward()
    ref = torch.zeros_like(x).index_fill_(1, keep, 1.0)
    torch.testing.assert_close(x.grad, ref)


def test_pattern_table_is_well_formed():
    for case in BAD:
        re.compile(case[4])
