"""Benchmark S2 attention (fast and deterministic backward) against DKernel and FlexAttention on the
same layout and dense SDPA (cuDNN, flash), side by side in one process.

    python tools/bench_attention.py --out runs/bench            # the cases of the kernel issues
    python tools/bench_attention.py --seqs 32768 --impls s2-fast,flex --head-dims 128 --out runs/quick

Default cases: b1 8k/32k/128k MHA head dim 128; GQA 32/8 with heterogeneous and kv_group heads at
32k and 128k; head dim 64 at 32k; b4 8k. Times are medians of ``triton.testing.do_bench``; "useful
TFLOP/s" counts only attended (query, key) pairs, 4*D per pair forward and 2.5x that backward
(docs/semantics.md), so sparse and dense kernels compare fairly. S2 runs its fixed default launch
configs (what training runs; ``S2_AUTOTUNE=1`` for the tuner; tools/tune_kernel.py times the
candidates). DKernel (``dkernel``, not vendored) runs when importable, with the same block mask.
Dense SDPA does the same work for every head pattern, so it runs on the heterogeneous cases only.
Writes ``bench_attention.json`` and ``bench_attention.png`` under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import torch

os.environ.setdefault("S2_AUTOTUNE", "0")  # the fixed default configs, as in training

from megatron_s2 import S2Pattern, get_layout, s2_attention
from megatron_s2.ops import kernel as s2_kernel
from megatron_s2.ops.layout import clear_layout_cache
from megatron_s2.ops.flops import FORWARD_AND_BACKWARD_FACTOR, attended_pairs, dense_causal_pairs

DEVICE = "cuda"
# s2-fast / s2-det: the kernel's fast and deterministic backward (same forward); s2: its default mode.
IMPLS = ("s2-fast", "s2-det", "s2", "dkernel", "flex", "cudnn", "flash", "sdpa")
DEFAULT_IMPLS = ("s2-fast", "s2-det", "dkernel", "flex", "cudnn", "flash")
DENSE_IMPLS = ("sdpa", "flash", "cudnn")


@dataclasses.dataclass
class Case:
    seq: int
    batch: int = 1
    heads: int = 32
    kv_heads: int = 32
    dim: int = 128
    head_pattern: str = "heterogeneous"

    @property
    def name(self):
        gqa = f" gqa{self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else ""
        heads = "" if self.head_pattern == "heterogeneous" else f" {self.head_pattern}"
        return f"b{self.batch} s{self.seq // 1024}k d{self.dim}{gqa}{heads}"


def default_cases(seqs, dims):
    """MHA at every length and the first head dim; GQA 32/8 heterogeneous and kv_group at 32k and
    longer; the other head dims at 32k; batch 4 at 8k."""
    cases = [Case(seq=s, dim=dims[0]) for s in seqs]
    for s in seqs:
        if s >= 32768:
            cases += [Case(seq=s, kv_heads=8, dim=dims[0], head_pattern=p) for p in ("heterogeneous", "kv_group")]
    if 32768 in seqs:
        cases += [Case(seq=32768, dim=d) for d in dims[1:]]
    if 8192 in seqs:
        cases.append(Case(seq=8192, batch=4, dim=dims[0]))
    return cases


def flex_block_mask(pattern, case):
    """FlexAttention BlockMask at its 128-token granularity from the same S2 block mask."""
    from torch.nn.attention.flex_attention import BlockMask

    layout = get_layout(pattern, case.heads, case.kv_heads, case.seq, device=DEVICE)
    blocks = layout.to_block_mask()  # [h, nb, nb] at block_size
    flex = 128
    r = flex // pattern.block_size
    nb = blocks.shape[1]
    nf = -(-nb // r)
    padded = torch.zeros(case.heads, nf * r, nf * r, dtype=torch.bool, device=DEVICE)
    padded[:, :nb, :nb] = blocks
    sub = padded.view(case.heads, nf, r, nf, r).permute(0, 1, 3, 2, 4).reshape(case.heads, nf, nf, r * r)
    any_on = sub.any(-1)
    diagonal = torch.eye(nf, dtype=torch.bool, device=DEVICE)[None]
    full = sub.all(-1) & ~diagonal
    if case.seq % flex:  # the last flex block holds padding tokens: mask them
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = any_on & ~full

    def to_lists(m):
        counts = m.sum(-1).to(torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None], order[None]

    bsz = pattern.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[h, q_idx // bsz, kv_idx // bsz] & (kv_idx <= q_idx)

    kv_num, kv_idx = to_lists(partial)
    full_num, full_idx = to_lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=flex, mask_mod=mask_mod,
                                    seq_lengths=(case.seq, case.seq))


def dkernel_runner(pattern, case, q, k, v):
    """DKernel's SparseAttention with the same block mask. Its per-head masks need K/V per query
    head: GQA K/V are repeated before the timed call (their cost is not counted)."""
    import dkernel

    mask = get_layout(pattern, case.heads, case.kv_heads, case.seq, device=DEVICE).to_block_mask()
    attention = dkernel.SparseAttention(pattern.block_size, mask.cpu(), seq_dim=1).to(DEVICE)
    group = case.heads // case.kv_heads
    if group > 1:
        k, v = (t.detach().repeat_interleave(group, 2).requires_grad_() for t in (k, v))
    return lambda: attention(q, k, v)


def make_runner(impl, pattern, case, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if impl in ("s2-fast", "s2-det", "s2"):
        deterministic = {"s2-fast": False, "s2-det": True, "s2": None}[impl]
        return lambda: s2_attention(q, k, v, pattern, deterministic=deterministic)
    if impl == "dkernel":
        return dkernel_runner(pattern, case, q, k, v)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = case.kv_heads != case.heads
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = flex_block_mask(pattern, case)
        torch._dynamo.reset()  # a fresh compile per case: past the recompile limit flex runs eagerly
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(impl)

    def dense():
        if backend is None:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa).transpose(1, 2)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa).transpose(1, 2)

    return dense


def time_impl(impl, pattern, case, useful_fwd_flops, kernel_flops):
    from triton.testing import do_bench

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape_q = (case.batch, case.seq, case.heads, case.dim)
    shape_kv = (case.batch, case.seq, case.kv_heads, case.dim)
    q, k, v = (torch.randn(s, generator=gen, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
               for s in (shape_q, shape_kv, shape_kv))
    run = make_runner(impl, pattern, case, q, k, v)
    grad = torch.randn(shape_q, generator=gen, device=DEVICE, dtype=torch.bfloat16)

    def fwd_bwd():
        run().backward(grad)

    rep = 200 if case.seq * case.batch <= 32768 else 400
    with torch.no_grad():
        run()
    fwd_ms = do_bench(lambda: run(), warmup=50, rep=rep, return_mode="median")
    fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    total_ms = do_bench(fwd_bwd, warmup=50, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    # Dense kernels do causal work, but their useful work is the S2 pairs only.
    return dict(impl=impl, case=case.name, fwd_ms=fwd_ms, fwd_bwd_ms=total_ms,
                fwd_tflops=useful_fwd_flops / fwd_ms * 1e-9,
                fwd_bwd_tflops=FORWARD_AND_BACKWARD_FACTOR * useful_fwd_flops / total_ms * 1e-9,
                fwd_kernel_tflops=kernel_flops / fwd_ms * 1e-9,  # the kernel's own work (dense: causal)
                peak_gib=peak_gib)


def layout_build_ms(pattern, case):
    torch.cuda.synchronize()
    clear_layout_cache()
    s2_kernel._derived.clear()
    start = time.perf_counter()
    layout = get_layout(pattern, case.heads, case.kv_heads, case.seq, device=DEVICE)
    s2_kernel.kernel_layout(layout, case.dim, case.heads // case.kv_heads)
    torch.cuda.synchronize()
    cold = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for _ in range(100):
        layout = get_layout(pattern, case.heads, case.kv_heads, case.seq, device=DEVICE)
        s2_kernel.kernel_layout(layout, case.dim, case.heads // case.kv_heads)
    cached = (time.perf_counter() - start) * 1e3 / 100
    return cold, cached


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r["fwd_bwd_tflops"] for r in results if r["case"] == c and r["impl"] == impl), 0)
                for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=20)
    ax.set_ylabel("fwd+bwd useful TFLOP/s (S2 pairs)")
    ax.set_title("S2 attention vs dense SDPA and FlexAttention (bf16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=16)
    parser.add_argument("--dkernel", action="store_true",
                        help="DKernel-style layout: step derived from the query-head count")
    parser.add_argument("--dense-max-seq", type=int, default=131072,
                        help="skip dense SDPA above this length (it is slow)")
    parser.add_argument("--out", default="runs/bench_attention")
    args = parser.parse_args(argv)

    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown --impls {unknown}; choose from {IMPLS}")
    dims = args.head_dims
    cases = default_cases(args.seqs, dims)
    os.makedirs(args.out, exist_ok=True)
    results, layouts = [], []
    for case in cases:
        kw = dict(block_size=args.block_size, local_blocks=args.local_blocks, vert_stride=args.vert_stride)
        kw["head_pattern"] = case.head_pattern
        pattern = S2Pattern.dkernel(case.heads, **kw) if args.dkernel else S2Pattern(**kw)
        pairs = attended_pairs(pattern, case.heads, case.kv_heads, case.seq)
        density = pairs / (case.heads * case.seq * case.seq)
        useful = 4.0 * case.dim * pairs * case.batch
        dense = 4.0 * case.dim * case.heads * case.batch * dense_causal_pairs(case.seq)  # causal work
        cold, cached = layout_build_ms(pattern, case)
        layouts.append(dict(case=case.name, density=density, layout_cold_ms=cold, layout_cached_ms=cached))
        for impl in impls:
            if impl in DENSE_IMPLS and (case.seq > args.dense_max_seq or case.head_pattern != "heterogeneous"):
                continue
            try:
                row = time_impl(impl, pattern, case, useful, dense if impl in DENSE_IMPLS else useful)
            except Exception as exc:  # a backend missing on this card must not stop the others
                row = dict(impl=impl, case=case.name, error=f"{type(exc).__name__}: {exc}"[:300])
            row["density"] = density
            results.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        report = write_report(args.out, results, layouts, argv)  # after every case: a cut-off run keeps its rows
    print_table(*report)


def write_report(out, results, layouts, argv):
    import triton

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command="python tools/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    tuned = {name: {str(key): str(cfg) for t in launcher.tuned if t is not None for key, cfg in t.cache.items()}
             for name, launcher in (("fwd", s2_kernel._fwd), ("dkdv", s2_kernel._dkdv), ("dq", s2_kernel._dq),
                                    ("fused", s2_kernel._fused))}
    with open(os.path.join(out, "bench_attention.json"), "w") as f:
        json.dump(dict(meta=meta, results=results, layouts=layouts, tuned_configs=tuned), f, indent=1)
    ok = [r for r in results if "error" not in r]
    if ok:
        plot(ok, os.path.join(out, "bench_attention.png"))
    return meta, results, layouts, tuned


def print_table(meta, results, layouts, tuned):
    for name, cache in tuned.items():
        for key, cfg in cache.items():
            print(f"tuned {name}: {cfg}  (key {key[:60]})")
    print(f"\n{meta['card']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    for lay in layouts:
        print(f"layout {lay['case']:<20} density {lay['density']:.3f}  build cold {lay['layout_cold_ms']:.1f} ms"
              f"  cached {lay['layout_cached_ms'] * 1e3:.1f} us")
    print(f"{'case':<31} {'impl':<8} {'fwd ms':>8} {'f+b ms':>8} {'fwd TF/s':>9} {'f+b TF/s':>9} {'peak GiB':>9}"
          f" {'/s2-fast':>9} {'/s2-det':>8}")
    # Forward+backward time over S2's, in both backward modes (> 1: S2 is faster).
    refs = [{r["case"]: r for r in results if r["impl"] == name and "error" not in r} for name in ("s2-fast", "s2-det")]
    for r in results:
        if "error" in r:
            print(f"{r['case']:<31} {r['impl']:<8} {r['error'][:80]}")
            continue
        ratios = [r["fwd_bwd_ms"] / ref[r["case"]]["fwd_bwd_ms"] if r["case"] in ref else float("nan") for ref in refs]
        print(f"{r['case']:<31} {r['impl']:<8} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f} "
              f"{r['fwd_tflops']:9.0f} {r['fwd_bwd_tflops']:9.0f} {r['peak_gib']:9.2f} {ratios[0]:9.2f} "
              f"{ratios[1]:8.2f}")


if __name__ == "__main__":
    main()
