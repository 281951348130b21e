"""Block-sparse GEMM with BSR weights: y = epilogue(x @ W.T), skipping W's all-zero blocks.

W (N, K) is cut into (BN, BK) blocks (the block shape is a meta-parameter of the format and of the
kernel). BSR keeps, for each block-row r of W, its nonzero blocks in column order:

    values  (nnzb, BN, BK)  the blocks, each contiguous (one block = one tl.dot operand tile)
    col_idx (nnzb,) int32   block-column of each block
    row_ptr (N/BN + 1,) int32   blocks of block-row r are values[row_ptr[r] : row_ptr[r+1]]
    row_order (N/BN,) int32 block-rows by decreasing block count (optional)

N and K need not be multiples of the block: ``to_bsr`` pads W with zeros and the kernel masks.
Each program computes a (BLOCK_M, BN) tile of y by walking one block-row's list, so the work is
proportional to the kept blocks: this is the compute-bound sparse path (dense tensor-core tiles,
nothing wasted on zeros), unlike 2:4 whose win in Triton is bytes (see sparse24). Rows keep different
numbers of blocks, so programs take the block-rows longest first (row_order): the GPU's last wave is
then made of the shortest rows instead of ending on one long row (longest-processing-time-first).

    float:  acc = sum over kept blocks of x_tile @ block.T (fp32); y = act(acc + bias) + residual
    int8:   acc = the same over int8 x and int8 blocks, exact int32; y = the W8A8 epilogue
            (per-token x per-channel dequant, bias, activation, residual; see _common), bf16/fp16/fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.kernels import _common as C
from slimfx.kernels.int8_gemm import check_k
from slimfx.quant.numerics import int_matmul_np

DEFAULT_BLOCK = (64, 64)
INT8_MIN_BK = 32           # tl.dot of int8 operands needs K >= 32 on NVIDIA GPUs (16 for fp16/bf16); the IR's
                           # sparse dialect holds the same bound (kernels do not import the IR)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


@dataclass
class BSR:
    """A block-sparse (BSR) weight; see the module docstring."""
    values: torch.Tensor
    col_idx: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]
    row_order: torch.Tensor | None = None   # int32 (N/BN,): block-rows by decreasing block count, the order
                                            # programs take them (longest first, so the last wave is short
                                            # rows, not one long row); None: in order

    @property
    def density(self) -> float:
        nb = triton.cdiv(self.shape[0], self.block[0]) * triton.cdiv(self.shape[1], self.block[1])
        return self.values.shape[0] / max(nb, 1)

    def check(self) -> "BSR":
        """Refuse index contents the kernels would follow out of bounds or read differently from bsr_to_dense:
        row_ptr not running from 0 to the block count without decreasing, a col_idx outside the block-columns,
        a block-row whose block-columns are not strictly increasing (a duplicate would be summed twice by the
        kernels and kept once by bsr_to_dense), row_order not a permutation.
        The launchers run it on CPU tensors; on a GPU it costs a synchronization, so they leave it to a BSR built
        by hand (to_bsr's are valid by construction)."""
        nnzb, kb = self.values.shape[0], triton.cdiv(self.shape[1], self.block[1])
        rp, ci = self.row_ptr.cpu().long(), self.col_idx.cpu().long()
        if rp.numel() and (int(rp[0]) != 0 or int(rp[-1]) != nnzb or bool((rp[1:] < rp[:-1]).any())):
            raise ValueError(f"bsr.row_ptr: expected offsets rising from 0 to the {nnzb} blocks, got "
                             f"{rp.tolist()[:8]}{'...' if rp.numel() > 8 else ''}")
        if ci.numel() and (int(ci.min()) < 0 or int(ci.max()) >= kb):
            raise ValueError(f"bsr.col_idx: block-columns must be in [0, {kb}), got {int(ci.min())}..{int(ci.max())}")
        if ci.numel() > 1:
            row = torch.searchsorted(rp, torch.arange(nnzb), right=True) - 1      # each block's block-row
            bad = ((row[1:] == row[:-1]) & (ci[1:] <= ci[:-1])).nonzero()
            if bad.numel():
                i = int(bad[0])
                r = int(row[i])
                raise ValueError(f"bsr.col_idx: the block-columns of block-row {r} must be strictly increasing (no "
                                 f"duplicates), got {ci[int(rp[r]):int(rp[r + 1])].tolist()[:8]}")
        if self.row_order is not None:
            ro = self.row_order.cpu().long()
            if not torch.equal(ro.sort().values, torch.arange(ro.numel())):
                raise ValueError("bsr.row_order: expected a permutation of the block-rows")
        return self


def to_bsr(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> BSR:
    """Dense (masked) W (N, K) -> BSR keeping every block with any nonzero. Block dims: powers of two >= 16."""
    C.check_tensor("w", w, dtypes=WEIGHT_DTYPES, ndim=2)
    C.check_data_device(w=w)         # CPU (packing at lowering, before the move to the GPU) or CUDA
    bn, bk = block
    for name, b in (("block[0]", bn), ("block[1]", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (a tensor-core tile), got {b}")
    if w.dtype == torch.int8 and bk < INT8_MIN_BK:
        raise ValueError(f"block[1]: int8 blocks need BK >= {INT8_MIN_BK} (the K of an int8 tensor-core dot), got {bk}")
    n, k = w.shape
    nb, kb = triton.cdiv(n, bn), triton.cdiv(k, bk)
    padded = torch.zeros((nb * bn, kb * bk), dtype=w.dtype, device=w.device)
    padded[:n, :k] = w
    blocks = padded.reshape(nb, bn, kb, bk).permute(0, 2, 1, 3)           # (nb, kb, bn, bk)
    keep = (blocks != 0).flatten(2).any(-1)                               # (nb, kb)
    rows, cols = keep.nonzero(as_tuple=True)                              # row-major: sorted by row, then col
    counts = keep.sum(1)
    row_ptr = torch.zeros(nb + 1, dtype=torch.int32, device=w.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32).contiguous()
    return BSR(blocks[rows, cols].contiguous(), cols.to(torch.int32).contiguous(), row_ptr, (n, k), (bn, bk),
               order)


def bsr_to_dense(bsr: BSR) -> torch.Tensor:
    """The inverse of to_bsr (for references and tests)."""
    (n, k), (bn, bk) = bsr.shape, bsr.block
    nb, kb = triton.cdiv(n, bn), triton.cdiv(k, bk)
    rows = torch.repeat_interleave(torch.arange(nb, device=bsr.values.device),
                                   (bsr.row_ptr[1:] - bsr.row_ptr[:-1]).long())
    blocks = torch.zeros((nb, kb, bn, bk), dtype=bsr.values.dtype, device=bsr.values.device)
    blocks[rows, bsr.col_idx.long()] = bsr.values
    return blocks.permute(0, 2, 1, 3).reshape(nb * bn, kb * bk)[:n, :k]


def _configs():
    """Only the tile height is tuned: BN x BK is the format's block. Small M = decode; 128 for M >= 512."""
    cfg = triton.Config
    full = [cfg({"BLOCK_M": 16}, num_warps=4, num_stages=4), cfg({"BLOCK_M": 32}, num_warps=4, num_stages=4),
            cfg({"BLOCK_M": 64}, num_warps=4, num_stages=4), cfg({"BLOCK_M": 128}, num_warps=4, num_stages=4),
            cfg({"BLOCK_M": 128}, num_warps=8, num_stages=3), cfg({"BLOCK_M": 256}, num_warps=8, num_stages=3)]
    return C.pick_configs(full, cfg({"BLOCK_M": 16}, num_warps=4, num_stages=1))


@triton.jit
def _block_row(order_ptr, ORDERED: tl.constexpr):
    """The block-row this program computes: program_id(1), or its place in BSR.row_order."""
    if ORDERED:
        return tl.load(order_ptr + tl.program_id(1))
    return tl.program_id(1)


@triton.jit
def _block_dot(x, w, acc, IS_INT8: tl.constexpr, DOT: tl.constexpr):
    """acc + x @ w: exact int32 for int8 operands, fp32 (per C.dot_mode) for float ones."""
    if IS_INT8:
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)
    else:
        acc = C.fdot(x, w, acc, DOT)
    return acc


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BN", "BK", "IS_INT8"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.heuristics({"HALVES": C.halves})
@triton.jit
def _bsr_kernel(x_ptr, v_ptr, col_ptr, row_ptr, order_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                res_ptr, M, N, K, M_BUCKET, stride_xm, stride_om, stride_rm, ORDERED: tl.constexpr,
                IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                DOT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                HALVES: tl.constexpr):
    pid_m = tl.program_id(0)          # fastest: programs in flight share one block-row of W
    brow = _block_row(order_ptr, ORDERED)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rbn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm
    start = tl.load(row_ptr + brow)
    end = tl.load(row_ptr + brow + 1)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.int32 if IS_INT8 else tl.float32)
    w_ptrs = v_ptr + start.to(tl.int64) * (BN * BK) + rbn[None, :] * BK + rk[:, None]   # (BK, BN) = block.T
    c_ptr = col_ptr + start
    for _ in range(start, end):
        kc = tl.load(c_ptr) * BK + rk
        x = tl.load(x_rows + kc[None, :], mask=kc[None, :] < K, other=0)
        w = tl.load(w_ptrs)
        w_ptrs += BN * BK
        c_ptr += 1
        acc = _block_dot(x, w, acc, IS_INT8, DOT)
    rn = brow * BN + rbn
    C.epilogue_store_halves(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                            res_ptr, stride_rm, a_scale_ptr, IS_INT8, IS_INT8, HAS_BIAS, ACT, HAS_RES, False,
                            False, HALVES)


def _tma_configs():
    cfg = triton.Config
    full = [cfg({"BLOCK_M": bm}, num_warps=w, num_stages=s, pre_hook=_tma_block_shapes)
            for bm, w, s in [(64, 4, 4), (128, 4, 4), (128, 8, 4), (128, 8, 3), (256, 8, 3)]]
    return C.pick_configs(full, cfg({"BLOCK_M": 16}, num_warps=4, num_stages=1, pre_hook=_tma_block_shapes))


def _tma_block_shapes(nargs):
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BK"]]


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "BN", "BK", "IS_INT8"],
                 prune_configs_by={"early_config_prune": C.prune_by_m})
