"""pretrain_gpt_s2.py end to end on CPU: TP=1 vs TP=2, save/exit/resume, layout checks, bad inputs,
signals and crashes, continued training, and train_multi_node.sh on two local "nodes".

Each run forks the already-imported test process once per rank (torchrun would cost ~10 s of imports
per run) and calls the script's entry, ``pretrain_gpt_s2.cli(main)``, with the usual
RANK/WORLD_SIZE/MASTER_* variables; the rank then ends as the script's process would. So the code
under test is exactly what ``torchrun pretrain_gpt_s2.py ...`` runs, over gloo. The model
is a 4-layer hybrid (layer 0 dense, layers 1-3 S2) on real text preprocessed by
tools/preprocess_data.py.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import pretrain_gpt_s2  # heavy imports happen once, before forking
import tools.preprocess_data as preprocess_data
from megatron_s2.core.config import S2AttentionConfig
from megatron_s2.training import checkpoint_layout
from megatron_s2.training.progress import read_progress
from tests.helpers import ROOT, fork_ranks, free_port, join_or_kill, script_environment

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    (root / "s2.yaml").write_text(S2_YAML)
    text = root / "corpus.txt"
    # Real text from Python's bundled docs, small enough to index instantly.
    text.write_text("\n\n".join(list(preprocess_data.default_corpus())[:12]))
    preprocess_data.main(["--input", str(text), "--line-documents", "--output-prefix", str(root / "data")])
    return root


def _rank_main(rank: int, world_size: int, port: int, argv: list, log_path: str, prepare=None) -> None:
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
    pretrain_gpt_s2.cli(functools.partial(pretrain_gpt_s2.main, argv))


class Run:
    def __init__(self, codes: list, logs: list):
        self.codes, self.logs = codes, logs
        self.last_log = logs[-1]  # Megatron prints losses on the last rank

    @property
    def losses(self) -> dict:
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
    processes = fork_ranks(world_size, _rank_main, lambda r: (r, world_size, port, argv, paths[r], prepare),
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


@pytest.fixture(scope="module")
def tp1_run(workdir):
    return launch(workdir, "tp1", ["--train-iters", "4"]).check_ok()


def test_tp2_losses_equal_tp1_on_hybrid_model(workdir, tp1_run):
    tp1 = tp1_run.losses
    assert sorted(tp1) == [1, 2, 3, 4]
    assert "3 S2, 1 dense" in tp1_run.logs[0]  # the resolved per-layer settings are printed
    assert "| tokens/s/rank " in tp1_run.last_log and "/GPU " not in tp1_run.last_log.split("[s2] iteration 1/")[1]
    tp2 = launch(workdir, "tp2", ["--train-iters", "4", "--tensor-model-parallel-size", "2"],
                 world_size=2).check_ok().losses
    assert sorted(tp2) == [1, 2, 3, 4]
    for iteration in tp1:
        assert float(tp2[iteration]) == pytest.approx(float(tp1[iteration]), rel=2e-6, abs=0), iteration
    # Training moved: equal losses must not come from a model that does not learn.
    assert float(tp1[4]) < float(tp1[1])


@pytest.mark.parametrize("exchange, overlap, tp", [("allgather", "auto", 1), ("allgather", "false", 1),
                                                   ("s2", "auto", 1), ("s2", "true", 2)])
def test_cp2_losses_equal_cp1(workdir, tp1_run, exchange, overlap, tp):
    # Each CP rank holds chunks r and 3 - r of every sequence (Megatron's load balancing); the
    # batch must be split over the CP group only (with TP=2 the world group would be wrong), and
    # S2 must see absolute positions. Both schedules (overlap or not) run for both exchanges.
    cp2 = launch(workdir, f"cp2_{exchange}_overlap_{overlap}_tp{tp}",
                 ["--train-iters", "4", "--context-parallel-size", "2", "--tensor-model-parallel-size",
                  str(tp), "--s2-override", f"cp_exchange={exchange}", "--s2-override", f"cp_overlap={overlap}"],
                 world_size=2 * tp).check_ok().losses
    assert sorted(cp2) == [1, 2, 3, 4]
    for iteration, loss in tp1_run.losses.items():
        assert float(cp2[iteration]) == pytest.approx(float(loss), rel=2e-6, abs=0), iteration


def test_tp2_cp2_dp2_on_eight_ranks_equals_tp1(workdir, tp1_run):
    # The 8-GPU layout of a TP x CP x DP run, rehearsed over 8 gloo ranks: each DP replica takes one
    # of the two micro-batches that TP=1 accumulates, so losses agree up to summation order.
    run = launch(workdir, "tp2_cp2_dp2", ["--train-iters", "4", "--tensor-model-parallel-size", "2",
                                          "--context-parallel-size", "2", "--s2-override", "cp_exchange=s2"],
                 world_size=8).check_ok()
    assert "data-parallel size: 2" in run.logs[0]
    assert sorted(run.losses) == [1, 2, 3, 4]
    for iteration, loss in tp1_run.losses.items():
        assert float(run.losses[iteration]) == pytest.approx(float(loss), rel=2e-6, abs=0), iteration


def test_train_multi_node_sh_on_two_local_nodes_equals_one_node(workdir, tp1_run):
    # examples/train_multi_node.sh as a user runs it on two machines: one invocation per node with
    # its NODE_RANK, here both on this machine with the rendezvous on the loopback address. One rank
    # per node: data parallel over the two nodes, each one of the micro-batches TP=1 accumulates.
    env = script_environment(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPUS_PER_NODE="1")
    command = ["bash", os.path.join(ROOT, "examples", "train_multi_node.sh"), str(workdir / "s2.yaml"),
               "--data-path", str(workdir / "data"), "--train-iters", "4"]
    logs = [workdir / f"node{node}.log" for node in (0, 1)]
    nodes = []
    for node, log in enumerate(logs):
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(command, env=dict(env, NODE_RANK=str(node)), stdout=out,
                                          stderr=subprocess.STDOUT))
    try:
        codes = [node.wait(RUN_TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], (codes, texts[0][-3000:], texts[1][-3000:])
    assert "data-parallel size: 2" in texts[0]
    losses = read_progress(texts[1])  # the last rank (node 1) prints them
    assert sorted(losses) == [1, 2, 3, 4]
    for iteration, loss in tp1_run.losses.items():
        assert float(losses[iteration]["loss"]) == pytest.approx(float(loss), rel=2e-6, abs=0), iteration


@pytest.fixture(scope="module")
def checkpoint_at_2(workdir):
    """A run of 4 iterations that saved at iteration 2 and exited there."""
    save = str(workdir / "ckpt")
    first = launch(workdir, "save", ["--train-iters", "4", "--save", save, "--save-interval", "2",
                                     "--exit-interval", "2"]).check_ok()
    assert sorted(first.losses) == [1, 2]
    return save


def test_save_exit_resume_is_bit_identical_and_keeps_s2_settings(workdir, tp1_run, checkpoint_at_2):
    expected = S2AttentionConfig.from_dict(
        {"layers": "DSSS", "defaults": {"block_size": 16, "local_blocks": 2, "vert_stride": 4}}).to_dict()
    found, saved = checkpoint_layout.read_checkpoint_s2_settings(checkpoint_at_2)
    assert found and saved == expected
    resumed = launch(workdir, "resume", ["--train-iters", "4", "--load", checkpoint_at_2]).check_ok()
    assert sorted(resumed.losses) == [3, 4]
    for iteration in (3, 4):  # printed with 9 significant digits: exact for float32
        assert resumed.losses[iteration] == tp1_run.losses[iteration], iteration


def test_checkpoint_resumes_on_two_pipeline_stages(workdir, tp1_run, checkpoint_at_2):
    # Megatron seeds each pipeline stage differently, so PP=2 starts from other weights; resuming
    # the PP=1 checkpoint gives both the same model. Each stage must then build the S2 layers of
    # its own global layer numbers (stage 0: layers 0-1, stage 1: layers 2-3).
    pp2 = launch(workdir, "pp2", ["--train-iters", "4", "--load", checkpoint_at_2,
                                  "--pipeline-model-parallel-size", "2"], world_size=2).check_ok().losses
    assert sorted(pp2) == [3, 4]
    for iteration in (3, 4):
        assert float(pp2[iteration]) == pytest.approx(float(tp1_run.losses[iteration]), rel=2e-6, abs=0)


def test_resume_with_other_s2_layout_is_refused_unless_allowed(workdir):
    save = str(workdir / "ckpt_layout")
    launch(workdir, "layout_save", ["--train-iters", "2", "--save", save, "--save-interval", "1",
                                    "--exit-interval", "1"]).check_ok()
    refused = launch(workdir, "layout_refused", ["--train-iters", "2", "--load", save,
                                                 "--s2-override", "layers=DDSS"])
    assert refused.codes == [2], refused.last_log[-3000:]
    assert "different S2 attention layout" in refused.last_log
    assert "layer 1: s2 (block_size=16, local_blocks=2, vert_stride=4" in refused.last_log
    assert ") -> dense\n" in refused.last_log and "layer 2" not in refused.last_log
    assert "--allow-s2-layout-change" in refused.last_log
    assert not read_progress(refused.last_log)
    assert "------------------------ arguments" not in refused.last_log
    allowed = launch(workdir, "layout_allowed", ["--train-iters", "2", "--load", save,
                                                 "--s2-override", "layers=DDSS",
                                                 "--allow-s2-layout-change"]).check_ok()
    assert sorted(allowed.losses) == [2]
    assert "resuming with a different S2 layout" in allowed.last_log


def wait_for_log(path: str, text: str, processes: list, timeout_s: float = RUN_TIMEOUT_S) -> float:
    """Wait until ``text`` appears in the log at ``path`` (or the run ends); returns the time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.is_alive() for p in processes):
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                if text in f.read():
                    break
        time.sleep(0.2)
    return time.monotonic()


