import pytest
import torch

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM


def _model(pattern="RRA", window=5, **kw):
    c = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=2, block_pattern=pattern,
                    attention_window=window, **kw)
    return RecurrentLM(c).double()


def _resets(B, T, starts):
    r = torch.zeros(B, T, dtype=torch.bool)
    for b, t in starts:
        r[b, t] = True
    return r


@pytest.mark.parametrize("pattern", ["RRA", "R", "A"])
def test_step_equals_parallel(pattern):
    m = _model(pattern)
    x = torch.randint(0, 97, (2, 14))
    reset = _resets(2, 14, [(0, 0), (0, 9), (1, 5)])
    full, _ = m(x, reset=reset)
    state, outs = None, []
    for t in range(14):
        logits, state = m.step(x[:, t:t + 1], state, reset[:, t:t + 1])
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_chunked_forward_with_carried_state_equals_full():
    m = _model()
    x = torch.randint(0, 97, (2, 20))
    full, _ = m(x)
    a, s = m(x[:, :7])
    b, s = m(x[:, 7:8], s)
    c, _ = m(x[:, 8:], s)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-10, atol=1e-10)


def test_packed_documents_equal_separate_documents():
    """With resets, each document in a packed row is processed as if it were alone."""
    m = _model(window=64)
    d1, d2 = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 6))
    packed, _ = m(torch.cat([d1, d2], 1), reset=_resets(1, 15, [(0, 0), (0, 9)]))
    torch.testing.assert_close(packed[:, :9], m(d1)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:, 9:], m(d2)[0], rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter_and_logits_are_capped():
    m = _model(logits_soft_cap=2.0)
    logits, _ = m(torch.randint(0, 97, (2, 10)))
    assert logits.abs().max() <= 2.0
    logits.sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_flops_per_token_counts_matmuls_and_attention():
    m = _model("R")
    c = m.c
    # Hawk: no attention; every matrix weight plus the (tied) head, times 2 (fwd) times 3 (fwd+bwd).
    weights = sum(p.numel() for n, p in m.named_parameters() if p.dim() >= 2 and "embed" not in n)
    assert m.flops_per_token(16) == 6 * (weights + c.vocab_size * c.d_model)
    attn = _model("A", window=4)
    keys = (1 + 2 + 3 + 4 + 4 * 4) / 8  # seq_len 8, window 4
    extra = attn.flops_per_token(8) - 6 * (sum(p.numel() for n, p in attn.named_parameters()
                                               if p.dim() >= 2 and "embed" not in n) + 97 * 32)
    assert extra == pytest.approx(3 * 3 * 2 * 2 * c.n_heads * c.head_dim * keys)