@triton.heuristics({"HALVES": C.halves})
@triton.jit
def _bsr_tma_kernel(x_desc, v_desc, col_ptr, row_ptr, order_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                    res_ptr, M, N, K, M_BUCKET, stride_om, stride_rm, ORDERED: tl.constexpr,
                    IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                    DOT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                    HALVES: tl.constexpr):
    """_bsr_kernel with TMA loads (Hopper and newer): the x tile at (row tile, block column) and the block
    itself (values viewed as (nnzb * BN, BK)) are rectangles at data-dependent offsets, which TMA copies
    asynchronously; its zero fill covers the M and K tails."""
    pid_m = tl.program_id(0)
    brow = _block_row(order_ptr, ORDERED)
    start = tl.load(row_ptr + brow)
    end = tl.load(row_ptr + brow + 1)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.int32 if IS_INT8 else tl.float32)
    for i in range(start, end):
        x = x_desc.load([pid_m * BLOCK_M, tl.load(col_ptr + i) * BK])
        acc = _block_dot(x, v_desc.load([i * BN, 0]).T, acc, IS_INT8, DOT)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = brow * BN + tl.arange(0, BN)
    C.epilogue_store_halves(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                            res_ptr, stride_rm, a_scale_ptr, IS_INT8, IS_INT8, HAS_BIAS, ACT, HAS_RES, False,
                            False, HALVES)


