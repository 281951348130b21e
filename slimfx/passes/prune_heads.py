"""Structured pruning of attention heads: whole key/value groups removed, the layers physically shrink.

An attention block is a core, ``scaled_dot_product_attention`` or its eager spelling
``softmax(q @ k^T ...) @ v`` (Gemma-2's soft-capped scores), whose q, k and v each come from one float
linear (q_proj, k_proj, v_proj), or all three from one fused linear whose output is cut along its last axis
into three contiguous parts (GPT-2's c_attn split in three, Phi-3's qkv_proj sliced into [H_q*D, H_kv*D,
H_kv*D]) or laid out per kv group (viewed into one block per group before q, k and v are cut out of each:
GPT-NeoX's (..., heads, 3 x D), BLOOM's (..., heads, 3, D), Falcon's (..., kv heads, rep + 2, D)), and whose
output reaches one float linear (o_proj); the region is every node on a path from those linears to o_proj,
and nothing outside reads it. Heads are removed in whole
key/value groups (grouped-query attention: kv head g serves q heads g*rep .. g*rep+rep-1, as transformers'
repeat_kv lays them out; rep = 1 for multi-head attention): rows of q/k/v (and biases; in each of a fused
projection's three parts, or a per-group projection's whole block), columns of o. Shape arguments in the
region that spell a head count (view / reshape / expand literals equal to the number of q or kv heads on
that axis) or a width over all heads (a last-axis literal of heads x head_dim, GPT-2's views around its
linears), and the fused split's sizes or slice bounds, are rewritten; a block where that is ambiguous is
left alone. A projection's output may be used over all its heads at once before the split into heads only
elementwise, through means over its last axis and per-channel parameters: OLMo-2's q_norm and k_norm, RMS
norms over the whole projection, lose the removed heads' weight entries and take their mean over the kept
heads, as OLMo-2 built with that many heads computes; likewise after the heads are merged (BitNet's
attn_sub_norm), where an output gate computed by a linear (AFMoE's ``sigmoid(gate_proj(x))``) loses the
removed heads' rows. q_proj may hold more rows per head than head_dim when viewed per head before they are
cut apart (Qwen3-Next: each head's query, then its output gate). A block with any other such use is left
alone, and so is one where a value from outside the block differs per head (BLOOM's ALiBi slopes, added to
the scores).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from .prune_structured import (ELEMENTWISE, _float_linear, _narrow, _swap_tensor, channel_param, last_axis_mean,
                               layer_name, linear_like)

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
    edits: list                       # (node, axis, "q" | "kv" | "width"): shape literals to rewrite
    segments: dict = dataclasses.field(default_factory=dict)   # fused q/k/v: part -> its first row
    cuts: list = dataclasses.field(default_factory=list)       # fused q/k/v: the split / slice nodes
    group_rows: int = 0               # fused q/k/v laid out per kv group: the projection's rows per group
    params: list = dataclasses.field(default_factory=list)     # (user, get_attr, "q_proj" | "q" | "k" | "v" | "rows"):
    #                                   per-channel tensors applied to a projection's output (q_norm's weight)
    #                                   or to the merged heads (BitNet's attn_sub_norm weight)
    gates: list = dataclasses.field(default_factory=list)      # linears whose outputs gate the merged heads
    q_rows: int = 0                   # q_proj's rows per q head when not head_dim (Qwen3-Next: query and gate)

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
            # views between: BLOOM flattens (batch, heads) for its bmm's and views them apart around the softmax
            scores = _reached(n, _SCORE_OPS | _SHAPED, _MATMUL, up=True)
            mixes = _reached(n, ELEMENTWISE | _SHAPED, _MATMUL, up=False)
            if len(scores) == 1 and len(mixes) == 1 and mixes[0][0].args[0] is mixes[0][1]:
                qk, pv = scores[0][0], mixes[0][0]
                cores.append((n, qk.args[0], qk.args[1], pv.args[1]))
    return cores


def _whole_projection_use(region: set, proj: fx.Node, width: int, head_dim: int) -> tuple[str, list]:
    """Why heads cannot be cut out of ``proj``'s output: a use of its values over all heads together before
    they are split into heads, else ''; and the per-channel parameters (``(user, get_attr)``) applied to it
    there, which narrow with the heads. Elementwise ops with scalars, values of size 1 along the last axis
    or parameters of its width pass, as do reshapes that keep the last axis and means over it (OLMo-2's
    q_norm and k_norm, an RMSNorm over the whole projection: pruned, the norm takes its mean over the kept
    heads, as the architecture with that many heads computes)."""
    if width == head_dim:
        return "", []                 # one head: nothing to keep apart
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


def _fused_parts(region: set, lin: fx.Node, width: int) -> tuple[list, list, str]:
    """The contiguous parts a fused projection's output (``width`` wide) is cut into along its last axis:
    ([(start, end, node)], [split / slice nodes], '') or ([], [], why). Views that keep the last axis whole
    (GPT-2's token flattening) may come first; a view into heads before the cut that ``_grouped_view`` did not
    take as one block per group is refused."""
    flat, parts, cuts = [lin], [], []
    for f in flat:
        for u in f.users:
            if u.name not in region:
                continue
            out, rank = ir.meta.shape(u), len(ir.meta.shape(f) or ())
            dim = (u.args[2] if len(u.args) > 2 else 0) if u.target in _SPLITS else \
                (u.args[1] if len(u.args) > 1 else 0) if u.target is aten.slice.Tensor else None
            if u.target in _SHAPED and out and out[-1] == width:
                flat.append(u)
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
    such view), the views, and the (view, axis, "width") edits of the group counts they spell. (0, [], []) when
    the output is not viewed so. Views that keep the last axis whole (GPT-2's token flattening) may come first."""
    flat = [lin]
    for f in flat:
        flat += [u for u in f.users if u.name in region and u.target in _SHAPED
                 and (ir.meta.shape(u) or (None,))[-1] == width]
    rank = len(ir.meta.shape(lin) or ())
    views = [u for f in flat for u in f.users if u.name in region and u not in flat]
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
    edits = [(v, rank - 1, "width") for v in chain if isinstance(v.args[1][rank - 1], int) and v.args[1][rank - 1] > 0]
    return ir.meta.shape(chain[-1])[rank - 1], chain, edits


def _per_head_inputs(node: dict, region: set, heads: int, kv: int) -> str:
    """Why values from outside the block that differ per head would have to shrink with it (BLOOM's ALiBi bias,
    one slope per head, added to the scores), else ''. A value entering an elementwise op of the block must
    be of size 1 on the op's head axes: a size that equals the q or kv head count, or a symbolic size that is a
    multiple of it (batch x heads, flattened). Masks and rotary tables broadcast over the heads. (Compiled with
    static shapes, a sequence as long as the head count reads as a head axis too: the block is then left
    whole, with this reason.)"""
    for r in sorted(region):
        n = node[r]
        if n.op != "call_function" or n.target not in ELEMENTWISE:
            continue
        out = ir.meta.shape(n) or ()
        axes = [i for i, d in enumerate(out[:-1]) if _counts_heads(d, heads, kv)]
        for a in n.all_input_nodes:
            if a.name in region or a.op == "get_attr" and ir.meta.tensor_attr(n.graph.owning_module, a).numel() == 1:
                continue
            shape = ir.meta.shape(a)
            if shape is None:
                continue
            aligned = (1,) * (len(out) - len(shape)) + tuple(shape)
            if any(aligned[i] != 1 for i in axes if i < len(aligned)):
                return (f"{a.name} of shape {tuple(shape)} from outside the attention block enters {n.name} per head "
                        f"(a per-head bias such as ALiBi's): it would have to lose the removed heads too")
    return ""


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
        fused = all(len(l) == 1 for l in qkv) and len({l[0] for l in qkv}) == 1
        if any(len(l) != 1 or not _float_linear(gm, node[l[0]]) for l in qkv) \
                or len({l[0] for l in qkv}) != 3 and not fused:
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
            edits, why = _head_literals(node, region - {v.name for v in views} - {getattr(q_view, "name", None)},
                                        heads, kv, widths)
            if q_view is not None and q_view.args[1][-2] == heads:    # the head count spelled there
                edits.append((q_view, len(q_view.args[1]) - 2, "q"))
        why = why or _per_head_inputs(node, region, heads, kv) or _computed_head_sizes(node, region, heads, kv)
        if why:
            rejected[where] = why
            continue
        groups.append(HeadGroup(q, k, v, o, heads, kv, dim, edits + view_edits,
                                {p: seg[0] for p, seg in segments.items()}, cuts,
                                width // kv if groups_in_view else 0, params, gates, q_rows))
    return groups, rejected


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
            return [], f"node {n.name} has several axes that may count heads ({[a for _, a, _ in found]})"
        edits += found
    return edits, ""


def _computed_head_sizes(node: dict, region: set, heads: int, kv: int) -> str:
    """Why the region's shapes cannot follow the removed heads: a size computed from a head count (XGLM's
    reshape(x, [heads * batch, -1, head_dim]) for its bmm's), which the pass does not rewrite; else ''."""
    for r in sorted(region):
        n = node[r]
        if n.op != "call_function" or n.target not in _SHAPED or max(heads, kv) == 1:
            continue
        for c in n.args[1]:
            if isinstance(c, fx.Node) and c.target is operator.mul and \
                    any(type(v) is int and v > 1 and v in (heads, kv) for v in c.args):
                expr = " * ".join(a.name if isinstance(a, fx.Node) else str(a) for a in c.args)
                return (f"{n.name} sizes an axis by {c.name} = {expr}, a count of heads folded into another "
                        "size, which the pass does not rewrite")
    return ""


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
    qr = grp.q_rows or d                                      # q_proj's rows per head
    q_proj_idx = (q_heads[:, None] * qr + torch.arange(qr)).reshape(-1)
    rows = None
    if grp.group_rows:                # one fused projection laid out per kv group: the kept groups' blocks
        rows = (keep[:, None] * grp.group_rows + torch.arange(grp.group_rows)).reshape(-1)
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

    def scaled(size):                 # every width over heads scales alike: heads, kv heads, the fused parts
        return size * len(keep) // grp.kv_heads if isinstance(size, int) and abs(size) < 2 ** 62 else size
    for n, a, kind in grp.edits:
        shape = list(n.args[1])
        shape[a] = scaled(shape[a]) if kind == "width" else len(q_heads) if kind == "q" else len(keep)
        n.args = (n.args[0], shape, *n.args[2:])
    for n in grp.cuts:
        if n.target is aten.slice.Tensor:
            n.args = (*n.args[:2], *(scaled(b) for b in n.args[2:4]), *n.args[4:])
        else:
            sizes = [scaled(z) for z in n.args[1]] if isinstance(n.args[1], (list, tuple)) else scaled(n.args[1])
            n.args = (n.args[0], sizes, *n.args[2:])
