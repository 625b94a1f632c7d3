"""Diagonal linear scan: h_t = a_t * h_{t-1} + b_t, elementwise per channel.

The primitive under RG-LRU, minGRU-style cells, every Newton step and every adjoint.
A document reset at step t is expressed as a_t = 0.

Backends:
  "reference"  the textbook loop, differentiated by autograd. The judge for every
               other backend; slow (autograd records 2T small ops).
  "torch"      the recurrence under no_grad, with the adjoint recurrence as a custom
               backward: dL/dh_t accumulates as g_t = dh_t + a_{t+1} g_{t+1};
               then db_t = g_t, da_t = g_t * h_{t-1}, dh0 = a_1 g_1. Both ways either the
               step loop or the chunked form (chunks of 64 from zero in parallel, then a short
               loop over chunks for the carries), chosen by shape (_scan).
  "triton"     kernels/linear_scan.py (megarnn_kernels): one fused kernel each way, the state
               in fp32 registers, h read and written once. The default on CUDA tensors; on CPU
               only when asked for, under Triton's interpreter (TRITON_INTERPRET=1), for tests.

`rglru_scan` is the RG-LRU recurrence (Griffin's cell) with the same three backends; its
"triton" backend fuses the gate math into the scan, so the gates and the decay never
round-trip through memory.

Context parallelism: with `cp` (or inside megarnn.ops.context.context_parallel) both ops
run their chunk with the same backend from zero and add the carry from earlier ranks
(megarnn/ops/context.py).

torch.compile: the "torch" and "triton" backends are custom ops (megarnn::scan_torch,
megarnn::scan_triton, megarnn::rglru_triton, each with a registered backward op), so a compiled
model sees one node per call and no loop over time; resolve_split / sequence_start read the
ambient context-parallel split outside dynamo.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from megarnn.ops import context

BACKENDS = ("reference", "torch", "triton")


def assume_constant_result(fn):
    """torch._dynamo.assume_constant_result without importing torch._dynamo when megarnn.ops is
    imported (1-2 s): that decorator only sets this mark. Dynamo then runs fn when it traces a call
    (not traced) and bakes its result into the graph. tests/models/test_compile.py notices if a
    torch release changes the mark (graph breaks)."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def _ambient_split() -> bool:
    return context.resolve(None) is not None


def resolve_split(cp):
    """context.resolve(cp) for the ops, traceable by torch.compile, which cannot read the ContextVar
    behind context_parallel: while compiling, the ambient split is read once, when the graph is
    traced, and must be none (context parallelism's collectives run eagerly, not compiled)."""
    if cp is None and torch.compiler.is_compiling():
        if _ambient_split():
            raise NotImplementedError("megarnn ops under context_parallel do not compile: run the "
                                      "context-parallel model eagerly (train.compile=false)")
        return None
    return context.resolve(cp)


def sequence_start(length: int) -> int:
    """context.sequence_start, traceable by torch.compile (resolve_split): the position of this
    call's first token in its sequence, rank x length under the ambient split, else 0."""
    split = resolve_split(None)
    return split.rank * length if split is not None else 0


