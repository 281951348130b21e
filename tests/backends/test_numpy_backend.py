import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from conftest import rel_err
from slimfx.backends.numpy_backend import UnsupportedOpError


class CumMax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, 1).values + 1


def test_missing_op_names_the_op_and_the_node():
    with pytest.raises(UnsupportedOpError, match=r"aten\.cummax\.\w+ \(node cummax"):
        slimfx.compile(CumMax(), (torch.randn(4, 5),), backend="numpy", progress=False)
    # the torch backend runs it
    cm = slimfx.compile(CumMax(), (torch.randn(4, 5),), backend="torch", progress=False)
    x = torch.randn(4, 5)
    assert torch.equal(cm(x), torch.cummax(x, 1).values + 1)


def test_bfloat16_model_is_refused_with_what_to_do():
    m = nn.Linear(6, 3).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"cannot hold torch\.bfloat16 tensors.*model\.float\(\).*backend='torch'"):
        slimfx.compile(m, (torch.randn(2, 6, dtype=torch.bfloat16),), backend="numpy", progress=False)


class Ops(nn.Module):
    """A grab bag of ops the numpy table implements, on odd shapes, with torch's type promotion."""
    def forward(self, x, idx, mask):
        a = F.softmax(x, dim=-1).masked_fill(mask, 0.0)
        b = torch.gather(x, 1, idx) * 0.5
        c, d = torch.split(x, [2, 5], dim=1)
        e = torch.cat([c, d.cumsum(1)], 1)
        f = x[idx[:, 1] % 3].permute(1, 0).contiguous().reshape(-1)[:7]
        g = (idx * 0.5).sum(dim=1, keepdim=True)       # int64 * float -> float32, as torch promotes
        h = torch.where(x > 0, F.silu(x), torch.rsqrt(x.abs() + 1))
        return a, b, e, f, g, h, torch.tril(x[:, :3])


def test_ops_match_torch_on_odd_shapes():
    x = torch.randn(3, 7)
    idx = torch.tensor([[0, 6], [2, 2], [5, 1]])
    mask = torch.rand(3, 7) > 0.5
    cm = slimfx.compile(Ops(), (x, idx, mask), backend="numpy", progress=False)
    for got, want in zip(cm(x, idx, mask), Ops()(x, idx, mask)):
        assert got.dtype == want.dtype and got.shape == want.shape
        # fp32 elementwise math in numpy vs torch: a few ulp (exp, rsqrt, softmax's division)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_call_time_input_errors(minilm):
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    cm = slimfx.compile(minilm, (), dict(input_ids=ids, attention_mask=mask), dynamic=True, progress=False)
    with pytest.raises(slimfx.InputError, match="'input_ids' has dtype torch.float32, expected torch.int64"):
        cm(ids.float(), mask)
    with pytest.raises(slimfx.InputError, match="'attention_mask' dim 1 is 5, but 'input_ids' dim 1 is 12"):
        cm(ids, mask[:, :5])
    with pytest.raises(slimfx.InputError, match=r"missing input\(s\) \['attention_mask'\]"):
        cm(ids)
    with pytest.raises(slimfx.InputError, match=r"input\(s\) \['token_type_ids'\] were not given at compile"):
        cm(ids, mask, token_type_ids=torch.zeros_like(ids))
    # export keeps the sequence >= 2 (BERT's mask code branches on a length of 1); torch 2.11's export also
    # bounds it by BERT's 512 positions, 2.13's leaves it unbounded
    with pytest.raises(slimfx.InputError, match=r"'input_ids' dim 1 is 1, outside the compiled range "
                                                r"\[2, (inf|512)\]"):
        cm(ids[:, :1], mask[:, :1])
    # past BERT's 512 positions the graph itself cannot run: refused up front where export bounded the length,
    # else the failing node is named, with its error
    long = torch.zeros(1, 600, dtype=torch.long)
    with pytest.raises((RuntimeError, slimfx.InputError),
                       match=r"numpy backend: node expand\w* \(aten.expand.default\) failed|"
                             r"'input_ids' dim 1 is 600, outside the compiled range \[2, 512\]"):
        cm(long, torch.ones_like(long))
    with pytest.raises(slimfx.InputError, match="has 1 dims"):
        cm(ids[0], mask)
    with pytest.raises(slimfx.InputError, match="input 'input_ids' must be a tensor, got list"):   # not a TreeSpec dump
        cm(ids.tolist(), mask)
    static = slimfx.compile(minilm, (), dict(input_ids=ids, attention_mask=mask), progress=False)
    with pytest.raises(slimfx.InputError, match="compiled static at 12"):
        static(ids[:, :8], mask[:, :8])


def test_a_forward_taking_star_args_is_called_as_compiled():
    """forward(self, x, *rest): the compiled model refused the very inputs it was compiled with (the starred ones
    arrived as one nested tuple)."""
    class Star(nn.Module):
        def forward(self, x, *rest):
            return x * 2 + rest[0] - rest[1]

    x, y, z = torch.randn(3), torch.randn(3), torch.randn(3)
    cm = slimfx.compile(Star(), (x, y, z), progress=False)
    assert torch.equal(cm(x, y, z), Star()(x, y, z))
    with pytest.raises(slimfx.InputError):
        cm(x, y)


def test_linear_with_a_vector_weight():
    """F.linear(h, w) with w of shape (K,) (torch allows it) failed to reshape on numpy, and the report's layer
    table raised IndexError formatting its "out x in"."""
    class Vec(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, h):
            return F.linear(h, self.w)

    m, h = Vec().eval(), torch.randn(2, 3, 8)
    cm = slimfx.compile(m, (h,), progress=False)
    assert torch.allclose(cm(h), m(h), atol=1e-6) and cm(h).shape == (2, 3)
    assert cm.report().layers()[0]["out x in"] == "8" and "linear" in str(cm.report())


@pytest.mark.parametrize("flag", ["1", "0"])
def test_report_names_the_cpu_int8_gemm(flag, monkeypatch):
    """The layer table says what multiplies each W8A8 layer on numpy: torch._int_mm or the float32 blocks
    (SLIMFX_CPU_INT_MM forces one), the blocks for K < 16 always; float layers stay "numpy dense"."""
    from slimfx import passes as P
    from slimfx.quant import numerics
    if flag == "1" and not numerics.int_mm_exact():
        pytest.skip("torch._int_mm is not exact on this CPU")
    monkeypatch.setenv(numerics.CPU_INT_MM_ENV, flag)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(37, 20), nn.ReLU(), nn.Linear(20, 8), nn.Linear(8, 5)).eval()
    x = torch.randn(3, 37)
    cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="dynamic", exclude="2")],
                        progress=False)
    kernels = [r["kernel"] for r in cm.report().layers()]
    gemm = "torch._int_mm" if flag == "1" else "float32 blocks"
    # K = 37; module 2 kept float; K = 8 < 16
    assert kernels == [f"numpy int8 GEMM: {gemm}", "numpy dense", "numpy int8 GEMM: float32 blocks"], kernels


