"""slimfx: compress and accelerate PyTorch language models.

    cm = slimfx.compile(model, example_inputs, passes=["const_fold", "cse", "dce"], backend="numpy")
    out = cm(*inputs); print(cm.report())
    cm.save("folder"); cm = slimfx.load("folder", backend="triton")
    cap = slimfx.capture(model, example_inputs); cm = slimfx.compile(cap, passes=[...])   # capture once, sweep
    lm = slimfx.compile_causal_lm(hf_model, passes=[...]); lm.generate(ids, max_new_tokens=32)
    lm = slimfx.compile_seq2seq_lm(t5_or_whisper, passes=[...]); lm.generate(ids, mask, max_new_tokens=32)
"""
from . import ir, passes
from .api import CapturedModel, CompiledModel, capture, compile
from .io import load, save
from .lm import CompiledCausalLM, compile_causal_lm
from .seq2seq import CompiledSeq2SeqLM, compile_seq2seq_lm
from .ir import CaptureError, VerificationError
from .passes import Pass, PassContext, PassError, PassResult, register_pass
from .signature import InputError

__all__ = ["ir", "passes", "capture", "CapturedModel", "compile", "CompiledModel", "compile_causal_lm",
           "CompiledCausalLM", "compile_seq2seq_lm", "CompiledSeq2SeqLM", "save", "load", "CaptureError",
           "VerificationError", "Pass", "PassContext",
           "PassError", "PassResult", "register_pass", "InputError"]
__version__ = "0.1.0"
