"""Diagonal linear scan h_t = a_t * h_{t-1} + b_t in Triton, forward and backward, and the
same scan with the RG-LRU gate math fused in (Griffin, De et al. 2024, eq. 1-4).

Algorithm
---------
Grid (channel blocks of BLOCK_D, batch, time chunks). A program owns BLOCK_D channels of one
sequence over one time chunk (the whole sequence unless chunked) and walks it in tiles of
BLOCK_T steps. A tile is loaded whole ([BLOCK_T, BLOCK_D], coalesced along D, so a program has
a full tile of loads in flight rather than one step's), then scanned in registers with
`tl.associative_scan` over the affine maps h -> a h + b:

    (a1, b1) then (a2, b2)  =  (a1 a2,  a2 b1 + b2)

which gives, per row, the decay product A_t since the tile start and the local state B_t; then
h_t = A_t h_carry + B_t and the last row is the next tile's carry. Only the carry crosses tiles,
in fp32 (fp64 for fp64 inputs) registers. Rows past the sequence are the identity map (a = 1,
b = 0), so any T works and the carry read from the last row is exact. The decay is multiplied,
never taken to log space, so a reset is just a_t = 0 (no -inf, no special case).

Backward (the adjoint of the torch backend in megarnn/ops/scan.py), a reverse scan:

    g_t = dh_t + a_{t+1} g_{t+1}      (a_T = 1 and g_T = dL/dh_last, the final-state gradient)
    da_t = g_t h_{t-1},  db_t = g_t,  dh0 = a_0 g_0

It loads its tiles latest-first (row r is time t_hi - 1 - r) and runs the same forward
associative scan; `associative_scan(reverse=True)` is avoided on purpose (triton-lang/triton
#4362: wrong results for non-commutative combines). h_{t-1} is read from the forward output
(saved by the caller), not recomputed: one extra read instead of a second forward pass. With a
bf16 output, da therefore sees h rounded to bf16.

Time chunks (for small B * D, where B * D / BLOCK_D programs cannot fill the GPU): pass 1 scans
every chunk from a zero state and writes only its final state S_c and decay product P_c; a
short scan over chunks (the same kernel on (P, S), shape (B, n_chunks, D)) gives each chunk's
true initial state; pass 2 rescans every chunk from it and writes h. The backward does the
same with the adjoint. Pass 1 is a recompute instead of a correction pass: it reads a, b again
but never writes or re-reads h.

Bytes per element (a, b, h of width s_a, s_b, s_h; fp32 = 4, bf16 = 2):
    forward            s_a + s_b + s_h                      12 fp32; 8 with fp32 a, bf16 b/h
    backward           s_a + s_h + s_dh + s_da + s_db       20 fp32 (shifted reads hit cache)
    chunked            + (s_a + s_b) forward, + (s_a + s_dh) backward
    fused RG-LRU fwd   x, gate_x, gate_a, h                 16 fp32, 8 bf16 (+1 B per (b, t) reset)
    fused RG-LRU bwd   x, gate_x, gate_a, h, dh in; dx, dgate_x, dgate_a out: 32 fp32, 16 bf16
Flops per element: the tile scan costs O(log BLOCK_T) combines of 3 flops, the carry 2; the
RG-LRU gates add ~40 (sigmoids, exp, a 15-term series for 1 - a^2, sqrt). All of it is far
below the ridge point of a GPU: the kernels are bandwidth-bound by design.

Dtypes: inputs fp32, bf16 or fp16 (accumulated in fp32), or fp64 (accumulated in fp64). The
decay is read in the caller's dtype: keep `a` in fp32 when b is bf16 (bf16 rounds 0.999 to 1).

Host functions (torch tensors in, torch tensors out; no autograd: megarnn/ops wraps them):
    scan_fwd(a, b, h0=None, chunk_size=None) -> (h, h_last)
    scan_bwd(a, h, h0, dh, dh_last=None, chunk_size=None) -> (da, db, dh0)
    rglru_fwd(x, gate_x, gate_a, sp, h0=None, reset=None, chunk_size=None) -> (h, h_last)
    rglru_bwd(x, gate_x, gate_a, sp, h, h0, reset, dh, dh_last=None, chunk_size=None)
        -> (dx, dgate_x, dgate_a, dsp, dh0)
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

# Module-level constants read inside kernels must be tl.constexpr.
RG_LRU_C = tl.constexpr(8.0)  # a_t = sigma(-Lambda)^(c r_t), c = 8 (Griffin eq. 4)
_MIN_4Y = tl.constexpr(1e-6)  # the sqrt's gradient 1 / sqrt(4y) is clipped at 1000 = 1 / sqrt(1e-6)
# True when the kernels were decorated under Triton's interpreter (TRITON_INTERPRET=1 before
# this import): then they run on CPU tensors, slowly, as the CI does.
INTERPRETED = triton.knobs.runtime.interpret


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) is applied first: h -> a2 (a1 h + b1) + b2. Not commutative.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _last_row(x, BLOCK_T: tl.constexpr):
    """Row BLOCK_T - 1 of a [BLOCK_T, BLOCK_D] tile as [BLOCK_D] (Triton has no row indexing)."""
    rows = tl.arange(0, BLOCK_T)
    return tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def _scan_tile(a, b, carry, BLOCK_T: tl.constexpr):
    """Scan a tile along its rows from `carry`. a, b: [BLOCK_T, BLOCK_D]; carry: [BLOCK_D].

    Returns h (the states of every row), the decay products from the tile start, and the new
    carry (the state of the last row; identity rows keep it exact past the sequence end).
    """
    a_cum, h_loc = tl.associative_scan((a, b), 0, _affine_combine)
    h = a_cum * carry[None, :] + h_loc
    return h, a_cum, _last_row(h, BLOCK_T)


@triton.jit
def _one_minus_exp(z):
    """1 - exp(z) for z <= 0. Near z = 0, 1 - exp(z) cancels (in fp32 it keeps ~2 digits of
    1 - a^2 at a = 0.99999), so there it is -expm1(z) as a 16-term Horner series (relative
    error < 1e-19 for |z| < 0.5). libdevice's expm1 would do, but the interpreter cannot call
    libdevice."""
    p = z * 0.0 + 1.0
    for k in tl.static_range(16, 1, -1):
        p = 1.0 + z * p / k
    return tl.where(z > -0.5, -z * p, 1.0 - tl.exp(z))


@triton.jit
def _load_reset(RESET, seq, time, mask, HAS_RESET: tl.constexpr):
    """The reset flags of steps `time` ([BT] bool); all False without a reset mask."""
    if HAS_RESET:
        return tl.load(RESET + seq + time, mask=mask, other=0) != 0
    else:
        return tl.zeros_like(time) > 0  # all False, without touching RESET


@triton.jit
def _rglru_decay(gate_a, sp, reset, HAS_RESET: tl.constexpr):
    """a_t = exp(-c sigmoid(gate_a) softplus(Lambda)), 0 at a reset. gate_a: [BT, BD]; sp: [BD];
    reset: [BT] bool. Returns (a, a before the reset, r the recurrence gate, log a)."""
    r = tl.sigmoid(gate_a)
    log_a = -RG_LRU_C * r * sp[None, :]
    a = tl.exp(log_a)
    if HAS_RESET:
        a_reset = tl.where(reset[:, None], 0.0, a)
    else:
        a_reset = a
    return a_reset, a, r, log_a


# ----------------------------------------------------------------------------------------------
# Kernels: plain scan
# ----------------------------------------------------------------------------------------------

@triton.jit
def _scan_fwd_kernel(A, X, H0, H, STATE, PROD, T, D, CHUNK,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                     HAS_H0: tl.constexpr, WRITE_H: tl.constexpr, WRITE_PROD: tl.constexpr):
    """A, X, H: (B, T, D); H0, STATE, PROD: (B, n_chunks, D) per-chunk initial state, final
    state and decay product. Grid (cdiv(D, BLOCK_D), B, n_chunks)."""
    pid_d, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.arange(0, BLOCK_T)
    seq = pid_b.to(tl.int64) * T * D  # int64: B * T * D may pass 2^31
    chunk_offs = (pid_b * tl.num_programs(2) + pid_c).to(tl.int64) * D + offs_d
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    if HAS_H0:
        carry = tl.load(H0 + chunk_offs, mask=mask_d, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D], ACC)
    prod = tl.full([BLOCK_D], 1.0, ACC)
    for t0 in range(t_start, t_end, BLOCK_T):
        time = t0 + rows
        mask = (time < t_end)[:, None] & mask_d[None, :]
        offs = seq + time[:, None] * D + offs_d[None, :]
        a = tl.load(A + offs, mask=mask, other=1.0).to(ACC)
        b = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        h, a_cum, carry = _scan_tile(a, b, carry, BLOCK_T)
        if WRITE_H:
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        if WRITE_PROD:
            prod = prod * _last_row(a_cum, BLOCK_T)
    tl.store(STATE + chunk_offs, carry, mask=mask_d)
    if WRITE_PROD:
        tl.store(PROD + chunk_offs, prod, mask=mask_d)


@triton.jit
def _scan_bwd_kernel(A, H, H0, DH, GIN, DA, DB, GOUT, PROD, T, D, CHUNK,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                     HAS_H0: tl.constexpr, HAS_GIN: tl.constexpr,
                     WRITE_GRADS: tl.constexpr, WRITE_PROD: tl.constexpr):
    """A, H, DH, DA, DB: (B, T, D); H0: (B, D); GIN, GOUT, PROD: (B, n_chunks, D): the adjoint
    entering each chunk from its end (g of the next chunk's start, dL/dh_last for the last),
    g at each chunk's start, and the product of a_{t+1} over the chunk."""
    pid_d, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.arange(0, BLOCK_T)
    seq = pid_b.to(tl.int64) * T * D
    chunk_offs = (pid_b * tl.num_programs(2) + pid_c).to(tl.int64) * D + offs_d
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    if HAS_GIN:
        carry = tl.load(GIN + chunk_offs, mask=mask_d, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D], ACC)
    if WRITE_GRADS and HAS_H0:
        h0 = tl.load(H0 + pid_b.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    prod = tl.full([BLOCK_D], 1.0, ACC)
    for i in range(0, tl.cdiv(t_end - t_start, BLOCK_T)):
        time = t_end - 1 - i * BLOCK_T - rows  # latest first: a forward scan over rows runs back in time
        valid = time >= t_start
        mask = valid[:, None] & mask_d[None, :]
        offs = seq + time[:, None] * D + offs_d[None, :]
        # a_{t+1}; 1 at t = T - 1 so that g_{T-1} = dh_{T-1} + dL/dh_last, and 1 on padding rows.
        has_next = (valid & (time + 1 < T))[:, None] & mask_d[None, :]
        a_next = tl.load(A + offs + D, mask=has_next, other=1.0).to(ACC)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
        g, a_cum, carry = _scan_tile(a_next, dh, carry, BLOCK_T)
        if WRITE_GRADS:
            has_prev = (valid & (time >= 1))[:, None] & mask_d[None, :]
            h_prev = tl.load(H + offs - D, mask=has_prev, other=0.0).to(ACC)
            if HAS_H0:
                h_prev = tl.where((time == 0)[:, None], h0[None, :], h_prev)
            tl.store(DA + offs, (g * h_prev).to(DA.dtype.element_ty), mask=mask)
            tl.store(DB + offs, g.to(DB.dtype.element_ty), mask=mask)
        if WRITE_PROD:
            prod = prod * _last_row(a_cum, BLOCK_T)
    tl.store(GOUT + chunk_offs, carry, mask=mask_d)
    if WRITE_PROD:
        tl.store(PROD + chunk_offs, prod, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Kernels: RG-LRU fused into the scan
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rglru_fwd_kernel(X, GX, GA, SP, RESET, H0, H, STATE, PROD, T, D, CHUNK,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                      HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
                      WRITE_H: tl.constexpr, WRITE_PROD: tl.constexpr):
    """X, GX, GA, H: (B, T, D) input and gate pre-activations, output; SP: (D,) softplus(Lambda);
    RESET: (B, T) uint8; H0, STATE, PROD: (B, n_chunks, D) as in _scan_fwd_kernel.
        a_t = exp(-c sigmoid(ga_t) sp),  b_t = x_t sigmoid(gx_t) sqrt(1 - a_t^2);
    at a reset a_t = 0 and b_t = x_t sigmoid(gx_t)."""
    pid_d, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.arange(0, BLOCK_T)
    seq = pid_b.to(tl.int64) * T * D
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    sp = tl.load(SP + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_H0:
        # Addressed apart from the stores after the loop: a shared 64-bit offset would stay live
        # across the loop, and ptxas spilled it (4 bytes, bf16 16 x 64 tile on sm_90).
        carry = tl.load(H0 + pid_b.to(tl.int64) * tl.num_programs(2) * D + (pid_c * D + offs_d),
                        mask=mask_d, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D], ACC)
    prod = tl.full([BLOCK_D], 1.0, ACC)
    for t0 in range(t_start, t_end, BLOCK_T):
        time = t0 + rows
        mask = (time < t_end)[:, None] & mask_d[None, :]
        offs = seq + time[:, None] * D + offs_d[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        gx = tl.load(GX + offs, mask=mask, other=0.0).to(ACC)
        ga = tl.load(GA + offs, mask=mask, other=0.0).to(ACC)
        reset = _load_reset(RESET, pid_b.to(tl.int64) * T, time, time < t_end, HAS_RESET)
        a, a_raw, r, log_a = _rglru_decay(ga, sp, reset, HAS_RESET)
        multiplier = tl.sqrt(_one_minus_exp(2.0 * log_a))
        if HAS_RESET:
            multiplier = tl.where(reset[:, None], 1.0, multiplier)
        b = x * tl.sigmoid(gx) * multiplier  # 0 on padding rows (x = 0)
        a = tl.where(mask, a, 1.0)  # padding rows: the identity
        h, a_cum, carry = _scan_tile(a, b, carry, BLOCK_T)
        if WRITE_H:
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        if WRITE_PROD:
            prod = prod * _last_row(a_cum, BLOCK_T)
    chunk_offs = (pid_b * tl.num_programs(2) + pid_c).to(tl.int64) * D + offs_d
    tl.store(STATE + chunk_offs, carry, mask=mask_d)
    if WRITE_PROD:
        tl.store(PROD + chunk_offs, prod, mask=mask_d)


@triton.jit
def _rglru_bwd_kernel(X, GX, GA, SP, RESET, H, H0, DH, GIN, DX, DGX, DGA, DSP, DH0, GOUT, PROD,
                      T, D, CHUNK,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                      HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, HAS_GIN: tl.constexpr,
                      WRITE_GRADS: tl.constexpr, WRITE_PROD: tl.constexpr):
    """The adjoint of _rglru_fwd_kernel. Gates are recomputed from X, GX, GA (never stored).
    DSP, DH0: (B, n_chunks, D) per-program partial sums of dL/dsp and a_0 g_0 (nonzero in chunk 0
    only); GIN, GOUT, PROD as in _scan_bwd_kernel."""
    pid_d, pid_b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.arange(0, BLOCK_T)
    seq = pid_b.to(tl.int64) * T * D
    reset_seq = pid_b.to(tl.int64) * T
    t_start = pid_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    sp = tl.load(SP + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_GIN:
        carry = tl.load(GIN + (pid_b * tl.num_programs(2) + pid_c).to(tl.int64) * D + offs_d,
                        mask=mask_d, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D], ACC)
    if WRITE_GRADS and HAS_H0:
        h0 = tl.load(H0 + pid_b.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    prod = tl.full([BLOCK_D], 1.0, ACC)
    # dL/dsp summed over the tile's rows once, after the loop (a reduction across rows per tile
    # costs a shared-memory round trip and a barrier).
    dsp_tile = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    dh0 = tl.zeros([BLOCK_D], ACC)
    n_tiles = tl.cdiv(t_end - t_start, BLOCK_T)
    for i in range(0, n_tiles):
        time = t_end - 1 - i * BLOCK_T - rows  # latest first, as in _scan_bwd_kernel
        valid = time >= t_start
        mask = valid[:, None] & mask_d[None, :]
        offs = seq + time[:, None] * D + offs_d[None, :]
        # a_{t+1}, recomputed from the gate tile shifted by one step (a cache hit on a GPU).
        next_t = valid & (time + 1 < T)
        has_next = next_t[:, None] & mask_d[None, :]
        ga_next = tl.load(GA + offs + D, mask=has_next, other=0.0).to(ACC)
        reset_next = _load_reset(RESET, reset_seq, time + 1, next_t, HAS_RESET)
        a_next, _, _, _ = _rglru_decay(ga_next, sp, reset_next, HAS_RESET)
        a_next = tl.where(has_next, a_next, 1.0)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
        g, a_cum, carry = _scan_tile(a_next, dh, carry, BLOCK_T)
        if WRITE_GRADS:
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            gx = tl.load(GX + offs, mask=mask, other=0.0).to(ACC)
            ga = tl.load(GA + offs, mask=mask, other=0.0).to(ACC)
            reset = _load_reset(RESET, reset_seq, time, valid, HAS_RESET)
            has_prev = (valid & (time >= 1))[:, None] & mask_d[None, :]
            h_prev = tl.load(H + offs - D, mask=has_prev, other=0.0).to(ACC)
            if HAS_H0:
                h_prev = tl.where((time == 0)[:, None], h0[None, :], h_prev)
            a, a_raw, r, log_a = _rglru_decay(ga, sp, reset, HAS_RESET)
            y = _one_minus_exp(2.0 * log_a)  # 1 - a^2
            multiplier = tl.sqrt(y)
            # The sqrt's gradient is bounded as in RecurrentGemma (models/cells.py SqrtBoundDerivative).
            dmult_dy = 1.0 / tl.sqrt(tl.maximum(4.0 * y, _MIN_4Y))
            if HAS_RESET:
                multiplier = tl.where(reset[:, None], 1.0, multiplier)
            i_gate = tl.sigmoid(gx)
            dx = g * i_gate * multiplier
            dgx = g * x * multiplier * i_gate * (1.0 - i_gate)
            dy = g * x * i_gate * dmult_dy
            # d/dlog_a of a (through h = a h_prev + ...) and of 1 - exp(2 log_a); none at resets.
            dlog_a = a_raw * (g * h_prev) - 2.0 * a_raw * a_raw * dy
            if HAS_RESET:
                dlog_a = tl.where(reset[:, None], 0.0, dlog_a)
            dlog_a = tl.where(mask, dlog_a, 0.0)
            dga = dlog_a * (-RG_LRU_C * sp[None, :]) * r * (1.0 - r)
            dsp_tile += dlog_a * r
            if HAS_H0:  # without h0 nothing reads DH0; only the tile holding t = 0 adds to it
                if pid_c == 0 and i == n_tiles - 1:
                    dh0 = tl.sum(tl.where((time == 0)[:, None], a * g, 0.0), axis=0)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            tl.store(DGX + offs, dgx.to(DGX.dtype.element_ty), mask=mask)
            tl.store(DGA + offs, dga.to(DGA.dtype.element_ty), mask=mask)
        if WRITE_PROD:
            prod = prod * _last_row(a_cum, BLOCK_T)
    # Addressed after the loop, not before: a 64-bit offset live across the loop was spilled
    # (8 bytes, fp32 on sm_80), as in the forward's h0.
    chunk_offs = (pid_b * tl.num_programs(2) + pid_c).to(tl.int64) * D + offs_d
    tl.store(GOUT + chunk_offs, carry, mask=mask_d)
    if WRITE_GRADS:
        tl.store(DSP + chunk_offs, tl.sum(dsp_tile, axis=0) * (-RG_LRU_C), mask=mask_d)
        if HAS_H0:
            tl.store(DH0 + chunk_offs, dh0, mask=mask_d)
    if WRITE_PROD:
        tl.store(PROD + chunk_offs, prod, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Host side: block sizes, chunk plan, the two-pass chunk carry
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> torch.Tensor:
    """The one allocator for kernel outputs; tests replace it with a NaN-filled one so that an
    element a kernel forgets to write fails loudly."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(T: int, D: int, acc: torch.dtype = torch.float32) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D). 16 x 64 tiles with 4 warps (8 values per thread): compiled for sm_80
    and sm_90, all four kernels stay within 56-168 registers without spills (32 x 64 spills in
    the RG-LRU backward), so 3-4 programs fit per SM. fp64 (two registers a value) takes 8 x 64.
    Short sequences and narrow widths get smaller tiles."""
    rows = 8 if acc == torch.float64 else 16
    return min(rows, triton.next_power_of_2(T)), min(64, triton.next_power_of_2(D))


def target_options(kernel: str, launch: dict, arch: int | None) -> dict:
    """Launch options that depend on the GPU (arch: 80, 90, ...; None off CUDA), given the
    kernel's name and its other launch arguments. tools/compile_kernels.py calls this for each
    target it compiles for. The RG-LRU backward in fp32 / bf16 on sm_80: ptxas 12.x, left to
    itself, aims at 4 programs per SM (128 registers) and spills 4-24 bytes; a budget of 168
    registers keeps 3 programs per SM without spills. sm_90's ptxas needs no budget (up to 154
    registers), and one of 168 would spill at unaligned shapes there."""
    if (kernel == "_rglru_bwd_kernel" and arch is not None and arch // 10 == 8
            and launch.get("ACC") != tl.float64):
        return {"maxnreg": 168}
    return {}


def _arch(device: torch.device) -> int | None:
    """The GPU's compute capability as 80, 90, ... (None off CUDA): target_options' arch."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _plan(B: int, T: int, D: int, device: torch.device, chunk_size: int | None) -> tuple[int, int]:
    """(chunk length, number of chunks). chunk_size=None: one chunk unless B * D gives fewer than
    2 programs per SM (chunking adds pass 1's reads, +2/3 of the forward traffic, so it pays only
    when the GPU would idle), then enough chunks for ~4 programs per SM, each >= 8 tiles long.
    The thresholds are first guesses, to be tuned with tools/bench_kernels.py on a GPU."""
    block_t, block_d = _blocks(T, D)
    if chunk_size is None:
        if device.type != "cuda":
            return T, 1
        programs = B * triton.cdiv(D, block_d)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if programs >= 2 * sms:
            return T, 1
        n = min(triton.cdiv(4 * sms, programs), triton.cdiv(T, 8 * block_t))
        if n <= 1:
            return T, 1
        chunk_size = triton.cdiv(triton.cdiv(T, n), block_t) * block_t
    if chunk_size < 1:
        raise ValueError(f"linear scan: chunk_size must be >= 1; got {chunk_size}")
    chunk_size = min(chunk_size, T)
    return chunk_size, triton.cdiv(T, chunk_size)


def _grid(B: int, D: int, n_chunks: int, block_d: int) -> tuple[int, int, int]:
    return (triton.cdiv(D, block_d), B, n_chunks)


def _check(name: str, *tensors: torch.Tensor) -> None:
    B, T, D = tensors[0].shape
    if B * T * D == 0:
        raise ValueError(f"{name}: empty input {(B, T, D)}; the kernels need B, T, D >= 1")
    if T * D >= 2**31:
        raise ValueError(f"{name}: T * D = {T * D} must be < 2^31 (int32 offsets within one sequence); "
                         f"split the sequence")
    for t in tensors:
        if t.shape != (B, T, D):
            raise ValueError(f"{name}: all inputs must be (B, T, D) = {(B, T, D)}; got {tuple(t.shape)}")


def _chunk_starts(prod: torch.Tensor, state: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The state entering each chunk, from pass 1's per-chunk decay products and local final
    states (B, n_chunks, D): a scan over chunks, h0 entering the first. -> (B, n_chunks, D)."""
    ends, _ = scan_fwd(prod, state, h0, chunk_size=prod.shape[1])
    first = torch.zeros_like(state[:, :1]) if h0 is None else h0.to(state.dtype)[:, None]
    return torch.cat([first, ends[:, :-1]], dim=1).contiguous()


def _chunk_adjoints(prod: torch.Tensor, gstart: torch.Tensor, g_last: torch.Tensor | None) -> torch.Tensor:
    """The adjoint entering each chunk from its end, from pass 1's per-chunk products of a_{t+1}
    and local adjoints at the chunk starts (B, n_chunks, D): a reverse scan over chunks with
    dL/dh_last entering the last chunk. -> (B, n_chunks, D)."""
    g_true, _ = scan_fwd(prod.flip(1).contiguous(), gstart.flip(1).contiguous(), g_last,
                         chunk_size=prod.shape[1])
    g_true = g_true.flip(1)  # g at each chunk's start
    last = torch.zeros_like(gstart[:, :1]) if g_last is None else g_last.to(gstart.dtype)[:, None]
    return torch.cat([g_true[:, 1:], last], dim=1).contiguous()


# ----------------------------------------------------------------------------------------------
# Host side: public functions
# ----------------------------------------------------------------------------------------------

def scan_fwd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
             chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t h_{t-1} + b_t. a, b: (B, T, D); h0: (B, D) or None (zeros).

    Returns h (B, T, D) in b's dtype and h_last (B, D) in the accumulation dtype (fp32; fp64
    for fp64 b). chunk_size splits time into chunks scanned in parallel (None: automatic)."""
    _check("scan_fwd", a, b)
    a, b = a.contiguous(), b.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, D = b.shape
    acc = _acc_dtype(b)
    block_t, block_d = _blocks(T, D, acc)
    chunk, n_chunks = _plan(B, T, D, b.device, chunk_size)
    h = _empty((B, T, D), b.dtype, b.device)
    state = _empty((B, n_chunks, D), acc, b.device)

    def launch(h0_chunks, write_h, prod):
        _scan_fwd_kernel[_grid(B, D, n_chunks, block_d)](
            a, b, h0_chunks if h0_chunks is not None else b, h, state, prod if prod is not None else state,
            T, D, chunk, BLOCK_T=block_t, BLOCK_D=block_d, ACC=_tl_dtype(acc),
            HAS_H0=h0_chunks is not None, WRITE_H=write_h, WRITE_PROD=prod is not None, num_warps=4)

    if n_chunks == 1:
        launch(h0, True, None)
        return h, state[:, 0]
    prod = _empty((B, n_chunks, D), acc, b.device)
    launch(None, False, prod)
    launch(_chunk_starts(prod, state, h0), True, None)
    return h, state[:, -1]


def scan_bwd(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor,
             dh_last: torch.Tensor | None = None, chunk_size: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of scan_fwd. a, h, dh: (B, T, D) (h the forward output); h0, dh_last: (B, D)
    or None (dh_last: the gradient of h_last). Returns da (a's dtype), db (h's dtype), dh0
    (h0's dtype; None without h0)."""
    _check("scan_bwd", a, h, dh)
    a, h, dh = a.contiguous(), h.contiguous(), dh.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    dh_last = None if dh_last is None else dh_last.contiguous()
    B, T, D = h.shape
    acc = _acc_dtype(h)
    block_t, block_d = _blocks(T, D, acc)
    chunk, n_chunks = _plan(B, T, D, h.device, chunk_size)
    da = _empty((B, T, D), a.dtype, a.device)
    db = _empty((B, T, D), h.dtype, h.device)
    gstart = _empty((B, n_chunks, D), acc, h.device)

    def launch(g_in, write_grads, prod):
        _scan_bwd_kernel[_grid(B, D, n_chunks, block_d)](
            a, h, h0 if h0 is not None else h, dh, g_in if g_in is not None else gstart, da, db, gstart,
            prod if prod is not None else gstart, T, D, chunk,
            BLOCK_T=block_t, BLOCK_D=block_d, ACC=_tl_dtype(acc), HAS_H0=h0 is not None,
            HAS_GIN=g_in is not None, WRITE_GRADS=write_grads, WRITE_PROD=prod is not None, num_warps=4)

    if n_chunks == 1:
        launch(dh_last, True, None)
    else:
        prod = _empty((B, n_chunks, D), acc, h.device)
        launch(None, False, prod)
        launch(_chunk_adjoints(prod, gstart, dh_last), True, None)
    dh0 = None if h0 is None else (a[:, 0].to(acc) * gstart[:, 0]).to(h0.dtype)
    return da, db, dh0


def rglru_fwd(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, sp: torch.Tensor,
              h0: torch.Tensor | None = None, reset: torch.Tensor | None = None,
              chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RG-LRU with the gates fused into the scan. x, gate_x, gate_a: (B, T, D) input and gate
    pre-activations; sp: (D,) softplus(Lambda); h0: (B, D); reset: (B, T) bool or None.

        a_t = exp(-8 sigmoid(gate_a_t) sp),  b_t = x_t sigmoid(gate_x_t) sqrt(1 - a_t^2),
        h_t = a_t h_{t-1} + b_t;  at a reset a_t = 0 and b_t = x_t sigmoid(gate_x_t).

    Returns h (B, T, D) in x's dtype and h_last (B, D) in the accumulation dtype."""
    _check("rglru_fwd", x, gate_x, gate_a)
    x, gate_x, gate_a = x.contiguous(), gate_x.contiguous(), gate_a.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, D = x.shape
    acc = _acc_dtype(x)
    block_t, block_d = _blocks(T, D, acc)
    chunk, n_chunks = _plan(B, T, D, x.device, chunk_size)
    sp = sp.to(acc).contiguous()
    reset_u8 = _reset_u8(reset, B, T, x.device)
    h = _empty((B, T, D), x.dtype, x.device)
    state = _empty((B, n_chunks, D), acc, x.device)

    def launch(h0_chunks, write_h, prod):
        _rglru_fwd_kernel[_grid(B, D, n_chunks, block_d)](
            x, gate_x, gate_a, sp, reset_u8, h0_chunks if h0_chunks is not None else x, h, state,
            prod if prod is not None else state, T, D, chunk,
            BLOCK_T=block_t, BLOCK_D=block_d, ACC=_tl_dtype(acc), HAS_H0=h0_chunks is not None,
            HAS_RESET=reset is not None, WRITE_H=write_h, WRITE_PROD=prod is not None, num_warps=4)

    if n_chunks == 1:
        launch(h0, True, None)
        return h, state[:, 0]
    prod = _empty((B, n_chunks, D), acc, x.device)
    launch(None, False, prod)
    launch(_chunk_starts(prod, state, h0), True, None)
    return h, state[:, -1]


def rglru_bwd(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, sp: torch.Tensor,
              h: torch.Tensor, h0: torch.Tensor | None, reset: torch.Tensor | None, dh: torch.Tensor,
              dh_last: torch.Tensor | None = None, chunk_size: int | None = None):
    """Gradients of rglru_fwd (h its output). Returns (dx, dgate_x, dgate_a) in the inputs'
    dtypes, dsp (D,) in the accumulation dtype, and dh0 (h0's dtype; None without h0).
    The sqrt(1 - a^2) gradient is clipped at 1000 as in RecurrentGemma."""
    _check("rglru_bwd", x, gate_x, gate_a, h, dh)
    x, gate_x, gate_a, h, dh = (t.contiguous() for t in (x, gate_x, gate_a, h, dh))
    h0 = None if h0 is None else h0.contiguous()
    dh_last = None if dh_last is None else dh_last.contiguous()
    B, T, D = x.shape
    acc = _acc_dtype(x)
    block_t, block_d = _blocks(T, D, acc)
    chunk, n_chunks = _plan(B, T, D, x.device, chunk_size)
    sp = sp.to(acc).contiguous()
    reset_u8 = _reset_u8(reset, B, T, x.device)
    dx = _empty((B, T, D), x.dtype, x.device)
    dgx = _empty((B, T, D), gate_x.dtype, x.device)
    dga = _empty((B, T, D), gate_a.dtype, x.device)
    gstart, dsp, dh0 = (_empty((B, n_chunks, D), acc, x.device) for _ in range(3))

    def launch(g_in, write_grads, prod):
        kw = dict(BLOCK_T=block_t, BLOCK_D=block_d, ACC=_tl_dtype(acc), HAS_H0=h0 is not None,
                  HAS_RESET=reset is not None, HAS_GIN=g_in is not None, WRITE_GRADS=write_grads,
                  WRITE_PROD=prod is not None, num_warps=4)
        _rglru_bwd_kernel[_grid(B, D, n_chunks, block_d)](
            x, gate_x, gate_a, sp, reset_u8, h, h0 if h0 is not None else x, dh,
            g_in if g_in is not None else gstart, dx, dgx, dga, dsp, dh0, gstart,
            prod if prod is not None else gstart, T, D, chunk,
            **kw, **target_options("_rglru_bwd_kernel", kw, _arch(x.device)))

    if n_chunks == 1:
        launch(dh_last, True, None)
    else:
        prod = _empty((B, n_chunks, D), acc, x.device)
        launch(None, False, prod)
        launch(_chunk_adjoints(prod, gstart, dh_last), True, None)
    dh0_out = None if h0 is None else dh0[:, 0].to(h0.dtype)
    return dx, dgx, dga, dsp.sum(dim=(0, 1)), dh0_out


def _reset_u8(reset: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """(B, T) bool -> uint8 (a byte per step; Triton's bool pointers are not portable)."""
    if reset is None:
        return torch.zeros(1, dtype=torch.uint8, device=device)
    if reset.shape != (B, T):
        raise ValueError(f"rglru: reset must be (B, T) = {(B, T)} bool; got {tuple(reset.shape)}")
    return reset.to(device=device, dtype=torch.uint8).contiguous()
