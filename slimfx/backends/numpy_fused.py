"""numpy implementations of the slimfx fusion ops (``slimfx.ir.dialect.fused``) and of sparse_linear
(``slimfx.ir.dialect.sparse``: fused_linear's math over the dense weight; the pattern only matters to a
backend with sparse kernels).

Each calls the numpy backend's own implementations of the ATen ops it replaces, in the same order, so a
fused graph on the numpy backend gives bit for bit what the unfused graph gave.
"""
from __future__ import annotations

import numpy as np
import torch

import slimfx.ir.dialect  # noqa: F401  (registers torch.ops.slimfx.*)
from slimfx.ir.dialect.fused import check_activation, check_norm
from slimfx.ir.dialect.sparse import parse_pattern
from slimfx.quant import linear as qlinear

from . import numpy_ops as N
from . import numpy_reduce as R
from .optable import numpy_op

ops = torch.ops.slimfx

_ACT = {"none": lambda y: y, "relu": N.relu, "silu": N.silu, "gelu": N.gelu,
        "gelu_tanh": lambda y: N.gelu(y, approximate="tanh")}


@numpy_op(ops.fused_linear.default)
def fused_linear(x, w, bias=None, activation="none", residual=None):
    check_activation(activation)
    y = _ACT[activation](N.linear(x, w, bias))
    return y if residual is None else N.add(y, residual)


@numpy_op(ops.sparse_linear.default)
def sparse_linear(x, w, bias=None, activation="none", residual=None, pattern="2:4"):
    parse_pattern(pattern)
    return fused_linear(x, w, bias, activation, residual)


def rms_norm(x, weight, eps):
    ms = R.mean(N.pow_(x, 2), [-1], True)
    return N.mul(weight, N.mul(x, N.rsqrt(N.add(ms, eps).astype(x.dtype))))


@numpy_op(ops.norm_quantize_per_token.default)
def norm_quantize_per_token(x, weight, bias, eps, norm):
    check_norm(norm, bias)
    x = np.asarray(x)
    y = rms_norm(x, weight, eps) if norm == "rmsnorm" else R.layer_norm(x, [x.shape[-1]], weight, bias, eps)
    return qlinear.quantize_per_token_np(y)
