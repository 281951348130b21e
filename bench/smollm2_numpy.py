"""SmolLM2-135M (LlamaForCausalLM, 30 layers, GQA 9/3) through slimfx on the numpy backend: one dynamic
compile, two (batch, seq) shapes with left padding, logits vs torch fp32, latency vs torch eager, and
perplexity on English text both ways. Writes bench/results/smollm2_numpy-<cpu>.json and .md.

    python bench/smollm2_numpy.py
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, description, median_ms, save  # noqa: E402
from models import english_text, load_smollm2  # noqa: E402

import slimfx  # noqa: E402
from slimfx.ir.printer import format_table  # noqa: E402


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                             ids[:, 1:].reshape(-1))
    return math.exp(loss.item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)

    t = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t
    tok.padding_side = "left"
    prompts = ["The quick brown fox jumps over the lazy dog because", "Compilers turn programs into"]
    enc = tok(prompts, padding=True, return_tensors="pt")
    kw = lambda e: dict(input_ids=e.input_ids, attention_mask=e.attention_mask, use_cache=False)

    t = time.perf_counter()
    cm = slimfx.compile(model, (), kw(enc), dynamic=True, passes=list(slimfx.passes.CLEANUP), backend="numpy",
                        measure=False, progress=False)
    compile_s = time.perf_counter() - t

    rows, res = [], {"cpu": cpu_name(), "torch": torch.__version__, "load_s": load_s, "compile_s": compile_s,
                     "shapes": []}
    text_ids = tok(english_text(6000), return_tensors="pt").input_ids[:, :256]
    batches = [("prompts, left-padded", enc.input_ids, enc.attention_mask),
               ("English text", text_ids, torch.ones_like(text_ids))]
    for name, ids, mask in batches:
        e = dict(input_ids=ids, attention_mask=mask, use_cache=False)
        with torch.no_grad():
            ref = model(**e).logits
        out = cm(**e).logits
        rel = float((out - ref).abs().max() / ref.abs().max())
        with torch.no_grad():
            eager_ms = median_ms(lambda: model(**e), a.repeats, warmup=1)
        numpy_ms = median_ms(lambda: cm(**e), a.repeats, warmup=1)
        ppl = (perplexity(ref, ids), perplexity(out, ids)) if name == "English text" else None
        res["shapes"].append({"what": name, "shape": list(ids.shape), "max_rel_err": rel, "eager_ms": eager_ms,
                              "numpy_ms": numpy_ms, "ppl_torch_numpy": ppl})
        rows.append([name, f"{tuple(ids.shape)}", f"{rel:.1e}", f"{eager_ms:.0f}", f"{numpy_ms:.0f}",
                     f"{numpy_ms / eager_ms:.2f}x", "" if ppl is None else f"{ppl[0]:.3f} / {ppl[1]:.3f}"])
    md = (f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), {res['cpu']}, torch {torch.__version__}; "
          f"load {load_s:.1f} s, compile (export + clean-up + lower, dynamic shapes) {compile_s:.1f} s\n\n"
          + format_table(["input", "shape", "max rel err", "eager ms", "numpy ms", "numpy/eager",
                          "perplexity torch / numpy"], rows, "lrrrrrr"))
    print(md)
    if not a.no_save:
        save("smollm2_numpy", res["cpu"], res, md)


if __name__ == "__main__":
    main()
