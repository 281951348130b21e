"""slimfx.compile_causal_lm: generation with a KV cache from one compiled step graph.

What must hold: greedy tokens equal transformers' own ``generate`` (with its KV cache, left padding, a
1-token prompt, end-of-sequence); the cache a decode step builds gives the logits a fresh prefill of the whole
sequence gives (the cache is consistent, also after quantization); saved and loaded, it generates the same.
"""
import json
import os
import pathlib

import pytest
import torch

import slimfx
from conftest import text_batch
from slimfx import passes as P

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def compiled(llama):
    lms = {"numpy": slimfx.compile_causal_lm(llama, backend="numpy", progress=False)}
    lms["torch"] = lms["numpy"].with_backend("torch")    # the same step graph: one export, not two
    lms["numpy"].min_cache = 8        # its cache buffer grows 8 -> 16 -> 32 slots within a test's generation
    return lms


def hf_generate(model, ids, mask, n, eos=None, pad=0):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=pad)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("batch, length", [(2, 9), (1, 1), (1, 2), (3, 5)])
def test_greedy_tokens_equal_transformers_generate(llama, compiled, backend, batch, length):
    ids, mask = text_batch(batch, length, 97, pad_left=True, seed=batch * 10 + length)
    mask[:, -1] = 1                                     # left padding only
    ref = hf_generate(llama, ids, mask, 11)
    got = compiled[backend].generate(ids, mask, max_new_tokens=11)
    # exact: argmax of logits that agree to float rounding (the torch backend runs the same ops as eager)
    assert torch.equal(got, ref), f"\n got {got.tolist()}\n ref {ref.tolist()}"
    assert compiled[backend].last_timing["new_tokens"] == 11


def test_end_of_sequence_stops_a_row_and_pads_it(llama, compiled):
    ids, mask = text_batch(2, 6, 97, pad_left=True, seed=3)
    free = compiled["numpy"].generate(ids, mask, max_new_tokens=8)
    eos = int(free[0, 6 + 2])                          # row 0's third new token becomes end-of-sequence
    ref = hf_generate(llama, ids, mask, 8, eos=eos, pad=5)
    got = compiled["numpy"].generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(got, ref), f"\n got {got.tolist()}\n ref {ref.tolist()}"
    assert (got[0, 6 + 3:] == 5).all()                 # padded after its end-of-sequence


def test_prompt_ids_past_the_logits_generate(llama):
    """An embedding with more rows than the output layer has logits (a prompt id past them, never generated): the
    held-token bookkeeping of repetition_penalty broke every generate on such a prompt; now the tokens equal
    transformers', and with a penalty the id is left out."""
    import copy
    model = copy.deepcopy(llama)
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(48, 90, bias=False)        # 97 embedding rows, 90 logits
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    ids = torch.tensor([[5, 95, 7, 8], [3, 4, 96, 2]])
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids, max_new_tokens=5), ref)
    assert lm.generate(ids, max_new_tokens=5, repetition_penalty=1.5).shape == (2, 9)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_min_new_tokens_hold_back_end_of_sequence(llama, compiled, backend):
    """min_new_tokens bans the end-of-sequence tokens until a row has that many new ones, as transformers does:
    a row that would end at its third token goes on to the fifth at least (an end-of-sequence id past the
    vocabulary is never chosen, and left out, as transformers leaves it); bad values are refused."""
    ids, mask = text_batch(2, 6, 97, pad_left=True, seed=3)
    lm = compiled[backend]
    eos = int(lm.generate(ids, mask, max_new_tokens=8)[0, 6 + 2])      # row 0's third new token
    got = lm.generate(ids, mask, max_new_tokens=8, eos_token_id=[eos, 200], pad_token_id=5, min_new_tokens=5)
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                         pad_token_id=5, min_new_tokens=5)
    assert torch.equal(got, ref), f"\n got {got.tolist()}\n ref {ref.tolist()}"
    assert (got[0, 6:6 + 5] != eos).all() and (got[0, 6 + 2] != eos)
    for bad in (-1, 2.5, None):
        with pytest.raises(ValueError, match="min_new_tokens must be an integer >= 0"):
            lm.stream(ids, min_new_tokens=bad)


def _decode_vs_prefill(lm, ids, mask, steps=6):
    """Max |decode-step logits - logits of a prefill of the whole sequence so far| over ``steps`` tokens."""
    logits, state = lm.prefill(ids, mask)
    tok = logits[:, -1].argmax(-1)
    seq, full_mask, worst, scale = ids, mask, 0.0, logits.abs().max().item()
    for _ in range(steps):
        step_logits = lm.decode(tok, state)
        seq = torch.cat([seq, tok[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
        fresh = lm.prefill(seq, full_mask)[0][:, -1]
        worst = max(worst, (step_logits - fresh).abs().max().item())
        tok = step_logits.argmax(-1)
    return worst, scale


@pytest.mark.parametrize("passes", [
    pytest.param(lambda: [], id="float"),
    pytest.param(lambda: [P.Quantize(weights="int8", activations="dynamic-per-token")], id="W8A8"),
    pytest.param(lambda: [P.Prune(0.5, pattern="2:4"), P.Quantize(weights="int4", group_size=16)], id="2:4+W4"),
])
def test_the_cache_gives_the_logits_of_a_fresh_prefill(llama, passes):
    """Per-token activation scales and weight-only layers make each row's result independent of the other
    rows, so a decode step over the cache computes what a prefill of the whole sequence computes for its last
    position, up to float summation order: 1e-5 of the logits' scale (fp32 has 6e-8 per rounding; sums of 48-80
    terms and softmax over <= 16 positions stay far below)."""
    lm = slimfx.compile_causal_lm(llama, passes=passes(), backend="numpy", progress=False)
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=4)
    mask[:, -1] = 1
    worst, scale = _decode_vs_prefill(lm, ids, mask)
    assert worst <= 1e-5 * scale, (worst, scale)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_query_heads_pruned_through_the_step_graph_generate_as_the_zeroed_model(llama, backend):
    """Prune(pattern="query_heads") on the step graph: the step returns each layer's keys and values as the new
    cache, which removing q heads leaves as they are (the cache layout stays), so q_proj and o_proj shrink and the
    tokens are transformers' from the model with those heads' o_proj columns zeroed; whole kv groups would change
    the cache, and "heads" says so."""
    from conftest import zero_what_the_graph_removed
    lm = slimfx.compile_causal_lm(llama, passes=[P.Prune(1 / 3, pattern="query_heads")], backend=backend,
                                  progress=False)
    stats = lm.step.report().records[0].stats
    assert stats["shrunk"] == {f"model.layers.{i}.self_attn": "6 -> 4 q heads (2 kv)" for i in range(2)}, stats
    zeroed, narrowed = zero_what_the_graph_removed(llama, lm.step.graph)
    assert narrowed == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=6)
    mask[:, -1] = 1
    got = lm.generate(ids, mask, max_new_tokens=9)
    assert torch.equal(got, hf_generate(zeroed, ids, mask, 9)), got
    assert not torch.equal(got, hf_generate(llama, ids, mask, 9))        # the heads were in use

    lm = slimfx.compile_causal_lm(llama, passes=[P.Prune(0.5, pattern="heads")], backend="torch", progress=False)
    stats = lm.step.report().records[0].stats
    assert stats["shrunk"] == {} and all("read outside the block" in why for why in stats["skipped"].values())


def test_calibrated_passes_see_the_prompts(llama):
    """Static activation scales come from the calibration prompts, given as plain token batches."""
    cal = [text_batch(2, 12, 97, seed=s)[0] for s in range(3)]
    lm = slimfx.compile_causal_lm(llama, passes=[P.Quantize(weights="int8", activations="static")],
                                  calibration=cal, backend="numpy", progress=False)
    rec = lm.report().records[0]
    assert rec.name == "quantize" and rec.stats["layers"] == 15
    ids = text_batch(1, 6, 97, seed=9)[0]
    ref = hf_generate(llama, ids, None, 4)
    got = lm.generate(ids, max_new_tokens=4)
    assert got.shape == ref.shape and torch.equal(got[:, :6], ids)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_repetition_penalty_greedy_equals_transformers_generate(llama, compiled, backend):
    """repetition_penalty as transformers (>= 5.25) applies it, to every token a row holds from its first unmasked
    one on, not to its left padding: a padded batch gives each row's greedy tokens of transformers' generate on
    that row alone (which every version computes alike), and a masked token within a row is penalized as
    transformers does; the penalty changes the tokens (a tiny random Llama repeats itself)."""
    ids, mask = text_batch(3, 7, 97, pad_left=True, seed=8)
    mask[:, -1] = 1
    assert not mask.all()
    free = compiled[backend].generate(ids, mask, max_new_tokens=1, repetition_penalty=1.8)[:, -1]
    ids = torch.where(mask.bool(), ids, free[:, None])  # padding spelled as the token each row picks first
    got = compiled[backend].generate(ids, mask, max_new_tokens=10, repetition_penalty=1.8)
    for row, m, out in zip(ids, mask, got):
        ref = llama.generate(row[m.bool()][None], max_new_tokens=10, do_sample=False, repetition_penalty=1.8,
                             pad_token_id=0)
        assert torch.equal(out[-10:], ref[0, -10:]), f"\n got {out.tolist()}\n ref {ref.tolist()}"
    assert not torch.equal(got, compiled[backend].generate(ids, mask, max_new_tokens=10))
    hole = torch.ones_like(mask)
    hole[:, 3] = 0                                      # a masked token inside each row, its first pick
    ids = torch.where(hole.bool(), ids, compiled[backend].generate(ids, hole, max_new_tokens=1)[:, -1:])
    got = compiled[backend].generate(ids, hole, max_new_tokens=10, repetition_penalty=1.8)
    ref = llama.generate(ids, attention_mask=hole, max_new_tokens=10, do_sample=False, repetition_penalty=1.8,
                         pad_token_id=0)
    assert torch.equal(got, ref), f"\n got {got.tolist()}\n ref {ref.tolist()}"


def test_sampling_with_top_p_and_a_penalty_draws_transformers_tokens(llama, compiled):
    """temperature, top_k, top_p (nucleus) and repetition_penalty in transformers' order and arithmetic: from the
    same global random state, the torch backend (eager's ops) draws the tokens transformers' generate draws;
    top_p so small that only the likeliest token is left is greedy; bad values are refused, named."""
    ids = text_batch(2, 6, 97, seed=5)[0]
    lm = compiled["torch"]
    opts = dict(temperature=0.7, top_k=40, top_p=0.8, repetition_penalty=1.3)
    for seed in range(3):
        torch.manual_seed(seed)
        ref = llama.generate(ids, max_new_tokens=12, do_sample=True, pad_token_id=0, **opts)
        torch.manual_seed(seed)
        got = lm.generate(ids, max_new_tokens=12, **opts)
        assert torch.equal(got, ref), f"seed {seed}\n got {got.tolist()}\n ref {ref.tolist()}"
    wide = [lm.generate(ids, max_new_tokens=12, temperature=1.0, top_p=0.95,
                        generator=torch.Generator().manual_seed(s)) for s in range(2)]
    assert not torch.equal(*wide)                       # a near-uniform 97-way draw: the nucleus is wide
    assert torch.equal(lm.generate(ids, max_new_tokens=12, temperature=1.0, top_p=1e-6,
                                   generator=torch.Generator().manual_seed(0)),
                       lm.generate(ids, max_new_tokens=12))
    for bad in (dict(top_p=0), dict(top_p=1.5), dict(top_p=True), dict(repetition_penalty=0),
                dict(repetition_penalty=float("inf")), dict(repetition_penalty="1.2")):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"{name} must be"):
            lm.stream(ids, temperature=1.0, **bad)      # refused at the call, before the first step


