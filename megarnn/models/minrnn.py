"""minGRU ("N") and minLSTM ("O") mixers (Feng et al. 2024, "Were RNNs All We Needed?", sec. 3),
in their log-space form (appendix B), inside Griffin's residual block (with the gated MLP).

Width W = model.lru_width channels, every gate from the block input alone (no h_{t-1}), so the
recurrence is a diagonal linear scan, run in log space by megarnn.ops.log_linear_scan:

    minGRU   k, c = in_proj(x)                         (update gate logits, candidate)
             z = sigmoid(k);  h~ = g(c)
             h_t = (1 - z_t) h_{t-1} + z_t h~_t        log(1 - z) = -softplus(k), log z = -softplus(-k)
    minLSTM  kf, ki, c = in_proj(x)
             f' = f / (f + i), i' = i / (f + i)  (f = sigmoid(kf), i = sigmoid(ki))
             h_t = f'_t h_{t-1} + i'_t h~_t            log f' = -softplus(d), log i' = -softplus(-d),
                                                       d = softplus(-kf) - softplus(-ki)
    y = out_proj(h)

with the paper's g(x) = x + 0.5 for x >= 0, sigmoid(x) otherwise (positive, so h > 0 and its log
exists) and log_g its log. A document reset drops h_{t-1}. State: {"h": (B, W) float32 (float64
for a float64 model)}. Tensor parallelism splits the channels: in_proj column-parallel per
component, out_proj row-parallel (megarnn/registry.py); the scan needs no communication.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megarnn.config import ModelConfig
from megarnn.models import blocks
from megarnn.models.cells import at_least_float32
from megarnn.ops import log_linear_scan


def g(x: torch.Tensor) -> torch.Tensor:
    """The paper's positive activation: x + 0.5 for x >= 0, sigmoid(x) below (continuous at 0)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), without forming g for x < 0 (log sigmoid(x) = -softplus(-x))."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def _backend(c: ModelConfig) -> str | None:
    """"reference" or "triton" (the linear scan's kernel) when asked for; otherwise the chunked
    torch form."""
    return c.scan_backend if c.scan_backend in ("reference", "triton") else None


class _MinRNN(nn.Module):
    n_gates = 1  # components of in_proj before the candidate

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c, self.width = c, c.lru_width
        self.in_proj = blocks._linear(c.d_model, (self.n_gates + 1) * c.lru_width, 1 / math.sqrt(c.d_model))
        self.out_proj = blocks._linear(c.lru_width, c.d_model, math.sqrt(c.final_w_init_variance_scale / c.lru_width),
                                       bias=False)

    def log_terms(self, parts):
        raise NotImplementedError

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool -> (B, T, D), {"h": (B, W)}."""
        state = state or {}
        parts = at_least_float32(self.in_proj(x)).chunk(self.n_gates + 1, dim=-1)
        log_a, log_b = self.log_terms(parts)
        h = log_linear_scan(log_a, log_b, state.get("h"), reset, backend=_backend(self.c))
        return self.out_proj(h.to(x.dtype)), {"h": h[:, -1]}


class MinGRUMixer(_MinRNN):
    """minGRU: h_t = (1 - z_t) h_{t-1} + z_t g(c_t). (B, T, d_model) -> (B, T, d_model)."""

    n_gates = 1

    def log_terms(self, parts):
        k, cand = parts
        return -F.softplus(k), -F.softplus(-k) + log_g(cand)


class MinLSTMMixer(_MinRNN):
    """minLSTM: h_t = f'_t h_{t-1} + i'_t g(c_t), f' + i' = 1. (B, T, d_model) -> (B, T, d_model)."""

    n_gates = 2

    def log_terms(self, parts):
        kf, ki, cand = parts
        diff = F.softplus(-kf) - F.softplus(-ki)
        return -F.softplus(diff), -F.softplus(-diff) + log_g(cand)
