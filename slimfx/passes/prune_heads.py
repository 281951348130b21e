"""Structured pruning of attention heads: whole key/value groups removed, the layers physically shrink.

An attention block is a core, ``scaled_dot_product_attention`` or its eager spelling
``softmax(q @ k^T ...) @ v`` (Gemma-2's soft-capped scores), whose q, k and v each come from one float
linear (q_proj, k_proj, v_proj), or all three from one fused linear whose output is cut along its last axis
into three contiguous parts (GPT-2's c_attn split in three, Phi-3's qkv_proj sliced into [H_q*D, H_kv*D,
H_kv*D], ModernBERT's Wqkv viewed (..., 3, heads, D) and unbound along the 3, moved first or not: timm's ViT) or
laid out per kv group (viewed into one block per group before q, k and v are cut out of each: GPT-NeoX's
(..., heads, 3 x D), BLOOM's (..., heads, 3, D), Falcon's (..., kv heads, rep + 2, D)), and whose output reaches
one float linear (o_proj); the region is every node on a path from those linears to o_proj, and nothing outside
reads it. Each projection's rows are laid out head by head, as its view into heads shows (a view (..., head_dim,
heads) then permuted, where a head's rows are strided, leaves the block whole; with as many heads as head_dim the
view's axis is followed to the attention, and a path through ops that walk does not follow gives no verdict). Heads
are removed in whole key/value groups (grouped-query attention: kv head g serves q heads g*rep .. g*rep+rep-1, as
transformers' repeat_kv lays them out with expand and reshape, and ``repeat_interleave(rep, dim)`` along the kv
heads too; a block repeating them otherwise, ``repeat``/``tile``'s cyclic layout, is left alone; rep = 1 for
multi-head attention): rows of q/k/v (and biases; in each of a fused projection's three parts, or a per-group
projection's whole block), columns of o. Shape arguments in the region that spell a head count (view / reshape /
expand literals equal to the number of q or kv heads on that axis, or a size computed as another size times one:
XGLM's batch x heads, traced with a dynamic batch) or a width over all heads (a last-axis literal of heads x
head_dim, GPT-2's views around its linears), and the fused split's sizes or slice bounds, are rewritten; a block
where that is ambiguous (a static batch x heads) is left alone. A projection's output may be used over all its
heads at once before the split into heads only elementwise, through means over its last axis and per-channel
parameters: OLMo-2's q_norm and k_norm, RMS norms over the whole projection, lose the removed heads' weight entries
and take their mean over the kept heads, as OLMo-2 built with that many heads computes; likewise after the heads
are merged (BitNet's attn_sub_norm), where an output gate computed by a linear (AFMoE's ``sigmoid(gate_proj(x))``)
loses the removed heads' rows. q_proj may hold more rows per head than head_dim when viewed per head before they
are cut apart (Qwen3-Next: each head's query, then its output gate). A block with any other such use is left alone.
A value from outside the block that differs per head along a plain axis of the q heads (MPT's ALiBi bias (heads, 1,
keys), added to the scores; T5's relative position bias, scaled_dot_product_attention's mask) is read through an
index_select of the kept heads; one laid out otherwise (BLOOM's, flattened with the batch) leaves the block whole.

``shrink_heads(..., query=True)`` (``Prune(pattern="query_heads")``) removes q heads within the kv groups instead,
as many in each, and k and v stay whole: the only head pruning left to multi-query attention (Falcon-7B's one kv
head), and a finer one under grouped-query attention (a 4-to-1 group loses one q head at a time). The q heads per
kv head change too: repeat_kv's broadcast (..., kv, rep, ...) or repeat_interleave's count, and in a projection
laid out per group (Falcon's (..., kv, rep + 2, head_dim)) each group's block and the cuts of q, k and v out of it.
Keys and values may be read outside the block then (compile_causal_lm's step returns them as the new cache), as
they stay; a value on the q side may not.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from .prune_structured import (ELEMENTWISE, _float_linear, _narrow, _swap_tensor, channel_param, last_axis_mean,
                               layer_name, linear_like, linear_problem)
from .quant_calibration import run_watching

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
    edits: list                       # (node, axis, kind): shape literals to rewrite (kinds: shrink_heads.resized)
    segments: dict = dataclasses.field(default_factory=dict)   # fused q/k/v: part -> its first row
    cuts: list = dataclasses.field(default_factory=list)       # fused q/k/v: the split / slice nodes
    group_rows: int = 0               # fused q/k/v laid out per kv group: the projection's rows per group
    params: list = dataclasses.field(default_factory=list)     # (user, get_attr, "q_proj" | "q" | "k" | "v" | "rows"):
    #                                   per-channel tensors applied to a projection's output (q_norm's weight)
    #                                   or to the merged heads (BitNet's attn_sub_norm weight)
    gates: list = dataclasses.field(default_factory=list)      # linears whose outputs gate the merged heads
    q_rows: int = 0                   # q_proj's rows per q head when not head_dim (Qwen3-Next: query and gate)
    in_group: list = dataclasses.field(default_factory=list)   # per-group view: the cuts of q, k and v in a group
    query_why: str = ""               # why q heads cannot be removed within the kv groups (pattern "query_heads")
    kv_why: str = ""                  # why whole kv groups cannot be removed (pattern "heads"): keys or values
    #                                   read outside the block (compile_causal_lm's cache), which q heads leave be
    biases: list = dataclasses.field(default_factory=list)     # (op, value, axis): per-q-head values from outside
    #                                   (MPT's ALiBi bias), of which the op reads the kept heads

    @property
    def name(self) -> str:
        """The modules' common prefix ("model.layers.0.self_attn", "encoder.layer.0.attention")."""
        paths = [layer_name(n).split(".") for n in (self.q, self.k, self.v, self.o)]
        common = itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*paths))
        return ".".join(parts[0] for parts in common) or self.o.name


def _linears_reached(g: nx.DiGraph, node: dict, start: str, up: bool) -> list[str]:
    """The linears (``linear_like``: float, fused, quantized or sparse) reached walking up (or down) the graph from
    ``start`` without passing through a linear."""
    seen, stack, found, linears = set(), [start], [], linear_like()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        n = node[v]
        if n.op == "call_function" and n.target in linears and v != start:
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
            # views between: BLOOM flattens (batch, heads) for its bmm's and views them apart around the softmax
            scores = _reached(n, _SCORE_OPS | _SHAPED, _MATMUL, up=True)
            mixes = _reached(n, ELEMENTWISE | _SHAPED, _MATMUL, up=False)
            if len(scores) == 1 and len(mixes) == 1 and mixes[0][0].args[0] is mixes[0][1]:
                qk, pv = scores[0][0], mixes[0][0]
                cores.append((n, qk.args[0], qk.args[1], pv.args[1]))
    return cores


def _size_key(d):
    """A size as a sympy expression (an int, or a symbolic size's expression), comparable across nodes; else None."""
    import sympy
    return sympy.Integer(d) if type(d) is int else getattr(getattr(d, "node", None), "expr", None)


def _reshaped_axis(src, out, p: int) -> Optional[int]:
    """The axis of a reshape's output (shape ``out``) that axis ``p`` of its input (shape ``src``) lands in, alone or
    merged with its neighbours (XGLM's (batch, heads, ...) -> (batch x heads, ...)): where the running products of
    the sizes in and out agree at both its ends; None when it is split or the sizes cannot tell."""
    import sympy
    ks, ko = [_size_key(d) for d in src], [_size_key(d) for d in out]
    if None in ks or None in ko:
        return None
    ins = list(itertools.accumulate(ks, operator.mul, initial=sympy.Integer(1)))
    outs = list(itertools.accumulate(ko, operator.mul, initial=sympy.Integer(1)))
    found = [j for j in range(len(out)) if ko[j] != 1 and outs[j] in ins[:p + 1] and outs[j + 1] in ins[p + 1:]]
    return found[0] if len(found) == 1 else None


