#!/usr/bin/env bash
# Multi-node training: run the same command on every node. torchrun's c10d rendezvous at HOST:PORT (an address of
# one of the nodes that all of them reach, and a free port there) assigns the ranks.
#   bash run_train_multinode.sh NUM_NODES PROCS_PER_NODE HOST:PORT --exp_id 0 [train.py flags ...]
# --batch_size is per process: the global batch is NUM_NODES x PROCS_PER_NODE x --batch_size.
# Environment:
#   RDZV_ID         job id, the same on every node and new for each job (default dstorch)
#   RDZV_TIMEOUT_S  seconds a node waits for the others or for HOST:PORT, then torchrun stops with a rendezvous
#                   error instead of waiting forever (default 900)
#   MAX_RESTARTS    how many times torchrun restarts the workers after a failure; they resume from last.pt (default 0)
set -euo pipefail
usage="usage: bash run_train_multinode.sh NUM_NODES PROCS_PER_NODE HOST:PORT [train.py flags ...]"
num_nodes=${1:?$usage}
procs_per_node=${2:?$usage}
endpoint=${3:?$usage}
shift 3
cd "$(dirname "$0")"
timeout_s=${RDZV_TIMEOUT_S:-900}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarted workers need a fresh store: see utils/distributed.py
exec torchrun --nnodes "$num_nodes" --nproc_per_node "$procs_per_node" --rdzv_backend c10d \
    --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-dstorch}" \
    --rdzv_conf "join_timeout=$timeout_s,read_timeout=$timeout_s" --max_restarts "${MAX_RESTARTS:-0}" \
    train.py --ddp 1 "$@"
