"""Gated linear attention (GLA; Yang et al. 2024), the chunked forward in Triton.

Per head, a matrix state S (K, V) with a forget gate per key channel (fla's chunk_gla conventions):
    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t          gk_t <= 0
    o_t = scale q_t S_t
A document reset at t drops S_{t-1}. The judge is megarnn/ops/gla.py (`_gla_reference`, and
`_gla_chunked`, whose decomposition, sub-chunking and reset masks this file follows).

Algorithm (time cut into chunks of Q steps, Q a power of two in 16..64, each chunk into
sub-chunks of SUB = 16; l, j positions in a chunk; seg_l = resets at positions <= l)
--------------------------------------------------------------------------------------
  (1) _gla_fwd_h_kernel, grid (B H, K / BK, V / BV), sequential over the chunks:
        to_end_l  = [seg_l = seg_last] exp(sum of gk over (l, last])      (BK,) per position
        through   = [no reset in the chunk] exp(sum of gk over the chunk)  (BK,)
        S_in[c]   -> STATES[c];  S <- diag(through) S + (k * to_end)^T v    (BK x Q) @ (Q x BV)
      STATES (B, H, NC + 1, K, V): the state entering each chunk, the final state last.
  (2) _gla_fwd_a_kernel, grid (B H NC, NS, NS) over (row, column) sub-chunks, column <= row:
        A_lj = sum_k q_lk k_jk exp(sum of gk_k over (j, l]), j <= l, same segment, else 0.
      Pairs in different sub-chunks factor through the step r before the row's sub-chunk,
      (q_l exp(gk over (r, l])) . (k_j exp(gk over (j, r])), both factors <= 1 (a tl.dot);
      pairs inside one sub-chunk take the exact product column by column. Every log decay is a
      direct sum of gates over the steps it spans (a cumsum of up to Q terms), never a
      difference of two cumulative sums, which loses digits in fp32 when the gates are strong.
  (3) _gla_fwd_o_kernel, grid (B H NC, V / BV):
        o_l = scale (A v + [seg_l = 0] (q_l * exp(gk over [chunk start, l])) S_in[c])
Positions past T read as zeros (gk = 0, k = 0: the state passes unchanged), so any T works.
Resets are masks (tl.where), never -inf logs; every exp argument is <= 0.

Backward: not in Triton yet. megarnn/ops/gla.py's "triton" backend differentiates by recomputing
the chunked torch form under autograd (megarnn::gla_triton_bwd).

Cost per token and head (forward; multiply-add = 2): FLOPs 2 K V (states) + K Q (A, causal
half) + Q V (A v, half) + 2 K V (q S_in), plus ~SUB K exps for the diagonal sub-chunks; bytes
(2 K + 2 V) s + 4 Q + 8 K V / Q with s the element size (the fp32 A tile and chunk states). At
gla-1b's shape in bf16 (K = 256, V = 512, Q = 64) that is ~0.6 MFLOP and ~25 KB per token and
head: ~25 FLOP/byte, bandwidth-bound on an H100 as the SSD scan.

Dtypes: q, k, v fp32, bf16, fp16 or fp64 (one dtype, the matmul operands), gk any float dtype
read as fp32 (fp64 for fp64 v), accumulation and the states in fp32 (fp64). fp32 matmuls use
input_precision="ieee"; bf16 / fp16 round decay-weighted tiles to their dtype before a product.

Host function (torch tensors in and out; no autograd: megarnn/ops/gla.py wraps it):
    gla_fwd(q, k, v, gk, scale, chunk_size, initial_state=None, reset=None) -> (o, final_state)
Shapes: q, k, gk (B, T, H, K); v (B, T, H, V); initial / final state (B, H, K, V); reset (B, T).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# True when the kernels were decorated under Triton's interpreter (TRITON_INTERPRET=1).
INTERPRETED = triton.knobs.runtime.interpret
SUB = 16  # positions per sub-chunk (tl.dot's minimum tile)


@triton.jit
def _load_seg(SEG, base, pos, mask, HAS_RESET: tl.constexpr):
    """Resets so far in the chunk at positions `pos` (int32); all 0 without resets."""
    if HAS_RESET:
        return tl.load(SEG + base + pos, mask=mask, other=0)
    else:
        return tl.zeros_like(pos)


@triton.jit
def _seg_last(SEG, base, Q, HAS_RESET: tl.constexpr):
    if HAS_RESET:
        return tl.load(SEG + base + Q - 1)
    else:
        return 0


@triton.jit
def _gla_fwd_h_kernel(Kp, Vp, GK, SEG, S0, STATES, T, H, K, V, NC,
                      Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_S0: tl.constexpr,
                      HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(1) STATES: (B, H, NC + 1, K, V) the state entering each chunk, then the final state.
    Grid (B * H, cdiv(K, BLOCK_K), cdiv(V, BLOCK_V))."""
    pid, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid // H).to(tl.int64), pid % H
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mk, mv = kk < K, vv < V
    kv = kk[:, None] * V + vv[None, :]
    mkv = mk[:, None] & mv[None, :]
    if HAS_S0:
        S = tl.load(S0 + (b * H + h) * K * V + kv, mask=mkv, other=0.0).to(ACC)
    else:
        S = tl.zeros([BLOCK_K, BLOCK_V], ACC)
    l = tl.arange(0, Q)
    for c in range(0, NC):
        tl.store(STATES + ((b * H + h) * (NC + 1) + c) * K * V + kv, S, mask=mkv)
        t = c * Q + l
        t_ok = t < T
        row = (b * T + t) * H + h  # (b, t, h)
        k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
        v = tl.load(Vp + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & mv[None, :], other=0.0)
        g = tl.load(GK + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
        nxt = (l + 1 < Q) & (t + 1 < T)  # the gate one step later, within the chunk
        g_next = tl.load(GK + (row + H)[:, None] * K + kk[None, :], mask=nxt[:, None] & mk[None, :],
                         other=0.0).to(ACC)
        after = tl.cumsum(g_next, axis=0, reverse=True)  # sum over (l, last]
        seg_base = (b * NC + c) * Q
        seg_l = _load_seg(SEG, seg_base, l, l < Q, HAS_RESET)
        seg_last = _seg_last(SEG, seg_base, Q, HAS_RESET)
        keep = (seg_l == seg_last)[:, None]
        to_end = tl.where(keep, tl.exp(tl.where(keep, after, 0.0)), 0.0)
        through = tl.where(seg_last == 0, tl.exp(tl.sum(g, axis=0)), 0.0)
        kd = tl.trans((k * to_end).to(DOT_T))
        S = S * through[:, None] + tl.dot(kd, v.to(DOT_T), input_precision=PREC, out_dtype=ACC)
    tl.store(STATES + ((b * H + h) * (NC + 1) + NC) * K * V + kv, S, mask=mkv)


@triton.jit
def _gla_a_offdiag(Qp, Kp, GK, b, h, c, i, j, T, H, K,
                   Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                   DOT_T: tl.constexpr, PREC: tl.constexpr):
    """A's (SUB x SUB) block of row sub-chunk i and column sub-chunk j < i, without masks."""
    r = tl.arange(0, SUB_)
    ti = c * Q + i * SUB_ + r
    tj = c * Q + j * SUB_ + r
    row_i = (b * T + ti) * H + h
    row_j = (b * T + tj) * H + h
    nxt = (r + 1 < SUB_) & (tj + 1 < T)
    acc = tl.zeros([SUB_, SUB_], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        mi = (ti < T)[:, None] & mk[None, :]
        mj = (tj < T)[:, None] & mk[None, :]
        q = tl.load(Qp + row_i[:, None] * K + kk[None, :], mask=mi, other=0.0).to(ACC)
        gi = tl.load(GK + row_i[:, None] * K + kk[None, :], mask=mi, other=0.0).to(ACC)
        k = tl.load(Kp + row_j[:, None] * K + kk[None, :], mask=mj, other=0.0).to(ACC)
        gj = tl.load(GK + (row_j + H)[:, None] * K + kk[None, :], mask=nxt[:, None] & mk[None, :],
                     other=0.0).to(ACC)
        span = tl.cumsum(gj, axis=0, reverse=True)  # over (j, end of j's sub-chunk]
        for m in range(j + 1, i):  # whole sub-chunks between
            tm = c * Q + m * SUB_ + r
            gm = tl.load(GK + ((b * T + tm) * H + h)[:, None] * K + kk[None, :],
                         mask=(tm < T)[:, None] & mk[None, :], other=0.0).to(ACC)
            span += tl.sum(gm, axis=0)[None, :]
        qg = q * tl.exp(tl.cumsum(gi, axis=0))  # gates over (r, l]: from the sub-chunk start through l
        kg = k * tl.exp(span)
        acc = tl.dot(qg.to(DOT_T), tl.trans(kg.to(DOT_T)), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _gla_a_diag(Qp, Kp, GK, b, h, c, i, T, H, K,
                Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """A's diagonal (SUB x SUB) block of sub-chunk i, column by column (entries above the
    diagonal are garbage, masked by the caller)."""
    r = tl.arange(0, SUB_)
    ti = c * Q + i * SUB_ + r
    row = (b * T + ti) * H + h
    acc = tl.zeros([SUB_, SUB_], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (ti < T)[:, None] & (kk < K)[None, :]
        q = tl.load(Qp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        g = tl.load(GK + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        for jj in range(0, SUB_):
            kj = tl.sum(tl.where((r == jj)[:, None], k, 0.0), axis=0)  # k at column jj
            span = tl.cumsum(tl.where((r > jj)[:, None], g, 0.0), axis=0)  # gates over (jj, l]
            col = tl.sum(q * kj[None, :] * tl.exp(span), axis=1)
            acc += tl.where((r == jj)[None, :], col[:, None], 0.0)
    return acc


@triton.jit
def _gla_fwd_a_kernel(Qp, Kp, GK, SEG, A, T, H, K, NC,
                      Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RESET: tl.constexpr,
                      ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(2) A: (B, H, NC, Q, Q), blocks of column sub-chunk <= row sub-chunk (the others are never
    written nor read). Grid (B * H * NC, Q / SUB, Q / SUB)."""
    pid, i, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if j > i:
        return
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    if j < i:
        acc = _gla_a_offdiag(Qp, Kp, GK, b, h, c, i, j, T, H, K, Q, SUB_, BLOCK_K, ACC, DOT_T, PREC)
    else:
        acc = _gla_a_diag(Qp, Kp, GK, b, h, c, i, T, H, K, Q, SUB_, BLOCK_K, ACC)
    r = tl.arange(0, SUB_)
    li, lj = i * SUB_ + r, j * SUB_ + r
    seg_base = (b * NC + c) * Q
    seg_i = _load_seg(SEG, seg_base, li, li < Q, HAS_RESET)
    seg_j = _load_seg(SEG, seg_base, lj, lj < Q, HAS_RESET)
    keep = (lj[None, :] <= li[:, None]) & (seg_i[:, None] == seg_j[None, :]) & ((c * Q + li) < T)[:, None]
    tl.store(A + ((b * H + h) * NC + c) * Q * Q + li[:, None] * Q + lj[None, :], tl.where(keep, acc, 0.0))


@triton.jit
def _gla_fwd_o_kernel(Qp, Vp, GK, SEG, A, STATES, O, scale, T, H, K, V, NC,
                      Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                      HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(3) O: (B, T, H, V) = scale (A v + [seg = 0] (q * exp(gates from the chunk start)) S_in).
    Grid (B * H * NC, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    l = tl.arange(0, Q)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    t = c * Q + l
    t_ok = t < T
    row = (b * T + t) * H + h
    seg_l = _load_seg(SEG, (b * NC + c) * Q, l, l < Q, HAS_RESET)
    first = (seg_l == 0)[:, None]
    st_base = ((b * H + h) * (NC + 1) + c) * K * V
    acc = tl.zeros([Q, BLOCK_V], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        m = t_ok[:, None] & mk[None, :]
        q = tl.load(Qp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        g = tl.load(GK + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        cum = tl.cumsum(g, axis=0)
        qg = q * tl.where(first, tl.exp(tl.where(first, cum, 0.0)), 0.0)
        s = tl.load(STATES + st_base + kk[:, None] * V + vv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc = tl.dot(qg.to(DOT_T), s.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    lower = (l[None, :] // SUB_) <= (l[:, None] // SUB_)  # the blocks (2) wrote
    a = tl.load(A + ((b * H + h) * NC + c) * Q * Q + l[:, None] * Q + l[None, :], mask=lower, other=0.0)
    v = tl.load(Vp + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & mv[None, :], other=0.0)
    acc = tl.dot(a.to(DOT_T), v.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    tl.store(O + row[:, None] * V + vv[None, :], (acc * scale).to(O.dtype.element_ty),
             mask=t_ok[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> torch.Tensor:
    """The one allocator for kernel outputs; tests replace it with a NaN-filled one so that an
    element a kernel forgets to write fails loudly."""
    return torch.empty(shape, dtype=dtype, device=device)


_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class _Plan:
    """Sizes and tiles of one call. Q: the kernels' chunk, a power of two in 16..64 (the math does
    not depend on it); BK / BV: key / value channels per tile (>= 16, powers of two, masked)."""
    B: int
    T: int
    H: int
    K: int
    V: int
    Q: int
    nc: int
    dtype: torch.dtype
    acc: torch.dtype

    @property
    def BK(self):
        return min(64, max(16, triton.next_power_of_2(self.K)))

    @property
    def BV(self):
        return min(64, max(16, triton.next_power_of_2(self.V)))

    def meta(self) -> dict:
        return dict(ACC=_TL[self.acc], DOT_T=_TL[self.dtype],
                    PREC="ieee" if self.dtype in (torch.float32, torch.float64) else "tf32")


def chunk_for(T: int, chunk_size: int) -> int:
    """The kernels' chunk: chunk_size rounded up to a power of two in [16, 64], no longer than T
    needs (shared with kernels/delta_rule.py)."""
    return min(64, max(16, triton.next_power_of_2(max(1, min(chunk_size, T)))))


def _plan(q, k, v, gk, chunk_size) -> _Plan:
    b, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or gk.shape != q.shape or v.shape[:3] != (b, T, H):
        raise ValueError(f"gla kernels: expected q = k = gk (B,T,H,K), v (B,T,H,V); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, gk {tuple(gk.shape)}, v {tuple(v.shape)}")
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f"gla kernels: empty input q {tuple(q.shape)}, v {tuple(v.shape)}")
    if v.dtype not in _TL:
        raise ValueError(f"gla kernels: v must be fp32, bf16, fp16 or fp64; got {v.dtype}")
    if chunk_size < 1:
        raise ValueError(f"gla kernels: chunk_size must be >= 1; got {chunk_size}")
    Q = chunk_for(T, chunk_size)
    if Q * H * max(K, V) >= 2**31:
        raise ValueError("gla kernels: chunk * H * max(K, V) must be < 2^31 (int32 offsets inside a chunk)")
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return _Plan(b, T, H, K, V, Q, triton.cdiv(T, Q), v.dtype, acc)


def segments(reset, B: int, T: int, Q: int, nc: int, device) -> tuple[torch.Tensor, bool]:
    """(B, NC, Q) int32 resets so far in each chunk (torch glue: a cumsum of B T flags), and
    whether there are resets at all (without, the kernels never read it)."""
    if reset is None:
        return torch.zeros(1, dtype=torch.int32, device=device), False
    if reset.shape != (B, T):
        raise ValueError(f"reset must be (B, T) = {(B, T)} bool; got {tuple(reset.shape)}")
    r = torch.nn.functional.pad(reset.to(device=device, dtype=torch.int32), (0, nc * Q - T))
    return r.view(B, nc, Q).cumsum(-1, dtype=torch.int32).contiguous(), True


def gla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float, chunk_size: int,
            initial_state: torch.Tensor | None = None, reset: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, T, H, V) in v's dtype and the final state (B, H, K, V) in fp32 (fp64 for fp64 v)."""
    pl = _plan(q, k, v, gk, chunk_size)
    q, k = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous()
    v, gk = v.contiguous(), gk.contiguous()
    dev = v.device
    if initial_state is not None:
        if initial_state.shape != (pl.B, pl.H, pl.K, pl.V):
            raise ValueError(f"gla kernels: initial_state must be (B, H, K, V) = {(pl.B, pl.H, pl.K, pl.V)}; "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.contiguous()
    if pl.acc == torch.float64:  # a float argument reaches the kernel as fp32: scale in fp64 here
        q, scale = q * scale, 1.0
    seg, has_reset = segments(reset, pl.B, pl.T, pl.Q, pl.nc, dev)
    m = pl.meta()
    states = _empty((pl.B, pl.H, pl.nc + 1, pl.K, pl.V), pl.acc, dev)
    _gla_fwd_h_kernel[(pl.B * pl.H, triton.cdiv(pl.K, pl.BK), triton.cdiv(pl.V, pl.BV))](
        k, v, gk, seg, initial_state if initial_state is not None else states, states, pl.T, pl.H, pl.K, pl.V,
        pl.nc, Q=pl.Q, BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_S0=initial_state is not None, HAS_RESET=has_reset, **m,
        num_warps=4)
    ns = pl.Q // SUB
    a = _empty((pl.B, pl.H, pl.nc, pl.Q, pl.Q), pl.acc, dev)
    _gla_fwd_a_kernel[(pl.B * pl.H * pl.nc, ns, ns)](
        q, k, gk, seg, a, pl.T, pl.H, pl.K, pl.nc, Q=pl.Q, SUB_=SUB, BLOCK_K=pl.BK, HAS_RESET=has_reset, **m,
        num_warps=2)
    o = _empty(v.shape, v.dtype, dev)
    _gla_fwd_o_kernel[(pl.B * pl.H * pl.nc, triton.cdiv(pl.V, pl.BV))](
        q, v, gk, seg, a, states, o, float(scale), pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q, SUB_=SUB,
        BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_RESET=has_reset, **m, num_warps=4)
    return o, states[:, :, pl.nc].contiguous()
