"""Time the S2 kernel's candidate launch choices on one GPU and print which wins.

    python tools/tune_kernel.py --out runs/tune_kernel              # about 5-7 minutes on an H200
    python tools/tune_kernel.py --spills-only 90                     # registers/spills, no GPU needed
    python tools/tune_kernel.py --ablate --out runs/ablate_kernel    # stages left out, about 1 minute

What it compares (bf16, 32 query heads, block 64 / local 16 / stride 16, fixed configs, no autotuner),
most open questions first:
- the backward modes at the default configs: fast (dQ added in the dK/dV pass) against
  deterministic (separate dQ pass), at 32k and 128k, MHA head dim 128 and 64 and GQA 32/8;
- on Hopper, the head-dim-128 forward of ``kernel_hopper`` (Gluon) against the Triton forward;
  the stages that tune the Triton forward time it alone (``kernel.forward``), the others the
  forward that ``attention.kernel_forward`` chooses;
- the deterministic dQ pass from stored dS (descriptor or pointer stores; ``kernel.STORED_DS_BYTES``)
  against recomputing dS;
- the fast mode's dQ adds: one tensor-descriptor reduction per step (``kernel.TMA_REDUCE``) against
  per-element atomics;
- tensor-descriptor (TMA) against pointer loads in the inner loops (``kernel.TMA_LOADS``), and
  descriptor loads in the dK/dV pass at every config (``kernel.TMA_KEY_PASS``, off by default);
- the GPU time of each kernel of a forward and backward (torch.profiler): which pass limits;
- every config of each launch list (forward, deterministic dK/dV, dQ from stored dS, fast fused dK/dV+dQ) for head
  dims 128 and 64, one list at a time with the others at their defaults (the candidate is moved to
  the front of its list, where the launcher takes it from);
- 64-row against 128-row query and key tiles (head dim 128; at head dim 64, 64-row tiles measured
  1.4-2.3x slower on an H200);
- GQA dK/dV programs per query head against per KV group, for ``heterogeneous`` and ``kv_group``;
- GQA packing of the forward programs on and off (``kv_group``);
Each stage prints its variants with the winner marked; a summary of the winners comes last, with
what to change in ``megatron_s2/ops/kernel.py``, then the registers and spills (ptxas) of each kernel's
default config. Stops starting new variants after ``--max-minutes`` (6.5: the whole run stays
under 8 minutes).

``--ablate`` instead times the kernel with one stage left out at a time (what limits it): each
variant is a copy of ``megatron_s2/ops/kernel.py`` with one source edit (``FORWARD_ABLATIONS``,
``KEY_PASS_ABLATIONS``, ``FAST_PASS_ABLATIONS``), imported from a temporary directory, whose kernel
replaces the launcher's for one timing. The variants compute wrong results by design. Cases: the
forward at 32k and 128k (head dim 128) and 32k (64), the deterministic and the fast backward at 32k
(128).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time

os.environ["S2_AUTOTUNE"] = "0"  # the launcher's first config, so each variant runs what it names

import torch
from megatron_s2 import S2Pattern
from megatron_s2.ops import kernel
from megatron_s2.ops.attention import _hopper_kernel, kernel_forward, kernel_problem
from megatron_s2.ops.layout import Shard
from megatron_s2.ops.flops import FORWARD_AND_BACKWARD_FACTOR, attended_pairs

DEVICE = "cuda"


@dataclasses.dataclass(frozen=True)
class Case:
    seq: int
    dim: int = 128
    kv_heads: int = 32
    head_pattern: str = "heterogeneous"
    heads: int = 32

    @property
    def name(self):
        gqa = f" gqa{self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else ""
        heads = "" if self.head_pattern == "heterogeneous" else f" {self.head_pattern}"
        return f"s{self.seq // 1024}k d{self.dim}{gqa}{heads}"

    @property
    def pattern(self):
        return S2Pattern(block_size=64, local_blocks=16, vert_stride=16, head_pattern=self.head_pattern)


class Bench:
    """Inputs of one case and timers of its forward and backward passes."""

    def __init__(self, case: Case):
        self.case = case
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        make = lambda heads: torch.randn((1, case.seq, heads, case.dim), generator=gen, device=DEVICE,
                                         dtype=torch.bfloat16)
        self.q, self.k, self.v, self.do = make(case.heads), make(case.kv_heads), make(case.kv_heads), make(case.heads)
        self.fwd_flops = 4.0 * case.dim * attended_pairs(case.pattern, case.heads, case.kv_heads, case.seq)

    def problem(self):
        c = self.case
        return kernel_problem(self.q, self.k, c.pattern, Shard(c.heads, c.kv_heads), softmax_scale=None)

    def time_forward(self, forward=kernel_forward):
        problem = self.problem()
        return _median_ms(lambda: forward(self.q, self.k, self.v, problem))

    def time_backward(self, deterministic: bool):
        problem = self.problem()
        out, lse = kernel_forward(self.q, self.k, self.v, problem)
        return _median_ms(lambda: kernel.backward(self.do, self.q, self.k, self.v, out, lse, None, problem,
                                                  deterministic))


def _median_ms(fn):
    from triton.testing import do_bench

    fn()  # compile outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _label(config):
    params = [",".join(f"{k}={v}" for k, v in config.kwargs.items())] if config.kwargs else []
    cap = [] if config.maxnreg is None else [f"r{config.maxnreg}"]
    return " ".join(params + [f"w{config.num_warps}", f"s{config.num_stages}"] + cap)


@contextlib.contextmanager
def settings(launcher=None, index=0, dim=128, **module_values):
    """Config ``index`` of ``launcher``'s list for ``dim`` first, and module constants replaced
    (tile rows, split ratio), for the duration of one variant."""
    saved_lists = None if launcher is None else launcher.config_lists
    saved_values = {name: getattr(kernel, name) for name in module_values}
    try:
        if launcher is not None:
            which = kernel.head_dim_index(dim)
            lists = list(saved_lists)
            configs = lists[which]
            lists[which] = [configs[index]] + configs[:index] + configs[index + 1:]
            launcher.config_lists = lists
        for name, value in module_values.items():
            setattr(kernel, name, value)
        yield
    finally:
        if launcher is not None:
            launcher.config_lists = saved_lists
        for name, value in saved_values.items():
            setattr(kernel, name, value)


class Sweep:
    def __init__(self, max_minutes):
        self.deadline = time.monotonic() + 60 * max_minutes
        self.rows = []
        self.benches = {}

    def bench(self, case):
        if case not in self.benches:
            self.benches.clear()  # one case's tensors at a time
            torch.cuda.empty_cache()
            self.benches[case] = Bench(case)
        return self.benches[case]

    def run(self, stage, case, variant, timer, flops_factor, **setting):
        """Time one variant (``timer(bench)``), or record it as skipped past the deadline."""
        row = dict(stage=stage, case=case.name, variant=variant)
        if time.monotonic() > self.deadline:
            row["error"] = "skipped: --max-minutes reached"
        else:
            try:
                with settings(**setting):
                    bench = self.bench(case)
                    row["ms"] = timer(bench)
                    row["fwd_flops"] = bench.fwd_flops
                    row["useful_tflops"] = flops_factor * bench.fwd_flops / row["ms"] * 1e-9
            except Exception as exc:  # a config that does not compile on this card must not stop the sweep
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        self.rows.append(row)
        shown = f"{row['ms']:.3f} ms" if "ms" in row else row["error"]
        print(f"{stage:<22} {case.name:<26} {variant:<34} {shown}", flush=True)

    def breakdown(self, case, deterministic):
        """One row per kernel (and torch op) of a forward and backward at the defaults: its GPU time."""
        mode = "det" if deterministic else "fast"
        if time.monotonic() > self.deadline:
            self.rows.append(dict(stage=BREAKDOWN, case=case.name, variant=mode, error="skipped: --max-minutes reached"))
            return
        try:
            times = kernel_times(self.bench(case), deterministic)
        except Exception as exc:  # diagnostics only: the sweep goes on
            self.rows.append(dict(stage=BREAKDOWN, case=case.name, variant=mode, error=f"{type(exc).__name__}: {exc}"[:200]))
            return
        for name, ms in times.items():
            self.rows.append(dict(stage=BREAKDOWN, case=case.name, variant=f"{mode}: {name}", ms=ms))
            print(f"{BREAKDOWN:<22} {case.name:<26} {mode + ': ' + name:<34} {ms:.3f} ms", flush=True)


BWD = FORWARD_AND_BACKWARD_FACTOR - 1.0  # useful backward work over the forward's
BREAKDOWN = "kernel times"  # rows of one pass each, not variants of one choice


def kernel_times(bench, deterministic, iters=5):
    """GPU milliseconds per kernel name over one forward and backward (torch.profiler): which pass
    limits the whole."""
    from torch.profiler import ProfilerActivity, profile

    problem = bench.problem()

    def step():
        out, lse = kernel_forward(bench.q, bench.k, bench.v, problem)
        kernel.backward(bench.do, bench.q, bench.k, bench.v, out, lse, None, problem, deterministic)

    step()  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us > 0:
            times[event.key[:34]] = us / iters / 1e3
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def forward_timer(bench):
    return bench.time_forward()


def triton_forward_timer(bench):
    """The Triton forward, also where kernel_hopper's would serve (Hopper, head dim 128)."""
    return bench.time_forward(kernel.forward)


