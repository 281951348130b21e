"""Whisper's task prompt, language detection, timestamp rules and window-by-window transcription, as transformers'
``WhisperForConditionalGeneration.generate`` runs them (``CompiledSeq2SeqLM.generate``'s ``language``, ``task``,
``return_timestamps`` and ``prompt_ids``; ``CompiledSeq2SeqLM.transcribe``).

transformers starts each decoder sequence with the *task prompt*: ``<|startoftranscript|>``, a language token
(given, the generation config's, or *detected*: the likeliest language token after the start token alone, input by
input), a task token (``<|transcribe|>`` or ``<|translate|>``: given, the config's, from its ``forced_decoder_ids``,
or transcribe where a language was given) and ``<|notimestamps|>`` unless timestamps are asked for; ``prompt_ids``
(``<|startofprev|>`` and earlier text) go in front. With ``return_timestamps=True`` its
``WhisperTimeStampLogitsProcessor`` runs after the other processors: timestamps come in pairs and never decrease,
the first new token is a timestamp no later than ``max_initial_timestamp_index``, and a row whose timestamps
together are likelier than its likeliest text token takes a timestamp (``timestamp_rules``).

``init_tokens`` builds the prompt from these settings (``settings`` reads them from the model's generation
config; they are saved with the compiled model as plain JSON) as transformers 5.17-5.25's ``_retrieve_init_tokens``
does, and ``generate`` returns the whole sequences, as transformers' does with ``force_unique_generate_call=True``.
What its ``generate`` returns by default is ``transcribe``'s: the tokens of each input's segments (the prompt and
the end-of-sequence token left out), found window by window: a window's tokens are split after each pair of
timestamps, and where its last segment is unfinished the next window starts at the last pair's timestamp
(``_segments``), so audio longer than one window (30 s) is transcribed whole. Temperature fallback, no-speech
detection, conditioning on the previous window's text and ``num_return_sequences`` are not done, and a window that
would start where the previous one did (after ``<|0.00|><|0.00|>``) moves on by a window, where transformers
decodes the same window again without end.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

TASKS = ("translate", "transcribe")      # transformers' TASK_IDS


def settings(model) -> Optional[dict]:
    """The Whisper entries of ``model``'s generation config (None for a model without ``detect_language``, which is
    no Whisper), as JSON: ``lang_to_id``, ``task_to_id``, ``is_multilingual`` (only where the config has it:
    transformers tells None from missing), ``no_timestamps_token_id``, ``max_initial_timestamp_index``,
    ``forced_decoder_ids`` (the config's, else the model config's), ``detect_timestamp_from_logprob``, the defaults
    ``language``, ``task``, ``return_timestamps`` and ``max_length``, ``language_codes``: each language name
    transformers knows ("french") with its code ("fr"), for the codes ``lang_to_id`` holds; and from the model,
    ``input_stride`` (feature frames per encoder position), ``num_segment_frames`` (the frames of one window) and
    ``max_target_positions``."""
    if not hasattr(model, "detect_language"):
        return None
    gen = getattr(model, "generation_config", None)
    lang_to_id = {str(k): int(v) for k, v in (getattr(gen, "lang_to_id", None) or {}).items()}
    codes = {}
    if lang_to_id:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE
        codes = {name: code for name, code in TO_LANGUAGE_CODE.items() if f"<|{code}|>" in lang_to_id}
    forced = getattr(gen, "forced_decoder_ids", None)
    if forced is None:
        forced = getattr(model.config, "forced_decoder_ids", None)
    encoder = model.get_encoder()
    stride = int(encoder.conv1.stride[0] * encoder.conv2.stride[0])
    out = {"lang_to_id": lang_to_id if hasattr(gen, "lang_to_id") else None,
           **({"is_multilingual": gen.is_multilingual} if hasattr(gen, "is_multilingual") else {}),
           "task_to_id": {str(k): int(v) for k, v in gen.task_to_id.items()} if hasattr(gen, "task_to_id") else None,
           "no_timestamps_token_id": getattr(gen, "no_timestamps_token_id", None),
           "max_initial_timestamp_index": getattr(gen, "max_initial_timestamp_index", None),
           "forced_decoder_ids": [[int(i), None if t is None else int(t)] for i, t in forced] if forced else None,
           "language": _listed(getattr(gen, "language", None)), "task": getattr(gen, "task", None),
           "return_timestamps": getattr(gen, "return_timestamps", None), "language_codes": codes,
           "input_stride": stride, "num_segment_frames": stride * int(model.config.max_source_positions),
           "max_target_positions": int(model.config.max_target_positions),
           "max_length": getattr(gen, "max_length", None),
           "detect_timestamp_from_logprob": bool(getattr(gen, "_detect_timestamp_from_logprob", True))}
    return checked(out, f"{type(model).__name__}'s generation config")


def checked(data, where: str) -> dict:
    """``data`` (``settings``' dict, e.g. read back from a save) when its entries have their types, else a
    ValueError naming ``where`` and the entry."""
    def ids(value, key):
        if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) and _int(v)
                                                                       for k, v in value.items())):
            raise ValueError(f"{where}: {key} must map token strings to token ids, got {value!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{where}: Whisper's settings must be a dict, got {type(data).__name__}")
    ids(data.get("lang_to_id"), "lang_to_id")
    ids(data.get("task_to_id"), "task_to_id")
    for key in ("no_timestamps_token_id", "max_initial_timestamp_index", "max_length"):
        if data.get(key) is not None and not _int(data[key]):
            raise ValueError(f"{where}: {key} must be an integer or null, got {data[key]!r}")
    for key in ("input_stride", "num_segment_frames", "max_target_positions"):
        if not (_int(data.get(key)) and data[key] > 0):
            raise ValueError(f"{where}: {key} must be an integer > 0, got {data.get(key)!r}")
    forced = data.get("forced_decoder_ids")
    if forced is not None and not (isinstance(forced, list) and all(
            isinstance(p, list) and len(p) == 2 and _int(p[0]) and (p[1] is None or _int(p[1])) for p in forced)):
        raise ValueError(f"{where}: forced_decoder_ids must be [index, token id or null] pairs, got {forced!r}")
    codes = data.get("language_codes") or {}
    if not (isinstance(codes, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in codes.items())):
        raise ValueError(f"{where}: language_codes must map language names to codes, got {codes!r}")
    for key in ("return_timestamps", "is_multilingual"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise ValueError(f"{where}: {key} must be true, false or null, got {data[key]!r}")
    if not isinstance(data.get("detect_timestamp_from_logprob", True), bool):
        raise ValueError(f"{where}: detect_timestamp_from_logprob must be true or false, got "
                         f"{data['detect_timestamp_from_logprob']!r}")
    language, task = data.get("language"), data.get("task")
    if not (language is None or isinstance(language, str) or
            isinstance(language, list) and all(isinstance(x, str) for x in language)):
        raise ValueError(f"{where}: language must be a language, a list of them or null, got {language!r}")
    if not (task is None or isinstance(task, str)):
        raise ValueError(f"{where}: task must be a task's name or null, got {task!r}")
    return data


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _listed(value):
    """A tuple as a list (JSON's), anything else as it is."""
    return list(value) if isinstance(value, tuple) else value


def language_id(s: dict, language: str) -> int:
    """The token id of ``language``: a token ("<|fr|>"), a code ("fr") or a name ("french"), any case, as
    transformers reads it; a ValueError naming the languages this model knows when none of those."""
    lang_to_id, codes = s["lang_to_id"], s.get("language_codes") or {}
    if not isinstance(language, str):
        raise ValueError(f"language must be a string (a code such as 'fr', a name such as 'french'), got {language!r}")
    key = language.lower()
    token = key if key in lang_to_id else f"<|{codes[key]}|>" if key in codes else f"<|{key}|>"
    if token not in lang_to_id:
        known = sorted(t[2:-2] if t.startswith("<|") and t.endswith("|>") else t for t in lang_to_id)
        raise ValueError(f"language {language!r} is not one of this model's: {', '.join(known)} (or their names)")
    return int(lang_to_id[token])


def init_tokens(s: dict, start: int, batch: int, language=None, task=None, return_timestamps: bool = False,
                detect: Optional[Callable[[list], list]] = None, model_name: str = "Whisper") -> list:
    """Each row's task prompt (``batch`` lists of token ids), as transformers' ``_retrieve_init_tokens`` builds it
    from the settings ``s`` and the call's ``language`` (None, one, or one per row) and ``task`` (each None: the
    settings'); ``detect(ids)`` gives each row's likeliest token among the language token ids ``ids`` (called only
    when a language must be detected: none given, the model has ``lang_to_id`` and ``forced_decoder_ids`` name
    none)."""
    if "is_multilingual" in s and not s["is_multilingual"] and (task is not None or language is not None):
        raise ValueError(f"{model_name} is an English-only model (its generation config's is_multilingual): it "
                         f"takes no language or task")
    language = s.get("language") if language is None else language      # (the call's, else the config's)
    task = s.get("task") if task is None else task
    if language is not None and s.get("lang_to_id") is None:
        raise ValueError(f"{model_name}'s generation config has no lang_to_id: it takes no language")
    if task is not None and s.get("task_to_id") is None:
        raise ValueError(f"{model_name}'s generation config has no task_to_id: it takes no task")
    if task is not None and (task not in TASKS or task not in s["task_to_id"]):
        raise ValueError(f"task must be one of {sorted(s['task_to_id'])}, got {task!r}")
    tokens = [start]
    if task is None and language is None:
        forced = list(s.get("forced_decoder_ids") or ())
        if forced and forced[0][0] == 1:        # transformers reads the entries at indices 1, 2, ... in order
            while forced and forced[0][0] == len(tokens):
                tokens.append(forced.pop(0)[1])
            if forced:
                raise ValueError(f"{model_name}'s forced_decoder_ids {s['forced_decoder_ids']} do not follow "
                                 f"Whisper's prompt pattern (an entry for every index from 1 on)")
    undefined = len(tokens) <= 1 or tokens[1] is None
    if isinstance(language, (list, tuple)):
        if len(language) != batch or any(lang is None for lang in language):
            raise ValueError(f"language: a list must name one language for each of the {batch} inputs, got "
                             f"{list(language)!r}")
        lang_ids = [language_id(s, lang) for lang in language]
    elif language is not None:
        lang_ids = [language_id(s, language)] * batch
    elif s.get("lang_to_id") and undefined and detect is not None:
        lang_ids = [int(t) for t in detect(sorted(s["lang_to_id"].values()))]
    else:
        lang_ids = None
    rows = []
    for i in range(batch):
        row = list(tokens)
        if lang_ids is not None:
            if len(row) > 1:
                row[1] = lang_ids[i]
            else:
                row.append(lang_ids[i])
        tasks = set((s.get("task_to_id") or {}).values())
        if task is not None:                      # (forced_decoder_ids were not read: no task token yet)
            row.append(s["task_to_id"][task])
        elif language is not None and tasks and not tasks & set(row):
            row.append(s["task_to_id"]["transcribe"])
        no_ts = s.get("no_timestamps_token_id")
        if not return_timestamps and no_ts is not None and row[-1] != no_ts:
            row.append(no_ts)
        elif return_timestamps and row[-1] == no_ts:
            row = row[:-1]
        rows.append([t for t in row if t is not None])
    return rows


def timestamp_rules(s: dict, eos: int, begin: int) -> Callable:
    """transformers' ``WhisperTimeStampLogitsProcessor`` as a function ``(held, scores) -> scores``: ``held`` (rows,
    length) each row's tokens so far, its new ones from index ``begin`` on; ``eos`` the end-of-sequence id (tokens
    below it are text, from ``<|notimestamps|>`` + 1 on timestamps)."""
    no_ts = s.get("no_timestamps_token_id")
    if no_ts is None:
        raise ValueError("return_timestamps: the generation config has no no_timestamps_token_id (timestamps are "
                         "the tokens after it)")
    first_ts, max_initial = no_ts + 1, s.get("max_initial_timestamp_index")
    from_logprob = s.get("detect_timestamp_from_logprob", True)
    inf = float("-inf")

    def rules(held: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # (rows picked by index and column ranges by slices: a (rows, vocab) mask costs ~5x more at Whisper's vocab)
        seq = held[:, begin:].to(scores.device)
        n = seq.shape[1]
        scores = scores.clone()
        scores[:, no_ts] = inf
        if n == 0:                                # the first new token: a timestamp, no later than the initial bound
            scores[:, :first_ts] = inf
            if max_initial is not None:
                scores[:, first_ts + max_initial + 1:] = inf
        else:
            is_ts = seq >= first_ts
            last = is_ts[:, -1]
            before = is_ts[:, -2] if n >= 2 else torch.ones_like(last)
            # timestamps come in pairs: after a pair text (or the end), after a single one another timestamp (or
            # the end)
            scores[(last & before).nonzero()[:, 0], first_ts:] = inf
            scores[(last & ~before).nonzero()[:, 0], :eos] = inf
            # no timestamp below the last one (below the last + 1 after a pair: <|0.00|> not again)
            at = torch.where(is_ts, torch.arange(n, device=seq.device), -1).max(1, keepdim=True).values
            latest = seq.gather(1, at.clamp(min=0))[:, 0]
            floor = torch.where(is_ts.any(1), torch.where(last & ~before, latest, latest + 1), first_ts)
            stamps = scores[:, first_ts:]
            stamps.masked_fill_(torch.arange(stamps.shape[1], device=seq.device) < (floor - first_ts)[:, None], inf)
        if not from_logprob:
            return scores
        logp = torch.log_softmax(scores.float(), -1)
        timestamp = logp[:, first_ts:].logsumexp(-1) > logp[:, :first_ts].max(-1).values
        scores[timestamp.nonzero()[:, 0], :first_ts] = inf
        return scores
    return rules


TIME_PRECISION = 0.02           # seconds per timestamp step (transformers' time_precision)
DEFAULT_NEW = 20                # transformers' new tokens where the generation config has no max_length
FRAME_SECONDS = 0.01            # seconds per feature frame (time_precision_features)


def transcribe(lm, features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, language=None,
               task=None, return_timestamps: Optional[bool] = None, prompt_ids=None,
               max_new_tokens: Optional[int] = None, return_segments: bool = False, progress: bool = False,
               **options):
    """``CompiledSeq2SeqLM.transcribe``: transformers' Whisper ``generate`` with its default output, window by
    window (its sequential long-form algorithm, without temperature fallback, no-speech detection or conditioning
    on the previous window's text)."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from .seq2seq import _ids, _prompt_ids
    s = lm.whisper
    if s is None:
        raise TypeError(f"{lm.model_name}: transcribe is Whisper's, and this model has no Whisper settings (compiled "
                        f"from another model, or saved by a slimfx before them: compile it again)")
    if options.get("num_return_sequences", lm.num_return_sequences) != 1:
        raise ValueError(f"{lm.model_name}: transcribe returns one sequence per input (num_return_sequences=1)")
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.dtype.is_floating_point:
        raise ValueError(f"features must be a float tensor (batch, mel bins, frames), got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    window, stride = s["num_segment_frames"], s["input_stride"]
    b, total = features.shape[0], features.shape[-1]
    short = total <= window
    if return_timestamps is None:
        return_timestamps = s.get("return_timestamps")
    if return_timestamps is not None and not isinstance(return_timestamps, bool):
        raise ValueError(f"return_timestamps must be True or False, got {return_timestamps!r}")
    if not short:
        if return_timestamps is False:
            raise ValueError(f"{lm.model_name}: {total} frames are more than one window ({window}): transcribing "
                             f"them window by window needs the timestamps (return_timestamps=True)")
        return_timestamps = True
        if b > 1 and attention_mask is None:
            raise ValueError(f"{lm.model_name}: a batch of audio longer than one window needs its attention_mask "
                             f"(which frames of each input are audio)")
    return_timestamps = bool(return_timestamps)
    if attention_mask is not None and (attention_mask.shape != (b, total)):
        raise ValueError(f"attention_mask must be (batch, frames) = {(b, total)}, got {tuple(attention_mask.shape)}")
    prev = None if prompt_ids is None else _prompt_ids(prompt_ids)
    limit = s["max_target_positions"]
    if max_new_tokens is not None and (not _int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if b > 1 and not short:
        frames = attention_mask.sum(-1).long().cpu()
    else:
        frames = torch.full((b,), total, dtype=torch.long)
    init, detect = lm._task_prompt(b, features.device, language, task, return_timestamps, None)
    length = init.shape[1] + (0 if prev is None else len(prev))
    if max_new_tokens is not None and max_new_tokens + length > limit:
        raise ValueError(f"{lm.model_name}: a decoder prompt of {length} tokens and {max_new_tokens} new ones pass "
                         f"its {limit} positions (max_target_positions)")
    if detect is not None and not bool((frames >= window).all()):
        # transformers detects the language on each input's first `window` frames, which for an input shorter than a
        # window are not its first window (that is padded): encoded apart, by the first window's generate once it
        # has checked its options; here, where an input has no frames at all (no first window), before it
        first = (features[:, :, :window],)
        if bool((frames > 0).all()):
            detect = (*detect[:2], lambda: lm._encode_args(first))
        else:
            lm._detected(init, *detect[:2], None, lambda: lm._encode_args(first))
            detect = None
    most = s.get("max_length")                    # (without max_new_tokens: each window's total length; None: 20 new)
    eos = lm.eos_token_id if options.get("eos_token_id") is None else list(_ids(options["eos_token_id"],
                                                                                 "eos_token_id"))
    pad = lm.pad(eos) if options.get("pad_token_id") is None else int(options["pad_token_id"])
    first_ts = (s["no_timestamps_token_id"] + 1) if s.get("no_timestamps_token_id") is not None else None
    seek = torch.zeros(b, dtype=torch.long)
    segments = [[] for _ in range(b)]
    bar = tqdm(total=int(frames.sum()), desc="transcribe", unit="frame", disable=not progress, leave=False)
    while bool((seek < frames).any()):
        active = [i for i in range(b) if seek[i] < frames[i]]
        n = (frames - seek).clamp(max=window)
        x = torch.stack([F.pad(features[i, :, int(seek[i]):int(seek[i] + n[i])], (0, window - int(n[i])))
                         for i in active])
        dec = init[active]
        if prev is not None:
            dec = torch.cat([prev.to(dec.device)[None].expand(len(active), -1), dec], 1)
        if max_new_tokens is None and most is not None:
            # transformers adds the prompt's first tokens (up to half the table) to max_length at every window, the
            # sum kept for the next one (so a max_length below max_target_positions grows window by window)
            most = min(most + min(limit // 2 - 1, length), limit)
        here = None
        if detect is not None:                    # (the first window: init's language column, after the prompt)
            here, detect = (detect[0] + dec.shape[1] - init.shape[1], *detect[1:]), None
        new = max_new_tokens if max_new_tokens is not None else DEFAULT_NEW if most is None else most - length
        if new < 1:
            raise ValueError(f"{lm.model_name}: a decoder prompt of {length} tokens leaves no room for new ones "
                             f"within {most} (the generation config's max_length, within max_target_positions "
                             f"{limit}); give max_new_tokens")
        out = lm.generate(x, decoder_input_ids=dec, return_timestamps=return_timestamps, max_new_tokens=new,
                          _detect=here, **options)
        if here is not None:
            init[:, here[0] - (dec.shape[1] - init.shape[1])] = dec[:, here[0]]
        for j, i in enumerate(active):
            seq = _strip(out[j, dec.shape[1]:].cpu(), pad, eos)
            offset = float(seek[i]) * TIME_PRECISION / stride      # (transformers' arithmetic, float64)
            found, advance = _segments(seq, first_ts, offset, int(n[i]), stride)
            segments[i] += found
            # (an advance of 0, a window ending <|0.00|><|0.00|>, would decode the same window forever: transformers
            # does; slimfx moves on by the window)
            advance = advance if advance > 0 else int(n[i])
            bar.update(min(advance, int(frames[i] - seek[i])))
            seek[i] += advance
    bar.close()
    rows = [torch.cat([seg["tokens"] for seg in segs]) if segs else torch.zeros(0, dtype=torch.long)
            for segs in segments]
    width = max(len(r) for r in rows)
    sequences = torch.stack([F.pad(r, (0, width - len(r)), value=pad) for r in rows]).to(features.device)
    return {"sequences": sequences, "segments": segments} if return_segments else sequences


def _strip(seq: torch.Tensor, pad: int, eos: list) -> torch.Tensor:
    """A window's new tokens less the filling after its end and its end-of-sequence token, as transformers strips
    them (every pad token counted, one kept where it is the end-of-sequence token, then that one dropped)."""
    if len(seq) and int(seq[-1]) == pad:
        k = int((seq == pad).sum()) - (1 if eos and pad == eos[0] else 0)
        if k:
            seq = seq[:-k]
    if len(seq) and eos and int(seq[-1]) == eos[0]:
        seq = seq[:-1]
    return seq


def _segments(seq: torch.Tensor, first_ts: Optional[int], offset: float, frames: int, stride: int) -> tuple:
    """transformers' ``_retrieve_segment``: the segments (start and end in seconds, tokens) of one window's tokens
    ``seq`` (window start ``offset`` seconds, ``frames`` frames of audio), split after each pair of timestamps, and
    the frames to move on by: to the last pair's timestamp where the window's last segment is unfinished, else the
    window."""
    tokens = seq.tolist()
    stamp = [first_ts is not None and t >= first_ts for t in tokens]
    single_end = stamp[-2:] == [False, True]
    cuts = [k + 1 for k in range(len(stamp) - 1) if stamp[k] and stamp[k + 1]]
    if cuts:
        if single_end:
            cuts.append(len(tokens))
        else:
            cuts[-1] += 1               # (the last pair's second timestamp: the segment was not a single ending)
        out, last = [], 0
        for k, cut in enumerate(cuts):
            part = tokens[last:cut]
            end = part[-1] if k < len(cuts) - 1 or single_end else part[-2]
            out.append({"start": offset + (part[0] - first_ts) * TIME_PRECISION,
                        "end": offset + (end - first_ts) * TIME_PRECISION, "tokens": seq[last:cut]})
            last = cut
        return out, frames if single_end else (tokens[last - 2] - first_ts) * stride
    stamps = [k for k, is_ts in enumerate(stamp) if is_ts]
    end = int(torch.tensor(frames) * FRAME_SECONDS / TIME_PRECISION)       # (float32, as transformers computes it)
    if stamps and tokens[stamps[-1]] != first_ts:
        end = tokens[stamps[-1]] - first_ts
    return [{"start": offset, "end": offset + end * TIME_PRECISION, "tokens": seq}], frames
