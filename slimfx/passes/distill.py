"""Distill: recover what pruning cost by fine-tuning the graph against the uncompressed model.

Knowledge distillation with the pruning masks held fixed: the teacher (by default the model being
compiled, exactly as the user passed it) and the graph (the student) run on the same batches, and the
student's linear weights and biases (and mixture-of-experts tensors) take ``steps`` AdamW steps on

    logits (causal LMs, classifiers: the output has ``logits``)   T^2 * KL(softmax(t / T) || softmax(s / T)),
                                                                  averaged over tokens (Hinton et al. 2015)
    otherwise (encoders: hidden states)                           |s - t|^2 / |t|^2 over the first float output

Each weight's zeros (the pruning mask: ``Prune`` makes it the zeros) are restored after every step, so
the sparsity pattern and LowerSparse's choice survive training. The batches are ``calibration`` (cycled
when there are fewer than ``steps``). Run it on the float graph, after Prune and before Quantize / Fuse /
LowerSparse: the slimfx dialect ops have no gradients. Training writes only into tensors this pass adds
(the user's model and the graph before the pass are untouched).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from .. import ir
from .base import Pass, PassResult, number_in, register_pass
from .quant_calibration import calibration_calls
from .quantize import matches, module_patterns, selected_linears
from .quantize_experts import expert_weights

LOSSES = ("auto", "kl", "mse")


def output_tensor(out, kind: str) -> torch.Tensor:
    """The tensor the loss reads: ``logits`` for "kl" (an attribute or key of the output, or the output
    itself when it is a tensor), else the first floating-point tensor of the output structure."""
    if kind == "kl":
        logits = _logits(out)
        if logits is None and isinstance(out, torch.Tensor):
            logits = out
        if logits is None:
            raise ValueError("Distill(loss='kl'): the model's output has no logits")
        return logits
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("Distill: the model's output holds no floating-point tensor to match")
    return leaves[0]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over every position but the last dim."""
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / temperature, -1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    t = teacher.float()
    return (student.float() - t).square().sum() / t.square().sum().clamp(min=1e-30)


