"""Prune with a weight several layers read (one module called twice, ALBERT's shared blocks): pruned once for all
of them, its scores (Wanda's column RMS, SparseGPT's Hessian) pooled over every input it sees, one stored tensor
every call site reads, counted once; structured patterns leave such a block whole and say why. Also: a heads
block whose example batch equals a head count says how to get it pruned."""
import pytest
import torch

import slimfx
from slimfx import ir, passes as P
from slimfx.passes import quant_calibration
from slimfx.passes.prune_sparsegpt import sparsegpt_prune

from conftest import correlated, text_batch


class Shared(torch.nn.Module):
    """b(a(relu(a(x)))): a's weight is read at two call sites, with different inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.b(self.a(torch.relu(self.a(x))))


def _cal():
    scale = torch.linspace(0.1, 3, 64)          # columns of very different size: Wanda's score differs from |w|
    return [(correlated(8, 64, seed=s) * scale,) for s in range(3)]


def _inputs_of_a(m, cal):
    """a's input at each of its two calls, every calibration row (forward hooks: independent of the graph)."""
    seen = []
    h = m.a.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().reshape(-1, 64)))
    with torch.no_grad():
        for (x,) in cal:
            m(x)
    h.remove()
    return torch.cat(seen[0::2]).double(), torch.cat(seen[1::2]).double()


def _a_weights(cm):
    """The get_attr nodes the two calls of a read (the linears reading a 64 x 64 weight)."""
    g = cm.graph
    lins = [n for n in g.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    ws = [n.args[1] for n in lins if tuple(getattr(g, n.args[1].target).shape) == (64, 64)]
    assert len(ws) == 2
    return ws, [getattr(g, w.target) for w in ws]


def _one_tensor(cm):
    ws, ts = _a_weights(cm)
    assert ws[0].target == ws[1].target and ts[0] is ts[1], \
        f"the two calls of a read different tensors: {ws[0].target}, {ws[1].target}"
    stored = [t for t in ir.tensors(cm.graph).values() if tuple(t.shape) == (64, 64)]
    assert len(stored) == 1, f"{len(stored)} 64 x 64 tensors stored; the shared weight once is 1"
    return ts[0]


def _stats(cm):
    stats = cm.report().records[0].stats
    assert stats["layers"] == 3, stats                      # linears pruned, as Quantize counts them
    assert stats["pruned"] == {"a": 0.5, "b": 0.5}, stats   # each tensor once
    assert stats["sparsity"] == 0.5
    assert "a" in stats["shared"] and "2 layers" in stats["shared"]["a"], stats
    return stats


def test_wanda_shared_weight_pruned_once_on_pooled_activations():
    m, cal = Shared().eval(), _cal()
    cm = slimfx.compile(m, (cal[0][0],), passes=[P.Prune(sparsity=0.5)], calibration=cal, backend="torch",
                        progress=False)
    w = _one_tensor(cm)
    _stats(cm)
    x1, x2 = _inputs_of_a(m, cal)
    # the pooled column RMS: the root of the summed per-call mean squares (the diagonal of H1 + H2)
    col = (x1.square().mean(0) + x2.square().mean(0)).sqrt()
    score = m.a.weight.detach().double().abs() * col[None, :]
    pruned = w == 0
    assert int(pruned.sum()) == 64 * 64 // 2
    assert score[pruned].max() <= score[~pruned].min(), "a pruned weight scores above a kept one"
    assert torch.equal(w[~pruned], m.a.weight.detach()[~pruned])    # kept values bit for bit
    # scoring by either call alone would choose other weights: the pooling is what this checks
    for x in (x1, x2):
        alone = m.a.weight.detach().double().abs() * x.square().mean(0).sqrt()[None, :]
        assert not (alone[pruned].max() <= alone[~pruned].min())


def test_sparsegpt_shared_weight_fitted_on_summed_hessians():
    m, cal = Shared().eval(), _cal()
    cm = slimfx.compile(m, (cal[0][0],), passes=[P.Prune(pattern="2:4", method="sparsegpt")], calibration=cal,
                        backend="torch", progress=False)
    w = _one_tensor(cm)
    _stats(cm)
    x1, x2 = _inputs_of_a(m, cal)
    h = x1.T @ x1 / len(x1) + x2.T @ x2 / len(x2)           # one weight's output error over both calls
    ref = sparsegpt_prune(m.a.weight.detach(), h, nm=(2, 4))
    assert torch.equal(w == 0, ref == 0), "not the zeros SparseGPT chooses on the summed Hessian"
    # fp32 rows summed in another order than the hooks' fp64: the re-fit weights agree to float rounding
    torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-5)


