"""Benchmark the kernels beside their peers: time, achieved GB/s (and TFLOP/s for SSD), and % of
the copy bandwidth this script measures on the same device in the same run.

    python tools/bench_kernels.py                          # GPU: realistic shapes; CPU: tiny ones
    python tools/bench_kernels.py --shape 8 4096 4096 --dtype bf16 --reps 20
    python tools/bench_kernels.py --only scan --no-compile
    python tools/bench_kernels.py --only ssd --ssd-shape 8 4096 64 64 1 128 256
    python tools/bench_kernels.py --only newton --newton-shape 8 4096 256
    python tools/bench_kernels.py --only la --la-shape 8 4096 16 128 128 64   # GLA, gated delta rule vs fla

Primitives: the diagonal linear scan h_t = a_t h_{t-1} + b_t, the RG-LRU with its gates
fused into that scan, and SSD, the chunked state-space scan of Mamba2 (--ssd-shape B T H P G N Q;
default on a GPU: one Mamba2-1.3B layer, d_model 2048 = 64 heads of 64, N = 128, G = 1, chunk 256,
at B = 8, T = 4096). GB/s is the minimum traffic of the op (every input read once, every output
written once) divided by the time, the same count for every row, so rows compare directly:
  scan fwd       a, b in; h out                      fwd+bwd adds a, h, dh in; da, db out
  rglru fwd      x, gate_x, gate_a in; h out         fwd+bwd adds x, gate_x, gate_a, h, dh in; 3 grads out
  ssd fwd        x, B, C, dt in; y out               fwd+bwd adds x, B, C, dt, dy in; dx, dB, dC, ddt out
--dtype bf16 keeps the decay a in fp32 (bf16 rounds 0.999 to 1) and everything else in bf16; for
SSD it makes x, B, C bf16 (dt, A, D fp32, as Mamba2 keeps them).
SSD is matmul-heavy, so its rows also give TFLOP/s: the matmul FLOPs of kernels/ssd.py's
algorithm (`ssd_flops`: the causal intra-chunk products, C B^T, the chunk states and C S_in;
the backward with its recomputation), the same count for every row.
Newton: the solve of the ParaGRU / ParaLSTM cells through newton_solve's backends, float32 (the
solve's compute dtype) whatever --dtype says, shapes B x T x W (--newton-shape; default: the
issue's paraGRU shape 8 x 4096 x 256 on a GPU, 1 x 16 x 8 on CPU), minimum traffic
  newton fwd     x (B, T, 3, W) in; h out            fwd+bwd adds x, h, dh in; dx out
Its rows name the solver the triton dispatcher picks and the Newton iterations taken, and give
the speedup of fwd+bwd over the torch sequential loop (cell.step per step, autograd backward).

Peers (optional imports; the table says which were missing): pararnn-torch's fused Newton for
the cells (ParaRNN(ParaGRU / ParaLSTM), 3 iterations, its own input projection W -> 3W inside
the timed region); mamba_ssm's Triton
`mamba_chunk_scan_combined` for SSD (same layout, dt already positive, no resets); fla's chunk_hgrn and
fused_recurrent_hgrn (log-space decay g = log a), accelerated-scan (channels-first (B, D, T),
T a power of two), and a torch loop over time, eager and torch.compile'd (the step compiled;
compiling the whole unrolled loop takes minutes at T = 4096). Layout conversions happen outside
the timed region. Without CUDA, the Triton rows run under Triton's interpreter (this script
sets TRITON_INTERPRET=1): those numbers are correctness smoke, not speed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton's @jit kernels

import torch.nn.functional as F  # noqa: E402

from megarnn.models.cells import RG_LRU_C, SqrtBoundDerivative  # noqa: E402
from megarnn.ops.scan import linear_scan, rglru_scan  # noqa: E402

GPU_SHAPES = [(8, 4096, 4096), (1, 16384, 1024)]  # the second is too narrow to fill a GPU: time-chunked
CPU_SHAPES = [(1, 128, 64)]
NEWTON_GPU_SHAPES = [(8, 4096, 256)]  # B T W: the paraGRU shape, 2048 channels
NEWTON_CPU_SHAPES = [(1, 16, 8)]  # the interpreter: ~5 ms per step and program
SSD_GPU_SHAPES = [(8, 4096, 64, 64, 1, 128, 256)]  # B T H P G N chunk: one Mamba2-1.3B layer
SSD_CPU_SHAPES = [(1, 32, 2, 16, 1, 16, 16)]  # the interpreter: correctness smoke only
LA_GPU_SHAPES = [(8, 4096, 16, 128, 128, 64)]  # B T H K V chunk: one ~1B GLA / Gated DeltaNet layer
LA_CPU_SHAPES = [(1, 32, 2, 16, 16, 16)]


@dataclass
class Row:
    op: str
    impl: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    note: str = ""
    bytes: tuple[int, int] = (0, 0)  # minimum traffic (fwd, fwd+bwd)
    flops: tuple[int, int] = (0, 0)  # matmul FLOPs (fwd, fwd+bwd); 0: not reported (bandwidth-bound ops)


@dataclass
class Report:
    copy_gbps: float
    rows: list[Row] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, reps: int) -> float:
    """Median milliseconds of fn() after one warm-up call (compiles, autotunes). On a GPU,
    triton's do_bench (L2 flushed between calls) with `reps` ms of budget."""
    fn()
    _sync(device)
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=max(1, reps // 4), rep=max(reps, 5), return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbps(device, reps: int) -> float:
    """GB/s of dst.copy_(src) for a large tensor (read + write counted): the practical ceiling."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


def _measure(row: Row, fwd, fwdbwd, device, reps) -> Row:
    """Fill a row's times; a failing implementation gets its error in the note, not a crash."""
    try:
        row.fwd_ms = _time_ms(fwd, device, reps)
        if fwdbwd is not None:
            row.fwdbwd_ms = _time_ms(fwdbwd, device, reps)
    except Exception as e:  # a peer that does not support this shape or dtype
        row.note = (row.note + " " if row.note else "") + f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return row


def _backward(fn, inputs):
    """A callable running fn(*inputs) forward and backward (grads cleared between calls)."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


# ------------------------------------------------------------------------------------------------
# Scan and its peers
# ------------------------------------------------------------------------------------------------

def _torch_loop(a, b):
    """The textbook loop, eager: T small kernels."""
    h = torch.zeros_like(b[:, 0], dtype=torch.float32)
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def _compiled_loop():
    step = torch.compile(lambda a_t, b_t, h: a_t * h + b_t.float(), dynamic=False)

    def loop(a, b):
        h = torch.zeros_like(b[:, 0], dtype=torch.float32)
        out = []
        for t in range(b.shape[1]):
            h = step(a[:, t], b[:, t], h)
            out.append(h)
        return torch.stack(out, 1)
    return loop


def _scan_peers(a, b, report: Report):
    """(name, fwd fn, args) for each importable peer; the rest go to report.missing."""
    peers = []
    if a.device.type != "cuda":
        for name in ("fla chunk_hgrn", "fla fused_recurrent_hgrn", "accelerated-scan"):
            report.missing[name] = "needs CUDA"
        return peers
    try:
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
        g = a.clamp_min(1e-30).log().to(b.dtype).contiguous()  # HGRN: h_t = exp(g_t) h_{t-1} + x_t
        peers += [("fla chunk_hgrn", chunk_hgrn, (b, g)), ("fla fused_recurrent_hgrn", fused_recurrent_hgrn, (b, g))]
    except Exception as e:
        report.missing["fla (flash-linear-attention)"] = f"{type(e).__name__}: {e}"
    try:
        from accelerated_scan.warp import scan as warp_scan
        gates, tokens = (t.to(b.dtype).transpose(1, 2).contiguous() for t in (a, b))  # (B, D, T)
        peers.append(("accelerated-scan warp", warp_scan, (gates, tokens)))
    except Exception as e:
        report.missing["accelerated-scan"] = f"{type(e).__name__}: {e}"
    return peers


def bench_scan(B, T, D, dtype, device, reps, compile_loop, report: Report):
    from megarnn_kernels import linear_scan as kernels

    a = torch.rand(B, T, D, device=device).mul_(0.1).add_(0.9)  # fp32 decays in [0.9, 1)
    b = torch.randn(B, T, D, device=device, dtype=dtype)
    op = f"scan {B}x{T}x{D}"
    leaf = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    interp = " (interpreter)" if device.type != "cuda" else ""
    chunk, n_chunks = kernels._plan(B, T, D, device, None)
    rows = [(f"megarnn triton{interp}", lambda: kernels.scan_fwd(a, b),
             _backward(lambda a, b: linear_scan(a, b, backend="triton"), leaf(a, b)),
             f"{n_chunks} time chunks of {chunk}" if n_chunks > 1 else "")]
    if n_chunks > 1:
        rows.append((f"megarnn triton, 1 chunk{interp}", lambda: kernels.scan_fwd(a, b, chunk_size=T),
                     None, "unchunked, for comparison"))
    rows.append(("megarnn torch backend", lambda: linear_scan(a, b, backend="torch"),
                 _backward(lambda a, b: linear_scan(a, b, backend="torch"), leaf(a, b)), "python loop, adjoint bwd"))
    rows.append(("torch loop eager", lambda: _torch_loop(a, b), _backward(_torch_loop, leaf(a, b)), "autograd bwd"))
    if compile_loop:
        loop = _compiled_loop()
        rows.append(("torch loop torch.compile", lambda: loop(a, b), _backward(loop, leaf(a, b)), "step compiled"))
    else:
        report.missing["torch loop torch.compile"] = "--no-compile"
    for name, fn, args in _scan_peers(a, b, report):
        rows.append((name, lambda fn=fn, args=args: fn(*args), _backward(fn, leaf(*args)), ""))
    n = B * T * D
    fwd_bytes = n * (a.element_size() + 2 * b.element_size())
    bwd_bytes = n * (2 * a.element_size() + 3 * b.element_size())
    for name, fwd, fwdbwd, note in rows:
        row = Row(op, name, note=note, bytes=(fwd_bytes, fwd_bytes + bwd_bytes))
        report.rows.append(_measure(row, fwd, fwdbwd, device, reps))


# ------------------------------------------------------------------------------------------------
# RG-LRU: fused gates vs the cells.py math around a plain scan
# ------------------------------------------------------------------------------------------------

def _rglru_unfused(backend):
    """models/cells.py RGLRU.forward after its two gate matmuls, around linear_scan(backend)."""
    def fn(x, gx, ga, param):
        log_a = -RG_LRU_C * torch.sigmoid(ga) * F.softplus(param)
        a = torch.exp(log_a)
        multiplier = SqrtBoundDerivative.apply(1 - torch.exp(2 * log_a))
        h = linear_scan(a.float(), (x * torch.sigmoid(gx) * multiplier).float(), backend=backend)
        return h.to(x.dtype)
    return fn


def bench_rglru(B, T, D, dtype, device, reps, report: Report):
    x, gx, ga = (torch.randn(B, T, D, device=device, dtype=dtype) for _ in range(3))
    param = torch.randn(D, device=device)
    op = f"rglru {B}x{T}x{D}"
    leaf = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    interp = " (interpreter)" if device.type != "cuda" else ""
    rows = [(f"megarnn triton fused{interp}", rglru_scan, "gates in the scan kernel"),
            (f"cells math + triton scan{interp}", _rglru_unfused("triton"), "gates in torch"),
            ("cells math + torch scan", _rglru_unfused("torch"), "gates in torch")]
    n = B * T * D
    fwd_bytes, bwd_bytes = 4 * n * x.element_size(), 8 * n * x.element_size()
    for name, fn, note in rows:
        row = Row(op, name, note=note, bytes=(fwd_bytes, fwd_bytes + bwd_bytes))
        report.rows.append(_measure(row, lambda fn=fn: fn(x, gx, ga, param),
                                    _backward(fn, leaf(x, gx, ga, param)), device, reps))


# ------------------------------------------------------------------------------------------------
# SSD (Mamba2): the Triton chunk scan vs the torch chunked backend and mamba_ssm
# ------------------------------------------------------------------------------------------------

def _ssd_inputs(B, T, H, P, G, N, dtype, device):
    """Mamba2-like values: dt = softplus(normal - 3) ~ 0.05, A = -exp(uniform(0, log 16)) (the
    Mamba2 init), x, B, C normal in `dtype`; dt, A, D fp32."""
    x = torch.randn(B, T, H, P, device=device, dtype=dtype)
    dt = F.softplus(torch.randn(B, T, H, device=device) - 3)
    A = -torch.exp(torch.rand(H, device=device) * torch.log(torch.tensor(16.0)))
    Bm, Cm = (torch.randn(B, T, G, N, device=device, dtype=dtype) for _ in range(2))
    D = torch.randn(H, device=device)
    return x, dt, A, Bm, Cm, D


def _ssd_peers(Q, device, report: Report):
    """(name, fn(x, dt, A, B, C, D) -> y) for each importable peer; the rest go to report.missing."""
    name = "mamba_ssm mamba_chunk_scan_combined"
    if device.type != "cuda":
        report.missing[name] = "needs CUDA"
        return []
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:
        report.missing[name] = f"{type(e).__name__}: {e}"
        return []
    return [(name, lambda x, dt, A, B, C, D: mamba_chunk_scan_combined(x, dt, A, B, C, Q, D=D))]


def bench_ssd(B, T, H, P, G, N, Q, dtype, device, reps, report: Report):
    from megarnn_kernels import ssd as kernels
    from megarnn.ops.ssd import ssd_scan

    args = _ssd_inputs(B, T, H, P, G, N, dtype, device)
    op = f"ssd {B}x{T} H{H} P{P} G{G} N{N} Q{Q}"
    leaf = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    interp = " (interpreter)" if device.type != "cuda" else ""
    backend = lambda name: lambda *a: ssd_scan(*a, chunk_size=Q, backend=name)  # noqa: E731
    rows = [(f"megarnn triton{interp}", lambda: kernels.ssd_fwd(*args[:5], Q, args[5]), backend("triton"),
             "bwd recomputes the states"),
            ("megarnn torch backend", lambda: backend("torch")(*args), backend("torch"), "chunked, autograd bwd")]
    for name, fn in _ssd_peers(Q, device, report):
        rows.append((name, lambda fn=fn: fn(*args), fn, ""))
    s, tokens = args[0].element_size(), B * T
    fwd_bytes = tokens * (2 * H * P * s + 2 * G * N * s + 4 * H)
    bwd_bytes = tokens * (3 * H * P * s + 4 * G * N * s + 8 * H)
    fwd_flops, bwd_flops = kernels.ssd_flops(B, T, H, P, G, N, min(Q, T))
    for name, fwd, fn, note in rows:
        row = Row(op, name, note=note, bytes=(fwd_bytes, fwd_bytes + bwd_bytes),
                  flops=(fwd_flops, fwd_flops + bwd_flops))
        report.rows.append(_measure(row, fwd, _backward(fn, leaf(*args)), device, reps))


# ------------------------------------------------------------------------------------------------
# GLA and the gated delta rule: the triton kernels, the chunked torch forms, fla's chunk kernels
# ------------------------------------------------------------------------------------------------

def _la_inputs(kind, B, T, H, K, V, dtype, device):
    """fla's layouts: q, k (B,T,H,K), v (B,T,H,V); GLA's log gate gk (B,T,H,K) = logsigmoid / 16,
    the delta rule's g (B,T,H) = -softplus-like decay and beta in (0, 1); fp32 gates."""
    q, k = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    if kind == "gla":
        return q, k, v, F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16
    k = F.normalize(k.float(), dim=-1).to(dtype)
    q = F.normalize(q.float(), dim=-1).to(dtype)
    return q, k, v, -F.softplus(torch.randn(B, T, H, device=device) - 3), torch.rand(B, T, H, device=device)


def _la_peer(kind, device, report: Report):
    name = f"fla chunk_{'gla' if kind == 'gla' else 'gated_delta_rule'}"
    if device.type != "cuda":
        report.missing[name] = "needs CUDA"
        return []
    try:
        if kind == "gla":
            from fla.ops.gla import chunk_gla
            return [(name, lambda q, k, v, gk: chunk_gla(q, k, v, gk)[0])]
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return [(name, lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0])]
    except Exception as e:
        report.missing[name] = f"{type(e).__name__}: {e}"
        return []


