"""compile_seq2seq_lm: encoder-decoder generation (T5, BART, Marian, Pegasus, Whisper) against transformers."""
import copy
import json
import os

import pytest
import torch

import slimfx
from conftest import text_batch
from slimfx import passes as P

VOCAB = 97
FAMILIES = ("t5", "bart", "marian", "pegasus", "whisper")      # the lms fixture's, one model each


def _tiny(family: str, layers: int = 2):
    """A model of ``family`` with ``layers`` encoder and decoder layers whose random weights give varied greedy
    tokens (transformers' default init, std 0.02, repeats one token: a test of nothing), with its generation
    config's forced and suppressed tokens cleared (``_forcing`` sets them). One layer for the tests of what
    happens around the graphs (generation settings): a layer on each side adds some 2 s to a compile here."""
    import transformers as T
    torch.manual_seed(0)
    seq = dict(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=2, forced_eos_token_id=None,
               forced_bos_token_id=None)
    if family == "t5":
        model = T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    elif family == "bart":
        model = T.BartForConditionalGeneration(T.BartConfig(**seq))
    elif family == "marian":
        model = T.MarianMTModel(T.MarianConfig(**seq))
    elif family == "pegasus":
        model = T.PegasusForConditionalGeneration(T.PegasusConfig(**seq))
    elif family == "whisper":
        model = T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
            max_source_positions=12, max_target_positions=40, decoder_start_token_id=2, pad_token_id=0,
            eos_token_id=1, bos_token_id=2, begin_suppress_tokens=None, suppress_tokens=None))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if "embed" in name or "shared" in name or "relative" in name else 0.3)
    gen = model.generation_config
    for key in ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens"):
        setattr(gen, key, None)
    gen.max_length = 200                  # (transformers would cap generate at 20 tokens)
    return model.eval()


_SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=2, forced_eos_token_id=None,
            forced_bos_token_id=None)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
           relative_attention_max_distance=6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_OTHERS = {"mt5": ("MT5ForConditionalGeneration", "MT5Config", _T5),
           "umt5": ("UMT5ForConditionalGeneration", "UMT5Config", _T5),
           "longt5": ("LongT5ForConditionalGeneration", "LongT5Config", _T5),
           "mbart": ("MBartForConditionalGeneration", "MBartConfig", _SEQ),
           "plbart": ("PLBartForConditionalGeneration", "PLBartConfig", _SEQ),
           "blenderbot": ("BlenderbotForConditionalGeneration", "BlenderbotConfig", _SEQ),
           "blenderbot_small": ("BlenderbotSmallForConditionalGeneration", "BlenderbotSmallConfig", _SEQ),
           "bigbird_pegasus": ("BigBirdPegasusForConditionalGeneration", "BigBirdPegasusConfig",
                               {**_SEQ, "attention_type": "original_full"}),
           "m2m100": ("M2M100ForConditionalGeneration", "M2M100Config", _SEQ),
           "led": ("LEDForConditionalGeneration", "LEDConfig",
                   {**{k: v for k, v in _SEQ.items() if k != "max_position_embeddings"},
                    "max_encoder_position_embeddings": 64, "max_decoder_position_embeddings": 64,
                    "attention_window": [4, 4]})}


def _other(family: str):
    """A 2-layer ``family`` model (``_OTHERS``) with weights that give varied tokens, as ``_tiny``."""
    import transformers as T
    model_class, config_class, config = _OTHERS[family]
    torch.manual_seed(0)
    model = getattr(T, model_class)(getattr(T, config_class)(**config))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.generation_config.max_length = 200
    return model.eval()


def _inputs(model, batch=2, length=7, seed=0):
    if model.main_input_name == "input_features":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, model.config.num_mel_bins, 24, generator=g), None
    return text_batch(batch, length, VOCAB, pad_left=True, seed=seed)


