"""End-to-end training speed: an S2 hybrid model against the same model all dense, on one GPU.

Runs ``pretrain_gpt_s2.py`` itself (Megatron's training loop, mock data) once per (sequence length,
variant) and reads its progress lines: tokens/s/GPU, step time and peak memory, as the median over
the steps after a warm-up (kernel autotuning and allocator growth happen in the first steps). The
dense variant is the same config with every layer dense (``--s2-override dense_every_n=1``); dense
layers run PyTorch SDPA, whose default backend on H100 is cuDNN.

    # one H100 (the numbers recorded in BENCHMARKS.md)
    python tools/bench_training.py --config configs/hybrid_1b_32k.yaml --seq-lengths 8192 32768 \
        --output $OUT/bench_training.json

    # CPU smoke test of the script itself (tiny model, seconds per step)
    MEGATRON_S2_CPU=1 python tools/bench_training.py --config configs/quickstart.yaml \
        --seq-lengths 256 --iters 4 --warmup 2

Extra arguments after ``--`` go to every training run (e.g. ``-- --recompute-granularity full``).
At 32k tokens and above the runs use full activation recomputation (``--recompute auto``) so the
1B model fits one 80 GB card; both variants get the same flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pretrain_gpt_s2  # noqa: E402  (its progress-line reader)

VARIANTS = {"s2": [], "dense": ["--s2-override", "dense_every_n=1"]}


def run_once(config: str, seq_length: int, variant: str, iters: int, recompute: bool, extra: list,
             log_path: str) -> list:
    """One training run; returns [(iteration, tokens/s, TFLOP/s, step ms, peak GiB or None)]."""
    command = [
        sys.executable, os.path.join(ROOT, "pretrain_gpt_s2.py"), "--s2-config", config, "--mock-data",
        "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(iters),
        "--lr-warmup-iters", "0", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", str(iters + 1), "--save-interval", str(10 * iters),
    ] + VARIANTS[variant]
    if recompute:
        command += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                    "--recompute-num-layers", "1"]
    command += extra
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    with open(log_path, errors="replace") as log:
        text = log.read()
    if completed.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"{variant} at {seq_length} tokens failed (exit {completed.returncode}); "
                           f"log {log_path}:\n{tail}")
    rows = [(i, float(f["tokens_per_s"].replace(",", "")), float(f["tflops"]), float(f["step_ms"]),
             float(f["peak_gib"]) if f["peak_gib"] else None)
            for i, f in sorted(pretrain_gpt_s2.read_progress(text).items())]
    if len(rows) < iters:
        raise RuntimeError(f"{variant} at {seq_length}: found {len(rows)} progress lines, expected {iters}")
    return rows


def summarize(rows: list, warmup: int) -> dict:
    steady = [r for r in rows if r[0] > warmup]
    peaks = [r[4] for r in rows if r[4] is not None]
    return {
        "tokens_per_s": statistics.median(r[1] for r in steady),
        "tflops_per_gpu": statistics.median(r[2] for r in steady),
        "step_ms": statistics.median(r[3] for r in steady),
        "peak_memory_gib": max(peaks) if peaks else None,
        "steps_measured": len(steady),
    }


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "cpu"


def table(results: list, per: str = "GPU") -> str:
    lines = [f"| seq | variant | tokens/s/{per} | step ms | S2-aware TFLOP/s/{per} | peak GiB | speed-up vs dense |",
             "|---|---|---|---|---|---|---|"]
    dense = {r["seq_length"]: r for r in results if r["variant"] == "dense"}
    for r in results:
        base = dense.get(r["seq_length"])
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {r['seq_length']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | "
                     f"{r['tflops_per_gpu']:.0f} | {peak} | {speedup} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "hybrid_1b_32k.yaml"))
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["dense", "s2"])
    parser.add_argument("--iters", type=int, default=12, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians")
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                        help="full activation recomputation: auto = from 32k tokens on")
    parser.add_argument("--output", default=None, help="JSON results (default: print only)")
    parser.add_argument("--log-dir", default=None, help="where the runs' logs go (default: next to --output)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.warmup >= args.iters:
        parser.error("--warmup must be smaller than --iters")
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file (the S2 configs are in configs/)")
    log_dir = args.log_dir or os.path.dirname(os.path.abspath(args.output or "bench_training.json"))
    os.makedirs(log_dir, exist_ok=True)

    results = []
    for seq_length in args.seq_lengths:
        recompute = args.recompute == "on" or (args.recompute == "auto" and seq_length >= 32768)
        for variant in args.variants:
            started = time.time()
            log_path = os.path.join(log_dir, f"bench_{variant}_{seq_length}.log")
            rows = run_once(args.config, seq_length, variant, args.iters, recompute, extra, log_path)
            result = {"seq_length": seq_length, "variant": variant, "recompute": recompute,
                      **summarize(rows, args.warmup), "wall_s": round(time.time() - started, 1)}
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {"device": device_name(), "config": os.path.relpath(args.config, ROOT),
              "date": time.strftime("%Y-%m-%d"), "extra_args": extra, "results": results}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{report['device']}, {report['config']}, batch 1 sequence per step, median of steps "
          f"{args.warmup + 1}..{args.iters}\n{table(results, 'rank' if report['device'] == 'cpu' else 'GPU')}")
    return results


if __name__ == "__main__":
    main()
