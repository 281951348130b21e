"""Function passes (which parameter takes the PassContext, functools.partial) and the pass registry's names."""
import dataclasses
import functools
from typing import Optional

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.passes import PASSES, FunctionPass, Pass, PassContext, PassResult, Quantize, register_pass
from slimfx.passes.cleanup import DCE
from slimfx.passes.fuse import FuseLinearAct


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


X = (torch.randn(5, 8),)


def record(net, p):
    return slimfx.compile(net, X, passes=[p], progress=False).report().records[0]


def scale(gm, factor=2.0):
    return PassResult(gm, False, {"factor": factor})


@pytest.fixture
def registry():
    """PASSES as it was before the test: the names a test registers go again."""
    before = dict(PASSES)
    yield
    for key in set(PASSES) - set(before):
        PASSES.pop(key)
    PASSES.update(before)


def test_a_partial_binds_options_and_keeps_the_functions_name(net, registry):
    rec = record(net, functools.partial(scale, factor=3.0))
    assert (rec.name, rec.stats) == ("scale", {"factor": 3.0})
    register_pass(functools.partial(scale, factor=5.0))                 # named after the function too
    assert record(net, "scale").stats == {"factor": 5.0}


def test_a_defaulted_second_parameter_keeps_its_default_not_the_context(net):
    """`def scale(gm, factor=2.0)` got the PassContext as factor. The rule: a parameter named ctx or annotated
    PassContext takes it (wherever it is), else the second positional one if it has no default."""
    assert record(net, scale).stats == {"factor": 2.0}

    def context(gm, context):
        return PassResult(gm, False, {"got": type(context).__name__})

    def ctx_defaulted(gm, ctx=None):
        return PassResult(gm, False, {"got": type(ctx).__name__})

    def ctx_after_an_option(gm, factor=2.0, ctx=None):
        return PassResult(gm, False, {"got": type(ctx).__name__, "factor": factor})

    def annotated(gm, c: Optional[PassContext] = None):
        return PassResult(gm, False, {"got": type(c).__name__})

    def annotated_str(gm, c: "PassContext" = None):
        return PassResult(gm, False, {"got": type(c).__name__})

    got = {f.__name__: record(net, f).stats for f in (context, ctx_defaulted, ctx_after_an_option, annotated,
                                                      annotated_str)}
    assert got == {"context": {"got": "PassContext"}, "ctx_defaulted": {"got": "PassContext"},
                   "ctx_after_an_option": {"got": "PassContext", "factor": 2.0},
                   "annotated": {"got": "PassContext"}, "annotated_str": {"got": "PassContext"}}


def test_keyword_only_and_variadic_parameters_are_not_the_context(net):
    def kwonly(gm, *, verbose=False):
        return PassResult(gm, False, {"verbose": verbose})

    def kwonly_ctx(gm, *, ctx, verbose=False):                 # named ctx: it takes it, by keyword
        return PassResult(gm, False, {"got": type(ctx).__name__, "verbose": verbose})

    def variadic(gm, *args, **kwargs):
        return PassResult(gm, False, {"args": len(args) + len(kwargs)})

    assert record(net, kwonly).stats == {"verbose": False}
    assert record(net, functools.partial(kwonly, verbose=True)).stats == {"verbose": True}
    assert record(net, kwonly_ctx).stats == {"got": "PassContext", "verbose": False}
    assert record(net, variadic).stats == {"args": 0}


def test_a_function_pass_it_cannot_call_is_refused_naming_the_parameter(net):
    def two_options(gm, ctx, factor):
        return gm
    with pytest.raises(TypeError, match=r"function pass 'two_options': parameter 'factor' has no default"):
        slimfx.compile(net, X, passes=[two_options], progress=False)
    with pytest.raises(TypeError, match="must be callable, got int 3"):
        FunctionPass(3)
    with pytest.raises(TypeError, match="register_pass takes a Pass subclass.*got str 'dce'"):
        register_pass("dce")


def test_a_subclass_of_a_builtin_pass_gets_its_own_name(net, registry):
    """MyQuant(Quantize) was "quantize": the reports said so and register_pass(MyQuant) collided with it."""
    @dataclasses.dataclass
    class MyQuant(Quantize):
        pass

    @dataclasses.dataclass
    class Named(Quantize):
        name = "named_quant"

    assert (MyQuant().pass_name, Named().pass_name) == ("MyQuant", "named_quant")
    assert [p().pass_name for p in (Quantize, DCE, FuseLinearAct)] == ["quantize", "dce", "fuse_linear_act"]
    register_pass(MyQuant)
    assert PASSES["my_quant"] is MyQuant and PASSES["quantize"] is Quantize
    rec = record(net, "my_quant")
    assert rec.name == "my_quant" and rec.stats["layers"] == 2


def test_registering_a_configured_pass_again_under_its_name_replaces_it(net, registry):
    """register_pass(Quantize(weights="int8"), name="q8") in a notebook cell run twice raised AttributeError."""
    for _ in range(2):
        register_pass(Quantize(weights="int8"), name="q8")
        register_pass(functools.partial(scale, factor=3.0), name="scale3")
    rec = record(net, "q8")
    assert rec.name == "q8" and rec.stats["layers"] == 2
    assert record(net, "scale3").stats == {"factor": 3.0}
    # another pass under a taken name is refused, naming the name and both passes
    with pytest.raises(ValueError, match=r"'q8' is already registered \(Quantize\(weights='int8'.*"
                                         r"so Quantize\(weights='int4'.*cannot take it"):
        register_pass(Quantize(weights="int4"), name="q8")
    with pytest.raises(ValueError, match=r"'scale3' is already registered \(functools.partial\(.*scale, "
                                         r"factor=3.0\)\), so functools.partial\(.*scale, factor=4.0\)"):
        register_pass(functools.partial(scale, factor=4.0), name="scale3")
    with pytest.raises(ValueError, match=r"'q8' is already registered .* so .*\.scale cannot take it"):
        register_pass(scale, name="q8")


def test_a_registered_pass_with_required_options_used_by_name_says_which(net, registry):
    """It raised the dataclass's bare TypeError ('__init__() missing 1 required positional argument')."""
    import dataclasses

    @dataclasses.dataclass
    class NeedsFactor(Pass):
        factor: float

        def run(self, gm, ctx):
            return PassResult(gm, False, {})

    register_pass(NeedsFactor)
    for entry, given in (("needs_factor", "name"), (NeedsFactor, "class")):
        with pytest.raises(TypeError, match=rf"\(NeedsFactor\) has required options \['factor'\]: put an instance in "
                                            rf"the pipeline, NeedsFactor\(factor=...\), not its {given}"):
            slimfx.compile(net, X, passes=[entry], progress=False)
