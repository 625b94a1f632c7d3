"""SSD, the state-space scan of Mamba2 (Dao & Gu 2024, "Transformers are SSMs", sec. 6).

Per head h (P channels, state N), with B_t, C_t read from group h // (H // G):
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: (P, N)
    y_t = S_t C_t + D_h x_t
A document reset at t drops S_{t-1} (the state restarts from zero).

Backends:
  "reference"  the textbook loop above; the judge for every other backend.
  "torch"      the chunked algorithm: inside each chunk of Q steps the output is a masked
               (Q x Q) matrix product (the "attention-like" diagonal block); chunk states
               are passed from chunk to chunk by a short loop (T / Q steps). Resets enter
               as masks on which segments of decay may be crossed, never as -inf logs, so
               no log-space subtraction loses precision.
  "triton"     kernels/ssd.py (megarnn_kernels.ssd): the same chunked algorithm as Triton matmul
               kernels, forward and backward (the backward recomputes the chunk states from the
               inputs, so only the inputs are saved). The default on CUDA tensors; on CPU only
               when asked for, under Triton's interpreter (TRITON_INTERPRET=1), for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megarnn.ops import context
from megarnn.ops.scan import NO_GRAD, check_backend, linear_scan, load_kernels, resolve_split


def ssd_scan(x, dt, A, B, C, D=None, chunk_size: int = 64, initial_state=None, reset=None,
             backend: str | None = None, cp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, T, H, P); dt: (B, T, H) > 0; A: (H,) < 0; B, C: (B, T, G, N); D: (H,) or None;
    initial_state: (B, H, P, N); reset: (B, T) bool -> y: (B, T, H, P), final state (B, H, P, N).

    Accumulates in float32 (float64 for float64 inputs); y has the dtype of x. backend=None picks
    "triton" for CUDA tensors and "torch" elsewhere. cp: context parallelism
    (megarnn/ops/context.py): x, dt, B, C, reset are this rank's chunk; initial_state is read on
    rank 0; the final state returned is the WHOLE sequence's, the same on every rank (if a loss
    reads it, read it on one rank).
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if dt.shape != (b, T, H) or A.shape != (H,) or B.shape != C.shape or B.shape[:2] != (b, T) or H % G:
        raise ValueError(f"ssd_scan: expected x (B,T,H,P), dt (B,T,H), A (H,), B = C (B,T,G,N) with H % G == 0; "
                         f"got x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}")
    check_backend(backend, "ssd_scan")
    backend = backend or ("triton" if x.is_cuda else "torch")
    split = resolve_split(cp)
    if split is not None:
        return _split_ssd(x, dt, A, B, C, D, chunk_size, initial_state, reset, backend, split)
    if backend == "triton":
        _check_state_and_reset(initial_state, reset, b, T, H, P, N)
        return _ssd_triton_op(x, dt, A, B, C, D, initial_state, reset, chunk_size)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s0 = x.new_zeros(b, H, P, N, dtype=acc) if initial_state is None else initial_state.to(acc)
    if backend == "reference" or T == 1:
        rep = H // G
        Bh = B.to(acc).repeat_interleave(rep, dim=2)  # (b, T, H, N)
        Ch = C.to(acc).repeat_interleave(rep, dim=2)
        y, state = _ssd_reference(x.to(acc), dt.to(acc), A.to(acc), Bh, Ch, s0, reset)
    else:  # B, C stay per group: the chunked form computes C.B^T once per group
        y, state = _ssd_chunked(x.to(acc), dt.to(acc), A.to(acc), B.to(acc), C.to(acc), s0, reset, chunk_size)
    if D is not None:
        y = y + D.to(acc)[:, None] * x.to(acc)
    return y.to(x.dtype), state


def _split_ssd(x, dt, A, B, C, D, chunk_size, initial_state, reset, backend, cp):
    """ssd_scan of this rank's chunk under context parallelism: the chunk from zero (rank 0
    from initial_state) with `backend`, then y_t += decay(chunk start..t) C_t . carry until the
    chunk's first reset, with the carry folded from the earlier ranks' (decay through the
    chunk (B, H), final state (B, H, P, N))."""
    acc = context.acc_dtype(x)
    y, state = ssd_scan(x, dt, A, B, C, D, chunk_size, initial_state if cp.rank == 0 else None, reset,
                        backend=backend, cp=False)
    decay = torch.exp(torch.cumsum(dt.to(acc) * A.to(acc), dim=1))  # (b, T_local, H) from the chunk start
    if reset is not None:
        decay = decay * (torch.cumsum(reset.to(torch.int32), dim=1) == 0).unsqueeze(-1).to(acc)
    carry, final, y = context.carry_in(decay[:, -1, :, None, None], state.to(acc), cp, y)
    H = decay.shape[2]
    Ch = C.to(acc).repeat_interleave(H // C.shape[2], dim=2)  # (b, T_local, H, N)
    # The same graph on every rank (rank 0 adds a zero carry), so backward passes match.
    y = (y.to(acc) + torch.einsum("bthn,bhpn,bth->bthp", Ch, carry, decay)).to(x.dtype)
    return y, final


def _ssd_reference(x, dt, A, B, C, state, reset):
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)  # (b, H)
        if reset is not None:
            decay = decay * ~reset[:, t, None]
        state = decay[..., None, None] * state + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, 1), state


def _ssd_chunked(x, dt, A, B, C, state, reset, Q):
    """The chunked algorithm. x (b, T, H, P), dt (b, T, H), A (H,), B and C per GROUP (b, T, G, N),
    state (b, H, P, N). Heads are laid out (G, rep) (head h = g * rep + r), so B and C broadcast over
    a group's heads and C_l.B_s is computed once per group, not once per head. The only 5-D tensors
    are the (b, c, G, rep, Q, Q) decay matrix, built in place, and its product with the scores."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    rep = H // G
    pad = (-T) % Q
    if reset is None:
        reset = torch.zeros(b, T, dtype=torch.bool, device=x.device)
    # dt = 0 on padding: decay 1 and no input, so the final state is unchanged. (Compiled, lengths
    # that are multiples of Q share one graph and the others another: the slice back to T below is
    # contiguous or not.)
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        reset = F.pad(reset, (0, pad))
    nc = x.shape[1] // Q
    # Heads split as (G, r) and time after them: (b, c, G, r, l, ...), the layout of the matmuls.
    x = x.reshape(b, nc, Q, G, rep, P).permute(0, 1, 3, 4, 2, 5)
    dt = dt.reshape(b, nc, Q, G, rep).permute(0, 1, 3, 4, 2)
    B, C = (t.reshape(b, nc, Q, G, N).transpose(2, 3) for t in (B, C))  # (b, c, G, l, N)
    seg = torch.cumsum(reset.reshape(b, nc, Q).to(torch.int32), dim=2)  # resets so far in the chunk
    xdt = (x * dt[..., None]).contiguous()  # (b, c, G, r, l, P)
    Acs = torch.cumsum(dt * A.reshape(G, rep, 1), dim=-1)  # (b, c, G, r, l): log decay from the chunk start
    seg = seg[:, :, None, None]  # (b, c, 1, 1, l)

    # 1. Inside a chunk: y_l += sum_{s <= l, same segment} C_l.B_s exp(Acs_l - Acs_s) xdt_s.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same = causal & (seg[..., :, None] == seg[..., None, :])  # (b, c, 1, 1, l, s)
    L = (Acs[..., :, None] - Acs[..., None, :]).masked_fill_(~same, float("-inf")).exp_()
    scores = (C @ B.transpose(-1, -2)).unsqueeze(3)  # (b, c, G, 1, l, s): once per group
    y = (L * scores) @ xdt  # (b, c, G, r, l, P)

    # 2. What each chunk adds to the state by its end (inputs after the chunk's last reset).
    to_end = torch.exp(Acs[..., -1:] - Acs) * (seg == seg[..., -1:])  # (b, c, G, r, l)
    chunk_states = (xdt * to_end[..., None]).transpose(-1, -2) @ B.unsqueeze(3)  # (b, c, G, r, P, N)

    # 3. Pass states from chunk to chunk; a chunk with a reset lets nothing through. A diagonal
    # linear scan over the chunks (the torch backend's custom op: no loop for torch.compile to unroll).
    through = torch.exp(Acs[..., -1]) * (seg[..., -1] == 0)  # (b, c, G, r)
    E = H * P * N
    ends = linear_scan(through[..., None, None].expand(b, nc, G, rep, P, N).reshape(b, nc, E),
                       chunk_states.reshape(b, nc, E), state.reshape(b, E), backend="torch", cp=False)
    starts = torch.cat([state.reshape(b, 1, E), ends[:, :-1]], dim=1).reshape(b, nc, G, rep, P, N)
    state = ends[:, -1]

    # 4. The incoming state's share of each output, until the chunk's first reset.
    from_start = torch.exp(Acs) * (seg == 0)  # (b, c, G, r, l)
    y = y + (C.unsqueeze(3) @ starts.transpose(-1, -2)) * from_start[..., None]  # (b, c, G, r, l, P)
    y = y.permute(0, 1, 4, 2, 3, 5)  # (b, c, l, G, r, P)
    return y.reshape(b, nc * Q, H, P)[:, :T], state.reshape(b, H, P, N)


