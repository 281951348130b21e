"""Compile every kernel variant for a GPU target on a machine without one, and read what it cost.

Triton ships ptxas and cuobjdump, so a kernel compiles to sm_90 (H100/H200) cubin on the CPU: a kernel
that only a GPU runs (TMA, split-K atomics, wgmma tiles) is checked for compile errors here, and each
autotune config's registers, spilled bytes (STACK) and shared memory are read from the cubin. A config
that spills or does not fit the 227 KB of shared memory per block is slow or fails at launch; the table
says which, before any GPU time is spent. It also says where a K step waits for its own wgmmas to finish
("sync-wgmma": Triton keeps Hopper's asynchronous MMA in flight across K steps only for fp32
accumulators, so the int8 GEMMs drain the tensor cores every step).

    python -m slimfx.kernels.aot                   # every kernel x every autotune config, sm_90
    python -m slimfx.kernels.aot --only int8_gemm --arch 90
    python -m slimfx.kernels.aot --aligned-m --no-sass   # compile errors and resources only: no disassembly

Argument specializations follow what real launches see (pointers 16-byte aligned, N, K and strides
multiples of 16; M not, or with --aligned-m a multiple of 16 too: Triton compiles each separately, and a
config has been seen to compile one way only). Must run without TRITON_INTERPRET (the interpreter
replaces @triton.jit).
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

SHARED_LIMIT = 232448      # bytes of shared memory one block may use on sm_90 (227 KB)


@dataclass
class Variant:
    """One compilation: a kernel, its argument types (non-constexpr) and constexpr values, launch options."""
    family: str
    kernel: object                      # Autotuner / Heuristics / JITFunction
    types: dict                         # arg name -> "*i8", "*bf16", "i32", "fp32", "tensordesc<i8[128, 128]>"
    consts: dict                        # arg name -> constexpr value
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple = ()                 # int args specialized as multiples of 16
    label: str = ""
    options: dict = field(default_factory=dict)   # more compile options, as the launcher passes them


@dataclass
class Result:
    variant: Variant
    ok: bool
    error: str = ""
    regs: int | None = None
    stack: int | None = None            # bytes of local memory per thread: spilled registers
    shared: int | None = None
    seconds: float = 0.0
    uses: list = field(default_factory=list)
    loop: int | None = None             # instructions in the main loop's body (per thread, per step)


def jit_fn(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, (Autotuner, Heuristics)):
            kernel = kernel.fn
        else:
            raise TypeError(f"not a Triton kernel (is TRITON_INTERPRET set?): {type(kernel).__name__}")
    return kernel


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cubin_dump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([_cuobjdump(), *flags, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def resource_usage(cubin: bytes) -> dict:
    """{'REG': .., 'STACK': .., 'SHARED': ..} of the one function in ``cubin`` (cuobjdump)."""
    out = _cubin_dump(cubin, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+((?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)[^;]*);", re.M)


def sass_instructions(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, text, opcode with modifiers, e.g. 'I2F.S8' or 'LDGSTS.E.BYPASS.128') of each instruction."""
    return [(int(a, 16), text, op) for a, text, op in _SASS_LINE.findall(_cubin_dump(cubin, "-sass"))]


def loop_instructions(instrs) -> Counter:
    """Opcode counts in the span of the longest backward branch: usually the main loop (a kernel's steady
    state, what each step costs every thread), though where the compiler places the epilogue inside that
    span (persistent kernels, whose tile loop holds it) it is counted too: compare like with like. The
    retry stubs of mbarrier waits (placed after the function body, branching back) are not loops."""
    best: list = []
    for i, (addr, text, op) in enumerate(instrs):
        if any(o.startswith("SYNCS.PHASECHK") for _, _, o in instrs[max(i - 2, 0):i]):
            continue            # the out-of-line retry of an mbarrier wait jumping back into the loop
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr:
                body = [o for a, _, o in instrs if int(m.group(1), 16) <= a <= addr]
                best = body if len(body) > len(best) else best
    return Counter(best)


