"""Model FLOPs of one training iteration, counting the attention work S2 layers actually do.

Megatron's ``num_floating_point_operations`` assumes every layer attends densely (half of S^2 pairs
per head). This module keeps Megatron's count for everything else (projections, MLP, logits) and
replaces its core-attention term with the team's count (docs/semantics.md, "Counting work"): a head
that attends ``pairs`` (query, key) token pairs costs ``4 * head_dim * pairs`` FLOPs forward and
2.5 times that backward. Pairs come from the layout the kernel runs (``s2_block_mask``), so dense
layers, dense heads, the diagonal blocks' token mask and a ragged last block are all exact.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .layout import s2_block_mask

FORWARD_AND_BACKWARD_FACTOR = 3.5  # backward = 2.5 x forward (docs/semantics.md)


def dense_causal_pairs(seq_len: int) -> int:
    """(query, key) pairs of one head of causal attention: 1 + 2 + ... + seq_len."""
    return seq_len * (seq_len + 1) // 2


@functools.lru_cache(maxsize=64)
def attended_pairs(pattern, num_q_heads: int, num_kv_heads: int, seq_len: int) -> int:
    """(query, key) token pairs one sequence computes, summed over all heads of a layer.

    ``pattern`` is an S2 pattern (``None`` means a dense layer). Off-diagonal blocks count
    ``|q block| * |k block|`` pairs, diagonal blocks ``n (n + 1) / 2``; the last block may be short.
    """
    if pattern is None or pattern.is_dense:
        return num_q_heads * dense_causal_pairs(seq_len)
    block = pattern.block_size
    num_blocks = -(-seq_len // block)
    sizes = torch.full((num_blocks,), block, dtype=torch.float64)
    sizes[-1] = seq_len - block * (num_blocks - 1)
    # Every head computes every diagonal block (token-causal inside it).
    total = num_q_heads * sum(dense_causal_pairs(int(n)) for n in sizes.tolist())
    # One head at a time keeps memory at one [blocks, blocks] mask even at 128k tokens.
    for head in range(num_q_heads):
        mask = s2_block_mask(pattern, num_q_heads, num_kv_heads, seq_len,
                             head_start=head, num_local_heads=1)[0].to(torch.float64)
        mask.fill_diagonal_(0.0)
        total += int((sizes @ mask @ sizes).item())
    return total


def attention_flops_per_sequence(layer_patterns: Sequence, num_q_heads: int, num_kv_heads: int,
                                 head_dim: int, seq_len: int) -> float:
    """Core-attention FLOPs (forward + backward) of one sequence through every layer."""
    pairs = sum(attended_pairs(p, num_q_heads, num_kv_heads, seq_len) for p in layer_patterns)
    return FORWARD_AND_BACKWARD_FACTOR * 4.0 * head_dim * pairs


def megatron_core_attention_flops(args, batch_size: int) -> float:
    """The core-attention term inside Megatron's own count of unpacked batches
    (3 x 4 x D x S^2 / 2 per head)."""
    query_projection = args.kv_channels * args.num_attention_heads
    return batch_size * args.seq_length * args.seq_length * 6.0 * query_projection * args.num_layers


def sparse_aware_flops(megatron_flops_fn, layer_patterns: Sequence):
    """Wrap Megatron's ``num_floating_point_operations`` so it counts S2 attention as done.

    ``layer_patterns[i]`` is layer i's S2 pattern, ``None`` for dense layers. Packed (THD) batches,
    multi-token prediction, MLA and linear-attention variants keep Megatron's own count (its
    attention term has another form there; S2 layers do not combine with the last two), as does a
    model whose layer count differs from ``len(layer_patterns)``.
    """
    patterns = tuple(layer_patterns)

    def num_floating_point_operations(args, batch_size, seqlen_squared_sum_in_batch=None,
                                      total_real_tokens_in_batch=None):
        total = megatron_flops_fn(args, batch_size,
                                  seqlen_squared_sum_in_batch=seqlen_squared_sum_in_batch,
                                  total_real_tokens_in_batch=total_real_tokens_in_batch)
        if (seqlen_squared_sum_in_batch is not None or len(patterns) != args.num_layers
                or getattr(args, "mtp_num_layers", None) or getattr(args, "multi_latent_attention", False)
                or getattr(args, "experimental_attention_variant", None)):
            return total  # Megatron's attention term has another form there; keep its count
        num_kv_heads = args.num_query_groups if args.group_query_attention else args.num_attention_heads
        per_sequence = attention_flops_per_sequence(
            patterns, args.num_attention_heads, num_kv_heads, args.kv_channels, args.seq_length)
        return total - megatron_core_attention_flops(args, batch_size) + batch_size * per_sequence

    return num_floating_point_operations
