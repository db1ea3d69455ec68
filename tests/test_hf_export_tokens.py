"""The Hugging Face config of a byte-level run names its end-of-document token, so generate() stops
at a document's end (Llama's default ids 1 and 2 are ordinary bytes there)."""

from __future__ import annotations

import argparse
import os

import torch

from megatron.training.arguments import add_megatron_arguments

from megatron_s2.core.config import read_config_file
from megatron_s2.training.arguments import add_s2_arguments, flags_to_argv
from megatron_s2.hf import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart_args():
    """The Megatron arguments of configs/quickstart.yaml (NullTokenizer, vocabulary 257)."""
    flags, _ = read_config_file(os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser = add_s2_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(flags_to_argv(flags))
    args.padded_vocab_size = 384
    return args


def test_byte_level_export_stops_generation_at_end_of_document():
    from transformers import LlamaConfig, LlamaForCausalLM

    args = _quickstart_args()
    kwargs = convert.hf_config_kwargs(args, None, vocab_size=257)
    assert kwargs["eos_token_id"] == kwargs["bos_token_id"] == kwargs["pad_token_id"] == 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**kwargs, "num_hidden_layers": 1})).eval()
    # Whatever the weights, make end-of-document the most likely next token.
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_fill(-1, torch.tensor([256]), 1e4))
    prompt = torch.tensor([list(b"def main():")])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == [256]
