#!/usr/bin/env python3
"""Megatron checkpoint of pretrain_gpt_s2.py (torch_dist, any TP/PP) -> Hugging Face folder.

    python tools/convert_to_hf.py --load checkpoints/run --out hf/run

writes ``model.safetensors`` (standard Llama names), ``config.json`` (model type ``s2_llama``: all
Llama fields plus the per-layer S2 settings), the configuration/modeling files it names in
``auto_map`` (load with ``trust_remote_code=True``) and the tokenizer when the run used a Hugging Face
one. ``--dense`` instead writes a stock ``LlamaForCausalLM`` whose S2 layers attend densely: NOT the
trained model (its outputs differ wherever S2 skipped blocks), for tools that only know Llama.
The folder appears only once complete; an existing non-empty one is replaced only with ``--overwrite``.
Runs on CPU in one process; see docs/hf.md.
"""

import argparse
import json
import os
import shutil

import torch


from megatron_s2.hf import checkpoints, convert, megatron_model, weight_mapping

HF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_s2", "hf")
REMOTE_CODE_FILES = ("configuration_s2_llama.py", "modeling_s2_llama.py", "token_masks.py", "s2_kv_cache.py",
                     "s2_decode_kernel.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DENSE_NOTE = ("Dense export of a model trained with S2 attention: every layer attends densely here, which is "
              "NOT the trained function. Use the s2_llama export for faithful outputs.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="Megatron --save directory, or one iter_NNNNNNN directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: latest_checkpointed_iteration.txt")
    parser.add_argument("--out", required=True,
                        help="output folder (created; it appears only once the export is complete)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    parser.add_argument("--dense", action="store_true", help="stock Llama export; NOT equivalent for S2 layers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="keep this many vocabulary rows (default: --vocab-size of the run, else the padded size)")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer to save with the model (default: the run's --tokenizer-model)")
    return parser.parse_args(argv)


def export_tokenizer(args, megatron_args, out):
    name = args.tokenizer
    if name is None and getattr(megatron_args, "tokenizer_type", None) == "HuggingFaceTokenizer":
        name = megatron_args.tokenizer_model
    if name is None:
        print(f"no tokenizer exported (run used {getattr(megatron_args, 'tokenizer_type', None)}); "
              f"pass --tokenizer to add one")
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.save_pretrained(out)
    return tokenizer


def main(argv=None):
    args = parse_args(argv)
    checkpoints.check_output_folder(args.out, "--out", args.overwrite, inputs=[args.load])
    megatron_args, state, s2_config = checkpoints.load_megatron_checkpoint(args.load, args.iteration)
    shape = megatron_model.shape_from_args(megatron_args)
    vocab = args.vocab_size or getattr(megatron_args, "vocab_size", None) or shape.vocab_size
    dtype = DTYPES[args.dtype] if args.dtype else getattr(megatron_args, "params_dtype", torch.float32)
    weights = weight_mapping.resize_vocab(weight_mapping.megatron_to_hf_weights(state, shape), vocab)
    weights = {k: v.to(dtype) for k, v in weights.items()}

    with checkpoints.writing_folder(args.out) as out:
        tokenizer = export_tokenizer(args, megatron_args, out)
        special = {}
        if tokenizer is not None:
            special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        kwargs = convert.hf_config_kwargs(megatron_args, None if args.dense else s2_config, vocab)
        kwargs.update(special, dtype=str(dtype).removeprefix("torch."))
        if args.dense:
            from transformers import LlamaConfig

            config = LlamaConfig(**kwargs, architectures=["LlamaForCausalLM"])
            config.s2_export_note = DENSE_NOTE
            print("WARNING: " + DENSE_NOTE)
        else:
            from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig

            config = S2LlamaConfig(**kwargs, architectures=["S2LlamaForCausalLM"])
            config.auto_map = {
                "AutoConfig": "configuration_s2_llama.S2LlamaConfig",
                "AutoModelForCausalLM": "modeling_s2_llama.S2LlamaForCausalLM",
            }
            for name in REMOTE_CODE_FILES:
                shutil.copy(os.path.join(HF_DIR, name), os.path.join(out, name))
        config.save_pretrained(out)

        from safetensors.torch import save_file

        save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    summary = {
        "out": args.out,
        "layers": ["dense" if e is None else "window" if e["vert_stride"] == 0 else "s2"
                   for e in kwargs.get("s2_layers", [None] * shape.num_layers)],
        "vocab_size": vocab,
        "dtype": str(dtype),
        "dense_export": args.dense,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    checkpoints.run_tool(main)
