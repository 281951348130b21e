"""Text generation from a compiled encoder-decoder model (T5, BART, Marian, Pegasus, Whisper).

    lm = slimfx.compile_seq2seq_lm(model, passes=[P.Quantize(weights="int8", activations="dynamic-per-token")])
    out = lm.generate(ids, attention_mask, max_new_tokens=32)   # (batch, 1 + new): the decoder's tokens

slimfx compiles two graphs. The *encoder* takes the model's input (token ids and their mask, or Whisper's
log-mel features) and returns what every decoder step reads from it: each decoder layer's cross-attention keys
and values, computed once per input (the encoder, then the decoder's key and value projections of its output;
transformers' ``EncoderDecoderCache`` fills its cross-attention cache so on the first step), and the mask over
the encoder's positions. The *step* (``DecoderStep``) has ``CausalLMStep``'s form (``slimfx.lm``) with the
encoder's output added: ``(input_ids, position_ids, attention_mask, cache, logits_at, cross,
encoder_attention_mask) -> (logits, new cache)``, the decoder's
self-attention cache as plain tensors, its cross-attention keys and values as inputs read, never written. So the
generation loop is ``CompiledCausalLM``'s (a buffer of cache slots, left-padded decoder prompts, decode steps of
1 token where ``check_decode_tokens`` finds the step gives the same logits on it as on 2, else the re-fed token:
``slimfx.lm``'s docstring), and prefill, decode, sampling and the timings behave as there: T5, BART, Marian,
Pegasus, Whisper and their kin decode 1. Loaded onto another backend than the one it was checked on, or moved
there (``with_backend``), a step decodes 2: checking needs the encoder's output for a real input.

The buffer's masked slots (the one in front, the re-fed token's copy, the unfilled ones) are not positions.
transformers counts a decoder's positions by cache slot (BART's, Marian's and Whisper's position tables index
``cache length + i``; T5 biases attention by slot distance), so while the step runs, slimfx gives them positions
that count the unmasked slots (``decoder_replacements``): BART's learned table and the sinusoidal ones of Marian
and Pegasus, Whisper's table, each by the step's ``position_ids``; M2M100's and NLLB's sinusoidal table, indexed
from the ids' padding, at ``padding_idx + 1 + position``; T5's relative position bias between real positions.
``compile_seq2seq_lm`` checks on one eager generation, with left padding and masked slots, that the step gives the
logits of the model run on the real tokens alone, and refuses a model whose positions it cannot place so (LED
counts them by cache length, FSMT by the ids' padding and the cache length in a table of its own). Speech2Text
is refused up front: its forward subsamples its frames' mask.

``generate`` starts each decoder sequence with ``decoder_start_token_id`` unless given ``decoder_input_ids``
(Whisper: its task prompt, <|startoftranscript|>, language, task, <|notimestamps|>, which ``language``, ``task``
and ``prompt_ids`` build as transformers does, the language detected where none is given: ``slimfx.whisper``), and
applies these entries of the model's generation config as transformers' logits processors do:
``forced_bos_token_id`` (the first new token after a 1-token prompt), ``forced_eos_token_id`` (the last of
``max_new_tokens``, even where that is the first), ``suppress_tokens``, ``begin_suppress_tokens`` (the first new
token, the second after a forced first), ``bad_words_ids`` of one token each (but an end-of-sequence token, which
transformers drops from them; a call's ``bad_words_ids`` replaces the config's) and ``min_length`` (replaced by
``min_new_tokens`` when that is given; from the config only). A forced first token that is a bad word is forced
all the same, as in transformers.
The config's ``num_beams``, ``length_penalty``, ``early_stopping``, ``num_return_sequences``, ``renormalize_logits``,
``no_repeat_ngram_size``, ``encoder_no_repeat_ngram_size`` (of token-id inputs, as transformers), ``repetition_penalty``
and longer ``bad_words_ids`` are ``generate``'s defaults too (Marian's and BART-CNN's configs ask for beam search,
``slimfx.beam``, BART-CNN's for no repeated 3-gram, Blenderbot's for none of the input's); ``stream`` yields greedy or
sampled tokens only, one at a time, so for a model configured for beams it gives other tokens than ``generate``.
Whisper's timestamp rules apply with ``return_timestamps=True`` (or the config's). Group and constrained beam
search and the config's ``do_sample`` are not applied, so a model configured for them generates other tokens than
its own ``generate``; compiling one warns, naming them.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import pathlib
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.export import Dim

from . import ir, whisper
from .whisper import checked as whisper_settings_checked
from .beam import options as beam_options
from .lm import (CompiledCausalLM, _cache_kw, _EagerCausalLM, _is_int, _prompt, _replaced, bad_words, check_cache,
                 checked_ids, count, penalty, saved_layout, share_children, slot_error, step_inputs)

SEQ2SEQ_FILE = "seq2seq_lm.json"


class _Call:
    """What a replacement reads from the decoder step's current call (``DecoderStep.forward`` sets it)."""
    attention_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None


def _t5_bias(original, call: _Call):
    """T5's ``compute_bias`` (and its copies: mT5, LongT5, UMT5's of every layer) for the decoder's self-attention
    over real positions: transformers buckets ``key slot - (past slots + query index)``; here ``pos(key) -
    pos(query)``, a key's pos counting the unmasked slots of the step's attention mask (masked keys get whatever
    bias: the mask removes them), a query's the step's ``position_ids`` (that count at a real query; narrowing the
    mask's count to the query length traced a size that export asserted >= 2 tokens as the step ran, which kept
    decoding at 2 tokens a step). (batch, heads, queries, keys). The encoder's, and a call outside the step, run
    ``original``."""
    def compute_bias(self, query_length, key_length, *args, **kwargs):
        if call.attention_mask is None or call.position_ids is None or not self.is_decoder:
            return original(self, query_length, key_length, *args, **kwargs)
        pos = call.attention_mask.long().cumsum(-1) - 1
        # the mask's last key_length slots (narrow: a length export reads as plainly that)
        keys = pos.narrow(1, pos.shape[1] - key_length, key_length)
        queries = call.position_ids
        relative = keys[:, None, :] - queries[:, :, None]
        if "bidirectional" in inspect.signature(self._relative_position_bucket).parameters:
            bucket = self._relative_position_bucket(relative, bidirectional=False,
                                                    num_buckets=self.relative_attention_num_buckets,
                                                    max_distance=self.relative_attention_max_distance)
        else:                  # UMT5's method reads them from the module (a decoder's: one-sided)
            bucket = self._relative_position_bucket(relative)
        return self.relative_attention_bias(bucket).permute(0, 3, 1, 2)
    return compute_bias


def _offset_positions(original, call: _Call):
    """BART's learned position table (and its copies: mBART, PLBart, BigBird-Pegasus), which takes positions
    ``offset`` rows on and 1-d ``position_ids`` only: the rows of the step's (batch, length) positions."""
    def forward(self, *args, **kwargs):
        if call.position_ids is None:
            return original(self, *args, **kwargs)
        return nn.Embedding.forward(self, call.position_ids + self.offset)
    return forward


def _given_positions(original, call: _Call):
    """A position embedding that takes ``position_ids`` (Marian's, Pegasus's and Blenderbot's sinusoidal tables,
    Whisper's learned one): called with the step's."""
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        if call.position_ids is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)       # (Pegasus-X passes them by position)
        bound.arguments["position_ids"] = call.position_ids
        return original(*bound.args, **bound.kwargs)
    return forward


