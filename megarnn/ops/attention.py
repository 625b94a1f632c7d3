"""Causal sliding-window multi-query attention with document masking and a bounded cache.

PyTorch SDPA with a banded boolean mask runs everywhere; the mask also keeps queries
from attending across document starts. On a CUDA device with the `gpu` extra
(flash-attn) installed, the parallel form without a cache runs flash-attn's varlen
sliding-window kernel instead: documents become variable-length sequences and
window_size=(window - 1, 0) is the same band. The cache holds at most `window - 1` past
keys, so step-mode decoding runs in constant memory.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from megarnn.ops import context
from megarnn.ops.conv import _check_reset
from megarnn.ops.scan import resolve_split

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def flash_sliding_window(q, k, v, window: int, reset: torch.Tensor | None) -> torch.Tensor:
    """flash-attn varlen over the documents of each row. q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh)."""
    from flash_attn import flash_attn_varlen_func

    B, T = q.shape[:2]
    starts = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    starts[:, 0] = True
    if reset is not None:
        starts |= reset
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, T, T,
                                 causal=True, window_size=(window - 1, 0))
    return out.unflatten(0, (B, T))


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             reset: torch.Tensor | None = None, cache: dict | None = None,
                             backend: str | None = None, cp=None) -> tuple[torch.Tensor, dict]:
    """Query i sees key j when j <= i, i - j < window and both lie in the same document.

    q: (B, T, H, Dh); k, v: (B, T, Hkv, Dh) with H a multiple of Hkv (positions already
    encoded); reset: (B, T) bool, True where a document starts; cache: {"k", "v": (B, L,
    Hkv, Dh), "valid": (B, L) bool} from the previous chunk. backend: "sdpa", "flash", or
    None (flash for bf16/fp16 CUDA tensors without a cache when flash-attn is installed).
    Returns out (B, T, H, Dh) and the cache for the next chunk.
    cp: context parallelism (megarnn/ops/context.py): q, k, v, reset are this rank's chunk
    (positions encoded with GLOBAL positions) and cache must be None; the previous window - 1
    keys and values arrive from the earlier ranks as the cache (SDPA backend).
    """
    B, T, H, Dh = q.shape
    split = resolve_split(cp)
    if split is not None:
        if cache is not None:
            raise ValueError("sliding_window_attention: a sequence split across ranks starts without a cache")
        _check_reset(reset, q, "sliding_window_attention")
        kv = context.halo(torch.cat([k, v], dim=-1), window, split)  # one message for both
        k_halo, v_halo = kv.split(k.shape[-1], dim=-1)
        valid = context.halo_valid(reset, window, split, q.device) if reset is not None \
            else context.halo_inside(B, T, window, split, q.device)
        cache, backend = {"k": k_halo, "v": v_halo, "valid": valid}, "sdpa"
    if backend is None:
        flash_ok = cache is None and q.is_cuda and HAS_FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16)
        backend = "flash" if flash_ok else "sdpa"
    if backend == "flash":
        keep = min(window - 1, T)
        last_seg = torch.zeros(B, T, dtype=torch.int32, device=q.device) if reset is None \
            else torch.cumsum(reset.to(torch.int32), dim=1)
        return flash_sliding_window(q, k, v, window, reset), {
            "k": k[:, T - keep:], "v": v[:, T - keep:], "valid": last_seg[:, T - keep:] == last_seg[:, -1:]}
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
