"""Griffin / Hawk residual blocks, laid out as RecurrentGemma so weights map one to one.

ResidualBlock:  x = x + mixer(norm(x));  x = x + mlp(norm(x))
where the temporal mixer is a RecurrentBlock ("R") or a LocalAttentionBlock ("A").
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from megarnn import registry
from megarnn.config import ModelConfig
from megarnn.models.cells import RGLRU, at_least_float32
from megarnn.ops import causal_conv1d, sliding_window_attention


def gelu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


def _linear(d_in: int, d_out: int, std: float, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, std=std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32.

    unit_offset=True: scale = 1 + w with w starting at 0 (RecurrentGemma);
    unit_offset=False: scale = w starting at 1, applied after casting back (Mamba2).
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = True):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_float32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight
        if self.unit_offset:
            return (y * (1.0 + at_least_float32(w))).type_as(x)
        return w * y.type_as(x)


class GatedMLP(nn.Module):
    """down(gelu(gate(x)) * up(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = _linear(c.d_model, c.mlp_width, 1 / math.sqrt(c.d_model))
        self.up_proj = _linear(c.d_model, c.mlp_width, 1 / math.sqrt(c.d_model))
        self.down_proj = _linear(c.mlp_width, c.d_model, math.sqrt(c.final_w_init_variance_scale / c.mlp_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x))


class RecurrentBlock(nn.Module):
    """Griffin's recurrent mixer: out(gelu(y(x)) * RG-LRU(conv(x(x)))). (B, T, D) -> (B, T, D).

    State: {"conv": (B, conv_width - 1, lru_width), "h": (B, lru_width) float32}.
    """

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.linear_y = _linear(c.d_model, c.lru_width, 1 / math.sqrt(c.d_model))
        self.linear_x = _linear(c.d_model, c.lru_width, 1 / math.sqrt(c.d_model))
        self.linear_out = _linear(c.lru_width, c.d_model, math.sqrt(c.final_w_init_variance_scale / c.lru_width))
        self.conv_weight = nn.Parameter(
            torch.randn(c.lru_width, c.conv_width) * math.sqrt(c.w_init_variance_scale / c.conv_width))
        self.conv_bias = nn.Parameter(torch.zeros(c.lru_width))
        self.rg_lru = RGLRU(c.lru_width, c.n_heads, c.w_init_variance_scale, c.scan_backend)

    def forward(self, x, reset=None, state=None):
        state = state or {}
        y = gelu(self.linear_y(x))
        u, conv_state = causal_conv1d(self.linear_x(x), self.conv_weight, self.conv_bias, state.get("conv"), reset)
        h, h_last = self.rg_lru(u, state.get("h"), reset)
        return self.linear_out(h * y), {"conv": conv_state, "h": h_last}


def rotary(x: torch.Tensor, pos: torch.Tensor, fraction: float, theta: float) -> torch.Tensor:
    """Rotate the first `fraction` of each head's dims by position (RoPE, halves layout).

    x: (B, T, H, Dh); pos: (T,) -> (B, T, H, Dh).
    """
    rot = int(x.shape[-1] * fraction) // 2 * 2
    if rot == 0:
        return x
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=acc, device=x.device) / rot))
    freqs = pos.to(acc)[:, None] * inv_freq  # (T, rot/2)
    cos = torch.cat([freqs, freqs], -1).cos()[None, :, None].to(x.dtype)
    sin = torch.cat([freqs, freqs], -1).sin()[None, :, None].to(x.dtype)
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = xr * cos + torch.cat([-x2, x1], -1) * sin
    return torch.cat([rotated, xp], -1)


class LocalAttentionBlock(nn.Module):
    """Local (sliding-window) multi-query attention. (B, T, D) -> (B, T, D).

    State: {"k", "v": (B, <= window - 1, Hkv, Dh), "valid": (B, <= window - 1) bool}.
    """

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        std = 1 / math.sqrt(c.d_model)
        self.q_proj = _linear(c.d_model, c.n_heads * c.head_dim, std, bias=False)
        self.k_proj = _linear(c.d_model, c.n_kv_heads * c.head_dim, std, bias=False)
        self.v_proj = _linear(c.d_model, c.n_kv_heads * c.head_dim, std, bias=False)
        self.o_proj = _linear(c.n_heads * c.head_dim, c.d_model,
                              math.sqrt(c.final_w_init_variance_scale / c.d_model))

    def forward(self, x, reset=None, state=None, pos=None):
        c = self.c
        # Head counts come from the projections, which tensor parallelism may have split.
        q = self.q_proj(x).unflatten(-1, (-1, c.head_dim))
        k = self.k_proj(x).unflatten(-1, (-1, c.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, c.head_dim))
        q = rotary(q, pos, c.rope_fraction, c.rope_theta)
        k = rotary(k, pos, c.rope_fraction, c.rope_theta)
        out, cache = sliding_window_attention(q, k, v, c.attention_window, reset, state)
        return self.o_proj(out.flatten(-2)), cache


def temporal_mixer(c: ModelConfig, kind: str) -> nn.Module:
    """The mixer for one block letter (megarnn/registry.py): forward(x, reset, state[, pos]) -> (y, state)."""
    return registry.block_kind(kind, c).build_mixer(c)


def takes_positions(mixer: nn.Module) -> bool:
    """Whether the mixer's forward takes `pos` (the tokens' positions, for rotary attention)."""
    return "pos" in inspect.signature(mixer.forward).parameters


class InputSkip(nn.Module):
    """D * u: a learned per-channel multiple of a mixer's (normalized) input, added to its output
    (the LRU's skip term). It lives in the block, outside the mixer, so parallelism treats it as
    it treats the norms: whole on every tensor-parallel rank, on this rank's tokens under
    sequence parallelism (its gradient then summed over the group)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))  # N(0, 1), as the LRU paper's D

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.weight.to(u.dtype) * u


class ResidualBlock(nn.Module):
    """Pre-norm residual block around one temporal mixer and one gated MLP. A mixer class with
    `input_skip = True` also gets D * u added to its output (InputSkip)."""

    def __init__(self, c: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.temporal_pre_norm = RMSNorm(c.d_model, c.norm_eps)
        self.temporal_block = temporal_mixer(c, kind)
        self.temporal_skip = InputSkip(c.d_model) if getattr(self.temporal_block, "input_skip", False) else None
        self.channel_pre_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp_block = GatedMLP(c)
        self._pos = takes_positions(self.temporal_block)

    @property
    def mixer(self) -> nn.Module:
        return self.temporal_block

    def forward(self, x, reset=None, state=None, pos=None):
        kwargs = {"pos": pos} if self._pos else {}
        u = self.temporal_pre_norm(x)
        mixed, new_state = self.temporal_block(u, reset, state, **kwargs)
        if self.temporal_skip is not None:
            mixed = mixed + self.temporal_skip(u)
        x = x + mixed
        return x + self.mlp_block(self.channel_pre_norm(x)), new_state
