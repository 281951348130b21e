"""Quantization arithmetic, written once in numpy and once in torch, agreeing bit for bit.

Uniform affine:  q = clamp(round(x / s) + z, qmin, qmax);  x' = (q - z) * s   (fp32 throughout)
Rounding is round-half-to-even (numpy.round and torch.round both are), and ``x / s`` is an IEEE fp32
division in both libraries, so the integer outputs are identical. Kernels must match these exactly.

int8 x int8 products accumulate in int32 exactly. numpy's integer matmul does not use BLAS, so
``int_matmul_np`` multiplies in float64: every partial sum of int8 products is an integer below
2**53 (|sum| <= K * 128 * 128 = K * 2**14, exact for K < 2**39), so the float64 BLAS result is exact.
"""
from __future__ import annotations

import numpy as np
import torch

INT8_QMIN, INT8_QMAX = -128, 127
# Symmetric int8 uses [-127, 127] so that negation is closed and the kernels' epilogue stays simple.
SYM_INT8_QMAX = 127
# The smallest scale we emit: keeps x / s finite for an all-zero row or channel.
MIN_SCALE = float(np.finfo(np.float32).tiny)


# --- numpy -------------------------------------------------------------------------------------------

def quantize_np(x: np.ndarray, scale, zero_point=0, qmin: int = INT8_QMIN, qmax: int = INT8_QMAX,
                dtype=np.int8) -> np.ndarray:
    """q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), computed in fp32."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point, dtype=np.float32)
    q = np.round(x / scale) + zero_point
    return np.clip(q, qmin, qmax).astype(dtype)


def dequantize_np(q: np.ndarray, scale, zero_point=0) -> np.ndarray:
    """x' = (q - zero_point) * scale in fp32."""
    zero_point = np.asarray(zero_point, dtype=np.float32)
    return (q.astype(np.float32) - zero_point) * np.asarray(scale, dtype=np.float32)


def absmax_scale_np(x: np.ndarray, axis, qmax: int = SYM_INT8_QMAX) -> np.ndarray:
    """Symmetric scale max|x| / qmax reduced over ``axis`` (keepdims), floored at MIN_SCALE."""
    amax = np.max(np.abs(np.asarray(x, dtype=np.float32)), axis=axis, keepdims=True)
    return np.maximum(amax / np.float32(qmax), np.float32(MIN_SCALE)).astype(np.float32)


def int_matmul_np(a: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    """Exact int32 result of a @ b_t.T for integer a (M, K) and b_t (N, K) (see module docstring)."""
    assert a.shape[-1] < 2**39, "K too large for the exact float64 path"
    out = np.asarray(a, dtype=np.float64) @ np.asarray(b_t, dtype=np.float64).swapaxes(-1, -2)
    return out.astype(np.int32)


# --- torch -------------------------------------------------------------------------------------------

def quantize_torch(x: torch.Tensor, scale, zero_point=0, qmin: int = INT8_QMIN, qmax: int = INT8_QMAX,
                   dtype=torch.int8) -> torch.Tensor:
    """The torch twin of ``quantize_np``; identical integers for identical fp32 inputs."""
    x = x.to(torch.float32)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=x.device)
    q = torch.round(x / scale) + zero_point
    return torch.clamp(q, qmin, qmax).to(dtype)


def dequantize_torch(q: torch.Tensor, scale, zero_point=0) -> torch.Tensor:
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=q.device)
    return (q.to(torch.float32) - zero_point) * torch.as_tensor(scale, dtype=torch.float32, device=q.device)


def div_scalar_torch(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b as an IEEE fp32 division on every device. torch's CUDA kernel multiplies by the reciprocal of a
    Python-scalar divisor (one bit off now and then: seen as act-quant scales differing from the Triton
    kernel's on an H200), so the divisor goes in as a tensor of a's shape."""
    return a / torch.full_like(a, float(b))


def absmax_scale_torch(x: torch.Tensor, dim, qmax: int = SYM_INT8_QMAX) -> torch.Tensor:
    amax = x.to(torch.float32).abs().amax(dim=dim, keepdim=True)
    return torch.clamp(div_scalar_torch(amax, qmax), min=MIN_SCALE)


def int_matmul_torch(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b_t.T. Uses float64 like the numpy twin (exact, see module docstring);
    torch._int_mm would also do on CUDA, but it has shape restrictions and no CPU kernel for all sizes."""
    return (a.to(torch.float64) @ b_t.to(torch.float64).transpose(-1, -2)).to(torch.int32)
