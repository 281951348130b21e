"""Printing the IR: as Python code (the first debugging tool) and as a table with shapes."""
from __future__ import annotations

import torch.fx as fx

from . import meta


def code(gm: fx.GraphModule) -> str:
    """The graph as the Python code fx generates for it."""
    return gm.code


def _target(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        return str(t).replace("torch.ops.", "") if hasattr(t, "_schema") else getattr(t, "__name__", str(t))
    return str(t)


def _fmt_shape(node: fx.Node) -> str:
    s = meta.shape(node)
    return "" if s is None else "(" + ", ".join(str(d) for d in s) + ")"


def table(gm: fx.GraphModule, max_args: int = 48) -> str:
    """One row per node: name, op, target, arguments, shape, dtype, source module."""
    rows = [("name", "op", "target", "args", "shape", "dtype", "module")]
    for n in gm.graph.nodes:
        args = ", ".join(str(a) for a in n.args)
        if n.kwargs:
            args += (", " if args else "") + ", ".join(f"{k}={v}" for k, v in n.kwargs.items())
        if len(args) > max_args:
            args = args[: max_args - 3] + "..."
        dt = meta.dtype(n)
        rows.append((n.name, n.op, _target(n), args, _fmt_shape(n), str(dt).replace("torch.", "") if dt else "",
                     meta.module_name(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_module", "call_method"):
            k = _target(n)
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
