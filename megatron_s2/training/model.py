"""Megatron's GPT model config from the validated arguments, with the S2 block spec as its layer spec."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.training.argument_utils import gpt_config_from_args

from ..core.config import S2AttentionConfig
from ..core.specs import get_s2_gpt_block_spec
from . import cpu_compat


def layer_spec_provider(s2_config: S2AttentionConfig, seq_length: int):
    """GPTModelConfig.transformer_layer_spec: the block spec with one layer spec per layer."""
    def spec(model_config, vp_stage: Optional[int] = None):
        transformer = model_config.transformer
        return get_s2_gpt_block_spec(
            transformer, s2_config, seq_length=seq_length,
            use_transformer_engine=transformer.transformer_impl == "transformer_engine",
            normalization=transformer.normalization, qk_l2_norm=transformer.qk_l2_norm,
            vp_stage=vp_stage)

    return spec


def move_cpu_initialized_model_to_gpu(model_chunks):
    """Pre-wrap hook: megatron-core 0.19.2's config-container builder leaves a model built with
    --use-cpu-initialization on the CPU (its get_model() moved it); put it on this rank's GPU."""
    device = torch.cuda.current_device()
    return [chunk.cuda(device) for chunk in model_chunks]


def build_model_config(args, s2_config: S2AttentionConfig):
    """Megatron's GPTModelConfig from the flags, with the S2 block spec as its layer spec: the one
    arguments-to-model path, of pretrain_gpt_s2.py and of the HF converters (hf/megatron_model.py)."""
    model_config = gpt_config_from_args(args)
    # megatron-core 0.19.2's gpt_config_from_args copies --use-rope-scaling but not the factor
    # (the model would keep its default 8, e.g. for Llama 3.2's 32).
    model_config.rope_scaling_factor = args.rope_scaling_factor
    model_config.transformer_layer_spec = layer_spec_provider(s2_config, args.seq_length)
    if args.use_cpu_initialization and not cpu_compat.cpu_mode_requested():
        model_config.pre_wrap_hooks.append(move_cpu_initialized_model_to_gpu)
    return model_config