def test_bitwise_ops_and_a_narrow_gather_match_torch():
    """Integer &, |, ^, ~ ran as logical ops (5 & 3 gave 1, ~5 gave 0, silently); a gather index smaller than x
    in another dim was broadcast over x (shape (4, 3) for torch's (1, 3)). With the reductions added since."""
    class Ops(nn.Module):
        def forward(self, a, b, m, x, idx):
            return (a & b, a | b, a ^ b, ~a, a & 6, m & (a > 5), ~m, torch.gather(x, 1, idx),
                    x.sum(), a.sum(), torch.argmax(x, 1), torch.argmax(x), (x / (x - 3)).isnan(),
                    F.log_softmax(x, -1))

    a, b = torch.tensor([5, 6, 7, 12, -3]), torch.tensor([3, 3, 3, 10, 7])
    m, idx = torch.tensor([True, False, True, True, False]), torch.tensor([[0, 4, 2]])
    x = torch.arange(20.0).reshape(4, 5)
    cm = slimfx.compile(Ops().eval(), (a, b, m, x, idx), progress=False)
    for got, want in zip(cm(a, b, m, x, idx), Ops()(a, b, m, x, idx)):
        assert got.dtype == want.dtype and (torch.equal(got, want) or torch.allclose(got, want, atol=1e-6))


def test_python_ints_beyond_an_integer_dtype_wrap_as_in_torch():
    """torch casts a Python int operand to an int8/uint8 tensor's dtype with wraparound (x < 200 compares with
    -56, x + 200 adds -56); numpy compared the true values (silently other booleans) and refused the sums."""
    class Ops(nn.Module):
        def forward(self, x, u):
            return (x < 200, x > -300, x == 356, x + 200, x - 300, x * 1000, u < 300, u + 511, x <= 100, x * 3)

    x = torch.tensor([[-5, 100, 127, -128]], dtype=torch.int8)
    u = torch.tensor([0, 7, 255, 44], dtype=torch.uint8)
    cm = slimfx.compile(Ops().eval(), (x, u), progress=False)
    for got, want in zip(cm(x, u), Ops()(x, u)):
        assert got.dtype == want.dtype and torch.equal(got, want), (got, want)


def test_zero_dim_outputs_keep_their_shape():
    """np.ascontiguousarray makes a 0-d array 1-d: y.sum() came back with shape (1,) where torch gives ()."""
    class Sums(nn.Module):
        def forward(self, y):
            return y.sum(), {"peak": y.amax(dim=(0, 1))}, (y * y).sum() / 12

    y = torch.randn(3, 4)
    cm = slimfx.compile(Sums().eval(), (y,), progress=False)
    got, want = cm(y), Sums()(y)
    assert [t.shape for t in (got[0], got[1]["peak"], got[2])] == [torch.Size([])] * 3
    torch.testing.assert_close(got, want)


def test_float64_models_keep_float64_precision():
    """SDPA's scale, tanh-GELU's and LayerNorm's constants were float32: a float64 model on numpy was off by
    ~1e-8 (float32's precision) where its other ops agree with torch to a few float64 ulp."""
    class Block(nn.Module):
        def forward(self, q, k, v, x):
            return (F.scaled_dot_product_attention(q, k, v), F.gelu(x, approximate="tanh"),
                    F.layer_norm(x, (x.shape[-1],), eps=1e-5))

    torch.manual_seed(0)
    args = (torch.randn(2, 3, 7, 16, dtype=torch.float64), torch.randn(2, 3, 7, 16, dtype=torch.float64),
            torch.randn(2, 3, 7, 16, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64) * 3)
    cm = slimfx.compile(Block().eval(), args, progress=False)
    for got, want in zip(cm(*args), Block()(*args)):
        assert got.dtype == torch.float64 and (got - want).abs().max() < 1e-13     # ~5 ulp of values ~1-10


def test_out_of_range_indices_fail_as_in_torch():
    """np.take wraps a negative index around (id -1 would read the last embedding row); torch refuses it."""
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)

        def forward(self, ids, idx):
            return self.emb(ids) + torch.index_select(self.emb.weight, 0, idx).sum(0)

    m, ids, idx = Lookup().eval(), torch.tensor([[0, 10, 3]]), torch.tensor([1, 2])
    cm = slimfx.compile(m, (ids, idx), progress=False, dynamic=True)
    assert torch.equal(cm(ids, idx), m(ids, idx))
    for bad_ids, bad_idx, what in [([[0, -1, 3]], [1, 2], r"embedding of 11 rows: index -1 out of range \[0, 11\)"),
                                   ([[0, 11, 3]], [1, 2], "embedding of 11 rows: index 11 out of range"),
                                   ([[0, 1, 3]], [-2, 2], "index_select along dim 0: index -2 out of range")]:
        with pytest.raises(IndexError):
            m(torch.tensor(bad_ids), torch.tensor(bad_idx))
        with pytest.raises(RuntimeError, match=what):
            cm(torch.tensor(bad_ids), torch.tensor(bad_idx))


def test_gelu_erf_is_within_its_absolute_bound():
    import numpy as np
    from scipy import special

    from slimfx.backends.numpy_ops import erf_abs_f32
    x = np.concatenate([np.linspace(-6, 6, 100001, dtype=np.float32), np.float32([0.0, -0.0, 1e-30, 40.0, -40.0])])
    ref = special.erf(x.astype(np.float64))
    # Abramowitz & Stegun 7.1.26 is within 1.5e-7 of erf; fp32 evaluation adds a few ulp of 1.0 (6e-8 each)
    assert np.abs(erf_abs_f32(x) - ref).max() < 1e-6


def test_gelu_numpy_matches_torch_both_forms():
    from slimfx.backends.numpy_ops import gelu
    x = torch.randn(1003) * 4
    for approx in ("none", "tanh"):
        got = torch.from_numpy(gelu(x.numpy().copy(), approximate=approx))
        # fp32 GELU: the erf approximation (1e-6 abs) and ulp-level differences in tanh/exp
        assert torch.allclose(got, F.gelu(x, approximate=approx), rtol=1e-5, atol=2e-6), approx


# --- ops of MoE routing and T5: each against torch, exactly (they select, count and index; no rounding) ----------
def _np(name):
    from slimfx.backends import numpy_ops, numpy_reduce
    return getattr(numpy_ops, name, None) or getattr(numpy_reduce, name)