def test_sparsegpt_shared_weight_hessians_in_runs_bit_equal(monkeypatch):
    """A cap that puts each layer input in a run of its own: the shared weight's Hessian is summed across runs,
    and the weights equal one run's bit for bit."""
    m, cal = Shared().eval(), _cal()

    def go():
        cm = slimfx.compile(m, (cal[0][0],), passes=[P.Prune(pattern="2:4", method="sparsegpt")], calibration=cal,
                            backend="torch", progress=False)
        return cm, _one_tensor(cm)
    one, w1 = go()
    monkeypatch.setattr(quant_calibration, "HESSIAN_BYTES", 64 * 64 * 8)
    runs, w3 = go()
    assert runs.report().records[0].stats["hessian_runs"] == 3
    assert torch.equal(w1, w3)


def test_global_scope_counts_shared_weight_once():
    m = Shared().eval()
    cm = slimfx.compile(m, (torch.randn(4, 64),), passes=[P.Prune(sparsity=0.5, scope="global", score="magnitude")],
                        backend="torch", progress=False)
    w = _one_tensor(cm)
    b = [t for t in ir.tensors(cm.graph).values() if tuple(t.shape) == (16, 64)][0]
    assert int((w == 0).sum()) + int((b == 0).sum()) == (64 * 64 + 16 * 64) // 2
    kept = torch.cat([m.a.weight.detach()[w != 0].abs(), m.b.weight.detach()[b != 0].abs()])
    gone = torch.cat([m.a.weight.detach()[w == 0].abs(), m.b.weight.detach()[b == 0].abs()])
    assert gone.max() <= kept.min()


class TwiceMLP(torch.nn.Module):
    """One feed-forward block applied twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        x = x + self.down(torch.relu(self.up(x)))
        return x + self.down(torch.relu(self.up(x)))


def test_neurons_of_a_shared_block_left_whole_with_the_reason():
    m, x = TwiceMLP().eval(), torch.randn(4, 64)
    cm = slimfx.compile(m, (x,), passes=[P.Prune(sparsity=0.25, pattern="neurons")], backend="torch", progress=False)
    stats = cm.report().records[0].stats
    assert stats["shrunk"] == {}, stats
    assert "shared weight" in stats["skipped"]["down"] and "pattern='unstructured'" in stats["skipped"]["down"]
    stored = {tuple(t.shape) for t in ir.tensors(cm.graph).values()}
    assert (128, 64) in stored and (64, 128) in stored, "a layer shrank"
    torch.testing.assert_close(cm(x), m(x), rtol=0, atol=0)       # nothing changed


@pytest.mark.parametrize("pattern", ["heads", "query_heads"])
def test_heads_batch_equal_to_a_head_count_says_what_to_do(pattern):
    """A static example batch of 2 with 2 kv heads: the reshape's batch and head axes cannot be told apart; the
    block stays whole and the reason says how to get it pruned."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    ids, mask = text_batch(2, 8, 97)
    cm = slimfx.compile(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), backend="torch",
                        progress=False, passes=[P.Prune(sparsity=0.5, pattern=pattern)])
    why = cm.report().records[0].stats["skipped"]["model.layers.0.self_attn"]
    assert "dynamic=True" in why and "example batch other than" in why, why
