"""Shape and dtype propagation: fills ``node.meta["val"]`` with FakeTensors (symbolic where capture made
dims dynamic). Dialect ops propagate through their registered fake implementations."""
from __future__ import annotations

import contextlib
import operator
from typing import Optional

import sympy
import torch
import torch.utils._pytree
import torch.fx.experimental._config  # noqa: F401 - backed_size_oblivious
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import snapshot_fake
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
    the dims it reads (Bamba's batch became 2 at its causal convolution's padding).

    Given the last propagation's ``_Key`` (``last``) and this graph's (``key``), it runs only what changed: a
    node whose arguments, target and (for get_attr) tensor are as they were, whose val is the one propagation
    left and whose inputs all kept theirs keeps its val without running. A node that runs and comes out as
    before (``_same_val``: shape, strides, dtype, device, symbols by expression) keeps its old val too, so the
    nodes after it keep theirs: a pass that swaps each linear layer for a quantized one reruns those layers,
    not the model."""

    def __init__(self, module, mode, last: Optional["_Key"] = None, key: Optional["_Key"] = None):
        super().__init__(module, mode)
        self._last, self._now, self._kept, self.ran = last, key, set(), 0

    def run_node(self, n: fx.Node):
        last, old = self._last, n.meta.get("val")
        # the val the last propagation gave it, which the nodes after it were propagated from
        recorded = last is not None and old is not None and last.vals.get(n) is old
        # placeholders always run (each takes the next input) and the output (cheap); a val with a part that is
        # no tensor or number (None in it) is not what the node gives its readers
        if recorded and n.op in ("call_function", "get_attr") and last.parts[n] == self._now.parts[n] \
                and all(a in self._kept for a in n.all_input_nodes) and _whole(old):
            self._kept.add(n)
            # readers that run get what a full propagation gives them: a get_attr's tensor itself
            return self.fetch_attr(n.target) if n.op == "get_attr" else old
        self.ran += 1
        result = super().run_node(n)
        if recorded and _same_val(old, n.meta.get("val")):
            n.meta["val"] = old
            self._kept.add(n)
        return result

    def call_function(self, target, args, kwargs):
        aten = torch.ops.aten
        if target is aten.pad.default and (list(args[2:3]) or [kwargs.get("mode", "constant")])[0] == "constant":
            value = args[3] if len(args) > 3 else kwargs.get("value")
            target, args, kwargs = aten.constant_pad_nd.default, (args[0], args[1], value or 0), {}
        if target is aten.constant_pad_nd.default:
            from torch._decomp import decomposition_table
            return decomposition_table[target](*args, **kwargs)
        return super().call_function(target, args, kwargs)


def _same_sym(a, b) -> bool:
    """Two sizes (or scalars) alike without asking the shape environment (``==`` on SymInts adds a guard):
    plain values by type and value, symbolic ones by their expression (a constant one as the plain value;
    ``(a + b)*c`` as ``a*c + b*c``, as export and propagation may spell a stride)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        if type(a) is not type(b):
            return False
        x, y = a.node.expr, b.node.expr
        return x == y or (isinstance(a, torch.SymInt) and sympy.expand(x - y) == 0)
    return type(a) is type(b) and a == b


def _whole(val) -> bool:
    """No part of ``val`` is None (what propagation records for a part of a result that is no tensor or number)."""
    return val is not None and (not isinstance(val, (tuple, list)) or all(map(_whole, val)))


def _plain(a):
    if isinstance(a, torch.SymInt) and a.node.expr.is_number:
        return int(a.node.expr)
    return a


