#!/usr/bin/env bash
# Single-node multi-GPU training: one process per GPU under torchrun, the other flags passed through to train.py.
#   bash run_train_ddp.sh NUM_GPUS --exp_id 0 [train.py flags ...]
# --batch_size is per process: the global batch is NUM_GPUS x --batch_size (scale --learning_rate with it).
# MAX_RESTARTS=K (default 0) lets torchrun restart the workers K times after a failure; they resume from last.pt.
# On a machine without GPUs, NUM_GPUS CPU processes train together (gloo).
set -euo pipefail
num_gpus=${1:?usage: bash run_train_ddp.sh NUM_GPUS [train.py flags ...]}
shift
cd "$(dirname "$0")"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarted workers need a fresh store: see utils/distributed.py
exec torchrun --standalone --nproc_per_node "$num_gpus" --max_restarts "${MAX_RESTARTS:-0}" train.py --ddp 1 "$@"
