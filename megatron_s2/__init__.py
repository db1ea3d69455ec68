"""megatron_s2: S2 (sparsely-sharded) attention for Megatron-Core pretraining."""

from .attention import s2_attention
from .layout import get_layout, s2_block_mask
from .pattern import BlockMaskPattern, S2ConfigError, S2CoverageError, S2Pattern

__all__ = [
    "BlockMaskPattern",
    "S2ConfigError",
    "S2CoverageError",
    "S2Pattern",
    "get_layout",
    "s2_attention",
    "s2_block_mask",
]
