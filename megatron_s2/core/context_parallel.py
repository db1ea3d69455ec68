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

Dense layers (``dense_context_parallel_attention``) run the same schedule over the all-gather, with
each part on PyTorch's fused attention ops that return the log-sum-exp (cuDNN or flash, as SDPA
would choose; on CPUs its flash kernel): the diagonal part is plain causal attention, the earlier
part plain full attention, so each is one call of a dense kernel at its full speed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

from ..ops.attention import s2_attention, s2_attention_backward, s2_attention_into
from ..ops.layout import Pattern, Shard, s2_block_mask
from ..ops.pattern import S2ConfigError, S2Pattern, check_head_counts
from ..ops.reference import merge_by_lse

# The key exchanges between CP ranks (docs/context_parallel.md); config.py validates against these.
CP_EXCHANGES = ("allgather", "s2")
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
    if exchange not in CP_EXCHANGES:
        raise S2ConfigError(f"cp_exchange must be one of {CP_EXCHANGES}, got {exchange!r}")


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

    def _chunk_rows(self, chunk_index: int) -> slice:
        return slice(chunk_index * self.chunk_len, (chunk_index + 1) * self.chunk_len)


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` K and V -> one contiguous sequence-major ``[s, 2, b, h, d]`` buffer, in which a
    range of positions is one slab that collectives write into place."""
    return torch.stack([k.transpose(0, 1), v.transpose(0, 1)], 1)


def _unpack(kv: torch.Tensor):
    """``[s, 2, b, h, d]`` -> strided K, V views ``[b, s, h, d]``."""
    return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


class AllGatherExchange(_Exchange):
    """All-gather K/V into absolute order; the buffer's gradients are reduce-scattered to their owners.

    Chunks ``0..cp-1`` are the first halves of ranks ``0..cp-1`` and travel straight into place;
    chunks ``cp..2cp-1`` are the second halves of ranks ``cp-1..0``, so they travel in reverse chunk
    order and are put in place (or taken out of place for the gradients) one chunk at a time.
    """

    def _late_slot(self, chunk_index: int) -> slice:
        """Rows of chunk ``chunk_index >= cp`` in the rank-ordered second halves."""
        return self._chunk_rows(2 * self.cp_size - 1 - chunk_index)

    def start(self, k, v):
        local = _pack(k, v)
        cp, chunk = self.cp_size, self.chunk_len
        kv = local.new_empty(self.buffer_len, *local.shape[1:])
        late = local.new_empty(cp * chunk, *local.shape[1:])
        works = [_all_gather_tensor(kv[: cp * chunk], local[:chunk], group=self.group, async_op=True),
                 _all_gather_tensor(late, local[chunk:], group=self.group, async_op=True)]
        return works, local, kv, late

    start_rebuild = start  # backward gathers again instead of keeping every rank's K/V

    def finish(self, pending, k, v):
        works, _, kv, late = pending
        for work in works:
            work.wait()
        for index in range(self.cp_size, self.buffer_len // self.chunk_len):
            kv[self._chunk_rows(index)] = late[self._late_slot(index)]
        return _unpack(kv)

    finish_rebuild = finish

    def start_grads(self, dk_buf, dv_buf, dk, dv):
        """Reduce-scatter the buffer's gradients (own slots included) to their owners; ``dk, dv`` get
        them in ``finish_grads``."""
        cp, chunk = self.cp_size, self.chunk_len
        early = dk_buf.new_empty(cp * chunk, 2, dk_buf.shape[0], *dk_buf.shape[2:])
        late = torch.empty_like(early)
        for index in range(2 * cp):
            slot = early[self._chunk_rows(index)] if index < cp else late[self._late_slot(index)]
            if index * chunk < self.buffer_len:  # the buffer reads no keys after its end
                rows = self._chunk_rows(index)
                slot[:, 0] = dk_buf[:, rows].transpose(0, 1)
                slot[:, 1] = dv_buf[:, rows].transpose(0, 1)
            else:
                slot.zero_()
        mine = early.new_empty(2 * chunk, *early.shape[1:])
        works = [_reduce_scatter_tensor(mine[:chunk], early, group=self.group, async_op=True),
                 _reduce_scatter_tensor(mine[chunk:], late, group=self.group, async_op=True)]
        return works, early, late, mine

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
        own = {self.early} | (set() if overlap else {self.late})
        self.remote_chunks = [c for c in range(self.buffer_len // chunk_len) if c not in own]

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
        """Received blocks and own chunks at absolute positions. Other ranks' blocks that were not
        received are zero: the kernels read only listed blocks, but dK/dV tiles load whole units of
        any block (and the CPU reference multiplies every key); own chunks are copied over."""
        plan, buffers = self.plan, []
        for local, which in ((k, 0), (v, 1)):
            buf = local.new_empty(local.shape[0], self.buffer_len, *local.shape[2:])
            for index in self.remote_chunks:
                buf[:, self._chunk_rows(index)] = 0
            _by_block(buf, self.block_size)[:, plan.recv_blocks, :, plan.recv_heads] = self.received[:, which]
            for local_rows, buffer_rows in self.own_slots():
                buf[:, buffer_rows] = local[:, local_rows]
            buffers.append(buf)
        return buffers

    def start_grads(self, dk_buf, dv_buf, dk, dv):
        """Send the received blocks' gradients back to their owners and add the own chunks' part of
        the buffer's gradient into ``dk, dv`` meanwhile (so that the buffer's gradient can go)."""
        plan = self.plan
        work, send, recv = self._launch(dk_buf, dv_buf, plan.recv_blocks, plan.recv_heads, plan.recv_splits,
                                        plan.send_splits)
        for rows, buffer_rows in self.own_slots():
            dk[:, rows] += dk_buf[:, buffer_rows]
            dv[:, rows] += dv_buf[:, buffer_rows]
        return work, send, recv

    def finish_grads(self, pending, dk, dv):
        """Add what other ranks return for the blocks they received into ``dk, dv``."""
        work, _, recv = pending
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
    shard: Shard  # its heads; each call places it at the positions of its key range
    deterministic: Optional[bool] = None  # backward mode (s2_attention's argument)

    def forward(self, q, k, v, out, lse, q_start, k_start, resume):
        s2_attention_into(q, k, v, self.pattern, out, lse, shard=self.shard.at(q_start, k_start), resume=resume,
                          softmax_scale=self.softmax_scale)

    def backward(self, grad_out, q, k, v, out, lse, q_start, k_start):
        return s2_attention_backward(grad_out, q, k, v, out, lse, self.pattern, shard=self.shard.at(q_start, k_start),
                                     softmax_scale=self.softmax_scale, deterministic=self.deterministic)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` -> ``[b, h, s, d]`` view of a contiguous ``[b, s, h, d]`` tensor: every part
    reaches the fused ops in this one layout (cuDNN caches its graphs by the q/k/v strides only, so
    out, grad_out and lse must always come in the same layout too)."""
    return t.contiguous().transpose(1, 2)


def fused_attention_backend(q: torch.Tensor) -> Optional[str]:
    """The fused attention op that the dense CP path uses for queries like ``q [b, s, h, d]``:
    ``"cudnn"`` or ``"flash"`` where SDPA would choose that backend for causal self-attention of this
    shape and dtype (``torch.nn.attention.sdpa_kernel`` and the global SDPA switches apply), ``"cpu"``
    (PyTorch's CPU flash kernel) on CPUs, None otherwise (e.g. float32 on a GPU: SDPA would pick the
    memory-efficient or math kernel, which the CP path does not drive)."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        return None
    view = q.transpose(1, 2)  # K/V are expanded to the query heads, so the query stands in for them
    choice = torch._fused_sdp_choice(view, view, view, is_causal=True)
    return {SDPBackend.CUDNN_ATTENTION.value: "cudnn", SDPBackend.FLASH_ATTENTION.value: "flash"}.get(choice)


