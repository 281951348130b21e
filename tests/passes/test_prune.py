"""Prune: which weights become zero for each pattern and scope, checked against independent statements of
the rule (exact counts, every pruned score <= every kept one, kept values unchanged bit for bit; scores
|w| with score="magnitude", |w| x the input column's RMS measured by forward hooks with "activation"),
the refusals, and the pipeline Prune -> (Quantize) -> Fuse -> LowerSparse onto the sparse dialect op.
Odd sizes throughout (K = 40, 136, 70; N = 136, 70, 9), so blocks are ragged at the edges."""
import math

import pytest
import torch
import torch.nn.functional as F

import slimfx
from slimfx import ir, passes as P
from slimfx.backends import lower
from slimfx.ir.dialect.sparse import block_sparsity, pattern_violation

from conftest import nearest, text_batch

sf = torch.ops.slimfx


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(40, 136), torch.nn.Linear(136, 70), torch.nn.Linear(70, 9)
        with torch.no_grad():
            self.a.weight[:3, :5] = 0.0           # zeros already there count toward the target
            self.b.weight[7, :] = self.b.weight[7, 0]   # ties: one row of equal magnitudes

    def forward(self, x):
        return self.c(torch.relu(self.b(F.gelu(self.a(x))))) + x[..., :9]


def captured(m=None):
    m = m or Net().eval()
    x = torch.randn(3, 5, 40)
    return m, ir.capture(m, (x,)).gm, x


