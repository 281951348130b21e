"""Shape and dtype propagation: fills ``node.meta["val"]`` with FakeTensors (symbolic where capture made
dims dynamic). Dialect ops propagate through their registered fake implementations."""
from __future__ import annotations

import contextlib

import torch
import torch.fx.experimental._config  # noqa: F401 - backed_size_oblivious
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def math_sdpa():
    """torch 2.11's SDPA backend choice guards Eq(batch, 1) on a batch-1 example (size-oblivious tracing then
    bounds the batch to [1, 2]); the math backend's checks read no sizes. The graph keeps the SDPA op either way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def size_oblivious(on: bool = True):
    """Export assumes every dynamic dim is >= 2 (it specializes 0 and 1) unless sizes are traced "size
    oblivious": then a batch of 1 stays in the compiled range, and only dims the model really branches on
    (e.g. a sequence length of 1) keep min 2. Propagation must trace the same way, or an example batch of 1
    turns a dynamic dim into a static 1 at the first broadcast."""
    cfg = torch.fx.experimental._config
    if not on or not hasattr(cfg, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return cfg.patch(backed_size_oblivious=True)


class _Prop(FakeTensorProp):
    """FakeTensorProp that runs constant padding through its Python decomposition, as torch.export traced it:
    the C++ kernel behind ``aten.pad`` / ``constant_pad_nd`` reads concrete sizes, so on symbolic shapes it
    fails (a symbolic pad: Falcon-H1's Mamba chunks, padded to a multiple of the chunk size) or specializes
    the dims it reads (Bamba's batch became 2 at its causal convolution's padding)."""

    def call_function(self, target, args, kwargs):
        aten = torch.ops.aten
        if target is aten.pad.default and (list(args[2:3]) or [kwargs.get("mode", "constant")])[0] == "constant":
            value = args[3] if len(args) > 3 else kwargs.get("value")
            target, args, kwargs = aten.constant_pad_nd.default, (args[0], args[1], value or 0), {}
        if target is aten.constant_pad_nd.default:
            from torch._decomp import decomposition_table
            return decomposition_table[target](*args, **kwargs)
        return super().call_function(target, args, kwargs)


_PROPAGATED = "slimfx_propagated"


_PLAIN = (fx.Node, int, float, bool, str, complex, type(None), type(...), torch.dtype, torch.device, torch.layout,
          torch.memory_format)


def _plain(a) -> bool:
    """Whether an argument compares by value or identity, never elementwise (a tensor or an array would)."""
    if isinstance(a, (tuple, list)):
        return all(_plain(x) for x in a)
    if isinstance(a, dict):
        return all(_plain(x) for x in a.values())
    if isinstance(a, slice):
        return _plain((a.start, a.stop, a.step))
    return isinstance(a, _PLAIN)


def _key(gm: fx.GraphModule):
    """Everything propagation reads, compared by identity where it is an object: each node's op, target and
    arguments (the nodes themselves), the module or tensor each call_module / get_attr names (with the tensor's
    shape, dtype, strides and device) and the val object on every node (a val set by hand is propagated again).
    A pass (Fuse, Prune, Quantize) that propagates after its last edit is then not followed by a second full
    propagation from the verifier (1-2 ms a node: seconds for a 32-layer model). None when an argument is
    something else (a tensor constant): then propagation always runs."""
    parts = []
    for n in gm.graph.nodes:
        if not _plain((n.args, n.kwargs)):
            return None
        ref = None
        if n.op in ("get_attr", "call_module"):
            try:
                obj = gm.get_submodule(n.target) if n.op == "call_module" else getattr(gm, n.target)
            except AttributeError:
                return None
            ref = (id(obj), tuple(obj.shape), obj.dtype, obj.stride(), obj.device) \
                if isinstance(obj, torch.Tensor) else id(obj)
        parts.append((n, n.op, n.target, n.args, n.kwargs, ref, id(n.meta.get("val"))))
    return tuple(parts)


def propagate_meta(gm: fx.GraphModule, example_args: tuple = ()) -> fx.GraphModule:
    """Recompute every node's ``val``. Reuses the placeholders' fake values (and so their symbolic
    shapes) when capture left them; otherwise fakifies ``example_args``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [p.meta.get("val") for p in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is not None and all(v is not None or not p.users for p, v in zip(placeholders, vals)):
        key = _key(gm)
        if key is not None and gm.meta.get(_PROPAGATED) == key:
            return gm           # nothing propagation reads has changed since the last one: its vals stand
        # the python dispatcher runs CompositeImplicit ops (matmul, linear) through their symbolic Python
        # decompositions, as torch.export traced them; torch 2.11's C++ kernels read concrete sizes and specialize
        with torch.no_grad(), size_oblivious(mode.shape_env is not None), enable_python_dispatcher(), math_sdpa():
            _Prop(gm, mode).propagate_dont_convert_inputs(*vals)
        gm.meta[_PROPAGATED] = _key(gm)
        return gm
    if len(example_args) != len(placeholders):
        raise ValueError(f"propagate_meta needs one example input per placeholder "
                         f"({len(placeholders)}: {[p.name for p in placeholders]}), got {len(example_args)}")
    with torch.no_grad():
        _Prop(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_args)
    return gm
