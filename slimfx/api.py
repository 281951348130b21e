"""``slimfx.compile``: capture -> passes -> backend, and the compiled model it returns."""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import ir
from .backends import check_options, lower
from .passes import PassContext, PassManager
from .report import Report
from .signature import InputSignature


class CapturedModel:
    """A model captured once (``slimfx.capture``), to compile with several pipelines or backends: capture is
    most of a compile's time when the passes are few (torch.export traces the whole model), so a sweep over
    quantization or pruning settings captures once. Every compile starts from the same captured graph (passes
    work on copies); the graph shares the model's tensors, so in-place changes to the weights show in later
    compiles, while a changed structure (modules replaced) needs a new capture."""

    def __init__(self, model: torch.nn.Module, captured: "ir.Captured", seconds: float):
        self.model, self.captured, self.seconds = model, captured, seconds

    @classmethod
    def of(cls, model: torch.nn.Module, example_inputs=(), example_kwargs: Optional[dict] = None, dynamic=None,
           method: str = "auto") -> "CapturedModel":
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        from .lm import _replaced, replacements
        t0 = time.perf_counter()
        # transformers functions that export or a backend cannot take as written, replaced by ones of the same
        # values while capturing (Falcon's bfloat16 ALiBi, DeepSeek's batch-guarding key copy): lm.replacements
        with _replaced(replacements(model) if hasattr(model, "config") else []):   # (a CausalLMStep: its own)
            captured = ir.capture(model, example_inputs, dict(example_kwargs or {}), dynamic=dynamic, method=method)
        return cls(model, captured, time.perf_counter() - t0)

    @classmethod
    def given(cls, who: str, model, example_inputs=(), example_kwargs: Optional[dict] = None, dynamic=None,
              method: str = "auto") -> "CapturedModel":
        """``model`` as a capture: captured now if it is a module; if it is a capture already, the capture
        arguments must be left out (``who`` names the function refusing them)."""
        if not isinstance(model, cls):
            return cls.of(model, example_inputs, example_kwargs, dynamic, method)
        given = (["example_inputs"] * (not isinstance(example_inputs, (tuple, list)) or len(example_inputs) > 0)
                 + ["example_kwargs"] * (example_kwargs not in (None, {})) + ["dynamic"] * (dynamic is not None)
                 + ["capture"] * (method != "auto"))
        if given:
            raise TypeError(f"{who}: example inputs / capture settings: {', '.join(given)} given with a "
                            "CapturedModel, which was captured with its own; capture again to change them "
                            "(calibration= takes other data)")
        return model

    @property
    def graph(self) -> fx.GraphModule:
        return self.captured.gm

    def __repr__(self):
        return (f"CapturedModel({type(self.model).__name__}, method={self.captured.method!r}, "
                f"nodes={len(self.captured.gm.graph.nodes)}, {self.seconds:.1f} s)")


def capture(model: torch.nn.Module, example_inputs: tuple = (), example_kwargs: Optional[dict] = None, *,
            dynamic=None, method: str = "auto") -> CapturedModel:
    """Capture ``model`` as called with ``model(*example_inputs, **example_kwargs)`` into the canonical graph,
    for ``slimfx.compile(captured, passes=...)`` to start from; arguments as ``compile``'s (``method`` is its
    ``capture``)."""
    return CapturedModel.of(model, example_inputs, example_kwargs, dynamic, method)


def compile(model, example_inputs: tuple = (), example_kwargs: Optional[dict] = None, *,
            passes: Sequence = (), backend: str = "numpy", backend_options: Optional[dict] = None,
            dynamic=None, calibration: Optional[Iterable] = None,
            capture: str = "auto", verify: bool = True, measure: bool = True, dump_dir: Optional[str] = None,
            progress: bool = True) -> "CompiledModel":
    """Compile ``model`` as called with ``model(*example_inputs, **example_kwargs)``.

    model:    a torch.nn.Module, or a ``CapturedModel`` from ``slimfx.capture`` (its example inputs, dynamic
              dims and capture method hold; giving them again here is an error)
    passes:   pipeline entries: registered names ("dce"), Pass objects, or functions ``fn(gm[, ctx])``
    backend:  "numpy" (reference interpreter), "torch" (the graph as is) or "triton" (kernels on a GPU)
    backend_options: per backend; triton: {"cuda_graphs": True} replays a captured CUDA graph per input
              signature (no per-kernel launch cost: what decode needs)
    dynamic:  True lets every input dim vary (one compile serves several shapes), or export's dynamic_shapes
    dump_dir: write the IR after each pass to numbered files there
    The model is never modified (a forward that writes into the model's buffers writes into the compiled
    model's own copies); a failing pass raises ``PassError`` naming it."""
    # before any work, the arguments: a typo, a wrong type or a model without data fails at once
    check_options(backend, backend_options)
    manager = PassManager(passes, verify=verify, measure=measure, dump_dir=dump_dir, progress=progress)
    calibration = _calibration_list(calibration)
    _refuse_meta(model.model if isinstance(model, CapturedModel) else model, example_inputs, example_kwargs)
    cap = CapturedModel.given("slimfx.compile", model, example_inputs, example_kwargs, dynamic, capture)
    # a capture given is forked: compiled graphs never share the capture's (one made here is this compile's own)
    reused = cap is model
    gm = ir.fork(cap.captured.gm) if reused else cap.captured.gm
    model, captured = cap.model, cap.captured
    example_inputs, example_kwargs = captured.example_args, captured.example_kwargs
    signature = InputSignature.from_capture(model, captured)
    ctx = PassContext(example_inputs, example_kwargs, calibration, progress, model, signature.check)
    # a forward that writes into its own buffers (a counter, a static KV cache): the compiled graph gets its own
    # copies, and the model's are put back after the reference call (the pass manager keeps the graph's)
    with ir.state_kept(ir.own_state(gm)):
        reference = _reference_outputs(model, example_inputs, example_kwargs) if measure else None
    gm, records = manager.run(gm, ctx, reference)
    t1 = time.perf_counter()
    executable = lower(gm, backend, backend_options)
    lower_s = time.perf_counter() - t1
    report = Report(type(model).__name__, captured.method, backend, cap.seconds, lower_s, records,
                    len(captured.gm.graph.nodes), gm, capture_reused=reused)
    return CompiledModel(gm, executable, report, signature)


