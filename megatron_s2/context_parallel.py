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
stay zero and are never read by its layout), so the attention calls are identical and so are the
results. Between forward and backward a layer keeps only this rank's K/V (plus, for the S2
exchange, the received blocks) and rebuilds the buffer in backward (``KeyBufferSaver``); the
all-gather gathers a second time for that.
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
    """Raise S2ConfigError (a ValueError) unless ``seq_len`` splits into ``2*cp_size`` chunks of whole blocks.

    The S2 pattern works on absolute block indices, so every CP chunk must start on a block
    boundary. Used by the config validator at start-up and by ``context_parallel_attention``.
    """
    for name, value in (("seq_len", seq_len), ("cp_size", cp_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise S2ConfigError(f"{name} must be a positive integer, got {value!r}")
    unit = 2 * cp_size * block_size
    if seq_len % unit:
        lower, upper = seq_len // unit * unit, (seq_len // unit + 1) * unit
        raise S2ConfigError(
            f"sequence length {seq_len} is not divisible by 2 * context_parallel_size * block_size "
            f"= 2 * {cp_size} * {block_size} = {unit}: context parallelism cuts the sequence into "
            f"{2 * cp_size} chunks that must start on S2 block boundaries. Use a sequence length "
            f"such as {upper}" + (f" or {lower}" if lower else "") + ", a smaller block_size or a "
            "smaller context-parallel size."
        )


def _check_exchange(exchange: str) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


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


def _owner(abs_block: torch.Tensor, blocks_per_chunk: int, cp_size: int):
    """CP rank that holds each absolute block, and the block's index in that rank's sequence."""
    chunk = abs_block // blocks_per_chunk
    second_half = chunk >= cp_size
    rank = torch.where(second_half, 2 * cp_size - 1 - chunk, chunk)
    local = abs_block % blocks_per_chunk + second_half.long() * blocks_per_chunk
    return rank, local


_MASK_ELEMENTS_PER_CALL = 1 << 27  # bounds the transient block mask (~128 MiB of bools) at 1M tokens


@functools.lru_cache(maxsize=64)
def _kv_block_needs(pattern, num_q_heads, num_kv_heads, head_start, num_local_heads,
                    num_local_kv_heads, seq_len, cp_size, cp_rank, device) -> torch.Tensor:
    """Bool ``[local KV heads, total blocks]`` (on the CPU): the key blocks each local KV head must
    hold on ``cp_rank`` (union over its query heads and over both local query chunks)."""
    chunk_len = seq_len // (2 * cp_size)
    block_size = pattern.block_size
    needs = torch.zeros(num_local_heads, seq_len // block_size, dtype=torch.bool, device=device)
    for chunk in chunks_of_rank(cp_rank, cp_size):
        key_blocks = (chunk + 1) * chunk_len // block_size
        heads_per_call = max(1, _MASK_ELEMENTS_PER_CALL // (chunk_len // block_size * key_blocks))
        for first in range(0, num_local_heads, heads_per_call):
            count = min(heads_per_call, num_local_heads - first)
            mask = s2_block_mask(
                pattern, num_q_heads, num_kv_heads, chunk_len, (chunk + 1) * chunk_len,
                head_start=head_start + first, num_local_heads=count, q_start=chunk * chunk_len,
                device=device,
            )
            needs[first : first + count, :key_blocks] |= mask.any(1)
    group = num_local_heads // num_local_kv_heads
    return needs.view(num_local_kv_heads, group, -1).any(1).cpu()


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
    my_needs = _kv_block_needs(*common, cp_rank, device)
    send_blocks, send_heads, recv_blocks, recv_heads = [], [], [], []
    for other in range(cp_size):
        if other == cp_rank:  # own blocks are copied locally, not sent
            empty = torch.zeros(0, dtype=torch.long)
            send_blocks.append(empty), send_heads.append(empty)
            recv_blocks.append(empty), recv_heads.append(empty)
            continue
        _, local, head = _remote_pairs(_kv_block_needs(*common, other, device), blocks_per_chunk,
                                       cp_size, other, cp_rank)
        send_blocks.append(local), send_heads.append(head)
        abs_block, _, head = _remote_pairs(my_needs, blocks_per_chunk, cp_size, cp_rank, other)
        recv_blocks.append(abs_block), recv_heads.append(head)
    return ExchangePlan(
        send_blocks=torch.cat(send_blocks).to(device),
        send_heads=torch.cat(send_heads).to(device),
        send_splits=[len(x) for x in send_blocks],
        recv_blocks=torch.cat(recv_blocks).to(device),
        recv_heads=torch.cat(recv_heads).to(device),
        recv_splits=[len(x) for x in recv_blocks],
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
                         f"{num_local_kv_heads} local KV heads: pass the heads of one TP rank (query heads / TP "
                         f"and max(1, KV heads / TP))")
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

    Backward returns the same number of gradient bytes; the all-gather exchange also gathers K/V a
    second time (so a training step moves 3x this number with ``"allgather"``, 2x with ``"s2"``).
    With TP, pass the heads of one TP rank (``head_start``, ``num_local_*``): the result is per GPU.
    """
    _check_exchange(exchange)
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
#
# K/V travel together in sequence-major buffers ``[seq, 2 (K, V), batch, heads, dim]``: a range of
# positions is then one contiguous slab, so collectives write straight into place and chunks move
# with plain copies. The kernel reads K and V as strided ``[batch, seq, heads, dim]`` views.


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` K and V -> one contiguous ``[s, 2, b, h, d]`` buffer."""
    return torch.stack([k.transpose(0, 1), v.transpose(0, 1)], 1)


def _unpack(kv: torch.Tensor):
    """``[s, 2, b, h, d]`` -> strided K, V views ``[b, s, h, d]``."""
    return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


def _key_views(full: torch.Tensor, key_ends):
    """K/V views of the two local chunks' key ranges (prefixes of one buffer)."""
    k, v = _unpack(full)
    early, late = key_ends
    return k[:, :early], v[:, :early], k[:, :late], v[:, :late]


def _sum_key_grads(grads, key_ends, length: int) -> torch.Tensor:
    """Gradients of the two chunks' key views -> ``[length, 2, b, h, d]`` (zero past the keys read)."""
    dk_early, dv_early, dk_late, dv_late = grads
    early, late = key_ends
    packed = _pack(dk_late, dv_late)
    if late < length:
        packed = torch.cat([packed, packed.new_zeros(length - late, *packed.shape[1:])])
    packed[:early] += _pack(dk_early, dv_early)
    return packed


def _blocks(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[s, 2, b, h, d]`` -> view ``[blocks, h, block, 2, b, d]`` for (block, head) indexing."""
    s, two, b, h, d = kv.shape
    return kv.view(s // block_size, block_size, two, b, h, d).permute(0, 4, 1, 2, 3, 5)


class KeyBufferSaver:
    """Saved-tensor hooks that keep an exchange's key buffer compact between forward and backward.

    The attention kernel saves its K/V inputs, views of a buffer as long as every key the rank reads.
    Inside ``hooks()`` those views are saved as a description only, and the buffer is rebuilt once
    per backward from what built it: this rank's K/V and the received blocks (S2 exchange), or this
    rank's K/V and a second all-gather (all-gather exchange). A layer then keeps about its own K/V
    for backward instead of the whole prefix.
    """

    def __init__(self):
        self._storage, self._rebuild = None, None
        self._full, self._num_saved, self._remaining = None, 0, 0

    def track(self, full: torch.Tensor, rebuild) -> None:
        self._storage, self._rebuild = full.untyped_storage().data_ptr(), rebuild

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor):
        if self._storage is None or tensor.untyped_storage().data_ptr() != self._storage:
            return tensor
        self._num_saved += 1
        return _BufferView(tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, _BufferView):
            return packed
        if self._full is None:
            self._full, self._remaining = self._rebuild(), self._num_saved
        view = self._full.as_strided(packed.size, packed.stride, packed.offset)
        self._remaining -= 1
        if self._remaining == 0:  # every saved view is out: the kernels' backward holds the buffer
            self._full = None
        return view


@dataclasses.dataclass(frozen=True)
class _BufferView:
    size: tuple
    stride: tuple
    offset: int


def _gathered_key_buffer(local, group):
    """All ranks' K/V ``[seq, 2, b, h, d]`` in sequence order, from this rank's ``local``."""
    cp_size = dist.get_world_size(group)
    chunk_len = local.shape[0] // 2
    full = local.new_empty(2 * cp_size * chunk_len, *local.shape[1:])
    # Chunks 0..cp-1 are the first halves of ranks 0..cp-1: gathered straight into place.
    _all_gather_tensor(full[: cp_size * chunk_len], local[:chunk_len], group=group)
    # Chunks cp..2cp-1 are the second halves of ranks cp-1..0: gathered, then reversed.
    late = local.new_empty(cp_size, chunk_len, *local.shape[1:])
    _all_gather_tensor(late.view(-1, *local.shape[1:]), local[chunk_len:], group=group)
    full[cp_size * chunk_len :].view_as(late).copy_(late.flip(0))
    return full


class _AllGatherKV(torch.autograd.Function):
    """All-gather K/V to absolute order; backward reduce-scatters dK/dV to the owners."""

    @staticmethod
    def forward(ctx, k, v, group, key_ends, saver):
        local = _pack(k, v)
        full = _gathered_key_buffer(local, group)
        if saver is not None:  # backward gathers again instead of keeping every rank's K/V
            saver.track(full, functools.partial(_gathered_key_buffer, local, group))
        ctx.group, ctx.key_ends, ctx.chunk_len = group, key_ends, local.shape[0] // 2
        return _key_views(full, key_ends)

    @staticmethod
    def backward(ctx, *grads):
        cp_size, chunk_len = dist.get_world_size(ctx.group), ctx.chunk_len
        full = _sum_key_grads(grads, ctx.key_ends, 2 * cp_size * chunk_len)
        local = full.new_empty(2 * chunk_len, *full.shape[1:])
        _reduce_scatter_tensor(local[:chunk_len], full[: cp_size * chunk_len], group=ctx.group)
        late = full[cp_size * chunk_len :].view(cp_size, chunk_len, *full.shape[1:]).flip(0)
        _reduce_scatter_tensor(local[chunk_len:], late.reshape(-1, *full.shape[1:]), group=ctx.group)
        return (*_unpack(local), None, None, None)


def _s2_key_buffer(local, recv, plan, length, block_size, cp_rank, cp_size):
    """The S2 exchange's key buffer ``[length, 2, b, h, d]`` from this rank's K/V and the received
    blocks. Blocks the rank does not read stay zero: a kernel tile that spans them adds 0, not NaN."""
    full = local.new_zeros(length, *local.shape[1:])
    _blocks(full, block_size)[plan.recv_blocks, plan.recv_heads] = recv
    chunk_len = local.shape[0] // 2
    for half, chunk in enumerate(chunks_of_rank(cp_rank, cp_size)):
        full[chunk * chunk_len : (chunk + 1) * chunk_len] = local[half * chunk_len : (half + 1) * chunk_len]
    return full


class _S2ExchangeKV(torch.autograd.Function):
    """Receive only the (KV head, block) pairs of the plan into an absolute-position buffer."""

    @staticmethod
    def forward(ctx, k, v, group, key_ends, plan, block_size, saver):
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        local = _pack(k, v)
        send = _blocks(local, block_size)[plan.send_blocks, plan.send_heads].contiguous()
        recv = send.new_empty(sum(plan.recv_splits), *send.shape[1:])
        dist.all_to_all_single(recv, send, plan.recv_splits, plan.send_splits, group=group)
        build = functools.partial(_s2_key_buffer, local, recv, plan, key_ends[1], block_size,
                                  cp_rank, cp_size)
        full = build()
        if saver is not None:
            saver.track(full, build)
        ctx.group, ctx.key_ends, ctx.plan, ctx.block_size = group, key_ends, plan, block_size
        ctx.chunk_len = local.shape[0] // 2
        return _key_views(full, key_ends)

    @staticmethod
    def backward(ctx, *grads):
        plan, block_size, chunk_len = ctx.plan, ctx.block_size, ctx.chunk_len
        full = _sum_key_grads(grads, ctx.key_ends, ctx.key_ends[1])
        send = _blocks(full, block_size)[plan.recv_blocks, plan.recv_heads].contiguous()
        recv = send.new_empty(sum(plan.send_splits), *send.shape[1:])
        dist.all_to_all_single(recv, send, plan.send_splits, plan.recv_splits, group=ctx.group)

        chunks = chunks_of_rank(dist.get_rank(ctx.group), dist.get_world_size(ctx.group))
        local = torch.cat([full[c * chunk_len : (c + 1) * chunk_len] for c in chunks])
        # A block read by several ranks gets the sum of their gradients.
        _blocks(local, block_size).index_put_((plan.send_blocks, plan.send_heads), recv, accumulate=True)
        return (*_unpack(local), None, None, None, None, None)


def exchange_kv(k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *, cp_group, exchange: str,
                head_start: int, num_q_heads: int, num_kv_heads: int, num_local_heads: int,
                saver: Optional[KeyBufferSaver] = None):
    """Bring the keys this rank's queries read to their absolute positions.

    ``k, v [b, s_local, h_kv_local, d]`` hold this rank's chunks; the head arguments are those of
    ``context_parallel_attention`` plus the number of local query heads. Returns ``(k_early, v_early,
    k_late, v_late)``: K/V ``[b, key_end, h_kv_local, d]`` from position 0 to the end of the local
    early chunk (``r``) and late chunk (``2*cp-1-r``), views of one buffer; differentiable. With a
    ``saver``, run the attention inside ``saver.hooks()`` to keep the buffer compact until backward.
    """
    _check_exchange(exchange)
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    s_local, local_kv_heads = k.shape[1], k.shape[2]
    chunk_len = s_local // 2
    key_ends = tuple((chunk + 1) * chunk_len for chunk in chunks_of_rank(cp_rank, cp_size))
    if exchange == "allgather":
        return _AllGatherKV.apply(k, v, cp_group, key_ends, saver)
    plan = exchange_plan(
        pattern, seq_len=s_local * cp_size, cp_size=cp_size, cp_rank=cp_rank,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_start=head_start,
        num_local_heads=num_local_heads, num_local_kv_heads=local_kv_heads, device=k.device,
    )
    return _S2ExchangeKV.apply(k, v, cp_group, key_ends, plan, pattern.block_size, saver)


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
    _check_exchange(exchange)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, h_kv, d] of equal shapes, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must share batch and local sequence: {tuple(q.shape)} vs "
                         f"{tuple(k.shape)} (packed/THD input is not supported under CP)")
    s_local, local_heads = q.shape[1], q.shape[2]
    num_q_heads = local_heads if num_q_heads is None else num_q_heads
    num_kv_heads = k.shape[2] if num_kv_heads is None else num_kv_heads
    heads = dict(head_start=head_start, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if cp_size == 1:
        return s2_attention(q, k, v, pattern, softmax_scale=softmax_scale, **heads)
    validate_context_parallel(s_local * cp_size, cp_size, pattern.block_size)

    saver = KeyBufferSaver()
    k_early, v_early, k_late, v_late = exchange_kv(
        k, v, pattern, cp_group=cp_group, exchange=exchange, num_local_heads=local_heads,
        saver=saver, **heads)
    chunk_len = s_local // 2
    early, late = chunks_of_rank(cp_rank, cp_size)
    with saver.hooks():
        # Each chunk reads keys from position 0 to its own end (causal), at its absolute position.
        out_early = s2_attention(q[:, :chunk_len], k_early, v_early, pattern,
                                 softmax_scale=softmax_scale, q_start=early * chunk_len, **heads)
        out_late = s2_attention(q[:, chunk_len:], k_late, v_late, pattern,
                                softmax_scale=softmax_scale, q_start=late * chunk_len, **heads)
    return torch.cat([out_early, out_late], 1)
