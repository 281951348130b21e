"""Shape propagation is skipped when nothing it reads changed since the last one (a pass that propagates after
its last edit, then the verifier: two full passes over every node, 1-2 ms a node). Anything it reads that
changes (a node's arguments, a tensor's shape, a node or val replaced) propagates again, and its vals follow;
only the nodes that changed run, and the nodes after them when their inputs' vals came out different."""
import pytest
import torch

import slimfx
from slimfx import ir
from slimfx import passes as P
from slimfx.ir import propagate
from tests.conftest import llama_call


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Calls(list):
    """One entry per propagation: how many nodes it ran."""


@pytest.fixture
def counted(monkeypatch):
    calls = _Calls()
    real = propagate._Prop.propagate_dont_convert_inputs

    def counting(self, *a):
        out = real(self, *a)
        calls.append(self.ran)
        return out
    monkeypatch.setattr(propagate._Prop, "propagate_dont_convert_inputs", counting)
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


class _Deep(torch.nn.Module):
    def __init__(self, layers=6):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _deep_gm():
    gm = ir.capture(_Deep().eval(), (torch.randn(3, 8),), {}, dynamic=True).gm
    ir.propagate_meta(gm, incremental=False)
    return gm


def _vals(gm):
    return {n: n.meta.get("val") for n in gm.graph.nodes}


def test_an_edit_reruns_that_node_and_stops_where_vals_come_out_the_same(counted):
    """relu -> gelu in the first layer: that node runs (its target changed), gives a val like the old one, and
    every node after it keeps its val without running (a full propagation would run all of them)."""
    gm = _deep_gm()
    before = _vals(gm)
    relu = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default][0]
    relu.target = torch.ops.aten.gelu.default
    ir.propagate_meta(gm)
    assert counted[-1] == 3                       # the gelu; the input and the output always run (cheap)
    assert relu.meta["val"] is before[relu]       # the same shape: the old val stands, and so do the later ones
    assert all(n.meta.get("val") is before[n] for n in gm.graph.nodes)
    n_nodes = len(gm.graph.nodes)
    ir.propagate_meta(gm, incremental=False)
    assert counted[-1] == n_nodes


def test_a_changed_shape_runs_on_to_every_node_it_reaches(counted):
    """The last layer's weight grows to 5 outputs: its linear and everything after it run, with the new shape;
    the layers before keep their vals."""
    gm = _deep_gm()
    before = _vals(gm)
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    w, b = linears[-1].args[1], linears[-1].args[2]
    setattr(gm, w.target, torch.nn.Parameter(torch.randn(5, 8)))
    setattr(gm, b.target, torch.nn.Parameter(torch.randn(5)))
    ir.propagate_meta(gm)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
    assert out.meta["val"].shape[-1] == 5
    assert counted[-1] == 6                       # weight, bias, linear, relu; the input, the output
    assert all(n.meta["val"] is before[n] for n in linears[:-1])


def test_a_fork_carries_what_its_graph_knows(counted):
    """Passes work on forks (ir.fork): propagating an unchanged fork runs nothing, an edited one the edit."""
    gm = _deep_gm()
    n = len(counted)
    fork = ir.fork(gm)
    ir.propagate_meta(fork)
    assert len(counted) == n
    relu = [x for x in fork.graph.nodes if x.target is torch.ops.aten.relu.default][2]
    relu.target = torch.ops.aten.sigmoid.default
    ir.propagate_meta(fork)
    assert len(counted) == n + 1 and counted[-1] == 3       # the sigmoid, the input, the output


def test_a_new_node_between_runs_itself_and_what_reads_it(counted):
    """A node inserted by hand (no val) runs; a reader whose argument is now that node runs too."""
    gm = _deep_gm()
    relu = [x for x in gm.graph.nodes if x.target is torch.ops.aten.relu.default][1]
    with gm.graph.inserting_after(relu):
        neg = gm.graph.call_function(torch.ops.aten.neg.default, (relu,))
    nxt = [u for u in relu.users if u is not neg][0]
    nxt.replace_input_with(relu, neg)
    ir.propagate_meta(gm)
    assert "val" in neg.meta and counted[-1] == 4      # neg, the linear that reads it; the input, the output
    assert tuple(neg.meta["val"].shape) == tuple(relu.meta["val"].shape)


def test_incremental_propagation_gives_what_a_full_one_gives(tiny_llama_capture, counted):
    """Over a real pipeline (W8A8, QKV merge and norm fusion, head pruning that shrinks layers), every node's val
    after the passes' incremental propagations says what a full propagation from scratch says: shapes (symbolic,
    every dim dynamic), strides, dtype. And the passes ran fewer nodes than full propagations would have."""
    cm = slimfx.compile(tiny_llama_capture, passes=[P.Prune(sparsity=0.34, pattern="heads"),
                                                     P.Quantize(weights="int8", activations="dynamic"), P.Fuse()],
                        backend="torch", progress=False)
    gm = cm.graph
    ran = sum(counted)
    kept = _vals(gm)
    ir.propagate_meta(gm, incremental=False)
    full = counted[-1]
    assert ran < len(counted[:-1]) * full
    differ = [f"{n.format_node()}: {kept[n]} vs {n.meta.get('val')}" for n in gm.graph.nodes
              if kept[n] is not None and not propagate._same_val(kept[n], n.meta.get("val"))]
    assert not differ, differ[:5]
    shapes = [n.meta["val"].shape for n in gm.graph.nodes if n.target is torch.ops.slimfx.quantized_linear.default]
    assert shapes and all(isinstance(s[0], torch.SymInt) for s in shapes)
    out = cm(**llama_call(tiny_llama_capture.model, 3, 5))
    assert out.logits.shape == (3, 5, tiny_llama_capture.model.config.vocab_size)


