"""Beam search (``generate(num_beams=...)``, slimfx.beam) against transformers' own beam search, and the bans that
read each sequence's tokens so far (``no_repeat_ngram_size``, ``bad_words_ids``), with and without beams.

What must hold: the same sequences as transformers' ``generate`` with the same options (length penalty, each
early-stopping mode, several end-of-sequence ids, returned sequences, the logits processors on log-probabilities,
beam sampling from the same random state) for a decoder-only model on both backends and for encoder-decoder
models, whose generation config's beam options are generate's defaults and survive save/load; bad options are
refused by name. The beams' cache rows must follow the beams that continue: without ``reorder`` the tokens differ.
"""
import inspect
import json
import warnings

import pytest
import torch

import slimfx
from conftest import text_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VOCAB = 97
PAD = 7          # (a pad id of 0 fills ended beams otherwise: test_the_pad_fill_and_the_default_pad_are_transformers)


@pytest.fixture(scope="module")
def llama():
    """A 2-layer Llama whose random weights give varied tokens (the default init's std 0.02 repeats one)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def lms(llama):
    out = {"numpy": slimfx.compile_causal_lm(llama, backend="numpy", progress=False)}
    out["torch"] = out["numpy"].with_backend("torch")    # the same step graph: one export, not two
    out["numpy"].min_cache = 8        # the buffer grows 8 -> 16 -> 32 slots while the beams are reordered
    return out


def _prompts(seed=4):
    ids, mask = text_batch(3, 7, VOCAB, pad_left=True, seed=seed)
    mask[:, -1] = 1
    return ids, mask


def _transformers(model, ids, mask, new, **kw):
    eos = kw.pop("eos_token_id", None)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD,
                              **{"do_sample": False, **kw})


CASES = [dict(num_beams=3),
         dict(num_beams=4, eos_token_id=36),
         dict(num_beams=4, eos_token_id=[36, 73], length_penalty=0.5, num_return_sequences=2),
         dict(num_beams=3, eos_token_id=36, early_stopping=True),
         dict(num_beams=3, eos_token_id=36, early_stopping="never", length_penalty=2.0),
         dict(num_beams=3, eos_token_id=36, repetition_penalty=1.3, min_new_tokens=4),
         # a prompt is done while another goes on: its hypotheses that end later are not taken
         dict(num_beams=3, eos_token_id=[63, 30, 73, 21, 36], length_penalty=2.0),
         # 49 end-of-sequence ids: 50 continuations per beam are kept, or too few go on running
         dict(num_beams=3, eos_token_id=list(range(0, VOCAB, 2)), length_penalty=2.0)]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_beam_search_equals_transformers(llama, lms, backend, case):
    """Left-padded prompts, 12 new tokens: transformers' sequences, each of them, in its order."""
    kw = CASES[case]
    ids, mask = _prompts()
    ref = _transformers(llama, ids, mask, 12, **kw)
    got = lms[backend].generate(ids, mask, max_new_tokens=12, pad_token_id=PAD, **kw)
    assert torch.equal(got, ref), f"\n got {got.tolist()}\n ref {ref.tolist()}"
    assert lms[backend].last_timing["num_beams"] == kw["num_beams"]
    if case in (1, 2, 3):                     # some hypotheses end early, filled with the pad id after their end
        assert (got[:, 7:] == PAD).any()


def test_beams_are_no_greedy_search_and_follow_their_cache(llama, lms, monkeypatch):
    """Beam search finds other sequences than greedy search here (so the comparison above tests beams), and the
    cache rows must move with the beams that continue: left in place, the tokens are no longer transformers'."""
    import slimfx.beam as B
    ids, mask = _prompts()
    lm = lms["numpy"]
    beams = lm.generate(ids, mask, max_new_tokens=12, num_beams=3, pad_token_id=PAD)
    assert not torch.equal(beams, lm.generate(ids, mask, max_new_tokens=12))
    reorder = B.reorder
    monkeypatch.setattr(B, "reorder", lambda state, index, extra=True: reorder(state, index) if extra else None)
    assert not torch.equal(lm.generate(ids, mask, max_new_tokens=12, num_beams=3, pad_token_id=PAD), beams)


