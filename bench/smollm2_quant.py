"""SmolLM2-135M perplexity under slimfx quantization vs fp32 and torch.ao's quantize_dynamic, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_quant.py [--tokens 4096] [--window 256] [--modes w4g64,...]

Held-out text: pydoc_data prose from offset 200000 (calibration uses a different stretch, offset 20000).
The compiled graphs run on backend="torch": the simulated graph, where each slimfx dialect op runs its torch
reference (same integer arithmetic as the numpy backend, which agrees bit for bit on quantized_linear and is
much slower on a 30-layer model). lm_head (tied to the embeddings) is left in fp32 in every slimfx mode.
int4 groups are 64 or 32 wide (SmolLM2's K = 576 is not a multiple of 128); "GPTQ" rows choose the integers
by ``Quantize(method="gptq")`` from the same calibration windows.
Writes bench/results/smollm2_quant-<cpu>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimfx  # noqa: E402
from bench.common import cpu_name, description, save  # noqa: E402
from bench.models import english_text, load_smollm2  # noqa: E402
from slimfx.passes import Quantize, SmoothQuant  # noqa: E402


def perplexity(run, windows) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = run(ids)
            lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def text_windows(tok, tokens: int, window: int, calib: int) -> tuple[list, list]:
    """Held-out windows (``tokens`` of pydoc_data prose from offset 200000, ``window`` each) and ``calib``
    calibration windows from another stretch (offset 20000), as Quantize's calibration items."""
    ids = tok(english_text(tokens * 8, offset=200000), return_tensors="pt").input_ids[0][:tokens]
    windows = [ids[i:i + window][None] for i in range(0, len(ids) - window + 1, window)]
    cal_ids = tok(english_text(calib * window * 8, offset=20000), return_tensors="pt").input_ids[0]
    return windows, [dict(input_ids=cal_ids[i * window:(i + 1) * window][None]) for i in range(calib)]


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--modes", default="all", help="comma-separated keys of the modes to run (default: all)")
    ap.add_argument("--name", default="smollm2_quant", help="results file stem (a subset run should not "
                                                             "overwrite the full table)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    windows, calibration = text_windows(tok, a.tokens, a.window, a.calib)
    kw = dict(input_ids=windows[0], use_cache=False)
    skip = ("lm_head",)
    w4 = lambda g, method, **kw: [Quantize(weights="int4", group_size=g, method=method, exclude=skip, **kw)]
    modes = {
        "w8": ("W8A16 (int8 per-channel weights)", [Quantize(weights="int8", exclude=skip)]),
        "w8a8": ("W8A8 dynamic (per-token act.)", [Quantize(weights="int8", activations="dynamic", exclude=skip)]),
        "w8a8-sq": (f"W8A8 dynamic + SmoothQuant a={a.alpha}",
                    [SmoothQuant(alpha=a.alpha, exclude=skip),
                     Quantize(weights="int8", activations="dynamic", exclude=skip)]),
        "w8a8-gptq": ("W8A8 dynamic, GPTQ weights",
                      [Quantize(weights="int8", activations="dynamic", method="gptq", exclude=skip)]),
        "w8a8-sq-gptq": (f"W8A8 dynamic + SmoothQuant a={a.alpha}, GPTQ weights",
                         [SmoothQuant(alpha=a.alpha, exclude=skip),
                          Quantize(weights="int8", activations="dynamic", method="gptq", exclude=skip)]),
        "w8a8-static": ("W8A8 static per-tensor + SmoothQuant",
                        [SmoothQuant(alpha=a.alpha, exclude=skip),
                         Quantize(weights="int8", activations="static", exclude=skip)]),
        "w4g64": ("W4A16 groups of 64, round to nearest", w4(64, "rtn")),
        "w4g64-gptq-noact": ("W4A16 groups of 64, GPTQ in column order", w4(64, "gptq", act_order=False)),
        "w4g64-gptq": ("W4A16 groups of 64, GPTQ (act_order)", w4(64, "gptq")),
        "w4g64-gptq-seq": ("W4A16 groups of 64, GPTQ (act_order, sequential)", w4(64, "gptq", sequential=True)),
        "w4g64-clip": ("W4A16 groups of 64, round to nearest, clip search", w4(64, "rtn", clip=True)),
        "w4g64-awq": ("W4A16 groups of 64, AWQ + clip search", w4(64, "rtn", clip=True, awq=True)),
        "w4g64-awq-nomul": ("W4A16 groups of 64, AWQ (folded scales only) + clip search",
                            w4(64, "rtn", clip=True, awq=True, awq_insert_mul=False)),
        "w4g64-gptq-clip": ("W4A16 groups of 64, GPTQ (act_order) + clip search", w4(64, "gptq", clip=True)),
        "w4g64-awq-gptq": ("W4A16 groups of 64, AWQ + GPTQ (act_order) + clip search",
                           w4(64, "gptq", clip=True, awq=True)),
        "w4g32": ("W4A16 groups of 32, round to nearest", w4(32, "rtn")),
        "w4g32-gptq": ("W4A16 groups of 32, GPTQ (act_order)", w4(32, "gptq")),
        "w4g32-awq": ("W4A16 groups of 32, AWQ + clip search", w4(32, "rtn", clip=True, awq=True)),
        "w4g32-awq-gptq": ("W4A16 groups of 32, AWQ + GPTQ (act_order) + clip search",
                           w4(32, "gptq", clip=True, awq=True)),
    }
    keys = list(modes) + ["torchao"] if a.modes == "all" else a.modes.split(",")
    unknown = set(keys) - set(modes) - {"torchao"}
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {list(modes) + ['torchao']}")
    rows = []
    t0 = time.perf_counter()
    fp32 = perplexity(lambda x: model(input_ids=x, use_cache=False).logits, windows)
    rows.append({"mode": "fp32", "ppl": fp32, "seconds": time.perf_counter() - t0, "weight_ratio": 1.0})
    print(f"fp32: {fp32:.3f}", flush=True)
    captured = slimfx.capture(model, (), kw, dynamic=True)          # once: every mode compiles from it
    for name, passes in (modes[k] for k in keys if k in modes):
        t0 = time.perf_counter()
        cm = slimfx.compile(captured, passes=passes, backend="torch", calibration=calibration, progress=False,
                            measure=False)
        stats = cm.report().records[-1].stats
        ppl = perplexity(lambda x: cm(input_ids=x, use_cache=False).logits, windows)
        rows.append({"mode": name, "ppl": ppl, "seconds": time.perf_counter() - t0,
                     "weight_ratio": stats["ratio"], "layers": stats["layers"],
                     **({"gptq_error_vs_rtn": stats["gptq_error_vs_rtn"]} if "gptq_error_vs_rtn" in stats else {})})
        print(f"{name}: {ppl:.3f}", flush=True)
    t0 = time.perf_counter()
    try:
        if "torchao" not in keys:
            raise LookupError("not asked for")
        qm = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        ppl = perplexity(lambda x: qm(input_ids=x, use_cache=False).logits, windows)
        rows.append({"mode": "torch.ao quantize_dynamic (all Linear, incl. lm_head)", "ppl": ppl,
                     "seconds": time.perf_counter() - t0, "weight_ratio": None})
    except LookupError:
        pass
    except Exception as e:  # no quantized engine
        rows.append({"mode": f"torch.ao quantize_dynamic: failed ({type(e).__name__})", "ppl": None})
    for r in rows:
        r["vs_fp32"] = None if r.get("ppl") is None else r["ppl"] / fp32 - 1
    cpu = cpu_name()
    head = (f"SmolLM2-135M perplexity, {len(windows)} windows x {a.window} tokens of held-out pydoc_data prose, "
            f"{a.calib} calibration windows; slimfx graphs on backend='torch' (dialect torch references); "
            f"lm_head fp32 in slimfx modes; {cpu}")
    lines = [head, "", "| mode | perplexity | vs fp32 | quantized weight bytes / fp32 | seconds |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ppl = "-" if r.get("ppl") is None else f"{r['ppl']:.3f}"
        vs = "-" if r.get("vs_fp32") is None else f"{r['vs_fp32'] * 100:+.2f}%"
        wr = "-" if r.get("weight_ratio") is None else f"{r['weight_ratio']:.3f}"
        lines.append(f"| {r['mode']} | {ppl} | {vs} | {wr} | {r.get('seconds', 0):.1f} |")
    md = "\n".join(lines)
    print(md)
    save(a.name, cpu, {"cpu": cpu, "tokens": len(windows) * a.window, "window": a.window,
                                "calibration_windows": a.calib, "alpha": a.alpha, "backend": "torch",
                                "rows": rows}, md)

if __name__ == "__main__":
    main()
