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


def _with(lm, **settings):
    """``lm`` with other Whisper settings."""
    return slimfx.CompiledSeq2SeqLM(lm.encoder, lm.step, lm.layout, lm.dtype, lm.decoder_start_token_id,
                                    **{**lm._options(), "whisper": {**lm.whisper, **settings}})


@pytest.mark.parametrize("config, options", [(dict(language="fr"), {}), (dict(task="translate"), {}),
                                             (dict(language="fr"), dict(language="de")),
                                             ({}, dict(temperature=0.7, num_beams=2)),
                                             ({}, dict(num_beams=3, num_return_sequences=2)),
                                             ({}, dict(num_return_sequences=2, temperature=0.8)),
                                             ({}, dict(num_return_sequences=2, num_beams=2,
                                                       return_timestamps=True))])
def test_as_whisper_generate_does(whisper, config, options):
    """The generation config's language and task (the call's first); num_return_sequences repeats each input, so
    beams give their best sequence that many times; sampling runs without beams: as transformers' Whisper generate."""
    model, lm = whisper
    features = _features()
    for key, value in config.items():
        setattr(model.generation_config, key, value)
    try:
        torch.manual_seed(0)                  # (transformers samples several sequences only when told do_sample)
        ref = _reference(model, features, **options, **({"do_sample": True} if "temperature" in options else {}))
    finally:
        for key in config:
            setattr(model.generation_config, key, None)
    torch.manual_seed(0)
    got = _with(lm, **config).generate(features, max_new_tokens=12, **options)
    assert torch.equal(got, ref)
    if options.get("num_return_sequences") and "temperature" not in options:
        assert torch.equal(got[0::2], got[1::2])


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
            (dict(return_timestamps=1), ValueError, "return_timestamps must be True or False"),
            (dict(prompt_ids=[[PREV, 3]]), ValueError, "prompt_ids must be a 1-d sequence of token ids"),
            (dict(prompt_ids=[PREV, -1]), ValueError, "prompt_ids must be a 1-d sequence of token ids"),
            (dict(language="en", decoder_input_ids=torch.full((2, 1), START)), ValueError,
             "decoder_input_ids is the whole decoder prompt, which language, task and prompt_ids would build"),
            (dict(decoder_attention_mask=torch.ones(2, 1)), ValueError,
             "decoder_attention_mask is decoder_input_ids'")]:
        with pytest.raises(error, match=match):
            lm.generate(features, max_new_tokens=4, **options)
    for multilingual in (False, None):       # (transformers refuses them where the config has None too)
        with pytest.raises(ValueError, match="is an English-only model .* it takes no language or task"):
            _with(lm, is_multilingual=multilingual).generate(features, task="transcribe")
    with pytest.raises(ValueError, match="generation config has no task_to_id: it takes no task"):
        _with(lm, task_to_id=None).generate(features, task="translate")
    with pytest.raises(ValueError, match=r"a decoder prompt of 4 tokens and 38 new ones pass its 40 positions"):
        lm.generate(features, language="en", max_new_tokens=38)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs beams or sampling"):
        lm.generate(features, num_return_sequences=2)


def test_refusals_come_before_the_encoder(whisper, monkeypatch):
    """Where the language is detected (the encoder runs for it), a bad option is still refused before the encoder
    runs, and detection shares the generation's encoding; prompt_ids may be a numpy array."""
    import numpy as np
    model, lm = whisper
    features = _features(2)
    calls = []
    encode = lm._encode_args
    monkeypatch.setattr(lm, "_encode_args", lambda args: calls.append(1) or encode(args))
    for options, match in [(dict(top_k=-1), "top_k must be"), (dict(temperature=-1), "temperature must be"),
                           (dict(min_new_tokens=-1), "min_new_tokens must be"),
                           (dict(max_new_tokens=39), "pass its 40 positions")]:
        with pytest.raises(ValueError, match=match):
            lm.generate(features, **{"max_new_tokens": 4, **options})
    with pytest.raises(ValueError, match="return_timestamps: the generation config has no no_timestamps_token_id"):
        _with(lm, no_timestamps_token_id=None).generate(features, max_new_tokens=4, return_timestamps=True)
    with pytest.raises(ValueError, match="top_k must be"):
        lm.transcribe(features, top_k=-1)
    assert calls == []
    ref = lm.generate(features, max_new_tokens=4, prompt_ids=[PREV, 3])
    assert torch.equal(lm.generate(features, max_new_tokens=4, prompt_ids=np.array([PREV, 3])), ref)
    lm.transcribe(features, max_new_tokens=4)
    assert len(calls) == 3      # (one encoding per call: detection and generation share it, transcribe's too)


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
                            ("return_timestamps", 1, "return_timestamps must be true, false or null"),
                            ("num_segment_frames", 0, "num_segment_frames must be an integer > 0")]:
        path.write_text(json.dumps({**data, "whisper": {**data["whisper"], key: bad}}))
        with pytest.raises(FormatError, match=match):
            slimfx.load(tmp_path / "w")


