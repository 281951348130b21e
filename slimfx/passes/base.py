"""The pass protocol, for built-in and user passes alike.

A pass takes the graph and a ``PassContext`` and returns a ``PassResult``: the graph, whether it
changed (honestly: the manager relies on it) and its statistics. Write one as a class::

    @register_pass
    @dataclasses.dataclass
    class Prune(Pass):
        sparsity: float = 0.5
        def run(self, gm, ctx): ...; return PassResult(gm, modified=True, stats={"pruned": n})

or as a function; a function that returns only the graph (or nothing) has ``modified`` computed by
the manager from the graph's code::

    @register_pass
    def gelu_tanh(gm):
        for node in gm.graph.nodes: ...

Passes keep no state between runs and never write into tensors: they add new ones
(``ir.meta.add_tensor_attr``), because the graph shares its tensors with the user's model.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import re
import typing
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

import torch.fx as fx


@dataclasses.dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: Optional[bool]              # None: the pass did not say; the manager finds out
    stats: dict = dataclasses.field(default_factory=dict)


def number_in(value, what: str, lo: float, hi: float = float("inf"), *, integer: bool = False,
              open_lo: bool = False, open_hi: bool = False):
    """A pass option checked and made a plain Python number: a real (an integer with ``integer``; numpy scalars
    too, never a bool) in [lo, hi] (open at either end with ``open_lo`` / ``open_hi``); else a ValueError naming
    ``what``."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok:
        value = int(value) if integer else float(value)
        ok = (lo < value if open_lo else lo <= value) and (value < hi if open_hi else value <= hi)
    if not ok:
        span = ("> " if open_lo else ">= ") + f"{lo:g}" if hi == float("inf") else \
            f"in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{what} must be {'an integer' if integer else 'a number'} {span}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the graph."""
    example_args: tuple = ()
    example_kwargs: dict = dataclasses.field(default_factory=dict)
    calibration: Optional[Iterable] = None     # an iterable of model inputs (tuples or dicts)
    progress: bool = True                      # passes with long loops show tqdm bars unless False
    model: Optional[Any] = None                # the user's model (read only, never modified): the teacher
                                               # of Distill; slimfx.compile sets it
    check_call: Optional[Callable] = None      # (args, kwargs) -> (args, kwargs): raises InputError for a call the
                                               # graph was not compiled for (slimfx.compile sets it: the signature)


class Pass:
    """Base class for passes with options: make the subclass a dataclass of its options.

    A pass's name (in reports, dumps and errors) is the ``name`` its own class sets, or the one ``register_pass``
    gives it; a subclass does not inherit its base's (a subclass of ``Quantize`` is not "quantize"): unnamed, it is
    its class's name."""
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):
            cls.name = ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> PassResult:
        return _as_result(self.run(gm, ctx or PassContext()), gm)

    @property
    def pass_name(self) -> str:
        return self.name or type(self).__name__


class FunctionPass(Pass):
    """A plain function made a Pass; its name is the function's (a ``functools.partial``'s: the wrapped one's).

    It is called with the graph as its first positional argument, and with the ``PassContext`` as well when a
    parameter asks for it:

    - a parameter named ``ctx`` or annotated ``PassContext`` (``Optional[PassContext]`` too) receives it, by
      position if it is the second positional parameter, else by keyword; otherwise
    - the second positional parameter receives it if it has no default: ``fn(gm, ctx)``, ``fn(gm, context)``.

    So a defaulted option (``def scale(gm, factor=2.0)``), a keyword-only one and ``*args`` / ``**kwargs`` never
    receive the context: they keep their defaults or the values bound with ``functools.partial(scale,
    factor=3.0)``. A function with any other parameter that has no default is refused here (a TypeError naming
    the pass and the parameter), not when the pipeline reaches it."""

    def __init__(self, fn: Callable, name: str = ""):
        if not callable(fn):
            raise TypeError(f"a function pass must be callable, got {type(fn).__name__} {fn!r}")
        self.fn, self.name = fn, name or _callable_name(fn)
        self._ctx_by_position, self._ctx_keyword = _ctx_parameter(fn, self.name)

    def run(self, gm, ctx):
        if self._ctx_by_position:
            return self.fn(gm, ctx)
        return self.fn(gm, **{self._ctx_keyword: ctx}) if self._ctx_keyword else self.fn(gm)

    def __repr__(self):
        return f"FunctionPass({self.name})"


def _callable_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, Pass):
        return fn.pass_name
    return getattr(fn, "__name__", None) or type(fn).__name__