def test_the_pad_fill_and_the_default_pad_are_transformers(llama, lms):
    """Where the pad id is 0 transformers fills ended beams with the first end-of-sequence id (``pad_token_id or
    eos_token_id[0]``), and a model without a pad id pads with the call's first end-of-sequence id: the same
    sequences, greedy and with beams, on either."""
    ids, mask = _prompts()
    lm = lms["numpy"]
    for kw in (dict(pad_token_id=0), dict()):                 # (llama has no pad id, nor an end-of-sequence one)
        for beams in (1, 4):
            with torch.no_grad():
                ref = llama.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=beams,
                                     eos_token_id=36, **kw)
            got = lm.generate(ids, mask, max_new_tokens=12, num_beams=beams, eos_token_id=36, **kw)
            assert torch.equal(got, ref), f"{kw} {beams}\n got {got.tolist()}\n ref {ref.tolist()}"
            if beams > 1 or not kw:                           # some end early, filled with 36 (greedy: pad 0)
                assert ((got[:, 7:-1] == 36) & (got[:, 8:] == 36)).any()
    assert lm.pad_token_id == 0                               # (no end-of-sequence id of its own either)


@pytest.mark.skipif("topk_log_probs.sort" not in inspect.getsource(
    __import__("transformers").GenerationMixin._get_top_k_continuations),
    reason="this transformers (5.17 does) leaves beam sampling's draws unsorted; slimfx sorts them as 5.25 does")
def test_beam_sampling_draws_transformers_sequences(llama, lms):
    """temperature, top-k and top-p on the log-probabilities (each keeping one token more than the end-of-sequence
    ids, or 2), the continuations drawn without replacement from the same random state: transformers' sequences."""
    ids, mask = _prompts(seed=5)
    for kw in (dict(temperature=1.5), dict(temperature=0.8, top_k=1, top_p=0.7),
               dict(temperature=0.8, top_k=1, eos_token_id=[36, 73, 63, 5, 6, 8])):
        torch.manual_seed(3)
        with torch.no_grad():
            ref = llama.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=True,
                                 pad_token_id=PAD, top_k=kw.get("top_k", 0), temperature=kw["temperature"],
                                 top_p=kw.get("top_p", 1.0), eos_token_id=kw.get("eos_token_id"))
        torch.manual_seed(3)
        got = lms["numpy"].generate(ids, mask, max_new_tokens=10, num_beams=3, pad_token_id=PAD, **kw)
        assert torch.equal(got, ref), f"{kw}\n got {got.tolist()}\n ref {ref.tolist()}"


def test_longrope_beams_run_the_whole_sequence_again_at_the_switch():
    """Phi-3 longrope: crossing its switch runs every beam's whole sequence again (``decode``), from the beams'
    reordered token ids: transformers' beams (>= 5.25, whose generate runs the whole sequence there too)."""
    import transformers
    from packaging.version import Version
    from test_lm import _longrope
    if Version(transformers.__version__) < Version("5.25"):
        pytest.skip("transformers < 5.25 runs only the newest token at the switch (test_lm's longrope test)")
    model = _longrope()
    lm = slimfx.compile_causal_lm(model, backend="torch", progress=False)
    ids, mask = text_batch(2, 26, VOCAB, pad_left=True, seed=6)
    mask[:, -1] = 1
    ref = _transformers(model, ids, mask, 12, num_beams=3)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=12, num_beams=3, pad_token_id=PAD), ref)


