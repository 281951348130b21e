"""Uniform affine quantization: numpy and torch agree bit for bit; rounding; SQNR floors."""
import numpy as np
import pytest
import torch

from slimfx.quant import (QScheme, dequantize_tensor_np, dequantize_tensor_torch, fake_quantize_np, qparams_np,
                          qparams_torch, quantize_tensor_np, quantize_tensor_torch)
from slimfx.quant import numerics
from slimfx.quant.numerics import MIN_SCALE

from qtest_util import assert_exact, sqnr_db

UNIFORM = [
    QScheme(bits=b, symmetric=sym, granularity=g, group_size=gs, axis=ax)
    for b in (8, 4) for sym in (True, False)
    for g, gs, ax in [("tensor", None, 0), ("channel", None, 0), ("channel", None, -1), ("token", None, 0),
                      ("group", 11, 0)]
]
SHAPES = [(1, 33), (7, 33), (3, 5, 22), (1, 1, 11)]


@pytest.mark.parametrize("scheme", UNIFORM, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_and_torch_agree_bit_for_bit(scheme, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10, size=shape[-1])).astype(np.float32)
    x[..., 0] += 3.0  # some rows entirely or mostly positive: exercises the asymmetric zero point
    qn = qparams_np(x, scheme)
    qt = qparams_torch(torch.from_numpy(x), scheme)
    assert_exact(qt.scale, qn.scale, "scale")
    assert_exact(qt.zero_point, qn.zero_point, "zero_point")
    q_np = quantize_tensor_np(x, scheme, qn)
    q_t = quantize_tensor_torch(torch.from_numpy(x), scheme, qt)
    assert_exact(q_t, q_np, "codes")
    assert q_np.dtype == np.int8 and q_np.min() >= scheme.qmin and q_np.max() <= scheme.qmax
    assert_exact(dequantize_tensor_torch(q_t, scheme, qt), dequantize_tensor_np(q_np, scheme, qn), "dequantized")


@pytest.mark.parametrize("scheme", [s for s in UNIFORM if s.granularity == "group"]
                         + [QScheme(kind="log", bits=4, granularity="group", group_size=11)], ids=str)
