"""Context parallelism (CP): one sequence split across the ranks of a process group.

Rank r of a cp group of size cp holds time steps [r T_local, (r + 1) T_local), T = cp T_local.
Every function here takes that LOCAL chunk and returns exactly what the single-process op
returns for it (same values, same gradients), so a model swaps `linear_scan` for
`cp_linear_scan` and nothing else changes.

Linear recurrences (h_t = j_t h_{t-1} + b_t, diagonal or 2x2 per channel) split by their
carry: a chunk's output is its scan from zero plus (the product of its j up to t) times the
state entering it. Each rank scans from zero (rank 0 from h0), all-gathers one summary per
rank, (product of j over the chunk, last state), folds the summaries of the ranks before it
into its incoming state (in float32, float64 for float64 inputs), and corrects its outputs.
A reset is j_t = 0, so it zeroes the chunk's product and no carry crosses it, wherever it
falls, a rank boundary included. Backward is the mirror image: the adjoint runs in reverse
time, so rank r folds the summaries of ranks > r. Communication never depends on T:

    call                        forward                                   backward
    cp_linear_scan              all_gather 2 B D                          send B D; all_gather 2 B D
    cp_ssd_scan                 all_gather B H (1 + P N)                  all_reduce cp B H (1 + P N)
    cp_newton_solve, per iter.  send B S; all_reduce 1; all_gather n B S  (once) send m B S; all_gather n B S
                                (n = 2 diagonal, 3 block2; m = 1 diagonal, 2 block2)
    cp_halo                     send (width - 1) B D per hop              the same, toward rank - 1
    cp_causal_conv1d            cp_halo; with resets also (width - 1) B int32 codes per hop
    cp_sliding_window_attention cp_halo of [k | v]: (window - 1) B Hkv 2 Dh per hop; codes as conv

in elements per rank ("all_gather k" sends k and receives (cp - 1) k; "send k" sends k to one
neighbour; bytes = elements x element size; hops = ceil((width - 1) / T_local), 1 when the
chunk is at least width - 1 long). A 2x2 block carry is 4 numbers per channel, so block2
sums are 4 D + 2 D = 3 S.

Conventions shared by every function:
  - group: a torch.distributed ProcessGroup (None: the default group); all its ranks call
    the function together, with the same shapes and the same optional arguments present.
    Backward exchanges too, so every rank backpropagates through the outputs it got (a
    rank whose loss ignores them would leave the others waiting); the graphs are the same
    on every rank, so autograd runs the exchanges in the same order everywhere.
  - h0 / initial_state is the state before the WHOLE sequence; only rank 0 reads it (other
    ranks may pass None or the same tensor, and get a zero gradient for it from
    cp_linear_scan and cp_newton_solve, none from cp_ssd_scan, which leaves it unused).
  - Replicated inputs (SSD's A and D, Newton's cell parameters, conv weights): each rank's
    gradient is its chunk's share. The CALLER all-reduces (SUM) them over the cp group, as
    the data-parallel gradient reduction over the dp x cp group does; nothing here does it,
    so a reduction over dp x cp never counts a gradient twice.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megarnn.ops.attention import sliding_window_attention
from megarnn.ops.conv import causal_conv1d
from megarnn.ops.newton import (DEFAULT_MAX_ITERS, NewtonCell, _check_inputs, _divergence, _grad_params,
                                _mask_jacobian, _pairs, _prev_states, _stats, _transpose, _unpairs, block2_scan,
                                default_tol, logger, sequential_solve)
from megarnn.ops.scan import linear_scan
from megarnn.ops.ssd import ssd_scan

__all__ = ["cp_linear_scan", "cp_ssd_scan", "cp_newton_solve", "cp_halo", "cp_causal_conv1d",
           "cp_sliding_window_attention"]


# ---------------------------------------------------------------------------------------------
# Group plumbing: neighbour exchange, all-gather, global max.
# ---------------------------------------------------------------------------------------------

def _rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, rank: int) -> int:
    """The global rank of `rank` in group (point-to-point ops address global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _shift(t: torch.Tensor, group, to_next: bool = True, edge: torch.Tensor | None = None) -> torch.Tensor:
    """Every rank sends t to its neighbour and returns what it receives (no autograd).

    to_next: rank r receives rank r - 1's t, and rank 0 gets `edge`; otherwise rank r
    receives rank r + 1's t, and the last rank gets `edge`. edge: like t, zeros when None.
    """
    rank, size = _rank_size(group)
    src, dst = (rank - 1, rank + 1) if to_next else (rank + 1, rank - 1)
    t = t.contiguous()
    ops, recv = [], None
    if 0 <= dst < size:
        ops.append(dist.P2POp(dist.isend, t, _peer(group, dst), group))
    if 0 <= src < size:
        recv = torch.empty_like(t)
        ops.append(dist.P2POp(dist.irecv, recv, _peer(group, src), group))
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()
    if recv is not None:
        return recv
    return torch.zeros_like(t) if edge is None else edge.to(t.dtype).clone()


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """(cp, *t.shape): every rank's t, in rank order (no autograd)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


class _AllGather(torch.autograd.Function):
    """_all_gather with a gradient: each rank's row gets the sum over ranks of its gradient.

    The backward is a collective, so it must run on every rank, also where the gathered rows
    reach no loss (rank 0 never needs the carries of earlier ranks): `anchor`, a tensor every
    rank's loss uses (the op's output), passes through unchanged and pulls this backward in;
    a missing gradient counts as zeros. torch.distributed.nn's all_gather has neither the
    anchor nor a single collective on gloo (it scatters once per rank); an all-reduce of the
    (cp, ...) gradient is one collective and the same bytes as the gather.
    """

    @staticmethod
    def forward(ctx, t, group, anchor):
        ctx.group = group
        return _all_gather(t, group), anchor.clone()

    @staticmethod
    def backward(ctx, g, g_anchor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g[dist.get_rank(ctx.group)], None, g_anchor


def _global_max(value: torch.Tensor, group) -> float:
    """max over the group of a scalar; a non-finite value anywhere gives inf everywhere
    (a NaN must not vanish inside the reduction: every rank has to see the divergence)."""
    v = value.detach().to(torch.float64).reshape(1)
    if not torch.isfinite(v).all():
        v = torch.full_like(v, float("inf"))
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    return float(v)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The distributed linear scan (no autograd): y_t = j_t y_{t-1} + b_t across all ranks.
# structure "diagonal": j, b (B, T_local, D); "block2": j (B, T_local, D, 2, 2), b (B, T_local, D, 2).
# ---------------------------------------------------------------------------------------------

def _local_scan(j, b, structure, h0=None) -> torch.Tensor:
    if structure == "diagonal":
        return linear_scan(j, b, h0, backend="torch")
    return block2_scan(j, b, h0)


def _chunk_product(j, structure) -> torch.Tensor:
    """j_{T-1} ... j_1 j_0: (B, D) or (B, D, 2, 2). Block products by pairs, log2(T) batched matmuls."""
    if structure == "diagonal":
        return j.prod(dim=1)
    while j.shape[1] > 1:
        if j.shape[1] % 2:  # an identity after the last step changes nothing
            eye = torch.eye(2, dtype=j.dtype, device=j.device).expand(j.shape[0], 1, *j.shape[2:])
            j = torch.cat([j, eye], dim=1)
        j = j[:, 1::2] @ j[:, 0::2]
    return j[:, 0]


def _apply(m, c, structure) -> torch.Tensor:
    """m c: diagonal (B, D) * (B, D), or (B, D, 2, 2) @ (B, D, 2)."""
    return m * c if structure == "diagonal" else (m @ c.unsqueeze(-1)).squeeze(-1)


def _carry_correction(j, carry, structure) -> torch.Tensor:
    """(j_t ... j_0) carry for every t: what the incoming state adds to a scan from zero."""
    if structure == "diagonal":
        return torch.cumprod(j, dim=1) * carry.unsqueeze(1)
    return block2_scan(j, torch.zeros_like(carry).unsqueeze(1).expand(-1, j.shape[1], -1, -1), carry)


def _cp_scan(j, b, structure, group, h0=None, reverse=False) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = j_t y_{t-1} + b_t over the whole split sequence; reverse: y_t = j_t y_{t+1} + b_t.

    j, b: this rank's chunk (see the section comment), in the accumulation dtype; h0: the
    state before the sequence (its far end when reverse; zeros when None), read on the first
    rank in scan order only. Returns y (like b) and the carry: the state entering this chunk
    (the neighbour's adjacent y, or h0), (B, D) or (B, D, 2).
    """
    rank, size = _rank_size(group)
    pos = size - 1 - rank if reverse else rank  # this chunk's place in scan order
    if reverse:
        j, b = j.flip(1), b.flip(1)
    if h0 is None or pos > 0:
        h0 = torch.zeros_like(b[:, 0])
    y = _local_scan(j, b, structure, h0)  # the first chunk starts from h0: its summary is exact
    prod = _chunk_product(j, structure)
    gathered = _all_gather(torch.cat([prod.flatten(1), y[:, -1].flatten(1)], dim=1), group)
    if reverse:
        gathered = gathered.flip(0)
    prods = gathered[..., :prod[0].numel()].reshape(size, *prod.shape)
    ends = gathered[..., prod[0].numel():].reshape(size, *y[:, -1].shape)
    carry = torch.zeros_like(h0)
    for k in range(pos):  # the states of the chunks before this one, folded in order
        carry = _apply(prods[k], carry, structure) + ends[k]
    if pos > 0:
        y = y + _carry_correction(j, carry, structure)
    else:
        carry = h0
    return (y.flip(1) if reverse else y), carry


