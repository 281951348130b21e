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
    """' awq a=0.4' for a layer AWQ scaled (its group's alpha), '' otherwise."""
    return f" awq a={rec['alpha']:g}" if rec and rec.get("alpha") else ""


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
        """One row per linear layer (float, quantized, fused): module, weight shape, dtype, sparsity, and what
        the backend runs for it."""
        rows = []
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and n.target in _linear_ops() and isinstance(n.args[1], fx.Node) \
                    and n.args[1].op == "get_attr":
                w = ir.meta.tensor_attr(self.gm, n.args[1])
                q = (ir.meta.info(n).quant or {}) if n.meta.get("slimfx") else {}
                rows.append({"module": q.get("module") or ir.meta.module_name(n.args[1]) or ir.meta.module_name(n)
                             or n.name,
                             "op": str(n.target).replace(".default", ""),
                             "out x in": f"{w.shape[0]} x {w.shape[1]}",
                             "dtype": str(w.dtype).replace("torch.", ""),
                             "sparsity": float((w == 0).float().mean()),
                             "kernel": ir.meta.info(n).kernel or f"{self.backend} dense"})
        return rows

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
            rows.append({"module": q["module"], "mode": q["mode"],
                         "weight": f"{w['kind']} int{w['bits']}" + (" gptq" if q.get("method") == "gptq" else "")
                         + (" clip" if q.get("clip") else "") + _awq(q.get("awq")),
                         "granularity": w["granularity"] + (f" {w['group_size']}" if w.get("group_size") else ""),
                         "act": ("-" if not ascheme else f"int{ascheme['bits']} per {ascheme['granularity']}"),
                         "w_range": q["weight_range"], "x_range": a.get("range") or q.get("x_range"),
                         "sqnr_db": q.get("sqnr_db"), "fp32_bytes": q["fp32_bytes"], "weight_bytes": q["weight_bytes"],
                         "op": q.get("folded", "Q/DQ + linear")})
        return rows

    def to_dict(self) -> dict:
        return {"model": self.model, "capture": self.capture_method, "backend": self.backend,
                "capture_s": self.capture_s, "capture_reused": self.capture_reused,
                "passes_s": sum(r.seconds for r in self.records), "lower_s": self.lower_s,
                "nodes_captured": self.captured_nodes, "nodes_final": len(self.gm.graph.nodes),
                "passes": [dataclasses.asdict(r) for r in self.records], "layers": self.layers(),
                "quantized": self.quant_layers()}

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
            out += ["", f"{len(layers)} linear layers:",
                    format_table(list(layers[0]), [[l["module"], l["op"], l["out x in"], l["dtype"],
                                                    f"{l['sparsity']:.1%}", l["kernel"]] for l in shown], "llrlrl")]
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
        return "\n".join(out)

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))
