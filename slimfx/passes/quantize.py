"""Post-training quantization of linear layers: ``Quantize`` inserts explicit quantize/dequantize (Q/DQ)
ops around ``aten.linear``; ``FoldQDQ`` (run by ``Quantize`` unless ``lower=False``) folds them into the
dialect's fused ops. Weights are quantized at pass time into new int8 tensors.

    weights  activations  Q/DQ form (lower=False)                       folded form
    int8     None         linear(x, dequantize(w_q, s_w))               weight_only_linear(x, w_q, s_w)
    int4     None         linear(x, view(dequantize(w_q3, s_w3)))       weight_only_linear(.., group_size=G)
    int8     dynamic      linear(dequantize(*quantize_per_token(x)),    quantized_linear(x, w_q, s_w, b)
                                 dequantize(w_q, s_w))
    int8     static       linear(dequantize(quantize(x, s_x), s_x), ..) quantized_linear(quantize(x, s_x), .., s_x)
    log8/4   any          linear(.., log_dequantize(w_q, s_w))          (not folded: no fused log kernel)

Weight schemes: int8 symmetric per output channel, int4 symmetric per group of ``group_size`` along K
(codes stored one per int8; ``weight_bytes`` counts them packed, as slimfx stores them), log per channel.
Activation schemes: dynamic symmetric int8 per token; static symmetric int8 per tensor from observers run
over ``ctx.calibration``. Every quantized layer records in ``ir.meta.info(node).quant`` what was done.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import operator
import re
import warnings
from typing import Optional

import torch
import torch.fx as fx
from tqdm.auto import tqdm

import slimfx.ir.dialect  # noqa: F401  (registers torch.ops.slimfx.*)

from .. import ir
from ..quant import (MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver, QScheme,
                     dequantize_tensor_torch, fp32_bytes, qparams_torch, quantize_tensor_torch, weight_bytes)
from ..quant.clip import search_qparams_torch
from ..quant.gptq import gptq_quantize, output_errors
from ..quant.linear import MAX_K
from .awq import apply_awq
from .awq_experts import apply_moe_awq
from .base import Pass, PassContext, PassResult, number_in, register_pass
from .manager import sqnr_db
from .quant_calibration import budget_runs, calibration_calls, example_values, hessian_bytes, input_hessians, \
    input_mean_squares, run_watching
from .quantize_experts import expert_hessians, expert_weights, fit_expert_weight, hessian_runs, \
    quantize_expert_weight

aten = torch.ops.aten
sf = torch.ops.slimfx

WEIGHTS = ("int8", "int4", "log8", "log4")
ACTIVATIONS = {None: None, "none": None, "dynamic": "dynamic", "dynamic-per-token": "dynamic",
               "static": "static", "static-per-tensor": "static"}
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
METHODS = ("rtn", "gptq")
ACT_SCHEME = QScheme(bits=8, granularity="tensor")


def matches(name: str, patterns) -> bool:
    """Does the module name match one of ``patterns``: globs (``*.q_proj``), or regexes as ``re:<regex>``."""
    return any(re.search(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p) for p in patterns)


def module_patterns(v, what: str = "include/exclude") -> tuple:
    """An include/exclude argument (``what`` names it in errors: "Quantize.exclude") as a tuple of patterns: one
    string is one pattern, None none; a regex (``re:<regex>``) that does not compile is refused here, not when
    the pass runs."""
    if v is None:
        return ()
    pats = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list, set, frozenset)) else None
    if pats is None or not all(isinstance(p, str) for p in pats):
        raise ValueError(f"{what}: expected a module-name pattern or a list of them (\"*.q_proj\", "
                         f"\"re:<regex>\"), got {v!r}")
    for p in pats:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{what}: pattern {p!r} is not a valid regex: {e}") from None
    return pats


LINEARS = (aten.linear.default, sf.fused_linear.default, sf.sparse_linear.default, sf.quantized_linear.default,
           sf.weight_only_linear.default)


def layer_names(gm: fx.GraphModule) -> list[str]:
    """The names include/exclude see for the graph's linear layers (each layer of a GEMM Fuse merged)."""
    return [p for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS
            for p in ir.meta.merged_modules(n) or [ir.meta.module_name(n) or n.name]]


def unmatched_include(gm: fx.GraphModule, include, layers=None) -> dict:
    """{"include": why} when ``include`` selects none of ``layers`` (the names the pass selects by; default the
    graph's linear layers), else {}: for the statistics' "skipped", so a pass that selected nothing says so.
    Either no pattern matches a module of the graph (a pattern missing its "*."), or some match modules but none
    of their layers: a pattern selects a layer by the layer's own name, so a block's name ("mha", an
    nn.MultiheadAttention whose layers are "mha.in_proj" and "mha.out_proj"; "encoder.layer.0", whose ops all
    run in its submodules) selects nothing, and the message names the layers under it."""
    if not include:
        return {}
    named = {ir.meta.module_name(n) for n in gm.graph.nodes} - {""}
    # a module with ops of its own, or a block above one (a name prefix: "encoder.layer.0" of its query)
    modules = named | {name.rsplit(".", k)[0] for name in named for k in range(1, name.count(".") + 1)}
    if not any(matches(name, include) for name in modules):
        example = next((ir.meta.module_name(n) for n in gm.graph.nodes if n.op == "call_function"
                        and n.target is aten.linear.default and ir.meta.module_name(n)), "")
        return {"include": f"{list(include)} matches no module of the graph" +
                (f" (its names look like {example!r}: a glob such as '*.{example.rsplit('.', 1)[-1]}' matches "
                 f"in every block)" if example else "")}
    layers = sorted(set(layer_names(gm) if layers is None else layers))
    idle = [p for p in include if not any(matches(name, (p,)) for name in layers)
            and any(matches(m, (p,)) for m in modules)]
    if not idle:
        return {}
    under = [name for name in layers
             if any(matches(m, (p,)) and name.startswith(m + ".") for p in idle for m in modules)]
    globs = [f"'{p}.*'" for p in idle if not p.startswith("re:")]
    return {"include": f"{idle} match modules but none of their layers (a pattern selects a layer by its own name)"
            + (f": the layers under them are {under[:4]}{' ...' if len(under) > 4 else ''}" if under else "")
            + (f"; {', '.join(globs)} selects them" if under and globs else "")}