def hopper_forward_timer(bench):
    """kernel_hopper's forward, refusing to time another one where it does not apply."""
    hopper = _hopper_kernel()
    problem = bench.problem()
    if not hopper.applies(bench.q, bench.k, bench.v, problem):
        raise RuntimeError("kernel_hopper does not apply to this case on this GPU / Triton")
    return bench.time_forward(kernel_forward)


def tma_timer(bench):
    """The Triton forward, refusing to time pointer loads as descriptor loads (no Hopper, older
    Triton)."""
    if kernel.TMA_LOADS and not kernel.use_tma(bench.k, bench.v):
        raise RuntimeError("tensor descriptors unavailable on this GPU / Triton")
    return bench.time_forward(kernel.forward)


def backward_timer(deterministic):
    return lambda bench: bench.time_backward(deterministic)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-minutes", type=float, default=6.5, help="start no variant after this")
    parser.add_argument("--out", default="runs/tune_kernel")
    parser.add_argument("--spills-only", metavar="SM", type=int, default=None,
                        help="only compile the default configs for this compute capability (90: Hopper) and "
                             "print their registers and spills; needs no GPU")
    parser.add_argument("--ablate", action="store_true",
                        help="time the kernel with one stage left out at a time instead (module docstring)")
    args = parser.parse_args(argv)
    if args.spills_only:
        print_spills(divmod(args.spills_only, 10))
        return
    if args.ablate:
        run_ablations(args.out)
        return
    sweep = Sweep(args.max_minutes)
    mha128, mha64 = Case(32768), Case(32768, dim=64)
    gqa_cases = [Case(32768, kv_heads=8, head_pattern=p) for p in ("heterogeneous", "kv_group")]
    kv_group_128k = Case(131072, kv_heads=8, head_pattern="kv_group")

    # Most open questions first (--max-minutes cuts the tail).
    # 1. Backward modes at the defaults (the question of DETERMINISTIC_BY_DEFAULT).
    for case in (mha128, Case(131072), mha64, *gqa_cases):
        sweep.run("forward (default)", case, "default", forward_timer, 1.0)
        for deterministic in (True, False):
            name = "deterministic" if deterministic else "fast"
            sweep.run("backward mode", case, name, backward_timer(deterministic), BWD)
    if _hopper_kernel() is not None:
        for case in (mha128, Case(131072), gqa_cases[1]):
            sweep.run("Hopper forward", case, "Gluon", hopper_forward_timer, 1.0)
            sweep.run("Hopper forward", case, "Triton", triton_forward_timer, 1.0)
    # 2. The deterministic backward's dQ: from the dS the dK/dV pass stored (descriptor or pointer
    # stores, one chunk or chunks of 8 GiB) against recomputed in the dQ pass.
    for case in (mha128, Case(131072), mha64, gqa_cases[1]):
        sweep.run("det dQ", case, "stored dS", backward_timer(True), BWD)
        sweep.run("det dQ", case, "stored dS, pointer stores", backward_timer(True), BWD, TMA_DS_STORE=False)
        sweep.run("det dQ", case, "recomputed dS", backward_timer(True), BWD, STORED_DS_BYTES=0)
    sweep.run("det dQ", Case(131072), "stored dS, one chunk", backward_timer(True), BWD, STORED_DS_BYTES=48 << 30)
    # 3. The fast backward's dQ adds: one descriptor reduction per step against per-element atomics.
    for case in (mha128, mha64, gqa_cases[1]):
        for reduce in (True, False):
            sweep.run("fast dQ adds", case, "TMA reduce" if reduce else "atomics", backward_timer(False), BWD,
                      TMA_REDUCE=reduce)
    # 4. Tensor-descriptor (TMA) against pointer loads in the inner loops (Hopper and newer).
    for case in (mha128, mha64, Case(131072)):
        for tma in (False, True):
            name = "descriptors" if tma else "pointers"
            sweep.run("TMA loads (fwd)", case, name, tma_timer, 1.0, TMA_LOADS=tma)
            sweep.run("TMA loads (det bwd)", case, name, backward_timer(True), BWD, TMA_LOADS=tma)
            sweep.run("TMA loads (fast bwd)", case, name, backward_timer(False), BWD, TMA_LOADS=tma)
    # Descriptor loads of Q/dO in the dK/dV pass (TMA_KEY_PASS, off), every config (more stages
    # give the indirect loads more buffers).
    run_config_list(sweep, mha128, "dkdv descriptors (det)", kernel._dkdv, backward_timer(True), BWD,
                    TMA_KEY_PASS=True)
    run_config_list(sweep, mha128, "fused descriptors", kernel._fused, backward_timer(False), BWD,
                    TMA_KEY_PASS=True)
    # 5. Where the time goes: GPU time of each kernel of one forward and backward.
    for case in (mha128, mha64, gqa_cases[1]):
        for deterministic in (True, False):
            sweep.breakdown(case, deterministic)
    # 6. Launch configs and tile rows: the fused pass, then head dim 64 (issue: slower than DKernel),
    # then the head-dim-128 lists that were tuned on an H100.
    fwd = ("config fwd", kernel._fwd, triton_forward_timer, 1.0)
    fused = ("config fused (fast)", kernel._fused, backward_timer(False), BWD)
    dkdv = ("config dkdv (det)", kernel._dkdv, backward_timer(True), BWD)
    dq = ("config dq recomputing (det)", kernel._dq, backward_timer(True), BWD)
    dq_stored = ("config dq stored (det)", kernel._dq_stored, backward_timer(True), BWD)
    run_config_list(sweep, mha128, *fused)
    run_config_list(sweep, mha64, *fused)
    run_config_list(sweep, mha64, *fwd)
    run_config_list(sweep, mha64, *dkdv)
    # 7. GQA: dK/dV programs per query head or per KV group (SPLIT_HEADS, per mode).
    for case in gqa_cases + [kv_group_128k]:
        for deterministic in (False, True):
            mode = "deterministic" if deterministic else "fast"
            stage = "GQA dK/dV " + ("(det)" if deterministic else "(fast)")
            for split, name in ((False, "per group"), (True, "per head")):
                sweep.run(stage, case, name, backward_timer(deterministic), BWD,
                          SPLIT_HEADS={**kernel.SPLIT_HEADS, mode: split})
    # 8. GQA packing of the forward and dQ programs (kv_group heads share their lists).
    for case in (gqa_cases[1], kv_group_128k):
        for pack in (False, True):
            name = "packed" if pack else "one head"
            sweep.run("GQA packing (fwd)", case, name, forward_timer, 1.0, PACK_GQA=pack)
    run_tile_rows(sweep, mha128)
    for stage in (fwd, dkdv, dq_stored):
        run_config_list(sweep, mha128, *stage)
    run_config_list(sweep, mha64, *dq_stored)
    run_config_list(sweep, mha128, *dq, STORED_DS_BYTES=0)  # the recomputing dQ pass: the fallback
    print_spills()
    report(sweep.rows, args.out)


