"""Saving and loading a compressed SmolLM2-135M: file sizes, times, and that the loaded model's outputs are
the compiled model's, bit for bit.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_save.py

Per mode (W8A8 dynamic + fuse, W4 groups of 64 by GPTQ): load the GGUF model, compile (backend="torch"),
``cm.save`` to a temporary folder, ``slimfx.load`` it, compare logits on a held-out window. Writes
bench/results/smollm2_save-<cpu>.json and .md (--out-dir and --name move them).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimfx  # noqa: E402
from bench.common import RESULTS, cpu_name, save  # noqa: E402
from bench.models import english_text, load_smollm2  # noqa: E402
from slimfx.passes import Fuse, Quantize  # noqa: E402


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where to write (default: bench/results)")
    ap.add_argument("--name", default="smollm2_save", help="results file stem (before the CPU name)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_model_s = time.perf_counter() - t0
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    ids = tok(english_text(20000, offset=200000), return_tensors="pt").input_ids[0]
    example, held_out = ids[:256][None], ids[256:512][None]
    cal = tok(english_text(20000, offset=20000), return_tensors="pt").input_ids[0]
    calibration = [dict(input_ids=cal[i * 256:(i + 1) * 256][None]) for i in range(8)]
    modes = {"W8A8 dynamic + Fuse": [Quantize(weights="int8", activations="dynamic", exclude="lm_head"), Fuse()],
             "W4A16 groups of 64, GPTQ": [Quantize(weights="int4", group_size=64, method="gptq", exclude="lm_head")]}
    rows = []
    for name, passes in modes.items():
        t0 = time.perf_counter()
        cm = slimfx.compile(model, (), dict(input_ids=example, use_cache=False), passes=passes, dynamic=True,
                            backend="torch", calibration=calibration, progress=False, measure=False)
        compile_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = cm.save(tmp)
            save_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = slimfx.load(path)
            load_s = time.perf_counter() - t0
            same = torch.equal(loaded(input_ids=held_out, use_cache=False).logits,
                               cm(input_ids=held_out, use_cache=False).logits)
            rows.append({"mode": name, "tensors_mb": (path / "tensors.safetensors").stat().st_size / 1e6,
                         "json_mb": (path / "slimfx.json").stat().st_size / 1e6, "save_s": save_s, "load_s": load_s,
                         "compile_s": compile_s, "identical": same})
        print(rows[-1], flush=True)
    cpu = cpu_name()
    lines = [f"SmolLM2-135M saved by slimfx and loaded back (backend='torch'); the model in fp32: {fp32_mb:.0f} MB "
             f"(loading the GGUF took {load_model_s:.0f} s); lm_head (tied to the embeddings) stays fp32; {cpu}", "",
             "| mode | tensors.safetensors MB | vs fp32 | slimfx.json MB | compile s | save s | load s | "
             "outputs identical |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['tensors_mb']:.1f} | {r['tensors_mb'] / fp32_mb:.3f}x | {r['json_mb']:.2f} | "
                     f"{r['compile_s']:.1f} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['identical']} |")
    md = "\n".join(lines)
    print(md)
    save(a.name, cpu, {"cpu": cpu, "fp32_mb": fp32_mb, "load_gguf_s": load_model_s, "rows": rows}, md, a.out_dir)


if __name__ == "__main__":
    main()
