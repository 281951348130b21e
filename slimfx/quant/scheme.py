"""What a quantized tensor is: a small frozen spec (``QScheme``) and the shapes of its parameters.

Code ranges (signed codes stored in int8, also for 4-bit):
    uniform symmetric   [-(2**(bits-1) - 1), 2**(bits-1) - 1]   int8: [-127, 127], int4: [-7, 7]; zero point 0
    uniform asymmetric  [-2**(bits-1),       2**(bits-1) - 1]   int8: [-128, 127], int4: [-8, 7]; int8 zero point
    log                 [-(2**(bits-1) - 1), 2**(bits-1) - 1]   sign and exponent code, 0 is zero (see ``logq``)

Parameter (scale / zero point) shapes for a tensor ``x``; all but "group" broadcast against ``x`` as is:
    tensor   ()
    channel  keepdims over every axis but ``axis``: (N, 1) for a (N, K) weight with axis=0
    token    x.shape[:-1] + (1,)            one scale per row of the last axis (dynamic activations)
    group    x.shape[:-1] + (K // group_size,)   contiguous groups along the last axis (K of a (N, K) weight)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

KINDS = ("uniform", "log")
GRANULARITIES = ("tensor", "channel", "group", "token")


@dataclass(frozen=True)
class QScheme:
    """How to quantize one tensor. Prints, compares and round-trips through ``to_dict``/``from_dict``."""
    kind: Literal["uniform", "log"] = "uniform"
    bits: int = 8
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group", "token"] = "tensor"
    group_size: int | None = None
    axis: int = 0  # the kept axis for granularity="channel"; ignored otherwise

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"QScheme.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QScheme.bits must be an int in [2, 8] (codes are stored in int8), got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QScheme.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"QScheme.group_size must be a positive int for granularity='group', "
                                 f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"QScheme.group_size is only meaningful for granularity='group', "
                             f"got group_size={self.group_size} with granularity={self.granularity!r}")
        if self.kind == "log" and not self.symmetric:
            raise ValueError("QScheme.symmetric must be True for kind='log' (the code stores the sign)")

    @property
    def qmin(self) -> int:
        half = 2 ** (self.bits - 1)
        return -half if (self.kind == "uniform" and not self.symmetric) else -(half - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QScheme":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"QScheme.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)


class QParams(NamedTuple):
    """Scale (fp32) and zero point (int8; zeros for symmetric and log schemes), numpy or torch alike."""
    scale: object
    zero_point: object


def check_shape(shape: tuple, scheme: QScheme, name: str = "x") -> None:
    """Raise ValueError naming ``name`` if a tensor of ``shape`` cannot use ``scheme``'s granularity."""
    nd = len(shape)
    g = scheme.granularity
    if g == "channel" and not -nd <= scheme.axis < nd:
        raise ValueError(f"{name}: channel axis {scheme.axis} out of range for shape {tuple(shape)}")
    if g in ("token", "group") and nd == 0:
        raise ValueError(f"{name}: granularity={g!r} needs at least one dimension, got a scalar")
    if g == "group" and shape[-1] % scheme.group_size:
        raise ValueError(f"{name}: group_size={scheme.group_size} does not divide the last dimension "
                         f"K={shape[-1]} of shape {tuple(shape)}")


def reduce_axes(ndim: int, scheme: QScheme) -> tuple[int, ...]:
    """Axes reduced (keepdims) to get one parameter per slice, for tensor/channel/token granularity.
    (Group granularity reduces the trailing axis of ``x.reshape(..., K // G, G)`` instead.)"""
    g = scheme.granularity
    if g == "tensor":
        return tuple(range(ndim))
    if g == "channel":
        keep = scheme.axis % ndim
        return tuple(a for a in range(ndim) if a != keep)
    if g == "token":
        return (ndim - 1,)
    raise ValueError(f"reduce_axes: granularity {g!r} has no plain reduction (use the grouped view)")


def param_shape(shape: tuple, scheme: QScheme) -> tuple:
    """The shape of scale and zero point for a tensor of ``shape`` (see the module docstring)."""
    check_shape(shape, scheme)
    g = scheme.granularity
    if g == "tensor":
        return ()
    if g == "group":
        return tuple(shape[:-1]) + (shape[-1] // scheme.group_size,)
    axes = reduce_axes(len(shape), scheme)
    return tuple(1 if a in axes else s for a, s in enumerate(shape))
