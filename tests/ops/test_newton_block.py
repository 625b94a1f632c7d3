"""Block-diagonal Newton cells (issue #14 item 5): the block-diagonal linear scan and the Newton solves
of the block-diagonal paraGRU and paraLSTM cells (megarnn.models.pararnn.BlockGRUCell, BlockLSTMCell).

- block_scan (torch chunked, triton kernel forward and backward) equals the reference loop,
  differentiated by autograd, for n in 2..16 (powers of 2 and a padded size), forward and reverse,
  with and without h0, with zero matrices (document resets): fp64 <= 1e-10, fp32 <= 1e-5.
- The cell's analytic block Jacobian equals forward-mode autograd's.
- newton_solve of the cell equals the sequential fp64 solve, forward and every gradient (x, h0,
  parameters), with resets and h0, on every backend (torch_newton, triton_newton, triton, torch);
  the stops: strict fallback to the sequential solve, fixed-iteration mode.
On CPU the Triton kernels run under the interpreter (tests/conftest.py), so shapes are small.
"""
import pytest
import torch

from megarnn.models.pararnn import BlockGRUCell, BlockLSTMCell
from megarnn.ops import newton as newton_ops
from megarnn.ops.newton import block_scan, block_scan_reference, newton_solve, sequential_solve
from tests.ops.kernel_checks import fill_outputs_with_nan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP64_TOL, FP32_TOL = 1e-10, 1e-5


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def nan_outputs(monkeypatch):
    kernels = newton_ops._require_kernels(torch.zeros(1, device=DEVICE))
    fill_outputs_with_nan(monkeypatch, kernels)


def _scan_case(n, dtype, B=2, T=11, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(B, T, D, n, n, generator=g, dtype=torch.float64) - 0.5) * (2.4 / n ** 0.5)
    a[0, 4] = 0  # a document reset: no carry across t = 4
    a[1, -1] = 0
    b = torch.randn(B, T, D, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, n, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, D, n, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=DEVICE) for t in (a, b, h0, gy)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_block_scan_equals_the_reference_loop_forward_and_gradients(backend, dtype, tol, nan_outputs):
    sizes = (2, 3, 4, 8, 16) if dtype == torch.float64 else (3, 16)
    for n in sizes:
        a, b, h0, gy = _scan_case(n, dtype, seed=n)
        every = n == 3  # all four (direction, h0) cases for one size; two for the others (interpreter time)
        for reverse, start in [(False, h0), (True, None)] + ([(False, None), (True, h0)] if every else []):
            if True:
                ins = [a, b] + ([start] if start is not None else [])
                ref_ins = [t.double().detach().requires_grad_() for t in ins]
                want = block_scan_reference(ref_ins[0], ref_ins[1], ref_ins[2] if start is not None else None,
                                            reverse)
                want_grads = torch.autograd.grad(want, ref_ins, gy.double())
                got_ins = [t.detach().requires_grad_() for t in ins]
                got = block_scan(got_ins[0], got_ins[1], got_ins[2] if start is not None else None, reverse,
                                 backend=backend)
                assert got.dtype == dtype
                grads = torch.autograd.grad(got, got_ins, gy)
                case = f"n={n} reverse={reverse} h0={start is not None}"
                assert _rel(got, want) <= tol, (case, "h", _rel(got, want))
                for name, g, w in zip(("da", "db", "dh0"), grads, want_grads):
                    assert _rel(g, w) <= tol, (case, name, _rel(g, w))


def test_time_chunked_block_scan_kernel_equals_the_reference_loop(nan_outputs):
    """kernels.block_scan with time chunks (what it picks on a GPU when B x blocks leave SMs idle): two
    kernel passes around the carries folded in torch; chunks of 1, not dividing T, of T; both directions."""
    kernels = newton_ops._require_kernels(torch.zeros(1, device=DEVICE))
    for dtype, tol in ((torch.float64, FP64_TOL), (torch.float32, FP32_TOL)):
        a, b, h0, _ = _scan_case(3, dtype, T=13)
        for reverse, start in ((False, h0), (True, None)):
            want = block_scan_reference(a.double(), b.double(), None if start is None else start.double(), reverse)
            for chunk in (1, 5, 13):
                got = kernels.block_scan(a, b, start, reverse, chunk_size=chunk)
                assert got.dtype == dtype and _rel(got, want) <= tol, (dtype, reverse, chunk, _rel(got, want))


