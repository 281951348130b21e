"""fuse_norm_quant: a LayerNorm / RMSNorm whose output feeds only dynamic W8A8 ``quantized_linear`` nodes
(float x, quantized per token inside each of them) => one ``norm_quantize_per_token`` that normalizes and
quantizes once; its int8 q and fp32 per-token scale feed ``quantized_linear(q, w_q, w_scale, b, x_scale=s)``.

Norms are patterns (plain ATen code) matched with fx's SubgraphMatcher; only fp32 norms fuse, because
``quantized_linear`` returns x.dtype for float x but fp32 for int8 x.
The result is bit for bit the unfused one: the same norm, then the same per-token quantization that
quantized_linear did inside.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

import slimfx.ir.dialect  # noqa: F401

from .. import ir
from .base import Pass, PassResult, register_pass

aten = torch.ops.aten
sf = torch.ops.slimfx


def layer_norm(x, shape, w, b, eps, cudnn_enable):
    return aten.layer_norm.default(x, shape, w, b, eps, cudnn_enable)


def rms_norm(x, w, eps):
    ms = aten.mean.dim(aten.pow.Tensor_Scalar(x, 2), [-1], True)
    return aten.mul.Tensor(w, aten.mul.Tensor(x, aten.rsqrt.default(aten.add.Tensor(ms, eps))))


# name, pattern, placeholders -> (x, weight, bias, eps) or None when this match cannot fuse
NORM_PATTERNS = [
    ("layernorm", layer_norm,
     lambda x, shape, w, b, eps, _: (x, w, b, eps) if len(shape) == 1 and isinstance(eps, float) else None),
    ("rmsnorm", rms_norm, lambda x, w, eps: (x, w, None, eps) if isinstance(eps, float) else None),
]


def _dynamic_qlinear(node: fx.Node, x: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is sf.quantized_linear.default and not node.kwargs
            and node.args[0] is x and (len(node.args) < 5 or node.args[4] is None)
            and all(a is not x for a in node.args[1:]))


def _matches(gm: fx.GraphModule):
    for norm, fn, unpack in NORM_PATTERNS:
        pattern = fx.symbolic_trace(fn).graph
        matcher = SubgraphMatcher(pattern, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=True)
        for m in matcher.match(gm.graph):
            args = unpack(*m.placeholder_nodes)
            if args is not None:
                yield norm, args, m.returning_nodes[0]


@register_pass(name="fuse_norm_quant")
@dataclasses.dataclass
class FuseNormQuant(Pass):
    """LayerNorm/RMSNorm -> dynamic quantized_linear users => norm_quantize_per_token -> quantized_linear."""

    def run(self, gm, ctx):
        g = gm.graph
        fused, skipped = 0, {}
        for norm, (x, w, b, eps), out in list(_matches(gm)):
            why = None
            if not out.users or not all(_dynamic_qlinear(u, out) for u in out.users):
                why = "feeds other ops than dynamic quantized_linear"
            elif ir.meta.dtype(out) != torch.float32:
                why = f"{ir.meta.dtype(out)} norm (quantized_linear of int8 x returns fp32)"
            elif not isinstance(w, fx.Node):
                why = "no weight"
            if why:
                skipped[out.name] = why
                continue
            with g.inserting_after(out):
                nq = g.call_function(sf.norm_quantize_per_token.default, (x, w, b, eps, norm))
            with g.inserting_after(nq):
                q = g.call_function(operator.getitem, (nq, 0))
            with g.inserting_after(q):
                s = g.call_function(operator.getitem, (nq, 1))
            for n in (nq, q, s):
                n.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace")})
            ir.meta.info(nq).origin = "fuse_norm_quant"
            for u in list(out.users):
                u.args = (q, u.args[1], u.args[2], u.args[3] if len(u.args) > 3 else None, s)
            fused += 1
        if fused:
            g.eliminate_dead_code()
            g.lint()
            gm.recompile()
            ir.propagate_meta(gm)
        return PassResult(gm, fused > 0, {"fused": fused, "skipped": skipped})
