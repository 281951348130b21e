"""merge_qkv: linear layers that read the same input (attention's Q/K/V, Llama's gate/up) become one GEMM.

The siblings are found on the graph: all users of one node that are the same linear op, take that node
as their input, have get_attr weights of one dtype and K, and agree on everything that is not per output
channel. Their per-output-channel tensors (weight rows, bias, scales) are concatenated into new tensors,
one linear computes all outputs, and slices along the last dimension hand each former sibling its part.

    aten.linear(x, w, b?)                                 per channel: w, b
    slimfx.quantized_linear(x, w_q, w_scale, b?)          per channel: w_q, w_scale, b   (float x: one
                                                          per-token quantization of x serves all)
    slimfx.weight_only_linear(x, w_q, w_scale, z?, b?, G) per channel: w_q, w_scale, z, b; G shared
Each output element is the same dot product over K as before; only the GEMM's N grows.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.fx as fx

import slimfx.ir.dialect  # noqa: F401

from .. import ir
from .base import Pass, PassResult, register_pass

aten = torch.ops.aten
sf = torch.ops.slimfx

# op -> (indices of per-output-channel tensor args, {index: default} of args that must agree)
MERGEABLE = {
    aten.linear.default: ((1, 2), {}),
    sf.quantized_linear.default: ((1, 2, 3), {4: None}),
    sf.weight_only_linear.default: ((1, 2, 3, 4), {5: 0}),
}


def _arg(node: fx.Node, i: int, default=None):
    return node.args[i] if len(node.args) > i else default


def _key(gm, node: fx.Node):
    """What siblings must share, or None when the node cannot merge."""
    per_channel, shared = MERGEABLE[node.target]
    if node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    sig = []
    for i in per_channel:
        a = _arg(node, i)
        if a is None:
            sig.append(None)
            continue
        if not isinstance(a, fx.Node) or a.op != "get_attr":
            return None
        t = ir.meta.tensor_attr(gm, a)
        sig.append((t.dtype, tuple(t.shape[1:]), t.device))
    if sig[0] is None:
        return None
    return (node.target, tuple(sig), tuple(_arg(node, i, d) for i, d in shared.items()))


def sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups (in graph order, two or more) of mergeable linears reading the same input node."""
    groups = []
    for x in gm.graph.nodes:
        by_key = defaultdict(list)
        for u in x.users:
            if u.op == "call_function" and u.target in MERGEABLE and u.args[0] is x:
                k = _key(gm, u)
                if k is not None:
                    by_key[k].append(u)
        order = {n: i for i, n in enumerate(gm.graph.nodes)} if by_key else {}
        groups += [sorted(g, key=order.__getitem__) for g in by_key.values() if len(g) > 1]
    return groups


def _merge(gm: fx.GraphModule, group: list[fx.Node]) -> None:
    g = gm.graph
    first = group[0]
    per_channel, _ = MERGEABLE[first.target]
    sizes = [ir.meta.tensor_attr(gm, n.args[1]).shape[0] for n in group]
    names = [ir.meta.module_name(n.args[1]) or n.name for n in group]
    label = "_".join(s.rsplit(".", 1)[-1] for s in names)
    prefix = names[0].rsplit(".", 1)[0] if "." in names[0] else names[0]
    args = list(first.args)
    with g.inserting_before(first):
        for i in per_channel:
            if _arg(first, i) is None:
                continue
            cat = torch.cat([ir.meta.tensor_attr(gm, n.args[i]).detach() for n in group], 0).contiguous()
            args[i] = g.get_attr(ir.meta.add_tensor_attr(gm, f"{prefix}.merged_{label}.arg{i}", cat))
        merged = g.call_function(first.target, tuple(args))
        if "nn_module_stack" in first.meta:
            merged.meta["nn_module_stack"] = first.meta["nn_module_stack"]
        ir.meta.info(merged).origin = "merge_qkv"
        ir.meta.info(merged).merged = [ir.meta.module_name(n) or n.name for n in group]
        ir.meta.info(merged).quant = _merged_record(group)
    start = 0
    for n, size in zip(group, sizes):
        with g.inserting_before(n):
            part = g.call_function(aten.slice.Tensor, (merged, -1, start, start + size))
        part.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")})
        start += size
        n.replace_all_uses_with(part)
        g.erase_node(n)


def _merged_record(group: list[fx.Node]):
    """The quantization records of merged layers as one (the report keeps counting their bytes), or None."""
    recs = [ir.meta.info(n).quant if n.meta.get("slimfx") else None for n in group]
    if not all(r and "mode" in r for r in recs):
        return None
    rec = dict(recs[0])
    rec["module"] = ir.meta.joined_name([r["module"] for r in recs])     # as include/exclude spell it
    rec["fp32_bytes"] = sum(r["fp32_bytes"] for r in recs)
    rec["weight_bytes"] = sum(r["weight_bytes"] for r in recs)
    sqnrs = [r["sqnr_db"] for r in recs if r.get("sqnr_db") is not None]
    rec["sqnr_db"] = min(sqnrs) if sqnrs else None              # the worst of the merged layers
    fits = [r["gptq"] for r in recs if (r.get("gptq") or {}).get("output_error") is not None]
    if fits:                                                    # and GPTQ's worst fit, with its rounding's
        rec["gptq"] = max(fits, key=lambda g: g["output_error"])
    ranges = [r["weight_range"] for r in recs if r.get("weight_range")]
    if ranges:
        rec["weight_range"] = [min(lo for lo, _ in ranges), max(hi for _, hi in ranges)]
    rec["merged_from"] = [r["module"] for r in recs]
    return rec


@register_pass(name="merge_qkv")
@dataclasses.dataclass
class MergeSiblings(Pass):
    """Merge linears sharing an input (Q/K/V, gate/up) into one GEMM over concatenated weights."""

    def run(self, gm, ctx):
        groups = sibling_groups(gm)
        for group in groups:
            _merge(gm, group)
        if groups:
            gm.graph.eliminate_dead_code()
            ir.drop_unused_tensors(gm)
            gm.graph.lint()
            gm.recompile()
            ir.propagate_meta(gm)
        return PassResult(gm, bool(groups), {"groups": len(groups), "merged": sum(len(g) for g in groups)})
