"""The pass manager's checks around a pass: writes into the model's tensors that torch does not count (.data, a
.numpy() view) are caught, and a pass that builds a new graph keeps the capture's call convention."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import slimfx
from slimfx.passes import PassResult

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return {"out": self.lin(x) - y, "aux": (x * y).sum(-1)}


def _first_weight(gm):
    return getattr(gm, next(n for n in gm.graph.nodes if n.target is aten.linear.default).args[1].target)


def through_data(gm):
    _first_weight(gm).data.mul_(2)


def through_numpy(gm):
    _first_weight(gm).detach().numpy()[:] *= 2


def through_data_item(gm):
    _first_weight(gm).data[0, 0] = 123.0
    return PassResult(gm, False)


def data_rebound(gm):
    w = _first_weight(gm)
    w.data = w.data * 2


@pytest.mark.parametrize("write", [through_data, through_numpy, through_data_item, data_rebound])
def test_writes_torch_does_not_count_are_caught_naming_pass_and_tensor(write):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 8)
    with pytest.raises(slimfx.PassError, match=rf"pass '{write.__name__}' wrote into tensors in place"
                                               rf"[\s\S]*\['fc1_weight'\][\s\S]*model holds those writes"):
        slimfx.compile(model, (x,), passes=["dce", write], progress=False)


def test_the_content_check_reads_each_tensor_once_per_pass(monkeypatch):
    from slimfx.passes import manager
    taken = []
    real = manager._content
    monkeypatch.setattr(manager, "_content", lambda t: taken.append(t) or real(t))
    model, x = MLP().eval(), torch.randn(3, 8)
    slimfx.compile(model, (x,), passes=["dce", "cse", lambda gm: None], progress=False)
    # 4 tensors: read before the first pass and after each of the 3
    assert len(taken) == 4 * 4
    taken.clear()
    slimfx.compile(model, (x,), passes=["dce"], verify=False, progress=False)
    assert taken == []


def rebuild(gm):
    """The ordinary torch.fx way: a new Graph (fx's flat call convention) and a GraphModule over it."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


def test_a_pass_building_a_new_graph_keeps_the_call_convention():
    torch.manual_seed(0)
    model, x, y = TwoInTwoOut().eval(), torch.randn(2, 4), torch.randn(2, 4)
    for backend in ("torch", "numpy"):
        cm = slimfx.compile(model, (), dict(x=x, y=y), passes=[rebuild], backend=backend, progress=False)
        with torch.no_grad():
            want = model(x=x, y=y)
        for got in (cm(x=x, y=y), cm(y=y, x=x)):
            assert isinstance(got, dict) and set(got) == {"out", "aux"}
            # fp32, the same ops: numpy vs torch differ by reordering only
            torch.testing.assert_close(got["out"], want["out"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got["aux"], want["aux"], atol=1e-6, rtol=1e-6)


def drop_an_output(gm):
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output((out[0],))
    return PassResult(fx.GraphModule(gm, g), True)


def test_a_new_graph_that_no_longer_fits_the_call_convention_is_refused():
    model, x, y = TwoInTwoOut().eval(), torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(slimfx.PassError, match=r"pass 'drop_an_output' left a graph whose output is 1 values "
                                               r"where the call convention returns 2[\s\S]*gm.graph._codegen"):
        slimfx.compile(model, (), dict(x=x, y=y), passes=[drop_an_output], progress=False)


def test_a_pass_returning_more_values_is_told_so():
    def twice(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = ((out.args[0][0], out.args[0][0]),)
    model, x = MLP().eval(), torch.randn(3, 8)
    with pytest.raises(slimfx.PassError, match=r"pass 'twice' left a graph whose output is 2 values where the "
                                               r"call convention returns 1"):
        slimfx.compile(model, (x,), passes=[twice], progress=False)
