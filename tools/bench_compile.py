"""What registering ``s2_attention`` as custom ops costs and what compiling gains, on one GPU.

    python tools/bench_compile.py                  # about a minute on an H200, mostly compiling

For each sequence length: the median time of a forward+backward step (``s2_attention`` between two
projections, bf16, GQA 32/8, head dim 128, the default pattern) run eagerly and compiled with
``torch.compile(fullgraph=True)`` (inductor), and the host time of one eager forward call at a tiny
shape (GPU work negligible: what the Python checks plus the custom-op dispatch cost per call,
measured as the wall time of 200 calls issued back to back). Prints a table last.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_s2 import S2Pattern, s2_attention

PATTERN = S2Pattern()  # block 64, window 16 blocks, stride 16, heterogeneous heads
HEADS, KV_HEADS, DIM = 32, 8, 128


def step(x, w_q, w_o, k, v):
    q = (x @ w_q).unflatten(-1, (HEADS, DIM))
    out = s2_attention(q, k, v, PATTERN)
    return (out.flatten(-2) @ w_o).float().square().mean()


def median_ms(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def step_times(seq):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device="cuda") * scale).to(torch.bfloat16).requires_grad_()

    hidden = HEADS * DIM
    x = draw(1, seq, hidden)
    w_q, w_o = draw(hidden, hidden, scale=hidden**-0.5), draw(hidden, hidden, scale=hidden**-0.5)
    k, v = draw(1, seq, KV_HEADS, DIM), draw(1, seq, KV_HEADS, DIM)
    inputs = (x, w_q, w_o, k, v)
    compiled = torch.compile(step, fullgraph=True)

    def run(fn):
        return lambda: torch.autograd.grad(fn(*inputs), inputs)

    return median_ms(run(step)), median_ms(run(compiled))


def host_us_per_call(calls=200):
    q, k, v = (torch.randn(1, 256, heads, DIM, device="cuda", dtype=torch.bfloat16)
               for heads in (HEADS, KV_HEADS, KV_HEADS))
    with torch.no_grad():
        for _ in range(10):
            s2_attention(q, k, v, PATTERN)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            s2_attention(q, k, v, PATTERN)
        issued = time.perf_counter() - start
        torch.cuda.synchronize()
    return issued / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768])
    args = parser.parse_args()
    rows = []
    for seq in args.seqs:
        eager, compiled = step_times(seq)
        rows.append((seq, eager, compiled))
        print(f"seq {seq}: eager {eager:.2f} ms, compiled {compiled:.2f} ms", flush=True)
    host = host_us_per_call()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| seq | eager fwd+bwd ms | compiled fwd+bwd ms | compiled / eager |")
    print("|---|---|---|---|")
    for seq, eager, compiled in rows:
        print(f"| {seq} | {eager:.2f} | {compiled:.2f} | {compiled / eager:.2f} |")
    print(f"host time of one eager s2_attention forward call (checks + custom-op dispatch): {host:.0f} us")


if __name__ == "__main__":
    main()
