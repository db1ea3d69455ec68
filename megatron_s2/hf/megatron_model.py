"""The Megatron ``GPTModel`` of a conversion: built from a checkpoint's (or an HF config's) arguments
at TP=1 (or a given TP) with the project's per-layer spec, in this process, on the CPU when there is
no GPU, with Megatron's parallel state set up and torn down around it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from argparse import Namespace
from unittest import mock

import torch

from ..core.config import S2AttentionConfig
from ..training import checkpoint_layout
from .weight_mapping import LlamaShape


# MuP (Megatron's TransformerConfig derives the softmax scale and the embedding and logit multipliers
# from these): passed to the converter's TransformerConfig and carried into S2LlamaConfig.
_MUP_ARGS = ("use_mup", "mup_base_hidden_size", "mup_embedding_mult", "mup_output_mult", "mup_base_head_dim",
             "mup_attn_scale_power")


def shape_from_args(args: Namespace) -> LlamaShape:
    heads = args.num_attention_heads
    kv_heads = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    return LlamaShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        vocab_size=args.padded_vocab_size,
        tied_embeddings=not args.untie_embeddings_and_output_weights,
    )


def s2_config_from_args(args: Namespace) -> S2AttentionConfig:
    """The per-layer settings stored with the checkpoint; all dense for a plain Megatron checkpoint."""
    settings = getattr(args, checkpoint_layout.ARGS_ATTRIBUTE, None)
    if settings is None:
        return S2AttentionConfig.dense(args.num_layers)
    return S2AttentionConfig.from_dict(settings)


def transformer_config(args: Namespace, tensor_parallel: int = 1):
    """TransformerConfig of the Llama model described by ``args``, on CPU, uninitialized."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    shape = shape_from_args(args)
    dtype = getattr(args, "params_dtype", torch.float32)
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tensor_parallel,
        **{name: getattr(args, name) for name in _MUP_ARGS if hasattr(args, name)},
    )


def build_gpt_model(args: Namespace, s2_config: S2AttentionConfig, tensor_parallel: int = 1):
    """A PP=1 GPTModel with the project's per-layer spec (needs Megatron's parallel state at that TP)."""
    from megatron.core.models.gpt import GPTModel

    from ..core.specs import get_s2_gpt_block_spec

    config = transformer_config(args, tensor_parallel)
    return GPTModel(
        config,
        get_s2_gpt_block_spec(config, s2_config, use_transformer_engine=False),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=args.rotary_base,
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
    )


@contextlib.contextmanager
def cpu_without_cuda():
    """On a machine without CUDA, turn the two CUDA calls that checkpoint saving and RoPE make
    (``synchronize``, ``current_device``) into CPU no-ops, for the duration of the block only.

    Not ``megatron_s2.training.cpu_compat``: that layer is for ``megatron.training`` and changes the whole
    process for good (a torch function mode on every call, torch.cuda replaced); the conversion
    functions are library calls and must leave the caller's process as they found it."""
    if torch.cuda.is_available():
        yield
        return
    with mock.patch("torch.cuda.synchronize"), \
            mock.patch("torch.cuda.current_device", return_value=torch.device("cpu")):
        yield


@contextlib.contextmanager
def in_process_checkpoint_writes():
    """Synchronous dist_checkpointing saves collect write results in a queue that Megatron creates as
    a spawned ``multiprocessing.Manager`` (a new interpreter that re-imports ``__main__``, impossible
    in daemonic processes). A save that is not asynchronous runs in this process: a plain queue does."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


@contextlib.contextmanager
def single_process_megatron():
    """Megatron's parallel state at TP=PP=1 in this process (gloo), torn down afterwards."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    started = not torch.distributed.is_initialized()
    with tempfile.TemporaryDirectory(prefix="megatron_s2_convert_") as tmp, cpu_without_cuda():
        if started:
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        elif torch.distributed.get_world_size() != 1:
            raise RuntimeError("run the converter in a single process (not under torchrun)")
        had_state = parallel_state.model_parallel_is_initialized()
        if not had_state:
            parallel_state.initialize_model_parallel(1, 1)
        tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        try:
            yield
        finally:
            if not had_state:
                parallel_state.destroy_model_parallel()
            if started:
                torch.distributed.destroy_process_group()


def sharded_metadata():
    from megatron.core import parallel_state

    return {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