def test_groups_quantize_as_each_group_alone(scheme):
    """Grouped codes and values equal quantizing each group of 11 on its own with its one (scale, zero point):
    the group parameters broadcast over their own columns only (odd rows, a 3-d tensor)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 5, 33)) * rng.uniform(0.01, 10, size=33)).astype(np.float32)
    qp = qparams_np(x, scheme)
    per = QScheme(kind=scheme.kind, bits=scheme.bits, symmetric=scheme.symmetric)       # per tensor
    for fn_q, fn_d, t in ((quantize_tensor_np, dequantize_tensor_np, np.asarray),
                          (quantize_tensor_torch, dequantize_tensor_torch, torch.from_numpy)):
        tq = type(qp)(t(qp.scale), t(qp.zero_point))
        codes = fn_q(t(x), scheme, tq)
        values = fn_d(codes, scheme, tq)
        for g in range(3):
            cols = slice(11 * g, 11 * g + 11)
            one = type(qp)(t(qp.scale[..., g:g + 1].copy()), t(qp.zero_point[..., g:g + 1].copy()))
            assert_exact(codes[..., cols], fn_q(t(x[..., cols].copy()), per, one), f"codes of group {g}")
            assert_exact(values[..., cols], fn_d(codes[..., cols], per, one), f"values of group {g}")


def test_round_half_to_even_on_exact_halves():
    x = np.array([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.125, 0.375, 200.0, -200.0], np.float32)
    s = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0.25, 0.25, 1, 1], np.float32)  # 0.125 / 0.25 = 0.5 exactly
    want = np.array([-4, -2, -2, 0, 0, 2, 2, 4, 0, 2, 127, -128], np.int8)  # last two: clamped
    assert_exact(numerics.quantize_np(x, s), want, "numpy")
    assert_exact(numerics.quantize_torch(torch.from_numpy(x), torch.from_numpy(s)), want, "torch")


def test_asymmetric_represents_zero_exactly_and_widens_the_range():
    x = np.linspace(0.5, 3.0, 64, dtype=np.float32).reshape(4, 16)  # all positive: lo widened to 0
    s = QScheme(symmetric=False, granularity="channel")
    qp = qparams_np(x, s)
    assert (qp.zero_point == -128).all()
    assert (fake_quantize_np(np.zeros_like(x), s, qp) == 0).all()


def test_all_zero_tensor_gives_min_scale_and_zeros():
    for s in (QScheme(), QScheme(symmetric=False, granularity="token")):
        x = np.zeros((3, 5), np.float32)
        qp = qparams_np(x, s)
        assert (qp.scale == np.float32(MIN_SCALE)).all()
        assert (fake_quantize_np(x, s) == 0).all()


def test_nan_in_data_raises_naming_the_tensor():
    x = np.ones((2, 3), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="layer1.weight.*NaN"):
        qparams_np(x, QScheme(), name="layer1.weight")
    with pytest.raises(ValueError, match="layer1.weight.*NaN"):
        qparams_torch(torch.from_numpy(x), QScheme(), name="layer1.weight")


# --- SQNR floors ------------------------------------------------------------------------------------
# Uniform rounding noise is step^2 / 12 with step = 2 * amax / (2**bits - 2) (symmetric), so for data of
# variance sigma^2: SQNR = 10 log10(12 qmax^2) - 20 log10(amax / sigma). The floors sit 1-2 dB under the
# measured values (fixed seeds), so a wrong step, scale or rounding mode falls through them.

def _gauss(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("scheme, floor, why", [
    (QScheme(granularity="channel"), 40.0,
     "int8 per channel, 1024 samples per row: amax ~3.3 sigma -> 52.9 - 10.4 = 42.5 dB (measured 42.0)"),
    (QScheme(), 38.0, "int8 per tensor, 65536 samples: amax ~4.4 sigma -> 52.9 - 12.9 = 40.0 dB (measured 39.3)"),
    (QScheme(bits=4, granularity="group", group_size=128), 17.5,
     "int4 groups of 128: amax ~2.6 sigma -> 27.7 - 8.3 = 19.4 dB (measured 18.6; the step-noise model is optimistic at 4 bits)"),
    (QScheme(bits=4, granularity="channel"), 15.0, "int4 per channel: amax ~3.3 sigma -> 27.7 - 10.4 = 17.3 dB (measured 16.8)"),
])
def test_sqnr_floor_gaussian(scheme, floor, why):
    x = _gauss((64, 1024))
    got = sqnr_db(x, fake_quantize_np(x, scheme))
    assert got >= floor, f"{scheme}: {got:.2f} dB < {floor} dB ({why})"


def test_groups_beat_channels_at_int4():
    # smaller groups -> smaller amax per scale -> finer steps; theory says ~2 dB at 128 vs 1024 samples
    x = _gauss((64, 1024), seed=1)
    g = sqnr_db(x, fake_quantize_np(x, QScheme(bits=4, granularity="group", group_size=128)))
    c = sqnr_db(x, fake_quantize_np(x, QScheme(bits=4, granularity="channel")))
    assert g - c >= 1.0, f"group {g:.2f} dB vs channel {c:.2f} dB"


def test_asymmetric_beats_symmetric_on_one_sided_data():
    # uniform [0, 1): asymmetric uses all 256 codes (step 1/255) -> 10 log10((1/3) * 12 * 255^2) = 54.2 dB;
    # symmetric wastes the negative half (step 1/127) -> 48.1 dB
    x = np.random.default_rng(2).random((32, 512)).astype(np.float32)
    a = sqnr_db(x, fake_quantize_np(x, QScheme(symmetric=False)))
    s = sqnr_db(x, fake_quantize_np(x, QScheme()))
    assert a >= 53.0, f"asymmetric int8 on U[0,1): {a:.2f} dB"
    assert a - s >= 5.0, f"asymmetric {a:.2f} dB vs symmetric {s:.2f} dB (theory: 6.0 dB apart)"
