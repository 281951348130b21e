"""Quantize a whole tensor by a ``QScheme``: parameters from data or from a range, quantize, dequantize.

numpy (``*_np``) and torch (``*_torch``) twins agree bit for bit; the arithmetic is ``numerics`` (uniform)
and ``logq`` (log). Parameters from a range ``[lo, hi]`` (fp32, per parameter slot):
    uniform symmetric   s = max(max(-lo, hi) / qmax, MIN_SCALE), z = 0
    uniform asymmetric  the range is widened to hold 0; s = max((hi - lo) / (qmax - qmin), MIN_SCALE),
                        z = clamp(qmin - round(lo / s), qmin, qmax)   (so 0.0 is exactly representable)
    log                 s = max(max(-lo, hi), MIN_SCALE), z = 0
From data, lo/hi are the min/max over each parameter's slice (see ``scheme`` for the slices).
"""
from __future__ import annotations

import numpy as np
import torch

from . import logq, numerics
from .numerics import MIN_SCALE
from .scheme import QParams, QScheme, check_shape, reduce_axes


def _finite_or_raise(ok: bool, who: str, name: str, shape) -> None:
    if not ok:
        raise ValueError(f"{who}: {name} of shape {tuple(shape)} contains NaN or Inf; "
                         f"cannot compute quantization parameters")


