"""The S2 forward on Hopper (sm_90) at head dim 128: a persistent, warp-specialized Gluon kernel.

Triton 3.6 neither warp-specializes the forward's loop nor keeps a product in flight across the
softmax (it waits for each warpgroup product right away), so the Triton forward overlaps products
with softmax only across programs. This kernel does what FlashAttention-3 does on Hopper, in Gluon
(Triton's lower-level language, which exposes the asynchronous warpgroup products, TMA and mbarriers):

- one program per SM loops over the query tiles (``KernelLayout.dq_tiling``: 128 rows, a head's
  tiles together, late positions first), so a tile's set-up overlaps the tile before;
- a producer warp loads each tile's Q and the K/V units of its list (``TileLists``, masked entries
  first) by TMA into a ring of ``STAGES`` shared-memory slots, signalling mbarriers;
- two consumer warpgroups take 64 rows each. Each issues the next unit's QKᵀ, then this unit's
  PV, and waits only for QKᵀ: the next unit's softmax runs while PV is in flight. A consumer
  releases a slot once its PV is done; the producer refills it when both have.

Rows are position-major (row r: position r // PACK of head r % PACK), so that one TMA box loads a
warpgroup's Q also for packed GQA heads. The tiles' lists, their masks and the softmax are the
Triton forward's; results differ from it in rounding only (float32 sums in another order; its tiles
at head dim 128 have 64 rows). ``applies`` says when this kernel runs (``attention.kernel_forward``
asks); other GPUs, dtypes, head dims and shorter sequences keep the Triton forward.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import kernel
from .kernel import FLAG_BITS, LOG2E

# On an H200 3-4% faster than the Triton forward from 16k to 128k tokens (4-5% with kv_group GQA).
# False: the Triton forward everywhere. Read at each call.
ENABLED = True
WG_ROWS = gl.constexpr(64)  # rows per consumer warpgroup
HEAD_DIM = 128
TILE_ROWS = 128  # two consumers: the dQ passes' query tiles (kernel.DQ_TILE_ROWS)
# Slots of the K/V ring; registers per thread at launch (12 warps: one program per SM), of which
# the producer warp keeps 24 and each consumer warpgroup gets 232 (setmaxnreg). On an H200 at 32k
# and 128k, 4 slots timed 0-2% faster than 3, and 2 slots 33-41% slower.
STAGES = 4
MAX_REGISTERS = 168
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 232
# Shorter sequences keep the Triton forward: their lists are short and the two forwards timed the
# same at 8k tokens on an H200, where this one's launch costs more host time (three TMA descriptors
# encoded per call), which made the host-bound b1 8k forward+backward 5% slower.
MIN_TOKENS = 16384
# The Triton release whose compile of this kernel was checked on a GPU (tests/gpu). Gluon is
# experimental and its code generation changes between releases (Triton 3.8 compiles this kernel
# to the same registers and waits, but other barriers), so other releases keep the Triton forward.
CHECKED_TRITON = (3, 6)


@functools.cache
def triton_supported() -> bool:
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) == CHECKED_TRITON


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: "kernel.Problem") -> bool:
    """Whether this forward serves the call: ``ENABLED``, a Hopper GPU, 16-bit inputs of head dim 128,
    sequences of ``MIN_TOKENS`` or more, 64-token units, 128-row query tiles and TMA-aligned tensors,
    on the Triton release checked on a GPU."""
    layout = problem.layout
    tiling = layout.dq_tiling
    return (ENABLED and problem.len_q >= MIN_TOKENS and not kernel.INTERPRET and q.is_cuda
            and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == HEAD_DIM and layout.unit == 64
            and tiling.pack * tiling.positions == TILE_ROWS and kernel._descriptors_usable(q, k, v)
            and triton_supported())


# Helpers of the Triton kernels that create no tensor of their own, compiled as Gluon: the token
# mask of a masked entry, a sequence's bounds, and a finished row's output factor and lse.
_masked_scores = gluon.jit(kernel._masked_scores.fn)
_seq_bounds = gluon.jit(kernel._seq_bounds.fn)
_row_results = gluon.jit(kernel._row_results.fn)


@gluon.jit
def _entry_row(ENTRIES, i, n_masked, e_lo, e_mid, UNIT: gl.constexpr):
    """Entry ``i`` of a tile's walk (its masked entries first) and its key unit's first row."""
    e = gl.where(i < n_masked, e_mid + i, e_lo + i - n_masked)
    entry = gl.load(ENTRIES + e)
    return entry, (entry >> FLAG_BITS) * UNIT


@gluon.jit
def _softmax(s, m_i, l_i, i, n_masked, entry, row0, qk_scale, q_pos, unit_of_row, len_k, k_pos0,
             S_LAYOUT: gl.constexpr, UNIT: gl.constexpr):
    """Online-softmax step with entry ``i``'s scores: ``(p, m_new, l_new, alpha)``, a masked entry's
    masked as in the Triton forward."""
    if i < n_masked:
        offs_n = gl.arange(0, UNIT, layout=gl.SliceLayout(0, S_LAYOUT))
        s = _masked_scores(s, entry, unit_of_row, q_pos, k_pos0, row0, offs_n, len_k, qk_scale)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - m_new[:, None])
    else:
        # Scale the row maxima, not the tile: one fused multiply-add per score.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _tile(t, tiles, UNIT: gl.constexpr, MERGE: gl.constexpr, PACK: gl.constexpr, POS: gl.constexpr,
          VARLEN: gl.constexpr):
    """Query tile ``t`` (past the last: the last, unused) as ``kernel._query_tile_program`` maps a
    program: ``(b, h0, pos0, list_tile, q_tok0, len_q, k_tok0, len_k, e_lo, e_mid, e_hi)``."""
    T_PTR, T_NFULL, CU_Q, CU_K, num_heads, group, num_programs, num_list_tiles, len_q_all, len_k_all, num_tiles = tiles
    t = gl.minimum(t, num_tiles - 1)
    bh = t // num_programs
    pos0 = (num_programs - 1 - t % num_programs) * POS
    b = bh // (num_heads // PACK)
    h0 = (bh % (num_heads // PACK)) * PACK
    q_tok0, len_q = _seq_bounds(CU_Q, b, len_q_all, VARLEN)
    k_tok0, len_k = _seq_bounds(CU_K, b, len_k_all, VARLEN)
    list_tile = pos0 // (UNIT * MERGE)
    list_row = h0 * num_list_tiles + list_tile
    e_lo = gl.load(T_PTR + list_row)
    e_mid = e_lo + gl.load(T_NFULL + list_row)
    e_hi = gl.load(T_PTR + list_row + 1)
    return b, h0, pos0, list_tile, q_tok0, len_q, k_tok0, len_k, e_lo, e_mid, e_hi


@gluon.jit
def _producer(q_desc, k_desc, v_desc, ENTRIES, bufs, tiles, UNIT: gl.constexpr, MERGE: gl.constexpr,
              PACK: gl.constexpr, POS: gl.constexpr, VARLEN: gl.constexpr, STAGES: gl.constexpr,
              CONSUMERS: gl.constexpr):
    """Each tile's Q boxes, then its K/V units in walk order, into the consumers' slots."""
    q_smem, k_smem, v_smem, q_full, q_empty, k_full, v_full, empty = bufs
    _tp, _tn, _cq, _ck, _nh, group, _np, _nl, _lq, _lk, num_tiles = tiles
    slot = 0  # K/V units loaded so far (slot and phase of the ring)
    started = 0  # tiles started so far (phase of the Q slots)
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, h0, pos0, _lt, q_tok0, len_q, k_tok0, _lk, e_lo, e_mid, e_hi = _tile(t, tiles, UNIT, MERGE, PACK, POS,
                                                                                VARLEN)
        if pos0 < len_q:
            if VARLEN:  # packed sequences: one batch row, tokens from cu_seqlens
                row_b = b * 0
            else:
                row_b = b
            for c in gl.static_range(CONSUMERS):
                mbarrier.wait(q_empty.index(c), (started & 1) ^ 1)
                mbarrier.expect(q_full.index(c), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [row_b, q_tok0 + pos0 + c * (WG_ROWS // PACK), h0, 0],
                                                q_full.index(c), q_smem.index(c))
            started += 1
            kh = h0 // group
            for i in range(0, e_hi - e_lo):
                st = slot % STAGES
                mbarrier.wait(empty.index(st), ((slot // STAGES) & 1) ^ 1)
                _entry, row0 = _entry_row(ENTRIES, i, e_hi - e_mid, e_lo, e_mid, UNIT)
                mbarrier.expect(k_full.index(st), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [row_b, k_tok0 + row0, kh, 0], k_full.index(st),
                                                k_smem.index(st))
                mbarrier.expect(v_full.index(st), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [row_b, k_tok0 + row0, kh, 0], v_full.index(st),
                                                v_smem.index(st))
                slot += 1


@gluon.jit
def _out_ptrs(O, LSE, b64, tok0, h0, pos0, len_q, out_strides, WARPGROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
              PACK: gl.constexpr, O_LAYOUT: gl.constexpr, S_ROW: gl.constexpr):
    """A consumer's output and lse pointers with their row masks (made where used: kept through the
    loop, they would hold registers)."""
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh = out_strides
    o_rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, O_LAYOUT))
    o_pos = WARPGROUP * (WG_ROWS // PACK) + o_rows // PACK
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
    o_ptrs = (O + b64 * stride_ob + tok0 * stride_os + h0 * stride_oh
              + (o_pos * stride_os + (o_rows % PACK) * stride_oh)[:, None] + offs_d[None, :])
    s_rows = gl.arange(0, WG_ROWS, layout=S_ROW)
    s_pos = WARPGROUP * (WG_ROWS // PACK) + s_rows // PACK
    l_ptrs = LSE + b64 * stride_lb + h0 * stride_lh + tok0 + s_pos + (s_rows % PACK) * stride_lh
    return o_ptrs, (pos0 + o_pos) < len_q, l_ptrs, (pos0 + s_pos) < len_q


@gluon.jit
def _consumer(O, LSE, ENTRIES, bufs, tiles, qk_scale, q_pos0, k_pos0, out_strides, WARPGROUP: gl.constexpr,
              HEAD_DIM: gl.constexpr, UNIT: gl.constexpr, MERGE: gl.constexpr, PACK: gl.constexpr,
              POS: gl.constexpr, VARLEN: gl.constexpr, RESUME: gl.constexpr, STAGES: gl.constexpr):
    """Rows ``64 * WARPGROUP`` to ``64 * WARPGROUP + 63`` of each of the program's tiles."""
    q_smem, k_smem, v_smem, q_full, q_empty, k_full, v_full, empty = bufs
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, UNIT, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    Q_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2)
    P_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    S_ROW: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    O_ROW: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    s_zero = gl.zeros([WG_ROWS, UNIT], gl.float32, layout=S_LAYOUT)
    _tp, _tn, _cq, _ck, _nh, _g, _np, _nl, _lq, _lk, num_tiles = tiles
    step = gl.num_programs(0)
    slot = 0
    started = 0
    # Each tile's facts are read one tile ahead, so that their loads overlap the tile before.
    upcoming = _tile(gl.program_id(0), tiles, UNIT, MERGE, PACK, POS, VARLEN)
    for t in range(gl.program_id(0), num_tiles, step):
        b, h0, pos0, list_tile, q_tok0, len_q, k_tok0, len_k, e_lo, e_mid, e_hi = upcoming
        upcoming = _tile(t + step, tiles, UNIT, MERGE, PACK, POS, VARLEN)
        if pos0 < len_q:
            b64 = b.to(gl.int64)
            tok0 = (q_tok0 + pos0).to(gl.int64)
            # Q as the scores' register operand (from shared memory the QKᵀ product would be bound by
            # its bandwidth at 64 keys a unit); then its slot is free for the next tile's.
            mbarrier.wait(q_full.index(WARPGROUP), started & 1)
            q = q_smem.index(WARPGROUP).reshape([WG_ROWS, HEAD_DIM]).load(Q_OPERAND)
            fence_async_shared()  # these reads (generic proxy) before the next TMA write (async proxy)
            mbarrier.arrive(q_empty.index(WARPGROUP), count=1)
            started += 1
            s_rows = gl.arange(0, WG_ROWS, layout=S_ROW)
            s_pos = WARPGROUP * (WG_ROWS // PACK) + s_rows // PACK
            q_pos = q_pos0 + pos0 + s_pos
            if PACK == 1 or POS > UNIT:
                unit_of_row = s_pos // UNIT
            else:  # the program's positions lie in one unit of its list tile
                unit_of_row = (pos0 - list_tile * (UNIT * MERGE)) // UNIT + s_rows * 0
            if RESUME:  # continue the softmax in O/LSE (earlier keys): normalized out with l = 1
                o_ptrs, o_ok, l_ptrs, s_ok = _out_ptrs(O, LSE, b64, tok0, h0, pos0, len_q, out_strides, WARPGROUP,
                                                       HEAD_DIM, PACK, O_LAYOUT, S_ROW)
                lse_prev = gl.load(l_ptrs, mask=s_ok, other=float("-inf"))
                resumed = lse_prev > float("-inf")
                m_i = gl.where(resumed, lse_prev * LOG2E, float("-inf"))
                l_i = gl.where(resumed, 1.0, 0.0)
                acc = gl.load(o_ptrs, mask=o_ok[:, None] & gl.convert_layout(resumed, O_ROW)[:, None],
                              other=0.0).to(gl.float32)
            else:
                m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, layout=S_ROW)
                l_i = gl.zeros([WG_ROWS], gl.float32, layout=S_ROW)
                acc = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=O_LAYOUT)
            n_masked = e_hi - e_mid
            n = e_hi - e_lo
            if n > 0:
                st = slot % STAGES
                mbarrier.wait(k_full.index(st), (slot // STAGES) & 1)
                s = warpgroup_mma(q, k_smem.index(st).reshape([UNIT, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False)
                entry, row0 = _entry_row(ENTRIES, 0, n_masked, e_lo, e_mid, UNIT)
                p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, n_masked, entry, row0, qk_scale, q_pos, unit_of_row,
                                              len_k, k_pos0, S_LAYOUT, UNIT)
                acc = acc * gl.convert_layout(alpha, O_ROW)[:, None]
                for j in range(0, n - 1):
                    cur = slot + j
                    nxt = cur + 1
                    mbarrier.wait(k_full.index(nxt % STAGES), (nxt // STAGES) & 1)
                    s_token = warpgroup_mma(q, k_smem.index(nxt % STAGES).reshape([UNIT, HEAD_DIM]).permute((1, 0)),
                                            s_zero, use_acc=False, is_async=True)
                    mbarrier.wait(v_full.index(cur % STAGES), (cur // STAGES) & 1)
                    p_op = gl.convert_layout(p.to(v_smem.dtype), P_OPERAND)
                    acc_token = warpgroup_mma(p_op, v_smem.index(cur % STAGES).reshape([UNIT, HEAD_DIM]), acc,
                                              is_async=True)
                    s = warpgroup_mma_wait(1, deps=[s_token])  # QKᵀ done, PV still in flight
                    entry, row0 = _entry_row(ENTRIES, j + 1, n_masked, e_lo, e_mid, UNIT)
                    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, j + 1, n_masked, entry, row0, qk_scale, q_pos,
                                                  unit_of_row, len_k, k_pos0, S_LAYOUT, UNIT)
                    # p_op among the dependencies: its registers stay untouched until PV has read them.
                    acc, p_op = warpgroup_mma_wait(0, deps=[acc_token, p_op])
                    mbarrier.arrive(empty.index(cur % STAGES), count=1)
                    acc = acc * gl.convert_layout(alpha, O_ROW)[:, None]
                last = slot + n - 1
                mbarrier.wait(v_full.index(last % STAGES), (last // STAGES) & 1)
                p_op = gl.convert_layout(p.to(v_smem.dtype), P_OPERAND)
                acc = warpgroup_mma(p_op, v_smem.index(last % STAGES).reshape([UNIT, HEAD_DIM]), acc)
                mbarrier.arrive(empty.index(last % STAGES), count=1)
                slot += n
                o_ptrs, o_ok, l_ptrs, s_ok = _out_ptrs(O, LSE, b64, tok0, h0, pos0, len_q, out_strides, WARPGROUP,
                                                       HEAD_DIM, PACK, O_LAYOUT, S_ROW)
                scale, lse = _row_results(m_i, l_i)
                scale = gl.convert_layout(scale, O_ROW)
                gl.store(o_ptrs, (acc * scale[:, None]).to(O.dtype.element_ty), mask=o_ok[:, None])
                gl.store(l_ptrs, lse, mask=s_ok)
            elif not RESUME:
                o_ptrs, o_ok, l_ptrs, s_ok = _out_ptrs(O, LSE, b64, tok0, h0, pos0, len_q, out_strides, WARPGROUP,
                                                       HEAD_DIM, PACK, O_LAYOUT, S_ROW)
                gl.store(o_ptrs, gl.zeros([WG_ROWS, HEAD_DIM], O.dtype.element_ty, layout=O_LAYOUT),
                         mask=o_ok[:, None])
                gl.store(l_ptrs, gl.full([WG_ROWS], float("-inf"), gl.float32, layout=S_ROW), mask=s_ok)


@gluon.jit
def _fwd_kernel(
    q_desc, k_desc, v_desc, O, LSE, T_PTR, T_NFULL, ENTRIES, CU_Q, CU_K, qk_scale,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    num_heads, group, len_q_all, len_k_all, num_programs, num_list_tiles, num_tiles, q_pos0, k_pos0,
    HEAD_DIM: gl.constexpr, UNIT: gl.constexpr, MERGE: gl.constexpr, PACK: gl.constexpr, POS: gl.constexpr,
    VARLEN: gl.constexpr, RESUME: gl.constexpr, STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    gl.static_assert(PACK * POS == 2 * WG_ROWS, "two consumer warpgroups of 64 rows")
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_full.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_full.index(st), count=1)
        mbarrier.init(v_full.index(st), count=1)
        mbarrier.init(empty.index(st), count=2)  # both consumers release a slot
    bufs = (q_smem, k_smem, v_smem, q_full, q_empty, k_full, v_full, empty)
    tiles = (T_PTR, T_NFULL, CU_Q, CU_K, num_heads, group, num_programs, num_list_tiles, len_q_all, len_k_all,
             num_tiles)
    out_strides = (stride_ob, stride_os, stride_oh, stride_lb, stride_lh)
    gl.warp_specialize([
        (_consumer, (O, LSE, ENTRIES, bufs, tiles, qk_scale, q_pos0, k_pos0, out_strides, 0, HEAD_DIM, UNIT, MERGE,
                     PACK, POS, VARLEN, RESUME, STAGES)),
        (_consumer, (O, LSE, ENTRIES, bufs, tiles, qk_scale, q_pos0, k_pos0, out_strides, 1, HEAD_DIM, UNIT, MERGE,
                     PACK, POS, VARLEN, RESUME, STAGES)),
        (_producer, (q_desc, k_desc, v_desc, ENTRIES, bufs, tiles, UNIT, MERGE, PACK, POS, VARLEN, STAGES, 2)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def descriptor_layout():
    """Shared-memory layout of every TMA box: 128-byte swizzle, 16-bit elements, rank 4."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)


def forward(q, k, v, problem: "kernel.Problem", out=None, lse=None, resume=False):
    """``kernel.forward`` (arguments and results as there) where ``applies``."""
    heads, dim = q.shape[2], q.shape[3]
    layout, varlen = problem.layout, problem.varlen
    if out is None:
        out, lse = kernel.forward_outputs(q)
    tiling = layout.dq_tiling
    tiles = tiling.tiles
    _grid, num_programs, shape = kernel._query_programs(tiling, layout.unit, problem, heads)
    # Boxes over the 4-D [batch, tokens, heads, dim] tensors (strides as given): rows past a batch
    # row's tokens read as zero; a packed sequence's rows past its end are masked like the Triton
    # forward's.
    q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, WG_ROWS.value // tiling.pack, tiling.pack, dim],
                              descriptor_layout())
    k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, layout.unit, 1, dim],
                                       descriptor_layout()) for t in (k, v))
    num_tiles = num_programs * problem.num_seqs * heads // tiling.pack
    bounds = kernel._seq_bounds_args(problem, lse)
    _fwd_kernel[(min(num_tiles, kernel._sm_count(q.device)),)](
        q_desc, k_desc, v_desc, out, lse, tiles.ptr, tiles.nfull, tiles.entries, bounds["CU_Q"], bounds["CU_K"],
        problem.sm_scale * kernel._LOG2E, *kernel._strides("o", out, varlen).values(),
        *kernel._lse_strides(lse, varlen).values(), heads, heads // k.shape[2], problem.len_q, problem.len_k,
        num_programs, tiles.num_tiles, num_tiles, problem.q_pos0, problem.k_pos0,
        HEAD_DIM=dim, VARLEN=varlen, RESUME=resume, STAGES=STAGES, PRODUCER_REGS=PRODUCER_REGISTERS,
        CONSUMER_REGS=CONSUMER_REGISTERS, **shape, num_warps=4, maxnreg=MAX_REGISTERS)
    return out, lse