def test_refusals(lms):
    lm = lms["numpy"]
    ids, mask = _prompts()
    for kw, what in [(dict(num_beams=0), "num_beams must be an integer >= 1"),
                     (dict(num_beams=2.0), "num_beams must be an integer"),
                     (dict(num_beams=3, num_return_sequences=4), "num_return_sequences must be an integer from 1 "
                                                                 r"to num_beams \(3\), got 4"),
                     (dict(num_return_sequences=2), r"from 1 to num_beams \(1\)"),
                     (dict(num_beams=2, early_stopping="yes"), "early_stopping must be True, False or 'never'"),
                     (dict(num_beams=2, early_stopping=1), "early_stopping must be True, False or 'never'"),
                     (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
                     (dict(num_beams=2, length_penalty=True), "length_penalty must be a finite number"),
                     (dict(num_beams=2, renormalize_logits="yes"), "renormalize_logits must be True or False"),
                     (dict(num_beams=2, max_new_tokens=0), "max_new_tokens must be an integer >= 1")]:
        with pytest.raises(ValueError, match=what):
            lm.generate(ids, mask, **{"max_new_tokens": 4, **kw})
    with pytest.raises(TypeError, match="num_beams"):
        lm.stream(ids, mask, num_beams=2)


# --- encoder-decoder models


def _seq2seq(family, layers=1, **config):
    """test_seq2seq's tiny ``family`` model with these generation-config entries; one layer each side unless
    told (the tests of settings: a layer on each side adds some 2 s to a compile here)."""
    from test_seq2seq import _tiny
    model = _tiny(family, layers)
    for key, value in config.items():
        setattr(model.generation_config, key, value)
    return model


def _seq2seq_reference(model, inputs, mask, new, **kw):
    given = {"attention_mask": mask} if mask is not None else {}
    with torch.no_grad():
        out = model.generate(inputs, **given, max_new_tokens=new, do_sample=False, **kw)
    if model.main_input_name == "input_features":    # (Whisper's generate leaves the start token out)
        out = torch.cat([torch.full_like(out[:, :1], model.generation_config.decoder_start_token_id), out], 1)
    return out


@pytest.mark.parametrize("family", ["t5", "bart", "marian", "whisper"])
def test_encoder_decoder_beams_equal_transformers(family):
    """The encoded input is repeated for each beam once, the decoder cache reordered every step: transformers'
    sequences (Whisper's generate repeats each input num_return_sequences times: its best sequence that often)."""
    from test_seq2seq import _inputs
    model = _seq2seq(family, layers=2)                # (each layer's cache rows reordered)
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    lm.min_cache = 4
    inputs, mask = _inputs(model, batch=3)
    cases = [dict(num_beams=3, early_stopping=True), dict(num_beams=2, min_new_tokens=5, early_stopping="never"),
             dict(num_beams=4, length_penalty=0.7, num_return_sequences=2)]
    for kw in cases:
        ref = _seq2seq_reference(model, inputs, mask, 14, **kw)
        got = lm.generate(inputs, mask, max_new_tokens=14, **kw)
        assert torch.equal(got, ref), f"{family} {kw}\n got {got.tolist()}\n ref {ref.tolist()}"


def test_renormalized_logits_as_the_marian_configs_ask():
    """Marian's configs set renormalize_logits with 4 beams, a forced end and a banned pad: transformers then
    log-softmaxes the processed scores again, which moves each beam's by another amount (banned and forced tokens
    took their share): its sequences, which differ from those without it."""
    from test_seq2seq import _inputs
    model = _seq2seq("marian", layers=2, num_beams=4, renormalize_logits=True, forced_eos_token_id=1,
                     bad_words_ids=[[0]])                 # (one layer's sequences come out the same either way)
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    assert lm.renormalize_logits is True
    inputs, mask = _inputs(model, batch=3, seed=0)
    ref = _seq2seq_reference(model, inputs, mask, 12)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=12), ref)
    assert not torch.equal(lm.generate(inputs, mask, max_new_tokens=12, renormalize_logits=False), ref)


