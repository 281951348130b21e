"""numpy implementations of ATen's reductions and normalizations (sums, means, extrema, variances, norms,
cumulative ops, softmax, layer and RMS norm), registered in the numpy backend's op table with the rest of
``numpy_ops``."""
from __future__ import annotations

import math

import numpy as np
import torch

from .numpy_ops import axes, const, np_dtype, opmath
from .optable import numpy_op

aten = torch.ops.aten

@numpy_op(aten.mean.dim)
def mean(x, dims, keepdim=False, dtype=None):
    return np.mean(x, axis=tuple(dims) if dims else None, keepdims=keepdim)


@numpy_op(aten.sum.dim_IntList)
def sum_(x, dims, keepdim=False, dtype=None):
    return np.sum(x, axis=tuple(dims) if dims else None, keepdims=keepdim)


@numpy_op(aten.sum.default)
def sum_all(x, dtype=None):
    return np.sum(x)


@numpy_op(aten.argmax.default)
def argmax(x, dim=None, keepdim=False):
    """The first index of the maximum, as torch's CPU kernel; no dim: over the flattened tensor."""
    if dim is None:
        return np.argmax(x)
    return np.argmax(x, axis=dim, keepdims=keepdim)


numpy_op(aten.isnan.default)(np.isnan)


@numpy_op(aten.amax.default)
def amax(x, dims=(), keepdim=False):
    return np.max(x, axis=tuple(dims) if dims else None, keepdims=keepdim)


@numpy_op(aten.max.dim)
def max_dim(x, dim, keepdim=False):
    """(values, indices) along dim; the first index of the maximum, as torch's CPU kernel returns."""
    idx = np.argmax(x, axis=dim, keepdims=True)
    vals = np.take_along_axis(x, idx, axis=dim)
    return (vals, idx) if keepdim else (vals.squeeze(dim), idx.squeeze(dim))


@numpy_op(aten.min.dim)
def min_dim(x, dim, keepdim=False):
    idx = np.argmin(x, axis=dim, keepdims=True)
    vals = np.take_along_axis(x, idx, axis=dim)
    return (vals, idx) if keepdim else (vals.squeeze(dim), idx.squeeze(dim))


@numpy_op(aten.mean.default)
def mean_all(x, dtype=None):
    return np.mean(x.astype(np_dtype(dtype), copy=False) if dtype is not None else x)


@numpy_op(aten.max.default)
def max_all(x):
    return np.max(x)                          # NaN propagates, in both


@numpy_op(aten.min.default)
def min_all(x):
    return np.min(x)


@numpy_op(aten.amin.default)
def amin(x, dims=(), keepdim=False):
    return np.min(x, axis=axes(dims), keepdims=keepdim)


@numpy_op(aten.argmin.default)
def argmin(x, dim=None, keepdim=False):
    """The first index of the minimum (a NaN counts as the minimum), as torch's CPU kernel."""
    if dim is None:
        return np.argmin(x)
    return np.argmin(x, axis=dim, keepdims=keepdim)


def _acc_dtype(x, dtype):
    """The dtype a product accumulates in: dtype if given, int64 for integers and bools (as torch's prod and
    cumprod return), float32 for float16 (torch's opmath), else x's."""
    if dtype is not None:
        return np_dtype(dtype)
    return np.int64 if x.dtype.kind in "biu" else np.float32 if x.dtype == np.float16 else x.dtype.type


@numpy_op(aten.prod.default)
def prod_all(x, dtype=None):
    return np.prod(x, dtype=_acc_dtype(x, dtype))


@numpy_op(aten.prod.dim_int)
def prod(x, dim, keepdim=False, dtype=None):
    return np.prod(x, axis=dim, keepdims=keepdim, dtype=_acc_dtype(x, dtype))


@numpy_op(aten.any.default, aten.any.dim, aten.any.dims)
def any_(x, dim=None, keepdim=False):
    return np.any(x, axis=axes(dim), keepdims=keepdim)      # NaN is nonzero, so true, in both


