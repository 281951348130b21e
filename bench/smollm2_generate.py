"""Text generation with a KV cache from a compressed SmolLM2-135M-Instruct: does it still answer the same?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_generate.py [--modes fp32,w8a8,w4-gptq] [--backend numpy]

Four chat prompts (left-padded into one batch; with --one-at-a-time each alone, at batch 1, as one user chatting)
are answered greedily, up to --new-tokens tokens each, by transformers' own ``generate`` (fp32, its KV cache) and
by ``slimfx.compile_causal_lm`` for each mode. A row reports how many of the reference's tokens each mode
reproduces before its first difference (greedy decoding copies a difference forward, so this is the strict
measure), the prefill time, the prompts' new tokens per second end to end (prefill included: the one measure
transformers' ``generate`` gives too) and, for slimfx, per second of decoding alone;
the answers follow as text, prompt by prompt. Times are of this CPU and of the chosen backend (numpy: the
reference interpreter, not a fast path); the GPU numbers come from bench/llama_generate.py. Writes
bench/results/smollm2_generate-<cpu>.{json,md} (--name renames).
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
from bench.models import english_text, load_smollm2  # noqa: E402
from slimfx.passes import Fuse, Quantize, SmoothQuant, sqnr_db  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence what a compiler does.", "List three prime numbers."]
MODES = {
    "fp32": lambda: [],
    "w8a8": lambda: [Quantize(weights="int8", activations="dynamic-per-token", exclude="lm_head")],
    "w8a8-fuse": lambda: [Quantize(weights="int8", activations="dynamic-per-token", exclude="lm_head"), Fuse()],
    "w8a8-sq": lambda: [SmoothQuant(alpha=0.5),
                        Quantize(weights="int8", activations="dynamic-per-token", exclude="lm_head")],
    "w8a16": lambda: [Quantize(weights="int8", exclude="lm_head")],
    "w4-gptq": lambda: [Quantize(weights="int4", group_size=64, method="gptq", exclude="lm_head")],
    "w4-rtn": lambda: [Quantize(weights="int4", group_size=64, exclude="lm_head")],
}
LABELS = {"fp32": "fp32 (no passes)", "w8a8": "W8A8 dynamic per-token", "w8a8-fuse": "W8A8 dynamic per-token + Fuse",
          "w8a8-sq": "SmoothQuant 0.5 + W8A8", "w8a16": "W8A16 per-channel",
          "w4-gptq": "W4A16 g64 GPTQ", "w4-rtn": "W4A16 g64 round-to-nearest"}


def agreement(got: torch.Tensor, ref: torch.Tensor, start: int) -> list[int]:
    """Per row: how many generated tokens equal the reference's before the first difference."""
    n = min(got.shape[1], ref.shape[1]) - start
    same = (got[:, start:start + n] == ref[:, start:start + n]).int()
    return [int(row.cumprod(0).sum()) for row in same]


def chat_batch(p: argparse.ArgumentParser, modes: str):
    """The checked ``modes`` (comma-separated, of MODES), SmolLM2 and its tokenizer, the chat prompts as one
    left-padded batch, its length, and 8 x 256 calibration tokens of English text."""
    modes = modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {sorted(MODES)}")
    model, tok = load_smollm2()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True)
    cal_ids = tok(english_text(20000, offset=20000), return_tensors="pt").input_ids[0]
    calibration = [cal_ids[i * 256:(i + 1) * 256][None] for i in range(8)]
    return modes, model, tok, enc, enc.input_ids.shape[1], calibration


def generate_calls(enc, one_at_a_time: bool) -> list:
    """(input_ids, attention_mask) of each generate call: the left-padded batch, or each prompt alone without
    its padding."""
    if not one_at_a_time:
        return [(enc.input_ids, enc.attention_mask)]
    real = enc.attention_mask.bool()
    return [(ids[keep][None], torch.ones((1, int(keep.sum())), dtype=enc.attention_mask.dtype))
            for ids, keep in zip(enc.input_ids, real)]


