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
from slimfx.ir.dialect.sparse import block_sparsity, nonzero_blocks, parse_pattern, pattern_violation
from slimfx.passes.sparse import BLOCK_SHAPES

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


def test_nonzero_blocks_is_each_shapes_own_map():
    """The 16x16 map pooled to each shape equals the shape's map computed from w itself (ragged edges)."""
    g = torch.Generator().manual_seed(2)
    for n, k in [(197, 326), (1, 17), (130, 40)]:
        w = torch.randn(n, k, generator=g)
        w[torch.rand(n, k, generator=g) < 0.995] = 0
        maps = nonzero_blocks(w, BLOCK_SHAPES)
        for (bn, bk), m in maps.items():
            direct = F.pad(w != 0, (0, -k % bk, 0, -n % bn)).reshape(-(-n // bn), bn, -(-k // bk), bk)
            assert torch.equal(m, direct.any(3).any(1)), (n, k, bn, bk)
            assert block_sparsity(w, (bn, bk)) == pytest.approx(1 - m.float().mean().item(), abs=1e-7)


def block_pruned(n, k, block, sparsity, seed=0):
    """An (n, k) weight with ``sparsity`` of its ``block``-blocks zeroed at random (ragged edges included)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    (bn, bk), nb, kb = block, -(-n // block[0]), -(-k // block[1])
    drop = torch.randperm(nb * kb, generator=g)[:round(sparsity * nb * kb)]
    keep = torch.ones(nb * kb)
    keep[drop] = 0
    mask = keep.reshape(nb, kb).repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return w * mask


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (128, 128), (32, 64), (128, 32)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_auto_block_finds_the_shape_pruned_in(block, sparsity):
    """block="auto" picks the shape the zeros were made in: not a smaller one (as empty, more to index), not
    a larger one (few of its blocks are all zero)."""
    n, k = 7 * 128, 6 * 128
    w = block_pruned(n, k, block, sparsity)
    got, frac = P.LowerSparse().choose_block(w)
    assert got == block
    blocks = -(-n // block[0]) * -(-k // block[1])
    assert frac == pytest.approx(round(sparsity * blocks) / blocks, abs=1e-6)
    assert P.LowerSparse().choose(w) == (f"block:{block[0]}x{block[1]}", "")


def test_auto_block_falls_back_and_says_why():
    lower_sparse = P.LowerSparse()
    w = block_pruned(256, 256, (16, 16), 0.3)                        # too few zero blocks of any shape
    assert lower_sparse.choose(w) == (None, "30% zero 16x16 blocks (the most of any shape) < 50%; "
                                            "not 2:4: row 0, columns 0..3 hold 4 nonzeros")
    assert P.LowerSparse(min_block_sparsity=0.3).choose(w) == ("block:16x16", "")
    w24 = torch.randn(256, 256)
    make_24(w24)                                                     # 2:4 leaves no block empty
    assert lower_sparse.choose(w24) == ("2:4", "")
    w = block_pruned(256, 256, (64, 64), 0.5)                        # given a shape, it is kept
    assert P.LowerSparse(block=(32, 32)).choose(w) == ("block:32x32", "")
    assert P.LowerSparse(block=(128, 128)).choose(w)[0] is None


def test_auto_block_weighs_the_padding_of_ragged_edges():
    """Edge blocks are computed and stored whole: on 392 rows (8 past a multiple of 64) with every other
    64-column stripe zero, 64x64 blocks compute 448 rows per kept stripe, 32x64 416, 16x64 400: auto takes
    32x64, the largest within AUTO_SLACK (1.1) of the leanest."""
    w = torch.randn(392, 704)
    w.view(392, 11, 64)[:, ::2] = 0
    got, frac = P.LowerSparse().choose_block(w)
    assert got == (32, 64) and frac == pytest.approx(6 / 11, abs=1e-6)
    kept = {b: int(m.sum()) * b[0] for b, m in nonzero_blocks(w, [(64, 64), (32, 64), (16, 64)]).items()}
    assert kept == {(64, 64): 448 * 5, (32, 64): 416 * 5, (16, 64): 400 * 5}
    assert P.LowerSparse().choose_block(w[:384])[0] == (128, 64)        # no ragged edge: 3 x 128 rows


def test_kernel_and_dialect_agree_on_the_int8_block_bound():
    pytest.importorskip("triton")
    from slimfx.ir.dialect.sparse import INT8_MIN_BK
    from slimfx.kernels import block_sparse
    assert INT8_MIN_BK == block_sparse.INT8_MIN_BK


def test_int8_weights_take_blocks_with_bk_32_or_more():
    """An int8 tl.dot needs K >= 32, so auto tries only BK >= 32 on int8 weights: one pruned in 16x32 blocks
    lowers in them; one pruned in 16x16 blocks has too few empty 16x32 ones and stays dense (its float copy
    lowers in 16x16); a given BK = 16 is refused with the reason."""
    w = block_pruned(128, 256, (16, 32), 0.6).mul(40).round().clamp(-127, 127).to(torch.int8)
    assert P.LowerSparse().choose(w) == ("block:16x32", "")
    assert P.LowerSparse().choose(w.float()) == ("block:16x32", "")
    w16 = block_pruned(256, 256, (16, 16), 0.6).mul(40).round().to(torch.int8)
    assert P.LowerSparse().choose(w16.float()) == ("block:16x16", "")
    assert P.LowerSparse().choose(w16) == (                         # both halves empty: ~0.6^2
        None, "38% zero 16x32 blocks (the most of any shape) < 50%; int8 2:4 has no kernel")
    assert P.LowerSparse(block=(16, 16)).choose(w16) == (
        None, "int8 blocks need BK >= 32 (an int8 tensor-core dot's K), got 16x16; int8 2:4 has no kernel")


def test_auto_block_through_prune():
    """Prune(pattern="block", block=(32, 32)) then LowerSparse(): every pruned linear is lowered in 32x32
    blocks with no block shape given to it (sizes 32-multiples, not 64-multiples), and nothing changes."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(224, 352), torch.nn.ReLU(), torch.nn.Linear(352, 224),
                            torch.nn.ReLU(), torch.nn.Linear(224, 9)).eval()
    gm, x = captured(m, torch.randn(3, 5, 224))
    P.Prune(sparsity=0.6, pattern="block", block=(32, 32), exclude="4")(gm, P.PassContext((x,)))
    ref = run_np(gm, x)
    res = P.LowerSparse()(gm)
    assert sparse_nodes(gm) == {"0": "block:32x32", "2": "block:32x32"}
    assert res.stats["skipped"]["4"].startswith("no all-zero blocks of any shape; ")
    assert torch.equal(run_np(gm, x), ref)


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
    with pytest.raises(ValueError, match=r"LowerSparse.block must be 'auto' or two powers of two >= 16 "
                                         r"\(BN, BK\), got \(48, 64\)"):
        P.LowerSparse(block=(48, 64))
    for bad in ((64,), "64x64", None):
        with pytest.raises(ValueError, match="LowerSparse.block must be"):
            P.LowerSparse(block=bad)
    with pytest.raises(ValueError, match=r"min_block_sparsity must be a number in \[0, 1\]"):
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
