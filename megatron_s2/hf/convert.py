"""Conversion between Megatron ``GPTModel`` checkpoints (torch_dist) and the Hugging Face Llama layout.

Used by ``tools/convert_to_hf.py`` and ``tools/convert_from_hf.py``; not copied on export.

Tensor parallelism is handled by ``megatron.core.dist_checkpointing``: a checkpoint saved at any
TP/PP size is loaded into the sharded state dict of a model built at TP=1/PP=1 (it stores global
tensors), and a checkpoint written from a TP=1 model loads at any TP/PP size. What is left here is
the name and layout mapping of one full state dict:

* ``linear_qkv`` is fused per query group: ``[q_0 .. q_{g-1}, k, v]`` for every KV group;
* ``linear_fc1`` holds ``[gate; up]``;
* norms live in ``input_layernorm`` / ``pre_mlp_layernorm`` (local spec) or are fused into the
  following linear as ``layer_norm_weight`` (Transformer Engine spec); both are read;
* Megatron's RoPE (``rotary_interleaved=False``) already uses the rotate-half convention of HF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from argparse import Namespace
from typing import Optional, Sequence
from unittest import mock

import torch

from ..training import checkpoint_layout
from ..core.config import S2AttentionConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


class UnsupportedArchitectureError(ValueError):
    """The checkpoint uses something the Llama + S2 layout cannot express; the message names it."""


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


# -- weights ------------------------------------------------------------------------------------


def _first(state: dict, *keys):
    for key in keys:
        if key in state:
            return state[key]
    raise KeyError(f"none of {keys} in the Megatron state dict")


def megatron_to_hf_weights(state: dict, shape: LlamaShape) -> dict:
    """Full (TP=1) Megatron GPTModel state dict -> HF Llama state dict."""
    g, d, h = shape.heads_per_group, shape.head_dim, shape.hidden_size
    hf = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if not shape.tied_embeddings:
        hf["lm_head.weight"] = state["output_layer.weight"]
    for i in range(shape.num_layers):
        mg, out = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[mg + "self_attention.linear_qkv.weight"].view(shape.num_kv_heads, g + 2, d, h)
        gate, up = state[mg + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf.update({
            out + "input_layernorm.weight": _first(
                state, mg + "self_attention.linear_qkv.layer_norm_weight", mg + "input_layernorm.weight"),
            out + "self_attn.q_proj.weight": qkv[:, :g].reshape(-1, h),
            out + "self_attn.k_proj.weight": qkv[:, g].reshape(-1, h),
            out + "self_attn.v_proj.weight": qkv[:, g + 1].reshape(-1, h),
            out + "self_attn.o_proj.weight": state[mg + "self_attention.linear_proj.weight"],
            out + "post_attention_layernorm.weight": _first(
                state, mg + "mlp.linear_fc1.layer_norm_weight", mg + "pre_mlp_layernorm.weight"),
            out + "mlp.gate_proj.weight": gate,
            out + "mlp.up_proj.weight": up,
            out + "mlp.down_proj.weight": state[mg + "mlp.linear_fc2.weight"],
        })
    return {k: v.contiguous() for k, v in hf.items()}


def hf_to_megatron_weights(hf: dict, shape: LlamaShape, *, fused_norms: bool = False) -> dict:
    """HF Llama state dict -> full Megatron GPTModel state dict (local-spec names, or TE names with
    ``fused_norms``)."""
    g, d, h = shape.heads_per_group, shape.head_dim, shape.hidden_size
    state = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not shape.tied_embeddings:
        state["output_layer.weight"] = hf["lm_head.weight"]
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    for i in range(shape.num_layers):
        src, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].view(shape.num_kv_heads, g, d, h)
        k = hf[src + "self_attn.k_proj.weight"].view(shape.num_kv_heads, 1, d, h)
        v = hf[src + "self_attn.v_proj.weight"].view(shape.num_kv_heads, 1, d, h)
        state.update({
            mg + attn_norm: hf[src + "input_layernorm.weight"],
            mg + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, h),
            mg + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
            mg + mlp_norm: hf[src + "post_attention_layernorm.weight"],
            mg + "mlp.linear_fc1.weight": torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0),
            mg + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
        })
    return {k: v.contiguous() for k, v in state.items()}


# -- Megatron arguments <-> model description ----------------------------------------------------

# Megatron argument -> the value a Llama-architecture model needs (None: must be unset / falsy).
_LLAMA_ARGS = {
    "normalization": "RMSNorm",
    "swiglu": True,
    "position_embedding_type": "rope",
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "rotary_interleaved": False,
    "qk_layernorm": False,
    "qk_l2_norm": False,
    "layernorm_zero_centered_gamma": False,
    "multi_latent_attention": False,
    "attention_output_gate": False,
    "softmax_type": "vanilla",
    "window_size": None,
    "experimental_attention_variant": None,
    "hybrid_layer_pattern": None,
    "heterogeneous_layers_config_path": None,
    "num_experts": None,
    "rotary_seq_len_interpolation_factor": None,
    "mtp_num_layers": None,
    "apply_residual_connection_post_layernorm": False,
    "activation_func_clamp_value": None,
    "squared_relu": False,
    "no_rope_freq": None,
}

# MuP (Megatron's TransformerConfig derives the softmax scale and the embedding and logit multipliers
# from these): passed to the converter's TransformerConfig and carried into S2LlamaConfig.
_MUP_ARGS = ("use_mup", "mup_base_hidden_size", "mup_embedding_mult", "mup_output_mult", "mup_base_head_dim",
             "mup_attn_scale_power")


def check_megatron_llama_args(args: Namespace) -> None:
    """Raise UnsupportedArchitectureError naming every argument that leaves the Llama architecture."""
    problems = []
    for name, wanted in _LLAMA_ARGS.items():
        value = getattr(args, name, wanted)
        if (value or None) != (wanted or None):
            problems.append(f"--{name.replace('_', '-')}={value!r} (need {wanted!r})")
    if getattr(args, "rotary_percent", 1.0) != 1.0:
        problems.append(f"--rotary-percent={args.rotary_percent} (need 1.0)")
    if problems:
        raise UnsupportedArchitectureError(
            "this Megatron checkpoint is not a Llama-architecture model: " + "; ".join(problems))


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


def _sharded_metadata():
    from megatron.core import parallel_state

    return {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


# -- checkpoint directories --------------------------------------------------------------------


def run_tool(main) -> None:
    """Run a converter's ``main()``; bad input (the message says the fix) ends it with one line, not
    a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {err}")