def weights(gm) -> dict:
    """module name -> the weight tensor each linear-like node reads."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.linear.default, sf.fused_linear.default,
                                                    sf.sparse_linear.default):
            out[ir.meta.module_name(n)] = ir.meta.tensor_attr(gm, n.args[1])
    return out


def check_magnitude_order(orig: list, pruned: list):
    """Every weight pruned is no larger in magnitude than every weight kept, and kept values are unchanged."""
    o, p = torch.cat([t.reshape(-1) for t in orig]), torch.cat([t.reshape(-1) for t in pruned])
    cut = (p == 0) & (o != 0)
    assert torch.equal(p[~cut], o[~cut])
    if cut.any() and (~cut).any():
        assert o[cut].abs().max() <= o[~cut & (o != 0)].abs().min()


def test_unstructured_layerwise_exact_count_and_order():
    m, gm, x = captured()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = P.Prune(sparsity=0.3, score="magnitude")(gm)
    assert res.modified and res.stats["layers"] == 3 and res.stats["skipped"] == {}
    for name, w in weights(gm).items():
        orig = getattr(m, name).weight
        assert int((w == 0).sum()) == nearest(0.3 * w.numel()), name
        check_magnitude_order([orig], [w])
        assert res.stats["pruned"][name] == round(nearest(0.3 * w.numel()) / w.numel(), 4)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())      # the user's model untouched
    # the graph computes the model with its pruned weights (the same torch ops: exact)
    ref = F.linear(torch.relu(F.linear(F.gelu(F.linear(x, weights(gm)["a"], m.a.bias)), weights(gm)["b"],
                                       m.b.bias)), weights(gm)["c"], m.c.bias) + x[..., :9]
    assert torch.equal(lower(gm, "torch")((x,), {}), ref)


def test_unstructured_global_one_cutoff():
    m, gm, _ = captured()
    res = P.Prune(sparsity=0.6, scope="global", score="magnitude")(gm)
    ws = weights(gm)
    names = sorted(ws)
    total = sum(w.numel() for w in ws.values())
    assert sum(int((w == 0).sum()) for w in ws.values()) == nearest(0.6 * total)
    check_magnitude_order([getattr(m, k).weight for k in names], [ws[k] for k in names])
    # one cutoff is not one fraction per layer: the layers end at different sparsities
    assert len({res.stats["pruned"][k] for k in names}) == 3
    assert res.stats["sparsity"] == round(nearest(0.6 * total) / total, 4)


def test_threshold():
    m, gm, _ = captured()
    t = 0.05
    P.Prune(threshold=t)(gm)
    for name, w in weights(gm).items():
        orig = getattr(m, name).weight
        assert torch.equal(w, torch.where(orig.abs() < t, torch.zeros_like(orig), orig)), name


@pytest.mark.parametrize("n,mm", [(2, 4), (1, 4), (4, 8)])
def test_n_of_m(n, mm):
    m, gm, _ = captured()
    res = P.Prune(pattern=f"{n}:{mm}", score="magnitude")(gm)
    ws = weights(gm)
    assert res.stats["skipped"] == {"c": f"K = 70 is not a multiple of {mm}"}
    assert torch.equal(ws["c"], m.c.weight)
    for name in ("a", "b"):
        orig, w = getattr(m, name).weight, ws[name]
        rows, k = w.shape
        og, wg = orig.reshape(rows, k // mm, mm), w.reshape(rows, k // mm, mm)
        # in every group: at most n nonzeros, and each zeroed |w| (an original zero too) <= each kept |w|
        cut = wg == 0
        assert ((~cut).sum(-1) <= n).all()
        kept_min = torch.where(cut, torch.inf, og.abs()).amin(-1)
        cut_max = torch.where(cut, og.abs(), -torch.inf).amax(-1)
        assert (cut_max <= kept_min).all()
        assert torch.equal(wg[~cut], og[~cut])
    if mm == 4:
        assert pattern_violation(ws["a"], "2:4") is None
    # the tie row of b (all equal magnitudes): the earliest n of each group stay
    if mm == 4:
        assert torch.equal((ws["b"][7].reshape(-1, 4) != 0).sum(0)[:n], torch.full((n,), 136 // 4))


def test_block_layerwise_ragged_edges():
    m, gm, _ = captured()
    block = (32, 32)
    res = P.Prune(sparsity=0.5, pattern="block", block=block, score="magnitude")(gm)
    for name, w in weights(gm).items():
        orig = getattr(m, name).weight
        rows, k = w.shape
        nb, kb = math.ceil(rows / 32), math.ceil(k / 32)
        # the blocks' RMS computed independently, edge blocks over their real elements only
        rms = torch.tensor([[orig.detach()[i * 32:(i + 1) * 32, j * 32:(j + 1) * 32].float().square().mean().sqrt()
                             for j in range(kb)] for i in range(nb)])
        gone = torch.tensor([[bool((w[i * 32:(i + 1) * 32, j * 32:(j + 1) * 32] == 0).all())
                              for j in range(kb)] for i in range(nb)])
        assert int(gone.sum()) == nearest(0.5 * nb * kb), name
        assert block_sparsity(w, block) == pytest.approx(int(gone.sum()) / (nb * kb))
        assert rms[gone].max() <= rms[~gone].min()
        assert torch.equal(w[w != 0], orig[w != 0])
    assert res.stats["layers"] == 3


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_block_never_zeroes_a_whole_layer_below_sparsity_1(method):
    """3 of 4 blocks of 128x128 rounds to 2 of a's 2 and b's 2 and 1 of c's 1: all of each layer (attention
    layers of a small model are one block); a layer keeps at least one block and one that loses none says why."""
    m, _, x = captured()
    kw = dict(score="magnitude") if method == "magnitude" else dict(method="sparsegpt")
    cm = slimfx.compile(m, (x,), passes=[P.Prune(sparsity=0.75, pattern="block", block=(128, 128), **kw)],
                        backend="torch", progress=False)
    stats = cm.report().records[0].stats
    assert set(stats["pruned"]) == {"a", "b"}
    assert "1 block(s) of 128x128: 0.75 of them rounds to none or to all" in stats["skipped"]["c"]
    w = weights(cm.graph)
    assert block_sparsity(w["a"], (128, 128)) == block_sparsity(w["b"], (128, 128)) == 0.5    # 1 of 2 blocks each
    assert int((w["c"] == 0).sum()) == 0


def test_block_global():
    m, gm, _ = captured()
    P.Prune(sparsity=0.5, pattern="block", block=(16, 16), scope="global", score="magnitude")(gm)
    ws = weights(gm)
    blocks = {k: math.ceil(w.shape[0] / 16) * math.ceil(w.shape[1] / 16) for k, w in ws.items()}
    zero = {k: round(block_sparsity(w, (16, 16)) * blocks[k]) for k, w in ws.items()}
    assert sum(zero.values()) == nearest(0.5 * sum(blocks.values()))


def _input_rms(m, x) -> dict:
    """module name -> RMS over tokens of each input column, by forward pre-hooks on the eager model."""
    got = {}
    hooks = [getattr(m, k).register_forward_pre_hook(
        lambda mod, a, k=k: got.__setitem__(k, a[0].detach().reshape(-1, a[0].shape[-1]).double().square()
                                            .mean(0).sqrt())) for k in ("a", "b", "c")]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block"])
def test_activation_score(pattern):
    """score="activation" (the default) ranks |w_ij| * rms(x_j): checked with the columns' RMS taken by hooks
    on the eager model over the example input the pass runs the graph on."""
    m, gm, x = captured()
    kwargs = {"2:4": dict(pattern="2:4"), "unstructured": dict(sparsity=0.5),
              "block": dict(sparsity=0.5, pattern="block", block=(16, 16))}[pattern]
    res = P.Prune(**kwargs)(gm, P.PassContext((x,)))
    assert res.stats["scored_on"] == "example inputs"
    rms = _input_rms(m, x)
    ws = weights(gm)
    for name in ("a", "b") if pattern == "2:4" else ("a", "b", "c"):
        score = getattr(m, name).weight.detach().double().abs() * rms[name][None, :]
        cut = ws[name] == 0
        if pattern == "2:4":
            rows = score.shape[0]
            sg, cg = score.reshape(rows, -1, 4), cut.reshape(rows, -1, 4)
            assert (cg.sum(-1) >= 2).all()
            assert (torch.where(cg, sg, -torch.inf).amax(-1) <= torch.where(cg, torch.inf, sg).amin(-1)).all()
        elif pattern == "unstructured":
            assert int(cut.sum()) == nearest(0.5 * cut.numel())
            assert score[cut].max() <= score[~cut].min()
        else:
            rows, k = score.shape
            blk = torch.nn.functional.pad(score.square(), (0, -k % 16, 0, -rows % 16))
            cnt = torch.nn.functional.pad(torch.ones_like(score), (0, -k % 16, 0, -rows % 16))
            r = (blk.reshape(-1, 16, blk.shape[1] // 16, 16).sum((1, 3))
                 / cnt.reshape(-1, 16, cnt.shape[1] // 16, 16).sum((1, 3))).sqrt()
            gone = torch.nn.functional.pad(cut, (0, -k % 16, 0, -rows % 16), value=True) \
                .reshape(-1, 16, blk.shape[1] // 16, 16).all(3).all(1)
            assert int(gone.sum()) == nearest(0.5 * gone.numel())
            assert r[gone].max() <= r[~gone].min()
    # a different ranking than magnitude alone, on these inputs
    _, gm2, _ = captured()
    P.Prune(**kwargs, score="magnitude")(gm2)
    assert any(not torch.equal(weights(gm2)[k] == 0, ws[k] == 0) for k in ws)


def test_activation_score_needs_inputs():
    _, gm, _ = captured()
    with pytest.raises(ValueError, match="needs calibration data or example inputs"):
        P.Prune(sparsity=0.5)(gm)


def test_nothing_to_prune_is_unchanged():
    _, gm, _ = captured()
    code = gm.code
    res = P.Prune(sparsity=0.0, score="magnitude")(gm)
    assert not res.modified and gm.code == code and res.stats["layers"] == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "needs sparsity=<fraction> or threshold"),
    (dict(pattern="block"), r"Prune\(pattern='block'\) needs sparsity"),
    (dict(sparsity=1.5), r"Prune.sparsity must be a number in \[0, 1\], got 1.5"),
    (dict(sparsity=True), "Prune.sparsity must be a number"),          # a bool is no fraction (it pruned 100%)
    (dict(sparsity="0.5"), "Prune.sparsity must be a number"),
    (dict(sparsity=0.5, include="re:("), r"Prune.include: pattern 're:\(' is not a valid regex"),
    (dict(sparsity=0.5, exclude=5), "Prune.exclude: expected a module-name pattern"),
    (dict(sparsity=0.5, pattern="block", block=(16,)), "Prune.block must be two positive ints"),
    (dict(sparsity=0.5, threshold=0.1), "not both"),
    (dict(threshold=0.1, pattern="2:4"), "threshold applies to pattern='unstructured' only"),
    (dict(threshold=-1.0), "Prune.threshold must be a number >= 0"),
    (dict(pattern="2:4", sparsity=0.3), "zeroes 0.5 of the weights"),
    (dict(pattern="4:2"), "Prune.pattern must be"),
    (dict(pattern="2to4"), "Prune.pattern must be"),
    (dict(sparsity=0.5, scope="net"), "Prune.scope must be one of"),
    (dict(sparsity=0.5, pattern="block", block=(0, 16)), "Prune.block must be two positive ints"),
    (dict(sparsity=0.5, score="wanda"), "Prune.score must be one of"),
    (dict(sparsity=0.5, pattern="neurons", score="magnitude"), "score must be 'activation'"),
])
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.Prune(**kwargs)


def test_2_4_with_matching_sparsity_is_accepted():
    assert P.Prune(sparsity=0.5, pattern="2:4").pattern == "2:4"


def test_numpy_numbers_and_square_blocks_are_accepted():
    import numpy as np
    p = P.Prune(sparsity=np.float32(0.5), pattern="block", block=16, exclude=None)
    assert (p.sparsity, type(p.sparsity), p.block, p.exclude) == (0.5, float, (16, 16), ())
    d = P.Distill(steps=np.int64(10), lr=np.float32(0.5))
    assert (d.steps, type(d.steps), d.lr) == (10, int, 0.5)


def test_include_exclude_and_quantized_layers_skipped():
    m, gm, _ = captured()
    P.Quantize(weights="int8", activations="dynamic", include=("a",))(gm)
    res = P.Prune(sparsity=0.5, exclude=("c",), score="magnitude")(gm)
    assert res.stats["skipped"] == {"a": "quantized (prune before Quantize)"}
    assert list(res.stats["pruned"]) == ["b"]


def test_include_exclude_after_fuse_see_every_merged_layer(tiny_llama_capture):
    """Fuse merges q/k/v and gate/up into one GEMM each; the patterns must read all the merged layers' names
    (they used to see only the first one's: exclude="*.k_proj" pruned k anyway, include="*.k_proj" nothing)."""
    merged = P.Fuse()(ir.fork(tiny_llama_capture.graph)).graph_module
    names = {ir.meta.layer_name(n) for n in merged.graph.nodes if ir.meta.merged_modules(n)}
    assert names == {f"model.layers.{i}.{m}" for i in range(2)
                     for m in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj")}
    res = P.Prune(sparsity=0.5, score="magnitude", exclude=("*.k_proj", "*.v_proj", "lm_head"))(ir.fork(merged))
    kept = ("mlp.gate_proj+up_proj", "mlp.down_proj", "self_attn.o_proj")
    assert sorted(res.stats["pruned"]) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in kept)
    why = res.stats["skipped"]["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    assert "select only ['q_proj']" in why and "before Fuse" in why
    res = P.Prune(sparsity=0.5, score="magnitude", include="*.k_proj")(ir.fork(merged))
    assert not res.stats.get("pruned") and "select only ['k_proj']" in \
        res.stats["skipped"]["model.layers.1.self_attn.q_proj+k_proj+v_proj"]
    pruned = P.Prune(pattern="2:4", score="magnitude", exclude="lm_head")(ir.fork(merged)).graph_module
    lowered = P.LowerSparse()(pruned).graph_module                 # sparse_linear keeps the merged name
    assert {ir.meta.layer_name(n) for n in lowered.graph.nodes if ir.meta.merged_modules(n)} == names
    res = P.Quantize(include=("*.q_proj", "*.k_proj", "*.v_proj"))(ir.fork(merged))     # all three: taken whole
    assert res.stats["layers"] == 2
    q = [ir.meta.info(n).quant["module"] for n in res.graph_module.graph.nodes
         if n.meta.get("slimfx") and (ir.meta.info(n).quant or {}).get("mode")]
    assert q == [f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj" for i in range(2)]


def test_pipeline_to_sparse_ops(tiny_llama):
    """Prune 2:4 -> Fuse -> LowerSparse: every pruned linear becomes a 2:4 sparse_linear, and the numpy and
    torch backends agree (float32 sums in different orders: 1e-5 of the logits' scale)."""
    ids, mask = text_batch(2, 12, 97)
    cm = slimfx.compile(tiny_llama, (), dict(input_ids=ids, attention_mask=mask, use_cache=False),
                        passes=[P.Prune(pattern="2:4", exclude="lm_head"), P.Fuse(), P.LowerSparse()],
                        backend="numpy", progress=False)
    patterns = [n.args[5] for n in cm.graph.graph.nodes if n.target is sf.sparse_linear.default]
    assert patterns and set(patterns) == {"2:4"}
    assert ir.op_counts(cm.graph)["aten.linear.default"] == 1                 # lm_head
    out = cm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ref = lower(cm.graph, "torch")((), dict(input_ids=ids, attention_mask=mask, use_cache=False)).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    rows = {r["module"]: r for r in cm.report().layers()}
    assert rows["model.layers.0.mlp.down_proj"]["sparsity"] == pytest.approx(0.5)


def test_pipeline_block_then_w8a8(tiny_llama):
    """Prune blocks -> Quantize W8A8 -> LowerSparse: the zeros survive quantization (zero quantizes to zero),
    so every quantized layer records the block pattern for bsr_int8_gemm."""
    ids, mask = text_batch(2, 12, 97)
    cm = slimfx.compile(tiny_llama, (), dict(input_ids=ids, attention_mask=mask, use_cache=False),
                        passes=[P.Prune(sparsity=0.6, pattern="block", block=(16, 32), exclude="lm_head"),
                                P.Quantize(weights="int8", activations="dynamic", exclude="lm_head"),
                                P.LowerSparse(block=(16, 32))],                  # int8 blocks: BK >= 32
                        backend="numpy", progress=False)
    q = [n for n in cm.graph.graph.nodes if n.target is sf.quantized_linear.default]
    assert q and all(ir.meta.info(n).sparse == "block:16x32" for n in q)


# --- structured: feed-forward neurons --------------------------------------------------------------------
# The units removed are recomputed here independently: the consumer's input captured by a forward hook on
# the eager model over the same inputs, score E|x_j| * ||W[:, j]|| per column (summed per kv group for
# heads). Removing a unit = zeroing the consumer's columns for it, so the shrunk graph must match that
# dense model (float32 sums over fewer terms: 1e-5 of the output's scale).

def _rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48)).eval()


def _matches_dense_llama(cm, dense):
    """The shrunk graph, on torch and numpy, against the dense model with the removed units zeroed, on a
    batch of another shape than the example (the graph stays dynamic)."""
    ids, mask = text_batch(3, 9, 97, seed=4)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    assert _rel(cm(**kw).logits, dense(**kw).logits) < 1e-5
    assert _rel(lower(cm.graph, "numpy")((), kw).logits, dense(**kw).logits) < 1e-5


def _token_means(model, layers: list, calls: list, per_token) -> list:
    """For each layer, the mean over the calls' tokens (kwargs dicts) of ``per_token(layer, x)``, x its input
    as (tokens, features) float64, summed over the tokens by per_token."""
    sums, count = [0.0] * len(layers), [0] * len(layers)

    def hook(i):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[i] = sums[i] + per_token(mod, x)
            count[i] += x.shape[0]
        return fn
    handles = [c.register_forward_pre_hook(hook(i)) for i, c in enumerate(layers)]
    with torch.no_grad():
        for kw in calls:
            model(**kw)
    for h in handles:
        h.remove()
    return [sums[i] / count[i] for i in range(len(layers))]


def _importance(model, consumers: list, calls: list, transposed: bool = False) -> list:
    """E|x_j| * ||W[:, j]|| for each consumer Linear's input columns, over the calls (kwargs dicts);
    ``transposed``: the layers keep W as (in, out) (GPT-2's Conv1D)."""
    means = _token_means(model, consumers, calls, lambda mod, x: x.abs().sum(0))
    return [m * (c.weight.T if transposed else c.weight).double().norm(dim=0) for m, c in zip(means, consumers)]


def test_neurons_llama_shrink_equals_zeroed_neurons(tiny_llama):
    import copy
    ids, mask = text_batch(2, 12, 97)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    cal = [dict(kw, input_ids=t[0], attention_mask=t[1]) for t in (text_batch(3, 10, 97, seed=s) for s in (7, 8))]
    cm = slimfx.compile(tiny_llama, (), kw, dynamic=True, backend="torch", progress=False, calibration=cal,
                        passes=[P.Prune(sparsity=0.25, pattern="neurons")])
    stats = cm.report().records[0].stats
    assert stats["scored_on"] == "calibration"
    assert stats["shrunk"] == {f"model.layers.{i}.mlp.down_proj": "80 -> 60 neurons" for i in range(2)}
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["model.layers.1.mlp.up_proj"] == "60 x 48" and rows["model.layers.1.mlp.down_proj"] == "48 x 60"
    zeroed = copy.deepcopy(tiny_llama)
    downs = [layer.mlp.down_proj for layer in zeroed.model.layers]
    with torch.no_grad():
        for down, score in zip(downs, _importance(zeroed, downs, cal)):
            down.weight[:, score.argsort()[:20]] = 0
    _matches_dense_llama(cm, zeroed)


def test_structured_include_exclude_by_block_or_any_of_its_layers(tiny_llama_capture):
    """A block is named in the statistics (the attention module, the MLP's down_proj): include may name it or any
    of its layers; exclude naming any of them keeps the block whole and says so (both used to be silent)."""
    def run(**kw):
        return P.Prune(sparsity=0.5, **kw)(ir.fork(tiny_llama_capture.graph), P.PassContext(
            tiny_llama_capture.captured.example_args, tiny_llama_capture.captured.example_kwargs)).stats
    blocks = [f"model.layers.{i}.self_attn" for i in range(2)]
    for include in ("*.self_attn", "*.k_proj", "model.layers.*"):
        assert sorted(run(pattern="heads", include=include)["shrunk"]) == blocks, include
    assert list(run(pattern="heads", include="model.layers.1.self_attn")["shrunk"]) == blocks[1:]
    stats = run(pattern="heads", exclude="*.o_proj")
    assert stats["shrunk"] == {}
    assert "exclude matches ['model.layers.0.self_attn.o_proj']" in stats["skipped"][blocks[0]]
    assert list(run(pattern="neurons", include="model.layers.0.mlp.down_proj")["shrunk"]) == \
        ["model.layers.0.mlp.down_proj"]
    stats = run(pattern="neurons", exclude="model.layers.1.mlp.up_proj")
    assert list(stats["shrunk"]) == ["model.layers.0.mlp.down_proj"]
    assert "shrink together" in stats["skipped"]["model.layers.1.mlp.down_proj"]


def test_neurons_bert_biases_scored_on_example_inputs():
    import copy
    bert = _tiny_bert()
    ids, mask = text_batch(2, 10, 50)
    kw = dict(input_ids=ids, attention_mask=mask)
    cm = slimfx.compile(bert, (), kw, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=0.5, pattern="neurons", exclude="*.layer.1.*")])
    stats = cm.report().records[0].stats
    assert stats["scored_on"] == "example inputs"
    assert stats["shrunk"] == {"encoder.layer.0.output.dense": "48 -> 24 neurons"}
    zeroed = copy.deepcopy(bert)
    out = zeroed.encoder.layer[0].output.dense
    with torch.no_grad():
        out.weight[:, _importance(zeroed, [out], [kw])[0].argsort()[:24]] = 0
    assert _rel(cm(**kw).last_hidden_state, zeroed(**kw).last_hidden_state) < 1e-5