def test_sigterm_saves_a_checkpoint_and_exits(workdir):
    # DataLoader workers (Megatron makes them ignore SIGTERM) must not hold up the exit either.
    save = str(workdir / "ckpt_sigterm")
    processes, paths = start(workdir, "sigterm", ["--train-iters", "500", "--save", save, "--num-workers", "1",
                                                  "--save-interval", "1000", "--exit-signal-handler"])
    wait_for_log(paths[0], "[s2] iteration 2/", processes)
    os.kill(processes[0].pid, signal.SIGTERM)
    run = finish(processes, paths, timeout_s=60).check_ok()
    assert "exiting program after receiving SIGTERM" in run.last_log
    stopped_at = max(run.losses)
    assert 2 <= stopped_at < 500
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert int(f.read()) == stopped_at


def _after_training(action):
    """A ``prepare`` for start(): ``action(rank)`` replaces the final evaluation, which Megatron runs
    after the training loop (the runs below evaluate only there)."""
    def prepare(rank):
        import megatron.training.training as megatron_training

        real = megatron_training.evaluate_and_print_results
        megatron_training.evaluate_and_print_results = lambda *a, **k: action(rank) or real(*a, **k)
    return prepare


def _crash_on_rank_0(rank):
    if rank == 0:
        raise RuntimeError("injected crash after training")


