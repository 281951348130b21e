"""Structured pruning: feed-forward neurons and attention heads, removed so that the layers physically
shrink; the layers that must shrink together are found on the graph (networkx).

A neuron group is a consumer linear C whose input is computed from the outputs of producer linears P_i
by elementwise ops only (GELU/SiLU/ReLU/..., and products or sums of such values: Llama's
``down(silu(gate(x)) * up(x))``, BERT's ``output(gelu(intermediate(x)))``), where nothing else reads the
producers' outputs or the values between. Then intermediate neuron j is row j of every P_i (and its
bias) and column j of C: removing it removes exactly its contribution, and the group can be made
narrower. The groups are the weakly connected components of the elementwise nodes (networkx), with their
producers and their single consumer around them.

Neuron j is scored by E|h_j| * ||C[:, j]||, with h the consumer's input over the calibration tokens
(``column_importance``: the mean size of what the neuron adds to the output), and the lowest-scored
fraction is removed.
Attention heads: see the section below (``attention_groups``).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from .quant_calibration import run_watching

aten = torch.ops.aten
ELEMENTWISE = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
               aten.mul.Tensor, aten.add.Tensor, aten.mul.Scalar, aten.add.Scalar}


@dataclasses.dataclass
class NeuronGroup:
    consumer: fx.Node                 # the linear reading the neurons (down_proj)
    producers: list[fx.Node]          # the linears writing them (gate_proj, up_proj), in graph order
    width: int                        # neurons: the producers' N = the consumer's K

    @property
    def name(self) -> str:
        return ir.meta.module_name(self.consumer) or self.consumer.name


def _float_linear(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op != "call_function" or n.target is not aten.linear.default:
        return False
    w, b = n.args[1], n.args[2] if len(n.args) > 2 else None
    ok = isinstance(w, fx.Node) and w.op == "get_attr" and ir.meta.tensor_attr(gm, w).is_floating_point()
    return ok and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr"))


def neuron_groups(gm: fx.GraphModule) -> list[NeuronGroup]:
    """Every group whose neurons can be removed, in the consumers' graph order."""
    g = ir.to_networkx(gm)
    node = nx.get_node_attributes(g, "node")
    elementwise = [k for k, n in node.items() if n.op == "call_function" and n.target in ELEMENTWISE]
    regions = [set(c) for c in nx.weakly_connected_components(g.subgraph(elementwise))]
    groups = []
    for region in regions:
        preds = {p for v in region for p in g.predecessors(v)} - region
        succs = {s for v in region for s in g.successors(v)} - region
        if not any(_float_linear(gm, node[p]) for p in preds):
            continue                       # not between linears: nothing to do with neurons
        if len(succs) != 1 or not _float_linear(gm, node[next(iter(succs))]):
            continue                       # e.g. a residual stream: read by more than one layer
        consumer = node[next(iter(succs))]
        feeding = [v for v in region if consumer in node[v].users]
        if len(feeding) != 1 or consumer.args[0] is not node[feeding[0]] or len(node[feeding[0]].users) != 1:
            continue                       # the values reach the consumer other than as its input
        if any(not _float_linear(gm, node[p]) or not set(g.successors(p)) <= region for p in preds):
            continue                       # computed from something else too, or a producer read elsewhere
        producers = [n for n in gm.graph.nodes if n.name in preds]
        k = ir.meta.tensor_attr(gm, consumer.args[1]).shape[1]
        if {ir.meta.tensor_attr(gm, p.args[1]).shape[0] for p in producers} != {k}:
            continue
        groups.append(NeuronGroup(consumer, producers, k))
    # linear -> linear with nothing between
    for n in gm.graph.nodes:
        x = n.args[0] if _float_linear(gm, n) else None
        if isinstance(x, fx.Node) and _float_linear(gm, x) and len(x.users) == 1:
            groups.append(NeuronGroup(n, [x], ir.meta.tensor_attr(gm, n.args[1]).shape[1]))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(groups, key=lambda grp: order[grp.consumer])


def _swap_tensor(gm: fx.GraphModule, user: fx.Node, i: int, t: torch.Tensor, suffix: str) -> None:
    """Make argument ``i`` of ``user`` (a get_attr) read a new tensor ``t`` instead (the old one stays
    untouched, for the user's model); the new node keeps the old one's metadata but its shape."""
    old = user.args[i]
    with gm.graph.inserting_before(user):
        new = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{old.target}_{suffix}", t.contiguous()))
    new.meta.update(old.meta)
    user.args = (*user.args[:i], new, *user.args[i + 1:])


