"""Tensor parallelism on two GPUs (NCCL, the Triton kernel): a GPTModel with S2 layers gives the same
loss and gradients at TP=2 as at TP=1, in bf16 (within bf16 tolerance) and in float32.

    python -m pytest -q -s tests/gpu/test_tp_gpu.py      # needs 2 GPUs and megatron-core; skipped otherwise

Each rank first runs the model at TP=2, gathers the full gradients, then rebuilds Megatron's parallel
state at TP=1 (both ranks compute the whole model on the same batch) and compares. Weights are built
on the CPU from one seed and sliced, so both TP sizes start from the same model. A table is printed
last (and written to $OUT/tp_gpu.txt when OUT is set).
"""

import os

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)
pytest.importorskip("megatron.core")


import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state, tensor_parallel

from tests.helpers import free_port, loss_and_grads, tiny_config

SEQ = 2048
# Window of 4 blocks and stride 4 at 32 blocks: every head's stripes matter, so a head-index error
# would change the output.
S2 = {"block_size": 64, "local_blocks": 4, "vert_stride": 4}
# (name, heads, KV groups, layer pattern, dtype, loss rel. tol, grad rel. tol (Frobenius, per tensor))
CASES = [
    ("mha_all_s2_bf16", 8, 8, "SSSS", torch.bfloat16, 2e-2, 5e-2),
    ("gqa_split_mixed_bf16", 8, 2, "DSSD", torch.bfloat16, 2e-2, 5e-2),
    ("gqa_split_mixed_fp32", 8, 2, "DSSD", torch.float32, 1e-4, 5e-3),
]


def _setup(tp):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def _compare(case):
    name, heads, groups, layers, dtype, loss_tol, grad_tol = case
    s2_dict = {"layers": layers, "defaults": S2}
    results = {}
    for tp in (2, 1):
        _setup(tp)
        config = tiny_config(tp, heads, groups, dtype=dtype, head_dim=64)
        results[tp] = loss_and_grads(config, s2_dict, device="cuda", seq=SEQ)
    (loss2, grads2, _), (loss1, grads1, _) = results[2], results[1]
    loss_err = abs(loss2 - loss1) / abs(loss1)
    grad_err = max(((grads2[k] - g).norm() / g.norm().clamp_min(1e-12)).item() for k, g in grads1.items())
    ok = loss_err < loss_tol and grad_err < grad_tol and grads2.keys() == grads1.keys()
    return name, loss1, loss2, loss_err, grad_err, ok


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_DEVICE_MAX_CONNECTIONS="1")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    rows = [_compare(case) for case in CASES]
    if rank == 0:
        lines = [f"{'case':24s} {'loss TP=1':>10s} {'loss TP=2':>10s} {'loss rel':>9s} {'grad rel':>9s}  ok"]
        lines += [f"{n:24s} {l1:10.5f} {l2:10.5f} {le:9.2e} {ge:9.2e}  {ok}" for n, l1, l2, le, ge, ok in rows]
        text = "\n".join(lines)
        print(text, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "tp_gpu.txt"), "w") as f:
                f.write(text + "\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    failed = [row[0] for row in rows if not row[-1]]
    if failed:
        raise AssertionError(f"TP=2 differs from TP=1 beyond tolerance in {failed}")


def test_tp2_equals_tp1_on_two_gpus():
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)


if __name__ == "__main__":
    test_tp2_equals_tp1_on_two_gpus()