def test_neurons_read_elsewhere_are_not_pruned():
    class Tapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h), h.sum(-1)          # the neurons are an output too: they cannot go

    gm = ir.capture(Tapped().eval(), (torch.randn(2, 8),)).gm
    res = P.Prune(sparsity=0.5, pattern="neurons")(gm)
    assert not res.modified and res.stats["shrunk"] == {}


def test_neurons_refuse_global_scope():
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        P.Prune(sparsity=0.5, pattern="neurons", scope="global")


# --- structured: attention heads ---------------------------------------------------------------------------

def _head_sizes(model, os_: list, heads: int, calls: list, transposed: bool = False) -> list:
    """Per o_proj (a Linear; ``transposed``: GPT-2's Conv1D, W kept (in, out)), (heads,) E_t ||W[:, h] y_t,h||
    over the calls' tokens (kwargs dicts): the size of what each head adds to the output, in plain torch."""
    def sizes(mod, y):
        w = (mod.weight if transposed else mod.weight.T).detach().double()                # (in, out)
        d = y.shape[1] // heads
        return torch.stack([(y[:, h * d:(h + 1) * d] @ w[h * d:(h + 1) * d]).norm(dim=1).sum() for h in range(heads)])
    return _token_means(model, os_, calls, sizes)


def _zero_heads(model, os_: list, heads, kv, dim, calls, gone=None) -> int:
    """Zero, in place, the o_proj columns of the kv groups the stated score removes (``gone``, else
    nearest(kv / 2) groups, at most kv - 1; a group scored by its q heads' ``_head_sizes`` summed): a
    removed head adds nothing to the output."""
    rep = heads // kv
    gone = min(nearest(kv / 2), kv - 1) if gone is None else gone
    with torch.no_grad():
        for o, score in zip(os_, _head_sizes(model, os_, heads, calls)):
            for g_ in score.reshape(kv, -1).sum(1).argsort()[:gone].tolist():
                o.weight[:, g_ * rep * dim:(g_ + 1) * rep * dim] = 0
    return gone


@pytest.mark.parametrize("heads,kv", [(6, 2), (9, 3), (4, 4)])
def test_heads_llama_gqa_shrink_equals_zeroed_heads(heads, kv):
    """Grouped-query attention: kv groups and their q heads go together, and the head counts spelled in
    the graph (repeat_kv's expand and reshape) follow; 9/3 is the case where a kv count equals the repeat
    count (SmolLM2's layout)."""
    import copy
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=8 * heads, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                                         head_dim=8)).eval()
    ids, mask = text_batch(2, 12, 97)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    cm = slimfx.compile(model, (), kw, dynamic=True, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=0.5, pattern="heads")])
    zeroed = copy.deepcopy(model)
    left = kv - _zero_heads(zeroed, [layer.self_attn.o_proj for layer in zeroed.model.layers], heads, kv, 8, [kw])
    assert cm.report().records[0].stats["shrunk"] == {f"model.layers.{i}.self_attn": f"{kv} -> {left} kv heads"
                                                      for i in range(2)}
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["model.layers.0.self_attn.k_proj"] == f"{8 * left} x {8 * heads}"
    assert rows["model.layers.0.self_attn.o_proj"] == f"{8 * heads} x {8 * left * heads // kv}"
    _matches_dense_llama(cm, zeroed)


def test_heads_bert_biases():
    import copy
    bert = _tiny_bert()
    ids, mask = text_batch(2, 10, 50)
    kw = dict(input_ids=ids, attention_mask=mask)
    cm = slimfx.compile(bert, (), kw, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=0.5, pattern="heads")])
    zeroed = copy.deepcopy(bert)
    _zero_heads(zeroed, [layer.attention.output.dense for layer in zeroed.encoder.layer], 4, 4, 8, [kw])
    assert cm.report().records[0].stats["shrunk"] == {f"encoder.layer.{i}.attention": "4 -> 2 kv heads"
                                                      for i in range(2)}
    assert _rel(cm(**kw).last_hidden_state, zeroed(**kw).last_hidden_state) < 1e-5


def test_heads_from_one_fused_projection_cut_in_three_shrink():
    """q, k and v as the three contiguous parts of one linear (chunk along its last axis): each part loses
    the removed heads' rows, the split sizes and the width literals follow."""
    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            y = F.scaled_dot_product_attention(q, k, v)
            return self.o(y.transpose(1, 2).reshape(2, 5, 16))

    torch.manual_seed(0)
    model, x = Fused().eval(), torch.randn(2, 5, 16)
    gm = ir.capture(model, (x,)).gm
    res = P.Prune(sparsity=0.5, pattern="heads")(gm, P.PassContext((x,)))
    assert list(res.stats["shrunk"].values()) == ["4 -> 2 kv heads"]   # named after o: no common module prefix
    assert weights(res.graph_module)["qkv"].shape == (24, 16)
    gone = _head_sizes(model, [model.o], 4, [dict(x=x)])[0].argsort()[:2].tolist()
    with torch.no_grad():
        for h in gone:
            model.o.weight[:, h * 4:(h + 1) * 4] = 0
    assert _rel(res.graph_module(x), model(x)) < 1e-5


@pytest.mark.parametrize("family", ["gpt_neox", "falcon"])
def test_heads_fused_projection_laid_out_per_group_shrinks(family):
    """One projection whose output is viewed into per-group blocks before q, k and v are cut out of each:
    GPT-NeoX's (..., heads, 3 x head_dim), Falcon's (..., kv heads, q heads per kv head + 2, head_dim) (the
    new decoder architecture: 6 q heads in 2 kv groups, 5 x 8 rows each). A removed group takes its whole block
    of rows, and the views' group counts follow."""
    import copy
    import transformers as T
    torch.manual_seed(0)
    if family == "gpt_neox":
        model, attn, heads, kv = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            vocab_size=97, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=56,
            max_position_embeddings=64)), "gpt_neox.layers.{}.attention", 4, 4
    else:
        model, attn, heads, kv = T.FalconForCausalLM(T.FalconConfig(
            vocab_size=97, hidden_size=48, num_attention_heads=6, num_kv_heads=2, num_hidden_layers=2,
            new_decoder_architecture=True)), "transformer.h.{}.self_attention", 6, 2
    model.eval()
    cm, kw, stats = _pruned(model, "heads", 0.5)
    left = kv - min(nearest(kv / 2), kv - 1)
    assert stats["shrunk"] == {attn.format(i): f"{kv} -> {left} kv heads" for i in range(2)}, stats
    layers = {r["module"]: r["out x in"] for r in cm.report().layers()}
    hidden = 8 * heads
    assert layers[f"{attn.format(1)}.query_key_value"] == f"{8 * (heads + 2 * kv) * left // kv} x {hidden}"
    assert layers[f"{attn.format(1)}.dense"] == f"{hidden} x {8 * heads * left // kv}"
    zeroed = copy.deepcopy(model)
    _zero_heads(zeroed, [zeroed.get_submodule(f"{attn.format(i)}.dense") for i in range(2)], heads, kv, 8, [kw])
    _matches_dense_llama(cm, zeroed)


