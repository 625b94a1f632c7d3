"""The Newton kernels (kernels/newton.py) behind newton_solve's triton backends equal the
sequential reference, forward and every gradient, for ParaGRU and ParaLSTM.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small; on a GPU the same tests run the compiled kernels. Every kernel output is
allocated NaN-filled (see _nan_outputs), so an element a kernel never writes fails the test.
The judge is megarnn.ops.newton.sequential_solve differentiated by autograd, in float64 on the
same (float32-rounded) inputs and parameters; errors are max |out - ref| / max |ref| per tensor.
"""
import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from megarnn.models.pararnn import ParaGRUCell, ParaLSTMCell
from megarnn.ops import newton as newton_ops
from megarnn.ops.newton import NewtonCell, newton_solve, sequential_solve, triton_kind, triton_solver
from tests.conftest import ROOT
from tests.ops.kernel_checks import assert_relative_close as _assert_close, fill_outputs_with_nan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = newton_ops._require_kernels(torch.zeros(1, device=DEVICE))  # megarnn_kernels.newton
H_TOL, GRAD_TOL = 1e-6, 1e-5  # the bars for fp32 outputs and gradients
FP64_TOL = 1e-10
CELLS = {"gru": ParaGRUCell, "lstm": ParaLSTMCell}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    fill_outputs_with_nan(monkeypatch, kernels)


