"""The LRU's complex diagonal scan (megarnn.ops.lru_scan): the torch backend (complex scan without
autograd, adjoint backward) and the triton backend (the block scan's kernel on 2 x 2 blocks) equal the reference loop on (re, im) pairs in float64 within 1e-10
and float32 within 1e-5 relative, forward and gradients of the input, nu_log, theta_log and the
initial state, with document resets (first step, inside, last step) and an initial state; lambda
is the paper's exp(-exp(nu_log) + i exp(theta_log)); steps with state equal one call; context
parallelism on 2 ranks equals one process (a document starting at the rank boundary), and in the
same spawned processes the log-space scan's (tests/ops/test_log_scan.py: one spawn for both)."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarnn.ops import lru_scan
from megarnn.ops.lru import lru_lambda
from megarnn.parallel.launch_env import free_port
from tests.ops.test_log_scan import check_cp as check_log_scan_cp
from tests.parallel.spawn_util import run_on_ranks


def _inputs(B=2, T=150, N=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b = r(B, T, N, 2)
    nu_log = torch.log(-torch.log(torch.linspace(0.5, 0.999, N, dtype=torch.float64)))  # |lambda| 0.5 .. 0.999
    theta_log = torch.log(torch.linspace(0.01, 2 * math.pi, N, dtype=torch.float64))
    h0 = r(B, N, 2)
    reset = torch.zeros(B, T, dtype=torch.bool)
    for row, t in [(0, 0), (0, 37), (1, 64), (1, T - 1)]:
        if t < T:
            reset[row, t] = True
    return [t.to(dtype) for t in (b, nu_log, theta_log, h0)] + [reset]


def _run(inputs, backend, reset=True):
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:4]]
    h = lru_scan(*leaves, reset=inputs[4] if reset else None, backend=backend)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(h.dtype)
    (h * w).sum().backward()
    return [h] + [t.grad for t in leaves]


def _rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reset", [True, False])
def test_torch_and_triton_equal_reference_forward_and_gradients(dtype, tol, reset, backend):
    """triton: lambda as a 2 x 2 real block on the block scan's kernel (Triton's interpreter here)."""
    inputs = _inputs(dtype=dtype)
    want = _run(inputs, "reference", reset)
    got = _run(inputs, backend, reset)
    for name, g, w in zip(["h", "db", "dnu_log", "dtheta_log", "dh0"], got, want):
        assert g.dtype == w.dtype and _rel(g, w) <= tol, (name, _rel(g, w))


def test_lambda_is_the_papers_exponential_parametrization_and_a_reset_drops_the_state():
    b, nu_log, theta_log, h0, _ = _inputs(T=3)
    lam = torch.view_as_complex(lru_lambda(nu_log, theta_log))
    torch.testing.assert_close(lam, torch.exp(-torch.exp(nu_log) + 1j * torch.exp(theta_log)))
    reset = torch.zeros(2, 3, dtype=torch.bool)
    reset[:, 1] = True
    for backend in ("reference", "torch"):
        h = torch.view_as_complex(lru_scan(b, nu_log, theta_log, h0, reset, backend=backend))
        bc = torch.view_as_complex(b)
        torch.testing.assert_close(h[:, 0], lam * torch.view_as_complex(h0) + bc[:, 0])
        torch.testing.assert_close(h[:, 1], bc[:, 1])  # h_0 dropped at the document start
        torch.testing.assert_close(h[:, 2], lam * bc[:, 1] + bc[:, 2])


def test_steps_with_state_equal_one_call_and_backend_errors():
    b, nu_log, theta_log, h0, reset = _inputs(T=20)
    full = lru_scan(b, nu_log, theta_log, h0, reset)
    state, parts = h0, []
    for t0 in range(0, 20, 7):
        h = lru_scan(b[:, t0:t0 + 7], nu_log, theta_log, state, reset[:, t0:t0 + 7])
        parts.append(h)
        state = h[:, -1]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="h0 must be"):
        lru_scan(b, nu_log, theta_log, h0[:, :2])


def _check_cp():
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = _inputs(T=24)
    inputs[4][1, 12] = True  # a document starting exactly at the rank boundary
    ref = _run(inputs, "reference")
    sl = slice(rank * 12, (rank + 1) * 12)
    leaves = [t.detach().clone() for t in inputs[:4]]
    leaves[0] = leaves[0][:, sl].clone()
    leaves = [t.requires_grad_() for t in leaves]
    h = lru_scan(*leaves, reset=inputs[4][:, sl], cp=group)
    w = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)[:, sl]
    (h * w).sum().backward()
    torch.testing.assert_close(h, ref[0][:, sl], rtol=0, atol=1e-10)
    torch.testing.assert_close(leaves[0].grad, ref[1][:, sl], rtol=0, atol=1e-10)
    for name, t, r in zip(["nu_log", "theta_log", "h0"], leaves[1:], ref[2:]):
        g = t.grad.clone()
        dist.all_reduce(g)  # replicated inputs: each rank's share; h0: rank 0's
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def _check_both():
    _check_cp()
    check_log_scan_cp()


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _check_both)


def test_context_parallel_on_2_ranks_equals_one_process_lru_and_log_scan():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
