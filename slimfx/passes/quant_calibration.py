"""Calibration for quantization passes: run the graph in torch over model inputs and hand the values of
chosen nodes to callbacks (observers). Shared by ``Quantize`` (static activations, layer SQNR; GPTQ's and
AWQ's input Hessians, in runs that fit ``HESSIAN_BYTES``), ``Prune`` (SparseGPT's) and ``SmoothQuant``
(per-channel activation ranges)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, Iterator

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .. import ir
from .base import PassContext


class CalibrationError(ValueError):
    """Calibration data produced NaN/Inf (or could not be fed to the graph); names the node."""


def call_of(item, ctx: PassContext) -> tuple[tuple, dict]:
    """(args, kwargs) for one calibration input: a tuple/list of positional args, a mapping of keyword args (a
    dict, or a tokenizer's BatchEncoding), or a tensor; the example's keyword constants (``use_cache=False``) are
    merged in, so they need not be repeated, but never its tensors: a batch without the example's
    ``attention_mask`` is refused as missing it, not calibrated with the example's mask."""
    import torch.utils._pytree as pytree
    consts = {k: v for k, v in ctx.example_kwargs.items()
              if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(v))}
    if isinstance(item, Mapping):
        return (), {**consts, **item}
    if isinstance(item, (tuple, list)):
        return tuple(item), dict(consts)
    return (item,), dict(consts)


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    try:
        return ir.flatten_inputs(gm, args, kwargs)
    except Exception as e:
        raise CalibrationError(f"an input does not match the captured call signature: {e}") from e


class _Stop(Exception):
    """Raised after the last node a run needs: the rest of the graph is not computed."""


class _Watcher(fx.Interpreter):
    def __init__(self, gm, watch: dict[fx.Node, Callable], stop_after: fx.Node | None = None, finite: bool = True):
        super().__init__(gm)
        self.watch = watch
        self.stop_after = stop_after
        self.finite = finite

    def run_node(self, n):
        out = super().run_node(n)
        cb = self.watch.get(n)
        if cb is not None:
            if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
                if not self.finite:
                    return out
                bad = int((~torch.isfinite(out)).sum())
                weights = _nonfinite_weights(self.module, n)
                cause = (f"it comes from the weight(s) of {weights}, which hold NaN or inf: fix them or exclude those "
                         f"layers") if weights else "check the calibration data"
                raise CalibrationError(f"calibration: node {n.name!r} (input of the layer(s) "
                                       f"{_users(n)}) holds {bad} NaN/Inf value(s); {cause}")
            cb(out)
        if n is self.stop_after:
            raise _Stop
        return out


