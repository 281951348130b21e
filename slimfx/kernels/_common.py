"""What every kernel family shares: argument checks that name the argument, the interpreter switch,
and the fused epilogue (dequant scale, bias, activation, residual, requantize) as Triton and numpy twins.

The epilogue computes, in fp32 and in this order (the numpy twin does the same operations in the same
order, so under the interpreter the two agree bit for bit):

    y = acc * (a_scale[m] * w_scale[n])   the outer product of the scales first, then one multiply:
                                          the order of slimfx.quant.linear (the dialect's quantized_linear),
                                          so kernel, numpy backend and torch reference agree bit for bit;
                                          with only one of the scales given, y = acc * that scale
    y = y + bias[n]
    y = act(y)                      relu: max(y, 0)
                                    silu: y * sigmoid(y)
                                    gelu: the tanh approximation, written as
                                          y * sigmoid(1.5957691216057308 * (y + 0.044715 * y**3))
                                          (= 0.5*y*(1 + tanh(sqrt(2/pi)*(y + 0.044715*y**3))), i.e.
                                          torch's gelu(approximate="tanh"); libdevice's tanh/erf do not
                                          run under TRITON_INTERPRET, exp/sigmoid do)
    y = y + residual[m, n]
    q = clamp(round_half_even(y / out_scale), -127, 127)   (only when requantizing; fp32 division,
                                                            correctly rounded: tl.math.div_rn)
"""
from __future__ import annotations

import numbers
import os

import numpy as np
import torch
import triton
import triton.language as tl

from slimfx.quant.numerics import SYM_INT8_QMAX, quantize_np

