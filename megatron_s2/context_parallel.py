"""Context parallelism (CP) for S2 attention: exact CP=1 results with two K/V exchanges.

Megatron's CP splits every sequence into ``2*cp`` equal chunks; CP rank ``r`` holds chunks ``r``
and ``2*cp-1-r`` (load balancing under the causal mask), concatenated. Queries keep their absolute
positions, so each local chunk runs the ordinary S2 kernel with ``q_start = chunk * chunk_len``
against keys laid out at their absolute positions ``0..end of the chunk``.

Two ways to bring the keys there:

- ``"allgather"``: all-gather K/V over the CP group, reduce-scatter dK/dV in backward. Simple,
  pattern-independent, moves ``(cp-1)/cp`` of the whole sequence's K/V to every rank.
- ``"s2"``: every rank receives only the (KV head, key block) pairs that its local query chunks
  attend (window halo plus its heads' stripes) through one ``all_to_all``, and sends back gradients
  only for those. All ranks of a CP group hold the same heads (same TP rank), so each rank derives
  every other rank's needs from the pattern: no metadata is exchanged, and the index lists are
  cached per (pattern, heads, sequence length, CP size, rank).

Both exchanges place K/V in a buffer as long as the keys the rank reads (blocks it does not need
stay zero and are never read by its layout), so the attention call is identical and the results
are the same bit for bit; the S2 exchange saves communication, not memory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist

from .attention import s2_attention
from .layout import Pattern, s2_block_mask
from .pattern import S2ConfigError, check_head_counts

EXCHANGES = ("allgather", "s2")

# torch >= 2.14 renamed the tensor collectives; the GPU image (torch 2.11) has only the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor




def validate_context_parallel(seq_len: int, cp_size: int, block_size: int) -> None:
    """Raise ValueError unless ``seq_len`` splits into ``2*cp_size`` chunks of whole blocks.

    The S2 pattern works on absolute block indices, so every CP chunk must start on a block
    boundary. Used by the config validator at start-up and by ``context_parallel_attention``.
    """
    for name, value in (("seq_len", seq_len), ("cp_size", cp_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    unit = 2 * cp_size * block_size
    if seq_len % unit:
        lower, upper = seq_len // unit * unit, (seq_len // unit + 1) * unit
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * context_parallel_size * block_size "
            f"= 2 * {cp_size} * {block_size} = {unit}: context parallelism cuts the sequence into "
            f"{2 * cp_size} chunks that must start on S2 block boundaries. Use a sequence length "
            f"such as {upper}" + (f" or {lower}" if lower else "") + ", a smaller block_size or a "
            f"smaller context-parallel size."
        )


def chunks_of_rank(cp_rank: int, cp_size: int) -> tuple:
    """The two chunk indices (of ``2*cp_size``) that CP rank ``cp_rank`` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


# -- the S2-aware exchange plan ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ExchangePlan:
    """Which (KV head, key block) pairs this rank sends to and receives from each CP rank.

    Sends are indexed by (local block in this rank's local sequence, local KV head), receives by
    (absolute block, local KV head), both concatenated in CP-rank order with the given split sizes.
    """

    send_blocks: torch.Tensor
    send_heads: torch.Tensor
    send_splits: list
    recv_blocks: torch.Tensor
    recv_heads: torch.Tensor
    recv_splits: list
    num_key_blocks: int  # length of the key buffer, in blocks: up to the end of the last local chunk


def _owner(abs_block: torch.Tensor, blocks_per_chunk: int, cp_size: int):
    """CP rank that holds each absolute block, and the block's index in that rank's sequence."""
    chunk = abs_block // blocks_per_chunk
    second_half = chunk >= cp_size
    rank = torch.where(second_half, 2 * cp_size - 1 - chunk, chunk)
    local = abs_block % blocks_per_chunk + second_half.long() * blocks_per_chunk
    return rank, local


