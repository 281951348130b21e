"""The verifier: invariants every pass must keep. Raises ``VerificationError`` naming the node."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import meta
from .propagate import propagate_meta


class VerificationError(RuntimeError):
    pass


def output_signature(gm: fx.GraphModule, names: Optional[dict] = None) -> list[tuple]:
    """(shape, dtype) of each graph output, shapes as strings so symbolic dims compare without guards: sympy's
    printing, which orders terms by name (torch's keeps the order the expression was built in). ``names``
    renames symbols first (``slimfx.load``: the new symbols back to the saved names)."""
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    if out is None:
        raise VerificationError("the graph has no output node")
    leaves = pytree.tree_leaves(out.args[0])
    return [_signature(a, names) if isinstance(a, fx.Node) else (None, None) for a in leaves]


def input_signature(gm: fx.GraphModule) -> list[tuple]:
    """(name, shape, dtype) of each graph input (placeholder) in order: the compiled model's call convention,
    which backends bind by position."""
    return [(n.target, *_signature(n)) for n in gm.graph.nodes if n.op == "placeholder"]


def _signature(n: fx.Node, names: Optional[dict] = None) -> tuple:
    def dim(d):
        if not isinstance(d, torch.SymInt):
            return str(d)
        expr = d.node.expr
        if names:
            expr = expr.xreplace({s: type(s)(names[s.name], **s.assumptions0) for s in expr.free_symbols
                                  if s.name in names})
        return str(expr)
    return None if meta.shape(n) is None else tuple(dim(d) for d in meta.shape(n)), meta.dtype(n)


def verify(gm: fx.GraphModule, expected_outputs: Optional[Sequence[tuple]] = None,
           names: Optional[dict] = None, expected_inputs: Optional[Sequence[tuple]] = None) -> None:
    """Check (1) fx's structural lint (defined-before-use, one output, the last node), (2) every get_attr reads a tensor
    that exists, (3) shapes and dtypes propagate through every node (a pass that wires a wrong shape fails
    here, at the node), (4) the outputs keep the shapes and dtypes they had, (5) the inputs (placeholders) keep
    their names, order, shapes and dtypes (``input_signature``): the compiled model is called as the model was."""
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"graph is malformed: {e}") from e
    last = list(gm.graph.nodes)[-1] if len(gm.graph.nodes) else None
    if last is not None and last.op != "output" and any(n.op == "output" for n in gm.graph.nodes):
        # graph.call_function outside an inserting_* block appends after the output: fx lints it, torch's code
        # ignores it, a backend reading the last node as the output would return it
        raise VerificationError(f"node {last.name} ({last.op} {last.target}) comes after the output node; insert "
                                f"nodes with graph.inserting_before/inserting_after")
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            if not isinstance(t, torch.Tensor):
                raise VerificationError(f"node {n.name}: get_attr {n.target!r} does not name a tensor on the module")
    try:
        propagate_meta(gm)
    except Exception as e:
        where = _failing_node(e)
        raise VerificationError(f"shape/dtype propagation failed{where}: {type(e).__name__}: {e}") from e
    for n in gm.graph.nodes:
        if n.op not in ("output",) and n.users and "val" not in n.meta:
            raise VerificationError(f"node {n.name} ({n.op} {n.target}) has no shape/dtype after propagation")
    if expected_inputs is not None:
        got = input_signature(gm)
        if [g[0] for g in got] != [e[0] for e in expected_inputs]:
            raise VerificationError(f"the graph's inputs changed from {[e[0] for e in expected_inputs]} to "
                                    f"{[g[0] for g in got]}: passes keep every placeholder, in order (backends "
                                    f"bind the call's arguments to them by position); leave an unused one unused")
        for g, e in zip(got, expected_inputs):
            if g != e:
                raise VerificationError(f"input {g[0]} changed from shape/dtype {e[1:]} to {g[1:]}")
    if expected_outputs is not None:
        got = output_signature(gm, names)
        if len(got) != len(expected_outputs):
            raise VerificationError(f"the graph returns {len(got)} outputs, expected {len(expected_outputs)}")
        for i, (g, e) in enumerate(zip(got, expected_outputs)):
            if g != e:
                raise VerificationError(f"output {i} changed from shape/dtype {e} to {g}")


def _failing_node(e: Exception) -> str:
    # FakeTensorProp (an fx.Interpreter) adds "While executing %node : ..." to the exception's notes/args
    notes = getattr(e, "__notes__", None) or []
    for note in notes:
        if "While executing" in note:
            return " at " + note.strip().splitlines()[0].replace("While executing ", "")
    return ""
