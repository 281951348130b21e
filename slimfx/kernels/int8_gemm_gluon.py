"""W8A8 GEMM for Hopper written in Gluon (Triton's explicit-layout dialect): ``int8_gemm(..., impl="gluon")``,
and its block-sparse form, ``bsr_int8_gemm(..., impl="gluon")``.

Why a second W8A8 kernel: Triton 3.6's pipeliner keeps Hopper's asynchronous wgmma in flight across K steps
only for fp32 accumulators. With int8's int32 accumulators every K step of the Triton kernels waits for its
wgmmas to finish before the next step's are issued (`warpgroup.wait 0`; slimfx.kernels.aot reports it as
sync-wgmma), so the tensor cores drain at every step. Here the pipeline is written out: STAGES shared-memory
slots filled by TMA (one mbarrier each), each step's wgmma issued asynchronously, and the wait keeps one
group in flight (`num_outstanding=1`), so step k + 1's MMAs queue behind step k's; the slot step k - 1 read
is refilled once its wgmma has completed.

Same numbers as the Triton kernels: the int32 sums are exact, and the epilogue is the dialect's order,
y = float(acc) * (a_scale[m] * w_scale[n]) (+ bias[n]), rounded once to the output dtype (compiled without
fp contraction). Light epilogues only (scales, bias, float out; or the raw int32 accumulator): activation,
residual and requantization stay with the Triton kernels.

Gluon kernels do not run under TRITON_INTERPRET, so the CPU tier compiles this one for sm_90
(slimfx.kernels.aot: it must show no sync-wgmma) and bench/gpu_checks.py checks it bit for bit against the
numpy spec on a GPU. ``int8_gemm``'s impl="auto" does not pick it until a GPU run has measured it.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from slimfx.kernels import _common as C

# wgmma's N for 8-bit integer operands: multiples of 16 up to 224, and 8 and 24 (PTX ISA, wgmma shapes)
_INT8_N = tuple(range(224, 15, -16)) + (24, 8)


@gluon.constexpr_function
def _warps_per_cta(block_m, num_warps):
    """Warps along M first (the wgmma atom is 4 warps x 16 rows), then along N."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if block_m > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    return warps


@gluon.constexpr_function
def _instr_n(block_m, block_n, num_warps):
    """The widest int8 wgmma N that divides the warp's share of BLOCK_N."""
    reps_n = triton.cdiv(num_warps, triton.cdiv(block_m, 16))
    max_n = max(block_n // reps_n, 8)
    return next(n for n in _INT8_N if n <= max_n and block_n % n == 0)


@gluon.jit
def _step_coords(step, off_n, first, col_ptr, ok, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                 SPARSE: gl.constexpr):
    """Where K step ``step`` reads: (a's column, b's row, b's column). Dense: K block ``step`` of both.
    SPARSE (BSR): the block-row's kept block ``first + step``: x at its block column, the block itself
    (values viewed as (nnzb * BN, BK)) whole. ``ok``: the step exists (past the row's last block, the
    column index is not read)."""
    if SPARSE:
        return gl.load(col_ptr + first + step, mask=ok, other=0) * BLOCK_K, (first + step) * BLOCK_N, 0
    return step * BLOCK_K, off_n, step * BLOCK_K


@gluon.jit
def _issue_loads(a_desc, b_desc, bar, a_buf, b_buf, step, off_m, off_n, first, col_ptr, ok,
                 BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, SPARSE: gl.constexpr):
    a_col, b_row, b_col = _step_coords(step, off_n, first, col_ptr, ok, BLOCK_K, BLOCK_N, SPARSE)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=ok)   # zero fill counts too
    tma.async_copy_global_to_shared(a_desc, [off_m, a_col], bar, a_buf, pred=ok)
    tma.async_copy_global_to_shared(b_desc, [b_row, b_col], bar, b_buf, pred=ok)


@gluon.jit
def _int8_gemm_gluon_kernel(a_desc, b_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, col_ptr, row_ptr,
                            order_ptr, M, N, K, stride_om,
                            HAS_BIAS: gl.constexpr, RAW_INT: gl.constexpr, GROUP_M: gl.constexpr,
                            STAGES: gl.constexpr, SPARSE: gl.constexpr, ORDERED: gl.constexpr,
                            num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    if SPARSE:   # as block_sparse's kernels: program (row tile, block-row), block-rows longest first if ORDERED
        pid_m = gl.program_id(0)
        brow = gl.program_id(1)
        if ORDERED:
            brow = gl.load(order_ptr + brow)
        first = gl.load(row_ptr + brow)
        steps = gl.load(row_ptr + brow + 1) - first
        pid_n = brow
    else:        # grouped tile order (_common.grouped_tile): GROUP_M row tiles share their B tiles in L2
        pid_m, pid_n = C.grouped_tile(gl.program_id(0), gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N), GROUP_M)
        first = 0
        steps = gl.cdiv(K, BLOCK_K)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_M, num_warps),
                                                  instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES - 1):              # prologue: the first STAGES - 1 K steps in flight
        _issue_loads(a_desc, b_desc, bars.index(i), a_bufs.index(i), b_bufs.index(i), i, off_m, off_n, first,
                     col_ptr, i < steps, BLOCK_K, BLOCK_N, SPARSE)

    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=mma)
    for ki in range(steps):
        s = ki % STAGES
        mbarrier.wait(bars.index(s), (ki // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
        # one group left in flight: step ki - 1's wgmma is done, so the slot it read can be refilled
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_bufs.index(s), b_bufs.index(s)))[0]
        nk = ki + STAGES - 1
        ns = nk % STAGES
        _issue_loads(a_desc, b_desc, bars.index(ns), a_bufs.index(ns), b_bufs.index(ns), nk, off_m, off_n, first,
                     col_ptr, nk < steps, BLOCK_K, BLOCK_N, SPARSE)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    # epilogue in a row-major blocked layout (coalesced stores), in the dialect's order
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    acc = gl.convert_layout(acc, out_layout)
    rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
    mask_m = rm < M
    mask_n = rn < N
    mask = gl.expand_dims(mask_m, 1) & gl.expand_dims(mask_n, 0)
    ptrs = out_ptr + gl.expand_dims(rm, 1) * stride_om + gl.expand_dims(rn, 0)
    if RAW_INT:
        gl.store(ptrs, acc, mask=mask)
    else:
        a_s = gl.load(a_scale_ptr + rm, mask=mask_m, other=0.0)
        w_s = gl.load(w_scale_ptr + rn, mask=mask_n, other=0.0)
        y = acc.to(gl.float32) * (gl.expand_dims(a_s, 1) * gl.expand_dims(w_s, 0))
        if HAS_BIAS:
            y = y + gl.expand_dims(gl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(gl.float32), 0)
        gl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps): tiles the autotuner tries; 8 warps = two warpgroups along M.
