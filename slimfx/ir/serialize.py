"""The IR as JSON + tensors, and back: how a compiled graph is saved without pickle.

``to_json(gm)`` gives JSON-able data (nodes, their arguments, the metadata slimfx writes, the call
convention as pytree specs, the symbolic input dims with their ranges) and the tensors the graph reads,
by attribute name, for safetensors. ``from_json`` rebuilds the GraphModule, rebuilds every node's shape
and dtype by propagation from the inputs (fresh symbols, the saved ranges) and verifies the graph: a file
that does not describe a sound graph is refused with the node at fault.

Call targets are resolved by name, never by unpickling: ops as ``torch.ops.<ns>.<op>.<overload>``
(the slimfx dialect registers itself on import; another library's ops need it imported first), Python
functions as ``module:qualname`` from a short list (operator's functions of values, math, torch.sym_*: what
capture leaves in graphs), so a file cannot make a graph call anything that reaches files, processes or code
(operator's attrgetter and call could: a file that chained them ran a shell command at load).
"""
from __future__ import annotations

import importlib
import json
import keyword
import math
import operator  # noqa: F401 - resolvable targets live here
import re
import sys

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from . import meta
from .verify import output_signature, verify

FORMAT = 1
# modules a file may name (for call targets and output types) that load imports itself; any other module must
# already be imported by the caller (importing runs its code, so a file must not pick arbitrary ones)
IMPORTABLE = ("torch", "operator", "math", "builtins", "slimfx", "transformers")
_KEPT_META = ("slimfx_param",)
SAFE_BUILTINS = ("abs", "min", "max", "round", "int", "float", "bool", "len", "pow", "divmod")
# operator's functions of values (what capture leaves: getitem, symbolic size arithmetic, comparisons); not the
# ones that return or call callables (attrgetter, methodcaller, call) or write (setitem, delitem, the i* ops)
SAFE_OPERATORS = ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                  "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge",
                  "truth", "is_", "is_not", "index", "matmul", "contains")
# public torch.Tensor methods a saved graph may not call: they take callables (hooks, apply_/map_), leave torch
# (numpy(), storages) or run autograd hooks
UNSAFE_METHODS = ("apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward",
                  "numpy", "storage", "untyped_storage", "set_", "share_memory_")


class FormatError(ValueError):
    """A saved graph cannot be read back; the message names the node or field and why."""


# --- arguments ------------------------------------------------------------------------------------------

