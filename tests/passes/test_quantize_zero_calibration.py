"""Static W8A8 calibrated on inputs that are 0 for a layer: its scale cannot represent any other input (all-zero
calibration gave 0.7 dB on the example with no word of why). The pass warns naming the layers and lists them in
its stats; calibration that sees real values does neither."""
import warnings

import pytest
import torch

import slimfx
from slimfx import passes as P


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval()


def test_all_zero_calibration_warns_naming_the_layer():
    m, x = _model(), torch.randn(4, 64)
    with pytest.warns(RuntimeWarning, match=r"input of 1 layer\(s\) \(0\) was 0 on every calibration batch"):
        cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="static")],
                            calibration=[(torch.zeros(4, 64),)], backend="torch", progress=False)
    assert cm.report().records[0].stats["zero_input_range"] == ["0"]


def test_real_calibration_does_not_warn():
    m, x = _model(), torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="static")],
                            calibration=[(torch.randn(4, 64),)], backend="torch", progress=False)
    assert "zero_input_range" not in cm.report().records[0].stats


def test_calibration_far_narrower_than_the_example_warns_with_the_ratio():
    # calibrated on inputs a tenth the example's size: the example saturates at ~1/10 of its range (SQNR falls)
    m, x = _model(), torch.randn(4, 64)
    with pytest.warns(RuntimeWarning, match=r"the input of 2 layer\(s\) reaches past the range calibrated for it "
                                            r"\(0 \d+(\.\d+)?x, 2 \d+(\.\d+)?x\)"):
        cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="static")],
                            calibration=[(0.1 * torch.randn(4, 64),)], backend="torch", progress=False)
    past = cm.report().records[0].stats["example_past_range"]
    assert set(past) == {"0", "2"} and all(v > 5 for v in past.values()), past


def test_calibration_including_the_example_does_not_warn():
    m, x = _model(), torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="static")],
                            calibration=[(0.1 * torch.randn(4, 64),), (x,)], backend="torch", progress=False)
    assert "example_past_range" not in cm.report().records[0].stats


def test_a_clipping_observer_does_not_warn_about_the_outliers_it_clips():
    # the percentile observer cuts the top 0.01% on purpose: one outlier in the example is its choice, not a
    # calibration far narrower than the inputs
    m, x = _model(), torch.randn(1024, 64)
    x[0, 0] = 40.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="static", observer="percentile")],
                            calibration=[(x,)], backend="torch", progress=False)
    assert "example_past_range" not in cm.report().records[0].stats
