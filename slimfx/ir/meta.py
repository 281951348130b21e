"""Typed access to node metadata. Passes read and write ``node.meta`` only through these functions.

Keys:
- ``val``            the FakeTensor / SymInt torch.export (or our propagation) attached: shape and dtype
- ``nn_module_stack`` the source module path export records; ``module_name`` reads the innermost one
- ``slimfx``          a ``NodeInfo``: what compression passes decided for this node
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch
import torch.fx as fx

_INFO = "slimfx"
_PARAM = "slimfx_param"


@dataclasses.dataclass
class NodeInfo:
    """Compression metadata of one node. Quantization and sparsity passes fill the fields they own (a pruning
    mask needs no field: Prune writes it as the weight's zeros)."""
    quant: Optional[dict] = None      # e.g. the QScheme and its parameters, as JSON-able data
    sparse: Optional[str] = None      # a sparsity pattern the (quantized) weight satisfies, which a backend
                                      # may exploit ("block:64x64"; LowerSparse)
    kernel: Optional[str] = None      # what a backend chose for this node, and why
    origin: Optional[str] = None      # the pass that created this node
    merged: Optional[list] = None     # the modules of the layers one GEMM computes (merge_qkv), in row order


def val(node: fx.Node) -> Any:
    return node.meta.get("val")


def shape(node: fx.Node) -> Optional[tuple]:
    """The node's shape as a tuple of ints / SymInts, or None when it is not a tensor or unknown."""
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: fx.Node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def is_tensor(node: fx.Node) -> bool:
    return isinstance(val(node), torch.Tensor)


def info(node: fx.Node) -> NodeInfo:
    """The node's NodeInfo, created empty on first access."""
    if _INFO not in node.meta:
        node.meta[_INFO] = NodeInfo()
    return node.meta[_INFO]


def module_name(node: fx.Node) -> str:
    """Dotted path of the innermost source module ("encoder.layer.0.attention.self.query"), or ""."""
    if _PARAM in node.meta:
        return node.meta[_PARAM].rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        # a node a pass made without a source module: a layer's, named after its weight's module (a linear's
        # args are (x, weight, ...)), so include/exclude still find it
        w = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
        return module_name(w) if isinstance(w, fx.Node) and w.op == "get_attr" and _PARAM in w.meta else ""
    path = list(stack.values())[-1][0]
    # export writes paths like "L['self'].encoder.layer[0]" in strict mode and plain FQNs in non-strict
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "")


def merged_modules(node: fx.Node) -> Optional[list]:
    """The module names of the layers a merged linear computes (q/k/v after merge_qkv), else None."""
    got = node.meta.get(_INFO)
    return list(got.merged) if got is not None and got.merged else None


def layer_name(node: fx.Node) -> str:
    """A linear node's module name; a merged one's names joined after their common prefix
    ("model.layers.0.self_attn.q_proj+k_proj+v_proj")."""
    parts = merged_modules(node)
    return joined_name(parts) if parts else (module_name(node) or node.name)


def joined_name(parts: list) -> str:
    """Module names of merged layers as one: "model.layers.0.self_attn.q_proj+k_proj+v_proj"."""
    prefix = parts[0].rsplit(".", 1)[0] + "." if "." in parts[0] else ""
    if all(p.startswith(prefix) for p in parts):
        return prefix + "+".join(p[len(prefix):] for p in parts)
    return "+".join(parts)


def param_name(node: fx.Node) -> Optional[str]:
    """For a get_attr node: the parameter's fully qualified name in the user's model."""
    return node.meta.get(_PARAM)


def set_param_name(node: fx.Node, fqn: str) -> None:
    node.meta[_PARAM] = fqn


def computed_weight(node) -> str:
    """Why a layer's weight ``node`` is not a tensor of the module, for a pass's "skipped": computed from the
    module's tensors alone (weight_norm, spectral_norm, any parametrization), which 'const_fold' makes one tensor,
    by a slimfx op (already quantized), or from the inputs."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if getattr(n.target, "namespace", None) == "slimfx":
            return f"weight is computed by {n.target.name()} (already quantized)"
        if n.op == "placeholder":
            return "weight is computed from the inputs, not a tensor of the module"
        todo.extend(n.all_input_nodes)
    return ("weight is computed from the module's tensors (weight_norm, a parametrization): run 'const_fold' "
            "before this pass to make it one tensor")


def tensor_attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node reads."""
    assert node.op == "get_attr", f"{node.name} is a {node.op}, not get_attr"
    return getattr(gm, node.target)


def attr_name(name: str, prefix: str) -> str:
    """``name`` as an identifier, which a saved graph's attribute names must be (its code reads self.<name>):
    non-word characters become "_", and ``prefix`` goes in front of one that would start with a digit
    (nn.Sequential's "0.weight")."""
    flat = re.sub(r"\W", "_", name)
    return flat if flat.isidentifier() else prefix + flat


def add_tensor_attr(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> str:
    """Store ``tensor`` on gm under a fresh flat attribute name derived from ``name``; returns the name.
    Passes never write into existing tensors (the user's model shares them); they add new ones."""
    base = attr_name(name, "t_")
    new, i = base, 0
    while hasattr(gm, new):
        i += 1
        new = f"{base}_{i}"
    if isinstance(tensor, torch.nn.Parameter):
        gm.register_parameter(new, tensor)
    else:
        gm.register_buffer(new, tensor)
    return new