def _head_axis_at_core(region: set, view: fx.Node, axis: int, args: set) -> set:
    """Where axis ``axis`` of ``view``'s output (negative, counted from the last) lies in the attention's q, k or v
    arguments (``args``) it reaches through moves, elementwise ops, slices or concatenations along other axes (rotary
    embeddings), unbinds along another axis (q, k and v cut apart) and reshapes that keep it whole or merge it
    with its neighbours: the set of those positions, negative; paths through other ops are not followed."""
    found, seen, todo = set(), set(), [(view, axis)]
    while todo:
        n, a = todo.pop()
        if (n, a) in seen:
            continue
        seen.add((n, a))
        if n in args:
            found.add(a)
        shape = ir.meta.shape(n) or ()
        rank = len(shape)
        for u in n.users:
            if u.name not in region or u.op != "call_function":
                continue
            if u.target in _MOVES:
                todo.append((u, _moved_axis(u, a % rank, rank) - rank))
            elif u.target in ELEMENTWISE:
                todo.append((u, a))
            elif u.target in (aten.unbind.int, aten.select.int):
                at, p = (u.args[1] if len(u.args) > 1 else 0) % rank, a % rank
                if at != p:               # the axis stays, one fewer before it when the cut one was
                    moved = (p if p < at else p - 1) - (rank - 1)
                    todo += [(g, moved) for g in u.users if g.target is operator.getitem] \
                        if u.target is aten.unbind.int else [(u, moved)]
            elif u.target in _SHAPED and u.target is not aten.expand.default and ir.meta.shape(u) is not None:
                out = ir.meta.shape(u)
                j = _reshaped_axis(shape, out, a % rank)
                if j is not None:
                    todo.append((u, j - len(out)))
            elif u.target in (aten.slice.Tensor, aten.cat.default):
                d = (u.args[1] if len(u.args) > 1 else 0) if u.target is aten.slice.Tensor else \
                    (u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0))
                if isinstance(d, int) and d % rank - rank != a:
                    todo.append((u, a))
    return found


def _head_major_why(region: set, proj: fx.Node, width: int, heads: int, args: set) -> str:
    """Why ``proj``'s rows (``width``, over ``heads`` heads) are not laid out head by head, each head's rows
    contiguous: the view that splits its output's last axis does not put the heads before the rows of each, as
    in (..., head_dim, heads) then permuted; else ''. With as many heads as rows per head the shape cannot tell
    ((..., n, n), or (..., n, 2, n / 2)): the first new axis is then followed to the attention
    (``_head_axis_at_core``), where it must be the heads axis (-3) wherever it arrives (a path the walk cannot
    follow gives no verdict)."""
    flat = [proj]
    for f in flat:
        for u in f.users:
            out = ir.meta.shape(u)
            if u.name not in region or u.target not in _SHAPED or not out:
                continue
            if out[-1] == width:
                flat.append(u)        # the heads still together (tokens flattened, say)
                continue
            new = ()                  # the shortest run of static sizes at the end whose product is the width
            for d in reversed(out):
                if type(d) is not int or math.prod(new) == width:
                    break
                new = (d, *new)
            if len(new) < 2 or math.prod(new) != width:
                continue              # not a split of the last axis
            per_head = width // heads  # (heads, per_head), or heads as (kv groups, q heads per group) and so on
            splits = {(math.prod(new[:j]), math.prod(new[j:])) for j in range(1, len(new))}
            if (heads, per_head) not in splits or heads == per_head and \
                    _head_axis_at_core(region, u, -len(new), args) - {-3}:
                return (f"{u.name} views {layer_name(proj)}'s output as {tuple(new)} per token, not {heads} heads "
                        f"of {per_head} rows each (head_dim-major, say): a head's rows are not contiguous, and "
                        "removing rows would cut across heads")
    return ""


def _whole_projection_use(region: set, proj: fx.Node, width: int, head_dim: int) -> tuple[str, list]:
    """Why heads cannot be cut out of ``proj``'s output: a use of its values over all heads together before
    they are split into heads, else ''; and the per-channel parameters (``(user, get_attr)``) applied to it
    there, which narrow with the heads. Elementwise ops with scalars, values of size 1 along the last axis
    or parameters of its width pass, as do reshapes that keep the last axis and means over it (OLMo-2's
    q_norm and k_norm, an RMSNorm over the whole projection: pruned, the norm takes its mean over the kept
    heads, as the architecture with that many heads computes)."""
    if width == head_dim or (ir.meta.shape(proj) or (width,))[-1] != width:
        return "", []                 # one head, or already split into heads (a third of ModernBERT's or timm's view)
    flat, found, params = [proj], [], []
    for f in flat:
        for u in f.users:
            if u.name not in region or u in flat:
                continue
            out = ir.meta.shape(u)
            if u.target in _SHAPED | _MOVES:
                if out and out[-1] == width:
                    flat.append(u)    # still every head along the last axis (tokens flattened, say)
                continue              # the split into heads
            if last_axis_mean(u) is f:
                continue              # (..., 1): what it feeds passes as a value of size 1
            if u.target in ELEMENTWISE:
                others = [a for a in u.all_input_nodes if a not in flat and a.name not in region
                          and (ir.meta.shape(a) or (1,))[-1] != 1]
                for a in others:
                    if channel_param(a, width):
                        params.append((u, a))
                    else:
                        found.append((u, f"{a.name} of shape {tuple(ir.meta.shape(a))}"))
                flat.append(u)
                continue
            found.append((u, str(u.target)))
    if not found:
        return "", params
    order = {n: i for i, n in enumerate(proj.graph.nodes)}
    u, what = min(found, key=lambda t: order[t[0]])
    return (f"{ir.meta.module_name(u) or u.name} uses {layer_name(proj)}'s output over all its heads at once "
            f"({what}) before the split into heads: removing heads would change what the kept heads compute"), []


def _gate_linear(gm: fx.GraphModule, a: fx.Node, width: int):
    """The float linear of output width ``width`` that ``a`` is computed from through elementwise ops alone
    (each with one input of more than one channel), read by nothing else on the way: AFMoE's
    ``sigmoid(gate_proj(x))``; else None."""
    n = a
    while len(n.users) == 1 and n.op == "call_function":
        if n.target is aten.linear.default:
            return n if (ir.meta.shape(n) or (0,))[-1] == width and _float_linear(gm, n) else None
        wide = [x for x in n.all_input_nodes if (ir.meta.shape(x) or (1,))[-1] != 1]
        if n.target not in ELEMENTWISE or len(wide) != 1:
            return None
        n = wide[0]
    return None


def _q_rows_per_head(q: fx.Node, nq: int, merged: int, dim) -> int:
    """q_proj's rows per q head when they hold more than the head's query (Qwen3-Next: query and output gate,
    2 x head_dim rows per head, viewed into (..., heads, 2 * head_dim) before both are cut out), else 0."""
    if not isinstance(dim, int) or not merged or nq <= merged or nq % merged or merged % dim or len(q.users) != 1:
        return 0
    (u,) = q.users
    out = tuple(ir.meta.shape(u) or ())
    return nq // (merged // dim) if u.target in _SHAPED and out[-2:] == (merged // dim, nq // (merged // dim)) else 0


