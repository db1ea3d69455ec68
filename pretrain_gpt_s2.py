"""Pretrain a GPT model with S2 (sparsely-sharded) attention on Megatron-Core's training loop.

Same shape and flags as Megatron-LM's ``pretrain_gpt.py`` for megatron-core 0.19.2
(``parse_and_validate_args`` -> ``gpt_config_from_args`` -> ``pretrain_cfg_container_from_args`` ->
``pretrain``); every Megatron flag keeps its meaning. The model is Megatron's ``GPTModel`` built from
the S2 block spec, one layer spec per layer. Extra flags:

  --s2-config PATH.yaml       per-layer S2 attention (configs/*.yaml; docs/training.md). The file may
                              also hold a ``megatron:`` section of default flags for the model shape
                              and training; flags given on the command line win.
  --s2-override KEY=VALUE     change one key of the S2 config (repeatable), e.g. vert_stride=8
  --allow-s2-layout-change    resume from a checkpoint trained with a different S2 layout

Without a GPU the run goes through ``megatron_s2.training.cpu_compat`` (slow; for tests and demos).
"""

# Captured before the heavy imports, as pretrain_gpt.py does, for Megatron's start-up report.
import time

_PROGRAM_START_TIME = time.time()

import argparse
import difflib
import multiprocessing
import os
import re
import signal
import socket
import sys
import traceback
from functools import partial, wraps
from typing import Optional

import torch
import yaml

from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.parallel_state import get_context_parallel_group
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import (
    flatten_batch_for_packed_sequences,
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import (
    get_args,
    get_tensorboard_writer,
    get_timers,
    get_wandb_writer,
    pretrain,
    print_rank_0,
    set_startup_timestamps,
)
import megatron.training.training as megatron_training
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import add_megatron_arguments, parse_and_validate_args
from megatron.training.utils import (
    get_blend_and_blend_per_split,
    is_first_or_last_pipeline_stage,
    is_last_rank,
)

from megatron_s2.training import checkpoint_layout, cpu_compat
from megatron_s2.core.config import S2AttentionConfig, split_config_file
from megatron_s2.ops.flops import sparse_aware_flops
from megatron_s2.ops.pattern import S2ConfigError

# Megatron's batch keys in the order get_batch returns them (alphabetical, as pretrain_gpt.py).
BATCH_KEYS = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "labels", "loss_mask",
              "max_seqlen", "position_ids", "tokens")


class TrainingSetupError(ValueError):
    """A problem with the run's inputs found before training starts; the message says the fix."""


# -- arguments -----------------------------------------------------------------------------------


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


