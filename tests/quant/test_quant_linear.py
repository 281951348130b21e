"""Integer GEMM, requantize and the two quantized linears: the torch ops and the numpy backend agree
bit for bit on every integer path, and the float epilogue follows the documented order exactly."""
import sys
import warnings

import numpy as np
import pytest
import torch

import slimfx.backends.numpy_quant  # noqa: F401  (registers the numpy implementations)
from slimfx.backends.optable import NUMPY_OPS
from slimfx.quant import QScheme, qparams_np, quantize_tensor_np
from slimfx.quant import numerics
from slimfx.quant.linear import MAX_K, dequantize_weight_np, dequantize_weight_torch

from qtest_util import assert_exact, sqnr_db, to_np

ops = torch.ops.slimfx


def _np_op(op):
    return NUMPY_OPS[op.default]


# torch._int_mm's path is tested where this CPU's is exact (numerics.int_mm_exact: the probe slimfx runs before
# taking it; where it fails, slimfx keeps the float32 blocks and refuses SLIMFX_CPU_INT_MM=1)
needs_exact_int_mm = pytest.mark.skipif(not numerics.int_mm_exact(), reason="torch._int_mm is not exact on this CPU")


def _spy_int_mm(monkeypatch) -> list:
    """The shapes of the first operand of each torch._int_mm call from here on."""
    shapes, real = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda x, y: shapes.append(tuple(x.shape)) or real(x, y))
    return shapes


def _rand_int8(rng, shape, lo=-128, hi=127):
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


# --- int8 GEMM ----------------------------------------------------------------------------------------

@pytest.fixture(params=["int_mm", "f32_blocks"])
def int_path(request, monkeypatch):
    """Both CPU ways of the exact int8 GEMM (numerics.cpu_int_mm_rows): torch._int_mm and the float32 blocks, each
    checked to be the one that ran (a spy counts torch._int_mm's calls; K < INT_MM_MIN_K never calls it)."""
    use = request.param == "int_mm"
    if use and not numerics.int_mm_exact():
        pytest.skip("torch._int_mm is not exact on this CPU")
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "1" if use else "0")
    calls = _spy_int_mm(monkeypatch)
    ks = []
    yield ks.append                                        # the test names each K it multiplies
    want = [k for k in ks if k >= numerics.INT_MM_MIN_K] if use else []
    got = [shape[-1] for shape in calls]
    assert got == want, f"{request.param}: torch._int_mm called at K = {got}, expected {want}"


@pytest.mark.parametrize("a_shape, n", [((1, 1), 1), ((1, 37), 5), ((13, 33), 7), ((2, 3, 129), 17)])
def test_int8_matmul_exact(a_shape, n, int_path):
    rng = np.random.default_rng(a_shape[-1])
    a, b = _rand_int8(rng, a_shape), _rand_int8(rng, (n, a_shape[-1]))
    want = (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32)
    assert_exact(ops.int8_matmul(torch.from_numpy(a), torch.from_numpy(b)), want, "torch int8_matmul")
    assert_exact(_np_op(ops.int8_matmul)(a, b), want, "numpy int8_matmul")
    int_path(a_shape[-1]), int_path(a_shape[-1])


@pytest.mark.parametrize("k", [1023, 1024, 1025, 2048, 3001])
def test_float32_blocks_exact_at_their_edges(k, int_path):
    """int_matmul sums int8 products in float32 blocks of F32_EXACT_K = 1024: the worst case (-128 * -128 in
    every term: a block sum of exactly 2**24 at K = 1024) and random values stay exact across block edges."""
    assert numerics.F32_EXACT_K == 1024
    rng = np.random.default_rng(k)
    odd = np.full((1, k), -128, np.int8)
    odd[0, -1] = 1                 # (k - 1) * 2**14 + 1: odd, so above 2**24 one float32 sum would round it
    a = np.concatenate([np.full((1, k), -128, np.int8), odd, _rand_int8(rng, (2, k))])
    b = np.concatenate([np.full((1, k), -128, np.int8), odd, _rand_int8(rng, (5, k))])
    want = (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32)
    assert want[0, 0] == k * 2**14 and want[1, 1] == (k - 1) * 2**14 + 1
    assert_exact(numerics.int_matmul_np(a, b), want, "numpy")
    assert_exact(numerics.int_matmul_torch(torch.from_numpy(a), torch.from_numpy(b)), want, "torch")
    assert_exact(numerics.int_matmul_np(a.reshape(2, 2, k), b), want.reshape(2, 2, -1), "numpy, batched")
    int_path(k), int_path(k), int_path(k)