@register_pass(name="distill")
@dataclasses.dataclass
class Distill(Pass):
    """Fine-tune the float graph's linear layers to match a teacher, pruning masks fixed (module docstring).

    steps:       optimizer steps (one calibration batch each)
    lr:          AdamW learning rate (no weight decay)
    temperature: the softening temperature T of the logits loss
    loss:        "auto" (kl when the output has logits by name: ``.logits`` or ``["logits"]``, else mse), "kl"
                 (a model returning its logits as a plain tensor needs it) or "mse"
    teacher:     the model to match; None = the model being compiled (``slimfx.compile`` passes it)
    include/exclude: module-name globs of the linears to train ("*.mlp.*") or "re:<regex>\""""
    steps: int = 100
    lr: float = 1e-4
    temperature: float = 2.0
    loss: str = "auto"
    teacher: Optional[torch.nn.Module] = None
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self):
        self.steps = number_in(self.steps, "Distill.steps", 1, integer=True)
        self.lr = number_in(self.lr, "Distill.lr", 0, open_lo=True)
        self.temperature = number_in(self.temperature, "Distill.temperature", 0, open_lo=True)
        if self.loss not in LOSSES:
            raise ValueError(f"Distill.loss must be one of {LOSSES}, got {self.loss!r}")
        self.include = module_patterns(self.include, "Distill.include")
        self.exclude = module_patterns(self.exclude, "Distill.exclude")

    def _trainable(self, gm: fx.GraphModule) -> list[fx.Node]:
        """The get_attr nodes of the selected linears' float weights and biases and of the selected
        mixture-of-experts tensors (each once)."""
        for n in gm.graph.nodes:
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "slimfx":
                raise ValueError(f"Distill runs on the float graph, but node {n.name!r} "
                                 f"({ir.meta.module_name(n) or 'no module'}) is {n.target}: put Distill after "
                                 f"Prune and before Quantize / Fuse / LowerSparse (slimfx ops have no gradients)")
        seen = {}
        for n, _ in selected_linears(gm, self.include, self.exclude):
            for a in n.args[1:3]:
                if isinstance(a, fx.Node) and a.op == "get_attr" and ir.meta.tensor_attr(gm, a).is_floating_point():
                    seen[a] = None
        experts, _ = expert_weights(gm)
        for ew in experts:
            if (not self.include or matches(ew.name, self.include)) and not matches(ew.name, self.exclude):
                seen[ew.node] = None
        return list(seen)

    def run(self, gm, ctx):
        teacher = self.teacher if self.teacher is not None else ctx.model
        if teacher is None:
            raise ValueError("Distill needs a teacher: run it through slimfx.compile (the model is the teacher) "
                             "or pass Distill(teacher=model)")
        nodes = self._trainable(gm)
        calls = calibration_calls(ctx, "Distill")
        if not nodes:
            return PassResult(gm, False, {"trained": 0, "why": "no float linear layer selected"})
        # the student trains copies: the graph's tensors are shared with the user's model
        params, keep = [], []
        for a in nodes:
            w = ir.meta.tensor_attr(gm, a)
            p = torch.nn.Parameter(w.detach().clone())
            a.target = ir.meta.add_tensor_attr(gm, f"{a.target}_distilled", p)
            params.append(p)
            keep.append(w != 0 if w.ndim >= 2 else None)
        ir.drop_unused_tensors(gm)
        gm.recompile()
        # float16/bfloat16 tensors train through float32 master copies (AdamW's state and update in float32, the
        # graph's copy rounded from it after each step): in float16 AdamW's eps (1e-8) is 0, and a zero gradient
        # made 0/0 at the first step, whatever the learning rate
        masters = [torch.nn.Parameter(p.detach().float()) if p.dtype in (torch.float16, torch.bfloat16) else p
                   for p in params]
        opt = torch.optim.AdamW(masters, lr=self.lr, weight_decay=0.0)
        # a model made under torch.inference_mode: autograd cannot save its tensors for backward (a norm's weight),
        # so training reads copies of those, and the graph the model's own again afterwards
        frozen = {k: t for k, t in ir.tensors(gm).items() if t.is_inference()}
        with torch.no_grad():
            for k, t in frozen.items():
                setattr(gm, k, torch.nn.Parameter(t.clone(), False) if isinstance(t, torch.nn.Parameter) else t.clone())
        with ir.eval_mode(teacher), _restored(gm, frozen):    # each submodule back in its own mode afterwards
            losses, kind, head = [], self.loss, max(1, self.steps // 10)
            cycled = itertools.cycle(calls)
            firsts = list(itertools.islice(cycled, head))      # measured before training and after it
            batches = itertools.islice(itertools.chain(firsts, cycled), self.steps)
            bar = tqdm(batches, total=self.steps, desc="distill", leave=False, disable=not ctx.progress)

            def batch_loss(args, kwargs, step):
                nonlocal kind
                with torch.no_grad():
                    t_out = _run("teacher", teacher, args, kwargs, step,
                                 "each batch holds the model's inputs, over the example kwargs")
                if kind == "auto":
                    kind = "kl" if _logits(t_out) is not None else "mse"
                s_out = _run("graph", gm, args, kwargs, step, "batches of other shapes than the example "
                             "inputs need slimfx.compile(..., dynamic=True)")
                t, s = output_tensor(t_out, kind), output_tensor(s_out, kind)
                return kd_loss(s, t, self.temperature) if kind == "kl" else relative_mse(s, t)

            def first_loss() -> float:
                with torch.no_grad():
                    return sum(float(batch_loss(a, k, i + 1)) for i, (a, k) in enumerate(firsts)) / len(firsts)
            if not firsts:
                raise ValueError("Distill: the calibration data is empty (no batch to train on)")
            before = first_loss()
            try:
                for args, kwargs in bar:
                    step = len(losses) + 1
                    with torch.enable_grad():
                        loss = batch_loss(args, kwargs, step)
                        if not torch.isfinite(loss):
                            raise ValueError(f"Distill: the loss became {float(loss)} at step {step}; "
                                             f"lower lr (now {self.lr})")
                        # gradients of the copies only: backward() would also leave .grad on the model's own
                        # tensors the graph still reads (embeddings, norms, the layers not trained)
                        for m, g in zip(masters, torch.autograd.grad(loss, params, allow_unused=True)):
                            m.grad = None if g is None else g.to(m.dtype)
                    opt.step()
                    with torch.no_grad():
                        for p, m, k in zip(params, masters, keep):
                            if k is not None:
                                m.mul_(k)
                            if m is not p:
                                p.copy_(m)
                    losses.append(loss.item())
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
            finally:
                for p in params:
                    p.requires_grad_(False)
            # the first batches again, trained: on the same batches, a loss above the one before training is the
            # training's doing (25% of the neurons pruned, lr 1e-3: SQNR 26.5 -> 12.8 dB with nothing said)
            after = first_loss()
        first, last = sum(losses[:head]) / head, sum(losses[-head:]) / head
        stats = {"steps": len(losses), "loss": kind, "tensors": len(params), "loss_first": round(first, 6),
                 "loss_last": round(last, 6), "loss_before": round(before, 6),
                 "loss_first_batches_after": round(after, 6)}
        if after > ROSE * before:
            stats["loss_rose"] = True
            warnings.warn(f"Distill: training raised the loss on its first {head} batch(es) from {before:.4g} "
                          f"(before training) to {after:.4g}: the student moved away from the teacher; lower lr "
                          f"(now {self.lr})", RuntimeWarning)
        return PassResult(gm, True, stats)


# the trained graph's loss on the first batches over their loss before training, above which Distill warns: on
# the same batches, a training that gains nothing stays near 1 (1.001 measured at lr 1e-4 on the tiny Llama)
ROSE = 1.05


@contextlib.contextmanager
def _restored(gm: fx.GraphModule, tensors: dict):
    """Put ``tensors`` back as ``gm``'s attributes of their names after the block."""
    try:
        yield
    finally:
        for k, t in tensors.items():
            setattr(gm, k, t)


def _run(who: str, fn, args, kwargs, step: int, hint: str):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise ValueError(f"Distill: the {who} cannot run calibration batch {step} ({type(e).__name__}: {e}); "
                         f"{hint}") from e


def _logits(out) -> Optional[torch.Tensor]:
    """``out.logits`` or ``out["logits"]``, else None."""
    logits = getattr(out, "logits", None)
    return out.get("logits") if logits is None and isinstance(out, dict) else logits


__all__ = ["Distill", "LOSSES", "kd_loss", "relative_mse", "output_tensor"]
