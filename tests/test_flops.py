"""megatron_s2.ops.flops: the attended pairs of a layout, and Megatron's FLOP count with the attention
term replaced by the S2-aware one."""

import pytest

from megatron_s2.ops import flops
from megatron_s2.ops.pattern import S2Pattern


def _pairs_by_formula(block, local, stride, offsets, seq_len):
    """Attended (q, k) token pairs, summed over heads, from docs/semantics.md written out."""
    total = 0
    for offset in offsets:
        for q in range(seq_len):
            for k in range(q + 1):
                qb, kb = q // block, k // block
                if offset is None or qb - kb < local or (kb + offset) % stride == 0:
                    total += 1
    return total


@pytest.mark.parametrize("seq_len", [96, 100])  # 100: a ragged last block
def test_sparse_flops_count_the_pairs_the_layout_attends(seq_len):
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)
    # 4 heterogeneous heads, step max(1, 4 // 4) = 1: offsets 0, 1, 2; the last head is dense.
    offsets = [0, 1, 2, None]
    assert flops.attended_pairs(pattern, 4, 4, seq_len) == _pairs_by_formula(16, 2, 4, offsets, seq_len)
    assert flops.attended_pairs(None, 4, 4, seq_len) == _pairs_by_formula(16, 1, 1, [None] * 4, seq_len)


def test_sparse_aware_flops_replace_only_the_attention_term():
    from argparse import Namespace

    from megatron.training.training import num_floating_point_operations as megatron_flops
    args = Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     group_query_attention=False, num_query_groups=4, kv_channels=16, seq_length=64,
                     swiglu=True, padded_vocab_size=256)
    full = Namespace(**vars(args))
    for name in ("num_experts", "mtp_num_layers", "moe_latent_size", "moe_ffn_hidden_size",
                 "moe_shared_expert_intermediate_size", "experimental_attention_variant",
                 "hybrid_layer_pattern"):
        setattr(full, name, None)
    full.multi_latent_attention = full.attention_output_gate = False
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)
    counted = flops.sparse_aware_flops(megatron_flops, [None, pattern])(full, 3)
    dense_part = megatron_flops(full, 3) - 3 * 64 * 64 * 6 * 64 * 2
    attention = 3 * 3.5 * 4 * 16 * (4 * 64 * 65 // 2 + flops.attended_pairs(pattern, 4, 4, 64))
    assert counted == pytest.approx(dense_part + attention, rel=1e-12)
    assert attention < 3 * 3.5 * 4 * 16 * 2 * (4 * 64 * 65 // 2)  # the S2 layer costs less
