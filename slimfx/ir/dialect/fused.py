"""The slimfx fusion ops: ``torch.ops.slimfx.<name>``, each with a torch reference and a fake impl.

    fused_linear(x, w, bias?, activation="none", residual?) -> x.dtype
        y = act(linear(x, w, bias)) + residual, with act one of ACTIVATIONS:
        "none", "relu", "silu", "gelu" (erf), "gelu_tanh" (torch's gelu(approximate="tanh")).
        Each step is the ATen op it replaces, in the same order, so a fused graph computes what the
        unfused one did (bit for bit in torch and in the numpy backend, whose twin calls the same
        numpy functions as the unfused ops).
    norm_quantize_per_token(x, weight, bias?, eps, norm) -> (int8 q (..., K), fp32 scale (..., 1))
        norm "layernorm": layer_norm(x, (K,), weight, bias, eps)
        norm "rmsnorm":   weight * (x * rsqrt(mean(x**2, -1, keepdim) + eps))   (the ATen form Llama's
                          RMSNorm captures as; bias must be None)
        then quantize_per_token (slimfx.quant.linear): the int8 input and per-token scale that
        ``quantized_linear(q, w_q, w_scale, bias, x_scale=scale)`` takes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from slimfx.quant import linear

ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")
NORMS = ("layernorm", "rmsnorm")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"slimfx::fused_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")


def activate(y: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


@torch.library.custom_op("slimfx::fused_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w, Tensor? bias=None, str activation='none', "
                                "Tensor? residual=None) -> Tensor")
def fused_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
                 residual: Optional[Tensor] = None) -> Tensor:
    check_activation(activation)
    y = activate(F.linear(x, w, bias), activation)
    return y if residual is None else y + residual


@fused_linear.register_fake
def _(x, w, bias=None, activation="none", residual=None):
    check_activation(activation)
    torch._check(x.shape[-1] == w.shape[1], lambda: "slimfx::fused_linear: K of x and w differ")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def check_norm(norm: str, bias) -> None:
    if norm not in NORMS:
        raise ValueError(f"slimfx::norm_quantize_per_token: norm must be one of {NORMS}, got {norm!r}")
    if norm == "rmsnorm" and bias is not None:
        raise ValueError("slimfx::norm_quantize_per_token: bias: rmsnorm has no bias")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in the ATen form Llama captures as (pow, mean, add, rsqrt, mul, mul)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean([-1], keepdim=True) + eps))


@torch.library.custom_op("slimfx::norm_quantize_per_token", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, float eps, str norm) -> (Tensor, Tensor)")
def norm_quantize_per_token(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                            norm: str) -> tuple[Tensor, Tensor]:
    check_norm(norm, bias)
    y = rms_norm(x, weight, eps) if norm == "rmsnorm" else F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return linear.quantize_per_token_torch(y)


@norm_quantize_per_token.register_fake
def _(x, weight, bias, eps, norm):
    check_norm(norm, bias)
    if not x.dtype.is_floating_point:
        raise ValueError(f"slimfx::norm_quantize_per_token: x must be a floating-point tensor, got {x.dtype}")
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


OPS = {name: getattr(torch.ops.slimfx, name).default for name in ("fused_linear", "norm_quantize_per_token")}
