"""Helpers for the quantization tests: exact comparison with a readable failure, SQNR, array conversion."""
from __future__ import annotations

import numpy as np
import torch


def to_np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def assert_exact(a, b, what: str) -> None:
    """Bit-for-bit equality (floats compared by bit pattern, so -0.0 != 0.0), naming the first mismatches."""
    a, b = to_np(a), to_np(b)
    assert a.shape == b.shape, f"{what}: shapes differ {a.shape} vs {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtypes differ {a.dtype} vs {b.dtype}"
    if a.dtype.kind == "f":
        ua = a.view(np.dtype(f"u{a.dtype.itemsize}"))
        ub = b.view(np.dtype(f"u{b.dtype.itemsize}"))
        bad = np.argwhere(ua != ub)
    else:
        bad = np.argwhere(a != b)
    if len(bad):
        first = [tuple(i) for i in bad[:5]]
        pairs = ", ".join(f"{i}: {a[i]!r} vs {b[i]!r}" for i in first)
        raise AssertionError(f"{what}: {len(bad)} of {a.size} elements differ; first {pairs}")


def sqnr_db(ref, approx) -> float:
    ref, approx = to_np(ref).astype(np.float64), to_np(approx).astype(np.float64)
    noise = np.sum((ref - approx) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))