def test_heads_alibi_left_whole_says_why():
    """BLOOM adds a per-head ALiBi bias to the scores (one slope per head, from outside the block, flattened
    with the batch): its heads stay, and the statistics say why."""
    import transformers as T
    torch.manual_seed(0)
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=97, hidden_size=32, n_head=4, n_layer=2)).eval()
    cm, kw, stats = _pruned(model, "heads", 0.5)
    assert stats["shrunk"] == {}
    assert set(stats["skipped"]) == {f"transformer.h.{i}.self_attention" for i in range(2)}
    why = stats["skipped"]["transformer.h.0.self_attention"]
    assert "from outside the attention block enters" in why and "ALiBi" in why, why


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_heads_alibi_along_a_head_axis_loses_the_removed_heads(sparsity):
    """MPT adds its ALiBi bias as (heads, 1, keys), sliced from one table built outside the blocks: each pruned
    block reads the kept heads' slopes of it (an index_select before the add) and computes what the model with
    the removed heads' o columns zeroed computes, the other blocks' bias untouched."""
    import copy
    import transformers as T
    torch.manual_seed(0)
    model = T.MptForCausalLM(T.MptConfig(vocab_size=97, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2,
                                         max_seq_len=64)).eval()
    cm, kw, stats = _pruned(model, "heads", sparsity)
    left = 4 - nearest(4 * sparsity)
    assert stats["shrunk"] == {f"transformer.blocks.{i}.attn": f"4 -> {left} kv heads" for i in range(2)}, stats
    picks = [n for n in cm.graph.graph.nodes if n.target is torch.ops.aten.index_select.default]
    assert len(picks) == 2 and all(tuple(getattr(cm.graph, n.args[2].target).shape) == (left,) for n in picks)
    zeroed = copy.deepcopy(model)
    _zero_heads(zeroed, [blk.attn.out_proj for blk in zeroed.transformer.blocks], 4, 4, 8, [kw],
                gone=nearest(4 * sparsity))
    _matches_dense_llama(cm, zeroed)


@pytest.mark.parametrize("heads", [4, 3])
def test_heads_of_a_fused_projection_viewed_as_thirds_shrink(heads):
    """ModernBERT cuts q, k and v out of Wqkv by a view (..., 3, heads, head_dim) unbound along the 3: three
    contiguous parts, not one block per kv group (the block was left whole as such). Each part loses the removed
    heads' rows, the view's -1 follows (its 3 is no head count, also with 3 heads, where it was rewritten and the
    pass raised), and the encoder computes what ModernBERT with those heads' o columns zeroed computes, on torch
    and numpy, at another shape."""
    import transformers as T
    from conftest import zero_what_the_graph_removed
    torch.manual_seed(0)
    model = T.ModernBertModel(T.ModernBertConfig(vocab_size=97, hidden_size=8 * heads, num_hidden_layers=2,
                                                 num_attention_heads=heads, intermediate_size=40, pad_token_id=0,
                                                 bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                                 max_position_embeddings=64)).eval()
    ids, mask = text_batch(2, 9, 97, pad_left=True, seed=2)
    cm = slimfx.compile(model, (), dict(input_ids=ids, attention_mask=mask), dynamic=True, backend="torch",
                        progress=False, passes=[P.Prune(sparsity=0.5, pattern="heads")])
    stats = cm.report().records[0].stats
    left = heads - nearest(heads / 2)
    assert stats["shrunk"] == {f"layers.{i}.attn": f"{heads} -> {left} kv heads" for i in range(2)}, stats
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["layers.1.attn.Wqkv"] == f"{24 * left} x {8 * heads}", rows
    assert rows["layers.1.attn.Wo"] == f"{8 * heads} x {8 * left}", rows
    zeroed, narrowed = zero_what_the_graph_removed(model, cm.graph)
    assert narrowed == [f"layers.{i}.attn.Wo.weight" for i in range(2)], narrowed
    ids, mask = text_batch(3, 7, 97, pad_left=True, seed=5)
    kw = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = zeroed(**kw).last_hidden_state
        # the heads were in use (ModernBERT's init keeps Wo small: 4e-3 after the final norm, far above 1e-5)
        assert _rel(want, model(**kw).last_hidden_state) > 1e-3
    assert _rel(cm(**kw).last_hidden_state, want) < 1e-5
    assert _rel(lower(cm.graph, "numpy")((), kw).last_hidden_state, want) < 1e-5


def test_heads_of_a_per_head_attention_mask_lose_the_removed_heads():
    """T5 adds its relative position bias, one per head and shared by the layers, through
    scaled_dot_product_attention's attn_mask (B, heads, q, k): each pruned block (encoder and decoder
    self-attention, cross-attention) reads the kept heads of it; the pass raised a shape error instead. The
    graph computes what T5 with the removed heads' o columns zeroed computes, on torch and numpy."""
    import transformers as T
    from conftest import zero_what_the_graph_removed
    torch.manual_seed(0)
    model = T.T5Model(T.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, decoder_start_token_id=0)).eval()
    ids, mask = text_batch(2, 9, 97, pad_left=True, seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5], use_cache=False)
    cm = slimfx.compile(model, (), kw, dynamic=True, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=0.5, pattern="heads")])
    stats = cm.report().records[0].stats
    blocks = [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)] + \
        [f"decoder.block.{i}.layer.{j}.{a}" for i in range(2)
         for j, a in enumerate(("SelfAttention", "EncDecAttention"))]
    assert stats["shrunk"] == {b: "4 -> 2 kv heads" for b in blocks}, stats
    assert sum(n.target is torch.ops.aten.index_select.default for n in cm.graph.graph.nodes) == 6
    zeroed, narrowed = zero_what_the_graph_removed(model, cm.graph)
    assert len(narrowed) == 6
    ids, mask = text_batch(3, 7, 97, pad_left=True, seed=5)            # another shape: the graph stays dynamic
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4], use_cache=False)
    with torch.no_grad():
        want = zeroed(**kw).last_hidden_state
        assert _rel(want, model(**kw).last_hidden_state) > 1e-2            # the heads were in use
    assert _rel(cm(**kw).last_hidden_state, want) < 1e-5
    assert _rel(lower(cm.graph, "numpy")((), kw).last_hidden_state, want) < 1e-5


# --- structured: other model families ----------------------------------------------------------------------
# Tiny random-weight transformers models whose blocks are spelled differently from Llama's: GPT-2's Conv1D
# MLP (reshapes around each linear, tanh GELU), Phi's gelu_new as separate ops, Phi-3's one gate_up_proj
# split in two, Gemma-2's eager (soft-capped) attention, OLMo-2's norm over the whole q and k projections.

def _tiny(family: str):
    import transformers as T
    common = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=56,
                  max_position_embeddings=64)
    cfg, cls = {
        "gpt2": (T.GPT2Config(vocab_size=97, n_embd=32, n_head=4, n_layer=2, n_inner=56, n_positions=64),
                 T.GPT2LMHeadModel),
        "phi": (T.PhiConfig(**common), T.PhiForCausalLM),
        "phi3": (T.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0), T.Phi3ForCausalLM),
        "gemma2": (T.Gemma2Config(**common, num_key_value_heads=2, head_dim=8), T.Gemma2ForCausalLM),
        "olmo2": (T.Olmo2Config(**common, num_key_value_heads=2), T.Olmo2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return cls(cfg).eval()


def _pruned(model, pattern: str, sparsity: float):
    ids, mask = text_batch(2, 12, 97)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    cm = slimfx.compile(model, (), kw, dynamic=True, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=sparsity, pattern=pattern)])
    return cm, kw, cm.report().records[0].stats


@pytest.mark.parametrize("family,mlp,fc,out", [
    ("gpt2", "transformer.h.{}.mlp", "c_fc", "c_proj"),           # Conv1D: reshape -> linear -> view -> gelu(tanh)
    ("phi", "model.layers.{}.mlp", "fc1", "fc2"),                 # gelu_new: mul, pow, tanh, add
    ("phi3", "model.layers.{}.mlp", "gate_up_proj", "down_proj"),  # gate and up: the two halves of one linear
])
def test_neurons_other_families_shrink_equals_zeroed_neurons(family, mlp, fc, out):
    import copy
    model = _tiny(family)
    cm, kw, stats = _pruned(model, "neurons", 0.25)
    assert stats["shrunk"] == {f"{mlp.format(i)}.{out}": "56 -> 42 neurons" for i in range(2)}
    assert stats["skipped"] == {}
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    segments = 2 if family == "phi3" else 1           # Phi-3's gate_up: rows j and 56 + j are neuron j
    assert rows[f"{mlp.format(1)}.{fc}"] == f"{42 * segments} x 32" and rows[f"{mlp.format(1)}.{out}"] == "32 x 42"
    zeroed = copy.deepcopy(model)
    consumers = [zeroed.get_submodule(f"{mlp.format(i)}.{out}") for i in range(2)]
    conv1d = family == "gpt2"                          # Conv1D keeps its weight as (in, out): a neuron is a row
    with torch.no_grad():
        for c, score in zip(consumers, _importance(zeroed, consumers, [kw], transposed=conv1d)):
            if conv1d:
                c.weight[score.argsort()[:14]] = 0
            else:
                c.weight[:, score.argsort()[:14]] = 0
    _matches_dense_llama(cm, zeroed)


def test_heads_gemma2_eager_attention_shrinks():
    """Gemma-2 computes attention eagerly (softmax(soft_cap(q k^T * scale) + mask) v), not as one
    scaled_dot_product_attention: its heads are found and removed all the same."""
    import copy
    model = _tiny("gemma2")
    cm, kw, stats = _pruned(model, "heads", 0.5)
    assert stats["shrunk"] == {f"model.layers.{i}.self_attn": "2 -> 1 kv heads" for i in range(2)}
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["model.layers.0.self_attn.q_proj"] == "16 x 32" and rows["model.layers.0.self_attn.o_proj"] == "32 x 16"
    zeroed = copy.deepcopy(model)
    _zero_heads(zeroed, [layer.self_attn.o_proj for layer in zeroed.model.layers], 4, 2, 8, [kw])
    _matches_dense_llama(cm, zeroed)


