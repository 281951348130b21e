"""networkx views of the IR: the analyses passes need (order, users, chains, subgraph matching) and DOT."""
from __future__ import annotations

from typing import Callable, Iterator

import networkx as nx
import torch.fx as fx
from networkx.algorithms import isomorphism

from . import meta
from .printer import _fmt_shape, _target


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph over node names; each node has attributes op, target, shape, dtype, module and ``node``
    (the fx.Node itself), and each edge runs from a value to a user of it."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=_target(n), shape=_fmt_shape(n), dtype=str(meta.dtype(n) or ""),
                   module=meta.module_name(n), node=n)
    for n in gm.graph.nodes:
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


def topological_order(gm: fx.GraphModule) -> list[str]:
    return list(nx.topological_sort(to_networkx(gm)))


def match(gm: fx.GraphModule, pattern: nx.DiGraph,
          node_match: Callable[[dict, dict], bool] | None = None) -> Iterator[dict[str, str]]:
    """Every embedding of ``pattern`` (a DiGraph whose nodes carry attributes such as ``target``) in the
    graph, as {graph node name: pattern node name}. By default nodes match on equal ``target``."""
    node_match = node_match or (lambda a, b: a.get("target") == b.get("target"))
    matcher = isomorphism.DiGraphMatcher(to_networkx(gm), pattern, node_match=node_match)
    yield from matcher.subgraph_monomorphisms_iter()


def to_dot(gm: fx.GraphModule, name: str = "slimfx") -> str:
    """Graphviz DOT text of the graph: one box per node with its target and shape."""
    g = to_networkx(gm)
    esc = lambda s: str(s).replace("\\", "\\\\").replace('"', '\\"')
    lines = [f'digraph "{esc(name)}" {{', "  node [shape=box, fontname=monospace, fontsize=10];"]
    for n, a in g.nodes(data=True):
        label = f"{n}\\n{a['target']}" + (f"\\n{a['shape']} {a['dtype']}" if a["shape"] else "")
        style = ', style=filled, fillcolor="#eeeeee"' if a["op"] in ("placeholder", "get_attr", "output") else ""
        lines.append(f'  "{esc(n)}" [label="{esc(label).replace(chr(92) * 2 + "n", chr(92) + "n")}"{style}];')
    lines += [f'  "{esc(u)}" -> "{esc(v)}";' for u, v in g.edges]
    lines.append("}")
    return "\n".join(lines)
