"""Structured pruning of attention heads: whole key/value groups removed, the layers physically shrink.

An attention block is a core, ``scaled_dot_product_attention`` or its eager spelling
``softmax(q @ k^T ...) @ v`` (Gemma-2's soft-capped scores), whose q, k and v each come from one float
linear (q_proj, k_proj, v_proj) and whose output reaches one float linear (o_proj); the region is every
node on a path from those linears to o_proj, and nothing outside reads it. Heads are removed in whole
key/value groups (grouped-query attention: kv head g serves q heads g*rep .. g*rep+rep-1, as transformers'
repeat_kv lays them out; rep = 1 for multi-head attention): rows of q/k/v (and biases), columns of o.
Shape arguments in the region that spell a head count (view / reshape / expand literals equal to the
number of q or kv heads on that axis) are rewritten; a block where that is ambiguous is left alone, and so
is one that uses a projection's output over all its heads at once before splitting it into heads (OLMo-2's
q_norm and k_norm: an RMSNorm over the whole projection, whose mean would change with the heads removed).
"""
from __future__ import annotations

import dataclasses
import itertools

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from .prune_structured import ELEMENTWISE, _float_linear, _narrow, layer_name

aten = torch.ops.aten
_SHAPED = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default}
_MOVES = {aten.transpose.int, aten.permute.default}
_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_SCORE_OPS = ELEMENTWISE | {aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor}   # mask, cap


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
        paths = [layer_name(n).split(".") for n in (self.q, self.k, self.v, self.o)]
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


def _reached(start: fx.Node, through: set, targets: set, up: bool) -> list[tuple[fx.Node, fx.Node]]:
    """(target, via) for each ``targets`` node reached from ``start`` walking up (or down) through ``through``
    ops only; ``via`` is the node the walk came from (the target's user walking up, its input walking down)."""
    seen, stack, found = set(), [(start, None)], []
    while stack:
        n, via = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not start and n.op == "call_function" and n.target in targets:
            found.append((n, via))
        elif n is start or n.op == "call_function" and n.target in through:
            stack.extend((m, n) for m in (n.all_input_nodes if up else n.users))
    return found


def attention_cores(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(core, q, k, v) of every attention: a scaled_dot_product_attention node, or a softmax whose scores
    come from one matmul(q, k^T) through elementwise ops (scale, mask, soft cap) and whose probabilities
    go into one matmul(probs, v). Other softmaxes (a router's) are not attention."""
    cores = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is _SDPA:
            cores.append((n, *n.args[:3]))
        elif n.target in _SOFTMAX:
            scores = _reached(n, _SCORE_OPS, _MATMUL, up=True)
            mixes = _reached(n, ELEMENTWISE, _MATMUL, up=False)
            if len(scores) == 1 and len(mixes) == 1 and mixes[0][0].args[0] is mixes[0][1]:
                qk, pv = scores[0][0], mixes[0][0]
                cores.append((n, qk.args[0], qk.args[1], pv.args[1]))
    return cores


def _whole_projection_use(region: set, proj: fx.Node, width: int, head_dim: int) -> str:
    """Why heads cannot be cut out of ``proj``'s output: a use of its values over all heads together before
    they are split into heads (OLMo-2's q_norm: the RMS over the whole projection), else ''. Elementwise ops
    with scalars (or values of size 1 along the last axis) and reshapes that keep the last axis pass."""
    if width == head_dim:
        return ""                     # one head: nothing to keep apart
    flat, found = [proj], []
    for f in flat:
        for u in f.users:
            if u.name not in region or u in flat:
                continue
            out = ir.meta.shape(u)
            if u.target in _SHAPED | _MOVES:
                if out and out[-1] == width:
                    flat.append(u)    # still every head along the last axis (tokens flattened, say)
                continue              # the split into heads
            if u.target in ELEMENTWISE:
                others = [a for a in u.all_input_nodes if a not in flat and a.name not in region
                          and (ir.meta.shape(a) or (1,))[-1] != 1]
                if others:
                    found.append((u, f"{others[0].name} of shape {tuple(ir.meta.shape(others[0]))}"))
                flat.append(u)
                continue
            found.append((u, str(u.target)))
    if not found:
        return ""
    order = {n: i for i, n in enumerate(proj.graph.nodes)}
    u, what = min(found, key=lambda t: order[t[0]])
    return (f"{ir.meta.module_name(u) or u.name} uses {layer_name(proj)}'s output over all its heads at once "
            f"({what}) before the split into heads: removing heads would change what the kept heads compute")


def attention_groups(gm: fx.GraphModule) -> tuple[list[HeadGroup], dict[str, str]]:
    """Attention blocks whose heads can be removed, and why others cannot (by block name)."""
    g = ir.to_networkx(gm)
    node = nx.get_node_attributes(g, "node")
    groups, rejected = [], {}
    for s, *qkv_args in attention_cores(gm):
        where = ir.meta.module_name(s) or s.name
        qkv = [_linears_reached(g, node, a.name, up=True) if isinstance(a, fx.Node) else [] for a in qkv_args]
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
        dim = ir.meta.shape(qkv_args[0])[-1] if ir.meta.shape(qkv_args[0]) else None
        wq, wk, wv, wo = (ir.meta.tensor_attr(gm, n.args[1]) for n in (q, k, v, o))
        if not isinstance(dim, int) or wq.shape[0] % dim or wk.shape[0] % dim or wk.shape != wv.shape \
                or wo.shape[1] != wq.shape[0]:
            rejected[where] = "the projections' shapes are not whole heads"
            continue
        heads, kv = wq.shape[0] // dim, wk.shape[0] // dim
        if heads % kv:
            rejected[where] = f"{heads} q heads do not divide into {kv} kv groups"
            continue
        why = next(filter(None, (_whole_projection_use(region, p, w.shape[0], dim)
                                 for p, w in ((q, wq), (k, wk), (v, wv)))), "")
        edits, why = _head_literals(node, region, heads, kv) if not why else ([], why)
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