ACTIVATIONS = (None, "relu", "silu", "gelu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GELU_K = 1.5957691216057308  # 2 * sqrt(2 / pi)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_configs(full: list, interpreted: "triton.Config") -> list:
    """The autotune list; or one small config under the interpreter (tuning there would only be slow),
    or with SLIMFX_AUTOTUNE=0 (GPU correctness tests: one compile per kernel variant, not one per config).
    Read when slimfx.kernels is imported."""
    return [interpreted] if interpreting() or os.environ.get("SLIMFX_AUTOTUNE", "1") == "0" else full


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, so decode shapes do not retune for every M."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


# --- measured choice between implementations -----------------------------------------------------------

_FASTEST: dict = {}


def fastest(family: str, key: tuple, candidates: dict, default: str, output: torch.Tensor | None = None) -> str:
    """The name of the fastest of ``candidates`` (name -> zero-argument call) for this (family, key),
    timed once per process with triton.testing.do_bench (each candidate autotunes on its first call);
    a candidate that fails to compile or run is skipped. ``output``: the tensor every candidate writes,
    where they must agree bit for bit (integer accumulation, one epilogue): a candidate whose result
    differs from ``default``'s is skipped too, so a wrong kernel is never chosen for being fast. Under the
    interpreter nothing is timed: ``default``. ``fastest_choices()`` shows what was chosen and the times."""
    if interpreting() or len(candidates) == 1:
        return default
    k = (family, key)
    if k not in _FASTEST:
        from triton.testing import do_bench
        times, errors, want = {}, {}, None
        for name in sorted(candidates, key=lambda n: n != default):      # the default first: the reference
            fn = candidates[name]
            try:
                if output is not None:
                    fn()
                    if want is None:
                        want = output.clone()
                    elif not torch.equal(output, want):
                        errors[name] = f"differs from {default} in {int((output != want).sum())} elements"
                        continue
                times[name] = float(do_bench(fn, warmup=5, rep=25))
            except Exception as e:   # noqa: BLE001 - e.g. OutOfResources / no TMA on this device: not a choice
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if not times:
            raise RuntimeError(f"{family}: no implementation ran for {key}: {errors}")
        _FASTEST[k] = (min(times, key=times.get), times, errors)
    return _FASTEST[k][0]


def fastest_choices() -> dict:
    """{(family, key): (chosen, {name: ms}, {name: error})} for every measured choice so far."""
    return dict(_FASTEST)


def tma_refusal(**mats) -> str | None:
    """Why TMA descriptors cannot cover these 2-D operands (None when they can): TMA needs a Hopper-class
    GPU (or the interpreter), 16-byte aligned bases and row strides in multiples of 16 bytes."""
    first = next(iter(mats.values()))
    if any(v.numel() == 0 for v in mats.values()):
        return f"TMA needs non-empty operands, got shapes {', '.join(f'{k} {tuple(v.shape)}' for k, v in mats.items())}"
    if first.device.type == "cuda" and torch.cuda.get_device_capability(first.device) < (9, 0):
        return f"TMA needs compute capability >= 9.0, got {torch.cuda.get_device_capability(first.device)}"
    strides = {k: v.stride(0) * v.element_size() for k, v in mats.items()}
    if any(s % 16 for s in strides.values()):
        got = ", ".join(f"{k} {s}" for k, s in strides.items())
        return f"TMA needs row strides that are multiples of 16 bytes, got {got}"
    if any(v.data_ptr() % 16 for v in mats.values()):
        return f"TMA needs 16-byte aligned {', '.join(mats)}"
    return None


def num_sms(dev: torch.device) -> int:
    """Programs of a persistent kernel: the SM count (4 under the interpreter, so each walks several tiles)."""
    if dev.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(dev).multi_processor_count


# --- argument checks -----------------------------------------------------------------------------------

def check_tensor(name: str, t, dtypes=None, ndim=None, shape=None, unit_last_stride=False,
                 contiguous=False) -> None:
    """Raise TypeError/ValueError naming ``name`` and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got strides {t.stride()}")


def check_device(**tensors) -> torch.device:
    """All given tensors on one device, which Triton can run on (CUDA, or CPU under the interpreter)."""
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) != 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"expected all tensors on one device, got {where}")
    dev = check_data_device(**named)
    if dev.type != "cuda" and not interpreting():
        first = next(iter(named))
        raise ValueError(f"{first}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run on "
                         f"the CPU), got device {dev}")
    return dev


def check_data_device(**tensors) -> torch.device:
    """The device of the first given tensor, refused (naming it) unless it is CUDA or CPU: meta tensors hold no
    data, and mps & co. have no Triton, interpreted or not. What the host-side format code (to_bsr, compress_24,
    index checks) needs; the launchers check more (check_device)."""
    for name, t in tensors.items():
        if t is not None and t.device.type not in ("cuda", "cpu"):
            raise ValueError(f"{name}: Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                             f"got device {t.device}")
    return next(t.device for t in tensors.values() if t is not None)


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def is_int(v) -> bool:
    """A Python or numpy integer (not a bool, not a float that happens to be whole)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def as_rows(name: str, x: torch.Tensor, k: int) -> torch.Tensor:
    """View x (..., K) as (M, K) with unit stride along K, or refuse."""
    if x.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (..., {k}), got shape {tuple(x.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"{name}: expected last dimension {k} (K of the weight), got shape {tuple(x.shape)}")
    if k == 0:
        raise ValueError(f"{name}: K = 0 (an empty reduction) is not supported, got shape {tuple(x.shape)}")
    try:
        x2 = x.view(-1, k)
    except RuntimeError:
        raise ValueError(f"{name}: leading dimensions must flatten without a copy, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}") from None
    check_tensor(name, x2, unit_last_stride=True)
    return x2


def _flat_scales(name: str, t, count: int, per: str):
    """None, or ``t`` checked to hold one fp32 scale per ``per`` and flattened to (count,)."""
    if t is None:
        return None
    check_tensor(name, t, dtypes=(torch.float32,))
    if t.numel() != count:
        raise ValueError(f"{name}: expected one fp32 scale per {per} ({count} values), got shape {tuple(t.shape)}")
    return t.reshape(count).contiguous()


def check_epilogue(m: int, n: int, bias=None, residual=None, a_scale=None, w_scale=None,
                   out_scale=None, activation=None, out_shape=None):
    """Check the optional epilogue operands; returns (a_scale, w_scale, bias, residual, out_scale) as flat
    views (residual as (M, N)). ``out_shape``: the output's shape (..., N) (default (M, N)), which the
    residual must have exactly: it is added element for element, with no broadcasting (a (3, 2, N) residual
    for a (2, 3, N) output would be added row-major, where torch's ``y + residual`` refuses). The caller
    checks devices."""
    check_activation(activation)
    a_scale = _flat_scales("a_scale", a_scale, m, "token")
    w_scale = _flat_scales("w_scale", w_scale, n, "output channel")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(n,), contiguous=True)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
        want = (m, n) if out_shape is None else tuple(out_shape)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual: expected shape (..., {n}) with {m} rows, the output's {want}, got "
                             f"{tuple(residual.shape)}")
        # an empty output reads no residual (and N = 0 is no empty reduction: as_rows would say so)
        residual = residual.reshape(m, n) if m * n == 0 else as_rows("residual", residual, n)
    if out_scale is not None:
        check_tensor("out_scale", out_scale, dtypes=(torch.float32,))
        if out_scale.numel() != 1:
            raise ValueError(f"out_scale: expected one static fp32 scale (per tensor), got shape "
                             f"{tuple(out_scale.shape)}; per-token requantization needs the whole row, "
                             f"use act_quant.quantize_per_token")
        out_scale = out_scale.reshape(1).contiguous()
    return a_scale, w_scale, bias, residual, out_scale