# ---------------------------------------------------------------------------------------------
# cp_linear_scan
# ---------------------------------------------------------------------------------------------

class _CPLinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, group):
        acc = _acc_dtype(b)
        h, carry = _cp_scan(a.to(acc), b.to(acc), "diagonal", group, None if h0 is None else h0.to(acc))
        ctx.save_for_backward(a, h, carry)
        ctx.group, ctx.has_h0 = group, h0 is not None
        ctx.dtypes = (a.dtype, b.dtype, None if h0 is None else h0.dtype)
        return h.to(b.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        a, h, carry = ctx.saved_tensors
        acc, group = h.dtype, ctx.group
        # Adjoint g_t = dh_t + a_{t+1} g_{t+1}: a reverse scan with the decays shifted by one;
        # the last step's a_{t+1} is the next rank's first decay (zero after the last rank).
        a = a.to(acc)
        a_after = _shift(a[:, 0], group, to_next=False)
        a_next = torch.cat([a[:, 1:], a_after.unsqueeze(1)], dim=1)
        g, _ = _cp_scan(a_next, dh.to(acc), "diagonal", group, reverse=True)
        h_prev = torch.cat([carry.unsqueeze(1), h[:, :-1]], dim=1)  # carry: the previous rank's last h
        da, db = (g * h_prev).to(ctx.dtypes[0]), g.to(ctx.dtypes[1])
        dh0 = None
        if ctx.has_h0:
            dh0 = a[:, 0] * g[:, 0] if dist.get_rank(group) == 0 else torch.zeros_like(carry)
            dh0 = dh0.to(ctx.dtypes[2])
        return da, db, dh0, None


def cp_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """linear_scan (h_t = a_t h_{t-1} + b_t) of a sequence split across the ranks of `group`.

    a, b: (B, T_local, D), this rank's chunk; h0: (B, D) the state before the whole sequence,
    read on rank 0 only (zeros when None). Returns h (B, T_local, D) in b's dtype, equal to
    linear_scan over the whole sequence at this chunk; carries are combined in float32
    (float64 for float64 b). Differentiable in a, b, h0 (dh0 on rank 0, zeros elsewhere).
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"cp_linear_scan: a and b must both be (B, T_local, D); "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if h0 is not None and h0.shape != (b.shape[0], b.shape[2]):
        raise ValueError(f"cp_linear_scan: h0 must be (B, D) = {(b.shape[0], b.shape[2])}; got {tuple(h0.shape)}")
    return _CPLinearScan.apply(a, b, h0, group)


# ---------------------------------------------------------------------------------------------
# cp_ssd_scan
# ---------------------------------------------------------------------------------------------

def _decay_from_start(dt, A, reset, acc) -> torch.Tensor:
    """exp(sum_{s <= t} dt_s A) from the chunk start through t, zero from the first reset on.
    dt: (B, T_local, H); A: (H,); reset: (B, T_local) or None -> (B, T_local, H)."""
    decay = torch.exp(torch.cumsum(dt.to(acc) * A.to(acc), dim=1))
    if reset is None:
        return decay
    open_ = torch.cumsum(reset.to(torch.int32), dim=1) == 0  # no reset in [chunk start, t]
    return decay * open_.unsqueeze(-1).to(acc)


def cp_ssd_scan(x, dt, A, B, C, D=None, chunk_size: int = 64, initial_state=None, reset=None,
                group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd_scan of a sequence split across the ranks of `group`.

    x: (B, T_local, H, P); dt: (B, T_local, H); A: (H,); B, C: (B, T_local, G, N); D: (H,) or
    None; initial_state: (B, H, P, N), read on rank 0 only; reset: (B, T_local) bool or None.
    Returns y (B, T_local, H, P), this chunk of ssd_scan's y, and the final state of the
    WHOLE sequence (B, H, P, N) in float32 (float64), the same on every rank. Gradients flow
    through autograd (to every rank); if a loss reads the final state, read it on one rank.

    Each rank scans from zero (rank 0 from initial_state) and all-gathers (decay through its
    chunk (B, H), its final state (B, H, P, N)); the state entering rank r is the fold of
    ranks < r, and y_t += decay(chunk start..t) C_t . carry until the chunk's first reset.
    """
    rank, size = _rank_size(group)
    acc = _acc_dtype(x)
    y, state = ssd_scan(x, dt, A, B, C, D, chunk_size, initial_state if rank == 0 else None, reset,
                        backend="torch")
    decay = _decay_from_start(dt, A, reset, acc)  # (b, T_local, H)
    H = decay.shape[2]
    gathered, y = _AllGather.apply(torch.cat([decay[:, -1], state.flatten(1)], dim=1), group, y)
    through, states = gathered[..., :H], gathered[..., H:].reshape(size, *state.shape)
    carry = final = torch.zeros_like(state)
    for k in range(size):
        if k == rank:
            carry = final
        final = through[k][..., None, None] * final + states[k]
    # The same graph on every rank (rank 0 adds a zero carry), so backward passes match.
    Ch = C.to(acc).repeat_interleave(H // C.shape[2], dim=2)  # (b, T_local, H, N)
    y = (y.to(acc) + torch.einsum("bthn,bhpn,bth->bthp", Ch, carry, decay)).to(x.dtype)
    return y, final


# ---------------------------------------------------------------------------------------------
# cp_newton_solve
# ---------------------------------------------------------------------------------------------

def _cp_solve_linear(j, b, structure, group, reverse=False) -> torch.Tensor:
    """newton's _solve_linear across ranks: y_t = j_t y_{t-1} + b_t (from the end when reverse),
    zero before the sequence. b: (B, T_local, S); j: (B, T_local, S) or (B, T_local, S/2, 2, 2)."""
    if structure == "diagonal":
        return _cp_scan(j, b, structure, group, reverse=reverse)[0]
    return _unpairs(_cp_scan(j, _pairs(b), structure, group, reverse=reverse)[0])


def _cp_sequential(cell, x, h0, reset, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback: the sequential solve, rank after rank, each starting from the previous
    rank's last state. Returns h (B, T_local, S) and the state entering this chunk."""
    rank, size = _rank_size(group)
    start = h0
    if rank > 0:
        start = torch.empty_like(h0)
        dist.recv(start, _peer(group, rank - 1), group)
    h = sequential_solve(cell, x, start, reset)
    if rank < size - 1:
        dist.send(h[:, -1].contiguous(), _peer(group, rank + 1), group)
    return h, start


def _cp_newton(cell, x, h0, reset, max_iters, tol, strict, group) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """newton's _newton with the chunk boundary exchanged and the linear solve distributed.
    Returns h (B, T_local, S), the state entering this chunk (h0 on rank 0) and the stats."""
    rank, _ = _rank_size(group)
    structure = cell.jacobian_structure
    # The same initial guess as one process: f(0, x_t), except f(h0, x_0) at the global start.
    start = h0 if rank == 0 else torch.zeros_like(h0)
    h = cell.step(_prev_states(x.new_zeros(*x.shape[:2], cell.state_size), start, reset), x)
    eps = torch.finfo(h.dtype).eps
    best, iters = float("inf"), 0
    while True:
        boundary = _shift(h[:, -1], group, edge=h0)  # h_{-1} of this chunk: the previous rank's last
        f, j = cell.linearize(_prev_states(h, boundary, reset), x)
        r = h - f
        # One residual for the whole sequence, so every rank takes the same branch below.
        residual = _global_max(r.abs().max(), group)
        if residual <= tol:
            return h, boundary, _stats(iters, residual, converged=True)
        reason = _divergence(residual, best, eps)
        if not reason and iters >= max_iters:
            if not strict:
                return h, boundary, _stats(iters, residual, converged=False)
            reason = f"not converged to tol={tol:.3g} in max_iters={max_iters}"
        if reason:
            break
        best = min(best, residual)
        h = h + _cp_solve_linear(_mask_jacobian(j, reset), -r, structure, group)
        iters += 1
    if rank == 0:
        logger.warning("cp_newton_solve: %s (cell %s, local x %s, iters=%d, residual=%.3g); fell back to "
                       "the sequential solve, rank by rank", reason, type(cell).__name__, tuple(x.shape),
                       iters, residual)
    h, boundary = _cp_sequential(cell, x, h0, reset, group)
    return h, boundary, {**_stats(iters, residual, converged=True), "fallback": True}


def _cp_adjoint(cell, prev, x, g, reset, group) -> torch.Tensor:
    """lambda_t = g_t + J_{t+1}^T lambda_{t+1} over the whole sequence (newton's _adjoint);
    the last local step's J_{t+1} is the next rank's first Jacobian (zero after the last rank)."""
    structure = cell.jacobian_structure
    j = _transpose(_mask_jacobian(cell.jacobian(prev, x), reset), structure)
    j_after = _shift(j[:, 0], group, to_next=False)
    j_next = torch.cat([j[:, 1:], j_after.unsqueeze(1)], dim=1)
    return _cp_solve_linear(j_next, g, structure, group, reverse=True)


class _CPNewtonSolve(torch.autograd.Function):
    """Distributed Newton forward; distributed adjoint backward (as newton._NewtonSolve)."""

    @staticmethod
    def forward(ctx, cell, x, h0, reset, opts, stats, group, *params):
        h, boundary, info = _cp_newton(cell, x, h0, reset, *opts, group)
        stats.update(info)
        ctx.cell, ctx.params, ctx.group = cell, params, group
        ctx.save_for_backward(x, boundary, h, reset)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, boundary, h, reset = ctx.saved_tensors
        cell, group = ctx.cell, ctx.group
        rank = dist.get_rank(group)
        need_x, need_h0 = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        needs = ctx.needs_input_grad[7:]
        prev = _prev_states(h, boundary, reset)
        lam = _cp_adjoint(cell, prev, x, g.to(h.dtype), reset, group)
        # Only rank 0's h_{-1} is an input (h0); elsewhere it is the previous rank's output,
        # whose gradient the adjoint scan has already carried across the boundary.
        grad_prev = need_h0 and rank == 0
        wanted = [p for p, need in zip(ctx.params, needs) if need]
        with torch.enable_grad():
            prev = prev.detach().requires_grad_(grad_prev)
            xg = x.detach().requires_grad_(need_x)
            inputs = [t for t, need in ((prev, grad_prev), (xg, need_x)) if need] + wanted
            grads = list(torch.autograd.grad(cell.step(prev, xg), inputs, lam, allow_unused=True)) \
                if inputs else []
        dh0 = None
        if grad_prev:
            dh0 = grads.pop(0)[:, 0].to(boundary.dtype)
            if reset is not None:
                dh0 = dh0.masked_fill(reset[:, 0, None], 0.0)  # no gradient across a reset
        elif need_h0:
            dh0 = torch.zeros_like(boundary)
        dx = grads.pop(0) if need_x else None
        dparams = iter(grads)
        return (None, dx, dh0, None, None, None, None, *(next(dparams) if need else None for need in needs))


def cp_newton_solve(cell: NewtonCell, x: torch.Tensor, h0: torch.Tensor | None = None,
                    reset: torch.Tensor | None = None, max_iters: int = DEFAULT_MAX_ITERS,
                    tol: float | None = None, group=None, stats: dict | None = None,
                    strict: bool = True) -> torch.Tensor:
    """newton_solve of a sequence split across the ranks of `group`. Returns h (B, T_local, S).

    x: (B, T_local, ...) this rank's inputs; h0: (B, S) before the whole sequence, read on
    rank 0 only; reset: (B, T_local) bool or None. max_iters, tol, strict, stats: as
    newton_solve; the residual is the max over the whole sequence (all-reduced), so every
    rank runs the same iterations and gets the same stats. Each iteration exchanges the
    chunk's last state with the next rank and solves its linear recurrence with the
    distributed scan (2x2 block products for "block2" cells). A fallback (divergence, or
    strict and not converged) runs the sequential solve rank after rank (T steps in
    sequence, slow but exact). Backward: the distributed adjoint scan, then one vjp of
    cell.step per rank. Parameter gradients are this chunk's share: all-reduce (SUM) them
    over the cp group (the module docstring says why the caller does it).
    """
    _check_inputs(cell, x, h0, reset)
    if max_iters < 0:
        raise ValueError(f"cp_newton_solve: max_iters must be >= 0; got {max_iters}")
    h0 = torch.zeros(x.shape[0], cell.state_size, dtype=x.dtype, device=x.device) if h0 is None else h0
    tol = default_tol(x.dtype) if tol is None else tol
    info: dict = {}
    h = _CPNewtonSolve.apply(cell, x, h0, reset, (max_iters, tol, strict), info, group, *_grad_params(cell))
    if stats is not None:
        stats.update(info)
    return h


# ---------------------------------------------------------------------------------------------
# Halo exchange: conv1d and sliding-window attention.
# ---------------------------------------------------------------------------------------------

class _ShiftToNext(torch.autograd.Function):
    """Rank r gets rank r - 1's t (zeros on rank 0); the gradient goes back to rank r - 1."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return _shift(t, group)

    @staticmethod
    def backward(ctx, g):
        return _shift(g, ctx.group, to_next=False), None


def _hops(width: int, T_local: int) -> int:
    """Exchanges needed for a halo of width - 1 steps: more than one when chunks are shorter."""
    return math.ceil((width - 1) / T_local)


def cp_halo(x: torch.Tensor, width: int, group=None) -> torch.Tensor:
    """The (width - 1) time steps just before this rank's chunk: (B, width - 1, ...).

    x: (B, T_local, ...). Zeros before the start of the sequence (on rank 0, and on the
    first ranks when T_local < width - 1: then the halo spans several earlier ranks and is
    passed on hop by hop). Differentiable: the gradient flows back to the ranks it came from.
    """
    if width < 1 or x.dim() < 2 or x.shape[1] < 1:
        raise ValueError(f"cp_halo: expected width >= 1 and x (B, T_local >= 1, ...); "
                         f"got width={width}, x {tuple(x.shape)}")
    n = width - 1
    halo = x.new_zeros(x.shape[0], n, *x.shape[2:])
    if n == 0:
        return halo
    for _ in range(_hops(width, x.shape[1])):  # each hop reaches T_local steps further back
        halo = _ShiftToNext.apply(torch.cat([halo, x], dim=1)[:, -n:], group)
    return halo


def _halo_valid(reset: torch.Tensor | None, width: int, group) -> torch.Tensor:
    """(B, width - 1) bool: which halo steps may be seen from this chunk's start, i.e. lie
    inside the sequence and no document starts after them (before the chunk). A reset AT the
    chunk start is the local reset[:, 0], which the ops handle themselves.

    Codes passed along: 1 reset, 0 no reset, -1 before the sequence.
    """
    B, T = reset.shape
    n = width - 1
    codes = torch.full((B, n), -1, dtype=torch.int32, device=reset.device)
    local = reset.to(torch.int32)
    for _ in range(_hops(width, T)):
        codes = _shift(torch.cat([codes, local], dim=1)[:, -n:], group,
                       edge=torch.full((B, n), -1, dtype=torch.int32, device=reset.device))
    starts = (codes == 1).to(torch.int32)
    later = starts.flip(1).cumsum(1).flip(1) - starts  # resets after each halo step
    return (codes >= 0) & (later == 0)


def _check_reset(reset, x, name):
    if reset is not None and (reset.shape != x.shape[:2] or reset.dtype != torch.bool):
        raise ValueError(f"{name}: reset must be a (B, T_local) = {tuple(x.shape[:2])} bool tensor; "
                         f"got {tuple(reset.shape)} {reset.dtype}")


def cp_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     reset: torch.Tensor | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d of a sequence split across ranks, from a zero state at the sequence start.

    x: (B, T_local, D); weight: (D, W); bias: (D,); reset: (B, T_local) bool or None (None on
    every rank or on none). Returns y (B, T_local, D) and the conv state after this chunk
    (B, W - 1, D): on the last rank, the whole sequence's.
    """
    _check_reset(reset, x, "cp_causal_conv1d")
    W = weight.shape[1]
    state = cp_halo(x, W, group)
    if reset is not None:
        # causal_conv1d lets the whole state reach the chunk's first document; steps of an
        # earlier document (a reset after them on an earlier rank) must read as zeros.
        state = state * _halo_valid(reset, W, group).unsqueeze(-1).to(state.dtype)
    return causal_conv1d(x, weight, bias, state, reset)


def cp_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                                reset: torch.Tensor | None = None, group=None) -> tuple[torch.Tensor, dict]:
    """sliding_window_attention of a sequence split across ranks (SDPA backend).

    q: (B, T_local, H, Dh); k, v: (B, T_local, Hkv, Dh) (positions already encoded with
    GLOBAL positions); reset: (B, T_local) bool or None (None on every rank or on none).
    The previous window - 1 keys and values arrive as the op's cache, with "valid" saying
    which of them share the chunk start's document. Returns out (B, T_local, H, Dh) and the
    cache after this chunk (the whole sequence's on the last rank).
    """
    _check_reset(reset, q, "cp_sliding_window_attention")
    if k.shape != v.shape:
        raise ValueError(f"cp_sliding_window_attention: k and v must have the same shape; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    rank, _ = _rank_size(group)
    kv = cp_halo(torch.cat([k, v], dim=-1), window, group)  # one message for both
    k_halo, v_halo = kv.split(k.shape[-1], dim=-1)
    n, T = window - 1, q.shape[1]
    if reset is not None:
        valid = _halo_valid(reset, window, group)
    else:  # no documents: a halo step is valid iff it lies inside the sequence
        pos = rank * T - n + torch.arange(n, device=q.device)
        valid = (pos >= 0).expand(q.shape[0], n)
    cache = {"k": k_halo, "v": v_halo, "valid": valid}
    return sliding_window_attention(q, k, v, window, reset, cache=cache, backend="sdpa")
