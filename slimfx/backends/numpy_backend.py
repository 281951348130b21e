"""The numpy backend: an interpreter over the graph with one op table (``optable.NUMPY_OPS``).

It is the executable specification every other backend is tested against. Lowering resolves every
node's implementation up front, so a missing op fails at compile time naming the op and the node.
"""
from __future__ import annotations

import functools
import importlib
import time

import numpy as np
import torch
import torch.fx as fx

from .. import ir
from . import numpy_ops  # noqa: F401 - registers the ATen implementations
from .numpy_ops import NP_DTYPE
from .optable import NUMPY_OPS

aten = torch.ops.aten

# Modules that register numpy implementations of slimfx dialect ops (imported when present).
_EXTENSIONS = ("slimfx.backends.numpy_quant", "slimfx.backends.numpy_fused")


class UnsupportedOpError(NotImplementedError):
    pass


def _load_extensions():
    for name in _EXTENSIONS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype not in NP_DTYPE:
        hint = ("; compile a float32 copy (model.float()) for the numpy backend, or use backend='torch' or "
                "'triton'") if t.dtype is torch.bfloat16 else ""
        raise TypeError(f"the numpy backend cannot hold {t.dtype} tensors (numpy has no such type){hint}")
    return t.detach().cpu().numpy()


class NumpyProgram:
    """A lowered graph: ``run(flat_inputs) -> flat_outputs`` in numpy."""

    def __init__(self, gm: fx.GraphModule):
        _load_extensions()
        self.gm = gm
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = next(n for n in nodes if n.op == "output")
        self.consts = {n: to_numpy(getattr(gm, n.target)) for n in nodes if n.op == "get_attr"}
        # the model's state (export's copy_ into a buffer): held as fresh arrays, replaced on each write, never
        # written in place (numpy ops here return their operands' arrays as views: an earlier read keeps its value)
        for target in ir.state_tensors(gm):
            value = to_numpy(getattr(gm, target)).copy()
            self.consts.update({n: value for n in self.consts if n.target == target})
        self.steps = []
        for n in nodes:
            if n.op == "call_function" and n.target is aten.copy_.default and n.args[0] in self.consts:
                self.steps.append((n, functools.partial(self._write_state, n.args[0].target), None))
            elif n.op == "call_function":
                fn = NUMPY_OPS.get(n.target)
                if fn is None:
                    raise UnsupportedOpError(_missing(n))
                dt = ir.meta.dtype(n)
                if dt is torch.bfloat16 or str(dt).startswith("torch.float8"):   # refused here, not at a call
                    where = ir.meta.module_name(n)
                    raise UnsupportedOpError(
                        f"node {n.name} ({n.target}{', from module ' + where if where else ''}) computes in {dt}, "
                        f"which numpy has no type for; run with backend='torch' (or 'triton'), or compile a "
                        f"float32 copy of the model if the model is bfloat16")
                self.steps.append((n, fn, NP_DTYPE.get(dt) if dt is not None else None))
            elif n.op in ("call_module", "call_method"):
                what = (f"a call_module node ({n.name}: {type(gm.get_submodule(n.target)).__name__} "
                        f"{n.target!r})" if n.op == "call_module" and isinstance(n.target, str) and
                        _has_submodule(gm, n.target) else f"a {n.op} node ({n.name}: {n.target!r})")
                raise UnsupportedOpError(f"the numpy backend runs ATen ops (call_function nodes), not {what}: "
                                         f"a pass should insert the ATen ops it stands for (torch.ops.aten...), or "
                                         f"run with backend='torch'")
        # free each intermediate after its last use: keeps peak memory near torch's
        last_use = {}
        for i, (n, _, _) in enumerate(self.steps):
            for a in n.all_input_nodes:
                last_use[a] = i
        free_after = [[] for _ in self.steps]
        outs = set(self.output.all_input_nodes)
        for a, i in last_use.items():
            if a.op == "call_function" and a not in outs:
                free_after[i].append(a)
        # what run reads per step, looked up once: (node, fn, dtype, args, kwargs or None, nodes to free); keyword
        # arguments the schema takes by position go by position (the numpy functions name them their own way)
        self.plan = []
        for (n, fn, dt), free in zip(self.steps, free_after):
            args, kwargs = _positional(n) if n.kwargs else (n.args, n.kwargs)
            self.plan.append((n, fn, dt, args, kwargs or None, tuple(free)))

    def _write_state(self, target: str, dst: np.ndarray, src, non_blocking=False) -> np.ndarray:
        """aten.copy_(buffer, value): the next run reads ``value`` (cast and broadcast as copy_ does); the graph's
        tensor follows, so saving the compiled model saves its state as the torch backend would."""
        new = np.array(np.broadcast_to(np.asarray(src).astype(dst.dtype, copy=False), dst.shape))
        self.consts.update({n: new for n in self.consts if n.target == target})
        with torch.no_grad():
            getattr(self.gm, target).copy_(torch.from_numpy(new))
        return new

    def run(self, flat_inputs: list, timings: dict | None = None) -> list:
        """Execute on the placeholders' values; with ``timings``, add each op's seconds to timings[op name]."""
        env = dict(self.consts)
        for p, v in zip(self.placeholders, flat_inputs):
            env[p] = to_numpy(v) if isinstance(v, torch.Tensor) else v
        load = lambda a: env[a]
        with np.errstate(all="ignore"):       # IEEE results as torch gives them, silently (log(0) = -inf, 0/0 = nan)
            self._run_steps(env, load, timings)
        return fx.node.map_arg(self.output.args[0], load)

    def _run_steps(self, env: dict, load, timings: dict | None) -> None:
        map_arg = fx.node.map_arg
        for n, fn, dt, args, kwargs, free in self.plan:
            args = map_arg(args, load)
            try:
                if timings is None:
                    out = fn(*args, **map_arg(kwargs, load)) if kwargs else fn(*args)
                else:
                    t0 = time.perf_counter()
                    out = fn(*args, **map_arg(kwargs, load)) if kwargs else fn(*args)
                    key = str(n.target)
                    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
            except Exception as e:
                raise RuntimeError(f"numpy backend: node {n.name} ({n.target}) failed: {type(e).__name__}: {e}") from e
            if dt is not None and isinstance(out, np.ndarray) and out.dtype != dt:
                out = out.astype(dt)          # torch's type promotion, as recorded on the node
            elif dt is not None and isinstance(out, np.generic):
                out = np.asarray(out, dtype=dt)
            env[n] = out
            for a in free:
                del env[a]


