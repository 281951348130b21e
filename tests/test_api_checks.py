"""compile's and the compiled model's argument checks: clear errors naming the argument, before the expensive work;
inference-tensor models; dims export ties to others by an expression; with_backend's own copy of the state."""
import re

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.passes import PassError

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class Cat(nn.Module):
    """y's length is recorded as 2*s (x's length s, twice): a derived dim."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.l(torch.cat([x, x], 1)) + y


class CatYFirst(Cat):
    """The derived dim comes first in the call: checked once x has bound its symbol."""

    def forward(self, y, x):
        return super().forward(x, y)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.l(x) * self.count


# --- inference tensors (made under torch.inference_mode) keep no version counter -------------------------------

def test_inference_tensor_model_compiles_with_passes():
    x = torch.randn(2, 8)
    with torch.inference_mode():
        m = MLP().eval()
        cm = slimfx.compile(m, (x,), passes=["dce"], progress=False)
        want = m(x)
    torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-6)     # float32 numpy vs torch: rounding only


def test_inference_tensor_written_in_place_is_still_caught():
    def doubles_weight(gm):
        w = getattr(gm, next(n for n in gm.graph.nodes if n.target is aten.linear.default).args[1].target)
        w.mul_(2)

    with torch.inference_mode():
        m = MLP().eval()
        with pytest.raises(PassError, match="wrote into tensors in place"):
            slimfx.compile(m, (torch.randn(2, 8),), passes=[doubles_weight], progress=False)


# --- derived dims (2*s) checked against the symbols the other inputs bind -----------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_derived_dim_mismatch_names_the_input(backend):
    cm = slimfx.compile(Cat().eval(), (torch.randn(2, 3, 4), torch.randn(2, 6, 4)), dynamic=True, backend=backend,
                        progress=False)
    assert cm(torch.randn(2, 5, 4), torch.zeros(2, 10, 4)).shape == (2, 10, 4)
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 1 is 7, but the model needs it to be 2\*s\w+ = 10 "
                                                r"\(s\w+ = 5 from 'x' dim 1\)"):
        cm(torch.randn(2, 5, 4), torch.zeros(2, 7, 4))


def test_derived_dim_before_the_input_that_binds_it():
    cm = slimfx.compile(CatYFirst().eval(), (torch.randn(2, 6, 4), torch.randn(2, 3, 4)), dynamic=True,
                        backend="torch", progress=False)
    assert cm(torch.zeros(2, 10, 4), torch.randn(2, 5, 4)).shape == (2, 10, 4)
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 1 is 7, .* = 10"):
        cm(torch.zeros(2, 7, 4), torch.randn(2, 5, 4))


def test_loaded_model_checks_derived_dims(tmp_path):
    cm = slimfx.compile(Cat().eval(), (torch.randn(2, 3, 4), torch.randn(2, 6, 4)), dynamic=True, backend="torch",
                        progress=False)
    loaded = slimfx.load(cm.save(tmp_path / "cat"))
    x, y = torch.randn(2, 5, 4), torch.randn(2, 10, 4)
    torch.testing.assert_close(loaded(x, y), cm(x, y), rtol=0, atol=0)    # same graph, same backend: bit for bit
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 1 is 7, .* = 10"):
        loaded(x, torch.zeros(2, 7, 4))


def test_derived_dim_no_other_input_binds_is_solved_for():
    """A dim 2*s + 1 whose s no other input binds: s is solved for, and must be an integer in its range."""
    import inspect

    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from slimfx.signature import InputSignature
    env = ShapeEnv()
    s = env.create_symbol(3, ConstantSource("s"), dynamic_dim=DimDynamic.DYNAMIC)
    with FakeTensorMode(shape_env=env):
        y = torch.empty([2 * env.create_symintnode(s, hint=3) + 1, 4])
    P = inspect.Parameter
    sig = InputSignature("M", inspect.Signature([P("y", P.POSITIONAL_OR_KEYWORD)]), ["y"], [], [("y", y)], None,
                         {str(s): (2, 10)})
    sig.check((torch.zeros(7, 4),), {})
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 0 is 8, but the model needs it to be 2\*s\w+ \+ 1 "
                                                r"for an integer"):
        sig.check((torch.zeros(8, 4),), {})
    with pytest.raises(slimfx.InputError, match=r"input 'y' dim 0 is 25: as 2\*s\w+ \+ 1 that makes s\w+ = 12, "
                                                r"outside its compiled range \[2, 10\]"):
        sig.check((torch.zeros(25, 4),), {})


# --- with_backend: the sibling's own copy of the state, from the original's now ----------------------------------

@pytest.mark.parametrize("first, second", [("numpy", "torch"), ("torch", "numpy"), ("numpy", "numpy")])
def test_with_backend_copies_the_state(first, second):
    m, x = Counter().eval(), torch.randn(2, 4)
    cm = slimfx.compile(m, (x,), backend=first, progress=False)
    base = cm(x)                                   # count 1
    cm(x)                                          # count 2
    count = lambda out: round(float((out / base).mean()), 3)   # noqa: E731 - each output is base * count
    sibling = cm.with_backend(second)
    assert count(sibling(x)) == 3                  # from the original's state as it was
    assert count(sibling(x)) == 4
    assert count(cm(x)) == 3                       # the original's own state, not advanced by the sibling's calls
    assert sibling.graph is not cm.graph and float(cm.graph.count) == 3 and float(sibling.graph.count) == 4
    assert float(m.count) == 0                     # nor the model's


# --- arguments refused at once, naming them, before the capture ------------------------------------------------

@pytest.fixture
def no_capture(monkeypatch):
    def capture(*a, **k):
        raise AssertionError("captured before the arguments were checked")
    monkeypatch.setattr(slimfx.ir, "capture", capture)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(calibration=5), TypeError, "calibration must be an iterable of inputs.*got int"),
    (dict(passes=None), TypeError, r"passes must be a pipeline.*passes=\(\) for none.*got None"),
    (dict(passes=3), TypeError, "passes must be a pipeline.*got 3"),
    (dict(backend="torch", backend_options=[1]), TypeError, r"backend_options must be a dict.*got list \[1\]"),
])
def test_bad_argument_named_before_capture(no_capture, kwargs, error, match):
    with pytest.raises(error, match=match):
        slimfx.compile(MLP(), (torch.randn(2, 8),), progress=False, **kwargs)


def test_dump_dir_that_is_a_file_refused_before_capture(no_capture, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for where in (f, f / "below"):
        with pytest.raises(ValueError, match=f"dump_dir '{re.escape(str(where))}' cannot be a folder: "
                                             f"'{re.escape(str(f))}' is a file"):
            slimfx.compile(MLP(), (torch.randn(2, 8),), dump_dir=str(where), progress=False)


def test_meta_model_or_input_refused_before_capture(no_capture):
    with pytest.raises(ValueError, match=r"the model's 'l1.weight' \(and 3 more\) is on the meta device"):
        slimfx.compile(MLP().to("meta"), (torch.randn(2, 8),), progress=False)
    with pytest.raises(ValueError, match="example input 'x' is on the meta device"):
        slimfx.compile(MLP(), (), {"x": torch.randn(2, 8, device="meta")}, progress=False)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_meta_input_at_call_names_the_input(backend):
    cm = slimfx.compile(MLP(), (torch.randn(2, 8),), backend=backend, progress=False)
    with pytest.raises(slimfx.InputError, match="input 'x' is on the meta device"):
        cm(torch.randn(2, 8, device="meta"))


def test_a_function_given_as_the_model_is_refused_as_before():
    """compile's argument checks ran model.named_parameters() before capture said it takes Modules only."""
    with pytest.raises(slimfx.CaptureError, match="slimfx captures torch.nn.Module objects, got function"):
        slimfx.compile(lambda x: x + 1, (torch.ones(2),), progress=False)