def check_output_folder(path: str, flag: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work, to write into a folder that already holds files, unless ``overwrite``
    (an empty folder counts as new), and ever to replace a folder holding one of ``inputs``."""
    out = os.path.realpath(path)
    for source in inputs:
        source = os.path.realpath(source)
        if source == out or source.startswith(out + os.sep):
            raise FileExistsError(f"{flag} {path} would replace the input {source}. Fix: write to another folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists and is not empty. Fix: choose a new folder, "
                              "or pass --overwrite to replace it (it is replaced only once the new one is "
                              "complete)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag} {path} is a file, not a folder. Fix: choose a folder path")


@contextlib.contextmanager
def writing_folder(path: str):
    """Yield a new temporary folder beside ``path`` to write into; it becomes ``path`` only when the
    block succeeds (replacing an earlier ``path``), else it is deleted and ``path`` is left as it was.
    A failed conversion thus never leaves a half-written or half-replaced output."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # the permissions os.makedirs gives, not mkdtemp's 0700
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    previous = None
    if os.path.isdir(path) and os.listdir(path):
        previous = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.previous-", dir=parent)
        os.rename(path, os.path.join(previous, "old"))
    elif os.path.isdir(path):
        os.rmdir(path)
    os.rename(partial, path)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def resolve_checkpoint_dir(path: str, iteration: Optional[int] = None) -> str:
    """The torch_dist directory of a checkpoint: ``path`` itself, ``path/iter_NNNNNNN`` of the given
    iteration, or the one named in ``latest_checkpointed_iteration.txt``."""
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    if iteration is None:
        tracker = os.path.join(path, TRACKER_FILE)
        if not os.path.exists(tracker):
            raise FileNotFoundError(
                f"{path} is neither a torch_dist checkpoint directory (no metadata.json) nor a Megatron "
                f"save directory (no {TRACKER_FILE}); pass the --save directory of pretrain_gpt_s2.py")
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            return os.path.join(path, "release")
        iteration = int(text)
    directory = os.path.join(path, f"iter_{iteration:07d}")
    if not os.path.exists(os.path.join(directory, "metadata.json")):
        raise FileNotFoundError(
            f"{directory} is not a torch_dist checkpoint (no metadata.json); only --ckpt-format torch_dist "
            f"checkpoints are supported")
    return directory


def load_megatron_checkpoint(path: str, iteration: Optional[int] = None):
    """``(args, full_state_dict, s2_config)`` of a torch_dist checkpoint saved at any TP/PP size."""
    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()
    directory = resolve_checkpoint_dir(path, iteration)
    common = dist_checkpointing.load_common_state_dict(directory)
    args = common.get("args")
    if args is None:
        raise ValueError(f"{directory} holds no Megatron arguments ('args'): not a pretrain_gpt_s2.py checkpoint")
    check_megatron_llama_args(args)
    s2_config = s2_config_from_args(args)
    with single_process_megatron():
        model = build_gpt_model(args, s2_config)
        saved = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
        metadata = {**_sharded_metadata(), **saved}
        sharded = model.sharded_state_dict(metadata=metadata)
        loaded = dist_checkpointing.load({"model": sharded}, directory)["model"]
        model.load_state_dict(loaded, strict=False)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return args, state, s2_config


def save_megatron_checkpoint(path: str, state: dict, args: Namespace, s2_config: S2AttentionConfig) -> str:
    """Write ``state`` (full, TP=1 names) as a torch_dist ``release`` checkpoint that
    ``pretrain_gpt_s2.py --load path`` reads at any TP/PP size; returns the checkpoint directory."""
    from megatron.core import dist_checkpointing

    directory = os.path.join(path, "release")
    os.makedirs(directory, exist_ok=True)
    with single_process_megatron():
        model = build_gpt_model(args, s2_config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
        metadata = _sharded_metadata()
        content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
        with in_process_checkpoint_writes():
            dist_checkpointing.save(
                {"model": model.sharded_state_dict(metadata=metadata), "args": args,
                 "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
                directory, content_metadata=content)
    with open(os.path.join(path, TRACKER_FILE), "w") as f:
        f.write("release")
    return directory


# -- HF config <-> Megatron arguments ------------------------------------------------------------


def s2_layers_for_hf(s2_config: S2AttentionConfig, num_heads: int, num_kv_heads: int) -> list:
    """``S2LlamaConfig.s2_layers``: each S2 layer's pattern fields plus resolved per-head offsets."""
    layers = []
    for layer in s2_config.layers:
        if layer.is_dense:
            layers.append(None)
        else:
            entry = dataclasses.asdict(layer.pattern)
            entry["head_offsets"] = layer.pattern.head_offsets(num_heads, num_kv_heads)
            layers.append(entry)
    return layers


def s2_config_from_hf_layers(s2_layers: list, allow_partial_coverage: bool = False,
                             overrides: Sequence[str] = ()) -> S2AttentionConfig:
    """The S2 config of ``S2LlamaConfig.s2_layers`` (``overrides``: ``key=value`` strings, as in
    ``S2AttentionConfig.from_dict``)."""
    entries = [
        {"type": "dense"} if e is None else {"type": "s2", **{k: v for k, v in e.items() if k != "head_offsets"}}
        for e in s2_layers
    ]
    return S2AttentionConfig.from_dict({"layers": entries, "allow_partial_coverage": allow_partial_coverage},
                                       overrides=overrides)


def rope_parameters_from_args(args: Namespace) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
    if getattr(args, "use_rope_scaling", False):
        # Megatron's llama3 scaling fixes the three other parameters to these values.
        rope.update(rope_type="llama3", factor=float(args.rope_scaling_factor), low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    return rope


def hf_config_kwargs(args: Namespace, s2_config: Optional[S2AttentionConfig], vocab_size: int) -> dict:
    """Fields of an HF Llama config (plus ``s2_layers`` when ``s2_config`` is given)."""
    shape = shape_from_args(args)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.layernorm_epsilon,
        tie_word_embeddings=shape.tied_embeddings,
        rope_parameters=rope_parameters_from_args(args),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
    )
    if getattr(args, "tokenizer_type", None) == "NullTokenizer":
        # Megatron's NullTokenizer ends every document with its last id (256 for the byte-level data
        # of tools/preprocess_data.py), which also precedes every document start. Llama's default
        # ids (bos 1, eos 2) are ordinary bytes here, so generate() would never stop.
        end_of_document = args.vocab_size - 1
        kwargs.update(bos_token_id=end_of_document, eos_token_id=end_of_document, pad_token_id=end_of_document)
    if s2_config is not None:
        kwargs["s2_layers"] = s2_layers_for_hf(s2_config, shape.num_heads, shape.num_kv_heads)
    if getattr(args, "use_mup", False):
        if s2_config is None:
            raise UnsupportedArchitectureError(
                "this checkpoint was trained with --use-mup (softmax scale, embedding and logit multipliers "
                "that a stock Llama config cannot express). Fix: export without --dense; the S2 Llama "
                "config carries them")
        mup = transformer_config(args)  # Megatron's own derivation of the MuP factors
        kwargs.update(softmax_scale=mup.softmax_scale, embedding_multiplier=mup.mup_embedding_mult,
                      logits_multiplier=mup.mup_output_mult)
    return kwargs


def _llama3_megatron_factor(rope: dict) -> float:
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    different = {k: rope.get(k) for k, v in fixed.items() if float(rope.get(k, v)) != v}
    if different:
        raise UnsupportedArchitectureError(
            f"llama3 rope scaling with {different}: Megatron supports only low_freq_factor=1, "
            f"high_freq_factor=4, original_max_position_embeddings=8192")
    return float(rope["factor"])


def megatron_args_from_hf(config, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                          s2_config: Optional[S2AttentionConfig] = None,
                          make_vocab_size_divisible_by: int = 128) -> Namespace:
    """Megatron arguments describing the Llama model of an HF config; raises
    UnsupportedArchitectureError naming what does not fit."""
    check_hf_llama_config(config)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % tensor_parallel or (kv_heads % tensor_parallel and tensor_parallel % kv_heads):
        raise ValueError(f"--tensor-parallel {tensor_parallel} must divide the {heads} heads and divide or be "
                         f"a multiple of the {kv_heads} KV heads")
    if config.num_hidden_layers % pipeline_parallel:
        raise ValueError(f"--pipeline-parallel {pipeline_parallel} must divide the {config.num_hidden_layers} layers")
    # Megatron pads the vocabulary to this multiple when it builds the model for training.
    multiple = make_vocab_size_divisible_by * tensor_parallel
    padded = -(-config.vocab_size // multiple) * multiple
    rope = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    if s2_config is None:
        s2_config = S2AttentionConfig.dense(config.num_hidden_layers)
    s2_config.validate(num_layers=config.num_hidden_layers, num_attention_heads=heads,
                       num_query_groups=kv_heads, tensor_parallel_size=tensor_parallel)
    args = Namespace(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads,
        group_query_attention=kv_heads != heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        max_position_embeddings=config.max_position_embeddings,
        seq_length=config.max_position_embeddings,
        layernorm_epsilon=config.rms_norm_eps,
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_base=int(rope["rope_theta"]),
        use_rope_scaling=rope.get("rope_type", "default") == "llama3",
        rope_scaling_factor=_llama3_megatron_factor(rope) if rope.get("rope_type") == "llama3" else 8.0,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        vocab_size=config.vocab_size,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=torch.float32,
        ckpt_format="torch_dist",
    )
    checkpoint_layout.attach_to_args(args, s2_config)
    return args


# S2LlamaConfig's scaling fields and their plain-Llama values.
_PLAIN_SCALING = {"softmax_scale": None, "embedding_multiplier": 1.0, "logits_multiplier": 1.0}


def check_hf_llama_config(config) -> None:
    """Raise UnsupportedArchitectureError naming every field outside the supported Llama subset."""
    problems = []
    model_type = getattr(config, "model_type", None)
    if model_type not in ("llama", "s2_llama", "mistral"):
        problems.append(f"model_type={model_type!r} (supported: llama, s2_llama, and mistral without "
                        f"sliding window)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            problems.append(f"{name}=True (biases are not supported: Megatron's Llama layout has none)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (need 'silu' for SwiGLU)")
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, name, None):
            problems.append(f"{name}={getattr(config, name)} (MoE is not supported)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        problems.append(f"sliding_window={config.sliding_window} (not supported)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        problems.append(f"rope_type={rope.get('rope_type')!r} (supported: default, llama3)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={config.pretraining_tp} (need 1)")
    scaled = {name: getattr(config, name) for name, plain in _PLAIN_SCALING.items()
              if getattr(config, name, plain) != plain}
    if scaled:
        problems.append(f"{scaled} (a MuP export; importing it back into Megatron is not supported: "
                        f"continue from the Megatron checkpoint it was exported from)")
    if problems:
        raise UnsupportedArchitectureError("cannot convert this Hugging Face model: " + "; ".join(problems))


def resize_vocab(hf: dict, vocab_size: int) -> dict:
    """Cut padded vocabulary rows off, or append zero rows (Megatron's padding), in place."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in hf:
            rows = hf[key]
            if vocab_size <= rows.shape[0]:
                hf[key] = rows[:vocab_size].contiguous()
            else:
                hf[key] = torch.cat([rows, rows.new_zeros(vocab_size - rows.shape[0], rows.shape[1])])
    return hf
