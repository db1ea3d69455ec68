"""What several test files share: a free port, the one fork harness, the subprocess environment of
the scripts, and the tiny Megatron model the TP tests (CPU and GPU) build.

``run_distributed`` runs a function on several forked CPU ranks over gloo, with Megatron's parallel
state set up. Starting ``torchrun`` per test costs ~10 s; forking the already-imported test process
costs milliseconds. Usage::

    from tests.helpers import run_distributed

    def body(rank, world_size, scale):
        ...  # parallel_state is initialized here
        return some_picklable_result

    results = run_distributed(2, body, 3.0, tp=2)   # [result of rank 0, result of rank 1]

A rank that raises makes ``run_distributed`` raise ``RankError`` with that rank's traceback. The
function must be picklable only in its results (it is inherited through ``fork``, not sent).
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TIMEOUT_S = 120.0
FAILURE_GRACE_S = 3.0

# The CPU kernel tests need Triton's interpreter; tests/conftest.py decides whether it is on.
needs_triton_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU kernel tests run in Triton's interpreter (on by default without CUDA; TRITON_INTERPRET=1)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_environment(**overrides) -> dict:
    """Environment for running this checkout's scripts in a subprocess: this test's Python first on
    PATH (the shell scripts call `python`), this checkout importable (installed or not), one thread,
    CPU mode."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               MEGATRON_S2_CPU="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    env.update(overrides)
    return env


# -- fork harness ----------------------------------------------------------------------------------


def fork_ranks(world_size: int, target: Callable, rank_args: Callable[[int], tuple], *, daemon: bool) -> list:
    """Start ``target(*rank_args(rank))`` in one forked process per rank. The parent's copy of a pipe
    end handed to a rank is closed once that rank has started, before the next rank forks, so no
    other process holds it: a rank that dies is seen as end-of-file at once."""
    context = multiprocessing.get_context("fork")
    processes = []
    for rank in range(world_size):
        args = rank_args(rank)
        process = context.Process(target=target, args=args, daemon=daemon)
        process.start()
        for arg in args:
            if isinstance(arg, multiprocessing.connection.Connection):
                arg.close()
        processes.append(process)
    return processes