@pytest.mark.parametrize("k", [37, 1500])
def test_int_matmul_exact_over_row_chunks(k, monkeypatch):
    """int_matmul_np converts the weight to float32 a chunk of rows at a time at few rows of activations
    (numerics.row_chunks): with chunks of 3 rows over 11 (the last one short), below and above the float32 block
    length, the result stays exact."""
    monkeypatch.setattr(numerics, "ROW_CHUNK_BYTES", 3 * 4 * k)
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "0")        # the float32 blocks (torch._int_mm takes it whole)
    assert [r.stop - r.start for r in numerics.row_chunks(11, k)] == [3, 3, 3, 2]
    assert numerics.row_chunks(11, k, m=numerics.ROW_CHUNK_MAX_M + 1) == [slice(0, 11)]    # prefill: whole
    rng = np.random.default_rng(k)
    a, b = _rand_int8(rng, (2, 3, k)), _rand_int8(rng, (11, k))
    want = (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32)
    assert_exact(numerics.int_matmul_np(a, b), want, "numpy, row chunks")


# 1 and 6 rows: GEMVs; 10: 2 GEMMs of 5 rows and 8: 8 of 1 (x's batched form); 21: the whole weight
@pytest.mark.parametrize("lead", [(1,), (2, 3), (2, 5), (8, 1), (3, 7)])
@pytest.mark.parametrize("g, sym", [(0, True), (0, False), (16, False)])
def test_weight_only_linear_over_row_chunks(lead, g, sym, monkeypatch):
    """weight_only_linear_np converts the weight a chunk of rows at a time at decode's few rows: chunks of 2 rows
    over 7 (the last 1 row), a per-channel scale multiplied into the product, give what one matmul with the whole
    dequantized weight gives, up to float32 rounding (2e-6 of the output's scale; a row, scale or zero point taken
    from the wrong chunk would be off by its whole size); the same in float16."""
    from slimfx.quant.linear import CHUNK_GEMV_ROWS, weight_only_linear_np
    assert 1 < 6 <= CHUNK_GEMV_ROWS < 10 <= numerics.ROW_CHUNK_MAX_M < 21      # (the paths the lead shapes take)
    monkeypatch.setattr(numerics, "ROW_CHUNK_BYTES", 2 * 4 * 48)
    rng = np.random.default_rng(3)
    if g:
        _, w_q, qp = _w4_groups(rng, 7, 48, g, sym)
        s, z = qp.scale, (None if sym else qp.zero_point)
    else:
        _, w_q, s = _w8(rng, 7, 48)
        z = None if sym else rng.integers(-5, 6, 7).astype(np.int32)
    x, bias = rng.standard_normal((*lead, 48), dtype=np.float32), rng.standard_normal(7, dtype=np.float32)
    want = x.astype(np.float64) @ dequantize_weight_np(w_q, s, z, g).T.astype(np.float64) + bias
    got = weight_only_linear_np(x, w_q, s, z, bias, g)
    assert got.shape == (*lead, 7) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    other = weight_only_linear_np(np.asfortranarray(x), w_q, s, z, bias, g)     # (another layout: BLAS may sum
    assert np.abs(other - want).max() <= 2e-6 * np.abs(want).max()              # it in another order)
    half = weight_only_linear_np(x.astype(np.float16), w_q, s, z, bias, g)
    assert half.dtype == np.float16          # (x rounded to float16 first: 1e-3 of the output's scale)
    assert np.abs(half - want).max() <= 1e-2 * np.abs(want).max()


def test_int32_accumulator_exact_at_the_largest_k(int_path):
    # -128 * -128 summed MAX_K times is 2**31 - 2**14: the largest accumulator the int32 contract allows
    a = np.full((1, MAX_K), -128, np.int8)
    b = np.concatenate([np.full((1, MAX_K), -128, np.int8), np.full((1, MAX_K), 127, np.int8)])
    want = np.array([[MAX_K * 16384, -MAX_K * 16256]], np.int64)
    assert want.max() < 2**31
    assert_exact(numerics.int_matmul_np(a, b), want.astype(np.int32), "numpy")
    assert_exact(numerics.int_matmul_torch(torch.from_numpy(a), torch.from_numpy(b)), want.astype(np.int32), "torch")
    int_path(MAX_K), int_path(MAX_K)


