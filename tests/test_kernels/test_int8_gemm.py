"""int8_gemm: exact int32 accumulation and the fused epilogue, against numerics-based numpy references."""
import numpy as np
import pytest
import torch

from slimfx.kernels import int8_gemm, quantize_int8_per_channel, quantize_per_token
from slimfx.kernels import _common as C
from slimfx.kernels._common import activate_np
from slimfx.kernels.int8_gemm import int8_gemm_ref

from .kernel_checks import UNIT_ROUNDOFF, assert_cast_equal, assert_close, assert_exact, rand_int8, sqnr_db

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's exp overflows to inf

SHAPES = [(1, 45, 71), (5, 130, 200), (33, 64, 96), (17, 33, 300)]   # (M, N, K): none a tile multiple but one


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_raw_accumulator_exact(dev, gen, m, n, k):
    a, b = rand_int8(gen, m, k), rand_int8(gen, n, k)
    out = int8_gemm(a.to(dev), b.to(dev), out_dtype=torch.int32)
    assert out.dtype == torch.int32
    assert_exact(out, int8_gemm_ref(a, b, out_dtype=torch.int32))


def test_extreme_values_exact(dev):
    """All products +-127*127 summed over K = 1000: 16 million, far beyond int16, exact in int32."""
    a = torch.full((3, 1000), 127, dtype=torch.int8)
    a[1] = -127
    b = torch.full((5, 1000), 127, dtype=torch.int8)
    b[2, ::2] = -127
    out = int8_gemm(a.to(dev), b.to(dev), out_dtype=torch.int32)
    assert out[0, 0].item() == 127 * 127 * 1000 and out[1, 0].item() == -127 * 127 * 1000
    assert out[0, 2].item() == 0
    assert_exact(out, int8_gemm_ref(a, b, out_dtype=torch.int32))


def _operands(gen, m, n, k, bias, residual):
    a, b = rand_int8(gen, m, k), rand_int8(gen, n, k)
    sa = torch.rand(m, 1, generator=gen) * 0.02 + 1e-3
    sb = torch.rand(n, generator=gen) * 0.02 + 1e-3
    bb = torch.randn(n, generator=gen) if bias else None
    r = torch.randn(m, n, generator=gen) if residual else None
    return a, b, sa, sb, bb, r


def _to(dev, *ts):
    return [None if t is None else t.to(dev) for t in ts]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True)])