def _ties(shape, dtype, seed):
    """Values from a handful of levels: most entries tie with many others. Floats get NaN and -inf too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, shape, generator=g).to(dtype)
    if dtype.is_floating_point:
        x.view(-1)[::7] = float("nan")
        x.view(-1)[3::11] = float("-inf")
    return x


SORT_DTYPES = [torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", SORT_DTYPES)
def test_sort_is_torchs_stable_sort_with_ties_and_nan(dtype):
    sort = _np("sort")
    for shape, dim in (((1, 1), -1), ((3, 37), -1), ((37, 5), 0), ((2, 19, 3), 1), ((), 0)):
        x = _ties(shape, dtype, seed=len(shape) + dim)
        for descending in (False, True):
            v, i = sort(x.numpy(), dim, descending)
            want = torch.sort(x, dim=dim, descending=descending, stable=True)
            assert torch.equal(torch.from_numpy(i), want.indices), (shape, dim, descending)
            assert torch.equal(torch.from_numpy(v), want.values) or dtype.is_floating_point and \
                torch.equal(torch.from_numpy(v).nan_to_num(7), want.values.nan_to_num(7))
            # torch's unstable sort (past 16 elements) orders ties otherwise, but its values are the same
            assert torch.equal(torch.from_numpy(v).nan_to_num(7), torch.sort(x, dim, descending).values.nan_to_num(7))


@pytest.mark.parametrize("dtype", SORT_DTYPES[:-1])
def test_topk_matches_torch_values_and_breaks_ties_lowest_index_first(dtype):
    topk = _np("topk")
    for shape, dim, k in (((1, 1), -1, 1), ((3, 37), -1, 5), ((37, 5), 0, 37), ((2, 19, 3), 1, 2)):
        x = _ties(shape, dtype, seed=k)
        for largest in (True, False):
            v, i = topk(x.numpy(), k, dim, largest)
            want = torch.topk(x, k, dim, largest)
            assert torch.equal(torch.from_numpy(v).nan_to_num(7), want.values.nan_to_num(7)), (shape, largest)
            # ties: the first k of the stable sort (torch's CPU topk picks among ties arbitrarily; see numpy_ops)
            stable = torch.sort(x, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
            assert torch.equal(torch.from_numpy(i), stable)
    # without ties the indices are torch's too
    x = torch.randn(5, 33)
    for largest in (True, False):
        assert torch.equal(torch.from_numpy(topk(x.numpy(), 4, 1, largest)[1]), torch.topk(x, 4, 1, largest).indices)
    assert topk(np.float32([0.25, 0.25, 0.25, 0.25]), 2)[1].tolist() == [0, 1]     # torch on CPU: [2, 3]


def test_histc_bins_edges_and_range_rules_match_torch():
    histc = _np("histc")
    nan, inf = float("nan"), float("inf")
    cases = [  # (values, bins, min, max)
        ([0.0, 1, 2, 3, 3, -0.5, 3.0001, nan, inf, -inf], 4, 0, 3),  # max: last bin; outside and NaN: dropped
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.7000001], 10, 0.1, 0.7),  # edges that are not binary fractions
        ([2.0, 2, 2], 4, 0, 0),            # min == max: the data's range, widened by 1 as it is a point
        ([1.0, 2, 3, 9], 4, 5, 5),         # min == max: the data's range [1, 9]
        ([], 3, 0, 0),                     # empty: range [-1, 1], all zero
        ([-3.0, -1, 0, 1], 3, -3, 1),
    ]
    for values, bins, lo, hi in cases:
        for dtype in (torch.float32, torch.float64):
            x = torch.tensor(values, dtype=dtype)
            want = torch.histc(x, bins, lo, hi)
            got = torch.from_numpy(histc(x.numpy(), bins, lo, hi))
            assert got.dtype == want.dtype and torch.equal(got, want), (values, got, want)
    x = torch.randn(7, 1001) * 3
    assert torch.equal(torch.from_numpy(histc(x.numpy(), 17, -2.5, 4)), torch.histc(x, 17, -2.5, 4))
    # MoE's use: expert ids (ints as floats) counted into one bin each
    ids = torch.randint(0, 5, (31,)).float()
    assert torch.equal(torch.from_numpy(histc(ids.numpy(), 5, 0, 4)), torch.histc(ids, 5, 0, 4))
    # integer input (torch's CUDA kernel only): exact integer arithmetic, same counts as the float form here
    values = [0, 1, 2, 3, 3, -1, 4, 2]
    got = histc(np.int32(values), 4, 0, 3)
    assert got.dtype == np.int32 and got.tolist() == torch.histc(torch.tensor(values).float(), 4, 0, 3).tolist()
    with pytest.raises(ValueError, match="not finite"):
        histc(np.float32([1, nan]), 3, 0, 0)
    with pytest.raises(ValueError, match="max must be larger than min"):
        histc(np.float32([1, 2]), 3, 3, 1)


def test_index_put_assigns_and_accumulates_like_torch():
    index_put = _np("index_put")
    x = torch.randn(5, 4, 3)
    rows = torch.tensor([4, 0, 4, 2, 0, 0])           # repeats: accumulate adds each occurrence
    cols = torch.tensor([1, 3, 1, 0, 2, 2])
    mask = torch.tensor([True, False, True, False, True])
    for indices, values in (([rows], torch.randn(6, 4, 3)), ([rows, cols], torch.randn(6, 3)),
                            ([None, cols[:3]], torch.randn(5, 3, 3)), ([mask], torch.randn(3, 4, 3)),
                            ([rows[:2]], torch.tensor(2.5)), ([rows, None, cols % 3], torch.randn(6, 4))):
        for accumulate in (False, True):
            if not accumulate and len(set(rows.tolist())) < 6 and indices[0] is rows and len(indices) == 1:
                continue                               # repeated index without accumulate: torch leaves it undefined
            want = torch.ops.aten.index_put(x, indices, values, accumulate)
            got = index_put(x.numpy(), [None if i is None else i.numpy() for i in indices], values.numpy(), accumulate)
            # accumulate sums repeats in index order in both: identical fp32 rounding
            assert torch.equal(torch.from_numpy(got), want), (indices, accumulate)
    # an int64 inverse permutation (what MoE routing builds with empty_like + index_put)
    perm = torch.randperm(11)
    inv = torch.empty_like(perm).index_put([perm], torch.arange(11))
    assert np.array_equal(index_put(_np("empty_like")(perm.numpy()), [perm.numpy()], np.arange(11)), inv.numpy())
    assert _np("empty_like")(np.ones((2, 3), np.int32), dtype=torch.float16).dtype == np.float16


def test_cumsum_casts_first_and_accumulates_as_torch_does():
    cumsum = _np("cumsum")
    x = torch.tensor([[1.7, 2.9, -0.5], [3.2, 0.0, 1.0]])
    for dim, dtype in ((1, torch.int32), (0, torch.int64), (1, torch.float64), (1, None)):
        want = torch.cumsum(x, dim, dtype=dtype)               # to int: each value truncated before summing
        got = cumsum(x.numpy(), dim, dtype)
        assert torch.equal(torch.from_numpy(got), want), (dim, dtype)
    for ints in (torch.tensor([3, -1, 2], dtype=torch.int32), torch.tensor([True, False, True])):
        assert torch.equal(torch.from_numpy(cumsum(ints.numpy(), 0)), torch.cumsum(ints, 0))   # int64, as torch
    # long float32 and float16 sums: torch accumulates in float64 / float32; bit for bit the same here
    long = torch.randn(3, 20001) * 100
    assert torch.equal(torch.from_numpy(cumsum(long.numpy(), 1)), torch.cumsum(long, 1))
    half = long[:, :3001].half()
    assert torch.equal(torch.from_numpy(cumsum(half.numpy(), 1)), torch.cumsum(half, 1))


def test_floor_divide_and_min_max_other_follow_torch():
    floor_divide = _np("floor_divide")
    i = torch.arange(-13, 14)
    for d in (7, -3, 1):
        assert torch.equal(torch.from_numpy(np.asarray(floor_divide(i.numpy(), d))), torch.floor_divide(i, d))
    # int // float: torch computes in float32, where 7 // 0.7 is 10.0 (float64 says 9.0)
    got = floor_divide(i.numpy(), 0.7)
    assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), torch.floor_divide(i, 0.7))
    f = torch.cat([torch.randn(3001) * 50, torch.tensor([0.0, -0.0, 5, -5, float("inf"), float("nan")])])
    for d in (torch.randn(f.shape) * 3, torch.zeros(f.shape), 0.3, -2.5):
        with np.errstate(divide="ignore", invalid="ignore"):
            got = torch.from_numpy(floor_divide(f.numpy(), d.numpy() if torch.is_tensor(d) else d))
        want = torch.floor_divide(f, d)
        same = (got == want) & (got.signbit() == want.signbit()) | got.isnan() & want.isnan()
        assert same.all(), (f[~same], got[~same], want[~same])
    with pytest.raises(ZeroDivisionError):
        floor_divide(np.int64([4, 5]), np.int64([1, 0]))
    a = torch.tensor([1.0, float("nan"), -2.0, 5.0])
    b = torch.tensor([3, 0, -7, 5])                       # int64 against float32: float32, as torch promotes
    for name, op in (("minimum", torch.min), ("maximum", torch.max)):
        got = torch.from_numpy(_np(name)(a.numpy(), b.numpy()))
        want = op(a, b)
        assert got.dtype == want.dtype and torch.equal(got.nan_to_num(9), want.nan_to_num(9)), name


def test_grouped_mm_fallback_matches_transformers():
    pytest.importorskip("transformers")
    from slimfx.backends.numpy_transformers import grouped_mm_fallback, transformers_op
    op = transformers_op("grouped_mm_fallback")
    if op is None:
        pytest.skip("this transformers defines no grouped_mm_fallback")
    x, w = torch.randn(13, 6), torch.randn(5, 6, 3)
    # experts 1 and 3 get no rows; rows 11 and 12 (past the last offset) stay zero
    for offs in (torch.tensor([4, 4, 9, 9, 11], dtype=torch.int32), torch.tensor([13, 13, 13, 13, 13])):
        want = op(x, w, offs)
        got = torch.from_numpy(grouped_mm_fallback(x.numpy(), w.numpy(), offs.numpy()))
        # one fp32 (m x 6) @ (6 x 3) per expert: numpy's and torch's GEMMs may sum K in different orders
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert (got[int(offs[-1]):] == 0).all()


class Routing(nn.Module):
    """MoE routing as transformers 5 writes it, plus T5's bucket clamp: through the whole interpreter, so the node
    dtypes the interpreter casts to are checked too."""
    def forward(self, logits, h):
        w, top = torch.topk(logits.softmax(-1), 2, dim=-1)
        ids, perm = torch.sort(top.reshape(-1))
        rows = perm // 2
        counts = torch.histc(ids.float(), bins=5, min=0, max=4)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        inv = torch.empty_like(perm).index_put([perm], torch.arange(perm.numel()))
        y = (h[rows] * w.reshape(-1)[perm, None])[inv].view(h.shape[0], 2, -1).sum(1)
        return y, offs, torch.min(top, torch.full_like(top, 3))


def test_routing_ops_through_the_interpreter_match_torch():
    logits, h = torch.randn(9, 5), torch.randn(9, 4)
    cm = slimfx.compile(Routing(), (logits, h), backend="numpy", progress=False)
    (y, offs, clamped), (y_t, offs_t, clamped_t) = cm(logits, h), Routing()(logits, h)
    assert offs.dtype == torch.int32 and torch.equal(offs, offs_t) and torch.equal(clamped, clamped_t)
    # y: the routing weights come from a softmax, whose exp numpy and torch round differently (a few ulp)
    assert y.dtype == y_t.dtype and torch.allclose(y, y_t, rtol=1e-6, atol=1e-6)


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=5,
                                            num_experts_per_tok=2, max_position_embeddings=64)).eval()


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                               num_heads=4)).eval()


@pytest.mark.parametrize("family", ["mixtral", "t5"])
def test_moe_and_t5_models_match_torch_on_numpy(family):
    pytest.importorskip("transformers")
    from conftest import rel_err, text_batch
    model = _tiny_mixtral() if family == "mixtral" else _tiny_t5()
    ids, mask = text_batch(2, 11, 97, pad_left=family == "mixtral")
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    if family == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    cm = slimfx.compile(model, (), kw, backend="numpy", progress=False)
    with torch.no_grad():
        want = model(**kw).logits
    # fp32 throughout: numpy's and torch's GEMMs and reductions round differently, ~1e-7 per op over 2 layers
    assert rel_err(cm(**kw).logits, want) < 1e-5


def test_division_modes_and_remainder_compute_in_torchs_dtype():
    """int64 by a Python float is a float32 quotient in torch (numpy would take float64), and an integer trunc
    division is exact (a float64 quotient rounds beyond 2**53): exact agreement either way."""
    div_mode, remainder = _np("div_mode"), _np("remainder")
    a = torch.tensor([7, -7, 2 ** 60 + 1, -(2 ** 60) - 5, 0, 13, 1 << 40])
    for b in (0.7, 3, -3, torch.tensor([3, 3, 3, 3, -3, -4, 7])):
        bn = b.numpy() if isinstance(b, torch.Tensor) else b
        for mode in ("floor", "trunc", None):
            want = torch.div(a, b, rounding_mode=mode)
            got = np.asarray(div_mode(a.numpy(), bn, mode)).astype(want.numpy().dtype)
            assert np.array_equal(got, want.numpy()), (b, mode)
        want = torch.remainder(a, b)
        assert np.array_equal(np.asarray(remainder(a.numpy(), bn)).astype(want.numpy().dtype), want.numpy()), b


def test_diff_matches_torch_for_numbers_and_bools():
    diff = _np("diff")
    x = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    for t in (x, x.float() / 3, x > 2):
        for n, dim in ((1, -1), (2, 1), (1, 0)):
            want = torch.diff(t, n=n, dim=dim)
            assert np.array_equal(diff(t.numpy(), n, dim), want.numpy()), (t.dtype, n, dim)
        pre = t[:, :1]
        assert np.array_equal(diff(t.numpy(), 1, 1, pre.numpy()), torch.diff(t, dim=1, prepend=pre).numpy())


def test_scatter_slice_scatter_max_clamp_and_rotary_ops_match_torch():
    """The ops newer families need (Phi-MoE's router, DeepSeek-V3's latent attention, Cohere's rotary table),
    against torch on odd shapes: exact, as they only move, compare or pick values (pow: one rounding each)."""
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g)
    x[1, 2] = x[1, 5]                                       # a tie: the first index wins in both
    idx = torch.randint(0, 7, (4, 3), generator=g)          # smaller than x in both dimensions
    src = torch.randn(6, 4, generator=g)
    perm = torch.stack([torch.randperm(7, generator=g)[:2] for _ in range(4)])   # no repeats in a row
    ours = {"scatter_value": (aten.scatter.value, (x, 1, idx, -1.5)),
            "scatter_src": (aten.scatter.src, (x, 1, perm, src)),
            "slice_scatter": (aten.slice_scatter.default, (x, src[:5, :3], 1, 2, 7, 2)),
            "max_dim": (aten.max.dim, (x, 1, True)),
            "min_dim": (aten.min.dim, (x, 0)),
            "clamp_tensor": (aten.clamp.Tensor, (x, torch.full((7,), -0.5), torch.tensor(0.7))),
            "repeat_interleave": (aten.repeat_interleave.self_int, (x, 3, 0)),
            "copy": (aten.copy.default, (x, torch.arange(7))),
            "pow_scalar_base": (aten.pow.Scalar, (10000.0, torch.arange(0, 8, 2) / 8))}
    for name, (op, args) in ours.items():
        want = op(*args)
        got = _np(name)(*[a.numpy() if torch.is_tensor(a) else a for a in args])
        for w, o in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            o = torch.from_numpy(np.asarray(o))
            assert o.dtype == w.dtype and torch.equal(o, w), name


def test_state_space_and_newer_mlp_ops_match_torch():
    """The ops Mamba-style mixers (causal depthwise conv1d, chunked scans: pad, tensor_split, einsum, eye,
    select_scatter, softplus, expm1) and newer MLPs (squared ReLU: square; xIELU: softplus, expm1) need, against
    torch on odd shapes. Moving and picking values is exact; arithmetic within a few ulp (conv1d and einsum sum
    in another order)."""
    from slimfx.backends.optable import NUMPY_OPS
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 11, generator=g)
    w_dw, w_grp, b = torch.randn(6, 1, 4, generator=g), torch.randn(4, 3, 3, generator=g), torch.randn(6, generator=g)
    big = torch.linspace(-30, 30, 13)                       # softplus's linear region past the threshold
    exact = {"squeeze": (aten.squeeze.default, (x[:1, :, None],)),
             "index_select": (aten.index_select.default, (x, 2, torch.tensor([10, 0, 3, 3]))),
             "tensor_split": (aten.tensor_split.indices, (x, [2, 7], -1)),
             "pad_": (aten.pad.default, (x, [1, 2, 0, -2], "constant", 0.5)),
             "constant_pad_nd": (aten.constant_pad_nd.default, (x, [3, 0])),
             "select_scatter": (aten.select_scatter.default, (x, torch.ones(2, 11), 1, 4)),
             "eye": (aten.eye.m, (3, 5)),
             "square": (aten.square.default, (x,))}
    close = {"conv1d": (aten.conv1d.default, (x, w_dw, b, [1], [3], [1], 6)),            # Mamba: groups = C
             "conv1d_grouped": (aten.conv1d.default, (x[:, :6], w_grp, None, [2], [1], [2], 2)),
             "conv1d_same": (aten.conv1d.padding, (x[0], w_dw, b, [1], "same", [1], 6)),   # unbatched
             "softplus": (aten.softplus.default, (big, 2.0, 20.0)),
             "expm1": (aten.expm1.default, (x,)),
             "log1p": (aten.log1p.default, (x.abs(),)),
             "einsum": (aten.einsum.default, ("bcl,dc->bdl", [x, w_dw[:, 0, :].T.contiguous()[:, :6]]))}
    for name, (op, args) in {**exact, **close}.items():
        want = op(*args)
        fn = NUMPY_OPS[op]
        got = fn(*[a.numpy() if torch.is_tensor(a) else [t.numpy() for t in a] if isinstance(a, list) and a
                   and torch.is_tensor(a[0]) else a for a in args])
        want, got = [want] if torch.is_tensor(want) else want, [got] if isinstance(got, np.ndarray) else got
        assert len(want) == len(got), name
        for w, o in zip(want, got):
            o = torch.from_numpy(np.asarray(o))
            assert o.dtype == w.dtype and o.shape == w.shape, name
            assert torch.equal(o, w) if name in exact else torch.allclose(o, w, rtol=1e-5, atol=1e-5), name


def test_convolutions_match_torch():
    """conv2d and conv3d (ViT's, CLIP's and video models' patch embeddings; CNNs), and aten.convolution (what a
    functionalized graph holds), against torch at odd sizes: strides, asymmetric padding, "same" with an even
    kernel, dilation, groups, unbatched input; within a few ulp (another summation order). Transposed ones
    (1-3-d, aten.convolution's transposed=True too) over strides, padding, output padding, dilation, groups, bias
    or none, unbatched, and an empty output. A tiny ViT and SpeechT5's HiFi-GAN vocoder (transposed conv1d
    upsampling) run on numpy."""
    from slimfx.backends.optable import NUMPY_OPS
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(6)
    x2, x3 = torch.randn(2, 6, 11, 9, generator=g), torch.randn(2, 4, 5, 7, 6, generator=g)
    w2, w2g, w2e = (torch.randn(5, 6, 3, 2, generator=g), torch.randn(4, 3, 3, 3, generator=g),
                    torch.randn(3, 6, 4, 4, generator=g))
    w3, b5, b4 = torch.randn(6, 2, 3, 2, 3, generator=g), torch.randn(5, generator=g), torch.randn(4, generator=g)
    cases = {
        "patch": (aten.conv2d.default, (x2[..., :8, :8], torch.randn(7, 6, 4, 4, generator=g), None, [4, 4])),
        "strided_padded": (aten.conv2d.default, (x2, w2, b5, [2, 3], [1, 2], [1, 1], 1)),
        "dilated_grouped": (aten.conv2d.default, (x2, w2g, b4, [1], [2], [2, 1], 2)),
        "same_even_kernel": (aten.conv2d.padding, (x2, w2e, None, [1, 1], "same", [1, 2], 1)),
        "valid_unbatched": (aten.conv2d.padding, (x2[0], w2, b5, [1, 1], "valid")),
        "conv3d": (aten.conv3d.default, (x3, w3, None, [1, 2, 1], [1, 0, 2], [1, 1, 2], 2)),
        "convolution": (aten.convolution.default, (x2, w2, b5, [2, 1], [0, 1], [1, 2], False, [0, 0], 1)),
        "convolution_1d": (aten.convolution.default, (x2[..., 0], w2[..., 0], b5, [2], [1], [1], False, [0], 1)),
        "batch_zero": (aten.conv2d.default, (x2[:0], w2, b5, [2, 3], [1, 2], [1, 1], 1)),
        # transposed: weight (C_in, C_out / groups, *kernel); (input, weight, bias, stride, padding,
        # output_padding, groups, dilation)
        "transpose1d": (aten.conv_transpose1d.default, (x2[..., 0], w2[..., 0].transpose(0, 1), b5, [3], [1], [2], 1,
                                                        [1])),
        "transpose2d_grouped": (aten.conv_transpose2d.input, (x2, torch.randn(6, 2, 3, 2, generator=g),
                                                               b4[:2].repeat(3), [2, 3], [1, 2], [1, 0], 3, [2, 1])),
        "transpose2d_unbatched": (aten.conv_transpose2d.input, (x2[0], w2.transpose(0, 1)[:6, :5], None, [1, 2],
                                                                 [0, 1], [0, 1], 1, [1, 2])),
        "transpose3d": (aten.conv_transpose3d.input, (x3, torch.randn(4, 3, 2, 3, 2, generator=g), None, [2, 1, 2],
                                                      [0, 1, 1], [1, 0, 0], 1, [1, 2, 1])),
        "transpose_empty": (aten.conv_transpose3d.input, (x3[..., :3, :4, :5], torch.randn(4, 3, 2, 3, 2, generator=g),
                                                          b4[:3], [1, 2, 1], [2, 1, 1], [0, 0, 0], 1, [1, 1, 1])),
        "convolution_transposed": (aten.convolution.default, (x2, w2.transpose(0, 1)[:6, :5], b5, [2, 2], [1, 0],
                                                               [1, 2], True, [1, 0], 1)),
    }
    for name, (op, args) in cases.items():
        want = op(*args)
        got = torch.from_numpy(NUMPY_OPS[op](*[a.numpy() if torch.is_tensor(a) else a for a in args]))
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (name, float((got - want).abs().max()))
    assert cases["transpose_empty"][0](*cases["transpose_empty"][1]).shape[2] == 0       # (empty, as meant)

    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                             image_size=24, patch_size=8, num_channels=3)).eval()
    pixels = torch.randn(2, 3, 24, 24, generator=g)
    cm = slimfx.compile(vit, (pixels,), backend="numpy", progress=False)
    with torch.no_grad():
        assert rel_err(cm(pixels).last_hidden_state, vit(pixels).last_hidden_state) < 1e-5

    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, upsample_initial_channel=16, upsample_rates=[2, 3], upsample_kernel_sizes=[4, 5],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])).eval()
    cm = slimfx.compile(vocoder, (torch.randn(2, 7, 8, generator=g),), backend="numpy", dynamic=True, progress=False)
    spectrogram = torch.randn(1, 11, 8, generator=g)                     # another batch and length
    with torch.no_grad():
        assert rel_err(cm(spectrogram), vocoder(spectrogram)) < 1e-5          # fp32: summation order only


def test_convolutions_in_slices_match_torch(monkeypatch):
    """An ungrouped convolution copies its windows out (im2col) in slices of its first spatial dim, each within
    ``_IM2COL_BYTES`` (a whole copy is taps times the input: 2.4 GB for a 3x3 one over 64 x 1024 x 1024); with a
    cap of a few windows the slices (one position row, or several, and a last short one) still give torch's
    values."""
    from slimfx.backends import numpy_ops
    from slimfx.backends.optable import NUMPY_OPS
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(2, 3, 13, 7, generator=g), torch.randn(4, 3, 3, 2, generator=g), torch.randn(4, generator=g)
    x3, w3 = torch.randn(1, 2, 7, 5, 4, generator=g), torch.randn(3, 2, 2, 3, 2, generator=g)
    for cap in (1, 2 * 5 * 18 * 4 * 3, 10 ** 9):           # one row at a time, 3 rows, all at once
        monkeypatch.setattr(numpy_ops, "_IM2COL_BYTES", cap)
        for op, args in ((aten.conv2d.default, (x, w, b, [1, 2], [1, 0], [2, 1], 1)),
                         (aten.conv3d.default, (x3, w3, None, [2, 1, 1], [0, 1, 0], [1, 1, 1], 1))):
            want = op(*args)
            got = torch.from_numpy(NUMPY_OPS[op](*[a.numpy() if torch.is_tensor(a) else a for a in args]))
            assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5), (cap, op)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_upsampling_matches_torch(nd):
    """F.interpolate's nearest and nearest-exact (exactly: indices), linear / bilinear / trilinear with and without
    align_corners (within a few ulp: torch weighs all corners at once), by size and by scale factor, enlarging and
    shrinking, and bicubic in 2-d, through slimfx.compile on numpy. 3 rows scaled by 2.3 read rows 0, 0, 1, 1, 2, 2 in
    torch's 2-d
    nearest kernel and 0, 0, 0, 1, 1, 2 in its 1-d and 3-d ones: both are followed."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(nd)
    x = torch.randn(2, 3, *[(3,), (3, 6), (3, 4, 5)][nd - 1], generator=g)
    linear = ["linear", "bilinear", "trilinear"][nd - 1]

    class Resize(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.kw = kw

        def forward(self, t):
            return F.interpolate(t, **self.kw)
    sizes = [dict(size=tuple(n * 2 + 1 for n in x.shape[2:])), dict(size=(2,) * nd), dict(size=(1,) * nd),
             dict(scale_factor=2.3), dict(scale_factor=2), dict(scale_factor=0.6), dict(scale_factor=1.2)]
    modes = [("nearest", None), ("nearest-exact", None), (linear, False), (linear, True)] + \
        ([("bicubic", False), ("bicubic", True)] if nd == 2 else [])
    for (mode, corners), size in [(m, s) for m in modes for s in sizes]:
        model = Resize(mode=mode, align_corners=corners, **size)
        cm = slimfx.compile(model, (x,), backend="numpy", progress=False)
        want, got = model(x), cm(x)
        assert got.shape == want.shape, (mode, corners, size)
        if mode.startswith("nearest"):
            assert torch.equal(got, want), (mode, size)
        else:                             # (bicubic sums 16 weighted taps, in another order)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 if mode == "bicubic" else 1e-6), (mode, corners, size)


def test_instance_norm_adaptive_max_and_3d_pooling_match_torch():
    """Instance norm (per sample and channel; with running statistics in eval mode), adaptive max pooling 1-3-d
    with its indices (exactly), 3-d max and average pooling (strides, padding, ceil_mode, padding not counted) and
    3-d adaptive average pooling, through slimfx.compile on numpy against torch at odd sizes."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(9)

    class Ops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.affine = torch.nn.InstanceNorm2d(3, affine=True)
            self.running = torch.nn.InstanceNorm2d(3, track_running_stats=True)
            self.plain = torch.nn.InstanceNorm1d(3)
            with torch.no_grad():
                self.affine.weight.normal_(generator=g), self.affine.bias.normal_(generator=g)
                self.running.running_mean.normal_(generator=g), self.running.running_var.uniform_(0.5, 2, generator=g)

        def forward(self, x, v):
            return dict(affine=self.affine(x), running=self.running(x), plain=self.plain(x[:, :, 0]),
                        amax2=F.adaptive_max_pool2d(x, (3, 2), return_indices=True),
                        amax1=F.adaptive_max_pool1d(x[:, :, 0], 4, return_indices=True),
                        amax3=F.adaptive_max_pool3d(v, (3, 2, 4), return_indices=True),
                        max3=F.max_pool3d(v, 2, stride=(1, 2, 2), padding=1, ceil_mode=True),
                        avg3=F.avg_pool3d(v, (2, 3, 2), padding=(1, 1, 0), count_include_pad=False),
                        aavg3=F.adaptive_avg_pool3d(v, (3, 2, 4)))
    x, v = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 4, 5, 6, generator=g)
    x[0, 1, 2, 3] = x[0, 1, 2, 4] = 9.0                  # equal maxima in one cell: the first one's index
    model = Ops().eval()
    cm = slimfx.compile(model, (x, v), backend="numpy", progress=False)
    want, got = model(x, v), cm(x, v)
    for name in want:
        for w, o in zip(*[t if isinstance(t, (tuple, list)) else [t] for t in (want[name], got[name])]):
            assert o.dtype == w.dtype and o.shape == w.shape, name
            exact = name.startswith(("amax", "max"))
            assert torch.equal(o, w) if exact else torch.allclose(o, w, rtol=1e-5, atol=1e-6), name


def test_interpolation_pooling_and_convolution_dtypes_follow_torch():
    """float64 interpolates in float64 (positions and weights too: it was float32's, 5e-6 off); float16
    interpolates, convolves and instance-normalizes in float32 rounded once (rounded per dim, a quarter of the
    bilinear elements came one float16 step off; a conv over 256 channels accumulated in float16, 8x torch's
    error); integer input to
    linear or bicubic upsampling is refused by name (it was truncated or wrapped around); adaptive max pooling
    gives the last NaN of a cell, as torch."""
    from slimfx.backends.optable import NUMPY_OPS
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 6, generator=g)
    for op, args, mode in [(aten.upsample_bilinear2d.vec, (None, False, [1.7, 2.3]), "bilinear"),
                           (aten.upsample_bicubic2d.vec, (None, True, [1.7, 2.3]), "bicubic")]:
        wide = x.double()
        assert torch.allclose(torch.from_numpy(NUMPY_OPS[op](wide.numpy(), *args)), op(wide, *args), rtol=0,
                              atol=1e-12), mode
        half = x.half()
        # bilinear as torch's float16 kernel; bicubic as its float32 one, rounded (torch's float16 bicubic rounds
        # inside: a third of its elements a float16 step off that)
        want = op(half, *args) if mode == "bilinear" else op(half.float(), *args).half()
        off = torch.from_numpy(NUMPY_OPS[op](half.numpy(), *args)) != want
        assert off.float().mean() < 0.01, (mode, off.float().mean())      # (summation order: a rare last bit)
        with pytest.raises(NotImplementedError, match=f"{mode} upsampling of uint8 .*float inputs only"):
            NUMPY_OPS[op]((x.abs() * 50).to(torch.uint8).numpy(), *args)
    wide_in = torch.randn(1, 256, 6, 6, generator=g).half()
    w = (torch.randn(256, 4, 3, 3, generator=g) / 16).half()
    exact = torch.nn.functional.conv_transpose2d(wide_in.double(), w.double())
    ours = torch.from_numpy(NUMPY_OPS[aten.conv_transpose2d.input](wide_in.numpy(), w.numpy())).double()
    theirs = torch.nn.functional.conv_transpose2d(wide_in, w).double()
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3      # float32 accumulation
    shifted = x * 3 + 5                                  # (a mean far from 0: float16 statistics lose it)
    exact = torch.instance_norm(shifted.double(), None, None, None, None, True, 0.1, 1e-5, False)
    ours = torch.from_numpy(NUMPY_OPS[aten.instance_norm.default](shifted.half().numpy(), None, None, None, None,
                                                                  True, 0.1, 1e-5)).double()
    theirs = torch.instance_norm(shifted.half(), None, None, None, None, True, 0.1, 1e-5, False).double()
    assert (ours - exact).abs().max() <= (theirs - exact).abs().max() + 1e-3
    cell = torch.tensor([[[float("nan"), float("nan"), 5.0, float("nan")]]])
    values, index = NUMPY_OPS[aten.adaptive_max_pool1d.default](cell.numpy(), [1])
    assert index.tolist() == torch.nn.functional.adaptive_max_pool1d(cell, 1, return_indices=True)[1].tolist()
    assert np.isnan(values).all()


def test_dpt_depth_estimation_runs_on_numpy():
    """DPT's neck and head resize with bilinear interpolation and upsample with transposed convolutions."""
    from transformers import DPTConfig, DPTForDepthEstimation
    torch.manual_seed(0)
    dpt = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=40, image_size=32,
        patch_size=8, neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        head_hidden_size=8)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    cm = slimfx.compile(dpt, (pixels,), backend="numpy", progress=False)
    with torch.no_grad():
        assert rel_err(cm(pixels).predicted_depth, dpt(pixels).predicted_depth) < 1e-5     # fp32: summation order


def test_encoder_ops_match_torch():
    """Max and average pooling (strides, padding, dilation, ceil_mode's partial last window, padding counted or
    not, a divisor override), adaptive average pooling to sizes that do not divide the input, batch norm in eval
    mode (export's _native_batch_norm_legit_no_training), group norm, the functional fill and reshape_as / view_as,
    against torch on odd sizes (within a few ulp; pooling by max, fill and reshapes exactly). Batch norm in
    training mode is refused, named. BART (fill), wav2vec2 (group norm), ResNet (batch norm, pooling) and RoFormer
    (reshape_as) run on numpy end to end."""
    from slimfx.backends.optable import NUMPY_OPS
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(7)
    x, x1 = torch.randn(2, 6, 11, 9, generator=g), torch.randn(2, 6, 13, generator=g)
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    exact = {
        "max_pool2d": (aten.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1])),
        "max_pool2d_ceil_dilated": (aten.max_pool2d.default, (x, [2, 3], [3, 2], [1, 0], [2, 1], True)),
        "max_pool2d_default_stride": (aten.max_pool2d.default, (x, [2, 2])),
        "max_pool1d_ceil": (aten.max_pool1d.default, (x1, [4], [3], [2], [1], True)),
        "max_pool2d_int": (aten.max_pool2d.default, ((x * 9).long() - 20, [3, 3], [2, 2], [1, 1], [1, 1], True)),
        "fill_scalar": (aten.fill.Scalar, (x1, 1.5)),
        "fill_tensor": (aten.fill.Tensor, (x1.long(), torch.tensor(7))),
        "reshape_as": (aten.reshape_as.default, (x1.transpose(1, 2), x1)),
        "view_as": (aten.view_as.default, (x, x.reshape(2, 6, 99))),
    }
    close = {
        "avg_pool2d": (aten.avg_pool2d.default, (x, [3, 2], [2, 2], [1, 1])),
        "avg_pool2d_no_pad_count_ceil": (aten.avg_pool2d.default, (x, [3, 3], [2, 2], [1, 1], True, False)),
        "avg_pool2d_ceil": (aten.avg_pool2d.default, (x, [2, 2], [2, 2], [0, 1], True, True)),
        "avg_pool2d_divisor": (aten.avg_pool2d.default, (x, [2, 2], [1, 1], [0, 0], False, True, 3)),
        "avg_pool1d": (aten.avg_pool1d.default, (x1, [3], [2], [1], True, False)),
        "adaptive_1x1": (aten.adaptive_avg_pool2d.default, (x, [1, 1])),
        "adaptive_4x2": (aten._adaptive_avg_pool2d.default, (x, [4, 2])),
        "adaptive_1d": (aten.adaptive_avg_pool1d.default, (x1, [5])),
        "batch_norm": (aten.batch_norm.default, (x, w, b, mean, var, False, 0.1, 1e-5, False)),
        "batch_norm_export": (aten._native_batch_norm_legit_no_training.default, (x1, w, None, mean, var, 0.1, 1e-3)),
        "group_norm": (aten.group_norm.default, (x, 3, w, b, 1e-5)),
        "group_norm_1d_plain": (aten.group_norm.default, (x1, 2)),
    }
    for name, (op, args) in {**exact, **close}.items():
        want = op(*args)
        got = NUMPY_OPS[op](*[a.numpy() if torch.is_tensor(a) else a for a in args])
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        for wt, o in zip(want, got):
            o = torch.from_numpy(np.asarray(o))
            assert o.dtype == wt.dtype and o.shape == wt.shape, (name, o.shape, wt.shape)
            assert torch.equal(o, wt) if name in exact else torch.allclose(o, wt, rtol=1e-5, atol=1e-6), name
    with pytest.raises(NotImplementedError, match="batch_norm in training mode"):
        NUMPY_OPS[aten.batch_norm.default](x.numpy(), None, None, None, None, True, 0.1, 1e-5, False)

    import transformers as T
    ids = torch.randint(3, 90, (2, 7), generator=g)
    models = {
        "bart": (T.BartModel(T.BartConfig(vocab_size=90, d_model=32, encoder_layers=1, decoder_layers=1,
                                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=40,
                                          decoder_ffn_dim=40)), dict(input_ids=ids, use_cache=False)),
        "wav2vec2": (T.Wav2Vec2Model(T.Wav2Vec2Config(
            hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, conv_dim=(16, 16),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)),
            dict(input_values=torch.randn(2, 400, generator=g))),
        "resnet": (T.ResNetModel(T.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)),
                   dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g))),
        "roformer": (T.RoFormerModel(T.RoFormerConfig(vocab_size=90, hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=40)),
                     dict(input_ids=ids)),
    }
    for name, (model, kw) in models.items():
        torch.manual_seed(0)
        model.eval()
        cm = slimfx.compile(model, (), kw, backend="numpy", progress=False)
        with torch.no_grad():
            assert rel_err(cm(**kw)[0], model(**kw)[0]) < 1e-5, name


