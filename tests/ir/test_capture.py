import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx import ir

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.ln = nn.Linear(12, 20), nn.Linear(20, 7), nn.LayerNorm(7)
        self.w3 = nn.Parameter(torch.randn(7, 7))
        self.b3 = nn.Parameter(torch.randn(7))

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        h = self.ln(self.fc2(h).view(x.size(0), -1))
        return torch.addmm(self.b3, h, self.w3.t()) + torch.relu(h)


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_every_linear_spelling_becomes_aten_linear(method):
    m, x = MLP().eval(), torch.randn(5, 12)
    c = ir.capture(m, (x,), method=method)
    assert c.method == method
    ts = targets(c.gm)
    # nn.Linear twice and addmm(b, h, w.t()) once: three linears, no addmm/t/call_module left
    assert ts.count(aten.linear.default) == 3
    assert aten.addmm.default not in ts and aten.t.default not in ts
    assert not [n for n in c.gm.graph.nodes if n.op in ("call_module", "call_method")]
    with torch.no_grad():
        assert torch.allclose(c.gm(x), m(x), atol=1e-6, rtol=0)   # fp32, same ops, reordered linear math
    ir.verify(c.gm)


def test_capture_flattens_tensors_and_remembers_their_names():
    m, x = MLP().eval(), torch.randn(5, 12)
    c = ir.capture(m, (x,))
    attrs = {ir.meta.param_name(n): n.target for n in c.gm.graph.nodes if n.op == "get_attr"}
    assert attrs["fc1.weight"] == "fc1_weight"
    lin = next(n for n in c.gm.graph.nodes if n.target is aten.linear.default)
    assert ir.meta.module_name(lin) == "fc1"
    assert ir.meta.shape(lin) == (5, 20) and ir.meta.dtype(lin) == torch.float32


def test_dynamic_capture_gives_symbolic_dims_and_keeps_training_mode():
    m, x = MLP().train(), torch.randn(5, 12)
    c = ir.capture(m, (x,), dynamic=True)
    assert m.training, "capture must give the model back in the mode it came in"
    ph = next(n for n in c.gm.graph.nodes if n.op == "placeholder")
    assert not isinstance(ir.meta.shape(ph)[0], int)     # batch is symbolic
    assert ir.meta.shape(ph)[1] == 12                    # features are not: the Linear fixes them
    assert aten.dropout.default not in targets(c.gm)


