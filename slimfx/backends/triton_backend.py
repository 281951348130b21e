"""The triton backend: dialect ops run as Triton kernels (slimfx.kernels), everything else as torch ops on
the device.

Lowering copies the graph, gives it its own copies of the module's tensors on the device, points device
literals (``arange(..., device=cpu)``) at that device, and turns each dialect node into a call of a small
module (``Lowered*``) that runs the kernel or the dense path. Which one is decided per layer and per shape
bucket (M rounded up to a power of two; N, K, dtype exact) at the first call that meets the bucket:
both are timed with ``triton.testing.do_bench`` and the kernel is used only when it is faster. Decisions
are cached in a JSON file keyed by (device name, op, bucket): ``$SLIMFX_KERNEL_CACHE`` or
``~/.cache/slimfx/kernel_choices.json`` (``SLIMFX_KERNEL_CHOICE=kernel`` or ``dense`` skips measuring). The choice and its reason ("int8_gemm 0.041 ms vs bf16 0.063 ms")
go to ``ir.meta.info(node).kernel`` of the compiled graph's node.

``cuda_graphs=True`` (``backend_options``) captures the whole lowered program into a CUDA graph per input
signature and replays it (see TritonProgram); the per-layer choices are then timed by graph replay too.

The dense path of a quantized linear is the GEMM with the dequantized weight in the layer's dtype (bf16 for a
bf16 model; activations are not quantized there): what the layer would cost without its kernel. A
sparse_linear's dense path is the same layer through cuBLAS in the model's dtype; its kernel path packs the weight at lowering (2:4 values +
metadata, or BSR blocks), and only the packed form goes to the device (see Lowered: dense weights are
rebuilt for the buckets that use them, and dequantized copies let go once the kernel wins;
``TritonProgram.held_bytes`` counts both). Under TRITON_INTERPRET=1 nothing can be
measured: the kernel is always chosen ("interpreter: correctness mode") so the CPU tests exercise it.
"""
from __future__ import annotations

import json
import os
import pathlib

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

import slimfx.ir.dialect  # noqa: F401
from slimfx.kernels import _common as C

from .. import ir
from .numpy_backend import _positional

sf = torch.ops.slimfx
INTERPRETER = "interpreter: correctness mode"


# --- choosing ----------------------------------------------------------------------------------------

def cache_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SLIMFX_KERNEL_CACHE", "~/.cache/slimfx/kernel_choices.json")).expanduser()


_MEMO: dict[str, dict] = {}       # this process's view of the cache file (measurements are costly)


_ENTRY = {"kernel": str, "kernel_ms": (int, float), "dense": str, "dense_ms": (int, float), "use_kernel": bool}
_WARNED: set = set()


def _warn(what: str) -> None:
    """Once per message: a cache the backend cannot read or write costs measurements, never a forward."""
    if what not in _WARNED:
        _WARNED.add(what)
        import warnings
        warnings.warn(f"slimfx triton backend: {what}", RuntimeWarning, stacklevel=3)


def _load() -> dict:
    """The cache file's entries, those of the expected form (a missing, unreadable or damaged file is empty, with a
    warning naming SLIMFX_KERNEL_CACHE for the unreadable and damaged)."""
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _warn(f"cannot read the kernel-choice cache {path} ({type(e).__name__}: {e}; SLIMFX_KERNEL_CACHE may name "
              f"another file); measuring again")
        return {}
    if not isinstance(data, dict):
        _warn(f"the kernel-choice cache {path} holds no JSON object; measuring again")
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)
            and all(isinstance(v.get(f), t) for f, t in _ENTRY.items())}


def _store(key: str, entry: dict) -> None:
    path = cache_path()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load()
        data[key] = entry
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:            # a read-only home, a directory in the way: keep the choice in this process
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        _warn(f"cannot write the kernel-choice cache {path} ({type(e).__name__}: {e}; set SLIMFX_KERNEL_CACHE "
              f"to a writable file); choices are kept for this process only")