def test_a_call_module_node_is_refused_saying_what_the_backend_runs():
    """The hint said to register a numpy_op for the module's name, which cannot work for a module."""
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), torch.randn(2, 4)

    def add_module(gm):
        gm.add_submodule("my_act", torch.nn.Hardswish())
        lin = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
        with gm.graph.inserting_after(lin):
            c = gm.graph.call_module("my_act", (lin,))
        lin.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)
        return True

    with pytest.raises(Exception, match=r"runs ATen ops \(call_function nodes\), not a call_module node \(my_act: "
                                        r"Hardswish 'my_act'\): a pass should insert the ATen ops"):
        slimfx.compile(model, (x,), passes=[add_module], backend="numpy", progress=False)


class _TorchLevel(torch.nn.Module):
    def forward(self, x):
        return x.clamp(max=0.5) + torch.clamp(x, min=-0.25) + torch.stack([x, x.flip(0)]).amax(0)


def test_torch_level_calls_of_a_symbolic_trace_capture_run_on_numpy():
    """symbolic_trace leaves torch.clamp / torch.stack as torch functions: the numpy backend refused them ('no
    implementation of <built-in method clamp>'); and a keyword argument the numpy function names otherwise
    (clamp's max) failed at the call."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    cm = slimfx.compile(_TorchLevel(), (x,), capture="symbolic_trace", backend="numpy", progress=False)
    assert all(isinstance(n.target, torch._ops.OpOverload) for n in cm.graph.graph.nodes if n.op == "call_function")
    assert torch.equal(cm(x), _TorchLevel()(x))        # clamps, a max and adds of the same values: exact


class _Bf16Inside(torch.nn.Module):
    def forward(self, x):
        return (x.to(torch.bfloat16) * 3).float()


def test_a_bfloat16_node_is_refused_at_compile_naming_it():
    """An fp32 model computing a step in bfloat16 (Falcon's ALiBi) compiled for numpy, then failed at its first
    call with a message naming no node."""
    with pytest.raises(Exception, match=r"node \w+ \(aten\.\w+\.\w+\) computes in torch.bfloat16, which numpy has "
                                        r"no type for; run with backend='torch'"):
        slimfx.compile(_Bf16Inside(), (torch.randn(2, 3),), backend="numpy", progress=False)


class _Ieee(nn.Module):
    def forward(self, x):
        return torch.log(x) + x / torch.zeros_like(x) + torch.exp(x * 1000)


def test_ieee_special_values_come_silently_as_from_torch():
    """log(0), x/0, 0/0 and exp overflowing are -inf, inf, nan and inf in torch, without a word; numpy printed
    RuntimeWarnings for them (T5's relative position buckets take log(0) on every call)."""
    import warnings
    x = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = slimfx.compile(_Ieee(), (x,), backend="numpy", progress=False)
        got = cm(x)
    want = _Ieee()(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_symbolic_bool_operators_and_storage_offsets_run_on_numpy():
    """torch 2.11's export writes runtime asserts as Python operators on SymBools (``Eq(s70, u0) | Eq(u0, 1)``:
    all-MiniLM-L6, the demo's model) and reads a view's storage offset for them (GPT-Neo): the numpy backend had
    neither, so both models failed there."""
    import operator
    from slimfx.backends import numpy_backend  # noqa: F401 - registers the ops
    from slimfx.backends.optable import NUMPY_OPS
    get = NUMPY_OPS.__getitem__
    assert get(operator.or_)(False, True) is True and get(operator.and_)(True, False) is False
    assert get(operator.xor)(True, True) is False and get(torch.sym_not)(False) is True
    offset = get(torch.ops.aten.sym_storage_offset.default)
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert offset(a) == 0 and offset(a[1:, 2:]) == 8 and offset(a[2]) == 12
