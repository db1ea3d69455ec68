"""Weights between Megatron ``GPTModel`` and Hugging Face Llama: the name and layout mapping of one
full (TP=1) state dict. Tensor parallelism is handled by ``megatron.core.dist_checkpointing`` when a
checkpoint is read or written (``checkpoints.py``).

* ``linear_qkv`` is fused per query group: ``[q_0 .. q_{g-1}, k, v]`` for every KV group;
* ``linear_fc1`` holds ``[gate; up]``;
* norms live in ``input_layernorm`` / ``pre_mlp_layernorm`` (local spec) or are fused into the
  following linear as ``layer_norm_weight`` (Transformer Engine spec); both are read;
* Megatron's RoPE (``rotary_interleaved=False``) already uses the rotate-half convention of HF.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _first(state: dict, *keys):
    for key in keys:
        if key in state:
            return state[key]
    raise KeyError(f"none of {keys} in the Megatron state dict")


def megatron_to_hf_weights(state: dict, shape: LlamaShape) -> dict:
    """Full (TP=1) Megatron GPTModel state dict -> HF Llama state dict."""
    g, d, h = shape.heads_per_group, shape.head_dim, shape.hidden_size
    hf = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if not shape.tied_embeddings:
        hf["lm_head.weight"] = state["output_layer.weight"]
    for i in range(shape.num_layers):
        mg, out = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[mg + "self_attention.linear_qkv.weight"].view(shape.num_kv_heads, g + 2, d, h)
        gate, up = state[mg + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf.update({
            out + "input_layernorm.weight": _first(
                state, mg + "self_attention.linear_qkv.layer_norm_weight", mg + "input_layernorm.weight"),
            out + "self_attn.q_proj.weight": qkv[:, :g].reshape(-1, h),
            out + "self_attn.k_proj.weight": qkv[:, g].reshape(-1, h),
            out + "self_attn.v_proj.weight": qkv[:, g + 1].reshape(-1, h),
            out + "self_attn.o_proj.weight": state[mg + "self_attention.linear_proj.weight"],
            out + "post_attention_layernorm.weight": _first(
                state, mg + "mlp.linear_fc1.layer_norm_weight", mg + "pre_mlp_layernorm.weight"),
            out + "mlp.gate_proj.weight": gate,
            out + "mlp.up_proj.weight": up,
            out + "mlp.down_proj.weight": state[mg + "mlp.linear_fc2.weight"],
        })
    return {k: v.contiguous() for k, v in hf.items()}


def hf_to_megatron_weights(hf: dict, shape: LlamaShape, *, fused_norms: bool = False) -> dict:
    """HF Llama state dict -> full Megatron GPTModel state dict (local-spec names, or TE names with
    ``fused_norms``)."""
    g, d, h = shape.heads_per_group, shape.head_dim, shape.hidden_size
    state = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not shape.tied_embeddings:
        state["output_layer.weight"] = hf["lm_head.weight"]
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    for i in range(shape.num_layers):
        src, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].view(shape.num_kv_heads, g, d, h)
        k = hf[src + "self_attn.k_proj.weight"].view(shape.num_kv_heads, 1, d, h)
        v = hf[src + "self_attn.v_proj.weight"].view(shape.num_kv_heads, 1, d, h)
        state.update({
            mg + attn_norm: hf[src + "input_layernorm.weight"],
            mg + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, h),
            mg + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
            mg + mlp_norm: hf[src + "post_attention_layernorm.weight"],
            mg + "mlp.linear_fc1.weight": torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0),
            mg + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
        })
    return {k: v.contiguous() for k, v in state.items()}


def resize_vocab(hf: dict, vocab_size: int) -> dict:
    """Cut padded vocabulary rows off, or append zero rows (Megatron's padding), in place."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in hf:
            rows = hf[key]
            if vocab_size <= rows.shape[0]:
                hf[key] = rows[:vocab_size].contiguous()
            else:
                hf[key] = torch.cat([rows, rows.new_zeros(vocab_size - rows.shape[0], rows.shape[1])])
    return hf
