"""Command line and config file -> Megatron's validated arguments plus the run's S2 config.

A config file (``--s2-config``) holds the S2 section and optionally a ``megatron:`` section of flag
defaults; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import socket
import sys
from typing import Optional

from megatron.training.arguments import add_megatron_arguments, parse_and_validate_args

from ..core.config import read_config_file
from .validation import (
    TrainingSetupError,
    check_before_megatron,
    check_layout_against_checkpoint,
    resolve_s2_config,
    shape_known_before_megatron,
)


def _escape_stray_percent_signs(parser) -> None:
    """megatron-core 0.19.2 has a bare '%' in one help text, which makes --help crash."""
    for action in parser._actions:
        if not action.help or "%" not in action.help:
            continue
        try:
            action.help % dict(vars(action), prog=parser.prog)
        except (ValueError, TypeError, KeyError):
            action.help = re.sub(r"(?<!%)%(?![(%])", "%%", action.help)


def add_s2_arguments(parser):
    _escape_stray_percent_signs(parser)
    group = parser.add_argument_group(title="S2 attention")
    group.add_argument("--s2-config", type=str, default=None, metavar="PATH.yaml",
                       help="YAML file with the per-layer S2 attention settings (and optionally a "
                       "'megatron:' section of default flags). Without it every layer is dense, unless "
                       "--s2-override is given: overrides alone apply to S2 on every layer with the defaults.")
    group.add_argument("--s2-override", action="append", default=[], metavar="KEY=VALUE",
                       help="Override one key of the S2 config, e.g. vert_stride=8 or layers=DSSS "
                       "(repeatable; applied in order).")
    group.add_argument("--allow-s2-layout-change", action="store_true",
                       help="Allow resuming from a checkpoint saved with a different S2 layout.")
    return parser


def megatron_parser(extra_args_provider=add_s2_arguments) -> argparse.ArgumentParser:
    """pretrain_gpt_s2.py's argument parser: Megatron's flags and ``extra_args_provider``'s (the S2 ones)."""
    return extra_args_provider(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def megatron_flag(name, known_flags=()) -> str:
    """The flag a config key stands for: ``num-layers``, ``num_layers`` and ``--num-layers`` all mean
    --num-layers; the few Megatron flags spelt with underscores (--override-opt_param-scheduler)
    keep them when ``known_flags`` lists them."""
    written = "--" + str(name).lstrip("-")
    return written if written in known_flags else written.replace("_", "-")


def flags_to_argv(flags: dict, known_flags=()) -> list:
    """``{'num-layers': 4, 'swiglu': True, 'data-path': [a, b]}`` -> Megatron command-line tokens."""
    argv = []
    for name, value in flags.items():
        flag = megatron_flag(name, known_flags)
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag] + [str(v) for v in value]
        else:
            argv += [flag, str(value)]
    return argv


def check_config_flags(path: str, flags: dict, known_flags) -> None:
    """Every key of the file's ``megatron:`` section must be a flag of this script; argparse would
    only say so after its ~750-line usage text, without naming the file."""
    for name in flags:
        flag = megatron_flag(name, known_flags)
        if flag not in known_flags:
            close = difflib.get_close_matches(flag, known_flags, n=1)
            hint = f"did you mean '{close[0][2:]}'? " if close else ""
            raise TrainingSetupError(
                f"--s2-config {path}: 'megatron:' key '{name}' is not a Megatron flag ({flag}). Fix: "
                f"{hint}Keys are flags without the leading --, as `python pretrain_gpt_s2.py --help` lists them")


def _config_path_from_argv(argv: list) -> Optional[str]:
    """The --s2-config value argparse will see (the last one given)."""
    path = None
    for i, token in enumerate(argv):
        if token == "--s2-config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--s2-config="):
            path = token.split("=", 1)[1]
    return path


def _use_offline_wandb_without_network(argv: list) -> None:
    """wandb is optional: with --wandb-project and no reachable server, log offline."""
    if "--wandb-project" not in " ".join(argv) or os.environ.get("WANDB_MODE"):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise TrainingSetupError("--wandb-project needs the wandb package. Fix: pip install wandb, "
                                 "or drop --wandb-project (TensorBoard logging needs no extra package)")
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        os.environ["WANDB_MODE"] = "offline"
        print("megatron_s2: wandb server unreachable, logging offline (sync later with `wandb sync`)",
              flush=True)


def parse_arguments(argv: list, extra_args_provider=add_s2_arguments, early_checks=()) -> tuple:
    """``(args, s2_config)``: Megatron's parse_and_validate_args with the S2 flags and the config
    file's flag defaults, and the run's S2 config, resolved and validated once.

    The config file's keys, the S2 config and ``early_checks`` (functions of the parsed, not yet
    validated arguments) run first: Megatron's validation prints an ~800-line argument listing and
    asserts on some inputs, so our errors, which name the fix, come before it. Only with
    --use-checkpoint-args, where the model shape comes from the checkpoint, is the S2 config
    resolved after Megatron has read it.
    """
    path = _config_path_from_argv(argv)
    flags, s2_section = read_config_file(path) if path else ({}, {})
    parser = megatron_parser(extra_args_provider)
    known_flags = [flag for action in parser._actions for flag in action.option_strings]
    check_config_flags(path, flags, known_flags)
    # Defaults from the file go first so that the same flag on the command line wins.
    full_argv = flags_to_argv(flags, known_flags) + argv
    raw_args = parser.parse_args(full_argv)
    check_before_megatron(raw_args)
    s2_config = None
    if shape_known_before_megatron(raw_args):
        s2_config = resolve_s2_config(raw_args, s2_section)
        check_layout_against_checkpoint(raw_args, s2_config)
    for check in early_checks:
        check(raw_args)
    _use_offline_wandb_without_network(full_argv)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]] + full_argv
    try:
        args = parse_and_validate_args(extra_args_provider=extra_args_provider,
                                       args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    finally:
        sys.argv = saved_argv
    if s2_config is None:
        s2_config = resolve_s2_config(args, s2_section)
        check_layout_against_checkpoint(args, s2_config)
    return args, s2_config