def test_sampling_is_reproducible_and_top_k_1_is_greedy(compiled):
    lm = compiled["numpy"]
    ids = text_batch(2, 5, 97, seed=6)[0]
    draw = lambda seed, **kw: lm.generate(ids, max_new_tokens=8, temperature=1.0,
                                          generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))            # 8 tokens x 2 rows from a near-uniform 97-way draw
    assert torch.equal(draw(3, top_k=1), lm.generate(ids, max_new_tokens=8))
    assert torch.equal(draw(4, top_k=0), draw(4))       # 0 is no top-k, as in transformers (it used to fail)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        draw(4, top_k=-1)


def test_saved_and_loaded_generates_the_same(llama, tmp_path):
    lm = slimfx.compile_causal_lm(llama, passes=[P.Quantize(weights="int8", activations="dynamic-per-token")],
                                  backend="numpy", progress=False)
    path = slimfx.save(lm, tmp_path / "lm")
    assert (path / "causal_lm.json").is_file()
    back = slimfx.load(path)
    assert isinstance(back, slimfx.CompiledCausalLM) and back.layout == lm.layout
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=8)
    mask[:, -1] = 1
    assert torch.equal(back.generate(ids, mask, max_new_tokens=6), lm.generate(ids, mask, max_new_tokens=6))
    assert isinstance(slimfx.load(path, backend="torch"), slimfx.CompiledCausalLM)
    # files saved before keys and values could differ in width hold one (heads, dim) per layer
    data = json.loads((path / "causal_lm.json").read_text())
    assert data["layout"][0] == [[2, 8], [2, 8]]
    data["layout"] = [k for k, _ in data["layout"]]
    (path / "causal_lm.json").write_text(json.dumps(data))
    assert slimfx.load(path).layout == lm.layout
    from slimfx.ir.serialize import FormatError
    for edit, match in [(lambda d: d.pop("dtype"), r"lacks \['dtype'\]"),
                        (lambda d: d.update(layout=d["layout"][:1]), "layout has 1 layers, the step graph's cache 2"),
                        (lambda d: d.update(dtype="bfloat16"), "layer 0's keys are .* bfloat16"),
                        (lambda d: d.update(sliding_window=-3), "sliding_window must be null or an int >= 3")]:
        damaged = json.loads(json.dumps(data))
        edit(damaged)
        (path / "causal_lm.json").write_text(json.dumps(damaged))
        with pytest.raises(FormatError, match=match):     # at load, naming the file (not a KeyError, or at generate)
            slimfx.load(path)
    # a plain compiled model saved over the folder is what loads from it (the LM's file used to stay behind)
    lm.step.save(path)
    assert not (path / "causal_lm.json").exists() and isinstance(slimfx.load(path), slimfx.CompiledModel)


def test_decode_steps_feed_the_new_token_alone_where_the_step_gives_its_logits_on_it(llama, compiled, monkeypatch):
    """compile_causal_lm checks that the captured step, run on 1 token (below the sequence range export gave it),
    gives the logits it gives on 2 (the previous token re-fed, masked); decode then feeds the new token alone. The
    torch LM (``with_backend`` of the numpy one) checks only that its kernels run the graph on 1 token."""
    from slimfx.lm import CompiledCausalLM
    notes = {"numpy": "checked: the step gives the logits on 1 token that it gives on 2",
             "torch": "checked on this backend: the compiled step runs on 1 token"}
    for backend, lm in compiled.items():
        assert lm.decode_tokens == 1 and lm.decode_note.startswith(notes[backend]), (backend, lm.decode_note)
    lm, fed = compiled["numpy"], []
    run = CompiledCausalLM._run
    monkeypatch.setattr(CompiledCausalLM, "_run", lambda self, ids, *a, **k: fed.append(ids.shape[1]) or
                        run(self, ids, *a, **k))
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=4)
    mask[:, -1] = 1
    ref = hf_generate(llama, ids, mask, 6)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=6), ref)
    assert fed == [5, 1, 1, 1, 1, 1]                    # the prompt, then a token a step
    fed.clear()
    monkeypatch.setattr(lm, "decode_tokens", 2)         # the other way gives the same tokens
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=6), ref)
    assert fed == [5, 2, 2, 2, 2, 2]
    # a generation keeps the count its prefill began with (its state's logits index is the step's)
    logits, state = lm.prefill(ids, mask)
    lm.decode_tokens = 1
    fed.clear()
    assert torch.equal(torch.stack([logits[:, -1].argmax(-1), lm.decode(ref[:, 5], state).argmax(-1)], 1),
                       ref[:, 5:7])
    assert fed == [2]
    with pytest.raises(ValueError, match="decode_tokens must be 1 or 2, got 3"):
        lm.decode_tokens = 3


