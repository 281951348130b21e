"""backend="triton": dialect ops lowered to slimfx.kernels, the rest in torch. On the CPU the kernels run
under Triton's interpreter (set before triton is imported), so shapes stay small.

Exactness: quantized_linear's kernel path (act_quant + int8_gemm, epilogue acc * (s_x * s_w) + bias) does
the dialect's operations in the dialect's order, so its outputs equal the numpy backend's bit for bit.
weight_only_linear sums x @ q.T in fp32 in another order than the reference's x @ dequant(w).T, bounded
by K * eps32 * (|x| @ |w|.T). The rest of a model runs in torch on one side and numpy on the other, so
whole models are compared against backend="torch", which runs the same torch ops.
"""
import json
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import text_batch  # noqa: E402
from slimfx import ir, passes as P  # noqa: E402
from slimfx.backends import lower  # noqa: E402
from slimfx.ir.dialect.sparse import parse_pattern  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
sf = torch.ops.slimfx
EPS32 = float(np.finfo(np.float32).eps)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFX_KERNEL_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "kernel")     # on a GPU: the kernel, not the measured choice
    from slimfx.backends import triton_backend
    monkeypatch.setattr(triton_backend, "_MEMO", {})


def run(gm, backend, *args, **kwargs):
    out = lower(gm, backend)(args, kwargs)
    return torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)


class Net(torch.nn.Module):
    def __init__(self, k=37, n=29, bias=True):
        super().__init__()
        self.a, self.b = torch.nn.Linear(k, n, bias=bias), torch.nn.Linear(n, 11)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _quantized(m, x, **opts):
    ctx = P.PassContext((x,), calibration=[(x,)])
    return P.Quantize(**opts)(ir.capture(m, (x,)).gm, ctx).graph_module


def test_a_weight_form_without_a_kernel_is_labelled_as_such():
    """int4 in groups of 16 has no kernel: the torch reference runs, and the report said '(interpreter:
    correctness mode)' on the CPU (a kernel tested there) or 'measured at the first call' on a GPU (a choice)."""
    torch.manual_seed(2)
    m, x = Net(k=64, n=32).eval(), torch.randn(5, 64)
    gm = _quantized(m, x, weights="int4", group_size=16)
    ref, got = run(gm, "torch", x), run(gm, "triton", x)
    assert torch.equal(got, ref)            # the same torch reference on both
    kernels = {ir.meta.info(n).kernel for n in gm.graph.nodes if n.target is sf.weight_only_linear.default}
    assert kernels == {"torch reference (no kernel for this weight form)"}


def test_kernel_per_token_quant_equals_slimfx_quant():
    from slimfx.kernels import quantize_per_token
    from slimfx.quant.linear import quantize_per_token_torch
    g = torch.Generator().manual_seed(0)
    for shape, dtype in [((1, 1), torch.float32), ((3, 5, 37), torch.float32), ((7, 130), torch.bfloat16)]:
        x = (torch.randn(*shape, generator=g) * 10).to(dtype)
        x[0] = 0                                               # an all-zero row: MIN_SCALE
        q, s = quantize_per_token(x.to(DEV))
        q_ref, s_ref = quantize_per_token_torch(x)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref), (shape, dtype)


@pytest.mark.parametrize("m_rows,bias", [(1, True), (6, False)])
def test_dynamic_quantized_linear_bit_exact(m_rows, bias):
    torch.manual_seed(0)
    x = torch.randn(m_rows, 37) * 3
    gm = _quantized(Net(bias=bias).eval(), x, weights="int8", activations="dynamic")
    assert ir.op_counts(gm)["slimfx.quantized_linear.default"] == 2
    ref = run(gm, "numpy", x)
    got = run(gm, "triton", x)
    assert got.dtype == ref.dtype == torch.float32
    assert torch.equal(got, ref), (got - ref).abs().max()
    kernels = [ir.meta.info(n).kernel for n in gm.graph.nodes if n.target is sf.quantized_linear.default]
    if INTERPRETED:
        assert kernels == ["int8_gemm (interpreter: correctness mode)"] * 2
    else:
        assert kernels == ["int8_gemm (SLIMFX_KERNEL_CHOICE=kernel)"] * 2


