"""Generation on a GPU: tokens per second of a Llama-shaped bf16 model with a KV cache, transformers'
``generate`` vs ``slimfx.compile_causal_lm(..., backend="triton")``, in one process.

    python bench/llama_generate.py                     # TinyLlama-1.1B dims, 8 of its 22 layers, random weights
    python bench/llama_generate.py --smoke             # no GPU: a tiny model under TRITON_INTERPRET

The model and schemes are bench/llama_gpu.py's (random seeded weights: timings depend only on shapes; the
sparse schemes prune a copy first). Per row: a prompt of --prompt tokens (batch --batch), then --new-tokens
greedy tokens with end-of-sequence disabled, so every row produces the same count. Timed: the median over
--repeats whole generate calls after one warm-up call (which also makes the triton backend's per-shape kernel
choices and, for the "graphs" rows, captures one CUDA graph per cache-buffer size); prefill is timed apart.
Each scheme runs eager and with backend_options={"cuda_graphs": True} (``lm.with_backend``). Checks in the
same run: the cosine of slimfx's prompt logits to torch's (to the pruned model's for sparse schemes) and how
many greedy tokens equal transformers' before the first difference (random bf16 weights make near-ties common,
so a short run of equal tokens is no error; the cosine is the check).
Writes bench/results/llama_generate-<card>.{json,md} (--stem renames, --out-dir moves; --smoke, whose times are
single interpreted calls, writes only where --out-dir names a folder, as <stem>-cpu-interpreter-smoke.*).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import RESULTS, description  # noqa: E402
from llama_gpu import (SCHEMES, SIZES, SMOKE_TIMING, attempt, build, finish_markdown, int4_group,  # noqa: E402
                       passes_for, pruned, write_results)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (the size's full depth: 0)")
    p.add_argument("--schemes", default="w8a8,w8a16,w4a16", help=f"comma-separated, of: none, {', '.join(SCHEMES)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block", type=int, default=64, help="block side of the block-sparse schemes")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny model, interpreter, CPU timing")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where to write (default: bench/results; --smoke writes only where this names a folder)")
    p.add_argument("--stem", default="llama_generate")
    return p.parse_args(argv)


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    """(median seconds of ``repeats`` calls after one warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def equal_prefix(a, b, start: int) -> int:
    """Tokens after ``start`` equal in every row, before the first difference (minimum over rows)."""
    n = min(a.shape[1], b.shape[1]) - start
    same = (a[:, start:start + n].cpu() == b[:, start:start + n].cpu()).int()
    return int(same.cumprod(1).sum(1).min())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.size, args.block, args.prompt, args.new_tokens, args.repeats = "smoke", 16, 8, 4, 1
    import torch
    import slimfx
    if not args.smoke and not torch.cuda.is_available():
        print("bench/llama_generate.py: no CUDA device here (--smoke runs a tiny model on the CPU interpreter)",
              file=sys.stderr)
        return 2
    dev = "cpu" if args.smoke else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    schemes = [x for x in args.schemes.split(",") if x]
    unknown = [x for x in schemes if x != "none" and x not in SCHEMES]
    if unknown:
        raise SystemExit(f"--schemes: unknown {unknown}; the schemes: none, {', '.join(SCHEMES)}")
    model = build(args.size, 0 if args.smoke else args.layers)
    model.config.use_cache = model.generation_config.use_cache = True   # (llama_gpu builds it cache-less)
    model.generation_config.eos_token_id = None          # every call makes exactly --new-tokens tokens
    model.generation_config.pad_token_id = 0
    vocab, n = model.config.vocab_size, args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt), generator=g).to(dev)
    start = prompt.shape[1]
    rows, references = [], {}

    def hf_row(m, label):
        m = m.to(dev)
        with torch.no_grad():
            ref_logits = m(prompt, use_cache=False).logits[:, -1].float()
            prefill_s, _ = timed(lambda: m(prompt, use_cache=False), args.repeats, sync)
            total_s, out = timed(lambda: m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                                 args.repeats, sync)
        m.to("cpu")
        rows.append(dict(path=label, prefill_ms=prefill_s * 1e3, total_s=total_s,
                         decode_tok_s=args.batch * (n - 1) / max(total_s - prefill_s, 1e-9), cosine=1.0,
                         same_tokens=n, weights_mb=round(sum(p.numel() * p.element_size()
                                                             for p in m.parameters()) / 1e6, 3)))
        print(rows[-1], flush=True)
        return ref_logits, out

    references[None] = hf_row(model, "transformers generate bf16")
    base = rows[-1]
    pruned_models = {}
    for scheme in schemes:
        how = None if scheme == "none" else SCHEMES[scheme][0]
        if how is not None and how not in pruned_models:
            pruned_models[how] = pruned(model, how, args.block)
            references[how] = hf_row(pruned_models[how], f"transformers generate bf16, pruned {how}")
        ref_logits, ref_tokens = references[how]

        t0 = time.perf_counter()
        compiled = attempt(lambda: {"lm": slimfx.compile_causal_lm(
            pruned_models.get(how, model), passes=[] if scheme == "none" else passes_for(scheme, args.block,
                                                                                       int4_group(args.size)),
            backend="triton", measure=False, progress=False)})
        compile_s = round(time.perf_counter() - t0, 1)
        for graphs in ((False,) if args.smoke else (False, True)):
            def run(ref_logits=ref_logits, ref_tokens=ref_tokens, graphs=graphs):
                if "lm" not in compiled:
                    raise RuntimeError(compiled.get("note", "compile failed"))
                lm = compiled["lm"].with_backend("triton", {"cuda_graphs": True}) if graphs else compiled["lm"]
                t0 = time.perf_counter()
                logits, _ = lm.prefill(prompt)
                first_s = time.perf_counter() - t0
                cos = float(torch.nn.functional.cosine_similarity(logits[:, -1].float().flatten(),
                                                                  ref_logits.flatten(), dim=0))
                prefill_s, _ = timed(lambda: lm.prefill(prompt), args.repeats, sync)
                total_s, out = timed(lambda: lm.generate(prompt, max_new_tokens=n), args.repeats, sync)
                held = lm.step.held_bytes()          # after the choices: weights as stored + dense copies kept
                return dict(prefill_ms=prefill_s * 1e3, total_s=total_s,
                            weights_mb=round((held["weights"] + held["dense_copies"]) / 1e6, 3),
                            decode_tok_s=args.batch * (n - 1) / max(total_s - prefill_s, 1e-9), cosine=round(cos, 5),
                            same_tokens=equal_prefix(out, ref_tokens, start), compile_s=compile_s,
                            first_call_s=round(first_s, 1), fed=lm.decode_tokens)
            rows.append(dict(path=f"slimfx {scheme}{' graphs' if graphs else ''}", **attempt(run)))
            print(rows[-1], flush=True)
        compiled.clear()                                  # the weights on the GPU go before the next scheme
    card = "cpu (interpreter smoke)" if args.smoke else torch.cuda.get_device_name()
    meta = dict(card=card, size=args.size, dims=SIZES[args.size], layers=model.config.num_hidden_layers,
                batch=args.batch, prompt=args.prompt, new_tokens=n, torch=torch.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), smoke=args.smoke,
                timing=SMOKE_TIMING if args.smoke else
                f"median of {args.repeats} synchronized time.perf_counter calls after a warm-up call")
    md = markdown(rows, meta, base)
    print(md)
    if not args.smoke or args.out_dir:
        write_results(args.out_dir or RESULTS, args.stem, meta, rows, md)
    return 0


