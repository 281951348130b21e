import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx import ir
from slimfx.passes import PASSES, Pass, PassResult, Rewrite, register_pass

aten = torch.ops.aten


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


X = (torch.randn(5, 8),)


def gelu_tanh(gm):
    """The README's custom pass: GELU becomes its tanh approximation."""
    for node in gm.graph.nodes:
        if node.target is aten.gelu.default:
            node.kwargs = {"approximate": "tanh"}


def test_custom_function_pass_runs_through_compile(net):
    cm = slimfx.compile(net, X, passes=[gelu_tanh], progress=False)
    rec = cm.report().records[0]
    assert rec.name == "gelu_tanh" and rec.modified       # found by comparing the graph, not claimed
    with torch.no_grad():
        want = net.b(F.gelu(net.a(X[0]), approximate="tanh"))
    assert torch.allclose(cm(*X), want, atol=1e-6, rtol=0)   # fp32, same formula, numpy vs torch order
    # tanh-GELU differs from erf-GELU by < 1e-3: measurable but small
    assert 40 < rec.sqnr_db < math.inf


def test_declarative_rewrite_rule(net):
    rule = ir.Rule("gelu => gelu(tanh)", lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh"))
    cm = slimfx.compile(net, X, passes=[Rewrite([rule])], progress=False)
    assert cm.report().records[0].stats == {"rewrites": {"gelu => gelu(tanh)": 1}}
    gelus = [n for n in cm.graph.graph.nodes if n.target is aten.gelu.default]
    assert len(gelus) == 1 and gelus[0].kwargs == {"approximate": "tanh"}


def test_unchanged_pass_reports_unchanged(net):
    cm = slimfx.compile(net, X, passes=[lambda gm: None, "dce"], progress=False)
    assert [r.modified for r in cm.report().records] == [False, False]
    assert cm.report().records[0].sqnr_db == math.inf


def test_registry_by_name_and_duplicates():
    @register_pass(name="test_noop_registered")
    def noop(gm):
        return PassResult(gm, False)
    def other(gm):
        return PassResult(gm, False)
    try:
        assert "test_noop_registered" in PASSES
        with pytest.raises(ValueError, match="already registered"):        # another pass under that name
            register_pass(name="test_noop_registered")(other)

        def noop(gm):                   # the same definition again (a notebook cell run twice): replaces it
            return PassResult(gm, True)
        register_pass(name="test_noop_registered")(noop)
        assert PASSES["test_noop_registered"]().fn is noop
        with pytest.raises(KeyError, match="no pass named 'nope'"):
            slimfx.passes.as_pass("nope")
    finally:
        PASSES.pop("test_noop_registered")


def corrupt(gm):
    """Wires the second linear to the first one's weight: (5,16) x (16,8)^T is a shape error."""
    lins = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    lins[1].args = (lins[1].args[0], lins[0].args[1], lins[1].args[2])
    return PassResult(gm, True)


def test_verifier_catches_a_corrupting_pass_and_names_it(net):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(slimfx.PassError) as e:
        slimfx.compile(net, X, passes=["dce", corrupt], progress=False)
    msg = str(e.value)
    assert "pass 'corrupt'" in msg and "verifier" in msg and "['dce']" in msg
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_a_raising_pass_is_named_with_the_passes_before_it(net):
    def boom(gm):
        raise ValueError("kaboom")
    with pytest.raises(slimfx.PassError, match=r"pass 'boom' raised ValueError: kaboom[\s\S]*\['cse', 'dce'\]"):
        slimfx.compile(net, X, passes=["cse", "dce", boom], progress=False)


def test_a_pass_writing_into_the_models_tensors_is_caught(net):
    def scale_in_place(gm):
        with torch.no_grad():
            gm.a_weight.mul_(1.0)
        return PassResult(gm, True)
    with pytest.raises(slimfx.PassError, match=r"in place[\s\S]*\['a_weight'\][\s\S]*model holds those writes"):
        slimfx.compile(net, X, passes=[scale_in_place], progress=False)

    def write_then_raise(gm):            # caught on the raise path too, and never called untouched
        with torch.no_grad():
            gm.a_weight.mul_(1.0)
        raise RuntimeError("oops")
    with pytest.raises(slimfx.PassError, match=r"raised RuntimeError: oops[\s\S]*model holds") as e:
        slimfx.compile(net, X, passes=[write_then_raise], progress=False)
    assert "the model and the graph before this pass are untouched" not in str(e.value)


def test_class_pass_with_options_and_stats(net):
    class DropBias(Pass):
        def run(self, gm, ctx):
            n = 0
            for node in gm.graph.nodes:
                if node.target is aten.linear.default and len(node.args) == 3:
                    node.args = node.args[:2]
                    n += 1
            return PassResult(gm, n > 0, {"biases_dropped": n})
    cm = slimfx.compile(net, X, passes=[DropBias(), "dce"], progress=False)
    r = cm.report().records
    assert r[0].stats == {"biases_dropped": 2} and r[1].stats["tensors_dropped"] == 2
    assert r[0].sqnr_db < 40     # dropping the biases changes the outputs a lot


def test_dump_dir_and_debug_levels(net, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMFX_DEBUG", "2")
    slimfx.compile(net, X, passes=[gelu_tanh, "dce"], dump_dir=str(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_captured.txt", "01_gelu_tanh.txt", "02_dce.txt"]
    assert "approximate = 'tanh'" in (tmp_path / "01_gelu_tanh.txt").read_text()
    err = capsys.readouterr().err
    assert "[slimfx]  1 gelu_tanh" in err and "def forward" in err

    class Slashed(Pass):                 # a pass name is no path: its dump file takes it with "/" replaced
        name = "my/pass"

        def run(self, gm, ctx):
            return gm
    monkeypatch.setenv("SLIMFX_DEBUG", "0")
    slimfx.compile(net, X, passes=Slashed(), dump_dir=str(tmp_path / "one"), progress=False)   # one pass alone
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["00_captured.txt", "01_my_pass.txt"]
    assert [r.name for r in slimfx.compile(net, X, passes="dce", progress=False).report().records] == ["dce"]


def test_one_capture_compiles_with_several_pipelines(net):
    """slimfx.capture once, then compile it with other passes and backends: each compile is what compiling the
    model gives, no compile changes the capture or another compile's graph, and a failed pass leaves it too."""
    from slimfx.passes import Quantize
    cap = slimfx.capture(net, X, dynamic=True)
    captured_code = ir.code(cap.graph)
    for passes in ([gelu_tanh], [Quantize(weights="int8", activations="dynamic"), "dce"]):
        got = slimfx.compile(cap, passes=passes, progress=False)
        want = slimfx.compile(net, X, dynamic=True, passes=passes, progress=False)
        assert ir.code(got.graph) == ir.code(want.graph)
        x = torch.randn(3, 8)                           # another batch: the capture's dynamic dims hold
        assert torch.equal(got(x), want(x))             # the same graph on numpy: the same fp32 ops, bit for bit
    plain = slimfx.compile(cap, backend="torch", progress=False)        # no passes: still a graph of its own
    gelu = next(n for n in plain.graph.graph.nodes if n.target is aten.gelu.default)
    gelu.kwargs = {"approximate": "tanh"}
    assert ir.code(cap.graph) == captured_code

    def broken(gm):
        next(n for n in gm.graph.nodes if n.target is aten.gelu.default).kwargs = {"approximate": "tanh"}
        raise RuntimeError("half done")
    with pytest.raises(slimfx.PassError, match="broken"):
        slimfx.compile(cap, passes=[broken], progress=False)
    assert ir.code(cap.graph) == captured_code
    assert "CapturedModel(Net" in repr(cap)
    # the report says the capture's time was spent once, not by this compile (a compile of the model: its own)
    assert "s, once for every compile of the capture)" in str(plain.report()) and plain.report().capture_reused
    assert plain.with_backend("numpy").report().capture_reused
    assert not slimfx.compile(net, X, progress=False).report().capture_reused


def test_a_capture_keeps_its_own_example_inputs(net):
    cap = slimfx.capture(net, X)
    with pytest.raises(TypeError, match="example_inputs, dynamic given with a CapturedModel"):
        slimfx.compile(cap, X, dynamic=True, progress=False)
    with pytest.raises(TypeError, match="capture given"):
        slimfx.compile(cap, capture="symbolic_trace", progress=False)


def test_every_failure_is_a_pass_error_naming_the_pass(net):
    """Raw exceptions used to escape: a graph that propagates shapes but fails on the example inputs (from the
    SQNR measurement), a pass that erased the output (StopIteration), stats that are no dict (TypeError)."""
    def bad_index(gm):
        for n in gm.graph.nodes:
            if n.target is aten.gelu.default:
                with gm.graph.inserting_after(n):
                    sel = gm.graph.call_function(aten.index_select.default, (n, 1, torch.tensor([99])))
                n.replace_all_uses_with(sel)
                sel.args = (n, 1, torch.tensor([99]))
        return PassResult(gm, True)

    def no_output(gm):
        gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "output"))
        return PassResult(gm, True)

    for fn, match in [(no_output, "pass 'no_output' left a graph the verifier rejects: the graph has no output"),
                      (lambda gm: PassResult(gm, True, None), "returned stats of type NoneType")]:
        with pytest.raises(slimfx.PassError, match=match):
            slimfx.compile(net, X, passes=[fn], progress=False)
    with pytest.raises(slimfx.PassError, match="pass 'bad_index' left a graph"):
        slimfx.compile(net, X, passes=[bad_index], progress=False)


def test_sqnr_of_non_finite_outputs():
    from slimfx.passes import sqnr_db
    nan, inf = float("nan"), float("inf")
    ref = torch.tensor([[nan, nan], [1.0, 2.0]])          # a fully masked row: NaN in the model too
    assert sqnr_db(ref, ref.clone()) == math.inf         # unchanged (it said -inf: NaN noise, NaN signal)
    assert 30 < sqnr_db(ref, ref + torch.tensor([[0.0, 0.0], [0.01, 0.0]])) < 60
    assert sqnr_db(torch.ones(2, 2), torch.tensor([[1.0, nan], [1.0, 1.0]])) == -math.inf   # a pass made NaN
    assert sqnr_db(torch.ones(2, 2), torch.tensor([[1.0, inf], [1.0, 1.0]])) == -math.inf


def test_report_to_dict_is_strict_json(net):
    import json
    cm = slimfx.compile(net, X, passes=["dce", lambda gm: PassResult(gm, False, {"t": torch.ones(1)})],
                        progress=False)
    data = json.loads(json.dumps(cm.report().to_dict(), allow_nan=False))    # the exact pass: inf SQNR
    assert data["passes"][0]["sqnr_db"] == "inf" and isinstance(data["passes"][1]["stats"]["t"], str)


def test_a_node_appended_after_the_output_is_refused_naming_it(net):
    """graph.call_function outside an inserting_* block lands after the output node: torch's code ignored it
    and the numpy backend returned it as the output (fc1's activations instead of the model's)."""
    model, x = net, X[0]

    def stray(gm):
        fc = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
        gm.graph.call_function(torch.ops.aten.relu.default, (fc,))
        return gm

    with pytest.raises(slimfx.PassError, match=r"comes after the output node"):
        slimfx.compile(model, (x,), passes=[stray], progress=False)


def test_a_pass_saying_unchanged_after_editing_the_graph_is_still_checked(net):
    """PassResult(modified=False) from a pass that dropped a bias: the torch backend ran the stale code (as if
    unchanged) while the numpy backend and save ran the edited graph; the report said SQNR inf."""
    model, x = net, X[0]

    def drop_bias(gm):
        fc = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and len(n.args) > 2)
        fc.args = fc.args[:2]
        return PassResult(gm, False, {})

    outs = []
    for backend in ("torch", "numpy"):
        cm = slimfx.compile(model, (x,), passes=[drop_bias], backend=backend, progress=False)
        rec = cm.report().records[0]
        assert rec.modified and rec.sqnr_db < 100
        outs.append(cm(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0], model(x), atol=1e-4)


def test_a_pass_editing_node_metadata_in_place_leaves_the_graph_before_it_alone(net):
    """ir.fork copied each node's meta dict but shared what it holds: a pass that edited nn_module_stack or
    info(node).quant in place changed the capture (a later Quantize(include="a") found no layer "a") and the
    graph before it, also when it then failed."""
    from slimfx.passes import PassContext, PassManager, Quantize
    model, x = net, X[0]
    cap = slimfx.capture(model, (x,))

    def rename_then_fail(gm):
        for n in gm.graph.nodes:
            for k, (path, ty) in list((n.meta.get("nn_module_stack") or {}).items()):
                n.meta["nn_module_stack"][k] = (path + "_seen", ty)
            if n.meta.get("slimfx") is not None and ir.meta.info(n).quant:
                ir.meta.info(n).quant["note"] = "mine"
        raise RuntimeError("after touching meta")

    with pytest.raises(slimfx.PassError, match="graph before this pass are untouched"):
        slimfx.compile(cap, passes=[rename_then_fail], progress=False)
    cm = slimfx.compile(cap, passes=[Quantize(include=("a",))], progress=False)
    assert cm.report().records[0].stats["layers"] == 1
    with pytest.raises(slimfx.PassError):
        PassManager([rename_then_fail], progress=False).run(cm.graph, PassContext())
    assert not any((ir.meta.info(n).quant or {}).get("note") for n in cm.graph.graph.nodes
                   if n.meta.get("slimfx") is not None)
    assert {ir.meta.module_name(n) for n in cm.graph.graph.nodes} >= {"a", "b"}


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, mask, x):           # mask unused: an erased placeholder would shift x onto it
        return self.fc(x)


