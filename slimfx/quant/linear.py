"""Quantized linear layers, numpy and torch twins: the arithmetic behind the dialect's linear ops.

quantized_linear (W8A8, symmetric int8 weights and activations, no zero points), in this exact order:
    1. activations: int8 ``x`` with its ``x_scale`` as given, or float ``x`` quantized per token here:
       s_x = max(max_k |x[.., k]| / 127, MIN_SCALE) (fp32, shape (..., 1)), q_x = clamp(round(x / s_x), -127, 127)
    2. acc = q_x @ q_w.T, exact in int32                      (q_w: (N, K) int8)
    3. y   = float32(acc) * (s_x * s_w)                       the fp32 outer product s_x (..., 1) * s_w (N,) first,
                                                              then one fp32 multiply; float32(acc) rounds to nearest even
    4. y   = y + bias                                         fp32, when bias is given
    5. cast to the output dtype: float32 for int8 ``x``, ``x.dtype`` for float ``x``
Each step is a separate IEEE fp32 operation (no fused multiply-add), so numpy and torch agree bit for bit.

weight_only_linear: w = (q_w - z_w) * s_w in fp32 (per channel: s_w (N,); per group: s_w (N, K // G) over
contiguous groups of K), then y = float32(x) @ w.T + bias, cast to ``x.dtype``. The dequantized weight is
exact and identical in both; the float matmul is not (BLAS summation order), so compare it with a tolerance.
At decode's few rows numpy multiplies a per-channel scale into the product instead, ((x @ (q_w - z_w).T) * s_w,
``weight_only_linear_np``): the same value up to fp32 rounding, which falls on other products and sums.

requantize: q = clamp(round(float32(acc) * multiplier) + z, qmin, qmax) -> int8 (int32 accumulator to int8).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import numerics
from .numerics import SYM_INT8_QMAX

# |acc| <= K * 128 * 128 must stay below 2**31.
MAX_K = numerics.MAX_INT32_K


# --- argument checks (shared; they read shapes only) ---------------------------------------------------

def check_qlinear(x_shape, x_is_int8: bool, x_scale_shape, w_shape, w_scale_shape, bias_shape) -> None:
    """Raise ValueError naming the argument whose shape or presence is wrong for quantized_linear."""
    if len(w_shape) != 2:
        raise ValueError(f"quantized_linear: w_q must be (N, K), got shape {tuple(w_shape)}")
    n, k = w_shape
    if k > MAX_K:
        raise ValueError(f"quantized_linear: K={k} exceeds {MAX_K}; the int32 accumulator could overflow")
    if len(x_shape) < 1 or x_shape[-1] != k:
        raise ValueError(f"quantized_linear: x of shape {tuple(x_shape)} does not end in K={k} of w_q {tuple(w_shape)}")
    if tuple(w_scale_shape) != (n,):
        raise ValueError(f"quantized_linear: w_scale must have shape ({n},) (per output channel), "
                         f"got {tuple(w_scale_shape)}")
    if bias_shape is not None and tuple(bias_shape) != (n,):
        raise ValueError(f"quantized_linear: bias must have shape ({n},), got {tuple(bias_shape)}")
    if x_is_int8:
        if x_scale_shape is None:
            raise ValueError("quantized_linear: int8 x needs x_scale (per tensor () or per token (..., 1))")
        ok = tuple(x_scale_shape) in ((), (1,), tuple(x_shape[:-1]) + (1,))
        if not ok:
            raise ValueError(f"quantized_linear: x_scale must be () or {tuple(x_shape[:-1]) + (1,)} for x of shape "
                             f"{tuple(x_shape)}, got {tuple(x_scale_shape)}")
    elif x_scale_shape is not None:
        raise ValueError("quantized_linear: float x is quantized per token inside; pass x_scale=None "
                         "(or quantize x first and pass int8 x with its x_scale)")


def check_group(w_shape, w_scale_shape, group_size: int, zp_shape=None, name: str = "weight_only_linear") -> None:
    if len(w_shape) != 2:
        raise ValueError(f"{name}: w_q must be (N, K), got shape {tuple(w_shape)}")
    n, k = w_shape
    if group_size < 0:
        raise ValueError(f"{name}: group_size must be >= 0 (0 = per channel), got {group_size}")
    if group_size == 0:
        want = (n,)
    else:
        if k % group_size:
            raise ValueError(f"{name}: group_size={group_size} does not divide K={k} of w_q {tuple(w_shape)}")
        want = (n, k // group_size)
    if tuple(w_scale_shape) != want:
        raise ValueError(f"{name}: w_scale must have shape {want} for group_size={group_size}, "
                         f"got {tuple(w_scale_shape)}")
    if zp_shape is not None and tuple(zp_shape) != want:
        raise ValueError(f"{name}: w_zero_point must have the shape of w_scale {want}, got {tuple(zp_shape)}")


# --- numpy -------------------------------------------------------------------------------------------

def quantize_per_token_np(x: np.ndarray, qmax: int = SYM_INT8_QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic symmetric per-row quantization: (q int8 like x, scale fp32 of shape x.shape[:-1] + (1,))."""
    s = numerics.absmax_scale_np(x, axis=-1, qmax=qmax)
    return numerics.quantize_np(x, s, 0, -qmax, qmax), s


