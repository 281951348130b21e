"""slimfx: compress and accelerate PyTorch language models.

    cm = slimfx.compile(model, example_inputs, passes=["const_fold", "cse", "dce"], backend="numpy")
    out = cm(*inputs); print(cm.report())
    cm.save("folder"); cm = slimfx.load("folder", backend="triton")
"""
from . import ir, passes
from .api import CompiledModel, compile
from .io import load, save
from .ir import CaptureError, VerificationError
from .passes import Pass, PassContext, PassError, PassResult, register_pass
from .signature import InputError

__all__ = ["ir", "passes", "compile", "CompiledModel", "save", "load", "CaptureError", "VerificationError", "Pass",
           "PassContext", "PassError", "PassResult", "register_pass", "InputError"]
__version__ = "0.1.0"
