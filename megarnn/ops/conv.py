"""Causal depthwise conv1d over time, with carried state and document resets."""
from __future__ import annotations

import torch


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  state: torch.Tensor | None = None, reset: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = bias + sum_k weight[:, k] * x_{t - (W-1) + k}, per channel (as nn.Conv1d, groups=D).

    x: (B, T, D); weight: (D, W); bias: (D,); state: (B, W-1, D), the inputs before x
    (zeros when None); reset: (B, T) bool, True where a new document starts: no tap
    reaches back across it. Returns y: (B, T, D) and the new state (B, W-1, D).
    """
    B, T, D = x.shape
    W = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, W - 1, D)
    xpad = torch.cat([state.to(x.dtype), x], dim=1)  # (B, T + W - 1, D)
    if reset is not None:
        # Segment index per position; the carried state belongs to segment 0.
        seg = torch.cumsum(reset.to(torch.int32), dim=1)
        seg_pad = torch.cat([seg.new_zeros(B, W - 1), seg], dim=1)
    y = x.new_zeros(B, T, D) if bias is None else bias.to(x.dtype).expand(B, T, D)
    for k in range(W):
        tap = xpad[:, k:k + T] * weight[:, k]
        if reset is not None and k < W - 1:
            tap = tap * (seg_pad[:, k:k + T] == seg).unsqueeze(-1).to(x.dtype)
        y = y + tap
    new_state = xpad[:, T:]
    if reset is not None:
        # Inputs before the last reset must not reach the next chunk: zero them.
        new_state = new_state * (seg_pad[:, T:] == seg[:, -1:]).unsqueeze(-1).to(x.dtype)
    return y, new_state
