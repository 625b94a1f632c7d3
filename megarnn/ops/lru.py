"""The LRU's complex diagonal recurrence (Orvieto et al. 2023, "Resurrecting Recurrent Neural
Networks for Long Sequences", eq. 3 and sec. 3.2), on real (re, im) pairs.

    h_t = lambda * h_{t-1} + b_t          complex, elementwise per channel
    lambda = exp(-exp(nu_log) + i exp(theta_log))      (the paper's exponential parametrization)

b: (B, T, N, 2) the input term gamma * (B x_t) as (real, imaginary) parts; nu_log, theta_log: (N,).
|lambda| = exp(-exp(nu_log)) < 1 for every finite nu_log. A document reset at t drops h_{t-1}
(h_t = b_t), as the state entering a sequence with no initial state is zero.

Backends:
  "reference"  the textbook loop in real arithmetic (h_re' = l_re h_re - l_im h_im + b_re, ...),
               differentiated by autograd; the judge.
  "torch"      the recurrence on complex numbers without autograd (linear_scan's own step loop or
               chunked form, megarnn.ops.scan._scan, run on complex tensors), a custom op
               (megarnn::lru_scan_torch, one node under torch.compile) with the adjoint as its
               registered backward: g_t = dh_t + conj(a_{t+1}) g_{t+1} (a reverse scan of the same
               kind), then db_t = g_t, dlambda = sum over steps without a reset of g_t conj(h_{t-1}),
               dh0 = conj(a_1) g_1 (gradients of real losses in PyTorch's convention, d/dre + i d/dim).
  "triton"     lambda is, on (re, im) pairs, the 2 x 2 real block [[re, -im], [im, re]]: the
               recurrence runs on the block-diagonal scan's Triton kernel (megarnn.ops.newton
               block_scan, n = 2; a = 0 at a reset), forward and its fused backward; dlambda
               by autograd from the blocks' gradient. backend=None still picks "torch" (the
               kernel runs where model.scan_backend=triton).

Context parallelism (megarnn/ops/context.py): each rank runs its chunk from zero (rank 0 from h0),
gathers (lambda^T_local, 0 if the chunk has a reset; its last state) with carry_in on complex
numbers and adds lambda^(t+1) carry until its first reset, in complex64 (complex128 for float64
inputs): the carry is fp32 / fp64 as in every other op.
"""
from __future__ import annotations

import torch

from megarnn.ops import context
from megarnn.ops.newton import block_scan
from megarnn.ops.scan import _scan, check_backend, resolve_split


def lru_lambda(nu_log: torch.Tensor, theta_log: torch.Tensor) -> torch.Tensor:
    """(N, 2): (re, im) of lambda = exp(-exp(nu_log)) (cos exp(theta_log), sin exp(theta_log))."""
    mod, phase = torch.exp(-torch.exp(nu_log)), torch.exp(theta_log)
    return torch.stack([mod * torch.cos(phase), mod * torch.sin(phase)], -1)


