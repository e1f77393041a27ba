#!/usr/bin/env bash
# Single-node multi-GPU training: one process per GPU under torchrun, the other flags passed through to train.py.
#   bash run_train_ddp.sh NUM_GPUS --exp_id 0 [train.py flags ...]
# --batch_size is per process: the global batch is NUM_GPUS x --batch_size (scale --learning_rate with it).
set -euo pipefail
num_gpus=${1:?usage: bash run_train_ddp.sh NUM_GPUS [train.py flags ...]}
shift
cd "$(dirname "$0")"
exec torchrun --standalone --nproc_per_node "$num_gpus" train.py --ddp 1 "$@"
