"""W8A8 GEMM with a fused epilogue.

    acc[m, n] = sum_k a[m, k] * b[n, k]         int8 x int8, exact int32 accumulation
    out       = epilogue(acc)                   see slimfx.kernels._common: per-token x per-channel
                                                dequant scale, bias, activation (relu/silu/gelu-tanh),
                                                residual add, then a bf16/fp16/fp32 store, an int8
                                                requantization with a static per-tensor scale, or
                                                (out_dtype=int32) the raw accumulator.

a (M, K) is the int8 activation (per-token quantized, e.g. by act_quant), b (N, K) the int8 weight in
nn.Linear layout; both are K-major, which is what int8 tensor-core MMA wants. The integer path is exact
on every device; the float epilogue is compiled with fp-contraction off so that, without an activation,
it rounds exactly like the numpy reference (activations use the device's exp, within a few ulp).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.kernels import _common as C
from slimfx.quant.linear import MAX_K
from slimfx.quant.numerics import int_matmul_np

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int32)


def _configs():
    """Decode (M <= 16: one 16-row tile, wide K steps to stream the weight; split K for more programs),
    mid and large tiles."""
    cfg = triton.Config
    small = [cfg({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": sk}, num_warps=4,
                 num_stages=s)
             for bn, bk, s, sk in [(32, 256, 4, 1), (64, 256, 4, 1), (64, 128, 5, 1), (128, 128, 4, 1),
                                   (16, 256, 4, 1), (16, 256, 4, 2), (32, 256, 4, 2), (32, 256, 4, 4),
                                   (64, 256, 4, 4), (32, 128, 4, 8)]]
    mid = [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=4,
               num_stages=4)
           for bm, bn in [(32, 64), (32, 128), (64, 64), (64, 128)]]
    large = [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w,
                 num_stages=s)
             for bm, bn, bk, w, s in [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                      (128, 128, 64, 4, 5)]]
    interp = cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_K": 1}, num_warps=4,
                 num_stages=1)        # the CPU tests split K through int8_gemm(_config=...)
    return C.pick_configs(small + mid + large, interp)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_split_k})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0,
                    "HALVES": C.halves})
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, out_scale_ptr,
                      ws_ptr, sem_ptr, M, N, K, M_BUCKET, stride_am, stride_bn, stride_om, stride_rm,
                      HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      HAS_RES: tl.constexpr, REQUANT: tl.constexpr, RAW_INT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HALVES: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile per program, or with SPLIT_K > 1 one K slice of it: each slice
    writes its int32 partial to the workspace, and the program that finishes the tile last (an acq_rel
    counter per tile) adds the partials in slice order and runs the epilogue. int32 sums are exact, so
    the result does not depend on the split."""
    tile = tl.program_id(0)
    pid_m, pid_n = C.grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)           # K steps of this slice (the last may be short)
    k_first = pid_k * k_steps

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows past M / N wrap around (their results are masked at the store), so the loop needs no M/N masks.
    ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + ram[:, None] * stride_am + (k_first * BLOCK_K + rk)[None, :]
    b_ptrs = b_ptr + rbn[None, :] * stride_bn + (k_first * BLOCK_K + rk)[:, None]   # (BLOCK_K, BLOCK_N) of b^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k_first, k_first + k_steps):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if SPLIT_K == 1:
        C.epilogue_store_halves(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                                res_ptr, stride_rm, out_scale_ptr, HAS_SCALES, HAS_SCALES, HAS_BIAS, ACT, HAS_RES,
                                REQUANT, RAW_INT, HALVES)
    else:
        last, acc = C.split_k_fixup(acc, ws_ptr, sem_ptr, tile, pid_k, tl.num_programs(0), SPLIT_K, BLOCK_M,
                                    BLOCK_N)
        if last:
            C.epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                             res_ptr, stride_rm, out_scale_ptr, HAS_SCALES, HAS_SCALES, HAS_BIAS, ACT,
                             HAS_RES, REQUANT, RAW_INT)