def test_epilogue(dev, gen, out_dtype, activation, bias, residual):
    m, n, k = 5, 130, 200
    a, b, sa, sb, bb, r = _operands(gen, m, n, k, bias, residual)
    out = int8_gemm(*_to(dev, a, b, sa, sb, bb), activation=activation,
                    residual=None if r is None else r.to(dev).to(out_dtype), out_dtype=out_dtype)
    ref = int8_gemm_ref(a, b, sa, sb, bb, activation, None if r is None else r.to(out_dtype))
    assert out.dtype == out_dtype and out.shape == (m, n)
    if activation in (None, "relu"):
        # Only correctly rounded fp32 ops (fp-contraction is off): identical before and after the cast.
        assert_cast_equal(out, ref)
    else:
        # exp differs by a few ulp between devices, which the cast may carry across one rounding step.
        assert_close(out, ref, rtol=2 * UNIT_ROUNDOFF[out_dtype], atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
def test_requantize_int8(dev, gen, activation):
    m, n, k = 33, 64, 96
    a, b, sa, sb, bb, r = _operands(gen, m, n, k, True, True)
    out_scale = torch.tensor([0.02])
    out = int8_gemm(*_to(dev, a, b, sa, sb, bb), activation=activation, residual=r.to(dev),
                    out_dtype=torch.int8, out_scale=out_scale.to(dev))
    ref = int8_gemm_ref(a, b, sa, sb, bb, activation, r, out_dtype=torch.int8, out_scale=out_scale)
    assert out.dtype == torch.int8
    assert int(np.abs(ref.astype(np.int32)).max()) == 127, "the test should exercise the clamp"
    if activation in (None, "relu"):
        assert_exact(out, ref)
    else:   # see test_epilogue: a few-ulp exp difference can cross a rounding boundary
        diff = np.abs(out.cpu().numpy().astype(np.int32) - ref.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_leading_dims_and_strided_rows(dev, gen):
    a_full = rand_int8(gen, 2, 3, 80)
    a = a_full[..., :71]                                   # row stride 80, unit stride along K
    b = rand_int8(gen, 45, 71)
    sa, sb = torch.rand(2, 3, 1, generator=gen) * 0.01, torch.rand(45, generator=gen) * 0.01
    r = torch.randn(2, 3, 45, generator=gen)
    out = int8_gemm(*_to(dev, a, b, sa, sb), residual=r.to(dev), out_dtype=torch.float32)
    assert out.shape == (2, 3, 45)
    assert_cast_equal(out, int8_gemm_ref(a, b, sa, sb, residual=r, out_dtype=torch.float32))


def test_w8a8_pipeline_sqnr(dev, gen):
    """act_quant -> int8_gemm approximates the float linear: SQNR floor 30 dB (int8 x int8 per-token/
    per-channel on Gaussian data measures ~38 dB; a wrong scale or transpose gives < 0 dB)."""
    x, w = torch.randn(9, 150, generator=gen), torch.randn(70, 150, generator=gen)
    bias = torch.randn(70, generator=gen)
    q, s = quantize_per_token(x.to(dev))
    wq, ws = quantize_int8_per_channel(w)
    y = int8_gemm(q, wq.to(dev), s, ws.to(dev), bias=bias.to(dev), out_dtype=torch.float32)
    assert sqnr_db(y.cpu().numpy(), (x @ w.T + bias).numpy()) > 30


@pytest.mark.parametrize("m,n,k,split", [(1, 45, 200, 3), (5, 70, 96, 3), (16, 33, 32, 4), (3, 64, 300, 2)])
def test_split_k(dev, gen, m, n, k, split):
    """Decode split-K: slices past K contribute zeros, the last slice of each tile sums the partials and
    runs the epilogue; int32 is exact, so raw and requantized outputs equal the unsplit kernel's. Run
    twice: the per-tile counters must be back at zero for the second launch."""
    a, b, sa, sb, bb, r = _operands(gen, m, n, k, True, True)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split)
    for _ in range(2):
        acc = int8_gemm(a.to(dev), b.to(dev), out_dtype=torch.int32, _config=cfg)
        assert_exact(acc, int8_gemm_ref(a, b, out_dtype=torch.int32))
    kw = dict(activation="relu", residual=r.to(dev), out_dtype=torch.int8, out_scale=torch.tensor([0.05], device=dev))
    out = int8_gemm(*_to(dev, a, b, sa, sb, bb), _config=cfg, **kw)
    assert_exact(out, int8_gemm(*_to(dev, a, b, sa, sb, bb), _config={**cfg, "SPLIT_K": 1}, **kw))


def test_split_k_pinned_wide_tile_has_room(dev, gen):
    """A pinned 256-wide split-K tile: the workspace was sized for tiles up to 128 wide (N=300 needed 65536
    partials, got 49152: heap corruption)."""
    a, b, sa, sb, bb, _ = _operands(gen, 5, 300, 96, True, False)
    cfg = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=32, SPLIT_K=8)
    out = int8_gemm(*_to(dev, a, b, sa, sb, bb), out_dtype=torch.float32, _config=cfg)
    assert_exact(out, int8_gemm(*_to(dev, a, b, sa, sb, bb), out_dtype=torch.float32, _config={**cfg, "SPLIT_K": 1}))