class WeightLeft(nn.Module):
    """Mamba's dt_proj: the weight on the left of the transposed input, W @ x^T."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x3, x4, y4):
        # y4 (2, 4, 3, 5): W contracts its axis 1 (not the last), which is no linear layer
        return self.w @ x3.transpose(1, 2), self.w @ x4.transpose(-2, -1), self.w @ y4.transpose(1, 2)


def test_dynamic_capture_of_lists_and_dicts_of_tensors():
    """dynamic=True marks the tensors inside a list or dict argument too (export refused the list, and the
    fallback capture failed in propagation with no reason given)."""
    import slimfx

    class ListIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, xs, d):
            return self.lin(xs[0]) + self.lin(xs[1]) * d["b"]

    m, x = ListIn().eval(), torch.randn(3, 4)
    cm = slimfx.compile(m, ([x, x + 1], {"b": x - 1}), dynamic=True, progress=False)
    assert cm.report().capture_method == "export"
    y = torch.randn(6, 4)                              # another batch: the list's and the dict's dims vary too
    assert torch.allclose(cm([y, 2 * y], {"b": y}), m([y, 2 * y], {"b": y}), atol=1e-6)


@pytest.mark.parametrize("dynamic", [None, True])
def test_one_tensor_given_for_two_inputs_captures_two(dynamic):
    """model(x, x) at capture: torch.export reads one placeholder for both (a's uses read b), so every later call
    with two different tensors was wrong. The example inputs are unaliased (copied) before export."""
    import slimfx

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, a, b):
            return self.lin(a) - b

    m, x = Two().eval(), torch.randn(3, 4)
    cm = slimfx.compile(m, (x, x), dynamic=dynamic, progress=False)
    y, z = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(cm(y, z), m(y, z), atol=1e-6)
    assert torch.allclose(slimfx.compile(m, (x, x[:, :]), progress=False)(y, z), m(y, z), atol=1e-6)   # a view


def test_symbolic_trace_calls_become_the_right_aten_calls():
    """fx.symbolic_trace records torch-level calls; they were mapped to ATen with their arguments copied as they
    were (F.embedding's input and weight swapped, F.relu's inplace passed on, torch.pow / torch.where always one
    overload) and methods beyond a few stayed call_method (the numpy backend then had no 'sum')."""
    import slimfx

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Parameter(torch.randn(11, 6))

        def forward(self, ids, x, e):
            h = F.embedding(ids, self.emb) + F.relu(x, inplace=False) + torch.pow(x.abs() + 1, e)
            h = torch.where(h > 0, h, 0.0) + F.silu(x, inplace=False)
            return h.softmax(0) + h.sum(-1, keepdim=True) + h.half().float().clamp(-1, 1) + h.sum()

    m = Calls().eval()
    args = (torch.tensor([[1, 3, 10]]), torch.randn(1, 3, 6), torch.rand(6))
    for backend in ("numpy", "torch"):
        cm = slimfx.compile(m, args, capture="symbolic_trace", backend=backend, progress=False)
        assert not [n for n in cm.graph.graph.nodes if n.op == "call_method"]
        assert torch.allclose(cm(*args), m(*args), atol=1e-5), backend


def test_weight_on_the_left_of_a_transposed_input_becomes_a_linear():
    """W @ x.transpose(-2, -1) is transpose(linear(x, W)); W @ x.transpose(1, 2) too, when x has 3 dims only."""
    m, xs = WeightLeft().eval(), (torch.randn(2, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 4, 3, 5))
    c = ir.capture(m, xs)
    assert targets(c.gm).count(aten.linear.default) == 2, c.gm.code
    for got, want in zip(c.gm(*xs), m(*xs)):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-6, atol=1e-6)


class ChunkPad(nn.Module):
    """Mamba-2's chunked scan pads the sequence up to a multiple of the chunk size (a symbolic pad), and its
    causal convolution pads a constant amount in front of a tensor with a symbolic batch."""

    def forward(self, x):
        n = x.shape[1]
        y = F.pad(x, (0, 0, 0, (4 - n % 4) % 4))                      # (B, ceil(S / 4) * 4, C)
        return F.pad(y.transpose(1, 2), (3, 0)).sum(-1)               # (B, C)


def test_propagation_keeps_symbolic_pads_and_batches():
    """torch.export traces constant padding through its Python decomposition; propagating again must too: the
    C++ kernel fails on a symbolic pad (Falcon-H1) and specializes the symbolic batch it reads (Bamba's became
    the example's 2)."""
    x = torch.randn(2, 7, 5)
    c = ir.capture(ChunkPad(), (x,), dynamic=True)
    ph = next(n for n in c.gm.graph.nodes if n.op == "placeholder")
    ir.propagate_meta(c.gm)
    batch, seq, _ = ir.meta.shape(ph)
    assert not isinstance(batch, int) and not isinstance(seq, int), ir.meta.shape(ph)
    out = next(n for n in c.gm.graph.nodes if n.op == "output").args[0][0]
    assert not isinstance(ir.meta.shape(out)[0], int), ir.meta.shape(out)
    for shape in [(3, 9, 5), (1, 4, 5)]:
        x = torch.randn(*shape)
        assert torch.equal(c.gm(x), ChunkPad()(x))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_uncapturable_model_says_why_and_what_to_try():
    with pytest.raises(ir.CaptureError) as e:
        ir.capture(DataDependent(), (torch.randn(3),))
    msg = str(e.value)
    assert "could not capture DataDependent" in msg
    assert "torch.export" in msg and "fx.symbolic_trace" in msg
    assert "what to try" in msg and "torch.cond" in msg


def test_bad_capture_arguments():
    with pytest.raises(ir.CaptureError, match="nn.Module"):
        ir.capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(ir.CaptureError, match="capture method"):
        ir.capture(MLP(), (torch.randn(2, 12),), method="jit")


def test_hf_model_returning_a_cache_gets_the_use_cache_hint(tiny_llama):
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ir.CaptureError, match="use_cache=False"):
        ir.capture(tiny_llama, (), dict(input_ids=ids), method="export")


class TakesKwargs(nn.Module):
    def forward(self, x, mask=None, **kwargs):
        return x * 2 + mask if kwargs.get("flag", True) else x


def test_keyword_only_in_var_kwargs_says_what_to_do():
    """torch.export cannot take dynamic shapes for inputs inside **kwargs (GraniteMoE's use_cache): the error
    names the keyword and the two ways out, and both work."""
    x = torch.randn(2, 3)
    with pytest.raises(ir.CaptureError, match=r"takes \['flag'\] only through \*\*kwargs.*dynamic=False"):
        ir.capture(TakesKwargs(), (), dict(x=x, mask=x, flag=False), dynamic=True, method="export")
    gm = ir.capture(TakesKwargs(), (), dict(x=x, mask=x), dynamic=True, method="export").gm
    assert torch.equal(gm(x=torch.ones(4, 3), mask=torch.ones(4, 3)), torch.full((4, 3), 3.0))
    gm = ir.capture(TakesKwargs(), (), dict(x=x, mask=x, flag=False), dynamic=False, method="export").gm
    assert torch.equal(gm(x=x, mask=x, flag=False), x)


class Spellings(nn.Module):
    """Weights stored (in, out) as GPT-2's Conv1D keeps them, a bias added after the product (Falcon),
    x.T, chunk into uneven pieces, and an in-place add on an intermediate."""
    def __init__(self):
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(12, 9))       # used as x @ W (Conv1D: addmm(b, x, W))
        self.b = nn.Parameter(torch.randn(9))
        self.w2 = nn.Parameter(torch.randn(9, 7))              # x @ W, no bias, through matmul
        self.w3 = nn.Parameter(torch.randn(5, 7))              # x @ W.T + b: Falcon's FalconLinear
        self.b3 = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, 12), self.w_in_out).view(x.shape[0], x.shape[1], 9)
        g = h @ self.w2
        y = g @ self.w3.T + self.b3
        a, b, c = torch.chunk(y, 3, dim=-1)                      # 5 into 2 + 2 + 1
        a += c                                                   # in place, on an intermediate
        return torch.cat([a, b], -1)


