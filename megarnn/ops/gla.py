"""Gated linear attention (GLA; Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), with the conventions of flash-linear-attention's chunk_gla /
naive_recurrent_gla.

Per head, a matrix state S (K, V) with a data-dependent forget gate per key channel:
    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t          gk_t <= 0 (log of the gate)
    o_t = scale q_t S_t                                  scale: K^-0.5 unless given
A document reset at t drops S_{t-1} (the state restarts from zero).

Backends:
  "reference"  the textbook loop above; the judge for every other backend.
  "torch"      the chunked algorithm: inside each chunk of Q steps the output is a masked (Q x Q)
               matrix product; chunk states pass from chunk to chunk by a short loop (T / Q steps).
               The gate is per channel, so q_i . k_j exp(b_i - b_j) (b: the cumulative log gate from
               the chunk start) does not factor into one matmul without exp(-b_j), which overflows
               for strong gates. As fla does ("secondary chunking"), a chunk is cut into
               sub-chunks of `SUBCHUNK` steps: pairs in different sub-chunks factor through the
               row sub-chunk's first position r, (q_i exp(b_i - r)) . (k_j exp(r - b_j)), both
               factors <= 1; pairs inside one sub-chunk take the exact (s, s, K) product. Resets
               enter as masks on which pairs may see each other, never as -inf logs.
  "triton"     kernels/gla.py (megarnn_kernels.gla): the same chunked algorithm as Triton kernels
               (chunk states passed chunk to chunk, the sub-chunked intra-chunk scores, the output),
               forward and backward (the backward recomputes the chunk states from the saved inputs;
               megarnn::gla_triton / gla_triton_bwd). CUDA tensors, or CPU under Triton's
               interpreter (TRITON_INTERPRET=1) for tests. backend=None still picks "torch" (the
               kernels have not been run on a GPU yet).

Context parallelism (megarnn/ops/context.py): each rank runs its chunk from zero (rank 0 from
initial_state), gathers (decay through the chunk (B, H, K, 1), last state (B, H, K, V)) with
carry_in, and adds scale (q_t * exp(cumulative gk from the chunk start)) carry to its outputs until
the chunk's first reset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megarnn.ops import context
from megarnn.ops.scan import NO_GRAD, check_backend, load_kernels, resolve_split

SUBCHUNK = 16


def gla(q, k, v, gk, initial_state=None, reset=None, scale: float | None = None, chunk_size: int = 64,
        backend: str | None = None, cp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, T, H, K); v: (B, T, H, V); gk: (B, T, H, K) log forget gate (<= 0);
    initial_state: (B, H, K, V) or None; reset: (B, T) bool -> o (B, T, H, V) in v's dtype, final
    state (B, H, K, V) in float32 (float64 for float64 inputs).

    Accumulates in float32 (float64 for float64 inputs). cp: context parallelism: q, k, v, gk,
    reset are this rank's chunk; initial_state is read on rank 0; the final state returned is the
    whole sequence's, the same on every rank.
    """
    b, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or gk.shape != q.shape or v.shape[:3] != (b, T, H):
        raise ValueError(f"gla: expected q = k = gk (B,T,H,K) and v (B,T,H,V); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, gk {tuple(gk.shape)}, v {tuple(v.shape)}")
    if initial_state is not None and initial_state.shape != (b, H, K, V):
        raise ValueError(f"gla: initial_state must be (B, H, K, V) = {(b, H, K, V)}; got {tuple(initial_state.shape)}")
    if reset is not None and reset.shape != (b, T):
        raise ValueError(f"gla: reset must be (B, T) = {(b, T)} bool; got {tuple(reset.shape)}")
    check_backend(backend, "gla")
    backend = backend or "torch"
    scale = K ** -0.5 if scale is None else scale
    split = resolve_split(cp)
    if split is not None:
        return _split_gla(q, k, v, gk, initial_state, reset, scale, chunk_size, backend, split)
    if backend == "triton":
        if not torch.compiler.is_compiling():  # say early why it cannot run (the op checks again)
            _gla_kernels(v)
        return _gla_triton_op(q, k, v, gk, initial_state, reset, float(scale), chunk_size)
    acc = context.acc_dtype(v)
    q, k, v, gk = (t.to(acc) for t in (q, k, v, gk))
    s0 = v.new_zeros(b, H, K, V) if initial_state is None else initial_state.to(acc)
    if backend == "reference" or T == 1:
        o, state = _gla_reference(q * scale, k, v, gk, s0, reset)
    else:
        o, state = _gla_chunked(q * scale, k, v, gk, s0, reset, chunk_size)
    return o.to(v.dtype), state


