"""grouped_weight_only: the int8 weight-only grouped GEMM of mixture-of-experts layers vs its float64 numpy
reference and transformers' own grouped GEMM: empty experts, experts with more rows than a tile, rows past
the last offset, odd N and K, every float dtype; the refusals."""
import numpy as np
import pytest
import torch

from slimfx.kernels.grouped_weight_only import int8_grouped_weight_only, int8_grouped_weight_only_ref

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
