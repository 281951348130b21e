"""2:4 semi-structured sparse linear: y = x @ W.T + bias, W stored compressed and decompressed in-kernel.

W (N, K) has at most 2 nonzeros in every group of 4 consecutive elements along K. Compressed format
(``compress_24``):
    values (N, K/2)          the 2 kept values of each group, in column order (W's dtype)
    meta   (N, ceil(K/8)) uint8   per group a nibble i0 | i1 << 2 with i0 < i1 the kept columns (0..3);
                             group 2j in the low nibble of byte j, group 2j+1 in the high nibble.
A group with fewer than 2 nonzeros keeps zeros at its lowest free positions. K must be a multiple of 4.

Two kernels read values + meta (K/2 elements + K/8 bytes per row: 56% of bf16 W's bytes):

* gemv (M <= 4, decode): walks the compressed values with contiguous loads, gathers the x element each
  one multiplies (its column comes from the meta nibble), and accumulates in fp32 on CUDA cores. The work
  per weight byte is a few instructions, so it can run at the speed of reading 56% of the bytes.
* dot (larger M): rebuilds the dense (BLOCK_K, BLOCK_N) tile of W^T with one masked load per element
  (values[n, 2*(k//4) + slot] where k is a kept column, else 0; the loads hit L1) and runs a dense tl.dot.

Why this design: Triton exposes no sparse tensor-core MMA (mma.sp), so in-kernel a 2:4 tile becomes a
dense tile and the math is dense; the win is bytes, at small M where a layer is bound by reading W. At
large M, where GEMM is compute bound, no such kernel can beat dense: that regime belongs to block sparsity
(block_sparse: whole zero blocks are skipped, so the FLOPs shrink with the density) or to cuSPARSELt
(torch.sparse.to_sparse_semi_structured), which does use the sparse tensor cores.

Measured on an H200 (bench/results/kernels-nvidia-h200-cudagraph.md, CUDA-graph timing, vs cuBLAS bf16),
for the first version of this kernel (which rebuilt the tile through a 3-D select, a reshape and a
transpose, and had no gemv): 0.16x at M=1 and 16, 0.08x at M=2048 (4096 x 4096). torch's 2:4
(cuSPARSELt): 0.20x at decode, 1.38x at M=2048, 1.55x at 8192^3. Block sparsity at 90% (int8 BSR): 2.0x at
M=1, 5.9x at M=2048. The two kernels above replace it and are not measured on a GPU yet
(`python bench/kernels.py --only sparse24` measures them); the triton backend only ever picks a kernel that
measures faster than dense.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.kernels import _common as C

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense W (N, K) satisfying 2:4 along K -> (values (N, K/2), meta uint8 (N, ceil(K/8))). Refuses
    (ValueError naming the first offending row and group) any group with more than 2 nonzeros."""
    C.check_tensor("w", w, dtypes=DTYPES, ndim=2)
    n, k = w.shape
    if k % 4:
        raise ValueError(f"w: K = {k} is not a multiple of 4 (2:4 groups run along K)")
    g = w.reshape(n, k // 4, 4)
    nz = g != 0
    bad = nz.sum(-1) > 2
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"w: not 2:4 sparse: row {r}, group {c} (columns {4 * c}..{4 * c + 3}) has "
                         f"{int(nz[r, c].sum())} nonzeros: {g[r, c].tolist()}")
    pos = torch.arange(4, device=w.device)
    key = (~nz).to(torch.int64) * 4 + pos                              # nonzeros first, then low positions
    idx = key.argsort(dim=-1)[..., :2].sort(dim=-1).values             # (n, k/4, 2), i0 < i1
    values = torch.gather(g, -1, idx).reshape(n, k // 2).contiguous()
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int32)           # (n, k/4)
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of compress_24 (for references and tests)."""
    n = values.shape[0]
    m = meta.to(torch.int32)
    nib = torch.stack([m & 15, m >> 4], dim=-1).reshape(n, -1)[:, : k // 4]
    idx = torch.stack([nib & 3, nib >> 2], dim=-1).long()               # (n, k/4, 2)
    dense = torch.zeros((n, k // 4, 4), dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


GEMV_MAX_M = 4   # M up to this runs the GEMV kernel (walks the compressed values, gathers x)
IMPLS = ("auto", "gemv", "dot")


def _configs():
    """Decode shapes: BLOCK_M = 16, N split finely (a 4096-row W at BLOCK_N = 32 is 128 programs)."""
    cfg = triton.Config
    # Rebuilding the tile costs registers per element (a pointer and a meta byte each): configs whose sm_90
    # cubin spilled (BLOCK_N x BLOCK_K >= 8192 at 4 warps, 128x128x128, 128x256x64; see slimfx.kernels.aot)
    # are left out.
    full = [cfg({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(32, 128, 4, 4), (16, 256, 4, 4), (64, 64, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3)]]
    full += [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
             for bm, bn, bk, w in [(64, 64, 64, 4), (128, 128, 64, 8), (128, 64, 64, 4)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


def _gemv_configs():
    """(BLOCK_N rows, BLOCK_KH compressed values per step, warps)."""
    cfg = triton.Config
    full = [cfg({"BLOCK_N": bn, "BLOCK_KH": bk, "STAGES": s}, num_warps=w)
            for bn, bk, w, s in [(2, 1024, 4, 2), (4, 512, 4, 2), (8, 256, 4, 2), (16, 128, 4, 2), (4, 1024, 8, 2),
                                 (8, 512, 8, 2), (16, 256, 8, 2), (8, 256, 4, 3)]]
    return C.pick_configs(full, cfg({"BLOCK_N": 8, "BLOCK_KH": 16, "STAGES": 1}, num_warps=4))


def _prune_gemv(configs, named_args, **kwargs):
    """Keep the fp32 accumulator (BLOCK_M x BLOCK_N x BLOCK_KH) within ~64 registers a thread."""
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    keep = [c for c in configs if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_KH"] <= 64 * 32 * c.num_warps]
    return keep or configs[:1]


@triton.jit
def _kept_column(meta_row_ptrs, j, ok):
    """Dense column of compressed value j (any shape): group j // 2, slot j % 2; the slot's 2-bit index
    sits at bit 2 * (j % 4) of meta byte j // 4 (group g's nibble is at 4 * (g % 2), slot s at 2 * s)."""
    byte = tl.load(meta_row_ptrs + j // 4, mask=ok, other=0).to(tl.int32)
    return 4 * (j // 2) + ((byte >> (2 * (j % 4))) & 3)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, bias_ptr, M, N, K, M_BUCKET,
                     stride_xm, stride_vn, stride_mn, stride_om,
                     HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-core path: each element k of the (BLOCK_K, BLOCK_N) tile of W^T is one masked load: from
    values[n, 2 * (k // 4) + slot] when k is one of its group's two kept columns (slot 0 for the lower,
    1 for the higher), else 0. No reshape or transpose of the tile; the loads hit L1 (a row's values
    and meta for one K step are 1.1 x BLOCK_K bytes)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm
    v_cols = v_ptr + (rn % N)[None, :] * stride_vn                       # (1, BLOCK_N)
    m_cols = meta_ptr + (rn % N)[None, :] * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        k_ok = (k < K)[:, None]
        byte = tl.load(m_cols + (k // 8)[:, None], mask=k_ok, other=0).to(tl.int32)     # (BLOCK_K, BLOCK_N)
        nib = byte >> (4 * ((k // 4) % 2))[:, None]
        p = (k % 4)[:, None]
        lo = p == (nib & 3)
        hi = p == ((nib >> 2) & 3)
        src = v_cols + (2 * (k // 4))[:, None] + hi.to(tl.int32)
        w = tl.load(src, mask=k_ok & (lo | hi), other=0.0)
        x = tl.load(x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        acc = C.fdot(x, w, acc, DOT)
    C.epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, bias_ptr, bias_ptr, bias_ptr, 0,
                     bias_ptr, False, False, HAS_BIAS, None, False, False, False)


@triton.autotune(configs=_gemv_configs(), key=["BLOCK_M", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, bias_ptr, M, N, K,
                          stride_xm, stride_vn, stride_mn, stride_om, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr,
                          STAGES: tl.constexpr):
    """Decode path: walk the compressed values (contiguous loads of K/2 per row), gather the x column each
    one multiplies, accumulate the (BLOCK_M, BLOCK_N, BLOCK_KH) products in fp32 and sum once at the end.
    tl.range(num_stages=STAGES) pipelines the loads (the launch option only does so for tl.dot operands)."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_KH)
    KH = K // 2
    x_rows = x_ptr + (rm % M)[:, None, None] * stride_xm                  # (BLOCK_M, 1, 1)
    v_rows = v_ptr + (rn % N)[None, :, None] * stride_vn                  # (1, BLOCK_N, 1)
    m_rows = meta_ptr + (rn % N)[None, :, None] * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KH), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(KH, BLOCK_KH), num_stages=STAGES):
        j = (kb * BLOCK_KH + rj)[None, None, :]
        ok = j < KH
        v = tl.load(v_rows + j, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_rows + _kept_column(m_rows, j, ok), mask=ok, other=0.0).to(tl.float32)
        acc += x * v
    C.epilogue_store(tl.sum(acc, axis=2), rm, rn, M, N, out_ptr, stride_om, bias_ptr, bias_ptr, bias_ptr,
                     bias_ptr, 0, bias_ptr, False, False, HAS_BIAS, None, False, False, False)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """x (..., K) @ W.T + bias with W given as compress_24's (values (N, K/2), meta (N, ceil(K/8)));
    x and values share one dtype (fp16/bf16/fp32); y has that dtype.

    impl: "gemv" (M <= GEMV_MAX_M), "dot" (tensor cores on the rebuilt dense tile), or "auto": dot above
    GEMV_MAX_M rows; up to it, whichever measures faster here (C.fastest; the interpreter takes gemv)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    C.check_tensor("x", x, dtypes=DTYPES)
    C.check_tensor("values", values, dtypes=(x.dtype,), ndim=2, unit_last_stride=True)
    n, k = values.shape[0], 2 * values.shape[1]
    C.check_tensor("meta", meta, dtypes=(torch.uint8,), shape=(n, triton.cdiv(k, 8)), unit_last_stride=True)
    if k % 4:
        raise ValueError(f"values: expected K/2 columns with K a multiple of 4, got {values.shape[1]}")
    x2 = C.as_rows("x", x, k)
    if bias is not None:
        C.check_tensor("bias", bias, dtypes=C.FLOAT_DTYPES, shape=(n,), contiguous=True)
    dev = C.check_device(x=x2, values=values, meta=meta, bias=bias)
    m = x2.shape[0]
    if impl == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"impl='gemv': runs M <= {GEMV_MAX_M} rows, got M = {m} (use 'dot' or 'auto')")
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    b = bias if bias is not None else C.dummy(dev)
    strides = (x2.stride(0), values.stride(0), meta.stride(0), out.stride(0))

    def gemv():
        _sparse24_gemv_kernel[lambda mt: (triton.cdiv(n, mt["BLOCK_N"]),)](
            x2, values, meta, out, b, m, n, k, *strides, HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m))

    def dot():
        grid = lambda mt: (triton.cdiv(n, mt["BLOCK_N"]), triton.cdiv(m, mt["BLOCK_M"]))
        _sparse24_kernel[grid](x2, values, meta, out, b, m, n, k, C.m_bucket(m), *strides,
                               HAS_BIAS=bias is not None, DOT=C.dot_mode(x.dtype))

    if impl == "auto":
        impl = "dot" if m > GEMV_MAX_M else C.fastest(
            "sparse24", (triton.next_power_of_2(m), n, k, str(x.dtype), str(dev)), {"gemv": gemv, "dot": dot}, "gemv")
    (gemv if impl == "gemv" else dot)()
    return out.view(*x.shape[:-1], n)


def sparse24_linear_ref(x, values, meta, bias=None) -> np.ndarray:
    """float64 x @ decompress_24(values, meta).T (+ bias), as fp32."""
    k = 2 * values.shape[1]
    w = decompress_24(values.cpu(), meta.cpu(), k).float().numpy().astype(np.float64)
    y = C.np32(x).reshape(-1, k).astype(np.float64) @ w.T
    if bias is not None:
        y = y + C.np32(bias)[None]
    return y.astype(np.float32).reshape(*x.shape[:-1], -1)
