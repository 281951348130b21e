"""2:4 semi-structured sparse linear: y = x @ W.T + bias, W stored compressed and decompressed in-kernel.

W (N, K) has at most 2 nonzeros in every group of 4 consecutive elements along K. Compressed format
(``compress_24``):
    values (N, K/2)          the 2 kept values of each group, in column order (W's dtype)
    meta   (N, ceil(K/8)) uint8   per group a nibble i0 | i1 << 2 with i0 < i1 the kept columns (0..3);
                             group 2j in the low nibble of byte j, group 2j+1 in the high nibble.
A group with fewer than 2 nonzeros keeps zeros at its lowest free positions. K must be a multiple of 4.

The kernel reads values + meta (K/2 elements + K/8 bytes per row: 56% of bf16 W's bytes), rebuilds the
dense (BLOCK_N, BLOCK_K) tile in registers and runs a dense tl.dot. Why this design:

* The win is bytes, so it is at small M (decode), where a linear layer is bound by reading W.
* Triton exposes no sparse tensor-core MMA (mma.sp): there is no public tl.dot for 2:4 operands, so
  in-kernel the 2:4 tile becomes a dense tile and the math is dense. At large M, where GEMM is compute
  bound, this kernel cannot beat dense; that regime belongs to block sparsity (block_sparse: whole
  zero blocks are skipped, so the FLOPs shrink with the density) or to cuSPARSELt
  (torch.sparse.to_sparse_semi_structured), which does use the sparse tensor cores.

Measured on an H200 (bench/results/kernels-nvidia-h200-cudagraph.md, CUDA-graph timing, vs cuBLAS bf16):
this kernel 0.16x at M=1 and 16 and 0.08x at M=2048 (4096 x 4096): rebuilding the tile in registers
costs far more than the bytes it saves, so as written it does not deliver the decode win either.
torch's 2:4 (cuSPARSELt) 0.20x at decode, 1.38x at M=2048, 1.55x at 8192^3. Block sparsity at 90%
(int8 BSR) 2.0x at M=1, 5.9x at M=2048. Until this kernel is reworked, block sparsity is the path for
sparse speedups; the triton backend only picks a kernel that measures faster than dense.
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


def _configs():
    """Decode shapes: BLOCK_M = 16, N split finely (a 4096-row W at BLOCK_N = 32 is 128 programs)."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=s)
            for bn, bk, s in [(32, 128, 4), (32, 256, 3), (64, 128, 4), (16, 256, 4)]]
    full += [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=3)
             for bm, bn, w in [(64, 64, 4), (128, 128, 8)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, bias_ptr, M, N, K, M_BUCKET,
                     stride_xm, stride_vn, stride_mn, stride_om,
                     HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 4                      # 2:4 groups per K step
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, G)
    pos = tl.arange(0, 4)
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm
    v_rows = v_ptr + (rn % N)[:, None] * stride_vn
    m_rows = meta_ptr + (rn % N)[:, None] * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        g = kb * G + rg                                 # global group index
        gmask = (g < K // 4)[None, :]
        v0 = tl.load(v_rows + 2 * g[None, :], mask=gmask, other=0.0)          # (BLOCK_N, G)
        v1 = tl.load(v_rows + 2 * g[None, :] + 1, mask=gmask, other=0.0)
        byte = tl.load(m_rows + (g // 2)[None, :], mask=gmask, other=0).to(tl.int32)
        nib = (byte >> ((g % 2) * 4)[None, :]) & 15
        i0 = (nib & 3)[:, :, None]
        i1 = (nib >> 2)[:, :, None]
        p = pos[None, None, :]
        w = tl.where(p == i0, v0[:, :, None], tl.where(p == i1, v1[:, :, None], 0.0))   # (BLOCK_N, G, 4)
        w = tl.reshape(w.to(v0.dtype), (BLOCK_N, BLOCK_K))
        k = kb * BLOCK_K + rk
        x = tl.load(x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        acc = C.fdot(x, tl.trans(w), acc, DOT)
    C.epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, bias_ptr, bias_ptr, bias_ptr, 0,
                     bias_ptr, False, False, HAS_BIAS, None, False, False, False)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T + bias with W given as compress_24's (values (N, K/2), meta (N, ceil(K/8)));
    x and values share one dtype (fp16/bf16/fp32); y has that dtype."""
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
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    if m and n:
        grid = lambda mt: (triton.cdiv(n, mt["BLOCK_N"]), triton.cdiv(m, mt["BLOCK_M"]))
        _sparse24_kernel[grid](x2, values, meta, out, bias if bias is not None else C.dummy(dev), m, n, k,
                               C.m_bucket(m), x2.stride(0), values.stride(0), meta.stride(0), out.stride(0),
                               HAS_BIAS=bias is not None, DOT=C.dot_mode(x.dtype))
    return out.view(*x.shape[:-1], n)


def sparse24_linear_ref(x, values, meta, bias=None) -> np.ndarray:
    """float64 x @ decompress_24(values, meta).T (+ bias), as fp32."""
    k = 2 * values.shape[1]
    w = decompress_24(values.cpu(), meta.cpu(), k).float().numpy().astype(np.float64)
    y = C.np32(x).reshape(-1, k).astype(np.float64) @ w.T
    if bias is not None:
        y = y + C.np32(bias)[None]
    return y.astype(np.float32).reshape(*x.shape[:-1], -1)
