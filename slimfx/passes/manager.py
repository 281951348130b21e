"""The pass manager: runs an ordered pipeline over a graph, and around each pass verifies, times,
measures its numerical effect (SQNR of the outputs against the original model), dumps the IR, and
names the failing pass and the passes before it. ``SLIMFX_DEBUG`` sets how much it prints:
0 nothing, 1 one line per pass, 2 also the IR after each pass that changed it, 3 also its table."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from .. import ir
from .base import Pass, PassContext, as_pass


class PassError(RuntimeError):
    """A pass failed or broke an invariant; says which pass and which passes ran before it."""


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    sqnr_db: Optional[float]          # outputs vs the original model on the example inputs; inf = identical
    stats: dict


def sqnr_db(reference, actual) -> float:
    """10 log10(signal / noise) over all floating-point output tensors; inf when they are identical, nan when
    they cannot be compared. Non-finite values count where the two agree (a fully masked row's NaN in both)
    and make it -inf where they do not (a NaN or inf the other side lacks: the outputs are broken there)."""
    ref = [r for r in pytree.tree_leaves(reference) if isinstance(r, torch.Tensor) and r.is_floating_point()]
    act = [a for a in pytree.tree_leaves(actual) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if len(ref) != len(act) or not ref or any(r.shape != a.shape for r, a in zip(ref, act)):
        return float("nan")
    sig = noise = 0.0
    for r, a in zip(ref, act):
        r, a = r.detach().double(), a.detach().double()
        finite = torch.isfinite(r) & torch.isfinite(a)
        if not bool(finite.all()):
            same = (r == a) | (torch.isnan(r) & torch.isnan(a))
            if not bool((finite | same).all()):
                return -math.inf
            r, a = r[finite], a[finite]
        sig += float(r.pow(2).sum())
        noise += float((r - a).pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(sig / noise) if sig > 0 else -math.inf


def debug_level() -> int:
    try:
        return int(os.environ.get("SLIMFX_DEBUG", "0"))
    except ValueError:
        return 1


def _fingerprint(gm: fx.GraphModule) -> tuple:
    return str(gm.graph), tuple(id(t) for t in ir.tensors(gm).values())


def _content(t: torch.Tensor) -> Optional[tuple]:
    """Where a tensor's data lives and a CRC-32 of its bytes, for the writes torch does not count in ``_version``
    (through ``.data``, a ``.numpy()`` view, ``.data = other``). CRC-32 runs at about 3.5 GB/s on one CPU core
    (0.15 s for 530 MB of float32). None for a tensor off the CPU (reading a GPU's weights back after every pass
    would cost more than the check is worth: the version counter only) or without plain bytes (meta, sparse,
    quantized, a subclass)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout is not torch.strided or t.device.type != "cpu":
        return None
    try:
        flat = t.detach().contiguous().reshape(-1)
        crc = zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0
    except (RuntimeError, TypeError, ValueError):       # a dtype numpy cannot view: the version counter only
        return None
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, crc


def _contents(tensors: dict, known: dict) -> dict:
    """name -> (tensor, ``_content``), taken again only for tensors ``known`` (the check after the last pass) does
    not hold: a pipeline reads each tensor once per pass, not twice."""
    todo = {id(t): t for k, t in tensors.items() if known.get(k, (None,))[0] is not t}   # tied weights: once
    taken = {i: _content(t) for i, t in todo.items()}    # (a thread pool measured no faster here)
    return {k: known[k] if id(t) not in taken else (t, taken[id(t)]) for k, t in tensors.items()}


def _version(t: torch.Tensor) -> Optional[int]:
    """torch's count of in-place writes to ``t``; None for an inference tensor (made under torch.inference_mode),
    which keeps no count: only its content check (when the manager verifies) sees a write to it."""
    return None if t.is_inference() else t._version


def _written(tensors: dict, versions: dict, contents: Optional[dict] = None) -> tuple[list[str], dict]:
    """The graph's tensors (as before a pass) written in place since ``versions`` (and ``contents``, taken when
    the manager verifies) were taken, and the tensors' contents now."""
    now = _contents(tensors, {}) if contents is not None else {}
    return [k for k, t in tensors.items() if _version(t) != versions[k]
            or (contents is not None and now[k][1] != contents[k][1])], now


def _keep_call_convention(new: fx.GraphModule, before: fx.GraphModule) -> Optional[str]:
    """A pass that built a new graph (``fx.Graph()`` + ``graph_copy``, ``fx.GraphModule(gm, graph)``) gets fx's
    flat call convention, not the capture's (keyword inputs bound by position, the outputs' structure lost: a
    model's dict or ModelOutput comes back a tuple). Give it back where the graph still fits it; else say why not
    (also for a pass that changed how many values the graph returns)."""
    want, got = before.graph._codegen, new.graph._codegen
    info, got_info = getattr(want, "pytree_info", None), getattr(got, "pytree_info", None)
    keep = ("; a pass keeps gm.graph._codegen (a new fx.Graph takes it over: new_graph._codegen = "
            "gm.graph._codegen)")
    if got is not want and got_info is not None and \
            (got_info.in_spec, got_info.out_spec) != (info and (info.in_spec, info.out_spec)):
        return "changed the graph's call convention (its pytree codegen's input or output structure)" + keep
    if info is not None:
        n_in = sum(n.op == "placeholder" for n in new.graph.nodes)
        out = next((n for n in reversed(new.graph.nodes) if n.op == "output"), None)
        flat = out.args[0] if out is not None else None
        n_out = len(flat) if isinstance(flat, (tuple, list)) else "not a tuple of"
        if got is not want and info.in_spec is not None and n_in != info.in_spec.num_leaves:
            return f"left a graph with {n_in} inputs where the call convention has {info.in_spec.num_leaves}" + keep
        if out is not None and info.out_spec is not None and n_out != info.out_spec.num_leaves:
            return (f"left a graph whose output is {n_out} values where the call convention returns "
                    f"{info.out_spec.num_leaves} (the model's outputs, flattened)" + (keep if got is not want else ""))
    if got is not want:
        new.graph._codegen = want
        new.recompile()
    return None


class PassManager:
    def __init__(self, passes: Sequence, *, verify: bool = True, measure: bool = True,
                 dump_dir: Optional[str] = None, progress: bool = True):
        if isinstance(passes, (str, Pass)) or callable(passes):     # one pass given alone ("dce" is not 3 passes)
            passes = [passes]
        try:
            passes = list(passes)
        except TypeError:
            raise TypeError(f"passes must be a pipeline: a list of pass names, Pass objects or functions "
                            f"(passes=() for none), got {passes!r:.80}") from None
        self.passes: list[Pass] = [as_pass(p) for p in passes]
        self.verify, self.measure, self.progress = verify, measure, progress
        self.dump_dir = Path(dump_dir) if dump_dir else None
        if self.dump_dir is not None:      # checked now, not after a capture and the passes before the first dump
            there = next((d for d in (self.dump_dir, *self.dump_dir.parents) if d.exists()), None)
            if there is not None and not there.is_dir():
                raise ValueError(f"dump_dir {str(dump_dir)!r} cannot be a folder: {str(there)!r} is a file")

    def run(self, gm: fx.GraphModule, ctx: PassContext, reference=None) -> tuple[fx.GraphModule, list[PassRecord]]:
        """Run the pipeline on a fork of ``gm`` (which stays as it was). ``reference`` is the original
        model's output on ctx's example inputs, for the SQNR column."""
        level = debug_level()
        expected, inputs = ir.output_signature(gm), ir.input_signature(gm)
        records: list[PassRecord] = []
        self._dump(0, "captured", gm)
        bar = tqdm(self.passes, desc="slimfx passes", disable=not self.progress or not self.passes, leave=False)
        sqnr, known = None, {}
        for i, p in enumerate(bar, start=1):
            name = p.pass_name
            bar.set_postfix_str(name)
            before = ir.fork(gm)
            state = ir.state_tensors(before)   # the graph's own writes when it runs (calibration runs it)
            fp, tensors = _fingerprint(before), {k: t for k, t in ir.tensors(before).items() if k not in state}
            versions = {k: _version(t) for k, t in tensors.items()}
            contents = _contents(tensors, known) if self.verify else None
            n_before = len(before.graph.nodes)
            t0 = time.perf_counter()
            try:
                with ir.state_kept(state):    # runs on calibration data leave the state as it was
                    res = p(before, ctx)
            except Exception as e:
                raise self._error(name, records, f"raised {type(e).__name__}: {e}",
                                  _written(tensors, versions, contents)[0]) from e
            seconds = time.perf_counter() - t0
            new = res.graph_module
            written, known = _written(tensors, versions, contents)
            if written:
                raise self._error(name, records, "wrote into tensors in place (also through .data or a .numpy() "
                                                 "view, which torch does not count); passes must add new tensors "
                                                 "(ir.meta.add_tensor_attr)", written)
            if isinstance(new, fx.GraphModule):
                lost = _keep_call_convention(new, before)
                if lost:
                    raise self._error(name, records, lost)
            if not isinstance(res.stats, dict):
                raise self._error(name, records, f"returned stats of type {type(res.stats).__name__}; "
                                                 f"PassResult's stats must be a dict")
            # a pass's own word counts only when it says it changed the graph: one that edited the graph and said
            # False would skip the recompile, the verifier and the measurement (torch then ran the old code)
            modified = bool(res.modified) or _fingerprint(new) != fp
            if modified:
                try:
                    new.recompile()
                    if self.verify:
                        ir.verify(new, expected, expected_inputs=inputs)
                except Exception as e:      # noqa: BLE001 - the verifier's reasons and anything recompiling hits
                    raise self._error(name, records, f"left a graph the verifier rejects: {e}") from e
                if self.measure and reference is not None:
                    try:
                        out = run_torch(new, ctx)
                    except Exception as e:      # noqa: BLE001 - shapes propagate, the values fail
                        raise self._error(name, records, f"left a graph that fails on the example inputs: "
                                                         f"{type(e).__name__}: {e}") from e
                    sqnr = sqnr_db(reference, out)
            elif sqnr is None and self.measure and reference is not None:
                sqnr = math.inf
            rec = PassRecord(name, seconds, n_before, len(new.graph.nodes), modified, sqnr, dict(res.stats))
            records.append(rec)
            gm = new
            self._dump(i, name, gm)
            if level >= 1:
                print(f"[slimfx] {i:2d} {name:<16} {seconds * 1e3:8.1f} ms  nodes {n_before}->{rec.nodes_after}"
                      f"  {'changed' if modified else 'unchanged'}  sqnr {_fmt_db(sqnr)}  {rec.stats}", file=sys.stderr)
            if level >= 2 and modified:
                print(ir.code(gm), file=sys.stderr)
            if level >= 3 and modified:
                print(ir.table(gm), file=sys.stderr)
        return gm, records

    def _error(self, name: str, records: list[PassRecord], what: str, written: Sequence[str] = ()) -> PassError:
        before = [r.name for r in records]
        if written:       # the graph shares the model's tensors: a write in place reached the model
            more = f" and {len(written) - 3} more" if len(written) > 3 else ""
            return PassError(f"pass {name!r} {what}\n  (it ran after the passes: {before}; it wrote in place into "
                             f"{list(written[:3])}{more}, tensors the graph shares with the model, so the model "
                             f"holds those writes now; the graph before this pass is otherwise untouched)")
        return PassError(f"pass {name!r} {what}\n  (it ran after the passes: {before}; the model and the "
                         f"graph before this pass are untouched)")

    def _dump(self, i: int, name: str, gm: fx.GraphModule) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^\w.-]", "_", name)          # a file name, whatever the pass is called
        (self.dump_dir / f"{i:02d}_{safe}.txt").write_text(ir.code(gm) + "\n\n" + ir.table(gm) + "\n")


def run_torch(gm: fx.GraphModule, ctx: PassContext):
    """The graph's output on the example inputs, from the state it had (a measurement does not advance it)."""
    with torch.no_grad(), ir.state_kept(ir.state_tensors(gm)):
        return gm(*ctx.example_args, **ctx.example_kwargs)


def _fmt_db(v: Optional[float]) -> str:
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.1f} dB")
