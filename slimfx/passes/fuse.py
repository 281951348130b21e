"""Fusion passes: local rewrites into the dialect's fused ops, each a named list of rules.

    merge_qkv        linears sharing an input (Q/K/V, Llama's gate/up) => one GEMM over concatenated
                     weights, its output sliced back (fuse_merge.py)
    fuse_linear_act  linear(x, w, b) -> act                   => fused_linear[act]
    fuse_residual    linear(x, w, b) (-> act) + r             => fused_linear[act](.., residual=r)
    fuse_norm_quant  layer_norm / RMSNorm -> only dynamic quantized_linear users
                                                              => norm_quantize_per_token -> quantized_linear(q, .., x_scale=s)
                                                              (fuse_norm.py)
``Fuse()`` runs fold_qdq (Quantize's Q/DQ folding, for graphs kept in Q/DQ form), merge_qkv,
fuse_linear_act, fuse_residual and fuse_norm_quant, in that order: siblings merge while they are still
plain linears (an activation fused first would make gate and up different ops).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

import slimfx.ir.dialect  # noqa: F401  (registers torch.ops.slimfx.*)

from .. import ir
from .base import Pass, PassResult, as_pass, register_pass
from .fuse_merge import MergeSiblings
from .fuse_norm import FuseNormQuant

aten = torch.ops.aten
fused_linear = torch.ops.slimfx.fused_linear.default

_ACTS: dict[str, Callable] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": torch.relu,
    "silu": F.silu,
}


def _act_rules(act: str, fn: Callable) -> list[ir.Rule]:
    return [
        ir.Rule(f"linear(x, w, b) -> {act} => fused_linear[{act}]",
                lambda x, w, b: fn(F.linear(x, w, b)),
                lambda x, w, b: fused_linear(x, w, b, act, None)),
        ir.Rule(f"linear(x, w) -> {act} => fused_linear[{act}]",
                lambda x, w: fn(F.linear(x, w)),
                lambda x, w: fused_linear(x, w, None, act, None)),
    ]


LINEAR_ACT_RULES = [r for act, fn in _ACTS.items() for r in _act_rules(act, fn)]


def _same_as_output(match, original_graph, pattern_graph) -> bool:
    """The residual is a tensor of exactly the linear's output shape and dtype (no broadcast, no promotion)."""
    add = next(g for p, g in match.nodes_map.items() if p.op == "call_function" and p.target is aten.add.Tensor)
    a, b = add.args[:2]
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or add.kwargs:
        return False
    sa, sb, so = ir.meta.shape(a), ir.meta.shape(b), ir.meta.shape(add)
    return (None not in (sa, sb, so) and str(sa) == str(sb) == str(so)
            and ir.meta.dtype(a) == ir.meta.dtype(b) is not None)


def _arity(fn: Callable, n: int) -> Callable:
    """``fn(*a)`` presented as a function of ``n`` positional arguments (rules are traced by arity)."""
    fn.__signature__ = inspect.Signature([inspect.Parameter(f"a{i}", inspect.Parameter.POSITIONAL_ONLY)
                                          for i in range(n)])
    return fn


# (name, the linear's pattern, its replacement with a residual argument appended, the linear's arity)
_LINEARS = [
    ("linear(x, w, b)", lambda x, w, b: F.linear(x, w, b), lambda x, w, b, r: fused_linear(x, w, b, "none", r), 3),
    ("linear(x, w)", lambda x, w: F.linear(x, w), lambda x, w, r: fused_linear(x, w, None, "none", r), 2),
    ("fused_linear[act](x, w, b)", lambda x, w, b, act: fused_linear(x, w, b, act, None),
     lambda x, w, b, act, r: fused_linear(x, w, b, act, r), 4),
]


def _residual_rules(name: str, lin: Callable, repl: Callable, n: int) -> list[ir.Rule]:
    """lin + r and r + lin, and the same with the linear's own input as the residual (x + linear(x))."""
    return [
        ir.Rule(f"{name} + r => fused_linear(residual=r)", _arity(lambda *a: lin(*a[:-1]) + a[-1], n + 1),
                repl, _same_as_output),
        ir.Rule(f"r + {name} => fused_linear(residual=r)", _arity(lambda *a: a[-1] + lin(*a[:-1]), n + 1),
                repl, _same_as_output),
        ir.Rule(f"{name} + x => fused_linear(residual=x)", _arity(lambda *a: lin(*a) + a[0], n),
                _arity(lambda *a: repl(*a, a[0]), n), _same_as_output),
        ir.Rule(f"x + {name} => fused_linear(residual=x)", _arity(lambda *a: a[0] + lin(*a), n),
                _arity(lambda *a: repl(*a, a[0]), n), _same_as_output),
    ]


RESIDUAL_RULES = [r for name, lin, repl, n in _LINEARS for r in _residual_rules(name, lin, repl, n)]


def finish(gm, origin: str) -> None:
    """After a rewrite: shapes and dtypes for the new nodes, and where each fused node came from."""
    ir.propagate_meta(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in slimfx.ir.dialect.FUSED_OPS.values():
            info = ir.meta.info(n)
            if info.origin is None:
                info.origin = origin
            w = n.args[1]
            if "nn_module_stack" not in n.meta and w.op == "get_attr" and ir.meta.module_name(w):
                mod = ir.meta.module_name(w)
                n.meta["nn_module_stack"] = {mod: (mod, "Linear")}


@dataclasses.dataclass
class _RulePass(Pass):
    def rules(self) -> list[ir.Rule]:
        raise NotImplementedError

    def run(self, gm, ctx):
        counts = {}
        for rule in self.rules():
            done = ir.apply_rules(gm, [rule])
            if done:
                counts.update(done)
                finish(gm, self.pass_name)     # later rules' filters read the new nodes' shapes
        return PassResult(gm, bool(counts), {"rewrites": counts, "fused": sum(counts.values())})


@register_pass(name="fuse_linear_act")
@dataclasses.dataclass
class FuseLinearAct(_RulePass):
    """linear (+ bias) followed by gelu (erf or tanh), relu or silu => one fused_linear."""

    def rules(self):
        return LINEAR_ACT_RULES


@register_pass(name="fuse_residual")
@dataclasses.dataclass
class FuseResidual(_RulePass):
    """A residual add of a linear's (or fused_linear's) output => fused_linear(residual=r)."""

    def rules(self):
        return RESIDUAL_RULES


@register_pass(name="fuse")
@dataclasses.dataclass
class Fuse(Pass):
    """The fusion pipeline; each step can be switched off."""
    fold_qdq: bool = True
    merge: bool = True
    linear_act: bool = True
    residual: bool = True
    norm_quant: bool = True

    def run(self, gm, ctx):
        steps = [("fold_qdq", self.fold_qdq), ("merge_qkv", self.merge), ("fuse_linear_act", self.linear_act),
                 ("fuse_residual", self.residual), ("fuse_norm_quant", self.norm_quant)]
        stats, modified = {}, False
        for name, on in steps:
            if not on:
                continue
            res = as_pass(name)(gm, ctx)
            gm = res.graph_module
            modified |= bool(res.modified)
            stats[name] = res.stats
        return PassResult(gm, modified, stats)


__all__ = ["Fuse", "FuseLinearAct", "FuseResidual", "MergeSiblings", "FuseNormQuant", "LINEAR_ACT_RULES",
           "RESIDUAL_RULES"]