IMPLS = ("auto", "tiled", "tma", "gluon")


def _check_bsr(bsr: BSR, dtypes):
    if not isinstance(bsr, BSR):
        raise TypeError(f"bsr: expected a BSR (from block_sparse.to_bsr), got {type(bsr).__name__}")
    (n, k), (bn, bk) = bsr.shape, bsr.block
    C.check_tensor("bsr.values", bsr.values, dtypes=dtypes, ndim=3, contiguous=True)
    if tuple(bsr.values.shape[1:]) != (bn, bk):
        raise ValueError(f"bsr.values: expected blocks of shape {(bn, bk)}, got {tuple(bsr.values.shape[1:])}")
    if bsr.values.dtype == torch.int8 and bk < INT8_MIN_BK:
        raise ValueError(f"bsr.block: int8 blocks need BK >= {INT8_MIN_BK} (the K of an int8 tensor-core dot), "
                         f"got {bk}")
    C.check_tensor("bsr.col_idx", bsr.col_idx, dtypes=(torch.int32,), shape=(bsr.values.shape[0],), contiguous=True)
    C.check_tensor("bsr.row_ptr", bsr.row_ptr, dtypes=(torch.int32,), shape=(triton.cdiv(n, bn) + 1,),
                   contiguous=True)
    if bsr.row_order is not None:
        C.check_tensor("bsr.row_order", bsr.row_order, dtypes=(torch.int32,), shape=(triton.cdiv(n, bn),),
                       contiguous=True)
    C.check_device(**{"bsr.values": bsr.values, "bsr.col_idx": bsr.col_idx, "bsr.row_ptr": bsr.row_ptr,
                      "bsr.row_order": bsr.row_order})     # before check(): a meta BSR has no indices to read
    if not bsr.values.is_cuda:         # free here; on a GPU a synchronization (BSR.check's docstring)
        bsr.check()
    return n, k, bn, bk


