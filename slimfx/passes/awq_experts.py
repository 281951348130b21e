"""AWQ for mixture-of-experts blocks, run by ``Quantize(awq=True)`` before the experts' tensors are quantized.

An MoE block reads its input x (the post-attention norm's output) in several places: the router, the shared
experts' linears and, through a gather of each expert's tokens, the grouped GEMM over the experts' gate/up
tensor (``quantize_experts``). One channel scale s serves all of them (as AWQ scales Mixtral's experts and
router together): every reader's weight becomes ``W diag(s)`` (each expert's slice of the 3-D tensor along its
input axis), and ``1 / s`` goes into the norm (``scale_fold.fold_into_norm``) when nothing else reads x, or
into a new mul before the readers (``awq_insert_mul``). s = rms(x)^alpha over all calibration tokens, with
alpha searched as in ``awq`` by the quantized readers' output error: tr(D H D^T) for the linears (H their
input Hessian), and for expert e of a tensor (n_e / n) sum_k D_e[:, k]^2 m_e[k], with m_e the mean squares of
the n_e rows routed to it (the diagonal of its Hessian: E K x K matrices per tensor would not fit for real
models). Unquantized readers (an excluded router) are scaled too, exactly, and add no error.

Each expert's down tensor reads act(gate) * up, whose up columns come from the gate/up GEMM: expert e's down
input channels are scaled by its own s_e = rms_e^alpha_e (alpha_e searched on its own tokens), and 1 / s_e
goes into expert e's up rows of the gate/up tensor, as ``awq`` folds a dense MLP's scale into up_proj. A
block whose down input is anything else (GPT-OSS's ``(up + 1) * glu``, a bias after the GEMM) keeps its down
tensor unscaled, with the reason.

The float function is unchanged up to fp32 rounding; alpha = 0 (no scaling) is on the grid, so a block the
scaling would not help is left as it was.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .. import ir
from ..quant import QScheme, fake_quantize_torch
from .awq import GRID, search_scale
from .prune_structured import ELEMENTWISE
from .quant_calibration import budget_runs, run_watching
from .quantize_experts import (ExpertMeanSquares, ExpertWeight, expert_source, expert_weights, gemm_offsets,
                               grouped_gemm_ops, watch_expert_rows)
from .scale_fold import _CASTS, _VIEWS, _new_attr, _not_last, fold_into_linear, fold_into_norm, insert_mul

aten = torch.ops.aten
CHUNK = 1 << 24         # elements of an experts' tensor quantized at once by the search


@dataclasses.dataclass
class MoeInput:
    """What reads one MoE block's input: through reshapes keeping the channel axis, casts, and gathers of rows."""
    root: fx.Node                   # the value every reader reads (the norm's output)
    branches: list                  # root's users on the way to the readers (what a new mul feeds)
    linears: list                   # linear layers reading it
    gemms: list                     # grouped GEMMs reading its gathered rows
    others: list                    # anything else reading it (no fold into the norm then)
    mixed: bool = False             # one of those reads it on the way to a reader (no mul either)


def _passes_rows(n: fx.Node) -> bool:
    """n is its first input with the channel (last) axis intact: a reshape keeping it, a cast, a slice along
    another axis, or a gather of rows (``x[idx]``, how an MoE block picks each expert's tokens)."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    shape, src = ir.meta.shape(n), ir.meta.shape(n.args[0])
    if shape is None or src is None or not shape or not src:
        return False
    if n.target in _VIEWS:
        return shape[-1] == src[-1]
    if n.target in _CASTS:
        return shape == src and set(n.kwargs) <= {"dtype", "memory_format"}
    if n.target is aten.slice.Tensor:
        return _not_last(n, len(shape))
    if n.target is aten.index.Tensor:
        idx = n.args[1]
        return len(src) == 2 and len(idx) == 1 and isinstance(idx[0], fx.Node)
    return False


def _gathered_root(n: fx.Node) -> Optional[fx.Node]:
    """What a grouped GEMM's input n is a gather of rows of (through ``_passes_rows``), or None: the experts'
    first GEMM reads the block input that way, their down GEMM reads their own rows."""
    gathered = False
    while _passes_rows(n):
        gathered |= n.target is aten.index.Tensor
        n = n.args[0]
    return n if gathered else None


_METADATA = {aten.sym_size.int, aten.sym_numel.default, aten.empty_like.default, aten.zeros_like.default,
             aten.ones_like.default}


def _reads_no_values(u: fx.Node, n: fx.Node) -> bool:
    """u reads only n's dtype or shape (GraniteMoE casts its routing weights ``type_as`` the block input)."""
    return u.op == "call_function" and (u.target in _METADATA or u.target is aten.type_as.default
                                        and u.args[0] is not n and u.args[1] is n)


