"""The slimfx quantization ops as torch custom ops: registered once, each with a numpy twin, fake impls
that match the real outputs, and graphs holding them export with a dynamic batch dimension."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import slimfx.backends.numpy_quant  # noqa: F401
from slimfx.backends.optable import NUMPY_OPS
from slimfx.ir.dialect import QUANT_OPS

from qtest_util import assert_exact

ops = torch.ops.slimfx


def _sample_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, generator=g)  # 3-D, so (..., K) handling is exercised beyond the batch dim
    q = torch.randint(-127, 128, (2, 3, 37), dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (5, 37), dtype=torch.int8, generator=g)
    s_row = torch.rand(2, 3, 1, generator=g) * 0.1 + 1e-3
    s_w = torch.rand(5, generator=g) * 0.1 + 1e-3
    zp = torch.randint(-5, 5, (1, 37), dtype=torch.int8, generator=g)
    acc = torch.randint(-2**20, 2**20, (2, 3, 5), dtype=torch.int32, generator=g)
    w4 = torch.randint(-8, 8, (5, 37), dtype=torch.int8, generator=g)
    return {
        "quantize": (x, s_row, zp, -128, 127),
        "dequantize": (q, s_row, zp),
        "quantize_per_token": (x,),
        "requantize": (acc, torch.tensor(1e-4), None, -128, 127),
        "int8_matmul": (q, w_q),
        "log_quantize": (x, s_row * 30, 8),
        "log_dequantize": (q, s_row, 8),
        "quantized_linear": (x, w_q, s_w, torch.randn(5, generator=g)),
        "weight_only_linear": (x, w4, s_w, None, None, 0),
    }


def test_every_op_has_a_numpy_implementation():
    missing = [n for n, op in QUANT_OPS.items() if op not in NUMPY_OPS]
    assert not missing, f"dialect ops without a numpy implementation: {missing}"
    assert set(_sample_args()) == set(QUANT_OPS), "a dialect op has no sample arguments in this test"


@pytest.mark.parametrize("name", sorted(QUANT_OPS))
def test_torch_reference_equals_numpy(name):
    args = _sample_args()[name]
    want = QUANT_OPS[name](*args)
    got = NUMPY_OPS[QUANT_OPS[name]](*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for i, (w, g) in enumerate(zip(want, got)):
        if name == "weight_only_linear":  # float matmul: summation order differs (bounded in test_quant_linear)
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
        else:
            assert_exact(w, g, f"{name} output {i}")


@pytest.mark.parametrize("name", sorted(QUANT_OPS))
def test_opcheck(name):
    """torch's own consistency checks: schema, fake impl vs real outputs, dispatcher behaviour."""
    torch.library.opcheck(QUANT_OPS[name], _sample_args()[name])


@pytest.mark.parametrize("name", sorted(QUANT_OPS))
def test_fake_tensor_shapes(name):
    args = _sample_args()[name]
    real = QUANT_OPS[name](*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = QUANT_OPS[name](*fake_args)
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    for r, f in zip(real, fake):
        assert (tuple(f.shape), f.dtype) == (tuple(r.shape), r.dtype)


@pytest.mark.parametrize("name", ["quantized_linear", "weight_only_linear"])
def test_fake_keeps_bf16_activations_dtype(name):
    args = list(_sample_args()[name])
    args[0] = args[0].to(torch.bfloat16)
    real = QUANT_OPS[name](*args)
    with FakeTensorMode() as mode:
        fake = QUANT_OPS[name](*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert real.dtype == fake.dtype == torch.bfloat16 and real.shape == fake.shape


class _W8A8(torch.nn.Module):
    """A tiny layer in each form the passes will produce: static, dynamic, weight-only, log."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("w_q", torch.randint(-127, 128, (6, 19), dtype=torch.int8, generator=g))
        self.register_buffer("w_s", torch.rand(6, generator=g) * 0.01 + 1e-3)
        self.register_buffer("b", torch.randn(6, generator=g))
        self.register_buffer("w_s_g", torch.rand(6, 1, generator=g) * 0.01 + 1e-3)

    def forward(self, x):
        q, s = ops.quantize_per_token(x)
        a = ops.quantized_linear(q, self.w_q, self.w_s, self.b, s)
        b = ops.quantized_linear(x, self.w_q, self.w_s, self.b)
        c = ops.weight_only_linear(x, self.w_q, self.w_s_g, None, self.b, 19)
        d = ops.dequantize(ops.quantize(x, s, None, -127, 127), s, None)
        e = ops.log_dequantize(ops.log_quantize(x, s * 127, 8), s * 127, 8)
        return a + b + c, d + e


def test_export_with_dynamic_batch_runs_and_matches_eager():
    m = _W8A8()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, (torch.randn(2, 4, 19),), dynamic_shapes=({0: batch},))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert {QUANT_OPS[k] for k in ("quantize_per_token", "quantized_linear", "weight_only_linear",
                                   "quantize", "dequantize", "log_quantize", "log_dequantize")} <= targets
    out_node = next(n for n in ep.graph.nodes if n.target == QUANT_OPS["quantized_linear"])
    assert isinstance(out_node.meta["val"].shape[0], torch.SymInt), "batch dim was specialized"
    x = torch.randn(5, 4, 19)  # a batch size export never saw
    for got, want in zip(ep.module()(x), m(x)):
        assert_exact(got, want, "exported vs eager")
    assert ep.module()(x)[0].shape == (5, 4, 6)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.quantize(torch.ones(2, 3), torch.ones(4, 1), None, -128, 127), "scale of shape"),
    (lambda: ops.quantize(torch.ones(2, 3), torch.ones(()), None, -129, 127), "qmin"),
    (lambda: ops.quantize(torch.ones(2, 3, dtype=torch.int32), torch.ones(()), None, -128, 127), "x must be a float"),
    (lambda: ops.dequantize(torch.ones(2, 3), torch.ones(())), "q must be an integer"),
    (lambda: ops.int8_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(4, 2, dtype=torch.int8)), "K"),
    (lambda: ops.quantized_linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)), "w_q must be int8"),
])
def test_op_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