def test_references_take_zero_rows():
    a, b = torch.zeros(0, 32, dtype=torch.int8), torch.ones(8, 32, dtype=torch.int8)
    assert int8_gemm_ref(a, b, out_dtype=torch.int32).shape == (0, 8)
    assert int8_gemm_ref(a.reshape(2, 0, 32), b, torch.ones(0), torch.ones(8)).shape == (2, 0, 8)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.int8])
def test_epilogue_on_column_halves(dev, gen, out_dtype):
    """A 128-wide tile with an activation and a residual runs its epilogue on column halves (HALVES, to
    save registers): element for element the same arithmetic as the narrow tile, so the same bits."""
    m, n, k = 20, 200, 64                   # N = 200: the second half of the second tile is past N
    a, b, sa, sb, bb, r = _operands(gen, m, n, k, True, True)
    kw = dict(activation="gelu", residual=r.to(dev), out_dtype=out_dtype)
    if out_dtype == torch.int8:
        kw["out_scale"] = torch.tensor([0.05], device=dev)
    wide = int8_gemm(*_to(dev, a, b, sa, sb, bb), _config=dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=32), **kw)
    narrow = int8_gemm(*_to(dev, a, b, sa, sb, bb), _config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), **kw)
    assert torch.equal(wide, narrow)
    assert C.halves(dict(BLOCK_N=128, ACT="gelu", HAS_RES=True)) and not C.halves(dict(BLOCK_N=32, ACT="gelu",
                                                                                        HAS_RES=True))


TMA_SHAPES = [(1, 45, 96), (33, 70, 80), (130, 33, 48), (17, 64, 304)]   # K a multiple of 16 (TMA strides)


@pytest.mark.parametrize("m,n,k", TMA_SHAPES)
def test_tma_kernel(dev, gen, m, n, k):
    """The persistent TMA kernel: exact int32 (TMA's zero fill covers the M, N and K tails), and the same
    epilogue as the tiled kernel (requantization with activation and residual: identical int8)."""
    if dev == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability >= 9.0")
    a, b, sa, sb, bb, r = _operands(gen, m, n, k, True, True)
    acc = int8_gemm(a.to(dev), b.to(dev), out_dtype=torch.int32, impl="tma")
    assert_exact(acc, int8_gemm_ref(a, b, out_dtype=torch.int32))
    kw = dict(activation="relu", residual=r.to(dev), out_dtype=torch.int8, out_scale=torch.tensor([0.05], device=dev))
    out = int8_gemm(*_to(dev, a, b, sa, sb, bb), impl="tma", **kw)
    assert_exact(out, int8_gemm(*_to(dev, a, b, sa, sb, bb), impl="tiled", **kw))
    assert_exact(out, int8_gemm_ref(a, b, sa, sb, bb, "relu", r, out_dtype=torch.int8, out_scale=torch.tensor([0.05])))


def test_tma_pinned_config_two_programs_per_sm(dev, gen):
    """A pinned TMA config (_config with impl="tma") with CTAS=2: twice as many programs, each walking every
    other tile of its stride; the int32 result stays exact."""
    if dev == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability >= 9.0")
    a, b, *_ = _operands(gen, 70, 200, 96, False, False)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, CTAS=2, num_warps=4, num_stages=1)
    acc = int8_gemm(a.to(dev), b.to(dev), out_dtype=torch.int32, impl="tma", _config=cfg)
    assert_exact(acc, int8_gemm_ref(a, b, out_dtype=torch.int32))


GLUON_OK = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_gluon_refusals(dev, gen):
    a, b, sa, sb, _, r = _operands(gen, 130, 64, 96, False, True)
    a, b, sa, sb, r = _to(dev, a, b, sa, sb, r)
    if not GLUON_OK:     # the CPU tier (and non-Hopper GPUs): refused with the reason, not a crash
        with pytest.raises(ValueError, match=r"impl='gluon': (Gluon kernels run on a CUDA device only|the kernel "
                                             r"is written for Hopper's wgmma)"):
            int8_gemm(a, b, sa, sb, impl="gluon")
    else:
        with pytest.raises(ValueError, match=r"impl='gluon': light epilogues only"):
            int8_gemm(a, b, sa, sb, residual=r, impl="gluon")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks auto's candidates with the kernels interpreted")
