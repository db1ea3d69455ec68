#!/usr/bin/env bash
# Train on the GPUs of one machine with torchrun.
#
#   bash examples/train_one_node.sh CONFIG.yaml [more pretrain_gpt_s2.py flags...]
#
#   GPUS_PER_NODE=8 bash examples/train_one_node.sh configs/hybrid_1b_32k.yaml \
#       --data-path data/my_corpus --tensor-model-parallel-size 2 --save checkpoints/run1
#
# Parallel sizes are ordinary Megatron flags (--tensor-model-parallel-size, --context-parallel-size,
# --pipeline-model-parallel-size); the rest of the GPUs is data parallel. Restarting the same command
# with --load pointing at the --save directory resumes; SIGTERM (e.g. from a scheduler) saves a
# checkpoint first when the config sets exit-signal-handler.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG.yaml [flags...]}
shift
PY=$(command -v python || command -v python3)
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS_PER_NODE" \
    pretrain_gpt_s2.py --s2-config "$CONFIG" "$@"