def check_backend(backend: str | None, name: str) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name}: unknown backend {backend!r}; expected one of {BACKENDS} (or None: the fastest "
                         f"that runs here)")


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                reverse: bool = False, backend: str | None = None, cp=None) -> torch.Tensor:
    """Run h_t = a_t * h_{t-1} + b_t over time.

    a, b: (B, T, D); h0: (B, D) or None (zeros). reverse=True runs from t = T-1 down
    to 0 (h_t = a_t * h_{t+1} + b_t). Returns h: (B, T, D) in the dtype of b; the
    recurrence itself is accumulated in float32 (or float64 when b is float64).
    cp: context parallelism (megarnn.ops.context.resolve): a, b are this rank's chunk of
    the sequence, h0 the state before the whole sequence (read on rank 0).
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"linear_scan: a and b must both be (B, T, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    if h0 is not None and h0.shape != (b.shape[0], b.shape[2]):
        raise ValueError(f"linear_scan: h0 must be (B, D) = {(b.shape[0], b.shape[2])}; got {tuple(h0.shape)}")
    check_backend(backend, "linear_scan")
    backend = backend or ("triton" if b.is_cuda else "torch")
    split = resolve_split(cp)
    if split is not None:
        if reverse:
            raise ValueError("linear_scan: a reverse scan is not split across ranks; pass cp=False")
        first = h0 if split.rank == 0 or h0 is None else h0 * 0  # a zero gradient off rank 0
        h = linear_scan(a, b, first, backend=backend, cp=False)
        return context.diagonal_carry(h, a, split).to(b.dtype)
    if reverse:
        flip = lambda t: t.flip(1)  # noqa: E731
        return flip(linear_scan(flip(a), flip(b), h0, backend=backend))
    if backend == "reference":
        return linear_scan_reference(a, b, h0)
    if backend == "triton":
        if not torch.compiler.is_compiling():  # say early why it cannot run (the op checks again)
            _require_triton(b, "linear_scan")
        return _scan_triton_op(a, b, h0)
    if h0 is None:
        h0 = b.new_zeros(b.shape[0], b.shape[2])
    return _scan_torch_op(a, b, h0).to(b.dtype)


def linear_scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook recurrence, one step at a time. a, b: (B, T, D), h0: (B, D) -> (B, T, D)."""
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    h = b.new_zeros(b.shape[0], b.shape[2], dtype=acc) if h0 is None else h0.to(acc)
    out = []
    for t in range(b.shape[1]):
        h = a[:, t].to(acc) * h + b[:, t].to(acc)
        out.append(h)
    return torch.stack(out, dim=1).to(b.dtype)


# The torch backend's two forms of the same scan (no autograd), chosen by shape in _scan:
CHUNK = 64  # steps per chunk of the chunked form
# The chunked form runs CHUNK + T / CHUNK steps of B * (T / CHUNK) * D elements instead of T steps of
# B * D: it wins when a step of the loop is too small to amortise an op's fixed cost. Measured on CPU
# (one thread, T = 2048, fp32 / fp64; BENCHMARKS.md "CPU fast paths"): 4.3x / 4.8x at B * D = 256,
# 1.9x / 2.2x at 512, 1.7x / 0.9x at 1024, 0.4x / 0.6x at 2048 -- so the loop from 1024 channels on.
CHUNKED_MAX_CHANNELS = 1024


def _scan(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t without autograd from h (B, D) in the accumulation dtype -> (B, T, D)
    in that dtype: the chunked form on CUDA (fewer launches) and for few channels, else the loop."""
    B, T, D = b.shape
    if T >= 2 * CHUNK and (b.is_cuda or B * D < CHUNKED_MAX_CHANNELS):
        return _scan_chunked(a, b, h)
    return _scan_loop(a, b, h)


def _scan_loop(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Forward loop without autograd into one preallocated buffer. Returns (B, T, D) in acc dtype."""
    out = torch.empty(b.shape, dtype=h.dtype, device=b.device)
    for t in range(b.shape[1]):
        h = torch.addcmul(b[:, t].to(h.dtype), a[:, t].to(h.dtype), h)
        out[:, t] = h
    return out


def _scan_chunked(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, Q: int = CHUNK) -> torch.Tensor:
    """The chunked scan: every chunk of Q steps from zero at once (a loop of Q steps over all chunks),
    the decay products P_l = a_1 ... a_l inside each chunk (cumprod), then a loop over the chunks for
    the state entering each, added as h_l += P_l carry. Only products and sums of the loop's own
    terms, no division and no logarithm: exact to rounding with resets (a_t = 0) and zero decays."""
    B, T, D = b.shape
    acc = h.dtype
    a, b = a.to(acc), b.to(acc)
    pad = (-T) % Q
    if pad:  # a = 1, b = 0 after the end: the padded steps change nothing
        a = torch.cat([a, a.new_ones(B, pad, D)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, D)], dim=1)
    nc = b.shape[1] // Q
    a4, b4 = a.reshape(B, nc, Q, D), b.reshape(B, nc, Q, D)
    out = torch.empty_like(b4)
    s = out[:, :, 0]
    s.copy_(b4[:, :, 0])
    for l in range(1, Q):
        s = torch.addcmul(b4[:, :, l], a4[:, :, l], s)
        out[:, :, l] = s
    P = torch.cumprod(a4, dim=2)
    carries = torch.empty(B, nc, D, dtype=acc, device=b.device)
    for c in range(nc):
        carries[:, c] = h
        h = torch.addcmul(out[:, c, -1], P[:, c, -1], h)
    out.addcmul_(P, carries.unsqueeze(2))
    return out.reshape(B, nc * Q, D)[:, :T]