def _split_gla(q, k, v, gk, initial_state, reset, scale, chunk_size, backend, cp):
    acc = context.acc_dtype(v)
    first = initial_state if cp.rank == 0 or initial_state is None else initial_state * 0
    o, state = gla(q, k, v, gk, first, reset, scale, chunk_size, backend=backend, cp=False)
    logdecay = torch.cumsum(gk.to(acc), dim=1)  # (b, T_local, H, K) from the chunk start
    decay = torch.exp(logdecay)
    if reset is not None:
        decay = decay * (torch.cumsum(reset.to(torch.int32), dim=1) == 0)[:, :, None, None].to(acc)
    carry, final, o = context.carry_in(decay[:, -1, :, :, None], state.to(acc), cp, o)
    # The same graph on every rank (rank 0 adds a zero carry), so the backward passes match.
    o = o.to(acc) + torch.einsum("bthk,bhkv->bthv", q.to(acc) * decay, carry) * scale
    return o.to(v.dtype), final


def _gla_reference(q, k, v, gk, state, reset):
    """q already scaled. The loop over t, in the accumulation dtype."""
    outs = []
    for t in range(q.shape[1]):
        decay = torch.exp(gk[:, t])  # (b, H, K)
        if reset is not None:
            decay = decay * ~reset[:, t, None, None]
        state = decay[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, 1), state


def _gla_chunked(q, k, v, gk, state, reset, Q):
    """q already scaled; all in the accumulation dtype. q, k, gk (b, T, H, K), v (b, T, H, V),
    state (b, H, K, V) -> o (b, T, H, V), final state."""
    b, T, H, K = q.shape
    V = v.shape[-1]
    Q = max(1, min(Q, T))
    s = min(SUBCHUNK, Q)
    Q = (Q + s - 1) // s * s  # a whole number of sub-chunks
    pad = (-T) % Q
    if reset is None:
        reset = torch.zeros(b, T, dtype=torch.bool, device=q.device)
    if pad:  # gk = 0, k = 0 on padding: the state passes unchanged
        q, k, v, gk = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, gk))
        reset = F.pad(reset, (0, pad))
    nc, n = q.shape[1] // Q, Q // s
    # (b, H, c, l, .): chunks and positions after the heads.
    q, k, v, gk = (t.reshape(b, nc, Q, H, t.shape[-1]).permute(0, 3, 1, 2, 4) for t in (q, k, v, gk))
    seg = torch.cumsum(reset.reshape(b, nc, Q).to(torch.int32), dim=2)[:, None]  # (b, 1, c, l)
    pos = torch.arange(Q, device=q.device)
    causal = pos[:, None] >= pos[None, :]
    same = causal & (seg[..., :, None] == seg[..., None, :])  # (b, 1, c, l, j)
    # Every log decay below is a direct sum of gates over the steps it spans (never a difference of
    # two long cumulative sums, which would lose digits in float32 when the gates are strong).
    qs, ks, gs = (t.reshape(b, H, nc, n, s, K) for t in (q, k, gk))
    inside = torch.cumsum(gs, dim=4)  # (b, H, c, n, s, K): from the sub-chunk start through i
    after = _suffix(gs, dim=4)  # from after j to the sub-chunk end
    m = torch.arange(n, device=q.device)
    between = (m[None, None, :] > m[None, :, None]) & (m[None, None, :] < m[:, None, None])  # (m, m', p)
    between = torch.einsum("mqp,bhcpk->bhcmqk", between.to(gk.dtype), inside[..., -1, :])

    # 1. Pairs in different sub-chunks (j in m' < m, the row's sub-chunk): through the step r just
    # before sub-chunk m, (q_i exp(g_i - g_r)) . (k_j exp(g_r - g_j)), both exponents <= 0.
    # (None with one sub-chunk per chunk.)
    A = None
    if n > 1:
        cross = (after[:, :, :, None] + between[..., None, :]).masked_fill(
            ~(m[None, :] < m[:, None])[:, :, None, None], float("-inf")).reshape(b, H, nc, n, Q, K)
        A = ((qs * torch.exp(inside)) @ (k[:, :, :, None] * torch.exp(cross)).transpose(-1, -2)).reshape(b, H, nc, Q, Q)

    # 2. Pairs inside one sub-chunk: the exact product with decays exp(sum of gk over (j, i]) <= 1.
    tri = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    i = torch.arange(s, device=q.device)
    spans = (i[None, :, None] < i[None, None, :]) & (i[None, None, :] <= i[:, None, None])  # (i, j, l): j < l <= i
    rel = (spans.to(gk.dtype).reshape(s * s, s) @ gs).unflatten(-2, (s, s))  # (..., i, j, K), one matmul
    rel = rel.masked_fill(~tri[..., None], float("-inf"))
    diag = torch.einsum("bhcnik,bhcnjk,bhcnijk->bhcnij", qs, ks, torch.exp(rel))
    A = _blocks(diag, n, s) if A is None else A + _blocks(diag, n, s)
    o = (A * same) @ v  # (b, H, c, l, V)

    # 3. What each chunk adds to the state by its end (inputs after the chunk's last reset).
    last = seg[..., -1:]  # (b, 1, c, 1)
    to_end = torch.exp(_suffix(gk, dim=3)) * (seg == last)[..., None]  # (b, H, c, l, K)
    chunk_states = (k * to_end).transpose(-1, -2) @ v  # (b, H, c, K, V)
    g = torch.cumsum(gk, dim=3)  # (b, H, c, l, K): from the chunk start through l
    through = torch.exp(g[..., -1, :]) * (last == 0)  # (b, H, c, K)

    # 4. Pass states from chunk to chunk; the incoming state's share until the chunk's first reset.
    starts = []
    for c in range(nc):
        starts.append(state)
        state = through[:, :, c, :, None] * state + chunk_states[:, :, c]
    starts = torch.stack(starts, 2)  # (b, H, c, K, V)
    from_start = torch.exp(g) * (seg == 0)[..., None]  # (b, H, c, l, K)
    o = o + (q * from_start) @ starts
    o = o.permute(0, 2, 3, 1, 4).reshape(b, nc * Q, H, V)[:, :T]
    return o, state