def _launch(x2, bsr, out, a_scale, w_scale, bias, residual, activation, is_int8, impl):
    m = x2.shape[0]
    n, k = bsr.shape
    bn, bk = bsr.block
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    values2d = bsr.values.view(-1, bk)
    refusal = C.tma_refusal(x=x2, values=values2d) if impl == "tma" or (impl == "auto" and m > 16) else None
    if impl == "gluon":               # refused where it could not run, also for a weight without blocks
        from slimfx.kernels.int8_gemm import _gluon_refusal
        why = ("the Gluon kernel is the int8 form (bsr_int8_gemm)" if not is_int8 else None) or \
            _gluon_refusal(out.device, activation, residual, out.dtype) or \
            C.tma_refusal(x=x2, **({"values": values2d} if values2d.shape[0] else {}))   # (x's own checks too)
        if why:
            raise ValueError(f"impl='gluon': {why} (use impl='tiled', 'tma' or 'auto')")
    if values2d.shape[0] == 0:        # no blocks at all (y = epilogue(0)): no descriptor to build
        impl = "tiled"
    if impl == "tma" and refusal:
        raise ValueError(f"impl='tma': {refusal} (use impl='tiled' or 'auto')")
    if m == 0 or n == 0:
        return

    def gluon():
        from slimfx.kernels import int8_gemm_gluon as G
        G.launch_bsr(x2, bsr, out, a_scale, w_scale, bias)
    d = C.dummy(out.device)
    epi = (a_scale if a_scale is not None else d, w_scale if w_scale is not None else d,
           bias if bias is not None else d, residual if residual is not None else d)
    flags = dict(IS_INT8=is_int8, HAS_BIAS=bias is not None, ACT=activation, HAS_RES=residual is not None,
                 DOT=C.dot_mode(x2.dtype), BN=bn, BK=bk, ORDERED=bsr.row_order is not None, enable_fp_fusion=False)
    order = bsr.row_order if bsr.row_order is not None else bsr.row_ptr      # (unread when not ORDERED)
    res_stride = residual.stride(0) if residual is not None else 0
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, bn))

    def tiled():
        _bsr_kernel[grid](x2, bsr.values, bsr.col_idx, bsr.row_ptr, order, out, *epi, m, n, k, C.m_bucket(m),
                          x2.stride(0), out.stride(0), res_stride, **flags)

    def tma():
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor.from_tensor(x2, [16, bk])          # block rows: set per config (pre_hook)
        v_desc = TensorDescriptor.from_tensor(values2d, [bn, bk])
        _bsr_tma_kernel[grid](x_desc, v_desc, bsr.col_idx, bsr.row_ptr, order, out, *epi, m, n, k, C.m_bucket(m),
                              out.stride(0), res_stride, **flags)

    if impl == "auto":
        impl = "tiled"
        if refusal is None and m > 16:
            from slimfx.kernels.int8_gemm import _gluon_refusal, gluon_in_auto
            cands = {"tiled": tiled, "tma": tma}
            if is_int8 and gluon_in_auto() and _gluon_refusal(out.device, activation, residual, out.dtype) is None:
                cands["gluon"] = gluon                     # SLIMFX_GLUON=1 (see int8_gemm.gluon_in_auto)
            key = (C.m_bucket(m), n, k, bn, bk, str(x2.dtype), bsr.values.shape[0], str(out.device), tuple(cands))
            impl = C.fastest("bsr", key, cands, "tiled",
                             output=out if is_int8 else None)     # exact int32: the candidates must agree
    {"tma": tma, "gluon": gluon}.get(impl, tiled)()