def compile_variant(v: Variant, arch: int = 90, sass: bool = True) -> Result:
    """Compile ``v`` for sm_``arch`` and read its cubin's resource use; ``sass``: also disassemble it (about
    0.7 s of cuobjdump a variant, some 40% of the whole) for the I2F and sync-wgmma notes and the loop count."""
    fn = jit_fn(v.kernel)
    sig, attrs = {}, {}
    defaults = {k: p.default for k, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    consts = dict(v.consts)
    for i, name in enumerate(fn.arg_names):
        if name not in v.consts and name not in v.types and name in defaults:
            consts[name] = defaults[name]
        if name in consts:
            sig[name] = "constexpr"
        elif name in v.types:
            sig[name] = v.types[name]
            if v.types[name].startswith("*") or name in v.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{v.family}: no type or constexpr given for argument {name!r}")
    t0 = time.time()
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    try:
        k = triton.compile(source(fn, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=v.num_warps, num_stages=v.num_stages, **v.options))
    except Exception as e:  # noqa: BLE001 - a compile error is the result
        return Result(v, False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e) else ''}",
                      seconds=time.time() - t0)
    use = resource_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    notes = [n for n, pat in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"), ("tma", "cp.async.bulk.tensor"),
                              ("cp.async", "cp.async.cg"), ("atomics", "atom.")) if pat in ptx]
    shared = max(k.metadata.shared, use.get("SHARED", 0))
    loop = None
    if sass:
        instrs = sass_instructions(k.asm["cubin"])
        if {op for _, _, op in instrs} & {"I2F.S8", "I2F.S16"}:
            notes.append("I2F")         # small ints -> float on the conversion unit (a quarter-rate path)
        waits = [text for _, text, op in instrs if op.startswith("WARPGROUP.DEPBAR")]
        if waits and all(re.search(r"0x0\s*$", t) for t in waits):
            notes.append("sync-wgmma")  # each K step waits for its wgmmas (Triton: int32 accumulators)
        loop = sum(loop_instructions(instrs).values())
    return Result(v, True, regs=use.get("REG"), stack=use.get("STACK"), shared=shared,
                  seconds=time.time() - t0, uses=notes, loop=loop)


_TODO: list = []          # the variants of compile_all, inherited by its forked workers


def _compile_one(job: tuple[int, int, bool]) -> dict:
    """A worker's compile of _TODO[i]: the Result's fields without the Variant (kernels do not pickle)."""
    i, arch, sass = job
    r = compile_variant(_TODO[i], arch, sass)
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "variant"}


def compile_all(todo: list, arch: int = 90, jobs: int = 1, sass: bool = True) -> list[Result]:
    """compile_variant over ``todo`` in ``jobs`` forked processes (each compile is independent and
    CPU-bound), with a progress bar; results in ``todo``'s order."""
    import multiprocessing as mp
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(it, **_):
            return it
    bar = dict(total=len(todo), desc=f"compiling for sm_{arch}", file=sys.stderr)
    if jobs <= 1 or len(todo) < 2 or "fork" not in mp.get_all_start_methods():
        return [compile_variant(v, arch, sass) for v in tqdm(todo, **bar)]
    _TODO[:] = todo
    with mp.get_context("fork").Pool(jobs) as pool:
        fields = list(tqdm(pool.imap(_compile_one, [(i, arch, sass) for i in range(len(todo))]), **bar))
    return [Result(v, **f) for v, f in zip(todo, fields)]


# --- the variants of slimfx's kernels ------------------------------------------------------------------

def _configs(kernel) -> list:
    return list(kernel.configs) if isinstance(kernel, Autotuner) else [None]


def _from_configs(family, kernel, types, consts, aligned, halves=False, options=None) -> list[Variant]:
    """One Variant per autotune config; a callable type (a TMA descriptor's block shape) gets the config.
    halves: the kernel's HALVES heuristic (int8_gemm._halves) is applied to each config."""
    out = []
    for c in _configs(kernel):
        kw = dict(c.kwargs) if c is not None else {}
        if halves:    # the kernels' heuristics, as a launch would apply them
            from slimfx.kernels._common import halves as _halves, heavy_epilogue
            kw["HALVES"] = _halves({**consts, **kw})
            if "CTAS" in kw:             # the persistent TMA kernel
                kw["FLATTEN"] = not heavy_epilogue({**consts, **kw})
        out.append(Variant(family, kernel, {k: (v(kw) if callable(v) else v) for k, v in types.items()},
                           {**consts, **kw}, c.num_warps if c else 4, c.num_stages if c else 3, aligned,
                           " ".join(f"{k}={v}" for k, v in kw.items()), dict(options or {})))
    return out


