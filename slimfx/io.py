"""Saving a compiled model and loading it back, with no pickle: structure in JSON, tensors in safetensors.

    cm.save("minilm-w8a8")                      # a folder: slimfx.json + tensors.safetensors
    cm = slimfx.load("minilm-w8a8", backend="triton")

The folder holds the compressed graph (int8 weights and their scales, int4 codes two per byte, pruned and
shrunk layers), how to call it (argument names, the dynamic dims and their ranges, the output structure)
and the compile report.
Loading needs neither the original model nor its weights, and may choose another backend: compress on a
CPU, serve from the file on a GPU.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import safetensors.torch
import torch

from . import ir
from .backends import check_options, lower
from .ir.serialize import FormatError, plain, read_json, unplain
from .passes import PassRecord
from .quant.int4 import pack_int4_torch, unpack_int4_torch
from .report import Report
from .signature import InputSignature

GRAPH_FILE, TENSOR_FILE = "slimfx.json", "tensors.safetensors"


def _unshare(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors stores each tensor once and refuses views of one storage: an attribute that is the very
    same view as another (tied embeddings) becomes an alias of it; any other overlap is copied."""
    out, aliases, seen, storages = {}, {}, {}, set()
    for name, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
               t.device)
        if key in seen and t.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = (t.device, t.untyped_storage().data_ptr())
        whole = t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        shared = ptr in storages or not whole
        storages.add(ptr)
        out[name] = (t.contiguous().clone() if shared else t).cpu()
    return out, aliases


def _pack_int4(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """int8 tensors whose values all fit 4 bits (int4 weight codes, which the graph keeps one per byte) are
    stored two per byte (``slimfx.quant.int4``), in place; returns their names and last-axis lengths."""
    packed = {}
    for name, t in tensors.items():
        if t.dtype == torch.int8 and t.numel() >= 64 and int(t.min()) >= -8 and int(t.max()) <= 7:
            packed[name] = int(t.shape[-1])
            tensors[name] = pack_int4_torch(t)
    return packed


def save(cm, path) -> pathlib.Path:
    """Write ``cm`` (a ``CompiledModel``) to the folder ``path`` (created; its two files replaced)."""
    from .ir.serialize import to_json
    from .lm import CompiledCausalLM
    if isinstance(cm, CompiledCausalLM):
        return cm.save(path)
    path = pathlib.Path(path)
    graph, tensors = to_json(cm.graph, cm._signature.ranges)
    tensors, aliases = _unshare(tensors)
    int4 = _pack_int4(tensors)
    report = cm.report()
    from . import __version__
    data = {"slimfx": __version__, "torch": torch.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "backend": cm.backend, "signature": cm._signature.to_json(), "graph": graph, "aliases": aliases, "int4_packed": int4,
            "report": {"model": report.model, "capture_method": report.capture_method, "capture_s": report.capture_s,
                       "capture_reused": report.capture_reused, "captured_nodes": report.captured_nodes,
                       "records": plain([vars(r) for r in report.records])}}
    path.mkdir(parents=True, exist_ok=True)
    from .lm import LM_FILE
    (path / LM_FILE).unlink(missing_ok=True)   # a causal LM saved here before: this is a plain model (the LM's
    #                                            save writes its file again after this)
    for name, write in ((TENSOR_FILE, lambda p: safetensors.torch.save_file(tensors, str(p), {"format": "slimfx"})),
                        (GRAPH_FILE, lambda p: p.write_text(json.dumps(data, indent=1, default=str, allow_nan=False)))):
        tmp = path / (name + ".tmp")
        write(tmp)
        os.replace(tmp, path / name)           # a reader never sees half a file
    return path


def load(path, backend: str | None = None, backend_options: dict | None = None):
    """The ``CompiledModel`` saved in the folder ``path``, lowered to ``backend`` (default: the one it was
    saved with) with ``backend_options``; a ``CompiledCausalLM`` when the folder holds one."""
    from .api import CompiledModel
    from .ir.serialize import from_json
    path = pathlib.Path(path)
    for name in (GRAPH_FILE, TENSOR_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"slimfx.load: {path} has no {name} "
                                    f"(is it a folder written by CompiledModel.save?)")
    def bad(what: str) -> FormatError:
        return FormatError(f"slimfx.load({str(path)!r}): {what}")

    data = read_json(path / GRAPH_FILE, f"slimfx.load({str(path)!r}): {GRAPH_FILE}",
                     ("backend", "graph", "signature", "report"))
    backend = backend or data["backend"]
    check_options(backend, backend_options)
    try:
        tensors = safetensors.torch.load_file(str(path / TENSOR_FILE))
    except Exception as e:            # safetensors' own errors: a truncated or foreign file
        raise bad(f"{TENSOR_FILE} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    for name, k in data.get("int4_packed", {}).items():
        t = tensors.get(name)
        if t is None or t.dtype != torch.uint8:
            raise bad(f"packed int4 tensor {name!r} is " + ("missing from the tensor file" if t is None else
                                                           f"{t.dtype}, not uint8 (two 4-bit codes per byte)"))
        try:
            tensors[name] = unpack_int4_torch(t, int(k))
        except ValueError as e:
            raise bad(f"packed int4 tensor {name!r}: {e}") from e
    for name, target in data.get("aliases", {}).items():
        if target not in tensors:
            raise bad(f"tensor {name!r} is an alias of {target!r}, which the tensor file does not hold")
        tensors[name] = tensors[target]
    try:
        gm, ranges = from_json(data["graph"], tensors)
    except (FormatError, ir.VerificationError) as e:
        raise type(e)(f"slimfx.load({str(path)!r}): {e}") from e
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:      # a damaged graph
        raise bad(f"the graph in {GRAPH_FILE} cannot be rebuilt ({type(e).__name__}: {e})") from e
    try:
        signature = InputSignature.from_json(data["signature"], gm, ranges)
        r = data["report"]
        records = [PassRecord(**rec) for rec in unplain(r["records"])]
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"the call signature or report in {GRAPH_FILE} is damaged ({type(e).__name__}: {e})") from e
    t0 = time.perf_counter()
    executable = lower(gm, backend, backend_options)
    report = Report(r["model"], r["capture_method"], backend, r["capture_s"], time.perf_counter() - t0, records,
                    r["captured_nodes"], gm, capture_reused=r.get("capture_reused", False))
    cm = CompiledModel(gm, executable, report, signature)
    from .lm import LM_FILE, CompiledCausalLM
    return CompiledCausalLM.from_saved(cm, path) if (path / LM_FILE).is_file() else cm