class _FusedDenseAttention:
    """Dense causal attention of one key range on PyTorch's fused attention ops, with ``_Attention``'s
    interface: a chunk against its own keys is causal attention, against keys that end before it
    full attention, each one call of the op. Forward parts are merged by their log-sum-exp; each
    part's backward op gets the *merged* output and log-sum-exp, which makes its gradients those of
    the whole softmax (as in FlashAttention's backward).

    GQA: K/V are expanded to the query heads for each call and dK/dV summed back over each group,
    because the ops' own GQA support differs between backends and PyTorch versions; the copy is
    O(keys x dim) per head against the call's O(queries x keys x dim) work.
    """

    def __init__(self, backend: str, softmax_scale: Optional[float]):
        self.backend, self.scale = backend, softmax_scale
        # From the last forward op: its RNG state (dropout is 0, so the backward op only needs
        # tensors of the right kind) and its log-sum-exp, whose layout the backward op gets.
        self.rng, self.lse_like = (None, None), None

    @staticmethod
    def _is_causal(q, k, q_start, k_start) -> bool:
        if q_start == k_start and q.shape[1] == k.shape[1]:
            return True
        if k_start + k.shape[1] <= q_start:
            return False
        raise ValueError(f"a key range must be the queries' own positions or end before them: queries "
                         f"[{q_start}, {q_start + q.shape[1]}), keys [{k_start}, {k_start + k.shape[1]})")

    @staticmethod
    def _inputs(q, k, v):
        group = q.shape[2] // k.shape[2]
        k, v = (t.repeat_interleave(group, 2) if group > 1 else t for t in (k, v))
        return _heads_first(q), _heads_first(k), _heads_first(v)

    def _forward_op(self, q, k, v, causal):
        ops = torch.ops.aten
        if self.backend == "cudnn":
            out, lse, _, _, _, _, seed, offset, _ = ops._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=self.scale)
            self.rng = (seed, offset)
        elif self.backend == "flash":
            out, lse, _, _, _, _, rng_state, unused, _ = ops._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=self.scale)
            self.rng = (rng_state, unused)
        else:
            out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=self.scale)
        self.lse_like = lse  # cuDNN: [b, h, s, 1]
        return out, lse.reshape(lse.shape[:3])

    def _backward_op(self, grad_out, q, k, v, out, lse, causal):
        ops = torch.ops.aten
        lse = torch.empty_like(self.lse_like).copy_(lse.reshape(self.lse_like.shape))
        q_len, k_len = q.shape[2], k.shape[2]
        if self.backend == "cudnn":
            return ops._scaled_dot_product_cudnn_attention_backward(
                grad_out, q, k, v, out, lse, *self.rng, None, None, None, q_len, k_len, 0.0, causal,
                scale=self.scale)
        if self.backend == "flash":
            return ops._scaled_dot_product_flash_attention_backward(
                grad_out, q, k, v, out, lse, None, None, q_len, k_len, 0.0, causal, *self.rng, scale=self.scale)
        return ops._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, scale=self.scale)

    def forward(self, q, k, v, out, lse, q_start, k_start, resume):
        causal = self._is_causal(q, k, q_start, k_start)
        part_out, part_lse = self._forward_op(*self._inputs(q, k, v), causal)
        part = (part_out.transpose(1, 2), part_lse)
        merged = merge_by_lse((out, lse), part) if resume else part
        out.copy_(merged[0])
        lse.copy_(merged[1])

    def backward(self, grad_out, q, k, v, out, lse, q_start, k_start):
        causal = self._is_causal(q, k, q_start, k_start)
        grads = self._backward_op(_heads_first(grad_out), *self._inputs(q, k, v), _heads_first(out), lse, causal)
        dq, dk, dv = (t.transpose(1, 2) for t in grads)
        group = q.shape[2] // k.shape[2]
        if group > 1:
            dk, dv = (t.unflatten(2, (k.shape[2], group)).sum(3) for t in (dk, dv))
        return dq, dk, dv


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
        pending = exchange.start_grads(dk_buf, dv_buf, dk, dv)
        del dk_buf, dv_buf
        if overlap:
            own_keys(1)  # while the buffer's gradients travel to their owners
        exchange.finish_grads(pending, dk, dv)
        return dq, dk, dv, None, None


