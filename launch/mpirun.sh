#!/usr/bin/env bash
# Run launch/train.py (or SCRIPT) on NPROC MPI processes, synchronizing through mpi4py.
#   bash launch/mpirun.sh NPROC [train.py options]
# BACKEND=gloo (or nccl) keeps mpiexec as the launcher but sets up torch.distributed from
# MPI's rank and size instead (rendezvous on MASTER_ADDR:MASTER_PORT, loopback by default).
# MPIEXEC names the launcher (default: mpiexec on PATH, e.g. from `pip install .[mpi]`).
set -euo pipefail
nproc=${1:?usage: launch/mpirun.sh NPROC [train.py options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
script=${SCRIPT:-$here/train.py}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec "${MPIEXEC:-mpiexec}" -n "$nproc" python "$script" --backend "${BACKEND:-mpi}" "$@"
