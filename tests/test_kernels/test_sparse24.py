"""sparse24: 2:4 compression format (exact) and the in-kernel-decompressing linear vs numpy."""
import numpy as np
import pytest
import torch

from slimfx.kernels.sparse24 import compress_24, decompress_24, sparse24_linear, sparse24_linear_ref

from .kernel_checks import UNIT_ROUNDOFF, assert_close


def _prune24(gen, n, k, dtype):
    """Random 2:4 weight; some groups keep fewer than 2 nonzeros (exercises the zero padding)."""
    w = torch.randn(n, k // 4, 4, generator=gen)
    drop = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    w.scatter_(-1, drop, 0.0)
    w[0, 0] = 0.0                                                  # an all-zero group
    w[-1, -1, :3] = 0.0                                            # a group with one nonzero, at column 3
    return w.reshape(n, k).to(dtype)


def test_format(gen):
    w = torch.tensor([[0, 5, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float16)
    values, meta = compress_24(w)
    assert values.tolist() == [[5, 7, 1, 0, 0, 0]]
    # groups: (1, 3) -> 1 | 3 << 2 = 13; (0, 1) -> 4; (0, 1) -> 4; byte 0 = 13 | 4 << 4, byte 1 = 4
    assert meta.tolist() == [[13 | 4 << 4, 4]]
    w = _prune24(gen, 9, 44, torch.bfloat16)
    values, meta = compress_24(w)
    assert values.shape == (9, 22) and meta.shape == (9, 6) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta, 44), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
# K = 96: a whole number of the interpreted configs' K steps (the unmasked EVEN loads); the others are not
@pytest.mark.parametrize("m,n,k", [(1, 45, 72), (5, 33, 200), (33, 70, 132), (2, 19, 96), (7, 19, 96)])
def test_sparse24_linear(dev, gen, dtype, m, n, k):
    w = _prune24(gen, n, k, dtype)
    values, meta = compress_24(w)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    out = sparse24_linear(x.to(dev), values.to(dev), meta.to(dev), bias=b.to(dev))
    ref = sparse24_linear_ref(x, values, meta, bias=b)
    # Final cast: one unit roundoff (rtol); fp32 accumulation of <= 100 nonzero products: ~100 * 2**-24
    # * max|y| (atol, 4x margin). Products of fp16/bf16 (and fp32 via the IEEE dot) are exact or fp32-rounded.
    assert_close(out, ref, rtol=UNIT_ROUNDOFF[dtype] + 2.0**-23, atol=4 * 100 * 2.0**-24 * float(np.abs(ref).max()))
    torch.testing.assert_close(out.cpu().float(), (x.float() @ w.float().T + b.float()).to(dtype).float(),
                               rtol=2 * UNIT_ROUNDOFF[dtype], atol=1e-2)   # and it is the dense layer


@pytest.mark.parametrize("impl", ["gemv", "dot"])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_sparse24_decode_paths(dev, gen, impl, m):
    """Both decode kernels; K = 60 is not a multiple of any K step, nor of 8 (a half-used meta byte)."""
    w = _prune24(gen, 37, 60, torch.bfloat16)
    values, meta = compress_24(w)
    x = torch.randn(m, 60, generator=gen).to(torch.bfloat16)
    out = sparse24_linear(x.to(dev), values.to(dev), meta.to(dev), impl=impl)
    ref = sparse24_linear_ref(x, values, meta)
    assert_close(out, ref, rtol=UNIT_ROUNDOFF[torch.bfloat16] + 2.0**-23,
                 atol=4 * 30 * 2.0**-24 * float(np.abs(ref).max()))


def test_dot_path_with_rows_not_word_aligned(dev, gen):
    """16-bit values whose row stride is odd cannot be read as 32-bit pairs: the dot kernel falls back to
    per-element selects (WORDS=False) and gives what the pairwise rebuild gives, bit for bit (both rebuild
    the same exact dense tile, then run the same dot)."""
    w = _prune24(gen, 37, 60, torch.bfloat16)
    values, meta = compress_24(w)
    wide = torch.zeros(37, 31, dtype=torch.bfloat16, device=dev)
    wide[:, :30] = values.to(dev)
    odd = wide[:, :30]                                     # row stride 31
    assert odd.stride(0) % 2 == 1
    x = torch.randn(9, 60, generator=gen).to(torch.bfloat16)
    a = sparse24_linear(x.to(dev), values.to(dev), meta.to(dev), impl="dot")
    b = sparse24_linear(x.to(dev), odd, meta.to(dev), impl="dot")
    assert torch.equal(a, b)


def test_refusals(dev, gen):
    w = torch.zeros(4, 12)
    w[2, 4:7] = 1.0
    with pytest.raises(ValueError, match=r"w: not 2:4 sparse: row 2, group 1 \(columns 4..7\) has 3 nonzeros"):
        compress_24(w)
    with pytest.raises(ValueError, match="w: K = 10 is not a multiple of 4"):
        compress_24(torch.zeros(4, 10))
    values, meta = compress_24(_prune24(gen, 8, 32, torch.float16))
    values, meta = values.to(dev), meta.to(dev)
    x = torch.randn(3, 32, device=dev, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"values: expected dtype in \(bfloat16\), got float16"):
        sparse24_linear(x.bfloat16(), values, meta)
    with pytest.raises(ValueError, match=r"meta: expected shape \(8, 4\), got \(8, 3\)"):
        sparse24_linear(x, values, meta[:, :3])
    with pytest.raises(ValueError, match="x: expected last dimension 32"):
        sparse24_linear(x[:, :28], values, meta)
    with pytest.raises(ValueError, match=r"impl='gemv': runs M <= 4 rows, got M = 5"):
        sparse24_linear(torch.randn(5, 32, device=dev, dtype=torch.float16), values, meta, impl="gemv")
