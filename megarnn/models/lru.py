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
nu_log / theta_log / gamma_log by channel (megarnn/registry.py). The skip D * x acts in model
width, which the ranks share: it is not part of the mixer but of its residual block
(`input_skip = True` -> blocks.InputSkip, added to the mixer's output there), outside the
sublayer that tensor parallelism splits, so the passes treat D as they treat a norm's weight.
"""
from __future__ import annotations

import math

import torch
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


class LRUMixer(nn.Module):
    """(B, T, d_model) -> (B, T, d_model): Re(C h); the block adds D * x (input_skip)."""

    input_skip = True

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        N, H = c.lru_width, c.d_model
        self.in_proj = blocks._linear(H, 2 * N, 1 / math.sqrt(2 * H), bias=False)
        self.out_proj = blocks._linear(2 * N, H, math.sqrt(c.final_w_init_variance_scale / (2 * N)), bias=False)
        nu_log, theta_log, gamma_log = ring_init(N, c.lru_r_min, c.lru_r_max, c.lru_max_phase)
        self.nu_log, self.theta_log = nn.Parameter(nu_log), nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(gamma_log)

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool -> (B, T, D), {"h": (B, N, 2)}."""
        state = state or {}
        bx = at_least_float32(self.in_proj(x)).unflatten(-1, (-1, 2))
        bx = bx * torch.exp(at_least_float32(self.gamma_log))[:, None]
        h = lru_scan(bx, self.nu_log, self.theta_log, state.get("h"), reset,
                     backend=self.c.scan_backend if self.c.scan_backend in ("reference", "triton") else None)
        y = self.out_proj(h.flatten(-2).to(x.dtype))
        return y, {"h": h[:, -1]}

