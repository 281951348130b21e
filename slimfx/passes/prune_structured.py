"""Structured pruning of feed-forward neurons: the layers that must shrink together, found on the graph.

A neuron group is a consumer linear C whose input is computed from the outputs of producer linears P_i
by elementwise ops only (GELU/SiLU/ReLU/..., and products or sums of such values: Llama's
``down(silu(gate(x)) * up(x))``, BERT's ``output(gelu(intermediate(x)))``), where nothing else reads the
producers' outputs or the values between. Then intermediate neuron j is row j of every P_i (and its
bias) and column j of C: removing it removes exactly its contribution, and the group can be made
narrower. The groups are the weakly connected components of the elementwise nodes (networkx), with their
producers and their single consumer around them.

Neuron j is scored by ||C[:, j]|| * prod_i ||P_i[j, :]|| (its output weights times its input weights; a
neuron with a small path through the layer matters little), and the lowest-scored fraction is removed.
"""
from __future__ import annotations

import dataclasses

import networkx as nx
import torch
import torch.fx as fx

from .. import ir

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


def neuron_scores(gm: fx.GraphModule, group: NeuronGroup) -> torch.Tensor:
    """||C[:, j]|| * prod_i ||P_i[j, :]|| for each neuron j (float64)."""
    s = ir.meta.tensor_attr(gm, group.consumer.args[1]).detach().double().norm(dim=0)
    for p in group.producers:
        s = s * ir.meta.tensor_attr(gm, p.args[1]).detach().double().norm(dim=1)
    return s


def shrink(gm: fx.GraphModule, group: NeuronGroup, keep: torch.Tensor) -> None:
    """Keep only neurons ``keep`` (sorted indices): new, narrower tensors for the producers' weights and
    biases and the consumer's weight (the old ones stay untouched, for the user's model)."""
    g = gm.graph

    def replace(user: fx.Node, i: int, t: torch.Tensor, suffix: str):
        old = user.args[i]
        with g.inserting_before(user):
            new = g.get_attr(ir.meta.add_tensor_attr(gm, f"{old.target}_{suffix}", t.contiguous()))
        new.meta.update(old.meta)
        args = list(user.args)
        args[i] = new
        user.args = tuple(args)

    with torch.no_grad():
        for p in group.producers:
            replace(p, 1, ir.meta.tensor_attr(gm, p.args[1]).detach()[keep], "narrow")
            if len(p.args) > 2 and p.args[2] is not None:
                replace(p, 2, ir.meta.tensor_attr(gm, p.args[2]).detach()[keep], "narrow")
        replace(group.consumer, 1, ir.meta.tensor_attr(gm, group.consumer.args[1]).detach()[:, keep], "narrow")