def test_compile_arguments_are_checked_before_the_capture_and_a_generator_of_passes_runs(llama, monkeypatch):
    import slimfx.api
    lm = slimfx.compile_causal_lm(llama, passes=(p for p in [P.Quantize(weights="int8")]), backend="numpy",
                                  progress=False)
    assert [r.name for r in lm.report().records] == ["quantize"] and lm.decode_tokens == 1
    assert not lm.report().capture_reused                   # (the capture is the compile's own)
    monkeypatch.setattr(slimfx.api, "capture", lambda *a, **k: pytest.fail("captured before the check"))
    with pytest.raises(TypeError, match="compile_causal_lm: .*'verfy'"):
        slimfx.compile_causal_lm(llama, verfy=False)


def test_a_probe_that_fails_to_compile_leaves_2_tokens(llama, monkeypatch):
    import slimfx.api
    compile_ = slimfx.api.compile

    def failing(model, *args, passes=(), **kw):      # the probe: the capture compiled without passes
        if not passes:
            raise RuntimeError("probe boom")
        return compile_(model, *args, passes=passes, **kw)
    monkeypatch.setattr(slimfx.api, "compile", failing)
    lm = slimfx.compile_causal_lm(llama, passes=[P.Quantize(weights="int8")], backend="numpy", progress=False)
    assert lm.decode_tokens == 2
    assert lm.decode_note == ("2 tokens: compiling the step without passes to check it failed (RuntimeError: "
                              "probe boom)")


def _quantized(step) -> bool:
    return any("weight_only" in str(n.target) for n in step.graph.graph.nodes)


@pytest.mark.parametrize("fault, where, note", [
    ("raises", "probe", "2 tokens: the step fails on 1 token (RuntimeError: no 1"),
    ("differs", "probe", "2 tokens: the step's logits on 1 token differ from those on 2 by 0.01"),
    ("raises", "compiled", "2 tokens: the compiled step fails on 1 token (RuntimeError: no 1"),
    ("nan", "compiled", "2 tokens: the compiled step's logits on 1 token have another shape, or values that are "
                        "not finite")])
def test_a_step_that_fails_or_differs_on_1_token_decodes_2(llama, monkeypatch, fault, where, note):
    """Where the check finds the step (the capture without passes, within rounding) or the compiled step (passes
    applied: only that it runs, giving finite logits) other on 1 token than on 2, decode steps feed 2 tokens and
    generate as transformers does."""
    from slimfx.lm import CompiledCausalLM
    run = CompiledCausalLM._run

    def faulty(self, ids, *args, checked=True, **kw):
        out = run(self, ids, *args, checked=checked, **kw)
        if not checked and _quantized(self.step) == (where == "compiled"):      # a decode step of 1 token
            if fault == "raises":
                raise RuntimeError("no 1-token sequences here")
            out = dict(out, logits=out["logits"] * (1.01 if fault == "differs" else float("nan")))
        return out
    monkeypatch.setattr(CompiledCausalLM, "_run", faulty)
    lm = slimfx.compile_causal_lm(llama, passes=[P.Quantize(weights="int8")], backend="numpy", progress=False)
    assert (lm.decode_tokens, lm.decode_note[:len(note)]) == (2, note)
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=5)
    mask[:, -1] = 1
    monkeypatch.setattr(CompiledCausalLM, "_run", run)
    exact = slimfx.compile_causal_lm(llama, passes=[P.Quantize(weights="int8")], backend="numpy", progress=False)
    assert exact.decode_tokens == 1
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=5), exact.generate(ids, mask, max_new_tokens=5))


def test_decode_tokens_are_saved_and_checked_again_where_loaded(llama, compiled, tmp_path, monkeypatch):
    from slimfx.ir.serialize import FormatError
    from slimfx.lm import CompiledCausalLM
    path = slimfx.save(compiled["numpy"], tmp_path / "lm")
    data = json.loads((path / "causal_lm.json").read_text())
    assert data["decode_tokens"] == 1
    assert slimfx.load(path).decode_tokens == 1 and slimfx.load(path, backend="torch").decode_tokens == 1
    assert compiled["numpy"].with_backend("torch").decode_tokens == 1
    for value, match in [(3, "decode_tokens must be 1 or 2, got 3"), (True, "decode_tokens must be 1 or 2, got True")]:
        (path / "causal_lm.json").write_text(json.dumps(dict(data, decode_tokens=value)))
        with pytest.raises(FormatError, match=match):
            slimfx.load(path)
    data.pop("decode_tokens")                            # saved before: 2, unchecked
    (path / "causal_lm.json").write_text(json.dumps(data))
    assert slimfx.load(path).decode_tokens == 2
    data["decode_tokens"] = 1                           # a backend whose kernels refuse 1 token: checked there
    (path / "causal_lm.json").write_text(json.dumps(data))
    ids, mask = text_batch(1, 4, 97, seed=2)
    ref = compiled["numpy"].generate(ids, mask, max_new_tokens=4)
    run = CompiledCausalLM._run

    def refuses(self, ids, *args, checked=True, **kw):
        if not checked:
            raise ValueError("this kernel takes 2 or more rows")
        return run(self, ids, *args, checked=checked, **kw)
    monkeypatch.setattr(CompiledCausalLM, "_run", refuses)
    back = slimfx.load(path)
    assert back.decode_tokens == 2 and "ValueError: this kernel takes 2 or more rows" in back.decode_note
    monkeypatch.setattr(CompiledCausalLM, "_run", run)
    assert torch.equal(back.generate(ids, mask, max_new_tokens=4), ref)


def test_save_is_one_save(llama, tmp_path, monkeypatch):
    """causal_lm.json is part of the save: a save interrupted before it was written loaded silently as a plain
    model (no generate); a file missing, copied in, or from another save is refused naming it."""
    from slimfx.ir.serialize import FormatError
    lm = slimfx.compile_causal_lm(llama, backend="numpy", progress=False)
    path = slimfx.save(lm, tmp_path / "lm")
    real = os.replace

    def crash(src, dst):
        if pathlib.Path(dst).name == "causal_lm.json":
            raise OSError("disk full")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        slimfx.save(lm, path)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(FormatError, match="different saves"):
        slimfx.load(path)
    slimfx.save(lm, path)
    other = slimfx.save(lm, tmp_path / "other")
    assert isinstance(slimfx.load(path), slimfx.CompiledCausalLM)
    (path / "causal_lm.json").write_bytes((other / "causal_lm.json").read_bytes())
    with pytest.raises(FormatError, match=r"causal_lm.json \(save \w+\) and the model's files .* different saves"):
        slimfx.load(path)
    (path / "causal_lm.json").unlink()
    with pytest.raises(FormatError, match="saved with a causal_lm.json .* which the folder lacks"):
        slimfx.load(path)
    lm.step.save(path)
    assert isinstance(slimfx.load(path), slimfx.CompiledModel)
    (path / "causal_lm.json").write_bytes((other / "causal_lm.json").read_bytes())
    with pytest.raises(FormatError, match="causal_lm.json is not part of the save"):
        slimfx.load(path)
    # a save from before (slimfx.json with a save id but no extra_files, causal_lm.json with no save id) loads
    graph, lm_data = (json.loads((other / f).read_text()) for f in ("slimfx.json", "causal_lm.json"))
    del graph["extra_files"], lm_data["save_id"]
    for f, d in (("slimfx.json", graph), ("causal_lm.json", lm_data)):
        (other / f).write_text(json.dumps(d))
    assert isinstance(slimfx.load(other), slimfx.CompiledCausalLM)


