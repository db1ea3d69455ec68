"""Block layouts: the S2 pattern turned into what the kernel reads.

``s2_block_mask`` gives the dense boolean picture ``[heads, q_blocks, k_blocks]`` (tests, plots,
FlexAttention); ``get_layout`` gives compressed block lists (CSR) for the kernel, built on the
inputs' device from closed-form row and column counts, in time proportional to the active blocks, and
cached so that a training step with a known shape does no host work and no host-device sync.

Blocks are numbered locally (``0..num_q_blocks-1``) but the pattern is evaluated on absolute block
indices ``q_start // block_size + i`` so that context-parallel chunks see the pattern of the whole
sequence; heads are evaluated at their global index ``head_start + h`` (tensor parallelism).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Union

import torch

from .pattern import BlockMaskPattern, S2ConfigError, S2Pattern, check_head_counts

Pattern = Union[S2Pattern, BlockMaskPattern]

_LAYOUT_CACHE_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Shard:
    """The part of a model's attention that one call computes.

    Heads (tensor parallelism): the model has ``num_q_heads`` query and ``num_kv_heads`` KV heads;
    the call's local heads are the global ones from ``head_start`` on. Positions (context
    parallelism): its first query and first key sit at absolute positions ``q_start`` and
    ``k_start``. Layouts are built from these global indices, so a sharded model computes the same
    function as an unsharded one.
    """

    num_q_heads: int
    num_kv_heads: int
    head_start: int = 0
    q_start: int = 0
    k_start: int = 0

    def at(self, q_start: int, k_start: int) -> "Shard":
        """The same heads at other positions (one key range of a context-parallel chunk)."""
        return dataclasses.replace(self, q_start=q_start, k_start=k_start)


@dataclasses.dataclass(frozen=True)
class LayoutKey:
    """Everything a layout depends on: lengths only through their block counts."""

    pattern: Pattern
    num_q_heads: int
    num_kv_heads: int
    head_start: int
    num_local_heads: int
    num_q_blocks: int
    num_k_blocks: int
    q_block_start: int
    k_block_start: int
    device: torch.device


@dataclasses.dataclass(frozen=True, eq=False)
class S2Layout:
    """Active key blocks per (local head, local query block) and the transpose, as CSR lists.

    Row ``h * num_q_blocks + i`` of ``q2k`` lists the local key blocks (ascending) that local query
    block ``i`` of local head ``h`` computes; row ``h * num_k_blocks + j`` of ``k2q`` lists the local
    query blocks (ascending) that read local key block ``j``.
    """

    block_size: int
    num_heads: int
    num_q_blocks: int
    num_k_blocks: int
    q_block_start: int
    k_block_start: int
    q2k_ptr: torch.Tensor
    q2k_idx: torch.Tensor
    k2q_ptr: torch.Tensor
    k2q_idx: torch.Tensor
    max_q2k: int
    max_k2q: int
    nnz: int

    def to_block_mask(self) -> torch.Tensor:
        """Dense ``[heads, q_blocks, k_blocks]`` view of the lists (for tests and debugging)."""
        rows = self.num_heads * self.num_q_blocks
        mask = torch.zeros(rows, self.num_k_blocks, dtype=torch.bool, device=self.q2k_idx.device)
        row_of_entry = _rows_of_entries(self.q2k_ptr, self.nnz)
        mask[row_of_entry, self.q2k_idx.long()] = True
        return mask.view(self.num_heads, self.num_q_blocks, self.num_k_blocks)


def validate_layout_args(pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start, num_local_heads, q_start,
                         k_start) -> None:
    """The one check of a layout's arguments (also run by ``s2_attention`` before any work)."""
    if not isinstance(pattern, (S2Pattern, BlockMaskPattern)):
        raise TypeError(f"pattern must be an S2Pattern or BlockMaskPattern, got {type(pattern).__name__}")
    check_head_counts(num_q_heads, num_kv_heads)
    if num_local_heads < 1 or head_start < 0 or head_start + num_local_heads > num_q_heads:
        raise S2ConfigError(
            f"local heads [{head_start}, {head_start + num_local_heads}) are not inside the "
            f"{num_q_heads} global query heads: check head_start / num_q_heads"
        )
    if q_len < 1 or kv_len < 1:
        raise S2ConfigError(f"sequence lengths must be positive, got q_len={q_len}, kv_len={kv_len}")
    block = pattern.block_size
    for name, start in (("q_start", q_start), ("k_start", k_start)):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start % block:
            raise S2ConfigError(
                f"{name}={start!r} must be a non-negative multiple of block_size={block}: "
                f"context-parallel chunks must start on block boundaries"
            )


