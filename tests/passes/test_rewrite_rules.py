"""Rules written in plain torch are canonicalized as captured graphs are: their patterns match what torch.export
captured, their replacements put ATen ops into the graph, and a rule that cannot be so written fails when it is
made, naming it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx import ir
from slimfx.ir.rewrite import RuleError
from slimfx.passes import Rewrite


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.ln(x)
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.lin(h)
        return h * torch.sigmoid(h)


class Upcast(nn.Module):
    def forward(self, x):               # half in: export records x.float() as aten.to.dtype
        return x.float() * 2


@pytest.fixture(scope="module")
def norms():
    torch.manual_seed(0)
    model, x = Norms().eval(), torch.randn(2, 16)
    return model, x, slimfx.capture(model, (x,))


def _matches(cap, pattern) -> int:
    rule = ir.Rule("r", pattern, pattern)
    return ir.apply_rules(ir.fork(cap.graph), [rule]).get("r", 0)


@pytest.mark.parametrize("pattern", [
    lambda x, w, b: F.layer_norm(x, (16,), w, b, 1e-5),              # captured: layer_norm(.., 1e-05, False)
    lambda x, w, b: F.layer_norm(x, [16], weight=w, bias=b, eps=1e-5),
    lambda x, w, b: torch.layer_norm(x, (16,), w, b),
], ids=["F.layer_norm args", "F.layer_norm kwargs", "torch.layer_norm defaults"])
def test_layer_norm_spellings_match_the_captured_layer_norm(norms, pattern):
    assert _matches(norms[2], pattern) == 1


@pytest.mark.parametrize("pattern", [
    lambda x: torch.mean(x.pow(2), -1, keepdim=True),
    lambda x: torch.mean(torch.pow(x, 2), dim=-1, keepdim=True),
    lambda x: x.pow(2).mean(-1, keepdim=True),
    lambda x: x.pow(2).mean(dim=(-1,), keepdim=True),
], ids=["torch.mean", "torch.mean kwargs", "method", "method tuple dim"])
def test_mean_spellings_match(norms, pattern):
    assert _matches(norms[2], pattern) == 1


def test_a_cast_method_matches_the_captured_conversion():
    cap = slimfx.capture(Upcast(), (torch.randn(3, 4, dtype=torch.float16),))
    assert _matches(cap, lambda x: x.float()) == 1
    assert _matches(cap, lambda x: x.to(torch.float32)) == 1


@pytest.mark.parametrize("what, replacement, ops", [
    ("torch.clamp(a, min=0)", lambda a: torch.clamp(a, min=0), {"aten.clamp.default"}),
    ("torch.stack([a, a]).mean(0)", lambda a: torch.stack([a, a]).mean(0), {"aten.stack.default", "aten.mean.dim"}),
    ("a.clamp(max=3.0)", lambda a: a.clamp(max=3.0), {"aten.clamp.default"}),
])
def test_replacements_put_aten_ops_into_the_graph(norms, what, replacement, ops):
    model, x, cap = norms
    rule = ir.Rule("x*sigmoid(x) => " + what, lambda a: a * torch.sigmoid(a), replacement)
    cm = slimfx.compile(cap, passes=[Rewrite([rule])], backend="numpy", progress=False)
    assert cm.report().records[0].stats["rewrites"] == {rule.name: 1}
    calls = [n.target for n in cm.graph.graph.nodes if n.op == "call_function"]
    assert all(isinstance(t, torch._ops.OpOverload) for t in calls), calls
    assert ops <= {str(t) for t in calls}
    with torch.no_grad():
        h = model.lin(model.ln(x) / torch.sqrt(model.ln(x).pow(2).mean(-1, keepdim=True) + 1e-6))
        want = replacement(h)
    # numpy backend vs torch on the same fp32 ops: a few ulps of reordering in layer_norm and linear
    torch.testing.assert_close(cm(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern, replacement, says", [
    (lambda x: F.normalize(x), lambda x: x * 2, "calls torch.nn.functional.normalize"),
    (lambda x: x[:, :2] * 2, lambda x: x, "indexes a tensor"),
    (lambda x: x * torch.sigmoid(x), lambda x: F.normalize(x), "its replacement calls"),
    (lambda x: x, lambda x: x * 2, "no operation"),
    (lambda x, y: x * y, lambda x: x, "takes 2 inputs and the replacement 1"),
    (lambda x: x * 2, lambda x: x if x.sum() > 0 else -x, "cannot be traced"),
], ids=["no aten op", "indexing", "replacement", "empty pattern", "arity", "control flow"])
def test_a_rule_that_cannot_be_canonical_fails_when_made_naming_it(pattern, replacement, says):
    with pytest.raises(RuleError, match=rf"rule 'my rule'[\s\S]*{says}"):
        ir.Rule("my rule", pattern, replacement)


class _ReluOfUpcast(nn.Module):
    def forward(self, x):
        return torch.relu(x.float()) * 2


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_a_cast_rule_matches_captures_of_either_method(method):
    """symbolic_trace captures spelled x.float() aten._to_copy while rules (as export) spelled it aten.to.dtype:
    a rule matched one capture method and silently not the other."""
    rule = ir.Rule("relu(float(x)) => float(relu(x))", lambda x: torch.relu(x.float()),
                   lambda x: torch.relu(x).float())
    gm = ir.capture(_ReluOfUpcast(), (torch.randn(2, 3, dtype=torch.float16),), method=method).gm
    assert ir.apply_rules(gm, [rule]) == {rule.name: 1}


def test_input_keyword_binds_to_a_schema_that_names_it_input():
    """torch's input= became self= for every overload, so group_norm (whose schema says input) found none."""
    rule = ir.Rule("gn", lambda x, w, b: torch.group_norm(input=x, num_groups=2, weight=w, bias=b),
                   lambda x, w, b: torch.group_norm(x, 2, w, b))
    (op,) = [n.target for n in rule.traced()[0].graph.nodes if n.op == "call_function"]
    assert op is torch.ops.aten.group_norm.default