def requantize_np(acc: np.ndarray, multiplier, zero_point=0, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    y = np.asarray(acc).astype(np.float32) * np.asarray(multiplier, dtype=np.float32)
    q = np.round(y) + np.asarray(zero_point, dtype=np.float32)
    return np.clip(q, qmin, qmax).astype(np.int8)


def quantized_linear_np(x, w_q, w_scale, bias=None, x_scale=None):
    x = np.asarray(x)
    x_is_int8 = x.dtype == np.int8
    check_qlinear(x.shape, x_is_int8, None if x_scale is None else np.shape(x_scale), w_q.shape,
                  np.shape(w_scale), None if bias is None else np.shape(bias))
    if x_is_int8:
        q_x, s_x, out_dtype = x, np.asarray(x_scale, dtype=np.float32), np.float32
    else:
        (q_x, s_x), out_dtype = quantize_per_token_np(x), x.dtype
    acc = numerics.int_matmul_np(q_x, w_q)
    y = acc.astype(np.float32)
    y *= s_x * np.asarray(w_scale, dtype=np.float32)        # in place (acc, y: x's rows x N; s_x: one per row)
    if bias is not None:
        y += np.asarray(bias, dtype=np.float32)
    return y.astype(out_dtype, copy=False)


def dequantize_weight_np(w_q, w_scale, w_zero_point=None, group_size: int = 0) -> np.ndarray:
    """(N, K) fp32 weight from int8 (or int4-in-int8) codes, per channel (group_size=0) or per group."""
    check_group(w_q.shape, np.shape(w_scale), group_size, None if w_zero_point is None else np.shape(w_zero_point))
    if group_size == 0:
        s, z = np.asarray(w_scale)[:, None], (0 if w_zero_point is None else np.asarray(w_zero_point)[:, None])
    else:
        s = np.repeat(w_scale, group_size, axis=-1)
        z = 0 if w_zero_point is None else np.repeat(w_zero_point, group_size, axis=-1)
    return numerics.dequantize_np(w_q, s, z)


CHUNK_GEMV_ROWS = 6    # weight_only_linear_np: up to this many rows multiply a converted chunk one GEMV each


def weight_only_linear_np(x, w_q, w_scale, w_zero_point=None, bias=None, group_size: int = 0):
    """x @ dequantize(w).T (+ bias) in fp32. Past ``numerics.ROW_CHUNK_MAX_M`` rows the whole weight is
    dequantized for one GEMM. At decode's few rows the weight's codes are converted a chunk of rows at a time
    (``numerics.row_chunks``) into one fp32 buffer that stays in cache, never a full fp32 copy of the weight; a
    per-channel scale then multiplies the product's columns, not the chunk ((x @ (q - z).T) * s: a pass over the
    weight fewer), and up to CHUNK_GEMV_ROWS rows multiply each chunk one GEMV apiece (OpenBLAS's GEMM of a few
    rows costs more: 2 x 455 x 576 in cache, 279 us against 56); more rows keep x's batched form. 2-core EPYC,
    1536 x 576, 1 row: 330 us instead of 712-956 when every chunk was dequantized into a new array (fp32's own
    GEMV: 57-72 us; converting the codes alone takes some 160)."""
    x = np.asarray(x)
    check_group(w_q.shape, np.shape(w_scale), group_size, None if w_zero_point is None else np.shape(w_zero_point))
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"weight_only_linear: x of shape {x.shape} does not end in K={w_q.shape[1]}")
    (n, k), m = w_q.shape, math.prod(x.shape[:-1])
    xs = x.astype(np.float32, copy=False)
    x32 = xs.reshape(m, k)
    s = np.asarray(w_scale, dtype=np.float32)
    z = None if w_zero_point is None else np.asarray(w_zero_point, dtype=np.float32)
    if m > numerics.ROW_CHUNK_MAX_M:                    # the whole weight: one GEMM (numerics.row_chunks)
        y = x32 @ dequantize_weight_np(w_q, s, z, group_size).T
    else:
        y = np.empty((m, n), dtype=np.float32)
        chunks = numerics.row_chunks(n, k, m)
        buf = np.empty((chunks[0].stop if chunks else 0, k), dtype=np.float32)   # (the first chunk is the largest)
        for rows in chunks:
            w = buf[:rows.stop - rows.start]
            np.copyto(w, w_q[rows], casting="unsafe")   # int8 codes to fp32, exact
            if group_size:                                # (q - z) * s by group, in place
                groups = w.reshape(w.shape[0], -1, group_size)
                if z is not None:
                    groups -= z[rows, :, None]
                groups *= s[rows, :, None]
            elif z is not None and z[rows].any():
                w -= z[rows, None]
            if m <= CHUNK_GEMV_ROWS:
                for i in range(m):
                    np.dot(w, x32[i], out=y[i, rows])
            else:                   # x's own leading dims: (B, 1, K) multiplies one GEMV per entry (row_chunks)
                y.reshape(*x.shape[:-1], n)[..., rows] = xs @ w.T
        if not group_size:
            y *= s
    y = y.reshape(*x.shape[:-1], n)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return y.astype(x.dtype)


