"""Text generation with a KV cache from a compiled causal language model.

    lm = slimfx.compile_causal_lm(model, passes=[P.Quantize(weights="int8", activations="dynamic-per-token")],
                                  calibration=[ids, ...], backend="numpy")
    out = lm.generate(ids, max_new_tokens=32)            # greedy; temperature/top_k/top_p sample
    lm.save("smollm2-w8a8"); lm = slimfx.load("smollm2-w8a8", backend="triton")

What slimfx compiles is the model's *step*: ``(input_ids, position_ids, attention_mask, cache, logits_at) ->
(logits, new cache)`` with the cache as plain tensors, one (keys, values) pair per layer of shape (batch, kv heads,
length, head dim; keys and values may differ in head dim, as in DeepSeek's latent attention). One graph serves the prompt (prefill) and every new token (decode), with batch, sequence
and cache length dynamic, so the passes (and their calibration) run once. Two facts of torch.export shape the
calls ``generate`` makes:
- a sequence of 1 token is specialized (sdpa's causal flag branches on it), so the step is captured for 2 or
  more. A decode step feeds the new token alone where ``compile_causal_lm`` found that the captured step gives
  the same logits on 1 token as on 2 (``check_decode_tokens``: run outside the range export gave it, the graph
  is the general one, and holds for 1 token in every family the tests generate with); otherwise 2 tokens: the
  previous one again, masked (the new token reads its keys and values from its cache slot, as written by the step
  that fed it; only the new token's slot is written), and the new one. ``CompiledCausalLM.decode_tokens`` says
  which, ``decode_note`` why. With 1 token a step, SmolLM2 fp32 generated 1.24x as many tokens/s at batch 1
  on the numpy backend (README);
- an empty cache is specialized too, so the cache always holds one masked slot (zeros) before the first
  token: the prompt is a step with a cache of length 1, attention masked there.
Prompts of different lengths are left-padded (``attention_mask`` 0 on the padding); positions count only
real tokens, as ``transformers``' ``generate`` does. A model whose forward takes no ``position_ids`` must derive
them from the attention mask (BLOOM's ALiBi; MPT's, which counts cache slots in transformers, is computed so
while the step runs: ``_mpt_alibi``); ``compile_causal_lm`` checks that on one eager generation and refuses the
model otherwise (BART: positions from the cache length would count the masked slots).

During decoding the cache is a buffer of slots, a power of two from ``min_cache``, the unfilled ones masked:
a decode step reads the whole buffer and returns it with the fed tokens' keys and values appended, of which
``decode`` writes the new token's back into its slot. So every decode step of a buffer size has the same shapes,
which is what ``backend_options={"cuda_graphs": True}`` needs (one capture per buffer size and batch; the prompt runs
without a graph), at the price of attending over masked slots (at most half the buffer).

Sliding-window attention (Gemma-2, Gemma-3, Mistral, Qwen2 with ``use_sliding_window``, Phi-3 with a window,
Cohere-2, GPT-OSS, GPT-Neo's local layers) is exact at any length. The step rebuilds the cache as
``DynamicCache(ddp_cache_data=...)`` without the config, so every layer is a full one, keeping every slot, and the
sliding layers' mask is built over real *positions* (``_sliding_by_position``; GPT-Neo's local band in its own
attention, ``_gpt_neo_local``): key slot k is seen from query slot q when k <= q, k is unmasked and
pos(q) - pos(k) < window, pos counting the unmasked slots. transformers masks q - k < window over slots, in which a
sequence's real tokens lie side by side after its left padding: the same keys. Slimfx's decode buffer puts masked
slots between the tokens (the unfilled ones, the re-fed token's copy), which the slots would count and positions do
not. So generation matches transformers' sliding cache (the last window - 1 tokens kept) past the window, though it
keeps and reads every slot. Where a prompt's mask holds a gap (padding after a token) positions and slots differ:
such a prompt is refused once the sequence would pass the window (``gap_limit``; MPT's ALiBi by position: at
any length). A window the step applies over
slots (``CompiledCausalLM.sliding_window``: steps saved before the window went by position, whose causal_lm.json
names it, or attention the replacements do not reach, such as flash attention or a two-sided window) is exact only
while a step sees at most ``window`` slots (the window then excludes nothing, as it excludes nothing in the model,
whose tokens are fewer), so the buffer grows to ``window - 2`` slots at most, and ``generate`` refuses a prompt of
n tokens (padding included) with more than ``window - 2 - n`` new ones (or 1, which comes from the prompt alone)
before its first step; ``decode`` refuses a step past the window itself.

Long-context Phi-3 (``rope_type="longrope"``) rotates with short factors up to ``original_max_position_embeddings``
tokens and long ones past it, chosen per call; transformers' ``generate`` drops the cache at the step that crosses
that length and runs the whole sequence with the long factors, and so does ``decode`` (once, a prefill-sized step).
Dynamic NTK scaling (``rope_type="dynamic"``) and caches of their own (MiniMax) are refused (``refuse_dynamic_rope``,
``cache_layout``). While the step runs, a few functions of transformers are replaced by ones that give the same
values in a form export and every backend take (``replacements``): Falcon's ALiBi without bfloat16 tensors,
DeepSeek's key expansion without the copy whose check fixed the batch at >= 2.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import pathlib
import sys
import time
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch.export import Dim

from . import ir
from .beam import options as beam_options
from .quant.numerics import OneTorchThread

LM_FILE = "causal_lm.json"


def _cache_kw(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by (transformers renamed it in 5.2x)."""
    params = inspect.signature(model.forward).parameters
    for kw in ("cache", "past_key_values"):
        if kw in params:
            return kw
    raise TypeError(f"{type(model).__name__}.forward takes no KV cache (no 'cache' or 'past_key_values' "
                    f"argument): compile_causal_lm needs a Hugging Face causal LM")


def share_children(step: nn.Module, model: nn.Module, wraps: str) -> None:
    """Make ``step`` hold ``model``'s children, so parameter names stay the model's (``model.layers.0.mlp.up_proj``),
    and keep ``model`` itself beside them to call; ``wraps`` ends the error for parameters outside a submodule."""
    for name, child in model.named_children():
        step.add_module(name, child)
    ours = dict(step.named_parameters())
    missing = [n for n, _ in model.named_parameters() if n not in ours]
    if missing:
        raise TypeError(f"{type(model).__name__}: parameters {missing[:3]} live on the model itself, not in a "
                        f"submodule; {wraps}")
    object.__setattr__(step, "_model", model)      # not a submodule: its children are step's already
    step.training = model.training                 # a new Module would say training mode


