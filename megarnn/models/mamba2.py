"""Mamba2 block, laid out as transformers' Mamba2ForCausalLM so weights map one to one.

Mamba2Block:  x = x + mixer(norm(x))     (no MLP)
Mamba2Mixer:  in_proj -> [z | xBC | dt];  xBC -> causal depthwise conv -> SiLU -> [x | B | C]
              dt = softplus(dt + dt_bias);  A = -exp(A_log)
              y = SSD(x, dt, A, B, C) + D x;  y = RMSNorm_groups(y * SiLU(z));  out_proj(y)

State: {"conv": (B, conv_width - 1, conv_dim), "ssm": (B, H, P, N) float32}.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megarnn.config import ModelConfig
from megarnn.models.blocks import RMSNorm, takes_positions, temporal_mixer
from megarnn.models.cells import at_least_float32
from megarnn.ops import causal_conv1d, ssd_scan


class GatedGroupRMSNorm(nn.Module):
    """RMSNorm of y * SiLU(z), per group of channels (norm_before_gate=False in mamba_ssm)."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (at_least_float32(y) * nn.functional.silu(at_least_float32(z))).unflatten(-1, (self.groups, -1))
        h = h * torch.rsqrt(self.mean_square(h) + self.eps)
        return self.weight * h.flatten(-2).to(y.dtype)

    def mean_square(self, h: torch.Tensor) -> torch.Tensor:
        """(..., groups, size) -> (..., groups, 1): the mean over each group's channels (a split
        layout whose group spans ranks sums over them)."""
        return h.pow(2).mean(-1, keepdim=True)


class Mamba2Mixer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.d_inner = c.expand * c.d_model
        self.n_heads = self.d_inner // c.ssm_head_dim
        self.n_groups = c.n_groups
        self.conv_dim = self.d_inner + 2 * c.n_groups * c.d_state
        self.in_proj = nn.Linear(c.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        bound = 1 / math.sqrt(c.conv_width)  # kaiming_uniform(a=sqrt(5)) of a (conv_dim, 1, W) weight
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, c.conv_width).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        # dt_bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max]; A = -(1..H) (S4D-real).
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedGroupRMSNorm(self.d_inner, c.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c.d_model, bias=False)

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool -> (B, T, D), new state."""
        c, state = self.c, state or {}
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc, conv_state = causal_conv1d(xbc, self.conv_weight, self.conv_bias, state.get("conv"), reset)
        G = self.n_groups
        xs, B, C = nn.functional.silu(xbc).split([self.d_inner, G * c.d_state, G * c.d_state], -1)
        y, ssm_state = ssd_scan(
            xs.unflatten(-1, (self.n_heads, c.ssm_head_dim)), nn.functional.softplus(dt + self.dt_bias),
            -torch.exp(at_least_float32(self.A_log)), B.unflatten(-1, (G, c.d_state)),
            C.unflatten(-1, (G, c.d_state)), self.D, c.chunk_size, state.get("ssm"), reset,
            backend=c.scan_backend or None)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y), {"conv": conv_state, "ssm": ssm_state}


class Mamba2Block(nn.Module):
    """x + mixer(norm(x)): a block without an MLP, Mamba2's (any registry kind with has_mlp=False)."""

    def __init__(self, c: ModelConfig, kind: str = "M"):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(c.d_model, c.norm_eps, unit_offset=False)
        self.mixer = temporal_mixer(c, kind)
        self._pos = takes_positions(self.mixer)

    def forward(self, x, reset=None, state=None, pos=None):
        y, new_state = self.mixer(self.norm(x), reset, state, **({"pos": pos} if self._pos else {}))
        return x + y, new_state
