"""Llama with S2 (sparsely-sharded) attention, for Hugging Face ``transformers``.

Self-contained: copied next to exported weights and loaded with ``trust_remote_code=True``. Weight
names are those of ``LlamaForCausalLM``. S2 layers compute exactly the attention they were trained
with: the ``megatron_s2`` Triton kernel for prefill on GPU when ``megatron_s2`` is importable, else
dense attention under the S2 token mask (any device). Positions, and therefore S2 blocks, count from
each sequence's first real token, so left-padded batches give the same result as single prompts.

``model.make_s2_kv_cache()`` (opt-in: ``model.generate(..., past_key_values=cache)``) keeps in S2 layers
only the key/value blocks that later tokens can still attend, compacted per KV head
(s2_kv_cache.py); on GPU, decoding steps read it with a Triton kernel (s2_decode_kernel.py).
``cache.kv_cache_stats()`` tells how much it saved.
"""

import torch
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
from .s2_kv_cache import S2KVCache
from .token_masks import dense_attention, masked_attention, s2_token_mask

try:  # the fused kernel, when the training package is installed
    from megatron_s2 import S2Pattern
    from megatron_s2 import s2_attention as _s2_kernel
except Exception:  # noqa: BLE001 - any import failure means: use the pure-PyTorch path
    S2Pattern = _s2_kernel = None

# The output field holding the cache was renamed from past_key_values to cache in transformers 5.2x.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_QUERY_CHUNK = 1024  # bounds the [batch, heads, chunk, keys] mask of the pure path