def _layout_key(pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start, num_local_heads, q_start, k_start,
                device):
    kv_len = q_len if kv_len is None else kv_len
    num_local_heads = num_q_heads - head_start if num_local_heads is None else num_local_heads
    validate_layout_args(pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start, num_local_heads, q_start,
                         k_start)
    block = pattern.block_size
    return LayoutKey(
        pattern=pattern,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_start=head_start,
        num_local_heads=num_local_heads,
        num_q_blocks=-(-q_len // block),
        num_k_blocks=-(-kv_len // block),
        q_block_start=q_start // block,
        k_block_start=k_start // block,
        device=torch.device("cpu") if device is None else torch.device(device),
    )


def _head_stripe_params(key: LayoutKey, device):
    """Per local head: stripe period and residue (dense heads: period 1, every block a stripe;
    window-only heads: period 0, no stripe)."""
    pattern = key.pattern
    offsets = pattern.head_offsets_tensor(
        key.num_q_heads, key.num_kv_heads, key.head_start, key.num_local_heads, device
    )
    dense = offsets < 0
    period = torch.where(dense, 1, pattern.vert_stride)
    residue = torch.where(dense, 0, (-offsets) % max(pattern.vert_stride, 1))
    return period, residue


def _is_stripe(k_abs: torch.Tensor, period: torch.Tensor, residue: torch.Tensor) -> torch.Tensor:
    """Key block ``k_abs`` is one of the head's stripes (never, for period 0)."""
    return (period > 0) & (k_abs % period.clamp(min=1) == residue)


def _row_counts(key: LayoutKey):
    """Closed-form stripe and window extents of every (head, query block) row, on the host."""
    device = torch.device("cpu")
    period, residue = _head_stripe_params(key, device)
    period, residue = period[:, None], residue[:, None]
    q_abs = key.q_block_start + torch.arange(key.num_q_blocks, device=device)[None, :]
    k_lo = key.k_block_start
    k_hi = key.k_block_start + key.num_k_blocks - 1
    local = key.pattern.local_blocks
    # Stripes strictly beyond the window: K in [k_lo, q - local], K = residue (mod period).
    # Period 0 (window-only) has no stripes: its count is 0 and the step any positive value.
    step = period.clamp(min=1)
    stripe_first = k_lo + (residue - k_lo) % step
    stripe_last = torch.clamp(q_abs - local, max=k_hi)
    stripe_count = torch.where(
        (period > 0) & (stripe_last >= stripe_first), (stripe_last - stripe_first) // step + 1, 0
    )
    window_first = torch.clamp(q_abs - local + 1, min=k_lo)
    window_count = torch.clamp(torch.clamp(q_abs, max=k_hi) - window_first + 1, min=0)
    shape = (key.num_local_heads, key.num_q_blocks)
    return (
        stripe_first.expand(shape),
        stripe_count,
        period.expand(shape),
        window_first.expand(shape),
        window_count.expand(shape),
    )


def _column_ranges(key: LayoutKey):
    """Closed-form query-block range of every (head, key block) column (always contiguous), on the host."""
    device = torch.device("cpu")
    period, residue = _head_stripe_params(key, device)
    k_abs = key.k_block_start + torch.arange(key.num_k_blocks, device=device)[None, :]
    q_lo = key.q_block_start
    q_hi = key.q_block_start + key.num_q_blocks - 1
    is_stripe = _is_stripe(k_abs, period[:, None], residue[:, None])
    last = torch.where(is_stripe, q_hi, torch.clamp(k_abs + key.pattern.local_blocks - 1, max=q_hi))
    first = torch.clamp(k_abs, min=q_lo).expand_as(last)
    return first, torch.clamp(last - first + 1, min=0)


def _ptr(counts: torch.Tensor) -> torch.Tensor:
    flat = counts.reshape(-1)
    ptr = torch.zeros(flat.numel() + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(flat, 0, out=ptr[1:])
    return ptr


def _rows_of_entries(ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    counts = (ptr[1:] - ptr[:-1]).long()
    rows = torch.arange(counts.numel(), device=ptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def _rank_in_row(ptr: torch.Tensor, rows: torch.Tensor, nnz: int) -> torch.Tensor:
    return torch.arange(nnz, device=ptr.device) - ptr[rows]


def _pattern_layout(key: LayoutKey) -> S2Layout:
    # Per-row and per-column extents are O(rows) closed forms: evaluate them once on the host, where
    # sizes are known without a sync, then expand them to the O(nnz) lists on the inputs' device.
    rows_h = _row_counts(key)
    cols_h = _column_ranges(key)
    q2k_counts, k2q_counts = rows_h[1] + rows_h[4], cols_h[1]
    nnz = int(q2k_counts.sum())
    stripe_first, stripe_count, period, window_first, window_count = (
        t.reshape(-1).to(key.device) for t in rows_h)
    col_first, col_count = (t.reshape(-1).to(key.device) for t in cols_h)

    q2k_ptr = _ptr(stripe_count + window_count)
    rows = _rows_of_entries(q2k_ptr, nnz)
    rank = _rank_in_row(q2k_ptr, rows, nnz)
    s_count = stripe_count[rows]
    # Stripes lie before the window, so stripes-then-window keeps every row ascending.
    k_abs = torch.where(
        rank < s_count,
        stripe_first[rows] + rank * period[rows],
        window_first[rows] + rank - s_count,
    )
    q2k_idx = k_abs - key.k_block_start

    k2q_ptr = _ptr(col_count)
    cols = _rows_of_entries(k2q_ptr, nnz)
    k2q_idx = col_first[cols] + _rank_in_row(k2q_ptr, cols, nnz) - key.q_block_start

    return _make_layout(key, q2k_ptr, q2k_idx, k2q_ptr, k2q_idx,
                        int(q2k_counts.max()), int(k2q_counts.max()), nnz)


def _mask_layout(key: LayoutKey) -> S2Layout:
    mask = _block_mask(key)
    q2k_counts = mask.sum(-1)
    k2q_counts = mask.sum(-2)
    nnz = int(q2k_counts.sum())
    q2k_idx = mask.reshape(-1, key.num_k_blocks).nonzero()[:, 1]
    k2q_idx = mask.transpose(1, 2).reshape(-1, key.num_q_blocks).nonzero()[:, 1]
    return _make_layout(key, _ptr(q2k_counts), q2k_idx, _ptr(k2q_counts), k2q_idx,
                        int(q2k_counts.max()), int(k2q_counts.max()), nnz)


def _make_layout(key, q2k_ptr, q2k_idx, k2q_ptr, k2q_idx, max_q2k, max_k2q, nnz) -> S2Layout:
    int32 = torch.int32
    return S2Layout(
        block_size=key.pattern.block_size,
        num_heads=key.num_local_heads,
        num_q_blocks=key.num_q_blocks,
        num_k_blocks=key.num_k_blocks,
        q_block_start=key.q_block_start,
        k_block_start=key.k_block_start,
        q2k_ptr=q2k_ptr.to(int32),
        q2k_idx=q2k_idx.to(int32),
        k2q_ptr=k2q_ptr.to(int32),
        k2q_idx=k2q_idx.to(int32),
        max_q2k=max_q2k,
        max_k2q=max_k2q,
        nnz=nnz,
    )


def _block_mask(key: LayoutKey) -> torch.Tensor:
    device = key.device
    q_abs = key.q_block_start + torch.arange(key.num_q_blocks, device=device)
    k_abs = key.k_block_start + torch.arange(key.num_k_blocks, device=device)
    causal = k_abs[None, :] <= q_abs[:, None]
    pattern = key.pattern
    if isinstance(pattern, BlockMaskPattern):
        heads, q_blocks, k_blocks = pattern.mask.shape
        if heads != key.num_q_heads:
            raise S2ConfigError(
                f"BlockMaskPattern has {heads} heads but the model has {key.num_q_heads} query heads"
            )
        last_q = key.q_block_start + key.num_q_blocks - 1  # from the key: no device read-back
        last_k = key.k_block_start + key.num_k_blocks - 1
        if last_q >= q_blocks or last_k >= k_blocks:
            raise S2ConfigError(
                f"BlockMaskPattern covers {q_blocks} x {k_blocks} blocks; this call needs query "
                f"blocks up to {last_q} and key blocks up to {last_k}: build a larger mask"
            )
        local = pattern.mask[key.head_start : key.head_start + key.num_local_heads].to(device)
        return local[:, q_abs][:, :, k_abs] & causal
    period, residue = _head_stripe_params(key, device)
    window = (q_abs[:, None] - k_abs[None, :]) < pattern.local_blocks
    stripe = _is_stripe(k_abs[None, None, :], period[:, None, None], residue[:, None, None])
    return causal & (window | stripe)


def s2_block_mask(
    pattern: Pattern,
    num_q_heads: int,
    num_kv_heads: int,
    q_len: int,
    kv_len: Optional[int] = None,
    *,
    head_start: int = 0,
    num_local_heads: Optional[int] = None,
    q_start: int = 0,
    k_start: int = 0,
    device=None,
) -> torch.Tensor:
    """Bool ``[local heads, q blocks, k blocks]``: which blocks each local head computes.

    ``num_q_heads``/``num_kv_heads`` are global head counts, ``head_start`` the global index of the
    first local query head, ``q_start``/``k_start`` absolute positions of the first query/key.
    """
    key = _layout_key(pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start,
                      num_local_heads, q_start, k_start, device)
    return _block_mask(key)


_layout_cache: "collections.OrderedDict[LayoutKey, S2Layout]" = collections.OrderedDict()


def get_layout(
    pattern: Pattern,
    num_q_heads: int,
    num_kv_heads: int,
    q_len: int,
    kv_len: Optional[int] = None,
    *,
    head_start: int = 0,
    num_local_heads: Optional[int] = None,
    q_start: int = 0,
    k_start: int = 0,
    device=None,
) -> S2Layout:
    """The kernel's block lists for these heads and lengths, from a small LRU cache."""
    key = _layout_key(pattern, num_q_heads, num_kv_heads, q_len, kv_len, head_start,
                      num_local_heads, q_start, k_start, device)
    layout = _layout_cache.get(key)
    if layout is not None:
        _layout_cache.move_to_end(key)
        return layout
    build = _mask_layout if isinstance(pattern, BlockMaskPattern) else _pattern_layout
    layout = build(key)
    _layout_cache[key] = layout
    if len(_layout_cache) > _LAYOUT_CACHE_SIZE:
        _layout_cache.popitem(last=False)
    return layout


def clear_layout_cache() -> None:
    _layout_cache.clear()
