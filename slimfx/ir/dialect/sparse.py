"""The slimfx sparsity op: ``torch.ops.slimfx.sparse_linear``, with a torch reference and a fake impl.

    sparse_linear(x, w, bias?, activation="none", residual?, pattern="2:4") -> x.dtype
        y = act(linear(x, w, bias)) + residual, exactly fused_linear's math: w is the dense weight with
        its zeros, and ``pattern`` declares the sparsity it satisfies, which a backend may exploit:
        "2:4"           at most 2 nonzeros in every group of 4 consecutive elements along K (K % 4 == 0)
        "block:BNxBK"   W cut into (BN, BK) blocks (powers of two >= 16, BK >= 32 for int8 weights: an
                        int8 tensor-core dot's K; edge blocks padded with zeros) has all-zero blocks, which
                        a block-sparse kernel skips
        The torch and numpy implementations ignore the pattern (the zeros are in w); the triton backend
        packs w into the kernel's format (compress_24 / to_bsr) at lowering.

``pattern_violation(w, pattern)`` checks a weight against a pattern (None when it satisfies it),
``block_sparsity(w, block)`` is the fraction of all-zero blocks and ``nonzero_blocks(w, blocks)`` the map of
blocks holding a nonzero for many block shapes from one pass over w: the LowerSparse pass uses them.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from .fused import check_activation, fused_linear

_BLOCK = re.compile(r"block:(\d+)x(\d+)")
INT8_MIN_BK = 32       # int8 blocks: BK >= 32, the K of an int8 tl.dot (kernels.block_sparse.INT8_MIN_BK)


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """None for "2:4"; (BN, BK) for "block:BNxBK". Anything else raises ValueError."""
    if pattern == "2:4":
        return None
    m = _BLOCK.fullmatch(pattern)
    if m:
        block = int(m.group(1)), int(m.group(2))
        if all(b >= 16 and b & (b - 1) == 0 for b in block):
            return block
    raise ValueError(f"slimfx::sparse_linear: pattern must be '2:4' or 'block:BNxBK' with BN, BK powers of two "
                     f">= 16 (e.g. 'block:64x64'), got {pattern!r}")


def block_pattern(block: tuple[int, int]) -> str:
    return f"block:{block[0]}x{block[1]}"


def blockwise(t: Tensor, block: tuple[int, int]) -> Tensor:
    """2-D ``t`` padded with zeros to whole (BN, BK) blocks (as to_bsr pads them) and viewed as
    (N/BN, BN, K/BK, BK): reduce over dims (1, 3) for one value per block."""
    bn, bk = block
    n, k = t.shape
    t = torch.nn.functional.pad(t, (0, -k % bk, 0, -n % bn))
    return t.reshape(t.shape[0] // bn, bn, t.shape[1] // bk, bk)


def _blocks(w: Tensor, block: tuple[int, int]) -> Tensor:
    """(N/BN, K/BK) bool: which blocks hold a nonzero."""
    return blockwise(w != 0, block).any(3).any(1)


def block_sparsity(w: Tensor, block: tuple[int, int]) -> float:
    """The fraction of W's (BN, BK) blocks that are all zero."""
    return 1.0 - _blocks(w, block).float().mean().item() if w.numel() else 0.0


def nonzero_blocks(w: Tensor, blocks) -> dict[tuple[int, int], Tensor]:
    """{block: (N/BN, K/BK) bool, which blocks hold a nonzero} for every (BN, BK) in ``blocks`` (powers of
    two >= 16), from one pass over w: the 16x16 map, padded and OR-pooled to each shape (padding w to whole
    (BN, BK) blocks pads that map to whole (BN/16, BK/16) cells, so each is exactly the shape's own map)."""
    nz16 = _blocks(w, (16, 16))
    return {tuple(b): blockwise(nz16, (b[0] // 16, b[1] // 16)).any(3).any(1) for b in blocks}


def pattern_violation(w: Tensor, pattern: str) -> Optional[str]:
    """None when the 2-D weight ``w`` satisfies ``pattern``, else why not (for error messages and pass
    statistics). Every block pattern is satisfied (it only says where zeros may be skipped)."""
    block = parse_pattern(pattern)
    if w.ndim != 2:
        return f"weight of shape {tuple(w.shape)} is not 2-D"
    if block is not None:
        return None
    n, k = w.shape
    if k % 4:
        return f"K = {k} is not a multiple of 4"
    nnz = (w.reshape(n, k // 4, 4) != 0).sum(-1)
    bad = (nnz > 2).nonzero()
    if len(bad):
        r, g = (int(i) for i in bad[0])
        return f"not 2:4: row {r}, columns {4 * g}..{4 * g + 3} hold {int(nnz[r, g])} nonzeros"
    return None


@torch.library.custom_op("slimfx::sparse_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w, Tensor? bias=None, str activation='none', "
                                "Tensor? residual=None, str pattern='2:4') -> Tensor")
def sparse_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
                  residual: Optional[Tensor] = None, pattern: str = "2:4") -> Tensor:
    parse_pattern(pattern)
    return fused_linear(x, w, bias, activation, residual)


@sparse_linear.register_fake
def _(x, w, bias=None, activation="none", residual=None, pattern="2:4"):
    parse_pattern(pattern)
    check_activation(activation)
    torch._check(x.shape[-1] == w.shape[1], lambda: "slimfx::sparse_linear: K of x and w differ")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


OPS = {"sparse_linear": torch.ops.slimfx.sparse_linear.default}
