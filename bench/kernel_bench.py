"""Benchmark slimfx's Triton kernels against their torch baselines, in one process, on one GPU.

    python bench/kernel_bench.py            # full sweep: M in {1,16,128,512,2048} x (N,K) in {4096,11008}^2, + 8192^3
    python bench/kernel_bench.py --quick    # a subset that fits in ~3 minutes, compile and autotune included
    python bench/kernel_bench.py --fake     # no GPU: write the report from made-up numbers (tests the writers)
                                            # into a new temporary folder unless --out-dir names one

Every case is timed with triton.testing.do_bench (median) and checked on fresh random inputs in the same
run; speedups are against cuBLAS bf16 (F.linear) measured in the same process (none where that baseline
failed). Writes bench/results/kernels-<card>.json, .md and .png (see bench/kernel_report.py; --out-dir).
Baselines: cuBLAS bf16; torch._int_mm + a separate dequant (int8 operands already quantized);
a torch.compile'd W8A8 dynamic linear (per-token quantization + _int_mm + dequant, all compiled);
torch's 2:4 semi-structured sparse (to_sparse_semi_structured, cuSPARSELt/CUTLASS).
Beside each kernel's default (impl="auto", which times its implementations once per shape and keeps the
faster), the implementations themselves are timed (W8A8 tiled/TMA, BSR tiled/TMA, weight-only int8 and
2:4 gemv/dot at M <= 4): a second table, and auto's choices in the JSON's meta.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import kernel_report as R  # noqa: E402
from common import RESULTS, description, provenance  # noqa: E402

FULL_MS = [1, 16, 128, 512, 2048]
FULL_NK = [(4096, 4096), (11008, 4096), (4096, 11008), (11008, 11008)]
QUICK_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (2048, 4096, 4096), (8192, 8192, 8192)]


def shapes(quick: bool, only_m: str = "") -> list[tuple[int, int, int]]:
    """The sweep (or its quick subset), optionally only the shapes whose M is in ``only_m`` ("1,16")."""
    todo = list(QUICK_SHAPES) if quick else [(m, n, k) for n, k in FULL_NK for m in FULL_MS] + [(8192, 8192, 8192)]
    if only_m:
        keep = {int(v) for v in only_m.split(",") if v}
        todo = [s for s in todo if s[0] in keep]
    return todo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--quick", action="store_true", help="a ~3 minute subset (4 shapes)")
    p.add_argument("--fake", action="store_true", help="no GPU: write the report from made-up numbers")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where to write kernels-<card>*.{json,md,png} (default: bench/results; with --fake a new "
                        "temporary folder, printed at the end, so made-up numbers never land among the results)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new shapes after this many seconds (default 150 quick, 420 full)")
    p.add_argument("--only", default="", help="comma-separated kernel names to run, each with its implementations "
                                             "(w8a8: every W8A8 case; block_sparse_50: its tiled/TMA/block-shape "
                                             "variants); cuBLAS bf16 always runs (default: all)")
    p.add_argument("--m", default="", help="comma-separated M values: only the shapes with these M (a sweep "
                                          "split over several runs; see --merge)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other shapes from an earlier run's JSON of the same card, timing and "
                        "subset, and write the report over all of them (an earlier file of another subset is "
                        "refused before anything is measured)")
    p.add_argument("--cudagraph", action="store_true",
                   help="time every case (baselines too) by CUDA-graph replay: GPU time without the host's "
                        "launch overhead, which dominates at decode shapes")
    return p.parse_args(argv)


# --- measurement (GPU only) --------------------------------------------------------------------------------

class Bench:
    """Times and checks each case of one shape; appends result rows."""

    def __init__(self, only: set[str], cudagraph: bool = False):
        import torch
        import triton.testing
        self.torch, self.do_bench = torch, triton.testing.do_bench
        self.cudagraph = cudagraph
        self.only = only
        self.rows: list[dict] = []
        self.compiled = None
        self.dev = "cuda"

    def time_ms(self, fn) -> float:
        fn()
        self.torch.cuda.synchronize()
        if self.cudagraph:   # replays on its own stream; no L2 flush between replays (for baselines too)
            import triton.testing
            return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
        return float(self.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def case(self, shape, kernel, fn, check, base_ms):
        """Run check() (returns (ok, description)), then time fn(). Failures become notes, not crashes."""
        if not selected(kernel, self.only):
            return None
        m, n, k = shape
        row = dict(m=m, n=n, k=k, kernel=kernel, ms=None, speedup_vs_bf16=None, ok=None, check="", note="")
        try:
            row["ok"], row["check"] = check()
            row["ms"] = self.time_ms(fn)
            if kernel == "cublas_bf16":
                row["speedup_vs_bf16"] = 1.0
            elif base_ms:         # no baseline time (it failed): no speedup, and no goal scored on this shape
                row["speedup_vs_bf16"] = base_ms / row["ms"]
        except Exception as e:  # a baseline that refuses a shape (e.g. _int_mm at M <= 16) is a result too
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        self.rows.append(row)
        status = "ok" if row["ok"] else ("FAIL" if row["ok"] is False else "-")
        ms = f"{row['ms']:.4f} ms" if row["ms"] else row["note"]
        sp = f"{row['speedup_vs_bf16']:.2f}x" if row["speedup_vs_bf16"] else ""
        print(f"  {kernel:28s} {ms:>14s} {sp:>7s} {status} {row['check']}", flush=True)
        return row

    def shape(self, m, n, k):
        torch = self.torch
        import torch.nn.functional as F
        from slimfx import kernels as K
        from slimfx.quant.numerics import absmax_scale_torch, quantize_torch
        dev, bf16 = self.dev, torch.bfloat16
        x = torch.randn(m, k, device=dev, dtype=bf16)
        w = torch.randn(n, k, device=dev, dtype=bf16) / k ** 0.5
        shp = (m, n, k)
        ref32 = (x.float() @ w.float().T)

        def rel(y, ref):
            return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))

        def close(y, ref, tol, what):
            e = rel(y, ref)
            return e <= tol, f"{what} rel err {e:.2e} <= {tol:g}"

        base = self.case(shp, "cublas_bf16", lambda: F.linear(x, w), lambda: close(F.linear(x, w), ref32, 1e-2,
                         "vs fp32"), None)
        base_ms = base["ms"]

        # W8A8: per-channel weights, per-token activations (the numerics definitions, in torch).
        ws = absmax_scale_torch(w, dim=1).reshape(n)
        wq = quantize_torch(w, ws[:, None], qmin=-127, qmax=127)
        xq, xs = K.quantize_per_token(x)
        deq_ref = (xq.float() @ wq.float().T)          # not exact in fp32 beyond 2**24: used only for tolerances

        def check_w8a8():
            rows = min(m, 64)      # exact int32 check on a slice: float64 is exact (numerics docstring)
            acc = K.int8_gemm(xq[:rows], wq, out_dtype=torch.int32)
            exact = torch.equal(acc.double(), xq[:rows].double() @ wq.double().T)
            s2 = absmax_scale_torch(x, dim=1)
            aq_exact = torch.equal(quantize_torch(x, s2, qmin=-127, qmax=127), xq) and torch.equal(s2, xs)
            y = K.int8_gemm(xq, wq, xs, ws, out_dtype=bf16)
            e = rel(y, deq_ref * xs * ws)
            return exact and aq_exact and e < 1e-2, (f"int32 exact={exact}, act-quant exact vs torch={aq_exact}, "
                                                      f"bf16 out rel err {e:.1e}")

        self.case(shp, "w8a8_fused", lambda: K.int8_gemm(xq, wq, xs, ws, out_dtype=bf16), check_w8a8, base_ms)
        from slimfx.kernels.int8_gemm import TMA_MIN_M
        if m >= TMA_MIN_M:
            for impl in ("tiled", "tma"):
                def gemm(impl=impl):
                    return K.int8_gemm(xq, wq, xs, ws, out_dtype=bf16, impl=impl)
                self.case(shp, f"w8a8_{impl}", gemm,
                          lambda gemm=gemm: close(gemm(), deq_ref * xs * ws, 1e-2, "vs dequant ref"), base_ms)

            def gluon():      # Hopper only; elsewhere the case notes the refusal
                return K.int8_gemm(xq, wq, xs, ws, out_dtype=bf16, impl="gluon")

            def check_gluon():
                same = torch.equal(gluon(), K.int8_gemm(xq, wq, xs, ws, out_dtype=bf16, impl="tiled"))
                rows = min(m, 64)
                acc = K.int8_gemm(xq[:rows], wq, out_dtype=torch.int32, impl="gluon")
                exact = torch.equal(acc.double(), xq[:rows].double() @ wq.double().T)
                return same and exact, f"bit-identical to tiled={same}, int32 exact={exact}"
            self.case(shp, "w8a8_gluon", gluon, check_gluon, base_ms)

        def w8a8_full():
            q, s = K.quantize_per_token(x)
            return K.int8_gemm(q, wq, s, ws, out_dtype=bf16)
        self.case(shp, "w8a8_fused_with_act_quant", w8a8_full, lambda: close(w8a8_full(), ref32, 0.05, "vs fp32 linear"),
                  base_ms)

        wq_t = wq.t()
        def int_mm_dequant():
            return (torch._int_mm(xq, wq_t).float() * xs * ws).to(bf16)
        self.case(shp, "torch_int_mm_dequant", int_mm_dequant,
                  lambda: close(int_mm_dequant(), deq_ref * xs * ws, 1e-2, "vs dequant ref"), base_ms)

        if self.compiled is None:
            def w8a8_dynamic(x, wq_t, ws):
                s = torch.clamp(x.float().abs().amax(dim=1, keepdim=True) / 127, min=1.1754943508222875e-38)
                q = torch.clamp(torch.round(x.float() / s), -127, 127).to(torch.int8)
                return (torch._int_mm(q, wq_t).float() * s * ws).to(torch.bfloat16)
            self.compiled = torch.compile(w8a8_dynamic, dynamic=False)
        comp = self.compiled
        self.case(shp, "torch_compile_w8a8", lambda: comp(x, wq_t, ws),
                  lambda: close(comp(x, wq_t, ws), ref32, 0.05, "vs fp32 linear"), base_ms)

        if m <= 128:
            deq_w = (wq.float() * ws[:, None])
            self.case(shp, "weight_only_int8", lambda: K.int8_weight_only_linear(x, wq, ws),
                      lambda: close(K.int8_weight_only_linear(x, wq, ws), x.float() @ deq_w.T, 1e-2,
                                    "vs dequantized-weight linear"), base_ms)
            for impl in (("gemv", "dot") if m <= K.weight_only.GEMV_MAX_M else ()):
                def wo(impl=impl):
                    return K.int8_weight_only_linear(x, wq, ws, impl=impl)
                self.case(shp, f"weight_only_int8_{impl}", wo,
                          lambda wo=wo: close(wo(), x.float() @ deq_w.T, 1e-2, "vs dequantized-weight linear"),
                          base_ms)
            p4, s4 = quantize_int4_gpu(w, 128)
            deq4 = K.weight_only.unpack_int4(p4).float().reshape(n, -1, 128) * s4[:, :, None]
            self.case(shp, "weight_only_int4", lambda: K.int4_weight_only_linear(x, p4, s4, 128),
                      lambda: close(K.int4_weight_only_linear(x, p4, s4, 128), x.float() @ deq4.reshape(n, k).T,
                                    1e-2, "vs dequantized-weight linear"), base_ms)

        try:
            self.sparse_cases(shp, x, w, base_ms, F, K)
        except ImportError as e:
            print(f"  sparse kernels unavailable: {e}")

    def sparse_cases(self, shp, x, w, base_ms, F, K):
        torch = self.torch
        m, n, k = shp
        from slimfx.kernels import block_sparse as B
        for pct in (50, 90):
            blk = B.DEFAULT_BLOCK
            wm, bsr, ref = block_masked(x, w, pct, blk)
            self.case(shp, f"block_sparse_{pct}", lambda: B.bsr_linear(x, bsr),
                      lambda: close_rel(B.bsr_linear(x, bsr), ref, 1e-2), base_ms)
            for other in (BLOCK_VARIANTS if m > 16 else ()):     # the block shape is the format's choice
                _, bsr_o, ref_o = block_masked(x, w, pct, other)
                self.case(shp, f"block_sparse_{pct}_b{other[0]}x{other[1]}", lambda b=bsr_o: B.bsr_linear(x, b),
                          lambda b=bsr_o, r=ref_o: close_rel(B.bsr_linear(x, b), r, 1e-2), base_ms)
            for impl in (("tiled", "tma") if m > 16 else ()):
                def bs(impl=impl, bsr=bsr):
                    return B.bsr_linear(x, bsr, impl=impl)
                self.case(shp, f"block_sparse_{pct}_{impl}", bs, lambda bs=bs, ref=ref: close_rel(bs(), ref, 1e-2),
                          base_ms)
            if pct == 90:
                ws = torch.clamp(wm.float().abs().amax(1) / 127, min=1e-30)
                wq = torch.round(wm.float() / ws[:, None]).clamp(-127, 127).to(torch.int8)
                bq = B.to_bsr(wq, blk)
                xq, xs = K.quantize_per_token(x)
                refq = (xq.double() @ wq.double().T).float() * xs * ws
                self.case(shp, "block_sparse_int8_90", lambda: B.bsr_int8_gemm(xq, bq, xs, ws),
                          lambda: close_rel(B.bsr_int8_gemm(xq, bq, xs, ws), refq, 1e-2), base_ms)
                if m > 16:   # the Gluon form (sm_90; elsewhere the case notes the refusal): exact vs tiled
                    def bsr_gluon():
                        return B.bsr_int8_gemm(xq, bq, xs, ws, impl="gluon")

                    def check_bsr_gluon():
                        same = torch.equal(bsr_gluon(), B.bsr_int8_gemm(xq, bq, xs, ws, impl="tiled"))
                        return same, f"bit-identical to tiled={same}"
                    self.case(shp, "block_sparse_int8_90_gluon", bsr_gluon, check_bsr_gluon, base_ms)
        from slimfx.kernels import sparse24 as S
        w24 = prune_24(w)
        vals, meta = S.compress_24(w24)
        ref = x.float() @ w24.float().T
        self.case(shp, "sparse24", lambda: S.sparse24_linear(x, vals, meta),
                  lambda: close_rel(S.sparse24_linear(x, vals, meta), ref, 1e-2), base_ms)
        for impl in (("gemv", "dot") if m <= S.GEMV_MAX_M else ()):
            def s24(impl=impl):
                return S.sparse24_linear(x, vals, meta, impl=impl)
            self.case(shp, f"sparse24_{impl}", s24, lambda s24=s24: close_rel(s24(), ref, 1e-2), base_ms)
        held = {}

        def check_torch24():   # conversion inside the case: an unsupported shape/device becomes a note
            held["w"] = torch.sparse.to_sparse_semi_structured(w24)
            return close_rel(F.linear(x, held["w"]), ref, 1e-2)
        self.case(shp, "torch_semi_structured_24", lambda: F.linear(x, held["w"]), check_torch24, base_ms)


# BSR block shapes timed beside the default at M > 16: larger ones for speed, 32x32 for accuracy (SmolLM2 with
# half its blocks removed by SparseGPT: 64x64 perplexity 4564, 32x32 1434; bench/smollm2_prune.py)
BLOCK_VARIANTS = [(128, 64), (128, 128), (32, 32)]


def block_masked(x, w, pct, blk):
    """w with pct% of its blk-blocks zeroed at random, its BSR, and the fp32 reference x @ w_masked.T."""
    import torch
    import triton
    from slimfx.kernels import block_sparse as B
    n, k = w.shape
    keep = torch.rand(triton.cdiv(n, blk[0]), triton.cdiv(k, blk[1]), device=x.device) >= pct / 100
    mask = keep.repeat_interleave(blk[0], 0).repeat_interleave(blk[1], 1)[:n, :k]
    wm = (w * mask).contiguous()
    return wm, B.to_bsr(wm, blk), x.float() @ wm.float().T


def close_rel(y, ref, tol):
    e = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    return e <= tol, f"rel err {e:.1e} <= {tol:g}"


def prune_24(w):
    """Keep the 2 largest-magnitude of every 4 along K (torch ops, on the device)."""
    import torch
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(n, k).contiguous()


def quantize_int4_gpu(w, group):
    """Symmetric int4 per group on the device (same arithmetic as weight_only.quantize_int4_grouped)."""
    import torch
    from slimfx.kernels.weight_only import pack_int4
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    s = torch.clamp(g.abs().amax(-1, keepdim=True) / 7, min=1.1754943508222875e-38)
    q = torch.clamp(torch.round(g / s), -7, 7).to(torch.int8).reshape(n, k)
    return pack_int4(q), s.reshape(n, -1).contiguous()


def autotuned_configs() -> dict:
    """{kernel: {tuning key: winning config}} for every autotuned slimfx kernel that ran (which tiles,
    split-K and stages won where: what the next tuning round starts from)."""
    import importlib
    from triton.runtime.autotuner import Autotuner
    found = {}
    for mod in ("int8_gemm", "weight_only", "block_sparse", "sparse24", "act_quant"):
        m = importlib.import_module(f"slimfx.kernels.{mod}")
        for name, obj in vars(m).items():
            if isinstance(obj, Autotuner) and obj.cache:
                found[name] = {str(key): str(cfg) for key, cfg in obj.cache.items()}
    return found


def run_gpu(args) -> tuple[list[dict], dict]:
    import torch
    import triton
    card = torch.cuda.get_device_name()
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, quick=args.quick, fake=False,
                date=datetime.datetime.now().isoformat(timespec="seconds"), provenance=provenance(card))
    bench = Bench({s for s in args.only.split(",") if s}, cudagraph=args.cudagraph)
    meta["timing"] = "CUDA-graph replay" if args.cudagraph else "eager launches"
    budget = args.budget_s if args.budget_s is not None else (150 if args.quick else 420)
    t0 = time.time()
    todo = shapes(args.quick, args.m)
    for i, (m, n, k) in enumerate(todo):
        if time.time() - t0 > budget:
            meta["skipped_shapes"] = [list(s) for s in todo[i:]]
            print(f"time budget of {budget:.0f} s spent: skipping {len(todo) - i} shapes")
            break
        print(f"M={m} N={n} K={k}  ({time.time() - t0:.0f} s)", flush=True)
        bench.shape(m, n, k)
        torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - t0, 1)
    from slimfx.kernels import _common as C
    meta["auto_choices"] = [dict(family=fam, key=list(key), chosen=c, ms=t, errors=e)
                            for (fam, key), (c, t, e) in C.fastest_choices().items()]
    meta["autotuned"] = autotuned_configs()
    return bench.rows, meta


def selected(kernel: str, only: set[str]) -> bool:
    """--only's rule: a name picks that kernel and its implementations (``block_sparse_50`` picks
    ``block_sparse_50_tma`` too, ``w8a8`` every W8A8 case); cuBLAS bf16, the baseline, always runs."""
    return not only or kernel == "cublas_bf16" or any(kernel == s or kernel.startswith(s + "_") for s in only)


def unknown_only(only: set[str]) -> list[str]:
    """The --only names that pick no kernel of the bench (a typo would time the baselines alone)."""
    names = [k for k, _ in R.KERNELS + R.VARIANTS]
    return sorted(s for s in only if not any(k == s or k.startswith(s + "_") for k in names))


def main(argv=None) -> int:
    args = parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    unknown = unknown_only(only)
    if unknown:               # a typo would time only the baselines: a GPU session spent on nothing
        print(f"bench/kernel_bench.py: --only {unknown}: no such kernel; a name picks the kernels it is, or "
              f"begins, followed by '_': {[k for k, _ in R.KERNELS + R.VARIANTS]}", file=sys.stderr)
        return 2
    try:
        picked = shapes(args.quick, args.m)
    except ValueError:
        picked = None
    if not picked:            # no shape: nothing timed, and an empty report written over the card's results
        sweep = sorted({m for m, _, _ in shapes(args.quick)})
        print(f"bench/kernel_bench.py: --m {args.m!r}: no shape of the {'quick ' if args.quick else ''}sweep has "
              f"that M; it has M in {sweep} (comma-separated integers)", file=sys.stderr)
        return 2
    timing = "CUDA-graph replay" if args.cudagraph else "eager launches"
    if args.fake:
        card = "fake-card"
    else:
        try:
            import torch
            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if not has_cuda:
            print("bench/kernel_bench.py: no CUDA device here; it measures GPU kernels and needs one "
                  "(run with --fake to exercise the report writing on the CPU)", file=sys.stderr)
            return 2
        card = torch.cuda.get_device_name()
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="kernel_bench-fake-")) if args.fake else RESULTS)
    if args.merge:            # before measuring: a GPU session should not time a sweep it cannot merge
        problem = R.merge_problem(dict(card=card, timing=timing, quick=args.quick, fake=args.fake), out_dir)
        if problem:
            print(f"bench/kernel_bench.py: {problem} (nothing was measured)", file=sys.stderr)
            return 2
    if args.fake:
        meta = dict(card=card, torch="-", triton="-", quick=args.quick, fake=True,
                    date=datetime.datetime.now().isoformat(timespec="seconds"), timing=timing)
        rows = [r for r in R.fake_results(shapes(args.quick, args.m)) if selected(r["kernel"], only)]
    else:
        rows, meta = run_gpu(args)
    tag = ""
    if args.merge:
        try:
            rows, meta = R.merge_earlier(rows, meta, out_dir)
        except ValueError as e:   # the earlier file changed while this run measured: keep what it measured
            tag = "-unmerged"
            print(f"bench/kernel_bench.py: {e}; this run's results are written unmerged, beside it, with "
                  f"'{tag}' in their names", file=sys.stderr)
    paths = R.write_all(rows, meta, out_dir, tag)
    print(R.markdown(rows, meta))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if tag else 0


if __name__ == "__main__":
    sys.exit(main())
