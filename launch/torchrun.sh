#!/usr/bin/env bash
# Run launch/train.py (or SCRIPT) on NPROC processes per node with torchrun.
#   bash launch/torchrun.sh NPROC [train.py options]
# One node by default, with the rendezvous on loopback. For several nodes set NNODES,
# NODE_RANK, MASTER_ADDR and MASTER_PORT (default 29500) on every node. Gloo on CPU,
# NCCL when CUDA is available (train.py --backend auto).
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC [train.py options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
script=${SCRIPT:-$here/train.py}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "${NNODES:-1}" = 1 ]; then
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
    exec torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" "$script" "$@"
fi
exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node "$nproc" \
    --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" "$script" "$@"