def _narrow(gm: fx.GraphModule, lin: fx.Node, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
            suffix: str = "narrow") -> None:
    """Keep rows ``rows`` of a linear's weight and bias (its outputs) or columns ``cols`` of its weight."""
    with torch.no_grad():
        w = ir.meta.tensor_attr(gm, lin.args[1]).detach()
        _swap_tensor(gm, lin, 1, w[rows] if rows is not None else w[:, cols], suffix)
        if rows is not None and len(lin.args) > 2 and lin.args[2] is not None:
            _swap_tensor(gm, lin, 2, ir.meta.tensor_attr(gm, lin.args[2]).detach()[rows], suffix)


def shrink(gm: fx.GraphModule, group: NeuronGroup, keep: torch.Tensor) -> None:
    """Keep only neurons ``keep`` (sorted indices): narrower producers (weights and biases) and consumer."""
    for p in group.producers:
        _narrow(gm, p, rows=keep)
    _narrow(gm, group.consumer, cols=keep)


# --- attention heads ---------------------------------------------------------------------------------------
#
# An attention block is a scaled_dot_product_attention node S whose q, k and v each come from one float
# linear (q_proj, k_proj, v_proj) and whose output reaches one float linear (o_proj); the region is every
# node on a path from those linears to o_proj, and nothing outside reads it. Heads are removed in whole
# key/value groups (grouped-query attention: kv head g serves q heads g*rep .. g*rep+rep-1, as transformers'
# repeat_kv lays them out; rep = 1 for multi-head attention): rows of q/k/v (and biases), columns of o.
# Shape arguments in the region that spell a head count (view / reshape / expand literals equal to the
# number of q or kv heads on that axis) are rewritten; a block where that is ambiguous is left alone.

_SHAPED = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default}
_SDPA = aten.scaled_dot_product_attention.default


@dataclasses.dataclass
class HeadGroup:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    o: fx.Node
    heads: int                        # q heads
    kv_heads: int
    head_dim: int
    edits: list                       # (node, axis, "q" | "kv"): shape literals to rewrite

    @property
    def name(self) -> str:
        """The modules' common prefix ("model.layers.0.self_attn", "encoder.layer.0.attention")."""
        paths = [(ir.meta.module_name(n) or n.name).split(".") for n in (self.q, self.k, self.v, self.o)]
        common = itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*paths))
        return ".".join(parts[0] for parts in common) or self.o.name


def _linears_reached(g: nx.DiGraph, node: dict, start: str, up: bool) -> list[str]:
    """The linears reached walking up (or down) the graph from ``start`` without passing through a linear."""
    seen, stack, found = set(), [start], []
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        n = node[v]
        if n.op == "call_function" and n.target is aten.linear.default and v != start:
            found.append(v)
        elif n.op == "call_function":
            stack.extend(g.predecessors(v) if up else g.successors(v))
    return sorted(found)


def attention_groups(gm: fx.GraphModule) -> tuple[list[HeadGroup], dict[str, str]]:
    """Attention blocks whose heads can be removed, and why others cannot (by block name)."""
    g = ir.to_networkx(gm)
    node = nx.get_node_attributes(g, "node")
    groups, rejected = [], {}
    for s in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA]:
        where = ir.meta.module_name(s) or s.name
        qkv = [_linears_reached(g, node, a.name, up=True) if isinstance(a, fx.Node) else [] for a in s.args[:3]]
        if any(len(l) != 1 or not _float_linear(gm, node[l[0]]) for l in qkv) or len({l[0] for l in qkv}) != 3:
            rejected[where] = "q, k and v do not each come from one linear layer of their own"
            continue
        q, k, v = (node[l[0]] for l in qkv)
        outs = _linears_reached(g, node, s.name, up=False)
        if len(outs) != 1 or not _float_linear(gm, node[outs[0]]):
            rejected[where] = "the attention output does not reach exactly one linear layer first"
            continue
        o = node[outs[0]]
        region = (nx.descendants(g, q.name) | nx.descendants(g, k.name) | nx.descendants(g, v.name)) \
            & nx.ancestors(g, o.name)
        leaks = sorted(u for r in region | {q.name, k.name, v.name} for u in g.successors(r)
                       if u not in region and u != o.name)
        if leaks:
            rejected[where] = f"head-shaped values are read outside the block ({leaks[:3]})"
            continue
        dim = ir.meta.shape(s.args[0])[-1] if ir.meta.shape(s.args[0]) else None
        wq, wk, wv, wo = (ir.meta.tensor_attr(gm, n.args[1]) for n in (q, k, v, o))
        if not isinstance(dim, int) or wq.shape[0] % dim or wk.shape[0] % dim or wk.shape != wv.shape \
                or wo.shape[1] != wq.shape[0]:
            rejected[where] = "the projections' shapes are not whole heads"
            continue
        heads, kv = wq.shape[0] // dim, wk.shape[0] // dim
        if heads % kv:
            rejected[where] = f"{heads} q heads do not divide into {kv} kv groups"
            continue
        edits, why = _head_literals(node, region, heads, kv)
        if why:
            rejected[where] = why
            continue
        groups.append(HeadGroup(q, k, v, o, heads, kv, dim, edits))
    return groups, rejected


