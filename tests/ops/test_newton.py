"""Newton parallel solve (megarnn.ops.newton) against the sequential reference, in float64."""
import functools
import logging
import math

import pytest
import torch
from torch import nn

from megarnn.models.pararnn import ParaGRUCell, ParaLSTMCell
from megarnn.ops import newton as newton_ops
from megarnn.ops.newton import NewtonCell, block2_scan

# Newton itself: backend="torch" runs the sequential forward on CPU (torch_solver); these tests
# force Newton (a test passing backend= overrides it).
newton_solve = functools.partial(newton_ops.newton_solve, backend="torch_newton")

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


class DiagonalElmanCell(NewtonCell):
    """h' = tanh(W x + a * h + b): written with step() only; Newton gets J from autograd."""

    jacobian_structure = "diagonal"

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.state_size = width
        self.w = nn.Parameter(torch.randn(d_in, width) / math.sqrt(d_in))
        self.a = nn.Parameter(torch.empty(width).uniform_(-1, 1))
        self.b = nn.Parameter(0.1 * torch.randn(width))

    def step(self, h, x):
        return torch.tanh(x @ self.w + self.a * h + self.b)


class AutogradLSTMCell(ParaLSTMCell):
    """ParaLSTM with the default (jvp) block2 Jacobian instead of the analytic one."""

    linearize = NewtonCell.linearize


def _cell(kind: str, width: int = 6) -> tuple[NewtonCell, tuple]:
    """A float64 cell with recurrent weights in [-1, 1] (stronger coupling than at init) and its x layout."""
    if kind == "elman":
        return DiagonalElmanCell(5, width).to(DT), (5,)
    cell = {"gru": ParaGRUCell, "lstm": ParaLSTMCell, "lstm_autograd": AutogradLSTMCell}[kind](width, 2).to(DT)
    with torch.no_grad():
        cell.recurrent.uniform_(-1, 1)
        if hasattr(cell, "peephole"):
            cell.peephole.uniform_(-1, 1)
    return cell, (3, width)


def _step_params(cell):
    """The parameters step() uses (the input projection runs outside the solve)."""
    return [p for n, p in cell.named_parameters() if not n.startswith("project.")]


def _inputs(cell, layout, B=3, T=37, h0=True, resets=()):
    x = torch.randn(B, T, *layout, dtype=DT, requires_grad=True)
    h = torch.randn(B, cell.state_size, dtype=DT, requires_grad=True) if h0 else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        for b, t in resets:
            reset[b, t] = True
    return x, h, reset


def _solve_and_grads(cell, x, h0, reset, **kw):
    h = newton_solve(cell, x, h0, reset=reset, **kw)
    wrt = [x] + ([h0] if h0 is not None else []) + _step_params(cell)
    g = torch.randn_like(h, generator=torch.Generator().manual_seed(1))
    return h, torch.autograd.grad(h, wrt, g)


