"""Whisper's task prompt, language detection and timestamp rules, as transformers' ``WhisperForConditionalGeneration
.generate`` applies them to one 30-second window (``CompiledSeq2SeqLM.generate``'s ``language``, ``task``,
``return_timestamps`` and ``prompt_ids``).

transformers starts each decoder sequence with the *task prompt*: ``<|startoftranscript|>``, a language token
(given, or *detected*: the likeliest language token after the start token alone, row by row), a task token
(``<|transcribe|>`` or ``<|translate|>``: given, from the config's ``forced_decoder_ids``, or transcribe where a
language was given) and ``<|notimestamps|>`` unless timestamps are asked for; ``prompt_ids`` (``<|startofprev|>``
and earlier text) go in front. With ``return_timestamps=True`` its ``WhisperTimeStampLogitsProcessor`` runs after
the other processors: timestamps come in pairs and never decrease, the first new token is a timestamp no later than
``max_initial_timestamp_index``, and a row whose timestamps together are likelier than its likeliest text token
takes a timestamp (``timestamp_rules``).

``init_tokens`` builds the prompt from these settings (``settings`` reads them from the model's generation
config; they are saved with the compiled model as plain JSON) as transformers 5.17-5.25's ``_retrieve_init_tokens``
does. Where transformers goes further: it drops the prompt and the end-of-sequence token from what it returns
(``force_unique_generate_call=True`` returns the whole sequences, as slimfx does), and with timestamps, when the
window's last segment ends unfinished it decodes the window again from the last timestamp (its long-form loop),
where slimfx decodes each window once. Audio longer than one window (long-form transcription), temperature fallback
and no-speech detection are not done.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

TASKS = ("translate", "transcribe")      # transformers' TASK_IDS


def settings(model) -> Optional[dict]:
    """The Whisper entries of ``model``'s generation config (None for a model without ``detect_language``, which is
    no Whisper), as JSON: ``lang_to_id``, ``task_to_id``, ``is_multilingual``, ``no_timestamps_token_id``,
    ``max_initial_timestamp_index``, ``forced_decoder_ids`` (the config's, else the model config's), the defaults
    ``language``, ``task`` and ``return_timestamps``, and ``language_codes``: each language name transformers
    knows ("french") with its code ("fr"), for the codes ``lang_to_id`` holds."""
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
    out = {"lang_to_id": lang_to_id if hasattr(gen, "lang_to_id") else None,
           "task_to_id": {str(k): int(v) for k, v in gen.task_to_id.items()} if hasattr(gen, "task_to_id") else None,
           "is_multilingual": getattr(gen, "is_multilingual", None),
           "no_timestamps_token_id": getattr(gen, "no_timestamps_token_id", None),
           "max_initial_timestamp_index": getattr(gen, "max_initial_timestamp_index", None),
           "forced_decoder_ids": [[int(i), None if t is None else int(t)] for i, t in forced] if forced else None,
           "language": getattr(gen, "language", None), "task": getattr(gen, "task", None),
           "return_timestamps": bool(getattr(gen, "return_timestamps", None) or False), "language_codes": codes}
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
    for key in ("no_timestamps_token_id", "max_initial_timestamp_index"):
        if data.get(key) is not None and not _int(data[key]):
            raise ValueError(f"{where}: {key} must be a token id or null, got {data[key]!r}")
    forced = data.get("forced_decoder_ids")
    if forced is not None and not (isinstance(forced, list) and all(
            isinstance(p, list) and len(p) == 2 and _int(p[0]) and (p[1] is None or _int(p[1])) for p in forced)):
        raise ValueError(f"{where}: forced_decoder_ids must be [index, token id or null] pairs, got {forced!r}")
    codes = data.get("language_codes") or {}
    if not (isinstance(codes, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in codes.items())):
        raise ValueError(f"{where}: language_codes must map language names to codes, got {codes!r}")
    if not isinstance(data.get("return_timestamps", False), bool):
        raise ValueError(f"{where}: return_timestamps must be true or false, got {data['return_timestamps']!r}")
    return data


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
                detect: Optional[Callable[[list], torch.Tensor]] = None, model_name: str = "Whisper") -> list:
    """Each row's task prompt (``batch`` lists of token ids), as transformers' ``_retrieve_init_tokens`` builds it
    from the settings ``s`` and the call's ``language`` (None, one, or one per row) and ``task``; ``detect(ids)``
    gives each row's likeliest token among the language token ids ``ids`` (called only when a language must be
    detected: none given, the model has ``lang_to_id`` and ``forced_decoder_ids`` name none)."""
    if s.get("is_multilingual") is False and (task is not None or language is not None):
        raise ValueError(f"{model_name} is an English-only model (its generation config's is_multilingual): it "
                         f"takes no language or task")
    if language is not None and s.get("lang_to_id") is None:
        raise ValueError(f"{model_name}'s generation config has no lang_to_id: it takes no language")
    if task is not None and (s.get("task_to_id") is None or task not in TASKS or task not in s["task_to_id"]):
        raise ValueError(f"task must be one of {sorted(s.get('task_to_id') or ())}, got {task!r}")
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
    inf = float("-inf")

    def rules(held: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seq = held[:, begin:].to(scores.device)
        rows, n = seq.shape
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        stamps = vocab >= first_ts
        scores = scores.clone()
        scores[:, no_ts] = inf
        is_ts = seq >= first_ts
        false = torch.zeros(rows, dtype=torch.bool, device=scores.device)
        last = is_ts[:, -1] if n >= 1 else false
        before = is_ts[:, -2] if n >= 2 else ~false
        # timestamps come in pairs: after a pair text (or the end), after a single one another timestamp (or the end)
        scores = scores.masked_fill((last & before)[:, None] & stamps, inf)
        scores = scores.masked_fill((last & ~before)[:, None] & (vocab < eos), inf)
        # no timestamp below the last one (below the last + 1 after a pair: <|0.00|> not again)
        at = torch.arange(n, device=scores.device)
        latest = seq.gather(1, torch.where(is_ts, at, -1).max(1, keepdim=True).values.clamp(min=0))[:, 0] if n else \
            torch.zeros(rows, dtype=seq.dtype, device=scores.device)
        floor = torch.where(is_ts.any(1) if n else false, torch.where(last & ~before, latest, latest + 1), first_ts)
        scores = scores.masked_fill(stamps & (vocab < floor[:, None]), inf)
        if n == 0:                                # the first new token: a timestamp, no later than the initial bound
            scores[:, :first_ts] = inf
            if max_initial is not None:
                scores[:, first_ts + max_initial + 1:] = inf
        logp = torch.log_softmax(scores.float(), -1)
        timestamp = logp[:, first_ts:].logsumexp(-1) > logp[:, :first_ts].max(-1).values
        return scores.masked_fill(timestamp[:, None] & ~stamps, inf)
    return rules
