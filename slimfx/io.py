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
import uuid

import safetensors
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


def _unshare(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict]]:
    """(stored, aliases, strided): safetensors stores each tensor once, contiguous, and refuses views of one storage.
    An attribute that is the very same view as another (tied embeddings) becomes an alias of it; any other overlap
    is copied. A copy of a tensor that is not contiguous (a transposed or sliced weight) keeps its strides: the
    part of the storage it spans is stored flat, with a ``strided`` entry (its shape and strides) that ``load``
    gives back by ``as_strided``: torch's matmul over a contiguous copy of a transposed weight rounds differently."""
    out, aliases, strided, seen, storages = {}, {}, {}, {}, set()
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
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        if not shared:
            out[name] = t.cpu()
        elif t.is_contiguous() or not t.numel():
            out[name] = t.contiguous().clone().cpu()
        elif span <= 2 * t.numel():               # a transpose, a slice, an expand: the storage it spans
            out[name] = t.as_strided((span,), (1,), t.storage_offset()).clone().cpu()
            strided[name] = {"shape": list(t.shape), "stride": list(t.stride())}
        else:                                     # a few columns of a wide matrix: dense, in its dims' order
            order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
            dense = t.permute(order).contiguous()
            out[name] = dense.reshape(-1).cpu()
            stride = [0] * t.dim()
            for d, st in zip(order, dense.stride()):
                stride[d] = st
            strided[name] = {"shape": list(t.shape), "stride": stride}
    return out, aliases, strided


def _restride(name: str, v, flat) -> torch.Tensor:
    """The tensor a ``strided`` entry describes over its stored storage span ``flat``; ValueError saying what is
    wrong."""
    if not (isinstance(v, dict) and set(v) == {"shape", "stride"} and isinstance(v["shape"], list)
            and isinstance(v["stride"], list) and len(v["shape"]) == len(v["stride"])
            and all(isinstance(x, int) and x >= 0 for x in [*v["shape"], *v["stride"]])):
        raise ValueError(f"{name!r} must be {{'shape': [int, ...], 'stride': [int, ...]}}, got {v!r:.120}")
    if flat is None:
        raise ValueError(f"{name!r} is missing from the tensor file")
    span = 1 + sum((n - 1) * s for n, s in zip(v["shape"], v["stride"])) if all(v["shape"]) else 0
    if flat.dim() != 1 or span > flat.numel():
        raise ValueError(f"{name!r} spans {span} elements, but the tensor file holds {tuple(flat.shape)}")
    return flat.as_strided(v["shape"], v["stride"], flat.storage_offset())


