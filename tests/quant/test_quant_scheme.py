import json

import numpy as np
import pytest

from slimfx.quant import QScheme, fp32_bytes, pack_int4_np, param_shape, weight_bytes
from slimfx.quant.int4 import pack_int4_torch, unpack_int4_np, unpack_int4_torch
import torch

from qtest_util import assert_exact

SCHEMES = [
    QScheme(),
    QScheme(bits=4, symmetric=False, granularity="group", group_size=32),
    QScheme(kind="log", bits=4, granularity="channel", axis=1),
    QScheme(granularity="token"),
]


@pytest.mark.parametrize("s", SCHEMES, ids=str)
def test_json_round_trip_and_equality(s):
    d = json.loads(json.dumps(s.to_dict()))
    assert QScheme.from_dict(d) == s
    assert hash(QScheme.from_dict(d)) == hash(s)
    assert "QScheme(kind=" in repr(s)


def test_schemes_differ_and_are_frozen():
    assert QScheme(bits=8) != QScheme(bits=4)
    with pytest.raises(Exception):
        QScheme().bits = 4


@pytest.mark.parametrize("kwargs, word", [
    (dict(bits=9), "bits"),
    (dict(bits=4.0), "bits"),
    (dict(kind="fp8"), "kind"),
    (dict(granularity="row"), "granularity"),
    (dict(granularity="group"), "group_size"),
    (dict(granularity="group", group_size=0), "group_size"),
    (dict(group_size=32), "group_size"),
    (dict(kind="log", symmetric=False), "symmetric"),
])
def test_invalid_schemes_name_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        QScheme(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        QScheme.from_dict({"bits": 8, "sym": True})


@pytest.mark.parametrize("s, lo, hi", [
    (QScheme(bits=8), -127, 127), (QScheme(bits=8, symmetric=False), -128, 127),
    (QScheme(bits=4), -7, 7), (QScheme(bits=4, symmetric=False), -8, 7),
    (QScheme(kind="log", bits=8), -127, 127), (QScheme(kind="log", bits=4), -7, 7),
])
def test_code_ranges(s, lo, hi):
    assert (s.qmin, s.qmax) == (lo, hi)


@pytest.mark.parametrize("s, shape, want", [
    (QScheme(), (5, 7), ()),
    (QScheme(granularity="channel"), (5, 7), (5, 1)),
    (QScheme(granularity="channel", axis=-1), (2, 5, 7), (1, 1, 7)),
    (QScheme(granularity="token"), (2, 5, 7), (2, 5, 1)),
    (QScheme(granularity="group", group_size=7), (5, 21), (5, 3)),
])
def test_param_shapes(s, shape, want):
    assert param_shape(shape, s) == want


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match=r"group_size=16 does not divide .* K=40"):
        param_shape((3, 40), QScheme(granularity="group", group_size=16))


# --- int4 packing and size accounting ---

@pytest.mark.parametrize("k", [1, 2, 15, 16, 33])
def test_int4_pack_round_trip(k):
    rng = np.random.default_rng(k)
    q = rng.integers(-8, 8, size=(3, k)).astype(np.int8)
    q[0, : min(k, 16)] = np.arange(-8, 8)[: min(k, 16)]  # every code appears when k allows
    p = pack_int4_np(q)
    assert p.dtype == np.uint8 and p.shape == (3, (k + 1) // 2)
    assert_exact(unpack_int4_np(p, k), q, "numpy unpack(pack(q))")
    pt = pack_int4_torch(torch.from_numpy(q))
    assert_exact(pt, p, "torch vs numpy packed bytes")
    assert_exact(unpack_int4_torch(pt, k), q, "torch unpack(pack(q))")


def test_int4_pack_layout_and_range_error():
    # element 0 -> low nibble, element 1 -> high nibble, two's complement: [1, -1] -> 0xF1, [-8, 7] -> 0x78
    assert_exact(pack_int4_np(np.array([1, -1, -8, 7], np.int8)), np.array([0xF1, 0x78], np.uint8), "layout")
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_np(np.array([8], np.int8))


def test_weight_bytes_counts_payload_and_params():
    # (3, 6) int4 in groups of 3: 3 rows * 3 packed bytes + 6 fp32 scales; asymmetric adds 6 int8 zero points.
    assert weight_bytes((3, 6), QScheme(bits=4, granularity="group", group_size=3)) == 9 + 24
    assert weight_bytes((3, 6), QScheme(bits=4, symmetric=False, granularity="group", group_size=3)) == 9 + 24 + 6
    # odd K pads each row to a whole byte, exactly what pack_int4 stores
    q = np.zeros((4, 7), np.int8)
    assert weight_bytes((4, 7), QScheme(bits=4)) == pack_int4_np(q).nbytes + 4


@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (576, 1536)])
def test_weight_bytes_ratios(shape):
    w8 = weight_bytes(shape, QScheme(granularity="channel"))
    w4 = weight_bytes(shape, QScheme(bits=4, symmetric=False, granularity="group", group_size=128))
    # W8 per channel: 1/4 + 1/K; W4 g128 asymmetric: 1/8 + 5/(4*128) -- the budgets are 0.27 and 0.16
    assert w8 / fp32_bytes(shape) <= 0.27
    assert w4 / fp32_bytes(shape) <= 0.16
    assert w8 == shape[0] * shape[1] + 4 * shape[0]
