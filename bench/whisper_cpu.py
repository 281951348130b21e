"""Whisper transcription of audio longer than one window on the CPU: transformers' generate vs slimfx's transcribe.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/whisper_cpu.py [--seconds 60,42] [--new-tokens 32] [--repeats 3]

A random-weight model of Whisper-tiny's shapes (39M parameters, 4 + 4 layers, d_model 384) with Whisper's
vocabulary layout and generation settings (language tokens, tasks, <|notimestamps|>, timestamps from 50364,
max_initial_timestamp_index 50: no model hub here) transcribes a batch of log-mel features of --seconds each
(100 frames a second, the shorter ones masked), window by window (30 s) with timestamps: transformers'
long-form ``generate`` and slimfx's ``transcribe`` (the numpy backend, fp32 and W8A8), each window at most
--new-tokens tokens, the language detected. Random weights decide which tokens and timestamps come out (so how far
each window moves on), not the speed of a window. Rows: the whole call's seconds (median of --repeats), seconds of
audio per second, the windows decoded, and whether the text tokens and segments equal transformers'. Writes
bench/results/whisper_cpu-<cpu>.{json,md} (--name renames).
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
from bench.seq2seq_cpu import median_s  # noqa: E402
from slimfx.passes import Quantize  # noqa: E402


def whisper_tiny():
    """Whisper-tiny's shapes, special tokens and generation settings, random weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                           decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
                           eos_token_id=50257, pad_token_id=50257, bos_token_id=50257, decoder_start_token_id=50258,
                           begin_suppress_tokens=[220, 50257], suppress_tokens=None)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": 50259, "<|de|>": 50261, "<|es|>": 50262, "<|fr|>": 50265}
    gen.task_to_id = {"transcribe": 50359, "translate": 50358}
    gen.no_timestamps_token_id, gen.prev_sot_token_id, gen.max_initial_timestamp_index = 50363, 50361, 50
    return model


def same_segments(ref: list, got: list) -> bool:
    return [len(r) for r in ref] == [len(g) for g in got] and all(
        torch.equal(r["tokens"], g["tokens"]) and float(r["start"]) == g["start"] and float(r["end"]) == g["end"]
        for r, g in zip(sum(ref, []), sum(got, [])))


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--seconds", default="60,42", help="each input's audio length, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32, help="at most this many tokens per window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="whisper_cpu")
    args = ap.parse_args()
    seconds = [float(s) for s in args.seconds.split(",")]
    model = whisper_tiny()
    frames = [int(round(s * 100)) for s in seconds]
    features = torch.randn(len(frames), 80, max(frames), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(frames), max(frames), dtype=torch.long)
    for i, n in enumerate(frames):
        mask[i, :n] = 1
    n = args.new_tokens
    windows = []
    original = type(model).generate_with_fallback

    def counted(self, *a, **k):               # (transformers' windows: one batched call per window position)
        windows.append(k["segment_input"].shape[0])
        return original(self, *a, **k)
    type(model).generate_with_fallback = counted

    def hf():
        windows.clear()
        with torch.no_grad():
            return model.generate(features, attention_mask=mask, max_new_tokens=n, return_segments=True)
    hf_s, ref = median_s(hf, args.repeats)
    type(model).generate_with_fallback = original
    audio = sum(seconds)
    rows = [{"mode": "transformers fp32", "transcribe_s": hf_s, "audio_s_per_s": audio / hf_s,
             "windows": sum(windows), "same": True}]
    print(rows[-1], flush=True)
    for mode, passes in (("fp32", []), ("w8a8", [Quantize(weights="int8", activations="dynamic-per-token",
                                                           exclude="proj_out")])):
        t0 = time.perf_counter()
        lm = slimfx.compile_seq2seq_lm(model, passes=passes, example_inputs=(features[:1, :, :3000],), progress=False)
        compile_s = time.perf_counter() - t0
        calls = []
        generate = lm.generate
        lm.generate = lambda x, *a, **k: calls.append(x.shape[0]) or generate(x, *a, **k)

        def ours():
            calls.clear()
            return lm.transcribe(features, mask, max_new_tokens=n, return_segments=True)
        our_s, got = median_s(ours, args.repeats)
        same = torch.equal(got["sequences"], ref["sequences"].long()) and same_segments(ref["segments"],
                                                                                      got["segments"])
        rows.append({"mode": f"slimfx {mode} (numpy)", "compile_s": compile_s, "transcribe_s": our_s,
                     "audio_s_per_s": audio / our_s, "windows": sum(calls), "same": same})
        print(rows[-1], flush=True)
    lines = [f"# Whisper transcription window by window on the CPU ({cpu_name()})", "",
             f"A random-weight model of Whisper-tiny's shapes and vocabulary layout; {len(seconds)} inputs of "
             f"{', '.join(f'{s:g}' for s in seconds)} s of log-mel features, transcribed in 30-s windows with "
             f"timestamps, at most {n} tokens a window, the language detected (`bench/whisper_cpu.py`). "
             f"transcribe s: the whole call (median of {args.repeats}); audio s/s: seconds of audio per second; "
             f"windows: the inputs' windows decoded (random weights decide how far each moves on); same: the text "
             f"tokens and every segment's start, end and tokens equal transformers' fp32 ones.", "",
             "| mode | compile s | transcribe s | audio s/s | windows | same |", "|---|---|---|---|---|---|"]
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        lines.append(f"| {r['mode']} | {compile_s} | {r['transcribe_s']:.2f} | {r['audio_s_per_s']:.1f} | "
                     f"{r['windows']} | {'yes' if r['same'] else 'no'} |")
    save(args.name, cpu_name(), {"rows": rows, "seconds": seconds, "new_tokens": n}, "\n".join(lines))


if __name__ == "__main__":
    main()
