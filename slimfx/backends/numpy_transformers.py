"""numpy implementations of the custom ops that transformers defines (``torch.ops.transformers.*``), which appear in
graphs captured from its models: the grouped matmul its mixture-of-experts layers (Mixtral, Qwen2-MoE, ...) run
when torch's own grouped_mm can't be used, as under export with float32 weights.

transformers versions differ in which of these ops they define (5.24 has grouped_mm_fallback; older ones may not),
so each is registered only where the installed transformers defines it. The ops come into existence when
transformers.integrations.moe is imported; a model's import does that, but this module may run first (the numpy
backend lowered a plain module before any model was built), so it imports it itself when transformers is installed.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from .optable import numpy_op


def transformers_op(name: str):
    """``torch.ops.transformers.<name>.default``, or None where transformers is absent or doesn't define it."""
    if importlib.util.find_spec("transformers") is None:
        return None
    try:
        import transformers.integrations.moe  # noqa: F401 - defines the torch.ops.transformers ops
    except ImportError:
        return None
    packet = getattr(torch.ops.transformers, name, None)
    return getattr(packet, "default", None)


def grouped_mm_fallback(x, weight, offs):
    """Row block e of x times weight[e], block e being rows [offs[e-1], offs[e]) (offs[-1] = 0): x (S, K) sorted
    by expert, weight (E, K, N), offs (E,) the running token counts. Rows past offs[E-1] stay zero. The same loop
    as transformers' reference: each expert's block starts where the previous one ended, and an empty one is skipped."""
    out = np.zeros((x.shape[0], weight.shape[2]), dtype=x.dtype)
    start = 0
    for e, end in enumerate(np.asarray(offs).tolist()):
        if start == end:
            continue
        out[start:end] = x[start:end] @ weight[e]
        start = end
    return out


_GROUPED_MM = transformers_op("grouped_mm_fallback")
if _GROUPED_MM is not None:
    numpy_op(_GROUPED_MM)(grouped_mm_fallback)
