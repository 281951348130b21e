"""What the launchers and references refuse, and the checks' edge cases: int32 accumulators past
quant.linear.MAX_K, residuals of another shape than the output, BSR and 2:4 indices the kernels would read
differently from their references, numpy integers as constexprs, tensors on the meta device. Integer
results are compared exactly; refusals by their messages."""
import dataclasses
import re

import numpy as np
import pytest
import torch

from .kernel_checks import assert_cast_equal, assert_exact, rand_int8
from slimfx.kernels import (BSR, bsr_int8_gemm, bsr_linear, compress_24, int4_grouped_weight_only,
                            int4_weight_only_linear, int8_gemm, int8_weight_only_linear, pack_int4,
                            sparse24_linear, to_bsr)
from slimfx.kernels.block_sparse import bsr_linear_ref
from slimfx.kernels.int8_gemm import int8_gemm_ref
from slimfx.kernels import sparse24
from slimfx.kernels.sparse24 import sparse24_linear_ref
from slimfx.quant.linear import MAX_K
from slimfx.quant.numerics import int_matmul_np, int_matmul_torch

K_MSG = rf"K = {MAX_K + 1} exceeds {MAX_K}: the exact int32 accumulator .* could overflow"


# --- int32 accumulators past MAX_K ---------------------------------------------------------------------

def test_int8_gemm_refuses_k_past_max_k(dev):
    """K = MAX_K + 1 of -128 * -128 sums to 2**31: the kernel's int32 would wrap to -2**31."""
    a = torch.full((1, MAX_K + 1), -128, dtype=torch.int8, device=dev)
    with pytest.raises(ValueError, match=rf"b: {K_MSG}"):
        int8_gemm(a, a, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"b: {K_MSG}"):
        int8_gemm(a, a, torch.ones(1, device=dev), torch.ones(1, device=dev), out_dtype=torch.float32)


def test_bsr_int8_gemm_refuses_k_past_max_k(dev):
    w = torch.zeros(16, MAX_K + 1, dtype=torch.int8)
    w[:, :32] = 1
    bsr = to_bsr(w.to(dev), (16, 32))
    a = torch.ones(1, MAX_K + 1, dtype=torch.int8, device=dev)
    with pytest.raises(ValueError, match=rf"bsr: {K_MSG}"):
        bsr_int8_gemm(a, bsr, torch.ones(1, device=dev), torch.ones(16, device=dev))


