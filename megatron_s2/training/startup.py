"""Everything a run does before Megatron's ``pretrain``: the process set-up, the arguments and S2
config (validated once), and the S2 additions to Megatron's training loop."""

from __future__ import annotations

from megatron.training import get_wandb_writer

from ..core.config import S2AttentionConfig
from . import checkpoint_layout, cpu_compat, seams
from .arguments import add_s2_arguments, parse_arguments
from .launch import default_single_process_rendezvous
from .validation import check_data_inputs, check_schedule


def prepare_process_and_arguments(argv: list, extra_args_provider=add_s2_arguments, early_checks=()) -> tuple:
    """``(args, s2_config)`` of a job started with or without torchrun, on a GPU or (slowly) without."""
    default_single_process_rendezvous()
    cpu = cpu_compat.cpu_mode_requested()
    if cpu:
        cpu_compat.activate()
    args, s2_config = parse_arguments(argv, extra_args_provider, early_checks)
    if cpu:
        cpu_compat.apply_cpu_arguments(args)
    return args, s2_config


def prepare_training(argv: list) -> tuple:
    """``(args, s2_config)`` of a training run, with the checkpoint's S2 settings attached to the
    arguments and Megatron's training loop extended (``seams``); before torch.distributed starts."""
    # The inputs are checked in there, before Megatron prints its argument listing.
    args, s2_config = prepare_process_and_arguments(argv, early_checks=(check_schedule, check_data_inputs))
    checkpoint_layout.attach_to_args(args, s2_config)
    print_s2_config(args, s2_config)
    seams.install(args, s2_config)
    return args, s2_config


def print_s2_config(args, s2_config: S2AttentionConfig) -> None:
    """Start-up table of the S2 layout. TensorBoard gets the settings from Megatron itself (it writes
    every argument as text when training starts, ``args.s2_attention`` included); Megatron's wandb
    writer copied the arguments into the run config while parsing them, before the S2 settings
    existed, so they are added to it here."""
    if args.rank == 0:  # before torch.distributed starts, so not print_rank_0
        print(s2_config.summary(seq_length=args.seq_length), flush=True)
    wandb_writer = get_wandb_writer()
    if wandb_writer:
        wandb_writer.config.update({checkpoint_layout.ARGS_ATTRIBUTE: s2_config.to_dict()})
