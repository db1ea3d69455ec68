"""Evaluate an exported model (tools/convert_to_hf.py): needle retrieval by greedy decoding and the
loss on held-out text by position range.

    python -m megatron_s2.eval.hf_eval --model runs/quality/s2/hf --out s2_eval.json \
        --lengths 2048 4096 8192 16384 --depths 0 0.25 0.5 0.75 1 --seq-length 8192

Loads the model with ``trust_remote_code=True``, so the S2 layout in its config is what runs
(prefill on the S2 kernel on GPU). Byte-level models only (the experiment's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy
import torch

from megatron_s2.training.data import BYTE_EOD
from megatron_s2.eval.corpus import token_streams
from megatron_s2.eval.needle import needle_grid

HELDOUT_SPLITS = ("valid", "haystack")
POSITION_EDGES = (0, 512, 2048, 4096, 8192, 16384, 65536, 262144)


def load_model(path: str, device: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(device).eval()


def greedy_generator(model, device: str):
    """``generate(prompts, max_new_tokens)`` over Hugging Face's generate(), greedy, batched
    (prompts of one batch have one length: each needle cell's prompts do)."""

    @torch.no_grad()
    def generate(prompts, max_new_tokens):
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prompts of one batch must have the same length")
        ids = torch.tensor([list(p) for p in prompts], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=BYTE_EOD, pad_token_id=BYTE_EOD)
        return out[:, ids.shape[1]:].tolist()

    return generate


@torch.no_grad()
def loss_by_position(model, stream: numpy.ndarray, seq_length: int, num_sequences: int, device: str) -> dict:
    """Mean next-token loss (nats) over ``num_sequences`` consecutive ``seq_length`` windows of
    held-out text, overall and per position range (sparse attention shows a gap late first)."""
    windows = [stream[i * seq_length:(i + 1) * seq_length] for i in range(num_sequences)
               if (i + 1) * seq_length <= stream.size]
    if not windows:
        raise ValueError(f"held-out text ({stream.size} tokens) is shorter than one {seq_length}-token window")
    sums = torch.zeros(seq_length - 1, dtype=torch.float64)
    for window in windows:  # one at a time: long windows, and the logits are kept in float32
        ids = torch.tensor(window.astype(numpy.int64)[None], device=device)
        logits = model(ids).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        sums += losses.sum(0).double().cpu()
    per_position = sums / len(windows)  # entry t: the loss of predicting token t + 1
    result = {"sequences": len(windows), "overall": float(per_position.mean())}
    edges = [e for e in POSITION_EDGES if e < seq_length - 1] + [seq_length - 1]
    result["ranges"] = [{"start": a, "end": b, "loss": float(per_position[a:b].mean())}
                        for a, b in zip(edges, edges[1:])]
    return result


def heldout_streams(heldout_dir, max_bytes) -> dict:
    """``{"valid", "haystack"}`` token arrays: saved by ``save_heldout_streams`` (the quality tool
    does, once for all variants), else read from the corpus (``megatron_s2.eval.corpus``)."""
    if heldout_dir:
        return {split: numpy.load(os.path.join(heldout_dir, f"{split}.npy")) for split in HELDOUT_SPLITS}
    return token_streams(max_bytes)


def save_heldout_streams(streams: dict, heldout_dir: str) -> None:
    os.makedirs(heldout_dir, exist_ok=True)
    for split in HELDOUT_SPLITS:
        numpy.save(os.path.join(heldout_dir, f"{split}.npy"), streams[split])


def evaluate(model_path: str, streams: dict, lengths, depths, samples_per_cell: int, seq_length: int,
             loss_sequences: int, device: str, seed: int = 0, batch_size: int = 8) -> dict:
    """Needle grid and position losses of one exported model on held-out text (``streams``: the
    corpus splits that the training data left out)."""
    model = load_model(model_path, device)
    started = time.time()
    cells = needle_grid(greedy_generator(model, device), streams["haystack"], lengths, depths,
                        samples_per_cell, seed=seed, batch_size=batch_size)
    losses = loss_by_position(model, streams["valid"], seq_length, loss_sequences, device)
    return {"model": model_path, "needle": cells, "heldout_loss": losses,
            "eval_seconds": round(time.time() - started, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported Hugging Face folder")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--lengths", type=int, nargs="+", required=True)
    parser.add_argument("--depths", type=float, nargs="+", required=True)
    parser.add_argument("--samples", type=int, default=20, help="needle samples per cell")
    parser.add_argument("--seq-length", type=int, required=True, help="window of the held-out loss")
    parser.add_argument("--loss-sequences", type=int, default=16)
    parser.add_argument("--heldout-dir", default=None,
                        help="valid.npy/haystack.npy saved by tools/quality_run.py (default: read the corpus)")
    parser.add_argument("--max-corpus-bytes", type=int, default=None, help="corpus cap, without --heldout-dir")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"error: --model {args.model}: no config.json there. Fix: give the folder "
                         "written by tools/convert_to_hf.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    streams = heldout_streams(args.heldout_dir, args.max_corpus_bytes)
    result = evaluate(args.model, streams, args.lengths, args.depths, args.samples, args.seq_length,
                      args.loss_sequences, device, seed=args.seed, batch_size=args.batch_size)
    with open(args.out + ".partial", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".partial", args.out)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
