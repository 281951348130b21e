"""transformers < 5.2x's grouped-GEMM experts zero the rows routed to a "sentinel" expert (an id >= the expert
count, which only expert parallelism makes) on every call; with ids from a topk over the E experts the mask is
all False, and the fills hid the experts' pattern from the MoE passes (with transformers 5.17, MoE pruning, AWQ
and distillation skipped every block). Capture drops such fills and clamps, and only those."""
import torch
import torch.nn as nn

from slimfx import ir

aten = torch.ops.aten


class _Routed(nn.Module):
    def __init__(self, limit: int):
        super().__init__()
        self.router, self.limit = nn.Linear(8, 4), limit          # 4 experts

    def forward(self, x):
        logits = self.router(x)
        _, ids = torch.topk(logits, 2, dim=-1)
        ids_sorted, _ = torch.sort(ids.reshape(-1))
        picked = logits.gather(-1, ids.clamp(max=3))
        picked = picked[..., None].masked_fill((ids >= self.limit)[..., None], 0.0)      # as transformers writes it
        return picked, ids_sorted.masked_fill(ids_sorted >= self.limit, 0)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_sentinel_fills_and_clamps_of_topk_ids_are_dropped():
    torch.manual_seed(0)
    m, x = _Routed(4).eval(), torch.randn(5, 8)
    gm = ir.capture(m, (x,), {}).gm
    assert aten.masked_fill.Scalar not in _targets(gm) and aten.clamp.default not in _targets(gm), gm.code
    for got, want in zip(gm(x), m(x)):
        assert torch.equal(got, want)


def test_a_mask_below_the_expert_count_is_kept():
    torch.manual_seed(0)
    m, x = _Routed(3).eval(), torch.randn(5, 8)        # ids >= 3 happen: a real mask
    gm = ir.capture(m, (x,), {}).gm
    assert _targets(gm).count(aten.masked_fill.Scalar) == 2, gm.code
    for got, want in zip(gm(x), m(x)):
        assert torch.equal(got, want)


class _OverSequence(nn.Module):
    def forward(self, x):                       # ids index a dynamic sequence: 6 is the example's length, no count
        _, ids = torch.topk(x.sum(-1), 2, dim=-1)
        return ids.masked_fill(ids >= 6, 0)


def test_ids_over_a_dynamic_dim_keep_their_mask_and_the_dim():
    """Comparing a symbolic size with the mask's constant guarded it, fixing the sequence at the example's 6."""
    m = _OverSequence().eval()
    cap = ir.capture(m, (torch.randn(2, 6, 8),), {}, dynamic=True)
    assert aten.masked_fill.Scalar in _targets(cap.gm)
    x = [n for n in cap.gm.graph.nodes if n.op == "placeholder"][0]
    assert not isinstance(x.meta["val"].shape[1], int) and "6" != str(x.meta["val"].shape[1])