@numpy_op(aten.all.default, aten.all.dim, aten.all.dims)
def all_(x, dim=None, keepdim=False):
    return np.all(x, axis=axes(dim), keepdims=keepdim)


@numpy_op(aten.count_nonzero.default, aten.count_nonzero.dim_IntList)
def count_nonzero(x, dim=None):
    return np.asarray(np.count_nonzero(x, axis=axes(dim)), dtype=np.int64)


def _var_mean(x, dim, correction, keepdim, root=False):
    """(variance, mean) over dim: squared deviations summed, over max(0, N - correction) (inf or NaN at 0, as in
    torch). torch's CPU kernel accumulates float16 and float32 in float64 and rounds once: so do we."""
    dims = axes(dim)
    x64 = x.astype(np.float64)
    mu = np.mean(x64, axis=dims, keepdims=True)
    dev = x64 - mu
    n = x.size if dims is None else math.prod(x.shape[d] for d in ([dims] if isinstance(dims, int) else dims))
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.sum(dev * dev, axis=dims, keepdims=keepdim) / max(0, n - correction)
    var = np.sqrt(var) if root else var
    mu = mu if keepdim else np.squeeze(mu, axis=dims)
    return np.asarray(var).astype(x.dtype), mu.astype(x.dtype)


def _correction(unbiased, correction):
    """var.dim's unbiased flag or var.correction's correction (None: 1, Bessel's) as a number."""
    return (1 if unbiased else 0) if correction is None else correction


@numpy_op(aten.var.dim, aten.var.correction)
def var(x, dim=None, unbiased=True, keepdim=False, *, correction=None):
    return _var_mean(x, dim, _correction(unbiased, correction), keepdim)[0]


@numpy_op(aten.std.dim, aten.std.correction)
def std(x, dim=None, unbiased=True, keepdim=False, *, correction=None):
    return _var_mean(x, dim, _correction(unbiased, correction), keepdim, root=True)[0]


@numpy_op(aten.var_mean.dim, aten.var_mean.correction)
def var_mean(x, dim=None, unbiased=True, keepdim=False, *, correction=None):
    return _var_mean(x, dim, _correction(unbiased, correction), keepdim)


@numpy_op(aten.std_mean.dim, aten.std_mean.correction)
def std_mean(x, dim=None, unbiased=True, keepdim=False, *, correction=None):
    return _var_mean(x, dim, _correction(unbiased, correction), keepdim, root=True)


@numpy_op(aten.linalg_vector_norm.default)
def linalg_vector_norm(x, ord=2, dim=None, keepdim=False, dtype=None):
    """torch.linalg.vector_norm (F.normalize, Tensor.norm): inf / -inf the largest / smallest |x|, 0 the count of
    nonzeros, else (sum |x|^ord)^(1/ord); x cast to dtype first; float16 summed in float32."""
    a = np.abs(opmath(x.astype(np_dtype(dtype), copy=False) if dtype is not None else x))
    dims, kw = axes(dim), dict(keepdims=keepdim)
    if ord == math.inf:
        return np.max(a, axis=dims, **kw)
    if ord == -math.inf:
        return np.min(a, axis=dims, **kw)
    if ord == 0:
        return np.sum(a != 0, axis=dims, **kw).astype(a.dtype)
    if ord == 1:
        return np.sum(a, axis=dims, **kw)
    if ord == 2:
        return np.sqrt(np.sum(a * a, axis=dims, **kw))
    return np.sum(a ** a.dtype.type(ord), axis=dims, **kw) ** a.dtype.type(1 / ord)