def test_transposed_weights_late_biases_chunks_and_in_place_ops_are_canonical():
    torch.manual_seed(0)
    m, x = Spellings().eval(), torch.randn(2, 3, 12)
    c = ir.capture(m, (x,), method="export")
    ts = targets(c.gm)
    assert ts.count(aten.linear.default) == 3
    for bad in (aten.addmm.default, aten.mm.default, aten.matmul.default, aten.numpy_T.default,
                aten.chunk.default, aten.add_.Tensor, aten.t.default, aten.permute.default):
        assert bad not in ts, bad
    weights = [ir.meta.tensor_attr(c.gm, n.args[1]) for n in c.gm.graph.nodes if n.target is aten.linear.default]
    # every linear reads an (out, in) weight from a tensor of its own: W.T copied (contiguous), W3 as is
    assert [tuple(w.shape) for w in weights] == [(9, 12), (7, 9), (5, 7)]
    assert torch.equal(weights[0], m.w_in_out.t()) and weights[0].is_contiguous()
    assert weights[2] is not None and weights[2].data_ptr() == m.w3.data_ptr()   # shared, not copied
    biases = [n.args[2] if len(n.args) > 2 else None for n in c.gm.graph.nodes if n.target is aten.linear.default]
    assert biases[0] is not None and biases[1] is None and biases[2] is not None
    # the (in, out) originals are not kept on the graph module; linears keep their source's name
    assert not any(t.shape == (12, 9) for t in c.gm.state_dict().values())
    with torch.no_grad():
        got, want = c.gm(x), m(x)
    # fp32, the same math with the sums reordered: errors of a few ulp of the outputs' scale (~70 here)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    ir.verify(c.gm)