def choose(op: str, bucket: str, kernel_name: str, kernel_fn, dense_name: str, dense_fn,
           graphs: bool = False) -> tuple[bool, str]:
    """(use the kernel?, reason). Measured once per (device, op, bucket, timing mode), then read from the
    cache. ``graphs``: the program replays CUDA graphs, so both sides are timed by graph replay (no host
    launch cost, which would otherwise decide every decode-shape choice)."""
    forced = os.environ.get("SLIMFX_KERNEL_CHOICE", "measure")
    if forced not in ("kernel", "dense", "measure"):
        raise ValueError(f"SLIMFX_KERNEL_CHOICE={forced!r}: expected 'kernel', 'dense' or 'measure' (unset)")
    if C.interpreting():
        return True, f"{kernel_name} ({INTERPRETER})"
    if forced in ("kernel", "dense"):
        return forced == "kernel", f"{kernel_name if forced == 'kernel' else dense_name} (SLIMFX_KERNEL_CHOICE={forced})"
    key = f"{torch.cuda.get_device_name()}|{op}|{bucket}" + ("|cudagraph" if graphs else "")
    entry = _MEMO.get(key) or _load().get(key)
    if entry is None:
        import triton.testing
        if graphs:
            def timer(fn):
                return triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median")
        else:
            timer = triton.testing.do_bench
        k_ms, d_ms = timer(kernel_fn), timer(dense_fn)
        entry = {"kernel": kernel_name, "kernel_ms": round(k_ms, 4), "dense": dense_name, "dense_ms": round(d_ms, 4),
                 "use_kernel": k_ms < d_ms}
        _store(key, entry)
    _MEMO[key] = entry
    k, d = f"{entry['kernel']} {entry['kernel_ms']:.3f} ms", f"{entry['dense']} {entry['dense_ms']:.3f} ms"
    return entry["use_kernel"], f"{k} vs {d}" if entry["use_kernel"] else f"{entry['dense']}: {d} vs {k}"


# exception types whose constructor takes one message: re-raised with the node's name in front (others get a note)
_RENAMED = (TypeError, ValueError, RuntimeError, OverflowError, NotImplementedError)


class Lowered(torch.nn.Module):
    """One dialect node: runs ``kernel`` or ``dense`` per shape bucket, and says which in the node's info.

    The dense path may build its weight at its first call (dequantized, unpacked from 2:4 or BSR)
    and keep it in ``_w`` / ``_b``; once every bucket met so far chose the kernel, those go again, so a
    compressed layer holds only its compressed weight on the device. ``drops_weight``: the layer packed its
    weight at lowering and the kernel reads only the packed form, so TritonProgram passes None in place
    of the dense weight, which then never reaches the device (the dense path rebuilds it from the packed)."""
    op = ""
    kernel_name = ""
    dense_name = "dense"
    drops_weight = False

    def __init__(self, info: ir.meta.NodeInfo, name: str):
        super().__init__()
        self.info, self.node_name = info, name
        self.decisions: dict[str, tuple[bool, str]] = {}
        self.graphs = False            # set by TritonProgram: time the choice by CUDA-graph replay
        if C.interpreting():
            self.info.kernel = f"{self.kernel_name} ({INTERPRETER})"
        else:
            self.info.kernel = f"{self.kernel_name} or {self.dense_name}: measured at the first call per shape bucket"

    def dense_label(self, *args) -> str:
        """What the dense path is called in the reasons for these arguments."""
        return self.dense_name

    def release_dense(self) -> None:
        """Drop what the dense path built for itself (no bucket uses it now; it is rebuilt if one does)."""
        self._w = self._b = None

    def bucket(self, x, w=None, *args) -> str:
        """M rounded up to a power of two; K, N (the weight's rows) and dtype exact."""
        m = x.numel() // max(x.shape[-1], 1)
        n = f"|N{w.shape[0]}" if isinstance(w, torch.Tensor) and w.ndim == 2 else ""
        return f"M{C.m_bucket(m)}|K{x.shape[-1]}{n}|{str(x.dtype).replace('torch.', '')}"

    def unsupported(self, *args) -> str | None:
        """Why the kernel cannot run these arguments (their bucket then takes the dense path, unmeasured), or
        None."""
        return None

    def forward(self, *args):
        try:
            b = self.bucket(*args)
            if b not in self.decisions:
                why = self.unsupported(*args)
                self.decisions[b] = (False, f"{self.dense_label(*args)}: {why}") if why else choose(
                    self.op, b, self.kernel_name, lambda: self.kernel(*args), self.dense_label(*args),
                    lambda: self.dense(*args), self.graphs)      # times the kernel: its errors named below too
                self.info.kernel = "; ".join(f"{k.split('|')[0]}: {r}" for k, (_, r) in self.decisions.items()) \
                    if len(self.decisions) > 1 else self.decisions[b][1]
                if all(use for use, _ in self.decisions.values()):
                    self.release_dense()
            return self.kernel(*args) if self.decisions[b][0] else self.dense(*args)
        except Exception as e:
            where = f"triton backend: node {self.node_name} ({self.op})"
            if type(e) in _RENAMED:
                raise type(e)(f"{where}: {e}") from e
            e.add_note(where)         # an exception type whose constructor takes other arguments keeps its own
            raise