_DUMMIES: dict = {}


def dummy(dev) -> torch.Tensor:
    """A placeholder pointer for an absent optional operand (the kernel never reads it); one per device,
    so launches at decode shapes don't pay an allocation for it."""
    dev = torch.device(dev)
    if dev not in _DUMMIES:
        _DUMMIES[dev] = torch.empty(1, dtype=torch.float32, device=dev)
    return _DUMMIES[dev]


# --- Triton epilogue -----------------------------------------------------------------------------------

@triton.jit
def round_half_even(x):
    """Round-half-to-even of fp32 x for |x| < 2**22 (clamp first): adding 1.5 * 2**23 leaves no fraction bits."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def round_to_bf16(y):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32, so the cast after it is exact.

    The GPU's cast already rounds this way; triton 3.6's interpreter truncates instead, so without
    this the CPU tier could not check bf16 outputs bit for bit. A few integer ops per output element.
    (NaN payloads living only in the low 16 bits would become inf; the epilogue produces no NaN from
    finite inputs.)
    """
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def int8_to_f32(w, FAST: tl.constexpr):
    """int8 (any shape) -> fp32, exactly. FAST: without the conversion unit (I2F runs at a quarter of the
    integer-add rate, and at decode shapes a weight-only GEMM converts every weight it reads): the int32
    bits 0x4B000080 + w are the float 2**23 + 128 + w (w + 128 in [0, 255] fills the low mantissa bits),
    and subtracting 2**23 + 128 leaves w. On sm_90 the plain conversion is an I2F.S8 per element and
    FAST a byte permute, an integer add and an FADD (slimfx.kernels.aot's cubins); which is faster is the
    autotuner's business. (int8 -> bf16/fp16 for a tl.dot needs none of this: Triton already lowers it
    to permutes and packed half-precision adds.)"""
    if FAST:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    return w.to(tl.float32)


@triton.jit
def int4_group_dot(acc, x, p, s_ptrs, DOT: tl.constexpr):
    """acc + (x @ unpack(p)) * scale for one group of an int4 weight: x (BLOCK_M, GROUP) float, p (GROUP/2,
    BLOCK_N) bytes of two signed nibbles (low = even k), the (BLOCK_N,) fp32 scales loaded from s_ptrs after
    the dots (loaded before them, they held registers across the dots: a 128 x 128 tile spilled). x is split into its even and
    odd columns in registers, which meet the low and high nibbles in two dots (no interleave of the weights;
    strided loads of x were one 2-byte load and shared-memory store per element on sm_90)."""
    x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
    p = p.to(tl.int32)
    # the sign-extended nibble, exact in any float; through int8, which Triton turns into bf16/fp16 with
    # byte permutes and packed adds (straight from int32 it is a quarter-rate I2F per element)
    lo = (((p & 15) ^ 8) - 8).to(tl.int8).to(tl.float32).to(x_even.dtype)
    hi = ((((p >> 4) & 15) ^ 8) - 8).to(tl.int8).to(tl.float32).to(x_even.dtype)
    part = fdot(x_even, lo, tl.zeros(acc.shape, dtype=tl.float32), DOT)
    part = fdot(x_odd, hi, part, DOT)
    return acc + part * tl.load(s_ptrs)[None, :]