@needs_exact_int_mm
def test_int_mm_path_takes_any_layout(monkeypatch):
    """torch._int_mm's path (numerics.cpu_int_mm_rows) multiplies what numpy hands it as it is: a read-only weight (as
    loaded from disk) without a warning, column-sliced and transposed views, no rows or columns, one of each;
    exact. Below INT_MM_MIN_K it is not called: at K = 1 torch 2.11 and 2.13 return uninitialized memory."""
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "1")
    calls = _spy_int_mm(monkeypatch)
    rng = np.random.default_rng(7)
    ro = _rand_int8(rng, (9, 21))
    ro.flags.writeable = False
    cases = [(_rand_int8(rng, (3, 21)), ro), (_rand_int8(rng, (2, 5, 40))[..., ::2], _rand_int8(rng, (9, 40))[:, 1::2]),
             (_rand_int8(rng, (17, 6)).T, _rand_int8(rng, (17, 8)).T),
             (_rand_int8(rng, (0, 16)), _rand_int8(rng, (3, 16))), (_rand_int8(rng, (2, 16)), _rand_int8(rng, (0, 16))),
             (_rand_int8(rng, (1, 16)), _rand_int8(rng, (1, 16)))]
    v = _rand_int8(rng, 24)                # one-row weights whose row has stride 0 (numpy calls them C-contiguous)
    cases += [(_rand_int8(rng, (3, 24)), v[None]), (_rand_int8(rng, (2, 24)), np.broadcast_to(v, (1, 24))),
              (_rand_int8(rng, (1, 24))[[0, 0]][:1], np.atleast_2d(v))]
    for a, b in cases:
        want = (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = numerics.int_matmul_np(a, b)
        assert_exact(got, want, f"numpy, a {a.shape} {a.strides}, b {b.shape} {b.strides}")
        assert_exact(numerics.int_matmul_torch(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()).T.T), want,
                     "torch")
    tv = torch.from_numpy(v).as_strided((1, 24), (0, 1))                    # torch's own stride-0 row
    ta = torch.from_numpy(_rand_int8(rng, (4, 24)))
    assert_exact(numerics.int_matmul_torch(ta, tv), (ta.long() @ tv.long().T).int(), "torch, stride-0 row")
    assert len(calls) == 2 * len(cases) + 1
    for k in (0, 1, numerics.INT_MM_MIN_K - 1):                      # the float32 blocks: exact at K = 1 too
        a, b = _rand_int8(rng, (5, k)), _rand_int8(rng, (3, k))
        assert_exact(numerics.int_matmul_np(a, b), (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32), k)
    assert len(calls) == 2 * len(cases) + 1


@needs_exact_int_mm
def test_int_mm_flipped_form_exact(monkeypatch):
    """At 2..16 rows of a and a weight of INT_MM_FLIP_BYTES or more (lowered here to 64), _int_mm times a @ b.T
    against (b @ a.T).T on the first call for each weight shape and keeps the faster: both forms, forced, give the
    exact result on both paths; one row never flips; the first call records its choice."""
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "1")
    monkeypatch.setattr(numerics, "INT_MM_FLIP_BYTES", 64)
    monkeypatch.setattr(numerics, "_int_mm_flip", {})
    rng = np.random.default_rng(11)
    b = _rand_int8(rng, (9, 20))
    shapes = _spy_int_mm(monkeypatch)
    for rows in (1, 2, 5):
        a = _rand_int8(rng, (rows, 20))
        want = (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32)
        for flip in (None, False, True):
            numerics._int_mm_flip.clear()
            key = (9, 20, torch.get_num_threads())       # the torch path times on the caller's threads
            if flip is not None:
                numerics._int_mm_flip[key] = numerics._int_mm_flip[(9, 20, 1)] = flip
            shapes.clear()
            got = numerics.int_matmul_np(a, b)
            assert_exact(got, want, f"numpy, {rows} rows, flip {flip}")
            got_t = numerics.int_matmul_torch(torch.from_numpy(a), torch.from_numpy(b))
            assert_exact(got_t, want, "torch")
            assert got.flags.c_contiguous and got_t.is_contiguous()       # row-major, as the op's fake says
            if rows == 1:
                assert shapes == [(1, 20)] * 2 and (flip is not None or not numerics._int_mm_flip)
            elif flip is None:
                assert key in numerics._int_mm_flip and (9, 20) in shapes and (rows, 20) in shapes
            else:
                assert shapes == [(9, 20) if flip else (rows, 20)] * 2
                torch.library.opcheck(ops.int8_matmul.default, (torch.from_numpy(a), torch.from_numpy(b)))


