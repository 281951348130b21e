"""Mixture-of-experts weights: the experts of a transformers 5.x MoE block (Mixtral, Qwen2-MoE, ...) are not
linear layers but 3-D tensors, (experts, out, in) or (experts, in, out), multiplied by a grouped GEMM
(``transformers::grouped_mm_fallback`` on the CPU, ``aten._grouped_mm`` on a GPU) over the tokens routed to
each expert. They hold most of such a model's weights, so ``Quantize`` stores them quantized too, weight-only
with the same scheme as the linear layers (int8 per output channel of each expert, int4 per group along
the input axis): the graph reads ``dequantize(w_q, s_w)`` in place of the float tensor, and the grouped GEMM
stays in float there. The triton backend lowers the int8 form to ``kernels.grouped_weight_only`` (the routed
tokens times the int8 experts, dequantized per tile), and int4 in groups of a power of two >= 32 to
``int4_grouped_weight_only`` (packed two per byte); other int4 groups keep the dequantize + float GEMM.

    grouped_mm(x, transpose(W, -2, -1), offs)     W: (E, N, K)   ->  transpose(dequantize(w_q, s_w), -2, -1)
    grouped_mm(x, W, offs)                        W: (E, K, N)   ->  transpose(dequantize(w_q, s_w), -2, -1)
                                                                     with w_q stored (E, N, K)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.fx as fx

from .. import ir
from ..quant import QScheme, dequantize_tensor_torch, fp32_bytes, qparams_torch, quantize_tensor_torch, weight_bytes
from ..quant.clip import search_qparams_torch
from ..quant.gptq import gptq_quantize, output_error
from .manager import sqnr_db
from .quant_calibration import budget_runs, run_watching

aten = torch.ops.aten
sf = torch.ops.slimfx
_TRANSPOSES = (aten.transpose.int, aten.permute.default)


def grouped_gemm_ops() -> set:
    """The grouped GEMMs transformers' MoE blocks call (those this torch and transformers provide)."""
    ops = set()
    if hasattr(aten, "_grouped_mm"):
        ops.add(aten._grouped_mm.default)
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        ops.add(transformers_ops.grouped_mm_fallback.default)
    return ops


@dataclasses.dataclass
class ExpertWeight:
    node: fx.Node           # the get_attr of the float (E, ., .) tensor
    rows_out: bool          # True: stored (E, N, K) and transposed before the GEMM; False: stored (E, K, N)
    gemms: list             # the grouped GEMM nodes reading it

    @property
    def name(self) -> str:
        return ir.meta.param_name(self.node) or self.node.target

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def swaps_last_two(node: fx.Node) -> bool:
    """``node`` transposes the last two axes of a 3-D tensor (how a GEMM reads an (E, N, K) experts' tensor)."""
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return False
    if node.target is aten.transpose.int:
        return sorted(d % 3 for d in node.args[1:3]) == [1, 2]
    return list(node.args[1]) == [0, 2, 1]


def expert_weights(gm: fx.GraphModule) -> tuple[list[ExpertWeight], dict[str, str]]:
    """The 3-D float tensors that only feed grouped GEMMs as their weight (directly or transposed), and the
    ones left alone with why."""
    ops = grouped_gemm_ops()
    found: dict[fx.Node, ExpertWeight] = {}
    skipped: dict[str, str] = {}
    for gemm in gm.graph.nodes:
        if gemm.op != "call_function" or gemm.target not in ops or len(gemm.args) < 2:
            continue
        src, rows_out = expert_source(gemm)
        if src is None:
            continue
        t = ir.meta.tensor_attr(gm, src)
        if t.ndim != 3 or not t.is_floating_point():
            continue
        ew = found.setdefault(src, ExpertWeight(src, rows_out, []))
        if ew.rows_out != rows_out:
            skipped[ew.name] = "used both transposed and not"
        ew.gemms.append(gemm)
    chosen = []
    for src, ew in found.items():
        if ew.name in skipped:
            continue
        if set(src.users) != ({g.args[1] for g in ew.gemms} if ew.rows_out else set(ew.gemms)):
            skipped[ew.name] = "read by other ops than the grouped GEMM"
        else:
            chosen.append(ew)
    return chosen, skipped


