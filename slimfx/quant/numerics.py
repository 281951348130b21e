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

On a CPU where torch's own int8 GEMM (``torch._int_mm``: oneDNN's, with VNNI) is faster, both int_matmul
functions use it instead: exact too (int32 accumulation; products summed by VNNI without saturating), and
several times faster than the float32 blocks (2-core EPYC, one torch thread: bench/results/cpu_int8-*.md), so that
int8 weights multiply faster than fp32 ones from 2 rows on (at one row of a weight in cache numpy's fp32 GEMV is
as fast). Without VNNI oneDNN's int8 GEMM is not exact (``int_mm_exact``), and torch's own fallback (oneDNN
disabled) is 3-7x slower than the float32 blocks (1.5 ms at 4 x 576 x 1536); hence the choice is checked and
measured, once per process (``cpu_int_mm_rows``).
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time

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
    q = x / scale
    if zero_point.ndim or not isinstance(q, np.ndarray):      # (0-d operands: a numpy scalar, returned as one)
        return np.clip(np.round(q) + zero_point, qmin, qmax).astype(dtype)
    np.round(q, out=q)                        # in place: the same values without two more arrays of x's size
    if zero_point or not np.issubdtype(dtype, np.integer):   # (adding a zero changes no integer code; a float
        q += zero_point                                       # result keeps -0.0 + 0.0 = 0.0, as before)
    return np.clip(q, qmin, qmax, out=q).astype(dtype)


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
MAX_INT32_K = (2**31 - 1) // INT8_PRODUCT_MAX   # 131071: every sum of this many int8 products fits int32


def _refuse_int32_overflow(name: str, k: int, lo, hi) -> None:
    """An int32 accumulator holds every sum of K int8 products while K * 128 * 128 < 2**31 (K <= 131071,
    quant.linear.MAX_K); past that, refuse a result outside int32 (``lo``, ``hi``: its exact extremes)
    instead of casting it (numpy's cast of an out-of-range float is undefined, a kernel's int32 wraps)."""
    if hi > 2**31 - 1 or lo < -2**31:
        raise OverflowError(f"{name}: the exact result {int(hi) if hi > 2**31 - 1 else int(lo)} of K = {k} int8 "
                            f"products does not fit the int32 accumulator (K <= {MAX_INT32_K} "
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
    few rows (8 rows: 6 ms, one 2-D GEMM per chunk 30); ``weight_only_linear_np`` runs up to its CHUNK_GEMV_ROWS
    rows as one GEMV each."""
    step = n if m > ROW_CHUNK_MAX_M else max(1, ROW_CHUNK_BYTES // (4 * max(k, 1)))
    return [slice(s, min(s + step, n)) for s in range(0, n, max(step, 1))]


CPU_INT_MM_ENV = "SLIMFX_CPU_INT_MM"   # "1": always torch._int_mm on the CPU, "0": never; unset: measured
# Below this K, the float32 blocks. torch._int_mm on the CPU (torch 2.11 and 2.13) misreads a size-1 dimension whose
# stride is not the standard one, returning uninitialized memory: at K = 1 the transposed weight (1, N) has strides
# (1, 1). The operands are given standard strides (_standard); small K has nothing to gain anyway.
INT_MM_MIN_K = 16
INT_MM_DECODE_ROWS = 16   # where torch._int_mm wins only at decode's shape: used up to this many rows
_cpu_int_mm_rows: int | None = None


def cpu_int_mm_rows() -> int:
    """Up to how many rows of ``a`` the int_matmul functions multiply int8 on the CPU with ``torch._int_mm``
    (module docstring; 0: never). ``SLIMFX_CPU_INT_MM`` = 1 / 0 forces always / never; otherwise it is measured
    once per process (``_measure_cpu_int_mm``). Forced on where torch._int_mm is not exact (``int_mm_exact``), it is
    refused: never a wrong integer."""
    global _cpu_int_mm_rows
    forced = os.environ.get(CPU_INT_MM_ENV, "").strip()
    if forced == "1" and not int_mm_exact():
        raise ValueError(f"{CPU_INT_MM_ENV}=1, but torch._int_mm is not exact on this CPU (it differs from int64 "
                         f"arithmetic on slimfx's probe); unset it or set it to 0 for the float32 blocks")
    if forced in ("0", "1"):
        return sys.maxsize if forced == "1" else 0
    if forced:
        raise ValueError(f"{CPU_INT_MM_ENV}={forced!r}: use 1 (torch._int_mm), 0 (float32 blocks), or leave it unset")
    if _cpu_int_mm_rows is None:
        _cpu_int_mm_rows = _measure_cpu_int_mm()
    return _cpu_int_mm_rows


def cpu_int8_gemm(k: int) -> str:
    """What multiplies an int8 layer of ``k`` inputs on this CPU (``cpu_int_mm_rows``), for reports."""
    rows = cpu_int_mm_rows() if INT_MM_MIN_K <= k <= MAX_INT32_K else 0
    return ("torch._int_mm" if rows >= 2**31 else f"torch._int_mm <= {rows} rows, else float32 blocks" if rows
            else "float32 blocks")


_int_mm_exact: bool | None = None


def int_mm_exact() -> bool:
    """Whether torch._int_mm gives exact int32 results on this CPU, in both of ``_int_mm``'s forms (once per
    process): on rows that would saturate an int16 pair sum and random ones, against the float32 blocks, at 256
    rows, 4 rows flipped and one row of 8 columns. Without VNNI it is not: oneDNN's AVX2 int8 GEMM sums pairs of
    products in int16 (vpmaddubsw) and saturates (optimum-quanto saw torch 2.4's overflow on an EPYC 7R32; here,
    with ONEDNN_MAX_CPU_ISA=AVX2, torch 2.11 and 2.13 give 8160 for 64 products of 127 x 127, 1032256)."""
    global _int_mm_exact
    if _int_mm_exact is None:
        a, b_t = _probe_operands()
        want = _int_matmul_rows(a.astype(np.float32), b_t)
        try:
            flipped = torch._int_mm(torch.from_numpy(b_t), torch.from_numpy(a[:4]).T).T.numpy()
            _int_mm_exact = bool(np.array_equal(_int_mm_np(a, b_t), want) and np.array_equal(flipped, want[:4])
                                 and np.array_equal(_int_mm_np(a[:1], b_t[:8]), want[:1, :8]))   # a GEMV
        except RuntimeError:                 # a torch without a CPU kernel for it
            _int_mm_exact = False
    return _int_mm_exact


@functools.cache
def _probe_operands() -> tuple[np.ndarray, np.ndarray]:
    """a (256, 1024) and b_t (1024, 1024), int8, with rows and columns of the extremes (built once: the exactness
    probe and the measurement share them; neither writes to them)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(-128, 128, (256, 1024), dtype=np.int8), rng.integers(-128, 128, (1024, 1024), dtype=np.int8)
    a[0], a[1], a[2, ::2], a[2, 1::2] = 127, -128, 127, -128
    b[:, 0], b[:, 1], b[::2, 2], b[1::2, 2] = 127, -128, -128, 127
    return a, np.ascontiguousarray(b.T)