def test_broadcast_to_is_expand():
    """torch.broadcast_to (transformers < 5.25's Falcon broadcasts its keys so) is captured as expand, the op
    passes read repeated heads off, and runs on the numpy backend: a new leading axis, a -1 that keeps a size."""
    from slimfx.backends import lower

    class Broadcast(nn.Module):
        def forward(self, x):
            return torch.broadcast_to(x[:, None], (2, 3, 4, 5)) + torch.broadcast_to(x[:, None], (2, -1, 4, 5))

    x = torch.randn(3, 5)
    c = ir.capture(Broadcast(), (x,))
    ts = targets(c.gm)
    assert aten.broadcast_to.default not in ts and ts.count(aten.expand.default) == 2, ts
    want = Broadcast()(x)
    assert torch.equal(c.gm(x), want)
    assert torch.equal(torch.as_tensor(lower(c.gm, "numpy")((x,), {})), want)


def test_an_unread_random_draw_is_dropped():
    """transformers 5.17's wav2vec2 draws its LayerDrop coin (torch.rand([])) in eval mode too and reads it only
    when training: the draw is dropped at capture (fx keeps it, as impure), so the numpy backend, which has no
    random ops, runs the graph; a draw that is read stays."""
    from slimfx.backends import lower

    class Coin(nn.Module):
        def __init__(self, read: bool):
            super().__init__()
            self.read = read

        def forward(self, x):
            p = torch.rand([])
            return x * 2 + (p if self.read else 0) if self.read or not (self.training and p < 0.5) else x

    x = torch.randn(3)
    c = ir.capture(Coin(False).eval(), (x,))
    assert aten.rand.default not in targets(c.gm), targets(c.gm)
    assert torch.equal(torch.as_tensor(lower(c.gm, "numpy")((x,), {})), x * 2)
    assert aten.rand.default in targets(ir.capture(Coin(True).eval(), (x,)).gm)


def test_transposed_linear_keeps_its_module_name():
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    m = GPT2Model(GPT2Config(vocab_size=61, n_embd=16, n_head=2, n_layer=1, n_positions=32)).eval()
    c = ir.capture(m, (), dict(input_ids=torch.randint(0, 61, (1, 5)), use_cache=False))
    names = [ir.meta.module_name(n) for n in c.gm.graph.nodes if n.target is aten.linear.default]
    assert names == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]


def test_compile_and_distill_give_back_every_submodule_in_its_own_mode():
    """Capture, the reference run and Distill's teacher run in eval mode; afterwards each submodule is as it
    was (restoring with model.train(mode) would set one mode on all: a user's dropout switched on)."""
    import slimfx
    from slimfx.passes import Distill
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(5, 12)
    m.train()
    m.fc1.eval()
    modes = [s.training for s in m.modules()]
    slimfx.compile(m, (x,), passes=[Distill(steps=2)], calibration=[(x,)], backend="torch", progress=False)
    assert [s.training for s in m.modules()] == modes
    m.eval()
    m.fc2.train()
    modes = [s.training for s in m.modules()]
    slimfx.compile(m, (x,), passes=[Distill(steps=2)], calibration=[(x,)], backend="torch", progress=False)
    assert [s.training for s in m.modules()] == modes


