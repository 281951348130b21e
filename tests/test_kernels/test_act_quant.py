"""act_quant: per-token int8 quantization (bit-exact against numerics) and its fused norm variants."""
import numpy as np
import pytest
import torch

from slimfx.kernels import norm_quantize_per_token, quantize_per_token
from slimfx.kernels.act_quant import act_quant_ref
from slimfx.quant.numerics import MIN_SCALE

from .kernel_checks import assert_close, assert_exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 40), (5, 97), (33, 200), (2, 3, 50)])
def test_quantize_per_token_bit_exact(dev, gen, dtype, shape):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    q, s = quantize_per_token(x.to(dev))
    q_ref, s_ref = act_quant_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert_exact(q, q_ref)          # max is exact and x / s is correctly rounded: identical integers
    assert_exact(s, s_ref)


def test_round_half_to_even_and_zero_rows(dev):
    # Row 0: max |x| = 127 gives scale 1 exactly, so x / s are exact ties.
    x = torch.zeros(3, 40)
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    x[2, 5] = -1e-3
    q, s = quantize_per_token(x.to(dev))
    assert q[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]
    assert s[0, 0].item() == 1.0
    assert s[1, 0].item() == MIN_SCALE and int(q[1].abs().max()) == 0   # an all-zero row stays finite
    assert q[2, 5].item() == -127
    assert_exact(q, act_quant_ref(x)[0])


def test_nan_and_inf_rows_match_the_reference(dev):
    """A NaN anywhere in a row makes its scale NaN and its codes 0, as numerics and torch give (tl.max and
    tl.maximum dropped the NaN: the kernel returned a finite scale, and 127 for the other elements)."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 1.0, -2.0], [1.0, 2.0, nan], [inf, 1.0, 0.0], [1.0, -3.0, 0.5]])
    q, s = quantize_per_token(x.to(dev))
    q_ref, s_ref = act_quant_ref(x)
    assert_exact(q, q_ref)
    assert q.cpu()[:3].abs().max() == 0 and s.cpu()[:2].isnan().all() and s.cpu()[2].isinf().all()
    assert torch.equal(s.cpu()[3:], torch.from_numpy(s_ref[3:]))
    assert torch.equal(s.cpu().isnan(), torch.from_numpy(np.isnan(s_ref)))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 130)])
def test_norm_quantize(dev, gen, norm, dtype, shape):
    k = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    b = torch.randn(k, generator=gen).to(dtype) if norm == "layernorm" else None
    q, s = norm_quantize_per_token(x.to(dev), w.to(dev), None if b is None else b.to(dev), eps=1e-5, norm=norm)
    q_ref, s_ref = act_quant_ref(x, w, b, eps=1e-5, norm=norm)
    # The row sums are reduced in another order than numpy's: y, hence scale, may differ in the last
    # fp32 bits (rtol 1e-6, a few ulp) and q by one step where y / scale sits on a rounding tie.
    assert_close(s, s_ref, rtol=1e-6, atol=0)
    diff = np.abs(q.cpu().numpy().astype(np.int32) - q_ref.astype(np.int32))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 0.01, f"{(diff > 0).sum()} of {diff.size} values off by one"


def test_norm_quantize_matches_torch_norms(dev, gen):
    """The fused kernel's norm is the usual one: dequantized output vs torch's layer_norm/rms formula."""
    x = torch.randn(4, 96, generator=gen)
    w = torch.rand(96, generator=gen) + 0.5
    b = torch.randn(96, generator=gen)
    ln = torch.nn.functional.layer_norm(x, (96,), w, b, eps=1e-5)
    q, s = norm_quantize_per_token(x.to(dev), w.to(dev), b.to(dev), eps=1e-5, norm="layernorm")
    # int8 rounding error is at most scale / 2 per element (plus fp32 noise).
    assert ((q.cpu().float() * s.cpu() - ln).abs() <= s.cpu() * 0.5001).all()
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    q, s = norm_quantize_per_token(x.to(dev), w.to(dev), norm="rmsnorm")
    assert ((q.cpu().float() * s.cpu() - rms).abs() <= s.cpu() * 0.5001).all()


def test_refusals(dev):
    x = torch.randn(4, 40, device=dev)
    with pytest.raises(TypeError, match=r"x: expected dtype in \(float16, bfloat16, float32\), got int8"):
        quantize_per_token(x.to(torch.int8))
    with pytest.raises(ValueError, match="x: expected unit stride in the last dimension"):
        quantize_per_token(torch.randn(40, 4, device=dev).t())
    with pytest.raises(ValueError, match=r"weight: expected shape \(40,\), got \(41,\)"):
        norm_quantize_per_token(x, torch.ones(41, device=dev))
    with pytest.raises(ValueError, match="bias: only layernorm has a bias"):
        norm_quantize_per_token(x, torch.ones(40, device=dev), torch.ones(40, device=dev), norm="rmsnorm")
    with pytest.raises(ValueError, match="norm: expected one of"):
        norm_quantize_per_token(x, torch.ones(40, device=dev), norm="batchnorm")
    with pytest.raises(ValueError, match="x: K = 40000 exceeds 32768"):
        quantize_per_token(torch.zeros(1, 40000, device=dev))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal outside the interpreter")
def test_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x: Triton kernels need CUDA tensors"):
        quantize_per_token(torch.randn(2, 40))
