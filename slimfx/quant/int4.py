"""Two 4-bit codes per byte: the storage format of int4 weights (the reference keeps them unpacked in int8).

Along the last axis, element 2i goes to the low nibble and element 2i+1 to the high nibble of byte i,
each as its 4-bit two's complement; an odd last dimension is padded with a zero code. ``unpack`` needs
the original length to drop that pad.
"""
from __future__ import annotations

import numpy as np
import torch


def _check_range(lo, hi, name: str) -> None:
    if lo < -8 or hi > 7:
        raise ValueError(f"pack_int4: {name} holds values in [{lo}, {hi}], outside the int4 range [-8, 7]")


def pack_int4_np(q: np.ndarray) -> np.ndarray:
    """(..., K) int8 codes in [-8, 7] -> (..., ceil(K / 2)) uint8."""
    q = np.asarray(q)
    if q.size:
        _check_range(int(q.min()), int(q.max()), "q")
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), dtype=q.dtype)], axis=-1)
    nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4_np(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of ``pack_int4_np``: (..., ceil(k / 2)) uint8 -> (..., k) int8."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: packed last dim {packed.shape[-1]} does not hold k={k} codes")
    nib = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    return (nib.astype(np.int8) ^ 8) - 8  # sign-extend 4-bit two's complement


def pack_int4_torch(q: torch.Tensor) -> torch.Tensor:
    if q.numel():
        _check_range(int(q.min()), int(q.max()), "q")
    if q.shape[-1] % 2:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], 1)], dim=-1)
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4_torch(packed: torch.Tensor, k: int) -> torch.Tensor:
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: packed last dim {packed.shape[-1]} does not hold k={k} codes")
    nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    return (nib.to(torch.int8) ^ 8) - 8
