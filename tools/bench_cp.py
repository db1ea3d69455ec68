"""Time one attention layer under context parallelism: S2 layers (all-gather vs S2-aware K/V
exchange) and dense layers (fused attention parts vs the S2 kernel with a dense pattern).

    torchrun --nproc-per-node 2 tools/bench_cp.py --seqs 32768 131072 --cp1 --out runs/bench_cp
    # the hybrid_1b_32k model's layers (16 query / 8 KV heads), default schedules only:
    torchrun --nproc-per-node 2 tools/bench_cp.py --heads 16 --kv-heads 8 --exchanges s2 --overlap off \
        --cp1 --out runs/bench_cp
    torchrun --nproc-per-node 2 tools/bench_cp.py --seqs 4096 --heads 4 --iters 2 --out /tmp/cp  # smoke

Each CP rank holds Megatron's load-balanced chunks (r and 2*cp-1-r) of a bf16 sequence. S2 layers:
for every exchange, with and without overlap (each chunk's attention to its own keys while K/V
travel). Dense layers: ``dense_context_parallel_attention`` (each chunk's own keys causal and its
earlier keys full on PyTorch's fused attention op, over the overlapped all-gather) and the previous
dense path (the S2 kernel with a dense pattern, same exchange and schedule). Each row times the
layer's forward and forward+backward (attention plus exchange); overlapped rows also the same with
every collective waited for at once (``serialized``: what the overlap hides), and the exchange alone
(filling the key buffer and returning its gradients); a step waits for the slowest rank, so every
time is the maximum over ranks, then the median over iterations. Memory: the peak, and what one
layer keeps for its backward (both the maximum over ranks). ``--cp1`` also times the CP=1 layer on
one GPU for the whole sequence (S2 kernel; dense: SDPA, as ``SDPACoreAttention``) and gives every
row its scaling efficiency: CP=1 time / (CP x the row's time), 1.0 being perfect. Bytes are K/V
bytes received per rank in the forward pass (backward returns the same amount of gradient).
"Useful TFLOP/s per GPU" counts attended pairs only (docs/semantics.md). Writes ``bench_cp.json``
under ``--out`` and prints a table last. Without CUDA it runs on CPU over gloo (the reference
attention: tiny shapes only, for a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


from megatron_s2 import S2Pattern, s2_attention
from megatron_s2.core import context_parallel
from megatron_s2.core.context_parallel import (
    CP_EXCHANGES,
    context_parallel_attention,
    dense_context_parallel_attention,
    dense_pattern,
    fused_attention_backend,
    kv_exchange_bytes,
    make_exchange,
)
from megatron_s2.ops.layout import Shard
from megatron_s2.ops.flops import FORWARD_AND_BACKWARD_FACTOR, attended_pairs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=16)
    parser.add_argument("--head-pattern", default="heterogeneous")
    parser.add_argument("--layers", nargs="+", default=["s2", "dense"], choices=["s2", "dense"])
    parser.add_argument("--exchanges", nargs="+", default=list(CP_EXCHANGES), choices=CP_EXCHANGES,
                        help="S2 layers' exchanges (dense layers always all-gather)")
    parser.add_argument("--overlap", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cp1", action="store_true", help="also time CP=1 on one GPU")
    parser.add_argument("--out", default="runs/bench_cp")
    return parser.parse_args(argv)


class Timer:
    """Wall time of a callable on this rank (CUDA events on GPUs)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def max_over_ranks(values, device) -> list:
    """Element-wise maximum over ranks (the slowest rank sets the pace)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(fn, timer, args, device) -> float:
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        times.append(timer(fn))
    return statistics.median(max_over_ranks(times, device))


@contextlib.contextmanager
def serialized_collectives():
    """Every collective of the CP exchanges is waited for as soon as it is launched, so attention
    cannot run while data moves: the no-overlap baseline."""
    def waited(collective):
        def call(*args, **kwargs):
            work = collective(*args, **kwargs)
            if work is not None:
                work.wait()
            return work
        return call

    saved = (context_parallel._all_gather_tensor, context_parallel._reduce_scatter_tensor,
             dist.all_to_all_single)
    context_parallel._all_gather_tensor, context_parallel._reduce_scatter_tensor = map(waited, saved[:2])
    dist.all_to_all_single = waited(saved[2])
    try:
        yield
    finally:
        context_parallel._all_gather_tensor, context_parallel._reduce_scatter_tensor = saved[:2]
        dist.all_to_all_single = saved[2]


def bench_layer(path, attend, seq, args, device, dtype, timer, *, exchange_only=None, serialize=False):
    """Time ``attend(q, k, v)`` on this rank's chunks: forward, forward+backward and, with
    ``serialize``, forward+backward with every collective waited for at once; ``exchange_only``
    times the exchange alone. Memory: the peak and what the layer keeps for its backward."""
    cp_rank = dist.get_rank()
    gen = torch.Generator(device=device).manual_seed(1234 + cp_rank)
    s_local = seq // dist.get_world_size()

    def randn(heads):
        return torch.randn(args.batch, s_local, heads, args.head_dim, generator=gen, device=device, dtype=dtype)

    q, k, v = (randn(h).requires_grad_() for h in (args.heads, args.kv_heads, args.kv_heads))
    grad_out = randn(args.heads)

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward():
        q.grad = k.grad = v.grad = None  # no gradient accumulation in the timing
        attend(q, k, v).backward(grad_out)

    kept = None
    if device.type == "cuda":  # memory that one layer keeps for its backward
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = attend(q, k, v)
        kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        del out
        torch.cuda.reset_peak_memory_stats()
    serialized_fwd_bwd_ms = None
    if serialize:
        with serialized_collectives():
            serialized_fwd_bwd_ms = measure(forward_backward, timer, args, device)
    row = dict(seq=seq, path=path, fwd_ms=measure(forward, timer, args, device),
               fwd_bwd_ms=measure(forward_backward, timer, args, device),
               serialized_fwd_bwd_ms=serialized_fwd_bwd_ms)
    if exchange_only is not None:
        row["exchange_fwd_bwd_ms"] = measure(lambda: exchange_only(k, v), timer, args, device)
    if device.type == "cuda":
        peak, kept = max_over_ranks([torch.cuda.max_memory_allocated(), kept], device)
        row["peak_mem_gib"], row["kept_for_backward_gib"] = peak / 2**30, kept / 2**30
    return row


def exchange_alone(exchange, overlap, pattern, seq, args, device, common):
    """Filling the key buffer and returning its gradients, without attention."""
    def run(k, v):
        with torch.no_grad():
            mover = make_exchange(exchange, pattern, Shard(**common), cp_group=None, seq_len=seq, overlap=overlap,
                                  num_local_heads=args.heads, num_local_kv_heads=args.kv_heads, device=device)
            k_buf, v_buf = mover.finish(mover.start(k, v), k, v)
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            mover.finish_grads(mover.start_grads(k_buf, v_buf, dk, dv), dk, dv)
    return run


def bench_one_gpu(path, attend, seq, args, device, dtype, timer):
    """The whole sequence on rank 0 (the other ranks wait): the layer at CP=1."""
    row = None
    if dist.get_rank() == 0:
        gen = torch.Generator(device=device).manual_seed(99)
        shapes = [(args.batch, seq, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
        q, k, v = (torch.randn(*s, generator=gen, device=device, dtype=dtype).requires_grad_()
                   for s in shapes)
        grad_out = torch.randn_like(q)

        def forward_backward():
            q.grad = k.grad = v.grad = None
            attend(q, k, v).backward(grad_out)

        for _ in range(args.warmup):
            forward_backward()
        times = [timer(forward_backward) for _ in range(args.iters)]
        row = dict(seq=seq, path=path, fwd_bwd_ms=statistics.median(times))
        del q, k, v, grad_out
    dist.barrier()
    return row


def sdpa_causal(q, k, v):
    """Dense causal attention as a dense layer runs it at CP=1 (``SDPACoreAttention``)."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def s2_rows(pattern, seq, args, device, dtype, timer, common):
    rows = []
    for exchange in args.exchanges:
        for overlap in args.overlap:
            overlap = overlap == "on"
            attend = functools.partial(context_parallel_attention, pattern=pattern, cp_group=None,
                                       exchange=exchange, overlap=overlap, shard=Shard(**common))
            row = bench_layer(f"{exchange}, overlap" if overlap else exchange, attend, seq, args, device, dtype,
                              timer, exchange_only=exchange_alone(exchange, overlap, pattern, seq, args, device,
                                                                  common), serialize=overlap)
            row["recv_bytes_per_rank"] = received_bytes(pattern, exchange, seq, args, dtype)
            rows.append(row)
    if args.cp1:
        rows.append(bench_one_gpu("CP=1, one GPU", functools.partial(s2_attention, pattern=pattern, **common),
                                  seq, args, device, dtype, timer))
    return rows


