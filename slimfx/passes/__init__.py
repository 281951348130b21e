"""Passes: graph -> graph transformations with one protocol for built-in and user passes."""
from .base import PASSES, FunctionPass, Pass, PassContext, PassResult, as_pass, register_pass
from .cleanup import CLEANUP, CSE, DCE, ConstFold, Rewrite
from .manager import PassError, PassManager, PassRecord, sqnr_db

__all__ = ["PASSES", "FunctionPass", "Pass", "PassContext", "PassResult", "as_pass", "register_pass", "CLEANUP",
           "CSE", "DCE", "ConstFold", "Rewrite", "PassError", "PassManager", "PassRecord", "sqnr_db"]
