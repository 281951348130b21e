"""Whole experts removed from mixture-of-experts blocks: the experts' tensors lose the removed experts, the
router loses their rows, and the graph routes every token among the kept experts only.

A block is found on the graph: the grouped GEMMs sharing one offsets tensor (``quantize_experts``), their
experts' 3-D tensors (E, ., .), and the router, the one linear layer the offsets are computed from
(``linear -> softmax -> topk -> sort -> histc(bins=E) -> cumsum`` in transformers 5.x). Between the router
and the GEMMs the pass reads every op:

- on the router's logits (the experts' axis last): elementwise ops (with scalars, values that broadcast
  over the experts, or per-expert constants such as DeepSeek's score correction bias, which lose the removed
  experts' entries too), softmax over the experts, ``masked_fill`` / ``where``, and ``scatter`` along them;
- leaving that axis: ``topk`` (largest) / ``max`` / ``argmax`` over the experts and ``gather`` along them; the
  indices they give are positions among the kept experts, which is how the experts' tensors are indexed;
- group-limited routing (DeepSeek-V3, GLM-4-MoE, Kimi): the logits viewed as (groups, E / groups), a top-k
  within each group scoring the groups, and a mask over the best groups expanded back to (groups, E / groups)
  and viewed as E. The same number of experts then goes from every group, and those sizes are rewritten;
- after it: any op, but a literal spelling E (``histc``'s bins and upper edge, ``one_hot``'s classes) is
  rewritten to the kept count, and any other literal equal to E (or E / groups) refuses the block.

So the pruned block computes what the model computes with a router that scores the kept experts only: for
routers that softmax or take maxima over the logits (Mixtral, Qwen-MoE, Phi-MoE's sparsemixer, OLMoE), the
model with the removed experts' logits at -inf; for sigmoid routers with a choice bias (DeepSeek-V3, LFM2),
the model with the removed experts' choice scores at -inf. Anything else on the experts' axis (another
reshape, a reduction, the logits returned as an output) leaves the block whole, with the reason.

Experts are scored by REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE
Compression"): the mean, over the calibration tokens routed to expert e, of ||g_e(x) f_e(x)||, the size of
what it adds to the token's output (its routing weight times its output). An expert no calibration token
reached scores 0 and goes first. The k experts each token picks always stay (in every group, under
group-limited routing, as do the experts a group's score takes).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from .prune_structured import ELEMENTWISE, _flow, _float_linear, _narrow, _swap_tensor, _value_inputs, linear_like
from .quant_calibration import run_watching
from .quantize_experts import expert_source, expert_weights, gemm_offsets, grouped_gemm_ops, watch_expert_rows

aten = torch.ops.aten
# ops that keep the experts' axis (last) of the router's logits, position by position or as a softmax / a
# scatter along it: a removed expert's entry is absent, as at -inf
_KEEP_AXIS = ELEMENTWISE | {
    aten.eq.Tensor, aten.ne.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.clamp.Tensor,
    aten.logical_not.default, aten.bitwise_not.default,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.scatter.value, aten.scatter.src}
_ALONG_AXIS = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
               aten.scatter.value, aten.scatter.src, aten.topk.default, aten.max.dim, aten.argmax.default,
               aten.gather.default}
# ops whose outputs no longer have the experts' axis: the best experts' scores and positions
_LEAVE_AXIS = {aten.topk.default, aten.max.dim, aten.argmax.default, aten.gather.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# how a per-expert constant may be read: its elements as they are (Ernie 4.5's (1, E) bias squeezed)
_SAME_ELEMENTS = {aten.squeeze.default, aten.squeeze.dim, aten.unsqueeze.default, aten._to_copy.default, aten.to.dtype,
                  aten.clone.default, aten.detach.default, aten.alias.default}


def _per_expert_constant(gm: fx.GraphModule, a: fx.Node, experts: int) -> Optional[fx.Node]:
    """The get_attr behind ``a`` when ``a`` is a per-expert constant along its last axis (a tensor of the
    module, or one squeezed / cast), else None."""
    while a.op == "call_function" and a.target in _SAME_ELEMENTS and isinstance(a.args[0], fx.Node):
        if (ir.meta.shape(a) or (None,))[-1:] != (experts,):
            return None
        a = a.args[0]
    ok = a.op == "get_attr" and tuple(ir.meta.tensor_attr(gm, a).shape[-1:]) == (experts,)
    return a if ok else None


@dataclasses.dataclass
class Routing:
    """What the ops between a router and its grouped GEMMs say about the experts."""
    picks: int = 0                    # experts each token takes (topk's k; 1 per max / argmax)
    groups: int = 1                   # expert groups of group-limited routing: experts go equally from each
    within: int = 0                   # experts a group's score takes (its top-k within the group)
    literals: list = dataclasses.field(default_factory=list)     # (node, kind) whose sizes count experts:
    # "histc" (bins and upper edge), "one_hot" (classes), "experts" / "per_group" (a reshape's or expand's last
    # size: E or E / groups)
    per_expert: list = dataclasses.field(default_factory=list)   # (get_attr, axis): per-expert tensors
    # (constants applied to the logits: E on the last axis; biases indexed by the experts' ids: E rows)


@dataclasses.dataclass
class ExpertBlock:
    router: fx.Node                   # the linear whose N outputs are the experts' logits
    gemms: list                       # the grouped GEMMs (one offsets tensor), in graph order
    experts: int                      # E
    routing: Routing
    weighted: fx.Node                 # routing weight x the last GEMM's output, rows in the experts' order

    @property
    def keep_min(self) -> int:
        """The fewest experts each group (the block, without groups) must keep."""
        return max(self.routing.picks, self.routing.within)

    @property
    def name(self) -> str:
        """The experts' module (``model.layers.0.mlp.experts``)."""
        src, _ = expert_source(self.gemms[-1])
        return (ir.meta.param_name(src) or src.target).rsplit(".", 1)[0]


