"""numpy implementations of the canonical ATen op set: what BERT-style encoders and Llama-style decoders
(RMSNorm, SiLU-gated MLP, rotary embeddings, grouped-query attention, causal and padding masks), T5's
relative position buckets and mixture-of-experts routing (top-k, sort, histc, index_put) use.
Each function takes numpy arrays / Python values and mirrors the ATen op's semantics; the interpreter
casts every result to the dtype recorded on its node, so torch's type promotion rules hold. Where the
precision of the arithmetic itself changes the answer (a floor of a quotient), ``promoted`` first casts
the operands to torch's result dtype. Ops that transformers defines are in numpy_transformers.py."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
from scipy import special

from .optable import numpy_op

aten = torch.ops.aten

NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
            torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
            torch.uint8: np.uint8, torch.bool: np.bool_}
TORCH_DTYPE = {v: k for k, v in NP_DTYPE.items()}
INT64_MAX = 2**63 - 1


def np_dtype(dt, default=None):
    if dt is None:
        return default
    if dt not in NP_DTYPE:
        raise NotImplementedError(f"the numpy backend has no dtype for {dt} (bfloat16 has no numpy type)")
    return NP_DTYPE[dt]


def promoted(a, b):
    """a and b (arrays or Python scalars) cast to the dtype torch's type promotion gives them, so numpy computes
    in torch's precision: numpy takes int64 array // 0.7 in float64 (floor 9 for 7 // 0.7) where torch takes it in
    float32 (floor 10). torch decides: a Python scalar or a 0-d tensor only contributes its category."""
    a, b = (np.asarray(v) if isinstance(v, np.generic) else v for v in (a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype:
        return a, b
    probe = lambda v: torch.empty((0,) * v.ndim, dtype=TORCH_DTYPE[v.dtype.type]) if isinstance(v, np.ndarray) else v
    dt = NP_DTYPE[torch.result_type(probe(a), probe(b))]
    cast = lambda v: v.astype(dt, copy=False) if isinstance(v, np.ndarray) else v
    return cast(a), cast(b)


def blocked(fn, x, block: int = 1 << 17):
    """fn (elementwise) over cache-sized blocks of x: each of fn's many passes over memory then stays in
    L2. GELU's ~20 numpy passes over a 1024 x 1536 fp32 array: 11.1 ms whole, 5.9 ms in blocks here."""
    if x.size <= 2 * block:
        return fn(x)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, dtype=x.dtype)
    for i in range(0, flat.size, block):
        out[i:i + block] = fn(flat[i:i + block])
    return out.reshape(x.shape)


