"""The real SmolLM2-135M on the numpy backend. Slow (20 s to load, ~30 s to run): `pytest -m slow`."""
import pytest
import torch

import slimfx
from conftest import rel_err

pytestmark = pytest.mark.slow


def test_smollm2_numpy_matches_torch():
    pytest.importorskip("gguf")
    from slimfx.zoo import load_smollm2
    model, tok = load_smollm2()
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Compilers turn programs into machine code"], padding=True,
              return_tensors="pt")
    kw = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
    cm = slimfx.compile(model, (), kw, dynamic=True, passes=list(slimfx.passes.CLEANUP), progress=False)
    with torch.no_grad():
        ref = model(**kw).logits
    # 30 fp32 layers: reordering errors compound to ~1e-5; 1e-4 is the acceptance bound
    assert rel_err(cm(**kw).logits, ref) <= 1e-4


def test_smollm2_generates_what_transformers_generates():
    """compile_causal_lm on the numpy backend, greedy, a left-padded batch of two chat prompts: the same 24
    tokens per prompt as transformers' generate with its own KV cache."""
    pytest.importorskip("gguf")
    from slimfx.zoo import load_smollm2
    model, tok = load_smollm2()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is the capital of France?", "Name a prime number.")]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    lm = slimfx.compile_causal_lm(model, backend="numpy", progress=False, measure=False)
    got = lm.generate(enc.input_ids, enc.attention_mask, max_new_tokens=24)
    assert torch.equal(got, ref), (tok.batch_decode(got), tok.batch_decode(ref))
