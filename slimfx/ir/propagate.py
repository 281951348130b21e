"""Shape and dtype propagation: fills ``node.meta["val"]`` with FakeTensors (symbolic where capture made
dims dynamic). Dialect ops propagate through their registered fake implementations."""
from __future__ import annotations

import contextlib

import torch
import torch.fx.experimental._config  # noqa: F401 - backed_size_oblivious
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


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


def propagate_meta(gm: fx.GraphModule, example_args: tuple = ()) -> fx.GraphModule:
    """Recompute every node's ``val``. Reuses the placeholders' fake values (and so their symbolic
    shapes) when capture left them; otherwise fakifies ``example_args``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [p.meta.get("val") for p in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is not None and all(v is not None or not p.users for p, v in zip(placeholders, vals)):
        with torch.no_grad(), size_oblivious(mode.shape_env is not None):
            _Prop(gm, mode).propagate_dont_convert_inputs(*vals)
        return gm
    if len(example_args) != len(placeholders):
        raise ValueError(f"propagate_meta needs one example input per placeholder "
                         f"({len(placeholders)}: {[p.name for p in placeholders]}), got {len(example_args)}")
    with torch.no_grad():
        _Prop(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_args)
    return gm