def join_or_kill(processes: list, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` in all for the processes to end; kill those still running."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


class RankError(RuntimeError):
    """A rank raised; the message holds the rank number and its traceback."""


def _distributed_rank_main(rank, world_size, store_path, parallel_sizes, fn, args, kwargs, conn):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

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
    import megatron.core.parallel_state  # noqa: F401  (imported once here, inherited by the ranks)

    with tempfile.TemporaryDirectory(prefix="megatron_s2_dist_") as tmp:
        store_path = os.path.join(tmp, "store")
        connections = []

        def rank_args(rank):
            parent_end, child_end = multiprocessing.Pipe(duplex=False)
            connections.append(parent_end)
            return (rank, world_size, store_path, (tp, pp, cp), fn, args, kwargs, child_end)

        processes = fork_ranks(world_size, _distributed_rank_main, rank_args, daemon=True)
        try:
            outcomes, arrival = _collect(connections, timeout_s)
        finally:
            join_or_kill(processes, FAILURE_GRACE_S)
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


# -- training runs of pretrain_gpt_s2.py in forked ranks ------------------------------------------
#
# Each run forks the already-imported test process once per rank (torchrun would cost ~10 s of
# imports per run) and calls the script's entry, ``pretrain_gpt_s2.cli(main)``, with the usual
# RANK/WORLD_SIZE/MASTER_* variables; the rank then ends as the script's process would.

RUN_TIMEOUT_S = 240

S2_YAML = """\
megatron:
  num-layers: 4
  hidden-size: 64
  ffn-hidden-size: 128
  num-attention-heads: 4
  seq-length: 128
  max-position-embeddings: 128
  position-embedding-type: rope
  normalization: RMSNorm
  swiglu: true
  disable-bias-linear: true
  untie-embeddings-and-output-weights: true
  transformer-impl: local
  no-rope-fusion: true
  no-persist-layer-norm: true
  no-gradient-accumulation-fusion: true
  no-masked-softmax-fusion: true
  attention-dropout: 0.0
  hidden-dropout: 0.0
  no-create-attention-mask-in-dataloader: true
  tokenizer-type: NullTokenizer
  vocab-size: 257
  make-vocab-size-divisible-by: 256   # same padded vocabulary at TP=1 and TP=2
  split: "98,2,0"
  micro-batch-size: 2
  global-batch-size: 4
  lr: 3.0e-3
  min-lr: 3.0e-4
  lr-decay-style: cosine
  lr-warmup-iters: 1
  seed: 1234
  log-interval: 1
  eval-interval: 1000
  eval-iters: 1
  num-workers: 0
s2:
  layers: DSSS
  defaults: {block_size: 16, local_blocks: 2, vert_stride: 4}
"""


def training_workdir(root, documents: int):
    """``root`` with the tiny model's config (s2.yaml) and a dataset ``data`` of ``documents``
    documents of real text (Python's bundled docs, small enough to index instantly)."""
    import tools.preprocess_data as preprocess_data

    (root / "s2.yaml").write_text(S2_YAML)
    text = root / "corpus.txt"
    text.write_text("\n\n".join(list(preprocess_data.default_corpus())[:documents]))
    preprocess_data.main(["--input", str(text), "--line-documents", "--output-prefix", str(root / "data")])
    return root


def _training_rank_main(rank: int, world_size: int, port: int, argv: list, log_path: str, prepare=None) -> None:
    """Child process: one rank of `torchrun pretrain_gpt_s2.py argv`, output into log_path.

    ``prepare(rank)``, if given, runs first (tests use it to inject a fault into this rank only).
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # pytest replaces sys.stdout/err with its capture objects; print to the log file instead.
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
    sys.argv = ["pretrain_gpt_s2.py"] + argv
    # Temporary files (multiprocessing's pymp-* folders) of this rank and of the helpers it starts
    # go beside the log, not into /tmp: a helper that has to be killed leaves its folder behind.
    os.environ["TMPDIR"] = tempfile.tempdir = os.path.dirname(log_path)
    # TRITON_INTERPRET=0: S2 layers take the dense-masked reference path on CPU (same layouts,
    # same head sharding), ~10x faster than the Triton interpreter; the kernel's own numerics are
    # tested against that reference in the kernel tests.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      MEGATRON_S2_CPU="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    if prepare is not None:
        prepare(rank)
    # The script's own entry. Whatever it lets through (an exit code, an exception) goes on to
    # multiprocessing, which ends this process as the interpreter would end the script: it prints
    # the exception, then runs the exit handler that terminates and joins the child processes.
    import pretrain_gpt_s2

    pretrain_gpt_s2.cli(functools.partial(pretrain_gpt_s2.main, argv))


class Run:
    def __init__(self, codes: list, logs: list):
        self.codes, self.logs = codes, logs
        self.last_log = logs[-1]  # Megatron prints losses on the last rank

    @property
    def losses(self) -> dict:
        from megatron_s2.training.progress import read_progress

        return {it: fields["loss"] for it, fields in read_progress(self.last_log).items()}

    def check_ok(self) -> "Run":
        assert self.codes == [0] * len(self.codes), f"exit codes {self.codes}; last log:\n{self.last_log[-4000:]}"
        return self


def start(workdir, name: str, argv: list, world_size: int = 1, prepare=None) -> tuple:
    """Fork the ranks of one run; returns (processes, log paths)."""
    argv = ["--s2-config", str(workdir / "s2.yaml"), "--data-path", str(workdir / "data")] + argv
    port = free_port()
    paths = [str(workdir / f"{name}.rank{r}.log") for r in range(world_size)]
    # Not daemonic: a rank starts processes of its own (Megatron's helpers, data loader workers).
    processes = fork_ranks(world_size, _training_rank_main, lambda r: (r, world_size, port, argv, paths[r], prepare),
                           daemon=False)
    return processes, paths


def finish(processes: list, paths: list, timeout_s: float = RUN_TIMEOUT_S) -> Run:
    join_or_kill(processes, timeout_s)
    logs = []
    for path in paths:
        with open(path, errors="replace") as f:
            logs.append(f.read())
    return Run([p.exitcode for p in processes], logs)


def launch(workdir, name: str, argv: list, world_size: int = 1) -> Run:
    return finish(*start(workdir, name, argv, world_size))


# -- a tiny GPT model for the tensor-parallel tests (CPU and GPU) ----------------------------------

SEQ, BATCH, VOCAB = 128, 2, 96
# Block 16, one local block, stride 4: at 128 tokens (8 blocks) every head's stripes matter.
S2_DEFAULTS = {"block_size": 16, "local_blocks": 1, "vert_stride": 4}


def tiny_config(tp=1, heads=4, groups=None, num_layers=4, dtype=torch.float32, head_dim=16, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw.setdefault("use_cpu_initialization", True)
    kw.setdefault("attention_dropout", 0.0)
    return TransformerConfig(
        num_layers=num_layers, hidden_size=head_dim * heads, num_attention_heads=heads,
        num_query_groups=groups or heads, ffn_hidden_size=2 * head_dim * heads,
        hidden_dropout=0.0, tensor_model_parallel_size=tp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, **kw,
    )


def build_gpt(config, s2_dict, seed=1234, seq=SEQ, **spec_kw):
    from megatron.core.models.gpt import GPTModel

    from megatron_s2.core.config import S2AttentionConfig
    from megatron_s2.core.specs import get_s2_gpt_block_spec

    s2 = S2AttentionConfig.from_dict(s2_dict, num_layers=config.num_layers,
                                     num_attention_heads=config.num_attention_heads)
    torch.manual_seed(seed)
    spec = get_s2_gpt_block_spec(config, s2, seq_length=seq, **spec_kw)
    # Learned positions: Megatron's RoPE places its tables on 'cuda', which forked CPU ranks lack.
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=seq,
                    position_embedding_type="learned_absolute")


def batch(device="cpu", seq=SEQ):
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, VOCAB, (BATCH, seq + 1), generator=g)
    positions = torch.arange(seq)[None].expand(BATCH, -1)
    return tokens[:, :-1].to(device), positions.to(device), tokens[:, 1:].to(device)


def gathered_grads(model):
    """Every parameter's full gradient, TP shards concatenated along their partition dim."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().float()
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[name] = grad.cpu()
    return grads


def loss_and_grads(config, s2_dict, device="cpu", seq=SEQ):
    from megatron.core.transformer.module import Float16Module

    gpt = build_gpt(config, s2_dict, seq=seq)
    # Half-precision models run inside Float16Module, as in Megatron's training loop.
    model = (Float16Module(config, gpt) if config.bf16 or config.fp16 else gpt).to(device)
    tokens, positions, labels = batch(device, seq)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    kinds = [type(layer.self_attention.core_attention).__name__ for layer in gpt.decoder.layers]
    return loss.item(), gathered_grads(model), kinds