def markdown(rows: list[dict], meta: dict, base: dict) -> str:
    lines = [f"# Generation with a KV cache: {meta['card']}", "",
             f"{meta['size']} dims {meta['dims']}, {meta['layers']} layers, random bf16 weights; batch {meta['batch']}, "
             f"prompt {meta['prompt']} tokens, {meta['new_tokens']} new tokens (greedy, no end-of-sequence); "
             f"torch {meta['torch']}, {meta['date']}. Times: {meta['timing']}. "
             "decode tok/s = batch x (new tokens - 1) / (generate time - prefill time); speedup vs transformers "
             "generate bf16; cos: prompt logits vs torch's; same: greedy tokens equal to transformers' before the "
             "first difference; weights MB: what the path holds on the "
             "device (slimfx: CompiledModel.held_bytes after generating, dense copies included); fed: tokens a "
             "decode step feeds (CompiledCausalLM.decode_tokens).", "",
             "| path | prefill ms | decode tok/s | speedup | cos | same | weights MB | compile s | fed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("decode_tok_s") is None:
            lines.append(f"| {r['path']} | - | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['path']} | {r['prefill_ms']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['cosine']:.4f} | {r['same_tokens']} | "
                     f"{r.get('weights_mb', '-')} | {r.get('compile_s', '-')} | {r.get('fed', '-')} |")
    return finish_markdown(lines, [f"- {r['path']}: {r['note']}" for r in rows if r.get("note")])


if __name__ == "__main__":
    sys.exit(main())