def _last_dim(n: fx.Node, dim) -> bool:
    shape = ir.meta.shape(n)
    return shape is not None and dim in (-1, len(shape) - 1)


def _dim(n: fx.Node) -> object:
    """The axis a softmax / scatter / topk / max / gather works along."""
    if n.target is aten.topk.default:
        return n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", -1)
    return n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")


def _axis_problem(gm: fx.GraphModule, n: fx.Node, axis: set, experts: int, per_expert: list) -> str:
    """Why op ``n``, reading a value of ``axis`` (the experts' axis last), cannot run over fewer experts, or ''."""
    where = f"{n.name} ({ir.meta.module_name(n) or '-'})"
    if n.op != "call_function" or n.target not in _KEEP_AXIS | _LEAVE_AXIS:
        return f"{where} runs {n.target} on the router's logits: only elementwise ops, softmax, masked_fill, " \
               "scatter, and topk / max / argmax / gather over the experts may read them"
    if n.target in _ALONG_AXIS and not _last_dim(n.args[0], _dim(n)):
        return f"{where} works along axis {_dim(n)}, not the experts' axis"
    if n.target is aten.topk.default:
        largest = n.args[3] if len(n.args) > 3 else n.kwargs.get("largest", True)
        if not largest:
            return f"{where} takes the smallest experts' scores"
    for i, a in enumerate(n.args):
        if not isinstance(a, fx.Node) or a in axis:
            continue
        if n.target in _ALONG_AXIS and i > 0:
            continue                             # a scatter's / gather's positions: among the kept experts
        shape = ir.meta.shape(a)
        if shape is not None and (len(shape) == 0 or shape[-1] == 1):
            continue                             # the same for every expert
        src = _per_expert_constant(gm, a, experts) if shape is not None and shape[-1] == experts else None
        if src is not None:
            per_expert.append((src, -1))         # one value per expert: loses the removed ones' too
            continue
        return f"{where} combines the router's logits with {a.name} of shape {shape}, not one value per expert"
    return ""


def _read_by(n: fx.Node, region: set) -> bool:
    """Every use of per-expert constant ``n`` is in ``region`` (directly or through squeezes and casts)."""
    return all(u in region or (u.target in _SAME_ELEMENTS and _read_by(u, region)) for u in n.users)