def dense_rows(seq, args, device, dtype, timer, common):
    """The dense layer's CP path on fused attention ops, the previous one (the S2 kernel with a
    dense pattern), and SDPA on one GPU."""
    cp_size = dist.get_world_size()
    pattern = dense_pattern(seq // cp_size)
    backend = fused_attention_backend(torch.empty(1, 2, args.heads, args.head_dim, device=device, dtype=dtype))
    fused = bench_layer(f"{backend} parts, allgather", functools.partial(dense_context_parallel_attention,
                                                                         cp_group=None),
                        seq, args, device, dtype, timer,
                        exchange_only=exchange_alone("allgather", True, pattern, seq, args, device, common),
                        serialize=True)
    previous = bench_layer("S2 kernel, allgather, overlap (previous)",
                           functools.partial(context_parallel_attention, pattern=pattern, cp_group=None,
                                             exchange="allgather", overlap=True, shard=Shard(**common)),
                           seq, args, device, dtype, timer)
    rows = [fused, previous]
    for row in rows:
        row["recv_bytes_per_rank"] = received_bytes(pattern, "allgather", seq, args, dtype)
    if args.cp1:
        rows.append(bench_one_gpu("CP=1, one GPU (SDPA)", sdpa_causal, seq, args, device, dtype, timer))
    return rows


def received_bytes(pattern, exchange, seq, args, dtype):
    return kv_exchange_bytes(pattern, exchange=exchange, seq_len=seq, cp_size=dist.get_world_size(),
                             num_q_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                             batch_size=args.batch, element_size=torch.finfo(dtype).bits // 8)


def main(argv=None):
    args = parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = Timer(device)
    cp_size = dist.get_world_size()
    pattern = S2Pattern(block_size=args.block_size, local_blocks=args.local_blocks,
                        vert_stride=args.vert_stride, head_pattern=args.head_pattern)
    common = dict(num_q_heads=args.heads, num_kv_heads=args.kv_heads)

    rows = []
    for seq in args.seqs:
        for layer in args.layers:
            layer_pattern = pattern if layer == "s2" else S2Pattern.dense(args.block_size)
            layer_rows = (s2_rows(pattern, seq, args, device, dtype, timer, common) if layer == "s2"
                          else dense_rows(seq, args, device, dtype, timer, common))
            useful = (FORWARD_AND_BACKWARD_FACTOR * 4.0 * args.head_dim * args.batch
                      * attended_pairs(layer_pattern, args.heads, args.kv_heads, seq))
            one_gpu = next((r for r in layer_rows if r is not None and "fwd_ms" not in r), None)
            for row in layer_rows:
                if row is None:  # the one-GPU row exists on rank 0 only
                    continue
                gpus = 1 if row is one_gpu else cp_size
                row["layer"] = layer
                row["fwd_bwd_useful_tflops_per_gpu"] = useful / gpus / row["fwd_bwd_ms"] * 1e-9
                if one_gpu is not None:  # CP=1 time over cp_size x this time: 1.0 is perfect scaling
                    row["scaling_efficiency"] = one_gpu["fwd_bwd_ms"] / (gpus * row["fwd_bwd_ms"])
                rows.append(row)

    if dist.get_rank() == 0:
        report = dict(
            tool="tools/bench_cp.py",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=torch.cuda.get_device_name() if cuda else "cpu",
            torch=torch.__version__,
            cp_size=cp_size,
            config=dict(vars(args), pattern=pattern.describe(), dtype=str(dtype)),
            results=rows,
        )
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_cp.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\n{report['device']}, CP={cp_size}, {pattern.describe()}, heads {args.heads}/"
              f"{args.kv_heads}, dim {args.head_dim}, batch {args.batch}  -> {path}")
        print(f"{'seq':>7} {'layer':<5} {'path':<40} {'fwd ms':>8} {'fwd+bwd ms':>10} {'serial ms':>9} "
              f"{'xchg ms':>8} {'MiB/rank':>9} {'TF/s/GPU':>9} {'scaling':>7} {'peak GiB':>8} {'kept GiB':>8}")
        for r in rows:
            recv = r.get("recv_bytes_per_rank")
            print(f"{r['seq']:>7} {r['layer']:<5} {r['path']:<40} {r.get('fwd_ms', float('nan')):>8.2f} "
                  f"{r['fwd_bwd_ms']:>10.2f} {r.get('serialized_fwd_bwd_ms') or float('nan'):>9.2f} "
                  f"{r.get('exchange_fwd_bwd_ms', float('nan')):>8.2f} "
                  f"{(max(recv) / 2**20 if recv else 0):>9.1f} "
                  f"{r['fwd_bwd_useful_tflops_per_gpu']:>9.1f} {r.get('scaling_efficiency', float('nan')):>7.2f} "
                  f"{r.get('peak_mem_gib', float('nan')):>8.2f} {r.get('kept_for_backward_gib', float('nan')):>8.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
