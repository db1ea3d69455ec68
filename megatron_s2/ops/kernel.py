"""Triton forward and backward kernels of S2 attention over an ``S2Layout``. (On Hopper GPUs the
head-dim-128 forward of sequences from 16k tokens is ``kernel_hopper``'s Gluon kernel over the same
tile lists; ``attention.kernel_forward`` chooses.)

The layout lists active (query block, key block) pairs. The kernels work on *tiles* of ``MERGE``
*units* of ``UNIT = min(block_size, 64)`` tokens, 128 rows in all, because Hopper's tensor cores
are underused by one program of 64 rows; 64 rows at head dim 256 (registers, shared memory) and in
the head-dim-128 forward, whose one-warpgroup programs run four per SM (``FORWARD_TILE_ROWS``).
``kernel_layout`` derives, once per layout (cached), for every tile the union of its units' lists,
each entry tagged with a bit per unit saying which units of the tile really use it:

- query tiles (forward, dQ; ``QueryTiling``) are consecutive units, which share almost all their key
  units. When the query heads of a GQA group read the same blocks (``kv_group``, ``homogeneous``),
  a program stacks the group's heads in its rows instead (``rows / group`` positions of each head,
  GQA packing): each K/V unit is then loaded once for the whole group;
- key tiles (dK/dV) pair, per KV head, units whose query lists are alike (a stripe unit with the
  next stripe unit of the same heads, window-only units with each other): a stripe unit's
  neighbour is not a stripe, and a tile of neighbours would compute the stripe's long list twice.

Entries that need no token mask (every unit uses them, no pair crosses the causal diagonal) come
first in each list so the hot loop runs without masks, one or two key units per step (``STEP``);
the few diagonal and partial entries follow and are masked token by token.

Backward, two modes. Both run one program per key tile and query heads, accumulating dK/dV in
registers over the tile's transposed lists, heaviest programs first:
- deterministic: no atomics, bit-identical from run to run; dQ has its own pass, one program per
  (query head, query tile). The dK/dV pass stores each block pair's dS (in the input dtype) and the
  dQ pass multiplies it by K (5 matrix products per block pair); heads go in chunks whose dS fits
  ``stored_ds_budget()``, and where not even one KV group's fits, the dQ pass recomputes P and dP
  (7 products per pair);
- fast: the dK/dV pass also adds each block pair's dQ part into a float32 accumulator (5 products
  per pair, FlashAttention's scheme; one descriptor reduction per step on Hopper, element atomics
  elsewhere); the accumulator is cast to the input dtype at the end. The order of the float32 adds
  varies, so dQ may differ in the last bits from run to run.
A program serves all query heads of a GQA group (their K/V tile loaded once, dK/dV summed in
registers) or one query head (shorter programs, which balance better, but float32 partial dK/dV
summed over the group afterwards, in a fixed order): ``SPLIT_HEADS`` chooses per mode, and where a
group's stripe-tile programs are too long for the deterministic mode's chunks, those run per head.

The gradient of the returned log-sum-exp enters through ``delta = rowsum(dO * O) - dlse``
(dS = P * (dP - delta)). Packed sequences share the lists of one length at least the longest
sequence's: rows past a sequence's end are skipped, and the ascending transposed lists are cut by
binary search.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .layout import S2Layout

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Fixed launch configs by default (the first of each list, measured best on H100), so that every
# process runs the same code and gradients are bit-identical from run to run. S2_AUTOTUNE=1 lets
# Triton's autotuner choose per shape class (other cards); its choice may differ between processes.
AUTOTUNE = not INTERPRET and os.environ.get("S2_AUTOTUNE", "0") == "1"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_MAX_UNIT = 64
_FLAG_BITS = 8  # an entry stores (unit index << _FLAG_BITS) | unit bitmask: up to 8 units per tile
FLAG_BITS = tl.constexpr(_FLAG_BITS)  # the kernels' copy
_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # the kernels' copy (Triton reads only constexpr globals)
MASKED_SCORE = tl.constexpr(-1.0e6)  # a masked key's scaled score: finite, so exp2 never sees inf - inf
_DERIVED_CACHE_SIZE = 32


# --------------------------------------------------------------------------------------------
# Tile lists derived from the layout
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileLists:
    """CSR lists per (local query head, tile): ``entries[ptr[r]:ptr[r] + nfull[r]]`` need no mask,
    ``entries[ptr[r] + nfull[r]:ptr[r + 1]]`` do. Entry = ``(unit << 8) | bits``, bit ``s`` set when
    the tile's slot ``s`` uses the entry. ``units[g, t, s]`` is the unit in slot ``s`` of tile ``t``
    for tile group ``g`` (-1: empty slot)."""

    ptr: torch.Tensor
    nfull: torch.Tensor
    entries: torch.Tensor
    units: torch.Tensor
    num_tiles: int


@dataclasses.dataclass(frozen=True)
class QueryTiling:
    """The query tiles of the forward or of the dQ pass: ``tiles`` lists the key units of each tile
    of ``merge`` consecutive units; a program holds ``positions`` positions of ``pack`` query heads
    as its rows (GQA packing: ``pack`` > 1)."""

    merge: int
    tiles: TileLists
    pack: int
    positions: int


@dataclasses.dataclass(frozen=True)
class KeyWork:
    """The dK/dV pass's programs, heaviest first (most list entries; ties in head order). Item
    ``kv_head * tiles + tile`` runs the query heads of a KV group against a key tile and writes dK/dV;
    item ``~(head * tiles + tile)`` runs one query head and writes float32 partials, which
    ``_sum_partials_kernel`` adds up per group for the key tiles in ``split`` (``kv_head * tiles +
    tile``; None when no item runs one head)."""

    order: torch.Tensor
    order_groups: torch.Tensor  # the KV group of each item of ``order``
    items_per_group: tuple  # host ints: the items of each KV group
    longest_per_group: tuple  # host ints: the most list entries of one item, per KV group
    split: torch.Tensor | None
    # "group", "head" or "mixed": which items occur (the kernel then compiles only their code).
    kind: str


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    unit: int
    k_merge: int  # units per key tile (dK/dV)
    forward_tiling: QueryTiling  # FORWARD_TILE_ROWS
    dq_tiling: QueryTiling  # DQ_TILE_ROWS (the same object when the rows are)
    k_tiles: TileLists  # for dK/dV: query units per key tile (units paired per KV head)
    # dK/dV programs (``KeyWork``) per GQA group; per query head; and per group except those
    # longer than the group's longest single-head program, which run per head (all three the same
    # when there is no group).
    k_work_per_group: KeyWork
    k_work_per_head: KeyWork
    k_work_long_per_head: KeyWork
    # The deterministic backward's stored dS (``stored_ds_plan``): per query-list entry and unit slot
    # of its tile, ``(k-list entry << 3) | key slot`` of the dS block that holds those pairs (-1: the
    # unit does not use the entry); and the first k-list entry of every query head (host ints).
    q_ds_index: torch.Tensor
    k_head_starts: tuple

    @property
    def ds_block_shape(self) -> tuple:
        """A stored dS block: [key tile rows, query unit rows], one per k-list entry and sequence."""
        return self.unit * self.k_merge, self.unit


def _unit_entries(ptr, idx, heads, n_rows, row_start, col_start, refine, rows_are_queries):
    """(head, row, col) of every active pair of a block CSR, refined to units of block/refine."""
    device = idx.device
    nnz = idx.numel()
    counts = (ptr[1:] - ptr[:-1]).long()
    row_ids = torch.repeat_interleave(torch.arange(heads * n_rows, device=device), counts, output_size=nnz)
    head, row, col = row_ids // n_rows, row_ids % n_rows, idx.long()
    if refine > 1:
        sub = torch.arange(refine, device=device)
        shape = (nnz, refine, refine)
        row = (row[:, None, None] * refine + sub[None, :, None]).expand(shape).reshape(-1)
        col = (col[:, None, None] * refine + sub[None, None, :]).expand(shape).reshape(-1)
        head = head[:, None, None].expand(shape).reshape(-1)
        q_abs, k_abs = (row + row_start, col + col_start) if rows_are_queries else (col + col_start, row + row_start)
        keep = k_abs <= q_abs  # sub-blocks wholly above the diagonal hold no causal pair
        head, row, col = head[keep], row[keep], col[keep]
    return head, row, col


def _consecutive_tiles(n_rows, merge, device):
    """Query tiles: ``merge`` consecutive units, the same for all heads (one tile group)."""
    n_tiles = -(-n_rows // merge)
    units = torch.full((1, n_tiles * merge), -1, dtype=torch.int64, device=device)
    units[0, :n_rows] = torch.arange(n_rows, device=device)
    return units.view(1, n_tiles, merge), torch.arange(n_rows, device=device)[None]


def _paired_tiles(head, row, col, heads, group, merge, n_rows, n_cols):
    """Key tiles: per KV head, ``merge`` key units whose query lists are alike, so that a tile does
    not compute a long list for a unit that needs a short one.

    A unit's kind is the set of heads of its GQA group whose list reaches the last query unit (the
    vertical stripes of S2, or dense heads). Units of one kind, ascending, fill tiles together:
    stripe ``u`` with stripe ``u + vert_stride``, window-only neighbours with each other; a kind
    with a count that is not a multiple of ``merge`` leaves empty slots rather than mixing kinds.
    Long-list kinds come first, so the heavy tiles start first. Returns the units of every tile
    ``[kv heads, tiles, merge]`` (-1: empty) and the flat slot of every unit ``[kv heads, units]``."""
    device = row.device
    last = torch.full((heads * n_rows,), -1, dtype=torch.int64, device=device)
    last.scatter_reduce_(0, head * n_rows + row, col, reduce="amax")
    reaches_end = (last == n_cols - 1).view(heads // group, group, n_rows)
    if group <= 62:
        kind = (reaches_end.long() << torch.arange(group, device=device)[None, :, None]).sum(1)
    else:
        kind = reaches_end.any(1).long()
    rank = torch.where(kind > 0, kind, torch.iinfo(torch.int64).max)
    sorted_rank, order = torch.sort(rank, dim=1, stable=True)
    index = torch.arange(n_rows, device=device)
    slots, positions = [], []
    for g in range(order.shape[0]):  # one pass per KV head, once per layout
        new_kind = torch.ones(n_rows, dtype=torch.bool, device=device)
        new_kind[1:] = sorted_rank[g, 1:] != sorted_rank[g, :-1]
        seg = torch.cumsum(new_kind.long(), 0) - 1
        count = torch.zeros(n_rows, dtype=torch.int64, device=device).scatter_add_(0, seg, torch.ones_like(seg))
        padded = (count + merge - 1) // merge * merge
        pos = (torch.cumsum(padded, 0) - padded)[seg] + index - (torch.cumsum(count, 0) - count)[seg]
        positions.append(torch.empty_like(pos).scatter_(0, order[g], pos))
        slot_units = torch.full((int(padded.sum()),), -1, dtype=torch.int64, device=device)
        slot_units[pos] = order[g]
        slots.append(slot_units)
    n_tiles = max(len(t) for t in slots) // merge
    units = torch.full((len(slots), n_tiles * merge), -1, dtype=torch.int64, device=device)
    for g, slot_units in enumerate(slots):
        units[g, : len(slot_units)] = slot_units
    return units.view(len(slots), n_tiles, merge), torch.stack(positions)


def _merge_lists(head, row, col, tiles, heads, group, n_rows, n_cols, row_start, col_start, rows_are_queries):
    """Union of the lists of the units of each tile; ``tiles = (units, positions)`` as returned by
    ``_consecutive_tiles`` / ``_paired_tiles``, one tile group per ``group`` heads."""
    device = row.device
    units, position = tiles
    _, n_tiles, merge = units.shape
    pos = position[head // group, row]
    tile_row = head * n_tiles + pos // merge
    uniq, inverse = torch.unique(tile_row * n_cols + col, return_inverse=True)
    bits = torch.zeros_like(uniq).scatter_add_(0, inverse, 1 << (pos % merge))
    tile_row, col = uniq // n_cols, uniq % n_cols
    tile_units = units[(tile_row // n_tiles) // group, tile_row % n_tiles]
    # Empty slots (past the last unit) count as using every entry: nothing to mask for them.
    empty = tile_units < 0
    phantom = (empty.long() << torch.arange(merge, device=device)).sum(-1)
    all_bits = (1 << merge) - 1
    if rows_are_queries:  # some key of the unit lies after some query of the tile
        first = torch.where(empty, n_rows, tile_units).min(-1).values
        crosses = col + col_start >= first + row_start
    else:
        crosses = col + col_start <= tile_units.max(-1).values + row_start
    masked = ((bits | phantom) != all_bits) | crosses
    order_entries = torch.argsort((tile_row * 2 + masked.long()) * n_cols + col)
    entries = ((col << _FLAG_BITS) | bits)[order_entries].to(torch.int32)
    rows_total = heads * n_tiles
    per_row = torch.zeros(rows_total, dtype=torch.int64, device=device).scatter_add_(
        0, tile_row, torch.ones_like(tile_row))
    nfull = torch.zeros(rows_total, dtype=torch.int64, device=device).scatter_add_(0, tile_row, (~masked).long())
    ptr = torch.zeros(rows_total + 1, dtype=torch.int64, device=device)
    torch.cumsum(per_row, 0, out=ptr[1:])
    return TileLists(ptr.to(torch.int32), nfull.to(torch.int32), entries, units.to(torch.int32).contiguous(),
                     n_tiles)


# Head-dim classes of the launch choices: head dims 16-64, 128, 256.
HEAD_DIM_CLASSES = (64, 128, 256)
# Rows of a query tile (dQ) and of a key tile (dK/dV) per head-dim class: 128, since Hopper's tensor
# cores are underused at 64 rows; 64 at head dim 256 (registers, shared memory).
DQ_TILE_ROWS = {64: 128, 128: 128, 256: 64}
KEY_TILE_ROWS = {64: 128, 128: 128, 256: 64}
# Rows of a forward query tile per head-dim class. At head dim 128 one 64-token unit: a 4-warp
# program (one warpgroup) with registers capped at 128 and one stage, four per SM, ran 2-5% faster
# than two 8-warp programs of 128 rows from 16k to 128k tokens on an H200 and 7% at 8k: no two
# warpgroups wait for each other at the loop's barriers, ptxas does not serialize its products
# (it does with two stages, note C7512), and no tile computes the entries only its other unit uses
# (5% of the work at 32k).
FORWARD_TILE_ROWS = {64: 128, 128: 64, 256: 64}
# Tensor-descriptor (TMA on Hopper and newer) loads of the K/V units in the forward's and the dQ
# pass's inner loops: no per-element pointer tensors or address arithmetic (sm_90 ptxas, head dim
# 128, two key units per step: 191 registers instead of 253). On an H200 the forward measured 5-8%
# faster, the dQ pass as fast (head dim 128) or faster with 4 warps (64). The dK/dV pass loads Q/dO
# through pointers unless TMA_KEY_PASS. Other GPUs and misaligned tensors keep pointer loads.
TMA_LOADS = True
# Descriptor loads of Q/dO in the dK/dV pass. Off: measured 5-8% slower there on an H200 with the
# configs' 3 stages; tools/tune_kernel.py also times the 4-stage config with them.
TMA_KEY_PASS = False
# The fast backward adds each dQ part into the float32 accumulator as one tensor-descriptor reduction
# (a TMA bulk add of the whole [query step, head dim] tile on Hopper and newer) instead of one atomic
# per element: the fast backward took 2-33% less time on an H200 (the most with descriptor loads of
# Q/dO). Other GPUs keep the per-element atomics.
TMA_REDUCE = True
# The deterministic backward's dQ from stored dS: the dK/dV pass stores each block pair's dS (input
# dtype) and the dQ pass multiplies it by K, instead of recomputing P and dP (5 products per block
# pair instead of 7). The stored dS takes one element per computed score (about 4 GiB at 32k tokens,
# 32 heads, the default pattern): heads go in chunks of whole KV groups whose dS fits this many bytes;
# 0, or a group that alone does not fit, recomputes dS in the dQ pass. None: S2_DS_BUFFER_GB (GiB,
# default 8), read at each backward (``stored_ds_budget``).
STORED_DS_BYTES = None


def stored_ds_budget() -> int:
    """Bytes of stored dS allowed: ``STORED_DS_BYTES``, else the environment's S2_DS_BUFFER_GB."""
    if STORED_DS_BYTES is not None:
        return STORED_DS_BYTES
    value = os.environ.get("S2_DS_BUFFER_GB", "8")
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise ValueError(f"S2_DS_BUFFER_GB={value!r}: give the GiB of GPU memory the deterministic backward may "
                         "use for stored dS, e.g. 8 (the default) or 0 to recompute dS instead")
    return int(gib * 2**30)