class Counting(nn.Module):
    """A forward that writes into its own buffers: a call counter and a running mean (what a static KV cache
    kept in buffers does too)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, x):
        before = self.mean.clone()
        self.calls += 1
        self.mean.mul_(0.5).add_(0.5 * self.lin(x).mean(0))
        return self.lin(x) * self.calls + self.mean, before


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_forward_writing_its_buffers_compiles_to_its_own_state(backend, tmp_path):
    """compile never changes the user's model (its reference call wrote into the buffers), the compiled model
    carries its own state from the model's, calls advance it as the model's calls do, an earlier read of a
    buffer keeps its value (numpy: state arrays are replaced, not written), passes measure from that state."""
    import slimfx
    torch.manual_seed(0)
    model, twin = Counting().eval(), Counting().eval()
    model.calls.fill_(2.0)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 8)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    c = slimfx.compile(model, (x,), passes=[slimfx.passes.Quantize()], backend=backend, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    # int8 weights per channel: the output's SQNR is ~50 dB from the same state (~15 dB when measured from a
    # state the layer measurement had advanced)
    assert c.report().records[0].sqnr_db > 40
    for i in range(3):
        (out, before), (ref, ref_before) = c(x), twin(x)
        # the running mean before the first call is the model's, exactly; later ones hold int8 weights' error
        torch.testing.assert_close(before, ref_before, rtol=0, atol=0 if i == 0 else 0.01)
        torch.testing.assert_close(out, ref, rtol=0, atol=0.05)      # int8 weights: a few 1e-3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert float(c.graph.get_buffer("calls")) == 5.0
    loaded = slimfx.load(slimfx.save(c, tmp_path / "m"), backend=backend)
    torch.testing.assert_close(loaded(x)[0], c(x)[0], rtol=0, atol=1e-6)        # both at their 6th call


def test_symbolic_trace_of_a_forward_writing_its_buffers_is_refused_and_puts_them_back():
    """fx.symbolic_trace runs ``self.calls += 1`` once at trace time and records ``self.mean.add_(...)`` on a
    constant: its graph would silently drop the model's state; refused naming the tensors, the model as it was."""
    import slimfx
    model, x = Counting().eval(), torch.randn(5, 8)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ir.CaptureError, match=r"writes into its tensors \['calls', 'mean'\].*method='export'"):
        slimfx.compile(model, (x,), capture="symbolic_trace", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())


def test_dynamic_capture_checks_the_dims_export_kept_static():
    """dynamic=True on a forward that loops over the sequence: export unrolls the loop for the example's length
    and keeps that dim as a constant SymInt, which the input check took for a symbol (any size): T=7 ran the
    first 5 steps only, silently, and a wrong feature size failed deep inside."""
    import slimfx

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.zeros_like(x[:, 0])
            for t in range(x.shape[1]):
                h = torch.tanh(self.lin(x[:, t]) + h)
            return h

    model, x = Loop().eval(), torch.randn(2, 5, 8)
    cm = slimfx.compile(model, (x,), dynamic=True, progress=False)
    x3 = torch.randn(3, 5, 8)                                   # the batch still varies
    torch.testing.assert_close(cm(x3), model(x3), rtol=1e-5, atol=1e-6)
    with pytest.raises(slimfx.InputError, match=r"dim 1 is 7, but it was compiled static at 5 \(the model fixes"):
        cm(torch.randn(2, 7, 8))
    with pytest.raises(slimfx.InputError, match=r"dim 2 is 9, but it was compiled static at 8"):
        cm(torch.randn(2, 5, 9))


class _Baddbmm(torch.nn.Module):
    def __init__(self, beta, alpha):
        super().__init__()
        self.beta, self.alpha = beta, alpha

    def forward(self, c, a, b):
        return torch.baddbmm(c, a, b, beta=self.beta, alpha=self.alpha)


