"""weight_only: int8 per-channel and int4 per-group weight-only linear vs float64 numpy references."""
import numpy as np
import pytest
import torch

from slimfx.kernels import (int4_weight_only_linear, int8_weight_only_linear, pack_int4,
                            quantize_int4_grouped, quantize_int8_per_channel)
from slimfx.kernels.weight_only import int4_weight_only_ref, int8_weight_only_ref, unpack_int4

from .kernel_checks import UNIT_ROUNDOFF, assert_close, assert_exact, rand_int8

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's exp overflows to inf


def _tol(dtype, ref):
    # The final cast rounds by at most one unit roundoff of |y| (rtol); the fp32 accumulation over
    # K <= 300 terms adds ~K * 2**-24 * max|y| absolute (atol, with a 4x margin). bf16/fp16 products
    # are exact in the fp32 accumulator, so nothing else is lost.
    return dict(rtol=UNIT_ROUNDOFF[dtype], atol=4 * 300 * 2.0**-24 * float(np.abs(ref).max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 45, 71), (5, 130, 200), (33, 33, 96)])
def test_int8_weight_only(dev, gen, dtype, m, n, k):
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, s = rand_int8(gen, n, k), torch.rand(n, generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen).to(dtype)
    out = int8_weight_only_linear(x.to(dev), w.to(dev), s.to(dev), bias=b.to(dev))
    ref = int8_weight_only_ref(x, w, s, bias=b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, **_tol(dtype, ref))


@pytest.mark.parametrize("impl", ["gemv", "dot"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_int8_weight_only_decode_paths(dev, gen, impl, m):
    """Both decode kernels at every M the GEMV takes, K not a multiple of any step, with the epilogue."""
    x = torch.randn(m, 77, generator=gen).to(torch.bfloat16)
    w, s = rand_int8(gen, 37, 77), torch.rand(37, generator=gen) * 0.02 + 1e-3
    b, r = torch.randn(37, generator=gen), torch.randn(m, 37, generator=gen).to(torch.bfloat16)
    out = int8_weight_only_linear(x.to(dev), w.to(dev), s.to(dev), bias=b.to(dev), activation="silu",
                                  residual=r.to(dev), impl=impl)
    ref = int8_weight_only_ref(x, w, s, bias=b, activation="silu", residual=r)
    assert_close(out, ref, **_tol(torch.bfloat16, ref))


@pytest.mark.parametrize("m,k,split", [(1, 200, 3), (16, 96, 4), (7, 32, 2)])
def test_int8_weight_only_split_k(dev, gen, m, k, split):
    """The dot kernel split along K (slices past K add zeros; the tile's last slice sums the fp32 partials
    in order and runs the epilogue), twice in a row: the tile counters reset themselves."""
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w, s = rand_int8(gen, 45, k), torch.rand(45, generator=gen) * 0.02 + 1e-3
    r = torch.randn(m, 45, generator=gen).to(torch.bfloat16)
    ref = int8_weight_only_ref(x, w, s, activation="gelu", residual=r)
    for _ in range(2):
        out = int8_weight_only_linear(x.to(dev), w.to(dev), s.to(dev), activation="gelu", residual=r.to(dev),
                                      _config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split))
        assert_close(out, ref, **_tol(torch.bfloat16, ref))


def test_int8_weight_only_wide_tile_halves(dev, gen):
    """A 128-wide tile with activation + residual (the epilogue on column halves), N past the tile."""
    x = torch.randn(20, 64, generator=gen).to(torch.bfloat16)
    w, s = rand_int8(gen, 200, 64), torch.rand(200, generator=gen) * 0.02 + 1e-3
    r = torch.randn(20, 200, generator=gen).to(torch.bfloat16)
    out = int8_weight_only_linear(x.to(dev), w.to(dev), s.to(dev), activation="silu", residual=r.to(dev),
                                  _config=dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=32))
    ref = int8_weight_only_ref(x, w, s, activation="silu", residual=r)
    assert_close(out, ref, **_tol(torch.bfloat16, ref))


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_int8_weight_only_epilogue(dev, gen, activation):
    x = torch.randn(2, 3, 50, generator=gen).to(torch.bfloat16)
    w, s = rand_int8(gen, 40, 50), torch.rand(40, generator=gen) * 0.02
    r = torch.randn(2, 3, 40, generator=gen).to(torch.bfloat16)
    out = int8_weight_only_linear(x.to(dev), w.to(dev), s.to(dev), activation=activation, residual=r.to(dev))
    ref = int8_weight_only_ref(x, w, s, activation=activation, residual=r)
    assert out.shape == (2, 3, 40)
    assert_close(out, ref, **_tol(torch.bfloat16, ref))