def lru_powers(nu_log: torch.Tensor, theta_log: torch.Tensor, T: int, reset: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, T, N, 2): lambda^(t+1) for t < T (the decay of a state entering a chunk through
    step t), zero from the first reset on. Computed as exp((t+1) log lambda) (no repeated product)."""
    n = torch.arange(1, T + 1, dtype=nu_log.dtype, device=nu_log.device)[:, None]
    mod, phase = torch.exp(-n * torch.exp(nu_log)), n * torch.exp(theta_log)
    p = torch.stack([mod * torch.cos(phase), mod * torch.sin(phase)], -1)[None]
    if reset is not None:
        p = p * (torch.cumsum(reset.to(torch.int32), dim=1) == 0)[:, :, None, None].to(p.dtype)
    return p


def lru_scan(b: torch.Tensor, nu_log: torch.Tensor, theta_log: torch.Tensor, h0: torch.Tensor | None = None,
             reset: torch.Tensor | None = None, backend: str | None = None, cp=None) -> torch.Tensor:
    """h_t = lambda h_{t-1} + b_t on (re, im) pairs.

    b: (B, T, N, 2); nu_log, theta_log: (N,); h0: (B, N, 2) or None (zeros); reset: (B, T) bool.
    Returns h (B, T, N, 2) in float32 (float64 for float64 b): h[:, -1] is the state to pass on.
    cp: context parallelism: b, reset are this rank's chunk, h0 the state before the whole
    sequence (read on rank 0).
    """
    if b.dim() != 4 or b.shape[-1] != 2 or nu_log.shape != b.shape[2:3] or theta_log.shape != nu_log.shape:
        raise ValueError(f"lru_scan: expected b (B, T, N, 2) and nu_log, theta_log (N,); got b {tuple(b.shape)}, "
                         f"nu_log {tuple(nu_log.shape)}, theta_log {tuple(theta_log.shape)}")
    B, T, N, _ = b.shape
    if h0 is not None and h0.shape != (B, N, 2):
        raise ValueError(f"lru_scan: h0 must be (B, N, 2) = {(B, N, 2)}; got {tuple(h0.shape)}")
    if reset is not None and reset.shape != (B, T):
        raise ValueError(f"lru_scan: reset must be (B, T) = {(B, T)} bool; got {tuple(reset.shape)}")
    check_backend(backend, "lru_scan")
    backend = backend or "torch"
    acc = context.acc_dtype(b)
    split = resolve_split(cp)
    if split is not None:
        first = h0 if split.rank == 0 or h0 is None else h0 * 0  # a zero gradient off rank 0
        h = lru_scan(b, nu_log, theta_log, first, reset, backend, cp=False)
        p = lru_powers(nu_log.to(acc), theta_log.to(acc), T, reset).expand(B, T, N, 2)
        pc, hc = torch.view_as_complex(p.contiguous()), torch.view_as_complex(h)
        carry, _, hc = context.carry_in(pc[:, -1], hc[:, -1], split, hc)
        return torch.view_as_real(hc + pc * carry[:, None])
    lam = lru_lambda(nu_log.to(acc), theta_log.to(acc))
    b = b.to(acc)
    h0 = None if h0 is None else h0.to(acc)
    if backend == "reference":
        return _reference(b, lam, h0, reset)
    if backend == "triton":  # lambda as the 2 x 2 real block it is on (re, im): the block scan's kernel
        lr, li = lam[:, 0], lam[:, 1]
        a = torch.stack([torch.stack([lr, -li], -1), torch.stack([li, lr], -1)], -2).expand(B, T, N, 2, 2)
        a = a * ~reset[:, :, None, None, None] if reset is not None else a.contiguous()
        return block_scan(a, b, h0, backend="triton")
    return _lru_scan_torch_op(b, lam, b.new_zeros(B, N, 2) if h0 is None else h0, reset)


def _reference(b, lam, h, reset):
    B, T, N, _ = b.shape
    h = b.new_zeros(B, N, 2) if h is None else h
    lr, li = lam[:, 0], lam[:, 1]
    out = []
    for t in range(T):
        if reset is not None:
            h = h * ~reset[:, t, None, None]
        hr, hi = h[..., 0], h[..., 1]
        h = torch.stack([lr * hr - li * hi + b[:, t, :, 0], lr * hi + li * hr + b[:, t, :, 1]], -1)
        out.append(h)
    return torch.stack(out, 1)


def _decays(lam: torch.Tensor, reset: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    """(B, T, N) complex: a_t = lambda, 0 at a reset."""
    a = torch.view_as_complex(lam.contiguous()).expand(B, T, lam.shape[0])
    return a * ~reset[..., None] if reset is not None else a.contiguous()


# The torch backend is a custom op with its backward registered, as linear_scan's (torch.compile sees
# one node each way, never the loop over time or the complex numbers).

@torch.library.custom_op("megarnn::lru_scan_torch", mutates_args=())
def _lru_scan_torch_op(b: torch.Tensor, lam: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor | None
                       ) -> torch.Tensor:
    """b (B, T, N, 2), lam (N, 2), h0 (B, N, 2), all in the accumulation dtype -> h (B, T, N, 2)."""
    B, T, N, _ = b.shape
    h = _scan(_decays(lam, reset, B, T), torch.view_as_complex(b.contiguous()), torch.view_as_complex(h0.contiguous()))
    return torch.view_as_real(h).clone(memory_format=torch.contiguous_format)  # as the fake says


@_lru_scan_torch_op.register_fake
def _(b, lam, h0, reset):
    return b.new_empty(b.shape)


@torch.library.custom_op("megarnn::lru_scan_torch_bwd", mutates_args=())
def _lru_scan_torch_bwd_op(lam: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor | None,
                           dh: torch.Tensor) -> list[torch.Tensor]:
    """[db, dlam, dh0]: the adjoint g_t = dh_t + conj(a_{t+1}) g_{t+1}, db = g, dlam = sum of
    g_t conj(h_{t-1}) over steps without a reset, dh0 = conj(a_1) g_1."""
    B, T, N, _ = h.shape
    a = _decays(lam, reset, B, T)
    hc, dhc = torch.view_as_complex(h.contiguous()), torch.view_as_complex(dh.to(h.dtype).contiguous())
    a_next = torch.cat([a[:, 1:], a.new_zeros(B, 1, N)], dim=1).conj()
    g = _scan(a_next.flip(1), dhc.flip(1), dhc.new_zeros(B, N)).flip(1)
    h_prev = torch.cat([torch.view_as_complex(h0.contiguous())[:, None], hc[:, :-1]], dim=1)
    da = g * h_prev.conj()
    if reset is not None:
        da = da * ~reset[..., None]
    return [torch.view_as_real(t).clone(memory_format=torch.contiguous_format)
            for t in (g, da.sum(dim=(0, 1)), a[:, 0].conj() * g[:, 0])]


@_lru_scan_torch_bwd_op.register_fake
def _(lam, h, h0, reset, dh):
    return [h.new_empty(h.shape), lam.new_empty(lam.shape), h0.new_empty(h0.shape)]


def _lru_setup(ctx, inputs, output):
    _, lam, h0, reset = inputs
    ctx.save_for_backward(lam, output, h0, reset)


def _lru_backward(ctx, dh):
    lam, h, h0, reset = ctx.saved_tensors
    db, dlam, dh0 = _lru_scan_torch_bwd_op(lam, h, h0, reset, dh)
    return db, dlam, dh0, None


_lru_scan_torch_op.register_autograd(_lru_backward, setup_context=_lru_setup)
