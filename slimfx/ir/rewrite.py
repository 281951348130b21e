"""Local rewrites as data: a ``Rule`` is a named pattern and its replacement, both plain torch code.

    RULES = [
        Rule("gelu => gelu(tanh)", lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh")),
    ]
    n = apply_rules(gm, RULES)

A rule is traced when it is made (``fx.symbolic_trace``) and brought to the canonical ATen op set by the
same canonicalization that captured graphs get (``canonical.canonicalize``), with the call spelled as
torch.export records it: torch-level calls outside canonicalization's tables resolve to the ATen op of their
name (``torch.clamp`` -> ``aten.clamp.default``, ``torch.mean(x, -1)`` -> ``aten.mean.dim``), ``x.float()``
is ``aten.to.dtype``, backend flags are off (``layer_norm(.., cudnn_enable=False)``). So ``F.layer_norm`` in a
pattern matches the captured ``aten.layer_norm``, and a replacement puts ATen ops into the graph. A rule that
cannot be so written (a call with no ATen op, tensor indexing, a pattern with no op left) raises ``RuleError``
naming it. Matching and replacement are torch.fx's subgraph rewriter. Rule lists combine with ``+``.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters


class RuleError(ValueError):
    """A rule whose pattern or replacement cannot be written in the canonical ATen op set."""


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str                                   # what it does: "addmm(b, x, t(w)) => linear(x, w, b)"
    pattern: Callable
    replacement: Callable
    # optional filter(match, original_graph, pattern_graph) -> bool, as fx's rewriter takes it
    where: Optional[Callable] = None

    def __post_init__(self):            # traced once, here: a rule that could never work fails where it is written
        pattern, replacement = _trace(self.pattern, self.name, "pattern"), _trace(self.replacement, self.name,
                                                                                   "replacement")
        if not any(n.op == "call_function" for n in pattern.graph.nodes):
            raise RuleError(f"rule {self.name!r}: its pattern is no operation once canonicalized (an input, or "
                            f"ops captured graphs drop: dropout, detach, ...), so it could never match")
        n_in = [sum(n.op == "placeholder" for n in g.graph.nodes) for g in (pattern, replacement)]
        if n_in[0] != n_in[1]:
            raise RuleError(f"rule {self.name!r}: the pattern takes {n_in[0]} inputs and the replacement {n_in[1]}; "
                            f"they take the same ones")
        object.__setattr__(self, "_traced", (pattern, replacement))
        object.__setattr__(self, "_variants", _literal_variants(pattern))

    def traced(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        return self._traced

    def variants(self) -> list[tuple[fx.GraphModule, tuple[str, ...]]]:
        """The pattern with its number literals also spelled in the other type (``clamp(x, min=0)`` and
        ``clamp(x, min=0.0)``), each with the names of the nodes whose literal it flips: a graph records a
        literal as the model's code wrote it, and fx matches a literal by type and value. A variant matches only
        where those nodes' tensor operands are floating point, where the two spellings compute the same
        (``int_x * 1.0`` is float, ``int_x * 1`` int)."""
        return self._variants


_NUMBER_SLOTS = ("TensorType", "NumberType", "FloatType")      # x * 2.0 records 2.0 in mul.Tensor's Tensor slot
_MAX_VARIANT_LITERALS = 4                                      # 2^4 - 1 variants at most


def _literal_variants(pattern: fx.GraphModule) -> list[tuple[fx.GraphModule, tuple[str, ...]]]:
    """(variant, names of the nodes whose literal it flips) for each other spelling of the pattern's number
    literals (at most ``_MAX_VARIANT_LITERALS`` of them)."""
    slots = []
    for node in pattern.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = {a.name: a for a in node.target._schema.arguments}
        named = list(zip(node.target._schema.arguments, node.args)) + \
            [(schema[k], v) for k, v in node.kwargs.items() if k in schema]
        for i, (arg, v) in enumerate(named):
            typ = arg.type.getElementType() if arg.type.kind() == "OptionalType" else arg.type
            if type(v) in (int, float) and typ.kind() in _NUMBER_SLOTS and (type(v) is int or float(v).is_integer()):
                slots.append((node.name, arg.name, i < len(node.args), i))
    slots = slots[:_MAX_VARIANT_LITERALS]
    variants = []
    for flips in itertools.product((False, True), repeat=len(slots)):
        if not any(flips):
            continue
        gm = fx.GraphModule(pattern, copy.deepcopy(pattern.graph))
        nodes = {n.name: n for n in gm.graph.nodes}
        for (name, arg, positional, i), flip in zip(slots, flips):
            if flip:
                node = nodes[name]
                if positional:
                    v = node.args[i]
                    node.args = (*node.args[:i], float(v) if type(v) is int else int(v), *node.args[i + 1:])
                else:
                    v = node.kwargs[arg]
                    node.kwargs = {**node.kwargs, arg: float(v) if type(v) is int else int(v)}
        gm.recompile()
        variants.append((gm, tuple(sorted({name for (name, *_), flip in zip(slots, flips) if flip}))))
    return variants


def _float_operands(flipped: tuple[str, ...]) -> Callable:
    """A match filter: every tensor operand of the matched nodes whose literal the variant flips is floating
    point, where the two spellings compute the same (``int_x * 1.0`` is float, ``int_x * 1`` int; so is
    ``x.argmax(-1) * 2.0`` of a float x)."""
    def where(match, original_graph, pattern_graph) -> bool:
        by_name = {p.name: g for p, g in match.nodes_map.items()}
        for name in flipped:
            node = by_name.get(name)
            if node is None:
                return False
            for a in (*node.args, *node.kwargs.values()):
                if isinstance(a, fx.Node):
                    v = a.meta.get("val")
                    if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
                        return False
        return True
    return where


def _not_in(made: set) -> Callable:
    """A match filter: none of the matched operations is one this rule's replacements put into the graph (a
    variant would otherwise match what the rule just wrote, x * 2 => x * 2.0 twice)."""
    def where(match, original_graph, pattern_graph) -> bool:
        return not any(g in made for p, g in match.nodes_map.items() if p.op not in ("placeholder", "output"))
    return where


def _trace(fn: Callable, rule: str, role: str) -> fx.GraphModule:
    from . import canonical
    n_args = len(inspect.signature(fn).parameters)
    # a wrapper with named positional parameters, so lambdas and functions trace alike
    names = [f"a{i}" for i in range(n_args)]
    src = f"def _pattern({', '.join(names)}):\n    return fn({', '.join(names)})\n"
    scope = {"fn": fn}
    exec(src, scope)                                    # noqa: S102 - builds a fixed-arity wrapper
    try:
        gm = fx.symbolic_trace(scope["_pattern"])
    except Exception as e:                              # noqa: BLE001 - named with the rule below
        raise RuleError(f"rule {rule!r}: its {role} cannot be traced by torch.fx ({type(e).__name__}: {e}); "
                        f"a rule is straight-line torch code over its inputs") from e
    canonical.canonicalize_calls(gm)
    _to_aten(gm, rule, role)
    # None while canonical.py is imported: its own rules (LINEAR_RULES, built then) are written in ATen already
    canonicalize = getattr(canonical, "canonicalize", None)
    if canonicalize is not None:
        canonicalize(gm)
    return gm


# --- torch-level calls as torch.export records them ---------------------------------------------------

# arguments naming backends: export captures with them off (torch.export._trace._ignore_backend_decomps)
_BACKEND_FLAGS = ("cudnn_enable", "cudnn_enabled")


def _aten_packet(name: str):
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else None


def _fits(value, typ) -> bool:
    """Can ``value`` (a literal; a node fits anything, a placeholder being a wildcard, unless it is known to hold
    no tensor) be an argument of type ``typ`` (a schema type)?"""
    kind = typ.kind()
    if kind == "OptionalType":
        return value is None or _fits(value, typ.getElementType())
    if isinstance(value, fx.Node):      # a dtype node fits a dtype, not a tensor: x.to(h.dtype) is to.dtype
        held = _non_tensor(value)
        return held is None or (kind != "TensorType" and {"dtype": kind == "IntType",
                                                          "device": kind == "DeviceObjType"}.get(held, True))
    if kind == "ListType":
        elem = typ.getElementType()
        if isinstance(value, (list, tuple)):
            return all(_fits(v, elem) for v in value)
        return type(value) is int and elem.kind() in ("IntType", "SymIntType")     # int[1] dim=-1
    if kind in ("IntType", "SymIntType"):            # dtypes, layouts and memory formats are ints to the schema
        return (type(value) is int or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)))
    simple = {"FloatType": (int, float), "BoolType": (bool,), "NumberType": (int, float, bool),
              "StringType": (str,), "DeviceObjType": (torch.device, str)}
    if kind in simple:
        return isinstance(value, simple[kind]) and not (kind == "FloatType" and isinstance(value, bool))
    return kind not in ("TensorType",)


# attributes of a tensor that are no tensor (``getattr`` nodes of symbolic_trace carry no value to tell)
_NON_TENSOR_ATTRS = ("dtype", "device", "shape", "ndim", "layout")


def _non_tensor(node: fx.Node) -> Optional[str]:
    """What a node known to hold no tensor holds: "dtype" (``getattr(h, "dtype")``, a value torch.float32),
    "device", or "other" (a size, a shape); None when it may be a tensor."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and \
            node.args[1] in _NON_TENSOR_ATTRS:
        return node.args[1] if node.args[1] in ("dtype", "device") else "other"
    v = node.meta.get("val")
    if isinstance(v, (torch.dtype, torch.device)):
        return "dtype" if isinstance(v, torch.dtype) else "device"
    return None if v is None or isinstance(v, (torch.Tensor, list, tuple)) else "other"