def _tma_configs():
    """Large-M tiles only: the TMA kernel is for compute-bound shapes (the tiled kernel keeps decode).

    Triton (3.6) pipelines Hopper's asynchronous wgmma across K steps only for fp32 accumulators: with
    int32 ones every K step ends waiting for its wgmmas to drain (`warpgroup.wait 0` in the cubin,
    slimfx.kernels.aot), so the tensor cores idle at each step's end. Two kinds of config hide that: a
    longer K step (BLOCK_K = 256: half the drains per tile), and two programs per SM (CTAS = 2, tiles
    whose registers and shared memory fit twice), whose drains fall at different times."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "CTAS": ctas}, num_warps=w, num_stages=s,
                pre_hook=_tma_block_shapes)
            for bm, bn, bk, w, s, ctas in [
                (128, 128, 128, 8, 4, 1), (128, 256, 128, 8, 3, 1), (256, 128, 128, 8, 3, 1), (128, 256, 64, 8, 4, 1),
                (128, 128, 64, 4, 5, 1), (64, 128, 128, 4, 4, 1),
                # 4 stages of the widest tiles fit sm_90's 227 KB (224 KB with a light epilogue, per aot)
                (128, 256, 128, 8, 4, 1), (256, 128, 128, 8, 4, 1), (128, 128, 256, 8, 3, 1),
                # half the wgmma drains per tile
                (128, 256, 256, 8, 2, 1), (256, 128, 256, 8, 2, 1),
                # two programs per SM (one warpgroup each, <= 113 KB of shared memory)
                (64, 128, 128, 4, 4, 2), (128, 128, 128, 4, 3, 2), (64, 256, 128, 4, 2, 2)]]
    interp = cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "CTAS": 1}, num_warps=4, num_stages=1,
                 pre_hook=_tma_block_shapes)
    return C.pick_configs(full, interp)


def _tma_block_shapes(nargs):
    """The descriptors' block shapes follow the config being run (autotuner pre_hook)."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"HALVES": C.halves, "FLATTEN": lambda args: not C.heavy_epilogue(args)})