def test_refusals(llama, compiled):
    lm = compiled["numpy"]
    ids = text_batch(2, 6, 97)[0]
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with pytest.raises(ValueError, match="right-padded.*left-pad"):
        lm.generate(ids, right)
    with pytest.raises(ValueError, match="integer tensor"):
        lm.generate(ids.float())
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        lm.generate(ids, torch.full_like(ids, 2))
    pad = torch.ones_like(ids)
    pad[0] = 0
    with pytest.raises(ValueError, match=r"rows \[0\] of attention_mask are all padding"):     # not "right-padded"
        lm.generate(ids, pad)
    with pytest.raises(ValueError, match="at least one token"):
        lm.generate(ids[:, :0])
    for bad in (dict(max_new_tokens=2.5), dict(max_new_tokens=None), dict(top_k=2.5, temperature=1.0)):
        with pytest.raises(ValueError, match="must be an integer"):
            lm.generate(ids, **bad)
    import numpy as np
    assert lm.generate(ids, max_new_tokens=np.int64(2), eos_token_id=np.int64(5)).shape == (2, 8)
    with pytest.raises(TypeError, match="dynamic"):
        slimfx.compile_causal_lm(llama, dynamic=True)
    right = torch.ones_like(ids)
    right[1, -1] = 0
    for cal, match in [([dict(ids=ids)], r"calibration batch 0: a dict batch needs 'input_ids'"),
                       ([ids, (ids, right)], r"calibration batch 1: the prompts are right-padded")]:
        with pytest.raises(ValueError, match=match):
            slimfx.compile_causal_lm(llama, calibration=cal, progress=False)


def test_models_without_a_plain_kv_cache_are_refused():
    from transformers import BertConfig, BertModel, Llama4ForCausalLM, Llama4TextConfig
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=40)).eval()
    with pytest.raises(TypeError, match="BertModel.*KV cache"):
        slimfx.compile_causal_lm(bert)
    # Llama 4's chunked attention keeps sliding-window cache layers, but its mask is another one
    llama4 = Llama4ForCausalLM(Llama4TextConfig(vocab_size=50, hidden_size=32, intermediate_size=40,
                                                intermediate_size_mlp=40, num_hidden_layers=1, num_attention_heads=2,
                                                num_key_value_heads=1, head_dim=16, attention_chunk_size=8,
                                                num_local_experts=2)).eval()
    with pytest.raises(TypeError, match="Llama4ForCausalLM: chunked attention .*not supported"):
        slimfx.compile_causal_lm(llama4)
    # a Jamba of Mamba layers only: transformers' own forward fails with a cache (it raised that ValueError bare)
    import transformers as T
    jamba = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(
        "jamba", vocab_size=50, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
        intermediate_size=40, num_experts=1)).eval()
    with pytest.raises(TypeError, match=r"JambaForCausalLM fails a plain call with use_cache=True, from which "
                                        r"compile_causal_lm reads its cache's layout: ValueError"):
        slimfx.compile_causal_lm(jamba)


_SMALL = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=64, max_position_embeddings=128)


def _sliding(family, window):
    import transformers as T
    torch.manual_seed(0)
    make = {
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_SMALL, head_dim=8, sliding_window=window)),
        # one layer of each kind (2 layers would both be sliding by default)
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_SMALL, head_dim=8, sliding_window=window,
                                                                 layer_types=["sliding_attention", "full_attention"])),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_SMALL, sliding_window=window)),
        # layer 0 full, layer 1 sliding
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_SMALL, use_sliding_window=True, sliding_window=window,
                                                          max_window_layers=1)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_SMALL, sliding_window=window, pad_token_id=0)),
        "cohere2": lambda: T.Cohere2ForCausalLM(T.Cohere2Config(**_SMALL, sliding_window=window, pad_token_id=0,
                                                                layer_types=["sliding_attention", "full_attention"])),
        # eager attention (an additive float mask) and experts
        "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(
            **{**_SMALL, "intermediate_size": 32}, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=window, layer_types=["sliding_attention", "full_attention"])),
        # local layers by config.window_size and attention_layers, not sliding_window, masked in its own _attn
        "gpt_neo": lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
            vocab_size=97, hidden_size=32, num_heads=4, num_layers=2, attention_types=[[["global", "local"], 1]],
            window_size=window, max_position_embeddings=128, intermediate_size=64)),
    }
    return make[family]().eval()


def _generates_as_transformers(lm, model, cases, what: str):
    """Greedy tokens of ``lm`` equal transformers' generate (stopping at the same end-of-sequence tokens) after a
    left-padded batch of 2 prompts per (length, new tokens, seed); the last case's (ids, mask, new, tokens)."""
    for length, new, seed in cases:
        ids, mask = text_batch(2, length, 97, pad_left=True, seed=seed)
        ref = hf_generate(model, ids, mask, new, eos=lm.eos_token_id)
        got = lm.generate(ids, mask, max_new_tokens=new, pad_token_id=0)
        assert torch.equal(got, ref), f"{what} {length}+{new}\n got {got.tolist()}\n ref {ref.tolist()}"
    return ids, mask, new, ref


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "qwen2", "phi3", "cohere2", "gpt_oss", "gpt_neo"])
def test_sliding_window_models_generate_transformers_tokens_past_the_window(family, tmp_path):
    """The sliding layers' mask (GPT-Neo's local band) counts the window over real positions, not cache slots, so
    the masked slots the decode buffer puts between tokens (unfilled ones; the re-fed token's copy, where decode
    steps feed 2 tokens) do not shrink it: generation equals transformers' (whose sliding cache keeps the last
    window - 1 tokens) far past a window of 8, after a short left-padded prompt (5 tokens, 25 new: the buffer
    grows 8 -> 16 -> 32) and after one longer than the window. Before, generation was refused past window - 2
    slots: the last decode step here would see 33. A prompt with padding after a token gives transformers' tokens
    while the sequence stays within the window and is refused past it, by prefill, generate and decode."""
    model = _sliding(family, 8)
    lm = slimfx.compile_causal_lm(model, backend="numpy", progress=False)
    assert lm.sliding_window is None                      # no cap on the slots
    lm.min_cache = 4
    ids, mask, new, ref = _generates_as_transformers(lm, model, [(5, 25, 3), (13, 12, 5)], family)
    back = slimfx.load(slimfx.save(lm, tmp_path / "lm"))
    assert back.sliding_window is None and back.gap_limit == 8
    assert torch.equal(back.generate(ids, mask, max_new_tokens=new, pad_token_id=0), ref)
    assert lm.decode_tokens == 1
    lm.decode_tokens = 2                                  # the re-fed token's masked copies between the tokens
    _generates_as_transformers(lm, model, [(5, 25, 3)], family)
    # a gap in a prompt's mask: past the window positions and slots differ (transformers counts the gap in it)
    mask[0, 6] = 0
    gap = r"rows \[0\] of attention_mask hold padding after a token; .*window of 8 tokens.*left-pad"
    for call in (lambda: back.prefill(ids, mask), lambda: back.generate(ids, mask, max_new_tokens=2)):
        with pytest.raises(ValueError, match=gap):                     # 13 prompt slots already
            call()
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=7)
    mask[0, 2:] = 1
    mask[0, 3] = 0                                                     # within the window: exact, accepted
    assert torch.equal(back.generate(ids, mask, max_new_tokens=4, pad_token_id=0),
                       hf_generate(model, ids, mask, 4, eos=back.eos_token_id))
    with pytest.raises(ValueError, match=gap):
        back.generate(ids, mask, max_new_tokens=5)                     # 5 + 4 fed slots
    logits, state = back.prefill(ids, mask)
    for _ in range(3):                                                 # 8 slots
        logits = back.decode(logits[:, -1].argmax(-1) if logits.dim() == 3 else logits.argmax(-1), state)
    with pytest.raises(ValueError, match=gap):
        back.decode(logits.argmax(-1), state)