def test_the_generation_configs_beams_are_generates_defaults(tmp_path):
    """A Marian-like config (num_beams 4, a length penalty, early stopping, forced end of sequence) is what
    generate does unless told otherwise, as transformers' generate; saved and loaded, it still is; stream stays
    one token at a time and refuses beam options; an edited save's num_beams is refused by name."""
    model = _seq2seq("marian", num_beams=4, length_penalty=0.6, early_stopping=True, forced_eos_token_id=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # (beam search is applied now: no warning names it)
        lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    assert (lm.num_beams, lm.length_penalty, lm.early_stopping, lm.num_return_sequences) == (4, 0.6, True, 1)
    from test_seq2seq import _inputs
    inputs, mask = _inputs(model, batch=2, seed=0)
    ref = _seq2seq_reference(model, inputs, mask, 10)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=10), ref)
    greedy = _seq2seq_reference(model, inputs, mask, 10, num_beams=1)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=10, num_beams=1), greedy)
    assert not torch.equal(ref, greedy)
    assert (ref[:, -1] == 1).all()                   # (the forced end of sequence, in each beam)
    with pytest.raises(TypeError, match="beam search chooses them at the end: num_beams are generate's"):
        lm.stream(inputs, mask, num_beams=4)
    path = lm.save(tmp_path / "marian")
    loaded = slimfx.load(path, backend="numpy")
    assert torch.equal(loaded.generate(inputs, mask, max_new_tokens=10), ref)
    data = json.loads((path / "seq2seq_lm.json").read_text())
    (path / "seq2seq_lm.json").write_text(json.dumps({**data, "num_beams": 0}))
    with pytest.raises(slimfx.ir.serialize.FormatError, match="seq2seq_lm.json: num_beams must be an integer >= 1"):
        slimfx.load(path)
    bad = _seq2seq("marian", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match=r"MarianMTModel's generation config: num_return_sequences must be an integer "
                                         r"from 1 to num_beams \(2\), got 3"):
        slimfx.compile_seq2seq_lm(bad, progress=False)
    sampled = _seq2seq("marian", do_sample=True, num_beam_groups=2, diversity_penalty=0.5)
    with pytest.warns(UserWarning, match=r"sets num_beam_groups=2, diversity_penalty=0.5, do_sample=True \(generate is "
                                         r"greedy unless given temperature="):
        slimfx.compile_seq2seq_lm(sampled, backend="numpy", progress=False)


# --- bans by the tokens so far: no_repeat_ngram_size, bad_words_ids


def test_history_bans_by_hand():
    """Exact bans on hand-made rows: the ngram a row's last n-1 tokens would repeat, a bad word's last token when
    its other tokens end the row (a one-token word always), ids past the logits never."""
    from slimfx.lm import history_bans
    seq = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 2]])
    banned = lambda m: [row.nonzero()[:, 0].tolist() for row in m]       # noqa: E731
    assert banned(history_bans(seq, 10, ngram=3)) == [[3], []]           # (1, 2) -> 3 held; (4, 2) never
    assert banned(history_bans(seq, 10, ngram=2)) == [[3], []]           # (2,) -> 3; row 1's 2 is its last
    assert banned(history_bans(seq, 10, ngram=1)) == [[1, 2, 3], [2, 4]]  # every token held
    assert banned(history_bans(seq, 10, ngram=6)) == [[], []]            # no 6-gram yet
    assert banned(history_bans(seq, 10, words=[(2, 5), (4, 2, 6), (7,), (3, 12)])) == [[5, 7], [5, 6, 7]]
    assert banned(history_bans(seq, 3, ngram=2, words=[(7,)])) == [[], []]  # (ids past 3 logits: none)
    encoder = torch.tensor([[2, 8, 2, 9, 0], [4, 2, 5, 5, 5]])             # each row's own encoder input
    assert banned(history_bans(seq, 10, encoder=(2, encoder))) == [[8, 9], [5]]   # what follows its last token
    assert banned(history_bans(seq, 10, encoder=(1, encoder))) == [[0, 2, 8, 9], [2, 4, 5]]
    assert banned(history_bans(seq[:, :1], 10, encoder=(3, encoder))) == [[], []]    # (too short to repeat 3)