def expert_source(gemm: fx.Node) -> tuple[Optional[fx.Node], bool]:
    """A grouped GEMM's experts' tensor as a get_attr node, and whether the GEMM reads it transposed (stored
    (E, N, K)); (None, False) when its weight is computed (a dequantize)."""
    w = gemm.args[1] if len(gemm.args) > 1 else None
    rows_out = isinstance(w, fx.Node) and swaps_last_two(w)
    src = w.args[0] if rows_out else w
    return (src, rows_out) if isinstance(src, fx.Node) and src.op == "get_attr" else (None, False)


def watch_expert_rows(watch: dict, gemm: fx.Node, add, of: Optional[fx.Node] = None) -> None:
    """Add to a ``run_watching`` dict what calls ``add(e, rows)`` with each expert's rows of ``gemm``'s input
    (rows offs[e-1]:offs[e]; experts no row reached are not called) on every run; of node ``of`` instead when
    given (a value laid out in the GEMM's rows, as its output)."""
    seen: dict = {}

    def put(key):
        def callback(v):
            seen[key] = v
            if "x" in seen and "offs" in seen:          # both values of this run: split the rows
                rows, start = seen.pop("x"), 0
                for e, end in enumerate(seen.pop("offs").tolist()):
                    if end > start:
                        add(e, rows[start:end])
                    start = end
        return callback
    chain_watch(watch, gemm.args[0] if of is None else of, put("x"))
    chain_watch(watch, gemm_offsets(gemm), put("offs"))


def gemm_offsets(gemm: fx.Node):
    """A grouped GEMM's offsets: the end row of each expert's tokens in its input."""
    return gemm.args[2] if len(gemm.args) > 2 else gemm.kwargs.get("offs")


def chain_watch(watch: dict, node: fx.Node, cb) -> None:
    """Add callback ``cb`` for ``node`` to a ``run_watching`` dict, after any it has (one offsets tensor feeds
    every grouped GEMM of its MoE block)."""
    prev = watch.get(node)
    watch[node] = cb if prev is None else (lambda v, a=prev, b=cb: (a(v), b(v)))


def ew_shape(gm: fx.GraphModule, ew: ExpertWeight) -> tuple[int, int, int]:
    """(experts, out, in) of an expert tensor, whichever way it is stored."""
    e, a, b = ir.meta.tensor_attr(gm, ew.node).shape
    return (e, a, b) if ew.rows_out else (e, b, a)


class ExpertMeanSquares:
    """Per expert: the sum of squares of each input column over the rows routed to it, and how many rows (on
    the CPU, whatever device the graph runs on)."""

    def __init__(self, e: int, k: int):
        self.sum = torch.zeros(e, k, dtype=torch.float64)
        self.n = torch.zeros(e, dtype=torch.float64)

    def add(self, e: int, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float64)
        self.sum[e] += rows.square().sum(0).cpu()
        self.n[e] += rows.shape[0]

    def mean(self) -> torch.Tensor:
        """(E, K) mean squares (0 for an expert no row reached)."""
        return (self.sum / self.n.clamp(min=1)[:, None]).to(torch.float32)