def _long():
    """3 inputs of 70 frames (a window is 24), the second 50 frames long, the third 18 (less than one window: its
    language, detected on the first 24 frames as transformers does, is English, on its padded window German)."""
    features = torch.randn(3, 8, 70, generator=torch.Generator().manual_seed(5)) * 3
    mask = torch.ones(3, 70, dtype=torch.long)
    mask[1, 50:] = 0
    mask[2, 18:] = 0
    return features, mask


def _same_segments(ref, got):
    assert [len(r) for r in ref] == [len(g) for g in got]
    for r, g in zip(sum(ref, []), sum(got, [])):
        assert torch.equal(r["tokens"], g["tokens"])
        assert float(r["start"]) == g["start"] and float(r["end"]) == g["end"]


@pytest.mark.parametrize("long, options", [(False, {}), (False, dict(return_timestamps=True)),
                                           (True, {}), (True, dict(language="fr")), (True, dict(num_beams=2)),
                                           (True, dict(prompt_ids=[PREV, 3, 4])), (True, dict(max_new_tokens=6)),
                                           (True, dict(temperature=0.9, top_k=50))])
def test_transcribe(whisper, long, options):
    """transcribe returns what transformers' Whisper generate returns by default (the text tokens, right-padded,
    and each segment's times and tokens), for one window and, window by window, for audio longer than one:
    inputs of different lengths, a language, beams, a text prompt, a bound on each window's tokens, sampling."""
    model, lm = whisper
    features, mask = _long() if long else (_features(), None)
    torch.manual_seed(0)
    got = lm.transcribe(features, mask, return_segments=True, **options)
    kw = {k: torch.tensor(v) if k == "prompt_ids" else v for k, v in options.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model.generate(features, attention_mask=mask, return_segments=True, **kw)
    assert torch.equal(got["sequences"], ref["sequences"].long())
    _same_segments(ref["segments"], got["segments"])
    assert torch.equal(lm.transcribe(features, mask, **options), got["sequences"]) or "temperature" in options
    if long:                                   # (the first two inputs reach past the first window)
        assert max(seg["start"] for seg in got["segments"][0] + got["segments"][1]) >= 24 * 0.01


def test_transcribe_refusals(whisper):
    """Audio longer than a window needs timestamps and, batched, its mask; one sequence per input; generate takes
    one window; a model compiled from another than Whisper has no transcribe."""
    model, lm = whisper
    features, mask = _long()
    for call, match in [(lambda: lm.transcribe(features, mask, return_timestamps=False),
                         "70 frames are more than one window .24.: .* needs the timestamps"),
                        (lambda: lm.transcribe(features), "a batch of audio longer than one window needs its "
                                                          "attention_mask"),
                        (lambda: lm.transcribe(features, mask, num_return_sequences=2), "one sequence per input"),
                        (lambda: lm.transcribe(features, mask[:, :5]), r"attention_mask must be \(batch, frames\)"),
                        (lambda: lm.generate(features, max_new_tokens=3), "input_features of 70 frames are longer "
                                                                          r"than one window .* transcribe\(\)")]:
        with pytest.raises(ValueError, match=match):
            call()
    other = slimfx.CompiledSeq2SeqLM(lm.encoder, lm.step, lm.layout, lm.dtype, lm.decoder_start_token_id,
                                     **{**lm._options(), "whisper": None})
    with pytest.raises(TypeError, match="transcribe is Whisper's"):
        other.transcribe(features, mask)


def test_transcribe_bounds_each_window_by_the_configs_max_length(whisper):
    """Without max_new_tokens, a window's tokens are bounded as transformers bounds them: the config's max_length
    plus the prompt's first tokens (up to half the position table), added again at every window, within
    max_target_positions."""
    model, lm = whisper
    features, mask = _long()
    lm = slimfx.CompiledSeq2SeqLM(lm.encoder, lm.step, lm.layout, lm.dtype, lm.decoder_start_token_id,
                                  **{**lm._options(), "whisper": {**lm.whisper, "max_length": 6}})
    model.generation_config.max_length = 6
    try:
        with torch.no_grad():
            ref = model.generate(features, attention_mask=mask, prompt_ids=torch.tensor([PREV, 3, 4]))
    finally:
        model.generation_config.max_length = 40
    got = lm.transcribe(features, mask, prompt_ids=[PREV, 3, 4])
    assert torch.equal(got, ref.long())


@pytest.mark.parametrize("tokens", [[FIRST_TS, 5, 6, 7], [5, 6, 7], [FIRST_TS, 5, FIRST_TS + 9, FIRST_TS + 9, 8, 9],
                                    [FIRST_TS, 5, FIRST_TS + 9, FIRST_TS + 9, 8, FIRST_TS + 20],
                                    [FIRST_TS + 2, 5, FIRST_TS + 9, FIRST_TS + 9, 8, FIRST_TS + 12, FIRST_TS + 12]])
def test_segments_as_transformers_cuts_them(tokens):
    """A window's segments (start, end, tokens) and how far the next window starts, as transformers'
    _retrieve_segment computes them, its float32 end of a window without a pair of timestamps included (which
    float64 puts a step later for 146 frame counts up to 3000, 30 and 240 among them)."""
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin
    from slimfx.whisper import _segments
    seq = torch.tensor(tokens)
    for frames, seek in [(30, 0), (240, 3000), (54, 6000), (3000, 0), (23, 48)]:
        ref, ref_advance = WhisperGenerationMixin._retrieve_segment(
            seq, [None], torch.tensor([seek], dtype=torch.float64) * 0.02 / 2, FIRST_TS, torch.tensor([frames]), 0.02,
            0.01, 2, 0, 0, False, torch.zeros(1, 3))
        got, advance = _segments(seq, FIRST_TS, seek * 0.02 / 2, frames, 2)
        assert int(advance) == int(ref_advance)
        assert [(float(r["start"]), float(r["end"]), r["tokens"].tolist()) for r in ref] == \
            [(g["start"], g["end"], g["tokens"].tolist()) for g in got]


def test_transcribe_takes_the_calls_end_and_pad_ids_and_a_config_without_max_length(whisper, monkeypatch):
    """A call's eos_token_id and pad_token_id apply to the windows' ends and the padding too; a config without
    max_length gives each window transformers' default 20 new tokens; bad options are refused before the encoder
    runs, also where the language is detected apart (an input shorter than a window); a prompt that leaves no room
    is refused naming the limit."""
    model, lm = whisper
    features = _features()
    with torch.no_grad():
        ref = model.generate(features, max_new_tokens=20, return_timestamps=True, eos_token_id=86, pad_token_id=0)
    got = lm.transcribe(features, max_new_tokens=20, return_timestamps=True, eos_token_id=86, pad_token_id=0)
    assert torch.equal(got, ref) and 86 not in got.tolist()[0]
    long, mask = _long()
    model.generation_config.max_length = None
    try:
        with torch.no_grad():
            ref = model.generate(long, attention_mask=mask)
            ref_short = model.generate(features)
    finally:
        model.generation_config.max_length = 40
    assert torch.equal(_with(lm, max_length=None).transcribe(long, mask), ref.long())
    assert torch.equal(_with(lm, max_length=None).transcribe(features), ref_short)
    calls = []
    encode = lm._encode_args
    monkeypatch.setattr(lm, "_encode_args", lambda args: calls.append(1) or encode(args))
    for options, match in [(dict(top_k=-1), "top_k must be"), (dict(max_new_tokens=39), "pass its 40 positions"),
                           (dict(prompt_ids=[PREV] * 40), "a decoder prompt of 42 tokens leaves no room for new "
                                                         "ones within 40")]:
        with pytest.raises(ValueError, match=match):
            lm.transcribe(long, mask, **options)
    assert calls == []


def test_transcribe_an_input_without_audio(whisper):
    """An input whose mask holds no frame has no window: transformers returns nothing for it, and detects the
    others' languages all the same."""
    model, lm = whisper
    features, mask = _long()
    mask[1] = 0
    with torch.no_grad():
        ref = model.generate(features, attention_mask=mask, return_segments=True)
    got = lm.transcribe(features, mask, return_segments=True)
    assert torch.equal(got["sequences"], ref["sequences"].long()) and got["segments"][1] == []
    _same_segments(ref["segments"], got["segments"])