def _dense_dtype(x: torch.Tensor, bias) -> torch.dtype:
    """The dtype a quantized layer's dense path computes in: the layer's (its float input's; for int8 input,
    static activations, its bias's, else fp32, the op's output dtype)."""
    if x.is_floating_point():
        return x.dtype
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32


def _dequant(w_q, w_scale, group_size=0, zp=None) -> torch.Tensor:
    from slimfx.quant.linear import dequantize_weight_torch
    return dequantize_weight_torch(w_q, w_scale, zp, group_size)


def _pack_bsr(mod: torch.nn.Module, w: torch.Tensor, block: tuple[int, int]) -> float:
    """w as BSR buffers of ``mod`` (they move to the device with it; _bsr(mod) reads them back); returns
    the fraction of blocks kept."""
    from slimfx.kernels import to_bsr
    bsr = to_bsr(w.detach(), block)
    for f in ("values", "col_idx", "row_ptr", "row_order"):
        mod.register_buffer(f"bsr_{f}", getattr(bsr, f))
    mod.bsr_shape = bsr.shape
    return bsr.density


def _bsr(mod: torch.nn.Module):
    from slimfx.kernels import BSR
    return BSR(mod.bsr_values, mod.bsr_col_idx, mod.bsr_row_ptr, mod.bsr_shape, mod.block, mod.bsr_row_order)


class LoweredQuantizedLinear(Lowered):
    """quantized_linear: act_quant.quantize_per_token (float x; rows longer than act_quant.MAX_K = 32768 are
    quantized by its torch reference, slimfx.quant.linear's, which it equals bit for bit) + int8_gemm with the
    dequant/bias epilogue (K > quant.linear.MAX_K = 131071, where the int32 accumulator could overflow, takes
    the dense path);
    with a block pattern in the node's info (LowerSparse), bsr_int8_gemm over the weight's BSR (packed
    here) with the same epilogue: the same int32 sums (zero blocks add nothing), the same rounding."""
    op, kernel_name = "quantized_linear", "int8_gemm"

    def __init__(self, info, name, w_q: torch.Tensor | None = None):
        self.block, self._w, self._b = None, None, None
        if info.sparse is not None and w_q is not None:
            from slimfx.ir.dialect.sparse import parse_pattern
            self.block = parse_pattern(info.sparse)
            if self.block is None:
                raise ValueError(f"triton backend: node {name} (quantized_linear): int8 weights have no 2:4 kernel; "
                                 f"the node's sparse pattern must be a block pattern, got {info.sparse!r}")
            self.kernel_name = f"bsr_int8_gemm {info.sparse[6:]}"
        super().__init__(info, name)
        if self.block is not None:
            self.density = _pack_bsr(self, w_q, self.block)
            self.drops_weight, self.n = True, w_q.shape[0]        # the BSR holds the int8 weight

    def bucket(self, x, w_q, *rest):
        sparse = "" if self.block is None else f"|{self.info.sparse}|d{self.density:.2f}"
        return super().bucket(x) + f"|N{self.n if w_q is None else w_q.shape[0]}" + sparse

    def unsupported(self, x, *rest) -> str | None:
        from slimfx.quant.linear import MAX_K
        if x.shape[-1] > MAX_K:
            return f"K = {x.shape[-1]} exceeds {MAX_K}, past which the int8 GEMM's int32 accumulator could overflow"
        return None

    def kernel(self, x, w_q, w_scale, bias=None, x_scale=None):
        from slimfx import kernels as K
        from slimfx.kernels.act_quant import MAX_K as ACT_MAX_K
        x = x.contiguous()
        if x.dtype == torch.int8:
            m = x.numel() // x.shape[-1]
            s = x_scale.to(torch.float32).reshape(-1)
            q, s, out_dtype = x, (s.expand(m) if s.numel() == 1 else s).contiguous(), torch.float32
        elif x.shape[-1] > ACT_MAX_K:       # rows wider than act_quant keeps in registers: the torch reference,
            from slimfx.quant.linear import quantize_per_token_torch    # which the kernel equals bit for bit
            (q, s), out_dtype = quantize_per_token_torch(x), x.dtype
        else:
            (q, s), out_dtype = K.quantize_per_token(x), x.dtype
        if self.block is not None:
            return K.bsr_int8_gemm(q, _bsr(self), s, w_scale, bias, out_dtype=out_dtype)
        return K.int8_gemm(q, w_q, a_scale=s, w_scale=w_scale, bias=bias, out_dtype=out_dtype)

    def dense_label(self, x, w_q, w_scale, bias=None, x_scale=None):
        return f"dense {_dense_dtype(x, bias)}".replace("torch.", "")

    def dense(self, x, w_q, w_scale, bias=None, x_scale=None):
        dtype = _dense_dtype(x, bias)
        if self._w is None:
            if w_q is None:
                from slimfx.kernels.block_sparse import bsr_to_dense
                w_q = bsr_to_dense(_bsr(self))
            self._w = _dequant(w_q, w_scale).to(dtype)
            self._b = None if bias is None else bias.to(dtype)
        out_dtype = torch.float32 if x.dtype == torch.int8 else x.dtype
        xf = x.to(torch.float32) * x_scale if x.dtype == torch.int8 else x
        return F.linear(xf.to(dtype), self._w, self._b).to(out_dtype)


