"""megatron_s2: S2 (sparsely-sharded) attention for Megatron-Core pretraining."""

from .layout import get_layout, s2_block_mask
from .pattern import BlockMaskPattern, S2ConfigError, S2CoverageError, S2Pattern


def __getattr__(name):
    # The kernel module imports Triton; load it only when asked for.
    if name == "s2_attention":
        from .attention import s2_attention

        return s2_attention
    raise AttributeError(f"module 'megatron_s2' has no attribute {name!r}")


__all__ = [
    "BlockMaskPattern",
    "S2ConfigError",
    "S2CoverageError",
    "S2Pattern",
    "get_layout",
    "s2_attention",
    "s2_block_mask",
]
