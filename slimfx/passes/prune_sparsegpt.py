"""SparseGPT: pruning that re-fits the weights it keeps (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", 2023).

GPTQ's machinery with zero in place of the rounding grid: the columns of W are visited in order, each
column's pruned entries are set to zero and the error this makes is moved into the columns not yet visited
along the inverse input Hessian (the update that keeps ||W X - W' X||^2 smallest on the calibration inputs).
Which entries go is chosen as the walk reaches them, by the OBS saliency w_ij^2 / [H^-1]_jj (the output
error removing w_ij alone would cost, given the columns already fixed): per block of ``block`` columns for
unstructured sparsity (the block's share of zeros is the layer's), per group of M for N:M. Blocks start at
multiples of M, so N:M groups never straddle two blocks. Given a ``mask`` (chosen beforehand, e.g. whole
64x64 blocks by a global activation score), only the re-fit is SparseGPT's.

Whole (BN, BK) weight blocks (``blocks=``) are chosen before the walk, over the whole layer, by the output
error each one's removal costs on its own: for a row r and the block's BK columns S, removing w_rS with the
columns after S free to compensate costs ||e||^2 with e U_SS = w_rS, U the upper Cholesky factor of H^-1
(the sum of the walk's own errors over S), and a block costs that summed over its BN rows; the cheapest
``sparsity`` of the blocks go, then the walk re-fits the rest. On SmolLM2-135M, 50% of 64x64 blocks chosen so
give perplexity 4564 before any training (3620 when o_proj lost 40 of its 81 blocks, not 41), against
16453 for blocks chosen by activation score and then re-fit, with 40 (bench/smollm2_prune.py). Choosing afresh as the walk reaches each run of 128 columns, as unstructured
does, gave 45890 in an ad-hoc run: coarse blocks need the whole layer to choose from.
"""
from __future__ import annotations

import torch

from ..ir.dialect.sparse import blockwise
from ..quant.gptq import upper_inverse_cholesky


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    damp: float = 0.01, block: int = 128, name: str = "weight",
                    mask: torch.Tensor | None = None, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """``w`` (n_out x K) pruned by SparseGPT with input Hessian ``h`` (K x K): ``sparsity`` of each block of
    columns, N:M along K when ``nm`` is given, ``sparsity`` of the layer's (BN, BK) weight blocks when ``blocks``
    is (edge blocks cropped), or exactly ``mask`` (True = pruned) when that is given. Returns the new weight
    (w's dtype): zeros where pruned, the kept weights updated."""
    from .prune import count_of, expand_blocks, layer_count, smallest  # prune imports this module
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
    if blocks is not None and (len(blocks) != 2 or not all(isinstance(b, int) and b > 0 for b in blocks)):
        raise ValueError(f"SparseGPT: {name}: blocks must be two positive ints (BN, BK), got {blocks!r}")
    hinv = upper_inverse_cholesky(h, damp, name)
    W = w.detach().to(torch.float64).clone()
    if blocks is not None and mask is None:
        cost = block_costs(W, hinv, blocks)
        mask = expand_blocks(smallest([cost], layer_count(sparsity, cost.numel()))[0], blocks, W.shape)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, Hb = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        d2 = Hb.diagonal().square()                      # [H^-1]_jj given the columns before j
        if mask is not None:
            m1 = mask[:, i1:i2]
        elif nm is None:
            sal = W1.square() / d2
            m1 = smallest([sal], count_of(sparsity, sal.numel()))[0]
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


def block_costs(w: torch.Tensor, u: torch.Tensor, blocks: tuple[int, int]) -> torch.Tensor:
    """(ceil(n/BN), ceil(k/BK)): the output error of removing each (BN, BK) block of ``w`` (n x k) alone, the
    columns before it kept and those after it free to compensate: per row r and block columns S, ||e||^2 with
    e U_SS = w_rS (``u``: the upper Cholesky factor of H^-1), summed over the block's rows."""
    bk = blocks[1]
    e = torch.empty_like(w)
    for c in range(0, w.shape[1], bk):
        e[:, c:c + bk] = torch.linalg.solve_triangular(u[c:c + bk, c:c + bk], w[:, c:c + bk], upper=True, left=False)
    return blockwise(e.square(), blocks).sum((1, 3))
