"""Context parallelism keeps the fast kernels: with model.scan_backend=triton, a cp=2 training
step of each family launches the same Triton kernels as one process (counted under Triton's
interpreter), and its loss and gradients equal the one-process torch backend.

Across ranks the Newton cells run the distributed Newton solve with the Triton scans inside
(the diagonal linear-scan kernel for paraGRU, the 2x2-block scan kernel for paraLSTM); on one
rank the fused solver kernels. The LRU runs the 2x2-block scan kernel, minGRU / minLSTM the
linear-scan kernel in linear space.
"""
import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.plan import apply_context_parallel
from tests.parallel.spawn_util import run_on_ranks
from tests.parallel.test_tensor_parallel import FAMILIES

T = 16
KERNEL_FAMILIES = ["griffin", "mamba2", "paragru", "paralstm", "lru", "mingru", "minlstm"]


def count_launches() -> Counter:
    """Patch the interpreter's kernel launch: a Counter of kernel name -> launches from now on."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = Counter()
    run = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counting
    return counts


def _step(model, tokens, reset):
    logits, _ = model(tokens[:, :-1], reset=reset[:, :-1])
    loss = model.cross_entropy(logits, tokens[:, 1:]).sum()
    loss.backward()
    return loss.detach()


def _check(name, mesh):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, d_model=16, n_layers=2, lru_width=16, **FAMILIES[name])
    torch_model = RecurrentLM(c)
    fast = RecurrentLM(ModelConfig(**{**c.__dict__, "scan_backend": "triton"}))
    fast.load_state_dict(torch_model.state_dict())
    tokens = torch.randint(0, 64, (2, T + 1))
    reset = torch.zeros(2, T + 1, dtype=torch.bool)
    reset[0, 5] = True
    counts = count_launches()
    one = copy.deepcopy(fast)
    ref = _step(one, tokens, reset)
    launches_one = sum(counts.values())
    counts.clear()
    for m in (torch_model, fast):
        apply_context_parallel(m, mesh.group("cp"))
    n, i = T // mesh.cp, mesh.rank_in("cp")
    chunk = (torch.cat([tokens[:, i * n:(i + 1) * n], tokens[:, (i + 1) * n:(i + 1) * n + 1]], 1),
             torch.cat([reset[:, i * n:(i + 1) * n], reset[:, (i + 1) * n:(i + 1) * n + 1]], 1))
    got = _step(fast, *chunk)
    launches_cp = sum(counts.values())
    want = _step(torch_model, *chunk)
    assert launches_one > 0, f"{name}: one process launched no Triton kernel"
    assert launches_cp > 0, f"{name}: cp={mesh.cp} launched no Triton kernel ({dict(counts)})"
    for t in (got, want):
        dist.all_reduce(t, group=mesh.group("cp"))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, ref, rtol=1e-5, atol=1e-5)
    for (pname, p), q in zip(fast.named_parameters(), torch_model.parameters()):
        g, h = p.grad.clone(), q.grad.clone()
        dist.all_reduce(g, group=mesh.group("cp"))
        dist.all_reduce(h, group=mesh.group("cp"))
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {pname}: {m}")
        torch.testing.assert_close(g, dict(one.named_parameters())[pname].grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name} {pname} vs one process: {m}")


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, lambda: [_check(name, ParallelMesh.build(tp=1, cp=2))
                                             for name in KERNEL_FAMILIES])


@pytest.mark.timeout(600)
def test_context_parallel_runs_the_triton_kernels_and_equals_one_process():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
