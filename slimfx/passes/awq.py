"""Activation-aware weight scaling (AWQ; Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", 2023), run by ``Quantize(awq=True)`` before it quantizes the weights.

A weight that meets a large input matters more to the layer's output than one that meets a small input,
but absmax scales treat both alike. For the linears reading one input x, AWQ scales input channel j by

    s_j = rms(x_j)^alpha, normalized so that max(s) * min(s) = 1

(rms over the calibration tokens, from the input Hessian's diagonal), quantizes ``W diag(s)`` and divides
x by s where that is free (``scale_fold``: the norm before q/k/v and gate/up, up_proj's rows before
down_proj) or by a new ``mul`` (o_proj's input, where allowed). alpha is chosen per group of linears from
0, 1/grid, ..., 1 by the layers' output error on the calibration inputs, sum_i tr(D_i H D_i^T) with
D_i = W_i - dequant(quant(W_i diag(s))) diag(s)^-1 and H = X^T X / n; alpha = 0 (no scaling, plain RTN)
is on the grid, so the chosen scaling never raises that error, and a group that alpha = 0 serves best
is left as it was. The layers' Hessians after the scaling are H / (s s^T), exactly: GPTQ and the clip
search that follow use them without another calibration run.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .. import ir
from ..quant import QScheme, fake_quantize_torch
from .scale_fold import scale_input

GRID = 10       # alpha = 0, 0.1, ..., 1 (AWQ's own grid has 20 points; 10 lost nothing measurable on SmolLM2)


def output_error_sum(ws: list[torch.Tensor], s: torch.Tensor, h: torch.Tensor, scheme: QScheme) -> float:
    """sum_i tr(D_i H D_i^T) for the weights ``ws`` quantized after scaling their input channels by s."""
    total = 0.0
    for w in ws:
        d = w - fake_quantize_torch(w * s, scheme) / s
        total += float(((d @ h) * d).sum())
    return total


def search_scale(ws: list[torch.Tensor], h: torch.Tensor, scheme: QScheme, grid: int = GRID,
                 extra: Optional[Callable[[torch.Tensor], float]] = None) -> tuple[float, torch.Tensor, float, float]:
    """(alpha, s, error with s, error without scaling) for the weights ``ws`` reading one input whose
    Hessian is ``h`` (module docstring); ``extra(s)``: more error to add (the experts reading that input)."""
    def error(s):
        return output_error_sum(ws, s, h, scheme) + (extra(s) if extra is not None else 0.0)

    h = h.to(ws[0].device if ws else h.device, torch.float32)
    rms = h.diagonal().clamp(min=0).sqrt()
    live = rms > 0
    if not bool(live.any()):
        return 0.0, torch.ones_like(rms), 0.0, 0.0
    floor = rms[live].min()
    rms = torch.where(live, rms, floor)                  # a column never excited keeps the smallest scale
    base = error(torch.ones_like(rms))
    best = (0.0, torch.ones_like(rms), base)
    for i in range(1, grid + 1):
        alpha = i / grid
        s = rms.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], base


def apply_awq(gm: fx.GraphModule, groups: dict[fx.Node, list[fx.Node]], hessians: dict[fx.Node, torch.Tensor],
              scheme: QScheme, allow_mul: bool, progress: bool = False) -> tuple[dict, dict[str, int]]:
    """Scale each group of linears (keyed by their shared input) by its searched s, in graph order. Returns
    the Hessians keyed by the node each group reads now (x, or the inserted mul), scaled to match, and
    counts of where the scales went ("norm", "linear", "mul", "unscaled": alpha = 0 won, "left": no place to
    put 1/s)."""
    out = dict(hessians)
    counts = {"norm": 0, "linear": 0, "mul": 0, "unscaled": 0, "left": 0}
    for x, lins in tqdm(list(groups.items()), desc="quantize: AWQ", disable=not progress, leave=False):
        h = hessians[x]
        ws = [ir.meta.tensor_attr(gm, l.args[1]).detach().to(torch.float32) for l in lins]
        alpha, s, err, base = search_scale(ws, h, scheme)
        rec = {"alpha": alpha, "output_error": err, "output_error_unscaled": base}
        if alpha == 0.0:
            counts["unscaled"] += 1
            rec["folded_into"] = None
        else:
            done = scale_input(gm, x, lins, s, allow_mul, "awq")
            if done is None:
                counts["left"] += 1
                rec.update(alpha=0.0, output_error=base, folded_into=None)
            else:
                how, where, now = done
                counts[how] += 1
                rec["folded_into"] = where if how != "mul" else "mul"
                rec["s_min"], rec["s_max"] = float(s.min()), float(s.max())
                del out[x]
                out[now] = (h.to(torch.float64) / (s[:, None] * s[None, :]).to(torch.float64)).to(h.dtype)
        for l in lins:
            ir.meta.info(l).quant = dict(ir.meta.info(l).quant or {}, awq=rec)
    return out, counts