def test_crash_after_training_exits_promptly_on_every_rank(workdir):
    # The reported hang: --exit-signal-handler made the DataLoader workers ignore SIGTERM, and a
    # crashed rank waited for them for ever in multiprocessing's exit handler. Rank 1 is left
    # waiting for rank 0 in the evaluation's all-reduce and must end too.
    processes, paths = start(workdir, "crash", ["--train-iters", "2", "--num-workers", "2",
                                                "--exit-signal-handler"], world_size=2,
                             prepare=_after_training(_crash_on_rank_0))
    crashed = wait_for_log(paths[0], "injected crash after training", processes)
    run = finish(processes, paths, timeout_s=60)
    assert "injected crash after training" in run.logs[0], run.logs[0][-3000:]
    assert run.codes == [1, 1], (run.codes, run.logs[0][-3000:], run.logs[1][-3000:])
    assert time.monotonic() - crashed < 30


def _sigterm_and_wait(rank):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # an ignored signal lets the evaluation go on after this


def test_sigterm_after_training_is_a_plain_exit(workdir):
    # "Save and exit" exists only while the training loop runs; afterwards SIGTERM ends the rank.
    processes, paths = start(workdir, "sigterm_after", ["--train-iters", "2", "--exit-signal-handler"],
                             prepare=_after_training(_sigterm_and_wait))
    run = finish(processes, paths, timeout_s=120)
    assert sorted(run.losses) == [1, 2]
    assert run.codes == [-signal.SIGTERM], (run.codes, run.last_log[-3000:])