def bsr_linear(x: torch.Tensor, bsr: BSR, bias: torch.Tensor | None = None, activation: str | None = None,
               residual: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """act(x @ W.T + bias) + residual for fp16/bf16 x (..., K) and a BSR W of the same dtype; y has x's dtype.

    impl: "tiled" (pointer loads), "tma" (TMA loads; Hopper+, 16-byte aligned rows), or "auto": tiled up
    to 16 rows, above that whichever measures faster for this shape and block count (C.fastest)."""
    C.check_tensor("x", x, dtypes=(torch.float16, torch.bfloat16))
    n, k, _, _ = _check_bsr(bsr, (torch.float16, torch.bfloat16))
    if bsr.values.dtype != x.dtype:
        raise TypeError(f"bsr.values: expected x's dtype {x.dtype}, got {bsr.values.dtype}")
    x2 = C.as_rows("x", x, k)
    _, _, bias, residual, _ = C.check_epilogue(x2.shape[0], n, bias=bias, residual=residual, activation=activation,
                                               out_shape=(*x.shape[:-1], n))
    dev = C.check_device(x=x2, bsr_values=bsr.values, bias=bias, residual=residual)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=dev)
    _launch(x2, bsr, out, None, None, bias, residual, activation, False, impl)
    return out.view(*x.shape[:-1], n)


def bsr_int8_gemm(a: torch.Tensor, bsr: BSR, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, activation: str | None = None,
                  residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                  impl: str = "auto") -> torch.Tensor:
    """int8_gemm's W8A8 epilogue over an int8 BSR weight: int8 a (..., K), fp32 a_scale (M), w_scale (N).
    K <= quant.linear.MAX_K (131071), as in int8_gemm: beyond it the int32 accumulator could overflow.
    impl: as in bsr_linear, or "gluon" (sm_90, scales and bias only: int8_gemm_gluon's block-sparse form,
    wgmma kept in flight across blocks; explicit until a GPU run has measured it)."""
    C.check_tensor("a", a, dtypes=(torch.int8,))
    n, k, _, _ = _check_bsr(bsr, (torch.int8,))
    if out_dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {C.FLOAT_DTYPES}, got {out_dtype}")
    if a_scale is None or w_scale is None:     # the kernel reads both (a placeholder would be read out of bounds)
        raise ValueError("a_scale and w_scale: both required (per token (M,) and per output channel (N,), fp32)")
    a2 = C.as_rows("a", a, k)
    check_k("bsr", k)
    a_scale, w_scale, bias, residual, _ = C.check_epilogue(a2.shape[0], n, bias=bias, residual=residual,
                                                           a_scale=a_scale, w_scale=w_scale, activation=activation,
                                                           out_shape=(*a.shape[:-1], n))
    dev = C.check_device(a=a2, bsr_values=bsr.values, a_scale=a_scale, w_scale=w_scale, bias=bias,
                         residual=residual)
    out = torch.empty((a2.shape[0], n), dtype=out_dtype, device=dev)
    _launch(a2, bsr, out, a_scale, w_scale, bias, residual, activation, True, impl)
    return out.view(*a.shape[:-1], n)


def bsr_linear_ref(x, bsr: BSR, bias=None, activation=None, residual=None) -> np.ndarray:
    """float64 x @ dense(W).T, then bias/activation/residual in fp32."""
    w = bsr_to_dense(bsr).cpu().float().numpy().astype(np.float64)
    acc = C.np32(x).reshape(-1, w.shape[1]).astype(np.float64) @ w.T
    y = C.epilogue_np(acc, bias=bias, activation=activation,
                      residual=None if residual is None else residual.reshape(acc.shape))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def bsr_int8_gemm_ref(a, bsr: BSR, a_scale, w_scale, bias=None, activation=None, residual=None) -> np.ndarray:
    """Exact int32 a @ dense(W).T (numerics.int_matmul_np), then the fp32 W8A8 epilogue."""
    w = bsr_to_dense(bsr).cpu().numpy()
    acc = int_matmul_np(a.reshape(-1, w.shape[1]).cpu().numpy(), w)
    y = C.epilogue_np(acc, a_scale=a_scale, w_scale=w_scale, bias=bias, activation=activation,
                      residual=None if residual is None else residual.reshape(acc.shape))
    return y.reshape(*a.shape[:-1], y.shape[-1])