def read_config_file(path: str) -> tuple:
    """``(megatron flag defaults, S2 section)`` of a config file (``split_config_file``)."""
    if not os.path.isfile(path):
        raise TrainingSetupError(f"--s2-config {path}: no such file. Fix: give the path of a YAML "
                                 "file, e.g. configs/quickstart.yaml")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise TrainingSetupError(f"--s2-config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise TrainingSetupError(f"--s2-config {path}: expected a YAML mapping at the top level")
    try:
        return split_config_file(data)
    except S2ConfigError as err:
        raise TrainingSetupError(f"--s2-config {path}: {err}") from None


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


def parse_arguments(argv: list, extra_args_provider=add_s2_arguments, early_checks=()):
    """Megatron's parse_and_validate_args with the S2 flags and the config file's flag defaults.

    The config file's keys, the S2 config and ``early_checks`` (functions of the parsed, not yet
    validated arguments) run first: Megatron's validation prints an ~800-line argument listing and
    asserts on some inputs, so our errors, which name the fix, come before it.
    """
    path = _config_path_from_argv(argv)
    flags, s2_section = read_config_file(path) if path else ({}, {})
    parser = extra_args_provider(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    known_flags = [flag for action in parser._actions for flag in action.option_strings]
    check_config_flags(path, flags, known_flags)
    # Defaults from the file go first so that the same flag on the command line wins.
    full_argv = flags_to_argv(flags, known_flags) + argv
    raw_args = parser.parse_args(full_argv)
    check_before_megatron(raw_args, s2_section)
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
    return args, s2_section


def check_before_megatron(args, s2_section: dict) -> None:
    """Checks of the raw arguments that Megatron would otherwise fail later or with a bare assert."""
    cp = args.context_parallel_size
    if cp > 1 and args.seq_length and args.seq_length % (2 * cp):
        unit = 2 * cp
        lower, upper = args.seq_length // unit * unit, (args.seq_length // unit + 1) * unit
        raise TrainingSetupError(
            f"--seq-length {args.seq_length} is not a multiple of 2 * --context-parallel-size = {unit}: "
            f"context parallelism cuts every sequence into {unit} equal chunks. Fix: use --seq-length "
            f"{upper}" + (f" or {lower}" if lower else "") + " (S2 layers also need whole blocks per "
            "chunk), or another context-parallel size")
    # With --use-checkpoint-args the model shape comes from the checkpoint: checked once Megatron
    # has read it (main repeats both checks on the validated arguments).
    if args.num_layers and args.num_attention_heads and not args.use_checkpoint_args:
        checkpoint_layout.check_resume(args, resolve_s2_config(args, s2_section))


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


class ScheduleExplainingOptimizerParamScheduler(OptimizerParamScheduler):
    """Megatron's scheduler; a learning-rate schedule that differs from the resumed checkpoint's
    (e.g. a longer --train-iters) fails with the two flags that resolve it, not a bare assert."""

    def _check_and_set(self, cls_value, sd_value, name):
        if cls_value != sd_value and not (self.override_opt_param_scheduler
                                          or self.use_checkpoint_opt_param_scheduler):
            steps = " (in samples: iterations x global batch size)" if "iterations" in name else ""
            raise TrainingSetupError(
                f"the checkpoint in --load was trained with another learning-rate schedule: {name} "
                f"{sd_value} in the checkpoint, {cls_value} from this run's flags{steps}. Fix: to "
                "continue with this run's schedule (e.g. a longer --train-iters), add "
                "--override-opt_param-scheduler; to keep the checkpoint's schedule, add "
                "--use-checkpoint-opt_param-scheduler (docs/training.md, 'Continue training')")
        return super()._check_and_set(cls_value, sd_value, name)


# -- model -----------------------------------------------------------------------------------------


def layer_spec_provider(s2_config: S2AttentionConfig, seq_length: int):
    """GPTModelConfig.transformer_layer_spec: the block spec with one layer spec per layer."""
    from megatron_s2.core.specs import get_s2_gpt_block_spec

    def spec(model_config, vp_stage: Optional[int] = None):
        transformer = model_config.transformer
        return get_s2_gpt_block_spec(
            transformer, s2_config, seq_length=seq_length,
            use_transformer_engine=transformer.transformer_impl == "transformer_engine",
            normalization=transformer.normalization, qk_l2_norm=transformer.qk_l2_norm,
            vp_stage=vp_stage)

    return spec


def move_cpu_initialized_model_to_gpu(model_chunks):
    """Pre-wrap hook: megatron-core 0.19.2's config-container builder leaves a model built with
    --use-cpu-initialization on the CPU (its get_model() moved it); put it on this rank's GPU."""
    device = torch.cuda.current_device()
    return [chunk.cuda(device) for chunk in model_chunks]


def build_model_config(args, s2_config: S2AttentionConfig):
    """Megatron's GPTModelConfig from the flags, with the S2 block spec as its layer spec."""
    model_config = gpt_config_from_args(args)
    # megatron-core 0.19.2's gpt_config_from_args copies --use-rope-scaling but not the factor
    # (the model would keep its default 8, e.g. for Llama 3.2's 32).
    model_config.rope_scaling_factor = args.rope_scaling_factor
    model_config.transformer_layer_spec = layer_spec_provider(s2_config, args.seq_length)
    if args.use_cpu_initialization and not cpu_compat.cpu_mode_requested():
        model_config.pre_wrap_hooks.append(move_cpu_initialized_model_to_gpu)
    return model_config


# -- data and steps (as pretrain_gpt.py) -----------------------------------------------------------


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch: broadcast over TP, sliced over CP (with the CP group given)."""
    args = get_args()
    has_cu_seqlens = args.dataloader_inter_document_masking
    if not is_first_or_last_pipeline_stage(vp_stage) and not has_cu_seqlens:
        return {key: None for key in BATCH_KEYS}
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = next(data_iterator)
        for key in BATCH_KEYS:
            value = batch.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=has_cu_seqlens,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = flatten_batch_for_packed_sequences(batch)
    # Without cp_group, 0.19.2 splits over the WORLD group (wrong with TP or DP > 1).
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=get_context_parallel_group(),
                                      use_per_sequence_balancing=has_cu_seqlens)
    return {key: batch.get(key) for key in BATCH_KEYS}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed token losses and token count, as pretrain_gpt.py (Megatron averages across ranks)."""
    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if args.check_for_nan_in_loss_and_grad:
        rerun_state_machine = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun_state_machine.validate_result(
                result=loss, rejection_func=reject, message=f"found {what} in local forward loss",
                tolerance=0.0, fatal=True)
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    packed_seq_params = None
    if batch["cu_seqlens"] is not None:
        cu_seqlens = batch["cu_seqlens"].squeeze(0)
        megatron_training.update_seqlen_stats_from_cu_seqlens(cu_seqlens)
        padded = batch["cu_seqlens_padded"]
        padded = padded.squeeze(0) if padded is not None else None
        cu = padded if padded is not None else cu_seqlens
        max_seqlen = int(batch["max_seqlen"].max().item())
        packed_seq_params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    output_tensor = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                          labels=batch["labels"], loss_mask=batch["loss_mask"],
                          packed_seq_params=packed_seq_params)
    return output_tensor, partial(loss_func, batch["loss_mask"])


def is_dataset_built_on_rank(vp_stage=None):
    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def core_gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
        inter_document_masking=args.dataloader_inter_document_masking,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's own builders: indexed .bin/.idx datasets, blends and splits, or mock data."""
    args = get_args()
    config = core_gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, validation_samples_from_resume_point(train_val_test_num_samples),
        partial(is_dataset_built_on_rank, vp_stage=vp_stage), config).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