def test_gemma3_multimodal_generates_text_past_the_window():
    """Gemma-3's multimodal model (what the 4B-27B checkpoints load as) builds its masks through transformers'
    create_masks_for_generate, which finds the sliding one in a table by layer type: replaced there too (the
    window was kept as a cap before, its calls uncounted)."""
    import transformers as T
    torch.manual_seed(0)
    text = T.Gemma3TextConfig(**_SMALL, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=96,
        boi_token_index=94, eoi_token_index=95)).eval()
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    assert lm.sliding_window is None
    lm.min_cache = 4
    ids, mask = text_batch(2, 6, 90, pad_left=True, seed=1)
    got = lm.generate(ids, mask, max_new_tokens=30, pad_token_id=0, eos_token_id=[])
    assert torch.equal(got, hf_generate(model, ids, mask, 30, eos=[]))


def test_a_two_sided_sliding_window_keeps_transformers_mask():
    """A sliding-window model configured is_causal=False gets transformers' two-sided window (the step's own,
    by position, bounds only the past: 0.23 of the logits' scale off); its window stays a cap on the slots."""
    from conftest import rel_err
    import transformers as T
    torch.manual_seed(0)
    model = T.MistralForCausalLM(T.MistralConfig(**_SMALL, sliding_window=4, is_causal=False)).eval()
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    assert lm.sliding_window == 4
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    every, _ = lm.prefill(ids, all_logits=True)
    with torch.no_grad():
        assert rel_err(every, model(ids).logits) <= 1e-5                  # fp32: summation order only
    # the check's decode steps pass its 4 slots: 2 tokens a step, though those steps are refused too
    assert lm.decode_tokens == 2
    assert lm.decode_note.startswith("2 tokens: the step fails on the check's prompts (ValueError: ")


def test_generating_past_a_saved_slot_window_is_refused(tmp_path):
    """Steps saved before the window went by position masked the window by cache slot, so their causal_lm.json
    names the window, and generation refuses to pass it before the first step (past it the slot mask would drop
    real tokens, the masked slots counting); a prompt alone is exact at any length (its slots are its positions,
    shifted by one). Such a file is made here by writing the window into a new save's causal_lm.json."""
    import json
    from conftest import rel_err
    model = _sliding("mistral", 16)
    lm = slimfx.compile_causal_lm(model, backend="numpy", progress=False)
    path = slimfx.save(lm, tmp_path / "lm")
    data = json.loads((path / "causal_lm.json").read_text())
    assert data["sliding_window"] is None
    (path / "causal_lm.json").write_text(json.dumps({**data, "sliding_window": 16}))
    lm = slimfx.load(path)
    assert lm.sliding_window == 16
    lm.min_cache = 4
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=3)
    beyond = "MistralForCausalLM attends within a sliding window of 16 tokens.* would see 17. At most 9 new tokens"
    with pytest.raises(ValueError, match=beyond):
        lm.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=9, pad_token_id=0),
                       hf_generate(model, ids, mask, 9))

    ids, mask = text_batch(2, 40, 97, pad_left=True, seed=5)    # 40 slots and more in a row
    every, state = lm.prefill(ids, mask, all_logits=True)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert rel_err(every[real], ref[real]) <= 1e-5                # fp32: summation order only
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=1), hf_generate(model, ids, mask, 1))
    with pytest.raises(ValueError, match="window of 16 tokens.*the next decode step would see 44"):
        lm.decode(every[:, -1].argmax(-1), state)
    with pytest.raises(ValueError, match="Only 1 new token fits after this prompt"):
        lm.generate(ids, mask, max_new_tokens=2)


def test_stream_yields_what_generate_returns(compiled):
    lm = compiled["numpy"]
    ids, mask = text_batch(2, 6, 97, pad_left=True, seed=11)
    mask[:, -1] = 1
    steps = lm.stream(ids, mask, max_new_tokens=7)
    first = next(steps)                                   # a token per row before the rest is computed
    assert first.shape == (2,) and first.dtype == torch.long
    streamed = torch.stack([first, *steps], 1)
    assert torch.equal(torch.cat([ids, streamed], 1), lm.generate(ids, mask, max_new_tokens=7))
    assert lm.last_timing["new_tokens"] == 7
    with pytest.raises(ValueError, match="temperature"):
        lm.stream(ids, temperature=-1)                    # checked at the call, not at the first token


def test_the_loops_own_torch_ops_run_on_one_thread_beside_the_numpy_backend(compiled, monkeypatch):
    """While the numpy backend generates, torch's own ops (picking tokens, beams) run on one thread (OpenBLAS's
    and torch's threads spin for the same cores otherwise), greedy, streamed and with beams; the caller's thread
    count holds whenever it has control (between streamed tokens, after the call, after an error); the torch
    backend keeps its threads."""
    from slimfx.lm import CompiledCausalLM
    before = torch.get_num_threads()                # (make test's workers run one thread each)
    torch.set_num_threads(2)
    try:
        _check_one_thread_glue(compiled, monkeypatch, CompiledCausalLM, 2)
    finally:
        torch.set_num_threads(before)


def _check_one_thread_glue(compiled, monkeypatch, CompiledCausalLM, threads):
    seen = []
    pick = CompiledCausalLM._processed
    monkeypatch.setattr(CompiledCausalLM, "_processed",
                        staticmethod(lambda *a, **k: seen.append(torch.get_num_threads()) or pick(*a, **k)))
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=3)
    for backend, inside in (("numpy", 1), ("torch", threads)):
        seen.clear()
        compiled[backend].generate(ids, mask, max_new_tokens=4)
        compiled[backend].generate(ids, mask, max_new_tokens=4, num_beams=2)
        for _ in compiled[backend].stream(ids, mask, max_new_tokens=3):
            assert torch.get_num_threads() == threads
        assert set(seen) == {inside} and len(seen) == 11 and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="top_k"):
        list(compiled["numpy"].stream(ids, mask, max_new_tokens=3, top_k=-1))
    assert torch.get_num_threads() == threads


def test_distillation_through_the_step_graph(llama):
    """Prune 2:4, then Distill against the model itself (its step wrapper is the teacher): the loss falls,
    the masks hold, and the result generates."""
    cal = [text_batch(2, 12, 97, seed=s)[0] for s in range(4)]
    lm = slimfx.compile_causal_lm(llama, passes=[P.Prune(0.5, pattern="2:4"), P.Distill(steps=10)],
                                  calibration=cal, progress=False)
    stats = lm.report().records[1].stats
    assert stats["loss_last"] < stats["loss_first"], stats
    assert all(r["sparsity"] == 0.5 for r in lm.report().layers() if r["module"] != "lm_head")
    assert lm.generate(cal[0], max_new_tokens=3).shape == (2, 15)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_prefill_logits_are_the_models(llama, compiled, backend):
    """All positions' logits (what calibration and distillation see) equal the model's on the real tokens;
    generation computes only the last position's."""
    from conftest import rel_err
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=12)
    mask[:, -1] = 1
    every, _ = compiled[backend].prefill(ids, mask, all_logits=True)
    last, _ = compiled[backend].prefill(ids, mask)
    with torch.no_grad():
        ref = llama(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    # fp32, 2 layers: only summation order differs (torch: the same kernels; numpy: its own matmuls)
    assert every.shape == ref.shape and rel_err(every[real], ref[real]) <= 1e-5
    assert last.shape == (2, 1, 97) and rel_err(last[:, 0], every[:, -1]) <= 1e-6


def _tiny(family):
    """Tiny random models of the families whose positions or layers differ from Llama's: GPT-2 (learned
    positions from position_ids, dropout 0.1 by default), OPT (learned positions offset by 2, dropout), Phi
    (partial rotary, LayerNorm, biases; its end-of-sequence token 2 lies in the vocabulary), BLOOM (no
    position_ids: ALiBi from the attention mask)."""
    import transformers as T
    torch.manual_seed(0)
    make = {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=32, n_head=4, n_layer=2, n_positions=64,
                                                       eos_token_id=None, bos_token_id=None)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                                    num_hidden_layers=2, ffn_dim=64, max_position_embeddings=64,
                                                    word_embed_proj_dim=32)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                                    num_hidden_layers=2, intermediate_size=64,
                                                    max_position_embeddings=64)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=97, hidden_size=32, n_head=4, n_layer=2)),
    }
    return make[family]().eval()


