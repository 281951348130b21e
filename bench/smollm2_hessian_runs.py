"""Hessians in runs on a real model: SmolLM2-135M's GPTQ and SparseGPT with all Hessians at once and with
``quant_calibration.HESSIAN_BYTES`` lowered so that they are gathered in runs; the integers (weights) must be
the same, only the time differs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_hessian_runs.py [--cap-mib 64]

SmolLM2's 210 layer inputs need ~0.8 GB of fp64 Hessians: one run under the default 2 GiB cap. Writes
bench/results/smollm2_hessian_runs-<cpu>.json and .md (~6 minutes on 2 cores; --out-dir and --name move them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimfx  # noqa: E402
from bench.common import RESULTS, cpu_name, description, save  # noqa: E402
from bench.models import load_smollm2  # noqa: E402
from bench.smollm2_quant import text_windows  # noqa: E402
from slimfx.passes import Prune, Quantize, quant_calibration  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--cap-mib", type=int, default=64, help="the lowered HESSIAN_BYTES, in MiB")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 256 tokens")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where to write (default: bench/results)")
    ap.add_argument("--name", default="smollm2_hessian_runs", help="results file stem (before the CPU name)")
    a = ap.parse_args()
    model, tok = load_smollm2()
    windows, calibration = text_windows(tok, 512, 256, a.calib)
    cap = slimfx.capture(model, (), dict(input_ids=windows[0], use_cache=False), dynamic=True)
    skip = ("lm_head",)
    methods = {"GPTQ W4 g64": lambda: Quantize(weights="int4", group_size=64, method="gptq", exclude=skip),
               "SparseGPT 2:4": lambda: Prune(pattern="2:4", method="sparsegpt", exclude=skip)}

    def weights(cm):
        g = cm.graph
        return {n.target: getattr(g, n.target) for n in g.graph.nodes
                if n.op == "get_attr" and ("_w_q" in n.target or "weight_pruned" in n.target)}
    default, rows = quant_calibration.HESSIAN_BYTES, []
    for label, make in methods.items():
        got = {}
        for cap_bytes in (default, a.cap_mib << 20):
            quant_calibration.HESSIAN_BYTES = cap_bytes
            t = time.perf_counter()
            cm = slimfx.compile(cap, passes=[make()], backend="torch", calibration=calibration, progress=False)
            seconds = time.perf_counter() - t
            stats = cm.report().records[0].stats
            got[cap_bytes] = (weights(cm), seconds, stats.get("hessian_runs", 1))
        quant_calibration.HESSIAN_BYTES = default
        (w1, s1, _), (w2, s2, runs) = got[default], got[a.cap_mib << 20]
        equal = sum(torch.equal(w1[k], w2[k]) for k in w1)
        rows.append({"method": label, "tensors": len(w1), "equal": int(equal), "runs": runs,
                     "seconds_one_run": round(s1, 1), "seconds_runs": round(s2, 1)})
        print(rows[-1], flush=True)
    cpu = cpu_name()
    lines = [f"SmolLM2-135M, {a.calib} calibration windows of 256 tokens, all Hessians at once (2 GiB cap) vs a "
             f"{a.cap_mib} MiB cap; {cpu}. `HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_hessian_runs.py`", "",
             "| method | tensors | bit-equal | runs | seconds, one run | seconds, in runs |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['tensors']} | {r['equal']} | {r['runs']} | {r['seconds_one_run']} | "
              f"{r['seconds_runs']} |" for r in rows]
    md = "\n".join(lines)
    print(md)
    save(a.name, cpu, {"cpu": cpu, "cap_mib": a.cap_mib, "calibration_windows": a.calib, "rows": rows}, md,
         a.out_dir)


if __name__ == "__main__":
    main()