@pytest.fixture(scope="module")
def finished_run(workdir):
    """A complete run of 2 iterations that evaluated at iteration 2 and saved there."""
    save = str(workdir / "ckpt_finished")
    launch(workdir, "finished", ["--train-iters", "2", "--eval-interval", "2", "--eval-iters", "2", "--save", save,
                                 "--save-interval", "2"]).check_ok()
    return save


def test_longer_schedule_on_resume_names_the_scheduler_flags(workdir, finished_run):
    refused = launch(workdir, "longer_refused", ["--train-iters", "4", "--load", finished_run])
    assert refused.codes == [2], refused.last_log[-3000:]
    error = [line for line in refused.last_log.splitlines() if "pretrain_gpt_s2.py: error:" in line]
    assert error and "another learning-rate schedule" in error[0]
    assert "--override-opt_param-scheduler" in error[0] and "--use-checkpoint-opt_param-scheduler" in error[0]
    assert "AssertionError" not in refused.last_log


def test_continued_run_with_new_eval_interval_has_validation_data(workdir, finished_run):
    # Megatron sized the validation set as if this run started at iteration 0, while its loader
    # starts after the samples the first run's evaluation consumed: the final evaluation ran dry.
    # (2 evaluations of 2 x 4 samples from sample 8 on: 24 needed; the 6-sample split, repeated
    # in whole epochs, was built with 18.)
    run = launch(workdir, "continued", ["--train-iters", "4", "--eval-interval", "4", "--eval-iters", "2",
                                        "--load", finished_run, "--override-opt_param-scheduler"]).check_ok()
    assert sorted(run.losses) == [3, 4]
    assert "validation loss at iteration 4 |" in run.last_log
    assert "validation loss at iteration 4 on validation set" in run.last_log


@pytest.mark.parametrize("extra, message", [
    (["--s2-override", "vert_stirde=8"], "is not settable from the command line"),
    (["--s2-override", "head_pattern=homogeneous"], "kb % 4 in [1, 2, 3]"),
    (["--s2-override", "layers=DSS"], "layers"),
    (["--data-path", "/nonexistent/corpus"], "tools/preprocess_data.py"),
    (["--s2-config", "/nonexistent.yaml"], "no such file"),
    (["--lr-warmup-iters", "5"], "--lr-warmup-iters 5 must be smaller than the decay length"),
    (["--context-parallel-size", "2", "--seq-length", "250"],
     "--seq-length 250 is not a multiple of 2 * --context-parallel-size = 4"),
    (["--context-parallel-size", "2", "--seq-length", "260"], "Use a sequence length such as 320 or 256"),
])
def test_bad_inputs_fail_clearly_before_training(workdir, extra, message):
    run = launch(workdir, "bad", ["--train-iters", "2"] + extra)
    assert run.codes == [2], run.last_log[-3000:]
    error = [line for line in run.last_log.splitlines() if "pretrain_gpt_s2.py: error:" in line]
    assert error and message in error[0], run.last_log[-3000:]
    # Before Megatron's ~800-line argument listing, so the error is what the user sees.
    assert "------------------------ arguments" not in run.last_log
    assert "AssertionError" not in run.last_log


def test_misspelt_flag_in_config_file_is_named_before_megatron_prints(workdir):
    config = workdir / "typo.yaml"
    config.write_text(S2_YAML.replace("num-layers:", "num-layyers:"))
    run = launch(workdir, "typo", ["--train-iters", "2", "--s2-config", str(config)])
    assert run.codes == [2], run.last_log[-3000:]
    error = [line for line in run.last_log.splitlines() if "pretrain_gpt_s2.py: error:" in line]
    assert error and str(config) in error[0] and "'num-layyers'" in error[0], run.last_log[-3000:]
    assert "did you mean 'num-layers'" in error[0]
    assert "usage:" not in run.last_log and "------------------------ arguments" not in run.last_log