def test_static_quantized_linear_bit_exact():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 37)
    gm = _quantized(Net().eval(), x, weights="int8", activations="static")
    assert ir.op_counts(gm)["slimfx.quantized_linear.default"] == 2
    assert torch.equal(run(gm, "triton", x), run(gm, "numpy", x))


@pytest.mark.parametrize("weights,k,n", [("int8", 37, 29), ("int4", 64, 32)])
def test_weight_only_linear(weights, k, n):
    torch.manual_seed(2)
    m = Net(k=k, n=n).eval()
    x = torch.randn(5, k)
    gm = _quantized(m, x, weights=weights, group_size=32)
    assert ir.op_counts(gm)["slimfx.weight_only_linear.default"] == 2
    wo = [n for n in gm.graph.nodes if n.target is sf.weight_only_linear.default][0]
    w = sf.weight_only_linear(torch.eye(k), *[getattr(gm, a.target) if isinstance(a, torch.fx.Node) else a
                                             for a in wo.args[1:]]).T       # dequantized weight of the first
    assert ir.meta.info(wo).kernel is None
    h_ref = run(gm, "numpy", x)
    got = run(gm, "triton", x)
    assert f"{weights}_weight_only_linear" in ir.meta.info(wo).kernel
    # first layer bounded as in the module docstring; the second sees relu of slightly different inputs,
    # so check it end to end against the same bound grown by the second layer's weights
    h = torch.relu(torch.nn.functional.linear(x, w, m.a.bias))
    bound = k * EPS32 * (x.abs() @ w.abs().T + m.a.bias.abs())
    bound2 = (bound @ m.b.weight.abs().T) + n * EPS32 * (h.abs() @ m.b.weight.abs().T + m.b.bias.abs()) * 2
    assert ((got - h_ref).abs() <= bound2.detach() + 1e-7).all(), (got - h_ref).abs().max()
    from slimfx.backends.triton_backend import TritonProgram
    prog = TritonProgram(gm)
    buffers = dict(prog.gm.named_buffers())
    packed = [name for name in buffers if name.endswith("_packed")]
    # int4: the codes reach the device packed two per byte, and only so
    assert len(packed) == (2 if weights == "int4" else 0)
    assert (not [t for t in buffers.values() if t.dtype == torch.int8]) == (weights == "int4")
    for mod in [m for m in prog.gm.modules() if type(m).__name__ == "LoweredWeightOnly"]:
        node = next(n for n in prog.gm.graph.nodes if n.op == "call_module" and n.target.endswith(mod.node_name))
        args = [buffers[a.target] if isinstance(a, torch.fx.Node) else a for a in node.args[1:]]
        k_in = args[0].shape[1] * (2 if weights == "int4" else 1)            # int4: two codes per byte
        xs = torch.randn(3, k_in)
        y, d = mod.kernel(xs, *args), mod.dense(xs, *args)
        # the dense path runs the dequantized weight in bf16 (8 significant bits): a few 2^-8 of the scale
        assert float((d - y).abs().max() / y.abs().max()) < 2e-2


