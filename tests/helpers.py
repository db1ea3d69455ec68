"""Run a function on several forked CPU ranks over gloo, with Megatron's parallel state set up.

Starting ``torchrun`` per test costs ~10 s; forking the already-imported test process costs
milliseconds. Usage::

    from tests.helpers import run_distributed

    def body(rank, world_size, scale):
        ...  # parallel_state is initialized here
        return some_picklable_result

    results = run_distributed(2, body, 3.0, tp=2)   # [result of rank 0, result of rank 1]

A rank that raises makes ``run_distributed`` raise ``RankError`` with that rank's traceback. The
function must be picklable only in its results (it is inherited through ``fork``, not sent).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
from megatron.core import parallel_state  # imported here so that forked ranks inherit it
from megatron.core.tensor_parallel import random as tp_random

DEFAULT_TIMEOUT_S = 120.0
FAILURE_GRACE_S = 3.0


class RankError(RuntimeError):
    """A rank raised; the message holds the rank number and its traceback."""


def _rank_main(rank, world_size, store_path, parallel_sizes, fn, args, kwargs, conn):
    try:
        # Two ranks on a small shared machine: one thread each avoids oversubscription.
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
        )
        tp, pp, cp = parallel_sizes
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
        )
        # The CUDA RNG tracker needs a driver; the null tracker keeps dropout-free models exact.
        tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        result = fn(rank, world_size, *args, **kwargs)
        outcome = ("ok", result)
    except BaseException:  # report everything, including KeyboardInterrupt in a rank
        outcome = ("error", traceback.format_exc())
    try:
        # Plain pickle copies tensor data; multiprocessing's pickler would share it through file
        # descriptors that vanish when this rank exits.
        conn.send_bytes(pickle.dumps(outcome))
    except Exception:
        conn.send_bytes(pickle.dumps(("error", "result not picklable:\n" + traceback.format_exc())))
    finally:
        try:
            parallel_state.destroy_model_parallel()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        finally:
            conn.close()


def run_distributed(
    world_size: int,
    fn: Callable[..., Any],
    *args,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs,
) -> list:
    """Fork ``world_size`` ranks, run ``fn(rank, world_size, *args, **kwargs)`` on each.

    ``tp * pp * cp`` must divide ``world_size`` (the rest is data parallel). Returns the ranks'
    results in rank order; raises ``RankError`` with the first failing rank's traceback, or
    ``TimeoutError`` if a rank does not finish in ``timeout_s`` (all ranks are then killed).
    """
    if world_size % (tp * pp * cp):
        raise ValueError(f"tp*pp*cp = {tp * pp * cp} does not divide world_size = {world_size}")
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="megatron_s2_dist_") as tmp:
        store_path = os.path.join(tmp, "store")
        processes, connections = [], []
        for rank in range(world_size):
            parent_end, child_end = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                args=(rank, world_size, store_path, (tp, pp, cp), fn, args, kwargs, child_end),
                daemon=True,
            )
            process.start()
            child_end.close()
            processes.append(process)
            connections.append(parent_end)
        try:
            outcomes, arrival = _collect(connections, timeout_s)
        finally:
            for process in processes:
                process.join(timeout=2)
                if process.is_alive():
                    process.kill()
                    process.join()
    errors = [(rank, outcomes[rank][1]) for rank in arrival if outcomes[rank][0] == "error"]
    if errors:
        # The first failure to arrive is the cause; later ones are usually its peers' broken pipes.
        rank, text = errors[0]
        raise RankError(f"rank {rank} of {world_size} failed:\n{text}")
    return [result for _, result in outcomes]


def _collect(connections, timeout_s: float) -> list:
    """Wait for every rank's outcome (and note the order of arrival); after a failure, wait only briefly for the others (they are
    usually stuck in a collective with the failed rank)."""
    outcomes = [None] * len(connections)
    arrival = []
    pending = dict(enumerate(connections))
    deadline = time.monotonic() + timeout_s
    while pending:
        ready = multiprocessing.connection.wait(
            list(pending.values()), timeout=max(0.0, deadline - time.monotonic())
        )
        if not ready:
            if any(o is not None and o[0] == "error" for o in outcomes):
                break  # the failure is reported; the stuck ranks are killed by the caller
            raise TimeoutError(f"ranks {sorted(pending)} gave no result within {timeout_s} s")
        for rank, conn in list(pending.items()):
            if conn in ready:
                try:
                    outcomes[rank] = pickle.loads(conn.recv_bytes())
                except EOFError:
                    outcomes[rank] = ("error", f"rank {rank} exited without a result (crashed?)")
                del pending[rank]
                arrival.append(rank)
                if outcomes[rank][0] == "error":
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    return [o if o is not None else ("skipped", None) for o in outcomes], arrival
