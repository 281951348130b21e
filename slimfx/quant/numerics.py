"""Quantization arithmetic, written once in numpy and once in torch, agreeing bit for bit.

Uniform affine:  q = clamp(round(x / s) + z, qmin, qmax);  x' = (q - z) * s   (fp32 throughout)
Rounding is round-half-to-even (numpy.round and torch.round both are), and ``x / s`` is an IEEE fp32
division in both libraries, so the integer outputs are identical. Kernels must match these exactly.

int8 x int8 products accumulate in int32 exactly (K <= 131071 = quant.linear.MAX_K always fits; past it the
int_matmul functions refuse a result outside int32 instead of wrapping it). numpy's integer matmul does not
use BLAS, so ``int_matmul_np`` multiplies in float32 over blocks of ``F32_EXACT_K`` = 1024 along K: every partial sum
of a block's int8 products is an integer of magnitude <= 1024 * 128 * 128 = 2**24, which float32 holds
exactly in any summation order (FMA included); the blocks' results are added in float64 (exact below
2**53). 1.5-2.2x faster than one float64 matmul here (2-core EPYC: 0.41 vs 0.89 ms at 2 x 576 x 1536,
33 vs 54 ms at 2 x 49152 x 576), and exact.
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
    zero_point, scale = np.asarray(zero_point, dtype=np.float32), np.asarray(scale, dtype=np.float32)
    out = np.asarray(q).astype(np.float32)                    # a new array, which (q - z) * s is computed in
    if out.shape != np.broadcast_shapes(out.shape, zero_point.shape, scale.shape):
        return (out - zero_point) * scale
    if zero_point.any():                                      # (subtracting zeros changes no code's value)
        out -= zero_point
    out *= scale
    return out


def absmax_scale_np(x: np.ndarray, axis, qmax: int = SYM_INT8_QMAX) -> np.ndarray:
    """Symmetric scale max|x| / qmax reduced over ``axis`` (keepdims), floored at MIN_SCALE."""
    amax = np.max(np.abs(np.asarray(x, dtype=np.float32)), axis=axis, keepdims=True)
    return np.maximum(amax / np.float32(qmax), np.float32(MIN_SCALE)).astype(np.float32)


F32_EXACT_K = 1024     # int8 products summed over this many terms stay within float32's exact integers
INT8_PRODUCT_MAX = 128 * 128   # the largest |a * b| of two int8 values: |acc| <= K * INT8_PRODUCT_MAX


def _refuse_int32_overflow(name: str, k: int, lo, hi) -> None:
    """An int32 accumulator holds every sum of K int8 products while K * 128 * 128 < 2**31 (K <= 131071,
    quant.linear.MAX_K); past that, refuse a result outside int32 (``lo``, ``hi``: its exact extremes)
    instead of casting it (numpy's cast of an out-of-range float is undefined, a kernel's int32 wraps)."""
    if hi > 2**31 - 1 or lo < -2**31:
        raise OverflowError(f"{name}: the exact result {int(hi) if hi > 2**31 - 1 else int(lo)} of K = {k} int8 "
                            f"products does not fit the int32 accumulator (K <= {2**31 // INT8_PRODUCT_MAX - 1} "
                            f"always fits)")


ROW_CHUNK_BYTES = 1 << 20   # an int8 weight is converted to fp32 this many bytes of rows at a time (see row_chunks)
ROW_CHUNK_MAX_M = 16        # ... when it multiplies at most this many rows (decode); more rows take it whole


def row_chunks(n: int, k: int, m: int = 1) -> list[slice]:
    """Slices over a weight's ``n`` rows of ``k`` values, about ``ROW_CHUNK_BYTES`` of fp32 each, for a product
    with ``m`` rows of activations. At decode's few rows an int8 weight converted to fp32 a chunk at a time stays in
    cache: converted whole, every call wrote a new fp32 copy of it, several times the matmul's own memory traffic
    (2-core EPYC, 4096 x 4096, M = 2: 4-6 ms instead of 22, fp32's matmul 12). Past ``ROW_CHUNK_MAX_M`` rows the
    conversion is a small part of the matmul, and narrow matmuls over chunks cost more: one slice, whole, which
    ``int_matmul_np`` and ``weight_only_linear_np`` multiply as one 2-D GEMM over all leading dims (numpy's batched
    matmul runs one GEMM per leading entry, each reading the whole converted weight: 2 x 16 rows of 4096 x 4096
    took 149 ms instead of 24). Within the chunks they keep the batched form, which OpenBLAS runs faster at these
    few rows (8 rows: 6 ms, one 2-D GEMM per chunk 30)."""
    step = n if m > ROW_CHUNK_MAX_M else max(1, ROW_CHUNK_BYTES // (4 * max(k, 1)))
    return [slice(s, min(s + step, n)) for s in range(0, n, max(step, 1))]


def int_matmul_np(a: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    """Exact int32 result of a @ b_t.T for int8 a (..., K) and b_t (N, K) (see module docstring). For K past
    131071 a result outside int32 is refused (OverflowError), never wrapped. At decode's few rows of ``a``, b_t is
    converted to fp32 a chunk of rows at a time (``row_chunks``)."""
    k = a.shape[-1]
    assert k < 2**39, "K too large for exact float64 block sums"
    a32, b_t = np.asarray(a, dtype=np.float32), np.asarray(b_t)
    if b_t.ndim != 2:
        return _int_matmul_rows(a32, b_t)
    m = a32.size // max(k, 1)
    if m > ROW_CHUNK_MAX_M:         # the whole weight: one GEMM over all leading dims (a batched matmul loops one
        return _int_matmul_rows(a32.reshape(-1, k), b_t).reshape(*a.shape[:-1], b_t.shape[0])   # per entry)
    out = np.empty((*a.shape[:-1], b_t.shape[0]), dtype=np.int32)
    for rows in row_chunks(b_t.shape[0], k, m):
        out[..., rows] = _int_matmul_rows(a32, b_t[rows])
    return out


def _int_matmul_rows(a32: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    k = a32.shape[-1]
    b32 = np.asarray(b_t, dtype=np.float32).swapaxes(-1, -2)
    if k <= F32_EXACT_K:
        return (a32 @ b32).astype(np.int32)
    out = None
    for s in range(0, k, F32_EXACT_K):
        part = (a32[..., s:s + F32_EXACT_K] @ b32[..., s:s + F32_EXACT_K, :]).astype(np.float64)
        out = part if out is None else out + part
    if k * INT8_PRODUCT_MAX >= 2**31 and out.size:
        _refuse_int32_overflow("int_matmul_np", k, out.min(), out.max())
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
    """Exact int32 a @ b_t.T: float32 blocks like the numpy twin on the CPU (module docstring); float64 on
    other devices, where a float32 matmul may run in TF32 (torch.backends.cuda.matmul.allow_tf32) and lose
    bits. torch._int_mm would also do on CUDA, but it has shape restrictions and no CPU kernel for all sizes."""
    if a.device.type != "cpu":
        return _int32(a.to(torch.float64) @ b_t.to(torch.float64).transpose(-1, -2), a.shape[-1])
    a32, b32 = a.to(torch.float32), b_t.to(torch.float32).transpose(-1, -2)
    k = a.shape[-1]
    if k <= F32_EXACT_K:
        return (a32 @ b32).to(torch.int32)
    out = None
    for s in range(0, k, F32_EXACT_K):
        part = (a32[..., s:s + F32_EXACT_K] @ b32[..., s:s + F32_EXACT_K, :]).to(torch.float64)
        out = part if out is None else out + part
    return _int32(out, k)


def _int32(out: torch.Tensor, k: int) -> torch.Tensor:
    """The exact float64 sums as int32; past K = 131071, refused where they leave int32 (as in int_matmul_np)."""
    if k * INT8_PRODUCT_MAX >= 2**31 and out.numel():
        _refuse_int32_overflow("int_matmul_torch", k, float(out.min()), float(out.max()))
    return out.to(torch.int32)
