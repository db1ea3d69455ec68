"""End-to-end training speed through ``pretrain_gpt_s2.py``: S2 against dense, and CP=2 against one GPU.

Runs ``pretrain_gpt_s2.py`` itself (Megatron's training loop, mock data) once per (sequence length,
parallel layout, variant) and reads its progress lines: tokens/s/GPU, step time and peak memory (of
the last rank), as the median over the steps after a warm-up (kernel compilation and allocator growth
happen in the first steps). Variants: ``s2`` is the config as given (for hybrid_1b_32k.yaml the
hybrid), ``dense`` the same model with every layer dense (``--s2-override dense_every_n=1``; dense
layers run PyTorch SDPA, cuDNN on H100/H200), ``all_s2`` every layer S2 (``--s2-override
layers=SS...S``). Parallel layouts: ``cp1`` one GPU, ``cp2`` context parallelism over two GPUs,
``tp2`` tensor parallelism over two GPUs (for comparison). "Scaling" is a row's tokens/s/GPU over the
same variant's ``cp1`` tokens/s/GPU: for CP=2 that is CP=2 tokens/s / (2 x CP=1 tokens/s), 1.0
being perfect.

    # one GPU: S2 hybrid against the same model all dense (the numbers in BENCHMARKS.md)
    python tools/bench_training.py --config configs/hybrid_1b_32k.yaml --seq-lengths 8192 32768 \
        --output $OUT/bench_training.json

    # two GPUs: CP=2 scaling of the hybrid and of all-S2 at 128k and 32k, TP=2 for comparison, the
    # one-GPU runs side by side on the two GPUs, per-layer CP timings first; stops launching runs
    # that would not end within the budget (and cuts one that overruns), then prints the tables
    python tools/bench_training.py --config configs/hybrid_1b_32k.yaml --seq-lengths 131072 32768 \
        --variants s2 all_s2 --parallel cp1 cp2 tp2 --concurrent-single-gpu --iters 5 --warmup 2 \
        --layer-bench --budget-s 400 --output runs/cp_scaling/bench_training.json

    # CPU smoke test of the script itself (tiny model, seconds per step)
    MEGATRON_S2_CPU=1 python tools/bench_training.py --config configs/quickstart.yaml \
        --seq-lengths 256 --iters 4 --warmup 2

Extra arguments after ``--`` go to every training run (e.g. ``-- --recompute-granularity full``).
At 32k tokens and above the runs use full activation recomputation (``--recompute auto``) so the
1B model fits one 80 GB card; every run gets the same flags. Logs go next to ``--output`` (or to
``--log-dir``), one per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Optional

from megatron_s2.core.config import read_config_file
from megatron_s2.training.progress import read_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("s2", "dense", "all_s2")
# Parallel layout -> (GPUs, pretrain_gpt_s2.py flags)
PARALLEL = {
    "cp1": (1, []),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
}
KILL_GRACE_S = 10


def variant_flags(variant: str, num_layers: int) -> list:
    if variant == "dense":
        return ["--s2-override", "dense_every_n=1"]
    if variant == "all_s2":
        return ["--s2-override", "layers=" + "S" * num_layers]
    return []


@dataclasses.dataclass
class Run:
    """One training run and, once finished, its result."""

    seq_length: int
    variant: str
    parallel: str
    log_path: str
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    result: Optional[dict] = None

    @property
    def gpus(self) -> int:
        return PARALLEL[self.parallel][0]

    @property
    def name(self) -> str:
        return f"{self.variant} {self.parallel} {self.seq_length}"


def training_command(config: str, run: Run, num_layers: int, iters: int, recompute: bool, extra: list) -> list:
    script = os.path.join(ROOT, "pretrain_gpt_s2.py")
    launcher = [sys.executable]
    if run.gpus > 1:  # --standalone: a free rendezvous port, so that runs never collide
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.gpus)]
    command = launcher + [
        script, "--s2-config", config, "--mock-data",
        "--seq-length", str(run.seq_length), "--max-position-embeddings", str(run.seq_length),
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(iters),
        "--lr-warmup-iters", "0", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", str(iters + 1), "--save-interval", str(10 * iters),
    ] + PARALLEL[run.parallel][1] + variant_flags(run.variant, num_layers)
    if recompute:
        command += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                    "--recompute-num-layers", "1"]
    return command + extra


def launch(command: list, log_path: str, gpu: Optional[int]) -> subprocess.Popen:
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with open(log_path, "w") as log:
        # A session of its own, so that a run cut by the budget is stopped with all its ranks.
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def wait(process: subprocess.Popen, deadline: Optional[float]) -> bool:
    """Wait for ``process``, stopping it (and its children) at ``deadline``; True if it was cut."""
    try:
        process.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return True


def finish(run: Run, deadline: Optional[float], warmup: int) -> None:
    """Wait for the run (stopping it at ``deadline``) and summarize what it logged."""
    cut = wait(run.process, deadline)
    wall = time.time() - run.started
    with open(run.log_path, errors="replace") as log:
        text = log.read()
    steps = sorted(read_progress(text).items())
    steady = [fields for i, fields in steps if i > warmup]
    if not steady:
        tail = "\n".join(text.splitlines()[-30:])
        why = "cut by the time budget" if cut else f"exit {run.process.returncode}"
        print(f"{run.name}: no step after the warm-up ({why}); log {run.log_path}:\n{tail}", flush=True)
        return
    peaks = [float(f["peak_gib"]) for _, f in steps if f["peak_gib"]]
    run.result = {
        "seq_length": run.seq_length, "variant": run.variant, "parallel": run.parallel, "gpus": run.gpus,
        "tokens_per_s_per_gpu": statistics.median(float(f["tokens_per_s"].replace(",", "")) for f in steady),
        "tflops_per_gpu": statistics.median(float(f["tflops"]) for f in steady),
        "step_ms": statistics.median(float(f["step_ms"]) for f in steady),
        "peak_memory_gib": max(peaks) if peaks else None,
        "steps_measured": len(steady), "cut_by_budget": cut, "exit_code": run.process.returncode,
        "wall_s": round(wall, 1),
    }
    print(json.dumps(run.result), flush=True)


def batches(runs: list, concurrent: bool, gpus: int) -> list:
    """Runs in launch order, grouped: single-GPU runs of one sequence length side by side (one per
    GPU) with ``concurrent``, every other run alone."""
    groups = []
    for run in runs:
        last = groups[-1] if groups else None
        if (concurrent and run.gpus == 1 and last and len(last) < gpus and last[0].gpus == 1
                and last[0].seq_length == run.seq_length):
            last.append(run)
        else:
            groups.append([run])
    return groups


def estimated_wall(group: list, done: list) -> Optional[float]:
    """Wall time of an earlier run of the same layout and length (the variants cost about alike)."""
    walls = [r.result["wall_s"] for r in done if r.result and not (r.result["cut_by_budget"] or r.result["exit_code"])
             for g in group if (r.parallel, r.seq_length) == (g.parallel, g.seq_length)]
    return max(walls) if walls else None


def layer_bench(args, flags: dict, s2_section: dict, log_dir: str, deadline: Optional[float]) -> Optional[str]:
    """``tools/bench_cp.py`` on two GPUs with the model's heads, S2 pattern and exchange; returns its
    table."""
    heads = int(flags["num-attention-heads"])
    kv_heads = int(flags.get("num-query-groups", heads)) if flags.get("group-query-attention") else heads
    head_dim = int(flags.get("kv-channels") or int(flags["hidden-size"]) // heads)
    pattern = {**{"block_size": 64, "local_blocks": 16, "vert_stride": 16, "head_pattern": "heterogeneous"},
               **{k: v for k, v in (s2_section.get("defaults") or {}).items()
                  if k in ("block_size", "local_blocks", "vert_stride", "head_pattern")}}
    out = os.path.join(log_dir, "bench_cp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, "tools", "bench_cp.py"), "--seqs", *map(str, args.seq_lengths),
               "--heads", str(heads), "--kv-heads", str(kv_heads), "--head-dim", str(head_dim),
               "--exchanges", s2_section.get("cp_exchange", "s2"),  # the model's exchange, both schedules
               "--warmup", "2", "--iters", "5", "--cp1", "--out", out]
    for key, value in pattern.items():
        command += ["--" + key.replace("_", "-"), str(value)]
    log_path = os.path.join(log_dir, "bench_cp.log")
    process = launch(command, log_path, None)
    cut = wait(process, deadline)
    with open(log_path, errors="replace") as log:
        lines = log.read().splitlines()
    header = [i for i, line in enumerate(lines) if "-> " in line and "bench_cp.json" in line]
    if process.returncode != 0 or not header:
        why = "cut by the time budget" if cut else f"exit {process.returncode}"
        print(f"per-layer benchmark failed ({why}); log {log_path}:\n" + "\n".join(lines[-30:]), flush=True)
        return None
    return "\n".join(lines[header[-1]:])


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return "cpu"


def table(results: list, per: str = "GPU") -> str:
    lines = [f"| seq | variant | parallel | GPUs | tokens/s/{per} | step ms | S2-aware TFLOP/s/{per} | peak GiB "
             "(last rank) | speed-up vs dense | scaling vs one GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["seq_length"], r["variant"], r["parallel"]): r for r in results}
    for r in results:
        dense = by_key.get((r["seq_length"], "dense", r["parallel"]))
        one_gpu = by_key.get((r["seq_length"], r["variant"], "cp1"))
        speedup = f"{r['tokens_per_s_per_gpu'] / dense['tokens_per_s_per_gpu']:.2f}x" if dense else "-"
        scaling = f"{r['tokens_per_s_per_gpu'] / one_gpu['tokens_per_s_per_gpu']:.0%}" if one_gpu else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        if r["cut_by_budget"] or r["exit_code"]:
            why = "cut" if r["cut_by_budget"] else f"failed, exit {r['exit_code']}"
            steps = f" ({r['steps_measured']} steps, {why})"
        else:
            steps = ""
        lines.append(f"| {r['seq_length']} | {r['variant']} | {r['parallel']}{steps} | {r['gpus']} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['step_ms']:.0f} | {r['tflops_per_gpu']:.0f} | {peak} | "
                     f"{speedup} | {scaling} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "hybrid_1b_32k.yaml"))
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["dense", "s2"])
    parser.add_argument("--parallel", nargs="+", choices=sorted(PARALLEL), default=["cp1"],
                        help="parallel layouts, run in this order for each sequence length (tp2 last)")
    parser.add_argument("--concurrent-single-gpu", action="store_true",
                        help="run the one-GPU runs of a sequence length side by side, one per GPU")
    parser.add_argument("--iters", type=int, default=12, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians")
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                        help="full activation recomputation: auto = from 32k tokens on")
    parser.add_argument("--layer-bench", action="store_true",
                        help="first time one dense and one S2 layer under CP=2 (tools/bench_cp.py)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-time budget: runs that would not end within it are skipped, one that "
                             "overruns is stopped (its finished steps still count)")
    parser.add_argument("--output", default=None, help="JSON results (default: print only)")
    parser.add_argument("--log-dir", default=None, help="where the runs' logs go (default: next to --output)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.warmup >= args.iters:
        parser.error("--warmup must be smaller than --iters")
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file (the S2 configs are in configs/)")
    flags, s2_section = read_config_file(args.config)
    num_layers = int(flags.get("num-layers", 0))
    if "all_s2" in args.variants and not num_layers:
        parser.error(f"--variants all_s2 needs num-layers in {args.config}'s megatron: section")
    log_dir = args.log_dir or os.path.dirname(os.path.abspath(args.output or "bench_training.json"))
    os.makedirs(log_dir, exist_ok=True)
    began = time.time()
    deadline = None if args.budget_s is None else began + args.budget_s
    gpus = 1
    if args.concurrent_single_gpu or max(PARALLEL[p][0] for p in args.parallel) > 1:
        import torch

        if torch.cuda.is_available():  # (without CUDA, ranks are CPU processes: a smoke test)
            gpus = torch.cuda.device_count()
            if max(PARALLEL[p][0] for p in args.parallel) > gpus:
                parser.error(f"--parallel {' '.join(args.parallel)} needs 2 GPUs, found {gpus}")

    layers_table = layer_bench(args, flags, s2_section, log_dir, deadline) if args.layer_bench else None
    # TP=2 is the comparison: its runs come after every CP run, so that a short budget drops them first.
    layout_passes = [[p for p in args.parallel if p != "tp2"], [p for p in args.parallel if p == "tp2"]]
    runs = [Run(seq, variant, parallel, os.path.join(log_dir, f"bench_{variant}_{parallel}_{seq}.log"))
            for layouts in layout_passes for seq in args.seq_lengths for parallel in layouts
            for variant in args.variants]
    skipped = []
    for group in batches(runs, args.concurrent_single_gpu, gpus):
        if deadline is not None:
            estimate = estimated_wall(group, runs)
            if time.time() >= deadline or (estimate is not None and time.time() + estimate > deadline):
                skipped += group
                continue
        for index, run in enumerate(group):
            recompute = args.recompute == "on" or (args.recompute == "auto" and run.seq_length >= 32768)
            command = training_command(args.config, run, num_layers, args.iters, recompute, extra)
            run.process = launch(command, run.log_path, index if len(group) > 1 else None)
            run.started = time.time()
        for run in group:
            finish(run, deadline, args.warmup)

    results = [run.result for run in runs if run.result]
    report = {"device": device_name(), "config": os.path.relpath(args.config, ROOT),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "extra_args": extra,
              "results": results, "skipped": [run.name for run in skipped],
              "wall_s": round(time.time() - began, 1)}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    if layers_table:
        print(f"\nOne layer under CP (tools/bench_cp.py; log {os.path.join(log_dir, 'bench_cp.log')}):\n{layers_table}")
    print(f"\n{report['device']}, {report['config']}, batch 1 sequence per step, median of steps "
          f"{args.warmup + 1}..{args.iters}, {report['wall_s']:.0f} s in all, logs in {log_dir}\n{table(results, 'rank' if report['device'] == 'cpu' else 'GPU')}")
    if skipped:
        print("skipped for the time budget: " + ", ".join(run.name for run in skipped))
    return results


if __name__ == "__main__":
    main()