def _padded_positions(original, call: _Call):
    """A sinusoidal table indexed from the token ids' padding (M2M100's and NLLB's, Speech2Text's: a real token's
    row is ``padding_idx + 1 + cache length + its rank among the ids that are not the pad id``, which counts cache
    slots, masked ones too): the row ``padding_idx + 1 + position`` by the step's positions, and a pad id the
    padding row, as transformers gives it (the tokens after it count its slot there too)."""
    def forward(self, input_ids=None, *args, **kwargs):
        if call.position_ids is None:
            return original(self, input_ids, *args, **kwargs)
        rows = call.position_ids + (self.padding_idx + 1)
        if input_ids is not None:       # a pad id is padding wherever it stands: its (zero) row, as in transformers
            rows = torch.where(input_ids == self.padding_idx, self.padding_idx, rows)
        return self.weights.index_select(0, rows.reshape(-1)).view(*rows.shape, self.weights.shape[-1]).detach()
    return forward


def _pads_positions(table: nn.Module) -> bool:
    """Whether ``table`` is a sinusoidal table indexed from the ids' padding (``_padded_positions``)."""
    return _is_int(getattr(table, "padding_idx", None)) and isinstance(getattr(table, "weights", None), torch.Tensor) \
        and callable(getattr(table, "create_position_ids_from_input_ids", None))


def decoder_replacements(model: nn.Module, call: _Call) -> list:
    """(class, attribute, replacement) for the functions through which ``model``'s decoder counts positions by
    cache slot, each then counting real positions while ``DecoderStep`` runs (module docstring). A decoder none
    of them reaches keeps its own, which ``check_positions`` then tests."""
    decoder = model.get_decoder()
    out = []
    for m in decoder.modules():
        cls = type(m)
        if "compute_bias" in cls.__dict__ and hasattr(cls, "_relative_position_bucket"):
            out.append((cls, "compute_bias", _t5_bias(cls.compute_bias, call)))
    table = getattr(decoder, "embed_positions", None)
    if isinstance(table, nn.Module):
        cls = next(c for c in type(table).__mro__ if "forward" in c.__dict__)
        if isinstance(table, nn.Embedding) and _is_int(getattr(table, "offset", None)):
            out.append((cls, "forward", _offset_positions(cls.forward, call)))
        elif "position_ids" in inspect.signature(cls.forward).parameters:
            out.append((cls, "forward", _given_positions(cls.forward, call)))
        elif _pads_positions(table):
            out.append((cls, "forward", _padded_positions(cls.forward, call)))
    return list(dict.fromkeys(out))