def _whole_output_use(gm: fx.GraphModule, region: set, o: fx.Node, width: int) -> tuple[str, list, list]:
    """Why heads cannot be cut out of the attention output o reads, a use of it over all heads together after
    they are merged and before o, else ''; with the per-channel parameters applied to it there (``(user,
    get_attr)``: BitNet's attn_sub_norm weight) and the linears computing a per-channel value applied to it
    (AFMoE's output gate, ``sigmoid(gate_proj(x))``), which narrow with the heads. Walks up from o's input
    through reshapes, moves, elementwise ops with scalars or values of size 1 along the last axis, and means
    over the last axis (BitNet's RMS norm over every head: pruned, it takes its mean over the kept heads), to
    where the heads are merged."""
    todo, seen, params, gates = [o.args[0]], set(), [], []
    while todo:
        f = todo.pop()
        if f in seen or f.name not in region:
            continue
        seen.add(f)
        where = ir.meta.module_name(f) or f.name
        if f.target in _SHAPED | _MOVES:
            src = f.args[0]
            if isinstance(src, fx.Node) and (ir.meta.shape(src) or (None,))[-1] == width:
                todo.append(src)      # still every head along the last axis
            continue                  # the merge of the heads
        if last_axis_mean(f) is not None:
            todo.append(f.args[0])
            continue
        if f.target not in ELEMENTWISE:
            return (f"{where} uses the attention output over all its heads at once ({f.target}) before "
                    f"{layer_name(o)}: removing heads would change what the kept heads give it"), [], []
        for a in f.all_input_nodes:
            if a.name in region:
                todo.append(a)
            elif (ir.meta.shape(a) or (1,))[-1] == 1:
                continue
            elif channel_param(a, width):
                params.append((f, a))
            elif (lin := _gate_linear(gm, a, width)) is not None:
                gates.append(lin)
            else:
                return (f"{where} applies {a.name} of shape {tuple(ir.meta.shape(a))} to the attention output "
                        f"over all its heads before {layer_name(o)}: a per-channel value the pass does not "
                        f"narrow"), [], []
    return "", params, gates


_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def _moved_axis(n: fx.Node, axis: int, rank: int) -> Optional[int]:
    """Where a transpose or permute ``n`` (of a rank-``rank`` input) puts input axis ``axis``; None for other ops."""
    if n.target is aten.transpose.int:
        a, b = (d % rank for d in n.args[1:3])
        return b if axis == a else a if axis == b else axis
    if n.target is aten.permute.default:
        return [d % rank for d in n.args[1]].index(axis)
    return None


def _thirds(region: set, view: fx.Node, rank: int) -> list:
    """The q, k and v of a view of a fused projection's output (rank ``rank``) into (..., 3, heads, head_dim) when
    they are cut apart along that first new axis, moved or not (ModernBERT's ``qkv.view(..., 3, -1, D).unbind(-3)``,
    timm's ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``, or selected: ``qkv[0], qkv[1],
    qkv[2]``): three contiguous parts of the projection's rows, each (..., heads, head_dim); else []."""
    out = ir.meta.shape(view)
    if view.target not in _SHAPED or not out or len(out) != rank + 2 or out[rank - 1] != 3:
        return []
    u, axis = view, rank - 1
    while len(users := [w for w in u.users if w.name in region]) == 1 and users[0].target in _MOVES:
        u, axis = users[0], _moved_axis(users[0], axis, len(out))
    picks = sorted((w.args[2] % 3, w) for w in users if w.target is aten.select.int and isinstance(w.args[2], int)
                   and w.args[1] % len(out) == axis)
    if len(users) == 3 and [i for i, _ in picks] == [0, 1, 2]:     # timm's older qkv[0], qkv[1], qkv[2]
        return [w for _, w in picks]
    if len(users) != 1:
        return []
    u = users[0]
    at = (u.args[1] if len(u.args) > 1 else 0) if u.target is aten.unbind.int else None
    if not isinstance(at, int) or at % len(out) != axis:
        return []
    parts = sorted((g.args[1], g) for g in u.users if g.target is operator.getitem and isinstance(g.args[1], int))
    return [g for _, g in parts] if [i for i, _ in parts] == [0, 1, 2] and len(u.users) == 3 else []