def _measure_cpu_int_mm() -> int:
    """torch._int_mm where it is exact (``int_mm_exact``) and faster than the float32 blocks: the best of 5 calls
    each, on one torch thread (``_int_mm_np``'s), at 4 and 256 rows x 1024 x 1024: every row count where it wins at
    256 (2-core EPYC: 0.7 vs 3 ms), up to INT_MM_DECODE_ROWS where it wins only at 4, else never."""
    if not int_mm_exact():
        return 0
    a, b_t = _probe_operands()

    def best(fn, *args) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        return min(times)

    wins = [best(_int_mm_np, a[:m], b_t) < best(_int_matmul_rows, a[:m].astype(np.float32), b_t) for m in (4, 256)]
    return sys.maxsize if wins[1] else INT_MM_DECODE_ROWS if wins[0] else 0


class OneTorchThread:
    """While entered (and ``active``), torch runs its own ops on one thread: the generation loop's glue around the
    numpy backend's graphs (picking tokens, logits processors, cache reorders; slimfx.lm) and ``_int_mm_np``.
    torch's OpenMP threads and OpenBLAS's spin for the same cores between calls otherwise (2-core EPYC: T5-small
    with 4 beams 1.3-1.5 s -> 1.1 s, a Whisper transcription 5.8 s -> 4.1 s). Entering twice is once; leaving
    restores the thread count. torch's count is the process's: another thread that first calls torch while a
    numpy-backend generation is between tokens starts with one thread too (and keeps it)."""

    def __init__(self, active: bool):
        self.active, self.saved = active, None

    def __enter__(self):
        if self.active and self.saved is None:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None


