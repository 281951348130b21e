"""SmolLM2-135M perplexity after pruning, and after distillation from the unpruned model, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_prune.py [--steps 60] [--lr 3e-4] [--modes 2:4,neurons]
        [--score magnitude | --method sparsegpt] [--name STEM]

Modes: 2:4, unstructured, block (64x64), block32, block16, neurons, heads, query_heads.

Per mode: Prune alone (weights scored by |w| x their input's RMS over the training windows, the default;
``--score magnitude``: |w| alone; ``--method sparsegpt``: SparseGPT, for 2:4, unstructured and blocks (64x64,
32x32, 16x16: blocks chosen by the output error of removing each, the rest re-fit), with the training windows
as calibration), then Prune + Distill (the same pruning, then ``--steps`` AdamW steps on T^2 KL to the fp32
model's logits over pydoc_data prose from offset 20000, one window per step, zeros held fixed). Perplexity
on held-out prose from offset 200000 (as bench/smollm2_quant.py). Every linear of the 30 blocks is pruned
(or, structured, every MLP / attention block shrinks); lm_head (tied to the embeddings) is neither pruned nor
trained. Graphs run on backend="torch". Writes bench/results/<STEM>-<cpu>.json and .md (STEM by default
smollm2_prune[-magnitude|-sparsegpt]).
"""
from __future__ import annotations

import argparse
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
from bench.smollm2_quant import perplexity  # noqa: E402
from slimfx.passes import Distill, Prune  # noqa: E402

MODES = {    # score: "activation" or "magnitude" (the structured patterns always score activations)
    "2:4": lambda score, **kw: Prune(pattern="2:4", exclude="lm_head", score=score, **kw),
    "unstructured": lambda score, **kw: Prune(sparsity=0.5, exclude="lm_head", score=score, **kw),
    "block": lambda score, **kw: Prune(sparsity=0.5, pattern="block", block=(64, 64), exclude="lm_head",
                                       score=score, **kw),
    "block32": lambda score, **kw: Prune(sparsity=0.5, pattern="block", block=(32, 32), exclude="lm_head",
                                         score=score, **kw),
    "block16": lambda score, **kw: Prune(sparsity=0.5, pattern="block", block=(16, 16), exclude="lm_head",
                                         score=score, **kw),
    "neurons": lambda score: Prune(sparsity=0.25, pattern="neurons"),
    "heads": lambda score: Prune(sparsity=1 / 3, pattern="heads"),
    "query_heads": lambda score: Prune(sparsity=1 / 3, pattern="query_heads"),
}
LABELS = {"2:4": "2:4 (50%)", "unstructured": "unstructured 50%, per layer", "block": "50% of 64x64 blocks",
          "block32": "50% of 32x32 blocks", "block16": "50% of 16x16 blocks",
          "neurons": "25% of the MLP neurons removed (layers shrink)",
          "heads": "1 of 3 kv groups (3 of 9 heads) removed per block",
          "query_heads": "1 of 3 q heads in each kv group (3 of 9 heads; k, v whole) removed per block"}