@numpy_op(aten.logsumexp.default)
def logsumexp(x, dim, keepdim=False):
    """log(sum(exp(x - m))) + m with m the max, taken as 0 where it is infinite (torch's composite); integers as
    float32."""
    x = x if x.dtype.kind == "f" else x.astype(np.float32)
    dims = axes(dim)
    m = np.max(x, axis=dims, keepdims=True)
    m[np.isinf(m)] = 0
    out = np.log(np.sum(np.exp(x - m), axis=dims, keepdims=True)) + m
    return out if keepdim else np.squeeze(out, axis=dims)


# torch's CPU cumsum accumulates in acc_type (float32 in float64, float16 in float32) and rounds each partial sum:
# a float32 cumsum of 1e5 values of scale 100 is 2.0 away from torch in float32, identical in float64.
_CUMSUM_ACC = {np.float32: np.float64, np.float16: np.float32}


@numpy_op(aten.diff.default)
def diff(x, n=1, dim=-1, prepend=None, append=None):
    """torch.diff: bools by inequality (numpy's diff does the same), numbers by subtraction."""
    kw = {k: v for k, v in (("prepend", prepend), ("append", append)) if v is not None}
    return np.diff(x, n, axis=dim, **kw)


@numpy_op(aten.cumsum.default)
def cumsum(x, dim, dtype=None):
    """x is cast to dtype first (an int32 cumsum of a float histogram truncates each count); without one,
    integers and bools sum in int64, as in torch."""
    out = np_dtype(dtype, np.int64 if x.dtype.kind in "biu" else x.dtype.type)
    x = x.astype(out, copy=False)
    return np.cumsum(x, axis=dim, dtype=_CUMSUM_ACC.get(out, out)).astype(out, copy=False)


@numpy_op(aten.cumprod.default)
def cumprod(x, dim, dtype=None):
    """As cumsum: cast to dtype first, integers and bools in int64, each partial product in torch's acc_type."""
    out = np_dtype(dtype, np.int64 if x.dtype.kind in "biu" else x.dtype.type)
    x = x.astype(out, copy=False)
    return np.cumprod(x, axis=dim, dtype=_CUMSUM_ACC.get(out, out)).astype(out, copy=False)


@numpy_op(aten.histc.default)
def histc(x, bins=100, lo=0, hi=0):
    """torch.histc: `bins` equal-width bins over [lo, hi] (the data's min and max when lo == hi, widened by 1 each
    way when those are equal too); values outside, and NaN, are dropped; a value equal to hi counts in the last
    bin. The bin is torch's kernel arithmetic in x's dtype: trunc((v - lo) * bins / (hi - lo)). Integer x (which
    only torch's CUDA kernel takes) uses exact integer arithmetic with truncated bounds, as that kernel does."""
    integer = x.dtype.kind in "iu"
    if integer:
        lo, hi = int(lo), int(hi)
    if lo == hi and x.size:
        lo, hi = x.min().item(), x.max().item()
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"torch.histc: range of [{lo}, {hi}] is not finite")
    if not lo < hi:
        raise ValueError("torch.histc: max must be larger than min")
    t = x.dtype.type
    lo, hi = t(lo), t(hi)
    v = x.reshape(-1)
    v = v[(v >= lo) & (v <= hi)]
    if integer:
        pos = (v.astype(np.int64) - int(lo)) * bins // (int(hi) - int(lo))
    else:
        pos = ((v - lo) * t(bins) / (hi - lo)).astype(np.int64)
    pos[pos == bins] = bins - 1
    return np.bincount(pos, minlength=bins).astype(x.dtype)


def _softmax(x, dim):
    m = np.max(x, axis=dim, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=dim, keepdims=True)


@numpy_op(aten.softmax.int, aten._softmax.default)
def softmax(x, dim, half_to_float_or_dtype=None):
    return _softmax(x, dim)


@numpy_op(aten.log_softmax.int, aten._log_softmax.default)
def log_softmax(x, dim, half_to_float_or_dtype=None):
    y = x - np.max(x, axis=dim, keepdims=True)
    return y - np.log(np.sum(np.exp(y), axis=dim, keepdims=True))


