"""Whisper's task prompt, language detection and timestamp rules (slimfx.whisper) against transformers' Whisper
``generate``, whose ``force_unique_generate_call=True`` returns the whole decoder sequences, as slimfx does."""
import json

import pytest
import torch

import slimfx

VOCAB = 97
EOS, START, LANGS, TASKS, NO_TS = 49, 50, {"<|en|>": 51, "<|fr|>": 52, "<|de|>": 53}, \
    {"transcribe": 54, "translate": 55}, 56
PREV = 57                           # <|startofprev|>; the timestamps are 57 on (after <|notimestamps|>), as in Whisper
FIRST_TS = NO_TS + 1


def _whisper():
    """A 2-layer multilingual Whisper laid out as the real one: text below the end-of-sequence token, then the
    special tokens, <|notimestamps|> and the timestamps. Its weights (seed 3) detect English for inputs 0, 2 and 3
    and German for input 1 of ``_features()``, each by a margin of 2 or more in the logits."""
    import transformers as T
    torch.manual_seed(3)
    model = T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=12,
        max_target_positions=40, decoder_start_token_id=START, pad_token_id=EOS, eos_token_id=EOS, bos_token_id=EOS,
        begin_suppress_tokens=[48, EOS], suppress_tokens=[1, 2]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0)
    gen = model.generation_config
    gen.is_multilingual, gen.lang_to_id, gen.task_to_id = True, dict(LANGS), dict(TASKS)
    gen.no_timestamps_token_id, gen.max_initial_timestamp_index, gen.max_length = NO_TS, 5, 40
    return model.eval()


def _features(batch=4):
    return torch.randn(batch, 8, 24, generator=torch.Generator().manual_seed(3)) * 3


def _reference(model, features, **kw):
    kw = {k: torch.tensor(v) if k == "prompt_ids" else v for k, v in kw.items()}
    with torch.no_grad():
        return model.generate(features, max_new_tokens=12, force_unique_generate_call=True, **kw)


@pytest.fixture(scope="module")
def whisper():
    model = _whisper()
    return model, slimfx.compile_seq2seq_lm(model, backend="numpy", progress=False)


@pytest.mark.parametrize("options", [{}, dict(language="fr"), dict(language=["en", "german", "<|fr|>", "EN"]),
                                     dict(task="translate"), dict(language="de", task="translate"),
                                     dict(prompt_ids=[PREV, 3, 4, 5])])
def test_the_task_prompt(whisper, options):
    """The start token, the language (given by code, name or token, one for all or one per input; else detected
    per input), the task (transcribe by default where a language is given) and <|notimestamps|>, behind the
    prompt_ids: transformers' sequences, prompt included."""
    model, lm = whisper
    features = _features()
    got = lm.generate(features, max_new_tokens=12, **options)
    assert torch.equal(got, _reference(model, features, **options))
    if not options:                             # detected row by row: English, German, English, English
        assert got[:, :3].tolist() == [[START, 51, NO_TS], [START, 53, NO_TS], [START, 51, NO_TS],
                                        [START, 51, NO_TS]]
    assert (got[:, -12:] < EOS).sum() > 8       # (text, not only special tokens)


@pytest.mark.parametrize("options", [dict(), dict(language="de", task="translate"), dict(num_beams=3),
                                     dict(prompt_ids=[PREV, 8, 9]), dict(temperature=0.8)])
def test_timestamps(whisper, options):
    """return_timestamps=True: transformers' timestamp rules (pairs, never decreasing, a first timestamp within
    max_initial_timestamp_index, a timestamp where they are likelier together than the likeliest text token),
    greedy, with beams and sampled from the same random state; without them the same prompt gives other tokens."""
    model, lm = whisper
    features = _features()
    torch.manual_seed(0)
    got = lm.generate(features, max_new_tokens=12, return_timestamps=True, **options)
    torch.manual_seed(0)
    assert torch.equal(got, _reference(model, features, return_timestamps=True, **options))
    prompt = got.shape[1] - 12
    new = got[:, prompt:]
    assert NO_TS not in got[:, prompt - 1].tolist()                  # the prompt leaves <|notimestamps|> out
    assert ((new[:, 0] >= FIRST_TS) & (new[:, 0] <= FIRST_TS + 5)).all()
    assert (new >= FIRST_TS).sum() > new.shape[0]                    # (more than the first of each row)
    if "temperature" not in options:
        torch.manual_seed(0)
        beams = {k: v for k, v in options.items() if k == "num_beams"}
        plain = lm.generate(features, decoder_input_ids=got[:, :prompt], max_new_tokens=12, **beams)
        assert not torch.equal(plain, got)


