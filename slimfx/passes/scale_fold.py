"""Per-input-channel scaling of linear layers, with the inverse folded where it costs nothing at run time.

SmoothQuant and AWQ both rewrite ``W x`` as ``(W diag(s)) (x / s)`` for the linears reading one input x: the
float function is unchanged (up to fp32 rounding) and the quantizer then sees ``W diag(s)``. ``scale_input``
puts the ``1 / s`` in the first of these places that applies:

    norm     x is a LayerNorm / RMSNorm output read only by these linears (maybe through reshapes that keep
             the channel axis, or dtype casts): its affine weight (and bias) divided by s; Gemma's
             ``normalized * (1 + w)`` multiplies by one new tensor ``(1 + w) / s`` instead
    linear   x is another linear's output, or an elementwise product with one (Llama's act(gate) * up),
             read only by these linears: that linear's output rows (weight rows and bias) divided by s
    mul      otherwise, when allowed: a new ``x * (1 / s)`` node before the linears (an elementwise op at
             run time)

and replaces each linear's weight by ``W * s`` (a new tensor: a weight shared elsewhere is left alone).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .. import ir

aten = torch.ops.aten


def _new_attr(gm, before: fx.Node, like: fx.Node, name: str, t: torch.Tensor) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, name, t))
    node.meta.update({k: v for k, v in like.meta.items() if k != "slimfx_param"})
    return node


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CASTS = (aten.type_as.default, aten._to_copy.default, aten.to.dtype)


def _through_views(gm, x: fx.Node, lins: list[fx.Node]) -> Optional[fx.Node]:
    """The node whose value x is, seen through reshapes that keep the last (channel) axis (GPT-2 flattens its
    tokens between the norm and the linear), slices along other axes and dtype casts (Gemma's norm ends in
    ``type_as(x)``), each read only by the next; None unless only ``lins`` read x. A scale moved before a cast
    rounds differently only."""
    if set(x.users) != set(lins):
        return None
    while (x.op == "call_function" and isinstance(x.args[0], fx.Node) and len(x.args[0].users) == 1
           and ir.meta.shape(x) is not None and ir.meta.shape(x.args[0]) is not None
           and (x.target in _VIEWS and ir.meta.shape(x)[-1] == ir.meta.shape(x.args[0])[-1]
                or x.target in _CASTS and ir.meta.shape(x) == ir.meta.shape(x.args[0])
                and set(x.kwargs) <= {"dtype", "memory_format"}
                or x.target is aten.slice.Tensor and _not_last(x, len(ir.meta.shape(x))))):
        x = x.args[0]
    return x


def _not_last(x: fx.Node, ndim: int) -> bool:
    """A slice along another axis than the last: the tokens a causal LM's head keeps (logits_to_keep)."""
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    return isinstance(dim, int) and dim % ndim != ndim - 1


def _plus_constant(gm, a, n: int) -> Optional[tuple[torch.Tensor, float]]:
    """(w, c) when ``a`` is ``w + c``, read only by one node, for a module tensor w of n elements (maybe cast
    first) and a number c: Gemma's RMSNorm multiplies by ``1 + weight.float()``."""
    if not (isinstance(a, fx.Node) and a.op == "call_function" and a.target is aten.add.Tensor
            and len(a.users) == 1 and len(a.args) == 2 and not a.kwargs):
        return None
    w, c = a.args if isinstance(a.args[0], fx.Node) else a.args[::-1]
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not isinstance(w, fx.Node):
        return None
    if w.op == "call_function" and w.target in _CASTS and isinstance(w.args[0], fx.Node):
        w = w.args[0]
    if w.op == "get_attr" and ir.meta.tensor_attr(gm, w).numel() == n:
        return ir.meta.tensor_attr(gm, w).detach(), float(c)
    return None


def fold_into_norm(gm, x: fx.Node, lins: list[fx.Node], s: torch.Tensor) -> Optional[str]:
    """Divide the norm's affine parameters by s when x is a norm output read only by ``lins``."""
    x = _through_views(gm, x, lins)
    if x is None or x.op != "call_function":
        return None
    plus = {}
    if x.target is aten.layer_norm.default:
        params = [a for a in x.args[2:4] if isinstance(a, fx.Node)]
        if not params or x.args[2] is None or any(p.op != "get_attr" for p in params):
            return None
        where = {2: x.args[2]} | ({3: x.args[3]} if len(x.args) > 3 and isinstance(x.args[3], fx.Node) else {})
    elif x.target is aten.mul.Tensor:       # RMSNorm: weight * normalized, or normalized * (1 + weight) (Gemma)
        where = {i: a for i, a in enumerate(x.args[:2]) if isinstance(a, fx.Node) and a.op == "get_attr"
                 and ir.meta.tensor_attr(gm, a).shape == s.shape}
        plus = {i: _plus_constant(gm, a, s.numel()) for i, a in enumerate(x.args[:2])}
        plus = {i: wc for i, wc in plus.items() if wc is not None}
        if len(where) + len(plus) != 1:
            return None
    else:
        return None
    args = list(x.args)
    for i, p in where.items():
        t = ir.meta.tensor_attr(gm, p).detach()
        args[i] = _new_attr(gm, x, p, f"{p.target}_scaled", (t / s).to(t.dtype))
    for i, (t, c) in plus.items():          # (c + w) / s as one tensor, in place of the add (now dead)
        add = x.args[i]
        dtype = ir.meta.val(add).dtype if ir.meta.val(add) is not None else t.dtype
        args[i] = _new_attr(gm, x, add, f"{ir.meta.module_name(x) or x.name}.weight_plus_{c:g}_scaled",
                            ((t.double() + c) / s.reshape(t.shape)).to(dtype))
    x.args = tuple(args)
    return ir.meta.module_name(x) or x.name


