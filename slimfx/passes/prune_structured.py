"""Structured pruning: feed-forward neurons removed so that the layers physically shrink; the layers that
must shrink together are found on the graph (networkx). Attention heads: ``prune_heads``.

A neuron block is a consumer linear C whose input is computed from the outputs of producer linears P_i
(and nothing that depends on the model's inputs other than through them), by ops that carry each position
of the last axis through on its own: elementwise ops (activations, also spelled out as GPT-2's and Phi's
``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3)))``; products and sums of such values; scalars, and values
that broadcast over the last axis), reshapes that keep the last axis (GPT-2 flattens the tokens around
each linear) and splits along it (Phi-3's one ``gate_up_proj`` split into gate and up). Nothing else may
read the values between. Then neuron j is column j of C, and, in each of a producer's ``N / width``
segments of rows (one for Llama's gate and up, two for Phi-3's gate_up), row j (and its bias): removing
it removes exactly its contribution, and the block can be made narrower. The width literals the graph
spells on the way (the reshapes' last size, the split sizes) follow. An RMS norm over the neurons (a mean
over the last axis of a value holding exactly the neurons: BitNet's ffn_sub_norm, DeepSeek-V3's
q_a_layernorm over its latent) takes its mean over the kept neurons, and a per-neuron parameter read once
(its weight) loses the removed entries: what the block built with that many neurons computes.

Every consumer whose input is computed from linears only is a block; one that cannot be narrowed is
reported with the reason (another op that mixes the neurons, values read elsewhere, a per-neuron tensor
read twice or applied to every expert alike, a quantized layer). Consumers fed by the residual stream (their input
depends on the model's inputs without passing a linear) and attention outputs are not neuron blocks.

Neuron j is scored by E|h_j| * ||C[:, j]||, with h the consumer's input over the calibration tokens
(``column_importance``: the mean size of what the neuron adds to the output), and the lowest-scored
fraction is removed.

Mixture-of-experts blocks are the same blocks with grouped GEMMs for linears: the experts' 3-D tensors
(``quantize_experts.expert_weights``; gate_up (E, 2I, H) and down (E, H, I), transposed or not) between one
grouped GEMM's output and the next one's input. Each expert has its own I neurons and keeps its own best
ones, scored on the tokens routed to it (``expert_importance``); every expert keeps the same number, so the
tensors stay rectangular: (E, 2I', H) and (E, H, I'). An expert no calibration token reached is scored by
its weights alone (||C_e[:, j]||).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from .quant_calibration import run_watching
from .quantize_experts import expert_source, grouped_gemm_ops, watch_expert_rows

aten = torch.ops.aten
# position by position along the last axis: output j depends on the inputs' position j only (or on scalars)
ELEMENTWISE = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.exp.default, aten.erf.default, aten.neg.default, aten.abs.default, aten.reciprocal.default,
    aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.clamp.default,
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.maximum.default,
    aten.minimum.default, aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default,
    # relu^2 (Nemotron, Persimmon, Arcee), xIELU's softplus / expm1 / where (Apertus), other activations
    aten.square.default, aten.softplus.default, aten.expm1.default, aten.log1p.default, aten.log.default,
    aten.where.self, aten.sign.default, aten.elu.default, aten.leaky_relu.default, aten.hardtanh.default,
    aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.gt.Scalar, aten.ge.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.eq.Scalar,
    aten.ne.Scalar, aten.gt.Tensor, aten.ge.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.min.other, aten.max.other}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}     # shape literal: args[1]
_KEEP_LAST = _RESHAPES | {aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_ATTENTION = {aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default}


def linear_like() -> set:
    """The ops that are a linear layer: aten.linear and the slimfx dialect's linears (fused, quantized,
    lowered to sparse kernels)."""
    sf = torch.ops.slimfx
    return {aten.linear.default, sf.fused_linear.default, sf.quantized_linear.default,
            sf.weight_only_linear.default, sf.sparse_linear.default}


def layer_name(n: fx.Node) -> str:
    """A linear's module name: the node's module metadata, else its weight's parameter path, else the node.
    A grouped GEMM is named by its experts' tensor (``model.layers.0.mlp.experts.down_proj``)."""
    if n.op == "call_function" and n.target in grouped_gemm_ops():
        src, _ = expert_source(n)
        return (ir.meta.param_name(src) if src is not None else None) or ir.meta.module_name(n) or n.name
    w = n.args[1] if len(n.args) > 1 and isinstance(n.args[1], fx.Node) else None
    return ir.meta.module_name(n) or (ir.meta.module_name(w) if w is not None and w.op == "get_attr" else "") \
        or n.name


