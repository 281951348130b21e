"""GPTQ: weight quantization that compensates each column's rounding error in the columns not yet quantized.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022).
For a linear layer y = W x with inputs X seen on calibration data, H = X X^T / n. Round-to-nearest (RTN)
rounds every weight on its own; GPTQ quantizes W one input column at a time and moves the column's error
into the remaining columns along H^-1 (the optimal update for the layer output ||W X - Q X||^2 under the
columns already fixed), working on blocks of columns with lazy updates, from the upper Cholesky factor of
H^-1. The result is the same scheme (codes and scales, same ``QScheme``, the same dequantization) as RTN:
only which integers are stored changes, so every backend and kernel runs it unchanged.

Scales: per-channel schemes take their scales from the original W, as RTN does; per-group schemes take each
group's scale from the group's columns as GPTQ has updated them when the group starts (the paper's
choice), or with ``act_order`` (columns by decreasing H_jj; ``Quantize``'s default) RTN's scales of the
original W, so that the groups stay contiguous along K. Columns the calibration never excites (H_jj = 0)
get H_jj = 1: no error moves into or out of them.

``output_error(w, w_hat, H)`` = tr((W - W') H (W - W')^T) / tr(W H W^T): the relative output error on the
calibration inputs, the quantity GPTQ minimizes (reported per layer, for GPTQ and for RTN).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .quantize import dequantize_tensor_torch, qparams_torch, quantize_tensor_torch
from .scheme import QParams, QScheme


class Hessian:
    """H = X X^T / n over the rows of every tensor added (a linear's inputs, all leading dims flattened):
    each batch's X X^T in fp32 (twice as fast as fp64; a batch's few hundred rows lose nothing that
    matters to a damped inverse), accumulated over batches in fp64."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.h += (x.T @ x).to(torch.float64).cpu()      # (a graph on a GPU: the sum stays on the CPU)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("GPTQ: no calibration rows reached this layer")
        return self.h / self.n


def _column_scheme(scheme: QScheme) -> QScheme:
    """The scheme of one column (n_out x 1) under its own scales: per channel along the rows."""
    return dataclasses.replace(scheme, granularity="channel", group_size=None, axis=0)


def upper_inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in fp64, with H_jj = 1 for the columns
    calibration never excites (so no error moves into or out of them); the damping grows tenfold (twice at
    most) while that is not positive definite."""
    h = h.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    k = h.shape[0]
    if bool((h.diagonal() < 0).any()) or not torch.isfinite(h).all():
        raise ValueError(f"GPTQ: the input Hessian of {name} has negative or non-finite entries on its diagonal: "
                         f"it is not X X^T of any inputs")
    mean_diag = float(h.diagonal().mean())
    for attempt in range(3):
        lam = damp * (10 ** attempt) * mean_diag
        l, info = torch.linalg.cholesky_ex(h + lam * torch.eye(k, dtype=h.dtype))
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    raise ValueError(f"GPTQ: the input Hessian of {name} is not positive definite even with damping "
                     f"{damp * 100:g} x mean(diag) (Quantize.damp={damp:g}); raise damp (0.01 is the default), "
                     f"or give more calibration tokens than its {k} input columns")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scheme: QScheme, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, name: str = "weight",
                  choose_qparams: Optional[Callable] = None) -> tuple[torch.Tensor, QParams]:
    """(codes, qparams) of ``w`` (n_out x K) under ``scheme`` (per channel along axis 0, or per group along
    K), chosen by GPTQ with input Hessian ``h`` (K x K). Codes are int8 in w's shape; qparams in the
    scheme's parameter shape, as ``qparams_torch`` gives them.

    act_order: quantize the columns in order of decreasing H_jj (the most excited inputs first, while the
    most columns remain to absorb their error). Groups then keep the scales RTN gives the original
    weights ("static groups"), so the stored layout (contiguous groups along K) does not change.

    Weights that are exactly zero stay zero (a pruned layer keeps its pattern, as under RTN): their error,
    like any other, moves into the columns not yet quantized.

    choose_qparams(w_part, scheme, columns) -> QParams: how scales are chosen (default: absmax,
    ``qparams_torch``), called on the whole original W with ``columns`` = slice(0, K) for static scales, or
    per group on its updated columns (a per-group scheme, ``columns`` that group's slice of K)."""
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ: {name} of shape {tuple(w.shape)} needs a {w.shape[1]} x {w.shape[1]} Hessian, "
                         f"got {tuple(h.shape)}")
    grouped = scheme.granularity == "group"
    if not grouped and not (scheme.granularity == "channel" and scheme.axis == 0):
        raise ValueError(f"GPTQ: {name}: weights per output channel or per group along K, not {scheme}")
    n, k = w.shape
    G = scheme.group_size if grouped else None
    diag = h.diagonal().to(torch.float64)
    diag = diag.masked_fill(diag == 0, 1.0)              # as upper_inverse_cholesky sees the dead columns
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(k)
    hinv = upper_inverse_cholesky(h[order][:, order], damp, name)
    W = w.detach().to(torch.float64)[:, order].clone()
    zeros = W == 0
    col = _column_scheme(scheme)
    choose = choose_qparams or (lambda part, sch, cols: qparams_torch(part, sch, name=name))
    codes = torch.zeros(n, k, dtype=torch.int8)           # in processing order; put back in place at the end
    static = not grouped or act_order
    if static:                                            # (n, 1) per row, or (n, K/G) per group, as RTN
        qp_all = choose(w.to(torch.float32), scheme, slice(0, k))
        scale, zero = qp_all.scale.reshape(n, -1), qp_all.zero_point.reshape(n, -1)
    else:
        scale = torch.zeros(n, k // G, dtype=torch.float32)
        zero = torch.zeros(n, k // G, dtype=torch.int8)
        block = max(G, block // G * G)                    # groups start at block starts, where W is up to date
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, Hb = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % G == 0:
                g = choose(W1[:, i:i + G].to(torch.float32), _group_scheme(scheme, G), slice(j, j + G))
                scale[:, j // G], zero[:, j // G] = g.scale.reshape(n), g.zero_point.reshape(n)
            s = int(order[j]) // G if grouped else 0      # this column's scale slot
            qp = QParams(scale[:, s:s + 1], zero[:, s:s + 1])
            q = quantize_tensor_torch(W1[:, i:i + 1].to(torch.float32), col, qp)
            q = torch.where(zeros[:, j:j + 1], qp.zero_point.to(q.dtype), q)    # dequantizes to exactly 0
            codes[:, j:j + 1] = q
            err = (W1[:, i] - dequantize_tensor_torch(q, col, qp).reshape(n).to(torch.float64)) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hb[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out, QParams(scale, zero)


def _group_scheme(scheme: QScheme, G: int) -> QScheme:
    return dataclasses.replace(scheme, granularity="group", group_size=G)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T) / tr(W H W^T): the layer's output error relative to its output, on the
    calibration inputs H summarizes."""
    return output_errors(w, [w_hat], h)[0]


def output_errors(w: torch.Tensor, w_hats, h: torch.Tensor) -> list[float]:
    """``output_error`` of each of ``w_hats`` against the same ``w`` and ``h``, tr(W H W^T) computed once (in
    float64: GPTQ makes W - W' small exactly where H is large, so float32 products lose the difference)."""
    w64, h = w.to(torch.float64), h.to(torch.float64)
    den = ((w64 @ h) * w64).sum().clamp(min=1e-300)
    out = []
    for w_hat in w_hats:
        d = (w - w_hat).to(torch.float64)
        out.append(float(((d @ h) * d).sum() / den))
    return out