def _fused_parts(region: set, lin: fx.Node, width: int) -> tuple[list, list, str]:
    """The contiguous parts a fused projection's output (``width`` wide) is cut into along its last axis:
    ([(start, end, node)], [split / slice nodes], '') or ([], [], why). Views that keep the last axis whole
    (GPT-2's token flattening) may come first; a view into (..., 3, heads, head_dim) unbound along the 3 gives
    three equal parts (``_thirds``); any other view into heads before the cut that ``_grouped_view`` did not take
    as one block per group is refused."""
    flat, parts, cuts = [lin], [], []
    for f in flat:
        for u in f.users:
            if u.name not in region:
                continue
            out, rank = ir.meta.shape(u), len(ir.meta.shape(f) or ())
            dim = (u.args[2] if len(u.args) > 2 else 0) if u.target in _SPLITS else \
                (u.args[1] if len(u.args) > 1 else 0) if u.target is aten.slice.Tensor else None
            if (u.target in _SHAPED or u.target is aten.unsqueeze.default) and out and out[-1] == width:
                flat.append(u)        # (GPT-BigCode's multi-query c_attn(x).unsqueeze(1) before its split)
            elif thirds := _thirds(region, u, rank):     # the parts' bounds are implicit: equal thirds, none moves
                parts += [(i * width // 3, (i + 1) * width // 3, g) for i, g in enumerate(thirds)]
            elif u.target in _SHAPED:
                heads = ", ".join(map(str, (out or ())[-2:]))
                return [], [], (f"{layer_name(lin)}'s output is viewed into heads (..., {heads}) before q, k and v "
                                f"are cut apart: q, k and v are interleaved per head in one fused projection, not "
                                f"three contiguous parts")
            elif dim is not None and rank and dim % rank == rank - 1:
                cuts.append(u)
                if u.target is aten.slice.Tensor:
                    start, end = (list(u.args[2:4]) + [None, None])[:2]
                    step = u.args[4] if len(u.args) > 4 else 1
                    if not isinstance(start, int) or not isinstance(end, (int, type(None))) or step != 1:
                        return [], [], f"{u.name} slices {layer_name(lin)}'s output with non-literal bounds"
                    end = width if end is None else min(end if end >= 0 else width + end, width)
                    parts.append((start if start >= 0 else width + start, end, u))
                    continue
                sizes = u.args[1]
                if isinstance(sizes, int):
                    sizes = [sizes] * -(-width // sizes)
                if not all(isinstance(z, int) for z in sizes):
                    return [], [], f"{u.name} splits {layer_name(lin)}'s output with non-literal sizes"
                bounds = list(itertools.accumulate([0, *sizes]))
                for g_ in u.users:
                    if g_.target is not operator.getitem or not isinstance(g_.args[1], int):
                        return [], [], f"{u.name}'s parts are not read one by one"
                    parts.append((bounds[g_.args[1]], bounds[g_.args[1] + 1], g_))
            else:
                return [], [], (f"{layer_name(lin)}'s output is used whole ({u.target}) before it is cut into q, "
                                f"k and v")
    parts.sort(key=lambda t: t[0])
    if [p[0] for p in parts[1:]] != [p[1] for p in parts[:-1]] or not parts or parts[0][0] != 0 \
            or parts[-1][1] != width:
        return [], [], f"{layer_name(lin)}'s output is not cut into contiguous parts along its last axis"
    return parts, cuts, ""


def _grouped_view(region: set, lin: fx.Node, width: int) -> tuple[int, list, list]:
    """For a fused projection whose output (``width`` wide) is viewed into per-group blocks before q, k and v are
    cut out of each (GPT-NeoX's (..., heads, 3 x head_dim), BLOOM's (..., heads, 3, head_dim), Falcon's
    (..., kv heads, q heads per kv head + 2, head_dim)): the number of groups (the first new axis of the last
    such view), the views, and the (view, axis, "groups") edits of the group counts they spell. (0, [], []) when
    the output is not viewed so. Views that keep the last axis whole (GPT-2's token flattening) may come first."""
    flat = [lin]
    for f in flat:
        flat += [u for u in f.users if u.name in region and u.target in _SHAPED
                 and (ir.meta.shape(u) or (None,))[-1] == width]
    rank = len(ir.meta.shape(lin) or ())
    views = [u for f in flat for u in f.users if u.name in region and u not in flat]
    if len(views) == 1 and _thirds(region, views[0], rank):     # q, k and v as thirds, not per group
        return 0, [], []
    chain = []
    while len(views) == 1 and views[0].target in _SHAPED and views[0].target is not aten.expand.default:
        out = ir.meta.shape(views[0])
        if not out or len(out) <= rank or not all(isinstance(d, int) for d in out[rank - 1:]) \
                or math.prod(out[rank - 1:]) != width:
            break
        chain.append(views[0])
        views = [u for u in views[0].users if u.name in region]
    if not chain:
        return 0, [], []
    edits = [(v, rank - 1, "groups") for v in chain if isinstance(v.args[1][rank - 1], int) and v.args[1][rank - 1] > 0]
    return ir.meta.shape(chain[-1])[rank - 1], chain, edits


def _per_head_inputs(node: dict, region: set, heads: int, kv: int) -> tuple[str, list]:
    """Values from outside the block that differ per head and must lose the removed heads with it: ([(op, value,
    axis)], '') where each enters an elementwise op of the block, or scaled_dot_product_attention as its mask,
    along its one q-head axis, a plain axis of the q head count (MPT's ALiBi bias, one slope per head, added to
    the scores; T5's relative position bias, the attention's mask: the pass selects the kept heads of it), or
    ('why', []) when one is laid out otherwise (BLOOM's, flattened with the batch: (batch x heads,
    1, keys)). A value entering an elementwise op of the block must otherwise be of size 1 on the op's head axes:
    a size that equals the q or kv head count, or a symbolic size that is a multiple of it (batch x heads,
    flattened). Masks and rotary tables broadcast over the heads. (Compiled with static shapes, a sequence as
    long as the head count reads as a head axis too: the block is then left whole, with this reason.)"""
    found = []
    for r in sorted(region):
        n = node[r]
        if n.op != "call_function" or n.target not in ELEMENTWISE and n.target is not _SDPA:
            continue
        out = ir.meta.shape(n) or ()
        axes = [i for i, d in enumerate(out[:-1]) if _counts_heads(d, heads, kv)]
        # scaled_dot_product_attention adds its attn_mask to the scores (B, heads, q, k): T5's relative position
        # bias enters so, one per head
        mask = (n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")) if n.target is _SDPA else None
        for a in n.all_input_nodes if n.target is not _SDPA else [mask] if isinstance(mask, fx.Node) else []:
            if a.name in region or a.op == "get_attr" and ir.meta.tensor_attr(n.graph.owning_module, a).numel() == 1:
                continue
            shape = ir.meta.shape(a)
            if shape is None:
                continue
            lead = len(out) - len(shape)
            aligned = (1,) * lead + tuple(shape)
            differ = [i for i in axes if i < len(aligned) and aligned[i] != 1]
            if not differ:
                continue
            if len(axes) == 1 and differ[0] >= lead and type(aligned[differ[0]]) is int \
                    and aligned[differ[0]] == heads == out[differ[0]]:
                found.append((n, a, differ[0] - lead))
                continue
            return (f"{a.name} of shape {tuple(shape)} from outside the attention block enters {n.name} per head "
                    f"(a per-head bias such as ALiBi's, laid out otherwise than along an axis of the {heads} q "
                    "heads): it would have to lose the removed heads too"), []
    return "", found


def _counts_heads(d, heads: int, kv: int) -> bool:
    """A size that counts heads: the q or kv head count, or a symbolic multiple of it (batch x heads)."""
    if isinstance(d, int):
        return d in (heads, kv) and d > 1
    coeff, _ = d.node.expr.as_coeff_Mul()
    return kv > 1 and int(coeff) % kv == 0 and int(coeff) > 1


def _fused_qkv(g: nx.DiGraph, region: set, lin: fx.Node, width: int, qkv_args: list) -> tuple[dict, list, str]:
    """For q, k and v (the core's arguments) all from one fused linear: {"q"|"k"|"v": (start, end, part node)},
    the cut nodes, or why not."""
    parts, cuts, why = _fused_parts(region, lin, width)
    if why:
        return {}, [], why
    found = {}
    for name, a in zip("qkv", qkv_args):
        up = nx.ancestors(g, a.name) | {a.name}
        mine = [p for p in parts if p[2].name in up]
        if len(mine) != 1:
            return {}, [], f"{name} does not come from exactly one part of {layer_name(lin)}'s output"
        found[name] = mine[0]
    if len({p[0] for p in found.values()}) != 3 or len(parts) != 3:
        return {}, [], f"{layer_name(lin)}'s output is not cut into three parts, one each for q, k and v"
    return found, cuts, ""


def attention_groups(gm: fx.GraphModule) -> tuple[list[HeadGroup], dict[str, str]]:
    """Attention blocks whose heads can be removed, and why others cannot (by block name)."""
    g = ir.to_networkx(gm)
    node = nx.get_node_attributes(g, "node")
    linears = linear_like()
    groups, rejected = [], {}
    for s, *qkv_args in attention_cores(gm):
        where = ir.meta.module_name(s) or s.name
        qkv = [_linears_reached(g, node, a.name, up=True) if isinstance(a, fx.Node) else [] for a in qkv_args]
        fused = all(len(ls) == 1 for ls in qkv) and len({ls[0] for ls in qkv}) == 1
        outs = _linears_reached(g, node, s.name, up=False)
        # a layer quantized, fused or lowered: the reason neuron pruning gives (prune before those passes)
        why = next(filter(None, (linear_problem(gm, node[ls[0]]) for ls in [*qkv, outs] if len(ls) == 1)), "")
        if why:
            rejected[where] = why
            continue
        if any(len(ls) != 1 for ls in qkv) or len({ls[0] for ls in qkv}) != 3 and not fused:
            rejected[where] = "q, k and v do not each come from one linear layer of their own"
            continue
        q, k, v = (node[ls[0]] for ls in qkv)
        if len(outs) != 1:
            rejected[where] = "the attention output does not reach exactly one linear layer first"
            continue
        o = node[outs[0]]
        region = (nx.descendants(g, q.name) | nx.descendants(g, k.name) | nx.descendants(g, v.name)) \
            & nx.ancestors(g, o.name)
        leaks = {r: sorted(u for u in g.successors(r) if u not in region and u != o.name)
                 for r in region | {q.name, k.name, v.name}}
        leaks = {r: us for r, us in leaks.items() if us}
        readers = sorted(set().union(*leaks.values()))
        kv_why = f"head-shaped values are read outside the block ({readers[:3]})" if leaks else ""
        returned = any(node[u].op == "output" for u in readers)
        if returned:                      # compile_causal_lm's step graph: its keys and values are the new cache
            kv_why += (": the graph returns them as outputs (compile_causal_lm's step graph returns the keys and "
                       "values as the new KV cache), so its kv heads cannot be removed here")
        inner = [node[r] for r in sorted(region) if node[r].op == "call_function" and node[r].target in linears]
        if inner:                         # Doge's dt_proj: a linear over the values of every head
            rejected[where] = (f"{layer_name(inner[0])} is a linear layer inside the attention block: it reads "
                               "head-shaped values across the heads")
            continue
        dim = ir.meta.shape(qkv_args[0])[-1] if ir.meta.shape(qkv_args[0]) else None
        wo = ir.meta.tensor_attr(gm, o.args[1])
        segments, cuts, groups_in_view, views, view_edits = {}, [], 0, [], []
        if fused:
            width = ir.meta.tensor_attr(gm, q.args[1]).shape[0]
            groups_in_view, views, view_edits = _grouped_view(region, q, width)
        if groups_in_view:                # per kv group: its q heads' rows, then its k and v rows, in one block
            nq = wo.shape[1]
            nk = nv = (width - nq) // 2
            projs = [(q, width)]
        elif fused:
            segments, cuts, why = _fused_qkv(g, region, q, width, qkv_args)
            if why:
                rejected[where] = why
                continue
            nq, nk, nv = (segments[p][1] - segments[p][0] for p in "qkv")
            projs = [(segments[p][2], w) for p, w in zip("qkv", (nq, nk, nv))]
        else:
            nq, nk, nv = (ir.meta.tensor_attr(gm, n.args[1]).shape[0] for n in (q, k, v))
            projs = [(q, nq), (k, nk), (v, nv)]
        q_rows = _q_rows_per_head(q, nq, wo.shape[1], dim) if not fused else 0
        if q_rows:                        # Qwen3-Next: each q head's rows hold its query and its output gate
            nq = wo.shape[1]
        if not isinstance(dim, int) or nq % dim or nk % dim or nk != nv or wo.shape[1] != nq:
            rejected[where] = "the projections' shapes are not whole heads"
            continue
        heads, kv = nq // dim, nk // dim
        if heads % kv:
            rejected[where] = f"{heads} q heads do not divide into {kv} kv groups"
            continue
        if groups_in_view and groups_in_view != kv and kv > 1:
            rejected[where] = (f"{layer_name(q)}'s output is viewed into {groups_in_view} blocks before q, k and v "
                               f"are cut apart, not one per kv group ({kv}): its rows are not laid out per group")
            continue
        # q, k and v as thirds of a (..., 3, heads, head_dim) view (ModernBERT): its 3 is no head count, its heads
        # axis is one where spelled
        thirds = [node[r] for r in sorted(region) if fused and node[r].op == "call_function"
                  and isinstance(node[r].args[0], fx.Node) and ir.meta.shape(node[r].args[0])
                  and _thirds(region, node[r], len(ir.meta.shape(node[r].args[0])))]
        odd = [v for v in thirds if ir.meta.shape(v)[-1] != dim]
        if odd:
            rejected[where] = (f"{odd[0].name} views {layer_name(q)}'s output as {tuple(ir.meta.shape(odd[0]))}: q, "
                               f"k and v as thirds whose last axis is not the head dim ({dim})")
            continue
        layout_why = next(filter(None, (_head_major_why(region, p, w, h, set(qkv_args))
                                         for (p, w), h in zip(projs, (heads, kv, kv)) if w != dim)), "") \
            if not groups_in_view and not thirds else ""
        # thirds viewed (..., 3, n, n): their heads axis (-2) must reach the attention as its heads axis
        bad = [t for t in thirds if heads == dim and _head_axis_at_core(region, t, -2, set(qkv_args)) - {-3}]
        if bad:
            layout_why = (f"{bad[0].name} views {layer_name(q)}'s output as {tuple(ir.meta.shape(bad[0]))}, whose "
                          f"axis of {heads} heads does not reach the attention as its heads axis: head_dim-major "
                          "thirds, whose heads' rows are not contiguous")
        if layout_why:
            rejected[where] = layout_why
            continue
        uses = [_whole_projection_use(region, p, w, dim) for p, w in projs]
        out_why, out_params, gates = _whole_output_use(gm, region, o, nq) if nq != dim else ("", [], [])
        why = next(filter(None, (u[0] for u in uses)), "") or out_why
        kinds = ["rows"] if groups_in_view else ["q_proj", "k", "v"]
        params = [(user, param, kind) for (_, ps), kind in zip(uses, kinds) for user, param in ps] + \
            [(user, param, "q") for user, param in out_params]
        widths = {nq, nk, *([nq + 2 * nk] if fused else []), *([projs[0][1]] if q_rows else [])} - {dim}
        #                                 (head_dim is never a width to scale; nor q_rows, in the q view only)
        if not why:                   # the views into groups spell group counts: view_edits has them
            q_view = next(iter(q.users)) if q_rows else None      # (its last literal: 2 x head_dim, no width)
            edits, why = _head_literals(node, region - {v.name for v in views + thirds}
                                        - {getattr(q_view, "name", None)}, heads, kv, widths)
            edits += [(v, len(v.args[1]) - 2, "q") for v in thirds
                      if type(v.args[1][-2]) is int and v.args[1][-2] > 0]
            if q_view is not None and q_view.args[1][-2] == heads:    # the head count spelled there
                edits.append((q_view, len(q_view.args[1]) - 2, "q"))
        bias_why, biases = _per_head_inputs(node, region, heads, kv) if not why else ("", [])
        rep_edits, rep_why = _repeat_edits(node, region, heads, kv) if not why else ([], "")
        product_edits, product_why = _computed_head_sizes(node, region, heads, kv) if not why else ([], "")
        why = why or bias_why or rep_why or product_why
        if why:
            rejected[where] = why
            continue
        edits += view_edits + _rep_literals(node, region, heads, kv) + rep_edits + product_edits
        in_group, query_why = [], ""
        if heads == kv:
            query_why = "one q head per kv head (multi-head attention): whole heads go with pattern='heads'"
        elif groups_in_view:
            in_edits, in_group, query_why = _in_group_cuts(region, views[-1], heads // kv, dim)
            edits += [e for e in in_edits if e[:2] not in {x[:2] for x in edits}]
        elif any(c.target is aten.split.Tensor and isinstance(c.args[1], int) for c in cuts):
            query_why = f"{layer_name(q)}'s output is split into equal parts: with fewer q heads they differ"
        query_why = query_why or _rep_unexplained(node, region, heads // kv, edits) or \
            _query_side_leaks(g, s, qkv_args[0], edits, leaks)
        if kv_why and query_why:
            rejected[where] = kv_why
            continue
        if returned:
            kv_why += "; pattern='query_heads' removes q heads and keeps k and v"
        groups.append(HeadGroup(q, k, v, o, heads, kv, dim, edits, {p: seg[0] for p, seg in segments.items()}, cuts,
                                width // kv if groups_in_view else 0, params, gates, q_rows, in_group, query_why,
                                kv_why, biases))
    return groups, rejected


def _query_side_leaks(g: nx.DiGraph, core: fx.Node, q_in: fx.Node, edits: list, leaks: dict) -> str:
    """Why q heads cannot go when values of the block are read outside it: a value on the q side (q's path to the
    core, the core and after) or shaped by the q heads per kv head (repeat_kv's repeated keys); else ''. Keys and
    values themselves may be read outside (compile_causal_lm's step returns them as the new cache): they stay."""
    q_side = nx.ancestors(g, q_in.name) | {q_in.name} | nx.descendants(g, core.name) | {core.name}
    for n, _, kind in edits:
        if kind in ("q", "rep"):
            q_side |= nx.descendants(g, n.name) | {n.name}
    bad = sorted({u for r, us in leaks.items() if r in q_side for u in us})
    return f"head-shaped values are read outside the block ({bad[:3]})" if bad else ""


def _rep_literals(node: dict, region: set, heads: int, kv: int) -> list:
    """The (expand, axis, "rep") of repeat_kv's broadcast (..., kv, 1, ...) -> (..., kv, rep, ...): the q heads per
    kv head, which removing q heads within the groups changes."""
    rep, edits = heads // kv, []
    for r in region:
        n = node[r]
        if rep == 1 or n.op != "call_function" or n.target is not aten.expand.default:
            continue
        out, src = ir.meta.shape(n), ir.meta.shape(n.args[0])
        if out is None or src is None or len(src) != len(out):
            continue
        edits += [(n, a, "rep") for a, lit in enumerate(n.args[1]) if 0 < a < len(out) - 1 and type(lit) is int
                  and lit == rep and out[a] == rep and src[a] == 1 and out[a - 1] == kv]
    return edits


_REPEAT_INTERLEAVE = aten.repeat_interleave.self_int
_REPEATS = {_REPEAT_INTERLEAVE, aten.repeat_interleave.Tensor, aten.repeat.default, aten.tile.default}


def _repeat_edits(node: dict, region: set, heads: int, kv: int) -> tuple[list, str]:
    """The edits of the block's other spellings of repeat_kv: ``repeat_interleave(x, rep, dim, output_size=..)``
    along the kv heads, the same layout as repeat_kv's (kv head g serves q heads g*rep .. g*rep+rep-1): (node, 1,
    "rep") for its count and (node, "output_size", "q"); with one kv head, ``x.repeat(.., heads, ..)`` along it:
    (node, axis, "q"). ([], why) when the block repeats otherwise: ``repeat``/``tile`` over several kv heads lay
    them out cyclically (q head h reads kv head h % kv), which neither pattern keeps; counts as a tensor."""
    rep, edits = heads // kv, []
    for r in sorted(region):
        n = node[r]
        if n.op != "call_function" or n.target not in _REPEATS:
            continue
        out, src = ir.meta.shape(n), ir.meta.shape(n.args[0])
        ok = out is not None and src is not None and len(src) == len(out)
        if ok and n.target is _REPEAT_INTERLEAVE:
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
            size = n.kwargs.get("output_size")
            if isinstance(dim, int) and type(n.args[1]) is int and n.args[1] == rep and src[dim] == kv \
                    and out[dim] == heads and (size is None or type(size) is int and size == heads):
                edits += [(n, 1, "rep")] + ([(n, "output_size", "q")] if size is not None else [])
                continue
        elif ok and n.target is aten.repeat.default and kv == 1 and len(n.args[1]) == len(out):
            axes = [a for a, lit in enumerate(n.args[1]) if lit != 1]
            if len(axes) == 1 and n.args[1][axes[0]] == heads and src[axes[0]] == 1 and out[axes[0]] == heads:
                edits.append((n, axes[0], "q"))
                continue
        return [], (f"{n.name} ({n.target}) repeats keys or values otherwise than repeat_kv (kv head g serving q "
                    f"heads g*{rep} .. g*{rep}+{rep - 1}, by expand or repeat_interleave with a literal count "
                    f"along the {kv} kv heads): the pass cannot tell which q heads each kv head serves")
    return edits, ""


def _rep_unexplained(node: dict, region: set, rep: int, edits: list) -> str:
    """Why q heads cannot be removed within the groups: a shape literal equal to the q heads per kv head that is
    not one the pass rewrites (a grouped einsum's (..., kv, rep, ...) view, say); else ''."""
    known = {(n.name, a) for n, a, _ in edits}
    for r in sorted(region):
        n = node[r]
        if n.op != "call_function" or n.target not in _SHAPED:
            continue
        out = ir.meta.shape(n) or ()
        for a, lit in enumerate(n.args[1][:-1]):
            if type(lit) is int and lit == rep and a < len(out) and out[a] == rep and (n.name, a) not in known:
                return (f"{n.name} has an axis of {rep} (as many as the q heads per kv head) that the pass does not "
                        "know how to rewrite")
    return ""


_IN_GROUP_CUTS = {aten.split_with_sizes.default, aten.slice.Tensor, aten.select.int, aten.index.Tensor}
_SAME_VALUES = {aten.clone.default, aten.detach.default, aten.alias.default, aten.lift_fresh_copy.default}


def _whole_slice(n: fx.Node) -> bool:
    """A slice that keeps its whole axis (``x[:, :, :, :-2]``'s leading ``:``s, 0 to 2^63 - 1 in the graph)."""
    start, end, step = (list(n.args[2:5]) + [None, None, None])[:3]
    return n.target is aten.slice.Tensor and start in (0, None) and step in (1, None) and \
        (end is None or type(end) is int and end >= 2 ** 62)


def _index_constant(n: fx.Node, axis: int) -> Optional[torch.Tensor]:
    """The integer constant ``x[..., [-2]]`` indexes axis ``axis`` with (aten.index over that axis alone, the
    list a tensor of the module, copied or not), else None."""
    idx = n.args[1] if len(n.args) > 1 else None
    if not isinstance(idx, (list, tuple)) or len(idx) != axis + 1 or any(i is not None for i in idx[:-1]) \
            or not isinstance(idx[-1], fx.Node):
        return None
    a = idx[-1]
    while a.op == "call_function" and a.target in _SAME_VALUES and isinstance(a.args[0], fx.Node):
        a = a.args[0]
    if a.op != "get_attr":
        return None
    t = ir.meta.tensor_attr(n.graph.owning_module, a)
    return t if t.dim() == 1 and not t.is_floating_point() and t.dtype is not torch.bool else None


def _within_q_heads(b, rep: int, bound: bool) -> bool:
    """Whether position ``b`` along a group's rep q heads, key and value falls among the q heads: a slice's bound
    (``bound``) strictly inside them, a select's or index's entry at one."""
    if not isinstance(b, int):
        return False
    return 0 < b < rep or -rep - 2 < b < -2 if bound else 0 <= b < rep or -rep - 2 <= b < -2


def _in_group_cuts(region: set, view: fx.Node, rep: int, dim: int) -> tuple[list, list, str]:
    """For q heads removed within the kv groups of a fused projection viewed per group (Falcon's (..., kv heads,
    rep + 2, head_dim); with one kv head (..., heads + 2, head_dim)): the edit of the in-group count where the
    view spells it, and the cuts of q, k and v along that axis (splits [rep, 1, 1]; slices and selects whose
    positive bounds are 0 or past the q heads; an index by a constant list past the q heads, transformers <
    5.25's ``qkv[..., [-2], :]``), through slices that keep their axis whole: (edits, cuts, '') or
    ([], [], why)."""
    out = ir.meta.shape(view)
    if not out or len(out) < 2 or out[-1] != dim or out[-2] != rep + 2:
        return [], [], (f"{view.name} does not view each kv group as its {rep} q heads, its key and its value "
                        f"(..., {rep + 2}, {dim})")
    axis = len(out) - 2
    lit = view.args[1][axis]
    edits = [(view, axis, "in_group")] if type(lit) is int and lit > 0 else []
    cuts, users = [], [u for u in view.users if u.name in region]
    for u in users:
        if _whole_slice(u):
            users += [w for w in u.users if w.name in region]
            continue
        at = (u.args[2] if len(u.args) > 2 else 0) if u.target is aten.split_with_sizes.default else \
            axis if u.target is aten.index.Tensor else (u.args[1] if len(u.args) > 1 else 0)
        picked = _index_constant(u, axis) if u.target is aten.index.Tensor else None
        bounds = list(u.args[2:4]) if u.target is aten.slice.Tensor else [u.args[2]] if u.target is aten.select.int \
            else picked.tolist() if picked is not None else []
        if u.target not in _IN_GROUP_CUTS or not isinstance(at, int) or at % len(out) != axis or \
                u.target is aten.index.Tensor and picked is None:
            return [], [], f"{u.name} ({u.target}) reads {view.name}'s groups other than by cutting q, k and v apart"
        if u.target is aten.split_with_sizes.default and list(u.args[1]) != [rep, 1, 1] or \
                u.target is aten.slice.Tensor and (len(u.args) > 4 and u.args[4] != 1) or \
                any(not isinstance(b, (int, type(None))) or _within_q_heads(b, rep, u.target is aten.slice.Tensor)
                    for b in bounds):
            return [], [], f"{u.name} cuts {view.name}'s groups elsewhere than between the q heads and the key"
        cuts.append(u)
    return edits, cuts, ""


def _head_literals(node: dict, region: set, heads: int, kv: int, widths: set) -> tuple[list, str]:
    """The (node, axis, kind) of every int literal in the region's shape arguments that spells a head count,
    read off each node's output shape (expand's broadcast axes, input size 1, are not head axes), or, on the
    last axis, a width over all heads (``widths``: q's, k's and v's, the fused projection's; not head_dim)."""
    edits = []
    for r in region:
        n = node[r]
        if n.op != "call_function" or n.target not in _SHAPED:
            continue
        out = ir.meta.shape(n)
        src = ir.meta.shape(n.args[0]) if n.target is aten.expand.default else None
        found, last = [], len(n.args[1]) - 1
        if out is not None and last >= 0 and n.args[1][last] in widths and out[last] == n.args[1][last]:
            edits.append((n, last, "width"))
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
            lits = sorted({n.args[1][a] for _, a, _ in found})
            return [], (f"node {n.name} has several axes that may count heads ({[a for _, a, _ in found]}); if one "
                        f"is the batch, compile with dynamic=True or an example batch other than "
                        f"{lits[0] if len(lits) == 1 else f'any of {lits}'}")
        edits += found
    return edits, ""


def _computed_head_sizes(node: dict, region: set, heads: int, kv: int) -> tuple[list, str]:
    """The (node, axis, "q" | "kv") of every size in the region's shape arguments computed as another size times a
    head count (XGLM's reshape(x, [batch * heads, -1, head_dim]) for its bmm's, traced with a dynamic batch), which
    shrink_heads computes anew with the kept count; ([], why) for such a product of another form."""
    edits = []
    for r in sorted(region):
        n = node[r]
        if n.op != "call_function" or n.target not in _SHAPED or max(heads, kv) == 1:
            continue
        for a, c in enumerate(n.args[1]):
            factors = _factors(c)
            if not isinstance(c, fx.Node) or not any(type(v) is int and v > 1 and v in (heads, kv) for v in factors):
                continue
            lits = [v for v in c.args if type(v) is int]
            src, out = ir.meta.shape(n.args[0]) or (), ir.meta.shape(n) or ()
            # the product must be where the view folds an axis of that many heads (not a size that merely equals it)
            folded = len(lits) == 1 and out and any(type(d) is int and d == lits[0] and _reshaped_axis(src, out, p) == a
                                                   for p, d in enumerate(src))
            if not folded or sum(type(v) is int and v > 1 and v in (heads, kv) for v in factors) != 1:
                expr = " * ".join(v.name if isinstance(v, fx.Node) else str(v) for v in factors)
                return [], (f"{n.name} sizes an axis by {c.name} = {expr}, a count of heads folded into another size "
                            "in a form the pass does not rewrite (it rewrites another size times the count, where "
                            "the view folds an axis of that many heads)")
            edits.append((n, a, "q" if lits[0] == heads else "kv"))
        if n.target is not aten.expand.default and (why := _folded_heads(n, heads, kv)):
            return [], why
    return edits, ""


def _factors(c) -> list:
    """The factors of a size: a product of sizes (operator.mul nodes) taken apart, others as they are."""
    if isinstance(c, fx.Node) and c.op == "call_function" and c.target is operator.mul and not c.kwargs:
        return [f for x in c.args for f in _factors(x)]
    return [c]


def _folded_heads(n: fx.Node, heads: int, kv: int) -> str:
    """Why a view or reshape with static sizes cannot follow the removed heads: it folds an axis of the heads into
    an axis of another literal size, not the last one (a width) (XGLM's reshape(x, [batch * heads, -1, head_dim])
    traced with a static batch: 8 for a batch of 2); else ''. Where each axis lands is ``_reshaped_axis``'s."""
    src, out = ir.meta.shape(n.args[0]), ir.meta.shape(n)
    if not src or not out or not all(type(d) is int for d in (*src, *out)):
        return ""
    for a, d in enumerate(src[:-1]):
        j = _reshaped_axis(src, out, a) if d > 1 and d in (heads, kv) else None
        if j is not None and j != len(out) - 1 and out[j] not in (heads, kv):
            return (f"{n.name} folds the axis of {d} heads into one of {out[j]} (batch x heads, say), spelled "
                    "as a literal: the pass cannot tell the head count in it; compile with dynamic=True, where that "
                    "size is a product the pass computes anew")
    return ""


def head_importance(gm: fx.GraphModule, groups: list[HeadGroup], calls) -> dict[fx.Node, torch.Tensor]:
    """For each block's o_proj: per q head h, E_t ||W_o[:, h] y_t,h|| (float64), the mean size of what the head
    adds to the block's output over the tokens of ``calls``. On SmolLM2-135M, removing 1 of 3 kv groups so
    scored took perplexity to 55.6, and 1 of 3 q heads per group to 128; by per-column sizes E|y_j| ||W_o[:, j]||
    summed over the head's columns (what neurons are scored by), 59.2 and 172: the columns of a head add up
    partly against each other."""
    acc, weights = {}, {}
    for grp in groups:
        w = ir.meta.tensor_attr(gm, grp.o.args[1]).detach().double()
        weights[grp.o] = w.view(w.shape[0], grp.heads, grp.head_dim).permute(1, 2, 0)       # (heads, D, out)

    def add(o):
        def cb(y):
            y = y.detach().reshape(-1, y.shape[-1]).double().to(weights[o].device)
            heads = y.view(y.shape[0], weights[o].shape[0], -1).transpose(0, 1)         # (heads, tokens, D)
            size, n = acc.get(o, (0.0, 0))
            acc[o] = (size + torch.bmm(heads, weights[o]).norm(dim=2).sum(1).cpu(), n + y.shape[0])
        return cb
    run_watching(gm, calls, {grp.o.args[0]: add(grp.o) for grp in groups})
    return {o: size / max(n, 1) for o, (size, n) in acc.items()}


def head_scores(importance: torch.Tensor, grp: HeadGroup, query: bool = False) -> torch.Tensor:
    """Per kv group: its q heads' scores (``head_importance``) summed; with ``query``, (kv groups, q heads per
    group): each q head's own."""
    return importance.view(grp.kv_heads, -1) if query else importance.view(grp.kv_heads, -1).sum(1)


def shrink_heads(gm: fx.GraphModule, grp: HeadGroup, keep: torch.Tensor, query: bool = False) -> None:
    """Keep kv groups ``keep`` (sorted) and their q heads; or, with ``query``, every kv group and in group g its
    q heads ``keep[g]`` (sorted, as many in each). Narrower q/k/v rows (and biases), o columns, and the head
    counts in the region's shape literals."""
    rep, d = grp.heads // grp.kv_heads, grp.head_dim
    kv_keep = torch.arange(grp.kv_heads) if query else keep
    in_group = keep if query else torch.arange(rep).expand(len(keep), rep)      # (kept groups, q heads kept in each)
    kv_idx = (kv_keep[:, None] * d + torch.arange(d)).reshape(-1)
    q_heads = (kv_keep[:, None] * rep + in_group).reshape(-1)
    q_idx = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
    qr = grp.q_rows or d                                      # q_proj's rows per head
    q_proj_idx = (q_heads[:, None] * qr + torch.arange(qr)).reshape(-1)
    kv2, rep2 = len(kv_keep), in_group.shape[1]
    rows = None
    if grp.group_rows:                # one fused projection laid out per kv group: in each kept group's block, its
        #                               kept q heads' rows, then its key's and value's
        mine = torch.cat([(in_group[:, :, None] * d + torch.arange(d)).reshape(kv2, -1),
                          torch.arange(rep * d, grp.group_rows).expand(kv2, -1)], 1)
        rows = (kv_keep[:, None] * grp.group_rows + mine).reshape(-1)
        _narrow(gm, grp.q, rows=rows, suffix="heads")
    elif grp.segments:                # one fused projection: the kept rows of each part, in the parts' order
        idx = {"q": q_idx, "k": kv_idx, "v": kv_idx}
        rows = torch.cat([grp.segments[p] + idx[p] for p in sorted(grp.segments, key=grp.segments.get)])
        _narrow(gm, grp.q, rows=rows, suffix="heads")
    else:
        for lin, idx in ((grp.q, q_proj_idx), (grp.k, kv_idx), (grp.v, kv_idx)):
            _narrow(gm, lin, rows=idx, suffix="heads")
    _narrow(gm, grp.o, cols=q_idx, suffix="heads")
    for lin in grp.gates:             # AFMoE's gate_proj: one output per q channel
        _narrow(gm, lin, rows=q_idx, suffix="heads")
    for user, param, kind in grp.params:
        idx = {"q_proj": q_proj_idx, "q": q_idx, "k": kv_idx, "v": kv_idx, "rows": rows}[kind]
        with torch.no_grad():
            _swap_tensor(gm, user, user.args.index(param), ir.meta.tensor_attr(gm, param).detach()[idx], "heads")

    if grp.biases:                    # per-head values from outside: the op reads the kept heads' entries of each
        name = ir.meta.add_tensor_attr(gm, f"{layer_name(grp.o)}_kept_heads", q_heads.clone())
        for user, value, axis in grp.biases:
            with gm.graph.inserting_before(user):
                kept = gm.graph.call_function(aten.index_select.default, (value, axis, gm.graph.get_attr(name)))
            user.replace_input_with(value, kept)

    nq, nk, heads2 = grp.heads * d, grp.kv_heads * d, len(q_heads)
    widths = {nq: heads2 * d, nk: kv2 * d, nq + 2 * nk: (heads2 + 2 * kv2) * d}
    if grp.q_rows:
        widths[grp.heads * qr] = heads2 * qr

    counts = {"q": heads2, "kv": kv2, "rep": rep2, "in_group": rep2 + 2}

    def resized(size, kind):
        if kind in counts:
            return counts[kind]
        if kind == "width":           # over all heads: q's, k's, v's, the fused projection's, q_proj's view
            return widths[size]
        # a view's group count ("groups"): kv groups, or every group's q, k and v heads, or GPT-NeoX's heads
        return kv2 if size == grp.kv_heads else kv2 * (rep2 + 2) if size == grp.kv_heads * (rep + 2) \
            else size * kv2 // grp.kv_heads

    for n, a, kind in grp.edits:
        if n.target is _REPEAT_INTERLEAVE:        # repeat_kv as repeat_interleave: its count, its output_size
            if a == "output_size":
                n.kwargs = {**n.kwargs, "output_size": resized(n.kwargs["output_size"], kind)}
            else:
                n.args = (n.args[0], resized(n.args[1], kind), *n.args[2:])
            continue
        shape = list(n.args[1])
        if isinstance(shape[a], fx.Node):     # another size times the head count (XGLM's batch x heads): its
            #                                   product with the kept count, a node of this view's own (the traced
            #                                   product may be shared by the blocks)
            size = next(x for x in shape[a].args if isinstance(x, fx.Node))
            with gm.graph.inserting_before(n):
                shape[a] = gm.graph.call_function(operator.mul, (size, counts[kind]))
        else:
            shape[a] = resized(shape[a], kind)
        n.args = (n.args[0], shape, *n.args[2:])

    def moved(b):                     # a bound along the fused projection's rows: the kept rows before it
        if not isinstance(b, int) or abs(b) >= 2 ** 62:
            return b
        before = int((rows < (b if b >= 0 else rows_in + b)).sum())
        return before if b >= 0 else before - len(rows)
    rows_in = nq + 2 * nk
    for n in grp.cuts:
        if n.target is aten.slice.Tensor:
            n.args = (*n.args[:2], *(moved(b) for b in n.args[2:4]), *n.args[4:])
        elif isinstance(n.args[1], (list, tuple)):
            ends = [moved(b) for b in itertools.accumulate(n.args[1])]
            n.args = (n.args[0], [e - s for s, e in zip([0, *ends], ends)], *n.args[2:])
        else:                         # equal parts (multi-head attention, whole heads only): they stay equal
            n.args = (n.args[0], moved(n.args[1]), *n.args[2:])

    def in_group_moved(b):            # a bound along a group's heads: past its q heads, it moves with them
        return b if not isinstance(b, int) or b < rep or abs(b) >= 2 ** 62 else b - rep + rep2
    for n in grp.in_group:
        if n.target is aten.split_with_sizes.default:
            n.args = (n.args[0], [rep2, 1, 1], *n.args[2:])
        elif n.target is aten.slice.Tensor:
            n.args = (*n.args[:2], *(in_group_moved(b) for b in n.args[2:4]), *n.args[4:])
        elif n.target is aten.select.int:
            n.args = (*n.args[:2], in_group_moved(n.args[2]), *n.args[3:])
        else:                         # an index by a constant list: the same entries of the narrower groups
            picked = _index_constant(n, len(n.args[1]) - 1)
            moved_ = torch.where(picked >= rep, picked - rep + rep2, picked)   # (in_group_moved, entrywise)
            if not torch.equal(moved_, picked):
                name = ir.meta.add_tensor_attr(gm, f"{layer_name(grp.o)}_in_group_index", moved_)
                with gm.graph.inserting_before(n):
                    n.args = (n.args[0], [*n.args[1][:-1], gm.graph.get_attr(name)], *n.args[2:])
