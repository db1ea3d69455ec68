"""The Megatron ``GPTModel`` of a conversion: built from a checkpoint's (or an HF config's) arguments
by the training run's own path (Megatron's ``gpt_config_from_args`` in ``training.model``, then
Megatron's ``GPTModelBuilder``), changed only where a conversion must be (``conversion_overrides``):
at TP=1 (or a given TP), in this process, on the CPU when there is no GPU, with Megatron's parallel
state set up and torn down around it."""

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


def conversion_overrides(tensor_parallel: int = 1, params_dtype: torch.dtype = torch.float32) -> dict:
    """What a conversion changes in a run's arguments, and why: the model exists only to move weights
    through ``dist_checkpointing`` (and, in tests, to compute reference logits), whole, in one process
    that may have no GPU. None of these changes what the trained model computes at inference."""
    return dict(
        # The weights' dtype sets the precision flags, as --bf16/--fp16 set params_dtype in a run (a
        # caller may load the run's weights in another dtype).
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        # The whole model at the requested TP: dist_checkpointing reshards from any saved layout.
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, pipeline_model_parallel_layout=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False,
        context_parallel_size=1, sequence_parallel=False, tp_comm_overlap=False,
        # Sizes Megatron's validation derived from the run's TP size: derived again from the requested one.
        tensor_parallel_num_weight_shards=None, gtp_weight_remat_size=1, expert_model_parallel_size=1,
        expert_tensor_parallel_size=None, expert_tensor_parallel_num_weight_shards=None,
        expert_gtp_weight_remat_size=1,
        # On the CPU, without initializing weights that are overwritten anyway.
        use_cpu_initialization=True, perform_initialization=False, init_model_with_meta_device=False,
        # Megatron's local layers (same checkpoint names as TE's) without fused or low-precision
        # kernels or CUDA graphs, which need CUDA or Transformer Engine; no dropout (inference only).
        transformer_impl="local", fp8=None, fp4=None, bias_swiglu_fusion=False, bias_gelu_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, no_persist_layer_norm=True,
        cuda_graph_impl="none", enable_cuda_graph=False, external_cuda_graph=False,
        hidden_dropout=0.0, attention_dropout=0.0,
    )


def model_config(args: Namespace, s2_config: S2AttentionConfig, tensor_parallel: int = 1):
    """Megatron's GPTModelConfig of the model ``args`` describe, by the training run's own path
    (``training.model.build_model_config``), with only ``conversion_overrides`` changed. ``args`` is
    completed with Megatron's defaults first: a checkpoint of an older Megatron-Core (or of an earlier
    ``convert_from_hf.py``) lacks the flags added since, and those defaults are what it ran with."""
    from ..training.arguments import megatron_parser
    from ..training.model import build_model_config

    defaults = vars(megatron_parser().parse_args([]))
    overrides = conversion_overrides(tensor_parallel, getattr(args, "params_dtype", torch.float32))
    return build_model_config(Namespace(**{**defaults, **vars(args), **overrides}), s2_config)


def build_gpt_model(args: Namespace, s2_config: S2AttentionConfig, tensor_parallel: int = 1):
    """A PP=1 GPTModel with the project's per-layer spec, built by Megatron's GPTModelBuilder from
    ``model_config`` (needs Megatron's parallel state at that TP)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    builder = GPTModelBuilder(model_config(args, s2_config, tensor_parallel))
    return builder.build_model(ProcessGroupCollection.use_mpu_process_groups())


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
