"""The numpy backend's exact int8 GEMM on this CPU: torch._int_mm (oneDNN, VNNI) against the float32 blocks it
replaces where measured faster (slimfx.quant.numerics.cpu_int_mm_rows), and both against the fp32 linear an
unquantized model runs on the numpy backend (numpy's sgemm, OpenBLAS; a GEMV per row at 2-4 rows of a large
weight), at the layer shapes of SmolLM2 135M, MiniLM L6 and a model 4096 wide, from decode (M = 1, 2: one sequence's
decode step, 3, 4) to prefill (M = 1024), in one process. Every int8 result is checked equal to int64
arithmetic. Writes bench/results/cpu_int8-<cpu>.json and .md.

    python bench/cpu_int8.py [--repeats 20] [--quick] [--no-save]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_name, description, median_ms, save  # noqa: E402

from slimfx.backends import numpy_ops  # noqa: E402
from slimfx.quant import numerics  # noqa: E402
from slimfx.quant.linear import quantized_linear_np  # noqa: E402

# (model, layer, N, K, row counts): out x in, as nn.Linear's weight
LAYERS = [("SmolLM2-135M", "gate/up", 1536, 576, (1, 2, 3, 4, 16, 128, 1024)),
          ("SmolLM2-135M", "down", 576, 1536, (1, 2, 4, 16, 128, 1024)),
          ("SmolLM2-135M", "lm_head", 49152, 576, (1, 2, 4, 16)),
          ("all-MiniLM-L6", "intermediate", 1536, 384, (16, 128, 1024)),
          ("Llama-like", "4096 x 4096", 4096, 4096, (1, 2, 3, 4, 16, 128))]
BASE = "fp32 linear"


def _with(flag: str, fn):
    """fn run with SLIMFX_CPU_INT_MM=flag ("1": torch._int_mm, "0": the float32 blocks)."""
    def run():
        saved = os.environ.get(numerics.CPU_INT_MM_ENV)
        os.environ[numerics.CPU_INT_MM_ENV] = flag
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ[numerics.CPU_INT_MM_ENV]
            else:
                os.environ[numerics.CPU_INT_MM_ENV] = saved
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="SmolLM2's gate/up at M = 1 and 128 only, nothing saved")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing to bench/results")
    args = p.parse_args(argv)
    layers = [(*LAYERS[0][:4], (1, 128))] if args.quick else LAYERS
    if not numerics.int_mm_exact():               # (make bench goes on to the next benchmark)
        print("torch._int_mm is not exact on this CPU (slimfx.quant.numerics.int_mm_exact): slimfx keeps the float32 "
              "blocks here, and there is nothing to compare; nothing written")
        return
    rng = np.random.default_rng(0)
    chosen = numerics.cpu_int_mm_rows()          # measured once, before anything is timed
    rows = []
    for model, layer, n, k, ms in layers:
        w_q = rng.integers(-127, 128, (n, k), dtype=np.int8)
        w32 = rng.standard_normal((n, k), dtype=np.float32)
        w_s = rng.random(n, dtype=np.float32) * 0.01
        for m in ms:
            x = rng.standard_normal((m, k), dtype=np.float32)
            a = rng.integers(-128, 128, (m, k), dtype=np.int8)
            want = (a.astype(np.int64) @ w_q.astype(np.int64).T).astype(np.int32)
            for flag in ("1", "0"):
                got = _with(flag, lambda: numerics.int_matmul_np(a, w_q))()
                if not np.array_equal(got, want):
                    raise SystemExit(f"{model} {layer} M={m}: int8 GEMM (SLIMFX_CPU_INT_MM={flag}) is not exact")
            t = {"fp32 sgemm": median_ms(lambda: x @ w32.T, args.repeats),
                 BASE: median_ms(lambda: numpy_ops.linear(x, w32), args.repeats),
                 "int8 blocks": median_ms(_with("0", lambda: numerics.int_matmul_np(a, w_q)), args.repeats),
                 "int8 _int_mm": median_ms(_with("1", lambda: numerics.int_matmul_np(a, w_q)), args.repeats),
                 "W8A8 linear, blocks": median_ms(_with("0", lambda: quantized_linear_np(x, w_q, w_s)), args.repeats),
                 "W8A8 linear, _int_mm": median_ms(_with("1", lambda: quantized_linear_np(x, w_q, w_s)),
                                                   args.repeats)}
            rows.append({"model": model, "layer": layer, "M": m, "N": n, "K": k, "ms": t})
            print(f"{model:14s} {layer:13s} M={m:5d}  " + "  ".join(f"{c} {v:.3f}" for c, v in t.items()), flush=True)
    cpu = cpu_name()
    cols = list(rows[0]["ms"])
    md = [f"# Exact int8 GEMM on the CPU: {cpu}", "",
          f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          f"`python bench/cpu_int8.py --repeats {args.repeats}` (median ms of {args.repeats} calls each, warmed up).",
          "", "`fp32 sgemm`: numpy's fp32 `x @ w.T` (OpenBLAS, its threads). `fp32 linear`: what an unquantized "
          "model's linear runs on the numpy backend (`slimfx.backends.numpy_ops.linear`): that GEMM, or one GEMV per "
          f"row at 2 rows of a weight of {numpy_ops.GEMV_MIN_BYTES >> 20} MB or more (at up to "
          f"{numpy_ops.GEMV_ROWS} rows of one of up to {numpy_ops.GEMV_CACHED_BYTES >> 20} MB), where OpenBLAS's GEMM "
          "is slow. `int8 blocks`: the exact int8 GEMM as float32 blocks of K <= 1024 "
          "(numpy sgemm; the weight converted to fp32 a cache-sized chunk of rows at a time at <= 16 rows). "
          "`int8 _int_mm`: torch._int_mm on one torch thread. `W8A8 linear`: the whole dynamic per-token linear "
          "(quantize the rows, the int8 GEMM, scale to fp32). Each cell: ms (speedup over fp32 linear). Every int8 "
          "result equals int64 arithmetic.", "",
          ("Forced by SLIMFX_CPU_INT_MM" if os.environ.get(numerics.CPU_INT_MM_ENV, "").strip() else
           "This machine's measured choice") + " (`slimfx.quant.numerics.cpu_int_mm_rows()`) for the numpy backend: "
          "torch._int_mm " + ("for every row count" if chosen >= 2**31 else f"up to {chosen} rows" if chosen else
                              "never") + ".", "",
          "| model | layer | M | N | K | " + " | ".join(cols) + " |",
          "|---|---|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        base = r["ms"][BASE]
        cells = [f"{v:.3f}" if c == BASE else f"{v:.3f} ({base / v:.2f}x)" for c, v in r["ms"].items()]
        md.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    text = "\n".join(md)
    print(text)
    if not (args.no_save or args.quick):
        save("cpu_int8", cpu, {"rows": rows, "cpu_int_mm_rows": chosen, "repeats": args.repeats}, text)


if __name__ == "__main__":
    main()