def selected_linears(gm: fx.GraphModule, include, exclude, targets=(aten.linear.default,),
                     skipped: Optional[dict] = None):
    """(node, module name) of each node calling one of ``targets`` (aten.linear) whose module name passes
    the include/exclude patterns. A GEMM merged from several layers (Fuse's merge_qkv) passes when all of its
    layers do (its name: ``ir.meta.layer_name``); one whose layers the patterns split goes into ``skipped`` with
    why: it can only be taken whole."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in targets:
            parts = ir.meta.merged_modules(n)
            names = parts or [ir.meta.module_name(n) or n.name]
            ok = [(not include or matches(p, include)) and not matches(p, exclude) for p in names]
            name = ir.meta.layer_name(n)
            if all(ok):
                yield n, name
            elif any(ok) and skipped is not None:
                chosen = [p.rsplit(".", 1)[-1] for p, o in zip(parts, ok) if o]
                skipped[name] = (f"one GEMM merged by Fuse from {len(parts)} layers, of which include/exclude "
                                 f"select only {chosen}: it goes whole or not at all (select all its layers or "
                                 f"none, or run this pass before Fuse)")


def _divisors(k: int) -> str:
    """Group sizes that divide K, for an error message: its powers of two (the kernels' groups), else any."""
    twos = [g for g in (256, 128, 64, 32, 16, 8) if k % g == 0]
    return "e.g. " + ", ".join(map(str, twos[:3])) if twos else \
        f"K = {k} has no power-of-two divisor >= 8; divisors: {[g for g in range(2, k + 1) if k % g == 0][:6]}"


def weight_scheme(weights: str, group_size: int) -> QScheme:
    if weights == "int8":
        return QScheme(bits=8, granularity="channel", axis=0)
    if weights == "int4":
        return QScheme(bits=4, granularity="group", group_size=group_size)
    return QScheme(kind="log", bits=int(weights[3:]), granularity="channel", axis=0)


def quantized_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that carry a quantized linear layer's record (``ir.meta.info(node).quant``; an experts'
    tensor's record, on its dequantized weight, has a "tensor")."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("slimfx") is not None
            and "mode" in (ir.meta.info(n).quant or {}) and "tensor" not in ir.meta.info(n).quant]


