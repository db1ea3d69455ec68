"""Checks of a run's inputs before Megatron starts, and the one place the S2 config is resolved and
validated against Megatron's arguments (everything downstream trusts it)."""

from __future__ import annotations

import os

from megatron.training.utils import get_blend_and_blend_per_split

from ..core.config import S2AttentionConfig
from ..ops.pattern import S2ConfigError
from . import checkpoint_layout


class TrainingSetupError(ValueError):
    """A problem with the run's inputs found before training starts; the message says the fix."""


def check_before_megatron(args) -> None:
    """Checks of the raw arguments that Megatron would otherwise fail later or with a bare assert,
    and of the S2 environment variables that the kernels would otherwise read mid-training."""
    from ..ops import kernel

    try:
        kernel.stored_ds_budget()
    except ValueError as exc:
        raise TrainingSetupError(str(exc)) from None
    cp = args.context_parallel_size
    if cp > 1 and args.seq_length and args.seq_length % (2 * cp):
        unit = 2 * cp
        lower, upper = args.seq_length // unit * unit, (args.seq_length // unit + 1) * unit
        raise TrainingSetupError(
            f"--seq-length {args.seq_length} is not a multiple of 2 * --context-parallel-size = {unit}: "
            f"context parallelism cuts every sequence into {unit} equal chunks. Fix: use --seq-length "
            f"{upper}" + (f" or {lower}" if lower else "") + " (S2 layers also need whole blocks per "
            "chunk), or another context-parallel size")


def shape_known_before_megatron(args) -> bool:
    """With --use-checkpoint-args the model shape comes from the checkpoint, read by Megatron."""
    return bool(args.num_layers and args.num_attention_heads and not args.use_checkpoint_args)


def resolve_s2_config(args, s2_section: dict) -> S2AttentionConfig:
    """The validated per-layer S2 settings of this run (all dense without --s2-config)."""
    num_query_groups = args.num_query_groups if args.group_query_attention else None
    source = f"--s2-config {args.s2_config}" if args.s2_config else "the S2 config"
    try:
        config = S2AttentionConfig.from_section(
            s2_section, num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
            overrides=args.s2_override)
        config.validate(
            num_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=num_query_groups,
            seq_length=args.seq_length,
            tensor_parallel_size=args.tensor_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
        )
    except S2ConfigError as err:
        raise S2ConfigError(f"{source}: {err}") from None
    return config


def check_layout_against_checkpoint(args, s2_config: S2AttentionConfig) -> None:
    """Refuse to resume a checkpoint trained with another S2 layout, unless --allow-s2-layout-change
    (then say what changed)."""
    differences = checkpoint_layout.check_resume(args, s2_config)
    # torch.distributed is not up yet: print_rank_0 would not filter
    if differences and int(os.environ.get("RANK", "0")) == 0:
        print("WARNING: --allow-s2-layout-change: resuming with a different S2 layout:\n  "
              + "\n  ".join(differences), flush=True)


def check_schedule(args) -> None:
    """Megatron only asserts this deep inside the scheduler; say it plainly, before start-up."""
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.train_iters and args.lr_warmup_iters and args.lr_warmup_iters >= decay_iters:
        raise TrainingSetupError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the decay length "
            f"({'--lr-decay-iters' if args.lr_decay_iters else '--train-iters'} {decay_iters}). "
            "Fix: train longer or lower --lr-warmup-iters")


def check_data_inputs(args) -> None:
    """Missing .bin/.idx files fail here, with the fix, rather than deep inside the data builders."""
    if args.mock_data:
        return
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    prefixes = list(blend[0]) if blend else []
    for split in blend_per_split or []:
        if split:
            prefixes += list(split[0])
    if not prefixes:
        raise TrainingSetupError(
            "no training data: give --data-path PREFIX (files PREFIX.bin and PREFIX.idx, made by "
            "tools/preprocess_data.py) or --train-data-path/--valid-data-path, or --mock-data for "
            "synthetic tokens")
    for prefix in prefixes:
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise TrainingSetupError(
                f"data prefix {prefix!r}: missing {' and '.join(missing)}. Fix: build them with "
                f"`python tools/preprocess_data.py --input <text or .jsonl> --output-prefix {prefix}` "
                "or check the path (give the prefix, without .bin/.idx)")