def test_same_val_compares_symbols_by_expression_without_guards():
    gm = _deep_gm()
    x = [n for n in gm.graph.nodes if n.op == "placeholder"][0].meta["val"]
    env = x.fake_mode.shape_env
    first, wider, t, f64, same = x[:1], x.shape[0] + 1, x.t(), x.to(torch.float64), x.detach()
    guards = len(env.guards)                     # the comparisons below add none (== on SymInts would)
    assert propagate._same_val(x, same) and propagate._same_val((x, 2), (x, 2))
    assert not propagate._same_val(x, first) and not propagate._same_val(x, t)
    assert not propagate._same_val(x, f64) and not propagate._same_val(2, 2.0)
    assert not propagate._same_val(x.shape[0], wider) and propagate._same_val(x.shape[0], x.shape[0])
    assert len(env.guards) == guards


class _StridedConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.slopes = torch.arange(16.0)[1::2]      # a plain attribute: export lifts it as a constant

    def forward(self, x):
        return x * self.slopes.to(torch.float32)


def _exported(model, *args):
    gm = torch.export.export(model.eval(), args).module()
    for n in [n for n in gm.graph.nodes if n.op == "call_module"]:
        gm.graph.erase_node(n)          # export's _guards_fn, as capture erases it
    propagate.adopt_vals(gm)
    return gm


def test_export_vals_of_a_strided_constant_are_not_adopted(counted):
    """export fakes the ``to`` of a strided constant (Falcon's alibi slopes) from its storage's start, where
    propagation (and eager, which returns the constant itself) starts it at 1: such a graph's first propagation
    runs every node, and its vals are propagation's."""
    gm = _exported(_StridedConstant(), torch.randn(3, 8))
    assert getattr(gm.graph, "_slimfx_propagated", None) is None
    ir.propagate_meta(gm)
    to = [n for n in gm.graph.nodes if n.target is torch.ops.aten.to.dtype]
    assert [n.meta["val"].storage_offset() for n in to] == [1]
    assert counted == [len(gm.graph.nodes)]


def test_export_vals_are_adopted_when_they_are_propagations(counted):
    """A plain model's export vals stand for a first propagation: an unchanged graph propagates nothing, and an
    edit reruns that node and the output."""
    gm = _exported(_Deep(), torch.randn(3, 8))
    ir.propagate_meta(gm)
    assert counted == []
    relu = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default][0]
    relu.target = torch.ops.aten.gelu.default
    ir.propagate_meta(gm)
    assert counted == [3]                         # the gelu, the input, the output


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        for _ in range(3):
            x = self.b(torch.relu(x) + torch.relu(x))       # the two relus: one after CSE
        return self.a(x)


def test_cse_carries_what_its_graph_knows(counted):
    """CSE builds a new graph (fx's CSEPass): it carries the last propagation over, so the next one reruns the
    readers of the merged nodes, not every node, and comes out as a full propagation does."""
    from slimfx.passes.cleanup import CSE
    gm = ir.capture(_Twice().eval(), (torch.randn(3, 8),), {}, dynamic=True).gm
    ir.propagate_meta(gm, incremental=False)
    new = CSE().run(gm, None).graph_module
    assert len(new.graph.nodes) == len(gm.graph.nodes) - 3
    ir.propagate_meta(new)
    vals = _vals(new)
    ir.propagate_meta(new, incremental=False)
    assert counted[1] == 3 + 2 < counted[2] == len(new.graph.nodes)     # the three adds; the input, the output
    assert all(propagate._same_val(vals[n], n.meta.get("val")) for n in new.graph.nodes)


class _TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return torch.relu(x), y.sum(-1)


def test_a_later_input_given_a_new_val_is_read_as_itself():
    """Each placeholder takes the next input when it runs: the first one kept without running made the second
    take the first's val ((3, 8) float32 where (6, 4) float64 was given), and its sum came out (3,)."""
    gm = ir.capture(_TwoInputs().eval(), (torch.randn(3, 8), torch.randn(5, 4, dtype=torch.float64)), {},
                    dynamic=False).gm
    ir.propagate_meta(gm, incremental=False)
    x, y = [n for n in gm.graph.nodes if n.op == "placeholder"]
    y.meta["val"] = x.meta["val"].fake_mode.from_tensor(torch.randn(6, 4, dtype=torch.float64), static_shapes=True)
    ir.propagate_meta(gm)
    total = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList][0]
    assert tuple(total.meta["val"].shape) == (6,) and total.meta["val"].dtype == torch.float64


def test_in_place_views_propagate_in_full():
    """An in-place view op (unsqueeze_) reshapes its input's val object where it runs: a graph with one is
    propagated in full each time, so no kept val is reshaped under its readers."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    r = g.call_function(torch.ops.aten.relu.default, (x,))
    u = g.call_function(torch.ops.aten.unsqueeze_.default, (r, 1))
    g.output((g.call_function(torch.ops.aten.neg.default, (u,)),))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    x.meta["val"] = _deep_gm().graph.find_nodes(op="placeholder")[0].meta["val"]
    ir.propagate_meta(gm, incremental=False)
    assert propagate._key(gm, x.meta["val"].fake_mode) is None
    assert r.meta["val"].dim() == 2 and u.meta["val"].dim() == 3
