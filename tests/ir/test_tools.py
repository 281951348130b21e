import networkx as nx
import pytest
import torch
import torch.nn as nn

from slimfx import ir

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


@pytest.fixture
def gm():
    return ir.capture(Block().eval(), (torch.randn(3, 6),)).gm


def test_printer_code_and_table(gm):
    assert "aten.linear.default" in ir.code(gm)
    t = ir.table(gm)
    header = t.splitlines()[0].split()
    assert header == ["name", "op", "target", "args", "shape", "dtype", "module"]
    row = next(line for line in t.splitlines() if line.startswith("relu "))
    assert "(3, 10)" in row and "float32" in row
    assert ir.op_counts(gm)["aten.linear.default"] == 2


def test_networkx_view_and_matching(gm):
    g = ir.to_networkx(gm)
    order = ir.topological_order(gm)
    assert order.index("linear") < order.index("relu") < order.index("linear_1")
    assert set(g.successors("linear")) == {"relu"}
    pattern = nx.DiGraph([("l", "r")])
    nx.set_node_attributes(pattern, {"l": "aten.linear.default", "r": "aten.relu.default"}, "target")
    matches = list(ir.match(gm, pattern))
    assert matches == [{"linear": "l", "relu": "r"}]


def test_dot_export(gm):
    dot = ir.to_dot(gm)
    assert dot.startswith('digraph "slimfx"')
    assert '"linear" -> "relu";' in dot and '"relu" -> "linear_1";' in dot


def test_verifier_accepts_a_good_graph_and_names_the_bad_node(gm):
    ir.verify(gm, ir.output_signature(gm))
    lin = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    lin.args = (lin.args[0], lin.args[0], lin.args[2])    # weight := the input: (3,6) x (3,6)^T is fine,
    gm.recompile()                                        # but the bias (10,) no longer broadcasts to (3,3)
    with pytest.raises(ir.VerificationError, match="linear"):
        ir.verify(gm)


def test_verifier_rejects_missing_tensor_and_changed_outputs(gm):
    expected = ir.output_signature(gm)
    attr = next(n for n in gm.graph.nodes if n.op == "get_attr")
    attr.target = "no_such_tensor"
    with pytest.raises(ir.VerificationError, match="no_such_tensor"):
        ir.verify(gm)
    with pytest.raises(ir.VerificationError, match="output 0 changed"):
        ir.verify(ir.capture(Block().eval(), (torch.randn(4, 6),)).gm, expected)


def test_fork_shares_tensors_not_graph(gm):
    f = ir.fork(gm)
    relu = next(n for n in f.graph.nodes if n.target is aten.relu.default)
    relu.target = aten.gelu.default
    f.recompile()
    assert aten.gelu.default not in [n.target for n in gm.graph.nodes]
    assert f.a_weight is gm.a_weight
