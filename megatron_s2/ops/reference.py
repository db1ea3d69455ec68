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


def _masked_probs(q, k, v, mask, scale):
    """Heads-first ``q, k, v`` (KV heads repeated per group) in the compute dtype, the attention
    probabilities ``[b, h, sq, sk]`` and lse ``[b, h, sq, 1]`` (-inf for rows without keys)."""
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
    return qh, kh, vh, probs, lse.masked_fill(~has_key, float("-inf"))


def _dense_masked_attention(q, k, v, mask, scale):
    """q ``[b, sq, h, d]``, k/v ``[b, sk, hkv, d]``, mask ``[h, sq, sk]`` -> out, lse ``[b, h, sq]``."""
    _, _, vh, probs, lse = _masked_probs(q, k, v, mask, scale)
    out = torch.matmul(probs, vh).transpose(1, 2).to(q.dtype)
    return out, lse[..., 0].float()


def _dense_masked_attention_grads(q, k, v, mask, scale, grad_out, grad_lse):
    """``(dq, dk, dv)`` of ``_dense_masked_attention`` for the gradients of its out and lse, written
    out (the CPU fallback of the backward op runs where autograd is off):
    dS = P * (dO V^T - rowsum(dO * O) + dlse)."""
    qh, kh, vh, probs, _ = _masked_probs(q, k, v, mask, scale)
    dout = grad_out.to(qh.dtype).transpose(1, 2)
    delta = (dout * torch.matmul(probs, vh)).sum(-1, keepdim=True) - grad_lse.to(qh.dtype)[..., None]
    dscores = probs * (torch.matmul(dout, vh.transpose(-1, -2)) - delta) * scale
    group = q.shape[2] // k.shape[2]

    def per_kv_head(grad):  # [b, h, sk, d] -> [b, sk, hkv, d], summed over each GQA group
        return grad.unflatten(1, (k.shape[2], group)).sum(2).transpose(1, 2)

    dq = torch.matmul(dscores, kh).transpose(1, 2)
    dk = per_kv_head(torch.matmul(dscores.transpose(-1, -2), qh))
    dv = per_kv_head(torch.matmul(probs.transpose(-1, -2), dout))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
    out, lse = _by_sequence(
        _dense_masked_attention, (q, k, v), (), (1, 2), pattern, softmax_scale=softmax_scale, head_start=head_start,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, q_start=q_start, k_start=k_start,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return (out, lse) if return_lse else out


def s2_attention_reference_grads(grad_out, grad_lse, q, k, v, pattern, **options):
    """``(dq, dk, dv)`` of ``s2_attention_reference(q, k, v, pattern, return_lse=True, **options)``
    for the gradients ``grad_out`` of out and ``grad_lse`` of lse (shapes of out and lse), computed
    without autograd."""
    return _by_sequence(_dense_masked_attention_grads, (q, k, v), (grad_out, grad_lse), (1, 1, 1), pattern,
                        **options)


def _by_sequence(compute, qkv, grads, token_dims, pattern, *, softmax_scale=None, head_start=0, num_q_heads=None,
                 num_kv_heads=None, q_start=0, k_start=0, cu_seqlens_q=None, cu_seqlens_k=None):
    """``compute(q, k, v, token mask, scale, *grads)`` over the batch, or over each packed sequence
    (``[1, len, ...]`` slices; ``grads`` are out-shaped and lse-shaped) with its results, whose token
    dimensions are ``token_dims``, concatenated."""
    q, k, v = qkv
    local_heads, local_kv_heads, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    num_q_heads = local_heads if num_q_heads is None else num_q_heads
    num_kv_heads = local_kv_heads if num_kv_heads is None else num_kv_heads
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale

    def attend(qs, ks, vs, *gs):
        mask = _token_mask(pattern, num_q_heads, num_kv_heads, qs.shape[1], ks.shape[1],
                           head_start, local_heads, q_start, k_start, q.device)
        return compute(qs, ks, vs, mask, scale, *gs)

    if cu_seqlens_q is None:
        return attend(q, k, v, *grads)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = []
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        grad_slices = [g[None, q0:q1] if g.dim() == 3 else g[None, :, q0:q1] for g in grads]
        parts.append(attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], *grad_slices))
    return tuple(torch.cat([part[i][0] for part in parts], dim - 1) for i, dim in enumerate(token_dims))


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