def _int_mm_np(a: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    """a (..., K) @ b_t (N, K).T by torch._int_mm on one torch thread, both int8 (numpy arrays shared with torch,
    not copied). One thread: the numpy backend's float ops run on OpenBLAS's threads, and torch's OpenMP threads
    spinning for the same cores between calls slow both (2-core EPYC: 1024 x 1536 x 384 plus an fp32 GEMM of
    that shape, 9.5 ms with one torch thread, 24 ms with two; all-MiniLM-L6 W8A8 212 vs 389 ms)."""
    a2, b = _standard(a.reshape(-1, a.shape[-1])), _standard(b_t)
    with OneTorchThread(True):
        out = _int_mm(torch.from_numpy(a2), torch.from_numpy(b))
    return out.numpy().reshape(*a.shape[:-1], b.shape[0])


def _standard(x: np.ndarray) -> np.ndarray:
    """x (2-D int8) as it is where its strides are the standard row-major ones and it is writable, else a copy:
    oneDNN misreads a size-1 dimension of another stride (a (1, K) row broadcast or taken with ``v[None]`` has
    stride 0 there, and numpy calls it C-contiguous all the same), and torch warns on every read-only array
    (weights mapped from disk) it is handed."""
    if x.strides == (x.shape[1] * x.itemsize, x.itemsize) and x.flags.writeable:
        return x
    return np.array(x, order="C")


def _standard_t(x: torch.Tensor) -> torch.Tensor:
    """``_standard`` for a torch tensor."""
    return x if x.stride() == (x.shape[1], 1) else x.clone(memory_format=torch.contiguous_format)


INT_MM_FLIP_BYTES = 1 << 22   # weights from this size on may multiply faster flipped (_int_mm)
_int_mm_flip: dict[tuple[int, int, int], bool] = {}   # (N, K, torch threads) -> the flipped form is faster


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b_t (N, K).T by torch._int_mm, both contiguous int8. oneDNN reorders the weight on every call
    for some shapes: at 2..16 rows of a with a large weight, (b_t @ a.T).T is then up to 2.5x faster (2-core
    EPYC, one thread, 4 rows x 4096 x 4096: 2.3 vs 5.9 ms; 4 x 11008 x 4096: 7.9 vs 16.4 ms) and for others
    slower (4 x 49152 x 576: 7.4 vs 4.2 ms; at 1 row and at small weights the two are even). So at those rows
    and weights of INT_MM_FLIP_BYTES or more, the two forms are timed on the first call for each weight shape and
    torch thread count (the faster of two calls each, at that call's rows) and the faster kept for the process;
    the results are equal either way (the flipped one copied back to row-major). Both operands must have standard
    strides (``_standard``)."""
    m, (n, k) = a.shape[0], b_t.shape
    if not 2 <= m <= ROW_CHUNK_MAX_M or n * k < INT_MM_FLIP_BYTES:
        return torch._int_mm(a, b_t.T)
    key = (n, k, torch.get_num_threads())
    flip = _int_mm_flip.get(key)
    if flip is None:
        times = {}
        for form in (False, True, False, True):
            t0 = time.perf_counter()
            out = torch._int_mm(b_t, a.T).T.contiguous() if form else torch._int_mm(a, b_t.T)
            times[form] = min(times.get(form, math.inf), time.perf_counter() - t0)
        flip = _int_mm_flip[key] = times[True] < times[False]
        return out if flip else torch._int_mm(a, b_t.T)
    return torch._int_mm(b_t, a.T).T.contiguous() if flip else torch._int_mm(a, b_t.T)


def _use_int_mm(a, b_t, int8) -> bool:
    k = a.shape[-1]
    return (b_t.ndim == 2 and a.dtype == int8 and b_t.dtype == int8 and INT_MM_MIN_K <= k <= MAX_INT32_K
            and math.prod(a.shape[:-1]) <= cpu_int_mm_rows())


def int_matmul_np(a: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    """Exact int32 result of a @ b_t.T for int8 a (..., K) and b_t (N, K) (see module docstring). For K past
    131071 a result outside int32 is refused (OverflowError), never wrapped. ``torch._int_mm`` multiplies up to
    ``cpu_int_mm_rows()`` rows of ``a`` (K >= INT_MM_MIN_K); otherwise, at decode's few rows of ``a``, b_t is
    converted to fp32 a chunk of rows at a time (``row_chunks``)."""
    k = a.shape[-1]
    assert k < 2**39, "K too large for exact float64 block sums"
    a, b_t = np.asarray(a), np.asarray(b_t)
    if _use_int_mm(a, b_t, np.int8):
        return _int_mm_np(a, b_t)
    a32 = a.astype(np.float32)
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
    """Exact int32 a @ b_t.T: on the CPU as the numpy twin computes it (torch._int_mm where
    ``cpu_int_mm_rows`` says so, on torch's threads as they are; else float32 blocks: module docstring); float64
    on other devices, where a float32 matmul may run in TF32 (torch.backends.cuda.matmul.allow_tf32) and lose
    bits (torch._int_mm on CUDA refuses 16 rows or fewer and K, N not multiples of 8)."""
    if a.device.type != "cpu":
        return _int32(a.to(torch.float64) @ b_t.to(torch.float64).transpose(-1, -2), a.shape[-1])
    if _use_int_mm(a, b_t, torch.int8):
        out = _int_mm(_standard_t(a.reshape(-1, a.shape[-1])), _standard_t(b_t))
        return out.reshape(*a.shape[:-1], b_t.shape[0])
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
