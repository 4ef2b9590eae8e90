# Sourced by launch/{torchrun,accelerate,deepspeed}.sh: defaults every launcher shares.
#   NPROC        ranks per node (default: the GPUs torch sees, else 2 CPU ranks)
#   NNODES       nodes (default 1), or MIN:MAX for an elastic torchrun job (torchrun.sh only);
#                NODE_RANK this node's index (default 0)
#   MASTER_ADDR  node 0's address (default 127.0.0.1)
#   MASTER_PORT  its rendezvous port (default: a free port on one node; 29500 on several,
#                where every node must be given the same one)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
NUM_GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$([ "$NUM_GPUS" -gt 0 ] && echo "$NUM_GPUS" || echo 2)}
NNODES=${NNODES:-1}
MAX_NODES=${NNODES#*:}  # NNODES=MIN:MAX: the most nodes the job may have
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [ -z "${MASTER_PORT:-}" ]; then
    if [ "$MAX_NODES" -eq 1 ]; then
        MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    else
        MASTER_PORT=29500
    fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NUM_GPUS" -eq 0 ]; then  # CPU ranks talk over gloo; each launcher has its own switch
    export ACCELERATE_USE_CPU=1 DS_ACCELERATOR=cpu
fi

# accelerate.sh and deepspeed.sh start a fixed number of nodes.
require_fixed_nodes() {
    if [ "$NNODES" != "$MAX_NODES" ]; then
        echo "error: NNODES=$NNODES (MIN:MAX, elastic) needs launch/torchrun.sh; $(basename "$0") takes a fixed node count, e.g. NNODES=$MAX_NODES" >&2
        exit 1
    fi
}