def _case(kind, T, with_h0=True, resets=(), B=2, W=8, dtype=torch.float32, seed=0):
    """A cell with recurrent weights and peepholes in [-1, 1] (stronger coupling than at init),
    gate inputs x (B, T, 3, W), h0 (B, S) or None, resets (B, T) at the (b, t) given, and an
    incoming gradient g (B, T, S)."""
    torch.manual_seed(seed)
    cell = CELLS[kind](W, 2).to(dtype)
    with torch.no_grad():
        cell.recurrent.uniform_(-1, 1)
        if kind == "lstm":
            cell.peephole.uniform_(-1, 1)
    x = torch.randn(B, T, 3, W, dtype=dtype)
    h0 = torch.randn(B, cell.state_size, dtype=dtype) if with_h0 else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        for b, t in resets:
            reset[b, t] = True
    g = torch.randn(B, T, cell.state_size, dtype=dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return cell.to(DEVICE), to(x), to(h0), to(reset), to(g)


def _step_params(cell):
    """The parameters the cell's step uses (the input projection runs outside the solve)."""
    return {n: p for n, p in cell.named_parameters() if not n.startswith("project.")}


def _solve_with_grads(solve, cell, x, h0, g):
    """solve(cell, x, h0) -> h, and the gradients of <h, g> wrt x, h0 and the step's parameters."""
    x = x.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    h = solve(cell, x, h0)
    params = _step_params(cell)
    wrt = {"dx": x, **({"dh0": h0} if h0 is not None else {}), **{f"d{n}": p for n, p in params.items()}}
    grads = torch.autograd.grad(h, list(wrt.values()), g.to(h.dtype))
    return h.detach(), dict(zip(wrt, grads))


def _reference(cell, x, h0, reset, g):
    """sequential_solve in float64 with autograd: the judge."""
    ref = copy.deepcopy(cell).double()
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    return _solve_with_grads(lambda c, x, h0: sequential_solve(c, x, h0, reset), ref, as64(x), as64(h0), g.double())


def _check_against_reference(cell, x, h0, reset, g, backend, h_tol, grad_tol, **kw):
    """newton_solve(backend) equals the reference; returns its stats."""
    stats = {}
    h, grads = _solve_with_grads(lambda c, x, h0: newton_solve(c, x, h0, reset=reset, backend=backend, stats=stats,
                                                               **kw), cell, x, h0, g)
    ref, ref_grads = _reference(cell, x, h0, reset, g)
    assert h.dtype == x.dtype
    _assert_close("h", h, ref, h_tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_close(name, grads[name], ref_grads[name], grad_tol)
    return stats


CASES = {  # T, h0 given, resets (b, t), W: odd lengths, T = 1, resets at t = 0 and inside
    "T1_h0": (1, True, (), 8),
    "T7_no_h0_reset_at_0_two_channel_blocks": (7, False, ((0, 0),), 40),
    "T37_h0_resets": (37, True, ((0, 0), (1, 17), (0, 20), (1, 36)), 8),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("solver", ["sequential", "newton"])
def test_triton_solvers_equal_sequential_reference_with_all_gradients(solver, kind, case):
    """The fused sequential kernel and the Newton kernels, each with the adjoint kernel as
    backward: h to 1e-6 and dL/dx, dL/dh0, dL/d(recurrent, peephole) to 1e-5 in float32. W = 40
    spans two channel blocks of 32 with a ragged tail."""
    T, with_h0, resets, W = CASES[case]
    cell, x, h0, reset, g = _case(kind, T, with_h0, resets, W=W)
    stats = _check_against_reference(cell, x, h0, reset, g, f"triton_{solver}", H_TOL, GRAD_TOL)
    assert not stats["fallback"] and stats["converged"]
    if solver == "sequential":
        assert stats == {"iters": 0, "residual": 0.0, "fallback": False, "converged": True}
    else:
        assert stats["residual"] <= newton_ops.default_tol(torch.float32)
        assert stats["iters"] == 0 if T == 1 else 3 <= stats["iters"] <= 9  # T = 1: the guess is exact


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_triton_float64_equals_reference_to_rounding_and_iterates_like_torch(kind):
    """float64: both solvers to 1e-10, and the Newton kernels take as many iterations as the
    torch backend (the same iterates, up to rounding; the same stats keys)."""
    cell, x, h0, reset, g = _case(kind, 37, True, ((0, 0), (1, 17)), dtype=torch.float64, seed=1)
    _check_against_reference(cell, x, h0, reset, g, "triton_sequential", FP64_TOL, FP64_TOL)
    stats = _check_against_reference(cell, x, h0, reset, g, "triton_newton", FP64_TOL, FP64_TOL)
    torch_stats = {}
    newton_solve(cell, x, h0, reset=reset, backend="torch_newton", stats=torch_stats)
    assert stats.keys() == torch_stats.keys()
    assert stats["iters"] == torch_stats["iters"] and stats["converged"] and not stats["fallback"]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_time_chunked_newton_and_adjoint_equal_reference(kind, monkeypatch):
    """Chunks of 5 of T = 37 (eight chunks, the last ragged), as a GPU runs them: two passes with
    the chunk carries in between, forward and adjoint; resets at t = 0, inside a chunk and at a
    chunk's first step (t = 15). In float64, so that a carry error shows: the gradients to 1e-10,
    and as many Newton iterations as the torch backend (an inexact linear solve still converges,
    but more slowly)."""
    plan = kernels._plan
    monkeypatch.setattr(kernels, "_plan", lambda B, T, W, device, chunk_size: plan(B, T, W, device, 5))
    cell, x, h0, reset, g = _case(kind, 37, True, ((0, 0), (1, 15), (0, 23)), dtype=torch.float64, seed=2)
    stats = _check_against_reference(cell, x, h0, reset, g, "triton_newton", FP64_TOL, FP64_TOL)
    torch_stats = {}
    newton_solve(cell, x, h0, reset=reset, backend="torch_newton", stats=torch_stats)
    assert stats["iters"] == torch_stats["iters"] and stats["converged"] and not stats["fallback"]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_kernels_without_h0_equal_zero_h0(kind):
    """The host functions called directly with h0=None (never through newton_solve, which
    passes zeros): the same outputs as with zeros, and no dh0."""
    cell, x, h0, reset, g = _case(kind, 7, True, ((1, 3),), seed=3)
    block = newton_ops._param_block(cell, kind, x.dtype)
    zeros = torch.zeros_like(h0)
    for fn in (kernels.sequential, kernels.newton_guess):
        torch.testing.assert_close(fn(kind, x, block, None, reset), fn(kind, x, block, zeros, reset), rtol=0, atol=0)
    h = kernels.sequential(kind, x, block, None, reset)
    for a, b in zip(kernels.newton_iteration(kind, x, block, h, None, reset),
                    kernels.newton_iteration(kind, x, block, h, zeros, reset)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dx, dblock, dh0 = kernels.adjoint(kind, x, block, h, None, reset, g)
    dx_z, dblock_z, _ = kernels.adjoint(kind, x, block, h, zeros, reset, g)
    assert dh0 is None
    torch.testing.assert_close(dx, dx_z, rtol=0, atol=0)
    torch.testing.assert_close(dblock, dblock_z, rtol=0, atol=0)


def test_unconverged_triton_newton_falls_back_or_reports_like_torch(caplog):
    """strict=True: too few iterations still give the exact solution (the fused sequential kernel),
    logged and flagged; strict=False: the last iterate, flagged as not converged, no log."""
    cell, x, h0, reset, g = _case("gru", 37, True, ((1, 10),), seed=4)
    with caplog.at_level(logging.WARNING, logger="megarnn.newton"):
        stats = _check_against_reference(cell, x, h0, reset, g, "triton_newton", H_TOL, GRAD_TOL,
                                         max_iters=1, tol=1e-14)
    assert stats["fallback"] is True and stats["iters"] == 1 and stats["residual"] > 1e-14
    assert any("fell back" in r.getMessage() for r in caplog.records)
    caplog.clear()
    stats = {}
    with caplog.at_level(logging.WARNING, logger="megarnn.newton"):
        out = newton_solve(cell, x, h0, reset=reset, max_iters=1, tol=1e-14, strict=False, stats=stats,
                           backend="triton_newton")
    assert stats == {"iters": 1, "residual": stats["residual"], "fallback": False, "converged": False}
    assert (out - newton_solve(cell, x, h0, reset=reset, backend="reference")).abs().max() > 1e-6
    assert not caplog.records


def test_dispatcher_rule(monkeypatch):
    """triton_solver: sequential for short sequences and for enough channels per SM, Newton for
    few channels and long sequences (the issue's B = 8, T = 4096, W = 256); always sequential off
    CUDA. The chunk plan: one chunk off CUDA, enough chunks to fill the SMs on CUDA."""
    props = type("P", (), {"multi_processor_count": 132})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert triton_solver(8, 4096, 256, cuda) == "newton"
    assert triton_solver(8, newton_ops.SEQUENTIAL_MAX_T, 256, cuda) == "sequential"
    assert triton_solver(64, 4096, 4096, cuda) == "sequential"
    assert triton_solver(8, 4096, 256, cpu) == "sequential"
    assert kernels._plan(8, 4096, 256, cpu, None) == (4096, 1)
    chunk, n = kernels._plan(8, 4096, 256, cuda, None)
    assert n * 8 * 256 // 32 >= kernels.CHUNK_PROGRAMS_PER_SM * 132 and chunk >= kernels.MIN_CHUNK
    assert chunk * n >= 4096 > chunk * (n - 1)
    assert kernels._plan(64, 4096, 4096, cuda, None) == (4096, 1)


def test_backend_selection_and_errors(monkeypatch):
    """backend=None stays "torch" on CPU; the triton backend knows ParaGRU / ParaLSTM (and cells
    that declare triton_kind), and says what to do for other cells and dtypes."""
    cell, x, h0, _, _ = _case("gru", 5, True)
    if DEVICE == "cpu":
        with monkeypatch.context() as m:
            m.setattr(newton_ops, "_newton_triton_op", lambda *a: pytest.fail("triton picked on CPU"))
            torch.testing.assert_close(newton_solve(cell, x, h0), newton_solve(cell, x, h0, backend="torch"))
    assert triton_kind(ParaGRUCell(4, 1)) == "gru" and triton_kind(ParaLSTMCell(4, 1)) == "lstm"

    class OptedOut(ParaGRUCell):  # a subclass that changes step() opts out
        triton_kind = None

    class Declared(OptedOut):
        triton_kind = "gru"

    class Elman(NewtonCell):  # any other cell: the kernels do not know its step
        jacobian_structure = "diagonal"

        def __init__(self, width):
            super().__init__()
            self.state_size, self.a = width, nn.Parameter(torch.zeros(width))

        def step(self, h, x):
            return torch.tanh(x[..., 0, :] + self.a * h)

    assert triton_kind(OptedOut(4, 1)) is None and triton_kind(Declared(4, 1)) == "gru"
    assert triton_kind(Elman(4)) is None
    for other in (OptedOut(8, 2), Elman(8)):
        with pytest.raises(ValueError, match="backend='torch'"):
            newton_solve(other.to(DEVICE), x, backend="triton")
    with pytest.raises(ValueError, match="float32 or float64"):
        newton_solve(cell.to(torch.bfloat16), x.bfloat16(), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU; with one the kernels compile")
def test_triton_backend_without_interpreter_says_what_to_do(monkeypatch):
    cell, x, h0, _, _ = _case("lstm", 5, True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        newton_solve(cell, x, h0, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="compiled for a GPU"):
        newton_solve(cell, x, h0, backend="triton_newton")


def test_bench_prints_newton_rows_and_the_missing_peer(capsys, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "tools" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--only", "newton", "--newton-shape", "1", "5", "4", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for kind in ("gru", "lstm"):
        for name in ("megarnn triton", "megarnn triton newton", "megarnn triton sequential", "megarnn torch backend",
                     "torch sequential loop"):
            assert any(line.startswith(f"newton {kind} 1x5x4") and name in line for line in out.splitlines())
    assert "x the loop (fwd+bwd)" in out and "failed" not in out
    try:
        import pararnn  # noqa: F401
    except ImportError:
        assert "missing: pararnn-torch" in out


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import megarnn_kernels.newton as K
    VARIANTS = {  # the flag settings the host functions launch (pass 1 / pass 2 of a chunked call)
        K._sequential_kernel: [{}],
        K._guess_kernel: [{}],
        K._newton_kernel: [dict(HAS_CIN=False, WRITE_H=False, WRITE_STATE=True),
                           dict(HAS_CIN=True, WRITE_H=True, WRITE_STATE=False)],
        K._carry_kernel: [dict(REVERSE=False), dict(REVERSE=True)],
        K._adjoint_kernel: [dict(HAS_CIN=False, WRITE_GRADS=False), dict(HAS_CIN=True, WRITE_GRADS=True)],
    }
    for fn, variants in VARIANTS.items():
        names = [p.name for p in fn.params]
        for flags in variants:
            for lstm in (False, True):
                ce = dict(BLOCK_W=32, ACC=tl.float32, LSTM=lstm, UNROLL=K.UNROLL, HAS_H0=True, HAS_RESET=True, **flags)
                ce = {k: v for k, v in ce.items() if k in names}
                sig = {n: "constexpr" if n in ce else "i32" if n in ("T", "W", "CHUNK", "NC")
                       else "*u8" if n == "RESET" else "*fp32" for n in names}
                triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": 1})
    print("compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above runs the compiled kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts code the compiler rejects: compile every kernel in every variant
    the host launches, for the GRU and the LSTM, for sm_90 down to a cubin with Triton's bundled
    ptxas, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    no_cuda = "No module named 'triton.backends.nvidia'" in proc.stderr
    if no_cuda or ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip(f"this triton cannot compile for CUDA: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_scan_kernel_equals_the_reference_loop(dtype, tol, reverse):
    """The 2x2-block scan (paraLSTM's Newton solves across context-parallel ranks), odd sizes,
    with and without h0, every output written (NaN-prefilled)."""
    torch.manual_seed(3)
    a = (torch.rand(2, 37, 35, 2, 2, dtype=dtype) - 0.5).to(DEVICE)
    b = torch.randn(2, 37, 35, 2, dtype=dtype, device=DEVICE)
    h0 = torch.randn(2, 35, 2, dtype=dtype, device=DEVICE)
    for start in (None, h0):
        got = kernels.block_scan(a, b, start, reverse)
        _assert_close("h", got, newton_ops.block2_scan(a.double(), b.double(), None if start is None else
                                                       start.double(), reverse), tol)