@needs_exact_int_mm
def test_cpu_int_mm_choice(monkeypatch):
    """SLIMFX_CPU_INT_MM forces the choice (1: every row count, 0: none) and a value that is neither is refused by
    name; unset, it is measured once (cached: the second call does not measure again), leaving the caller's torch
    thread count as it was, and the row limit is what the int_matmul functions follow."""
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "yes")
    with pytest.raises(ValueError, match="SLIMFX_CPU_INT_MM='yes'"):
        numerics.cpu_int_mm_rows()
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "0")
    assert numerics.cpu_int_mm_rows() == 0
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "1")
    assert numerics.cpu_int_mm_rows() >= 2**31
    monkeypatch.delenv(numerics.CPU_INT_MM_ENV)
    monkeypatch.setattr(numerics, "_cpu_int_mm_rows", None)
    measured, real = [], numerics._measure_cpu_int_mm
    monkeypatch.setattr(numerics, "_measure_cpu_int_mm", lambda: measured.append(1) or real())
    threads = torch.get_num_threads()
    first = numerics.cpu_int_mm_rows()
    assert first in (0, numerics.INT_MM_DECODE_ROWS, sys.maxsize)
    assert numerics.cpu_int_mm_rows() == first and measured == [1] and torch.get_num_threads() == threads
    monkeypatch.setattr(numerics, "_cpu_int_mm_rows", 3)                     # up to 3 rows of a
    calls = _spy_int_mm(monkeypatch)
    rng = np.random.default_rng(1)
    b = _rand_int8(rng, (5, 32))
    for rows in (1, 3, 4):
        a = _rand_int8(rng, (rows, 32))
        assert_exact(numerics.int_matmul_np(a, b), (a.astype(np.int64) @ b.astype(np.int64).T).astype(np.int32), rows)
    assert [shape[0] for shape in calls] == [1, 3]


@pytest.mark.parametrize("wrong", ["plain", "flipped"])
def test_cpu_int_mm_probe_refuses_a_wrong_int_mm(wrong, monkeypatch):
    """The measurement takes torch._int_mm only where it is exact in both of _int_mm's forms: one off by one in
    a single product sum (plain: a @ w.T; flipped: (w @ a.T).T, its first operand the weight's 1024 rows) is
    never used, however fast."""
    real = torch._int_mm

    def off(x, y):
        out = real(x, y)
        if (x.shape[0] == 1024) == (wrong == "flipped"):
            out[0, 0] += 1
        return out
    monkeypatch.setattr(torch, "_int_mm", off)
    monkeypatch.setattr(numerics, "_int_mm_exact", None)
    assert numerics._measure_cpu_int_mm() == 0 and numerics.int_mm_exact() is False
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, "1")                  # forced on, it is refused by name
    with pytest.raises(ValueError, match="SLIMFX_CPU_INT_MM=1, but torch._int_mm is not exact on this CPU"):
        numerics.int_matmul_np(_rand_int8(np.random.default_rng(0), (2, 32)), _rand_int8(np.random.default_rng(1),
                                                                                          (3, 32)))


# --- requantize ---------------------------------------------------------------------------------------

def test_requantize_exact_and_half_even():
    acc = np.array([[1, 3, 5, -1, -3, 1000, -1000]], np.int32)
    m = np.float32(0.5)
    want = np.array([[0, 2, 2, 0, -2, 127, -128]], np.int8)
    assert_exact(ops.requantize(torch.from_numpy(acc), torch.tensor(m), None, -128, 127), want, "torch")
    assert_exact(_np_op(ops.requantize)(acc, m, None, -128, 127), want, "numpy")


def test_requantize_random_per_channel_with_zero_point():
    rng = np.random.default_rng(5)
    acc = rng.integers(-2**20, 2**20, size=(9, 13)).astype(np.int32)
    m = rng.uniform(1e-6, 1e-4, size=(1, 13)).astype(np.float32)
    z = rng.integers(-10, 10, size=(1, 13)).astype(np.int32)
    t = ops.requantize(torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(z), -128, 127)
    assert_exact(t, _np_op(ops.requantize)(acc, m, z, -128, 127), "requantize torch vs numpy")


# --- quantized_linear ---------------------------------------------------------------------------------

