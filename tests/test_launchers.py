"""The launchers in examples/ and the data tool, run as a user runs them (CPU).

- quickstart.sh keeps an earlier run's checkpoint until a new run has trained;
- tools/preprocess_data.py prints its result and nothing about missing GPU libraries;
- train_slurm.sbatch hands every node's torchrun its node rank and the job's environment (through a
  stub ``srun`` and ``python`` that record what they are given).

train_multi_node.sh on two local "nodes" is in test_pretrain.py, next to the one-node run it
matches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import tools.preprocess_data as preprocess_data
from tests.helpers import ROOT, free_port, script_environment

pytestmark = pytest.mark.slow


def test_quickstart_keeps_the_earlier_run_until_a_new_one_has_trained(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(list(preprocess_data.default_corpus())[:12]))
    preprocess_data.main(["--input", str(text), "--line-documents", "--output-prefix", str(tmp_path / "data")])
    broken = tmp_path / "broken"  # a .bin without its .idx: training fails in its input checks
    shutil.copy(tmp_path / "data.bin", str(broken) + ".bin")
    run_dir = tmp_path / "quickstart"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("the earlier quickstart run\n")
    (run_dir / "latest_checkpointed_iteration.txt").write_text("150")

    def quickstart(data):
        env = script_environment(SKIP_INSTALL="1", RUN_DIR=str(run_dir), DATA=str(data), ITERS="1",
                           SAMPLE_TOKENS="8", MASTER_PORT=str(free_port()))
        return subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], env=env,
                              capture_output=True, text=True, timeout=400)

    failed = quickstart(broken)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "broken.idx" in failed.stdout
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == "150"
    assert (run_dir / "train.log").read_text() == "the earlier quickstart run\n"
    assert not [name for name in os.listdir(tmp_path) if ".incomplete-" in name]

    done = quickstart(tmp_path / "data")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert "validation loss at iteration 1 on validation set" in done.stdout
    assert done.stdout.count("validation loss at") == 1
    assert "----- sample -----" in done.stdout
    assert not [name for name in os.listdir(tmp_path) if ".incomplete-" in name or ".replaced-" in name]
    assert "the earlier quickstart run" not in (run_dir / "train.log").read_text()


def test_preprocess_data_console_has_only_its_result(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("one document\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(text),
                           "--output-prefix", str(tmp_path / "notes")],
                          env=script_environment(), capture_output=True, text=True, timeout=120, check=True)
    assert done.stderr == ""
    assert done.stdout.splitlines()[0].startswith(f"wrote {tmp_path / 'notes'}.bin/.idx: 1 documents, 14 tokens")


STUB_SRUN = """#!/usr/bin/env bash
# Records its arguments, then runs the task once per node, as SLURM would (SLURM_NODEID).
printf '%s\\n' "$@" > "$RECORD/srun"
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit $?; done
"""
STUB_SCONTROL = """#!/usr/bin/env bash
[ "$*" = "show hostnames $SLURM_JOB_NODELIST" ] && printf 'node-a\\nnode-b\\n'
"""
STUB_PYTHON = """#!/usr/bin/env bash
# Stands for torchrun: records its arguments and the launch environment of this node.
{ printf '%s\\n' "$@"; echo "--"; env | grep -E '^(MASTER_ADDR|MASTER_PORT|CUDA_DEVICE_MAX_CONNECTIONS)=' | sort; } \\
    > "$RECORD/node$NODE_RANK"
"""


def test_train_slurm_sbatch_starts_one_torchrun_per_node_with_its_rank(tmp_path):
    sbatch = os.path.join(ROOT, "examples", "train_slurm.sbatch")
    subprocess.run(["bash", "-n", sbatch], check=True)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("python", STUB_PYTHON)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {key: value for key, value in os.environ.items() 
           if not key.startswith(("SLURM_", "MASTER_", "VENV", "CUDA_DEVICE_MAX_CONNECTIONS"))}
    env.update(PATH=str(stubs) + os.pathsep + os.environ["PATH"], RECORD=str(tmp_path), SLURM_NNODES="2",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_SUBMIT_DIR=ROOT)
    subprocess.run(["bash", sbatch, "configs/hybrid_1b_32k.yaml", "--data-path", "/shared/data corpus"],
                   env=env, check=True, timeout=60)
    assert (tmp_path / "srun").read_text().splitlines()[0] == "--kill-on-bad-exit=1"
    for node in (0, 1):
        argv, _, environment = (tmp_path / f"node{node}").read_text().partition("--\n")
        assert argv.splitlines() == [
            "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "8",
            "--master-addr", "node-a", "--master-port", "6000", "pretrain_gpt_s2.py",
            "--s2-config", "configs/hybrid_1b_32k.yaml", "--data-path", "/shared/data corpus"]
        assert environment.splitlines() == ["CUDA_DEVICE_MAX_CONNECTIONS=1", "MASTER_ADDR=node-a",
                                            "MASTER_PORT=6000"]