def test_heads_olmo2_norm_over_all_heads_shrinks_to_the_architecture_with_fewer_heads():
    """OLMo-2 normalizes q_proj's and k_proj's whole outputs (every head together) before the split into heads.
    Pruned, those norms take their mean over the kept heads' channels, their weights narrowed alike: what
    OLMo-2 computes with that many heads. The reference is transformers' own Olmo2 built with 2 q heads and
    1 kv head (head_dim 8 kept), holding the original weights of the kv group the stated score keeps (o_proj's
    input importance, recomputed here): q/k/v rows, o_proj columns, q_norm / k_norm entries (made unequal, so
    a wrong slice shows). Its neurons still go too."""
    import transformers as T
    model = _tiny("olmo2")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    cm, kw, stats = _pruned(model, "heads", 0.5)
    assert stats["shrunk"] == {f"model.layers.{i}.self_attn": "2 -> 1 kv heads" for i in range(2)}, stats
    assert stats["skipped"] == {}
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["model.layers.0.self_attn.q_proj"] == "16 x 32" and rows["model.layers.0.self_attn.k_proj"] == "8 x 32"
    os_ = [layer.self_attn.o_proj for layer in model.model.layers]
    kept = [int(score.argmax()) for score in _head_sizes(model, os_, 2, [kw])]
    small = T.Olmo2ForCausalLM(T.Olmo2Config(vocab_size=97, hidden_size=32, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
                                             intermediate_size=56, max_position_embeddings=64)).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i, g in enumerate(kept):
        pre = f"model.layers.{i}.self_attn."
        q, kv = slice(g * 16, (g + 1) * 16), slice(g * 8, (g + 1) * 8)      # 2 q heads of 8 per kv group
        for name, rows_ in (("q_proj.weight", q), ("k_proj.weight", kv), ("v_proj.weight", kv),
                            ("q_norm.weight", q), ("k_norm.weight", kv)):
            sd[pre + name] = sd[pre + name][rows_]
        sd[pre + "o_proj.weight"] = sd[pre + "o_proj.weight"][:, q]
    small.load_state_dict(sd)
    _matches_dense_llama(cm, small)
    ctx = P.PassContext((), kw)
    gm = ir.capture(model, (), kw).gm
    res = P.Prune(sparsity=0.25, pattern="neurons")(gm, ctx)
    assert res.stats["shrunk"] == {f"model.layers.{i}.mlp.down_proj": "56 -> 42 neurons" for i in range(2)}


def test_heads_left_whole_when_a_projection_is_used_across_heads_otherwise():
    """A use of the whole projection that is not elementwise, a mean over its last axis or a per-channel
    parameter (here a sum over it, added back) keeps the block whole, with the reason."""
    model = _tiny("olmo2")
    for layer in model.model.layers:
        layer.self_attn.q_norm.forward = lambda x: x + x.sum(-1, keepdim=True).tanh()
    cm, kw, stats = _pruned(model, "heads", 0.5)
    assert stats["shrunk"] == {}
    why = stats["skipped"]["model.layers.0.self_attn"]
    assert why.startswith("model.layers.0.self_attn.q_norm uses model.layers.0.self_attn.q_proj's output over all "
                          "its heads at once (aten.sum.dim_IntList)"), why


def test_neurons_blocks_left_whole_say_why():
    """Each feed-forward block the pass cannot narrow is in the statistics with its reason: neurons read
    elsewhere, an op other than a mean that mixes the neurons (a max over them), a per-neuron tensor read
    twice."""
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up = torch.nn.ModuleList(torch.nn.Linear(8, 24) for _ in range(4))
            self.down = torch.nn.ModuleList(torch.nn.Linear(24, 8) for _ in range(4))
            self.scale = torch.nn.Parameter(torch.rand(24))

        def forward(self, x):
            h0 = torch.relu(self.up[0](x))
            h1 = self.up[1](x)
            h1 = h1 - h1.amax(-1, keepdim=True)                               # a max over the neurons
            h2 = F.gelu(self.up[2](x)) * self.scale + self.scale
            h3 = F.silu(self.up[3](x)) * 2.0                                  # prunable
            return self.down[0](h0) + self.down[1](h1) + self.down[2](h2) + self.down[3](h3), h0.sum(-1)

    x = torch.randn(3, 5, 8)
    gm = ir.capture(Blocks().eval(), (x,)).gm
    res = P.Prune(sparsity=0.5, pattern="neurons")(gm, P.PassContext((x,)))
    assert res.stats["shrunk"] == {"down.3": "24 -> 12 neurons"}
    why = res.stats["skipped"]
    assert set(why) == {"down.0", "down.1", "down.2"}
    assert why["down.0"].startswith("the neurons are also read by sum"), why
    assert "aten.amax.default, which mixes the neurons" in why["down.1"], why
    assert "of shape (24,) is applied to the neurons one by one" in why["down.2"], why


def test_neurons_through_an_rms_norm_shrink_to_the_narrower_block():
    """An RMS norm over the neurons (BitNet's ffn_sub_norm, DeepSeek-V3's q_a_layernorm over its latent) takes
    its mean over the kept neurons and loses the removed entries of its weight: the block computes what it
    computes built with that many neurons. Reference: by hand, with the kept neurons' slices of every weight
    (which neurons: read off the graph's up rows)."""
    torch.manual_seed(0)
    w = dict(wu=torch.randn(24, 8) / 3, bu=torch.randn(24), wd=torch.randn(8, 24) / 5, bd=torch.randn(8),
             g=torch.rand(24) + 0.5)

    def block(x, wu, bu, wd, bd, g):
        h = F.silu(F.linear(x, wu, bu))
        return F.linear(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * g, wd, bd)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, t in w.items():
                self.register_parameter(k, torch.nn.Parameter(t.clone()))

        def forward(self, x):
            return block(x, *(getattr(self, k) for k in w))
    x = torch.randn(3, 5, 8)
    gm = ir.capture(Block(), (x,), dynamic=True).gm
    res = P.Prune(sparsity=0.5, pattern="neurons")(gm, P.PassContext((x,)))
    assert list(res.stats["shrunk"].values()) == ["24 -> 12 neurons"], res.stats
    up = next(getattr(res.graph_module, n.args[1].target) for n in res.graph_module.graph.nodes
              if n.target is torch.ops.aten.linear.default)
    kept = torch.tensor([i for i in range(24) if any(torch.equal(w["wu"][i], r) for r in up)])
    assert len(kept) == 12
    small = dict(wu=w["wu"][kept], bu=w["bu"][kept], wd=w["wd"][:, kept], bd=w["bd"], g=w["g"][kept])
    for xi in (x, torch.randn(1, 2, 8)):
        with torch.no_grad():
            ref = block(xi, **small)
        assert _rel(res.graph_module(xi), ref) < 1e-5
        assert _rel(lower(res.graph_module, "numpy")((xi,), {}), ref) < 1e-5


def test_neurons_named_from_the_weight_without_module_metadata():
    """A linear whose node lost its module metadata (a rewrite rule's new node) is still named after its
    module, through its weight's parameter path."""
    m = Net().eval()
    x = torch.randn(3, 5, 40)
    gm = ir.capture(m, (x,)).gm
    for n in gm.graph.nodes:
        if n.target is torch.ops.aten.linear.default:
            n.meta.pop("nn_module_stack", None)
    res = P.Prune(sparsity=0.5, pattern="neurons")(gm, P.PassContext((x,)))
    assert set(res.stats["shrunk"]) == {"b", "c"}


def test_heads_single_kv_head_says_why():
    class OneHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            q, k, v = (p(x).view(2, 5, 1, 16).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))

    x = torch.randn(2, 5, 16)
    gm = ir.capture(OneHead().eval(), (x,)).gm
    res = P.Prune(sparsity=0.5, pattern="heads")(gm, P.PassContext((x,)))
    assert not res.modified and list(res.stats["skipped"].values()) == ["one kv head only: it stays"]


@pytest.mark.parametrize("family,attn,qkv,o,heads,kv,rows", [
    ("gpt2", "transformer.h.{}.attn", "c_attn", "c_proj", 4, 4, "48 x 32"),           # split(H) in three
    ("phi3", "model.layers.{}.self_attn", "qkv_proj", "o_proj", 4, 2, "32 x 32"),  # slices [32 | 16 | 16]
])
def test_heads_fused_qkv_shrink_equals_zeroed_heads(family, attn, qkv, o, heads, kv, rows):
    """One projection for q, k and v, cut along its output axis into contiguous parts: every part loses the
    removed groups' rows (GPT-2: 96 -> 48; Phi-3: 32 + 16 + 16 -> 16 + 8 + 8), the split sizes, slice
    bounds and GPT-2's width views follow."""
    import copy
    model = _tiny(family)
    cm, kw, stats = _pruned(model, "heads", 0.5)
    assert stats["shrunk"] == {attn.format(i): f"{kv} -> {kv // 2} kv heads" for i in range(2)}
    assert stats["skipped"] == {}
    layers = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert layers[f"{attn.format(1)}.{qkv}"] == rows and layers[f"{attn.format(1)}.{o}"] == "32 x 16"
    zeroed = copy.deepcopy(model)
    os_ = [zeroed.get_submodule(f"{attn.format(i)}.{o}") for i in range(2)]
    if family == "gpt2":                               # Conv1D keeps (in, out): zero rows, scored transposed
        with torch.no_grad():
            for c, score in zip(os_, _head_sizes(zeroed, os_, 4, [kw], transposed=True)):
                for h in score.argsort()[:2].tolist():
                    c.weight[h * 8:(h + 1) * 8] = 0
    else:
        _zero_heads(zeroed, os_, heads, kv, 8, [kw])
    _matches_dense_llama(cm, zeroed)


# --- structured: mixture-of-experts neurons ----------------------------------------------------------------

