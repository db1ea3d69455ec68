"""S2 sparsity patterns: which key blocks each attention head computes.

The pattern is a pure function of a few integers (docs/semantics.md). For a head of shard group ``g``
a query block ``qb`` computes key block ``kb`` iff ``kb <= qb`` and either ``qb - kb < local_blocks``
or ``(kb + offset(g)) % vert_stride == 0``, with ``offset(g) = g * head_sliding_step +
head_sliding_offset``. This module holds the parameters, the per-head offsets and the coverage
check; ``layout.py`` turns them into block lists.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

HEAD_PATTERNS = ("heterogeneous", "kv_group", "homogeneous")


class S2ConfigError(ValueError):
    """A pattern or layer configuration that cannot work; the message says how to fix it."""


class S2CoverageError(S2ConfigError):
    """The heads of a layer do not cover every causal (query block, key block) pair."""


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise S2ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise S2ConfigError(f"{name} must be {bound}, got {value}")


@dataclasses.dataclass(frozen=True)
class S2Pattern:
    """Local-window plus vertical-stripe block pattern, validated on creation.

    ``num_dense_heads`` last (global) query heads attend densely; ``head_sliding_step=None`` means
    ``max(1, vert_stride // num_groups)``. ``vert_stride=0`` is window-only: no stripes, each query
    reads only its ``local_blocks`` most recent blocks (the stripe offsets are then unused);
    ``vert_stride=1`` is dense causal.
    """

    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 16
    head_pattern: str = "heterogeneous"
    head_sliding_step: Optional[int] = None
    head_sliding_offset: int = 0
    num_dense_heads: int = 0

    def __post_init__(self):
        _check_int("block_size", self.block_size, 16, 256)
        if self.block_size & (self.block_size - 1):
            raise S2ConfigError(
                f"block_size must be a power of two in [16, 256], got {self.block_size}"
            )
        _check_int("local_blocks", self.local_blocks, 1)
        _check_int("vert_stride", self.vert_stride, 0)
        if self.head_pattern not in HEAD_PATTERNS:
            raise S2ConfigError(
                f"head_pattern must be one of {', '.join(HEAD_PATTERNS)}, got {self.head_pattern!r}"
            )
        if self.head_sliding_step is not None:
            _check_int("head_sliding_step", self.head_sliding_step, 0)
        _check_int("head_sliding_offset", self.head_sliding_offset, 0)
        _check_int("num_dense_heads", self.num_dense_heads, 0)

    # -- presets -------------------------------------------------------------------------------

    @classmethod
    def dkernel(cls, num_q_heads: int, **overrides) -> "S2Pattern":
        """DKernel's layouts: offset 0, step computed from the number of *query* heads."""
        vert_stride = overrides.get("vert_stride", cls.vert_stride)
        overrides.setdefault("head_sliding_step", max(1, vert_stride // num_q_heads))
        return cls(**overrides)

    @classmethod
    def phi3_small(cls, **overrides) -> "S2Pattern":
        """Phi-3-small (and vLLM's block-sparse kernel): stride 8, heads offset by one."""
        params = dict(block_size=64, local_blocks=16, vert_stride=8, head_sliding_offset=1)
        params.update(overrides)
        return cls(**params)

    @classmethod
    def dense(cls, block_size: int = 64) -> "S2Pattern":
        """Dense causal attention expressed as a pattern (every block is a stripe)."""
        return cls(block_size=block_size, local_blocks=1, vert_stride=1)

    @classmethod
    def window(cls, block_size: int = 64, local_blocks: int = 16, **overrides) -> "S2Pattern":
        """Sliding-window attention only (no stripes): the control that does not cover the context."""
        return cls(block_size=block_size, local_blocks=local_blocks, vert_stride=0, **overrides)

    @property
    def is_dense(self) -> bool:
        return self.vert_stride == 1

    @property
    def is_window(self) -> bool:
        """No vertical stripes: the local window (plus any dense heads) only."""
        return self.vert_stride == 0

    @property
    def window_tokens(self) -> int:
        """The most tokens back (the query's own included) that the local window reaches."""
        return self.local_blocks * self.block_size

    # -- per-head offsets ----------------------------------------------------------------------

    def num_groups(self, num_q_heads: int, num_kv_heads: int) -> int:
        return {"heterogeneous": num_q_heads, "kv_group": num_kv_heads, "homogeneous": 1}[
            self.head_pattern
        ]

    def sliding_step(self, num_q_heads: int, num_kv_heads: int) -> int:
        if self.head_sliding_step is not None:
            return self.head_sliding_step
        return max(1, self.vert_stride // self.num_groups(num_q_heads, num_kv_heads))

    def head_offsets(self, num_q_heads: int, num_kv_heads: int) -> list:
        """Stripe offset of every global query head (``None`` for the dense heads)."""
        check_head_counts(num_q_heads, num_kv_heads)
        if self.num_dense_heads > num_q_heads:
            raise S2ConfigError(
                f"num_dense_heads={self.num_dense_heads} exceeds the {num_q_heads} query heads"
            )
        step = self.sliding_step(num_q_heads, num_kv_heads)
        heads_per_kv = num_q_heads // num_kv_heads
        first_dense = num_q_heads - self.num_dense_heads
        offsets = []
        for head in range(num_q_heads):
            group = {"heterogeneous": head, "kv_group": head // heads_per_kv, "homogeneous": 0}[
                self.head_pattern
            ]
            offsets.append(None if head >= first_dense else group * step + self.head_sliding_offset)
        return offsets

    def head_offsets_tensor(self, num_q_heads, num_kv_heads, head_start, num_local_heads, device):
        """Offsets of the local heads as an int64 tensor; dense heads get -1."""
        offsets = self.head_offsets(num_q_heads, num_kv_heads)[head_start : head_start + num_local_heads]
        return torch.tensor([-1 if o is None else o for o in offsets], dtype=torch.int64, device=device)

    # -- coverage ------------------------------------------------------------------------------

    def missing_residues(self, num_q_heads: int, num_kv_heads: int) -> list:
        """Stripe residues ``r`` (key blocks with ``kb % vert_stride == r``) that no head reads.

        A window-only pattern has no stripes and so no residues: ``coverage_notice`` describes it.
        """
        offsets = self.head_offsets(num_q_heads, num_kv_heads)
        if self.is_window or any(o is None for o in offsets):
            return []  # no stripes, or a dense head reads every block
        covered = {(-o) % self.vert_stride for o in offsets}
        return [r for r in range(self.vert_stride) if r not in covered]

    def covers(self, num_q_heads: int, num_kv_heads: int, seq_len: Optional[int] = None) -> bool:
        """Whether the heads together read every causal block pair (of ``seq_len`` tokens, else of any
        length)."""
        if seq_len is not None and seq_len <= self.window_tokens:
            return True
        if self.is_window:
            return self.num_dense_heads > 0
        return not self.missing_residues(num_q_heads, num_kv_heads)

    def coverage_notice(self, seq_len: Optional[int] = None) -> Optional[str]:
        """What a window-only pattern cannot see (``None`` when it covers the ``seq_len`` tokens)."""
        if not self.is_window or self.num_dense_heads or (seq_len is not None and seq_len <= self.window_tokens):
            return None
        beyond = f" of the {seq_len}-token context" if seq_len is not None else ""
        return (f"window-only: each query reads only the last {self.window_tokens} tokens at most "
                f"({self.local_blocks} blocks of {self.block_size}); keys further back{beyond} are not "
                f"covered by this layer")

    def check_coverage(self, num_q_heads: int, num_kv_heads: int, seq_len: Optional[int] = None):
        """Raise S2CoverageError if the union of the heads misses causal block pairs.

        A window-only pattern is not refused: asking for ``vert_stride=0`` is asking for exactly that
        gap, which ``coverage_notice`` reports.
        """
        if self.is_window or self.covers(num_q_heads, num_kv_heads, seq_len):
            return
        missing = self.missing_residues(num_q_heads, num_kv_heads)
        groups = self.num_groups(num_q_heads, num_kv_heads)
        raise S2CoverageError(
            f"S2 pattern {self.describe()} with {num_q_heads} query / {num_kv_heads} KV heads "
            f"({groups} head groups, stripe step {self.sliding_step(num_q_heads, num_kv_heads)}) leaves "
            f"key blocks kb with kb % {self.vert_stride} in {missing} unread beyond the local window. "
            f"Fix (any one): {'; '.join(self._coverage_fixes(num_q_heads, num_kv_heads))}."
        )

    def _coverage_fixes(self, num_q_heads: int, num_kv_heads: int) -> list:
        """Concrete changes that make this pattern cover, each checked with ``covers``."""

        def covers_with(heads=num_q_heads, kv_heads=num_kv_heads, **change):
            return dataclasses.replace(self, **change).covers(heads, kv_heads)

        fixes = []
        if self.head_pattern != "heterogeneous" and covers_with(head_pattern="heterogeneous"):
            fixes.append(f"head_pattern: heterogeneous (one stripe offset per query head, {num_q_heads} groups)")
        step = self.sliding_step(num_q_heads, num_kv_heads)
        steps = [s for s in range(1, self.vert_stride + 1) if s != step and covers_with(head_sliding_step=s)]
        if steps:
            fixes.append(f"head_sliding_step: {steps[0]} (spreads the "
                         f"{self.num_groups(num_q_heads, num_kv_heads)} groups over all {self.vert_stride} residues)")
        strides = [v for v in range(self.vert_stride - 1, 1, -1) if covers_with(vert_stride=v)]
        if strides:
            fixes.append(f"vert_stride: {strides[0]} (the largest stride that the "
                         f"{self.num_groups(num_q_heads, num_kv_heads)} head groups cover)")
        # Fewer groups than residues never cover: the fewest groups worth trying is vert_stride.
        if self.head_pattern == "heterogeneous":
            heads = -(-max(self.vert_stride, num_q_heads + 1) // num_kv_heads) * num_kv_heads
            if covers_with(heads=heads):
                fixes.append(f"{heads} query heads (--num-attention-heads {heads})")
        elif self.head_pattern == "kv_group":
            kv = [g for g in range(max(self.vert_stride, num_kv_heads + 1), num_q_heads + 1)
                  if num_q_heads % g == 0 and covers_with(kv_heads=g)]
            if kv:
                fixes.append(f"{kv[0]} KV heads (--num-query-groups {kv[0]})")
        fixes.append("num_dense_heads: 1 (a dense head reads every block)")
        fixes.append("or allow_partial_coverage: true to accept the gap")
        return fixes

    def describe(self) -> str:
        fields = dataclasses.asdict(self)
        return "S2Pattern(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def check_head_counts(num_q_heads: int, num_kv_heads: int) -> None:
    _check_int("num_q_heads", num_q_heads, 1)
    _check_int("num_kv_heads", num_kv_heads, 1)
    if num_q_heads % num_kv_heads:
        raise S2ConfigError(
            f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMaskPattern:
    """An explicit per-head block mask ``[global query heads, q blocks, k blocks]``.

    Every causal block mask whose diagonal blocks are set is accepted; blocks above the diagonal are
    ignored (attention stays causal). Hashed by identity, so a cached layout follows the object.
    """

    mask: torch.Tensor
    block_size: int = 64

    def __post_init__(self):
        _check_int("block_size", self.block_size, 16, 256)
        if self.block_size & (self.block_size - 1):
            raise S2ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.dim() != 3:
            raise S2ConfigError("BlockMaskPattern.mask must be a bool tensor [heads, q_blocks, k_blocks]")
        n = min(self.mask.shape[1], self.mask.shape[2])
        if not bool(self.mask[:, torch.arange(n), torch.arange(n)].all()):
            raise S2ConfigError(
                "BlockMaskPattern.mask must set every diagonal block (each query attends to itself)"
            )

    @property
    def is_dense(self) -> bool:
        return False
