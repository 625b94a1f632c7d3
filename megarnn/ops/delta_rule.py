"""The gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), with the
conventions of flash-linear-attention's chunk_gated_delta_rule / naive_recurrent_gated_delta_rule.

Per head, a matrix state S (K, V), a scalar decay exp(g_t) and a write strength beta_t:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      g_t <= 0, beta_t in [0, 2]
    o_t = scale q_t S_t                                                     scale: K^-0.5 unless given
i.e. the state first decays, then the value it holds for k_t moves a fraction beta_t toward v_t
(beta > 1: negative eigenvalues of the transition, "DeltaNet with negative eigenvalues"). q and k
are expected L2-normalised (normalize_qk=True does it here, as fla's use_qk_l2norm_in_kernel).
A document reset at t drops S_{t-1}.

Backends:
  "reference"  the textbook loop above; the judge for every other backend.
  "torch"      the chunked WY form (DeltaNet paper, sec. 3; fla's chunk_gated_delta_rule): in a chunk
               of Q steps the pseudo-values u = T (beta v) and w = T (beta k exp(g_cum)) come from
               one unit-lower-triangular solve, T = (I + strictly_lower(beta K K^T * decay))^-1 (the
               UT transform), so every step's update is a matmul; from chunk to chunk the state moves
               as S <- M_c S + B_c with M_c (K, K). Pairwise decays are direct sums of g over the
               steps spanned (no difference of long cumulative sums), masked by the resets.
  "triton"     kernels/delta_rule.py (megarnn_kernels.delta_rule): the same chunked WY form as Triton
               kernels (the UT transform per chunk, the states passed chunk to chunk, the output).
               Forward only so far: the backward recomputes the chunked torch form under autograd
               from the saved inputs (megarnn::delta_triton_bwd). CUDA tensors, or CPU under
               Triton's interpreter (TRITON_INTERPRET=1) for tests. backend=None still picks "torch"
               (the kernels have not been run on a GPU yet).

Context parallelism: the outputs and the final state of a chunk are linear in the state entering it,
o = o_0 + E S_in, S_out = M S_in + S_0 (o_0, S_0: the chunk run from zero; E (T_local, K) and M (K, K):
the chunk run with v = 0 from the identity, which the same backend computes). Each rank gathers
every rank's (M, S_0), folds carry_{r+1} = M_r carry_r + S_r in rank order and adds E carry, with
autograd through the gather (the backward all-reduces the gradients of the summaries).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megarnn.ops import context
from megarnn.ops.scan import NO_GRAD, check_backend, load_kernels, resolve_split


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, reset=None, scale: float | None = None,
                     chunk_size: int = 64, backend: str | None = None, cp=None, normalize_qk: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H) log decay (<= 0); beta: (B, T, H);
    initial_state: (B, H, K, V) or None; reset: (B, T) bool -> o (B, T, H, V) in v's dtype, final
    state (B, H, K, V) in float32 (float64 for float64 inputs).

    normalize_qk: L2-normalise q and k here (in the accumulation dtype). cp: context parallelism:
    the inputs are this rank's chunk; initial_state is read on rank 0; the final state returned is
    the whole sequence's, the same on every rank.
    """
    b, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (b, T, H) or g.shape != (b, T, H) or beta.shape != (b, T, H):
        raise ValueError(f"gated_delta_rule: expected q = k (B,T,H,K), v (B,T,H,V), g = beta (B,T,H); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (b, H, K, V):
        raise ValueError(f"gated_delta_rule: initial_state must be (B, H, K, V) = {(b, H, K, V)}; "
                         f"got {tuple(initial_state.shape)}")
    if reset is not None and reset.shape != (b, T):
        raise ValueError(f"gated_delta_rule: reset must be (B, T) = {(b, T)} bool; got {tuple(reset.shape)}")
    check_backend(backend, "gated_delta_rule")
    backend = backend or "torch"
    scale = K ** -0.5 if scale is None else scale
    acc = context.acc_dtype(v)
    if normalize_qk:
        q, k = l2_normalize(q.to(acc)), l2_normalize(k.to(acc))
    split = resolve_split(cp)
    if split is not None:
        return _split_delta(q, k, v, g, beta, initial_state, reset, scale, chunk_size, backend, split)
    if backend == "triton":
        if not torch.compiler.is_compiling():  # say early why it cannot run (the op checks again)
            _delta_kernels(v)
        return _delta_triton_op(q, k, v, g, beta, initial_state, reset, float(scale), chunk_size)
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))
    s0 = v.new_zeros(b, H, K, V) if initial_state is None else initial_state.to(acc)
    if backend == "reference" or T == 1:
        o, state = _delta_reference(q * scale, k, v, g, beta, s0, reset)
    else:
        o, state = _delta_chunked(q * scale, k, v, g, beta, s0, reset, chunk_size)
    return o.to(v.dtype), state


