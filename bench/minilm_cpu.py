"""MiniLM on the CPU: compile time (capture + clean-up passes) and numpy-backend latency against torch eager,
batch 8 x seq 128, measured in one process, and the same model quantized W8A8 (dynamic per token) on numpy
against fp32 on numpy. Writes bench/results/minilm_cpu-<cpu>.json and .md.

    python bench/minilm_cpu.py [--batch 8] [--seq 128] [--repeats 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, description, paired_median_ms, save  # noqa: E402
from models import load_minilm  # noqa: E402

import slimfx  # noqa: E402
from slimfx.ir.printer import format_table  # noqa: E402


# torch profiler names -> the ATen op the numpy backend runs for the same work
_TORCH_OPS = {"aten::addmm": "aten.linear.default", "aten::mm": "aten.linear.default",
              "aten::_scaled_dot_product_flash_attention_for_cpu": "aten.scaled_dot_product_attention.default",
              "aten::gelu": "aten.gelu.default", "aten::native_layer_norm": "aten.layer_norm.default",
              "aten::add": "aten.add.Tensor", "aten::copy_": "(copies)"}


def op_breakdown(model, kwargs, cm, repeats: int) -> dict:
    """{op: (torch ms, numpy ms)} per forward, for the ops that take the time."""
    from torch.profiler import ProfilerActivity, profile

    from slimfx.ir import flatten_inputs
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            model(**kwargs)
    torch_ms: dict = {}
    for e in prof.key_averages():
        if e.key in _TORCH_OPS:
            name = _TORCH_OPS[e.key]
            torch_ms[name] = torch_ms.get(name, 0.0) + e.self_cpu_time_total / 1e3 / repeats
    timings: dict = {}
    program = cm._executable.program
    flat = flatten_inputs(cm.graph, (), kwargs)
    for _ in range(repeats):
        program.run(flat, timings)
    names = sorted(set(torch_ms) | {k for k, v in timings.items() if v / repeats > 1e-3},
                   key=lambda k: -timings.get(k, 0.0))
    return {k: (torch_ms.get(k, 0.0), timings.get(k, 0.0) * 1e3 / repeats) for k in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-save", action="store_true", help="print only; write nothing to bench/results")
    a = ap.parse_args(argv)

    model, _ = load_minilm()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, a.seq // 2:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask)

    t0 = time.perf_counter()
    cm = slimfx.compile(model, (), kwargs, dynamic=True, passes=list(slimfx.passes.CLEANUP), backend="numpy",
                        measure=False, progress=False)
    compile_s = time.perf_counter() - t0
    rep = cm.report()

    with torch.no_grad():
        ref = model(**kwargs).last_hidden_state
    out = cm(**kwargs).last_hidden_state
    rel = float((out - ref).abs().max() / ref.abs().max())

    def eager():
        with torch.no_grad():
            model(**kwargs)

    eager_ms, numpy_ms = paired_median_ms(eager, lambda: cm(**kwargs), a.repeats // 3 + 1)
    res = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "batch": a.batch, "seq": a.seq, "capture_s": rep.capture_s,
           "passes_s": sum(r.seconds for r in rep.records), "lower_s": rep.lower_s, "compile_s": compile_s,
           "torch_eager_ms": eager_ms, "numpy_backend_ms": numpy_ms, "numpy_over_eager": numpy_ms / eager_ms,
           "max_rel_err": rel}
    rows = [["compile (capture + clean-up + lower)", f"{compile_s:.2f} s", "goal <= 10 s"],
            ["  capture (torch.export + canonicalize)", f"{rep.capture_s:.2f} s", ""],
            ["  passes (const_fold, cse, dce)", f"{res['passes_s']:.2f} s", ""],
            ["torch eager latency", f"{eager_ms:.1f} ms", "baseline"],
            ["numpy backend latency", f"{numpy_ms:.1f} ms", f"{numpy_ms / eager_ms:.2f}x eager (goal <= 1.5x)"],
            ["numpy vs torch max rel err", f"{rel:.1e}", "bound 1e-4"]]
    cq = slimfx.compile(model, (), kwargs, dynamic=True, backend="numpy", measure=False, progress=False,
                        passes=[slimfx.passes.Quantize(weights="int8", activations="dynamic"), *slimfx.passes.CLEANUP])
    q_out = cq(**kwargs).last_hidden_state
    from slimfx.quant import numerics
    fp32_ms, w8a8_ms = paired_median_ms(lambda: cm(**kwargs), lambda: cq(**kwargs), a.repeats // 3 + 1)
    sqnr = float(10 * torch.log10(ref.pow(2).sum() / (q_out - ref).pow(2).sum()))
    gemm = numerics.cpu_int8_gemm(model.config.hidden_size)
    res.update({"numpy_fp32_ms_paired": fp32_ms, "numpy_w8a8_ms": w8a8_ms, "w8a8_sqnr_db": sqnr, "int8_gemm": gemm})
    rows += [["numpy backend W8A8 dynamic latency", f"{w8a8_ms:.1f} ms",
              f"{fp32_ms / w8a8_ms:.2f}x numpy fp32's {fp32_ms:.1f} ms (timed with it); int8 GEMM: {gemm}"],
             ["W8A8 vs torch fp32 SQNR", f"{sqnr:.1f} dB", "last hidden state"]]
    ops = op_breakdown(model, kwargs, cm, a.repeats)
    res["ops_ms"] = ops
    md = (f"MiniLM-L6 (all-MiniLM-L6-v2), batch {a.batch} x seq {a.seq}, {res['cpu']}, "
          f"{res['threads']} torch threads, torch {torch.__version__}\n\n"
          + format_table(["what", "measured", "note"], rows)
          + "\n\nWhere the time goes, ms per forward (torch: its profiler's self time; numpy: per op):\n\n"
          + format_table(["op", "torch eager", "numpy backend"],
                         [[k, f"{t:.1f}", f"{n:.1f}"] for k, (t, n) in ops.items()], "lrr"))
    print(md)
    if not a.no_save:
        save("minilm_cpu", res["cpu"], res, md)


if __name__ == "__main__":
    main()
