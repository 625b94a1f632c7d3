"""Gated linear attention: the chunked torch backend equals the reference loop (float64 within
1e-10, float32 within 1e-5 relative), forward, final state and gradients of q, k, v, gk and the
initial state, with document resets (inside chunks, at a chunk's first and last step) and an
initial state; strong gates stay finite; the reference equals flash-linear-attention's
naive_recurrent_gla when that package is installed; context parallelism on 2 ranks equals one
process."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megarnn.ops import gla
from megarnn.parallel.launch_env import free_port
from tests.parallel.spawn_util import run_on_ranks


def _inputs(B=2, T=45, H=3, K=8, V=5, dtype=torch.float64, seed=0, gate=2.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gk = F.logsigmoid(r(B, T, H, K) * 3) * gate
    s0 = r(B, H, K, V)
    reset = torch.zeros(B, T, dtype=torch.bool)
    for row, t in [(0, 7), (0, 16), (1, 15), (1, 40)]:  # inside a chunk, a chunk's first, its last step
        if t < T:
            reset[row, t] = True
    return q, k, v, gk, s0, reset


def _run(inputs, backend, chunk_size=16, grads=True):
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    o, state = gla(*leaves[:4], initial_state=leaves[4], reset=inputs[5], chunk_size=chunk_size, backend=backend)
    if not grads:
        return o, state, None
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(o.dtype)
    ws = torch.randn(state.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(state.dtype)
    ((o * w).sum() + (state * ws).sum()).backward()
    return o, state, [t.grad for t in leaves]


def _rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("chunk_size", [16, 32, 64, 8])
def test_chunked_equals_reference_in_float64_forward_and_gradients(chunk_size):
    inputs = _inputs()
    ref = _run(inputs, "reference")
    got = _run(inputs, "torch", chunk_size)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-10)
    for name, g, r in zip(["q", "k", "v", "gk", "initial_state"], got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_chunked_equals_reference_in_float32():
    inputs = _inputs(dtype=torch.float32, T=70)
    ref = _run(_inputs(dtype=torch.float64, T=70), "reference")
    got = _run(inputs, "torch", 32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert _rel(got[0].double(), ref[0]) <= 1e-5
    assert _rel(got[1].double(), ref[1]) <= 1e-5
    for g, r in zip(got[2], ref[2]):
        assert _rel(g.double(), r) <= 1e-5


def test_strong_gates_stay_finite_and_accurate_in_float32():
    """Cumulative log gates far below -88 within a chunk: no exp of a large positive number."""
    inputs = _inputs(dtype=torch.float64, gate=200.0)
    ref = _run(inputs, "reference", grads=False)
    got = _run([t.float() if t.is_floating_point() else t for t in inputs], "torch", 64)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[2])
    assert _rel(got[0].double(), ref[0]) <= 1e-5


def test_single_step_and_backend_errors():
    q, k, v, gk, s0, reset = _inputs(T=20)
    q, k, v, gk, reset = (t[:, :1] for t in (q, k, v, gk, reset))
    o1, s1 = gla(q, k, v, gk, s0, reset, backend="torch")
    o2, s2 = gla(q, k, v, gk, s0, reset, backend="reference")
    torch.testing.assert_close(o1, o2)
    with pytest.raises(ValueError, match="unknown backend"):
        gla(q, k, v, gk, backend="cuda")
    with pytest.raises(ValueError, match="initial_state"):
        gla(q, k, v, gk, s0[:, :1])


def test_steps_with_state_equal_one_call():
    q, k, v, gk, s0, reset = _inputs(T=20)
    o, s = gla(q, k, v, gk, s0, reset)
    state, outs = s0, []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        ot, state = gla(q[:, a:b], k[:, a:b], v[:, a:b], gk[:, a:b], state, reset[:, a:b])
        outs.append(ot)
    torch.testing.assert_close(torch.cat(outs, 1), o, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, s, rtol=0, atol=1e-12)


def test_reference_equals_fla_naive_recurrent_gla():
    naive = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention is not installed")
    q, k, v, gk, s0, _ = _inputs(dtype=torch.float32)
    o_fla, s_fla = naive.naive_recurrent_gla(q, k, v, gk, s0, output_final_state=True)
    o, s = gla(q, k, v, gk, s0, backend="torch")
    assert _rel(o, o_fla) <= 1e-5 and _rel(s, s_fla) <= 1e-5
    o, s = gla(q, k, v, gk, s0, backend="reference")
    assert _rel(o, o_fla) <= 1e-5 and _rel(s, s_fla) <= 1e-5


# --- context parallelism -------------------------------------------------------------------------

def _check_cp(backend=None):
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = _inputs(T=24)
    inputs[5][0, 12] = True  # a document starting exactly at the rank boundary
    ref = _run(inputs, "reference")
    Tl = 24 // world
    sl = slice(rank * Tl, (rank + 1) * Tl)
    leaves = [t.detach()[:, sl].clone().requires_grad_() for t in inputs[:4]]
    s0 = inputs[4].detach().clone().requires_grad_()
    o, state = gla(*leaves, initial_state=s0, reset=inputs[5][:, sl], chunk_size=8, cp=group, backend=backend)
    w = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)[:, sl]
    ws = torch.randn(state.shape, generator=torch.Generator().manual_seed(2), dtype=state.dtype)
    ((o * w).sum() + (state * ws).sum() / world).backward()  # the final state: each rank a share
    torch.testing.assert_close(o, ref[0][:, sl], rtol=0, atol=1e-10)
    torch.testing.assert_close(state, ref[1], rtol=0, atol=1e-10)
    for name, g, r in zip(["q", "k", "v", "gk"], [t.grad for t in leaves], ref[2]):
        torch.testing.assert_close(g, r[:, sl], rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")
    ds0 = s0.grad.clone()
    dist.all_reduce(ds0)
    torch.testing.assert_close(ds0, ref[2][4], rtol=0, atol=1e-10)


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _check_cp)


def test_context_parallel_on_2_ranks_equals_one_process():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