def run_config_list(sweep, case, stage, launcher, timer, factor, **module_values):
    """Every config of ``launcher``'s list for the case's head dim, each moved to the front in turn."""
    which = kernel.head_dim_index(case.dim)
    for index, config in enumerate(launcher.config_lists[which]):
        sweep.run(stage, case, _label(config), timer, factor, launcher=launcher, index=index, dim=case.dim,
                  **module_values)


def run_tile_rows(sweep, case):
    """128- against 64-row key tiles (both backwards) and forward query tiles. A forward config list
    serves its FORWARD_TILE_ROWS with its first config; for the other row count, the first config with
    a warpgroup (4 warps) per 64 rows."""
    cls = kernel.head_dim_class(case.dim)
    configs = kernel._fwd.config_lists[kernel.head_dim_index(case.dim)]
    for rows in (128, 64):
        key_rows = {**kernel.KEY_TILE_ROWS, cls: rows}
        sweep.run("key tile rows (fast)", case, str(rows), backward_timer(False), BWD, KEY_TILE_ROWS=key_rows)
        sweep.run("key tile rows (det)", case, str(rows), backward_timer(True), BWD, KEY_TILE_ROWS=key_rows)
        index = 0 if rows == kernel.FORWARD_TILE_ROWS[cls] else next(
            i for i, config in enumerate(configs) if config.num_warps * 16 == rows)
        sweep.run("query tile rows (fwd)", case, f"{rows} ({_label(configs[index])})", triton_forward_timer, 1.0,
                  launcher=kernel._fwd, index=index, dim=case.dim,
                  FORWARD_TILE_ROWS={**kernel.FORWARD_TILE_ROWS, cls: rows})


