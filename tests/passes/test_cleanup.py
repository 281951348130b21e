import torch
import torch.nn as nn

import slimfx

aten = torch.ops.aten


class Redundant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.register_buffer("pos", torch.arange(6.0))

    def forward(self, x):
        a = torch.tanh(x) * 2
        b = torch.tanh(x) * 2            # the same computation: CSE merges it
        w = self.w.t() * 0.5             # depends only on tensors of the module: folded
        return (a + b) @ w + self.pos


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def test_cleanup_passes_preserve_outputs_and_do_their_job():
    m, x = Redundant().eval(), torch.randn(3, 4)
    cm = slimfx.compile(m, (x,), passes=["const_fold", "cse", "dce"], progress=False)
    gm = cm.graph
    assert count(gm, aten.tanh.default) == 1
    assert count(gm, aten.t.default) == 0 and count(gm, aten.permute.default) == 0
    stats = {r.name: r.stats for r in cm.report().records}
    assert stats["const_fold"]["nodes_folded"] >= 2 and stats["cse"]["nodes_merged"] >= 2
    with torch.no_grad():
        ref = m(x)
    # folding w.t()*0.5 into one tensor is exact (scaling by a power of two); numpy sums in another order
    assert torch.allclose(cm(x), ref, atol=1e-5, rtol=1e-6)
    assert all(r.sqnr_db > 120 for r in cm.report().records)   # fp32 reordering only


def test_const_fold_refuses_to_materialize_large_results():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("row", torch.randn(1, 64))

        def forward(self, x):
            return x + self.row.expand(128, 64)
    cm = slimfx.compile(Expand(), (torch.randn(128, 64),), passes=["const_fold"], progress=False)
    assert cm.report().records[0].stats["nodes_folded"] == 0
    assert count(cm.graph, aten.expand.default) == 1


def test_dce_removes_dead_nodes_and_the_tensors_only_they_read():
    def add_dead(gm):
        """Adds exp(x) and a read of a new tensor that nothing uses."""
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        name = slimfx.ir.meta.add_tensor_attr(gm, "dead", torch.ones(3))
        with gm.graph.inserting_after(x):
            gm.graph.call_function(aten.exp.default, (x,))
            gm.graph.get_attr(name)
    m, x = Redundant().eval(), torch.randn(3, 4)
    cm = slimfx.compile(m, (x,), passes=[add_dead, "dce"], progress=False)
    assert cm.report().records[1].stats == {"nodes_removed": 2, "tensors_dropped": 1}
    assert count(cm.graph, aten.exp.default) == 0 and not hasattr(cm.graph, "dead")


def test_unused_attention_without_dropout_is_dead_code():
    """torch marks scaled_dot_product_attention random (its dropout), so fx's dead-code elimination kept an unused
    one, and every op it reads; with a dropout probability of 0 it draws nothing and goes. One that may draw
    (dropout_p > 0) stays, and so does a used one."""
    import torch.fx as fx
    graph = fx.Graph()
    q = graph.placeholder("q")
    used = graph.call_function(aten.scaled_dot_product_attention.default, (q, q, q))
    graph.call_function(aten.scaled_dot_product_attention.default, (graph.call_function(aten.neg.default, (q,)), q, q))
    graph.call_function(aten.scaled_dot_product_attention.default, (q, q, q), {"dropout_p": 0.0})
    graph.call_function(aten.scaled_dot_product_attention.default, (q, q, q, None, 0.1))
    graph.call_function(aten.dropout.default, (q, 0.5, False))
    graph.call_function(aten.dropout.default, (q, 0.5, True))
    graph.output(used)
    gm = fx.GraphModule(nn.Module(), graph)
    assert slimfx.ir.eliminate_dead_code(gm.graph)
    left = [(n.target, n.args[4:] or n.args[1:]) for n in gm.graph.nodes if n.op == "call_function"]
    assert left == [(aten.scaled_dot_product_attention.default, (q, q)),
                    (aten.scaled_dot_product_attention.default, (0.1,)),
                    (aten.dropout.default, (0.5, True))], left
