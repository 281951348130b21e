"""Logarithmic quantization: exact round trip of representable values, log-domain rounding, np == torch."""

import numpy as np
import pytest
import torch

from slimfx.quant import QScheme, fake_quantize_np, qparams_np
from slimfx.quant.logq import (SQRT_HALF_UP, levels, log_dequantize_np, log_dequantize_torch, log_quantize_np,
                               log_quantize_torch)

from qtest_util import assert_exact, sqnr_db


def _both(x, s, bits):
    qn = log_quantize_np(x, s, bits)
    qt = log_quantize_torch(torch.from_numpy(x), torch.as_tensor(s), bits)
    assert_exact(qt, qn, f"log codes (bits={bits})")
    dn = log_dequantize_np(qn, s, bits)
    assert_exact(log_dequantize_torch(qt, torch.as_tensor(s), bits), dn, f"log dequantized (bits={bits})")
    return qn, dn


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("s", [1.0, 1.5, 3.0, 1e-3 * 2.0**126])  # s * 2**(1 - L) stays a normal fp32
def test_representable_values_round_trip_exactly(bits, s):
    L = levels(bits)
    e = np.arange(1 - L, 1)
    mags = (np.float32(s) * np.ldexp(np.float32(1), e)).astype(np.float32)
    x = np.concatenate([mags, -mags, [0.0]]).astype(np.float32)
    want = np.concatenate([e + L, -(e + L), [0]]).astype(np.int8)
    q, d = _both(x, np.float32(s), bits)
    assert_exact(q, want, "codes")
    assert_exact(d, x, "round trip")


def test_rounding_is_nearest_in_the_log_domain():
    s = np.float32(1.0)
    below = np.nextafter(np.float32(SQRT_HALF_UP), np.float32(0))  # just under 2**-0.5 -> exponent -1
    x = np.array([SQRT_HALF_UP, below, 0.75, 0.70, 1.4, 0.36], np.float32)
    q, _ = _both(x, s, 8)
    # codes are exponent + 127: 2**-0.5+ -> 0; just under -> -1; log2 0.75 = -0.415 -> 0; log2 0.70 = -0.515 -> -1;
    # 1.4 > s saturates at exponent 0; log2 0.36 = -1.47 -> -1
    assert_exact(q, np.array([127, 126, 127, 126, 127, 126], np.int8), "codes")


def test_matches_float64_log2_away_from_boundaries():
    r = np.random.default_rng(0).uniform(1e-6, 1.0, 20000).astype(np.float32)
    ref = np.round(np.log2(r.astype(np.float64)))
    far = np.abs(np.log2(r.astype(np.float64)) % 1 - 0.5) > 1e-6
    q, _ = _both(r, np.float32(1.0), 8)
    assert_exact(q[far].astype(np.int64) - 127, ref[far].astype(np.int64), "exponent vs float64 log2")


def test_underflow_flushes_to_zero_and_sign_is_kept():
    # 4 bits: L = 7, exponents [-6, 0]; log2 r below -6.5 rounds under the range and flushes to zero
    s = np.float32(2.0)
    x = (s * np.array([2.0**-6.4, 2.0**-6.6, 2.0**-7, -(2.0**-6.4), 0.0, -0.0])).astype(np.float32)
    q, d = _both(x, s, 4)
    assert_exact(q, np.array([1, 0, 0, -1, 0, 0], np.int8), "codes")
    assert_exact(d[[0, 3]], np.array([2.0**-5, -(2.0**-5)], np.float32), "smallest magnitude")


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_numpy_and_torch_agree(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((9, 37)) * rng.uniform(1e-3, 1e3, (9, 1))).astype(np.float32)
    x[0, :5] = 0
    scheme = QScheme(kind="log", bits=bits, granularity="channel")
    s = qparams_np(x, scheme).scale
    assert s.shape == (9, 1)
    _both(x, s, bits)


@pytest.mark.parametrize("bits, floor", [(8, 13.0), (4, 12.5)])
def test_sqnr_floor_gaussian(bits, floor):
    # the exponent rounds to the nearest integer, so x'/x = 2**u with u ~ uniform[-0.5, 0.5]:
    # E[(2**u - 1)**2] = 0.0417 -> 13.8 dB regardless of bits; at 4 bits values below amax * 2**-6.5 (~2.4% of
    # Gaussian samples with amax ~4 sigma) flush to zero, which costs little energy.
    x = np.random.default_rng(3).standard_normal((16, 4096)).astype(np.float32)
    got = sqnr_db(x, fake_quantize_np(x, QScheme(kind="log", bits=bits, granularity="channel")))
    assert got >= floor, f"log{bits}: {got:.2f} dB < {floor} dB"
    assert got <= 15.0, f"log{bits}: {got:.2f} dB is above the 13.8 dB the log-domain rounding allows"