def validation_samples_from_resume_point(train_val_test_num_samples) -> list:
    """megatron-core 0.19.2 sizes the validation set for the evaluations of a run started at
    iteration 0, but a resumed run reads it from the checkpoint's ``consumed_valid_samples`` on:
    resumed with another --eval-interval or --train-iters, the final evaluation ran out of data
    (StopIteration). Count the samples already consumed as well."""
    train, valid, test = train_val_test_num_samples
    if valid is not None:  # None: --full-validation reads the whole split
        valid += get_args().consumed_valid_samples
    return [train, valid, test]


# -- logging -------------------------------------------------------------------------------------


# What ProgressLine prints, for the tools and tests that read training logs. Rates are per GPU, or
# per rank (process) in CPU mode.
PROGRESS_LINE = re.compile(
    r"^\[s2\] iteration (?P<iteration>\d+)/\d+ \| loss (?P<loss>\S+) \| tokens/s/(?:GPU|rank) (?P<tokens_per_s>[\d,]+) \| "
    r"TFLOP/s/(?:GPU|rank) (?P<tflops>[\d.]+) \(S2-aware\) \| step (?P<step_ms>[\d.]+) ms"
    r"(?: \| peak mem (?P<peak_gib>[\d.]+) GiB)?", re.M)


def read_progress(text: str) -> dict:
    """``{iteration: fields as printed}`` of the progress lines in a training log."""
    return {int(m["iteration"]): m.groupdict() for m in PROGRESS_LINE.finditer(text)}


