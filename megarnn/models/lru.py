"""The Linear Recurrent Unit mixer ("U"; Orvieto et al. 2023, "Resurrecting Recurrent Neural
Networks for Long Sequences"), inside Griffin's residual block (with the gated MLP).

N = model.lru_width complex state channels, H = d_model:

    h_t = lambda * h_{t-1} + gamma * (B x_t)          lambda = exp(-exp(nu_log) + i exp(theta_log))
    y_t = Re(C h_t) + D * x_t                          gamma = exp(gamma_log)

B (N x H) and C (H x N) complex, D (H,) real. Stored as real layers over (re, im) pairs
interleaved per state channel, so a contiguous cut splits whole channels:
    in_proj   (2N, H): rows 2n, 2n + 1 are Re B[n], Im B[n]
    out_proj  (H, 2N): columns 2n, 2n + 1 are Re C[:, n], -Im C[:, n]  (Re(C h) = C_re h_re - C_im h_im)
Initialization as the paper's: |lambda| uniform on the ring r_min <= |lambda| <= r_max (by area),
phase uniform in [0, max_phase] (model.lru_r_min, lru_r_max, lru_max_phase),
gamma_log = log sqrt(1 - |lambda|^2), B ~ CN(0, 1 / H) (each part N(0, 1 / 2H)), D ~ N(0, 1); C
like every block's output projection (each part N(0, final_w_init_variance_scale / 2N)). The
recurrence runs in megarnn.ops.lru_scan (complex64; complex128 for a float64 model). A document
reset drops h_{t-1}. State: {"h": (B, N, 2) float32 (re, im)}.

Tensor parallelism splits the state channels: in_proj column-parallel, out_proj row-parallel,
nu_log / theta_log / gamma_log by channel (megarnn/registry.py). D acts on the block's input in
model width, which the ranks share: it is kept whole on every rank and the skip D * x is added
after out_proj's reduction, so that it counts once: under plain tensor parallelism every rank
adds it to the whole (replicated) output and its input gradient is divided by tp (the block's
input gradient is summed over the group); under sequence parallelism each rank adds it to its own
T / tp output steps and D's gradient is summed over the group. Under context parallelism the
skip is local to each rank's chunk.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megarnn.config import ModelConfig
from megarnn.models import blocks
from megarnn.models.cells import at_least_float32
from megarnn.ops import lru_scan


def ring_init(n: int, r_min: float, r_max: float, max_phase: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nu_log, theta_log, gamma_log), each (n,): the paper's ring initialization of lambda and the
    normalization gamma = sqrt(1 - |lambda|^2)."""
    u1, u2 = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    nu_log = torch.log(-0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
    theta_log = torch.log(max_phase * u2.clamp(min=1e-6))
    gamma_log = torch.log(torch.sqrt(1 - torch.exp(-torch.exp(nu_log)) ** 2))
    return nu_log.float(), theta_log.float(), gamma_log.float()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class LRUMixer(nn.Module):
    """(B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        N, H = c.lru_width, c.d_model
        self.in_proj = blocks._linear(H, 2 * N, 1 / math.sqrt(2 * H), bias=False)
        self.out_proj = blocks._linear(2 * N, H, math.sqrt(c.final_w_init_variance_scale / (2 * N)), bias=False)
        nu_log, theta_log, gamma_log = ring_init(N, c.lru_r_min, c.lru_r_max, c.lru_max_phase)
        self.nu_log, self.theta_log = nn.Parameter(nu_log), nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(gamma_log)
        self.D = nn.Parameter(torch.randn(H))

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool -> (B, T, D), {"h": (B, N, 2)}."""
        state = state or {}
        bx = at_least_float32(self.in_proj(x)).unflatten(-1, (-1, 2))
        bx = bx * torch.exp(at_least_float32(self.gamma_log))[:, None]
        h = lru_scan(bx, self.nu_log, self.theta_log, state.get("h"), reset,
                     backend="reference" if self.c.scan_backend == "reference" else None)
        y = self.out_proj(h.flatten(-2).to(x.dtype))
        return y + self._skip(x, y), {"h": h[:, -1]}

    def _skip(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """D * x for the output steps y holds, counted once under tensor / sequence parallelism
        (out_proj is then megarnn.parallel.tensor.RowParallelLinear, which knows its group)."""
        group = getattr(self.out_proj, "group", None)
        D = self.D.to(x.dtype)
        if group is None:
            return D * x
        from megarnn.parallel.tensor import copy_to_tp
        if getattr(self.out_proj, "sequence_parallel", False):
            T, r = y.shape[1], dist.get_rank(group)
            return copy_to_tp(D, group) * x[:, r * T:(r + 1) * T]
        return D * _ScaleGrad.apply(x, 1.0 / dist.get_world_size(group))
