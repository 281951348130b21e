"""Per-token dynamic int8 quantization of activations, optionally fused with the RMSNorm/LayerNorm before it.

For each row x of (M, K), in fp32 (input fp16/bf16/fp32, converted exactly):

    rmsnorm:    y = x / sqrt(sum(x*x)/K + eps) * weight
    layernorm:  c = x - sum(x)/K;  y = c / sqrt(sum(c*c)/K + eps) * weight (+ bias)
    none:       y = x
    scale = max(max|y| / 127, MIN_SCALE)            (slimfx.quant.numerics.absmax_scale_np)
    q     = clamp(round_half_even(y / scale), -127, 127)   (numerics.quantize_np, symmetric)

Divisions and square roots are correctly rounded (tl.math.div_rn / sqrt_rn) like numpy's. Without a
norm the result is bit-exact against the reference on every device (max is exact). With a norm the
row sums are reduced in a different order than numpy's, so y may differ in its last bit and q by one
step where y / scale lands on a rounding tie.
Returns (q int8 (..., K), scale fp32 (..., 1)), ready for int8_gemm(q, w, a_scale=scale, ...).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.kernels import _common as C
from slimfx.quant.numerics import SYM_INT8_QMAX, MIN_SCALE, absmax_scale_np, quantize_np

NORMS = (None, "rmsnorm", "layernorm")
MAX_K = 32768  # one row lives in registers: 32K fp32 over 16 warps is 64 values per thread


def _num_warps(block_k: int) -> int:
    """4 warps up to 2K columns, then more so each thread holds at most ~64 fp32 values."""
    return 4 if C.interpreting() else max(4, min(16, block_k // 512))


@triton.jit
def _act_quant_kernel(x_ptr, w_ptr, b_ptr, q_ptr, s_ptr, K, K_F, stride_xm, stride_qm, eps,
                      NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    mask = rk < K
    x = tl.load(x_ptr + row * stride_xm + rk, mask=mask, other=0.0).to(tl.float32)
    if NORM == "rmsnorm":
        ms = tl.math.div_rn(tl.sum(x * x, axis=0), K_F)
        x = tl.math.div_rn(x, tl.math.sqrt_rn(ms + eps))
        x = x * tl.load(w_ptr + rk, mask=mask, other=0.0).to(tl.float32)
    elif NORM == "layernorm":
        mean = tl.math.div_rn(tl.sum(x, axis=0), K_F)
        x = tl.where(mask, x - mean, 0.0)
        var = tl.math.div_rn(tl.sum(x * x, axis=0), K_F)
        x = tl.math.div_rn(x, tl.math.sqrt_rn(var + eps))
        x = x * tl.load(w_ptr + rk, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + tl.load(b_ptr + rk, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    # a NaN in the row makes the scale NaN, as in the reference (tl.max and tl.maximum drop NaN)
    amax = tl.where(tl.sum(tl.where(mask & (x != x), 1, 0), axis=0) > 0, float("nan"), amax)
    scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)   # MIN_SCALE = fp32 tiny
    scale = tl.where(amax != amax, amax, scale)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * stride_qm + rk, C.quantize_sym(x, scale), mask=mask)


def _launch(x, weight, bias, eps, norm):
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., K) with K > 0, got {tuple(x.shape)}")
    k = x.shape[-1]
    if k > MAX_K:
        raise ValueError(f"x: K = {k} exceeds {MAX_K}, the widest row this kernel keeps in registers")
    x2 = C.as_rows("x", x if x.dim() > 1 else x.view(1, k), k)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if norm is not None:
        C.check_tensor("weight", weight, dtypes=C.FLOAT_DTYPES, shape=(k,), contiguous=True)
    if bias is not None:
        if norm != "layernorm":
            raise ValueError(f"bias: only layernorm has a bias, got norm={norm!r}")
        C.check_tensor("bias", bias, dtypes=C.FLOAT_DTYPES, shape=(k,), contiguous=True)
    dev = C.check_device(x=x2, weight=weight, bias=bias)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=dev)
    scale = torch.empty((m, 1), dtype=torch.float32, device=dev)
    if m:
        d = C.dummy(dev)
        block_k = triton.next_power_of_2(k)
        _act_quant_kernel[(m,)](x2, weight if weight is not None else d, bias if bias is not None else d,
                                q, scale, k, float(k), x2.stride(0), q.stride(0), float(eps), NORM=norm,
                                HAS_BIAS=bias is not None, BLOCK_K=block_k, num_warps=_num_warps(block_k),
                                enable_fp_fusion=False)
    lead = x.shape[:-1]
    return q.view(*lead, k), scale.view(*lead, 1)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) fp16/bf16/fp32 -> (q int8 (..., K), scale fp32 (..., 1)); symmetric, per row."""
    return _launch(x, None, None, 0.0, None)


def norm_quantize_per_token(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            eps: float = 1e-6, norm: str = "rmsnorm") -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm/LayerNorm of x (..., K) with ``weight`` (K,) (and LayerNorm ``bias``), then per-token int8
    quantization, in one pass over x. Returns (q int8 (..., K), scale fp32 (..., 1))."""
    if norm is None:
        raise ValueError("norm: expected 'rmsnorm' or 'layernorm' (use quantize_per_token for no norm)")
    return _launch(x, weight, bias, eps, norm)


def act_quant_ref(x, weight=None, bias=None, eps=1e-6, norm=None) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: the module docstring's formulas with numerics' scale and quantize functions."""
    y = C.np32(x).reshape(-1, x.shape[-1])
    k = np.float32(y.shape[1])
    e = np.float32(eps)
    if norm == "rmsnorm":
        y = y / np.sqrt(np.sum(y * y, axis=1, keepdims=True, dtype=np.float32) / k + e) * C.np32(weight)
    elif norm == "layernorm":
        c = y - np.sum(y, axis=1, keepdims=True, dtype=np.float32) / k
        y = c / np.sqrt(np.sum(c * c, axis=1, keepdims=True, dtype=np.float32) / k + e) * C.np32(weight)
        if bias is not None:
            y = y + C.np32(bias)
    scale = absmax_scale_np(y, axis=1)
    q = quantize_np(y, scale, qmin=-SYM_INT8_QMAX, qmax=SYM_INT8_QMAX)
    lead = tuple(x.shape[:-1])
    return q.reshape(*lead, q.shape[-1]), scale.reshape(*lead, 1)


assert MIN_SCALE == np.float32(1.1754943508222875e-38), "the kernel's MIN_SCALE literal must match numerics"