class ProgressLine:
    """One line per --log-interval: iteration, loss, tokens/s/GPU, TFLOP/s/GPU (S2-aware), step
    time, peak GPU memory (this rank), ETA; in CPU mode the rates are per rank.

    Wraps Megatron's ``training_log`` (it keeps printing its own detailed line) and writes the same
    numbers to TensorBoard / wandb under ``s2/``.
    """

    def __init__(self, megatron_training_log, flops_fn):
        self._training_log = megatron_training_log
        self._flops_fn = flops_fn
        self._last_logged = None

    def __call__(self, loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        args = get_args()
        if self._last_logged is None:
            self._last_logged = iteration - 1  # first step of this process (fresh or resumed)
        first = kwargs.get("is_first_iteration", False)
        log_now = iteration % args.log_interval == 0 or first
        if log_now:
            # Megatron's own interval timer (it pauses during evaluation); read before it resets.
            elapsed = get_timers()("interval-time").elapsed(barrier=False, reset=False)
        result = self._training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        if not log_now:
            return result
        seconds_per_step = max(elapsed, 1e-9) / max(1, iteration - self._last_logged)
        if not first:  # Megatron keeps its timer running through the first iteration's log
            self._last_logged = iteration
        if not is_last_rank():
            return result
        tokens_per_step = args.global_batch_size * args.seq_length
        tokens_per_s_device = tokens_per_step / seconds_per_step / args.world_size
        tflops_device = self._flops_fn(args, args.global_batch_size) / seconds_per_step / args.world_size / 1e12
        eta = (args.train_iters - iteration) * seconds_per_step if args.train_iters else 0.0
        loss = loss_dict.get("lm loss")
        loss_text = f"{float(loss):.9g}" if loss is not None else "n/a"
        unit = "rank" if cpu_compat.cpu_mode_requested() else "GPU"
        line = (f"[s2] iteration {iteration}/{args.train_iters} | loss {loss_text} | "
                f"tokens/s/{unit} {tokens_per_s_device:,.0f} | TFLOP/s/{unit} {tflops_device:.2f} (S2-aware) | "
                f"step {seconds_per_step * 1000:.1f} ms")
        scalars = {f"s2/tokens_per_s_per_{unit.lower()}": tokens_per_s_device,
                   f"s2/tflops_per_{unit.lower()}": tflops_device}
        if torch.cuda.is_available():
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
            line += f" | peak mem {peak_gib:.2f} GiB"
            scalars["s2/peak_memory_gib"] = peak_gib
        print(f"{line} | ETA {_format_seconds(eta)}", flush=True)
        writer = get_tensorboard_writer()
        if writer:
            for name, value in scalars.items():
                writer.add_scalar(name, value, iteration)
        wandb_writer = get_wandb_writer()
        if wandb_writer:
            wandb_writer.log(scalars, iteration)
        return result


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def print_s2_config(args, s2_config: S2AttentionConfig) -> None:
    """Start-up table of the S2 layout. TensorBoard (as text) and wandb (in the run config) get the
    settings from Megatron itself: both record every argument, ``args.s2_attention`` included."""
    if args.rank == 0:  # before torch.distributed starts, so not print_rank_0
        print(s2_config.summary(seq_length=args.seq_length), flush=True)


def install_sparse_aware_logging(s2_config: S2AttentionConfig) -> None:
    """Megatron's throughput (TFLOP/s/GPU) counts S2 work as done; add the progress line.

    Both are module-level functions that ``megatron.training.training.train`` looks up at call
    time, so replacing them there is the one seam needed.
    """
    patterns = [layer.pattern for layer in s2_config.layers]
    flops_fn = sparse_aware_flops(megatron_training.num_floating_point_operations, patterns)
    megatron_training.num_floating_point_operations = flops_fn
    megatron_training.training_log = ProgressLine(megatron_training.training_log, flops_fn)


def use_shipped_dataset_helpers() -> None:
    """The megatron-core wheel ships the compiled dataset helper but not its Makefile; Megatron's
    start-up would try to rebuild it with `make` and exit. Use the shipped one."""
    import megatron.core.datasets.utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let Megatron compile it as usual
    dataset_utils.compile_helpers = lambda: None


# -- entry -----------------------------------------------------------------------------------------


def default_single_process_rendezvous() -> None:
    """`python pretrain_gpt_s2.py ...` without torchrun: one rank, rendezvous on a free local port."""
    if "MASTER_ADDR" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def scope_exit_signal_handler_to_training(args) -> None:
    """--exit-signal-handler: SIGTERM means "save a checkpoint and exit" while Megatron's ``train``
    runs, and a plain exit before and after it.

    Megatron installs its handler at start-up for the life of the process, but only the training
    loop checks the flag it sets: elsewhere (start-up, the final evaluation, a crash's exit) SIGTERM
    was ignored and a stuck process could only be killed. ``train`` is looked up at call time, so
    wrapping it there scopes the handler.
    """
    if not args.exit_signal_handler:
        return
    exit_signal = args.exit_signal
    megatron_handler = signal.signal(exit_signal, signal.SIG_DFL)
    train = megatron_training.train

    @wraps(train)
    def train_saving_on_signal(*train_args, **train_kwargs):
        signal.signal(exit_signal, megatron_handler)
        try:
            return train(*train_args, **train_kwargs)
        finally:
            signal.signal(exit_signal, signal.SIG_DFL)

    megatron_training.train = train_saving_on_signal


def main(argv: Optional[list] = None) -> None:
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    argv = list(sys.argv[1:] if argv is None else argv)
    default_single_process_rendezvous()
    cpu = cpu_compat.cpu_mode_requested()
    if cpu:
        cpu_compat.activate()
    # The inputs are checked in there, before Megatron prints its argument listing.
    args, s2_section = parse_arguments(argv, early_checks=(check_schedule, check_data_inputs))
    scope_exit_signal_handler_to_training(args)
    if cpu:
        cpu_compat.apply_cpu_arguments(args)
    # Before torch.distributed starts or any GPU memory is taken.
    s2_config = resolve_s2_config(args, s2_section)
    differences = checkpoint_layout.check_resume(args, s2_config)
    if differences and args.rank == 0:  # torch.distributed is not up yet: print_rank_0 would not filter
        print("WARNING: --allow-s2-layout-change: resuming with a different S2 layout:\n  "
              + "\n  ".join(differences), flush=True)
    checkpoint_layout.attach_to_args(args, s2_config)
    print_s2_config(args, s2_config)
    install_sparse_aware_logging(s2_config)
    megatron_training.OptimizerParamScheduler = ScheduleExplainingOptimizerParamScheduler
    use_shipped_dataset_helpers()

    train_valid_test_datasets_provider.is_distributed = True
    config_container = pretrain_cfg_container_from_args(args, build_model_config(args, s2_config))
    pretrain(config_container, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step)


CHILD_STOP_GRACE_S = 3.0


def stop_child_processes(daemonic_only: bool = False, grace_s: float = CHILD_STOP_GRACE_S) -> None:
    """Terminate this process's child processes (or only the daemonic ones), then kill those still
    alive after ``grace_s``.

    At exit Python terminates daemonic children and waits for them without a time limit; Megatron's
    DataLoader workers (and the helpers it forks after start-up) ignore SIGTERM under
    --exit-signal-handler, so that wait would never end.
    """
    children = [child for child in multiprocessing.active_children() if child.daemon or not daemonic_only]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


def exit_after_crash(code: int = 1) -> None:
    """End a crashed rank now: its traceback printed, its logs flushed, all its children stopped.

    The normal interpreter exit can hang here (helper processes, threads blocked in a collective
    with a rank that is gone); under a scheduler that would hold the allocation until its limit.
    """
    traceback.print_exc()
    writer = get_tensorboard_writer()
    if writer:
        writer.flush()
    stop_child_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli(entry=main) -> None:
    """Run ``entry``; input errors (their messages say the fix) end it with one line per job, not a
    traceback per rank; any other error ends the rank at once with exit code 1. Every exit, the
    save-and-exit after SIGTERM included, is bounded in time."""
    try:
        entry()
    except (S2ConfigError, TrainingSetupError, checkpoint_layout.S2LayoutMismatchError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        exit_after_crash(130)
    except Exception:
        exit_after_crash()
    finally:
        stop_child_processes(daemonic_only=True)


if __name__ == "__main__":
    cli()