@triton.jit
def activate(y, ACT: tl.constexpr):
    if ACT == "relu":
        y = tl.maximum(y, 0.0)
    elif ACT == "silu":
        y = y * tl.sigmoid(y)
    elif ACT == "gelu":
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * (y * y * y)))
    return y


@triton.jit
def quantize_sym(y, scale):
    """clamp(round_half_even(y / scale), -127, 127) with a correctly rounded fp32 division; a NaN quotient (a
    NaN scale or input, inf / inf) gives 0, as numpy's and torch's casts of NaN to int8 do (tl.minimum /
    tl.maximum would clamp it to a bound)."""
    v = tl.math.div_rn(y, scale)
    v = tl.where(v == v, v, 0.0)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return round_half_even(v).to(tl.int8)


@triton.jit
def epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                   res_ptr, stride_rm, out_scale_ptr,
                   HAS_A_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ACT: tl.constexpr, HAS_RES: tl.constexpr, REQUANT: tl.constexpr,
                   RAW_INT: tl.constexpr):
    """Apply the epilogue of the module docstring to the (BLOCK_M, BLOCK_N) tile ``acc`` and store it."""
    mask_m = rm < M
    mask_n = rn < N
    mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if RAW_INT:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        y = acc.to(tl.float32)
        if HAS_A_SCALE and HAS_W_SCALE:
            a_s = tl.load(a_scale_ptr + rm, mask=mask_m, other=0.0)
            w_s = tl.load(w_scale_ptr + rn, mask=mask_n, other=0.0)
            y = y * (a_s[:, None] * w_s[None, :])
        elif HAS_A_SCALE:
            y = y * tl.load(a_scale_ptr + rm, mask=mask_m, other=0.0)[:, None]
        elif HAS_W_SCALE:
            y = y * tl.load(w_scale_ptr + rn, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = activate(y, ACT)
        if HAS_RES:
            y = y + tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask,
                            other=0.0).to(tl.float32)
        if REQUANT:
            q = quantize_sym(y, tl.load(out_scale_ptr))
            tl.store(out_ptrs, q, mask=mask)
        else:
            if out_ptr.dtype.element_ty == tl.bfloat16:
                y = round_to_bf16(y)
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_tile(t, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Tile t -> (pid_m, pid_n) in grouped order (Triton's matmul tutorial): GROUP_M row tiles in a row
    share each weight tile while it is in L2."""
    width = GROUP_M * grid_n
    first_m = (t // width) * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    return first_m + (t % width) % group_m, (t % width) // group_m


@triton.jit
def split_k_fixup(acc, ws_ptr, sem_ptr, tile, pid_k, tiles, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Split-K's reduction, with no second launch: every slice writes its partial tile to the workspace
    (SPLIT_K, tiles, BLOCK_M, BLOCK_N), then bumps the tile's counter (acq_rel: the partial is visible
    before the count). Returns (last, total): the slice that finds the count at SPLIT_K - 1 is the last,
    sums the partials in slice order (the same sum whichever slice finishes last: deterministic) and
    resets the counter for the next launch; the others get last = False. Triton performs a scalar atomic
    from one thread after a CTA barrier (bar.sync before the atom in the sm_90 PTX), so every thread's
    partial store is ordered before the release, and the acquired count reaches all threads the same way."""
    part = ws_ptr + ((pid_k * tiles + tile) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * BLOCK_N \
        + tl.arange(0, BLOCK_N)[None, :]
    tl.store(part, acc)
    done = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel")
    last = done == SPLIT_K - 1
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
    if last:
        for s in range(0, SPLIT_K):
            total += tl.load(part + (s - pid_k) * tiles * BLOCK_M * BLOCK_N, cache_modifier=".cg")
        tl.atomic_xchg(sem_ptr + tile, 0)
    return last, total


def prune_accumulator(k_key: str, regs: int):
    """Autotune pruning for the GEMV kernels' 3-D fp32 accumulator (BLOCK_M x BLOCK_N x config[k_key]):
    keep configs within ~``regs`` registers a thread (BLOCK_M is a launch argument)."""
    def prune(configs, named_args, **kwargs):
        bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
        keep = [c for c in configs if bm * c.kwargs["BLOCK_N"] * c.kwargs[k_key] <= regs * 32 * c.num_warps]
        return keep or configs[:1]
    return prune


SPLIT_K_MAX_M = 16     # split-K configs are tried up to this many rows (decode), where N / BLOCK_N
SPLIT_K_MAX = 8        # alone gives too few programs to keep the memory system busy


def prune_split_k(configs, named_args, **kwargs):
    """prune_by_m, and split-K configs only at decode shapes (M bucket <= SPLIT_K_MAX_M)."""
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 30))
    keep = [c for c in prune_by_m(configs, named_args, **kwargs)
            if c.kwargs.get("SPLIT_K", 1) == 1 or mb <= SPLIT_K_MAX_M]
    return keep or configs[:1]


_SEMAPHORES: dict = {}


def split_k_room(dev, dtype, m: int, n: int, meta: dict):
    """(workspace for split_k_fixup's partials, its tile counters) for a launch whose config is ``meta``
    (pinned) or any autotuned one: room for SPLIT_K <= max(SPLIT_K_MAX, pinned), BLOCK_M = 16 (decode; or
    the pinned one) and BLOCK_N >= 16 dividing 128 (or the pinned one, if wider: a pinned 256-wide tile
    overran a workspace sized for 128). Counted as (BLOCK_M, 16) tiles over N padded to that width:
    as many counters as the narrowest tiles need and as many partial elements as the widest. Only needed
    when split configs may run. The workspace comes from the caching allocator per call; the counters
    are zero between launches (the last slice of each tile resets its own) and cached per device, grown
    as needed; kernels on one stream use them one after another, so split-K launches on several streams
    at once must not share a device."""
    sk, bm = max(meta.get("SPLIT_K", 1), SPLIT_K_MAX), meta.get("BLOCK_M", 16)
    width = max(128, meta.get("BLOCK_N", 128))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, width) * (width // 16)
    ws = torch.empty(sk * tiles * bm * 16, dtype=dtype, device=dev)
    sem = _SEMAPHORES.get(dev)
    if sem is None or sem.numel() < tiles:
        sem = _SEMAPHORES[dev] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=dev)
    return ws, sem


