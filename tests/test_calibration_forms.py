"""The forms inputs come in: calibration batches as any mapping of keyword arguments (a tokenizer's
BatchEncoding); one batch given as the whole calibration set refused before the capture, naming the fix; and the
compiled model's input check naming an input's first dim that does not fit."""
import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.passes import Quantize
from test_api_checks import MLP


class Cat0(nn.Module):
    """y's batch is recorded as 2*s (x's batch s, twice): a derived dim before y's other, plain, dims."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.l(torch.cat([x, x], 0)) + y


@pytest.fixture
def no_capture(monkeypatch):
    def capture(*a, **k):
        raise AssertionError("captured before the arguments were checked")
    monkeypatch.setattr(slimfx.ir, "capture", capture)


# --- calibration= ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("calibration, match", [
    (dict(x=torch.randn(2, 8)), r"calibration is one batch \(a mapping of inputs \['x'\]\); pass a list of "
                                r"batches: calibration=\[batch\]"),
    ("batch_encoding", r"calibration is one batch \(a mapping of inputs \['x'\]\)"),
    (torch.randn(2, 8), r"calibration is one tensor \(of shape \(2, 8\)\), which would be read as one batch per "
                        r"row; pass a list of batches: calibration=\[x\] \(list\(x\) for its rows\)"),
], ids=["dict", "BatchEncoding", "tensor"])
def test_one_batch_as_the_calibration_set_is_refused_before_capture(no_capture, calibration, match):
    """Iterated, a dict gave its keys as batches and a tensor its rows: the pass failed later, saying a batch
    missed an input the user had given."""
    if calibration == "batch_encoding":
        from transformers import BatchEncoding
        calibration = BatchEncoding({"x": torch.randn(2, 8)})
    with pytest.raises(TypeError, match=match):
        slimfx.compile(MLP(), (), dict(x=torch.randn(2, 8)), passes=[Quantize(activations="static")],
                       calibration=calibration, progress=False)


def test_a_batch_encoding_batch_is_keyword_arguments():
    """A tokenizer's BatchEncoding is a Mapping, not a dict: it was passed whole as the first positional input."""
    from transformers import BatchEncoding
    m, xs = MLP().eval(), [torch.randn(4, 8) for _ in range(2)]
    as_dict, as_encoding = (slimfx.compile(m, (), dict(x=xs[0]), passes=[Quantize(activations="static")],
                                           calibration=[wrap(x=x) for x in xs], backend="torch", progress=False)
                            for wrap in (dict, lambda **kw: BatchEncoding(kw)))
    torch.testing.assert_close(as_encoding(x=xs[0]), as_dict(x=xs[0]), rtol=0, atol=0)    # same ranges, same ints
    assert as_encoding.report().records[0].stats["layers"] == 2


# --- the compiled model's input check ----------------------------------------------------------------------------

def test_the_first_dim_that_does_not_fit_is_named():
    """y differs from the compiled shape in dims 0 (2*s, a derived dim) and 1: dim 0 is named, as a static or a
    plain dynamic dim 0 would be, not dim 1 (derived dims were all checked after every other dim)."""
    cm = slimfx.compile(Cat0().eval(), (torch.randn(2, 3, 4), torch.randn(4, 3, 4)), dynamic=True, backend="torch",
                        progress=False)
    assert cm(torch.randn(3, 5, 4), torch.zeros(6, 5, 4)).shape == (6, 5, 4)
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 0 is 5, but the model needs it to be 2\*s\w+ = 4 "
                                                r"\(s\w+ = 2 from 'x' dim 0\)"):
        cm(torch.randn(2, 5, 4), torch.zeros(5, 7, 4))
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 1 is 7, but 'x' dim 1 is 5"):
        cm(torch.randn(2, 5, 4), torch.zeros(4, 7, 4))


def test_sensitivity_refuses_one_batch_before_capture(no_capture):
    """sensitivity took list(calibration): a dict gave its keys as batches (a late, misleading error)."""
    with pytest.raises(TypeError, match=r"calibration is one batch \(a mapping of inputs \['x'\]\)"):
        slimfx.passes.sensitivity(MLP(), (), dict(x=torch.randn(2, 8)), Quantize(activations="static"),
                                  calibration=dict(x=torch.randn(2, 8)))


class _IndexedByBatch(nn.Module):
    def forward(self, x, m):             # m's rows picked by x's batch (transformers' mask indexing does this)
        return x * m[torch.arange(x.shape[0])]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_a_failure_inside_the_graph_names_dims_the_example_had_equal(backend):
    """Export gave m's batch a symbol of its own (no tie to x's), so a call with different batches passed the
    input check and failed deep inside ("index 1 is out of bounds"; a mask of batch 1 for ids of batch 2 on
    MiniLM). The error now carries a note naming the dims that were equal in the example and differ now."""
    cm = slimfx.compile(_IndexedByBatch(), (torch.randn(2, 3), torch.randn(2, 3)), dynamic=True, backend=backend,
                        progress=False)
    with pytest.raises(Exception) as e:
        cm(torch.randn(2, 3), torch.randn(1, 3))
    assert any("'x' dim 0 is 2, 'm' dim 0 is 1, which were all 2 in the example inputs" in n
               for n in getattr(e.value, "__notes__", [])), e.value
    assert cm(torch.randn(2, 3), torch.ones(3, 3)).shape == (2, 3)       # m longer: the graph runs it