def _same_val(a, b) -> bool:
    """Whether a node's new val says what its old one did, to every node that reads it."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and type(a) is type(b) and a.dtype == b.dtype \
            and a.device == b.device and a.layout == b.layout and a.requires_grad == b.requires_grad \
            and a.is_inference() == b.is_inference() \
            and getattr(a, "fake_mode", None) is getattr(b, "fake_mode", None) \
            and a.dim() == b.dim() and all(map(_same_sym, a.shape, b.shape)) \
            and all(map(_same_sym, a.stride(), b.stride())) and _same_sym(a.storage_offset(), b.storage_offset()) \
            and getattr(a, "constant", None) is None and getattr(b, "constant", None) is None
    if isinstance(a, (tuple, list)):
        # a list or tuple of tensors (fx's immutable_list after a propagation, export's list before)
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same_val, a, b))
    if a is None or isinstance(a, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _same_sym(a, b)
    return False


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
    """Everything propagation reads: each node's op, target and arguments (``_typed``), what a fake of the
    tensor each get_attr names holds (its type, shape, strides, dtype, device, whether it is an inference
    tensor, and the value of a one-element one), the ``_context`` it ran in, and the val object on every node,
    compared by identity and held (a val set by hand is propagated again). A pass (Fuse, Prune, Quantize) that
    propagates after its last edit is then not followed by a second full propagation from the verifier (1-2 ms
    a node: seconds for a 32-layer model), and one that changed a few nodes reruns those (``_Prop``). Kept on
    the graph, not in the module's meta: deepcopy and pickle leave it."""

    def __init__(self, parts: dict, vals: dict, context):
        self.parts, self.vals, self.context = parts, vals, context

    def same(self, other: "_Key") -> bool:
        return self.context == other.context and len(self.vals) == len(other.vals) \
            and all(other.vals.get(n, self) is v for n, v in self.vals.items()) and self.parts == other.parts


_GONE = object()     # in a carried part, an argument erased from the graph since: equal to no node


def _moved(a, val_map: dict):
    if isinstance(a, fx.Node):
        return val_map.get(a, _GONE)
    if isinstance(a, tuple):
        return tuple(_moved(x, val_map) for x in a)
    return a


def carry_propagation(src: fx.Graph, dst: fx.Graph, val_map: dict) -> None:
    """Give ``dst``, a copy of ``src`` (``graph_copy`` with ``val_map``, its nodes sharing their vals), what
    ``src`` knows of its last propagation, so that propagating the copy reruns only what changed (passes work
    on copies: ``ir.fork``). Nodes erased from ``src`` since then are left out."""
    last = getattr(src, "_slimfx_propagated", None)
    if last is not None:
        dst._slimfx_propagated = _Key({val_map[n]: _moved(part, val_map) for n, part in last.parts.items()
                                       if n in val_map},
                                      {val_map[n]: v for n, v in last.vals.items() if n in val_map},
                                      last.context)


def _key(gm: fx.GraphModule, mode) -> Optional[_Key]:
    """The graph's ``_Key``; None when something in it cannot key it (a tensor argument, a call_module, an
    in-place view op):
    propagation then always runs, over every node."""
    parts, vals = {}, {}
    for n in gm.graph.nodes:
        if n.op == "call_module" or torch.Tag.inplace_view in getattr(n.target, "tags", ()):
            return None         # (an in-place view op, unsqueeze_: it would reshape a kept val in place)
        args = _typed((n.args, n.kwargs))
        if args is None:
            return None
        ref = None
        if n.op == "get_attr":
            t = _attr_tensor(gm, n.target)
            if t is None:
                return None
            value = t.detach().cpu().tolist() if t.numel() == 1 and not t.is_meta else None
            # all a fake of it holds: an inference tensor's fake is one too (own_state swaps in a plain copy)
            ref = (type(t), tuple(t.shape), t.dtype, t.stride(), t.storage_offset(), t.device, t.layout,
                   t.requires_grad, t.is_inference(), value)
        parts[n] = (n.op, n.target, args, ref)
        vals[n] = n.meta.get("val")
    return _Key(parts, vals, _context(mode))


def _attr_tensor(gm: fx.GraphModule, target: str) -> Optional[torch.Tensor]:
    """The tensor a get_attr names (a dotted path in export's graphs); None for anything else."""
    try:
        t = operator.attrgetter(target)(gm)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None