def _nonfinite_weights(gm: fx.GraphModule, n: fx.Node) -> list[str]:
    """The layers (module names, else attribute names) above ``n`` whose float tensors hold NaN or inf: the cause
    of a non-finite value the calibration data did not bring."""
    seen, stack, bad = set(), [n], []
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "get_attr":
            t = getattr(gm, m.target, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(ir.meta.module_name(m) or m.target)
        stack.extend(m.all_input_nodes)
    return sorted(set(bad))


def _users(n: fx.Node) -> list[str]:
    return sorted({ir.meta.module_name(u) or u.name for u in n.users})


def run_watching(gm: fx.GraphModule, calls: Iterable[tuple[tuple, dict]], watch: dict[fx.Node, Callable],
                 progress: bool = False, desc: str = "calibrating", stop_early: bool = False,
                 finite: bool = True) -> int:
    """Run ``gm`` (torch) on each ``(args, kwargs)`` call; after each watched node runs, call its callback
    with the node's value. ``stop_early``: stop each run after the last watched node (in graph order).
    A watched value holding NaN or inf raises CalibrationError, naming the weights above it that hold them if
    any (else the data); with ``finite=False`` the callback is not called for it instead.
    Returns the number of calls run."""
    total = len(calls) if hasattr(calls, "__len__") else None
    last = [n for n in gm.graph.nodes if n in watch][-1] if stop_early and watch else None
    count = 0
    with torch.no_grad():
        for args, kwargs in tqdm(calls, desc=desc, total=total, disable=not progress, leave=False):
            try:
                _Watcher(gm, watch, last, finite).run(*flat_inputs(gm, args, kwargs))
            except _Stop:
                pass
            count += 1
    return count


def calibration_calls(ctx: PassContext, who: str) -> Iterable[tuple[tuple, dict]]:
    """ctx.calibration as (args, kwargs) calls, each checked against the compiled inputs (``ctx.check_call``):
    a clear error, naming the pass and the batch, when there is no data, none at all (an empty list), or a batch
    the graph was not compiled for (another shape without dynamic dims, a missing argument)."""
    if ctx.calibration is None:
        raise ValueError(f"{who} needs calibration data: pass calibration=[inputs, ...] to slimfx.compile (or to "
                         f"sensitivity, compile_causal_lm: whichever runs the pass), each a tuple of positional args "
                         f"or a dict of keyword args, like the example inputs")
    cal = ctx.calibration
    calls = (_checked(call_of(item, ctx), ctx, who, i) for i, item in enumerate(cal))
    if hasattr(cal, "__len__"):
        calls = list(calls)
        if not calls:
            raise ValueError(f"{who}: the calibration data is empty; give calibration= at least one batch of "
                             f"inputs")
    return calls


def _checked(call: tuple[tuple, dict], ctx: PassContext, who: str, i: int) -> tuple[tuple, dict]:
    if ctx.check_call is None:
        return call
    from ..signature import InputError
    try:
        return ctx.check_call(*call)
    except InputError as e:
        raise CalibrationError(f"{who}: calibration batch {i} does not fit the compiled inputs: {e}") from e


HESSIAN_BYTES = 2 << 30
"""Input Hessians (fp64, K x K per layer input; per expert for MoE tensors) that GPTQ, AWQ and SparseGPT hold at
once. Where a model's need more (Llama-2-7B's: ~44 GB; 70B's: ~650 GB), they are gathered in runs that fit,
one calibration pass per run, each stopped after its last input (``budget_runs``). Raise it to trade memory for
fewer passes. GPTQ's and SparseGPT's results do not depend on it (every run's Hessians come from the float
graph); AWQ searches each run on the graph scaled so far, the same up to float rounding. The statistics'
``hessian_runs`` counts the runs."""


def budget_runs(items: list, need: Callable[[object], int], budget: int | None = None) -> list[list]:
    """``items`` (in graph order) in consecutive runs whose ``need`` bytes fit ``budget`` together (default
    ``HESSIAN_BYTES``, read when called); an item over the budget alone is a run of its own."""
    budget = HESSIAN_BYTES if budget is None else budget
    runs, size = [[]], 0
    for item in items:
        b = need(item)
        if runs[-1] and size + b > budget:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += b
    return [r for r in runs if r]


def hessian_bytes(n: fx.Node) -> int:
    """What ``input_hessians`` holds for input ``n``: a K x K fp64 matrix."""
    return int(ir.meta.shape(n)[-1]) ** 2 * 8


def input_hessians(gm: fx.GraphModule, calls, x_nodes, progress: bool, who: str) -> dict[fx.Node, torch.Tensor]:
    """X X^T / n of each node in ``x_nodes`` (a linear's input; all leading dims are rows) over ``calls``:
    what GPTQ and SparseGPT weigh a layer's output error by."""
    from ..quant.gptq import Hessian
    hs = {n: Hessian(int(ir.meta.shape(n)[-1])) for n in x_nodes}
    if run_watching(gm, calls, {n: h.add for n, h in hs.items()}, progress, f"{who}: input statistics",
                    stop_early=True) == 0:
        raise ValueError(f"{who}: the calibration data is empty")
    return {n: h.value() for n, h in hs.items()}


def hessians_in_runs(gm: fx.GraphModule, calls, x_nodes, progress: bool, who: str) -> Iterator[dict]:
    """``input_hessians`` of ``x_nodes`` a run at a time (``budget_runs``: at most ``HESSIAN_BYTES`` held),
    each from the graph as it is when that run is reached: the caller changes the graph after the last run to
    keep every run's from the float graph."""
    runs = budget_runs(list(x_nodes), hessian_bytes)
    if len(runs) > 1 and not hasattr(calls, "__len__"):
        calls = list(calls)
    for i, run in enumerate(runs):
        yield input_hessians(gm, calls, run, progress, who if len(runs) == 1 else f"{who}, run {i + 1}/{len(runs)}")


class _MeanSquare:
    """The mean over rows of x_j^2 per column j (the diagonal of X^T X / n), in fp64."""

    def __init__(self, k: int):
        self.sum = torch.zeros(k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum += x.square().sum(0)
        self.n += x.shape[0]


def input_mean_squares(gm: fx.GraphModule, calls, x_nodes, progress: bool, who: str) -> dict[fx.Node, torch.Tensor]:
    """The diagonal of ``input_hessians`` (each input column's mean square) without the K x K products:
    what the weight scale search weighs each column's error by."""
    acc = {n: _MeanSquare(int(ir.meta.shape(n)[-1])) for n in x_nodes}
    if run_watching(gm, calls, {n: a.add for n, a in acc.items()}, progress, f"{who}: input statistics",
                    stop_early=True) == 0:
        raise ValueError(f"{who}: the calibration data is empty")
    return {n: a.sum / max(a.n, 1) for n, a in acc.items()}


def example_values(gm: fx.GraphModule, ctx: PassContext, nodes: Iterable[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values ``nodes`` take on the example inputs (for per-layer SQNR); one holding NaN or inf (a layer
    before it with such a weight, which Quantize leaves float) is left out: that layer is not measured."""
    got: dict[fx.Node, torch.Tensor] = {}
    watch = {n: (lambda v, n=n: got.__setitem__(n, v)) for n in nodes}
    run_watching(gm, [(tuple(ctx.example_args), dict(ctx.example_kwargs))], watch, finite=False)
    return got
