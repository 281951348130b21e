"""The compile report: per pass time, node count and SQNR against the original model; per layer what
the graph now holds. Prints as tables; ``to_dict`` gives JSON-able data."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.fx as fx

from . import ir
from .ir.printer import format_table
from .passes import PassRecord

aten = torch.ops.aten


def _stored_weight(n: fx.Node):
    """The get_attr node of the tensor a linear's weight is stored as: the weight itself, or the codes of a
    weight dequantized in the graph (Quantize's Q/DQ form: log weights, ``lower=False``), through the
    dequantize op and any view or dtype cast after it; None for a weight computed otherwise."""
    sf = torch.ops.slimfx
    w = n.args[1] if len(n.args) > 1 else None
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return w
    for _ in range(3):                  # (_to_copy ->) (view ->) dequantize -> the codes
        if not (isinstance(w, fx.Node) and w.op == "call_function"):
            return None
        if w.target in (sf.dequantize.default, sf.log_dequantize.default):
            return w.args[0] if isinstance(w.args[0], fx.Node) and w.args[0].op == "get_attr" else None
        if w.target not in (aten.view.default, aten._to_copy.default):
            return None
        w = w.args[0]
    return None


def _linear_ops() -> set:
    """aten.linear and the slimfx dialect's linear ops (weight as argument 1)."""
    sf = torch.ops.slimfx
    return {aten.linear.default} | {getattr(sf, name).default for name in
                                    ("quantized_linear", "weight_only_linear", "fused_linear", "sparse_linear")
                                    if hasattr(sf, name)}


def _clip(text: str, width: int) -> str:
    """One table cell of at most ``width`` characters (``to_dict`` keeps the whole value)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _awq(rec) -> str:
    """' awq a=0.4' for a layer AWQ scaled (its group's alpha), ' awq 4/4 experts' for experts' down inputs
    scaled expert by expert, '' otherwise."""
    down = (rec or {}).get("down") or {}
    return f" awq a={rec['alpha']:g}" if rec and rec.get("alpha") else \
        f" awq {down['scaled']}/{down['experts']} experts" if down.get("scaled") else ""


def _expert_weight(gm: fx.GraphModule, gemm: fx.Node) -> Optional[tuple[str, tuple, torch.Tensor, Optional[dict]]]:
    """(name, (experts, out, in), the stored tensor, its Quantize record or None) of the experts' tensor a
    grouped GEMM multiplies by: float (a module tensor, maybe transposed) or as ``Quantize`` stores it (int8
    codes dequantized, the record on the node the GEMM reads)."""
    from .passes.quantize_experts import expert_source
    w = gemm.args[1] if len(gemm.args) > 1 else None
    if not isinstance(w, fx.Node):
        return None
    n, q = w, None
    while n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node):
        if q is None and n.meta.get("slimfx") and "tensor" in (ir.meta.info(n).quant or {}):
            q = ir.meta.info(n).quant
        n = n.args[0]                            # transpose / cast / view / dequantize, back to the codes
    if q is not None:
        return q["tensor"], tuple(q["shape"]), ir.meta.tensor_attr(gm, n) if n.op == "get_attr" else None, q
    src, rows_out = expert_source(gemm)
    if src is None:
        return None
    t = ir.meta.tensor_attr(gm, src)
    e, a, b = t.shape
    return ir.meta.param_name(src) or src.target, (e, a, b) if rows_out else (e, b, a), t, None


def _gptq_errors(g) -> Optional[list]:
    """[GPTQ's, rounding's] relative output error of a layer on its calibration inputs, or None."""
    if not g or g.get("output_error") is None:
        return None
    return [g["output_error"], g["output_error_rtn"]]


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    return str(v)


def _db(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "exact" if v == math.inf else f"{v:.1f}"


@dataclasses.dataclass
class Report:
    model: str
    capture_method: str
    backend: str
    capture_s: float
    lower_s: float
    records: list[PassRecord]
    captured_nodes: int
    gm: fx.GraphModule
    max_layer_rows: int = 12
    capture_reused: bool = False          # compiled from a slimfx.capture: capture_s was spent once, before

    def layers(self) -> list[dict]:
        """One row per linear layer (float, quantized, fused) and per mixture-of-experts grouped GEMM (its
        experts' tensor, experts x out x in): module, weight shape, dtype, sparsity, and what the backend runs
        for it."""
        from .passes.quantize_experts import grouped_gemm_ops
        gemm_ops = grouped_gemm_ops()
        rows = []
        for n in self.gm.graph.nodes:
            found = _expert_weight(self.gm, n) if n.op == "call_function" and n.target in gemm_ops else None
            if found is not None:
                name, shape, t, q = found
                rows.append({"module": name, "op": str(n.target).replace(".default", "").split(".")[-1],
                             "out x in": " x ".join(map(str, shape)),
                             "dtype": "-" if t is None else str(t.dtype).replace("torch.", ""),
                             "sparsity": float("nan") if t is None else float((t == 0).float().mean()),
                             "kernel": ir.meta.info(n).kernel or f"{self.backend} "
                             + ("dequantize + grouped GEMM" if q else "grouped GEMM")})
            stored = _stored_weight(n) if n.op == "call_function" and n.target in _linear_ops() else None
            if stored is not None:
                w = ir.meta.tensor_attr(self.gm, stored)
                q = (ir.meta.info(n).quant or {}) if n.meta.get("slimfx") else {}
                out_in = ir.meta.shape(n.args[1]) if stored is not n.args[1] else w.shape   # codes may be grouped
                rows.append({"module": q.get("module") or (ir.meta.layer_name(n) if ir.meta.merged_modules(n) else
                                                           ir.meta.module_name(n.args[1]) or ir.meta.module_name(n)
                                                           or n.name),
                             "op": str(n.target).replace(".default", "") + ("" if stored is n.args[1] else " (Q/DQ)"),
                             "out x in": " x ".join(map(str, out_in)),        # (a 1-D weight: "in")
                             "dtype": str(w.dtype).replace("torch.", ""),
                             "sparsity": float((w == 0).float().mean()),
                             "kernel": ir.meta.info(n).kernel or self._dense_kernel(n, w)})
        return rows

    def _dense_kernel(self, n: fx.Node, w: torch.Tensor) -> str:
        """What a backend without a kernel choice runs for a linear: on numpy, an int8 layer's exact GEMM as this
        CPU runs it (slimfx.quant.numerics.cpu_int8_gemm: torch._int_mm or the float32 blocks)."""
        if self.backend == "numpy" and n.target is torch.ops.slimfx.quantized_linear.default and w.dim() == 2:
            from .quant.numerics import cpu_int8_gemm
            return f"numpy int8 GEMM: {cpu_int8_gemm(w.shape[1])}"
        return f"{self.backend} dense"

    def quant_layers(self) -> list[dict]:
        """One row per quantized layer (``ir.meta.info(node).quant``): scheme, bits, granularity, observed
        ranges, the layer's SQNR vs float on the example inputs, weight bytes fp32 -> stored."""
        rows = []
        for n in self.gm.graph.nodes:
            q = n.meta.get("slimfx") and ir.meta.info(n).quant
            if not q or "mode" not in q:
                continue
            w, a = q["weight"], q.get("activation") or {}
            ascheme = a.get("scheme", {})
            rows.append({"module": q.get("tensor") or q["module"], "mode": q["mode"],
                         "weight": f"{w['kind']} int{w['bits']}" + (" gptq" if q.get("method") == "gptq" else "")
                         + (" clip" if q.get("clip") else "") + _awq(q.get("awq")),
                         "granularity": w["granularity"] + (f" {w['group_size']}" if w.get("group_size") else ""),
                         "act": ("-" if not ascheme else f"int{ascheme['bits']} per {ascheme['granularity']}"),
                         "w_range": q["weight_range"], "x_range": a.get("range") or q.get("x_range"),
                         "sqnr_db": q.get("sqnr_db"), "fp32_bytes": q["fp32_bytes"], "weight_bytes": q["weight_bytes"],
                         "gptq_error": _gptq_errors(q.get("gptq")),
                         "op": (q.get("folded") or ("dequantize + grouped GEMM" if "tensor" in q else "Q/DQ + linear"))
                         + (f" (weight stored once, with {q['weight_shared_with']})" if q.get("weight_shared_with")
                            else "")})
        return rows

    def to_dict(self) -> dict:
        """The report as strict JSON data: non-finite numbers (an exact pass's SQNR is inf) become the strings
        "inf", "-inf" and "nan", anything else not JSON-able (a tensor in a pass's statistics) its str."""
        return _json_safe({"model": self.model, "capture": self.capture_method, "backend": self.backend,
                           "capture_s": self.capture_s, "capture_reused": self.capture_reused,
                           "passes_s": sum(r.seconds for r in self.records), "lower_s": self.lower_s,
                           "nodes_captured": self.captured_nodes, "nodes_final": len(self.gm.graph.nodes),
                           "passes": [dataclasses.asdict(r) for r in self.records], "layers": self.layers(),
                           "quantized": self.quant_layers()})

    def __str__(self) -> str:
        passes_s = sum(r.seconds for r in self.records)
        reused = ", once for every compile of the capture" if self.capture_reused else ""
        head = (f"slimfx report: {self.model}, captured with {self.capture_method} "
                f"({self.captured_nodes} nodes, {self.capture_s:.2f} s{reused}), backend {self.backend} "
                f"(lowered in {self.lower_s:.2f} s)")
        rows = [[i, r.name, f"{r.seconds * 1e3:.1f}", f"{r.nodes_before} -> {r.nodes_after}",
                 "yes" if r.modified else "no", _db(r.sqnr_db),
                 _clip(", ".join(f"{k}={v}" for k, v in r.stats.items()), 110)]
                for i, r in enumerate(self.records, 1)]
        rows.append(["", "total", f"{passes_s * 1e3:.1f}", f"{self.captured_nodes} -> {len(self.gm.graph.nodes)}",
                     "", _db(self.records[-1].sqnr_db) if self.records else "-", ""])
        out = [head, "", format_table(["#", "pass", "ms", "nodes", "changed", "SQNR dB", "stats"], rows,
                                      "rllllrl")]
        layers = self.layers()
        if layers:
            shown = layers[: self.max_layer_rows]
            gemms = sum("grouped" in row["op"] for row in layers)
            title = f"{len(layers) - gemms} linear layers" + \
                (f" and {gemms} experts' grouped GEMMs (experts x out x in)" if gemms else "")
            out += ["", title + ":",
                    format_table(list(layers[0]), [[r["module"], r["op"], r["out x in"], r["dtype"],
                                                    f"{r['sparsity']:.1%}", r["kernel"]] for r in shown], "llrlrl")]
            if len(layers) > len(shown):
                out.append(f"... {len(layers) - len(shown)} more (report().layers() lists them all)")
        q = self.quant_layers()
        if q:
            rng = lambda r: "-" if not r else f"[{r[0]:.3g}, {r[1]:.3g}]"
            before, after = sum(r["fp32_bytes"] for r in q), sum(r["weight_bytes"] for r in q)
            out += ["", f"{len(q)} quantized layers (SQNR: the layer's output vs float on the example inputs):",
                    format_table(["module", "weights", "granularity", "activations", "weight range",
                                  "input range", "SQNR dB", "bytes fp32 -> stored", "op"],
                                 [[r["module"], r["weight"], r["granularity"], r["act"], rng(r["w_range"]),
                                   rng(r["x_range"]), _db(r["sqnr_db"]), f"{r['fp32_bytes']} -> {r['weight_bytes']}",
                                   r["op"]] for r in q], "lllllrrrl"),
                    f"weight bytes of the quantized layers: {before} -> {after} ({after / before:.3f}x)"]
            gptq = [r for r in q if r["gptq_error"]]
            if gptq:          # the relative output error on the calibration inputs each layer was fitted to
                out += ["", "GPTQ: each layer's output error on the calibration inputs, GPTQ's vs rounding's:",
                        format_table(["module", "GPTQ", "round to nearest", "ratio"],
                                     [[r["module"], f"{r['gptq_error'][0]:.3g}", f"{r['gptq_error'][1]:.3g}",
                                       f"{r['gptq_error'][0] / max(r['gptq_error'][1], 1e-300):.3f}"] for r in gptq],
                                     "lrrr")]
        return "\n".join(out)

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))
