"""Benchmarks import the model loaders from here; they live in slimfx.zoo."""
from slimfx.zoo import (english_sentences, english_text, load_minilm, load_smollm2,  # noqa: F401
                        smollm2_gguf)
