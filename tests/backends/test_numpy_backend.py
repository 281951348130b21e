import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx.backends.numpy_backend import UnsupportedOpError


class Sorts(nn.Module):
    def forward(self, x):
        return torch.sort(x).values + 1


def test_missing_op_names_the_op_and_the_node():
    with pytest.raises(UnsupportedOpError, match=r"aten\.sort\.\w+ \(node sort"):
        slimfx.compile(Sorts(), (torch.randn(4, 5),), backend="numpy", progress=False)
    # the torch backend runs it
    cm = slimfx.compile(Sorts(), (torch.randn(4, 5),), backend="torch", progress=False)
    x = torch.randn(4, 5)
    assert torch.equal(cm(x), torch.sort(x).values + 1)


class Ops(nn.Module):
    """A grab bag of ops the numpy table implements, on odd shapes, with torch's type promotion."""
    def forward(self, x, idx, mask):
        a = F.softmax(x, dim=-1).masked_fill(mask, 0.0)
        b = torch.gather(x, 1, idx) * 0.5
        c, d = torch.split(x, [2, 5], dim=1)
        e = torch.cat([c, d.cumsum(1)], 1)
        f = x[idx[:, 1] % 3].permute(1, 0).contiguous().reshape(-1)[:7]
        g = (idx * 0.5).sum(dim=1, keepdim=True)       # int64 * float -> float32, as torch promotes
        h = torch.where(x > 0, F.silu(x), torch.rsqrt(x.abs() + 1))
        return a, b, e, f, g, h, torch.tril(x[:, :3])


def test_ops_match_torch_on_odd_shapes():
    x = torch.randn(3, 7)
    idx = torch.tensor([[0, 6], [2, 2], [5, 1]])
    mask = torch.rand(3, 7) > 0.5
    cm = slimfx.compile(Ops(), (x, idx, mask), backend="numpy", progress=False)
    for got, want in zip(cm(x, idx, mask), Ops()(x, idx, mask)):
        assert got.dtype == want.dtype and got.shape == want.shape
        # fp32 elementwise math in numpy vs torch: a few ulp (exp, rsqrt, softmax's division)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_call_time_input_errors(minilm):
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    cm = slimfx.compile(minilm, (), dict(input_ids=ids, attention_mask=mask), dynamic=True, progress=False)
    with pytest.raises(slimfx.InputError, match="'input_ids' has dtype torch.float32, expected torch.int64"):
        cm(ids.float(), mask)
    with pytest.raises(slimfx.InputError, match="'attention_mask' dim 1 is 5, but 'input_ids' dim 1 is 12"):
        cm(ids, mask[:, :5])
    with pytest.raises(slimfx.InputError, match=r"missing input\(s\) \['attention_mask'\]"):
        cm(ids)
    with pytest.raises(slimfx.InputError, match=r"input\(s\) \['token_type_ids'\] were not given at compile"):
        cm(ids, mask, token_type_ids=torch.zeros_like(ids))
    # export keeps the sequence >= 2 (BERT's mask code branches on a length of 1)
    with pytest.raises(slimfx.InputError, match=r"'input_ids' dim 1 is 1, outside the compiled range \[2, inf\]"):
        cm(ids[:, :1], mask[:, :1])
    # past BERT's 512 positions the graph itself cannot run: the failing node is named, with its error
    long = torch.zeros(1, 600, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"numpy backend: node expand\w* \(aten.expand.default\) failed"):
        cm(long, torch.ones_like(long))
    with pytest.raises(slimfx.InputError, match="has 1 dims"):
        cm(ids[0], mask)
    static = slimfx.compile(minilm, (), dict(input_ids=ids, attention_mask=mask), progress=False)
    with pytest.raises(slimfx.InputError, match="compiled static at 12"):
        static(ids[:, :8], mask[:, :8])


def test_gelu_erf_is_within_its_absolute_bound():
    import numpy as np
    from scipy import special

    from slimfx.backends.numpy_ops import erf_abs_f32
    x = np.concatenate([np.linspace(-6, 6, 100001, dtype=np.float32), np.float32([0.0, -0.0, 1e-30, 40.0, -40.0])])
    ref = special.erf(x.astype(np.float64))
    # Abramowitz & Stegun 7.1.26 is within 1.5e-7 of erf; fp32 evaluation adds a few ulp of 1.0 (6e-8 each)
    assert np.abs(erf_abs_f32(x) - ref).max() < 1e-6


def test_gelu_numpy_matches_torch_both_forms():
    from slimfx.backends.numpy_ops import gelu
    x = torch.randn(1003) * 4
    for approx in ("none", "tanh"):
        got = torch.from_numpy(gelu(x.numpy().copy(), approximate=approx))
        # fp32 GELU: the erf approximation (1e-6 abs) and ulp-level differences in tanh/exp
        assert torch.allclose(got, F.gelu(x, approximate=approx), rtol=1e-5, atol=2e-6), approx