def heavy_epilogue(args) -> bool:
    """An epilogue with an activation or a residual (kernel arguments ACT, HAS_RES): many live values per
    output element."""
    return args["ACT"] is not None or bool(args["HAS_RES"])


def halves(args) -> bool:
    """Heuristic for epilogue_store_halves: a heavy epilogue on a tile 128 or more columns wide (BLOCK_N,
    or a block-sparse kernel's block width BN), which spills registers otherwise (read off the sm_90
    cubins with `python -m slimfx.kernels.aot`)."""
    return args.get("BLOCK_N", args.get("BN", 0)) >= 128 and heavy_epilogue(args)


@triton.jit
def epilogue_store_halves(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                          res_ptr, stride_rm, out_scale_ptr,
                          HAS_A_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACT: tl.constexpr, HAS_RES: tl.constexpr, REQUANT: tl.constexpr,
                          RAW_INT: tl.constexpr, HALVES: tl.constexpr):
    """epilogue_store, on the tile's two column halves one after the other when HALVES: a heavy epilogue
    (activation, residual) on a wide tile then needs half the registers at a time (wide tiles spill
    without it; `python -m slimfx.kernels.aot` shows which)."""
    if HALVES:
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        rn_left, rn_right = tl.split(tl.permute(tl.reshape(rn, (2, BN // 2)), (1, 0)))
        epilogue_store(left, rm, rn_left, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                       res_ptr, stride_rm, out_scale_ptr, HAS_A_SCALE, HAS_W_SCALE, HAS_BIAS, ACT, HAS_RES,
                       REQUANT, RAW_INT)
        epilogue_store(right, rm, rn_right, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr,
                       res_ptr, stride_rm, out_scale_ptr, HAS_A_SCALE, HAS_W_SCALE, HAS_BIAS, ACT, HAS_RES,
                       REQUANT, RAW_INT)
    else:
        epilogue_store(acc, rm, rn, M, N, out_ptr, stride_om, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr,
                       stride_rm, out_scale_ptr, HAS_A_SCALE, HAS_W_SCALE, HAS_BIAS, ACT, HAS_RES, REQUANT,
                       RAW_INT)


# --- numpy epilogue ------------------------------------------------------------------------------------

def np32(t) -> np.ndarray | None:
    """A torch tensor (any float dtype, any device) as a numpy fp32 array; None stays None."""
    if t is None:
        return None
    return t.detach().to("cpu", torch.float32).numpy()


def activate_np(y: np.ndarray, activation) -> np.ndarray:
    """The numpy twin of ``activate`` (same formulas, fp32)."""
    with np.errstate(over="ignore"):
        if activation == "relu":
            return np.maximum(y, np.float32(0))
        if activation == "silu":
            return y * _sigmoid_np(y)
        if activation == "gelu":
            u = np.float32(GELU_K) * (y + np.float32(0.044715) * (y * y * y))
            return y * _sigmoid_np(u)
    return y


def _sigmoid_np(x: np.ndarray) -> np.ndarray:
    return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)


def epilogue_np(acc: np.ndarray, a_scale=None, w_scale=None, bias=None, activation=None, residual=None,
                out_scale=None) -> np.ndarray:
    """The numpy twin of ``epilogue_store``: fp32 result, or int8 when ``out_scale`` is given."""
    y = acc.astype(np.float32)
    if a_scale is not None and w_scale is not None:
        y = y * (np32(a_scale).reshape(-1, 1) * np32(w_scale).reshape(1, -1))
    elif a_scale is not None:
        y = y * np32(a_scale).reshape(-1, 1)
    elif w_scale is not None:
        y = y * np32(w_scale).reshape(1, -1)
    if bias is not None:
        y = y + np32(bias).reshape(1, -1)
    y = activate_np(y, activation)
    if residual is not None:
        y = y + np32(residual).reshape(y.shape)
    if out_scale is not None:
        return quantize_np(y, np32(out_scale).reshape(()), qmin=-SYM_INT8_QMAX, qmax=SYM_INT8_QMAX)
    return y.astype(np.float32)


def prune_by_m(configs, named_args, **kwargs):
    """Autotune pruning: tile heights that fit the M bucket (M_BUCKET is a kernel argument).

    Decode shapes (M <= 16) only try BLOCK_M = 16 (the smallest tensor-core tile); large M skips the
    small tiles, which cannot win there and would only make tuning slower.
    """
    mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 30))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb) and (mb < 256 or c.kwargs["BLOCK_M"] >= 64)]
    return keep or configs[:1]


def dot_mode(dtype: torch.dtype) -> str:
    """How float tiles meet in tl.dot (the DOT constexpr of ``fdot``).

    fp32 -> "ieee" (a true fp32 product, not TF32); bf16 under the interpreter -> "upcast": triton 3.6's
    interpreter multiplies bf16 tiles as their raw uint16 bit patterns, and bf16 -> fp32 is exact, so
    upcasting computes what the tensor core computes. Otherwise "native".
    """
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "native"


@triton.jit
def fdot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation, per ``dot_mode``."""
    if DOT == "upcast":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == "ieee":
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