def _w8(rng, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    qp = qparams_np(w, QScheme(granularity="channel"))
    return w, quantize_tensor_np(w, QScheme(granularity="channel"), qp), qp.scale.reshape(n)


SHAPES = [((1, 33), 7), ((5, 1), 3), ((3, 4, 37), 1), ((17, 129), 65)]


@pytest.mark.parametrize("x_shape, n", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dynamic_quantized_linear_torch_equals_numpy(x_shape, n, with_bias):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(x_shape) * 3).astype(np.float32)
    _, w_q, w_s = _w8(rng, n, x_shape[-1])
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    t = ops.quantized_linear(torch.from_numpy(x), torch.from_numpy(w_q), torch.from_numpy(w_s),
                             None if bias is None else torch.from_numpy(bias))
    y = _np_op(ops.quantized_linear)(x, w_q, w_s, bias, None)
    assert_exact(t, y, "quantized_linear torch vs numpy")
    assert y.shape == x_shape[:-1] + (n,) and y.dtype == np.float32


@pytest.mark.parametrize("x_shape, n", SHAPES, ids=str)
def test_quantized_linear_follows_the_documented_order(x_shape, n):
    """Independent recomputation: int64 accumulator, then fp32(acc) * (s_x * s_w) + bias."""
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    _, w_q, w_s = _w8(rng, n, x_shape[-1])
    bias = rng.standard_normal(n).astype(np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    s_x = np.maximum(amax / np.float32(127), np.float32(numerics.MIN_SCALE))
    q_x = np.clip(np.round(x / s_x), -127, 127).astype(np.int64)
    acc = np.einsum("...k,nk->...n", q_x, w_q.astype(np.int64))
    want = acc.astype(np.float32) * (s_x * w_s) + bias
    got = _np_op(ops.quantized_linear)(x, w_q, w_s, bias, None)
    assert_exact(got, want, "numpy vs independent recomputation")
    got_t = ops.quantized_linear(*(torch.from_numpy(a) for a in (x, w_q, w_s, bias)))
    assert_exact(got_t, want, "torch vs independent recomputation")


@pytest.mark.parametrize("per_token", [True, False])
def test_static_int8_activations(per_token):
    rng = np.random.default_rng(7)
    q_x = _rand_int8(rng, (2, 3, 45), -127, 127)
    s_x = (rng.uniform(0.01, 0.1, (2, 3, 1)) if per_token else np.float32(0.03)).astype(np.float32)
    _, w_q, w_s = _w8(rng, 11, 45)
    y_t = ops.quantized_linear(torch.from_numpy(q_x), torch.from_numpy(w_q), torch.from_numpy(w_s), None,
                               torch.as_tensor(s_x))
    y_n = _np_op(ops.quantized_linear)(q_x, w_q, w_s, None, np.asarray(s_x))
    assert_exact(y_t, y_n, "static quantized_linear")
    # feeding the op its own per-token quantization reproduces the dynamic path exactly
    x = rng.standard_normal((4, 45)).astype(np.float32)
    q, s = ops.quantize_per_token(torch.from_numpy(x))
    assert_exact(ops.quantized_linear(q, torch.from_numpy(w_q), torch.from_numpy(w_s), None, s),
                 ops.quantized_linear(torch.from_numpy(x), torch.from_numpy(w_q), torch.from_numpy(w_s)),
                 "quantize_per_token + static == dynamic")


def test_quantized_linear_sqnr_vs_float():
    # two int8 roundings (x per token, w per channel), each ~40 dB on Gaussian data, add to ~37-38 dB
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    w, w_q, w_s = _w8(rng, 64, 256)
    got = sqnr_db(x @ w.T, _np_op(ops.quantized_linear)(x, w_q, w_s, None, None))
    assert got >= 34.0, f"W8A8 linear: {got:.2f} dB"


def test_quantized_linear_keeps_float_dtype():
    rng = np.random.default_rng(9)
    _, w_q, w_s = _w8(rng, 6, 20)
    x = torch.randn(3, 20, dtype=torch.bfloat16)
    y = ops.quantized_linear(x, torch.from_numpy(w_q), torch.from_numpy(w_s))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_scale=np.ones((6, 1), np.float32)), "w_scale must have shape"),
    (dict(x=np.ones((2, 19), np.float32)), "does not end in K=20"),
    (dict(bias=np.ones(5, np.float32)), "bias must have shape"),
    (dict(x=np.ones((2, 20), np.int8)), "needs x_scale"),
    (dict(x_scale=np.ones((2, 1), np.float32)), "pass x_scale=None"),
])
def test_quantized_linear_errors_name_the_argument(kwargs, match):
    args = dict(x=np.ones((2, 20), np.float32), w_q=np.ones((6, 20), np.int8), w_scale=np.ones(6, np.float32),
                bias=None, x_scale=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _np_op(ops.quantized_linear)(**args)
    with pytest.raises(ValueError, match=match):
        ops.quantized_linear(**{k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in args.items()})


# --- weight_only_linear -------------------------------------------------------------------------------

def _w4_groups(rng, n, k, g, symmetric):
    w = rng.standard_normal((n, k)).astype(np.float32)
    scheme = QScheme(bits=4, symmetric=symmetric, granularity="group", group_size=g)
    qp = qparams_np(w, scheme)
    return w, quantize_tensor_np(w, scheme, qp), qp


@pytest.mark.parametrize("n, k, g, sym", [(5, 33, 11, True), (3, 48, 16, False), (1, 7, 7, False), (8, 64, 0, True)])
def test_weight_only_dequantized_weight_exact(n, k, g, sym):
    rng = np.random.default_rng(k)
    if g:
        _, w_q, qp = _w4_groups(rng, n, k, g, sym)
        s, z = qp.scale, (None if sym else qp.zero_point)
    else:
        _, w_q, s = _w8(rng, n, k)
        z = None
    wn = dequantize_weight_np(w_q, s, z, g)
    wt = dequantize_weight_torch(torch.from_numpy(w_q), torch.from_numpy(s),
                                 None if z is None else torch.from_numpy(z), g)
    assert_exact(wt, wn, "dequantized weight")
    # and it is the scheme-level dequantization, element by element
    expanded = np.repeat(s, g, axis=-1) if g else s[:, None]
    zz = 0 if z is None else (np.repeat(z, g, axis=-1) if g else z[:, None])
    assert_exact(wn, numerics.dequantize_np(w_q, expanded, zz), "vs scheme dequantize")


@pytest.mark.parametrize("m, n, k, g", [(1, 5, 33, 11), (7, 3, 48, 16), (4, 9, 256, 128)])
def test_weight_only_linear_close_to_float64(m, n, k, g):
    rng = np.random.default_rng(m * k)
    _, w_q, qp = _w4_groups(rng, n, k, g, symmetric=False)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    w = dequantize_weight_np(w_q, qp.scale, qp.zero_point, g).astype(np.float64)
    ref = x.astype(np.float64) @ w.T + bias
    # an fp32 dot product of length k (any summation order) is within k * 2**-24 * sum|x||w| of exact, plus
    # one rounding for the bias add and one for the result
    bound = (k + 2) * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).T + np.abs(bias))
    yn = _np_op(ops.weight_only_linear)(x, w_q, qp.scale, qp.zero_point, bias, g)
    yt = to_np(ops.weight_only_linear(*(torch.from_numpy(a) for a in (x, w_q, qp.scale, qp.zero_point, bias)), g))
    for name, y in (("numpy", yn), ("torch", yt)):
        err = np.abs(y - ref)
        assert (err <= bound).all(), f"{name}: max err {err.max():.3e} exceeds bound at {np.argmax(err - bound)}"


