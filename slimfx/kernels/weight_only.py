"""Weight-only quantized linear layers: int8 per-channel and int4 per-group weights, dequantized in-kernel.

    int8:  y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n]
    int4:  y[m, n] = sum_g (sum_{k in group g} x[m, k] * w[n, k]) * scale[n, g] + bias[n]

x is fp16/bf16/fp32 (..., K) and y has x's dtype. Integer weights convert exactly to x's dtype, products
accumulate in fp32 (fp32 x uses the IEEE dot, not TF32), and the scale multiplies the fp32 partial sum,
so the only roundings are the fp32 accumulation and the final cast. (Scaling the sum, not the weight: an
inf scale gives inf where the dialect's reference, x @ (q * s).T, gives NaN from a zero code's 0 * inf.)
The point is bytes: at decode shapes (M = 1..16) a linear layer is bound by reading its weight, which is
2x (int8) or 4x (int4) smaller than bf16.

int4 format (``quantize_int4_grouped`` / ``pack_int4``): signed values in [-8, 7] (the quantizer emits
[-7, 7], symmetric), two per byte along K: byte j of a row holds k = 2j in its low nibble and k = 2j+1 in
its high nibble, two's complement. Scales are fp32 (N, K / group_size). K must be a multiple of
group_size, and group_size a power of two >= 32 (one group is one K step of the kernel).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.kernels import _common as C
from slimfx.quant.numerics import absmax_scale_np, quantize_np


def _int8_configs():
    """Decode shapes want many programs over N (a 4096-wide layer at BLOCK_N=32 is 128 programs, about
    one per SM) and long K steps to keep enough bytes in flight; larger M gets the usual GEMM tiles."""
    cfg = triton.Config
    small = [cfg({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
             for bn, bk, w, s, sk in [(16, 256, 4, 4, 1), (32, 128, 4, 4, 1), (32, 256, 4, 4, 1), (32, 512, 4, 3, 1),
                                      (64, 128, 4, 4, 1), (64, 256, 8, 3, 1), (16, 256, 4, 4, 2), (32, 256, 4, 4, 2),
                                      (32, 256, 4, 4, 4), (64, 256, 4, 3, 4), (32, 128, 4, 4, 8)]]
    large = [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in [(32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                      (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]]
    interp = cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}, num_warps=4, num_stages=1)
    return C.pick_configs(small + large, interp)


def _int4_configs():
    """BLOCK_K is the group size (a constexpr argument), so only the M x N tile is tuned."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": 16, "BLOCK_N": bn}, num_warps=4, num_stages=s) for bn, s in [(16, 4), (32, 4), (64, 3)]]
    full += [cfg({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=3)
             for bm, bn, w in [(32, 64, 4), (64, 64, 4), (128, 128, 8)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1))


GEMV_MAX_M = 4   # M up to this runs the GEMV kernel (no tensor cores; every row in one program)


def _gemv_configs():
    """(BLOCK_N rows, BLOCK_K step, warps, pipeline STAGES), each with and without FAST_CVT
    (C.int8_to_f32): few rows and long K steps for many programs with many bytes in flight each (4096 rows
    at BLOCK_N = 8 is 512 programs, ~4 per SM). BLOCK_M is M rounded up (1, 2, 4)."""
    cfg = triton.Config
    full = [cfg({"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": s, "FAST_CVT": f}, num_warps=w)
            for bn, bk, w, s in [(2, 2048, 4, 2), (4, 1024, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2),
                                 (4, 2048, 8, 2), (8, 1024, 8, 2), (16, 512, 8, 2), (32, 256, 8, 2),
                                 (8, 512, 4, 3), (16, 512, 8, 3), (8, 256, 4, 4)]
            for f in (False, True)]
    # the interpreter's (and SLIMFX_AUTOTUNE=0's): each program's K step costs the interpreter the same Python
    # whatever the block, so blocks as large as still keep the tests' odd shapes (N = 37, K = 77) on several
    # programs and K steps with masked tails (256 x 128 at M = 2: 0.40 s a call, 1.17 at 8 x 32)
    return C.pick_configs(full, cfg({"BLOCK_N": 16, "BLOCK_K": 64, "STAGES": 1, "FAST_CVT": True}, num_warps=4))


@triton.autotune(configs=_gemv_configs(), key=["BLOCK_M", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_accumulator("BLOCK_K", regs=64)})
@triton.jit
def _wo_int8_gemv_kernel(x_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr, res_ptr, M, N, K,
                         stride_xm, stride_wn, stride_om, stride_rm,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         STAGES: tl.constexpr, FAST_CVT: tl.constexpr):
    """Decode shapes: a (BLOCK_M, BLOCK_N, BLOCK_K) fp32 product accumulated elementwise and summed once at
    the end (no per-step reduction), all M rows in each program so W is read exactly once. The loop is
    pipelined with tl.range(num_stages=STAGES): the num_stages launch option only pipelines loads that
    feed a tl.dot, and there is none here."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (rm % M)[:, None, None] * stride_xm + rk[None, None, :]       # (BLOCK_M, 1, BLOCK_K)
    w_ptrs = w_ptr + (rn % N)[None, :, None] * stride_wn + rk[None, None, :]       # (1, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
        k_ok = rk[None, None, :] < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        w = C.int8_to_f32(tl.load(w_ptrs, mask=k_ok, other=0), FAST_CVT)
        acc += x * w
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    C.epilogue_store(tl.sum(acc, axis=2), rm, rn, M, N, out_ptr, stride_om, w_scale_ptr, w_scale_ptr,
                     bias_ptr, res_ptr, stride_rm, w_scale_ptr, False, True, HAS_BIAS, ACT, HAS_RES, False,
                     False)


@triton.autotune(configs=_int8_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_split_k})
@triton.heuristics({"HALVES": C.halves})
@triton.jit
def _wo_int8_kernel(x_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr, res_ptr, ws_ptr, sem_ptr, M, N, K, M_BUCKET,
                    stride_xm, stride_wn, stride_om, stride_rm,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    HALVES: tl.constexpr):
    """Tensor-core tiles; at decode shapes optionally split along K (C.split_k_fixup: fp32 partials summed
    in slice order by the tile's last slice, so the result is deterministic for a given config)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_first = pid_k * k_steps
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + (k_first * BLOCK_K + rk)[None, :]
    w_ptrs = w_ptr + (rn % N)[None, :] * stride_wn + (k_first * BLOCK_K + rk)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, k_first + k_steps):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        # exact: int8 -> fp32 -> x's dtype (int -> bf16 must go via fp32 under the interpreter anyway). On
        # sm_90 Triton lowers this pair to byte permutes and packed bf16 adds (no I2F; seen in the SASS),
        # so C.int8_to_f32's trick would only add work here.
        w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0).to(tl.float32).to(x.dtype)
        acc = C.fdot(x, w, acc, DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    last = True
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        last, acc = C.split_k_fixup(acc, ws_ptr, sem_ptr, tile, pid_k, tl.num_programs(0) * tl.num_programs(1),
                                    SPLIT_K, BLOCK_M, BLOCK_N)
    if last:
        C.epilogue_store_halves(acc, rm, rn, M, N, out_ptr, stride_om, w_scale_ptr, w_scale_ptr, bias_ptr,
                                res_ptr, stride_rm, w_scale_ptr, False, True, HAS_BIAS, ACT, HAS_RES, False,
                                False, HALVES)


@triton.autotune(configs=_int4_configs(), key=["M_BUCKET", "N", "K", "GROUP"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _wo_int4_kernel(x_ptr, p_ptr, out_ptr, s_ptr, bias_ptr, M, N, K, M_BUCKET,
                    stride_xm, stride_pn, stride_sn, stride_om,
                    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HALF: tl.constexpr = GROUP // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    # x loaded contiguously, one group at a time: C.int4_group_dot splits it for the two nibbles
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]
    p_ptrs = p_ptr + (rn % N)[None, :] * stride_pn + rj[:, None]                 # (HALF, BLOCK_N)
    s_ptrs = s_ptr + (rn % N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        acc = C.int4_group_dot(acc, tl.load(x_ptrs), tl.load(p_ptrs), s_ptrs, DOT)
        x_ptrs += GROUP
        p_ptrs += HALF
        s_ptrs += 1
    C.epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, s_ptr, s_ptr, bias_ptr, s_ptr, 0, s_ptr,
                     False, False, HAS_BIAS, None, False, False, False)


IMPLS = ("auto", "gemv", "dot")


def int8_weight_only_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, activation: str | None = None,
                            residual: torch.Tensor | None = None, impl: str = "auto",
                            _config: dict | None = None) -> torch.Tensor:
    """act(x @ (w * w_scale).T + bias) + residual with int8 w (N, K) and fp32 w_scale (N,); y has x's dtype.

    impl: "gemv" (M <= GEMV_MAX_M: CUDA-core products, W read once), "dot" (tensor-core tiles), or
    "auto": dot above GEMV_MAX_M rows; up to it, whichever of the two measures faster for this shape on
    this device (timed once per process, C.fastest; the interpreter takes gemv).
    _config: pin the dot kernel's config (BLOCK_M/N/K, SPLIT_K, num_warps, num_stages): tests, experiments."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES)
    C.check_tensor("w", w, dtypes=(torch.int8,), ndim=2, unit_last_stride=True)
    n, k = w.shape
    x2 = C.as_rows("x", x, k)
    m = x2.shape[0]
    if w_scale is None:
        raise ValueError("w_scale: required (fp32, one scale per output channel (N,))")
    _, w_scale, bias, residual, _ = C.check_epilogue(m, n, bias=bias, residual=residual, w_scale=w_scale,
                                                     activation=activation, out_shape=(*x.shape[:-1], n))
    dev = C.check_device(x=x2, w=w, w_scale=w_scale, bias=bias, residual=residual)
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    if impl == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"impl='gemv': runs M <= {GEMV_MAX_M} rows, got M = {m} (use 'dot' or 'auto')")
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    d = C.dummy(dev)
    epi = (w_scale, bias if bias is not None else d, residual if residual is not None else d)
    shapes = (m, n, k, x2.stride(0), w.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0)
    flags = dict(HAS_BIAS=bias is not None, ACT=activation, HAS_RES=residual is not None)

    def gemv():
        _wo_int8_gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x2, w, out, *epi, *shapes, **flags, BLOCK_M=triton.next_power_of_2(m))

    def dot():
        kernel, meta = _wo_int8_kernel, {}
        if _config is not None:          # a pinned tile config instead of the autotuner's choice
            kernel, meta = _wo_int8_kernel.fn, {"SPLIT_K": 1, **_config}
        ws = sem = d
        if C.m_bucket(m) <= C.SPLIT_K_MAX_M or meta.get("SPLIT_K", 1) > 1:
            ws, sem = C.split_k_room(dev, torch.float32, m, n, meta)
        grid = lambda mt: (triton.cdiv(n, mt["BLOCK_N"]), triton.cdiv(m, mt["BLOCK_M"]), mt["SPLIT_K"])
        kernel[grid](x2, w, out, *epi, ws, sem, m, n, k, C.m_bucket(m), *shapes[3:], **flags,
                     DOT=C.dot_mode(x.dtype), **meta)

    if _config is not None:
        impl = "dot"
    if impl == "auto":
        impl = "dot" if m > GEMV_MAX_M else C.fastest(
            "int8_weight_only", (triton.next_power_of_2(m), n, k, str(x.dtype), str(dev)),
            {"gemv": gemv, "dot": dot}, "gemv")
    (gemv if impl == "gemv" else dot)()
    return out.view(*x.shape[:-1], n)


def int4_weight_only_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                            group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(w).T + bias with packed int4 w (N, K/2) uint8 and fp32 scales (N, K/group_size)."""
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES)
    C.check_tensor("w_packed", w_packed, dtypes=(torch.uint8,), ndim=2, unit_last_stride=True)
    if not C.is_int(group_size) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size: expected a power of two >= 32, got {group_size!r}")
    group_size = int(group_size)     # a numpy integer is no tl.constexpr
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    if k % group_size:
        raise ValueError(f"w_packed: K = {k} (2 x {w_packed.shape[1]} bytes) is not a multiple of "
                         f"group_size {group_size}")
    x2 = C.as_rows("x", x, k)
    m = x2.shape[0]
    C.check_tensor("scales", scales, dtypes=(torch.float32,), shape=(n, k // group_size), unit_last_stride=True)
    if bias is not None:
        C.check_tensor("bias", bias, dtypes=C.FLOAT_DTYPES, shape=(n,), contiguous=True)
    dev = C.check_device(x=x2, w_packed=w_packed, scales=scales, bias=bias)
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    if m and n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))
        _wo_int4_kernel[grid](x2, w_packed, out, scales, bias if bias is not None else C.dummy(dev),
                              m, n, k, C.m_bucket(m), x2.stride(0), w_packed.stride(0), scales.stride(0),
                              out.stride(0), HAS_BIAS=bias is not None, DOT=C.dot_mode(x.dtype),
                              GROUP=group_size)
    return out.view(*x.shape[:-1], n)


# --- host-side formats and numpy references --------------------------------------------------------------

def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of w (N, K): (q int8 (N, K), scale fp32 (N,)), via numerics."""
    wn = C.np32(w)
    scale = absmax_scale_np(wn, axis=1)
    q = quantize_np(wn, scale, qmin=-127, qmax=127)
    return torch.from_numpy(q).to(w.device), torch.from_numpy(scale.reshape(-1)).to(w.device)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape (N, K) with K even -> uint8 (N, K/2) (low nibble = even k)."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"q: expected (N, K) with K even, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"q: int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int32) & 15)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 (N, K/2) -> int8 (N, K)."""
    p = p.to(torch.int32)
    lo, hi = ((p & 15) ^ 8) - 8, (((p >> 4) & 15) ^ 8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1).to(torch.int8)


def quantize_int4_grouped(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 ([-7, 7]) of w (N, K) with one fp32 scale per group of ``group_size`` along K.
    Returns (packed uint8 (N, K/2), scales fp32 (N, K/group_size))."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"w: K = {k} is not a multiple of group_size {group_size}")
    wg = C.np32(w).reshape(n, k // group_size, group_size)
    scale = absmax_scale_np(wg, axis=2, qmax=7)
    q = quantize_np(wg, scale, qmin=-7, qmax=7).reshape(n, k)
    return pack_int4(torch.from_numpy(q)).to(w.device), torch.from_numpy(scale.reshape(n, -1)).to(w.device)


def int8_weight_only_ref(x, w, w_scale, bias=None, activation=None, residual=None) -> np.ndarray:
    """float64 x @ w.T (exact for these integer weights up to fp64 rounding), then the fp32 epilogue."""
    k = w.shape[1]
    acc = (C.np32(x).reshape(-1, k).astype(np.float64) @ w.cpu().numpy().astype(np.float64).T)
    y = C.epilogue_np(acc, w_scale=w_scale, bias=bias, activation=activation,
                      residual=None if residual is None else residual.reshape(acc.shape))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int4_weight_only_ref(x, w_packed, scales, group_size, bias=None) -> np.ndarray:
    """float64: per group, x_g @ q_g.T times that group's scale, summed; plus bias."""
    q = unpack_int4(w_packed.cpu()).numpy().astype(np.float64)
    n, k = q.shape
    xs = C.np32(x).reshape(-1, k).astype(np.float64)
    g = k // group_size
    parts = np.einsum("mgk,ngk->mng", xs.reshape(-1, g, group_size), q.reshape(n, g, group_size))
    y = (parts * C.np32(scales).astype(np.float64)[None]).sum(-1)
    if bias is not None:
        y = y + C.np32(bias)[None]
    return y.astype(np.float32).reshape(*x.shape[:-1], n)
