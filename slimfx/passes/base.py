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
import inspect
import numbers
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
    """Base class for passes with options: make the subclass a dataclass of its options."""
    name: ClassVar[str] = ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> PassResult:
        return _as_result(self.run(gm, ctx or PassContext()), gm)

    @property
    def pass_name(self) -> str:
        return self.name or type(self).__name__


class FunctionPass(Pass):
    """A plain function ``fn(gm)`` or ``fn(gm, ctx)`` made a Pass."""

    def __init__(self, fn: Callable, name: str = ""):
        self.fn, self.name = fn, name or fn.__name__
        self._takes_ctx = len(inspect.signature(fn).parameters) >= 2

    def run(self, gm, ctx):
        return self.fn(gm, ctx) if self._takes_ctx else self.fn(gm)

    def __repr__(self):
        return f"FunctionPass({self.name})"


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
    """Register a Pass subclass or a function under ``name`` (default: its own name, snake_case for
    classes). Usable as ``@register_pass`` or ``@register_pass(name="...")``."""
    def do(o):
        key = name or (o.name if isinstance(o, type) and getattr(o, "name", "") else _snake(o.__name__))
        if key in PASSES and _source(key) != (o.__module__, o.__qualname__):
            where = ".".join(x for x in _source(key) if x) or PASSES[key]
            raise ValueError(f"a pass named {key!r} is already registered ({where}); choose another name")
        # the same definition again (a notebook cell run twice, a module reloaded) replaces it
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


def _source(key: str) -> tuple:
    """(module, qualified name) of what is registered as ``key``."""
    entry = PASSES[key]
    o = entry if isinstance(entry, type) else getattr(entry(), "fn", None)
    return (getattr(o, "__module__", None), getattr(o, "__qualname__", None))


def _snake(s: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(s))


def as_pass(p: Union[str, Pass, Callable]) -> Pass:
    """A pipeline entry (registered name, Pass instance, Pass subclass, or function) as a Pass."""
    if isinstance(p, str):
        if p not in PASSES:
            raise KeyError(f"no pass named {p!r}; registered: {sorted(PASSES)}")
        return PASSES[p]()
    if isinstance(p, Pass):
        return p
    if isinstance(p, type) and issubclass(p, Pass):
        return p()
    if callable(p):
        return FunctionPass(p)
    raise TypeError(f"a pipeline entry must be a pass name, a Pass or a function, got {type(p).__name__}")
