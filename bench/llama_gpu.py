"""End to end on a GPU: a Llama-shaped model in bf16, torch eager vs slimfx's triton backend, the way a
user calls them.

    python bench/llama_gpu.py                      # TinyLlama-1.1B dims, 8 of its 22 layers, random weights
    python bench/llama_gpu.py --size small         # SmolLM2-360M dims
    python bench/llama_gpu.py --smoke              # no GPU: a tiny model under TRITON_INTERPRET (tests the script)

No model hub is reachable from the GPU machines and real checkpoints are larger than what travels there,
so the weights are random (seeded): the timings depend only on the shapes; the check is that slimfx's
output stays close to torch's (cosine of the logits). The model runs without a KV cache; a sequence of
2 tokens stands for a decode step of the linear layers (M = 2 rows: the GEMV kernels' regime; 2, not 1,
because one compile with a dynamic sequence length serves every row here and torch.export's dynamic
dims start at 2; bench/llama_generate.py times real generation with a KV cache). --layers cuts the
depth to bound the time (compile, tuning and timing scale with it; the per-layer speedup does not).

Rows, each timed by triton.testing.do_bench (median; the torch CUDA graph row by do_bench_cudagraph) in one
process (--smoke: one time.perf_counter call each, labelled so in its table):
    torch bf16 eager            model(ids)
    torch bf16 CUDA graph       the same forward captured once and replayed (no launch cost)
    slimfx <scheme> eager       slimfx.compile(..., backend="triton")
    slimfx <scheme> graphs      ... backend_options={"cuda_graphs": True}
for the schemes in SCHEMES (--schemes; default W8A8, W8A16 and W4A16; the sparse ones prune a copy of the model
by magnitude first, and their cosine is to that pruned model in torch); lm_head stays bf16. Each scheme
is compiled once (capture and passes on the CPU) and lowered twice; a row's first call (choices,
autotuning, graph capture) is timed apart as first_call_s. The weights each path holds on the device
(TritonProgram.held_bytes after the eager rows) go beside the table.
Writes bench/results/llama_gpu-<card>.{json,md} (--stem renames, --out-dir moves; --smoke writes only where
--out-dir names a folder, as <stem>-cpu-interpreter-smoke.*).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import RESULTS, description, provenance  # noqa: E402

SIZES = {   # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": (2048, 5632, 22, 32, 4, 32000),      # TinyLlama-1.1B
    "small": (960, 2560, 32, 15, 5, 49152),    # SmolLM2-360M
    "smoke": (64, 128, 1, 4, 2, 97),      # one layer: the scripts run under the interpreter in CI
}

# what a --smoke run's times are (the GPU benches' tables say so instead of naming do_bench)
SMOKE_TIMING = ("one time.perf_counter call after a warm-up call, on the CPU under the Triton interpreter: "
                "a smoke run, not a measurement")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--seqs", default="2,128,512", help="comma-separated sequence lengths >= 2 (batch 1)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (the size's full depth: 0)")
    p.add_argument("--schemes", default="w8a8,w8a16,w4a16", help=f"comma-separated, of: {', '.join(SCHEMES)}")
    p.add_argument("--block", type=int, default=64, help="block side of the block-sparse schemes")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny model, interpreter, CPU timing")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where to write (default: bench/results; --smoke writes only where this names a folder)")
    p.add_argument("--stem", default="llama_gpu", help="output file names: <stem>-<card>.{json,md}")
    return p.parse_args(argv)


def build(size: str, layers: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    h, inter, depth, heads, kv, vocab = SIZES[size]
    layers = layers or depth
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      use_cache=False, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


SCHEMES = {   # name: (how the weights are pruned first, or None; what the passes do)
    "w8a8": (None, "int8 weights per channel, dynamic int8 activations per token, Fuse"),
    "w8a16": (None, "int8 weights per channel (weight-only)"),
    "w4a16": (None, "int4 weights in groups of 128 (64, 32 where 128 does not divide; weight-only): "
                    "int4_weight_only_linear"),
    "2:4": ("2:4", "weights pruned 2:4 by magnitude, Fuse, LowerSparse: sparse24_linear"),
    "bsr50": ("blocks", "50% of each weight's --block square blocks pruned by norm, Fuse, LowerSparse: "
                        "bsr_linear"),
    "w8a8-bsr50": ("blocks", "bsr50's weights, then W8A8 as above and LowerSparse: bsr_int8_gemm"),
}


def int4_group(size: str) -> int:
    """The widest group (128, 64, 32) dividing the size's hidden and intermediate widths (every linear's K)."""
    h, inter = SIZES[size][:2]
    return next(g for g in (128, 64, 32) if h % g == 0 and inter % g == 0)


def passes_for(scheme: str, block: int = 64, group: int = 128) -> list:
    from slimfx import passes as P
    w8a8 = P.Quantize(weights="int8", activations="dynamic", exclude=("lm_head",))
    sparse = P.LowerSparse(pattern="block" if "bsr" in scheme else "2:4", block=(block, block),
                           exclude=("lm_head",))
    table = {"w8a8": [w8a8, P.Fuse()], "w8a16": [P.Quantize(weights="int8", exclude=("lm_head",))],
             "w4a16": [P.Quantize(weights="int4", group_size=group, exclude=("lm_head",))],
             "2:4": [P.Fuse(), sparse], "bsr50": [P.Fuse(), sparse], "w8a8-bsr50": [w8a8, P.Fuse(), sparse]}
    if scheme not in table:
        raise ValueError(f"--schemes: unknown scheme {scheme!r} ({', '.join(SCHEMES)})")
    return ["cse", "dce", *table[scheme]]


def pruned(model, how: str, block: int, fraction: float = 0.5):
    """A copy of ``model`` with every linear weight but lm_head pruned by magnitude: "2:4" keeps the two
    largest of each 4 along K; "blocks" zeroes the ``fraction`` of (block x block) tiles with the smallest
    norms (dims that are not multiples of the block: the layer stays dense). A stand-in for a real pruning
    pass: on random weights only the shapes and the sparsity matter."""
    import copy
    import torch
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
                continue
            w = mod.weight
            n, k = w.shape
            if how == "2:4":
                g = w.view(n, k // 4, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
                g.masked_fill_(~keep, 0)
            elif n % block == 0 and k % block == 0:
                tiles = w.view(n // block, block, k // block, block)
                norms = tiles.float().pow(2).sum((1, 3))
                cut = norms.flatten().kthvalue(max(1, int(fraction * norms.numel()))).values
                tiles.masked_fill_((norms <= cut)[:, None, :, None], 0)
    return m


def attempt(fn) -> dict:
    """fn()'s result (a float is the ms), or ms None and the error as a note: one failing row (a capture
    that meets a host sync, a kernel that does not fit) does not lose the others."""
    try:
        r = fn()
        return dict(ms=r) if isinstance(r, float) else r
    except Exception as e:  # noqa: BLE001 - reported in the table
        return dict(ms=None, note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.size, args.block = "smoke", 32           # int8 blocks are >= 32 wide (w8a8-bsr50)
    import torch
    import slimfx
    if not args.smoke and not torch.cuda.is_available():
        print("bench/llama_gpu.py: no CUDA device here (--smoke runs a tiny model on the CPU interpreter)",
              file=sys.stderr)
        return 2
    dev = "cpu" if args.smoke else "cuda"
    seqs = [int(s) for s in args.seqs.split(",") if s] if not args.smoke else [2, 8]
    if min(seqs) < 2:
        raise SystemExit("--seqs: lengths >= 2 (see the module docstring)")
    unknown = [x for x in args.schemes.split(",") if x and x not in SCHEMES]
    if unknown:
        raise SystemExit(f"--schemes: unknown {unknown}; the schemes: {', '.join(SCHEMES)}")
    model = build(args.size, 0 if args.smoke else args.layers)
    vocab = model.config.vocab_size
    example = torch.randint(0, vocab, (1, 16))

    if args.smoke:
        def timer(fn):               # one call: the rows' first call (the cosine's) has warmed it up
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        graph_timer = None
        timing = SMOKE_TIMING
    else:
        timing = "median of triton.testing.do_bench; the torch CUDA graph row: of do_bench_cudagraph"
        import triton.testing
        def timer(fn):
            return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))

        def graph_timer(fn):
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))

    rows, compile_s = [], {}
    held_mb = {"torch bf16": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6, 2)}
    gpu_model = model.to(dev)               # (in place: the baselines run first, then it goes back to the CPU)
    with torch.no_grad():
        inputs = {s: torch.randint(0, vocab, (1, s), device=dev) for s in seqs}
        refs = {s: logits(gpu_model(ids)).float() for s, ids in inputs.items()}
        for s, ids in inputs.items():
            rows.append(dict(seq=s, path="torch bf16 eager", ms=timer(lambda: gpu_model(ids)), cosine=1.0))
            if graph_timer:
                rows.append(dict(seq=s, path="torch bf16 CUDA graph", cosine=1.0,
                                 **attempt(lambda: graph_timer(lambda: gpu_model(ids)))))
        cpu_model = model.to("cpu")                       # capture and passes run on the CPU
        from slimfx.backends import lower
        pruned_models, pruned_refs, sparse_layers, captures = {}, {}, {}, {}
        for scheme in [x for x in args.schemes.split(",") if x]:
            how = SCHEMES[scheme][0]
            if how is not None and how not in pruned_models:     # its reference: the pruned model in torch
                pruned_models[how] = pruned(cpu_model, how, args.block)
                gpu_pruned = pruned_models[how].to(dev)
                pruned_refs[how] = {s: logits(gpu_pruned(ids)).float() for s, ids in inputs.items()}
                pruned_models[how] = gpu_pruned.to("cpu")
            scheme_refs = refs if how is None else pruned_refs[how]
            t0 = time.perf_counter()
            if how not in captures:          # one capture per model (dense, each pruned one), shared by its schemes
                captures[how] = slimfx.capture(pruned_models.get(how, cpu_model), (example,), dynamic=True)
            cm = slimfx.compile(captures[how], passes=passes_for(scheme, args.block, int4_group(args.size)),
                                backend="torch", measure=False, progress=False)
            compile_s[f"slimfx {scheme}"] = round(time.perf_counter() - t0, 1)     # its capture in the first
            if how is not None:          # that the pruned layers did reach the sparse kernels' ops
                from slimfx import ir
                sparse_layers[scheme] = sum(1 for n in cm.graph.graph.nodes if n.op == "call_function" and (
                    n.target is torch.ops.slimfx.sparse_linear.default
                    or (n.meta.get("slimfx") is not None and ir.meta.info(n).sparse)))
            for graphs in ((False,) if args.smoke else (False, True)):
                exe = lower(cm.graph, "triton", {"cuda_graphs": graphs} if graphs else None)
                name = f"slimfx {scheme} {'graphs' if graphs else 'eager'}"
                for s, ids in inputs.items():
                    def run_row(ids=ids, s=s, ref=scheme_refs):
                        t0 = time.perf_counter()
                        y = logits(exe((ids,), {})).float()      # first call: choices, tuning, capture
                        first_s = round(time.perf_counter() - t0, 1)
                        cos = float(torch.nn.functional.cosine_similarity(y.flatten(), ref[s].flatten(), dim=0))
                        return dict(ms=timer(lambda: exe((ids,), {})), cosine=round(cos, 5), first_call_s=first_s)
                    rows.append(dict(seq=s, path=name, **attempt(run_row)))
                    print(rows[-1], flush=True)
                if not graphs:              # after every length's choices: what stays on the device
                    held_mb[f"slimfx {scheme}"] = {k: round(v / 1e6, 2) for k, v in exe.program.held_bytes().items()}
    card = "cpu (interpreter smoke)" if args.smoke else torch.cuda.get_device_name()
    meta = dict(card=card, size=args.size, dims=SIZES[args.size], layers=model.config.num_hidden_layers,
                torch=torch.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), compile_s=compile_s,
                sparse_layers=sparse_layers, held_mb=held_mb, smoke=args.smoke, timing=timing)
    md = markdown(rows, meta)
    print(md)
    if not args.smoke or args.out_dir:
        write_results(args.out_dir or RESULTS, args.stem, meta, rows, md)
    return 0


def write_results(out_dir: Path, stem: str, meta: dict, rows: list[dict], md: str) -> None:
    """<out_dir>/<stem>-<card>.json (meta with its provenance, and rows) and .md."""
    from kernel_report import card_slug
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-{card_slug(meta['card'])}"
    meta = {**meta, "provenance": provenance(meta["card"])}
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    path.with_suffix(".md").write_text(md)
    print(f"wrote {path}.json and .md")


def markdown(rows: list[dict], meta: dict) -> str:
    """One row per path, one column per sequence length: ms and speedup vs torch bf16 eager."""
    seqs = sorted({r["seq"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    cell = {(r["path"], r["seq"]): r for r in rows}
    base = {s: cell[("torch bf16 eager", s)]["ms"] for s in seqs}
    lines = [f"# Llama-shaped model end to end: {meta['card']}", "",
             f"{meta['size']} dims (hidden, intermediate, layers, heads, kv heads, vocab) = {meta['dims']}, "
             f"{meta['layers']} layers, random bf16 weights, batch 1, no KV cache (seq 2: decode-shaped linears); "
             f"torch {meta['torch']}, {meta['date']}. Cells: ms "
             f"({meta.get('timing', 'median of triton.testing.do_bench')}) and speedup vs torch bf16 eager; "
             "cos: cosine of the logits to "
             "torch's (the sparse schemes': to the pruned model in torch). Compile times (s; a model's first scheme "
             "includes its capture, which the others reuse): "
             + ", ".join(f"{k} {v}" for k, v in meta["compile_s"].items()) + "."
             + "".join(f" Layers on sparse kernels, {k}: {v}." for k, v in meta.get("sparse_layers", {}).items())
             + held_line(meta.get("held_mb")),
             "", "| path | " + " | ".join(f"seq {s}" for s in seqs) + " |", "|---|" + "---:|" * len(seqs)]
    for p in paths:
        cells = []
        for s in seqs:
            r = cell.get((p, s))
            ok = r is not None and r.get("ms")
            cells.append(f"{r['ms']:.3f} ms ({base[s] / r['ms']:.2f}x, cos {r['cosine']:.4f})" if ok else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return finish_markdown(lines, [f"- {r['path']}, seq {r['seq']}: {r['note']}" for r in rows if r.get("note")])


def held_line(held: dict | None) -> str:
    """The sentence on the weights each path holds on the device (MB), from meta's held_mb: TritonProgram.held_bytes
    after the eager rows, the tensors the program keeps and the dense copies buckets choosing the dense path
    rebuilt."""
    if not held:
        return ""
    cells = [f"{k} {v}" if not isinstance(v, dict) else
             f"{k} {v['weights']}" + (f" + {v['dense_copies']} dense copies" if v["dense_copies"] else "")
             for k, v in held.items()]
    return " Weights on the device (MB; lm_head and embeddings bf16 in all): " + ", ".join(cells) + "."


def finish_markdown(lines: list[str], notes: list[str]) -> str:
    """The table's lines, then the paths that did not run with why (when any), as one markdown text."""
    if notes:
        lines = [*lines, "", "Did not run:", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