def _pairs_by_formula(block, local, stride, offsets, seq_len):
    """Attended (q, k) token pairs, summed over heads, from S2_SEMANTICS.md written out."""
    total = 0
    for offset in offsets:
        for q in range(seq_len):
            for k in range(q + 1):
                qb, kb = q // block, k // block
                if offset is None or qb - kb < local or (kb + offset) % stride == 0:
                    total += 1
    return total


@pytest.mark.parametrize("seq_len", [96, 100])  # 100: a ragged last block
def test_sparse_flops_count_the_pairs_the_layout_attends(seq_len):
    from megatron_s2.ops.pattern import S2Pattern

    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)
    # 4 heterogeneous heads, step max(1, 4 // 4) = 1: offsets 0, 1, 2; the last head is dense.
    offsets = [0, 1, 2, None]
    assert flops.attended_pairs(pattern, 4, 4, seq_len) == _pairs_by_formula(16, 2, 4, offsets, seq_len)
    assert flops.attended_pairs(None, 4, 4, seq_len) == _pairs_by_formula(16, 1, 1, [None] * 4, seq_len)


def test_sparse_aware_flops_replace_only_the_attention_term():
    from argparse import Namespace

    from megatron.training.training import num_floating_point_operations as megatron_flops
    from megatron_s2.ops.pattern import S2Pattern

    args = Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     group_query_attention=False, num_query_groups=4, kv_channels=16, seq_length=64,
                     swiglu=True, padded_vocab_size=256)
    full = Namespace(**vars(args))
    for name in ("num_experts", "mtp_num_layers", "moe_latent_size", "moe_ffn_hidden_size",
                 "moe_shared_expert_intermediate_size", "experimental_attention_variant",
                 "hybrid_layer_pattern"):
        setattr(full, name, None)
    full.multi_latent_attention = full.attention_output_gate = False
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)
    counted = flops.sparse_aware_flops(megatron_flops, [None, pattern])(full, 3)
    dense_part = megatron_flops(full, 3) - 3 * 64 * 64 * 6 * 64 * 2
    attention = 3 * 3.5 * 4 * 16 * (4 * 64 * 65 // 2 + flops.attended_pairs(pattern, 4, 4, 64))
    assert counted == pytest.approx(dense_part + attention, rel=1e-12)
    assert attention < 3 * 3.5 * 4 * 16 * 2 * (4 * 64 * 65 // 2)  # the S2 layer costs less


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.endswith(".yaml")))
def test_shipped_configs_are_valid_megatron_flags_and_s2_layouts(name):
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    flags, s2_section = pretrain_gpt_s2.read_config_file(os.path.join(ROOT, "configs", f"{name}.yaml"))
    parser = pretrain_gpt_s2.add_s2_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(pretrain_gpt_s2.flags_to_argv(flags))  # a misspelt flag exits here
    config = pretrain_gpt_s2.resolve_s2_config(args, s2_section)
    assert config.num_layers == args.num_layers and config.sparse_layers


def test_model_config_keeps_the_rope_scaling_factor():
    """Megatron's gpt_config_from_args drops --rope-scaling-factor; an imported Llama 3.2 (factor
    32) must keep training with 32, not the default 8."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments, validate_args

    flags, s2_section = pretrain_gpt_s2.read_config_file(os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser = pretrain_gpt_s2.add_s2_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(pretrain_gpt_s2.flags_to_argv(flags) + [
        "--mock-data", "--use-rope-scaling", "--rope-scaling-factor", "32"])
    args.rank, args.world_size = 0, 1
    validate_args(args)
    model_config = pretrain_gpt_s2.build_model_config(args, pretrain_gpt_s2.resolve_s2_config(args, s2_section))
    assert model_config.rope_scaling and model_config.rope_scaling_factor == 32
