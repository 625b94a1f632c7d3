"""Causal sliding-window multi-query attention with document masking and a bounded cache.

PyTorch SDPA with a banded boolean mask runs everywhere; the mask also keeps queries
from attending across document starts. The cache holds at most `window - 1` past keys,
so step-mode decoding runs in constant memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             reset: torch.Tensor | None = None, cache: dict | None = None,
                             ) -> tuple[torch.Tensor, dict]:
    """Query i sees key j when j <= i, i - j < window and both lie in the same document.

    q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh) with H a multiple of Hkv (positions already
    encoded); reset: (B, T) bool, True where a document starts; cache: {"k", "v": (B, L,
    Hkv, Dh), "valid": (B, L) bool} from the previous chunk. Returns out (B, T, H, Dh) and
    the cache for the next chunk.
    """
    B, T, H, Dh = q.shape
    seg = torch.zeros(B, T, dtype=torch.int32, device=q.device) if reset is None \
        else torch.cumsum(reset.to(torch.int32), dim=1)
    if cache is not None and cache["k"].shape[1] > 0:
        k_all = torch.cat([cache["k"], k], dim=1)
        v_all = torch.cat([cache["v"], v], dim=1)
        # A cached key is in the current segment 0 only if no reset followed it.
        k_seg = torch.cat([torch.where(cache["valid"], 0, -1).to(torch.int32), seg], dim=1)
    else:
        k_all, v_all, k_seg = k, v, seg
    L = k_all.shape[1] - T
    qi = torch.arange(T, device=q.device)[:, None] + L
    kj = torch.arange(L + T, device=q.device)[None, :]
    band = (kj <= qi) & (qi - kj < window)  # (T, L + T)
    mask = band[None] & (k_seg[:, None, :] == seg[:, :, None])  # (B, T, L + T)
    rep = H // k.shape[2]
    kh = k_all.repeat_interleave(rep, dim=2) if rep > 1 else k_all
    vh = v_all.repeat_interleave(rep, dim=2) if rep > 1 else v_all
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), attn_mask=mask[:, None])
    keep = min(window - 1, L + T)
    new_cache = {
        "k": k_all[:, L + T - keep:],
        "v": v_all[:, L + T - keep:],
        "valid": k_seg[:, L + T - keep:] == seg[:, -1:],
    }
    return out.transpose(1, 2), new_cache