@pytest.mark.parametrize("beta, alpha", [(0, 0.5), (0.0, 1), (2.0, 1), (1, -1.5)])
def test_baddbmm_is_expanded_as_torch_computes_it(beta, alpha):
    """Canonicalization writes baddbmm as beta * c + alpha * bmm(a, b); with beta 0 torch ignores c, whose NaN
    and inf then reached the result (0 * NaN) on both backends."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 7, 4, generator=g)
    c = torch.randn(1, 5, 4, generator=g)                 # broadcast over the batch, as BLOOM's ALiBi bias is
    c[0, 1, 2], c[0, 3, 0] = float("nan"), float("inf")
    model = _Baddbmm(beta, alpha)
    ref = model(c, a, b)
    for backend in ("torch", "numpy"):
        out = slimfx.compile(model, (c, a, b), backend=backend, progress=False)(c, a, b)
        # fp32, one bmm of 7 products: the backends sum in other orders (a few ulp); non-finite where torch's is
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_dynamic_is_checked_and_never_silently_dropped():
    """dynamic='yes' and 1 went to export unchecked; an export failure with dynamic asked for fell back to
    fx.symbolic_trace, whose static graph then refused another batch telling the user to pass dynamic=True."""
    x = torch.randn(2, 8)
    for bad in ("yes", 1):
        with pytest.raises(ir.CaptureError, match=r"dynamic must be True, False, None or torch.export's"):
            ir.capture(_OneLinear(), (x,), dynamic=bad)
    with pytest.raises(ir.CaptureError, match=r"'symbolic_trace' cannot keep dims dynamic \(dynamic=True\).* capture "
                       r"with capture='export' \(slimfx.capture: method='export'\)"):     # compile's keyword too
        ir.capture(_OneLinear(), (x,), dynamic=True, method="symbolic_trace")
    spec = {"x": {0: torch.export.Dim("B", min=4, max=8)}}        # the example's batch 2 is outside it
    with pytest.raises(ir.CaptureError) as e:
        slimfx.compile(_OneLinear(), (x,), dynamic=spec, progress=False)
    msg = str(e.value)
    assert "torch.export: ConstraintViolationError: 2 not in range [4, 8]" in msg      # export's own reason
    assert "fx.symbolic_trace: CaptureError: not tried: it cannot keep dims dynamic" in msg
    assert "dynamic=False to take the symbolic_trace path" in msg
    # static requests still take symbolic_trace: False, and a spec that marks no dim
    for static in (False, {"x": None}):
        assert ir.capture(_OneLinear(), (x,), dynamic=static, method="symbolic_trace").method == "symbolic_trace"


class _SymtraceSpellings(nn.Module):
    """Calls fx.symbolic_trace records as written: one int as a size, a dtype read off a node, an int split."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, mask):
        h = self.lin(x)
        h = h * mask.unsqueeze(-1).to(h.dtype)
        a = h.split(4, dim=1)[0]                      # split.Tensor, not split([4]), which needs sizes summing to 8
        return h.view(-1).reshape(16) + a.reshape(-1).repeat(2)


def test_symbolic_trace_single_sizes_and_dtype_nodes_become_the_right_aten_calls():
    """x.view(-1) and x.reshape(16) failed canonicalization (one int for a size list), x.to(h.dtype) became
    aten.to.other (a tensor wanted, a dtype given), x.split(4) became split with sizes [4] (wrong at run time)."""
    import operator

    from slimfx.ir.rewrite import aten_call
    model, x, mask = _SymtraceSpellings().eval(), torch.randn(2, 8), torch.tensor([1, 0])
    c = ir.capture(model, (x, mask), method="symbolic_trace")
    with torch.no_grad():
        torch.testing.assert_close(c.gm(x, mask), model(x, mask), rtol=0, atol=0)   # the same fp32 ops
    calls = {n.target: n.args for n in c.gm.graph.nodes if n.op == "call_function"}
    assert calls[aten.to.dtype][1] is torch.float32          # a constant, as torch.export records it
    assert calls[aten.view.default][1] == [-1] and aten.split.Tensor in calls
    assert [t for t in calls if not isinstance(t, torch._ops.OpOverload)] == [operator.getitem]
    # with no values to read (a rule's pattern), a getattr of .dtype is still a dtype
    gm = torch.fx.symbolic_trace(lambda a, b: a.to(b.dtype))
    to = next(n for n in gm.graph.nodes if n.op == "call_method")
    assert aten_call(to)[0] is aten.to.dtype