class _Shared(nn.Module):
    """A module holding ``model``'s children (parameter names stay the model's), calling the model itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        share_children(self, model, "compile_seq2seq_lm wraps Hugging Face encoder-decoder models")
        self._kw = _cache_kw(model)


class EncodeStep(_Shared):
    """The encoder half: forward(inputs (token ids (batch, length), or Whisper's features), attention_mask)
    -> {"cross": [(keys, values)] * decoder layers, each (batch, heads, encoder length, head dim),
    "mask": (batch, encoder length)}. The cross-attention keys and values are what transformers' decoder writes
    into its cross-attention cache on its first call: the decoder runs once on 2 placeholder tokens, and capture
    drops everything of it but those projections, which nothing else reads."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.input_name = model.main_input_name

    def forward(self, inputs, attention_mask=None):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput
        encoder = self._model.get_encoder()
        hidden = encoder(**{self.input_name: inputs}, attention_mask=attention_mask)[0]
        if attention_mask is None:       # (Whisper: its encoder's every position counts)
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        placeholder = torch.zeros(hidden.shape[0], 2, dtype=torch.long, device=hidden.device)
        out = self._model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
                          decoder_input_ids=placeholder, use_cache=True, **{self._kw: cache})
        cross = getattr(out, self._kw).cross_attention_cache
        return {"cross": [(layer.keys, layer.values) for layer in cross.layers], "mask": attention_mask}


class DecoderStep(_Shared):
    """One decoder step (module docstring): forward(input_ids (B, S), position_ids (B, S), attention_mask
    (B, P + S), cache [(k, v)] * layers, logits_at (K,), cross [(k, v)] * layers, encoder_attention_mask (B, E))
    -> {"logits": (B, K, vocab), "cache": [(k, v)] * layers, P + S long}."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        config = model.config
        self._width = int(getattr(config, "d_model", None) or config.hidden_size)
        self._call = _Call()
        self._replacements = decoder_replacements(model, self._call)

    def forward(self, input_ids, position_ids, attention_mask, cache, logits_at, cross, encoder_attention_mask):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput
        both = EncoderDecoderCache(DynamicCache(ddp_cache_data=[(k, v) for k, v in cache]),
                                   DynamicCache(ddp_cache_data=[(k, v) for k, v in cross]))
        # the cross-attention reads its keys and values from the cache (filled: is_updated); of the encoder's
        # output it reads the shape only, so a broadcast zero stands for it
        b, e = encoder_attention_mask.shape
        hidden = cross[0][0].new_zeros(1, 1, 1).expand(b, e, self._width)
        keep = {"logits_to_keep": logits_at} if self._keeps else {}
        self._call.attention_mask, self._call.position_ids = attention_mask, position_ids
        try:
            with _replaced(self._replacements):
                out = self._model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                                  attention_mask=encoder_attention_mask,
                                  decoder_input_ids=input_ids, decoder_attention_mask=attention_mask,
                                  use_cache=True, **{self._kw: both}, **keep)
        finally:
            self._call.attention_mask = self._call.position_ids = None   # (a traced one must not outlive its trace)
        logits = out.logits if self._keeps else out.logits[:, logits_at]
        new = getattr(out, self._kw).self_attention_cache
        return {"logits": logits, "cache": [(layer.keys, layer.values) for layer in new.layers]}


def _start_token(model: nn.Module) -> int:
    gen = getattr(model, "generation_config", None)
    start = getattr(gen, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    if isinstance(start, (list, tuple)):
        start = start[0] if start else None
    if not _is_int(start):
        raise TypeError(f"{type(model).__name__} names no decoder_start_token_id (generation config or config); "
                        f"compile_seq2seq_lm needs the token each decoder sequence starts with")
    return int(start)


def _example_inputs(model: nn.Module) -> tuple:
    """The encoder's example input: 2 x 16 random token ids, or Whisper-like features of the length its encoder
    requires (``num_mel_bins`` x ``max_source_positions`` times its convolutions' strides)."""
    name = model.main_input_name
    if name == "input_ids":
        vocab = model.get_input_embeddings().num_embeddings
        return (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)
    config, encoder = model.config, model.get_encoder()
    convs = [m for m in encoder.children() if isinstance(m, nn.Conv1d)]
    if name == "input_features" and getattr(config, "num_mel_bins", None) and convs and \
            getattr(config, "max_source_positions", None):
        frames = int(config.max_source_positions)
        for conv in convs:
            frames *= conv.stride[0]
        dtype = next(model.parameters()).dtype
        return (torch.randn(2, int(config.num_mel_bins), frames, generator=torch.Generator().manual_seed(0)
                            ).to(dtype),)
    raise TypeError(f"{type(model).__name__} takes {name!r}: pass example_inputs=(a batch of it,) to "
                    f"compile_seq2seq_lm (token ids and Whisper's features it makes itself)")


def _encoder_args(name: str, inputs, attention_mask) -> tuple:
    """The encoder step's arguments for ``inputs`` (checked): ids with a mask of 0/1 (all ones when None)."""
    if name == "input_ids":
        return checked_ids(inputs, attention_mask, "input")
    if not isinstance(inputs, torch.Tensor) or not inputs.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {getattr(inputs, 'dtype', type(inputs).__name__)}")
    if attention_mask is not None:
        raise ValueError(f"the encoder takes {name} without an attention_mask (each of its positions counts)")
    return (inputs,)


def _decoder_layout(model: nn.Module, enc_args: tuple, name: str) -> list:
    """((key heads, key dim), (value heads, value dim)) of each decoder layer's self-attention cache, from one
    eager call; refuses caches other than transformers' EncoderDecoderCache of full-attention layers."""
    from transformers.cache_utils import DynamicLayer, EncoderDecoderCache
    what = type(model).__name__
    kw = _cache_kw(model)
    inputs = {name: enc_args[0][:1]}
    if len(enc_args) > 1:
        inputs["attention_mask"] = enc_args[1][:1]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(**{k: v.to(dev) for k, v in inputs.items()},
                        decoder_input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev), use_cache=True)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:
        raise TypeError(f"{what} fails a plain call with use_cache=True, from which compile_seq2seq_lm reads its "
                        f"cache's layout: {type(e).__name__}: {e}") from e
    cache = getattr(out, kw, None)
    if not isinstance(cache, EncoderDecoderCache):
        raise TypeError(f"{what} returned no EncoderDecoderCache ({type(cache).__name__}); compile_seq2seq_lm "
                        f"needs transformers' self- and cross-attention caches")
    for part, c in (("self", cache.self_attention_cache), ("cross", cache.cross_attention_cache)):
        odd = sorted({type(layer).__name__ for layer in c.layers if type(layer) is not DynamicLayer})
        if odd or not c.layers or any(layer.keys is None for layer in c.layers):
            raise TypeError(f"{what}: its {part}-attention cache holds {odd or 'unfilled layers'}; "
                            f"compile_seq2seq_lm handles full-attention caches (DynamicLayer), one filled per layer")
    return [((int(layer.keys.shape[1]), int(layer.keys.shape[3])),
             (int(layer.values.shape[1]), int(layer.values.shape[3])))
            for layer in cache.self_attention_cache.layers]


def _decoder_vocab(model: nn.Module) -> int:
    """The decoder's token embeddings' rows (random example tokens stay below it)."""
    table = getattr(model.get_decoder(), "embed_tokens", None)
    return int((table if isinstance(table, nn.Embedding) else model.get_input_embeddings()).num_embeddings)


def _position_limit(model: nn.Module) -> Optional[int]:
    """The positions the decoder's position table holds (rows less BART's offset), else None (T5: no table)."""
    table = getattr(model.get_decoder(), "embed_positions", None)
    if isinstance(table, nn.Embedding):
        return int(table.num_embeddings) - int(getattr(table, "offset", 0) or 0)
    if isinstance(table, nn.Module) and _pads_positions(table):    # (transformers grows it; the graph holds it)
        return int(table.weights.shape[0]) - int(table.padding_idx) - 1
    return None


def probe_ids(model: nn.Module, rows: int, start: int, length: int = 6) -> torch.Tensor:
    """(rows, length) random decoder tokens behind ``start``, none a pad id (M2M100 skips a pad id as padding),
    for ``check_positions`` and ``check_decode_tokens``."""
    ids = torch.randint(0, _decoder_vocab(model), (rows, length), generator=torch.Generator().manual_seed(0))
    table = getattr(model.get_decoder(), "embed_positions", None)
    for pad in {getattr(model.config, "pad_token_id", None), getattr(table, "padding_idx", None)} - {None}:
        ids[ids == pad] = (pad + 1) % _decoder_vocab(model)
    ids[:, 0] = start
    return ids.to(next(model.parameters()).device)


def first_rows(enc_args: tuple, extra: tuple, rows: int = 2) -> tuple:
    """The first ``rows`` of the encoder's inputs and of its output (the decoder step's ``extra``)."""
    return tuple(a[:rows] for a in enc_args), ([(k[:rows], v[:rows]) for k, v in extra[0]], extra[1][:rows])


def check_positions(model: nn.Module, lm: "_EagerSeq2SeqLM", enc_args: tuple, extra: tuple) -> None:
    """Refuse ``model`` unless generating through ``step`` gives the logits of the model run on the real decoder
    tokens alone (a left-padded decoder prompt, then two decode steps: masked slots in front, the re-fed token
    masked, unfilled slots between): its decoder's positions must count real tokens (``decoder_replacements``).
    ``lm`` runs the step modules; ``extra``: their encoder's output for ``enc_args`` (of which 2 rows are used)."""
    enc_args, extra = first_rows(enc_args, extra)
    b = enc_args[0].shape[0]
    ids = probe_ids(model, b, lm.decoder_start_token_id)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[0, :2] = 0
    with ir.eval_mode(model), torch.no_grad():
        try:
            logits, state = lm.prefill(ids[:, :4], mask[:, :4], extra=extra)
            got = torch.stack([logits[:, -1], lm.decode(ids[:, 4], state), lm.decode(ids[:, 5], state)], 1)
        except Exception as e:
            raise TypeError(f"{type(model).__name__} is not supported: its decoder fails on the cache "
                            f"compile_seq2seq_lm gives it, masked slots included ({type(e).__name__}: {e})") from e
        ref = []
        for i in range(b):
            inputs = {lm.input_name: enc_args[0][i:i + 1]}
            if len(enc_args) > 1:
                inputs["attention_mask"] = enc_args[1][i:i + 1]
            ref.append(model(**inputs, decoder_input_ids=ids[i][mask[i].bool()][None]).logits[0, -3:])
        ref = torch.stack(ref)
    err = slot_error(got, ref, lm.dtype)
    if err is not None:
        raise TypeError(f"{type(model).__name__} is not supported: its decoder counts positions by cache slot in a "
                        f"way slimfx does not replace (logits change by {err:.2g} of their scale when masked cache "
                        f"slots are present), so the masked slots of the decode buffer (left padding, the re-fed "
                        f"token, unfilled slots) would shift its positions")


def _batches(items: Iterable, name: str) -> list:
    """The calibration batches (dicts holding the encoder's input ``name``), checked."""
    from collections.abc import Mapping
    if isinstance(items, (Mapping, torch.Tensor)):
        raise TypeError("compile_seq2seq_lm: calibration is one batch; pass a list of batches: calibration=[batch]")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or name not in item:
            raise TypeError(f"compile_seq2seq_lm: calibration batch {i} must be a dict with {name!r} (and "
                            f"'attention_mask', 'decoder_input_ids' or 'labels' as it has them), got "
                            f"{list(item) if isinstance(item, Mapping) else type(item).__name__}")
        out.append(item)
    return out


def compile_seq2seq_lm(model: nn.Module, *, passes: Sequence = (), calibration: Optional[Iterable] = None,
                       example_inputs: Optional[tuple] = None, backend: str = "numpy",
                       backend_options: Optional[dict] = None, **compile_kwargs) -> "CompiledSeq2SeqLM":
    """Compile ``model`` (a Hugging Face encoder-decoder model: T5, BART, Marian, Pegasus, Whisper) for
    generation: its encoder and its decoder step, each through ``slimfx.compile`` with ``passes`` (module
    docstring).

    calibration: batches, each a dict with the model's input ("input_ids" and "attention_mask", or Whisper's
                 "input_features") and, for the decoder step, "decoder_input_ids" or "labels" (shifted right
                 behind ``decoder_start_token_id``, as transformers trains; without them the decoder sees the
                 start token alone)
    example_inputs: (the encoder's input,) for the captures (default: 2 x 16 random tokens, or Whisper-like
                 features; the first calibration batch when given)
    The other keywords go to ``slimfx.compile`` (verify, measure, dump_dir, progress)."""
    from .api import capture as capture_graph, compile as compile_graph
    from .lm import check_decode_tokens, checked_compile_args, probe_of
    for key in ("dynamic", "example_kwargs"):
        if key in compile_kwargs:
            raise TypeError(f"compile_seq2seq_lm sets {key!r} itself (the steps' inputs and dynamic dims)")
    what = type(model).__name__
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or \
            not hasattr(model, "get_encoder"):
        raise TypeError(f"{what} is not an encoder-decoder model (config.is_encoder_decoder); "
                        f"compile_causal_lm compiles a decoder-only causal LM")
    if getattr(model.config, "encoder_attention_type", None) == "transient-global":
        raise TypeError(f"{what}: transient-global attention is not supported: the graph captured for one input length "
                        f"fails on others (its global blocks follow the length in ways export does not guard: a "
                        f"40-token example's graph fails on 20 tokens); LongT5's local attention is")
    if hasattr(model, "_get_feature_vector_attention_mask"):
        raise TypeError(f"{what} is not supported: its forward subsamples the attention mask of its input frames to "
                        f"the encoder's length, also when given the encoder's output, so the decoder step would "
                        f"subsample the encoder's mask once more (Whisper's encoder takes no mask)")
    # a generator of passes serves both graphs; a typo fails before the captures
    passes = checked_compile_args("compile_seq2seq_lm", compile_graph, passes, backend, backend_options,
                                  compile_kwargs)
    gen = getattr(model, "generation_config", None)
    try:                                                 # (before the captures: the config's own mistake)
        beam_options(*(getattr(gen, k, d) if getattr(gen, k, None) is not None else d for k, d in _BEAM_DEFAULTS))
    except ValueError as e:
        raise ValueError(f"{what}'s generation config: {e}") from e
    name = model.main_input_name
    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    start = _start_token(model)
    batches = _batches(calibration, name) if calibration is not None else None
    from_batch = example_inputs is None and bool(batches)
    if example_inputs is None:
        example_inputs = ((batches[0][name],) if batches else _example_inputs(model))
    if not isinstance(example_inputs, tuple) or len(example_inputs) != 1:
        raise TypeError(f"compile_seq2seq_lm: example_inputs must be a 1-tuple (the encoder's {name}), got "
                        f"{type(example_inputs).__name__}")
    mask = batches[0].get("attention_mask") if from_batch else None     # (the example's own: none given)
    enc_args = _encoder_args(name, example_inputs[0], mask if name == "input_ids" else None)
    enc_args = tuple(a.to(dev) for a in enc_args)
    layout = _decoder_layout(model, enc_args, name)
    encoder, step = EncodeStep(model), DecoderStep(model)
    eager = _EagerSeq2SeqLM(encoder, step, layout, dtype, start, model_name=what, input_name=name)
    with ir.eval_mode(model), torch.no_grad():
        extra = eager._encode_args(enc_args)             # (the check's, and the step's example)
    check_positions(model, eager, enc_args, extra)

    auto = Dim.AUTO
    enc_dynamic = {"inputs": {i: auto for i in range(enc_args[0].dim())}}
    enc_dynamic["attention_mask"] = {0: auto, 1: auto} if len(enc_args) > 1 else None
    enc_cal = None
    dec_cal = []
    if batches:
        enc_cal = []
        with ir.eval_mode(model), torch.no_grad():
            for i, item in enumerate(batches):
                try:
                    args = _encoder_args(name, item[name], item.get("attention_mask"))
                except ValueError as e:
                    raise ValueError(f"compile_seq2seq_lm: calibration batch {i}: {e}") from e
                args = tuple(a.to(dev) for a in args)
                enc_cal.append(args if len(args) > 1 else (args[0], None))
                ids = _decoder_ids(item, start, getattr(model.config, "pad_token_id", None), args[0].shape[0])
                dec_cal.append((*step_inputs(ids.to(dev), None, layout, dtype), *eager._encode_args(args)))
    cm_enc = compile_graph(encoder, (enc_args[0], enc_args[1] if len(enc_args) > 1 else None), passes=passes,
                           backend=backend, backend_options=backend_options, dynamic=enc_dynamic,
                           calibration=enc_cal, **compile_kwargs)
    ids = torch.randint(0, _decoder_vocab(model), (enc_args[0].shape[0], 4),
                        generator=torch.Generator().manual_seed(1)).to(dev)
    ids[:, 0] = start
    # two masked slots: an example dim of 1 would be specialized; at run time the prompt step holds one
    example = (*step_inputs(ids, None, layout, dtype, slots=2), *extra)
    dynamic = {"input_ids": {0: auto, 1: auto}, "position_ids": {0: auto, 1: auto},
               "attention_mask": {0: auto, 1: auto}, "cache": [({0: auto, 2: auto}, {0: auto, 2: auto})
                                                                for _ in layout],
               "logits_at": {0: auto}, "cross": [({0: auto, 2: auto}, {0: auto, 2: auto}) for _ in extra[0]],
               "encoder_attention_mask": {0: auto, 1: auto}}
    # one capture of the step, compiled with the passes and without them (check_decode_tokens' probe)
    cap = capture_graph(step, example, dynamic=dynamic, method=compile_kwargs.pop("capture", "auto"))
    cm_step = compile_graph(cap, passes=passes, backend=backend, backend_options=backend_options,
                            calibration=dec_cal or None, **compile_kwargs)
    cm_step.report().capture_reused = False      # (the capture is this compile's own, as in slimfx.compile)
    defaults = {k: getattr(gen, k, d) if getattr(gen, k, None) is not None else d for k, d in _CONFIG_DEFAULTS}
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    bad = getattr(gen, "bad_words_ids", None) or []
    _warn_unapplied(what, gen)
    lm = CompiledSeq2SeqLM(
        cm_enc, cm_step, layout, dtype, start, eos_token_id=eos, pad_token_id=getattr(gen, "pad_token_id", None),
        model_name=what, position_limit=_position_limit(model), input_name=name,
        forced_bos_token_id=getattr(gen, "forced_bos_token_id", None),
        forced_eos_token_id=getattr(gen, "forced_eos_token_id", None),
        suppress_tokens=getattr(gen, "suppress_tokens", None),
        begin_suppress_tokens=getattr(gen, "begin_suppress_tokens", None),
        bad_tokens=[b[0] for b in bad if len(b) == 1], bad_sequences=[b for b in bad if len(b) > 1],
        min_length=getattr(gen, "min_length", None) or 0, whisper=whisper.settings(model), **defaults)
    enc_args, extra = first_rows(enc_args, extra)
    lm.decode_tokens, lm.decode_note = check_decode_tokens(lm, probe_of(cap, cm_step, passes, backend),
                                                           ids=probe_ids(model, enc_args[0].shape[0], start, 8),
                                                           extra=extra)
    return lm


def _warn_unapplied(what: str, gen) -> None:
    """Warn about the entries of the generation config that make transformers' ``generate`` choose other tokens
    and that ``CompiledSeq2SeqLM.generate`` does not apply (module docstring)."""
    unapplied = []
    for key in ("num_beam_groups", "diversity_penalty", "constraints", "force_words_ids"):
        value = getattr(gen, key, None)
        if value and not (key == "num_beam_groups" and value == 1):
            unapplied.append(f"{key}={value}")
    if getattr(gen, "do_sample", False):
        unapplied.append("do_sample=True (generate is greedy unless given temperature=, top_k=, top_p=)")
    if unapplied:
        warnings.warn(f"{what}'s generation config sets {', '.join(unapplied)}, which compile_seq2seq_lm's generate "
                      f"does not apply: its tokens can differ from transformers' generate", stacklevel=3)


def _decoder_ids(item, start: int, pad: Optional[int], batch: int) -> torch.Tensor:
    """A calibration batch's decoder tokens: its decoder_input_ids, its labels behind the start token (-100, the
    ignored label, as the pad token), or the start token alone."""
    if item.get("decoder_input_ids") is not None:
        return item["decoder_input_ids"].long()
    labels = item.get("labels")
    if labels is None:
        return torch.full((batch, 1), start, dtype=torch.long)
    labels = labels.long()
    shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], 1)
    return shifted.masked_fill(shifted == -100, start if pad is None else pad)


