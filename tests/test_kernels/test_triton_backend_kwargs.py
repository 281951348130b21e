"""backend="triton" on graphs the numpy and torch backends run: dialect ops called with keyword arguments
(a user pass may write them so), W8A8 layers wider than act_quant's rows (K > 32768) or than the int32
accumulator allows (K > 131071), and errors raised while a bucket's choice is measured, which name the node.
On the CPU the kernels run under Triton's interpreter (tests/test_kernels/conftest.py), so shapes stay small."""
import pytest
import torch

from slimfx import ir, passes as P
from slimfx.backends import lower
from slimfx.backends import triton_backend as T
from slimfx.quant.linear import MAX_K

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
sf = torch.ops.slimfx
LINEAR_OPS = (sf.quantized_linear.default, sf.weight_only_linear.default, sf.sparse_linear.default)


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFX_KERNEL_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "kernel")     # on a GPU: the kernel, not the measured choice
    monkeypatch.setattr(T, "_MEMO", {})


def run(gm, backend, *args):
    out = lower(gm, backend)(args, {})
    return out.cpu() if isinstance(out, torch.Tensor) else out


def _quantized(m, x, **opts):
    ctx = P.PassContext((x,), calibration=[(x,)])
    return P.Quantize(**opts)(ir.capture(m, (x,)).gm, ctx).graph_module


def _as_keywords(gm, keep: int = 1):
    """Every linear dialect call with its arguments past the first ``keep`` given by name (a valid graph)."""
    changed = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LINEAR_OPS:
            names = [a.name for a in n.target._schema.arguments]
            n.args, n.kwargs = n.args[:keep], {**dict(zip(names[keep:], n.args[keep:])), **n.kwargs}
            changed += 1
    gm.recompile()
    assert changed
    return gm


class Net(torch.nn.Module):
    def __init__(self, k=64, n=32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(k, n), torch.nn.Linear(n, 11)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("keep", [1, 3])
def test_w8a8_called_with_keywords_bit_exact(keep):
    x = torch.randn(3, 64)
    gm = _as_keywords(_quantized(Net().eval(), x, weights="int8", activations="dynamic"), keep)
    assert torch.equal(run(gm, "triton", x), run(gm, "numpy", x))


@pytest.mark.parametrize("kw", [dict(weights="int8"), dict(weights="int4", group_size=32)], ids=["w8", "w4g32"])
def test_weight_only_called_with_keywords(kw):
    x = torch.randn(2, 3, 64)
    gm = _as_keywords(_quantized(Net().eval(), x, **kw), 1)
    ref, got = run(gm, "numpy", x), run(gm, "triton", x)
    # x @ q.T summed in fp32 in another order than numpy's x @ dequant(w).T: ~K * eps32 of the output scale
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    kernels = {ir.meta.info(n).kernel.split(" (")[0] for n in gm.graph.nodes if n.target in LINEAR_OPS}
    assert kernels == {"int8_weight_only_linear" if kw["weights"] == "int8" else "int4_weight_only_linear"}


class SparseNet(torch.nn.Module):
    """a: 2:4; b: half its 32 x 32 blocks zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = torch.nn.Linear(40, 64), torch.nn.Linear(64, 48)
        with torch.no_grad():
            self.a.weight.view(64, 10, 4).scatter_(-1, torch.rand(64, 10, 4).argsort(-1)[..., :2], 0.0)
            self.b.weight[:32, :32] = 0
            self.b.weight[32:, 32:] = 0

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_sparse_linear_called_with_keywords():
    m, x = SparseNet().eval().half(), torch.randn(3, 40).half()
    gm = P.LowerSparse(block=(32, 32))(P.Fuse()(ir.capture(m, (x,)).gm).graph_module).graph_module
    gm = _as_keywords(gm, 1)
    ref, got = run(gm, "torch", x), run(gm, "triton", x)
    kernels = sorted(ir.meta.info(n).kernel.split(" (")[0] for n in gm.graph.nodes if n.target in LINEAR_OPS)
    assert kernels == ["bsr_linear 32x32", "sparse24_linear"]
    # fp32 sums rounded once to fp16 vs torch's CPU fp16 GEMM: a few fp16 ulps (2^-11) of the output scale
    assert float((got.float() - ref.float()).abs().max() / ref.float().abs().max()) < 4e-3


def test_w8a8_wider_than_act_quant_rows():
    """K = 32770 > act_quant.MAX_K (a row in registers): the activations are quantized by the torch reference
    (bit for bit the kernel's), the GEMM is still int8_gemm, and the result is the numpy backend's exactly."""
    torch.manual_seed(1)
    m, x = torch.nn.Sequential(torch.nn.Linear(32770, 3)).eval(), torch.randn(2, 32770)
    gm = _quantized(m, x, weights="int8", activations="dynamic")
    assert torch.equal(run(gm, "triton", x), run(gm, "numpy", x))
    node = next(n for n in gm.graph.nodes if n.target is sf.quantized_linear.default)
    assert ir.meta.info(node).kernel.startswith("int8_gemm")


def test_w8a8_past_max_k_takes_the_dense_path():
    """K > quant.linear.MAX_K: the int32 accumulator could overflow, so the bucket takes the dense path,
    unmeasured, and the node's info says why."""
    g = torch.Generator().manual_seed(2)
    k = MAX_K + 1
    w_q = torch.randint(-127, 128, (2, k), dtype=torch.int8, generator=g)
    w_scale, x = torch.rand(2, generator=g) * 0.01, torch.randn(1, k, generator=g)
    info = ir.meta.NodeInfo()
    mod = T.LoweredQuantizedLinear(info, "big", w_q)
    got = mod(x, w_q, w_scale)
    assert torch.equal(got, torch.nn.functional.linear(x, w_q.float() * w_scale[:, None]))
    assert info.kernel == (f"dense float32: K = {k} exceeds {MAX_K}, past which the int8 GEMM's int32 "
                           f"accumulator could overflow")


def test_errors_while_measuring_name_the_node(monkeypatch):
    """A kernel that fails while its bucket is being measured (choose() runs it) names the node, as a failure
    at a later call does."""
    monkeypatch.setattr(T.C, "interpreting", lambda: False)     # CPU tensors then refused by the launchers
    monkeypatch.setattr(T, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setenv("SLIMFX_KERNEL_CHOICE", "measure")
    import triton.testing
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), 0.05)[1])
    x = torch.randn(2, 64)
    gm = _quantized(Net().eval(), x, weights="int8", activations="dynamic")
    with pytest.raises(ValueError, match=r"triton backend: node quantized_linear_default \(quantized_linear\): x: "
                                         r"Triton kernels need CUDA tensors"):
        run(gm, "triton", x)