def _expert_scores(model, calls: list) -> list:
    """(experts, I) reference scores per MoE layer: E_e|h_j| * ||down_e[:, j]||, h = act(gate) * up of the tokens
    routed to expert e, computed in plain torch from what each experts module is called with (Mixtral's
    layout: gate_up_proj (E, 2I, H), down_proj (E, H, I))."""
    mods = [layer.mlp.experts for layer in model.model.layers]
    sums = [0.0] * len(mods)
    counts = [0] * len(mods)

    def hook(i):
        def fn(mod, args):
            x, top_k_index = args[0].detach().double(), args[1]
            e_count, two_i, _ = mod.gate_up_proj.shape
            s, c = torch.zeros(e_count, two_i // 2, dtype=torch.float64), torch.zeros(e_count, dtype=torch.float64)
            for e in range(e_count):
                rows = (top_k_index == e).any(-1)
                gate, up = (x[rows] @ mod.gate_up_proj[e].double().T).chunk(2, -1)
                s[e] = (F.silu(gate) * up).abs().sum(0)
                c[e] = rows.sum()
            sums[i], counts[i] = sums[i] + s, counts[i] + c
        return fn
    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)]
    with torch.no_grad():
        for kw in calls:
            model(**kw)
    for h in handles:
        h.remove()
    return [sums[i] / counts[i][:, None] * m.down_proj.double().norm(dim=1) for i, m in enumerate(mods)]


def test_neurons_experts_shrink_per_expert_equals_zeroed_neurons():
    """Mixtral's experts (3-D tensors behind grouped GEMMs): every expert keeps its own best 42 of 56 neurons,
    scored on the tokens routed to it; gate_up loses both halves' rows, down its columns, the split its size,
    and the shrunk graph computes what the model computes with those neurons zeroed, on torch and numpy."""
    import copy
    import transformers as T
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                                 num_key_value_heads=2, num_hidden_layers=2, intermediate_size=56,
                                                 num_local_experts=4, num_experts_per_tok=2)).eval()
    cm, kw, stats = _pruned(model, "neurons", 0.25)
    assert stats["shrunk"] == {f"model.layers.{i}.mlp.experts.down_proj": "56 -> 42 neurons per expert"
                               for i in range(2)}
    gm = cm.graph
    new = {ir.meta.param_name(n): getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"
           and ir.meta.param_name(n) and ".experts." in ir.meta.param_name(n)}
    assert new["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 84, 32)
    assert new["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, 42)
    zeroed = copy.deepcopy(model)
    for layer, score in zip(zeroed.model.layers, _expert_scores(model, [kw])):
        for e in range(4):
            gone = score[e].argsort()[:14]
            kept = torch.ones(56, dtype=torch.bool).index_fill(0, gone, False)
            # the graph holds exactly the best-scored neurons of each expert, in their order
            assert torch.equal(new[f"model.layers.{layer.self_attn.layer_idx}.mlp.experts.down_proj"][e],
                               layer.mlp.experts.down_proj[e][:, kept])
            with torch.no_grad():
                layer.mlp.experts.down_proj[e][:, gone] = 0
    _matches_dense_llama(cm, zeroed)


def test_neurons_an_expert_no_token_reached_keeps_its_largest_columns():
    """Scores need the tokens routed to an expert; one that calibration never reached is scored by its down
    projection's column norms alone. Here expert 1 gets no rows (offsets [3, 3, 7])."""
    import copy
    grouped = P.quantize_experts.grouped_gemm_ops()
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is None or fallback.default not in grouped:
        pytest.skip("transformers' grouped_mm_fallback is not registered")

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gate_up = torch.nn.Parameter(torch.randn(3, 2 * 6, 8))
            self.down = torch.nn.Parameter(torch.randn(3, 8, 6))

        def forward(self, x, offs):
            h = fallback(x, self.gate_up.transpose(1, 2), offs)
            gate, up = h.chunk(2, -1)
            return fallback(F.silu(gate) * up, self.down.transpose(1, 2), offs)

    model, x, offs = Experts().eval(), torch.randn(7, 8), torch.tensor([3, 3, 7], dtype=torch.int32)
    gm = ir.capture(model, (x, offs)).gm
    res = P.Prune(sparsity=0.5, pattern="neurons")(gm, P.PassContext((x, offs)))
    assert res.stats["shrunk"] == {"down": "6 -> 3 neurons per expert"}
    down = [getattr(res.graph_module, n.target) for n in res.graph_module.graph.nodes
            if n.op == "get_attr" and ir.meta.param_name(n) == "down"][0]
    zeroed = copy.deepcopy(model)
    for e, rows in enumerate([slice(0, 3), slice(3, 3), slice(3, 7)]):
        norms = model.down[e].detach().double().norm(dim=0)
        gate, up = (x[rows] @ model.gate_up[e].detach().T).double().chunk(2, -1)
        score = (F.silu(gate) * up).abs().mean(0) * norms if e != 1 else norms
        kept = score.argsort(descending=True)[:3].sort().values
        assert torch.equal(down[e], model.down[e][:, kept].detach()), e
        with torch.no_grad():
            zeroed.down[e][:, score.argsort()[:3]] = 0
    # and the graph computes the model with each expert's removed neurons zeroed
    assert _rel(res.graph_module(x, offs), zeroed(x, offs)) < 1e-5


@pytest.mark.parametrize("kind", ["gate", "norm"])
def test_heads_gated_or_normed_after_the_merge_shrink(kind):
    """An output gate per channel computed by a linear (AFMoE's ``y * sigmoid(gate_proj(x))``) loses the removed
    heads' rows of that linear; an RMS norm over the merged heads written out (BitNet's attn_sub_norm) loses
    their weight entries and takes its mean over the kept heads, as the block built with that many heads
    computes. Reference: the block computed by hand with the kept heads' slices of every weight (which heads
    were kept: read off the graph's q rows)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    w = {n: torch.randn(16, 16) / 4 for n in "qkvog"}
    bias_g, norm_w = torch.randn(16), torch.rand(16) + 0.5

    def block(x, w, bias_g, norm_w, heads):
        b, t, _ = x.shape
        q, k, v = ((x @ w[n].T).view(b, t, heads, 4).transpose(1, 2) for n in "qkv")
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, heads * 4)
        if kind == "gate":
            y = y * torch.sigmoid(x @ w["g"].T + bias_g)
        else:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
        return y @ w["o"].T

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, t in w.items():
                self.register_parameter(n, torch.nn.Parameter(t.clone()))
            self.bias_g, self.norm_w = torch.nn.Parameter(bias_g.clone()), torch.nn.Parameter(norm_w.clone())

        def forward(self, x):
            return block(x, {n: getattr(self, n) for n in "qkvog"}, self.bias_g, self.norm_w, 4)
    x = torch.randn(2, 5, 16)
    gm = ir.capture(Block(), (x,), dynamic=True).gm
    res = P.Prune(sparsity=0.5, pattern="heads")(gm, P.PassContext((x,), {}))
    assert res.modified and list(res.stats["shrunk"].values()) == ["4 -> 2 kv heads"], res.stats
    q_rows = next(getattr(res.graph_module, n.args[1].target) for n in res.graph_module.graph.nodes
                  if n.target is torch.ops.aten.linear.default)
    heads = [h for h in range(4) if any(torch.equal(w["q"][h * 4:h * 4 + 4], q_rows[i:i + 4]) for i in (0, 4))]
    assert len(heads) == 2, heads
    ch = torch.tensor([h * 4 + j for h in heads for j in range(4)])
    kept = {n: w[n][ch] for n in "qkvg"} | {"o": w["o"][:, ch]}
    for xi in (x, torch.randn(1, 3, 16)):
        with torch.no_grad():
            ref = block(xi, kept, bias_g[ch], norm_w[ch], 2)
        assert _rel(res.graph_module(xi), ref) < 1e-5
        assert _rel(lower(res.graph_module, "numpy")((xi,), {}), ref) < 1e-5


def test_heads_whose_q_rows_hold_an_output_gate_shrink():
    """Qwen3-Next's gated attention: q_proj gives each head 2 x head_dim rows (its query, then its output gate),
    viewed into (..., heads, 2 x head_dim) and chunked in two; the gate multiplies the merged heads before
    o_proj. A kept head keeps both halves of its rows (the view's last size, 2 x head_dim = 8 here, equals
    k's width and must not be taken for it). Reference: by hand with the kept heads' slices."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    w = {"q": torch.randn(32, 16) / 4, "k": torch.randn(8, 16) / 4, "v": torch.randn(8, 16) / 4,
         "o": torch.randn(16, 16) / 4}

    def block(x, w):                  # head_dim 4; 4 q heads, 2 kv heads
        b, t, _ = x.shape
        q, gate = torch.chunk(F.linear(x, w["q"]).view(b, t, -1, 8), 2, dim=-1)
        q = q.transpose(1, 2)
        k, v = (F.linear(x, w[n]).view(b, t, -1, 4).transpose(1, 2) for n in "kv")
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
        return F.linear(y * torch.sigmoid(gate.reshape(b, t, -1)), w["o"])

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, t in w.items():
                self.register_parameter(n, torch.nn.Parameter(t.clone()))

        def forward(self, x):
            return block(x, {n: getattr(self, n) for n in w})
    x = torch.randn(2, 5, 16)
    gm = ir.capture(Block(), (x,), dynamic=True).gm
    res = P.Prune(sparsity=0.5, pattern="heads")(gm, P.PassContext((x,), {}))
    assert res.modified and list(res.stats["shrunk"].values()) == ["2 -> 1 kv heads"], res.stats
    k_rows = [getattr(res.graph_module, n.args[1].target) for n in res.graph_module.graph.nodes
              if n.target is torch.ops.aten.linear.default][1]
    (g,) = [g for g in range(2) if torch.equal(w["k"][g * 4:g * 4 + 4], k_rows)]
    small = {"q": w["q"][g * 16:g * 16 + 16], "k": w["k"][g * 4:g * 4 + 4], "v": w["v"][g * 4:g * 4 + 4],
             "o": w["o"][:, g * 8:g * 8 + 8]}        # kv group g: q heads 2g, 2g + 1 (8 q rows each, 4 o columns)
    for xi in (x, torch.randn(1, 3, 16)):
        with torch.no_grad():
            ref = block(xi, small)
        assert _rel(res.graph_module(xi), ref) < 1e-5
        assert _rel(lower(res.graph_module, "numpy")((xi,), {}), ref) < 1e-5


def test_heads_used_together_after_the_merge_or_by_an_inner_linear_left_whole():
    """Blocks whose heads meet again before o_proj stay whole and say why: a norm op over the merged heads
    (torch's fused rms_norm), a per-channel value applied to them that no linear of their width computes, a
    linear inside the block over every head's values (Doge's dt_proj, which feeds the scores' mask); so does
    one that folds the head count into a computed size other than another size times it (batch x heads x
    tokens), which the pass does not rewrite. (XGLM's batch x heads for bmm, which it does, shrinks.)"""
    class Attn(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            torch.manual_seed(0)
            self.kind = kind
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16, bias=False) for _ in range(4))
            self.norm, self.gate = torch.nn.RMSNorm(16), torch.nn.Linear(16, 16, bias=False)
            self.dt = torch.nn.Linear(16, 4, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            mask = self.dt(v.transpose(1, 2).reshape(b, t, 16)).transpose(1, 2)[:, :, None, :] \
                if self.kind == "inner linear" else None
            if self.kind == "batch x heads":     # XGLM: (batch * heads) flattened for bmm, a computed size
                q, k, v = (z.reshape(b * 4, t, 4) for z in (q, k, v))
                y = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) / 2, -1), v).view(b, 4, t, 4)
            else:
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if self.kind == "batch x heads x tokens":
                y = (y.reshape(b * 4 * t, 4) * 2).view(b, 4, t, 4)
            y = y.transpose(1, 2).reshape(b, t, 16)
            g = self.gate(x)            # (read twice: not a gate of its own the pass could narrow)
            y = self.norm(y) if self.kind == "norm" else y * torch.sigmoid(g * g.sum(-1, keepdim=True)) \
                if self.kind == "gate" else y
            return self.o(y)
    x = torch.randn(2, 5, 16)
    why = {"norm": "over all its heads at once (aten.rms_norm", "gate": "applies sigmoid",
           "inner linear": "dt is a linear layer inside the attention",
           "batch x heads x tokens": "a count of heads folded into another size in a form the pass does not"}
    for kind, says in why.items():
        gm = ir.capture(Attn(kind), (x,), dynamic=True).gm
        res = P.Prune(sparsity=0.5, pattern="heads")(gm, P.PassContext((x,), {}))
        assert not res.modified and len(res.stats["skipped"]) == 1, (kind, res.stats)
        assert says in next(iter(res.stats["skipped"].values())), (kind, res.stats)
    # the same block with nothing between the merge and o, also with batch x heads for its bmm's: its heads go
    for kind in ("plain", "batch x heads"):
        res = P.Prune(sparsity=0.5, pattern="heads")(ir.capture(Attn(kind), (x,), dynamic=True).gm,
                                                     P.PassContext((x,), {}))
        assert res.modified and list(res.stats["shrunk"].values()) == ["4 -> 2 kv heads"], (kind, res.stats)


