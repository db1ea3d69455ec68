#!/usr/bin/env python3
"""Draw the S2 block pattern of a few heads and the union of all heads (coverage).

    python tools/plot_layout.py --seq-len 8192 --num-heads 32 --num-kv-heads 8 \
        --local-blocks 16 --vert-stride 16 --out docs/layout.png

Each small panel is one head: a dark cell is a (query block, key block) pair the head computes. The
last panel counts, for every causal pair, how many heads compute it; a white cell under the diagonal
would be a pair no head sees (lost coverage).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from megatron_s2 import S2Pattern, s2_block_mask  # noqa: E402
from megatron_s2.pattern import HEAD_PATTERNS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--num-heads", type=int, default=32, help="global query heads")
    parser.add_argument("--num-kv-heads", type=int, default=None, help="global KV heads (default: MHA)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=16)
    parser.add_argument("--head-pattern", choices=HEAD_PATTERNS, default="heterogeneous")
    parser.add_argument("--head-sliding-step", type=int, default=None)
    parser.add_argument("--head-sliding-offset", type=int, default=0)
    parser.add_argument("--num-dense-heads", type=int, default=0)
    parser.add_argument("--show-heads", type=int, default=4, help="how many single heads to draw")
    parser.add_argument("--out", default="layout.png")
    return parser.parse_args(argv)


def plot_layout(pattern: S2Pattern, num_heads: int, num_kv_heads: int, seq_len: int, show_heads: int, out: str):
    mask = s2_block_mask(pattern, num_heads, num_kv_heads, seq_len)
    heads = list(range(min(show_heads, num_heads)))
    coverage = mask.sum(0)
    causal = torch.ones_like(coverage, dtype=torch.bool).tril()
    missing = int((causal & (coverage == 0)).sum())
    density = mask.float().mean().item() * 2  # share of the causal half (block level)

    fig, axes = plt.subplots(1, len(heads) + 1, figsize=(3.2 * (len(heads) + 1), 3.6))
    for ax, head in zip(axes, heads):
        ax.imshow(mask[head].numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(f"head {head}: {int(mask[head].sum())} blocks", fontsize=9)
    shown = coverage.float().masked_fill(~causal, float("nan"))
    image = axes[-1].imshow(shown.numpy(), cmap="viridis", interpolation="nearest")
    axes[-1].set_title(f"union of {num_heads} heads\n(missing causal pairs: {missing})", fontsize=9)
    fig.colorbar(image, ax=axes[-1], fraction=0.046, label="heads computing the pair")
    for ax in axes:
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(
        f"S2 layout: seq {seq_len}, block {pattern.block_size}, local {pattern.local_blocks}, "
        f"stride {pattern.vert_stride}, {pattern.head_pattern}; per-head density {density:.2f} of causal",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return missing


def main(argv=None):
    args = parse_args(argv)
    pattern = S2Pattern(
        block_size=args.block_size, local_blocks=args.local_blocks, vert_stride=args.vert_stride,
        head_pattern=args.head_pattern, head_sliding_step=args.head_sliding_step,
        head_sliding_offset=args.head_sliding_offset, num_dense_heads=args.num_dense_heads,
    )
    num_kv = args.num_kv_heads or args.num_heads
    blocks = math.ceil(args.seq_len / args.block_size)
    missing = plot_layout(pattern, args.num_heads, num_kv, args.seq_len, args.show_heads, args.out)
    print(f"wrote {args.out}: {blocks}x{blocks} blocks, {missing} causal block pairs read by no head")


if __name__ == "__main__":
    main()
