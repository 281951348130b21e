"""Weight-only int8 grouped GEMM: a mixture-of-experts layer whose expert weights stay int8 in memory and are
dequantized in the kernel, tile by tile, only for the experts tokens were routed to.

    y[r, n] = (sum_k x[r, k] * w[e, n, k]) * scale[e, n]     for offs[e-1] <= r < offs[e]  (offs[-1] = 0)
    y[r, n] = 0                                              for r >= offs[E-1]

x (S, K) fp16/bf16/fp32, its rows sorted by expert; w (E, N, K) int8 (each expert's (out, in) weight, as
``Quantize`` stores experts); scale (E, N) fp32; offs (E,) int32/int64, the cumulative token count per expert
(transformers' ``grouped_mm`` convention). y has x's dtype. Integer weights convert exactly to x's dtype,
products accumulate in fp32 (fp32 x: the IEEE dot, not TF32), and the scale multiplies the fp32 sum, as in
``weight_only.int8_weight_only_linear``.

Without the kernel, the graph dequantizes every expert's weight at every call and multiplies expert by
expert (a host sync to read offs): the whole (E, N, K) tensor is written and read again in bf16 for a
decode step that needs two experts. Here each program is one (row tile, N tile) of one expert: row tiles
are numbered expert after expert, and a program finds its expert by walking offs (E loads of a small
array), so the launch needs no host sync; the grid has the upper bound cdiv(S, BLOCK_M) + E row tiles and
programs past the last tile return at once. offs must be non-decreasing (as routing produces it); rows
past min(offs[E-1], S) are zero.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.kernels import _common as C


def _configs():
    """Decode (a few rows per expert) takes 16-row tiles, prefill the usual GEMM tiles. Every config compiles
    for sm_90 without spilling (slimfx.kernels.aot; 16 x 128 x 128 with 4 warps spilled 2 KB, 16 x 64 x 256 and
    64 x 128 x 64 with 4 warps spilled too: the int8 -> bf16 weight tile lives in registers)."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3),
                                 (128, 128, 8, 3)]]
    full += [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in [(32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 8, 4),
                                      (128, 128, 64, 8, 3)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "E"], prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _grouped_wo_int8_kernel(x_ptr, w_ptr, s_ptr, offs_ptr, out_ptr, S, N, K, E, M_BUCKET,
                            stride_xm, stride_we, stride_wn, stride_se, stride_om,
                            DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    # which expert's row tile this program is: walk the experts, counting their row tiles
    expert = -1
    row0 = 0
    row_end = 0
    first = 0
    lo = 0
    for e in range(0, E):
        hi = tl.minimum(tl.load(offs_ptr + e).to(tl.int32), S)
        hi = tl.maximum(hi, lo)
        tiles = tl.cdiv(hi - lo, BLOCK_M)
        hit = (pid_t >= first) & (pid_t < first + tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, lo + (pid_t - first) * BLOCK_M, row0)
        row_end = tl.where(hit, hi, row_end)
        first += tiles
        lo = hi
    if expert >= 0:
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < row_end          # rm >= row0 >= this expert's first row
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + (rn % N)[None, :] * stride_wn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & (rk[None, :] < k_left), other=0.0)
            # exact: int8 -> fp32 -> x's dtype (as in weight_only's tensor-core kernel)
            w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0).to(tl.float32).to(x.dtype)
            acc = C.fdot(x, w, acc, DOT)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        scale_ptr = s_ptr + expert * stride_se
        C.epilogue_store(acc, rm, rn, row_end, N, out_ptr, stride_om, scale_ptr, scale_ptr, scale_ptr, scale_ptr,
                         0, scale_ptr, False, True, False, None, False, False, False)


def int8_grouped_weight_only(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                             offs: torch.Tensor) -> torch.Tensor:
    """y (S, N) with each expert's rows x[offs[e-1]:offs[e]] @ (w[e] * w_scale[e, :, None]).T (module
    docstring): x (S, K) float, w (E, N, K) int8, w_scale (E, N) or (E, N, 1) fp32, offs (E,) int32/int64."""
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES, ndim=2, unit_last_stride=True)
    C.check_tensor("w", w, dtypes=(torch.int8,), ndim=3, unit_last_stride=True)
    e, n, k = w.shape
    if x.shape[1] != k:
        raise ValueError(f"x: expected (S, {k}) (K of the experts' weight (E, N, K) = {tuple(w.shape)}), "
                         f"got {tuple(x.shape)}")
    C.check_tensor("w_scale", w_scale, dtypes=(torch.float32,))
    if w_scale.numel() != e * n or w_scale.shape[:2] != (e, n):
        raise ValueError(f"w_scale: expected one fp32 scale per expert and output channel, shape ({e}, {n}) or "
                         f"({e}, {n}, 1), got {tuple(w_scale.shape)}")
    w_scale = w_scale.reshape(e, n)
    C.check_tensor("offs", offs, dtypes=(torch.int32, torch.int64), shape=(e,), contiguous=True)
    dev = C.check_device(x=x, w=w, w_scale=w_scale, offs=offs)
    s = x.shape[0]
    out = torch.zeros((s, n), dtype=x.dtype, device=dev)
    if s == 0 or n == 0 or e == 0:
        return out
    w_scale = w_scale.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(s, meta["BLOCK_M"]) + e)
    _grouped_wo_int8_kernel[grid](x, w, w_scale, offs, out, s, n, k, e, C.m_bucket(max(1, s // e)),
                                  x.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), out.stride(0),
                                  DOT=C.dot_mode(x.dtype))
    return out


def int8_grouped_weight_only_ref(x, w, w_scale, offs) -> np.ndarray:
    """float64 per expert (exact products of the integer weights up to fp64 rounding), the fp32 scale, then
    x's dtype via fp32."""
    xs = C.np32(x).astype(np.float64)
    wq = w.cpu().numpy().astype(np.float64)
    sc = C.np32(w_scale).reshape(wq.shape[0], wq.shape[1])
    ends = np.minimum(offs.cpu().numpy().astype(np.int64), xs.shape[0])
    y = np.zeros((xs.shape[0], wq.shape[1]), dtype=np.float32)
    lo = 0
    for e, hi in enumerate(ends):
        hi = max(int(hi), lo)
        y[lo:hi] = (xs[lo:hi] @ wq[e].T).astype(np.float32) * sc[e][None, :]
        lo = hi
    return y
