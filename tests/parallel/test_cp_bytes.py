"""`megarnn plan`'s context-parallel bytes (registry cp_exchange) against the collectives counted in
one forward + backward of every block kind at cp = 2 (megarnn.parallel.comm.CountBytes):
all-gathered carries exactly for the scans whose summaries go through carry_in (forward gather,
backward all-reduce), at most the plan's upper bound for the Newton cells (it assumes
newton_max_iters iterations; converged solves take fewer). Point-to-point halos and state shifts
are not counted by CountBytes and not checked here."""
import pytest
import torch
import torch.multiprocessing as mp

from megarnn import registry
from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM
from megarnn.parallel.comm import CountBytes
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.plan import apply_context_parallel
from tests.parallel.spawn_util import run_on_ranks
from tests.parallel.test_tensor_parallel import FAMILIES

B, T, CP = 2, 16, 2


def _check():
    mesh = ParallelMesh.build(tp=1, cp=CP)
    for name, family in FAMILIES.items():
        torch.manual_seed(0)
        c = ModelConfig(vocab_size=64, d_model=16, n_layers=2, lru_width=16, **family)
        model = RecurrentLM(c)
        apply_context_parallel(model, mesh.group("cp"))
        tokens = torch.randint(0, 64, (B, T // CP))
        reset = torch.zeros(B, T // CP, dtype=torch.bool)
        reset[1, 3] = True
        with CountBytes(CP) as count:
            logits, _ = model(tokens, reset=reset)
            logits.float().sum().backward()
        c = model.c  # resolved (derived widths filled in), as megarnn plan reads it
        kinds = [registry.block_kind(letter, c) for letter in c.block_types()]
        planned = sum(B * k.cp_exchange(c, 4)[0] * 4 * (CP - 1) for k in kinds)
        gathered = count.bytes["all_gather"] + count.bytes["all_gather_into_tensor"]
        if any(k.letter in "GLBK" for k in kinds):  # Newton: fewer iterations than the bound
            assert 0 < gathered <= planned, (name, gathered, planned)
        else:
            assert gathered + count.bytes["all_reduce"] == planned, (name, dict(count.bytes), planned)


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _check)


@pytest.mark.timeout(300)
def test_plan_cp_bytes_equal_the_counted_collectives_of_every_block_kind():
    mp.spawn(_worker, args=(CP, free_port()), nprocs=CP, join=True)
