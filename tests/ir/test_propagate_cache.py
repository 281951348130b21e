"""Shape propagation is skipped when nothing it reads changed since the last one (a pass that propagates after
its last edit, then the verifier: two full passes over every node, 1-2 ms a node). Anything it reads that
changes (a node's arguments, a tensor's shape, a node or val replaced) propagates again, and its vals follow."""
import pytest
import torch

from slimfx import ir
from slimfx.ir import propagate


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = propagate._Prop.propagate_dont_convert_inputs
    monkeypatch.setattr(propagate._Prop, "propagate_dont_convert_inputs",
                        lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def _gm():
    gm = ir.capture(_MLP().eval(), (torch.randn(3, 6),), {}, dynamic=True).gm
    ir.propagate_meta(gm)
    return gm


def _linear_weights(gm):
    return [n for n in gm.graph.nodes if n.op == "get_attr"]


def test_unchanged_graph_is_not_propagated_again(counted):
    gm = _gm()
    n = len(counted)
    ir.propagate_meta(gm)
    ir.verify(gm)
    assert len(counted) == n


def test_a_tensor_of_another_shape_propagates_again(counted):
    gm = _gm()
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
    w = [n for n in _linear_weights(gm) if tuple(getattr(gm, n.target).shape) == (4, 8)][0]
    b = [n for n in _linear_weights(gm) if tuple(getattr(gm, n.target).shape) == (4,)][0]
    setattr(gm, w.target, torch.nn.Parameter(torch.randn(5, 8)))
    setattr(gm, b.target, torch.nn.Parameter(torch.randn(5)))
    n = len(counted)
    ir.propagate_meta(gm)
    assert len(counted) == n + 1 and out.meta["val"].shape[-1] == 5


def test_rewired_arguments_and_replaced_vals_propagate_again(counted):
    gm = _gm()
    relu = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default][0]
    n = len(counted)
    relu.meta["val"] = torch.empty(0)                # a val set by hand is not taken as propagated
    ir.propagate_meta(gm)
    assert len(counted) == n + 1 and relu.meta["val"].shape[-1] == 8
    x = [p for p in gm.graph.nodes if p.op == "placeholder"][0]
    with gm.graph.inserting_after(x):
        neg = gm.graph.call_function(torch.ops.aten.neg.default, (x,))
    relu.args[0].replace_input_with(x, neg)          # the first linear now reads -x
    ir.propagate_meta(gm)
    assert len(counted) == n + 2 and "val" in neg.meta


class _Scaled(torch.nn.Module):
    def forward(self, x):
        return x.argmax(-1) * 2


def test_a_literal_of_another_type_propagates_again():
    """2 and 2.0 are equal in Python, not in the dtype they give: an int literal turned float re-propagates."""
    gm = ir.capture(_Scaled().eval(), (torch.randn(3, 6),), {}, dynamic=True).gm
    ir.propagate_meta(gm)
    mul = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor][0]
    assert mul.meta["val"].dtype == torch.int64
    mul.args = (mul.args[0], 2.0)
    ir.propagate_meta(gm)
    assert mul.meta["val"].dtype == torch.float32


def test_a_propagated_module_still_deep_copies():
    import copy
    gm = _gm()
    ir.propagate_meta(gm)
    other = copy.deepcopy(gm)
    x = torch.randn(2, 6)
    assert torch.equal(other(x)[0], gm(x)[0])