# Stage ablations: name -> [(text in kernel.py, replacement)], each text found exactly once.
_NO_MASKED_FORWARD_LOOP = ("v_src, ENTRIES, e_mid, e_hi, qk_scale,", "v_src, ENTRIES, e_mid, e_mid, qk_scale,")
_NO_UNMASKED_FORWARD_LOOP = ("ENTRIES, e_lo, e_mid, qk_scale,", "ENTRIES, e_mid, e_mid, qk_scale,")
FORWARD_ABLATIONS = {
    "without the masked entries": [_NO_MASKED_FORWARD_LOOP],
    "the masked entries only": [_NO_UNMASKED_FORWARD_LOOP],
    "set-up and output only (no entries)": [_NO_UNMASKED_FORWARD_LOOP, _NO_MASKED_FORWARD_LOOP],
    "K/V of two units only (cache hits)": [("row0 = (entry >> FLAG_BITS) * UNIT\n    s = tl.dot(q, tl.trans(",
                                           "row0 = ((entry >> FLAG_BITS) & 1) * UNIT\n    s = tl.dot(q, tl.trans(")],
    "without exp2 (descriptor loops)": [("p0 = tl.math.exp2(s0 * scale - m_new[:, None])",
                                         "p0 = s0 * scale - m_new[:, None]")],
    "without the PV product (descriptor loops)": [
        ("acc = tl.dot(p0.to(v0.dtype), v0, acc, input_precision=DOT_PREC)", "acc = acc + tl.sum(p0, 1)[:, None]")],
}
KEY_PASS_ABLATIONS = {
    "dK/dV pass without the masked entries": [("stride_ds, stride_as, ENTRIES, e_lo, e_stop, e_mid, e_hi,",
                                               "stride_ds, stride_as, ENTRIES, e_lo, e_stop, e_hi, e_hi,")],
    "dK/dV pass without its dS stores (dQ pass reads garbage)": [("            if STORE_DS:  # a block per entry",
                                                                  "            if False:  # a block per entry")],
    "dK/dV pass with Q/dO of two units only": [("q_row0 = (entry >> FLAG_BITS) * UNIT + sub * QSTEP",
                                                "q_row0 = ((entry >> FLAG_BITS) & 1) * UNIT + sub * QSTEP")],
    "dK/dV pass without exp2": [
        ("pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse2[None, :])",
         "pt = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse2[None, :]")],
}
# The fast backward's dK/dV pass at head dim 128 costs more than the two deterministic passes: how
# much of it is the dQ product, how much its descriptor reductions (the product is kept behind a
# branch that never runs: the compiler cannot drop it).
FAST_PASS_ABLATIONS = {
    "fast pass without the dQ adds": [
        ("dq_desc.atomic_add([q_row0, 0], dq * sm_scale)",
         "if q_row0 < 0:\n" + " " * 20 + "dq_desc.atomic_add([q_row0, 0], dq * sm_scale)")],
    "fast pass without dQ (product and adds)": [("dq_desc.atomic_add([q_row0, 0], dq * sm_scale)", "pass")],
}