@pytest.mark.parametrize("family, backend", [("gpt2", "numpy"), ("opt", "numpy"), ("phi", "numpy"),
                                             ("bloom", "numpy"), ("bloom", "torch")])
def test_other_families_generate_what_transformers_generates(family, backend):
    model = _tiny(family)
    modes = [m.training for m in model.modules()]
    lm = slimfx.compile_causal_lm(model, backend=backend, progress=False)
    lm.min_cache = 8                                     # the buffer grows 8 -> 16 within the generation
    # compiling leaves every submodule in its mode: GPT-2's and OPT's dropout stays off in the model itself
    assert [m.training for m in model.modules()] == modes
    for batch, length, seed in [(2, 5, 1), (3, 9, 2), (1, 1, 3)]:
        ids, mask = text_batch(batch, length, 97, pad_left=True, seed=seed)
        if batch > 2:
            mask[0, :2] = 0                              # two rows left-padded, by different amounts
        # transformers' default pad token (the model's, else its end-of-sequence token) for both; Phi emits its
        # end-of-sequence token 2 in a row of each of the first two batches, then one given pad token
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = lm.generate(ids, mask, max_new_tokens=12)
        assert torch.equal(got, ref), f"{family} {batch}x{length}\n got {got.tolist()}\n ref {ref.tolist()}"
        if seed == 1:
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
            got = lm.generate(ids, mask, max_new_tokens=12, pad_token_id=0)
            assert torch.equal(got, ref), f"{family} pad 0\n got {got.tolist()}\n ref {ref.tolist()}"


def _longrope():
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    cfg = Phi3Config(**_SMALL, pad_token_id=0, eos_token_id=None, bos_token_id=None,
                     original_max_position_embeddings=32,
                     rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                   "long_factor": [4.0, 8.0, 16.0, 32.0]})
    return Phi3ForCausalLM(cfg).eval()


def _greedy_whole(model, ids, mask, new: int):
    """Greedy decoding by the model's own forward over the whole sequence at every step (no cache): the tokens and
    each step's last logits."""
    steps = []
    for _ in range(new):
        with torch.no_grad():
            steps.append(model(ids, attention_mask=mask).logits[:, -1])
        ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, steps


def test_longrope_switches_to_its_long_factors_as_transformers_does(tmp_path):
    """Long-context Phi-3 rotates with short factors up to original_max_position_embeddings (32) and long ones
    past it; transformers' generate runs the whole sequence again at the step that crosses 32 tokens. Without
    that the cached keys kept their short rotation and the logits moved by ~1e-3 from that step on (tokens
    differed within 12 steps). The reference is the model's own forward over the whole sequence at each step,
    which transformers' generate equals from 5.25; 5.17's runs only the newest token at the switch (its logits
    differ there by ~0.2), and its longrope update branches in Python, which export could not capture
    (``lm._longrope`` computes it with torch.where)."""
    import transformers
    from packaging.version import Version
    from slimfx.lm import _longrope_cells
    model = _longrope()
    cells = _longrope_cells(type(model.model.rotary_emb).forward)     # (transformers < 5.25)
    assert (cells is None) == (Version(transformers.__version__) >= Version("5.25"))
    _contents = lambda cells: cells and {name: cell.cell_contents for name, cell in cells.items()}  # noqa: E731
    before = _contents(cells)
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    assert lm.rope_switch == 32
    ids, mask = text_batch(2, 28, 97, pad_left=True, seed=5)
    mask[:, -1] = 1
    seq, ref = _greedy_whole(model, ids, mask, 12)
    logits, state = lm.prefill(ids, mask)
    got = [logits[:, -1]]
    for i in range(11):                                # teacher-forced on the reference tokens, across 32
        got.append(lm.decode(seq[:, 28 + i], state))
    for i, (a, b) in enumerate(zip(got, ref)):
        # fp32, the same ops in another grouping: ~6e-8 of logits of scale ~1 (the long factors moved them 7e-4)
        assert (a - b).abs().max() < 1e-5, f"step {i} (sequence length {28 + i})"
    lm.min_cache = 8
    ids, mask = text_batch(3, 20, 97, pad_left=True, seed=6)
    mask[:, -1] = 1
    ref = _greedy_whole(model, ids, mask, 30)[0]
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=30, pad_token_id=0), ref)
    if Version(transformers.__version__) >= Version("5.25"):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                          pad_token_id=0), ref)
    loaded = slimfx.load(lm.save(tmp_path / "phi3"), backend="numpy")     # (its rotary's aten.max: numpy too)
    assert loaded.rope_switch == 32
    loaded.min_cache = 8
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=30, pad_token_id=0), ref)
    assert _contents(cells) == before             # transformers' own code again after the capture


def _old_dynamic_rope_update(rope_forward):
    """transformers 5.17's ``dynamic_rope_update`` (its longrope part, with its Python branch on the sequence
    length and a buffer swapped in): what the GPU machines' transformers runs, for this machine's."""
    import functools
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def longrope_frequency_update(self, position_ids, device, layer_type=None):
        seq_len = torch.max(position_ids) + 1
        original_max = self.config.rope_parameters["original_max_position_embeddings"]
        if seq_len > original_max:
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device, seq_len=original_max + 1)
            self.register_buffer("inv_freq", long_inv_freq, persistent=False)
        else:
            self.register_buffer("inv_freq", self.original_inv_freq.to(device), persistent=False)

    @functools.wraps(rope_forward)
    def wrapper(self, x, position_ids, layer_type=None):
        if self.rope_type == "longrope":
            longrope_frequency_update(self, position_ids, device=x.device)
        return rope_forward(self, x, position_ids)
    return wrapper


