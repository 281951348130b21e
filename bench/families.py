"""Which transformers model families slimfx compiles: a support matrix beyond the families the tests check.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/families.py                    # every family below (~15 min, 2 cores)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/families.py --families mamba,gpt_oss [--update]

Per family, a tiny random-weight causal LM from its own config class (hidden 32, 4 heads, 2 layers; MoE with
4 experts, top 2), then: capture (``slimfx.compile``, dynamic batch and sequence), the numpy backend's logits
against torch's (relative max error; fp32, so summation order only: ~1e-7), and W8A8 (int8 per channel x int8
per token, every linear, MoE experts weight-only int8) + Fuse on numpy, as SQNR of the logits in dB. Half of each
attention block's kv heads and a quarter of each feed-forward block's neurons are removed (``Prune(pattern=
"heads")``, ``"neurons"``, on numpy), and apart half the q heads in each kv group (``"query_heads"``), and compared
with the model with those units zeroed (tests/conftest.py's ``zero_what_the_graph_removed``); the blocks left whole
are listed with the reasons in the JSON. MoE families
also lose a quarter of each block's experts (``Prune(pattern="experts")``, on numpy) and are compared with the
model whose removed experts are never chosen (tests/conftest.py's ``experts_never_chosen``), or say why a block
stays whole; and their experts are quantized int4 (groups of 16) with ``Quantize(awq=True)``: its MoE scaling alone
must keep the model's function, and the logits' SQNR is shown next to rounding to nearest's. Last, text generation
with a KV cache (``slimfx.compile_causal_lm``, torch backend): 8 greedy tokens after a left-padded batch of two
prompts, against transformers' own ``generate``, or the reason the model is refused; and its step graph W8A8 +
Fuse on numpy, decode steps against a fresh prefill of the whole sequence. Parameters
that a family's init leaves at zero (routers) are drawn at random first: all-zero router scores tie, and torch's
and numpy's top-k break exact ties differently. A failure is recorded with its message. Writes
bench/results/families-<cpu>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import slimfx  # noqa: E402
from bench.common import cpu_name, description, save, slug  # noqa: E402
from conftest import (experts_never_chosen, moe_awq_only, rel_err, text_batch,  # noqa: E402
                      zero_what_the_graph_removed)
from slimfx.ir.module import flatten_inputs  # noqa: E402
from slimfx.passes import Fuse, Prune, Quantize, sqnr_db  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=64, max_position_embeddings=64, head_dim=8, num_experts=4, num_local_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, pad_token_id=0)
# what a family's config needs beyond BASE to be a valid tiny model
EXTRA = {
    "gptj": dict(rotary_dim=4), "codegen": dict(rotary_dim=4),
    "dots1": dict(first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1),
    "deepseek_v3": dict(first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "mamba2": dict(num_heads=8, head_dim=8, expand=2, n_groups=1),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=8, mamba_expand=2, attn_layer_indices=[1]),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["full_attention", "conv"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),     # (its gated attention too)
}
DROP = {"falcon": ("head_dim",),                       # a read-only property there
        "deepseek_v3": ("num_key_value_heads", "head_dim")}   # latent attention: every head reads the latents
NO_USE_CACHE = {"granitemoe", "granitemoehybrid"}     # use_cache only through **kwargs (see the README)
FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "stablelm", "olmo",
    "olmo2", "olmo3", "granite", "gpt_neox", "gpt2", "gpt_bigcode", "gptj", "codegen", "opt", "falcon", "bloom",
    "mpt", "xglm", "persimmon", "nemotron", "cohere", "starcoder2", "smollm3", "glm", "glm4", "helium",
    "exaone4", "ernie4_5", "seed_oss", "apertus", "arcee", "bitnet", "doge", "hunyuan_v1_dense", "lfm2",
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "deepseek_v3", "dots1", "gpt_oss",
    "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax", "minimax_m2", "flex_olmo", "afmoe", "lfm2_moe",
    "mamba", "mamba2", "jamba", "bamba", "falcon_h1", "qwen3_next", "kimi_linear",
]


def experts_pruned(captured, call) -> str:
    """A quarter of each MoE block's experts removed: the blocks' counts and the logits' error against the
    model with those experts never chosen, or why the blocks stay whole."""
    pruned = slimfx.compile(captured, backend="numpy", progress=False,
                            passes=[Prune(sparsity=0.25, pattern="experts")])
    stats = pruned.report().records[0].stats
    if not stats["shrunk"]:
        return "whole: " + "; ".join(sorted(set(stats["skipped"].values())))
    ref_gm = experts_never_chosen(captured.graph, stats["removed"])
    with torch.no_grad():
        ref = ref_gm(*flatten_inputs(ref_gm, (), call))[0]
    counts = ", ".join(sorted(set(stats["shrunk"].values())))
    blocks = len(stats["shrunk"])
    return f"{blocks} block{'s' * (blocks > 1)} {counts}: {rel_err(pruned(**call).logits, ref):.1e}"


def experts_awq(captured, call, ref) -> str:
    """Quantize(awq=True) on the experts: its MoE step alone (the float graph's error against the model: the
    scaling must keep the function), what it scaled, and the logits' SQNR with int4 g16 experts by AWQ vs by
    rounding to nearest."""
    scaled, c, records = moe_awq_only(captured, call)
    sqnr = {}
    for awq in (False, True):
        q = slimfx.compile(captured, backend="torch", progress=False, calibration=[call],
                           passes=[Quantize(weights="int4", group_size=16, awq=awq, include=("*.experts",))])
        sqnr[awq] = sqnr_db(ref, q(**call).logits)
    why = sorted({r.get("why_not") or r.get("down", {}).get("why_not") for r in records.values()} - {None})
    down = f"down {c['down_scaled']}/{c['down_scaled'] + c['down_unscaled']} experts" if not c["down_left"] else \
        f"down left in {c['down_left']} block{'s' * (c['down_left'] > 1)}"
    return (f"inputs {c['norm'] + c['linear'] + c['mul']}/{c['blocks']} ({c['norm']} norm, {c['mul']} mul), {down}: "
            f"{rel_err(scaled(**call).logits, ref):.1e}; W4 {sqnr[True]:.1f} vs RTN {sqnr[False]:.1f} dB"
            + (f" ({'; '.join(why)})" if why else ""))


def generation(model) -> str:
    """8 greedy tokens from compile_causal_lm (torch backend) after a left-padded batch of 2 prompts of 9 tokens:
    how many of the 16 equal transformers' generate, or why the model is refused; then the step graph quantized
    W8A8 (dynamic per token) + Fuse on numpy: its decode steps' logits against a fresh prefill of the whole
    sequence, 4 tokens on (the cache consistent through the quantized graph; per-token scales keep rows apart)."""
    ids, mask = text_batch(2, 9, 97, pad_left=True, seed=1)
    mask[:, -1] = 1
    try:
        lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
        got = lm.generate(ids, mask, max_new_tokens=8)[:, 9:]
    except Exception as e:                          # TypeError: a refusal, with its reason
        return f"{'refused' if isinstance(e, TypeError) else 'fails'}: {str(e).splitlines()[0][:160]}"
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 9:]
    said = f"{int((got == ref).sum())}/{ref.numel()} tokens equal"
    try:
        q = slimfx.compile_causal_lm(model, backend="numpy", progress=False,
                                     passes=[Quantize(weights="int8", activations="dynamic-per-token"), Fuse()])
        logits, state = q.prefill(ids, mask)
        seq, seen, tok, worst = ids, mask, logits[:, -1].argmax(-1), 0.0
        for _ in range(4):
            step = q.decode(tok, state)
            seq, seen = torch.cat([seq, tok[:, None]], 1), torch.cat([seen, torch.ones_like(seen[:, :1])], 1)
            worst = max(worst, rel_err(step, q.prefill(seq, seen)[0][:, -1]))
            tok = step.argmax(-1)
    except Exception as e:
        return f"{said}; W8A8 fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return f"{said}; W8A8 decode vs prefill {worst:.1e}"


def units_pruned(model, captured, call) -> dict:
    """Half of each attention block's kv head groups and a quarter of each feed-forward block's neurons removed,
    and, apart, half the q heads in each kv group: how many blocks shrank of those found, the logits' largest
    error against the model with those units zeroed, and why the others stay whole."""
    errs, stats = [], []
    for passes in ([Prune(sparsity=0.5, pattern="heads"), Prune(sparsity=0.25, pattern="neurons")],
                   [Prune(sparsity=0.5, pattern="query_heads")]):
        pruned = slimfx.compile(captured, backend="numpy", progress=False, passes=passes)
        stats += [r.stats for r in pruned.report().records]
        zeroed, _ = zero_what_the_graph_removed(model, pruned.graph)
        with torch.no_grad():
            errs.append(rel_err(pruned(**call).logits, zeroed(**call).logits))
    heads, neurons, q_heads = stats
    count = lambda st: f"{len(st['shrunk'])}/{len(st['shrunk']) + len(st['skipped'])}"     # noqa: E731
    return {"units_pruned": f"heads {count(heads)}, q heads {count(q_heads)}, neurons {count(neurons)}: "
                            f"{max(errs):.1e}",
            "units_whole": sorted(set(heads["skipped"].values()) | set(neurons["skipped"].values())),
            "q_heads_whole": sorted(set(q_heads["skipped"].values()))}


def check(family: str) -> dict:
    import transformers as T
    kwargs = {k: v for k, v in {**BASE, **EXTRA.get(family, {})}.items() if k not in DROP.get(family, ())}
    if family in NO_USE_CACHE:
        kwargs["use_cache"] = False
    cfg = T.AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    ids, mask = text_batch(2, 9, 97, pad_left=True, seed=1)
    call = dict(input_ids=ids, attention_mask=mask)
    if family not in NO_USE_CACHE:
        call["use_cache"] = False
    with torch.no_grad():
        ref = model(**call).logits
    row = {"family": family, "model": type(model).__name__,
           "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    captured = slimfx.capture(model, (), call, dynamic=True)          # both compiles start from it
    cm = slimfx.compile(captured, backend="numpy", progress=False)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["numpy_rel_err"] = float(rel_err(cm(**call).logits, ref))
    q = slimfx.compile(captured, backend="numpy", progress=False,
                       passes=[Quantize(weights="int8", activations="dynamic"), Fuse()])
    row["w8a8_sqnr_db"] = round(float(sqnr_db(ref, q(**call).logits)), 1)
    if any(p.ndim == 3 and ".experts." in n for n, p in model.named_parameters()):
        row["experts_pruned"] = experts_pruned(captured, call)
        row["experts_awq"] = experts_awq(captured, call, ref)
    row.update(units_pruned(model, captured, call))
    row["generate"] = generation(model)
    return row


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated transformers model types")
    ap.add_argument("--name", default="families", help="results file name (before the CPU name)")
    ap.add_argument("--update", action="store_true",
                    help="replace only these families' rows in the saved results of this machine")
    args = ap.parse_args()
    chosen = [f for f in args.families.split(",") if f]
    saved = ROOT / "bench" / "results" / f"{args.name}-{slug(cpu_name())}.json"
    if set(chosen) != set(FAMILIES) and not args.update and saved.is_file():
        ap.error(f"--families gives {len(chosen)} of the {len(FAMILIES)} families: it would write over the whole "
                 f"matrix in {saved.relative_to(ROOT)}; add --update to replace those rows there, or --name to "
                 f"write a file of its own")
    warnings.filterwarnings("ignore")
    rows = []
    for family in tqdm(chosen, desc="families"):
        try:
            rows.append(check(family))
        except Exception as e:           # recorded, not raised: the matrix shows what fails and why
            rows.append({"family": family, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        tqdm.write(str(rows[-1]))
    if args.update and saved.is_file():
        new = {r["family"]: r for r in rows}
        old = json.loads(saved.read_text())["rows"]
        rows = [new.pop(r["family"], r) for r in old] + list(new.values())
    ok = [r for r in rows if "error" not in r]
    lines = [f"# Model families on slimfx ({len(ok)} of {len(rows)} compile)", "",
             "Tiny random-weight configs; numpy vs torch logits (fp32: summation order only), W8A8 dynamic + Fuse "
             "on numpy (SQNR of the logits); kv heads -50% and neurons -25%, and apart q heads -50% per kv group: "
             "blocks shrunk of those found, the larger rel. error vs the model with those units zeroed (the JSON says "
             "why a block stays whole); MoE: a quarter of each block's experts removed, rel. error vs the model with "
             "them never chosen; AWQ on the experts: block inputs and experts' down inputs scaled, the scaled float "
             "graph's rel. error vs the model, the logits' "
             "SQNR with int4 g16 experts by AWQ vs by rounding to nearest (random weights have no outlier channels); "
             "generate: compile_causal_lm's 8 greedy tokens x 2 left-padded prompts equal to transformers' generate, "
             "or why the model is refused, and its step graph W8A8 + Fuse on numpy: the decode steps' logits vs a "
             "fresh prefill of the whole sequence (rel. error). "
             "`HF_HUB_OFFLINE=1 .venv/bin/python bench/families.py`", "",
             "| family | model | compile s | numpy rel. error | W8A8 SQNR dB | heads, q heads, neurons | experts -25% "
             "| experts AWQ | generate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | fails: {r['error'].replace('|', '/')} | | | | | | | |")
        else:
            lines.append(f"| {r['family']} | {r['model']} | {r['compile_s']} | {r['numpy_rel_err']:.1e} | "
                         f"{r['w8a8_sqnr_db']} | {r.get('units_pruned', '')} | "
                         f"{r.get('experts_pruned', '').replace('|', '/')} | {r.get('experts_awq', '')} | "
                         f"{r.get('generate', '').replace('|', '/')} |")
    import transformers
    save(args.name, cpu_name(), {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