@functools.lru_cache(maxsize=64)
def _kv_block_needs(pattern, num_q_heads, num_kv_heads, head_start, num_local_heads,
                    num_local_kv_heads, seq_len, cp_size, cp_rank) -> torch.Tensor:
    """Bool ``[local KV heads, total blocks]``: the key blocks each local KV head must hold on
    ``cp_rank`` (union over its query heads and over both local query chunks)."""
    chunk_len = seq_len // (2 * cp_size)
    needs = torch.zeros(num_local_kv_heads, seq_len // pattern.block_size, dtype=torch.bool)
    group = num_local_heads // num_local_kv_heads
    # One query head at a time keeps memory at one chunk's [q blocks, k blocks] mask at 1M tokens.
    for head in range(num_local_heads):
        for chunk in chunks_of_rank(cp_rank, cp_size):
            mask = s2_block_mask(
                pattern, num_q_heads, num_kv_heads, chunk_len, (chunk + 1) * chunk_len,
                head_start=head_start + head, num_local_heads=1, q_start=chunk * chunk_len,
            )
            needs[head // group, : mask.shape[2]] |= mask[0].any(0)
    return needs


def _remote_pairs(needs, blocks_per_chunk, cp_size, dst_rank, src_rank):
    """(absolute block, local block on src, KV head) of what ``dst_rank`` needs from ``src_rank``,
    ordered by (block, head) on both sides."""
    blocks_by_head = needs.t().nonzero()  # rows (abs block, head), sorted by block then head
    abs_block, head = blocks_by_head[:, 0], blocks_by_head[:, 1]
    owner, local = _owner(abs_block, blocks_per_chunk, cp_size)
    keep = owner == src_rank
    return abs_block[keep], local[keep], head[keep]


@functools.lru_cache(maxsize=64)
def _exchange_plan(pattern, num_q_heads, num_kv_heads, head_start, num_local_heads,
                   num_local_kv_heads, seq_len, cp_size, cp_rank, device) -> ExchangePlan:
    blocks_per_chunk = seq_len // (2 * cp_size) // pattern.block_size
    common = (pattern, num_q_heads, num_kv_heads, head_start, num_local_heads, num_local_kv_heads,
              seq_len, cp_size)
    my_needs = _kv_block_needs(*common, cp_rank)
    send_blocks, send_heads, recv_blocks, recv_heads = [], [], [], []
    for other in range(cp_size):
        if other == cp_rank:  # own blocks are copied locally, not sent
            empty = torch.zeros(0, dtype=torch.long)
            send_blocks.append(empty), send_heads.append(empty)
            recv_blocks.append(empty), recv_heads.append(empty)
            continue
        _, local, head = _remote_pairs(_kv_block_needs(*common, other), blocks_per_chunk,
                                       cp_size, other, cp_rank)
        send_blocks.append(local), send_heads.append(head)
        abs_block, _, head = _remote_pairs(my_needs, blocks_per_chunk, cp_size, cp_rank, other)
        recv_blocks.append(abs_block), recv_heads.append(head)
    last_chunk = chunks_of_rank(cp_rank, cp_size)[1]
    return ExchangePlan(
        send_blocks=torch.cat(send_blocks).to(device),
        send_heads=torch.cat(send_heads).to(device),
        send_splits=[len(x) for x in send_blocks],
        recv_blocks=torch.cat(recv_blocks).to(device),
        recv_heads=torch.cat(recv_heads).to(device),
        recv_splits=[len(x) for x in recv_blocks],
        num_key_blocks=(last_chunk + 1) * blocks_per_chunk,
    )


def exchange_plan(pattern: Pattern, *, seq_len: int, cp_size: int, cp_rank: int, num_q_heads: int,
                  num_kv_heads: int, head_start: int = 0, num_local_heads: Optional[int] = None,
                  num_local_kv_heads: Optional[int] = None, device=None) -> ExchangePlan:
    """The cached S2 exchange plan of one CP rank (``seq_len`` is the full sequence length)."""
    validate_context_parallel(seq_len, cp_size, pattern.block_size)
    check_head_counts(num_q_heads, num_kv_heads)
    num_local_heads = num_q_heads if num_local_heads is None else num_local_heads
    num_local_kv_heads = num_kv_heads if num_local_kv_heads is None else num_local_kv_heads
    if num_local_heads % num_local_kv_heads:
        raise ValueError(f"{num_local_heads} local query heads are not a multiple of "
                         f"{num_local_kv_heads} local KV heads")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is outside the CP group of size {cp_size}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _exchange_plan(pattern, num_q_heads, num_kv_heads, head_start, num_local_heads,
                          num_local_kv_heads, seq_len, cp_size, cp_rank, device)


def kv_exchange_bytes(pattern: Pattern, *, exchange: str, seq_len: int, cp_size: int,
                      num_q_heads: int, num_kv_heads: int, head_dim: int, batch_size: int = 1,
                      element_size: int = 2, head_start: int = 0,
                      num_local_heads: Optional[int] = None,
                      num_local_kv_heads: Optional[int] = None) -> list:
    """Bytes of K and V that each CP rank receives in the forward pass of one layer.

    The backward pass moves the same number of gradient bytes in the opposite direction. With TP,
    pass the heads of one TP rank (``head_start``, ``num_local_*``): the result is per GPU.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    validate_context_parallel(seq_len, cp_size, pattern.block_size)
    num_local_kv_heads = num_kv_heads if num_local_kv_heads is None else num_local_kv_heads
    bytes_per_token_head = 2 * batch_size * head_dim * element_size  # K and V
    if exchange == "allgather":
        remote_tokens = seq_len - seq_len // cp_size
        return [remote_tokens * num_local_kv_heads * bytes_per_token_head] * cp_size
    return [
        sum(exchange_plan(pattern, seq_len=seq_len, cp_size=cp_size, cp_rank=rank,
                          num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          head_start=head_start, num_local_heads=num_local_heads,
                          num_local_kv_heads=num_local_kv_heads).recv_splits)
        * pattern.block_size * bytes_per_token_head
        for rank in range(cp_size)
    ]


# -- exchanges as autograd functions -----------------------------------------------------------


def _rank_major_to_absolute(kv: torch.Tensor, cp_size: int) -> torch.Tensor:
    """``[cp, 2, b, s_local, h, d]`` gathered per rank -> ``[2, b, seq, h, d]`` in sequence order."""
    cp, two, b, s_local, h, d = kv.shape
    halves = kv.view(cp, two, b, 2, s_local // 2, h, d)
    # Chunks 0..cp-1 are the first halves of ranks 0..cp-1, chunks cp..2cp-1 the second halves of
    # ranks cp-1..0.
    chunks = torch.cat([halves[:, :, :, 0], halves[:, :, :, 1].flip(0)], 0)
    return chunks.permute(1, 2, 0, 3, 4, 5).reshape(two, b, cp * s_local, h, d)


def _absolute_to_rank_major(kv: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Inverse of ``_rank_major_to_absolute``."""
    two, b, seq, h, d = kv.shape
    chunks = kv.view(two, b, 2 * cp_size, seq // (2 * cp_size), h, d).permute(2, 0, 1, 3, 4, 5)
    halves = torch.stack([chunks[:cp_size], chunks[cp_size:].flip(0)], 3)
    return halves.reshape(cp_size, two, b, seq // cp_size, h, d)


class _AllGatherKV(torch.autograd.Function):
    """All-gather K/V to absolute order; backward reduce-scatters dK/dV to the owners."""

    @staticmethod
    def forward(ctx, k, v, group):
        ctx.group = group
        cp_size = dist.get_world_size(group)
        local = torch.stack([k, v])
        # Concatenated (not stacked) along dim 0: the form every backend accepts.
        gathered = local.new_empty((cp_size * local.shape[0], *local.shape[1:]))
        _all_gather_tensor(gathered, local, group=group)
        full = _rank_major_to_absolute(gathered.view(cp_size, *local.shape), cp_size)
        return full[0], full[1]

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        cp_size = dist.get_world_size(ctx.group)
        rank_major = _absolute_to_rank_major(torch.stack([grad_k, grad_v]), cp_size).contiguous()
        local = rank_major.new_empty(rank_major.shape[1:])
        _reduce_scatter_tensor(local, rank_major.flatten(0, 1), group=ctx.group)
        return local[0], local[1], None


def _blocks_view(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[2, b, s, h, d]`` -> view ``[blocks, h, 2, b, block, d]`` for (block, head) indexing."""
    two, b, s, h, d = kv.shape
    return kv.view(two, b, s // block_size, block_size, h, d).permute(2, 4, 0, 1, 3, 5)


class _S2ExchangeKV(torch.autograd.Function):
    """Receive only the (KV head, block) pairs of the plan into an absolute-position buffer."""

    @staticmethod
    def forward(ctx, k, v, plan, group, block_size):
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        local = torch.stack([k, v])
        two, b, s_local, h, d = local.shape
        ctx.plan, ctx.group, ctx.block_size, ctx.chunk_len = plan, group, block_size, s_local // 2
        send = _blocks_view(local, block_size)[plan.send_blocks, plan.send_heads].contiguous()
        recv = send.new_empty((sum(plan.recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send, plan.recv_splits, plan.send_splits, group=group)

        full = local.new_zeros(two, b, plan.num_key_blocks * block_size, h, d)
        _blocks_view(full, block_size)[plan.recv_blocks, plan.recv_heads] = recv
        chunk_len = ctx.chunk_len
        for half, chunk in enumerate(chunks_of_rank(cp_rank, cp_size)):
            full[:, :, chunk * chunk_len : (chunk + 1) * chunk_len] = (
                local[:, :, half * chunk_len : (half + 1) * chunk_len])
        return full[0], full[1]

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        plan, group, block_size = ctx.plan, ctx.group, ctx.block_size
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        full = torch.stack([grad_k, grad_v])
        send = _blocks_view(full, block_size)[plan.recv_blocks, plan.recv_heads].contiguous()
        recv = send.new_empty((sum(plan.send_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send, plan.send_splits, plan.recv_splits, group=group)

        chunk_len = ctx.chunk_len
        local = torch.cat([full[:, :, c * chunk_len : (c + 1) * chunk_len]
                           for c in chunks_of_rank(cp_rank, cp_size)], 2)
        # A block read by several ranks gets the sum of their gradients.
        _blocks_view(local, block_size).index_put_((plan.send_blocks, plan.send_heads), recv,
                                                   accumulate=True)
        return local[0], local[1], None, None, None


# -- entry point -------------------------------------------------------------------------------


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    cp_group,
    exchange: str = "allgather",
    softmax_scale: Optional[float] = None,
    head_start: int = 0,
    num_q_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
) -> torch.Tensor:
    """S2 attention over a sequence split across the CP group, equal to the CP=1 result.

    ``q [b, s_local, h_local, d]``, ``k, v [b, s_local, h_kv_local, d]`` hold this rank's two
    load-balanced chunks (``r`` and ``2*cp-1-r``) concatenated; ``num_q_heads``/``num_kv_heads``
    are global head counts and ``head_start`` the global index of the first local query head (all
    ranks of a CP group hold the same heads). Returns ``out [b, s_local, h_local, d]``.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, h_kv, d] of equal shapes, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must share batch and local sequence: {tuple(q.shape)} vs "
                         f"{tuple(k.shape)} (packed/THD input is not supported under CP)")
    batch, s_local, local_heads, _ = q.shape
    local_kv_heads = k.shape[2]
    num_q_heads = local_heads if num_q_heads is None else num_q_heads
    num_kv_heads = local_kv_heads if num_kv_heads is None else num_kv_heads
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if cp_size == 1:
        return s2_attention(q, k, v, pattern, softmax_scale=softmax_scale, head_start=head_start,
                         num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    block_size = pattern.block_size
    validate_context_parallel(s_local * cp_size, cp_size, block_size)

    if exchange == "allgather":
        k_full, v_full = _AllGatherKV.apply(k, v, cp_group)
    else:
        plan = exchange_plan(pattern, seq_len=s_local * cp_size, cp_size=cp_size, cp_rank=cp_rank,
                             num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                             head_start=head_start, num_local_heads=local_heads,
                             num_local_kv_heads=local_kv_heads, device=k.device)
        k_full, v_full = _S2ExchangeKV.apply(k, v, plan, cp_group, block_size)

    chunk_len = s_local // 2
    outs = []
    for half, chunk in enumerate(chunks_of_rank(cp_rank, cp_size)):
        key_end = (chunk + 1) * chunk_len  # causal: a chunk reads no key past its own end
        outs.append(s2_attention(
            q[:, half * chunk_len : (half + 1) * chunk_len], k_full[:, :key_end],
            v_full[:, :key_end], pattern, softmax_scale=softmax_scale, head_start=head_start,
            num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, q_start=chunk * chunk_len,
        ))
    return torch.cat(outs, 1)
