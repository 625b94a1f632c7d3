"""Gated linear attention (GLA; Yang et al. 2024), chunked, in Triton: forward and backward.

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

Backward (do' = scale dL/do, dS_fin = dL/d final state or None; q unscaled). Only the inputs are
saved: (1) and (2) are recomputed, then
  (4') _gla_bwd_dh_kernel, grid (B H, K / BK, V / BV), the chunks in reverse:
        dS_out[c] = dS_in[c + 1] (dS_fin for the last);  dS_in = diag(through) dS_out
                    + (q * [seg = 0] exp(gk over [0, l]))^T do';  d initial_state = dS_in[0]
        and per chunk C = rowsum(dS_out * S_out) (K,): the gradient of every gate of the chunk
        through the chunk's state (its to_end and through factors; S_out = through S_in + ...).
  (5') _gla_bwd_da_kernel: dA = do' v^T, masked as A.
  (6') _gla_bwd_dv_kernel: dv = A^T do' + (k * to_end) dS_out.
  (7') _gla_bwd_dqk_kernel, grid (B H NC, Q / SUB, K / BK), one sub-chunk of positions:
        dq_l = sum_j dA_lj k_j exp(gk over (j, l]) + [seg_l = 0] exp(gk over [0, l]) (do'_l S_in^T)
        dk_j = sum_l dA_lj q_l exp(gk over (j, l]) + to_end_j (v_j dS_out^T)
      sub-chunked as A is (pairs across sub-chunks through the sub-chunk's edge, a tl.dot; pairs
      inside it column by column), and DG = q dq - k dk: the gradient of the cumulative gate
      G_l = gk over [0, l], in which every decay above is a difference G_l - G_j.
  (8') _gla_bwd_dgk_kernel: dgk_t = sum_{l >= t in the chunk} DG_l + C (a reverse cumsum).
Torch glue: the segment ids and slicing; everything that touches a tile is Triton.

Cost per token and head (forward; multiply-add = 2): FLOPs 2 K V (states) + K Q (A, causal
half) + Q V (A v, half) + 2 K V (q S_in), plus ~SUB K exps for the diagonal sub-chunks; bytes
(2 K + 2 V) s + 4 Q + 8 K V / Q with s the element size (the fp32 A tile and chunk states). At
gla-1b's shape in bf16 (K = 256, V = 512, Q = 64) that is ~0.6 MFLOP and ~25 KB per token and
head: ~25 FLOP/byte, bandwidth-bound on an H100 as the SSD scan. The backward recomputes the
forward's states and A and costs about 3x its FLOPs (dS, dA, dv, dq, dk: five products of the
forward's sizes) and ~3x its bytes (the fp32 states and their gradients read twice).

Dtypes: q, k, v fp32, bf16, fp16 or fp64 (one dtype, the matmul operands), gk any float dtype
read as fp32 (fp64 for fp64 v), accumulation and the states in fp32 (fp64). fp32 matmuls use
input_precision="ieee"; bf16 / fp16 round decay-weighted tiles to their dtype before a product.

Tiles (_Plan, MAX_TILE): chunk Q and key / value tiles of 64 for 16-bit operands, 32 for fp32 /
fp64 (CUDA-core products), 8 warps for the kernels holding (Q x 64)-sized tiles, and for (7')
whenever a key / value tile is 32 wide or more (its tiles are SUB rows whatever Q is). Offsets
inside a chunk are int32 from one int64 scalar per chunk, so no 64-bit offset tile lives across a
loop. Compiled for sm_80 / sm_90 in bf16, fp32 and fp64 at the gla-1b, gla-tiny and ragged
shapes (tools/compile_kernels.py) no variant spills. First guesses, not yet run or tuned on a
GPU; bf16 products are wrong under Triton's interpreter, so the CPU tests check fp32 / fp64 (with
the 64-wide layout forced) only.

Host functions (torch tensors in and out; no autograd: megarnn/ops/gla.py wraps them):
    gla_fwd(q, k, v, gk, scale, chunk_size, initial_state=None, reset=None) -> (o, final_state)
    gla_bwd(q, k, v, gk, scale, chunk_size, initial_state, reset, do, dfinal=None)
        -> (dq, dk, dv, dgk, d_initial_state)
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
    # In-chunk offsets are int32 (the plan bounds Q H max(K, V) < 2^31); the int64 part is one
    # scalar per chunk, so no 64-bit offset tile stays live across the loop.
    lk = (l * H)[:, None] * K + kk[None, :]
    lv = (l * H)[:, None] * V + vv[None, :]
    st = STATES + (b * H + h) * (NC + 1) * K * V
    tl.store(st + kv, S, mask=mkv)  # slot 0: the initial state
    for c in range(0, NC):
        t = c * Q + l
        t_ok = t < T
        row0 = (b * T + c * Q) * H + h  # (b, chunk start, h)
        k = tl.load(Kp + row0 * K + lk, mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
        v = tl.load(Vp + row0 * V + lv, mask=t_ok[:, None] & mv[None, :], other=0.0)
        g = tl.load(GK + row0 * K + lk, mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
        nxt = (l + 1 < Q) & (t + 1 < T)  # the gate one step later, within the chunk
        g_next = tl.load(GK + (row0 + H) * K + lk, mask=nxt[:, None] & mk[None, :], other=0.0).to(ACC)
        after = tl.cumsum(g_next, axis=0, reverse=True)  # sum over (l, last]
        seg_base = (b * NC + c) * Q
        seg_l = _load_seg(SEG, seg_base, l, l < Q, HAS_RESET)
        seg_last = _seg_last(SEG, seg_base, Q, HAS_RESET)
        keep = (seg_l == seg_last)[:, None]
        to_end = tl.where(keep, tl.exp(tl.where(keep, after, 0.0)), 0.0)
        through = tl.where(seg_last == 0, tl.exp(tl.sum(g, axis=0)), 0.0)
        kd = tl.trans((k * to_end).to(DOT_T))
        S = S * through[:, None] + tl.dot(kd, v.to(DOT_T), input_precision=PREC, out_dtype=ACC)
        st += K * V
        tl.store(st + kv, S, mask=mkv)  # slot c + 1: the state leaving chunk c (the last: the final state)


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
def _gla_fwd_o_kernel(Qp, Vp, GK, SEG, A, STATES, O, scale, T, H, K, V, NC, HK, HV,
                      Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                      HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(3) O: (B, T, H, V) = scale (A v + [seg = 0] (q * exp(gates from the chunk start)) S_in).
    HK, HV: H K and H V, the row strides of q / gk and v / o (arguments, so that the compiler
    cannot share l H between the loop's and the epilogue's offsets and keep it over the loop).
    Grid (B * H * NC, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    l = tl.arange(0, Q)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    t = c * Q + l
    t_ok = t < T
    row0 = (b * T + c * Q) * H + h  # (b, chunk start, h); in-chunk offsets are int32
    seg_l = _load_seg(SEG, (b * NC + c) * Q, l, l < Q, HAS_RESET)
    first = (seg_l == 0)[:, None]
    st = STATES + ((b * H + h) * (NC + 1) + c) * K * V
    qk = Qp + row0 * K
    gk = GK + row0 * K
    acc = tl.zeros([Q, BLOCK_V], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        m = t_ok[:, None] & mk[None, :]
        lk = l[:, None] * HK + kk[None, :]
        q = tl.load(qk + lk, mask=m, other=0.0).to(ACC)
        g = tl.load(gk + lk, mask=m, other=0.0).to(ACC)
        cum = tl.cumsum(g, axis=0)
        qg = q * tl.where(first, tl.exp(tl.where(first, cum, 0.0)), 0.0)
        s = tl.load(st + kk[:, None] * V + vv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc = tl.dot(qg.to(DOT_T), s.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    lower = (l[None, :] // SUB_) <= (l[:, None] // SUB_)  # the blocks (2) wrote
    a = tl.load(A + ((b * H + h) * NC + c) * Q * Q + l[:, None] * Q + l[None, :], mask=lower, other=0.0)
    lv = l[:, None] * HV + vv[None, :]
    v = tl.load(Vp + row0 * V + lv, mask=t_ok[:, None] & mv[None, :], other=0.0)
    acc = tl.dot(a.to(DOT_T), v.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    tl.store(O + row0 * V + lv, (acc * scale).to(O.dtype.element_ty), mask=t_ok[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------
# Backward kernels (do' = scale do; q unscaled; A as the forward's, without the scale)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _gla_bwd_dh_kernel(Qp, GK, DO, SEG, STATES, DFIN, DSTATES, CPART, scale, T, H, K, V, NC, NV,
                       Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DFIN: tl.constexpr,
                       HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(4') The reverse state pass. DSTATES: (B, H, NC + 1, K, V), slot c + 1 the gradient of the
    state leaving chunk c (the last: d final state), slot 0 that of the initial state:
        dS_in = diag(through) dS_out + (q * [seg = 0] exp(gates from the chunk start))^T do'.
    CPART: (B, H, NC, NV, K), this V block's rowsum(dS_out * S_out), the gradient of every gate of
    the chunk through its state (to_end and through). Grid (B * H, cdiv(K, BLOCK_K), cdiv(V, BLOCK_V))."""
    pid, pid_k, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid // H).to(tl.int64), pid % H
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mk, mv = kk < K, vv < V
    kv = kk[:, None] * V + vv[None, :]
    mkv = mk[:, None] & mv[None, :]
    if HAS_DFIN:
        dS = tl.load(DFIN + (b * H + h) * K * V + kv, mask=mkv, other=0.0).to(ACC)
    else:
        dS = tl.zeros([BLOCK_K, BLOCK_V], ACC)
    l = tl.arange(0, Q)
    for cc in range(0, NC):
        c = NC - 1 - cc
        out = ((b * H + h) * (NC + 1) + c + 1) * K * V + kv
        tl.store(DSTATES + out, dS, mask=mkv)
        s_out = tl.load(STATES + out, mask=mkv, other=0.0)
        tl.store(CPART + (((b * H + h) * NC + c) * NV + pid_v) * K + kk, tl.sum(dS * s_out, axis=1), mask=mk)
        t = c * Q + l
        t_ok = t < T
        row = (b * T + t) * H + h
        m = t_ok[:, None] & mk[None, :]
        q = tl.load(Qp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        g = tl.load(GK + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
        do = tl.load(DO + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & mv[None, :], other=0.0).to(ACC)
        seg_base = (b * NC + c) * Q
        first = (_load_seg(SEG, seg_base, l, l < Q, HAS_RESET) == 0)[:, None]
        qg = q * tl.where(first, tl.exp(tl.where(first, tl.cumsum(g, axis=0), 0.0)), 0.0)
        through = tl.where(_seg_last(SEG, seg_base, Q, HAS_RESET) == 0, tl.exp(tl.sum(g, axis=0)), 0.0)
        dS = dS * through[:, None] + tl.dot(tl.trans(qg.to(DOT_T)), (do * scale).to(DOT_T), input_precision=PREC,
                                            out_dtype=ACC)
    tl.store(DSTATES + (b * H + h) * (NC + 1) * K * V + kv, dS, mask=mkv)


@triton.jit
def _gla_bwd_da_kernel(DO, Vp, SEG, DA, scale, T, H, V, NC,
                       Q: tl.constexpr, BLOCK_V: tl.constexpr, HAS_RESET: tl.constexpr, ACC: tl.constexpr,
                       DOT_T: tl.constexpr, PREC: tl.constexpr):
    """DA: (B, H, NC, Q, Q) = do' v^T on and below the diagonal in one segment, else 0.
    Grid (B * H * NC,)."""
    pid = tl.program_id(0)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    l = tl.arange(0, Q)
    t = c * Q + l
    t_ok = t < T
    row = (b * T + t) * H + h
    acc = tl.zeros([Q, Q], ACC)
    for v0 in range(0, V, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        m = t_ok[:, None] & (vv < V)[None, :]
        do = tl.load(DO + row[:, None] * V + vv[None, :], mask=m, other=0.0).to(DOT_T)
        v = tl.load(Vp + row[:, None] * V + vv[None, :], mask=m, other=0.0).to(DOT_T)
        acc = tl.dot(do, tl.trans(v), acc, input_precision=PREC, out_dtype=ACC)
    seg = _load_seg(SEG, (b * NC + c) * Q, l, l < Q, HAS_RESET)
    keep = (l[None, :] <= l[:, None]) & (seg[:, None] == seg[None, :])
    tl.store(DA + ((b * H + h) * NC + c) * Q * Q + l[:, None] * Q + l[None, :], tl.where(keep, acc * scale, 0.0))


@triton.jit
def _gla_bwd_dv_kernel(Kp, GK, DO, SEG, A, DSTATES, DV, scale, T, H, K, V, NC,
                       Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                       HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """DV: (B, T, H, V) = A^T do' + (k * to_end) dS_out. Grid (B * H * NC, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    l = tl.arange(0, Q)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    t = c * Q + l
    t_ok = t < T
    row = (b * T + t) * H + h
    seg_base = (b * NC + c) * Q
    keep = (_load_seg(SEG, seg_base, l, l < Q, HAS_RESET) == _seg_last(SEG, seg_base, Q, HAS_RESET))[:, None]
    nxt = (l + 1 < Q) & (t + 1 < T)
    st_out = ((b * H + h) * (NC + 1) + c + 1) * K * V
    acc = tl.zeros([Q, BLOCK_V], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
        g_next = tl.load(GK + (row + H)[:, None] * K + kk[None, :], mask=nxt[:, None] & mk[None, :],
                         other=0.0).to(ACC)
        after = tl.cumsum(g_next, axis=0, reverse=True)
        kd = k * tl.where(keep, tl.exp(tl.where(keep, after, 0.0)), 0.0)
        ds = tl.load(DSTATES + st_out + kk[:, None] * V + vv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc = tl.dot(kd.to(DOT_T), ds.to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    lower = (l[None, :] // SUB_) <= (l[:, None] // SUB_)
    a = tl.load(A + ((b * H + h) * NC + c) * Q * Q + l[:, None] * Q + l[None, :], mask=lower, other=0.0)
    do = tl.load(DO + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & mv[None, :], other=0.0).to(ACC)
    acc = tl.dot(tl.trans(a.to(DOT_T)), (do * scale).to(DOT_T), acc, input_precision=PREC, out_dtype=ACC)
    tl.store(DV + row[:, None] * V + vv[None, :], acc.to(DV.dtype.element_ty), mask=t_ok[:, None] & mv[None, :])


@triton.jit
def _gla_bwd_dqk_kernel(Qp, Kp, Vp, GK, DO, SEG, DA, STATES, DSTATES, DQ, DK, DG, scale, T, H, K, V, NC,
                        Q: tl.constexpr, SUB_: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                        HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """dq, dk for the SUB positions of sub-chunk i and BLOCK_K key channels, and
    DG (B, H, NC Q, K) = q dq - k dk (fp32), the gradient of the cumulative gates:
        dq_l = sum_j dA_lj k_j exp(gk over (j, l]) + [seg_l = 0] exp(gk over [0, l]) (do'_l S_in^T)
        dk_j = sum_l dA_lj q_l exp(gk over (j, l]) + [seg_j = seg_last] exp(gk over (j, last]) (v_j dS_out^T)
    Pairs across sub-chunks factor through sub-chunk i's edge (both factors <= 1, a tl.dot); pairs
    inside it are summed column by column. Grid (B * H * NC, Q / SUB, cdiv(K, BLOCK_K))."""
    pid, i, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    r = tl.arange(0, SUB_)
    li = i * SUB_ + r
    ti = c * Q + li
    ok = ti < T
    row = (b * T + ti) * H + h
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = kk < K
    m = ok[:, None] & mk[None, :]
    q = tl.load(Qp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
    k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
    g = tl.load(GK + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(ACC)
    nxt = (r + 1 < SUB_) & (ti + 1 < T)
    g_next = tl.load(GK + (row + H)[:, None] * K + kk[None, :], mask=nxt[:, None] & mk[None, :], other=0.0).to(ACC)
    inside = tl.cumsum(g, axis=0)  # gates from sub-chunk i's start through l
    after = tl.cumsum(g_next, axis=0, reverse=True)  # gates over (l, end of sub-chunk i]
    da_base = ((b * H + h) * NC + c) * Q * Q

    # Pairs across sub-chunks. dq: columns j in sub-chunks m < i (through the step before i);
    # dk: rows l in sub-chunks m > i (through the end of i).
    dq = tl.zeros([SUB_, BLOCK_K], ACC)
    dk = tl.zeros([SUB_, BLOCK_K], ACC)
    before = tl.zeros([BLOCK_K], ACC)  # gates of the whole sub-chunks between m and i, walking down
    for mm in range(0, i):
        m_ = i - 1 - mm
        tm = c * Q + m_ * SUB_ + r
        rm = (b * T + tm) * H + h
        okm = tm < T
        km = tl.load(Kp + rm[:, None] * K + kk[None, :], mask=okm[:, None] & mk[None, :], other=0.0).to(ACC)
        gm_next = tl.load(GK + (rm + H)[:, None] * K + kk[None, :],
                          mask=((r + 1 < SUB_) & (tm + 1 < T))[:, None] & mk[None, :], other=0.0).to(ACC)
        span = tl.cumsum(gm_next, axis=0, reverse=True) + before[None, :]  # gates over (j, step before i]
        da = tl.load(DA + da_base + li[:, None] * Q + (m_ * SUB_ + r)[None, :])
        dq = tl.dot(da.to(DOT_T), (km * tl.exp(span)).to(DOT_T), dq, input_precision=PREC, out_dtype=ACC)
        gm = tl.load(GK + rm[:, None] * K + kk[None, :], mask=okm[:, None] & mk[None, :], other=0.0).to(ACC)
        before += tl.sum(gm, axis=0)
    dq = dq * tl.exp(inside)
    between = tl.zeros([BLOCK_K], ACC)  # gates of the whole sub-chunks between i and m, walking up
    for m_ in range(i + 1, Q // SUB_):
        tm = c * Q + m_ * SUB_ + r
        rm = (b * T + tm) * H + h
        okm = tm < T
        qm = tl.load(Qp + rm[:, None] * K + kk[None, :], mask=okm[:, None] & mk[None, :], other=0.0).to(ACC)
        gm = tl.load(GK + rm[:, None] * K + kk[None, :], mask=okm[:, None] & mk[None, :], other=0.0).to(ACC)
        span = tl.cumsum(gm, axis=0) + between[None, :]  # gates over (end of i, l]
        da_t = tl.load(DA + da_base + (m_ * SUB_ + r)[None, :] * Q + li[:, None])  # [j in i, l in m]
        dk = tl.dot(da_t.to(DOT_T), (qm * tl.exp(span)).to(DOT_T), dk, input_precision=PREC, out_dtype=ACC)
        between += tl.sum(gm, axis=0)
    dk = dk * tl.exp(after)

    # Pairs inside sub-chunk i, column by column.
    da_ii = tl.load(DA + da_base + li[:, None] * Q + li[None, :])
    for jj in range(0, SUB_):
        col = tl.sum(tl.where((r == jj)[None, :], da_ii, 0.0), axis=1)  # dA[l, jj], 0 for l < jj
        span = tl.exp(tl.cumsum(tl.where((r > jj)[:, None], g, 0.0), axis=0))  # gates over (jj, l]
        kj = tl.sum(tl.where((r == jj)[:, None], k, 0.0), axis=0)
        dq += col[:, None] * kj[None, :] * span
        dk_j = tl.sum(col[:, None] * q * span, axis=0)
        dk += tl.where((r == jj)[:, None], dk_j[None, :], 0.0)

    # The chunk state's shares: S_in for dq (until the first reset), dS_out for dk (after the last).
    seg_base = (b * NC + c) * Q
    seg = _load_seg(SEG, seg_base, li, li < Q, HAS_RESET)
    first = (seg == 0)[:, None]
    last = (seg == _seg_last(SEG, seg_base, Q, HAS_RESET))[:, None]
    from_start = inside + before[None, :]  # `before` now holds every gate before sub-chunk i
    to_end = after + between[None, :]  # `between` every gate after it
    st = ((b * H + h) * (NC + 1) + c) * K * V
    dq_s = tl.zeros([SUB_, BLOCK_K], ACC)
    dk_s = tl.zeros([SUB_, BLOCK_K], ACC)
    for v0 in range(0, V, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        mv = vv < V
        mkv = mk[None, :] & mv[:, None]
        do = tl.load(DO + row[:, None] * V + vv[None, :], mask=ok[:, None] & mv[None, :], other=0.0).to(ACC)
        v = tl.load(Vp + row[:, None] * V + vv[None, :], mask=ok[:, None] & mv[None, :], other=0.0)
        s_t = tl.load(STATES + st + kk[None, :] * V + vv[:, None], mask=mkv, other=0.0)  # (BV, BK)
        ds_t = tl.load(DSTATES + st + K * V + kk[None, :] * V + vv[:, None], mask=mkv, other=0.0)
        dq_s = tl.dot((do * scale).to(DOT_T), s_t.to(DOT_T), dq_s, input_precision=PREC, out_dtype=ACC)
        dk_s = tl.dot(v.to(DOT_T), ds_t.to(DOT_T), dk_s, input_precision=PREC, out_dtype=ACC)
    dq += dq_s * tl.where(first, tl.exp(tl.where(first, from_start, 0.0)), 0.0)
    dk += dk_s * tl.where(last, tl.exp(tl.where(last, to_end, 0.0)), 0.0)
    tl.store(DQ + row[:, None] * K + kk[None, :], dq.to(DQ.dtype.element_ty), mask=m)
    tl.store(DK + row[:, None] * K + kk[None, :], dk.to(DK.dtype.element_ty), mask=m)
    tl.store(DG + ((b * H + h) * NC * Q + c * Q + li)[:, None] * K + kk[None, :], q * dq - k * dk, mask=mk[None, :])


@triton.jit
def _gla_bwd_dgk_kernel(DG, CPART, DGK, T, H, K, NC, NV,
                        Q: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """DGK: (B, T, H, K), dgk_t = sum over l >= t in the chunk of DG_l + sum of the NV CPART
    partials (the chunk state's share, the same for every gate of the chunk).
    Grid (B * H * NC, cdiv(K, BLOCK_K))."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    l = tl.arange(0, Q)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = kk < K
    dg = tl.load(DG + ((b * H + h) * NC * Q + c * Q + l)[:, None] * K + kk[None, :], mask=mk[None, :], other=0.0)
    cst = tl.zeros([BLOCK_K], ACC)
    for nv in range(0, NV):
        cst += tl.load(CPART + (((b * H + h) * NC + c) * NV + nv) * K + kk, mask=mk, other=0.0)
    dgk = tl.cumsum(dg, axis=0, reverse=True) + cst[None, :]
    t = c * Q + l
    tl.store(DGK + ((b * T + t) * H + h)[:, None] * K + kk[None, :], dgk.to(DGK.dtype.element_ty),
             mask=(t < T)[:, None] & mk[None, :])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> torch.Tensor:
    """The one allocator for kernel outputs; tests replace it with a NaN-filled one so that an
    element a kernel forgets to write fails loudly."""
    return torch.empty(shape, dtype=dtype, device=device)


_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# The largest chunk and channel tile by the matmul operands' element size: 16-bit operands run on
# the tensor cores with 64; fp32 / fp64 ("ieee" products, on the CUDA cores) with 32, which keeps
# their tiles in registers (tools/compile_kernels.py reports the spills). The math does not depend
# on the chunk; the tests widen the fp32 / fp64 entries to run the 64-step layout too.
MAX_TILE = {2: 64, 4: 32, 8: 32}


@dataclass(frozen=True)
class _Plan:
    """Sizes and tiles of one call. Q: the kernels' chunk, a power of two in 16..MAX_TILE (the math
    does not depend on it); BK / BV: key / value channels per tile (>= 16, powers of two, masked)."""
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
    def tile(self):
        return MAX_TILE[self.dtype.itemsize]

    @property
    def BK(self):
        return min(self.tile, max(16, triton.next_power_of_2(self.K)))

    @property
    def BV(self):
        return min(self.tile, max(16, triton.next_power_of_2(self.V)))

    @property
    def warps(self):
        """For the kernels that hold a (Q x BK), (Q x BV) and (BK x BV) tile at once."""
        return 8 if self.Q * max(self.BK, self.BV) >= 32 * 32 else 4

    @property
    def dqk_warps(self):
        """(7') holds (SUB x BK), (SUB x BV) and (BV x BK) tiles whatever Q is, and its column loop
        keeps several (SUB x BK) tiles live: 8 warps from 32-wide tiles on (at 4, fp32 / fp64 with
        Q = 16 ran out of registers: 255 and spills)."""
        return 8 if max(self.BK, self.BV) >= 32 else 4

    def meta(self) -> dict:
        return dict(ACC=_TL[self.acc], DOT_T=_TL[self.dtype],
                    PREC="ieee" if self.dtype in (torch.float32, torch.float64) else "tf32")


def chunk_for(T: int, chunk_size: int, dtype: torch.dtype) -> int:
    """The kernels' chunk: chunk_size rounded up to a power of two in [16, MAX_TILE], no longer
    than T needs (shared with kernels/delta_rule.py)."""
    return min(MAX_TILE[dtype.itemsize], max(16, triton.next_power_of_2(max(1, min(chunk_size, T)))))


def _plan(q, k, v, gk, chunk_size) -> _Plan:
    b, T, H, K = q.shape
    if k.shape != q.shape or gk.shape != q.shape or v.shape[:3] != (b, T, H):
        raise ValueError(f"gla kernels: expected q = k = gk (B,T,H,K), v (B,T,H,V); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, gk {tuple(gk.shape)}, v {tuple(v.shape)}")
    return checked_plan("gla", q, v, chunk_size)


def checked_plan(name: str, q, v, chunk_size: int, max_chunk: int | None = None, cls=_Plan) -> _Plan:
    """The checks and sizes the GLA and delta-rule calls share, once the caller has checked its
    shapes: non-empty, a supported dtype, chunk_size >= 1 (capped at max_chunk), int32 offsets."""
    b, T, H, K = q.shape
    V = v.shape[-1]
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f"{name} kernels: empty input q {tuple(q.shape)}, v {tuple(v.shape)}")
    if v.dtype not in _TL:
        raise ValueError(f"{name} kernels: v must be fp32, bf16, fp16 or fp64; got {v.dtype}")
    if chunk_size < 1:
        raise ValueError(f"{name} kernels: chunk_size must be >= 1; got {chunk_size}")
    Q = chunk_for(T, chunk_size, v.dtype)
    if max_chunk is not None:
        Q = min(Q, max_chunk)
    if Q * H * max(K, V) >= 2**31:
        raise ValueError(f"{name} kernels: chunk * H * max(K, V) must be < 2^31 (int32 offsets inside a chunk)")
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return cls(b, T, H, K, V, Q, triton.cdiv(T, Q), v.dtype, acc)


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
        num_warps=pl.warps)
    ns = pl.Q // SUB
    a = _empty((pl.B, pl.H, pl.nc, pl.Q, pl.Q), pl.acc, dev)
    _gla_fwd_a_kernel[(pl.B * pl.H * pl.nc, ns, ns)](
        q, k, gk, seg, a, pl.T, pl.H, pl.K, pl.nc, Q=pl.Q, SUB_=SUB, BLOCK_K=pl.BK, HAS_RESET=has_reset, **m,
        num_warps=4)
    o = _empty(v.shape, v.dtype, dev)
    _gla_fwd_o_kernel[(pl.B * pl.H * pl.nc, triton.cdiv(pl.V, pl.BV))](
        q, v, gk, seg, a, states, o, float(scale), pl.T, pl.H, pl.K, pl.V, pl.nc, pl.H * pl.K, pl.H * pl.V,
        Q=pl.Q, SUB_=SUB, BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_RESET=has_reset, **m, num_warps=pl.warps)
    return o, states[:, :, pl.nc].contiguous()


def gla_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float, chunk_size: int,
            initial_state: torch.Tensor | None, reset: torch.Tensor | None, do: torch.Tensor,
            dfinal: torch.Tensor | None = None):
    """Gradients of gla_fwd for dL/do = do (B, T, H, V) and dL/d(final state) = dfinal or None:
    (dq, dk, dv, dgk, d initial_state), each in its input's dtype (d initial_state None without
    one). The chunk states and the intra-chunk scores are recomputed from the inputs."""
    pl = _plan(q, k, v, gk, chunk_size)
    dtypes = (q.dtype, k.dtype, gk.dtype)
    q, k = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous()
    v, gk, do = v.contiguous(), gk.contiguous(), do.to(v.dtype).contiguous()
    dev = v.device
    s0 = None if initial_state is None else initial_state.contiguous()
    if pl.acc == torch.float64:  # a float argument reaches the kernel as fp32: scale in fp64 here
        do, scale = do * scale, 1.0
    scale = float(scale)
    seg, has_reset = segments(reset, pl.B, pl.T, pl.Q, pl.nc, dev)
    m = pl.meta()
    nk, nv, ns = triton.cdiv(pl.K, pl.BK), triton.cdiv(pl.V, pl.BV), pl.Q // SUB
    # Recompute the forward's chunk states and scores.
    states = _empty((pl.B, pl.H, pl.nc + 1, pl.K, pl.V), pl.acc, dev)
    _gla_fwd_h_kernel[(pl.B * pl.H, nk, nv)](
        k, v, gk, seg, s0 if s0 is not None else states, states, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q,
        BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_S0=s0 is not None, HAS_RESET=has_reset, **m, num_warps=pl.warps)
    a = _empty((pl.B, pl.H, pl.nc, pl.Q, pl.Q), pl.acc, dev)
    _gla_fwd_a_kernel[(pl.B * pl.H * pl.nc, ns, ns)](
        q, k, gk, seg, a, pl.T, pl.H, pl.K, pl.nc, Q=pl.Q, SUB_=SUB, BLOCK_K=pl.BK, HAS_RESET=has_reset, **m,
        num_warps=4)
    # The reverse state pass, then the chunks in parallel.
    dstates = _empty((pl.B, pl.H, pl.nc + 1, pl.K, pl.V), pl.acc, dev)
    cpart = _empty((pl.B, pl.H, pl.nc, nv, pl.K), pl.acc, dev)
    dfin = None if dfinal is None else dfinal.contiguous()
    _gla_bwd_dh_kernel[(pl.B * pl.H, nk, nv)](
        q, gk, do, seg, states, dfin if dfin is not None else states, dstates, cpart, scale, pl.T, pl.H, pl.K, pl.V,
        pl.nc, nv, Q=pl.Q, BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_DFIN=dfin is not None, HAS_RESET=has_reset, **m,
        num_warps=pl.warps)
    da = _empty((pl.B, pl.H, pl.nc, pl.Q, pl.Q), pl.acc, dev)
    _gla_bwd_da_kernel[(pl.B * pl.H * pl.nc,)](
        do, v, seg, da, scale, pl.T, pl.H, pl.V, pl.nc, Q=pl.Q, BLOCK_V=pl.BV, HAS_RESET=has_reset, **m,
        num_warps=pl.warps)
    dv = _empty(v.shape, v.dtype, dev)
    _gla_bwd_dv_kernel[(pl.B * pl.H * pl.nc, nv)](
        k, gk, do, seg, a, dstates, dv, scale, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q, SUB_=SUB, BLOCK_K=pl.BK,
        BLOCK_V=pl.BV, HAS_RESET=has_reset, **m, num_warps=pl.warps)
    dq = _empty(q.shape, dtypes[0], dev)
    dk = _empty(k.shape, dtypes[1], dev)
    dg = _empty((pl.B, pl.H, pl.nc * pl.Q, pl.K), pl.acc, dev)
    _gla_bwd_dqk_kernel[(pl.B * pl.H * pl.nc, ns, nk)](
        q, k, v, gk, do, seg, da, states, dstates, dq, dk, dg, scale, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q,
        SUB_=SUB, BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_RESET=has_reset, **m, num_warps=pl.dqk_warps)
    dgk = _empty(gk.shape, dtypes[2], dev)
    _gla_bwd_dgk_kernel[(pl.B * pl.H * pl.nc, nk)](
        dg, cpart, dgk, pl.T, pl.H, pl.K, pl.nc, nv, Q=pl.Q, BLOCK_K=pl.BK, ACC=m["ACC"], num_warps=4)
    ds0 = None if s0 is None else dstates[:, :, 0].to(initial_state.dtype).contiguous()
    return dq, dk, dv, dgk, ds0
