"""Calibration observers: watch tensors, then give a range ``(lo, hi)`` and quantization parameters.

Each observer is per tensor (``axis=None``) or per channel (``axis=k``: one range per index of axis k).
``observe(x)`` accumulates (numpy or torch input); ``range()`` returns ``(lo, hi)`` in the parameter shape of
``scheme.param_shape`` (``()`` per tensor, keepdims per channel); ``qparams(scheme)`` turns that into a
``QParams``. Observing NaN or Inf raises ValueError naming the observer class and the caller's ``name``.

    MinMaxObserver               running min and max
    MovingAverageMinMaxObserver  exponential moving average of each batch's min and max
    PercentileObserver           the p-th and (100-p)-th percentiles of everything observed
    MSEObserver                  the min-max range shrunk by the clipping ratio that minimizes quantize->dequantize MSE

Percentile and MSE keep the observed values (per channel, at most ``max_samples`` each; beyond that a
fixed-seed random subset of them, so results are reproducible for the same sequence of batches).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .quantize import fake_quantize_np, qparams_from_range_np
from .scheme import QParams, QScheme


class Observer:
    def __init__(self, axis: int | None = None, name: str = ""):
        self.axis, self.name = axis, name
        self._pshape: tuple | None = None  # parameter shape, fixed by the first observe()

    def _who(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _channels(self, x) -> np.ndarray:
        """x as float32 (C, n): C = 1 per tensor, else the size of ``axis``; checks finiteness and shape."""
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        x = np.asarray(x, dtype=np.float32)
        bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(f"{self._who()}: observed {bad} NaN/Inf value(s) in a tensor of shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"{self._who()}: observed an empty tensor of shape {x.shape}")
        if self.axis is None:
            pshape, flat = (), x.reshape(1, -1)
        else:
            if not -x.ndim <= self.axis < x.ndim:
                raise ValueError(f"{self._who()}: axis {self.axis} out of range for shape {x.shape}")
            ax = self.axis % x.ndim
            pshape = tuple(s if a == ax else 1 for a, s in enumerate(x.shape))
            flat = np.moveaxis(x, ax, 0).reshape(x.shape[ax], -1)
        if self._pshape is not None and pshape != self._pshape:
            raise ValueError(f"{self._who()}: parameter shape {pshape} of this tensor ({x.shape}) differs "
                             f"from earlier observations' {self._pshape}")
        self._pshape = pshape
        return flat

    def observe(self, x) -> None:
        self._update(self._channels(x))

    def _update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pshape is None:
            raise ValueError(f"{self._who()}: range() before any observe()")
        lo, hi = self._range()
        return lo.reshape(self._pshape).astype(np.float32), hi.reshape(self._pshape).astype(np.float32)

    def qparams(self, scheme: QScheme) -> QParams:
        want = "tensor" if self.axis is None else "channel"
        if scheme.granularity != want:
            raise ValueError(f"{self._who()}: observes per {want}, cannot give parameters for "
                             f"granularity={scheme.granularity!r}")
        if want == "channel" and self._pshape and scheme.axis % len(self._pshape) != self.axis % len(self._pshape):
            raise ValueError(f"{self._who()}: observes axis {self.axis}, scheme asks for axis {scheme.axis}")
        return qparams_from_range_np(*self.range(), scheme)


class MinMaxObserver(Observer):
    def __init__(self, axis: int | None = None, name: str = ""):
        super().__init__(axis, name)
        self._lo = self._hi = None

    def _update(self, x):
        lo, hi = x.min(axis=1), x.max(axis=1)
        self._lo = lo if self._lo is None else np.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else np.maximum(self._hi, hi)

    def _range(self):
        return self._lo, self._hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """lo <- lo + c * (batch_min - lo) (same for hi); the first batch initializes."""

    def __init__(self, averaging_constant: float = 0.01, axis: int | None = None, name: str = ""):
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"MovingAverageMinMaxObserver: averaging_constant must be in (0, 1], "
                             f"got {averaging_constant}")
        super().__init__(axis, name)
        self.c = np.float32(averaging_constant)

    def _update(self, x):
        lo, hi = x.min(axis=1), x.max(axis=1)
        if self._lo is None:
            self._lo, self._hi = lo, hi
        else:
            self._lo = self._lo + self.c * (lo - self._lo)
            self._hi = self._hi + self.c * (hi - self._hi)


class _SampleObserver(Observer):
    """Keeps the observed values, (C, n), at most ``max_samples`` per channel."""

    def __init__(self, axis: int | None = None, name: str = "", max_samples: int = 1 << 20):
        super().__init__(axis, name)
        self.max_samples = max_samples
        self._data: np.ndarray | None = None
        self._rng = np.random.default_rng(0)

    def _update(self, x):
        data = x if self._data is None else np.concatenate([self._data, x], axis=1)
        if data.shape[1] > self.max_samples:
            keep = np.sort(self._rng.choice(data.shape[1], self.max_samples, replace=False))
            data = data[:, keep]
        self._data = np.ascontiguousarray(data)


class PercentileObserver(_SampleObserver):
    """lo, hi = the (100 - p)-th and p-th percentiles (numpy's linear interpolation) per channel."""

    def __init__(self, percentile: float = 99.99, axis: int | None = None, name: str = "",
                 max_samples: int = 1 << 20):
        if not 50 < percentile <= 100:
            raise ValueError(f"PercentileObserver: percentile must be in (50, 100], got {percentile}")
        super().__init__(axis, name, max_samples)
        self.percentile = percentile

    def _range(self):
        return (np.percentile(self._data, 100 - self.percentile, axis=1),
                np.percentile(self._data, self.percentile, axis=1))


class MSEObserver(_SampleObserver):
    """Per channel, the clipping ratio r in linspace(1, min_ratio, steps) whose range (r * min, r * max)
    minimizes the mean squared quantize->dequantize error under ``scheme``. r = 1 (plain min-max) is a
    candidate and wins ties, so the MSE is never above min-max's on the observed data."""

    def __init__(self, scheme: QScheme, steps: int = 100, min_ratio: float = 0.01, axis: int | None = None,
                 name: str = "", max_samples: int = 1 << 20):
        if steps < 1 or not 0 < min_ratio <= 1:
            raise ValueError(f"MSEObserver: need steps >= 1 and 0 < min_ratio <= 1, got {steps}, {min_ratio}")
        super().__init__(axis, name, max_samples)
        self.scheme, self.steps, self.min_ratio = scheme, steps, min_ratio

    def _range(self):
        flat = dataclasses.replace(self.scheme, granularity="channel", axis=0, group_size=None)
        data = self._data
        lo, hi = data.min(axis=1, keepdims=True), data.max(axis=1, keepdims=True)
        best_err = np.full(data.shape[0], np.inf)
        best_lo, best_hi = lo[:, 0].copy(), hi[:, 0].copy()
        for r in np.linspace(1.0, self.min_ratio, self.steps, dtype=np.float32):
            qp = qparams_from_range_np(lo * r, hi * r, flat)
            err = np.mean((fake_quantize_np(data, flat, qp) - data) ** 2, axis=1, dtype=np.float64)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_lo = np.where(better, lo[:, 0] * r, best_lo)
            best_hi = np.where(better, hi[:, 0] * r, best_hi)
        return best_lo, best_hi

    def qparams(self, scheme: QScheme | None = None) -> QParams:
        scheme = self.scheme if scheme is None else scheme
        if (scheme.kind, scheme.bits, scheme.symmetric) != (self.scheme.kind, self.scheme.bits, self.scheme.symmetric):
            raise ValueError(f"{self._who()}: searched its range for {self.scheme}, asked for {scheme}")
        return super().qparams(scheme)
