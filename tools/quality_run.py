#!/usr/bin/env python3
"""Does an S2 model learn what a dense model learns? Train dense, S2-hybrid, all-S2 and window-only
variants of one small GPT on the same data, then compare held-out loss and needle retrieval.

    python tools/quality_run.py --out runs/quality          # one or two GPUs (~15 GPU-minutes on H200)
    python tools/quality_run.py --out runs/quality_tiny --tiny   # the whole pipeline on CPU, minutes

Each variant is trained by pretrain_gpt_s2.py with the same data, tokens, seed and model size; only
the attention of the layers differs (`--variants` picks some). Every variant is then exported with
tools/convert_to_hf.py and evaluated through the Hugging Face model (megatron_s2.eval.hf_eval):
passkey retrieval by greedy decoding over a grid of context lengths x needle depths, and the loss on
held-out text by position range. Variants run one per GPU at a time. Finished variants are kept
(their eval.json): a second call only runs what is missing (`--force` retrains).

Writes under --out: quality.json, quality.md (the table), loss.png (validation loss curves),
needle_<variant>.png (accuracy heat maps), and per variant its config, logs, checkpoint and export.
Design and published results: docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
import warnings

import yaml

# Importing Megatron warns about Transformer Engine and Apex on every machine without them: true,
# and irrelevant to reading logs and writing datasets.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (is|are) not installed")

from megatron_s2.eval.corpus import plain_documents, token_streams, training_documents
from megatron_s2.eval.hf_eval import save_heldout_streams
from megatron_s2.training.data import BYTE_VOCAB_SIZE, write_indexed_dataset
from megatron_s2.training.progress import read_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("dense", "s2_hybrid", "s2", "window")
# Megatron's periodic evaluations and its final one ("... on validation set"), which reads the next
# validation batches: the last value printed for an iteration is kept.
VALIDATION_LINE = re.compile(r"validation loss at iteration (\d+)(?: on validation set)? \| lm loss value: (\S+)")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the variants share. Only ``layer_letters`` differs between them."""

    seq_length: int
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    block_size: int
    local_blocks: int
    vert_stride: int
    micro_batch: int
    global_batch: int
    train_iters: int
    lr: float
    warmup: int
    eval_interval: int
    eval_iters: int
    lengths: tuple
    depths: tuple
    samples_per_cell: int
    loss_sequences: int
    needle_fraction: float = 0.5   # share of training sequences that carry passkeys
    max_needles: int = 4           # passkeys per such sequence: 1 to this many
    max_corpus_bytes: int = None
    seed: int = 1234

    @property
    def reach(self) -> int:
        """Tokens a window-only model can see back: layers x window."""
        return self.num_layers * self.local_blocks * self.block_size

    @property
    def train_tokens(self) -> int:
        return self.train_iters * self.global_batch * self.seq_length

    def layer_letters(self, variant: str) -> str:
        n = self.num_layers
        return {"dense": "D" * n, "s2": "S" * n, "window": "W" * n,
                "s2_hybrid": "".join("D" if i % 4 == 0 else "S" for i in range(n))}[variant]


# 8 layers x 256-token window = 2k reach at 8k context; 8 heads x stride 8: every block covered.
# Three in four training sequences carry 1-8 passkeys: a passkey gives only a few answer tokens of
# retrieval signal, and the text around it is ordinary text, so a high share costs little.
FULL = Setup(seq_length=8192, num_layers=8, hidden=512, ffn=1536, heads=8, block_size=64,
             local_blocks=4, vert_stride=8, micro_batch=8, global_batch=16, train_iters=900, lr=2e-3,
             warmup=40, eval_interval=60, eval_iters=1,
             lengths=(1024, 2048, 4096, 6144, 8192), depths=tuple(i / 9 for i in range(10)),
             samples_per_cell=20, loss_sequences=32, needle_fraction=0.75, max_needles=8,
             max_corpus_bytes=150_000_000)
# The same pipeline in miniature: 4 layers x 32-token window = 128 reach at 512 context (a needle
# and its question take ~140 tokens, so one passkey per training sequence).
TINY = Setup(seq_length=512, num_layers=4, hidden=64, ffn=128, heads=4, block_size=16, local_blocks=2,
             vert_stride=4, micro_batch=2, global_batch=2, train_iters=6, lr=3e-3, warmup=1,
             eval_interval=3, eval_iters=1, lengths=(256, 512), depths=(0.0, 1.0), samples_per_cell=2,
             loss_sequences=2, max_needles=1, max_corpus_bytes=2_000_000)