# The "torch" and "triton" backends are custom ops with their backward registered (torch.compile
# sees one opaque node each way; the loops over time never reach dynamo). NO_GRAD marks a gradient
# a backward op could not produce (an input that was None); the autograd formula returns None for it.
NO_GRAD = torch.empty(0)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("megarnn::scan_torch", mutates_args=())
def _scan_torch_op(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The torch backend: h (B, T, D) in the accumulation dtype (the caller casts to b's)."""
    return _scan(a, b, h0.to(_acc_dtype(b)))


@_scan_torch_op.register_fake
def _(a, b, h0):
    return b.new_empty(b.shape, dtype=_acc_dtype(b))


@torch.library.custom_op("megarnn::scan_torch_bwd", mutates_args=())
def _scan_torch_bwd_op(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, dh: torch.Tensor,
                       b_dtype: torch.dtype) -> list[torch.Tensor]:
    """[da, db, dh0] of megarnn::scan_torch: the adjoint g_t = dh_t + a_{t+1} g_{t+1}, a reverse
    scan with the decays shifted by one; db = g, da = g h_{t-1}, dh0 = a_1 g_1."""
    acc = h.dtype
    a_next = torch.cat([a[:, 1:], a.new_zeros(a.shape[0], 1, a.shape[2])], dim=1)
    g = _scan(a_next.flip(1), dh.flip(1), dh.new_zeros(dh.shape[0], dh.shape[2], dtype=acc)).flip(1)
    h_prev = torch.cat([h0.to(acc)[:, None], h[:, :-1]], dim=1)
    return [(g * h_prev).to(a.dtype), g.to(b_dtype), (a[:, 0].to(acc) * g[:, 0]).to(h0.dtype)]


@_scan_torch_bwd_op.register_fake
def _(a, h, h0, dh, b_dtype):
    return [torch.empty_like(a), h.new_empty(h.shape, dtype=b_dtype), torch.empty_like(h0)]


def _scan_torch_setup(ctx, inputs, output):
    a, b, h0 = inputs
    ctx.save_for_backward(a, output, h0)
    ctx.b_dtype = b.dtype


def _scan_torch_backward(ctx, dh):
    a, h, h0 = ctx.saved_tensors
    da, db, dh0 = _scan_torch_bwd_op(a, h, h0, dh, ctx.b_dtype)
    return da, db, dh0


_scan_torch_op.register_autograd(_scan_torch_backward, setup_context=_scan_torch_setup)


def load_kernels(t: torch.Tensor, name: str, module: str = "linear_scan"):
    """Import megarnn_kernels.<module>, or say why backend="triton" cannot run on t's device.
    Shared by every op with a "triton" backend; name is the op, for the message."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}: backend='triton' needs CUDA tensors (got {t.device}); on CPU it runs only "
                         f"under Triton's interpreter: set TRITON_INTERPRET=1 before anything imports triton, "
                         f"or use backend='torch'")
    kernels = importlib.import_module(f"megarnn_kernels.{module}")
    if not t.is_cuda and not kernels.INTERPRETED:
        raise ValueError(f"{name}: the Triton kernels were compiled for a GPU (imported before "
                         f"TRITON_INTERPRET=1 was set), so they cannot run on {t.device}; set it before "
                         f"anything imports megarnn_kernels, or use backend='torch'")
    return kernels


def _require_triton(t: torch.Tensor, name: str):
    return load_kernels(t, name, "linear_scan")


@torch.library.custom_op("megarnn::scan_triton", mutates_args=())
def _scan_triton_op(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The "triton" backend: a, b: (B, T, D), h0: (B, D) or None -> h (B, T, D) in b's dtype."""
    h, _ = _require_triton(b, "linear_scan").scan_fwd(a, b, h0)
    return h


@_scan_triton_op.register_fake
def _(a, b, h0):
    return torch.empty_like(b)


@torch.library.custom_op("megarnn::scan_triton_bwd", mutates_args=())
def _scan_triton_bwd_op(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor
                        ) -> list[torch.Tensor]:
    da, db, dh0 = _require_triton(dh, "linear_scan").scan_bwd(a, h, h0, dh)
    return [da, db, NO_GRAD.clone() if dh0 is None else dh0]


@_scan_triton_bwd_op.register_fake
def _(a, h, h0, dh):
    return [torch.empty_like(a), torch.empty_like(h), a.new_empty(0) if h0 is None else torch.empty_like(h0)]


def _scan_triton_setup(ctx, inputs, output):
    a, _, h0 = inputs
    ctx.save_for_backward(a, output, h0)  # h0 may be None: saved as None
    ctx.has_h0 = h0 is not None


def _scan_triton_backward(ctx, dh):
    a, h, h0 = ctx.saved_tensors
    da, db, dh0 = _scan_triton_bwd_op(a, h, h0, dh)
    return da, db, dh0 if ctx.has_h0 else None


_scan_triton_op.register_autograd(_scan_triton_backward, setup_context=_scan_triton_setup)


RG_LRU_C = 8.0
_MAX_SQRT_GRADIENT = 1000.0


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose gradient is clipped at _MAX_SQRT_GRADIENT (RecurrentGemma), finite at x = 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clip(4.0 * x, min=1 / _MAX_SQRT_GRADIENT**2))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rglru_decay(gate_a: torch.Tensor, recurrent_param: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """log a_t = -8 sigmoid(gate_a_t) softplus(Lambda), as a_t; 0 at a reset. (B, T, D) in gate_a's dtype."""
    a = torch.exp(-RG_LRU_C * torch.sigmoid(gate_a) * F.softplus(recurrent_param))
    return a if reset is None else a * ~reset[..., None]


def rglru_scan(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, recurrent_param: torch.Tensor,
               h0: torch.Tensor | None = None, reset: torch.Tensor | None = None, backend: str | None = None,
               cp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The RG-LRU recurrence (De et al. 2024, "Griffin", eq. 1-4), laid out as RecurrentGemma.

    x, gate_x, gate_a: (B, T, D) the input and the input / recurrence gate pre-activations
    (W_x x + b_x, W_a x + b_a); recurrent_param: (D,) Lambda; h0: (B, D); reset: (B, T) bool.

        a_t = exp(-8 sigmoid(gate_a_t) softplus(Lambda)),   a_t = 0 at a reset
        h_t = a_t h_{t-1} + sqrt(1 - a_t^2) sigmoid(gate_x_t) x_t   (multiplier 1 at a reset)

    The sqrt's gradient is clipped as RecurrentGemma does. Returns h (B, T, D) in x's dtype and
    h_T (B, D) in float32 (float64 for float64 x). backend: "triton" (one fused kernel each
    way; CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the gates in torch, then
    linear_scan), "reference" (the same with the textbook scan), None (triton on CUDA).
    cp: context parallelism, as linear_scan.
    """
    if x.dim() != 3 or gate_x.shape != x.shape or gate_a.shape != x.shape or recurrent_param.shape != x.shape[2:]:
        raise ValueError(f"rglru_scan: x, gate_x, gate_a must be (B, T, D) and recurrent_param (D,); got "
                         f"{tuple(x.shape)}, {tuple(gate_x.shape)}, {tuple(gate_a.shape)}, {tuple(recurrent_param.shape)}")
    if h0 is not None and h0.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"rglru_scan: h0 must be (B, D) = {(x.shape[0], x.shape[2])}; got {tuple(h0.shape)}")
    check_backend(backend, "rglru_scan")
    backend = backend or ("triton" if x.is_cuda else "torch")
    split = resolve_split(cp)
    if split is not None:
        first = h0 if split.rank == 0 or h0 is None else h0 * 0  # a zero gradient off rank 0
        h, _ = rglru_scan(x, gate_x, gate_a, recurrent_param, first, reset, backend, cp=False)
        h = context.diagonal_carry(h, rglru_decay(_at_least_float32(gate_a), recurrent_param, reset), split)
        return h.to(x.dtype), h[:, -1]
    if backend == "triton":
        if not torch.compiler.is_compiling():
            _require_triton(x, "rglru_scan")
        # softplus of the (D,) parameter stays in torch: it costs nothing and autograd matches the torch path.
        return _rglru_triton_op(x, gate_x, gate_a, F.softplus(recurrent_param), h0, reset)
    log_a = -RG_LRU_C * torch.sigmoid(gate_a) * F.softplus(recurrent_param)
    a = torch.exp(log_a)
    multiplier = SqrtBoundDerivative.apply(1 - torch.exp(2 * log_a))
    if reset is not None:
        a = a * ~reset[..., None]
        multiplier = torch.where(reset[..., None], torch.ones_like(multiplier), multiplier)
    b = x * torch.sigmoid(gate_x) * multiplier
    h = linear_scan(_at_least_float32(a), _at_least_float32(b), h0, backend=backend, cp=False)
    return h.to(x.dtype), h[:, -1]


@torch.library.custom_op("megarnn::rglru_triton", mutates_args=())
def _rglru_triton_op(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, sp: torch.Tensor,
                     h0: torch.Tensor | None, reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """rglru_scan's "triton" backend (sp = softplus(Lambda)) -> (h in x's dtype, h_T in acc dtype)."""
    h, h_last = _require_triton(x, "rglru_scan").rglru_fwd(x, gate_x, gate_a, sp, h0, reset)
    return h, h_last if h_last._base is None else h_last.clone()  # outputs may not alias each other


@_rglru_triton_op.register_fake
def _(x, gate_x, gate_a, sp, h0, reset):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[2], dtype=_acc_dtype(x))


@torch.library.custom_op("megarnn::rglru_triton_bwd", mutates_args=())
def _rglru_triton_bwd_op(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, sp: torch.Tensor,
                         h: torch.Tensor, h0: torch.Tensor | None, reset: torch.Tensor | None, dh: torch.Tensor,
                         dh_last: torch.Tensor | None) -> list[torch.Tensor]:
    dx, dgx, dga, dsp, dh0 = _require_triton(x, "rglru_scan").rglru_bwd(
        x, gate_x, gate_a, sp, h, h0, reset, dh, dh_last)
    return [dx, dgx, dga, dsp.to(sp.dtype), NO_GRAD.clone() if dh0 is None else dh0]


@_rglru_triton_bwd_op.register_fake
def _(x, gate_x, gate_a, sp, h, h0, reset, dh, dh_last):
    return [torch.empty_like(x), torch.empty_like(gate_x), torch.empty_like(gate_a), torch.empty_like(sp),
            x.new_empty(0) if h0 is None else torch.empty_like(h0)]


def _rglru_triton_setup(ctx, inputs, output):
    x, gate_x, gate_a, sp, h0, reset = inputs
    ctx.save_for_backward(x, gate_x, gate_a, sp, output[0], h0, reset)
    ctx.has_h0 = h0 is not None


def _rglru_triton_backward(ctx, dh, dh_last):
    x, gate_x, gate_a, sp, h, h0, reset = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(h)
    dx, dgx, dga, dsp, dh0 = _rglru_triton_bwd_op(x, gate_x, gate_a, sp, h, h0, reset, dh, dh_last)
    return dx, dgx, dga, dsp, dh0 if ctx.has_h0 else None, None


_rglru_triton_op.register_autograd(_rglru_triton_backward, setup_context=_rglru_triton_setup)
