"""Causal depthwise conv1d over time, with carried state and document resets."""
from __future__ import annotations

import torch

from megarnn.ops import context
from megarnn.ops.scan import resolve_split


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  state: torch.Tensor | None = None, reset: torch.Tensor | None = None, cp=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = bias + sum_k weight[:, k] * x_{t - (W-1) + k}, per channel (as nn.Conv1d, groups=D).

    x: (B, T, D); weight: (D, W); bias: (D,); state: (B, W-1, D), the inputs before x
    (zeros when None); reset: (B, T) bool, True where a new document starts: no tap
    reaches back across it. Returns y: (B, T, D) and the new state (B, W-1, D).
    cp: context parallelism (megarnn/ops/context.py): x and reset are this rank's chunk of a
    sequence that starts from a zero state (state must be None); the W - 1 inputs before the
    chunk arrive from the earlier ranks (a halo). The returned state is the one after this
    chunk (the whole sequence's on the last rank).
    """
    B, T, D = x.shape
    W = weight.shape[1]
    split = resolve_split(cp)
    if split is not None:
        if state is not None:
            raise ValueError("causal_conv1d: a sequence split across ranks starts from a zero state; got a state")
        _check_reset(reset, x, "causal_conv1d")
        state = context.halo(x, W, split)
        if reset is not None:
            # Steps of an earlier document (a reset after them on an earlier rank) read as zeros.
            state = state * context.halo_valid(reset, W, split, x.device).unsqueeze(-1).to(state.dtype)
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


def _check_reset(reset, x, name):
    if reset is not None and (reset.shape != x.shape[:2] or reset.dtype != torch.bool):
        raise ValueError(f"{name}: reset must be a (B, T_local) = {tuple(x.shape[:2])} bool tensor; "
                         f"got {tuple(reset.shape)} {reset.dtype}")
