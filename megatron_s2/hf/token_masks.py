"""Which keys each query head attends, and dense attention under such a mask: the pure-PyTorch S2 path.

Self-contained (copied next to exported weights with the modeling file). It runs on any device and is
the reference that the Triton prefill and decode kernels are checked against.
"""

import functools

import torch
import torch.nn.functional as F


def s2_token_mask(layer, q_pos, k_pos):
    """Bool ``[b, h, q, k]``: which keys each query head attends in an S2 layer.

    ``layer`` is an ``s2_layers`` entry; ``q_pos [b, q]``; ``k_pos [b, k]`` or ``[b, h_kv, k]`` (per KV
    head, for the compacted cache); position -1 marks padding. ``vert_stride`` 0 means window only.
    """
    block, heads, stride = layer["block_size"], len(layer["head_offsets"]), layer["vert_stride"]
    offsets = _offsets_tensor(tuple(layer["head_offsets"]), q_pos.device)
    if k_pos.dim() == 3:  # per KV head -> per query head
        k_pos = k_pos.repeat_interleave(heads // k_pos.shape[1], dim=1)
    else:
        k_pos = k_pos[:, None]
    qb = (q_pos // block)[:, None, :, None]
    kb = (k_pos // block)[:, :, None, :]
    sparse_ok = (qb - kb) < layer["local_blocks"]
    if stride > 0:
        sparse_ok = sparse_ok | ((kb + offsets[:, None, None]) % stride == 0)
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


def dense_attention(q, k, v, q_pos, k_pos, scale, unpadded):
    """Causal attention of a dense layer; without padding SDPA needs no mask (its fast kernels)."""
    if unpadded and q.shape[2] == 1:
        # One new token sees every stored key: the query heads of a KV group become that group's
        # queries, so each K/V is read once per group by any SDPA backend (no GQA support needed).
        batch, heads, _, dim = q.shape
        out = F.scaled_dot_product_attention(q.reshape(batch, k.shape[1], -1, dim), k, v, scale=scale)
        return out.reshape(batch, heads, 1, dim)
    if unpadded and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return masked_attention(q, k, v, causal_token_mask(q_pos, k_pos), scale)