# -- entry point -------------------------------------------------------------------------------


def _check_local_inputs(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, h_kv, d] of equal shapes, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must share batch and local sequence: {tuple(q.shape)} vs "
                         f"{tuple(k.shape)} (packed/THD input is not supported under CP)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")


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
    shard: Optional[Shard] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """S2 attention over a sequence split across the CP group, equal to the CP=1 result.

    ``q [b, s_local, h_local, d]``, ``k, v [b, s_local, h_kv_local, d]`` hold this rank's two
    load-balanced chunks (``r`` and ``2*cp-1-r``) concatenated; ``shard`` gives the model's head
    counts and the global index of the first local query head (all ranks of a CP group hold the same
    heads; None: the local heads are all of them); its positions are ignored (the chunks place
    them). ``overlap`` hides the exchange behind each chunk's
    attention to its own keys (None: ``OVERLAP_DEFAULTS[exchange]``); ``deterministic`` is the
    kernel's backward mode (``s2_attention``). Returns ``out [b, s_local, h_local, d]``.
    """
    _check_exchange(exchange)
    _check_local_inputs(q, k, v)
    s_local, local_heads = q.shape[1], q.shape[2]
    shard = Shard(local_heads, k.shape[2]) if shard is None else shard.at(0, 0)
    cp_size = dist.get_world_size(cp_group)
    if cp_size == 1:
        return s2_attention(q, k, v, pattern, softmax_scale=softmax_scale, head_start=shard.head_start,
                            num_q_heads=shard.num_q_heads, num_kv_heads=shard.num_kv_heads,
                            deterministic=deterministic)
    validate_context_parallel(s_local * cp_size, cp_size, pattern.block_size)
    check_head_counts(shard.num_q_heads, shard.num_kv_heads)
    attention = _Attention(pattern, softmax_scale, shard, deterministic)
    mover = make_exchange(exchange, pattern, shard, cp_group=cp_group, seq_len=s_local * cp_size, overlap=overlap,
                          num_local_heads=local_heads, num_local_kv_heads=k.shape[2], device=k.device)
    return _ContextParallelAttention.apply(q, k, v, mover, attention)