def _ctx_parameter(fn: Callable, name: str) -> tuple[bool, Optional[str]]:
    """How ``fn`` takes the PassContext (FunctionPass's rule): (by position as its second argument, else by this
    keyword, else not at all)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):          # no signature to read (some builtins): the graph alone
        return False, None
    P = inspect.Parameter
    if not params or params[0].kind not in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL):
        raise TypeError(f"function pass {name!r} must take the graph as its first positional parameter; "
                        f"its signature is {inspect.signature(fn)}")
    rest = [p for p in params[1:] if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    second = rest[0] if rest and rest[0].kind != P.KEYWORD_ONLY else None
    asked = [p for p in rest if (p.name == "ctx" or _is_context(p.annotation))
             and (p is second or p.kind != P.POSITIONAL_ONLY)]
    takes = asked[0] if asked else second if second is not None and second.default is P.empty else None
    missing = [p.name for p in rest if p is not takes and p.default is P.empty]
    if missing:
        raise TypeError(f"function pass {name!r}: parameter {missing[0]!r} has no default; a function pass takes "
                        f"the graph and optionally the PassContext (bind options with functools.partial)")
    if takes is None:
        return False, None
    return (True, None) if takes is second else (False, takes.name)


def _is_context(annotation) -> bool:
    """``PassContext`` or ``Optional[PassContext]``, as an object or as a string (postponed annotations)."""
    if isinstance(annotation, str):
        return re.search(r"\bPassContext\b", annotation) is not None
    return annotation is PassContext or PassContext in typing.get_args(annotation)


def _as_result(out: Any, gm: fx.GraphModule) -> PassResult:
    if isinstance(out, PassResult):
        return out
    if isinstance(out, fx.GraphModule):
        return PassResult(out, None)
    if out is None:
        return PassResult(gm, None)
    if isinstance(out, bool):
        return PassResult(gm, out)
    # torch.fx's own PassResult (graph_module, modified) works too
    if hasattr(out, "graph_module") and hasattr(out, "modified"):
        return PassResult(out.graph_module, bool(out.modified))
    raise TypeError(f"a pass returned {type(out).__name__}; return a PassResult, the GraphModule, a bool or None")


# --- registry ---------------------------------------------------------------------------------------

PASSES: dict[str, Callable[..., Pass]] = {}


def register_pass(obj=None, *, name: str = ""):
    """Register a Pass subclass, a function (a ``functools.partial`` too) or a configured Pass instance under
    ``name`` (default: its own name, snake_case for classes). Usable as ``@register_pass`` or
    ``@register_pass(name="...")``. A name takes one pass: registering another under it is a ValueError; the same
    pass again (a class or function of the same qualified name: a notebook cell run twice or edited, a module
    reloaded; an equal instance or partial) replaces it."""
    def do(o):
        if not callable(o):
            raise TypeError(f"register_pass takes a Pass subclass, a function or a Pass instance, got "
                            f"{type(o).__name__} {o!r}")
        key = name or (o.name if isinstance(o, type) and getattr(o, "name", "") else
                       _snake(o.__name__ if isinstance(o, type) else _callable_name(o)))
        if key in PASSES and not _same(_registered(key), o):
            raise ValueError(f"a pass named {key!r} is already registered ({_describe(_registered(key))}), so "
                             f"{_describe(o)} cannot take it; choose another name")
        if isinstance(o, type):
            if not issubclass(o, Pass):
                raise TypeError(f"{o.__name__} must subclass slimfx.passes.Pass to be registered")
            PASSES[key] = o
            if not o.name:
                o.name = key
        else:
            fp = FunctionPass(o, key)
            PASSES[key] = lambda: fp
        return o
    return do(obj) if obj is not None else do


def _registered(key: str):
    """What was registered as ``key``: the class, or the function (or instance) its FunctionPass wraps."""
    entry = PASSES[key]
    return entry if isinstance(entry, type) else getattr(entry(), "fn", entry)


def _identity(o) -> tuple:
    """A class or function is its definition (module, qualified name); a partial its function and bound values;
    anything else (a configured Pass instance) its class and its value."""
    if isinstance(o, functools.partial):
        return ("partial", _identity(o.func), o.args, o.keywords)
    qualname = getattr(o, "__qualname__", None)
    if isinstance(qualname, str):
        return (getattr(o, "__module__", None), qualname)
    return (type(o).__module__, type(o).__qualname__, o)


def _same(a, b) -> bool:
    try:
        return bool(_identity(a) == _identity(b))
    except Exception:           # values that do not compare to a bool (tensors bound in a partial): not the same
        return False


def _describe(o) -> str:
    if isinstance(o, functools.partial):
        bound = [repr(a) for a in o.args] + [f"{k}={v!r}" for k, v in o.keywords.items()]
        return f"functools.partial({', '.join([_describe(o.func)] + bound)})"
    qualname = getattr(o, "__qualname__", None)
    if isinstance(qualname, str):
        return ".".join(x for x in (getattr(o, "__module__", None), qualname) if x)
    return repr(o)


def _snake(s: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(s))


def _instance(make: Callable, what: str, given: str) -> Pass:
    """``make()``: a pass from its registered name or class, with its default options; one that has required
    options says so, naming them."""
    if isinstance(make, type) and dataclasses.is_dataclass(make):
        required = [f.name for f in dataclasses.fields(make) if f.init and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        if required:
            raise TypeError(f"{what} ({make.__name__}) has required options {required}: put an instance in the "
                            f"pipeline, {make.__name__}({', '.join(f'{r}=...' for r in required)}), not its "
                            f"{given}")
    return make()


def as_pass(p: Union[str, Pass, Callable]) -> Pass:
    """A pipeline entry (registered name, Pass instance, Pass subclass, or function) as a Pass."""
    if isinstance(p, str):
        if p not in PASSES:
            raise KeyError(f"no pass named {p!r}; registered: {sorted(PASSES)}")
        return _instance(PASSES[p], f"pass {p!r}", "name")
    if isinstance(p, Pass):
        return p
    if isinstance(p, type) and issubclass(p, Pass):
        return _instance(p, f"pass class {p.__name__}", "class")
    if callable(p):
        return FunctionPass(p)
    raise TypeError(f"a pipeline entry must be a pass name, a Pass or a function, got {type(p).__name__}")