def variant_config(setup: Setup, variant: str, gpu: bool) -> dict:
    """The pretrain_gpt_s2.py config file of one variant (megatron: flags, s2: layers)."""
    megatron = {
        "num-layers": setup.num_layers, "hidden-size": setup.hidden, "ffn-hidden-size": setup.ffn,
        "num-attention-heads": setup.heads, "seq-length": setup.seq_length,
        "max-position-embeddings": setup.seq_length, "position-embedding-type": "rope",
        "rotary-base": 1_000_000,  # long contexts want a large RoPE base
        "normalization": "RMSNorm", "swiglu": True, "disable-bias-linear": True,
        "untie-embeddings-and-output-weights": True, "transformer-impl": "local",
        "no-rope-fusion": True, "no-persist-layer-norm": True, "no-gradient-accumulation-fusion": True,
        "no-masked-softmax-fusion": True, "attention-dropout": 0.0, "hidden-dropout": 0.0,
        "no-create-attention-mask-in-dataloader": True,
        "tokenizer-type": "NullTokenizer", "vocab-size": BYTE_VOCAB_SIZE,
        "micro-batch-size": setup.micro_batch, "global-batch-size": setup.global_batch,
        "train-iters": setup.train_iters, "lr": setup.lr, "min-lr": setup.lr / 10,
        "lr-decay-style": "cosine", "lr-warmup-iters": setup.warmup, "weight-decay": 0.1,
        "adam-beta2": 0.95, "clip-grad": 1.0, "seed": setup.seed,
        "log-interval": max(1, setup.eval_interval // 5), "log-throughput": True,
        "eval-interval": setup.eval_interval, "eval-iters": setup.eval_iters,
        "save-interval": setup.train_iters, "num-workers": 1 if gpu else 0,
    }
    if gpu:
        megatron["bf16"] = True
    s2 = {"layers": setup.layer_letters(variant),
          "defaults": {"block_size": setup.block_size, "local_blocks": setup.local_blocks,
                       "vert_stride": setup.vert_stride, "head_pattern": "heterogeneous"}}
    return {"megatron": megatron, "s2": s2}


def setup_record(setup: Setup) -> dict:
    """``setup`` as it reads back from JSON (tuples become lists), to compare with what a run stored."""
    return json.loads(json.dumps(dataclasses.asdict(setup)))


def prepare_data(setup: Setup, data_dir: str) -> dict:
    """Training documents (text with passkeys mixed in) and held-out validation text, once per --out."""
    marker = os.path.join(data_dir, "data.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            counts = json.load(f)
        if counts.get("setup") == setup_record(setup):
            return counts
    streams = token_streams(setup.max_corpus_bytes)
    # One document per training sequence: a needle is always in the same sample as its question.
    num_train = setup.train_iters * setup.global_batch + 2 * setup.global_batch
    train = write_indexed_dataset(
        training_documents(streams["train"], setup.seq_length, num_train, setup.needle_fraction,
                           setup.max_needles, setup.seed), BYTE_VOCAB_SIZE, os.path.join(data_dir, "train"))
    valid = write_indexed_dataset(plain_documents(streams["valid"], setup.seq_length), BYTE_VOCAB_SIZE,
                                  os.path.join(data_dir, "valid"))
    save_heldout_streams(streams, data_dir)  # every variant's evaluation reads these, not the corpus
    counts = {"train": train, "valid": valid, "corpus_bytes": {k: int(v.size) for k, v in streams.items()},
              "setup": setup_record(setup)}
    with open(marker, "w") as f:
        json.dump(counts, f, indent=1)
    return counts


def run_logged(command: list, log_path: str, env: dict) -> None:
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {result.returncode}); end of "
                           f"{log_path}:\n{tail}")