def _bind(op, args: tuple, kwargs: dict) -> Optional[tuple[float, tuple, dict]]:
    """(misfit, args, kwargs) of a call of ``op`` with these arguments, spelled as export records it (positional
    as positional, ``int[]`` as a list), or None when they do not fit its schema. ``misfit`` counts the nodes
    given where the schema takes no tensor, and half for each int made a list: the lower, the likelier the
    overload."""
    params = op._schema.arguments
    positional = [p for p in params if not p.kwarg_only]
    if len(args) > len(positional):
        return None
    values = {p.name: v for p, v in zip(positional, args)}
    for k, v in kwargs.items():
        if k in values or all(p.name != k for p in params):
            return None
        values[k] = v
    misfit = 0
    for p in params:
        if p.name not in values:
            if not p.has_default_value():
                return None
            continue
        v = values[p.name]
        if not _fits(v, p.type):
            return None
        if isinstance(v, fx.Node) and "Tensor" not in str(p.type):
            misfit += 1
        typ = p.type.getElementType() if p.type.kind() == "OptionalType" else p.type
        if typ.kind() == "ListType" and type(v) is int:
            values[p.name] = [v]
            misfit += 0.5               # an exact int overload first: x.split(2) is split.Tensor, not split([2])
        elif isinstance(v, tuple):
            values[p.name] = list(v)
    last = max((i for i, p in enumerate(positional) if p.name in values), default=-1)
    out_args = tuple(values[p.name] if p.name in values else p.default_value for p in positional[:last + 1])
    out_kwargs = {p.name: values[p.name] for p in params if p.kwarg_only and p.name in values}
    return misfit, out_args, out_kwargs