def test_longrope_of_older_transformers_captures_with_the_same_frequencies(monkeypatch):
    """The Python branch of transformers 5.17's longrope update (emulated here on any version) made export fail
    on a data-dependent guard; captured with ``torch.where`` instead, the step's logits below, at and past the
    switch (32) equal the model's own forward over the whole sequence, and the model's code is its own again
    after the capture."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    from slimfx.lm import _longrope_cells
    inner = Phi3RotaryEmbedding.forward
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    monkeypatch.setattr(Phi3RotaryEmbedding, "forward", torch.no_grad()(_old_dynamic_rope_update(inner)))
    cells = _longrope_cells(Phi3RotaryEmbedding.forward)
    before = {name: cell.cell_contents for name, cell in cells.items()}
    model = _longrope()
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    assert {name: cell.cell_contents for name, cell in cells.items()} == before
    ids, mask = text_batch(2, 30, 97, pad_left=True, seed=7)
    mask[:, -1] = 1
    seq, ref = _greedy_whole(model, ids, mask, 5)
    logits, state = lm.prefill(ids, mask)
    got = [logits[:, -1]] + [lm.decode(seq[:, 30 + i], state) for i in range(4)]
    for i, (a, b) in enumerate(zip(got, ref)):
        # (the long factors move the logits by ~7e-4 past 32: the original frequencies there would fail this)
        assert (a - b).abs().max() < 1e-5, f"sequence length {30 + i}"


@pytest.mark.parametrize("family", ["xglm", "gpt_neo"])
def test_the_cache_buffer_stays_within_the_compiled_bound(family):
    """export bounds the step's cache length by the model's position table (max_position_embeddings 40 here); the
    buffer grew past it in powers of two (32 -> 64) and the step then refused a generation transformers makes.
    Now it stops at the bound less the 2 fed tokens (GPT-Neo slices its causal-mask table by the key length), and a
    generation that cannot fit is refused before its first step, saying how many new tokens fit."""
    import transformers as T
    torch.manual_seed(0)
    model = {"xglm": lambda: T.XGLMForCausalLM(T.XGLMConfig(vocab_size=97, d_model=32, num_layers=2,
                                                            attention_heads=4, ffn_dim=64, max_position_embeddings=40)),
             "gpt_neo": lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
                 vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                 max_position_embeddings=40, intermediate_size=64))}[family]().eval()
    lm = slimfx.compile_causal_lm(model, backend="numpy", progress=False)
    assert lm.max_slots == 38
    lm.min_cache = 8                                      # 8 -> 16 -> 32 -> 38, the bound
    ids, mask = text_batch(2, 20, 97, pad_left=True, seed=4)
    mask[:, -1] = 1
    ref = hf_generate(model, ids, mask, 18)               # the last step holds 38 slots: 1 + 20 + 17
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=18, pad_token_id=0), ref)
    with pytest.raises(ValueError, match=r"at most 38 cache slots .* would need 39\. At most 18 new tokens fit"):
        lm.generate(ids, mask, max_new_tokens=19, pad_token_id=0)


def test_compiling_keeps_a_training_model_training():
    model = _tiny("gpt2").train()
    model.transformer.h[0].eval()                        # mixed modes survive too
    modes = [m.training for m in model.modules()]
    slimfx.compile_causal_lm(model, backend="torch", progress=False)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_mpt_generates_transformers_tokens(backend):
    """MPT's forward takes no position_ids, and its ALiBi counted cache slots (transformers' table sliced to the
    last keys), so the decode buffer's masked slots shifted it and MPT was refused. The step now biases each key
    by its real position (6 heads: slopes of a non-power-of-two head count; clip_qkv on). Tokens equal
    transformers' generate after left-padded prompts, across buffer growth (4 -> 8 -> 16 -> 32 slots); a prompt's
    logits equal the model's on its real tokens."""
    from conftest import rel_err
    from transformers import MptConfig, MptForCausalLM
    torch.manual_seed(0)
    mpt = MptForCausalLM(MptConfig(vocab_size=97, d_model=48, n_heads=6, n_layers=2, max_seq_len=256,
                                   attn_config={"clip_qkv": 0.5})).eval()
    lm = slimfx.compile_causal_lm(mpt, backend=backend, progress=False)
    lm.min_cache = 4
    _generates_as_transformers(lm, mpt, [(5, 25, 3), (1, 6, 2)], "mpt")
    ids, mask = text_batch(2, 9, 97, pad_left=True, seed=4)
    every, _ = lm.prefill(ids, mask, all_logits=True)
    with torch.no_grad():
        for row, m, got in zip(ids, mask.bool(), every):
            assert rel_err(got[m], mpt(input_ids=row[m][None]).logits[0]) <= 1e-5      # fp32: summation order
    ids, mask = text_batch(2, 9, 97, pad_left=True, seed=4)
    mask[0, -3] = 0                                 # a gap: transformers' ALiBi counts it, the step's does not
    with pytest.raises(ValueError, match=r"rows \[0\] of attention_mask hold padding after a token"):
        lm.generate(ids, mask, max_new_tokens=2)
    # transformers' table of max_seq_len slots fails a longer sequence; the step's bias has no table
    short = MptForCausalLM(MptConfig(vocab_size=97, d_model=48, n_heads=6, n_layers=2, max_seq_len=16)).eval()
    lm = slimfx.compile_causal_lm(short, backend=backend, progress=False)
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=3)
    got = lm.generate(ids, mask, max_new_tokens=20, pad_token_id=0, eos_token_id=[])
    assert got.shape == (2, 25)
    assert torch.equal(got[:, :16], hf_generate(short, ids, mask, 11, eos=[]))


def test_encoder_decoder_models_are_refused_by_name():
    """T5's call without decoder inputs and BART's encoder-decoder cache failed with transformers' own errors
    (no input_ids; no layered cache); both are now refused as what they are, pointing to compile_seq2seq_lm."""
    import transformers as T
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=97, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                 d_kv=16)).eval()
    bart = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)).eval()
    for model in (t5, bart):
        with pytest.raises(TypeError, match=f"{type(model).__name__} is an encoder-decoder model: .*; "
                                            f"compile_seq2seq_lm compiles an encoder-decoder model's"):
            slimfx.compile_causal_lm(model)


def test_models_whose_positions_count_masked_cache_slots_are_refused():
    """BART's learned positions come from the cache length, not the attention mask: the masked slots of the step's
    cache would shift them (and its causal LM keeps an encoder-decoder cache)."""
    from transformers import BartConfig, BartForCausalLM
    bart = BartForCausalLM(BartConfig(vocab_size=97, d_model=32, decoder_attention_heads=4, decoder_layers=2,
                                      decoder_ffn_dim=64, max_position_embeddings=64)).eval()
    with pytest.raises(TypeError, match="BartForCausalLM: its cache has 12 layers but a call fills only 2"):
        slimfx.compile_causal_lm(bart)


def test_bloom_and_alibi_falcon_save_and_load(tmp_path):
    """BLOOM's and ALiBi Falcon's attention mask is as long as the cache and the new tokens together: export gives
    its dim as a sum of the two (s63 + s70), which saving refused ("an expression, not a plain symbol")."""
    import transformers as T
    torch.manual_seed(0)
    falcon = T.FalconForCausalLM(T.FalconConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                                num_hidden_layers=2, alibi=True)).eval()
    for name, model in (("bloom", _tiny("bloom")), ("falcon", falcon)):
        lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
        back = slimfx.load(lm.save(tmp_path / name))
        ids, mask = text_batch(2, 5, 97, pad_left=True, seed=1)
        mask[:, -1] = 1
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(back.generate(ids, mask, max_new_tokens=6, pad_token_id=0), ref)
        mask_dim = [n.meta["val"].shape[1] for n in back.graph.graph.nodes if n.name == "attention_mask"]
        assert "+" in str(mask_dim[0])                   # a sum of the loaded symbols again, not a new one
    from slimfx.ir.serialize import FormatError
    graph = json.loads((tmp_path / "falcon" / "slimfx.json").read_text())
    entry = next(e for e in graph["graph"]["nodes"] if e["name"] == "attention_mask")
    assert entry["val"]["tensor"]["shape"][1]["const"] == 0
    for dim, match in [({"sum": [[1, "s999"]], "const": 0}, "dim 's999' is not among the saved symbols"),
                       ({"sum": "s1"}, r"a dim must be an int, a symbol or \{'sum'")]:
        entry["val"]["tensor"]["shape"][1] = dim
        (tmp_path / "falcon" / "slimfx.json").write_text(json.dumps(graph))
        with pytest.raises(FormatError, match=match):
            slimfx.load(tmp_path / "falcon")


def test_alibi_falcon_runs_on_numpy_as_transformers_computes_it():
    """transformers' Falcon multiplies its ALiBi slopes by the positions in bfloat16, which the numpy backend
    cannot hold (it failed at the first call). The step computes the same values in float32, the bfloat16
    roundings done explicitly: equal to transformers' bias bit for bit, also where bfloat16 rounds the position
    (past 256) and the product (16 heads: slopes that are not powers of two)."""
    import transformers as T
    from transformers.models.falcon import modeling_falcon
    from slimfx.lm import _falcon_alibi
    mask = torch.ones(2, 70000, dtype=torch.long)
    mask[1, :1000] = 0
    for heads in (3, 16, 71):
        slopes = modeling_falcon.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(_falcon_alibi(slopes)(mask, heads, dtype),
                               modeling_falcon.build_alibi_tensor(mask, heads, dtype)), (heads, dtype)
    torch.manual_seed(0)
    model = T.FalconForCausalLM(T.FalconConfig(vocab_size=97, hidden_size=32, num_attention_heads=16,
                                               num_hidden_layers=2, alibi=True, multi_query=False,
                                               parallel_attn=False, bias=True)).eval()
    lm = slimfx.compile_causal_lm(model, backend="numpy", progress=False)
    assert not [n.name for n in lm.graph.graph.nodes if n.meta.get("val") is not None
                and getattr(n.meta["val"], "dtype", None) == torch.bfloat16]
    lm.min_cache = 8
    ids, mask = text_batch(2, 5, 97, pad_left=True, seed=1)
    mask[:, -1] = 1
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=10, pad_token_id=0), ref)
    ids = text_batch(1, 300, 97, seed=2)[0]            # positions past 256: bfloat16 rounds them
    got = lm.prefill(ids, all_logits=True)[0]
    with torch.no_grad():
        want = model(ids).logits
    # fp32, the same bias: only summation order differs (~1e-7 of the scale); a bias off by one bfloat16 step of
    # a position near 300 (2 of 256 there) would move the logits by far more
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5