BANS = [dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=3, num_beams=3),
        dict(bad_words_ids=[[63, 35], [53, 26, 67], [44]]),
        dict(bad_words_ids=[[63, 35], [53, 26, 67], [44]], num_beams=3, eos_token_id=36),
        dict(no_repeat_ngram_size=2, bad_words_ids=[[63, 35], [36]], temperature=1.0)]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_bans_equal_transformers(llama, lms, backend):
    """n-gram and bad-word bans (bad words taken from the unbanned tokens, so they change them), greedy, with
    beams and sampled: transformers' tokens."""
    ids, mask = _prompts()
    plain = lms[backend].generate(ids, mask, max_new_tokens=14, pad_token_id=PAD)
    assert plain[0, 8:10].tolist() == [63, 35] and plain[1, 10:13].tolist() == [53, 26, 67] and plain[2, 9] == 44
    for kw in BANS:
        hf = dict(kw)
        temperature = hf.pop("temperature", None)
        torch.manual_seed(1)
        ref = _transformers(llama, ids, mask, 14, **hf, **({"do_sample": True, "top_k": 0} if temperature else {}))
        torch.manual_seed(1)
        got = lms[backend].generate(ids, mask, max_new_tokens=14, pad_token_id=PAD, **kw)
        assert torch.equal(got, ref), f"{kw}\n got {got.tolist()}\n ref {ref.tolist()}"
        if "num_beams" not in kw and not temperature:
            assert not torch.equal(got, plain), kw                     # (the bans changed the tokens)
    bans = dict(no_repeat_ngram_size=2, bad_words_ids=[[63, 35]])
    streamed = torch.stack(list(lms[backend].stream(ids, mask, max_new_tokens=6, pad_token_id=PAD, **bans)), 1)
    assert torch.equal(streamed, lms[backend].generate(ids, mask, max_new_tokens=6, pad_token_id=PAD, **bans)[:, 7:])