CELLS = ["gru", "lstm", "lstm_autograd", "elman"]
CASES = {  # (T, nonzero h0, resets)
    "T1": (1, True, ()),
    "T2": (2, False, ()),
    "odd_T_h0": (37, True, ()),
    "resets": (37, True, ((0, 0), (1, 17), (2, 36), (0, 20))),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", CELLS)
def test_newton_equals_sequential_forward_and_all_gradients(kind, case):
    T, h0, resets = CASES[case]
    cell, layout = _cell(kind)
    x, h, reset = _inputs(cell, layout, T=T, h0=h0, resets=resets)
    stats = {}
    out, grads = _solve_and_grads(cell, x, h, reset, stats=stats)
    ref, ref_grads = _solve_and_grads(cell, x, h, reset, backend="reference")
    torch.testing.assert_close(out, ref, **TOL)
    assert len(grads) == len(ref_grads) == 1 + (h is not None) + len(_step_params(cell))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert stats["converged"] and not stats["fallback"]


@pytest.mark.parametrize("kind", ["gru", "lstm", "elman"])
def test_chunked_calls_with_carried_state_equal_one_call(kind):
    cell, layout = _cell(kind)
    x, h0, reset = _inputs(cell, layout, T=29, resets=((1, 12), (0, 20)))
    full, full_grads = _solve_and_grads(cell, x, h0, reset)
    a = newton_solve(cell, x[:, :12], h0, reset=reset[:, :12])
    b = newton_solve(cell, x[:, 12:13], a[:, -1], reset=reset[:, 12:13])  # one token: step mode
    c = newton_solve(cell, x[:, 13:], b[:, -1], reset=reset[:, 13:])
    chunked = torch.cat([a, b, c], dim=1)
    torch.testing.assert_close(chunked, full, **TOL)
    g = torch.randn_like(full, generator=torch.Generator().manual_seed(1))
    chunk_grads = torch.autograd.grad(chunked, [x, h0] + _step_params(cell), g)
    for got, want in zip(chunk_grads, full_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_stats_report_convergence_within_limits(kind):
    cell, layout = _cell(kind)
    x, h0, _ = _inputs(cell, layout, T=64)
    stats = {}
    newton_solve(cell, x, h0, max_iters=8, tol=1e-12, stats=stats)
    assert 1 <= stats["iters"] <= 8
    assert stats["residual"] < 1e-12
    assert stats["fallback"] is False and stats["converged"] is True


def test_reset_at_start_blocks_the_gradient_to_h0():
    cell, layout = _cell("lstm")
    x, h0, reset = _inputs(cell, layout, T=9, resets=((0, 0), (1, 0), (2, 0)))
    h = newton_solve(cell, x, h0, reset=reset)
    (dh0,) = torch.autograd.grad(h.sum(), h0)
    assert torch.equal(dh0, torch.zeros_like(dh0))
    torch.testing.assert_close(h, newton_solve(cell, x, None, reset=reset), rtol=0, atol=0)


def test_unconverged_strict_solve_falls_back_to_exact_answer_and_logs(caplog):
    """strict=True (default): too few iterations still returns the exact solution, and says so."""
    cell, layout = _cell("gru")
    x, h0, reset = _inputs(cell, layout, T=37, resets=((1, 10),))
    stats = {}
    with caplog.at_level(logging.WARNING, logger="megarnn.newton"):
        out, grads = _solve_and_grads(cell, x, h0, reset, max_iters=1, tol=1e-14, stats=stats)
    ref, ref_grads = _solve_and_grads(cell, x, h0, reset, backend="reference")
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert stats["fallback"] is True and stats["iters"] == 1 and stats["residual"] > 1e-14
    assert any(r.name == "megarnn.newton" and "fell back" in r.getMessage() for r in caplog.records)


def test_unconverged_non_strict_solve_reports_it_without_fallback(caplog):
    """strict=False (the paper's fixed-iteration mode): the last iterate, flagged as not converged."""
    cell, layout = _cell("lstm")
    x, h0, _ = _inputs(cell, layout, T=37)
    stats = {}
    with caplog.at_level(logging.WARNING, logger="megarnn.newton"):
        out = newton_solve(cell, x, h0, max_iters=1, tol=1e-14, strict=False, stats=stats)
    assert stats == {"iters": 1, "residual": stats["residual"], "fallback": False, "converged": False}
    assert stats["residual"] > 1e-14
    assert (out - newton_solve(cell, x, h0, backend="reference")).abs().max() > 1e-12
    assert not caplog.records


class _WrongJacobianCell(DiagonalElmanCell):
    """A cell whose Jacobian is 50x too large: Newton overshoots and diverges."""

    def linearize(self, h_prev, x):
        f, j = super().linearize(h_prev, x)
        return f, 50 * j + 1


def test_divergence_falls_back_to_sequential_and_logs(caplog):
    cell = _WrongJacobianCell(5, 6).to(DT)
    x = torch.randn(2, 40, 5, dtype=DT)
    stats = {}
    with caplog.at_level(logging.WARNING, logger="megarnn.newton"):
        out = newton_solve(cell, x, max_iters=50, stats=stats, strict=False)
    torch.testing.assert_close(out, newton_solve(cell, x, backend="reference"), **TOL)
    assert stats["fallback"] is True and stats["iters"] < 50
    assert any(("grew" in r.getMessage() or "non-finite" in r.getMessage()) for r in caplog.records)


def _dense_jacobian(cell, h, x):
    """Full (S, S) Jacobian of one step at one (h, x) by reverse-mode autograd."""
    return torch.autograd.functional.jacobian(lambda v: cell.step(v, x), h)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_analytic_jacobian_equals_autograd(kind):
    cell, layout = _cell(kind)
    h = torch.randn(3, 11, cell.state_size, dtype=DT)
    x = torch.randn(3, 11, *layout, dtype=DT)
    f, jac = cell.linearize(h, x)
    f_ref, jac_ref = cell.autograd_linearize(h, x)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=0)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-13, atol=1e-13)
    # The declared structure is the whole Jacobian: the dense one has nothing else.
    S = cell.state_size
    dense = _dense_jacobian(cell, h[1, 4], x[1, 4])
    if kind == "gru":
        expect = torch.diag(jac[1, 4])
    else:
        D = S // 2
        idx = torch.arange(D)
        expect = torch.zeros(S, S, dtype=DT)
        for i in range(2):
            for j in range(2):
                expect[i * D + idx, j * D + idx] = jac[1, 4, :, i, j]
    torch.testing.assert_close(dense, expect, rtol=1e-13, atol=1e-13)