class LoweredWeightOnly(Lowered):
    """weight_only_linear: int8 per channel -> int8_weight_only_linear; int4 codes per group (G a power of
    two >= 32) -> int4_weight_only_linear over the weight packed two per byte at lowering (TritonProgram
    passes the packed tensor in place of the codes, which stay off the device); other forms -> torch
    reference."""
    op = "weight_only_linear"

    def __init__(self, info, name, w_q: torch.Tensor, group_size: int, has_zp: bool):
        self.form, self._w, self._b = None, None, None
        if not has_zp and group_size == 0 and w_q.dtype == torch.int8:
            self.form, self.kernel_name = "int8", "int8_weight_only_linear"
        elif (not has_zp and group_size >= 32 and group_size & (group_size - 1) == 0 and w_q.dtype == torch.int8
              and w_q.numel() and int(w_q.min()) >= -8 and int(w_q.max()) <= 7):
            self.form, self.kernel_name = "int4", "int4_weight_only_linear"
        else:
            self.kernel_name = "torch reference (no kernel for this weight form)"
        super().__init__(info, name)
        if self.form is None:           # nothing to choose between: no "measured" / "interpreter" suffix
            self.info.kernel = self.kernel_name

    def bucket(self, x, w_q, w_scale=None, w_zero_point=None, bias=None, group_size=0):
        return super().bucket(x) + f"|N{w_q.shape[0]}|{self.form}" + (f"|g{group_size}" if group_size else "")

    def forward(self, *args):
        if self.form is None:
            return sf.weight_only_linear.default(*args)
        return super().forward(*args)

    def kernel(self, x, w_q, w_scale, w_zero_point=None, bias=None, group_size=0):
        from slimfx import kernels as K
        x = x.contiguous()
        if self.form == "int8":
            return K.int8_weight_only_linear(x, w_q, w_scale, bias)
        return K.int4_weight_only_linear(x, w_q, w_scale.contiguous(), group_size, bias)   # w_q: packed

    def dense_label(self, x, *rest):
        return f"dense {x.dtype}".replace("torch.", "")

    def dense(self, x, w_q, w_scale, w_zero_point=None, bias=None, group_size=0):
        if self._w is None:
            if self.form == "int4":
                from slimfx.kernels.weight_only import unpack_int4
                w_q = unpack_int4(w_q)
            self._w = _dequant(w_q, w_scale, group_size, w_zero_point).to(x.dtype)
            self._b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, self._w, self._b)


class LoweredNormQuant(Lowered):
    """norm_quantize_per_token: act_quant.norm_quantize_per_token (one pass over x) vs the torch ops."""
    op, kernel_name, dense_name = "norm_quantize_per_token", "act_quant", "torch"

    def bucket(self, x, weight, bias, eps, norm):
        return super().bucket(x) + f"|{norm}"        # rmsnorm and layernorm are two kernels

    def kernel(self, x, weight, bias, eps, norm):
        from slimfx import kernels as K
        return K.norm_quantize_per_token(x.contiguous(), weight, bias, eps, norm)

    def dense(self, x, weight, bias, eps, norm):
        return sf.norm_quantize_per_token.default(x, weight, bias, eps, norm)


class LoweredFusedLinear(Lowered):
    """fused_linear in torch (cuBLAS GEMM + elementwise epilogue): slimfx has no float Triton GEMM."""
    op, kernel_name = "fused_linear", "torch (no float Triton GEMM: cuBLAS + epilogue)"

    def __init__(self, info, name):
        super().__init__(info, name)
        self.info.kernel = self.kernel_name

    def forward(self, *args):
        return sf.fused_linear.default(*args)