@register_pass(name="quantize")
@dataclasses.dataclass
class Quantize(Pass):
    """Quantize the selected linear layers.

    weights:      "int8" (per channel), "int4" (grouped, ``group_size`` along K), "log8"/"log4" (log, per channel)
    activations:  None (weight-only), "dynamic" (int8 per token, at run time), "static" (int8 per tensor, calibrated)
    include/exclude: module-name globs ("*.q_proj", "lm_head") or "re:<regex>"; empty include = every layer
    op_types:     which ops to quantize (only "linear" so far)
    observer:     static calibration: "minmax", "moving_average" (0.01), "percentile" (99.99) or "mse"
    lower:        fold the Q/DQ ops into the fused dialect ops (``FoldQDQ``); False keeps the explicit form
    measure_layers: per-layer SQNR (quantized layer vs float, same float input) on the example inputs
    method:       "rtn" rounds each weight to nearest; "gptq" (``slimfx.quant.gptq``) chooses the integers
                  that minimize each layer's output error on ``ctx.calibration`` (same scheme, same ops and
                  kernels: only the stored integers and group scales differ), with ``damp`` of the mean
                  Hessian diagonal added for stability; ``act_order`` (default) takes the most excited input
                  columns first, groups then keeping RTN's scales (SmolLM2 W4 g64: perplexity +18.6% vs fp32
                  with it, +31.4% without, +44.7% by RTN). Hessians come from the graph as it is when the
                  pass runs (float inputs), or with ``sequential`` layer by layer from the graph with the
                  layers before already quantized (one calibration run per group of layers sharing an
                  input, each stopped at that input).
    clip:         choose each weight scale (per channel or group) among absmax x [1, 0.975, .., 0.5] by the
                  weight error weighted by its input column's mean square on ``ctx.calibration``
                  (``slimfx.quant.clip``; with GPTQ, its scales too). SmolLM2 W4 g64: +22.9% vs fp32
                  instead of RTN's +44.7%, and with GPTQ +10.6% instead of +18.6%. int8/int4 weights.
    awq:          activation-aware scaling (``slimfx.passes.awq``) before quantizing, weight-only: per group
                  of linears reading one input, input channels scaled by rms(x)^alpha (alpha searched by the
                  layers' output error on ``ctx.calibration``), 1/s folded into the norm or the producing
                  linear's rows, or (``awq_insert_mul``) a new mul before the layer; mixture-of-experts
                  blocks (``slimfx.passes.awq_experts``) by one scale of the block input for the router,
                  shared experts and experts, and per expert a scale of its down input into its up rows."""
    weights: str = "int8"
    activations: Optional[str] = None
    group_size: int = 128
    include: tuple = ()
    exclude: tuple = ()
    op_types: tuple = ("linear",)
    observer: str = "minmax"
    lower: bool = True
    measure_layers: bool = True
    method: str = "rtn"
    damp: float = 0.01
    act_order: bool = True
    sequential: bool = False
    clip: bool = False
    awq: bool = False
    awq_insert_mul: bool = True

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"Quantize.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"Quantize.activations must be one of {list(ACTIVATIONS)}, got {self.activations!r}")
        if self.activations is not None and self.weights != "int8" and not self.weights.startswith("log"):
            raise ValueError(f"Quantize: int8 activations need int8 or log weights, got weights={self.weights!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"Quantize.observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.method not in METHODS:
            raise ValueError(f"Quantize.method must be one of {METHODS}, got {self.method!r}")
        if self.sequential and self.method != "gptq":
            raise ValueError("Quantize(sequential=True) orders GPTQ's calibration: it needs method='gptq'")
        self.damp = number_in(self.damp, "Quantize.damp", 0, 1, open_lo=True, open_hi=True)
        if self.weights == "int4" or self.group_size is not None:        # (int8 and log weights ignore it)
            self.group_size = number_in(self.group_size, "Quantize.group_size", 1, integer=True)
        if (self.clip or self.awq) and self.weights not in ("int8", "int4"):
            raise ValueError(f"Quantize(clip/awq): uniform int8 or int4 weights, got weights={self.weights!r}")
        if self.awq and self.activations is not None:
            raise ValueError("Quantize(awq=True) scales for weight-only quantization (activations=None); "
                             "for int8 activations use SmoothQuant before Quantize")
        if tuple(self.op_types) != ("linear",):
            raise ValueError(f"Quantize.op_types: only ('linear',) is supported so far, got {self.op_types!r}")
        self.include = module_patterns(self.include, "Quantize.include")
        self.exclude = module_patterns(self.exclude, "Quantize.exclude")

    @property
    def mode(self) -> str:
        w = {"int8": "W8", "int4": f"W4g{self.group_size}", "log8": "logW8", "log4": "logW4"}[self.weights]
        a = {None: "A16", "dynamic": "A8 dynamic per-token", "static": "A8 static per-tensor"}[ACTIVATIONS[self.activations]]
        return w + a

    def select(self, gm: fx.GraphModule) -> tuple[list[fx.Node], dict[str, str]]:
        """The linear nodes to quantize, and the skipped ones with why."""
        chosen, skipped = [], {}
        for n, name in selected_linears(gm, self.include, self.exclude, skipped=skipped):
            w = n.args[1]
            if not isinstance(w, fx.Node) or w.op != "get_attr":
                skipped[name] = ir.meta.computed_weight(w)
                continue
            t = ir.meta.tensor_attr(gm, w)
            if t.ndim != 2 or not t.is_floating_point():
                skipped[name] = f"weight of shape {tuple(t.shape)} / {t.dtype} is not a 2-D float tensor"
            elif not torch.isfinite(t).all():
                skipped[name] = "weight holds NaN or inf"
            elif self.weights == "int4" and t.shape[1] % self.group_size:
                raise ValueError(f"Quantize: group_size={self.group_size} does not divide K={t.shape[1]} of layer "
                                 f"{name!r} (node {n.name}); choose a divisor ({_divisors(t.shape[1])}) or exclude "
                                 f"the layer")
            elif self.activations is not None and t.shape[1] > MAX_K:
                skipped[name] = f"K={t.shape[1]} > {MAX_K} could overflow the int32 accumulator"
            else:
                chosen.append(n)
        for n, name in selected_linears(gm, self.include, self.exclude, (sf.fused_linear.default,
                                                                        sf.sparse_linear.default), skipped):
            skipped[name] = f"{str(n.target).replace('.default', '')}: Quantize takes aten.linear (run it before " \
                            f"Fuse and LowerSparse)"
        return chosen, skipped

    def run(self, gm, ctx):
        act = ACTIVATIONS[self.activations]
        chosen, skipped = self.select(gm)
        if self.include:           # the names it selects by: the linear layers, and the experts' stacked weights
            layers = layer_names(gm) + [ew.module for ew in expert_weights(gm)[0]]
            skipped.update(unmatched_include(gm, self.include, layers))
        w_scheme = weight_scheme(self.weights, self.group_size)
        awq_experts = self._chosen_experts(gm, {}) if self.awq else []
        calls = None
        if (self.method == "gptq" or self.awq or self.clip) and (chosen or awq_experts):
            # a list: sequential GPTQ runs them many times
            calls = list(calibration_calls(ctx, f"Quantize({self._calibrated_options()})"))
        moe_awq, moe_scaled, moe_records = None, set(), {}
        if awq_experts:                 # the experts' blocks first: their tensors are quantized next
            moe_awq, moe_scaled, moe_records = apply_moe_awq(gm, awq_experts, chosen, calls, w_scheme,
                                                             self.awq_insert_mul, ctx.progress)
        experts = self._quantize_experts(gm, ctx, skipped)
        for r in experts:
            if r["tensor"] in moe_records:
                r["awq"] = moe_records[r["tensor"]]
        if not chosen:
            if experts:
                gm.graph.eliminate_dead_code()
                ir.drop_unused_tensors(gm)
                gm.recompile()
                awq = {"awq": {"experts": moe_awq}} if moe_awq and moe_awq["blocks"] else {}
                mode = self.mode if ACTIVATIONS[self.activations] is None else \
                    self.mode.split("A8")[0] + "A16 (experts are weight-only; no dense layer was quantized)"
                return PassResult(gm, True, {"mode": mode, "layers": 0, **awq, **_expert_stats(experts),
                                             "skipped": skipped})
            return PassResult(gm, False, {"layers": 0, "skipped": skipped})
        x_nodes = list(dict.fromkeys(n.args[0] for n in chosen))
        gptq = self.method == "gptq"
        full = self.awq or (gptq and not self.sequential)           # every input's K x K Hessian
        runs = budget_runs(x_nodes, hessian_bytes) if full else [x_nodes]
        hessians, awq_counts = {}, None
        if full and len(runs) == 1:
            hessians = input_hessians(gm, calls, x_nodes, ctx.progress, "Quantize")
        if self.awq:
            groups = {x: [n for n in chosen if n.args[0] is x and n not in moe_scaled] for x in x_nodes}
            groups = {x: lins for x, lins in groups.items() if lins}
            if len(runs) == 1:
                hessians, awq_counts = apply_awq(gm, groups, hessians, w_scheme, self.awq_insert_mul, ctx.progress)
            else:       # run by run, each from the graph scaled so far (the scaling keeps the function)
                awq_counts = {}
                for i, run in enumerate(runs):
                    hs = input_hessians(gm, calls, run, ctx.progress, f"Quantize(awq=True), run {i + 1}/{len(runs)}")
                    hs, counts = apply_awq(gm, {x: groups[x] for x in run if x in groups}, hs, w_scheme,
                                           self.awq_insert_mul, ctx.progress)
                    awq_counts = {k: awq_counts.get(k, 0) + v for k, v in counts.items()}
                    if self.clip and not gptq:              # the scale search needs only the diagonals
                        hessians.update({x: h.diagonal().clone() for x, h in hs.items()})
                    del hs
            x_nodes = list(dict.fromkeys(n.args[0] for n in chosen))
            if self.sequential:
                hessians = {}
            elif gptq and len(runs) > 1:
                runs = budget_runs(x_nodes, hessian_bytes)       # AWQ's muls are inputs now
        if self.clip and self.method != "gptq" and not hessians:
            hessians = input_mean_squares(gm, calls, x_nodes, ctx.progress, "Quantize(clip=True)")
        ranges = _static_ranges(gm, ctx, x_nodes, self.observer) if act == "static" else {}
        zero = [ir.meta.layer_name(n) for n in chosen if n.args[0] in ranges and max(map(abs, ranges[n.args[0]])) == 0]
        if zero:        # a scale fitted to nothing: any nonzero input saturates (all-zero calibration: 0.7 dB)
            warnings.warn(f"Quantize(activations='static'): the input of {len(zero)} layer(s) ({', '.join(zero[:5])}"
                          f"{', ...' if len(zero) > 5 else ''}) was 0 on every calibration batch, so their static "
                          f"scale saturates any other input; calibrate on inputs like the real ones, or use "
                          f"activations='dynamic'", RuntimeWarning)
        floats, refs = {}, {}
        if self.measure_layers and (ctx.example_args or ctx.example_kwargs):
            floats = example_values(gm, ctx, x_nodes)
            refs = {n.name: (n.args[0], ir.meta.tensor_attr(gm, n.args[1]), _bias(gm, n)) for n in chosen}
        narrow = _narrow_ranges(chosen, ranges, floats) if act == "static" and self.observer == "minmax" else {}
        if narrow:
            worst = sorted(narrow.items(), key=lambda kv: -kv[1])
            warnings.warn(f"Quantize(activations='static'): on the example inputs, the input of {len(narrow)} "
                          f"layer(s) reaches past the range calibrated for it ("
                          f"{', '.join(f'{k} {v:g}x' for k, v in worst[:5])}{', ...' if len(worst) > 5 else ''}), "
                          f"so such inputs saturate at the static scale; calibrate on inputs like the real ones "
                          f"(the example among them), or use activations='dynamic'", RuntimeWarning)
        # GPTQ in runs: every run's Hessians from the float graph, the layers replaced after the last run
        in_runs = gptq and not self.sequential and len(runs) > 1
        run_of = {x: i for i, run in enumerate(runs) for x in run} if in_runs else {}
        order = sorted(chosen, key=lambda n: run_of[n.args[0]]) if in_runs else chosen
        records, puts = [], []
        # a weight read by several layers (ALBERT's shared blocks, one module called twice) is quantized once: one
        # fit (GPTQ / clip on all its inputs together where their statistics are at hand) and one stored tensor
        uses = {}
        for lin in order:
            uses.setdefault(lin.args[1].target, []).append(lin)
        fitted = {}
        for lin in tqdm(order, desc="quantize: GPTQ", disable=not (ctx.progress and gptq), leave=False):
            x = lin.args[0]
            first = uses[lin.args[1].target][0]
            if first is not lin:            # the same weight as an earlier layer: its codes, stored once
                put = fitted[first]
                if in_runs:
                    puts.append((lin, lambda act, x_range, put=put, lin=lin, first=first: put(act, x_range, lin, first)))
                else:
                    records.append(put(act, ranges.get(x), lin, first))
                continue
            if in_runs and x not in hessians:
                i = run_of[x]
                hessians.clear()
                hessians.update(input_hessians(gm, calls, runs[i], ctx.progress,
                                               f"Quantize(method='gptq'), run {i + 1}/{len(runs)}"))
            elif gptq and x not in hessians:    # sequential: the layers before are quantized in the graph now
                hessians.update(input_hessians(gm, calls, [x], False, "Quantize(method='gptq')"))
            h = hessians.get(x)
            inputs = list(dict.fromkeys(u.args[0] for u in uses[lin.args[1].target]))
            if h is not None and len(inputs) > 1 and all(i in hessians for i in inputs):
                h = sum(hessians[i] for i in inputs)      # one weight's error over all the inputs it sees
            importance = None if h is None or not self.clip else (h if h.ndim == 1 else h.diagonal())
            put = fitted[lin] = self._fit_layer(gm, lin, w_scheme, h if gptq else None, importance)
            if in_runs:
                puts.append((lin, put))
            else:
                records.append(put(act, ranges.get(x)))
        records += [put(act, ranges.get(lin.args[0])) for lin, put in puts]
        hessians.clear()
        bytes_before = sum(r["fp32_bytes"] for r in experts + records)
        bytes_after = sum(r["weight_bytes"] for r in experts + records)
        gains = [_error_ratio(r["gptq"]["output_error"], r["gptq"]["output_error_rtn"]) for r in records if "gptq" in r]
        fold = FoldQDQ()
        folded = fold.run(gm, ctx).stats["folded"] if self.lower else 0
        gm.graph.eliminate_dead_code()
        ir.drop_unused_tensors(gm)
        gm.recompile()
        if floats:      # a layer's input may be a linear folded just now (Kimi's f_a_proj -> f_b_proj)
            replaced = getattr(fold, "replaced", {})          # (not folded: lower=False)
            refs = {k: (replaced.get(x, x), w, b) for k, (x, w, b) in refs.items()}
            floats = {replaced.get(x, x): v for x, v in floats.items()}
            _measure_layers(gm, floats, refs)
        extra = {"zero_input_range": zero} if zero else {}
        if narrow:
            extra["example_past_range"] = narrow
        if awq_counts is not None:
            extra["awq"] = {**awq_counts, **({"experts": moe_awq} if moe_awq and moe_awq["blocks"] else {})}
        if in_runs or (self.awq and len(runs) > 1):
            extra["hessian_runs"] = len(runs)
        if gains:    # geometric mean over layers of GPTQ's output error / RTN's (calibration inputs)
            extra["gptq_error_vs_rtn"] = (math.inf if math.inf in gains else
                                          round(math.exp(sum(math.log(max(g, 1e-300)) for g in gains) / len(gains)), 4))
        return PassResult(gm, True, {"mode": self.mode, "method": self.method, "clip": self.clip, **extra,
                                     "layers": len(chosen), **_expert_stats(experts), "folded": folded,
                                     "weight_bytes_fp32": bytes_before, "weight_bytes": bytes_after,
                                     "ratio": round(bytes_after / bytes_before, 4), "skipped": skipped})

    def _calibrated_options(self) -> str:
        """The options that made this pass need calibration, as the user wrote them."""
        opts = ([f"method={self.method!r}"] if self.method == "gptq" else []) + \
            [f"{k}=True" for k in ("awq", "clip") if getattr(self, k)]
        return ", ".join(opts)

    def _quantize_experts(self, gm, ctx, skipped: dict) -> list[dict]:
        """Mixture-of-experts tensors (quantize_experts): weight-only with the linear layers' scheme, each expert
        by GPTQ on the calibration tokens routed to it (method="gptq"; the float graph's routing) or RTN. Their
        Hessians (clip alone: their diagonals) are gathered in runs of MoE blocks that fit
        ``quant_calibration.HESSIAN_BYTES``, all from the float graph: the tensors are replaced after the last run."""
        chosen = self._chosen_experts(gm, skipped)
        scheme = weight_scheme(self.weights, self.group_size)
        gptq = self.method == "gptq"
        if not (gptq or self.clip):
            return [quantize_expert_weight(gm, ew, scheme, ew.module, None, gptq=False) for ew in chosen]
        puts, who = [], f"Quantize({self._calibrated_options()})"
        runs = hessian_runs(gm, chosen, diagonal=not gptq) if chosen else []
        calls = list(calibration_calls(ctx, who)) if chosen else []
        for run in runs:
            hessians = expert_hessians(gm, run, calls, ctx.progress, who, diagonal=not gptq, stop_early=len(runs) > 1)
            puts += [fit_expert_weight(gm, ew, scheme, ew.module, hessians[ew.node], self.damp,
                                       self.act_order, gptq=gptq, clip=self.clip) for ew in run]
            del hessians
        records = [put() for put in puts]
        if len(runs) > 1:
            for r in records:
                r["hessian_runs"] = len(runs)
        return records

    def _chosen_experts(self, gm, skipped: dict) -> list:
        """The experts' tensors this pass quantizes; the ones it cannot go into ``skipped`` with why."""
        if self.weights.startswith("log"):
            found, _ = expert_weights(gm)
            skipped.update({f"experts {ew.name}": f"weights={self.weights!r}: experts take uniform int8 / int4 "
                                                  f"only; they stay float" for ew in found})
            return []
        found, refused = expert_weights(gm)
        skipped.update({f"experts {k}": v for k, v in refused.items()})
        return [ew for ew in found if not (self.include and not matches(ew.module, self.include)
                                           or matches(ew.module, self.exclude))]

    def _quantize_layer(self, gm, lin: fx.Node, scheme: QScheme, act: Optional[str], x_range,
                        hessian: Optional[torch.Tensor] = None, importance: Optional[torch.Tensor] = None) -> dict:
        return self._fit_layer(gm, lin, scheme, hessian, importance)(act, x_range)

    def _fit_layer(self, gm, lin: fx.Node, scheme: QScheme, hessian: Optional[torch.Tensor] = None,
                   importance: Optional[torch.Tensor] = None):
        """The layer's weight codes now (by GPTQ given its input Hessian; scales by search given
        ``importance``); returns ``put(act, x_range)``, which writes them into the graph and returns the record
        (later, when every run of Hessians has been gathered from the float graph); ``put(act, x_range, at,
        shared_with)`` writes the same codes into another layer ``at`` reading the weight ``shared_with`` reads."""
        w = ir.meta.tensor_attr(gm, lin.args[1]).detach().to(torch.float32)
        name = ir.meta.layer_name(lin)
        n_out, k = w.shape
        choose = None
        if importance is not None:      # clip: scales by search (slimfx.quant.clip), for RTN and GPTQ alike
            choose = lambda part, sch, cols: search_qparams_torch(part, sch, importance[cols], name=f"weight of {name}")
        qp = choose(w, scheme, slice(0, k)) if choose else qparams_torch(w, scheme, name=f"weight of {name}")
        codes = quantize_tensor_torch(w, scheme, qp).contiguous()
        gptq_rec = None
        if hessian is not None:
            rtn = dequantize_tensor_torch(codes, scheme, qp)
            codes, qp = gptq_quantize(w, hessian, scheme, self.damp, act_order=self.act_order,
                                      name=f"weight of {name}", choose_qparams=choose)
            gptq = dequantize_tensor_torch(codes, scheme, qp)
            e_gptq, e_rtn = output_errors(w, [gptq, rtn], hessian)
            gptq_rec = {"damp": self.damp, "act_order": self.act_order, "output_error": e_gptq,
                        "output_error_rtn": e_rtn}
        w_range = [float(w.min()), float(w.max())]
        clipped = importance is not None
        return lambda act, x_range, at=lin, shared_with=None: self._put_layer(
            gm, at, scheme, act, x_range, codes, qp, gptq_rec, w_range, clipped, shared_with)

    def _put_layer(self, gm, lin: fx.Node, scheme: QScheme, act: Optional[str], x_range, codes, qp, gptq_rec,
                   w_range, clipped: bool, shared_with: Optional[fx.Node] = None) -> dict:
        g = gm.graph
        x = lin.args[0]
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        name = ir.meta.layer_name(lin)
        n_out, k = codes.shape
        stack = lin.meta.get("nn_module_stack")
        if stack is None and name != lin.name:      # a layer a pass added: its weight's module (meta.module_name)
            stack = lin.meta["nn_module_stack"] = {name: (name, "Linear")}
        new_nodes = []

        def attr(suffix, t):
            node = g.get_attr(ir.meta.add_tensor_attr(gm, f"{name}.{suffix}", t.contiguous()))
            new_nodes.append(node)
            return node

        def call(target, *args, **kwargs):
            node = g.call_function(target, args, kwargs)
            new_nodes.append(node)
            return node

        with g.inserting_before(lin):
            if scheme.granularity == "group":
                G = scheme.group_size
                wq = attr("w_q", codes.reshape(n_out, k // G, G))
                ws = attr("w_scale", qp.scale.to(torch.float32).reshape(n_out, k // G, 1))
                wd = call(aten.view.default, call(sf.dequantize.default, wq, ws, None), [n_out, k])
            else:
                wq, ws = attr("w_q", codes), attr("w_scale", qp.scale.to(torch.float32).reshape(n_out, 1))
                wd = (call(sf.log_dequantize.default, wq, ws, scheme.bits) if scheme.kind == "log"
                      else call(sf.dequantize.default, wq, ws, None))
            xd, act_rec = x, None
            if act == "dynamic":
                t = call(sf.quantize_per_token.default, x, 127)
                xd = call(sf.dequantize.default, call(operator.getitem, t, 0), call(operator.getitem, t, 1), None)
                act_rec = {"scheme": {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}}
            elif act == "static":
                lo, hi = x_range
                s = _static_scale(lo, hi)
                xs = attr("x_scale", s)
                xq = call(sf.quantize.default, x, xs, None, -127, 127)
                xd = call(sf.dequantize.default, xq, xs, None)
                act_rec = {"scheme": ACT_SCHEME.to_dict() | {"dynamic": False, "observer": self.observer},
                           "range": [float(lo), float(hi)], "scale": float(s)}
            dtype = ir.meta.dtype(x)
            if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
                # dequantize gives fp32: back to the layer's dtype (bf16/fp16 models), so the linear and what
                # reads it keep the model's dtype (FoldQDQ sees through these casts)
                wd = call(aten._to_copy.default, wd, dtype=dtype)
                if xd is not x:
                    xd = call(aten._to_copy.default, xd, dtype=dtype)
        for node in new_nodes:
            if stack is not None:
                node.meta["nn_module_stack"] = stack
            ir.meta.info(node).origin = "quantize"
        lin.args = (xd, wd, bias)
        lin.kwargs = {}
        rec = {"module": name, "node": lin.name, "mode": self.mode, "weight": scheme.to_dict(),
               "weight_range": w_range, "shape": [n_out, k], "activation": act_rec,
               "fp32_bytes": fp32_bytes((n_out, k)), "weight_bytes": weight_bytes((n_out, k), scheme),
               "sqnr_db": None, "method": self.method, "clip": clipped}
        if gptq_rec is not None:
            rec["gptq"] = gptq_rec
        if shared_with is not None:     # stored once: its bytes are counted with that layer
            rec.update(weight_shared_with=ir.meta.layer_name(shared_with), fp32_bytes=0, weight_bytes=0)
        ir.meta.info(lin).quant = {**(ir.meta.info(lin).quant or {}), **rec}     # keeps e.g. SmoothQuant's record
        return rec


def _error_ratio(gptq: float, rtn: float) -> float:
    """GPTQ's output error over RTN's on a layer: 1 where both are 0 (all-zero calibration inputs: neither errs,
    GPTQ no better; 0/0 counted as 0 made the pass's geometric mean 0, "infinitely better")."""
    if rtn > 0:
        return gptq / rtn
    return 1.0 if gptq == 0 else math.inf


def _expert_stats(records: list[dict]) -> dict:
    """The pass statistics' view of the expert tensors quantized (none: nothing to show)."""
    if not records:
        return {}
    def line(r):
        text = f"{r['shape'][0]} x {r['shape'][1]} x {r['shape'][2]}, weight-only, SQNR {r['weight_sqnr_db']} dB"
        if r.get("clip"):
            text += ", scales by clip search"
        awq = r.get("awq") or {}
        if awq.get("alpha"):
            text += f", AWQ alpha {awq['alpha']:g} (1/s into {awq['folded_into']})"
        if awq.get("down", {}).get("scaled"):
            text += f", AWQ on {awq['down']['scaled']}/{awq['down']['experts']} experts (1/s into their up rows)"
        if "gptq" in r:                     # relative output error on the calibration tokens, GPTQ vs RTN
            g = r["gptq"]
            text += (f", GPTQ on {g['experts_fitted']}/{r['shape'][0]} experts: output error "
                     f"{g['output_error']:.3g} (RTN {g['output_error_rtn']:.3g})") if g["output_error"] is not None \
                else ", GPTQ: no calibration token reached these experts (RTN)"
        return text
    runs = {"expert_hessian_runs": records[0]["hessian_runs"]} if "hessian_runs" in records[0] else {}
    return {"expert_tensors": len(records), **runs, "experts": {r["tensor"]: line(r) for r in records}}


def _bias(gm, lin: fx.Node) -> Optional[torch.Tensor]:
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return None if b is None else ir.meta.tensor_attr(gm, b)


def _static_scale(lo, hi) -> torch.Tensor:
    from ..quant import qparams_from_range_torch
    return qparams_from_range_torch(torch.tensor(float(lo)), torch.tensor(float(hi)), ACT_SCHEME).scale.to(torch.float32)


NARROW = 2.0    # the example's absmax over the calibrated one past which Quantize warns, with the minmax observer
                # only: percentile, MSE and moving-average ranges clip outliers by design


def _narrow_ranges(chosen, ranges: dict, floats: dict) -> dict[str, float]:
    """Layers whose input on the example inputs reaches past NARROW x the calibrated range's absmax, each with
    that ratio (rounded): calibration far narrower than the inputs the model is run on saturates them. Layers
    whose range is 0 are left to the all-zero warning."""
    out = {}
    for n in chosen:
        x = n.args[0]
        if x not in ranges or x not in floats:
            continue
        r = max(map(abs, ranges[x]))
        a = float(floats[x].detach().abs().amax()) if floats[x].numel() else 0.0
        if r > 0 and a > NARROW * r:
            out[ir.meta.layer_name(n)] = round(a / r, 2)
    return out


def _static_ranges(gm, ctx: PassContext, x_nodes, observer: str) -> dict:
    def make(n):
        if observer == "percentile":
            return PercentileObserver(99.99, name=n.name, max_samples=1 << 18)
        if observer == "mse":
            return MSEObserver(ACT_SCHEME, steps=50, name=n.name, max_samples=1 << 18)
        if observer == "moving_average":
            return MovingAverageMinMaxObserver(0.01, name=n.name)
        return MinMaxObserver(name=n.name)
    obs = {n: make(n) for n in x_nodes}
    calls = calibration_calls(ctx, "Quantize(activations='static')")
    count = run_watching(gm, calls, {n: o.observe for n, o in obs.items()}, ctx.progress, "quantize: calibrating")
    if count == 0:
        raise ValueError("Quantize(activations='static'): the calibration data is empty")
    return {n: tuple(float(v) for v in o.range()) for n, o in obs.items()}


# --- folding ---------------------------------------------------------------------------------------

def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _uncast(node):
    """``node`` without a dtype cast (``_to_copy(node, dtype=...)``: Quantize's return to a bf16/fp16 layer's dtype)."""
    if _is(node, aten._to_copy.default) and set(node.kwargs) == {"dtype"} and len(node.args) == 1:
        return node.args[0]
    return node


def _weight_dq(gm, w: fx.Node):
    """(w_q, w_scale flat, group_size) tensors of a dequantized weight feeding a linear, or None."""
    w = _uncast(w)
    if _is(w, aten.view.default) and _is(w.args[0], sf.dequantize.default):
        dq, grouped = w.args[0], True
    elif _is(w, sf.dequantize.default):
        dq, grouped = w, False
    else:
        return None
    q, s, z = (list(dq.args) + [None])[:3]
    if z is not None or q.op != "get_attr" or s.op != "get_attr":
        return None
    q, s = ir.meta.tensor_attr(gm, q), ir.meta.tensor_attr(gm, s)
    if q.dtype != torch.int8:
        return None
    if grouped:
        if q.ndim != 3 or tuple(s.shape) != (q.shape[0], q.shape[1], 1):
            return None
        return q.reshape(q.shape[0], -1), s.reshape(q.shape[0], q.shape[1]), q.shape[2]
    if q.ndim != 2 or tuple(s.shape) != (q.shape[0], 1):
        return None
    return q, s.reshape(q.shape[0]), 0


def _act_dq(x: fx.Node):
    """("dynamic", x) / ("static", q_node, scale_node) for a dequantized activation, else None."""
    x = _uncast(x)
    if not _is(x, sf.dequantize.default) or (len(x.args) > 2 and x.args[2] is not None):
        return None
    q, s = x.args[0], x.args[1]
    if (_is(q, operator.getitem) and _is(s, operator.getitem) and q.args[0] is s.args[0]
            and (q.args[1], s.args[1]) == (0, 1) and _is(q.args[0], sf.quantize_per_token.default)
            and (list(q.args[0].args) + [127])[1] == 127):
        return ("dynamic", q.args[0].args[0])
    if (_is(q, sf.quantize.default) and q.args[1] is s and q.args[2] is None and tuple(q.args[3:5]) == (-127, 127)
            and s.op == "get_attr"):
        return ("static", q, s)
    return None


@register_pass(name="fold_qdq")
@dataclasses.dataclass
class FoldQDQ(Pass):
    """Fold ``linear(dequantize(..x..), dequantize(w_q, s_w), b)`` into ``quantized_linear`` (int8 x and w) or
    ``weight_only_linear`` (float x). Layers whose pattern has no fused op (log weights, grouped weights
    with int8 activations) stay in Q/DQ form. In a bf16/fp16 layer the dequantized operands are cast back to
    its dtype; the fold sees through those casts, and a static layer (int8 x: fp32 out) gets its output cast."""

    def run(self, gm, ctx):
        g = gm.graph
        folded = casts = 0
        self.replaced = {}             # each folded linear -> the node computing it now
        for lin in list(g.nodes):
            if not _is(lin, aten.linear.default):
                continue
            wdq = _weight_dq(gm, lin.args[1])
            if wdq is None:
                continue
            wq, ws, G = wdq
            bias = lin.args[2] if len(lin.args) > 2 else None
            name = ir.meta.module_name(lin) or lin.name
            act = _act_dq(lin.args[0])
            if act is not None and G:
                continue
            with g.inserting_before(lin):
                wq_n = g.get_attr(ir.meta.add_tensor_attr(gm, f"{name}.w_q", wq.contiguous()))
                ws_n = g.get_attr(ir.meta.add_tensor_attr(gm, f"{name}.w_scale", ws.contiguous()))
                if act is None:
                    new = g.call_function(sf.weight_only_linear.default, (lin.args[0], wq_n, ws_n, None, bias, G))
                elif act[0] == "dynamic":
                    new = g.call_function(sf.quantized_linear.default, (act[1], wq_n, ws_n, bias))
                else:
                    new = g.call_function(sf.quantized_linear.default, (act[1], wq_n, ws_n, bias, act[2]))
            made, out = [wq_n, ws_n, new], new
            dtype = ir.meta.dtype(lin)
            if act is not None and act[0] == "static" and dtype not in (None, torch.float32):
                # int8 x gives fp32 out: back to the layer's dtype (a bf16/fp16 model), as the Q/DQ form computed
                with g.inserting_before(lin):
                    out = g.call_function(aten._to_copy.default, (new,), {"dtype": dtype})
                made.append(out)
                casts += 1
            for node in made:
                node.meta.update({k: v for k, v in lin.meta.items() if k in ("nn_module_stack", "stack_trace")})
            out.meta["val"] = lin.meta.get("val")
            info = ir.meta.info(new)
            info.quant, info.origin = ir.meta.info(lin).quant, "fold_qdq"
            if info.quant is not None:
                info.quant = dict(info.quant, folded=str(new.target).replace("slimfx.", "").split(".")[0])
            lin.replace_all_uses_with(out)
            g.erase_node(lin)
            self.replaced[lin] = new
            folded += 1
        if folded:
            g.eliminate_dead_code()
            ir.drop_unused_tensors(gm)
            gm.recompile()
            if casts:                      # the fp32 outputs under the casts
                ir.propagate_meta(gm)
        return PassResult(gm, folded > 0, {"folded": folded})


# --- per-layer SQNR ----------------------------------------------------------------------------------

def _eval(gm, node, env: dict):
    """Evaluate ``node`` in torch from ``env`` (the layer's float input) and the module's tensors."""
    if node in env:
        return env[node]
    if node.op == "get_attr":
        v = getattr(gm, node.target)
    elif node.op == "call_function":
        args = fx.node.map_arg(node.args, lambda a: _eval(gm, a, env))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: _eval(gm, a, env))
        v = node.target(*args, **kwargs)
    else:
        raise ValueError(f"per-layer SQNR: cannot evaluate {node.op} node {node.name} inside a layer")
    env[node] = v
    return v


def _measure_layers(gm, floats: dict, refs: dict) -> None:
    """Per quantized layer: SQNR of its output vs the float layer's, both on the float model's input
    (the example inputs), and the observed range of that input."""
    with torch.no_grad():
        for n in quantized_linears(gm):
            rec = ir.meta.info(n).quant
            if rec.get("node") not in refs:
                continue
            x_node, w, b = refs[rec["node"]]
            x = floats.get(x_node)
            if x is None:
                continue
            got = _eval(gm, n, {x_node: x})
            rec["sqnr_db"] = sqnr_db(torch.nn.functional.linear(x, w, b), got)
            rec["x_range"] = [float(x.min()), float(x.max())]