# The last two fit twice per SM (<= 113 KB of shared memory, <= 128 registers a thread at 8 warps), so one
# program's prologue and epilogue overlap the other's main loop (the kernel is not persistent).
CONFIGS = [(128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 5, 4),
           (64, 256, 128, 3, 4), (128, 128, 128, 3, 8), (128, 128, 64, 4, 8)]
GROUP_M = 8


def descriptor_layout(block_shape):
    return gl.NVMMASharedLayout.get_default_for(block_shape, gl.int8)


# Block-sparse (BSR) row tiles: (BLOCK_M, STAGES, num_warps); BN x BK is the format's block
BSR_CONFIGS = [(128, 4, 8), (128, 3, 4), (64, 4, 4), (256, 3, 8)]


def _run(a2, b_view, out, a_scale, w_scale, bias, raw, bm, bn, bk, stages, warps, grid, bsr=None):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from slimfx.kernels import _common as C
    d = C.dummy(out.device)
    a_desc = TensorDescriptor.from_tensor(a2, [bm, bk], descriptor_layout([bm, bk]))
    b_desc = TensorDescriptor.from_tensor(b_view, [bn, bk], descriptor_layout([bn, bk]))
    sparse = bsr is not None
    ordered = sparse and bsr.row_order is not None
    idx = (bsr.col_idx, bsr.row_ptr, bsr.row_order if ordered else bsr.row_ptr) if sparse else (d, d, d)
    _int8_gemm_gluon_kernel[grid](a_desc, b_desc, out, a_scale if a_scale is not None else d,
                                  w_scale if w_scale is not None else d, bias if bias is not None else d, *idx,
                                  a2.shape[0], out.shape[1], a2.shape[1], out.stride(0), HAS_BIAS=bias is not None,
                                  RAW_INT=raw, GROUP_M=GROUP_M, STAGES=stages, SPARSE=sparse, ORDERED=ordered,
                                  num_warps=warps, enable_fp_fusion=False)


def _pick(family, key, fns):
    from slimfx.kernels import _common as C
    fns[C.fastest(family, key, fns, next(iter(fns)))]()


def launch(a2, b, out, a_scale, w_scale, bias, raw: bool, config=None):
    """Run the kernel on int8 a2 (M, K) and b (N, K): one config, or (config=None) the fastest of CONFIGS
    for this (M bucket, N, K) on this device, timed once (slimfx.kernels._common.fastest)."""
    from slimfx.kernels import _common as C
    m, n = a2.shape[0], b.shape[0]

    def run(cfg):
        bm, bn, bk, stages, warps = cfg
        _run(a2, b, out, a_scale, w_scale, bias, raw, bm, bn, bk, stages, warps,
             (triton.cdiv(m, bm) * triton.cdiv(n, bn),))

    if config is not None:
        return run(tuple(config))
    key = (C.m_bucket(m), n, a2.shape[1], str(out.dtype), bias is not None, str(out.device))
    _pick("int8_gemm_gluon", key, {"x".join(map(str, cfg)): (lambda cfg=cfg: run(cfg)) for cfg in CONFIGS})


def launch_bsr(a2, bsr, out, a_scale, w_scale, bias, config=None):
    """The block-sparse form: int8 a2 (M, K) against an int8 BSR weight (block_sparse.BSR); programs are
    (row tile, block-row) as in block_sparse. config: (BLOCK_M, STAGES, num_warps) or the fastest of
    BSR_CONFIGS for this shape and block count."""
    from slimfx.kernels import _common as C
    (n, k), (bn, bk) = bsr.shape, bsr.block
    m = a2.shape[0]
    values = bsr.values.view(-1, bk)

    def run(cfg):
        bm, stages, warps = cfg
        _run(a2, values, out, a_scale, w_scale, bias, False, bm, bn, bk, stages, warps,
             (triton.cdiv(m, bm), triton.cdiv(n, bn)), bsr)

    if config is not None:
        return run(tuple(config))
    key = (C.m_bucket(m), n, k, bn, bk, bsr.values.shape[0], str(out.dtype), bias is not None, str(out.device))
    _pick("bsr_int8_gluon", key, {"x".join(map(str, cfg)): (lambda cfg=cfg: run(cfg)) for cfg in BSR_CONFIGS})
