"""Clean-up passes: dead-code elimination, common-subexpression elimination, constant folding, and the
generic ``Rewrite`` pass that applies a list of declarative rules."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops

from .. import ir
from ..ir.propagate import carry_propagation
from .base import Pass, PassResult, register_pass


@register_pass(name="dce")
@dataclasses.dataclass
class DCE(Pass):
    """Remove nodes whose results nobody uses, then the tensors nothing reads any more."""

    def run(self, gm, ctx):
        before = len(gm.graph.nodes)
        changed = ir.eliminate_dead_code(gm.graph)
        dropped = ir.drop_unused_tensors(gm)
        if changed:
            gm.recompile()
        return PassResult(gm, changed or dropped > 0, {"nodes_removed": before - len(gm.graph.nodes),
                                                        "tensors_dropped": dropped})


@register_pass(name="cse")
@dataclasses.dataclass
class CSE(Pass):
    """Merge identical pure computations (same op on the same inputs); random ops are never merged."""

    def run(self, gm, ctx):
        before = len(gm.graph.nodes)
        res = CSEPass(banned_ops=get_CSE_banned_ops())(gm)
        if not res.modified:
            return PassResult(gm, False, {"nodes_merged": 0})
        new = res.graph_module
        new.graph._codegen = gm.graph._codegen       # CSEPass builds a fresh Graph: keep the call convention
        new.recompile()
        for a, b in zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                        [n for n in new.graph.nodes if n.op == "placeholder"]):
            b.meta = a.meta                         # and the placeholders' symbolic shapes
        # the copies keep their names and vals: the next propagation reruns the readers of merged nodes only
        copies = {n.name: n for n in new.graph.nodes}
        carry_propagation(gm.graph, new.graph, {n: copies[n.name] for n in gm.graph.nodes if n.name in copies})
        return PassResult(new, True, {"nodes_merged": before - len(new.graph.nodes)})


@register_pass(name="const_fold")
@dataclasses.dataclass
class ConstFold(Pass):
    """Evaluate nodes that depend only on tensors of the module and constants, storing the result as a
    new tensor. A result larger than ``max_growth`` times its inputs is left unfolded (folding
    ``expand`` of a small buffer would otherwise materialize it)."""
    max_growth: float = 1.0

    def run(self, gm, ctx):
        const: dict[fx.Node, object] = {}
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                const[node] = getattr(gm, node.target)
                continue
            if node.op != "call_function" or node.is_impure() or _is_random(node):
                continue
            inputs = node.all_input_nodes
            if any(i not in const for i in inputs) or "empty" in str(node.target):
                continue
            args = fx.node.map_arg(node.args, lambda n: const[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: const[n])
            with torch.no_grad():
                value = node.target(*args, **kwargs)
            if not isinstance(value, torch.Tensor):
                continue
            in_numel = sum(const[i].numel() for i in inputs if isinstance(const[i], torch.Tensor))
            if value.numel() > self.max_growth * max(in_numel, 1):
                continue
            name = ir.meta.add_tensor_attr(gm, f"folded_{node.name}", value.contiguous())
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(name)
            attr.meta.update(node.meta)
            node.replace_all_uses_with(attr)
            gm.graph.erase_node(node)
            const[attr] = value
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            ir.drop_unused_tensors(gm)
            gm.recompile()
        return PassResult(gm, folded > 0, {"nodes_folded": folded})


def _is_random(node: fx.Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return packet in get_CSE_banned_ops()


@dataclasses.dataclass
class Rewrite(Pass):
    """Apply declarative ``ir.Rule`` s (a pattern and its replacement in plain torch code)."""
    rules: Sequence[ir.Rule] = ()
    name = "rewrite"

    def __post_init__(self):
        if isinstance(self.rules, ir.Rule):
            raise TypeError(f"Rewrite takes a list of rules: Rewrite([rule]), got one rule ({self.rules.name!r})")
        try:
            self.rules = tuple(self.rules)
        except TypeError:
            raise TypeError(f"Rewrite takes a list of slimfx.ir.Rule objects, got "
                            f"{type(self.rules).__name__}") from None
        bad = [r for r in self.rules if not isinstance(r, ir.Rule)]
        if bad:
            raise TypeError(f"Rewrite's rules must be slimfx.ir.Rule objects, got {type(bad[0]).__name__} "
                            f"({bad[0]!r:.60})")

    def run(self, gm, ctx):
        counts = ir.apply_rules(gm, self.rules)
        return PassResult(gm, bool(counts), {"rewrites": counts})


CLEANUP = ("const_fold", "cse", "dce")
