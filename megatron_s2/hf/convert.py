"""Megatron arguments <-> Hugging Face Llama config: which Megatron models the Llama + S2 layout can
express (and the error naming what it cannot), and each side's description of the other.

Used by ``tools/convert_to_hf.py`` and ``tools/convert_from_hf.py`` with ``weight_mapping.py`` (the
state-dict mapping), ``megatron_model.py`` (building the Megatron model) and ``checkpoints.py``
(reading and writing checkpoints); none of them is copied on export.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Optional, Sequence

import torch

from ..core.config import S2AttentionConfig
from ..training import checkpoint_layout
from .configuration_s2_llama import s2_layer_entry
from .megatron_model import model_config, shape_from_args


class UnsupportedArchitectureError(ValueError):
    """The checkpoint uses something the Llama + S2 layout cannot express; the message names it."""


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
    "glu_linear_offset": 0.0,
    "no_rope_freq": None,
}


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


def s2_layers_for_hf(s2_config: S2AttentionConfig, num_heads: int, num_kv_heads: int) -> list:
    """``S2LlamaConfig.s2_layers``: each S2 layer's pattern fields plus resolved per-head offsets."""
    return [None if layer.is_dense else s2_layer_entry(layer.pattern, num_heads, num_kv_heads)
            for layer in s2_config.layers]


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
        mup = model_config(args, s2_config)  # Megatron's own derivation of the MuP factors
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


def megatron_flags_from_hf(config, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                           make_vocab_size_divisible_by: int = 128) -> list:
    """pretrain_gpt_s2.py's flags for the Llama model of an HF config, in a checkpoint of this TP/PP
    layout and vocabulary padding; raises UnsupportedArchitectureError naming what does not fit."""
    check_hf_llama_config(config)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    if heads % tensor_parallel or (kv_heads % tensor_parallel and tensor_parallel % kv_heads):
        raise ValueError(f"--tensor-parallel {tensor_parallel} must divide the {heads} heads and divide or be "
                         f"a multiple of the {kv_heads} KV heads")
    if config.num_hidden_layers % pipeline_parallel:
        raise ValueError(f"--pipeline-parallel {pipeline_parallel} must divide the {config.num_hidden_layers} layers")
    rope = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    flags = [
        "--num-layers", config.num_hidden_layers, "--hidden-size", config.hidden_size,
        "--ffn-hidden-size", config.intermediate_size, "--num-attention-heads", heads,
        "--kv-channels", getattr(config, "head_dim", None) or config.hidden_size // heads,
        "--max-position-embeddings", config.max_position_embeddings, "--norm-epsilon", config.rms_norm_eps,
        "--rotary-base", int(rope["rope_theta"]),
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
        "--tensor-model-parallel-size", tensor_parallel, "--pipeline-model-parallel-size", pipeline_parallel,
        "--make-vocab-size-divisible-by", make_vocab_size_divisible_by, "--ckpt-format", "torch_dist",
    ]
    if kv_heads != heads:
        flags += ["--group-query-attention", "--num-query-groups", kv_heads]
    if not config.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if rope.get("rope_type") == "llama3":
        flags += ["--use-rope-scaling", "--rope-scaling-factor", _llama3_megatron_factor(rope)]
    return [str(flag) for flag in flags]


def megatron_args_from_hf(config, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                          s2_config: Optional[S2AttentionConfig] = None,
                          make_vocab_size_divisible_by: int = 128) -> Namespace:
    """The Megatron arguments a pretrain_gpt_s2.py run of the Llama model of an HF config has: its
    flags (``megatron_flags_from_hf``) parsed by the training script's parser, so every other
    argument holds Megatron's default; raises UnsupportedArchitectureError naming what does not fit."""
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    from ..training.arguments import megatron_parser

    flags = megatron_flags_from_hf(config, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                   make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    if s2_config is None:
        s2_config = S2AttentionConfig.dense(config.num_hidden_layers)
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    s2_config.validate(num_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                       num_query_groups=kv_heads, tensor_parallel_size=tensor_parallel)
    # The HF vocabulary, which the export back keeps (the training run gets it from its tokenizer).
    args = megatron_parser().parse_args(flags + ["--vocab-size", str(config.vocab_size)])
    # What a run's argument validation and tokenizer set-up derive from these flags (validate_args itself
    # needs the launched processes and, at TP > 1, a GPU): float32 weights, the padded vocabulary.
    args.params_dtype = torch.float32
    args.padded_vocab_size = calculate_padded_vocab_size(
        config.vocab_size, make_vocab_size_divisible_by, tensor_parallel, logging_enabled=False)
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
