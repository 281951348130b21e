"""Weight scale search (slimfx.quant.clip): each slot's scale is the grid ratio with the least weighted error
(checked against every ratio of the grid in float64), never worse than absmax, better on heavy tails; the
slots nothing weighs keep absmax; the refusals."""
import pytest
import torch

from slimfx.quant import QScheme, dequantize_tensor_torch, qparams_torch, quantize_tensor_torch
from slimfx.quant.clip import GRID, MIN_RATIO, search_qparams_torch

GROUP = QScheme(bits=4, granularity="group", group_size=32)
CHANNEL = QScheme(bits=8, granularity="channel", axis=0)
INT4_CHANNEL = QScheme(bits=4, granularity="channel", axis=0)


def heavy_tailed(n, k, seed=0):
    """Student-t-like weights: a few large entries per row, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / torch.rand(n, k, generator=g).clamp(min=0.05).sqrt()


def weighted_errors(w, scheme, qp, h):
    """float64 error per (row, slot) of w under qp, weighted by h per column."""
    dq = dequantize_tensor_torch(quantize_tensor_torch(w, scheme, qp), scheme, qp).double()
    e = (dq - w.double()).square() * h.double()
    n, k = w.shape
    width = scheme.group_size if scheme.granularity == "group" else k
    return e.reshape(n, k // width, width).sum(-1)


@pytest.mark.parametrize("scheme", [GROUP, CHANNEL, INT4_CHANNEL], ids=["int4 g32", "int8 channel", "int4 channel"])
@pytest.mark.parametrize("weighted", [False, True])
def test_chosen_scale_is_the_grid_minimum(scheme, weighted):
    n, k = 7, 96                                   # odd rows; K three groups
    w = heavy_tailed(n, k)
    h = torch.rand(k, generator=torch.Generator().manual_seed(1)) ** 4 if weighted else torch.ones(k)
    qp = search_qparams_torch(w, scheme, h if weighted else None)
    base = qparams_torch(w, scheme)
    assert qp.scale.shape == base.scale.shape and torch.equal(qp.zero_point, base.zero_point)
    ratio = (qp.scale / base.scale).reshape(-1)
    assert bool((ratio <= 1).all()) and bool((ratio >= MIN_RATIO * (1 - 1e-6)).all())
    got = weighted_errors(w, scheme, qp, h)
    for i in range(GRID + 1):                      # no ratio of the grid does better (fp32 sums: 1e-5 relative)
        r = 1.0 - (1.0 - MIN_RATIO) * i / GRID
        alt = base._replace(scale=base.scale * r)
        assert bool((got <= weighted_errors(w, scheme, alt, h) * (1 + 1e-5) + 1e-12).all()), f"ratio {r}"
    absmax = weighted_errors(w, scheme, base, h)
    assert float(got.sum()) <= float(absmax.sum())
    if scheme.bits == 4:   # 15 levels: clipping pays in most slots (measured: total error 0.52-0.91x of absmax's)
        assert float(got.sum()) < 0.95 * float(absmax.sum())
        assert int((ratio < 1).sum()) > ratio.numel() // 2


def test_weights_nobody_reads_keep_absmax_and_zero_rows_stay_finite():
    w = heavy_tailed(5, 64)
    w[3] = 0.0
    h = torch.ones(64)
    h[:32] = 0.0                                    # the first group of every row meets no input
    qp = search_qparams_torch(w, GROUP, h)
    base = qparams_torch(w, GROUP)
    assert torch.equal(qp.scale[:, 0], base.scale[:, 0])        # every ratio ties at 0 error: the largest
    assert bool(torch.isfinite(qp.scale).all()) and bool((qp.scale > 0).all())
    q = quantize_tensor_torch(w, GROUP, qp)
    assert int(q[3].abs().max()) == 0


def test_refusals():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="symmetric uniform"):
        search_qparams_torch(w, QScheme(kind="log", bits=4, granularity="channel", axis=0))
    with pytest.raises(ValueError, match="symmetric uniform"):
        search_qparams_torch(w, QScheme(bits=8, symmetric=False, granularity="channel", axis=0))
    with pytest.raises(ValueError, match="per output channel or per group"):
        search_qparams_torch(w, QScheme(bits=8, granularity="tensor"))
    with pytest.raises(ValueError, match=r"importance must have shape \(64,\)"):
        search_qparams_torch(w, GROUP, torch.ones(63), name="weight of l1")
    with pytest.raises(ValueError, match="grid"):
        search_qparams_torch(w, GROUP, grid=0)
