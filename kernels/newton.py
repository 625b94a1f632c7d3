"""ParaRNN's GRU and LSTM cells in Triton: a fused sequential solve, the Newton iteration, and
the adjoint (backward) of both. Danieli et al. 2025 (arXiv:2510.21450), sections 2-3.

The cells (the math of megarnn/models/pararnn.py, restated here because kernels know nothing of
megarnn). Per channel w, with gate pre-activations x_t = (x0, x1, x2)[w] already projected:

    GRU  (state h; params a_z, a_r, a_c):          LSTM (state (c, h); params a_f, a_z, a_o, p_f, p_o):
      z = sigmoid(x0 + a_z h)                         f  = sigmoid(x0 + a_f h + p_f c)
      r = sigmoid(x1 + a_r h)                         z  = tanh(x1 + a_z h)
      c = tanh(x2 + a_c r h)                          c' = f c + (1 - f) z
      h' = (1 - z) h + z c                            o  = sigmoid(x2 + a_o h + p_o c');  h' = o tanh(c')

Every channel is its own recurrence, so dh_t/dh_{t-1} is diagonal (GRU) or one 2x2 block per
channel (LSTM), and a document reset (h_{t-1} := 0 at t) makes J_t = 0.

Algorithm
---------
Sequential (`sequential`): grid (channel blocks of BLOCK_W, batch). A program walks t = 0..T-1
with its state in registers, loading x_t and storing h_t: the exact recurrence, all T steps of
the solve in one kernel (possible because channels are independent). It reads and writes the
minimum, but each step waits for the previous one: T * (step latency) per program, so it is
fast only when B * W channels give every SM enough programs to hide that latency.

Newton (`newton_guess`, `newton_iteration`): the unknowns are all h_t; the residual
r_t = h_t - f(h_{t-1}, x_t) is linearised at the iterate h and the update solves the linear
recurrence delta_t = J_t delta_{t-1} - r_t (h_{-1} = h0 is fixed, so delta_{-1} = 0); then
h <- h + delta. One kernel evaluates f, J and r at every step from the iterate (never
materialised) and runs that scan in the same loop: per step one load of x_t and h_t, an FMA (a
2x2 matrix-vector product for the LSTM) on the carried delta, one store. The carried chain is
that FMA only, not the cell, and time is split into chunks run by separate programs, grid
(channel blocks, batch, chunks): pass 1 scans each chunk from delta = 0 and writes its local
end state and the product of its J_t; `_carry_kernel` scans those over chunks (sequential over
a few dozen chunks); pass 2 rescans each chunk from its true entering delta and writes h + delta.
One chunk is one pass. Each pass also writes per-program maxima of |r|, reduced in torch: the
convergence test of the iterate that came in. The initial guess (paper eq. A.1) h_t = f(0, x_t),
h_0 = f(h0, x_0) is its own elementwise kernel.

Adjoint (`adjoint`, the backward of both forward forms; paper eq. 2.6): at the solution h,
lambda_t = g_t + J_{t+1}^T lambda_{t+1} with g = dL/dh. A program runs t from its chunk's end
down, carrying c_t = J_t^T lambda_t (zero past the end, and zero at a reset since J_t = 0 there):
lambda_t = g_t + c_{t+1}, then the vector-Jacobian product of f(h_{t-1}, x_t) with lambda_t gives
at once dx_t (the gate pre-activations), the parameter terms (a_* h_{t-1}, p_f c_{t-1},
p_o c'_t weighted by their gate gradients, summed over the chunk in registers and over (B,
chunks) in torch) and J_t^T lambda_t, the next carry; the last carry of chunk 0 is dL/dh0. J is
recomputed from the saved h and x, never stored. Time chunks as in the forward: pass 1 carries
only c (with the product of the J_t^T), `_carry_kernel` runs over chunks from the last, pass 2
writes the gradients.

Bytes per (b, t, w) element, fp32 (x 3 gates; state 1 value for GRU, 2 for LSTM):
                        GRU    LSTM
    sequential           16     20     x in, h out (the minimum of any solver)
    guess                16     20
    Newton, one chunk    20     28     x, h in; h + delta out (one iteration)
    Newton, chunked     +16    +20     pass 1 re-reads x, h (chunk carries are O(B W chunks))
    adjoint, one chunk   32     40     x, h_{t-1}, g in; dx out
    adjoint, chunked    +20    +28     pass 1 re-reads x, h_{t-1}, g
A converged Newton solve costs the guess plus (iterations + 1) passes (the last one measures the
residual of the returned iterate; its update is dropped). Flops per element: ~30 (GRU) / ~45
(LSTM) for the cell and its Jacobian (3 transcendental gates, each an exp and a division), +2
(GRU) / +6 (LSTM) for the delta scan, +1 / +12 for pass 1's Jacobian products, ~35 / ~55 for
the vector-Jacobian product. All far below a GPU's ridge point: the kernels are bound by memory
(Newton, adjoint) or by the step latency (sequential).

Block scans (`block_scan`, `block_scan_bwd`): h_t = a_t h_{t-1} + b_t with one dense N x N matrix
per block, N in 2..16 (tiles padded to a power of 2 and masked): the paraLSTM's 2x2 Newton solves
across context-parallel ranks and the block-diagonal GRU cells' Newton updates and adjoints
(megarnn/models/pararnn.py BlockGRUCell). Grid (groups of BLOCK_D blocks, batch); a program walks
t with its blocks' states in registers, one batched mat-vec per step. The backward is the
transposed scan run the other way, fused with the gradients of a (lambda_t h_prev^T), b (lambda)
and h0. Per step and block: N^2 + 2N loads and N stores forward; N^2 + 3N loads and N^2 + N
stores backward. A program is sequential over its steps (latency-bound); block_scan splits time
into chunks run as independent sequences (two passes around a carry folded in torch) when
B x block groups would leave SMs idle (_block_scan_plan); block_scan_bwd is one pass over T.

Dtypes: float32 (state and gates in fp32 registers) or float64. Under Triton's interpreter the
loops here are per step, not `tl.associative_scan`s: the interpreter runs a custom combine as a
Python loop per element (~30x slower than a step loop), and a GPU hides the per-step chain of
a Newton pass (one FMA) behind the other programs' loads.

Host functions (torch tensors in and out; no autograd: megarnn/ops/newton.py wraps them).
cell: "gru" or "lstm"; x: (B, T, 3, W) gate pre-activations; params: (3, W) GRU (a_z, a_r, a_c)
or (5, W) LSTM (a_f, a_z, a_o, p_f, p_o); states (B, T, S), S = W (GRU) or 2W (LSTM, [c | h]);
h0: (B, S) or None (zeros); reset: (B, T) bool or None.
    sequential(cell, x, params, h0=None, reset=None) -> h
    newton_guess(cell, x, params, h0=None, reset=None, chunk_size=None) -> h
    newton_iteration(cell, x, params, h, h0=None, reset=None, chunk_size=None) -> (h + delta, max |r|)
    adjoint(cell, x, params, h, h0, reset, g, chunk_size=None) -> (dx, dparams, dh0 or None)
    block_scan(a (B, T, D, N, N), b (B, T, D, N), h0=None, reverse=False) -> h (B, T, D, N)
    block_scan_bwd(a, h, h0, g, reverse=False) -> (da, db, dh0 or None)
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

# True when the kernels were decorated under Triton's interpreter (TRITON_INTERPRET=1 before
# this import): then they run on CPU tensors, slowly, as the CI does.
INTERPRETED = triton.knobs.runtime.interpret
CELLS = {"gru": 3, "lstm": 5}  # cell -> rows of its (P, W) parameter block
# Steps unrolled per loop trip, so that loads of later steps issue before earlier steps' math;
# a first guess, to tune on a GPU (the interpreter ignores it).
UNROLL = 4


# ----------------------------------------------------------------------------------------------
# Device helpers: the cells. A state is a pair (s0, s1): (c, h) for the LSTM; for the GRU s0 is
# an unused zero and s1 is h. A Jacobian is (j00, j01, j10, j11), row = output, column = input;
# the GRU's is j11 alone (the others are never read). LSTM is a constexpr, so each kernel is
# compiled with the other cell's branches removed.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _gates(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM: tl.constexpr):
    """The cell's gates at state (s0, s1) and inputs x0..x2 ([BLOCK_W] each). Returns
    (g0, g1, g2, g3, g4): GRU (z, r, c, -, -); LSTM (f, z, c', o, tanh c'). tanh(y) is
    2 sigmoid(2y) - 1: off by about an ulp of 1 at most, and it never overflows (libdevice's
    tanh would do on a GPU, but the interpreter cannot call libdevice)."""
    if LSTM:
        f = tl.sigmoid(x0 + p0 * s1 + p3 * s0)
        z = 2.0 * tl.sigmoid(2.0 * (x1 + p1 * s1)) - 1.0
        cn = f * s0 + (1.0 - f) * z
        o = tl.sigmoid(x2 + p2 * s1 + p4 * cn)
        return f, z, cn, o, 2.0 * tl.sigmoid(2.0 * cn) - 1.0
    else:
        z = tl.sigmoid(x0 + p0 * s1)
        r = tl.sigmoid(x1 + p1 * s1)
        c = 2.0 * tl.sigmoid(2.0 * (x2 + p2 * (r * s1))) - 1.0
        return z, r, c, z, z


@triton.jit
def _cell(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM: tl.constexpr):
    """One step: the new state (f0, f1) from the state (s0, s1)."""
    g0, g1, g2, g3, g4 = _gates(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
    if LSTM:
        return g2, g3 * g4
    else:
        return s0, (1.0 - g0) * s1 + g0 * g2


@triton.jit
def _linearize(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM: tl.constexpr):
    """One step and its Jacobian d(new state)/d(state) at (s0, s1) (paper eq. 3.2; pararnn.py's
    linearize). Returns (f0, f1, j00, j01, j10, j11)."""
    g0, g1, g2, g3, g4 = _gates(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
    if LSTM:
        f, z, cn, o, tc = g0, g1, g2, g3, g4
        df = f * (1.0 - f)
        dcc = f + (s0 - z) * df * p3
        dch = (s0 - z) * df * p0 + (1.0 - f) * (1.0 - z * z) * p1
        do = o * (1.0 - o)
        dh_dcn = tc * do * p4 + o * (1.0 - tc * tc)  # through o and through tanh
        return cn, o * tc, dcc, dch, dh_dcn * dcc, tc * do * p2 + dh_dcn * dch
    else:
        z, r, c = g0, g1, g2
        j = (1.0 - z) + (c - s1) * z * (1.0 - z) * p0 + z * (1.0 - c * c) * p2 * (r + s1 * r * (1.0 - r) * p1)
        return s0, (1.0 - z) * s1 + z * c, j, j, j, j


@triton.jit
def _vjp(l0, l1, s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM: tl.constexpr):
    """The vector-Jacobian product of one step at (s0, s1) with the cotangent (l0, l1) of the
    new state. Returns the gate pre-activation gradients (d0, d1, d2), J^T l as (e0, e1), and
    the parameter terms (q0..q4) in the (P, W) block's row order."""
    g0, g1, g2, g3, g4 = _gates(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
    if LSTM:
        f, z, cn, o, tc = g0, g1, g2, g3, g4
        do = l1 * tc * o * (1.0 - o)
        dcn = l0 + l1 * o * (1.0 - tc * tc) + do * p4
        df = dcn * (s0 - z) * f * (1.0 - f)
        dz = dcn * (1.0 - f) * (1.0 - z * z)
        e0 = dcn * f + df * p3
        e1 = do * p2 + df * p0 + dz * p1
        return df, dz, do, e0, e1, df * s1, dz * s1, do * s1, df * s0, do * cn
    else:
        z, r, c = g0, g1, g2
        dz = l1 * (c - s1) * z * (1.0 - z)
        dc = l1 * z * (1.0 - c * c)
        drh = dc * p2  # the gradient of r * h inside the candidate
        dr = drh * s1 * r * (1.0 - r)
        e1 = l1 * (1.0 - z) + dz * p0 + dr * p1 + drh * r
        return dz, dr, dc, e1, e1, dz * s1, dr * s1, dc * r * s1, dz, dz


@triton.jit
def _affine(j00, j01, j10, j11, v0, v1, b0, b1, LSTM: tl.constexpr):
    """J v + b (2x2 per channel for the LSTM, diagonal for the GRU)."""
    if LSTM:
        return j00 * v0 + j01 * v1 + b0, j10 * v0 + j11 * v1 + b1
    else:
        return v0, j11 * v1 + b1


@triton.jit
def _matmul(j00, j01, j10, j11, m00, m01, m10, m11, LSTM: tl.constexpr):
    """J M (the GRU's diagonal product in the 11 slot)."""
    if LSTM:
        return (j00 * m00 + j01 * m10, j00 * m01 + j01 * m11,
                j10 * m00 + j11 * m10, j10 * m01 + j11 * m11)
    else:
        return m00, m01, m10, j11 * m11


@triton.jit
def _load_state(PTR, base, offs, mask, W, LSTM: tl.constexpr, ACC: tl.constexpr):
    """A state at PTR + base: [c | h] halves for the LSTM, h for the GRU (s0 = 0)."""
    if LSTM:
        s0 = tl.load(PTR + base + offs, mask=mask, other=0.0).to(ACC)
        s1 = tl.load(PTR + base + W + offs, mask=mask, other=0.0).to(ACC)
    else:
        s1 = tl.load(PTR + base + offs, mask=mask, other=0.0).to(ACC)
        s0 = tl.zeros_like(s1)
    return s0, s1


@triton.jit
def _store_state(PTR, base, offs, mask, W, s0, s1, LSTM: tl.constexpr):
    if LSTM:
        tl.store(PTR + base + offs, s0.to(PTR.dtype.element_ty), mask=mask)
        tl.store(PTR + base + W + offs, s1.to(PTR.dtype.element_ty), mask=mask)
    else:
        tl.store(PTR + base + offs, s1.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _load_params(P, offs, mask, W, LSTM: tl.constexpr, ACC: tl.constexpr):
    """The (P, W) parameter block's rows for these channels (p3 = p4 = 0 for the GRU)."""
    p0 = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
    p1 = tl.load(P + W + offs, mask=mask, other=0.0).to(ACC)
    p2 = tl.load(P + 2 * W + offs, mask=mask, other=0.0).to(ACC)
    if LSTM:
        p3 = tl.load(P + 3 * W + offs, mask=mask, other=0.0).to(ACC)
        p4 = tl.load(P + 4 * W + offs, mask=mask, other=0.0).to(ACC)
    else:
        p3 = tl.zeros_like(p0)
        p4 = tl.zeros_like(p0)
    return p0, p1, p2, p3, p4


@triton.jit
def _load_gates(X, base, offs, mask, W, ACC: tl.constexpr):
    """x_t's three gate pre-activations at X + base ((3, W) row-major)."""
    x0 = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
    x1 = tl.load(X + base + W + offs, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(X + base + 2 * W + offs, mask=mask, other=0.0).to(ACC)
    return x0, x1, x2


@triton.jit
def _entry_state(H, H0, base_prev, t, offs, mask_w, W,
                 HAS_H0: tl.constexpr, LSTM: tl.constexpr, ACC: tl.constexpr):
    """h_{t-1} (before any reset): h0 (or 0) at t = 0, else the state stored at H + base_prev.
    The mask is built as a vector: the interpreter rejects a vector mask & a scalar bool."""
    after = mask_w & ((offs * 0 + t) > 0)
    s0, s1 = _load_state(H, base_prev, offs, after, W, LSTM, ACC)
    if HAS_H0:
        i0, i1 = _load_state(H0, 0, offs, mask_w, W, LSTM, ACC)
        s0 = tl.where(t > 0, s0, i0)
        s1 = tl.where(t > 0, s1, i1)
    return s0, s1


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sequential_kernel(X, P, H0, RESET, H, T, W,
                       BLOCK_W: tl.constexpr, ACC: tl.constexpr, LSTM: tl.constexpr,
                       HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, UNROLL: tl.constexpr):
    """h_t = f(h_{t-1}, x_t) for t = 0..T-1. X (B, T, 3, W); P (3 or 5, W); H0 (B, S); RESET
    (B, T) uint8; H (B, T, S) out. Grid (cdiv(W, BLOCK_W), B)."""
    pid_w, pid_b = tl.program_id(0), tl.program_id(1)
    offs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs < W
    if LSTM:
        S = 2 * W
    else:
        S = W
    p0, p1, p2, p3, p4 = _load_params(P, offs, mask, W, LSTM, ACC)
    if HAS_H0:
        s0, s1 = _load_state(H0, pid_b.to(tl.int64) * S, offs, mask, W, LSTM, ACC)
    else:
        s1 = tl.zeros([BLOCK_W], ACC)
        s0 = tl.zeros([BLOCK_W], ACC)
    x_seq = pid_b.to(tl.int64) * T * 3 * W  # int64: B * T * 3W may pass 2^31
    h_seq = pid_b.to(tl.int64) * T * S
    for t in tl.range(0, T, loop_unroll_factor=UNROLL):
        if HAS_RESET:  # a document starts at t: h_{t-1} := 0
            reset = tl.load(RESET + pid_b.to(tl.int64) * T + t) != 0
            s0 = tl.where(reset, 0.0, s0)
            s1 = tl.where(reset, 0.0, s1)
        x0, x1, x2 = _load_gates(X, x_seq + t * 3 * W, offs, mask, W, ACC)
        s0, s1 = _cell(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
        _store_state(H, h_seq + t * S, offs, mask, W, s0, s1, LSTM)


@triton.jit
def _guess_kernel(X, P, H0, RESET, H, T, W, CHUNK,
                  BLOCK_W: tl.constexpr, ACC: tl.constexpr, LSTM: tl.constexpr,
                  HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, UNROLL: tl.constexpr):
    """Newton's initial guess h_t = f(0, x_t), h_0 = f(h0, x_0) (paper eq. A.1): elementwise.
    Shapes as _sequential_kernel. Grid (cdiv(W, BLOCK_W), B, n_chunks)."""
    pid_w, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs < W
    if LSTM:
        S = 2 * W
    else:
        S = W
    p0, p1, p2, p3, p4 = _load_params(P, offs, mask, W, LSTM, ACC)
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    x_seq = pid_b.to(tl.int64) * T * 3 * W
    h_seq = pid_b.to(tl.int64) * T * S
    s1 = tl.zeros([BLOCK_W], ACC)
    s0 = tl.zeros([BLOCK_W], ACC)
    if HAS_H0:  # h0 enters the first chunk only (a vector mask: see _entry_state)
        s0, s1 = _load_state(H0, pid_b.to(tl.int64) * S, offs, mask & ((offs * 0 + t_start) == 0), W, LSTM, ACC)
    for t in tl.range(t_start, t_end, loop_unroll_factor=UNROLL):
        if HAS_RESET:  # a document starts at t: h_{t-1} := 0
            reset = tl.load(RESET + pid_b.to(tl.int64) * T + t) != 0
            s0 = tl.where(reset, 0.0, s0)
            s1 = tl.where(reset, 0.0, s1)
        x0, x1, x2 = _load_gates(X, x_seq + t * 3 * W, offs, mask, W, ACC)
        f0, f1 = _cell(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
        _store_state(H, h_seq + t * S, offs, mask, W, f0, f1, LSTM)
        s0 = tl.zeros_like(s0)  # every later step starts from 0
        s1 = tl.zeros_like(s1)


@triton.jit
def _newton_kernel(X, P, H0, RESET, H, HNEW, CIN, STATE, PROD, RES, T, W, CHUNK,
                   BLOCK_W: tl.constexpr, ACC: tl.constexpr, LSTM: tl.constexpr,
                   HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, HAS_CIN: tl.constexpr,
                   WRITE_H: tl.constexpr, WRITE_STATE: tl.constexpr, UNROLL: tl.constexpr):
    """One Newton iteration over one time chunk: r_t = h_t - f(h_{t-1}, x_t), J_t, and
    delta_t = J_t delta_{t-1} - r_t from the chunk's entering delta. X, P, H0, RESET as
    _sequential_kernel; H, HNEW (B, T, S): the iterate and h + delta (WRITE_H); CIN, STATE
    (B, n_chunks, S): delta entering each chunk (HAS_CIN; else 0) and its local end value
    (WRITE_STATE); PROD (B, n_chunks, K * W), K = 4 (LSTM) or 1: the chunk's product J_e...J_s
    (WRITE_STATE); RES (B, n_chunks, W): max_t |r_t| (inf for a NaN). Grid (cdiv(W, BLOCK_W), B,
    n_chunks)."""
    pid_w, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs < W
    if LSTM:
        S = 2 * W
    else:
        S = W
    p0, p1, p2, p3, p4 = _load_params(P, offs, mask, W, LSTM, ACC)
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    x_seq = pid_b.to(tl.int64) * T * 3 * W
    h_seq = pid_b.to(tl.int64) * T * S
    chunk = (pid_b * tl.num_programs(2) + pid_c).to(tl.int64)
    prev0, prev1 = _entry_state(H, H0 + pid_b.to(tl.int64) * S, h_seq + (t_start - 1) * S, t_start, offs,
                                mask, W, HAS_H0, LSTM, ACC)
    if HAS_CIN:
        d0, d1 = _load_state(CIN, chunk * S, offs, mask, W, LSTM, ACC)
    else:
        d1 = tl.zeros([BLOCK_W], ACC)
        d0 = tl.zeros([BLOCK_W], ACC)
    one = tl.full([BLOCK_W], 1.0, ACC)
    m00, m01, m10, m11 = one, one * 0.0, one * 0.0, one
    res = tl.zeros([BLOCK_W], ACC)
    for t in tl.range(t_start, t_end, loop_unroll_factor=UNROLL):
        if HAS_RESET:
            # h_{t-1} := 0 at a document start, a constant: J_t = 0, so the scan restarts here.
            # J_t delta = J_t 0: zeroing the carries is zeroing J_t (and the chunk's product).
            reset = tl.load(RESET + pid_b.to(tl.int64) * T + t) != 0
            prev0 = tl.where(reset, 0.0, prev0)
            prev1 = tl.where(reset, 0.0, prev1)
            d0 = tl.where(reset, 0.0, d0)
            d1 = tl.where(reset, 0.0, d1)
            if WRITE_STATE:
                m00 = tl.where(reset, 0.0, m00)
                m01 = tl.where(reset, 0.0, m01)
                m10 = tl.where(reset, 0.0, m10)
                m11 = tl.where(reset, 0.0, m11)
        x0, x1, x2 = _load_gates(X, x_seq + t * 3 * W, offs, mask, W, ACC)
        f0, f1, j00, j01, j10, j11 = _linearize(prev0, prev1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
        cur0, cur1 = _load_state(H, h_seq + t * S, offs, mask, W, LSTM, ACC)  # the iterate at t
        r0, r1 = cur0 - f0, cur1 - f1
        r = tl.abs(r1)
        if LSTM:
            r = tl.maximum(r, tl.abs(r0))
        res = tl.maximum(res, tl.where(r == r, r, float("inf")))  # NaN -> inf: it must not hide
        d0, d1 = _affine(j00, j01, j10, j11, d0, d1, -r0, -r1, LSTM)
        if WRITE_STATE:
            m00, m01, m10, m11 = _matmul(j00, j01, j10, j11, m00, m01, m10, m11, LSTM)
        if WRITE_H:
            _store_state(HNEW, h_seq + t * S, offs, mask, W, cur0 + d0, cur1 + d1, LSTM)
        prev0, prev1 = cur0, cur1
    tl.store(RES + chunk * W + offs, tl.where(mask, res, 0.0), mask=mask)
    if WRITE_STATE:
        _store_state(STATE, chunk * S, offs, mask, W, d0, d1, LSTM)
        _store_matrix(PROD, chunk, offs, mask, W, m00, m01, m10, m11, LSTM)


@triton.jit
def _store_matrix(PROD, chunk, offs, mask, W, m00, m01, m10, m11, LSTM: tl.constexpr):
    """A per-chunk matrix into PROD (B, n_chunks, K * W): 4 rows (m00, m01, m10, m11) or m11."""
    if LSTM:
        base = chunk * 4 * W
        tl.store(PROD + base + offs, m00, mask=mask)
        tl.store(PROD + base + W + offs, m01, mask=mask)
        tl.store(PROD + base + 2 * W + offs, m10, mask=mask)
        tl.store(PROD + base + 3 * W + offs, m11, mask=mask)
    else:
        tl.store(PROD + chunk * W + offs, m11, mask=mask)


@triton.jit
def _load_matrix(PROD, chunk, offs, mask, W, LSTM: tl.constexpr, ACC: tl.constexpr):
    if LSTM:
        base = chunk * 4 * W
        m00 = tl.load(PROD + base + offs, mask=mask, other=0.0).to(ACC)
        m01 = tl.load(PROD + base + W + offs, mask=mask, other=0.0).to(ACC)
        m10 = tl.load(PROD + base + 2 * W + offs, mask=mask, other=0.0).to(ACC)
        m11 = tl.load(PROD + base + 3 * W + offs, mask=mask, other=0.0).to(ACC)
    else:
        m11 = tl.load(PROD + chunk * W + offs, mask=mask, other=0.0).to(ACC)
        m00 = m11
        m01 = m11
        m10 = m11
    return m00, m01, m10, m11


@triton.jit
def _carry_kernel(PROD, STATE, CIN, NC, W,
                  BLOCK_W: tl.constexpr, ACC: tl.constexpr, LSTM: tl.constexpr, REVERSE: tl.constexpr):
    """The value entering each chunk: v_0 = 0, v_{k+1} = M_k v_k + s_k over chunks k (from the
    last chunk when REVERSE). PROD (B, NC, K * W) the chunks' M; STATE (B, NC, S) their local
    end values s; CIN (B, NC, S) out. Grid (cdiv(W, BLOCK_W), B): NC is a few dozen at most."""
    pid_w, pid_b = tl.program_id(0), tl.program_id(1)
    offs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs < W
    if LSTM:
        S = 2 * W
    else:
        S = W
    v1 = tl.zeros([BLOCK_W], ACC)
    v0 = tl.zeros([BLOCK_W], ACC)
    for i in range(0, NC):
        if REVERSE:
            k = NC - 1 - i
        else:
            k = i
        chunk = pid_b.to(tl.int64) * NC + k
        _store_state(CIN, chunk * S, offs, mask, W, v0, v1, LSTM)
        m00, m01, m10, m11 = _load_matrix(PROD, chunk, offs, mask, W, LSTM, ACC)
        s0, s1 = _load_state(STATE, chunk * S, offs, mask, W, LSTM, ACC)
        v0, v1 = _affine(m00, m01, m10, m11, v0, v1, s0, s1, LSTM)


@triton.jit
def _adjoint_kernel(X, P, H0, RESET, H, G, CIN, COUT, PROD, DX, DP, T, W, CHUNK,
                    BLOCK_W: tl.constexpr, ACC: tl.constexpr, LSTM: tl.constexpr,
                    HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, HAS_CIN: tl.constexpr,
                    WRITE_GRADS: tl.constexpr, UNROLL: tl.constexpr):
    """lambda_t = g_t + c_{t+1}, c_t = J_t^T lambda_t, from the chunk's end down to its start.
    X, P, H0, RESET as _sequential_kernel; H, G (B, T, S): the solution and dL/dh; CIN (B,
    n_chunks, S): c entering each chunk from its end (HAS_CIN; else 0); COUT (B, n_chunks, S): c
    leaving at its start (chunk 0's is dL/dh0). WRITE_GRADS (pass 2): DX (B, T, 3, W) and DP (B,
    n_chunks, P, W), the chunk's sums of the parameter terms. Else (pass 1): PROD (B, n_chunks,
    K * W), the product J_s^T ... J_{e-1}^T. Grid (cdiv(W, BLOCK_W), B, n_chunks)."""
    pid_w, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs < W
    if LSTM:
        S = 2 * W
        NP = 5
    else:
        S = W
        NP = 3
    p0, p1, p2, p3, p4 = _load_params(P, offs, mask, W, LSTM, ACC)
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    x_seq = pid_b.to(tl.int64) * T * 3 * W
    h_seq = pid_b.to(tl.int64) * T * S
    chunk = (pid_b * tl.num_programs(2) + pid_c).to(tl.int64)
    if HAS_CIN:
        c0, c1 = _load_state(CIN, chunk * S, offs, mask, W, LSTM, ACC)
    else:
        c1 = tl.zeros([BLOCK_W], ACC)
        c0 = tl.zeros([BLOCK_W], ACC)
    one = tl.full([BLOCK_W], 1.0, ACC)
    m00, m01, m10, m11 = one, one * 0.0, one * 0.0, one
    q0, q1, q2, q3, q4 = one * 0.0, one * 0.0, one * 0.0, one * 0.0, one * 0.0
    for i in tl.range(0, t_end - t_start, loop_unroll_factor=UNROLL):
        t = t_end - 1 - i
        s0, s1 = _entry_state(H, H0 + pid_b.to(tl.int64) * S, h_seq + (t - 1) * S, t, offs, mask, W,
                              HAS_H0, LSTM, ACC)
        if HAS_RESET:
            reset = tl.load(RESET + pid_b.to(tl.int64) * T + t) != 0
            s0 = tl.where(reset, 0.0, s0)
            s1 = tl.where(reset, 0.0, s1)
        x0, x1, x2 = _load_gates(X, x_seq + t * 3 * W, offs, mask, W, ACC)
        l0, l1 = _load_state(G, h_seq + t * S, offs, mask, W, LSTM, ACC)
        l0, l1 = l0 + c0, l1 + c1
        if WRITE_GRADS:
            d0, d1, d2, c0, c1, e0, e1, e2, e3, e4 = _vjp(l0, l1, s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
            xt = x_seq + t * 3 * W
            tl.store(DX + xt + offs, d0.to(DX.dtype.element_ty), mask=mask)
            tl.store(DX + xt + W + offs, d1.to(DX.dtype.element_ty), mask=mask)
            tl.store(DX + xt + 2 * W + offs, d2.to(DX.dtype.element_ty), mask=mask)
            q0, q1, q2, q3, q4 = q0 + e0, q1 + e1, q2 + e2, q3 + e3, q4 + e4
        else:
            _, _, j00, j01, j10, j11 = _linearize(s0, s1, x0, x1, x2, p0, p1, p2, p3, p4, LSTM)
            zero = l0 * 0.0
            c0, c1 = _affine(j00, j10, j01, j11, l0, l1, zero, zero, LSTM)  # J^T lambda
            m00, m01, m10, m11 = _matmul(j00, j10, j01, j11, m00, m01, m10, m11, LSTM)
        if HAS_RESET:  # J_t = 0 at a reset: nothing flows to the steps before it (nor to h0)
            c0 = tl.where(reset, 0.0, c0)
            c1 = tl.where(reset, 0.0, c1)
            if not WRITE_GRADS:
                m00 = tl.where(reset, 0.0, m00)
                m01 = tl.where(reset, 0.0, m01)
                m10 = tl.where(reset, 0.0, m10)
                m11 = tl.where(reset, 0.0, m11)
    _store_state(COUT, chunk * S, offs, mask, W, c0, c1, LSTM)
    if WRITE_GRADS:
        base = chunk * NP * W
        tl.store(DP + base + offs, q0, mask=mask)
        tl.store(DP + base + W + offs, q1, mask=mask)
        tl.store(DP + base + 2 * W + offs, q2, mask=mask)
        if LSTM:
            tl.store(DP + base + 3 * W + offs, q3, mask=mask)
            tl.store(DP + base + 4 * W + offs, q4, mask=mask)
    else:
        _store_matrix(PROD, chunk, offs, mask, W, m00, m01, m10, m11, LSTM)


@triton.jit
def _block_tiles(offs_d, D, N: tl.constexpr, NP: tl.constexpr):
    """Offsets and masks of BLOCK_D blocks of N x N matrices / N-vectors (N padded to NP, a power
    of 2): vector offsets [BLOCK_D, NP] and matrix offsets [BLOCK_D, NP, NP] from a block's start."""
    i = tl.arange(0, NP)
    vmask = (offs_d[:, None] < D) & (i[None, :] < N)
    voffs = offs_d[:, None] * N + i[None, :]
    mmask = vmask[:, :, None] & (i[None, None, :] < N)
    moffs = offs_d[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    return voffs, vmask, moffs, mmask


@triton.jit
def _block_scan_kernel(A, BV, H0, H, T, D, N: tl.constexpr, NP: tl.constexpr, HAS_H0: tl.constexpr,
                       REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """h_t = a_t @ h_{t-1} + b_t with one N x N matrix per block (N in 2..16): the LSTM's 2x2
    Newton solves across context-parallel ranks, and the block-diagonal cells' Newton updates and
    adjoints. Grid (block groups, batch); a program walks t with its blocks' states in registers
    ([BLOCK_D, N]); a step is a batched mat-vec (a row-times-state product summed over columns).
    a: (B, T, D, N, N) row-major (row = output); b, h: (B, T, D, N); h0: (B, D, N)."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    voffs, vmask, moffs, mmask = _block_tiles(offs_d, D, N, NP)
    b = tl.program_id(1).to(tl.int64)
    if HAS_H0:
        s = tl.load(H0 + b * D * N + voffs, mask=vmask, other=0.0).to(ACC)
    else:
        s = tl.zeros([BLOCK_D, NP], ACC)
    for i in range(T):
        if REVERSE:
            t = T - 1 - i
        else:
            t = i
        row = (b * T + t) * D
        a = tl.load(A + row * (N * N) + moffs, mask=mmask, other=0.0).to(ACC)
        s = tl.sum(a * s[:, None, :], axis=2) + tl.load(BV + row * N + voffs, mask=vmask, other=0.0).to(ACC)
        tl.store(H + row * N + voffs, s.to(H.dtype.element_ty), mask=vmask)


@triton.jit
def _block_scan_bwd_kernel(A, G, H, H0, DA, DB, DH0, T, D, N: tl.constexpr, NP: tl.constexpr,
                           HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """The backward of _block_scan_kernel (same REVERSE): the transposed scan run the other way.
    With g = dL/dh: lambda_t = g_t + a_next^T lambda_next (a_next, lambda_next: the step after t in
    scan order; none after the last), dL/db_t = lambda_t, dL/da_t = lambda_t h_prev^T (h_prev: the
    state before t in scan order, h0 or 0 at the first step), dL/dh0 = a_first^T lambda_first.
    The carry c = a_t^T lambda_t is one transposed batched mat-vec (a column-times-lambda sum
    over rows). h: the forward's output. Grid and layouts as _block_scan_kernel."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    voffs, vmask, moffs, mmask = _block_tiles(offs_d, D, N, NP)
    b = tl.program_id(1).to(tl.int64)
    if HAS_H0:
        s0 = tl.load(H0 + b * D * N + voffs, mask=vmask, other=0.0).to(ACC)
    else:
        s0 = tl.zeros([BLOCK_D, NP], ACC)
    c = tl.zeros([BLOCK_D, NP], ACC)
    for i in range(T):
        if REVERSE:  # the forward ran t = T-1 .. 0, so h_prev is h_{t+1}
            t = i
            tp = t + 1
            inside = (voffs * 0 + tp) < T  # vector masks: the interpreter rejects vector & scalar
        else:
            t = T - 1 - i
            tp = t - 1
            inside = (voffs * 0 + tp) >= 0
        row = (b * T + t) * D
        lam = tl.load(G + row * N + voffs, mask=vmask, other=0.0).to(ACC) + c
        tl.store(DB + row * N + voffs, lam.to(DB.dtype.element_ty), mask=vmask)
        prev = tl.load(H + (b * T + tp) * D * N + voffs, mask=vmask & inside, other=0.0).to(ACC)
        prev = tl.where(inside, prev, s0)
        tl.store(DA + row * (N * N) + moffs, (lam[:, :, None] * prev[:, None, :]).to(DA.dtype.element_ty),
                 mask=mmask)
        a = tl.load(A + row * (N * N) + moffs, mask=mmask, other=0.0).to(ACC)
        c = tl.sum(a * lam[:, :, None], axis=1)
    if HAS_H0:
        tl.store(DH0 + b * D * N + voffs, c.to(DH0.dtype.element_ty), mask=vmask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> torch.Tensor:
    """The one allocator for kernel outputs; tests replace it with a NaN-filled one so that an
    element a kernel forgets to write fails loudly."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_w(W: int) -> int:
    """Channels per program: 32 (one warp, one channel per thread) so that B * W / 32 programs
    spread over the SMs; the per-step loads are one 128-byte line per gate."""
    return min(32, triton.next_power_of_2(W))


# First guesses, to tune on a GPU with tools/bench_kernels.py --only newton.
CHUNK_PROGRAMS_PER_SM = 16  # one-warp programs: 16 per SM keep its load pipes busy
MIN_CHUNK = 64  # steps: shorter chunks would spend more on pass 1 and the carries than they gain


def _plan(B: int, T: int, W: int, device: torch.device, chunk_size: int | None) -> tuple[int, int]:
    """(chunk length, number of chunks) for the Newton and adjoint kernels. chunk_size=None: one
    chunk off CUDA; on CUDA enough chunks for CHUNK_PROGRAMS_PER_SM programs per SM, each at
    least MIN_CHUNK steps (a chunk costs pass 1's re-read and one step of _carry_kernel)."""
    if chunk_size is None:
        if device.type != "cuda":
            return T, 1
        programs = B * triton.cdiv(W, _block_w(W))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n = min(triton.cdiv(CHUNK_PROGRAMS_PER_SM * sms, programs), T // MIN_CHUNK)
        if n <= 1:
            return T, 1
        chunk_size = triton.cdiv(T, n)
    if chunk_size < 1:
        raise ValueError(f"newton kernels: chunk_size must be >= 1; got {chunk_size}")
    chunk_size = min(chunk_size, T)
    return chunk_size, triton.cdiv(T, chunk_size)


class _Call:
    """Validated, contiguous inputs of one host call and what every launch shares."""

    def __init__(self, name: str, cell: str, x: torch.Tensor, params: torch.Tensor,
                 h0: torch.Tensor | None, reset: torch.Tensor | None):
        if cell not in CELLS:
            raise ValueError(f"{name}: cell must be one of {sorted(CELLS)}; got {cell!r}")
        if x.dim() != 4 or x.shape[2] != 3 or 0 in x.shape:
            raise ValueError(f"{name}: x must be (B, T, 3, W) gate pre-activations with B, T, W >= 1; "
                             f"got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: x must be float32 or float64 (the solve's compute dtype); got {x.dtype}")
        B, T, _, W = x.shape
        self.lstm = cell == "lstm"
        self.B, self.T, self.W, self.S = B, T, W, (2 * W if self.lstm else W)
        if T * 3 * W >= 2**31:
            raise ValueError(f"{name}: T * 3 * W = {T * 3 * W} must be < 2^31 (int32 offsets within one "
                             f"sequence); split the sequence")
        if params.shape != (CELLS[cell], W):
            raise ValueError(f"{name}: params of a {cell} cell must be ({CELLS[cell]}, W) = "
                             f"{(CELLS[cell], W)}; got {tuple(params.shape)}")
        if h0 is not None and h0.shape != (B, self.S):
            raise ValueError(f"{name}: h0 must be (B, S) = {(B, self.S)}; got {tuple(h0.shape)}")
        if reset is not None and reset.shape != (B, T):
            raise ValueError(f"{name}: reset must be (B, T) = {(B, T)} bool; got {tuple(reset.shape)}")
        self.x = x.contiguous()
        self.params = params.to(x.dtype).contiguous()
        self.h0 = None if h0 is None else h0.to(x.dtype).contiguous()
        self.reset = None if reset is None else reset.to(device=x.device, dtype=torch.uint8).contiguous()
        self.block_w = _block_w(W)
        self.meta = dict(BLOCK_W=self.block_w, ACC=_tl_dtype(x.dtype), LSTM=self.lstm, HAS_H0=h0 is not None,
                         HAS_RESET=reset is not None, num_warps=1,
                         # fp64 LSTM: 4 steps in flight spill on sm_90 (its 2x2 Jacobians in fp64)
                         UNROLL=2 if self.lstm and x.dtype == torch.float64 else UNROLL)

    def state(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.shape != (self.B, self.T, self.S):
            raise ValueError(f"{name}: must be (B, T, S) = {(self.B, self.T, self.S)}; got {tuple(t.shape)}")
        return t.to(self.x.dtype).contiguous()

    def grid(self, n_chunks: int = 1) -> tuple[int, int, int]:
        return (triton.cdiv(self.W, self.block_w), self.B, n_chunks)

    def common(self):
        """The first four kernel arguments; unused pointers get x (never read: constexpr flags)."""
        return (self.x, self.params, self.h0 if self.h0 is not None else self.x,
                self.reset if self.reset is not None else self.x)

    def per_chunk(self, n_chunks: int, rows: int) -> torch.Tensor:
        return _empty((self.B, n_chunks, rows * self.W), self.x.dtype, self.x.device)

    def carry(self, prod: torch.Tensor, state: torch.Tensor, reverse: bool) -> torch.Tensor:
        """The value entering each chunk from the chunks' products and local end values."""
        cin = _empty(state.shape, state.dtype, state.device)
        _carry_kernel[self.grid()[:2]](prod, state, cin, state.shape[1], self.W, BLOCK_W=self.block_w,
                                       ACC=self.meta["ACC"], LSTM=self.lstm, REVERSE=reverse, num_warps=1)
        return cin


def sequential(cell: str, x: torch.Tensor, params: torch.Tensor, h0: torch.Tensor | None = None,
               reset: torch.Tensor | None = None) -> torch.Tensor:
    """The recurrence h_t = f(h_{t-1}, x_t), one fused kernel. Returns h (B, T, S) in x's dtype."""
    c = _Call("newton sequential", cell, x, params, h0, reset)
    h = _empty((c.B, c.T, c.S), x.dtype, x.device)
    _sequential_kernel[c.grid()[:2]](*c.common(), h, c.T, c.W, **c.meta)
    return h


def newton_guess(cell: str, x: torch.Tensor, params: torch.Tensor, h0: torch.Tensor | None = None,
                 reset: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Newton's initial guess f(0, x_t) (f(h0, x_0) at t = 0). Returns (B, T, S)."""
    c = _Call("newton_guess", cell, x, params, h0, reset)
    chunk, n_chunks = _plan(c.B, c.T, c.W, x.device, chunk_size)
    h = _empty((c.B, c.T, c.S), x.dtype, x.device)
    _guess_kernel[c.grid(n_chunks)](*c.common(), h, c.T, c.W, chunk, **c.meta)
    return h


def newton_iteration(cell: str, x: torch.Tensor, params: torch.Tensor, h: torch.Tensor,
                     h0: torch.Tensor | None = None, reset: torch.Tensor | None = None,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step from the iterate h (B, T, S). Returns (h + delta (B, T, S), the residual
    max_t |h_t - f(h_{t-1}, x_t)| of h: a 0-dim tensor, inf where any residual is NaN)."""
    c = _Call("newton_iteration", cell, x, params, h0, reset)
    h = c.state("newton_iteration: h", h)
    chunk, n_chunks = _plan(c.B, c.T, c.W, x.device, chunk_size)
    h_new = _empty(h.shape, h.dtype, h.device)
    res = c.per_chunk(n_chunks, 1)

    def launch(cin, state, prod, write_h):
        _newton_kernel[c.grid(n_chunks)](
            *c.common(), h, h_new, cin if cin is not None else res, state if state is not None else res,
            prod if prod is not None else res, res, c.T, c.W, chunk, HAS_CIN=cin is not None,
            WRITE_H=write_h, WRITE_STATE=state is not None, **c.meta)

    if n_chunks == 1:
        launch(None, None, None, True)
    else:
        state, prod = c.per_chunk(n_chunks, c.S // c.W), c.per_chunk(n_chunks, 4 if c.lstm else 1)
        launch(None, state, prod, False)
        launch(c.carry(prod, state, reverse=False), None, None, True)
    return h_new, res.amax()


def adjoint(cell: str, x: torch.Tensor, params: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None,
            reset: torch.Tensor | None, g: torch.Tensor, chunk_size: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients through the solution h (B, T, S) of the recurrence, for g = dL/dh (B, T, S).
    Returns dx (B, T, 3, W) in x's dtype, dparams (P, W) in x's dtype (summed over batch and
    time), and dL/dh0 (B, S) (None without h0)."""
    c = _Call("newton adjoint", cell, x, params, h0, reset)
    h, g = c.state("newton adjoint: h", h), c.state("newton adjoint: g", g)
    chunk, n_chunks = _plan(c.B, c.T, c.W, x.device, chunk_size)
    dx = _empty(x.shape, x.dtype, x.device)
    dp = c.per_chunk(n_chunks, CELLS[cell])
    cout = c.per_chunk(n_chunks, c.S // c.W)

    def launch(cin, prod, write_grads):
        _adjoint_kernel[c.grid(n_chunks)](
            *c.common(), h, g, cin if cin is not None else cout, cout, prod if prod is not None else cout,
            dx, dp, c.T, c.W, chunk, HAS_CIN=cin is not None, WRITE_GRADS=write_grads, **c.meta)

    if n_chunks == 1:
        launch(None, None, True)
    else:
        prod = c.per_chunk(n_chunks, 4 if c.lstm else 1)
        launch(None, prod, False)
        launch(c.carry(prod, cout, reverse=True), None, True)
    dparams = dp.sum(dim=(0, 1)).view(CELLS[cell], c.W)
    dh0 = None if h0 is None else cout[:, 0].to(h0.dtype)
    return dx, dparams, dh0


BLOCK_SCAN_SIZES = range(2, 17)  # the block sizes N the block-scan kernels take
BLOCK_SCAN_TILE = 256  # matrix elements per program: 4 per thread with 2 warps (many programs: the scan is latency-bound)


def _block_scan_launch(name, a, b, h0):
    """Validated, contiguous inputs of a block-scan call and its launch parameters."""
    if a.dim() != 5 or a.shape[-1] != a.shape[-2] or b.shape != a.shape[:-1]:
        raise ValueError(f"{name}: a must be (B, T, D, N, N) and b (B, T, D, N); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    B, T, D, N = b.shape
    if N not in BLOCK_SCAN_SIZES:
        raise ValueError(f"{name}: block size N = {N} must be in 2..16")
    if h0 is not None and h0.shape != (B, D, N):
        raise ValueError(f"{name}: h0 must be (B, D, N) = {(B, D, N)}; got {tuple(h0.shape)}")
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    np_ = triton.next_power_of_2(N)
    tile = BLOCK_SCAN_TILE // (2 if acc == torch.float64 else 1)  # fp64: the same registers per thread
    block = max(1, min(tile // (np_ * np_), triton.next_power_of_2(D)))
    meta = dict(N=N, NP=np_, BLOCK_D=block, ACC=_tl_dtype(acc), num_warps=2 if block * np_ * np_ >= tile else 1)
    h0 = h0.to(acc).contiguous() if h0 is not None else None
    return a.contiguous(), b.contiguous(), h0, (triton.cdiv(D, block), B), meta


def _block_scan_plan(B: int, T: int, programs: int, device: torch.device, chunk_size: int | None
                     ) -> tuple[int, int]:
    """(chunk length, number of chunks) of a block scan, as _plan: None picks one chunk off CUDA; on
    CUDA enough time chunks for CHUNK_PROGRAMS_PER_SM programs per SM, each >= MIN_CHUNK steps.
    programs: per sequence (the grid's first axis)."""
    if chunk_size is None:
        if device.type != "cuda":
            return T, 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n = min(triton.cdiv(CHUNK_PROGRAMS_PER_SM * sms, B * programs), T // MIN_CHUNK)
        if n <= 1:
            return T, 1
        chunk_size = triton.cdiv(T, n)
    if chunk_size < 1:
        raise ValueError(f"block_scan: chunk_size must be >= 1; got {chunk_size}")
    chunk_size = min(chunk_size, T)
    return chunk_size, triton.cdiv(T, chunk_size)


def block_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
               reverse: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """h_t = a_t @ h_{t-1} + b_t per block of N (2..16), one fused kernel (the contract of
    megarnn.ops.newton.block_scan_reference; no autograd: block_scan_bwd is its backward).
    a: (B, T, D, N, N); b: (B, T, D, N); h0: (B, D, N) or None -> (B, T, D, N) in b's dtype,
    accumulated in fp32 (fp64 for fp64 b). reverse: from t = T-1 down (h_t = a_t @ h_{t+1} + b_t).

    chunk_size (None: _block_scan_plan's choice, one chunk off CUDA): with C > 1 time chunks the
    chunks run as C independent sequences (C times the programs): pass 1 scans each from zero, the
    states entering the chunks are folded in torch from each chunk's product of a (pairwise, fp32 /
    fp64) and its last value (C small steps), pass 2 scans each entering state through its chunk
    (b = 0) and adds it. Twice the kernel bytes, for parallelism when B x blocks leave SMs idle."""
    a, b, h0, grid, meta = _block_scan_launch("block_scan", a, b, h0)
    B, T, D, N = b.shape
    chunk, n_chunks = _block_scan_plan(B, T, grid[0], b.device, chunk_size)

    def run(a, b, h0, reverse):
        h = _empty(b.shape, b.dtype, b.device)
        _block_scan_kernel[(grid[0], b.shape[0])](a, b, h0 if h0 is not None else h, h, b.shape[1], D,
                                                  HAS_H0=h0 is not None, REVERSE=reverse, **meta)
        return h

    if n_chunks == 1:
        return run(a, b, h0, reverse)
    if reverse:
        a, b = a.flip(1), b.flip(1)
    pad = n_chunks * chunk - T  # steps after the end change no output
    if pad:
        a = torch.cat([a, a.new_zeros(B, pad, D, N, N)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, D, N)], dim=1)
    ac, bc = a.reshape(B * n_chunks, chunk, D, N, N), b.reshape(B * n_chunks, chunk, D, N)
    y = run(ac, bc, None, False).view(B, n_chunks, chunk, D, N)
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    prod = ac.view(B, n_chunks, chunk, D, N, N).transpose(1, 2).to(acc)  # (B, chunk, C, D, N, N)
    while prod.shape[1] > 1:  # a_{L-1} ... a_0 of every chunk, by pairs
        if prod.shape[1] % 2:
            eye = torch.eye(N, dtype=acc, device=b.device).expand(B, 1, *prod.shape[2:])
            prod = torch.cat([prod, eye], dim=1)
        prod = prod[:, 1::2] @ prod[:, 0::2]
    prod = prod[:, 0]
    carry = torch.zeros(B, D, N, dtype=acc, device=b.device) if h0 is None else h0.to(acc)
    carries = []
    for c in range(n_chunks):
        carries.append(carry)
        carry = (prod[:, c] @ carry.unsqueeze(-1)).squeeze(-1) + y[:, c, -1].to(acc)
    cin = torch.stack(carries, dim=1).reshape(B * n_chunks, D, N)
    h = (y + run(ac, torch.zeros_like(bc), cin, False).view_as(y)).view(B, n_chunks * chunk, D, N)[:, :T]
    return h.flip(1).contiguous() if reverse else h.contiguous()


def block_scan_bwd(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, g: torch.Tensor,
                   reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of block_scan(a, b, h0, reverse) whose output was h, for g = dL/dh (B, T, D, N):
    the transposed scan run the other way, one fused kernel. Returns (da (B, T, D, N, N),
    db (B, T, D, N), dh0 (B, D, N) or None without h0), in g's dtype."""
    a, g, h0, grid, meta = _block_scan_launch("block_scan_bwd", a, g, h0)
    if h.shape != g.shape:
        raise ValueError(f"block_scan_bwd: h must be (B, T, D, N) = {tuple(g.shape)}; got {tuple(h.shape)}")
    h = h.to(g.dtype).contiguous()
    da, db = _empty(a.shape, g.dtype, g.device), _empty(g.shape, g.dtype, g.device)
    dh0 = _empty(h0.shape, g.dtype, g.device) if h0 is not None else None
    T, D = g.shape[1], g.shape[2]
    _block_scan_bwd_kernel[grid](a, g, h, h0 if h0 is not None else h, da, db, dh0 if dh0 is not None else db,
                                 T, D, HAS_H0=h0 is not None, REVERSE=reverse, **meta)
    return da, db, dh0
