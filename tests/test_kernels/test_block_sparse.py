"""block_sparse: BSR format round trip, float and int8 BSR GEMMs vs numpy references."""
import numpy as np
import pytest
import torch

from slimfx.kernels.block_sparse import (BSR, bsr_int8_gemm, bsr_int8_gemm_ref, bsr_linear, bsr_linear_ref,
                                         bsr_to_dense, to_bsr)

from .kernel_checks import UNIT_ROUNDOFF, assert_cast_equal, assert_close, rand_int8

BLOCK = (16, 32)


def _block_masked(gen, n, k, density, dtype, block=BLOCK):
    """A dense (n, k) weight whose (block)-blocks are zero with probability 1 - density; one block-row is empty."""
    nb, kb = -(-n // block[0]), -(-k // block[1])
    keep = torch.rand(nb, kb, generator=gen) < density
    keep[min(1, nb - 1)] = False
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    w = rand_int8(gen, n, k) if dtype == torch.int8 else torch.randn(n, k, generator=gen).to(dtype)
    return w * mask.to(w.dtype), keep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_to_bsr_round_trip(gen, dtype):
    w, keep = _block_masked(gen, 45, 100, 0.4, dtype)
    bsr = to_bsr(w, BLOCK)
    assert bsr.values.shape == (int(keep.sum()), 16, 32)
    assert bsr.row_ptr.tolist() == [0] + keep.sum(1).cumsum(0).tolist()
    assert bsr.col_idx.tolist() == keep.nonzero()[:, 1].tolist()
    assert torch.equal(bsr_to_dense(bsr), w)
    assert bsr.density == int(keep.sum()) / keep.numel()
    counts = keep.sum(1)                                     # programs take the longest block-rows first
    assert sorted(bsr.row_order.tolist()) == list(range(len(counts)))
    assert counts[bsr.row_order.long()].tolist() == sorted(counts.tolist(), reverse=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,density", [(1, 45, 100, 0.5), (33, 70, 130, 0.3), (5, 64, 64, 1.0)])
def test_bsr_linear(dev, gen, dtype, m, n, k, density):
    w, _ = _block_masked(gen, n, k, density, dtype)
    bsr = to_bsr(w.to(dev), BLOCK)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    out = bsr_linear(x.to(dev), bsr, bias=b.to(dev))
    ref = bsr_linear_ref(x, bsr, bias=b)
    # fp16/bf16 products are exact in fp32; the final cast rounds by <= one unit roundoff (rtol); fp32
    # accumulation over <= 130 terms adds ~130 * 2**-24 * max|y| (atol, 4x margin).
    assert_close(out, ref, rtol=UNIT_ROUNDOFF[dtype], atol=4 * 130 * 2.0**-24 * float(np.abs(ref).max()))
    empty_row = out[:, 16:32].cpu().float()                     # block-row 1 has no blocks: y = bias
    assert torch.equal(empty_row, b[16:32].float().expand_as(empty_row))
    in_order = BSR(bsr.values, bsr.col_idx, bsr.row_ptr, bsr.shape, bsr.block)   # no row_order: rows in order
    assert torch.equal(bsr_linear(x.to(dev), in_order, bias=b.to(dev)), out)


def test_bsr_linear_epilogue(dev, gen):
    w, _ = _block_masked(gen, 40, 70, 0.5, torch.bfloat16)
    bsr = to_bsr(w.to(dev), BLOCK)
    x = torch.randn(2, 3, 70, generator=gen).to(torch.bfloat16)
    r = torch.randn(2, 3, 40, generator=gen).to(torch.bfloat16)
    out = bsr_linear(x.to(dev), bsr, activation="silu", residual=r.to(dev))
    ref = bsr_linear_ref(x, bsr, activation="silu", residual=r)
    assert out.shape == (2, 3, 40)
    assert_close(out, ref, rtol=2 * UNIT_ROUNDOFF[torch.bfloat16], atol=1e-3)   # + exp's few ulp


def test_wide_blocks_epilogue_on_halves(dev, gen):
    """128-wide blocks with activation + residual: the epilogue runs on column halves (HALVES)."""
    w, _ = _block_masked(gen, 200, 70, 0.5, torch.int8, block=(128, 32))
    bsr = to_bsr(w.to(dev), (128, 32))
    a = rand_int8(gen, 5, 70)
    sa, sb = torch.rand(5, generator=gen) * 0.01, torch.rand(200, generator=gen) * 0.01
    r = torch.randn(5, 200, generator=gen)
    out = bsr_int8_gemm(a.to(dev), bsr, sa.to(dev), sb.to(dev), activation="relu", residual=r.to(dev),
                        out_dtype=torch.float32)
    assert_cast_equal(out, bsr_int8_gemm_ref(a, bsr, sa, sb, activation="relu", residual=r))


@pytest.mark.parametrize("m,n,k", [(1, 45, 100), (33, 70, 130)])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_bsr_int8_gemm(dev, gen, m, n, k, activation):
    w, _ = _block_masked(gen, n, k, 0.4, torch.int8)
    bsr = to_bsr(w.to(dev), BLOCK)
    a = rand_int8(gen, m, k)
    sa, sb = torch.rand(m, generator=gen) * 0.01, torch.rand(n, generator=gen) * 0.01
    b = torch.randn(n, generator=gen)
    out = bsr_int8_gemm(a.to(dev), bsr, sa.to(dev), sb.to(dev), bias=b.to(dev), activation=activation,
                        out_dtype=torch.float32)
    ref = bsr_int8_gemm_ref(a, bsr, sa, sb, bias=b, activation=activation)
    if activation is None:
        assert_cast_equal(out, ref)      # exact int32 accumulator + correctly rounded fp32 epilogue
    else:
        assert_close(out, ref, rtol=1e-6, atol=1e-6)   # device exp differs by a few ulp


@pytest.mark.parametrize("m,n,k", [(1, 45, 112), (33, 70, 96)])     # rows of 16-byte multiples; K tails
def test_tma_kernel(dev, gen, m, n, k):
    """The TMA variant: int8 identical to the tiled kernel and to the exact reference; bf16 within the
    tolerance of test_bsr_linear."""
    if dev == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability >= 9.0")
    w, _ = _block_masked(gen, n, k, 0.4, torch.int8)
    bsr = to_bsr(w.to(dev), BLOCK)
    a = rand_int8(gen, m, k)
    sa, sb = torch.rand(m, generator=gen) * 0.01, torch.rand(n, generator=gen) * 0.01
    args = (a.to(dev), bsr, sa.to(dev), sb.to(dev))
    out = bsr_int8_gemm(*args, out_dtype=torch.float32, impl="tma")
    assert torch.equal(out, bsr_int8_gemm(*args, out_dtype=torch.float32, impl="tiled"))
    assert_cast_equal(out, bsr_int8_gemm_ref(a, bsr, sa, sb))
    wf, _ = _block_masked(gen, n, k, 0.5, torch.bfloat16)
    bsrf = to_bsr(wf.to(dev), BLOCK)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    ref = bsr_linear_ref(x, bsrf)
    out = bsr_linear(x.to(dev), bsrf, impl="tma")
    assert_close(out, ref, rtol=UNIT_ROUNDOFF[torch.bfloat16], atol=4 * 130 * 2.0**-24 * float(np.abs(ref).max()))
    empty = to_bsr(torch.zeros(n, k, dtype=torch.bfloat16, device=dev), BLOCK)     # no blocks: y = bias
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    assert torch.equal(bsr_linear(x.to(dev), empty, bias=b.to(dev), impl="tma").cpu(), b.expand(m, n))


GLUON_OK = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_gluon_refusals(dev, gen):
    w, _ = _block_masked(gen, 32, 64, 0.5, torch.int8)
    bsr = to_bsr(w.to(dev), BLOCK)
    a = rand_int8(gen, 3, 64).to(dev)
    s = torch.ones(3, device=dev), torch.ones(32, device=dev)
    empty = to_bsr(torch.zeros_like(w).to(dev), BLOCK)              # no blocks: nothing to launch, still refused
    if not GLUON_OK:
        for weight in (bsr, empty):
            with pytest.raises(ValueError, match=r"impl='gluon': (Gluon kernels run on a CUDA device only|the "
                                                 r"kernel is written for Hopper's wgmma)"):
                bsr_int8_gemm(a, weight, *s, impl="gluon")
    for weight in (w, torch.zeros_like(w)):
        with pytest.raises(ValueError, match=r"impl='gluon': the Gluon kernel is the int8 form"):
            bsr_linear(torch.randn(3, 64, device=dev, dtype=torch.float16),
                       to_bsr(weight.to(torch.float16).to(dev), BLOCK), impl="gluon")


@pytest.mark.skipif(not GLUON_OK, reason="the Gluon kernels run on sm_90 only (compiled for it on the CPU by "
                                         "test_aot)")
@pytest.mark.parametrize("block", [(64, 64), (128, 128)])
def test_gluon_bsr_int8_every_config_bit_exact(gen, block):
    """The block-sparse Gluon kernel, each config pinned: identical to the tiled kernel (exact int32 sums,
    one epilogue), with ragged M, N and K and an empty block-row."""
    from slimfx.kernels import int8_gemm_gluon as G
    m, n, k = 300, 330, 400
    w, _ = _block_masked(gen, n, k, 0.4, torch.int8, block)
    bsr = to_bsr(w.cuda(), block)
    a = rand_int8(gen, m, k).cuda()
    sa, sb = torch.rand(m, device="cuda") * 0.01, torch.rand(n, device="cuda") * 0.01
    b = torch.randn(n, device="cuda")
    want = bsr_int8_gemm(a, bsr, sa, sb, bias=b, out_dtype=torch.bfloat16, impl="tiled")
    assert torch.equal(bsr_int8_gemm(a, bsr, sa, sb, bias=b, out_dtype=torch.bfloat16, impl="gluon"), want)
    for cfg in G.BSR_CONFIGS:
        out = torch.empty_like(want)
        G.launch_bsr(a, bsr, out, sa, sb, b, config=cfg)
        assert torch.equal(out, want), cfg


def test_refusals(dev, gen):
    w, _ = _block_masked(gen, 32, 64, 0.5, torch.float16)
    bsr = to_bsr(w.to(dev), BLOCK)
    x = torch.randn(3, 64, device=dev, dtype=torch.float16)
    with pytest.raises(ValueError, match="block\\[1\\]: expected a power of two >= 16"):
        to_bsr(w, (16, 24))
    with pytest.raises(TypeError, match=r"w: expected dtype in \(float16, bfloat16, int8\), got float32"):
        to_bsr(w.float())
    w8 = w.mul(10).round().to(torch.int8)
    with pytest.raises(ValueError, match=r"block\[1\]: int8 blocks need BK >= 32 \(the K of an int8 tensor-core "
                                         r"dot\), got 16"):
        to_bsr(w8, (32, 16))
    to_bsr(w8.float().half(), (32, 16))                          # fp16 blocks may be 16 wide
    bsr16 = to_bsr(w8.to(dev), (32, 32))
    bsr16.values, bsr16.block = bsr16.values.reshape(-1, 32, 2, 16)[:, :, 0].contiguous(), (32, 16)
    with pytest.raises(ValueError, match=r"bsr.block: int8 blocks need BK >= 32"):
        bsr_int8_gemm(x.to(torch.int8), bsr16, torch.ones(3, device=dev), torch.ones(32, device=dev))
    with pytest.raises(TypeError, match="bsr.values: expected x's dtype"):
        bsr_linear(x.bfloat16(), bsr)
    with pytest.raises(ValueError, match="x: expected last dimension 64"):
        bsr_linear(x[:, :48], bsr)
    with pytest.raises(TypeError, match="bsr: expected a BSR"):
        bsr_linear(x, w)
    with pytest.raises(TypeError, match=r"bsr.values: expected dtype in \(int8\)"):
        bsr_int8_gemm(x.to(torch.int8), bsr, torch.ones(3, device=dev), torch.ones(32, device=dev))
    bad = to_bsr(w.to(dev), BLOCK)
    bad.col_idx = bad.col_idx.clone()
    bad.col_idx[0] = -1                                      # read before x: refused, not computed
    with pytest.raises(ValueError, match=r"bsr.col_idx: block-columns must be in \[0, 2\), got -1"):
        bad.check() if bad.values.is_cuda else bsr_linear(x, bad)
    bad = to_bsr(w.to(dev), BLOCK)
    bad.row_ptr = bad.row_ptr.clone()
    bad.row_ptr[-1] += 1                                     # read past the blocks
    with pytest.raises(ValueError, match="bsr.row_ptr: expected offsets rising from 0"):
        bad.check() if bad.values.is_cuda else bsr_linear(x, bad)
    bsr8 = to_bsr(w8.to(dev), (32, 32))
    for a_s, w_s in [(None, torch.ones(32, device=dev)), (torch.ones(3, device=dev), None)]:
        # both scales are read: a placeholder was read out of bounds (values near 1e33, no error)
        with pytest.raises(ValueError, match="a_scale and w_scale: both required"):
            bsr_int8_gemm(x.to(torch.int8), bsr8, a_s, w_s)
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'tiled', 'tma', 'gluon'\), got 'x'"):
        bsr_linear(x, bsr, impl="x")
    w60, _ = _block_masked(gen, 32, 60, 0.5, torch.float16)
    with pytest.raises(ValueError, match=r"impl='tma': TMA needs row strides that are multiples of 16 bytes, "
                                         r"got x 120, values 64"):
        bsr_linear(torch.randn(3, 60, device=dev, dtype=torch.float16), to_bsr(w60.to(dev), BLOCK), impl="tma")
    with pytest.raises(ValueError, match=r"bsr.row_order: expected shape \(2,\), got \(3,\)"):
        bsr_linear(x, BSR(bsr.values, bsr.col_idx, bsr.row_ptr, bsr.shape, bsr.block,
                          torch.zeros(3, dtype=torch.int32, device=dev)))
    broken = BSR(bsr.values, bsr.col_idx.long(), bsr.row_ptr, bsr.shape, bsr.block)
    with pytest.raises(TypeError, match=r"bsr.col_idx: expected dtype in \(int32\)"):
        bsr_linear(x, broken)
