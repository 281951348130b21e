"""Prune's statistics say what it did not do, and why: mixture-of-experts tensors the zero patterns leave dense,
structured pruning after Fuse / Quantize / LowerSparse (the layers are no longer float linears: prune before),
a sparsity that would remove every unit of a block (one stays), and compile_causal_lm's step graph, whose keys
and values are the KV cache it returns (kv heads stay; query_heads prunes there)."""
import pytest
import torch

import slimfx
from slimfx import passes as P

from conftest import text_batch

BEFORE = "(prune before Quantize, Fuse and LowerSparse)"


def _last_stats(cap, passes) -> dict:
    cm = slimfx.compile(cap, backend="torch", progress=False, passes=passes)
    return cm.report().records[-1].stats


@pytest.fixture(scope="module")
def tiny_mixtral_gm():
    import transformers as T
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                                 num_key_value_heads=2, num_hidden_layers=2, intermediate_size=56,
                                                 num_local_experts=4, num_experts_per_tok=2)).eval()
    ids, mask = text_batch(2, 6, 97, seed=0)
    return lambda: slimfx.capture(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False)).captured.gm


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4"), dict(sparsity=0.5, pattern="block", block=16)])
def test_zero_patterns_list_the_expert_tensors_they_leave_dense(tiny_mixtral_gm, kw):
    """Unstructured, N:M and block pruning zero linear layers (the router among them, an ordinary linear); the
    experts' 3-D tensors stay dense, each in "skipped" with the patterns that do shrink them, and the statistics
    say the sparsity covers the pruned layers only."""
    gm = tiny_mixtral_gm()
    stats = P.Prune(score="magnitude", **kw)(gm).stats
    experts = {f"model.layers.{i}.mlp.experts.{t}" for i in range(2) for t in ("gate_up_proj", "down_proj")}
    assert experts <= set(stats["skipped"])
    assert all("pattern='experts' or 'neurons'" in stats["skipped"][e] for e in experts)
    assert stats["experts_left"] == 4 and "4 experts' tensor(s)" in stats["sparsity_covers"]
    assert "model.layers.0.mlp.gate" in stats["pruned"]
    # exclude keeps a tensor out of the statistics as it keeps a layer out
    stats = P.Prune(score="magnitude", exclude="*.experts.*", **kw)(tiny_mixtral_gm()).stats
    assert not experts & set(stats["skipped"]) and "experts_left" not in stats


@pytest.mark.parametrize("pattern", ["heads", "query_heads"])
def test_heads_after_fuse_quantize_or_lowersparse_say_prune_before(tiny_llama_capture, pattern):
    """After Fuse (o_proj a fused_linear with the residual), Quantize (quantized_linear) or LowerSparse
    (sparse_linear), each attention block is left whole with the reason neuron pruning gives."""
    sp = 0.5
    for passes in ([P.Fuse()], [P.Quantize(weights="int8", activations="dynamic")],
                   [P.Prune(pattern="2:4"), P.LowerSparse()]):
        stats = _last_stats(tiny_llama_capture, [*passes, P.Prune(sparsity=sp, pattern=pattern)])
        assert stats["shrunk"] == {}
        assert set(stats["skipped"]) == {f"model.layers.{i}.self_attn" for i in range(2)}, passes
        assert all(BEFORE in why for why in stats["skipped"].values()), (passes, stats["skipped"])


def test_neurons_after_fuse_list_only_the_mlp_blocks(tiny_llama_capture):
    """The residual a fused linear adds keeps the residual stream what it is: lm_head and the layers reading the
    norms are not neuron blocks; only the MLPs are skipped, under their consumers' names, saying prune before."""
    stats = _last_stats(tiny_llama_capture, [P.Fuse(), P.Prune(sparsity=0.25, pattern="neurons")])
    assert stats["skipped"] == {f"model.layers.{i}.mlp.down_proj": f"model.layers.{i}.mlp.down_proj is not a float "
                                f"linear layer with its weight as a tensor {BEFORE}" for i in range(2)}


def test_structured_sparsity_one_keeps_one_unit_per_block_and_says_so(tiny_llama_capture):
    stats = _last_stats(tiny_llama_capture, [P.Prune(sparsity=1.0, pattern="neurons")])
    assert stats["shrunk"]["model.layers.0.mlp.down_proj"] == \
        "80 -> 1 neurons (sparsity 1 asks for all 80 neurons: one stays)"
    stats = _last_stats(tiny_llama_capture, [P.Prune(sparsity=1.0, pattern="heads")])
    assert stats["shrunk"]["model.layers.1.self_attn"] == \
        "2 -> 1 kv heads (sparsity 1 asks for all 2 kv heads: one stays)"
    stats = _last_stats(tiny_llama_capture, [P.Prune(sparsity=0.5, pattern="heads")])
    assert stats["shrunk"]["model.layers.1.self_attn"] == "2 -> 1 kv heads"


def test_heads_in_the_causal_lm_step_name_the_kv_cache(tiny_llama):
    """The step graph returns keys and values (the new cache): kv heads cannot go there, and the reason says so
    and points to query_heads (which prunes that graph)."""
    cal = [text_batch(2, 8, 97, seed=s)[0] for s in range(2)]
    lm = slimfx.compile_causal_lm(tiny_llama, passes=[P.Prune(sparsity=0.5, pattern="heads")], calibration=cal,
                                  backend="torch", progress=False)
    skipped = {k: v for r in lm.report().records for k, v in (r.stats or {}).get("skipped", {}).items()}
    assert skipped and all("KV cache" in why and "pattern='query_heads'" in why for why in skipped.values()), skipped
