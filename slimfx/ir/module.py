"""Copying a GraphModule cheaply: a new graph (nodes, metadata, call convention) over the same tensors."""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.fx as fx
import torch.fx._pytree  # noqa: F401 - tree_flatten_spec

from . import meta
from .propagate import carry_propagation


def fork(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of the graph and of slimfx's node metadata, sharing the tensors.
    Passes work on a fork, so a pass that fails leaves the graph before it untouched; passes never
    write into tensors (they add new ones), so sharing them is safe and costs no memory."""
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen          # the call convention (pytree specs): immutable, shared
    val_map: dict = {}
    out_val, out_node = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    new_out = graph.output(out_val, type_expr=out_node.type)
    new_out.meta = copy.copy(out_node.meta)
    for node in graph.nodes:       # graph_copy copies each meta dict, not what it holds: the mutable parts too
        info = node.meta.get("slimfx")
        if isinstance(info, meta.NodeInfo):
            node.meta["slimfx"] = dataclasses.replace(info, quant=copy.deepcopy(info.quant),
                                                      merged=None if info.merged is None else list(info.merged))
        if isinstance(node.meta.get("nn_module_stack"), dict):
            node.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])
    root = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            root[node.target] = getattr(gm, node.target) if node.op == "get_attr" else gm.get_submodule(node.target)
    new = fx.GraphModule(root, graph, class_name=gm.__class__.__name__)
    carry_propagation(gm.graph, graph, {**val_map, out_node: new_out})
    return new


def tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads, by attribute name."""
    return {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"
            and isinstance(getattr(gm, n.target, None), torch.Tensor)}


def state_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors the graph writes into when it runs, by attribute name: a model's state (a counter, a running
    mean, a static KV cache kept in buffers), which torch.export leaves as ``copy_`` into the buffer after the
    graph's pure computation."""
    out = {}
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable or not node.args:
            continue
        dst = node.args[0]
        if isinstance(dst, fx.Node) and dst.op == "get_attr" and isinstance(getattr(gm, dst.target, None),
                                                                           torch.Tensor):
            out[dst.target] = getattr(gm, dst.target)
    return out


def own_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Give ``gm`` its own copy of each state tensor (the ones it writes into), so running it never writes into
    the model it was captured from nor into another graph's; returns {name: the model's tensor}."""
    theirs = state_tensors(gm)
    for name, t in theirs.items():
        mine = t.detach().clone()
        if name in gm._parameters:
            gm._parameters[name] = torch.nn.Parameter(mine, requires_grad=t.requires_grad)
        else:
            gm._buffers[name] = mine
    return theirs


@contextlib.contextmanager
def state_kept(tensors):
    """Run a block that may write into ``tensors`` (a dict or iterable of them) and put their values back after."""
    tensors = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(tensors, saved):
                with torch.inference_mode(t.is_inference()):    # (a model's made there is written only there)
                    t.copy_(v)


def drop_unused_tensors(gm: fx.GraphModule) -> int:
    """Delete tensor attributes no get_attr node reads any more; returns how many."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [k for k in list(gm._parameters) + list(gm._buffers) if k not in used]
    for k in names:
        delattr(gm, k)
    return len(names)


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call ``(*args, **kwargs)`` laid out as at capture."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return list(args) + list(kwargs.values())
    return fx._pytree.tree_flatten_spec((args, kwargs), info.in_spec)