class LoweredSparseLinear(Lowered):
    """sparse_linear: "2:4" -> sparse24_linear over compress_24(w) (fp16/bf16/fp32 weights), "block:BNxBK" ->
    bsr_linear over to_bsr(w) (fp16/bf16), both packed here at lowering; the dense path is the same layer
    through cuBLAS in the model's dtype (fused_linear in torch). The BSR kernel runs bias, relu/silu/
    gelu_tanh and the residual in its epilogue; the rest of an epilogue (2:4's activation and residual,
    erf GELU) runs in torch after the kernel."""
    op = "sparse_linear"
    _BSR_ACT = {"none": None, "relu": "relu", "silu": "silu", "gelu_tanh": "gelu"}

    def __init__(self, info, name, w: torch.Tensor, pattern: str):
        from slimfx import kernels as K
        from slimfx.ir.dialect.sparse import parse_pattern, pattern_violation
        self.block, self.pattern, self.w_dtype = parse_pattern(pattern), pattern, w.dtype
        why = pattern_violation(w, pattern)
        if why is not None:
            raise ValueError(f"triton backend: node {name} (sparse_linear): the weight does not satisfy its "
                             f"pattern {pattern!r}: {why}")
        ok = (K.sparse24.DTYPES if self.block is None else (torch.float16, torch.bfloat16))
        self.form = None if w.dtype not in ok else ("2:4" if self.block is None else "block")
        dtype = str(w.dtype).replace("torch.", "")
        self.kernel_name = {None: f"torch (no {pattern} kernel for {dtype} weights)", "2:4": "sparse24_linear",
                            "block": f"bsr_linear {pattern[6:]}"}[self.form]
        self.dense_name = f"dense {dtype}"
        super().__init__(info, name)
        if self.form is None:
            self.info.kernel = self.kernel_name
        self.density = 0.5                       # 2:4; a block pattern's is what its packing keeps
        self.shape, self._w = tuple(w.shape), None
        if self.form == "2:4":
            values, meta = K.compress_24(w.detach())
            self.register_buffer("values", values)
            self.register_buffer("meta", meta)
        elif self.form == "block":
            self.density = _pack_bsr(self, w, self.block)
        self.drops_weight = self.form is not None      # the packed form holds every nonzero

    def bucket(self, x, w, *rest):       # w may be None (dropped): N from the shape kept at lowering
        return super().bucket(x) + f"|N{self.shape[0]}|{self.pattern}|d{self.density:.2f}"

    def dense_weight(self) -> torch.Tensor:
        """The dense weight, unpacked from the 2:4 values + metadata or the BSR blocks (exactly: the
        packing keeps every nonzero), and kept until no bucket uses the dense path."""
        if self._w is None:
            from slimfx.kernels.block_sparse import bsr_to_dense
            from slimfx.kernels.sparse24 import decompress_24
            w = (decompress_24(self.values, self.meta, self.shape[1]) if self.form == "2:4"
                 else bsr_to_dense(_bsr(self)))
            self._w = w.clone(memory_format=torch.contiguous_format)     # bsr_to_dense: a view of padded blocks
        return self._w

    def forward(self, *args):
        if self.form is None or args[0].dtype != self.w_dtype:
            return self.dense(*args)
        return super().forward(*args)

    def kernel(self, x, w, bias=None, activation="none", residual=None, pattern="2:4"):
        from slimfx import kernels as K
        from slimfx.ir.dialect.fused import activate
        x = x.contiguous()
        if self.form == "block":
            bsr = _bsr(self)
            if activation in self._BSR_ACT and (residual is None or residual.shape == (*x.shape[:-1], bsr.shape[0])):
                return K.bsr_linear(x, bsr, bias, self._BSR_ACT[activation],    # the whole epilogue in the kernel
                                    None if residual is None else residual.contiguous())
            y = K.bsr_linear(x, bsr, bias)
        else:
            y = K.sparse24_linear(x, self.values, self.meta, bias)
        y = activate(y, activation)
        return y if residual is None else y + residual

    def dense(self, x, w, bias=None, activation="none", residual=None, pattern="2:4"):
        return sf.fused_linear.default(x, self.dense_weight() if w is None else w, bias, activation, residual)