def dense_context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cp_group,
    softmax_scale: Optional[float] = None,
    overlap: Optional[bool] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Dense causal attention over a sequence split across the CP group, equal to the CP=1 result.

    Inputs and output as in ``context_parallel_attention`` (GQA: local query heads a multiple of the
    local KV heads). K/V are all-gathered while each chunk attends to its own keys (causal), then
    each chunk attends to the earlier keys (full) and the two parts are merged by their log-sum-exp,
    every part on the fused attention op of ``fused_attention_backend`` (cuDNN on Hopper GPUs in
    bf16). Where no such op applies (e.g. float32 on a GPU) it runs the S2 kernel with a dense
    pattern through ``context_parallel_attention`` (all-gather; ``overlap`` as there, None: its
    default); the fused path always overlaps, since its parts are what the overlap splits.
    ``deterministic=True`` also takes the S2 kernel (its backward is bit-identical run to run; the
    fused ops' backward is not).
    """
    _check_local_inputs(q, k, v)
    backend = fused_attention_backend(q)
    if backend is None or deterministic:
        return context_parallel_attention(q, k, v, dense_pattern(q.shape[1]), cp_group=cp_group,
                                          exchange="allgather", overlap=overlap, softmax_scale=softmax_scale,
                                          deterministic=deterministic)
    if q.shape[1] % 2:
        raise S2ConfigError(f"a CP rank holds two equal chunks, got {q.shape[1]} local tokens. Fix: make "
                            "--seq-length a multiple of 2 * --context-parallel-size")
    exchange = AllGatherExchange(cp_group, q.shape[1] // 2, overlap=True)
    return _ContextParallelAttention.apply(q, k, v, exchange, _FusedDenseAttention(backend, softmax_scale))


def dense_pattern(local_len: int) -> S2Pattern:
    """A dense pattern whose block size divides the CP chunks (each rank holds two chunks)."""
    for block_size in (64, 32, 16):
        if (local_len // 2) % block_size == 0 and local_len % 2 == 0:
            return S2Pattern.dense(block_size)
    raise S2ConfigError(
        f"dense attention under context parallelism needs CP chunks of a multiple of 16 tokens, got "
        f"{local_len / 2:g}. Fix: make --seq-length a multiple of 32 * --context-parallel-size"
    )


def make_exchange(exchange: str, pattern: Pattern, shard: Shard, *, cp_group, seq_len: int,
                  num_local_heads: int, num_local_kv_heads: int, device, overlap: Optional[bool] = None) -> _Exchange:
    """The K/V exchange of one layer call (``seq_len`` is the whole sequence; ``shard``: the heads, as
    in ``context_parallel_attention``): ``start(k, v)`` then
    ``finish(pending, k, v)`` give the key buffer ``(k_buf, v_buf)``; ``start_grads(dk_buf, dv_buf, dk,
    dv)`` then ``finish_grads(pending, dk, dv)`` add the buffer's gradients into the local ``dk, dv``."""
    _check_exchange(exchange)
    overlap = OVERLAP_DEFAULTS[exchange] if overlap is None else overlap
    chunk_len = seq_len // (2 * dist.get_world_size(cp_group))
    if exchange == "allgather":
        return AllGatherExchange(cp_group, chunk_len, overlap)
    plan = exchange_plan(
        pattern, seq_len=seq_len, cp_size=dist.get_world_size(cp_group), cp_rank=dist.get_rank(cp_group),
        num_q_heads=shard.num_q_heads, num_kv_heads=shard.num_kv_heads, head_start=shard.head_start,
        num_local_heads=num_local_heads, num_local_kv_heads=num_local_kv_heads, device=device,
    )
    return S2Exchange(cp_group, chunk_len, overlap, plan, pattern.block_size)