def _grouped(x, scheme: QScheme):
    """``x`` (numpy or torch) viewed as (..., groups, group_size)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // scheme.group_size, scheme.group_size)


def _by_group(fn, x, scheme: QScheme, *params):
    """``fn(x, *params)``, elementwise, with each parameter (in its ``param_shape``) broadcast against ``x``: for
    groups, on ``x`` viewed as (..., groups, group_size) against (..., groups, 1), not on copies of the
    parameters repeated group_size times (numpy and torch alike)."""
    if scheme.granularity != "group":
        return fn(x, *params)
    return fn(_grouped(x, scheme), *(p[..., None] for p in params)).reshape(x.shape)


# --- numpy -------------------------------------------------------------------------------------------

def range_np(x: np.ndarray, scheme: QScheme, name: str = "x") -> tuple[np.ndarray, np.ndarray]:
    """Per-slot (min, max) of ``x`` in ``param_shape(x.shape, scheme)``."""
    x = np.asarray(x, dtype=np.float32)
    check_shape(x.shape, scheme, name)
    _finite_or_raise(bool(np.isfinite(x).all()), "range_np", name, x.shape)
    if scheme.granularity == "group":
        xg = _grouped(x, scheme)
        return xg.min(axis=-1), xg.max(axis=-1)
    axes = reduce_axes(x.ndim, scheme)
    keep = scheme.granularity != "tensor"
    return x.min(axis=axes, keepdims=keep), x.max(axis=axes, keepdims=keep)


def qparams_from_range_np(lo, hi, scheme: QScheme) -> QParams:
    """Scale and zero point for the observed range ``[lo, hi]`` (arrays of any one shape)."""
    lo = np.minimum(np.asarray(lo, dtype=np.float32), np.float32(0))
    hi = np.maximum(np.asarray(hi, dtype=np.float32), np.float32(0))
    zero = np.zeros(lo.shape, dtype=np.int8)
    if scheme.kind == "log":
        return QParams(np.maximum(np.maximum(-lo, hi), np.float32(MIN_SCALE)), zero)
    if scheme.symmetric:
        amax = np.maximum(-lo, hi)
        return QParams(np.maximum(amax / np.float32(scheme.qmax), np.float32(MIN_SCALE)).astype(np.float32), zero)
    scale = np.maximum((hi - lo) / np.float32(scheme.qmax - scheme.qmin), np.float32(MIN_SCALE))
    zp = np.clip(np.float32(scheme.qmin) - np.round(lo / scale), scheme.qmin, scheme.qmax)
    return QParams(scale.astype(np.float32), zp.astype(np.int8))


def qparams_np(x: np.ndarray, scheme: QScheme, name: str = "x") -> QParams:
    """Scale and zero point of ``x`` under ``scheme`` (raises ValueError naming ``name`` on NaN/Inf)."""
    return qparams_from_range_np(*range_np(x, scheme, name), scheme)


def quantize_tensor_np(x: np.ndarray, scheme: QScheme, qp: QParams) -> np.ndarray:
    """int8 codes of ``x`` (same shape) under ``scheme`` with parameters ``qp``."""
    x = np.asarray(x, dtype=np.float32)
    check_shape(x.shape, scheme)
    s, z = np.asarray(qp.scale), np.asarray(qp.zero_point)
    if scheme.kind == "log":
        return _by_group(lambda x, s: logq.log_quantize_np(x, s, scheme.bits), x, scheme, s)
    return _by_group(lambda x, s, z: numerics.quantize_np(x, s, z, scheme.qmin, scheme.qmax), x, scheme, s, z)


def dequantize_tensor_np(q: np.ndarray, scheme: QScheme, qp: QParams) -> np.ndarray:
    q, s, z = np.asarray(q), np.asarray(qp.scale), np.asarray(qp.zero_point)
    if scheme.kind == "log":
        return _by_group(lambda q, s: logq.log_dequantize_np(q, s, scheme.bits), q, scheme, s)
    return _by_group(numerics.dequantize_np, q, scheme, s, z)


def fake_quantize_np(x: np.ndarray, scheme: QScheme, qp: QParams | None = None) -> np.ndarray:
    """dequantize(quantize(x)) in fp32, with parameters from ``x`` itself unless ``qp`` is given."""
    qp = qparams_np(x, scheme) if qp is None else qp
    return dequantize_tensor_np(quantize_tensor_np(x, scheme, qp), scheme, qp)


# --- torch -------------------------------------------------------------------------------------------

def range_torch(x: torch.Tensor, scheme: QScheme, name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().to(torch.float32)
    check_shape(tuple(x.shape), scheme, name)
    _finite_or_raise(bool(torch.isfinite(x).all()), "range_torch", name, x.shape)
    if scheme.granularity == "group":
        xg = _grouped(x, scheme)
        return xg.amin(dim=-1), xg.amax(dim=-1)
    if scheme.granularity == "tensor":
        return x.amin(), x.amax()
    axes = reduce_axes(x.ndim, scheme)
    return x.amin(dim=axes, keepdim=True), x.amax(dim=axes, keepdim=True)


def qparams_from_range_torch(lo, hi, scheme: QScheme) -> QParams:
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0)
    zero = torch.zeros(lo.shape, dtype=torch.int8, device=lo.device)
    if scheme.kind == "log":
        return QParams(torch.clamp(torch.maximum(-lo, hi), min=MIN_SCALE), zero)
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        return QParams(torch.clamp(numerics.div_scalar_torch(amax, scheme.qmax), min=MIN_SCALE), zero)
    scale = torch.clamp(numerics.div_scalar_torch(hi - lo, scheme.qmax - scheme.qmin), min=MIN_SCALE)
    zp = torch.clamp(float(scheme.qmin) - torch.round(lo / scale), scheme.qmin, scheme.qmax)
    return QParams(scale, zp.to(torch.int8))


def qparams_torch(x: torch.Tensor, scheme: QScheme, name: str = "x") -> QParams:
    return qparams_from_range_torch(*range_torch(x, scheme, name), scheme)


def quantize_tensor_torch(x: torch.Tensor, scheme: QScheme, qp: QParams) -> torch.Tensor:
    check_shape(tuple(x.shape), scheme)
    s, z = torch.as_tensor(qp.scale), torch.as_tensor(qp.zero_point)
    if scheme.kind == "log":
        return _by_group(lambda x, s: logq.log_quantize_torch(x, s, scheme.bits), x, scheme, s)
    return _by_group(lambda x, s, z: numerics.quantize_torch(x, s, z, scheme.qmin, scheme.qmax), x, scheme, s, z)


def dequantize_tensor_torch(q: torch.Tensor, scheme: QScheme, qp: QParams) -> torch.Tensor:
    s, z = torch.as_tensor(qp.scale), torch.as_tensor(qp.zero_point)
    if scheme.kind == "log":
        return _by_group(lambda q, s: logq.log_dequantize_torch(q, s, scheme.bits), q, scheme, s)
    return _by_group(numerics.dequantize_torch, q, scheme, s, z)


def fake_quantize_torch(x: torch.Tensor, scheme: QScheme, qp: QParams | None = None) -> torch.Tensor:
    qp = qparams_torch(x, scheme) if qp is None else qp
    return dequantize_tensor_torch(quantize_tensor_torch(x, scheme, qp), scheme, qp)
