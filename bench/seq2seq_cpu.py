"""Encoder-decoder generation on the CPU: transformers' generate vs slimfx.compile_seq2seq_lm, fp32 and W8A8.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/seq2seq_cpu.py [--models t5-small,whisper-tiny] [--new-tokens 32]
                                                           [--num-beams 4]

The models are random-weight ones of the published shapes (no model hub here): T5-small (60M parameters,
6 + 6 layers, d_model 512, vocabulary 32128) on a batch of 2 inputs of 64 tokens, and Whisper-tiny (39M, 4 + 4
layers, d_model 384, vocabulary 51865) on 2 x 30 s of 80-bin log-mel features (3000 frames), each generating
--new-tokens tokens greedily (min_new_tokens as many, so every run makes the same number). Random weights decide
no timing, only which tokens come out, so the rows report speed and whether fp32 reproduces transformers' tokens
(the W8A8 rows, how many of them survive before the first difference). With --num-beams > 1, fp32 beam search too,
transformers' and slimfx's (``generate(num_beams=...)``), the same new tokens forced (min_new_tokens), each
sequence compared. Times: the whole generate call (encoder,
prefill and decoding) and, for slimfx, decoding alone (``last_timing``) and the encoder alone, medians of
--repeats calls, on the numpy backend (the reference interpreter, not a fast path). Writes
bench/results/seq2seq_cpu-<cpu>.{json,md} (--name renames).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimfx  # noqa: E402
from bench.common import cpu_name, description, save  # noqa: E402
from slimfx.passes import Quantize  # noqa: E402


def t5_small():
    from transformers import T5Config, T5ForConditionalGeneration
    model = T5ForConditionalGeneration(T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    ids = torch.randint(2, 32128, (2, 64), generator=torch.Generator().manual_seed(0))
    return model, ids, torch.ones_like(ids), "lm_head"


def whisper_tiny():
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                           decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
                           begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(config)
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    return model, features, None, "proj_out"


MODELS = {"t5-small": t5_small, "whisper-tiny": whisper_tiny}


def median_s(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def beam_rows(name, params, model, inputs, mask, given, n, args) -> list:
    """transformers' and slimfx's fp32 beam search, the same tokens forced; "same tokens": of transformers'
    sequences, the tokens each reproduces before its first difference (the fewest of them)."""
    k = args.num_beams

    def hf():
        with torch.no_grad():
            return model.generate(inputs, **given, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  num_beams=k)
    hf_s, ref = median_s(hf, args.repeats)
    if name.startswith("whisper"):
        ref = torch.cat([torch.full_like(ref[:, :1], model.generation_config.decoder_start_token_id), ref], 1)
    rows = [{"model": name, "params_m": round(params / 1e6, 1), "mode": f"transformers fp32, {k} beams",
             "generate_s": hf_s, "tokens_per_s": 2 * n / hf_s, "same_tokens": n}]
    print(rows[-1], flush=True)
    t0 = time.perf_counter()
    lm = slimfx.compile_seq2seq_lm(model, example_inputs=(inputs[:1],), progress=False)
    compile_s = time.perf_counter() - t0
    gen_s, got = median_s(lambda: lm.generate(inputs, mask, max_new_tokens=n, min_new_tokens=n, num_beams=k),
                          args.repeats)
    timing = dict(lm.last_timing)
    same = [int((a != b).nonzero()[0, 0]) - 1 if (a != b).any() else n for a, b in zip(got, ref)]
    rows.append({"model": name, "params_m": round(params / 1e6, 1), "mode": f"slimfx fp32 (numpy), {k} beams",
                 "compile_s": compile_s, "generate_s": gen_s, "tokens_per_s": 2 * n / gen_s,
                 "decode_tokens_per_s": timing["decode_tokens_per_s"] * 2, "same_tokens": min(same)})
    print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-beams", type=int, default=4, help="beam search rows too (1: none)")
    ap.add_argument("--name", default="seq2seq_cpu")
    args = ap.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)
    n = args.new_tokens
    rows = []
    for name in args.models.split(","):
        model, inputs, mask, head = MODELS[name]()
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        given = {"attention_mask": mask} if mask is not None else {}

        def hf():
            with torch.no_grad():
                return model.generate(inputs, **given, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      num_beams=1)
        hf_s, ref = median_s(hf, args.repeats)
        if name.startswith("whisper"):       # (its generate leaves the start token out)
            ref = torch.cat([torch.full_like(ref[:, :1], model.generation_config.decoder_start_token_id), ref], 1)
        rows.append({"model": name, "params_m": round(params / 1e6, 1), "mode": "transformers fp32",
                     "generate_s": hf_s, "tokens_per_s": 2 * n / hf_s, "same_tokens": n})
        print(rows[-1], flush=True)
        for mode, passes in (("fp32", []), ("w8a8", [Quantize(weights="int8", activations="dynamic-per-token",
                                                               exclude=head)])):
            t0 = time.perf_counter()
            lm = slimfx.compile_seq2seq_lm(model, passes=passes, example_inputs=(inputs[:1],), progress=False)
            compile_s = time.perf_counter() - t0
            gen_s, got = median_s(lambda: lm.generate(inputs, mask, max_new_tokens=n, min_new_tokens=n),
                                  args.repeats)
            timing = dict(lm.last_timing)
            enc_s, _ = median_s(lambda: lm.encode(inputs, mask), args.repeats)
            same = [int((a != b).nonzero()[0, 0]) - 1 if (a != b).any() else n for a, b in zip(got, ref)]
            rows.append({"model": name, "params_m": round(params / 1e6, 1), "mode": f"slimfx {mode} (numpy)",
                         "compile_s": compile_s, "generate_s": gen_s, "tokens_per_s": 2 * n / gen_s,
                         "encoder_s": enc_s, "decode_tokens_per_s": timing["decode_tokens_per_s"] * 2,
                         "same_tokens": min(same)})
            print(rows[-1], flush=True)
        if args.num_beams > 1:
            rows += beam_rows(name, params, model, inputs, mask, given, n, args)
    lines = [f"# Encoder-decoder generation on the CPU ({cpu_name()})", "",
             f"Random-weight models of the published shapes, batch 2, {n} new tokens each, greedy "
             f"(`bench/seq2seq_cpu.py`; beam rows: beam search, the best sequence of each input counted). tokens/s: "
             f"the batch's new tokens over the whole generate call (encoder and "
             f"prefill included); decode tokens/s: over decoding alone; same tokens: of transformers' fp32 tokens, "
             f"those reproduced before the first difference (the fewer of the 2 rows; random weights repeat a few "
             f"tokens, so the W8A8 count says little of its accuracy: tests/test_seq2seq.py bounds its logits' "
             f"cosine).", "",
             "| model | params | mode | compile s | generate s | tokens/s | encoder s | decode tokens/s "
             "| same tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if r.get(key) is not None else ""
        lines.append(f"| {r['model']} | {r['params_m']}M | {r['mode']} | {f('compile_s', '{:.1f}')} | "
                     f"{f('generate_s')} | {f('tokens_per_s', '{:.1f}')} | {f('encoder_s')} | "
                     f"{f('decode_tokens_per_s', '{:.1f}')} | {r['same_tokens']}/{n} |")
    save(args.name, cpu_name(), {"rows": rows, "new_tokens": n}, "\n".join(lines))


if __name__ == "__main__":
    main()