def test_forced_decoder_ids_and_the_torch_backend(whisper):
    """A config's forced_decoder_ids ([[1, None], [2, task]]: the real checkpoints') give the task when none is
    asked for, the language still detected; the torch backend gives the numpy backend's tokens; stream yields
    generate's new tokens."""
    model, lm = whisper
    features = _features()
    forced = [[1, None], [2, TASKS["translate"]]]
    model.generation_config.forced_decoder_ids = forced
    try:
        ref = _reference(model, features)
        ref_ts = _reference(model, features, return_timestamps=True)
    finally:
        del model.generation_config.forced_decoder_ids
    lm = slimfx.CompiledSeq2SeqLM(lm.encoder, lm.step, lm.layout, lm.dtype, lm.decoder_start_token_id,
                                  **{**lm._options(), "whisper": {**lm.whisper, "forced_decoder_ids": forced}})
    got = lm.generate(features, max_new_tokens=12)
    assert torch.equal(got, ref) and got[:, 2].tolist() == [TASKS["translate"]] * 4
    assert torch.equal(lm.with_backend("torch").generate(features, max_new_tokens=12, return_timestamps=True), ref_ts)
    streamed = torch.stack(list(lm.stream(features, max_new_tokens=12, return_timestamps=True)), 1)
    assert torch.equal(streamed, ref_ts[:, -12:])


def test_refusals(whisper):
    """Each bad option is refused, naming it; an English-only model takes no language or task."""
    model, lm = whisper
    features = _features(2)
    for options, error, match in [
            (dict(language="klingon"), ValueError, "language 'klingon' is not one of this model's: de, en, fr"),
            (dict(language=["en"]), ValueError, "one language for each of the 2 inputs"),
            (dict(language=3), ValueError, "language must be a string"),
            (dict(task="summarize"), ValueError, r"task must be one of \['transcribe', 'translate'\]"),
            (dict(return_timestamps="yes"), ValueError, "return_timestamps must be True or False"),
            (dict(prompt_ids=[[PREV, 3]]), ValueError, "prompt_ids must be a 1-d sequence of token ids"),
            (dict(prompt_ids=[PREV, -1]), ValueError, "prompt_ids must be a 1-d sequence of token ids"),
            (dict(language="en", decoder_input_ids=torch.full((2, 1), START)), ValueError,
             "decoder_input_ids is the whole decoder prompt, which language, task and prompt_ids would build"),
            (dict(decoder_attention_mask=torch.ones(2, 1)), ValueError,
             "decoder_attention_mask is decoder_input_ids'")]:
        with pytest.raises(error, match=match):
            lm.generate(features, max_new_tokens=4, **options)
    english = slimfx.CompiledSeq2SeqLM(lm.encoder, lm.step, lm.layout, lm.dtype, lm.decoder_start_token_id,
                                       **{**lm._options(), "whisper": {**lm.whisper, "is_multilingual": False}})
    with pytest.raises(ValueError, match="is an English-only model .* it takes no language or task"):
        english.generate(features, task="transcribe")


def test_save_and_load(whisper, tmp_path):
    """The settings are saved as JSON and come back: the loaded model detects, transcribes and stamps as the
    compiled one; a damaged entry is refused, naming it."""
    from slimfx.ir.serialize import FormatError
    model, lm = whisper
    features = _features()
    ref = lm.generate(features, max_new_tokens=8, return_timestamps=True)
    back = slimfx.load(slimfx.save(lm, tmp_path / "w"))
    assert back.whisper == lm.whisper
    assert torch.equal(back.generate(features, max_new_tokens=8, return_timestamps=True), ref)
    path = tmp_path / "w" / "seq2seq_lm.json"
    data = json.loads(path.read_text())
    assert data["whisper"]["language_codes"] == {"english": "en", "french": "fr", "german": "de"}
    for key, bad, match in [("lang_to_id", {"<|en|>": "a"}, "lang_to_id must map token strings to token ids"),
                            ("forced_decoder_ids", [[1]], "forced_decoder_ids must be"),
                            ("return_timestamps", 1, "return_timestamps must be true or false")]:
        path.write_text(json.dumps({**data, "whisper": {**data["whisper"], key: bad}}))
        with pytest.raises(FormatError, match=match):
            slimfx.load(tmp_path / "w")
