"""ParallelMesh: the ranks of a job as a pp x dp x cp x tp grid, with one process group per line.

Rank layout (tp varies fastest, so a tensor-parallel group sits on one node; pp slowest, the
order of DeepSpeed's pipeline topology (pipe, data, model) with data = dp x cp):
    rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i
`mesh.group("tp")` is the group of ranks that differ only in their tp coordinate, and so
on for "cp", "pp" and "dp"; "dp_cp" joins dp and cp (the ranks that average gradients), and
"pp_dp_cp" joins all but tp (the ranks that split the validation documents: tensor-parallel
peers must read the same ones, and sit at the same index of their groups). Sizes that do not
divide the world are rejected before any group is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megarnn.errors import ConfigError

AXES = ("pp", "dp", "cp", "tp")  # outermost first


@dataclass
class ParallelMesh:
    tp: int
    pp: int
    cp: int
    dp: int
    rank: int
    groups: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, cp: int = 1) -> "ParallelMesh":
        """Split the initialised default group. Every rank must call this, in the same order."""
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = check_sizes(world, tp, pp, cp)
        mesh = cls(tp=tp, pp=pp, cp=cp, dp=dp, rank=rank)
        for axis in (*AXES, "dp_cp", "pp_dp_cp"):
            # One call per axis: the lines of an axis partition the world, and torch hands back the
            # group of the line this rank is on (every rank takes part in creating every line's group).
            mesh.groups[axis], _ = dist.new_subgroups_by_enumeration(mesh.lines(axis))
        return mesh

    def sizes(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}

    def coords(self, rank: int | None = None) -> dict[str, int]:
        """{"pp": i, "dp": j, "cp": k, "tp": l} of `rank` (default: this rank)."""
        r, out = self.rank if rank is None else rank, {}
        for axis in reversed(AXES):
            n = self.sizes()[axis]
            out[axis], r = r % n, r // n
        return out

    def lines(self, axis: str) -> list[list[int]]:
        """All groups along `axis` ("dp", ..., or "dp_cp" for both): lists of ranks that differ
        only in those coordinates."""
        along = axis.split("_")
        world = self.tp * self.pp * self.cp * self.dp
        lines: dict[tuple, list[int]] = {}
        for r in range(world):
            c = self.coords(r)
            key = tuple(c[a] for a in AXES if a not in along)
            lines.setdefault(key, []).append(r)
        return list(lines.values())

    def group(self, axis: str):
        return self.groups[axis]

    def rank_in(self, axis: str) -> int:
        return self.coords()[axis]


def check_sizes(world: int, tp: int, pp: int, cp: int) -> int:
    """Returns dp = world / (tp * pp * cp); raises ConfigError with the numbers otherwise."""
    for name, v in (("tp", tp), ("pp", pp), ("cp", cp)):
        if v < 1:
            raise ConfigError(f"parallel.{name}={v} must be >= 1")
    if world % (tp * pp * cp):
        raise ConfigError(f"{world} processes cannot be split into tp={tp} x pp={pp} x cp={cp} "
                          f"(= {tp * pp * cp}) times a whole number of data-parallel replicas; launch a "
                          f"multiple of {tp * pp * cp} processes or change parallel.tp/pp/cp")
    return world // (tp * pp * cp)


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed asks for model / data parallel groups (Megatron's names).

    DeepSpeed's "model parallel" group is our tensor-parallel group: it all-reduces gradient
    norms over it (counting replicated parameters once, sharded ones marked
    `tensor_model_parallel`) and names checkpoint files by its rank (mp_rank_XX). Its "data
    parallel" group is dp x cp: context-parallel ranks hold the same weights and each
    computes a share of the gradient, so they average gradients with the replicas (the
    loss is scaled by cp to turn that average into the sum over chunks).
    """

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh

    def get_model_parallel_group(self):
        return self.mesh.group("tp")

    def get_model_parallel_rank(self) -> int:
        return self.mesh.rank_in("tp")

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_data_parallel_group(self):
        return self.mesh.group("dp_cp")

    def get_data_parallel_rank(self) -> int:
        return self.mesh.rank_in("dp") * self.mesh.cp + self.mesh.rank_in("cp")

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp * self.mesh.cp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return next(line for line in self.mesh.lines("dp_cp") if self.mesh.rank in line)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return next(line for line in self.mesh.lines("tp") if self.mesh.rank in line)[0]
