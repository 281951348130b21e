"""Fusion passes: each rewrite on tiny models and on MiniLM / a tiny Llama; the fused graph on the numpy
backend against the unfused graph on the numpy backend.

Tolerances: fused_linear and norm_quantize_per_token run, in the numpy backend, the very numpy functions
of the ops they replace in the same order, so those comparisons are exact (atol=0). Merging siblings turns
several GEMMs into one wider GEMM: each output is the same K-long dot product, but BLAS may block the
wider N differently and so sum in another order; that is bounded by K * eps32 * (|x| @ |w|.T) per element.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimfx import ir, passes as P
from slimfx.backends import lower

from conftest import text_batch

sf = torch.ops.slimfx
EPS32 = float(np.finfo(np.float32).eps)


def run_np(gm, args=(), kwargs=None):
    return lower(gm, "numpy")(tuple(args), dict(kwargs or {}))


def counts(gm):
    return ir.op_counts(gm)


class Acts(torch.nn.Module):
    """Odd sizes; every activation the rules know, with and without bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(13, 29), torch.nn.Linear(29, 31, bias=False)
        self.c, self.d = torch.nn.Linear(31, 7), torch.nn.Linear(7, 11)

    def forward(self, x):
        h = F.gelu(self.a(x))
        h = F.gelu(self.b(h), approximate="tanh")
        h = torch.relu(self.c(h))
        return F.silu(self.d(h)), torch.sigmoid(self.d(h))   # sigmoid: no rule, stays a linear


def _fused_acts(gm):
    return sorted(n.args[3] for n in gm.graph.nodes if n.target is sf.fused_linear.default)


def test_linear_act_exact():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 13)
    gm = ir.capture(Acts().eval(), (x,)).gm
    ref = run_np(gm, (x,))
    before = counts(gm)
    res = P.FuseLinearAct()(gm)
    after = counts(res.graph_module)
    assert res.modified and res.stats["fused"] == 4
    assert before["aten.linear.default"] == 5 and after["aten.linear.default"] == 1
    assert "aten.gelu.default" not in after and "aten.relu.default" not in after and "aten.silu.default" not in after
    assert _fused_acts(res.graph_module) == ["gelu", "gelu_tanh", "relu", "silu"]
    out = run_np(res.graph_module, (x,))
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, atol=0, rtol=0)     # same numpy functions, same order
    assert not P.FuseLinearAct()(res.graph_module).modified  # nothing left to fuse


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(9, 9), torch.nn.Linear(9, 9, bias=False)
        self.c = torch.nn.Linear(9, 9)
        self.v = torch.nn.Parameter(torch.randn(9))

    def forward(self, x):
        h = x + self.a(x)                     # r + linear
        h = self.b(h) + h                     # linear (no bias) + r
        h = F.gelu(self.c(h)) + h             # act, then residual
        return self.a(h) + self.v             # broadcast (9,) "residual": not fused


def test_residual_exact():
    torch.manual_seed(1)
    x = torch.randn(3, 9)
    gm = ir.capture(Residual().eval(), (x,)).gm
    ref = run_np(gm, (x,))
    gm = P.FuseLinearAct()(gm).graph_module
    res = P.FuseResidual()(gm)
    assert res.stats["fused"] == 3
    fused = [n for n in res.graph_module.graph.nodes if n.target is sf.fused_linear.default]
    assert sorted((n.args[3], n.args[4] is not None) for n in fused) == [("gelu", True), ("none", True), ("none", True)]
    c = counts(res.graph_module)
    assert c["aten.linear.default"] == 1 and c["aten.add.Tensor"] == 1      # the broadcast add stays
    torch.testing.assert_close(run_np(res.graph_module, (x,)), ref, atol=0, rtol=0)


