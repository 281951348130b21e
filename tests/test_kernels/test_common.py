"""_common: the measured choice between a kernel's implementations ("auto"), the int8 -> fp32 conversion."""
import pytest
import torch
import triton
import triton.language as tl
import triton.testing

from slimfx.kernels import _common as C


@triton.jit
def _convert(w_ptr, out_ptr, FAST: tl.constexpr):
    r = tl.arange(0, 256)
    tl.store(out_ptr + r, C.int8_to_f32(tl.load(w_ptr + r), FAST))


@pytest.mark.parametrize("fast", [False, True])
def test_int8_to_f32_is_exact_for_every_value(dev, fast):
    w = torch.arange(-128, 128, dtype=torch.int8, device=dev)
    out = torch.empty(256, dtype=torch.float32, device=dev)
    _convert[(1,)](w, out, FAST=fast)
    assert torch.equal(out.cpu(), torch.arange(-128, 128, dtype=torch.float32))


@pytest.fixture
def measured(monkeypatch):
    """fastest() as on a GPU, with do_bench returning each candidate's made-up time (calls counted)."""
    monkeypatch.setattr(C, "interpreting", lambda: False)
    monkeypatch.setattr(C, "_FASTEST", {})
    calls = []

    def fake_bench(fn, warmup=0, rep=0):
        calls.append(fn)
        return fn()
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    return calls


def test_picks_the_fastest_once(measured):
    cands = {"tiled": lambda: 0.30, "tma": lambda: 0.21}
    assert C.fastest("fam", (1, 2), cands, "tiled") == "tma"
    assert C.fastest("fam", (1, 2), cands, "tiled") == "tma"
    assert len(measured) == 2                           # timed once per (family, key), not per call
    chosen, times, errors = C.fastest_choices()[("fam", (1, 2))]
    assert chosen == "tma" and times == {"tiled": 0.30, "tma": 0.21} and errors == {}


def test_a_candidate_that_fails_is_skipped(measured):
    def broken():
        raise RuntimeError("out of resources: shared memory\nmore")
    assert C.fastest("fam", (3,), {"tma": broken, "tiled": lambda: 0.5}, "tma") == "tiled"
    assert C.fastest_choices()[("fam", (3,))][2] == {"tma": "RuntimeError: out of resources: shared memory"}
    with pytest.raises(RuntimeError, match=r"fam: no implementation ran for \(4,\)"):
        C.fastest("fam", (4,), {"tma": broken, "also": broken}, "tma")


def test_a_candidate_that_disagrees_is_never_chosen(measured):
    """With ``output``, every candidate's result must equal the default's bit for bit; the fast wrong one
    is skipped, and the reason recorded."""
    import torch
    out = torch.zeros(4)

    def write(value, ms):
        def fn():
            out.fill_(value)
            out[0] = value
            return ms
        return fn
    cands = {"tma": write(1.0, 0.1), "tiled": write(1.0, 0.5), "fast_wrong": write(2.0, 0.01)}
    assert C.fastest("fam", (6,), cands, "tiled", output=out) == "tma"
    assert C.fastest_choices()[("fam", (6,))][2] == {"fast_wrong": "differs from tiled in 4 elements"}


def test_interpreter_takes_the_default(monkeypatch):
    monkeypatch.setattr(C, "interpreting", lambda: True)
    assert C.fastest("fam", (5,), {"a": lambda: 1.0, "b": lambda: 0.1}, "a") == "a"
