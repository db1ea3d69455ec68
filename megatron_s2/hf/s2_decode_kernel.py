"""Decode attention over the compacted S2 KV cache (s2_kv_cache.py) in Triton: one new query per sequence.

Self-contained (copied next to exported weights with the modeling file). Split-KV ("flash decoding"):
program ``(sequence, KV head, split)`` walks its share of the KV head's blocks, the ``local_blocks``
ring blocks first, then the stripe blocks, reading each block in place (its slot address is
arithmetic on positions, no gather) and once for all query heads of the GQA group; a query head
skips the stripe blocks of residues it does not read. A second small kernel merges the splits'
softmax states (one launch, not a chain of PyTorch ops: decode steps take microseconds). A third
stores a decoding step's token. The pure-PyTorch path (``S2KVCache`` on CPU) is the reference.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves every device
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def s2_decode_kernel_runs_on(q) -> bool:
    """Whether decode steps on ``q`` use the Triton kernel (CUDA tensors with Triton installed)."""
    return triton is not None and q.is_cuda and q.dtype in _DTYPES


if triton is not None:
    # Finite (and a constexpr: kernels read only those globals): a split whose keys are all masked
    # gets weight exp2(MASKED - max) = 0 in the merge, never inf - inf.
    MASKED = tl.constexpr(-1.0e30)

    @triton.jit
    def _s2_decode_split_kernel(
        Q, K, V, LAST, HEAD_READS, RESIDUES, COUNTS, M_OUT, L_OUT, ACC_OUT,
        scale_log2, blocks_per_split, num_kv_heads, num_splits,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_rh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        BLOCK: tl.constexpr, LOCAL: tl.constexpr, STRIDE: tl.constexpr, RESIDUES_PAD: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        RING = LOCAL * BLOCK
        batch_head = tl.program_id(0)
        split = tl.program_id(1)
        b = batch_head // num_kv_heads
        h = batch_head % num_kv_heads
        p = tl.load(LAST + b).to(tl.int64)  # position of the query (the newest stored token)
        query_block = p // BLOCK

        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM_PAD)
        tokens = tl.arange(0, BLOCK)
        row_ok = rows < GROUP
        dim_ok = dims < HEAD_DIM
        heads = h * GROUP + rows
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        # Stripe blocks stored so far: those holding a token at or before p - RING.
        count = tl.load(COUNTS + h).to(tl.int64)
        residue_index = tl.arange(0, RESIDUES_PAD)
        residues = tl.load(RESIDUES + h * stride_rh + residue_index, mask=residue_index < count, other=STRIDE)
        eligible = tl.where(p >= RING, (p - RING) // BLOCK + 1, 0)
        stripe_blocks = (eligible // STRIDE) * count + tl.sum((residues < eligible % STRIDE).to(tl.int64), 0)
        start = split.to(tl.int64) * blocks_per_split
        end = tl.minimum(start + blocks_per_split, LOCAL + stripe_blocks)

        m_i = tl.full([GROUP_PAD], MASKED, tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        for t in range(start, end):
            in_ring = t < LOCAL
            j = tl.maximum(t - LOCAL, 0)  # stripe index
            per_cycle = tl.maximum(count, 1)
            stripe_block = (j // per_cycle) * STRIDE + tl.load(RESIDUES + h * stride_rh + j % per_cycle)
            ring_slots = t * BLOCK + tokens
            ring_pos = p - ((p - ring_slots) % RING + RING) % RING  # newest position in that slot
            slots = tl.where(in_ring, ring_slots, RING + j * BLOCK + tokens)
            pos = tl.where(in_ring, ring_pos, stripe_block * BLOCK + tokens)
            # A stripe block's tail may still wait in the ring (it moves token by token).
            valid = tl.where(in_ring, pos >= 0, pos <= p - RING)
            key_block = tl.maximum(pos, 0) // BLOCK
            reads = tl.load(HEAD_READS + heads[:, None] * STRIDE + (key_block % STRIDE)[None, :],
                            mask=row_ok[:, None], other=0)
            allowed = (valid[None, :] & row_ok[:, None]
                       & (((query_block - key_block) < LOCAL)[None, :] | (reads != 0)))

            k = tl.load(K + b * stride_kb + h * stride_kh + slots[:, None] * stride_ks + dims[None, :],
                        mask=dim_ok[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(allowed, scores * scale_log2, MASKED)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            probs = tl.where(allowed, tl.exp2(scores - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(probs, 1)
            v = tl.load(V + b * stride_vb + h * stride_vh + slots[:, None] * stride_vs + dims[None, :],
                        mask=dim_ok[None, :], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            m_i = m_new

        partial = (b * num_kv_heads * GROUP + heads) * num_splits + split
        tl.store(M_OUT + partial, m_i, mask=row_ok)
        tl.store(L_OUT + partial, l_i, mask=row_ok)
        tl.store(ACC_OUT + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _store_token_kernel(
        K, V, NEW_K, NEW_V, POS, PREVIOUS, MEMBER, RANK, COUNTS, num_kv_heads,
        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_mh,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, LOCAL: tl.constexpr,
        STRIDE: tl.constexpr,
    ):
        """One (sequence, KV head): the token leaving the ring moves to its stripe slot if the KV head
        keeps its block, then the new token takes its ring slot."""
        RING = LOCAL * BLOCK
        batch_head = tl.program_id(0)
        b = batch_head // num_kv_heads
        h = batch_head % num_kv_heads
        p = tl.load(POS + b).to(tl.int64)
        previous = tl.load(PREVIOUS + b).to(tl.int64)
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM
        if p >= 0:  # padding stores nothing
            k_row = K + b * stride_kb + h * stride_kh
            v_row = V + b * stride_vb + h * stride_vh
            slot = p % RING
            old = p - RING
            if (old >= 0) & (previous >= 0):
                old_block = old // BLOCK
                residue = old_block % STRIDE
                if tl.load(MEMBER + h * stride_mh + residue) != 0:
                    stripe = (old_block // STRIDE) * tl.load(COUNTS + h) + tl.load(RANK + h * stride_mh + residue)
                    dest = RING + stripe * BLOCK + old % BLOCK
                    tl.store(k_row + dest * stride_ks + dims, tl.load(k_row + slot * stride_ks + dims, mask=dim_ok),
                             mask=dim_ok)
                    tl.store(v_row + dest * stride_vs + dims, tl.load(v_row + slot * stride_vs + dims, mask=dim_ok),
                             mask=dim_ok)
            tl.store(k_row + slot * stride_ks + dims,
                     tl.load(NEW_K + b * stride_nkb + h * stride_nkh + dims, mask=dim_ok), mask=dim_ok)
            tl.store(v_row + slot * stride_vs + dims,
                     tl.load(NEW_V + b * stride_nvb + h * stride_nvh + dims, mask=dim_ok), mask=dim_ok)

    @triton.jit
    def _merge_splits_kernel(M, L, ACC, OUT, num_splits, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                             SPLITS_PAD: tl.constexpr):
        """One (sequence, query head): the splits' softmax states merged into the output."""
        row = tl.program_id(0)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, DIM_PAD)
        split_ok = splits < num_splits
        dim_ok = dims < HEAD_DIM
        m = tl.load(M + row * num_splits + splits, mask=split_ok, other=MASKED)
        l = tl.load(L + row * num_splits + splits, mask=split_ok, other=0.0)
        acc = tl.load(ACC + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                      mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
        weights = tl.exp2(m - tl.max(m, 0))
        out = tl.sum(acc * weights[:, None], 0) / tl.sum(l * weights, 0)
        tl.store(OUT + row * HEAD_DIM + dims, out.to(OUT.dtype.element_ty), mask=dim_ok)


def s2_store_token(keys, values, new_keys, new_values, positions, previous, geometry):
    """One decoding step's store into one S2 layer of the compacted cache, in one launch (the
    PyTorch path of ``S2KVCache.s2_store`` is a chain of small ops, each a launch).

    ``keys/values``: the layer's buffers; ``new_keys/new_values [b, h_kv, 1, d]`` at ``positions [b]``
    (-1: padding); ``previous [b]``: the last position stored before.
    """
    batch, kv_heads, _, dim = new_keys.shape
    _store_token_kernel[(batch * kv_heads,)](
        keys, values, new_keys, new_values, positions.contiguous(), previous.contiguous(), geometry.member,
        geometry.rank, geometry.count, kv_heads, keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        new_keys.stride(0), new_keys.stride(1), new_values.stride(0), new_values.stride(1),
        geometry.member.stride(0), HEAD_DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)),
        BLOCK=geometry.block, LOCAL=geometry.ring // geometry.block, STRIDE=geometry.stride,
    )