def test_fused_ops_name_bad_arguments():
    with pytest.raises(ValueError, match="slimfx::fused_linear: activation must be one of"):
        sf.fused_linear(torch.randn(2, 3), torch.randn(4, 3), None, "tanh", None)
    with pytest.raises(ValueError, match="norm_quantize_per_token: bias: rmsnorm has no bias"):
        sf.norm_quantize_per_token(torch.randn(2, 3), torch.ones(3), torch.ones(3), 1e-6, "rmsnorm")


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(19, 19), torch.nn.Linear(19, 7), torch.nn.Linear(19, 7)
        self.o = torch.nn.Linear(19, 5)           # reads another input: not a sibling
        self.z = torch.nn.Linear(19, 3, bias=False)   # no bias: its own group

    def forward(self, x, y):
        return self.q(x), self.k(x) * 2, self.v(x), self.o(y), self.z(x)


def _bound(x, w):
    """K * eps32 * (|x| @ |w|.T): how far two fp32 summation orders of x @ w.T can be apart."""
    return w.shape[1] * EPS32 * (x.abs().double() @ w.abs().double().T)


def test_merge_siblings_float():
    torch.manual_seed(2)
    m = Attn().eval()
    x, y = torch.randn(2, 3, 19), torch.randn(2, 3, 19)
    gm = ir.capture(m, (x, y)).gm
    ref = run_np(gm, (x, y))
    res = P.MergeSiblings()(gm)
    assert res.stats == {"groups": 1, "merged": 3}
    c = counts(res.graph_module)
    assert c["aten.linear.default"] == 3 and c["aten.slice.Tensor"] == 3
    out = run_np(res.graph_module, (x, y))
    for a, b, lin in zip(ref, out, (m.q, m.k, m.v, m.o, m.z)):
        assert a.shape == b.shape
        bound = _bound(x.reshape(-1, 19), lin.weight.detach()).reshape(a.shape) * (2 if lin is m.k else 1)
        assert ((a.double() - b.double()).abs() <= bound).all()


def test_merge_quantized_siblings_exact():
    torch.manual_seed(3)
    m = Attn().eval()
    x, y = torch.randn(1, 4, 19), torch.randn(1, 4, 19)
    gm = ir.capture(m, (x, y)).gm
    gm = P.Quantize(weights="int8", activations="dynamic")(gm, P.PassContext((x, y))).graph_module
    ref = run_np(gm, (x, y))
    res = P.MergeSiblings()(gm)
    assert res.stats == {"groups": 1, "merged": 3}
    assert counts(res.graph_module)["slimfx.quantized_linear.default"] == 3
    for a, b in zip(ref, run_np(res.graph_module, (x, y))):
        torch.testing.assert_close(b, a, atol=0, rtol=0)  # one per-token quantization of x, same int32 sums


class LNQuant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(21)
        self.a, self.b = torch.nn.Linear(21, 6), torch.nn.Linear(21, 10)
        self.ln2 = torch.nn.LayerNorm(6)

    def forward(self, x):
        h = self.ln(x)
        a = self.a(h)
        return a + self.b(h)[..., :6], self.ln2(a) + a        # ln2 also feeds an add: not fused


