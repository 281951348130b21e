"""ATen ops that users' models reach the numpy backend with after torch.export, each compiled through the
interpreter (so the node dtypes it casts to are checked too) and compared with torch on odd shapes, negative dims
and keepdim both ways.

Tolerances, by kind of operation:
- EXACT (atol = rtol = 0): ops that only move, pick, compare or count values, integer arithmetic, and float ops
  that round once from a value both sides compute exactly (outer, clamp, leaky_relu's one product).
- F32 (rtol 1e-6, about 8 float32 ulp): sums and transcendentals; numpy and torch sum in other orders and round
  exp / log / tanh / sqrt independently. Measured worst: 4.4 ulp (a product of 7), 1.5 (rms_norm), 1.2 (mish).
- F64 (rtol 1e-14, about 45 float64 ulp): the same in float64 (measured worst 1.6 ulp), so a float64 model keeps
  float64 precision: float32 arithmetic anywhere would be off by ~1e-8.
- F16 (rtol 1e-3, one float16 ulp): float16 ops computed in float32 and rounded once, as torch does on the CPU
  (measured: identical); a float32 result an ulp apart near a float16 rounding boundary may round the other way."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

import slimfx

EXACT = dict(rtol=0, atol=0)
F32 = dict(rtol=1e-6, atol=1e-6)
F64 = dict(rtol=1e-14, atol=1e-14)
F16 = dict(rtol=1e-3, atol=1e-3)
TOL = {torch.float32: F32, torch.float64: F64, torch.float16: F16}
inf, nan = math.inf, math.nan
aten = torch.ops.aten


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class Fn1(Fn):
    def forward(self, x):                   # one named input: dynamic=True marks its dims
        return self.fn(x)


def check(fn, *xs, reaches=(), tol=None, dynamic=False):
    """fn compiled to the numpy backend against fn in torch: every output's dtype, shape and values. `reaches`: ops
    the compiled graph must hold, so that the numpy implementation is what runs (not a rewrite of slimfx's)."""
    cm = slimfx.compile((Fn1 if dynamic else Fn)(fn).eval(), xs, backend="numpy", progress=False, dynamic=dynamic)
    held = {n.target for n in cm.graph.graph.nodes if n.op == "call_function"}
    assert set(reaches) <= held, f"not in the compiled graph: {set(reaches) - held}"
    got, want = pytree.tree_leaves(cm(*xs)), pytree.tree_leaves(fn(*xs))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        kw = tol or TOL.get(w.dtype, EXACT)
        torch.testing.assert_close(g, w, equal_nan=True, **kw, msg=lambda m: f"output {i}: {m}")


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def randint(lo, hi, *shape, dtype=torch.int64, seed=0):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- reductions -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_var_and_std_match_torch_over_dims_corrections_and_keepdim(dtype):
    """var.dim / var.correction and the std, var_mean and std_mean forms; correction past N divides by 0 (inf)."""
    x = randn(3, 5, 7, dtype=dtype, scale=3) + 10         # an offset: a one-pass E[x^2] - E[x]^2 would lose digits
    check(lambda x: (x.var(-1), x.var(dim=(0, -1), keepdim=True), x.var(1, unbiased=False), x.var(),
                     x.var(-2, correction=2, keepdim=True), torch.var(x, dim=0, correction=0),
                     x.std(-1), x.std((0, 2), keepdim=True), x.std(), x.std(-3, unbiased=False),
                     torch.var_mean(x, -1), torch.var_mean(x, (0, 2), keepdim=True, correction=0),
                     torch.std_mean(x, 1), torch.std_mean(x), x[:, :1].var(1, correction=3)), x,
          reaches=(aten.var.dim, aten.var.correction, aten.std.dim, aten.std.correction, aten.var_mean.dim,
                   aten.var_mean.correction, aten.std_mean.dim, aten.std_mean.correction))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linalg_vector_norm_matches_torch_for_each_ord(dtype):
    x = randn(3, 5, 7, dtype=dtype)
    x[1, 2, :3] = 0                                          # zeros for ord 0
    ln = torch.linalg.vector_norm
    check(lambda x: (x.norm(dim=-1), x.norm(), ln(x, 1, (0, -1), keepdim=True), ln(x, inf, -2), ln(x, -inf),
                     ln(x, 0, -1), ln(x, 3, 1, keepdim=True), ln(x, 0.5, -1), ln(x, 2, (), keepdim=True),
                     F.normalize(x, dim=-2), ln(x, dtype=torch.float64)), x,
          reaches=(aten.linalg_vector_norm.default, aten.clamp_min.default, aten.expand_as.default))


def test_vector_norm_and_rms_norm_of_float16_compute_in_float32():
    x = randn(4, 9, dtype=torch.float16, scale=4)
    check(lambda x: (torch.linalg.vector_norm(x, dim=-1), F.rms_norm(x, (9,)), F.rms_norm(x, (4, 9), eps=1e-3)), x,
          reaches=(aten.linalg_vector_norm.default, aten.rms_norm.default))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_logsumexp_matches_torch_with_infinite_rows(dtype):
    x = randn(3, 5, 7, dtype=dtype, scale=10)
    x[0, 1] = -inf                                           # an all -inf row: -inf (max taken as 0), not NaN
    x[1, 2, 3] = inf
    check(lambda x: (x.logsumexp(-1), x.logsumexp((0, -1), keepdim=True), x.logsumexp(1, keepdim=True)), x,
          reaches=(aten.logsumexp.default,))
    check(lambda i: i.logsumexp(-1), randint(-5, 5, 3, 7))   # integers: as float32


def test_mean_max_min_amin_argmin_over_all_or_some_dims():
    x = randn(3, 5, 7)
    x[2, 1, 4] = x[2, 1, 0]                                  # a tie: the first index wins in both
    check(lambda x: (x.max(), x.min(), x.amin(-1), x.amin((0, -2), keepdim=True), x.argmin(-2), x.argmin(),
                     x.argmin(1, keepdim=True)), x, tol=EXACT,
          reaches=(aten.max.default, aten.min.default, aten.amin.default, aten.argmin.default))
    check(lambda x: (x.mean(), x.mean(dtype=torch.float64)), x, reaches=(aten.mean.default,))
    i = randint(-50, 50, 3, 5, 7, dtype=torch.int8)
    check(lambda i: (i.max(), i.min(), i.amin(-1, keepdim=True), i.argmin(0)), i)
    with_nan = x.clone()
    with_nan[1, 1, 1] = nan
    check(lambda x: (x.max(), x.min(), x.amin(-1), x.argmin(-1)), with_nan, tol=EXACT)


def test_prod_and_cumprod_match_torch_and_count_integers_in_int64():
    x = randn(3, 5, 7, scale=1.5)
    check(lambda x: (x.prod(-1), x.prod(0, keepdim=True), x.prod(), x.prod(-2, dtype=torch.float64)), x,
          reaches=(aten.prod.dim_int, aten.prod.default))
    # cumprod: torch's CPU kernel keeps each partial product in float64 (acc_type) and rounds it: bit for bit here
    check(lambda x: (x.cumprod(-1), x.cumprod(0), x.cumprod(1, dtype=torch.float64)), x, tol=EXACT,
          reaches=(aten.cumprod.default,))
    i = randint(-4, 5, 3, 5, 7, dtype=torch.int8)           # int8 in, int64 out (no int8 overflow), as in torch
    check(lambda i: (i.prod(-1), i.prod(1, keepdim=True), i.prod(), i.cumprod(-1), (i > 0).prod(0),
                     (i > 0).cumprod(1)), i)


def test_any_all_and_count_nonzero():
    x = randn(3, 5, 7)
    x[0, 0] = 0
    x[1, 2, 3] = nan                                         # NaN is nonzero: true
    b = x > -0.5
    u8 = b.to(torch.uint8)                                   # uint8 in, uint8 out, as in torch
    check(lambda x, b, u8: (b.any(-1), b.all(0, keepdim=True), b.any(), b.all(), x.any(-2), x.all(), b.any((0, 2)),
                            b.all((-1, -2), keepdim=True), u8.any(-1), u8.all(), torch.count_nonzero(x, -1),
                            torch.count_nonzero(b), torch.count_nonzero(b, (0, -1))), x, b, u8,
          reaches=(aten.any.dim, aten.any.default, aten.any.dims, aten.all.dim, aten.all.default, aten.all.dims,
                   aten.count_nonzero.dim_IntList, aten.count_nonzero.default))


# --- normalization ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rms_norm_matches_torch_with_and_without_weight_and_eps(dtype):
    torch.manual_seed(0)
    norm = nn.RMSNorm((5, 7), dtype=dtype)                  # eps None: the dtype's machine epsilon
    nn.init.normal_(norm.weight)
    x = randn(3, 5, 7, dtype=dtype, scale=3)
    w = randn(7, dtype=dtype, seed=1)
    check(lambda x: (F.rms_norm(x, (7,), w, 1e-6), F.rms_norm(x, (7,)), norm(x)), x, reaches=(aten.rms_norm.default,))


def test_hand_written_layer_norm_with_var_matches_torch():
    """What chk_numpy_coverage's "hand LN" writes: (x - mean) / sqrt(var(unbiased=False) + eps)."""
    x = randn(2, 5, 8)
    check(lambda t: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True, unbiased=False) + 1e-5), x,
          reaches=(aten.var.dim,))


