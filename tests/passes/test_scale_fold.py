"""passes.scale_fold on norms written as Gemma writes them: ``normalized(x.float()) * (1 + w.float())``, cast
back to the input's dtype, then the linears (every family's case: tests/test_architectures.py)."""
import torch
import torch.nn as nn

import slimfx
from slimfx.passes import sqnr_db
from slimfx.passes.scale_fold import scale_input

aten = torch.ops.aten


class GemmaBlock(nn.Module):
    def __init__(self, dim=24, out=40, dtype=torch.bfloat16):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(dim, dtype=dtype))      # Gemma stores w; multiplies by 1 + w
        self.q, self.k = nn.Linear(dim, out, dtype=dtype), nn.Linear(dim, out // 2, dtype=dtype)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (h * (1.0 + self.weight.float())).type_as(x)
        return self.q(h), self.k(h)


def test_gemma_norm_takes_the_scale_through_its_cast():
    torch.manual_seed(0)
    model = GemmaBlock().eval()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    cm = slimfx.compile(model, (x,), backend="torch", progress=False)
    gm = cm.graph
    lins = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    s = torch.exp(torch.randn(24))                                # ~20x range, as AWQ's scales can be
    how, where, _ = scale_input(gm, lins[0].args[0], lins, s, True, "test")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert how == "norm"                                          # no x * (1 / s) node at run time
    adds = [n for n in gm.graph.nodes if n.target is aten.add.Tensor]
    assert len(adds) == 1 and adds[0].args[1] == 1e-6             # the eps's; (1 + w) / s is one fp32 tensor
    folded = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "plus_1_scaled" in n.target]
    assert len(folded) == 1 and folded[0].dtype == torch.float32
    torch.testing.assert_close(folded[0], (1 + model.weight.float()) / s)
    with torch.no_grad():
        ref = model(x)
        got = cm.with_backend("torch")(x)
    # bf16 weights W * s round anew (8 bits of mantissa: ~0.4% per element): ~50 dB measured; a scale applied
    # twice or not at all costs far more (s spans ~20x)
    assert all(sqnr_db(r.float(), g.float()) > 35 for r, g in zip(ref, got))


def test_bf16_model_stays_bf16_when_the_scale_needs_a_mul():
    """x read by linears straight from the input: ``x * (1 / s)`` is inserted; in a bf16 model the new scales
    and weights are bf16 too (fp32 ones would make x fp32 and the linears refuse bf16 weights)."""
    torch.manual_seed(0)
    model = nn.Linear(24, 40, dtype=torch.bfloat16).eval()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    cm = slimfx.compile(model, (x,), backend="torch", progress=False)
    gm = cm.graph
    lins = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    how, _, _ = scale_input(gm, lins[0].args[0], lins, torch.exp(torch.randn(24)), True, "test")
    gm.recompile()
    assert how == "mul"
    assert all(t.dtype == torch.bfloat16 for t in gm.state_dict().values())
    with torch.no_grad():
        ref, got = model(x), cm.with_backend("torch")(x)
    assert got.dtype == torch.bfloat16
    assert sqnr_db(ref.float(), got.float()) > 35               # bf16 rounding of x / s and W * s only (~50 dB)
