"""Beam search over a compiled step (``CompiledCausalLM.generate(num_beams=...)``).

Each prompt keeps ``num_beams`` running sequences; every step scores each one's next tokens (log-softmax of the
logits, then the logits processors ``generate`` applies), adds the sequence's running score, and keeps the best
continuations over all of a prompt's beams. A continuation that ends (an end-of-sequence token, or the last new
token) becomes a finished hypothesis scored ``sum of log-probabilities / new_tokens ** length_penalty``; a prompt is
done when its finished hypotheses cannot be beaten (``early_stopping``). This is transformers' vectorized beam
search (``GenerationMixin._beam_search`` of transformers 5.17 and 5.25) step for step, the same tensors in the same
order, so the same logits give the same sequences; with ``temperature`` > 0 the continuations are drawn as its
beam sampling draws them (without replacement from the softmax of the accumulated scores, then sorted, as
transformers 5.25 does; 5.17 leaves them unsorted).

The prompt runs once per prompt, not once per beam: its state (cache slots, mask, positions, an encoder-decoder
model's encoded input) is then repeated for the beams, and every step gathers the cache rows of the beams that
continue (``reorder``), as transformers' ``Cache.reorder_cache`` does.
"""
from __future__ import annotations

import functools
import numbers
import time
from typing import Optional

import numpy as np
import torch

# the state's tensors with a row per sequence (CompiledCausalLM.prefill); "at" is shared by all rows
_ROWS = ("mask", "token", "position", "ids", "ids_mask")
_SHARED = ("at",)


def options(num_beams, length_penalty, early_stopping, num_return_sequences,
            renormalize_logits=False) -> Optional[dict]:
    """The checked beam-search options, or None for ``num_beams`` 1 (no beam search; ``renormalize_logits``
    changes nothing then: the log-softmax of the scores keeps their order and their softmax)."""
    from .lm import _is_int
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1 (1: no beam search), got {num_beams!r}")
    if not _is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an integer from 1 to num_beams ({num_beams}), got "
                         f"{num_return_sequences!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) or \
            not abs(length_penalty) < float("inf"):
        raise ValueError(f"length_penalty must be a finite number (the exponent of the new tokens' count a finished "
                         f"sequence's score is divided by; 0: none), got {length_penalty!r}")
    if isinstance(early_stopping, np.bool_):
        early_stopping = bool(early_stopping)
    if early_stopping not in (True, False, "never") or (early_stopping != "never" and not isinstance(early_stopping,
                                                                                                    bool)):
        raise ValueError(f"early_stopping must be True, False or 'never' (as transformers' generate), got "
                         f"{early_stopping!r}")
    if not isinstance(renormalize_logits, (bool, np.bool_)):
        raise ValueError(f"renormalize_logits must be True or False, got {renormalize_logits!r}")
    if num_beams == 1:
        return None
    return dict(num_beams=int(num_beams), length_penalty=float(length_penalty), early_stopping=early_stopping,
                num_return_sequences=int(num_return_sequences), renormalize=bool(renormalize_logits))