def variants() -> list[Variant]:
    """Every kernel x every autotune config, with the heaviest epilogue each supports."""
    import importlib
    from slimfx.kernels import act_quant, block_sparse, sparse24, weight_only
    G = importlib.import_module("slimfx.kernels.int8_gemm")      # (the package's int8_gemm is the function)
    sizes = dict(M="i32", N="i32", K="i32", M_BUCKET="i32")
    aligned = ("N", "K", "stride_am", "stride_bn", "stride_om", "stride_rm", "stride_xm", "stride_wn",
               "stride_vn", "stride_pn", "stride_qm", "stride_mn", "stride_sn")
    epi = dict(a_scale_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*fp32", res_ptr="*bf16", out_scale_ptr="*fp32")
    no_fma = dict(enable_fp_fusion=False)     # the launchers that round like the numpy spec turn contraction off
    w8a8_flags = dict(HAS_SCALES=True, HAS_BIAS=True, ACT="gelu", HAS_RES=True, REQUANT=False, RAW_INT=False)
    vs = []
    vs += _from_configs("int8_gemm tiled", G._int8_gemm_kernel,
                        dict(a_ptr="*i8", b_ptr="*i8", out_ptr="*bf16", ws_ptr="*i32", sem_ptr="*i32", **epi, **sizes,
                             stride_am="i32", stride_bn="i32", stride_om="i32", stride_rm="i32"),
                        dict(w8a8_flags, EVEN_K=True), aligned, halves=True, options=no_fma)
    vs += _from_configs("int8_gemm tma", G._int8_gemm_tma_kernel,
                        dict(a_desc=lambda c: f"tensordesc<i8[{c['BLOCK_M']}, {c['BLOCK_K']}]>",
                             b_desc=lambda c: f"tensordesc<i8[{c['BLOCK_N']}, {c['BLOCK_K']}]>",
                             out_ptr="*bf16", **epi, **sizes, stride_om="i32", stride_rm="i32"),
                        w8a8_flags, aligned, halves=True, options=no_fma)
    from slimfx.kernels import int8_gemm_gluon as GL
    gluon_args = dict(out_ptr="*bf16", a_scale_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*fp32", col_ptr="*i32",
                      row_ptr="*i32", order_ptr="*i32", M="i32", N="i32", K="i32", stride_om="i32")

    def gluon(family, bm, bn, bk, stages, warps, sparse):   # descriptor types carry their shared layout
        desc = {name: f"tensordesc<i8[{rows}, {bk}],{GL.descriptor_layout([rows, bk])!r}>"
                for name, rows in (("a_desc", bm), ("b_desc", bn))}
        return Variant(family, GL._int8_gemm_gluon_kernel, dict(desc, **gluon_args),
                       dict(HAS_BIAS=True, RAW_INT=False, GROUP_M=GL.GROUP_M, STAGES=stages, SPARSE=sparse,
                            ORDERED=sparse, num_warps=warps),
                       warps, stages, aligned, f"BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk}", no_fma)
    vs += [gluon("int8_gemm gluon", *cfg, False) for cfg in GL.CONFIGS]
    vs += [gluon(f"block_sparse i8 {bn}x{bk} gluon", bm, bn, bk, stages, warps, True)
           for bn, bk in ((64, 64), (128, 128)) for bm, stages, warps in GL.BSR_CONFIGS]
    wo = weight_only
    vs += _from_configs("weight_only int8 gemv", wo._wo_int8_gemv_kernel,
                        dict(x_ptr="*bf16", w_ptr="*i8", out_ptr="*bf16", w_scale_ptr="*fp32", bias_ptr="*fp32",
                             res_ptr="*bf16", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
                             stride_om="i32", stride_rm="i32"),
                        dict(HAS_BIAS=True, ACT="silu", HAS_RES=True, BLOCK_M=1), aligned)
    vs += _from_configs("weight_only int8 dot", wo._wo_int8_kernel,
                        dict(x_ptr="*bf16", w_ptr="*i8", out_ptr="*bf16", w_scale_ptr="*fp32", bias_ptr="*fp32",
                             res_ptr="*bf16", ws_ptr="*fp32", sem_ptr="*i32", **sizes, stride_xm="i32",
                             stride_wn="i32", stride_om="i32", stride_rm="i32"),
                        dict(HAS_BIAS=True, ACT="silu", HAS_RES=True, DOT="native"), aligned,
                        halves=True)
    vs += _from_configs("weight_only int4", wo._wo_int4_kernel,
                        dict(x_ptr="*bf16", p_ptr="*u8", out_ptr="*bf16", s_ptr="*fp32", bias_ptr="*fp32", **sizes,
                             stride_xm="i32", stride_pn="i32", stride_sn="i32", stride_om="i32"),
                        dict(HAS_BIAS=True, DOT="native", GROUP=128), aligned)
    from slimfx.kernels import grouped_weight_only as gwo
    vs += _from_configs("grouped weight_only int8", gwo._grouped_wo_int8_kernel,
                        dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*fp32", offs_ptr="*i32", out_ptr="*bf16", S="i32",
                             N="i32", K="i32", E="i32", M_BUCKET="i32", stride_xm="i32", stride_we="i32",
                             stride_wn="i32", stride_se="i32", stride_om="i32"),
                        dict(DOT="native"), aligned)
    vs += _from_configs("grouped weight_only int4", gwo._grouped_wo_int4_kernel,
                        dict(x_ptr="*bf16", p_ptr="*u8", s_ptr="*fp32", offs_ptr="*i32", out_ptr="*bf16", S="i32",
                             N="i32", K="i32", E="i32", M_BUCKET="i32", stride_xm="i32", stride_pe="i32",
                             stride_pn="i32", stride_se="i32", stride_sn="i32", stride_om="i32"),
                        dict(DOT="native", GROUP=128), aligned)
    bs = block_sparse
    for (dtype, is_int8), (bn, bk) in itertools.product((("bf16", False), ("i8", True)),
                                                          ((64, 64), (128, 128), (32, 32))):
        flags = dict(IS_INT8=is_int8, HAS_BIAS=True, ACT="gelu", HAS_RES=True, DOT="native", BN=bn, BK=bk,
                     ORDERED=True)
        vs += _from_configs(f"block_sparse {dtype} {bn}x{bk} tiled", bs._bsr_kernel,
                            dict(x_ptr=f"*{dtype}", v_ptr=f"*{dtype}", col_ptr="*i32", row_ptr="*i32",
                                 order_ptr="*i32", out_ptr="*bf16",
                                 a_scale_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*fp32", res_ptr="*bf16", **sizes,
                                 stride_xm="i32", stride_om="i32", stride_rm="i32"), flags, aligned, halves=True,
                            options=no_fma)
        vs += _from_configs(f"block_sparse {dtype} {bn}x{bk} tma", bs._bsr_tma_kernel,
                            dict(x_desc=lambda c, d=dtype, bk=bk: f"tensordesc<{d}[{c['BLOCK_M']}, {bk}]>",
                                 v_desc=f"tensordesc<{dtype}[{bn}, {bk}]>", col_ptr="*i32", row_ptr="*i32",
                                 order_ptr="*i32", out_ptr="*bf16", a_scale_ptr="*fp32", w_scale_ptr="*fp32",
                                 bias_ptr="*fp32", res_ptr="*bf16", **sizes, stride_om="i32", stride_rm="i32"),
                            flags, aligned, halves=True, options=no_fma)
    for norm, bk in itertools.product((None, "rmsnorm", "layernorm"), (4096, 16384)):   # one row per program
        vs.append(Variant(f"act_quant {norm or 'plain'}", act_quant._act_quant_kernel,
                          dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", K="i32",
                               K_F="fp32", stride_xm="i32", stride_qm="i32", eps="fp32"),
                          dict(NORM=norm, HAS_BIAS=norm == "layernorm", BLOCK_K=bk),
                          act_quant._num_warps(bk), 3, ("K", "stride_xm", "stride_qm"), f"BLOCK_K={bk}", no_fma))
    s24 = sparse24
    vs += _from_configs("sparse24 dot", s24._sparse24_kernel,          # bf16 values read as 32-bit pairs
                        dict(x_ptr="*bf16", v_ptr="*i32", meta_ptr="*u8", out_ptr="*bf16", bias_ptr="*bf16", **sizes,
                             stride_xm="i32", stride_vn="i32", stride_mn="i32", stride_om="i32"),
                        dict(HAS_BIAS=True, DOT="native", WORDS=True), aligned)
    vs += _from_configs("sparse24 gemv", s24._sparse24_gemv_kernel,
                        dict(x_ptr="*bf16", v_ptr="*bf16", meta_ptr="*u8", out_ptr="*bf16", bias_ptr="*bf16",
                             M="i32", N="i32", K="i32", stride_xm="i32", stride_vn="i32", stride_mn="i32",
                             stride_om="i32"),
                        dict(HAS_BIAS=True, BLOCK_M=1, EVEN=True), aligned)
    return vs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--only", default="", help="families whose name contains this")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--aligned-m", action="store_true",
                    help="specialize M as a multiple of 16, as launches with such M (2048, 16) are compiled; by "
                         "default M is not (M = 1, 130): a config can compile one way and fail the other")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    ap.add_argument("--m1", action="store_true", help="the decode configs (BLOCK_M <= 16) with M = 1, which "
                                                       "Triton compiles as a constant")
    ap.add_argument("--no-sass", action="store_true", help="skip the disassembly (about 0.7 s a variant, some 40%% "
                    "of the time): compile errors, registers, spills and shared memory; no loop counts, and no I2F "
                    "or sync-wgmma notes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("slimfx.kernels.aot: unset TRITON_INTERPRET (it replaces the kernels with the interpreter)",
              file=sys.stderr)
        return 2
    todo = [v for v in variants() if args.only in v.family]
    if args.arch < 90:     # TMA and wgmma are Hopper's (compiling them for older targets aborts LLVM)
        skipped = sorted({v.family for v in todo if v.family.endswith((" tma", " gluon"))})
        todo = [v for v in todo if v.family not in skipped]
        print(f"sm_{args.arch}: skipping the Hopper-only {', '.join(skipped)}", file=sys.stderr)
    if args.aligned_m:
        for v in todo:
            v.aligned = tuple(v.aligned) + ("M", "M_BUCKET")
    if args.m1:            # Triton compiles an int argument equal to 1 as the constant 1
        todo = [v for v in todo if "M" in v.types and v.consts.get("BLOCK_M", 1) <= 16]
        for v in todo:    # (M_BUCKET too: slimfx.kernels._common.m_bucket(1) is 1)
            v.consts = dict(v.consts, **{k: 1 for k in ("M", "M_BUCKET") if k in v.types})
            v.types = {k: t for k, t in v.types.items() if k not in ("M", "M_BUCKET")}
    results = compile_all(todo, args.arch, args.jobs, not args.no_sass)
    rows = []
    for r in results:
        v = r.variant
        status = "FAILS: " + r.error if not r.ok else ("spills" if r.stack else "ok")
        if r.ok and r.shared and r.shared > SHARED_LIMIT:
            status = "smem over the limit"
        rows.append([v.family, v.label, str(v.num_warps), str(v.num_stages), str(r.regs or "-"),
                     str(r.stack if r.stack is not None else "-"),
                     f"{r.shared / 1024:.0f}" if r.shared is not None else "-", str(r.loop or "-"),
                     ",".join(r.uses), status])
    from slimfx.ir.printer import format_table
    print(format_table(["kernel", "config", "warps", "stages", "regs", "spill B", "smem KB", "loop instr", "uses",
                        "status"], rows, "llrrrrrrll"))
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump([dict(family=r.variant.family, config=r.variant.label, num_warps=r.variant.num_warps,
                            num_stages=r.variant.num_stages, ok=r.ok, error=r.error, regs=r.regs, stack=r.stack,
                            shared=r.shared, loop=r.loop, uses=r.uses) for r in results], f, indent=1)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} variants for sm_{args.arch}: {len(bad)} failed to compile, "
          f"{sum(1 for r in results if r.ok and r.stack)} spill registers")
    if args.no_sass:
        print("(--no-sass: not disassembled, so no loop counts, and no I2F or sync-wgmma notes among the uses)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
