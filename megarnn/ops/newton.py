"""Newton parallel solve of a nonlinear recurrence h_t = f(h_{t-1}, x_t) (ParaRNN).

Danieli et al. 2025, "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large
Language Models" (arXiv:2510.21450), building on DEER (Lim et al. 2024). All T states
are the unknowns of one system of equations, r_t(h) = h_t - f(h_{t-1}, x_t) = 0, solved
by Newton's method. Linearising f around the current iterate gives the update

    delta_t = J_t delta_{t-1} - r_t,    J_t = df/dh (h_{t-1}, x_t),    h <- h + delta

which is itself a linear recurrence: a diagonal linear scan when J_t is diagonal
(ParaGRU), a scan over 2x2 blocks per channel (ParaLSTM, state (c, h)), or a block-diagonal
scan with dense n x n blocks, n in 2..16 (jacobian_structure "block": the block-diagonal ParaGRU
/ ParaLSTM cells, whose recurrent matrices are dense blocks per head; `block_scan`), where a
step of the scan is a small mat-vec and the carry across chunks or ranks is the n-vector per
block and the chunk's product of the J_t (fp32 / fp64). With an exact
Jacobian Newton is exact after at most T iterations (the error at step t vanishes after
iteration t) and in practice converges quadratically in a handful (paper App. A: 3).

Initial guess (paper eq. A.1): h_t = f(0, x_t), except h_0 = f(h0, x_0), which is then
already exact.

Backward (paper eq. 2.6) does not unroll the iterations: at the solution h* the adjoint
lambda = dL/d(h*) through the recurrence solves the reverse linear recurrence

    lambda_t = g_t + J_{t+1}^T lambda_{t+1}         (g = dL/dh, the incoming gradient)

and the gradients to x, to the cell parameters and to h0 are one vector-Jacobian
product of f(h*_{t-1}, x_t) with lambda_t, for all t at once.

Document resets: where reset[:, t] is True, h_{t-1} is replaced by 0, so J_t = 0 and
neither the solve nor the adjoint crosses the boundary.

Backends (one vocabulary with the other ops): "reference" (the textbook loop, differentiated by
autograd; "sequential" is accepted as its old name),
"torch" (the default off CUDA: a forward solver picked by torch_solver from the shape, with the
adjoint backward; "torch_newton" / "torch_sequential" force Newton / the sequential loop under
no_grad, both with the same adjoint backward) and "triton"
(kernels/newton.py, for the cells it implements: ParaGRU and ParaLSTM, see triton_kind; the
default on CUDA for them; for "block" cells, which have no fused cell kernel, "triton" is the torch
solve with every linear scan the fused Triton block-scan kernel, also the default on CUDA). "triton" runs one of two solvers, both with the fused adjoint
kernel as backward: the fused sequential kernel (all T steps in one kernel, the state in
registers) or Newton with each iteration one fused kernel (residual, Jacobian and the scan of
the update). `triton_solver` picks one from the shape (its docstring has the rule);
"triton_sequential" and "triton_newton" force one. On CPU the kernels run only under Triton's
interpreter (TRITON_INTERPRET=1), for tests.

Convergence policy (newton_solve's `strict`): with strict=True (default) the result is
always the solution to tol: when Newton does not reach tol in max_iters iterations, or
diverges (a non-finite residual, or one that grows DIVERGENCE_FACTOR times above the
best so far), the sequential solve is run instead, logged on the "megarnn.newton" logger
and reported as stats["fallback"] = True. With strict=False (the paper's fixed-iteration
mode, e.g. max_iters=3, tol=0) the last iterate is returned and stats["converged"] says
whether it met tol; only divergence falls back.

What "converged" promises: when the residual max-norm of an iterate h_k is <= tol, the update
computed from that same linearisation (one more linear scan, no new Jacobian) is applied and
h_{k+1} is returned; Newton's quadratic convergence puts it within ~tol^2 of the exact solution,
not only within tol / (1 - |J|) (float32: within 1e-6 of the exact solution with default_tol,
float64: within 1e-10; tests/ops/test_newton.py sweeps random ParaGRU cells). stats["iters"]
counts that final update, so a converged solve reports k + 1.

Host syncs: the residuals stay on the device as 0-d tensors; the host reads them (one sync,
one all-reduce under context parallelism) every SYNC_EVERY iterations and replays the policy
above on the values in order, so a convergence or divergence found there stops there and the
result is exactly the iterate the one-sync-per-iteration loop would return. The price is at most
SYNC_EVERY - 1 iterations computed and dropped after the one that converged.

Compilation: the whole solve (every backend but "reference" and context parallelism) is one
custom op (megarnn::newton_torch / megarnn::newton_triton) with its adjoint registered as the
backward (megarnn::newton_adjoint / megarnn::newton_triton_adjoint), so torch.compile sees one
opaque node and no data-dependent loop. The cell reaches the op by a key (id(cell), registered
when the call is traced or run); its parameters are the op's inputs, so their gradients flow.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
import weakref

import torch
from torch import nn

from megarnn.ops import context
from megarnn.ops.scan import assume_constant_result, linear_scan, load_kernels, resolve_split

BACKENDS = ("reference", "torch", "torch_newton", "torch_sequential", "triton", "triton_sequential", "triton_newton")
_ALIASES = {"sequential": "reference"}
STRUCTURES = ("diagonal", "block2", "block")
BLOCK_SIZES = range(2, 17)  # the block sizes of "block" cells (block_scan and its kernels)
DEFAULT_MAX_ITERS = 10
# A residual this many times above the best seen so far means Newton is diverging.
DIVERGENCE_FACTOR = 1e3
# Newton iterations between two reads of the residuals by the host (module docstring, "Host syncs").
SYNC_EVERY = 4

logger = logging.getLogger("megarnn.newton")


def default_tol(dtype: torch.dtype) -> float:
    """Residual max-norm accepted as converged, per compute dtype (states are O(1)): 1e-6 in
    float32, 1e-12 in float64, 1e-2 otherwise. model.newton_tol = 0 means this. A converged solve
    is closer than tol to the exact solution (module docstring: the last update is applied)."""
    return {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)


class NewtonCell(nn.Module):
    """A recurrent cell h_new = f(h, x) that newton_solve can run in parallel over time.

    A subclass sets `state_size` (S) and `jacobian_structure`, and writes `step`:
      - "diagonal": dh_new/dh is diagonal; jacobian (..., S).
      - "block2": the state is two halves [s0 | s1] (S = 2 * D) and dh_new/dh couples
        only (s0[d], s1[d]) per channel d; jacobian (..., D, 2, 2), J[..., d, i, j] =
        d s_new_i[d] / d s_j[d] (row = output, column = input).
      - "block": the state is S / n consecutive blocks of n = `block_size` (2..16) channels and
        dh_new/dh is block-diagonal; jacobian (..., S / n, n, n), J[..., k, i, j] =
        d h_new[k n + i] / d h[k n + j].
    step must be elementwise over leading dims, so the same code runs one step
    (h (B, S), x (B, ...)) and all steps at once (h (B, T, S), x (B, T, ...)).
    `linearize` may be overridden with an analytic Jacobian; by default it uses forward-
    mode autograd (jvp with ones; two jvps with the (1, 0) / (0, 1) pattern for block2; n jvps,
    one per position in a block, for block).
    """

    jacobian_structure: str = "diagonal"
    state_size: int

    def step(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One recurrence step. h: (..., S); x: (..., *input) -> (..., S)."""
        raise NotImplementedError

    def linearize(self, h_prev: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(h_prev, x) and its Jacobian w.r.t. h_prev (layout in the class docstring)."""
        return self.autograd_linearize(h_prev, x)

    def jacobian(self, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linearize(h_prev, x)[1]

    def autograd_linearize(self, h_prev: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The default linearize: the structured Jacobian from jvps of step()."""
        f = lambda h: self.step(h, x)  # noqa: E731
        _warm_up_forward_ad()
        if self.jacobian_structure == "diagonal":
            # Exact because dh_new/dh is diagonal: J @ ones is the diagonal.
            return torch.func.jvp(f, (h_prev,), (torch.ones_like(h_prev),))
        if self.jacobian_structure == "block":
            n = self.block_size
            cols, out = [], None
            for k in range(n):  # column k of every block at once: the tangent e_k in each block
                e = torch.zeros(n, dtype=h_prev.dtype, device=h_prev.device)
                e[k] = 1
                out, col = torch.func.jvp(f, (h_prev,), (e.repeat(h_prev.shape[-1] // n).expand_as(h_prev),))
                cols.append(col.unflatten(-1, (-1, n)))
            return out, torch.stack(cols, dim=-1)
        ones, zeros = torch.ones_like(h_prev[..., ::2]), torch.zeros_like(h_prev[..., ::2])
        out, col0 = torch.func.jvp(f, (h_prev,), (torch.cat([ones, zeros], -1),))
        _, col1 = torch.func.jvp(f, (h_prev,), (torch.cat([zeros, ones], -1),))
        return out, torch.stack([_pairs(col0), _pairs(col1)], dim=-1)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """What the layer reads out of the state (the whole state unless overridden)."""
        return h

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, reset: torch.Tensor | None = None,
                **solve_kwargs) -> torch.Tensor:
        """All states (B, T, S) for inputs x (B, T, ...); see newton_solve."""
        return newton_solve(self, x, h0, reset=reset, **solve_kwargs)


@functools.cache
def _warm_up_forward_ad() -> None:
    """Run one tiny jvp with DeprecationWarning silenced: on first use torch (2.13) builds its
    jvp decompositions with the deprecated torch.jit.script, which warns once per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.func.jvp(torch.sin, (torch.zeros(()),), (torch.ones(()),))


def _pairs(s: torch.Tensor) -> torch.Tensor:
    """(..., 2D) halves [s0 | s1] -> (..., D, 2) pairs (s0[d], s1[d])."""
    return s.unflatten(-1, (2, -1)).transpose(-1, -2)


def _unpairs(p: torch.Tensor) -> torch.Tensor:
    """(..., D, 2) -> (..., 2D), the inverse of _pairs."""
    return p.transpose(-1, -2).flatten(-2)


def block2_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """h_t = a_t @ h_{t-1} + b_t with one 2x2 matrix per channel (reference loop over T).

    a: (B, T, D, 2, 2); b: (B, T, D, 2); h0: (B, D, 2) or None (zeros). reverse=True runs
    from t = T-1 down to 0 (h_t = a_t @ h_{t+1} + b_t). Returns (B, T, D, 2) in b's dtype,
    accumulated in float32 (float64 when b is float64). Differentiable by autograd.
    """
    if a.dim() != 5 or a.shape[-2:] != (2, 2) or b.shape != a.shape[:-1]:
        raise ValueError(f"block2_scan: a must be (B, T, D, 2, 2) and b (B, T, D, 2); "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    B, T, D, _ = b.shape
    if h0 is not None and h0.shape != (B, D, 2):
        raise ValueError(f"block2_scan: h0 must be (B, D, 2) = {(B, D, 2)}; got {tuple(h0.shape)}")
    if reverse:
        return block2_scan(a.flip(1), b.flip(1), h0).flip(1)
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    a, bb = a.to(acc), b.to(acc)
    h = bb.new_zeros(B, D, 2) if h0 is None else h0.to(acc)
    out = []
    for t in range(T):
        h = (a[:, t] * h.unsqueeze(-2)).sum(-1) + bb[:, t]  # row i: sum_j a_ij h_j
        out.append(h)
    return torch.stack(out, dim=1).to(b.dtype)


def block_scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                         reverse: bool = False) -> torch.Tensor:
    """h_t = a_t @ h_{t-1} + b_t with one n x n matrix per block: the textbook loop over T,
    differentiated by autograd (the judge of block_scan's other backends).

    a: (B, T, D, n, n) (row = output); b: (B, T, D, n); h0: (B, D, n) or None (zeros).
    reverse=True runs from t = T-1 down to 0 (h_t = a_t @ h_{t+1} + b_t). Returns (B, T, D, n) in
    b's dtype, accumulated in float32 (float64 when b is float64)."""
    B, T, D, n = _check_block_scan("block_scan", a, b, h0)
    if reverse:
        return block_scan_reference(a.flip(1), b.flip(1), h0).flip(1)
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    a, bb = a.to(acc), b.to(acc)
    h = bb.new_zeros(B, D, n) if h0 is None else h0.to(acc)
    out = []
    for t in range(T):
        h = (a[:, t] * h.unsqueeze(-2)).sum(-1) + bb[:, t]  # row i: sum_j a_ij h_j
        out.append(h)
    return torch.stack(out, dim=1).to(b.dtype)


def _check_block_scan(name, a, b, h0) -> tuple[int, int, int, int]:
    if a.dim() != 5 or a.shape[-1] != a.shape[-2] or b.shape != a.shape[:-1]:
        raise ValueError(f"{name}: a must be (B, T, D, n, n) and b (B, T, D, n); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    B, T, D, n = b.shape
    if h0 is not None and h0.shape != (B, D, n):
        raise ValueError(f"{name}: h0 must be (B, D, n) = {(B, D, n)}; got {tuple(h0.shape)}")
    return B, T, D, n


def _block_product(j: torch.Tensor) -> torch.Tensor:
    """j_{L-1} ... j_1 j_0 over dim 1 of j (B, L, ..., n, n): products by pairs, log2(L) batched matmuls."""
    while j.shape[1] > 1:
        if j.shape[1] % 2:  # an identity after the last step changes nothing
            eye = torch.eye(j.shape[-1], dtype=j.dtype, device=j.device).expand(j.shape[0], 1, *j.shape[2:])
            j = torch.cat([j, eye], dim=1)
        j = j[:, 1::2] @ j[:, 0::2]
    return j[:, 0]


def _matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (m @ v.unsqueeze(-1)).squeeze(-1)


def _block_scan_chunked(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False,
                        chunk_size: int | None = None) -> torch.Tensor:
    """block_scan_reference's result by chunks (no autograd needed; the torch backend): time is cut
    into C chunks of L ~ sqrt(T) steps; (1) every chunk is scanned from zero, all chunks at once
    (L batched mat-vecs); (2) each chunk's product a_{L-1} ... a_0 (pairwise, log2 L batched
    matmuls) carries the state across chunks (C small steps); (3) the state entering each chunk is
    scanned through it with b = 0 and added (L batched mat-vecs). 2 L + C + log2 L python steps
    instead of T; 2 T mat-vecs and ~T small matmuls of work."""
    B, T, D, n = _check_block_scan("block_scan", a, b, h0)
    if reverse:
        return _block_scan_chunked(a.flip(1), b.flip(1), h0, chunk_size=chunk_size).flip(1)
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    L = min(T, chunk_size or max(1, math.isqrt(T - 1) + 1))
    C = -(-T // L)
    a, bb = a.to(acc), b.to(acc)
    if C * L != T:  # steps after the end change no output
        a = torch.cat([a, a.new_zeros(B, C * L - T, D, n, n)], dim=1)
        bb = torch.cat([bb, bb.new_zeros(B, C * L - T, D, n)], dim=1)
    a, bb = a.view(B, C, L, D, n, n), bb.view(B, C, L, D, n)
    y, ys = bb.new_zeros(B, C, D, n), []
    for i in range(L):
        y = _matvec(a[:, :, i], y) + bb[:, :, i]
        ys.append(y)
    prods = _block_product(a.transpose(1, 2))  # (B, C, D, n, n)
    carry = bb.new_zeros(B, D, n) if h0 is None else h0.to(acc)
    carries = []
    for c in range(C):
        carries.append(carry)
        carry = _matvec(prods[:, c], carry) + ys[-1][:, c]
    z = torch.stack(carries, dim=1)
    out = []
    for i in range(L):
        z = _matvec(a[:, :, i], z)
        out.append(ys[i] + z)
    return torch.stack(out, dim=2).reshape(B, C * L, D, n)[:, :T].to(b.dtype)


def _block_scan_local(backend: str | None):
    """The block scan without autograd for a backend: the fused kernel for "triton", else chunked."""
    if backend == "triton":
        return lambda a, b, h0=None, reverse=False: _require_kernels(b).block_scan(a, b, h0, reverse)
    return _block_scan_chunked


def _shift_for_adjoint(a: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The adjoint's matrices: a^T of the step after t in scan order (zero after the last step)."""
    at = a.transpose(-1, -2)
    z = torch.zeros_like(at[:, :1])
    return torch.cat([z, at[:, :-1]], dim=1) if reverse else torch.cat([at[:, 1:], z], dim=1)


class _BlockScan(torch.autograd.Function):
    """block_scan's torch backend: the chunked form, with the transposed scan run the other way as
    its backward (the triton backend's fused backward is a custom op, below)."""

    @staticmethod
    def forward(ctx, a, b, h0, reverse):
        h = _block_scan_chunked(a, b, h0, reverse)
        ctx.save_for_backward(a, h, h0)
        ctx.reverse = reverse
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, h, h0 = ctx.saved_tensors
        reverse = ctx.reverse
        lam = _block_scan_chunked(_shift_for_adjoint(a, reverse), g, None, not reverse)
        start = torch.zeros_like(h[:, :1]) if h0 is None else h0.unsqueeze(1).to(h.dtype)
        prev = torch.cat([h[:, 1:], start], 1) if reverse else torch.cat([start, h[:, :-1]], 1)
        db, da = lam, lam.unsqueeze(-1) * prev.unsqueeze(-2)
        first = 0 if not reverse else -1
        dh0 = None if h0 is None else _matvec(a[:, first].transpose(-1, -2), lam[:, first])
        return (da.to(a.dtype), db, None if dh0 is None else dh0.to(h0.dtype), None)


def block_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """h_t = a_t @ h_{t-1} + b_t with one n x n matrix per block (n in 2..16): the linear solve of
    a block-diagonal Newton cell's updates (and, transposed and reversed, of its adjoint).

    a: (B, T, D, n, n) (row = output, column = input); b: (B, T, D, n); h0: (B, D, n) or None.
    reverse=True: h_t = a_t @ h_{t+1} + b_t from t = T-1 down. Returns (B, T, D, n) in b's dtype,
    accumulated in float32 (float64 for float64 b). A reset (no carry across t) is a_t = 0.
    backend: "reference" (block_scan_reference, the loop, autograd), "torch" (the chunked form,
    _block_scan_chunked), "triton" (kernels/newton.py's _block_scan_kernel; on CPU only under
    TRITON_INTERPRET=1), None: "triton" on CUDA, else "torch". The torch and triton backends'
    backward is the transposed scan run the other way (lambda_t = g_t + a_next^T lambda_next,
    da_t = lambda_t h_prev^T, db = lambda, dh0 = a_first^T lambda_first): a fused kernel for
    triton. Not split across context-parallel ranks (newton_solve passes the carry itself)."""
    B, T, D, n = _check_block_scan("block_scan", a, b, h0)
    if n not in BLOCK_SIZES:
        raise ValueError(f"block_scan: block size n = {n} must be in 2..16")
    backend = backend or ("triton" if b.is_cuda else "torch")
    if backend == "reference":
        return block_scan_reference(a, b, h0, reverse)
    if backend not in ("torch", "triton"):
        raise ValueError(f"block_scan: unknown backend {backend!r}; expected 'reference', 'torch' or 'triton'")
    if backend == "triton":
        return _block_scan_triton_op(a, b, h0, reverse)
    return _BlockScan.apply(a, b, h0, reverse)


# The triton backend as custom ops with the fused backward registered: torch.compile sees one node
# each way (the LRU's scan runs here), where an autograd.Function would be traced into the launch.

@torch.library.custom_op("megarnn::block_scan_triton", mutates_args=())
def _block_scan_triton_op(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool
                          ) -> torch.Tensor:
    return _require_kernels(b).block_scan(a, b, h0, reverse)


@_block_scan_triton_op.register_fake
def _(a, b, h0, reverse):
    return torch.empty_like(b)


@torch.library.custom_op("megarnn::block_scan_triton_bwd", mutates_args=())
def _block_scan_triton_bwd_op(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, g: torch.Tensor,
                              reverse: bool) -> list[torch.Tensor]:
    da, db, dh0 = _require_kernels(g).block_scan_bwd(a, h, h0, g.contiguous(), reverse)
    return [da.to(a.dtype), db, a.new_empty(0) if dh0 is None else dh0.to(h0.dtype)]


@_block_scan_triton_bwd_op.register_fake
def _(a, h, h0, g, reverse):
    return [torch.empty_like(a), torch.empty_like(g), a.new_empty(0) if h0 is None else torch.empty_like(h0)]


def _block_scan_triton_setup(ctx, inputs, output):
    a, _, h0, reverse = inputs
    ctx.save_for_backward(a, output, h0)
    ctx.reverse, ctx.has_h0 = reverse, h0 is not None


def _block_scan_triton_backward(ctx, g):
    a, h, h0 = ctx.saved_tensors
    da, db, dh0 = _block_scan_triton_bwd_op(a, h, h0, g, ctx.reverse)
    return da, db, dh0 if ctx.has_h0 else None, None


_block_scan_triton_op.register_autograd(_block_scan_triton_backward, setup_context=_block_scan_triton_setup)


def _block_scan_across(local_scan, j, b, cp, reverse: bool = False) -> torch.Tensor:
    """y_t = j_t y_{t-1} + b_t (n x n blocks) over the whole split sequence from a zero state
    (reverse: from the end), without autograd: megarnn.ops.context.scan_across for blocks of any
    n. Each rank scans its chunk from zero, all-gathers (its chunk's product of j, fp32 / fp64;
    its last value), folds the ranks before it into the carry and scans the carry through its
    chunk (b = 0). Elements gathered per rank: B D (n^2 + n)."""
    rank, size = cp.rank, cp.size
    pos = size - 1 - rank if reverse else rank  # this chunk's place in scan order
    if reverse:
        j, b = j.flip(1), b.flip(1)
    y = local_scan(j, b, None)
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    prod = _block_product(j.to(acc))
    end = y[:, -1].to(acc)
    gathered = context.all_gather(torch.cat([prod.flatten(1), end.flatten(1)], dim=1), cp)
    if reverse:
        gathered = gathered.flip(0)
    prods = gathered[..., :prod[0].numel()].reshape(size, *prod.shape)
    ends = gathered[..., prod[0].numel():].reshape(size, *end.shape)
    carry = torch.zeros_like(end)
    for k in range(pos):  # the states of the chunks before this one, folded in order
        carry = _matvec(prods[k], carry) + ends[k]
    if pos > 0:
        y = y + local_scan(j, torch.zeros_like(b), carry.to(b.dtype))
    return y.flip(1) if reverse else y


def _solve_linear(j: torch.Tensor, b: torch.Tensor, structure: str, reverse: bool = False, cp=None,
                  backend: str | None = None) -> torch.Tensor:
    """y_t = j_t y_{t-1} + b_t from a zero state (or from the end when reverse). b: (B, T, S);
    j per structure. cp: the sequence split across ranks (the carry passed between them);
    backend: linear_scan's, for the diagonal scans; "triton" runs the 2x2-block scans as the
    fused block-scan kernel too."""
    if structure == "block":  # b (B, T, S) as blocks (B, T, S / n, n)
        local = _block_scan_local(backend)
        bb = b.unflatten(-1, (-1, j.shape[-1]))
        if cp is None:
            return local(j, bb, None, reverse).flatten(-2)
        return _block_scan_across(local, j, bb, cp, reverse).flatten(-2)
    if structure == "diagonal":
        local = lambda j, b, h0: linear_scan(j, b, h0, backend=backend, cp=False)  # noqa: E731
    elif backend == "triton":
        kernels = _require_kernels(b)
        local = lambda j, b, h0, reverse=False: kernels.block_scan(j, b, h0, reverse)  # noqa: E731
    else:
        local = lambda j, b, h0, reverse=False: block2_scan(j, b, h0, reverse)  # noqa: E731
    if cp is None:
        if structure == "diagonal":
            return linear_scan(j, b, reverse=reverse, backend=backend, cp=False)
        return _unpairs(local(j, _pairs(b), None, reverse))
    if structure == "diagonal":
        return context.scan_across(local, j, b, structure, cp, reverse)
    return _unpairs(context.scan_across(local, j, _pairs(b), structure, cp, reverse))


def _transpose(j: torch.Tensor, structure: str) -> torch.Tensor:
    return j if structure == "diagonal" else j.transpose(-1, -2)


def _prev_states(h: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """h_{t-1} for every t: (B, T, S) from h (B, T, S) and h0 (B, S); zero where reset."""
    prev = torch.cat([h0.unsqueeze(1).to(h.dtype), h[:, :-1]], dim=1)
    return prev if reset is None else prev.masked_fill(reset.unsqueeze(-1), 0.0)


def _mask_jacobian(j: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """J_t = 0 where reset[:, t]: h_{t-1} is replaced by a constant there."""
    if reset is None:
        return j
    return j.masked_fill(reset.reshape(*reset.shape, *([1] * (j.dim() - 2))), 0.0)


def sequential_solve(cell: NewtonCell, x: torch.Tensor, h0: torch.Tensor | None = None,
                     reset: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: h_t = f(h_{t-1}, x_t) one step at a time. Shapes as newton_solve."""
    h = _zeros_state(cell, x) if h0 is None else h0
    out = []
    for t in range(x.shape[1]):
        if reset is not None:
            h = h.masked_fill(reset[:, t, None], 0.0)
        h = cell.step(h, x[:, t])
        out.append(h)
    return torch.stack(out, dim=1)


def _zeros_state(cell: NewtonCell, x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], cell.state_size, dtype=x.dtype, device=x.device)


def _newton(cell, x, h0, reset, max_iters, tol, strict, cp=None, scan_backend=None
            ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Newton iterations (no autograd), on one rank or across the ranks of cp. Returns h (B, T, S),
    the state entering this chunk (h0, or under cp the previous rank's last state) and the stats.

    Under cp each iteration exchanges the chunk's last state with the next rank, the residual
    is the max over the whole sequence (so every rank takes the same branch), and the linear
    solve of the update is the distributed scan (megarnn/ops/context.py)."""
    structure = cell.jacobian_structure
    first = cp is None or cp.rank == 0
    # Initial guess f(0, x_t) (paper eq. A.1), except f(h0, x_0) at the sequence start, which is exact.
    start = h0 if first else torch.zeros_like(h0)
    h = cell.step(_prev_states(x.new_zeros(*x.shape[:2], cell.state_size), start, reset), x)

    def boundary(h):
        return h0 if cp is None else context.shift(h[:, -1], cp, edge=h0)

    def iterate(h):
        f, j = cell.linearize(_prev_states(h, boundary(h), reset), x)
        r = h - f
        return r.abs().amax(), lambda: h + _solve_linear(_mask_jacobian(j, reset), -r, structure, cp=cp,
                                                         backend=scan_backend)

    def solve_exactly():
        if cp is None:
            return sequential_solve(cell, x, h0, reset), h0
        return context.send_recv_chain(lambda s: sequential_solve(cell, x, s, reset), h0, cp)

    h, stats, exact = _newton_loop(h, iterate, max_iters, tol, strict, solve_exactly, cell, x, cp)
    if exact is not None:
        return exact[0], exact[1], stats
    return h, boundary(h), stats


def _residuals_to_host(residuals: list, cp=None) -> list[float]:
    """The host's view of a window of residual max-norms (0-d tensors): ONE sync (and under cp one
    all-reduce of the whole window, a non-finite value anywhere read as inf everywhere)."""
    v = torch.stack([torch.as_tensor(r) for r in residuals]).detach().to(torch.float64)
    if v.is_meta:  # shapes only (megarnn plan): no values to test, treat as converged
        return [0.0] * len(residuals)
    if cp is not None:
        import torch.distributed as dist
        v = torch.where(torch.isfinite(v), v, torch.full_like(v, math.inf))
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=cp.group)
    return v.tolist()


def _newton_loop(h, iterate, max_iters, tol, strict, solve_exactly, cell, x, cp=None):
    """The convergence policy (module docstring), shared by the backends. h: the initial guess
    (B, T, S); iterate(h) -> (the residual max-norm of h as a 0-d tensor, a function returning the
    next iterate h + delta); solve_exactly() -> the sequential solution (the fallback). Runs up to
    SYNC_EVERY iterations before the host looks at their residuals (module docstring, "Host
    syncs"). Returns h, the stats and the fallback's result (None unless it ran)."""
    eps = torch.finfo(h.dtype).eps
    best, k = math.inf, 0  # k: the index of the first iterate of the window
    while True:
        window = []  # (the iterate, its residual, its update) for iterates k, k + 1, ...
        while True:
            residual, update = iterate(h)
            window.append((h, residual, update))
            if len(window) == SYNC_EVERY or k + len(window) - 1 >= max_iters:
                break
            h = update()
        values = _residuals_to_host([r for _, r, _ in window], cp)
        reason = ""
        for i, ((h_i, _, update), residual) in enumerate(zip(window, values)):
            it = k + i
            if residual <= tol:  # converged: apply the update this linearisation gives (none when r = 0)
                if residual == 0:
                    return h_i, _stats(it, residual, converged=True), None
                h_next = window[i + 1][0] if i + 1 < len(window) else update()
                return h_next, _stats(it + 1, residual, converged=True), None
            reason = _divergence(residual, best, eps)
            if not reason and it >= max_iters:
                if not strict:
                    return h_i, _stats(it, residual, converged=False), None
                reason = f"not converged to tol={tol:.3g} in max_iters={max_iters}"
            if reason:
                iters = it
                break
            best = min(best, residual)
        if reason:
            break
        h = window[-1][2]()
        k += len(window)
    if cp is None or cp.rank == 0:
        logger.warning("newton_solve: %s (cell %s, x %s, iters=%d, residual=%.3g); fell back to the "
                       "sequential solve%s", reason, type(cell).__name__, tuple(x.shape), iters, residual,
                       "" if cp is None else ", rank by rank")
    exact = solve_exactly()
    h = exact[0] if isinstance(exact, tuple) else exact
    return h, {**_stats(iters, residual, converged=True), "fallback": True}, exact


def _divergence(residual: float, best: float, eps: float) -> str:
    """Why Newton is diverging ("" if it is not). eps floors `best`: noise near 0 is no growth."""
    if residual != residual or residual == float("inf"):
        return "non-finite residual"
    if residual > DIVERGENCE_FACTOR * max(best, eps):
        return f"residual grew from {best:.3g} to {residual:.3g}"
    return ""


def _stats(iters: int, residual: float, converged: bool) -> dict:
    return {"iters": iters, "residual": residual, "fallback": False, "converged": converged}


def _forward_solve(cell, x, h0, reset, solver, max_iters, tol, strict, cp=None, scan_backend=None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The torch backends' forward without autograd: (h, the state entering the chunk, stats)."""
    with torch.no_grad():
        if solver == "sequential":
            return sequential_solve(cell, x, h0, reset), h0, _stats(0, 0.0, converged=True)
        return _newton(cell, x, h0, reset, max_iters, tol, strict, cp, scan_backend)


def _adjoint_grads(cell, x, boundary, h, reset, g, cp=None, scan_backend=None, need_x=True, need_h0=True,
                   needs=None) -> tuple:
    """The adjoint backward at the solution h (paper eq. 2.6): (dx, dh0, [d param for each
    _grad_params(cell) whose entry in needs is True, None for the others])."""
    params = list(_grad_params(cell))
    needs = [True] * len(params) if needs is None else list(needs)
    prev = _prev_states(h, boundary, reset)
    lam = _adjoint(cell, prev, x, g.to(h.dtype), reset, cp, scan_backend)
    # Only the first rank's h_{-1} is an input (h0); elsewhere it is the previous rank's output,
    # whose gradient the adjoint scan has already carried across the boundary.
    grad_prev = need_h0 and (cp is None or cp.rank == 0)
    wanted = [p for p, need in zip(params, needs) if need]
    with torch.enable_grad():
        prev = prev.detach().requires_grad_(grad_prev)
        xg = x.detach().requires_grad_(need_x)
        inputs = [t for t, need in ((prev, grad_prev), (xg, need_x)) if need] + wanted
        grads = list(torch.autograd.grad(cell.step(prev, xg), inputs, lam, allow_unused=True)) if inputs else []
    dh0 = None
    if grad_prev:
        dh0 = grads.pop(0)[:, 0].to(boundary.dtype)
        if reset is not None:
            dh0 = dh0.masked_fill(reset[:, 0, None], 0.0)  # no gradient across a reset
    elif need_h0:
        dh0 = torch.zeros_like(boundary)
    dx = grads.pop(0) if need_x else None
    dparams = iter(grads)
    return dx, dh0, [next(dparams) if need else None for need in needs]


class _NewtonSolve(torch.autograd.Function):
    """Newton forward; adjoint backward at the solution (no unrolling of iterations), across the
    ranks of cp (one process runs the custom op megarnn::newton_torch instead)."""

    @staticmethod
    def forward(ctx, cell, x, h0, reset, opts, stats, cp, *params):
        max_iters, tol, strict, scan_backend = opts
        h, boundary, info = _forward_solve(cell, x, h0, reset, "newton", max_iters, tol, strict, cp, scan_backend)
        stats.update(info)
        ctx.cell, ctx.cp, ctx.scan_backend = cell, cp, scan_backend
        ctx.save_for_backward(x, boundary, h, reset)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, boundary, h, reset = ctx.saved_tensors
        dx, dh0, dparams = _adjoint_grads(ctx.cell, x, boundary, h, reset, g, ctx.cp, ctx.scan_backend,
                                          ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[7:])
        return (None, dx, dh0, None, None, None, None, *dparams)


# ---------------------------------------------------------------------------------------------
# The custom ops: the whole solve as one opaque node for torch.compile
# ---------------------------------------------------------------------------------------------

# id(cell) -> cell, for the custom ops (they take tensors and scalars). Weak: a model's cells (and
# their input projections) are freed with the model.
_CELLS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_LAST_STATS: dict[int, dict] = {}  # id(cell) -> the python stats of its last eager solve


# The dispatch keys excluded outside any op. A custom op's implementation runs below autograd;
# the adjoint needs autograd for the cell's vector-Jacobian product, so it restores this set.
_TOP_LEVEL_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()


def _autograd_inside_op():
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), _TOP_LEVEL_EXCLUDE)


@assume_constant_result
def _cell_key(cell: nn.Module) -> int:
    """The key the custom ops find `cell` by. Run (not traced) when torch.compile traces a call, so
    the compiled graph holds the key as a constant and the cell stays registered while it lives
    in the graph; an eager call registers again (cheap)."""
    _CELLS[id(cell)] = cell
    return id(cell)


def _stats_tensor(info: dict) -> torch.Tensor:
    return torch.tensor([info["iters"], info["residual"], float(info["fallback"]), float(info["converged"])],
                        dtype=torch.float64)


def _stats_from(key: int, st: torch.Tensor, x: torch.Tensor) -> dict:
    """The stats of the solve that returned st: python values when it ran eagerly (no sync), 0-d
    tensors (read when logged) in a compiled graph; on meta tensors (shapes only) no iterations."""
    if x.is_meta:
        return _stats(0, 0.0, converged=True)
    info = None if torch.compiler.is_compiling() else _LAST_STATS.pop(key, None)
    if info is not None:
        return info
    st = st.detach()
    return {"iters": st[0], "residual": st[1], "fallback": st[2], "converged": st[3]}


@torch.library.custom_op("megarnn::newton_torch", mutates_args=())
def _newton_torch_op(x: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor | None, params: list[torch.Tensor],
                     key: int, solver: str, max_iters: int, tol: float, strict: bool,
                     scan_backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backends in one process: (h (B, T, S), stats (4,) float64 on the CPU). scan_backend:
    the linear scans' ("triton": block cells under backend="triton"; "": the default). Required (a
    defaulted argument equal to its default is dropped by the dispatcher, which would change the
    number of gradients the backward must return)."""
    h, _, info = _forward_solve(_CELLS[key], x, h0, reset, solver, max_iters, tol, strict,
                                scan_backend=scan_backend or None)
    _LAST_STATS[key] = info
    return h, _stats_tensor(info)


@_newton_torch_op.register_fake
def _(x, h0, reset, params, key, solver, max_iters, tol, strict, scan_backend):
    return x.new_empty(*x.shape[:2], h0.shape[-1]), torch.empty(4, dtype=torch.float64)


@torch.library.custom_op("megarnn::newton_adjoint", mutates_args=())
def _newton_adjoint_op(x: torch.Tensor, h0: torch.Tensor, h: torch.Tensor, reset: torch.Tensor | None,
                       g: torch.Tensor, params: list[torch.Tensor], key: int, scan_backend: str
                       ) -> list[torch.Tensor]:
    """[dx, dh0, d params...] of megarnn::newton_torch (the adjoint, module docstring)."""
    with _autograd_inside_op():
        dx, dh0, dparams = _adjoint_grads(_CELLS[key], x, h0, h, reset, g, scan_backend=scan_backend or None)
    return [dx, dh0, *(torch.zeros_like(p) if d is None else d for p, d in zip(params, dparams))]


@_newton_adjoint_op.register_fake
def _(x, h0, h, reset, g, params, key, scan_backend):
    return [torch.empty_like(x), torch.empty_like(h0), *(torch.empty_like(p) for p in params)]


def _newton_torch_setup(ctx, inputs, output):
    x, h0, reset, params, key, *rest = inputs
    ctx.save_for_backward(x, h0, output[0], reset, *params)
    ctx.key = key
    ctx.scan_backend = rest[4]


def _newton_torch_backward(ctx, g, _g_stats):
    x, h0, h, reset, *params = ctx.saved_tensors
    dx, dh0, *dparams = _newton_adjoint_op(x, h0, h, reset, g, params, ctx.key, ctx.scan_backend)
    return dx, dh0, None, dparams, None, None, None, None, None, None


_newton_torch_op.register_autograd(_newton_torch_backward, setup_context=_newton_torch_setup)


def _adjoint(cell, prev, x, g, reset, cp=None, scan_backend=None) -> torch.Tensor:
    """lambda (B, T, S) with lambda_t = g_t + J_{t+1}^T lambda_{t+1} (paper eq. 2.6): a reverse
    scan whose matrices are the transposed Jacobians shifted by one step (none after the end;
    under cp the last local step's J_{t+1} is the next rank's first Jacobian)."""
    structure = cell.jacobian_structure
    j = _transpose(_mask_jacobian(cell.jacobian(prev, x), reset), structure)
    after = torch.zeros_like(j[:, 0]) if cp is None else context.shift(j[:, 0], cp, to_next=False)
    j_next = torch.cat([j[:, 1:], after.unsqueeze(1)], dim=1)
    return _solve_linear(j_next, g, structure, reverse=True, cp=cp, backend=scan_backend)


def _grad_params(cell: nn.Module):
    return (p for p in cell.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The "triton" backend (kernels/newton.py)
# ---------------------------------------------------------------------------------------------

# The cells the kernels implement, by kind: the cell attributes whose rows, stacked, are the
# kernels' (P, W) parameter block (GRU: a_z, a_r, a_c; LSTM: a_f, a_z, a_o, p_f, p_o), with
# x (B, T, 3, W) the gate pre-activations in the same order.
TRITON_CELLS = {"gru": ("recurrent",), "lstm": ("recurrent", "peephole")}
# ops may not import models (imports point from models down to ops), so until the model classes declare
# `triton_kind` themselves they are recognised by qualified name (the exact class, not subclasses).
_TRITON_CLASS_NAMES = {"megarnn.models.pararnn.ParaGRUCell": "gru", "megarnn.models.pararnn.ParaLSTMCell": "lstm"}
_UNSET = object()

# triton_solver's thresholds: first guesses, to tune on a GPU (tools/bench_kernels.py --only newton).
SEQUENTIAL_MAX_T = 64  # up to this many steps the fused sequential kernel runs
SEQUENTIAL_MIN_CHANNELS_PER_SM = 128  # from B * W = this x SMs the sequential kernel runs


def triton_kind(cell: nn.Module) -> str | None:
    """"gru" or "lstm" when the Triton kernels implement this cell's step, else None.

    A cell class opts in with a class attribute `triton_kind = "gru"` (or "lstm"): its step()
    must be exactly that math with the parameters named in TRITON_CELLS. A subclass that changes
    step() sets `triton_kind = None`. ParaGRUCell and ParaLSTMCell are also known by name."""
    kind = getattr(type(cell), "triton_kind", _UNSET)
    if kind is _UNSET:
        cls = type(cell)
        kind = _TRITON_CLASS_NAMES.get(f"{cls.__module__}.{cls.__qualname__}")
    return kind if kind in TRITON_CELLS else None


def triton_solver(B: int, T: int, W: int, device: torch.device) -> str:
    """"sequential" or "newton": the faster triton solver for x (B, T, 3, W) on `device`.

    The fused sequential kernel moves the least data (x in, h out, once) but runs T dependent
    steps per channel, one program per 32 channels: it is fast when the sequence is short or
    when there are enough channels for every SM to interleave many programs and hide the step
    latency. Newton moves ~2 (iterations + 2) times those bytes, but every (b, t, w) runs in
    parallel (time chunks), so it wins for few channels and long sequences (training's B = 8,
    T = 4096, W = 256: 2048 channels, 16 per H100 SM). The rule:

        sequential  if T <= SEQUENTIAL_MAX_T or B * W >= SEQUENTIAL_MIN_CHANNELS_PER_SM * SMs
        newton      otherwise

    Off CUDA (the interpreter, tests) always "sequential". The thresholds are first guesses, to
    be tuned with tools/bench_kernels.py --only newton on a GPU.
    """
    if device.type != "cuda" or T <= SEQUENTIAL_MAX_T:
        return "sequential"
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return "sequential" if B * W >= SEQUENTIAL_MIN_CHANNELS_PER_SM * sms else "newton"


def torch_solver(B: int, T: int, W: int, device: torch.device, strict: bool = True) -> str:
    """"sequential" or "newton": the faster forward of backend="torch" for x (B, T, 3, W).

    Both have the same adjoint backward. On CPU the sequential loop (no_grad, T steps of the cell)
    beat Newton's forward at every shape measured (Newton 0.5-0.8x; sequential forward + adjoint
    backward 1.3x Newton's at hidden 256, T = 4096; BENCHMARKS.md "CPU fast paths"), so CPU
    runs "sequential". On CUDA a step is several kernel launches, so "sequential" only up to
    SEQUENTIAL_MAX_T steps, like triton_solver (untuned for the torch backend). strict=False (the
    paper's fixed-iteration mode) asks for Newton's iterates: always "newton"."""
    if not strict:
        return "newton"
    if device.type != "cuda":
        return "sequential"
    return "sequential" if T <= SEQUENTIAL_MAX_T else "newton"


def _default_backend(cell: NewtonCell, x: torch.Tensor) -> str:
    """backend=None: "triton" for the cells it implements (and block cells: Newton with the Triton block
    scan) on CUDA in float32/64, else "torch"."""
    if x.is_cuda and x.dtype in (torch.float32, torch.float64) and (
            triton_kind(cell) is not None or cell.jacobian_structure == "block"):
        return "triton"
    return "torch"


def _require_kernels(x: torch.Tensor):
    """Import kernels/newton.py, or say why the triton backend cannot run on x's device."""
    return load_kernels(x, "newton_solve", "newton")


def _triton_cell(cell: NewtonCell, x: torch.Tensor, backend: str) -> str:
    """The cell's kind for the kernels, or a ValueError saying what the triton backend needs."""
    kind = triton_kind(cell)
    if kind is None:
        raise ValueError(f"newton_solve: backend={backend!r} implements ParaGRUCell and ParaLSTMCell (cells "
                         f"with triton_kind in {sorted(TRITON_CELLS)}); got {type(cell).__name__}: use "
                         f"backend='torch'")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"newton_solve: backend={backend!r} computes in float32 or float64; got x of "
                         f"{x.dtype}: cast x, or use backend='torch'")
    return kind


def _param_block(cell: NewtonCell, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' (P, W) parameter block: the cell's TRITON_CELLS attributes stacked."""
    return torch.cat([getattr(cell, name).detach() for name in TRITON_CELLS[kind]]).to(dtype)


def _block_grads(cell: NewtonCell, kind: str, dblock: torch.Tensor) -> dict[int, torch.Tensor]:
    """The (P, W) block's gradient split back into its parameters: {id(parameter): grad}."""
    grads, row = {}, 0
    for name in TRITON_CELLS[kind]:
        p = getattr(cell, name)
        grads[id(p)] = dblock[row:row + p.shape[0]].to(p.dtype)
        row += p.shape[0]
    return grads


def _triton_newton(kernels, cell, kind, x, block, h0, reset, max_iters, tol, strict) -> tuple[torch.Tensor, dict]:
    """_newton with the fused kernels: each iteration is one newton_iteration call, which
    returns the residual of the iterate it was given (a 0-d tensor) and the next iterate; the
    fallback is the fused sequential kernel."""
    h = kernels.newton_guess(kind, x, block, h0, reset)

    def iterate(h):
        h_next, residual = kernels.newton_iteration(kind, x, block, h, h0, reset)
        return residual, lambda: h_next

    h, stats, _ = _newton_loop(h, iterate, max_iters, tol, strict,
                               lambda: kernels.sequential(kind, x, block, h0, reset), cell, x)
    return h, stats


@torch.library.custom_op("megarnn::newton_triton", mutates_args=())
def _newton_triton_op(x: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor | None, params: list[torch.Tensor],
                      key: int, kind: str, solver: str, max_iters: int, tol: float, strict: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend: a fused solver forward (sequential or Newton) -> (h, stats (4,))."""
    cell = _CELLS[key]
    kernels = _require_kernels(x)
    block = _param_block(cell, kind, x.dtype)
    if solver == "sequential":
        h, info = kernels.sequential(kind, x, block, h0, reset), _stats(0, 0.0, converged=True)
    else:
        h, info = _triton_newton(kernels, cell, kind, x, block, h0, reset, max_iters, tol, strict)
    _LAST_STATS[key] = info
    return h, _stats_tensor(info)


@_newton_triton_op.register_fake
def _(x, h0, reset, params, key, kind, solver, max_iters, tol, strict):
    return x.new_empty(*x.shape[:2], h0.shape[-1]), torch.empty(4, dtype=torch.float64)


@torch.library.custom_op("megarnn::newton_triton_adjoint", mutates_args=())
def _newton_triton_adjoint_op(x: torch.Tensor, h0: torch.Tensor, h: torch.Tensor, reset: torch.Tensor | None,
                              g: torch.Tensor, params: list[torch.Tensor], key: int, kind: str
                              ) -> list[torch.Tensor]:
    """The fused adjoint kernel -> [dx, dh0, d params...] (the same math as _adjoint_grads)."""
    cell = _CELLS[key]
    dx, dblock, dh0 = _require_kernels(x).adjoint(kind, x, _param_block(cell, kind, x.dtype), h, h0, reset, g)
    grads = _block_grads(cell, kind, dblock)
    dparams = [grads.get(id(p)) for p in _grad_params(cell)]  # rows of dblock: cloned, outputs may not alias
    dh0 = torch.zeros_like(h0) if dh0 is None else dh0
    return [dx, dh0, *(torch.zeros_like(p) if d is None else d.clone() for p, d in zip(params, dparams))]


@_newton_triton_adjoint_op.register_fake
def _(x, h0, h, reset, g, params, key, kind):
    return [torch.empty_like(x), torch.empty_like(h0), *(torch.empty_like(p) for p in params)]


def _newton_triton_setup(ctx, inputs, output):
    x, h0, reset, params, key, kind, *_ = inputs
    ctx.save_for_backward(x, h0, output[0], reset, *params)
    ctx.key, ctx.kind = key, kind


def _newton_triton_backward(ctx, g, _g_stats):
    x, h0, h, reset, *params = ctx.saved_tensors
    dx, dh0, *dparams = _newton_triton_adjoint_op(x, h0, h, reset, g, params, ctx.key, ctx.kind)
    return dx, dh0, None, dparams, None, None, None, None, None, None


_newton_triton_op.register_autograd(_newton_triton_backward, setup_context=_newton_triton_setup)


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------

def newton_solve(cell: NewtonCell, x: torch.Tensor, h0: torch.Tensor | None = None,
                 max_iters: int = DEFAULT_MAX_ITERS, tol: float | None = None,
                 reset: torch.Tensor | None = None, backend: str | None = None,
                 stats: dict | None = None, strict: bool = True, cp=None) -> torch.Tensor:
    """Solve h_t = cell.step(h_{t-1}, x_t) for all t. Returns h: (B, T, S).

    x: (B, T, ...) per-step inputs, already projected, in the cell's layout; h0: (B, S) or
    None (zeros); reset: (B, T) bool, True where a document starts (h_{t-1} := 0 there).
    The final state is h[:, -1], so a long sequence can be run chunk by chunk with
    h0 = the previous chunk's h[:, -1]. Compute in float32 or float64.
    max_iters: Newton linearisations at most (a converged solve applies the update of its last
    one, counted in stats["iters"]: module docstring); tol: residual max-norm accepted (None:
    default_tol of x's dtype). strict: see the module docstring (fallback vs. returning the last
    iterate). stats, when given, is filled with {"iters", "residual", "fallback",
    "converged"}; "residual" is the last Newton residual (before any fallback).
    backend: "torch" (the forward solver torch_solver picks for the shape, or forced with
    "torch_newton" / "torch_sequential"; the adjoint backward), "reference" (the textbook
    loop), "triton" (fused kernels
    for ParaGRU / ParaLSTM cells: the solver triton_solver picks for the shape, or forced with
    "triton_sequential" / "triton_newton"), or None: "triton" on CUDA for the cells it
    implements, "torch" otherwise. T = 1 (step-mode decoding) always takes one direct step,
    except with "triton_newton" (the Newton kernels, exact after their initial guess).
    cp: context parallelism (megarnn/ops/context.py): x and reset are this rank's chunk, h0 is
    read on rank 0. Every rank runs the same Newton iterations on the whole sequence's residual;
    each linear solve is the distributed scan, with the Triton linear-scan kernel inside when
    the backend is a triton one (diagonal cells); the fallback solves rank after rank.
    Parameter gradients are this chunk's share (the caller sums them over the group).
    """
    backend = _ALIASES.get(backend, backend) or _default_backend(cell, x)
    if backend not in BACKENDS:
        raise ValueError(f"newton_solve: unknown backend {backend!r}; expected one of {BACKENDS}")
    _check_inputs(cell, x, h0, reset)
    h0 = _zeros_state(cell, x) if h0 is None else h0
    split = resolve_split(cp)
    tol = default_tol(x.dtype) if tol is None else tol
    if split is not None:
        if backend == "reference":
            raise ValueError("newton_solve: backend='reference' is not split across ranks; use 'torch' or 'triton'")
        # The fused solvers run whole sequences; across ranks Newton runs with the fast linear scan inside.
        scan_backend = "triton" if backend.startswith("triton") else None
        _check_max_iters(max_iters)
        info: dict = {}
        h = _NewtonSolve.apply(cell, x, h0, reset, (max_iters, tol, strict, scan_backend), info, split,
                               *_grad_params(cell))
    elif backend.startswith("triton") and cell.jacobian_structure == "block" and x.shape[1] > 1:
        # No fused cell kernel: the torch solve (the cell's own step and Jacobian) with every
        # linear scan (Newton's updates, the adjoint) the fused Triton block scan.
        if not torch.compiler.is_compiling():  # the early check imports (the op checks again at run time)
            _require_kernels(x)
        solver = backend[len("triton_"):] or torch_solver(x.shape[0], x.shape[1], x.shape[-1], x.device, strict)
        if solver == "newton":
            _check_max_iters(max_iters)
        key = _cell_key(cell)
        h, st = _newton_torch_op(x, h0, reset, list(_grad_params(cell)), key, solver, max_iters, tol, strict,
                                 "triton")
        info = _stats_from(key, st, x)
    elif backend.startswith("triton") and cell.jacobian_structure != "block":
        kind = _triton_cell(cell, x, backend)
        solver = backend[len("triton_"):] or triton_solver(x.shape[0], x.shape[1], x.shape[-1], x.device)
        if solver == "newton":
            _check_max_iters(max_iters)
        key = _cell_key(cell)
        h, st = _newton_triton_op(x, h0, reset, list(_grad_params(cell)), key, kind, solver, max_iters, tol, strict)
        info = _stats_from(key, st, x)
    elif backend == "reference" or x.shape[1] == 1:
        h = sequential_solve(cell, x, h0, reset)
        info = _stats(0, 0.0, converged=True)
    else:
        solver = backend[len("torch_"):] or torch_solver(x.shape[0], x.shape[1], x.shape[-1], x.device, strict)
        if solver == "newton":
            _check_max_iters(max_iters)
        key = _cell_key(cell)
        h, st = _newton_torch_op(x, h0, reset, list(_grad_params(cell)), key, solver, max_iters, tol, strict, "")
        info = _stats_from(key, st, x)
    if stats is not None:
        stats.update(info)
    return h


def _check_max_iters(max_iters: int) -> None:
    if max_iters < 0:
        raise ValueError(f"newton_solve: max_iters must be >= 0; got {max_iters}")


def _check_inputs(cell, x, h0, reset) -> None:
    if getattr(cell, "jacobian_structure", None) not in STRUCTURES:
        raise ValueError(f"newton_solve: cell.jacobian_structure must be one of {STRUCTURES}; "
                         f"got {getattr(cell, 'jacobian_structure', None)!r}")
    S = cell.state_size
    if cell.jacobian_structure == "block2" and S % 2:
        raise ValueError(f"newton_solve: a block2 cell needs an even state_size (2 * D); got {S}")
    if cell.jacobian_structure == "block":
        n = getattr(cell, "block_size", None)
        if n not in BLOCK_SIZES or S % n:
            raise ValueError(f"newton_solve: a block cell needs block_size in 2..16 dividing state_size {S}; "
                             f"got {n!r}")
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"newton_solve: x must be (B, T, ...) with T >= 1; got {tuple(x.shape)}")
    if h0 is not None and h0.shape != (x.shape[0], S):
        raise ValueError(f"newton_solve: h0 must be (B, S) = {(x.shape[0], S)}; got {tuple(h0.shape)}")
    if reset is not None and (reset.shape != x.shape[:2] or reset.dtype != torch.bool):
        raise ValueError(f"newton_solve: reset must be a (B, T) = {tuple(x.shape[:2])} bool tensor; "
                         f"got {tuple(reset.shape)} {reset.dtype}")
