"""pretrain_gpt_s2.py end to end on CPU: TP=1 vs TP=2, save/exit/resume, layout checks, bad inputs,
signals and crashes, continued training, and train_multi_node.sh on two local "nodes".

Each run forks the already-imported test process once per rank and calls the script's entry,
``pretrain_gpt_s2.cli(main)`` (tests/helpers.py), so the code under test is exactly what ``torchrun
pretrain_gpt_s2.py ...`` runs, over gloo. The model
is a 4-layer hybrid (layer 0 dense, layers 1-3 S2) on real text preprocessed by
tools/preprocess_data.py.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time

import pytest

import pretrain_gpt_s2  # noqa: F401  (heavy imports happen once, before forking)
from megatron_s2.core.config import S2AttentionConfig
from megatron_s2.training import checkpoint_layout
from megatron_s2.training.progress import read_progress
from tests.helpers import (
    RUN_TIMEOUT_S,
    ROOT,
    S2_YAML,
    finish,
    free_port,
    launch,
    script_environment,
    start,
    training_workdir,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return training_workdir(tmp_path_factory.mktemp("pretrain"), documents=12)


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


def read_wandb_records(path) -> list:
    """The protobuf records of an offline wandb run log (``run-<id>.wandb``), which wandb has no public
    reader for: a LevelDB-style log, a 7-byte file header then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 whole record, 2 first, 3 middle, 4 last part)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def test_wandb_offline_run_records_s2_scalars_and_config(workdir, tmp_path, monkeypatch):
    """--wandb-project (Megatron's wandb writer, offline): the run log holds the S2 progress scalars of
    every step, as printed, and the resolved S2 config in the run config."""
    pytest.importorskip("wandb", reason="wandb is optional: pip install wandb")
    import yaml

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = launch(workdir, "wandb", ["--train-iters", "2", "--wandb-project", "s2-test", "--wandb-exp-name",
                                    "tiny", "--wandb-save-dir", str(tmp_path)]).check_ok()
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(log)
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            logged[items["_step"]] = items
    printed = read_progress(run.last_log)
    assert sorted(logged) == sorted(printed) == [1, 2]
    for step, fields in printed.items():
        tokens = float(fields["tokens_per_s"].replace(",", ""))
        # CPU mode (the harness's ranks): the rates are per rank, under that name.
        assert logged[step]["s2/tokens_per_s_per_rank"] == pytest.approx(tokens, abs=0.5)
        assert logged[step]["s2/tflops_per_rank"] == pytest.approx(float(fields["tflops"]), abs=0.005)
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    expected = S2AttentionConfig.from_dict(yaml.safe_load(S2_YAML)["s2"]).to_dict()
    assert S2AttentionConfig.from_dict(config["s2_attention"]).to_dict() == expected


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


def test_bad_stored_ds_budget_fails_before_training(workdir, monkeypatch):
    monkeypatch.setenv("S2_DS_BUFFER_GB", "8GB")  # the forked rank inherits it
    run = launch(workdir, "bad_budget", ["--train-iters", "2"])
    assert run.codes == [2], run.last_log[-3000:]
    error = [line for line in run.last_log.splitlines() if "pretrain_gpt_s2.py: error:" in line]
    assert error and "S2_DS_BUFFER_GB='8GB'" in error[0] and "0 to recompute" in error[0], run.last_log[-3000:]
    assert "------------------------ arguments" not in run.last_log


def test_misspelt_flag_in_config_file_is_named_before_megatron_prints(workdir):
    config = workdir / "typo.yaml"
    config.write_text(S2_YAML.replace("num-layers:", "num-layyers:"))
    run = launch(workdir, "typo", ["--train-iters", "2", "--s2-config", str(config)])
    assert run.codes == [2], run.last_log[-3000:]
    error = [line for line in run.last_log.splitlines() if "pretrain_gpt_s2.py: error:" in line]
    assert error and str(config) in error[0] and "'num-layyers'" in error[0], run.last_log[-3000:]
    assert "did you mean 'num-layers'" in error[0]
    assert "usage:" not in run.last_log and "------------------------ arguments" not in run.last_log
