"""nn.MultiheadAttention's linear layers each get a name of their own at capture: it runs both its projections
itself (F.linear on in_proj_weight and on out_proj.weight), so export named both after the module ("mha") and
include/exclude, the layer table and sensitivity could not tell them apart. Now "mha.in_proj" (the packed
in_proj_weight), "mha.out_proj" (as named_modules() has it); cross-attention's q and kv projections, cut out of
in_proj_weight, are layers of their own ("mha.in_proj.q", "mha.in_proj.kv") and are quantized like any other."""
import pytest
import torch
import torch.nn as nn

import slimfx
from conftest import rel_err
from slimfx import ir
from slimfx.passes import Quantize, format_sensitivity, sensitivity, sqnr_db

aten = torch.ops.aten


class Block(nn.Module):
    """nn.MultiheadAttention as self-attention (query is key is value) or as cross-attention over ``mem``;
    ``kdim``: keys and values of another width (separate q_proj_weight, k_proj_weight, v_proj_weight)."""

    def __init__(self, kdim=None):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.out = nn.Linear(32, 8)

    def forward(self, x, mem=None, mem_v=None):
        k = x if mem is None else mem
        return self.out(self.mha(x, k, k if mem_v is None else mem_v, need_weights=False)[0])


def _linears(gm) -> dict:
    """layer name -> the linear's weight shape, for every aten.linear of the graph."""
    return {ir.meta.layer_name(n): tuple(ir.meta.tensor_attr(gm, n.args[1]).shape) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is aten.linear.default}


def _stats(m, args, p):
    return slimfx.compile(m, args, passes=[p], backend="torch", progress=False).report().records[0].stats


X, MEM = torch.randn(2, 7, 32), torch.randn(2, 5, 32)


@pytest.mark.parametrize("kdim,args,names", [
    (None, (X,), {"mha.in_proj": (96, 32), "mha.out_proj": (32, 32), "out": (8, 32)}),
    (None, (X, MEM), {"mha.in_proj.q": (32, 32), "mha.in_proj.kv": (64, 32), "mha.out_proj": (32, 32),
                      "out": (8, 32)}),
    (None, (X, MEM, MEM + 1), {"mha.in_proj.q": (32, 32), "mha.in_proj.k": (32, 32), "mha.in_proj.v": (32, 32),
                               "mha.out_proj": (32, 32), "out": (8, 32)}),
    (16, (X, MEM[..., :16], MEM[..., 16:]), {"mha.q_proj": (32, 32), "mha.k_proj": (32, 16),
                                             "mha.v_proj": (32, 16), "mha.out_proj": (32, 32), "out": (8, 32)}),
], ids=["self", "cross", "cross-k-not-v", "kdim"])
def test_each_projection_has_a_name_of_its_own(kdim, args, names):
    """Names after the parameters, every linear reading its weight from a tensor of its own, the same function."""
    m = Block(kdim).eval()
    cap = ir.capture(m, args)
    assert _linears(cap.gm) == names
    with torch.no_grad():
        # the parts are contiguous copies of the rows they were cut from: the same products, at most rounding
        assert rel_err(cap.gm(*args), m(*args)) < 1e-6


def test_include_and_exclude_tell_in_proj_and_out_proj_apart():
    m = Block().eval()
    one = _stats(m, (X,), Quantize(include="mha.out_proj"))
    assert one["layers"] == 1 and one["weight_bytes_fp32"] == 32 * 32 * 4 and one["skipped"] == {}
    cm = slimfx.compile(m, (X,), passes=[Quantize(exclude="mha.out_proj")], backend="torch", progress=False)
    assert {r["module"]: r["dtype"] for r in cm.report().layers()} == {
        "mha.in_proj": "int8", "mha.out_proj": "float32", "out": "int8"}
    assert _stats(m, (X,), Quantize(include="mha.*"))["layers"] == 2


def test_sensitivity_has_one_row_per_projection():
    rows = sensitivity(Block().eval(), (X,), None, Quantize(activations="dynamic"), progress=False)
    assert sorted(r["module"] for r in rows) == ["mha.in_proj", "mha.out_proj", "out"]
    assert len({r["sqnr_db"] for r in rows}) == 3          # each row quantizes its own layer alone
    assert "mha.out_proj" in format_sensitivity(rows)


def test_cross_attention_parts_are_quantized():
    """Before, both parts stayed float, under one entry 'weight is not a tensor of the module (already
    quantized?)', and were missing from the layer table."""
    m = Block().eval()
    cm = slimfx.compile(m, (X, MEM), passes=[Quantize(activations="dynamic")], backend="torch", progress=False)
    stats = cm.report().records[0].stats
    assert stats["layers"] == 4 and stats["skipped"] == {}
    assert {r["module"]: r["op"] for r in cm.report().layers()} == {
        n: "slimfx.quantized_linear" for n in ("mha.in_proj.q", "mha.in_proj.kv", "mha.out_proj", "out")}
    assert not any(n.target is aten.linear.default for n in cm.graph.graph.nodes)
    with torch.no_grad():
        ref = m(X, MEM)
    # int8 weights per channel and int8 activations per token, four layers deep: ~40 dB measured; 30 is the floor
    # the tiny-Llama tests hold one int8 layer to
    assert sqnr_db(ref, cm(X, MEM)) > 30


def test_an_include_naming_the_module_but_none_of_its_layers_says_so():
    """Patterns select a layer by its own name: "mha" (the attention module) selects none, and the statistics say
    which layers are under it; a pattern that matches nothing at all is still named as before."""
    st = _stats(Block().eval(), (X,), Quantize(include="mha"))
    assert st["layers"] == 0
    assert st["skipped"]["include"] == ("['mha'] match modules but none of their layers (a pattern selects a layer "
                                        "by its own name): the layers under them are ['mha.in_proj', "
                                        "'mha.out_proj']; 'mha.*' selects them")
    st = _stats(Block().eval(), (X,), Quantize(include="nope"))
    assert "['nope'] matches no module of the graph" in st["skipped"]["include"]