def hessian_runs(gm: fx.GraphModule, experts: list[ExpertWeight], diagonal: bool = False,
                 budget: Optional[int] = None) -> list[list[ExpertWeight]]:
    """The experts' tensors in graph order, in runs whose input statistics (``expert_hessians``: E K x K fp64
    matrices per GEMM reading the tensor, or E K-vectors with ``diagonal``) fit ``budget`` bytes together
    (default ``quant_calibration.HESSIAN_BYTES``; a tensor over it alone is a run of its own). Mixtral-8x7B's
    experts need ~450 GB of Hessians: one run for all would not fit."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def need(ew):
        e, _, k = ew_shape(gm, ew)
        return e * k * (1 if diagonal else k) * 8 * len(ew.gemms)
    return budget_runs(sorted(experts, key=lambda ew: min(order[g] for g in ew.gemms)), need, budget)


def expert_hessians(gm: fx.GraphModule, experts: list[ExpertWeight], calls, progress: bool, who: str,
                    diagonal: bool = False, stop_early: bool = False) -> dict:
    """{expert tensor's node: [H_e per expert]}: X_e X_e^T / n_e of the rows each expert's GEMM block reads
    (rows offs[e-1]:offs[e] of the grouped GEMM's input) over ``calls``, summed over the GEMMs reading it; with
    ``diagonal`` only its diagonal (each column's mean square: what the scale search needs), a K-vector.
    An expert no calibration token reached gets None (it falls back to rounding to nearest). ``stop_early``:
    each calibration run stops after the last of these GEMMs' inputs."""
    from ..quant.gptq import Hessian
    watch, per_gemm = {}, {}
    for ew in experts:
        n_exp, _, k = ew_shape(gm, ew)
        for gemm in ew.gemms:
            if gemm in per_gemm:
                continue
            if diagonal:
                acc = per_gemm[gemm] = ExpertMeanSquares(n_exp, k)
                watch_expert_rows(watch, gemm, acc.add)
            else:
                hs = per_gemm[gemm] = [Hessian(k) for _ in range(n_exp)]
                watch_expert_rows(watch, gemm, lambda e, rows, hs=hs: hs[e].add(rows))
    if run_watching(gm, calls, watch, progress, f"{who}: expert input statistics", stop_early=stop_early) == 0:
        raise ValueError(f"{who}: the calibration data is empty")
    out = {}
    for ew in experts:
        total = [None] * ew_shape(gm, ew)[0]
        for gemm in ew.gemms:
            acc = per_gemm[gemm]
            parts = list(zip((acc.n > 0).tolist(), acc.mean())) if diagonal else \
                [(h.n > 0, h.value() if h.n else None) for h in acc]
            for i, (reached, h) in enumerate(parts):
                if reached:
                    total[i] = h if total[i] is None else total[i] + h
        out[ew.node] = total
    return out


def quantize_expert_weight(gm: fx.GraphModule, ew: ExpertWeight, scheme: QScheme, module: str,
                           hessians: Optional[list] = None, damp: float = 0.01, act_order: bool = True,
                           gptq: bool = True, clip: bool = False) -> dict:
    """Replace the float tensor by transpose(dequantize(w_q, s_w)) / dequantize(w_q, s_w) with w_q (E, N, K)
    int8 codes, rounded to nearest or, given each expert's input Hessian (None for an expert calibration never
    reached), chosen by GPTQ expert by expert; returns the tensor's record. ``gptq=False`` with Hessians:
    round to nearest with scales searched (``quant.clip``) by the error weighted by each expert's input
    mean squares (the Hessians' diagonals), as ``Quantize(clip=True)``; with ``gptq`` those searched scales
    are GPTQ's too."""
    return fit_expert_weight(gm, ew, scheme, module, hessians, damp, act_order, gptq, clip)()


def fit_expert_weight(gm: fx.GraphModule, ew: ExpertWeight, scheme: QScheme, module: str,
                      hessians: Optional[list] = None, damp: float = 0.01, act_order: bool = True,
                      gptq: bool = True, clip: bool = False) -> Callable[[], dict]:
    """``quantize_expert_weight`` in two steps: the codes now, and a function that puts them in the graph and
    returns the record, for when every run's Hessians have been gathered from the float graph."""
    w = ir.meta.tensor_attr(gm, ew.node).detach().to(torch.float32)
    enk = w if ew.rows_out else w.transpose(1, 2)            # (experts, out, in): scales per output channel
    e, n, k = enk.shape
    flat = enk.reshape(e * n, k)
    if scheme.granularity == "group" and k % scheme.group_size:
        raise ValueError(f"Quantize: group_size={scheme.group_size} does not divide K={k} of the experts "
                         f"{ew.name!r}; choose a divisor or exclude {module!r}")
    qp = qparams_torch(flat, scheme, name=f"experts {ew.name}")
    chooser = [None] * e
    if hessians is not None and clip:           # each reached expert's scales by search, on its own inputs
        def searcher(i, h):         # (h: a Hessian or its diagonal)
            d = h if h.ndim == 1 else h.diagonal()
            return lambda part, sch, cols: search_qparams_torch(part, sch, d[cols], name=f"expert {i} of {ew.name}")
        chooser = [None if h is None else searcher(i, h) for i, h in enumerate(hessians)]
        scales = [qp.scale.reshape(e, n, -1)[i] if c is None else c(enk[i], scheme, slice(0, k)).scale.reshape(n, -1)
                  for i, c in enumerate(chooser)]
        qp = qp._replace(scale=torch.stack(scales).reshape(qp.scale.shape))
    codes = quantize_tensor_torch(flat, scheme, qp)
    gptq_rec = None
    if hessians is not None and gptq:
        rtn_error = output_errors(enk, dequantize_tensor_torch(codes, scheme, qp).view(e, n, k), hessians)
        parts = [gptq_quantize(enk[i], h, scheme, damp, act_order=act_order, name=f"expert {i} of {ew.name}",
                               choose_qparams=chooser[i]) if h is not None else None for i, h in enumerate(hessians)]
        rtn_codes, rtn_scale = codes.view(e, n, k), qp.scale.reshape(e, n, -1)
        codes = torch.cat([p[0] if p else rtn_codes[i] for i, p in enumerate(parts)])
        scale = torch.stack([p[1].scale.reshape(n, -1) if p else rtn_scale[i] for i, p in enumerate(parts)])
        qp = qp._replace(scale=scale.reshape(qp.scale.shape))
        gptq_error = output_errors(enk, dequantize_tensor_torch(codes, scheme, qp).view(e, n, k), hessians)
        gptq_rec = {"experts_fitted": sum(p is not None for p in parts), "output_error": gptq_error,
                    "output_error_rtn": rtn_error}
    error = sqnr_db(flat, dequantize_tensor_torch(codes, scheme, qp))
    w_range, clipped = [float(w.min()), float(w.max())], hessians is not None and clip
    dtype = w.dtype if ew.node.meta.get("val") is None else ew.node.meta["val"].dtype
    return lambda: _put_expert_weight(gm, ew, scheme, module, codes, qp, (e, n, k), dtype, error, gptq_rec,
                                      w_range, clipped)


def _put_expert_weight(gm, ew, scheme, module, codes, qp, shape, dtype, error, gptq_rec, w_range, clipped) -> dict:
    g = gm.graph
    e, n, k = shape
    new = []
    with g.inserting_before(ew.node):
        def attr(suffix, t):
            node = g.get_attr(ir.meta.add_tensor_attr(gm, f"{ew.node.target}.{suffix}", t.contiguous()))
            new.append(node)
            return node

        def call(target, *args, **kwargs):
            node = g.call_function(target, args, kwargs)
            new.append(node)
            return node

        if scheme.granularity == "group":
            G = scheme.group_size
            wq = attr("w_q", codes.reshape(e, n, k // G, G))
            ws = attr("w_scale", qp.scale.to(torch.float32).reshape(e, n, k // G, 1))
            wd = call(aten.view.default, call(sf.dequantize.default, wq, ws, None), [e, n, k])
        else:
            wq = attr("w_q", codes.reshape(e, n, k))
            ws = attr("w_scale", qp.scale.to(torch.float32).reshape(e, n, 1))
            wd = call(sf.dequantize.default, wq, ws, None)
        if dtype != torch.float32:
            wd = call(aten._to_copy.default, wd, dtype=dtype)
        if not ew.rows_out:
            wd = call(aten.transpose.int, wd, 1, 2)          # back to (E, K, N), as the GEMM read it
    for node in new:
        node.meta.update({k_: v for k_, v in ew.node.meta.items() if k_ == "nn_module_stack"})
        ir.meta.info(node).origin = "quantize"
    ew.node.replace_all_uses_with(wd)
    g.erase_node(ew.node)
    rec = {"module": module, "tensor": ew.name, "shape": [e, n, k], "weight": scheme.to_dict(),
           "fp32_bytes": fp32_bytes((e, n, k)), "weight_bytes": weight_bytes((e * n, k), scheme),
           "weight_sqnr_db": None if error == float("inf") else round(error, 2),
           "mode": "weight-only (grouped GEMM in float)", "method": "gptq" if gptq_rec else "rtn",
           "clip": clipped, "weight_range": w_range}
    if gptq_rec:
        rec["gptq"] = gptq_rec
    ir.meta.info(wd).quant = rec            # what the report lists (the GEMM's weight is this node)
    return rec


def output_errors(w: torch.Tensor, wq: torch.Tensor, hessians: list) -> Optional[float]:
    """GPTQ's relative output error of each expert calibration reached (``output_error``), averaged."""
    errs = [output_error(w[i], wq[i], h) for i, h in enumerate(hessians) if h is not None]
    return round(sum(errs) / len(errs), 8) if errs else None
