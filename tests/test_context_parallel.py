"""Context parallelism: CP=2 (and TP=2 x CP=2, CP=4) equals the CP=1 reference, for both exchanges
of S2 layers and for dense layers on PyTorch's fused attention ops.

The reference is the float64 dense-masked attention on the whole sequence (inputs drawn in float32,
the kernel's widest type); every rank computes it itself from the same seeded inputs and compares
its own chunks of the output and of dq, dk, dv.
"""

import os
import random
import subprocess
import sys

import pytest
import torch

from megatron_s2 import BlockMaskPattern, S2Pattern
from megatron_s2.core.context_parallel import (
    context_parallel_attention,
    dense_context_parallel_attention,
    fused_attention_backend,
    kv_exchange_bytes,
    validate_context_parallel,
)
from megatron_s2.ops.layout import Shard
from megatron_s2.ops.reference import s2_attention_reference
from tests.helpers import ROOT, run_distributed

pytestmark = pytest.mark.distributed

BLOCK = 16
SEQ = 256  # 16 blocks; with CP=2 four chunks of 4 blocks
# A window of 3 blocks reaches back across chunk boundaries; 4 stripe residues over 16 blocks.
SPARSE = S2Pattern(block_size=BLOCK, local_blocks=3, vert_stride=4)


def _local_chunks(x, cp_rank, cp_size, dim=1):
    """Megatron's load-balanced split of the sequence: chunks r and 2*cp-1-r, concatenated."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim)


def _random_block_mask(heads, blocks, seed=3):
    """An explicit causal block mask with the diagonal set (any such mask must run). Plain Python:
    torch ops here would start intra-op threads in the parent before the ranks are forked."""
    draw = random.Random(seed)
    mask = [[[kb == qb or (kb < qb and draw.random() < 0.3) for kb in range(blocks)]
             for qb in range(blocks)] for _ in range(heads)]
    return BlockMaskPattern(torch.tensor(mask), block_size=BLOCK)


# (name, pattern, global q heads, global kv heads, head_start, local q heads, local kv heads)
CASES = [
    ("mha", SPARSE, 4, 4, 0, 4, 4),
    ("gqa", SPARSE, 4, 2, 0, 4, 2),
    ("mha_tp_slice", SPARSE, 4, 4, 2, 2, 2),
    ("gqa_kv_group_tp_slice_dense_head",
     S2Pattern(block_size=BLOCK, local_blocks=2, vert_stride=4, head_pattern="kv_group",
               num_dense_heads=1), 8, 4, 4, 4, 2),
    ("dense", S2Pattern.dense(block_size=BLOCK), 2, 1, 0, 2, 1),
    ("window_gqa", S2Pattern.window(block_size=BLOCK, local_blocks=3), 4, 2, 0, 4, 2),
    ("explicit_block_mask_tp_slice", _random_block_mask(4, SEQ // BLOCK), 4, 2, 2, 2, 1),
]


def _check_case(case, exchange, overlap, cp_rank, cp_size, cp_group, seed, dim=8, tolerance=1e-5,
                softmax_scale=None):
    """``exchange="dense"``: ``dense_context_parallel_attention`` (the case's pattern must be dense)."""
    name, pattern, num_q, num_kv, head_start, local_q, local_kv = case
    kv_start = head_start // (num_q // num_kv)
    gen = torch.Generator().manual_seed(seed)
    batch = 2
    q = torch.randn(batch, SEQ, num_q, dim, generator=gen)
    k = torch.randn(batch, SEQ, num_kv, dim, generator=gen)
    v = torch.randn(batch, SEQ, num_kv, dim, generator=gen)
    grad_out = torch.randn(batch, SEQ, local_q, dim, generator=gen)
    q, k, v = q[:, :, head_start : head_start + local_q], k[:, :, kv_start : kv_start + local_kv], \
        v[:, :, kv_start : kv_start + local_kv]

    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = s2_attention_reference(*ref_inputs, pattern, softmax_scale=softmax_scale, head_start=head_start,
                                     num_q_heads=num_q, num_kv_heads=num_kv)
    ref_out.backward(grad_out.double())

    cp_inputs = [_local_chunks(t, cp_rank, cp_size).clone().requires_grad_() for t in (q, k, v)]
    if exchange == "dense":
        out = dense_context_parallel_attention(*cp_inputs, cp_group=cp_group, softmax_scale=softmax_scale)
    else:
        out = context_parallel_attention(*cp_inputs, pattern, cp_group=cp_group, exchange=exchange,
                                         overlap=overlap, softmax_scale=softmax_scale,
                                         shard=Shard(num_q, num_kv, head_start=head_start))
    out.backward(_local_chunks(grad_out, cp_rank, cp_size))

    label = f"{name}/{exchange}/overlap={overlap}/cp_rank{cp_rank}"

    def expect(mine, ref, what):  # float32 against the float64 reference
        torch.testing.assert_close(mine.double(), _local_chunks(ref, cp_rank, cp_size),
                                   rtol=10 * tolerance, atol=tolerance, msg=f"{label} {what}")

    expect(out, ref_out, "out")
    for what, mine, ref in zip(("dq", "dk", "dv"), cp_inputs, ref_inputs):
        expect(mine.grad, ref.grad, what)


def _cp_body(rank, world_size, cases, exchanges):
    from megatron.core import parallel_state

    # s2_attention on CPU: the reference path (fast); the Triton interpreter is tested separately.
    os.environ["TRITON_INTERPRET"] = "0"

    group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_size = parallel_state.get_context_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    checked = []
    for index, case in enumerate(cases):
        name, pattern, num_q, num_kv, head_start, local_q, local_kv = case
        if tp_size > 1:  # this rank's TP slice of the heads, at their global indices
            local_q, local_kv = num_q // tp_size, num_kv // tp_size
            case = (name, pattern, num_q, num_kv, tp_rank * local_q, local_q, local_kv)
        for exchange in exchanges:
            for overlap in (True, False):
                _check_case(case, exchange, overlap, cp_rank, cp_size, group, seed=index)
                checked.append((case[0], exchange, overlap))
    return checked


def test_cp2_matches_cp1_both_exchanges():
    results = run_distributed(2, _cp_body, CASES, ("allgather", "s2"), cp=2)
    assert all(len(r) == 4 * len(CASES) for r in results)


def test_tp2_cp2_matches_cp1():
    cases = [CASES[0], CASES[1], CASES[3]]  # TP splits the global heads; head_start comes from TP
    results = run_distributed(4, _cp_body, cases, ("allgather", "s2"), tp=2, cp=2)
    assert all(len(r) == 4 * len(cases) for r in results)


def test_cp4_matches_cp1():
    """Four CP ranks: blocks read by several ranks get the sum of their gradients."""
    results = run_distributed(4, _cp_body, [CASES[0], CASES[1]], ("allgather", "s2"), cp=4)
    assert all(len(r) == 8 for r in results)


# -- dense layers on PyTorch's fused attention ops -------------------------------------------------

DENSE = S2Pattern.dense(block_size=BLOCK)
# (name, pattern, global q heads, global kv heads, head_start, local q heads, local kv heads)
DENSE_CASES = [("dense_mha", DENSE, 4, 4, 0, 4, 4), ("dense_gqa", DENSE, 4, 2, 0, 4, 2),
               ("dense_mqa", DENSE, 4, 1, 0, 4, 1)]


def _dense_body(rank, world_size, cases):
    """Each rank's chunks of out, dq, dk, dv against the float64 reference of the whole sequence."""
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_size = parallel_state.get_context_parallel_world_size()
    q = torch.randn(1, SEQ // cp_size, 4, 8)
    assert fused_attention_backend(q) == "cpu"  # the fused path runs, not the S2-kernel fallback
    for index, case in enumerate(cases):
        _check_case(case, "dense", True, cp_rank, cp_size, group, seed=20 + index, softmax_scale=0.3)
    return len(cases)


def test_dense_cp2_on_fused_ops_matches_cp1():
    assert run_distributed(2, _dense_body, DENSE_CASES, cp=2) == [len(DENSE_CASES)] * 2


def test_dense_cp4_on_fused_ops_matches_cp1():
    """Four ranks: a late chunk's earlier keys come from three other ranks and its own early chunk."""
    assert run_distributed(4, _dense_body, DENSE_CASES[:2], cp=4) == [2] * 4


def _interpreted_kernel_body(rank, world_size):
    """The Triton kernel itself (interpreted) on the CP path: strided chunk views, q_start > 0."""
    from megatron.core import parallel_state

    case = ("gqa_tp_slice", SPARSE, 4, 2, 2, 2, 1)
    group = parallel_state.get_context_parallel_group()
    for exchange in ("allgather", "s2"):
        for overlap in (True, False):
            _check_case(case, exchange, overlap, parallel_state.get_context_parallel_rank(), 2, group,
                        seed=7, dim=16, tolerance=1e-4)


@pytest.mark.slow
def test_cp2_with_interpreted_kernel():
    # TRITON_INTERPRET must be set before torch imports Triton: a fresh interpreter guarantees it.
    code = ("from tests.helpers import ROOT, run_distributed; "
            "from tests.test_context_parallel import _interpreted_kernel_body; "
            "run_distributed(2, _interpreted_kernel_body, cp=2)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# -- bytes moved -------------------------------------------------------------------------------


def _direct_remote_pairs(pattern, seq, cp, rank, num_q, num_kv, dim_bytes):
    """Count (KV head, key block) pairs of other ranks that rank's queries attend, from the
    pattern formula written out (heterogeneous heads, default step)."""
    blocks_per_chunk = seq // (2 * cp) // pattern.block_size
    step = max(1, pattern.vert_stride // num_q)
    group = num_q // num_kv
    owned = {c * blocks_per_chunk + i for c in (rank, 2 * cp - 1 - rank)
             for i in range(blocks_per_chunk)}
    needed = set()
    for head in range(num_q):
        for qb in owned:
            for kb in range(qb + 1):
                window = qb - kb < pattern.local_blocks
                stripe = (kb + head * step) % pattern.vert_stride == 0
                if (window or stripe) and kb not in owned:
                    needed.add((head // group, kb))
    return len(needed) * pattern.block_size * dim_bytes


@pytest.mark.parametrize("num_kv", [4, 2])
def test_exchange_bytes_match_direct_count(num_kv):
    seq, cp, dim, batch, elem = 512, 2, 8, 3, 4
    dim_bytes = 2 * batch * dim * elem  # K and V of one token and head
    s2 = kv_exchange_bytes(SPARSE, exchange="s2", seq_len=seq, cp_size=cp, num_q_heads=4,
                           num_kv_heads=num_kv, head_dim=dim, batch_size=batch, element_size=elem)
    direct = [_direct_remote_pairs(SPARSE, seq, cp, r, 4, num_kv, dim_bytes) for r in range(cp)]
    assert s2 == direct
    allgather = kv_exchange_bytes(SPARSE, exchange="allgather", seq_len=seq, cp_size=cp,
                                  num_q_heads=4, num_kv_heads=num_kv, head_dim=dim,
                                  batch_size=batch, element_size=elem)
    assert allgather == [seq // 2 * num_kv * dim_bytes] * cp
    assert max(s2) < min(allgather)


def test_window_exchange_moves_only_the_window_halo():
    """A window-only layer needs from other ranks only the local_blocks - 1 blocks before each of its
    chunks that another rank holds, per KV head."""
    seq, cp, local, num_kv = 512, 2, 3, 2
    window = S2Pattern.window(block_size=BLOCK, local_blocks=local)
    blocks_per_chunk = seq // (2 * cp) // BLOCK
    dim_bytes = 2 * 8 * 4  # K and V, head dim 8, float32
    expected = []
    for rank in range(cp):
        owned = {c * blocks_per_chunk + i for c in (rank, 2 * cp - 1 - rank) for i in range(blocks_per_chunk)}
        halo = {first - j for first in (rank * blocks_per_chunk, (2 * cp - 1 - rank) * blocks_per_chunk)
                for j in range(1, local) if first - j >= 0} - owned
        expected.append(len(halo) * num_kv * BLOCK * dim_bytes)
    got = kv_exchange_bytes(window, exchange="s2", seq_len=seq, cp_size=cp, num_q_heads=4, num_kv_heads=num_kv,
                            head_dim=8, element_size=4)
    # CP=2: rank 0's chunk 3 reads 2 blocks of rank 1's chunk 2; rank 1's chunk 1 reads 2 of chunk 0.
    assert got == expected == [(local - 1) * num_kv * BLOCK * dim_bytes] * cp


def test_exchange_bytes_reach_the_aim_at_32k():
    """The issue's aim: at 32k tokens the S2 exchange moves >= vert_stride/2 times less."""
    pattern = S2Pattern(block_size=64, local_blocks=16, vert_stride=16)
    kwargs = dict(seq_len=32768, cp_size=2, num_q_heads=32, num_kv_heads=32, head_dim=128)
    s2 = max(kv_exchange_bytes(pattern, exchange="s2", **kwargs))  # the busiest rank
    allgather = max(kv_exchange_bytes(pattern, exchange="allgather", **kwargs))
    assert allgather / s2 >= pattern.vert_stride / 2


def _measured_bytes_body(rank, world_size):
    """Record the bytes each collective delivers to this rank during one forward."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ["TRITON_INTERPRET"] = "0"  # the reference path: this test counts bytes, not kernels
    received = {}
    original = dist.all_to_all_single

    def counting_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        received["s2"] = output.numel() * output.element_size()
        return original(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = counting_all_to_all
    group = parallel_state.get_context_parallel_group()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, SEQ // 2, 4, 8, generator=gen)
    k, v = torch.randn(2, 1, SEQ // 2, 2, 8, generator=gen)
    context_parallel_attention(q, k, v, SPARSE, cp_group=group, exchange="s2")
    return received["s2"]


def test_exchange_bytes_match_measured_all_to_all():
    measured = run_distributed(2, _measured_bytes_body, cp=2)
    predicted = kv_exchange_bytes(SPARSE, exchange="s2", seq_len=SEQ, cp_size=2, num_q_heads=4,
                                  num_kv_heads=2, head_dim=8, element_size=4)
    assert measured == predicted


# -- validation and chunk order ----------------------------------------------------------------


def test_validate_context_parallel():
    validate_context_parallel(4096, 2, 64)
    with pytest.raises(ValueError, match=r"2 \* context_parallel_size \* block_size = 2 \* 4 \* 64"):
        validate_context_parallel(4096 + 64, 4, 64)
    with pytest.raises(ValueError, match="cp_size must be a positive integer"):
        validate_context_parallel(4096, 0, 64)


def test_entry_point_rejects_bad_input():
    q = torch.zeros(1, 64, 2, 8)
    with pytest.raises(ValueError, match="exchange must be one of"):
        context_parallel_attention(q, q, q, SPARSE, cp_group=None, exchange="ring")
    with pytest.raises(ValueError, match="equal shapes"):
        context_parallel_attention(q, q, q[:, :, :1], SPARSE, cp_group=None)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        dense_context_parallel_attention(torch.zeros(1, 64, 3, 8), q, q, cp_group=None)
