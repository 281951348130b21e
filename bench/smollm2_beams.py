"""Beam search on a real model: SmolLM2-135M-Instruct, slimfx's beams against transformers' own.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_beams.py [--modes fp32,w8a8] [--num-beams 4] [--new-tokens 32]

The four chat prompts of bench/smollm2_generate.py (one left-padded batch) are answered with beam search
(``generate(num_beams=...)``, length penalty 1, early stopping off: transformers' defaults) by transformers'
``generate`` (fp32) and by ``slimfx.compile_causal_lm`` for each mode, on the numpy backend. A row reports, per
prompt, how many of the reference's new tokens the mode's best sequence reproduces before its first difference
(fp32 should give them all: the same search over logits that agree to float rounding), the new tokens per second
of the batch's best sequences end to end (prefill included, as transformers' is measured) and, for slimfx, of
decoding alone; the answers follow as text. Writes bench/results/smollm2_beams-<cpu>.{json,md} (--name renames).
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
from bench.common import cpu_name, description, save  # noqa: E402
from bench.smollm2_generate import LABELS, MODES, PROMPTS, agreement, answer_tables, chat_batch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--modes", default="fp32,w8a8")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--name", default="smollm2_beams")
    args = p.parse_args(argv)
    modes, model, tok, enc, start, calibration = chat_batch(p, args.modes)
    n, k = args.new_tokens, args.num_beams
    options = dict(max_new_tokens=n, num_beams=k, pad_token_id=tok.pad_token_id)
    with torch.no_grad():         # a first call pays one-time setup: not timed
        model.generate(**enc, max_new_tokens=2, num_beams=k, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(**enc, **options, do_sample=False)
    ref_s = time.perf_counter() - t0
    def answers(ids):
        return [tok.decode(row[start:], skip_special_tokens=True).strip() for row in ids]

    def new(ids):                                 # the best sequences' real tokens
        return int((ids[:, start:] != tok.pad_token_id).sum())
    rows = [{"mode": f"transformers generate (fp32, eager), {k} beams", "compile_s": None,
             "tokens_per_s": new(ref) / ref_s, "decode_tokens_per_s": None, "agree": [ref.shape[1] - start] * 4,
             "answers": answers(ref)}]
    print(rows[-1], flush=True)
    for mode in modes:
        t0 = time.perf_counter()
        lm = slimfx.compile_causal_lm(model, passes=MODES[mode](), calibration=calibration, backend="numpy",
                                      progress=False, measure=False)
        compile_s = time.perf_counter() - t0
        lm.generate(enc.input_ids[:, -8:], enc.attention_mask[:, -8:], max_new_tokens=2, num_beams=k)   # (warm)
        out = lm.generate(enc.input_ids, enc.attention_mask, **options)
        t = lm.last_timing
        rows.append({"mode": f"slimfx {LABELS[mode]}, {k} beams", "compile_s": compile_s,
                     "tokens_per_s": new(out) / (t["prefill_s"] + t["decode_s"]),
                     "decode_tokens_per_s": (t["decode_tokens_per_s"] or 0) * len(PROMPTS),
                     "agree": agreement(out, ref, start), "answers": answers(out)})
        print(rows[-1], flush=True)
        del lm
    cpu = cpu_name()
    def fmt(v, f):
        return "-" if v is None else format(v, f)
    lines = [f"SmolLM2-135M-Instruct answering {len(PROMPTS)} chat prompts (one left-padded batch) with {k}-beam "
             f"search, up to {n} new tokens; slimfx on the numpy backend, lm_head kept fp32; {cpu} "
             f"(`bench/smollm2_beams.py`).", "",
             "`agree`: per prompt, the new tokens of slimfx's best sequence equal to transformers' before the first "
             f"difference (of {ref.shape[1] - start}, the longest; a sequence ends early at its end-of-sequence "
             "token).", "",
             "`tok/s`: the best sequences' new tokens per second of the whole call, prefill included; `decode "
             "tok/s`: decode steps per second times the batch (each step scores every beam).", "",
             "| mode | compile s | tok/s (batch) | decode tok/s (batch) | agree |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {fmt(r['compile_s'], '.1f')} | {r['tokens_per_s']:.1f} | "
                     f"{fmt(r['decode_tokens_per_s'], '.1f')} | {', '.join(map(str, r['agree']))} |")
    md = "\n".join(lines + answer_tables(rows)) + "\n"
    save(args.name, cpu, {"cpu": cpu, "new_tokens": n, "num_beams": k, "prompts": PROMPTS, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
