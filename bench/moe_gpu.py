"""Mixture-of-experts layers with int8 and int4 experts on a GPU: slimfx's grouped weight-only kernels against
the baselines, in one process.

    python bench/moe_gpu.py [--out-dir DIR]      # a GPU: Mixtral-8x7B-shaped expert GEMMs (E=8, top-2)
    python bench/moe_gpu.py --smoke              # no GPU: tiny shapes under TRITON_INTERPRET (tests the script)

Per case (tokens S = routed rows, i.e. batch x top-k; N x K one projection of every expert):
  bf16 grouped   the float model's path: torch._grouped_mm over bf16 experts (transformers' grouped_mm on a
                 GPU), or its per-expert fallback where _grouped_mm is missing
  dequant+grouped what a Quantize'd graph did before the kernel: every expert dequantized to bf16 at each
                 call, then the same grouped GEMM
  int8 grouped   int8_grouped_weight_only (slimfx.kernels.grouped_weight_only): int8 experts read directly
  int4 grouped   int4_grouped_weight_only: int4 experts in groups of 128 along K, packed two per byte
  int4 dequant+grouped  the int4 graph's path before the kernel (unpack, dequantize, bf16 grouped GEMM)
Medians by triton.testing.do_bench (do_bench_cudagraph with --cudagraph; --smoke: one time.perf_counter call,
labelled so); each output checked against an fp32 reference on the same inputs. Writes
bench/results/moe-<card>.json and .md (--out-dir moves; --smoke writes only where --out-dir names a folder, as
moe-cpu-interpreter-smoke.*).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import RESULTS, description  # noqa: E402
from llama_gpu import SMOKE_TIMING, write_results  # noqa: E402

CASES = [(2, 14336, 4096), (2, 4096, 14336), (32, 14336, 4096), (512, 14336, 4096), (4096, 14336, 4096)]
SMOKE = [(2, 40, 64), (9, 24, 96)]      # K a multiple of the smoke run's int4 group (32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes on the interpreter")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along K")
    p.add_argument("--cudagraph", action="store_true", help="time by CUDA-graph replay")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where to write (default: bench/results; --smoke writes only where this names a folder)")
    return p.parse_args(argv)


def routing(s: int, e: int, gen, dev):
    """offs for S routed rows spread over E experts as top-k routing would (random counts, some empty)."""
    import torch
    cut = torch.sort(torch.randint(0, s + 1, (e - 1,), generator=gen)).values
    return torch.cat([cut, torch.tensor([s])]).to(torch.int32).to(dev)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton.testing
    from slimfx import kernels as K
    sf = torch.ops.slimfx
    if not args.smoke and not torch.cuda.is_available():
        print("bench/moe_gpu.py: no CUDA device here (--smoke runs tiny shapes on the CPU interpreter)",
              file=sys.stderr)
        return 2
    dev = "cpu" if args.smoke else "cuda"
    card = "cpu (interpreter smoke)" if args.smoke else torch.cuda.get_device_name()
    timing = SMOKE_TIMING if args.smoke else \
        f"median of triton.testing.do_bench{'_cudagraph (CUDA-graph replay)' if args.cudagraph else ''}"
    grouped = getattr(torch, "_grouped_mm", None)
    from transformers.integrations.moe import _grouped_mm_fallback

    def timer(fn):
        if args.smoke:
            import time
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        if args.cudagraph:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        return triton.testing.do_bench(fn, return_mode="median")

    rows = []
    gen = torch.Generator().manual_seed(0)
    e = args.experts
    for s, n, k in (SMOKE if args.smoke else CASES):
        x = torch.randn(s, k, generator=gen).to(torch.bfloat16).to(dev)
        w = torch.randint(-127, 128, (e, n, k), generator=gen, dtype=torch.int8).to(dev)
        sc = (torch.rand(e, n, generator=gen) * 0.02 + 1e-3).to(dev)
        offs = routing(s, e, gen, dev)
        w_bf = (w.float() * sc[:, :, None]).to(torch.bfloat16).transpose(1, 2)       # (E, K, N) view
        ref = _grouped_mm_fallback(x.float(), w_bf.float(), offs)
        gs = 32 if args.smoke else args.group_size
        q4 = torch.randint(-8, 8, (e, n, k), generator=gen, dtype=torch.int8).to(dev)
        sc4 = (torch.rand(e, n, k // gs, 1, generator=gen) * 0.1 + 1e-3).to(dev)
        p4 = K.pack_int4_experts(q4)
        w4_bf = (q4.float().view(e, n, k // gs, gs) * sc4).view(e, n, k).to(torch.bfloat16).transpose(1, 2)
        ref4 = _grouped_mm_fallback(x.float(), w4_bf.float(), offs)
        gemm = (lambda a, b: grouped(a, b, offs=offs)) if grouped is not None and dev == "cuda" else \
            (lambda a, b: _grouped_mm_fallback(a, b, offs))

        def bf16():
            return gemm(x, w_bf)

        def dequant():
            return gemm(x, sf.dequantize.default(w, sc[:, :, None], None).to(torch.bfloat16).transpose(1, 2))

        def ours():
            return K.int8_grouped_weight_only(x, w, sc, offs)

        def dequant4():
            codes = K.unpack_int4_experts(p4).view(e, n, k // gs, gs)
            return gemm(x, sf.dequantize.default(codes, sc4, None).view(e, n, k).to(torch.bfloat16).transpose(1, 2))

        def ours4():
            return K.int4_grouped_weight_only(x, p4, sc4, gs, offs)

        row = {"S": s, "N": n, "K": k, "E": e, "group_size": gs}
        for name, fn, want in (("bf16_grouped", bf16, ref), ("dequant_grouped", dequant, ref),
                               ("int8_grouped", ours, ref), ("int4_dequant_grouped", dequant4, ref4),
                               ("int4_grouped", ours4, ref4)):
            try:
                y = fn().float()
                err = float((y - want).abs().max() / want.abs().max().clamp(min=1e-30))
                row[name] = {"ms": timer(fn), "rel_err": err, "ok": err < 2e-2}   # bf16 output: ~2^-8 relative
            except Exception as ex:      # a baseline this torch lacks is a note, not a crash
                row[name] = {"error": f"{type(ex).__name__}: {ex}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(card=card, torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
                experts=e, group_size=rows[0]["group_size"], smoke=args.smoke, timing=timing)
    head = (f"# MoE expert GEMMs, int8 and int4 experts: {card}\n\ntorch {meta['torch']}, {meta['date']}, E = {e}, "
            f"int4 groups of {meta['group_size']}. Cells: ms ({timing}) and speedup vs bf16 grouped; `!` marks an "
            "output off the fp32 reference.\n")
    cols = ("bf16_grouped", "dequant_grouped", "int8_grouped", "int4_dequant_grouped", "int4_grouped")
    lines = [head, "| S | N | K | bf16 grouped | int8: dequant + grouped | int8 grouped (ours) | int4: dequant + grouped "
                   "| int4 grouped (ours) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = r["bf16_grouped"].get("ms")
        cell = lambda c: ("- (" + c["error"].split(":")[0] + ")") if "error" in c else \
            f"{c['ms']:.4f}{'' if c['ok'] else ' !'}" + (f" ({base / c['ms']:.2f}x)" if base else "")
        lines.append(f"| {r['S']} | {r['N']} | {r['K']} | " + " | ".join(cell(r[c]) for c in cols) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.smoke or args.out_dir:
        write_results(args.out_dir or RESULTS, "moe", meta, rows, md)
    bad = [r for r in rows if not (r["int8_grouped"].get("ok") and r["int4_grouped"].get("ok"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