def opmath(x):
    """x in the precision torch's CPU kernels compute float16 in (float32, rounded back once); others as they are."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def axes(dims):
    """A reduction's dims as numpy's axis: None (every dim) for None and for [], as torch reduces both."""
    if dims is None or isinstance(dims, (list, tuple)) and not dims:
        return None
    return dims if isinstance(dims, int) else tuple(dims)


# --- Python operators on sizes (SymInts become ints here) ------------------------------------------
for _op in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
            operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
            operator.ge, operator.getitem, math.ceil, math.floor,
            operator.and_, operator.or_, operator.xor, operator.not_):   # SymBools: export's runtime asserts
    numpy_op(_op)(_op)
numpy_op(torch.sym_max)(max)
numpy_op(torch.sym_min)(min)
numpy_op(torch.sym_sum)(sum)
numpy_op(torch.sym_float)(float)
numpy_op(torch.sym_int)(int)
numpy_op(torch.sym_not)(operator.not_)


@numpy_op(aten.sym_size.int)
def sym_size(x, dim):
    return x.shape[dim]


@numpy_op(aten.sym_numel.default)
def sym_numel(x):
    return x.size


@numpy_op(aten.sym_storage_offset.default)
def sym_storage_offset(x):
    """torch 2.11's export reads a view's storage offset for its runtime asserts (u >= 0): the element offset
    of the array in its base (numpy's views share no torch storage; 0 for an array that owns its data)."""
    base = x.base if isinstance(x, np.ndarray) else None
    if base is None or not isinstance(base, np.ndarray) or x.itemsize == 0:
        return 0
    return (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // x.itemsize


@numpy_op(aten._assert_scalar.default)
def assert_scalar(cond, msg):
    if not cond:
        raise AssertionError(msg)


# --- elementwise ------------------------------------------------------------------------------------
def wrapped(a, b):
    """A Python int operand of an integer array as torch takes it, cast to the array's dtype with wraparound
    (int8 x < 200 compares with -56, x + 200 adds -56): numpy compares the true value and refuses the sum."""
    def wrap(v, arr):
        if isinstance(v, int) and not isinstance(v, bool) and isinstance(arr, np.ndarray) and arr.dtype.kind in "iu":
            info = np.iinfo(arr.dtype)
            if not info.min <= v <= info.max:
                return (v - info.min) % (int(info.max) - int(info.min) + 1) + int(info.min)
        return v
    return wrap(a, b), wrap(b, a)


@numpy_op(aten.add.Tensor, aten.add.Scalar)
def add(a, b, alpha=1):
    a, b = wrapped(a, b)
    return a + (b * alpha if alpha != 1 else b)


@numpy_op(aten.sub.Tensor, aten.sub.Scalar)
def sub(a, b, alpha=1):
    a, b = wrapped(a, b)
    return a - (b * alpha if alpha != 1 else b)


@numpy_op(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub(a, b, alpha=1):
    return b - (a * alpha if alpha != 1 else a)


@numpy_op(aten.mul.Tensor, aten.mul.Scalar)
def mul(a, b):
    a, b = wrapped(a, b)
    return a * b


@numpy_op(aten.div.Tensor, aten.div.Scalar)
def div(a, b):
    return np.true_divide(a, b)


@numpy_op(aten.div.Tensor_mode)
def div_mode(a, b, rounding_mode=None):
    a, b = promoted(a, b)                  # in torch's dtype: an int64 tensor // 0.7 is a float32 quotient
    if rounding_mode == "floor":
        return np.floor_divide(a, b)
    if rounding_mode == "trunc" and np.result_type(a, b).kind in "iu":
        q = np.abs(a) // np.abs(b)         # exact for integers, where a float quotient rounds beyond 2**53
        return np.where((np.asarray(a) < 0) != (np.asarray(b) < 0), -q, q)
    q = np.true_divide(a, b)
    return np.trunc(q) if rounding_mode == "trunc" else q


@numpy_op(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(a, b):
    """Rounds toward -inf (torch >= 1.13), in torch's result dtype; integer division by zero raises, as in torch."""
    a, b = promoted(a, b)
    if np.result_type(a, b).kind in "iu" and np.any(np.asarray(b) == 0):
        raise ZeroDivisionError("integer floor_divide by zero")
    return np.floor_divide(a, b)


@numpy_op(aten.remainder.Scalar, aten.remainder.Tensor)
def remainder(a, b):
    return np.remainder(*promoted(a, b))   # both take the divisor's sign (Python's %), in torch's dtype


@numpy_op(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
def pow_(a, b):
    if isinstance(b, (int, float)) and b == 2:
        return a * a
    return np.power(a, b)


@numpy_op(aten.pow.Scalar)
def pow_scalar_base(a, b):
    """A Python number raised to a tensor (rotary embeddings: base ** (arange(0, d, 2) / d)), in torch's dtype."""
    return np.power(*promoted(a, b))


def _compare(fn):
    return lambda a, b: fn(*wrapped(a, b))


for _name, _fn in {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
                   "ge": np.greater_equal}.items():
    numpy_op(getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)(_compare(_fn))
numpy_op(aten.logical_and.default)(np.logical_and)
numpy_op(aten.logical_or.default)(np.logical_or)
numpy_op(aten.logical_xor.default)(np.logical_xor)
numpy_op(aten.logical_not.default)(np.logical_not)
# bitwise on integers (5 & 3 = 1, ~5 = -6), logical on bools: numpy's bitwise functions do both, as torch's do
for _name, _fn in {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}.items():
    numpy_op(*[getattr(getattr(aten, op), overload) for op in (f"bitwise_{_name}", f"__{_name}__")
               for overload in ("Tensor", "Scalar") if hasattr(getattr(aten, op), overload)])(_fn)
numpy_op(aten.bitwise_not.default)(np.invert)


@numpy_op(aten.maximum.default, aten.max.other)
def maximum(a, b):
    return np.maximum(*promoted(a, b))        # NaN propagates, in both


@numpy_op(aten.minimum.default, aten.min.other)
def minimum(a, b):
    return np.minimum(*promoted(a, b))


@numpy_op(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def where(cond, a, b):
    return np.where(cond, a, b)


@numpy_op(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(x, mask, value):
    return np.where(mask, np.asarray(value, dtype=x.dtype), x)


@numpy_op(aten.clamp.default)
def clamp(x, lo=None, hi=None):
    return np.clip(x, lo, hi)


@numpy_op(aten.clamp.Tensor)
def clamp_tensor(x, lo=None, hi=None):
    """Bounds that are tensors (broadcast), in torch's promoted dtype; NaN in x stays NaN."""
    if lo is not None:
        x = np.maximum(*promoted(x, lo))
    if hi is not None:
        x = np.minimum(*promoted(x, hi))
    return x


@numpy_op(aten.clamp_min.default, aten.clamp_min.Tensor)
def clamp_min(x, lo):
    return np.maximum(*promoted(x, lo))        # in torch's dtype (a bool clamped by an int is int64); NaN stays


@numpy_op(aten.clamp_max.default, aten.clamp_max.Tensor)
def clamp_max(x, hi):
    return np.minimum(*promoted(x, hi))


@numpy_op(aten.sign.default)
def sign(x):
    """-1, 0 or 1 in x's dtype; NaN and -0.0 give 0 (numpy's sign keeps both) and bools stay, as in torch."""
    if x.dtype == np.bool_:
        return x
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


_UNARY = {aten.neg.default: np.negative, aten.exp.default: np.exp, aten.log.default: np.log,
          aten.sqrt.default: np.sqrt, aten.tanh.default: np.tanh, aten.cos.default: np.cos,
          aten.sin.default: np.sin, aten.abs.default: np.abs,
          aten.reciprocal.default: np.reciprocal, aten.floor.default: np.floor, aten.ceil.default: np.ceil,
          aten.expm1.default: np.expm1, aten.log1p.default: np.log1p}
for _t, _fn in _UNARY.items():
    numpy_op(_t)(_fn)


@numpy_op(aten.square.default)
def square(x):
    return x * x


@numpy_op(aten.softplus.default)
def softplus(x, beta=1, threshold=20):
    """log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (torch's linear region)."""
    bx = x * x.dtype.type(beta)
    return np.where(bx > threshold, x, np.logaddexp(x.dtype.type(0), bx) / x.dtype.type(beta)).astype(x.dtype)


@numpy_op(aten.rsqrt.default)
def rsqrt(x):
    return 1 / np.sqrt(x)


@numpy_op(aten.sigmoid.default)
def sigmoid(x):
    return special.expit(x)


@numpy_op(aten.relu.default)
def relu(x):
    return np.maximum(x, 0)


@numpy_op(aten.silu.default)
def silu(x):
    return blocked(lambda c: c * special.expit(c), x)


# GELU's erf by Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 (6e-7 after fp32 rounding), an absolute bound,
# which is what 0.5 * x * (1 + erf(x / sqrt 2)) needs. Built from np.exp it runs ~4x faster than
# scipy.special.erf on fp32 (5 ms vs 20 ms for 1024x1536 here), and GELU was the numpy backend's largest
# cost on MiniLM. aten.erf itself, where relative accuracy near 0 matters, uses scipy.
_AS_P = np.float32(0.3275911)
_AS_A = tuple(np.float32(v) for v in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


def erf_abs_f32(x):
    """erf of an fp32 array to within 1e-6 absolute (see above)."""
    a = np.abs(x)
    np.minimum(a, np.float32(4), out=a)      # erf(4) is 1 in fp32; keeps exp(-a^2) out of slow subnormals
    t = a * _AS_P
    t += 1
    np.reciprocal(t, out=t)
    poly = _AS_A[4] * t
    for c in _AS_A[3::-1]:
        poly += c
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1, poly, out=poly)
    return np.copysign(poly, x, out=poly)


@numpy_op(aten.erf.default)
def erf(x):
    return special.erf(x)


@numpy_op(aten.gelu.default)
def gelu(x, approximate="none"):
    return blocked(lambda c: _gelu(c, approximate), x)


def const(x, v):
    """A constant in x's precision where that is float64 (else float32, as these ops always computed)."""
    return np.float64(v) if getattr(x, "dtype", None) == np.float64 else np.float32(v)


def _gelu(x, approximate):
    if approximate == "tanh":
        inner = x * x
        inner *= const(x, 0.044715)
        inner += 1
        inner *= x
        inner *= const(x, math.sqrt(2 / math.pi))
        y = np.tanh(inner, out=inner)
    else:
        y = erf_abs_f32(x * np.float32(1 / math.sqrt(2))) if x.dtype == np.float32 else \
            special.erf(x * (1 / math.sqrt(2)))
    y += 1
    y *= x
    y *= const(x, 0.5)
    return y


# --- activations that vision and older language models use. float16 computes in float32 and rounds once, as
# torch's CPU kernels do (the slope 0.01 in float16 is 0.010002: a float16 product would differ by an ulp) --------
@numpy_op(aten.leaky_relu.default)
def leaky_relu(x, negative_slope=0.01):
    y = opmath(x)
    return np.where(y > 0, y, y * y.dtype.type(negative_slope)).astype(x.dtype)


@numpy_op(aten.elu.default)
def elu(x, alpha=1, scale=1, input_scale=1):
    """scale * x for x > 0, else scale * alpha * (exp(input_scale * x) - 1) (torch's expm1)."""
    y = opmath(x)
    t = y.dtype.type
    neg = np.expm1(np.minimum(y, 0) * t(input_scale)) * t(alpha * scale)
    return np.where(y > 0, y * t(scale), neg).astype(x.dtype)


@numpy_op(aten.hardtanh.default)
def hardtanh(x, lo=-1, hi=1):
    """x clamped to [lo, hi]; integer x takes the bounds truncated to integers, as torch converts them."""
    if x.dtype.kind in "iub":
        return np.clip(x, int(lo), int(hi))
    y = opmath(x)
    return np.clip(y, y.dtype.type(lo), y.dtype.type(hi)).astype(x.dtype)


@numpy_op(aten.relu6.default)
def relu6(x):
    return hardtanh(x, 0, 6)


@numpy_op(aten.hardsigmoid.default)
def hardsigmoid(x):
    y = opmath(x)
    t = y.dtype.type
    return (np.clip(y + t(3), t(0), t(6)) / t(6)).astype(x.dtype)


@numpy_op(aten.hardswish.default)
def hardswish(x):
    """x * relu6(x + 3) / 6, multiplied before dividing as torch's kernel does."""
    y = opmath(x)
    t = y.dtype.type
    return (y * np.clip(y + t(3), t(0), t(6)) / t(6)).astype(x.dtype)


@numpy_op(aten.mish.default)
def mish(x):
    """x * tanh(log(1 + exp(x))), torch's formula; exp overflowing to inf gives x, as there."""
    y = opmath(x)
    with np.errstate(over="ignore"):
        return (y * np.tanh(np.log1p(np.exp(y)))).astype(x.dtype)


@numpy_op(aten.glu.default)
def glu(x, dim=-1):
    a, b = np.split(opmath(x), 2, axis=dim)
    return (a * special.expit(b)).astype(x.dtype)


@numpy_op(aten.erfinv.default)
def erfinv(x):
    return special.erfinv(opmath(x)).astype(x.dtype)


numpy_op(aten.isinf.default)(np.isinf)
numpy_op(aten.isfinite.default)(np.isfinite)


@numpy_op(aten.nan_to_num.default)
def nan_to_num(x, nan=None, posinf=None, neginf=None):
    """NaN to 0 (or nan), +-inf to x's dtype's largest / lowest finite values (or posinf / neginf); integers stay."""
    return np.nan_to_num(x, nan=0.0 if nan is None else nan, posinf=posinf, neginf=neginf)


@numpy_op(aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
          aten.lift_fresh_copy.default, aten.dropout.default)
def identity(x, *args, **kwargs):
    return x


@numpy_op(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
          aten.to.other)
def to(x, *args, dtype=None, **kwargs):
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, np.ndarray):         # type_as / to.other
            return x.astype(a.dtype, copy=False)
    return x if dtype is None else x.astype(np_dtype(dtype), copy=False)


# --- sorting ----------------------------------------------------------------------------------------
# Order among equal keys: lowest index first (a stable sort), always. That is torch's answer for sort(stable=True);
# for sort(stable=False) and topk torch leaves it unspecified, and its CPU kernels give whatever their introsort
# (sort beyond 16 elements) or nth_element / partial_sort (topk beyond 3; for topk also *which* of the tied values
# at the k-th place make the cut) happen to leave, which no numpy code reproduces. Any consumer that depends on it
# is not specified by torch either; MoE routing permutes rows by the sort and gathers them back, so it doesn't.
# NaN sorts as the largest value, as in torch.
def _argsort(x, dim, descending):
    if not descending:
        return np.argsort(x, axis=dim, kind="stable")
    rev = np.flip(x, axis=dim)                    # stable descending: sort the reversal, reverse, map indices back
    return x.shape[dim] - 1 - np.flip(np.argsort(rev, axis=dim, kind="stable"), axis=dim)


@numpy_op(aten.sort.default)
def sort(x, dim=-1, descending=False):
    if x.ndim == 0:
        return x, np.zeros((), np.int64)
    idx = _argsort(x, dim, descending)
    return np.take_along_axis(x, idx, axis=dim), idx


@numpy_op(aten.sort.stable)
def sort_stable(x, *, stable=None, dim=-1, descending=False):
    return sort(x, dim, descending)


@numpy_op(aten.topk.default)
def topk(x, k, dim=-1, largest=True, sorted=True):
    """Largest (or smallest) k along dim, in order, ties lowest index first; sorted=False returns them in that
    same order (torch's CPU order is then unspecified)."""
    if x.ndim == 0:
        return x, np.zeros((), np.int64)
    idx = np.take(_argsort(x, dim, largest), np.arange(k), axis=dim)
    return np.take_along_axis(x, idx, axis=dim), idx


@numpy_op(aten.argsort.default)
def argsort(x, dim=-1, descending=False):
    return sort(x, dim, descending)[1]


@numpy_op(aten.argsort.stable)
def argsort_stable(x, *, stable=False, dim=-1, descending=False):
    return sort(x, dim, descending)[1]


# --- linear algebra ---------------------------------------------------------------------------------
GEMV_ROWS = 4                 # rows_times_weight: one GEMV per row at 2..GEMV_ROWS rows ...
GEMV_MIN_BYTES = 2 << 20      # ... of a float weight of at least this many bytes,
GEMV_CACHED_BYTES = 8 << 20   # ... and past 2 rows, of at most this many (one that stays in cache between rows)


def rows_times_weight(x2, w):
    """x2 (M, K) @ w (N, K).T. OpenBLAS (numpy's wheels) runs a GEMM of a few rows far slower than one row's GEMV
    for many shapes (2-core EPYC, OpenBLAS 0.3.29: from N of about 512-640 up, it costs ~70-100 us more; 2 x 1536 x
    576 took 184 us in cache, one row 24). A decode step feeds each sequence 2 tokens (slimfx.lm), so at batch 1 and
    2 these few rows run one GEMV each where the weight holds GEMV_MIN_BYTES or more: there the GEMVs won with the
    weight in cache and streamed from memory alike (as in decoding: 2 x 1536 x 576, 298 us for the GEMM and 176 for
    the GEMVs). Smaller weights with N >= 640 lose to the GEMM too in cache, but not streamed from memory
    (2 x 768 x 576: 145 us for the GEMM, 163 for the GEMVs), so they keep it. Each row then gets exactly the values
    of its 1-row product (for a weight with a unit stride; another is copied once). A weight that does not stay in
    cache is read again by every GEMV, so past 2 rows only weights up to GEMV_CACHED_BYTES take them: SmolLM2's
    lm_head (113 MB) at 4 rows took 16.8 ms as GEMVs and 9.6 as a GEMM. That cap is conservative: square weights
    as large still gained from GEMVs (4096 x 4096 at 3 rows, 4.75 ms against 8.28), which this rule leaves to the
    GEMM."""
    m = x2.shape[0]
    if (2 <= m <= GEMV_ROWS and w.ndim == 2 and x2.dtype == w.dtype and x2.dtype in (np.float32, np.float64)
            and GEMV_MIN_BYTES <= w.nbytes and (m == 2 or w.nbytes <= GEMV_CACHED_BYTES)):
        if not (w.flags.c_contiguous or w.flags.f_contiguous):
            w = np.ascontiguousarray(w)       # once, not in every GEMV (BLAS takes one unit stride)
        y = np.empty((m, w.shape[0]), dtype=x2.dtype)
        for i in range(m):
            np.dot(w, x2[i], out=y[i])
        return y
    return x2 @ w.T


@numpy_op(aten.linear.default)
def linear(x, w, b=None):
    # one 2-D product over all leading dims (numpy would otherwise loop a GEMM per batch entry)
    y = rows_times_weight(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w)     # not -1: K may be 0
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], *w.shape[:-1])      # a 1-D weight (torch allows it): one output, no dim


@numpy_op(aten.einsum.default)
def einsum(equation, operands, path=None):
    out = np.einsum(equation, *operands, optimize=True)
    return out.astype(np.result_type(*operands))


@numpy_op(aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul(a, b):
    return np.matmul(a, b)


@numpy_op(aten.addmm.default)
def addmm(bias, a, b, beta=1, alpha=1):
    return beta * bias + alpha * (a @ b)


@numpy_op(aten.outer.default)
def outer(a, b):
    return np.outer(*promoted(a, b))



def _apply_mask(scores, mask):
    if mask.dtype == np.bool_:
        np.copyto(scores, -np.inf, where=~mask)
    else:
        scores += mask
    return scores


def _guarded_softmax(scores):
    """Softmax over the last dim, in place. torch's CPU kernels give a query that may attend to nothing
    (e.g. a left-padding position under a causal mask) zero output rather than NaN: a guarded max and
    denominator do the same."""
    m = np.max(scores, axis=-1, keepdims=True)
    m[np.isneginf(m)] = 0
    scores -= m
    np.exp(scores, out=scores)
    s = np.sum(scores, axis=-1, keepdims=True)
    s[s == 0] = 1
    scores /= s
    return scores


SDPA_ONE_HEAD_MIN = 1 << 18     # queries x keys from which sdpa runs one (batch, head) at a time


@numpy_op(aten.scaled_dot_product_attention.default)
def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    L, S = q.shape[-2], k.shape[-2]
    scale = const(q, 1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    causal = ~np.tril(np.ones((L, S), dtype=bool)) if is_causal else None
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if L * S < SDPA_ONE_HEAD_MIN or not lead or 0 in lead:
        return _attend(q * scale, np.swapaxes(k, -1, -2), v, causal, attn_mask)
    # long sequences (an encoder's 1500 positions): each (batch, head)'s scores, a few MB, stay in the cache through
    # the mask and softmax, where all of them at once (100s of MB) go through memory five times (1.6x faster on
    # Whisper's encoder, the same values: the same matrix products and elementwise steps, row by row)
    qs, kt = np.broadcast_to(q * scale, (*lead, *q.shape[-2:])), np.broadcast_to(np.swapaxes(k, -1, -2),
                                                                                 (*lead, *k.shape[:-3:-1]))
    v = np.broadcast_to(v, (*lead, *v.shape[-2:]))
    mask = None if attn_mask is None else np.broadcast_to(attn_mask, (*lead, L, S))
    out = None
    for i in np.ndindex(*lead):
        one = _attend(qs[i], np.ascontiguousarray(kt[i]), np.ascontiguousarray(v[i]), causal,
                      None if mask is None else mask[i])
        if out is None:
            out = np.empty((*lead, *one.shape), dtype=one.dtype)
        out[i] = one
    return out


def _attend(q, kt, v, causal, mask):
    """softmax(q @ kt, masked) @ v, q already scaled (``sdpa``)."""
    scores = np.matmul(q, kt)
    if causal is not None:
        np.copyto(scores, -np.inf, where=causal)
    if mask is not None:
        _apply_mask(scores, mask)
    p = _guarded_softmax(scores)
    return np.matmul(p.astype(v.dtype, copy=False), v)


# --- shapes and indexing ----------------------------------------------------------------------------
@numpy_op(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def reshape(x, shape):
    return np.reshape(x, shape)


@numpy_op(aten.permute.default)
def permute(x, dims):
    return np.transpose(x, dims)


@numpy_op(aten.transpose.int)
def transpose(x, a, b):
    return np.swapaxes(x, a, b)


@numpy_op(aten.t.default)
def t(x):
    return x.T


@numpy_op(aten.unsqueeze.default)
def unsqueeze(x, dim):
    return np.expand_dims(x, dim if dim >= 0 else x.ndim + 1 + dim)


@numpy_op(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(x, dims=None):
    dims = range(x.ndim) if dims is None else [dims] if isinstance(dims, int) else dims
    dims = tuple(d % x.ndim for d in dims if x.shape[d] == 1)
    return np.squeeze(x, axis=dims) if dims else x


@numpy_op(aten.expand.default)
def expand(x, shape, implicit=False):
    lead = len(shape) - x.ndim
    shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape)]
    return np.broadcast_to(x, shape)


@numpy_op(aten.flatten.using_ints)
def flatten(x, start=0, end=-1):
    start, end = start % max(x.ndim, 1), end % max(x.ndim, 1)
    return x.reshape(*x.shape[:start], -1, *x.shape[end + 1:])


def _slice_index(ndim, dim, start, end, step):
    if end is not None and end >= INT64_MAX:
        end = None
    idx = [slice(None)] * ndim
    idx[dim] = slice(start, end, step)
    return tuple(idx)


@numpy_op(aten.slice.Tensor)
def slice_(x, dim=0, start=None, end=None, step=1):
    return x[_slice_index(x.ndim, dim, start, end, step)]


@numpy_op(aten.slice_scatter.default)
def slice_scatter(x, src, dim=0, start=None, end=None, step=1):
    """x with the slice replaced by src (the functional form of writing into a slice)."""
    out = x.copy()
    out[_slice_index(x.ndim, dim, start, end, step)] = src
    return out


@numpy_op(aten.select_scatter.default)
def select_scatter(x, src, dim, index):
    out = x.copy()
    out[(slice(None),) * (dim % x.ndim) + (index,)] = src
    return out


@numpy_op(aten.select.int)
def select(x, dim, index):
    return np.take(x, index, axis=dim)


@numpy_op(aten.index_select.default)
def index_select(x, dim, index):
    _check_index(index, x.shape[dim], f"index_select along dim {dim}")
    return np.take(x, index, axis=dim)


@numpy_op(aten.index.Tensor)
def index(x, indices):
    return x[tuple(slice(None) if i is None else i for i in indices)]


@numpy_op(aten.index_put.default)
def index_put(x, indices, values, accumulate=False):
    """Out of place: a copy of x with x[indices] = values (None in indices is a full slice). accumulate adds, in
    index order, once per occurrence of a repeated index; without it a repeated index keeps the last value, as
    torch's serial CPU kernel does (torch itself leaves that case undefined)."""
    out = x.copy()
    idx = tuple(slice(None) if i is None else i for i in indices)
    values = np.asarray(values, dtype=x.dtype)
    if accumulate:
        np.add.at(out, idx, values)
    else:
        out[idx] = values
    return out


@numpy_op(aten.gather.default)
def gather(x, dim, idx, sparse_grad=False):
    """torch.gather: the index may be smaller than x in the other dims (x is read at the index's coordinates
    there); take_along_axis would broadcast it over x instead."""
    dim = dim % max(x.ndim, 1)
    x = x[tuple(slice(0, s) if d != dim else slice(None) for d, s in enumerate(idx.shape))]
    return np.take_along_axis(x, idx, axis=dim)


def _scatter_where(index, dim):
    """Coordinates of torch.scatter's writes: index's own coordinates, with index's values along dim (index may
    be smaller than self in every dimension)."""
    where = list(np.indices(index.shape, sparse=True))
    where[dim] = index
    return tuple(where)


@numpy_op(aten.scatter.value)
def scatter_value(x, dim, index, value):
    out = x.copy()
    out[_scatter_where(index, dim)] = value
    return out


@numpy_op(aten.scatter.src)
def scatter_src(x, dim, index, src):
    out = x.copy()
    out[_scatter_where(index, dim)] = src[tuple(slice(0, n) for n in index.shape)]
    return out


def _per_dim(v, nd: int) -> list:
    """A convolution's or pooling's int argument per spatial dim: an int for all, one value per dim, or one for all."""
    return list(v) * (nd if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [v] * nd


_IM2COL_BYTES = 64 << 20          # the most an ungrouped convolution copies of its windows at a time


def _conv(x, weight, bias, stride, padding, dilation, groups: int, nd: int):
    """torch's ``nd``-d convolution (cross-correlation) on (N, C_in, *spatial) or unbatched (C_in, *spatial): each
    output position sums its window of every input channel of its group. ``padding`` per dim (an int for all) or
    "valid" / "same" (stride 1; "same" puts the odd one of an even total on the right, as torch). float16 sums in
    float32, rounded once, as torch's CPU kernel."""
    stride, dilation = _per_dim(stride, nd), _per_dim(dilation, nd)
    batched = x.ndim == nd + 2
    dtype, x, weight = x.dtype, opmath(x if batched else x[None]), opmath(weight)
    c_out, c_group, *k = weight.shape
    if isinstance(padding, str):
        total = [0 if padding == "valid" else d * (kk - 1) for d, kk in zip(dilation, k)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in _per_dim(padding, nd)]
    x = np.pad(x, ((0, 0), (0, 0), *pads))
    spans = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    # (N, C_in, *positions, *taps): every window, a view; then the strided positions and the dilated taps
    win = np.lib.stride_tricks.sliding_window_view(x, spans, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None), *(slice(None, None, s_) for s_ in stride),
               *(slice(None, None, d) for d in dilation))]
    out_shape = win.shape[2:2 + nd]
    if groups == 1:
        # im2col: the windows copied out as (N, positions, C_in * taps) rows, a BLAS matmul with the weight (einsum
        # over the strided view ran its own loop: 3.5 of Whisper-tiny's 4.5 s encoder on 2 x 30 s), in slices of
        # the first spatial dim whose copies stay within _IM2COL_BYTES (a copy is taps times the input)
        n, ck, rest = x.shape[0], c_group * math.prod(k), math.prod(out_shape[1:])
        step = max(1, _IM2COL_BYTES // max(1, n * rest * ck * win.itemsize))
        w2 = weight.reshape(c_out, ck).T
        parts = [np.moveaxis(win[:, :, i:i + step], 1, 1 + nd).reshape(n, len(range(i, out_shape[0])[:step]) * rest,
                                                                        ck) @ w2
                 for i in range(0, out_shape[0], step)] or [np.zeros((n, 0, c_out), w2.dtype)]
        out = np.moveaxis(np.concatenate(parts, 1), -1, 1).reshape(n, c_out, *out_shape)
    else:
        win = win.reshape(x.shape[0], groups, c_group, *out_shape, *k)
        w = weight.reshape(groups, c_out // groups, c_group, *k)
        letters = "hijdef"[:nd]                             # position axes, then tap axes (upper case)
        taps = letters.upper()
        out = np.einsum(f"ngc{letters}{taps},goc{taps}->ngo{letters}", win, w, optimize=True)
        out = out.reshape(x.shape[0], c_out, *out_shape)
    if bias is not None:
        out = out + bias.reshape(-1, *[1] * nd)
    out = out.astype(dtype)
    return out if batched else out[0]


@numpy_op(aten.conv1d.default, aten.conv1d.padding)
def conv1d(x, weight, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    """torch's conv1d on (N, C_in, L) or (C_in, L) (Mamba's causal depthwise convolution: groups = channels)."""
    return _conv(x, weight, bias, stride, padding, dilation, groups, 1)


@numpy_op(aten.conv2d.default, aten.conv2d.padding)
def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """torch's conv2d on (N, C_in, H, W) or (C_in, H, W) (ViT's and CLIP's patch embeddings: stride = kernel)."""
    return _conv(x, weight, bias, stride, padding, dilation, groups, 2)


@numpy_op(aten.conv3d.default, aten.conv3d.padding)
def conv3d(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1):
    """torch's conv3d on (N, C_in, D, H, W) or (C_in, D, H, W) (video patch embeddings)."""
    return _conv(x, weight, bias, stride, padding, dilation, groups, 3)


def _conv_transpose(x, weight, bias, stride, padding, output_padding, groups: int, dilation, nd: int):
    """torch's ``nd``-d transposed convolution (the gradient of ``_conv`` with respect to its input) on
    (N, C_in, *spatial) or unbatched, weight (C_in, C_out / groups, *kernel): the input spread ``stride`` apart
    (stride - 1 zeros between its elements), padded by dilation * (kernel - 1) - padding on each side and
    ``output_padding`` more on the right (cropped where that is negative), then a stride-1 convolution with the
    kernel flipped and each group's in and out channels swapped. Length (L - 1) * stride - 2 * padding +
    dilation * (kernel - 1) + output_padding + 1, as torch's."""
    stride, dilation = _per_dim(stride, nd), _per_dim(dilation, nd)
    padding, output_padding = _per_dim(padding, nd), _per_dim(output_padding, nd)
    batched = x.ndim == nd + 2
    x = x if batched else x[None]
    c_in, c_group_out, *k = weight.shape
    sizes = [(n - 1) * s_ - 2 * p + d * (kk - 1) + op + 1
             for n, s_, p, d, kk, op in zip(x.shape[2:], stride, padding, dilation, k, output_padding)]
    if min(sizes) <= 0:                   # (torch gives an empty float32 output at 0; export refuses it)
        if min(sizes) < 0:
            raise ValueError(f"conv_transpose{nd}d: output size {sizes} is negative (padding too large)")
        out = np.zeros((x.shape[0], groups * c_group_out, *sizes), x.dtype)
        return out if batched else out[0]
    spread = np.zeros((*x.shape[:2], *[(n - 1) * s_ + 1 for n, s_ in zip(x.shape[2:], stride)]), x.dtype)
    spread[(slice(None), slice(None), *(slice(None, None, s_) for s_ in stride))] = x
    edges = [(d * (kk - 1) - p, d * (kk - 1) - p + op) for d, kk, p, op in zip(dilation, k, padding, output_padding)]
    spread = np.pad(spread, ((0, 0), (0, 0), *[(max(a, 0), max(b, 0)) for a, b in edges]))
    spread = spread[(slice(None), slice(None), *(slice(max(-a, 0), n - max(-b, 0))
                                                 for (a, b), n in zip(edges, spread.shape[2:])))]
    flipped = weight[(slice(None), slice(None), *[slice(None, None, -1)] * nd)]
    # (C_in, C_out/g, *k) -> (g, C_in/g, C_out/g, *k) -> (g, C_out/g, C_in/g, *k) -> (C_out, C_in/g, *k)
    w = flipped.reshape(groups, c_in // groups, c_group_out, *k).swapaxes(1, 2).reshape(
        groups * c_group_out, c_in // groups, *k)
    out = _conv(spread, np.ascontiguousarray(w), bias, 1, 0, dilation, groups, nd)
    return out if batched else out[0]


@numpy_op(aten.conv_transpose1d.default)
def conv_transpose1d(x, weight, bias=None, stride=(1,), padding=(0,), output_padding=(0,), groups=1, dilation=(1,)):
    """torch's conv_transpose1d (upsampling decoders: vocoders, audio codecs)."""
    return _conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, 1)


@numpy_op(aten.conv_transpose2d.input)
def conv_transpose2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1,
                     dilation=(1, 1)):
    """torch's conv_transpose2d (U-Nets' and segmentation heads' upsampling)."""
    return _conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, 2)


@numpy_op(aten.conv_transpose3d.input)
def conv_transpose3d(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), output_padding=(0, 0, 0), groups=1,
                     dilation=(1, 1, 1)):
    """torch's conv_transpose3d."""
    return _conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, 3)


@numpy_op(aten.convolution.default)
def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """The convolution decompositions leave (a graph with in-place ops is functionalized): the forward ones, and
    transposed ones."""
    if transposed:
        return _conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, weight.ndim - 2)
    return _conv(x, weight, bias, stride, padding, dilation, groups, weight.ndim - 2)


def _upsample_sizes(x, output_size, scale_factors, nd: int):
    """The output sizes of torch's upsampling .vec ops (``output_size``, or each input size times its scale
    factor, floored) and each dim's scale as the index arithmetic takes it (the factor, or None: in / out)."""
    sizes = x.shape[-nd:]
    if output_size is not None:
        return [int(o) for o in output_size], [None] * nd
    factors = _per_dim(list(scale_factors), nd)
    return [int(n * float(f)) for n, f in zip(sizes, factors)], [float(f) for f in factors]


def _index_scale(n_in: int, n_out: int, factor, t=np.float32):
    """torch's compute_scales_value<t>: 1 / the scale factor when one was given, else in / out, as a ``t``."""
    return t(1.0 / factor) if factor is not None and factor > 0 else t(n_in) / t(n_out)


def _float_interpolation(x, mode: str):
    """x in the type torch's CPU kernels interpolate in (float32 for float16, rounded back once at the end), and
    that type; integers are refused by name (torch rounds and clamps them its own way)."""
    if not np.issubdtype(x.dtype, np.floating):
        raise NotImplementedError(f"{mode} upsampling of {x.dtype} has no numpy implementation (float inputs only); "
                                  f"convert the input to float, or run with backend='torch'")
    x = opmath(x)
    return x, x.dtype.type


def _upsample_nearest(x, output_size, scale_factors, nd: int, exact: bool):
    """torch's nearest (``exact``: nearest-exact) upsampling over the last ``nd`` dims: output index i reads input
    index floor(i * scale) (nearest-exact: floor((i + 0.5) * scale)), at most the last, in float32 as torch's CPU
    kernel computes it (its 2-d kernel reads i at the same size and i // 2 at twice the size, whatever the scale
    factor: 3 rows scaled by 2.3 read rows 0, 0, 1, 1, 2, 2 in 2-d and 0, 0, 0, 1, 1, 2 in 1-d and 3-d)."""
    sizes, factors = _upsample_sizes(x, output_size, scale_factors, nd)
    for axis, (n_out, factor) in enumerate(zip(sizes, factors), start=x.ndim - nd):
        n_in = x.shape[axis]
        i = np.arange(n_out)
        if exact:
            src = np.floor(((i + 0.5) * np.float64(_index_scale(n_in, n_out, factor))).astype(np.float32))
        elif nd == 2 and n_out in (n_in, 2 * n_in):         # torch's 2-d kernel (only) takes these shortcuts
            src = i if n_out == n_in else i >> 1
        else:
            src = np.floor(i.astype(np.float32) * _index_scale(n_in, n_out, factor))
        x = np.take(x, np.minimum(src.astype(np.int64), n_in - 1), axis=axis)
    return x


def _upsample_linear(x, output_size, align_corners: bool, scale_factors, nd: int):
    """torch's (bi/tri)linear upsampling over the last ``nd`` dims, one dim after another: output index i reads
    input src = i * (in - 1) / (out - 1) with ``align_corners``, else max(scale * (i + 0.5) - 0.5, 0), weighting
    floor(src) by 1 - frac and the next (or the last again) by frac, in float32 (float64 for float64; float16
    computed in float32 and rounded once) as torch's CPU kernel; a dim that keeps its size is copied, as torch does
    (a scale factor of 1.2 on 3 rows leaves them); within a few ulp of torch (it weighs all 2^nd corners at
    once). Float inputs only."""
    sizes, factors = _upsample_sizes(x, output_size, scale_factors, nd)
    dtype = x.dtype
    x, t = _float_interpolation(x, ("linear", "bilinear", "trilinear")[nd - 1])
    for axis, (n_out, factor) in enumerate(zip(sizes, factors), start=x.ndim - nd):
        n_in = x.shape[axis]
        if n_out == n_in:                 # torch copies a dim that keeps its size, whatever the scale factor
            continue
        i = np.arange(n_out, dtype=t)
        if align_corners:
            scale = t(n_in - 1) / t(n_out - 1) if n_out > 1 else t(0)
            src = scale * i
        else:
            src = np.maximum(_index_scale(n_in, n_out, factor, t) * (i + t(0.5)) - t(0.5), 0)
        low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        frac = np.clip(src - low, 0, 1).astype(t)
        high = low + (low < n_in - 1)
        shape = [1] * x.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        x = np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac
    return x.astype(dtype)


def _cubic_near(d, a):
    """Keys' cubic convolution weight at a distance |d| <= 1."""
    return ((a + 2) * d - (a + 3)) * d * d + 1


def _cubic_far(d, a):
    """Keys' cubic convolution weight at a distance 1 < |d| < 2."""
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a


def _upsample_bicubic(x, output_size, align_corners: bool, scale_factors):
    """torch's bicubic upsampling over the last 2 dims, one after the other: output index i reads input
    src = i * (in - 1) / (out - 1) with ``align_corners``, else scale * (i + 0.5) - 0.5 (not clamped), and weighs
    the 4 inputs around floor(src) (clamped to the edges) by Keys' cubic convolution with A = -0.75 at their
    distances; in float32 (float64 for float64) as torch's CPU kernel, within a few ulp of it; float16 computed in
    float32 and rounded once (torch's float16 kernel rounds inside: a third of its elements are a float16 step
    off that). Float inputs only."""
    sizes, factors = _upsample_sizes(x, output_size, scale_factors, 2)
    dtype = x.dtype
    x, t = _float_interpolation(x, "bicubic")
    a = t(-0.75)
    for axis, (n_out, factor) in enumerate(zip(sizes, factors), start=x.ndim - 2):
        n_in = x.shape[axis]              # (a dim that keeps its size is resampled too, unlike the linear modes)
        i = np.arange(n_out, dtype=t)
        if align_corners:
            src = (t(n_in - 1) / t(n_out - 1) if n_out > 1 else t(0)) * i
        else:
            src = _index_scale(n_in, n_out, factor, t) * (i + t(0.5)) - t(0.5)
        low = np.floor(src)
        d = (src - low).astype(t)
        weights = [_cubic_far(d + 1, a), _cubic_near(d, a), _cubic_near(1 - d, a), _cubic_far(2 - d, a)]
        shape = [1] * x.ndim
        shape[axis] = n_out
        out = 0
        for k, w in zip(range(-1, 3), weights):
            taps = np.clip(low.astype(np.int64) + k, 0, n_in - 1)
            out = out + np.take(x, taps, axis=axis) * w.astype(t).reshape(shape)
        x = out
    return x.astype(dtype)


@numpy_op(aten.upsample_bicubic2d.vec)
def upsample_bicubic(x, output_size, align_corners, scale_factors):
    """F.interpolate(mode="bicubic") (without antialias)."""
    return _upsample_bicubic(x, output_size, bool(align_corners), scale_factors)


@numpy_op(aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec)
def upsample_nearest(x, output_size, scale_factors):
    """F.interpolate(mode="nearest") and nn.Upsample: 1-3-d by the input's rank (N, C, *spatial)."""
    return _upsample_nearest(x, output_size, scale_factors, x.ndim - 2, exact=False)


@numpy_op(aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec)
def upsample_nearest_exact(x, output_size, scale_factors):
    """F.interpolate(mode="nearest-exact")."""
    return _upsample_nearest(x, output_size, scale_factors, x.ndim - 2, exact=True)


@numpy_op(aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec)
def upsample_linear(x, output_size, align_corners, scale_factors):
    """F.interpolate(mode="linear" / "bilinear" / "trilinear"): DPT's and segmentation heads' resizing."""
    return _upsample_linear(x, output_size, bool(align_corners), scale_factors, x.ndim - 2)


def _pool_windows(x, kernel, stride, padding, dilation, ceil_mode, fill, nd: int, beyond=None):
    """(..., *positions, *taps) windows of torch's max/avg pooling over the last ``nd`` dims (``stride`` [] is
    the kernel), x padded by ``fill``, and past that by ``beyond`` (default ``fill``) where ``ceil_mode`` adds a
    last, partial window; and (kernel, stride, padding) per dim."""
    kernel, padding, dilation = _per_dim(kernel, nd), _per_dim(padding, nd), _per_dim(dilation, nd)
    stride = _per_dim(stride, nd) if stride not in (None, [], ()) else kernel
    lead, spatial = x.shape[:-nd], x.shape[-nd:]
    outs, extra = [], []
    for size, k, s_, p, d in zip(spatial, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        n = (size + 2 * p - span + (s_ - 1 if ceil_mode else 0)) // s_ + 1
        if ceil_mode and (n - 1) * s_ >= size + p:      # a last window must start inside the input or left pad
            n -= 1
        outs.append(n)
        extra.append((0, max(0, (n - 1) * s_ + span - size - 2 * p)))
    x = np.pad(x, [(0, 0)] * len(lead) + [(p, p) for p in padding], constant_values=fill)
    x = np.pad(x, [(0, 0)] * len(lead) + extra, constant_values=fill if beyond is None else beyond)
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    win = np.lib.stride_tricks.sliding_window_view(x, spans, axis=tuple(range(x.ndim - nd, x.ndim)))
    win = win[(Ellipsis, *(slice(None, n * s_, s_) for n, s_ in zip(outs, stride)),
               *(slice(None, None, d) for d in dilation))]
    return win, outs, (kernel, stride, padding)


def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, nd: int):
    lowest = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf     # (padding never wins)
    win, _, _ = _pool_windows(x, kernel_size, stride, padding, dilation, ceil_mode, lowest, nd)
    return win.max(axis=tuple(range(-nd, 0))).astype(x.dtype)


@numpy_op(aten.max_pool1d.default)
def max_pool1d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, 1)


@numpy_op(aten.max_pool2d.default)
def max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """torch's max pooling over the last 2 dims (ResNet's stem)."""
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, 2)


@numpy_op(aten.max_pool3d.default)
def max_pool3d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """torch's max pooling over the last 3 dims (video models)."""
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, 3)


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, nd: int):
    """A window's sum over the kernel's size, or over its positions inside the input (``count_include_pad=False``),
    or ``divisor_override``; with ``ceil_mode`` a last, partial window divides by its part inside the padded
    input, as torch."""
    win, _, (kernel, stride, padding) = _pool_windows(x, kernel_size, stride, padding, 1, ceil_mode, 0, nd)
    total = win.sum(axis=tuple(range(-nd, 0)), dtype=np.float64 if x.dtype == np.float64 else np.float32)
    if divisor_override:
        return (total / divisor_override).astype(x.dtype)
    counted, _, _ = _pool_windows(np.ones(x.shape[-nd:], np.float32), kernel, stride, padding, 1, ceil_mode,
                                  1 if count_include_pad else 0, nd, beyond=0)    # the padding counted or not
    return (total / counted.sum(axis=tuple(range(-nd, 0)))).astype(x.dtype)


