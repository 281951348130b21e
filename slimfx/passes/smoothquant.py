"""SmoothQuant: migrate activation outliers into the weights before int8 activation quantization.

For the linears reading one input x (e.g. q/k/v, or gate/up), per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        max|X_j| from calibration, max|W_j| over all those linears
then x / s (folded into the producing LayerNorm / RMSNorm weight when the norm output feeds only these
linears; else a new ``mul`` by 1/s) and W[:, j] * s_j (new tensors). The float function is unchanged up
to fp32 rounding; run ``Quantize(activations=...)`` after it."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from .. import ir
from ..quant import MinMaxObserver
from .base import Pass, PassResult, register_pass
from .quant_calibration import calibration_calls, run_watching
from .quantize import selected_linears

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
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant.alpha must be in [0, 1], got {self.alpha}")
        self.include = (self.include,) if isinstance(self.include, str) else tuple(self.include)
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)

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
        folded = inserted = skipped = 0
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
            how = self._fold_into_norm(gm, x, lins, s)
            if how is None:
                if not self.insert_mul:
                    skipped += 1
                    continue
                self._insert_mul(gm, x, lins, s)
                how = "mul"
                inserted += 1
            else:
                folded += 1
            for l, w in zip(lins, ws):
                name = ir.meta.module_name(l) or l.name
                with gm.graph.inserting_before(l):
                    nw = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{name}.weight_smoothed", w * s))
                nw.meta.update({k: v for k, v in l.args[1].meta.items() if k != "slimfx_param"})
                l.args = (l.args[0], nw, *l.args[2:])
                ir.meta.info(l).quant = dict(ir.meta.info(l).quant or {}, smoothquant={
                    "alpha": self.alpha, "folded_into": how, "s_min": float(s.min()), "s_max": float(s.max())})
        gm.graph.eliminate_dead_code()
        ir.drop_unused_tensors(gm)
        gm.recompile()
        return PassResult(gm, folded + inserted > 0, {"groups": len(groups), "folded_into_norm": folded,
                                                       "mul_inserted": inserted, "skipped": skipped})

    def _fold_into_norm(self, gm, x: fx.Node, lins: list[fx.Node], s: torch.Tensor) -> Optional[str]:
        """Divide the norm's affine parameters by s when x is a norm output read only by ``lins``."""
        if set(x.users) != set(lins) or x.op != "call_function":
            return None
        if x.target is aten.layer_norm.default:
            params = [a for a in x.args[2:4] if isinstance(a, fx.Node)]
            if not params or x.args[2] is None or any(p.op != "get_attr" for p in params):
                return None
            where = {2: x.args[2]} | ({3: x.args[3]} if len(x.args) > 3 and isinstance(x.args[3], fx.Node) else {})
        elif x.target is aten.mul.Tensor:       # RMSNorm: weight * normalized
            where = {i: a for i, a in enumerate(x.args[:2]) if isinstance(a, fx.Node) and a.op == "get_attr"
                     and ir.meta.tensor_attr(gm, a).shape == s.shape}
            if len(where) != 1:
                return None
        else:
            return None
        args = list(x.args)
        for i, p in where.items():
            t = ir.meta.tensor_attr(gm, p).detach()
            with gm.graph.inserting_before(x):
                args[i] = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{p.target}_smoothed", (t / s).to(t.dtype)))
            args[i].meta.update({k: v for k, v in p.meta.items() if k != "slimfx_param"})
        x.args = tuple(args)
        return ir.meta.module_name(x) or x.name

    def _insert_mul(self, gm, x: fx.Node, lins: list[fx.Node], s: torch.Tensor) -> None:
        name = ir.meta.module_name(lins[0]) or lins[0].name
        with gm.graph.inserting_before(lins[0]):
            inv = gm.graph.get_attr(ir.meta.add_tensor_attr(gm, f"{name}.smooth_inv_scale", 1.0 / s))
            m = gm.graph.call_function(aten.mul.Tensor, (x, inv))
        if "nn_module_stack" in lins[0].meta:
            m.meta["nn_module_stack"] = lins[0].meta["nn_module_stack"]
            inv.meta["nn_module_stack"] = lins[0].meta["nn_module_stack"]
        for l in lins:
            l.args = (m, *l.args[1:])