class LoweredGroupedWeightOnly(Lowered):
    """A mixture-of-experts grouped GEMM over experts ``Quantize`` stored int8 per output channel
    (``transpose(dequantize(w_q, w_scale))``, maybe cast to the model's dtype) or int4 per group of
    ``group_size`` along K (``transpose(view(dequantize(w_q (E, N, G, group), w_scale (E, N, G, 1))))``):
    int8_grouped_weight_only / int4_grouped_weight_only read the quantized experts the tokens were routed to
    (int4 packed two per byte at lowering: the int8 codes do not reach the device); the dense path is the
    graph as it was (every expert dequantized at each call, then the model's grouped GEMM)."""
    op, dense_name = "grouped_weight_only", "dequantize + grouped GEMM"

    def __init__(self, info, name, gemm, w_dtype: torch.dtype, group_size: int = 0):
        self.group_size = group_size
        self.kernel_name = "int4_grouped_weight_only" if group_size else "int8_grouped_weight_only"
        super().__init__(info, name)
        self.gemm, self.w_dtype = gemm, w_dtype

    def bucket(self, x, w, w_scale, offs):
        e, n = w.shape[:2]
        rows = x.shape[0] // max(e, 1)            # rows per expert on average: decode ~1, prefill many
        form = f"int4g{self.group_size}" if self.group_size else "int8"
        return f"M{C.m_bucket(rows)}|K{x.shape[1]}|N{n}|E{e}|{form}|{str(x.dtype).replace('torch.', '')}"

    def kernel(self, x, w, w_scale, offs):
        from slimfx import kernels as K
        if self.group_size:
            return K.int4_grouped_weight_only(x.contiguous(), w, w_scale, self.group_size, offs)
        return K.int8_grouped_weight_only(x.contiguous(), w, w_scale, offs)

    def dense(self, x, w, w_scale, offs):
        if self.group_size:          # the graph's own dequantize, of the codes unpacked
            from slimfx.kernels.grouped_weight_only import unpack_int4_experts
            codes = unpack_int4_experts(w)
            w = sf.dequantize.default(codes.unflatten(-1, (-1, self.group_size)), w_scale, None).flatten(-2)
        else:
            w = sf.dequantize.default(w, w_scale, None)
        return self.gemm(x, w.to(self.w_dtype).transpose(1, 2), offs)


def quantized_experts(gm: fx.GraphModule, gemm: fx.Node, gemm_ops: set):
    """(w_q get_attr, w_scale get_attr, the dtype the graph casts the dequantized weight to, group size: 0 for
    int8 per output channel) when ``gemm`` (a grouped GEMM) multiplies by experts in one of the forms
    slimfx.passes.quantize_experts writes that a kernel runs (int8 per channel; int4 codes in groups of a
    power of two >= 32), else None. ``gemm_ops``: quantize_experts.grouped_gemm_ops()."""
    from slimfx.passes.quantize_experts import swaps_last_two
    if gemm.op != "call_function" or gemm.target not in gemm_ops or gemm.kwargs or len(gemm.args) != 3:
        return None
    w = gemm.args[1]
    if not (isinstance(w, fx.Node) and swaps_last_two(w)):
        return None
    dq, dtype = w.args[0], torch.float32
    if dq.op == "call_function" and dq.target is torch.ops.aten._to_copy.default and set(dq.kwargs) == {"dtype"}:
        dq, dtype = dq.args[0], dq.kwargs["dtype"]
    grouped = dq.op == "call_function" and dq.target is torch.ops.aten.view.default and len(dq.users) == 1
    if grouped:
        dq = dq.args[0]
    if not (isinstance(dq, fx.Node) and dq.op == "call_function" and dq.target is sf.dequantize.default
            and (len(dq.args) < 3 or dq.args[2] is None) and not dq.kwargs):
        return None
    q, sc = dq.args[:2]
    if not (q.op == "get_attr" and sc.op == "get_attr"):
        return None
    qt, st = ir.meta.tensor_attr(gm, q), ir.meta.tensor_attr(gm, sc)
    if qt.dtype != torch.int8:
        return None
    if not grouped:
        return (q, sc, dtype, 0) if qt.ndim == 3 and tuple(st.shape) == (*qt.shape[:2], 1) else None
    gs = qt.shape[-1] if qt.ndim == 4 else 0
    if (gs < 32 or gs & (gs - 1) or tuple(st.shape) != (*qt.shape[:3], 1)
            or not qt.numel() or int(qt.min()) < -8 or int(qt.max()) > 7):
        return None
    return q, sc, dtype, gs


# --- lowering ----------------------------------------------------------------------------------------

def _device() -> torch.device:
    if C.interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on "
                           "the CPU, slowly); use backend='numpy' or 'torch' here")
    return torch.device("cuda")