def test_a_dropout_pattern_is_refused_as_no_operation():
    """F.dropout's training= is aten.dropout's train=: no overload took it, and the rule was refused as having
    'no ATen op', where the true reason is that captured graphs hold no dropout."""
    with pytest.raises(RuleError, match="its pattern is no operation once canonicalized"):
        ir.Rule("d", lambda x: F.dropout(x, 0.1, training=False), lambda x: x)


class Literals(nn.Module):
    def forward(self, x, i):            # literals as the code spells them: 0.0, 1.0, and an int 0
        return torch.clamp(x, min=0.0) + x * 1.0 + torch.relu(x) * 0, i * 1.0


@pytest.mark.parametrize("pattern, target, rewritten", [
    (lambda x: torch.clamp(x, min=0), torch.ops.aten.clamp.default, lambda x: x + x * 1.0 + torch.relu(x) * 0),
    (lambda x: x * 1, 1.0, lambda x: torch.clamp(x, min=0.0) + x + torch.relu(x) * 0),
    (lambda x: x * 0.0, 0, lambda x: torch.clamp(x, min=0.0) + x * 1.0 + torch.relu(x))],
    ids=["clamp-min-0", "mul-1", "mul-0.0"])
def test_a_number_literal_matches_either_spelling_on_float_tensors(pattern, target, rewritten):
    """A rule's literal 0 did not match a graph's 0.0 (nor 1 a 1.0): fx matches literals by type, and a
    capture keeps the model's spelling. Both spellings now match where the tensors are floating point; on
    an int tensor ``i * 1.0`` is float and ``i * 1`` int, so there the literal must be spelled as captured."""
    model, x, i = Literals().eval(), torch.randn(3, 4), torch.arange(12).reshape(3, 4)
    cm = slimfx.compile(model, (x, i), passes=[Rewrite([ir.Rule("r", pattern, lambda x: x)])], backend="torch",
                        progress=False)
    assert cm.report().records[0].stats["rewrites"] == {"r": 1}       # the float use, not i * 1.0
    calls = [n for n in cm.graph.graph.nodes if n.op == "call_function"]
    if isinstance(target, torch._ops.OpOverload):
        assert not [n for n in calls if n.target is target]
    else:                               # the mul by that literal (spelled the other way) is gone
        assert not [n for n in calls if n.target is torch.ops.aten.mul.Tensor and n.args[1:] == (target,)
                    and n.args[0].name != "i"]
    assert [n for n in calls if n.args[0].name == "i" and n.args[1:] == (1.0,)]          # kept, as it must be
    out, iout = cm(x, i)
    assert iout.dtype == torch.float32 and torch.equal(iout, i * 1.0)
    torch.testing.assert_close(out, rewritten(x), rtol=0, atol=0)


class Indexed(nn.Module):
    def forward(self, x):
        return F.relu(x[0]) * 2 + F.relu(x[-1])


