"""Shape and dtype propagation: fills ``node.meta["val"]`` with FakeTensors (symbolic where capture made
dims dynamic). Dialect ops propagate through their registered fake implementations."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.fx.experimental._config  # noqa: F401 - backed_size_oblivious
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def math_sdpa():
    """On torch < 2.13, SDPA's backend choice guards Eq(batch, 1) on a batch-1 example (size-oblivious tracing
    then bounds the batch to [1, 2]); the math backend's checks read no sizes there. 2.13 needs no help, and its
    math backend guards the batch itself under enable_gqa=True (transformers passes it when there is no mask), so
    there this is a no-op. The graph keeps the SDPA op either way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13):
        return contextlib.nullcontext()
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


_PLAIN = (int, float, bool, str, complex, type(None), type(...), torch.dtype, torch.device, torch.layout,
          torch.memory_format)


def _typed(a):
    """An argument as a key that compares as propagation sees it: nodes by identity, literals with their type
    (2, 2.0 and True are equal in Python, not in the dtype they give); None for anything else (a tensor)."""
    if isinstance(a, fx.Node):
        return a
    if isinstance(a, (tuple, list)):
        parts = [_typed(x) for x in a]
        return None if any(x is None for x in parts) else (type(a).__name__, *parts)
    if isinstance(a, dict):
        parts = [(k, _typed(v)) for k, v in a.items()]
        return None if any(v is None for _, v in parts) else ("dict", *parts)
    if isinstance(a, slice):
        parts = _typed((a.start, a.stop, a.step))
        return None if parts is None else ("slice", parts)
    if isinstance(a, _PLAIN):
        return (type(a), a)
    return None


class _Key:
    """Everything propagation reads: each node's op, target and arguments (``_typed``), the shape, dtype,
    strides and device of the tensor each get_attr names (and the value of a one-element one, which fake
    tensors may carry), the shape environment's replacements, and the val object on every node, compared by
    identity and held (a val set by hand is propagated again). A pass (Fuse, Prune, Quantize) that propagates
    after its last edit is then not followed by a second full propagation from the verifier (1-2 ms a node:
    seconds for a 32-layer model). Kept on the graph, not in the module's meta: deepcopy and pickle leave it."""

    def __init__(self, structure: tuple, vals: tuple):
        self.structure, self.vals = structure, vals

    def same(self, other: "_Key") -> bool:
        return len(self.vals) == len(other.vals) and all(a is b for a, b in zip(self.vals, other.vals)) \
            and self.structure == other.structure


def _key(gm: fx.GraphModule, mode) -> Optional[_Key]:
    """The graph's ``_Key``; None when something in it cannot key it (a tensor argument, a call_module):
    propagation then always runs."""
    parts, vals = [], []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            return None
        args = _typed((n.args, n.kwargs))
        if args is None:
            return None
        ref = None
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            if not isinstance(t, torch.Tensor):
                return None
            value = t.detach().cpu().tolist() if t.numel() == 1 and not t.is_meta else None
            ref = (tuple(t.shape), t.dtype, t.stride(), t.device, value)
        parts.append((n, n.op, n.target, args, ref))
        vals.append(n.meta.get("val"))
    env = getattr(mode, "shape_env", None)
    parts.append(len(env.replacements) if env is not None else None)
    return _Key(tuple(parts), tuple(vals))


def propagate_meta(gm: fx.GraphModule, example_args: tuple = ()) -> fx.GraphModule:
    """Recompute every node's ``val``. Reuses the placeholders' fake values (and so their symbolic
    shapes) when capture left them; otherwise fakifies ``example_args``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [p.meta.get("val") for p in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is not None and all(v is not None or not p.users for p, v in zip(placeholders, vals)):
        key, last = _key(gm, mode), getattr(gm.graph, "_slimfx_propagated", None)
        if key is not None and last is not None and key.same(last):
            return gm           # nothing propagation reads has changed since the last one: its vals stand
        # the python dispatcher runs CompositeImplicit ops (matmul, linear) through their symbolic Python
        # decompositions, as torch.export traced them; torch 2.11's C++ kernels read concrete sizes and specialize
        with torch.no_grad(), size_oblivious(mode.shape_env is not None), enable_python_dispatcher(), math_sdpa():
            _Prop(gm, mode).propagate_dont_convert_inputs(*vals)
        gm.graph._slimfx_propagated = _key(gm, mode)
        return gm
    if len(example_args) != len(placeholders):
        raise ValueError(f"propagate_meta needs one example input per placeholder "
                         f"({len(placeholders)}: {[p.name for p in placeholders]}), got {len(example_args)}")
    with torch.no_grad():
        _Prop(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_args)
    return gm