def _enc(a, where: str):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x, where) for x in a]}
    if isinstance(a, list):
        return [_enc(x, where) for x in a]
    if isinstance(a, dict):
        if not all(isinstance(k, str) for k in a):
            raise FormatError(f"{where}: a dict argument with non-string keys cannot be saved: {a!r}")
        return {"dict": {k: _enc(v, where) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start, where), _enc(a.stop, where), _enc(a.step, where)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    raise FormatError(f"{where}: an argument of type {type(a).__name__} ({a!r}) cannot be saved")


def _torch_attr(kind: str, name: str, where: str):
    v = getattr(torch, name, None)
    expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[kind]
    if not isinstance(v, expected):
        raise FormatError(f"{where}: unknown {kind} {name!r}")
    return v


def _dec(a, env: dict, where: str):
    if isinstance(a, list):
        return [_dec(x, env, where) for x in a]
    if not isinstance(a, dict):
        return a
    if len(a) != 1:
        raise FormatError(f"{where}: malformed argument {a!r}")
    (kind, v), = a.items()
    if kind == "node":
        if v not in env:
            raise FormatError(f"{where}: refers to node {v!r} before it is defined")
        return env[v]
    if kind == "tuple":
        return tuple(_dec(x, env, where) for x in v)
    if kind == "dict":
        return {k: _dec(x, env, where) for k, x in v.items()}
    if kind == "float":
        return float(v)
    if kind in ("dtype", "layout", "memory_format"):
        return _torch_attr(kind, v, where)
    if kind == "device":
        return torch.device(v)
    if kind == "slice":
        return slice(*(_dec(x, env, where) for x in v))
    if kind == "ellipsis":
        return Ellipsis
    raise FormatError(f"{where}: unknown argument kind {kind!r}")


def plain(x):
    """Metadata as strict JSON: non-finite floats (an exact layer's SQNR is inf) become {"float": "inf"}."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"float": repr(x)}
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def unplain(x):
    if isinstance(x, dict):
        if len(x) == 1 and x.get("float") in ("inf", "-inf", "nan"):
            return float(x["float"])
        return {k: unplain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unplain(v) for v in x]
    return x


# --- call targets -----------------------------------------------------------------------------------------

def _target_name(target, where: str) -> str:
    if isinstance(target, str):                    # get_attr / call_method / placeholder / output
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return "torch.ops." + str(target)         # aten.linear.default, or a packet's aten.linear
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module is None and type(target).__name__ == "builtin_function_or_method":
        module = "builtins"
    module = {"_operator": "operator"}.get(module, module)
    if not module or not qualname or not _callable(module, qualname):
        raise FormatError(f"{where}: the call target {target!r} cannot be saved: a saved graph calls torch ops, "
                          f"operator.* and math.* functions and torch.sym_* (register a custom op with "
                          f"torch.library for anything else)")
    return f"{module}:{qualname}"


def _module(name: str, where: str):
    """An output type's module, imported if a file may name it (importing runs a module's code, so a file
    cannot make slimfx import just any)."""
    if name in sys.modules:
        return sys.modules[name]
    if name.split(".")[0] not in IMPORTABLE:
        raise FormatError(f"{where}: needs module {name!r}; import it before loading (a file only makes slimfx "
                          f"import modules of {IMPORTABLE})")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise FormatError(f"{where}: needs module {name!r}, which cannot be imported: {e}") from e


def _callable(module: str, name: str) -> bool:
    """Which Python functions a loaded graph may call: what capture leaves in graphs (getitem, symbolic
    size arithmetic), nothing that reaches files, processes or code."""
    if module == "operator":
        return name in SAFE_OPERATORS
    if module == "math":
        return not name.startswith("_") and callable(getattr(math, name, None))
    if module == "builtins":
        return name in SAFE_BUILTINS
    return module == "torch" and (name.startswith(("sym_", "_sym_", "_check", "_assert")))


def _tensor_method(name: str, where: str) -> None:
    if not isinstance(name, str) or name.startswith("_") or not hasattr(torch.Tensor, name) or \
            name in UNSAFE_METHODS:
        raise FormatError(f"{where}: a saved graph may call public torch.Tensor methods, not {name!r}")


# op namespaces outside aten and slimfx that captured graphs hold, and the module of a known library that
# registers them (a fixed table: a file names a namespace, never what to import)
OP_LIBRARIES = {"transformers": "transformers.integrations.moe"}    # grouped_mm_fallback: MoE experts


def _op(name: str):
    obj = torch.ops
    for part in name.removeprefix("torch.ops.").split("."):
        obj = getattr(obj, part)
    return obj


def _resolve(name: str, where: str):
    if name.startswith("torch.ops."):
        library = OP_LIBRARIES.get(name.removeprefix("torch.ops.").split(".")[0])
        try:
            try:
                obj = _op(name)
            except (AttributeError, RuntimeError):
                if library is None:
                    raise
                importlib.import_module(library)            # registers the op, then look again
                obj = _op(name)
        except (AttributeError, RuntimeError, ImportError) as e:
            raise FormatError(f"{where}: op {name} is not registered in this process (import the library that "
                              f"defines it before loading)") from e
        if not isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise FormatError(f"{where}: {name} is not an op")
        return obj
    module, _, qualname = name.partition(":")
    if not _callable(module, qualname):
        raise FormatError(f"{where}: a loaded graph may call torch ops, operator.* and math.* functions and "
                          f"torch.sym_*; not {name!r}")
    obj = getattr(sys.modules.get(module) or importlib.import_module(module), qualname, None)
    if not callable(obj):
        raise FormatError(f"{where}: {name} is not a function of this Python")
    return obj


# --- metadata ---------------------------------------------------------------------------------------------

def _val_spec(v, symbols: dict, where: str):
    """A placeholder's value as data: a tensor's dtype and shape (symbols by name), or a literal."""
    if isinstance(v, torch.Tensor):
        shape = []
        for d in v.shape:
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                if expr.is_number:                          # specialized while tracing (a Linear's K)
                    shape.append(int(expr))
                    continue
                if not expr.is_symbol:                      # BLOOM's attention mask: cache + new tokens
                    shape.append(_sum_spec(d, symbols, where))
                    continue
                symbols.setdefault(str(expr), {"hint": example_hint(d)})
                shape.append(str(expr))
            else:
                shape.append(int(d))
        return {"tensor": {"dtype": str(v.dtype).removeprefix("torch."), "shape": shape}}
    return {"literal": _enc(v, where)}


def _sum_spec(d: torch.SymInt, symbols: dict, where: str) -> dict:
    """An input dim that export ties to others as a sum (``s63 + s70``: an attention mask as long as the cache
    and the new tokens together) as {"sum": [[coefficient, symbol], ...], "const": c}; its symbols get hints as
    plain dims do. Only integer linear sums are data; anything else (a product, a division) is refused."""
    expr = d.node.expr
    const, terms = expr.as_coeff_add()
    out = []
    for term in terms:
        coef, sym = term.as_coeff_Mul()
        hint = _example_hints(d.node.shape_env).get(str(sym), d.node.shape_env.var_to_val.get(sym))
        if not (sym.is_symbol and coef.is_integer and hint is not None):
            raise FormatError(f"{where}: input dim {d} is an expression other than a sum of symbols times "
                              f"integers")
        symbols.setdefault(str(sym), {"hint": int(hint)})
        out.append([int(coef), str(sym)])
    if not const.is_integer:
        raise FormatError(f"{where}: input dim {d} is an expression other than a sum of symbols times integers")
    return {"sum": out, "const": int(const)}


def _sum_dim(d: dict, made: dict):
    """The dim ``_sum_spec`` saved, over the loaded symbols ``made`` (KeyError: a symbol not among them)."""
    if not (set(d) == {"sum", "const"} and isinstance(d["const"], int) and isinstance(d["sum"], list) and d["sum"]
            and all(isinstance(t, list) and len(t) == 2 and isinstance(t[0], int) and isinstance(t[1], str)
                    for t in d["sum"])):
        raise TypeError(f"a dim must be an int, a symbol or {{'sum': [[int, symbol], ...], 'const': int}}, "
                        f"got {d!r:.80}")
    total = d["const"]
    for coef, name in d["sum"]:
        total = total + coef * made[name]
    return total


def _node_meta(node: fx.Node) -> dict:
    out = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
    info = node.meta.get("slimfx")
    if isinstance(info, meta.NodeInfo):
        # not the kernel: what a backend chose on one device is chosen again by the backend that loads it
        out["slimfx"] = plain({k: v for k, v in vars(info).items() if v is not None and k != "kernel"})
    stack = node.meta.get("nn_module_stack")
    if stack:
        out["nn_module_stack"] = {k: [path, t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"]
                                  for k, (path, t) in stack.items()}
    return out


# --- save -------------------------------------------------------------------------------------------------

def to_json(gm: fx.GraphModule, ranges: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(data, tensors): the graph as JSON-able data, and the tensors it reads by attribute name.
    ``ranges``: symbol name -> (min, max or None) of the dynamic input dims (capture's range constraints)."""
    symbols: dict = {}
    nodes, tensors = [], {}
    for n in gm.graph.nodes:
        where = f"node {n.name} ({n.op} {n.target})"
        if n.op == "call_module":
            raise FormatError(f"{where}: a call to module {type(gm.get_submodule(n.target)).__name__} cannot be "
                              f"saved as data; capture with torch.export or make the module's forward traceable")
        if n.op == "call_method":
            _tensor_method(n.target, where)
        entry = {"name": n.name, "op": n.op, "target": _target_name(n.target, where),
                 "args": _enc(list(n.args), where), "kwargs": _enc(dict(n.kwargs), where)["dict"],
                 "meta": _node_meta(n)}
        if n.op == "placeholder":
            entry["val"] = _val_spec(n.meta.get("val"), symbols, where)
        elif n.op == "get_attr":
            t = getattr(gm, n.target)
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{where}: get_attr reads a {type(t).__name__}, not a tensor")
            tensors[n.target] = t
            entry["tensor"] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}   # checked at load
        nodes.append(entry)
    for name, r in (ranges or {}).items():
        if name in symbols:
            symbols[name]["min"], symbols[name]["max"] = r
    info = getattr(gm.graph._codegen, "pytree_info", None)
    codegen = None if info is None else {
        "orig_args": list(info.orig_args),
        "in_spec": None if info.in_spec is None else pytree.treespec_dumps(info.in_spec),
        "out_spec": None if info.out_spec is None else pytree.treespec_dumps(info.out_spec)}
    data = {"format": FORMAT, "class_name": type(gm).__name__, "nodes": nodes, "codegen": codegen,
            "symbols": symbols, "outputs": [[list(s) if s else s, str(d).removeprefix("torch.") if d else d]
                                            for s, d in output_signature(gm)]}
    return data, tensors


