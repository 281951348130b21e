"""Comparison helpers for kernel tests: exact integer checks and dtype-justified float tolerances."""
import numpy as np
import torch

# Unit roundoff of each output dtype: the final cast alone may move a value by this much (relative).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def assert_exact(out: torch.Tensor, ref: np.ndarray) -> None:
    """Integer outputs: atol = 0. The failure message shows the first mismatching elements."""
    got = out.cpu().numpy()
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    bad = np.argwhere(got != ref)
    assert bad.size == 0, (f"{len(bad)} of {ref.size} elements differ; first: "
                           + ", ".join(f"{tuple(i)}: {got[tuple(i)]} vs {ref[tuple(i)]}" for i in bad[:5]))


def assert_close(out: torch.Tensor, ref: np.ndarray, rtol: float, atol: float) -> None:
    """|out - ref| <= atol + rtol * |ref| elementwise, with the worst elements in the message."""
    got = out.detach().cpu().float().numpy().astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    err = np.abs(got - ref) - (atol + rtol * np.abs(ref))
    bad = np.argwhere(err > 0)
    assert bad.size == 0, (f"{len(bad)} of {ref.size} elements out of tolerance (rtol={rtol}, atol={atol}); "
                           "worst: " + ", ".join(f"{tuple(i)}: {got[tuple(i)]} vs {ref[tuple(i)]}"
                                                 for i in bad[np.argsort(-err[tuple(bad.T)])][:5]))


def assert_cast_equal(out: torch.Tensor, ref_fp32: np.ndarray) -> None:
    """The kernel computed the reference's fp32 value and cast it: the cast results must be identical."""
    want = torch.from_numpy(np.ascontiguousarray(ref_fp32, dtype=np.float32)).to(out.dtype)
    assert_exact(out.cpu().view(torch.int16 if out.element_size() == 2 else torch.int32),
                 want.view(torch.int16 if out.element_size() == 2 else torch.int32).numpy())


def sqnr_db(x: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    noise = np.asarray(x, dtype=np.float64) - ref
    return float(10 * np.log10(np.sum(ref * ref) / max(np.sum(noise * noise), 1e-300)))


def rand_int8(gen, *shape) -> torch.Tensor:
    """Symmetric int8 values in [-127, 127]."""
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