@numpy_op(aten.avg_pool1d.default)
def avg_pool1d(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True):
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, None, 1)


@numpy_op(aten.avg_pool2d.default)
def avg_pool2d(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """torch's average pooling over the last 2 dims."""
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 2)


@numpy_op(aten.avg_pool3d.default)
def avg_pool3d(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """torch's average pooling over the last 3 dims."""
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 3)


def _adaptive_cells(size: int, n: int) -> list:
    """torch's adaptive pooling cells of a dim of ``size`` into ``n``: floor(i size / n) .. ceil((i + 1) size / n)."""
    return [range(i * size // n, -(-(i + 1) * size // n)) for i in range(n)]


@numpy_op(aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def adaptive_max_pool(x, output_size):
    """torch's adaptive max pooling over the last len(output_size) dims (cells as ``adaptive_avg_pool``): the
    values and, as torch returns them, each one's flat index within its (N, C) plane of the input (the first of
    equal maxima: torch scans a cell in row-major order and takes a later value only when it is greater, or NaN:
    the last NaN)."""
    nd = len(output_size)
    spatial = x.shape[-nd:]
    flat = x.reshape(*x.shape[:-nd], -1)
    cells = [_adaptive_cells(size, n) for size, n in zip(spatial, output_size)]
    values = np.empty((*x.shape[:-nd], *output_size), x.dtype)
    indices = np.empty(values.shape, np.int64)
    for out in np.ndindex(*output_size):
        where = np.ravel_multi_index(np.ix_(*[cells[d][i] for d, i in enumerate(out)]), spatial).reshape(-1)
        block = flat[..., where]
        pick = block.argmax(-1)                   # the first maximum; torch keeps the last NaN of a cell
        if np.issubdtype(block.dtype, np.floating):
            nan = np.isnan(block)
            last = block.shape[-1] - 1 - nan[..., ::-1].argmax(-1)
            pick = np.where(nan.any(-1), last, pick)
        values[(Ellipsis, *out)] = np.take_along_axis(block, pick[..., None], -1)[..., 0]
        indices[(Ellipsis, *out)] = where[pick]
    return values, indices


@numpy_op(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
          aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool3d.default)
def adaptive_avg_pool(x, output_size):
    """torch's adaptive average pooling over the last len(output_size) dims: output cell i of a dim of size L
    into n averages positions floor(i L / n) .. ceil((i + 1) L / n) - 1 (ResNet's and ViT poolers' (1, 1))."""
    nd = len(output_size)
    out = x
    for axis, n in zip(range(x.ndim - nd, x.ndim), output_size):
        size = x.shape[axis]
        cells = [np.mean(np.take(out, cell, axis=axis), axis=axis, keepdims=True)
                 for cell in _adaptive_cells(size, n)]
        out = np.concatenate(cells, axis=axis)
    return out.astype(x.dtype)


def _check_index(index, size: int, what: str):
    """torch refuses an index outside [0, size) here; np.take would wrap a negative one around."""
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() >= size):
        bad = int(index.min()) if index.min() < 0 else int(index.max())
        raise IndexError(f"{what}: index {bad} out of range [0, {size})")


@numpy_op(aten.embedding.default)
def embedding(weight, ids, padding_idx=-1, scale_grad=False, sparse=False):
    _check_index(ids, weight.shape[0], f"embedding of {weight.shape[0]} rows")
    return np.take(weight, ids, axis=0)


@numpy_op(aten.cat.default, aten.concat.default)
def cat(tensors, dim=0):
    return np.concatenate(tensors, axis=dim)


@numpy_op(aten.stack.default)
def stack(tensors, dim=0):
    return np.stack(tensors, axis=dim)


@numpy_op(aten.split.Tensor)
def split(x, size, dim=0):
    n = x.shape[dim]
    return tuple(np.split(x, list(range(size, n, size)), axis=dim))


@numpy_op(aten.tensor_split.indices)
def tensor_split(x, indices, dim=0):
    return tuple(np.split(x, list(indices), axis=dim))


@numpy_op(aten.constant_pad_nd.default)
def constant_pad_nd(x, pad, value=0):
    return pad_(x, pad, "constant", value)


@numpy_op(aten.pad.default)
def pad_(x, pad, mode="constant", value=None):
    """torch.nn.functional.pad: ``pad`` lists (before, after) pairs from the last axis backwards; negative
    amounts crop. Constant mode only."""
    if mode != "constant":
        raise ValueError(f"aten.pad: mode {mode!r} is not supported on the numpy backend (constant only)")
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    crop = tuple(slice(max(0, -a), x.shape[d] - max(0, -b) if b < 0 else None) for d, (a, b) in enumerate(widths))
    out = np.pad(x[crop], [(max(0, a), max(0, b)) for a, b in widths], constant_values=0 if value is None else value)
    return out.astype(x.dtype)


@numpy_op(aten.split_with_sizes.default)
def split_with_sizes(x, sizes, dim=0):
    return tuple(np.split(x, np.cumsum(sizes)[:-1].tolist(), axis=dim))


@numpy_op(aten.repeat.default)
def repeat(x, reps):
    return np.tile(x, reps)


@numpy_op(aten.repeat_interleave.self_int)
def repeat_interleave(x, repeats, dim=None, output_size=None):
    return np.repeat(x, repeats, axis=dim)          # dim None: flattened, as torch


@numpy_op(aten.triu.default)
def triu(x, diagonal=0):
    return np.triu(x, diagonal)


@numpy_op(aten.tril.default)
def tril(x, diagonal=0):
    return np.tril(x, diagonal)


@numpy_op(aten.unflatten.int)
def unflatten(x, dim, sizes):
    dim = dim % x.ndim
    return np.reshape(x, (*x.shape[:dim], *sizes, *x.shape[dim + 1:]))      # one size may be -1


@numpy_op(aten.narrow.default, aten.narrow.Tensor)
def narrow(x, dim, start, length):
    start = int(start)                       # narrow.Tensor: a 0-d tensor
    start = start + x.shape[dim] if start < 0 else start
    return x[_slice_index(x.ndim, dim, start, start + length, 1)]


@numpy_op(aten.unbind.int)
def unbind(x, dim=0):
    return tuple(np.moveaxis(x, dim, 0))


@numpy_op(aten.chunk.default)
def chunk(x, chunks, dim=0):
    """Pieces of ceil(n / chunks) along dim, the last smaller (so possibly fewer than chunks), as torch.chunk."""
    return split(x, max(1, -(-x.shape[dim] // chunks)), dim)


@numpy_op(aten.expand_as.default)
def expand_as(x, other):
    return np.broadcast_to(x, other.shape)


@numpy_op(aten.reshape_as.default, aten.view_as.default)
def reshape_as(x, other):
    """x in other's shape (RoFormer's rotary embedding)."""
    return np.reshape(x, other.shape)


@numpy_op(aten.flip.default)
def flip(x, dims):
    return np.flip(x, axis=tuple(dims)) if len(dims) else x


@numpy_op(aten.roll.default)
def roll(x, shifts, dims=()):
    """Without dims: over the flattened tensor, reshaped back."""
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    if not dims:
        return np.roll(x.reshape(-1), shifts[0]).reshape(x.shape)
    return np.roll(x, shifts, axis=[dims] if isinstance(dims, int) else list(dims))


@numpy_op(aten.unfold.default)
def unfold(x, dim, size, step):
    """Tensor.unfold: windows of `size` every `step` along dim, as a new last dim."""
    if x.ndim == 0:
        return x.reshape(1)
    dim = dim % x.ndim
    win = np.lib.stride_tricks.sliding_window_view(x, size, axis=dim)
    return win[(slice(None),) * dim + (slice(None, None, step),)]


@numpy_op(aten.one_hot.default)
def one_hot(x, num_classes=-1):
    """int64 rows of num_classes; a class outside [0, num_classes) fails. (num_classes -1, the largest class + 1,
    is data-dependent: torch.export refuses it, so it never reaches here.)"""
    _check_index(x, num_classes, f"one_hot of {num_classes} classes")
    return (x[..., None] == np.arange(num_classes)).astype(np.int64)


# --- creation ---------------------------------------------------------------------------------------
@numpy_op(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(*args, dtype=None, layout=None, device=None, pin_memory=None):
    floating = any(isinstance(a, float) for a in args)
    return np.arange(*args, dtype=np_dtype(dtype, np.float32 if floating else np.int64))


@numpy_op(aten.full.default)
def full(size, value, dtype=None, layout=None, device=None, pin_memory=None):
    default = np.bool_ if isinstance(value, bool) else np.int64 if isinstance(value, int) else np.float32
    return np.full(size, value, dtype=np_dtype(dtype, default))


@numpy_op(aten.eye.default, aten.eye.m)
def eye(n, m=None, dtype=None, layout=None, device=None, pin_memory=None):
    return np.eye(n, n if m is None else m, dtype=np_dtype(dtype, np.float32))


@numpy_op(aten.ones.default)
def ones(size, dtype=None, layout=None, device=None, pin_memory=None):
    return np.ones(size, dtype=np_dtype(dtype, np.float32))


@numpy_op(aten.zeros.default)
def zeros(size, dtype=None, layout=None, device=None, pin_memory=None):
    return np.zeros(size, dtype=np_dtype(dtype, np.float32))


@numpy_op(aten.new_ones.default)
def new_ones(x, size, dtype=None, layout=None, device=None, pin_memory=None):
    return np.ones(size, dtype=np_dtype(dtype, x.dtype))


@numpy_op(aten.new_zeros.default)
def new_zeros(x, size, dtype=None, layout=None, device=None, pin_memory=None):
    return np.zeros(size, dtype=np_dtype(dtype, x.dtype))


@numpy_op(aten.copy.default)
def copy(x, src, non_blocking=False):
    """The functional copy_: src broadcast to x's shape, in x's dtype."""
    return np.array(np.broadcast_to(src, x.shape), dtype=x.dtype)


@numpy_op(aten.new_empty.default)
def new_empty(x, size, dtype=None, layout=None, device=None, pin_memory=None):
    return np.zeros(size, dtype=np_dtype(dtype, x.dtype))      # any values are valid; zeros are reproducible


@numpy_op(aten.empty.memory_format)
def empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return np.zeros(size, dtype=np_dtype(dtype, np.float32))


@numpy_op(aten.ones_like.default)
def ones_like(x, dtype=None, **kwargs):
    return np.ones(x.shape, dtype=np_dtype(dtype, x.dtype))


@numpy_op(aten.zeros_like.default)
def zeros_like(x, dtype=None, **kwargs):
    return np.zeros(x.shape, dtype=np_dtype(dtype, x.dtype))


@numpy_op(aten.empty_like.default)
def empty_like(x, dtype=None, **kwargs):
    return np.zeros(x.shape, dtype=np_dtype(dtype, x.dtype))    # any values are valid; zeros are reproducible


@numpy_op(aten.full_like.default)
def full_like(x, value, dtype=None, **kwargs):
    return np.full(x.shape, value, dtype=np_dtype(dtype, x.dtype))


@numpy_op(aten.fill.Scalar, aten.fill.Tensor)
def fill(x, value):
    """The functional fill_ (BART's shift_tokens_right writes the start token so): x's shape and dtype, every
    entry ``value`` (a number or a 0-d tensor)."""
    return np.full(x.shape, np.asarray(value).item(), dtype=x.dtype)


@numpy_op(aten.scalar_tensor.default)
def scalar_tensor(value, dtype=None, **kwargs):
    return np.asarray(value, dtype=np_dtype(dtype, np.float32))


from . import numpy_reduce  # noqa: E402,F401 - reductions and normalizations; registered with these
from . import numpy_transformers  # noqa: E402,F401 - ops that transformers defines; registered with these
