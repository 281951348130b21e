"""Prune: pruning of linear weights, into the patterns the sparse kernels run.

    Prune(sparsity=0.5)                       unstructured: the 50% lowest-scored weights of each layer become 0
    Prune(sparsity=0.5, scope="global")       one cutoff over all the selected layers together
    Prune(threshold=1e-3)                     every |w| < 1e-3 becomes 0 (threshold pruning)
    Prune(pattern="2:4")                      in every 4 consecutive weights along K the 2 best-scored stay
                                              (any "N:M"; 2:4 is the one the sparse kernels run)
    Prune(sparsity=0.5, pattern="block", block=(64, 64))
                                              the 50% of (BN, BK) blocks with the smallest RMS score become 0
    Prune(sparsity=0.25, pattern="neurons")   structured: a quarter of each feed-forward block's neurons are
                                              removed, and its layers physically shrink (prune_structured)
    Prune(sparsity=0.25, pattern="heads")     structured: a quarter of each attention block's heads (whole
                                              key/value groups under grouped-query attention) are removed
                                              (prune_heads)
    Prune(sparsity=0.5, pattern="query_heads")
                                              structured: half the q heads in each key/value group are removed,
                                              k and v stay (multi-query attention's head pruning; prune_heads)
    Prune(sparsity=0.25, pattern="experts")   structured: a quarter of each mixture-of-experts block's experts
                                              are removed, with their router rows (prune_experts)
    Prune(pattern="2:4", method="sparsegpt")  SparseGPT (prune_sparsegpt): weights chosen by OBS saliency as
                                              the columns are walked, the kept ones re-fit to make up for the
                                              pruned ones (unstructured per layer, or N:M); blocks per layer
                                              go by the output error removing each one costs; a global cutoff
                                              or a threshold choose by score, then SparseGPT re-fits

A weight's score is |w_ij| * ||x_j|| (score="activation", the default; Wanda, Sun et al. 2023), with
||x_j|| the RMS of input column j over the calibration batches (else the example inputs): a small weight
on a large activation matters as much as a large weight on a small one. score="magnitude" ranks |w_ij|
alone and needs no data. Measured on SmolLM2-135M (bench/smollm2_prune.py): see the README.

The mask is the zeros: each pruned weight is replaced by a new tensor holding its kept values and zeros
(the user's model is untouched), so every backend runs the pruned model as it is, ``LowerSparse`` finds
the pattern and lowers the layer to the sparse kernels, and ``Quantize`` after it keeps the zeros (zero
quantizes to zero in every symmetric scheme). Ranking is deterministic: among equal scores (weights or
blocks) the earlier one in row-major order, and with scope="global" in graph order, goes first.

A weight several layers read (a module called twice, ALBERT's shared blocks) is pruned once, as Quantize quantizes
it once: its scores pool every input it sees (column mean squares, SparseGPT's Hessians summed), and all of them
read the one pruned tensor (the statistics' "shared"); the structured patterns leave such a block whole.

aten.linear and fused_linear (after Fuse) are pruned; layers already quantized or lowered are skipped
with the reason in the statistics (prune before Quantize and LowerSparse), as are mixture-of-experts tensors
(3-D, behind grouped GEMMs: "experts" and "neurons" shrink them); "sparsity" is over the pruned weights.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function
from tqdm.auto import tqdm

from .. import ir
from ..ir.dialect.sparse import blockwise
from .base import Pass, PassResult, number_in, register_pass
from .prune_experts import expert_blocks, expert_scores, remove_experts
from .prune_heads import attention_groups, head_importance, head_scores, shrink_heads
from .prune_structured import column_importance, expert_importance, input_stats, layer_name, neuron_groups, shrink
from .prune_sparsegpt import sparsegpt_prune
from .quant_calibration import budget_runs, calibration_calls, hessian_bytes, hessians_in_runs
from .quantize import layer_names, matches, module_patterns, selected_linears, unmatched_include
from .quantize_experts import expert_source, grouped_gemm_ops

aten = torch.ops.aten
sf = torch.ops.slimfx
SCOPES = ("layer", "global")
STRUCTURED = ("neurons", "heads", "query_heads", "experts")
SCORES = ("activation", "magnitude")
METHODS = ("mask", "sparsegpt")
_NM = re.compile(r"(\d+):(\d+)")


def parse_nm(pattern: str) -> Optional[tuple[int, int]]:
    """(N, M) for an "N:M" pattern with 0 < N < M, None for the named patterns; else ValueError."""
    if pattern in STRUCTURED or pattern in ("unstructured", "block"):
        return None
    m = _NM.fullmatch(pattern)
    if m and 0 < int(m.group(1)) < int(m.group(2)):
        return int(m.group(1)), int(m.group(2))
    raise ValueError(f"Prune.pattern must be 'unstructured', 'block', 'neurons', 'heads', 'query_heads', 'experts' "
                     f"or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")


def count_of(fraction: float, n: int) -> int:
    """The number of n that ``fraction`` asks for: the nearest, halves up (50% of 81 blocks is 41, not
    Python's round-half-even 40), so a "50%" prune reaches 50%, as LowerSparse's default threshold asks."""
    return math.floor(fraction * n + 0.5)


def layer_count(fraction: float, n: int) -> int:
    """``count_of`` for the units of one layer, never all n of them while ``fraction`` < 1: a layer of one 64x64
    block would otherwise be zeroed whole at 50% (halves up: 1 of 1)."""
    k = count_of(fraction, n)
    return min(k, n - 1) if fraction < 1 and n else k


def smallest(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks (True = prune) marking the ``k`` smallest entries over all ``scores`` together; among equal
    scores the earlier (in list order, then row-major) goes first, so the count is exactly k."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    prune = torch.zeros_like(flat, dtype=torch.bool)
    k = max(0, min(int(k), flat.numel()))
    if k:
        t = flat.kthvalue(k).values
        prune = flat < t
        ties = (flat == t).nonzero().squeeze(1)[: k - int(prune.sum())]
        prune[ties] = True
    return [p.view(s.shape) for p, s in zip(prune.split([s.numel() for s in scores]), scores)]


def nm_prune_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where N:M pruning zeroes w (rows, K): in each group of m along K, all but the n largest |w|
    (the earlier of equal magnitudes stays)."""
    rows, k = w.shape
    a = w.detach().abs().float().reshape(rows, k // m, m)
    keep = a.argsort(dim=-1, descending=True, stable=True)[..., :n]
    return torch.ones_like(a, dtype=torch.bool).scatter_(-1, keep, False).reshape(rows, k)


def block_rms(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(ceil(N/BN), ceil(K/BK)) RMS of w's blocks; an edge block is scored over its real elements only."""
    sq = w.detach().float().square()
    return (blockwise(sq, block).sum((1, 3)) / blockwise(torch.ones_like(sq), block).sum((1, 3))).sqrt()


def expand_blocks(blocks: torch.Tensor, block: tuple[int, int], shape) -> torch.Tensor:
    """A per-block mask as a per-element one of ``shape`` (edge blocks cropped)."""
    bn, bk = block
    return blocks.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]]


def pooled_rms(rms: list[torch.Tensor]) -> torch.Tensor:
    """One weight's input-column RMS over the inputs of every layer that reads it: the root of the sum of their
    mean squares (the diagonal of the summed Hessians SparseGPT fits a shared weight on); one input's own RMS."""
    return rms[0] if len(rms) == 1 else sum(r.square() for r in rms).sqrt()


def shared_outside(gm: fx.GraphModule, members) -> dict[str, list[fx.Node]]:
    """{attribute: [readers]} for the tensors the ``members`` nodes read directly that other nodes read too."""
    targets = {a.target for m in members for a in m.all_input_nodes if a.op == "get_attr"}
    members = set(members)
    out = {}
    for a in gm.graph.nodes:
        if a.op == "get_attr" and a.target in targets:
            out.setdefault(a.target, []).extend(u for u in a.users if u not in members)
    return {t: us for t, us in out.items() if us}


def outside_readers(outside: dict[str, list[fx.Node]]) -> list[str]:
    """The nodes in ``shared_outside``'s answer, as "module (node name)"."""
    return list(dict.fromkeys(f"{ir.meta.module_name(u) or '-'} (node {u.name})"
                              for us in outside.values() for u in us))


@register_pass(name="prune")
@dataclasses.dataclass
class Prune(Pass):
    """Pruning of linear layers: zeros by score, or structured units removed (see the module docstring).

    sparsity:        the fraction of weights to zero ("unstructured"; of blocks for "block"; of each block's
                     neurons, kv head groups, q heads per kv group or experts for "neurons" / "heads" /
                     "query_heads" / "experts"), per layer or,
                     with scope="global", over all selected layers; "N:M" implies 1 - N/M; counts are
                     the nearest, halves up (count_of), but never a whole layer below sparsity 1
    pattern:         "unstructured", "N:M" ("2:4"), "block", "neurons", "heads", "query_heads" or "experts"
    threshold:       unstructured only, instead of sparsity: zero every |w| < threshold
    block:           (BN, BK) for "block" (the sparse kernels run powers of two >= 16, BK >= 32 for W8A8;
                     LowerSparse reads the shape off the zeros)
    scope:           "layer" or "global" (sparsity targets of "unstructured" and "block")
    score:           "activation" (|w| * the RMS of its input column over calibration data or the example
                     inputs) or "magnitude" (|w|; not for the structured patterns, which need activations)
    include/exclude: module-name globs ("*.mlp.*", "lm_head") or "re:<regex>"; empty include = every layer.
                     Structured patterns take a block when include matches its name (the statistics') or one
                     of its layers', and leave it whole, with the reason, when exclude matches any of them
    method:          "mask" zeroes the lowest-scored weights and leaves the rest as they are; "sparsegpt"
                     updates the kept weights to keep each layer's output on the calibration data (else the
                     example inputs), H = X X^T of the layer's input, and for N:M, unstructured and block
                     per layer also chooses the weights: by w^2 / [H^-1]_jj (unstructured sparsity is then met
                     in each block of 128 input columns), whole blocks by the output error of removing each
                     one (prune_sparsegpt.block_costs)"""
    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    threshold: Optional[float] = None
    block: tuple = (64, 64)
    scope: str = "layer"
    score: str = "activation"
    include: tuple = ()
    exclude: tuple = ()
    method: str = "mask"

    def __post_init__(self):
        nm = parse_nm(self.pattern)
        if self.method not in METHODS:
            raise ValueError(f"Prune.method must be one of {METHODS}, got {self.method!r}")
        if self.method == "sparsegpt" and self.pattern in STRUCTURED:
            raise ValueError(f"Prune(method='sparsegpt') re-fits the weights a zero pattern keeps; "
                             f"pattern={self.pattern!r} removes whole units instead")
        if self.method == "sparsegpt" and self._adaptive(nm) and self.score != "activation":
            raise ValueError("Prune(method='sparsegpt') ranks weights by their OBS saliency: leave score out")
        if self.score not in SCORES:
            raise ValueError(f"Prune.score must be one of {SCORES}, got {self.score!r}")
        if self.pattern in STRUCTURED and self.score != "activation":
            raise ValueError(f"Prune(pattern={self.pattern!r}) scores units by their activations: score must be "
                             "'activation' (by weight norms alone, 25% of SmolLM2's neurons took perplexity to 1e6)")
        if self.scope not in SCOPES:
            raise ValueError(f"Prune.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.sparsity is not None:
            self.sparsity = number_in(self.sparsity, "Prune.sparsity", 0, 1)
        if self.threshold is not None:
            if self.pattern != "unstructured":
                raise ValueError(f"Prune.threshold applies to pattern='unstructured' only, not {self.pattern!r}")
            if self.sparsity is not None:
                raise ValueError("Prune: give sparsity or threshold, not both")
            self.threshold = number_in(self.threshold, "Prune.threshold", 0)
        elif nm is not None:
            if self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
                raise ValueError(f"Prune.sparsity: pattern {self.pattern!r} zeroes {1 - nm[0] / nm[1]:g} of the "
                                 f"weights, got sparsity={self.sparsity!r} (leave it out)")
        elif self.sparsity is None:
            raise ValueError(f"Prune(pattern={self.pattern!r}) needs sparsity=<fraction>"
                             + (" or threshold=<magnitude>" if self.pattern == "unstructured" else ""))
        if self.pattern in STRUCTURED and self.scope != "layer":
            raise ValueError(f"Prune(pattern={self.pattern!r}) prunes each block by its own scores: "
                             "scope must be 'layer'")
        block = (self.block, self.block) if isinstance(self.block, numbers.Integral) else self.block
        if not (isinstance(block, (tuple, list)) and len(block) == 2
                and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"Prune.block must be two positive ints (BN, BK), or one for square blocks, got "
                             f"{self.block!r}")
        self.block = tuple(int(b) for b in block)
        self.include = module_patterns(self.include, "Prune.include")
        self.exclude = module_patterns(self.exclude, "Prune.exclude")
        self._nm = nm

    def _adaptive(self, nm=None) -> bool:
        """SparseGPT chooses the weights itself (N:M, or unstructured or blocks by sparsity per layer); other
        patterns (a global cutoff, a threshold) choose them by ``score`` first and SparseGPT re-fits the rest."""
        nm = nm if nm is not None else getattr(self, "_nm", None)
        return bool(nm) or (self.pattern in ("unstructured", "block") and self.threshold is None
                             and self.scope == "layer")

    def select(self, gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, str, fx.Node]], dict[str, str]]:
        """The layers to prune as (linear node, module name, weight get_attr), and why others are not."""
        chosen, skipped = [], {}
        done = {sf.quantized_linear.default: "quantized (prune before Quantize)",
                sf.weight_only_linear.default: "quantized (prune before Quantize)",
                sf.sparse_linear.default: "already sparse_linear (prune before LowerSparse)"}
        for n, name in selected_linears(gm, self.include, self.exclude, tuple(done), skipped):
            skipped[name] = done[n.target]
        for n, name in selected_linears(gm, self.include, self.exclude, (aten.linear.default, sf.fused_linear.default),
                                        skipped):
            a = normalize_function(n.target, n.args, n.kwargs, normalize_to_only_use_kwargs=True).kwargs
            w_node = a.get("weight", a.get("w"))
            if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
                skipped[name] = ir.meta.computed_weight(w_node)
                continue
            w = ir.meta.tensor_attr(gm, w_node)
            if not w.is_floating_point() or w.ndim != 2:
                skipped[name] = f"weight of shape {tuple(w.shape)} / {w.dtype} is not a 2-D float tensor"
            elif not torch.isfinite(w).all():
                skipped[name] = "weight holds NaN or inf"
            elif self._nm and w.shape[1] % self._nm[1]:
                skipped[name] = f"K = {w.shape[1]} is not a multiple of {self._nm[1]}"
            else:
                chosen.append((n, name, w_node))
        return chosen, skipped

    def masks(self, weights: list[torch.Tensor], cols: list[Optional[torch.Tensor]]):
        """For each weight in turn, True where it is pruned (a generator: per-layer masks are computed as they
        are consumed; a global cutoff needs all the weights first). ``cols``: each layer's input-column RMS
        (score="activation") or None (|w| alone)."""
        if self.threshold is not None:
            return (w.detach().abs() < self.threshold for w in weights)

        def scaled(w, c):
            w = w.detach().abs().float()
            return w if c is None else w * c.float()[None, :]
        if self._nm:
            return (nm_prune_mask(scaled(w, c), *self._nm) for w, c in zip(weights, cols))
        blocks = self.pattern == "block"

        def score(w, c):
            return block_rms(scaled(w, c), self.block) if blocks else scaled(w, c)

        def element(m, w):
            return expand_blocks(m, self.block, w.shape) if blocks else m

        if self.scope == "global":
            scores = [score(w, c) for w, c in zip(weights, cols)]
            cut = smallest(scores, count_of(self.sparsity, sum(s.numel() for s in scores)))
            return (element(m, w) for m, w in zip(cut, weights))

        def layer(w, c):
            s = score(w, c)
            return element(smallest([s], layer_count(self.sparsity, s.numel()))[0], w)
        return (layer(w, c) for w, c in zip(weights, cols))

    def _calls(self, ctx):
        """The inputs activations are measured on: the calibration batches, else the example inputs."""
        if ctx.calibration is not None:
            return "calibration", calibration_calls(ctx, "Prune")
        if not ctx.example_args and not ctx.example_kwargs:
            raise ValueError(f"Prune(pattern={self.pattern!r}, score='activation') weighs weights by their "
                             f"activations: it needs calibration data or example inputs (slimfx.compile passes "
                             f"them), or score='magnitude'")
        return "example inputs", [(tuple(ctx.example_args), dict(ctx.example_kwargs))]

    def run(self, gm, ctx):
        if self.pattern in STRUCTURED:
            return self._run_structured(gm, ctx)
        chosen, skipped = self.select(gm)
        skipped.update(unmatched_include(gm, self.include))
        experts_left = self._expert_tensors(gm)
        skipped.update(experts_left)
        # a weight several layers read (a module called twice, ALBERT's shared blocks) is pruned once, as Quantize
        # quantizes it once: one mask, its scores (or SparseGPT's Hessian) pooled over every input it sees, and one
        # stored tensor that all of them read
        sites = {}
        for n, name, w_node in chosen:
            sites.setdefault(w_node.target, []).append((n, w_node))
        tensors = [(ss[0][0], ir.meta.layer_name(ss[0][0]), ss[0][1]) for ss in sites.values()]
        inputs = [list(dict.fromkeys(n.args[0] for n, _ in ss)) for ss in sites.values()]
        weights = [ir.meta.tensor_attr(gm, w) for _, _, w in tensors]
        data, cols, runs = "weights", [None] * len(tensors), 1
        if self.method == "sparsegpt" and chosen:
            data, calls = self._calls(ctx)
            new_weights, runs = self._sparsegpt(gm, tensors, inputs, weights, calls, ctx.progress)
        else:
            if self.score == "activation" and self.threshold is None and chosen:
                data, calls = self._calls(ctx)
                stats = {n.args[0]: s[1] for n, s in input_stats(gm, [n for n, _, _ in chosen], calls).items()}
                cols = [pooled_rms([stats[x] for x in xs]) for xs in inputs]
            new_weights = (w.detach().masked_fill(m, 0) for w, m in zip(weights, self.masks(weights, cols)))
        g = gm.graph
        pruned, shared, zeros, total, layers = {}, {}, 0, 0, 0
        with torch.no_grad():
            for (_, name, w_node), w, new_w in tqdm(zip(tensors, weights, new_weights), total=len(tensors),
                                                    desc="prune", leave=False,
                                                    disable=not ctx.progress or len(tensors) < 8):
                if torch.equal(new_w, w):
                    if self.pattern == "block" and self.threshold is None and self.scope == "layer" and self.sparsity:
                        units = math.ceil(w.shape[0] / self.block[0]) * math.ceil(w.shape[1] / self.block[1])
                        skipped[name] = (f"{units} block(s) of {self.block[0]}x{self.block[1]}: {self.sparsity:g} of "
                                         f"them rounds to none or to all (a layer is never zeroed whole below "
                                         f"sparsity 1); prune it in smaller blocks")
                    continue
                target = ir.meta.add_tensor_attr(gm, f"{name}.weight_pruned", new_w.contiguous())
                for n, old in sites[w_node.target]:
                    with g.inserting_before(n):
                        new = g.get_attr(target)
                    new.meta.update(old.meta)       # still that layer's weight: the report names it so
                    n.replace_input_with(old, new)
                ss = sites[w_node.target]
                layers += len(ss)
                if len(ss) > 1:
                    names = list(dict.fromkeys(ir.meta.layer_name(n) for n, _ in ss))
                    shared[name] = (f"one weight read by {len(ss)} layers ({', '.join(names)}: nodes "
                                    f"{', '.join(n.name for n, _ in ss)}): pruned once, stored once")
                nz = int((new_w == 0).sum())
                zeros, total = zeros + nz, total + w.numel()
                pruned[name] = round(nz / w.numel(), 4)
        if pruned:
            g.eliminate_dead_code()
            ir.drop_unused_tensors(gm)
            gm.recompile()
        stats = {"layers": layers, "pattern": self.pattern, "method": self.method, "scored_on": data,
                 "sparsity": round(zeros / total, 4) if total else 0.0, "pruned": pruned, "skipped": skipped}
        if experts_left:              # "sparsity" is over the pruned layers' weights only
            stats["experts_left"] = len(experts_left)
            stats["sparsity_covers"] = (f"the {len(pruned)} linear weight(s) pruned, not the {len(experts_left)} "
                                        f"experts' tensor(s) in 'skipped'")
        if shared:
            stats["shared"] = shared
        if runs > 1:
            stats["hessian_runs"] = runs
        return PassResult(gm, bool(pruned), stats)

    def _expert_tensors(self, gm) -> dict[str, str]:
        """{name: why} for the float mixture-of-experts tensors (3-D, behind grouped GEMMs) include/exclude select:
        the zero patterns prune linear layers only, so these stay dense."""
        out = {}
        for n in gm.graph.nodes:
            src = expert_source(n)[0] if n.op == "call_function" and n.target in grouped_gemm_ops() else None
            t = ir.meta.tensor_attr(gm, src) if src is not None else None
            name = layer_name(n)
            if t is None or t.ndim != 3 or not t.is_floating_point() or name in out \
                    or self.include and not matches(name, self.include) or matches(name, self.exclude):
                continue
            out[name] = (f"a mixture-of-experts tensor ({t.shape[0]} experts x {t.shape[1]} x {t.shape[2]}) behind "
                         f"a grouped GEMM: pattern={self.pattern!r} prunes linear layers only; experts shrink with "
                         f"pattern='experts' or 'neurons'")
        return out

    def _sparsegpt(self, gm, tensors, inputs, weights, calls, progress: bool) -> tuple[list[torch.Tensor], int]:
        """Every weight's re-fit, and in how many runs its input Hessians were gathered (``hessians_in_runs``), all
        from the float graph: the caller replaces the weights after the last run. ``inputs``: each weight's layer
        inputs; a weight several layers read is fitted on the sum of their Hessians (its output error over all of
        them), once the last of them is gathered. A pattern that chooses by score (a global cutoff, a threshold)
        needs every layer's input RMS first: with more than one run, the runs are gathered twice."""
        who = "Prune(method='sparsegpt')"
        xs = list(dict.fromkeys(x for ins in inputs for x in ins))
        calls = calls if hasattr(calls, "__len__") else list(calls)
        runs = len(budget_runs(xs, hessian_bytes))
        one_run = runs == 1
        masks, new, kept = None, [None] * len(tensors), None
        if not self._adaptive():        # the pattern's own choice (by score), then the re-fit
            cols = [None] * len(tensors)
            if self.score == "activation":
                rms = {}
                for hs in hessians_in_runs(gm, calls, xs, progress, who):
                    rms.update({x: h.diagonal().sqrt() for x, h in hs.items()})
                    kept = hs if one_run else None
                    del hs
                cols = [pooled_rms([rms[x] for x in ins]) for ins in inputs]
            masks = list(self.masks(weights, cols))
        pending = {}                    # a shared weight's Hessian sum, until its last input's run
        for hs in [kept] if kept is not None else hessians_in_runs(gm, calls, xs, progress, who):
            for i, ((n, name, _), w) in enumerate(zip(tensors, weights)):
                here = [x for x in inputs[i] if x in hs]
                if not here:
                    continue
                h, seen = pending.pop(i, (None, 0))
                for x in here:
                    h = hs[x] if h is None else h + hs[x]
                if seen + len(here) < len(inputs[i]):
                    pending[i] = (h, seen + len(here))
                    continue
                new[i] = sparsegpt_prune(w, h, self.sparsity or 0.0, self._nm, name=f"weight of {name}",
                                         blocks=self.block if self.pattern == "block" else None) \
                    if masks is None else sparsegpt_prune(w, h, mask=masks[i], name=f"weight of {name}")
            del hs
        return new, runs

    def _run_experts(self, gm, ctx):
        """Whole experts: per mixture-of-experts block, the lowest-scored experts go (prune_experts), at most
        all but the experts each token picks."""
        found, rejected = expert_blocks(gm)
        # the names include selects by: the linear layers (the routers) and each block's own
        rejected.update(unmatched_include(gm, self.include, [*layer_names(gm), *(b.name for b in found), *rejected]))
        chosen = [b for b in found if not any(self.include and not matches(m, self.include) or matches(m, self.exclude)
                                              for m in (b.name, layer_name(b.router)))]
        data, calls = self._calls(ctx) if chosen else ("-", [])
        scores = expert_scores(gm, chosen, calls, ctx.progress) if chosen else {}
        shrunk, removed, before = {}, {}, sum(t.numel() for t in ir.tensors(gm).values())
        for b in chosen:
            groups = b.routing.groups               # group-limited routing: as many go from every group
            per = b.experts // groups
            asked = count_of(self.sparsity, per)
            count = min(asked, per - b.keep_min)
            in_groups = " per group" if groups > 1 else ""
            if count <= 0:
                if self.sparsity > 0:
                    rejected[b.name] = f"each token picks {b.keep_min} of the {per} experts{in_groups}: none can go" \
                        if asked else f"sparsity {self.sparsity:g} of {per} experts{in_groups} rounds to none"
                continue
            cut = torch.cat([smallest([row], count)[0] for row in scores[b.name].view(groups, per)])
            remove_experts(gm, b, (~cut).nonzero()[:, 0])
            removed[b.name] = cut.nonzero()[:, 0].tolist()
            shrunk[b.name] = f"{b.experts} -> {b.experts - count * groups} experts" + \
                (f" ({groups} groups)" if groups > 1 else "") + \
                (f" (all but the {b.keep_min} each token picks{in_groups})" if count < asked else "")
        if shrunk:
            gm.graph.eliminate_dead_code()
            ir.drop_unused_tensors(gm)
            gm.recompile()
            ir.propagate_meta(gm)
        params_removed = before - sum(t.numel() for t in ir.tensors(gm).values())
        return PassResult(gm, bool(shrunk), {"groups": len(shrunk), "pattern": self.pattern, "scored_on": data,
                                             "shrunk": shrunk, "params_removed": params_removed, "removed": removed,
                                             "scores": {k: [float(f"{v:.4g}") for v in s] for k, s in scores.items()},
                                             "skipped": rejected})

    def _run_structured(self, gm, ctx):
        """Neurons or heads: per block, the lowest-scored units go and the layers shrink (prune_structured,
        prune_heads); a block left whole is in the statistics' "skipped" with the reason.
        Scores need activations: the calibration batches, or else the example inputs."""
        if self.pattern == "experts":
            return self._run_experts(gm, ctx)
        heads, query = self.pattern in ("heads", "query_heads"), self.pattern == "query_heads"
        found, rejected = attention_groups(gm) if heads else neuron_groups(gm)
        # the names include selects by: the linear layers and each block's own
        rejected.update(unmatched_include(gm, self.include,
                                          [*layer_names(gm), *(grp.name for grp in found), *rejected]))
        if heads:                                 # what keeps this pattern's units from going
            why = {grp.name: grp.query_why if query else grp.kv_why for grp in found}
            rejected.update({name: w for name, w in why.items() if w})
            found = [grp for grp in found if not why[grp.name]]
        chosen = []
        for grp in found:
            members = (grp.q, grp.k, grp.v, grp.o) if heads else (*grp.producers, grp.consumer)
            names = [grp.name] + [layer_name(n) for n in members]
            if self.include and not any(matches(m, self.include) for m in names):
                continue
            excluded = [m for m in names if matches(m, self.exclude)]
            if excluded:            # the block's layers shrink together: one excluded keeps them all
                rejected[grp.name] = f"exclude matches {excluded}: the block's layers shrink together or not at all"
                continue
            outside = shared_outside(gm, members)
            if outside:             # shrinking this block's copy would split the weight in two
                rejected[grp.name] = (f"its tensor(s) {sorted(outside)} are also read by {outside_readers(outside)} "
                                      f"(one module called more than once): structured pruning does not shrink a "
                                      f"shared weight; prune it by zeros (pattern='unstructured' or 'N:M') instead")
                continue
            chosen.append(grp)
        data, calls = self._calls(ctx) if chosen else ("-", [])
        if chosen and not isinstance(calls, list):
            calls = list(calls)                   # a generator: linears and experts are scored in two runs
        experts = [grp for grp in chosen if not heads and grp.experts]
        importance = head_importance(gm, chosen, calls) if heads and chosen else \
            column_importance(gm, [grp.consumer for grp in chosen if not grp.experts], calls) if chosen else {}
        if experts:
            importance.update(expert_importance(gm, [grp.consumer for grp in experts], calls))
        shrunk = {}
        for grp in chosen:
            units, unit = (grp.heads // grp.kv_heads, "q heads per kv group") if query else \
                (grp.kv_heads, "kv heads") if heads else (grp.width, "neurons")
            score = head_scores(importance[grp.o], grp, query) if heads else importance[grp.consumer]
            # at least one unit stays: a layer of width 0 is not a layer; every expert keeps as many
            asked = count_of(self.sparsity, units)
            count = min(asked, units - 1)
            cut = torch.stack([smallest([row], count)[0] for row in score.reshape(-1, units)]).view(score.shape)
            if not cut.any():
                if self.sparsity > 0:
                    rejected[grp.name] = f"one {unit[:-1]} only: it stays" if units == 1 else \
                        f"sparsity {self.sparsity:g} of {units} {unit} rounds to none"
                continue
            keep = (~cut).nonzero()[:, -1].view(*cut.shape[:-1], -1)
            if heads:
                shrink_heads(gm, grp, keep, query)
            else:
                shrink(gm, grp, keep)
            shrunk[grp.name] = f"{grp.heads} -> {keep.numel()} q heads ({grp.kv_heads} kv)" if query \
                else f"{units} -> {keep.shape[-1]} {unit}" + (" per expert" if score.ndim == 2 else "")
            if count < asked:               # as "experts" says what it kept that sparsity asked to remove
                shrunk[grp.name] += f" (sparsity {self.sparsity:g} asks for all {units} {unit}: one stays)"
        if shrunk:
            gm.graph.eliminate_dead_code()
            ir.drop_unused_tensors(gm)
            gm.recompile()
            ir.propagate_meta(gm)
        return PassResult(gm, bool(shrunk), {"groups": len(shrunk), "pattern": self.pattern, "scored_on": data,
                                             "shrunk": shrunk, "skipped": rejected})


__all__ = ["Prune", "SCOPES", "parse_nm", "smallest", "nm_prune_mask", "block_rms", "expand_blocks"]
