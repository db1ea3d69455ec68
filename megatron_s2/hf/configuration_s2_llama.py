"""Configuration of a Llama model whose layers use S2 (sparsely-sharded) attention or dense attention.

Self-contained: this file is copied next to exported weights and loaded with ``trust_remote_code=True``.
All Llama fields keep their meaning; ``s2_layers`` adds one entry per layer (numbered from 0):
``None`` for a dense causal layer, or a dict with the S2 pattern of that layer::

    {"block_size": 64, "local_blocks": 16, "vert_stride": 16, "head_pattern": "heterogeneous",
     "head_sliding_step": None, "head_sliding_offset": 0, "num_dense_heads": 0,
     "head_offsets": [0, 1, ..., None]}

``head_offsets`` is the resolved stripe offset of every global query head (``None`` for a dense head),
so the pure-PyTorch attention needs no pattern logic. A query at position ``p`` attends a key at
position ``k`` iff ``k <= p`` and (``p//B - k//B < local_blocks`` or ``(k//B + offset) % vert_stride
== 0`` or the head is dense), positions counted from each sequence's first token. ``vert_stride`` 0 is a
window-only layer (no stripes).

Models trained with MuP (``--use-mup``) compute another function than plain Llama: ``softmax_scale``
(attention scores' scale; ``None``: ``head_dim ** -0.5``), ``embedding_multiplier`` (token embeddings)
and ``logits_multiplier`` (output logits) carry Megatron's values.
"""

import dataclasses

from transformers import LlamaConfig

S2_LAYER_KEYS = ("block_size", "local_blocks", "vert_stride", "head_offsets")


class S2LlamaConfig(LlamaConfig):
    model_type = "s2_llama"

    s2_layers: list | None = None
    softmax_scale: float | None = None
    embedding_multiplier: float = 1.0
    logits_multiplier: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.s2_layers is None:
            self.s2_layers = [None] * self.num_hidden_layers
        if len(self.s2_layers) != self.num_hidden_layers:
            raise ValueError(
                f"s2_layers has {len(self.s2_layers)} entries but the model has "
                f"{self.num_hidden_layers} layers: give one entry (None for dense) per layer"
            )
        for index, layer in enumerate(self.s2_layers):
            if layer is None:
                continue
            missing = [key for key in S2_LAYER_KEYS if key not in layer]
            if missing:
                raise ValueError(f"s2_layers[{index}] lacks {missing}")
            if len(layer["head_offsets"]) != self.num_attention_heads:
                raise ValueError(
                    f"s2_layers[{index}]['head_offsets'] has {len(layer['head_offsets'])} entries, "
                    f"expected one per query head ({self.num_attention_heads})"
                )


def s2_layer_entry(pattern, num_heads: int, num_kv_heads: int) -> dict:
    """The ``s2_layers`` entry of a layer trained with ``pattern`` (a ``megatron_s2.S2Pattern``, not
    imported here so that this file stays self-contained): its fields plus each query head's resolved
    stripe offset."""
    return {**dataclasses.asdict(pattern), "head_offsets": pattern.head_offsets(num_heads, num_kv_heads)}


__all__ = ["S2LlamaConfig", "s2_layer_entry"]
