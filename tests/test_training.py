"""megatron_s2.training without a training run: the shipped config files as Megatron flags and S2
layouts, and the model config built from the arguments."""

import argparse
import os

import pytest
from megatron.training.arguments import add_megatron_arguments, validate_args

from megatron_s2.core.config import read_config_file
from megatron_s2.training.arguments import add_s2_arguments, flags_to_argv
from megatron_s2.training.model import build_model_config
from megatron_s2.training.validation import resolve_s2_config
from tests.helpers import ROOT


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.endswith(".yaml")))
def test_shipped_configs_are_valid_megatron_flags_and_s2_layouts(name):
    flags, s2_section = read_config_file(os.path.join(ROOT, "configs", f"{name}.yaml"))
    parser = add_s2_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(flags_to_argv(flags))  # a misspelt flag exits here
    config = resolve_s2_config(args, s2_section)
    assert config.num_layers == args.num_layers and config.sparse_layers


def test_model_config_keeps_the_rope_scaling_factor():
    """Megatron's gpt_config_from_args drops --rope-scaling-factor; an imported Llama 3.2 (factor
    32) must keep training with 32, not the default 8."""
    flags, s2_section = read_config_file(os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser = add_s2_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(flags_to_argv(flags) + [
        "--mock-data", "--use-rope-scaling", "--rope-scaling-factor", "32"])
    args.rank, args.world_size = 0, 1
    validate_args(args)
    model_config = build_model_config(args, resolve_s2_config(args, s2_section))
    assert model_config.rope_scaling and model_config.rope_scaling_factor == 32
