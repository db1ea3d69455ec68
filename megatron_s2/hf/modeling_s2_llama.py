"""Llama with S2 (sparsely-sharded) attention, for Hugging Face ``transformers``.

Self-contained: copied next to exported weights and loaded with ``trust_remote_code=True``. Weight
names are those of ``LlamaForCausalLM``. S2 layers compute exactly the attention they were trained
with: the ``megatron_s2`` Triton kernel for prefill on GPU when ``megatron_s2`` is importable, else
dense attention under the S2 token mask (any device). Positions, and therefore S2 blocks, count from
each sequence's first real token, so left-padded batches give the same result as single prompts.

``model.make_s2_kv_cache()`` (opt-in: ``model.generate(..., past_key_values=cache)``) keeps in S2 layers
only the key/value blocks that later tokens can still attend; ``cache.kv_cache_stats()`` tells how much
it saved.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from .configuration_s2_llama import S2LlamaConfig

try:  # the fused kernel, when the training package is installed
    from megatron_s2 import S2Pattern
    from megatron_s2 import s2_attention as _s2_kernel
except Exception:  # noqa: BLE001 - any import failure means: use the pure-PyTorch path
    S2Pattern = _s2_kernel = None

# The output field holding the cache was renamed from past_key_values to cache in transformers 5.2x.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_QUERY_CHUNK = 1024  # bounds the [batch, heads, chunk, keys] mask of the pure path


def s2_token_mask(layer, q_pos, k_pos):
    """Bool ``[b, h, q, k]``: which keys each query head attends in an S2 layer.

    ``layer`` is an ``s2_layers`` entry; ``q_pos [b, q]``; ``k_pos [b, k]`` or ``[b, h_kv, k]`` (per KV
    head, for the compacted cache); position -1 marks padding.
    """
    block, heads = layer["block_size"], len(layer["head_offsets"])
    offsets = _offsets_tensor(tuple(layer["head_offsets"]), q_pos.device)
    if k_pos.dim() == 3:  # per KV head -> per query head
        k_pos = k_pos.repeat_interleave(heads // k_pos.shape[1], dim=1)
    else:
        k_pos = k_pos[:, None]
    qb = (q_pos // block)[:, None, :, None]
    kb = (k_pos // block)[:, :, None, :]
    stride = layer["vert_stride"]  # 0: window-only, no stripes
    in_stripe = ((kb + offsets[:, None, None]) % max(stride, 1) == 0) & (stride > 0)
    sparse_ok = ((qb - kb) < layer["local_blocks"]) | in_stripe
    return causal_token_mask(q_pos, k_pos) & (sparse_ok | (offsets < 0)[:, None, None])


@functools.lru_cache(maxsize=64)
def _offsets_tensor(head_offsets: tuple, device) -> torch.Tensor:
    """Per-head stripe offsets on the device (-1: dense head), built once per layer pattern, not per
    decoding step."""
    return torch.tensor([-1 if o is None else o for o in head_offsets], device=device)


def causal_token_mask(q_pos, k_pos):
    """Bool ``[b, 1 or h, q, k]``: key is a real token at or before the query."""
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None]
    return (k_pos[:, :, None, :] >= 0) & (k_pos[:, :, None, :] <= q_pos[:, None, :, None])


def masked_attention(q, k, v, allowed, scale):
    """q ``[b, h, sq, d]``, k/v ``[b, h_kv, sk, d]``, allowed bool ``[b, 1 or h, sq, sk]``."""
    # A padding query sees no key; let it see all so that softmax stays finite (its output is unused).
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


class S2KVCache(DynamicCache):
    """Dynamic cache that keeps, in S2 layers, only the key blocks later queries can still attend.

    A key block ``kb`` stays while some query head of its KV group reads it as a stripe, or while it is
    inside the local window of the next query block. Dense layers keep everything. Entries are kept
    per (sequence, KV head) with their positions.
    """

    def __init__(self, config: S2LlamaConfig):
        super().__init__(config=config)
        self.s2_config = config
        self.seen_tokens = {}
        self.s2_entries = {}  # layer -> (keys, values, positions [b, h_kv, n]) of S2 layers
        self._stripe_tables = {}  # layer -> _stripe_table, built at the layer's first eviction

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens.get(layer_idx, 0)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.seen_tokens[layer_idx] = self.seen_tokens.get(layer_idx, 0) + key_states.shape[-2]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def s2_update(self, layer_idx, keys, values, positions, first_query_pos):
        """Append ``keys/values [b, h_kv, s, d]`` at ``positions [b, s]``; drop what no query at or
        after ``first_query_pos [b]`` attends. Returns all kept keys, values and positions."""
        self.seen_tokens[layer_idx] = self.seen_tokens.get(layer_idx, 0) + keys.shape[-2]
        positions = positions[:, None].expand(-1, keys.shape[1], -1)
        if layer_idx in self.s2_entries:
            old_k, old_v, old_pos = self._evict(layer_idx, first_query_pos)
            keys, values = torch.cat([old_k, keys], dim=2), torch.cat([old_v, values], dim=2)
            positions = torch.cat([old_pos, positions], dim=2)
        self.s2_entries[layer_idx] = (keys, values, positions)
        return keys, values, positions

    def _evict(self, layer_idx, first_query_pos):
        keys, values, positions = self.s2_entries[layer_idx]
        layer = self.s2_config.s2_layers[layer_idx]
        block, stride = layer["block_size"], layer["vert_stride"]
        kb = positions // block
        in_window = (first_query_pos // block)[:, None, None] - kb < layer["local_blocks"]
        kv_head = torch.arange(keys.shape[1], device=keys.device)[None, :, None]
        if layer_idx not in self._stripe_tables:
            self._stripe_tables[layer_idx] = self._stripe_table(layer, keys)
        keep = (positions >= 0) & (in_window | self._stripe_tables[layer_idx][kv_head, kb % max(stride, 1)])
        all_kept, kept = torch.stack([keep.all().long(), keep.sum(dim=-1).max()]).tolist()  # one sync
        if all_kept:
            return keys, values, positions
        # Stable sort puts the kept entries first, in position order; the tail is marked invalid.
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :kept]
        positions = torch.where(keep.gather(-1, order), positions.gather(-1, order), -1)
        index = order[..., None].expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, index), values.gather(2, index), positions

    def _stripe_table(self, layer, keys):
        """Bool ``[h_kv, max(vert_stride, 1)]``: residue ``kb % V`` is read as a stripe by some head of
        the KV group (every residue, when the group holds a dense head; none in a window-only layer)."""
        offsets, stride = layer["head_offsets"], layer["vert_stride"]
        group = len(offsets) // keys.shape[1]
        table = torch.zeros(keys.shape[1], max(stride, 1), dtype=torch.bool, device=keys.device)
        for head, offset in enumerate(offsets):
            if offset is None:
                table[head // group] = True
            elif stride:
                table[head // group, (-offset) % stride] = True
        return table

    def kv_cache_stats(self):
        """Cached key/value entries: kept vs what a full cache would hold (all layers)."""
        full = kept = 0
        for layer_idx, seen in self.seen_tokens.items():
            if layer_idx in self.s2_entries:
                _, _, positions = self.s2_entries[layer_idx]
                full += positions.shape[0] * positions.shape[1] * seen
                kept += positions.shape[0] * positions.shape[1] * positions.shape[2]
            else:
                keys = self.layers[layer_idx].keys
                full += keys.shape[0] * keys.shape[1] * keys.shape[2]
                kept += keys.shape[0] * keys.shape[1] * keys.shape[2]
        return {"kept_entries": kept, "full_entries": full, "saved_fraction": 1 - kept / max(full, 1)}

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.s2_entries = {
            i: tuple(t.index_select(0, beam_idx.to(t.device)) for t in entry) for i, entry in self.s2_entries.items()
        }

    def crop(self, max_length):
        raise NotImplementedError("S2KVCache cannot be cropped (assisted decoding): use the default cache")


class S2LlamaAttention(nn.Module):
    def __init__(self, config: S2LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.s2_layer = config.s2_layers[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.kernel_pattern = None
        if self.s2_layer is not None and S2Pattern is not None:
            fields = S2Pattern.__dataclass_fields__
            self.kernel_pattern = S2Pattern(**{k: v for k, v in self.s2_layer.items() if k in fields})

    def forward(self, hidden_states, position_embeddings, q_pos, k_pos, cache=None):
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        if isinstance(cache, S2KVCache) and self.s2_layer is not None:
            first_query = torch.where(q_pos >= 0, q_pos, q_pos.amax(dim=1, keepdim=True)).amin(dim=1)
            k, v, k_pos = cache.s2_update(self.layer_idx, k, v, q_pos, first_query)
        elif cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        if self.s2_layer is None:
            out = masked_attention(q, k, v, causal_token_mask(q_pos, k_pos), self.scaling)
        elif self._use_kernel(q, k):
            out = self._kernel_attention(q, k, v, q_pos)
        else:
            out = torch.cat(
                [
                    masked_attention(q[:, :, i : i + _QUERY_CHUNK], k, v,
                                     s2_token_mask(self.s2_layer, q_pos[:, i : i + _QUERY_CHUNK], k_pos),
                                     self.scaling)
                    for i in range(0, length, _QUERY_CHUNK)
                ],
                dim=2,
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _use_kernel(self, q, k):
        # The kernel takes block-aligned starts: prefill of whole sequences (no cached keys).
        return (self.kernel_pattern is not None and q.is_cuda and q.shape[2] == k.shape[2] > 1
                and q.dtype in (torch.float16, torch.bfloat16, torch.float32))

    def _kernel_attention(self, q, k, v, q_pos):
        """Prefill through the Triton kernel, one sequence at a time when the batch is left-padded."""
        out = torch.zeros_like(q)
        starts = (q_pos < 0).sum(dim=1).tolist()  # left padding of each sequence
        batches = [(slice(None), 0)] if not any(starts) else [(slice(b, b + 1), s) for b, s in enumerate(starts)]
        for rows, start in batches:
            q_, k_, v_ = (t[rows, :, start:].transpose(1, 2).contiguous() for t in (q, k, v))
            out[rows, :, start:] = _s2_kernel(
                q_, k_, v_, self.kernel_pattern, softmax_scale=self.scaling,
                num_q_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            ).transpose(1, 2)
        return out


class S2LlamaDecoderLayer(nn.Module):
    def __init__(self, config: S2LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = S2LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, q_pos, k_pos, cache=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, q_pos, k_pos, cache
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class S2LlamaPreTrainedModel(PreTrainedModel):
    config_class = S2LlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["S2LlamaDecoderLayer"]
    _supports_sdpa = True


def token_positions(attention_mask, batch, length, past, device):
    """Positions of the keys ``[b, past + length]`` (-1 on padding), counted from each sequence's first
    real token; the queries are the last ``length`` of them."""
    if attention_mask is None:
        return torch.arange(past + length, device=device).expand(batch, -1)
    if attention_mask.dim() != 2 or attention_mask.shape[1] != past + length:
        raise ValueError(
            f"attention_mask must be 2D [batch, past + new tokens] = [{batch}, {past + length}] "
            f"(1 for tokens, 0 for padding), got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    return torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)


class S2LlamaModel(S2LlamaPreTrainedModel):
    def __init__(self, config: S2LlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(S2LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        k_pos = token_positions(attention_mask, batch, length, past, inputs_embeds.device)
        q_pos = k_pos[:, past:]
        if position_ids is None:
            position_ids = q_pos.clamp(min=0)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, q_pos, k_pos, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{_CACHE_FIELD: cache})


class S2LlamaForCausalLM(S2LlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: S2LlamaConfig):
        super().__init__(config)
        self.model = S2LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def make_s2_kv_cache(self):
        """A cache for ``generate(past_key_values=...)`` that drops S2 blocks no later token attends
        (the class of this very module: remote-code loading gives the model its own module copy)."""
        return S2KVCache(self.config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})


__all__ = ["S2KVCache", "S2LlamaForCausalLM", "S2LlamaModel", "S2LlamaPreTrainedModel"]