def _make(gm: fx.GraphModule, node: fx.Node) -> Lowered:
    info, t = ir.meta.info(node), node.target
    args = _positional(node)[0]           # keyword arguments at their schema positions, defaults between
    if t is sf.quantized_linear.default:
        w = args[1]
        return LoweredQuantizedLinear(info, node.name, ir.meta.tensor_attr(gm, w) if w.op == "get_attr" else None)
    if t is sf.weight_only_linear.default:
        w_q = ir.meta.tensor_attr(gm, args[1]) if args[1].op == "get_attr" else torch.empty(0)
        gs = args[5] if len(args) > 5 else 0
        zp = args[3] if len(args) > 3 else None
        return LoweredWeightOnly(info, node.name, w_q, gs, zp is not None)
    if t is sf.norm_quantize_per_token.default:
        return LoweredNormQuant(info, node.name)
    if t is sf.sparse_linear.default:
        a = torch.fx.operator_schemas.normalize_function(t, node.args, node.kwargs,
                                                         normalize_to_only_use_kwargs=True).kwargs
        if not isinstance(a["w"], fx.Node) or a["w"].op != "get_attr":
            raise ValueError(f"triton backend: node {node.name} (sparse_linear): the weight must be a tensor of "
                             f"the module (a get_attr node), got {a['w']}")
        return LoweredSparseLinear(info, node.name, ir.meta.tensor_attr(gm, a["w"]), a.get("pattern", "2:4"))
    return LoweredFusedLinear(info, node.name)


LOWERED_OPS = (sf.quantized_linear.default, sf.weight_only_linear.default, sf.norm_quantize_per_token.default,
               sf.fused_linear.default, sf.sparse_linear.default)


def _packed_in_place_of(gm, root, graph, user: fx.Node, codes: fx.Node, codes_new: fx.Node, dev) -> None:
    """``user`` (a lowered node of the new graph) reads int4 ``codes`` (a get_attr of ``gm``: int8 (N, K) or
    (E, N, G, group)) packed two per byte from a new attribute instead; the codes' get_attr goes when nothing
    else reads it, so they never reach the device (TritonProgram moves only the attributes left)."""
    from slimfx.kernels import pack_int4, pack_int4_experts
    t = ir.meta.tensor_attr(gm, codes)
    target = f"{codes.target}_packed"
    if not _has_attr(root, target):       # codes read by two lowered nodes are packed once
        _set_attr(root, target, (pack_int4_experts(t.flatten(-2)) if t.ndim == 4 else pack_int4(t)).to(dev))
    with graph.inserting_before(user):
        node = graph.get_attr(target)
    user.args = tuple(node if a is codes_new else a for a in user.args)
    if not codes_new.users:
        graph.erase_node(codes_new)


def _drop_weight(graph: fx.Graph, user: fx.Node) -> None:
    """``user`` (a lowered node whose module holds its weight packed) gets None for its dense weight (its
    second argument); the weight's get_attr goes when nothing else reads it, so it never reaches the device.
    Sparse layers and W8A8 block-sparse ones: their packed form holds every nonzero."""
    w = user.args[1] if len(user.args) > 1 else user.kwargs.get("w", user.kwargs.get("w_q"))
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return
    if len(user.args) > 1:
        user.args = (user.args[0], None, *user.args[2:])
    else:
        user.kwargs = {k: (None if v is w else v) for k, v in user.kwargs.items()}
    if not w.users:
        graph.erase_node(w)


def _has_attr(mod: torch.nn.Module, dotted: str) -> bool:
    for p in dotted.split("."):
        if not hasattr(mod, p):
            return False
        mod = getattr(mod, p)
    return True


