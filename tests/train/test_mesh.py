"""ParallelMesh on 8 gloo ranks (pp2 x dp1 x cp2 x tp2): each axis's group holds exactly the ranks of
this rank's line, in the pp x dp x cp x tp order, and a sum over it adds up those ranks only."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import DeepSpeedMPU, ParallelMesh
from tests.parallel.spawn_util import run_on_ranks


def _check():
    mesh = ParallelMesh.build(tp=2, pp=2, cp=2)
    rank = dist.get_rank()
    assert (mesh.pp, mesh.dp, mesh.cp, mesh.tp) == (2, 1, 2, 2)
    c = mesh.coords()
    assert rank == ((c["pp"] * mesh.dp + c["dp"]) * mesh.cp + c["cp"]) * mesh.tp + c["tp"]
    for axis in ("pp", "dp", "cp", "tp", "dp_cp", "pp_dp_cp"):
        line = next(line for line in mesh.lines(axis) if rank in line)
        assert dist.get_process_group_ranks(mesh.group(axis)) == line, axis
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mesh.group(axis))
        assert t.item() == sum(line), axis
    # validation documents are split over pp_dp_cp by index: tensor-parallel peers must get the same
    index = torch.tensor([float(dist.get_rank(mesh.group("pp_dp_cp")))])
    peers = [torch.zeros(1) for _ in range(mesh.tp)]
    dist.all_gather(peers, index, group=mesh.group("tp"))
    assert all(p.item() == index.item() for p in peers) and dist.get_world_size(mesh.group("pp_dp_cp")) == 4
    mpu = DeepSpeedMPU(mesh)
    assert mpu.get_data_parallel_group_ranks() == dist.get_process_group_ranks(mpu.get_data_parallel_group())
    assert mpu.get_model_parallel_rank() == c["tp"] and mpu.get_data_parallel_world_size() == 2


def test_mesh_groups_are_this_ranks_lines():
    mp.spawn(run_on_ranks, args=(8, free_port(), _check), nprocs=8, join=True)
