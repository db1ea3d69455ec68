"""Megatron-Core core-attention modules: S2 sparse attention, and dense attention on PyTorch SDPA.

Both have the interface of Megatron's ``DotProductAttention`` / ``TEDotProductAttention``:
constructed with ``config, layer_number, attn_mask_type, attention_type, attention_dropout,
softmax_scale, cp_comm_type, pg_collection``; called with ``query, key, value [sq, b, heads, dim]``
(packed THD: ``[t, heads, dim]``) plus ``attention_mask, attn_mask_type, attention_bias,
packed_seq_params``; returning ``[sq, b, heads * dim]`` (THD: ``[t, heads * dim]``).

Head bookkeeping follows Megatron's split (docs/semantics.md, "Tensor parallelism"): TP rank ``r`` holds
query heads ``[r*H/t, (r+1)*H/t)`` and KV groups ``[r*G/t, (r+1)*G/t)`` (one replicated group when
``G < t``). S2 layouts are built from these *global* indices, so the model is the same function at
every TP size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from ..ops.attention import s2_attention
from ..ops.layout import Shard
from ..ops.pattern import S2ConfigError
from .context_parallel import context_parallel_attention, dense_context_parallel_attention

# With THD input Megatron (and TE) describe causal attention as ``padding_causal``.
_CAUSAL_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


class _CoreAttentionBase(MegatronModule):
    """Head split, softmax scale and the checks shared by the S2 and SDPA core attentions.

    The model-level settings (head counts against TP, the S2 config, dropout, softmax type, window)
    are validated once, where the block spec is built (``specs.get_s2_gpt_block_spec``); these modules
    check only what reaches them alone: the layer they were built as, and each call's inputs.
    """

    name = "core attention"

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        num_query_groups: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        if attention_type != "self":
            raise S2ConfigError(f"{self.name} supports self-attention only, got attention_type={attention_type!r}")
        self._check_mask_type(attn_mask_type)

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_size, tp_rank = get_pg_size(pg_collection.tp), get_pg_rank(pg_collection.tp)
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = get_pg_size(self.cp_group) if self.cp_group is not None else 1

        # When G < TP, Megatron hands core attention a config copy with num_query_groups = TP; the
        # spec passes the model's real count so KV-group patterns see the true GQA grouping.
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_query_groups if num_query_groups is None else num_query_groups
        self.num_local_heads = self.num_q_heads // self.tp_size
        self.num_local_kv_heads = max(1, self.num_kv_heads // self.tp_size)
        # The global heads of this TP rank; context parallelism places the positions per call.
        self.shard = Shard(self.num_q_heads, self.num_kv_heads, head_start=tp_rank * self.num_local_heads)
        self.head_dim = config.kv_channels

        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the scores
        # back before the softmax: with the softmax in float32 the net scale is unchanged.
        if softmax_scale is None:
            softmax_scale = config.softmax_scale
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # --deterministic-mode asks for bit-identical gradients; otherwise the kernel's default mode.
        self.deterministic = True if config.deterministic_mode else None

    def _check_mask_type(self, mask_type) -> None:
        if mask_type not in _CAUSAL_MASK_TYPES:
            raise S2ConfigError(
                f"{self.name} is causal only, got attn_mask_type={mask_type}. Fix: use it in causal "
                "decoder layers (GPT); keep other layers on Megatron's attention spec"
            )

    def _check_call(self, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        """Validate one forward call; return True for packed (THD) input."""
        self._check_mask_type(self.attn_mask_type if attn_mask_type is None else attn_mask_type)
        if attention_bias is not None:
            raise S2ConfigError(f"{self.name} does not take an attention bias (ALiBi and the like); "
                                "disable the option that creates it (e.g. --position-embedding-type rope)")
        if packed_seq_params is None:
            return False
        if packed_seq_params.qkv_format != "thd":
            raise S2ConfigError(f"{self.name}: packed sequences must use qkv_format='thd', got "
                                f"{packed_seq_params.qkv_format!r}")
        if self.cp_size > 1:
            raise S2ConfigError(f"{self.name}: packed (THD) sequences with context parallelism are not "
                                "supported; use --context-parallel-size 1 or unpacked batches")
        return True

    @staticmethod
    def _sequence_bounds(packed_seq_params):
        """cu_seqlens of the token layout (padded ones when Megatron pads sequences)."""
        p = packed_seq_params
        cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        cu_k = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
        return cu_q, (cu_q if cu_k is None else cu_k)

    def _check_local_shapes(self, query, key) -> None:
        heads, kv_heads, dim = query.shape[-2], key.shape[-2], query.shape[-1]
        if (heads, kv_heads, dim) != (self.num_local_heads, self.num_local_kv_heads, self.head_dim):
            raise ValueError(
                f"{self.name}: expected {self.num_local_heads} query / {self.num_local_kv_heads} KV heads "
                f"of dim {self.head_dim} on this TP rank, got {heads} / {kv_heads} of dim {dim}"
            )


class S2CoreAttention(_CoreAttentionBase):
    """S2 (sparsely-sharded) causal attention as a Megatron core attention.

    Extra constructor arguments (set per layer through the layer spec's ``params``): ``pattern`` (an
    ``S2Pattern`` or ``BlockMaskPattern``), ``cp_exchange`` ("s2" or "allgather"), ``cp_overlap`` (None:
    the exchange's default, see ``context_parallel_attention``), ``layer_index``
    (0-based global layer of this spec, cross-checked against Megatron's ``layer_number``) and
    ``num_query_groups`` (the model's KV-group count, see ``_CoreAttentionBase``).
    """

    name = "S2 core attention"

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, pattern,
                 cp_exchange: str = "s2", cp_overlap: Optional[bool] = None,
                 layer_index: Optional[int] = None, num_query_groups: Optional[int] = None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection, num_query_groups)
        if layer_index is not None and layer_number != layer_index + 1:
            raise S2ConfigError(
                f"S2 layer spec for layer {layer_index} (from 0) was built as Megatron layer_number "
                f"{layer_number} (from 1): the block spec does not match this pipeline stage. Build it "
                "with the same vp_stage/pp_rank as the model"
            )
        self.pattern = pattern
        self.cp_exchange, self.cp_overlap = cp_exchange, cp_overlap
        self.layer_index = layer_number - 1

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        # attention_mask is ignored as in TE's causal attention: S2 is causal by construction.
        packed = self._check_call(attn_mask_type, attention_bias, packed_seq_params)
        self._check_local_shapes(query, key)
        heads = dict(head_start=self.shard.head_start, num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads)
        if packed:
            cu_q, cu_k = self._sequence_bounds(packed_seq_params)
            out = s2_attention(
                query, key, value, self.pattern, softmax_scale=self.softmax_scale,
                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=packed_seq_params.max_seqlen_q,
                max_seqlen_k=packed_seq_params.max_seqlen_kv, deterministic=self.deterministic, **heads,
            )
            return out.reshape(out.shape[0], -1)
        # [s, b, h, d] -> [b, s, h, d] views; the kernel takes strided input.
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        if self.cp_size > 1:
            if q.shape[1] != k.shape[1]:
                raise S2ConfigError("S2 attention with context parallelism needs equal query and key lengths "
                                    "(training); decode with --context-parallel-size 1")
            out = context_parallel_attention(
                q, k, v, self.pattern, cp_group=self.cp_group, exchange=self.cp_exchange,
                overlap=self.cp_overlap, deterministic=self.deterministic,
                softmax_scale=self.softmax_scale, shard=self.shard,
            )
        else:
            out = self._attend_right_aligned(q, k, v, heads)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)

    def _attend_right_aligned(self, q, k, v, heads):
        """Queries shorter than keys (decoding with a KV cache) are the last positions; the kernel
        wants queries to start on a block boundary, so pad them in front up to one."""
        q_start = k.shape[1] - q.shape[1]
        pad = q_start % self.pattern.block_size
        if pad:
            q = torch.cat([q.new_zeros(q.shape[0], pad, *q.shape[2:]), q], 1)
        out = s2_attention(q, k, v, self.pattern, softmax_scale=self.softmax_scale,
                           q_start=q_start - pad, deterministic=self.deterministic, **heads)
        return out[:, pad:]


class SDPACoreAttention(_CoreAttentionBase):
    """Dense causal attention on ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN / flash
    backends on GPUs), for dense layers when Transformer Engine is absent.

    GQA through ``enable_gqa`` (no repeated K/V); packed sequences attend one sequence
    at a time; under context parallelism ``dense_context_parallel_attention`` splits each chunk's
    softmax into PyTorch fused-attention calls (``cp_overlap`` applies only where it falls back to the
    S2 kernel with a dense pattern, e.g. float32 on a GPU).
    """

    name = "SDPA core attention"

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *,
                 cp_overlap: Optional[bool] = None, num_query_groups: Optional[int] = None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection, num_query_groups)
        self.cp_overlap = cp_overlap

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        packed = self._check_call(attn_mask_type, attention_bias, packed_seq_params)
        self._check_local_shapes(query, key)
        if packed:
            cu_q, cu_k = self._sequence_bounds(packed_seq_params)
            # One host sync per layer for the boundaries; each sequence then runs a fused kernel.
            bounds_q = cu_q.tolist()
            bounds_k = bounds_q if cu_k is cu_q else cu_k.tolist()
            outs = [
                self._attend(query[q0:q1].unsqueeze(1), key[k0:k1].unsqueeze(1), value[k0:k1].unsqueeze(1))
                for q0, q1, k0, k1 in _pairs(bounds_q, bounds_k)
            ]
            out = torch.cat(outs, 0)
            return out.reshape(out.shape[0], -1)
        if self.cp_size > 1:
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            out = dense_context_parallel_attention(q, k, v, cp_group=self.cp_group, softmax_scale=self.softmax_scale,
                                                   overlap=self.cp_overlap, deterministic=self.deterministic)
            return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)
        out = self._attend(query, key, value)
        return out.reshape(query.shape[0], query.shape[1], -1)

    def _attend(self, query, key, value):
        """``[s, b, h, d]`` in, ``[s, b, h, d]`` out; causal, queries aligned to the last keys."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        extra = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # torch >= 2.5
        dropout_p = self.dropout_p if self.training else 0.0
        if q.shape[2] == k.shape[2]:
            mask = dict(is_causal=True)
        else:
            from torch.nn.attention.bias import causal_lower_right

            mask = dict(attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
        if dropout_p and not self.config.sequence_parallel:
            # Heads differ across TP ranks, so their dropout draws come from the model-parallel RNG.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.softmax_scale,
                                                     **mask, **extra)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.softmax_scale,
                                                 **mask, **extra)
        return out.permute(2, 0, 1, 3)


def _pairs(bounds_q, bounds_k):
    return [(q0, q1, k0, k1) for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:]))]

