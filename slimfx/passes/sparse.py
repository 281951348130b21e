"""LowerSparse: linear layers whose weights are already sparse become ``slimfx.sparse_linear``.

The pass prunes nothing and changes no number: it finds the zeros a weight already has (a checkpoint
pruned elsewhere, ``torch.nn.utils.prune`` made permanent, a pruning pass run before it) and, where they
form a pattern a sparse kernel can use, says so in the IR. The op computes exactly what the linear did on
every backend; the triton backend packs the weight (2:4 -> compress_24, blocks -> BSR) and runs the
sparse kernel where it measures faster than the dense GEMM.

Patterns, in the order "auto" tries them:
    "block"   at least ``min_block_sparsity`` of W's (BN, BK) blocks are all zero: block-sparse GEMM skips
              them (compute and bytes shrink with the density: the prefill/large-M path). With
              ``block="auto"`` (the default) the shape is read off each weight: of BN, BK in 16..128, the
              largest blocks (fewest to index, larger tiles) whose kept blocks hold at most ``AUTO_SLACK``
              times the weights the leanest shape keeps (edge blocks count whole, as the kernel computes
              them), so a weight pruned in 32x32 blocks runs in 32x32 blocks, one pruned in 64x64 blocks in
              64x64 (its 32x32 blocks are as empty, and four times as many)
    "2:4"     at most 2 nonzeros in every group of 4 along K: half the weight bytes (the decode path)
Both aten.linear and fused_linear (after Fuse: activation and residual carried over) are lowered.
A W8A8 layer (quantized_linear) stays that op: a block pattern of its int8 weight is recorded in
``ir.meta.info(node).sparse``, and the triton backend runs it on bsr_int8_gemm (int8 has no 2:4 kernel).
Weight-only layers are left as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from .. import ir
from ..ir.dialect.sparse import INT8_MIN_BK, block_pattern, nonzero_blocks, parse_pattern, pattern_violation
from .base import Pass, PassResult, number_in, register_pass
from .quantize import module_patterns, selected_linears, unmatched_include

aten = torch.ops.aten
sf = torch.ops.slimfx
PATTERNS = ("auto", "2:4", "block")
BLOCK_SHAPES = tuple((bn, bk) for bn in (128, 64, 32, 16) for bk in (128, 64, 32, 16))   # block="auto" tries
AUTO_SLACK = 1.1          # block="auto": a larger shape may compute this many times the leanest shape's blocks


@register_pass(name="lower_sparse")
@dataclasses.dataclass
class LowerSparse(Pass):
    """Linears with sparse weights => slimfx.sparse_linear (see the module docstring).

    pattern:            "auto" (block if sparse enough in blocks, else 2:4), "2:4" or "block"
    block:              "auto" (per layer, the shape its zeros were pruned in: see the module docstring) or
                        (BN, BK), powers of two >= 16: the block shape of the block-sparse kernel
    min_block_sparsity: the fraction of all-zero blocks a layer needs for "block" (below it the skipped
                        work does not pay for the sparse kernel's indexing)
    include/exclude:    module-name globs ("*.mlp.*") or "re:<regex>"; empty include = every layer"""
    pattern: str = "auto"
    block: Union[str, tuple] = "auto"
    min_block_sparsity: float = 0.5
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"LowerSparse.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.block != "auto":
            try:
                self.block = tuple(self.block)
                if len(self.block) != 2:
                    raise ValueError
                parse_pattern(block_pattern(self.block))
            except (ValueError, TypeError):
                raise ValueError(f"LowerSparse.block must be 'auto' or two powers of two >= 16 (BN, BK), "
                                 f"got {self.block!r}") from None
        self.min_block_sparsity = number_in(self.min_block_sparsity, "LowerSparse.min_block_sparsity", 0, 1)
        self.include = module_patterns(self.include, "LowerSparse.include")
        self.exclude = module_patterns(self.exclude, "LowerSparse.exclude")

    def choose(self, w: torch.Tensor) -> tuple[str | None, str]:
        """(the pattern to lower to, "") or (None, why not). int8 weights (W8A8 layers): block patterns only,
        BK >= 32."""
        int8 = w.dtype == torch.int8
        if w.ndim != 2 or not (w.is_floating_point() or int8):
            return None, f"weight of shape {tuple(w.shape)} / {w.dtype} is not a 2-D float or int8 tensor"
        reasons = []
        if self.pattern in ("auto", "block") and int8 and self.block != "auto" and self.block[1] < INT8_MIN_BK:
            reasons.append(f"int8 blocks need BK >= {INT8_MIN_BK} (an int8 tensor-core dot's K), got "
                           f"{self.block[0]}x{self.block[1]}")
        elif self.pattern in ("auto", "block"):
            block, s = self.choose_block(w)
            if s >= self.min_block_sparsity and s > 0:
                return block_pattern(block), ""
            if self.block != "auto":
                reasons.append(f"{s:.0%} zero {block[0]}x{block[1]} blocks < {self.min_block_sparsity:.0%}")
            elif s == 0:
                reasons.append("no all-zero blocks of any shape")
            else:
                reasons.append(f"{s:.0%} zero {block[0]}x{block[1]} blocks (the most of any shape) < "
                               f"{self.min_block_sparsity:.0%}")
        if self.pattern in ("auto", "2:4") and int8:
            reasons.append("int8 2:4 has no kernel")
        elif self.pattern in ("auto", "2:4"):
            why = pattern_violation(w, "2:4")
            if why is None:
                return "2:4", ""
            reasons.append(why)
        return None, "; ".join(reasons)

    def choose_block(self, w: torch.Tensor) -> tuple[tuple[int, int], float]:
        """(block shape, its fraction of all-zero blocks): ``self.block`` as given, or for "auto" the largest
        of BLOCK_SHAPES with at least min_block_sparsity of its blocks zero whose kept blocks hold at most
        AUTO_SLACK times the weights the leanest shape keeps, counted as the kernel computes and stores them
        (edge blocks padded whole). Ties: the leaner, then the taller. Where none qualifies, the largest of
        the shapes with the most zero blocks, to say why."""
        shapes = BLOCK_SHAPES if self.block == "auto" else (self.block,)
        if w.dtype == torch.int8:
            shapes = tuple(b for b in shapes if b[1] >= INT8_MIN_BK)
        if not shapes:
            raise ValueError(f"LowerSparse: int8 blocks need BK >= {INT8_MIN_BK}, got block={self.block!r}")
        if not w.numel():
            return shapes[-1], 0.0
        frac, kept = {}, {}
        for (bn, bk), nz in nonzero_blocks(w, shapes).items():
            frac[bn, bk] = 1.0 - nz.float().mean().item()
            kept[bn, bk] = nz.sum().item() * bn * bk
        lean = min(kept.values())
        ok = [b for b in shapes if frac[b] > 0 and frac[b] >= self.min_block_sparsity
              and kept[b] <= AUTO_SLACK * lean]
        if not ok:
            most = max(frac.values())
            ok = [b for b in shapes if frac[b] == most]
        block = max(ok, key=lambda b: (b[0] * b[1], -kept[b], b[0]))
        return block, frac[block]

    def run(self, gm, ctx):
        g = gm.graph
        lowered, skipped = {}, unmatched_include(gm, self.include)
        targets = (aten.linear.default, sf.fused_linear.default, sf.quantized_linear.default)
        for n, name in selected_linears(gm, self.include, self.exclude, targets, skipped):
            a = normalize_function(n.target, n.args, n.kwargs, normalize_to_only_use_kwargs=True).kwargs
            w_node = a.get("weight", a.get("w", a.get("w_q")))
            if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
                skipped[name] = "weight is computed, not a tensor of the module"
                continue
            pattern, why = self.choose(ir.meta.tensor_attr(gm, w_node))
            if pattern is None:
                skipped[name] = why
                continue
            if n.target is sf.quantized_linear.default:
                ir.meta.info(n).sparse = pattern
                lowered[name] = f"{pattern} (int8)"
                continue
            with g.inserting_before(n):
                new = g.call_function(sf.sparse_linear.default,
                                      (a.get("input", a.get("x")), w_node, a.get("bias"),
                                       a.get("activation", "none"), a.get("residual"), pattern))
            new.meta = {k: v for k, v in n.meta.items() if k != "slimfx"}     # a fresh NodeInfo
            ir.meta.info(new).origin = self.pass_name
            ir.meta.info(new).merged = ir.meta.merged_modules(n)               # q+k+v stays named as one
            n.replace_all_uses_with(new)
            g.erase_node(n)
            lowered[name] = pattern
        if lowered:
            gm.recompile()
        stats = {"layers": len(lowered)}
        for p in lowered.values():
            stats[p] = stats.get(p, 0) + 1
        return PassResult(gm, bool(lowered), {**stats, "lowered": lowered, "skipped": skipped})


__all__ = ["AUTO_SLACK", "BLOCK_SHAPES", "LowerSparse", "PATTERNS"]
