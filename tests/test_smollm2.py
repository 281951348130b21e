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
