#!/usr/bin/env python3
r"""Draw the S2 block pattern of a few heads and the union of all heads (coverage).

    python tools/plot_layout.py --seq-len 8192 --num-heads 32 --num-kv-heads 8 \
        --local-blocks 16 --vert-stride 16 --out docs/layout.png
    python tools/plot_layout.py --config configs/quickstart.yaml --layer 1 --out layer1.png
    python tools/plot_layout.py --preset window --seq-len 4096 --num-heads 8 --out window.png

Each small panel is one head: a dark cell is a (query block, key block) pair the head computes. The
last panel counts, for every causal pair, how many heads compute it; a white cell under the diagonal
is a pair no head sees (lost coverage, e.g. everything beyond the window of a window-only layer).
Pairs above the diagonal (not causal) are light grey.

--config draws the layout a training config gives one layer (numbered from 0), with the head counts
and sequence length of the file's megatron: section; --num-heads, --num-kv-heads and --seq-len
given on the command line win over the file. --preset starts from a named pattern (phi3_small,
dkernel, window); pattern options given on the command line change it.
"""

from __future__ import annotations

import argparse
import math
import sys


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator
from megatron_s2 import S2Pattern, s2_block_mask
from megatron_s2.core.config import S2AttentionConfig, read_config_file
from megatron_s2.ops.pattern import HEAD_PATTERNS, S2ConfigError

PRESETS = ("phi3_small", "dkernel", "window")
# Pattern options: command-line flag -> S2Pattern field. Unset (None) ones keep the preset's values.
PATTERN_OPTIONS = ("block_size", "local_blocks", "vert_stride", "head_pattern", "head_sliding_step",
                   "head_sliding_offset", "num_dense_heads")