def test_int8_weight_only_matches_float_linear(dev, gen):
    """With weights from quantize_int8_per_channel the layer is close to the float one (relative error
    of the int8 weight rounding, ~0.5/127 per weight; 2% of the output norm is a loose-but-failing bound)."""
    x, w = torch.randn(3, 120, generator=gen), torch.randn(64, 120, generator=gen)
    q, s = quantize_int8_per_channel(w)
    y = int8_weight_only_linear(x.to(dev), q.to(dev), s.to(dev)).cpu()
    assert torch.linalg.norm(y - x @ w.T) <= 0.02 * torch.linalg.norm(x @ w.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,group", [(1, 45, 96, 32), (5, 33, 192, 64), (33, 70, 128, 128)])
def test_int4_weight_only(dev, gen, dtype, m, n, k, group):
    x = torch.randn(m, k, generator=gen).to(dtype)
    p, s = quantize_int4_grouped(torch.randn(n, k, generator=gen), group)
    b = torch.randn(n, generator=gen).to(dtype)
    out = int4_weight_only_linear(x.to(dev), p.to(dev), s.to(dev), group, bias=b.to(dev))
    ref = int4_weight_only_ref(x, p, s, group, bias=b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, **_tol(dtype, ref))


def test_int4_packing(gen):
    q = torch.randint(-8, 8, (7, 24), generator=gen, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, 12)
    assert_exact(unpack_int4(p), q.numpy())
    assert int(p[0, 0]) == (int(q[0, 0]) & 15) | ((int(q[0, 1]) & 15) << 4)   # low nibble = even k
    w = torch.randn(5, 64, generator=gen)
    p, s = quantize_int4_grouped(w, 32)
    deq = unpack_int4(p).float().reshape(5, 2, 32) * s[:, :, None]
    assert int(unpack_int4(p).abs().max()) == 7                    # symmetric [-7, 7], the max is hit
    assert ((deq - w.reshape(5, 2, 32)).abs() <= s[:, :, None] * 0.5001).all()   # rounding: half a step


def test_refusals(dev, gen):
    x = torch.randn(3, 64, device=dev)
    w, s = rand_int8(gen, 8, 64).to(dev), torch.ones(8, device=dev)
    with pytest.raises(TypeError, match=r"w: expected dtype in \(int8\), got float32"):
        int8_weight_only_linear(x, w.float(), s)
    with pytest.raises(TypeError, match=r"x: expected dtype in \(float16, bfloat16, float32\), got int8"):
        int8_weight_only_linear(x.to(torch.int8), w, s)
    with pytest.raises(ValueError, match=r"x: expected last dimension 64"):
        int8_weight_only_linear(x[:, :60], w, s)
    with pytest.raises(ValueError, match=r"w_scale: expected one fp32 scale per output channel \(8 values\)"):
        int8_weight_only_linear(x, w, torch.ones(7, device=dev))
    with pytest.raises(ValueError, match=r"impl='gemv': runs M <= 4 rows, got M = 5"):
        int8_weight_only_linear(torch.randn(5, 64, device=dev), w, s, impl="gemv")
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'gemv', 'dot'\), got 'fast'"):
        int8_weight_only_linear(x, w, s, impl="fast")
    p, sc = quantize_int4_grouped(torch.randn(8, 64), 32)
    p, sc = p.to(dev), sc.to(dev)
    with pytest.raises(ValueError, match="group_size: expected a power of two >= 32, got 48"):
        int4_weight_only_linear(x, p, sc, 48)
    with pytest.raises(ValueError, match="group_size: expected a power of two >= 32, got 32.0"):   # not a & TypeError
        int4_weight_only_linear(x, p, sc, 32.0)
    with pytest.raises(ValueError, match=r"w_scale: required"):        # not an interpreter AttributeError
        int8_weight_only_linear(x, w, None)
    with pytest.raises(ValueError, match=r"x: K = 0 \(an empty reduction\) is not supported"):
        int8_weight_only_linear(x[:, :0], w[:, :0], s)
    with pytest.raises(ValueError, match=r"K = 64 \(2 x 32 bytes\) is not a multiple of group_size 128"):
        int4_weight_only_linear(x, p, sc, 128)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\), got \(8, 1\)"):
        int4_weight_only_linear(x, p, sc[:, :1], 32)
    with pytest.raises(TypeError, match=r"w_packed: expected dtype in \(uint8\), got int8"):
        int4_weight_only_linear(x, p.to(torch.int8), sc, 32)
    with pytest.raises(ValueError, match=r"q: int4 values must lie in \[-8, 7\]"):
        pack_int4(torch.full((2, 4), 9))