def test_norm_quant_layernorm_exact():
    torch.manual_seed(4)
    m = LNQuant().eval()
    with torch.no_grad():
        m.ln.weight.uniform_(0.5, 1.5)
        m.ln.bias.normal_()
    x = torch.randn(3, 21) * 3
    gm = ir.capture(m, (x,)).gm
    gm = P.Quantize(weights="int8", activations="dynamic")(gm, P.PassContext((x,))).graph_module
    ref = run_np(gm, (x,))
    res = P.FuseNormQuant()(gm)
    assert res.stats["fused"] == 1 and len(res.stats["skipped"]) == 1
    c = counts(res.graph_module)
    assert c["slimfx.norm_quantize_per_token.default"] == 1 and c["aten.layer_norm.default"] == 1
    qls = [n for n in res.graph_module.graph.nodes if n.target is sf.quantized_linear.default]
    assert sum(len(n.args) == 5 and n.args[4] is not None for n in qls) == 2
    for a, b in zip(ref, run_np(res.graph_module, (x,))):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_llama_quantized_fuse_exact(tiny_llama):
    ids, mask = text_batch(2, 7, 97)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    gm = ir.capture(tiny_llama, (), kw, dynamic=True).gm
    gm = P.Quantize(weights="int8", activations="dynamic")(gm, P.PassContext((), kw)).graph_module
    ref = run_np(gm, (), kw).logits
    before = counts(gm)
    before_bytes = sum(ir.meta.info(n).quant["weight_bytes"] for n in gm.graph.nodes
                       if n.meta.get("slimfx") and (ir.meta.info(n).quant or {}).get("mode"))
    res = P.Fuse()(gm)
    gm = res.graph_module
    after = counts(gm)
    # per layer: q/k/v merged, gate/up merged; input and post-attention RMSNorms fused with quantization
    assert res.stats["merge_qkv"] == {"groups": 4, "merged": 10}
    assert res.stats["fuse_norm_quant"]["fused"] == 4
    assert before["slimfx.quantized_linear.default"] == 15 and after["slimfx.quantized_linear.default"] == 9
    assert after["aten.rsqrt.default"] == 1             # the final norm feeds a slice before lm_head
    # merged layers keep their quantization records, as one: every quantized weight byte is still counted
    recs = [ir.meta.info(n).quant for n in gm.graph.nodes if n.meta.get("slimfx") and ir.meta.info(n).quant]
    assert len(recs) == 9 and sum(len(r.get("merged_from", [r["module"]])) for r in recs) == 15
    assert sum(r["weight_bytes"] for r in recs) == before_bytes
    ir.verify(gm)
    torch.testing.assert_close(run_np(gm, (), kw).logits, ref, atol=0, rtol=0)   # integer path, same order
    ids2, mask2 = text_batch(1, 5, 97, seed=3)           # dynamic shapes survive the rewrites
    assert run_np(gm, (), dict(input_ids=ids2, attention_mask=mask2, use_cache=False)).logits.shape == (1, 5, 97)


def test_llama_float_fuse(tiny_llama):
    ids, mask = text_batch(2, 6, 97, seed=1)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    gm = ir.capture(tiny_llama, (), kw, dynamic=True).gm
    ref = run_np(gm, (), kw).logits
    res = P.Fuse()(gm)
    assert res.stats["merge_qkv"] == {"groups": 4, "merged": 10}
    # o_proj and down_proj add into the residual stream
    assert res.stats["fuse_residual"]["fused"] == 4
    c = counts(res.graph_module)
    assert c["slimfx.fused_linear.default"] == 4 and c["aten.linear.default"] == 4 + 1   # merged + lm_head
    got = run_np(res.graph_module, (), kw).logits
    # merged GEMMs may sum in another order (module docstring); through 2 layers that stays within 1e-5
    # of the logits' scale (measured 0 here: OpenBLAS keeps the K order), far below quantization effects
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_minilm_fuse(minilm):
    ids, mask = text_batch(1, 6, minilm.config.vocab_size)
    kw = dict(input_ids=ids, attention_mask=mask)
    gm = ir.capture(minilm, (), kw).gm
    ref = run_np(gm, (), kw).last_hidden_state
    res = P.Fuse()(gm)
    s = res.stats
    assert s["merge_qkv"] == {"groups": 6, "merged": 18}
    assert s["fuse_linear_act"]["fused"] == 6                       # intermediate dense -> gelu
    assert s["fuse_residual"]["fused"] == 12                        # attention output and output dense
    assert s["fuse_norm_quant"]["fused"] == 0                       # float model: nothing quantized
    got = run_np(res.graph_module, (), kw).last_hidden_state
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5    # see test_llama_float_fuse


def test_fold_qdq_then_fuse_matches_folded_quantize():
    torch.manual_seed(5)
    m = Attn().eval()
    x, y = torch.randn(2, 19), torch.randn(2, 19)
    qdq = P.Quantize(weights="int8", activations="dynamic", lower=False)(ir.capture(m, (x, y)).gm,
                                                                         P.PassContext((x, y))).graph_module
    assert "slimfx.quantized_linear.default" not in counts(qdq)
    folded = P.Quantize(weights="int8", activations="dynamic")(ir.capture(m, (x, y)).gm,
                                                             P.PassContext((x, y))).graph_module
    res = P.Fuse()(qdq)
    assert res.stats["fold_qdq"]["folded"] == 5 and res.stats["merge_qkv"]["merged"] == 3
    for a, b in zip(run_np(folded, (x, y)), run_np(res.graph_module, (x, y))):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