def answer_tables(rows: list) -> list:
    """Markdown lines: per prompt, a table of each row's answer."""
    lines = []
    for i, q in enumerate(PROMPTS):
        lines += ["", f"**{q}**", "", "| mode | answer |", "|---|---|"]
        for r in rows:
            text = r["answers"][i].replace("\n", " / ").replace("|", "\\|")
            lines.append(f"| {r['mode']} | {text} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--modes", default="fp32,w8a8,w8a8-fuse,w8a8-sq,w8a16,w4-gptq,w4-rtn")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--name", default=None, help="results file name (default smollm2_generate, with "
                   "--one-at-a-time smollm2_generate-batch1)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="answer each prompt alone (batch 1: one user chatting) instead of all in one left-padded batch")
    args = p.parse_args(argv)
    if args.name is None:
        args.name = "smollm2_generate-batch1" if args.one_at_a_time else "smollm2_generate"
    modes, model, tok, enc, _, calibration = chat_batch(p, args.modes)
    n = args.new_tokens
    calls = generate_calls(enc, args.one_at_a_time)

    real = enc.attention_mask.bool()
    with torch.no_grad():
        ref_logits = model(**enc, use_cache=False).logits[real]
    prompt_sqnr = lambda logits: round(float(sqnr_db(logits[real], ref_logits)), 1)
    with torch.no_grad():         # a first call pays one-time setup (3 new tokens: 2.5 tok/s cold): not timed
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        refs = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id) for ids, mask in calls]
    ref_s = time.perf_counter() - t0
    answers = lambda outs: [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip()
                            for out, (ids, _) in zip(outs, calls) for row in out]
    ref_new = [r.shape[1] - ids.shape[1] for r, (ids, _) in zip(refs, calls) for _ in range(ids.shape[0])]
    # tokens_per_s: the prompts' new tokens over the whole calls (prefill included), every row counted as
    # long as its call; decode_tokens_per_s: over decoding alone, which transformers' generate does not report
    rows = [{"mode": "transformers generate (fp32, eager)", "compile_s": None, "prefill_s": None,
             "tokens_per_s": sum(ref_new) / ref_s, "decode_tokens_per_s": None,
             "prompt_sqnr_db": None, "agree": ref_new, "answers": answers(refs)}]
    print(rows[-1], flush=True)
    for mode in modes:
        t0 = time.perf_counter()
        lm = slimfx.compile_causal_lm(model, passes=MODES[mode](), calibration=calibration, backend=args.backend,
                                      progress=False, measure=False)
        compile_s = time.perf_counter() - t0
        outs, prefill_s, decode_s, new, decoded = [], 0.0, 0.0, 0, 0.0
        for ids, mask in calls:
            outs.append(lm.generate(ids, mask, max_new_tokens=n))
            t = lm.last_timing
            prefill_s, decode_s = prefill_s + t["prefill_s"], decode_s + t["decode_s"]
            new += t["new_tokens"] * ids.shape[0]
            decoded += max(t["new_tokens"] - 1, 0) * ids.shape[0]      # the first new token comes from prefill
        sqnr = prompt_sqnr(lm.prefill(enc.input_ids, enc.attention_mask, all_logits=True)[0])
        rows.append({"mode": LABELS[mode], "compile_s": compile_s, "prefill_s": prefill_s,
                     "tokens_per_s": new / (prefill_s + decode_s),
                     "decode_tokens_per_s": decoded / decode_s if decode_s else 0.0, "prompt_sqnr_db": sqnr,
                     "agree": [a for out, ref, (ids, _) in zip(outs, refs, calls)
                               for a in agreement(out, ref, ids.shape[1])],
                     "answers": answers(outs)})
        print(rows[-1], flush=True)
        del lm

    cpu = cpu_name()
    fmt = lambda v, f: "-" if v is None else format(v, f)
    how = "each alone, batch 1" if args.one_at_a_time else "one left-padded batch"
    lines = [f"SmolLM2-135M-Instruct answering {len(PROMPTS)} chat prompts ({how}), greedy, "
             f"up to {n} new tokens; slimfx backend {args.backend!r}, lm_head kept fp32; {cpu}.", "",
             "`agree`: per prompt, the tokens equal to transformers' own greedy answer before the first difference "
             f"(of {', '.join(map(str, ref_new))}).", "",
             f"`prompt SQNR`: the logits at every real prompt position ({int(real.sum())} x {ref_logits.shape[-1]}) "
             "vs transformers' fp32 ones, in dB: a measure over all of them, where `agree` hangs on near-ties (a "
             "greedy choice between two tokens whose fp32 logits almost agree flips with any noise, and every "
             "later token differs), from one prefill of the left-padded batch" +
             (" (not of the calls timed here)" if args.one_at_a_time else "") + ".", "",
             "`tok/s`: the prompts' new tokens per second of the whole generation, prefill included (as "
             "transformers' is measured); `decode tok/s`: per second of decoding alone; `prefill s`: "
             + ("the prompts' prefills, summed." if args.one_at_a_time else "the batch's prefill."), "",
             "| mode | compile s | prefill s | tok/s | decode tok/s | prompt SQNR dB | agree |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {fmt(r['compile_s'], '.1f')} | {fmt(r['prefill_s'], '.2f')} | "
                     f"{r['tokens_per_s']:.1f} | {fmt(r['decode_tokens_per_s'], '.1f')} | "
                     f"{fmt(r['prompt_sqnr_db'], '.1f')} | "
                     f"{', '.join(map(str, r['agree']))} |")
    md = "\n".join(lines + answer_tables(rows)) + "\n"
    save(args.name, cpu, {"cpu": cpu, "backend": args.backend, "new_tokens": n, "one_at_a_time": args.one_at_a_time,
                          "prompts": PROMPTS, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
