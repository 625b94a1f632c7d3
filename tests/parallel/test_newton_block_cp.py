"""Context parallelism of the block-diagonal Newton cell (megarnn.models.pararnn.BlockGRUCell), cp = 2:
the checks of tests/parallel/test_context.py run on the block cell. CP Newton equals one-rank Newton
equals the sequential recurrence, forward and every gradient (x, h0, the recurrent blocks), with
resets inside chunks and exactly at the rank boundary, in float64 (1e-10): once with the torch
block scan inside and once with the Triton block-scan kernel (interpreted on CPU); the CP carry is
the block vector and the chunk's product of J. Fixed-iteration iterates equal one rank's, and the
strict fallback solves rank by rank."""
import functools

import torch
import torch.multiprocessing as mp

import tests.parallel.test_context as tc
from megarnn.models.pararnn import BlockGRUCell
from megarnn.parallel.launch_env import free_port
from tests.parallel.spawn_util import run_on_ranks

_SOLVE = tc.newton_solve


def _block_cell(kind, width=8):
    torch.manual_seed(300)
    cell = BlockGRUCell(width, 2, 4).to(tc.DT)
    with torch.no_grad():  # stronger coupling than at init
        cell.recurrent.uniform_(-0.6, 0.6)
    return cell


def _with_backend(solve, backend):
    """newton_solve with `backend` where the call is split (cp given)."""
    @functools.wraps(solve)
    def wrapped(cell, x, h0=None, **kw):
        if kw.get("cp") is not None:
            kw.setdefault("backend", backend)
        return solve(cell, x, h0, **kw)
    return wrapped


def _checks():
    import torch.distributed as dist
    tc._cell = _block_cell
    group = dist.group.WORLD
    failures = []
    for backend in ("torch", "triton"):
        tc.newton_solve = _with_backend(_SOLVE, backend)
        for check, Tl in ((tc.check_newton, 6), (tc.check_newton, 1), (tc.check_newton_iterates_and_fallback, 4)):
            tc._FAILURES.clear()
            check(group, "block", Tl)
            failures += [f"{backend} {check.__name__} Tl={Tl}: {f}" for f in tc._FAILURES]
    assert not failures, "\n".join(failures)


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _checks)


def test_context_parallel_block_newton_equals_one_rank_equals_sequential():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