def _float_linear(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A float linear with its weight (and bias) as tensors, or a grouped GEMM over a float experts' tensor."""
    if n.op != "call_function":
        return False
    if n.target in grouped_gemm_ops():
        src, _ = expert_source(n)
        if src is None:
            return False
        t = ir.meta.tensor_attr(gm, src)
        return t.ndim == 3 and t.is_floating_point()
    if n.target is not aten.linear.default:
        return False
    w, b = n.args[1], n.args[2] if len(n.args) > 2 else None
    ok = isinstance(w, fx.Node) and w.op == "get_attr" and ir.meta.tensor_attr(gm, w).is_floating_point()
    return ok and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr"))


def linear_problem(gm: fx.GraphModule, n: fx.Node) -> str:
    """Why the layer ``n`` cannot shrink (it is not a float linear with its weight as a tensor: quantized, fused,
    lowered to the sparse kernels, or its weight computed), else ''. Neuron and head pruning give this reason."""
    if _float_linear(gm, n):
        return ""
    w = n.args[1] if n.op == "call_function" and n.target is aten.linear.default else None
    if isinstance(w, fx.Node) and w.op != "get_attr":
        return f"{layer_name(n)}: {ir.meta.computed_weight(w)}"
    return (f"{layer_name(n)} is not a float linear layer with its weight as a tensor (prune before "
            "Quantize, Fuse and LowerSparse)")


def residual_input(n: fx.Node) -> Optional[fx.Node]:
    """The value a dialect linear adds to its output (Fuse's ``fused_linear(.., residual=h)``), else None: its
    output depends on that value without passing a linear."""
    schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "residual" not in names:
        return None
    i = names.index("residual")
    r = n.args[i] if len(n.args) > i else n.kwargs.get("residual")
    return r if isinstance(r, fx.Node) else None


def _in_features(gm: fx.GraphModule, n: fx.Node) -> int:
    """K of a float linear or of each expert of a grouped GEMM."""
    if n.target is aten.linear.default:
        return ir.meta.tensor_attr(gm, n.args[1]).shape[1]
    src, rows_out = expert_source(n)
    return ir.meta.tensor_attr(gm, src).shape[2 if rows_out else 1]


@dataclasses.dataclass
class NeuronGroup:
    consumer: fx.Node                 # the linear reading the neurons (down_proj)
    producers: list[fx.Node]          # the linears writing them (gate_proj, up_proj), in graph order
    width: int                        # neurons: the consumer's K; each producer's N is a multiple of it
    edits: list = dataclasses.field(default_factory=list)    # reshapes and splits whose literals spell widths
    params: list = dataclasses.field(default_factory=list)   # (user, get_attr): per-neuron tensors (a norm's weight)

    @property
    def name(self) -> str:
        return layer_name(self.consumer)

    @property
    def experts(self) -> bool:
        """A mixture-of-experts block: grouped GEMMs over experts' tensors, neurons chosen per expert."""
        return self.consumer.target in grouped_gemm_ops()


def _is_value(n: fx.Node) -> bool:
    """A tensor (or a split's tuple of them), not a size: sym_size nodes only feed shape arguments."""
    return not isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _value_inputs(n: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``n`` reads (a reshape's sizes and type_as's dtype donor are not)."""
    if n.target in _KEEP_LAST or n.target in _SPLITS or n.target in (operator.getitem, aten.type_as.default):
        return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
    return [a for a in n.all_input_nodes if _is_value(a)]


def _flow(gm: fx.GraphModule, linears: set) -> nx.DiGraph:
    """Value edges (input -> user) of the graph, none into a linear: walks up from a node stop at the linears
    that compute it."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, node=n)
        if n.op == "call_function" and n.target not in linears:
            g.add_edges_from((a.name, n.name) for a in _value_inputs(n))
    return g


def _computed_from(producers: list, region: set) -> set:
    """The nodes of ``region`` computed from the producers' outputs (through other nodes of it)."""
    seen, todo = set(), list(producers)
    while todo:
        for u in todo.pop().users:
            if u in region and u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _last(n: fx.Node) -> Optional[int]:
    shape = ir.meta.shape(n.args[0] if n.target in _SPLITS else n)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _broadcast(n: fx.Node) -> bool:
    """A value the same for every neuron: a scalar, or of size 1 along the last axis."""
    shape = ir.meta.shape(n)
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def _split_problem(n: fx.Node, width: int) -> str:
    shape = ir.meta.shape(n.args[0])
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    if shape is None or dim not in (-1, len(shape) - 1):
        return f"{n.name} splits along axis {dim}, not the neurons' axis"
    sizes = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
    if not all(isinstance(s, int) and s % width == 0 for s in sizes):
        return f"{n.name} splits into pieces of {list(sizes)}, not whole multiples of the {width} neurons"
    return ""


def last_axis_mean(n: fx.Node) -> Optional[fx.Node]:
    """What n averages over its last axis, kept as size 1 (an RMS norm's mean of squares), else None."""
    src = n.args[0] if n.target is aten.mean.dim and isinstance(n.args[0], fx.Node) else None
    rank = len(ir.meta.shape(src) or ()) if src is not None else 0
    ok = rank > 0 and len(n.args) > 2 and n.args[2] is True and [d % rank for d in n.args[1]] == [rank - 1]
    return src if ok else None


def channel_param(n: fx.Node, width: int) -> bool:
    """n is a parameter of one value per channel (shape (width,)) read once: a norm's weight, which narrows
    with the channels."""
    return n.op == "get_attr" and tuple(ir.meta.shape(n) or ()) == (width,) and len(n.users) == 1


def _neuron_mean(n: fx.Node, width: int) -> bool:
    """n is a mean over the last axis of a value holding exactly the ``width`` neurons: an RMS norm over the
    neurons (BitNet's ffn_sub_norm, DeepSeek-V3's q_a_layernorm over its latent). Pruned, it takes its mean
    over the kept neurons, as the block built with that many computes."""
    src = last_axis_mean(n)
    return src is not None and (ir.meta.shape(src) or (None,))[-1] == width


def _neuron_params(leaves: list, width: int) -> list:
    """The leaves that are per-neuron parameters (``channel_param``), narrowed with the neurons."""
    return [n for n in leaves if channel_param(n, width)]


def _block_problem(gm: fx.GraphModule, c: fx.Node, region: set, producers: list, leaves: list,
                   width: int) -> str:
    """Why the neurons between ``producers`` and consumer ``c`` cannot be removed, or ''."""
    why = next(filter(None, (linear_problem(gm, p) for p in [*producers, c])), "")
    if why:
        return why
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region = sorted(region, key=order.get)
    for n in region:
        where = f"{n.name} ({ir.meta.module_name(n) or '-'})"
        if n.target in _KEEP_LAST:
            out, src = ir.meta.shape(n), ir.meta.shape(n.args[0])
            if not out or not src or out[-1] != src[-1]:
                return f"{where} reshapes the neurons' axis ({n.target} to {out})"
            if n.target in _RESHAPES and not (isinstance(n.args[1][-1], int)):
                return f"{where} spells the neurons' axis as {n.args[1][-1]}"
        elif n.target in _SPLITS:
            why = _split_problem(n, width)
            if why:
                return why
        elif n.target is operator.getitem:
            if n.args[0].target not in _SPLITS:
                return f"{where} takes item {n.args[1]} of {n.args[0].name}"
        elif n.target not in ELEMENTWISE and not _neuron_mean(n, width):
            return (f"{where} runs {n.target}, which mixes the neurons: only elementwise ops, reshapes that keep "
                    "the last axis, splits along it and means over it may stand between the layers")
    per_token = {n for n in region if _neuron_mean(n, width)}
    per_token |= {n for n in _computed_from(list(per_token), set(region)) if _last(n) == 1}
    for n in [*region, *producers]:
        last = _last(n)
        if n not in per_token and (last is None or last % width):
            return f"{n.name} has {last} features, not a multiple of the {width} neurons {layer_name(c)} reads"
    params = _neuron_params(leaves, width)
    if params and c.target in grouped_gemm_ops():
        return (f"{params[0].name} of shape {ir.meta.shape(params[0])} is applied to every expert's neurons alike: "
                "the experts keep different neurons")
    for leaf in leaves:
        if not _broadcast(leaf) and leaf not in params:
            return (f"{leaf.name} of shape {ir.meta.shape(leaf)} is applied to the neurons one by one (a per-neuron "
                    "tensor the pass does not narrow)")
    inside = {*region, *producers}
    for n in sorted(inside, key=order.get):
        for u in n.users:
            shape_only = u.target is aten.sym_size.int and u.args[1] not in (-1, len(ir.meta.shape(n) or ()) - 1)
            if u not in inside and not (u is c and n is c.args[0]) and not shape_only:
                return f"the neurons are also read by {u.name} ({ir.meta.module_name(u) or '-'}), not only by " \
                       f"{layer_name(c)}"
    return ""


def neuron_groups(gm: fx.GraphModule) -> tuple[list[NeuronGroup], dict[str, str]]:
    """Every block whose neurons can be removed, in the consumers' graph order, and why the other blocks'
    cannot (by the consumer's module name)."""
    linears = linear_like() | grouped_gemm_ops()
    g = _flow(gm, linears)
    node = nx.get_node_attributes(g, "node")
    # values that depend on the model's inputs without passing a linear (the residual stream, masks; also through
    # the residual a fused linear adds, after Fuse)
    through = g.copy()
    through.add_edges_from((r.name, n.name) for n in gm.graph.nodes if n.op == "call_function"
                           and n.target in linears and (r := residual_input(n)) is not None)
    fed = set()
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        fed |= nx.descendants(through, p.name) | {p.name}
    groups, rejected = [], {}
    for c in gm.graph.nodes:
        x = c.args[0] if c.op == "call_function" and c.target in linears and c.args else None
        if not isinstance(x, fx.Node) or x.name in fed:
            continue
        up = {node[v] for v in nx.ancestors(g, x.name) | {x.name}}
        producers = [n for n in gm.graph.nodes if n in up and n.target in linears]
        if not producers or any(n.target in _ATTENTION for n in up):
            continue                          # not computed from linears, or an attention output
        leaves = [n for n in gm.graph.nodes if n in up and n not in producers and not _value_inputs(n)]
        region = up - set(producers) - set(leaves)
        flowing = _computed_from(producers, region)
        # what the rest computes from parameters alone (Apertus' xIELU: softplus of a learned scalar) is applied
        # to the neurons as a leaf is
        leaves += [n for n in gm.graph.nodes if n in region - flowing and any(u in flowing for u in n.users)]
        region = flowing
        if not _float_linear(gm, c):
            rejected[layer_name(c)] = _block_problem(gm, c, region, producers, leaves, 1)
            continue
        kinds = {n.target in grouped_gemm_ops() for n in [*producers, c]}
        if len(kinds) > 1:
            rejected[layer_name(c)] = (f"{layer_name(c)} and the layers writing its input "
                                       f"({', '.join(layer_name(p) for p in producers)}) are not all linear layers "
                                       "or all experts' grouped GEMMs")
            continue
        width = _in_features(gm, c)
        why = _block_problem(gm, c, region, producers, leaves, width)
        if why:
            rejected[layer_name(c)] = why
            continue
        edits = [n for n in region if n.target in _RESHAPES | _SPLITS]
        params = [(u, p) for p in _neuron_params(leaves, width) for u in p.users]
        groups.append(NeuronGroup(c, producers, width, edits, params))
    return groups, rejected


def _swap_tensor(gm: fx.GraphModule, user: fx.Node, i: int, t: torch.Tensor, suffix: str) -> None:
    """Make argument ``i`` of ``user`` (a get_attr) read a new tensor ``t`` instead (the old one stays
    untouched, for the user's model); the new node keeps the old one's metadata but its shape."""
    old = user.args[i]
    with gm.graph.inserting_before(user):
        new = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{old.target}_{suffix}", t.contiguous()))
    new.meta.update(old.meta)
    user.args = (*user.args[:i], new, *user.args[i + 1:])


def _narrow_experts(gm: fx.GraphModule, gemm: fx.Node, index: torch.Tensor, outputs: bool) -> None:
    """Keep, in each expert e of a grouped GEMM's tensor, the outputs (``outputs``) or inputs ``index[e]``."""
    src, rows_out = expert_source(gemm)
    t = ir.meta.tensor_attr(gm, src).detach()
    axis = (1 if rows_out else 2) if outputs else (2 if rows_out else 1)
    shape = list(t.shape)
    shape[axis] = index.shape[1]
    index = index.to(t.device).view(index.shape[0], *[-1 if a == axis else 1 for a in (1, 2)]).expand(shape)
    with torch.no_grad():
        _swap_tensor(gm, gemm.args[1] if rows_out else gemm, 0 if rows_out else 1, t.gather(axis, index), "narrow")


def _narrow(gm: fx.GraphModule, lin: fx.Node, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
            suffix: str = "narrow") -> None:
    """Keep rows ``rows`` of a linear's weight and bias (its outputs) or columns ``cols`` of its weight."""
    with torch.no_grad():
        w = ir.meta.tensor_attr(gm, lin.args[1]).detach()
        _swap_tensor(gm, lin, 1, w[rows] if rows is not None else w[:, cols], suffix)
        if rows is not None and len(lin.args) > 2 and lin.args[2] is not None:
            _swap_tensor(gm, lin, 2, ir.meta.tensor_attr(gm, lin.args[2]).detach()[rows], suffix)


def shrink(gm: fx.GraphModule, group: NeuronGroup, keep: torch.Tensor) -> None:
    """Keep only neurons ``keep`` (sorted indices; for experts, (E, kept) sorted per row, the same number in
    each): in every width-sized segment of the producers' rows (weights and biases), the consumer's columns,
    and the widths spelled by the reshapes and splits."""
    old, new = group.width, keep.shape[-1]
    for p in group.producers:
        if group.experts:
            src, rows_out = expert_source(p)
            segments = ir.meta.tensor_attr(gm, src).shape[1 if rows_out else 2] // old
            _narrow_experts(gm, p, (torch.arange(segments)[:, None] * old + keep[:, None, :]).flatten(1), True)
        else:
            segments = ir.meta.tensor_attr(gm, p.args[1]).shape[0] // old
            _narrow(gm, p, rows=(torch.arange(segments)[:, None] * old + keep).reshape(-1))
    if group.experts:
        _narrow_experts(gm, group.consumer, keep, False)
    else:
        _narrow(gm, group.consumer, cols=keep)
        for user, param in group.params:
            with torch.no_grad():
                _swap_tensor(gm, user, user.args.index(param), ir.meta.tensor_attr(gm, param).detach()[keep], "narrow")

    def scaled(size):
        return size // old * new if isinstance(size, int) and size != -1 else size
    for n in group.edits:
        if n.target in _RESHAPES:
            n.args = (n.args[0], [*n.args[1][:-1], scaled(n.args[1][-1])], *n.args[2:])
        else:
            sizes = [scaled(s) for s in n.args[1]] if isinstance(n.args[1], (list, tuple)) else scaled(n.args[1])
            n.args = (n.args[0], sizes, *n.args[2:])


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


def expert_importance(gm: fx.GraphModule, consumers: list[fx.Node], calls) -> dict[fx.Node, torch.Tensor]:
    """For each consumer grouped GEMM: (experts, K) scores E_e|x_j| * ||W_e[:, j]|| (float64), x the rows routed
    to expert e (rows offs[e-1]:offs[e] of the GEMM's input) over ``calls``; an expert no row reached scores
    ||W_e[:, j]|| alone."""
    acc, watch = {}, {}
    for c in consumers:
        e = ir.meta.tensor_attr(gm, expert_source(c)[0]).shape[0]
        sums = acc[c] = [torch.zeros(e, _in_features(gm, c), dtype=torch.float64),   # sum |x_j|, rows
                         torch.zeros(e, dtype=torch.float64)]

        def add(i, rows, sums=sums):
            sums[0][i] += rows.detach().double().abs().sum(0).cpu()
            sums[1][i] += rows.shape[0]
        watch_expert_rows(watch, c, add)
    run_watching(gm, calls, watch)
    out = {}
    for c, (sums, count) in acc.items():
        src, rows_out = expert_source(c)
        w = ir.meta.tensor_attr(gm, src).detach().double().cpu()          # (E, K, N) or (E, N, K)
        norms = w.norm(dim=1 if rows_out else 2)                           # (E, K): per input column
        mean = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], torch.ones_like(sums))
        out[c] = mean * norms
    return out


def column_importance(gm: fx.GraphModule, consumers: list[fx.Node], calls) -> dict[fx.Node, torch.Tensor]:
    """For each consumer linear: E|x_j| * ||W[:, j]|| per input column j (float64), the mean size of what
    column j adds to the output. A neuron or head whose weights are small may still carry large activations
    (measured on SmolLM2: removing the quarter of MLP neurons with the smallest weight norms took its
    perplexity from 22 to 1.1e6; a random quarter, to 169), so the activations must be in the score."""
    stats = input_stats(gm, consumers, calls)
    return {c: stats[c][0] * ir.meta.tensor_attr(gm, c.args[1]).detach().double().norm(dim=0) for c in consumers}