class S2LlamaAttention(nn.Module):
    def __init__(self, config: S2LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.s2_layer = config.s2_layers[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5 if config.softmax_scale is None else config.softmax_scale
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.kernel_pattern = None
        if self.s2_layer is not None and S2Pattern is not None:
            fields = S2Pattern.__dataclass_fields__
            self.kernel_pattern = S2Pattern(**{k: v for k, v in self.s2_layer.items() if k in fields})

    def forward(self, hidden_states, position_embeddings, q_pos, k_pos, cache=None, unpadded=False,
                left_padding=None):
        """``unpadded``: no sequence of the batch has padding (the masks reduce to plain causality);
        ``left_padding``: each sequence's padding columns, on the host, when some sequence has padding and
        no key is cached yet (see ``padding_on_host``)."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        if isinstance(cache, S2KVCache):
            out = self._attend_with_s2_cache(q, k, v, q_pos, k_pos, cache, unpadded, left_padding)
        else:
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            out = self._attend(q, k, v, q_pos, k_pos, unpadded, left_padding)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _attend(self, q, k, v, q_pos, k_pos, unpadded, left_padding):
        if self.s2_layer is None:
            return dense_attention(q, k, v, q_pos, k_pos, self.scaling, unpadded)
        if self._use_kernel(q, k):
            return self._kernel_attention(q, k, v, left_padding)
        return self._masked_s2_attention(q, k, v, q_pos, k_pos)

    def _attend_with_s2_cache(self, q, k, v, q_pos, k_pos, cache, unpadded, left_padding):
        layer = self.layer_idx
        if self.s2_layer is None:
            k, v = cache.dense_update(layer, k, v)
            return dense_attention(q, k, v, q_pos, k_pos, self.scaling, unpadded)
        if cache.get_seq_length(layer) == 0:  # the prompt, or its first chunk: S2 over its own keys
            out = self._attend(q, k, v, q_pos, q_pos, unpadded, left_padding)
            cache.s2_store(layer, k, v, q_pos)
            return out
        if q.shape[2] == 1:  # decoding step
            cache.s2_store(layer, k, v, q_pos)
            return cache.s2_decode(layer, q, self.scaling)
        # A later prompt chunk reads the kept entries and its own keys; the cache drops entries only
        # after, when the chunk's last token has moved the window.
        old_k, old_v, old_pos = cache.s2_entries(layer)
        out = self._masked_s2_attention(
            q, torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2), q_pos,
            torch.cat([old_pos, q_pos[:, None].expand(-1, k.shape[1], -1)], dim=2))
        cache.s2_store(layer, k, v, q_pos)
        return out

    def _masked_s2_attention(self, q, k, v, q_pos, k_pos):
        """The pure-PyTorch path, in query chunks that bound the mask's size."""
        return torch.cat(
            [
                masked_attention(q[:, :, i : i + _QUERY_CHUNK], k, v,
                                 s2_token_mask(self.s2_layer, q_pos[:, i : i + _QUERY_CHUNK], k_pos), self.scaling)
                for i in range(0, q.shape[2], _QUERY_CHUNK)
            ],
            dim=2,
        )

    def _use_kernel(self, q, k):
        # The kernel takes block-aligned starts: prefill of whole sequences (no cached keys).
        return (self.kernel_pattern is not None and q.is_cuda and q.shape[2] == k.shape[2] > 1
                and q.dtype in (torch.float16, torch.bfloat16, torch.float32))

    def _kernel_attention(self, q, k, v, left_padding):
        """Prefill through the Triton kernel, one sequence at a time when the batch is left-padded
        (``left_padding``: each sequence's padding columns, or None). The kernel reads the
        ``[b, n, h, d]`` views as they are (strided rows), so nothing is copied in."""

        def attend(q_, k_, v_):
            return _s2_kernel(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), self.kernel_pattern,
                              softmax_scale=self.scaling, num_q_heads=self.num_heads,
                              num_kv_heads=self.num_kv_heads).transpose(1, 2)

        if left_padding is None:
            return attend(q, k, v)
        out = torch.zeros_like(q)  # padding rows stay zero
        for b, start in enumerate(left_padding):
            out[b : b + 1, :, start:] = attend(*(t[b : b + 1, :, start:] for t in (q, k, v)))
        return out


class S2LlamaDecoderLayer(nn.Module):
    def __init__(self, config: S2LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = S2LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, q_pos, k_pos, cache=None, unpadded=False,
                left_padding=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, q_pos, k_pos, cache, unpadded, left_padding
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


def padding_on_host(attention_mask, cache, past):
    """``(unpadded, left_padding)``: whether no key column is padding (SDPA's unmasked kernels then
    serve dense layers), and, when some is and no key is cached yet, each sequence's padding columns
    (the S2 prefill kernel's per-sequence starts). Padding is on the left, as ``generate`` requires.

    Read from the device once per forward, never per layer; not at all once an ``S2KVCache`` holds
    the start of the sequences: left padding lies in the columns it has seen, so later chunks and
    decoding steps (CUDA-graph capturable) take its record. Other caches cost one sync per step."""
    if attention_mask is None:
        return True, None
    if past > 0 and isinstance(cache, S2KVCache) and cache.padded is not None:
        return not cache.padded, None
    padding = (attention_mask == 0).sum(dim=1).tolist()  # the one host sync
    unpadded = not any(padding)
    if isinstance(cache, S2KVCache):
        cache.padded = not unpadded
    return unpadded, None if unpadded or past > 0 else padding


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
        if self.config.embedding_multiplier != 1.0:  # MuP
            inputs_embeds = inputs_embeds * self.config.embedding_multiplier
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

        unpadded, left_padding = padding_on_host(attention_mask, cache, past)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, q_pos, k_pos, cache, unpadded, left_padding)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{_CACHE_FIELD: cache})


class S2LlamaForCausalLM(S2LlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: S2LlamaConfig):
        super().__init__(config)
        self.model = S2LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def make_s2_kv_cache(self, capacity=None):
        """A cache for ``generate(past_key_values=...)`` that drops S2 blocks no later token attends
        (the class of this very module: remote-code loading gives the model its own module copy).
        ``capacity``: tokens per sequence to allocate for at once (static shapes, CUDA graphs)."""
        return S2KVCache(self.config, capacity=capacity)

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
        if self.config.logits_multiplier != 1.0:  # MuP
            logits = logits * self.config.logits_multiplier
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})


__all__ = ["S2KVCache", "S2LlamaForCausalLM", "S2LlamaModel", "S2LlamaPreTrainedModel"]