def _prompt_ids(value) -> torch.Tensor:
    """Whisper's ``prompt_ids`` (token ids of earlier text, 1-d: a tensor or a list) as a long tensor."""
    t = torch.as_tensor(value) if isinstance(value, (list, tuple, torch.Tensor, np.ndarray)) else None
    if t is None or t.dim() != 1 or not len(t) or t.is_floating_point() or t.dtype == torch.bool or \
            bool((t < 0).any()):
        raise ValueError(f"prompt_ids must be a 1-d sequence of token ids >= 0 (<|startofprev|> and earlier text), "
                         f"got {value!r}")
    return t.long()


def _ids(value, what: str) -> tuple:
    """A generation config's token id or ids as a tuple of ints (None: none)."""
    if value is None:
        return ()
    values = [value] if _is_int(value) else list(value)
    if not all(_is_int(v) for v in values):     # (a string is no list of ids either)
        raise ValueError(f"{what} must be token ids, got {value!r}")
    return tuple(int(v) for v in values)


@dataclasses.dataclass
class Seq2SeqReport:
    """The compile reports of an encoder-decoder model's two graphs (``slimfx.report.Report`` each)."""
    encoder: object
    decoder: object

    def to_dict(self) -> dict:
        return {"encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict()}

    def __str__(self) -> str:
        return f"== encoder\n{self.encoder}\n\n== decoder step\n{self.decoder}"


# the beam-search options of generate and their defaults, which the generation config replaces (compile_seq2seq_lm)
_BEAM_DEFAULTS = (("num_beams", 1), ("length_penalty", 1.0), ("early_stopping", False), ("num_return_sequences", 1),
                  ("renormalize_logits", False))
# every generate option the generation config gives a default to (bad_words_ids aside: bad_tokens, bad_sequences)
_CONFIG_DEFAULTS = (*_BEAM_DEFAULTS, ("no_repeat_ngram_size", 0), ("repetition_penalty", 1.0),
                    ("encoder_no_repeat_ngram_size", 0))


class CompiledSeq2SeqLM(CompiledCausalLM):
    """The compiled encoder and decoder step of an encoder-decoder model, and the generation loop around them
    (``compile_seq2seq_lm``). ``encoder`` and ``step`` are the two ``CompiledModel``s; prefill, decode and the
    sampling options are ``CompiledCausalLM``'s, over decoder tokens, with the encoded input as the step's
    ``extra`` inputs (``encode``)."""

    def __init__(self, encoder, step, layout, dtype, decoder_start_token_id: int, eos_token_id=None,
                 pad_token_id=None, model_name: Optional[str] = None, position_limit: Optional[int] = None,
                 input_name: str = "input_ids", forced_bos_token_id=None, forced_eos_token_id=None,
                 suppress_tokens=None, begin_suppress_tokens=None, bad_tokens=None, min_length: int = 0,
                 num_beams: int = 1, length_penalty: float = 1.0, early_stopping=False, num_return_sequences: int = 1,
                 renormalize_logits: bool = False, bad_sequences=None, no_repeat_ngram_size: int = 0,
                 repetition_penalty: float = 1.0, encoder_no_repeat_ngram_size: int = 0, whisper=None):
        super().__init__(step, layout, dtype, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         model_name=model_name, position_limit=position_limit)
        self.encoder = encoder
        self.decoder_start_token_id = int(decoder_start_token_id)
        self.input_name = input_name
        self.forced_bos_token_id = _ids(forced_bos_token_id, "forced_bos_token_id")
        self.forced_eos_token_id = _ids(forced_eos_token_id, "forced_eos_token_id")
        self.suppress_tokens = _ids(suppress_tokens, "suppress_tokens")
        self.begin_suppress_tokens = _ids(begin_suppress_tokens, "begin_suppress_tokens")
        self.bad_tokens = _ids(bad_tokens, "bad_tokens")          # bad_words_ids of one token each
        if not _is_int(min_length) or min_length < 0:
            raise ValueError(f"min_length must be an integer >= 0, got {min_length!r}")
        self.min_length = int(min_length)
        beam_options(num_beams, length_penalty, early_stopping, num_return_sequences, renormalize_logits)  # (checked)
        self.num_beams, self.length_penalty = int(num_beams), float(length_penalty)
        self.early_stopping, self.num_return_sequences = bool(early_stopping) if early_stopping != "never" else \
            early_stopping, int(num_return_sequences)
        self.renormalize_logits = bool(renormalize_logits)
        self.bad_sequences = bad_words(bad_sequences)              # bad_words_ids of more than one token
        if any(len(w) < 2 for w in self.bad_sequences):
            raise ValueError(f"bad_sequences must be of 2 or more tokens each (one: bad_tokens), got {bad_sequences!r}")
        self.no_repeat_ngram_size = count(no_repeat_ngram_size, "no_repeat_ngram_size")
        self.encoder_no_repeat_ngram_size = count(encoder_no_repeat_ngram_size, "encoder_no_repeat_ngram_size")
        self.repetition_penalty = penalty(repetition_penalty)
        # Whisper's prompt and timestamp settings (slimfx.whisper.settings), None for other models
        self.whisper = None if whisper is None else whisper_settings_checked(whisper, f"{model_name}: whisper")

    def _options(self) -> dict:
        return dict(eos_token_id=self.eos_token_id or None, pad_token_id=self._pad,
                    model_name=self.model_name, position_limit=self.position_limit, input_name=self.input_name,
                    forced_bos_token_id=self.forced_bos_token_id or None,
                    forced_eos_token_id=self.forced_eos_token_id or None,
                    suppress_tokens=self.suppress_tokens or None,
                    begin_suppress_tokens=self.begin_suppress_tokens or None, bad_tokens=self.bad_tokens or None,
                    min_length=self.min_length, bad_sequences=self.bad_sequences or None, whisper=self.whisper,
                    **self._config_defaults())

    def _config_defaults(self) -> dict:
        return {k: getattr(self, k) for k, _ in _CONFIG_DEFAULTS}

    def with_backend(self, backend: str, backend_options: Optional[dict] = None) -> "CompiledSeq2SeqLM":
        """Both graphs on another backend or with other options (``CompiledModel.with_backend``)."""
        lm = CompiledSeq2SeqLM(self.encoder.with_backend(backend, backend_options),
                               self.step.with_backend(backend, backend_options), self.layout, self.dtype,
                               self.decoder_start_token_id, **self._options())
        lm.decode_tokens, lm.decode_note = self.decode_tokens_on(self.decode_tokens, self.decode_note,
                                                                 self.step.backend, lm.step)
        return lm

    @staticmethod
    def decode_tokens_on(tokens: int, note: str, checked_on: Optional[str], step) -> tuple[int, str]:
        """The decode tokens (and their note) checked on the backend ``checked_on`` (``check_decode_tokens``), for
        ``step``: 1 only on the same backend (checking needs the encoder's output for a real input, which a
        compiled model does not keep), else 2."""
        if tokens == 1 and checked_on != step.backend:
            return 2, (f"2 tokens: 1 was checked on the {checked_on} backend, not on {step.backend}; "
                       f"compile_seq2seq_lm on it checks")
        return tokens, note

    def report(self) -> "Seq2SeqReport":
        """Both graphs' compile reports (``.encoder``, ``.decoder``); printed one after the other."""
        return Seq2SeqReport(self.encoder.report(), self.step.report())

    def _encode_args(self, args: tuple) -> tuple:
        out = self.encoder(args[0], args[1] if len(args) > 1 else None)
        return [(k, v) for k, v in out["cross"]], out["mask"]

    def encode(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> tuple:
        """The decoder step's ``extra`` inputs for ``inputs`` (token ids with their ``attention_mask``, or
        Whisper's features): each decoder layer's cross-attention (keys, values) and the encoder's mask, for
        ``prefill(decoder_ids, extra=lm.encode(ids, mask))`` and ``decode``."""
        return self._encode_args(_encoder_args(self.input_name, inputs, attention_mask))

    def generate(self, inputs: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, *,
                 decoder_input_ids: Optional[torch.Tensor] = None,
                 decoder_attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
                 progress: bool = False, **options) -> torch.Tensor:
        """The decoder's tokens (batch, prompt + up to ``max_new_tokens``), as transformers' ``generate`` returns
        them for an encoder-decoder model: the decoder prompt (``decoder_input_ids``, left-padded with
        ``decoder_attention_mask``; by default ``decoder_start_token_id`` alone, or Whisper's task prompt) and the
        new tokens. ``inputs``: the encoder's (token ids with ``attention_mask``, or Whisper's features), also by the
        model's name for them (``input_ids=``, ``input_features=``: ``lm.generate(**tokenizer(texts, ...))``). The
        sampling options, their order, the end-of-sequence handling, the bans and beam search are
        ``CompiledCausalLM.generate``'s (by default as the generation config sets them: module docstring);
        the generation config's forced and suppressed tokens apply as the module docstring says
        (``forced_bos_token_id`` and the other three may be given here too: None or () for none).

        Whisper (``slimfx.whisper``): ``language`` (a code "fr", a name "french" or a token "<|fr|>"; a list: one per
        input; None: the generation config's, else detected per input), ``task`` ("transcribe" or "translate"),
        ``return_timestamps`` (its timestamp rules; None: the generation config's) and ``prompt_ids`` (earlier text,
        ``<|startofprev|>`` first, put before the task prompt) build the decoder prompt as transformers' Whisper
        ``generate`` does, which returns these tokens with ``force_unique_generate_call=True`` (by default it leaves
        out the prompt and the end-of-sequence token: ``transcribe``). As there, ``num_return_sequences`` repeats
        each input (beam search then gives its best sequence that many times) and sampling runs without beams."""
        from tqdm.auto import tqdm
        inputs = self._given(inputs, options)
        beam_args = {k: options.pop(k, getattr(self, k)) for k, _ in _BEAM_DEFAULTS}
        repeat = 1
        if self.whisper is not None:
            # transformers' Whisper generate repeats each input num_return_sequences times (so beams give the best
            # sequence that many times) and samples without beams
            repeat = beam_args["num_return_sequences"]
            if not _is_int(repeat) or repeat < 1:
                raise ValueError(f"num_return_sequences must be an integer >= 1, got {repeat!r}")
            beam_args["num_return_sequences"] = 1
            t = options.get("temperature")
            if isinstance(t, (int, float)) and t > 0:
                beam_args["num_beams"] = 1
            elif repeat > 1 and beam_args["num_beams"] == 1:
                raise ValueError(f"num_return_sequences={repeat} needs beams or sampling (greedy decoding gives one "
                                 f"sequence)")
        beams = beam_options(*(beam_args[k] for k, _ in _BEAM_DEFAULTS))
        setup = self._setup(inputs, attention_mask, decoder_input_ids, decoder_attention_mask, max_new_tokens,
                            repeat=repeat, **options)
        dec = setup["input_ids"]
        if beams is not None:
            new = self._stream(**setup, beams=dict(beams, progress=progress))
            return torch.cat([dec.long().repeat_interleave(beams["num_return_sequences"], 0), new], 1)
        new = [tok[:, None] for tok in tqdm(self._stream(**setup), total=max_new_tokens, desc="generate",
                                            disable=not progress, leave=False)]
        return torch.cat([dec.long(), *new], 1)

    def transcribe(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                   language=None, task=None, return_timestamps: Optional[bool] = None, prompt_ids=None,
                   max_new_tokens: Optional[int] = None, return_segments: bool = False, progress: bool = False,
                   **options):
        """Whisper: what transformers' Whisper ``generate`` returns by default, for audio of any length: each
        input's tokens (text, and timestamps where asked for or past one window; the task prompt and the
        end-of-sequence token left out; right-padded with the pad token), with ``return_segments`` also each
        input's segments (``start`` and ``end`` in seconds, ``tokens``).
        Audio longer than one window (30 s: ``attention_mask``, (batch, frames), says how long each input is) is
        decoded window by window with timestamps, each window from the last timestamp the previous one completed,
        as transformers' long-form algorithm does (without its temperature fallback, no-speech detection and
        conditioning on the previous window's text). ``language``, ``task``, ``return_timestamps`` and
        ``prompt_ids`` are ``generate``'s, the language detected on the first window; ``max_new_tokens`` per
        window (None: as many as the generation config's ``max_length`` allows, 20 without one, as transformers
        counts them); the other options are ``generate``'s (sampling, beams) for each window
        (``slimfx.whisper.transcribe``)."""
        return whisper.transcribe(self, input_features, attention_mask, language=language, task=task,
                                  return_timestamps=return_timestamps, prompt_ids=prompt_ids,
                                  max_new_tokens=max_new_tokens, return_segments=return_segments, progress=progress,
                                  **options)

    def _given(self, inputs, options: dict):
        """``inputs``, or the model's input given by its name among ``options`` (taken out of them)."""
        named = options.pop(self.input_name, None)
        if inputs is None and named is None:
            raise TypeError(f"{self.model_name}: generate needs the encoder's input ({self.input_name})")
        if inputs is not None and named is not None:
            raise TypeError(f"{self.model_name}: the encoder's input given twice (inputs and {self.input_name}=)")
        return inputs if inputs is not None else named

    _unset = object()

    def stream(self, inputs: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, *,
               decoder_input_ids: Optional[torch.Tensor] = None,
               decoder_attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 32, **options):
        """``generate`` one token at a time: an iterator of each step's new tokens (batch,), greedy or sampled
        (beam search, which chooses its tokens at the end, is ``generate``'s alone)."""
        beams = [k for k, _ in _BEAM_DEFAULTS if k in options]
        if beams:
            raise TypeError(f"{self.model_name}: stream yields each step's token as it is chosen, and beam search "
                            f"chooses them at the end: {', '.join(beams)} are generate's")
        inputs = self._given(inputs, options)
        return self._stream(**self._setup(inputs, attention_mask, decoder_input_ids, decoder_attention_mask,
                                          max_new_tokens, **options))

    def _setup(self, inputs, attention_mask, dec, decoder_attention_mask, max_new_tokens,
               forced_bos_token_id=_unset, forced_eos_token_id=_unset, suppress_tokens=_unset,
               begin_suppress_tokens=_unset, language=None, task=None, return_timestamps=None, prompt_ids=None,
               repeat: int = 1, _detect=None, **options) -> dict:
        """``_stream``'s arguments for ``stream``'s: the decoder prompt (``dec``, else the start token or Whisper's
        task prompt), the encoder's input as its ``extra`` (encoded once the options are checked), the generation
        config's ``rules`` and Whisper's timestamp rules as its ``processor``; ``repeat``: each input and its prompt
        that many times (Whisper's ``num_return_sequences``); ``_detect``: (column, language ids, the encoded input
        to detect on or None) of ``dec`` to detect the language into (``_detected``: ``transcribe``'s first
        window)."""
        unset = CompiledSeq2SeqLM._unset
        bos = self.forced_bos_token_id if forced_bos_token_id is unset else _ids(forced_bos_token_id,
                                                                                  "forced_bos_token_id")
        eos = self.forced_eos_token_id if forced_eos_token_id is unset else _ids(forced_eos_token_id,
                                                                                  "forced_eos_token_id")
        suppress = self.suppress_tokens if suppress_tokens is unset else _ids(suppress_tokens, "suppress_tokens")
        begin = self.begin_suppress_tokens if begin_suppress_tokens is unset else _ids(begin_suppress_tokens,
                                                                                        "begin_suppress_tokens")
        asked = {k: v for k, v in (("language", language), ("task", task), ("return_timestamps", return_timestamps),
                                   ("prompt_ids", prompt_ids)) if v is not None}
        if asked and self.whisper is None:
            raise TypeError(f"{self.model_name}: {', '.join(asked)}: Whisper's generate options, and this model has no "
                            f"Whisper settings (compiled from another model, or saved by a slimfx before them: "
                            f"compile it again)")
        if dec is not None and set(asked) - {"return_timestamps"}:
            raise ValueError(f"{self.model_name}: decoder_input_ids is the whole decoder prompt, which language, task "
                             f"and prompt_ids would build: give either")
        prev = None if prompt_ids is None else _prompt_ids(prompt_ids)
        if dec is None and self.whisper is None:
            b = inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else 1
            dec = torch.full((b, 1), self.decoder_start_token_id, dtype=torch.long,
                             device=getattr(inputs, "device", None))
        if dec is not None:
            _prompt(dec, decoder_attention_mask)                   # (bad decoder prompts: its errors, first)
        elif decoder_attention_mask is not None:
            raise ValueError(f"{self.model_name}: decoder_attention_mask is decoder_input_ids' mask, and none were "
                             f"given")
        args = _encoder_args(self.input_name, inputs, attention_mask)
        if dec is not None and args[0].shape[0] != dec.shape[0]:
            raise ValueError(f"{self.input_name} holds {args[0].shape[0]} inputs, decoder_input_ids "
                             f"{dec.shape[0]} prompts")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:     # (before the encoder runs)
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        ends = options.get("eos_token_id")
        ends = self.eos_token_id if ends is None else _ids(ends, "eos_token_id")
        extra = functools.partial(self._encode_args, args)
        stamps = None
        if self.whisper is not None:
            window = self.whisper["num_segment_frames"]
            if args[0].shape[-1] > window:
                raise ValueError(f"{self.model_name}: {self.input_name} of {args[0].shape[-1]} frames are longer "
                                 f"than one window ({window} frames): transcribe() decodes them window by window")
            if return_timestamps is None:
                return_timestamps = bool(self.whisper.get("return_timestamps"))
            if not isinstance(return_timestamps, bool):
                raise ValueError(f"return_timestamps must be True or False, got {return_timestamps!r}")
            if return_timestamps and not ends:
                raise ValueError(f"{self.model_name}: return_timestamps needs an end-of-sequence id (the tokens "
                                 f"below it are text)")
            detect = _detect
            if dec is None:
                dec, detect = self._task_prompt(args[0].shape[0], args[0].device, language, task, return_timestamps,
                                                prev)
            limit = self.whisper["max_target_positions"]
            if dec.shape[-1] + max_new_tokens > limit:             # (transformers' check, a token stricter)
                raise ValueError(f"{self.model_name}: a decoder prompt of {dec.shape[-1]} tokens and "
                                 f"{max_new_tokens} new ones pass its {limit} positions (max_target_positions)")
            if return_timestamps:
                stamps = whisper.timestamp_rules(self.whisper, ends[0], dec.shape[-1])
            if repeat > 1:
                dec = dec.repeat_interleave(repeat, 0)
                if decoder_attention_mask is not None:
                    decoder_attention_mask = decoder_attention_mask.repeat_interleave(repeat, 0)
                args = tuple(a.repeat_interleave(repeat, 0) for a in args)
                extra = functools.partial(self._encode_args, args)
            if detect is not None:                                 # once the options are checked (_stream)
                extra = functools.partial(self._detected, dec, *detect, extra)
        length = dec.shape[-1]
        first_forced = bos if length == 1 else ()                  # transformers: at a decoder length of 1
        begin_at = 1 if first_forced else 0                        # (after the forced one, as transformers)
        for key, off in _CONFIG_DEFAULTS[len(_BEAM_DEFAULTS):]:   # (the beam options: generate's)
            options.setdefault(key, getattr(self, key))
            if options[key] is None:                               # (None: off, as transformers reads it)
                options[key] = off
        n = count(options.pop("encoder_no_repeat_ngram_size"), "encoder_no_repeat_ngram_size")
        encoder_bans = (n, args[0]) if n and self.input_name == "input_ids" else None   # (as transformers: ids only)
        words = options.pop("bad_words_ids", unset)
        words = None if words is unset else bad_words(words)
        singles, sequences = (self.bad_tokens, self.bad_sequences) if words is None else (
            tuple(w[0] for w in words if len(w) == 1), tuple(w for w in words if len(w) > 1))
        if options.get("min_new_tokens", 0) is None:               # (transformers' "unset")
            del options["min_new_tokens"]
        # transformers: min_new_tokens given replaces min_length (by prompt + min_new_tokens, what it bans then)
        least = 0 if "min_new_tokens" in options else self.min_length
        bad = [t for t in singles if t not in ends]                # (transformers drops a bad word [eos])
        both = sorted(set(first_forced) & set(suppress))          # (a bad word: forced all the same, as there)
        if both:                                                   # (transformers refuses it so)
            raise ValueError(f"forced_bos_token_id {list(first_forced)} is among the suppressed tokens {both}: the "
                             f"first new token could be none")

        def rules(i):
            ban = (*suppress, *bad, *(begin if i == begin_at else ()),
                   *(ends if length + i < least else ()))
            if i == max_new_tokens - 1 and eos:                    # (transformers' EOS processor runs last)
                return ban, eos
            return ban, (first_forced if i == 0 else ())
        return dict(input_ids=dec, attention_mask=decoder_attention_mask, max_new_tokens=max_new_tokens,
                    extra=extra, rules=rules, bad_words_ids=[list(w) for w in sequences] or None,
                    encoder_bans=encoder_bans, processor=stamps, **options)

    def _task_prompt(self, b: int, dev, language, task, timestamps: bool, prev) -> tuple:
        """Whisper's decoder prompt for ``b`` inputs (``slimfx.whisper.init_tokens``: ``prev`` in front, the start
        token, language, task, ``<|notimestamps|>``) and, where the language is to be detected, (its column, the
        language token ids, None: detected on the step's own input) for ``_detected``, else None; until then that
        column holds the start token."""
        asked = []

        def detect(ids):
            asked.append(ids)
            return [self.decoder_start_token_id] * b
        rows = whisper.init_tokens(self.whisper, self.decoder_start_token_id, b, language, task, timestamps,
                                   detect, self.model_name)
        dec = torch.tensor(rows, dtype=torch.long, device=dev)
        if prev is not None:
            dec = torch.cat([prev.to(dev)[None].expand(b, -1), dec], 1)
        return dec, ((0 if prev is None else len(prev)) + 1, asked[0], None) if asked else None

    def _detected(self, dec: torch.Tensor, column: int, ids, source, encode) -> tuple:
        """The step's ``extra`` inputs (``encode()``), and each row's detected language written into column
        ``column`` of ``dec``: the likeliest of the language tokens ``ids`` after the start token alone
        (transformers' ``detect_language``; ties: the lowest id), given the encoded input ``source()`` (None: the
        step's own)."""
        extra = encode()
        start = torch.full((dec.shape[0], 1), self.decoder_start_token_id, dtype=torch.long, device=dec.device)
        logits, _ = self.prefill(start, extra=extra if source is None else source())
        ids = torch.tensor(ids, device=logits.device)
        dec[:, column] = ids[logits[:, -1, ids].argmax(-1)].to(dec.device)
        return extra

    def save(self, path) -> pathlib.Path:
        """The encoder and the step (``CompiledModel.save``) in the folders ``encoder/`` and ``decoder/`` of
        ``path``, then seq2seq_lm.json naming both saves; ``slimfx.load(path)`` gives back a CompiledSeq2SeqLM.
        The json goes last, in one replace: a save interrupted before leaves the previous one's json, whose save
        ids the new folders no longer match, so load refuses it instead of pairing two saves' graphs."""
        from .io import GRAPH_FILE, TENSOR_FILE, _save_id, save
        from .lm import LM_FILE
        path = pathlib.Path(path)
        data = {"layout": self.layout, "dtype": str(self.dtype).replace("torch.", ""), "model": self.model_name,
                "decoder_start_token_id": self.decoder_start_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self._pad, "position_limit": self.position_limit,
                "input_name": self.input_name, "forced_bos_token_id": list(self.forced_bos_token_id),
                "forced_eos_token_id": list(self.forced_eos_token_id), "suppress_tokens": list(self.suppress_tokens),
                "begin_suppress_tokens": list(self.begin_suppress_tokens), "bad_tokens": list(self.bad_tokens),
                "min_length": self.min_length, "bad_sequences": [list(w) for w in self.bad_sequences],
                "whisper": self.whisper, **self._config_defaults(), "decode_tokens": self.decode_tokens,
                "decode_note": self.decode_note, "decode_checked_on": self.step.backend}
        json.dumps(data)                               # (fails before anything is written)
        ids = {}
        for part, cm in (("encoder", self.encoder), ("decoder", self.step)):
            save(cm, path / part)
            ids[part] = _save_id(path / part / TENSOR_FILE)
        text = json.dumps({**data, "saves": ids}, indent=1)
        tmp = path / (SEQ2SEQ_FILE + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        for stale in (GRAPH_FILE, TENSOR_FILE, LM_FILE):       # a model saved here before, at the top
            (path / stale).unlink(missing_ok=True)
        os.replace(tmp, path / SEQ2SEQ_FILE)
        return path

    @classmethod
    def from_saved(cls, path, backend: Optional[str] = None,
                   backend_options: Optional[dict] = None) -> "CompiledSeq2SeqLM":
        """The model ``save`` wrote to ``path``, its two graphs lowered to ``backend`` (default: the one each was
        saved with); a damaged, edited or half-written save is refused, naming what is wrong."""
        from .io import TENSOR_FILE, _save_id, load
        from .ir.serialize import FormatError, read_json
        path = pathlib.Path(path)
        where = f"slimfx.load({str(path)!r}): {SEQ2SEQ_FILE}"
        data = read_json(path / SEQ2SEQ_FILE, where, ("layout", "dtype", "decoder_start_token_id", "saves"))
        saves = data["saves"]
        parts = {}
        for part in ("encoder", "decoder"):
            folder = path / part
            if not isinstance(saves, dict) or not (folder / TENSOR_FILE).is_file():
                raise FormatError(f"{where} names a save of the {part} that the folder {folder} does not hold; "
                                  f"save the model again")
            if _save_id(folder / TENSOR_FILE) != saves.get(part):
                raise FormatError(f"{where} (save {saves.get(part)}) and {folder} (save "
                                  f"{_save_id(folder / TENSOR_FILE)}) were written by different saves: a save into "
                                  f"this folder was interrupted; save the model again")
            parts[part] = load(folder, backend, backend_options)
        dtype, layout = saved_layout(data, where)
        step = parts["decoder"]
        leaves = [v for _, v in step._signature.leaves]     # (ids, positions, mask, *cache, logits_at, *cross, mask)
        cache = leaves[3:3 + 2 * len(layout)]
        at = leaves[3 + 2 * len(layout)] if len(leaves) > 3 + 2 * len(layout) else None
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in cache) or \
                not (isinstance(at, torch.Tensor) and at.dim() == 1):        # (logits_at follows the cache)
            raise FormatError(f"{where}: layout has {len(layout)} layers, the decoder graph's cache another number")
        check_cache(layout, dtype, cache, where, "the decoder graph")
        options = {}
        for key in ("eos_token_id", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                    "begin_suppress_tokens", "bad_tokens"):
            try:
                options[key] = _ids(data.get(key), key) or None
            except (TypeError, ValueError) as e:
                raise FormatError(f"{where}: {e}") from e
        for key in ("decoder_start_token_id", "pad_token_id", "position_limit", "min_length"):
            value = data.get(key)
            if not (value is None and key != "decoder_start_token_id" or _is_int(value) and value >= 0):
                either = "" if key == "decoder_start_token_id" else " or null"
                raise FormatError(f"{where}: {key} must be an integer >= 0{either}, got {value!r}")
        defaults = {k: data.get(k, d) for k, d in _CONFIG_DEFAULTS}
        try:
            beam_options(*(defaults[k] for k, _ in _BEAM_DEFAULTS))
            bad_words(data.get("bad_sequences"))
            if data.get("whisper") is not None:
                whisper_settings_checked(data["whisper"], "whisper")
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from e
        name = data.get("input_name", "input_ids")
        first = parts["encoder"]._signature.leaves[0][1]
        floats = getattr(first, "dtype", torch.float32).is_floating_point
        if not isinstance(name, str) or (name == "input_ids") == floats:
            raise FormatError(f"{where}: input_name {name!r} does not name the encoder graph's input, "
                              f"{getattr(first, 'dtype', None)} (input_ids: token ids; a float input by another name)")
        fed = data.get("decode_tokens", 2)            # (absent from files saved before: 2)
        if fed not in (1, 2) or isinstance(fed, bool):
            raise FormatError(f"{where}: decode_tokens must be 1 or 2, got {fed!r}")
        try:
            lm = cls(parts["encoder"], step, layout, dtype, data["decoder_start_token_id"],
                     pad_token_id=data.get("pad_token_id"), model_name=data.get("model"),
                     position_limit=data.get("position_limit"), input_name=name,
                     min_length=data.get("min_length") or 0, bad_sequences=data.get("bad_sequences"),
                     whisper=data.get("whisper"), **defaults, **options)
        except ValueError as e:                        # (a generation option out of its range)
            raise FormatError(f"{where}: {e}") from e
        note = data.get("decode_note") if isinstance(data.get("decode_note"), str) else "given"
        lm.decode_tokens, lm.decode_note = cls.decode_tokens_on(fed, note, data.get("decode_checked_on"), step)
        return lm

    def __repr__(self):
        return f"CompiledSeq2SeqLM({self.encoder!r}, {self.step!r}, decoder layers={len(self.layout)})"


class _EagerSeq2SeqLM(CompiledSeq2SeqLM, _EagerCausalLM):
    """The generation loop around the uncompiled step modules (``check_positions``, calibration): the modules
    called as they are (``_EagerCausalLM._run``)."""
