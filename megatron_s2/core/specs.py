"""Transformer-block spec for Megatron's ``GPTModel`` with S2 attention chosen per layer.

Built on Megatron's own layer specs (the Transformer Engine spec when TE is importable, the local
spec otherwise); only ``self_attention.submodules.core_attention`` changes, so every other Megatron
feature (fused norms, MoE layers, recomputation, pipeline layouts, checkpoint keys) is untouched:

    from megatron_s2.core.config import S2AttentionConfig
    from megatron_s2.core.specs import get_s2_gpt_block_spec

    s2 = S2AttentionConfig.from_yaml("s2.yaml", num_layers=config.num_layers,
                                     num_attention_heads=config.num_attention_heads)
    model = GPTModel(config, get_s2_gpt_block_spec(config, s2, seq_length=args.seq_length), ...)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import LNImpl, get_gpt_decoder_layer_specs
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .config import S2AttentionConfig
from .core_attention import S2CoreAttention, SDPACoreAttention
from ..ops.pattern import S2ConfigError


def get_s2_gpt_block_spec(
    config,
    s2_config: S2AttentionConfig,
    *,
    seq_length: Optional[int] = None,
    use_transformer_engine: Optional[bool] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec holding one layer spec per layer of this pipeline stage (and virtual stage).

    ``config`` is the model's ``TransformerConfig``; ``s2_config`` says which layers (numbered from
    0) are S2 and with which pattern. It is validated against ``config`` (and ``seq_length`` when
    given) before anything is built. Dense layers keep TE's attention when TE is used, and run
    ``SDPACoreAttention`` otherwise (never Megatron's unfused attention). ``use_transformer_engine``
    defaults to "if importable"; ``normalization`` defaults to ``config.normalization``;
    ``normalization``/``qk_l2_norm``/``vp_stage``/``pp_rank`` mean what they mean for Megatron's
    ``get_gpt_decoder_block_spec``.
    """
    if use_transformer_engine is None:
        use_transformer_engine = HAVE_TE
    if use_transformer_engine and not HAVE_TE:
        raise S2ConfigError("use_transformer_engine=True but Transformer Engine is not importable. Fix: "
                            "install it, or pass use_transformer_engine=False for the local spec")
    if normalization is None:
        normalization = config.normalization  # what Megatron's scripts pass (--normalization)
    _check_model(config, s2_config, use_transformer_engine)
    s2_config.validate_for_megatron(config, seq_length)

    layer_specs = get_gpt_decoder_layer_specs(
        config, use_transformer_engine, normalization=normalization, qk_l2_norm=qk_l2_norm
    )
    layer_specs = [
        _with_core_attention(spec, _core_attention_builder(config, layer, s2_config, use_transformer_engine))
        for spec, layer in zip(layer_specs, s2_config.layers)
    ]
    local_specs = [layer_specs[i] for i in stage_layer_indices(config, vp_stage=vp_stage, pp_rank=pp_rank)]
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        layer_norm = TENorm
    else:
        layer_norm = LNImpl
    return TransformerBlockSubmodules(layer_specs=local_specs, layer_norm=layer_norm)


def stage_layer_indices(config, *, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> list:
    """Global layer indices (from 0) that this pipeline stage / virtual stage builds, as Megatron's
    ``get_gpt_decoder_block_spec`` slices them."""
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)))


def _check_model(config, s2_config: S2AttentionConfig, use_transformer_engine: bool) -> None:
    """The model settings our core attentions cannot honour, checked once for every layer they serve
    (S2 layers always; dense layers too without Transformer Engine)."""
    if getattr(config, "multi_latent_attention", False) and s2_config.sparse_layers:
        raise S2ConfigError("S2 layers need standard (GQA/MHA) attention; --multi-latent-attention is set")
    if s2_config.sparse_layers and config.attention_dropout:
        raise S2ConfigError(
            f"S2 attention has no attention dropout, but --attention-dropout is {config.attention_dropout} "
            f"(S2 layers {s2_config.sparse_layers}). Fix: set --attention-dropout 0"
        )
    ours = "S2 and dense layers" if not use_transformer_engine else "S2 layers"
    if not s2_config.sparse_layers and use_transformer_engine:
        return
    if config.softmax_type != "vanilla":
        raise S2ConfigError(f"{ours} support only the standard softmax. Fix: set --softmax-type vanilla "
                            f"(got {config.softmax_type!r})")
    if getattr(config, "window_size", None) is not None:
        raise S2ConfigError(f"{ours} have no sliding-window option. Fix: remove --window-size (an S2 "
                            "layer's local window is its local_blocks setting)")
    if not use_transformer_engine and config.context_parallel_size > 1 and config.attention_dropout:
        raise S2ConfigError(f"dense layers on PyTorch's SDPA under context parallelism have no attention "
                            f"dropout, got {config.attention_dropout}. Fix: set --attention-dropout 0")


def _core_attention_builder(config, layer, s2_config: S2AttentionConfig, use_transformer_engine: bool):
    """What to put in ``core_attention`` for one layer; None keeps Megatron's (TE) module."""
    if layer.is_dense:
        if use_transformer_engine:
            return None
        return functools.partial(SDPACoreAttention, cp_overlap=s2_config.cp_overlap,
                                 num_query_groups=config.num_query_groups)
    return functools.partial(
        S2CoreAttention,
        pattern=layer.pattern,
        cp_exchange=s2_config.cp_exchange,
        cp_overlap=s2_config.cp_overlap,
        layer_index=layer.index,
        num_query_groups=config.num_query_groups,
    )


def _with_core_attention(layer_spec: ModuleSpec, core_attention) -> ModuleSpec:
    """A copy of ``layer_spec`` with only ``self_attention.submodules.core_attention`` replaced."""
    if core_attention is None:
        return layer_spec
    layer_sub = layer_spec.submodules
    attention = layer_sub.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core_attention)
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_sub, self_attention=attention))