def moe_input(root: fx.Node) -> MoeInput:
    """The readers of ``root`` (see MoeInput)."""
    gemm_ops = grouped_gemm_ops()
    found = MoeInput(root, [], [], [], [])
    seen = set()

    def visit(n, branch):
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            first = u.args[0] is n if u.args else False
            if _reads_no_values(u, n):
                continue
            if first and u.target is aten.linear.default:
                found.linears.append(u)
            elif first and u.target in gemm_ops:
                found.gemms.append(u)
            elif first and _passes_rows(u):
                visit(u, branch or u)
                continue
            else:
                found.others.append(u)
                found.mixed |= branch is not None
                continue
            if branch is None:
                found.branches.append(u)
        if branch is not None and branch not in found.branches:
            found.branches.append(branch)

    visit(root, None)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    found.branches.sort(key=order.__getitem__)
    return found


def _weight_attr(lin: fx.Node) -> Optional[fx.Node]:
    """A linear's weight as a get_attr node (maybe behind a dtype cast only it reads)."""
    w = lin.args[1]
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target in _CASTS and len(w.users) == 1:
        w = w.args[0]
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _swap_attr(gm, old: fx.Node, t: torch.Tensor, suffix: str) -> fx.Node:
    """A new get_attr holding ``t`` in place of ``old`` for every reader (the user's tensor is left alone)."""
    new = _new_attr(gm, old, old, f"{old.target}_{suffix}", t.contiguous())
    new.meta.update(old.meta)                          # (the parameter's name too: it is that tensor, scaled)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def _enk(t: torch.Tensor, rows_out: bool) -> torch.Tensor:
    """An experts' tensor as (experts, out, in), a view."""
    return t if rows_out else t.transpose(1, 2)