def test_alibi_falcon_plain_compile_runs_on_numpy():
    """slimfx.compile (not compile_causal_lm) of an ALiBi Falcon was refused by the numpy backend (its bfloat16
    ALiBi); the capture now uses the same float32 ALiBi of bfloat16 values as the step, and puts transformers'
    function back afterwards."""
    import transformers as T
    from transformers.models.falcon import modeling_falcon
    original = modeling_falcon.build_alibi_tensor
    torch.manual_seed(0)
    model = T.FalconForCausalLM(T.FalconConfig(vocab_size=97, hidden_size=32, num_attention_heads=16,
                                               num_hidden_layers=2, alibi=True, multi_query=False,
                                               parallel_attn=False, bias=True)).eval()
    ids, mask = text_batch(2, 300, 97, pad_left=True, seed=3)     # past 256: bfloat16 rounds the positions
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    cm = slimfx.compile(model, (), kw, backend="numpy", progress=False)
    assert modeling_falcon.build_alibi_tensor is original
    got = cm(**kw)["logits"]
    with torch.no_grad():
        want = model(**kw).logits
    # summation order only (float32 ~1e-7 of the scale); a bias one bfloat16 step off would move it far more
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_capture_replacements_need_no_importable_module():
    """The capture looks for transformers functions to replace in the model's module: a class made at run time
    (its __module__ importable from nowhere) with a config attribute compiles as before."""
    M = type("M", (torch.nn.Module,), {"__module__": "nowhere.at.all", "forward": lambda self, x: x * 2})
    m = M()
    m.config = {"alibi": True}
    cm = slimfx.compile(m, (torch.randn(2),), backend="numpy", progress=False)
    assert torch.equal(cm(torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_learned_position_table_bounds_generation_up_front(family, tmp_path):
    """GPT-2 and OPT index a table of max_position_embeddings positions by position_ids, which export does not
    bound: a generation past it failed midway (numpy: IndexError after 27 streamed tokens; torch: a bare
    IndexError, a device assert on a GPU). Now it is refused before the first step saying how many fit, and
    everything that fits matches transformers; the limit survives save and load."""
    import transformers as T
    torch.manual_seed(0)
    model = (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=32))
             if family == "gpt2" else
             T.OPTForCausalLM(T.OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                          num_attention_heads=4, max_position_embeddings=32,
                                          word_embed_proj_dim=32))).eval()
    lm = slimfx.compile_causal_lm(model, backend="numpy", progress=False)
    assert lm.position_limit == 32
    ids, mask = text_batch(2, 8, 97, pad_left=True, seed=4)
    mask[:, -1] = 1
    real = int(mask.sum(-1).max())
    fit = 32 - real + 1
    with pytest.raises(ValueError, match=f"holds 32 positions .* At most {fit} new tokens fit after this prompt"):
        lm.generate(ids, mask, max_new_tokens=fit + 1, pad_token_id=0)
    got = lm.generate(ids, mask, max_new_tokens=fit, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=fit, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    logits, state = lm.prefill(ids, mask)
    for tok in got[:, 8:8 + fit - 1].T:                   # decode by hand up to the table's last position
        lm.decode(tok, state)
    with pytest.raises(ValueError, match="No more tokens fit"):
        lm.decode(got[:, -1], state)
    with pytest.raises(ValueError, match="a prompt of 33 tokens"):
        lm.prefill(text_batch(1, 33, 97, seed=5)[0])
    assert slimfx.load(slimfx.save(lm, tmp_path / "lm")).position_limit == 32
    with pytest.raises(ValueError, match="input_ids must be a .batch, length. integer tensor"):   # not ones_like's
        lm.generate([[1, 2, 3]], max_new_tokens=2)


def test_rotary_models_have_no_position_limit(llama):
    assert slimfx.lm.position_limit(llama) is None


def test_calibration_forms(llama):
    """One batch given as the whole calibration set (a tensor: its rows were batches, refused as 'input_ids must
    be (batch, length)'; a dict: its keys) is refused saying to wrap it; a tokenizer's BatchEncoding batch is read
    as the dict it is (it was taken for the ids tensor)."""
    from transformers import BatchEncoding
    ids, mask = text_batch(2, 7, 97, pad_left=True, seed=6)
    for one, what in ((ids, r"a tensor of shape \(2, 7\)"), (dict(input_ids=ids), r"a mapping of \['input_ids'\]")):
        with pytest.raises(TypeError, match=f"calibration is one batch \\({what}\\); pass a list of batches"):
            slimfx.compile_causal_lm(llama, calibration=one, progress=False)
    static = [P.Quantize(weights="int8", activations="static")]
    lms = [slimfx.compile_causal_lm(llama, passes=static, calibration=[wrap(dict(input_ids=ids, attention_mask=mask))],
                                    backend="torch", progress=False) for wrap in (dict, BatchEncoding)]
    ranges = [[r["x_range"] for r in lm.report().quant_layers()] for lm in lms]
    assert ranges[0] == ranges[1]


def test_compiled_from_one_prompt_saves_and_loads(llama, tmp_path):
    """compile_causal_lm from a one-prompt calibration (its example then has batch 1): the save did not load
    (the batch dim came back a static 1), which the README's generation example hit."""
    ids = text_batch(1, 8, 97, seed=7)[0]
    lm = slimfx.compile_causal_lm(llama, calibration=[ids], backend="numpy", progress=False)
    back = slimfx.load(slimfx.save(lm, tmp_path / "lm"))
    two, mask = text_batch(2, 6, 97, pad_left=True, seed=8)
    mask[:, -1] = 1
    for args in ((ids, None), (two, mask)):
        assert torch.equal(back.generate(*args, max_new_tokens=4), lm.generate(*args, max_new_tokens=4))


def test_deepseek_v3_compiled_from_a_batch_of_2_generates_for_1():
    """DeepSeek-V3 builds its keys by copying into slices of an empty tensor; export's memory-overlap check of
    that copy guarded the batch >= 2 (the default example's), and a single prompt was refused."""
    import transformers as T
    torch.manual_seed(0)
    model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=97, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
        max_position_embeddings=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.5)                          # zero-initialized router: random, so routing matters
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    for batch in (ids[:1], ids):
        ref = model.generate(batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(lm.generate(batch, max_new_tokens=4, pad_token_id=0), ref)


def test_dynamic_ntk_rope_and_minimax_are_refused_up_front():
    """Dynamic NTK scaling recomputes the rotary frequencies from the longest sequence seen so far (state across
    calls) and MiniMax keeps linear-attention state in its own cache class: both were refused by a capture error
    whose advice did not fit (MiniMax: "pass use_cache=False")."""
    import transformers as T
    llama = T.LlamaForCausalLM(T.LlamaConfig(**dict(_SMALL, max_position_embeddings=32),
                                             rope_scaling={"rope_type": "dynamic", "factor": 2.0})).eval()
    with pytest.raises(TypeError, match=r"LlamaForCausalLM: rope_type 'dynamic' \(dynamic NTK scaling\) is not "
                                        r"supported.*max_position_embeddings \(32\).*state kept across calls"):
        slimfx.compile_causal_lm(llama, progress=False)
    cfg = T.AutoConfig.for_model("minimax", vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, head_dim=8,
                                 num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
    minimax = T.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(TypeError, match=r"MiniMaxForCausalLM keeps its KV cache in a class of its own \(MiniMaxCache"
                                        r".*for its linear_attention layers"):
        slimfx.compile_causal_lm(minimax, progress=False)