# --- load -------------------------------------------------------------------------------------------------

def read_json(file, where: str, keys) -> dict:
    """The JSON object in ``file`` holding every one of ``keys``, or a FormatError starting with ``where``."""
    import pathlib
    try:
        data = json.loads(pathlib.Path(file).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(f"{where} is not UTF-8 text, so not JSON slimfx wrote ({e})") from e
    except json.JSONDecodeError as e:
        raise FormatError(f"{where} is not valid JSON: {e}") from e
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else ["everything"]
    if missing:
        raise FormatError(f"{where} lacks {missing} (is it a file slimfx saved?)")
    return data


def load_spec(text: str | None, where: str):
    """A pytree spec from ``treespec_dumps``; the modules of the types it names imported if a file may name them."""
    if text is None:
        return None
    for t in re.findall(r'"type": "([\w.]+)\.\w+"', text):      # output types (e.g. transformers' ModelOutput)
        _module(t, where)                                       # register their pytree nodes by importing them
    try:
        return pytree.treespec_loads(text)
    except Exception as e:  # noqa: BLE001 - re-raised with the field named
        raise FormatError(f"{where}: cannot read the pytree spec: {e}") from e


def example_hint(d) -> int:
    """A dynamic dim's size in the example inputs: its hint, or, for a loaded symbol that load started from 2,
    the example's size saved with it."""
    return int(_example_hints(d.node.shape_env).get(str(d.node.expr), d.node.hint))


def _example_hints(env) -> dict:
    """{symbol name: example size} for the symbols load started from another size than the example's."""
    return getattr(env, "slimfx_example_hints", {})


def _inputs(data: dict, placeholders: list) -> tuple[list, dict]:
    """Fake values of the placeholders: fresh symbols (with the saved hints and ranges) for dynamic dims.
    Returns them and the rename old symbol name -> new one."""
    env = ShapeEnv(specialize_zero_one=False)   # a hint of 1 (a batch-1 example) stays a symbol, as captured
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    made, rename = {}, {}
    for name, s in data["symbols"].items():
        try:
            hint, lo = int(s["hint"]), int(s.get("min") or 0)
            hi = sys.maxsize - 1 if s.get("max") is None else int(s["max"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"symbol {name}: hint, min and max must be integers ({type(e).__name__}: {e})") from e
        if not 0 <= lo <= hint <= hi:        # (torch's own checks fail with a bare AssertionError)
            raise FormatError(f"symbol {name}: needs 0 <= min <= hint <= max, got min {lo}, hint {hint}, max {hi}")
        example = hint
        if hint < 2 <= hi and lo <= 2:
            # propagate with a hint that takes no size-0/1 branch (transformers 5.17's batched rotary matmul
            # guards batch == 1 and made the dim a static 1 on load); the example's stays for what reads it
            hint = 2
        sym = env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        if example != hint:
            env.slimfx_example_hints = {**_example_hints(env), str(sym): example}
        env.constrain_symbol_range(sym, compiler_min=lo, compiler_max=hi)
        made[name] = env.create_symintnode(sym, hint=hint)
        rename[name] = str(sym)
    vals = []
    for p, spec in placeholders:
        where = f"input {p.name}"
        if "tensor" in spec:
            t = spec["tensor"]
            try:
                shape = [made[d] if isinstance(d, str) else _sum_dim(d, made) if isinstance(d, dict) else int(d)
                         for d in t["shape"]]
            except KeyError as e:
                raise FormatError(f"{where}: dim {e} is not among the saved symbols") from e
            except TypeError as e:
                raise FormatError(f"{where}: {e}") from e
            with mode:
                vals.append(torch.empty(shape, dtype=_torch_attr("dtype", t["dtype"], where)))
        else:
            vals.append(_dec(spec.get("literal"), {}, where))
    return vals, rename


def _identifier(s, where: str, what: str, dotted: bool = False) -> None:
    """fx writes names into the Python code it generates and runs: each must be a plain identifier (a
    crafted one, "x=__import__('os')...", would otherwise run when the code is compiled)."""
    parts = s.split(".") if dotted and isinstance(s, str) else [s]
    if not all(isinstance(p, str) and p.isidentifier() and not keyword.iskeyword(p) and not p.startswith("__")
               for p in parts):
        raise FormatError(f"{where}: {what} {s!r} is not a Python identifier")


def from_json(data: dict, tensors: dict[str, torch.Tensor]) -> tuple[fx.GraphModule, dict]:
    """The GraphModule ``to_json`` described, every node's shape and dtype propagated and the graph verified.
    Returns it and the dynamic dims' ranges under their new symbol names."""
    if not isinstance(data, dict):
        raise FormatError(f"the graph is {type(data).__name__}, not an object of nodes")
    if data.get("format") != FORMAT:
        raise FormatError(f"graph format {data.get('format')!r} is not the one this slimfx reads ({FORMAT})")
    graph = fx.Graph()
    env: dict = {}
    placeholders = []
    for entry in data["nodes"]:
        name, op = entry["name"], entry["op"]
        where = f"node {name} ({op} {entry['target']})"
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "output"):
            raise FormatError(f"{where}: unknown node kind {op!r}")
        _identifier(name, where, "the node name")
        if op in ("placeholder", "get_attr"):
            _identifier(entry["target"], where, "the target", dotted=op == "get_attr")
        for k in entry["kwargs"]:
            _identifier(k, where, "the keyword argument")
        target = _resolve(entry["target"], where) if op == "call_function" else entry["target"]
        if op == "call_method":
            _tensor_method(target, where)
        if op == "get_attr" and target not in tensors:
            raise FormatError(f"{where}: its tensor {target!r} is missing from the tensor file")
        if op == "get_attr" and "tensor" in entry:       # (files saved before do not say)
            t, want = tensors[target], entry["tensor"]
            got = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            if got != {"dtype": want.get("dtype"), "shape": list(want.get("shape", []))}:
                raise FormatError(f"{where}: its tensor {target!r} is {got['dtype']} {tuple(got['shape'])} in the "
                                  f"tensor file, but the graph was saved with {want.get('dtype')} "
                                  f"{tuple(want.get('shape', []))}")
        args = tuple(_dec(entry["args"], env, where))
        kwargs = {k: _dec(v, env, where) for k, v in entry["kwargs"].items()}
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise FormatError(f"{where}: the name is used twice")
        m = entry.get("meta", {})
        node.meta.update({k: m[k] for k in _KEPT_META if k in m})
        if "slimfx" in m:
            node.meta["slimfx"] = meta.NodeInfo(**unplain(m["slimfx"]))
        if "nn_module_stack" in m:
            node.meta["nn_module_stack"] = {k: tuple(v) for k, v in m["nn_module_stack"].items()}
        env[name] = node
        if op == "placeholder":
            placeholders.append((node, entry["val"]))
    cg = data.get("codegen")
    if cg is not None:
        for a in cg["orig_args"]:
            _identifier(a, "codegen", "the argument name")
        info = fx.graph._PyTreeInfo(cg["orig_args"], load_spec(cg["in_spec"], "in_spec"),
                                    load_spec(cg["out_spec"], "out_spec"))
        graph._codegen = fx.graph._PyTreeCodeGen(info)
    root = {n.target: tensors[n.target] for n in graph.nodes if n.op == "get_attr"}
    gm = fx.GraphModule(root, graph, class_name=data.get("class_name", "GraphModule"))
    vals, rename = _inputs(data, placeholders)
    for (p, _), v in zip(placeholders, vals):
        p.meta["val"] = v
    expected = [(None if s is None else tuple(s), None if d is None else _torch_attr("dtype", d, "outputs"))
                for s, d in data["outputs"]]
    verify(gm, expected, names={new: old for old, new in rename.items()})   # compared under the saved names
    ranges = {rename[k]: (int(s.get("min") or 0), s.get("max")) for k, s in data["symbols"].items()}
    return gm, ranges