def _check_state_and_reset(initial_state, reset, b, T, H, P, N):
    if initial_state is not None and initial_state.shape != (b, H, P, N):
        raise ValueError(f"ssd_scan: initial_state must be (B, H, P, N) = {(b, H, P, N)}; "
                         f"got {tuple(initial_state.shape)}")
    if reset is not None and reset.shape != (b, T):
        raise ValueError(f"ssd_scan: reset must be (B, T) = {(b, T)} bool; got {tuple(reset.shape)}")


def _ssd_kernels(t: torch.Tensor):
    """megarnn_kernels.ssd, or a ValueError saying why backend="triton" cannot run on t's device
    (the same check as linear_scan's, plus this module's own interpreter flag)."""
    return load_kernels(t, "ssd_scan", "ssd")


@torch.library.custom_op("megarnn::ssd_triton", mutates_args=())
def _ssd_triton_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, initial_state: torch.Tensor | None, reset: torch.Tensor | None,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "triton" backend: ssd_scan's arguments -> (y (B, T, H, P) in x's dtype, final state
    (B, H, P, N) in fp32 / fp64). Saves only the inputs; the backward recomputes the states."""
    return _ssd_kernels(x).ssd_fwd(x, dt, A, B, C, chunk_size, D, initial_state, reset)


@_ssd_triton_op.register_fake
def _(x, dt, A, B, C, D, initial_state, reset, chunk_size):
    b, T, H, P = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty(b, H, P, B.shape[3], dtype=acc)


@torch.library.custom_op("megarnn::ssd_triton_bwd", mutates_args=())
def _ssd_triton_bwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, initial_state: torch.Tensor | None, reset: torch.Tensor | None,
                       chunk_size: int, dy: torch.Tensor, dstate: torch.Tensor | None) -> list[torch.Tensor]:
    grads = _ssd_kernels(x).ssd_bwd(x, dt, A, B, C, chunk_size, D, initial_state, reset, dy, dstate)
    return [NO_GRAD.clone() if g is None else g for g in grads]


@_ssd_triton_bwd_op.register_fake
def _(x, dt, A, B, C, D, initial_state, reset, chunk_size, dy, dstate):
    return [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (x, dt, A, B, C, D, initial_state)]


def _ssd_triton_setup(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, reset, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, reset)
    ctx.chunk_size = chunk_size
    ctx.has = (D is not None, initial_state is not None)
    ctx.set_materialize_grads(False)  # an unused final state costs nothing in the backward


def _ssd_triton_backward(ctx, dy, dstate):
    x, dt, A, B, C, D, initial_state, reset = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, ds0 = _ssd_triton_bwd_op(x, dt, A, B, C, D, initial_state, reset, ctx.chunk_size,
                                                      dy, dstate)
    return dx, ddt, dA, dB, dC, dD if ctx.has[0] else None, ds0 if ctx.has[1] else None, None, None


_ssd_triton_op.register_autograd(_ssd_triton_backward, setup_context=_ssd_triton_setup)
