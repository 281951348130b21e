"""Weight-only grouped GEMMs: a mixture-of-experts layer whose expert weights stay int8 (or packed int4) in
memory and are dequantized in the kernel, tile by tile, only for the experts tokens were routed to.

    int8: y[r, n] = (sum_k x[r, k] * w[e, n, k]) * scale[e, n]                   for offs[e-1] <= r < offs[e]
    int4: y[r, n] = sum_g (sum_{k in group g} x[r, k] * w[e, n, k]) * scale[e, n, g]     (offs[-1] = 0)
          y[r, n] = 0                                                             for r >= offs[E-1]

x (S, K) fp16/bf16/fp32, its rows sorted by expert; w (E, N, K) int8 (each expert's (out, in) weight, as
``Quantize`` stores experts); scale (E, N) fp32; offs (E,) int32/int64, the cumulative token count per expert
(transformers' ``grouped_mm`` convention). y has x's dtype. Integer weights convert exactly to x's dtype,
products accumulate in fp32 (fp32 x: the IEEE dot, not TF32), and the scale multiplies the fp32 sum, as in
``weight_only.int8_weight_only_linear``. int4: w (E, N, K/2) uint8, two signed nibbles per byte in
``weight_only.pack_int4``'s format (low nibble = even k), scale (E, N, K/group_size) fp32, each group's
partial sum scaled as it completes, as in ``weight_only.int4_weight_only_linear``.

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


def _int4_configs():
    """BLOCK_K is the group size (a constexpr argument), so only the M x N tile is tuned: the dense int4
    kernel's tiles (weight_only._int4_configs), 16-row tiles for decode."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": 16, "BLOCK_N": bn}, num_warps=4, num_stages=s) for bn, s in [(32, 4), (64, 3), (128, 3)]]
    full += [cfg({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=3)
             for bm, bn, w in [(32, 64, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1))


@triton.jit
def _expert_tile(offs_ptr, S, E, pid_t, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of row tile ``pid_t``, row tiles numbered expert after expert; expert -1
    past the last tile. Walks the E offsets (a few loads of a small array): no host sync, no schedule built."""
    expert = -1
    row0 = 0
    row_end = 0
    first = 0
    lo = 0
    for e in range(0, E):
        hi = tl.minimum(tl.load(offs_ptr + e), S).to(tl.int32)     # clamped before narrowing: int64 offsets
        hi = tl.maximum(hi, lo)
        tiles = tl.cdiv(hi - lo, BLOCK_M)
        hit = (pid_t >= first) & (pid_t < first + tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, lo + (pid_t - first) * BLOCK_M, row0)
        row_end = tl.where(hit, hi, row_end)
        first += tiles
        lo = hi
    return expert, row0, row_end


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "E"], prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _grouped_wo_int8_kernel(x_ptr, w_ptr, s_ptr, offs_ptr, out_ptr, S, N, K, E, M_BUCKET,
                            stride_xm, stride_we, stride_wn, stride_se, stride_om,
                            DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    expert, row0, row_end = _expert_tile(offs_ptr, S, E, tl.program_id(1), BLOCK_M)
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


@triton.autotune(configs=_int4_configs(), key=["M_BUCKET", "N", "K", "E", "GROUP"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _grouped_wo_int4_kernel(x_ptr, p_ptr, s_ptr, offs_ptr, out_ptr, S, N, K, E, M_BUCKET,
                            stride_xm, stride_pe, stride_pn, stride_se, stride_sn, stride_om,
                            DOT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    expert, row0, row_end = _expert_tile(offs_ptr, S, E, tl.program_id(1), BLOCK_M)
    if expert >= 0:
        HALF: tl.constexpr = GROUP // 2
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, HALF)
        m_ok = rm < row_end
        # as weight_only._wo_int4_kernel: x loaded contiguously, a group at a time (C.int4_group_dot)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]
        p_ptrs = p_ptr + expert.to(tl.int64) * stride_pe + (rn % N)[None, :] * stride_pn + rj[:, None]
        s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + (rn % N) * stride_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, K // GROUP):
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc = C.int4_group_dot(acc, x, tl.load(p_ptrs), s_ptrs, DOT)
            x_ptrs += GROUP
            p_ptrs += HALF
            s_ptrs += 1
        C.epilogue_store(acc, rm, rn, row_end, N, out_ptr, stride_om, s_ptr, s_ptr, s_ptr, s_ptr, 0, s_ptr,
                         False, False, False, None, False, False, False)


def _check_x(x, k, what):
    if x.shape[1] != k:
        raise ValueError(f"x: expected (S, {k}) (K of {what}), got {tuple(x.shape)}")


def int8_grouped_weight_only(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                             offs: torch.Tensor) -> torch.Tensor:
    """y (S, N) with each expert's rows x[offs[e-1]:offs[e]] @ (w[e] * w_scale[e, :, None]).T (module
    docstring): x (S, K) float, w (E, N, K) int8, w_scale (E, N) or (E, N, 1) fp32, offs (E,) int32/int64."""
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES, ndim=2, unit_last_stride=True)
    C.check_tensor("w", w, dtypes=(torch.int8,), ndim=3, unit_last_stride=True)
    e, n, k = w.shape
    _check_x(x, k, f"the experts' weight (E, N, K) = {tuple(w.shape)}")
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


def int4_grouped_weight_only(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                             offs: torch.Tensor) -> torch.Tensor:
    """y (S, N) with each expert's rows x[offs[e-1]:offs[e]] times its int4 weight, dequantized per group
    (module docstring): x (S, K) float, w_packed (E, N, K/2) uint8 (``pack_int4`` of each expert's (N, K)
    codes), scales (E, N, K/group_size) or (E, N, K/group_size, 1) fp32, group_size a power of two >= 32,
    offs (E,) int32/int64."""
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES, ndim=2, unit_last_stride=True)
    C.check_tensor("w_packed", w_packed, dtypes=(torch.uint8,), ndim=3, unit_last_stride=True)
    if not C.is_int(group_size) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size: expected a power of two >= 32 (two 16-deep dots per group), "
                         f"got {group_size!r}")
    group_size = int(group_size)     # a numpy integer is no tl.constexpr
    e, n, k = w_packed.shape[0], w_packed.shape[1], 2 * w_packed.shape[2]
    if k % group_size:
        raise ValueError(f"w_packed: K = {k} (2 x {w_packed.shape[2]} bytes) is not a multiple of "
                         f"group_size {group_size}")
    _check_x(x, k, f"the experts' packed int4 weight (E, N, K/2) = {tuple(w_packed.shape)}")
    C.check_tensor("scales", scales, dtypes=(torch.float32,))
    g = k // group_size
    if scales.numel() != e * n * g or scales.shape[:3] != (e, n, g):
        raise ValueError(f"scales: expected one fp32 scale per expert, output channel and group of {group_size}, "
                         f"shape ({e}, {n}, {g}) or ({e}, {n}, {g}, 1), got {tuple(scales.shape)}")
    scales = scales.reshape(e, n, g).contiguous()
    C.check_tensor("offs", offs, dtypes=(torch.int32, torch.int64), shape=(e,), contiguous=True)
    dev = C.check_device(x=x, w_packed=w_packed, scales=scales, offs=offs)
    s = x.shape[0]
    out = torch.zeros((s, n), dtype=x.dtype, device=dev)
    if s == 0 or n == 0 or e == 0 or k == 0:
        return out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(s, meta["BLOCK_M"]) + e)
    _grouped_wo_int4_kernel[grid](x, w_packed, scales, offs, out, s, n, k, e, C.m_bucket(max(1, s // e)),
                                  x.stride(0), w_packed.stride(0), w_packed.stride(1), scales.stride(0),
                                  scales.stride(1), out.stride(0), DOT=C.dot_mode(x.dtype), GROUP=group_size)
    return out


def pack_int4_experts(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7] of shape (E, N, K), K even -> uint8 (E, N, K/2) in ``pack_int4``'s format."""
    from slimfx.kernels.weight_only import pack_int4
    if q.dim() != 3:
        raise ValueError(f"q: expected the experts' codes (E, N, K), got shape {tuple(q.shape)}")
    e, n, k = q.shape
    return pack_int4(q.reshape(e * n, k)).reshape(e, n, k // 2)


def unpack_int4_experts(p: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4_experts: uint8 (E, N, K/2) -> int8 (E, N, K)."""
    from slimfx.kernels.weight_only import unpack_int4
    e, n, half = p.shape
    return unpack_int4(p.reshape(e * n, half)).reshape(e, n, 2 * half)


def _routed_rows(x, offs):
    """(expert, lo, hi) of each expert's rows, clipped to x's rows as the kernels clip them."""
    ends = np.minimum(offs.cpu().numpy().astype(np.int64), x.shape[0])
    lo = 0
    for e, hi in enumerate(ends):
        hi = max(int(hi), lo)
        yield e, lo, hi
        lo = hi


def int4_grouped_weight_only_ref(x, w_packed, scales, group_size, offs) -> np.ndarray:
    """float64 per expert and group (exact products of the integer weights up to fp64 rounding), times the
    group's fp32 scale, summed; then x's dtype via fp32."""
    e, n, half = w_packed.shape
    k = 2 * half
    q = unpack_int4_experts(w_packed.cpu()).numpy().astype(np.float64).reshape(e, n, k // group_size, group_size)
    sc = C.np32(scales).astype(np.float64).reshape(e, n, -1)
    xs = C.np32(x).astype(np.float64)
    y = np.zeros((xs.shape[0], n), dtype=np.float32)
    for i, lo, hi in _routed_rows(xs, offs):
        parts = np.einsum("mgk,ngk->mng", xs[lo:hi].reshape(hi - lo, k // group_size, group_size), q[i])
        y[lo:hi] = (parts * sc[i][None]).sum(-1).astype(np.float32)
    return y


def int8_grouped_weight_only_ref(x, w, w_scale, offs) -> np.ndarray:
    """float64 per expert (exact products of the integer weights up to fp64 rounding), the fp32 scale, then
    x's dtype via fp32."""
    xs = C.np32(x).astype(np.float64)
    wq = w.cpu().numpy().astype(np.float64)
    sc = C.np32(w_scale).reshape(wq.shape[0], wq.shape[1])
    y = np.zeros((xs.shape[0], wq.shape[1]), dtype=np.float32)
    for e, lo, hi in _routed_rows(xs, offs):
        y[lo:hi] = (xs[lo:hi] @ wq[e].T).astype(np.float32) * sc[e][None, :]
    return y
