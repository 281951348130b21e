"""SmoothQuant: migrate activation outliers into the weights before int8 activation quantization.

For the linears reading one input x (e.g. q/k/v, or gate/up), per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        max|X_j| from calibration, max|W_j| over all those linears
then x / s (``scale_fold``: folded into the producing LayerNorm / RMSNorm weight, or into the output rows of
the linear producing x (Llama's up_proj before down_proj), when only these linears read x; else a new
``mul`` by 1/s) and W[:, j] * s_j (new tensors). The float function is unchanged up to fp32 rounding; run
``Quantize(activations=...)`` after it."""
from __future__ import annotations

import dataclasses
import numpy as np
import torch
import torch.fx as fx

from .. import ir
from ..quant import MinMaxObserver
from .base import Pass, PassResult, number_in, register_pass
from .quant_calibration import calibration_calls, run_watching
from .quantize import module_patterns, selected_linears
from .scale_fold import scale_input

aten = torch.ops.aten


@register_pass(name="smoothquant")
@dataclasses.dataclass
class SmoothQuant(Pass):
    """alpha: migration strength (0: nothing moves to the weights, 1: all); include/exclude: module-name
    globs or "re:<regex>" of the linears to smooth; insert_mul: smooth linears whose input is not a norm
    output by inserting x * (1/s) (False: leave them alone)."""
    alpha: float = 0.5
    include: tuple = ()
    exclude: tuple = ()
    insert_mul: bool = True
    min_scale: float = 1e-5

    def __post_init__(self):
        self.alpha = number_in(self.alpha, "SmoothQuant.alpha", 0, 1)
        self.include = module_patterns(self.include, "SmoothQuant.include")
        self.exclude = module_patterns(self.exclude, "SmoothQuant.exclude")

    def _groups(self, gm) -> dict[fx.Node, list[fx.Node]]:
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n, _ in selected_linears(gm, self.include, self.exclude):
            w = n.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr" and ir.meta.tensor_attr(gm, w).ndim == 2:
                groups.setdefault(n.args[0], []).append(n)
        return groups

    def run(self, gm, ctx):
        groups = self._groups(gm)
        if not groups:
            return PassResult(gm, False, {"groups": 0})
        obs = {x: MinMaxObserver(axis=-1, name=x.name) for x in groups}
        run_watching(gm, calibration_calls(ctx, "SmoothQuant"), {x: o.observe for x, o in obs.items()},
                     ctx.progress, "smoothquant: calibrating")
        counts = {"norm": 0, "linear": 0, "mul": 0}
        skipped = 0
        for x, lins in groups.items():
            lo, hi = obs[x].range()
            x_max = torch.from_numpy(np.maximum(-lo, hi).reshape(-1).astype(np.float32))
            ws = [ir.meta.tensor_attr(gm, l.args[1]).detach().to(torch.float32) for l in lins]
            w_max = torch.stack([w.abs().amax(dim=0) for w in ws]).amax(dim=0)
            if x_max.numel() != w_max.numel():
                skipped += 1
                continue
            s = (x_max.pow(self.alpha) / w_max.clamp(min=1e-12).pow(1 - self.alpha)).clamp(min=self.min_scale)
            s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
            done = scale_input(gm, x, lins, s, self.insert_mul, "smoothed")
            if done is None:
                skipped += 1
                continue
            how, where, _ = done
            counts[how] += 1
            for l in lins:
                ir.meta.info(l).quant = dict(ir.meta.info(l).quant or {}, smoothquant={
                    "alpha": self.alpha, "folded_into": where if how != "mul" else "mul",
                    "s_min": float(s.min()), "s_max": float(s.max())})
        gm.graph.eliminate_dead_code()
        ir.drop_unused_tensors(gm)
        gm.recompile()
        return PassResult(gm, sum(counts.values()) > 0, {
            "groups": len(groups), "folded_into_norm": counts["norm"], "folded_into_linear": counts["linear"],
            "mul_inserted": counts["mul"], "skipped": skipped})
