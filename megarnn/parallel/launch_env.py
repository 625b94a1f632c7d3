"""Where a process learns its rank: torchrun, Slurm (srun) or MPI (mpirun), or none (one process).

`rendezvous_env()` fills the variables torch.distributed reads (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from whichever launcher started us, and returns
its name. We never use DeepSpeed's MPI discovery: it takes MASTER_ADDR from
`hostname -I`, which may be an address the machines cannot reach (on some clusters it is not routable).
"""
from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_env() -> str:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of srun, not just the batch shell
        _from_slurm(env)
        return "slurm"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        _from_mpi(env)
        return "mpi"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return "single"


def _from_slurm(env) -> None:
    """One task per GPU under srun. The sbatch script exports MASTER_ADDR / MASTER_PORT;
    otherwise the first host of the job and a port derived from the job id are used."""
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _from_mpi(env) -> None:
    """mpirun: rank 0 picks a free port and broadcasts it with its address over MPI."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    one_host = len(set(hosts)) == 1
    addr, port = comm.bcast(("127.0.0.1" if one_host else env.get("MASTER_ADDR", hosts[0]), free_port())
                            if comm.Get_rank() == 0 else None, root=0)
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    env.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()), LOCAL_RANK=str(local_rank),
               MASTER_ADDR=addr, MASTER_PORT=str(port))