def removed_fraction(cm, dense_nonzero: int) -> float:
    """1 - the nonzero weights of the blocks' linear layers / their nonzero weights in the dense model: what
    pruning removed (SmolLM2's own 0.03% exact zeros are not counted as removed)."""
    nnz = sum(math.prod(int(d) for d in r["out x in"].split(" x ")) * (1 - r["sparsity"])
              for r in cm.report().layers() if r["module"] != "lm_head")
    return 1 - nnz / dense_nonzero


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60, help="distillation steps (one window each)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW; of 1e-4 and 3e-4 over 20 steps of 2:4, "
                                                           "3e-4 recovered more (perplexity 164 vs 234)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--modes", default="2:4,unstructured,block,neurons,heads")
    ap.add_argument("--score", default="activation", choices=("activation", "magnitude"),
                    help="Prune's weight score for 2:4 / unstructured / block")
    ap.add_argument("--method", default="mask", choices=("mask", "sparsegpt"),
                    help="Prune's method for 2:4 / unstructured / block (sparsegpt re-fits the kept weights)")
    ap.add_argument("--name", help="results file stem (default: smollm2_prune[-magnitude|-sparsegpt])")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    adaptive = {"2:4", "unstructured", "block", "block32", "block16"}
    if a.method == "sparsegpt" and (a.score != "activation" or set(modes) - adaptive):
        ap.error("--method sparsegpt: modes 2:4, unstructured and block* only, and no --score")
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = tok(english_text(a.tokens * 8, offset=200000), return_tensors="pt").input_ids[0][: a.tokens]
    windows = [ids[i:i + a.window][None] for i in range(0, len(ids) - a.window + 1, a.window)]
    train_ids = tok(english_text(a.steps * a.window * 6, offset=20000), return_tensors="pt").input_ids[0]
    n_train = min(a.steps, len(train_ids) // a.window)
    train = [dict(input_ids=train_ids[i * a.window:(i + 1) * a.window][None]) for i in range(n_train)]
    kw = dict(input_ids=windows[0], use_cache=False)
    dense = sum(int(m.weight.count_nonzero()) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head")
    t0 = time.perf_counter()
    fp32 = perplexity(lambda x: model(input_ids=x, use_cache=False).logits, windows)
    rows = [{"mode": "fp32", "ppl": fp32, "sparsity": 0.0, "seconds": time.perf_counter() - t0}]
    print(f"fp32: {fp32:.3f}", flush=True)
    captured = slimfx.capture(model, (), kw, dynamic=True)          # once: every mode compiles from it
    for mode in modes:
        for distill in (False, True):
            prune = MODES[mode](a.score, method=a.method) if a.method != "mask" else MODES[mode](a.score)
            passes = [prune] + ([Distill(steps=a.steps, lr=a.lr, temperature=a.temperature,
                                                 exclude="lm_head")] if distill else [])
            t0 = time.perf_counter()
            cm = slimfx.compile(captured, passes=passes, backend="torch", calibration=train, measure=False)
            recs = {r.name: r for r in cm.report().records}
            ppl = perplexity(lambda x: cm(input_ids=x, use_cache=False).logits, windows)
            row = {"mode": LABELS[mode] + (f" + distill {a.steps} steps" if distill else ""), "ppl": ppl,
                   "sparsity": removed_fraction(cm, dense), "seconds": time.perf_counter() - t0}
            if distill:
                row.update(loss_first=recs["distill"].stats["loss_first"], loss_last=recs["distill"].stats["loss_last"])
            rows.append(row)
            print(f"{row['mode']}: {ppl:.3f}", flush=True)
    cpu = cpu_name()
    head = (f"SmolLM2-135M perplexity, {len(windows)} windows x {a.window} tokens of held-out pydoc_data prose; "
            f"every linear of the 30 blocks pruned (lm_head kept), "
            + ("SparseGPT (OBS saliency, kept weights re-fit on the training windows)" if a.method == "sparsegpt"
               else f"score={a.score} (activation: |w| x input RMS on the training windows)")
            + f"; weights removed = zeros or shrunk away, of the blocks' nonzero linear weights; "
            f"distillation: {a.steps} AdamW steps, lr {a.lr}, T = {a.temperature}, {n_train} training windows "
            f"of {a.window} tokens (other prose), zeros held fixed; backend='torch'; {cpu}")
    lines = [head, "", "| mode | weights removed | perplexity | vs fp32 | KL first -> last | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        kl = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "-"
        lines.append(f"| {r['mode']} | {r['sparsity']:.1%} | {r['ppl']:.3f} | {(r['ppl'] / fp32 - 1) * 100:+.1f}% | "
                     f"{kl} | {r['seconds']:.0f} |")
    md = "\n".join(lines)
    print(md)
    name = a.name or "smollm2_prune" + ("-sparsegpt" if a.method == "sparsegpt" else
                                        "" if a.score == "activation" else "-magnitude")
    save(name, cpu, {"cpu": cpu, "tokens": len(windows) * a.window, "window": a.window, "steps": a.steps,
                     "lr": a.lr, "score": a.score, "method": a.method, "temperature": a.temperature, "train_windows": n_train,
                     "rows": rows}, md)


if __name__ == "__main__":
    main()
