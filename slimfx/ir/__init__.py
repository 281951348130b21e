"""The slimfx IR: a torch.fx GraphModule in the canonical ATen op set, with typed node metadata."""
from . import meta
from .canonical import canonicalize, eliminate_dead_code
from .capture import CaptureError, Captured, capture, eval_mode, made_in_inference_mode
from .module import drop_unused_tensors, flatten_inputs, fork, own_state, state_kept, state_tensors, tensors
from .graphview import match, to_dot, to_networkx, topological_order
from .printer import code, op_counts, table
from .propagate import propagate_meta
from .rewrite import Rule, RuleError, apply_rules
from .verify import VerificationError, input_signature, output_signature, verify

__all__ = ["meta", "flatten_inputs", "fork", "tensors", "state_tensors", "own_state", "state_kept",
           "drop_unused_tensors", "canonicalize", "eliminate_dead_code", "CaptureError", "Captured", "capture",
           "eval_mode",
           "made_in_inference_mode", "match", "to_dot",
           "to_networkx", "topological_order", "code", "op_counts", "table", "propagate_meta", "Rule", "RuleError",
           "apply_rules",
           "VerificationError", "input_signature", "output_signature", "verify"]