# --- elementwise ------------------------------------------------------------------------------------------------
ACTIVATIONS = {  # name: (fn, the ops it must reach)
    "leaky_relu": (lambda x: (F.leaky_relu(x), F.leaky_relu(x, 0.2)), (aten.leaky_relu.default,)),
    "elu": (lambda x: (F.elu(x), F.elu(x, 0.5)), (aten.elu.default,)),
    "hardtanh": (lambda x: (F.hardtanh(x), F.hardtanh(x, -0.5, 2.0), F.relu6(x)),
                 (aten.hardtanh.default, aten.relu6.default)),
    "hardswish": (lambda x: (F.hardswish(x), F.hardsigmoid(x)), (aten.hardswish.default, aten.hardsigmoid.default)),
    "mish": (F.mish, (aten.mish.default,)),
    "glu": (lambda x: (F.glu(x[..., :6], -1), F.glu(x, 0)), (aten.glu.default,)),
    "erfinv": (lambda x: torch.erfinv(x / 8), (aten.erfinv.default,)),   # x / 8 exact; past +-1 NaN, as in torch
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations_match_torch(name, dtype):
    x = randn(4, 3, 7, dtype=dtype, scale=4)
    x[0, 0, :5] = torch.tensor([0.0, -0.0, 25.0, -25.0, 3.0])       # zeros, mish's exp overflow, hardswish's knee
    fn, reaches = ACTIVATIONS[name]
    check(fn, x, reaches=reaches)


def test_leaky_relu_and_hardtanh_are_exact_and_hardtanh_takes_integers():
    x = randn(3, 7, scale=3)
    check(lambda x: (F.leaky_relu(x, 0.1), F.hardtanh(x, -0.5, 2.0), F.relu6(x)), x, tol=EXACT)
    i = randint(-9, 9, 3, 7)
    check(lambda i: (F.hardtanh(i), F.relu6(i), F.hardtanh(i.to(torch.int8), -2, 5)), i)


def test_sign_clamp_min_max_and_non_finite_values():
    x = torch.tensor([[-2.5, -0.0, 0.0, 1e-30, 3.0, nan, inf, -inf]])
    check(lambda x: (torch.sign(x), x.clamp_min(0.1), x.clamp_max(-0.1), x.clamp_min(torch.tensor(1.0)),
                     torch.isinf(x), torch.isfinite(x), torch.nan_to_num(x), torch.nan_to_num(x, 1.0, 2.0, -3.0),
                     torch.nan_to_num(x.double()), torch.nan_to_num(x.half(), posinf=7.0)), x, tol=EXACT,
          reaches=(aten.sign.default, aten.clamp_min.default, aten.clamp_max.default, aten.clamp_min.Tensor,
                   aten.isinf.default, aten.isfinite.default, aten.nan_to_num.default))
    i = torch.tensor([[-7, 0, 3, 127]], dtype=torch.int8)
    check(lambda i: (torch.sign(i), torch.sign(i > 0), i.clamp_min(-1), i.clamp_max(2), (i > 0).clamp_min(0),
                     i.clamp_min(0.5), torch.isinf(i), torch.isfinite(i), torch.nan_to_num(i)), i)


# --- linear algebra ---------------------------------------------------------------------------------------------
def test_outer_is_one_product_per_element_and_exact():
    a, b = randn(5), randn(7, seed=1)
    i, j = randint(-9, 9, 5), randint(-9, 9, 7, seed=1)
    # one product per element, rounded once on both sides; an int64 by float32 outer is float32, as torch promotes
    check(lambda a, b, i, j: (torch.outer(a, b), torch.outer(i, j), torch.outer(i, b), torch.outer(a > 0, b > 0)),
          a, b, i, j, tol=EXACT, reaches=(aten.outer.default,))


# sums of 509 products of unit normals in another order than torch's: the rounding grows with the sum of |terms|
# (~330), not with |y| (~22): eps x 330 is 4e-5 in float32, 7e-14 in float64
LIN_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-13, atol=2e-13)}