def test_auto_measures_gluon_only_when_asked(gen, monkeypatch):
    """SLIMFX_GLUON=1 adds the Gluon kernel to auto's candidates (light epilogues only); by default auto
    measures tiled and TMA. The choice is stubbed to the tiled kernel, which then runs."""
    import importlib
    G = importlib.import_module("slimfx.kernels.int8_gemm")   # (the package's int8_gemm is the function)
    seen = []

    def fake_fastest(family, key, cands, default, output=None):
        seen.append(sorted(cands))
        assert output is not None                     # int8 candidates are checked bit for bit
        return "tiled"
    monkeypatch.setattr(G.C, "fastest", fake_fastest)
    monkeypatch.setattr(G, "_gluon_refusal", lambda dev, act, res, dt: "light only" if act or res is not None else None)
    a, b, sa, sb, _, r = _operands(gen, 130, 33, 48, False, True)
    G.int8_gemm(a, b, sa, sb)
    monkeypatch.setenv("SLIMFX_GLUON", "1")
    out = G.int8_gemm(a, b, sa, sb)
    G.int8_gemm(a, b, sa, sb, residual=r)
    assert seen == [["tiled", "tma"], ["gluon", "tiled", "tma"], ["tiled", "tma"]]
    assert_cast_equal(out, int8_gemm_ref(a, b, sa, sb))


@pytest.mark.skipif(not GLUON_OK, reason="the Gluon W8A8 kernel runs on sm_90 only (compiled for it on the CPU "
                                         "by test_aot)")
@pytest.mark.parametrize("m,n,k", [(1, 45, 96), (130, 33, 48), (300, 520, 1040)])
def test_gluon_kernel_bit_exact(gen, m, n, k):
    a, b, sa, sb, bb, _ = _operands(gen, m, n, k, True, False)
    acc = int8_gemm(a.cuda(), b.cuda(), out_dtype=torch.int32, impl="gluon")
    assert_exact(acc, int8_gemm_ref(a, b, out_dtype=torch.int32))
    for dtype in (torch.float32, torch.bfloat16):
        want = int8_gemm(*_to("cuda", a, b, sa, sb, bb), out_dtype=dtype, impl="tiled")
        assert_exact(int8_gemm(*_to("cuda", a, b, sa, sb, bb), out_dtype=dtype, impl="gluon"), want)


@pytest.mark.skipif(not GLUON_OK, reason="the Gluon W8A8 kernel runs on sm_90 only")
def test_gluon_every_config_bit_exact(gen):
    """Each tile config pinned (impl="gluon" otherwise runs the fastest only): identical to the tiled kernel."""
    from slimfx.kernels.int8_gemm_gluon import CONFIGS
    a, b, sa, sb, bb, _ = _operands(gen, 300, 520, 1040, True, False)
    args = _to("cuda", a, b, sa, sb, bb)
    want = int8_gemm(*args, out_dtype=torch.bfloat16, impl="tiled")
    for bm, bn, bk, stages, warps in CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps)
        assert_exact(int8_gemm(*args, out_dtype=torch.bfloat16, impl="gluon", _config=cfg), want)


def test_gelu_is_torch_tanh_gelu():
    y = np.linspace(-8, 8, 1001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(y), approximate="tanh").numpy()
    np.testing.assert_allclose(activate_np(y, "gelu"), want, rtol=1e-5, atol=1e-6)   # fp32 formula noise