def run_variant(setup: Setup, variant: str, out: str, data_dir: str, gpu_index, force: bool) -> dict:
    """Train, export and evaluate one variant; returns its summary (also written to summary.json)."""
    vdir = os.path.join(out, variant)
    summary_path = os.path.join(vdir, "summary.json")
    if os.path.isfile(summary_path) and not force:
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("setup") == setup_record(setup):
            return summary
    os.makedirs(vdir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if gpu_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    config_path = os.path.join(vdir, "config.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(variant_config(setup, variant, gpu_index is not None), f, sort_keys=False)
    checkpoint, hf_dir = os.path.join(vdir, "checkpoint"), os.path.join(vdir, "hf")
    started = time.time()
    run_logged([sys.executable, "pretrain_gpt_s2.py", "--s2-config", config_path,
                "--train-data-path", os.path.join(data_dir, "train"),
                "--valid-data-path", os.path.join(data_dir, "valid"),
                "--save", checkpoint, "--tensorboard-dir", os.path.join(vdir, "tensorboard")],
               os.path.join(vdir, "train.log"), env)
    train_seconds = time.time() - started
    run_logged([sys.executable, "tools/convert_to_hf.py", "--load", checkpoint, "--out", hf_dir, "--overwrite"],
               os.path.join(vdir, "export.log"), env)
    eval_path = os.path.join(vdir, "eval.json")
    run_logged([sys.executable, "-m", "megatron_s2.eval.hf_eval", "--model", hf_dir, "--out", eval_path,
                "--lengths", *map(str, setup.lengths), "--depths", *map(str, setup.depths),
                "--samples", str(setup.samples_per_cell), "--seq-length", str(setup.seq_length),
                "--loss-sequences", str(setup.loss_sequences), "--batch-size", str(setup.samples_per_cell),
                "--heldout-dir", data_dir],
               os.path.join(vdir, "eval.log"), env)
    with open(os.path.join(vdir, "train.log")) as f:
        log = f.read()
    with open(eval_path) as f:
        evaluation = json.load(f)
    summary = summarize(setup, variant, log, evaluation, train_seconds)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize(setup: Setup, variant: str, log: str, evaluation: dict, train_seconds: float) -> dict:
    curve = sorted({int(i): float(v) for i, v in VALIDATION_LINE.findall(log)}.items())
    if not curve:
        raise RuntimeError(f"{variant}: no validation loss in its training log")
    rates = [float(fields["tokens_per_s"].replace(",", "")) for i, fields in read_progress(log).items()
             if i > setup.eval_interval // 5]  # the first interval includes compilation
    cells = evaluation["needle"]
    beyond = [c for c in cells if c["mean_distance"] > setup.reach]
    within = [c for c in cells if c["mean_distance"] <= setup.reach]

    def mean_exact(group):
        return sum(c["exact"] for c in group) / len(group) if group else None

    return {
        "variant": variant, "layers": setup.layer_letters(variant), "train_tokens": setup.train_tokens,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "validation_curve": curve, "validation_loss": curve[-1][1],
        "heldout_loss": evaluation["heldout_loss"], "needle": cells,
        "needle_exact": mean_exact(cells), "needle_exact_beyond_reach": mean_exact(beyond),
        "needle_exact_within_reach": mean_exact(within), "window_reach_tokens": setup.reach,
        "setup": setup_record(setup),
    }


def run_all(setup: Setup, variants: list, out: str, data_dir: str, gpus: int, force: bool) -> dict:
    """Variants run one per GPU at a time (on CPU: one after another)."""
    todo = queue.Queue()
    for variant in variants:
        todo.put(variant)
    results, errors = {}, []

    def worker(gpu_index):
        while True:
            try:
                variant = todo.get_nowait()
            except queue.Empty:
                return
            where = "CPU" if gpu_index is None else f"GPU {gpu_index}"
            print(f"[quality] {variant}: training, export, evaluation on {where}", flush=True)
            try:
                results[variant] = run_variant(setup, variant, out, data_dir, gpu_index, force)
                print(f"[quality] {variant}: done ({results[variant]['train_seconds']:.0f} s training)", flush=True)
            except Exception as err:  # the other variants go on; reported at the end
                errors.append(f"{variant}: {err}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in (range(gpus) if gpus else [None])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit("error: " + "\n".join(errors))
    return {v: results[v] for v in variants}


# -- report ----------------------------------------------------------------------------------------


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2)


def markdown_table(setup: Setup, results: dict) -> str:
    dense = results.get("dense")
    ranges = next(iter(results.values()))["heldout_loss"]["ranges"]
    head = ["variant", "layers", "tokens/s", "val loss", "vs dense", "held-out bpb"]
    head += [f"bpb {r['start']}-{r['end']}" for r in ranges]
    head += ["needle (all)", f"needle > {setup.reach} tok", f"needle <= {setup.reach} tok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    for name, r in results.items():
        gap = f"{100 * (r['validation_loss'] / dense['validation_loss'] - 1):+.2f}%" if dense else "n/a"
        row = [name, r["layers"], f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a",
               f"{r['validation_loss']:.4f}", gap, f"{bits_per_byte(r['heldout_loss']['overall']):.4f}"]
        row += [f"{bits_per_byte(x['loss']):.4f}" for x in r["heldout_loss"]["ranges"]]
        row += [pct(r["needle_exact"]), pct(r["needle_exact_beyond_reach"]), pct(r["needle_exact_within_reach"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(setup: Setup, results: dict, path: str) -> None:
    """Validation loss against training tokens; beside it, each variant relative to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = setup.global_batch * setup.seq_length / 1e6
    dense = dict(results["dense"]["validation_curve"]) if "dense" in results else None
    fig, axes = plt.subplots(1, 2 if dense else 1, figsize=(11 if dense else 6, 4), squeeze=False)
    for name, r in results.items():
        steps, losses = zip(*r["validation_curve"])
        axes[0, 0].plot([s * tokens_per_step for s in steps], losses, marker=".", label=name)
        if dense:
            shared = [s for s in steps if s in dense]
            axes[0, 1].plot([s * tokens_per_step for s in shared],
                            [100 * (dict(r["validation_curve"])[s] / dense[s] - 1) for s in shared],
                            marker=".", label=name)
    axes[0, 0].set_ylabel("validation loss (nats/byte)")
    axes[0, 0].set_title("Held-out validation loss (same tokens, seed and data)")
    if dense:
        axes[0, 1].axhline(0, color="grey", lw=0.8)
        axes[0, 1].set_ylabel("vs dense (%)")
        axes[0, 1].set_title("Relative to dense")
    for ax in axes[0]:
        ax.set_xlabel("training tokens (M)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_needle(setup: Setup, name: str, result: dict, path: str) -> None:
    """Depth x length heat map of exact-match accuracy; '*' marks needles beyond the window reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy

    cells = {(c["length"], round(c["depth"], 6)): c for c in result["needle"]}
    lengths = sorted({c["length"] for c in result["needle"]})
    depths = sorted({round(c["depth"], 6) for c in result["needle"]})
    grid = numpy.array([[cells[(n, d)]["exact"] for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2, 0.45 * len(depths) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            mark = "*" if cells[(n, d)]["mean_distance"] > setup.reach else ""
            ax.text(j, i, f"{100 * grid[i, j]:.0f}{mark}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{name} ({result['layers']}): passkey exact match %\n* = beyond {setup.reach}-token window reach",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(setup: Setup, results: dict, out: str, hardware: str) -> str:
    table = markdown_table(setup, results)
    report = {"hardware": hardware, "date": time.strftime("%Y-%m-%d"), "setup": dataclasses.asdict(setup),
              "variants": results}
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(f"{hardware}, {report['date']}; {setup.train_tokens:,} training tokens per variant, "
                f"context {setup.seq_length}, window reach {setup.reach} tokens.\n\n{table}")
    plot_losses(setup, results, os.path.join(out, "loss.png"))
    for name, result in results.items():
        plot_needle(setup, name, result, os.path.join(out, f"needle_{name}.png"))
    return table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (finished variants in it are reused)")
    parser.add_argument("--tiny", action="store_true", help="the whole pipeline in miniature, on CPU in minutes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--train-iters", type=int, default=None, help="override the training length")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use, one variant each (default: all)")
    parser.add_argument("--force", action="store_true", help="retrain variants that already finished")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"error: --variants {args.variants}: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    setup = TINY if args.tiny else FULL
    if args.train_iters:
        setup = dataclasses.replace(setup, train_iters=args.train_iters,
                                    warmup=max(1, min(setup.warmup, args.train_iters // 10)))
    import torch

    available = torch.cuda.device_count()
    gpus = 0 if args.tiny else min(args.gpus if args.gpus is not None else available, available)
    if not args.tiny and gpus == 0:
        raise SystemExit("error: the full experiment needs a GPU (about 15 GPU-minutes on an H200). "
                         "Fix: run it on a GPU host, or use --tiny for the pipeline on CPU")
    hardware = torch.cuda.get_device_name(0) if gpus else "CPU"
    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, "data")
    started = time.time()
    counts = prepare_data(setup, data_dir)
    print(f"[quality] data: {counts['train']['tokens']:,} training tokens, {counts['valid']['tokens']:,} "
          f"validation tokens ({time.time() - started:.0f} s)", flush=True)
    results = run_all(setup, variants, args.out, data_dir, gpus, args.force)
    table = write_report(setup, results, args.out, hardware)
    print(table, flush=True)
    print(f"[quality] report: {args.out}/quality.md, quality.json, loss.png, needle_*.png "
          f"({time.time() - started:.0f} s in all)", flush=True)
    return results


if __name__ == "__main__":
    main()