def test_llama_quantized_and_fused_matches_torch_backend(tiny_llama):
    ids, mask = text_batch(2, 5, 97)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    gm = ir.capture(tiny_llama, (), kw, dynamic=True).gm
    gm = P.Quantize(weights="int8", activations="dynamic")(gm, P.PassContext((), kw)).graph_module
    gm = P.Fuse(norm_quant=False)(gm).graph_module
    got, ref = run(gm, "triton", **kw).logits, run(gm, "torch", **kw).logits
    if INTERPRETED:       # same torch CPU ops around bit-exact kernels
        assert torch.equal(got, ref)
    else:                 # cuBLAS/SDPA vs CPU float ops: last bits differ and can move an int8 code by one
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2   # step (~1/127 of a token's scale)
    gm = P.FuseNormQuant()(gm).graph_module
    got, ref = run(gm, "triton", **kw).logits, run(gm, "torch", **kw).logits
    # act_quant's norm divides by sqrt where the graph multiplies by rsqrt: last-bit differences in the
    # normalized x move a code by one step at rounding ties, about 1/127 of one element's scale
    assert float((got - ref).abs().max() / ref.abs().max()) < (1e-3 if INTERPRETED else 1e-2)
    nq = [n for n in gm.graph.nodes if n.target is sf.norm_quantize_per_token.default]
    assert len(nq) == 4 and all(ir.meta.info(n).kernel.startswith("act_quant") for n in nq)


def test_choice_measured_once_and_cached(monkeypatch, tmp_path):
    from slimfx.backends import triton_backend as T
    monkeypatch.setattr(T.C, "interpreting", lambda: False)
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "measure")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    times = iter([0.041, 0.063, 0.09, 0.05])
    import triton.testing
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: next(times))
    assert T.choose("quantized_linear", "M16|K64|N32", "int8_gemm", None, "bf16", None) == \
        (True, "int8_gemm 0.041 ms vs bf16 0.063 ms")
    assert T.choose("quantized_linear", "M64|K64|N32", "int8_gemm", None, "bf16", None) == \
        (False, "bf16: bf16 0.050 ms vs int8_gemm 0.090 ms")
    data = json.loads((tmp_path / "choices.json").read_text())
    assert set(data) == {"Fake GPU|quantized_linear|M16|K64|N32", "Fake GPU|quantized_linear|M64|K64|N32"}
    monkeypatch.setattr(T, "_MEMO", {})                       # a new process: read from the file, no timing
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: pytest.fail("measured twice"))
    assert T.choose("quantized_linear", "M16|K64|N32", "int8_gemm", None, "bf16", None)[0] is True


def test_a_bad_cache_or_choice_never_breaks_a_forward(monkeypatch, tmp_path):
    """A kernel-choice cache the backend cannot read or write (a directory, a JSON list, a damaged entry, an
    unwritable place) costs a measurement and one warning naming it, not the model's first forward; a misspelt
    SLIMFX_KERNEL_CHOICE is refused instead of silently measuring."""
    from slimfx.backends import triton_backend as T
    monkeypatch.setattr(T.C, "interpreting", lambda: False)
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "measure")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    import triton.testing
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: 0.05)
    (tmp_path / "dir").mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "entry.json").write_text(json.dumps({"Fake GPU|op|M1": {"kernel": "k"}}))
    (tmp_path / "file").write_text("")
    for name, warns in [("dir", "cannot read the kernel-choice cache"), ("list.json", "holds no JSON object"),
                        ("entry.json", None), ("file/choices.json", "cannot write the kernel-choice cache")]:
        monkeypatch.setenv("SLIMFX_KERNEL_CACHE", str(tmp_path / name))
        monkeypatch.setattr(T, "_MEMO", {})
        monkeypatch.setattr(T, "_WARNED", set())
        import warnings
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            assert T.choose("op", "M1", "k", None, "dense", None) == (False, "dense: dense 0.050 ms vs k 0.050 ms")
        text = " ".join(str(w.message) for w in got)
        assert (warns in text) if warns else not got, (name, text)
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "Kernel")
    with pytest.raises(ValueError, match=r"SLIMFX_KERNEL_CHOICE='Kernel': expected 'kernel', 'dense' or 'measure'"):
        T.choose("op", "M1", "k", None, "dense", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(weights="int8"), dict(weights="int8", activations="dynamic"),
                                dict(weights="int4", group_size=32)], ids=["w8", "w8a8", "w4"])
