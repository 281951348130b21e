"""Prune's head patterns on attention that repeats keys and values with ``repeat_interleave`` (repeat_kv's layout
spelled another way: kv head g serves q heads g*rep .. g*rep+rep-1) or, with one kv head, ``repeat``: the block
shrinks to what the model with the removed heads' o_proj columns zeroed computes. ``repeat`` over several kv heads
lays them out cyclically (q head h reads kv head h % kv): neither pattern can keep that, so the block is left whole
with the reason. Heads are chosen by the stated score (``_head_sizes``), computed here in plain torch."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from conftest import nearest, rel_err
from slimfx import ir, passes as P
from slimfx.backends import lower

D, HD = 32, 8        # model width, head_dim


class Attn(nn.Module):
    """Hand-written grouped-query attention; ``how``: "interleave" (repeat_interleave along the kv heads, with
    ``output_size`` given when ``sized``), "repeat" (x.repeat(1, rep, 1, 1): cyclic over several kv heads)."""

    def __init__(self, heads: int, kv: int, how: str = "interleave", sized: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.kv, self.how, self.sized = heads, kv, how, sized
        self.q, self.o = nn.Linear(D, heads * HD), nn.Linear(heads * HD, D)
        self.k, self.v = nn.Linear(D, kv * HD), nn.Linear(D, kv * HD)

    def forward(self, x):
        b, t, _ = x.shape
        rep = self.heads // self.kv
        q = self.q(x).view(b, t, self.heads, HD).transpose(1, 2)
        k, v = (p(x).view(b, t, self.kv, HD).transpose(1, 2) for p in (self.k, self.v))
        if self.how == "interleave":
            more = dict(output_size=self.heads) if self.sized else {}
            k, v = k.repeat_interleave(rep, dim=1, **more), v.repeat_interleave(rep, dim=1, **more)
        else:
            k, v = k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * HD))


def _head_sizes(m: Attn, x) -> torch.Tensor:
    """(heads,) E_t ||W_o[:, h] y_t,h||: the size of what each q head adds to the output, over x's tokens."""
    seen = []
    hook = m.o.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        m(x)
    hook.remove()
    y = seen[0].reshape(-1, m.heads, HD).double()                      # (tokens, heads, head_dim)
    w = m.o.weight.detach().double().T.reshape(m.heads, HD, -1)        # (heads, head_dim, out)
    return torch.einsum("thd,hdo->tho", y, w).norm(dim=2).mean(0)


def _zeroed(m: Attn, x, pattern: str, sparsity: float) -> tuple[Attn, int]:
    """A copy of m with the o_proj columns of the heads the pattern removes set to zero, and the q heads left:
    "query_heads": in each kv group its nearest(sparsity x rep) (at most rep - 1) smallest heads; "heads": the
    nearest(sparsity x kv) (at most kv - 1) kv groups whose heads add up smallest, with all their q heads."""
    rep, score = m.heads // m.kv, _head_sizes(m, x).reshape(m.kv, -1)
    if pattern == "query_heads":
        n = min(nearest(sparsity * rep), rep - 1)
        gone = [g * rep + h for g in range(m.kv) for h in score[g].argsort()[:n].tolist()]
    else:
        n = min(nearest(sparsity * m.kv), m.kv - 1)
        gone = [g * rep + h for g in score.sum(1).argsort()[:n].tolist() for h in range(rep)]
    z = copy.deepcopy(m)
    with torch.no_grad():
        for h in gone:
            z.o.weight[:, h * HD:(h + 1) * HD] = 0
    return z, m.heads - len(gone)


@pytest.mark.parametrize("heads,kv,how,sized,pattern", [
    (4, 2, "interleave", False, "query_heads"),        # the reported crash: an internal shape error
    (8, 2, "interleave", True, "query_heads"),         # output_size spells the q heads: it follows them
    (4, 1, "interleave", False, "query_heads"),        # multi-query
    (4, 1, "repeat", False, "query_heads"),            # one kv head: repeat is repeat_kv's layout too
    (8, 4, "interleave", True, "heads"),               # (without output_size "heads" shrank it before too)
])
def test_repeated_kv_shrinks_to_the_model_with_the_heads_zeroed(heads, kv, how, sized, pattern):
    m, x = Attn(heads, kv, how, sized).eval(), torch.randn(3, 9, D)
    cm = slimfx.compile(m, (x,), passes=[P.Prune(sparsity=0.5, pattern=pattern)], backend="torch", progress=False,
                        dynamic=True)
    ref, left = _zeroed(m, x, pattern, 0.5)
    stats = cm.report().records[0].stats
    kept_kv = kv if pattern == "query_heads" else kv - min(nearest(0.5 * kv), kv - 1)
    assert list(stats["shrunk"].values()) == ([f"{heads} -> {left} q heads ({kv} kv)"] if pattern == "query_heads"
                                              else [f"{kv} -> {kept_kv} kv heads"]), stats
    rows = {r["module"]: r["out x in"] for r in cm.report().layers()}
    assert (rows["q"], rows["k"], rows["o"]) == (f"{left * HD} x {D}", f"{kept_kv * HD} x {D}", f"{D} x {left * HD}")
    x2 = torch.randn(2, 5, D)            # another shape: the shrunk graph stays dynamic
    with torch.no_grad():
        want = ref(x2)
    # float32, the same products summed over fewer (zero) terms in o_proj: rounding only
    assert rel_err(cm(x2), want) < 1e-5
    assert rel_err(torch.as_tensor(lower(cm.graph, "numpy")((x2,), {})), want) < 1e-5


@pytest.mark.parametrize("pattern", ["heads", "query_heads"])
def test_repeat_over_several_kv_heads_is_left_whole_and_says_why(pattern):
    """x.repeat(1, rep, 1, 1) with 2 kv heads: q head h reads kv head h % 2, not h // rep. Removing a kv group
    with the q heads repeat_kv would give it computed something else (before: silently, under "heads")."""
    m, x = Attn(4, 2, "repeat").eval(), torch.randn(3, 9, D)
    res = P.Prune(sparsity=0.5, pattern=pattern)(ir.capture(m, (x,)).gm, P.PassContext((x,)))
    assert not res.modified and res.stats["shrunk"] == {}
    why, = res.stats["skipped"].values()
    assert why.startswith("repeat (aten.repeat.default) repeats keys or values otherwise than repeat_kv"), why