def _set_attr(mod: torch.nn.Module, dotted: str, t: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    mod.register_buffer(leaf, t)


OPTIONS = {"cuda_graphs": "capture the program once per input signature (shapes, dtypes, non-tensor "
                          "arguments) and replay it: no per-kernel launch cost, the decode-time bottleneck"}


class TritonProgram:
    """A lowered graph: ``program(args, kwargs)`` runs it on the device (inputs are moved there; outputs
    stay there).

    ``cuda_graphs=True``: the first call with a new input signature runs the program twice on a side stream
    (every per-layer choice, autotuning and compilation happens there), captures it into a CUDA graph
    with static input buffers, and later calls copy the inputs in, replay, and return copies of the
    outputs. Each signature keeps its own graph and memory; a model whose shapes vary a lot (every
    sequence length) pays a capture per length."""

    def __init__(self, gm: fx.GraphModule, cuda_graphs: bool = False):
        self.device = dev = _device()
        if cuda_graphs and dev.type != "cuda":
            raise ValueError("backend_options cuda_graphs=True: CUDA graphs need a CUDA device; the Triton "
                             "interpreter (TRITON_INTERPRET=1) runs without them")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict = {}
        graph = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        graph.output(graph.graph_copy(gm.graph, val_map))
        graph._codegen = gm.graph._codegen
        root = torch.nn.Module()
        from slimfx.passes.quantize_experts import grouped_gemm_ops
        gemm_ops = grouped_gemm_ops()
        attrs = []
        for old, new in val_map.items():
            experts = quantized_experts(gm, old, gemm_ops)
            if experts is not None:
                q, sc, dtype, gs = experts
                name = f"lowered_{old.name}"
                lowered = LoweredGroupedWeightOnly(ir.meta.info(old), old.name, old.target, dtype, gs).to(dev)
                lowered.graphs = cuda_graphs
                root.add_module(name, lowered)
                new.op, new.target = "call_module", name
                chain = new.args[1]
                new.args = (new.args[0], val_map[q], val_map[sc], new.args[2])
                while isinstance(chain, fx.Node) and chain.op == "call_function" and not chain.users:
                    nxt = chain.args[0]           # transpose -> (_to_copy ->) (view ->) dequantize: now unread
                    graph.erase_node(chain)
                    chain = nxt
                if gs:                            # int4 codes packed two per byte in their place
                    _packed_in_place_of(gm, root, graph, new, q, val_map[q], dev)
                continue
            if old.op == "get_attr":
                attrs.append((old.target, new))
            elif old.op == "call_function" and old.target in LOWERED_OPS:
                name = f"lowered_{old.name}"
                new.args, new.kwargs = _positional(new)     # keyword arguments by the op's schema: Lowered* take
                lowered = _make(gm, old).to(dev)            # them by position, as export records calls
                lowered.graphs = cuda_graphs
                root.add_module(name, lowered)
                new.op, new.target = "call_module", name
                if getattr(lowered, "form", None) == "int4":      # the codes packed two per byte in their place
                    codes = _positional(old)[0][1]
                    _packed_in_place_of(gm, root, graph, new, codes, val_map[codes], dev)
                elif lowered.drops_weight:                        # the packed form in its place
                    _drop_weight(graph, new)
            if new.op == "call_function":
                new.args, new.kwargs = _on(new.args, dev), _on(new.kwargs, dev)
        kept, moved = set(graph.nodes), {}
        for target, new in attrs:             # only the tensors the lowered graph still reads go to the device,
            if new in kept:                   # each once (one tensor under two names, tied weights: one copy)
                t = getattr(gm, target).detach()
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
                if key not in moved:
                    moved[key] = t.to(dev)
                _set_attr(root, target, moved[key])
        self.gm = fx.GraphModule(root, graph)

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the tensors the program holds on its device: "weights" (the graph's tensors: weights as
        stored, packed forms, scales, biases, buffers) and "dense_copies" (what dense paths built for
        buckets that chose them: dequantized or unpacked weights). Activations and CUDA-graph pools aside."""
        seen, held = set(), {"weights": 0, "dense_copies": 0}

        def add(kind, t):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                held[kind] += t.untyped_storage().nbytes()
        for t in (*self.gm.parameters(), *self.gm.buffers()):
            add("weights", t)
        for mod in self.gm.modules():
            for name in ("_w", "_b"):
                add("dense_copies", mod.__dict__.get(name))
        return held

    def __call__(self, args: tuple, kwargs: dict, eager: bool = False):
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v
        args, kwargs = pytree.tree_map(move, (tuple(args), dict(kwargs)))
        with torch.no_grad():
            if not self.cuda_graphs or eager:
                return self.gm(*args, **kwargs)
            return self._replay(args, kwargs)

    def _replay(self, args: tuple, kwargs: dict):
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, tuple((tuple(v.shape), v.dtype, v.stride()) if isinstance(v, torch.Tensor)
                           else ("value", v if isinstance(v, (int, float, bool, str, type(None))) else repr(v))
                           for v in flat))
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(flat, spec)
            except RuntimeError as e:    # e.g. an op that synchronizes with the host: run this signature eagerly
                import warnings
                warnings.warn(f"triton backend: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); "
                              f"this input signature runs eagerly")
                self._graphs[key] = None
        if self._graphs[key] is None:
            return self.gm(*args, **kwargs)
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(static_in, flat):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _capture(self, flat: list, spec):
        static_in = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
        args, kwargs = pytree.tree_unflatten(static_in, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up: choices, autotuning, compilation happen here
            for _ in range(2):
                self.gm(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.gm(*args, **kwargs)
        return graph, static_in, static_out


def _on(a, dev):
    """Device literals captured in the graph (arange(..., device=cpu)) pointed at ``dev``."""
    return fx.node.map_aggregate(a, lambda v: dev if isinstance(v, torch.device) else v)
