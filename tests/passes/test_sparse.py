"""LowerSparse and the slimfx.sparse_linear op: which layers are lowered to which pattern, and that nothing
changes numerically: sparse_linear runs fused_linear's math over the dense weight (the same numpy
functions in the numpy backend, the same torch ops in torch), so every comparison here is exact (atol=0).
Odd sizes throughout (K = 40, 130; N = 70, 130), so blocks are ragged at the edges.
"""
import pytest
import torch
import torch.nn.functional as F

from slimfx import ir, passes as P
from slimfx.backends import lower
from slimfx.ir.dialect.sparse import block_sparsity, parse_pattern, pattern_violation

sf = torch.ops.slimfx


def run_np(gm, *args):
    return lower(gm, "numpy")(args, {})


def make_24(w: torch.Tensor, seed=0) -> None:
    """Zero 2 of every 4 consecutive weights along K, at random positions (in place)."""
    n, k = w.shape
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    w.view(n, k // 4, 4).scatter_(-1, idx, 0.0)


class Net(torch.nn.Module):
    """a: 2:4; b: 10 of its 15 32x32 blocks zero (not 2:4); c: dense."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(40, 130), torch.nn.Linear(130, 70), torch.nn.Linear(70, 9)
        with torch.no_grad():
            make_24(self.a.weight)
            self.b.weight[:, :64] = 0
            self.b.weight[32:, 64:128] = 0

    def forward(self, x):
        return self.c(torch.relu(self.b(F.gelu(self.a(x))))) + x[..., :9]


def captured(m=None, x=None):
    x = torch.randn(3, 5, 40) if x is None else x
    return ir.capture(m or Net().eval(), (x,)).gm, x


def sparse_nodes(gm):
    return {ir.meta.module_name(n): n.args[5] for n in gm.graph.nodes if n.target is sf.sparse_linear.default}


def test_patterns_found_and_outputs_unchanged():
    gm, x = captured()
    ref, ref_torch = run_np(gm, x), lower(gm, "torch")((x,), {})
    res = P.LowerSparse(block=(32, 32))(gm)
    assert res.modified and res.stats["layers"] == 2
    assert sparse_nodes(gm) == {"a": "2:4", "b": "block:32x32"}
    assert ir.op_counts(gm)["aten.linear.default"] == 1
    assert res.stats["skipped"] == {"c": "0% zero 32x32 blocks < 50%; K = 70 is not a multiple of 4"}
    assert torch.equal(run_np(gm, x), ref)
    assert torch.equal(lower(gm, "torch")((x,), {}), ref_torch)


def test_one_pattern_only_and_thresholds():
    gm, _ = captured()
    P.LowerSparse(pattern="2:4", block=(32, 32))(gm)
    assert sparse_nodes(gm) == {"a": "2:4"}
    gm, _ = captured()
    res = P.LowerSparse(pattern="block", block=(32, 32))(gm)
    assert sparse_nodes(gm) == {"b": "block:32x32"}
    assert "zero 32x32 blocks < 50%" in res.stats["skipped"]["a"]          # 2:4 leaves no block empty
    gm, _ = captured()
    res = P.LowerSparse(pattern="block", block=(32, 32), min_block_sparsity=0.9)(gm)
    assert not res.modified and res.stats["skipped"]["b"] == "67% zero 32x32 blocks < 90%"
    gm, _ = captured()
    P.LowerSparse(block=(32, 32), exclude=("a",))(gm)
    assert sparse_nodes(gm) == {"b": "block:32x32"}


def test_after_fuse_the_epilogue_is_carried_over():
    gm, x = captured()
    P.Fuse()(gm)
    fused = run_np(gm, x)
    P.LowerSparse(block=(32, 32))(gm)
    acts = {ir.meta.module_name(n): n.args[3] for n in gm.graph.nodes if n.target is sf.sparse_linear.default}
    assert acts == {"a": "gelu", "b": "relu"}
    assert ir.op_counts(gm)["slimfx.fused_linear.default"] == 1           # c (dense) + the residual
    assert torch.equal(run_np(gm, x), fused)


def test_block_sparsity_counts_ragged_blocks_like_bsr():
    pytest.importorskip("triton")
    from slimfx.kernels.block_sparse import to_bsr
    g = torch.Generator().manual_seed(1)
    for (n, k), block in [((70, 130), (32, 32)), ((1, 17), (16, 16)), ((130, 40), (64, 16))]:
        w = torch.randn(n, k, generator=g)
        w[torch.rand(n, k, generator=g) < 0.97] = 0
        assert block_sparsity(w, block) == pytest.approx(1 - to_bsr(w.half(), block).density, abs=1e-6)


def test_pattern_violation_names_the_group():
    w = torch.zeros(3, 8)
    assert pattern_violation(w, "2:4") is None
    w[2, 4:7] = 1
    assert pattern_violation(w, "2:4") == "not 2:4: row 2, columns 4..7 hold 3 nonzeros"
    assert pattern_violation(torch.zeros(2, 6), "2:4") == "K = 6 is not a multiple of 4"
    assert pattern_violation(w, "block:16x16") is None


def test_bad_arguments_are_named():
    for pattern in ("3:4", "block:48x64", "block:8x8", "block64x64"):
        with pytest.raises(ValueError, match="slimfx::sparse_linear: pattern must be '2:4' or 'block:BNxBK'"):
            parse_pattern(pattern)
    with pytest.raises(ValueError, match="slimfx::sparse_linear: pattern"):
        sf.sparse_linear(torch.ones(2, 4), torch.ones(3, 4), pattern="4:8")
    with pytest.raises(ValueError, match="LowerSparse.pattern must be one of"):
        P.LowerSparse(pattern="2:8")
    with pytest.raises(ValueError, match=r"LowerSparse.block must be two powers of two >= 16 \(BN, BK\), "
                                         r"got \(48, 64\)"):
        P.LowerSparse(block=(48, 64))
    with pytest.raises(ValueError, match="LowerSparse.block must be"):
        P.LowerSparse(block=(64,))
    with pytest.raises(ValueError, match=r"min_block_sparsity must be in \[0, 1\]"):
        P.LowerSparse(min_block_sparsity=1.5)


def test_op_reference_fake_and_numpy_agree():
    from slimfx.backends.optable import NUMPY_OPS
    torch.manual_seed(4)
    x, w, b, r = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5), torch.randn(2, 3, 5)
    make_24(w)
    args = (x, w, b, "silu", r, "2:4")
    assert torch.equal(sf.sparse_linear(*args), F.silu(F.linear(x, w, b)) + r)
    np_args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in args]
    got = NUMPY_OPS[sf.sparse_linear.default](*np_args)
    assert (got == NUMPY_OPS[sf.fused_linear.default](*np_args[:5])).all()
    torch.library.opcheck(sf.sparse_linear.default, args)


def test_dynamic_shapes_propagate():
    m = Net().eval()
    x = torch.randn(3, 5, 40)
    gm = ir.capture(m, (x,), dynamic=True).gm
    before = lower(ir.capture(m, (x,), dynamic=True).gm, "numpy")       # passes rewrite gm in place
    P.LowerSparse(block=(32, 32))(gm)
    ir.verify(gm)
    for shape in [(1, 1, 40), (4, 7, 40)]:
        x = torch.randn(*shape)
        assert torch.equal(run_np(gm, x), before((x,), {}))


def test_quantize_after_lower_sparse_says_why_it_skips():
    gm, x = captured()
    P.LowerSparse(block=(32, 32))(gm)
    res = P.Quantize(weights="int8", activations="dynamic")(gm, P.PassContext((x,)))
    assert res.stats["layers"] == 1                                     # c, the dense one
    assert res.stats["skipped"] == {n: "slimfx.sparse_linear: Quantize takes aten.linear (run it before Fuse "
                                       "and LowerSparse)" for n in ("a", "b")}