def _reference(model, inputs, mask, new, **kw):
    """transformers' greedy tokens with the start token in front (Whisper's generate leaves it out)."""
    given = {"attention_mask": mask} if mask is not None else {}
    with torch.no_grad():       # (min_new_tokens given replaces the config's min_length in transformers)
        out = model.generate(inputs, **given, max_new_tokens=new, do_sample=False, num_beams=1, **kw)
    if model.main_input_name == "input_features" and "decoder_input_ids" not in kw:
        out = torch.cat([torch.full_like(out[:, :1], model.generation_config.decoder_start_token_id), out], 1)
    return out


class _Compiled(dict):
    """family -> (tiny model, its compiled numpy LM), each compiled when a test first asks: pytest-xdist's
    workers each build a module's fixtures, and one running only T5's tests need not export the other four."""
    def __missing__(self, family):
        model = _tiny(family)
        self[family] = (model, slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False))
        return self[family]


@pytest.fixture(scope="module")
def lms():
    return _Compiled()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(lms, family):
    """The decoder step's positions count real tokens (T5's relative bias, BART's, Marian's, Pegasus's and
    Whisper's position tables), so the decode buffer's masked slots change nothing: transformers' tokens, with a
    left-padded encoder input, past two buffer sizes (min_cache 4: 4 -> 8 -> 16 -> 32 slots). Without the
    replacements the step counts slots and the tokens differ (checked by check_positions' refusal)."""
    model, lm = lms[family]
    lm.min_cache = 4
    inputs, mask = _inputs(model)
    ref = _reference(model, inputs, mask, 20, min_new_tokens=20)
    got = lm.generate(inputs, mask, max_new_tokens=20, min_new_tokens=20)
    assert torch.equal(got, ref), f"{family}\n got {got.tolist()}\n ref {ref.tolist()}"
    assert len(set(ref[:, 1:].flatten().tolist())) >= 3          # not one token repeated
    assert [t.tolist() for t in lm.stream(inputs, mask, max_new_tokens=5)] == got[:, 1:6].T.tolist()
    # each decode step's logits (not only their argmax) are the model's over the whole decoder sequence
    logits, state = lm.prefill(got[:, :1], extra=lm.encode(inputs, mask))
    steps = [logits[:, -1]] + [lm.decode(got[:, i], state) for i in range(1, 20)]
    given = {"attention_mask": mask} if mask is not None else {}
    with torch.no_grad():
        whole = model(inputs, **given, decoder_input_ids=got[:, :20]).logits
    err = (torch.stack(steps, 1) - whole).abs().max() / whole.abs().max()
    assert err < 1e-5, err                                     # float32 summation order (2e-7 measured)


@pytest.mark.parametrize("family", ["mt5", "umt5", "longt5", "mbart", "plbart", "blenderbot", "blenderbot_small",
                                    "bigbird_pegasus"])
def test_other_families_generate_transformers_tokens(family):
    """The copies of T5's relative bias (UMT5's in every layer, with a bucket method of its own) and of BART's and
    Pegasus's position tables get real positions too: transformers' tokens past two buffer sizes."""
    model = _other(family)
    inputs, mask = _inputs(model, seed=1)
    start = model.generation_config.decoder_start_token_id
    dec = torch.tensor([[start, 5, 9, 11]] * 2)
    with torch.no_grad():
        four = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=dec).logits[:, 0]
        one = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=dec[:, :1]).logits[:, 0]
    if not torch.allclose(four, one, atol=1e-5):
        # transformers 5.17's UMT5 gives its first token other logits after 4 decoder tokens than after 1 (0.66 off):
        # no cache can reproduce both, and the eager check refuses it
        with pytest.raises(TypeError, match="is not supported: its decoder counts positions by cache slot"):
            slimfx.compile_seq2seq_lm(model, progress=False)
        return
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    assert lm.decode_tokens == 1, lm.decode_note                # (mT5's and UMT5's bias too: _t5_bias)
    lm.min_cache = 4
    ref = _reference(model, inputs, mask, 12, min_new_tokens=12)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=12, min_new_tokens=12), ref)