class CausalLMStep(nn.Module):
    """One generation step of ``model`` with the cache as plain tensors (what ``compile_causal_lm`` captures).

    forward(input_ids (B, S), position_ids (B, S), attention_mask (B, P + S), cache [(k, v)] * layers,
            each (B, kv heads, P, head dim), logits_at (K,) positions in 0..S-1)
        -> {"logits": (B, K, vocab), "cache": [(k, v)] * layers, P + S long}
    ``logits_at`` picks the positions whose logits are computed (transformers' ``logits_to_keep``): all of
    them for calibration and distillation, the last one when generating (a long prompt's (S, vocab) logits
    are neither computed nor stored). It shares the model's submodules (parameter names stay the model's:
    ``model.layers.0.mlp.up_proj``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        share_children(self, model, "compile_causal_lm wraps Hugging Face causal LMs")
        params = inspect.signature(model.forward).parameters
        self._kw = _cache_kw(model)
        self._keeps = "logits_to_keep" in params
        # without a position_ids argument the model derives positions itself (BLOOM: from the attention mask);
        # compile_causal_lm checks that they still ignore masked cache slots (check_masked_slots)
        self.takes_positions = "position_ids" in params
        # + the sliding-window mask and MPT's ALiBi over real positions, which the decode buffer's masked slots
        # need; they read the step's attention mask from here
        self._call = _StepCall()       # (not a dict: export restores a module's containers as copies)
        self._replacements = (replacements(model) + _sliding_replacements(model) + _mpt_replacements(model, self._call)
                              + _gpt_neo_replacements(model, self._call))

    @property
    def windows_by_position(self) -> bool:
        """The model's sliding-window masks (GPT-Neo's local band) were built over real positions
        (``_sliding_by_position``, ``_gpt_neo_local``) in a call of the step (the capture's), so its decode steps
        are exact past the window."""
        return any(getattr(fn, "calls", 0) for _, _, fn in self._replacements)

    def gap_limit(self, window: Optional[int]) -> Optional[int]:
        """The most slots (a prompt and the tokens fed after it) a sequence whose prompt mask holds a gap (padding
        after a token) may span, where the step counts real positions and transformers cache slots: 0 with
        MPT's ALiBi by position (a gap shifts it at any length), the model's smallest ``window`` with windows by
        position (within it a window excludes nothing either way), else None (no limit)."""
        if any(name == "build_mpt_alibi_tensor" for _, name, _ in self._replacements):
            return 0
        return window if self.windows_by_position else None

    def forward(self, input_ids, position_ids, attention_mask, cache, logits_at):
        from transformers import DynamicCache
        dc = DynamicCache(ddp_cache_data=[(k, v) for k, v in cache])
        keep = {"logits_to_keep": logits_at} if self._keeps else {}
        if self.takes_positions:
            keep["position_ids"] = position_ids
        self._call.attention_mask = attention_mask
        try:
            with _replaced(self._replacements):
                out = self._model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                  **{self._kw: dc}, **keep)
        finally:
            self._call.attention_mask = None          # (a traced one must not outlive its trace)
        logits = out.logits if self._keeps else out.logits[:, logits_at]
        new = getattr(out, self._kw)
        return {"logits": logits, "cache": [(layer.keys, layer.values) for layer in new.layers]}


# --- functions of transformers that the step calls in a form of its own: the same values, bit for bit ---------

def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16's 8 significant bits (to nearest, ties to even), kept in float32:
    Veltkamp's split at 16 bits, exact for finite values below 2**111 (equal to torch's ``x.bfloat16().float()``
    on every float32 of whole binades). Each op must round on its own: an FMA fusing the first two breaks it
    (no backend fuses them: numpy and torch run ops one by one)."""
    t = x * 65537.0
    return t + (x - t)


def _falcon_alibi(slopes: torch.Tensor):
    """transformers' Falcon ``build_alibi_tensor`` with no bfloat16 tensor, which the numpy backend cannot hold.
    transformers rounds the slopes to bfloat16 and multiplies them by the positions (int64, so cast to bfloat16)
    in bfloat16; ``slopes`` are those rounded slopes as transformers' own function gives them (computed once,
    outside the trace), and the position's and the product's rounding happen in float32 (the product of two
    8-bit significands is exact there): the same ALiBi bias, bit for bit."""
    def build_alibi_tensor(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        batch, length = attention_mask.shape
        positions = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
        product = slopes.to(attention_mask.device)[:, None] * _round_bf16(positions.float())
        return _round_bf16(product).reshape(batch * num_heads, 1, length).to(dtype)
    return build_alibi_tensor


def _expand_kv(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's ``expand_kv`` (multi-head latent attention) with ``torch.cat`` where transformers copies into two
    slices of an empty tensor: the same keys and values. export checks such a copy for memory overlap, and that
    check guarded the batch >= 2 (from a batch-2 example; <= 2 from a batch of 1): a single prompt was refused."""
    batch, _, length, _ = kv_nope.shape
    kv = self.kv_b_proj(kv_nope).view(batch, length, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
    k_nope, values = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1), values


def _longrope_cells(forward) -> Optional[dict]:
    """The closure cells of ``forward``'s ``dynamic_rope_update`` wrapper (under any decorators above it,
    torch.no_grad), by name, when its longrope update branches in Python on ``max(position_ids)``, which export
    cannot capture (transformers before 5.25); else None."""
    while forward is not None:
        code = getattr(forward, "__code__", None)
        cells = dict(zip(code.co_freevars if code else (), getattr(forward, "__closure__", None) or ()))
        if "longrope_frequency_update" in cells and "rope_forward" in cells:
            update = cells["longrope_frequency_update"].cell_contents
            return cells if "where" not in update.__code__.co_names else None
        forward = getattr(forward, "__wrapped__", None)
    return None


def _rope_name(name: str, layer_type) -> str:
    """A rotary embedding's attribute for one layer type (``sliding_inv_freq``), or its only one (``inv_freq``)."""
    return name if layer_type is None else f"{layer_type}_{name}"


def _rope_params(m: nn.Module, layer_type) -> dict:
    return m.config.rope_parameters if layer_type is None else m.config.rope_parameters[layer_type]


def _longrope(long: dict, rope_forward):
    """transformers' longrope update and rotary forward for a ``dynamic_rope_update`` whose update branches in
    Python: the update picks, with ``torch.where``, the long frequencies (``long``, computed by transformers' own
    init function outside the trace, per module and layer type) when the longest sequence passes
    ``original_max_position_embeddings``, else the original ones, and the forward rotates with them in place of
    the ``inv_freq`` buffer, where transformers' branch puts one or the other (the same frequencies; the buffer
    itself is left as it was: export's run_decompositions on torch 2.11 fails on a graph that writes it)."""
    chosen = {}

    def longrope_frequency_update(self, position_ids, device, layer_type=None):
        original = getattr(self, _rope_name("original_inv_freq", layer_type))
        longer = torch.max(position_ids) + 1 > _rope_params(self, layer_type)["original_max_position_embeddings"]
        chosen[id(self), layer_type] = torch.where(longer, long[id(self), layer_type].to(device), original.to(device))

    def forward(self, x, position_ids, **kwargs):
        name = _rope_name("inv_freq", kwargs.get("layer_type"))
        frequencies = chosen.pop((id(self), kwargs.get("layer_type")), None)
        if frequencies is None:                   # another rope type
            return rope_forward(self, x, position_ids, **kwargs)
        kept = self._buffers[name]
        self._buffers[name] = frequencies
        try:
            return rope_forward(self, x, position_ids, **kwargs)
        finally:
            self._buffers[name] = kept
    return longrope_frequency_update, forward


def _longrope_replacements(model: nn.Module) -> list:
    """(cell, "cell_contents", function) for the longrope update and the rotary forward in the
    ``dynamic_rope_update`` wrapper of each rotary embedding class of ``model`` whose update branches in Python
    (transformers before 5.25): ``_longrope``."""
    long, wrappers = {}, {}
    for m in model.modules():
        cells = _longrope_cells(getattr(type(m), "forward", None))
        if cells is None:
            continue
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        types = m.rope_type.items() if isinstance(m.rope_type, dict) else [(None, m.rope_type)]
        for layer_type, rope_type in types:
            if rope_type == "longrope":
                device = getattr(m, _rope_name("inv_freq", layer_type)).device
                with torch.no_grad():
                    long[id(m), layer_type] = ROPE_INIT_FUNCTIONS[rope_type](
                        m.config, device, seq_len=_rope_params(m, layer_type)["original_max_position_embeddings"] + 1,
                        **({} if layer_type is None else {"layer_type": layer_type}))[0]
                wrappers[id(cells["rope_forward"])] = cells
    out = []
    for cells in wrappers.values():
        update, forward = _longrope(long, cells["rope_forward"].cell_contents)
        out += [(cells["longrope_frequency_update"], "cell_contents", update),
                (cells["rope_forward"], "cell_contents", forward)]
    return out


def _sliding_by_position(full, original):
    """transformers' ``create_sliding_window_causal_mask`` (``original``) with the window over real positions, not
    cache slots: ``full`` (``create_causal_mask``, the same arguments: causal over slots, padding masked) and key
    slot k seen from query slot q only when pos(q) - pos(k) < window, pos counting the unmasked slots before and at
    a slot less one. transformers masks ``q - k < window`` over slots, where a sequence's real tokens lie side by
    side after its left padding: the same keys. Slimfx's decode buffer puts masked slots between them (unfilled
    ones, the re-fed token's copy), which the slots would count and the positions do not, so generation is exact
    at any length. The masked re-fed token's query takes its copy's position and sees that copy: no row is left
    empty that was not. Without a 2-d attention mask, or where the mask is not a tensor (flash or flex attention),
    ``original``'s mask; ``.calls`` counts those built by position (``CausalLMStep.windows_by_position``)."""
    signature = inspect.signature(original)

    def create_sliding_window_causal_mask(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        config, padding = bound["config"], bound.get("attention_mask")
        if not (isinstance(padding, torch.Tensor) and padding.dim() == 2) or config.sliding_window is None \
                or not getattr(config, "is_causal", True):         # (a two-sided window: transformers' own)
            return original(*args, **kwargs)
        mask = full(*args, **kwargs)
        if not isinstance(mask, torch.Tensor):
            return original(*args, **kwargs)
        create_sliding_window_causal_mask.calls += 1
        positions = padding.long().cumsum(-1) - 1                    # (batch, slots); the queries are the last ones
        queries = bound["inputs_embeds"].shape[1]
        # (narrow, not [-queries:]: its length is plainly the queries' for export, where a slice's is a Max())
        last = positions.narrow(1, positions.shape[1] - queries, queries)
        near = (last[:, :, None] - positions[:, None, :] < int(config.sliding_window))[:, None]
        if mask.dtype == torch.bool:
            return mask & near
        return mask.masked_fill(~near, torch.finfo(mask.dtype).min)   # eager attention's additive mask
    create_sliding_window_causal_mask.calls = 0
    return create_sliding_window_causal_mask


def _sliding_replacements(model: nn.Module) -> list:
    """(module, "create_sliding_window_causal_mask", ``_sliding_by_position``) for each modeling module of
    ``model``'s classes that calls transformers' own, and for masking_utils itself and its table of mask functions
    by layer type: what ``CausalLMStep`` replaces besides ``replacements`` (one function, counting its calls)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return []
    original = masking_utils.create_sliding_window_causal_mask
    modules = {type(m).__module__: sys.modules.get(type(m).__module__) for m in model.modules()}
    users = [module for _, module in sorted(modules.items())
             if getattr(module, "create_sliding_window_causal_mask", None) is original]
    if not users:
        return []
    by_position = _sliding_by_position(masking_utils.create_causal_mask, original)
    # and where transformers' create_masks_for_generate finds it (Gemma-3's multimodal model builds its masks so)
    table = getattr(masking_utils, "LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING", {})
    return [(module, "create_sliding_window_causal_mask", by_position)
            for module in dict.fromkeys(users + [masking_utils])] + \
        ([(table, "sliding_attention", by_position)] if table.get("sliding_attention") is original else [])


class _StepCall:
    """What a replacement reads from the step's current call (``CausalLMStep.forward`` sets it)."""
    attention_mask: Optional[torch.Tensor] = None


def _mpt_alibi(original, call: _StepCall):
    """MPT's ``build_mpt_alibi_tensor`` method over real positions, not cache slots. transformers biases key slot
    k by slope * (k - (L - 1)) for every query (softmax is the same under a shift per query row, so that is
    ALiBi's -slope * (q - k)), from a table of ``max_seq_len`` slots sliced to the last L. Here k's real position
    stands for k: the unmasked slots up to k, counted in the row that has the most, less those up to the last slot
    (the rows' real tokens differ only by their left padding, which shifts each row's positions by a constant,
    since the decode buffer's masked slots lie in the same places in every row). A prompt without padding gets
    transformers' values exactly; a decode step, those of the real tokens side by side, however many masked
    slots lie between them, at any length. (heads, 1, slots), for ``_mpt_attention``; the attention mask is the
    step's (``call``)."""
    def build_mpt_alibi_tensor(self, num_heads, sequence_length, alibi_bias_max=8, device=None):
        mask = call.attention_mask
        counted = mask.long().cumsum(-1).amax(0)                  # (slots,)
        relative = (counted - counted[-1]).to(torch.int32).view(1, 1, mask.shape[-1])
        slopes = -original(self, num_heads, 2, alibi_bias_max, device)[:, :, :1]   # (heads, 1, 1): at k - (L-1) = -1
        return relative * slopes
    return build_mpt_alibi_tensor


def _mpt_attention(self, hidden_states, position_bias, cache=None, attention_mask=None, past_key_values=None,
                   **kwargs):
    """transformers' ``MptAttention.forward`` (5.17 and 5.25) adding ``_mpt_alibi``'s bias, already one entry per
    key, where transformers slices its table to the last keys (export cannot tell that the slice of one row it
    takes is one row when the cache and the new tokens are both dynamic). ``check_masked_slots`` compares the
    step with the model on the real tokens alone, so a transformers whose attention differs is refused."""
    cache = cache if cache is not None else past_key_values
    batch, length = hidden_states.shape[:2]
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (t.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
                         for t in mixed.chunk(3, dim=2))
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    scores = torch.matmul(query, key.transpose(-1, -2)) * self.softmax_scale
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask, torch.finfo(query.dtype).min)
    weights = nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
    weights = nn.functional.dropout(weights, p=self.attn_dropout_p, training=self.training)
    context = torch.matmul(weights, value).permute(0, 2, 1, 3).contiguous().view(batch, length, -1)
    return self.out_proj(context), weights


def _gpt_neo_local(original, call: _StepCall):
    """GPT-Neo's ``_attn`` with its local layers' band over real positions, not cache slots: transformers takes
    rows of a (max_position_embeddings)^2 table that sees key slot k from query slot q when q - window < k <= q;
    here k <= q and pos(q) - pos(k) < window, pos counting the unmasked slots (the step's attention mask,
    ``call``), as in ``_sliding_by_position``. Global layers, and a call without the step's mask, run
    ``original``. ``.calls`` counts the local calls (``CausalLMStep.windows_by_position``)."""
    def _attn(self, query, key, value, attention_mask=None):
        if getattr(self, "attention_type", None) != "local" or call.attention_mask is None:
            return original(self, query, key, value, attention_mask)
        _attn.calls += 1
        query, key = query.to(torch.float32), key.to(torch.float32)      # transformers' fp32 scores
        weights = torch.matmul(query, key.transpose(-1, -2))
        queries, keys = query.size(-2), key.size(-2)
        slots = torch.arange(keys, device=weights.device)
        positions = call.attention_mask.long().cumsum(-1) - 1
        # the mask's last `keys` and `queries` slots (the same slots as the keys'; narrow, not [-n:]: its length is
        # plainly n for export, where a slice's is a Max(), and the mask's own length stays a symbol of its own)
        positions = positions.narrow(1, positions.shape[1] - keys, keys)
        band = (slots.narrow(0, keys - queries, queries)[None, :, None] >= slots[None, None, :]) & \
            (positions.narrow(1, keys - queries, queries)[:, :, None] - positions[:, None, :]
             < self.config.window_size)
        lowest = torch.tensor(torch.finfo(weights.dtype).min, dtype=weights.dtype, device=weights.device)
        weights = torch.where(band[:, None], weights, lowest)
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = self.attn_dropout(nn.functional.softmax(weights, dim=-1).to(value.dtype))
        return torch.matmul(weights, value), weights
    _attn.calls = 0
    return _attn


def _mpt_replacements(model: nn.Module, call: _StepCall) -> list:
    """MPT's ALiBi over real positions (``_mpt_alibi``) and the attention that adds it (``_mpt_attention``), what
    ``CausalLMStep`` replaces besides ``replacements``."""
    out = []
    for m in model.modules():
        cls = type(m)
        if cls.__name__ == "MptModel" and "build_mpt_alibi_tensor" in cls.__dict__:
            out.append((cls, "build_mpt_alibi_tensor", _mpt_alibi(cls.build_mpt_alibi_tensor, call)))
        elif cls.__name__ == "MptAttention" and "forward" in cls.__dict__:
            out.append((cls, "forward", _mpt_attention))
    return list(dict.fromkeys(out))


def _gpt_neo_replacements(model: nn.Module, call: _StepCall) -> list:
    """GPT-Neo's attention with its local band over real positions (``_gpt_neo_local``), what ``CausalLMStep``
    replaces besides ``replacements``."""
    classes = {type(m) for m in model.modules() if type(m).__name__ == "GPTNeoSelfAttention"
               and "_attn" in type(m).__dict__}
    return [(cls, "_attn", _gpt_neo_local(cls._attn, call)) for cls in classes]


def _same_code(f, g) -> bool:
    """f and g compile to the same code (docstrings and line numbers aside): "Copied from" copies of a function."""
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return a is not None and b is not None and (a.co_code, a.co_names, a.co_consts[1:]) == (
        b.co_code, b.co_names, b.co_consts[1:])


def replacements(model: nn.Module) -> list:
    """(owner, attribute, replacement) for the functions of ``model``'s code that ``CausalLMStep`` replaces while it
    runs: Falcon's ALiBi with bfloat16 arithmetic (``_falcon_alibi``), DeepSeek's ``expand_kv`` and its copies
    in other models (``_expand_kv``), and the rotary embeddings of long-context (longrope) models of transformers
    before 5.25 (``_longrope``). Each gives the values the original gives. (The step's own sliding-window mask,
    ``_sliding_replacements``, is not among them: a plain compile keeps the model's mask.)"""
    out = []
    config = _text_config(model)
    falcon = sys.modules.get(type(model).__module__)          # (a class made at run time may have none)
    if getattr(config, "alibi", False) and hasattr(falcon, "build_alibi_tensor") and \
            type(model).__module__.endswith("modeling_falcon"):
        original = falcon.build_alibi_tensor
        with torch.no_grad():          # the slopes as bfloat16 values: position 1's bias, computed by transformers
            slopes = original(torch.ones(1, 2, dtype=torch.long), config.num_attention_heads, torch.float32)[:, 0, 1]
        out.append((falcon, "build_alibi_tensor", _falcon_alibi(slopes)))
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
        reference = DeepseekV3Attention.expand_kv
    except ImportError:                # a transformers without DeepSeek-V3
        reference = None
    classes = {next(c for c in type(m).__mro__ if "expand_kv" in c.__dict__)     # the class that defines it
               for m in model.modules() if hasattr(type(m), "expand_kv")}
    out += [(cls, "expand_kv", _expand_kv) for cls in sorted(classes, key=lambda c: c.__qualname__)
            if reference is not None and _same_code(cls.expand_kv, reference)]
    return out + _longrope_replacements(model)


@contextlib.contextmanager
def _replaced(items: list):
    """``replacements`` in place while the block runs (the model's own code again afterwards, also on errors)."""
    # (a class's own attribute as its __dict__ holds it: a staticmethod stays one; a closure cell's contents; a
    # dict's item)
    saved = [(owner, name, owner[name] if isinstance(owner, dict) else
              owner.__dict__[name] if hasattr(owner, "__dict__") else getattr(owner, name))
             for owner, name, _ in items]

    def put(owner, name, fn):
        if isinstance(owner, dict):
            owner[name] = fn
        else:
            setattr(owner, name, fn)
    try:
        for owner, name, fn in items:
            put(owner, name, fn)
        yield
    finally:
        for owner, name, fn in reversed(saved):
            put(owner, name, fn)


def cache_layout(model: nn.Module) -> tuple[list, Optional[int]]:
    """((key heads, key dim), (value heads, value dim)) of each layer's cache, and the smallest sliding window of its attention (None when every
    layer attends to the whole sequence), read from one eager call of ``model``. Refuses caches that are not one
    growing tensor per layer (linear attention, quantized caches) and chunked attention (Llama 4).

    A sliding-window layer's cache (``DynamicSlidingWindowLayer``) is captured as a full one: ``CausalLMStep``
    rebuilds the cache without the config, so every layer keeps all its slots, and the model's sliding layers
    mask keys by real position (``_sliding_by_position``, ``_gpt_neo_local``; ``compile_causal_lm`` drops the
    window when the capture built those masks); else by slot index, and ``CompiledCausalLM`` keeps every decode
    step within ``window`` slots, where that mask excludes nothing (module docstring)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    name = type(model).__name__
    kw = _cache_kw(model)
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev), use_cache=True)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:        # (transformers' own: Jamba with no attention layer cannot build its mask)
        raise TypeError(f"{name} fails a plain call with use_cache=True, from which compile_causal_lm reads its "
                        f"cache's layout: {type(e).__name__}: {e}") from e
    cache = getattr(out, kw, None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise TypeError(f"{name} returned no layered KV cache ({type(cache).__name__}); "
                        f"compile_causal_lm needs transformers' DynamicCache")
    if type(cache) is not DynamicCache:        # MiniMax: its linear-attention layers' state beside the layers
        kinds = sorted(set(getattr(_text_config(model), "layer_types", None) or ())
                       - {"full_attention", "sliding_attention"})
        raise TypeError(f"{name} keeps its KV cache in a class of its own ({type(cache).__name__}, holding state "
                        f"beside the layers' keys and values" + (f", for its {', '.join(kinds)} layers" if kinds
                                                                   else "") +
                        "); compile_causal_lm captures the cache as one (keys, values) pair per layer and rebuilds "
                        "transformers' DynamicCache from them, which loses that state")
    odd = sorted({type(layer).__name__ for layer in layers
                  if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if odd:
        raise TypeError(f"{name}: cache layers {odd} (linear attention, quantized or other) are not supported; "
                        f"compile_causal_lm handles full-attention and sliding-window caches (DynamicLayer, "
                        f"DynamicSlidingWindowLayer)")
    config = _text_config(model)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None:      # its cache layers are sliding ones too; its mask (chunks from the first token) is not
        raise TypeError(f"{name}: chunked attention (attention_chunk_size={chunk}) is not supported; "
                        f"compile_causal_lm handles full-attention and sliding-window caches")
    empty = [i for i, layer in enumerate(layers) if getattr(layer, "keys", None) is None]
    if empty:
        raise TypeError(f"{name}: its cache has {len(layers)} layers but a call fills only "
                        f"{len(layers) - len(empty)} (empty: {empty[:4]}); compile_causal_lm needs one (keys, values) "
                        f"pair per layer, all filled")
    # the cache layers' windows and the one the mask is built with (config.sliding_window): the smallest counts
    windows = [int(layer.sliding_window) for layer in layers if type(layer) is DynamicSlidingWindowLayer]
    if windows and getattr(config, "sliding_window", None) is not None:
        windows.append(int(config.sliding_window))
    local = _local_window(model)
    if local:
        # GPT-Neo: its local layers keep full caches and band their attention by slot index (a table of its own),
        # as the sliding layers above mask by slot
        windows.append(local)
    # keys and values may differ in width (DeepSeek's multi-head latent attention: rope + nope dims vs v_head_dim)
    layout = [((int(layer.keys.shape[1]), int(layer.keys.shape[3])),
               (int(layer.values.shape[1]), int(layer.values.shape[3]))) for layer in layers]
    return layout, (min(windows) if windows else None)


def _local_window(model: nn.Module) -> Optional[int]:
    """GPT-Neo's window of its local layers (``config.window_size``, from a banded causal buffer sliced by cache
    slot), or None."""
    config = _text_config(model)
    if "local" in (getattr(config, "attention_layers", None) or ()) and getattr(config, "window_size", None):
        return int(config.window_size)
    return None


def _normalized_layout(layout) -> list:
    """``layout`` as ((key heads, key dim), (value heads, value dim)) per layer; files saved before keys and values
    could differ hold (heads, dim) for both."""
    out = []
    for entry in layout:
        if len(entry) == 2 and all(isinstance(x, int) for x in entry):
            entry = (entry, entry)
        (hk, dk), (hv, dv) = entry
        out.append(((int(hk), int(dk)), (int(hv), int(dv))))
    return out


def _text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config


def _rope_parameters(model: nn.Module) -> list:
    """The model's rotary-embedding parameter sets (rope_parameters or rope_scaling): one, or one per attention
    type (Gemma-3's layout); none without scaling."""
    config = _text_config(model)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    return [v for v in params.values() if isinstance(v, dict)] or [params]


def refuse_dynamic_rope(model: nn.Module) -> None:
    """Refuse dynamic NTK scaling (``rope_type="dynamic"``): past ``max_position_embeddings`` transformers
    recomputes the rotary frequencies from the longest sequence its rotary embedding has seen so far (module
    state, across calls: a later prompt, shorter but still past that length, gets the longer one's frequencies)
    while the keys already cached keep the rotation they had. What a step computes then depends on the calls
    before it, which one compiled graph of the step cannot reproduce."""
    for p in _rope_parameters(model):
        kind = str(p.get("rope_type", p.get("type")))
        if "dynamic" in kind:
            n = getattr(_text_config(model), "max_position_embeddings", None)
            raise TypeError(
                f"{type(model).__name__}: rope_type {kind!r} (dynamic NTK scaling) is not supported: past "
                f"max_position_embeddings ({n}) tokens transformers recomputes the rotary frequencies from the "
                f"longest sequence its rotary embedding has seen so far, a branch on the positions' values and "
                f"state kept across calls, while the keys already cached keep their old rotation; one compiled step "
                f"cannot give its tokens. Within {n} tokens it is the unscaled rotary embedding: compile a copy "
                f"without rope scaling (rope_type 'default') and keep prompt and new tokens within {n}")


def rope_switch(model: nn.Module) -> Optional[int]:
    """The sequence length past which the model's rotary embedding switches from its short to its long factors
    (``rope_type="longrope"``: Phi-3 and PhiMoE's long-context models), else None. Keys cached before the switch
    were rotated with the short factors, so transformers' Phi-3 drops the cache at the step that crosses it and
    runs the whole sequence again; ``CompiledCausalLM.decode`` does the same."""
    config = _text_config(model)
    switches = []
    for p in _rope_parameters(model):
        if p.get("rope_type", p.get("type")) == "longrope":
            n = p.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
            if n is None:
                raise TypeError(f"{type(model).__name__}: longrope scaling without original_max_position_embeddings")
            switches.append(int(n))
    return min(switches) if switches else None


def position_limit(model: nn.Module) -> Optional[int]:
    """The token positions a learned absolute position table holds (GPT-2's ``wpe``, OPT's ``embed_positions``
    of ``max_position_embeddings`` rows, + 2 for OPT's offset): a token past them indexes outside the table
    (transformers fails there too). None for models without one (rotary, ALiBi, sinusoidal: no table)."""
    n = getattr(_text_config(model), "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    inputs = model.get_input_embeddings()
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not inputs
              and n <= m.num_embeddings <= n + 2]
    return n if tables else None


def step_inputs(ids: torch.Tensor, mask: Optional[torch.Tensor], layout, dtype, slots: int = 1,
                all_logits: bool = True) -> tuple:
    """The step's inputs for a prompt (prefill): ``slots`` masked cache slots of zeros, positions that
    count only the real tokens, logits at every position or the last."""
    ids, mask = _prompt(ids, mask)
    b = ids.shape[0]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full = torch.cat([torch.zeros(b, slots, dtype=mask.dtype, device=mask.device), mask], 1)
    cache = [(torch.zeros(b, hk, slots, dk, dtype=dtype, device=ids.device),
              torch.zeros(b, hv, slots, dv, dtype=dtype, device=ids.device))
             for (hk, dk), (hv, dv) in _normalized_layout(layout)]
    n = ids.shape[1]
    at = torch.arange(0 if all_logits else n - 1, n, device=ids.device)
    return ids, pos, full, cache, at


def checked_ids(ids, mask, what: str = "prompt") -> tuple:
    """Token ids (batch, length) and their 0/1 mask (all ones when None), as int64, checked: at least one
    ``what`` of at least one token, each row with a token."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, length) integer tensor, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one {what} of at least one token, got shape "
                         f"{tuple(ids.shape)}")
    ids = ids.long()
    if mask is None:
        mask = torch.ones_like(ids)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    mask = mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError(f"rows {(mask.sum(-1) == 0).nonzero()[:, 0].tolist()} of attention_mask are all padding: "
                         f"each {what} needs at least one token")
    return ids, mask


def _prompt(ids, mask):
    ids, mask = checked_ids(ids, mask)
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("the prompts are right-padded (attention_mask ends in 0); left-pad them "
                         "(tokenizer.padding_side = 'left'): generation appends after the last position")
    if ids.shape[1] < 2:     # the step takes >= 2 tokens (module docstring): one masked pad in front
        ids = torch.cat([ids.new_zeros(ids.shape[0], 2 - ids.shape[1]), ids], 1)
        mask = torch.cat([mask.new_zeros(mask.shape[0], 2 - mask.shape[1]), mask], 1)
    return ids, mask


def _calibration(items: Iterable, layout, dtype) -> list:
    """Token batches (a tensor, (ids,), (ids, mask) or {"input_ids", "attention_mask"}: a dict, or a tokenizer's
    BatchEncoding) as step inputs."""
    from collections.abc import Mapping
    if isinstance(items, (Mapping, torch.Tensor)):      # one batch as the whole set: iterated by keys or rows
        what = f"a mapping of {list(items)}" if isinstance(items, Mapping) else f"a tensor of shape {tuple(items.shape)}"
        raise TypeError(f"compile_causal_lm: calibration is one batch ({what}); pass a list of batches: "
                        f"calibration=[batch]")
    out = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, Mapping):
                if "input_ids" not in item:
                    raise ValueError(f"a dict batch needs 'input_ids' (and may have 'attention_mask'), got {list(item)}")
                ids, mask = item["input_ids"], item.get("attention_mask")
            elif isinstance(item, (tuple, list)):
                ids, mask = item[0], (item[1] if len(item) > 1 else None)
            else:
                ids, mask = item, None
            out.append(step_inputs(ids, mask, layout, dtype))
        except ValueError as e:
            raise ValueError(f"compile_causal_lm: calibration batch {i}: {e}") from e
    return out


def compile_causal_lm(model: nn.Module, *, passes: Sequence = (), calibration: Optional[Iterable] = None,
                      example_ids: Optional[torch.Tensor] = None, backend: str = "numpy",
                      backend_options: Optional[dict] = None, **compile_kwargs) -> "CompiledCausalLM":
    """Compile ``model`` (a Hugging Face causal LM) for generation with a KV cache (module docstring).

    calibration: token batches, each a (batch, length) id tensor, (ids, mask) or a dict with input_ids and
                 attention_mask; passes see them as prompts
    example_ids: the prompt capture and the passes' measurements use (default: 2 x 16 random tokens, or the
                 first calibration batch)
    The other keywords go to ``slimfx.compile`` (verify, measure, dump_dir, progress)."""
    from .api import capture as capture_graph, compile as compile_graph
    for key in ("dynamic", "example_inputs", "example_kwargs"):
        if key in compile_kwargs:
            raise TypeError(f"compile_causal_lm sets {key!r} itself (the step's inputs and dynamic dims)")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model: compile_causal_lm compiles a "
                        f"decoder-only causal LM's generation step; compile_seq2seq_lm compiles an encoder-decoder "
                        f"model's (T5's, BART's, Whisper's), slimfx.compile its forward")
    refuse_dynamic_rope(model)
    layout, window = cache_layout(model)
    dtype = next(model.parameters()).dtype
    cal = _calibration(calibration, layout, dtype) if calibration is not None else None
    if example_ids is None:
        example_ids = (cal[0][0] if cal else
                       torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 16),
                                     generator=torch.Generator().manual_seed(0)))
    # two masked slots: an example dim of 1 would be specialized; at run time the prompt step holds one
    example = step_inputs(example_ids.to(next(model.parameters()).device), None, layout, dtype, slots=2)
    # Dim.AUTO: export finds how the dims relate and the ranges the model allows (seq >= 2). Named Dims fail
    # under transformers 5.17, whose rotary embedding is a batched matmul that guards batch != 1; traced size
    # obliviously (capture does), AUTO keeps the batch dynamic from 1 and the graph is right there (tests)
    auto = Dim.AUTO
    dynamic = {"input_ids": {0: auto, 1: auto}, "position_ids": {0: auto, 1: auto},
               "attention_mask": {0: auto, 1: auto}, "logits_at": {0: auto},
               "cache": [({0: auto, 2: auto}, {0: auto, 2: auto}) for _ in layout]}
    step = type(f"{type(model).__name__}Step", (CausalLMStep,), {})(model)
    if not step.takes_positions:
        check_masked_slots(model, step, layout, dtype, window)
    # the arguments first (a typo fails before the capture), then one capture for the step and its float probe
    passes = checked_compile_args("compile_causal_lm", compile_graph, passes, backend, backend_options, compile_kwargs)
    cap = capture_graph(step, example, dynamic=dynamic, method=compile_kwargs.pop("capture", "auto"))
    cm = compile_graph(cap, passes=passes, backend=backend, backend_options=backend_options, calibration=cal,
                       **compile_kwargs)
    cm.report().capture_reused = False           # (the capture is this compile's own, as in slimfx.compile)
    gaps = step.gap_limit(window)
    if window is not None and step.windows_by_position:
        window = None                 # no cap: the window is over real positions
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    lm = CompiledCausalLM(cm, layout, dtype, eos_token_id=eos, pad_token_id=pad, sliding_window=window,
                          model_name=type(model).__name__, rope_switch=rope_switch(model),
                          position_limit=position_limit(model), gap_limit=gaps)
    lm.decode_tokens, lm.decode_note = check_decode_tokens(lm, probe_of(cap, cm, passes, backend),
                                                       model.get_input_embeddings().num_embeddings,
                                                       next(model.parameters()).device)
    return lm


def checked_compile_args(who: str, compile_graph, passes, backend, backend_options, compile_kwargs) -> list:
    """``passes`` as a list (a generator is read once), after checking what ``slimfx.compile`` would: the backend
    and its options, the passes, the keywords (a typo fails before the capture)."""
    from .backends import check_options
    from .passes.manager import PassManager
    check_options(backend, backend_options)
    try:
        inspect.signature(compile_graph).bind_partial(**compile_kwargs)
    except TypeError as e:
        raise TypeError(f"{who}: {e} (the other keywords go to slimfx.compile)") from None
    return PassManager(passes, dump_dir=compile_kwargs.get("dump_dir")).passes


def probe_of(cap, cm, passes: list, backend: str):
    """``check_decode_tokens``' probe: the capture ``cap`` compiled without passes (``cm`` itself where it has
    none), on the numpy backend for ``backend`` numpy, else on torch, which runs the graph's ops as the triton
    backend does, on the model's device, its weights shared: the triton backend would copy them to the GPU, beside
    the compressed ones. A function: compiled only when the check runs, its failure one the check reports."""
    if not passes:
        return lambda: cm
    from .api import compile as compile_graph
    return lambda: compile_graph(cap, backend="numpy" if backend == "numpy" else "torch", verify=False,
                                 measure=False, progress=False)


def check_decode_tokens(lm: "CompiledCausalLM", probe=None, vocab: Optional[int] = None, device=None,
                        ids: Optional[torch.Tensor] = None, extra: tuple = ()) -> tuple[int, str]:
    """How many tokens ``lm``'s decode steps feed, and why: 1 where the captured step, run on 1 token (its
    sequence dim below the range export gave it, >= 2), gives the logits it gives on 2 (the re-fed one masked,
    module docstring), else 2. Checked on a batch of 2 prompts, the first left-padded by 2, and on the second
    alone (a decode step of 1 token puts 1 row through the layers at batch 1), each of 4 tokens then 4 decode
    steps, the buffer growing from 8 slots to 16: ``probe()`` (the capture compiled without passes,
    ``probe_of``) within rounding (``slot_error``); ``lm`` itself (passes applied: a quantized step's rounding may
    amplify a difference in summation order past any tolerance, as SmolLM2 W8A8's, whose logits moved by 5-20% of
    their norm) only for running and giving logits of the same shape, finite where the 2-token ones are. Without
    ``probe`` (``with_backend``, ``slimfx.load``: the graph was checked when compiled) only the latter.
    ``ids``: (batch, 8) tokens of the caller's (default random, below ``vocab``, else 0 and 1); ``extra``: the
    step's inputs after ``logits_at`` (an encoder's output for that batch, ``slimfx.seq2seq``)."""
    if ids is None:
        ids = torch.randint(0, vocab or 2, (2, 8), generator=torch.Generator().manual_seed(0)).to(device or "cpu")
    mask = torch.ones_like(ids)
    cases = [(ids, mask, extra)]
    if ids.shape[0] > 1:
        mask[0, :2] = 0
        second = torch.utils._pytree.tree_map(lambda t: t[1:2] if isinstance(t, torch.Tensor) else t, extra)
        cases.append((ids[1:2], mask[1:2], second))

    def run(step, tokens: int) -> torch.Tensor:
        out = []
        for ids_, mask_, extra_ in cases:
            gen = CompiledCausalLM(step, lm.layout, lm.dtype, sliding_window=lm.sliding_window,
                                   model_name=lm.model_name, rope_switch=lm.rope_switch,
                                   position_limit=lm.position_limit, gap_limit=lm.gap_limit, decode_tokens=tokens)
            gen.probing, gen.min_cache = True, 2
            logits, state = gen.prefill(ids_[:, :4], mask_[:, :4], extra=extra_)
            dev = logits.device
            steps = [gen.decode(ids_[:, i].to(dev), state) for i in range(4, ids_.shape[1])]
            out.append(torch.stack([logits[:, -1], *steps], 1).cpu())
        return torch.cat(out)

    def runs(step, what: str) -> tuple:
        try:
            ref = run(step, 2)
        except Exception as e:        # (a model whose window over slots the check's prompts pass, say)
            return None, f"2 tokens: {what} fails on the check's prompts ({type(e).__name__}: {str(e)[:200]})"
        try:
            return (ref, run(step, 1)), None
        except Exception as e:        # the graph may refuse 1 token anywhere (a reshape, an assertion, a kernel)
            return None, f"2 tokens: {what} fails on 1 token ({type(e).__name__}: {str(e)[:200]})"

    with torch.no_grad():
        if probe is not None:
            try:
                step = probe()
            except Exception as e:
                return 2, f"2 tokens: compiling the step without passes to check it failed ({type(e).__name__}: {e})"
            got, why = runs(step, "the step")
            if why:
                return 2, why
            err = slot_error(got[1], got[0], lm.dtype)
            if err is not None:
                return 2, f"2 tokens: the step's logits on 1 token differ from those on 2 by {err:.2g} of their scale"
            if step is lm.step:                             # (no passes: the probe is the compiled step)
                return 1, "checked: the step gives the logits on 1 token that it gives on 2"
        got, why = runs(lm.step, "the compiled step")
        if why:
            return 2, why
        ref, one = got
        if one.shape != ref.shape or bool((ref.isfinite() & ~one.isfinite()).any()):
            return 2, ("2 tokens: the compiled step's logits on 1 token have another shape, or values that are not "
                       "finite")
    if probe is None:
        return 1, ("checked on this backend: the compiled step runs on 1 token, its logits finite (the graph was "
                   "checked when compiled)")
    return 1, "checked: the step gives the logits on 1 token that it gives on 2"


def check_masked_slots(model: nn.Module, step: CausalLMStep, layout, dtype, window: Optional[int] = None) -> None:
    """Refuse ``model`` unless generating through ``step`` gives the logits of the model run on the real tokens
    alone (a left-padded prompt, then two decode steps: masked slots in front, the re-fed token masked,
    unfilled slots between the prompt and the new tokens). A model that takes position_ids gets them from the
    step, counted over real tokens only; one that does not must derive its positions from the attention mask
    (BLOOM's ALiBi does; MPT's through ``_mpt_alibi``), not from the cache length (BART's learned positions, MPT's
    ALiBi as transformers computes it): those would see every masked slot as a position."""
    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    lm = _EagerCausalLM(step, layout, dtype, sliding_window=window, model_name=type(model).__name__)
    with ir.eval_mode(model), torch.no_grad():
        try:
            logits, state = lm.prefill(ids[:, :4], mask[:, :4])
            got = torch.stack([logits[:, -1], lm.decode(ids[:, 4], state), lm.decode(ids[:, 5], state)], 1)
        except Exception as e:
            raise TypeError(f"{type(model).__name__} is not supported: its forward takes no position_ids and "
                            f"fails on the cache compile_causal_lm gives it, masked slots included "
                            f"({type(e).__name__}: {e})") from e
        ref = torch.stack([model(input_ids=row[m.bool()][None]).logits[0, -3:] for row, m in zip(ids, mask)])
    err = slot_error(got, ref, dtype)
    if err is not None:
        raise TypeError(f"{type(model).__name__} is not supported: its forward takes no position_ids and its "
                        f"positions do not come from the attention mask (logits change by {err:.2g} of their scale "
                        f"when masked cache slots are present), so the masked slots compile_causal_lm keeps in the "
                        f"cache (left padding, the re-fed token, unfilled buffer slots) would shift its positions")


def slot_error(got: torch.Tensor, ref: torch.Tensor, dtype) -> Optional[float]:
    """The largest difference of ``got`` (logits through the step, masked slots present) from ``ref`` (the model's on
    the real tokens alone), as a fraction of ``ref``'s scale, where it exceeds what rounding explains; else None.
    fp32: only summation order differs (9e-8 of the logits' scale for a tiny BLOOM); positions that count masked
    slots move them by a sizeable fraction of it (0.12 for a tiny MPT with transformers' ALiBi). bf16/fp16 round
    each layer's output to 3 significant digits, hence the looser bound there."""
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    return None if err <= tol else err


def _held_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab: int, device) -> torch.Tensor:
    """(batch, vocab) bool: the tokens each prompt holds from its first unmasked one on (transformers 5.25's
    repetition penalty skips the left padding so: ``prompt_ignore_length``), ids past the logits left out."""
    ids, mask = ids.to(device), mask.to(device)
    kept = torch.arange(ids.shape[1], device=device)[None] >= mask.argmax(1, keepdim=True)
    cols = torch.where(kept & (ids < vocab), ids, vocab)            # (column vocab: the ones left out)
    return torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=device).scatter_(1, cols, True)[:, :vocab]


