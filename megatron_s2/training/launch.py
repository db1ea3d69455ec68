"""Process-level start and end of a training (or sampling) job: single-process rendezvous, input
errors as one line, crashes that end the rank promptly."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import traceback

from megatron.training import get_tensorboard_writer

from ..ops.pattern import S2ConfigError
from . import checkpoint_layout
from .validation import TrainingSetupError


def default_single_process_rendezvous() -> None:
    """`python pretrain_gpt_s2.py ...` without torchrun: one rank, rendezvous on a free local port."""
    if "MASTER_ADDR" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


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


def cli(entry) -> None:
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
