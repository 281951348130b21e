"""A model made under torch.inference_mode (its parameters are inference tensors) compiled outside it: capture
failed (torch.export set requires_grad on them; symbolic_trace read their version counter) and, captured, every
pass that read a weight failed in autograd (torch.isfinite of an inference tensor that requires grad)."""
import pytest
import torch

import slimfx
from slimfx import passes as P


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)
        self.norm = torch.nn.LayerNorm(24)
        self.b.weight = torch.nn.Parameter(self.a.weight.t().contiguous())
        self.register_buffer("shift", torch.linspace(-1, 1, 16))

    def forward(self, x):
        h = self.norm(torch.nn.functional.gelu(self.a(x + self.shift)))
        return self.b(h) + self.a(x)[..., :16]


def _inference_model():
    torch.manual_seed(0)
    with torch.inference_mode():
        return Tied().eval()


@pytest.mark.parametrize("method", ["auto", "symbolic_trace"])
@pytest.mark.parametrize("passes", [[], [P.Prune(sparsity=0.5), P.Quantize(weights="int8", activations="static")]],
                         ids=["none", "prune+w8a8"])
def test_inference_model_compiles_outside_inference_mode(method, passes):
    m, x = _inference_model(), torch.randn(3, 16)
    assert not torch.is_inference_mode_enabled() and m.a.weight.is_inference()
    cm = slimfx.compile(m, (x,), passes=passes, calibration=[(torch.randn(3, 16),)], backend="numpy",
                        capture=method, progress=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = m(x)
    if not passes:
        torch.testing.assert_close(cm(x), ref, rtol=1e-5, atol=1e-5)    # numpy's float32 vs torch's
    else:           # 50% of the weights pruned and int8: the report's own measure, on fresh inputs here
        cos = torch.nn.functional.cosine_similarity(cm(x).flatten(), ref.flatten(), dim=0)
        assert cos > 0.5, cos       # pruning half of a random layer keeps the direction, not the values
    # the graph shares the model's weights (no copy), and the model is as it was
    assert m.a.weight.is_inference() and m.a.weight.requires_grad


def test_inference_model_distills_and_saves(tmp_path):
    m, x = _inference_model(), torch.randn(3, 16)
    cal = [(torch.randn(3, 16),) for _ in range(4)]
    cm = slimfx.compile(m, (x,), passes=[P.Prune(sparsity=0.5), P.Distill(steps=5)], calibration=cal,
                        backend="torch", progress=False)
    assert cm.report().records[-1].stats["steps"] == 5
    # the layers not trained read the model's own tensors again (trained on copies, put back after)
    shared = {t.data_ptr() for t in slimfx.ir.tensors(cm.graph).values()}
    assert m.norm.weight.data_ptr() in shared and m.shift.data_ptr() in shared
    back = slimfx.load(cm.save(tmp_path / "m"))
    torch.testing.assert_close(back(x), cm(x), rtol=0, atol=0)


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) * self.calls


@pytest.mark.parametrize("passes", [[], [P.Quantize(weights="int8")]], ids=["none", "w8"])
def test_inference_model_that_writes_its_buffers(passes):
    """Such a forward compiles to a model with its own state (as for any model), but capture propagated its write
    into the inference buffer outside inference mode, and compile's reference call and its restore of the
    model's buffer failed the same way ("Inplace update to inference tensor outside InferenceMode")."""
    torch.manual_seed(0)
    with torch.inference_mode():
        m = Counter().eval()
    x = torch.randn(4, 16)
    cm = slimfx.compile(m, (x,), passes=passes, backend="torch", progress=False)
    first, second = cm(x), cm(x)
    torch.testing.assert_close(second, 2 * first, rtol=1e-6, atol=1e-6)     # its own counter: 1, then 2
    assert float(m.calls) == 0 and m.calls.is_inference()                  # the model's, as it was