# --- structured: q heads within the kv groups ----------------------------------------------------------------

def _q_heads_gone(model, os_: list, heads: int, kv: int, sparsity: float, calls: list) -> list:
    """Per attention block, the q heads the stated score removes: in each kv group, the nearest(sparsity x rep)
    (at most rep - 1) heads that add the least to o_proj's output (``_head_sizes``)."""
    rep = heads // kv
    gone = min(nearest(sparsity * rep), rep - 1)
    return [sorted(g_ * rep + h for g_, row in enumerate(score.reshape(kv, rep)) for h in row.argsort()[:gone].tolist())
            for score in _head_sizes(model, os_, heads, calls)]


@pytest.mark.parametrize("heads,kv,sparsity", [(8, 2, 0.5), (9, 3, 1 / 3), (6, 1, 0.5)])
def test_query_heads_llama_equal_the_llama_built_with_fewer_heads(heads, kv, sparsity):
    """q heads removed within each kv group, as many in each (9/3: SmolLM2's layout, one of three per group;
    6/1: multi-query): k_proj and v_proj stay whole, q_proj and o_proj lose the heads, repeat_kv's broadcast
    counts the q heads left per kv head; the shrunk graph computes what transformers' Llama built with that
    many heads computes, holding the kept heads' weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=8 * heads, intermediate_size=40, num_hidden_layers=2,
               num_key_value_heads=kv, head_dim=8)
    model = LlamaForCausalLM(LlamaConfig(**cfg, num_attention_heads=heads)).eval()
    cm, kw, stats = _pruned(model, "query_heads", sparsity)
    gone = _q_heads_gone(model, [layer.self_attn.o_proj for layer in model.model.layers], heads, kv, sparsity, [kw])
    left = heads - len(gone[0])
    assert stats["shrunk"] == {f"model.layers.{i}.self_attn": f"{heads} -> {left} q heads ({kv} kv)"
                               for i in range(2)}, stats
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["model.layers.1.self_attn.q_proj"] == f"{8 * left} x {8 * heads}"
    assert rows["model.layers.1.self_attn.k_proj"] == f"{8 * kv} x {8 * heads}"
    assert rows["model.layers.1.self_attn.o_proj"] == f"{8 * heads} x {8 * left}"
    small = LlamaForCausalLM(LlamaConfig(**cfg, num_attention_heads=left)).eval()
    state = model.state_dict()
    for i, g_ in enumerate(gone):
        kept = torch.tensor([h for h in range(heads) if h not in g_])
        cols = (kept[:, None] * 8 + torch.arange(8)).reshape(-1)
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = state[f"model.layers.{i}.self_attn.q_proj.weight"][cols]
        state[f"model.layers.{i}.self_attn.o_proj.weight"] = state[f"model.layers.{i}.self_attn.o_proj.weight"][:, cols]
    small.load_state_dict(state)
    _matches_dense_llama(cm, small)


@pytest.mark.parametrize("family", ["falcon", "falcon_mqa", "phi3", "gpt_bigcode"])
def test_query_heads_from_one_fused_projection_shrink(family):
    """One projection for q, k and v: Falcon's laid out per kv group ((..., kv, rep + 2, head_dim): each group's
    block keeps its kept q heads' rows and its key's and value's, the cut of q, k and v out of a group follows),
    Falcon-7B's multi-query (..., heads + 2, head_dim) split [heads, 1, 1], Phi-3's slices [q | k | v] and
    GPT-BigCode's multi-query c_attn(x).unsqueeze(1).split([q, k, v]) (the bounds after q move with it)."""
    import copy
    import transformers as T
    torch.manual_seed(0)
    if family == "falcon":
        model, attn, qkv, o, heads, kv = T.FalconForCausalLM(T.FalconConfig(
            vocab_size=97, hidden_size=48, num_attention_heads=6, num_kv_heads=2, num_hidden_layers=2,
            new_decoder_architecture=True)), "transformer.h.{}.self_attention", "query_key_value", "dense", 6, 2
    elif family == "falcon_mqa":
        model, attn, qkv, o, heads, kv = T.FalconForCausalLM(T.FalconConfig(
            vocab_size=97, hidden_size=48, num_attention_heads=6, num_hidden_layers=2, multi_query=True)), \
            "transformer.h.{}.self_attention", "query_key_value", "dense", 6, 1
    elif family == "phi3":
        model, attn, qkv, o, heads, kv = _tiny("phi3"), "model.layers.{}.self_attn", "qkv_proj", "o_proj", 4, 2
    else:
        model, attn, qkv, o, heads, kv = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
            vocab_size=97, n_embd=32, n_head=4, n_layer=2, n_inner=56, n_positions=64, multi_query=True)), \
            "transformer.h.{}.attn", "c_attn", "c_proj", 4, 1
    model.eval()
    cm, kw, stats = _pruned(model, "query_heads", 0.5)
    left = heads - min(nearest(heads // kv / 2), heads // kv - 1) * kv       # (Falcon's 3 per group: 2 go)
    assert stats["shrunk"] == {attn.format(i): f"{heads} -> {left} q heads ({kv} kv)" for i in range(2)}, stats
    layers = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert layers[f"{attn.format(1)}.{qkv}"] == f"{8 * (left + 2 * kv)} x {8 * heads}"
    assert layers[f"{attn.format(1)}.{o}"] == f"{8 * heads} x {8 * left}"
    zeroed = copy.deepcopy(model)
    os_ = [zeroed.get_submodule(f"{attn.format(i)}.{o}") for i in range(2)]
    with torch.no_grad():
        for c, g_ in zip(os_, _q_heads_gone(zeroed, os_, heads, kv, 0.5, [kw])):
            for h in g_:
                c.weight[:, h * 8:(h + 1) * 8] = 0
    _matches_dense_llama(cm, zeroed)


@pytest.mark.parametrize("kv,key,value", [(2, -2, -1), (1, -2, -1), (2, 3, 4), (2, 0, -1), (2, -5, -1)])
def test_query_heads_of_older_falcon_cut_by_a_constant_index(kv, key, value):
    """Falcon's attention before transformers 5.25 (the GPU machines' 5.17) cuts q, k and v out of its per-group
    view ``qkv`` (..., kv, rep + 2, head_dim) as ``qkv[:, :, :, :-2]`` (slices keeping the leading axes whole)
    and ``qkv[:, :, :, [-2]]`` (an index by a constant list), keys broadcast to the q heads; with one kv head
    (..., heads + 2, head_dim). Emulated here on any transformers: q heads go within each group, the key's and
    value's entries follow their rows (an entry past the q heads, 3 of 3 + 2, moves to 1 of 1 + 2), and the
    graph equals the model with the removed heads' o columns zeroed, on torch and numpy. An entry at a q head
    (0, or -5 of 5) is a read the pass cannot follow: the block is left whole, named."""
    heads, d, b, s = 6, 4, 7, 5                  # (a batch or sequence of 2, 3 or 6 would read as a head axis)

    class OldFalcon(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = torch.nn.Linear(24, (heads + 2 * kv) * d), torch.nn.Linear(24, 24)

        def forward(self, x):
            if kv == 1:
                qkv = self.qkv(x).view(b, s, heads + 2, d)
                q, k, v = qkv[..., :-2, :], qkv[..., [key], :], qkv[..., [value], :]
            else:
                qkv = self.qkv(x).view(b, s, -1, heads // kv + 2, d)
                q, k, v = qkv[:, :, :, :-2], qkv[:, :, :, [key]], qkv[:, :, :, [value]]
                k, v = torch.broadcast_to(k, q.shape), torch.broadcast_to(v, q.shape)
                q, k, v = (t.flatten(2, 3) for t in (q, k, v))
            y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            return self.o(y.transpose(1, 2).reshape(b, s, 24))

    torch.manual_seed(0)
    model, x = OldFalcon().eval(), torch.randn(b, s, 24)
    res = P.Prune(sparsity=0.5, pattern="query_heads")(ir.capture(model, (x,)).gm, P.PassContext((x,)))
    if key in (0, -5):
        why, = res.stats["skipped"].values()
        assert not res.modified and "cuts view's groups elsewhere than between the q heads and the key" in why, why
        return
    left = heads - min(nearest(heads // kv / 2), heads // kv - 1) * kv
    assert list(res.stats["shrunk"].values()) == [f"{heads} -> {left} q heads ({kv} kv)"], res.stats
    gone, = _q_heads_gone(model, [model.o], heads, kv, 0.5, [dict(x=x)])
    with torch.no_grad():
        for h in gone:
            model.o.weight[:, h * d:(h + 1) * d] = 0
    assert _rel(res.graph_module(x), model(x)) < 1e-5
    assert _rel(lower(res.graph_module, "numpy")((x,), {}), model(x)) < 1e-5


def test_query_heads_refused_say_why():
    """Multi-head attention has one q head per kv head (whole heads go with pattern='heads'); a shape literal
    equal to the q heads per kv head that the pass does not rewrite (a grouped view of q) leaves the block
    whole under "query_heads", named, while "heads" still shrinks it; a sparsity that rounds to no head says
    so."""
    class GroupedView(torch.nn.Module):          # 6 q heads in 2 kv groups, q viewed (..., kv, 3, head_dim)
        def __init__(self):
            super().__init__()
            self.q, self.o = torch.nn.Linear(24, 24), torch.nn.Linear(24, 24)
            self.k, self.v = torch.nn.Linear(24, 8), torch.nn.Linear(24, 8)

        def forward(self, x):
            q = self.q(x).view(4, 5, 2, 3, 4).reshape(4, 5, 6, 4).transpose(1, 2)
            k, v = (p(x).view(4, 5, 2, 4).transpose(1, 2) for p in (self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(4, 5, 24))

    torch.manual_seed(0)
    model, x = GroupedView().eval(), torch.randn(4, 5, 24)
    gm = ir.capture(model, (x,)).gm
    res = P.Prune(sparsity=0.5, pattern="query_heads")(gm, P.PassContext((x,)))
    why, = res.stats["skipped"].values()
    assert not res.modified and "has an axis of 3 (as many as the q heads per kv head)" in why, why
    res = P.Prune(sparsity=0.5, pattern="heads")(ir.capture(model, (x,)).gm, P.PassContext((x,)))
    assert list(res.stats["shrunk"].values()) == ["2 -> 1 kv heads"]
    gone = _head_sizes(model, [model.o], 6, [dict(x=x)])[0].reshape(2, 3).sum(1).argmin().item()
    with torch.no_grad():
        model.o.weight[:, gone * 12:(gone + 1) * 12] = 0
    assert _rel(res.graph_module(x), model(x)) < 1e-5

    cm, _, stats = _pruned(_tiny("gpt2"), "query_heads", 0.5)
    assert stats["shrunk"] == {} and set(stats["skipped"].values()) == {
        "one q head per kv head (multi-head attention): whole heads go with pattern='heads'"}
    cm, _, stats = _pruned(_tiny("phi3"), "query_heads", 0.2)
    assert stats["shrunk"] == {} and set(stats["skipped"].values()) == {
        "sparsity 0.2 of 2 q heads per kv group rounds to none"}


class _TimmAttention(torch.nn.Module):
    """timm's ViT attention: one qkv linear viewed (B, N, 3, heads, head_dim), permuted so the 3 leads, unbound (or,
    in older timm, indexed: qkv[0], qkv[1], qkv[2])."""
    def __init__(self, heads: int, dim: int = 8, select: bool = False):
        super().__init__()
        self.heads, self.select = heads, select
        self.qkv, self.proj = torch.nn.Linear(heads * dim, 3 * heads * dim), torch.nn.Linear(heads * dim, heads * dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.select else qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("heads,select", [(4, False), (3, False), (3, True)])
def test_heads_of_a_fused_projection_permuted_into_thirds_shrink(heads, select):
    """timm's ViT attention permutes the (B, N, 3, heads, head_dim) view of its qkv so the 3 leads before it unbinds
    (or indexes) q, k and v: thirds too. With 3 heads its 3 was read as 3 kv groups and the pass raised (with 4 the
    block was left whole); each third now loses the removed heads' rows, and the block computes what it does with
    those heads' proj columns zeroed, on torch and numpy, at another shape."""
    from conftest import zero_what_the_graph_removed
    torch.manual_seed(0)
    model, x = _TimmAttention(heads, select=select).eval(), torch.randn(2, 5, 8 * heads)
    cm = slimfx.compile(model, (x,), dynamic=True, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=0.5, pattern="heads")])
    left = heads - nearest(heads / 2)
    assert list(cm.report().records[0].stats["shrunk"].values()) == [f"{heads} -> {left} kv heads"]
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert rows["qkv"] == f"{24 * left} x {8 * heads}" and rows["proj"] == f"{8 * heads} x {8 * left}", rows
    zeroed, narrowed = zero_what_the_graph_removed(model, cm.graph)
    assert narrowed == ["proj.weight"], narrowed
    x = torch.randn(3, 7, 8 * heads)
    with torch.no_grad():
        want = zeroed(x)
        assert _rel(want, model(x)) > 1e-2                                  # the heads were in use
    assert _rel(cm(x), want) < 1e-5
    assert _rel(lower(cm.graph, "numpy")((x,), {}), want) < 1e-5


class _HeadDimMajor(torch.nn.Module):
    """q, k and v viewed (B, N, head_dim, heads) and permuted to (B, heads, N, head_dim): a layout in which each head's
    rows of a projection are strided, not contiguous. ``kind``: "separate" q, k and v projections; "flat", each on
    the tokens flattened (B x N, C) and reshaped twice; "split", viewed (B, N, head_dim, 2, heads / 2) first;
    "thirds", one qkv viewed (B, N, 3, head_dim, heads)."""
    def __init__(self, heads: int, dim: int, kind: str):
        super().__init__()
        self.heads, self.dim, self.kind = heads, dim, kind
        self.q, self.k, self.v = (torch.nn.Linear(heads * dim, heads * dim) for _ in range(3))
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.o = torch.nn.Linear(heads * dim, heads * dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.kind == "thirds":
            q, k, v = self.qkv(x).reshape(B, N, 3, self.dim, self.heads).permute(2, 0, 4, 1, 3).unbind(0)
        elif self.kind == "split":        # the heads axis spelled as two in the view
            q, k, v = (p(x).view(B, N, self.dim, 2, self.heads // 2).reshape(B, N, self.dim, self.heads)
                       .permute(0, 3, 1, 2) for p in (self.q, self.k, self.v))
        elif self.kind == "flat":
            q, k, v = (p(x.reshape(B * N, C)).reshape(B * N, self.dim, self.heads).reshape(B, N, self.dim, self.heads)
                       .permute(0, 3, 1, 2) for p in (self.q, self.k, self.v))
        else:
            q, k, v = (p(x).view(B, N, self.dim, self.heads).permute(0, 3, 1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("kind", ["separate", "flat", "split", "thirds"])
@pytest.mark.parametrize("heads,dim", [(4, 8), (4, 4)])
def test_heads_of_projections_viewed_head_dim_major_stay_whole(heads, dim, kind):
    """A projection viewed (..., head_dim, heads) holds each head's rows strided: removing contiguous rows would
    cut across heads, and the block computed something else (silently). The block is left whole, with the view
    named; also with as many heads as head_dim, where the view's shape alone cannot tell: the axes are followed to
    the attention (through the permute, the unbind of q, k and v, and reshapes). A review found the flattened
    tokens, the thirds and the split view pruned wrong with heads == head_dim (the flattened ones also raising
    otherwise)."""
    torch.manual_seed(0)
    model, x = _HeadDimMajor(heads, dim, kind).eval(), torch.randn(2, 5, heads * dim)
    cm = slimfx.compile(model, (x,), dynamic=True, backend="torch", progress=False,
                        passes=[P.Prune(sparsity=0.5, pattern="heads")])
    stats = cm.report().records[0].stats
    assert stats["shrunk"] == {}, stats
    (why,) = stats["skipped"].values()
    assert ("head_dim" in why or "head dim" in why) and "view" in why, why
    assert _rel(cm(x), model(x)) < 1e-6


def test_heads_folded_with_the_batch_shrink_when_dynamic():
    """XGLM reshapes q, k and v to (batch x heads, -1, head_dim) for its bmm's. Traced with a dynamic batch that
    size is a product of the batch and a literal head count, which each pruned block computes anew with its kept
    count (the traced product is shared by the blocks); the graph computes what XGLM with the removed heads' o
    columns zeroed computes, on torch and numpy, at another batch. Traced with a static batch it is a literal (8
    for 2 x 4) the pass cannot read: the block stays whole, named (the pass had raised a shape error)."""
    import copy
    import transformers as T
    torch.manual_seed(0)
    model = T.XGLMForCausalLM(T.XGLMConfig(vocab_size=97, d_model=32, attention_heads=4, num_layers=2, ffn_dim=40,
                                           max_position_embeddings=64)).eval()
    cm, kw, stats = _pruned(model, "heads", 0.5)
    assert stats["shrunk"] == {f"model.layers.{i}.self_attn": "4 -> 2 kv heads" for i in range(2)}, stats
    zeroed = copy.deepcopy(model)
    _zero_heads(zeroed, [layer.self_attn.out_proj for layer in zeroed.model.layers], 4, 4, 8, [kw])
    assert _rel(zeroed(**kw).logits, model(**kw).logits) > 1e-3                       # the heads were in use
    _matches_dense_llama(cm, zeroed)

    cm = slimfx.compile(model, (), kw, backend="torch", progress=False, passes=[P.Prune(sparsity=0.5, pattern="heads")])
    stats = cm.report().records[0].stats
    assert stats["shrunk"] == {} and len(stats["skipped"]) == 2, stats
    assert all("folds the axis of 4 heads into one of 8" in why and "dynamic=True" in why
               for why in stats["skipped"].values()), stats