@triton.jit
def _int8_gemm_tma_kernel(a_desc, b_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, out_scale_ptr,
                          M, N, K, M_BUCKET, stride_om, stride_rm,
                          HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                          HAS_RES: tl.constexpr, REQUANT: tl.constexpr, RAW_INT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, CTAS: tl.constexpr, HALVES: tl.constexpr,
                          FLATTEN: tl.constexpr):
    """Persistent (CTAS programs per SM, each walking tiles in grouped order, tl.num_programs apart) with TMA
    loads (Hopper and newer).
    FLATTEN (light epilogues): the loop over tiles is flattened with the K loop so the next tile's loads
    overlap this tile's epilogue; a heavy epilogue (activation, residual) would spill registers then.
    TMA zero-fills reads past M, N and K, so the int32 accumulation needs no masks and stays exact."""
    start = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    progs = tl.num_programs(0)
    tile_c = start - progs            # the epilogue's own tile counter (as in Triton's persistent tutorial)
    for t in tl.range(start, grid_m * grid_n, progs, flatten=FLATTEN):
        pid_m, pid_n = C.grouped_tile(t, grid_m, grid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_c += progs
        pid_m, pid_n = C.grouped_tile(tile_c, grid_m, grid_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        C.epilogue_store_halves(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                                res_ptr, stride_rm, out_scale_ptr, HAS_SCALES, HAS_SCALES, HAS_BIAS, ACT,
                                HAS_RES, REQUANT, RAW_INT, HALVES)


def check_k(name: str, k: int) -> None:
    """Refuse K > quant.linear.MAX_K (131071) for an int8 x int8 GEMM: |acc| <= K * 128 * 128 must stay below
    2**31, or the int32 accumulator wraps (K = 131072 of -128 * -128 sums to 2**31, stored as -2**31)."""
    if k > MAX_K:
        raise ValueError(f"{name}: K = {k} exceeds {MAX_K}: the exact int32 accumulator of int8 x int8 "
                         f"products (|acc| <= K * 128 * 128 < 2**31) could overflow")


IMPLS = ("auto", "tiled", "tma", "gluon")
TMA_MIN_M = 128   # below this "auto" keeps the tiled kernel (its decode tiles); above, it measures both


def gluon_in_auto() -> bool:
    """SLIMFX_GLUON=1: "auto" also measures the Gluon kernel (sm_90, light epilogues), which it does not by
    default until a GPU run has measured it; C.fastest still takes it only if it agrees bit for bit."""
    return os.environ.get("SLIMFX_GLUON", "0") == "1"


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None = None,
              w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              activation: str | None = None, residual: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, out_scale: torch.Tensor | None = None,
              impl: str = "auto", _config: dict | None = None) -> torch.Tensor:
    """act(a @ b.T * a_scale * w_scale + bias) + residual, as ``out_dtype``.

    a: int8 (..., K), unit stride along K.   b: int8 (N, K), unit stride along K; K <= quant.linear.MAX_K
    (131071: beyond it the exact int32 accumulator could overflow).
    a_scale: fp32, one per token (M values);  w_scale: fp32, one per output channel (N values).
    bias: (N,) float; residual: float, of the output's shape (..., N) exactly (no broadcasting);
    activation: None, "relu", "silu" or "gelu" (tanh form).
    out_dtype: bfloat16/float16/float32; int8 (requantize: out_scale, a one-element fp32 tensor, required);
    int32 (the raw accumulator: no scales, bias, activation or residual allowed).
    impl: "tiled" (one program per output tile, pointer loads; every shape), "tma" (persistent, TMA loads;
    Hopper+, K a multiple of 16), or "auto": tiled below TMA_MIN_M rows; above, whichever of the two
    measures faster for this (M bucket, N, K) on this device (timed once per process, C.fastest; the two
    must agree bit for bit there, or the TMA kernel is not chosen).
    "gluon" (sm_90 only, light epilogues; see int8_gemm_gluon: wgmma kept in flight across K steps, which
    Triton does not do for int32 accumulators) is explicit until a GPU run has measured it (SLIMFX_GLUON=1
    adds it to auto's candidates).
    _config: pin the tiled kernel's config (BLOCK_M/N/K, SPLIT_K, GROUP_M, num_warps, num_stages), or with
    impl="tma" the TMA kernel's (BLOCK_M/N/K, GROUP_M, CTAS, num_warps, num_stages), instead of autotuning:
    for tests (the interpreter has one config), the GPU checks of each config, and experiments.
    Returns (..., N).
    """
    # (1) check
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    C.check_tensor("a", a, dtypes=(torch.int8,))
    C.check_tensor("b", b, dtypes=(torch.int8,), ndim=2, unit_last_stride=True)
    n, k = b.shape
    a2 = C.as_rows("a", a, k)
    m = a2.shape[0]
    check_k("b", k)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
    raw = out_dtype == torch.int32
    if raw and any(x is not None for x in (a_scale, w_scale, bias, activation, residual, out_scale)):
        raise ValueError("out_dtype=int32 returns the raw accumulator: a_scale, w_scale, bias, activation, "
                         "residual and out_scale must all be None")
    if not raw and (a_scale is None or w_scale is None):
        raise ValueError(f"a_scale and w_scale: both required for out_dtype={out_dtype} (use out_dtype=int32 "
                         f"for the raw int32 accumulator)")
    if (out_dtype == torch.int8) != (out_scale is not None):
        raise ValueError("out_scale: required exactly when out_dtype=int8 (static per-tensor requantization)")
    a_scale, w_scale, bias, residual, out_scale = C.check_epilogue(
        m, n, bias=bias, residual=residual, a_scale=a_scale, w_scale=w_scale, out_scale=out_scale,
        activation=activation, out_shape=(*a.shape[:-1], n))
    dev = C.check_device(a=a2, b=b, a_scale=a_scale, w_scale=w_scale, bias=bias, residual=residual,
                         out_scale=out_scale)
    # (2) allocate
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m == 0 or n == 0:
        return out.view(*a.shape[:-1], n)
    refusal = C.tma_refusal(a=a2, b=b) if impl in ("tma", "gluon") or (impl == "auto" and m >= TMA_MIN_M) else None
    if impl == "tma" and refusal:
        raise ValueError(f"impl='tma': {refusal} (use impl='tiled' or 'auto')")
    if impl == "gluon":
        why = _gluon_refusal(dev, activation, residual, out_dtype) or refusal
        if why:
            raise ValueError(f"impl='gluon': {why} (use impl='tiled', 'tma' or 'auto')")
    # (3) launch
    d = C.dummy(dev)
    epi = (a_scale if a_scale is not None else d, w_scale if w_scale is not None else d,
           bias if bias is not None else d, residual if residual is not None else d,
           out_scale if out_scale is not None else d)
    flags = dict(HAS_SCALES=not raw, HAS_BIAS=bias is not None, ACT=activation, HAS_RES=residual is not None,
                 REQUANT=out_dtype == torch.int8, RAW_INT=raw, enable_fp_fusion=False)
    res_stride = residual.stride(0) if residual is not None else 0

    def tiled():
        kernel, meta = _int8_gemm_kernel, {}
        if _config is not None:          # a pinned tile config instead of the autotuner's choice
            kernel, meta = _int8_gemm_kernel.fn, {"GROUP_M": 1, "SPLIT_K": 1, **_config}
        ws, sem = d, d
        if C.m_bucket(m) <= C.SPLIT_K_MAX_M or meta.get("SPLIT_K", 1) > 1:
            ws, sem = C.split_k_room(dev, torch.int32, m, n, meta)
        grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]), mt["SPLIT_K"])
        kernel[grid](a2, b, out, *epi, ws, sem, m, n, k, C.m_bucket(m), a2.stride(0), b.stride(0),
                     out.stride(0), res_stride, **flags, **meta)

    def tma():
        from triton.tools.tensor_descriptor import TensorDescriptor
        sms = C.num_sms(dev)
        a_desc = TensorDescriptor.from_tensor(a2, [16, 16])     # block shapes: set per config (pre_hook)
        b_desc = TensorDescriptor.from_tensor(b, [16, 16])
        kernel, meta = _int8_gemm_tma_kernel, {}
        if _config is not None:          # a pinned config; its block shapes set as the pre_hook would
            kernel, meta = _int8_gemm_tma_kernel.fn, {"GROUP_M": 8, "CTAS": 1, **_config}
            _tma_block_shapes({"a_desc": a_desc, "b_desc": b_desc, **meta})
        grid = lambda mt: (min(sms * mt["CTAS"], triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"])),)
        kernel[grid](a_desc, b_desc, out, *epi, m, n, k, C.m_bucket(m), out.stride(0), res_stride, **flags, **meta)

    def gluon():
        from slimfx.kernels import int8_gemm_gluon as G
        cfg = None if _config is None else [_config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages",
                                                                  "num_warps")]
        G.launch(a2, b, out, a_scale, w_scale, bias, raw, cfg)

    if _config is not None and impl == "auto":
        impl = "tiled"
    if impl == "auto":
        impl = "tiled"
        if refusal is None and m >= TMA_MIN_M:
            cands = {"tiled": tiled, "tma": tma}
            if gluon_in_auto() and _gluon_refusal(dev, activation, residual, out_dtype) is None:
                cands["gluon"] = gluon
            impl = C.fastest("int8_gemm", (C.m_bucket(m), n, k, str(dev), tuple(cands)), cands, "tiled", output=out)
    {"tma": tma, "gluon": gluon}.get(impl, tiled)()
    return out.view(*a.shape[:-1], n)


def _gluon_refusal(dev, activation, residual, out_dtype) -> str | None:
    """Why impl="gluon" cannot run this call (None when it can)."""
    if C.interpreting() or dev.type != "cuda":
        return "Gluon kernels run on a CUDA device only (not under TRITON_INTERPRET)"
    if torch.cuda.get_device_capability(dev)[0] != 9:
        return f"the kernel is written for Hopper's wgmma (sm_90), got {torch.cuda.get_device_capability(dev)}"
    if activation is not None or residual is not None or out_dtype == torch.int8:
        return "light epilogues only (scales, bias, float or int32 out): no activation, residual or requantization"
    return None


def int8_gemm_ref(a, b, a_scale=None, w_scale=None, bias=None, activation=None, residual=None,
                  out_dtype=torch.bfloat16, out_scale=None) -> np.ndarray:
    """numpy reference of ``int8_gemm``: exact int32 accumulator, then the fp32 epilogue.

    Returns int32 (out_dtype=int32), int8 (out_dtype=int8) or fp32 before the final cast (the caller
    compares a bf16/fp16 kernel output against it with that dtype's tolerance).
    """
    k = b.shape[1]
    acc = int_matmul_np(a.reshape(-1, k).cpu().numpy(), b.cpu().numpy())
    if out_dtype == torch.int32:
        return acc.reshape(*a.shape[:-1], acc.shape[-1])
    y = C.epilogue_np(acc, a_scale=a_scale, w_scale=w_scale, bias=bias, activation=activation,
                      residual=None if residual is None else residual.reshape(acc.shape),
                      out_scale=out_scale)
    return y.reshape(*a.shape[:-1], y.shape[-1])