def test_block2_scan_equals_matrix_loop_forward_and_reverse():
    a = torch.randn(2, 9, 4, 2, 2, dtype=DT)
    b = torch.randn(2, 9, 4, 2, dtype=DT)
    h0 = torch.randn(2, 4, 2, dtype=DT)
    h, expect = h0, []
    for t in range(9):
        h = (a[:, t] @ h.unsqueeze(-1)).squeeze(-1) + b[:, t]
        expect.append(h)
    torch.testing.assert_close(block2_scan(a, b, h0), torch.stack(expect, 1), rtol=1e-14, atol=1e-14)
    rev = block2_scan(a.flip(1), b.flip(1), h0).flip(1)
    torch.testing.assert_close(block2_scan(a, b, h0, reverse=True), rev, rtol=0, atol=0)


def test_bad_shapes_raise_value_error_with_expectation():
    cell, layout = _cell("gru")
    x = torch.randn(2, 5, *layout, dtype=DT)
    with pytest.raises(ValueError, match=r"h0 must be \(B, S\)"):
        newton_solve(cell, x, torch.zeros(2, 7, dtype=DT))
    with pytest.raises(ValueError, match="reset must be"):
        newton_solve(cell, x, reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown backend"):
        newton_solve(cell, x, backend="cuda")
    with pytest.raises(ValueError, match=r"\(B, T, D, 2, 2\)"):
        block2_scan(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3))


# --- the torch backend's solver choice, the promise of a converged solve, host syncs -------------

@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_torch_backend_runs_the_sequential_forward_on_cpu_with_the_adjoint_backward(kind):
    cell, layout = _cell(kind)
    x, h0, reset = _inputs(cell, layout, T=37, resets=((1, 10),))
    assert newton_ops.torch_solver(3, 37, 6, x.device) == "sequential"
    assert newton_ops.torch_solver(3, 37, 6, x.device, strict=False) == "newton"
    ref, ref_grads = _solve_and_grads(cell, x, h0, reset, backend="reference")
    for backend in ("torch", "torch_sequential", None):
        stats = {}
        out, grads = _solve_and_grads(cell, x, h0, reset, backend=backend, stats=stats)
        assert stats == {"iters": 0, "residual": 0.0, "fallback": False, "converged": True}
        torch.testing.assert_close(out, ref, **TOL)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype,n,bound", [(torch.float32, 200, 1e-6), (torch.float64, 100, 1e-10)])
def test_converged_newton_is_within_its_promise_of_the_exact_solution(dtype, n, bound):
    """Random ParaGRU cells (recurrent weights in (-0.8, 0.8), inputs 1.5 randn): a converged solve
    with the default tolerance is within 1e-6 (float32) / 1e-10 (float64) of the float64 solution."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for _ in range(n):
        cell = ParaGRUCell(8, 2).to(DT)
        with torch.no_grad():
            cell.recurrent.copy_(torch.rand(3, 8, generator=g, dtype=DT) * 1.6 - 0.8)
        x = 1.5 * torch.randn(2, 64, 3, 8, generator=g, dtype=DT)
        h0 = torch.randn(2, 8, generator=g, dtype=DT)
        with torch.no_grad():
            exact = newton_ops.sequential_solve(cell, x, h0)
            stats = {}
            h = newton_solve(cell.to(dtype), x.to(dtype), h0.to(dtype), stats=stats)
        assert stats["converged"] and not stats["fallback"]
        assert stats["residual"] <= newton_ops.default_tol(dtype)
        worst = max(worst, (h.double() - exact).abs().max().item())
    assert worst <= bound, worst


def _count_host_syncs(monkeypatch) -> list:
    """Patch the Tensor methods that read a value on the host; returns the list they append to."""
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_newton_reads_the_residuals_every_sync_every_iterations(kind, monkeypatch):
    """One host read per SYNC_EVERY iterations, and the same result and stats as reading every
    iteration: converged, fixed-iteration (strict=False: exactly the iterate after max_iters
    updates), and the fallback."""
    cell, layout = _cell(kind)
    x, h0, reset = _inputs(cell, layout, T=40, resets=((1, 10),))
    cases = [dict(), dict(tol=1e-14, max_iters=2), *(dict(max_iters=k, tol=0.0, strict=False) for k in range(7))]
    results = {}
    for every in (1, newton_ops.SYNC_EVERY):
        monkeypatch.setattr(newton_ops, "SYNC_EVERY", every)
        for i, kw in enumerate(cases):
            stats = {}
            with torch.no_grad(), monkeypatch.context() as m:
                calls = _count_host_syncs(m)
                h = newton_solve(cell, x, h0, reset=reset, stats=stats, **kw)
            # The residuals the policy needed: a converged solve's iters counts its final update.
            needed = stats["iters"] + (0 if stats["converged"] and not stats["fallback"] else 1)
            assert calls == ["tolist"] * -(-needed // every), (kw, every, calls, stats)
            results.setdefault(i, []).append((h, stats))
    for i, ((h1, s1), (h4, s4)) in enumerate(results.values()):
        torch.testing.assert_close(h4, h1, rtol=0, atol=0)
        assert s4 == s1, cases[i]
    for k in range(7):  # strict=False returns the k-th iterate: each one nearer the solution
        assert results[2 + k][0][1]["iters"] == k