DEFAULT_SEQ_LEN, DEFAULT_NUM_HEADS = 8192, 32
UNCOVERED_COLOUR, NON_CAUSAL_COLOUR = "white", "0.88"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens (default {DEFAULT_SEQ_LEN}, "
                        "or the config's seq-length)")
    parser.add_argument("--num-heads", type=int, default=None, help=f"global query heads (default "
                        f"{DEFAULT_NUM_HEADS}, or the config's num-attention-heads)")
    parser.add_argument("--num-kv-heads", type=int, default=None,
                        help="global KV heads (default: the config's num-query-groups, else MHA)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="a training config (megatron: + s2: sections) or an S2 config")
    source.add_argument("--preset", choices=PRESETS, default=None, help="start from a named pattern")
    parser.add_argument("--layer", type=int, default=None, help="with --config: the layer to draw (from 0)")
    parser.add_argument("--block-size", type=int, default=None, help="default 64")
    parser.add_argument("--local-blocks", type=int, default=None, help="default 16")
    parser.add_argument("--vert-stride", type=int, default=None, help="default 16; 0 = window-only")
    parser.add_argument("--head-pattern", choices=HEAD_PATTERNS, default=None, help="default heterogeneous")
    parser.add_argument("--head-sliding-step", type=int, default=None)
    parser.add_argument("--head-sliding-offset", type=int, default=None)
    parser.add_argument("--num-dense-heads", type=int, default=None)
    parser.add_argument("--show-heads", type=int, default=4, help="how many single heads to draw")
    parser.add_argument("--out", default="layout.png")
    args = parser.parse_args(argv)
    if (args.layer is None) != (args.config is None):
        parser.error("--config and --layer go together: --config FILE.yaml --layer N draws layer N of FILE")
    given = [name for name in PATTERN_OPTIONS if getattr(args, name) is not None]
    if args.config and given:
        parser.error(f"--config takes the pattern from the file; drop --{given[0].replace('_', '-')}")
    return args


def _megatron_value(flags: dict, name: str):
    """A flag of the file's megatron: section, written with dashes or underscores."""
    for key, value in flags.items():
        if str(key).lstrip("-").replace("_", "-") == name:
            return value
    return None


def layer_from_config(path: str, layer: int, num_heads=None, num_kv_heads=None, seq_len=None) -> tuple:
    """``(pattern or None for dense, num_heads, num_kv_heads, seq_len)`` of one layer of a config file;
    values given (not None) win over the file's megatron: section."""
    flags, section = read_config_file(path)
    num_heads = num_heads or _megatron_value(flags, "num-attention-heads") or DEFAULT_NUM_HEADS
    if num_kv_heads is None and _megatron_value(flags, "group-query-attention"):
        num_kv_heads = _megatron_value(flags, "num-query-groups")
    seq_len = seq_len or _megatron_value(flags, "seq-length") or DEFAULT_SEQ_LEN
    num_layers = _megatron_value(flags, "num-layers")
    try:
        config = S2AttentionConfig.from_section(section, num_layers=num_layers, num_attention_heads=num_heads)
    except S2ConfigError as err:
        raise S2ConfigError(f"{path}: {err}") from None
    if not 0 <= layer < config.num_layers:
        raise S2ConfigError(f"--layer {layer}: {path} has layers 0..{config.num_layers - 1} (numbered from 0)")
    return config.layers[layer].pattern, num_heads, num_kv_heads or num_heads, seq_len


def pattern_from_options(preset, num_heads: int, **options) -> S2Pattern:
    """The pattern of ``--preset`` (or the defaults) with the options that were given (not None)."""
    given = {k: v for k, v in options.items() if v is not None}
    if preset == "phi3_small":
        return S2Pattern.phi3_small(**given)
    if preset == "dkernel":
        return S2Pattern.dkernel(num_heads, **given)
    if preset == "window":
        return S2Pattern.window(**given)
    return S2Pattern(**given)


def describe(pattern: S2Pattern) -> str:
    if pattern.is_dense:
        return f"dense (block {pattern.block_size})"
    if pattern.is_window:
        return f"window-only (no stripes), block {pattern.block_size}, local {pattern.local_blocks}"
    return (f"block {pattern.block_size}, local {pattern.local_blocks}, stride {pattern.vert_stride}, "
            f"{pattern.head_pattern}")


def draw_layout(pattern: S2Pattern, num_heads: int, num_kv_heads: int, seq_len: int, show_heads: int):
    """``(figure, missing)``: the figure and the number of causal block pairs no head reads."""
    mask = s2_block_mask(pattern, num_heads, num_kv_heads, seq_len)
    heads = list(range(min(show_heads, num_heads)))
    coverage = mask.sum(0)
    causal = torch.ones_like(coverage, dtype=torch.bool).tril()
    missing = int((causal & (coverage == 0)).sum())
    density = mask.float().mean().item() * 2  # share of the causal half (block level)

    fig, axes = plt.subplots(1, len(heads) + 1, figsize=(3.2 * (len(heads) + 1), 3.6))
    for ax, head in zip(axes, heads):
        ax.imshow(mask[head].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {head}: {int(mask[head].sum())} blocks", fontsize=9)
    # Counts start at 1 (the colour map); 0 falls under it (white); not causal is NaN (grey).
    colours = plt.get_cmap("viridis").with_extremes(under=UNCOVERED_COLOUR, bad=NON_CAUSAL_COLOUR)
    shown = coverage.float().masked_fill(~causal, float("nan"))
    image = axes[-1].imshow(shown.numpy(), cmap=colours, norm=Normalize(0.5, max(int(coverage.max()), 1) + 0.5),
                            interpolation="nearest")
    axes[-1].set_title(f"union of {num_heads} heads\n(missing causal pairs, white: {missing})", fontsize=9)
    bar = fig.colorbar(image, ax=axes[-1], fraction=0.046, label="heads computing the pair")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    for ax in axes:
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        for axis in (ax.xaxis, ax.yaxis):  # whole blocks, few enough labels not to overlap
            axis.set_major_locator(MaxNLocator(nbins=5, integer=True, steps=[1, 2, 4, 8, 10]))
    fig.suptitle(f"S2 layout: seq {seq_len}, {describe(pattern)}; per-head density {density:.2f} of causal",
                 fontsize=10)
    fig.tight_layout()
    return fig, missing


def plot_layout(pattern: S2Pattern, num_heads: int, num_kv_heads: int, seq_len: int, show_heads: int, out: str):
    """Draw into ``out``; returns the number of causal block pairs no head reads."""
    fig, missing = draw_layout(pattern, num_heads, num_kv_heads, seq_len, show_heads)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return missing


def main(argv=None):
    args = parse_args(argv)
    try:
        draw_from_args(args)
    except (S2ConfigError, OSError) as err:  # read_config_file reports bad YAML as S2ConfigError
        sys.exit(f"plot_layout.py: error: {err}")


def draw_from_args(args):
    if args.config:
        pattern, num_heads, num_kv, seq_len = layer_from_config(args.config, args.layer, args.num_heads,
                                                                args.num_kv_heads, args.seq_len)
        if pattern is None:
            pattern = S2Pattern.dense()
        origin = f"{args.config} layer {args.layer}: "
    else:
        num_heads = args.num_heads or DEFAULT_NUM_HEADS
        num_kv, seq_len = args.num_kv_heads or num_heads, args.seq_len or DEFAULT_SEQ_LEN
        pattern = pattern_from_options(args.preset, num_heads, **{k: getattr(args, k) for k in PATTERN_OPTIONS})
        origin = f"preset {args.preset}: " if args.preset else ""
    blocks = math.ceil(seq_len / pattern.block_size)
    missing = plot_layout(pattern, num_heads, num_kv, seq_len, args.show_heads, args.out)
    print(f"wrote {args.out}: {origin}{describe(pattern)}, {num_heads} query / {num_kv} KV heads, "
          f"{blocks}x{blocks} blocks, {missing} causal block pairs read by no head")


if __name__ == "__main__":
    main()