class _NamedResults(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 12)

    def forward(self, x):
        y = self.lin(x)
        m = torch.max(y, dim=-1)
        return (y.max(dim=1).values + y.topk(2, -1).values.sum(-1) + y.sort(-1).values[:, 0]
                + y.min(1).indices.float() + m.values + m[0] + y.split(4, -1)[1:][1].mean(-1))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_symbolic_trace_named_result_fields_are_getitems(backend):
    """y.max(dim=1).values (topk / sort / min(dim) .values / .indices) failed canonicalization: the getattr of a
    field of the ATen op's tuple. Now it is the getitem of that field's index, as torch.export records it."""
    import operator
    model, x = _NamedResults().eval(), torch.randn(4, 16)
    cm = slimfx.compile(model, (x,), capture="symbolic_trace", backend=backend, progress=False)
    assert cm.report().capture_method == "symbolic_trace"
    assert not [n for n in cm.graph.graph.nodes if n.target is getattr]
    assert any(n.target is operator.getitem and n.args[1] == 1 for n in cm.graph.graph.nodes)     # .indices
    x = torch.randn(4, 16)                                            # fresh values
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=0, atol=0)         # the same fp32 ops, selections


def test_a_canonicalization_failure_names_the_method_the_node_and_exports_reason(monkeypatch):
    """An exception in canonicalization escaped capture raw (a RuntimeError from deep in torch), and the reason
    export had failed, when symbolic_trace was its fallback, was lost."""
    import importlib
    capture_mod = importlib.import_module("slimfx.ir.capture")      # the module; ir.capture is its function

    def no_export(*a, **k):
        raise ValueError("export refuses this model")

    def broken(gm):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                raise RuntimeError("no ATen op for this call")
    monkeypatch.setattr(capture_mod, "_export", no_export)
    monkeypatch.setattr(capture_mod, "canonicalize", broken)
    with pytest.raises(ir.CaptureError) as e:
        ir.capture(_OneLinear(), (torch.randn(2, 8),))
    msg = str(e.value)
    assert "torch.export: ValueError: export refuses this model" in msg
    assert ("fx.symbolic_trace (canonicalizing its graph at node %lin : [num_users=1] = call_module[target=lin]"
            in msg and "RuntimeError: no ATen op for this call" in msg)
    # named as each function takes it (the hint said method=, which slimfx.compile refused as unknown)
    assert "capture with capture='export' (slimfx.capture: method='export') (fix its error above)" in msg


class _Optional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, y=None, scale=2.0, mode="add"):
        h = self.lin(x) * scale
        h = h + 1 if mode == "add" else h
        return h if y is None else h + y


def test_symbolic_trace_takes_the_defaults_of_arguments_not_given():
    """forward(x, y=None) could not be captured by fx.symbolic_trace ("propagate_meta needs one example input per
    placeholder"): the defaults the call leaves out are constants of the graph, whose inputs are the call's."""
    model, x = _Optional().eval(), torch.randn(3, 8)
    c = ir.capture(model, (x,), method="symbolic_trace")
    assert [n.name for n in c.gm.graph.nodes if n.op == "placeholder"] == ["x"]
    cm = slimfx.compile(model, (x,), capture="symbolic_trace", progress=False)
    x2 = torch.randn(3, 8)
    with torch.no_grad():
        # fp32; the numpy backend sums the linear's products in another order than torch (a few ulp)
        torch.testing.assert_close(cm(x2), model(x2), rtol=1e-5, atol=1e-6)
    with pytest.raises(slimfx.InputError, match=r"input\(s\) \['y'\] were not given at compile time"):
        cm(x2, x2)
    given = ir.capture(model, (x, x), method="symbolic_trace")          # y given: an input, the rest constants
    assert [n.name for n in given.gm.graph.nodes if n.op == "placeholder"] == ["x", "y"]

    class TensorDefault(nn.Module):
        def forward(self, x, bias=torch.ones(8)):
            return x + bias
    with pytest.raises(ir.CaptureError, match=r"parameter 'bias' defaults to a tensor.*give it in the example"):
        ir.capture(TensorDefault(), (x,), method="symbolic_trace")
