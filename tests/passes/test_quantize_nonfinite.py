"""Quantize with a layer whose weight holds NaN or inf: the layer is skipped with the reason (as Prune skips it),
the others are quantized; where a calibrated layer's input is non-finite because of that weight, the error names
the layer whose weight it is, not the calibration data."""
import pytest
import torch

import slimfx
from slimfx import passes as P


class MLP(torch.nn.Module):
    def __init__(self, bad: float):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(64, 96), torch.nn.Linear(96, 32)
        with torch.no_grad():
            self.a.weight[3, 4] = bad

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", [None, "dynamic"])
def test_nonfinite_weight_layer_skipped_with_the_reason(bad, act):
    m, x = MLP(bad).eval(), torch.randn(4, 64)
    cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations=act)], backend="torch",
                        progress=False)
    stats = cm.report().records[0].stats
    assert stats["skipped"] == {"a": "weight holds NaN or inf"}, stats
    assert stats["layers"] == 1
    layers = {r["module"]: r for r in cm.report().quant_layers()}
    assert set(layers) == {"b"}
    assert layers["b"]["sqnr_db"] is None       # its input holds NaN on the example: not measured


def test_calibrated_layer_after_a_nonfinite_weight_names_that_layer():
    m, x = MLP(float("nan")).eval(), torch.randn(4, 64)
    with pytest.raises(Exception, match=r"holds \d+ NaN/Inf value\(s\); it comes from the weight\(s\) of \['a'\]"):
        slimfx.compile(m, (x,), passes=[P.Quantize(weights="int4", group_size=32, method="gptq")],
                       calibration=[(torch.randn(4, 64),) for _ in range(2)], backend="torch", progress=False)


def test_nonfinite_calibration_data_still_blamed_on_the_data():
    m, x = MLP(0.5).eval(), torch.randn(4, 64)
    cal = [(torch.randn(4, 64),) for _ in range(2)]
    cal[1][0][0, 0] = float("nan")
    with pytest.raises(Exception, match="check the calibration data"):
        slimfx.compile(m, (x,), passes=[P.Quantize(weights="int8", activations="static")], calibration=cal,
                       backend="torch", progress=False)