def bench_linear_attention(kind, B, T, H, K, V, Q, dtype, device, reps, report: Report):
    from megarnn.ops import gated_delta_rule, gla

    args = _la_inputs(kind, B, T, H, K, V, dtype, device)
    op = f"{kind} {B}x{T} H{H} K{K} V{V} Q{Q}"
    leaf = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    interp = " (interpreter)" if device.type != "cuda" else ""
    fn = gla if kind == "gla" else gated_delta_rule
    backend = lambda name: lambda *a: fn(*a, chunk_size=Q, backend=name)[0]  # noqa: E731
    rows = [(f"megarnn triton{interp}", backend("triton"), "fused fwd and bwd"),
            ("megarnn torch backend", backend("torch"), "chunked, autograd bwd")]
    rows += [(name, peer, "") for name, peer in _la_peer(kind, device, report)]
    s, tokens = args[0].element_size(), B * T
    gate = H * K * 4 if kind == "gla" else 2 * H * 4
    fwd_bytes = tokens * (H * (2 * K + 2 * V) * s + gate)  # q, k, v in, o out, the gates
    bwd_bytes = tokens * (H * (3 * K + 4 * V) * s + 2 * gate)  # q, k, v, do in; dq, dk, dv out; gates and theirs
    for name, f, note in rows:
        row = Row(op, name, note=note, bytes=(fwd_bytes, fwd_bytes + bwd_bytes))
        report.rows.append(_measure(row, lambda f=f: f(*args), _backward(f, leaf(*args)), device, reps))