@pytest.mark.parametrize("matmul", [int_matmul_np, int_matmul_torch], ids=["numpy", "torch"])
def test_int_matmul_exact_up_to_max_k_refused_past_it(matmul):
    """The references: exact at K = MAX_K (the largest sum that fits), exact past it where the sums fit,
    and OverflowError where they do not (the float64 sums were cast to int32: undefined in numpy)."""
    conv = (lambda t: t.numpy()) if matmul is int_matmul_np else (lambda t: t)
    neg = torch.full((2, MAX_K + 1), -128, dtype=torch.int8)
    got = np.asarray(matmul(conv(neg[:, :MAX_K]), conv(neg[:1, :MAX_K])))
    assert got.dtype == np.int32 and got.tolist() == [[MAX_K * 16384], [MAX_K * 16384]]
    mixed = neg.clone()
    mixed[0, ::2] = 127                                    # (K / 2) * (127 - 128) * -128 = 8388608: fits
    assert np.asarray(matmul(conv(mixed[:1]), conv(neg[:1]))).tolist() == [[(MAX_K + 1) // 2 * 128]]
    name = matmul.__name__
    with pytest.raises(OverflowError, match=rf"{name}: the exact result 2147483648 of K = {MAX_K + 1} int8 products "
                                            r"does not fit the int32 accumulator"):
        matmul(conv(neg), conv(neg[:1]))


# --- residuals -----------------------------------------------------------------------------------------

def test_residual_must_have_the_output_shape(dev, gen):
    """A residual of the output's element count and last dim but another shape was added row-major (torch's
    y + residual refuses it): every launcher with a residual now refuses it, naming the residual."""
    a, b = rand_int8(gen, 2, 3, 32).to(dev), rand_int8(gen, 8, 32).to(dev)
    sa, sb = torch.rand(2, 3, 1, device=dev), torch.rand(8, device=dev)
    msg = r"residual: expected shape \(\.\.\., 8\) with 6 rows, the output's \(2, 3, 8\), got "
    for bad in [(3, 2, 8), (6, 8), (6, 1, 8)]:
        r = torch.zeros(bad, device=dev)
        with pytest.raises(ValueError, match=msg + rf"\({', '.join(map(str, bad))}\)"):
            int8_gemm(a, b, sa, sb, residual=r, out_dtype=torch.float32)
        with pytest.raises(ValueError, match=msg):
            int8_weight_only_linear(a.float(), b, sb, residual=r)
        w = torch.zeros(8, 32, dtype=torch.int8)
        w[:, :32] = 1
        with pytest.raises(ValueError, match=msg):
            bsr_int8_gemm(a, to_bsr(w.to(dev), (16, 32)), sa, sb, residual=r, out_dtype=torch.float32)
        with pytest.raises(ValueError, match=msg):
            bsr_linear(a.half(), to_bsr(w.half().to(dev), (16, 32)), residual=r.half())
    r = torch.randn(2, 3, 8, generator=gen)
    out = int8_gemm(a, b, sa, sb, residual=r.to(dev), out_dtype=torch.float32)     # the output's shape: runs
    assert_cast_equal(out, int8_gemm_ref(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), residual=r, out_dtype=torch.float32))


def test_residual_with_an_empty_output(dev):
    """N = 0 with a residual: an empty output (no "K = 0 (an empty reduction)" for the residual); one of
    another shape is still refused as a residual."""
    a = torch.ones(3, 7, dtype=torch.int8, device=dev)
    b = torch.ones(0, 7, dtype=torch.int8, device=dev)
    s3, s0 = torch.ones(3, device=dev), torch.ones(0, device=dev)
    out = int8_gemm(a, b, s3, s0, residual=torch.zeros(3, 0, device=dev), out_dtype=torch.float32)
    assert out.shape == (3, 0)
    with pytest.raises(ValueError, match=r"residual: expected shape \(\.\.\., 0\) with 3 rows, the output's "
                                         r"\(3, 0\), got \(4, 0\)"):
        int8_gemm(a, b, s3, s0, residual=torch.zeros(4, 0, device=dev), out_dtype=torch.float32)


# --- BSR and 2:4 indices -------------------------------------------------------------------------------

def _bsr(dev, gen):
    """W (40, 48) in 16 x 16 blocks, every block kept: block-row 0 lists block-columns [0, 1, 2]."""
    w = torch.randn(40, 48, generator=gen).half()
    return to_bsr(w.to(dev), (16, 16)), torch.randn(3, 48, generator=gen).half()


def test_bsr_refuses_duplicate_and_unsorted_block_columns(dev, gen):
    """A block-column twice in a row: the kernel summed both blocks, bsr_to_dense (the reference) kept the
    last. Unsorted columns: refused too (compress order is column order)."""
    bsr, x = _bsr(dev, gen)
    assert bsr.col_idx[:3].tolist() == [0, 1, 2]
    for cols, row, shown in [([0, 0, 2], 0, "[0, 0, 2]"), ([2, 1, 0], 0, "[2, 1, 0]")]:
        ci = bsr.col_idx.clone()
        ci[:3] = torch.tensor(cols, dtype=torch.int32)
        bad = dataclasses.replace(bsr, col_idx=ci)
        with pytest.raises(ValueError, match=rf"bsr.col_idx: the block-columns of block-row {row} must be strictly "
                                             rf"increasing \(no duplicates\), got {re.escape(shown)}"):
            bad.check()
        if dev == "cpu":                                   # the launchers check CPU indices
            with pytest.raises(ValueError, match="strictly increasing"):
                bsr_linear(x.to(dev), bad)
    ci = bsr.col_idx.clone()
    ci[3:6] = torch.tensor([0, 2, 2], dtype=torch.int32)    # block-row 1: a duplicate after a row start
    with pytest.raises(ValueError, match=r"block-row 1 must be strictly increasing \(no duplicates\), got \[0, 2, 2\]"):
        dataclasses.replace(bsr, col_idx=ci).check()
    # equal columns across a row boundary are no duplicate; and the valid BSR runs as its reference
    assert bsr.check() is bsr
    np.testing.assert_allclose(bsr_linear(x.to(dev), bsr).float().cpu().numpy(), bsr_linear_ref(x, bsr),
                               rtol=2**-10, atol=2e-3)


def test_sparse24_refuses_metadata_compress_24_cannot_write(dev, gen):
    """i0 == i1 (nibble 0x0) or i0 > i1 (0x1): the dot kernel, the gemv kernel and decompress_24 read these
    three different ways. K = 12 (3 groups): the pad nibble of the last byte is not checked."""
    w = torch.randn(5, 12, generator=gen)
    g = w.view(5, 3, 4)
    g.scatter_(-1, torch.rand(5, 3, 4, generator=gen).argsort(-1)[..., :2], 0.0)
    v, m = compress_24(w)
    assert int(m[0, 1]) >> 4 == 0                          # the pad nibble compress_24 writes: (0, 0)
    x = torch.randn(2, 12, generator=gen)
    np.testing.assert_allclose(sparse24_linear(x.to(dev), v.to(dev), m.to(dev)).cpu().numpy(),
                               sparse24_linear_ref(x, v, m), rtol=1e-5, atol=1e-5)
    for byte, i0, i1 in [(0x00, 0, 0), (0x11, 1, 0)]:
        bad = m.clone()
        bad[3, 0] = (int(m[3, 0]) & 0x0F) | (byte & 0xF0)                  # group 1 of row 3
        msg = rf"meta: row 3, group 1 \(columns 4..7\) has nibble {byte >> 4:#x}, positions i0 = {i0}, i1 = {i1}: " \
              r"expected i0 < i1"
        if dev == "cpu":                                   # the launcher checks CPU metadata
            for impl in ("gemv", "dot"):
                with pytest.raises(ValueError, match=msg):
                    sparse24_linear(x, v, bad, impl=impl)
        with pytest.raises(ValueError, match=msg):         # on a GPU, the caller's check
            sparse24.check_meta(bad.to(dev), 12)
    sparse24.check_meta(m, 12)


# --- numpy integers, meta tensors ----------------------------------------------------------------------

def test_int4_group_size_as_a_numpy_integer(dev, gen):
    """np.int64(32) passes the launchers' integer check; it reached Triton as a non-constexpr and crashed."""
    q = torch.randint(-8, 8, (5, 64), generator=gen, dtype=torch.int8)
    p, s, x = pack_int4(q).to(dev), (torch.rand(5, 2, generator=gen) * 0.1).to(dev), torch.randn(3, 64, generator=gen)
    want = int4_weight_only_linear(x.to(dev), p, s, 32)
    assert torch.equal(int4_weight_only_linear(x.to(dev), p, s, np.int64(32)), want)
    pe, se = p.unsqueeze(0).repeat(2, 1, 1), s.unsqueeze(0).repeat(2, 1, 1)
    offs = torch.tensor([1, 3], dtype=torch.int32, device=dev)
    want = int4_grouped_weight_only(x.to(dev), pe, se, 32, offs)
    assert torch.equal(int4_grouped_weight_only(x.to(dev), pe, se, np.int32(32), offs), want)


def test_meta_tensors_refused_naming_them(gen):
    """A BSR on the meta device was refused by a raw NotImplementedError from its index check (run before
    the device check); to_bsr and compress_24 had no device check."""
    w = torch.randn(32, 32, generator=gen).half()
    bsr = to_bsr(w, (16, 16))
    meta = BSR(*(t.to("meta") for t in (bsr.values, bsr.col_idx, bsr.row_ptr)), bsr.shape, bsr.block,
               bsr.row_order.to("meta"))
    need = r"Triton kernels need CUDA tensors \(or CPU tensors under TRITON_INTERPRET=1\), got device meta"
    with pytest.raises(ValueError, match=rf"bsr.values: {need}"):
        bsr_linear(torch.randn(2, 32, device="meta").half(), meta)
    b8 = to_bsr(torch.ones(32, 64, dtype=torch.int8), (16, 32))
    meta8 = BSR(*(t.to("meta") for t in (b8.values, b8.col_idx, b8.row_ptr)), b8.shape, b8.block)
    with pytest.raises(ValueError, match=rf"bsr.values: {need}"):
        bsr_int8_gemm(torch.ones(2, 64, dtype=torch.int8, device="meta"), meta8, torch.ones(2), torch.ones(32))
    with pytest.raises(ValueError, match=rf"w: {need}"):
        to_bsr(w.to("meta"), (16, 16))
    with pytest.raises(ValueError, match=rf"w: {need}"):
        compress_24(torch.zeros(2, 8, device="meta"))


def test_bsr_int8_within_max_k_still_exact(dev, gen):
    """The checks leave valid calls alone: an int8 BSR GEMM at an odd shape, compared exactly."""
    w = rand_int8(gen, 40, 70)
    w[:, 32:64] = 0
    bsr = to_bsr(w.to(dev), (16, 32))
    a = rand_int8(gen, 3, 70)
    sa, sb = torch.rand(3, generator=gen) * 0.01, torch.rand(40, generator=gen) * 0.01
    out = bsr_int8_gemm(a.to(dev), bsr, sa.to(dev), sb.to(dev), out_dtype=torch.float32)
    assert_cast_equal(out, int8_gemm_ref(a, w, sa, sb, out_dtype=torch.float32))
    assert_exact(int8_gemm(a.to(dev), w.to(dev), out_dtype=torch.int32), int8_gemm_ref(a, w, out_dtype=torch.int32))
