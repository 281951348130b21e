"""grouped_weight_only: the int8 and int4 weight-only grouped GEMMs of mixture-of-experts layers vs their
float64 numpy references and transformers' own grouped GEMM: empty experts, experts with more rows than a
tile, rows past the last offset, odd N (and odd K for int8), every float dtype; the refusals."""
import numpy as np
import pytest
import torch

from slimfx.kernels.grouped_weight_only import (int4_grouped_weight_only, int4_grouped_weight_only_ref,
                                                int8_grouped_weight_only, int8_grouped_weight_only_ref,
                                                pack_int4_experts)
from slimfx.kernels.weight_only import unpack_int4

from .kernel_checks import UNIT_ROUNDOFF, assert_close, rand_int8

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _tol(dtype, ref, k):
    # the final cast rounds by one unit roundoff of |y| (rtol); the fp32 accumulation over K terms adds
    # ~K * 2**-24 * max|y| (atol, 4x margin); bf16/fp16 x int8 products are exact in fp32
    return dict(rtol=UNIT_ROUNDOFF[dtype], atol=4 * k * 2.0**-24 * max(float(np.abs(ref).max()), 1e-30))


def routed(gen, counts, k, n, dtype):
    e = len(counts)
    x = torch.randn(sum(counts), k, generator=gen).to(dtype)
    w = rand_int8(gen, e, n, k)
    s = torch.rand(e, n, generator=gen) * 0.02 + 1e-3
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    return x, w, s, offs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts,n,k", [([1, 0, 1, 0], 45, 71),          # decode: two experts, one token each
                                        ([0, 37, 3, 0, 18], 33, 96),     # an expert over two row tiles
                                        ([5], 130, 40)])                 # one expert: a plain linear
def test_against_reference(dev, gen, dtype, counts, n, k):
    x, w, s, offs = routed(gen, counts, k, n, dtype)
    out = int8_grouped_weight_only(x.to(dev), w.to(dev), s.to(dev), offs.to(dev))
    ref = int8_grouped_weight_only_ref(x, w, s, offs)
    assert out.dtype == dtype and out.shape == (sum(counts), n)
    assert_close(out, ref, **_tol(dtype, ref, k))


def test_rows_past_the_last_offset_are_zero_and_offsets_may_be_int64(dev, gen):
    x, w, s, offs = routed(gen, [3, 0, 4], 50, 20, torch.float32)
    x = torch.cat([x, torch.randn(5, 50, generator=gen)])         # 5 rows no expert took
    out = int8_grouped_weight_only(x.to(dev), w.to(dev), s.reshape(3, 20, 1).to(dev), offs.long().to(dev))
    ref = int8_grouped_weight_only_ref(x, w, s, offs)
    assert float(out[7:].abs().max()) == 0.0
    assert_close(out, ref, **_tol(torch.float32, ref, 50))
    # an int64 offset beyond int32 is clamped to the rows there are, as the reference does (it was narrowed to
    # int32 first: 2**32 + 1 read as 1, and the rows after the first came out zero)
    big = torch.tensor([3, 2**32 + 1, 2**33], dtype=torch.long)
    out = int8_grouped_weight_only(x.to(dev), w.to(dev), s.reshape(3, 20, 1).to(dev), big.to(dev))
    ref = int8_grouped_weight_only_ref(x, w, s, big)
    assert float(out[3:].abs().max()) > 0
    assert_close(out, ref, **_tol(torch.float32, ref, 50))


def test_matches_transformers_grouped_mm(dev, gen):
    """The op it replaces: transformers' grouped GEMM over the dequantized (E, K, N) weight."""
    moe = pytest.importorskip("transformers.integrations.moe")
    x, w, s, offs = routed(gen, [2, 9, 0, 4], 64, 24, torch.float32)
    w_f = (w.float() * s[:, :, None]).transpose(1, 2).contiguous()
    want = moe._grouped_mm_fallback(x, w_f, offs)
    got = int8_grouped_weight_only(x.to(dev), w.to(dev), s.to(dev), offs.to(dev)).cpu()
    # fp32 both ways; they differ only in where the scale multiplies (sum of scaled products vs scaled sum)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_refusals(dev, gen):
    x, w, s, offs = routed(gen, [2, 2], 32, 8, torch.float32)
    x, w, s, offs = x.to(dev), w.to(dev), s.to(dev), offs.to(dev)
    with pytest.raises(TypeError, match="w: expected dtype in \\(int8\\)"):
        int8_grouped_weight_only(x, w.float(), s, offs)
    with pytest.raises(ValueError, match=r"x: expected \(S, 32\)"):
        int8_grouped_weight_only(x[:, :16].contiguous(), w, s, offs)
    with pytest.raises(ValueError, match="w_scale: expected one fp32 scale per expert"):
        int8_grouped_weight_only(x, w, s[:, :4], offs)
    with pytest.raises(ValueError, match=r"offs: expected shape \(2,\)"):
        int8_grouped_weight_only(x, w, s, offs[:1])
    with pytest.raises(TypeError, match="offs: expected dtype"):
        int8_grouped_weight_only(x, w, s, offs.float())
    with pytest.raises(ValueError, match="x: expected unit stride"):
        int8_grouped_weight_only(x.t().contiguous().t(), w, s, offs)