def test_chunked_block_scan_at_every_chunk_size():
    """The chunked form's pieces: chunks of 1, of T, not dividing T (padding), one chunk per step."""
    a, b, h0, _ = _scan_case(4, torch.float64, T=13)
    want = block_scan_reference(a, b, h0)
    for chunk in (1, 2, 5, 12, 13, 40):
        got = newton_ops._block_scan_chunked(a, b, h0, chunk_size=chunk)
        assert _rel(got, want) <= FP64_TOL, chunk


def test_block_scan_rejects_bad_shapes():
    a = torch.zeros(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="b \\(B, T, D, n\\)"):
        block_scan(a, torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match="h0 must be"):
        block_scan(a, torch.zeros(1, 3, 2, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="2..16"):
        block_scan(torch.zeros(1, 3, 2, 17, 17), torch.zeros(1, 3, 2, 17))


def _cell(n, W=None, scale=3.0, dtype=torch.float64, seed=0):
    """A block cell with stronger coupling than at init (blocks' entries ~ scale x init); width 16
    (4 n when n does not divide 16), two heads where a head holds whole blocks."""
    torch.manual_seed(seed)
    W = W or (16 if 16 % n == 0 else 4 * n)
    cell = BlockGRUCell(W, 2 if (W // 2) % n == 0 else 1, n).to(dtype=dtype, device=DEVICE)
    with torch.no_grad():
        cell.recurrent.mul_(scale)
    return cell


def _inputs(cell, B=2, T=19, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    W = cell.state_size
    x = torch.randn(B, T, 3, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    h0 = torch.randn(B, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    reset = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    reset[0, 0] = reset[0, T // 2] = reset[1, T - 1] = True  # at the start, inside, on the last step
    gy = torch.randn(B, T, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    return x, h0, reset, gy


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_block_jacobian_equals_forward_mode_autograd(n):
    cell = _cell(n)
    x, h0, _, _ = _inputs(cell, T=3)
    h = torch.randn(2, 3, cell.state_size, dtype=torch.float64, device=DEVICE)
    f, j = cell.linearize(h, x)
    f2, j2 = cell.autograd_linearize(h, x)
    assert j.shape == (2, 3, cell.state_size // n, n, n)
    assert (f - f2).abs().max() <= 1e-14 and (j - j2).abs().max() <= 1e-13


def _solve_and_grads(cell, x, h0, reset, gy, **kw):
    xs, hs = x.detach().requires_grad_(), h0.detach().requires_grad_()
    stats = {}
    h = newton_solve(cell, xs, hs, reset=reset, stats=stats, **kw)
    grads = torch.autograd.grad(h, [xs, hs, cell.recurrent], gy)  # the step's parameters: recurrent only
    return h, grads, stats


def _reference(cell, x, h0, reset, gy):
    """The sequential solve in fp64, differentiated by autograd (on an fp64 copy of the cell)."""
    ref_cell = _cell(cell.block_size, cell.state_size)
    ref_cell.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
    h, grads, _ = _solve_and_grads(ref_cell, x.double(), h0.double(), reset, gy.double(), backend="reference")
    return h, grads


@pytest.mark.parametrize("backend", ["torch_newton", "triton_newton", "triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_newton_solve_equals_the_sequential_fp64_solve_forward_and_gradients(backend, dtype, tol):
    for n in (4, 16) if dtype == torch.float64 else (3,):
        cell = _cell(n, dtype=dtype)
        x, h0, reset, gy = _inputs(cell, dtype=dtype)
        want, want_grads = _reference(cell, x, h0, reset, gy)
        h, grads, stats = _solve_and_grads(cell, x, h0, reset, gy, backend=backend)
        assert h.dtype == dtype
        assert stats["converged"] and not stats["fallback"], stats
        if backend.endswith("newton"):
            assert 2 <= stats["iters"] <= 8, stats
        assert _rel(h, want) <= tol, (n, _rel(h, want))
        names = ["dx", "dh0", "d recurrent"]
        for name, g, w in zip(names, grads, want_grads):
            assert _rel(g, w) <= tol, (n, name, _rel(g, w))


def test_newton_stops_fallback_and_fixed_iterations():
    """strict with too few iterations falls back to the sequential solve (exact, gradients too);
    strict=False returns the iterate, which improves with every iteration."""
    cell = _cell(4)
    x, h0, reset, gy = _inputs(cell)
    want, want_grads = _reference(cell, x, h0, reset, gy)
    h, grads, stats = _solve_and_grads(cell, x, h0, reset, gy, backend="torch_newton", max_iters=1)
    assert stats["fallback"] and stats["converged"], stats
    assert _rel(h, want) <= FP64_TOL and _rel(grads[0], want_grads[0]) <= FP64_TOL
    errors = []
    for iters in (1, 2, 3):
        st = {}
        h = newton_solve(cell, x, h0, reset=reset, backend="torch_newton", max_iters=iters, tol=0.0, strict=False,
                         stats=st)
        assert not st["converged"] and not st["fallback"] and st["iters"] == iters, st
        errors.append((h - want).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert torch.equal(sequential_solve(cell, x, h0, reset), want.to(x.dtype)) or \
        _rel(sequential_solve(cell, x, h0, reset), want) <= FP64_TOL


def test_block_cell_rejects_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="2..16"):
        BlockGRUCell(32, 2, 17)
    with pytest.raises(ValueError, match="multiple of the block size"):
        BlockGRUCell(24, 2, 8)


def _lstm_cell(n, dtype=torch.float64):
    """A block-diagonal paraLSTM cell (Newton blocks of 2n) with stronger coupling than at init."""
    torch.manual_seed(2)
    W = 4 * n
    cell = BlockLSTMCell(W, 2, n).to(dtype=dtype, device=DEVICE)
    with torch.no_grad():
        cell.recurrent.mul_(3)
        cell.peephole.uniform_(-1, 1)
    return cell


@pytest.mark.parametrize("n", [2, 3, 8])
def test_block_lstm_jacobian_equals_forward_mode_autograd(n):
    cell = _lstm_cell(n)
    g = torch.Generator().manual_seed(n)
    state = torch.randn(2, 3, cell.state_size, generator=g, dtype=torch.float64).to(DEVICE)
    x = torch.randn(2, 3, 3, cell.state_size // 2, generator=g, dtype=torch.float64).to(DEVICE)
    f, j = cell.linearize(state, x)
    f2, j2 = cell.autograd_linearize(state, x)
    assert j.shape == (2, 3, cell.state_size // (2 * n), 2 * n, 2 * n)
    assert (f - f2).abs().max() <= 1e-14 and (j - j2).abs().max() <= 1e-13
    assert torch.equal(cell.output(state).unflatten(-1, (-1, n)), state.unflatten(-1, (-1, 2, n))[..., 1, :])


@pytest.mark.parametrize("backend,dtype,tol", [("torch_newton", torch.float64, FP64_TOL),
                                               ("triton_newton", torch.float64, FP64_TOL),
                                               ("torch_newton", torch.float32, FP32_TOL)])
def test_block_lstm_newton_equals_the_sequential_fp64_solve(backend, dtype, tol):
    cell = _lstm_cell(4, dtype)
    ref_cell = _lstm_cell(4)
    ref_cell.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
    g = torch.Generator().manual_seed(5)
    B, T, W = 2, 17, cell.state_size // 2
    x = torch.randn(B, T, 3, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    h0 = torch.randn(B, 2 * W, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    gy = torch.randn(B, T, 2 * W, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    reset = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    reset[0, 6] = reset[1, 0] = True
    out = []
    for c, be, dt in ((ref_cell, "reference", torch.float64), (cell, backend, dtype)):
        xs, hs = x.to(dt).requires_grad_(), h0.to(dt).requires_grad_()
        stats = {}
        h = newton_solve(c, xs, hs, reset=reset, backend=be, stats=stats)
        out.append((h, torch.autograd.grad(h, [xs, hs, c.recurrent, c.peephole], gy.to(dt)), stats))
    (want, want_grads, _), (h, grads, stats) = out
    assert stats["converged"] and not stats["fallback"] and stats["iters"] >= 2, stats
    assert _rel(h, want) <= tol, _rel(h, want)
    for name, gr, w in zip(("dx", "dh0", "d recurrent", "d peephole"), grads, want_grads):
        assert _rel(gr, w) <= tol, (name, _rel(gr, w))
