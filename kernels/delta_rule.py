"""The gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), the chunked WY
form in Triton, forward and backward.

Per head, a matrix state S (K, V), a scalar decay exp(g_t) and a write strength beta_t (fla's
chunk_gated_delta_rule conventions):
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      g_t <= 0
    o_t = scale q_t S_t
A document reset at t drops S_{t-1}. The judge is megarnn/ops/delta_rule.py (`_delta_reference`,
and `_delta_chunked`, whose WY / UT decomposition and reset masks this file follows).

Algorithm (time cut into chunks of Q steps, Q a power of two in 16..64; i, j positions in a chunk;
seg_i = resets at positions <= i; L_ij = exp(sum of g over (j, i]) for j <= i in one segment, else 0)
--------------------------------------------------------------------------------------------
  (1) _delta_wy_kernel, grid (B H NC): the UT transform
        A  = strictly_lower(beta_i k_i . k_j L_ij)               (Q x Q), tl.dot over K tiles
        Tm = (I + A)^-1                                          forward substitution, row by row
        u  = Tm (beta v),  w = Tm (beta k from_start)            from_start_i = [seg_i = 0] exp(g over [0, i])
      U (B, H, NC Q, V), W (B, H, NC Q, K) in fp32 (fp64).
  (2) _delta_fwd_h_kernel, grid (B H, V / BV), sequential over the chunks (all of K per program,
      in tiles of BK, the state kept in STATES and re-read: S is K x BV):
        v_new = u - w S_in                                        (the chunk's "pseudo-values")
        S_out = through S_in + (k to_end)^T v_new                 to_end_j = [seg_j = seg_last] exp(g over (j, last])
      STATES (B, H, NC + 1, K, V): the state entering each chunk, the final state last; VNEW
      (B, H, NC Q, V). The program re-reads what it wrote one step before: tl.debug_barrier
      between the phases.
  (3) _delta_fwd_o_kernel, grid (B H NC, V / BV):
        o = scale ((q from_start) S_in + ((q k^T) * L) v_new)     (L with its diagonal)
Every log decay is a direct sum of g over the steps it spans (a cumsum), never a difference of
two cumulative sums; resets are masks (tl.where), never -inf logs; every exp argument is <= 0.
Positions past T read as zeros (g = 0, beta = 0, k = 0: the state passes unchanged).

Backward (do' = scale dL/do, dS_fin = dL/d final state or None; q unscaled). Only the inputs are
saved: (1) (storing Tm too) and (2) are recomputed, then
  (1') _delta_bwd_dvl_kernel: DVN = ((q k^T) * L)^T do', the chunk-local part of dL/dv_new.
  (2') _delta_bwd_dh_kernel, grid (B H, V / BV), the chunks in reverse (the state gradient kept in
       DSTATES and re-read, as (2)):
         dv_new = DVN + (k to_end) dS_out;   dS_in = through dS_out + (q from_start)^T do' - w^T dv_new
       and per chunk <dS_out, S_out>: the gradient of every gate of the chunk through its state.
  (3') _delta_bwd_chunk_kernel, grid (B H NC), the rest of a chunk in three passes over V / K:
         dP = do' v_new^T;  db_v = Tm^T dv_new, dv = beta db_v;  db_k = Tm^T (-dv_new S_in^T)
         dA = -(db_v u^T + db_k w^T) (strictly lower), the gradient of A = beta_i (k_i.k_j) L_ij
         dq = (dP * L) k + from_start * (do' S_in^T)
         dk = (dP * L)^T q + dG k + dG^T k + to_end * (v_new dS_out^T) + beta from_start db_k
         dbeta = db_v.v + from_start db_k.k + rowsum(dA * (k k^T) * L)
       with dG = dA * beta * L; the gradient of the cumulative decay Gamma (every decay above is a
       difference of it): rowsum(Z) - colsum(Z) + from_start dfrom_start - to_end dto_end,
       Z = dL * L, then dg = its reverse cumsum in the chunk + <dS_out, S_out>.

Cost per token and head (forward; multiply-add = 2): FLOPs K Q (A) + ~Q^2 / 2 (the substitution,
scalar) + Q (V + K) (u, w) + 4 K V (w S, the state update) + K Q + Q V / 2 + 2 K V (output);
bytes (2 K + 2 V) s + 4 (K + V) (U, W in fp32) + 8 V (VNEW) + 8 K V / Q. At deltanet-1b's shape
in bf16 (K = 256, V = 512, Q = 64) ~1.2 MFLOP and ~30 KB per token and head. The backward
recomputes the forward and costs about 3-4x its FLOPs and bytes (the fp32 states, their gradients
and the S_in / dS_out reads of (3') in both of its K passes).

Dtypes: q, k, v fp32, bf16, fp16 or fp64 (one dtype, the matmul operands), g and beta any float
dtype read as fp32 (fp64 for fp64 v); accumulation, U, W, VNEW and the states in fp32 (fp64).
fp32 matmuls use input_precision="ieee"; bf16 / fp16 round their operands to their dtype.

Tiles (_Plan, MAX_TILE of kernels/gla.py): chunk Q and key / value tiles of 64 for 16-bit
operands, 32 for fp32 / fp64; the backward's reverse pass and chunk kernel use half-width tiles
(they hold more at once); 8 warps. The backward caps Q at 32 when K or V is not a multiple of 16
(every tile then loads element by element, an address and a mask each, and (3') spills at Q = 64).
(3) and (3') address a chunk as a scalar int64 base plus int32 offsets (Q H max(K, V) < 2^31,
_plan), not per-element int64 rows held across their loops; (3') launches with maxnreg=255 on
sm_90 and later and for fp64 (target_options: ptxas otherwise trades spills for occupancy); fp64
adds two launch options (_Plan.fp64_opts). Compiled
for sm_80 / sm_90 (tools/compile_kernels.py: deltanet-1b, deltanet-tiny and the ragged shape) none
spills in bf16, fp32 or fp64.
First guesses, not yet run or tuned on a GPU; the UT transform's forward substitution is Q
sequential row updates of a (Q x Q) tile, the first thing to replace (fla: 16 x 16 diagonal
blocks, then block products) if it shows in a profile.

Host functions (torch tensors in and out; no autograd: megarnn/ops/delta_rule.py wraps them):
    delta_fwd(q, k, v, g, beta, scale, chunk_size, initial_state=None, reset=None) -> (o, final_state)
    delta_bwd(q, k, v, g, beta, scale, chunk_size, initial_state, reset, do, dfinal=None)
        -> (dq, dk, dv, dg, dbeta, d_initial_state)
Shapes: q, k (B, T, H, K); v (B, T, H, V); g, beta (B, T, H); initial / final state (B, H, K, V);
reset (B, T) bool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megarnn_kernels.gla import MAX_TILE, _empty, _load_seg, _seg_last, checked_plan, segments  # noqa: F401  (MAX_TILE: tests)
from megarnn_kernels.gla import _Plan as _GLAPlan
from megarnn_kernels.linear_scan import _arch

# True when the kernels were decorated under Triton's interpreter (TRITON_INTERPRET=1).
INTERPRETED = triton.knobs.runtime.interpret


@triton.jit
def _decays(G, SEG, b, h, c, T, H, NC, Q: tl.constexpr, HAS_RESET: tl.constexpr, ACC: tl.constexpr):
    """For chunk c: L (Q x Q) = exp(g over (j, i]) for j <= i in one segment (else 0), from_start (Q,)
    and the segment ids (Q,)."""
    i = tl.arange(0, Q)
    t = c * Q + i
    g = tl.load(G + (b * T + t) * H + h, mask=t < T, other=0.0).to(ACC)
    seg = _load_seg(SEG, (b * NC + c) * Q, i, i < Q, HAS_RESET)
    span = tl.cumsum(tl.where(i[:, None] > i[None, :], g[:, None], 0.0), axis=0)  # rows i, columns j
    keep = (i[None, :] <= i[:, None]) & (seg[:, None] == seg[None, :])
    L = tl.where(keep, tl.exp(tl.where(keep, span, 0.0)), 0.0)
    first = seg == 0
    from_start = tl.where(first, tl.exp(tl.where(first, tl.cumsum(g, axis=0), 0.0)), 0.0)
    return L, from_start, seg


@triton.jit
def _delta_wy_kernel(Kp, Vp, G, BETA, SEG, U, W, TM, T, H, K, V, NC,
                     Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_RESET: tl.constexpr,
                     STORE_T: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(1) U: (B, H, NC Q, V), W: (B, H, NC Q, K); with STORE_T also TM (B, H, NC, Q, Q) = (I + A)^-1
    (for the backward). Grid (B * H * NC,)."""
    pid = tl.program_id(0)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    i = tl.arange(0, Q)
    t = c * Q + i
    t_ok = t < T
    row = (b * T + t) * H + h
    L, from_start, seg = _decays(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
    beta = tl.load(BETA + row, mask=t_ok, other=0.0).to(ACC)
    kk_acc = tl.zeros([Q, Q], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
        kk_acc = tl.dot(k.to(DOT_T), tl.trans(k.to(DOT_T)), kk_acc, input_precision=PREC, out_dtype=ACC)
    a = tl.where(i[:, None] > i[None, :], kk_acc * L * beta[:, None], 0.0)
    # (I + a)^-1 by forward substitution: row r = e_r - sum_{j < r} a_rj row_j.
    inv = tl.where(i[:, None] == i[None, :], 1.0, 0.0).to(ACC)
    for r in range(1, Q):
        a_r = tl.sum(tl.where((i == r)[:, None], a, 0.0), axis=0)  # row r of a, indexed by j
        new = tl.sum(a_r[:, None] * inv, axis=0)
        inv = tl.where((i == r)[:, None], inv - new[None, :], inv)
    if STORE_T:
        tl.store(TM + ((b * H + h) * NC + c) * Q * Q + i[:, None] * Q + i[None, :], inv)
    inv_d = inv.to(DOT_T)
    out_base = (b * H + h) * NC * Q + c * Q + i  # (b, h, chunk position)
    for v0 in range(0, V, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        v = tl.load(Vp + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & (vv < V)[None, :], other=0.0)
        u = tl.dot(inv_d, (v.to(ACC) * beta[:, None]).to(DOT_T), input_precision=PREC, out_dtype=ACC)
        tl.store(U + out_base[:, None] * V + vv[None, :], u, mask=(vv < V)[None, :])
    coef = beta * from_start
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
        w = tl.dot(inv_d, (k.to(ACC) * coef[:, None]).to(DOT_T), input_precision=PREC, out_dtype=ACC)
        tl.store(W + out_base[:, None] * K + kk[None, :], w, mask=(kk < K)[None, :])


@triton.jit
def _delta_fwd_h_kernel(Kp, G, SEG, U, W, S0, STATES, VNEW, T, H, K, V, NC,
                        Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_S0: tl.constexpr,
                        HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(2) STATES: (B, H, NC + 1, K, V); VNEW: (B, H, NC Q, V). Grid (B * H, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = (pid // H).to(tl.int64), pid % H
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    i = tl.arange(0, Q)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (kk < K)[:, None] & mv[None, :]
        if HAS_S0:
            s = tl.load(S0 + (b * H + h) * K * V + kk[:, None] * V + vv[None, :], mask=m, other=0.0).to(ACC)
        else:
            s = tl.zeros([BLOCK_K, BLOCK_V], ACC)
        tl.store(STATES + (b * H + h) * (NC + 1) * K * V + kk[:, None] * V + vv[None, :], s, mask=m)
    for c in range(0, NC):
        tl.debug_barrier()  # STATES[c] was written by other threads of this program
        t = c * Q + i
        t_ok = t < T
        row = (b * T + t) * H + h
        pos = (b * H + h) * NC * Q + c * Q + i
        st_in = ((b * H + h) * (NC + 1) + c) * K * V
        vn = tl.load(U + pos[:, None] * V + vv[None, :], mask=mv[None, :], other=0.0)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < K
            s = tl.load(STATES + st_in + kk[:, None] * V + vv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            w = tl.load(W + pos[:, None] * K + kk[None, :], mask=mk[None, :], other=0.0)
            vn -= tl.dot(w.to(DOT_T), s.to(DOT_T), input_precision=PREC, out_dtype=ACC)
        tl.store(VNEW + pos[:, None] * V + vv[None, :], vn, mask=mv[None, :])
        g = tl.load(G + row, mask=t_ok, other=0.0).to(ACC)
        g_next = tl.load(G + row + H, mask=(i + 1 < Q) & (t + 1 < T), other=0.0).to(ACC)
        after = tl.cumsum(g_next, axis=0, reverse=True)  # g over (j, last]
        seg_base = (b * NC + c) * Q
        seg = _load_seg(SEG, seg_base, i, i < Q, HAS_RESET)
        seg_last = _seg_last(SEG, seg_base, Q, HAS_RESET)
        keep = seg == seg_last
        to_end = tl.where(keep, tl.exp(tl.where(keep, after, 0.0)), 0.0)
        through = tl.where(seg_last == 0, tl.exp(tl.sum(g, axis=0)), 0.0)
        vn_d = vn.to(DOT_T)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < K
            m = mk[:, None] & mv[None, :]
            s = tl.load(STATES + st_in + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
            k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & mk[None, :], other=0.0)
            kd = tl.trans((k.to(ACC) * to_end[:, None]).to(DOT_T))
            s = s * through + tl.dot(kd, vn_d, input_precision=PREC, out_dtype=ACC)
            tl.store(STATES + st_in + K * V + kk[:, None] * V + vv[None, :], s, mask=m)


@triton.jit
def _delta_fwd_o_kernel(Qp, Kp, G, SEG, STATES, VNEW, O, scale, T, H, K, V, NC,
                        Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_RESET: tl.constexpr,
                        ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(3) O: (B, T, H, V). Grid (B * H * NC, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    i = tl.arange(0, Q)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    t = c * Q + i
    t_ok = t < T
    rbase = (b * T + c * Q) * H + h  # the chunk's first row (int64); offsets in it int32 (< 2^31: _plan)
    ri = i * H
    st_in = ((b * H + h) * (NC + 1) + c) * K * V
    qk = tl.zeros([Q, Q], ACC)
    qs = tl.zeros([Q, BLOCK_V], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        m = t_ok[:, None] & mk[None, :]
        q = tl.load(Qp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0).to(DOT_T)
        k = tl.load(Kp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0).to(DOT_T)
        s = tl.load(STATES + st_in + (kk[:, None] * V + vv[None, :]), mask=mk[:, None] & mv[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), qk, input_precision=PREC, out_dtype=ACC)
        qs = tl.dot(q, s.to(DOT_T), qs, input_precision=PREC, out_dtype=ACC)
    L, from_start, seg = _decays(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
    vn = tl.load(VNEW + ((b * H + h) * NC * Q + c * Q) * V + (i[:, None] * V + vv[None, :]), mask=mv[None, :],
                 other=0.0)
    o = qs * from_start[:, None] + tl.dot((qk * L).to(DOT_T), vn.to(DOT_T), input_precision=PREC, out_dtype=ACC)
    tl.store(O + rbase * V + (ri[:, None] * V + vv[None, :]), (o * scale).to(O.dtype.element_ty),
             mask=t_ok[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------
# Backward kernels (do' = scale do; q unscaled)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _to_end(G, SEG, b, h, c, T, H, NC, Q: tl.constexpr, HAS_RESET: tl.constexpr, ACC: tl.constexpr):
    """(Q,) [seg_j = seg_last] exp(g over (j, last]) and the scalar [no reset] exp(g over the chunk)."""
    i = tl.arange(0, Q)
    t = c * Q + i
    row = (b * T + t) * H + h
    g = tl.load(G + row, mask=t < T, other=0.0).to(ACC)
    g_next = tl.load(G + row + H, mask=(i + 1 < Q) & (t + 1 < T), other=0.0).to(ACC)
    after = tl.cumsum(g_next, axis=0, reverse=True)
    seg_base = (b * NC + c) * Q
    seg_last = _seg_last(SEG, seg_base, Q, HAS_RESET)
    keep = _load_seg(SEG, seg_base, i, i < Q, HAS_RESET) == seg_last
    to_end = tl.where(keep, tl.exp(tl.where(keep, after, 0.0)), 0.0)
    through = tl.where(seg_last == 0, tl.exp(tl.sum(g, axis=0)), 0.0)
    return to_end, through


@triton.jit
def _delta_bwd_dvl_kernel(Qp, Kp, G, SEG, DO, DVN, scale, T, H, K, V, NC,
                          Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_RESET: tl.constexpr,
                          ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """DVN: (B, H, NC Q, V) = ((q k^T) * L)^T do', the chunk-local part of dL/dv_new.
    Grid (B * H * NC, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    i = tl.arange(0, Q)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    t = c * Q + i
    t_ok = t < T
    row = (b * T + t) * H + h
    qk = tl.zeros([Q, Q], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = t_ok[:, None] & (kk < K)[None, :]
        q = tl.load(Qp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(DOT_T)
        k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=m, other=0.0).to(DOT_T)
        qk = tl.dot(q, tl.trans(k), qk, input_precision=PREC, out_dtype=ACC)
    L, from_start, seg = _decays(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
    do = tl.load(DO + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & mv[None, :], other=0.0).to(ACC)
    dvn = tl.dot(tl.trans((qk * L).to(DOT_T)), (do * scale).to(DOT_T), input_precision=PREC, out_dtype=ACC)
    tl.store(DVN + ((b * H + h) * NC * Q + c * Q + i)[:, None] * V + vv[None, :], dvn, mask=mv[None, :])


@triton.jit
def _delta_bwd_dh_kernel(Qp, Kp, G, SEG, DO, W, STATES, DFIN, DSTATES, DVN, CPART, scale, T, H, K, V, NC, NV,
                         Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_DFIN: tl.constexpr,
                         HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(2') The reverse state pass, chunks last to first (all of K per program, in tiles):
        dv_new = DVN + (k to_end) dS_out                      (completes DVN in place)
        dS_in  = through dS_out + (q from_start)^T do' - w^T dv_new
    DSTATES (B, H, NC + 1, K, V): slot c the gradient of the state entering chunk c (slot 0: the
    initial state's), slot NC the final state's. CPART (B, H, NC, NV): this V block's
    <dS_out, S_out>, the chunk state's share of every gate's gradient. Grid (B * H, cdiv(V, BLOCK_V))."""
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = (pid // H).to(tl.int64), pid % H
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mv = vv < V
    i = tl.arange(0, Q)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (kk < K)[:, None] & mv[None, :]
        if HAS_DFIN:
            ds = tl.load(DFIN + (b * H + h) * K * V + kk[:, None] * V + vv[None, :], mask=m, other=0.0).to(ACC)
        else:
            ds = tl.zeros([BLOCK_K, BLOCK_V], ACC)
        tl.store(DSTATES + ((b * H + h) * (NC + 1) + NC) * K * V + kk[:, None] * V + vv[None, :], ds, mask=m)
    for cc in range(0, NC):
        c = NC - 1 - cc
        tl.debug_barrier()  # DSTATES[c + 1] was written by other threads of this program
        t = c * Q + i
        t_ok = t < T
        row = (b * T + t) * H + h
        pos = (b * H + h) * NC * Q + c * Q + i
        st_out = ((b * H + h) * (NC + 1) + c + 1) * K * V
        to_end, through = _to_end(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
        dvn = tl.load(DVN + pos[:, None] * V + vv[None, :], mask=mv[None, :], other=0.0)
        csum = tl.zeros([BLOCK_V], ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < K
            m = mk[:, None] & mv[None, :]
            ds = tl.load(DSTATES + st_out + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
            s = tl.load(STATES + st_out + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
            csum += tl.sum(ds * s, axis=0)
            k = tl.load(Kp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
            dvn = tl.dot((k * to_end[:, None]).to(DOT_T), ds.to(DOT_T), dvn, input_precision=PREC, out_dtype=ACC)
        tl.store(DVN + pos[:, None] * V + vv[None, :], dvn, mask=mv[None, :])
        tl.store(CPART + ((b * H + h) * NC + c) * NV + pid_v, tl.sum(csum, axis=0))
        L, from_start, seg = _decays(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
        do = tl.load(DO + row[:, None] * V + vv[None, :], mask=t_ok[:, None] & mv[None, :], other=0.0).to(ACC)
        do_d = (do * scale).to(DOT_T)
        dvn_d = dvn.to(DOT_T)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < K
            m = mk[:, None] & mv[None, :]
            ds = tl.load(DSTATES + st_out + kk[:, None] * V + vv[None, :], mask=m, other=0.0)
            q = tl.load(Qp + row[:, None] * K + kk[None, :], mask=t_ok[:, None] & mk[None, :], other=0.0).to(ACC)
            w = tl.load(W + pos[:, None] * K + kk[None, :], mask=mk[None, :], other=0.0)
            ds = ds * through + tl.dot(tl.trans((q * from_start[:, None]).to(DOT_T)), do_d, input_precision=PREC,
                                       out_dtype=ACC)
            ds -= tl.dot(tl.trans(w.to(DOT_T)), dvn_d, input_precision=PREC, out_dtype=ACC)
            tl.store(DSTATES + st_out - K * V + kk[:, None] * V + vv[None, :], ds, mask=m)


@triton.jit
def _delta_bwd_chunk_kernel(Qp, Kp, Vp, G, BETA, SEG, DO, U, W, TM, STATES, DSTATES, VNEW, DVN, CPART, DBK,
                            DQ, DK, DV, DG, DBETA, scale, T, H, K, V, NC, NV,
                            Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                            HAS_RESET: tl.constexpr, ACC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """(3') Everything else of one chunk, given dv_new (DVN), S_in, dS_out:
        dP = do' v_new^T;  db_v = Tm^T dv_new, dv = beta db_v;  dw = -dv_new S_in^T, db_k = Tm^T dw
        dA = -(db_v u^T + db_k w^T) (strictly lower), A = beta_i (k_i.k_j) L_ij
        dq = (dP * L) k + from_start * (do' S_in^T)
        dk = (dP * L)^T q + dG k + dG^T k + to_end * (v_new dS_out^T) + beta from_start db_k,
             dG = dA * beta_i * L (the gradient of k k^T)
        dbeta_i = db_v.v + from_start db_k.k + sum_j dA_ij (k_i.k_j) L_ij
        dGamma (the cumulative decay from the chunk start) = rowsum(Z) - colsum(Z)
             + from_start dfrom_start - to_end dto_end,  Z = dL * L, then dg = reverse cumsum + the
             chunk state's share sum(CPART).
    DBK: (B, H, NC Q, K) scratch (db_k between two passes). Grid (B * H * NC,)."""
    pid = tl.program_id(0)
    c = pid % NC
    b, h = (pid // NC // H).to(tl.int64), (pid // NC) % H
    i = tl.arange(0, Q)
    t = c * Q + i
    t_ok = t < T
    # Scalar (int64) chunk bases and int32 offsets in the chunk (< 2^31: _plan), not per-element int64
    # rows: fewer registers held across the passes.
    rbase = (b * T + c * Q) * H + h
    ri = i * H
    pbase = (b * H + h) * NC * Q + c * Q
    st_in = ((b * H + h) * (NC + 1) + c) * K * V
    _, from_start, seg = _decays(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)  # L: later (fewer live tiles)
    beta = tl.load(BETA + rbase + ri, mask=t_ok, other=0.0).to(ACC)
    tm_t = tl.trans(tl.load(TM + ((b * H + h) * NC + c) * Q * Q + (i[:, None] * Q + i[None, :])).to(DOT_T))
    dA = tl.zeros([Q, Q], ACC)
    dbeta = tl.zeros([Q], ACC)
    # Pass over V: db_v -> dv, dA's u part.
    for v0 in range(0, V, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        mv = vv < V
        dvn = tl.load(DVN + pbase * V + (i[:, None] * V + vv[None, :]), mask=mv[None, :], other=0.0)
        u = tl.load(U + pbase * V + (i[:, None] * V + vv[None, :]), mask=mv[None, :], other=0.0)
        v = tl.load(Vp + rbase * V + (ri[:, None] * V + vv[None, :]), mask=t_ok[:, None] & mv[None, :],
                    other=0.0).to(ACC)
        dbv = tl.dot(tm_t, dvn.to(DOT_T), input_precision=PREC, out_dtype=ACC)
        dA -= tl.dot(dbv.to(DOT_T), tl.trans(u.to(DOT_T)), input_precision=PREC, out_dtype=ACC)
        tl.store(DV + rbase * V + (ri[:, None] * V + vv[None, :]), (beta[:, None] * dbv).to(DV.dtype.element_ty),
                 mask=t_ok[:, None] & mv[None, :])
        dbeta += tl.sum(dbv * v, axis=1)
    # Pass over K: db_k (kept in DBK), dA's w part.
    dfs = tl.zeros([Q], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        dw = tl.zeros([Q, BLOCK_K], ACC)
        for v0 in range(0, V, BLOCK_V):
            vv = v0 + tl.arange(0, BLOCK_V)
            mv = vv < V
            dvn = tl.load(DVN + pbase * V + (i[:, None] * V + vv[None, :]), mask=mv[None, :], other=0.0)
            s_t = tl.load(STATES + st_in + (kk[None, :] * V + vv[:, None]), mask=mk[None, :] & mv[:, None], other=0.0)
            dw -= tl.dot(dvn.to(DOT_T), s_t.to(DOT_T), input_precision=PREC, out_dtype=ACC)
        dbk = tl.dot(tm_t, dw.to(DOT_T), input_precision=PREC, out_dtype=ACC)
        w = tl.load(W + pbase * K + (i[:, None] * K + kk[None, :]), mask=mk[None, :], other=0.0)
        dA -= tl.dot(dbk.to(DOT_T), tl.trans(w.to(DOT_T)), input_precision=PREC, out_dtype=ACC)
        tl.store(DBK + pbase * K + (i[:, None] * K + kk[None, :]), dbk, mask=mk[None, :])
        k = tl.load(Kp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=t_ok[:, None] & mk[None, :], other=0.0)
        dbk_k = tl.sum(dbk * k.to(ACC), axis=1)
        dbeta += from_start * dbk_k
        dfs += beta * dbk_k
    # A's share (k k^T, L): dG = dA beta L, the gradient of k k^T; then P's share (q k^T, L).
    dA = tl.where(i[:, None] > i[None, :], dA, 0.0)
    L, _, _ = _decays(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
    gram = tl.zeros([Q, Q], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k = tl.load(Kp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=t_ok[:, None] & (kk < K)[None, :], other=0.0)
        gram = tl.dot(k.to(DOT_T), tl.trans(k.to(DOT_T)), gram, input_precision=PREC, out_dtype=ACC)
    dAL = dA * L
    dbeta += tl.sum(dAL * gram, axis=1)
    Z = dAL * beta[:, None] * gram
    dgam = tl.sum(Z, axis=1) - tl.sum(Z, axis=0)
    dG = dAL * beta[:, None]
    gram = tl.zeros([Q, Q], ACC)  # now q k^T
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = t_ok[:, None] & (kk < K)[None, :]
        q = tl.load(Qp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0)
        k = tl.load(Kp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0)
        gram = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), gram, input_precision=PREC, out_dtype=ACC)
    dP = tl.zeros([Q, Q], ACC)
    for v0 in range(0, V, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        mv = vv < V
        do = tl.load(DO + rbase * V + (ri[:, None] * V + vv[None, :]), mask=t_ok[:, None] & mv[None, :],
                     other=0.0).to(ACC)
        vn = tl.load(VNEW + pbase * V + (i[:, None] * V + vv[None, :]), mask=mv[None, :], other=0.0)
        dP = tl.dot((do * scale).to(DOT_T), tl.trans(vn.to(DOT_T)), dP, input_precision=PREC, out_dtype=ACC)
    R = dP * L
    Z = R * gram
    dgam += tl.sum(Z, axis=1) - tl.sum(Z, axis=0)
    R_d = R.to(DOT_T)
    dG_d = dG.to(DOT_T)
    # Pass over K: dq (the incoming state's share through do' S_in^T).
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        m = t_ok[:, None] & mk[None, :]
        k = tl.load(Kp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0)
        dqs = tl.zeros([Q, BLOCK_K], ACC)
        for v0 in range(0, V, BLOCK_V):
            vv = v0 + tl.arange(0, BLOCK_V)
            mv = vv < V
            do = tl.load(DO + rbase * V + (ri[:, None] * V + vv[None, :]), mask=t_ok[:, None] & mv[None, :],
                         other=0.0).to(ACC)
            s_t = tl.load(STATES + st_in + (kk[None, :] * V + vv[:, None]), mask=mk[None, :] & mv[:, None], other=0.0)
            dqs = tl.dot((do * scale).to(DOT_T), s_t.to(DOT_T), dqs, input_precision=PREC, out_dtype=ACC)
        q = tl.load(Qp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0)
        dfs += tl.sum(q.to(ACC) * dqs, axis=1)
        dq = tl.dot(R_d, k.to(DOT_T), input_precision=PREC, out_dtype=ACC) + from_start[:, None] * dqs
        tl.store(DQ + rbase * K + (ri[:, None] * K + kk[None, :]), dq.to(DQ.dtype.element_ty), mask=m)
    # Pass over K: dk (the outgoing state's share through v_new dS_out^T).
    to_end, through = _to_end(G, SEG, b, h, c, T, H, NC, Q, HAS_RESET, ACC)
    dte = tl.zeros([Q], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        m = t_ok[:, None] & mk[None, :]
        dks = tl.zeros([Q, BLOCK_K], ACC)
        for v0 in range(0, V, BLOCK_V):
            vv = v0 + tl.arange(0, BLOCK_V)
            mv = vv < V
            vn = tl.load(VNEW + pbase * V + (i[:, None] * V + vv[None, :]), mask=mv[None, :], other=0.0)
            ds_t = tl.load(DSTATES + st_in + K * V + (kk[None, :] * V + vv[:, None]), mask=mk[None, :] & mv[:, None],
                           other=0.0)
            dks = tl.dot(vn.to(DOT_T), ds_t.to(DOT_T), dks, input_precision=PREC, out_dtype=ACC)
        k = tl.load(Kp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0)
        dte += tl.sum(k.to(ACC) * dks, axis=1)
        dbk = tl.load(DBK + pbase * K + (i[:, None] * K + kk[None, :]), mask=mk[None, :], other=0.0)
        dk = to_end[:, None] * dks + (beta * from_start)[:, None] * dbk
        k_d = k.to(DOT_T)
        dk = tl.dot(dG_d, k_d, dk, input_precision=PREC, out_dtype=ACC)
        dk = tl.dot(tl.trans(dG_d), k_d, dk, input_precision=PREC, out_dtype=ACC)
        q = tl.load(Qp + rbase * K + (ri[:, None] * K + kk[None, :]), mask=m, other=0.0)
        dk = tl.dot(tl.trans(R_d), q.to(DOT_T), dk, input_precision=PREC, out_dtype=ACC)
        tl.store(DK + rbase * K + (ri[:, None] * K + kk[None, :]), dk.to(DK.dtype.element_ty), mask=m)
    dgam += from_start * dfs - to_end * dte
    cst = tl.zeros([Q], ACC)  # the chunk state's share, the same for every step
    for nv in range(0, NV):
        cst += tl.load(CPART + ((b * H + h) * NC + c) * NV + nv)
    dg = tl.cumsum(dgam, axis=0, reverse=True) + cst
    tl.store(DG + rbase + ri, dg.to(DG.dtype.element_ty), mask=t_ok)
    tl.store(DBETA + rbase + ri, dbeta.to(DBETA.dtype.element_ty), mask=t_ok)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def target_options(kernel: str, launch: dict, arch: int | None) -> dict:
    """Launch options that depend on the GPU (arch 80, 90, ...; None off CUDA); tools/
    compile_kernels.py asks for each target it compiles for. (3') on sm_90 and later: a budget of
    255 registers (left to itself ptxas aims its 4-warp Q = 16 variants at 3 programs per SM, 168
    registers, and spills; they need ~210); on sm_80 only for fp64 (4 bytes spilled without), so
    fp32 / bf16 keep 3 programs per SM there."""
    if kernel == "_delta_bwd_chunk_kernel" and arch is not None and (arch >= 90 or launch.get("ACC") == tl.float64):
        return {"maxnreg": 255}
    return {}


@dataclass(frozen=True)
class _Plan(_GLAPlan):
    """Sizes and tiles of one call: kernels/gla.py's, with the backward's smaller tiles."""

    @property
    def BK_BWD(self):
        """K / V tiles of the backward's reverse state pass and chunk kernel, which hold more tiles
        at once (half the forward's; 16 for fp32 / fp64)."""
        return min(self.BK, self.tile // 2)

    @property
    def BV_BWD(self):
        return min(self.BV, self.tile // 2)

    def fp64_opts(self, **opts) -> dict:
        """Launch options for fp64 only: (1) with STORE_T at maxnreg=255 (ptxas picked 128
        registers and spilled 4 bytes on sm_90), (3') without software pipelining."""
        return opts if self.acc == torch.float64 else {}

def _plan(q, k, v, g, beta, chunk_size, backward: bool = False) -> _Plan:
    """The call's sizes and tiles. The backward caps its chunk at 32 steps when K or V is not a
    multiple of 16: its chunk kernel then loads every tile element by element (no vector loads,
    an address and a mask per element) and at 64 steps spills (bf16, sm_80 / sm_90)."""
    b, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (b, T, H) or g.shape != (b, T, H) or beta.shape != (b, T, H):
        raise ValueError(f"delta_rule kernels: expected q = k (B,T,H,K), v (B,T,H,V), g = beta (B,T,H); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}")
    cap = 32 if backward and (K % 16 or V % 16) else None
    return checked_plan("delta_rule", q, v, chunk_size, max_chunk=cap, cls=_Plan)


def delta_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
              chunk_size: int, initial_state: torch.Tensor | None = None, reset: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, T, H, V) in v's dtype and the final state (B, H, K, V) in fp32 (fp64 for fp64 v)."""
    pl = _plan(q, k, v, g, beta, chunk_size)
    q, k = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous()
    v, g, beta = v.contiguous(), g.contiguous(), beta.contiguous()
    dev = v.device
    if initial_state is not None:
        if initial_state.shape != (pl.B, pl.H, pl.K, pl.V):
            raise ValueError(f"delta_rule kernels: initial_state must be (B, H, K, V) = "
                             f"{(pl.B, pl.H, pl.K, pl.V)}; got {tuple(initial_state.shape)}")
        initial_state = initial_state.contiguous()
    if pl.acc == torch.float64:  # a float argument reaches the kernel as fp32: scale in fp64 here
        q, scale = q * scale, 1.0
    seg, has_reset = segments(reset, pl.B, pl.T, pl.Q, pl.nc, dev)
    m = pl.meta()
    tp = pl.nc * pl.Q
    u = _empty((pl.B, pl.H, tp, pl.V), pl.acc, dev)
    w = _empty((pl.B, pl.H, tp, pl.K), pl.acc, dev)
    _delta_wy_kernel[(pl.B * pl.H * pl.nc,)](
        k, v, g, beta, seg, u, w, u, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q, BLOCK_K=pl.BK, BLOCK_V=pl.BV,
        HAS_RESET=has_reset, STORE_T=False, **m, num_warps=pl.warps)
    states = _empty((pl.B, pl.H, pl.nc + 1, pl.K, pl.V), pl.acc, dev)
    vnew = _empty((pl.B, pl.H, tp, pl.V), pl.acc, dev)
    _delta_fwd_h_kernel[(pl.B * pl.H, triton.cdiv(pl.V, pl.BV))](
        k, g, seg, u, w, initial_state if initial_state is not None else states, states, vnew, pl.T, pl.H, pl.K,
        pl.V, pl.nc, Q=pl.Q, BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_S0=initial_state is not None, HAS_RESET=has_reset,
        **m, num_warps=pl.warps)
    o = _empty(v.shape, v.dtype, dev)
    _delta_fwd_o_kernel[(pl.B * pl.H * pl.nc, triton.cdiv(pl.V, pl.BV))](
        q, k, g, seg, states, vnew, o, float(scale), pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q, BLOCK_K=pl.BK,
        BLOCK_V=pl.BV, HAS_RESET=has_reset, **m, num_warps=pl.warps)
    return o, states[:, :, pl.nc].contiguous()


def delta_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
              chunk_size: int, initial_state: torch.Tensor | None, reset: torch.Tensor | None, do: torch.Tensor,
              dfinal: torch.Tensor | None = None):
    """Gradients of delta_fwd for dL/do = do (B, T, H, V) and dL/d(final state) = dfinal or None:
    (dq, dk, dv, dg, dbeta, d initial_state), each in its input's dtype (d initial_state None
    without one). The forward (u, w, the UT transform, the chunk states, v_new) is recomputed."""
    pl = _plan(q, k, v, g, beta, chunk_size, backward=True)
    dtypes = (q.dtype, k.dtype, g.dtype, beta.dtype)
    q, k = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous()
    v, g, beta, do = v.contiguous(), g.contiguous(), beta.contiguous(), do.to(v.dtype).contiguous()
    dev = v.device
    s0 = None if initial_state is None else initial_state.contiguous()
    if pl.acc == torch.float64:  # a float argument reaches the kernel as fp32: scale in fp64 here
        do, scale = do * scale, 1.0
    scale = float(scale)
    seg, has_reset = segments(reset, pl.B, pl.T, pl.Q, pl.nc, dev)
    m = pl.meta()
    tp, nv = pl.nc * pl.Q, triton.cdiv(pl.V, pl.BV)
    nvb = triton.cdiv(pl.V, pl.BV_BWD)  # V tiles of the reverse state pass
    u = _empty((pl.B, pl.H, tp, pl.V), pl.acc, dev)
    w = _empty((pl.B, pl.H, tp, pl.K), pl.acc, dev)
    tm = _empty((pl.B, pl.H, pl.nc, pl.Q, pl.Q), pl.acc, dev)
    _delta_wy_kernel[(pl.B * pl.H * pl.nc,)](
        k, v, g, beta, seg, u, w, tm, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q, BLOCK_K=pl.BK, BLOCK_V=pl.BV,
        HAS_RESET=has_reset, STORE_T=True, **m, num_warps=pl.warps, **pl.fp64_opts(maxnreg=255))
    states = _empty((pl.B, pl.H, pl.nc + 1, pl.K, pl.V), pl.acc, dev)
    vnew = _empty((pl.B, pl.H, tp, pl.V), pl.acc, dev)
    _delta_fwd_h_kernel[(pl.B * pl.H, nv)](
        k, g, seg, u, w, s0 if s0 is not None else states, states, vnew, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q,
        BLOCK_K=pl.BK, BLOCK_V=pl.BV, HAS_S0=s0 is not None, HAS_RESET=has_reset, **m, num_warps=pl.warps)
    dvn = _empty((pl.B, pl.H, tp, pl.V), pl.acc, dev)
    _delta_bwd_dvl_kernel[(pl.B * pl.H * pl.nc, nv)](
        q, k, g, seg, do, dvn, scale, pl.T, pl.H, pl.K, pl.V, pl.nc, Q=pl.Q, BLOCK_K=pl.BK, BLOCK_V=pl.BV,
        HAS_RESET=has_reset, **m, num_warps=pl.warps)
    dstates = _empty((pl.B, pl.H, pl.nc + 1, pl.K, pl.V), pl.acc, dev)
    cpart = _empty((pl.B, pl.H, pl.nc, nvb), pl.acc, dev)
    dfin = None if dfinal is None else dfinal.contiguous()
    _delta_bwd_dh_kernel[(pl.B * pl.H, nvb)](
        q, k, g, seg, do, w, states, dfin if dfin is not None else states, dstates, dvn, cpart, scale, pl.T, pl.H,
        pl.K, pl.V, pl.nc, nvb, Q=pl.Q, BLOCK_K=pl.BK_BWD, BLOCK_V=pl.BV_BWD, HAS_DFIN=dfin is not None,
        HAS_RESET=has_reset, **m, num_warps=pl.warps)
    dbk = _empty((pl.B, pl.H, tp, pl.K), pl.acc, dev)
    dq, dk = _empty(q.shape, dtypes[0], dev), _empty(k.shape, dtypes[1], dev)
    dv = _empty(v.shape, v.dtype, dev)
    dg, dbeta = _empty(g.shape, dtypes[2], dev), _empty(beta.shape, dtypes[3], dev)
    # fp64: no software pipelining (8-12 bytes spilled on sm_90 at Q = 32); a register budget per
    # GPU (target_options).
    kw = dict(Q=pl.Q, BLOCK_K=pl.BK_BWD, BLOCK_V=pl.BV_BWD, HAS_RESET=has_reset, **m, num_warps=pl.warps,
              **pl.fp64_opts(num_stages=1))
    _delta_bwd_chunk_kernel[(pl.B * pl.H * pl.nc,)](
        q, k, v, g, beta, seg, do, u, w, tm, states, dstates, vnew, dvn, cpart, dbk, dq, dk, dv, dg, dbeta, scale,
        pl.T, pl.H, pl.K, pl.V, pl.nc, nvb, **kw, **target_options("_delta_bwd_chunk_kernel", kw, _arch(dq.device)))
    ds0 = None if s0 is None else dstates[:, :, 0].to(initial_state.dtype).contiguous()
    return dq, dk, dv, dg, dbeta, ds0