def test_refusals(dev, gen):
    a, b = rand_int8(gen, 4, 64).to(dev), rand_int8(gen, 8, 64).to(dev)
    sa, sb = torch.ones(4, device=dev), torch.ones(8, device=dev)
    with pytest.raises(TypeError, match=r"a: expected dtype in \(int8\), got float16"):
        int8_gemm(a.half(), b, sa, sb)
    meta = [t.to("meta") for t in (a, b, sa, sb)]          # (the interpreter took them, then torch failed raw)
    with pytest.raises(ValueError, match=r"a: Triton kernels need CUDA tensors .* got device meta"):
        int8_gemm(*meta)
    with pytest.raises(ValueError, match=r"a: expected last dimension 64 \(K of the weight\), got shape \(4, 63\)"):
        int8_gemm(a[:, :63], b[:, :64], sa, sb)
    with pytest.raises(ValueError, match="b: expected unit stride in the last dimension"):
        int8_gemm(a, rand_int8(gen, 64, 8).to(dev).t(), sa, sb)
    with pytest.raises(ValueError, match="b: expected 2 dimensions"):
        int8_gemm(a, b[None], sa, sb)
    with pytest.raises(ValueError, match=r"a_scale: expected one fp32 scale per token \(4 values\)"):
        int8_gemm(a, b, torch.ones(5, device=dev), sb)
    with pytest.raises(TypeError, match="w_scale: expected dtype in \\(float32\\), got float16"):
        int8_gemm(a, b, sa, sb.half())
    with pytest.raises(ValueError, match="a_scale and w_scale: both required"):
        int8_gemm(a, b)
    with pytest.raises(ValueError, match="out_scale: required exactly when out_dtype=int8"):
        int8_gemm(a, b, sa, sb, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out_scale: expected one static fp32 scale"):
        int8_gemm(a, b, sa, sb, out_dtype=torch.int8, out_scale=torch.ones(4, device=dev))
    with pytest.raises(ValueError, match="raw accumulator"):
        int8_gemm(a, b, bias=torch.ones(8, device=dev), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="activation: expected one of"):
        int8_gemm(a, b, sa, sb, activation="tanh")
    with pytest.raises(ValueError, match=r"residual: expected shape \(..., 8\) with 4 rows"):
        int8_gemm(a, b, sa, sb, residual=torch.ones(4, 9, device=dev))
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        int8_gemm(a, b, sa, sb, bias=torch.ones(7, device=dev))
    with pytest.raises(TypeError, match="out_dtype: expected one of"):
        int8_gemm(a, b, sa, sb, out_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'tiled', 'tma', 'gluon'\), got 'fast'"):
        int8_gemm(a, b, sa, sb, impl="fast")
    a72, b72 = rand_int8(gen, 4, 72).to(dev), rand_int8(gen, 8, 72).to(dev)
    with pytest.raises(ValueError, match=r"impl='tma': TMA needs row strides that are multiples of 16 bytes, "
                                         r"got a 72, b 72 \(use impl='tiled' or 'auto'\)"):
        int8_gemm(a72, b72, sa, sb, impl="tma")
    assert int8_gemm(a72, b72, out_dtype=torch.int32).shape == (4, 8)     # auto: the tiled kernel takes it


def test_bf16_output_rounds_ties_to_even(dev):
    """257 and 259 lie exactly halfway between bf16 neighbours (spacing 2 in [256, 512)): ties go to the
    even mantissa, 256 and 260, as torch's own cast does (truncation or round-half-up would not)."""
    a = torch.tensor([[127, 1]], dtype=torch.int8)
    b = torch.tensor([[2, 3], [2, 5], [-2, -3]], dtype=torch.int8)
    one = torch.ones(1)
    out = int8_gemm(a.to(dev), b.to(dev), one.to(dev), torch.ones(3, device=dev), out_dtype=torch.bfloat16)
    assert out.cpu().float().tolist() == [[256.0, 260.0, -256.0]]
    assert out.cpu().tolist() == torch.tensor([[257.0, 259.0, -257.0]]).bfloat16().tolist()