def test_weight_only_int4_grouped_sqnr():
    # int4 groups of 128 on Gaussian weights is ~18.5 dB per weight (see test_quant_uniform); a dot product
    # over 512 independent errors keeps the same signal-to-noise ratio
    rng = np.random.default_rng(11)
    w, w_q, qp = _w4_groups(rng, 32, 512, 128, symmetric=True)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    got = sqnr_db(x @ w.T, _np_op(ops.weight_only_linear)(x, w_q, qp.scale, None, None, 128))
    assert got >= 16.5, f"W4 g128 linear: {got:.2f} dB"


@pytest.mark.parametrize("scale_shape, g, match", [
    ((4, 3), 16, "group_size=16 does not divide K=40"),
    ((4, 3), 8, r"w_scale must have shape \(4, 5\)"),
    ((4, 1), 0, r"w_scale must have shape \(4,\)"),
])
def test_weight_only_linear_group_errors(scale_shape, g, match):
    x, w_q, s = np.ones((2, 40), np.float32), np.ones((4, 40), np.int8), np.ones(scale_shape, np.float32)
    with pytest.raises(ValueError, match=match):
        _np_op(ops.weight_only_linear)(x, w_q, s, None, None, g)
    with pytest.raises(ValueError, match=match):
        ops.weight_only_linear(torch.from_numpy(x), torch.from_numpy(w_q), torch.from_numpy(s), None, None, g)
