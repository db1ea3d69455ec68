"""Pretrain a GPT model with S2 (sparsely-sharded) attention on Megatron-Core's training loop.

Shaped like Megatron-LM's ``pretrain_gpt.py`` for megatron-core 0.19.2 (batch, loss, forward step,
datasets, model provider, ``__main__``; ``parse_and_validate_args`` -> ``gpt_config_from_args`` ->
``pretrain_cfg_container_from_args`` -> ``pretrain``); every Megatron flag keeps its meaning. The model
is Megatron's ``GPTModel`` built from the S2 block spec, one layer spec per layer. Extra flags:

  --s2-config PATH.yaml       per-layer S2 attention (configs/*.yaml; docs/training.md). The file may
                              also hold a ``megatron:`` section of default flags for the model shape
                              and training; flags given on the command line win.
  --s2-override KEY=VALUE     change one key of the S2 config (repeatable), e.g. vert_stride=8
  --allow-s2-layout-change    resume from a checkpoint trained with a different S2 layout

Argument handling, checks, logging and the process set-up live in ``megatron_s2.training``. Without a
GPU the run goes through ``megatron_s2.training.cpu_compat`` (slow; for tests and demos).
"""

# Captured before the heavy imports, as pretrain_gpt.py does, for Megatron's start-up report.
import time

_PROGRAM_START_TIME = time.time()

import sys
from functools import partial
from typing import Optional

import torch

from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
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
from megatron.training import get_args, get_timers, pretrain, print_rank_0, set_startup_timestamps
import megatron.training.training as megatron_training
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from megatron_s2.training.launch import cli
from megatron_s2.training.model import build_model_config
from megatron_s2.training.startup import prepare_training

BATCH_KEYS = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "labels", "loss_mask",
              "max_seqlen", "position_ids", "tokens")


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


# -- model and entry -------------------------------------------------------------------------------


def model_provider(args, s2_config):
    """Megatron's GPTModelConfig with the S2 block spec as its layer spec (``pretrain`` builds it)."""
    return build_model_config(args, s2_config)


def main(argv: Optional[list] = None) -> None:
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    args, s2_config = prepare_training(list(sys.argv[1:] if argv is None else argv))
    train_valid_test_datasets_provider.is_distributed = True
    config_container = pretrain_cfg_container_from_args(args, model_provider(args, s2_config))
    pretrain(config_container, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step)


if __name__ == "__main__":
    cli(main)
