#!/usr/bin/env python3
"""Llama-architecture Hugging Face checkpoint -> Megatron checkpoint for pretrain_gpt_s2.py.

    python tools/convert_from_hf.py --hf meta-llama-folder --save checkpoints/llama_s2 \\
        --tensor-parallel 2 --s2-config configs/s2.yaml

writes a torch_dist ``release`` checkpoint (model weights only, Megatron's layout) with the chosen S2
layer settings stored in its arguments, and prints the pretrain_gpt_s2.py flags that describe the
model. Continue training with ``--load <save> --finetune`` (or ``--no-load-optim --no-load-rng``).
The S2 settings default to the ``s2_layers`` of an ``s2_llama`` folder, else all layers dense. The
checkpoint folder appears only once complete; an existing non-empty one is replaced only with
``--overwrite``.
Supported: Llama (and Mistral without sliding window) with RMSNorm, SwiGLU, RoPE (default or llama3
scaling), GQA, tied or untied embeddings, no biases, no MoE; anything else is refused, naming why.
"""

import argparse
import glob
import json
import os

import torch


from megatron_s2.core.config import S2AttentionConfig
from megatron_s2.hf import checkpoints, convert, megatron_model, weight_mapping


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model folder (config.json + *.safetensors)")
    parser.add_argument("--save", required=True, help="Megatron checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --save if it already holds files")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="TP size of the training run")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="PP size of the training run")
    parser.add_argument("--s2-config", default=None,
                        help="the training run's --s2-config (configs/*.yaml) or an S2-only YAML (docs/megatron.md)")
    parser.add_argument("--s2-override", action="append", default=[], help="key=value override of the S2 config")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="as in the training run; the vocabulary is padded like Megatron pads it")
    return parser.parse_args(argv)


def read_hf_config(folder):
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"--hf {folder}: no config.json. Fix: give a Hugging Face model folder "
                                "(config.json + *.safetensors), e.g. one saved with save_pretrained()")
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") == "s2_llama":
        from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig

        return S2LlamaConfig.from_dict(raw)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def read_hf_weights(folder):
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}: save the model with safe_serialization=True")
    weights = {}
    for path in files:
        weights.update(load_file(path))
    return weights


def choose_s2_config(args, config):
    if args.s2_config:
        return S2AttentionConfig.from_yaml(args.s2_config, num_layers=config.num_hidden_layers,
                                           num_attention_heads=config.num_attention_heads,
                                           overrides=args.s2_override)
    if getattr(config, "s2_layers", None) is not None:
        return convert.s2_config_from_hf_layers(config.s2_layers, allow_partial_coverage=True,
                                                overrides=args.s2_override)
    if not args.s2_override:
        print("no --s2-config: all layers dense (pass an S2 YAML to continue training with S2)")
    # As pretrain_gpt_s2.py reads a run without --s2-config: dense, unless overrides say otherwise.
    return S2AttentionConfig.from_section({}, num_layers=config.num_hidden_layers,
                                          num_attention_heads=config.num_attention_heads,
                                          overrides=args.s2_override)


def main(argv=None):
    args = parse_args(argv)
    checkpoints.check_output_folder(args.save, "--save", args.overwrite, inputs=[args.hf])
    config = read_hf_config(args.hf)
    s2_config = choose_s2_config(args, config)
    layout = dict(tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
                  make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    margs = convert.megatron_args_from_hf(config, s2_config=s2_config, **layout)
    weights = read_hf_weights(args.hf)
    shape = megatron_model.shape_from_args(margs)
    if shape.tied_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        raise convert.UnsupportedArchitectureError("tie_word_embeddings=False but the folder has no lm_head.weight")
    weights = {k: v.to(torch.float32) for k, v in weight_mapping.resize_vocab(weights, shape.vocab_size).items()}
    state = weight_mapping.hf_to_megatron_weights(weights, shape)
    with checkpoints.writing_folder(args.save) as partial:
        checkpoints.save_megatron_checkpoint(partial, state, margs, s2_config)
    directory = os.path.join(args.save, "release")
    print(f"wrote {directory} (model weights only, {len(s2_config.sparse_layers)} S2 layers of {margs.num_layers})")
    flags = convert.megatron_flags_from_hf(config, **layout)
    print("pretrain_gpt_s2.py model flags: " + " ".join(flags) + f" --finetune --load {args.save}")


if __name__ == "__main__":
    checkpoints.run_tool(main)