def gated_delta_product(q, k, v, g, beta, num_householder: int, initial_state=None, reset=None,
                        scale: float | None = None, chunk_size: int = 64, backend: str | None = None, cp=None,
                        normalize_qk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaProduct (Siems et al. 2025): n = num_householder delta-rule steps per token, as
    fla's naive_recurrent_gated_delta_product: per token t the state decays by exp(g_t), then takes
    S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T for j = 1..n, then o_t = scale q_t S.

    q: (B, T, H, K); k: (B, T n, H, K); v: (B, T n, H, V); beta: (B, T n, H) (token t's steps at
    t n .. t n + n - 1); g: (B, T, H) or None (no decay). Runs gated_delta_rule on the T n micro-steps
    (g on each token's first, q on its last, a reset on its first), so every backend and cp work
    unchanged: a rank's chunk of tokens is a contiguous chunk of micro-steps.
    """
    n = num_householder
    b, T, H, K = q.shape
    if n < 1 or k.shape != (b, T * n, H, K) or v.shape[:3] != (b, T * n, H) or beta.shape != (b, T * n, H) or (
            g is not None and g.shape != (b, T, H)):
        raise ValueError(f"gated_delta_product: expected num_householder >= 1, q (B,T,H,K), k (B,T*n,H,K), "
                         f"v (B,T*n,H,V), beta (B,T*n,H), g (B,T,H) or None; got n={n}, q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, beta {tuple(beta.shape)}, "
                         f"g {None if g is None else tuple(g.shape)}")
    scale = K ** -0.5 if scale is None else scale

    def spread(x, where):  # (B, T, ...) -> (B, T n, ...): x on micro-step `where` of each token, 0 elsewhere
        out = x.new_zeros(b, T, n, *x.shape[2:])
        out[:, :, where] = x
        return out.flatten(1, 2)

    g_steps = spread(g, 0) if g is not None else beta.new_zeros(b, T * n, H)
    o, state = gated_delta_rule(spread(q, n - 1), k, v, g_steps, beta, initial_state,
                                spread(reset, 0) if reset is not None else None, scale, chunk_size, backend, cp,
                                normalize_qk)
    return o[:, n - 1::n], state


def _split_delta(q, k, v, g, beta, initial_state, reset, scale, chunk_size, backend, cp):
    acc = context.acc_dtype(v)
    b, T, H, K = q.shape
    first = initial_state if cp.rank == 0 or initial_state is None else initial_state * 0
    o, state = gated_delta_rule(q, k, v, g, beta, first, reset, scale, chunk_size, backend=backend, cp=False)
    eye = torch.eye(K, dtype=acc, device=q.device).expand(b, H, K, K)
    E, M = gated_delta_rule(q, k, q.new_zeros(b, T, H, K, dtype=acc), g, beta, eye, reset, scale, chunk_size,
                            backend=backend, cp=False)
    n = M[0].numel()
    gathered, o = context._AllGather.apply(torch.cat([M.flatten(1), state.to(acc).flatten(1)], dim=1), cp, o)
    Ms = gathered[..., :n].reshape(cp.size, *M.shape)
    Ss = gathered[..., n:].reshape(cp.size, *state.shape)
    carry = final = torch.zeros_like(state, dtype=acc)
    for r in range(cp.size):
        if r == cp.rank:
            carry = final
        final = Ms[r] @ final + Ss[r]
    # The same graph on every rank (rank 0 adds a zero carry), so the backward passes match.
    o = o.to(acc) + torch.einsum("bthk,bhkv->bthv", E.to(acc), carry)
    return o.to(v.dtype), final


def _delta_reference(q, k, v, g, beta, state, reset):
    """q already scaled. The loop over t, in the accumulation dtype."""
    outs = []
    for t in range(q.shape[1]):
        decay = torch.exp(g[:, t])  # (b, H)
        if reset is not None:
            decay = decay * ~reset[:, t, None]
        state = decay[..., None, None] * state
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, state))
        state = state + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, 1), state


def _delta_chunked(q, k, v, g, beta, state, reset, Q):
    """q already scaled; all in the accumulation dtype. q, k (b, T, H, K), v (b, T, H, V),
    g, beta (b, T, H), state (b, H, K, V) -> o (b, T, H, V), final state."""
    b, T, H, K = q.shape
    V = v.shape[-1]
    Q = max(1, min(Q, T))
    pad = (-T) % Q
    if reset is None:
        reset = torch.zeros(b, T, dtype=torch.bool, device=q.device)
    if pad:  # g = 0, k = 0, beta = 0 on padding: the state passes unchanged
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
        reset = F.pad(reset, (0, pad))
    nc = q.shape[1] // Q
    q, k, v = (t.reshape(b, nc, Q, H, t.shape[-1]).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # (b,H,c,l,.)
    g, beta = (t.reshape(b, nc, Q, H).permute(0, 3, 1, 2) for t in (g, beta))  # (b, H, c, l)
    seg = torch.cumsum(reset.reshape(b, nc, Q).to(torch.int32), dim=2)[:, None]  # (b, 1, c, l)

    # Decays as direct sums of g: pairs (j, i] (Q x Q, masked by causality and the resets), from the
    # chunk start through i (until the first reset), from after j to the chunk end.
    later = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril(-1)  # (l, j): l > j
    causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
    rel = torch.cumsum(g[..., :, None] * later, dim=-2)  # (b, H, c, i, j): sum over j < l <= i
    same = causal & (seg[..., :, None] == seg[..., None, :])
    L = torch.exp(rel.masked_fill(~same, float("-inf")))  # (b, H, c, i, j)
    from_start = torch.exp(torch.cumsum(g, dim=-1)) * (seg == 0)  # (b, H, c, l)
    to_end = torch.exp(_suffix(g)) * (seg == seg[..., -1:])  # (b, H, c, l)
    through = torch.exp(g.sum(-1)) * (seg[..., -1] == 0)  # (b, H, c)

    # The UT transform: (I + strictly_lower(beta_i k_i.k_j L_ij)) [u | w] = [beta v | beta k from_start].
    kb = k * beta[..., None]
    lower = (kb @ k.transpose(-1, -2)) * L * later
    eye = torch.eye(Q, dtype=q.dtype, device=q.device)
    uw = torch.linalg.solve_triangular(lower + eye, torch.cat([v * beta[..., None], kb * from_start[..., None]], -1),
                                       upper=False, unitriangular=True)
    u, w = uw.split([V, K], dim=-1)  # (b, H, c, l, V), (b, H, c, l, K)

    # Per chunk: o = E S_in + attn u, S_out = M S_in + kd^T u, with attn = (q k^T) * L (diagonal kept).
    attn = (q @ k.transpose(-1, -2)) * L
    E = q * from_start[..., None] - attn @ w  # (b, H, c, l, K)
    kd = k * to_end[..., None]
    M = through[..., None, None] * torch.eye(K, dtype=q.dtype, device=q.device) - kd.transpose(-1, -2) @ w
    add = kd.transpose(-1, -2) @ u  # (b, H, c, K, V)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = M[:, :, c] @ state + add[:, :, c]
    starts = torch.stack(starts, 2)  # (b, H, c, K, V)
    o = attn @ u + E @ starts
    o = o.permute(0, 2, 3, 1, 4).reshape(b, nc * Q, H, V)[:, :T]
    return o, state


def _suffix(x):
    """sum of x over the positions after each one along the last dim (0 at the last), summed directly."""
    shifted = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], -1)
    return shifted.flip(-1).cumsum(-1).flip(-1)


# --- the "triton" backend: a custom op (one opaque node for torch.compile) ---------------------

def _delta_kernels(t: torch.Tensor):
    """megarnn_kernels.delta_rule, or a ValueError saying why backend="triton" cannot run on t's device."""
    return load_kernels(t, "gated_delta_rule", "delta_rule")


@torch.library.custom_op("megarnn::delta_triton", mutates_args=())
def _delta_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: torch.Tensor | None, reset: torch.Tensor | None, scale: float,
                     chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gated_delta_rule's "triton" backend -> (o (B, T, H, V) in v's dtype, final state (B, H, K, V)
    in fp32 / fp64)."""
    return _delta_kernels(v).delta_fwd(q, k, v, g, beta, scale, chunk_size, initial_state, reset)


@_delta_triton_op.register_fake
def _(q, k, v, g, beta, initial_state, reset, scale, chunk_size):
    b, T, H, K = q.shape
    return torch.empty_like(v), v.new_empty(b, H, K, v.shape[-1], dtype=context.acc_dtype(v))


@torch.library.custom_op("megarnn::delta_triton_bwd", mutates_args=())
def _delta_triton_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         initial_state: torch.Tensor | None, reset: torch.Tensor | None, scale: float,
                         chunk_size: int, do: torch.Tensor, dfinal: torch.Tensor | None) -> list[torch.Tensor]:
    """[dq, dk, dv, dg, dbeta, d initial_state] of megarnn::delta_triton (kernels/delta_rule.py's
    backward, which recomputes the forward from the saved inputs)."""
    grads = _delta_kernels(v).delta_bwd(q, k, v, g, beta, scale, chunk_size, initial_state, reset, do, dfinal)
    return [NO_GRAD.clone() if gr is None else gr for gr in grads]


@_delta_triton_bwd_op.register_fake
def _(q, k, v, g, beta, initial_state, reset, scale, chunk_size, do, dfinal):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)]


def _delta_triton_setup(ctx, inputs, output):
    q, k, v, g, beta, initial_state, reset, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, reset)
    ctx.scale, ctx.chunk_size = scale, chunk_size
    ctx.has_s0 = initial_state is not None
    ctx.set_materialize_grads(False)  # an unused final state costs nothing in the backward


def _delta_triton_backward(ctx, do, dfinal):
    q, k, v, g, beta, initial_state, reset = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, ds0 = _delta_triton_bwd_op(q, k, v, g, beta, initial_state, reset, ctx.scale,
                                                      ctx.chunk_size, do, dfinal)
    return dq, dk, dv, dg, dbeta, ds0 if ctx.has_s0 else None, None, None, None


_delta_triton_op.register_autograd(_delta_triton_backward, setup_context=_delta_triton_setup)
