"""Linear-attention mixers with a matrix state per head, laid out as flash-linear-attention's layers.

GLAMixer ("T", fla's GatedLinearAttention with use_output_gate, swish gate, fused norm):
    q, k = q_proj(x), k_proj(x) (key width over heads); v = v_proj(x) (value width)
    gk = logsigmoid(gk_proj(x)) / gla_gate_normalizer, gk_proj low rank (d -> rank -> keys)
    o = gla(q, k, v, gk);  o = RMSNorm_per_head(o) * w * SiLU(g_proj(x));  o_proj(o)

GatedDeltaNetMixer ("D", fla's GatedDeltaNet with use_gate and short convolutions):
    q, k, v = SiLU(conv(q_proj(x))), SiLU(conv(k_proj(x))), SiLU(conv(v_proj(x)))   (depthwise, no bias)
    beta = sigmoid(b_proj(x)) (x 2 with deltanet_neg_eigval);  g = -exp(A_log) softplus(a_proj(x) + dt_bias)
    o = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta);  o = RMSNorm_per_head(o) * w * SiLU(g_proj(x))
    o_proj(o)

One difference from fla: the output norm's weight is per channel (heads x head_v_dim), not one
head_v_dim vector shared by the heads, so tensor parallelism cuts it with the heads (a shared
weight would need its gradient summed over the tensor-parallel group). Both start at ones.

Head counts come from the projections' widths (tensor parallelism splits them), the per-head
widths from the config. State: {"S": (B, H, K, V) float32 (float64 for a float64 model)}, plus
"conv_q", "conv_k", "conv_v": (B, conv_width - 1, width) for the delta net. Under context
parallelism the ops split their own work (megarnn/ops/context.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megarnn import registry
from megarnn.config import ModelConfig
from megarnn.errors import ConfigError
from megarnn.models.cells import at_least_float32
from megarnn.models import blocks
from megarnn.ops import causal_conv1d, gated_delta_rule, gla


def gla_dims(c: ModelConfig) -> tuple[int, int]:
    """(key width, value width) over all heads of a GLA block: fla's expand_k = 0.5, expand_v = 1."""
    return registry.la_widths(c, "T")


def deltanet_dims(c: ModelConfig) -> tuple[int, int]:
    """(key width, value width) of a Gated DeltaNet block: keys 3 / 4 d_model (fla: 6 heads x 256 at
    d_model 2048), values 2 x keys (expand_v = 2)."""
    return registry.la_widths(c, "D")


def _check_heads(c: ModelConfig, key: int, value: int, what: str) -> None:
    if key % c.n_heads or value % c.n_heads:
        raise ConfigError(f"{what}: key width {key} and value width {value} (model.la_key_dim / la_value_dim, 0: "
                          f"derived from d_model) must both be divisible by model.n_heads={c.n_heads}")


def _backend(c: ModelConfig) -> str | None:
    """The ops' backend: model.scan_backend as set (reference, torch, or triton: the kernels of
    kernels/gla.py and kernels/delta_rule.py); unset, the chunked torch form (the kernels have not
    run on a GPU yet, so they are not the default anywhere)."""
    return c.scan_backend or None


def _linear(d_in: int, d_out: int, std: float, bias: bool = False) -> nn.Linear:
    """blocks._linear (normal weights, zero bias), without a bias unless asked for (fla's layers)."""
    return blocks._linear(d_in, d_out, std, bias)


