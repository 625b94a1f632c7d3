import math

import pytest

import torch

from megarnn.ops import causal_conv1d, sliding_window_attention
from megarnn.ops.attention import HAS_FLASH_ATTN


def test_causal_conv_equals_torch_conv1d():
    B, T, D, W = 2, 11, 6, 4
    x, w, bias = torch.randn(B, T, D, dtype=torch.float64), torch.randn(D, W, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], bias, padding=W - 1, groups=D)[..., :T]
    y, state = causal_conv1d(x, w, bias)
    torch.testing.assert_close(y, ref.transpose(1, 2))
    torch.testing.assert_close(state, x[:, -(W - 1):])


def test_causal_conv_resets_equal_separate_documents_and_chunks():
    B, T, D, W = 1, 12, 3, 4
    x, w = torch.randn(B, T, D, dtype=torch.float64), torch.randn(D, W, dtype=torch.float64)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 5] = True
    reset[0, 10] = True
    y, _ = causal_conv1d(x, w, reset=reset)
    for lo, hi in [(0, 5), (5, 10), (10, 12)]:
        torch.testing.assert_close(y[:, lo:hi], causal_conv1d(x[:, lo:hi], w)[0])
    # Chunk by chunk with carried state, cutting right after a reset.
    y1, s = causal_conv1d(x[:, :6], w, reset=reset[:, :6])
    y2, _ = causal_conv1d(x[:, 6:], w, state=s, reset=reset[:, 6:])
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


def _naive_attention(q, k, v, window, seg):
    B, T, H, Dh = q.shape
    rep = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            for h in range(H):
                js = [j for j in range(T) if j <= i and i - j < window and seg[b, j] == seg[b, i]]
                s = torch.stack([q[b, i, h] @ k[b, j, h // rep] for j in js]) / math.sqrt(Dh)
                p = torch.softmax(s, 0)
                out[b, i, h] = sum(p[n] * v[b, j, h // rep] for n, j in enumerate(js))
    return out


def test_sliding_window_attention_equals_naive_with_documents_and_cache():
    B, T, H, Hkv, Dh, window = 2, 13, 4, 1, 8, 5
    q = torch.randn(B, T, H, Dh, dtype=torch.float64)
    k, v = torch.randn(B, T, Hkv, Dh, dtype=torch.float64), torch.randn(B, T, Hkv, Dh, dtype=torch.float64)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 4] = True
    reset[1, 9] = True
    ref = _naive_attention(q, k, v, window, torch.cumsum(reset.int(), 1))
    out, _ = sliding_window_attention(q, k, v, window, reset)
    torch.testing.assert_close(out, ref)
    parts, cache = [], None
    for lo, hi in [(0, 3), (3, 4), (4, 10), (10, 13)]:
        o, cache = sliding_window_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], window, reset[:, lo:hi], cache)
        parts.append(o)
        assert cache["k"].shape[1] <= window - 1  # constant memory
    torch.testing.assert_close(torch.cat(parts, 1), ref)


needs_flash = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_FLASH_ATTN),
                                 reason="needs a CUDA GPU with flash-attn (the `gpu` extra)")


@needs_flash
def test_flash_attn_path_equals_sdpa_on_gpu():
    B, T, H, Dh, window = 2, 300, 4, 64, 37
    q = torch.randn(B, T, H, Dh, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, 1, Dh, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    reset[0, 100] = reset[1, 7] = True
    out, cache = sliding_window_attention(q, k, v, window, reset, backend="flash")
    ref, ref_cache = sliding_window_attention(q.float(), k.float(), v.float(), window, reset, backend="sdpa")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert (cache["valid"] == ref_cache["valid"]).all()
