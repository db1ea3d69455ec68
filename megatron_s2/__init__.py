"""megatron_s2: S2 (sparsely-sharded) attention for Megatron-Core pretraining.

Layers (docs/ARCHITECTURE.md), each importing only the ones below it: ``ops`` (torch + Triton),
``core`` (Megatron-Core glue), ``training``, ``hf``, ``eval``. The public names below are the ops layer's
and import no Megatron.
"""

from .ops.attention import s2_attention
from .ops.layout import get_layout, s2_block_mask
from .ops.pattern import BlockMaskPattern, S2ConfigError, S2CoverageError, S2Pattern

__all__ = [
    "BlockMaskPattern",
    "S2ConfigError",
    "S2CoverageError",
    "S2Pattern",
    "get_layout",
    "s2_attention",
    "s2_block_mask",
]