def _suffix(x, dim):
    """sum of x over the positions after each one along dim (0 at the last), summed directly."""
    shifted = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)


def _blocks(diag, n, s):
    """(..., n, s, s) blocks -> (..., n s, n s) with them on the diagonal, zeros elsewhere."""
    lead = diag.shape[:-3]
    eye = torch.eye(n, dtype=diag.dtype, device=diag.device)  # (m, m')
    full = diag[..., :, :, None, :] * eye[:, None, :, None]  # (..., m, i, m', j)
    return full.reshape(*lead, n * s, n * s)


# --- the "triton" backend: a custom op (one opaque node for torch.compile) ---------------------

def _gla_kernels(t: torch.Tensor):
    """megarnn_kernels.gla, or a ValueError saying why backend="triton" cannot run on t's device."""
    return load_kernels(t, "gla", "gla")


@torch.library.custom_op("megarnn::gla_triton", mutates_args=())
def _gla_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
                   initial_state: torch.Tensor | None, reset: torch.Tensor | None, scale: float,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gla's "triton" backend -> (o (B, T, H, V) in v's dtype, final state (B, H, K, V) in fp32 / fp64)."""
    return _gla_kernels(v).gla_fwd(q, k, v, gk, scale, chunk_size, initial_state, reset)


@_gla_triton_op.register_fake
def _(q, k, v, gk, initial_state, reset, scale, chunk_size):
    b, T, H, K = q.shape
    return torch.empty_like(v), v.new_empty(b, H, K, v.shape[-1], dtype=context.acc_dtype(v))


@torch.library.custom_op("megarnn::gla_triton_bwd", mutates_args=())
def _gla_triton_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
                       initial_state: torch.Tensor | None, reset: torch.Tensor | None, scale: float,
                       chunk_size: int, do: torch.Tensor, dfinal: torch.Tensor | None) -> list[torch.Tensor]:
    """[dq, dk, dv, dgk, d initial_state] of megarnn::gla_triton (kernels/gla.py's backward, which
    recomputes the chunk states from the saved inputs)."""
    grads = _gla_kernels(v).gla_bwd(q, k, v, gk, scale, chunk_size, initial_state, reset, do, dfinal)
    return [NO_GRAD.clone() if g is None else g for g in grads]


@_gla_triton_bwd_op.register_fake
def _(q, k, v, gk, initial_state, reset, scale, chunk_size, do, dfinal):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gk),
            q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)]


def _gla_triton_setup(ctx, inputs, output):
    q, k, v, gk, initial_state, reset, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, gk, initial_state, reset)
    ctx.scale, ctx.chunk_size = scale, chunk_size
    ctx.has_s0 = initial_state is not None
    ctx.set_materialize_grads(False)  # an unused final state costs nothing in the backward


def _gla_triton_backward(ctx, do, dfinal):
    q, k, v, gk, initial_state, reset = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dgk, ds0 = _gla_triton_bwd_op(q, k, v, gk, initial_state, reset, ctx.scale, ctx.chunk_size,
                                              do, dfinal)
    return dq, dk, dv, dgk, ds0 if ctx.has_s0 else None, None, None, None


_gla_triton_op.register_autograd(_gla_triton_backward, setup_context=_gla_triton_setup)