# --- torch -------------------------------------------------------------------------------------------

def quantize_per_token_torch(x: torch.Tensor, qmax: int = SYM_INT8_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    s = numerics.absmax_scale_torch(x, dim=-1, qmax=qmax)
    return numerics.quantize_torch(x, s, 0, -qmax, qmax), s


def requantize_torch(acc: torch.Tensor, multiplier, zero_point=0, qmin: int = -128, qmax: int = 127):
    m = torch.as_tensor(multiplier, dtype=torch.float32, device=acc.device)
    z = torch.as_tensor(zero_point, dtype=torch.float32, device=acc.device)
    q = torch.round(acc.to(torch.float32) * m) + z
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def quantized_linear_torch(x, w_q, w_scale, bias=None, x_scale=None):
    x_is_int8 = x.dtype == torch.int8
    check_qlinear(tuple(x.shape), x_is_int8, None if x_scale is None else tuple(x_scale.shape), tuple(w_q.shape),
                  tuple(w_scale.shape), None if bias is None else tuple(bias.shape))
    if x_is_int8:
        q_x, s_x, out_dtype = x, x_scale.to(torch.float32), torch.float32
    else:
        (q_x, s_x), out_dtype = quantize_per_token_torch(x), x.dtype
    acc = numerics.int_matmul_torch(q_x, w_q)
    y = acc.to(torch.float32) * (s_x * w_scale.to(torch.float32))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def dequantize_weight_torch(w_q, w_scale, w_zero_point=None, group_size: int = 0) -> torch.Tensor:
    check_group(tuple(w_q.shape), tuple(w_scale.shape), group_size,
                None if w_zero_point is None else tuple(w_zero_point.shape))
    if group_size == 0:
        s, z = w_scale[:, None], (0 if w_zero_point is None else w_zero_point[:, None])
    else:
        s = w_scale.repeat_interleave(group_size, dim=-1)
        z = 0 if w_zero_point is None else w_zero_point.repeat_interleave(group_size, dim=-1)
    return numerics.dequantize_torch(w_q, s, z)


def weight_only_linear_torch(x, w_q, w_scale, w_zero_point=None, bias=None, group_size: int = 0):
    w = dequantize_weight_torch(w_q, w_scale, w_zero_point, group_size)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"weight_only_linear: x of shape {tuple(x.shape)} does not end in K={w.shape[1]}")
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