def test_ban_refusals(lms):
    ids, mask = _prompts()
    for kw, what in [(dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
                     (dict(no_repeat_ngram_size=2.5), "no_repeat_ngram_size must be an integer >= 0"),
                     (dict(bad_words_ids=[[]]), "bad_words_ids must be a list of non-empty lists of token ids"),
                     (dict(bad_words_ids=[[3, -1]]), "bad_words_ids must be a list of non-empty lists of token ids"),
                     (dict(bad_words_ids=[3, 4]), "bad_words_ids must be a list of non-empty lists"),
                     (dict(bad_words_ids="no"), "bad_words_ids must be a list of non-empty lists")]:
        with pytest.raises(ValueError, match=what):
            lms["numpy"].generate(ids, mask, max_new_tokens=3, **kw)


def test_encoder_ngram_bans_equal_transformers(tmp_path):
    """encoder_no_repeat_ngram_size (Blenderbot's configs: 3): no decoder token repeats an n-gram of the row's
    encoder input, greedy and with beams, as transformers bans them; from the config by default, saved."""
    from test_seq2seq import _inputs
    for n, beams in ((1, 1), (1, 3), (2, 3)):
        # (two layers: one layer's tokens here never repeat the input, and the bans would change nothing)
        model = _seq2seq("bart", layers=2, encoder_no_repeat_ngram_size=n, num_beams=beams)
        with warnings.catch_warnings():
            warnings.simplefilter("error")               # (applied: no warning names it)
            lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
        inputs, mask = _inputs(model, batch=2, seed=0)
        ref = _seq2seq_reference(model, inputs, mask, 12)
        assert torch.equal(lm.generate(inputs, mask, max_new_tokens=12), ref), (n, beams)
        if n == 1:                                       # (the bans change the tokens)
            assert not torch.equal(lm.generate(inputs, mask, max_new_tokens=12, encoder_no_repeat_ngram_size=0), ref)
            assert not any(set(r[1:].tolist()) & set(i[m.bool()].tolist()) for r, i, m in zip(ref, inputs, mask))
    loaded = slimfx.load(lm.save(tmp_path / "bart"), backend="numpy")
    assert loaded.encoder_no_repeat_ngram_size == 2
    with pytest.raises(ValueError, match="encoder_no_repeat_ngram_size must be an integer >= 0"):
        lm.generate(inputs, mask, max_new_tokens=2, encoder_no_repeat_ngram_size=-1)


def test_encoder_decoder_config_bans_and_penalty_are_generates_defaults(tmp_path):
    """BART-CNN's kind of config (4 beams, length penalty 2, early stopping, no 3-gram twice, min_length), a
    config's multi-token bad words and its repetition penalty: transformers' tokens by default, saved and loaded
    too; bad_words_ids given to generate replaces the config's, as in transformers."""
    from test_seq2seq import _inputs
    cnn = _seq2seq("bart", num_beams=4, length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3,
                   min_length=8)
    words = _seq2seq("marian", bad_words_ids=[[10, 46], [53, 53], [21]], repetition_penalty=1.4)
    for model in (cnn, words):
        with warnings.catch_warnings():
            warnings.simplefilter("error")           # (nothing of these configs goes unapplied)
            lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
        inputs, mask = _inputs(model, batch=2, seed=0)
        ref = _seq2seq_reference(model, inputs, mask, 12)
        assert torch.equal(lm.generate(inputs, mask, max_new_tokens=12), ref)
        plain = lm.generate(inputs, mask, max_new_tokens=12, num_beams=1, no_repeat_ngram_size=0,
                            bad_words_ids=None, repetition_penalty=1.0, min_new_tokens=0)
        assert not torch.equal(plain, ref)
        loaded = slimfx.load(lm.save(tmp_path / type(model).__name__), backend="numpy")
        assert torch.equal(loaded.generate(inputs, mask, max_new_tokens=12), ref)
    other = [[int(plain[0, 2]), int(plain[0, 3])]]
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=12, bad_words_ids=other),
                       _seq2seq_reference(words, inputs, mask, 12, bad_words_ids=other))
    off = lm.generate(inputs, mask, max_new_tokens=12, no_repeat_ngram_size=None, repetition_penalty=None)
    assert torch.equal(off, lm.generate(inputs, mask, max_new_tokens=12, no_repeat_ngram_size=0,
                                        repetition_penalty=1.0))         # (None: off, as transformers reads it)
    # a forced first token that is a bad word: forced all the same (transformers bans, then forces)
    bart = _seq2seq("bart", forced_bos_token_id=9)
    lm = slimfx.compile_seq2seq_lm(bart, backend="numpy", progress=False)
    inputs, mask = _inputs(bart, batch=2, seed=1)
    got = lm.generate(inputs, mask, max_new_tokens=6, bad_words_ids=[[9]])
    assert torch.equal(got, _seq2seq_reference(bart, inputs, mask, 6, bad_words_ids=[[9]]))
    assert (got[:, 1] == 9).all() and not (got[:, 2:] == 9).any()


def test_the_pad_token_id_can_be_set(lms):
    """lm.pad_token_id is settable (it was an attribute): the rows that end are padded with it; None: the model's
    default again (its first end-of-sequence id, else 0)."""
    import copy
    lm = copy.copy(lms["numpy"])
    ids, mask = _prompts()
    lm.pad_token_id = 5
    got = lm.generate(ids, mask, max_new_tokens=12, eos_token_id=36)
    assert lm.pad_token_id == 5 and (got[:, 8:][got[:, 7:-1] == 36] == 5).all() and (got == 5).any()
    lm.pad_token_id = None
    assert lm.pad_token_id == 0 and lm.pad([36]) == 36
    with pytest.raises(ValueError, match="pad_token_id must be a token id or None"):
        lm.pad_token_id = "x"
