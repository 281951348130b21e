"""apply_rules regenerates the module's code once, when a rule matched: torch's replace_pattern regenerates it
after every pattern tried, matched or not (tens of times per Fuse, ~70 ms each on a 32-layer graph). The code
it leaves still computes the rewritten graph."""
import pytest
import torch
import torch.fx as fx

from slimfx import ir


class _M(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0


@pytest.fixture
def recompiles(monkeypatch):
    calls = []
    real = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: calls.append(self) or real(self))
    return calls


def _gm():
    return ir.capture(_M(), (torch.randn(3, 5),), {}).gm


def test_rules_that_match_nothing_leave_the_code_alone(recompiles):
    gm = _gm()
    code = gm.code
    rules = [ir.Rule("sigmoid => tanh", lambda x: torch.sigmoid(x), lambda x: torch.tanh(x)),
             ir.Rule("neg => abs", lambda x: torch.neg(x), lambda x: torch.abs(x))]
    recompiles.clear()
    assert ir.apply_rules(gm, rules) == {}
    assert [g for g in recompiles if g is gm] == [] and gm.code == code


def test_matched_rules_recompile_once_and_the_code_runs_the_new_graph(recompiles):
    gm, x = _gm(), torch.randn(3, 5)
    rules = [ir.Rule("relu => neg", lambda x: torch.relu(x), lambda x: torch.neg(x)),
             ir.Rule("sigmoid => tanh", lambda x: torch.sigmoid(x), lambda x: torch.tanh(x)),
             ir.Rule("neg => abs", lambda x: torch.neg(x), lambda x: torch.abs(x))]
    recompiles.clear()
    assert ir.apply_rules(gm, rules) == {"relu => neg": 1, "neg => abs": 1}
    assert len([g for g in recompiles if g is gm]) == 1
    assert "recompile" not in gm.__dict__            # the class's method again
    out = gm(x)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, x.abs() * 2.0)
