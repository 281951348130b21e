"""Logarithmic quantization, in numpy and torch, agreeing bit for bit.

With L = 2**(bits-1) - 1 exponent levels (int8: 127, int4: 7) and scale s = max|x|:
    code 0                 is exact zero
    code q, 1 <= |q| <= L  is sign(q) * s * 2**(|q| - L)       exponents e in [1 - L, 0]; int8: [-126, 0]
so the largest magnitude (|x| = s) has code +-L and exponent 0. Quantize: e = round(log2(|x| / s)) rounded in
the log domain; e > 0 (|x| above a static scale) saturates at 0; e < 1 - L flushes to zero.

No transcendental function is evaluated, so numpy and torch cannot differ by an ulp of log2:
``frexp`` splits r = |x| / s (one IEEE fp32 division) exactly as m * 2**E with m in [0.5, 1), and
round(log2 r) = E if m > sqrt(1/2) else E - 1. The tie log2 r = k + 0.5 never occurs (2**0.5 is irrational),
so there is no half-way case to break. Dequantize builds 2**e from its fp32 bit pattern (exact: for
e >= -126 it is a normal number) and computes sign * (s * 2**e) as one fp32 multiply. Representable values
s * 2**e round-trip exactly whenever s * 2**e is a normal fp32 number.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# The smallest fp32 above sqrt(1/2): for fp32 m, m >= this  <=>  m > sqrt(1/2).
_T = np.float32(math.sqrt(0.5))
SQRT_HALF_UP = float(_T if float(_T) > math.sqrt(0.5) else np.nextafter(_T, np.float32(1)))


def levels(bits: int) -> int:
    """Number of nonzero magnitudes, L = 2**(bits-1) - 1; also the largest code."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"log quantization: bits must be an int in [2, 8], got {bits!r}")
    return 2 ** (bits - 1) - 1


def log_quantize_np(x: np.ndarray, scale, bits: int = 8) -> np.ndarray:
    L = levels(bits)
    x = np.asarray(x, dtype=np.float32)
    r = np.abs(x) / np.asarray(scale, dtype=np.float32)
    m, E = np.frexp(r)
    e = E.astype(np.int32) - 1 + (m >= np.float32(SQRT_HALF_UP)).astype(np.int32)
    mag = np.minimum(e, 0) + L
    mag = np.where((r > 0) & (mag >= 1), mag, 0)
    return (np.sign(x).astype(np.int32) * mag).astype(np.int8)


def log_dequantize_np(q: np.ndarray, scale, bits: int = 8) -> np.ndarray:
    L = levels(bits)
    q = np.asarray(q).astype(np.int32)
    mag = np.abs(q)
    pow2 = ((np.maximum(mag - L + 127, 1)) << 23).astype(np.int32).view(np.float32)  # 2**(|q| - L)
    out = np.sign(q).astype(np.float32) * (np.asarray(scale, dtype=np.float32) * pow2)
    return out.astype(np.float32)


def log_quantize_torch(x: torch.Tensor, scale, bits: int = 8) -> torch.Tensor:
    L = levels(bits)
    x = x.to(torch.float32)
    r = x.abs() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    m, E = torch.frexp(r)
    e = E.to(torch.int32) - 1 + (m >= SQRT_HALF_UP).to(torch.int32)
    mag = torch.clamp(e, max=0) + L
    mag = torch.where((r > 0) & (mag >= 1), mag, torch.zeros_like(mag))
    return (torch.sign(x).to(torch.int32) * mag).to(torch.int8)


def log_dequantize_torch(q: torch.Tensor, scale, bits: int = 8) -> torch.Tensor:
    L = levels(bits)
    q = q.to(torch.int32)
    mag = q.abs()
    pow2 = (torch.clamp(mag - L + 127, min=1) << 23).to(torch.int32).view(torch.float32)
    s = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    return torch.sign(q).to(torch.float32) * (s * pow2)