def _expert_error(w_enk: torch.Tensor, s: torch.Tensor, weights: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Per expert: sum_{n,k} D[n, k]^2 weights[e, k], D = W_e - dequant(quant(W_e diag(s_e))) / s_e, for
    s (K,) shared or (E, K) per expert."""
    e, n, k = w_enk.shape
    s3 = s.reshape(-1, 1, k).expand(e, 1, k)
    step = max(1, CHUNK // (n * k))                     # experts at a time: a real model's tensor is GBs
    out = []
    for i in range(0, e, step):
        w, si = w_enk[i:i + step], s3[i:i + step]
        d = w - fake_quantize_torch((w * si).reshape(-1, k), scheme).reshape(w.shape) / si
        out.append(torch.einsum("enk,ek->e", d.square(), weights[i:i + step]))
    return torch.cat(out)


@dataclasses.dataclass
class _Down:
    gate_up: fx.Node                # the GEMM whose output columns ``cols`` are the up projection
    down: fx.Node                   # the GEMM reading act(gate) * up
    cols: range


def _columns(n: fx.Node, gemm: fx.Node) -> Optional[range]:
    """The output columns of ``gemm`` that n is (its output, a split piece or a slice along the last axis)."""
    shape = ir.meta.shape(gemm)
    if shape is None:
        return None
    width = shape[-1]
    if n is gemm:
        return range(width)
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].args[:1] == (gemm,):
        split, i = n.args
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or len(gemm.users) != 1:
            return None
        if split.target is aten.split.Tensor and isinstance(split.args[1], int):
            size = split.args[1]
            return range(i * size, min((i + 1) * size, width))
        if split.target is aten.split_with_sizes.default:
            sizes = list(split.args[1])
            return range(sum(sizes[:i]), sum(sizes[:i + 1]))
        return None
    if n.target is aten.slice.Tensor and n.args[0] is gemm and not _not_last(n, len(shape)):
        start, end, step = (list(n.args[2:]) + [None, None, None])[:3]
        return range(width)[slice(start, end, step or 1)]
    return None


def _up_columns(down: fx.Node, gate_up: fx.Node) -> tuple[Optional[range], str]:
    """The gate/up GEMM's columns that down's input multiplies act(gate) by, or (None, why not)."""
    x = down.args[0]
    if not (x.op == "call_function" and x.target is aten.mul.Tensor and len(x.args) == 2
            and all(isinstance(a, fx.Node) for a in x.args) and len(x.users) == 1
            and ir.meta.shape(x.args[0]) == ir.meta.shape(x.args[1])):
        return None, "its input is not act(gate) * up"
    for up, other in (x.args, x.args[::-1]):
        cols = _columns(up, gate_up)
        if cols is None or len(up.users) != 1:
            continue
        while other.op == "call_function" and other.target in ELEMENTWISE and isinstance(other.args[0], fx.Node) \
                and not any(isinstance(a, fx.Node) for a in (*other.args[1:], *other.kwargs.values())):
            other = other.args[0]
        gate = _columns(other, gate_up)
        if gate is not None and not set(gate) & set(cols) or other is not gate_up and other.target in \
                grouped_gemm_ops() and gemm_offsets(other) is gemm_offsets(gate_up):     # gate from its own GEMM
            return cols, ""
    return None, "its input is not act(gate) * up of the gate/up GEMM's columns (e.g. a bias or (up + 1))"


def apply_moe_awq(gm: fx.GraphModule, experts: list[ExpertWeight], quantized_linears: list[fx.Node], calls,
                  scheme: QScheme, allow_mul: bool, progress: bool = False) -> tuple[dict, set, dict]:
    """Scale the inputs of the MoE blocks whose experts' tensors ``experts`` will be quantized (module
    docstring), before they are. Returns (counts, the linears scaled here, {expert tensor name: its AWQ
    record}). ``quantized_linears``: the linears Quantize will quantize (the others are scaled, not weighed)."""
    chosen = {ew.node for ew in experts}
    every = {ew.node: ew for ew in expert_weights(gm)[0]}
    blocks: dict[fx.Node, MoeInput] = {}
    for ew in experts:
        for g in ew.gemms:
            r = _gathered_root(g.args[0]) if isinstance(g.args[0], fx.Node) else None
            if r is not None and r not in blocks:
                blocks[r] = moe_input(r)
    counts = {"blocks": len(blocks), "norm": 0, "linear": 0, "mul": 0, "unscaled": 0, "left": 0,
              "down_scaled": 0, "down_unscaled": 0, "down_left": 0}
    if not blocks:
        return counts, set(), {}
    quantized = set(quantized_linears)
    gemm_set = {g for b in blocks.values() for g in b.gemms}
    downs: dict[fx.Node, _Down] = {}
    reasons: dict[str, str] = {}
    for g in gemm_set:
        src, _ = expert_source(g)
        down = next((d for d in _consumers_gemms(g) if gemm_offsets(d) is gemm_offsets(g)), None)
        dsrc = expert_source(down)[0] if down is not None else None
        if src not in every or dsrc not in chosen or any(d.down is down for d in downs.values()):
            continue
        cols, why = _up_columns(down, g)
        if cols is None:
            reasons[every[dsrc].name] = why
        else:
            downs[g] = _Down(g, down, cols)
    for d in downs.values():            # (separate gate and up GEMMs: the gate's try says no, the up's yes)
        reasons.pop(every[expert_source(d.down)[0]].name, None)

    # each block input's Hessian and each expert's mean squares at its GEMMs, in runs of blocks that fit
    # HESSIAN_BYTES (DeepSeek-V3's 58 blocks: ~26 GB), each run's from the graph scaled so far
    def stat_shape(g):
        src, rows_out = expert_source(g)
        return None if src is None else _enk(ir.meta.tensor_attr(gm, src), rows_out).shape

    def block_gemms(r):
        gs = [g for g in blocks[r].gemms if g in gemm_set]
        return gs + [downs[g].down for g in gs if g in downs]

    def need(r):
        k = int(ir.meta.shape(r)[-1])
        return k * k * 8 + sum(sh[0] * sh[2] * 8 for sh in map(stat_shape, block_gemms(r)) if sh is not None)
    runs = budget_runs(list(blocks), need)
    records: dict[str, dict] = {}
    scaled: set = set()
    for i, run in enumerate(runs):
        hs, ms = _moe_statistics(gm, run, [g for r in run for g in block_gemms(r)], stat_shape, calls, progress,
                                 "Quantize(awq=True): MoE input statistics" +
                                 (f", run {i + 1}/{len(runs)}" if len(runs) > 1 else ""), len(runs) > 1)
        for root in tqdm(run, desc="quantize: AWQ (experts)", disable=not progress, leave=False):
            _scale_block_input(gm, blocks[root], hs[root], ms, every, chosen, quantized, scheme, allow_mul, counts,
                               records, scaled)
        for r in run:
            for g in blocks[r].gemms:
                if g in downs:
                    _scale_down(gm, downs[g], ms, scheme, counts, records)
        del hs, ms
    if len(runs) > 1:
        counts["runs"] = len(runs)
    for name, why in reasons.items():
        counts["down_left"] += 1
        records.setdefault(name, {})["down"] = {"scaled": 0, "why_not": why}
    return counts, scaled, records


def _moe_statistics(gm, roots: list, gemms: list, stat_shape, calls, progress: bool, desc: str,
                    stop_early: bool) -> tuple[dict, dict]:
    """One calibration pass: the Hessian of each block input in ``roots`` and, at each grouped GEMM of
    ``gemms``, every expert's mean squares of the rows routed to it."""
    from ..quant.gptq import Hessian
    hs = {r: Hessian(int(ir.meta.shape(r)[-1])) for r in roots}
    ms: dict[fx.Node, ExpertMeanSquares] = {}
    watch = {r: h.add for r, h in hs.items()}
    for g in gemms:
        shape = stat_shape(g)
        if shape is not None:
            acc = ms[g] = ExpertMeanSquares(shape[0], shape[2])
            watch_expert_rows(watch, g, acc.add)
    if run_watching(gm, calls, watch, progress, desc, stop_early=stop_early) == 0:
        raise ValueError("Quantize(awq=True): the calibration data is empty")
    return hs, ms