def test_dense_path_computes_in_the_layers_dtype(monkeypatch, dtype, kw):
    """Where a bucket measures the dense path faster, it runs the dequantized weight in the model's dtype (it ran in
    bf16 whatever the model: an fp16 model lost 3 mantissa bits there, an fp32 one 16). Forced here on the CPU."""
    from slimfx.backends import triton_backend as T
    monkeypatch.setattr(T.C, "interpreting", lambda: False)
    monkeypatch.setattr(T, "_device", lambda: torch.device("cpu"))
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "dense")
    torch.manual_seed(0)
    m, x = Net(k=64, n=64).eval().to(dtype), torch.randn(5, 64).to(dtype)
    gm = _quantized(m, x, **kw)
    wq = [n for n in gm.graph.nodes if n.target in (sf.weight_only_linear.default, sf.quantized_linear.default)]
    assert len(wq) == 2
    got = run(gm, "triton", x)
    from slimfx.quant.linear import dequantize_weight_torch
    # the dense path: x @ dequant(w).T (+ b) in the model's dtype, activations not quantized
    ref = x.float()
    for n, lin in zip(wq, (m.a, m.b)):
        q, s = ir.meta.tensor_attr(gm, n.args[1]), ir.meta.tensor_attr(gm, n.args[2])
        w = dequantize_weight_torch(q, s, None, kw.get("group_size", 0)).to(dtype)
        ref = torch.nn.functional.linear(ref.to(dtype), w, lin.bias)
        ref = torch.relu(ref) if lin is m.a else ref
    assert got.dtype == dtype
    # the same ops in the same dtype: only CPU summation order may differ
    assert float((got.double() - ref.double()).abs().max() / ref.double().abs().max()) < (1e-6 if dtype == torch.float32
                                                                                          else 2e-3)


def test_kernel_errors_name_the_node():
    torch.manual_seed(3)
    x = torch.randn(2, 37)
    gm = _quantized(Net().eval(), x, weights="int8", activations="dynamic")
    with pytest.raises(ValueError, match=r"triton backend: node quantized_linear_default \(quantized_linear\)"):
        run(gm, "triton", torch.randn(2, 36))


def test_backend_options_are_checked_before_any_work():
    import slimfx
    with pytest.raises(ValueError, match=r"backend_options: the 'triton' backend has no option 'cuda_graph'; "
                                         r"its options: cuda_graphs \(capture"):
        slimfx.compile(Net(), (torch.randn(2, 37),), backend="triton", backend_options={"cuda_graph": True},
                       passes=[lambda gm: pytest.fail("a pass ran before the options were checked")])
    with pytest.raises(ValueError, match=r"the 'numpy' backend has no option 'cuda_graphs'; its options: none"):
        slimfx.compile(Net(), (torch.randn(2, 37),), backend="numpy", backend_options={"cuda_graphs": True})


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's refusal")
def test_cuda_graphs_need_cuda():
    gm = _quantized(Net().eval(), torch.randn(2, 37), weights="int8", activations="dynamic")
    with pytest.raises(ValueError, match="cuda_graphs=True: CUDA graphs need a CUDA device"):
        lower(gm, "triton", {"cuda_graphs": True})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_matches_eager():
    """Two input signatures, each captured once; replays equal eager runs and return fresh tensors."""
    torch.manual_seed(0)
    gm = _quantized(Net().eval(), torch.randn(2, 37), weights="int8", activations="dynamic")
    eager, graphed = lower(gm, "triton"), lower(gm, "triton", {"cuda_graphs": True})
    for rows in (2, 2, 5):
        x = torch.randn(rows, 37)
        a, b = eager((x,), {}), graphed((x,), {})
        assert torch.equal(a, b)
    assert len(graphed.program._graphs) == 2
    y1 = graphed((torch.ones(2, 37),), {})
    y2 = graphed((torch.zeros(2, 37),), {})
    assert not torch.equal(y1, y2)            # the first result was not overwritten by the second replay