@pytest.mark.parametrize("family, why", [
    ("led", r"its decoder fails on the cache compile_seq2seq_lm gives it, masked slots included \(IndexError")])
def test_families_whose_positions_count_slots_are_refused(family, why):
    """LED counts positions by cache length into a table the decode buffer's slots overrun: refused after the
    eager check, the model left as it was."""
    model = _other(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=f"{type(model).__name__} is not supported: {why}"):
        slimfx.compile_seq2seq_lm(model, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    inputs, mask = _inputs(model)
    with torch.no_grad():                     # its own forward is back (nothing replaced stays)
        out = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=inputs[:, :3]).logits
    assert out.shape == (2, 3, VOCAB)


def test_m2m100_positions_from_the_ids_padding():
    """M2M100's (and NLLB's) sinusoidal table is indexed by padding_idx + 1 + cache length + the rank of a token among
    the ids that are not the pad id, which counts cache slots: given the step's real positions instead, every decode
    step's logits are the model's over the whole decoder sequence, past two buffer sizes, and the tokens are
    transformers'. Without the replacement the eager check refuses it (it did: "counts positions by cache slot")."""
    model = _other("m2m100")
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    lm.min_cache = 4
    assert lm.position_limit == 64 + 2 - 0 - 1            # the table's rows past padding_idx (0) + 1
    inputs, mask = _inputs(model, seed=1)
    ref = _reference(model, inputs, mask, 12, min_new_tokens=12)
    got = lm.generate(inputs, mask, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(got, ref)
    seq = torch.cat([got[:, :1], torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))], 1)
    logits, state = lm.prefill(seq[:, :1], extra=lm.encode(inputs, mask))
    steps = torch.stack([logits[:, -1]] + [lm.decode(seq[:, i], state) for i in range(1, 12)], 1)
    with torch.no_grad():
        whole = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=seq).logits
    assert (steps - whole).abs().max() / whole.abs().max() < 1e-5    # float32 summation order


def test_m2m100_a_generated_pad_id_is_padding_as_in_transformers():
    """A running row that samples M2M100's pad id: transformers gives that token the table's padding row (zero), and
    the tokens after it their rows by cache length (its slot counted). The step's positions give the same: the
    sampled tokens equal transformers' past it (they drifted from there before)."""
    model = _other("m2m100")
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    inputs, mask = _inputs(model, batch=2, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = model.generate(inputs, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=True,
                             top_k=0)
    assert ((ref[:, 1:-1] == 0) & (ref[:, 2:] != 0)).any()     # a pad id (0) with a real token after it
    torch.manual_seed(3)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=16, min_new_tokens=16, temperature=1.0), ref)


def test_speech2text_is_refused_by_name():
    """Speech2Text subsamples its frames' mask inside forward, also given the encoder's output: refused up front."""
    import transformers as T
    model = T.Speech2TextForConditionalGeneration(T.Speech2TextConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, conv_channels=16,
        input_feat_per_channel=8))
    with pytest.raises(TypeError, match="Speech2TextForConditionalGeneration is not supported: its forward "
                                        "subsamples the attention mask of its input frames"):
        slimfx.compile_seq2seq_lm(model, example_inputs=(torch.randn(1, 40, 8),), progress=False)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_the_torch_backend_and_a_decoder_prompt(lms, family):
    """A given decoder prompt continues as transformers continues it; a left-padded one (positions count its real
    tokens) as each row's unpadded prompt alone. The torch backend gives the numpy backend's tokens."""
    model, lm = lms[family]
    eager = lm.with_backend("torch")
    inputs, mask = _inputs(model, seed=3)
    start = model.generation_config.decoder_start_token_id
    # (prompts whose greedy tokens win by >= 0.015 in the logits: with 5, 9, 11 BART's last one won by 2e-6, and an
    # EPYC's OpenBLAS summed its way to the other token)
    prompt = torch.tensor([[start, 5, 8, 11], [start, 7, 3, 30]])
    ref = _reference(model, inputs, mask, 8, decoder_input_ids=prompt, min_new_tokens=8)
    for which in (lm, eager):
        assert torch.equal(which.generate(inputs, mask, decoder_input_ids=prompt, max_new_tokens=8,
                                          min_new_tokens=8), ref)
    padded = torch.tensor([[start, 5, 8, 11, 13, 17], [0, 0, start, 7, 3, 30]])
    dmask = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    got = lm.generate(inputs, mask, decoder_input_ids=padded, decoder_attention_mask=dmask, max_new_tokens=8,
                      min_new_tokens=8)
    for row, real in ((0, padded[0]), (1, padded[1, 2:])):
        alone = _reference(model, inputs[row:row + 1], mask[row:row + 1], 8, decoder_input_ids=real[None],
                           min_new_tokens=8)
        assert torch.equal(got[row, -len(alone[0]):], alone[0]), (row, got[row], alone[0])


