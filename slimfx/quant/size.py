"""Honest storage accounting for quantized weights: payload plus every scale and zero point stored.

Counted as slimfx stores them: codes packed at ``bits`` per value along the last axis (4-bit: two per
byte, an odd row padded to a whole byte; 8-bit: one byte), fp32 scales (4 bytes each), int8 zero points
(1 byte each) only for asymmetric uniform schemes (symmetric and log schemes store no zero point).
"""
from __future__ import annotations

import math

from .scheme import QScheme, param_shape

SCALE_BYTES = 4
ZERO_POINT_BYTES = 1


def weight_bytes(shape: tuple, scheme: QScheme) -> int:
    """Bytes to store a weight of ``shape`` quantized with ``scheme``, parameters included."""
    shape = tuple(int(s) for s in shape)
    rows = math.prod(shape[:-1])
    payload = rows * math.ceil(shape[-1] * scheme.bits / 8)
    n_params = math.prod(param_shape(shape, scheme))
    stores_zp = scheme.kind == "uniform" and not scheme.symmetric
    return payload + n_params * (SCALE_BYTES + (ZERO_POINT_BYTES if stores_zp else 0))


def fp32_bytes(shape: tuple) -> int:
    return 4 * math.prod(int(s) for s in shape)