class SparseNet(torch.nn.Module):
    """a: 2:4 (+ relu after the kernel); b: 10 of 15 32x32 blocks zero (+ silu and the residual in the BSR
    epilogue); c: 4 of 6 blocks zero (+ erf GELU, which the BSR epilogue lacks: in torch after it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b, self.c = torch.nn.Linear(40, 130), torch.nn.Linear(130, 70), torch.nn.Linear(70, 33)
        with torch.no_grad():
            w = self.a.weight.view(130, 10, 4)
            w.scatter_(-1, torch.rand(130, 10, 4).argsort(-1)[..., :2], 0.0)
            self.b.weight[:, :64] = 0
            self.b.weight[32:, 64:128] = 0
            self.c.weight[:, :64] = 0

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.nn.functional.silu(self.b(h)) + h[..., :70]
        return torch.nn.functional.gelu(self.c(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_lowered_to_sparse_kernels(dtype):
    m = SparseNet().eval().to(dtype)
    x = torch.randn(3, 5, 40).to(dtype)
    gm = ir.capture(m, (x,)).gm
    gm = P.Fuse()(gm).graph_module
    gm = P.LowerSparse(block=(32, 32))(gm).graph_module
    nodes = {ir.meta.module_name(n): n for n in gm.graph.nodes if n.target is sf.sparse_linear.default}
    assert {k: (n.args[3], n.args[5]) for k, n in nodes.items()} == \
        {"a": ("relu", "2:4"), "b": ("silu", "block:32x32"), "c": ("gelu", "block:32x32")}
    assert nodes["b"].args[4] is not None                          # the residual went into the op
    ref, got = run(gm, "torch", x), run(gm, "triton", x)
    kernels = {k: ir.meta.info(n).kernel for k, n in nodes.items()}
    if dtype == torch.float32:
        assert kernels["a"].startswith("sparse24_linear")
        assert kernels["b"] == kernels["c"] == "torch (no block:32x32 kernel for float32 weights)"
        # another summation order than the CPU GEMM: K * eps32 * (|x| @ |w|.T) per layer, ~2e-5 of the
        # layer's scale at K = 130; three layers of O(1) gain stay well under 1e-4
        tol = 1e-4
    else:
        assert kernels["a"].startswith("sparse24_linear") and kernels["b"].startswith("bsr_linear 32x32")
        assert kernels["c"].startswith("bsr_linear 32x32")
        # fp32 accumulation rounded once to bf16 vs torch's CPU bf16 GEMM: an output may differ by one bf16
        # ulp (2^-8 relative) where the two sums fall on either side of a rounding boundary, and the next
        # layers carry it: a few ulps of the output scale
        tol = 2e-2
    assert got.dtype == dtype
    assert float((got.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol


def test_sparse_linear_pattern_checked_at_lowering():
    x = torch.randn(2, 40)
    gm = ir.capture(SparseNet().eval(), (x,)).gm
    gm = P.LowerSparse(block=(32, 32))(gm).graph_module
    b = [n for n in gm.graph.nodes if n.target is sf.sparse_linear.default and n.args[5] != "2:4"][0]
    b.args = (*b.args[:5], "2:4")                   # a graph that declares a pattern its weight breaks
    gm.recompile()
    with pytest.raises(ValueError, match=rf"triton backend: node {b.name} \(sparse_linear\): the weight does not "
                                         r"satisfy its pattern '2:4': K = 130 is not a multiple of 4"):
        lower(gm, "triton")


def test_block_sparse_w8a8_runs_bsr_int8_bit_exact():
    """LowerSparse after Quantize: the W8A8 layers with zero blocks stay quantized_linear and run on
    bsr_int8_gemm, which sums the same int32 products (zero blocks add nothing) with the same epilogue."""
    x = torch.randn(2, 3, 40)
    gm = _quantized(SparseNet().eval(), x, weights="int8", activations="dynamic")
    res = P.LowerSparse(block=(32, 32))(gm)
    assert res.stats["lowered"] == {"b": "block:32x32 (int8)", "c": "block:32x32 (int8)"}
    assert res.stats["skipped"] == {"a": "0% zero 32x32 blocks < 50%; int8 2:4 has no kernel"}
    got, ref = run(gm, "triton", x), run(gm, "torch", x)
    kernels = sorted(ir.meta.info(n).kernel.split(" (")[0] for n in gm.graph.nodes
                     if n.target is sf.quantized_linear.default)
    assert kernels == ["bsr_int8_gemm 32x32", "bsr_int8_gemm 32x32", "int8_gemm"]
    if INTERPRETED:        # the same torch CPU ops around bit-exact kernels
        assert torch.equal(got, ref)
    else:                  # cuBLAS/CUDA elementwise vs CPU ops between the layers: last bits, and a code
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2     # moved by one step at a tie


def _lowered_sparse(dtype, quantize: bool, lower_sparse: bool = True):
    """SparseNet (a: 2:4, b and c: zero blocks, lowered in the shapes LowerSparse reads off them) in
    ``dtype``, Fuse'd and LowerSparse'd (after W8A8 where ``quantize``), and its input."""
    m = SparseNet().eval().to(dtype)
    x = torch.randn(3, 5, 40).to(dtype)
    gm = _quantized(m, x, weights="int8", activations="dynamic") if quantize else ir.capture(m, (x,)).gm
    if not quantize:
        gm = P.Fuse()(gm).graph_module
    if lower_sparse:
        gm = P.LowerSparse()(gm).graph_module
    return gm, x


def _measured(monkeypatch, use_kernel: bool):
    """Each new shape bucket runs both paths, as a measurement does, then takes the kernel or the dense
    path (the interpreter itself always takes the kernel)."""
    from slimfx.backends import triton_backend

    def choose(op, bucket, kernel_name, kernel_fn, dense_name, dense_fn, graphs=False):
        kernel_fn(), dense_fn()
        return use_kernel, kernel_name if use_kernel else dense_name
    monkeypatch.setattr(triton_backend, "choose", choose)


def _dense_weights(gm, op):
    return {n.args[1].target for n in gm.graph.nodes if n.target is op}


def test_sparse_layers_hold_only_their_packed_weights(monkeypatch):
    """A 2:4 / block-sparse layer keeps its packed weight on the device, not the dense one beside it: the
    program holds the packed forms and biases, here less than half the dense weights. A bucket that takes
    the dense path rebuilds the dense weight from the packed form, exactly (the same torch ops as
    backend="torch": equal outputs), keeps it while some bucket uses it, and lets it go when every bucket
    takes the kernel."""
    gm, x = _lowered_sparse(torch.bfloat16, quantize=False)
    dense = _dense_weights(gm, sf.sparse_linear.default)
    dense_bytes = sum(getattr(gm, t).untyped_storage().nbytes() for t in dense)
    exe = lower(gm, "triton")
    assert len(dense) == 3 and not {name for name, _ in exe.program.gm.named_buffers()} & dense
    from slimfx.kernels import compress_24, to_bsr
    packed = 2 * (130 + 70 + 33)                                     # the biases
    for n in gm.graph.nodes:
        if n.target is sf.sparse_linear.default:
            w, pattern = getattr(gm, n.args[1].target), n.args[5]
            parts = compress_24(w) if pattern == "2:4" else \
                [t for t in vars(to_bsr(w, parse_pattern(pattern))).values() if isinstance(t, torch.Tensor)]
            packed += sum(t.untyped_storage().nbytes() for t in parts)
    assert exe.program.held_bytes() == {"weights": packed, "dense_copies": 0}
    assert packed < 0.5 * dense_bytes
    _measured(monkeypatch, use_kernel=False)
    exe = lower(gm, "triton")
    assert torch.equal(exe((x,), {}), run(gm, "torch", x))
    assert exe.program.held_bytes()["dense_copies"] == dense_bytes
    _measured(monkeypatch, use_kernel=True)
    exe((torch.randn(4, 9, 40).to(torch.bfloat16),), {})           # another bucket takes the kernel: the
    assert exe.program.held_bytes()["dense_copies"] == dense_bytes   # first one still runs the dense path
    exe = lower(gm, "triton")
    exe((x,), {})
    assert exe.program.held_bytes()["dense_copies"] == 0


def test_w8a8_layers_let_their_dequantized_copies_go(monkeypatch):
    """Measuring builds a copy of each W8A8 weight in the layer's dtype (fp32 here) for the dense side; once the
    kernel is chosen it
    goes, so the program holds int8 weights, the block-sparse layers only their int8 BSR blocks. Their dense
    path rebuilds the int8 weight from the blocks: the same outputs as the layers without a block pattern."""
    gm, x = _lowered_sparse(torch.float32, quantize=True)
    blocky = {n.args[1].target for n in gm.graph.nodes
              if n.target is sf.quantized_linear.default and ir.meta.info(n).sparse}
    assert len(blocky) == 2
    _measured(monkeypatch, use_kernel=True)
    exe = lower(gm, "triton")
    assert not {name for name, _ in exe.program.gm.named_buffers()} & blocky
    exe((x,), {})
    assert exe.program.held_bytes()["dense_copies"] == 0
    _measured(monkeypatch, use_kernel=False)
    exe = lower(gm, "triton")
    got = exe((x,), {})
    fp32 = 4 * sum(getattr(gm, t).numel() for t in _dense_weights(gm, sf.quantized_linear.default))
    assert exe.program.held_bytes()["dense_copies"] == fp32      # the weights (the fp32 biases are not copied)
    plain, _ = _lowered_sparse(torch.float32, quantize=True, lower_sparse=False)
    assert torch.equal(got, lower(plain, "triton")((x,), {}))


def test_held_bytes_counts_what_each_backend_keeps():
    """CompiledModel.held_bytes: the float model's parameters; after int4 Quantize, the int8 codes + scales +
    biases on torch, and on triton the codes packed two per byte (half their bytes), nothing else changed."""
    import slimfx
    m, x = Net(k=64, n=64).eval(), torch.randn(3, 64)
    params = sum(p.numel() * 4 for p in m.parameters())
    assert slimfx.compile(m, (x,), passes=[], progress=False).held_bytes() == {"weights": params,
                                                                               "dense_copies": 0}
    cm = slimfx.compile(m, (x,), passes=[P.Quantize(weights="int4", group_size=32)], backend="torch",
                        progress=False)
    codes, scales, biases = 64 * 64 + 11 * 64, 4 * (64 * 2 + 11 * 2), 4 * (64 + 11)
    assert cm.held_bytes() == {"weights": codes + scales + biases, "dense_copies": 0}
    on_triton = cm.with_backend("triton")
    assert on_triton.held_bytes() == {"weights": codes // 2 + scales + biases, "dense_copies": 0}
    ref = cm(x)                 # the same dequantized weights, fp32 sums in another order (K = 64)
    assert float((on_triton(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_one_tensor_under_two_names_goes_to_the_device_once():
    """A graph reading one tensor under two attribute names (tied weights a capture did not merge) gets one
    device copy, read by both: held_bytes counts it once and both layers compute with it."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)).eval()
    x = torch.randn(2, 8)
    gm = ir.capture(m, (x,)).gm
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(targets) == 2
    first = getattr(gm, targets[0])
    *path, leaf = targets[1].split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    delattr(owner, leaf)
    owner.register_buffer(leaf, first)                    # the second name now reads the first tensor
    exe = lower(gm, "triton")
    on_device = [exe.program.gm.get_buffer(t) for t in targets]
    assert on_device[0] is on_device[1]          # one copy (on the CPU .to() would share storage anyway)
    assert exe.program.held_bytes() == {"weights": 8 * 8 * 4, "dense_copies": 0}
    w = first.detach()
    assert torch.equal(exe((x,), {}), x @ w.T @ w.T)


