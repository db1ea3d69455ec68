"""Context parallelism on two GPUs (NCCL, bf16): CP=2 equals CP=1, for S2 layers (the Triton kernel)
and for dense layers (PyTorch's cuDNN and flash attention ops).

    python -m pytest -q tests/gpu/test_cp_gpu.py        # needs 2 GPUs; skipped otherwise

Each rank runs the CP=1 attention on the whole sequence itself (same seeded inputs: the S2 kernel, or
SDPA on the same backend for dense layers) and compares its chunks of out, dq, dk, dv with the CP=2
result (S2: both exchanges and schedules). At 8k tokens both are also checked against a float32
dense-masked reference: the CP error must be no larger than the CP=1 attention's.
"""


import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)


import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron_s2 import S2Pattern, s2_attention
from megatron_s2.core.context_parallel import (
    context_parallel_attention,
    dense_context_parallel_attention,
    fused_attention_backend,
)
from megatron_s2.ops.layout import Shard
from megatron_s2.ops.reference import s2_attention_reference
from tests.helpers import free_port

CP = 2
# (name, seq, pattern, global q heads, global kv heads, head_start, local q heads, local kv heads,
#  compare with the float32 reference). A window of 16 blocks reaches across chunk boundaries.
SPARSE = S2Pattern(block_size=64, local_blocks=16, vert_stride=8)
CASES = [
    ("mha_8k", 8192, SPARSE, 8, 8, 0, 8, 8, True),
    ("gqa_kv_group_tp_slice_8k", 8192, S2Pattern(block_size=64, local_blocks=16, vert_stride=8,
                                                 head_pattern="kv_group"), 16, 4, 8, 8, 2, True),
    ("mha_dense_head_32k", 32768, S2Pattern(block_size=64, local_blocks=16, vert_stride=16,
                                            num_dense_heads=1), 16, 16, 0, 16, 16, False),
    ("dense_8k", 8192, S2Pattern.dense(block_size=64), 4, 2, 0, 4, 2, False),
]


def _local_chunks(x, rank):
    chunks = x.chunk(2 * CP, dim=1)
    return torch.cat([chunks[rank], chunks[2 * CP - 1 - rank]], 1)


def _max_rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _run(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _inputs(seq, num_q, num_kv, head_start, local_q, local_kv):
    kv_start = head_start // (num_q // num_kv)
    gen = torch.Generator(device="cuda").manual_seed(seq + num_q)
    dim = 128

    def randn(heads):
        return torch.randn(1, seq, heads, dim, generator=gen, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(num_q), randn(num_kv), randn(num_kv)
    grad_out = randn(local_q)
    return (q[:, :, head_start : head_start + local_q], k[:, :, kv_start : kv_start + local_kv],
            v[:, :, kv_start : kv_start + local_kv]), grad_out


def _compare(label, rank, cp2, single, exact):
    for index, what in enumerate(("out", "dq", "dk", "dv")):
        mine = cp2[index]
        # bf16 results of the same kernels; only the order of accumulations differs.
        err = _max_rel_err(mine, single[index])
        assert err < 2e-2, f"{label}/rank{rank} {what}: CP=2 vs CP=1 {err}"
        if exact is not None:
            cp_err, single_err = _max_rel_err(mine, exact[index]), _max_rel_err(single[index], exact[index])
            # CP rounds partial results to bf16 once more (a chunk's output between key ranges,
            # dQ/dK/dV sums).
            assert cp_err <= 2 * single_err + 5e-3, f"{label}/rank{rank} {what}: error {cp_err} vs CP=1 {single_err}"


def _references(rank, single_fn, exact_fn, inputs, grad_out):
    """This rank's chunks of the CP=1 bf16 run and (with ``exact_fn``) of the float32 reference."""
    single = [_local_chunks(t, rank) for t in _run(single_fn, inputs, grad_out)]
    exact = None
    if exact_fn is not None:
        exact = [_local_chunks(t, rank) for t in _run(exact_fn, [t.float() for t in inputs], grad_out.float())]
    return single, exact


def _run_case(case, rank):
    """CP=1 and the float32 reference once per case, then CP=2 for every exchange and schedule."""
    name, seq, pattern, num_q, num_kv, head_start, local_q, local_kv, with_fp32 = case
    inputs, grad_out = _inputs(seq, num_q, num_kv, head_start, local_q, local_kv)
    heads = dict(head_start=head_start, num_q_heads=num_q, num_kv_heads=num_kv)
    single, exact = _references(rank, lambda *t: s2_attention(*t, pattern, **heads),
                                (lambda *t: s2_attention_reference(*t, pattern, **heads)) if with_fp32 else None,
                                inputs, grad_out)
    local_inputs = [_local_chunks(t, rank) for t in inputs]
    for exchange in ("allgather", "s2"):
        for overlap in (True, False):
            cp2 = _run(lambda *t: context_parallel_attention(*t, pattern, cp_group=None, exchange=exchange,
                                                             overlap=overlap, shard=Shard(**heads)),
                       local_inputs, _local_chunks(grad_out, rank))
            _compare(f"{name}/{exchange}/overlap={overlap}", rank, cp2, single, exact)


# Dense layers: (name, seq, q heads, kv heads, compare with the float32 reference).
DENSE_CASES = [("dense_mha_8k", 8192, 8, 8, True), ("dense_gqa_8k", 8192, 8, 2, True),
               ("dense_gqa_32k", 32768, 16, 8, False)]


def _sdpa(q, k, v):
    """CP=1 dense attention; K/V repeated per query head, so that any SDPA backend takes GQA."""
    k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], 2) for t in (k, v))
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)


def _run_dense_case(case, rank, backend):
    """Under ``sdpa_kernel(backend)`` both CP=1 (SDPA) and the CP=2 parts run on that backend."""
    name, seq, num_q, num_kv, with_fp32 = case
    inputs, grad_out = _inputs(seq, num_q, num_kv, 0, num_q, num_kv)
    dense = S2Pattern.dense(64)
    with sdpa_kernel(backend):
        expected = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash"}[backend]
        assert fused_attention_backend(inputs[0]) == expected, "the fused dense CP path did not engage"
        single, exact = _references(rank, _sdpa, (lambda *t: s2_attention_reference(*t, dense)) if with_fp32
                                    else None, inputs, grad_out)
        cp2 = _run(lambda *t: dense_context_parallel_attention(*t, cp_group=None),
                   [_local_chunks(t, rank) for t in inputs], _local_chunks(grad_out, rank))
    _compare(f"{name}/{expected}", rank, cp2, single, exact)


def _worker(rank, port):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=CP)
    try:
        for case in CASES:
            _run_case(case, rank)
        for case in DENSE_CASES:
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                _run_dense_case(case, rank, backend)
    finally:
        dist.destroy_process_group()


def test_cp2_equals_cp1_on_two_gpus():
    mp.spawn(_worker, args=(free_port(),), nprocs=CP, join=True)