def _consumers_gemms(g: fx.Node) -> list:
    """The grouped GEMMs reading (through ops on the rows: activation, mul, split) what GEMM g computes."""
    ops = grouped_gemm_ops()
    out, todo, seen = [], list(g.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in ops:
            out.append(n)
        elif n.op == "call_function" and len(seen) < 16:           # (a few ops: act(gate) * up)
            todo.extend(n.users)
    return out


def _scale_linear(gm, lin: fx.Node, s: torch.Tensor) -> None:
    """lin's weight times s per input channel, as a new tensor."""
    w = _weight_attr(lin)
    holder = lin if lin.args[1] is w else lin.args[1]
    t = ir.meta.tensor_attr(gm, w).detach()
    name = ir.meta.module_name(lin) or lin.name
    holder.replace_input_with(w, _new_attr(gm, holder, w, f"{name}.weight_awq", (t.float() * s).to(t.dtype)))


def _scale_block_input(gm, b: MoeInput, hessian, ms: dict, every: dict, chosen: set, quantized: set,
                       scheme: QScheme, allow_mul: bool, counts: dict, records: dict, scaled: set) -> None:
    tensors, unscalable = {}, []
    for g in b.gemms:
        src, rows_out = expert_source(g)
        ew = every.get(src)
        if ew is None or not set(ew.gemms) <= set(b.gemms):
            unscalable.append(g)
        else:
            tensors.setdefault(src, (rows_out, []))[1].append(g)
    unscalable += [lin for lin in b.linears if _weight_attr(lin) is None]
    names = [every[src].name for src in tensors]
    if unscalable or b.mixed:
        counts["left"] += 1
        what = ", ".join(ir.meta.module_name(n) or n.name for n in unscalable) or "another op on its way to them"
        for name in names:
            records[name] = {"alpha": 0.0, "folded_into": None, "why_not": f"the block input is also read by {what}"}
        return
    dev = next((ir.meta.tensor_attr(gm, src).device for src in tensors), torch.device("cpu"))
    h = hessian.value().to(dev, torch.float32)            # (the statistics are summed on the CPU)
    ws = [ir.meta.tensor_attr(gm, _weight_attr(lin)).detach().float() for lin in b.linears if lin in quantized]
    terms = []
    for src, (rows_out, gs) in tensors.items():
        if src in chosen:
            w = _enk(ir.meta.tensor_attr(gm, src).detach().float(), rows_out)
            for g in gs:                    # expert e's error, weighted by its share of the block's rows
                terms.append((w, (ms[g].mean() * (ms[g].n / hessian.n).to(torch.float32)[:, None]).to(w.device)))
    alpha, s, err, base = search_scale(ws, h, scheme, extra=lambda s: sum(
        float(_expert_error(w, s, m, scheme).sum()) for w, m in terms))
    rec = {"alpha": alpha, "output_error": err, "output_error_unscaled": base, "folded_into": None}
    if alpha == 0.0:
        counts["unscaled"] += 1
    else:
        users = list(b.root.users)
        where, how = None, None
        if not b.others:
            where, how = fold_into_norm(gm, b.root, users, s), "norm"
            if where is None:
                where, how = fold_into_linear(gm, b.root, users, s), "linear"
        if where is None and allow_mul:
            where, how = insert_mul(gm, b.root, b.branches, s).name, "mul"
        if where is None:
            counts["left"] += 1
            rec.update(alpha=0.0, output_error=base, why_not="no norm or linear to fold 1/s into (awq_insert_mul)")
        else:
            counts[how] += 1
            rec.update(folded_into=where if how != "mul" else "mul", s_min=float(s.min()), s_max=float(s.max()))
            for lin in b.linears:
                _scale_linear(gm, lin, s)
                scaled.add(lin)
            for src, (rows_out, _) in tensors.items():
                t = ir.meta.tensor_attr(gm, src).detach()
                _swap_attr(gm, src, (t.float() * (s if rows_out else s[:, None])).to(t.dtype), "awq")
    for lin in b.linears:
        if lin in quantized:
            ir.meta.info(lin).quant = dict(ir.meta.info(lin).quant or {}, awq=rec)
    for name in names:
        records[name] = dict(rec)


def _scale_down(gm, d: _Down, ms: dict, scheme: QScheme, counts: dict, records: dict) -> None:
    """Expert e's down tensor times s_e per input channel, 1 / s_e into its up rows (module docstring)."""
    dsrc, drows = expert_source(d.down)
    usrc, urows = expert_source(d.gate_up)
    name = ir.meta.param_name(dsrc) or dsrc.target
    t = ir.meta.tensor_attr(gm, dsrc).detach()
    w = _enk(t.float(), drows)                          # (E, N, I)
    e, _, k = w.shape
    acc = ms[d.down]
    if len(d.cols) != k:
        counts["down_left"] += 1
        records.setdefault(name, {})["down"] = {"scaled": 0, "why_not": f"up has {len(d.cols)} columns, down {k}"}
        return
    m, reached = acc.mean().to(w.device), (acc.n > 0).to(w.device)
    rms = m.clamp(min=0).sqrt()
    live = rms > 0
    floor = torch.where(live, rms, torch.full_like(rms, float("inf"))).min(1, keepdim=True).values
    rms = torch.where(live, rms, floor)
    rms = torch.where(torch.isfinite(rms), rms, torch.ones_like(rms))     # an expert no token reached
    best_s, best_alpha = torch.ones_like(rms), torch.zeros(e, device=w.device)
    best = base = _expert_error(w, best_s, m, scheme)
    for i in range(1, GRID + 1):
        s = rms.pow(i / GRID)
        s = s / (s.max(1, keepdim=True).values * s.min(1, keepdim=True).values).sqrt()
        err = _expert_error(w, s, m, scheme)
        better = (err < best) & reached
        best = torch.where(better, err, best)
        best_s = torch.where(better[:, None], s, best_s)
        best_alpha = torch.where(better, i / GRID, best_alpha)
    n_scaled = int((best_alpha > 0).sum())
    counts["down_scaled"] += n_scaled
    counts["down_unscaled"] += e - n_scaled
    records.setdefault(name, {})["down"] = {
        "scaled": n_scaled, "experts": e, "alpha": [round(float(a), 2) for a in best_alpha],
        "output_error": float(best.sum()), "output_error_unscaled": float(base.sum())}
    if n_scaled == 0:
        return
    new_w = w * best_s[:, None, :]
    _swap_attr(gm, dsrc, (new_w if drows else new_w.transpose(1, 2)).to(t.dtype), "awq")
    u = ir.meta.tensor_attr(gm, usrc).detach()
    up = _enk(u.float(), urows).clone()
    cols = torch.tensor(list(d.cols), device=up.device)
    up[:, cols, :] = up[:, cols, :] / best_s[:, :, None]
    _swap_attr(gm, usrc, (up if urows else up.transpose(1, 2)).to(u.dtype), "awq_up")