# ------------------------------------------------------------------------------------------------
# Newton solve of the ParaRNN cells: the triton solvers, the torch backends, pararnn-torch
# ------------------------------------------------------------------------------------------------

def _pararnn_peer(kind, B, T, W, device, report: Report):
    """(name, model, u) for pararnn-torch's fused Newton, or None (the reason in report.missing).
    Its model takes u (B, T, W) and applies its own input projection inside the timed region."""
    try:
        import pararnn
    except Exception as e:
        report.missing["pararnn-torch"] = f"{type(e).__name__}: {e}"
        return None
    try:
        cell = getattr(pararnn, {"gru": "ParaGRU", "lstm": "ParaLSTM"}[kind])(W, W)
        model = pararnn.ParaRNN(cell, config=pararnn.NewtonConfig(max_iters=3)).to(device)
    except Exception as e:
        report.missing[f"pararnn-torch {kind}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return None
    return "pararnn-torch fused Newton", model, torch.randn(B, T, W, device=device)


def _no_grad(fn):
    """fn under torch.no_grad(): forward rows time the solve, not autograd's bookkeeping."""
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def bench_newton(kind, B, T, W, device, reps, report: Report):
    from megarnn.models.pararnn import ParaGRUCell, ParaLSTMCell
    from megarnn.ops.newton import newton_solve, triton_solver

    cell = {"gru": ParaGRUCell, "lstm": ParaLSTMCell}[kind](W, 1).to(device)
    x = torch.randn(B, T, 3, W, device=device)
    op = f"newton {kind} {B}x{T}x{W}"
    interp = " (interpreter)" if device.type != "cuda" else ""
    S = cell.state_size
    nbytes = (4 * B * T * (3 * W + S), 4 * B * T * (9 * W + 3 * S))  # fwd; fwd + bwd
    impls = [(f"megarnn triton{interp}", "triton", f"dispatch: {triton_solver(B, T, W, device)}"),
             (f"megarnn triton newton{interp}", "triton_newton", "fused iterations, adjoint bwd"),
             (f"megarnn triton sequential{interp}", "triton_sequential", "fused loop, adjoint bwd"),
             ("megarnn torch backend", "torch", "Newton in torch, adjoint bwd"),
             ("torch sequential loop", "sequential", "cell.step per t, autograd bwd")]
    rows = []
    for name, backend, note in impls:
        stats: dict = {}
        fn = lambda x, backend=backend, stats=stats: newton_solve(cell, x, backend=backend, stats=stats)  # noqa: E731
        row = _measure(Row(op, name, note=note, bytes=nbytes), lambda fn=fn: _no_grad(fn)(x),
                       _backward(fn, [x.clone().requires_grad_()]), device, reps)
        if backend in ("torch", "triton_newton") and "iters" in stats:
            row.note += f", {stats['iters']} iters"
        rows.append(row)
    loop = rows[-1]
    peer = _pararnn_peer(kind, B, T, W, device, report)
    if peer is not None:
        name, model, u = peer
        rows.append(_measure(Row(op, name, note="3 iters, input projection included", bytes=nbytes),
                             lambda: _no_grad(model)(u), _backward(model, [u.clone().requires_grad_()]), device, reps))
    for row in rows:
        if row is not loop and row.fwdbwd_ms and loop.fwdbwd_ms:
            row.note += f"; {loop.fwdbwd_ms / row.fwdbwd_ms:.3g}x the loop (fwd+bwd)"
    report.rows.extend(rows)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _cells(ms, nbytes, flops, copy_gbps):
    if ms is None:
        return ["-", "-", "-", "-"]
    gbps = nbytes / (ms * 1e-3) / 1e9
    tflops = f"{flops / (ms * 1e-3) / 1e12:.4g}" if flops else "-"
    return [f"{ms:.4g}", f"{gbps:.4g}", f"{100 * gbps / copy_gbps:.3g}%", tflops]


def format_report(report: Report) -> str:
    head = ["op", "implementation", "fwd ms", "GB/s", "% copy", "TFLOP/s", "fwd+bwd ms", "GB/s", "% copy", "TFLOP/s",
            "note"]
    body = [[r.op, r.impl, *_cells(r.fwd_ms, r.bytes[0], r.flops[0], report.copy_gbps),
             *_cells(r.fwdbwd_ms, r.bytes[1], r.flops[1], report.copy_gbps), r.note] for r in report.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *map(line, body)]
    out.append(f"copy bandwidth (dst.copy_(src), read + write): {report.copy_gbps:.1f} GB/s")
    for name, why in report.missing.items():
        out.append(f"missing: {name}: {why}")
    return "\n".join(out)


def _device_line(device) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs=3, type=int, action="append", metavar=("B", "T", "D"),
                   help="repeatable; default: 8x4096x4096 and 1x16384x1024 on a GPU, 1x128x64 on CPU")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="activations (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--reps", type=int, default=None,
                   help="CPU: timed calls (default 3); GPU: triton.testing.do_bench's budget in ms (default 100)")
    p.add_argument("--ssd-shape", nargs=7, type=int, action="append", metavar=("B", "T", "H", "P", "G", "N", "Q"),
                   help="repeatable; default: 8x4096, 64 heads of 64, G 1, N 128, chunk 256 on a GPU; tiny on CPU")
    p.add_argument("--newton-shape", nargs=3, type=int, action="append", metavar=("B", "T", "W"),
                   help="repeatable; default: 8x4096x256 on a GPU, 1x16x8 on CPU")
    p.add_argument("--la-shape", nargs=6, type=int, action="append", metavar=("B", "T", "H", "K", "V", "Q"),
                   help="GLA and the gated delta rule; repeatable; default: 8x4096, 16 heads of K = V = 128, "
                        "chunk 64 on a GPU; tiny on CPU")
    p.add_argument("--only", choices=["scan", "rglru", "ssd", "newton", "la"], default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (slow to compile on CPU)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    reps = args.reps or (100 if device.type == "cuda" else 3)
    shapes = args.shape or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    print(_device_line(device))
    print(f"command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}; "
          f"dtype {dtype}; reps {reps}")
    report = Report(copy_gbps=copy_bandwidth_gbps(device, reps))
    for B, T, D in shapes:
        if args.only in (None, "scan"):
            bench_scan(B, T, D, dtype, device, reps, not args.no_compile, report)
        if args.only in (None, "rglru"):
            bench_rglru(B, T, D, dtype, device, reps, report)
    if args.only in (None, "ssd"):
        for shape in args.ssd_shape or (SSD_GPU_SHAPES if device.type == "cuda" else SSD_CPU_SHAPES):
            bench_ssd(*shape, dtype, device, reps, report)
    if args.only in (None, "la"):
        for shape in args.la_shape or (LA_GPU_SHAPES if device.type == "cuda" else LA_CPU_SHAPES):
            for kind in ("gla", "delta"):
                bench_linear_attention(kind, *shape, dtype, device, reps, report)
    if args.only in (None, "newton"):
        for B, T, W in args.newton_shape or (NEWTON_GPU_SHAPES if device.type == "cuda" else NEWTON_CPU_SHAPES):
            for kind in ("gru", "lstm"):
                bench_newton(kind, B, T, W, device, reps, report)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
