"""numpy implementations of the slimfx quantization ops (the executable spec of ``slimfx.ir.dialect.quant``).

Integer arithmetic is real: int8 codes, int8 x int8 products summed exactly in int32. The arithmetic is
``slimfx.quant``'s numpy twins, the same definitions the torch references call, so the two agree bit for bit
(``weight_only_linear`` up to its float matmul's summation order).
"""
from __future__ import annotations

import numpy as np
import torch

import slimfx.ir.dialect  # noqa: F401  (registers torch.ops.slimfx.*)
from slimfx.quant import linear, logq, numerics

from .optable import numpy_op

ops = torch.ops.slimfx


def _check_int8_range(op: str, qmin: int, qmax: int) -> None:
    if not -128 <= qmin <= qmax <= 127:
        raise ValueError(f"slimfx::{op}: need -128 <= qmin <= qmax <= 127 (int8 codes), got qmin={qmin}, qmax={qmax}")


def _zp(z):
    return 0 if z is None else z


@numpy_op(ops.quantize.default)
def quantize(x, scale, zero_point, qmin, qmax):
    _check_int8_range("quantize", qmin, qmax)
    return numerics.quantize_np(x, scale, _zp(zero_point), qmin, qmax)


@numpy_op(ops.dequantize.default)
def dequantize(q, scale, zero_point=None):
    return numerics.dequantize_np(np.asarray(q), scale, _zp(zero_point))


@numpy_op(ops.quantize_per_token.default)
def quantize_per_token(x, qmax=127):
    _check_int8_range("quantize_per_token", -qmax, qmax)
    return linear.quantize_per_token_np(x, qmax)


@numpy_op(ops.requantize.default)
def requantize(acc, multiplier, zero_point, qmin, qmax):
    _check_int8_range("requantize", qmin, qmax)
    return linear.requantize_np(acc, multiplier, _zp(zero_point), qmin, qmax)


@numpy_op(ops.int8_matmul.default)
def int8_matmul(a, b):
    if a.dtype != np.int8 or b.dtype != np.int8:
        raise ValueError(f"slimfx::int8_matmul: a and b must be int8, got {a.dtype} and {b.dtype}")
    if b.ndim != 2 or a.shape[-1] != b.shape[1]:
        raise ValueError(f"slimfx::int8_matmul: a (..., K) @ b (N, K).T, got a {a.shape}, b {b.shape}")
    return numerics.int_matmul_np(a, b)


@numpy_op(ops.log_quantize.default)
def log_quantize(x, scale, bits=8):
    return logq.log_quantize_np(x, scale, bits)


@numpy_op(ops.log_dequantize.default)
def log_dequantize(q, scale, bits=8):
    return logq.log_dequantize_np(q, scale, bits)


@numpy_op(ops.quantized_linear.default)
def quantized_linear(x, w_q, w_scale, bias=None, x_scale=None):
    if w_q.dtype != np.int8:
        raise ValueError(f"slimfx::quantized_linear: w_q must be int8, got {w_q.dtype}")
    return linear.quantized_linear_np(x, w_q, w_scale, bias, x_scale)


@numpy_op(ops.weight_only_linear.default)
def weight_only_linear(x, w_q, w_scale, w_zero_point=None, bias=None, group_size=0):
    return linear.weight_only_linear_np(x, w_q, w_scale, w_zero_point, bias, group_size)
