"""SparseGPT: pruning that re-fits the weights it keeps (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", 2023).

GPTQ's machinery with zero in place of the rounding grid: the columns of W are visited in order, each
column's pruned entries are set to zero and the error this makes is moved into the columns not yet visited
along the inverse input Hessian (the update that keeps ||W X - W' X||^2 smallest on the calibration inputs).
Which entries go is chosen as the walk reaches them, by the OBS saliency w_ij^2 / [H^-1]_jj (the output
error removing w_ij alone would cost, given the columns already fixed): per block of ``block`` columns for
unstructured sparsity (the block's share of zeros is the layer's), per group of M for N:M. Blocks start at
multiples of M, so N:M groups never straddle two blocks. Given a ``mask`` (chosen beforehand, e.g. whole
64x64 blocks by their activation score), only the re-fit is SparseGPT's.
"""
from __future__ import annotations

import torch

from ..quant.gptq import upper_inverse_cholesky


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    damp: float = 0.01, block: int = 128, name: str = "weight",
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` (n_out x K) pruned by SparseGPT with input Hessian ``h`` (K x K): ``sparsity`` of each block of
    columns, N:M along K when ``nm`` is given, or exactly ``mask`` (True = pruned) when that is given.
    Returns the new weight (w's dtype): zeros where pruned, the kept weights updated."""
    from .prune import smallest            # prune imports this module
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"SparseGPT: {name} of shape {tuple(w.shape)} needs a {w.shape[1]} x {w.shape[1]} "
                         f"Hessian, got {tuple(h.shape)}")
    n, k = w.shape
    if mask is not None and tuple(mask.shape) != (n, k):
        raise ValueError(f"SparseGPT: {name}: mask of shape {tuple(mask.shape)} for a weight of {(n, k)}")
    if nm is not None and mask is None:
        if k % nm[1]:
            raise ValueError(f"SparseGPT: {name}: K = {k} is not a multiple of {nm[1]}")
        block = max(nm[1], block // nm[1] * nm[1])
    hinv = upper_inverse_cholesky(h, damp, name)
    W = w.detach().to(torch.float64).clone()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, Hb = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        d2 = Hb.diagonal().square()                      # [H^-1]_jj given the columns before j
        if mask is not None:
            m1 = mask[:, i1:i2]
        elif nm is None:
            sal = W1.square() / d2
            m1 = smallest([sal], round(sparsity * sal.numel()))[0]
        else:
            m1 = torch.zeros(n, i2 - i1, dtype=torch.bool)
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]].square() / d2[i:i + nm[1]]
                drop = sal.argsort(dim=1, stable=True)[:, : nm[1] - nm[0]]
                m1[:, i:i + nm[1]].scatter_(1, drop, True)
            c = W1[:, i].clone()
            kept = c.masked_fill(m1[:, i], 0.0)
            err = (c - kept) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hb[i, i:].unsqueeze(0)
            W1[:, i] = kept                                # exact zeros, whatever the update's rounding
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    return W.to(w.dtype)