def _producer_linear(gm, x: fx.Node) -> Optional[fx.Node]:
    """The linear whose output rows can absorb a per-channel scale of x: x itself, or the factor of an
    elementwise product x = a * lin(..) that only x reads; its weight and bias must be module tensors."""
    def ok(n):
        return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.linear.default
                and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"
                and ir.meta.tensor_attr(gm, n.args[1]).ndim == 2
                and (len(n.args) < 3 or n.args[2] is None
                     or isinstance(n.args[2], fx.Node) and n.args[2].op == "get_attr"))
    if ok(x):
        return x
    if x.op == "call_function" and x.target is aten.mul.Tensor:
        facs = [a for a in x.args[:2] if ok(a) and set(a.users) == {x}]
        shapes = [ir.meta.shape(a) for a in x.args[:2]]
        if len(facs) == 1 and all(isinstance(a, fx.Node) for a in x.args[:2]) and shapes[0] == shapes[1]:
            return facs[0]
    return None


def fold_into_linear(gm, x: fx.Node, lins: list[fx.Node], s: torch.Tensor) -> Optional[str]:
    """Divide the output rows of the linear producing x (see ``_producer_linear``) by s."""
    x = _through_views(gm, x, lins)
    if x is None:
        return None
    prod = _producer_linear(gm, x)
    if prod is None or ir.meta.tensor_attr(gm, prod.args[1]).shape[0] != s.numel():
        return None
    name = ir.meta.module_name(prod) or prod.name
    w = ir.meta.tensor_attr(gm, prod.args[1]).detach()
    args = list(prod.args)
    args[1] = _new_attr(gm, prod, prod.args[1], f"{name}.weight_rows_scaled", (w / s[:, None]).to(w.dtype))
    if len(args) > 2 and args[2] is not None:
        b = ir.meta.tensor_attr(gm, prod.args[2]).detach()
        args[2] = _new_attr(gm, prod, prod.args[2], f"{name}.bias_scaled", (b / s).to(b.dtype))
    prod.args = tuple(args)
    return name


def insert_mul(gm, x: fx.Node, lins: list[fx.Node], s: torch.Tensor) -> fx.Node:
    """A new ``x * (1 / s)`` node that ``lins`` (in graph order: linears, or any ops reading x) read instead of
    x; returns it."""
    name = ir.meta.module_name(lins[0]) or lins[0].name
    dtype = ir.meta.val(x).dtype if isinstance(ir.meta.val(x), torch.Tensor) else torch.float32
    with gm.graph.inserting_before(lins[0]):        # in x's dtype: a bf16 x times fp32 scales would be fp32
        inv = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{name}.input_inv_scale", (1.0 / s).to(dtype)))
        m = gm.graph.call_function(aten.mul.Tensor, (x, inv))
    if "val" in x.meta:
        m.meta["val"] = x.meta["val"]
    if "nn_module_stack" in lins[0].meta:
        m.meta["nn_module_stack"] = lins[0].meta["nn_module_stack"]
        inv.meta["nn_module_stack"] = lins[0].meta["nn_module_stack"]
    for l in lins:
        l.replace_input_with(x, m)
    return m


def scale_input(gm, x: fx.Node, lins: list[fx.Node], s: torch.Tensor, allow_mul: bool,
                suffix: str) -> Optional[tuple[str, str, fx.Node]]:
    """Scale the linears ``lins`` reading x by s per input channel (module docstring). Returns (how, where,
    the node the linears now read: x, or the new mul) or None when nothing applies (``allow_mul`` False);
    the new weights are named ``<module>.weight_<suffix>``."""
    where = fold_into_norm(gm, x, lins, s)
    how = "norm"
    if where is None:
        where, how = fold_into_linear(gm, x, lins, s), "linear"
    if where is None:
        if not allow_mul:
            return None
        x = insert_mul(gm, x, lins, s)
        where, how = x.name, "mul"
    for l in lins:
        name = ir.meta.module_name(l) or l.name
        w = ir.meta.tensor_attr(gm, l.args[1]).detach()
        nw = _new_attr(gm, l, l.args[1], f"{name}.weight_{suffix}", (w.float() * s).to(w.dtype))
        l.args = (l.args[0], nw, *l.args[2:])
    return how, where, x
