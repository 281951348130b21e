"""Passes: graph -> graph transformations with one protocol for built-in and user passes."""
from .base import PASSES, FunctionPass, Pass, PassContext, PassResult, as_pass, register_pass
from .cleanup import CLEANUP, CSE, DCE, ConstFold, Rewrite
from .fuse import Fuse, FuseLinearAct, FuseNormQuant, FuseResidual, MergeSiblings
from .manager import PassError, PassManager, PassRecord, sqnr_db
from .quantize import FoldQDQ, Quantize
from .quant_calibration import CalibrationError
from .smoothquant import SmoothQuant
from .distill import Distill
from .prune import Prune
from .sparse import LowerSparse
from .quant_sensitivity import format_sensitivity, sensitivity

__all__ = ["PASSES", "FunctionPass", "Pass", "PassContext", "PassResult", "as_pass", "register_pass", "CLEANUP",
           "CSE", "DCE", "ConstFold", "Rewrite", "PassError", "PassManager", "PassRecord", "sqnr_db",
           "Quantize", "FoldQDQ", "CalibrationError", "SmoothQuant", "sensitivity", "format_sensitivity",
           "Fuse", "FuseLinearAct", "FuseResidual", "MergeSiblings", "FuseNormQuant", "LowerSparse",
           "Prune", "Distill"]
