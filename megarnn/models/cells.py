"""Recurrent cells. Each has a parallel form over a whole sequence and takes/returns its state.

RG-LRU (De et al. 2024, "Griffin", eq. 1-4), laid out as RecurrentGemma:
    r_t = sigmoid(W_a x_t + b_a)            recurrence gate, block-diagonal per head
    i_t = sigmoid(W_x x_t + b_x)            input gate, block-diagonal per head
    log a_t = -c * r_t * softplus(Lambda)   c = 8, so a_t = sigma(-Lambda)^(c r_t)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
At a document start the state resets: a_t = 0 and the input is not scaled.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megarnn.ops.scan import RG_LRU_C, SqrtBoundDerivative, rglru_scan  # noqa: F401 (re-exported)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32 (for norms, scans, losses); float32 / float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class BlockDiagonalLinear(nn.Module):
    """y = x W + b with W block-diagonal: (n_blocks, width, width). x: (..., n_blocks * width)."""

    def __init__(self, n_blocks: int, width: int, init_std: float):
        super().__init__()
        self.n_blocks, self.width = n_blocks, width
        self.weight = nn.Parameter(torch.randn(n_blocks, width, width) * init_std)
        self.bias = nn.Parameter(torch.zeros(n_blocks, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.unflatten(-1, (self.n_blocks, self.width))
        y = torch.einsum("...hi,hij->...hj", xb, self.weight) + self.bias
        return y.flatten(-2)


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit over width D split into n_heads gate blocks."""

    def __init__(self, width: int, n_heads: int, w_init_variance_scale: float, backend: str = ""):
        super().__init__()
        bw = width // n_heads
        std = math.sqrt(w_init_variance_scale / bw)
        self.input_gate = BlockDiagonalLinear(n_heads, bw, std)
        self.recurrent_gate = BlockDiagonalLinear(n_heads, bw, std)
        # softplus(Lambda) = -log(a0) with a0^2 ~ U[0.9^2, 0.999^2] (RecurrentGemma), so a_t = a0^(c r_t).
        a_sq = torch.empty(width).uniform_(0.9**2 + 1e-8, 0.999**2 + 1e-8)
        self.recurrent_param = nn.Parameter(a_sq.log().mul(0.5).neg().exp().sub(1.0).log())
        self.backend = backend or None

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D); h0: (B, D) float32; reset: (B, T) bool -> y (B, T, D), h_T (B, D) float32.
        The recurrence itself (module docstring) is megarnn.ops.rglru_scan."""
        return rglru_scan(x, self.input_gate(x), self.recurrent_gate(x), self.recurrent_param, h0, reset,
                          backend=self.backend)
