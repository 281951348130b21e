import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx import ir

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.ln = nn.Linear(12, 20), nn.Linear(20, 7), nn.LayerNorm(7)
        self.w3 = nn.Parameter(torch.randn(7, 7))
        self.b3 = nn.Parameter(torch.randn(7))

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        h = self.ln(self.fc2(h).view(x.size(0), -1))
        return torch.addmm(self.b3, h, self.w3.t()) + torch.relu(h)


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_every_linear_spelling_becomes_aten_linear(method):
    m, x = MLP().eval(), torch.randn(5, 12)
    c = ir.capture(m, (x,), method=method)
    assert c.method == method
    ts = targets(c.gm)
    # nn.Linear twice and addmm(b, h, w.t()) once: three linears, no addmm/t/call_module left
    assert ts.count(aten.linear.default) == 3
    assert aten.addmm.default not in ts and aten.t.default not in ts
    assert not [n for n in c.gm.graph.nodes if n.op in ("call_module", "call_method")]
    with torch.no_grad():
        assert torch.allclose(c.gm(x), m(x), atol=1e-6, rtol=0)   # fp32, same ops, reordered linear math
    ir.verify(c.gm)


def test_capture_flattens_tensors_and_remembers_their_names():
    m, x = MLP().eval(), torch.randn(5, 12)
    c = ir.capture(m, (x,))
    attrs = {ir.meta.param_name(n): n.target for n in c.gm.graph.nodes if n.op == "get_attr"}
    assert attrs["fc1.weight"] == "fc1_weight"
    lin = next(n for n in c.gm.graph.nodes if n.target is aten.linear.default)
    assert ir.meta.module_name(lin) == "fc1"
    assert ir.meta.shape(lin) == (5, 20) and ir.meta.dtype(lin) == torch.float32


def test_dynamic_capture_gives_symbolic_dims_and_keeps_training_mode():
    m, x = MLP().train(), torch.randn(5, 12)
    c = ir.capture(m, (x,), dynamic=True)
    assert m.training, "capture must give the model back in the mode it came in"
    ph = next(n for n in c.gm.graph.nodes if n.op == "placeholder")
    assert not isinstance(ir.meta.shape(ph)[0], int)     # batch is symbolic
    assert ir.meta.shape(ph)[1] == 12                    # features are not: the Linear fixes them
    assert aten.dropout.default not in targets(c.gm)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_uncapturable_model_says_why_and_what_to_try():
    with pytest.raises(ir.CaptureError) as e:
        ir.capture(DataDependent(), (torch.randn(3),))
    msg = str(e.value)
    assert "could not capture DataDependent" in msg
    assert "torch.export" in msg and "fx.symbolic_trace" in msg
    assert "what to try" in msg and "torch.cond" in msg


def test_bad_capture_arguments():
    with pytest.raises(ir.CaptureError, match="nn.Module"):
        ir.capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(ir.CaptureError, match="capture method"):
        ir.capture(MLP(), (torch.randn(2, 12),), method="jit")


def test_hf_model_returning_a_cache_gets_the_use_cache_hint(tiny_llama):
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ir.CaptureError, match="use_cache=False"):
        ir.capture(tiny_llama, (), dict(input_ids=ids), method="export")
