"""Canonicalization: every capture ends in one op set, the ATen ops torch.export produces.

Three steps, each small and table-driven:
1. ``canonicalize_calls``: torch-level calls from ``fx.symbolic_trace`` (``nn.Linear`` modules,
   ``F.linear``, ``operator.add`` on tensors, ``x.view(...)``) become their ATen ops.
2. ``canonicalize_aliases``: ``x.T``, ``chunk`` and ``broadcast_to`` become ``t``/``permute``, ``split`` and ``expand``.
   ``LINEAR_RULES``: every spelling of a linear layer (``addmm(b, x, t(w))``, ``matmul(x, t(w))``,
   ``mm``, a weight stored transposed as GPT-2's ``Conv1D`` keeps it, a bias added after the product)
   becomes ``aten.linear.default(x, w, b)``, the one form passes match; ``fold_weight_transposes``
   then stores transposed weights as tensors of their own (after capture flattened the namespace).
3. ``drop_noops``: export's metadata asserts, inference dropout, random draws nothing reads, dtype
   conversions to the same dtype, in-place ``detach_`` and empty 1-D tensors in ``cat`` (torch skips them; a
   Hugging Face KV cache starts from one) disappear.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import meta
from .rewrite import Rule, apply_rules

aten = torch.ops.aten

# --- 1. torch-level calls -> ATen ------------------------------------------------------------------

# functions whose positional arguments map one to one
_FUNCTIONS = {
    F.linear: aten.linear.default, torch.matmul: aten.matmul.default, torch.bmm: aten.bmm.default,
    torch.mm: aten.mm.default, torch.addmm: aten.addmm.default,
    F.relu: aten.relu.default, torch.relu: aten.relu.default, F.gelu: aten.gelu.default,
    F.silu: aten.silu.default, torch.tanh: aten.tanh.default, torch.sigmoid: aten.sigmoid.default,
    F.layer_norm: aten.layer_norm.default, F.embedding: aten.embedding.default,
    torch.cat: aten.cat.default, torch.neg: aten.neg.default, torch.exp: aten.exp.default,
    torch.rsqrt: aten.rsqrt.default, torch.sqrt: aten.sqrt.default, torch.transpose: aten.transpose.int,
    torch.reshape: aten.reshape.default, torch.permute: aten.permute.default, torch.t: aten.t.default,
    F.scaled_dot_product_attention: aten.scaled_dot_product_attention.default,
    torch.cos: aten.cos.default, torch.sin: aten.sin.default, torch.flatten: aten.flatten.using_ints,
    torch.where: aten.where.self, torch.pow: aten.pow.Tensor_Scalar,
}
# Python operators on tensors (on SymInts they stay Python operators)
_OPERATORS = {
    operator.add: aten.add.Tensor, operator.sub: aten.sub.Tensor, operator.mul: aten.mul.Tensor,
    operator.truediv: aten.div.Tensor, operator.neg: aten.neg.default, operator.matmul: aten.matmul.default,
    operator.floordiv: aten.floor_divide.default,         # x // 2: export records the literal in the Tensor slot
    torch.add: aten.add.Tensor, torch.sub: aten.sub.Tensor, torch.mul: aten.mul.Tensor,
    torch.div: aten.div.Tensor,
}
# Python operators whose ATen op depends on the operands (x > 0: gt.Scalar; x > y: gt.Tensor), by ATen name
_TENSOR_OPERATORS = {
    operator.gt: "gt", operator.lt: "lt", operator.ge: "ge", operator.le: "le", operator.eq: "eq", operator.ne: "ne",
    operator.pow: "pow", operator.mod: "remainder", operator.and_: "bitwise_and", operator.or_: "bitwise_or",
    operator.xor: "bitwise_xor", operator.invert: "bitwise_not", operator.abs: "abs",
}
# tensor methods
_METHODS = {
    "view": aten.view.default, "reshape": aten.reshape.default, "permute": aten.permute.default,
    "transpose": aten.transpose.int, "t": aten.t.default, "unsqueeze": aten.unsqueeze.default,
    "squeeze": aten.squeeze.dim, "expand": aten.expand.default, "flatten": aten.flatten.using_ints,
    "relu": aten.relu.default, "tanh": aten.tanh.default, "sigmoid": aten.sigmoid.default,
    "exp": aten.exp.default, "neg": aten.neg.default, "matmul": aten.matmul.default,
    "add": aten.add.Tensor, "sub": aten.sub.Tensor, "mul": aten.mul.Tensor, "div": aten.div.Tensor,
    "pow": aten.pow.Tensor_Scalar, "mean": aten.mean.dim, "rsqrt": aten.rsqrt.default,
    "abs": aten.abs.default, "sqrt": aten.sqrt.default, "sin": aten.sin.default, "cos": aten.cos.default,
    "clamp": aten.clamp.default, "softmax": aten.softmax.int,
}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_VARARG_SHAPE_METHODS = {"view", "reshape", "permute", "expand"}   # x.view(a, b) == x.view((a, b))


def _module_call(gm: fx.GraphModule, node: fx.Node, mod: nn.Module):
    """(target, args, kwargs) of the ATen call that replaces a call_module node, or None."""
    def attr(name):
        t = getattr(mod, name)
        if t is None:
            return None
        with gm.graph.inserting_before(node):
            a = gm.graph.get_attr(f"{node.target}.{name}")
        return a
    x = node.args[0] if node.args else None
    if isinstance(mod, nn.Linear):
        return aten.linear.default, (x, attr("weight"), attr("bias")), {}
    if isinstance(mod, nn.LayerNorm):
        return aten.layer_norm.default, (x, list(mod.normalized_shape), attr("weight"), attr("bias"), mod.eps), {}
    if isinstance(mod, nn.Embedding) and mod.padding_idx is None and mod.max_norm is None:
        return aten.embedding.default, (attr("weight"), x), {}
    if isinstance(mod, nn.GELU):
        return aten.gelu.default, (x,), ({"approximate": mod.approximate} if mod.approximate != "none" else {})
    simple = {nn.ReLU: aten.relu.default, nn.SiLU: aten.silu.default, nn.Tanh: aten.tanh.default,
              nn.Sigmoid: aten.sigmoid.default}
    for cls, op in simple.items():
        if type(mod) is cls:
            return op, (x,), {}
    if isinstance(mod, (nn.Dropout, nn.Identity)):
        return "identity", (x,), {}
    if isinstance(mod, nn.Softmax):
        return aten.softmax.int, (x, mod.dim), {}
    return None


def _is_tensor_arg(a) -> bool:
    """Tensor-valued argument? Without metadata (pattern graphs) every node counts as a tensor."""
    return isinstance(a, fx.Node) and ("val" not in a.meta or isinstance(a.meta["val"], torch.Tensor))


def _is_int(a) -> bool:
    """An int, or a node whose value is one (``x.view(x.numel())``)."""
    v = a.meta.get("val") if isinstance(a, fx.Node) else a
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _replace_with_constant(node: fx.Node, value) -> None:
    swap = lambda a: value if a is node else a
    for user in list(node.users):
        user.args = fx.node.map_aggregate(user.args, swap)
        user.kwargs = fx.node.map_aggregate(user.kwargs, swap)


def _function_call(node: fx.Node):
    """(target, args, kwargs) of the ATen call for a torch-level function call, or None to leave it: the torch
    signature's arguments put where ATen's take them (F.embedding's input and weight swap), options ATen does
    not take dropped where they change no value (``inplace``), the overload chosen by the operands' kinds."""
    fn, args, kwargs = node.target, list(node.args), dict(node.kwargs)
    if fn in (F.relu, F.silu, torch.relu):          # inplace=...: the graph's value is the same either way
        return _FUNCTIONS[fn], tuple(args[:1]), {}
    if fn is F.embedding:                           # F.embedding(input, weight, padding_idx, max_norm, ...)
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = {**dict(zip(names, args)), **kwargs}
        if bound.get("max_norm") is not None:       # renormalizes the weight in place: no ATen call of ours
            return None
        return aten.embedding.default, (bound["weight"], bound["input"]), {}
    if fn is torch.pow:
        base, exp = (args + [kwargs.get("exponent")])[:2] if len(args) < 2 else args[:2]
        target = (aten.pow.Tensor_Tensor if _is_tensor_arg(base) and _is_tensor_arg(exp) else
                  aten.pow.Tensor_Scalar if _is_tensor_arg(base) else aten.pow.Scalar)
        return target, (base, exp), {}
    if fn is torch.where and len(args) == 3:
        cond, a, b = args
        target = (aten.where.self if _is_tensor_arg(a) and _is_tensor_arg(b) else
                  aten.where.ScalarOther if _is_tensor_arg(a) else
                  aten.where.ScalarSelf if _is_tensor_arg(b) else aten.where.Scalar)
        return target, (cond, a, b), {}
    return _FUNCTIONS[fn], tuple(args), kwargs


def canonicalize_calls(gm: fx.GraphModule) -> int:
    """Rewrite torch-level calls into ATen calls in place; returns how many nodes changed."""
    changed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        new = None
        if node.op == "call_module":
            new = _module_call(gm, node, gm.get_submodule(node.target))
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            new = _function_call(node)
        elif node.op == "call_function" and node.target is F.softmax:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            new = aten.softmax.int, (node.args[0], dim), {}
        elif node.op == "call_function" and node.target in _OPERATORS and any(
                _is_tensor_arg(a) for a in node.args):
            new = _OPERATORS[node.target], tuple(node.args), dict(node.kwargs)
        elif node.op == "call_function" and node.target in _TENSOR_OPERATORS and any(
                _is_tensor_arg(a) for a in node.args):
            from .rewrite import _aten_packet, _resolve       # (x > 0) as export records it: aten.gt.Scalar
            new = _resolve(_aten_packet(_TENSOR_OPERATORS[node.target]), node.args, node.kwargs)
        elif node.op == "call_method" and node.target in _METHODS:
            args = list(node.args)
            if node.target in _VARARG_SHAPE_METHODS and len(args) > 2:
                args = [args[0], list(args[1:])]
            elif node.target in _VARARG_SHAPE_METHODS and len(args) == 2 and isinstance(args[1], tuple):
                args = [args[0], list(args[1])]
            elif node.target in _VARARG_SHAPE_METHODS and len(args) == 2 and _is_int(args[1]):
                args = [args[0], [args[1]]]                     # x.view(-1), x.reshape(n): one size, a list
            if node.target == "mean" and len(args) == 2 and isinstance(args[1], int):
                args[1] = [args[1]]
            target = _METHODS[node.target]
            if node.target == "view" and len(args) == 2 and isinstance(args[1], torch.dtype):
                target = aten.view.dtype                         # x.view(torch.int32): a bitcast
            if node.target == "pow" and _is_tensor_arg(args[1] if len(args) > 1 else node.kwargs.get("exponent")):
                target = aten.pow.Tensor_Tensor
            new = target, tuple(args), dict(node.kwargs)
        elif node.op == "call_method" and node.target == "sum" and not node.kwargs.get("dtype"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            new = (aten.sum.default, (node.args[0],), {}) if dim is None else \
                (aten.sum.dim_IntList, (node.args[0], [dim] if isinstance(dim, int) else list(dim), keep), {})
        elif node.op == "call_method" and node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
            new = aten.to.dtype, (node.args[0], _CAST_METHODS[node.target]), {}     # as torch.export records it
        elif node.op == "call_method" and node.target == "size" and meta.is_tensor(node.args[0]) and \
                all(isinstance(d, int) for d in meta.shape(node.args[0])):
            size = meta.shape(node.args[0])          # static shapes (symbolic_trace): sizes are constants
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            _replace_with_constant(node, size if dim is None else size[dim])
            graph.erase_node(node)
            changed += 1
            continue
        elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("dtype",) and \
                isinstance(node.args[0], fx.Node) and meta.dtype(node.args[0]) is not None:
            _replace_with_constant(node, meta.dtype(node.args[0]))    # h.dtype: a constant, as export records it
            graph.erase_node(node)
            changed += 1
            continue
        elif node.op == "call_function" and node.target is getattr and len(node.args) == 2 and \
                isinstance(node.args[0], fx.Node) and isinstance(node.args[0].target, torch._ops.OpOverload) and \
                node.args[1] in [r.name for r in node.args[0].target._schema.returns if r.name]:
            names = [r.name for r in node.args[0].target._schema.returns]    # y.max(dim=1).values: the named
            new = operator.getitem, (node.args[0], names.index(node.args[1])), {}      # result's field, by index
        elif node.op == "call_method" and node.target == "contiguous":
            new = aten.clone.default, (node.args[0],), {"memory_format": torch.contiguous_format}
        elif node.op in ("call_function", "call_method") and not isinstance(node.target, torch._ops.OpOverload):
            from .rewrite import aten_call              # anything else: the ATen op of its name that takes these
            new = aten_call(node)                       # arguments (torch.clamp(x, max=1) -> aten.clamp.default)
        if new is None:
            continue
        target, args, kwargs = new
        if target == "identity":
            node.replace_all_uses_with(args[0])
        else:
            with graph.inserting_before(node):
                repl = graph.call_function(target, args, kwargs)
            repl.meta.update(node.meta)
            node.replace_all_uses_with(repl)
        graph.erase_node(node)
        changed += 1
    if changed:
        graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed


# --- 2. every linear spelling -> aten.linear --------------------------------------------------------

def _attr_tensor(node: fx.Node):
    """The tensor a get_attr node reads, or None for any other node."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _weight_param(name: str, ndim: int):
    """A rule filter: the pattern placeholder ``name`` matched a floating parameter of ``ndim`` dims."""
    def where(match, original_graph, pattern_graph) -> bool:
        placeholder = next(p for p in pattern_graph.nodes if p.op == "placeholder" and p.target == name)
        t = _attr_tensor(match.nodes_map[placeholder])
        return isinstance(t, nn.Parameter) and t.ndim == ndim and t.is_floating_point()
    return where


def _bias_of(match, original_graph, pattern_graph) -> bool:
    """add(linear(x, w), b) with b a 1-D parameter as long as the linear's output features."""
    placeholders = {p.target: match.nodes_map[p] for p in pattern_graph.nodes if p.op == "placeholder"}
    b, w = _attr_tensor(placeholders["a2"]), _attr_tensor(placeholders["a1"])
    return isinstance(b, nn.Parameter) and b.ndim == 1 and w is not None and w.ndim == 2 and \
        b.shape[0] == w.shape[0]


def _weight_left_3d(match, original_graph, pattern_graph) -> bool:
    """W @ x.transpose(1, 2) is a linear layer only when x has 3 dims (then 1, 2 are its last two)."""
    x = next(match.nodes_map[p] for p in pattern_graph.nodes if p.op == "placeholder" and p.target == "a1")
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return _weight_param("a0", 2)(match, original_graph, pattern_graph) and isinstance(val, torch.Tensor) \
        and val.ndim == 3


LINEAR_RULES = [
    Rule("addmm(b, x, t(w)) => linear(x, w, b)",
         lambda b, x, w: aten.addmm.default(b, x, aten.t.default(w)),
         lambda b, x, w: aten.linear.default(x, w, b)),
    Rule("addmm(b, x, permute(w, [1, 0])) => linear(x, w, b)",
         lambda b, x, w: aten.addmm.default(b, x, aten.permute.default(w, [1, 0])),
         lambda b, x, w: aten.linear.default(x, w, b)),
    Rule("mm(x, t(w)) => linear(x, w)",
         lambda x, w: aten.mm.default(x, aten.t.default(w)),
         lambda x, w: aten.linear.default(x, w)),
    Rule("matmul(x, t(w)) => linear(x, w)",
         lambda x, w: aten.matmul.default(x, aten.t.default(w)),
         lambda x, w: aten.linear.default(x, w)),
    Rule("matmul(x, permute(w, [1, 0])) => linear(x, w)",
         lambda x, w: aten.matmul.default(x, aten.permute.default(w, [1, 0])),
         lambda x, w: aten.linear.default(x, w)),
    # weights stored (in, out), as GPT-2's Conv1D keeps them: the transpose is folded into a new tensor
    # attribute after capture (fold_weight_transposes), so passes see a plain linear
    Rule("addmm(b, x, W) => linear(x, t(W), b)",
         lambda b, x, w: aten.addmm.default(b, x, w),
         lambda b, x, w: aten.linear.default(x, aten.t.default(w), b), where=_weight_param("a2", 2)),
    Rule("mm(x, W) => linear(x, t(W))",
         lambda x, w: aten.mm.default(x, w),
         lambda x, w: aten.linear.default(x, aten.t.default(w)), where=_weight_param("a1", 2)),
    Rule("matmul(x, W) => linear(x, t(W))",
         lambda x, w: aten.matmul.default(x, w),
         lambda x, w: aten.linear.default(x, aten.t.default(w)), where=_weight_param("a1", 2)),
    # the weight on the left of a transposed input (Mamba's ``dt_proj.weight @ x.transpose(1, 2)``)
    Rule("matmul(W, transpose(x, -2, -1)) => transpose(linear(x, W), -2, -1)",
         lambda w, x: aten.matmul.default(w, aten.transpose.int(x, -2, -1)),
         lambda w, x: aten.transpose.int(aten.linear.default(x, w), -2, -1), where=_weight_param("a0", 2)),
    Rule("matmul(W, transpose(x, 1, 2)) => transpose(linear(x, W), 1, 2), x 3-D",
         lambda w, x: aten.matmul.default(w, aten.transpose.int(x, 1, 2)),
         lambda w, x: aten.transpose.int(aten.linear.default(x, w), 1, 2), where=_weight_left_3d),
    # a bias added after the product (Falcon's ``x @ w.T + b``)
    Rule("linear(x, w) + b => linear(x, w, b)",
         lambda x, w, b: aten.add.Tensor(aten.linear.default(x, w), b),
         lambda x, w, b: aten.linear.default(x, w, b), where=_bias_of),
    Rule("b + linear(x, w) => linear(x, w, b)",
         lambda x, w, b: aten.add.Tensor(b, aten.linear.default(x, w)),
         lambda x, w, b: aten.linear.default(x, w, b), where=_bias_of),
]


def fold_weight_transposes(gm: fx.GraphModule) -> int:
    """linear(x, t(W)) with W a tensor attribute -> linear(x, W'), W' = W.t() stored as a new attribute, so
    every linear reads its weight straight from a get_attr node. Run after the tensors were moved into the
    flat namespace. W' is a contiguous copy: a strided view would run a different BLAS path than the same
    weight saved and loaded (results differing in the last bit), and the kernels want rows."""
    n, sources = 0, set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default or len(node.args) < 2:
            continue
        tw = node.args[1]
        if not (isinstance(tw, fx.Node) and tw.op == "call_function" and tw.target in (aten.t.default,
                aten.permute.default) and isinstance(tw.args[0], fx.Node) and tw.args[0].op == "get_attr"):
            continue
        if tw.target is aten.permute.default and list(tw.args[1]) != [1, 0]:
            continue
        src = tw.args[0]
        weight = meta.tensor_attr(gm, src)
        if weight.ndim != 2:
            continue
        wt = weight.detach().t().contiguous()
        name = meta.add_tensor_attr(gm, f"{src.target}_t", nn.Parameter(wt, weight.requires_grad)
                                    if isinstance(weight, nn.Parameter) else wt)
        with gm.graph.inserting_before(tw):
            new = gm.graph.get_attr(name)
        new.meta.update(src.meta)
        new.meta["val"] = src.meta["val"].t().contiguous() if isinstance(src.meta.get("val"), torch.Tensor) \
            else wt
        if meta.param_name(src):
            meta.set_param_name(new, meta.param_name(src))    # the user's parameter (its transpose)
        node.replace_input_with(tw, new)
        sources.add(src.target)
        n += 1
    if n:
        gm.graph.eliminate_dead_code()
        read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
        for target in sources - read:
            delattr(gm, target)                 # the (in, out) original: the graph no longer holds it
        gm.recompile()
    return n


_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def _weight_slice(node) -> Optional[tuple]:
    """For ``getitem(split(W, sizes, dim), i)`` with W a tensor attribute and literal sizes (nn.MultiheadAttention
    cutting q, k and v out of in_proj_weight / in_proj_bias for cross-attention): (W's node, dim, start, length,
    i, parts), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    cut, i = node.args
    if not (isinstance(cut, fx.Node) and cut.op == "call_function" and cut.target in _SPLITS and type(i) is int):
        return None
    src, t = cut.args[0], _attr_tensor(cut.args[0])
    dim = cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)
    if t is None or type(dim) is not int:
        return None
    size, sizes = t.shape[dim], cut.args[1]
    if type(sizes) is int:          # split(W, s): pieces of s, the last one what is left
        sizes = [sizes] * (size // sizes) + ([size % sizes] if size % sizes else []) if sizes > 0 else None
    if not sizes or not all(type(z) is int for z in sizes) or sum(sizes) != size or not 0 <= i < len(sizes):
        return None
    return src, dim, sum(sizes[:i]), sizes[i], i, list(sizes)


def _part_name(param: str, i: int, sizes: list) -> str:
    """The name of part i of a parameter cut along its rows: nn.MultiheadAttention's in_proj_weight holds q, k and
    v (cut [E, 2E] into "q" and "kv" when key is value, in three otherwise); any other by its index."""
    if param.rsplit(".", 1)[-1] == "in_proj_weight" and (len(sizes) == 3 or sizes[1:] == [2 * sizes[0]]):
        return ("q", "k", "v")[i] if len(sizes) == 3 else ("q", "kv")[i]
    return str(i)


def _weight_layer(w) -> Optional[str]:
    """The layer a linear's weight names: ``<module>.<part>`` for a weight ``<module>.<part>.weight`` (a linear
    module's) or a packed ``<module>.<part>_weight`` (nn.MultiheadAttention's in_proj_weight: "mha.in_proj"), and
    ``.<slice>`` after it for a part cut out of one (``_part_name``); None when the weight is no such tensor."""
    part = _weight_slice(w)
    src = part[0] if part else w
    fqn = meta.param_name(src) if isinstance(src, fx.Node) and src.op == "get_attr" else None
    if not fqn:
        return None
    owner, _, leaf = fqn.rpartition(".")
    if leaf != "weight" and not leaf.endswith("_weight"):
        return None
    name = owner if leaf == "weight" else ".".join(filter(None, (owner, leaf[:-len("_weight")])))
    return name + "." + _part_name(fqn, part[4], part[5]) if part and name else name or None


def name_layers(gm: fx.GraphModule) -> int:
    """Give each linear whose weight belongs to a part of the module that called it the name of that part, as
    the innermost entry of its ``nn_module_stack`` (which ``meta.module_name`` reads, and every pass copies with
    the node). Export names an op after the module whose forward ran it, and nn.MultiheadAttention runs both its
    projections itself: without this, its out_proj and its packed input projection would both be "mha", so
    include/exclude could not tell them apart. Now: "mha.out_proj" (as named_modules() has it), "mha.in_proj" (the
    packed in_proj_weight), "mha.in_proj.q" / "mha.in_proj.kv" (cross-attention's parts of it; ``.q``, ``.k``,
    ``.v`` when key is not value), "mha.q_proj" (separate q_proj_weight, kdim != embed_dim). Run after the tensors
    were moved into the flat namespace (it reads their parameter names). Returns how many were renamed."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default or len(node.args) < 2:
            continue
        name, here = _weight_layer(node.args[1]), meta.module_name(node)
        if name and name != here and (not here or name.startswith(here + ".")):
            stack = dict(node.meta.get("nn_module_stack") or {})
            stack[f"slimfx_layer_{name}"] = (name, "slimfx.layer")    # (path, type) as export writes them
            node.meta["nn_module_stack"] = stack
            n += 1
    return n


def fold_weight_slices(gm: fx.GraphModule) -> int:
    """linear(x, split(W, ..)[i], split(b, ..)[i]) with W (b) a tensor attribute -> linear(x, W_i, b_i), each part
    stored as a new attribute (a contiguous copy, as ``fold_weight_transposes`` stores its transposes), so the
    layer reads its weight straight from a get_attr node like any other and can be quantized and pruned:
    nn.MultiheadAttention's cross-attention cuts its q and kv projections out of in_proj_weight so. Run after
    ``name_layers``, which names the parts. Returns how many inputs were replaced."""
    n, made, sources = 0, {}, set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        for a in node.args[1:3]:
            part = _weight_slice(a)
            if part is None:
                continue
            if a not in made:
                src, dim, start, length, _, _ = part
                t = meta.tensor_attr(gm, src)
                piece = t.detach().narrow(dim, start, length).contiguous().clone()
                name = meta.add_tensor_attr(gm, f"{src.target}_{part[4]}", nn.Parameter(piece, t.requires_grad)
                                            if isinstance(t, nn.Parameter) else piece)
                with gm.graph.inserting_before(a):
                    new = gm.graph.get_attr(name)
                new.meta.update(src.meta)
                new.meta["val"] = a.meta["val"] if isinstance(a.meta.get("val"), torch.Tensor) else piece
                made[a] = new
                sources.add(src.target)
            node.replace_input_with(a, made[a])
            n += 1
    if n:
        gm.graph.eliminate_dead_code()
        read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
        for target in sources - read:
            delattr(gm, target)                 # the whole parameter: the graph reads only its parts now
        gm.recompile()
    return n


# --- 2b. ops with one canonical spelling -----------------------------------------------------------

def canonicalize_aliases(gm: fx.GraphModule) -> int:
    """``numpy_T`` (``x.T``) -> ``t`` (2-D) or ``permute``; ``chunk`` -> ``split`` (torch defines chunk as a
    split into pieces of ceil(size / chunks)) where the split dim's size is static; ``broadcast_to`` -> ``expand``
    (transformers < 5.25's Falcon keys; passes read repeated heads off expand); ``baddbmm`` -> add, mul and
    ``bmm``."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        new = None
        if node.target is aten.numpy_T.default and meta.shape(node.args[0]) is not None:
            ndim = len(meta.shape(node.args[0]))
            new = (aten.t.default, (node.args[0],)) if ndim <= 2 else \
                (aten.permute.default, (node.args[0], list(range(ndim))[::-1]))
        elif node.target is aten.chunk.default and meta.shape(node.args[0]) is not None:
            chunks = node.args[1] if len(node.args) > 1 else node.kwargs["chunks"]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            size = meta.shape(node.args[0])[dim]
            if isinstance(size, int) and isinstance(chunks, int) and size > 0:
                new = (aten.split.Tensor, (node.args[0], -(-size // chunks), dim))
        elif node.target is aten.broadcast_to.default:        # torch defines it as expand (-1 keeps a size)
            new = (aten.expand.default, tuple(node.args[:2]))
        elif node.target is aten.baddbmm.default:
            _expand_baddbmm(gm, node)
            n += 1
            continue
        if new is None:
            continue
        with gm.graph.inserting_before(node):
            repl = gm.graph.call_function(*new)
        repl.meta.update(node.meta)
        node.replace_all_uses_with(repl)
        gm.graph.erase_node(node)
        n += 1
    if n:
        gm.recompile()
    return n


def _expand_baddbmm(gm: fx.GraphModule, node: fx.Node) -> None:
    """baddbmm(c, a, b, beta, alpha) -> beta * c + alpha * bmm(a, b) (BLOOM's ALiBi scores; alpha * bmm(a, b) alone
    when beta is 0, where torch ignores c, NaN included). torch 2.13's fake
    kernel refuses a broadcast ``c`` with symbolic sizes, so shapes could not be propagated after a pass."""
    c, a, b = node.args[:3]
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    g, made = gm.graph, []
    with g.inserting_before(node):
        prod = g.call_function(aten.bmm.default, (a, b))
        made.append(prod)
        if alpha != 1:
            prod = g.call_function(aten.mul.Tensor, (prod, alpha))
            made.append(prod)
        if beta == 0:                   # torch ignores c then: its NaN and inf do not reach the result
            out = prod
        else:
            if beta != 1:
                c = g.call_function(aten.mul.Tensor, (c, beta))
                made.append(c)
            out = g.call_function(aten.add.Tensor, (c, prod))
            made.append(out)
    for new in made:                    # where it came from; shapes are propagated afterwards
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    node.replace_all_uses_with(out)
    g.erase_node(node)


# --- 3. no-ops --------------------------------------------------------------------------------------

_CONVERSIONS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    if t is aten.dropout.default:
        train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return (not train) or p == 0
    if t in _CONVERSIONS and isinstance(node.args[0], fx.Node):
        src, out = meta.dtype(node.args[0]), meta.dtype(node)
        return src is not None and src == out
    if t in (aten.alias.default, aten.detach_.default, aten.detach.default):
        return True                  # inference graphs carry no autograd state
    return False


def _unread_draw(node: fx.Node) -> bool:
    """A random draw nothing reads (transformers 5.17's wav2vec2 draws its LayerDrop coin in eval mode too): its
    one effect, advancing torch's generator, is no value of the graph. fx keeps such nodes (impure)."""
    return node.op == "call_function" and not node.users and \
        torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _is_empty_1d(a, gm: fx.GraphModule) -> bool:
    """A tensor operand statically of shape (0,): ``cat`` skips those (torch's legacy rule)."""
    if not isinstance(a, fx.Node):
        return False
    v = meta.val(a)
    if v is None and a.op == "get_attr":
        v = meta.tensor_attr(gm, a)
    if v is None and a.op == "call_function" and a.target is aten.lift_fresh_copy.default:
        return _is_empty_1d(a.args[0], gm)
    return isinstance(v, torch.Tensor) and tuple(v.shape) == (0,)


def _drop_empty_cat_inputs(gm: fx.GraphModule, node: fx.Node) -> bool:
    """cat([empty, x, ...]) -> cat([x, ...]); cat([x]) -> x. True when the node was erased."""
    tensors = node.args[0]
    kept = [a for a in tensors if not _is_empty_1d(a, gm)]
    if len(kept) == len(tensors) or not kept:
        return False
    if len(kept) == 1 and meta.shape(kept[0]) == meta.shape(node):
        node.replace_all_uses_with(kept[0])
        gm.graph.erase_node(node)
        return True
    node.args = (kept,) + tuple(node.args[1:])
    return False


def drop_noops(gm: fx.GraphModule) -> int:
    graph, n = gm.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            n += 1
        elif _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            n += 1
        elif _unread_draw(node):
            graph.erase_node(node)
            n += 1
        elif node.op == "call_function" and node.target is aten.cat.default and _drop_empty_cat_inputs(gm, node):
            n += 1
    if n:
        gm.recompile()
    return n


_ID_PATHS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
             aten.contiguous.default, aten.flatten.using_ints, aten.index.Tensor, aten.squeeze.dim,
             aten.unsqueeze.default, aten.expand.default}


def _plain_size(size, count: int) -> bool:
    """``size`` is the plain int ``count`` (a symbolic size compared with == would be guarded, and fixed, at the
    example's value)."""
    return type(size) is int and size == count


def _ids_below(n, count: int) -> bool:
    """``n`` holds indices < ``count``: the indices of a topk / max / argmax over a dim of that size, through
    views, gathers (``index``) and sorts of them."""
    for _ in range(32):
        if not isinstance(n, fx.Node) or n.op != "call_function":
            return False
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            src, i = n.args
            if src.target is aten.sort.default and i == 0:          # the ids sorted: still ids
                n = src.args[0]
                continue
            if i == 1 and src.target in (aten.topk.default, aten.max.dim):
                dim = src.args[2] if src.target is aten.topk.default and len(src.args) > 2 else \
                    src.kwargs.get("dim", -1) if src.target is aten.topk.default else src.args[1]
                shape = meta.shape(src.args[0])
                return shape is not None and _plain_size(shape[dim], count)
            return False
        if n.target is aten.argmax.default and len(n.args) > 1 and type(n.args[1]) is int:
            shape = meta.shape(n.args[0])
            return shape is not None and _plain_size(shape[n.args[1]], count)
        if n.target in _ID_PATHS:
            n = n.args[0]
            continue
        if n.target in (aten.cat.default, aten.concat.default):     # Phi-MoE: the ids of its two picks
            return all(_ids_below(a, count) for a in n.args[0])
        return False
    return False


def drop_expert_sentinel_masks(gm: fx.GraphModule) -> int:
    """transformers < 5.2x's grouped-GEMM experts zero the rows routed to a "sentinel" expert (an id >= the
    expert count, which only expert parallelism makes) on every call: ``masked_fill(x, (ids >= E)[..., None], 0)``
    around each GEMM. Without expert parallelism the ids come from a topk over the E experts, the mask is all
    False, and the fills only hide the experts' pattern from the MoE passes: drop them (and ``clamp(ids, max=E-1)``)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.masked_fill.Scalar and node.args[2] == 0:
            mask = node.args[1]
            if isinstance(mask, fx.Node) and mask.target is aten.unsqueeze.default:
                mask = mask.args[0]
            if isinstance(mask, fx.Node) and mask.target is aten.ge.Scalar and type(mask.args[1]) is int \
                    and _ids_below(mask.args[0], mask.args[1]):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                n += 1
        elif node.target is aten.clamp.default and len(node.args) == 3 and node.args[1] is None \
                and type(node.args[2]) is int and _ids_below(node.args[0], node.args[2] + 1):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return n


_NO_DROPOUT_OPS = {aten.scaled_dot_product_attention.default: 4, aten.dropout.default: 1,
                   aten.native_dropout.default: 1}


def _random_free(node: fx.Node) -> bool:
    """An op torch marks random (``_nondeterministic_seeded``) that draws nothing here: attention or dropout with
    a dropout probability of 0 (dropout also when not training)."""
    index = _NO_DROPOUT_OPS.get(node.target)
    if index is None:
        return False
    p = node.kwargs.get("dropout_p", node.kwargs.get("p")) if len(node.args) <= index else node.args[index]
    train = node.args[2] if node.target is aten.dropout.default and len(node.args) > 2 else \
        node.kwargs.get("train", True)
    if node.target is aten.scaled_dot_product_attention.default and p is None:
        p = 0.0                                          # (its default)
    return type(p) in (int, float) and p == 0 or train is False


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code`` that also drops unused attention (and dropout) whose dropout probability
    is 0: torch counts scaled_dot_product_attention as random, hence impure, whatever its dropout, so an unused
    one stayed, and with it every op it reads (the placeholder decoder run of an encoder-decoder model's encoder
    step: ``slimfx.seq2seq.EncodeStep``)."""
    return graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and not _random_free(n))


def canonicalize(gm: fx.GraphModule) -> dict[str, int]:
    """Bring a freshly captured graph to the canonical op set; returns counts per step."""
    from .propagate import propagate_meta
    counts = {"torch->aten": canonicalize_calls(gm)}
    counts["aliases"] = canonicalize_aliases(gm)
    counts.update(apply_rules(gm, LINEAR_RULES))
    if any("val" not in n.meta for n in gm.graph.nodes if n.op not in ("output", "placeholder")):
        if all("val" in p.meta for p in gm.graph.nodes if p.op == "placeholder"):
            propagate_meta(gm)
    counts["no-ops"] = drop_noops(gm)
    counts["expert sentinels"] = drop_expert_sentinel_masks(gm)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return counts
