"""Printing the IR: as Python code (the first debugging tool) and as a table with shapes."""
from __future__ import annotations

from typing import Optional

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


def format_table(header: list[str], rows: list[list], align: Optional[str] = None) -> str:
    """A plain-text table; ``align`` is one character per column, 'l' or 'r'."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" * len(header)
    fmt = lambda r: "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def table(gm: fx.GraphModule, max_args: int = 48) -> str:
    """One row per node: name, op, target, arguments, shape, dtype, source module."""
    rows = []
    for n in gm.graph.nodes:
        args = ", ".join(str(a) for a in n.args)
        if n.kwargs:
            args += (", " if args else "") + ", ".join(f"{k}={v}" for k, v in n.kwargs.items())
        if len(args) > max_args:
            args = args[: max_args - 3] + "..."
        dt = meta.dtype(n)
        rows.append((n.name, n.op, _target(n), args, _fmt_shape(n), str(dt).replace("torch.", "") if dt else "",
                     meta.module_name(n)))
    return format_table(["name", "op", "target", "args", "shape", "dtype", "module"], rows)


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_module", "call_method"):
            k = _target(n)
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
