"""Checkpoint I/O of the converters: Megatron torch_dist checkpoints read and written at any TP/PP
size, output folders written beside their target and swapped in only when complete, and the
command-line wrapper that turns bad input into one line."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from argparse import Namespace
from typing import Optional, Sequence


from ..core.config import S2AttentionConfig
from .convert import check_megatron_llama_args
from .megatron_model import (
    build_gpt_model,
    in_process_checkpoint_writes,
    s2_config_from_args,
    sharded_metadata,
    single_process_megatron,
)


TRACKER_FILE = "latest_checkpointed_iteration.txt"


CHECKPOINT_VERSION = 3.0


def run_tool(main) -> None:
    """Run a converter's ``main()``; bad input (the message says the fix) ends it with one line, not
    a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {err}")


def check_output_folder(path: str, flag: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work, to write into a folder that already holds files, unless ``overwrite``
    (an empty folder counts as new), and ever to replace a folder holding one of ``inputs``."""
    out = os.path.realpath(path)
    for source in inputs:
        source = os.path.realpath(source)
        if source == out or source.startswith(out + os.sep):
            raise FileExistsError(f"{flag} {path} would replace the input {source}. Fix: write to another folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists and is not empty. Fix: choose a new folder, "
                              "or pass --overwrite to replace it (it is replaced only once the new one is "
                              "complete)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag} {path} is a file, not a folder. Fix: choose a folder path")


@contextlib.contextmanager
def writing_folder(path: str):
    """Yield a new temporary folder beside ``path`` to write into; it becomes ``path`` only when the
    block succeeds (replacing an earlier ``path``), else it is deleted and ``path`` is left as it was.
    A failed conversion thus never leaves a half-written or half-replaced output."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # the permissions os.makedirs gives, not mkdtemp's 0700
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    previous = None
    if os.path.isdir(path) and os.listdir(path):
        previous = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.previous-", dir=parent)
        os.rename(path, os.path.join(previous, "old"))
    elif os.path.isdir(path):
        os.rmdir(path)
    os.rename(partial, path)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def resolve_checkpoint_dir(path: str, iteration: Optional[int] = None) -> str:
    """The torch_dist directory of a checkpoint: ``path`` itself, ``path/iter_NNNNNNN`` of the given
    iteration, or the one named in ``latest_checkpointed_iteration.txt``."""
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    if iteration is None:
        tracker = os.path.join(path, TRACKER_FILE)
        if not os.path.exists(tracker):
            raise FileNotFoundError(
                f"{path} is neither a torch_dist checkpoint directory (no metadata.json) nor a Megatron "
                f"save directory (no {TRACKER_FILE}); pass the --save directory of pretrain_gpt_s2.py")
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            return os.path.join(path, "release")
        iteration = int(text)
    directory = os.path.join(path, f"iter_{iteration:07d}")
    if not os.path.exists(os.path.join(directory, "metadata.json")):
        raise FileNotFoundError(
            f"{directory} is not a torch_dist checkpoint (no metadata.json); only --ckpt-format torch_dist "
            f"checkpoints are supported")
    return directory


def load_megatron_checkpoint(path: str, iteration: Optional[int] = None):
    """``(args, full_state_dict, s2_config)`` of a torch_dist checkpoint saved at any TP/PP size."""
    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()
    directory = resolve_checkpoint_dir(path, iteration)
    common = dist_checkpointing.load_common_state_dict(directory)
    args = common.get("args")
    if args is None:
        raise ValueError(f"{directory} holds no Megatron arguments ('args'): not a pretrain_gpt_s2.py checkpoint")
    check_megatron_llama_args(args)
    s2_config = s2_config_from_args(args)
    with single_process_megatron():
        model = build_gpt_model(args, s2_config)
        saved = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
        metadata = {**sharded_metadata(), **saved}
        sharded = model.sharded_state_dict(metadata=metadata)
        loaded = dist_checkpointing.load({"model": sharded}, directory)["model"]
        model.load_state_dict(loaded, strict=False)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return args, state, s2_config


def save_megatron_checkpoint(path: str, state: dict, args: Namespace, s2_config: S2AttentionConfig) -> str:
    """Write ``state`` (full, TP=1 names) as a torch_dist ``release`` checkpoint that
    ``pretrain_gpt_s2.py --load path`` reads at any TP/PP size; returns the checkpoint directory."""
    from megatron.core import dist_checkpointing

    directory = os.path.join(path, "release")
    os.makedirs(directory, exist_ok=True)
    with single_process_megatron():
        model = build_gpt_model(args, s2_config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
        metadata = sharded_metadata()
        content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
        with in_process_checkpoint_writes():
            dist_checkpointing.save(
                {"model": model.sharded_state_dict(metadata=metadata), "args": args,
                 "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
                directory, content_metadata=content)
    with open(os.path.join(path, TRACKER_FILE), "w") as f:
        f.write("release")
    return directory
