"""The log-space scan under minGRU / minLSTM (megarnn.ops.log_linear_scan): the torch backend (the
paper's cumsum + logcumsumexp form on pieces between chunk starts and resets, the carry between
chunks and the initial state as an extra linear term) equals the reference loop in float64 within
1e-10 and float32 within 1e-5 relative (5e-5 in one 150-step piece), forward and gradients of log_a, log_b and the initial
state, at several chunk sizes (1 step, not dividing T, one chunk for the whole sequence), with
document resets (first step, inside a chunk, at a chunk start, last step); strong gates stay
finite; steps with state equal one call. The triton backend (the recurrence in linear space on
the linear scan's kernel) equals the reference loop too. Context parallelism: tests/ops/test_lru.py runs this
op's 2-rank check in the same spawned processes as the LRU's (one spawn for both)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megarnn.ops import log_linear_scan


def _inputs(B=2, T=150, D=5, dtype=torch.float64, seed=0, gate=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    log_a = -F.softplus(r(B, T, D) * 2 * gate)
    log_b = -F.softplus(-r(B, T, D) * 2) + r(B, T, D) * 0.3  # log z + log g(h~)-like terms
    h0 = torch.rand(B, D, generator=g, dtype=torch.float64) - 0.2  # any sign: it enters linearly
    reset = torch.zeros(B, T, dtype=torch.bool)
    for row, t in [(0, 0), (0, 37), (0, 38), (1, 64), (1, T - 1)]:
        if t < T:
            reset[row, t] = True
    return [t.to(dtype) for t in (log_a, log_b, h0)] + [reset]


def _run(inputs, backend, chunk_size=64, reset=True):
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:3]]
    h = log_linear_scan(*leaves, reset=inputs[3] if reset else None, chunk_size=chunk_size, backend=backend)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(h.dtype)
    (h * w).sum().backward()
    return [h] + [t.grad for t in leaves]


def _rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("chunk_size", [64, 16, 7, 1, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_torch_equals_reference_forward_and_gradients(dtype, tol, chunk_size):
    """One chunk over all 150 steps (the paper's form on the whole sequence) loses more in float32:
    |a*| grows with the piece (1.1e-5 measured), so 5e-5 there."""
    inputs = _inputs(dtype=dtype)
    if chunk_size >= 150 and dtype == torch.float32:
        tol = 5e-5
    for reset in (True, False):
        want = _run(inputs, "reference", reset=reset)
        got = _run(inputs, "torch", chunk_size, reset=reset)
        for name, g, w in zip(["h", "dlog_a", "dlog_b", "dh0"], got, want):
            assert g.dtype == w.dtype and torch.isfinite(g).all() and _rel(g, w) <= tol, (name, reset, _rel(g, w))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_triton_backend_equals_reference_forward_and_gradients(dtype, tol):
    """backend="triton": the linear-space recurrence on the linear scan's kernel (Triton's
    interpreter here), with resets and an initial state of either sign."""
    inputs = _inputs(dtype=dtype)
    for reset in (True, False):
        want = _run(inputs, "reference", reset=reset)
        got = _run(inputs, "triton", reset=reset)
        for name, g, w in zip(["h", "dlog_a", "dlog_b", "dh0"], got, want):
            assert g.dtype == w.dtype and torch.isfinite(g).all() and _rel(g, w) <= tol, (name, reset, _rel(g, w))


def test_strong_gates_stay_finite_and_accurate_in_float32():
    """log_a down to ~-40 per step: a* reaches -2500 over a 64-step chunk."""
    inputs = _inputs(dtype=torch.float32, gate=20.0)
    want = _run([t.double() if t.is_floating_point() else t for t in inputs], "reference")
    got = _run(inputs, "torch")
    for name, g, w in zip(["h", "dlog_a", "dlog_b", "dh0"], got, want):
        assert torch.isfinite(g).all() and _rel(g.double(), w) <= 1e-4, (name, _rel(g.double(), w))


def test_steps_with_state_equal_one_call_and_backend_errors():
    log_a, log_b, h0, reset = _inputs(T=20)
    full = log_linear_scan(log_a, log_b, h0, reset, chunk_size=4)
    state, parts = h0, []
    for t0 in range(0, 20, 7):
        h = log_linear_scan(log_a[:, t0:t0 + 7], log_b[:, t0:t0 + 7], state, reset[:, t0:t0 + 7], chunk_size=4)
        parts.append(h)
        state = h[:, -1]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="h0 must be"):
        log_linear_scan(log_a, log_b, h0[:, :2])


def check_cp():
    """On the ranks of a spawned test (tests/ops/test_lru.py): cp=2 equals one process."""
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = _inputs(T=24)
    inputs[3][1, 12] = True  # a document starting exactly at the rank boundary
    ref = _run(inputs, "reference")
    sl = slice(rank * 12, (rank + 1) * 12)
    leaves = [inputs[0][:, sl].clone(), inputs[1][:, sl].clone(), inputs[2].clone()]
    leaves = [t.requires_grad_() for t in leaves]
    h = log_linear_scan(*leaves, reset=inputs[3][:, sl], chunk_size=5, cp=group)
    w = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)[:, sl]
    (h * w).sum().backward()
    torch.testing.assert_close(h, ref[0][:, sl], rtol=0, atol=1e-10)
    for name, t, r in zip(["log_a", "log_b"], leaves, ref[1:]):
        torch.testing.assert_close(t.grad, r[:, sl], rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")
    dh0 = leaves[2].grad.clone()
    dist.all_reduce(dh0)  # rank 0's
    torch.testing.assert_close(dh0, ref[3], rtol=0, atol=1e-10)