def _forcing(model, **config):
    for key, value in config.items():
        setattr(model.generation_config, key, value)
    return model


def test_forced_and_suppressed_tokens_as_the_generation_config_says():
    """BART's forced beginning and end of sequence, Whisper's suppressed tokens (always, and at the first new
    token), from the model's generation config as transformers' logits processors apply them; each may be
    overridden per call (None: none)."""
    bart = _forcing(_tiny("bart", layers=1), forced_bos_token_id=7, forced_eos_token_id=1)
    lm = slimfx.compile_seq2seq_lm(bart, backend="numpy", progress=False)
    inputs, mask = _inputs(bart, seed=1)
    ref = _reference(bart, inputs, mask, 9, min_new_tokens=9)
    got = lm.generate(inputs, mask, max_new_tokens=9, min_new_tokens=9)
    assert torch.equal(got, ref) and (got[:, 1] == 7).all() and (got[:, -1] == 1).all()
    free = lm.generate(inputs, mask, max_new_tokens=9, min_new_tokens=9, forced_bos_token_id=None,
                       forced_eos_token_id=None)
    assert not (free[:, 1] == 7).all()
    whisper = _tiny("whisper", layers=1)
    features, _ = _inputs(whisper)
    plain = slimfx.compile_seq2seq_lm(whisper, backend="numpy", progress=False).generate(features, max_new_tokens=6)
    first, later = int(plain[0, 1]), int(plain[0, 2])
    _forcing(whisper, begin_suppress_tokens=[first], suppress_tokens=[later])
    lm = slimfx.compile_seq2seq_lm(whisper, backend="numpy", progress=False)
    got = lm.generate(features, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(got, _reference(whisper, features, None, 6, min_new_tokens=6))
    assert got[0, 1] != first and not (got[:, 1:] == later).any()


def test_sampling_draws_transformers_tokens():
    """temperature, top-k and top-p over the decoder's logits: the same random state draws transformers' tokens."""
    model = _tiny("t5")
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    inputs, mask = _inputs(model, seed=2)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = model.generate(inputs, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=True,
                             temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    got = lm.generate(inputs, mask, max_new_tokens=10, min_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9)
    assert torch.equal(got, ref)


def test_quantized_int8_generates_close_to_float():
    """W8A8 (dynamic per-token activations) reaches the encoder's linear layers, the cross-attention projections
    and the decoder's: each graph's report says so, and the first step's logits stay within a cosine of 0.99 of
    the float model's (int8 per channel/per token on a 32-wide model: SQNR ~ 30 dB, cosine > 0.999 typically;
    0.99 leaves room for outlier rows)."""
    model = _tiny("bart")
    lm = slimfx.compile_seq2seq_lm(model, passes=[P.Quantize(weights="int8", activations="dynamic-per-token")],
                                   backend="numpy", progress=False)
    linears = {"encoder": 2 * 6 + 2 * 2, "step": 2 * 8 + 1}        # + the cross k/v; the step: + lm_head
    for what, cm in (("encoder", lm.encoder), ("step", lm.step)):
        counts = slimfx.ir.op_counts(cm.graph)
        assert counts.get("slimfx.quantized_linear.default") == linears[what], counts
        assert "aten.linear.default" not in counts, counts
    text = str(lm.report())
    assert text.index("== encoder") < text.index("model.encoder.layers.0.fc1") < text.index("== decoder step") \
        < text.index("lm_head")
    inputs, mask = _inputs(model, seed=4)
    ids = torch.full((2, 1), model.generation_config.decoder_start_token_id)
    got, _ = lm.prefill(ids, extra=lm.encode(inputs, mask))
    with torch.no_grad():
        ref = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(got[:, -1].float(), ref[:, -1].float(), dim=-1)
    assert (cos > 0.99).all(), cos


def test_calibration_reaches_both_graphs():
    """Static activation scales come from calibration batches: the encoder's from their inputs, the decoder
    step's from their labels shifted behind the start token; generation then runs."""
    model = _tiny("t5")
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": text_batch(2, 5, VOCAB, seed=i + 9)[0]}
               for i, (ids, mask) in enumerate(text_batch(2, 7, VOCAB, pad_left=True, seed=s) for s in range(2))]
    lm = slimfx.compile_seq2seq_lm(model, passes=[P.Quantize(weights="int8", activations="static")],
                                   calibration=batches, backend="numpy", progress=False)
    for cm in (lm.encoder, lm.step):
        assert any("static" in str(r.stats) or "calib" in str(r.stats) for r in cm.report().records), \
            cm.report()
    assert lm.generate(batches[0]["input_ids"], batches[0]["attention_mask"], max_new_tokens=3).shape == (2, 4)


def test_the_encoder_graph_holds_only_the_encoder_and_cross_projections(lms):
    """The encoder step runs the decoder once on placeholder tokens to fill the cross-attention cache; all of
    that run but the cross keys and values is dead code and goes, its attention included (torch marks
    scaled_dot_product_attention random, so it stayed with everything it reads, before)."""
    _, lm = lms["bart"]
    names = [n.meta.get("nn_module_stack", {}) for n in lm.encoder.graph.graph.nodes if "linear" in str(n.target)]
    owners = [list(stack)[-1] if stack else "" for stack in names]
    decoder = [o for o in owners if "decoder" in o]
    assert len(owners) == 16 and len(decoder) == 4, owners
    sdpa = [n for n in lm.encoder.graph.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 2                                  # the encoder's own


def test_refusals(lms):
    import transformers as T
    model, lm = lms["bart"]
    inputs, mask = _inputs(model)
    with pytest.raises(TypeError, match="LlamaForCausalLM is not an encoder-decoder model"):
        slimfx.compile_seq2seq_lm(T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    with pytest.raises(TypeError, match="compile_seq2seq_lm sets 'dynamic' itself"):
        slimfx.compile_seq2seq_lm(model, dynamic=True)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 6\), input_ids \(2, 7\)"):
        lm.generate(inputs, mask[:, 1:])
    with pytest.raises(ValueError, match="input_ids holds 2 inputs, decoder_input_ids 1 prompts"):
        lm.generate(inputs, mask, decoder_input_ids=torch.tensor([[2, 5]]))
    with pytest.raises(TypeError, match="LongT5ForConditionalGeneration: transient-global attention is not "
                                        "supported"):
        slimfx.compile_seq2seq_lm(T.LongT5ForConditionalGeneration(T.LongT5Config(
            **_T5, encoder_attention_type="transient-global")))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        lm.generate(inputs, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids must be a .batch, length. integer tensor"):
        lm.generate(inputs.float(), mask)
    with pytest.raises(TypeError, match="is an encoder-decoder model: .*compile_seq2seq_lm"):
        slimfx.compile_causal_lm(model)


def test_save_and_load(lms, tmp_path):
    """Both graphs and the generation settings come back (the whisper model's suppressed tokens included), on the
    saved backend or another; a save whose parts belong to different saves, a damaged file or a missing part is
    refused, naming it; a plain model saved over the folder is what loads then."""
    from slimfx.ir.serialize import FormatError
    for family in ("t5", "whisper"):
        model, lm = lms[family]
        lm = copy.copy(lm)
        lm.suppress_tokens = (5, 9)
        inputs, mask = _inputs(model, seed=6)
        ref = lm.generate(inputs, mask, max_new_tokens=7, min_new_tokens=7)
        back = slimfx.load(slimfx.save(lm, tmp_path / family))
        assert isinstance(back, slimfx.CompiledSeq2SeqLM) and back.suppress_tokens == (5, 9)
        assert back.input_name == model.main_input_name and back.layout == lm.layout
        assert torch.equal(back.generate(inputs, mask, max_new_tokens=7, min_new_tokens=7), ref)
        assert torch.equal(slimfx.load(tmp_path / family, backend="torch").generate(
            inputs, mask, max_new_tokens=7, min_new_tokens=7), ref)
    folder = tmp_path / "t5"
    lms["bart"][1].encoder.save(folder / "encoder")          # another model's encoder, saved on its own
    with pytest.raises(FormatError, match=r"seq2seq_lm.json \(save \w+\) and .*encoder \(save \w+\) were written "
                                          r"by different saves"):
        slimfx.load(folder)
    lms["t5"][1].save(folder)
    text = (folder / "seq2seq_lm.json").read_text()
    for bad, match in [(text.replace('"dtype": "float32"', '"dtype": "float99"'), "unknown dtype 'float99'"),
                       (text.replace('"decoder_start_token_id": 0', '"decoder_start_token_id": "a"'),
                        "decoder_start_token_id must be an integer >= 0, got 'a'"),
                       (text.replace('"suppress_tokens": []', '"suppress_tokens": "ab"'),
                        "suppress_tokens must be token ids, got 'ab'"),
                       (text.replace('"input_name": "input_ids"', '"input_name": "input_features"'),
                        "input_name 'input_features' does not name the encoder graph's input, torch.int64"),
                       ("{", "is not valid JSON")]:
        (folder / "seq2seq_lm.json").write_text(bad)
        with pytest.raises(FormatError, match=match):
            slimfx.load(folder)
    data = json.loads(text)
    data["layout"] = data["layout"][:1]                           # one layer of the decoder's two
    (folder / "seq2seq_lm.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="layout has 1 layers, the decoder graph's cache another number"):
        slimfx.load(folder)
    (folder / "seq2seq_lm.json").write_text(text)
    import shutil
    shutil.rmtree(folder / "decoder")
    with pytest.raises(FormatError, match="names a save of the decoder that the folder .*decoder does not hold"):
        slimfx.load(folder)
    plain = lms["t5"][1].step
    slimfx.save(plain, folder)
    assert isinstance(slimfx.load(folder), slimfx.CompiledModel)


def test_decode_steps_feed_the_new_token_alone_where_checked(lms, tmp_path, monkeypatch):
    """compile_seq2seq_lm checks its decoder step on 1 token as compile_causal_lm does (check_decode_tokens), and
    decode then feeds the new token alone, with transformers' tokens; saved and loaded on the backend it was
    checked on it keeps 1, on another it feeds 2 (checking needs the encoder's output for a real input). T5's
    relative position bias takes its queries' positions from the step's position_ids (a narrow of the mask's
    positions to the query length traced a size export asserted >= 2 as the step ran): 1 token too."""
    import copy
    from slimfx.lm import CompiledCausalLM
    for family in FAMILIES:                          # (lms compiles each when first asked)
        lm = lms[family][1]
        assert lm.decode_tokens == 1 and lm.decode_note.startswith("checked"), (family, lm.decode_note)
    refused = copy.copy(lms["t5"][1])
    refused.decode_tokens, refused.decode_note = 2, "2 tokens: the step fails on 1 token (a reason)"
    assert refused.with_backend("torch").decode_note == refused.decode_note     # (the reason kept)
    model, lm = lms["whisper"]
    fed = []
    run = CompiledCausalLM._run
    monkeypatch.setattr(CompiledCausalLM, "_run", lambda self, ids, *a, **k: fed.append(ids.shape[1]) or
                        run(self, ids, *a, **k))
    inputs, mask = _inputs(model, seed=4)
    ref = _reference(model, inputs, mask, 5, min_new_tokens=5)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=5, min_new_tokens=5), ref)
    assert fed == [2, 1, 1, 1, 1]                     # the start token (padded to 2), then a token a step
    path = slimfx.save(lm, tmp_path / "whisper")
    assert json.loads((path / "seq2seq_lm.json").read_text())["decode_tokens"] == 1
    fed.clear()
    back = slimfx.load(path)
    assert back.decode_tokens == 1 and torch.equal(back.generate(inputs, mask, max_new_tokens=5, min_new_tokens=5),
                                                   ref)
    assert fed == [2, 1, 1, 1, 1]
    for other in (slimfx.load(path, backend="torch"), lm.with_backend("torch")):
        assert other.decode_tokens == 2 and "checked on the numpy backend, not on torch" in other.decode_note
        assert torch.equal(other.generate(inputs, mask, max_new_tokens=5, min_new_tokens=5), ref)
    assert lm.with_backend("numpy").decode_tokens == 1
    data = json.loads((path / "seq2seq_lm.json").read_text())
    from slimfx.ir.serialize import FormatError
    (path / "seq2seq_lm.json").write_text(json.dumps(dict(data, decode_tokens=0)))
    with pytest.raises(FormatError, match="decode_tokens must be 1 or 2, got 0"):
        slimfx.load(path)
    data.pop("decode_tokens")                          # saved before: 2
    (path / "seq2seq_lm.json").write_text(json.dumps(data))
    assert slimfx.load(path).decode_tokens == 2


def test_a_generator_of_passes_reaches_both_graphs_and_typos_fail_first():
    model = _tiny("bart")
    lm = slimfx.compile_seq2seq_lm(model, passes=(p for p in [P.Quantize(weights="int8")]), backend="numpy",
                                   progress=False)
    assert [r.name for r in lm.encoder.report().records] == [r.name for r in lm.step.report().records] == ["quantize"]
    with pytest.raises(TypeError, match="compile_seq2seq_lm: .*'verfy'"):
        slimfx.compile_seq2seq_lm(model, verfy=False)



def test_more_generation_config_entries_as_transformers_applies_them():
    """Single-token bad_words_ids (Marian's configs ban the pad token so), min_length (bart-large-cnn: 56),
    begin_suppress_tokens after a forced first token (transformers suppresses the token after it), the forced
    end beating the forced beginning when only one token is made, and suppressed ids past the vocabulary (ignored,
    as transformers ignores them; they raised IndexError mid-generation): transformers' tokens each time. Entries
    not applied (the config's do_sample) are named in a warning at compile."""
    bart = _tiny("bart", layers=1)
    inputs, mask = _inputs(bart, seed=1)
    plain = slimfx.compile_seq2seq_lm(bart, backend="numpy", progress=False).generate(inputs, mask, max_new_tokens=6)
    common = int(plain[0, 2])
    cases = [dict(bad_words_ids=[[common], [int(plain[1, 1])]]), dict(min_length=6, eos_token_id=int(plain[0, 1])),
             dict(bad_words_ids=[[common], [int(plain[0, 1])]], eos_token_id=int(plain[0, 1])),   # [eos]: dropped
             dict(forced_bos_token_id=7, begin_suppress_tokens=[common]),
             dict(forced_bos_token_id=7, forced_eos_token_id=1), dict(suppress_tokens=[common, VOCAB + 100])]
    for config in cases:
        model = _forcing(_tiny("bart", layers=1), **config)
        lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
        new = 1 if "forced_eos_token_id" in config else 6
        ref = _reference(model, inputs, mask, new)
        got = lm.generate(inputs, mask, max_new_tokens=new)
        assert torch.equal(got, ref), (config, got.tolist(), ref.tolist())
        assert not torch.equal(got[:, :new + 1], plain[:, :new + 1]), config      # the entry changed something
    model = _forcing(_tiny("bart", layers=1), min_length=6, eos_token_id=int(plain[0, 1]))
    lm = slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)
    assert torch.equal(lm.generate(inputs, mask, max_new_tokens=6, min_new_tokens=None), _reference(
        model, inputs, mask, 6, min_new_tokens=None))                   # None: unset, min_length holds
    lm.forced_bos_token_id, lm.suppress_tokens = (7,), (7,)
    with pytest.raises(ValueError, match=r"forced_bos_token_id \[7\] is among the suppressed tokens \[7\]"):
        lm.generate(inputs, mask, max_new_tokens=2)
    model = _forcing(_tiny("bart", layers=1), num_beams=4, no_repeat_ngram_size=3, encoder_no_repeat_ngram_size=2,
                     do_sample=True)
    with pytest.warns(UserWarning, match=r"sets do_sample=True \(generate is greedy unless given temperature=, "
                                         r"top_k=, top_p=\), which compile_seq2seq_lm's generate does not"):
        slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)   # (beams and n-gram bans: it applies)


