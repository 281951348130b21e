"""Local rewrites as data: a ``Rule`` is a named pattern and its replacement, both plain torch code.

    RULES = [
        Rule("gelu => gelu(tanh)", lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh")),
    ]
    n = apply_rules(gm, RULES)

Patterns are traced with ``fx.symbolic_trace`` and brought to the canonical ATen op set by the same
canonicalization that captured graphs get, so ``F.gelu`` in a pattern matches ``aten.gelu`` in the IR.
Matching and replacement are torch.fx's subgraph rewriter. Rule lists combine with ``+``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional, Sequence

import torch.fx as fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str                                   # what it does: "addmm(b, x, t(w)) => linear(x, w, b)"
    pattern: Callable
    replacement: Callable
    # optional filter(match, original_graph, pattern_graph) -> bool, as fx's rewriter takes it
    where: Optional[Callable] = None

    def traced(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        return _trace(self.pattern), _trace(self.replacement)


def _trace(fn: Callable) -> fx.GraphModule:
    from .canonical import canonicalize_calls
    n_args = len(inspect.signature(fn).parameters)
    # a wrapper with named positional parameters, so lambdas and functions trace alike
    names = [f"a{i}" for i in range(n_args)]
    src = f"def _pattern({', '.join(names)}):\n    return fn({', '.join(names)})\n"
    scope = {"fn": fn}
    exec(src, scope)                                    # noqa: S102 - builds a fixed-arity wrapper
    gm = fx.symbolic_trace(scope["_pattern"])
    canonicalize_calls(gm)
    return gm


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule]) -> dict[str, int]:
    """Apply each rule, in order, to every non-overlapping match; returns {rule name: replacements}."""
    counts: dict[str, int] = {}
    for rule in rules:
        pattern, replacement = rule.traced()
        filters = [rule.where] if rule.where else None
        done = replace_pattern_with_filters(gm, pattern, replacement, match_filters=filters)
        for replaced in done:
            _inherit_source(replaced)
        if done:
            counts[rule.name] = len(done)
    if counts:
        gm.graph.lint()
        gm.recompile()
    return counts


# where a node came from: the replacement of a match comes from the most specific module among the matched
# nodes (a fused linear + GELU from the linear's module, not the block that applies the GELU)
_SOURCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _inherit_source(replaced) -> None:
    anchor = replaced.nodes_map[replaced.anchor]             # ``anchor`` is the pattern's node
    matched = [anchor] + [g for p, g in replaced.nodes_map.items()
                          if p.op not in ("placeholder", "output") and g is not anchor]
    source = max(matched, key=lambda g: len(g.meta.get("nn_module_stack") or ()))
    for node in replaced.replacements:
        for key in _SOURCE_KEYS:
            if key in source.meta and key not in node.meta:
                node.meta[key] = source.meta[key]
