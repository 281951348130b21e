"""Quantizing mixture-of-experts tensors on real weights: SmolLM2-135M upcycled into a Mixtral, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_moe_quant.py [--tokens 4096] [--experts 4] [--modes ...]

No real MoE checkpoint installs from PyPI, so this builds one from SmolLM2-135M: each layer's MLP copied into
``--experts`` experts (a transformers 5 Mixtral: gate_up and down as 3-D tensors, grouped GEMMs), top-2 of a
random router. The copies' routing weights are renormalized to sum to 1, so the model computes SmolLM2's
function (its perplexity is checked against SmolLM2's), while each expert sees its own share of the tokens,
as upcycled MoE models start out (Komatsuzaki et al. 2023, "Sparse Upcycling"). Then only the experts are
quantized, int4 in groups of 64 (attention, router and lm_head stay fp32), by each method, and the same
weights as SmolLM2's dense MLPs for comparison (identical experts round to the same integers: RTN on either
is the same model). Perplexity on held-out pydoc_data prose as in ``bench/smollm2_quant.py``; graphs run on
backend="torch". Writes bench/results/smollm2_moe_quant-<cpu>.json and .md.
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
from bench.models import load_smollm2  # noqa: E402
from bench.smollm2_quant import perplexity, text_windows  # noqa: E402
from slimfx.passes import Quantize  # noqa: E402


def upcycle(model, experts: int, top_k: int = 2, seed: int = 0):
    """A MixtralForCausalLM computing what the Llama ``model`` computes: every MLP copied into ``experts``
    experts behind a random router (N(0, 0.02) rows)."""
    import transformers as T
    c = model.config
    cfg = T.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, sliding_window=None,
        num_local_experts=experts, num_experts_per_tok=top_k, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, dtype=torch.float32)
    moe = T.MixtralForCausalLM(cfg).eval()
    sd = model.state_dict()
    new = {k: v for k, v in sd.items() if ".mlp." not in k}
    g = torch.Generator().manual_seed(seed)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = torch.cat([sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"]])
        new[p + "experts.gate_up_proj"] = gate_up[None].repeat(experts, 1, 1)
        new[p + "experts.down_proj"] = sd[p + "down_proj.weight"][None].repeat(experts, 1, 1)
        new[p + "gate.weight"] = torch.randn(experts, c.hidden_size, generator=g) * 0.02
    missing, unexpected = moe.load_state_dict(new, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"upcycling: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        moe.tie_weights()
    return moe


def main():
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--modes", default="all", help="comma-separated keys of the modes to run (default: all)")
    ap.add_argument("--name", default="smollm2_moe_quant")
    a = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    windows, calibration = text_windows(tok, a.tokens, a.window, a.calib)
    kw = dict(input_ids=windows[0], use_cache=False)
    moe = upcycle(dense, a.experts)
    experts = ("*.experts",)
    mlps = ("*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj")

    def w4(include, **opts):
        return [Quantize(weights="int4", group_size=64, include=include, **opts)]
    modes = {       # key: (label, model, passes)
        "rtn": ("experts W4 g64, round to nearest", "moe", w4(experts)),
        "clip": ("experts W4 g64, RTN + clip search", "moe", w4(experts, clip=True)),
        "awq": ("experts W4 g64, AWQ", "moe", w4(experts, awq=True)),
        "awq-clip": ("experts W4 g64, AWQ + clip search", "moe", w4(experts, awq=True, clip=True)),
        "gptq": ("experts W4 g64, GPTQ (act_order)", "moe", w4(experts, method="gptq")),
        "gptq-clip": ("experts W4 g64, GPTQ + clip search", "moe", w4(experts, method="gptq", clip=True)),
        "awq-gptq-clip": ("experts W4 g64, AWQ + GPTQ + clip search", "moe",
                          w4(experts, awq=True, method="gptq", clip=True)),
        "awq-gptq": ("experts W4 g64, AWQ + GPTQ", "moe", w4(experts, awq=True, method="gptq")),
        "dense-rtn": ("dense SmolLM2, MLPs W4 g64, round to nearest", "dense", w4(mlps)),
        "dense-awq": ("dense SmolLM2, MLPs W4 g64, AWQ", "dense", w4(mlps, awq=True)),
        "dense-awq-clip": ("dense SmolLM2, MLPs W4 g64, AWQ + clip search", "dense", w4(mlps, awq=True, clip=True)),
        "dense-gptq": ("dense SmolLM2, MLPs W4 g64, GPTQ (act_order)", "dense", w4(mlps, method="gptq")),
    }
    keys = list(modes) if a.modes == "all" else a.modes.split(",")
    if set(keys) - set(modes):
        raise SystemExit(f"--modes: unknown {sorted(set(keys) - set(modes))}; choose from {list(modes)}")
    rows = []
    t0 = time.perf_counter()
    fp32 = perplexity(lambda x: dense(input_ids=x, use_cache=False).logits, windows)
    rows.append({"mode": "fp32 SmolLM2-135M", "ppl": fp32, "seconds": time.perf_counter() - t0})
    t0 = time.perf_counter()
    moe_fp32 = perplexity(lambda x: moe(input_ids=x, use_cache=False).logits, windows)
    rows.append({"mode": f"fp32 upcycled ({a.experts} experts, top 2)", "ppl": moe_fp32,
                 "seconds": time.perf_counter() - t0})
    print(f"fp32: {fp32:.4f}, upcycled: {moe_fp32:.4f}", flush=True)
    captured = {"dense": slimfx.capture(dense, (), kw, dynamic=True), "moe": slimfx.capture(moe, (), kw, dynamic=True)}
    for key in keys:
        label, which, passes = modes[key]
        t0 = time.perf_counter()
        cm = slimfx.compile(captured[which], passes=passes, backend="torch", calibration=calibration,
                            progress=False, measure=False)
        stats = cm.report().records[-1].stats
        ppl = perplexity(lambda x: cm(input_ids=x, use_cache=False).logits, windows)
        rows.append({"mode": label, "key": key, "ppl": ppl, "seconds": time.perf_counter() - t0,
                     **({"awq": stats["awq"]} if "awq" in stats else {})})
        print(f"{label}: {ppl:.3f}", flush=True)
    for r in rows:
        r["vs_fp32"] = r["ppl"] / fp32 - 1
    cpu = cpu_name()
    head = (f"SmolLM2-135M upcycled to {a.experts} experts (top 2, random router), only the experts quantized; "
            f"perplexity on {len(windows)} windows x {a.window} held-out tokens, {a.calib} calibration windows; "
            f"backend='torch'; {cpu}. `HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_moe_quant.py`")
    lines = [head, "", "| mode | perplexity | vs fp32 | seconds (compile + perplexity) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ppl']:.3f} | {r['vs_fp32'] * 100:+.2f}% | {r['seconds']:.1f} |")
    md = "\n".join(lines)
    print(md)
    save(a.name, cpu, {"cpu": cpu, "tokens": len(windows) * a.window, "window": a.window, "experts": a.experts,
                       "calibration_windows": a.calib, "backend": "torch", "rows": rows}, md)


if __name__ == "__main__":
    main()