def history_bans(seq: torch.Tensor, vocab: int, ngram: int = 0, words: Sequence = (),
                 encoder: Optional[tuple] = None) -> torch.Tensor:
    """(rows, vocab) bool: the tokens each row of ``seq`` (rows, length: its tokens so far, prompt and padding
    included) may not take next, as transformers' NoRepeatNGramLogitsProcessor, NoBadWordsLogitsProcessor and
    EncoderNoRepeatNGramLogitsProcessor ban them: one that would repeat an ``ngram``-token sequence the row holds
    (0: none), the last token of each of ``words`` (token id sequences) whose other tokens end the row, and with
    ``encoder`` = (n, ids (rows, length)) one that would repeat an n-token sequence of the row's encoder input
    (padding included). Ids past the logits are never banned (never chosen either)."""
    rows, length = seq.shape
    out = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=seq.device)    # (column vocab: the ones left out)
    for n, source in ((ngram, seq), encoder or (0, None)):
        if n and length >= n - 1 and source.shape[1] >= n:
            windows = source.unfold(1, n, 1)                               # every n-gram the source holds
            matches = (windows[..., :-1] == seq[:, length + 1 - n:][:, None]).all(-1)    # ... the row would repeat
            out.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    for word in words:
        *prefix, last = word
        if last >= vocab or len(prefix) > length:
            continue
        hit = (seq[:, length - len(prefix):] == torch.tensor(prefix, dtype=seq.dtype, device=seq.device)).all(-1) \
            if prefix else torch.ones(rows, dtype=torch.bool, device=seq.device)
        out[:, last] |= hit
    return out[:, :vocab]