def test_an_integer_index_of_a_tensor_is_select_as_captured():
    """x[0] in a rule was let through as a tuple index (as split(x, 2)[0] is) and never matched: captured
    graphs spell it aten.select.int. Now the rule spells it so too (negative indexes as written)."""
    import operator
    x = torch.randn(3, 4)
    rule = ir.Rule("relu(x[0]) => gelu(x[0])", lambda x: F.relu(x[0]), lambda x: F.gelu(x[0]))
    cm = slimfx.compile(Indexed(), (x,), passes=[Rewrite([rule])], backend="torch", progress=False)
    assert cm.report().records[0].stats["rewrites"] == {"relu(x[0]) => gelu(x[0])": 1}     # x[-1] is another
    torch.testing.assert_close(cm(x), F.gelu(x[0]) * 2 + F.relu(x[-1]), rtol=0, atol=0)
    # a tuple's item stays an item
    split = ir.Rule("split", lambda x: torch.split(x, 2)[0] * 2, lambda x: torch.split(x, 2)[0] + torch.split(x, 2)[0])
    assert any(n.target is operator.getitem for n in split.traced()[0].graph.nodes)


@pytest.mark.parametrize("rules, match", [("rule", r"Rewrite takes a list of rules: Rewrite\(\[rule\]\), got one"),
                                          ([None], "must be slimfx.ir.Rule objects, got NoneType"),
                                          (5, "takes a list of slimfx.ir.Rule objects, got int")])
def test_rewrite_refuses_what_is_not_a_list_of_rules(rules, match):
    """Rewrite(rule) was accepted and failed inside the pass ('Rule' object is not iterable)."""
    rule = ir.Rule("r", lambda x: x * 2, lambda x: x + x)
    with pytest.raises(TypeError, match=match):
        Rewrite(rule if rules == "rule" else rules)


class ArgmaxScaled(nn.Module):
    def forward(self, x):
        return x.argmax(-1) * 2.0 + x.sum(-1)       # an int intermediate times a float literal: a float


class Doubled(nn.Module):
    def __init__(self, literal):
        super().__init__()
        self.literal = literal

    def forward(self, x):
        return x * self.literal


def test_a_literal_variant_never_changes_what_an_int_operand_computes():
    """The variant of x.argmax(-1) * 2 matched x.argmax(-1) * 2.0 because the pattern's input (x) was float,
    though the literal multiplies an int64: the replacement made the output int64 (the compile failed; inside a
    graph it would have changed a dtype silently)."""
    rule = ir.Rule("argmax*2 => argmax+argmax", lambda x: x.argmax(-1) * 2, lambda x: x.argmax(-1) + x.argmax(-1))
    x = torch.randn(3, 5)
    cm = slimfx.compile(ArgmaxScaled(), (x,), passes=[Rewrite([rule])], backend="torch", progress=False)
    assert cm.report().records[0].stats["rewrites"] == {}
    torch.testing.assert_close(cm(x), ArgmaxScaled()(x), rtol=0, atol=0)


@pytest.mark.parametrize("literal, count", [(2, 1), (2.0, 0)])
def test_a_variant_does_not_match_what_its_rule_writes(literal, count):
    """x * 2 => x * 2.0: the variant (x * 2.0) matched the replacement just written (2 rewrites for one), and a
    graph already holding x * 2.0 was 'changed' into itself."""
    rule = ir.Rule("x*2 => x*2.0", lambda x: x * 2, lambda x: x * 2.0)
    cm = slimfx.compile(Doubled(literal), (torch.randn(3),), passes=[Rewrite([rule])], backend="torch",
                        progress=False)
    rec = cm.report().records[0]
    assert rec.stats["rewrites"] == ({"x*2 => x*2.0": count} if count else {}) and rec.modified == bool(count)


class Masked(nn.Module):
    def forward(self, x, y):
        return (x > 0).float() * x + (x >= y).float() + (~(x < 0)).float() + x // 2 + abs(y)


def test_python_comparisons_are_their_aten_ops():
    """(x > 0) in a rule stayed operator.gt, while captures hold aten.gt.Scalar: the rule never matched, and
    said nothing. Comparisons and the bitwise operators are now spelled as export records them, in rules and in
    symbolic_trace captures; a Python operator on a tensor with no ATen spelling is a RuleError."""
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    rule = ir.Rule("mask*x => relu", lambda x: (x > 0).float() * x, lambda x: torch.relu(x))
    for capture in ("export", "symbolic_trace"):
        cm = slimfx.compile(Masked(), (x, y), passes=[Rewrite([rule])], backend="numpy", capture=capture,
                            progress=False)
        assert cm.report().records[0].stats["rewrites"] == {"mask*x => relu": 1}, capture
        targets = {n.target for n in cm.graph.graph.nodes if n.op == "call_function"}
        assert {torch.ops.aten.ge.Tensor, torch.ops.aten.lt.Scalar, torch.ops.aten.bitwise_not.default,
                torch.ops.aten.floor_divide.default, torch.ops.aten.abs.default} <= targets, targets
        torch.testing.assert_close(cm(x, y), Masked()(x, y), rtol=0, atol=0)
    with pytest.raises(RuleError, match=r"applies Python's pos to a tensor"):
        ir.Rule("+x", lambda x: +x, lambda x: x)
