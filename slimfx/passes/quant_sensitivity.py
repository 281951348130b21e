"""Per-layer quantization sensitivity: quantize one layer at a time and measure the model's output SQNR.

    rows = sensitivity(model, (), dict(input_ids=ids), Quantize(activations="dynamic"))
    print(format_sensitivity(rows))      # most sensitive first: exclude those layers from Quantize
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional

from .. import ir
from .base import PassContext
from .manager import run_torch, sqnr_db
from .quantize import Quantize


def sensitivity(model, example_inputs: tuple = (), example_kwargs: Optional[dict] = None,
                quantize: Quantize = Quantize(), calibration: Optional[Iterable] = None,
                dynamic=None, progress: bool = True) -> list[dict]:
    """One row per layer ``quantize`` would select: {"module", "sqnr_db" (model output, that layer alone
    quantized, vs fp32), "layer_sqnr_db" (the layer's own output)}, sorted from most to least sensitive.
    ``model`` may be a ``slimfx.capture`` of the model (then without example inputs or ``dynamic``)."""
    from tqdm.auto import tqdm
    from ..api import CapturedModel, _calibration_list
    from ..signature import InputSignature
    calibration = _calibration_list(calibration)     # before capturing: one batch given as the set is refused
    if isinstance(model, CapturedModel) and isinstance(example_inputs, Quantize):    # sensitivity(cap, Quantize())
        example_inputs, quantize = (), example_inputs
    model = CapturedModel.given("sensitivity", model, example_inputs, example_kwargs, dynamic)
    gm, example_inputs, kwargs = model.graph, model.captured.example_args, model.captured.example_kwargs
    ctx = PassContext(example_inputs, kwargs, calibration, progress=False,
                      check_call=InputSignature.from_capture(model.model, model.captured).check)
    ref = run_torch(gm, ctx)
    layers, _ = quantize.select(gm)
    rows = []
    for lin in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress, leave=False):
        name = ir.meta.module_name(lin) or lin.name
        one = dataclasses.replace(quantize, include=(f"re:^{re.escape(name)}$",), exclude=())
        res = one(ir.fork(gm), ctx)
        recs = [ir.meta.info(n).quant for n in res.graph_module.graph.nodes
                if n.meta.get("slimfx") is not None and ir.meta.info(n).quant and "mode" in ir.meta.info(n).quant]
        rows.append({"module": name, "sqnr_db": sqnr_db(ref, run_torch(res.graph_module, ctx)),
                     "layer_sqnr_db": recs[0].get("sqnr_db") if recs else None})
    return sorted(rows, key=lambda r: r["sqnr_db"])


def format_sensitivity(rows: list[dict]) -> str:
    from ..ir.printer import format_table
    f = lambda v: "-" if v is None else f"{v:.1f}"
    return format_table(["module", "model SQNR dB (this layer alone)", "layer SQNR dB"],
                        [[r["module"], f(r["sqnr_db"]), f(r["layer_sqnr_db"])] for r in rows], "lrr")