def bad_words(value, eos: Sequence = ()) -> tuple:
    """``bad_words_ids`` (a list of token id lists) as a tuple of tuples, less the one-token ones that are an
    end-of-sequence id (transformers drops them); refused, naming the entry, when not that."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(w, Sequence) and not isinstance(w, (str, bytes)) and len(w) and
                    all(_is_int(t) and t >= 0 for t in w) for w in value):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids >= 0, got {value!r}")
    return tuple(tuple(int(t) for t in w) for w in value if not (len(w) == 1 and int(w[0]) in eos))


def count(value, name: str) -> int:
    """``value`` as an int >= 0 (an n-gram size: 0, none), else a ValueError naming ``name``."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: none), got {value!r}")
    return int(value)


def penalty(value) -> float:
    """``value`` as a repetition penalty (a finite number > 0; 1: none), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none), got {value!r}")
    return float(value)


def _is_int(v) -> bool:
    """A Python or numpy integer (a 0-d integer tensor too), never a bool."""
    import numbers
    if isinstance(v, torch.Tensor):
        return v.ndim == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` extended with zeros along ``dim`` to ``size`` (cache slots: zero keys and values, mask 0)."""
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


class CompiledCausalLM:
    """A compiled step and the generation loop around it (``compile_causal_lm``).

    ``sliding_window``: the smallest attention window the step applies over cache slots (steps saved before the
    window went by position, attention the replacements do not reach; None: full attention, or windows over real
    positions), which bounds the cache slots
    a decode step may see (module docstring); ``position_limit``: the positions of the model's learned position
    table (``position_limit``), which bound a sequence's real tokens; ``model_name`` names the model in errors;
    ``gap_limit``: the most slots a sequence whose prompt mask holds a gap may span (``CausalLMStep.gap_limit``;
    None: any)."""

    min_cache = 64          # cache slots to begin with (then powers of two)

    def __init__(self, step, layout, dtype, eos_token_id=None, pad_token_id=None, sliding_window: Optional[int] = None,
                 model_name: Optional[str] = None, rope_switch: Optional[int] = None,
                 position_limit: Optional[int] = None, gap_limit: Optional[int] = None, decode_tokens: int = 2):
        self.step = step                               # the CompiledModel of CausalLMStep
        self.decode_tokens = decode_tokens             # fed per decode step (check_decode_tokens)
        self.decode_note = "given"                     # why (check_decode_tokens)
        self.probing = False                           # check_decode_tokens' runs: no CUDA graph captured for them
        self.gap_limit = None if gap_limit is None else int(gap_limit)
        self.position_limit = None if position_limit is None else int(position_limit)
        self.layout = _normalized_layout(layout)
        self.dtype = dtype
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self.model_name = model_name or "the model"
        self.rope_switch = None if rope_switch is None else int(rope_switch)
        eos = eos_token_id if eos_token_id is None or isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_id = [eos] if isinstance(eos, int) else (eos or [])
        self._pad = None if pad_token_id is None else int(pad_token_id)     # the model's own (None: none)
        self.last_timing: dict = {}

    @property
    def decode_tokens(self) -> int:
        """The tokens a decode step feeds: 1 (the new one) where ``check_decode_tokens`` found the step gives the
        same logits on it, else 2 (module docstring). A generation keeps the count its prefill began with."""
        return self._decode_tokens

    @decode_tokens.setter
    def decode_tokens(self, value: int) -> None:
        if value not in (1, 2) or isinstance(value, bool):
            raise ValueError(f"decode_tokens must be 1 or 2, got {value!r}")
        self._decode_tokens = int(value)

    @property
    def pad_token_id(self) -> int:
        """The pad token: the model's, else its first end-of-sequence token, else 0 (a call's own
        end-of-sequence tokens replace the model's there, as in transformers: ``pad``)."""
        return self.pad(self.eos_token_id)

    @pad_token_id.setter
    def pad_token_id(self, value: Optional[int]) -> None:     # (None: the model has none of its own)
        if value is not None and not _is_int(value):
            raise ValueError(f"pad_token_id must be a token id or None, got {value!r}")
        self._pad = None if value is None else int(value)

    def pad(self, eos: Sequence) -> int:
        """The pad token of a call whose end-of-sequence tokens are ``eos``: the model's, else ``eos[0]``, else 0."""
        return self._pad if self._pad is not None else (list(eos) or [0])[0]

    def report(self):
        return self.step.report()

    def with_backend(self, backend: str, backend_options: Optional[dict] = None) -> "CompiledCausalLM":
        """The same step graph on another backend or with other options (``CompiledModel.with_backend``)."""
        lm = CompiledCausalLM(self.step.with_backend(backend, backend_options), self.layout, self.dtype,
                              self.eos_token_id or None, self._pad, self.sliding_window, self.model_name,
                              self.rope_switch, self.position_limit, self.gap_limit)
        if self.decode_tokens == 1:         # checked on this backend's kernels too: they may refuse 1 token
            lm.decode_tokens, lm.decode_note = check_decode_tokens(lm)
        else:
            lm.decode_note = self.decode_note                  # (the reason for 2 holds for the graph)
        return lm

    @property
    def graph(self):
        return self.step.graph

    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                all_logits: bool = False, extra: tuple = ()):
        """The logits of the prompt's last position (batch, 1, vocab), or of every position (batch, length,
        vocab) with ``all_logits``, and the state ``decode`` continues from. A prompt longer than a window over
        slots (``sliding_window``) is exact too (module docstring); decoding after it is refused. ``extra``: the
        step's inputs after ``logits_at``, the same at every step (an encoder-decoder model's encoder output,
        ``slimfx.seq2seq``), kept in the state."""
        ids, pos, mask, cache, at = step_inputs(input_ids, attention_mask, self.layout, self.dtype,
                                                all_logits=all_logits)
        gapped = self._refuse_gaps(mask, input_ids.shape[-1], "a prompt of")
        real = int(mask.sum(-1).max()) if mask.numel() else 0
        if self.position_limit is not None and real > self.position_limit:
            raise self._beyond_positions(f"a prompt of {real} tokens", real, "Shorten the prompt.")
        out = self._run(ids, pos, mask, cache, at, eager=True, extra=extra)   # one shape per prompt: no CUDA graph
        n = mask.shape[1]                                      # slots filled: the masked one and the prompt
        cap = max(self._capacity(n + 1), n)                    # (n when a sliding window leaves no room to decode)
        dev = out["logits"].device                             # the backend's (triton: the GPU's)
        state = {"cache": [(_pad(k, cap, 2), _pad(v, cap, 2)) for k, v in out["cache"]],
                 "mask": _pad(mask.to(dev), cap, 1), "filled": n, "token": ids[:, -1:].to(dev),
                 "position": pos[:, -1:].to(dev), "fed": self.decode_tokens,
                 "at": torch.full((1,), self.decode_tokens - 1, dtype=torch.long, device=dev)}
        if extra:
            state["extra"] = tuple(extra)
        if gapped:                                             # decode counts on from here (_refuse_gaps)
            state["gap_slots"] = input_ids.shape[-1]
        if self.rope_switch is not None and ids.shape[1] <= self.rope_switch:   # decode may run it all again
            state["ids"], state["ids_mask"] = ids.to(dev), mask[:, -ids.shape[1]:].to(dev)
        return out["logits"], state

    def _capacity(self, n: int) -> int:
        """Cache slots for ``n`` tokens: powers of two from ``min_cache``, so decode steps share a few shapes; with a
        sliding window at most ``window - 2`` (a decode step sees the buffer and the 2 tokens it may feed), and at most
        ``max_slots``; either may be fewer than ``n``."""
        cap = self.min_cache
        while cap < n:
            cap *= 2
        if self.max_slots is not None:
            cap = min(cap, self.max_slots)
        return cap if self.sliding_window is None else min(cap, self.sliding_window - 2)

    @property
    def max_slots(self) -> Optional[int]:
        """The most cache slots a decode step may hold: the bound torch.export found for the cache length (a
        learned position table of max_position_embeddings rows bounds it) less the 2 tokens the step may feed, whose
        keys it appends (GPT-Neo slices its causal-mask table, of that many rows, by the key length; export does
        not bound that slice). None when export found no bound."""
        sig = getattr(self.step, "_signature", None)            # (the eager step of check_masked_slots: none)
        if sig is None:
            return None
        cache = sig.leaves[3:3 + 2 * len(self.layout)]         # (ids, positions, mask, *cache, logits_at, ...)
        bounds = [sig.ranges.get(str(t.shape[2]), (0, None))[1] for _, t in cache
                  if isinstance(t, torch.Tensor) and t.dim() == 4 and not isinstance(t.shape[2], int)]
        bounds = [int(b) for b in bounds if b is not None]
        return min(bounds) - 2 if bounds else None

    def _refuse_gaps(self, mask: torch.Tensor, slots: int, what: str) -> bool:
        """Whether a prompt mask holds padding after a token (a gap) where ``gap_limit`` bounds it; refused when the
        sequence spans more than ``gap_limit`` slots (``slots``, the prompt's own with its padding, and the tokens
        fed after it): the step counts real positions for its window or ALiBi, the model cache slots, the same
        only for left padding or within the window."""
        if self.gap_limit is None:
            return False
        gaps = (mask.diff(dim=-1) < 0).any(-1)
        found = bool(gaps.any())
        if found and slots > self.gap_limit:
            within = (f"its sliding window of {self.gap_limit} tokens, where a gap changes what the window holds "
                      f"past {self.gap_limit} slots, and {what} {slots} slots would pass it" if self.gap_limit
                      else "its ALiBi, which a gap shifts at any length")
            raise ValueError(f"rows {gaps.nonzero()[:, 0].tolist()} of attention_mask hold padding after a token; "
                             f"{self.model_name}'s compiled step counts real positions where the model counts cache "
                             f"slots for {within}: left-pad the prompts")
        return found

    def _beyond_bound(self, what: str, slots: int, fits: str) -> ValueError:
        return ValueError(f"{self.model_name}'s compiled step holds at most {self.max_slots} cache slots (the bound "
                          f"torch.export found for its cache length, as from a position table of "
                          f"max_position_embeddings rows, less the 2 tokens a step may feed): {what} would need "
                          f"{slots}. {fits}")

    def _beyond_positions(self, what: str, tokens: int, fits: str) -> ValueError:
        return ValueError(f"{self.model_name}'s position table holds {self.position_limit} positions (by "
                          f"max_position_embeddings): {what} would put a token at position {tokens - 1}. {fits}")

    def _beyond_window(self, what: str, slots: int, fits: str) -> ValueError:
        w = self.sliding_window
        return ValueError(f"{self.model_name} attends within a sliding window of {w} tokens, and its compiled step "
                          f"applies the window to cache slots, masked ones included, so a decode step is exact only "
                          f"while it sees at most {w} slots: {what} would see {slots}. {fits}")

    def decode(self, tokens: torch.Tensor, state: dict):
        """Logits (batch, vocab) after appending ``tokens`` (batch,) to ``state`` (updated in place).

        The cache is a buffer of ``capacity`` slots, the unfilled ones masked; the step reads all of them and
        returns them with the fed tokens' keys and values appended, of which the new token's go into its slot.
        With ``decode_tokens`` 2 the previous token is fed again (module docstring), masked: its slot is read
        instead, not its copy; with 1 (checked by ``compile_causal_lm``) the new token alone. Crossing a longrope
        model's switch (``rope_switch``) runs the whole sequence again, as transformers does."""
        if "ids" in state:                                      # below the model's rope switch (rope_switch)
            ids, mask = torch.cat([state["ids"], tokens[:, None]], 1), torch.cat(
                [state["ids_mask"], torch.ones_like(state["ids_mask"][:, :1])], 1)
            if ids.shape[1] > self.rope_switch:                 # as transformers' Phi-3: the whole sequence again
                fed = state.get("fed", 2)
                logits, new = self.prefill(ids, mask, extra=state.get("extra", ()))
                state.clear()
                state.update(new, fed=fed, at=torch.full_like(new["at"], fed - 1))     # (the generation's count)
                return logits[:, -1]
            state["ids"], state["ids_mask"] = ids, mask
        n = state["filled"]
        if n + 1 > state["mask"].shape[1]:                     # full: the next power of two
            cap = self._capacity(n + 1)
            if cap < n + 1:                                    # capped by a sliding window or the compiled bound
                held = (f"The cache holds {n} slots (the masked one in front, the prompt with its padding, the tokens "
                        f"fed so far)")
                if self.sliding_window is not None and n + 3 > self.sliding_window:
                    raise self._beyond_window("the next decode step", n + 3, f"{held}; the step adds the new token's "
                                                                              f"slot and may feed 2 tokens.")
                raise self._beyond_bound("the next decode step", n + 1, f"{held}, and the new token's.")
            state["cache"] = [(_pad(k, cap, 2), _pad(v, cap, 2)) for k, v in state["cache"]]
            state["mask"] = _pad(state["mask"], cap, 1)
        if "gap_slots" in state and state["gap_slots"] + 1 > self.gap_limit:    # a prompt with a gap: it raises
            self._refuse_gaps(state["mask"][:, :state["filled"]], state["gap_slots"] + 1,
                              "the next decode step after a prompt of")
        slots = state["mask"]
        one = state.get("fed", 2) == 1                         # (the count this generation began with)
        ids = tokens[:, None] if one else torch.cat([state["token"], tokens[:, None]], 1)
        pos = state["position"] + 1 if one else torch.cat([state["position"], state["position"] + 1], 1)
        if self.position_limit is not None and int(pos.max()) >= self.position_limit:
            raise self._beyond_positions("the next decode step", int(pos.max()) + 1,
                                         "No more tokens fit in this sequence.")
        fed = torch.ones_like(slots[:, :ids.shape[1]])
        fed[:, :-1] = 0                                         # the re-fed token: its cache slot is read instead
        # the logits of the new token only; 1 token is outside the sequence range export gave the step (>= 2), so
        # its inputs, built here from a checked state, skip the signature's check
        out = self._run(ids, pos, torch.cat([slots, fed], 1), state["cache"], state["at"], eager=self.probing,
                        extra=state.get("extra", ()), checked=not one)
        for (kb, vb), (k, v) in zip(state["cache"], out["cache"]):   # the new token's slot only: the re-fed
            kb[:, :, n], vb[:, :, n] = k[:, :, -1], v[:, :, -1]         # token's stays as its own step wrote it
        slots[:, n] = 1
        state.update(filled=n + 1, token=tokens[:, None], position=pos[:, -1:])
        if "gap_slots" in state:
            state["gap_slots"] += 1
        return out["logits"][:, -1]

    def _run(self, ids, pos, mask, cache, at, eager: bool = False, extra: tuple = (), checked: bool = True):
        args, kwargs = (ids, pos, mask, cache, at, *extra), {}
        if checked:
            args, kwargs = self.step._signature.check(args, kwargs)
        return self.step._executable(args, kwargs, eager=eager)

    def _one_thread(self) -> OneTorchThread:
        """``OneTorchThread``, active where the step runs on the numpy backend."""
        return OneTorchThread(getattr(self.step, "backend", None) == "numpy")

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
                 generator: Optional[torch.Generator] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
                 no_repeat_ngram_size: int = 0, bad_words_ids=None, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping=False, num_return_sequences: int = 1, renormalize_logits: bool = False,
                 progress: bool = False):
        """``input_ids`` (batch, length) followed by up to ``max_new_tokens`` tokens each: greedy when
        ``temperature`` is 0, else sampled from softmax(logits / temperature) over the ``top_k`` largest (None
        or 0: all; transformers' ``generate`` takes 50 from its GenerationConfig unless told: pass ``top_k=50``
        to draw as it does) and of those the fewest whose probabilities sum past ``top_p`` (nucleus sampling; 1:
        all). ``repetition_penalty`` divides the positive logits of every token the row holds so far (its prompt
        from its first unmasked token on, and its new tokens) by itself and multiplies the negative ones (1:
        none); until a row has ``min_new_tokens`` new tokens, its end-of-sequence tokens cannot be chosen. Each as
        transformers' ``generate`` computes it (transformers >= 5.25: older versions penalize the left padding
        too), in its order (penalty, n-gram and bad-word bans, end-of-sequence ban, temperature, top-k, top-p),
        so the same logits and the same random state draw the same tokens. ``no_repeat_ngram_size`` n > 0: no
        row takes a token that would repeat an n-token sequence it holds (prompt and padding included, as
        transformers counts them); ``bad_words_ids``: token id sequences no row completes (a one-token one is
        never taken; ``[eos]`` is dropped, as transformers drops it).
        A row that emitted an end-of-sequence token continues with the pad token (``pad_token_id``, by default
        the model's, else the call's first end-of-sequence token, as in transformers); generation stops when every
        row has. Timings of the call are in ``last_timing``.

        ``num_beams`` > 1: beam search (``slimfx.beam``), as transformers' ``generate`` runs it: the same processors
        on the log-probabilities, ``length_penalty`` (a finished sequence scores its summed log-probabilities over
        its new tokens' count to this power), ``early_stopping`` (True: a prompt is done once it has
        ``num_beams`` finished sequences; False: once the best running one is unlikely to beat them; "never": once
        it cannot), ``temperature`` > 0 for beam sampling and ``renormalize_logits`` (transformers'
        LogitNormalization: the processed scores are log-softmaxed again before they are added). It returns each
        prompt's best ``num_return_sequences`` sequences, best first (batch * num_return_sequences rows), filled
        after their end-of-sequence token as transformers fills them: with the pad token, or with the first
        end-of-sequence token where the pad id is 0."""
        from tqdm.auto import tqdm
        beams = beam_options(num_beams, length_penalty, early_stopping, num_return_sequences, renormalize_logits)
        if beams is not None:
            new = self._stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                               min_new_tokens=min_new_tokens, generator=generator, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, no_repeat_ngram_size=no_repeat_ngram_size,
                               bad_words_ids=bad_words_ids, beams=dict(beams, progress=progress))
            return torch.cat([input_ids.long().repeat_interleave(num_return_sequences, 0), new], 1)
        steps = self.stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                            min_new_tokens=min_new_tokens, generator=generator, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, no_repeat_ngram_size=no_repeat_ngram_size,
                            bad_words_ids=bad_words_ids)
        new = [tok[:, None] for tok in tqdm(steps, total=max_new_tokens, desc="generate", disable=not progress,
                                            leave=False)]
        return torch.cat([input_ids.long(), *new], 1)

    def stream(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
               max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
               repetition_penalty: float = 1.0, min_new_tokens: int = 0, generator: Optional[torch.Generator] = None,
               eos_token_id=None, pad_token_id: Optional[int] = None, no_repeat_ngram_size: int = 0,
               bad_words_ids=None):
        """``generate`` one token at a time: an iterator of each step's new tokens (batch,) as they are chosen,
        on ``input_ids``' device (e.g. to print an answer while it is written); ``last_timing`` is set at the
        end."""
        return self._stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                            min_new_tokens=min_new_tokens, generator=generator, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, no_repeat_ngram_size=no_repeat_ngram_size,
                            bad_words_ids=bad_words_ids)

    def _stream(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                repetition_penalty: float = 1.0, min_new_tokens: int = 0, generator: Optional[torch.Generator] = None,
                eos_token_id=None, pad_token_id: Optional[int] = None, no_repeat_ngram_size: int = 0,
                bad_words_ids=None, extra=(), rules=None, beams: Optional[dict] = None, encoder_bans=None,
                processor=None):
        """``stream`` with ``_steps``' ``extra`` (a tuple, or a function giving it, called once the options are
        checked), ``rules``, ``processor`` and ``encoder_bans`` (``history_bans``' ``encoder``); with ``beams``
        (``slimfx.beam.options`` and ``progress``), the new tokens of ``beam_search`` instead of an iterator."""
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 or None: all tokens), got {top_k!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1: all tokens), got {top_p!r}")
        penalty(repetition_penalty)
        if not _is_int(min_new_tokens) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        count(no_repeat_ngram_size, "no_repeat_ngram_size")
        self._refuse_gaps(_prompt(input_ids, attention_mask)[1], input_ids.shape[-1] + max_new_tokens - 1,
                          f"{max_new_tokens} new tokens after a prompt of")    # (bad prompts: _prompt's errors)
        if self.sliding_window is not None and max_new_tokens > 1:  # refused before any step, not midway
            n = max(input_ids.shape[-1], 2)                        # the prompt as prefill pads it
            slots = n + max_new_tokens + 2                         # module docstring
            if slots > self.sliding_window:
                fit = self.sliding_window - 2 - n
                raise self._beyond_window(
                    f"the last decode step of {max_new_tokens} new tokens after a {n}-token prompt (padding "
                    f"included)", slots, f"At most {fit} new tokens fit after this prompt." if fit > 1 else
                    "Only 1 new token fits after this prompt (a prompt's own logits are exact at any length).")
        if self.position_limit is not None:          # positions count real tokens; the last new one is not fed
            real = int(_prompt(input_ids, attention_mask)[1].sum(-1).max())     # (bad prompts: _prompt's errors)
            if real + max_new_tokens - 1 > self.position_limit:
                fit = self.position_limit - real + 1
                raise self._beyond_positions(
                    f"{max_new_tokens} new tokens after a prompt of {real} real tokens", real + max_new_tokens - 1,
                    f"At most {fit} new tokens fit after this prompt." if fit >= 1 else "Shorten the prompt.")
        if self.max_slots is not None and max_new_tokens > 1:
            n = max(input_ids.shape[-1], 2)
            slots = n + max_new_tokens                             # the masked slot, the prompt, all but the last
            if slots > self.max_slots:
                raise self._beyond_bound(
                    f"the last decode step of {max_new_tokens} new tokens after a {n}-token prompt (padding "
                    f"included)", slots, f"At most {self.max_slots - n} new tokens fit after this prompt.")
        eos = self.eos_token_id if eos_token_id is None else (
            [int(eos_token_id)] if _is_int(eos_token_id) else [int(e) for e in eos_token_id])
        pad = self.pad(eos) if pad_token_id is None else int(pad_token_id)
        words = bad_words(bad_words_ids, eos)
        history = (int(no_repeat_ngram_size), words, encoder_bans) if no_repeat_ngram_size or words or \
            encoder_bans else None
        extra = extra() if callable(extra) else extra
        if beams is not None:
            from .beam import beam_search
            return beam_search(self, input_ids, attention_mask, max_new_tokens, int(min_new_tokens), eos, pad, extra,
                               rules, temperature=temperature, top_k=top_k, top_p=top_p, penalty=repetition_penalty,
                               generator=generator, history=history, processor=processor, **beams)
        pick = functools.partial(self._pick, temperature=temperature, top_k=top_k, top_p=top_p,
                                 penalty=repetition_penalty, generator=generator)
        return self._steps(input_ids, attention_mask, max_new_tokens, int(min_new_tokens), repetition_penalty != 1,
                           pick, eos, pad, extra, rules, history, processor)

    @torch.no_grad()
    def _steps(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, track, pick, eos, pad, extra=(),
               rules=None, history=None, processor=None):
        """The generation loop (``stream``); ``extra``: the step's inputs after ``logits_at`` (``prefill``);
        ``rules(i)``: the token ids new token i may not take beyond end-of-sequence before ``min_new_tokens``,
        and the ids it must take from (an empty tuple: any), as an encoder-decoder model's generation config
        suppresses and forces them (``slimfx.seq2seq``); ``history``: ``history_bans``' (ngram, words), banned
        by each row's tokens so far; ``processor(held, scores)``: the last processor before sampling, given each
        row's tokens so far (Whisper's timestamp rules, ``slimfx.whisper``)."""
        glue = self._one_thread().__enter__()                  # (left while the caller has the token)
        try:
            yield from self._stepping(input_ids, attention_mask, max_new_tokens, min_new_tokens, track, pick, eos,
                                      pad, extra, rules, history, processor, glue)
        finally:
            glue.__exit__()

    def _stepping(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, track, pick, eos, pad, extra,
                  rules, history, processor, glue):
        """``_steps``' loop; ``glue``: its ``OneTorchThread``, left while the caller holds each token."""
        t0 = time.perf_counter()
        logits, state = self.prefill(input_ids, attention_mask, extra=extra)
        sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)   # honest times on a GPU
        sync()
        t1 = time.perf_counter()
        logits = logits[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
        vocab = logits.shape[-1]
        seen = _held_tokens(*_prompt(input_ids, attention_mask), vocab, logits.device) if track else None
        rows = torch.arange(len(logits), device=logits.device)
        banned = [e for e in eos if 0 <= e < vocab]   # (an id past the logits is never chosen: transformers too)
        held = input_ids.long().to(logits.device) if history is not None or processor is not None else None
        n = 0
        for i in range(max_new_tokens):
            ban, forced = rules(i) if rules is not None else ((), ())
            ban, forced = [t for t in ban if 0 <= t < vocab], [t for t in forced if 0 <= t < vocab]   # (as eos)
            mask = history_bans(held, vocab, *history) if history is not None else None
            tok = pick(logits, seen, [*(banned if i < min_new_tokens else ()), *ban], forced=forced, mask=mask,
                       processor=None if processor is None else functools.partial(processor, held))
            if seen is not None:
                seen[rows, tok] = True
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            if held is not None:
                held = torch.cat([held, tok[:, None]], 1)
            n += 1
            glue.__exit__()
            yield tok.to(input_ids.device)
            glue.__enter__()
            if eos:
                done |= torch.isin(tok, torch.tensor(eos, device=tok.device))
            if i + 1 == max_new_tokens or (eos and bool(done.all())):     # (a host sync: only with eos)
                break
            logits = self.decode(tok, state)
        sync()
        t2 = time.perf_counter()
        self.last_timing = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": n,
                            "decode_tokens_per_s": (n - 1) / (t2 - t1) if n > 1 else None}

    @staticmethod
    def _processed(scores, seen, banned, penalty, forced=(), temperature=0.0, top_k=None, top_p=1.0, keep=1,
                   mask=None, processor=None):
        """``scores`` (batch, vocab) as transformers' logits processors leave them, in their order: the repetition
        ``penalty`` over the tokens each row holds (``seen``: (batch, vocab) bool, ``_held_tokens``), the tokens it
        may not take now (``banned``: end-of-sequence before ``min_new_tokens``, suppressed tokens; ``mask``:
        (batch, vocab) bool, its own, ``history_bans``) and the ones it
        must take from (``forced``: a forced beginning or end of sequence, each given 0 and every other token
        -inf), then ``processor(scores)`` (a model's own, which transformers runs after its others: Whisper's
        timestamp rules); then, when ``temperature`` > 0, the sampling warpers (temperature, top-k, top-p), each
        keeping at least ``keep`` tokens (transformers keeps one more than the end-of-sequence ids, or 2, for beam
        sampling)."""
        if penalty != 1:                        # transformers' RepetitionPenaltyLogitsProcessor, in float32
            scores = scores.float()
            scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        if mask is not None:                    # NoRepeatNGramLogitsProcessor, NoBadWordsLogitsProcessor
            scores = scores.float().masked_fill(mask, float("-inf"))
        if len(banned):                         # MinNewTokensLengthLogitsProcessor
            scores = scores.float().index_fill(-1, torch.tensor(banned, device=scores.device), float("-inf"))
        if len(forced):                         # ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor
            scores = torch.full_like(scores.float(), float("-inf")).index_fill(
                -1, torch.tensor(forced, device=scores.device), 0.0)
        if processor is not None:
            scores = processor(scores)
        if temperature == 0:
            return scores
        scores = scores.float() / temperature
        if top_k:                               # None or 0: every token
            kth = torch.topk(scores, min(max(top_k, keep), scores.shape[-1]), -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1:                           # TopPLogitsWarper: drop the least likely while their sum <= 1 - p
            ascending, order = torch.sort(scores, descending=False)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -keep:] = False             # (the likeliest token always stays)
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    @staticmethod
    def _pick(logits, seen, banned, temperature, top_k, top_p, penalty, generator, forced=(), mask=None,
              processor=None):
        """The next token of each row from its logits (batch, vocab), processed as ``_processed`` says (the
        arguments are its own): the likeliest when ``temperature`` is 0, else drawn from their softmax, as
        transformers' ``generate`` chooses it."""
        logits = CompiledCausalLM._processed(logits, seen, banned, penalty, forced, temperature, top_k, top_p,
                                             mask=mask, processor=processor)
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits, -1)
        if generator is not None and generator.device != probs.device:    # e.g. a CPU generator, GPU logits
            return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(probs.device)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def save(self, path) -> pathlib.Path:
        """The step (``CompiledModel.save``) plus causal_lm.json; ``slimfx.load`` gives back a CompiledCausalLM."""
        from .io import save
        data = {"layout": self.layout, "dtype": str(self.dtype).replace("torch.", ""),
                "eos_token_id": self.eos_token_id, "pad_token_id": self._pad,
                "sliding_window": self.sliding_window, "model": self.model_name, "rope_switch": self.rope_switch,
                "position_limit": self.position_limit, "gap_limit": self.gap_limit,
                "decode_tokens": self.decode_tokens}
        return save(self.step, path, extra={LM_FILE: data})      # one save: the same save id in every file

    @classmethod
    def from_saved(cls, step, path, save_id: str | None = None) -> "CompiledCausalLM":
        """The generation loop around a loaded ``step``, from causal_lm.json, checked against the step graph's
        cache inputs and ``save_id`` (slimfx.json's): a damaged, edited or stale file is refused here, naming
        what is wrong, not at generate."""
        from .ir.serialize import FormatError, read_json
        where = f"slimfx.load({str(path)!r}): {LM_FILE}"
        data = read_json(pathlib.Path(path) / LM_FILE, where, ("layout", "dtype", "eos_token_id", "pad_token_id"))
        if save_id is not None and data.get("save_id") != save_id:
            raise FormatError(f"{where} (save {data.get('save_id')}) and the model's files (save {save_id}) were "
                              f"written by different saves: a save into this folder was interrupted; save it again")
        dtype, layout = saved_layout(data, where)
        cache = [v for _, v in step._signature.leaves[3:-1]]           # (ids, positions, mask, *cache, logits_at)
        if len(cache) != 2 * len(layout):
            raise FormatError(f"{where}: layout has {len(layout)} layers, the step graph's cache {len(cache) // 2}")
        check_cache(layout, dtype, cache, where, "the step graph")
        window = data.get("sliding_window")           # (absent from files saved before)
        if window is not None and not (isinstance(window, int) and window >= 3):
            raise FormatError(f"{where}: sliding_window must be null or an int >= 3, got {window!r}")
        switch = data.get("rope_switch")              # (absent from files saved before)
        if switch is not None and not (isinstance(switch, int) and switch >= 1):
            raise FormatError(f"{where}: rope_switch must be null or an int >= 1, got {switch!r}")
        limit = data.get("position_limit")            # (absent from files saved before)
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            raise FormatError(f"{where}: position_limit must be null or an int >= 1, got {limit!r}")
        gaps = data.get("gap_limit")                  # (absent from files saved before)
        if gaps is not None and not (isinstance(gaps, int) and not isinstance(gaps, bool) and gaps >= 0):
            raise FormatError(f"{where}: gap_limit must be null or an int >= 0, got {gaps!r}")
        eos, pad = data["eos_token_id"], data["pad_token_id"]
        if not (eos is None or isinstance(eos, int) or isinstance(eos, list) and all(isinstance(e, int) for e in eos)) \
                or not (pad is None or isinstance(pad, int)):
            raise FormatError(f"{where}: eos_token_id / pad_token_id must be token ids, got {eos!r} / {pad!r}")
        fed = data.get("decode_tokens", 2)            # (absent from files saved before: 2)
        if fed not in (1, 2) or isinstance(fed, bool):
            raise FormatError(f"{where}: decode_tokens must be 1 or 2, got {fed!r}")
        lm = cls(step, layout, dtype, eos or None, pad, window, data.get("model"), switch, limit, gaps)
        if fed == 1:                 # checked when compiled; again on the backend it is loaded for
            lm.decode_tokens, lm.decode_note = check_decode_tokens(lm)
        return lm

    def __repr__(self):
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return f"CompiledCausalLM({self.step!r}, layers={len(self.layout)}{window})"


