"""Print a short sample from a checkpoint saved by pretrain_gpt_s2.py (quickstart demo, TP=1).

Takes the same flags as the training run (the model is rebuilt from them and --load), plus:

    --prompt TEXT            text to continue (default: "The ")
    --sample-tokens N        tokens to generate (default: 200)
    --temperature T          sampling temperature (default: 0.8; 0 = greedy)

    python examples/generate_sample.py --s2-config configs/quickstart.yaml \
        --load checkpoints/quickstart --prompt "The "

Plain autoregressive sampling that re-reads the whole window each step: fine for a demo, not a
serving path (see docs/hf.md for generation with Hugging Face and the S2 KV cache).
"""

from __future__ import annotations

import sys

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.training import get_args, get_tokenizer
from megatron.training.checkpointing import load_checkpoint
from megatron.training.initialize import initialize_megatron

from megatron_s2.training import checkpoint_layout, cpu_compat
from megatron_s2.training.arguments import add_s2_arguments
from megatron_s2.training.data import ByteTokenizer
from megatron_s2.training.launch import cli
from megatron_s2.training.model import build_model_config
from megatron_s2.training.seams import use_shipped_dataset_helpers
from megatron_s2.training.startup import prepare_process_and_arguments


def add_sample_arguments(parser):
    add_s2_arguments(parser)
    group = parser.add_argument_group(title="sampling")
    group.add_argument("--prompt", default="The ")
    group.add_argument("--sample-tokens", type=int, default=200)
    group.add_argument("--temperature", type=float, default=0.8)
    return parser


def encode(text: str) -> list:
    args = get_args()
    if args.tokenizer_type == "NullTokenizer":  # the byte-level data of tools/preprocess_data.py
        return ByteTokenizer().encode(text)
    return get_tokenizer().tokenize(text)


def decode(ids: list) -> str:
    args = get_args()
    if args.tokenizer_type == "NullTokenizer":
        return ByteTokenizer().decode(ids)
    return get_tokenizer().detokenize(ids)


@torch.no_grad()
def sample(model, prompt_ids: list, num_tokens: int, temperature: float, vocab_size: int, device) -> list:
    seq_length = get_args().seq_length
    ids = list(prompt_ids)
    generator = torch.Generator(device="cpu").manual_seed(1234)
    for _ in range(num_tokens):
        window = torch.tensor([ids[-seq_length:]], device=device)
        positions = torch.arange(window.shape[1], device=device).unsqueeze(0)
        logits = model(window, positions, None)[0, -1, :vocab_size].float().cpu()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(next_id)
        if next_id == get_tokenizer().eod:
            break
    return ids[len(prompt_ids):]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the weights are needed: no optimizer or RNG state, one sequence at a time.
    argv += ["--no-load-optim", "--no-load-rng", "--micro-batch-size", "1", "--global-batch-size", "1"]
    args, s2_config = prepare_process_and_arguments(argv, extra_args_provider=add_sample_arguments)
    cpu = cpu_compat.cpu_mode_requested()
    if not args.load:
        raise SystemExit("error: --load CHECKPOINT_DIR is required")
    # Megatron would go on from random weights when --load holds no checkpoint: refuse instead.
    if checkpoint_layout.check_resume(args, s2_config) is None:
        raise SystemExit(f"error: --load {args.load} holds no checkpoint. Fix: give the --save folder "
                         "of a finished pretrain_gpt_s2.py run")
    use_shipped_dataset_helpers()
    initialize_megatron(allow_no_cuda=cpu)

    model_config = build_model_config(args, s2_config)
    builder = model_config.get_builder_cls()(model_config)
    model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups())
    device = torch.device("cpu" if cpu else "cuda")
    model = model.to(device)
    if args.bf16:  # the checkpoint holds the bf16 weights the run trained with
        model = model.bfloat16()
    load_checkpoint([model], None, None, strict=True)
    model.eval()

    prompt_ids = encode(args.prompt)
    new_ids = sample(model, prompt_ids, args.sample_tokens, args.temperature, args.vocab_size or
                     get_tokenizer().vocab_size, device)
    if torch.distributed.get_rank() == 0:
        print("\n----- sample -----")
        print(args.prompt + decode(new_ids))
        print("------------------", flush=True)


if __name__ == "__main__":
    cli(main)
