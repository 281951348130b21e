"""2:4 semi-structured sparse linear: y = x @ W.T + bias, W stored compressed and decompressed in-kernel.

W (N, K) has at most 2 nonzeros in every group of 4 consecutive elements along K. Compressed format
(``compress_24``):
    values (N, K/2)          the 2 kept values of each group, in column order (W's dtype)
    meta   (N, ceil(K/8)) uint8   per group a nibble i0 | i1 << 2 with i0 < i1 the kept columns (0..3);
                             group 2j in the low nibble of byte j, group 2j+1 in the high nibble.
A group with fewer than 2 nonzeros keeps zeros at its lowest free positions. K must be a multiple of 4.

Two kernels read values + meta (K/2 elements + K/8 bytes per row: 56% of bf16 W's bytes), both with
contiguous, vectorized loads only (_groups: values split into their two slots and bytes into nibbles in
registers):

* gemv (M <= 4, decode): x's columns split into the four positions of each group, and each kept value
  meets its x by a 2-bit select (no gather): y += v0 * x[i0] + v1 * x[i1], fp32 on CUDA cores. About 16
  instructions per kept value in the loop on sm_90, so it can run near the speed of reading the bytes.
  It never reads x at pruned positions: an inf/NaN there gives a finite y, where dot and the dense
  reference (0 * inf) give NaN.
* dot (larger M): the dense (BLOCK_N, BLOCK_K) tile is rebuilt in registers (for 16-bit values each
  group's pair is one 32-bit word, shifted and masked into positions (0, 1) and (2, 3) by a per-group
  choice; fp32 values by per-element selects), joined back into column order, and meets x in a dense
  tl.dot: about 9 (16-bit) / 11 (fp32) instructions per weight element in the loop.
Those counts come from the sm_90 cubins (`python -m slimfx.kernels.aot` compiles every config; the
instruction counting is in that module's loop_instructions).

Why this design: Triton exposes no sparse tensor-core MMA (mma.sp), so in-kernel a 2:4 tile becomes a
dense tile and the math is dense; the win is bytes, at small M where a layer is bound by reading W. At
large M, where GEMM is compute bound, no such kernel can beat dense: that regime belongs to block sparsity
(block_sparse: whole zero blocks are skipped, so the FLOPs shrink with the density) or to cuSPARSELt
(torch.sparse.to_sparse_semi_structured), which does use the sparse tensor cores.

Measured on an H200 (bench/results/kernels-nvidia-h200-cudagraph.md, CUDA-graph timing, vs cuBLAS bf16),
for the first version of this kernel (which rebuilt the tile from strided loads and per-element meta
loads: ~35 instructions per weight element; no gemv): 0.16x at M=1 and 16, 0.08x at M=2048 (4096 x 4096).
torch's 2:4 (cuSPARSELt): 0.20x at decode, 1.38x at M=2048, 1.55x at 8192^3. Block sparsity at 90% (int8
BSR): 2.0x at M=1, 5.9x at M=2048. The two kernels above replace it and are not measured on a GPU yet
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
    C.check_data_device(w=w)         # CPU (packing at lowering, before the move to the GPU) or CUDA
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


# the nibbles i0 | i1 << 2 with i0 < i1: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
VALID_NIBBLES = tuple(i0 | i1 << 2 for i0 in range(4) for i1 in range(i0 + 1, 4))


def check_meta(meta: torch.Tensor, k: int) -> None:
    """Refuse metadata that compress_24 cannot have written: a group's nibble whose positions are not i0 < i1
    (the kernels would read it differently from decompress_24: the gemv kernel adds both values, the dot
    kernel keeps one, decompress_24 the last written). Only the K/4 groups' nibbles are read (the pad nibble
    of an odd group count is not). One pass over meta's N * K/8 bytes; sparse24_linear runs it on CPU
    tensors, and leaves it to the caller on a GPU (a synchronization per call; compress_24's meta is
    valid by construction)."""
    n, groups = meta.shape[0], k // 4
    m = meta.to(torch.int32)
    nib = torch.stack([m & 15, m >> 4], dim=-1).reshape(n, 2 * meta.shape[1])[:, :groups]
    ok = torch.zeros(16, dtype=torch.bool, device=meta.device)
    ok[list(VALID_NIBBLES)] = True
    bad = ~ok[nib.long()]
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        v = int(nib[r, g])
        raise ValueError(f"meta: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has nibble {v:#x}, positions "
                         f"i0 = {v & 3}, i1 = {v >> 2}: expected i0 < i1 (compress_24's format)")


GEMV_MAX_M = 4   # M up to this runs the GEMV kernel (contiguous loads, 2-bit selects, CUDA cores)
IMPLS = ("auto", "gemv", "dot")


def _configs():
    """Decode tiles (BLOCK_M = 16, N split finely: a 4096-row W at BLOCK_N = 32 is 128 programs) and
    prefill tiles."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(32, 128, 4, 4), (16, 256, 4, 4), (64, 64, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3)]]
    # no 256-wide N tile: its (256, BLOCK_K / 8) tile of meta bytes fails Triton 3.6's sm_90 compile once
    # the meta row stride is known to be a multiple of 16, as it is at run time (slimfx.kernels.aot)
    full += [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in [(64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                                      (128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (256, 128, 64, 8, 3)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


def _gemv_configs():
    """(BLOCK_N rows, BLOCK_G 2:4 groups per step = 4 * BLOCK_G columns of x, warps, stages)."""
    cfg = triton.Config
    full = [cfg({"BLOCK_N": bn, "BLOCK_G": bg, "STAGES": s}, num_warps=w)
            for bn, bg, w, s in [(4, 256, 4, 2), (8, 128, 4, 2), (16, 64, 4, 2), (8, 256, 8, 2), (16, 128, 8, 2),
                                 (32, 64, 8, 2), (8, 128, 4, 3), (16, 64, 4, 3)]]
    return C.pick_configs(full, cfg({"BLOCK_N": 8, "BLOCK_G": 8, "STAGES": 1}, num_warps=4))


@triton.jit
def _select4(i, x0, x1, x2, x3):
    """x_i for a 2-bit index i, elementwise (three selects: no gather)."""
    return tl.where(i < 2, tl.where(i == 0, x0, x1), tl.where(i == 2, x2, x3))


@triton.jit
def _nibbles(m_rows, kb, K, G: tl.constexpr, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """Step kb's G groups of ROWS rows: the kept positions (i0, i1), each (ROWS, G) in 0..3, from the meta
    bytes (ROWS, G/2) loaded contiguously and split into nibbles (group 2j low, 2j + 1 high). EVEN (K a
    multiple of the step): no mask, so the bytes load as whole words (masked, sm_90 loads them one by one,
    outside the cp.async pipeline)."""
    jb = kb * (G // 2) + tl.arange(0, G // 2)
    if EVEN:
        byte = tl.load(m_rows + jb[None, :]).to(tl.int32)
    else:
        byte = tl.load(m_rows + jb[None, :], mask=(jb < (K + 7) // 8)[None, :], other=0).to(tl.int32)
    nib = tl.reshape(tl.join(byte & 15, byte >> 4), (ROWS, G))
    return nib & 3, nib >> 2


@triton.jit
def _groups(v_rows, m_rows, kb, K, G: tl.constexpr, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """Step kb's G groups of ROWS weight rows, from contiguous loads: (v0, v1, i0, i1), each (ROWS, G):
    the two kept values (v's dtype) and their positions 0..3 in the group. Values arrive as (ROWS, 2G) and
    split into slots, in registers."""
    jv = kb * 2 * G + tl.arange(0, 2 * G)
    v = tl.load(v_rows + jv[None, :], mask=None if EVEN else (jv < K // 2)[None, :], other=None if EVEN else 0.0)
    v0, v1 = tl.split(tl.reshape(v, (ROWS, G, 2)))
    i0, i1 = _nibbles(m_rows, kb, K, G, ROWS, EVEN)
    return v0, v1, i0, i1


@triton.jit
def _dense_positions(v_rows, m_rows, kb, K, G: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr,
                     DTYPE: tl.constexpr):
    """The dense weights at positions 0..3 of step kb's G groups, (p0, p1, p2, p3) each (ROWS, G): position
    p holds v0 where i0 == p, v1 where i1 == p, else 0.
    WORDS (16-bit values, v_rows an int32 view): a group's pair (v0 | v1 << 16) is one 32-bit word and
    positions (0, 1) and (2, 3) are each that word shifted and masked, chosen per group instead of per
    element: (i0, i1) = (0,1): (v0,v1 | 0,0); (0,2): (v0,0 | v1,0); (0,3): (v0,0 | 0,v1); (1,2): (0,v0 | v1,0);
    (1,3): (0,v0 | 0,v1); (2,3): (0,0 | v0,v1). On sm_90 the loop is ~9 instructions per weight this way
    against ~11 with per-element selects (slimfx.kernels.aot). Loads stay masked even when K is a whole
    number of steps: unmasked, the meta bytes get a shared layout that doubles the loop at BLOCK_K = 256
    and fails to compile at 128x256x64 (Triton 3.6, sm_90)."""
    if WORDS:
        jw = kb * G + tl.arange(0, G)
        vv = tl.load(v_rows + jw[None, :], mask=(jw < K // 4)[None, :], other=0).to(tl.uint32, bitcast=True)
        i0, i1 = _nibbles(m_rows, kb, K, G, ROWS, False)
        lo = tl.where(i0 == 0, tl.where(i1 == 1, vv, vv & 0xFFFF), tl.where(i0 == 1, vv << 16, 0))
        hi = tl.where(i1 == 3, tl.where(i0 == 2, vv, vv & 0xFFFF0000), tl.where(i1 == 2, vv >> 16, 0))
        p0 = (lo & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
        p1 = (lo >> 16).to(tl.uint16).to(DTYPE, bitcast=True)
        p2 = (hi & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
        p3 = (hi >> 16).to(tl.uint16).to(DTYPE, bitcast=True)
    else:
        v0, v1, i0, i1 = _groups(v_rows, m_rows, kb, K, G, ROWS, False)
        zero = tl.zeros_like(v0)
        p0 = tl.where(i0 == 0, v0, zero)
        p1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        p2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        p3 = tl.where(i1 == 3, v1, zero)
    return p0, p1, p2, p3


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.jit
def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, bias_ptr, M, N, K, M_BUCKET,
                     stride_xm, stride_vn, stride_mn, stride_om,
                     HAS_BIAS: tl.constexpr, DOT: tl.constexpr, WORDS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-core path: the dense (BLOCK_N, BLOCK_K) tile is rebuilt in registers from contiguous loads
    (_dense_positions), joined back in column order, then a dense tl.dot with the tile transposed. On sm_90
    this is ~9 (16-bit values, WORDS) or ~11 (fp32) instructions per weight element in the loop, against
    ~35 for rebuilding it with one gathered load per element (slimfx.kernels.aot's cubins; the first
    version, with strided loads, measured 0.16x dense)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 4
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm
    v_rows = v_ptr + (rn % N)[:, None] * stride_vn
    m_rows = meta_ptr + (rn % N)[:, None] * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        p0, p1, p2, p3 = _dense_positions(v_rows, m_rows, kb, K, G, BLOCK_N, WORDS, x_ptr.dtype.element_ty)
        # join(join(p0, p2), join(p1, p3))[n, g, b, a] = p_(2b + a): flattened, column 4g + 2b + a
        w = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (BLOCK_N, BLOCK_K))
        k = kb * BLOCK_K + rk
        x = tl.load(x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        acc = C.fdot(x, tl.trans(w), acc, DOT)
    C.epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, bias_ptr, bias_ptr, bias_ptr, bias_ptr, 0,
                     bias_ptr, False, False, HAS_BIAS, None, False, False, False)


@triton.autotune(configs=_gemv_configs(), key=["BLOCK_M", "N", "K"],
                 prune_configs_by={"early_config_prune": C.prune_accumulator("BLOCK_G", regs=32)})
@triton.heuristics({"EVEN": lambda a: a["K"] % (4 * a["BLOCK_G"]) == 0})
@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, bias_ptr, M, N, K,
                          stride_xm, stride_vn, stride_mn, stride_om, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                          STAGES: tl.constexpr, EVEN: tl.constexpr):
    """Decode path, all loads contiguous: per step BLOCK_G groups, i.e. 2 * BLOCK_G values and BLOCK_G / 2
    meta bytes of each of BLOCK_N rows and 4 * BLOCK_G columns of x. Values split into slot 0 / slot 1,
    bytes into nibbles, x into its four group positions (reshape + split/join, in registers), and each
    value meets its x by a 2-bit select: y += v0 * x[i0] + v1 * x[i1] per group, in fp32, summed once at
    the end. tl.range(num_stages=STAGES) pipelines the loads (the launch option only does so for tl.dot
    operands)."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rx = tl.arange(0, 4 * BLOCK_G)
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm
    v_rows = v_ptr + (rn % N)[:, None] * stride_vn
    m_rows = meta_ptr + (rn % N)[:, None] * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(K // 4, BLOCK_G), num_stages=STAGES):
        v0, v1, i0, i1 = _groups(v_rows, m_rows, kb, K, BLOCK_G, BLOCK_N, EVEN)
        jx = kb * 4 * BLOCK_G + rx
        x = tl.load(x_rows + jx[None, :], mask=None if EVEN else (jx < K)[None, :],
                    other=None if EVEN else 0.0).to(tl.float32)
        # [m, g, a, b] = x[m, 4g + 2a + b]: split takes b (even / odd positions), then a
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_G, 2, 2)))
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
        acc += v0.to(tl.float32)[None] * _select4(i0[None], x0, x1, x2, x3) \
            + v1.to(tl.float32)[None] * _select4(i1[None], x0, x1, x2, x3)
    C.epilogue_store(tl.sum(acc, axis=2), rm, rn, M, N, out_ptr, stride_om, bias_ptr, bias_ptr, bias_ptr,
                     bias_ptr, 0, bias_ptr, False, False, HAS_BIAS, None, False, False, False)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """x (..., K) @ W.T + bias with W given as compress_24's (values (N, K/2), meta (N, ceil(K/8)));
    x and values share one dtype (fp16/bf16/fp32); y has that dtype. meta's nibbles are checked (i0 < i1,
    check_meta) on CPU tensors; on a GPU that is the caller's (compress_24's are valid).

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
    if not meta.is_cuda:             # free here; on a GPU a synchronization (check_meta's docstring)
        check_meta(meta, k)
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

    # 16-bit values as 32-bit words (one group's pair each: _dense_positions), where the view is possible
    words = values.element_size() == 2 and values.stride(0) % 2 == 0 and values.storage_offset() % 2 == 0

    def dot():
        grid = lambda mt: (triton.cdiv(n, mt["BLOCK_N"]), triton.cdiv(m, mt["BLOCK_M"]))
        v, stride_v = (values.view(torch.int32), values.stride(0) // 2) if words else (values, values.stride(0))
        _sparse24_kernel[grid](x2, v, meta, out, b, m, n, k, C.m_bucket(m), x2.stride(0), stride_v, meta.stride(0),
                               out.stride(0), HAS_BIAS=bias is not None, DOT=C.dot_mode(x.dtype), WORDS=words)

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
    return y.astype(np.float32).reshape(*x.shape[:-1], y.shape[-1])
