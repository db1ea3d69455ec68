#!/usr/bin/env bash
# Train on several machines with torchrun: run this same command on every node.
#
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0's address> MASTER_PORT=6000 \
#       bash examples/train_multi_node.sh configs/llama3_8b_128k.yaml \
#       --tensor-model-parallel-size 8 --context-parallel-size 4 --data-path /shared/data/corpus \
#       --save /shared/checkpoints/llama3_s2 --load /shared/checkpoints/llama3_s2
#
# Variables as in Megatron-LM's examples: NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR
# (default localhost), MASTER_PORT (default 6000), GPUS_PER_NODE (default: all visible GPUs).
# Data and checkpoint paths must be on storage every node sees.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG.yaml [flags...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
PY=$(command -v python || command -v python3)
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    pretrain_gpt_s2.py --s2-config "$CONFIG" "$@"