def _per_expert_rows(gm: fx.GraphModule, n: fx.Node, experts: int) -> bool:
    """``n`` reads the rows of a per-expert tensor (E, ...) at expert positions: ``index(t, [experts' ids])``, as
    GPT-OSS's experts' biases."""
    return n.op == "call_function" and n.target is aten.index.Tensor and n.args[0].op == "get_attr" \
        and ir.meta.tensor_attr(gm, n.args[0]).shape[:1] == (experts,) and len(n.args[1]) == 1


def _weighted_rows(gm: fx.GraphModule, last: fx.Node, experts: int) -> Optional[fx.Node]:
    """The product of the last GEMM's output (plus the experts' biases, if any) with the routing weights (one
    per row, broadcast over the features): what each routed token gets from its expert."""
    out = last
    while len(out.users) == 1:
        user = next(iter(out.users))
        other = [a for a in user.args if a is not out]
        if len(other) != 1 or not isinstance(other[0], fx.Node):
            return None
        if user.target is aten.add.Tensor and _per_expert_rows(gm, other[0], experts):
            out = user                                       # + the expert's bias, row by row
            continue
        shape = ir.meta.shape(other[0])
        ok = user.target is aten.mul.Tensor and shape is not None and len(shape) >= 1 and shape[-1] == 1
        return user if ok else None
    return None


def _last_size(n: fx.Node) -> Optional[int]:
    """The last size a reshape or expand spells, when it is a number."""
    sizes = n.args[1] if len(n.args) > 1 else None
    return sizes[-1] if isinstance(sizes, (list, tuple)) and sizes and type(sizes[-1]) is int else None


def _regrouped(n: fx.Node, experts: int, groups: Optional[int]) -> str:
    """How reshape or expand ``n`` lays the experts out: "per_group" for (groups, E / groups) last, "experts"
    for E last, or ''."""
    shape, last = ir.meta.shape(n) or (), _last_size(n)
    if not shape or last not in (shape[-1], -1):
        return ""
    if len(shape) >= 2 and type(shape[-2]) is int and shape[-2] * shape[-1] == experts and groups in (None, shape[-2]):
        return "per_group"
    return "experts" if shape[-1] == experts else ""


def _read_outside(n: fx.Node, region: set) -> Optional[fx.Node]:
    """A user of ``n`` outside ``region`` (sizes of other axes aside), or None."""
    last = len(ir.meta.shape(n) or ()) - 1
    return next((u for u in n.users if u not in region and not
                 (u.target is aten.sym_size.int and u.args[1] not in (-1, last))), None)


