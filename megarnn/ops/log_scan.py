"""A diagonal linear scan of positive terms computed in log space (Feng et al. 2024, "Were RNNs All
We Needed?", sec. 3 and appendix B): the recurrence under minGRU and minLSTM.

    h_t = a_t h_{t-1} + b_t,    a_t = exp(log_a_t) in (0, 1],  b_t = exp(log_b_t) > 0

given log_a, log_b (B, T, D). The paper's parallel form (Heinsen's sequence) is

    log h_t = a*_t + logcumsumexp_{s <= t}(log_b_s - a*_s),    a*_t = sum_{u <= t} log_a_u

(with log h_0 as the first term when there is an initial state). A document reset at t drops
h_{t-1} (h_t = b_t: a_t = 0, log_a_t = -inf).

Backends:
  "reference"  the textbook loop h_t = a_t h_{t-1} + b_t, one step at a time in linear space, the
               judge for the other backend.
  "torch"      the paper's form, in chunks of `chunk_size` steps cut further at every reset into
               pieces: each piece is laid out on a row of its own and scanned from zero with one
               cumsum and one torch.logcumsumexp along the rows (no reset inside a piece, so no
               -inf enters a* and no inf - inf; a row's padding after the piece is log_b = -inf).
               Pieces are short (<= chunk_size) so a* spans at most chunk_size steps: the form
               computes log h as a* plus a logcumsumexp of about -a*, which loses about |a*| x eps
               absolute in log h; short pieces bound that loss (the whole-sequence form loses
               |a*| ~ 0.7 T eps at z = 1/2). The state entering a chunk then enters as an extra
               term, in linear space: h_t += exp(sum of log_a over the chunk through t) carry, the
               sum -inf from the chunk's first reset on, passed from chunk to chunk by a loop over
               the T / chunk_size chunks. The initial state h0 is the carry into the first chunk,
               so it may be zero or even negative (log h0 is never taken). A custom op
               (megarnn::log_scan_torch, one node under torch.compile) whose backward is the
               recurrence's adjoint in linear space (below, at the op). The number of pieces
               depends on where the resets fall: one host sync per call (nonzero), inside the op.
  "triton"     the same recurrence in linear space on the linear scan's Triton kernel
               (megarnn.ops.linear_scan): a = exp(log_a) (0 at a reset), b = exp(log_b). The log
               form exists for a parallel prefix over the whole sequence; the kernel runs the
               recurrence step by step within a tile and combines tiles and chunks by the same
               linear carry, and with a in [0, 1] and b > 0 nothing cancels. Gradients go through
               the exps (dlog_a = a da, dlog_b = b db); context parallelism is linear_scan's.
               backend=None still picks "torch" (the kernels run where model.scan_backend=triton).

Context parallelism (megarnn/ops/context.py): each rank scans its chunk from zero (rank 0 from
h0) and adds the carry from earlier ranks as the same extra term, through
context.diagonal_carry (a = exp(log_a), 0 at resets), in float32 (float64 for float64 inputs).

Everything accumulates in float32 (float64 for float64 inputs); the output is in log_b's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megarnn.ops import context
from megarnn.ops.scan import _scan, check_backend, linear_scan, resolve_split

# Steps per chunk. Measured (tests/ops/test_log_scan.py inputs, fp32 h against fp64): 1.8e-6 at 32,
# 3.2e-6 at 64; with gates of about -40 per step 1.6e-5 at 32, 4.1e-5 at 64; as fast on CPU.
CHUNK = 32


def log_linear_scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor | None = None,
                    reset: torch.Tensor | None = None, chunk_size: int = CHUNK, backend: str | None = None,
                    cp=None) -> torch.Tensor:
    """h_t = exp(log_a_t) h_{t-1} + exp(log_b_t), h_t = exp(log_b_t) at a reset.

    log_a, log_b: (B, T, D), log_a <= 0; h0: (B, D) or None (zeros); reset: (B, T) bool.
    Returns h (B, T, D) in log_b's dtype (h[:, -1] is the state to pass on). cp: context
    parallelism: log_a, log_b, reset are this rank's chunk, h0 the state before the whole
    sequence (read on rank 0).
    """
    if log_a.shape != log_b.shape or log_a.dim() != 3:
        raise ValueError(f"log_linear_scan: log_a and log_b must both be (B, T, D); got {tuple(log_a.shape)} "
                         f"and {tuple(log_b.shape)}")
    B, T, D = log_b.shape
    if h0 is not None and h0.shape != (B, D):
        raise ValueError(f"log_linear_scan: h0 must be (B, D) = {(B, D)}; got {tuple(h0.shape)}")
    if reset is not None and reset.shape != (B, T):
        raise ValueError(f"log_linear_scan: reset must be (B, T) = {(B, T)} bool; got {tuple(reset.shape)}")
    check_backend(backend, "log_linear_scan")
    if backend == "triton":
        acc = context.acc_dtype(log_b)
        a = torch.exp(log_a.to(acc))
        if reset is not None:
            a = a * ~reset[..., None]
        h0 = None if h0 is None else h0.to(acc)
        return linear_scan(a, torch.exp(log_b.to(acc)), h0, backend="triton", cp=cp).to(log_b.dtype)
    backend = backend or "torch"
    split = resolve_split(cp)
    if split is not None:
        first = h0 if split.rank == 0 or h0 is None else h0 * 0  # a zero gradient off rank 0
        h = log_linear_scan(log_a, log_b, first, reset, chunk_size, backend, cp=False)
        a = torch.exp(log_a.to(context.acc_dtype(log_b)))
        if reset is not None:
            a = a * ~reset[..., None]
        return context.diagonal_carry(h, a, split).to(log_b.dtype)
    acc = context.acc_dtype(log_b)
    log_a, log_b = log_a.to(acc), log_b.to(acc)
    h0 = None if h0 is None else h0.to(acc)
    if backend == "reference" or T == 1:  # one step (decoding): the recurrence itself
        h = _reference(log_a, log_b, h0, reset)
    else:
        h = _log_scan_torch_op(log_a, log_b, log_b.new_zeros(B, D) if h0 is None else h0, reset, chunk_size)
    return h.to(log_b.dtype)


def _reference(log_a, log_b, h, reset):
    """The recurrence one step at a time, in linear space."""
    B, T, D = log_b.shape
    h = log_b.new_zeros(B, D) if h is None else h
    out = []
    for t in range(T):
        a = torch.exp(log_a[:, t])
        if reset is not None:
            a = a * ~reset[:, t, None]
        h = a * h + torch.exp(log_b[:, t])
        out.append(h)
    return torch.stack(out, 1)


# The torch backend is a custom op with its backward registered (torch.compile sees one node each
# way; the pieces' data-dependent count never reaches dynamo). The backward is the adjoint of the
# recurrence in linear space, g_t = dh_t + a_{t+1} g_{t+1} (a reverse linear scan, 0 across a
# reset; linear_scan's own loop / chunked form), then dlog_b = g b, dlog_a = g a h_{t-1}, dh0 = a_1 g_1:
# the same gradients as autograd through the log-space form, in two scans instead of two more
# logcumsumexps.

@torch.library.custom_op("megarnn::log_scan_torch", mutates_args=())
def _log_scan_torch_op(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor | None,
                       chunk_size: int) -> torch.Tensor:
    """All in the accumulation dtype: h (B, T, D)."""
    with torch.no_grad():  # contiguous, as the fake says (the padded form's slice is not)
        return _chunked(log_a, log_b, h0, reset, chunk_size).contiguous()


@_log_scan_torch_op.register_fake
def _(log_a, log_b, h0, reset, chunk_size):
    return log_b.new_empty(log_b.shape)


def _decays(log_a, reset):
    a = torch.exp(log_a)
    return a * ~reset[..., None] if reset is not None else a


@torch.library.custom_op("megarnn::log_scan_torch_bwd", mutates_args=())
def _log_scan_torch_bwd_op(log_a: torch.Tensor, log_b: torch.Tensor, h: torch.Tensor, h0: torch.Tensor,
                           reset: torch.Tensor | None, dh: torch.Tensor) -> list[torch.Tensor]:
    B, T, D = h.shape
    a = _decays(log_a, reset)
    a_next = torch.cat([a[:, 1:], a.new_zeros(B, 1, D)], dim=1)
    g = _scan(a_next.flip(1), dh.to(h.dtype).flip(1), h.new_zeros(B, D)).flip(1)
    h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
    return [(g * a * h_prev).contiguous(), (g * torch.exp(log_b)).contiguous(), (a[:, 0] * g[:, 0]).contiguous()]


@_log_scan_torch_bwd_op.register_fake
def _(log_a, log_b, h, h0, reset, dh):
    return [log_a.new_empty(log_a.shape), log_b.new_empty(log_b.shape), h0.new_empty(h0.shape)]


def _log_scan_setup(ctx, inputs, output):
    log_a, log_b, h0, reset, _ = inputs
    ctx.save_for_backward(log_a, log_b, output, h0, reset)


def _log_scan_backward(ctx, dh):
    log_a, log_b, h, h0, reset = ctx.saved_tensors
    dlog_a, dlog_b, dh0 = _log_scan_torch_bwd_op(log_a, log_b, h, h0, reset, dh)
    return dlog_a, dlog_b, dh0, None, None


_log_scan_torch_op.register_autograd(_log_scan_backward, setup_context=_log_scan_setup)


def _chunked(log_a, log_b, h0, reset, Q):
    B, T, D = log_b.shape
    Q = max(1, min(Q, T))
    pad = (-T) % Q
    if reset is None:
        reset = torch.zeros(B, T, dtype=torch.bool, device=log_b.device)
    if pad:  # log_a = 0, log_b = -inf after the end: the state passes unchanged
        log_a = F.pad(log_a, (0, 0, 0, pad))
        log_b = F.pad(log_b, (0, 0, 0, pad), value=float("-inf"))
        reset = F.pad(reset, (0, pad))
    nc = log_b.shape[1] // Q
    local = torch.exp(_pieces(log_a, log_b, reset, Q)).view(B, nc, Q, D)  # each chunk from zero
    # exp(sum of log_a from the chunk start through l): what the entering state is multiplied by;
    # 0 from the chunk's first reset on (a reset's log_a is -inf: nothing before it gets through).
    through = torch.exp(torch.cumsum(log_a.masked_fill(reset[..., None], float("-inf")).view(B, nc, Q, D), dim=2))
    state = h0
    carries = []
    for c in range(nc):
        carries.append(state)
        state = through[:, c, -1] * state + local[:, c, -1]
    h = local + through * torch.stack(carries, 1)[:, :, None]
    return h.reshape(B, nc * Q, D)[:, :T]


def _pieces(log_a, log_b, reset, Q):
    """log of the scan from zero restarted at every chunk start and every reset: (B, T, D), T a
    multiple of Q. Every piece (a run of steps without a restart, at most Q long) goes to a row of
    its own, starting at column 0, and is scanned there in the paper's form."""
    B, T, D = log_b.shape
    pos = torch.arange(T, device=log_b.device)
    starts = (reset | (pos % Q == 0)).flatten()  # (B T,)
    piece = torch.cumsum(starts.to(torch.int64), 0) - 1
    first = starts.nonzero().squeeze(1)  # flat position of each piece's first step (a host sync)
    col = torch.arange(B * T, device=log_b.device) - first[piece]
    n = first.shape[0]
    # A piece's first step scans from zero, so its own decay never matters: 0 keeps a* finite.
    la = log_a.flatten(0, 1).masked_fill(starts[:, None], 0.0)
    rows_a = log_a.new_zeros(n, Q, D).index_put((piece, col), la)
    rows_b = log_b.new_full((n, Q, D), float("-inf")).index_put((piece, col), log_b.flatten(0, 1))
    a_star = torch.cumsum(rows_a, dim=1)
    # along the last, contiguous dim: torch's CPU logcumsumexp is about 2x faster there
    lcse = torch.logcumsumexp((rows_b - a_star).transpose(1, 2).contiguous(), dim=-1).transpose(1, 2)
    log_h = a_star + lcse
    return log_h[piece, col].view(B, T, D)