def ablated_source(name, edits) -> str:
    """``kernel.py`` with ``edits`` applied, importable from outside the package."""
    with open(kernel.__file__) as f:
        text = f.read()
    for old, new in edits:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"ablation {name!r}: {old!r} occurs {count} times in {kernel.__file__}, not once; "
                             "update the edit to the kernel's current source")
        text = text.replace(old, new)
    return text.replace("from .layout import", "from megatron_s2.ops.layout import")


def load_ablated_kernel(name, edits, directory):
    """The edited kernel module, imported from ``directory``, which must outlive its compiles
    (Triton reads a kernel's source when it first compiles it)."""
    module_name = "s2_kernel_ablation_" + "".join(c if c.isalnum() else "_" for c in name)
    path = os.path.join(directory, module_name + ".py")
    with open(path, "w") as f:
        f.write(ablated_source(name, edits))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_ablations(out):
    """Every ablation timed against the full kernel, same process; prints each change."""
    for name, edits in {**FORWARD_ABLATIONS, **KEY_PASS_ABLATIONS, **FAST_PASS_ABLATIONS}.items():
        ablated_source(name, edits)  # every edit still matches, before any GPU work
    sweep = Sweep(max_minutes=10)
    stages = [("forward", case, kernel._fwd, "_fwd_kernel", triton_forward_timer, 1.0, FORWARD_ABLATIONS)
              for case in (Case(32768), Case(131072), Case(32768, dim=64))]
    stages.append(("backward", Case(32768), kernel._dkdv, "_bwd_dkdv_kernel", backward_timer(True), BWD,
                   KEY_PASS_ABLATIONS))
    stages.append(("fast bwd", Case(32768), kernel._fused, "_bwd_dkdv_kernel", backward_timer(False), BWD,
                   FAST_PASS_ABLATIONS))
    with tempfile.TemporaryDirectory() as directory:
        for stage, case, launcher, kernel_name, timer, factor, ablations in stages:
            for name, edits in {"full": [], **ablations}.items():
                saved = launcher.kernel
                try:
                    if edits:
                        launcher.kernel = getattr(load_ablated_kernel(name, edits, directory), kernel_name)
                    sweep.run(stage, case, name, timer, factor)
                finally:
                    launcher.kernel = saved
    meta = write_rows(sweep.rows, out, "ablate_kernel.json")
    print(f"\n{meta['card']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    full = {}
    for r in sweep.rows:
        if r["variant"] == "full" and "ms" in r:
            full[r["stage"], r["case"]] = r["ms"]
        base = full.get((r["stage"], r["case"]))
        shown = f"{r['ms']:8.3f} ms" if "ms" in r else r["error"][:60]
        change = f"  {100 * (r['ms'] / base - 1):+4.0f}%" if "ms" in r and base else ""
        print(f"{r['stage']:<9} {r['case']:<12} {r['variant']:<40} {shown}{change}")


# Pointer arguments of the kernels (bf16 inputs; the rest are int32 scalars unless listed).
_ARG_TYPES = {**{n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "DS")},
              **{n: "*fp32" for n in ("DQ_ACC", "LSE", "DELTA", "DK_PART", "DV_PART")},
              **{n: "*i32" for n in ("T_PTR", "T_NFULL", "ENTRIES", "T_UNITS", "ORDER", "CU_Q", "CU_K", "DS_INDEX")},
              "qk_scale": "fp32", "sm_scale": "fp32"}


