#!/usr/bin/env bash
# Train on one machine with NPROC processes (one per GPU, or CPU processes with gloo).
#   launch/torchrun.sh NPROC CONFIG.yaml [key=value ...]
# Python: $MEGARNN_PYTHON, else the `python` on PATH (the environment you launch from).
# MASTER_PORT: taken from the environment, else a free port. torchrun forwards SIGTERM and
# SIGINT to the workers, which finish the step, save a checkpoint and exit 75 (see README,
# "Stopping a run: preemption and Ctrl-C"). Ctrl-C reaches the workers from the terminal and
# again from torchrun at once: that counts as one; a second Ctrl-C later exits at once (130).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
PY=${MEGARNN_PYTHON:-python}
nproc=$1
shift
port=${MASTER_PORT:-$("$PY" -c 'from megarnn.parallel.launch_env import free_port; print(free_port())')}
exec "$PY" -m torch.distributed.run --nproc_per_node "$nproc" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "$port" -m megarnn train "$@"