def _positional(n: fx.Node) -> tuple:
    """(args, kwargs) of ``n`` with every keyword argument its op's schema also takes by position moved there
    (defaults filled in between): ``aten.clamp(x, max=1.0)`` as ``(x, None, 1.0)``, as export records calls."""
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return n.args, n.kwargs
    positional = [p for p in schema.arguments if not p.kwarg_only]
    args, kwargs = list(n.args), dict(n.kwargs)
    last = max((i for i, p in enumerate(positional) if p.name in kwargs), default=-1)
    for p in positional[len(args):last + 1]:
        if p.name in kwargs:
            args.append(kwargs.pop(p.name))
        elif p.has_default_value():
            args.append(p.default_value)
        else:                                           # a required argument missing: leave the call to fail
            return n.args, n.kwargs
    return tuple(args), kwargs


def _has_submodule(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
        return True
    except AttributeError:
        return False


def _missing(n: fx.Node) -> str:
    where = ir.meta.module_name(n)
    return (f"the numpy backend has no implementation of {n.target} (node {n.name}"
            f"{', from module ' + where if where else ''}). Register one with "
            f"slimfx.backends.optable.numpy_op({n.target}), or run with backend='torch'.")


def to_torch(x):
    if isinstance(x, np.ndarray):      # np.ascontiguousarray would make a 0-d array 1-d
        return torch.from_numpy(x if x.flags.c_contiguous else np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return torch.from_numpy(np.asarray(x))
    return x