# Tensor-descriptor stores of the dS blocks on Hopper and newer (else per-element pointers).
TMA_DS_STORE = True
# GQA packing: when the query heads of a KV group read the same blocks (kv_group, homogeneous),
# forward and dQ programs stack them in their rows and load each K/V unit once for the group.
PACK_GQA = True
# dK/dV programs of a GQA group per backward mode: one per query head (True) or one per group.
# Measured on an H200 (GQA 32/8, heterogeneous and kv_group heads, 32k and 128k): per head is 7-15%
# faster in the fast mode, whose group programs serialize their heads' dQ adds; per group 2-7% in the
# deterministic mode, where the per-head float32 partials and their sum cost more than the balance
# gains (tools/tune_kernel.py, "GQA dK/dV").
SPLIT_HEADS = {"fast": True, "deterministic": False}


def head_dim_class(head_dim: int) -> int:
    return next(c for c in HEAD_DIM_CLASSES if head_dim <= c)


def head_dim_index(head_dim: int) -> int:
    """Which of a launcher's config lists serves ``head_dim``."""
    return HEAD_DIM_CLASSES.index(head_dim_class(head_dim))


def tile_rows(head_dim: int):
    """Rows of the forward's query tiles, the dQ passes' and the dK/dV pass's key tiles."""
    dim_class = head_dim_class(head_dim)
    return FORWARD_TILE_ROWS[dim_class], DQ_TILE_ROWS[dim_class], KEY_TILE_ROWS[dim_class]