def read_routing(gm: fx.GraphModule, router: fx.Node, region: set, experts: int) -> tuple[Routing, str]:
    """Read the ops of ``region`` (between ``router`` and the grouped GEMMs, in graph order): the Routing, or
    why the experts cannot be removed (see the module docstring)."""
    r, groups = Routing(), None
    axis, grouped = {router}, set()           # values with the experts last; with (groups, E / groups) last
    for n in [router, *(n for n in gm.graph.nodes if n in region)]:
        u = _read_outside(n, region) if n is router else None
        if u is not None:
            break
        if n is router:
            continue
        where = f"{n.name} ({ir.meta.module_name(n) or '-'})"
        on = [a for a in _value_inputs(n) if a in axis or a in grouped]
        if on and n.target in _RESHAPES:
            kind = _regrouped(n, experts, groups)        # into equal groups of experts, or back to E
            if not kind:
                return r, f"{where} reshapes the router's logits to {ir.meta.shape(n)}: only into equal groups of " \
                          "experts (group-limited routing) and back"
            if kind == "per_group" and groups is None:
                groups = ir.meta.shape(n)[-2]
            (grouped if kind == "per_group" else axis).add(n)
            if _last_size(n) != -1:
                r.literals.append((n, kind))
        elif on:
            if any(a in grouped for a in on) and any(a in axis for a in on):
                return r, f"{where} combines the logits in groups with the logits"
            why = _axis_problem(gm, n, axis | grouped, experts, r.per_expert)
            if why:
                return r, why
            if n.target in _LEAVE_AXIS:
                # experts picked: topk's k, 1 per max (Phi-MoE's sparsemixer takes two maxima in turn)
                k = 0 if n.target is aten.gather.default else n.args[1] if n.target is aten.topk.default else 1
                if not isinstance(k, int):
                    return r, f"{where} takes the top {k} experts, not a fixed number"
                if on[0] in grouped:
                    r.within = max(r.within, k)                        # scores a group by its best experts
                else:
                    r.picks += k
            else:
                (grouped if on[0] in grouped else axis).add(n)
        elif _per_expert_rows(gm, n, experts):
            r.per_expert.append((n.args[0], 0))      # its rows at the experts' ids: loses the removed ones'
        elif n.target is aten.expand.default and (ir.meta.shape(n.args[0]) or (0,))[-1] == 1 and \
                (kind := _regrouped(n, experts, groups)):
            (grouped if kind == "per_group" else axis).add(n)   # a per-group (or per-token) value spread out
            if _last_size(n) != -1:
                r.literals.append((n, kind))
        elif n.target is aten.histc.default and n.args[1:4] == (experts, 0, experts - 1):
            r.literals.append((n, "histc"))
        elif n.target is aten.one_hot.default and n.args[1:2] == (experts,):
            r.literals.append((n, "one_hot"))
        else:
            lits = [v for v in n.args if isinstance(v, (int, float)) and not isinstance(v, bool)]
            lits += [v for a in n.args if isinstance(a, (list, tuple)) for v in a if type(v) is int]
            spelled = [v for v in lits if v == experts or (groups or 1) > 1 and v == experts // groups]
            if spelled:
                return r, f"{n.name} ({n.target}) spells {spelled[0]}, which counts experts, where the pass " \
                          "cannot tell it does"
        u = _read_outside(n, region) if n in axis or n in grouped else None
        if u is not None:
            break
    if u is not None:
        return r, f"the router's logits are also read by {u.name} ({ir.meta.module_name(u) or '-'}), not only by " \
                  "the routing"
    shared = [src for src, _ in r.per_expert if not _read_by(src, region)]
    if shared:
        return r, f"the per-expert tensor {ir.meta.param_name(shared[0]) or shared[0].name} is also read outside " \
                  "the routing"
    if not r.picks or not any(kind in ("histc", "one_hot") for _, kind in r.literals):
        return r, "no topk / max over the router's logits and no histc / one_hot of the experts' count found " \
                  "between the router and the grouped GEMMs"
    r.groups = groups or 1
    return r, ""


def expert_blocks(gm: fx.GraphModule) -> tuple[list[ExpertBlock], dict[str, str]]:
    """Every mixture-of-experts block whose experts can be removed, and why the others cannot (by the
    experts' module name)."""
    chosen_tensors, skipped_tensors = expert_weights(gm)
    floats = {ew.node for ew in chosen_tensors}
    by_offsets: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in grouped_gemm_ops() and isinstance(gemm_offsets(n), fx.Node):
            by_offsets.setdefault(gemm_offsets(n), []).append(n)
    linears = linear_like() | grouped_gemm_ops()
    g = _flow(gm, linears)
    node = nx.get_node_attributes(g, "node")
    blocks, rejected = [], {}
    for offs, gemms in by_offsets.items():
        srcs = [expert_source(x)[0] for x in gemms]
        name = (ir.meta.param_name(srcs[-1]) or srcs[-1].name).rsplit(".", 1)[0] if srcs[-1] is not None \
            else gemms[-1].name

        def refuse(why):
            rejected[name] = why
        if any(s is None or s not in floats for s in srcs):
            bad = [ir.meta.param_name(s) or s.name for s in srcs if s is not None and s not in floats]
            why = "; ".join(skipped_tensors.get(b, b) for b in bad) or "a computed weight: prune before Quantize"
            refuse(f"the experts' tensors are not float tensors read by the grouped GEMMs only ({why})")
            continue
        experts = {ir.meta.tensor_attr(gm, s).shape[0] for s in srcs}
        if len(experts) != 1:
            refuse(f"the grouped GEMMs' tensors hold {sorted(experts)} experts, not one count")
            continue
        experts = experts.pop()
        up = {node[v] for v in nx.ancestors(g, offs.name) | {offs.name}}
        routers = [n for n in gm.graph.nodes if n in up and n.target in linear_like()]
        if len(routers) != 1 or routers[0].target is not aten.linear.default or not _float_linear(gm, routers[0]):
            refuse(f"the routing is computed from {len(routers)} linear layers ("
                   f"{', '.join(r.name for r in routers)}), not one float router")
            continue
        router = routers[0]
        if ir.meta.tensor_attr(gm, router.args[1]).shape[0] != experts:
            refuse(f"the router {router.name} has {ir.meta.tensor_attr(gm, router.args[1]).shape[0]} outputs, "
                   f"not one per expert ({experts})")
            continue
        weighted = _weighted_rows(gm, gemms[-1], experts)
        if weighted is None:
            refuse(f"{gemms[-1].name}'s output is not multiplied by one routing weight per row, which scores "
                   "the experts")
            continue
        # everything the routing computes from the router's logits on the way to the GEMMs' inputs
        feeds = set()
        for x in gemms:
            for a in x.all_input_nodes:
                feeds |= {node[v] for v in nx.ancestors(g, a.name)} | {a}
        feeds |= {node[v] for v in nx.ancestors(g, weighted.name)}
        region = {node[v] for v in nx.descendants(g, router.name)} & feeds
        routing, why = read_routing(gm, router, region, experts)
        if why:
            refuse(why)
            continue
        blocks.append(ExpertBlock(router, gemms, experts, routing, weighted))
    return blocks, rejected


def expert_scores(gm: fx.GraphModule, blocks: list[ExpertBlock], calls, progress: bool = False) -> dict:
    """For each block's name: (E,) REAP scores (float64), the mean over the calibration tokens routed to each
    expert of ||routing weight x expert output||; 0 for an expert no token reached."""
    acc, watch = {}, {}
    for b in blocks:
        sums = acc[b.name] = [torch.zeros(b.experts, dtype=torch.float64), torch.zeros(b.experts, dtype=torch.float64)]

        def add(e, rows, sums=sums):
            sums[0][e] += rows.detach().double().reshape(rows.shape[0], -1).norm(dim=1).sum().cpu()
            sums[1][e] += rows.shape[0]
        watch_expert_rows(watch, b.gemms[-1], add, of=b.weighted)
    run_watching(gm, calls, watch, progress, "Prune(pattern='experts'): routed outputs")
    return {name: s / c.clamp_min(1) for name, (s, c) in acc.items()}


def remove_experts(gm: fx.GraphModule, block: ExpertBlock, keep: torch.Tensor) -> None:
    """Keep only experts ``keep`` (sorted indices): the router's rows, the experts' tensors, per-expert
    constants of the routing, and the counts the graph spells."""
    _narrow(gm, block.router, rows=keep, suffix="experts")
    with torch.no_grad():
        for x in block.gemms:
            src, rows_out = expert_source(x)
            t = ir.meta.tensor_attr(gm, src).detach()
            _swap_tensor(gm, x.args[1] if rows_out else x, 0 if rows_out else 1,
                         t.index_select(0, keep.to(t.device)), "experts")
        for src, axis in dict.fromkeys(block.routing.per_expert):
            t = ir.meta.tensor_attr(gm, src).detach()
            t = t.index_select(axis, keep.to(t.device)).contiguous()
            with gm.graph.inserting_after(src):
                new = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{src.target}_experts", t))
            new.meta.update(src.meta)
            src.replace_all_uses_with(new)
    e = int(keep.numel())
    for n, kind in block.routing.literals:
        if kind == "histc":
            n.args = (n.args[0], e, n.args[2], type(n.args[3])(e - 1), *n.args[4:])
        elif kind == "one_hot":
            n.args = (n.args[0], e, *n.args[2:])
        else:
            last = e // block.routing.groups if kind == "per_group" else e
            n.args = (n.args[0], [*n.args[1][:-1], last], *n.args[2:])


__all__ = ["ExpertBlock", "Routing", "expert_blocks", "read_routing", "expert_scores", "remove_experts"]