def _pack_int4(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """int8 tensors whose values all fit 4 bits (int4 weight codes, which the graph keeps one per byte) are
    stored two per byte (``slimfx.quant.int4``), in place; returns their names and last-axis lengths."""
    packed = {}
    for name, t in tensors.items():
        if t.dtype == torch.int8 and t.numel() >= 64 and int(t.min()) >= -8 and int(t.max()) <= 7:
            packed[name] = int(t.shape[-1])
            tensors[name] = pack_int4_torch(t)
    return packed


def save(cm, path, extra: dict | None = None) -> pathlib.Path:
    """Write ``cm`` (a ``CompiledModel``) to the folder ``path`` (created; its files replaced), with ``extra``
    JSON files beside it ({file name: object}: a causal LM's causal_lm.json).

    Everything is serialized before the folder is touched, and every file is written under a temporary name
    first, so a save that fails leaves the folder's previous save as it was. The tensor file is replaced first,
    then the extra files, and slimfx.json last; all carry one random save id, which ``load`` checks: a folder
    caught between the replaces (a crash, or a reader racing a writer) is refused, never loaded as one save's
    graph over another's tensors, or as a plain model where a causal LM was saved."""
    from .ir.serialize import to_json
    from .lm import LM_FILE, CompiledCausalLM
    from .seq2seq import SEQ2SEQ_FILE
    if isinstance(cm, CompiledCausalLM):
        return cm.save(path)
    extra = dict(extra or {})
    if set(extra) - {LM_FILE}:
        raise ValueError(f"slimfx.save: unknown extra files {sorted(set(extra) - {LM_FILE})}")
    path = pathlib.Path(path)
    graph, tensors = to_json(cm.graph, cm._signature.ranges)
    tensors, aliases, strided = _unshare(tensors)
    int4 = _pack_int4(tensors)
    report = cm.report()
    from . import __version__
    save_id = uuid.uuid4().hex
    data = {"slimfx": __version__, "torch": torch.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "save_id": save_id, "extra_files": sorted(extra), "backend": cm.backend,
            "signature": cm._signature.to_json(), "graph": graph,
            "aliases": aliases, "strided": strided, "int4_packed": int4,
            "report": {"model": report.model, "capture_method": report.capture_method, "capture_s": report.capture_s,
                       "capture_reused": report.capture_reused, "captured_nodes": report.captured_nodes,
                       "records": plain([vars(r) for r in report.records])}}
    try:
        texts = {name: json.dumps({**obj, "save_id": save_id}, indent=1, allow_nan=False)
                 for name, obj in extra.items()}
        texts[GRAPH_FILE] = json.dumps(data, indent=1, default=str, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"slimfx.save({str(path)!r}): {report.model} cannot be written as JSON ({e}); "
                         f"nothing was written") from e
    path.mkdir(parents=True, exist_ok=True)
    order = [TENSOR_FILE, *sorted(extra), GRAPH_FILE]          # the order load's save id checks rely on
    tmp = {name: path / (name + ".tmp") for name in order}
    try:
        safetensors.torch.save_file(tensors, str(tmp[TENSOR_FILE]), {"format": "slimfx", "save_id": save_id})
        for name in order[1:]:
            tmp[name].write_text(texts[name], encoding="utf-8")
        for name in order:
            if name == GRAPH_FILE and LM_FILE not in extra:
                (path / LM_FILE).unlink(missing_ok=True)      # a causal LM saved here before: this is a plain model
            if name == GRAPH_FILE:
                (path / SEQ2SEQ_FILE).unlink(missing_ok=True)  # an encoder-decoder model saved here before
            os.replace(tmp[name], path / name)     # a reader never sees half a file
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    return path


def _save_id(file: pathlib.Path):
    with safetensors.safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get("save_id")


def load(path, backend: str | None = None, backend_options: dict | None = None):
    """The ``CompiledModel`` saved in the folder ``path``, lowered to ``backend`` (default: the one it was
    saved with) with ``backend_options``; a ``CompiledCausalLM`` or ``CompiledSeq2SeqLM`` when the folder holds
    one."""
    from .api import CompiledModel
    from .ir.serialize import from_json
    path = pathlib.Path(path)
    from .seq2seq import SEQ2SEQ_FILE, CompiledSeq2SeqLM
    if (path / SEQ2SEQ_FILE).is_file():
        return CompiledSeq2SeqLM.from_saved(path, backend, backend_options)
    for name in (GRAPH_FILE, TENSOR_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"slimfx.load: {path} has no {name} "
                                    f"(is it a folder written by CompiledModel.save?)")
    def bad(what: str) -> FormatError:
        return FormatError(f"slimfx.load({str(path)!r}): {what}")

    data = read_json(path / GRAPH_FILE, f"slimfx.load({str(path)!r}): {GRAPH_FILE}",
                     ("backend", "graph", "signature", "report"))
    for key, kind in (("backend", str), ("graph", dict), ("signature", dict), ("report", dict),
                      ("int4_packed", dict), ("aliases", dict), ("strided", dict), ("save_id", str)):
        if key in data and not isinstance(data[key], kind):
            want = "a string" if kind is str else "an object"
            raise bad(f"{GRAPH_FILE}: {key!r} is {type(data[key]).__name__}, not {want}")
    backend = backend or data["backend"]
    check_options(backend, backend_options)
    try:
        tensors = safetensors.torch.load_file(str(path / TENSOR_FILE))
        save_id = _save_id(path / TENSOR_FILE)
    except Exception as e:            # safetensors' own errors: a truncated or foreign file
        raise bad(f"{TENSOR_FILE} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if save_id is not None and save_id != data.get("save_id"):    # (a tensor file saved before has none)
        raise bad(f"{TENSOR_FILE} (save {save_id}) and {GRAPH_FILE} (save {data.get('save_id')}) were written by "
                  f"different saves: a save into this folder was interrupted or is under way; save the model again")
    for name, k in data.get("int4_packed", {}).items():
        t = tensors.get(name)
        if t is None or t.dtype != torch.uint8:
            raise bad(f"packed int4 tensor {name!r} is " + ("missing from the tensor file" if t is None else
                                                           f"{t.dtype}, not uint8 (two 4-bit codes per byte)"))
        try:
            tensors[name] = unpack_int4_torch(t, int(k))
        except (TypeError, ValueError) as e:
            raise bad(f"{GRAPH_FILE}: int4_packed: packed int4 tensor {name!r}: {e}") from e
    for name, v in data.get("strided", {}).items():              # (absent from files saved before)
        try:
            tensors[name] = _restride(name, v, tensors.get(name))
        except (ValueError, RuntimeError) as e:
            raise bad(f"{GRAPH_FILE}: strided: {e}") from e
    for name, target in data.get("aliases", {}).items():
        if target not in tensors:
            raise bad(f"tensor {name!r} is an alias of {target!r}, which the tensor file does not hold")
        tensors[name] = tensors[target]
    try:
        gm, ranges = from_json(data["graph"], tensors)
    except (FormatError, ir.VerificationError) as e:
        raise type(e)(f"slimfx.load({str(path)!r}): {GRAPH_FILE}: {e}") from e
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:      # a damaged graph
        raise bad(f"the graph in {GRAPH_FILE} cannot be rebuilt ({type(e).__name__}: {e})") from e
    try:
        signature = InputSignature.from_json(data["signature"], gm, ranges)
        r = data["report"]
        records = [PassRecord(**rec) for rec in unplain(r["records"])]
        saved = (r["model"], r["capture_method"], r["capture_s"], r["captured_nodes"], r.get("capture_reused", False))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"the call signature or report in {GRAPH_FILE} is damaged ({type(e).__name__}: {e})") from e
    t0 = time.perf_counter()
    executable = lower(gm, backend, backend_options)
    model, capture_method, capture_s, captured_nodes, capture_reused = saved
    report = Report(model, capture_method, backend, capture_s, time.perf_counter() - t0, records, captured_nodes,
                    gm, capture_reused=capture_reused)
    cm = CompiledModel(gm, executable, report, signature)
    from .lm import LM_FILE, CompiledCausalLM
    if "extra_files" in data:                # (files saved before list none: their causal_lm.json is taken as is)
        listed = data["extra_files"]
        if not (isinstance(listed, list) and all(isinstance(n, str) for n in listed)):
            raise bad(f"{GRAPH_FILE}: 'extra_files' is not a list of file names")
        if LM_FILE in listed and not (path / LM_FILE).is_file():
            raise bad(f"{GRAPH_FILE} was saved with a {LM_FILE} (a causal LM), which the folder lacks; "
                      f"save the model again")
        if LM_FILE not in listed and (path / LM_FILE).is_file():
            raise bad(f"{LM_FILE} is not part of the save in {GRAPH_FILE} (a plain model): a save into this "
                      f"folder was interrupted or the file was copied in; save the model again")
    # files saved before causal_lm.json was part of the save carry no save id in it: only newer ones are checked
    lm_id = data.get("save_id") if "extra_files" in data else None
    return CompiledCausalLM.from_saved(cm, path, lm_id) if (path / LM_FILE).is_file() else cm
