#!/usr/bin/env bash
# NPROC=2 launch/deepspeed.sh --config configs/deepspeed.yaml [--deepspeed_config configs/deepspeed/zero1.json] [key=value ...]
# The DeepSpeed launcher. Several nodes without ssh: on each node run
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 launch/deepspeed.sh ...
# (with ssh, use DeepSpeed's own --hostfile form instead).
. "$(dirname "$0")/common.sh"
require_fixed_nodes
if [ "$NNODES" -gt 1 ]; then
    exec deepspeed --num_nodes "$NNODES" --node_rank "$NODE_RANK" --no_ssh \
        --num_accelerators "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        launch/train.py "$@"
fi
exec deepspeed --num_accelerators "$NPROC" --master_port "$MASTER_PORT" launch/train.py "$@"
