"""Capture a model into the slimfx IR: a torch.fx GraphModule in the canonical ATen op set.

``torch.export`` (non-strict) is the default: Hugging Face models of transformers 5.x go through it,
not through ``fx.symbolic_trace``. ``fx.symbolic_trace`` serves plain modules (method="symbolic_trace"
or as the fallback of method="auto"). Either way the result is canonicalized, its tensors are moved to
a flat attribute namespace (so a pass can replace one without touching the user's model), and every
node carries its shape and dtype in ``node.meta["val"]``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import operator
import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from . import meta
from .canonical import canonicalize, fold_weight_slices, fold_weight_transposes, name_layers
from .propagate import adopt_vals, propagate_meta, size_oblivious


class CaptureError(RuntimeError):
    """The model could not be captured; the message says why and what to try."""


@dataclasses.dataclass
class Captured:
    gm: fx.GraphModule
    method: str                      # "export" or "symbolic_trace"
    example_args: tuple
    example_kwargs: dict
    # dynamic dims: symbol name -> (min, max or None), as export's range constraints give them
    ranges: dict = dataclasses.field(default_factory=dict)


def _check_dynamic(dynamic) -> None:
    """``dynamic`` is None, True, False or export's dynamic_shapes (a dict or tuple of per-input specs:
    ``{0: Dim("batch")}``, ``(Dim.AUTO, None)``, nested as the inputs are); export checks the specs inside."""
    if dynamic is None or isinstance(dynamic, (bool, dict, tuple, list)):
        return
    raise CaptureError(f"dynamic must be True, False, None or torch.export's dynamic_shapes (a dict or tuple of "
                       f"per-input specs such as {{0: Dim('batch')}}), got {type(dynamic).__name__} {dynamic!r}")


def _wants_dynamic(dynamic) -> bool:
    """Does ``dynamic`` let some dim vary (True, or a spec naming a Dim or Dim hint)?"""
    if isinstance(dynamic, bool) or dynamic is None:
        return bool(dynamic)
    return any(leaf is not None and type(leaf) is not int for leaf in pytree.tree_leaves(dynamic))


def _dynamic_shapes(dynamic, args, kwargs):
    """Turn ``dynamic`` into export's dynamic_shapes: True marks every dim of every tensor input Dim.AUTO
    (export keeps a dim static where the model needs it); a dict or tuple is passed through."""
    if dynamic is None or dynamic is False:
        return None
    if dynamic is not True:
        return dynamic
    def spec(v):      # every tensor leaf, also inside lists, tuples and dicts of them
        if isinstance(v, (list, tuple, dict)):
            import torch.utils._pytree as pytree
            return pytree.tree_map(spec, v) if any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v)) \
                else None
        return {d: Dim.AUTO for d in range(v.dim())} if isinstance(v, torch.Tensor) else None
    return (tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}) if kwargs else tuple(spec(a) for a in args)


def made_in_inference_mode(model: torch.nn.Module) -> bool:
    """Does ``model`` hold inference tensors (made under torch.inference_mode)? It runs there: outside it, torch
    refuses to set requires_grad on them (torch.export does) or to write into them (a forward's buffers)."""
    return any(t.is_inference() for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run the inference graph (no dropout) and give back every submodule in the mode it came in: restoring
    with ``model.train(mode)`` would set one mode on all of them (GPT-2's dropout switched on in a model the
    user had put in eval mode, when it was wrapped in a module still in training mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _export(model, args, kwargs, dynamic) -> fx.GraphModule:
    ds = _dynamic_shapes(dynamic, args, kwargs)
    if ds is not None and kwargs and isinstance(ds, tuple) and len(ds) == 2 and isinstance(ds[1], dict):
        # export wants dynamic_shapes keyed like forward's signature: merge positional and keyword specs
        import inspect
        params = inspect.signature(model.forward).parameters
        names = list(params)
        var_kw = [n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
        extra = [k for k in ds[1] if k not in params]
        if var_kw and extra:
            # torch.export (2.13) fails matching dynamic shapes inside **kwargs ("Must provide a tree_name")
            raise ValueError(f"{type(model).__name__}.forward takes {extra} only through **{var_kw[0]}, where "
                             f"torch.export cannot mark dynamic shapes: leave {extra} out of the call (GraniteMoE "
                             f"reads use_cache from its config), or compile with dynamic=False")
        merged = {names[i]: s for i, s in enumerate(ds[0])}
        merged.update(ds[1])
        ds = merged
    from .propagate import math_sdpa
    with size_oblivious(ds is not None), math_sdpa():
        ep = torch.export.export(model, tuple(args), kwargs=kwargs or None, dynamic_shapes=ds, strict=False)
        if _mutates(ep.graph):
            # in-place ops (Falcon's ``mlp_output += attention_output``): export's own functionalization,
            # which keeps every other op as it is (an empty decomposition table)
            ep = ep.run_decompositions({})
    ranges = {str(sym): (_as_int(r.lower) or 0, _as_int(r.upper)) for sym, r in ep.range_constraints.items()}
    return ep.module(), ranges


# in-place ops canonicalization drops by itself (inference graphs carry no autograd state)
_DROPPED_MUTATIONS = {"aten::detach_"}


def _mutates(graph: fx.Graph) -> bool:
    """Does the graph hold an op that writes into one of its operands?"""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.is_mutable and schema.name not in _DROPPED_MUTATIONS:
            return True
    return False


def _as_int(bound):
    """A sympy range bound as an int; None when unbounded (int_oo)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _symbolic_trace(model, args, kwargs) -> fx.GraphModule:
    if kwargs:
        raise CaptureError("fx.symbolic_trace takes positional example inputs only; pass example_inputs as a tuple")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    versions = {k: t._version for k, t in tensors.items() if not t.is_inference()}  # (inference tensors: none)
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    concrete = _defaults_not_given(model, len(args))
    gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    _drop_concrete_placeholders(gm, len(args))
    written = [k for k, t in tensors.items() if (t._version != versions[k] if k in versions else
                                                   k in buffers and not torch.equal(t, buffers[k]))]
    with torch.no_grad():
        for k in written:
            if k in buffers:           # put back what the trace wrote (a parameter written in forward is rarer)
                tensors[k].copy_(buffers[k])
    # a write whose value the trace could not compute (``self.mean.add_(x)``): a node on a constant
    written += [n.args[0].target for n in gm.graph.nodes if n.op in ("call_method", "call_function")
                and str(getattr(n.target, "__name__", n.target)).endswith("_") and n.args
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]
    if written:
        raise CaptureError(f"{type(model).__name__}.forward writes into its tensors {sorted(set(written))[:5]}: "
                           f"fx.symbolic_trace runs such writes once while tracing (or records them on a "
                           f"constant), so its graph would not hold them; capture with {_SAY['export']}, which "
                           f"keeps them as the compiled model's own state")
    return gm


def _defaults_not_given(model, n_args: int) -> dict:
    """The defaults of the forward's parameters the call leaves out (``forward(x, mask=None)`` called with x):
    fx.symbolic_trace takes them as constants (its concrete_args), so the graph's inputs are the call's."""
    P = inspect.Parameter
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind is P.VAR_POSITIONAL for p in params[:n_args + 1]):
        return {}
    concrete = {}
    for p in params[n_args:]:
        if p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) or p.default is P.empty:
            continue
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(p.default)):
            raise CaptureError(f"{type(model).__name__}.forward's parameter {p.name!r} defaults to a tensor, which "
                               f"fx.symbolic_trace cannot hold as a constant: give it in the example inputs, or "
                               f"capture with {_SAY['export']}")
        concrete[p.name] = p.default
    return concrete


def _drop_concrete_placeholders(gm: fx.GraphModule, n_args: int) -> None:
    """fx keeps an input for each concrete argument, and a node asserting it has that value (``_assert_is_none``,
    ``torch._assert(x == 2.0)``): the call gives no such input, so the input and its check go."""
    from torch.fx._symbolic_trace import _assert_is_none
    graph = gm.graph
    for p in [n for n in graph.nodes if n.op == "placeholder"][n_args:]:
        for user in list(p.users):
            if user.target is _assert_is_none:
                graph.erase_node(user)
            elif user.target is operator.eq and all(u.target is torch._assert for u in user.users):
                for check in list(user.users):
                    graph.erase_node(check)
                graph.erase_node(user)
        if not p.users:
            graph.erase_node(p)
    gm.recompile()


def _flatten_attributes(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule whose tensors live in one flat namespace (``encoder_layer_0_..._weight``),
    each get_attr node remembering the parameter's name in the user's model."""
    root: dict[str, Any] = {}
    views: dict[int, torch.nn.Parameter] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr":
            fqn = node.target
            tensor = gm.get_parameter(fqn) if _is_param(gm, fqn) else _get(gm, fqn)
            if isinstance(tensor, torch.nn.Parameter) and tensor.is_inference() and tensor.requires_grad:
                # made under torch.inference_mode: outside it, autograd refuses even reads of a tensor that
                # requires grad (torch.isfinite); the graph's view of it (same memory, once) asks for none
                tensor = views.setdefault(id(tensor), torch.nn.Parameter(tensor.detach(), requires_grad=False))
            flat = meta.attr_name(fqn, "p_")
            while flat in root and root[flat] is not tensor:
                flat += "_"
            root[flat] = tensor
            node.target = flat
            meta.set_param_name(node, fqn)
        elif node.op == "call_module":
            root[node.target] = gm.get_submodule(node.target)
    new = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    return new


def _is_param(gm, fqn):
    try:
        gm.get_parameter(fqn)
        return True
    except AttributeError:
        return False


def _get(gm, fqn):
    obj = gm
    for part in fqn.split("."):
        obj = getattr(obj, part)
    return obj


def capture(model: torch.nn.Module, args: tuple = (), kwargs: Optional[dict] = None, *,
            dynamic=None, method: str = "auto") -> Captured:
    """Capture ``model`` called as ``model(*args, **kwargs)``.

    dynamic: None (static shapes), True (every tensor dim may vary; export keeps a dim static where the
             model needs it) or export's ``dynamic_shapes`` structure.
    method:  "export", "symbolic_trace", or "auto" (export, then symbolic_trace for plain modules).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"slimfx captures torch.nn.Module objects, got {type(model).__name__}")
    if method not in ("auto", "export", "symbolic_trace"):
        raise CaptureError(f"capture method must be 'auto', 'export' or 'symbolic_trace', got {method!r}")
    _check_dynamic(dynamic)
    if method == "symbolic_trace" and _wants_dynamic(dynamic):
        raise CaptureError(f"capture method 'symbolic_trace' cannot keep dims dynamic (dynamic={dynamic!r}): "
                           f"fx.symbolic_trace fixes every dim at the example's size; capture with "
                           f"{_SAY['export']} (or 'auto') to let dims vary, or with dynamic=False")
    args, kwargs = _unaliased(tuple(args), dict(kwargs or {}))
    errors, ranges = [], {}
    name = type(model).__name__
    # a model made under torch.inference_mode holds inference tensors, which torch.export cannot trace outside
    # it (it sets requires_grad on them): the capture runs in inference mode, as such a model is called
    inference = not torch.is_inference_mode_enabled() and made_in_inference_mode(model)
    with eval_mode(model), torch.no_grad(), torch.inference_mode() if inference else contextlib.nullcontext():
        if method in ("auto", "export"):
            try:
                gm, ranges = _export(model, args, kwargs, dynamic)
                used = "export"
            except Exception as e:          # noqa: BLE001 - reported below with the reason
                errors.append(("torch.export", e))
                gm = None
        else:
            gm = None
        if gm is None and method == "auto" and _wants_dynamic(dynamic):
            # a static graph would accept only the example's shapes, and the first other call would fail
            # telling the user to pass the dynamic= they passed: refused here, with export's reason
            errors.append(("fx.symbolic_trace", CaptureError(
                f"not tried: it cannot keep dims dynamic, and dynamic={dynamic!r} asks for that; fix the "
                f"torch.export error, or compile with dynamic=False to take the symbolic_trace path")))
            raise CaptureError(_explain(name, errors, dynamic)) from errors[0][1]
        if gm is None and method in ("auto", "symbolic_trace"):
            try:
                gm = _symbolic_trace(model, args, kwargs)
                used = "symbolic_trace"
            except Exception as e:          # noqa: BLE001
                errors.append(("fx.symbolic_trace", e))
                gm = None
    if gm is None:
        raise CaptureError(_explain(name, errors, dynamic)) from errors[-1][1]
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)         # export's own input guards; slimfx checks inputs itself
    if used == "export":
        with torch.inference_mode() if inference else contextlib.nullcontext():     # where export traced
            adopt_vals(gm)                # export's vals, from its trace: later propagations rerun what changed
    if used == "symbolic_trace":
        try:
            propagate_meta(gm, args)      # canonicalization reads shapes (tensor or int operands)
        except Exception as e:            # noqa: BLE001 - e.g. a list of tensors as one placeholder
            errors.append(("fx.symbolic_trace (propagating shapes)", e))
            raise CaptureError(_explain(name, errors, dynamic)) from e
    graph = gm.graph
    try:
        with torch.inference_mode() if inference else contextlib.nullcontext():   # (its writes into them too)
            canonicalize(gm)
        gm = _flatten_attributes(gm)
        fold_weight_transposes(gm)
        name_layers(gm)
        fold_weight_slices(gm)
    except Exception as e:                # noqa: BLE001 - named with the method and the node below
        how = {"export": "torch.export", "symbolic_trace": "fx.symbolic_trace"}[used]
        node = _failing_node(e, graph)
        at = f" at node {node.format_node()}" if node is not None else ""
        errors.append((f"{how} (canonicalizing its graph{at})", e))
        raise CaptureError(_explain(name, errors, dynamic, hints=[
            f"  - the {how} graph holds a call slimfx cannot bring to its ATen op set (the node above): "
            f"please report it"] + ([
            f"  - capture with {_SAY['export']} (fix its error above): its graph is in ATen already"]
            if used == "symbolic_trace" else []))) from e
    return Captured(gm, used, args, kwargs, ranges)


def _failing_node(e: BaseException, graph: fx.Graph) -> Optional[fx.Node]:
    """The node of ``graph`` being handled where ``e`` was raised: the innermost frame with a ``node`` local
    (fx's Interpreter, canonicalization's loops)."""
    tb, frames = e.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        node = frame.f_locals.get("node")
        if isinstance(node, fx.Node) and node.graph is graph:
            return node
    return None


def _unaliased(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs with any tensor that shares storage with an earlier one replaced by a copy: given
    ``model(x, x)``, torch.export captures a graph that reads one placeholder for both (the first argument's
    uses read the second), which is wrong for any other call."""
    import torch.utils._pytree as pytree
    seen = set()

    def own(t):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return t
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            return t.clone()
        seen.add(key)
        return t
    return pytree.tree_map(own, (args, kwargs))


# how to ask for a capture method: slimfx.compile's keyword is capture=, slimfx.capture's (and ir.capture's) method=
_SAY = {m: f"capture='{m}' (slimfx.capture: method='{m}')" for m in ("export", "symbolic_trace")}


def _explain(name, errors, dynamic, hints: Optional[list] = None) -> str:
    lines = [f"could not capture {name}:"]
    for how, e in errors:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" (at {where.filename}:{where.lineno})" if where else ""
        lines.append(f"  {how}: {type(e).__name__}: {first}{at}")
    if all(isinstance(e, CaptureError) for _, e in errors):
        return "\n".join(lines)          # slimfx's own refusals say what to do
    lines.append("what to try:")
    if hints:
        return "\n".join(lines + hints)
    if any("Cache" in str(e) for _, e in errors):
        lines.append("  - the model returns a KV-cache object: pass use_cache=False with the example inputs")
    lines.append("  - data-dependent Python control flow: rewrite it with torch.cond, or pass the deciding "
                 "values as constants (fx.symbolic_trace's concrete_args)")
    lines.append("  - an untraceable submodule: make it a leaf (fx.Tracer.is_leaf_module) and capture with "
                 + _SAY["symbolic_trace"] + (" and dynamic=False" if _wants_dynamic(dynamic) else ""))
    if _wants_dynamic(dynamic):
        lines.append("  - a dimension the model specializes (e.g. size 1 or a fixed length): drop dynamic=True "
                     "or give export's dynamic_shapes for the dims that really vary")
    lines.append(f"  - Hugging Face models: capture with {_SAY['export']} (the default); transformers 5.x "
                 "does not support fx.symbolic_trace")
    return "\n".join(lines)