@numpy_op(aten.layer_norm.default)
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y = x - np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(y), axis=axes, keepdims=True)
    var += const(x, eps)
    y *= 1 / np.sqrt(var)
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


def _channel_affine(y, x, weight, bias):
    """y * weight + bias, per channel (axis 1 of (N, C, *spatial)), in x's dtype."""
    c = (x.shape[1],) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(c)
    if bias is not None:
        y = y + bias.reshape(c)
    return y.astype(x.dtype, copy=False)


@numpy_op(aten._native_batch_norm_legit_no_training.default)
def batch_norm_no_training(x, weight, bias, running_mean, running_var, momentum, eps):
    """Batch norm in eval mode (export's spelling): x normalized by the running statistics, per channel (axis 1);
    the two saved-statistics outputs are empty, as torch's."""
    return batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps), \
        np.zeros((0,), x.dtype), np.zeros((0,), x.dtype)


@numpy_op(aten.batch_norm.default)
def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    if training or running_mean is None:
        raise NotImplementedError("batch_norm in training mode (statistics of the batch, running ones updated) has "
                                  "no numpy implementation: compile the model in eval mode")
    c = (x.shape[1],) + (1,) * (x.ndim - 2)
    return _channel_affine((x - running_mean.reshape(c)) * (1 / np.sqrt(running_var.reshape(c) + const(x, eps))),
                           x, weight, bias)


@numpy_op(aten.group_norm.default)
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """(N, C, *spatial) normalized over each group of C / num_groups channels and all positions (wav2vec2's
    feature extractor), then a per-channel affine."""
    g = x.reshape(x.shape[0], num_groups, -1)
    y = g - np.mean(g, axis=-1, keepdims=True)
    y = (y * (1 / np.sqrt(np.mean(np.square(y), axis=-1, keepdims=True) + const(x, eps)))).reshape(x.shape)
    return _channel_affine(y, x, weight, bias)


@numpy_op(aten.instance_norm.default)
def instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled=True):
    """(N, C, *spatial) normalized per sample and channel over its positions (biased variance), or, with
    ``use_input_stats`` False (track_running_stats in eval mode), by the running statistics as batch norm; then a
    per-channel affine (style transfer's and some vision decoders' InstanceNorm)."""
    if not use_input_stats:
        return batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps)
    dims = tuple(range(2, x.ndim))
    y = opmath(x)                          # (float16 in float32, rounded once, as torch)
    y = y - np.mean(y, axis=dims, keepdims=True)
    y = y * (1 / np.sqrt(np.mean(np.square(y), axis=dims, keepdims=True) + const(y, eps)))
    return _channel_affine(y, x, weight, bias)


@numpy_op(aten.rms_norm.default)
def rms_norm(x, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x^2) + eps) * weight over the last len(normalized_shape) dims, torch's composite step by step:
    float16 computes in float32 (the weight multiplied there too) and rounds once; eps None is the machine epsilon
    of that computation dtype."""
    y = opmath(x)
    t = y.dtype.type
    eps = np.finfo(y.dtype).eps if eps is None else eps
    dims = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y = y * (t(1) / np.sqrt(np.mean(y * y, axis=dims, keepdims=True) + t(eps)))
    if weight is not None:
        y = y * weight
    return y.astype(x.dtype, copy=False)


@numpy_op(aten._weight_norm.default)
def weight_norm(v, g, dim=0):
    """nn.utils.weight_norm's v * g / ||v||, the norm over every dim but ``dim`` (over all of v for dim -1), in
    float32 for float16 as torch's CPU kernel does."""
    w = opmath(v)
    keep = () if dim == -1 else (dim % v.ndim,)
    norm = np.sqrt(np.sum(w * w, axis=tuple(d for d in range(v.ndim) if d not in keep), keepdims=True))
    return (w * (opmath(np.asarray(g)) / norm)).astype(v.dtype, copy=False)