def adopt_vals(gm: fx.GraphModule) -> None:
    """Take the vals already on the graph (torch.export's, from its own trace) as a propagation's, so that the
    first propagation after an edit (canonicalization, the first pass) reruns only what changed."""
    mode = detect_fake_mode([p.meta.get("val") for p in gm.graph.nodes if p.op == "placeholder"
                             and isinstance(p.meta.get("val"), torch.Tensor)])
    if mode is None:
        return
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not _as_propagated(n.meta.get("val"), gm, n.target, mode):
            return          # export's fake of a constant is not the one propagation makes of it
    for n in gm.graph.nodes:       # export traced with grad on; propagation runs without (and so reads no grad)
        if "val" in n.meta:
            n.meta["val"] = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda v: snapshot_fake(v) if v.requires_grad else v, n.meta["val"])
    gm.graph._slimfx_propagated = _key(gm, mode)


def _as_propagated(val, gm: fx.GraphModule, target: str, mode) -> bool:
    """Whether export's val of a get_attr lays the tensor out as propagation's fake of it does, and the tensor is
    a plain one (contiguous, from its storage's start): export's vals of the ops on a strided view (Falcon's
    alibi slopes, a constant at offset 1) may start at 0 where propagation's start at 1."""
    t = _attr_tensor(gm, target)
    if t is None or not isinstance(val, torch.Tensor) or not t.is_contiguous() or t.storage_offset() != 0:
        return False
    fake = mode.from_tensor(t, static_shapes=True)
    return val.dtype == fake.dtype and val.device == fake.device and val.dim() == fake.dim() \
        and all(map(_same_sym, (*val.shape, *val.stride(), val.storage_offset()),
                    (*fake.shape, *fake.stride(), fake.storage_offset())))


def _context(mode) -> tuple:
    """What a propagation's vals depend on besides the graph: the fake mode and shape environment (the same
    symbol names mean other symbols in another), the environment's replacements (a dim specialized since: kept
    vals would not know it) and inference mode (under it, capture's propagation gives inference tensors, which
    ops outside it refuse to write into)."""
    env = getattr(mode, "shape_env", None)
    replaced = None if env is None else (len(env.replacements), getattr(env, "_replacements_version_counter", None))
    return mode, env, replaced, torch.is_inference_mode_enabled()


def propagate_meta(gm: fx.GraphModule, example_args: tuple = (), *, incremental: bool = True) -> fx.GraphModule:
    """Bring every node's ``val`` up to date. Reuses the placeholders' fake values (and so their symbolic
    shapes) when capture left them; otherwise fakifies ``example_args`` (and runs every node). ``incremental``
    (the default) runs only the nodes that changed since the last propagation, those whose inputs' vals changed
    with them, the placeholders and the output (``_Prop``), and nothing when nothing changed. Every node runs
    when the ``_context`` differs from the last propagation's (another fake mode, a dim specialized since, in or
    out of inference mode); ``incremental=False`` runs every node always."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [p.meta.get("val") for p in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is not None and all(v is not None or not p.users for p, v in zip(placeholders, vals)):
        key, last = _key(gm, mode), getattr(gm.graph, "_slimfx_propagated", None)
        if incremental and key is not None and last is not None and key.same(last):
            return gm           # nothing propagation reads has changed since the last one: its vals stand
        if not incremental or key is None or last is None or last.context != key.context:
            last = None
        before = _context(mode)
        # the python dispatcher runs CompositeImplicit ops (matmul, linear) through their symbolic Python
        # decompositions, as torch.export traced them; torch 2.11's C++ kernels read concrete sizes and specialize
        with torch.no_grad(), size_oblivious(mode.shape_env is not None), enable_python_dispatcher(), math_sdpa():
            _Prop(gm, mode, last, key).propagate_dont_convert_inputs(*vals)
            if last is not None and _context(mode) != before:
                # a rerun node specialized a dim: the vals kept from before would not know it
                _Prop(gm, mode).propagate_dont_convert_inputs(*vals)
        gm.graph._slimfx_propagated = _key(gm, mode)
        return gm
    if len(example_args) != len(placeholders):
        raise ValueError(f"propagate_meta needs one example input per placeholder "
                         f"({len(placeholders)}: {[p.name for p in placeholders]}), got {len(example_args)}")
    with torch.no_grad():
        _Prop(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_args)
    return gm