def compile_report(fn, constants, capability, num_warps, num_stages=1, maxnreg=None, arg_types=None):
    """``(shared memory bytes, ptxas's lines on registers, spills and warnings)`` of the kernel
    ``fn`` (Triton or Gluon) compiled for ``capability`` (e.g. (9, 0)): compiling needs no GPU."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = dict(_ARG_TYPES, **(arg_types or {}))
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in fn.arg_names}
    # What a launch tells the compiler: pointers 16-byte aligned and strides multiples of 16
    # (bf16 [batch, seq, heads, dim >= 64] tensors). Without it loads look unaligned, are not
    # vectorized or pipelined, and the registers differ from the launched kernel's.
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if signature[n].startswith("*") or n.startswith("stride_")}
    source = ASTSource
    if fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    major, minor = capability
    compiled = triton.compile(source(fn=fn, signature=signature, constexprs=constants, attrs=aligned),
                              target=GPUTarget("cuda", major * 10 + minor, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        arch = "sm_%d%d%s" % (major, minor, "a" if major >= 9 else "")
        log = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    details = [line.split(":", 1)[-1].strip() for line in log.splitlines()
               if any(word in line for word in ("registers", "spill", "arning", "serialized", "rror"))]
    return compiled.metadata.shared, details


def hopper_forward_report(pack=1, varlen=False, resume=False):
    """``compile_report`` of kernel_hopper's forward for sm_90 (128-row tiles of ``pack`` heads)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from megatron_s2.ops import kernel_hopper as hopper

    def box(shape):
        cpu = torch.empty(1, 512, 4, hopper.HEAD_DIM, dtype=torch.bfloat16)  # only the type string is used
        layout = hopper.descriptor_layout()
        return mangle_type(TensorDescriptor(cpu, list(cpu.shape), list(cpu.stride()), shape, layout))

    positions = hopper.TILE_ROWS // pack
    constants = dict(HEAD_DIM=hopper.HEAD_DIM, UNIT=64, MERGE=max(1, positions // 64), PACK=pack, POS=positions,
                     VARLEN=varlen, RESUME=resume, STAGES=hopper.STAGES, PRODUCER_REGS=hopper.PRODUCER_REGISTERS,
                     CONSUMER_REGS=hopper.CONSUMER_REGISTERS)
    unit_box = box([1, 64, 1, hopper.HEAD_DIM])
    types = dict(q_desc=box([1, hopper.WG_ROWS.value // pack, pack, hopper.HEAD_DIM]), k_desc=unit_box,
                 v_desc=unit_box)
    return compile_report(hopper._fwd_kernel, constants, (9, 0), num_warps=4, maxnreg=hopper.MAX_REGISTERS,
                          arg_types=types)


def print_spills(capability=None):
    """Shared memory, registers and spills (ptxas) of each kernel's default config for this GPU (or
    ``capability``, e.g. (9, 0): compiled only, no GPU needed) and Triton, head dims 64 and 128,
    128-row tiles of 64-token units: spills in the hot loops cost speed, and shared memory and
    registers decide how many programs share an SM. ptxas warnings (e.g. serialized products) show."""
    capability = capability or torch.cuda.get_device_capability()
    print("\nptxas registers and spills of the default configs (sm_%d%d):" % capability)
    for dim in (64, 128):
        which = kernel.head_dim_index(dim)
        shape = dict(HEAD_DIM=dim, UNIT=64, MERGE=2, VARLEN=False, DOT_PREC="tf32")
        query = dict(shape, PACK=1, POS=128, TMA=kernel.TMA_LOADS)
        forward_rows = kernel.FORWARD_TILE_ROWS[dim]
        forward = dict(query, MERGE=forward_rows // 64, POS=forward_rows, RESUME=False)
        key = dict(shape, TMA=kernel.TMA_KEY_PASS, ITEMS="group")  # MHA: programs per (KV) head
        for name, launcher, constants in (("fwd", kernel._fwd, forward),
                                          ("dq", kernel._dq, query),
                                          ("dq_stored", kernel._dq_stored, dict(query, TILE=128)),
                                          ("dkdv", kernel._dkdv, dict(key, FUSED_DQ=False, DQ_REDUCE=False,
                                                                      STORE_DS=True, DS_TMA=kernel.TMA_DS_STORE)),
                                          ("fused", kernel._fused, dict(key, FUSED_DQ=True, DQ_REDUCE=kernel.TMA_REDUCE,
                                                                        STORE_DS=False, DS_TMA=False))):
            config = launcher.config_lists[which][0]
            try:
                shared, details = compile_report(launcher.kernel, dict(constants, **config.kwargs), capability,
                                                 config.num_warps, config.num_stages, config.maxnreg)
                info = f"smem {shared} " + " ".join(details)
            except Exception as exc:  # diagnostics only
                info = f"{type(exc).__name__}: {exc}"[:120]
            print(f"  d{dim} {name:<5} {_label(config):<28} {info}")
    if capability[0] == 9 and _hopper_kernel() is not None:
        try:
            shared, details = hopper_forward_report()
            info = f"smem {shared} " + " ".join(details)
        except Exception as exc:  # diagnostics only
            info = f"{type(exc).__name__}: {exc}"[:120]
        print(f"  d128 fwd (kernel_hopper, Gluon, 12 warps, r{_hopper_kernel().MAX_REGISTERS}) {info}")


def write_rows(rows, out, filename):
    """``rows`` with the card, versions and date as JSON under ``out``; returns that metadata."""
    os.makedirs(out, exist_ok=True)
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(os.path.join(out, filename), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return meta


def report(rows, out):
    meta = write_rows(rows, out, "tune_kernel.json")
    print(f"\n{meta['card']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    print(f"{'stage':<22} {'case':<26} {'variant':<34} {'ms':>8} {'TF/s':>6}  best")
    groups = {}
    for r in rows:
        groups.setdefault((r["stage"], r["case"]), []).append(r)
    winners = []
    for (stage, case), group in groups.items():
        if stage == BREAKDOWN:
            for r in group:
                shown = f"{r['ms']:8.3f}" if "ms" in r else r["error"][:40]
                print(f"{stage:<22} {case:<26} {r['variant']:<34} {shown}")
            continue
        timed = [r for r in group if "ms" in r]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        for r in group:
            if "ms" not in r:
                print(f"{stage:<22} {case:<26} {r['variant']:<34} {r['error'][:40]}")
                continue
            mark = "  <== best" if r is best else ""
            print(f"{stage:<22} {case:<26} {r['variant']:<34} {r['ms']:8.3f} {r['useful_tflops']:6.0f}{mark}")
        if best is not None and len(timed) > 1:
            first = group[0]
            gain = first["ms"] / best["ms"] if "ms" in first else float("nan")
            winners.append(f"{stage:<22} {case:<26} best {best['variant']:<34} {gain:5.2f}x the first listed")
    print("\nWinners (the first listed variant is today's default; a gain above ~1.03x is worth a change):")
    for line in winners:
        print(line)
    print("\nForward + backward at the default configs, useful TF/s (issue targets: >= 450 fwd, >= 400 f+b):")
    for case in dict.fromkeys(r["case"] for r in rows):
        fwd = groups.get(("forward (default)", case), [{}])[0]
        modes = {r["variant"]: r for r in groups.get(("backward mode", case), []) if "ms" in r}
        if "ms" not in fwd or not modes:
            continue
        both = "  ".join(f"{name} {FORWARD_AND_BACKWARD_FACTOR * fwd['fwd_flops'] / (fwd['ms'] + r['ms']) * 1e-9:4.0f}"
                         f" ({fwd['ms'] + r['ms']:.2f} ms)" for name, r in modes.items())
        print(f"{case:<26} fwd {fwd['useful_tflops']:4.0f} ({fwd['ms']:.2f} ms)  f+b {both}")


if __name__ == "__main__":
    main()