# torch-level keyword names the ATen schemas spell otherwise (F.dropout's training= is aten.dropout's train=)
_SCHEMA_NAMES = {"input": "self", "training": "train"}


def _resolve(packet, args: tuple, kwargs: dict):
    """(overload, args, kwargs): the functional overload of ``packet`` these arguments fit best, or None."""
    kwargs = {k: v for k, v in kwargs.items() if not (k == "inplace" and v is False)}   # changes no value
    names = packet.overloads()
    best = None
    for name in sorted(names, key=lambda o: o != "default"):
        op = getattr(packet, name)
        if op._schema.is_mutable or any(a.is_out for a in op._schema.arguments):
            continue                                            # in-place and out= variants
        params = {a.name for a in op._schema.arguments}         # torch's input= is the schema's self (clamp),
        renamed = {(_SCHEMA_NAMES[k] if k in _SCHEMA_NAMES and k not in params and _SCHEMA_NAMES[k] in params
                    else k): v for k, v in kwargs.items()}      # unless the schema says input (layer_norm)
        bound = _bind(op, args, renamed)
        if bound is not None and (best is None or bound[0] < best[0][0]):
            best = (bound, op)
    return None if best is None else (best[1], best[0][1], best[0][2])


def aten_call(node: fx.Node) -> Optional[tuple]:
    """(overload, args, kwargs) of the ATen op a torch-level call (``torch.clamp``, ``x.clamp(max=..)``, an
    overload packet) stands for, the overload picked from its arguments; None when there is none."""
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverloadPacket):
        packet = target
    elif node.op == "call_method" and isinstance(target, str):
        packet = _aten_packet(target)
    elif node.op == "call_function" and getattr(target, "__module__", None) in _TORCH_MODULES and \
            not getattr(target, "__name__", "_").startswith(("_", "sym_")):     # size arithmetic stays Python's
        packet = _aten_packet(target.__name__)
    else:
        return None
    return _resolve(packet, node.args, node.kwargs) if packet is not None else None


