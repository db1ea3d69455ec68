"""Context parallelism (CP) for S2 attention: exact CP=1 results, communication hidden behind compute.

Megatron's CP splits every sequence into ``2*cp`` equal chunks; CP rank ``r`` holds chunks
``e = r`` and ``l = 2*cp-1-r`` (load balancing under the causal mask), concatenated. Queries keep
their absolute positions. Each local chunk's softmax is split by key ranges, and the parts are
merged by their log-sum-exp:

- *diagonal*: the chunk's queries against the chunk's own keys (the window and the stripes inside
  the chunk). It needs nothing from other ranks, so it runs while K/V are exchanged.
- *earlier*: the same queries against every key before the chunk, read from a key buffer at
  absolute positions ``[0, l*chunk_len)`` that holds this rank's chunk ``e`` and what the exchange
  brought.

Two exchanges fill the buffer (and send its gradients back to the owners):

- ``"allgather"``: all-gather K/V over the CP group, reduce-scatter the gradients. Simple,
  pattern-independent, moves ``(cp-1)/cp`` of the whole sequence's K/V to every rank.
- ``"s2"``: every rank receives only the (KV head, key block) pairs that its queries attend (window
  halo plus its heads' stripes) through one ``all_to_all``, and sends back gradients only for
  those. All ranks of a CP group hold the same heads (same TP rank), so each rank derives every
  other rank's needs from the pattern: no metadata is exchanged, and the index lists are cached per
  (pattern, heads, sequence length, CP size, rank).

Backward runs the same parts in the order that hides communication: the early chunk's diagonal
part while the buffer is rebuilt (all-gather: gathered again; S2: from the kept received blocks),
then the earlier parts, then the late chunk's diagonal part while the buffer's gradients travel
back. Between forward and backward a layer keeps q, k, v, out and lse (S2: plus the received blocks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist

from .attention import s2_attention, s2_attention_backward, s2_attention_into
from .config import CP_EXCHANGES
from .layout import Pattern, s2_block_mask
from .pattern import S2ConfigError, check_head_counts

EXCHANGES = CP_EXCHANGES
# Whether each exchange hides its communication behind the chunks' attention to their own keys by
# default: that splits each chunk's attention into two kernel calls, which pays where the exchange
# moves a lot (all-gather) and costs more than it hides where it moves little (S2). BENCHMARKS.md.
OVERLAP_DEFAULTS = {"allgather": True, "s2": False}

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


# -- exchanges ---------------------------------------------------------------------------------
#
# Both fill a key buffer at absolute positions ``[0, buffer_len)`` (with this rank's own chunks
# where the buffer covers them) and add its gradient back to the owners; ``start_*`` launch
# collectives asynchronously, ``finish_*`` wait for them, so that attention can run in between.


class _Exchange:
    def __init__(self, group, chunk_len: int, overlap: bool):
        self.group, self.chunk_len, self.overlap = group, chunk_len, overlap
        self.cp_size, self.cp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.early, self.late = chunks_of_rank(self.cp_rank, self.cp_size)
        # With overlap the late chunk's own keys are read from the local K/V, not from the buffer.
        self.buffer_len = (self.late + (0 if overlap else 1)) * chunk_len

    def chunks(self):
        """Local rows, absolute start and end of the keys read from the buffer, per local chunk: up to
        the chunk's start with overlap (its own keys come from the local K/V), else its end."""
        chunk = self.chunk_len
        rows = (slice(0, chunk), slice(chunk, 2 * chunk))
        starts = (self.early * chunk, self.late * chunk)
        return rows, starts, (starts[0] + (0 if self.overlap else chunk), self.buffer_len)

    def own_slots(self):
        """(local rows, buffer rows) of this rank's chunks that lie inside the buffer."""
        chunk = self.chunk_len
        slots = [(slice(0, chunk), slice(self.early * chunk, (self.early + 1) * chunk))]
        if not self.overlap:
            slots.append((slice(chunk, 2 * chunk), slice(self.late * chunk, (self.late + 1) * chunk)))
        return slots


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` K and V -> one contiguous sequence-major ``[s, 2, b, h, d]`` buffer, in which a
    range of positions is one slab that collectives write into place."""
    return torch.stack([k.transpose(0, 1), v.transpose(0, 1)], 1)


def _unpack(kv: torch.Tensor):
    """``[s, 2, b, h, d]`` -> strided K, V views ``[b, s, h, d]``."""
    return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


class AllGatherExchange(_Exchange):
    """All-gather K/V into absolute order; the buffer's gradients are reduce-scattered to their owners."""

    def start(self, k, v):
        local = _pack(k, v)
        cp, chunk = self.cp_size, self.chunk_len
        kv = local.new_empty(self.buffer_len, *local.shape[1:])
        late = local.new_empty(cp * chunk, *local.shape[1:])
        # Chunks 0..cp-1 are the first halves of ranks 0..cp-1: gathered straight into place.
        works = [_all_gather_tensor(kv[: cp * chunk], local[:chunk], group=self.group, async_op=True),
                 _all_gather_tensor(late, local[chunk:], group=self.group, async_op=True)]
        return works, local, kv, late

    start_rebuild = start  # backward gathers again instead of keeping every rank's K/V

    def finish(self, pending, k, v):
        works, _, kv, late = pending
        for work in works:
            work.wait()
        # Chunks cp, cp+1, ... are the second halves of ranks cp-1, cp-2, ...
        cp, chunk = self.cp_size, self.chunk_len
        count = self.buffer_len // chunk - cp
        kv[cp * chunk :].view(count, chunk, *kv.shape[1:]).copy_(
            late.view(cp, chunk, *kv.shape[1:])[cp - count :].flip(0))
        return _unpack(kv)

    finish_rebuild = finish

    def start_grads(self, dk_buf, dv_buf):
        cp, chunk = self.cp_size, self.chunk_len
        grads = dk_buf.new_zeros(2 * cp * chunk, 2, dk_buf.shape[0], *dk_buf.shape[2:])
        grads[: self.buffer_len, 0] = dk_buf.transpose(0, 1)
        grads[: self.buffer_len, 1] = dv_buf.transpose(0, 1)
        late = grads[cp * chunk :].view(cp, chunk, *grads.shape[1:]).flip(0).reshape(cp * chunk, *grads.shape[1:])
        mine = grads.new_empty(2 * chunk, *grads.shape[1:])
        works = [_reduce_scatter_tensor(mine[:chunk], grads[: cp * chunk], group=self.group, async_op=True),
                 _reduce_scatter_tensor(mine[chunk:], late, group=self.group, async_op=True)]
        return works, grads, late, mine

    def finish_grads(self, pending, dk, dv):
        """Add the buffer's gradients (every rank's, own slots included) into ``dk, dv``."""
        works, _, _, mine = pending
        for work in works:
            work.wait()
        dk_mine, dv_mine = _unpack(mine)
        dk += dk_mine
        dv += dv_mine


def _by_block(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[b, s, h, d]`` -> view ``[b, blocks, block_size, h, d]``. Indexed ``[:, blocks, :, heads]`` it
    reads or writes (block, head) pairs as ``[pairs, b, block_size, d]``."""
    return t.unflatten(1, (t.shape[1] // block_size, block_size))


class S2Exchange(_Exchange):
    """Receive only the (KV head, block) pairs of the plan; return gradients for those only."""

    def __init__(self, group, chunk_len: int, overlap: bool, plan: ExchangePlan, block_size: int):
        super().__init__(group, chunk_len, overlap)
        self.plan, self.block_size = plan, block_size
        self.received = None  # kept for backward

    def _launch(self, k, v, blocks, heads, send_splits, recv_splits):
        """Send K/V (or their gradients) of the (block, head) pairs; returns (work, send, recv)."""
        send = torch.stack([_by_block(t, self.block_size)[:, blocks, :, heads] for t in (k, v)], 1)
        recv = send.new_empty(sum(recv_splits), *send.shape[1:])
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True)
        return work, send, recv

    def start(self, k, v):
        plan = self.plan
        return self._launch(k, v, plan.send_blocks, plan.send_heads, plan.send_splits, plan.recv_splits)

    def finish(self, pending, k, v):
        work, _, self.received = pending
        work.wait()
        return self._buffer(k, v)

    def start_rebuild(self, k, v):
        return None

    def finish_rebuild(self, pending, k, v):
        return self._buffer(k, v)

    def _buffer(self, k, v):
        """Received blocks and own chunks at absolute positions. Other blocks stay zero: the kernels
        read only listed blocks, but dK/dV tiles load whole units of any block."""
        plan, buffers = self.plan, []
        for local, which in ((k, 0), (v, 1)):
            buf = local.new_zeros(local.shape[0], self.buffer_len, *local.shape[2:])
            _by_block(buf, self.block_size)[:, plan.recv_blocks, :, plan.recv_heads] = self.received[:, which]
            for local_rows, buffer_rows in self.own_slots():
                buf[:, buffer_rows] = local[:, local_rows]
            buffers.append(buf)
        return buffers

    def start_grads(self, dk_buf, dv_buf):
        plan = self.plan
        work, send, recv = self._launch(dk_buf, dv_buf, plan.recv_blocks, plan.recv_heads, plan.recv_splits,
                                        plan.send_splits)
        # Own chunks read through the buffer (copied, so that the buffer's gradient can go).
        own = [(rows, dk_buf[:, buffer_rows].clone(), dv_buf[:, buffer_rows].clone())
               for rows, buffer_rows in self.own_slots()]
        return work, send, recv, own

    def finish_grads(self, pending, dk, dv):
        """Add the buffer's gradients (own slots and what other ranks return) into ``dk, dv``."""
        work, _, recv, own = pending
        for rows, dk_own, dv_own in own:
            dk[:, rows] += dk_own
            dv[:, rows] += dv_own
        work.wait()
        # Pairs from one rank are distinct; a block read by several ranks gets the sum of theirs.
        first = 0
        for count in self.plan.send_splits:
            if count:
                blocks = self.plan.send_blocks[first : first + count]
                heads = self.plan.send_heads[first : first + count]
                _by_block(dk, self.block_size)[:, blocks, :, heads] += recv[first : first + count, 0]
                _by_block(dv, self.block_size)[:, blocks, :, heads] += recv[first : first + count, 1]
                first += count


# -- one chunk's softmax over key ranges -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Attention:
    """The fixed arguments of a layer's S2 attention calls."""

    pattern: Pattern
    softmax_scale: Optional[float]
    head_start: int
    num_q_heads: int
    num_kv_heads: int
    deterministic: Optional[bool] = None  # backward mode (s2_attention's argument)

    def _args(self):
        return dict(softmax_scale=self.softmax_scale, head_start=self.head_start,
                    num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads)

    def forward(self, q, k, v, out, lse, q_start, k_start, resume):
        s2_attention_into(q, k, v, self.pattern, out, lse, resume=resume, q_start=q_start,
                          k_start=k_start, **self._args())

    def backward(self, grad_out, q, k, v, out, lse, q_start, k_start):
        return s2_attention_backward(grad_out, q, k, v, out, lse, self.pattern, q_start=q_start,
                                     k_start=k_start, deterministic=self.deterministic, **self._args())


class _ContextParallelAttention(torch.autograd.Function):
    """Each local chunk attends to the buffer's keys up to its own start (overlap) or end; with
    overlap, it first attends to its own keys from the local K/V while the exchange runs."""

    @staticmethod
    def forward(ctx, q, k, v, exchange, attention):
        rows, starts, buffer_ends = exchange.chunks()
        overlap = exchange.overlap
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        pending = exchange.start(k, v)
        if overlap:  # while K/V travel: each chunk against its own keys
            for r, start in zip(rows, starts):
                attention.forward(q[:, r], k[:, r], v[:, r], out[:, r], lse[:, :, r], start, start, False)
        k_buf, v_buf = exchange.finish(pending, k, v)
        del pending
        for r, start, end in zip(rows, starts, buffer_ends):
            if end:  # chunk 0 has no earlier keys
                attention.forward(q[:, r], k_buf[:, :end], v_buf[:, :end], out[:, r], lse[:, :, r], start, 0,
                                  overlap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.exchange, ctx.attention = exchange, attention
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        exchange, attention = ctx.exchange, ctx.attention
        rows, starts, buffer_ends = exchange.chunks()
        overlap = exchange.overlap
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

        def own_keys(i):  # chunk i against its own keys, from the local K/V
            grads = attention.backward(grad_out[:, rows[i]], q[:, rows[i]], k[:, rows[i]], v[:, rows[i]],
                                       out[:, rows[i]], lse[:, :, rows[i]], starts[i], starts[i])
            for total, grad in zip((dq, dk, dv), grads):
                total[:, rows[i]] += grad

        pending = exchange.start_rebuild(k, v)
        if overlap:
            own_keys(0)  # while the buffer is gathered again
        k_buf, v_buf = exchange.finish_rebuild(pending, k, v)
        del pending

        def buffer_keys(i):  # chunk i against the buffer's keys
            end = buffer_ends[i]
            dq_part, dk_part, dv_part = attention.backward(
                grad_out[:, rows[i]], q[:, rows[i]], k_buf[:, :end], v_buf[:, :end], out[:, rows[i]],
                lse[:, :, rows[i]], starts[i], 0)
            dq[:, rows[i]] += dq_part
            return dk_part, dv_part

        dk_buf, dv_buf = buffer_keys(1)  # the late chunk reads the whole buffer
        if buffer_ends[0]:  # chunk 0 has no earlier keys
            dk_part, dv_part = buffer_keys(0)
            dk_buf[:, : buffer_ends[0]] += dk_part
            dv_buf[:, : buffer_ends[0]] += dv_part
        del k_buf, v_buf
        pending = exchange.start_grads(dk_buf, dv_buf)
        del dk_buf, dv_buf
        if overlap:
            own_keys(1)  # while the buffer's gradients travel to their owners
        exchange.finish_grads(pending, dk, dv)
        return dq, dk, dv, None, None


# -- entry point -------------------------------------------------------------------------------


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    cp_group,
    exchange: str = "s2",
    overlap: Optional[bool] = None,
    softmax_scale: Optional[float] = None,
    head_start: int = 0,
    num_q_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """S2 attention over a sequence split across the CP group, equal to the CP=1 result.

    ``q [b, s_local, h_local, d]``, ``k, v [b, s_local, h_kv_local, d]`` hold this rank's two
    load-balanced chunks (``r`` and ``2*cp-1-r``) concatenated; ``num_q_heads``/``num_kv_heads``
    are global head counts and ``head_start`` the global index of the first local query head (all
    ranks of a CP group hold the same heads). ``overlap`` hides the exchange behind each chunk's
    attention to its own keys (None: ``OVERLAP_DEFAULTS[exchange]``); ``deterministic`` is the
    kernel's backward mode (``s2_attention``). Returns ``out [b, s_local, h_local, d]``.
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
    cp_size = dist.get_world_size(cp_group)
    if cp_size == 1:
        return s2_attention(q, k, v, pattern, softmax_scale=softmax_scale, head_start=head_start,
                            num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, deterministic=deterministic)
    validate_context_parallel(s_local * cp_size, cp_size, pattern.block_size)
    check_head_counts(num_q_heads, num_kv_heads)
    attention = _Attention(pattern, softmax_scale, head_start, num_q_heads, num_kv_heads, deterministic)
    mover = make_exchange(exchange, pattern, cp_group=cp_group, seq_len=s_local * cp_size, overlap=overlap,
                          num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_start=head_start,
                          num_local_heads=local_heads, num_local_kv_heads=k.shape[2], device=k.device)
    return _ContextParallelAttention.apply(q, k, v, mover, attention)


def make_exchange(exchange: str, pattern: Pattern, *, cp_group, seq_len: int, num_q_heads: int,
                  num_kv_heads: int, head_start: int, num_local_heads: int, num_local_kv_heads: int,
                  device, overlap: Optional[bool] = None) -> _Exchange:
    """The K/V exchange of one layer call (``seq_len`` is the whole sequence): ``start(k, v)`` then
    ``finish(pending, k, v)`` give the key buffer ``(k_buf, v_buf)``; ``start_grads(dk_buf, dv_buf)``
    then ``finish_grads(pending, dk, dv)`` add the buffer's gradients into the local ``dk, dv``."""
    _check_exchange(exchange)
    overlap = OVERLAP_DEFAULTS[exchange] if overlap is None else overlap
    chunk_len = seq_len // (2 * dist.get_world_size(cp_group))
    if exchange == "allgather":
        return AllGatherExchange(cp_group, chunk_len, overlap)
    plan = exchange_plan(
        pattern, seq_len=seq_len, cp_size=dist.get_world_size(cp_group), cp_rank=dist.get_rank(cp_group),
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_start=head_start,
        num_local_heads=num_local_heads, num_local_kv_heads=num_local_kv_heads, device=device,
    )
    return S2Exchange(cp_group, chunk_len, overlap, plan, pattern.block_size)
