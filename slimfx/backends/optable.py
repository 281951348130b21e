"""The numpy backend's one op table: ``{op target: numpy implementation}``.

An implementation receives the node's arguments with every tensor already converted to a numpy array
(and symbolic ints to Python ints) and returns numpy arrays (or Python scalars / tuples of them).
Register with the decorator; modules that define implementations are imported by the numpy backend.

    @numpy_op(torch.ops.aten.relu.default)
    def relu(x):
        return np.maximum(x, 0)
"""
from __future__ import annotations

from typing import Callable

NUMPY_OPS: dict[object, Callable] = {}


def numpy_op(*targets):
    """Register one numpy function for one or more op targets (OpOverloads, packets or Python callables)."""
    def register(fn):
        for t in targets:
            NUMPY_OPS[t] = fn
        return fn
    return register