def _lin_operands(m, n, k, dtype=torch.float32, lead=()):
    return randn(*lead, m, k, dtype=dtype, seed=m), randn(n, k, dtype=dtype, seed=1), randn(n, dtype=dtype, seed=2)


def _rows_alone(got, x, w, b):
    """Whether every row of ``got`` (linear of x's rows) equals the 1-row call on that row, bit for bit."""
    from slimfx.backends import numpy_ops as N
    rows, n = x.reshape(-1, x.shape[-1]), w.shape[0]
    return all((got.reshape(-1, n)[i] == N.linear(rows[i:i + 1].numpy(), w.numpy(), b.numpy())[0]).all()
               for i in range(rows.shape[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear_of_decode_rows_runs_a_gemv_per_row(dtype):
    """At 2..GEMV_ROWS rows of a weight of GEMV_MIN_BYTES to GEMV_CACHED_BYTES, each row is its own GEMV (OpenBLAS's
    GEMM of a few rows is 2-5x slower there): every row equals its 1-row call bit for bit, which a GEMM's rows do
    not (thousands of float32 outputs differ in the last bits at 2 x 1024 x 512). Odd N and K; a leading batch dim
    (2 sequences x 1 token: 2 rows); torch's values within summation order."""
    from slimfx.backends import numpy_ops as N
    n, k = 1031, 509                                       # 2.1 MB in float32: just over the threshold
    assert N.GEMV_MIN_BYTES <= n * k * 4 and n * k * 8 <= N.GEMV_CACHED_BYTES
    for m, lead in ((2, ()), (3, ()), (N.GEMV_ROWS, ()), (1, (2,))):
        x, w, b = _lin_operands(m, n, k, dtype, lead)
        got = N.linear(x.numpy(), w.numpy(), b.numpy())
        assert _rows_alone(got, x, w, b), (m, lead)
        torch.testing.assert_close(torch.from_numpy(got), F.linear(x, w, b), **LIN_TOL[dtype])
    # a column-major weight, and one with no unit stride (every other column of a wider one: copied once, then
    # as the contiguous weight's rows; numpy's own matmul loop sums a 1-row call on it in another order)
    wide = randn(n, 2 * k, dtype=dtype, seed=3)
    for w, alone in ((wide[:, :k].t().contiguous().t(), None), (wide[:, ::2], wide[:, ::2].contiguous())):
        got = N.linear(x.numpy(), w.numpy(), b.numpy())
        assert _rows_alone(got, x, w if alone is None else alone, b)
        torch.testing.assert_close(torch.from_numpy(got), F.linear(x, w, b), **LIN_TOL[dtype])


@pytest.mark.parametrize("m, n, k", [(5, 1031, 509), (2, 37, 53), (3, 2053, 1031), (2, 1031, 0), (3, 0, 509)])
def test_linear_outside_the_gemv_rows_is_one_product(m, n, k, monkeypatch):
    """More rows than GEMV_ROWS, a small weight, or more than 2 rows of a weight past GEMV_CACHED_BYTES (8.5 MB
    here: each GEMV would read it from memory again) take one GEMM (no per-row GEMVs: a spy on np.dot); empty
    weights give torch's shapes; all give torch's values."""
    import numpy as np

    from slimfx.backends import numpy_ops as N
    x, w, b = _lin_operands(m, n, k)
    calls, dot = [], np.dot
    monkeypatch.setattr(np, "dot", lambda *a, **kw: calls.append(a) or dot(*a, **kw))
    got = N.linear(x.numpy(), w.numpy(), b.numpy())
    assert not calls
    torch.testing.assert_close(torch.from_numpy(got), F.linear(x, w, b), **LIN_TOL[torch.float32])
    if n * k * 4 > N.GEMV_CACHED_BYTES:                  # 2 rows of it still take GEMVs: each reads it once
        x2 = x[:2]
        assert _rows_alone(N.linear(x2.numpy(), w.numpy(), b.numpy()), x2, w, b) and len(calls) == 2


# --- shapes and indexing: exact, as they only move values --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.int8], ids=str)
def test_shape_ops_match_torch(dtype):
    x = randn(3, 5, 7, scale=9).to(dtype)
    check(lambda x: (x.unflatten(1, (5, 1)), x.unflatten(-1, (1, -1)), x.narrow(-1, 2, 4), x.narrow(0, -2, 2),
                     *x.unbind(1), *x.unbind(-1), x[:, :1].expand_as(x),
                     x.flip(-1), x.flip((0, -2)), x.roll(2, -1), x.roll((1, -3), (0, 2)), x.roll(4),
                     x.unfold(-1, 3, 2), x.unfold(1, 2, 1), x.unfold(0, 3, 3)), x, tol=EXACT,
          reaches=(aten.unflatten.int, aten.narrow.default, aten.unbind.int, aten.expand_as.default, aten.flip.default,
                   aten.roll.default, aten.unfold.default))
    # chunk reaches the backend only where the chunked size is symbolic (slimfx makes a static one a split)
    check(lambda x: (*x.chunk(3, -1), *x.chunk(4, 1), *x.chunk(2, 0)), x, tol=EXACT, dynamic=True,
          reaches=(aten.chunk.default,))


def test_argsort_orders_ties_stably_and_matches_torch():
    x = randn(3, 5, 7)
    check(lambda x: (x.argsort(-1), x.argsort(0, descending=True)), x, tol=EXACT,       # no ties
          reaches=(aten.argsort.default,))
    ties = randint(0, 3, 4, 19).float()
    ties[1, 4] = nan                                         # NaN sorts as the largest, as in torch
    check(lambda t: (torch.argsort(t, dim=-1, stable=True), torch.argsort(t, dim=0, descending=True, stable=True)),
          ties, reaches=(aten.argsort.stable,))
    check(lambda i: i.argsort(dim=-1, stable=True), randint(-3, 3, 3, 17, dtype=torch.int32))


def test_one_hot_matches_torch_and_refuses_classes_outside():
    ids = randint(0, 6, 3, 5)
    check(lambda i: (F.one_hot(i, 6), F.one_hot(i, 9), F.one_hot(i[0, 0], 7)), ids, reaches=(aten.one_hot.default,))
    cm = slimfx.compile(Fn(lambda i: F.one_hot(i, 9)).eval(), (ids,), backend="numpy", progress=False)
    with pytest.raises(RuntimeError, match=r"one_hot of 9 classes: index 9 out of range"):
        cm(torch.where(ids == 3, 9, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_weight_norm_matches_torch(dtype, dim):
    """nn.utils.weight_norm's _weight_norm(v, g, dim): the norm over every dim but dim (all of v for -1)."""
    v, g = randn(5, 7, 3, dtype=dtype, seed=1), randn(*([1] * 3), dtype=dtype, seed=2).abs() + 0.5
    if dim != -1:
        g = randn(*[s if d == dim else 1 for d, s in enumerate(v.shape)], dtype=dtype, seed=2)
    check(lambda v, g: torch._weight_norm(v, g, dim), v, g, reaches=[aten._weight_norm.default], tol=TOL[dtype])


@pytest.mark.parametrize("case", [dict(q=(2, 6, 300, 16), kv=(2, 6, 290, 16)),
                                  dict(q=(1, 4, 70, 8), kv=(1, 2, 70, 8), gqa=True, causal=True),
                                  dict(q=(3, 65, 9), kv=(3, 65, 9), mask="bool"),
                                  dict(q=(2, 2, 41, 8), kv=(2, 2, 43, 8), mask="float", dtype=torch.float64),
                                  dict(q=(0, 2, 30, 8), kv=(0, 2, 30, 8)), dict(q=(2, 0, 30, 8), kv=(2, 0, 30, 8))])
def test_sdpa_one_head_at_a_time_gives_the_batched_values(monkeypatch, case):
    """Long attention runs one (batch, head) at a time (SDPA_ONE_HEAD_MIN queries x keys and more): bit for bit the
    values of all heads at once (the same products and steps), with masks (bool, float, one row broadcast over
    heads), causal, grouped keys and values, float64, no batch or no heads; and close to torch's."""
    import slimfx.backends.numpy_ops as N
    g = torch.Generator().manual_seed(0)
    dtype = case.get("dtype", torch.float32)
    q, k, v = (torch.randn(s, generator=g, dtype=dtype) for s in (case["q"], case["kv"], case["kv"]))
    L, S = case["q"][-2], case["kv"][-2]
    mask = None
    if case.get("mask") == "bool":
        mask = torch.rand(case["q"][0], *[1] * (len(case["q"]) - 3), L, S, generator=g) > 0.2
        mask[..., 0] = True
    elif case.get("mask") == "float":
        mask = torch.where(torch.rand(1, 1, L, S, generator=g, dtype=dtype) > 0.3, 0.0, -inf).to(dtype)
        mask[..., 0] = 0
    args = [t.numpy() for t in (q, k, v)] + [None if mask is None else mask.numpy(), 0.0,
                                             case.get("causal", False), None, case.get("gqa", False)]
    monkeypatch.setattr(N, "SDPA_ONE_HEAD_MIN", 1 << 40)
    batched = N.sdpa(*args)
    monkeypatch.setattr(N, "SDPA_ONE_HEAD_MIN", 1)
    one = N.sdpa(*args)
    assert one.dtype == batched.dtype and one.shape == batched.shape and (one == batched).all()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.get("causal", False),
                                         enable_gqa=case.get("gqa", False))
    torch.testing.assert_close(torch.from_numpy(one), ref, **{torch.float32: dict(rtol=1e-5, atol=1e-5),
                                                            torch.float64: F64}[dtype])