class HeadRMSNormGated(nn.Module):
    """RMSNorm over each head's channels, times a per-channel weight, times SiLU(gate) (fla's
    FusedRMSNormGated with the swish gate). o: (..., H, Dv), gate: (..., H Dv) -> (..., H Dv)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        of = at_least_float32(o)
        of = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (of * self.weight).to(gate.dtype) * nn.functional.silu(gate)


class GLAMixer(nn.Module):
    """Gated linear attention. (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        key, value = gla_dims(c)
        _check_heads(c, key, value, "GLA block")
        self.head_k_dim, self.head_v_dim = key // c.n_heads, value // c.n_heads
        std = 1 / math.sqrt(c.d_model)
        self.q_proj = _linear(c.d_model, key, std)
        self.k_proj = _linear(c.d_model, key, std)
        self.v_proj = _linear(c.d_model, value, std)
        self.g_proj = _linear(c.d_model, value, std)
        self.gk_proj = nn.Sequential(_linear(c.d_model, c.gla_gate_rank, std),
                                     _linear(c.gla_gate_rank, key, 1 / math.sqrt(c.gla_gate_rank), bias=True))
        self.norm = HeadRMSNormGated(value, c.norm_eps)
        self.o_proj = _linear(value, c.d_model, math.sqrt(c.final_w_init_variance_scale / c.d_model))

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool -> (B, T, D), new state."""
        c, state = self.c, state or {}
        q = self.q_proj(x).unflatten(-1, (-1, self.head_k_dim))
        k = self.k_proj(x).unflatten(-1, (-1, self.head_k_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_v_dim))
        gk = nn.functional.logsigmoid(at_least_float32(self.gk_proj(x))) / c.gla_gate_normalizer
        o, S = gla(q, k, v, gk.unflatten(-1, (-1, self.head_k_dim)), state.get("S"), reset,
                   chunk_size=c.la_chunk_size, backend=_backend(c))
        return self.o_proj(self.norm(o, self.g_proj(x))), {"S": S}


class GatedDeltaNetMixer(nn.Module):
    """Gated DeltaNet. (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        key, value = deltanet_dims(c)
        _check_heads(c, key, value, "Gated DeltaNet block")
        H = c.n_heads
        self.head_k_dim, self.head_v_dim = key // H, value // H
        std = 1 / math.sqrt(c.d_model)
        self.q_proj = _linear(c.d_model, key, std)
        self.k_proj = _linear(c.d_model, key, std)
        self.v_proj = _linear(c.d_model, value, std)
        self.a_proj = _linear(c.d_model, H, std)
        self.b_proj = _linear(c.d_model, H, std)
        self.g_proj = _linear(c.d_model, value, std)
        bound = 1 / math.sqrt(c.conv_width)  # nn.Conv1d's default init of a depthwise (width, 1, W) weight
        self.conv_q, self.conv_k, self.conv_v = (nn.Parameter(torch.empty(n, c.conv_width).uniform_(-bound, bound))
                                                 for n in (key, key, value))
        # A ~ U(0, 16), dt_bias = softplus^-1(dt0) with dt0 log-uniform in [dt_min, dt_max] (fla, Mamba2).
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(0, 16)))
        dt = torch.exp(torch.rand(H) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm = HeadRMSNormGated(value, c.norm_eps)
        self.o_proj = _linear(value, c.d_model, math.sqrt(c.final_w_init_variance_scale / c.d_model))

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool -> (B, T, D), new state."""
        c, state = self.c, state or {}
        silu = nn.functional.silu
        q, conv_q = causal_conv1d(self.q_proj(x), self.conv_q, None, state.get("conv_q"), reset)
        k, conv_k = causal_conv1d(self.k_proj(x), self.conv_k, None, state.get("conv_k"), reset)
        v, conv_v = causal_conv1d(self.v_proj(x), self.conv_v, None, state.get("conv_v"), reset)
        beta = torch.sigmoid(at_least_float32(self.b_proj(x))) * (2.0 if c.deltanet_neg_eigval else 1.0)
        g = -torch.exp(at_least_float32(self.A_log)) * nn.functional.softplus(
            at_least_float32(self.a_proj(x)) + self.dt_bias)
        o, S = gated_delta_rule(silu(q).unflatten(-1, (-1, self.head_k_dim)), silu(k).unflatten(-1, (-1, self.head_k_dim)),
                                silu(v).unflatten(-1, (-1, self.head_v_dim)), g, beta, state.get("S"), reset,
                                chunk_size=c.la_chunk_size, backend=_backend(c), normalize_qk=True)
        return self.o_proj(self.norm(o, self.g_proj(x))), {"S": S, "conv_q": conv_q, "conv_k": conv_k,
                                                           "conv_v": conv_v}