def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def s2_decode_attention(q, keys, values, last, geometry, scale, max_blocks=None, num_splits=None):
    """Attention of one query per sequence over one S2 layer of the compacted cache.

    Args:
        q: ``[batch, heads, head_dim]``, the query at position ``last`` of each sequence.
        keys, values: the layer's cache buffers ``[batch, kv_heads, slots, head_dim]``.
        last: ``[batch]`` position of the query (its key is already stored).
        geometry: the layer's ``S2LayerGeometry``.
        scale: softmax scale.
        max_blocks: upper bound of the blocks a KV head reads (default: all the buffer holds); it
            sizes the splits.
        num_splits: splits of the context per (sequence, KV head) (default: enough programs to fill
            the GPU twice).

    Returns:
        ``[batch, heads, head_dim]`` in the dtype of ``q``.
    """
    if triton is None:
        raise RuntimeError("the S2 decode kernel needs Triton; use the PyTorch path (S2KVCache.s2_decode)")
    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("S2 decode: key/value buffers need a contiguous head dimension")
    local = geometry.ring // geometry.block
    if max_blocks is None:
        max_blocks = local + (keys.shape[2] - 1 - geometry.ring) // geometry.block
    if num_splits is None:
        num_splits = max(1, min(max_blocks, math.ceil(2 * _multiprocessors(q.device) / (batch * kv_heads))))
    blocks_per_split = math.ceil(max_blocks / num_splits)
    num_splits = math.ceil(max_blocks / blocks_per_split)

    q, last = q.contiguous(), last.contiguous()  # the kernel indexes them densely
    m = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(batch, heads, num_splits, dim, device=q.device, dtype=torch.float32)
    group = heads // kv_heads
    dim_pad = max(16, triton.next_power_of_2(dim))
    _s2_decode_split_kernel[(batch * kv_heads, num_splits)](
        q, keys, values, last, geometry.head_reads, geometry.residues, geometry.count, m, l, acc,
        scale * 1.4426950408889634, blocks_per_split, kv_heads, num_splits,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), geometry.residues.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, DIM_PAD=dim_pad,
        BLOCK=geometry.block, LOCAL=local, STRIDE=geometry.stride,
        RESIDUES_PAD=max(2, triton.next_power_of_2(geometry.residues.shape[1])),
        IEEE=q.dtype == torch.float32,
    )
    out = torch.empty_like(q)
    _merge_splits_kernel[(batch * heads,)](m, l, acc, out, num_splits, HEAD_DIM=dim, DIM_PAD=dim_pad,
                                           SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out
