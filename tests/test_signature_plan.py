"""The input check works out each compiled input's dims once (printing SymInts on every call was most of its
time per decode step), and again when the capture's shape environment fixes a symbol after that (a pass's guard
between the calibration batches' check and the compiled model's calls): the fixed dim is then refused."""
import pytest
import torch

import slimfx
from slimfx.signature import InputSignature


class _Twice(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_a_symbol_fixed_after_the_first_check_is_refused_at_the_next():
    x = torch.randn(2, 6)
    cap = slimfx.capture(_Twice().eval(), (x,), {}, dynamic=True)
    sig = InputSignature.from_capture(cap.model, cap.captured)
    sig.check((torch.randn(2, 9),), {})                  # dynamic: any length
    exp = sig.leaves[0][1]
    assert bool(exp.shape[1] == 6)                       # a guard on the hint: the symbol becomes 6
    with pytest.raises(slimfx.InputError, match=r"'x' dim 1 is 9, but it was compiled static at 6"):
        sig.check((torch.randn(2, 9),), {})
    sig.check((torch.randn(3, 6),), {})