def reorder(state: dict, index: torch.Tensor, extra: bool = True) -> None:
    """Rows ``index`` of ``state`` (``CompiledCausalLM.prefill``'s, in place): the cache, mask, positions and fed
    token of each, and with ``extra`` the step's extra inputs (an encoded input: the same within a prompt's beams,
    so only repeated once, when the beams begin)."""
    known = {"cache", "extra", "filled", "fed", "gap_slots", *_ROWS, *_SHARED}
    unknown = sorted(set(state) - known)
    if unknown:                           # a state entry this function would leave in the old order
        raise RuntimeError(f"beam search cannot reorder the generation state's {unknown}")
    def take(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index.to(t.device))
    state["cache"] = [(take(k), take(v)) for k, v in state["cache"]]
    for key in _ROWS:
        if key in state:
            state[key] = take(state[key])
    if extra and "extra" in state:
        state["extra"] = torch.utils._pytree.tree_map(
            lambda t: take(t) if isinstance(t, torch.Tensor) else t, state["extra"])


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` (batch, beams, ...) at beams ``index`` (batch, k): transformers' ``_gather_beams``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.no_grad()
def beam_search(lm, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
                min_new_tokens: int, eos: list, pad: int, extra, rules, *, temperature: float, top_k, top_p: float,
                penalty: float, generator, num_beams: int, length_penalty: float, early_stopping,
                num_return_sequences: int, renormalize: bool = False, history=None, processor=None,
                progress: bool = False) -> torch.Tensor:
    """The new tokens (batch * num_return_sequences, n) of each prompt's best ``num_return_sequences`` finished
    sequences, best first, on ``input_ids``' device; ``n``: the longest of them, the shorter ones filled after their
    end-of-sequence token with ``pad``, or with ``eos[0]`` where ``pad`` is 0 (transformers' ``pad_token_id or
    eos_token_id[0]``). The arguments are ``CompiledCausalLM._steps``' and the sampling
    options (``_processed``), ``history``: ``history_bans``' (ngram, words, encoder), and ``processor(held,
    scores)`` (``_steps``'); ``lm.last_timing`` is set."""
    with lm._one_thread():
        return _beam_search(lm, input_ids, attention_mask, max_new_tokens, min_new_tokens, eos, pad, extra, rules,
                            temperature=temperature, top_k=top_k, top_p=top_p, penalty=penalty, generator=generator,
                            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                            num_return_sequences=num_return_sequences, renormalize=renormalize, history=history,
                            processor=processor, progress=progress)


def _beam_search(lm, input_ids, attention_mask, max_new_tokens, min_new_tokens, eos, pad, extra, rules, *,
                 temperature, top_k, top_p, penalty, generator, num_beams, length_penalty, early_stopping,
                 num_return_sequences, renormalize, history, processor, progress) -> torch.Tensor:
    from tqdm.auto import tqdm
    from .lm import _held_tokens, _prompt, history_bans
    t0 = time.perf_counter()
    logits, state = lm.prefill(input_ids, attention_mask, extra=extra)
    dev = logits.device
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    sync()
    t1 = time.perf_counter()
    b, k = input_ids.shape[0], num_beams
    vocab = logits.shape[-1]
    reorder(state, torch.arange(b, device=dev).repeat_interleave(k))       # each prompt's state, once per beam
    logits = logits[:, -1].repeat_interleave(k, 0)
    seen = None
    if penalty != 1:
        seen = _held_tokens(*_prompt(input_ids, attention_mask), vocab, dev).repeat_interleave(k, 0)
    ends = [e for e in eos if 0 <= e < vocab]
    prompts = input_ids.long().to(dev).repeat_interleave(k, 0)
    if history is not None and history[2] is not None:     # each prompt's encoder input, once per beam
        history = (*history[:2], (history[2][0], history[2][1].to(dev).repeat_interleave(k, 0)))
    ends_t = torch.tensor(ends, dtype=torch.long, device=dev)
    keep = max(2, 1 + len(eos)) * k                 # continuations kept per prompt (transformers counts every eos)
    top_beams = torch.arange(keep, device=dev) < k  # only these may finish (the rest keep k beams running)
    fill = pad or (eos[0] if eos else pad)
    run_seq = torch.full((b, k, max_new_tokens), fill, dtype=torch.long, device=dev)
    run_scores = torch.zeros(b, k, device=dev)
    run_scores[:, 1:] = -1e9                        # the first step continues beam 0 alone (all are the same)
    seqs, scores = run_seq.clone(), torch.full((b, k), -1e9, device=dev)
    lengths = torch.zeros(b, k, dtype=torch.long, device=dev)     # finished sequences' new tokens
    finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
    open_ = torch.ones(b, 1, dtype=torch.bool, device=dev)       # the finished ones may still be beaten
    offsets = torch.arange(b, device=dev)[:, None] * k
    bar = tqdm(total=max_new_tokens, desc="beam search", disable=not progress, leave=False)
    steps = 0
    for i in range(max_new_tokens):
        ban, forced = rules(i) if rules is not None else ((), ())
        ban = [t for t in ban if 0 <= t < vocab] + (ends if i < min_new_tokens else [])
        forced = [t for t in forced if 0 <= t < vocab]
        mask = held = None
        if history is not None or processor is not None:    # each beam's tokens so far: its prompt and new tokens
            held = torch.cat([prompts, run_seq[:, :, :i].flatten(0, 1)], 1)
        if history is not None:
            mask = history_bans(held, vocab, *history)
        logp = lm._processed(torch.log_softmax(logits.float(), -1), seen, ban, penalty, forced, temperature,
                             top_k, top_p, keep=len(eos) + 1 if eos else 2, mask=mask,
                             processor=None if processor is None else functools.partial(processor, held))
        if renormalize:                             # transformers' LogitNormalization, the last processor
            logp = logp.log_softmax(-1)
        acc = (logp.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
        if temperature > 0:                         # beam sampling: drawn without replacement, then sorted
            if generator is not None and generator.device != acc.device:
                picked = torch.multinomial(acc.softmax(-1).to(generator.device), keep, generator=generator).to(dev)
            else:
                picked = torch.multinomial(acc.softmax(-1), keep, generator=generator)
            top = acc.gather(1, picked)
            top, order = top.sort(-1, descending=True)
            picked = picked.gather(1, order)
        else:
            top, picked = torch.topk(acc, keep)
        beam, tok = picked // vocab, picked % vocab
        cand = _gather(run_seq, beam)
        cand[:, :, i] = tok
        hits = torch.isin(tok, ends_t) if ends else torch.zeros_like(tok, dtype=torch.bool)
        if i + 1 == max_new_tokens:                 # the last new token: every continuation ends
            hits = torch.ones_like(hits)
        # the running beams of the next step: the best continuations that did not end
        running = top + hits.float() * -1e9
        nxt = torch.topk(running, k).indices
        run_seq, run_scores, src = _gather(cand, nxt), _gather(running, nxt), _gather(beam, nxt)
        # the finished hypotheses: the best k of those so far and the ones that ended now among the top k
        just = hits & top_beams[None, :]
        ended = top / ((i + 1) ** length_penalty)
        ended = ended + (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        ended = ended + (~open_).float() * -1e9
        ended = ended + (~just).float() * -1e9
        merged = torch.topk(torch.cat([scores, ended], 1), k).indices
        seqs = _gather(torch.cat([seqs, cand], 1), merged)
        scores = _gather(torch.cat([scores, ended], 1), merged)
        lengths = _gather(torch.cat([lengths, torch.full_like(ended, i + 1, dtype=torch.long)], 1), merged)
        finished = _gather(torch.cat([finished, just], 1), merged)
        steps += 1
        bar.update()
        # whether a prompt's best running beam could still beat its worst finished hypothesis
        best_len = (max_new_tokens if early_stopping == "never" and length_penalty > 0 else i + 1)
        best = run_scores[:, :1] / (best_len ** length_penalty)
        worst = torch.where(finished, scores.min(1, keepdim=True).values, -1e9)
        open_ = open_ & (best > worst).any(-1, keepdim=True)
        more = bool(open_.any()) and not (bool(finished.all()) and early_stopping is True) and not bool(hits.all())
        if not more:
            break
        rows = (src + offsets).flatten()
        reorder(state, rows, extra=False)           # (an encoded input is the same within a prompt's beams)
        new = run_seq[:, :, i].flatten()
        if seen is not None:
            seen = seen.index_select(0, rows)
            seen[torch.arange(len(new), device=dev), new] = True
        logits = lm.decode(new, state)
    bar.close()
    sync()
    t2 = time.perf_counter()
    r = num_return_sequences
    out, lengths = seqs[:, :r].flatten(0, 1), lengths[:, :r].flatten()
    n = int(lengths.max())
    lm.last_timing = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": steps, "num_beams": k,
                      "decode_tokens_per_s": (steps - 1) / (t2 - t1) if steps > 1 else None}
    return out[:, :n].to(input_ids.device)