def test_inputs_by_name_and_an_example_beside_calibration(lms):
    """The encoder's input by the model's name for it (``lm.generate(**tokenizer(...))``), and example_inputs of
    another length than the calibration batches (the example took batch 0's mask, of the wrong shape)."""
    model, lm = lms["t5"]
    inputs, mask = _inputs(model, seed=8)
    ref = lm.generate(inputs, mask, max_new_tokens=4)
    assert torch.equal(lm.generate(input_ids=inputs, attention_mask=mask, max_new_tokens=4), ref)
    assert [t.tolist() for t in lm.stream(input_ids=inputs, attention_mask=mask, max_new_tokens=4)] == \
        ref[:, 1:].T.tolist()
    with pytest.raises(TypeError, match="the encoder's input given twice"):
        lm.generate(inputs, input_ids=inputs)
    with pytest.raises(TypeError, match=r"generate needs the encoder's input \(input_ids\)"):
        lm.generate(attention_mask=mask)
    with pytest.raises(TypeError, match="T5ForConditionalGeneration: language, return_timestamps: Whisper's "
                                        "generate options, and this model has no Whisper settings"):
        lm.generate(inputs, mask, language="fr", return_timestamps=True)
    whisper, wlm = lms["whisper"]
    features, _ = _inputs(whisper)
    assert torch.equal(wlm.generate(input_features=features, max_new_tokens=3),
                       wlm.generate(features, max_new_tokens=3))
    batches = [{"input_ids": ids, "attention_mask": m} for ids, m in [text_batch(2, 10, VOCAB, pad_left=True)]]
    other = slimfx.compile_seq2seq_lm(model, calibration=batches, example_inputs=(inputs,), backend="numpy",
                                      progress=False)
    assert torch.equal(other.generate(inputs, mask, max_new_tokens=4), ref)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1 (make test sets it)")
def test_the_triton_backend_generates_the_numpy_backends_tokens():
    """Both graphs lowered to the triton backend (its int8 kernels under the interpreter on a CPU) generate the
    numpy backend's tokens, float and W8A8 (the same int8 arithmetic: integer accumulation, one rounding), greedy
    and with beams (the beams' cache rows gathered on the triton backend's device)."""
    model = _tiny("t5", layers=1)
    inputs, mask = _inputs(model)
    for passes in ([], [P.Quantize(weights="int8", activations="dynamic-per-token")]):
        lm = slimfx.compile_seq2seq_lm(model, passes=passes, backend="numpy", progress=False)
        triton = lm.with_backend("triton")
        for beams in (1, 2):
            ref = lm.generate(inputs, mask, max_new_tokens=5, min_new_tokens=5, num_beams=beams)
            assert torch.equal(triton.generate(inputs, mask, max_new_tokens=5, min_new_tokens=5, num_beams=beams), ref)