# where torch-level functions live (builtins: torch.clamp is a builtin whose __module__ is "torch" or None)
_TORCH_MODULES = ("torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                  None)


def _to_aten(gm: fx.GraphModule, rule: str, role: str) -> None:
    """Every call an ATen (or other torch.ops) overload, spelled as export records it; RuleError otherwise."""
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            bound = _bind(target, node.args, node.kwargs)
            if bound is not None:
                node.args, node.kwargs = bound[1:]
            _backend_flags_off(node)
            continue
        if node.op == "call_function" and getattr(target, "__module__", None) in ("_operator", "operator"):
            index = node.args[1] if target is operator.getitem and len(node.args) > 1 else 0
            if target is operator.getitem and type(index) is int and _is_one_tensor(node.args[0]):
                node.target, node.args = torch.ops.aten.select.int, (node.args[0], 0, index)   # x[0], as export has it
                continue
            if target is not operator.getitem and any(_is_one_tensor(a) for a in node.args):
                raise RuleError(f"rule {rule!r}: its {role} applies Python's {target.__name__} to a tensor (node "
                                f"{node.name}: {node.format_node()}), which has no ATen op slimfx knows to spell it "
                                f"with: write the torch.ops.aten call captured graphs hold")
            if type(index) is not int:
                raise RuleError(f"rule {rule!r}: its {role} indexes a tensor (node {node.name}: {node.format_node()}"
                                f"); captured graphs spell that aten.slice.Tensor / aten.select.int / "
                                f"aten.index.Tensor: write those (torch.ops.aten...)")
            continue
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverloadPacket):
            what = str(target)
        elif node.op in ("call_function", "call_method"):
            name = target if node.op == "call_method" else getattr(target, "__name__", "")
            what = (f"the method .{target}()" if node.op == "call_method"
                    else f"{getattr(target, '__module__', '')}.{name}")
        else:
            what = f"{node.op} {target}"
        found = aten_call(node)
        if found is None:
            consequence = ("could never match a captured graph" if role == "pattern" else
                           "would leave it in the graph, where backends and save() take torch ops only")
            raise RuleError(f"rule {rule!r}: its {role} calls {what} (node {node.name}), which has no ATen op "
                            f"taking these arguments; captured graphs hold ATen ops, so the {role} {consequence}. "
                            f"Write it with torch.ops.aten.<op>.<overload> (or the ops it is made of)")
        node.op, (node.target, node.args, node.kwargs) = "call_function", found
        _backend_flags_off(node)
    gm.recompile()


def _is_one_tensor(node) -> bool:
    """A rule's input (a tensor), or a call whose one result is a tensor (not a tuple: ``split(x, 2)[0]``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    returns = getattr(node.target, "_schema", None) and node.target._schema.returns
    return bool(returns) and len(returns) == 1 and returns[0].type.kind() == "TensorType"


def _backend_flags_off(node: fx.Node) -> None:
    """``cudnn_enable`` & co. set False where left out: torch.export captures with the backends off, so a captured
    ``aten.layer_norm`` ends ``.., eps, False)``, and ``F.layer_norm`` never passes it."""
    params = node.target._schema.arguments
    for i, p in enumerate(params):
        if p.name not in _BACKEND_FLAGS or p.name in node.kwargs or (not p.kwarg_only and i < len(node.args)):
            continue
        if not p.kwarg_only and i == len(node.args):
            node.args = tuple(node.args) + (False,)
        else:
            node.kwargs = {**node.kwargs, p.name: False}


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule]) -> dict[str, int]:
    """Apply each rule, in order, to every non-overlapping match; returns {rule name: replacements}. The module's
    code is regenerated once at the end, when a rule matched (torch's replace_pattern regenerates it after every
    pattern, matched or not: ~70 ms each on a 32-layer model's graph, tens of times per Fuse)."""
    gm.recompile = lambda: None             # an instance attribute over GraphModule.recompile, removed below
    try:
        counts = _apply_rules(gm, rules)
    finally:
        del gm.recompile
    if counts:
        gm.graph.lint()
        gm.recompile()
    return counts


def _apply_rules(gm: fx.GraphModule, rules: Sequence[Rule]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rule in rules:
        pattern, replacement = rule.traced()
        filters = [rule.where] if rule.where else []
        done = replace_pattern_with_filters(gm, pattern, replacement, match_filters=filters or None)
        made = {n for r in done for n in r.replacements}
        for variant, flipped in rule.variants():
            if variant.code == replacement.code:      # x * 2 => x * 2.0: the spelling it writes is no match
                continue
            found = replace_pattern_with_filters(gm, variant, replacement,
                                                 match_filters=[*filters, _float_operands(flipped), _not_in(made)])
            made.update(n for r in found for n in r.replacements)
            done += found
        for replaced in done:
            _inherit_source(replaced)
        if done:
            counts[rule.name] = len(done)
    return counts


# where a node came from: the replacement of a match comes from the most specific module among the matched
# nodes (a fused linear + GELU from the linear's module, not the block that applies the GELU)
_SOURCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _inherit_source(replaced) -> None:
    anchor = replaced.nodes_map[replaced.anchor]             # ``anchor`` is the pattern's node
    matched = [anchor] + [g for p, g in replaced.nodes_map.items()
                          if p.op not in ("placeholder", "output") and g is not anchor]
    source = max(matched, key=lambda g: len(g.meta.get("nn_module_stack") or ()))
    for node in replaced.replacements:
        for key in _SOURCE_KEYS:
            if key in source.meta and key not in node.meta:
                node.meta[key] = source.meta[key]
