#!/usr/bin/env bash
# Train with NPROC processes started by mpirun (the `mpi` extra: mpi4py + mpich).
#   launch/mpirun.sh NPROC CONFIG.yaml [key=value ...]
# Each process finds its rank through mpi4py; rank 0 picks a free port and broadcasts it
# (megarnn/parallel/launch_env.py). Extra mpirun flags: $MPIRUN_ARGS (e.g. a hostfile).
# Python: $MEGARNN_PYTHON, else the `python` on PATH.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
PY=${MEGARNN_PYTHON:-python}
MPIRUN=${MPIRUN:-$(dirname "$(command -v "$PY")")/mpirun}
[ -x "$MPIRUN" ] || MPIRUN=mpirun
nproc=$1
shift
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags
exec "$MPIRUN" -np "$nproc" ${MPIRUN_ARGS:-} "$PY" -m megarnn train "$@"
