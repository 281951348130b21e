"""LowerSparse: linear layers whose weights are already sparse become ``slimfx.sparse_linear``.

The pass prunes nothing and changes no number: it finds the zeros a weight already has (a checkpoint
pruned elsewhere, ``torch.nn.utils.prune`` made permanent, a pruning pass run before it) and, where they
form a pattern a sparse kernel can use, says so in the IR. The op computes exactly what the linear did on
every backend; the triton backend packs the weight (2:4 -> compress_24, blocks -> BSR) and runs the
sparse kernel where it measures faster than the dense GEMM.

Patterns, in the order "auto" tries them:
    "block"   at least ``min_block_sparsity`` of W's (BN, BK) blocks are all zero: block-sparse GEMM skips
              them (compute and bytes shrink with the density: the prefill/large-M path)
    "2:4"     at most 2 nonzeros in every group of 4 along K: half the weight bytes (the decode path)
Both aten.linear and fused_linear (after Fuse: activation and residual carried over) are lowered.
A W8A8 layer (quantized_linear) stays that op: a block pattern of its int8 weight is recorded in
``ir.meta.info(node).sparse``, and the triton backend runs it on bsr_int8_gemm (int8 has no 2:4 kernel).
Weight-only layers are left as they are.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from .. import ir
from ..ir.dialect.sparse import block_pattern, block_sparsity, parse_pattern, pattern_violation
from .base import Pass, PassResult, register_pass
from .quantize import module_patterns, selected_linears

aten = torch.ops.aten
sf = torch.ops.slimfx
PATTERNS = ("auto", "2:4", "block")


@register_pass(name="lower_sparse")
@dataclasses.dataclass
class LowerSparse(Pass):
    """Linears with sparse weights => slimfx.sparse_linear (see the module docstring).

    pattern:            "auto" (block if sparse enough in blocks, else 2:4), "2:4" or "block"
    block:              (BN, BK), powers of two >= 16: the block shape of the block-sparse kernel
    min_block_sparsity: the fraction of all-zero blocks a layer needs for "block" (below it the skipped
                        work does not pay for the sparse kernel's indexing)
    include/exclude:    module-name globs ("*.mlp.*") or "re:<regex>"; empty include = every layer"""
    pattern: str = "auto"
    block: tuple = (64, 64)
    min_block_sparsity: float = 0.5
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"LowerSparse.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        self.block = tuple(self.block)
        try:
            if len(self.block) != 2:
                raise ValueError
            parse_pattern(block_pattern(self.block))
        except (ValueError, TypeError):
            raise ValueError(f"LowerSparse.block must be two powers of two >= 16 (BN, BK), got {self.block!r}") \
                from None
        if not 0.0 <= self.min_block_sparsity <= 1.0:
            raise ValueError(f"LowerSparse.min_block_sparsity must be in [0, 1], got {self.min_block_sparsity!r}")
        self.include, self.exclude = module_patterns(self.include), module_patterns(self.exclude)

    def choose(self, w: torch.Tensor) -> tuple[str | None, str]:
        """(the pattern to lower to, "") or (None, why not). int8 weights (W8A8 layers): block patterns only."""
        int8 = w.dtype == torch.int8
        if w.ndim != 2 or not (w.is_floating_point() or int8):
            return None, f"weight of shape {tuple(w.shape)} / {w.dtype} is not a 2-D float or int8 tensor"
        reasons = []
        if self.pattern in ("auto", "block"):
            s = block_sparsity(w, self.block)
            if s >= self.min_block_sparsity and s > 0:
                return block_pattern(self.block), ""
            reasons.append(f"{s:.0%} zero {self.block[0]}x{self.block[1]} blocks < {self.min_block_sparsity:.0%}")
        if self.pattern in ("auto", "2:4") and int8:
            reasons.append("int8 2:4 has no kernel")
        elif self.pattern in ("auto", "2:4"):
            why = pattern_violation(w, "2:4")
            if why is None:
                return "2:4", ""
            reasons.append(why)
        return None, "; ".join(reasons)

    def run(self, gm, ctx):
        g = gm.graph
        lowered, skipped = {}, {}
        targets = (aten.linear.default, sf.fused_linear.default, sf.quantized_linear.default)
        for n, name in selected_linears(gm, self.include, self.exclude, targets):
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
            n.replace_all_uses_with(new)
            g.erase_node(n)
            lowered[name] = pattern
        if lowered:
            gm.recompile()
        stats = {"layers": len(lowered)}
        for p in lowered.values():
            stats[p] = stats.get(p, 0) + 1
        return PassResult(gm, bool(lowered), {**stats, "lowered": lowered, "skipped": skipped})


__all__ = ["LowerSparse", "PATTERNS"]
