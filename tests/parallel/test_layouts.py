"""Context parallelism alone (2 ranks) and combined tp2 x cp2 with sequence parallelism (4 ranks)
equal one process:
loss and every gradient, for every family, with documents starting inside chunks and at a
chunk boundary."""
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.plan import apply_context_parallel, apply_sequence_parallel, apply_tensor_parallel
from megarnn.parallel.tensor import merge_shards
from tests.parallel.spawn_util import run_on_ranks
from tests.parallel.test_tensor_parallel import FAMILIES

T = 12


def _check(name, mesh, sp):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, d_model=16, n_layers=3, lru_width=16, **FAMILIES[name])
    full = RecurrentLM(c).double()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    par = copy.deepcopy(full)
    if mesh.tp > 1:
        apply_tensor_parallel(par, mesh.group("tp"))
    if sp:
        apply_sequence_parallel(par, mesh.group("tp"))
    cp_group = mesh.group("cp")
    apply_context_parallel(par, cp_group)
    tokens = torch.randint(0, 64, (2, T + 1))
    reset = torch.zeros(2, T + 1, dtype=torch.bool)
    reset[0, 3] = True          # inside the first chunk
    reset[1, T // mesh.cp] = True  # exactly where the second chunk starts
    x, y, r = tokens[:, :-1], tokens[:, 1:], reset[:, :-1]
    logits, _ = full(x, reset=r)
    ref = full.cross_entropy(logits, y).mean()
    ref.backward()
    n, i = T // mesh.cp, mesh.rank_in("cp")
    logits, _ = par(x[:, i * n:(i + 1) * n], reset=r[:, i * n:(i + 1) * n])
    got = par.cross_entropy(logits, y[:, i * n:(i + 1) * n]).sum() / y.numel()
    got.backward()
    total = got.detach().clone()
    dist.all_reduce(total, group=cp_group)
    torch.testing.assert_close(total, ref.detach(), rtol=1e-10, atol=1e-12)
    want = dict(full.named_parameters())
    for pname, p in par.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=cp_group)  # each chunk's share of a shared parameter
        if hasattr(p, "tp_split"):
            parts = [torch.empty_like(g) for _ in range(mesh.tp)]
            dist.all_gather(parts, g, group=mesh.group("tp"))
            g = merge_shards(parts, *p.tp_split)
        torch.testing.assert_close(g, want[pname].grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"{name} {mesh.sizes()}: {pname}: {m}")


def _check_all(tp, cp, sp):
    mesh = ParallelMesh.build(tp=tp, cp=cp)
    for name in FAMILIES:
        _check(name, mesh, sp)


def _worker(rank, world, port, tp, cp, sp):
    run_on_ranks(rank, world, port, _check_all, tp, cp, sp)


def test_context_parallel_model_equals_one_process():
    mp.spawn(_worker, args=(2, free_port(), 1, 2, False), nprocs=2, join=True)


def test_tensor_times_context_times_sequence_parallel_on_4_ranks_equals_one_process():
    mp.spawn(_worker, args=(4, free_port(), 2, 2, True), nprocs=4, join=True)
