"""Kernel tests run everywhere: on a GPU natively, on the CPU under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at
collection time, before any test module imports slimfx.kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:   # correctness, not speed: one config per kernel variant (bench/kernel_bench.py tunes and checks big shapes)
    os.environ.setdefault("SLIMFX_AUTOTUNE", "0")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def dev() -> str:
    return DEVICE


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed CPU generator: every test draws fresh but reproducible inputs."""
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    """Under the interpreter, triton warns about numpy scalar conversion and exp overflowing to inf
    (sigmoid of a large negative: the correct 0). Neither says anything about our kernels."""
    for item in items:
        if "tests/test_kernels" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"))
            item.add_marker(pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"))