def saved_layout(data: dict, where: str) -> tuple:
    """The dtype and cache layout a saved generation file names (``from_saved``), checked."""
    from .ir.serialize import FormatError
    dtype = getattr(torch, str(data["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FormatError(f"{where} names an unknown dtype {data['dtype']!r}")
    try:
        layout = _normalized_layout(data["layout"])
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: layout is not ((key heads, key dim), (value heads, value dim)) per "
                          f"layer: {data['layout']!r:.80}") from e
    return dtype, layout


def check_cache(layout, dtype, cache: list, where: str, graph: str) -> None:
    """Refuse a saved ``layout`` and ``dtype`` that the graph's cache inputs (``cache``: keys, values per layer)
    do not have."""
    from .ir.serialize import FormatError
    for i, entry in enumerate(layout):
        for (heads, dim), t, what in zip(entry, cache[2 * i:2 * i + 2], ("keys", "values")):
            shape = tuple(getattr(t, "shape", ()))
            if len(shape) != 4 or shape[1] != heads or shape[3] != dim or t.dtype != dtype:
                raise FormatError(f"{where}: layer {i}'s {what} are ({heads} heads, dim {dim}, "
                                  f"{str(dtype).replace('torch.', '')}), {graph}'s cache input is {shape} "
                                  f"{getattr(t, 'dtype', None)}")


class _EagerCausalLM(CompiledCausalLM):
    """The generation loop around the uncompiled step module (``check_masked_slots``)."""

    def _run(self, ids, pos, mask, cache, at, eager: bool = False, extra: tuple = (), checked: bool = True):
        return self.step(ids, pos, mask, cache, at, *extra)
