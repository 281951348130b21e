"""The slimfx quantization ops: ``torch.ops.slimfx.<name>``, each with a torch reference and a fake impl.

The references call ``slimfx.quant`` (the one definition of the arithmetic); the numpy backend's twins live
in ``slimfx.backends.numpy_quant``. Fake impls compute output shapes and dtypes (symbolic shapes pass
through untouched), so graphs holding these ops export with dynamic dimensions, and check what the references
check without reading values (operand dtypes, the int8 range), so the verifier refuses a pass that wires a float
tensor where codes go, naming the op, rather than the first call. Integer codes are int8 in
every op, 4-bit codes included; scales are fp32; zero points are any integer or float dtype (read as fp32).

    quantize(x, scale, zero_point?, qmin, qmax) -> int8        clamp(round(x / scale) + zp, qmin, qmax)
    dequantize(q, scale, zero_point?) -> fp32                  (q - zp) * scale
    quantize_per_token(x, qmax=127) -> (int8 q, fp32 scale (..., 1))   dynamic symmetric, per row
    requantize(acc, multiplier, zero_point?, qmin, qmax) -> int8  clamp(round(fp32(acc) * multiplier) + zp, ..)
    int8_matmul(a, b) -> int32                                 a (..., K) @ b (N, K).T, exact
    log_quantize(x, scale, bits) -> int8 / log_dequantize(q, scale, bits) -> fp32   (see slimfx.quant.logq)
    quantized_linear(x, w_q, w_scale, bias?, x_scale?) -> float        (see slimfx.quant.linear for the order)
    weight_only_linear(x, w_q, w_scale, w_zero_point?, bias?, group_size=0) -> x.dtype
``scale``/``zero_point`` of the elementwise ops broadcast against the input and must not enlarge it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from slimfx.quant import linear, logq, numerics


def _check_int8_range(op: str, qmin: int, qmax: int) -> None:
    if not -128 <= qmin <= qmax <= 127:
        raise ValueError(f"slimfx::{op}: need -128 <= qmin <= qmax <= 127 (int8 codes), got qmin={qmin}, qmax={qmax}")


def _check_broadcast(op: str, name: str, p: Optional[Tensor], like: Tensor) -> None:
    if p is None:
        return
    if p.ndim > like.ndim or any(ps not in (1, xs) for ps, xs in zip(reversed(p.shape), reversed(like.shape))):
        raise ValueError(f"slimfx::{op}: {name} of shape {tuple(p.shape)} does not broadcast to the input's "
                         f"shape {tuple(like.shape)} without enlarging it")


def _check_float(op: str, name: str, t: Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"slimfx::{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_int(op: str, name: str, t: Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"slimfx::{op}: {name} must be an integer tensor, got {t.dtype}")


def _zp(z: Optional[Tensor]):
    return 0 if z is None else z


# --- uniform -----------------------------------------------------------------------------------------

@torch.library.custom_op("slimfx::quantize", mutates_args=(),
                         schema="(Tensor x, Tensor scale, Tensor? zero_point, int qmin, int qmax) -> Tensor")
def quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int) -> Tensor:
    _check_float("quantize", "x", x)
    _check_int8_range("quantize", qmin, qmax)
    _check_broadcast("quantize", "scale", scale, x)
    _check_broadcast("quantize", "zero_point", zero_point, x)
    return numerics.quantize_torch(x, scale, _zp(zero_point), qmin, qmax)


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    _check_float("quantize", "x", x)
    _check_int8_range("quantize", qmin, qmax)
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("slimfx::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None) -> Tensor:
    _check_int("dequantize", "q", q)
    _check_broadcast("dequantize", "scale", scale, q)
    _check_broadcast("dequantize", "zero_point", zero_point, q)
    return numerics.dequantize_torch(q, scale, _zp(zero_point))


@dequantize.register_fake
def _(q, scale, zero_point=None):
    _check_int("dequantize", "q", q)
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("slimfx::quantize_per_token", mutates_args=(),
                         schema="(Tensor x, int qmax=127) -> (Tensor, Tensor)")
def quantize_per_token(x: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    _check_float("quantize_per_token", "x", x)
    _check_int8_range("quantize_per_token", -qmax, qmax)
    return linear.quantize_per_token_torch(x, qmax)


@quantize_per_token.register_fake
def _(x, qmax=127):
    _check_float("quantize_per_token", "x", x)
    _check_int8_range("quantize_per_token", -qmax, qmax)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("slimfx::requantize", mutates_args=(),
                         schema="(Tensor acc, Tensor multiplier, Tensor? zero_point, int qmin, int qmax) -> Tensor")
def requantize(acc: Tensor, multiplier: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int) -> Tensor:
    _check_int("requantize", "acc", acc)
    _check_int8_range("requantize", qmin, qmax)
    _check_broadcast("requantize", "multiplier", multiplier, acc)
    _check_broadcast("requantize", "zero_point", zero_point, acc)
    return linear.requantize_torch(acc, multiplier, _zp(zero_point), qmin, qmax)


@requantize.register_fake
def _(acc, multiplier, zero_point, qmin, qmax):
    _check_int("requantize", "acc", acc)
    _check_int8_range("requantize", qmin, qmax)
    return torch.empty_like(acc, dtype=torch.int8)


def _check_int8_operands(a: Tensor, b: Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"slimfx::int8_matmul: a and b must be int8, got {a.dtype} and {b.dtype}")


@torch.library.custom_op("slimfx::int8_matmul", mutates_args=())
def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    _check_int8_operands(a, b)
    if b.ndim != 2 or a.shape[-1] != b.shape[1]:
        raise ValueError(f"slimfx::int8_matmul: a (..., K) @ b (N, K).T, got a {tuple(a.shape)}, b {tuple(b.shape)}")
    return numerics.int_matmul_torch(a, b)


@int8_matmul.register_fake
def _(a, b):
    _check_int8_operands(a, b)
    torch._check(a.shape[-1] == b.shape[1], lambda: "slimfx::int8_matmul: K of a and b differ")
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=torch.int32)


# --- logarithmic -------------------------------------------------------------------------------------

@torch.library.custom_op("slimfx::log_quantize", mutates_args=(),
                         schema="(Tensor x, Tensor scale, int bits=8) -> Tensor")
def log_quantize(x: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    _check_float("log_quantize", "x", x)
    _check_broadcast("log_quantize", "scale", scale, x)
    return logq.log_quantize_torch(x, scale, bits)


@log_quantize.register_fake
def _(x, scale, bits=8):
    _check_float("log_quantize", "x", x)
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("slimfx::log_dequantize", mutates_args=(),
                         schema="(Tensor q, Tensor scale, int bits=8) -> Tensor")
def log_dequantize(q: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    _check_int("log_dequantize", "q", q)
    _check_broadcast("log_dequantize", "scale", scale, q)
    return logq.log_dequantize_torch(q, scale, bits)


@log_dequantize.register_fake
def _(q, scale, bits=8):
    _check_int("log_dequantize", "q", q)
    return torch.empty_like(q, dtype=torch.float32)


# --- linear ------------------------------------------------------------------------------------------

@torch.library.custom_op("slimfx::quantized_linear", mutates_args=())
def quantized_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                     x_scale: Optional[Tensor] = None) -> Tensor:
    _check_quantized_linear(x, w_q)
    return linear.quantized_linear_torch(x, w_q, w_scale, bias, x_scale)


def _check_quantized_linear(x: Tensor, w_q: Tensor) -> None:
    if w_q.dtype != torch.int8:
        raise ValueError(f"slimfx::quantized_linear: w_q must be int8, got {w_q.dtype}")
    if x.dtype != torch.int8:
        _check_float("quantized_linear", "x", x)


@quantized_linear.register_fake
def _(x, w_q, w_scale, bias=None, x_scale=None):
    _check_quantized_linear(x, w_q)
    torch._check(x.shape[-1] == w_q.shape[1], lambda: "slimfx::quantized_linear: K of x and w_q differ")
    out_dtype = torch.float32 if x.dtype == torch.int8 else x.dtype
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("slimfx::weight_only_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w_q, Tensor w_scale, Tensor? w_zero_point=None, Tensor? bias=None, int group_size=0) -> Tensor")
def weight_only_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero_point: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, group_size: int = 0) -> Tensor:
    _check_float("weight_only_linear", "x", x)
    _check_int("weight_only_linear", "w_q", w_q)
    return linear.weight_only_linear_torch(x, w_q, w_scale, w_zero_point, bias, group_size)


@weight_only_linear.register_fake
def _(x, w_q, w_scale, w_zero_point=None, bias=None, group_size=0):
    _check_float("weight_only_linear", "x", x)
    _check_int("weight_only_linear", "w_q", w_q)
    torch._check(x.shape[-1] == w_q.shape[1], lambda: "slimfx::weight_only_linear: K of x and w_q differ")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=x.dtype)


OPS = {name: getattr(torch.ops.slimfx, name).default for name in (
    "quantize", "dequantize", "quantize_per_token", "requantize", "int8_matmul",
    "log_quantize", "log_dequantize", "quantized_linear", "weight_only_linear")}
