"""Backends turn a (compressed) graph into something that runs: ``numpy`` (the reference interpreter),
``torch`` (the graph as is) and ``triton`` (kernels on a GPU)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..ir import flatten_inputs, state_tensors

BACKENDS = ("numpy", "torch", "triton")


def unflatten_outputs(gm: fx.GraphModule, flat):
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return flat
    return pytree.tree_unflatten(list(flat) if isinstance(flat, (list, tuple)) else [flat], info.out_spec)


def check_options(backend: str, options: dict | None) -> dict:
    """``options`` for ``backend`` as a dict, or ValueError naming the unknown ones and the known ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"backend_options must be a dict of option name -> value, got {type(options).__name__} "
                        f"{options!r:.80}")
    options = dict(options or {})
    known = {}
    if backend == "triton":
        from .triton_backend import OPTIONS as known
    unknown = sorted(set(options) - set(known))
    if unknown:
        offer = ", ".join(f"{k} ({v})" for k, v in known.items()) or "none"
        raise ValueError(f"backend_options: the {backend!r} backend has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {offer}")
    return options


class Executable:
    """Runs a lowered graph with the model's own call convention: ``exe(args, kwargs)`` returns what the
    model returns (e.g. a ``BaseModelOutput``), with torch tensors in it."""

    def __init__(self, gm: fx.GraphModule, backend: str, options: dict | None = None):
        options = check_options(backend, options)
        self.backend = backend
        self.gm = gm
        self.program = None
        if backend == "numpy":
            from .numpy_backend import NumpyProgram
            self.program = NumpyProgram(gm)
        elif backend == "triton":
            from .triton_backend import TritonProgram
            self.program = TritonProgram(gm, **options)

    def state(self) -> dict[str, torch.Tensor]:
        """The graph's state tensors (those its forward writes into) as this backend holds them now, by attribute
        name: the graph's own on numpy (which writes each new value back into them) and torch; the device copies
        the triton program runs on."""
        state = state_tensors(self.gm)
        if self.backend != "triton":
            return state
        held = {}
        for name in state:
            t = self.program.gm
            for part in name.split("."):
                t = getattr(t, part)
            held[name] = t
        return held

    def __call__(self, args: tuple, kwargs: dict, eager: bool = False):
        """eager: run without a CUDA graph even where the triton backend captures them (e.g. a prompt whose
        length no other call shares)."""
        if self.program is None:
            with torch.no_grad():
                return self.gm(*args, **kwargs)
        if self.backend == "triton":
            return self.program(args, kwargs, eager=eager)
        from .numpy_backend import to_torch
        flat = self.program.run(flatten_inputs(self.gm, args, kwargs))
        return unflatten_outputs(self.gm, pytree.tree_map(to_torch, flat))


def lower(gm: fx.GraphModule, backend: str, options: dict | None = None) -> Executable:
    """Lower ``gm`` to ``backend`` with its ``options`` (triton: cuda_graphs)."""
    return Executable(gm, backend, options)