def _group_shares_lists(layout: S2Layout, group: int) -> bool:
    """Whether the query heads of every KV group have the same block lists."""
    ptr, idx, n_rows = layout.q2k_ptr.long(), layout.q2k_idx, layout.num_q_blocks
    counts = (ptr[1:] - ptr[:-1]).view(-1, group, n_rows)
    if not bool((counts == counts[:, :1]).all()):
        return False
    heads = layout.num_heads
    head_start = ptr[:-1:n_rows]  # first entry of each head
    length = counts.sum(-1).flatten()
    head_of_entry = torch.repeat_interleave(torch.arange(heads, device=idx.device), length, output_size=idx.numel())
    within = torch.arange(idx.numel(), device=idx.device) - head_start[head_of_entry]
    lead = head_start[head_of_entry // group * group]
    return torch.equal(idx, idx[lead + within])


def _query_tiling(layout: S2Layout, unit_entries, rows: int, group: int, unit: int, q_units: int, k_units: int,
                  q_start: int, k_start: int) -> QueryTiling:
    """Query tiles of ``rows`` rows. A group of 2-8 heads with shared lists fills the rows of one
    program with ``rows // group`` positions of each head (lists then cover ``max(unit, positions)``
    positions); otherwise a program is one head's tile of ``rows // unit`` consecutive units."""
    positions = rows // group
    if (PACK_GQA and 1 < group and group & (group - 1) == 0 and positions >= 16
            and _group_shares_lists(layout, group)):
        pack, merge = group, max(1, positions // unit)
    else:
        pack, merge = 1, max(1, rows // unit)
        positions = unit * merge
    heads = layout.num_heads
    tiles = _merge_lists(*unit_entries, _consecutive_tiles(q_units, merge, layout.q2k_idx.device), heads, heads,
                         q_units, k_units, q_start, k_start, rows_are_queries=True)
    return QueryTiling(merge=merge, tiles=tiles, pack=pack, positions=positions)


def _key_works(k_tiles: TileLists, heads: int, group: int):
    """The ``KeyWork`` of the dK/dV pass with programs per GQA group, per query head, and per group
    except those longer than the group's longest single-head program, which run per head. A
    program's cost is its list entries (query units against its key tile), summed over its heads."""
    tiles = k_tiles.num_tiles
    device = k_tiles.ptr.device
    per_head = (k_tiles.ptr[1:] - k_tiles.ptr[:-1]).view(heads // group, group, tiles).long()
    per_group = per_head.sum(1)
    group_items = torch.arange(per_group.numel(), device=device)
    head_items = torch.arange(per_head.numel(), device=device)

    def work(by_head):
        """Programs per head for the key tiles ``by_head`` ([kv heads, tiles]), else per group."""
        whole, one_head = ~by_head.flatten(), by_head[:, None, :].expand(per_head.shape).flatten()
        items = torch.cat((group_items[whole], ~head_items[one_head]))
        costs = torch.cat((per_group.flatten()[whole], per_head.flatten()[one_head]))
        kv_head = torch.cat((group_items[whole] // tiles, head_items[one_head] // (group * tiles)))
        # Heaviest first, so that no long program starts last (ties keep head-major order: the
        # programs running together read one head's Q and dO from L2).
        order = torch.sort(-costs, stable=True).indices
        longest = torch.zeros(heads // group, dtype=torch.long, device=device).scatter_reduce_(
            0, kv_head, costs, "amax")
        kind = "head" if bool(by_head.all()) else "mixed" if bool(by_head.any()) else "group"
        return KeyWork(items[order].to(torch.int32).contiguous(), kv_head[order],
                       tuple(torch.bincount(kv_head, minlength=heads // group).tolist()), tuple(longest.tolist()),
                       None if kind == "group" else group_items[by_head.flatten()].to(torch.int32), kind)

    long = per_group > per_head.amax((1, 2))[:, None]
    return work(torch.zeros_like(long)), work(torch.ones_like(long)), work(long)


def _stored_ds_index(q_tiles: TileLists, k_tiles: TileLists, key_positions, group: int, k_merge: int, q_units: int):
    """``KernelLayout.q_ds_index``: where the dQ pass finds, for each query-list entry (a key unit
    against a query tile), each of the tile's units' dS block as written by the dK/dV pass (one per
    k-list entry: a key tile against a query unit). ``key_positions``: every key unit's flat slot
    per KV head (``_paired_tiles``)."""
    device = q_tiles.entries.device

    def list_rows(tiles):
        counts = (tiles.ptr[1:] - tiles.ptr[:-1]).long()
        rows = torch.arange(counts.numel(), device=device)
        return torch.repeat_interleave(rows, counts, output_size=tiles.entries.numel())

    # Every k-list entry as one sortable (list row, query unit) key.
    k_keys = list_rows(k_tiles) * q_units + (k_tiles.entries >> _FLAG_BITS).long()
    sorted_keys, k_entry = torch.sort(k_keys)
    q_rows = list_rows(q_tiles)
    head, tile = q_rows // q_tiles.num_tiles, q_rows % q_tiles.num_tiles
    entries = q_tiles.entries.long()
    key_position = key_positions[head // group, entries >> _FLAG_BITS]
    units = q_tiles.units[0, tile].long()  # [entries, slots]
    wanted = (head * k_tiles.num_tiles + key_position // k_merge)[:, None] * q_units + units
    found = torch.searchsorted(sorted_keys, wanted).clamp(max=max(sorted_keys.numel() - 1, 0))
    slots = torch.arange(units.shape[1], device=device)
    used = ((entries[:, None] >> slots) & 1).bool() & (units >= 0)
    code = (k_entry[found] << 3) | (key_position % k_merge)[:, None]
    return torch.where(used, code, -1).to(torch.int32).contiguous()


_derived: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def kernel_layout(layout: S2Layout, head_dim: int, group: int) -> KernelLayout:
    """Tile lists for ``layout`` and ``group`` query heads per KV head, cached by layout identity
    (get_layout caches the layouts themselves)."""
    unit = min(layout.block_size, _MAX_UNIT)
    forward_rows, dq_rows, key_rows = tile_rows(head_dim)
    key = (id(layout), forward_rows, dq_rows, key_rows, group, PACK_GQA)
    hit = _derived.get(key)
    if hit is not None and hit[0] is layout:
        _derived.move_to_end(key)
        return hit[1]
    refine = layout.block_size // unit
    k_merge = max(1, key_rows // unit)
    heads = layout.num_heads
    q_units, k_units = layout.num_q_blocks * refine, layout.num_k_blocks * refine
    q_start, k_start = layout.q_block_start * refine, layout.k_block_start * refine
    q_entries = _unit_entries(layout.q2k_ptr, layout.q2k_idx, heads, layout.num_q_blocks, q_start, k_start,
                              refine, rows_are_queries=True)
    dq_tiling = _query_tiling(layout, q_entries, dq_rows, group, unit, q_units, k_units, q_start, k_start)
    forward_tiling = dq_tiling if forward_rows == dq_rows else _query_tiling(
        layout, q_entries, forward_rows, group, unit, q_units, k_units, q_start, k_start)
    hk, rk, ck = _unit_entries(layout.k2q_ptr, layout.k2q_idx, heads, layout.num_k_blocks, k_start, q_start,
                               refine, rows_are_queries=False)
    k_pairs = _paired_tiles(hk, rk, ck, heads, group, k_merge, k_units, q_units)
    k_tiles = _merge_lists(hk, rk, ck, k_pairs, heads, group, k_units, q_units, k_start, q_start,
                           rows_are_queries=False)
    per_group, per_head, long_per_head = _key_works(k_tiles, heads, group)
    q_ds_index = _stored_ds_index(dq_tiling.tiles, k_tiles, k_pairs[1], group, k_merge, q_units)
    derived = KernelLayout(unit=unit, k_merge=k_merge, forward_tiling=forward_tiling, dq_tiling=dq_tiling,
                           k_tiles=k_tiles, k_work_per_group=per_group,
                           k_work_per_head=per_head, k_work_long_per_head=long_per_head, q_ds_index=q_ds_index,
                           k_head_starts=tuple(k_tiles.ptr[::k_tiles.num_tiles].tolist()))
    _derived[key] = (layout, derived)  # holding the layout keeps its id from being reused
    if len(_derived) > _DERIVED_CACHE_SIZE:
        _derived.popitem(last=False)
    return derived


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _seq_bounds(CU, b, len_all, VARLEN: tl.constexpr):
    """First token and length of sequence ``b`` (packed input) or of the batch row."""
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = b * 0
        length = len_all + b * 0
    return start, length


@triton.jit
def _lower_bound(ENTRIES, lo, hi, unit_limit):
    """First position in the ascending ``ENTRIES[lo:hi]`` whose unit is >= ``unit_limit``."""
    while lo < hi:
        mid = (lo + hi) // 2
        below = (tl.load(ENTRIES + mid) >> FLAG_BITS) < unit_limit
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _key_ptrs(base, ENTRIES, e, stride, offs_n, offs_d, UNIT: tl.constexpr, STEP: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """Pointers to the rows of the ``STEP`` key units listed at ``ENTRIES[e:e + STEP]``.

    Returns ``[dim, keys]`` pointers if ``TRANSPOSED`` else ``[keys, dim]``, and the first entry."""
    entry = tl.load(ENTRIES + e)
    if STEP == 2:
        # Row offsets, not a select between pointers: the compiler then still sees 16-byte
        # contiguous rows and pipelines the loads.
        second = (tl.load(ENTRIES + e + 1) >> FLAG_BITS) * UNIT - UNIT
        rows = tl.where(offs_n < UNIT, (entry >> FLAG_BITS) * UNIT, second) + offs_n
        row_off = rows.to(tl.int64) * stride
        if TRANSPOSED:
            ptrs = base + row_off[None, :] + offs_d[:, None]
        else:
            ptrs = base + row_off[:, None] + offs_d[None, :]
    else:
        ptr0 = base + ((entry >> FLAG_BITS) * UNIT).to(tl.int64) * stride
        if TRANSPOSED:
            ptrs = ptr0 + offs_n[None, :] * stride + offs_d[:, None]
        else:
            ptrs = ptr0 + offs_n[:, None] * stride + offs_d[None, :]
    return ptrs, entry


@triton.jit
def _query_tile_program(CU_Q, CU_K, num_heads, num_programs, num_list_tiles, len_q_all, len_k_all,
                        UNIT: tl.constexpr, MERGE: tl.constexpr, PACK: tl.constexpr, POS: tl.constexpr,
                        VARLEN: tl.constexpr):
    """A query-tile program (forward, dQ): ``POS`` positions of ``PACK`` query heads, ``PACK * POS``
    rows. ``PACK`` > 1 stacks the heads of one GQA group that share their lists (GQA packing: each
    K/V unit is loaded once for the group). Returns ``(b, first head, first position, row position
    offsets, row head offsets, list row, row unit slots, q_tok0, len_q, k_tok0, len_k)``. Programs of
    one head (pack) run together, so its K/V stays in L2; late (heavy) positions first."""
    pid_bh = tl.program_id(1)
    tile = num_programs - 1 - tl.program_id(0)
    b = pid_bh // (num_heads // PACK)
    h0 = (pid_bh % (num_heads // PACK)) * PACK
    q_tok0, len_q = _seq_bounds(CU_Q, b, len_q_all, VARLEN)
    k_tok0, len_k = _seq_bounds(CU_K, b, len_k_all, VARLEN)
    pos0 = tile * POS
    rows = tl.arange(0, PACK * POS)
    list_tile = pos0 // (UNIT * MERGE)  # a list tile holds MERGE units: one or more programs' positions
    if PACK == 1:  # the plain form: the compiler then sees the rows' contiguity (and less to keep live)
        rel_pos = rows
        rel_head = 0
        unit_of_row = rows // UNIT
    else:
        rel_pos = rows % POS
        rel_head = rows // POS
        # A list tile holds max(UNIT, POS) positions. Written per case, so that the compiler sees
        # the result constant over each unit's rows.
        if POS <= UNIT:
            unit_of_row = (pos0 - list_tile * (UNIT * MERGE)) // UNIT + rows * 0
        else:
            unit_of_row = rel_pos // UNIT
    return (b, h0, pos0, rel_pos, rel_head, h0 * num_list_tiles + list_tile, unit_of_row, q_tok0, len_q,
            k_tok0, len_k)


@triton.jit
def _row_offsets(rel_pos, rel_head, stride_s, stride_h, PACK: tl.constexpr):
    """Offsets of a program's rows from its first (position, head): positions, and heads if packed."""
    offsets = rel_pos * stride_s
    if PACK > 1:
        offsets += rel_head * stride_h
    return offsets


@triton.jit
def _head_kv_bases(K, V, b64, k_tok0, kh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh):
    """Pointers to the first key of KV head ``kh`` in K and V."""
    k_base = K + b64 * stride_kb + k_tok0.to(tl.int64) * stride_ks + kh * stride_kh
    v_base = V + b64 * stride_vb + k_tok0.to(tl.int64) * stride_vs + kh * stride_vh
    return k_base, v_base


@triton.jit
def _row_sources(a_base, b_base, length, stride_a, stride_b, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                 TMA: tl.constexpr):
    """What an inner loop loads ``ROWS`` rows at a time from, for two ``[length, HEAD_DIM]`` tensors
    of one head (K and V, or Q and dO): tensor descriptors with ``TMA`` (rows past ``length`` read
    as zero), else the base pointers."""
    if TMA:
        a_src = tl.make_tensor_descriptor(a_base, shape=[length, HEAD_DIM], strides=[stride_a, 1],
                                          block_shape=[ROWS, HEAD_DIM])
        b_src = tl.make_tensor_descriptor(b_base, shape=[length, HEAD_DIM], strides=[stride_b, 1],
                                          block_shape=[ROWS, HEAD_DIM])
    else:
        a_src = a_base
        b_src = b_base
    return a_src, b_src


@triton.jit
def _tile_entries(T_PTR, T_NFULL, row, STEP: tl.constexpr):
    """``(e_lo, e_mid, e_hi)`` of tile-list row ``row``: ``[e_lo, e_mid)`` run unmasked ``STEP`` units
    at a time, ``[e_mid, e_hi)`` masked (an odd last unmasked entry joins the masked loop)."""
    e_lo = tl.load(T_PTR + row)
    e_mid = e_lo + tl.load(T_NFULL + row) // STEP * STEP
    e_hi = tl.load(T_PTR + row + 1)
    return e_lo, e_mid, e_hi


@triton.jit
def _entry_mask(entry, unit_of_row, q_pos, k_pos0, k_row0, offs_n, len_k):
    """Which (query row, key ``k_row0 + offs_n``) pairs of a masked step count: the row's unit uses
    the entry, the key is not after the query (causal) and lies before the end of the keys."""
    # Per row, the last key offset it may see (-1: none), so that each score costs one comparison.
    last = tl.minimum(q_pos - k_pos0, len_k - 1) - k_row0
    last = tl.where(((entry >> unit_of_row) & 1) != 0, last, -1)
    return offs_n[None, :] <= last[:, None]


@triton.jit
def _masked_scores(s, entry, unit_of_row, q_pos, k_pos0, k_row0, offs_n, len_k, qk_scale):
    """A masked forward step's scores, scaled, with ``MASKED_SCORE`` where ``_entry_mask`` drops them."""
    return tl.where(_entry_mask(entry, unit_of_row, q_pos, k_pos0, k_row0, offs_n, len_k), s * qk_scale,
                    MASKED_SCORE)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, ENTRIES, e_lo, e_hi,
               qk_scale, q_pos, len_k, k_pos0, unit_of_row, offs_d,
               UNIT: tl.constexpr, STEP: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the key units at ``ENTRIES[e_lo:e_hi]``, ``STEP`` units per iteration
    (unmasked loop only; the masked loop runs one unit at a time), loaded through pointers."""
    offs_n = tl.arange(0, UNIT * STEP)
    for e in range(e_lo, e_hi, STEP):
        k_ptrs, entry = _key_ptrs(k_base, ENTRIES, e, stride_ks, offs_n, offs_d, UNIT, STEP, True)
        v_ptrs, _ = _key_ptrs(v_base, ENTRIES, e, stride_vs, offs_n, offs_d, UNIT, STEP, False)
        if MASKED:
            k_row0 = (entry >> FLAG_BITS) * UNIT
            k_ok = (k_row0 + offs_n) < len_k
            s = tl.dot(q, tl.load(k_ptrs, mask=k_ok[None, :], other=0.0), input_precision=DOT_PREC)
            s = _masked_scores(s, entry, unit_of_row, q_pos, k_pos0, k_row0, offs_n, len_k, qk_scale)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            s = tl.dot(q, tl.load(k_ptrs), input_precision=DOT_PREC)
            # Scale the row maxima, not the tile: one fused multiply-add per score.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            v = tl.load(v_ptrs)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _unit_scores(q, k_desc, entry, offs_n, qk_scale, q_pos, len_k, k_pos0, unit_of_row,
                 UNIT: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Q·Kᵀ against the key unit of ``entry``; masked: scaled, with the entry's token mask."""
    row0 = (entry >> FLAG_BITS) * UNIT
    s = tl.dot(q, tl.trans(k_desc.load([row0, 0])), input_precision=DOT_PREC)
    if MASKED:
        s = _masked_scores(s, entry, unit_of_row, q_pos, k_pos0, row0, offs_n, len_k, qk_scale)
    return s, row0


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, ENTRIES, e_lo, e_hi, qk_scale, q_pos, len_k, k_pos0,
                   unit_of_row, UNIT: tl.constexpr, STEP: tl.constexpr, MASKED: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """``_fwd_inner`` with tensor-descriptor (TMA on Hopper) loads of whole key units: no
    per-element pointers. With ``STEP`` 2 (unmasked loop only) the two units' scores share one
    online-softmax update, as the pointer loop's 128-key step does."""
    tl.static_assert(not MASKED or STEP == 1)
    offs_n = tl.arange(0, UNIT)
    if MASKED:
        scale = 1.0  # the masked scores are scaled already
    else:
        scale = qk_scale  # scale the row maxima, not the tile: one fused multiply-add per score
    for e in range(e_lo, e_hi, STEP):
        s0, row0 = _unit_scores(q, k_desc, tl.load(ENTRIES + e), offs_n, qk_scale, q_pos, len_k, k_pos0,
                                unit_of_row, UNIT, MASKED, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s0, 1) * scale)
        if STEP == 2:
            s1, row1 = _unit_scores(q, k_desc, tl.load(ENTRIES + e + 1), offs_n,
                                    qk_scale, q_pos, len_k, k_pos0, unit_of_row, UNIT, MASKED, DOT_PREC)
            m_new = tl.maximum(m_new, tl.max(s1, 1) * scale)
        alpha = tl.math.exp2(m_i - m_new)
        p0 = tl.math.exp2(s0 * scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p0, 1)
        acc = acc * alpha[:, None]
        v0 = v_desc.load([row0, 0])
        acc = tl.dot(p0.to(v0.dtype), v0, acc, input_precision=DOT_PREC)
        if STEP == 2:
            p1 = tl.math.exp2(s1 * scale - m_new[:, None])
            l_i += tl.sum(p1, 1)
            v1 = v_desc.load([row1, 0])
            acc = tl.dot(p1.to(v1.dtype), v1, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _row_results(m_i, l_i):
    """A finished softmax's per-row factor for the accumulated output and its log-sum-exp. A row that
    reads no key (a key range that ends before it; m_i stays at MASKED_SCORE) gives out 0 and lse
    -inf, so partial results merge by lse. One reciprocal a row, not a division a score."""
    has_key = m_i > MASKED_SCORE
    return (tl.where(has_key, 1.0 / l_i, 0.0),
            tl.where(has_key, (m_i + tl.math.log2(l_i)) / LOG2E, float("-inf")))


@triton.jit
def _out_ptrs(O, LSE, b64, tok0, h0, rel_pos, rel_head, offs_d, stride_ob, stride_os, stride_oh, stride_lb,
              stride_lh, PACK: tl.constexpr):
    """Pointers to a forward program's output rows and their log-sum-exps."""
    o_ptrs = (O + b64 * stride_ob + tok0 * stride_os + h0 * stride_oh
              + _row_offsets(rel_pos, rel_head, stride_os, stride_oh, PACK)[:, None] + offs_d[None, :])
    l_ptrs = LSE + b64 * stride_lb + h0 * stride_lh + tok0 + _row_offsets(rel_pos, rel_head, 1, stride_lh, PACK)
    return o_ptrs, l_ptrs


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, T_PTR, T_NFULL, ENTRIES, CU_Q, CU_K, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    num_heads, group, len_q_all, len_k_all, num_programs, num_list_tiles, q_pos0, k_pos0, tune_bucket,
    HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, MERGE: tl.constexpr, PACK: tl.constexpr, POS: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, RESUME: tl.constexpr, TMA: tl.constexpr,
    STEP: tl.constexpr,
):
    ROWS: tl.constexpr = PACK * POS
    b, h0, pos0, rel_pos, rel_head, list_row, unit_of_row, q_tok0, len_q, k_tok0, len_k = _query_tile_program(
        CU_Q, CU_K, num_heads, num_programs, num_list_tiles, len_q_all, len_k_all, UNIT, MERGE, PACK, POS, VARLEN)
    if pos0 < len_q:
        offs_d = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        tok0 = (q_tok0 + pos0).to(tl.int64)
        row_ok = (pos0 + rel_pos) < len_q
        q_rows = _row_offsets(rel_pos, rel_head, stride_qs, stride_qh, PACK)
        q = tl.load(Q + b64 * stride_qb + tok0 * stride_qs + h0 * stride_qh + q_rows[:, None] + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base, v_base = _head_kv_bases(K, V, b64, k_tok0, h0 // group, stride_kb, stride_ks, stride_kh,
                                        stride_vb, stride_vs, stride_vh)
        e_lo, e_mid, e_hi = _tile_entries(T_PTR, T_NFULL, list_row, STEP)
        q_pos = q_pos0 + pos0 + rel_pos
        if RESUME:
            o_ptrs, l_ptrs = _out_ptrs(O, LSE, b64, tok0, h0, rel_pos, rel_head, offs_d, stride_ob, stride_os,
                                       stride_oh, stride_lb, stride_lh, PACK)
            # Continue the softmax already in O/LSE (earlier keys): normalized out with l = 1.
            lse_prev = tl.load(l_ptrs, mask=row_ok, other=float("-inf"))
            started = lse_prev > float("-inf")
            m_i = tl.where(started, lse_prev * LOG2E, float("-inf"))
            l_i = tl.where(started, 1.0, 0.0)
            acc = tl.load(o_ptrs, mask=row_ok[:, None] & started[:, None], other=0.0).to(tl.float32)
        else:
            m_i = tl.full([ROWS], float("-inf"), tl.float32)
            l_i = tl.zeros([ROWS], tl.float32)
            acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        k_src, v_src = _row_sources(k_base, v_base, len_k, stride_ks, stride_vs, HEAD_DIM, UNIT, TMA)
        # The masked entries first: in the other order ptxas (sm_90, head dim 128, 2 stages) also finds
        # the accumulator written while a product is in flight (note C7515). Both orders timed the
        # same on an H200. (At the 128-register cap ptxas serializes the products anyway, C7512.)
        if TMA:
            acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_src, v_src, ENTRIES, e_mid, e_hi, qk_scale,
                                           q_pos, len_k, k_pos0, unit_of_row, UNIT, 1, True, DOT_PREC)
            acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_src, v_src, ENTRIES, e_lo, e_mid, qk_scale,
                                           q_pos, len_k, k_pos0, unit_of_row, UNIT, STEP, False, DOT_PREC)
        else:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, ENTRIES,
                                       e_mid, e_hi, qk_scale, q_pos, len_k, k_pos0, unit_of_row,
                                       offs_d, UNIT, 1, True, DOT_PREC)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, ENTRIES,
                                       e_lo, e_mid, qk_scale, q_pos, len_k, k_pos0, unit_of_row,
                                       offs_d, UNIT, STEP, False, DOT_PREC)
        # The output's pointers only now: computed before the loops, they would hold registers through them.
        o_ptrs, l_ptrs = _out_ptrs(O, LSE, b64, tok0, h0, rel_pos, rel_head, offs_d, stride_ob, stride_os, stride_oh,
                                   stride_lb, stride_lh, PACK)
        scale, lse = _row_results(m_i, l_i)
        tl.store(o_ptrs, (acc * scale[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DLSE, DELTA, DQ_ACC, CU_Q, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh, stride_ab, stride_as, stride_ah, num_heads, len_q_all,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, laid out like the lse; zeroes the dQ accumulator (fast mode)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_tok0, len_q = _seq_bounds(CU_Q, b, len_q_all, VARLEN)
    row0 = tl.program_id(1) * ROWS
    if row0 < len_q:
        offs_m = tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = (row0 + offs_m) < len_q
        tok = (q_tok0 + row0 + offs_m).to(tl.int64)
        b64 = b.to(tl.int64)
        o = tl.load(O + b64 * stride_ob + h * stride_oh + tok[:, None] * stride_os + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + b64 * stride_db + h * stride_dh + tok[:, None] * stride_ds + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        l_off = b64 * stride_lb + h * stride_lh + tok
        if HAS_DLSE:
            delta -= tl.load(DLSE + l_off, mask=row_ok, other=0.0)
        tl.store(DELTA + l_off, delta, mask=row_ok)
        if ZERO_DQ:
            tl.store(DQ_ACC + b64 * stride_ab + h * stride_ah + tok[:, None] * stride_as + offs_d[None, :],
                     tl.zeros([ROWS, HEAD_DIM], tl.float32), mask=row_ok[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, l_base, d_base, dq_base, dq_desc, ds_dst, ds_shift, stride_qs, stride_ds,
                stride_as, ENTRIES, e_lo, e_stop, e_mid, e_hi, qk_scale, sm_scale, k_pos, len_q, q_pos0, unit_of_row,
                offs_d, UNIT: tl.constexpr, TILE: tl.constexpr, QSTEP: tl.constexpr, DOT_PREC: tl.constexpr,
                FUSED_DQ: tl.constexpr, DQ_T: tl.constexpr, DQ_REDUCE: tl.constexpr, TMA: tl.constexpr,
                STORE_DS: tl.constexpr, DS_TMA: tl.constexpr):
    """dK/dV of one key tile from the query units at ``ENTRIES[e_lo:e_stop]`` (unmasked), then at
    ``ENTRIES[e_mid:e_hi]`` (masked), in one loop (two loops measured 1-4% slower on an H200),
    ``QSTEP`` query rows at a time (32 keeps the [tile, QSTEP] fp32 temporaries small enough to
    avoid spills); with ``FUSED_DQ`` also adds each step's dQ part into the float32 accumulator at
    ``dq_base``, by per-element atomics or, with ``DQ_REDUCE``, one descriptor reduction per step
    (``dq_desc``); with ``STORE_DS`` stores each step's dS for the dQ pass, list entry ``e``'s into
    block ``e - ds_shift`` of ``ds_dst`` (a descriptor with ``DS_TMA``, else a pointer). Q and dO come
    from descriptors with ``TMA`` (``TMA_KEY_PASS``), else through pointers."""
    offs_u = tl.arange(0, QSTEP)
    n_unmasked = e_stop - e_lo
    for i in range(0, n_unmasked + e_hi - e_mid):
        masked = i >= n_unmasked
        e = e_lo + i + tl.where(masked, e_mid - e_stop, 0)
        entry = tl.load(ENTRIES + e)
        for sub in tl.static_range(UNIT // QSTEP):
            q_row0 = (entry >> FLAG_BITS) * UNIT + sub * QSTEP
            q_ok = (q_row0 + offs_u) < len_q
            q_off = q_row0.to(tl.int64)
            if TMA:  # rows past len_q read as zero
                qt = tl.trans(q_src.load([q_row0, 0]))
                do = do_src.load([q_row0, 0])
            else:
                qt = tl.load(q_src + q_off * stride_qs + offs_u[None, :] * stride_qs + offs_d[:, None],
                             mask=q_ok[None, :], other=0.0)
                do = tl.load(do_src + q_off * stride_ds + offs_u[:, None] * stride_ds + offs_d[None, :],
                             mask=q_ok[:, None], other=0.0)
            lse2 = tl.load(l_base + q_row0 + offs_u, mask=q_ok, other=0.0) * LOG2E
            delta = tl.load(d_base + q_row0 + offs_u, mask=q_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse2[None, :])
            if masked:
                # Per key row, the first query offset that may see it (QSTEP: none).
                first = tl.where(((entry >> unit_of_row) & 1) != 0, k_pos - q_pos0 - q_row0, QSTEP)
                pt = tl.where(offs_u[None, :] >= first[:, None], pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
            dk = tl.dot(dst, tl.trans(qt), dk, input_precision=DOT_PREC)
            if STORE_DS:  # a block per entry: [TILE keys, UNIT queries]
                block = e - ds_shift
                if DS_TMA:
                    ds_dst.store([block * TILE, sub * QSTEP], dst)
                else:
                    tl.store(ds_dst + (block.to(tl.int64) * TILE + tl.arange(0, TILE)[:, None]) * UNIT + sub * QSTEP
                             + offs_u[None, :], dst)
            # Key rows past the end or in empty slots were loaded as 0: they add nothing to dQ.
            if FUSED_DQ and DQ_REDUCE:  # rows past len_q fall outside the descriptor's shape: dropped
                if DQ_T:
                    dq = tl.trans(tl.dot(tl.trans(k), dst, input_precision=DOT_PREC))
                else:
                    dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC)
                dq_desc.atomic_add([q_row0, 0], dq * sm_scale)
            elif FUSED_DQ and DQ_T:  # dQᵀ = Kᵀ·dSᵀ: the head dim as the product's rows (see _FUSED_CONFIGS)
                dqt = tl.dot(tl.trans(k), dst, input_precision=DOT_PREC) * sm_scale
                tl.atomic_add(dq_base + q_off * stride_as + offs_u[None, :] * stride_as + offs_d[:, None], dqt,
                              mask=q_ok[None, :], sem="relaxed")
            elif FUSED_DQ:
                dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * sm_scale
                tl.atomic_add(dq_base + q_off * stride_as + offs_u[:, None] * stride_as + offs_d[None, :], dq,
                              mask=q_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _key_item(ORDER, num_seqs, num_tiles, group, ITEMS: tl.constexpr):
    """``(sequence, key tile, first query head, query heads, one head?)`` of this dK/dV program's
    ``KeyWork`` item (of the kinds ``ITEMS``); heaviest items first, for every sequence before the
    next lighter item."""
    work = tl.load(ORDER + tl.program_id(0) // num_seqs)
    if ITEMS == "head":  # one query head, known at compile time (no loop over heads)
        item = -1 - work
        h_first = item // num_tiles
        num_heads = 1
        one_head = True
    elif ITEMS == "group":
        item = work
        h_first = item // num_tiles * group
        num_heads = group
        one_head = False
    else:
        one_head = work < 0
        item = tl.where(one_head, -1 - work, work)
        h_first = tl.where(one_head, item // num_tiles, item // num_tiles * group)
        num_heads = tl.where(one_head, 1, group)
    return tl.program_id(0) % num_seqs, item % num_tiles, h_first, num_heads, one_head


@triton.jit
def _key_tile_rows(T_UNITS, kh, num_tiles, tile, k_tok0, len_k, UNIT: tl.constexpr, MERGE: tl.constexpr):
    """``(rows, rows in range, token offsets)`` of a dK/dV key tile; its units need not be
    neighbours (see _paired_tiles)."""
    offs_m = tl.arange(0, UNIT * MERGE)
    slot_unit = tl.load(T_UNITS + (kh * num_tiles + tile) * MERGE + offs_m // UNIT)
    rows = slot_unit * UNIT + offs_m % UNIT
    return rows, (slot_unit >= 0) & (rows < len_k), (k_tok0 + rows).to(tl.int64)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DK_PART, DV_PART, DQ_ACC, LSE, DELTA, T_PTR, T_NFULL, ENTRIES, T_UNITS, ORDER, CU_Q, CU_K,
    qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_dkb, stride_dks, stride_dkh,
    stride_pb, stride_ps, stride_ph, stride_ab, stride_as, stride_ah, stride_lb, stride_lh,
    group, num_seqs, len_q_all, len_k_all, num_tiles, q_pos0, k_pos0, tune_bucket,
    DS, ds_base, ds_blocks,
    HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, MERGE: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, FUSED_DQ: tl.constexpr, DQ_REDUCE: tl.constexpr,
    TMA: tl.constexpr, QSTEP: tl.constexpr, DQ_T: tl.constexpr = True, STORE_DS: tl.constexpr = False,
    DS_TMA: tl.constexpr = False, ITEMS: tl.constexpr = "group",
):
    """One key tile against the query heads of a ``KeyWork`` item: a GQA group's, whose dK/dV go to
    DK/DV (same strides), or one head's, whose float32 partials go to DK_PART/DV_PART (per query
    head, same strides). With ``STORE_DS``, the dS of list entry ``e`` of sequence ``b`` goes to
    block ``b * ds_blocks + e - ds_base`` of ``DS`` ([blocks, TILE keys, UNIT queries])."""
    TILE: tl.constexpr = UNIT * MERGE
    b, tile, h_first, num_heads, _one_head = _key_item(ORDER, num_seqs, num_tiles, group, ITEMS)
    kh = h_first // group
    q_tok0, len_q = _seq_bounds(CU_Q, b, len_q_all, VARLEN)
    k_tok0, len_k = _seq_bounds(CU_K, b, len_k_all, VARLEN)
    offs_m = tl.arange(0, TILE)
    rows, row_ok, k_off = _key_tile_rows(T_UNITS, kh, num_tiles, tile, k_tok0, len_k, UNIT, MERGE)
    if tl.max(row_ok.to(tl.int32), 0) > 0:
        offs_d = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        k = tl.load(K + b64 * stride_kb + kh * stride_kh + k_off[:, None] * stride_ks + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        v = tl.load(V + b64 * stride_vb + kh * stride_vh + k_off[:, None] * stride_vs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_pos = k_pos0 + rows
        unit_of_row = offs_m // UNIT
        q_units = (len_q + UNIT - 1) // UNIT
        dk = tl.zeros([TILE, HEAD_DIM], tl.float32)
        dv = tl.zeros([TILE, HEAD_DIM], tl.float32)
        q_tok = q_tok0.to(tl.int64)
        ds_shift = ds_base - b * ds_blocks
        if DS_TMA:
            ds_dst = tl.make_tensor_descriptor(DS, shape=[(num_seqs * ds_blocks) * TILE, UNIT], strides=[UNIT, 1],
                                               block_shape=[TILE, QSTEP])
        else:
            ds_dst = DS
        for h in range(h_first, h_first + num_heads):
            q_base = Q + b64 * stride_qb + h * stride_qh + q_tok * stride_qs
            do_base = DO + b64 * stride_db + h * stride_dh + q_tok * stride_ds
            dq_base = DQ_ACC + b64 * stride_ab + h * stride_ah + q_tok * stride_as
            if DQ_REDUCE:
                dq_desc = tl.make_tensor_descriptor(dq_base, shape=[len_q, HEAD_DIM], strides=[stride_as, 1],
                                                    block_shape=[QSTEP, HEAD_DIM])
            else:
                dq_desc = dq_base
            q_src, do_src = _row_sources(q_base, do_base, len_q, stride_qs, stride_ds, HEAD_DIM, QSTEP, TMA)
            l_base = LSE + b64 * stride_lb + h * stride_lh + q_tok
            d_base = DELTA + b64 * stride_lb + h * stride_lh + q_tok
            e_lo, e_mid, e_hi = _tile_entries(T_PTR, T_NFULL, h * num_tiles + tile, 1)
            if VARLEN:  # the lists serve the longest sequence: stop at this sequence's last unit
                e_stop = _lower_bound(ENTRIES, e_lo, e_mid, q_units)
                e_hi = _lower_bound(ENTRIES, e_mid, e_hi, q_units)
            else:
                e_stop = e_mid
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, l_base, d_base, dq_base, dq_desc, ds_dst, ds_shift,
                                 stride_qs, stride_ds, stride_as, ENTRIES, e_lo, e_stop, e_mid, e_hi, qk_scale,
                                 sm_scale, k_pos, len_q, q_pos0, unit_of_row, offs_d, UNIT, TILE, QSTEP, DOT_PREC,
                                 FUSED_DQ, DQ_T, DQ_REDUCE, TMA, STORE_DS, DS_TMA)
        dk *= sm_scale
        # The item and its rows again rather than kept through the loops, which are short of registers
        # (kept, their layout conversions for these stores were hoisted before the loops: spills).
        _b, tile, h_first, _heads, one_head = _key_item(ORDER, num_seqs, num_tiles, group, ITEMS)
        kh = h_first // group
        _rows, row_ok, k_off = _key_tile_rows(T_UNITS, kh, num_tiles, tile, k_tok0, len_k, UNIT, MERGE)
        if one_head:
            out = b64 * stride_pb + h_first * stride_ph + k_off[:, None] * stride_ps + offs_d[None, :]
            tl.store(DK_PART + out, dk, mask=row_ok[:, None])
            tl.store(DV_PART + out, dv, mask=row_ok[:, None])
        else:
            out = b64 * stride_dkb + kh * stride_dkh + k_off[:, None] * stride_dks + offs_d[None, :]
            tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=row_ok[:, None])
            tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sum_partials_kernel(DK_PART, DV_PART, DK, DV, SPLIT, T_UNITS, CU_K, stride_pb, stride_ps, stride_ph,
                         stride_dkb, stride_dks, stride_dkh, group, num_tiles, len_k_all,
                         HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, MERGE: tl.constexpr, VARLEN: tl.constexpr):
    """dK/dV of a key tile whose dK/dV pass ran per query head: the float32 partials of the group's
    heads added in head order (bit-identical from run to run), cast once."""
    item = tl.load(SPLIT + tl.program_id(0))  # kv_head * num_tiles + tile
    kh = item // num_tiles
    b = tl.program_id(1)
    k_tok0, len_k = _seq_bounds(CU_K, b, len_k_all, VARLEN)
    _rows, row_ok, k_off = _key_tile_rows(T_UNITS, kh, num_tiles, item % num_tiles, k_tok0, len_k, UNIT, MERGE)
    if tl.max(row_ok.to(tl.int32), 0) > 0:
        b64 = b.to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        part = b64 * stride_pb + kh * group * stride_ph + k_off[:, None] * stride_ps + offs_d[None, :]
        dk = tl.zeros([UNIT * MERGE, HEAD_DIM], tl.float32)
        dv = tl.zeros([UNIT * MERGE, HEAD_DIM], tl.float32)
        for g in range(group):
            dk += tl.load(DK_PART + part + g * stride_ph, mask=row_ok[:, None], other=0.0)
            dv += tl.load(DV_PART + part + g * stride_ph, mask=row_ok[:, None], other=0.0)
        out = b64 * stride_dkb + kh * stride_dkh + k_off[:, None] * stride_dks + offs_d[None, :]
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=row_ok[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dq_update(dq, q, do, lse2, delta, kt, vt, entry, k_row0, offs_n, qk_scale, q_pos, len_k, k_pos0, unit_of_row,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ += dS·K for the keys ``k_row0 + offs_n`` (``kt``/``vt``: their K and V, transposed)."""
    p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(_entry_mask(entry, unit_of_row, q_pos, k_pos0, k_row0, offs_n, len_k), p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, ENTRIES, e_lo, e_hi,
              qk_scale, q_pos, len_k, k_pos0, unit_of_row, offs_d,
              UNIT: tl.constexpr, STEP: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
              TMA: tl.constexpr):
    """dQ of a query tile from the key units at ``ENTRIES[e_lo:e_hi]``, ``STEP`` per iteration
    (descriptor loads with ``TMA``: one unit per product, as dQ adds up unit by unit)."""
    if TMA:
        offs_n = tl.arange(0, UNIT)
        for e in range(e_lo, e_hi, STEP):
            for j in tl.static_range(STEP):
                entry = tl.load(ENTRIES + e + j)
                k_row0 = (entry >> FLAG_BITS) * UNIT
                dq = _dq_update(dq, q, do, lse2, delta, tl.trans(k_src.load([k_row0, 0])),
                                tl.trans(v_src.load([k_row0, 0])), entry, k_row0, offs_n, qk_scale, q_pos,
                                len_k, k_pos0, unit_of_row, MASKED, DOT_PREC)
    else:
        offs_n = tl.arange(0, UNIT * STEP)
        for e in range(e_lo, e_hi, STEP):
            k_ptrs, entry = _key_ptrs(k_src, ENTRIES, e, stride_ks, offs_n, offs_d, UNIT, STEP, True)
            v_ptrs, _ = _key_ptrs(v_src, ENTRIES, e, stride_vs, offs_n, offs_d, UNIT, STEP, True)
            k_row0 = (entry >> FLAG_BITS) * UNIT
            if MASKED:
                k_ok = (k_row0 + offs_n) < len_k
                kt = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
                vt = tl.load(v_ptrs, mask=k_ok[None, :], other=0.0)
            else:
                kt = tl.load(k_ptrs)
                vt = tl.load(v_ptrs)
            dq = _dq_update(dq, q, do, lse2, delta, kt, vt, entry, k_row0, offs_n, qk_scale, q_pos, len_k, k_pos0,
                            unit_of_row, MASKED, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, T_PTR, T_NFULL, ENTRIES, CU_Q, CU_K, qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    num_heads, group, len_q_all, len_k_all, num_programs, num_list_tiles, q_pos0, k_pos0, tune_bucket,
    HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, MERGE: tl.constexpr, PACK: tl.constexpr, POS: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, STEP: tl.constexpr,
):
    ROWS: tl.constexpr = PACK * POS
    b, h0, pos0, rel_pos, rel_head, list_row, unit_of_row, q_tok0, len_q, k_tok0, len_k = _query_tile_program(
        CU_Q, CU_K, num_heads, num_programs, num_list_tiles, len_q_all, len_k_all, UNIT, MERGE, PACK, POS, VARLEN)
    if pos0 < len_q:
        offs_d = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        tok0 = (q_tok0 + pos0).to(tl.int64)
        row_ok = (pos0 + rel_pos) < len_q
        q = tl.load(Q + b64 * stride_qb + tok0 * stride_qs + h0 * stride_qh
                    + _row_offsets(rel_pos, rel_head, stride_qs, stride_qh, PACK)[:, None] + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b64 * stride_db + tok0 * stride_ds + h0 * stride_dh
                     + _row_offsets(rel_pos, rel_head, stride_ds, stride_dh, PACK)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        l_off = b64 * stride_lb + h0 * stride_lh + tok0 + _row_offsets(rel_pos, rel_head, 1, stride_lh, PACK)
        lse2 = tl.load(LSE + l_off, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
        k_base, v_base = _head_kv_bases(K, V, b64, k_tok0, h0 // group, stride_kb, stride_ks, stride_kh,
                                        stride_vb, stride_vs, stride_vh)
        e_lo, e_mid, e_hi = _tile_entries(T_PTR, T_NFULL, list_row, STEP)
        q_pos = q_pos0 + pos0 + rel_pos
        k_src, v_src = _row_sources(k_base, v_base, len_k, stride_ks, stride_vs, HEAD_DIM, UNIT, TMA)
        dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, ENTRIES, e_lo, e_mid,
                       qk_scale, q_pos, len_k, k_pos0, unit_of_row, offs_d, UNIT, STEP, False, DOT_PREC, TMA)
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, ENTRIES, e_mid, e_hi,
                       qk_scale, q_pos, len_k, k_pos0, unit_of_row, offs_d, UNIT, 1, True, DOT_PREC, TMA)
        dq *= sm_scale
        tl.store(DQ + b64 * stride_dqb + tok0 * stride_dqs + h0 * stride_dqh
                 + _row_offsets(rel_pos, rel_head, stride_dqs, stride_dqh, PACK)[:, None] + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _ds_block_rows(ENTRIES, DS_INDEX, e, e_hi, head_stride, slot_of_row, ROWS: tl.constexpr, UNIT: tl.constexpr,
                   MERGE: tl.constexpr, PACK: tl.constexpr, TILE: tl.constexpr):
    """For query-list entry ``e`` of the stored-dS dQ pass: its key unit's first row, and per
    program row the offset of its dS block and whether its unit uses the entry (none at or past the
    list's end ``e_hi``). Each row's slot offset is summed in arithmetic (not gathered, nor
    selected): the compiler then sees the offsets contiguous within a unit, and the dS loads
    vectorize."""
    listed = e < e_hi
    k_row0 = (tl.load(ENTRIES + e, mask=listed, other=0) >> FLAG_BITS) * UNIT
    block_off = tl.zeros([ROWS], tl.int64)
    used = tl.zeros([ROWS], tl.int32)
    for slot in tl.static_range(PACK * MERGE):
        code = tl.load(DS_INDEX + (e + (slot // MERGE) * head_stride) * MERGE + slot % MERGE, mask=listed, other=-1)
        offset = (code >> 3).to(tl.int64) * (TILE * UNIT) + (code & 7) * (UNIT * UNIT)
        in_slot = (slot_of_row == slot).to(tl.int32)
        block_off += in_slot * offset
        used += in_slot * (code >= 0).to(tl.int32)
    return k_row0, block_off, used


@triton.jit
def _bwd_dq_stored_kernel(
    K, DQ, DS, T_PTR, ENTRIES, DS_INDEX, CU_Q, CU_K, sm_scale,
    stride_kb, stride_ks, stride_kh, stride_dqb, stride_dqs, stride_dqh,
    num_heads, group, len_q_all, len_k_all, num_programs, num_list_tiles, ds_base, ds_blocks, tune_bucket,
    HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, MERGE: tl.constexpr, PACK: tl.constexpr, POS: tl.constexpr,
    TILE: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    """dQ of a query tile from the dS blocks the dK/dV pass stored (``STORE_DS``): one product per
    key unit (dQ += dSᵀ·K), no recomputed P or dP. ``DS_INDEX`` (``KernelLayout.q_ds_index``) names
    each row's block per list entry; its dS is already masked, so no entry needs a mask here."""
    ROWS: tl.constexpr = PACK * POS
    b, h0, pos0, rel_pos, rel_head, list_row, unit_of_row, q_tok0, len_q, k_tok0, len_k = _query_tile_program(
        CU_Q, CU_K, num_heads, num_programs, num_list_tiles, len_q_all, len_k_all, UNIT, MERGE, PACK, POS, VARLEN)
    if pos0 < len_q:
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, UNIT)
        b64 = b.to(tl.int64)
        tok0 = (q_tok0 + pos0).to(tl.int64)
        row_ok = (pos0 + rel_pos) < len_q
        e_lo = tl.load(T_PTR + list_row)
        e_hi = tl.load(T_PTR + list_row + 1)
        if PACK > 1:  # the group's heads share their lists: the same entry of the next head's list
            head_stride = tl.load(T_PTR + list_row + num_list_tiles) - e_lo
        else:
            head_stride = 0
        # Each row reads the dS block of its (head in the pack, unit of the tile): one of PACK * MERGE.
        slot_of_row = rel_head * MERGE + unit_of_row
        # The row's column in its [TILE keys, UNIT queries] block (a program's first position is a
        # multiple of UNIT or of POS).
        if POS >= UNIT:
            q_col = rel_pos % UNIT
        else:
            q_col = (pos0 // POS % (UNIT // POS)) * POS + rel_pos  # (pos0 % UNIT, seen as a multiple of POS)
        ds_seq = DS + (b64 * ds_blocks - ds_base) * (TILE * UNIT)
        k_base = K + b64 * stride_kb + k_tok0.to(tl.int64) * stride_ks + (h0 // group) * stride_kh
        if TMA:
            k_src = tl.make_tensor_descriptor(k_base, shape=[len_k, HEAD_DIM], strides=[stride_ks, 1],
                                              block_shape=[UNIT, HEAD_DIM])
        dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        # The next entry's block offsets are read one step ahead, by plain loads. Pipelined as
        # asynchronous copies they were the last issued, so each step's wait for them also waited
        # for the dS loads in flight (this pass: 1.44 -> 1.24 ms at 32k on an H200).
        k_row0, block_off, used = _ds_block_rows(ENTRIES, DS_INDEX, e_lo, e_hi, head_stride, slot_of_row, ROWS,
                                                 UNIT, MERGE, PACK, TILE)
        for e in range(e_lo, e_hi):
            # No row mask (it would stop the loads from vectorizing): a row past the sequence's end
            # reads what its block holds (zeros, or for a packed sequence a block its dK/dV pass
            # skipped) and is not stored; each row's dQ depends on its own dS only.
            ds = tl.load(ds_seq + block_off[None, :] + q_col[None, :] + offs_n[:, None] * UNIT,
                         mask=used[None, :] != 0, other=0.0)
            if TMA:  # rows past len_k read as zero
                k = k_src.load([k_row0, 0])
            else:
                k = tl.load(k_base + (k_row0 + offs_n).to(tl.int64)[:, None] * stride_ks + offs_d[None, :],
                            mask=((k_row0 + offs_n) < len_k)[:, None], other=0.0)
            k_row0, block_off, used = _ds_block_rows(ENTRIES, DS_INDEX, e + 1, e_hi, head_stride, slot_of_row,
                                                     ROWS, UNIT, MERGE, PACK, TILE)
            dq = tl.dot(tl.trans(ds), k, dq, input_precision=DOT_PREC)
        dq *= sm_scale
        tl.store(DQ + b64 * stride_dqb + tok0 * stride_dqs + h0 * stride_dqh
                 + _row_offsets(rel_pos, rel_head, stride_dqs, stride_dqh, PACK)[:, None] + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# Launch configurations: short autotune lists keyed on the shapes that matter
# --------------------------------------------------------------------------------------------

# tune_bucket (length class, unused by the kernels) retunes for long sequences, whose best
# configs differ, without retuning for every new length.
_TUNE_KEY = ["HEAD_DIM", "UNIT", "MERGE", "VARLEN", "tune_bucket"]


def _tune_bucket(length: int) -> int:
    """0: up to 8k tokens, 1: up to 32k, 2: longer."""
    return min(2, max(0, (max(length, 1) - 1).bit_length() - 12) // 2)


def _configs(names, rows, maxnreg=None):
    """Configs from rows (values of the tuned constexprs ``names``, warps, stages), with registers per
    thread capped at ``maxnreg`` if given; the first of a list is the default."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1], maxnreg=maxnreg)
            for row in rows]


# One list per head-dim class (HEAD_DIM_CLASSES: <= 64 | 128 | 256; 64-row tiles at 256, less shared
# memory per stage). The first of each list is the default: at head dims 64 and 128 the fastest on an
# H200 at 32k (tools/tune_kernel.py; BENCHMARKS.md has the sweeps); the others stay as the tuner's
# candidates (the 4-stage one is for TMA_KEY_PASS; 5 stages and the stored dS's staging outgrow
# shared memory). At head dim 64 four warps per 128-row tile win every pass (1.1-1.4x over eight):
# two programs then fit an SM; eight warps capped at 128 registers (also two programs per SM) time
# the same in the forward. The head-dim-128 forward (64-row tiles, FORWARD_TILE_ROWS) runs one
# warpgroup, one key unit per step, registers capped at 128 and one stage (33 KB of shared memory),
# so that four programs share an SM and their products overlap each other's softmax (with 168
# registers, three per SM, 14% slower). The second config is the best for 128-row tiles there (two
# 8-warp programs per SM: 6-11% faster than one program of two units per step, although at that cap
# ptxas serializes each product's instructions, note C7512).
_FWD_CONFIGS = (_configs(("STEP",), [(2, 4, 2), (2, 4, 3), (1, 4, 3), (1, 4, 2), (2, 8, 3), (2, 8, 2)])
                + _configs(("STEP",), [(2, 8, 2), (2, 8, 3)], maxnreg=128),
                _configs(("STEP",), [(1, 4, 1), (1, 8, 2)], maxnreg=128)
                + _configs(("STEP",), [(2, 8, 2), (2, 8, 3), (1, 8, 3), (1, 8, 4), (2, 8, 4)]),
                _configs(("STEP",), [(1, 8, 2), (1, 4, 2), (1, 8, 3)]))
# Block sizes 16 and 32 give 16- and 32-token units: only the configs whose query step fits are kept.
_DKDV_CONFIGS = (_configs(("QSTEP",), [(32, 4, 3), (32, 4, 2), (64, 8, 3), (32, 8, 3), (64, 8, 2), (16, 4, 2)])
                 + _configs(("QSTEP",), [(32, 8, 3)], maxnreg=128),
                 _configs(("QSTEP",), [(64, 8, 3), (32, 8, 3), (32, 8, 2), (64, 8, 2), (32, 4, 3), (64, 4, 2),
                                    (64, 4, 3), (16, 8, 2), (64, 8, 4)]),
                 _configs(("QSTEP",), [(32, 8, 1), (32, 8, 2), (32, 4, 1), (16, 8, 1)]))
_DQ_CONFIGS = (_configs(("STEP",), [(1, 4, 3), (2, 4, 3), (2, 8, 2), (2, 8, 3), (1, 8, 3)])
               + _configs(("STEP",), [(2, 8, 3)], maxnreg=128),
               _configs(("STEP",), [(2, 8, 3), (2, 8, 2), (1, 8, 2), (1, 8, 3)]),
               _configs(("STEP",), [(1, 8, 2), (1, 4, 2), (1, 8, 1)]))
# The dQ pass from stored dS: one product per step, its float32 dQ the only large live value. At
# head dim 128, 4 warps (two programs per SM) ran the backward 1-2% faster than 8 on an H200.
_DQ_STORED_CONFIGS = (_configs((), [(4, 3), (8, 3), (4, 2)]), _configs((), [(4, 3), (8, 3), (8, 2)]),
                      _configs((), [(4, 2), (8, 2)]))
# The fast backward's dK/dV pass with the dQ product and its adds. DQ_T: dQ computed transposed
# (Kᵀ·dSᵀ, the head dim as the product's rows: warpgroup MMA on Hopper) or directly (dSᵀ·K, the
# query step's 16-64 rows: mma.sync). At head dim 256 only the direct form: every transposed config
# tried faults there with an illegal memory access on an H200 (Triton 3.6, 2026-11-30, per-element
# atomics; the interpreter runs them exactly), while (32, False, 8, 1) matches float64 in bf16 (its
# query step 16 sibling, for 16-token units, has not run on a GPU).
_FUSED_CONFIGS = (_configs(("QSTEP", "DQ_T"), [(32, True, 4, 2), (32, True, 4, 3), (32, False, 4, 2), (16, True, 4, 2),
                                               (64, True, 8, 3), (32, True, 8, 2)])
                  + _configs(("QSTEP", "DQ_T"), [(32, True, 8, 2)], maxnreg=128),
                  _configs(("QSTEP", "DQ_T"), [(32, True, 8, 2), (32, True, 8, 3), (64, True, 8, 3),
                                               (32, False, 8, 2), (64, False, 8, 3), (64, True, 8, 2),
                                               (16, True, 8, 2), (32, True, 8, 4)]),
                  _configs(("QSTEP", "DQ_T"), [(32, False, 8, 1), (16, False, 8, 1)]))


def _fits(config, unit):
    """A dK/dV query step must lie inside one unit."""
    return config.kwargs.get("QSTEP", 0) <= unit


def _prune(configs, named_args, **kwargs):
    unit = kwargs.get("UNIT", named_args.get("UNIT"))
    return [c for c in configs if _fits(c, unit)]


class _Launcher:
    """The kernel with its first fitting config, or autotuned (S2_AUTOTUNE=1)."""

    def __init__(self, kernel, config_lists, reset_to_zero=None):
        self.kernel = kernel
        self.config_lists = config_lists
        # reset_to_zero: accumulators the tuner must clear between its trial runs.
        self.tuned = [
            triton.autotune(configs=c, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                            reset_to_zero=reset_to_zero)(kernel)
            if AUTOTUNE else None
            for c in config_lists
        ]

    def launch(self, grid, head_dim, *args, **kwargs):
        if not INTERPRET:
            # Device-side tensor descriptors take global scratch memory from Triton's allocator hook,
            # a context variable: set in the launching thread (autograd runs backwards in its own).
            triton.set_allocator(_descriptor_scratch)
        which = head_dim_index(head_dim)
        if self.tuned[which] is not None:
            self.tuned[which][grid](*args, **kwargs)
            return
        config = next(c for c in self.config_lists[which] if _fits(c, kwargs["UNIT"]))
        cap = {} if config.maxnreg is None else {"maxnreg": config.maxnreg}
        self.kernel[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                          num_stages=config.num_stages, **cap)


_fwd = _Launcher(_fwd_kernel, _FWD_CONFIGS)
_dkdv = _Launcher(_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq = _Launcher(_bwd_dq_kernel, _DQ_CONFIGS)
_dq_stored = _Launcher(_bwd_dq_stored_kernel, _DQ_STORED_CONFIGS)
_fused = _Launcher(_bwd_dkdv_kernel, _FUSED_CONFIGS, reset_to_zero=["DQ_ACC"])


# --------------------------------------------------------------------------------------------
# Host-side entry points (tensors already validated and normalized by attention.py)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes of one call. Tensors are 4-D ``[batch, seq, heads, dim]``; packed input is viewed as
    ``[1, tokens, heads, dim]`` with ``num_seqs`` sequences given by ``cu_seqlens``."""

    layout: KernelLayout
    num_seqs: int
    len_q: int  # per batch row, or the longest packed sequence
    len_k: int
    q_pos0: int
    k_pos0: int
    sm_scale: float
    cu_q: torch.Tensor | None
    cu_k: torch.Tensor | None

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None


def _strides(name: str, t: torch.Tensor, varlen: bool) -> dict:
    """The kernels' ``stride_<name>b/s/h`` (batch, seq, head) arguments of ``t``; packed tensors
    address sequences through cu_seqlens instead of a batch stride."""
    return {f"stride_{name}b": 0 if varlen else t.stride(0), f"stride_{name}s": t.stride(1),
            f"stride_{name}h": t.stride(2)}


def _lse_strides(lse: torch.Tensor, varlen: bool) -> dict:
    # lse is [batch, heads, seq] or, packed, [heads, tokens] (viewed as [1, heads, tokens]).
    return {"stride_lb": 0 if varlen else lse.stride(0), "stride_lh": lse.stride(1)}


def _seq_bounds_args(problem: Problem, placeholder: torch.Tensor) -> dict:
    """``CU_Q``/``CU_K``: the packed sequences' bounds, or an unused pointer when not packed."""
    if problem.varlen:
        return {"CU_Q": problem.cu_q, "CU_K": problem.cu_k}
    return {"CU_Q": placeholder, "CU_K": placeholder}


def _positions(problem: Problem) -> dict:
    """The kernels' lengths, absolute first positions and tuning bucket of one call."""
    return dict(len_q_all=problem.len_q, len_k_all=problem.len_k, q_pos0=problem.q_pos0, k_pos0=problem.k_pos0,
                tune_bucket=_tune_bucket(problem.len_q))


def new_output(shape, dtype, device):
    """Every buffer the kernels fill (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_outputs(q):
    """New ``(out, lse)`` buffers of a forward of ``q`` ([batch, seq, heads, dim])."""
    batch, seq, heads, _ = q.shape
    return new_output(q.shape, q.dtype, q.device), new_output((batch, heads, seq), torch.float32, q.device)


def forward(q, k, v, problem: Problem, out=None, lse=None, resume=False):
    """``(out, lse)``; into the given ``out``/``lse`` (views allowed), and with ``resume`` continuing
    the softmax they hold over earlier keys (rows with lse -inf hold none yet)."""
    heads, dim = q.shape[2], q.shape[3]
    layout, varlen = problem.layout, problem.varlen
    if out is None:
        out, lse = forward_outputs(q)
    tiles = layout.forward_tiling.tiles
    grid, num_programs, shape = _query_programs(layout.forward_tiling, layout.unit, problem, heads)
    _fwd.launch(
        grid, dim, Q=q, K=k, V=v, O=out, LSE=lse, T_PTR=tiles.ptr, T_NFULL=tiles.nfull, ENTRIES=tiles.entries,
        **_seq_bounds_args(problem, lse), qk_scale=problem.sm_scale * _LOG2E,
        **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("o", out, varlen), **_lse_strides(lse, varlen),
        num_heads=heads, group=heads // k.shape[2], num_programs=num_programs, num_list_tiles=tiles.num_tiles,
        **_positions(problem), HEAD_DIM=dim, VARLEN=varlen, DOT_PREC=_dot_precision(q.dtype), RESUME=resume,
        TMA=use_tma(k, v), **shape,
    )
    return out, lse


def use_tma(k, v) -> bool:
    """Tensor-descriptor loads of K/V in the forward and dQ passes: when ``TMA_LOADS`` asks for them
    and K/V allow them."""
    return TMA_LOADS and _descriptors_usable(k, v)


def use_tma_reduce(dq_acc) -> bool:
    """Descriptor reductions of the fast backward's dQ: when ``TMA_REDUCE`` asks for them and the
    accumulator allows them, on a GPU (Triton's interpreter has no descriptor reductions)."""
    return TMA_REDUCE and not INTERPRET and _descriptors_usable(dq_acc)


def _descriptors_usable(*tensors) -> bool:
    """Whether the kernels may address ``tensors`` through tensor descriptors: Triton has them, the
    GPU is a Hopper or newer (the interpreter emulates them) and every head's rows start on TMA's
    16-byte alignment."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not INTERPRET and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1]) for t in tensors)


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _query_programs(tiling: QueryTiling, unit: int, problem: Problem, heads: int):
    """Grid, programs per (pack of) head(s) and tile constants of the forward or a dQ kernel."""
    num_programs = tiling.tiles.num_tiles * (unit * tiling.merge // tiling.positions)
    grid = (num_programs, problem.num_seqs * heads // tiling.pack)
    return grid, num_programs, dict(UNIT=unit, MERGE=tiling.merge, PACK=tiling.pack, POS=tiling.positions)


@dataclasses.dataclass(frozen=True)
class StoredDsChunk:
    """Query heads ``[head_lo, head_hi)`` of the deterministic backward with stored dS: their dK/dV
    work items (``order``, heaviest first) and their k-list entries ``[first_entry, first_entry +
    blocks)``, one dS block each per sequence."""

    head_lo: int
    head_hi: int
    order: torch.Tensor
    first_entry: int
    blocks: int


def stored_ds_plan(layout: KernelLayout, work: KeyWork, num_seqs: int, heads: int, group: int,
                   element_size: int, num_sms: int, budget: int = None):
    """Chunks of whole KV groups whose stored dS fits ``budget`` bytes (``stored_ds_budget``), fewest
    chunks first, for the dK/dV programs ``work``; None (the dQ pass then recomputes dS) when a
    single group does not fit, or when a chunk's longest dK/dV program would outlast its share of the
    work per SM (``num_sms``): each chunk then waits for that program (``kv_group`` GQA at 128k with
    programs per group: a stripe tile's program runs four heads' long lists, 3x a chunk's work per
    SM)."""
    budget = stored_ds_budget() if budget is None else budget
    starts = layout.k_head_starts
    block_bytes = num_seqs * math.prod(layout.ds_block_shape) * element_size
    groups = heads // group
    for n_chunks in range(1, groups + 1):  # chunk i: groups [i * groups // n_chunks, (i + 1) * ...)
        bounds = [(i * groups // n_chunks, (i + 1) * groups // n_chunks) for i in range(n_chunks)]
        if all((starts[hi * group] - starts[lo * group]) * block_bytes <= budget for lo, hi in bounds):
            break
    else:
        return None
    longest = work.longest_per_group
    if len(bounds) > 1 and any(max(longest[lo:hi]) * num_sms > num_seqs * (starts[hi * group] - starts[lo * group])
                               for lo, hi in bounds):
        return None
    order = work.order
    if len(bounds) > 1:
        # Each chunk's items together, still heaviest first within it (the chunk of group g is the
        # last i with i * groups // n_chunks <= g).
        order = order[torch.sort(((work.order_groups + 1) * n_chunks - 1) // groups, stable=True).indices]
    chunks, first = [], 0
    for lo, hi in bounds:
        items = sum(work.items_per_group[lo:hi])
        chunks.append(StoredDsChunk(lo * group, hi * group, order[first:first + items], starts[lo * group],
                                    starts[hi * group] - starts[lo * group]))
        first += items
    return chunks


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def backward(do, q, k, v, out, lse, dlse, problem: Problem, deterministic: bool):
    """``(dq, dk, dv)``; ``deterministic`` chooses the backward mode (module docstring)."""
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    layout, varlen = problem.layout, problem.varlen
    # The kernels address lse, dlse and their delta buffer with one set of strides: make them alike
    # (autograd may hand in a strided or broadcast dlse, and callers pass views of a larger lse).
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    seq_bounds = _seq_bounds_args(problem, lse)
    delta = new_output(lse.shape, lse.dtype, lse.device)
    # Fast mode: dQ accumulates in float32 (zeroed by the delta kernel, which visits every row).
    dq_acc = new_output(q.shape, torch.float32, q.device) if not deterministic else delta
    acc_strides = _strides("a", dq_acc, varlen) if not deterministic else dict.fromkeys(
        ("stride_ab", "stride_as", "stride_ah"), 0)
    rows = 64
    _bwd_delta_kernel[(problem.num_seqs * heads, triton.cdiv(problem.len_q, rows))](
        O=out, DO=do, DLSE=dlse if dlse is not None else lse, DELTA=delta, DQ_ACC=dq_acc, CU_Q=seq_bounds["CU_Q"],
        **_strides("o", out, varlen), **_strides("d", do, varlen), **_lse_strides(lse, varlen), **acc_strides,
        num_heads=heads, len_q_all=problem.len_q,
        HEAD_DIM=dim, ROWS=rows, HAS_DLSE=dlse is not None, VARLEN=varlen, ZERO_DQ=not deterministic,
    )
    # Per-head programs of a GQA group write float32 partials, summed at the end in a fixed order.
    split_heads = group > 1 and SPLIT_HEADS["deterministic" if deterministic else "fast"]
    work = layout.k_work_per_head if split_heads else layout.k_work_per_group
    plan = None
    if deterministic:
        def plan_for(candidate):
            return stored_ds_plan(layout, candidate, problem.num_seqs, heads, group, q.element_size(),
                                  _sm_count(q.device))

        plan = plan_for(work)
        if plan is None and work is layout.k_work_per_group and layout.k_work_long_per_head.split is not None:
            # Some of a group's programs are too long for chunks (kv_group heads, stripe tiles): those
            # may fit per head.
            plan = plan_for(layout.k_work_long_per_head)
            if plan is not None:
                work = layout.k_work_long_per_head
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    # The per-head items' float32 partials, [dK/dV, batch, tokens, query heads, dim].
    part = new_output((2, *k.shape[:2], heads, dim), torch.float32, k.device) if work.split is not None else None
    scales = dict(qk_scale=problem.sm_scale * _LOG2E, sm_scale=problem.sm_scale)
    prec = _dot_precision(q.dtype)
    k_tiles = layout.k_tiles
    key_pass = dict(
        Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, DK_PART=dk if part is None else part[0],
        DV_PART=dv if part is None else part[1], DQ_ACC=dq_acc, LSE=lse, DELTA=delta, T_PTR=k_tiles.ptr,
        T_NFULL=k_tiles.nfull, ENTRIES=k_tiles.entries, T_UNITS=k_tiles.units, **seq_bounds,
        **scales, **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("d", do, varlen), **_strides("dk", dk, varlen),
        **_strides("p", dk if part is None else part[0], varlen), **acc_strides, **_lse_strides(lse, varlen),
        group=group, num_seqs=problem.num_seqs,
        num_tiles=k_tiles.num_tiles, **_positions(problem), HEAD_DIM=dim, UNIT=layout.unit, MERGE=layout.k_merge,
        VARLEN=varlen, DOT_PREC=prec, FUSED_DQ=not deterministic,
        DQ_REDUCE=not deterministic and use_tma_reduce(dq_acc), TMA=TMA_KEY_PASS and _descriptors_usable(q, do),
        ITEMS=work.kind,
    )
    if plan is None:
        (_dkdv if deterministic else _fused).launch(
            (work.order.numel() * problem.num_seqs,), dim, **key_pass, ORDER=work.order, DS=lse, ds_base=0,
            ds_blocks=0)
    else:
        dq = new_output(q.shape, q.dtype, q.device)
        q_tiles = layout.dq_tiling.tiles
        _, num_programs, shape = _query_programs(layout.dq_tiling, layout.unit, problem, heads)
        # One buffer for every chunk (each dQ pass has read it before the next dK/dV pass writes).
        ds = new_output((problem.num_seqs * max(chunk.blocks for chunk in plan), *layout.ds_block_shape), q.dtype,
                        q.device)
        for chunk in plan:
            _dkdv.launch((chunk.order.numel() * problem.num_seqs,), dim, **key_pass, ORDER=chunk.order, DS=ds,
                         ds_base=chunk.first_entry, ds_blocks=chunk.blocks, STORE_DS=True,
                         DS_TMA=TMA_DS_STORE and not INTERPRET and _descriptors_usable(ds))
            chunk_heads = chunk.head_hi - chunk.head_lo
            _dq_stored.launch(
                (num_programs, problem.num_seqs * chunk_heads // layout.dq_tiling.pack), dim,
                K=k[:, :, chunk.head_lo // group:], DQ=dq[:, :, chunk.head_lo:], DS=ds,
                T_PTR=q_tiles.ptr[chunk.head_lo * q_tiles.num_tiles:], ENTRIES=q_tiles.entries,
                DS_INDEX=layout.q_ds_index, **seq_bounds, sm_scale=problem.sm_scale, **_strides("k", k, varlen),
                **_strides("dq", dq, varlen), num_heads=chunk_heads, group=group, num_programs=num_programs,
                num_list_tiles=q_tiles.num_tiles, len_q_all=problem.len_q, len_k_all=problem.len_k,
                ds_base=chunk.first_entry, ds_blocks=chunk.blocks, tune_bucket=_tune_bucket(problem.len_q),
                HEAD_DIM=dim, TILE=layout.ds_block_shape[0], VARLEN=varlen, DOT_PREC=prec, TMA=use_tma(k, v), **shape,
            )
    if part is not None:
        _sum_partials_kernel[(work.split.numel(), problem.num_seqs)](
            DK_PART=part[0], DV_PART=part[1], DK=dk, DV=dv, SPLIT=work.split, T_UNITS=k_tiles.units,
            CU_K=seq_bounds["CU_K"], **_strides("p", part[0], varlen), **_strides("dk", dk, varlen), group=group,
            num_tiles=k_tiles.num_tiles, len_k_all=problem.len_k, HEAD_DIM=dim, UNIT=layout.unit,
            MERGE=layout.k_merge, VARLEN=varlen, num_warps=8)
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv
    if plan is not None:
        return dq, dk, dv
    dq = new_output(q.shape, q.dtype, q.device)
    q_tiles = layout.dq_tiling.tiles
    grid, num_programs, shape = _query_programs(layout.dq_tiling, layout.unit, problem, heads)
    _dq.launch(
        grid, dim, Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, T_PTR=q_tiles.ptr, T_NFULL=q_tiles.nfull,
        ENTRIES=q_tiles.entries, **seq_bounds, **scales, **_strides("q", q, varlen), **_strides("k", k, varlen),
        **_strides("v", v, varlen), **_strides("d", do, varlen), **_strides("dq", dq, varlen),
        **_lse_strides(lse, varlen), num_heads=heads, group=group, num_programs=num_programs,
        num_list_tiles=q_tiles.num_tiles, **_positions(problem), HEAD_DIM=dim, VARLEN=varlen, DOT_PREC=prec,
        TMA=use_tma(k, v), **shape,
    )
    return dq, dk, dv
