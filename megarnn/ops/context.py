"""Context parallelism (CP) inside the ops: one sequence split across the ranks of a group.

Rank r of a cp group of size cp holds time steps [r T_local, (r + 1) T_local), T = cp T_local.
Every sequence op (linear_scan, rglru_scan, ssd_scan, newton_solve, causal_conv1d,
sliding_window_attention) takes an optional `cp` argument and, given a group, returns for
this rank's LOCAL chunk exactly what the single-process op returns for it (same values, same
gradients). Around the exchange it runs the same backend it runs on one rank (Triton kernels
where they run, chunked torch otherwise): context parallelism never swaps a fast path for a
slow one. Models do not pass groups: megarnn.parallel enters `context_parallel(group)` around
their forward, and an op called with cp=None reads that ambient split (as torchtitan's
`context_parallel` context manager does for SDPA).

    with context_parallel(group):           # every op below now works on this rank's chunk
        logits, _ = model(tokens_chunk)

Linear recurrences (h_t = a_t h_{t-1} + b_t) split by their carry: a chunk's output is its
scan from zero plus (the product of its decays up to t) times the state entering it. Each
rank runs its local op from zero (rank 0 from h0), all-gathers one summary per rank (decay
through its chunk, last state), folds the summaries of the ranks before it into its incoming
state in float32 (float64 for float64 inputs) and corrects its outputs. A reset is a_t = 0,
so no carry crosses it, wherever it falls, a rank boundary included. The correction is plain
autograd around the gather (`carry_in`), whose backward all-reduces the summaries' gradient.

Communication per call, in elements per rank ("all_gather k" sends k and receives
(cp - 1) k; "send k" sends k to one neighbour):

    op                          forward                                   backward
    linear_scan, rglru_scan     all_gather 2 B D                          all_reduce cp 2 B D
    ssd_scan                    all_gather B H (1 + P N)                  all_reduce cp B H (1 + P N)
    newton_solve, per iter.     send B S; all_reduce 1; all_gather n B S  (once) send m B S; all_gather n B S
                                (n = 2 diagonal, 3 block2; m = 1 diagonal, 2 block2)
    causal_conv1d               halo: send (W - 1) B D per hop            the same, toward rank - 1
    sliding_window_attention    halo of [k | v]: (window - 1) B Hkv 2 Dh per hop

(hops = ceil((W - 1) / T_local), 1 when the chunk is at least W - 1 long.)

Conventions shared by every op under CP:
  - all ranks of the group call the op together, with the same shapes and the same optional
    arguments present; backward exchanges too, so every rank backpropagates through the
    outputs it got (the graphs are the same on every rank, so the exchanges run in order).
  - h0 / initial_state is the state before the WHOLE sequence; only rank 0 reads it (other
    ranks may pass None or the same tensor and get a zero gradient for it).
  - Replicated inputs (decay parameters, A, D, cell and conv weights): each rank's gradient is
    its chunk's share; the caller sums them over the cp group (the data-parallel reduction
    over dp x cp does), so nothing is counted twice.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ContextParallel:
    """The split of one sequence across `group` (a torch.distributed ProcessGroup)."""

    group: object

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)


_CURRENT: contextvars.ContextVar[ContextParallel | None] = contextvars.ContextVar("megarnn_cp", default=None)


@contextlib.contextmanager
def context_parallel(group):
    """Within the block, ops called with cp=None work on this rank's chunk of `group`'s
    sequence (group None: one whole sequence per rank, e.g. to evaluate inside a split)."""
    token = _CURRENT.set(ContextParallel(group) if group is not None else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def resolve(cp) -> ContextParallel | None:
    """An op's `cp` argument -> the split to use, or None for a whole sequence.

    cp: None (the ambient split of `context_parallel`, if any), False (never split: the op's
    own local work), a ContextParallel, or a ProcessGroup. A group of one rank is no split."""
    if cp is None:
        cp = _CURRENT.get()
    if cp is None or cp is False:
        return None
    cp = cp if isinstance(cp, ContextParallel) else ContextParallel(cp)
    return cp if cp.size > 1 else None


def sequence_start(length: int) -> int:
    """Position of this call's first token in its sequence: rank x length under the ambient
    split, else 0 (a model's positions and its "first token starts a document" rule)."""
    cp = resolve(None)
    return cp.rank * length if cp is not None else 0


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Collectives: neighbour exchange, all-gather (with and without a gradient), global max.
# ---------------------------------------------------------------------------------------------

def _peer(group, rank: int) -> int:
    """The global rank of `rank` in group (point-to-point ops address global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def shift(t: torch.Tensor, cp: ContextParallel, to_next: bool = True, edge: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Every rank sends t to its neighbour and returns what it receives (no autograd).

    to_next: rank r receives rank r - 1's t, and rank 0 gets `edge`; otherwise rank r
    receives rank r + 1's t, and the last rank gets `edge`. edge: like t, zeros when None.
    """
    rank, size, group = cp.rank, cp.size, cp.group
    if t.is_meta:  # megarnn plan: shapes only (no backend sends meta tensors)
        return torch.empty_like(t)
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


def send_recv_chain(t_out_fn, start: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """Rank by rank in order: receive the previous rank's value (rank 0: `start`), compute
    out = t_out_fn(received), send its last state on. Returns (out, received)."""
    rank, size = cp.rank, cp.size
    received = start
    if rank > 0:
        received = torch.empty_like(start)
        dist.recv(received, _peer(cp.group, rank - 1), cp.group)
    out = t_out_fn(received)
    if rank < size - 1:
        dist.send(out[:, -1].contiguous(), _peer(cp.group, rank + 1), cp.group)
    return out, received


def all_gather(t: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """(cp, *t.shape): every rank's t, in rank order (no autograd)."""
    parts = [torch.empty_like(t) for _ in range(cp.size)]
    dist.all_gather(parts, t.contiguous(), group=cp.group)
    return torch.stack(parts)


class _AllGather(torch.autograd.Function):
    """all_gather with a gradient: each rank's row gets the sum over ranks of its gradient.

    The backward is a collective, so it must run on every rank, also where the gathered rows
    reach no loss (rank 0 never needs the carries of earlier ranks): `anchor`, a tensor every
    rank's loss uses (the op's output), passes through unchanged and pulls this backward in;
    a missing gradient counts as zeros. One all-reduce of the (cp, ...) gradient is one
    collective and the same bytes as the gather.
    """

    @staticmethod
    def forward(ctx, t, cp, anchor):
        ctx.cp = cp
        return all_gather(t, cp), anchor.clone()

    @staticmethod
    def backward(ctx, g, g_anchor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.cp.group)
        return g[ctx.cp.rank], None, g_anchor


def global_max(value: torch.Tensor, cp: ContextParallel | None) -> float:
    """max over the group of a scalar (the scalar itself without a split); a non-finite value
    anywhere gives inf everywhere (a NaN must not vanish inside the reduction)."""
    if value.is_meta:  # shapes only (megarnn plan): no values to test, treat as converged
        return 0.0
    v = value.detach().to(torch.float64).reshape(1)
    if cp is None:
        return float(v)
    if not torch.isfinite(v).all():
        v = torch.full_like(v, float("inf"))
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=cp.group)
    return float(v)


# ---------------------------------------------------------------------------------------------
# Carries of linear recurrences.
# ---------------------------------------------------------------------------------------------

def carry_in(through: torch.Tensor, last: torch.Tensor, cp: ContextParallel, anchor: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state entering this rank's chunk, with autograd across ranks.

    through: (B, ...) what a state entering a chunk is multiplied by at its end (the product of
    the chunk's decays; zero after a reset), broadcastable to last; last: (B, ...) the chunk's
    last state computed from zero (rank 0: from h0). Both in the accumulation dtype.
    Returns (carry like last: the fold of the ranks before this one, the final state of the
    whole sequence like last, anchor unchanged but tied to the gather's backward).
    """
    n = through[0].numel()
    gathered, anchor = _AllGather.apply(torch.cat([through.flatten(1), last.flatten(1)], dim=1), cp, anchor)
    throughs = gathered[..., :n].reshape(cp.size, *through.shape)
    lasts = gathered[..., n:].reshape(cp.size, *last.shape)
    carry = final = torch.zeros_like(last)
    for k in range(cp.size):
        if k == cp.rank:
            carry = final
        final = throughs[k] * final + lasts[k]
    return carry, final, anchor


def diagonal_carry(h: torch.Tensor, a: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """A diagonal scan's chunk h (B, T_local, D), run from zero (rank 0: from h0), corrected
    by the state entering the chunk: h_t + (a_t ... a_0) carry. a: (B, T_local, D) the decays
    (0 at resets). Returns h in the accumulation dtype."""
    acc = acc_dtype(h)
    a = a.to(acc)
    carry, _, h = carry_in(a.prod(dim=1), h[:, -1].to(acc), cp, h)
    return h.to(acc) + torch.cumprod(a, dim=1) * carry.unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# The distributed linear solve without autograd (Newton's inner solves and adjoints):
# y_t = j_t y_{t-1} + b_t across all ranks. "diagonal": j, b (B, T_local, D);
# "block2": j (B, T_local, D, 2, 2), b (B, T_local, D, 2).
# ---------------------------------------------------------------------------------------------

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


def scan_across(local_scan, j, b, structure, cp: ContextParallel, reverse: bool = False) -> torch.Tensor:
    """y_t = j_t y_{t-1} + b_t over the whole split sequence from a zero state (reverse:
    y_t = j_t y_{t+1} + b_t, zero after the end). local_scan(j, b, h0) runs one chunk with the
    caller's backend; it is called twice: the chunk from zero, then the incoming carry's share
    (the same scan with b = 0 from the carry)."""
    rank, size = cp.rank, cp.size
    pos = size - 1 - rank if reverse else rank  # this chunk's place in scan order
    if reverse:
        j, b = j.flip(1), b.flip(1)
    y = local_scan(j, b, None)
    prod = _chunk_product(j, structure)
    gathered = all_gather(torch.cat([prod.flatten(1), y[:, -1].flatten(1)], dim=1), cp)
    if reverse:
        gathered = gathered.flip(0)
    prods = gathered[..., :prod[0].numel()].reshape(size, *prod.shape)
    ends = gathered[..., prod[0].numel():].reshape(size, *y[:, -1].shape)
    carry = torch.zeros_like(y[:, -1])
    for k in range(pos):  # the states of the chunks before this one, folded in order
        carry = _apply(prods[k], carry, structure) + ends[k]
    if pos > 0:
        if structure == "diagonal":
            y = y + torch.cumprod(j, dim=1) * carry.unsqueeze(1)
        else:
            y = y + local_scan(j, torch.zeros_like(b), carry)
    return y.flip(1) if reverse else y


# ---------------------------------------------------------------------------------------------
# Halo exchange: the steps just before this rank's chunk (conv1d, sliding-window attention).
# ---------------------------------------------------------------------------------------------

class _ShiftToNext(torch.autograd.Function):
    """Rank r gets rank r - 1's t (zeros on rank 0); the gradient goes back to rank r - 1."""

    @staticmethod
    def forward(ctx, t, cp):
        ctx.cp = cp
        return shift(t, cp)

    @staticmethod
    def backward(ctx, g):
        return shift(g, ctx.cp, to_next=False), None


def hops(width: int, T_local: int) -> int:
    """Exchanges needed for a halo of width - 1 steps: more than one when chunks are shorter."""
    return math.ceil((width - 1) / T_local)


def halo(x: torch.Tensor, width: int, cp: ContextParallel) -> torch.Tensor:
    """The (width - 1) time steps just before this rank's chunk: (B, width - 1, ...).

    x: (B, T_local, ...). Zeros before the start of the sequence (on rank 0, and on the
    first ranks when T_local < width - 1: then the halo spans several earlier ranks and is
    passed on hop by hop). Differentiable: the gradient flows back to the ranks it came from.
    """
    if width < 1 or x.dim() < 2 or x.shape[1] < 1:
        raise ValueError(f"halo: expected width >= 1 and x (B, T_local >= 1, ...); "
                         f"got width={width}, x {tuple(x.shape)}")
    n = width - 1
    out = x.new_zeros(x.shape[0], n, *x.shape[2:])
    if n == 0:
        return out
    for _ in range(hops(width, x.shape[1])):  # each hop reaches T_local steps further back
        out = _ShiftToNext.apply(torch.cat([out, x], dim=1)[:, -n:], cp)
    return out


def halo_valid(reset: torch.Tensor | None, width: int, cp: ContextParallel, device) -> torch.Tensor | None:
    """(B, width - 1) bool: which halo steps may be seen from this chunk's start, i.e. lie
    inside the sequence and no document starts after them (before the chunk). A reset AT the
    chunk start is the local reset[:, 0], which the ops handle themselves. None when reset is
    None (then only the steps before the sequence are invalid: see halo_inside).

    Codes passed along: 1 reset, 0 no reset, -1 before the sequence.
    """
    B, T = reset.shape
    n = width - 1
    codes = torch.full((B, n), -1, dtype=torch.int32, device=device)
    local = reset.to(torch.int32)
    for _ in range(hops(width, T)):
        codes = shift(torch.cat([codes, local], dim=1)[:, -n:], cp,
                      edge=torch.full((B, n), -1, dtype=torch.int32, device=device))
    starts = (codes == 1).to(torch.int32)
    later = starts.flip(1).cumsum(1).flip(1) - starts  # resets after each halo step
    return (codes >= 0) & (later == 0)


def halo_inside(B: int, T_local: int, width: int, cp: ContextParallel, device) -> torch.Tensor:
    """(B, width - 1) bool without documents: a halo step is valid iff it lies inside the sequence."""
    n = width - 1
    pos = cp.rank * T_local - n + torch.arange(n, device=device)
    return (pos >= 0).expand(B, n)