def _head_literals(node: dict, region: set, heads: int, kv: int) -> tuple[list, str]:
    """The (node, axis, kind) of every int literal in the region's shape arguments that spells a head count,
    read off each node's output shape; expand's broadcast axes (input size 1) are not head axes."""
    edits = []
    for r in region:
        n = node[r]
        if n.op != "call_function" or n.target not in _SHAPED:
            continue
        out = ir.meta.shape(n)
        src = ir.meta.shape(n.args[0]) if n.target is aten.expand.default else None
        found = []
        for a, lit in enumerate(n.args[1]):
            # the last axis is never a head axis here (head_dim, or heads x head_dim)
            if not isinstance(lit, int) or lit not in (heads, kv) or out is None or out[a] != lit \
                    or a == len(out) - 1:
                continue
            if src is not None and (len(src) != len(out) or src[a] == 1):
                continue
            found.append((n, a, "q" if lit == heads else "kv"))
        if heads == kv:
            found = [(n, a, "q") for n, a, _ in found]
        if len(found) > 1:
            return [], f"node {n.name} has several axes that may count heads ({[a for _, a, _ in found]})"
        edits += found
    return edits, ""


def input_stats(gm: fx.GraphModule, linears: list[fx.Node], calls) -> dict[fx.Node, tuple]:
    """For each linear, (E|x_j|, sqrt(E x_j^2)) per input column j (float64), x its input over every token
    of ``calls`` (model inputs, run through the graph in torch). Linears reading one input share its pass."""
    acc = {}

    def add(x_node):
        def cb(x):
            x = x.detach().reshape(-1, x.shape[-1]).double()
            a, s2, n = acc.get(x_node, (0.0, 0.0, 0))
            acc[x_node] = (a + x.abs().sum(0), s2 + x.square().sum(0), n + x.shape[0])
        return cb
    run_watching(gm, calls, {x: add(x) for x in {lin.args[0] for lin in linears}})
    out = {}
    for lin in linears:
        a, s2, n = acc[lin.args[0]]
        out[lin] = (a / max(n, 1), (s2 / max(n, 1)).sqrt())
    return out


def column_importance(gm: fx.GraphModule, consumers: list[fx.Node], calls) -> dict[fx.Node, torch.Tensor]:
    """For each consumer linear: E|x_j| * ||W[:, j]|| per input column j (float64), the mean size of what
    column j adds to the output. A neuron or head whose weights are small may still carry large activations
    (measured on SmolLM2: removing the quarter of MLP neurons with the smallest weight norms took its
    perplexity from 22 to 1.1e6; a random quarter, to 169), so the activations must be in the score."""
    stats = input_stats(gm, consumers, calls)
    return {c: stats[c][0] * ir.meta.tensor_attr(gm, c.args[1]).detach().double().norm(dim=0) for c in consumers}


def head_scores(importance: torch.Tensor, grp: HeadGroup) -> torch.Tensor:
    """Per kv group: the column importance of o_proj summed over the group's q heads' columns."""
    return importance.reshape(grp.kv_heads, -1).sum(1)


def shrink_heads(gm: fx.GraphModule, grp: HeadGroup, keep: torch.Tensor) -> None:
    """Keep kv groups ``keep`` (sorted) and their q heads: narrower q/k/v rows (and biases), o columns, and
    the head counts in the region's shape literals."""
    rep, d = grp.heads // grp.kv_heads, grp.head_dim
    kv_idx = (keep[:, None] * d + torch.arange(d)).reshape(-1)
    q_heads = (keep[:, None] * rep + torch.arange(rep)).reshape(-1)
    q_idx = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
    for lin, idx in ((grp.q, q_idx), (grp.k, kv_idx), (grp.v, kv_idx)):
        _narrow(gm, lin, rows=idx, suffix="heads")
    _narrow(gm, grp.o, cols=q_idx, suffix="heads")
    for n, a, kind in grp.edits:
        shape = list(n.args[1])
        shape[a] = len(q_heads) if kind == "q" else len(keep)
        n.args = (n.args[0], shape, *n.args[2:])