def _calibration_list(calibration):
    """``calibration`` as compile keeps it: None, or an iterable every pass reads in full (a generator or other
    one-shot iterator is read into a list)."""
    if calibration is None:
        return None
    # one batch given as the whole set would be iterated: a mapping over its keys, a tensor over its rows
    if isinstance(calibration, Mapping):
        raise TypeError(f"calibration is one batch (a mapping of inputs {list(calibration)}); pass a list of "
                        f"batches: calibration=[batch]")
    if isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration is one tensor (of shape {tuple(calibration.shape)}), which would be read as "
                        f"one batch per row; pass a list of batches: calibration=[x] (list(x) for its rows)")
    try:
        it = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of inputs (e.g. a list of batches, each a tensor, a tuple "
                        f"of arguments or a dict of keyword arguments), got {type(calibration).__name__}") from None
    return list(calibration) if it is calibration else calibration


def _refuse_meta(model, args, kwargs) -> None:
    """A model or example input on the meta device has no data to run or lower: name the tensor."""
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    tensors = (*model.named_parameters(), *model.named_buffers()) if isinstance(model, torch.nn.Module) else ()
    named = [*((f"the model's {k!r}", t) for k, t in tensors),
             *((f"example input {i}", a) for i, a in enumerate(args)),
             *((f"example input {k!r}", a) for k, a in (kwargs or {}).items())]
    meta = [what for what, v in named if any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves(v))]
    if meta:
        more = f" (and {len(meta) - 1} more)" if len(meta) > 1 else ""
        raise ValueError(f"slimfx.compile: {meta[0]}{more} is on the meta device (a tensor without data); load the "
                         f"weights (e.g. model.to_empty(device='cpu'), then load_state_dict) and give example inputs "
                         f"with data")


def _reference_outputs(model, args, kwargs):
    with ir.eval_mode(model), torch.no_grad(), torch.inference_mode(ir.made_in_inference_mode(model)):
        return model(*args, **kwargs)


class CompiledModel:
    """Call it like the model: same arguments, same output structure, torch tensors in and out."""

    def __init__(self, gm: fx.GraphModule, executable, report: Report, signature: InputSignature):
        self.graph: fx.GraphModule = gm
        self.backend = executable.backend
        self._executable = executable
        self._report = report
        self._signature = signature
        self.__signature__ = signature.forward
        self.model_name = signature.model_name

    def __call__(self, *args, **kwargs):
        args, kwargs = self._signature.check(args, kwargs)
        try:
            return self._executable(args, kwargs)
        except Exception as e:
            note = self._signature.diverged(args, kwargs)     # dims the example had equal, differing now
            if note:
                e.add_note(note)
            raise

    def report(self) -> Report:
        return self._report

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the model's tensors as its backend holds them: "weights" (as stored: int8 / int4 codes,
        packed sparse forms, scales, the float tensors left) and "dense_copies" (triton: the dense weights
        rebuilt for shape buckets where the dense path measured faster; 0 on the other backends, which
        run the graph's own tensors)."""
        if self.backend == "triton":
            return self._executable.program.held_bytes()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in ir.tensors(self.graph).values()}
        return {"weights": sum(storages.values()), "dense_copies": 0}

    def with_backend(self, backend: str, backend_options: Optional[dict] = None) -> "CompiledModel":
        """The same compiled graph lowered to another backend (or with other options), e.g. compiled and
        checked on the CPU, then ``with_backend("triton", {"cuda_graphs": True})``. The two share the graph and its
        weights; a forward's state (buffers it writes) makes the graph the new model's own fork, with its own copy
        of the state, starting from this one's as it is now."""
        check_options(backend, backend_options)
        t0 = time.perf_counter()
        # a forward with state: its own copy (as compile gives), from this model's now, so calls on one never
        # advance the other; without, the same graph (its tensors are only read)
        gm, state = self.graph, self._executable.state()
        if state:
            gm = ir.fork(self.graph)
            ir.own_state(gm)
            with torch.no_grad():
                for name, now in state.items():
                    getattr(gm, name).copy_(now)
        executable = lower(gm, backend, backend_options)
        r = self._report
        report = Report(r.model, r.capture_method, backend, r.capture_s, time.perf_counter() - t0, r.records,
                        r.captured_nodes, gm, capture_reused=r.capture_reused)
        return CompiledModel(gm, executable, report, self._signature)

    def save(self, path):
        """Write the compiled graph, its tensors (safetensors) and how to call it to the folder ``path``;
        ``slimfx.load(path)`` gives it back, on any backend. Returns the folder's path."""
        from .io import save
        return save(self, path)

    def __repr__(self):
        return (f"CompiledModel({self.model_name}, backend={self.backend!r}, "
                f"passes={[r.name for r in self._report.records]}, nodes={len(self.graph.graph.nodes)})")