def routed_int4(gen, counts, k, n, group, dtype):
    e = len(counts)
    x = torch.randn(sum(counts), k, generator=gen).to(dtype)
    q = torch.randint(-8, 8, (e, n, k), generator=gen, dtype=torch.int8)     # the whole nibble range
    s = torch.rand(e, n, k // group, generator=gen) * 0.1 + 1e-3
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    return x, q, s, offs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts,n,k,group", [([1, 0, 1, 0], 45, 96, 32),        # decode: two experts, a token each
                                              ([0, 37, 3, 0, 18], 33, 128, 64),  # an expert over two row tiles
                                              ([5], 70, 128, 128)])              # one expert, one group
def test_int4_against_reference(dev, gen, dtype, counts, n, k, group):
    x, q, s, offs = routed_int4(gen, counts, k, n, group, dtype)
    p = pack_int4_experts(q)
    out = int4_grouped_weight_only(x.to(dev), p.to(dev), s.to(dev), group, offs.to(dev))
    ref = int4_grouped_weight_only_ref(x, p, s, group, offs)
    assert out.dtype == dtype and out.shape == (sum(counts), n)
    assert_close(out, ref, **_tol(dtype, ref, k))


def test_int4_packing_round_trips_per_expert(gen):
    q = torch.randint(-8, 8, (3, 5, 64), generator=gen, dtype=torch.int8)
    p = pack_int4_experts(q)
    assert p.shape == (3, 5, 32) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p.reshape(15, 32)).reshape(3, 5, 64), q)
    assert torch.equal(p[1], pack_int4_experts(q[1:2])[0])        # each expert packed on its own rows


def test_int4_matches_transformers_grouped_mm_and_zeroes_unrouted_rows(dev, gen):
    """The op it replaces: transformers' grouped GEMM over the dequantized (E, K, N) weight; rows past the
    last offset (tokens no expert took) come out zero; int64 offsets and (E, N, G, 1) scales, as Quantize
    stores them."""
    moe = pytest.importorskip("transformers.integrations.moe")
    x, q, s, offs = routed_int4(gen, [2, 9, 0, 4], 64, 24, 32, torch.float32)
    x = torch.cat([x, torch.randn(3, 64, generator=gen)])
    w_f = (q.float().reshape(4, 24, 2, 32) * s[..., None]).reshape(4, 24, 64).transpose(1, 2).contiguous()
    want = moe._grouped_mm_fallback(x[:15], w_f, offs)
    got = int4_grouped_weight_only(x.to(dev), pack_int4_experts(q).to(dev), s[..., None].to(dev), 32,
                                   offs.long().to(dev)).cpu()
    assert float(got[15:].abs().max()) == 0.0
    # fp32 both ways; they differ in where the scales multiply (scaled group sums vs sums of scaled products)
    assert float((got[:15] - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_int4_refusals(dev, gen):
    x, q, s, offs = routed_int4(gen, [2, 2], 64, 8, 32, torch.float32)
    p = pack_int4_experts(q)
    x, p, s, offs = x.to(dev), p.to(dev), s.to(dev), offs.to(dev)
    with pytest.raises(TypeError, match="w_packed: expected dtype in \\(uint8\\)"):
        int4_grouped_weight_only(x, q.to(dev), s, 32, offs)
    with pytest.raises(ValueError, match="group_size: expected a power of two >= 32"):
        int4_grouped_weight_only(x, p, s, 16, offs)
    with pytest.raises(ValueError, match="is not a multiple of group_size 64"):
        int4_grouped_weight_only(x, p[:, :, :16].contiguous(), s, 64, offs)
    with pytest.raises(ValueError, match=r"x: expected \(S, 64\)"):
        int4_grouped_weight_only(x[:, :32].contiguous(), p, s, 32, offs)
    with pytest.raises(ValueError, match="scales: expected one fp32 scale per expert, output channel and group"):
        int4_grouped_weight_only(x, p, s[:, :, :1], 32, offs)
    with pytest.raises(ValueError, match=r"offs: expected shape \(2,\)"):
        int4_grouped_weight_only(x, p, s, 32, offs[:1])
    with pytest.raises(ValueError, match="q: expected the experts' codes"):
        pack_int4_experts(q[0])
