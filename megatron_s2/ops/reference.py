"""S2 attention in plain PyTorch: dense attention under the S2 token mask.

The independent reference for every test (run it in float64) and the CPU fallback of
``s2_attention``. It materializes ``[batch, heads, q, k]`` scores, so it is for short sequences only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .layout import Pattern, s2_block_mask


def _token_mask(pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start, num_local_heads,
                q_start, k_start, device):
    """Bool ``[heads, q_len, kv_len]``: the block mask at token resolution plus token causality."""
    blocks = s2_block_mask(
        pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start=head_start,
        num_local_heads=num_local_heads, q_start=q_start, k_start=k_start, device=device,
    )
    block = pattern.block_size
    tokens = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :q_len, :kv_len]
    q_pos = q_start + torch.arange(q_len, device=device)
    k_pos = k_start + torch.arange(kv_len, device=device)
    return tokens & (k_pos[None, :] <= q_pos[:, None])


def _dense_masked_attention(q, k, v, mask, scale):
    """q ``[b, sq, h, d]``, k/v ``[b, sk, hkv, d]``, mask ``[h, sq, sk]`` -> out, lse ``[b, h, sq]``."""
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    group = q.shape[2] // k.shape[2]
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, 1)
    vh = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, 1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    # Rows without any key (key ranges that end before them) give out 0 and lse -inf; their scores
    # are made finite first so that no gradient through them is NaN.
    has_key = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(~mask, 0.0)
    out = torch.matmul(probs, vh).transpose(1, 2).to(q.dtype)
    return out, lse.masked_fill(~has_key, float("-inf"))[..., 0].float()


def s2_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    softmax_scale: Optional[float] = None,
    head_start: int = 0,
    num_q_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    q_start: int = 0,
    k_start: int = 0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
):
    """Same signature and result as ``megatron_s2.s2_attention``.

    ``q [batch, seq, heads, dim]`` (or ``[tokens, heads, dim]`` with ``cu_seqlens_*``); returns
    ``out`` like ``q`` and, with ``return_lse``, ``lse`` float32 ``[batch, heads, seq]`` (packed:
    ``[heads, tokens]``).
    """
    local_heads, local_kv_heads, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    num_q_heads = local_heads if num_q_heads is None else num_q_heads
    num_kv_heads = local_kv_heads if num_kv_heads is None else num_kv_heads
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale

    def attend(qs, ks, vs):
        mask = _token_mask(pattern, num_q_heads, num_kv_heads, qs.shape[1], ks.shape[1],
                           head_start, local_heads, q_start, k_start, q.device)
        return _dense_masked_attention(qs, ks, vs, mask, scale)

    if cu_seqlens_q is None:
        out, lse = attend(q, k, v)
    else:
        if cu_seqlens_k is None:
            cu_seqlens_k = cu_seqlens_q
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
            o, l = attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1])
            outs.append(o[0])
            lses.append(l[0])
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out


def s2_attention_reference_backward(grad_out, q, k, v, out, lse, pattern, **kwargs):
    """Same signature and result as ``megatron_s2.ops.attention.s2_attention_backward``: the gradients
    of one key range of a split softmax, given the merged ``out`` and ``lse``. By autograd through
    the reference: the range's share of the merged output is ``exp(lse_range - lse) * out_range``,
    and the merged lse's dependence on this range's scores adds ``-delta * exp(lse_range - lse)``
    with ``delta = rowsum(grad_out * out)``."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        part_out, part_lse = s2_attention_reference(*inputs, pattern, return_lse=True, **kwargs)
        share = torch.exp(part_lse - lse).transpose(1, 2)  # [b, s, h]
        delta = (grad_out.to(part_out.dtype) * out.to(part_out.dtype)).sum(-1)
        objective = (grad_out.to(part_out.dtype) * part_out * share[..., None]).sum() - (delta * share).sum()
        return torch.autograd.grad(objective, inputs)


def merge_by_lse(part_a, part_b):
    """One softmax over two key ranges from each range's ``(out [b, s, h, d], lse [b, h, s])``."""
    (out_a, lse_a), (out_b, lse_b) = part_a, part_b
    lse = torch.logaddexp(lse_a, lse_b)
    weights = [torch.exp(part - lse).nan_to_num(0.0).transpose(1, 2)[..., None] for part in (lse_a, lse_b)]
    wide = torch.promote_types(out_a.dtype, torch.float32)
    out = out_a.to(wide) * weights[0] + out_b.to(wide) * weights[1]
    return out.to(out_a.dtype), lse