def _mixtral_experts_quantized(hidden: int, intermediate: int, layers: int, **quantize):
    """A tiny random Mixtral (4 experts, top 2) captured with its experts Quantize'd, and its call."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=97, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=layers, intermediate_size=intermediate, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    gm = P.Quantize(include=("*.experts",), **quantize)(ir.capture(model, (), kw, dynamic=True).gm,
                                                        P.PassContext((), kw)).graph_module
    return gm, kw


@pytest.mark.parametrize("weights,group_size", [("int8", None), ("int4", 32)])
def test_quantized_experts_run_the_grouped_kernel(weights, group_size, monkeypatch):
    """A Mixtral whose experts Quantize stored int8 per channel or int4 per group: the triton backend multiplies
    the routed tokens by the quantized experts in int8/int4_grouped_weight_only (no dequantize left in the
    lowered graph; int4 packed two per byte, the int8 codes not kept) and matches the torch backend; the
    dense path a GPU may choose instead (dequantize the packed codes + grouped GEMM) agrees at every call."""
    from slimfx.backends.triton_backend import TritonProgram
    gm, kw = _mixtral_experts_quantized(64, 96, 2, weights=weights, group_size=group_size)
    prog = TritonProgram(gm)
    lowered = [m for m in prog.gm.modules() if type(m).__name__ == "LoweredGroupedWeightOnly"]
    assert len(lowered) == 4                                    # gate_up and down in 2 blocks
    assert not [n for n in prog.gm.graph.nodes if n.target is sf.dequantize.default]
    kernel = f"{weights}_grouped_weight_only"
    assert all(ir.meta.info(n).kernel.startswith(kernel) for n in gm.graph.nodes
               if n.op == "call_function" and "grouped_mm" in str(n.target))
    codes = [t for name, t in prog.gm.named_buffers() if t.dtype == torch.int8]
    packed = [t for name, t in prog.gm.named_buffers() if name.endswith("_packed")]
    assert (len(codes), len(packed)) == ((4, 0) if weights == "int8" else (0, 4))
    kernel_fn, gaps = type(lowered[0]).kernel, []

    def kernel_and_dense(self, *args):
        y = kernel_fn(self, *args)
        gaps.append(float((self.dense(*args) - y).abs().max() / y.abs().max()))
        return y

    monkeypatch.setattr(type(lowered[0]), "kernel", kernel_and_dense)
    got, ref = run(gm, "triton", **kw).logits, run(gm, "torch", **kw).logits
    # fp32 both: the kernel scales the fp32 (group) sums where the graph sums the dequantized products
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert len(gaps) == 4 and max(gaps) < 1e-5, gaps


def test_experts_asked_for_w8a8_say_they_stay_weight_only():
    """Experts take no activation quantization: with only experts chosen the statistics said 'W8A8 dynamic
    per-token' while every expert line said weight-only and the kernels were weight-only ones."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=1, intermediate_size=48,
                                             num_local_experts=4, num_experts_per_tok=2)).eval()
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    res = P.Quantize(include=("*.experts",), activations="dynamic")(ir.capture(model, (), kw).gm, P.PassContext((), kw))
    assert res.stats["layers"] == 0
    assert res.stats["mode"] == "W8A16 (experts are weight-only; no dense layer was quantized)"


def test_experts_in_other_int4_groups_keep_the_torch_path():
    """int4 groups narrower than the kernel's two 16-deep dots (16 here): dequantize + the grouped GEMM."""
    from slimfx.backends.triton_backend import TritonProgram
    gm4, kw = _mixtral_experts_quantized(32, 48, 1, weights="int4", group_size=16)
    assert not [m for m in TritonProgram(gm4).gm.modules() if type(m).__name__ == "LoweredGroupedWeightOnly"]
    assert torch.equal(run(gm4, "triton", **kw).logits, run(gm4, "torch", **kw).logits)