def test_a_pass_changing_the_graphs_inputs_is_refused_naming_them():
    """Backends bind the call's arguments to the placeholders by position: a pass that reordered two inputs or
    erased an unused one was accepted, and the numpy backend then ran the model on the wrong tensors."""
    torch.manual_seed(0)
    model, args = _TwoInputs().eval(), (torch.randn(2, 5), torch.randn(2, 5))

    def reorder(gm):
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ph[0].prepend(ph[1])
        return True

    def drop_unused(gm):
        for n in list(gm.graph.nodes):
            if n.op == "placeholder" and not n.users:
                gm.graph.erase_node(n)
        return True

    def retype(gm):
        ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
        ph.meta["val"] = ph.meta["val"].to(torch.float64)
        return True

    for fn, match in [(reorder, r"inputs changed from \['mask', 'x'\] to \['x', 'mask'\]"),
                      (drop_unused, r"inputs changed from \['mask', 'x'\] to \['x'\]"),
                      (retype, r"input mask changed from shape/dtype .*float32.* to .*float64")]:
        rejects = rf"pass '{fn.__name__}' left a graph the verifier rejects: .*{match}"
        with pytest.raises(slimfx.PassError, match=rejects):
            slimfx.compile(model, args, passes=[fn], measure=False, backend="numpy", progress=False)


@pytest.mark.parametrize("activations, op", [(None, "weight_only_linear"), ("dynamic", "quantized_linear")])
def test_float_codes_in_a_quantized_linear_are_refused_by_the_verifier(net, activations, op):
    """The dialect ops' fake impls computed shapes only: a pass wiring float weights where int8 codes go passed the
    verifier, and the numpy backend then ran weight_only_linear on them silently (torch refused at the call)."""
    from slimfx.passes import Quantize

    def float_codes(gm):
        n = next(n for n in gm.graph.nodes if n.target is getattr(torch.ops.slimfx, op).default)
        name = ir.meta.add_tensor_attr(gm, "codes_f32", getattr(gm, n.args[1].target).float())
        with gm.graph.inserting_before(n):
            a = gm.graph.get_attr(name)
        n.args = (n.args[0], a) + tuple(n.args[2:])
        return True

    with pytest.raises(slimfx.PassError, match=rf"float_codes' left a graph the verifier rejects: .*slimfx::{op}: "
                                               rf"w_q must be .*got torch.float32"):
        slimfx.compile(net, (X[0],), passes=[Quantize(weights="int8", activations=activations), float_codes],
                       measure=False, backend="numpy", progress=False)
